//! The sandbox of the real `bulkhead-net` and `bulkhead-console` (issue 7,
//! least privilege), as `sandbox.rs` checks it for `bulkhead-blk`: seccomp
//! and `no_new_privs` on every thread, SIGSYS for a forbidden call (only
//! logged under `--sandbox log`), Landlock for paths, an unprivileged uid
//! without capabilities, and every host side still working once confined.
//!
//! Run `cargo build -p bulkhead-net -p bulkhead-console` first. The tests that
//! make a daemon misbehave build its `test-hooks` variant into
//! `target/hooked` themselves (or use `$BULKHEAD_BIN_BULKHEAD_NET_HOOKED`,
//! `$BULKHEAD_BIN_BULKHEAD_CONSOLE_HOOKED`). The net tests need root
//! (namespaces, taps) and say so when skipped; like CI, these tests run as root.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_tests::console::{ConsoleDriver, HostAddr, HostConn, TIMEOUT, ctl_command, read_n};
use bulkhead_tests::frontend::Options;
use bulkhead_tests::net::{NetDriver, NetHdr, arp_request, parse_arp_reply};
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::sandbox::{
    Logged, assert_every_thread_confined, assert_no_capabilities,
    assert_nobody_without_capabilities, assert_seccomp_logged, confined_workers, has_test_hooks,
    hooked_binary, pass_fds, proc_status, threads,
};
use bulkhead_tests::skip::skip_if;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(10);

