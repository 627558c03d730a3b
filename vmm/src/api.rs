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
//! | `{"cmd":"metrics"}` | `{"ok":true,"metrics":"# HELP bulkhead_vmm_reconnects_total ..."}`: the per-device counters of `list` in the Prometheus text format ([`metrics`]) |
//!
//! Errors are `{"ok":false,"error":"..."}`. A bare word (`ping`, `status`,
//! `shutdown`, `list`, `metrics`) is accepted for the commands without
//! arguments.
//! [`request`] is the client side used by `bulkhead-vmm ctl`.

use bulkhead_common::cli::error_chain;
use bulkhead_common::stats::Stats;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::device::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};
use crate::seccomp::{self, SeccompMode, Thread};
use crate::vcpu::{ExitReason, ExitRequest};
use crate::vhost_user::{BackendHandle, BackendInfo, LinkState};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How long a connection may stay silent between requests, or leave a reply
/// unread, before it is closed: connections are served one at a time, so a
/// client that neither asks nor reads must not keep the next one out.
const IDLE: std::time::Duration = std::time::Duration::from_secs(30);

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
    /// The devices' counters in the Prometheus text format.
    Metrics,
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
        "metrics" => Ok(Request::Metrics),
        _ => Err("unknown command (ping, status, shutdown, list, metrics, swap)".into()),
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

