//! The control socket (`--api-socket`): one JSON request per line, one JSON
//! reply per line, any number of requests per connection.
//!
//! | request | reply |
//! |---|---|
//! | `{"cmd":"ping"}` | `{"ok":true,"result":"pong"}` |
//! | `{"cmd":"status"}` | `{"ok":true,"result":"running"}` (or `"stopping"`) |
//! | `{"cmd":"shutdown"}` | `{"ok":true}`, then the VMM exits with status 5 |
//! | `{"cmd":"list"}` | `{"ok":true,"devices":[{"id":"blk0","type":"blk","socket":"...","state":"connected","active":true,"queues":[0],"reconnects":0,"swaps":0,"swap_state_bytes":null,"inflight":0,"last_error":null}]}` |
//! | `{"cmd":"swap","device":"blk0","socket":"/new.sock"}` | `{"ok":true,"bases":[[0,17]]}`: the old backend's GET_VRING_BASE per queue |
//!
//! Errors are `{"ok":false,"error":"..."}`. A bare word (`ping`, `status`,
//! `shutdown`, `list`) is accepted for the commands without arguments.
//! [`request`] is the client side used by `bulkhead-vmm ctl`.

use bulkhead_common::cli::error_chain;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::device::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};
use crate::seccomp::{self, SeccompMode, Thread};
use crate::vcpu::{ExitReason, ExitRequest};
use crate::vhost_user::BackendHandle;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Liveness check.
    Ping,
    /// Whether the VM runs.
    Status,
    /// Stop the VM (exit status 5).
    Shutdown,
    /// Devices and their backend state.
    List,
    /// Move `device` to the backend listening at `socket`.
    Swap {
        /// Device id (`blk0`, ...).
        device: String,
        /// The new backend's socket.
        socket: PathBuf,
    },
}

/// The name of a virtio device type in the API.
pub fn type_name(virtio_id: u32) -> &'static str {
    match virtio_id {
        VIRTIO_ID_BLOCK => "blk",
        VIRTIO_ID_NET => "net",
        VIRTIO_ID_CONSOLE => "console",
        _ => "vhost-user",
    }
}

fn parse(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line.starts_with('{') {
        return serde_json::from_str(line).map_err(|e| format!("bad request: {e}"));
    }
    match line {
        "ping" => Ok(Request::Ping),
        "status" => Ok(Request::Status),
        "shutdown" => Ok(Request::Shutdown),
        "list" => Ok(Request::List),
        _ => Err("unknown command (ping, status, shutdown, list, swap)".into()),
    }
}

fn device_json(h: &BackendHandle) -> Value {
    let i = h.info();
    json!({
        "id": i.id,
        "type": type_name(i.virtio_id),
        "socket": i.socket,
        "state": i.state.name(),
        "active": i.active,
        "queues": i.queues,
        "reconnects": i.reconnects,
        "swaps": i.swaps,
        "swap_state_bytes": i.swap_state_bytes,
        "inflight": i.inflight,
        "last_error": i.last_error,
    })
}

/// Answers one request. `shutdown` only answers: the caller asks the VMM to
/// stop once the reply is written, or the exit could close the connection
/// before the client reads it.
pub fn handle(req: Request, exit: &ExitRequest, devices: &[Arc<BackendHandle>]) -> Value {
    match req {
        Request::Ping => json!({"ok": true, "result": "pong"}),
        Request::Status => {
            let s = if exit.stopping() {
                "stopping"
            } else {
                "running"
            };
            json!({"ok": true, "result": s})
        }
        Request::Shutdown => json!({"ok": true}),
        Request::List => {
            let list: Vec<Value> = devices.iter().map(|d| device_json(d)).collect();
            json!({"ok": true, "devices": list})
        }
        Request::Swap { device, socket } => {
            let Some(h) = devices.iter().find(|d| d.id() == device) else {
                return json!({"ok": false, "error": format!("no device '{device}'")});
            };
            match h.swap(&socket) {
                Ok(bases) => json!({"ok": true, "bases": bases}),
                Err(e) => json!({"ok": false, "error": error_chain(&e)}),
            }
        }
    }
}

fn serve(
    stream: UnixStream,
    exit: &ExitRequest,
    devices: &[Arc<BackendHandle>],
) -> std::io::Result<()> {
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_REQUEST).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_REQUEST {
            let reply = json!({"ok": false, "error": "request too long"});
            (&stream).write_all(format!("{reply}\n").as_bytes())?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let (reply, stop) = match parse(&line) {
            Ok(req) => {
                let stop = matches!(req, Request::Shutdown);
                (handle(req, exit, devices), stop)
            }
            Err(e) => (json!({"ok": false, "error": e}), false),
        };
        let written = (&stream).write_all(format!("{reply}\n").as_bytes());
        if stop {
            exit.request(ExitReason::Stopped);
        }
        written?;
    }
}

/// Binds `path` and serves it on a new thread under the API seccomp filter.
pub fn start(
    path: &Path,
    exit: Arc<ExitRequest>,
    mode: SeccompMode,
    devices: Vec<Arc<BackendHandle>>,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            if let Err(e) = seccomp::apply(Thread::Api, mode) {
                log::error!("API thread: {e}");
                return;
            }
            // One connection at a time: requests are rare and a swap must
            // not race another swap of the same device.
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve(stream, &exit, &devices) {
                    log::warn!("API connection: {e}");
                }
            }
        })?;
    Ok(())
}

/// Sends one request to the control socket at `path` and returns the reply.
pub fn request(path: &Path, req: &Value) -> std::io::Result<Value> {
    let stream = UnixStream::connect(path)?;
    (&stream).write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
