//! The sandbox of the real `bulkhead-blk` (issue 7, least privilege): seccomp
//! and `no_new_privs` on every thread, SIGSYS for a forbidden call, Landlock
//! for paths, an unprivileged uid without capabilities, fd-only operation.
//!
//! Run `cargo build -p bulkhead-blk` first (like the other daemon tests).
//! The tests that make the daemon misbehave need a build with the
//! `test-hooks` feature; they build one into `target/hooked` themselves
//! (`cargo build -p bulkhead-blk --features test-hooks --target-dir
//! target/hooked`), or use `$BULKHEAD_BIN_BULKHEAD_BLK_HOOKED`. Normal builds
//! never contain the hooks. These tests run as root (like CI).

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_tests::blk::{BlkDriver, SECTOR_SIZE, VIRTIO_BLK_S_OK};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::Options;
use bulkhead_tests::process::{ChildGuard, workspace_binary};

const IMAGE_SIZE: u64 = 16 << 20;
const NOBODY: u32 = 65534;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(13).wrapping_add((i % 253) as u8))
        .collect()
}

/// Writes and reads back on every queue, checking the image file too.
fn serve_io(socket: &Path, scratch: &Scratch, queues: usize) {
    let mut blk = BlkDriver::connect(socket, &Options::default().queues(queues))
        .expect("vhost-user bring-up");
    for q in 0..queues {
        let sector = 64 * q as u64;
        let data = pattern(q as u8 + 1, 8192);
        assert_eq!(blk.write(q, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
        assert_eq!(blk.flush(q).unwrap(), VIRTIO_BLK_S_OK);
        assert_eq!(
            blk.read(q, sector, 8192).unwrap(),
            (VIRTIO_BLK_S_OK, data.clone())
        );
        let on_disk = scratch.read_image(sector * SECTOR_SIZE, 8192).unwrap();
        assert!(on_disk == data, "image differs on queue {q}");
    }
}

/// `/proc/<pid>/task/<tid>/status` of every thread: (tid, thread name, status text).
fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = e.unwrap().path();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let name = field(&status, "Name").unwrap_or_default();
        let tid = dir.file_name().unwrap().to_string_lossy().into_owned();
        out.push((tid, name, status));
    }
    out
}

fn field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim().to_string())
    })
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

/// Asserts the capability sets are all empty.
fn assert_no_capabilities(status: &str) {
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            field(status, key).as_deref(),
            Some("0000000000000000"),
            "{key} not empty"
        );
    }
}

#[test]
fn every_thread_of_a_serving_daemon_has_a_seccomp_filter_and_no_new_privs() {
    let d = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &["--num-queues", "2"])
        .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)");
    // Keep the connection up so both queue threads run while we look.
    let mut blk = BlkDriver::connect(d.socket(), &Options::default().queues(2)).unwrap();
    for q in 0..2 {
        assert_eq!(blk.write(q, 8, &pattern(9, 4096)).unwrap(), VIRTIO_BLK_S_OK);
    }
    let threads = threads(d.pid());
    let main_filters = threads
        .iter()
        .find(|(tid, ..)| *tid == d.pid().to_string())
        .and_then(|(_, _, s)| field(s, "Seccomp_filters"))
        .and_then(|v| v.parse::<u32>().ok())
        .expect("main thread status");
    let mut workers = 0;
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
            workers += 1;
            let filters: u32 = field(status, "Seccomp_filters").unwrap().parse().unwrap();
            assert_eq!(
                filters,
                main_filters + 1,
                "queue thread {name} did not stack its own filter"
            );
        }
    }
    assert_eq!(workers, 2, "expected two queue threads: {threads:?}");
    assert_no_capabilities(&proc_status(d.pid()));
}

