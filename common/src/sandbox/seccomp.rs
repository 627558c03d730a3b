//! Seccomp: the base allow-lists every daemon's threads need, the merge of
//! a daemon's own calls into them, and the compiled filters (see the
//! [module docs](super) for how the main and worker filters stack).

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{Policy, SandboxError};

/// The kinds of threads a daemon runs, each with its own seccomp filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: serve loop, vhost-user messages, queue thread creation.
    Main,
    /// A vring worker (one per running queue), including its I/O engine.
    Worker,
}

/// One allowed system call, optionally only with some argument values.
#[derive(Clone, Debug)]
pub struct Syscall {
    nr: libc::c_long,
    /// Conditions that must all hold; empty: any arguments.
    conds: Vec<(u8, SeccompCmpArgLen, SeccompCmpOp, u64)>,
}

impl Syscall {
    /// `nr` with any arguments.
    pub fn any(nr: libc::c_long) -> Self {
        Syscall {
            nr,
            conds: Vec::new(),
        }
    }

    /// `nr` only when argument `index` (0-based) equals `value` (compared as 64 bits).
    pub fn arg_eq(nr: libc::c_long, index: u8, value: u64) -> Self {
        Syscall::any(nr).and(index, SeccompCmpOp::Eq, value)
    }

    /// `nr` only when argument `index` has no bit of `mask` set.
    pub fn arg_clear(nr: libc::c_long, index: u8, mask: u64) -> Self {
        Syscall::any(nr).and(index, SeccompCmpOp::MaskedEq(mask), 0)
    }

    /// `nr` only when argument `index` has every bit of `mask` set.
    pub fn arg_set(nr: libc::c_long, index: u8, mask: u64) -> Self {
        Syscall::any(nr).and(index, SeccompCmpOp::MaskedEq(mask), mask)
    }

    /// `nr` only when argument `index`, an `int` (an fd), equals `value`.
    pub fn arg_eq32(nr: libc::c_long, index: u8, value: u32) -> Self {
        Syscall::any(nr).and32(index, SeccompCmpOp::Eq, u64::from(value))
    }

    /// `ioctl(fd, request, ...)` for this one request (its low 32 bits, as the kernel reads it).
    pub fn ioctl(request: u64) -> Self {
        Syscall::any(libc::SYS_ioctl).and32(1, SeccompCmpOp::Eq, request & 0xffff_ffff)
    }

    /// `fcntl(fd, cmd, ...)` for this one command.
    pub fn fcntl(cmd: libc::c_int) -> Self {
        Syscall::any(libc::SYS_fcntl).and32(1, SeccompCmpOp::Eq, cmd as u64)
    }

    /// What a thread needs to make io_uring rings limited to chosen opcodes
    /// before they run: `io_uring_setup`, and `io_uring_register` only to
    /// register restrictions and enable a ring created disabled (ring
    /// operations are not system calls, so seccomp never sees them).
    pub fn restricted_io_uring_setup() -> Vec<Self> {
        /// `IORING_REGISTER_RESTRICTIONS` and `IORING_REGISTER_ENABLE_RINGS`.
        const RESTRICTIONS: u64 = 11;
        const ENABLE_RINGS: u64 = 12;
        vec![
            Syscall::any(libc::SYS_io_uring_setup),
            Syscall::arg_eq(libc::SYS_io_uring_register, 1, RESTRICTIONS),
            Syscall::arg_eq(libc::SYS_io_uring_register, 1, ENABLE_RINGS),
        ]
    }

    /// `prctl(option, ...)` for this one option.
    pub fn prctl(option: libc::c_int) -> Self {
        Syscall::any(libc::SYS_prctl).and32(0, SeccompCmpOp::Eq, option as u64)
    }

    /// `getsockopt(fd, level, optname, ...)` for this one option (e.g. `SOL_SOCKET`, `SO_TYPE`).
    pub fn getsockopt(level: libc::c_int, optname: libc::c_int) -> Self {
        Syscall::any(libc::SYS_getsockopt)
            .and32(1, SeccompCmpOp::Eq, level as u64)
            .and32(2, SeccompCmpOp::Eq, optname as u64)
    }

