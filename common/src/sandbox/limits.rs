//! Resource limits: no core files, at most the policy's fds, and no file
//! larger than the inflight area for a daemon that writes no files.

use std::io;

use super::{Policy, Sandbox, SandboxError, sys};

fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads one rlimit struct.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True if fd `fd` is a regular file (stdout/stderr redirected to a log file).
fn is_regular_file(fd: libc::c_int) -> bool {
    // SAFETY: stat is plain integers; all zeroes is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat struct.
    (unsafe { libc::fstat(fd, &mut st) } == 0) && (st.st_mode & libc::S_IFMT) == libc::S_IFREG
}

pub(super) fn set_rlimits(policy: &Policy, sb: &mut Sandbox) -> Result<(), SandboxError> {
    setrlimit(libc::RLIMIT_CORE, 0).map_err(|e| SandboxError::Sys("RLIMIT_CORE", e))?;
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return Err(sys("RLIMIT_NOFILE"));
    }
    let nofile = policy.max_open_files.min(cur.rlim_max);
    setrlimit(libc::RLIMIT_NOFILE, nofile).map_err(|e| SandboxError::Sys("RLIMIT_NOFILE", e))?;
    if !policy.writes_files {
        // A log redirected to a file is written through stdout/stderr; the
        // limit would kill the daemon with SIGXFSZ there.
        if is_regular_file(1) || is_regular_file(2) {
            sb.notes
                .push("RLIMIT_FSIZE not set (stdout or stderr is a file)".into());
        } else {
            setrlimit(libc::RLIMIT_FSIZE, policy.memfd_bytes)
                .map_err(|e| SandboxError::Sys("RLIMIT_FSIZE", e))?;
        }
    }
    Ok(())
}
