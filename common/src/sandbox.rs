//! Least privilege for every daemon: after it has opened what it needs (its
//! socket or `--fd`, its image or tap) and before it reads the first
//! vhost-user message, a daemon calls [`Sandbox::enter`], which in order
//!
//! 1. checks the process is still single-threaded (namespaces, Landlock and
//!    the first seccomp filter apply to the calling thread and its future
//!    children only);
//! 2. resolves `--user`/`--group` (getpwnam_r/getgrnam_r, while /etc is
//!    still reachable);
//! 3. sets resource limits: `RLIMIT_CORE` 0 (no guest memory in core files),
//!    `RLIMIT_NOFILE` from the policy, `RLIMIT_FSIZE` the size of the inflight
//!    area's memfd (the one file they size) for daemons that write
//!    no files;
//! 4. enters fresh ipc and uts namespaces, and a fresh net namespace unless
//!    the policy needs the network (a user namespace first where the daemon
//!    is not privileged enough to create them otherwise);
//! 5. drops the capability bounding set and ambient set, switches to
//!    `--user`/`--group` with no supplementary groups, and clears every
//!    remaining capability;
//! 6. sets `no_new_privs` and a Landlock domain that grants exactly the
//!    policy's paths (none for a daemon whose files are all open already),
//!    denies TCP bind/connect unless the policy needs the network, and scopes
//!    signals and abstract unix sockets to the sandbox;
//! 7. installs the main thread's seccomp filter, which every thread created
//!    later inherits, and registers the stricter vring-worker filter that
//!    [`crate::worker`] installs at the start of each queue thread.
//!
//! Seccomp filters stack and threads inherit their creator's, so the main
//! filter allows everything a worker needs plus what the control thread
//! needs; a worker then adds its own list, so it can no longer accept
//! connections, map memory fds, create threads or set up io_uring rings.
//!
//! Allow-lists are written here (the base every daemon needs) and in each
//! daemon's `main.rs` (its device's extra calls, as [`Policy::main`] and
//! [`Policy::worker`]). With `--sandbox log` a call outside a list is allowed
//! and logged by the kernel (`SECCOMP_RET_LOG`: the audit log, or the kernel
//! log that `dmesg` shows where no audit daemon runs) instead of killing the
//! process; every other layer stays enforced.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What `--sandbox` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// Every layer on; a system call outside the allow-list kills the daemon (SIGSYS).
    Enforce,
    /// Every layer on, but a system call outside the allow-list is only logged by the kernel (audit log / dmesg).
    Log,
    /// No sandbox at all (debugging only; prints a warning).
    Off,
}

/// Sandbox options every daemon takes (flatten into its clap `Args`).
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxArgs {
    /// Sandbox: seccomp, Landlock, namespaces, rlimits, no capabilities.
    /// `log` logs seccomp violations to the kernel audit log (dmesg) instead of killing the daemon.
    #[arg(long, value_enum, value_name = "MODE", default_value = "enforce")]
    pub sandbox: SandboxMode,

    /// Switch to this user (name or uid) once the socket and files are open; needs root.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Switch to this group (name or gid); default: the primary group of --user.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
}

impl Default for SandboxArgs {
    fn default() -> Self {
        SandboxArgs {
            sandbox: SandboxMode::Enforce,
            user: None,
            group: None,
        }
    }
}

