//! Per-thread seccomp filters, keyed by [`Thread`]: each thread may make only
//! the system calls its job needs. Applied by each thread to itself once
//! setup is done (guest RAM mapped, devices connected, files open).
//! `--seccomp log` logs violations instead of killing the process.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// What a violation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the process (the default).
    Kill,
    /// Let the call through and log it (kernel audit log).
    Log,
    /// No filter.
    Off,
}

/// The threads with their own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    /// A vCPU: KVM_RUN, device emulation, vhost-user messages at DRIVER_OK/reset.
    Vcpu,
    /// The main thread: waits for the exit request, forwards console input.
    Main,
    /// The control socket thread: also connects to a new backend for a swap.
    Api,
    /// A device's backend monitor: watches the socket, reconnects and replays.
    Monitor,
}

/// Errors while building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler rejected the filter.
    #[error("Cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// The filter could not be compiled or installed.
    #[error("Cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

fn common_syscalls() -> Vec<i64> {
    vec![
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_sched_yield,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_fcntl,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_getrandom,
    ]
}

/// What connecting to a backend and replaying onto it needs (no ioctl: the
/// eventfds handed over are already registered with KVM).
fn backend_link_syscalls() -> [i64; 10] {
    [
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_dup,
        libc::SYS_pread64,
    ]
}

fn syscalls(thread: Thread) -> Vec<i64> {
    let mut v = common_syscalls();
    match thread {
        Thread::Vcpu => v.extend([
            libc::SYS_ioctl,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_dup,
            libc::SYS_tgkill,
        ]),
        Thread::Main => v.extend([
            libc::SYS_ioctl,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_tgkill,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
        ]),
        Thread::Api => {
            v.extend([
                libc::SYS_accept4,
                libc::SYS_accept,
                libc::SYS_shutdown,
                libc::SYS_unlink,
                // A swap moves device state through a pipe.
                libc::SYS_pipe2,
            ]);
            v.extend(backend_link_syscalls());
        }
        Thread::Monitor => v.extend(backend_link_syscalls()),
    }
    v
}

/// The compiled filter for `thread`, or `None` when `mode` is `Off`.
pub fn filter(thread: Thread, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(None),
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls(thread).into_iter().map(|s| (s, vec![])).collect();
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    let prog: BpfProgram = f
        .try_into()
        .map_err(|e| SeccompError::Install(seccompiler::Error::Backend(e)))?;
    Ok(Some(prog))
}

/// Installs `thread`'s filter on the calling thread.
pub fn apply(thread: Thread, mode: SeccompMode) -> Result<(), SeccompError> {
    if let Some(prog) = filter(thread, mode)? {
        seccompiler::apply_filter(&prog).map_err(SeccompError::Install)?;
    }
    Ok(())
}
