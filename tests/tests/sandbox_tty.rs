//! A daemon started by hand in a terminal logs to a tty. Its logger once
//! asked the terminal whether to colour each line (an ioctl), which the
//! default sandbox refuses: the daemon died of SIGSYS at its first line after
//! confinement. Here stderr is a pty, the sandbox is the default, and the
//! daemon must log its way through a frontend's connection and stay up.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::blk::BlkDriver;
use bulkhead_tests::console::ConsoleDriver;
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::Options;
use bulkhead_tests::process::workspace_binary;

/// A pty: (master, slave).
fn pty() -> (File, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the locals; no name, termios or size.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just returned by openpty and are owned here.
    unsafe {
        libc::fcntl(master, libc::F_SETFL, libc::O_NONBLOCK);
        (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave))
    }
}

/// Waits until the daemon wrote `want` to the terminal; panics if it died
/// (with its signal) or never did.
fn await_line(d: &mut Daemon, master: &mut File, seen: &mut String, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        if let Ok(n) = master.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            continue;
        }
        if let Ok(Some(st)) = d.guard_mut().try_wait() {
            panic!(
                "the daemon died ({st}, signal {:?}) logging to a terminal:\n{seen}",
                st.signal()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {want:?} on the terminal:\n{seen}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `cmd` (a daemon for `scratch`) with stderr on a new pty.
fn start_on_tty(name: &str, mut cmd: Command, scratch: Scratch) -> (Daemon, File) {
    let (master, slave) = pty();
    cmd.stderr(Stdio::from(slave));
    let d = Daemon::start(name, cmd, scratch).expect("start the daemon");
    (d, master)
}

#[test]
fn bulkhead_blk_logging_to_a_terminal_survives_its_sandbox() {
    let scratch = Scratch::new(1 << 20).unwrap();
    let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--image")
        .arg(scratch.image());
    let (mut d, mut master) = start_on_tty("bulkhead-blk", cmd, scratch);
    let mut seen = String::new();
    await_line(&mut d, &mut master, &mut seen, "listening on");
    let blk = BlkDriver::connect(d.socket(), &Options::default()).expect("vhost-user bring-up");
    await_line(&mut d, &mut master, &mut seen, "frontend connected");
    drop(blk);
    await_line(&mut d, &mut master, &mut seen, "frontend disconnected");
    assert!(d.still_running_after(Duration::from_millis(200)), "{seen}");
}

#[test]
fn bulkhead_console_logging_to_a_terminal_survives_its_sandbox() {
    let scratch = Scratch::new(0).unwrap();
    let mut cmd = Command::new(workspace_binary("bulkhead-console"));
    cmd.arg("--socket-path").arg(scratch.socket());
    let (mut d, mut master) = start_on_tty("bulkhead-console", cmd, scratch);
    let mut seen = String::new();
    await_line(&mut d, &mut master, &mut seen, "listening on");
    let drv =
        ConsoleDriver::connect(d.socket(), &ConsoleDriver::options()).expect("vhost-user bring-up");
    await_line(&mut d, &mut master, &mut seen, "frontend connected");
    drop(drv);
    await_line(&mut d, &mut master, &mut seen, "frontend disconnected");
    assert!(d.still_running_after(Duration::from_millis(200)), "{seen}");
}