/// Why the sandbox could not be entered (the daemon must not serve then).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Another thread already runs.
    #[error("the sandbox must be entered while the daemon is single-threaded ({0} threads run)")]
    Threads(usize),
    /// A user or group name did not resolve.
    #[error("unknown {0} {1:?}")]
    UnknownId(&'static str, String),
    /// A system call of the setup failed.
    #[error("{0}")]
    Sys(&'static str, #[source] io::Error),
    /// Landlock refused the ruleset.
    #[error("Landlock")]
    Landlock(#[source] landlock::RulesetError),
    /// A policy path cannot be opened for its Landlock rule.
    #[error("Landlock rule for {0}")]
    LandlockPath(PathBuf, #[source] landlock::PathFdError),
    /// seccompiler cannot build a filter from an allow-list.
    #[error("seccomp allow-list")]
    Filter(#[source] seccompiler::BackendError),
    /// The kernel refused a seccomp filter.
    #[error("seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
    /// The sandbox was entered before in this process.
    #[error("the sandbox was already entered")]
    Twice,
}

fn sys(what: &'static str) -> SandboxError {
    SandboxError::Sys(what, io::Error::last_os_error())
}

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

/// A path a sandboxed daemon may still use, and how.
#[derive(Clone, Debug)]
pub enum PathAccess {
    /// Read files (and list directories) at or beneath the path.
    Read(PathBuf),
    /// Read and write files at or beneath the path (no creating or removing).
    ReadWrite(PathBuf),
    /// Create and remove files directly in this directory (a socket it recreates).
    Directory(PathBuf),
}

/// What one daemon needs once it serves; everything else is denied.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Paths it still opens after entering (none when every file is an open fd).
    pub paths: Vec<PathAccess>,
    /// System calls the main thread needs beyond the base list.
    pub main: Vec<Syscall>,
    /// System calls each vring worker (and its I/O engine) needs beyond the base list.
    pub worker: Vec<Syscall>,
    /// Keep the host network namespace and TCP access (false: fresh empty net namespace, TCP denied).
    pub needs_network: bool,
    /// `RLIMIT_NOFILE`: the most fds it may hold (see [`fd_budget`]).
    pub max_open_files: u64,
    /// It writes regular files (an image); false sets `RLIMIT_FSIZE` to
    /// [`Policy::memfd_bytes`].
    pub writes_files: bool,
    /// Without `writes_files`: the largest file it sizes, its inflight
    /// area's memfd ([`crate::inflight::max_area_size`]); 0 for none.
    pub memfd_bytes: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            paths: Vec::new(),
            main: Vec::new(),
            worker: Vec::new(),
            needs_network: false,
            max_open_files: fd_budget(1, 8),
            writes_files: false,
            memfd_bytes: 0,
        }
    }
}

/// An `RLIMIT_NOFILE` for a daemon with `queues` queues holding at most
/// `per_queue` fds each (kick, call, err, stop, epoll, engine fds): stdio,
/// the listener and connection, the signalfd, the inflight memfd, one fd per
/// memory slot, the backend channel, and some slack.
pub fn fd_budget(queues: u16, per_queue: u64) -> u64 {
    let slots = crate::memory::MAX_MEM_SLOTS as u64;
    64 + slots + u64::from(queues) * per_queue
}

/// What [`Sandbox::enter`] applied, for the log and for tests.
#[derive(Debug, Default)]
pub struct Sandbox {
    mode: Option<SandboxMode>,
    namespaces: Vec<&'static str>,
    landlock: Option<String>,
    uid: Option<(u32, u32)>,
    notes: Vec<String>,
}

impl fmt::Display for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(mode) = self.mode else {
            return write!(f, "sandbox off");
        };
        write!(
            f,
            "sandbox {mode:?}: seccomp per thread kind, no_new_privs, Landlock {}, namespaces [{}], no capabilities",
            self.landlock.as_deref().unwrap_or("unsupported"),
            self.namespaces.join(" ")
        )?;
        if let Some((uid, gid)) = self.uid {
            write!(f, ", uid {uid} gid {gid}")?;
        }
        for n in &self.notes {
            write!(f, "; {n}")?;
        }
        Ok(())
    }
}

/// True once this process entered the sandbox (its filesystem is then out of reach).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether [`Sandbox::enter`] confined this process (the serve loop then leaves its socket file in place at exit).
pub fn is_active() -> bool {
    ACTIVE.load(Ordering::SeqCst)
}

