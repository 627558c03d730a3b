//! `bulkhead-vmm`: boots a Linux kernel under KVM with every virtio device
//! served by a vhost-user backend process.

use bulkhead_common::cli::error_chain;
use bulkhead_common::logging;
use bulkhead_common::sandbox::SandboxMode;
use std::process::ExitCode;

use bulkhead_vmm::cli::{Args, Command, CtlRequest};
use bulkhead_vmm::seccomp::SeccompMode;
use bulkhead_vmm::vcpu::ExitReason;
use bulkhead_vmm::vmm::{self, VmConfig};
use clap::Parser;
use serde_json::json;

/// Exit status: the guest powered off.
const EXIT_POWEROFF: u8 = 0;
/// Exit status: the VMM failed (bad flag, unreachable backend, KVM error).
const EXIT_ERROR: u8 = 1;
/// Exit status: the guest rebooted (keyboard-controller reset or triple fault).
const EXIT_REBOOT: u8 = 3;
/// Exit status: a vCPU failed.
const EXIT_VCPU_ERROR: u8 = 4;
/// Exit status: stopped through the API socket.
const EXIT_STOPPED: u8 = 5;

fn ctl(api_socket: &std::path::Path, req: CtlRequest) -> ExitCode {
    let v = match req {
        CtlRequest::Ping => json!({"cmd": "ping"}),
        CtlRequest::Status => json!({"cmd": "status"}),
        CtlRequest::Shutdown => json!({"cmd": "shutdown"}),
        CtlRequest::List => json!({"cmd": "list"}),
        CtlRequest::Metrics => json!({"cmd": "metrics"}),
        CtlRequest::Swap { device, socket } => {
            json!({"cmd": "swap", "device": device, "socket": socket})
        }
    };
    match bulkhead_vmm::api::request(api_socket, &v) {
        Ok(reply) => {
            // `metrics` prints the text itself, ready for a scraper.
            match reply.get("metrics").and_then(|m| m.as_str()) {
                Some(text) => print!("{text}"),
                None => println!("{reply}"),
            }
            if reply.get("ok").and_then(|o| o.as_bool()) == Some(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_ERROR)
            }
        }
        Err(e) => {
            eprintln!("bulkhead-vmm ctl: {}: {e}", api_socket.display());
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn main() -> ExitCode {
    logging::init_logging("bulkhead-vmm", log::LevelFilter::Warn);
    let args = Args::parse();
    if let Some(Command::Ctl {
        api_socket,
        request,
    }) = args.command
    {
        return ctl(&api_socket, request);
    }
    if let Some(Command::Probe) = args.command {
        return match bulkhead_vmm::probe::probe_long_mode() {
            None => {
                println!("KVM can run a Linux guest here");
                ExitCode::SUCCESS
            }
            Some(why) => {
                println!("{why}");
                ExitCode::from(2)
            }
        };
    }
    let Some(kernel) = args.kernel else {
        eprintln!("bulkhead-vmm: --kernel is required");
        return ExitCode::from(EXIT_ERROR);
    };
    let mut devices = Vec::new();
    devices.extend(args.blk);
    devices.extend(args.net);
    devices.extend(args.console);
    devices.extend(args.vhost_user);
    let cfg = VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory: args.memory,
        cpus: args.cpus,
        devices,
        serial: args.serial,
        api_socket: args.api_socket,
        seccomp: match args.seccomp {
            SandboxMode::Enforce => SeccompMode::Kill,
            SandboxMode::Log => SeccompMode::Log,
            SandboxMode::Off => SeccompMode::Off,
        },
        hide_cx16: args.no_cx16,
    };
    match vmm::run(&cfg) {
        Ok(reason) => {
            let (code, what) = match reason {
                ExitReason::PowerOff | ExitReason::None => (EXIT_POWEROFF, "guest powered off"),
                ExitReason::Reboot => (EXIT_REBOOT, "guest rebooted"),
                ExitReason::Error => (EXIT_VCPU_ERROR, "vCPU failed"),
                ExitReason::Stopped => (EXIT_STOPPED, "stopped"),
            };
            eprintln!("bulkhead-vmm: {what}");
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("bulkhead-vmm: {}", error_chain(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}
