//! Helpers for the sandbox tests of the real daemons (`tests/tests/sandbox.rs`
//! for `bulkhead-blk`, `tests/tests/sandbox_net_console.rs` for the others):
//! per-thread `/proc` status, daemons with their stderr captured, the
//! `test-hooks` build of a daemon, fds passed at fixed numbers, and the
//! kernel's seccomp audit records.

use std::io::{self, BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::process::ChildGuard;

/// uid and gid of `nobody`.
pub const NOBODY: u32 = 65534;

/// How long a daemon may take to create its socket, or to die when it should.
const TIMEOUT: Duration = Duration::from_secs(20);

/// `/proc/<pid>/task/<tid>/status` of every thread: (tid, thread name, status text).
pub fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let dir = e.path();
        // A thread that ended between the listing and this read (a queue
        // thread stopping as the frontend reconnects) holds nothing: skip it.
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let name = field(&status, "Name").unwrap_or_default();
        let tid = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((tid, name, status));
    }
    out
}

/// The value of `key` in a `/proc` status text, trimmed.
pub fn field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim().to_string())
    })
}

/// `/proc/<pid>/status`; panics, saying why, when it cannot be read (the
/// process is gone, or `/proc` hides it).
pub fn proc_status(pid: u32) -> String {
    let path = format!("/proc/{pid}/status");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        panic!("read {path}: {e} (/proc/{pid} exists: {alive})")
    })
}

/// Asserts the capability sets are all empty.
pub fn assert_no_capabilities(status: &str) {
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            field(status, key).as_deref(),
            Some("0000000000000000"),
            "{key} not empty"
        );
    }
}

/// How many threads are named `vring-*`, and how many of them have stacked
/// one filter more than the main thread.
fn queue_threads_ready(pid: u32) -> (usize, usize) {
    let threads = threads(pid);
    let main_filters: Option<u32> = threads
        .iter()
        .find(|(tid, ..)| *tid == pid.to_string())
        .and_then(|(_, _, s)| field(s, "Seccomp_filters"))
        .and_then(|v| v.parse().ok());
    let named: Vec<&String> = threads
        .iter()
        .filter(|(_, name, _)| name.starts_with("vring-"))
        .map(|(_, _, s)| s)
        .collect();
    let ready = named
        .iter()
        .filter(|s| {
            field(s, "Seccomp_filters").and_then(|v| v.parse::<u32>().ok())
                == main_filters.map(|m| m + 1)
        })
        .count();
    (named.len(), ready)
}

/// Asserts every thread of `pid` is in seccomp filter mode with
/// `no_new_privs`, and that each thread named `vring-*` carries one filter
/// more than the main thread; returns the names of those queue threads.
/// A queue thread names itself and stacks its filter just after it starts:
/// this waits (up to 20 s) until every one named so far has.
pub fn assert_every_thread_confined(pid: u32) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (named, ready) = queue_threads_ready(pid);
        if ready == named || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let threads = threads(pid);
    let main_filters = threads
        .iter()
        .find(|(tid, ..)| *tid == pid.to_string())
        .and_then(|(_, _, s)| field(s, "Seccomp_filters"))
        .and_then(|v| v.parse::<u32>().ok())
        .expect("main thread status");
    let mut workers = Vec::new();
    for (tid, name, status) in &threads {
        assert_eq!(
            field(status, "Seccomp").as_deref(),
            Some("2"),
            "thread {tid} ({name}) is not in seccomp filter mode"
        );
        assert_eq!(
            field(status, "NoNewPrivs").as_deref(),
            Some("1"),
            "thread {tid} ({name}) lacks no_new_privs"
        );
        if name.starts_with("vring-") {
            let filters: Option<u32> =
                field(status, "Seccomp_filters").and_then(|v| v.parse().ok());
            assert_eq!(
                filters,
                Some(main_filters + 1),
                "queue thread {name} did not stack its own filter"
            );
            workers.push(name.clone());
        }
    }
    workers
}

/// Waits (up to 20 s) until `pid` has `expected` queue threads (`vring-*`),
/// each with its own filter stacked, then checks every thread as
/// [`assert_every_thread_confined`] does and returns the queue threads'
/// names. A queue thread takes its name and installs its filter itself,
/// shortly after the message that starts its queue was answered.
pub fn confined_workers(pid: u32, expected: usize) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (_, ready) = queue_threads_ready(pid);
        if ready == expected || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_every_thread_confined(pid)
}

/// Asserts `pid` runs as `nobody` (uid, gid, no supplementary groups) on
/// every thread, each in seccomp filter mode, with no capability.
pub fn assert_nobody_without_capabilities(pid: u32) {
    let status = proc_status(pid);
    let ids = format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}");
    assert_eq!(field(&status, "Uid").as_deref(), Some(ids.as_str()));
    assert_eq!(field(&status, "Gid").as_deref(), Some(ids.as_str()));
    assert_eq!(field(&status, "Groups").as_deref(), Some(""));
    assert_no_capabilities(&status);
    for (tid, name, status) in threads(pid) {
        assert_eq!(
            field(&status, "Uid").as_deref(),
            Some(ids.as_str()),
            "thread {tid} ({name})"
        );
        assert_eq!(
            field(&status, "CapEff").as_deref(),
            Some("0000000000000000"),
            "thread {tid} ({name})"
        );
        assert_eq!(
            field(&status, "Seccomp").as_deref(),
            Some("2"),
            "thread {tid} ({name})"
        );
    }
}

