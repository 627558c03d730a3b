//! `--user`/`--group` and capabilities: ids resolved while /etc is still
//! reachable, then the bounding, ambient, effective, permitted and
//! inheritable sets emptied.

use std::ffi::CString;
use std::io;

use super::{Sandbox, SandboxArgs, SandboxError, sys};

pub(super) fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Looks `name` up with a reentrant libc call that fills a buffer; numbers pass through.
pub(super) fn resolve_ids(args: &SandboxArgs) -> Result<Option<(u32, u32)>, SandboxError> {
    let user = match &args.user {
        Some(u) => Some(lookup_user(u)?),
        None => None,
    };
    let gid = match &args.group {
        Some(g) => Some(lookup_group(g)?),
        None => user.map(|(_, gid)| gid),
    };
    Ok(match (user, gid) {
        (Some((uid, _)), Some(gid)) => Some((uid, gid)),
        // --group alone: keep the uid.
        // SAFETY: getuid has no preconditions.
        (None, Some(gid)) => Some((unsafe { libc::getuid() }, gid)),
        _ => None,
    })
}

fn lookup_user(name: &str) -> Result<(u32, u32), SandboxError> {
    match passwd_ids(name) {
        Some(ids) => Ok(ids),
        None => match name.parse::<u32>() {
            Ok(uid) => Ok((uid, uid)),
            Err(_) => Err(SandboxError::UnknownId("user", name.to_string())),
        },
    }
}

/// `name`'s (uid, gid) in the user database; None where it has no entry.
/// Public so the launcher asks the same question its backends will.
pub fn passwd_ids(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: a zeroed passwd is a valid out-parameter.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: getpwnam_r writes into `pw` and at most `buf.len()` bytes of `buf`.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        return (rc == 0 && !result.is_null()).then_some((pw.pw_uid, pw.pw_gid));
    }
}

fn lookup_group(name: &str) -> Result<u32, SandboxError> {
    let unknown = || SandboxError::UnknownId("group", name.to_string());
    let cname = CString::new(name).map_err(|_| unknown())?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: a zeroed group is a valid out-parameter.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: getgrnam_r writes into `gr` and at most `buf.len()` bytes of `buf`.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut gr,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc == 0 && !result.is_null() {
            return Ok(gr.gr_gid);
        }
        return name.parse::<u32>().map_err(|_| unknown());
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties the effective, permitted and inheritable capability sets.
fn clear_capabilities() -> io::Result<()> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a header and two data structs (version 3).
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The signal this process gets when its parent dies (`PR_SET_PDEATHSIG`;
/// the launcher asks for SIGKILL), which the kernel clears when the
/// process changes its user or group ids: without arming it again, a
/// daemon that switched to `--user` would outlive a SIGKILLed launcher.
struct ParentDeath {
    signal: libc::c_int,
    parent: libc::pid_t,
}

impl ParentDeath {
    /// The current setting and parent.
    fn get() -> Self {
        let mut signal: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer.
        if unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &raw mut signal) } != 0 {
            signal = 0;
        }
        ParentDeath {
            signal,
            // SAFETY: getppid has no preconditions.
            parent: unsafe { libc::getppid() },
        }
    }

    /// Sets the signal again after an id change; if the parent died in
    /// between (this process was re-parented), sends it now.
    fn rearm(&self) -> Result<(), SandboxError> {
        if self.signal == 0 {
            return Ok(());
        }
        // SAFETY: prctl with integer arguments.
        if unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                self.signal as libc::c_ulong,
                0,
                0,
                0,
            )
        } != 0
        {
            return Err(sys("PR_SET_PDEATHSIG"));
        }
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        if parent != self.parent {
            // SAFETY: raise sends a signal to this thread; no memory is touched.
            unsafe { libc::raise(self.signal) };
        }
        Ok(())
    }
}

pub(super) fn drop_privileges(
    ids: Option<(u32, u32)>,
    last_cap: u32,
    sb: &mut Sandbox,
) -> Result<(), SandboxError> {
    // The bounding set needs CAP_SETPCAP, so it goes first.
    let mut bounding_kept = false;
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINVAL) => break,
                Some(libc::EPERM) => bounding_kept = true,
                _ => return Err(SandboxError::Sys("PR_CAPBSET_DROP", e)),
            }
        }
    }
    if bounding_kept {
        sb.notes
            .push("bounding set kept (no CAP_SETPCAP; no_new_privs still applies)".into());
    }
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(sys("PR_CAP_AMBIENT_CLEAR_ALL"));
    }
    if let Some((uid, gid)) = ids {
        let death = ParentDeath::get();
        // SAFETY: setgroups with an empty list reads nothing.
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return Err(sys("setgroups"));
        }
        // SAFETY: plain id switches.
        if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
            return Err(sys("setresgid"));
        }
        // SAFETY: plain id switch.
        if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
            return Err(sys("setresuid"));
        }
        death.rearm()?;
        sb.uid = Some((uid, gid));
    }
    clear_capabilities().map_err(|e| SandboxError::Sys("capset", e))
}
