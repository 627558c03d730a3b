//! The two systemd conventions a supervised daemon follows, without linking
//! libsystemd:
//!
//! - **Socket activation** (`sd_listen_fds(3)`): when `LISTEN_PID` is this
//!   process and `LISTEN_FDS` is 1, fd 3 is the listening socket the
//!   supervisor made; a daemon given neither `--socket-path` nor `--fd`
//!   serves on it.
//! - **Readiness** (`sd_notify(3)`): when `NOTIFY_SOCKET` names a datagram
//!   socket, the daemon sends `READY=1` once it accepts frontends and
//!   `STOPPING=1` when it shuts down. The socket is connected before the
//!   sandbox (which forbids `socket` and `connect`); the messages are plain
//!   writes on it.
//!
//! Both variables are removed from the environment once read, so nothing
//! the daemon starts inherits them.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The first fd a supervisor passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The socket-activated listening fd, if this process was given exactly one.
///
/// Reads and clears `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`. More
/// than one fd is refused (the daemon serves one socket); a `LISTEN_PID`
/// of another process (a variable inherited by mistake) is ignored.
pub fn listen_fd() -> Result<Option<RawFd>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    // SAFETY: the daemon is still single-threaded when it reads its
    // environment (the scaffold calls this before any thread exists).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    match fds.trim().parse::<u32>() {
        Ok(0) => Ok(None),
        Ok(1) => Ok(Some(LISTEN_FDS_START)),
        Ok(n) => Err(format!(
            "socket activation passed {n} fds (LISTEN_FDS); this daemon serves one socket"
        )),
        Err(_) => Err(format!("LISTEN_FDS={fds:?} is not a number")),
    }
}

/// A connection to the supervisor's notification socket.
pub struct Notifier(UnixDatagram);

impl Notifier {
    /// Connects to `NOTIFY_SOCKET` (a path, or `@name` for an abstract
    /// socket) and clears the variable; None without one.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        // SAFETY: single-threaded, as in `listen_fd`.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let target = target.to_string_lossy().into_owned();
        let sock = UnixDatagram::unbound()?;
        let addr = match target.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(&target)?,
        };
        sock.connect_addr(&addr)?;
        Ok(Some(Notifier(sock)))
    }

    /// Sends one state line (`READY=1`, `STOPPING=1`, `STATUS=...`).
    pub fn send(&self, state: &str) -> io::Result<()> {
        // write(2), not send(2): the sandbox's base list has it.
        let fd = self.0.as_raw_fd();
        // SAFETY: writing a local buffer of its length to an fd we own.
        let n = unsafe { libc::write(fd, state.as_ptr().cast(), state.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reaches_the_supervisors_socket() {
        let name = format!("bulkhead-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sup = UnixDatagram::bind_addr(&addr).unwrap();
        let sock = UnixDatagram::unbound().unwrap();
        sock.connect_addr(&addr).unwrap();
        let n = Notifier(sock);
        n.send("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let got = sup.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"READY=1");
    }
}