    /// `socket(domain, ...)` for this one address family (e.g. `AF_UNIX`).
    pub fn socket(domain: libc::c_int) -> Self {
        Syscall::any(libc::SYS_socket).and32(0, SeccompCmpOp::Eq, domain as u64)
    }

    /// `socket(domain, kind | flags, ...)` for this one address family and
    /// socket type (e.g. `AF_INET`, `SOCK_STREAM`), any `SOCK_CLOEXEC` or
    /// `SOCK_NONBLOCK` flags.
    pub fn socket_of(domain: libc::c_int, kind: libc::c_int) -> Self {
        // The type is in the low bits (linux/net.h: SOCK_TYPE_MASK).
        const SOCK_TYPE_MASK: u64 = 0xf;
        Syscall::socket(domain).and32(1, SeccompCmpOp::MaskedEq(SOCK_TYPE_MASK), kind as u64)
    }

    fn and(mut self, index: u8, op: SeccompCmpOp, value: u64) -> Self {
        self.conds.push((index, SeccompCmpArgLen::Qword, op, value));
        self
    }

    fn and32(mut self, index: u8, op: SeccompCmpOp, value: u64) -> Self {
        self.conds.push((index, SeccompCmpArgLen::Dword, op, value));
        self
    }

    /// The system call number.
    pub fn nr(&self) -> libc::c_long {
        self.nr
    }
}

/// What every thread needs: memory, locks, its own exit, logging to stderr,
/// waiting on eventfds.
fn base_common() -> Vec<Syscall> {
    use libc::*;
    let no_exec = PROT_EXEC as u64;
    vec![
        Syscall::any(SYS_read),
        Syscall::any(SYS_write),
        Syscall::any(SYS_writev),
        Syscall::any(SYS_close),
        Syscall::any(SYS_brk),
        Syscall::arg_clear(SYS_mmap, 2, no_exec),
        Syscall::arg_clear(SYS_mprotect, 2, no_exec),
        Syscall::any(SYS_munmap),
        Syscall::any(SYS_mremap),
        Syscall::any(SYS_madvise),
        Syscall::any(SYS_futex),
        Syscall::any(SYS_sched_yield),
        Syscall::any(SYS_getrandom),
        Syscall::any(SYS_clock_gettime),
        Syscall::any(SYS_clock_nanosleep),
        Syscall::any(SYS_nanosleep),
        Syscall::any(SYS_getpid),
        Syscall::any(SYS_gettid),
        Syscall::any(SYS_rt_sigprocmask),
        Syscall::any(SYS_rt_sigreturn),
        Syscall::any(SYS_sigaltstack),
        Syscall::any(SYS_restart_syscall),
        Syscall::any(SYS_epoll_create1),
        Syscall::any(SYS_epoll_ctl),
        Syscall::any(SYS_epoll_wait),
        Syscall::any(SYS_exit),
        Syscall::any(SYS_exit_group),
        // Debug builds check an fd is open before closing it.
        Syscall::fcntl(F_GETFD),
        // abort() after a panic: only this process can be signalled.
        Syscall::arg_eq(SYS_tgkill, 0, std::process::id() as u64),
    ]
}

