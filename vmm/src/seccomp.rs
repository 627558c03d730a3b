//! Per-thread seccomp filters, keyed by [`Thread`]: each thread may make only
//! the system calls its job needs. Applied by each thread to itself once
//! setup is done (guest RAM mapped, devices connected, files open).
//! `--seccomp log` logs violations instead of killing the process.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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

/// One allowed system call: any arguments, or only those its rules match.
struct Allow {
    nr: i64,
    rules: Vec<SeccompRule>,
}

fn any(nr: i64) -> Allow {
    Allow {
        nr,
        rules: Vec::new(),
    }
}

/// A rule on one 32-bit argument.
#[expect(
    clippy::expect_used,
    reason = "callers pass constant argument indexes below 6 and one condition"
)]
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> SeccompRule {
    let c = SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
        .expect("argument index below 6");
    SeccompRule::new(vec![c]).expect("one condition")
}

/// `ioctl` with one of `requests` only.
fn ioctls(requests: &[u64]) -> Allow {
    Allow {
        nr: libc::SYS_ioctl,
        rules: requests
            .iter()
            .map(|&r| arg(1, SeccompCmpOp::Eq, r & 0xffff_ffff))
            .collect(),
    }
}

/// Linux's ioctl request number (`_IOC`).
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// The KVM ioctls a running vCPU thread makes: KVM_RUN; the registers for
/// the log when the vCPU fails; and, while it emulates a device register,
/// the irqfd, ioeventfd and MSI routes a driver's set-up changes.
pub const VCPU_IOCTLS: [u64; 6] = [
    ioc(IOC_NONE, 0x80, 0),                                           // KVM_RUN
    ioc(IOC_READ, 0x81, size_of::<kvm_bindings::kvm_regs>()),         // KVM_GET_REGS
    ioc(IOC_READ, 0x83, size_of::<kvm_bindings::kvm_sregs>()),        // KVM_GET_SREGS
    ioc(IOC_WRITE, 0x76, size_of::<kvm_bindings::kvm_irqfd>()),       // KVM_IRQFD
    ioc(IOC_WRITE, 0x79, size_of::<kvm_bindings::kvm_ioeventfd>()),   // KVM_IOEVENTFD
    ioc(IOC_WRITE, 0x6a, size_of::<kvm_bindings::kvm_irq_routing>()), // KVM_SET_GSI_ROUTING
];

/// `tgkill` to a thread of this process only (`pthread_kill`, `abort`).
fn tgkill_own() -> Allow {
    Allow {
        nr: libc::SYS_tgkill,
        rules: vec![arg(0, SeccompCmpOp::Eq, std::process::id().into())],
    }
}

/// `mmap` without PROT_EXEC: no thread maps code once the VMM runs.
fn mmap_no_exec() -> Allow {
    Allow {
        nr: libc::SYS_mmap,
        rules: vec![arg(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)],
    }
}

fn common_syscalls() -> Vec<Allow> {
    let mut v: Vec<Allow> = [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_futex,
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
        libc::SYS_fcntl,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_getrandom,
    ]
    .into_iter()
    .map(any)
    .collect();
    v.push(mmap_no_exec());
    v
}

/// Waiting on an event loop made before (`Connection::hung_up`, the main
/// thread's wait for the exit request).
const EPOLL_WAIT: [i64; 2] = [libc::SYS_epoll_wait, libc::SYS_epoll_pwait];