#[test]
fn under_user_nobody_the_daemon_serves_io_holding_no_capability() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    std::os::unix::fs::chown(scratch.image(), Some(NOBODY), Some(NOBODY)).unwrap();
    let d = Daemon::blk(scratch, &["--num-queues", "2", "--user", "nobody"]).unwrap();
    // The socket exists before the daemon confines itself; it serves only after.
    serve_io(d.socket(), d.scratch(), 2);
    let status = proc_status(d.pid());
    let uid_line = format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}");
    assert_eq!(field(&status, "Uid").as_deref(), Some(uid_line.as_str()));
    assert_eq!(field(&status, "Gid").as_deref(), Some(uid_line.as_str()));
    assert_eq!(field(&status, "Groups").as_deref(), Some(""));
    assert_no_capabilities(&status);
    for (tid, name, status) in threads(d.pid()) {
        assert_eq!(field(&status, "Uid").as_deref(), Some(uid_line.as_str()));
        assert_eq!(
            field(&status, "CapEff").as_deref(),
            Some("0000000000000000")
        );
        assert_eq!(
            field(&status, "Seccomp").as_deref(),
            Some("2"),
            "thread {tid} ({name})"
        );
    }
}

#[test]
fn a_daemon_given_only_fds_serves_with_an_empty_landlock_ruleset() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let listener = UnixListener::bind(scratch.socket()).unwrap();
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(scratch.image())
        .unwrap();
    let (lfd, ifd) = (listener.as_raw_fd(), image.as_raw_fd());
    let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
    cmd.args(["--fd", "100", "--image-fd", "101"]);
    // SAFETY: only dup2 between fork and exec; the targets are left inheritable.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(lfd, 100) < 0 || libc::dup2(ifd, 101) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut d = Daemon::start("bulkhead-blk", cmd, scratch).unwrap();
    drop((listener, image));
    serve_io(d.socket(), d.scratch(), 1);
    assert!(d.is_running());
    let status = proc_status(d.pid());
    assert_eq!(field(&status, "Seccomp").as_deref(), Some("2"));
    assert_no_capabilities(&status);
}

#[test]
fn sandbox_off_warns_and_installs_no_filter() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--image")
        .arg(scratch.image())
        .args(["--sandbox", "off"]);
    let d = start_logged(cmd, scratch);
    assert!(d.log.wait_for("--sandbox off", Duration::from_secs(10)));
    serve_io(d.scratch.socket(), &d.scratch, 1);
    assert_eq!(
        field(&proc_status(d.pid()), "Seccomp").as_deref(),
        Some("0")
    );
}

/// The daemon's stderr, collected by a thread as it is written.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<String>>);

