//! Host-side plumbing: nonblocking fds, terminal size and raw mode, the
//! size-poll timer, the unix sockets and the pty.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

pub(super) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl flag calls on an fd we hold.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A nonblocking write (send without SIGPIPE for sockets).
pub(super) fn write_nb(fd: RawFd, data: &[u8], socket: bool) -> io::Result<usize> {
    loop {
        // SAFETY: writing from a live buffer of the given length to an fd we hold.
        let n = unsafe {
            if socket {
                libc::send(
                    fd,
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            } else {
                libc::write(fd, data.as_ptr().cast(), data.len())
            }
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The terminal size of `fd` as (cols, rows), if it is a terminal with a size.
pub(super) fn winsize(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize struct.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above; ws outlives the call.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } < 0 {
        return None;
    }
    (ws.ws_col != 0 && ws.ws_row != 0).then_some((ws.ws_col, ws.ws_row))
}

pub(super) fn make_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios calls on a terminal fd we hold, with a zeroed struct filled by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(fd, libc::TCSANOW, &t) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub(super) fn timer(ms: i64) -> io::Result<OwnedFd> {
    // SAFETY: creating a timerfd; checked below.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let ts = libc::timespec {
        tv_sec: ms / 1000,
        tv_nsec: (ms % 1000) * 1_000_000,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: arming our timerfd with a valid itimerspec.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

pub(super) fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Path of the resize-control socket beside a port's socket.
pub fn ctl_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// Opens a new pty: (master, slave, slave path). The slave is put in raw mode.
pub(super) fn open_pty() -> io::Result<(File, File, PathBuf)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: m is a fresh fd we own.
    let master = unsafe { File::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt/ptsname_r on our master, into a buffer of the given size.
    unsafe {
        if libc::grantpt(m) < 0
            || libc::unlockpt(m) < 0
            || libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into name.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let path = PathBuf::from(path.to_string_lossy().into_owned());
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&path)?;
    make_raw(slave.as_raw_fd())?;
    set_nonblocking(m)?;
    Ok((master, slave, path))
}

/// Terminal settings of stdin to restore at exit, when the stdio port put it in raw mode.
pub struct StdinRestore(pub(super) libc::termios);

impl StdinRestore {
    /// Restores stdin's terminal settings.
    pub fn restore(&self) {
        // SAFETY: restoring settings read earlier from the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}