/// The control thread: the serve loop, vhost-user messages and their fds,
/// guest memory and inflight memfds, queue thread creation.
fn base_main() -> Vec<Syscall> {
    use libc::*;
    let mut v = vec![
        Syscall::any(SYS_poll),
        Syscall::any(SYS_accept4),
        Syscall::any(SYS_recvmsg),
        Syscall::any(SYS_sendmsg),
        Syscall::any(SYS_recvfrom),
        Syscall::any(SYS_sendto),
        Syscall::any(SYS_dup),
        Syscall::any(SYS_eventfd2),
        Syscall::any(SYS_memfd_create),
        Syscall::any(SYS_ftruncate),
        Syscall::any(SYS_fstat),
        // fstat(2) and File::metadata on an fd: newfstatat/statx with AT_EMPTY_PATH.
        Syscall::arg_set(SYS_newfstatat, 3, AT_EMPTY_PATH as u64),
        Syscall::arg_set(SYS_statx, 2, AT_EMPTY_PATH as u64),
        Syscall::fcntl(F_DUPFD_CLOEXEC),
        // Every fd a frontend sends is made close-on-exec, an eventfd
        // non-blocking too (`frontend_fd`).
        Syscall::fcntl(F_SETFD),
        Syscall::fcntl(F_GETFL),
        Syscall::fcntl(F_SETFL),
        // How many bytes of a message have arrived (the serve loop waits for
        // whole messages, with a deadline).
        Syscall::ioctl(FIONREAD),
        // Sealing guest memory and inflight memfds against shrinking.
        Syscall::fcntl(F_GET_SEALS),
        Syscall::fcntl(F_ADD_SEALS),
        // Queue threads: pthread_create uses clone3 (answered ENOSYS by a
        // second filter) and then clone, allowed only for threads.
        Syscall::arg_set(SYS_clone, 0, CLONE_THREAD as u64),
        Syscall::any(SYS_clone3),
        Syscall::any(SYS_set_robust_list),
        Syscall::any(SYS_rseq),
        // glibc installs its SIGRT_1 (setxid) handler at the first pthread_create;
        // a new thread reads its CPU affinity before it runs our code.
        Syscall::any(SYS_rt_sigaction),
        Syscall::any(SYS_sched_getaffinity),
        Syscall::prctl(PR_SET_NAME),
        // A new queue thread installs the worker filter on itself.
        Syscall::prctl(PR_SET_NO_NEW_PRIVS),
        Syscall::arg_eq(SYS_seccomp, 0, SECCOMP_SET_MODE_FILTER as u64),
        // The stats thread waits for SIGUSR1 (`crate::scaffold`); the stats
        // socket's thread needs only poll, accept4, recvfrom and write,
        // allowed above (`crate::stats_socket`).
        Syscall::any(SYS_rt_sigtimedwait),
    ];
    // Whether a frontend's fd is an eventfd: its name in /proc/self/fd,
    // read through the directory fd opened before the sandbox, never a path.
    if let Some(dir) = crate::frontend_fd::proc_fd_dir().and_then(|d| u32::try_from(d).ok()) {
        v.push(Syscall::arg_eq32(SYS_readlinkat, 0, dir));
    }
    v
}

/// Merges `lists` into seccompiler's map: rules for one call are alternatives;
/// an unconditional one makes the call allowed with any arguments.
fn merge(
    lists: &[&[Syscall]],
) -> Result<std::collections::BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut map: std::collections::BTreeMap<i64, Option<Vec<SeccompRule>>> = Default::default();
    for s in lists.iter().flat_map(|l| l.iter()) {
        let entry = map.entry(s.nr).or_insert_with(|| Some(Vec::new()));
        if s.conds.is_empty() {
            *entry = None;
            continue;
        }
        if let Some(rules) = entry {
            let conds = s
                .conds
                .iter()
                .map(|(i, len, op, v)| SeccompCondition::new(*i, len.clone(), op.clone(), *v))
                .collect::<Result<Vec<_>, _>>()
                .map_err(SandboxError::Filter)?;
            rules.push(SeccompRule::new(conds).map_err(SandboxError::Filter)?);
        }
    }
    Ok(map
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect())
}

/// The main thread's list: its own needs plus everything a worker needs
/// (workers inherit this filter and stack theirs on it).
pub(super) fn main_list(policy: &Policy) -> Vec<Syscall> {
    let mut v = base_common();
    v.extend(base_main());
    v.extend(policy.main.iter().cloned());
    v.extend(policy.worker.iter().cloned());
    v
}

/// The list of threads a library started before the sandbox: the main
/// list (their filter is the one every thread stacks its own on), the
/// library's own calls, and every `open`, which a filter under this one
/// answers `EPERM` ([`OPEN_CALLS`]; allowed here so that answer is the one
/// that counts).
pub(super) fn library_list(policy: &Policy, library: &[Syscall]) -> Vec<Syscall> {
    let mut v = main_list(policy);
    v.extend(library.iter().cloned());
    v.extend(OPEN_CALLS.iter().map(|&nr| Syscall::any(nr)));
    v
}

/// A vring worker's list.
pub(super) fn worker_list(policy: &Policy) -> Vec<Syscall> {
    let mut v = base_common();
    v.extend(policy.worker.iter().cloned());
    v
}

