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
//! A daemon whose image lives on Ceph RBD cannot be single-threaded at
//! step 1: librados starts its messenger, timer and finisher threads when
//! it connects, and the daemon connects (and opens the image) before it
//! serves, like it opens a file. [`Sandbox::enter_threaded`] confines such
//! a process with the library's threads in it: their allow-list
//! ([`LibraryThreads`]) is installed on every thread at once
//! (`SECCOMP_FILTER_FLAG_TSYNC`, which also sets `no_new_privs` on each),
//! under a filter that answers every `open` with `EPERM` (they read their
//! files while connecting); then the main thread stacks its own filter on
//! it, so the serving threads still get exactly their lists. Landlock and
//! the capability drop apply to the calling thread and the threads it
//! creates later (the serving threads), not to the library's; namespaces
//! are left out (they would hold the main thread only). Those gaps are in
//! the sandbox's log line.
//!
//! Seccomp filters stack and threads inherit their creator's, so the main
//! filter allows everything a worker needs plus what the control thread
//! needs; a worker then adds its own list, so it can no longer accept
//! connections, map memory fds, create threads or set up io_uring rings.
//!
//! Allow-lists are written in [`seccomp`] (the base every daemon needs) and
//! in each daemon's library, `backends/<dev>/src/policy.rs` (its device's
//! extra calls, as [`Policy::main`] and [`Policy::worker`], with unit tests). With `--sandbox log` a call outside a list is allowed
//! and logged by the kernel (`SECCOMP_RET_LOG`: the audit log, or the kernel
//! log that `dmesg` shows where no audit daemon runs) instead of killing the
//! process; every other layer stays enforced.

//!
//! One file per layer: [`seccomp`] (allow-lists and filters),
//! [`landlock`] (paths and network, also used by `bulkhead-vmm` and the
//! launcher), [`limits`] (resource limits), [`namespaces`], [`privileges`]
//! (ids and capabilities); this file holds the policy and the order.

pub mod landlock;
pub mod limits;
pub mod namespaces;
pub mod privileges;
pub mod seccomp;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::SeccompAction;

pub use seccomp::{Syscall, ThreadKind, allowed_syscalls, check, library_syscalls};

/// What `--sandbox` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// Every layer on; a system call outside the allow-list kills the daemon (SIGSYS).
    #[value(alias = "kill")]
    Enforce,
    /// Every layer on, but a system call outside the allow-list is only logged by the kernel (audit log / dmesg).
    Log,
    /// No sandbox at all (debugging only; prints a warning).
    Off,
}