/// The per-device counters and gauges of `list`, each labelled with the
/// device's `id` and `type`; the link state is one gauge per state name,
/// 1 for the current one. Rendered with the `bulkhead_vmm` prefix.
pub fn metrics(devices: &[BackendInfo]) -> Stats {
    let mut s = Stats::new();
    for d in devices {
        let l = [("id", d.id.as_str()), ("type", type_name(d.virtio_id))];
        s.counter_with(
            "reconnects",
            "Times the backend was reconnected after a loss.",
            &l,
            d.reconnects,
        )
        .counter_with(
            "swaps",
            "Times the device was moved to another backend.",
            &l,
            d.swaps,
        )
        .gauge_with(
            "active",
            "Whether the driver has the device running (1) or not (0).",
            &l,
            u64::from(d.active),
        )
        .gauge_with(
            "queues_enabled",
            "Queues the driver enabled.",
            &l,
            d.queues.len() as u64,
        );
        for state in [LinkState::Connected, LinkState::Reconnecting] {
            let sl = [l[0], l[1], ("state", state.name())];
            s.gauge_with(
                "link_state",
                "1 for the backend link's current state, 0 for the others.",
                &sl,
                u64::from(d.state == state),
            );
        }
        if let Some(n) = d.inflight {
            s.gauge_with(
                "inflight",
                "Heads the inflight area marks as in flight.",
                &l,
                n as u64,
            );
        }
        if let Some(n) = d.swap_state_bytes {
            s.gauge_with(
                "swap_state_bytes",
                "Bytes of device state the last swap moved.",
                &l,
                n as u64,
            );
        }
    }
    s
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
        Request::Metrics => {
            let infos: Vec<BackendInfo> = devices.iter().map(|d| d.info()).collect();
            json!({"ok": true, "metrics": metrics(&infos).prometheus("bulkhead_vmm")})
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
    idle: std::time::Duration,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    match serve_requests(&stream, exit, devices) {
        // Silent or not reading for `idle`: closed, nothing to report.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

fn serve_requests(
    stream: &UnixStream,
    exit: &ExitRequest,
    devices: &[Arc<BackendHandle>],
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_REQUEST).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_REQUEST {
            let reply = json!({"ok": false, "error": "request too long"});
            (&*stream).write_all(format!("{reply}\n").as_bytes())?;
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
        let written = (&*stream).write_all(format!("{reply}\n").as_bytes());
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
                if let Err(e) = serve(stream, &exit, &devices, IDLE) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn info(id: &str, virtio_id: u32, state: LinkState) -> BackendInfo {
        BackendInfo {
            id: id.into(),
            virtio_id,
            socket: PathBuf::from("/run/x.sock"),
            state,
            active: true,
            queues: vec![0, 1],
            reconnects: 3,
            swaps: 1,
            inflight: Some(2),
            swap_state_bytes: None,
            last_error: None,
        }
    }

    #[test]
    fn metrics_label_each_device_and_make_the_link_state_a_gauge_per_state() {
        let text = metrics(&[
            info("blk0", VIRTIO_ID_BLOCK, LinkState::Connected),
            info("net\"0", VIRTIO_ID_NET, LinkState::Reconnecting),
        ])
        .prometheus("bulkhead_vmm");
        for want in [
            "# HELP bulkhead_vmm_reconnects_total Times the backend was reconnected after a loss.\n\
             # TYPE bulkhead_vmm_reconnects_total counter\n\
             bulkhead_vmm_reconnects_total{id=\"blk0\",type=\"blk\"} 3\n\
             bulkhead_vmm_reconnects_total{id=\"net\\\"0\",type=\"net\"} 3\n",
            "# TYPE bulkhead_vmm_link_state gauge\n",
            "bulkhead_vmm_link_state{id=\"blk0\",type=\"blk\",state=\"connected\"} 1\n",
            "bulkhead_vmm_link_state{id=\"blk0\",type=\"blk\",state=\"reconnecting\"} 0\n",
            "bulkhead_vmm_link_state{id=\"net\\\"0\",type=\"net\",state=\"reconnecting\"} 1\n",
            "bulkhead_vmm_inflight{id=\"blk0\",type=\"blk\"} 2\n",
            "bulkhead_vmm_queues_enabled{id=\"blk0\",type=\"blk\"} 2\n",
            "# TYPE bulkhead_vmm_swaps_total counter\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Valid text format line by line (the test kit's strict checker).
        let exp = bulkhead_tests::stats::check_exposition(&text, "bulkhead_vmm_").unwrap();
        assert_eq!(
            exp.value(
                "bulkhead_vmm_link_state",
                &[("id", "net\"0"), ("type", "net"), ("state", "reconnecting")]
            ),
            Some(1.0)
        );
        // No device moved state: no swap_state_bytes family at all.
        assert!(!text.contains("swap_state_bytes"));
        // One HELP and one TYPE per family, whatever the number of devices.
        assert_eq!(text.matches("# TYPE bulkhead_vmm_link_state ").count(), 1);
    }

    #[test]
    fn a_silent_client_is_closed_after_the_idle_time_and_a_talking_one_served() {
        let exit = ExitRequest::new().unwrap();
        let (server, client) = UnixStream::pair().unwrap();
        let start = std::time::Instant::now();
        let idle = std::time::Duration::from_millis(200);
        serve(server, &exit, &[], idle).unwrap();
        assert!(start.elapsed() < idle * 10);
        drop(client);

        let (server, client) = UnixStream::pair().unwrap();
        (&client).write_all(b"ping\nmetrics\n").unwrap();
        let t = std::thread::spawn(move || {
            let exit = ExitRequest::new().unwrap();
            serve(server, &exit, &[], idle)
        });
        let mut r = BufReader::new(&client);
        for want in ["pong", ""] {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["ok"], true, "{line}");
            assert!(v["result"] == want || v["metrics"] == want, "{line}");
        }
        // It goes quiet: closed after `idle`, no error.
        t.join().unwrap().unwrap();
    }

    #[test]
    fn the_api_thread_answers_and_times_out_under_its_seccomp_filter() {
        let prog = crate::seccomp::build(
            Thread::Api,
            seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        )
        .unwrap();
        let exit = ExitRequest::new().unwrap();
        let (server, client) = UnixStream::pair().unwrap();
        (&client).write_all(b"metrics\n").unwrap();
        let t = std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            serve(server, &exit, &[], std::time::Duration::from_millis(200))
        });
        let mut line = String::new();
        BufReader::new(&client).read_line(&mut line).unwrap();
        assert_eq!(line, "{\"metrics\":\"\",\"ok\":true}\n");
        // A forbidden call would fail serve (EPERM) instead of closing quietly.
        t.join().unwrap().unwrap();
    }

    #[test]
    fn the_metrics_command_answers_ok_with_the_text_in_json() {
        assert!(matches!(parse("metrics"), Ok(Request::Metrics)));
        assert!(matches!(
            parse(r#"{"cmd":"metrics"}"#),
            Ok(Request::Metrics)
        ));
        let exit = ExitRequest::new().unwrap();
        let reply = handle(Request::Metrics, &exit, &[]);
        assert_eq!(reply["ok"], true);
        // No devices: an empty exposition, still a string.
        assert_eq!(reply["metrics"], "");
        assert!(parse("metric").unwrap_err().contains("metrics"));
    }
}