impl Sandbox {
    /// Confines the calling process as `policy` says (see the module docs for the steps).
    ///
    /// Call it once, single-threaded, after every fd the daemon needs is open
    /// and before serving. With `--sandbox off` it only warns.
    pub fn enter(args: &SandboxArgs, policy: &Policy) -> Result<Sandbox, SandboxError> {
        if args.sandbox == SandboxMode::Off {
            log::warn!(
                "--sandbox off: running WITHOUT seccomp, Landlock, namespaces or dropped privileges; a compromised daemon can do anything this user can"
            );
            return Ok(Sandbox::default());
        }
        if ACTIVE.load(Ordering::SeqCst) {
            return Err(SandboxError::Twice);
        }
        let threads = thread_count()?;
        if threads != 1 {
            return Err(SandboxError::Threads(threads));
        }
        let mut sb = Sandbox {
            mode: Some(args.sandbox),
            ..Sandbox::default()
        };
        // Before the filesystem is out of reach: how frontend fds are checked.
        crate::frontend_fd::init();
        let ids = resolve_ids(args)?;
        let last_cap = last_capability();
        set_rlimits(policy, &mut sb)?;
        enter_namespaces(policy, &mut sb);
        drop_privileges(ids, last_cap, &mut sb)?;
        // SAFETY: geteuid has no preconditions.
        if ids.is_none() && unsafe { libc::geteuid() } == 0 {
            sb.notes.push("still uid 0 (use --user)".into());
        }
        // Compile both filters before confining anything, so a bad policy fails early.
        let kill = match args.sandbox {
            SandboxMode::Log => SeccompAction::Log,
            _ => SeccompAction::KillProcess,
        };
        let main_prog = compile(&main_list(policy), kill.clone())?;
        let worker_prog = compile(&worker_list(policy), kill)?;
        let clone3_prog = clone3_enosys()?;
        sb.landlock = Some(restrict_paths(policy)?);
        seccompiler::apply_filter(&main_prog).map_err(SandboxError::Seccomp)?;
        seccompiler::apply_filter(&clone3_prog).map_err(SandboxError::Seccomp)?;
        let hook = move || -> io::Result<()> {
            seccompiler::apply_filter(&worker_prog).map_err(io::Error::other)
        };
        if crate::worker::set_thread_start_hook(Box::new(hook)).is_err() {
            return Err(SandboxError::Twice);
        }
        ACTIVE.store(true, Ordering::SeqCst);
        log::info!("{sb}");
        Ok(sb)
    }

    /// Whether seccomp, Landlock and the rest were applied (false for `--sandbox off`).
    pub fn is_enforcing(&self) -> bool {
        self.mode.is_some()
    }
}

fn thread_count() -> Result<usize, SandboxError> {
    let dir = std::fs::read_dir("/proc/self/task").map_err(|e| SandboxError::Sys("/proc", e))?;
    Ok(dir.count())
}

fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Looks `name` up with a reentrant libc call that fills a buffer; numbers pass through.
fn resolve_ids(args: &SandboxArgs) -> Result<Option<(u32, u32)>, SandboxError> {
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
    let unknown = || SandboxError::UnknownId("user", name.to_string());
    let cname = CString::new(name).map_err(|_| unknown())?;
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
        if rc == 0 && !result.is_null() {
            return Ok((pw.pw_uid, pw.pw_gid));
        }
        return match name.parse::<u32>() {
            Ok(uid) => Ok((uid, uid)),
            Err(_) => Err(unknown()),
        };
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
    // SAFETY: fstat writes one stat struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0) && (st.st_mode & libc::S_IFMT) == libc::S_IFREG
}

