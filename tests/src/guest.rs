//! Linux guests under QEMU (TCG) for tests that need the real Linux virtio
//! drivers in front of a Bulkhead backend.
//!
//! [`image`] builds (once per test process; cached across runs under
//! `target/guest/`) a Debian 6.1 kernel and an initramfs with busybox, the
//! virtio and ext4 modules, `fio` and `iperf3`. A [`Guest`] appends the test's
//! shell script and files to that initramfs as a second cpio archive, boots
//! `qemu-system-x86_64 -accel tcg` with the test's devices under a hard
//! timeout, and parses the serial console into a [`GuestRun`].
//!
//! Guest scripts run under `/bin/sh` (busybox) with the helpers of
//! `tests/guest/bulkhead.sh`: `check NAME CMD...`, `expect_eq NAME ACTUAL
//! EXPECTED`, `pass NAME`, `fail NAME DETAIL`, `value NAME VALUE`. The script's
//! exit code is the number of failed checks. Set `BULKHEAD_SHOW_SERIAL=1`
//! to see every guest's whole console; `BULKHEAD_TIMEOUT_SCALE` stretches
//! the timeouts on a slow machine.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::cpio::NewcWriter;
use crate::process::ChildGuard;

/// Marker that starts every line the guest writes for the harness.
const MARKER: &str = "@@BULKHEAD ";
/// Default guest RAM, in MiB (the initramfs unpacks to about 15 MiB).
const DEFAULT_MEMORY_MIB: u32 = 512;
/// Default hard limit for one guest run, before [`timeout_scale`].
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest may go on after a watched backend exited.
const BACKEND_EXIT_GRACE: Duration = Duration::from_secs(3);
/// How many serial lines a failure message shows.
const TAIL_LINES: usize = 80;

/// The virtqueue size [`Guest::vhost_user_blk`] gives QEMU (its default).
pub const VHOST_USER_BLK_QUEUE_SIZE: u16 = 128;

/// One guest at a time per test process: the machines have two cores, and
/// TCG guests that compete for them only time out.
pub(crate) static QEMU_SLOT: Mutex<()> = Mutex::new(());

/// The kernel and base initramfs built by `tests/guest/build-image`.
#[derive(Debug)]
pub struct GuestImage {
    /// The directory holding it (the builder's cache entry).
    pub dir: PathBuf,
    /// The ELF `vmlinux`, booted PVH-style by QEMU's `-kernel`.
    pub kernel: PathBuf,
    /// The uncompressed newc initramfs, padded to 512 bytes.
    pub initrd: PathBuf,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
}

/// The repository root (the workspace this crate belongs to).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Builds the guest image, or finds it in the cache; runs the builder once
/// per process and panics with its message if it fails.
pub fn image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        if let Some(dir) = std::env::var_os(IMAGE_ENV) {
            // Inside the nested host (no apt there): the image came along.
            return GuestImage::at(PathBuf::from(dir));
        }
        let builder = repo_root().join("tests/guest/build-image");
        let started = Instant::now();
        let out = Command::new(&builder)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", builder.display()));
        assert!(
            out.status.success(),
            "{} failed ({}); see its messages above",
            builder.display(),
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        let image = GuestImage::at(dir);
        eprintln!(
            "guest image {} ready in {:.1?}",
            image.dir.display(),
            started.elapsed()
        );
        image
    })
}

/// Environment variable naming a directory that holds a built guest image
/// (what `tests/guest/build-image` prints); [`image`] then uses it as it is.
pub const IMAGE_ENV: &str = "BULKHEAD_GUEST_IMAGE";

impl GuestImage {
    /// The image `tests/guest/build-image` left in `dir`; panics if incomplete.
    fn at(dir: PathBuf) -> GuestImage {
        let kernel_release = fs::read_to_string(dir.join("kernel-release"))
            .unwrap_or_else(|e| panic!("guest image at {} is incomplete: {e}", dir.display()))
            .trim()
            .to_string();
        GuestImage {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd.cpio"),
            kernel_release,
            dir,
        }
    }
}

