//! The command line of `bulkhead-console`: its clap definition, which `main`
//! parses and `bulkhead-docgen` turns into the man page and completions.

use bulkhead_common::scaffold::{self, BackendArgs};
use clap::{CommandFactory, Parser};

use crate::port::{DEFAULT_SCROLLBACK, PortSpec};

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
pub struct Args {
    /// The options every backend takes (socket, sandbox, user, ...).
    #[command(flatten)]
    pub backend: BackendArgs,

    /// Host side of the console (port 0): socket=PATH, pty, file=PATH or stdio.
    /// Default: socket=SOCKET.console beside the vhost-user socket.
    #[arg(long, value_name = "SPEC", value_parser = parse_console)]
    pub console: Option<PortSpec>,

    /// A named port: name=NAME[,socket=PATH|pty|file=PATH|stdio] (repeatable).
    /// Default host side: socket=SOCKET.NAME beside the vhost-user socket.
    #[arg(long = "port", value_name = "SPEC", value_parser = parse_port)]
    pub ports: Vec<PortSpec>,

    /// Scrollback per port, in bytes: guest output kept while no client reads it.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SCROLLBACK,
          value_parser = parse_scrollback)]
    pub scrollback: usize,
}

/// The clap definition of the command line, for `bulkhead-docgen` (the man
/// page and shell completions) and tests.
pub fn command() -> clap::Command {
    Args::command()
}