/// What no Bulkhead process, nor QEMU under the launcher, ever calls:
/// debugging other processes, loading kernel code, rebooting, mounting,
/// changing the clock, kernel keyrings. The launcher's filter refuses them
/// for itself and every process it starts (filters are inherited across
/// `execve`), under the daemons' and the VMM's own allow-lists.
pub const NEVER: &[libc::c_long] = &[
    libc::SYS_acct,
    libc::SYS_add_key,
    libc::SYS_adjtimex,
    libc::SYS_bpf,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_settime,
    libc::SYS_delete_module,
    libc::SYS_finit_module,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fsopen,
    libc::SYS_fspick,
    libc::SYS_init_module,
    libc::SYS_ioperm,
    libc::SYS_iopl,
    libc::SYS_kexec_file_load,
    libc::SYS_kexec_load,
    libc::SYS_keyctl,
    libc::SYS_mount,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_open_by_handle_at,
    libc::SYS_open_tree,
    libc::SYS_perf_event_open,
    libc::SYS_pivot_root,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_ptrace,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_request_key,
    libc::SYS_setns,
    libc::SYS_settimeofday,
    libc::SYS_swapoff,
    libc::SYS_swapon,
    libc::SYS_syslog,
    libc::SYS_umount2,
    libc::SYS_userfaultfd,
];

/// A filter that refuses each of `calls` (with EPERM, or only logging it
/// for `--sandbox log`) and allows everything else: for a process that
/// starts others and cannot know their allow-lists.
pub fn deny_list(calls: &[libc::c_long], log_only: bool) -> Result<BpfProgram, SandboxError> {
    let rules = calls.iter().map(|&nr| (nr, Vec::new())).collect();
    let action = if log_only {
        SeccompAction::Log
    } else {
        SeccompAction::Errno(libc::EPERM as u32)
    };
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, arch())
        .map_err(SandboxError::Filter)?;
    BpfProgram::try_from(filter).map_err(SandboxError::Filter)
}

/// Installs `filter` on the calling thread (and the threads and processes
/// it creates later).
pub fn install(filter: &BpfProgram) -> Result<(), SandboxError> {
    seccompiler::apply_filter(filter).map_err(SandboxError::Seccomp)
}

/// Every way to open a path: what a library's threads are answered
/// `EPERM` for ([`super::Sandbox::enter_threaded`]).
#[cfg(target_arch = "x86_64")]
pub const OPEN_CALLS: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_creat,
    libc::SYS_openat,
    libc::SYS_openat2,
];
/// Every way to open a path: what a library's threads are answered
/// `EPERM` for ([`super::Sandbox::enter_threaded`]).
#[cfg(not(target_arch = "x86_64"))]
pub const OPEN_CALLS: &[libc::c_long] = &[libc::SYS_openat, libc::SYS_openat2];

/// What the threads of a library started before the sandbox may call (for
/// docs and tests): [`library_list`] as numbers.
pub fn library_syscalls(policy: &Policy, library: &[Syscall]) -> Vec<libc::c_long> {
    let mut nrs: Vec<_> = library_list(policy, library)
        .iter()
        .map(Syscall::nr)
        .collect();
    nrs.sort_unstable();
    nrs.dedup();
    nrs
}

/// Builds every filter of `policy` without installing any: what a daemon's
/// policy tests call to show its lists compile.
pub fn check(policy: &Policy) -> Result<(), SandboxError> {
    compile(&main_list(policy), SeccompAction::KillProcess)?;
    compile(&worker_list(policy), SeccompAction::KillProcess)?;
    clone3_enosys().map(|_| ())
}

/// The allow-list of `kind` under `policy`, as system call numbers (for docs and tests).
pub fn allowed_syscalls(kind: ThreadKind, policy: &Policy) -> Vec<libc::c_long> {
    let list = match kind {
        ThreadKind::Main => main_list(policy),
        ThreadKind::Worker => worker_list(policy),
    };
    let mut nrs: Vec<_> = list.iter().map(Syscall::nr).collect();
    nrs.sort_unstable();
    nrs.dedup();
    nrs
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(target_arch = "riscv64")]
    return TargetArch::riscv64;
    #[cfg(not(any(target_arch = "aarch64", target_arch = "riscv64")))]
    TargetArch::x86_64
}

pub(super) fn compile(
    list: &[Syscall],
    mismatch: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(merge(&[list])?, mismatch, SeccompAction::Allow, arch())
        .map_err(SandboxError::Filter)?;
    BpfProgram::try_from(filter).map_err(SandboxError::Filter)
}