fn scratch(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    // Readable by `nobody` too, so only the sandbox decides what it may open.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

// ---- bulkhead-net -------------------------------------------------------

const TAP: &str = "bhsbx0";
const HOST_IP: [u8; 4] = [10, 78, 0, 1];
const GUEST_IP: [u8; 4] = [10, 78, 0, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x78];

/// A namespace with tap `TAP`, its queues opened by the test (the unprivileged
/// way: the daemon gets fds), and a scratch directory for the socket.
struct NetEnv {
    fds: Vec<OwnedFd>,
    dir: TempDir,
    // Dropped last: the daemon (declared after the env) is gone by then.
    _ns: NetNs,
}

impl NetEnv {
    /// None (and [`skip`]) where namespaces and taps are unavailable.
    fn new(test: &str, pairs: usize) -> Option<Self> {
        if skip_if(test, netns::unavailable()) {
            return None;
        }
        let ns = NetNs::new().expect("create a network namespace");
        ns.add_tap(TAP, "10.78.0.1/24", pairs > 1)
            .expect("add the tap");
        let fds = ns
            .open_tap_fds(TAP, pairs, pairs > 1)
            .expect("open the tap queues");
        Some(NetEnv {
            fds,
            dir: scratch("bulkhead-sbx-net-"),
            _ns: ns,
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("net.sock")
    }

    /// `bin --socket-path S --tap-fd 10 [--tap-fd 11 ...] ARGS`, the tap fds passed in.
    fn command(&self, bin: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path").arg(self.socket());
        let mut pass = Vec::new();
        for (i, fd) in self.fds.iter().enumerate() {
            let target = 10 + i as i32;
            cmd.arg("--tap-fd").arg(target.to_string());
            pass.push((fd.as_raw_fd(), target));
        }
        pass_fds(&mut cmd, pass);
        cmd.args(args).env("RUST_LOG", "info");
        cmd
    }

    fn start(&self, args: &[&str]) -> Logged {
        let cmd = self.command(&workspace_binary("bulkhead-net"), args);
        Logged::start("bulkhead-net", cmd, &self.socket())
    }

    fn hooked(&self, hook: &str, mode: &str) -> Command {
        let mut cmd = self.command(&hooked_binary("bulkhead-net"), &["--sandbox", mode]);
        cmd.env("BULKHEAD_TEST_HOOK", hook);
        cmd
    }
}

/// Connects (every queue) and checks frames flow both ways: an ARP request
/// sent on each pair is answered by the namespace.
fn net_serves(socket: &Path) -> NetDriver {
    let mut net = NetDriver::connect(socket, &Options::default()).expect("vhost-user bring-up");
    for pair in 0..net.pairs {
        net.post_rx(pair, 32, 2048).unwrap();
    }
    for pair in 0..net.pairs {
        let req = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
        net.send(pair, &NetHdr::default(), &req).expect("send ARP");
        let reply = net
            .recv_matching(WAIT, |p| {
                parse_arp_reply(&p.frame).is_some_and(|(_, ip)| ip == HOST_IP)
            })
            .expect("receive");
        assert!(
            reply.is_some(),
            "no ARP reply for the request on pair {pair}"
        );
    }
    net
}

#[test]
fn net_every_thread_of_a_serving_daemon_has_a_seccomp_filter_and_no_new_privs() {
    let Some(env) = NetEnv::new("net_every_thread", 2) else {
        return;
    };
    let mut d = env.start(&[]);
    // Keep the connection up so every queue thread runs while we look.
    let _net = net_serves(&env.socket());
    let workers = confined_workers(d.pid(), 5);
    assert_eq!(workers.len(), 5, "rx0 tx0 rx1 tx1 ctrl: {workers:?}");
    let names: Vec<String> = threads(d.pid()).into_iter().map(|t| t.1).collect();
    assert!(names.iter().any(|n| n == "stats"), "{names:?}");
    assert_no_capabilities(&proc_status(d.pid()));
    assert!(d.log.text().contains("namespaces [ipc uts net]"));
    assert!(d.is_running());
}

#[test]
fn net_a_forbidden_syscall_kills_the_daemon_with_sigsys() {
    let Some(env) = NetEnv::new("net_a_forbidden_syscall", 1) else {
        return;
    };
    let mut d = Logged::spawn("bulkhead-net", env.hooked("socket-inet", "enforce")).unwrap();
    assert_eq!(d.killed_by(), Some(libc::SIGSYS));
    let text = d.log.text();
    assert!(
        text.contains("test-hook: calling socket(AF_INET)"),
        "{text}"
    );
    assert!(!text.contains("returned an fd"), "{text}");
}

#[test]
fn net_in_log_mode_a_forbidden_syscall_is_logged_and_the_daemon_lives() {
    let Some(env) = NetEnv::new("net_in_log_mode", 1) else {
        return;
    };
    assert_seccomp_logged(libc::SYS_socket, || {
        // A daemon of an earlier attempt left its socket file.
        let _ = std::fs::remove_file(env.socket());
        let cmd = env.hooked("socket-inet", "log");
        let mut d = Logged::start("bulkhead-net", cmd, &env.socket());
        assert!(
            d.log.wait_for("socket(AF_INET) returned an fd", WAIT),
            "{}",
            d.log.text()
        );
        drop(net_serves(&env.socket()));
        assert!(d.is_running());
        d
    });
}

#[test]
fn net_opening_a_file_outside_the_landlock_set_fails_with_eacces() {
    // Log mode lets the openat call through seccomp, so Landlock alone
    // decides; /dev/net/tun too: the daemon can open no other tap.
    for path in ["/etc/passwd", "/dev/net/tun"] {
        let Some(env) = NetEnv::new("net_opening_a_file", 1) else {
            return;
        };
        let cmd = env.hooked(&format!("open:{path}"), "log");
        let mut d = Logged::start("bulkhead-net", cmd, &env.socket());
        let want = format!("test-hook: open {path}: errno {}", libc::EACCES);
        assert!(d.log.wait_for(&want, WAIT), "{}", d.log.text());
        assert!(d.is_running());
    }
}

#[test]
fn net_under_user_nobody_serves_tap_fds_holding_no_capability() {
    let Some(env) = NetEnv::new("net_under_user_nobody", 2) else {
        return;
    };
    let mut d = env.start(&["--user", "nobody"]);
    // Two pairs: attaching the second tap queue (TUNSETQUEUE) needs no privilege either.
    let net = net_serves(&env.socket());
    assert_nobody_without_capabilities(d.pid());
    drop(net);
    // A second frontend: the queue threads stopped (detaching the tap queue) and start again.
    drop(net_serves(&env.socket()));
    assert!(d.is_running(), "{}", d.log.text());
}

#[test]
fn net_with_tap_by_name_holds_no_capability_once_serving() {
    if skip_if(
        "net_with_tap_by_name_holds_no_capability_once_serving",
        netns::unavailable(),
    ) {
        return;
    }
    // The daemon creates the tap in the namespace (CAP_NET_ADMIN at start),
    // then enters its sandbox and drops every capability.
    let ns = NetNs::new().expect("create a network namespace");
    let dir = scratch("bulkhead-sbx-net-");
    let socket = dir.path().join("net.sock");
    let mut cmd = ns.command(workspace_binary("bulkhead-net"));
    cmd.arg("--socket-path").arg(&socket).args(["--tap", TAP]);
    let mut d = Logged::start("bulkhead-net", cmd, &socket);
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", TAP])
        .expect("address the tap");
    ns.ip(&["link", "set", TAP, "up"]).expect("tap up");
    let net = net_serves(&socket);
    assert_every_thread_confined(d.pid());
    assert_no_capabilities(&proc_status(d.pid()));
    drop(net);
    assert!(d.is_running());
    drop(d);
}

// ---- bulkhead-console ---------------------------------------------------

const LOG_PORT: &str = "org.example.log";

/// A console daemon's scratch directory: `vhost.sock`, port 0 at `vhost.sock.console`.
struct ConsoleEnv {
    dir: TempDir,
}

impl ConsoleEnv {
    fn new() -> Self {
        ConsoleEnv {
            dir: scratch("bulkhead-sbx-console-"),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("vhost.sock")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, bin: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path")
            .arg(self.socket())
            .args(args)
            .env("RUST_LOG", "info");
        cmd
    }

    fn start(&self, args: &[&str]) -> Logged {
        let cmd = self.command(&workspace_binary("bulkhead-console"), args);
        Logged::start("bulkhead-console", cmd, &self.socket())
    }

    fn hooked(&self, hook: &str, mode: &str) -> Command {
        let mut cmd = self.command(&hooked_binary("bulkhead-console"), &["--sandbox", mode]);
        cmd.env("BULKHEAD_TEST_HOOK", hook);
        cmd
    }
}

/// Brings the console up as Linux does, with `names` for ports 1.. .
fn console_up(socket: &Path, names: &[Option<&str>]) -> ConsoleDriver {
    let mut drv =
        ConsoleDriver::connect(socket, &ConsoleDriver::options()).expect("vhost-user bring-up");
    drv.linux_bring_up(names).expect("Linux bring-up");
    drv
}

/// A client attaches to port 0's socket and bytes flow both ways; the
/// control socket answers too.
fn console_serves(env: &ConsoleEnv, drv: &mut ConsoleDriver) {
    let mut c: Box<dyn HostConn> = HostAddr::Unix(env.path("vhost.sock.console"))
        .connect()
        .expect("host client");
    drv.write(0, b"out of the guest", 64).unwrap();
    assert_eq!(
        read_n(c.as_mut(), 16, TIMEOUT).unwrap(),
        b"out of the guest"
    );
    c.write_all(b"typed").unwrap();
    assert_eq!(drv.read(0, 5, TIMEOUT).unwrap(), b"typed");
    let reply = ctl_command(&env.path("vhost.sock.console.ctl"), "resize 100 30").unwrap();
    assert_eq!(reply.trim(), "ok");
    let reply = ctl_command(&env.path("vhost.sock.console.ctl"), "stats").unwrap();
    let stats: serde_json::Value = serde_json::from_str(&reply).expect("stats JSON");
    assert!(stats["attaches"].as_u64() >= Some(1), "{stats}");
}

#[test]
fn console_every_thread_of_a_serving_daemon_has_a_seccomp_filter_and_no_new_privs() {
    let env = ConsoleEnv::new();
    let mut d = env.start(&["--port", &format!("name={LOG_PORT}")]);
    let mut drv = console_up(&env.socket(), &[None, Some(LOG_PORT)]);
    console_serves(&env, &mut drv);
    // One thread per port (its receive and transmit queue) and one for the
    // control queues.
    let workers = confined_workers(d.pid(), 3);
    assert_eq!(
        workers.len(),
        3,
        "two ports and the control queues: {workers:?}"
    );
    assert_no_capabilities(&proc_status(d.pid()));
    assert!(d.log.text().contains("namespaces [ipc uts net]"));
    assert!(d.is_running());
}

#[test]
fn console_a_forbidden_syscall_kills_the_daemon_with_sigsys() {
    let env = ConsoleEnv::new();
    let mut d = Logged::spawn("bulkhead-console", env.hooked("socket-inet", "enforce")).unwrap();
    assert_eq!(d.killed_by(), Some(libc::SIGSYS));
    let text = d.log.text();
    assert!(
        text.contains("test-hook: calling socket(AF_INET)"),
        "{text}"
    );
    assert!(!text.contains("returned an fd"), "{text}");
}

#[test]
fn console_in_log_mode_a_forbidden_syscall_is_logged_and_the_daemon_lives() {
    let env = ConsoleEnv::new();
    assert_seccomp_logged(libc::SYS_socket, || {
        // A daemon of an earlier attempt left its socket file.
        let _ = std::fs::remove_file(env.socket());
        let cmd = env.hooked("socket-inet", "log");
        let mut d = Logged::start("bulkhead-console", cmd, &env.socket());
        assert!(
            d.log.wait_for("socket(AF_INET) returned an fd", WAIT),
            "{}",
            d.log.text()
        );
        let mut drv = console_up(&env.socket(), &[None]);
        console_serves(&env, &mut drv);
        assert!(d.is_running());
        d
    });
}

#[test]
fn console_opening_a_file_outside_the_landlock_set_fails_with_eacces() {
    // Log mode lets the openat call through seccomp, so Landlock alone
    // decides: no file beside its own sockets, and no new pty.
    let env = ConsoleEnv::new();
    let beside = env.path("beside-the-socket");
    std::fs::write(&beside, b"x").unwrap();
    let beside = beside.display().to_string();
    for path in ["/etc/passwd", "/dev/ptmx", beside.as_str()] {
        let env = ConsoleEnv::new();
        let cmd = env.hooked(&format!("open:{path}"), "log");
        let mut d = Logged::start("bulkhead-console", cmd, &env.socket());
        let want = format!("test-hook: open {path}: errno {}", libc::EACCES);
        assert!(d.log.wait_for(&want, WAIT), "{}", d.log.text());
        assert!(d.is_running());
    }
}

#[test]
fn console_under_user_nobody_serves_socket_clients_holding_no_capability() {
    let env = ConsoleEnv::new();
    let mut d = env.start(&["--user", "nobody"]);
    let mut drv = console_up(&env.socket(), &[None]);
    console_serves(&env, &mut drv);
    assert_nobody_without_capabilities(d.pid());
    drop(drv);
    // A new frontend and a new client after the first went away.
    let mut drv = console_up(&env.socket(), &[None]);
    console_serves(&env, &mut drv);
    assert!(d.is_running(), "{}", d.log.text());
}

/// Reads `n` bytes from a nonblocking fd, waiting up to `timeout`.
fn read_fd(f: &mut File, n: usize, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < n && Instant::now() < deadline {
        match f.read(&mut buf[..n - out.len()]) {
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("read: {e}"),
        }
    }
    out
}

#[test]
fn console_pty_and_file_ports_work_inside_the_sandbox() {
    let env = ConsoleEnv::new();
    let log = env.path("guest.log");
    let mut d = env.start(&[
        "--console",
        "pty",
        "--port",
        &format!("name={LOG_PORT},file={}", log.display()),
    ]);
    // The pty's path was written before the daemon confined itself.
    let pty = std::fs::read_to_string(env.path("vhost.sock.console.pty")).expect("pty path file");
    let mut user = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(pty.trim())
        .expect("open the pty");
    let mut drv = console_up(&env.socket(), &[None, Some(LOG_PORT)]);
    drv.write(0, b"to the pty", 64).unwrap();
    assert_eq!(read_fd(&mut user, 10, TIMEOUT), b"to the pty");
    user.write_all(b"from the pty").unwrap();
    assert_eq!(drv.read(0, 12, TIMEOUT).unwrap(), b"from the pty");
    drv.write(1, b"a log line\n", 64).unwrap();
    drv.flush(1, TIMEOUT).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while std::fs::read(&log).unwrap_or_default() != b"a log line\n" {
        assert!(Instant::now() < deadline, "the file port got no output");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The pty's size is polled every 250 ms from inside the sandbox.
    std::thread::sleep(Duration::from_millis(600));
    assert!(d.is_running(), "{}", d.log.text());
    assert_every_thread_confined(d.pid());
}

#[test]
fn the_normal_net_and_console_binaries_carry_no_test_hooks() {
    for name in ["bulkhead-net", "bulkhead-console"] {
        assert!(
            !has_test_hooks(&workspace_binary(name)),
            "the normal {name} was built with the test-hooks feature"
        );
    }
}

#[test]
fn help_and_manual_of_every_daemon_agree_on_the_sandbox_flags() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    for (bin, page) in [
        ("bulkhead-blk", "blk.md"),
        ("bulkhead-net", "net.md"),
        ("bulkhead-console", "console.md"),
    ] {
        let help = Command::new(workspace_binary(bin))
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("{bin} --help: {e}"));
        let help = String::from_utf8_lossy(&help.stdout);
        let manual = std::fs::read_to_string(docs.join(page)).unwrap();
        for flag in [
            "--sandbox",
            "--user",
            "--group",
            "enforce",
            "[default: enforce]",
        ] {
            assert!(help.contains(flag), "{bin} --help lacks {flag}");
            let flag = flag.trim_start_matches("[default: ").trim_end_matches(']');
            assert!(manual.contains(flag), "docs/{page} lacks {flag}");
        }
        assert!(
            manual.contains("## Sandbox"),
            "docs/{page} has no Sandbox section"
        );
    }
}
