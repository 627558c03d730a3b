//! The skeleton every backend's `main` runs, so a daemon's `main.rs` only
//! parses its command line and builds its device:
//!
//! 1. `--print-capabilities`: print the JSON and exit 0 (a daemon's `main`
//!    calls [`capabilities_if_asked`] before it parses its options, so a bad
//!    or missing one cannot fail it); `--check`: exit 0, the options parsed;
//! 2. logging to stderr;
//! 3. `--socket-path` or `--fd` is required (exit 2 without);
//! 4. SIGUSR1 blocked, before any thread exists;
//! 5. the daemon's `build` opens what it serves and returns the device and
//!    its sandbox [`Policy`] (exit 2 for a bad configuration, 1 for what
//!    cannot be opened);
//! 6. the endpoint (socket and SIGTERM/SIGINT signalfd; a socket-activated
//!    fd 3 when the command line names none), then the sandbox, then
//!    `READY=1` to `NOTIFY_SOCKET` ([`crate::systemd`]);
//!    `--stats-socket` is bound with the endpoint, before the sandbox;
//! 7. a stats thread that logs [`VhostUserDevice::stats`] (and each queue's
//!    counters, [`crate::daemon::QueueCounters`]) on SIGUSR1, and
//!    with `--stats-socket` a thread that serves them and the device's I/O
//!    limits ([`crate::stats_socket`], [`VhostUserDevice::limits_control`]);
//! 8. the serve loop until SIGTERM or SIGINT, then the stats once more (and
//!    the stats socket removed, where the sandbox lets the daemon).
//!
//! Exit statuses, the same for every daemon: [`EXIT_OK`], [`EXIT_FAILURE`],
//! [`EXIT_USAGE`] (also clap's status for a command line it rejects) and
//! [`crate::daemon::EXIT_SIGBUS`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{VhostUserArgs, fail, print_capabilities};
use crate::daemon::{Endpoint, serve_endpoint};
use crate::device::VhostUserDevice;
use crate::logging::init_logging;
use crate::sandbox::{LibraryThreads, Policy, Sandbox, SandboxArgs};
use crate::stats_socket::StatsSocket;
use crate::systemd;

/// Exit status: stopped by SIGTERM or SIGINT (or capabilities printed).
pub const EXIT_OK: u8 = 0;
/// Exit status: something the command line names cannot be opened or set
/// up (image, tap, socket, sandbox), or serving failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: the command line or configuration is wrong in itself; clap
/// exits with it too for an option it rejects.
pub const EXIT_USAGE: u8 = 2;

/// The exit statuses, for each daemon's `--help` (`after_help`).
pub const EXIT_STATUS_HELP: &str = "Exit status: 0 stopped by SIGTERM or SIGINT; 1 something it names cannot be \
opened or set up, or serving failed; 2 the command line is wrong in itself; 75 guest memory was \
truncated under it (SIGBUS).";

/// The options every backend takes: the vhost-user backend program
/// conventions and the sandbox (flatten into the daemon's clap `Args`).
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// `--socket-path`, `--fd`, `--print-capabilities`.
    #[command(flatten)]
    pub vhost_user: VhostUserArgs,
    /// `--sandbox`, `--user`, `--group`.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// `--stats-socket`.
    #[command(flatten)]
    pub stats: StatsArgs,
}

/// Where a daemon serves its counters (flattened into [`BackendArgs`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StatsArgs {
    /// Serve the counters on a Unix socket at PATH: send `stats` for one
    /// JSON line, `metrics` for the Prometheus text format; blk and net
    /// also answer `limits` and change their I/O limits on `limit
    /// NAME=VALUE,...`.
    #[arg(long, value_name = "PATH")]
    pub stats_socket: Option<PathBuf>,
}

/// Who the daemon is, for its log lines and `--print-capabilities`.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// The binary's name (`bulkhead-blk`).
    pub name: &'static str,
    /// The vhost-user device type in the capabilities JSON (`block`).
    pub device_type: &'static str,
    /// Its options listed in the capabilities JSON.
    pub capabilities: &'static [&'static str],
}

/// Why a daemon could not start; each kind has its exit status.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The command line or configuration is wrong in itself ([`EXIT_USAGE`]).
    #[error("{0}")]
    Usage(String),
    /// Something it names cannot be opened or set up ([`EXIT_FAILURE`]).
    #[error("{0}")]
    Failed(String),
}

impl StartError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Usage(_) => EXIT_USAGE,
            StartError::Failed(_) => EXIT_FAILURE,
        }
    }
}

/// What a daemon's `build` returns: the device, ready to serve.
pub struct Backend<D> {
    /// The device.
    pub device: Arc<D>,
    /// What its sandbox allows (the daemon's `policy.rs`).
    pub policy: Policy,
    /// Longest busy-poll of a queue thread (`--poll-max-us`; zero: none).
    pub busy_poll: Duration,
    /// Runs once serving ends (console: restores the terminal).
    pub at_exit: Option<Box<dyn FnOnce()>>,
    /// Threads a library started in `build` (blk: librados for an RBD
    /// image), confined by [`Sandbox::enter_threaded`]; None: `build` left
    /// the process single-threaded.
    pub library_threads: Option<LibraryThreads>,
}

impl<D> Backend<D> {
    /// `device` confined by `policy`, no busy-poll, nothing to do at exit.
    pub fn new(device: Arc<D>, policy: Policy) -> Self {
        Backend {
            device,
            policy,
            busy_poll: Duration::ZERO,
            at_exit: None,
            library_threads: None,
        }
    }
}

/// Prints the capabilities and returns the exit status if
/// `--print-capabilities` is anywhere on the command line; the daemon's
/// `main` calls it before parsing, as the conventions ask other options to
/// be ignored.
pub fn capabilities_if_asked(program: &Program) -> Option<ExitCode> {
    crate::cli::print_capabilities_if_asked(program.device_type, program.capabilities)
}

