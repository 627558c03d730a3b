//! `bulkhead-console`: a vhost-user virtio-console backend whose ports end
//! in unix sockets, ptys, log files or the daemon's stdio.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_common::scaffold::{self, Backend, BackendArgs, Program, StartError};
use clap::Parser;

use bulkhead_console::device::ConsoleDevice;
use bulkhead_console::policy;
use bulkhead_console::port::{DEFAULT_SCROLLBACK, HostSpec, Port, PortSpec};

/// Most named ports besides the console.
const MAX_EXTRA_PORTS: usize = 30;

fn parse_console(s: &str) -> Result<PortSpec, String> {
    let spec: PortSpec = s.parse()?;
    if spec.name.is_some() {
        return Err("the console port has no name; use --port for named ports".into());
    }
    if spec.host.is_none() {
        return Err("expected socket=PATH, pty, file=PATH or stdio".into());
    }
    Ok(spec)
}

fn parse_port(s: &str) -> Result<PortSpec, String> {
    let spec: PortSpec = s.parse()?;
    if spec.name.is_none() {
        return Err("a port needs name=NAME".into());
    }
    Ok(spec)
}

fn parse_scrollback(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if !(1..=64 << 20).contains(&n) {
        return Err("must be 1 to 67108864 bytes".into());
    }
    Ok(n)
}

/// vhost-user console backend: a virtio-console device (VERSION_1, SIZE,
/// MULTIPORT, EMERG_WRITE) for any vhost-user frontend.
///
/// Port 0 is the console (`hvc0` in a Linux guest); each --port adds a named
/// port (`/dev/virtio-ports/NAME`). A port's host side is a unix socket that
/// clients attach to and detach from (`socat -,raw,echo=0 UNIX-CONNECT:PATH`),
/// a pty (its path is printed and written to SOCKET.NAME.pty), a log file
/// (appended) or the daemon's stdio. Guest output nobody reads waits in a
/// per-port scrollback of --scrollback bytes that drops its oldest bytes when
/// full; the next client gets it first. While the host side keeps up, output
/// is lossless (the guest waits for it, at most 500 ms at a time). Host input
/// is read only as fast as the guest posts receive buffers.
///
/// Resize: a socket port's size is set through PATH.ctl (`resize COLS ROWS`,
/// also `size`, `stats`); a pty's or terminal's size is polled every 250 ms.
/// The console's size goes to the guest as a RESIZE control message
/// (MULTIPORT) and in the config space with a config-change notification
/// (SIZE; needs the BACKEND_REQ protocol feature).
#[derive(Parser, Debug)]
#[command(name = "bulkhead-console", version, verbatim_doc_comment, after_help = scaffold::EXIT_STATUS_HELP)]
struct Args {
    #[command(flatten)]
    backend: BackendArgs,

    /// Host side of the console (port 0): socket=PATH, pty, file=PATH or stdio.
    /// Default: socket=SOCKET.console beside the vhost-user socket.
    #[arg(long, value_name = "SPEC", value_parser = parse_console)]
    console: Option<PortSpec>,

    /// A named port: name=NAME[,socket=PATH|pty|file=PATH|stdio] (repeatable).
    /// Default host side: socket=SOCKET.NAME beside the vhost-user socket.
    #[arg(long = "port", value_name = "SPEC", value_parser = parse_port)]
    ports: Vec<PortSpec>,

    /// Scrollback per port, in bytes: guest output kept while no client reads it.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SCROLLBACK,
          value_parser = parse_scrollback)]
    scrollback: usize,
}

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
