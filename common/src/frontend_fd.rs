//! Fds a frontend sends are input too: each is checked for what its message
//! says it is before the daemon keeps it.
//!
//! - Kick, call and err fds must be eventfds. A pipe, a socket or a regular
//!   file there would block a queue thread once full, or kill the daemon on
//!   the first interrupt (`SIGXFSZ` past `RLIMIT_FSIZE` 0). Every eventfd
//!   shares one anonymous inode, so the check asks the kernel for the file's
//!   name: `/proc/self/fd/N` reads `anon_inode:[eventfd]` for an eventfd and
//!   nothing else (a path never starts with `anon_inode:`). The daemon opens
//!   `/proc/self/fd` before it enters its sandbox, whose main-thread filter
//!   then allows `readlinkat` on that directory fd only.
//! - Each accepted eventfd is made non-blocking and close-on-exec. The
//!   non-blocking flag lives in the open file description, which the
//!   frontend's copy shares; QEMU, Cloud Hypervisor, crosvm, DPDK and
//!   libblkio create theirs non-blocking anyway. A write to a call eventfd
//!   whose counter is full then fails with `EAGAIN`: the guest has an
//!   interrupt pending already, nothing is lost.
//! - Memory regions and the inflight area must be regular files (memfd,
//!   tmpfs, hugetlbfs), the only files whose size the daemon can check
//!   before it maps them.
//! - The device-state fd (SET_DEVICE_STATE_FD) must be a pipe or a socket:
//!   a stream with an end of file that the frontend controls. It is made
//!   non-blocking and close-on-exec, and moved with a deadline
//!   ([`crate::transfer`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;

use vmm_sys_util::eventfd::EventFd;

/// The kernel's name of every eventfd (`/proc/self/fd/N`).
const EVENTFD_NAME: &[u8] = b"anon_inode:[eventfd]";

/// Why a frontend's fd was refused.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// The fd is something else than an eventfd.
    #[error("the {0} fd is {1}, not an eventfd")]
    NotEventfd(&'static str, String),
    /// The fd is something else than a regular file.
    #[error("the {0} fd is {1}, not a regular file (memfd, tmpfs or hugetlbfs)")]
    NotRegularFile(&'static str, String),
    /// The fd is something else than a pipe or a socket.
    #[error("the {0} fd is {1}, not a pipe or a socket")]
    NotStream(&'static str, String),
    /// The fd could not be inspected or its flags set.
    #[error("cannot inspect the {0} fd")]
    Inspect(&'static str, #[source] io::Error),
}

static PROC_FD_DIR: OnceLock<Option<File>> = OnceLock::new();

/// Opens `/proc/self/fd` (once per process). Call it before the sandbox
/// hides the filesystem; [`crate::sandbox::Sandbox::enter`] does.
pub fn init() {
    PROC_FD_DIR.get_or_init(|| {
        match File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open("/proc/self/fd")
        {
            Ok(f) => Some(f),
            Err(e) => {
                log::warn!(
                    "cannot open /proc/self/fd ({e}): kick, call and err fds are only \
                     checked to be anonymous inodes, not eventfds"
                );
                None
            }
        }
    });
}

/// The `/proc/self/fd` directory fd [`init`] opened, if it could.
pub fn proc_fd_dir() -> Option<RawFd> {
    init();
    PROC_FD_DIR.get()?.as_ref().map(|f| f.as_raw_fd())
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: a zeroed stat is a valid out-parameter; fstat writes one.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on an fd the caller holds.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The kernel's name of `fd`, from `/proc/self/fd`; None without that directory.
fn kernel_name(fd: RawFd) -> io::Result<Option<Vec<u8>>> {
    let Some(dir) = proc_fd_dir() else {
        return Ok(None);
    };
    let name = std::ffi::CString::new(fd.to_string()).map_err(io::Error::other)?;
    let mut buf = [0u8; 256];
    // SAFETY: readlinkat writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    Ok(Some(buf[..n.min(buf.len())].to_vec()))
}

/// What `fd` is, in words, for an error message (no path).
fn describe(st: &libc::stat, name: Option<&[u8]>) -> String {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file".into(),
        libc::S_IFDIR => "a directory".into(),
        libc::S_IFCHR => "a character device".into(),
        libc::S_IFBLK => "a block device".into(),
        libc::S_IFIFO => "a pipe".into(),
        libc::S_IFSOCK => "a socket".into(),
        libc::S_IFLNK => "a symbolic link".into(),
        _ => match name {
            Some(n) if n.starts_with(b"anon_inode:") => {
                format!("an {}", String::from_utf8_lossy(n))
            }
            _ => "an anonymous inode".into(),
        },
    }
}

fn set_flags(fd: RawFd, role: &'static str) -> Result<(), FdError> {
    // SAFETY: fcntl with integer arguments on an fd we hold.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(FdError::Inspect(role, io::Error::last_os_error()));
    }
    if fl & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        let r = unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) };
        if r != 0 {
            return Err(FdError::Inspect(role, io::Error::last_os_error()));
        }
    }
    set_cloexec(fd, role)
}

fn set_cloexec(fd: RawFd, role: &'static str) -> Result<(), FdError> {
    // SAFETY: fcntl with integer arguments on an fd we hold.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(FdError::Inspect(role, io::Error::last_os_error()));
    }
    Ok(())
}