/// Runs a backend daemon from its parsed options: see the module docs for
/// the steps. `build` runs single-threaded, before the sandbox, and must
/// open every file and socket the daemon will use.
pub fn run<D: VhostUserDevice>(
    program: &Program,
    args: &BackendArgs,
    build: impl FnOnce() -> Result<Backend<D>, StartError>,
) -> ExitCode {
    if args.vhost_user.print_capabilities {
        print_capabilities(program.device_type, program.capabilities);
        return ExitCode::from(EXIT_OK);
    }
    if args.vhost_user.check {
        return ExitCode::from(EXIT_OK);
    }
    // The daemons log at info unless RUST_LOG says otherwise.
    init_logging(program.name, log::LevelFilter::Info);
    // Socket activation: fd 3, unless the command line names a socket.
    let mut vhost_user = args.vhost_user.clone();
    match systemd::listen_fd() {
        Ok(Some(fd)) if vhost_user.socket_path.is_none() && vhost_user.fd.is_none() => {
            vhost_user.fd = Some(fd);
        }
        Ok(_) => {}
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    if let Err(e) = vhost_user.require_socket() {
        log::error!("{e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let sigusr1 = block_sigusr1();
    let backend = match build() {
        Ok(b) => b,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let endpoint = match Endpoint::open(&vhost_user) {
        Ok(e) => e.with_busy_poll(backend.busy_poll),
        Err(e) => return fail(&e),
    };
    // Bound before the sandbox, which forbids socket and bind.
    let stats_socket = match args.stats.stats_socket.as_deref().map(StatsSocket::bind) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return fail(&e),
        None => None,
    };
    // Connected before the sandbox, which forbids socket and connect.
    let notifier = systemd::Notifier::from_env().unwrap_or_else(|e| {
        log::warn!("NOTIFY_SOCKET: {e}; the supervisor will not hear READY=1");
        None
    });
    let entered = match &backend.library_threads {
        Some(lib) => Sandbox::enter_threaded(&args.sandbox, &backend.policy, lib),
        None => Sandbox::enter(&args.sandbox, &backend.policy),
    };
    if let Err(e) = entered {
        return fail(&e);
    }
    // The socket listens and the sandbox holds: frontends may come.
    notify(&notifier, "READY=1");
    #[cfg(feature = "test-hooks")]
    crate::test_hooks::run_from_env();
    let device = backend.device;
    let snapshot: Snapshot = {
        let (d, queues) = (device.clone(), endpoint.queue_counters());
        // Every queue shows (zeros) from the first scrape on, before
        // serving starts and any frontend connects.
        queues.size(device.num_queues());
        Arc::new(move || {
            let mut s = d.stats();
            queues.add_to(&mut s);
            s
        })
    };
    if let Err(e) = sigusr1.and_then(|set| stats_on_sigusr1(set, snapshot.clone())) {
        log::warn!("no stats on SIGUSR1: {e}");
    }
    let mut stats_path = None;
    if let Some(s) = stats_socket {
        let snapshot = snapshot.clone();
        match s.spawn(program.name, move || snapshot(), device.limits_control()) {
            Ok(p) => {
                log::info!("stats on {}", p.display());
                stats_path = Some(p);
            }
            Err(e) => return fail(&e),
        }
    }
    let result = serve_endpoint(endpoint, device.clone());
    notify(&notifier, "STOPPING=1");
    if let Some(f) = backend.at_exit {
        f();
    }
    log_stats(&snapshot);
    // In the sandbox the filesystem is out of reach: the socket stays, and
    // the next start replaces it (as the vhost-user socket).
    if let Some(p) = stats_path
        && !crate::sandbox::is_active()
    {
        let _ = std::fs::remove_file(p);
    }
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => fail(&e),
    }
}

/// Tells a supervisor (systemd, the launcher) `state`, if one listens.
fn notify(notifier: &Option<systemd::Notifier>, state: &str) {
    if let Some(n) = notifier
        && let Err(e) = n.send(state)
    {
        log::warn!("NOTIFY_SOCKET: sending {state}: {e}");
    }
}

/// The device's counters and each queue's, as the stats show them.
type Snapshot = Arc<dyn Fn() -> crate::stats::Stats + Send + Sync>;

/// Logs the counters as one `stats:` line (none if there are none).
fn log_stats(snapshot: &Snapshot) {
    let line = snapshot().line();
    if !line.is_empty() {
        log::info!("stats: {line}");
    }
}

/// Blocks SIGUSR1 in this thread and every thread it creates later; the
/// stats thread takes it with sigwait. Called single-threaded, before the
/// socket exists, so an early SIGUSR1 never kills the daemon.
fn block_sigusr1() -> std::io::Result<libc::sigset_t> {
    // SAFETY: plain signal-mask calls on a zeroed sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(set)
    }
}

/// Logs the counters each time SIGUSR1 (blocked by [`block_sigusr1`]) arrives.
fn stats_on_sigusr1(set: libc::sigset_t, snapshot: Snapshot) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait on a valid set, writing the signal number into `sig`.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    log_stats(&snapshot);
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_configuration_and_a_failed_open_have_their_own_exit_codes() {
        assert_eq!(StartError::Usage("x".into()).exit_code(), EXIT_USAGE);
        assert_eq!(StartError::Failed("x".into()).exit_code(), EXIT_FAILURE);
        // clap's status for a command line it rejects.
        assert_eq!(
            clap::Error::new(clap::error::ErrorKind::UnknownArgument).exit_code(),
            i32::from(EXIT_USAGE)
        );
    }
}
