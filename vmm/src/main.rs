//! `bulkhead-vmm`: boots a Linux kernel under KVM with every virtio device
//! served by a vhost-user backend process.

use bulkhead_common::cli::error_chain;
use bulkhead_common::sandbox::SandboxMode;
use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_vmm::config::{self, DeviceConfig, DeviceKind, SerialMode};
use bulkhead_vmm::seccomp::SeccompMode;
use bulkhead_vmm::vcpu::ExitReason;
use bulkhead_vmm::vmm::{self, DEFAULT_CMDLINE, VmConfig};
use clap::{Parser, Subcommand};
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

fn blk(s: &str) -> Result<DeviceConfig, String> {
    config::parse_device(DeviceKind::Blk, s)
}
fn net(s: &str) -> Result<DeviceConfig, String> {
    config::parse_device(DeviceKind::Net, s)
}
fn console(s: &str) -> Result<DeviceConfig, String> {
    config::parse_device(DeviceKind::Console, s)
}
fn generic(s: &str) -> Result<DeviceConfig, String> {
    config::parse_device(DeviceKind::Generic, s)
}
fn cpus(s: &str) -> Result<u8, String> {
    let n: u8 = s.parse().map_err(|_| format!("'{s}' is not 1 to 254"))?;
    if n == 0 || n > bulkhead_vmm::boot::mptable::MAX_CPUS {
        return Err(format!("'{s}' is not 1 to 254"));
    }
    Ok(n)
}

/// Thin KVM VMM: virtio-pci and virtio-mmio transports in front of
/// vhost-user backends (bulkhead-blk, bulkhead-net, bulkhead-console or any
/// other). Exit status: 0 guest powered off, 1 VMM error, 3 guest reboot,
/// 4 vCPU failure, 5 stopped through the API socket.
#[derive(Parser, Debug)]
#[command(name = "bulkhead-vmm", version, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Kernel: ELF vmlinux with a PVH note, or bzImage.
    #[arg(long, value_name = "PATH", required = true)]
    kernel: Option<PathBuf>,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,

    /// Guest RAM (K, M or G suffix).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = config::parse_memory)]
    memory: u64,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1", value_parser = cpus)]
    cpus: u8,

    /// vhost-user block device: socket=PATH[,transport=pci|mmio][,queues=N][,queue-size=N].
    #[arg(long, value_name = "OPTS", value_parser = blk)]
    blk: Vec<DeviceConfig>,

    /// vhost-user net device: socket=PATH[,transport=pci|mmio][,queues=N][,queue-size=N].
    #[arg(long, value_name = "OPTS", value_parser = net)]
    net: Vec<DeviceConfig>,

    /// vhost-user console device: socket=PATH[,transport=pci|mmio][,queues=N][,queue-size=N].
    #[arg(long, value_name = "OPTS", value_parser = console)]
    console: Vec<DeviceConfig>,

    /// Any vhost-user device: socket=PATH,virtio-id=N[,queues=N][,queue-size=N][,config-size=N][,transport=...].
    #[arg(long = "vhost-user", value_name = "OPTS", value_parser = generic)]
    vhost_user: Vec<DeviceConfig>,

    /// Serial console (COM1): stdio, file=PATH or none.
    #[arg(long, value_name = "MODE", default_value = "stdio", value_parser = config::parse_serial)]
    serial: SerialMode,

    /// Control socket: one JSON request per line (ping, status, shutdown,
    /// list, metrics, swap); see `bulkhead-vmm ctl`.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,

    /// Confinement, the daemons' flag and words: per-thread seccomp filters
    /// with argument checks and Landlock (no path but the --api-socket's
    /// directory, no TCP). `log` logs seccomp violations instead of killing
    /// the VMM; Landlock stays on. `--seccomp` and `kill` are older names.
    #[arg(
        long = "sandbox",
        alias = "seccomp",
        value_name = "MODE",
        value_enum,
        default_value = "enforce"
    )]
    seccomp: SandboxMode,

    /// Hide CMPXCHG16B from the guest's CPUID (for nested hypervisors that
    /// cannot run it; costs the guest some SLUB performance).
    #[arg(long)]
    no_cx16: bool,
}

/// Talk to a running VMM's control socket.
#[derive(Subcommand, Debug)]
enum Command {
    /// Send one request to a running VMM's --api-socket and print the JSON reply.
    Ctl {
        /// The VMM's control socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        #[command(subcommand)]
        request: CtlRequest,
    },
    /// Check whether KVM here can run a Linux guest (exit 0), or print why not (exit 2).
    Probe,
}

/// A control request.
#[derive(Subcommand, Debug)]
enum CtlRequest {
    /// Liveness check.
    Ping,
    /// Whether the VM runs.
    Status,
    /// Stop the VM (the VMM exits with status 5).
    Shutdown,
    /// Devices, their backend socket and state (connected, reconnecting).
    List,
    /// The devices' counters in the Prometheus text format (printed as text, not JSON).
    Metrics,
    /// Move a running device to another backend process without rebooting the guest.
    Swap {
        /// Device id, as `list` shows it (blk0, net0, console0, or the id= given).
        device: String,
        /// Socket of the new backend (already listening).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
}

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
    // Never styled: a style check is an ioctl on the terminal, which the
    // seccomp filter refuses.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .write_style(env_logger::WriteStyle::Never)
        .init();
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