/// A daemon's stderr, collected by a thread as it is written.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<String>>);

impl Log {
    /// Everything written so far.
    pub fn text(&self) -> String {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits up to `timeout` for `needle` to appear; returns whether it did.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.text().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A daemon whose stderr is captured into a [`Log`] (and echoed for the harness); killed on drop.
pub struct Logged {
    /// The process.
    pub guard: ChildGuard,
    /// Its stderr.
    pub log: Log,
}

impl Logged {
    /// Spawns `cmd` (named `name` in messages) with stderr captured.
    pub fn spawn(name: &str, mut cmd: Command) -> io::Result<Self> {
        cmd.stderr(Stdio::piped());
        let mut guard = ChildGuard::spawn_quiet(name, &mut cmd)?;
        let log = Log::default();
        if let Some(err) = guard.child_mut().stderr.take() {
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("{line}");
                    if let Ok(mut s) = sink.0.lock() {
                        s.push_str(&line);
                        s.push('\n');
                    }
                }
            });
        }
        Ok(Logged { guard, log })
    }

    /// Spawns `cmd` with stderr captured and waits until `socket` exists; panics if it dies first.
    pub fn start(name: &str, cmd: Command, socket: &Path) -> Self {
        let mut d = Self::spawn(name, cmd).expect("spawn the daemon");
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{name}: no socket: {}",
                d.log.text()
            );
            assert!(d.is_running(), "{name} exited: {}", d.log.text());
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.guard.try_wait(), Ok(None))
    }

    /// Waits for the process to exit (it must, within 20 s); returns the signal that killed it.
    pub fn killed_by(&mut self) -> Option<i32> {
        let st = self
            .guard
            .wait_timeout(TIMEOUT)
            .expect("wait for the daemon")
            .unwrap_or_else(|| panic!("daemon still running: {}", self.log.text()));
        st.signal()
    }
}

/// A daemon built with `--features test-hooks` into `target/hooked` (its
/// own target directory: the build lock of the `cargo test` running us is
/// not needed, and the normal binary stays hook-free), or
/// `$BULKHEAD_BIN_<PACKAGE>_HOOKED` (e.g. `BULKHEAD_BIN_BULKHEAD_NET_HOOKED`).
pub fn hooked_binary(package: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let var = format!(
        "BULKHEAD_BIN_{}_HOOKED",
        package.to_uppercase().replace('-', "_")
    );
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(name, _)| name == package) {
        return p.clone();
    }
    // target/<profile>/deps/TEST-HASH -> target/
    let exe = std::env::current_exe().expect("current_exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binary under target/<profile>/deps")
        .to_path_buf();
    let target_dir = target.join("hooked");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(&workspace)
        .args(["build", "-p", package, "--features", "test-hooks"])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .unwrap_or_else(|e| panic!("run cargo to build the hooked {package}: {e}"));
    assert!(st.success(), "building the hooked {package} failed");
    let bin = target_dir.join("debug").join(package);
    built.push((package.to_string(), bin.clone()));
    bin
}

/// Whether the binary at `path` was built with the `test-hooks` feature.
pub fn has_test_hooks(path: &Path) -> bool {
    let bin = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let needle = b"BULKHEAD_TEST_HOOK";
    bin.windows(needle.len()).any(|w| w == needle)
}

pub use crate::process::pass_fds;

/// Whether the kernel log holds an audit record of type 1326 (SECCOMP) for
/// `pid` and `syscall`; `None` when dmesg cannot be read.
pub fn seccomp_logged(pid: u32, syscall: libc::c_long) -> Option<bool> {
    let out = Command::new("dmesg").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = format!(" pid={pid} ");
    let nr = format!(" syscall={syscall} ");
    Some(
        text.lines()
            .any(|l| l.contains("type=1326") && l.contains(&pid) && l.contains(&nr)),
    )
}

/// Asserts the kernel logged a seccomp audit record for `syscall` from a
/// daemon that `attempt` starts (and has make that call under `--sandbox
/// log`). The kernel writes these records asynchronously and prints at most
/// 10 audit lines per 5 s, shared with everything else on the host, so a
/// record can be dropped: each attempt waits 6 s (past the rate-limit
/// window) and a dropped record gets two more attempts. Where dmesg cannot
/// be read, skips that check ([`crate::skip::skip`]).
pub fn assert_seccomp_logged(syscall: libc::c_long, mut attempt: impl FnMut() -> Logged) {
    const ATTEMPTS: usize = 3;
    for n in 1..=ATTEMPTS {
        let d = attempt();
        let deadline = Instant::now() + Duration::from_secs(6);
        loop {
            match seccomp_logged(d.pid(), syscall) {
                None => {
                    // libtest names the test's thread after the test.
                    let test = std::thread::current().name().unwrap_or("?").to_string();
                    crate::skip::skip(
                        &format!("{test} (the kernel log record)"),
                        crate::skip::SkipReason::Unsupported("dmesg is unreadable".into()),
                    );
                    return;
                }
                Some(true) => return,
                Some(false) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Some(false) => break,
            }
        }
        eprintln!(
            "attempt {n}: no SECCOMP audit record for pid {}, syscall {syscall} (rate-limited?)",
            d.pid()
        );
    }
    panic!("no SECCOMP audit record for syscall {syscall} in dmesg after {ATTEMPTS} attempts");
}
