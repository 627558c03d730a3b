//! Starting and supervising the processes of one VM: each backend in its
//! own process group, its log lines prefixed with its id; the frontend once
//! every backend socket exists; a crashed backend restarted with bounded
//! exponential backoff (the frontend reconnects); on SIGTERM, SIGINT or
//! SIGHUP, or when the frontend exits, everything stopped and every socket
//! and pid file removed.

use bulkhead_common::cli::error_chain;
use bulkhead_common::logging;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::config::{BackendSpec, Config, FrontendKind, Preopen};
use crate::frontend::{self, Frontend};

/// How long a backend may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process may take to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The first fd number a backend inherits a preopened file at.
const FIRST_PASSED_FD: RawFd = 10;
/// The supervision loop's period.
const TICK: Duration = Duration::from_millis(50);

/// The signal that asked the launcher to stop (0: none yet).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Errors that stop the launcher.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// An OS call failed; the string says what for.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// A binary was found neither next to `bulkhead` nor in PATH.
    #[error("Cannot find {0} next to the bulkhead binary or in PATH")]
    NoBinary(String),
    /// A backend did not come up.
    #[error("{0}")]
    Backend(String),
}

/// Finds `name` next to the running binary, then in PATH.
pub fn find_binary(name: &str) -> Result<PathBuf, LaunchError> {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(LaunchError::NoBinary(name.into()))
}

fn say(msg: std::fmt::Arguments<'_>) {
    eprintln!("[bulkhead] {msg}");
}

/// Copies `r` line by line to stdout or stderr, each line prefixed `[id] `.
/// When stderr is the journal, a line a Bulkhead child logged keeps its
/// level as the entry's priority (`<4>[blk0] bulkhead-blk[42]: WARN ...`;
/// the child's own stderr is this pipe, so its lines are plain).
fn prefix_lines(id: String, r: impl Read + Send + 'static, to_stderr: bool) {
    let journal = to_stderr && logging::Sink::current() == logging::Sink::Journal;
    let _ = std::thread::Builder::new()
        .name(format!("log-{id}"))
        .spawn(move || {
            let mut r = BufReader::new(r);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end_matches(['\n', '\r']);
                        let level = journal
                            .then(|| logging::level_of_plain_line(text))
                            .flatten();
                        if let Some(level) = level {
                            eprintln!("<{}>[{id}] {text}", logging::priority(level));
                        } else if to_stderr {
                            eprintln!("[{id}] {text}");
                        } else {
                            println!("[{id}] {text}");
                        }
                    }
                }
            }
        });
}

/// Spawns `program args` as `id`: own process group (a terminal's Ctrl-C
/// reaches only the launcher, which stops things in order), killed if the
/// launcher dies, output prefixed.
fn spawn(id: &str, program: &Path, args: &[String], stdin: Stdio) -> Result<Child, LaunchError> {
    spawn_with(id, program, args, stdin, None, Vec::new())
}

/// As [`spawn`], with `NOTIFY_SOCKET` set to `notify` when given, and
/// `fds` inherited as fds [`FIRST_PASSED_FD`], +1, ... (closed here once
/// the child has them).
fn spawn_with(
    id: &str,
    program: &Path,
    args: &[String],
    stdin: Stdio,
    notify: Option<&Path>,
    fds: Vec<OwnedFd>,
) -> Result<Child, LaunchError> {
    let mut cmd = Command::new(program);
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", n);
    }
    cmd.args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Above every target number, so no dup2 below overwrites a source.
    let above = FIRST_PASSED_FD + RawFd::try_from(fds.len()).unwrap_or(RawFd::MAX / 2);
    let sources = fds
        .iter()
        .map(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC on an fd this function owns.
            let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) };
            if raw < 0 {
                return Err(LaunchError::Io(
                    "Cannot duplicate a file for the backend".into(),
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: fcntl just returned this new fd, owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        })
        .collect::<Result<Vec<OwnedFd>, LaunchError>>()?;
    drop(fds);
    let raw: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: setpgid, prctl and dup2 are async-signal-safe and touch no
    // memory of the parent; `raw` is only read.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (target, &src) in (FIRST_PASSED_FD..).zip(&raw) {
                // dup2 leaves the new fd without FD_CLOEXEC: inherited.
                if libc::dup2(src, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| LaunchError::Io(format!("Cannot start {}", program.display()), e))?;
    drop(sources);
    if let Some(out) = child.stdout.take() {
        prefix_lines(id.into(), out, false);
    }
    if let Some(err) = child.stderr.take() {
        prefix_lines(id.into(), err, true);
    }
    Ok(child)
}

fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => st.to_string(),
    }
}

/// Sends `sig` to `child` if it still runs.
fn signal(child: &mut Child, sig: i32) {
    if matches!(child.try_wait(), Ok(None))
        && let Ok(pid) = libc::pid_t::try_from(child.id())
    {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe { libc::kill(pid, sig) };
    }
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; reaps the child.
fn stop(id: &str, child: &mut Child) {
    signal(child, libc::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                say(format_args!("{id} ignored SIGTERM; killing it"));
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A backend's command line. A restarted bulkhead-blk serves the image as
/// raw without probing it: the first start found it raw, and since then the
/// guest may have written another format's header to its first sector (a
/// `luksFormat` of the whole disk), which would make every restart fail.
fn backend_args(spec: &BackendSpec, restart: bool) -> Vec<String> {
    let mut args = vec![
        "--socket-path".to_string(),
        spec.socket.display().to_string(),
    ];
    args.extend(spec.args.iter().cloned());
    if restart
        && spec.kind == crate::config::Kind::Blk
        && !spec.args.iter().any(|a| a == "--format")
        // An RBD image has no format probe (bulkhead-blk refuses --format).
        && !spec
            .args
            .windows(2)
            .any(|w| w[0] == "--image" && crate::config::is_rbd_image(Path::new(&w[1])))
    {
        args.extend(["--format".to_string(), "raw".to_string()]);
    }
    args
}

/// Opens what `preopen` names, as the backend's user could not: the image
/// (read-only or read-write, O_DIRECT if asked), or the tap's queues.
fn open_preopened(preopen: &Preopen) -> Result<Vec<OwnedFd>, LaunchError> {
    match preopen {
        Preopen::Image {
            path,
            readonly,
            direct,
        } => {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(!readonly);
            if *direct {
                o.custom_flags(libc::O_DIRECT);
            }
            let file = o.open(path).map_err(|e| {
                LaunchError::Io(
                    format!("Cannot open image {} for its backend", path.display()),
                    e,
                )
            })?;
            Ok(vec![file.into()])
        }
        Preopen::Tap { name, queues } => bulkhead_net::tap::Tap::open_queues(name, *queues)
            .map(|taps| taps.into_iter().map(|t| t.into_fd()).collect())
            .map_err(|e| LaunchError::Io(format!("Cannot open tap {name} for its backend"), e)),
    }
}

/// A throttle group's page: a memfd the daemons seal and map
/// (`common/src/throttle_group.rs`); it lives as long as the launcher.
fn group_memfd(name: &str) -> Result<OwnedFd, LaunchError> {
    let cname = std::ffi::CString::new(format!("bulkhead-throttle-group-{name}"))
        .map_err(|e| LaunchError::Io("Bad throttle group name".into(), std::io::Error::other(e)))?;
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(LaunchError::Io(
            format!("Cannot create throttle group {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: memfd_create just returned this fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `args` with the preopened files' fds in place of their paths: `--image
/// PATH` becomes `--image-fd N`, `--tap NAME` one `--tap-fd N` per fd.
fn fd_args(args: &[String], preopen: &Preopen, fds: usize) -> Vec<String> {
    let (flag, fd_flag) = match preopen {
        Preopen::Image { .. } => ("--image", "--image-fd"),
        Preopen::Tap { .. } => ("--tap", "--tap-fd"),
    };
    let mut out = Vec::with_capacity(args.len() + fds);
    let mut it = args.iter();
    let mut replaced = false;
    while let Some(a) = it.next() {
        if replaced || (a != flag && !a.starts_with(&format!("{flag}="))) {
            out.push(a.clone());
            continue;
        }
        if a == flag {
            it.next();
        }
        for fd in (FIRST_PASSED_FD..).take(fds) {
            out.extend([fd_flag.to_string(), fd.to_string()]);
        }
        replaced = true;
    }
    out
}

/// How the backends run, for the "up" line: whom they switched to and
/// what the launcher opened for them; empty when they run as the launcher.
fn privileges<'a>(specs: impl Iterator<Item = &'a BackendSpec> + Clone) -> String {
    let users: Vec<&str> = specs
        .clone()
        .filter_map(|b| {
            let at = b.args.iter().position(|a| a == "--user")?;
            b.args.get(at + 1).map(String::as_str)
        })
        .collect();
    let Some(first) = users.first() else {
        return String::new();
    };
    let who = if users.iter().all(|u| u == first) {
        format!("as user {first}")
    } else {
        "as the users their --user names".to_string()
    };
    let opened = specs.filter(|b| b.preopen.is_some()).count();
    if opened == 0 {
        format!(", {who}")
    } else {
        format!(", {who}; their images and taps opened here and passed as fds")
    }
}

struct Backend {
    spec: BackendSpec,
    program: PathBuf,
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    delay: Duration,
    next_start: Option<Instant>,
    /// Where the backend says `READY=1` (its `NOTIFY_SOCKET`).
    notify: Option<UnixDatagram>,
}

/// One VM's processes.
pub struct Supervisor {
    cfg: Config,
    runtime_dir: PathBuf,
    created_dir: bool,
    backends: Vec<Backend>,
    frontend: Option<(String, Child)>,
    /// Each throttle group's memfd, by name: created once, so the group's
    /// buckets outlive any one member's restart.
    groups: BTreeMap<String, OwnedFd>,
}

fn default_runtime_dir(name: &str) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("bulkhead").join(name),
        // SAFETY: getuid has no side effects.
        _ => PathBuf::from(format!("/tmp/bulkhead-{}", unsafe { libc::getuid() })).join(name),
    }
}

impl Supervisor {
    /// Whether a backend talks to the network (a blk image on Ceph RBD), so
    /// the launcher's Landlock domain must leave TCP to its children.
    pub fn needs_network(&self) -> bool {
        self.cfg.needs_network()
    }

    /// Prepares the runtime directory and finds every binary; starts nothing.
    pub fn new(cfg: Config) -> Result<Self, LaunchError> {
        let runtime_dir = cfg
            .runtime_dir
            .clone()
            .unwrap_or_else(|| default_runtime_dir(&cfg.name));
        let created_dir = !runtime_dir.exists();
        if created_dir {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&runtime_dir)
                .map_err(|e| {
                    LaunchError::Io(format!("Cannot create {}", runtime_dir.display()), e)
                })?;
        }
        let mut backends = Vec::new();
        let mut groups = BTreeMap::new();
        for spec in cfg.backends(&runtime_dir) {
            if let Some(g) = &spec.throttle_group
                && !groups.contains_key(g)
            {
                groups.insert(g.clone(), group_memfd(g)?);
            }
            backends.push(Backend {
                program: find_binary(spec.kind.binary())?,
                spec,
                child: None,
                started: Instant::now(),
                restarts: 0,
                delay: Duration::from_millis(cfg.restart.initial_delay_ms),
                next_start: None,
                notify: None,
            });
        }
        Ok(Supervisor {
            cfg,
            runtime_dir,
            created_dir,
            backends,
            frontend: None,
            groups,
        })
    }

    /// The QEMU binary: the configured path, or found as `find_binary` does.
    fn qemu_program(&self) -> Result<PathBuf, LaunchError> {
        let bin = &self.cfg.qemu.binary;
        if bin.components().count() > 1 {
            Ok(bin.clone())
        } else {
            find_binary(&bin.display().to_string())
        }
    }

    /// Every program this launcher may start: the backends, and the
    /// frontends its config can choose (`bulkhead-vmm` also runs `probe`).
    /// The launcher's sandbox lets it execute these only.
    pub fn programs(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for b in &self.backends {
            if !out.contains(&b.program) {
                out.push(b.program.clone());
            }
        }
        let kind = self.cfg.frontend;
        if kind != FrontendKind::None
            && let Ok(vmm) = find_binary("bulkhead-vmm")
        {
            out.push(vmm);
        }
        if matches!(kind, FrontendKind::Qemu | FrontendKind::Auto)
            && let Ok(qemu) = self.qemu_program()
        {
            out.push(qemu);
        }
        out
    }

    /// The runtime directory (sockets, pid files).
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    fn pid_file(&self, id: &str) -> PathBuf {
        self.runtime_dir.join(format!("{id}.pid"))
    }

    fn start_backend(&mut self, i: usize) -> Result<(), LaunchError> {
        let b = &self.backends[i];
        let mut args = backend_args(&b.spec, b.restarts > 0);
        let mut fds = Vec::new();
        if let Some(p) = &b.spec.preopen {
            fds = open_preopened(p)?;
            args = fd_args(&args, p, fds.len());
        }
        if let Some(fd) = b
            .spec
            .throttle_group
            .as_ref()
            .and_then(|g| self.groups.get(g))
        {
            let n = FIRST_PASSED_FD + RawFd::try_from(fds.len()).unwrap_or(RawFd::MAX / 2);
            fds.push(
                fd.try_clone()
                    .map_err(|e| LaunchError::Io("Cannot duplicate a throttle group".into(), e))?,
            );
            args.extend(["--throttle-group-fd".into(), n.to_string()]);
        }
        // A fresh readiness socket per start: nothing stale is read as READY.
        let notify_path = self.notify_path(&b.spec.id);
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)
            .map_err(|e| LaunchError::Io(format!("Cannot bind {}", notify_path.display()), e))?;
        let child = spawn_with(
            &b.spec.id,
            &b.program,
            &args,
            Stdio::null(),
            Some(&notify_path),
            fds,
        )?;
        let pid = child.id();
        let pid_file = self.pid_file(&b.spec.id);
        let _ = std::fs::write(pid_file, format!("{pid}\n"));
        let b = &mut self.backends[i];
        b.child = Some(child);
        b.started = Instant::now();
        b.next_start = None;
        b.notify = Some(notify);
        Ok(())
    }

    /// The backend's readiness socket, beside its vhost-user socket (so the
    /// cleanup at exit takes it too).
    fn notify_path(&self, id: &str) -> PathBuf {
        self.runtime_dir.join(format!("{id}.sock.notify"))
    }

    /// Waits for the backend's `READY=1` (sent once its socket listens and
    /// its sandbox holds), instead of probing the socket with a connection
    /// the daemon would log as a frontend that came and went.
    fn wait_socket(&mut self, i: usize) -> Result<(), LaunchError> {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        let b = &mut self.backends[i];
        let mut buf = [0u8; 4096];
        loop {
            if let Some(n) = &b.notify {
                let _ = n.set_read_timeout(Some(Duration::from_millis(10)));
                if let Ok(len) = n.recv(&mut buf)
                    && String::from_utf8_lossy(&buf[..len])
                        .lines()
                        .any(|l| l == "READY=1")
                {
                    return Ok(());
                }
            }
            if let Some(c) = b.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                return Err(LaunchError::Backend(format!(
                    "{} exited before creating {} ({})",
                    b.spec.id,
                    b.spec.socket.display(),
                    describe(st)
                )));
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::Backend(format!(
                    "{} did not say READY=1 (serving {}) within {SOCKET_TIMEOUT:?}",
                    b.spec.id,
                    b.spec.socket.display()
                )));
            }
        }
    }

    fn choose_frontend(&self) -> Result<Option<Frontend>, LaunchError> {
        let api_socket = self.runtime_dir.join("api.sock");
        let probe = || -> Result<(), String> {
            let vmm = find_binary("bulkhead-vmm").map_err(|e| e.to_string())?;
            let out = Command::new(vmm)
                .arg("probe")
                .env("RUST_LOG", "off")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run bulkhead-vmm probe: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stdout).trim().to_string())
            }
        };
        let qemu_accel =
            |probe_result: Option<&Result<(), String>>| match self.cfg.qemu.accel.as_str() {
                "auto" => match probe_result {
                    Some(Ok(())) => "kvm".to_string(),
                    Some(Err(_)) => "tcg".to_string(),
                    None => {
                        if probe().is_ok() {
                            "kvm".into()
                        } else {
                            "tcg".into()
                        }
                    }
                },
                other => other.to_string(),
            };
        Ok(match self.cfg.frontend {
            FrontendKind::None => None,
            FrontendKind::BulkheadVmm => Some(Frontend::BulkheadVmm { api_socket }),
            FrontendKind::Qemu => Some(Frontend::Qemu {
                accel: qemu_accel(None),
            }),
            FrontendKind::Auto => {
                let r = probe();
                match &r {
                    Ok(()) => Some(Frontend::BulkheadVmm { api_socket }),
                    Err(why) => {
                        say(format_args!(
                            "KVM cannot run a Linux guest here ({why}); using QEMU as the frontend"
                        ));
                        Some(Frontend::Qemu {
                            accel: qemu_accel(Some(&r)),
                        })
                    }
                }
            }
        })
    }

    fn start_frontend(&mut self, f: &Frontend) -> Result<(), LaunchError> {
        let specs: Vec<BackendSpec> = self.backends.iter().map(|b| b.spec.clone()).collect();
        let (id, program, args) = match f {
            Frontend::BulkheadVmm { api_socket } => (
                "vmm",
                find_binary("bulkhead-vmm")?,
                frontend::vmm_args(&self.cfg, &specs, api_socket),
            ),
            Frontend::Qemu { accel } => {
                let (args, skipped) = frontend::qemu_args(&self.cfg, &specs, accel);
                for s in skipped {
                    say(format_args!(
                        "{s}: QEMU cannot attach a vhost-user console; the backend runs but the guest does not see it"
                    ));
                }
                ("qemu", self.qemu_program()?, args)
            }
        };
        say(format_args!(
            "starting {} {}",
            program.display(),
            args.join(" ")
        ));
        let child = spawn(id, &program, &args, Stdio::inherit())?;
        let _ = std::fs::write(self.pid_file("frontend"), format!("{}\n", child.id()));
        self.frontend = Some((id.to_string(), child));
        Ok(())
    }

    /// Starts everything and supervises until a stop signal or the
    /// frontend's exit; then stops everything and cleans up. Returns the
    /// launcher's exit status.
    pub fn run(mut self) -> u8 {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: installs a handler that only stores to an atomic.
            unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        }
        let code = match self.start_all() {
            Ok(()) => self.supervise(),
            Err(e) => {
                say(format_args!("{}", error_chain(&e)));
                1
            }
        };
        self.shutdown();
        code
    }

    fn start_all(&mut self) -> Result<(), LaunchError> {
        for i in 0..self.backends.len() {
            self.start_backend(i)?;
        }
        for i in 0..self.backends.len() {
            self.wait_socket(i)?;
        }
        say(format_args!(
            "{} backend(s) up in {}{}",
            self.backends.len(),
            self.runtime_dir.display(),
            privileges(self.backends.iter().map(|b| &b.spec))
        ));
        if let Some(f) = self.choose_frontend()? {
            self.start_frontend(&f)?;
        }
        Ok(())
    }

    fn supervise(&mut self) -> u8 {
        let policy = self.cfg.restart.clone();
        let max_delay = Duration::from_millis(policy.max_delay_ms);
        let initial = Duration::from_millis(policy.initial_delay_ms);
        let reset_after = Duration::from_secs(policy.reset_after_s);
        loop {
            let sig = STOP_SIGNAL.load(Ordering::SeqCst);
            if sig != 0 {
                say(format_args!("signal {sig}: stopping"));
                return 0;
            }
            if let Some((id, child)) = self.frontend.as_mut()
                && let Ok(Some(st)) = child.try_wait()
            {
                say(format_args!("{id} exited ({}); stopping", describe(st)));
                return st.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1);
            }
            let now = Instant::now();
            for i in 0..self.backends.len() {
                let b = &mut self.backends[i];
                if let Some(c) = b.child.as_mut()
                    && let Ok(Some(st)) = c.try_wait()
                {
                    b.child = None;
                    if b.started.elapsed() >= reset_after {
                        b.restarts = 0;
                        b.delay = initial;
                    }
                    if b.restarts >= policy.max_restarts {
                        say(format_args!(
                            "{} exited ({}); restarted {} time(s) already, giving up",
                            b.spec.id,
                            describe(st),
                            b.restarts
                        ));
                        return 1;
                    }
                    say(format_args!(
                        "{} exited ({}); restarting in {:?}",
                        b.spec.id,
                        describe(st),
                        b.delay
                    ));
                    b.next_start = Some(now + b.delay);
                    b.restarts += 1;
                    b.delay = (b.delay * 2).min(max_delay);
                }
                if b.next_start.is_some_and(|t| t <= now) {
                    let id = b.spec.id.clone();
                    match self.start_backend(i) {
                        Ok(()) => say(format_args!("{id} restarted")),
                        Err(e) => {
                            say(format_args!("{}", error_chain(&e)));
                            return 1;
                        }
                    }
                }
            }
            std::thread::sleep(TICK);
        }
    }

    /// Stops the frontend, then the backends; removes sockets, pid files
    /// and the runtime directory if the launcher created it.
    fn shutdown(&mut self) {
        if let Some((id, mut child)) = self.frontend.take() {
            stop(&id, &mut child);
        }
        for b in &mut self.backends {
            if let Some(mut c) = b.child.take() {
                stop(&b.spec.id, &mut c);
            }
        }
        let mut names: Vec<String> = vec!["api.sock".into(), "frontend.pid".into()];
        for b in &self.backends {
            names.push(format!("{}.pid", b.spec.id));
        }
        let prefixes: Vec<String> = self
            .backends
            .iter()
            .map(|b| format!("{}.sock", b.spec.id))
            .collect();
        if let Ok(rd) = std::fs::read_dir(&self.runtime_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if names.contains(&name) || prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.runtime_dir);
        }
        say(format_args!("stopped"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_up_line_says_whom_the_backends_run_as() {
        let cfg = Config::parse(
            "frontend = \"none\"\nuser = \"vmuser\"\n[[blk]]\nimage = \"/d.img\"\n[[console]]\n",
        )
        .unwrap();
        let mut specs = cfg.backends(Path::new("/run/x"));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert_eq!(privileges(specs.iter()), "");
            return;
        }
        assert_eq!(
            privileges(specs.iter()),
            ", as user vmuser; their images and taps opened here and passed as fds"
        );
        specs[0].preopen = None;
        assert_eq!(privileges(specs.iter()), ", as user vmuser");
    }

    #[test]
    fn a_preopened_file_replaces_its_path_by_fds() {
        let args: Vec<String> = ["--tap", "t0", "--queue-pairs", "2", "--mac", "m"]
            .map(String::from)
            .to_vec();
        let tap = Preopen::Tap {
            name: "t0".into(),
            queues: 2,
        };
        assert_eq!(
            fd_args(&args, &tap, 2),
            [
                "--tap-fd",
                "10",
                "--tap-fd",
                "11",
                "--queue-pairs",
                "2",
                "--mac",
                "m"
            ]
        );
        let image = Preopen::Image {
            path: "/d.img".into(),
            readonly: true,
            direct: false,
        };
        let args: Vec<String> = ["--socket-path", "/s", "--image=/d.img", "--readonly"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            fd_args(&args, &image, 1),
            ["--socket-path", "/s", "--image-fd", "10", "--readonly"]
        );
    }

    #[test]
    fn a_preopened_image_that_cannot_be_opened_is_named() {
        let e = open_preopened(&Preopen::Image {
            path: "/nonexistent/vm.img".into(),
            readonly: false,
            direct: false,
        })
        .unwrap_err();
        assert!(error_chain(&e).contains("/nonexistent/vm.img"), "{e}");
    }

    #[test]
    fn passed_fds_reach_the_child_at_their_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        let fd: OwnedFd = std::fs::File::open(&path).unwrap().into();
        let child = spawn_with(
            "t",
            Path::new("/bin/sh"),
            &["-c".into(), "readlink /proc/self/fd/10".into()],
            Stdio::null(),
            None,
            vec![fd],
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
    }

    #[test]
    fn a_restarted_blk_backend_skips_the_format_probe() {
        let cfg = Config::parse(
            "frontend = \"none\"\nuser = \"root\"\n[[blk]]\nimage = \"/d.img\"\n[[console]]\n",
        )
        .unwrap();
        let specs = cfg.backends(Path::new("/run/x"));
        let first = backend_args(&specs[0], false);
        assert_eq!(
            first,
            [
                "--socket-path",
                "/run/x/blk0.sock",
                "--image",
                "/d.img",
                "--stats-socket",
                "/run/x/blk0.sock.stats"
            ]
        );
        let again = backend_args(&specs[0], true);
        assert_eq!(again[6..], ["--format", "raw"]);
        assert!(!backend_args(&specs[1], true).contains(&"--format".to_string()));
        let rbd =
            Config::parse("frontend = \"none\"\nuser = \"root\"\n[[blk]]\nimage = \"rbd:vms/d\"\n")
                .unwrap();
        let specs = rbd.backends(Path::new("/run/x"));
        assert!(!backend_args(&specs[0], true).contains(&"--format".to_string()));
    }
}