/// What connecting to a backend and replaying onto it needs (no ioctl: the
/// eventfds handed over are already registered with KVM): a new
/// connection's own event loop (`epoll_create1`, `epoll_ctl`), the device
/// state transfer's waits, the monitor's watch of the socket.
fn backend_link_syscalls() -> [i64; 14] {
    [
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
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

fn syscalls(thread: Thread) -> Vec<Allow> {
    let mut v = common_syscalls();
    match thread {
        Thread::Vcpu => {
            v.push(ioctls(&VCPU_IOCTLS));
            v.push(tgkill_own());
            v.extend(
                [
                    libc::SYS_sendmsg,
                    libc::SYS_recvmsg,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_dup,
                ]
                .map(any),
            );
            // A failed message checks whether the backend hung up.
            v.extend(EPOLL_WAIT.map(any));
        }
        Thread::Main => {
            v.push(tgkill_own());
            v.extend([libc::SYS_unlink, libc::SYS_unlinkat, libc::SYS_epoll_ctl].map(any));
            v.extend(EPOLL_WAIT.map(any));
        }
        Thread::Api => {
            v.extend(
                [
                    libc::SYS_accept4,
                    libc::SYS_accept,
                    libc::SYS_shutdown,
                    libc::SYS_unlink,
                    // A swap moves device state through a pipe.
                    libc::SYS_pipe2,
                ]
                .map(any),
            );
            v.extend(backend_link_syscalls().map(any));
        }
        Thread::Monitor => v.extend(backend_link_syscalls().map(any)),
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
    build(thread, mismatch).map(Some)
}

/// `thread`'s filter with `mismatch` for a forbidden call.
pub(crate) fn build(thread: Thread, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    // seccompiler reads an empty rule list as "any arguments"; an
    // unconditional allow of a call wins over conditional ones.
    let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for a in syscalls(thread) {
        let e = rules.entry(a.nr).or_insert_with(|| Some(Vec::new()));
        match (e.as_mut(), a.rules.is_empty()) {
            (Some(_), true) => *e = None,
            (Some(list), false) => list.extend(a.rules),
            (None, _) => {}
        }
    }
    let rules: BTreeMap<i64, Vec<SeccompRule>> = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    f.try_into()
        .map_err(|e| SeccompError::Install(seccompiler::Error::Backend(e)))
}

/// Installs `thread`'s filter on the calling thread.
pub fn apply(thread: Thread, mode: SeccompMode) -> Result<(), SeccompError> {
    if let Some(prog) = filter(thread, mode)? {
        seccompiler::apply_filter(&prog).map_err(SeccompError::Install)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a new thread under `thread`'s filter, forbidden calls
    /// failing with EPERM instead of killing the test.
    fn under<T: Send + 'static>(thread: Thread, f: impl FnOnce() -> T + Send + 'static) -> T {
        let prog = build(thread, SeccompAction::Errno(libc::EPERM as u32)).expect("filter");
        std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).expect("apply the filter");
            f()
        })
        .join()
        .expect("the filtered thread")
    }

    fn errno(rc: libc::c_long) -> i32 {
        if rc < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    #[test]
    fn a_vcpu_thread_may_make_only_its_kvm_ioctls() {
        let (forbidden, allowed) = under(Thread::Vcpu, || {
            // KVM_CREATE_VM on a bad fd: refused by the filter before the
            // kernel ever sees the fd.
            // SAFETY: raw ioctl on fd -1; nothing is read or written.
            let forbidden = errno(unsafe { libc::syscall(libc::SYS_ioctl, -1, 0xae01u64, 0) });
            // KVM_RUN is allowed: the kernel answers EBADF for fd -1.
            // SAFETY: as above.
            let allowed = errno(unsafe { libc::syscall(libc::SYS_ioctl, -1, VCPU_IOCTLS[0], 0) });
            (forbidden, allowed)
        });
        assert_eq!(forbidden, libc::EPERM, "KVM_CREATE_VM on a vCPU thread");
        assert_eq!(allowed, libc::EBADF, "KVM_RUN on a vCPU thread");
    }

    #[test]
    fn no_thread_may_map_executable_memory() {
        for thread in [Thread::Vcpu, Thread::Main, Thread::Api, Thread::Monitor] {
            let (exec, plain) = under(thread, || {
                let map = |prot| {
                    // SAFETY: an anonymous private mapping, unmapped at once.
                    let p = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            4096,
                            prot,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                    if p == libc::MAP_FAILED {
                        return std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    }
                    // SAFETY: the mapping made just above.
                    unsafe { libc::munmap(p, 4096) };
                    0
                };
                (
                    map(libc::PROT_READ | libc::PROT_EXEC),
                    map(libc::PROT_READ | libc::PROT_WRITE),
                )
            });
            assert_eq!(exec, libc::EPERM, "{thread:?}: PROT_EXEC");
            assert_eq!(plain, 0, "{thread:?}: a data mapping");
        }
    }

    #[test]
    fn every_thread_waits_through_epoll_and_none_polls() {
        use bulkhead_common::event::{EventLoop, Interest};
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum Token {
            Fd,
        }
        bulkhead_common::event_token!(Token { Fd });
        for thread in [Thread::Vcpu, Thread::Main, Thread::Api, Thread::Monitor] {
            // A loop made before the filter, as the main thread's and each
            // connection's are.
            let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let ev = EventLoop::new().unwrap();
            ev.add(&fd, Interest::READ, Token::Fd).unwrap();
            let (waited, created, polled) = under(thread, move || {
                let waited = ev.wait(Some(std::time::Duration::ZERO)).map(|e| e.len());
                let created = EventLoop::<Token>::new()
                    .map(|_| ())
                    .map_err(|e| e.raw_os_error());
                // SAFETY: poll on no fds with no wait.
                let polled = errno(unsafe { libc::syscall(libc::SYS_poll, 0usize, 0, 0) });
                (waited.ok(), created, polled)
            });
            assert_eq!(waited, Some(0), "{thread:?}: epoll_wait");
            assert_eq!(polled, libc::EPERM, "{thread:?}: poll");
            // Only threads that open connections make new loops.
            let opens = matches!(thread, Thread::Api | Thread::Monitor);
            assert_eq!(
                created.is_ok(),
                opens,
                "{thread:?}: epoll_create1 {created:?}"
            );
        }
    }

    #[test]
    fn tgkill_reaches_only_this_process() {
        let (other, own) = under(Thread::Vcpu, || {
            // Signal 0 checks without delivering anything.
            // SAFETY: tgkill with signal 0 has no effect.
            let other = errno(unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) });
            // SAFETY: as above, to this very thread.
            let own = errno(unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::syscall(libc::SYS_gettid),
                    0,
                )
            });
            (other, own)
        });
        assert_eq!(other, libc::EPERM, "tgkill to another process");
        assert_eq!(own, 0, "tgkill to this process");
    }
}
