//! The control socket: one line-based command per connection. For now it
//! answers `ping` and `status`, and `shutdown` stops the VM; device hotplug
//! and backend replacement come later.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use crate::seccomp::{self, SeccompMode, Thread};
use crate::vcpu::{ExitReason, ExitRequest};

/// Longest command line accepted.
const MAX_COMMAND: u64 = 256;

fn serve(stream: UnixStream, exit: &ExitRequest) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new((&stream).take_limit()).read_line(&mut line)?;
    let reply = match line.trim() {
        "ping" => "pong",
        "status" => {
            if exit.stopping() {
                "stopping"
            } else {
                "running"
            }
        }
        "shutdown" => {
            exit.request(ExitReason::Stopped);
            "ok"
        }
        _ => "error: unknown command (ping, status, shutdown)",
    };
    (&stream).write_all(format!("{reply}\n").as_bytes())
}

trait TakeLimit {
    fn take_limit(self) -> std::io::Take<Self>
    where
        Self: Sized;
}

impl TakeLimit for &UnixStream {
    fn take_limit(self) -> std::io::Take<Self> {
        std::io::Read::take(self, MAX_COMMAND)
    }
}

/// Binds `path` and serves it on a new thread under the API seccomp filter.
pub fn start(path: &Path, exit: Arc<ExitRequest>, mode: SeccompMode) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            if let Err(e) = seccomp::apply(Thread::Api, mode) {
                log::error!("API thread: {e}");
                return;
            }
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve(stream, &exit) {
                    log::warn!("API connection: {e}");
                }
            }
        })?;
    Ok(())
}
