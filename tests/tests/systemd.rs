//! The daemons under a supervisor's conventions: socket activation
//! (`LISTEN_FDS`, as systemd passes a `.socket` unit's listener) and
//! readiness (`READY=1` to `NOTIFY_SOCKET` once frontends may come,
//! `STOPPING=1` at SIGTERM), for every daemon; and the same through systemd's
//! own `systemd-socket-activate`.
//!
//! Run `cargo build --workspace --bins` first.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::process::{pass_fds, workspace_binary};
use bulkhead_tests::skip::{SkipReason, skip};
use vhost::VhostBackend;
use vhost::vhost_user::Frontend;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Ends the daemon (by pid) when the test ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next datagram on `sup`, or None after `TIMEOUT`.
fn next_state(sup: &UnixDatagram) -> Option<String> {
    sup.set_read_timeout(Some(TIMEOUT)).ok()?;
    let mut buf = [0u8; 256];
    let n = sup.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A daemon's own arguments beyond the socket, for a quick start (a console
/// its console socket, blk an image; net would need a tap).
fn daemon_args(name: &str, dir: &Path) -> Vec<String> {
    match name {
        "bulkhead-console" => vec![
            "--console".into(),
            format!("socket={}", dir.join("console.sock").display()),
        ],
        "bulkhead-blk" => {
            let img = dir.join("disk.img");
            std::fs::File::create(&img)
                .and_then(|f| f.set_len(1 << 20))
                .expect("image");
            vec!["--image".into(), img.display().to_string()]
        }
        _ => Vec::new(),
    }
}

/// GET_FEATURES answered on a fresh connection to `path`.
fn frontend_is_served(path: &Path) -> bool {
    let Ok(fe) = Frontend::connect(path, 1) else {
        return false;
    };
    fe.set_owner().is_ok() && fe.get_features().is_ok()
}

/// Starts `name` as systemd would for a `.socket` unit: the listener as fd 3,
/// `LISTEN_PID` its own pid (a shell sets it, then execs the daemon),
/// `LISTEN_FDS=1`, and `NOTIFY_SOCKET`. No `--socket-path`, no `--fd`.
#[test]
fn every_daemon_serves_a_socket_activated_listener_and_says_ready_first() {
    for name in ["bulkhead-console", "bulkhead-blk"] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let notify = dir.path().join("notify");
        let sup = UnixDatagram::bind(&notify).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(workspace_binary(name))
            .args(daemon_args(name, dir.path()))
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "vhost")
            .env("NOTIFY_SOCKET", &notify)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        pass_fds(&mut cmd, vec![(listener.as_raw_fd(), 3)]);
        let mut daemon = Guard(cmd.spawn().expect("start the daemon"));
        drop(listener);
        // READY=1 comes before any frontend has connected.
        let ready = next_state(&sup);
        assert_eq!(ready.as_deref(), Some("READY=1"), "{name}");
        assert!(frontend_is_served(&sock), "{name} serves on fd 3");
        // SIGTERM: STOPPING=1, then a clean exit.
        // SAFETY: kill(2) on our child's pid.
        let rc = unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        assert_eq!(next_state(&sup).as_deref(), Some("STOPPING=1"), "{name}");
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = daemon.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "{name} did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "{name}");
    }
}

/// systemd's own tool: it listens, starts the daemon at the first
/// connection with `LISTEN_FDS`, and the daemon serves that connection.
#[test]
fn systemd_socket_activate_starts_a_daemon_that_serves_the_first_frontend() {
    let Ok(tool) = which("systemd-socket-activate") else {
        skip(
            "systemd_socket_activate_starts_a_daemon_that_serves_the_first_frontend",
            SkipReason::NotInstalled("systemd-socket-activate (Debian: systemd)".into()),
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost.sock");
    let notify = dir.path().join("notify");
    let sup = UnixDatagram::bind(&notify).unwrap();
    let _tool = Guard(
        Command::new(tool)
            .arg("-l")
            .arg(&sock)
            .arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify.display()))
            .arg("-E")
            .arg("RUST_LOG=info")
            .arg(workspace_binary("bulkhead-console"))
            .args(daemon_args("bulkhead-console", dir.path()))
            .stdin(Stdio::null())
            .spawn()
            .expect("start systemd-socket-activate"),
    );
    let deadline = Instant::now() + TIMEOUT;
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "no listener at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon, which then serves it.
    assert!(frontend_is_served(&sock));
    assert_eq!(next_state(&sup).as_deref(), Some("READY=1"));
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}
