//! `bulkhead-console`: a vhost-user virtio-console backend whose ports end
//! in unix sockets, ptys, log files or the daemon's stdio.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_common::scaffold::{self, Backend, Program, StartError};
use clap::Parser;

use bulkhead_console::cli::Args;
use bulkhead_console::device::ConsoleDevice;
use bulkhead_console::policy;
use bulkhead_console::port::{HostSpec, Port};

/// Most named ports besides the console.
const MAX_EXTRA_PORTS: usize = 30;

/// `SOCKET.suffix`, beside the vhost-user socket.
fn beside(socket: &Option<PathBuf>, suffix: &str) -> Option<PathBuf> {
    socket.as_ref().map(|p| {
        let mut s = p.as_os_str().to_owned();
        s.push(".");
        s.push(suffix);
        PathBuf::from(s)
    })
}

/// Resolves default host sides; returns (name, host, label) per port.
fn resolve(args: &Args) -> Result<Vec<(Option<String>, HostSpec, String)>, String> {
    let sock = &args.backend.vhost_user.socket_path;
    let mut out = Vec::new();
    let console = match args.console.as_ref().and_then(|c| c.host.clone()) {
        Some(h) => h,
        None => HostSpec::Socket(beside(sock, "console").ok_or("--console is required with --fd")?),
    };
    out.push((None, console, "console".to_string()));
    if args.ports.len() > MAX_EXTRA_PORTS {
        return Err(format!("at most {MAX_EXTRA_PORTS} named ports"));
    }
    for p in &args.ports {
        let name = p.name.clone().ok_or("a port needs name=NAME")?;
        if out
            .iter()
            .any(|(n, _, _)| n.as_deref() == Some(name.as_str()))
        {
            return Err(format!("port name {name} given twice"));
        }
        let host = match &p.host {
            Some(h) => h.clone(),
            None => {
                HostSpec::Socket(beside(sock, &name).ok_or("--port needs socket=PATH with --fd")?)
            }
        };
        out.push((Some(name.clone()), host, name));
    }
    let stdio = out.iter().filter(|(_, h, _)| *h == HostSpec::Stdio).count();
    if stdio > 1 {
        return Err("only one port can use stdio".into());
    }
    Ok(out)
}

const PROGRAM: Program = Program {
    name: "bulkhead-console",
    device_type: "console",
    // QEMU's vhost-user.json defines no features for this type.
    capabilities: &[],
};

/// Opens every port's host side and builds the device (before the sandbox).
fn build(args: &Args) -> Result<Backend<ConsoleDevice>, StartError> {
    let specs = resolve(args).map_err(StartError::Usage)?;
    let mut ports = Vec::new();
    let mut restore = None;
    for (id, (name, host, label)) in specs.iter().enumerate() {
        let (port, r) = Port::open(id as u32, name.clone(), host, args.scrollback)
            .map_err(|e| StartError::Failed(format!("port {id} ({label}): {e}")))?;
        log::info!("port {id} ({label}): {}", port.describe());
        if let HostSpec::Pty = host {
            let what = port.describe().trim_start_matches("pty ").to_string();
            println!("port {id} ({label}): pty {what}");
            if let Some(file) = beside(
                &args.backend.vhost_user.socket_path,
                &format!("{label}.pty"),
            ) && let Err(e) = std::fs::write(&file, format!("{what}\n"))
            {
                log::warn!("cannot write {}: {e}", file.display());
            }
        }
        restore = restore.or(r);
        ports.push(port);
    }
    let device = ConsoleDevice::new(ports).map_err(|e| StartError::Failed(e.to_string()))?;
    log::info!(
        "serving a console with {} port(s), scrollback {} bytes",
        device.ports().len(),
        args.scrollback
    );
    let writes_files = specs.iter().any(|(_, h, _)| matches!(h, HostSpec::File(_)));
    let policy = policy::policy(device.ports().len(), writes_files);
    let mut backend = Backend::new(Arc::new(device), policy);
    if let Some(r) = restore {
        backend.at_exit = Some(Box::new(move || r.restore()));
    }
    Ok(backend)
}

fn main() -> ExitCode {
    if let Some(code) = scaffold::capabilities_if_asked(&PROGRAM) {
        return code;
    }
    let args = Args::parse();
    scaffold::run(&PROGRAM, &args.backend, || build(&args))
}