impl Log {
    fn text(&self) -> String {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
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

/// Spawns `cmd` with stderr captured into a [`Log`] (echoed for the harness).
fn spawn_logged(mut cmd: Command) -> (ChildGuard, Log) {
    cmd.stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn_quiet("bulkhead-blk", &mut cmd).unwrap();
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
    (guard, log)
}

/// A daemon whose stderr is captured, in its scratch directory.
struct Logged {
    guard: ChildGuard,
    scratch: Scratch,
    log: Log,
}

impl Logged {
    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    fn is_running(&mut self) -> bool {
        matches!(self.guard.try_wait(), Ok(None))
    }
}

/// Spawns `cmd` with stderr captured and waits for its socket.
fn start_logged(cmd: Command, scratch: Scratch) -> Logged {
    let (mut guard, log) = spawn_logged(cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !scratch.socket().exists() {
        assert!(Instant::now() < deadline, "no socket: {}", log.text());
        assert!(
            matches!(guard.try_wait(), Ok(None)),
            "daemon exited: {}",
            log.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Logged {
        guard,
        scratch,
        log,
    }
}

/// A `bulkhead-blk` built with `--features test-hooks` into `target/hooked`
/// (its own target directory: the build lock of the `cargo test` running us
/// is not needed, and the normal binary stays hook-free).
fn hooked_binary() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    if let Ok(p) = std::env::var("BULKHEAD_BIN_BULKHEAD_BLK_HOOKED") {
        return PathBuf::from(p);
    }
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    // target/<profile>/deps/sandbox-HASH -> target/
    let exe = std::env::current_exe().unwrap();
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
        .args(["build", "-p", "bulkhead-blk", "--features", "test-hooks"])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .expect("run cargo to build the hooked bulkhead-blk");
    assert!(st.success(), "building the hooked bulkhead-blk failed");
    let bin = target_dir.join("debug").join("bulkhead-blk");
    *built = Some(bin.clone());
    bin
}

fn hooked(scratch: &Scratch, hook: &str, mode: &str) -> Command {
    let mut cmd = Command::new(hooked_binary());
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--image")
        .arg(scratch.image())
        .args(["--sandbox", mode])
        .env("BULKHEAD_TEST_HOOK", hook);
    cmd
}

/// Waits for the process to exit; returns the signal that killed it.
fn killed_by(guard: &mut ChildGuard, log: &Log) -> Option<i32> {
    let st = guard
        .wait_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap_or_else(|| panic!("daemon still running: {}", log.text()));
    st.signal()
}

#[test]
fn a_forbidden_syscall_kills_the_daemon_with_sigsys() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let (mut guard, log) = spawn_logged(hooked(&scratch, "socket-inet", "enforce"));
    assert_eq!(killed_by(&mut guard, &log), Some(libc::SIGSYS));
    let text = log.text();
    assert!(
        text.contains("test-hook: calling socket(AF_INET)"),
        "{text}"
    );
    assert!(!text.contains("returned an fd"), "{text}");
}

#[test]
fn opening_a_path_is_a_forbidden_syscall_too_under_enforce() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let (mut guard, log) = spawn_logged(hooked(&scratch, "open:/etc/passwd", "enforce"));
    assert_eq!(killed_by(&mut guard, &log), Some(libc::SIGSYS));
}

/// Kernel log lines (audit type 1326 = SECCOMP) for `pid` and `syscall`, if dmesg can be read.
fn seccomp_logged(pid: u32, syscall: libc::c_long) -> Option<bool> {
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

#[test]
fn in_log_mode_a_forbidden_syscall_is_logged_and_the_daemon_lives() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let cmd = hooked(&scratch, "socket-inet", "log");
    let mut d = start_logged(cmd, scratch);
    assert!(
        d.log
            .wait_for("socket(AF_INET) returned an fd", Duration::from_secs(10)),
        "{}",
        d.log.text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.is_running());
    serve_io(d.scratch.socket(), &d.scratch, 1);
    assert!(d.is_running());
    // The kernel rate-limits these records; look for a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match seccomp_logged(d.pid(), libc::SYS_socket) {
            None => {
                eprintln!("dmesg unreadable here: the kernel log record is not checked");
                break;
            }
            Some(true) => break,
            Some(false) => {
                assert!(
                    Instant::now() < deadline,
                    "no SECCOMP audit record for socket() in dmesg"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn opening_a_file_outside_the_landlock_set_fails_with_eacces() {
    // Log mode lets the openat call through seccomp, so Landlock alone decides.
    for target in ["/etc/passwd", "IMAGE"] {
        let scratch = Scratch::new(IMAGE_SIZE).unwrap();
        // Even the daemon's own image is out of reach by path once it serves.
        let path = match target {
            "IMAGE" => scratch.image().display().to_string(),
            p => p.to_string(),
        };
        std::fs::set_permissions(scratch.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cmd = hooked(&scratch, &format!("open:{path}"), "log");
        let mut d = start_logged(cmd, scratch);
        let want = format!("test-hook: open {path}: errno {}", libc::EACCES);
        assert!(
            d.log.wait_for(&want, Duration::from_secs(10)),
            "{}",
            d.log.text()
        );
        assert!(d.is_running());
    }
}

#[test]
fn the_normal_binary_carries_no_test_hooks() {
    let bin = std::fs::read(workspace_binary("bulkhead-blk")).unwrap();
    let needle = b"BULKHEAD_TEST_HOOK";
    assert!(
        !bin.windows(needle.len()).any(|w| w == needle),
        "the normal bulkhead-blk was built with the test-hooks feature"
    );
}