/// `clone3` answers ENOSYS, so glibc falls back to `clone`, whose flags the
/// main filter can check (clone3 passes them in memory, out of seccomp's sight).
pub(super) fn clone3_enosys() -> Result<BpfProgram, SandboxError> {
    let rules = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch(),
    )
    .map_err(SandboxError::Filter)?;
    BpfProgram::try_from(filter).map_err(SandboxError::Filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_for_the_default_policy() {
        let p = Policy::default();
        assert!(compile(&main_list(&p), SeccompAction::KillProcess).is_ok());
        assert!(compile(&worker_list(&p), SeccompAction::Log).is_ok());
        assert!(clone3_enosys().is_ok());
    }

    #[test]
    fn workers_cannot_accept_create_threads_or_map_memfds() {
        let p = Policy::default();
        let w = allowed_syscalls(ThreadKind::Worker, &p);
        for nr in [
            libc::SYS_accept4,
            libc::SYS_clone,
            libc::SYS_memfd_create,
            libc::SYS_seccomp,
            libc::SYS_socket,
            libc::SYS_openat,
            libc::SYS_execve,
        ] {
            assert!(!w.contains(&nr), "worker allows syscall {nr}");
        }
    }

    #[test]
    fn the_main_list_includes_every_worker_call() {
        let p = Policy {
            worker: vec![Syscall::any(libc::SYS_io_uring_enter)],
            ..Policy::default()
        };
        let m = allowed_syscalls(ThreadKind::Main, &p);
        for nr in allowed_syscalls(ThreadKind::Worker, &p) {
            assert!(m.contains(&nr), "main lacks worker syscall {nr}");
        }
    }

    #[test]
    fn no_list_allows_opening_paths_sockets_or_exec() {
        let p = Policy::default();
        let m = allowed_syscalls(ThreadKind::Main, &p);
        for nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_mount,
        ] {
            assert!(!m.contains(&nr), "main allows syscall {nr}");
        }
    }

    #[test]
    fn the_deny_list_builds_and_refuses_what_it_lists_in_a_thread() {
        assert!(deny_list(NEVER, true).is_ok());
        // Refuse getppid in one thread only (filters are per thread).
        let r = std::thread::spawn(|| {
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            seccompiler::apply_filter(&deny_list(&[libc::SYS_getppid], false).unwrap()).unwrap();
            // SAFETY: a raw system call without pointers.
            let r = unsafe { libc::syscall(libc::SYS_getppid) };
            (r, std::io::Error::last_os_error().raw_os_error())
        })
        .join()
        .unwrap();
        assert_eq!(r, (-1, Some(libc::EPERM)));
    }

    #[test]
    fn the_deny_list_spares_what_the_daemons_and_the_vmm_need() {
        for nr in [
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_unshare,
            libc::SYS_seccomp,
            libc::SYS_prctl,
            libc::SYS_capset,
            libc::SYS_setresuid,
            libc::SYS_landlock_restrict_self,
            libc::SYS_ioctl,
        ] {
            assert!(!NEVER.contains(&nr), "{nr}");
        }
    }

    #[test]
    fn an_unconditional_rule_wins_over_argument_rules() {
        let map = merge(&[&[
            Syscall::ioctl(1),
            Syscall::any(libc::SYS_ioctl),
            Syscall::ioctl(2),
        ]])
        .unwrap();
        assert_eq!(map.get(&libc::SYS_ioctl).map(Vec::len), Some(0));
        let map = merge(&[&[Syscall::ioctl(1), Syscall::ioctl(2)]]).unwrap();
        assert_eq!(map.get(&libc::SYS_ioctl).map(Vec::len), Some(2));
    }

    #[test]
    fn getsockopt_rules_check_level_and_option() {
        let p = Policy {
            main: vec![Syscall::getsockopt(libc::SOL_SOCKET, libc::SO_TYPE)],
            ..Policy::default()
        };
        assert!(compile(&main_list(&p), SeccompAction::KillProcess).is_ok());
        let map = merge(&[&p.main]).unwrap();
        assert_eq!(map.get(&libc::SYS_getsockopt).map(Vec::len), Some(1));
    }
}