impl SandboxMode {
    /// The word `--sandbox` takes, for log lines.
    pub fn name(self) -> &'static str {
        match self {
            SandboxMode::Enforce => "enforce",
            SandboxMode::Log => "log",
            SandboxMode::Off => "off",
        }
    }
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
    Landlock(#[source] ::landlock::RulesetError),
    /// A policy path cannot be opened for its Landlock rule.
    #[error("Landlock rule for {0}")]
    LandlockPath(PathBuf, #[source] ::landlock::PathFdError),
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

pub(super) fn sys(what: &'static str) -> SandboxError {
    SandboxError::Sys(what, io::Error::last_os_error())
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
    /// Read and execute files at or beneath the path (the launcher's programs).
    Execute(PathBuf),
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
/// memory slot, the backend channel, the stats socket and its clients
/// (one more for the client told it is busy), and some slack.
pub fn fd_budget(queues: u16, per_queue: u64) -> u64 {
    let slots = crate::memory::MAX_MEM_SLOTS as u64;
    let stats = crate::stats_socket::MAX_CLIENTS as u64 + 2;
    64 + slots + stats + u64::from(queues) * per_queue
}

/// Threads a library started before the sandbox (librados' for an RBD
/// image) and what they may call beyond the main list: see the [module
/// docs](self) and [`Sandbox::enter_threaded`].
#[derive(Clone, Debug)]
pub struct LibraryThreads {
    /// The library, for the log (`librados`).
    pub library: &'static str,
    /// System calls its threads make beyond the main list.
    pub calls: Vec<Syscall>,
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
            "sandbox {}: seccomp per thread kind, no_new_privs, Landlock {}, namespaces [{}], no capabilities",
            mode.name(),
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
        Self::enter_inner(args, policy, None)
    }

    /// [`Sandbox::enter`] for a process in which `library` already started
    /// threads: they get the main list plus `library.calls` (and `EPERM` for
    /// every `open`), installed on every thread at once; the calling thread
    /// then stacks the main filter. Landlock, the capability drop and the
    /// worker filters hold for the calling thread and the threads it starts
    /// later; no namespaces (see the [module docs](self)).
    pub fn enter_threaded(
        args: &SandboxArgs,
        policy: &Policy,
        library: &LibraryThreads,
    ) -> Result<Sandbox, SandboxError> {
        Self::enter_inner(args, policy, Some(library))
    }

    fn enter_inner(
        args: &SandboxArgs,
        policy: &Policy,
        library: Option<&LibraryThreads>,
    ) -> Result<Sandbox, SandboxError> {
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
        if threads != 1 && library.is_none() {
            return Err(SandboxError::Threads(threads));
        }
        let mut sb = Sandbox {
            mode: Some(args.sandbox),
            ..Sandbox::default()
        };
        fix_malloc_arenas();
        // Before the filesystem is out of reach: how frontend fds are checked.
        crate::frontend_fd::init();
        let ids = privileges::resolve_ids(args)?;
        let last_cap = privileges::last_capability();
        limits::set_rlimits(policy, &mut sb)?;
        match library {
            Some(lib) if threads > 1 => sb.notes.push(format!(
                "no namespaces ({} threads of {} run already; a namespace would hold this thread \
                 only)",
                threads - 1,
                lib.library
            )),
            _ => namespaces::enter_namespaces(policy, &mut sb),
        }
        privileges::drop_privileges(ids, last_cap, &mut sb)?;
        // SAFETY: geteuid has no preconditions.
        if ids.is_none() && unsafe { libc::geteuid() } == 0 {
            sb.notes.push("still uid 0 (use --user)".into());
        }
        // Compile both filters before confining anything, so a bad policy fails early.
        let kill = match args.sandbox {
            SandboxMode::Log => SeccompAction::Log,
            _ => SeccompAction::KillProcess,
        };
        let main_prog = seccomp::compile(&seccomp::main_list(policy), kill.clone())?;
        let worker_prog = seccomp::compile(&seccomp::worker_list(policy), kill.clone())?;
        let clone3_prog = seccomp::clone3_enosys()?;
        let library_progs = match library {
            Some(lib) => Some((
                seccomp::deny_list(seccomp::OPEN_CALLS, false)?,
                seccomp::compile(&seccomp::library_list(policy, &lib.calls), kill)?,
            )),
            None => None,
        };
        sb.landlock = Some(landlock::restrict(&policy.paths, policy.needs_network)?);
        if let (Some((no_open, library_prog)), Some(lib)) = (&library_progs, library) {
            // Every thread at once; the main filter stacks on these below.
            for prog in [no_open, library_prog, &clone3_prog] {
                seccompiler::apply_filter_all_threads(prog).map_err(SandboxError::Seccomp)?;
            }
            sb.notes.push(format!(
                "threads of {}: their own seccomp list (no Landlock, no open, capabilities kept \
                 unless --user)",
                lib.library
            ));
            seccompiler::apply_filter(&main_prog).map_err(SandboxError::Seccomp)?;
        } else {
            seccompiler::apply_filter(&main_prog).map_err(SandboxError::Seccomp)?;
            seccompiler::apply_filter(&clone3_prog).map_err(SandboxError::Seccomp)?;
        }
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

/// glibc reads `/sys/devices/system/cpu/online` the first time a thread
/// needs a ninth malloc arena, to size the arena limit: inside the sandbox
/// that read would be a forbidden `openat`. Setting the limit here (glibc's
/// own default, eight per CPU) leaves nothing to read later.
fn fix_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt takes two integers.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } == 0 {
            log::warn!("mallopt(M_ARENA_MAX) failed; a busy thread may read /sys later");
        }
    }
}

fn thread_count() -> Result<usize, SandboxError> {
    let dir = std::fs::read_dir("/proc/self/task").map_err(|e| SandboxError::Sys("/proc", e))?;
    Ok(dir.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_budget_grows_with_queues() {
        assert!(fd_budget(64, 8) > fd_budget(1, 8));
        assert!(fd_budget(1, 8) > crate::memory::MAX_MEM_SLOTS as u64);
    }
}