/// Takes `file` as the `role` eventfd (kick, call, err): refused unless it
/// is one; made non-blocking and close-on-exec.
pub fn eventfd(file: File, role: &'static str) -> Result<EventFd, FdError> {
    let fd = file.as_raw_fd();
    let st = fstat(fd).map_err(|e| FdError::Inspect(role, e))?;
    let name = kernel_name(fd).map_err(|e| FdError::Inspect(role, e))?;
    // Anonymous inodes have no file type bits; with /proc the name says
    // which kind, without it any anonymous inode passes (none can block:
    // the fd is non-blocking from here on).
    let anonymous = st.st_mode & libc::S_IFMT == 0;
    let is_eventfd = anonymous && name.as_deref().is_none_or(|n| n == EVENTFD_NAME);
    if !is_eventfd {
        return Err(FdError::NotEventfd(role, describe(&st, name.as_deref())));
    }
    set_flags(fd, role)?;
    // SAFETY: `file` owned this fd; the EventFd owns it from here on.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

/// Checks that `file`, sent as `role` (a memory region, the inflight
/// area), is a regular file, and makes it close-on-exec.
pub fn regular_file(file: &File, role: &'static str) -> Result<(), FdError> {
    let fd = file.as_raw_fd();
    let st = fstat(fd).map_err(|e| FdError::Inspect(role, e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        let name = kernel_name(fd).ok().flatten();
        return Err(FdError::NotRegularFile(
            role,
            describe(&st, name.as_deref()),
        ));
    }
    set_cloexec(fd, role)
}

/// Checks that `file`, sent as `role` (the device-state fd), is a pipe or a
/// socket, and makes it close-on-exec.
pub fn stream(file: &File, role: &'static str) -> Result<(), FdError> {
    let fd = file.as_raw_fd();
    let st = fstat(fd).map_err(|e| FdError::Inspect(role, e))?;
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFIFO && kind != libc::S_IFSOCK {
        let name = kernel_name(fd).ok().flatten();
        return Err(FdError::NotStream(role, describe(&st, name.as_deref())));
    }
    set_cloexec(fd, role)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    fn flags(fd: RawFd) -> (i32, i32) {
        // SAFETY: fcntl with integer arguments on a valid fd.
        unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds are fresh and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_blocking_eventfd_is_accepted_and_made_non_blocking_and_close_on_exec() {
        let e = EventFd::new(0).unwrap();
        // SAFETY: dup of a valid fd; the File owns the copy.
        let f = unsafe { File::from_raw_fd(libc::dup(e.as_raw_fd())) };
        assert_eq!(flags(f.as_raw_fd()).0 & libc::O_NONBLOCK, 0);
        let got = eventfd(f, "call").unwrap();
        let (fl, fd_flags) = flags(got.as_raw_fd());
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        // A saturated counter now answers EAGAIN instead of blocking.
        e.write(u64::MAX - 1).unwrap();
        let err = got.write(1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn everything_but_an_eventfd_is_refused_as_kick_call_or_err() {
        let dir = tempfile_dir();
        let file = File::create(dir.join("f")).unwrap();
        let (r, w) = pipe();
        let (s, _peer) = UnixStream::pair().unwrap();
        let null = File::options().write(true).open("/dev/null").unwrap();
        // SAFETY: timerfd_create returns a fresh fd or -1.
        let timer = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, 0) };
        assert!(timer >= 0);
        // SAFETY: timer is fresh and owned by nobody else.
        let timer = unsafe { File::from_raw_fd(timer) };
        let cases: Vec<(&str, File, &str)> = vec![
            ("regular file", file, "a regular file"),
            ("pipe read end", File::from(r), "a pipe"),
            ("pipe write end", File::from(w), "a pipe"),
            ("socket", File::from(OwnedFd::from(s)), "a socket"),
            ("/dev/null", null, "a character device"),
            ("timerfd", timer, "an anon_inode:[timerfd]"),
        ];
        for (what, f, says) in cases {
            let err = eventfd(f, "kick").unwrap_err();
            assert!(
                matches!(&err, FdError::NotEventfd("kick", d) if d == says),
                "{what}: {err}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_regular_files_are_accepted_as_memory() {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let m = unsafe { libc::memfd_create(c"t".as_ptr(), 0) };
        assert!(m >= 0);
        // SAFETY: m is fresh and owned by nobody else.
        let m = unsafe { File::from_raw_fd(m) };
        regular_file(&m, "memory region").unwrap();
        assert_ne!(flags(m.as_raw_fd()).1 & libc::FD_CLOEXEC, 0);
        let e = EventFd::new(0).unwrap();
        // SAFETY: dup of a valid fd; the File owns the copy.
        let f = unsafe { File::from_raw_fd(libc::dup(e.as_raw_fd())) };
        let err = regular_file(&f, "memory region").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the memory region fd is an anon_inode:[eventfd], not a regular file \
             (memfd, tmpfs or hugetlbfs)"
        );
    }

    #[test]
    fn only_pipes_and_sockets_carry_device_state() {
        let (r, w) = pipe();
        stream(&File::from(r), "device state").unwrap();
        stream(&File::from(w), "device state").unwrap();
        let (s, _peer) = UnixStream::pair().unwrap();
        stream(&File::from(OwnedFd::from(s)), "device state").unwrap();
        // SAFETY: memfd_create with a static NUL-terminated name.
        let m = unsafe { libc::memfd_create(c"t".as_ptr(), 0) };
        assert!(m >= 0);
        // SAFETY: m is fresh and owned by nobody else.
        let m = unsafe { File::from_raw_fd(m) };
        let err = stream(&m, "device state").unwrap_err();
        assert!(
            matches!(err, FdError::NotStream(_, ref d) if d == "a regular file"),
            "{err}"
        );
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "bulkhead-frontend-fd-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