fn set_rlimits(policy: &Policy, sb: &mut Sandbox) -> Result<(), SandboxError> {
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

fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes no pointers.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fresh ipc, uts and (unless the policy needs it) net namespaces. No pid
/// namespace: it would only apply to children, and once `pid_ns_for_children`
/// differs the kernel refuses `CLONE_THREAD`, i.e. new queue threads. No mount
/// namespace: Landlock already hides the whole filesystem.
fn enter_namespaces(policy: &Policy, sb: &mut Sandbox) {
    let mut flags = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !policy.needs_network {
        flags |= libc::CLONE_NEWNET;
    }
    let names = |sb: &mut Sandbox, user: bool| {
        if user {
            sb.namespaces.push("user");
        }
        sb.namespaces.push("ipc");
        sb.namespaces.push("uts");
        if !policy.needs_network {
            sb.namespaces.push("net");
        }
    };
    match unshare(flags) {
        Ok(()) => names(sb, false),
        // Not privileged: a user namespace grants the right to create the others.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            match unshare(libc::CLONE_NEWUSER | flags) {
                Ok(()) => names(sb, true),
                Err(e) => sb
                    .notes
                    .push(format!("no namespaces (user namespace refused: {e})")),
            }
        }
        Err(e) => sb.notes.push(format!("no namespaces ({e})")),
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

fn drop_privileges(
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
        sb.uid = Some((uid, gid));
    }
    clear_capabilities().map_err(|e| SandboxError::Sys("capset", e))
}

/// Landlock: every filesystem access right handled, only the policy's paths
/// granted; TCP denied unless the policy needs the network; signals and
/// abstract unix sockets scoped to the sandbox. Best effort on kernels
/// without Landlock (reported, not fatal: seccomp still applies).
fn restrict_paths(policy: &Policy) -> Result<String, SandboxError> {
    let abi = ABI::V7;
    let ll = SandboxError::Landlock;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(ll)?;
    if !policy.needs_network {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(ll)?;
    }
    let mut created = ruleset
        .scope(Scope::from_all(abi))
        .map_err(ll)?
        .create()
        .map_err(ll)?;
    for p in &policy.paths {
        let (path, access) = match p {
            PathAccess::Read(path) => (path, AccessFs::from_read(abi)),
            PathAccess::ReadWrite(path) => (
                path,
                AccessFs::from_read(abi)
                    | AccessFs::WriteFile
                    | AccessFs::Truncate
                    | AccessFs::IoctlDev,
            ),
            PathAccess::Directory(path) => (
                path,
                AccessFs::from_read(abi)
                    | AccessFs::WriteFile
                    | AccessFs::RemoveFile
                    | AccessFs::MakeSock
                    | AccessFs::MakeReg,
            ),
        };
        let fd = PathFd::new(path).map_err(|e| SandboxError::LandlockPath(path.clone(), e))?;
        created = created.add_rule(PathBeneath::new(fd, access)).map_err(ll)?;
    }
    let status = created.restrict_self().map_err(ll)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => format!("({} paths)", policy.paths.len()),
        RulesetStatus::PartiallyEnforced => {
            format!("partially enforced ({} paths)", policy.paths.len())
        }
        RulesetStatus::NotEnforced => {
            log::warn!(
                "Landlock is not available on this kernel: the filesystem is NOT restricted"
            );
            "not enforced".to_string()
        }
    })
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
fn main_list(policy: &Policy) -> Vec<Syscall> {
    let mut v = base_common();
    v.extend(base_main());
    v.extend(policy.main.iter().cloned());
    v.extend(policy.worker.iter().cloned());
    v
}

/// A vring worker's list.
fn worker_list(policy: &Policy) -> Vec<Syscall> {
    let mut v = base_common();
    v.extend(policy.worker.iter().cloned());
    v
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

fn compile(list: &[Syscall], mismatch: SeccompAction) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(merge(&[list])?, mismatch, SeccompAction::Allow, arch())
        .map_err(SandboxError::Filter)?;
    BpfProgram::try_from(filter).map_err(SandboxError::Filter)
}

/// `clone3` answers ENOSYS, so glibc falls back to `clone`, whose flags the
/// main filter can check (clone3 passes them in memory, out of seccomp's sight).
fn clone3_enosys() -> Result<BpfProgram, SandboxError> {
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

    #[test]
    fn fd_budget_grows_with_queues() {
        assert!(fd_budget(64, 8) > fd_budget(1, 8));
        assert!(fd_budget(1, 8) > crate::memory::MAX_MEM_SLOTS as u64);
    }
}