/// The factor every guest timeout is multiplied by: `BULKHEAD_TIMEOUT_SCALE`
/// (for slow or busy machines), 1 if unset.
pub fn timeout_scale() -> f64 {
    std::env::var("BULKHEAD_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| *f > 0.0)
        .unwrap_or(1.0)
}

/// Makes the kernel SIGKILL the process `cmd` starts when the thread that
/// started it dies, so that a test process killed from outside leaves no
/// QEMU or daemon behind.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Starts a daemon (a backend, `qemu-storage-daemon`) with stdin closed and
/// stdout and stderr appended to `log`, killed with the test (see
/// [`die_with_parent`]) and, through the returned guard, when dropped.
pub fn spawn_daemon(name: &str, cmd: &mut Command, log: &Path) -> io::Result<ChildGuard> {
    let out = File::options().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    die_with_parent(cmd);
    ChildGuard::spawn(name, cmd)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A file placed in the guest's root filesystem next to the test script.
struct GuestFile {
    path: String,
    data: Vec<u8>,
    mode: u32,
}

/// A QEMU TCG guest to boot: the test script, extra files and devices.
pub struct Guest {
    script: String,
    files: Vec<GuestFile>,
    smp: u32,
    memory_mib: u32,
    timeout: Duration,
    args: Vec<OsString>,
    cmdline: String,
    devices: usize,
}

impl Guest {
    /// A guest that runs `script` (busybox sh, with the helpers of
    /// `tests/guest/bulkhead.sh`) as its test, on one vCPU with 512 MiB.
    pub fn new(script: impl Into<String>) -> Self {
        Guest {
            script: script.into(),
            files: Vec::new(),
            smp: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            timeout: DEFAULT_TIMEOUT,
            args: Vec::new(),
            cmdline: String::new(),
            devices: 0,
        }
    }

    /// Sets the number of vCPUs (Linux's virtio_blk uses at most one queue
    /// per vCPU, so multi-queue tests need `smp(2)`).
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// Sets guest RAM in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the hard limit for the whole run, boot included (multiplied by
    /// [`timeout_scale`]); the guest is killed when it passes.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds a file at the absolute guest path `path` (not under `/tmp`, which
    /// the guest mounts a tmpfs over).
    pub fn file(mut self, path: &str, data: impl Into<Vec<u8>>) -> Self {
        self.files.push(GuestFile {
            path: path.to_string(),
            data: data.into(),
            mode: 0o644,
        });
        self
    }

    /// Appends `text` to the kernel command line.
    pub fn kernel_arg(mut self, text: &str) -> Self {
        self.cmdline.push(' ');
        self.cmdline.push_str(text);
        self
    }

    /// Adds raw arguments to the QEMU command line.
    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Attaches a `vhost-user-blk-pci` device whose backend listens on
    /// `socket`, with `num_queues` queues of [`VHOST_USER_BLK_QUEUE_SIZE`]
    /// descriptors. The first one is `/dev/vda`.
    pub fn vhost_user_blk(self, socket: &Path, num_queues: u16) -> Self {
        self.vhost_user_blk_with(socket, num_queues, "")
    }

    /// [`Guest::vhost_user_blk`] with more `-device` properties (`extra`,
    /// comma-separated, e.g. `packed=on`).
    pub fn vhost_user_blk_with(mut self, socket: &Path, num_queues: u16, extra: &str) -> Self {
        let id = self.devices;
        self.devices += 1;
        let mut chardev = OsString::from(format!("socket,id=vu{id},path="));
        chardev.push(socket.as_os_str());
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(",{extra}")
        };
        self.args.extend([
            "-chardev".into(),
            chardev,
            "-device".into(),
            format!(
                "vhost-user-blk-pci,chardev=vu{id},num-queues={num_queues},\
                 queue-size={VHOST_USER_BLK_QUEUE_SIZE}{extra}"
            )
            .into(),
        ]);
        self
    }

    /// Boots the guest, waits for it to power off (or kills it at the
    /// timeout) and returns what it reported. Panics only if QEMU cannot be
    /// started; judge the result with [`GuestRun::assert_passed`].
    pub fn run(self) -> GuestRun {
        self.run_watching(&mut [])
    }

    /// Like [`Guest::run`], but also watches the backends the guest's
    /// devices depend on: if one exits, the guest is given a few seconds to
    /// finish and is then killed instead of hanging until the timeout, and
    /// [`GuestRun::backend_exit`] says which backend died and how.
    pub fn run_watching(self, backends: &mut [&mut ChildGuard]) -> GuestRun {
        let image = image();
        let work = tempfile::Builder::new()
            .prefix("bulkhead-guest-")
            .tempdir()
            .expect("create guest work dir");
        let initrd = work.path().join("initrd.cpio");
        let serial_path = work.path().join("serial.log");
        let qemu_log = work.path().join("qemu.log");
        self.write_initrd(&image.initrd, &initrd)
            .expect("write the test initrd");

        let mem = self.memory_mib;
        let mut cmd = Command::new(qemu_binary());
        cmd.args(["-accel", "tcg", "-nodefaults", "-nographic", "-no-reboot"])
            .arg("-m")
            .arg(format!("{mem}M"))
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
            .args(["-M", "q35,memory-backend=mem"])
            .arg("-smp")
            .arg(self.smp.to_string())
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1{}", self.cmdline))
            .arg("-serial")
            .arg(format!("file:{}", serial_path.display()))
            .args(&self.args);

        let _slot = QEMU_SLOT.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = self.timeout.mul_f64(timeout_scale());
        let started = Instant::now();
        let mut qemu = spawn_daemon("qemu", &mut cmd, &qemu_log)
            .unwrap_or_else(|e| panic!("{e} (is QEMU installed? run .ci/install-deps)"));
        let deadline = started + timeout;
        let mut backend_exit = None;
        let status = loop {
            if let Some(st) = qemu
                .wait_timeout(Duration::from_millis(200))
                .expect("wait for qemu")
            {
                break Some(st);
            }
            if backend_exit.is_none() {
                backend_exit = backends.iter_mut().find_map(|b| {
                    let st = b.try_wait().ok().flatten()?;
                    Some(format!("{} exited during the guest run: {st}", b.name()))
                });
                if backend_exit.is_some() {
                    // The guest may have been finishing; if not, it waits
                    // forever for the device.
                    let grace = Instant::now() + BACKEND_EXIT_GRACE;
                    let end = deadline.min(grace);
                    let left = end.saturating_duration_since(Instant::now());
                    if let Some(st) = qemu.wait_timeout(left).expect("wait for qemu") {
                        break Some(st);
                    }
                    break None;
                }
            }
            if Instant::now() >= deadline {
                break None;
            }
        };
        let timed_out = status.is_none() && backend_exit.is_none();
        if status.is_none() {
            let _ = qemu.kill();
        }
        let elapsed = started.elapsed();
        drop(qemu);

        let serial =
            String::from_utf8_lossy(&fs::read(&serial_path).unwrap_or_default()).replace('\r', "");
        let qemu_output = fs::read_to_string(&qemu_log).unwrap_or_default();
        if std::env::var_os("BULKHEAD_SHOW_SERIAL").is_some() {
            eprintln!("--- serial console:\n{serial}--- end of serial console");
        }
        let mut run = GuestRun::parse(&serial);
        run.qemu_status = status.map(|s| s.to_string());
        run.qemu_output = qemu_output;
        run.timed_out = timed_out;
        run.backend_exit = backend_exit;
        run.elapsed = elapsed;
        run
    }

    /// Writes the guest's initramfs (the kit's, then `/test.sh` and the
    /// test's files) to `out`, for a frontend other than QEMU run here
    /// (libvirt): boot it with [`GuestImage::kernel`] and read the serial
    /// console with [`GuestRun::parse`].
    pub fn write_initrd_to(&self, out: &Path) -> io::Result<()> {
        self.write_initrd(&image().initrd, out)
    }

    /// Writes the base initramfs followed by a cpio with `/test.sh` and the
    /// test's files to `out`.
    fn write_initrd(&self, base: &Path, out: &Path) -> io::Result<()> {
        fs::copy(base, out)?;
        let mut entries: Vec<(&str, &[u8], u32)> = vec![("test.sh", self.script.as_bytes(), 0o755)];
        for f in &self.files {
            entries.push((f.path.trim_start_matches('/'), &f.data, f.mode));
        }
        let mut file = File::options().append(true).open(out)?;
        file.write_all(&newc_archive(&entries))?;
        file.sync_data()
    }
}

/// The QEMU binary: `BULKHEAD_QEMU`, or `qemu-system-x86_64` from `PATH`.
fn qemu_binary() -> OsString {
    std::env::var_os("BULKHEAD_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// An uncompressed "newc" cpio archive holding `entries` (path relative to
/// the root, contents, permission bits) and the directories above them.
pub fn newc_archive(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut w = NewcWriter::new(Vec::new());
    for (path, data, mode) in entries {
        w.file(path, *mode, data).expect("write to a Vec");
    }
    w.finish().expect("write to a Vec")
}

/// One `check`/`expect_eq`/`pass`/`fail` result reported by the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The check's name, as the script gave it.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// For a failure, what the guest said about it.
    pub detail: String,
}

/// What a guest run reported, parsed from its serial console.
#[derive(Debug, Default)]
pub struct GuestRun {
    /// Every check, in the order the guest ran them.
    pub checks: Vec<Check>,
    /// Values the script reported with `value NAME VALUE`.
    pub values: BTreeMap<String, String>,
    /// The test script's exit code (the number of failed checks), if the
    /// guest got that far.
    pub exit_code: Option<i32>,
    /// Guest uptime in seconds when `/init` started.
    pub boot_seconds: Option<f64>,
    /// Modules that failed to load.
    pub failed_modules: Vec<String>,
    /// Whether QEMU was killed at the timeout.
    pub timed_out: bool,
    /// A watched backend that exited during the run (see
    /// [`Guest::run_watching`]), and how.
    pub backend_exit: Option<String>,
    /// QEMU's exit status, if it exited by itself.
    pub qemu_status: Option<String>,
    /// QEMU's own stdout and stderr.
    pub qemu_output: String,
    /// For a VMM killed at the timeout: where its vCPU threads were
    /// ([`crate::vcpus::report`]).
    pub vcpu_threads: String,
    /// The whole serial console log.
    pub serial: String,
    /// Wall time from starting QEMU to its exit.
    pub elapsed: Duration,
}

impl GuestRun {
    /// Parses the `@@BULKHEAD` lines of a serial log (the marker may follow
    /// other text on the line, such as an unfinished kernel message).
    pub fn parse(serial: &str) -> GuestRun {
        let mut run = GuestRun {
            serial: serial.to_string(),
            ..GuestRun::default()
        };
        for line in serial.lines() {
            let Some(at) = line.find(MARKER) else {
                continue;
            };
            let rest = line[at + MARKER.len()..].trim_end();
            let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            match kind {
                "CHECK" => {
                    let (verdict, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                    let (name, detail) = rest.split_once(' ').unwrap_or((rest, ""));
                    run.checks.push(Check {
                        name: name.to_string(),
                        passed: verdict == "PASS",
                        detail: detail.to_string(),
                    });
                }
                "VALUE" => {
                    let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                    run.values.insert(name.to_string(), value.to_string());
                }
                "EXIT" => {
                    let code = rest.split_whitespace().next().unwrap_or_default();
                    run.exit_code = code.parse().ok();
                }
                "BOOTED" => run.boot_seconds = rest.trim().parse().ok(),
                "MODULE-FAILED" => run.failed_modules.push(rest.to_string()),
                _ => {}
            }
        }
        run
    }

    /// The check called `name`, if the guest ran it.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The value the guest reported as `name`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Whether the script ran to its end with every check passed.
    pub fn passed(&self) -> bool {
        !self.timed_out
            && self.backend_exit.is_none()
            && self.exit_code == Some(0)
            && self.failed_modules.is_empty()
            && !self.checks.is_empty()
            && self.checks.iter().all(|c| c.passed)
    }

    /// Panics, showing the failed checks and the end of the serial log,
    /// unless [`GuestRun::passed`]; `what` names the run in the message.
    pub fn assert_passed(&self, what: &str) {
        if !self.passed() {
            panic!("{what}: guest test failed\n{}", self.report());
        }
    }

    /// Panics like [`GuestRun::assert_passed`] unless the check `name` ran and passed.
    pub fn assert_check(&self, what: &str, name: &str) {
        match self.check(name) {
            Some(c) if c.passed => {}
            _ => panic!(
                "{what}: guest check {name} missing or failed\n{}",
                self.report()
            ),
        }
    }

    /// A human summary: outcome, failed checks, QEMU's output and the serial tail.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let outcome = if self.timed_out {
            format!("killed after timeout ({:.1?})", self.elapsed)
        } else {
            format!(
                "qemu {} after {:.1?}, script exit code {:?}",
                self.qemu_status.as_deref().unwrap_or("killed"),
                self.elapsed,
                self.exit_code
            )
        };
        s.push_str(&format!("outcome: {outcome}\n"));
        if let Some(b) = &self.backend_exit {
            s.push_str(&format!("backend: {b}\n"));
        }
        let passed = self.checks.iter().filter(|c| c.passed).count();
        s.push_str(&format!("checks: {passed}/{} passed\n", self.checks.len()));
        for c in self.checks.iter().filter(|c| !c.passed) {
            s.push_str(&format!("  FAIL {}: {}\n", c.name, c.detail));
        }
        for m in &self.failed_modules {
            s.push_str(&format!("  module failed to load: {m}\n"));
        }
        if !self.qemu_output.trim().is_empty() {
            s.push_str(&format!(
                "--- qemu output:\n{}\n",
                tail(&self.qemu_output, 20)
            ));
        }
        if !self.vcpu_threads.is_empty() {
            s.push_str(&format!(
                "--- vCPU threads at the timeout:\n{}",
                self.vcpu_threads
            ));
        }
        if self.serial.trim().is_empty() {
            s.push_str(&format!("{GUEST_SILENT}\n"));
        }
        s.push_str(&format!(
            "--- serial console (last {TAIL_LINES} lines):\n{}\n",
            tail(&self.serial, TAIL_LINES)
        ));
        s
    }
}

/// What [`GuestRun::report`] says of a guest that wrote nothing at all on
/// its serial console: it never reached its init (the nested lane reads
/// this, `nested::NestedRun::lane_failure`).
pub const GUEST_SILENT: &str = "the guest printed nothing on its serial console";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_checks_values_and_exit_code() {
        let serial = "noise\n@@BULKHEAD BOOTED 2.51\n\
            @@BULKHEAD CHECK PASS size\n\
            [  3.1] kmsg @@BULKHEAD CHECK FAIL fio exit 1: bad crc\n\
            @@BULKHEAD VALUE sha abc def\n@@BULKHEAD EXIT 1\n";
        let run = GuestRun::parse(serial);
        assert_eq!(run.boot_seconds, Some(2.51));
        assert_eq!(run.checks.len(), 2);
        assert!(run.check("size").unwrap().passed);
        let fio = run.check("fio").unwrap();
        assert!(!fio.passed);
        assert_eq!(fio.detail, "exit 1: bad crc");
        assert_eq!(run.value("sha"), Some("abc def"));
        assert_eq!(run.exit_code, Some(1));
        assert!(!run.passed());
    }

    #[test]
    fn run_without_checks_does_not_pass() {
        let run = GuestRun::parse("@@BULKHEAD EXIT 0\n");
        assert!(!run.passed());
    }

    #[test]
    fn newc_archive_is_aligned_and_has_parents() {
        let a = newc_archive(&[
            ("test.sh", b"echo hi\n", 0o755),
            ("data/x/y.bin", b"abc", 0o644),
        ]);
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        for name in [
            "test.sh\0",
            "data\0",
            "data/x\0",
            "data/x/y.bin\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "{name:?} missing");
        }
        // Every header starts on a 4-byte boundary.
        let mut at = 0;
        while let Some(pos) = text[at..].find("070701") {
            assert_eq!((at + pos) % 4, 0);
            at += pos + 6;
        }
    }
}
