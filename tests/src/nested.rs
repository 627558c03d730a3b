//! The nested host: Linux under `bulkhead-vmm` on machines whose own
//! `/dev/kvm` cannot run it.
//!
//! Where `bulkhead-vmm probe` passes, a test that needs KVM runs here. Where
//! it fails (the build machines' KVM is a software nested hypervisor that
//! hangs Linux in its decompressor), the test runs inside a QEMU TCG guest,
//! the nested host, whose emulated CPU (`-cpu max`) has AMD SVM with nested
//! paging: its kernel loads `kvm-amd`, and its `/dev/kvm` runs Linux.
//!
//! The nested host boots the test kit's own kernel with four initramfs
//! layers laid end to end: the kit's initramfs (busybox, fio, iperf3, the
//! virtio modules), `nested.cpio` from `tests/guest/build-image` (kvm-amd,
//! tun, iproute2's `ip`, QEMU and its firmware, and
//! `tests/guest/nested-host.sh` as `/test.sh`), and one this module writes
//! per run: the inner guest's kernel and initramfs under `/nested/guest`,
//! and the binaries under test, without debug info, at the paths they have
//! here, the running test executable among them. The scenario, a shell
//! script, travels base64-encoded on the kernel command line. Its output
//! comes back on the console (COM1), the files it leaves in `/nested/out`
//! and its exit status on COM2, where nothing else writes.
//!
//! [`delegate`] runs the calling test that way: the same test executable,
//! `--exact NAME`, inside the nested host, where the probe passes and the
//! test takes its direct path. One nested host at a time per process (they
//! share the two cores with every TCG guest; see `guest::QEMU_SLOT`).
//!
//! Costs on the 2-core build machines: writing the layers about 1 s; the
//! nested host's boot to its scenario about 4 s; Linux under `bulkhead-vmm`
//! inside it boots to init in about 10 s.
//!
//! `BULKHEAD_KVM_LANE=here` runs KVM tests here without asking the probe,
//! `=nested` sends them through the nested host even where KVM works (to
//! test this lane).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::cpio::NewcWriter;
use crate::guest::{self, GuestImage, QEMU_SLOT};
use crate::process::workspace_binary;
use crate::skip::{SkipReason, skip};
use crate::vcpus;

/// Set (to `1`) inside the nested host by `nested-host.sh`.
pub const INSIDE_ENV: &str = "BULKHEAD_NESTED_INSIDE";
/// `here` or `nested`: overrides the probe's choice of lane.
pub const LANE_ENV: &str = "BULKHEAD_KVM_LANE";
/// Where the inner guest's kernel and initramfs lie inside the nested host.
const INNER_IMAGE: &str = "/nested/guest";
/// The workspace binaries a nested host carries, where they were built.
const BINARIES: [&str; 6] = [
    "bulkhead",
    "bulkhead-blk",
    "bulkhead-net",
    "bulkhead-console",
    "bulkhead-vmm",
    "bulkhead-bench",
];
/// Environment a delegated test takes along into the nested host.
const FORWARDED_ENV: [&str; 6] = [
    "RUST_LOG",
    "RUST_BACKTRACE",
    "BULKHEAD_SHOW_SERIAL",
    "BULKHEAD_TIMEOUT_SCALE",
    "CI",
    "BULKHEAD_SANDBOX",
];
/// The nested host's RAM (its initramfs holds about 250 MiB of files) and vCPUs.
const MEMORY_MIB: u32 = 3072;
const CPUS: u32 = 2;
/// Default hard limit for one nested host, boot to power-off, before
/// [`guest::timeout_scale`].
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(420);
/// The longest kernel command line Linux keeps on x86 is 2048 bytes.
const MAX_CMDLINE: usize = 2000;
/// Marker of every line the nested host writes for this module.
const MARKER: &str = "@@NESTED ";
/// Kernel messages of the nested host's own kernel failing, and what each
/// means. Only read on a run whose scenario did not end
/// ([`NestedRun::host_failure`]).
const HOST_FAILURES: [(&str, &str); 6] = [
    ("Kernel panic - not syncing", "kernel panic"),
    ("BUG: ", "kernel BUG"),
    ("Oops: ", "kernel oops"),
    ("blocked for more than", "hung task"),
    ("soft lockup", "soft lockup"),
    ("rcu_preempt detected stalls", "RCU stall"),
];
/// How long before the timeout the nested host lists its processes
/// (`tests/guest/nested-host.sh`): its boot, and the listing itself under
/// TCG, fit in this.
const WATCHDOG_LEAD: Duration = Duration::from_secs(30);
/// What a Linux guest under `bulkhead-vmm` prints when one of its vCPUs
/// sat halted past its own timer's expiry: RCU saw every CPU quiescent
/// (`All QSes seen`) but the timer its kthread slept on never fired. The
/// LAPIC timer of a guest is KVM's (the nested host's kernel), not ours.
const GUEST_TIMER_STALL: &str = "kthread timer wakeup didn't happen";
/// How many fresh nested hosts a delegated test gets after a run that
/// failed for the lane's own reasons ([`NestedRun::lane_failure`]). In
/// CI a retried run once failed again, and on 2026-12-07 (a clean-clone
/// `.ci/run`) the PCI tour's lane failed three times in a row (a
/// nested-host kernel BUG, then two inner-guest triple faults) and passed
/// alone right after: three, so that four lane failures in a row fail a
/// test.
const LANE_RETRIES: u32 = 3;
/// What a Linux guest prints when its CPU double-faults. Seen here in the
/// first instruction of `entry_SYSCALL_64` (`swapgs`) with the user's stack
/// pointer, 22 s into a run whose devices all worked: the CPU state the
/// nested host's KVM keeps under TCG's SVM, which `bulkhead-vmm` does not
/// touch after boot. A double fault that cannot be delivered is a triple
/// fault, which is how CI saw it.
const GUEST_DOUBLE_FAULT: &str = "traps: PANIC: double fault";
/// What a Linux guest prints when a CPU of its stopped passing through
/// quiescent states; lines `rcu: \tN-...` that follow name each such CPU.
/// Seen once in CI: a guest's vCPU 0 froze (not even its interrupt
/// counters moved) for three minutes after a backend's restart while vCPU
/// 1 went on. A lane failure only where that vCPU's thread was inside
/// `KVM_RUN` all along ([`vcpus::INSIDE_KVM_RUN`]); blocked or spinning
/// in `bulkhead-vmm`, it is ours.
const GUEST_CPU_STALL: &str = "rcu_preempt detected stalls on CPUs";
/// What `bulkhead-vmm` logs when a vCPU triple-faults.
const GUEST_TRIPLE_FAULT: &str = "triple fault (guest reset)";
/// How often a running nested host's console is read for its kernel failing.
const HOST_LOOK_EVERY: Duration = Duration::from_secs(5);
/// Hard limit for `bulkhead-vmm probe` (two tiny guests, 5 s each at most).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a test that needs KVM to run Linux runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lane {
    /// On this machine: its KVM runs Linux, or this is the nested host.
    Here,
    /// Inside the nested host.
    Nested,
    /// Nowhere, and why.
    Unavailable(SkipReason),
}

/// The lane of this process's KVM tests, decided once.
pub fn lane() -> &'static Lane {
    static LANE: OnceLock<Lane> = OnceLock::new();
    LANE.get_or_init(|| {
        let inside = std::env::var_os(INSIDE_ENV).is_some_and(|v| v == "1");
        let forced = std::env::var(LANE_ENV).unwrap_or_default();
        let lane = if inside || forced == "here" {
            Lane::Here
        } else if forced == "nested" {
            nested_or_why()
        } else {
            match probe() {
                None => Lane::Here,
                Some(why) => {
                    eprintln!("KVM here cannot run Linux ({why}): using the nested host");
                    nested_or_why()
                }
            }
        };
        if inside && let Some(why) = probe() {
            // The nested host exists to make this pass; say so loudly.
            panic!("inside the nested host, bulkhead-vmm probe failed: {why}");
        }
        lane
    })
}

/// [`Lane::Nested`] if QEMU is there to run the nested host, else why not.
fn nested_or_why() -> Lane {
    let qemu = qemu_binary();
    match Command::new(&qemu).arg("--version").output() {
        Ok(o) if o.status.success() => Lane::Nested,
        _ => Lane::Unavailable(SkipReason::NotInstalled(format!(
            "KVM here cannot run Linux and {}, for the nested host,",
            qemu.to_string_lossy()
        ))),
    }
}

/// `bulkhead-vmm probe` under a hard timeout: `None` when KVM here runs a
/// 64-bit Linux guest, else why not.
fn probe() -> Option<String> {
    let vmm = workspace_binary("bulkhead-vmm");
    let mut cmd = Command::new(&vmm);
    cmd.arg("probe")
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match crate::process::ChildGuard::spawn("bulkhead-vmm probe", &mut cmd) {
        Ok(c) => c,
        Err(e) => return Some(format!("{e} (cargo build -p bulkhead-vmm)")),
    };
    match child.wait_timeout(PROBE_TIMEOUT) {
        Ok(Some(st)) if st.success() => None,
        Ok(Some(st)) => {
            let mut out = String::new();
            let child = child.child_mut();
            if let Some(mut p) = child.stdout.take() {
                let _ = p.read_to_string(&mut out);
            }
            if let Some(mut p) = child.stderr.take() {
                let _ = p.read_to_string(&mut out);
            }
            Some(format!("probe {st}: {}", out.trim()))
        }
        Ok(None) => Some(format!("probe did not answer within {PROBE_TIMEOUT:?}")),
        Err(e) => Some(format!("probe: {e}")),
    }
}

/// Runs the calling test, `test` (its name as libtest knows it), through the
/// nested host unless KVM here runs Linux. Returns `false` when the caller
/// should run the test body here; `true` when it ran in the nested host and
/// passed (a failure there panics here with its output) or cannot run at
/// all ([`skip`]: under CI that fails).
pub fn delegate(test: &str) -> bool {
    delegate_with(test, DEFAULT_TIMEOUT)
}

/// [`delegate`] with a hard limit for the whole nested run.
pub fn delegate_with(test: &str, timeout: Duration) -> bool {
    delegate_to(test, |script| NestedHost::new(script).timeout(timeout))
}

/// [`delegate`] into the nested hosts `host` makes of the scenario script
/// (one per run, retries included): for a test that needs files carried
/// in, variables set or the user network.
pub fn delegate_to(test: &str, host: impl Fn(String) -> NestedHost) -> bool {
    match lane() {
        Lane::Here => false,
        Lane::Unavailable(why) => {
            skip(test, why.clone());
            true
        }
        Lane::Nested => {
            let exe = std::env::current_exe().expect("current_exe");
            let cwd = std::env::current_dir().expect("current_dir");
            let mut script = forwarded_env();
            script.push_str(&format!(
                "mkdir -p {cwd} && cd {cwd} && {exe} --exact {name} --nocapture --test-threads 1\n",
                cwd = quote(&cwd.to_string_lossy()),
                exe = quote(&exe.to_string_lossy()),
                name = quote(test),
            ));
            let mut run = host(script.clone()).run();
            // libtest shows this with the test's own output: on failure, or
            // with --nocapture.
            eprintln!(
                "--- {test} in the nested host ({:.1?}):\n{}--- end of the nested run",
                run.elapsed,
                run.output()
            );
            // The nested host's own kernel broke under TCG's emulation of
            // SVM before the test could finish (a kernel failure, a
            // SIGKILLed process left alive), or a guest of bulkhead-vmm
            // triple- or double-faulted, lost its vCPU timer or printed
            // nothing where the test expected none
            // ([`NestedRun::lane_failure`]): it gets a fresh nested host, up
            // to LANE_RETRIES times, and the last run's verdict stands. Any
            // other failure of the test is not retried.
            let mut retried = Vec::new();
            for attempt in 2..=LANE_RETRIES + 1 {
                let Some(why) = run.lane_failure() else {
                    break;
                };
                retried.push(why.clone());
                eprintln!(
                    "--- {why} in the nested host, before {test} could pass; \
                     retrying in a fresh nested host (run {attempt} of at most {})",
                    LANE_RETRIES + 1
                );
                run = host(script.clone()).run();
                eprintln!(
                    "--- {test} in nested host {attempt} ({:.1?}):\n{}--- end of the nested run",
                    run.elapsed,
                    run.output()
                );
            }
            let ran = run.output().contains("test result: ok. 1 passed");
            if run.status != Some(0) || !ran {
                let earlier = if retried.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (its last run; the lane failed before: {})",
                        retried.join("; ")
                    )
                };
                panic!(
                    "{test} failed in the nested host{earlier}: {}\n--- console (last 60 lines):\n{}",
                    run.outcome(),
                    guest::tail(&run.console, 60)
                );
            }
            true
        }
    }
}

/// `export NAME=VALUE` lines for the environment a delegated test takes along.
fn forwarded_env() -> String {
    let mut s = String::new();
    for name in FORWARDED_ENV {
        if let Ok(v) = std::env::var(name) {
            s.push_str(&format!("export {name}={}\n", quote(&v)));
        }
    }
    s
}

/// `s` as one shell word.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A nested host to boot: a scenario script, time limit and resources.
pub struct NestedHost {
    script: String,
    timeout: Duration,
    memory_mib: u32,
    /// Files to carry: (path here, path inside).
    carried: Vec<(PathBuf, String)>,
    /// A raw image attached as the nested host's virtio disk.
    drive: Option<PathBuf>,
    /// Whether the scenario's output goes to stdout as it comes.
    echo: bool,
    /// Variables the scenario gets (name, value).
    env: Vec<(String, String)>,
    /// Whether the nested host has QEMU's user network.
    user_net: bool,
    /// The nested host's CPUs.
    cpus: u32,
}

impl NestedHost {
    /// A nested host that runs `script` (busybox sh, as root, with
    /// `/nested/bin` first on `PATH`, [`INSIDE_ENV`] set and
    /// `BULKHEAD_GUEST_IMAGE` naming the inner guest) once `/dev/kvm` works.
    /// Files it leaves in `/nested/out` come back in [`NestedRun::files`].
    pub fn new(script: impl Into<String>) -> Self {
        NestedHost {
            script: script.into(),
            timeout: DEFAULT_TIMEOUT,
            memory_mib: MEMORY_MIB,
            carried: Vec::new(),
            drive: None,
            echo: false,
            env: Vec::new(),
            user_net: false,
            cpus: CPUS,
        }
    }

    /// Sets the nested host's CPUs (default [`CPUS`]). One CPU spares a
    /// busy scenario the cross-CPU interrupts under which TCG's emulation
    /// of SVM loses guests: with librados' threads busy beside a guest's
    /// vCPUs (vmm/tests/rbd.rs), the guest triple-faulted in 4 of 5 runs
    /// on two CPUs and in none of 3 on one.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus.max(1);
        self
    }

    /// Exports `name=value` to the scenario.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Gives the nested host a virtio NIC on QEMU's user network, set up
    /// before the scenario runs (eth0 at 10.0.2.15/24, default route
    /// through 10.0.2.2): its connections leave from this host's QEMU
    /// process to whatever address they name, so a service listening on
    /// one of this host's non-loopback addresses is reachable there
    /// (10.0.2.2 itself is this host's 127.0.0.1).
    pub fn user_net(mut self) -> Self {
        self.user_net = true;
        self
    }

    /// Carries the file `src` into the nested host as `dest` (an absolute
    /// path).
    pub fn carry(mut self, src: impl Into<PathBuf>, dest: impl Into<String>) -> Self {
        self.carried.push((src.into(), dest.into()));
        self
    }

    /// Attaches the raw image `path` as the nested host's virtio disk: its
    /// `/dev/vda`, read and written in place.
    pub fn drive(mut self, path: impl Into<PathBuf>) -> Self {
        self.drive = Some(path.into());
        self
    }

    /// Prints the scenario's output on stdout as it comes (for a person
    /// watching), besides keeping it.
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Sets the hard limit for the whole run (multiplied by
    /// [`guest::timeout_scale`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the nested host's RAM in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Boots the nested host, waits for it to power off (or kills it at the
    /// timeout) and returns what it reported. Panics only if it cannot be
    /// started.
    pub fn run(self) -> NestedRun {
        let image = guest::image();
        let work = tempfile::Builder::new()
            .prefix("bulkhead-nested-")
            .tempdir()
            .expect("create the nested host's work dir");
        let initrd = work.path().join("initrd.cpio");
        let console = work.path().join("console.log");
        let results = work.path().join("results.log");
        let qemu_log = work.path().join("qemu.log");
        let started = Instant::now();
        write_initrd(image, &initrd, work.path(), &self.carried)
            .unwrap_or_else(|e| panic!("cannot write the nested host's initramfs: {e}"));
        let layers = started.elapsed();

        let mut script = String::new();
        if self.user_net {
            script.push_str(
                "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && \
                 ip route add default via 10.0.2.2 || echo 'nested host: no user network'\n",
            );
        }
        for (name, value) in &self.env {
            script.push_str(&format!("export {name}={}\n", quote(value)));
        }
        script.push_str(&self.script);
        let encoded = base64(script.as_bytes());
        let timeout = self.timeout.mul_f64(guest::timeout_scale());
        // The nested host lists what still runs this long after the
        // scenario began, before the timeout below kills it.
        let watchdog = timeout.saturating_sub(WATCHDOG_LEAD).as_secs().max(1);
        let cmdline = format!(
            "console=ttyS0 quiet panic=-1 bulkhead.watchdog={watchdog} bulkhead.nested={encoded}"
        );
        assert!(
            cmdline.len() <= MAX_CMDLINE,
            "the nested scenario is too long for the kernel command line \
             ({} bytes encoded; put large inputs in files)",
            cmdline.len()
        );
        let mem = self.memory_mib;
        let mut cmd = Command::new(qemu_binary());
        cmd.args(["-accel", "tcg", "-cpu", "max", "-M", "q35"])
            .args(["-nodefaults", "-nographic", "-no-reboot"])
            .arg("-smp")
            .arg(self.cpus.to_string())
            .arg("-m")
            .arg(format!("{mem}M"))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(&cmdline)
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", results.display()));
        if self.user_net {
            cmd.args(["-netdev", "user,id=n0"])
                .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        }
        if let Some(drive) = &self.drive {
            let mut arg = OsString::from("format=raw,if=virtio,cache=none,file=");
            arg.push(drive);
            cmd.arg("-drive").arg(arg);
        }

        let _slot = QEMU_SLOT.lock().unwrap_or_else(|e| e.into_inner());
        let booted = Instant::now();
        let mut qemu = guest::spawn_daemon("qemu (nested host)", &mut cmd, &qemu_log)
            .unwrap_or_else(|e| panic!("{e} (is QEMU installed? run .ci/install-deps)"));
        let mut echo = self.echo.then(|| Echo::new(console.clone()));
        let deadline = booted + timeout;
        let mut next_look = Instant::now() + HOST_LOOK_EVERY;
        let status = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let st = qemu
                .wait_timeout(left.min(Duration::from_millis(200)))
                .expect("wait for the nested host");
            if let Some(e) = echo.as_mut() {
                e.print_new();
            }
            if st.is_some() || left.is_zero() {
                break st;
            }
            // A nested host whose kernel hung never recovers: stop waiting
            // for the deadline once its console says so.
            if Instant::now() >= next_look {
                next_look = Instant::now() + HOST_LOOK_EVERY;
                let seen = NestedRun {
                    console: String::from_utf8_lossy(&fs::read(&console).unwrap_or_default())
                        .into_owned(),
                    ..NestedRun::default()
                };
                if seen.host_failure().is_some() {
                    break None;
                }
            }
        };
        let timed_out = status.is_none();
        if timed_out {
            let _ = qemu.kill();
        }
        let elapsed = booted.elapsed();
        drop(qemu);
        let console =
            String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).replace('\r', "");
        if std::env::var_os("BULKHEAD_SHOW_SERIAL").is_some() {
            eprintln!("--- nested host console:\n{console}--- end of nested host console");
        }
        let results =
            String::from_utf8_lossy(&fs::read(&results).unwrap_or_default()).replace('\r', "");
        let mut run = NestedRun::parse(&results);
        run.console = console;
        run.timed_out = timed_out;
        run.qemu_status = status.map(|s| s.to_string());
        run.qemu_output = fs::read_to_string(&qemu_log).unwrap_or_default();
        run.elapsed = elapsed;
        run.layers = layers;
        run
    }
}

/// The QEMU binary: `BULKHEAD_QEMU`, or `qemu-system-x86_64` from `PATH`.
fn qemu_binary() -> OsString {
    std::env::var_os("BULKHEAD_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// Prints, line by line, what the scenario adds to the console log.
struct Echo {
    path: PathBuf,
    /// Bytes of the log already looked at.
    at: usize,
    /// The unfinished last line.
    partial: String,
    /// Whether the scenario's begin marker went by (and its end not yet).
    inside: bool,
}

impl Echo {
    fn new(path: PathBuf) -> Self {
        Echo {
            path,
            at: 0,
            partial: String::new(),
            inside: false,
        }
    }

    fn print_new(&mut self) {
        let Ok(all) = fs::read(&self.path) else {
            return;
        };
        let Some(new) = all.get(self.at..) else {
            return;
        };
        self.at = all.len();
        self.partial
            .push_str(&String::from_utf8_lossy(new).replace('\r', ""));
        let mut out = io::stdout().lock();
        while let Some((line, rest)) = self.partial.split_once('\n') {
            if line.contains(&format!("{MARKER}BEGIN")) {
                self.inside = true;
            } else if line.contains(&format!("{MARKER}END ")) {
                self.inside = false;
            } else if self.inside {
                let _ = writeln!(out, "{line}");
            }
            self.partial = rest.to_string();
        }
        let _ = out.flush();
    }
}

/// Writes the nested host's initramfs to `out`: the kit's initramfs, the
/// nested layer, then the inner image, the binaries under test (copies
/// without debug info are made in `scratch`) and the `carried` files.
fn write_initrd(
    image: &GuestImage,
    out: &Path,
    scratch: &Path,
    carried_files: &[(PathBuf, String)],
) -> io::Result<()> {
    let nested_layer = image.dir.join("nested.cpio");
    if !nested_layer.exists() {
        return Err(io::Error::other(format!(
            "{} is missing: rebuild the guest image (tests/guest/build-image)",
            nested_layer.display()
        )));
    }
    let mut f = BufWriter::with_capacity(1 << 20, File::create(out)?);
    for base in [&image.initrd, &nested_layer] {
        io::copy(&mut File::open(base)?, &mut f)?;
    }
    let mut w = NewcWriter::new(f);
    for name in ["vmlinux", "initrd.cpio", "kernel-release"] {
        w.copy(&format!("{INNER_IMAGE}/{name}"), &image.dir.join(name))?;
    }
    let mut carried: Vec<PathBuf> = BINARIES
        .iter()
        .map(|b| workspace_binary(b))
        .filter(|p| p.exists())
        .collect();
    let exe = std::env::current_exe()?;
    if !carried.contains(&exe) {
        carried.push(exe);
    }
    for (i, path) in carried.iter().enumerate() {
        let stripped = scratch.join(format!("bin-{i}"));
        let ok = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(path)
            .arg(&stripped)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let src = if ok {
            stripped.as_path()
        } else {
            path.as_path()
        };
        w.copy(&path.to_string_lossy(), src)?;
        if ok {
            fs::remove_file(&stripped)?;
        }
    }
    for (src, dest) in carried_files {
        w.copy(dest, src)?;
    }
    w.finish()?.flush()
}

/// What a nested host reported.
#[derive(Debug, Default)]
pub struct NestedRun {
    /// The scenario's exit status; 201 to 204: the nested host itself
    /// failed before the scenario (see `tests/guest/nested-host.sh`).
    pub status: Option<i32>,
    /// Files the scenario left in `/nested/out`, by name.
    pub files: BTreeMap<String, Vec<u8>>,
    /// The nested host's whole console: its kernel, the scenario's output.
    pub console: String,
    /// Whether it was killed: at the timeout, or once its kernel was seen
    /// to have hung ([`NestedRun::host_failure`]).
    pub timed_out: bool,
    /// QEMU's exit status, if it exited by itself.
    pub qemu_status: Option<String>,
    /// QEMU's own stdout and stderr.
    pub qemu_output: String,
    /// Wall time from starting QEMU to its exit.
    pub elapsed: Duration,
    /// Wall time spent writing the initramfs layers before that.
    pub layers: Duration,
}

impl NestedRun {
    /// Parses the results port: files and the exit status.
    fn parse(results: &str) -> NestedRun {
        let mut run = NestedRun::default();
        let mut file: Option<(String, String)> = None;
        for line in results.lines() {
            let Some(rest) = line.strip_prefix(MARKER) else {
                if let Some((_, body)) = file.as_mut() {
                    body.push_str(line.trim());
                }
                continue;
            };
            let (kind, arg) = rest
                .trim_end()
                .split_once(' ')
                .unwrap_or((rest.trim_end(), ""));
            match kind {
                "FILE" => file = Some((arg.to_string(), String::new())),
                "END-FILE" => {
                    if let Some((name, body)) = file.take() {
                        run.files.insert(name, unbase64(&body));
                    }
                }
                "EXIT" => run.status = arg.trim().parse().ok(),
                _ => {}
            }
        }
        run
    }

    /// What the scenario printed (the console between its begin and end
    /// markers), or the whole console if it never began.
    pub fn output(&self) -> &str {
        let begin = self.console.find(&format!("{MARKER}BEGIN"));
        let Some(begin) = begin else {
            return &self.console;
        };
        let body = &self.console[begin..];
        let body = body.split_once('\n').map_or("", |(_, rest)| rest);
        match body.find(&format!("{MARKER}END ")) {
            Some(end) => &body[..end],
            None => body,
        }
    }

    /// Seconds of the nested host's uptime at which the scenario began and
    /// ended, when it got that far.
    pub fn scenario_uptime(&self) -> Option<(f64, f64)> {
        let value = |m: &str, field: usize| -> Option<f64> {
            let at = self.console.find(&format!("{MARKER}{m} "))?;
            let line = self.console[at..].lines().next()?;
            line.split_whitespace().nth(field)?.parse().ok()
        };
        Some((value("BEGIN", 2)?, value("END", 3)?))
    }

    /// Why the nested host's own kernel failed, when it did so before the
    /// scenario ended: a kernel message of a crash or a hang on its console
    /// and no end marker. Under TCG's emulation of SVM a vCPU thread of
    /// `bulkhead-vmm` there now and then takes the nested host's kernel down
    /// (seen in CI: a stack guard page hit in `error_entry`; a hung
    /// `khugepaged`); a correct host kernel cannot be brought down by a
    /// user process, so this is the lane failing, not the code under test.
    pub fn host_failure(&self) -> Option<&'static str> {
        if self.console.contains(&format!("{MARKER}END ")) {
            return None;
        }
        HOST_FAILURES
            .iter()
            .find(|(sign, _)| self.console.contains(sign))
            .map(|&(_, why)| why)
    }

    /// Whether the nested host's machine went away by itself before its
    /// scenario reported: QEMU (`-no-reboot`) exited on its own, no
    /// timeout, no exit status on the result port. Seen once here 52 s into
    /// a run, with no kernel message on the console at all: the nested
    /// host's CPU reset under TCG's emulation of SVM (nothing a test's user
    /// processes can cause; the nested host powers off only after
    /// reporting).
    pub fn host_reset(&self) -> bool {
        !self.timed_out && self.status.is_none() && self.qemu_status.is_some()
    }

    /// Whether a guest under `bulkhead-vmm` triple-faulted in a scenario
    /// that did not pass. Under TCG's emulation of SVM a Linux guest there
    /// has triple-faulted once in CI seconds after its boot, before any
    /// device I/O, on a main that passed the same test many times before
    /// and after; `bulkhead-vmm` logs the vCPU's registers when it happens
    /// (see `vmm/src/vcpu.rs`). A test that expects the reset passes and
    /// is never looked at here.
    pub fn guest_triple_fault(&self) -> bool {
        self.status != Some(0) && self.output().contains(GUEST_TRIPLE_FAULT)
    }

    /// Whether a guest under `bulkhead-vmm` panicked on a double fault
    /// ([`GUEST_DOUBLE_FAULT`]) in a scenario that did not pass.
    pub fn guest_double_fault(&self) -> bool {
        self.status != Some(0) && self.output().contains(GUEST_DOUBLE_FAULT)
    }

    /// Whether a guest under `bulkhead-vmm` reported a vCPU whose timer
    /// stopped firing ([`GUEST_TIMER_STALL`]) in a scenario that did not
    /// pass. Seen once in CI: a guest's second vCPU stayed halted for
    /// minutes with every CPU quiescent; the guest's LAPIC timer is the
    /// nested host kernel's KVM, under TCG's emulation of SVM.
    pub fn guest_timer_stall(&self) -> bool {
        self.status != Some(0) && self.output().contains(GUEST_TIMER_STALL)
    }

    /// The CPUs a guest under `bulkhead-vmm` reported stalled
    /// ([`GUEST_CPU_STALL`]), in a scenario that did not pass.
    pub fn guest_stalled_cpus(&self) -> Vec<u32> {
        let out = self.output();
        if self.status == Some(0) || !out.contains(GUEST_CPU_STALL) {
            return Vec::new();
        }
        let mut cpus: Vec<u32> = out
            .lines()
            .filter_map(|l| {
                let rest = l.split_once("rcu: ")?.1.trim_start();
                let (n, after) = rest.split_once('-')?;
                after.starts_with('.').then_some(())?;
                n.parse().ok()
            })
            .collect();
        cpus.sort_unstable();
        cpus.dedup();
        cpus
    }

    /// Whether a guest under `bulkhead-vmm` reported stalled CPUs whose
    /// vCPU threads the timeout found inside `KVM_RUN`, every one.
    pub fn guest_stall_in_kvm(&self) -> bool {
        let cpus = self.guest_stalled_cpus();
        let out = self.output();
        !cpus.is_empty()
            && cpus
                .iter()
                .all(|n| out.contains(&format!("vcpu{n}: {}", vcpus::INSIDE_KVM_RUN)))
    }

    /// Processes the nested host's watchdog listed with a SIGKILL still
    /// pending (`tests/guest/nested-host.sh`): a kill the kernel did not
    /// deliver in time. A user process cannot block SIGKILL, so this is
    /// the nested host's kernel stuck, which shows as the scenario running
    /// into the timeout while the test waits for the process to end.
    pub fn unkillable(&self) -> Vec<String> {
        const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
        self.console
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("@@W ")?;
                let pending = rest
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("pending="))?;
                let killed = pending
                    .split('/')
                    .filter_map(|m| u64::from_str_radix(m, 16).ok())
                    .any(|m| m & SIGKILL_BIT != 0);
                killed.then(|| rest.to_string())
            })
            .collect()
    }

    /// Why this run says nothing about the code under test, when it does
    /// not: the nested host's kernel failed ([`NestedRun::host_failure`])
    /// or left a killed process alive ([`NestedRun::unkillable`]), or a
    /// guest triple-faulted ([`NestedRun::guest_triple_fault`]), lost
    /// its timer ([`NestedRun::guest_timer_stall`]), stalled inside KVM
    /// ([`NestedRun::guest_stall_in_kvm`]) or printed nothing at
    /// all ([`guest::GUEST_SILENT`]: seen locally, 1 run in 8, a guest
    /// whose devices were never even set up).
    pub fn lane_failure(&self) -> Option<String> {
        if self.status != Some(0) && self.output().contains(guest::GUEST_SILENT) {
            return Some("a guest under bulkhead-vmm never reached its init".to_string());
        }
        if let Some(why) = self.host_failure() {
            return Some(format!("the nested host's kernel failed ({why})"));
        }
        if self.host_reset() {
            return Some("the nested host's machine reset itself".to_string());
        }
        if self.timed_out
            && let Some(p) = self.unkillable().first()
        {
            return Some(format!(
                "the nested host's kernel left a SIGKILLed process alive ({p})"
            ));
        }
        if self.guest_timer_stall() {
            return Some("a guest under bulkhead-vmm lost its vCPU timer".to_string());
        }
        if self.guest_double_fault() {
            return Some("a guest under bulkhead-vmm double-faulted".to_string());
        }
        if self.guest_stall_in_kvm() {
            return Some(format!(
                "a guest under bulkhead-vmm stalled on CPU(s) {:?}, their vCPU threads inside KVM_RUN",
                self.guest_stalled_cpus()
            ));
        }
        self.guest_triple_fault()
            .then(|| "a guest under bulkhead-vmm triple-faulted".to_string())
    }

    /// One line: how the run ended.
    pub fn outcome(&self) -> String {
        if let Some(why) = self.host_failure() {
            return format!(
                "the nested host's own kernel failed ({why}) after {:.1?}",
                self.elapsed
            );
        }
        if self.timed_out {
            return format!("killed after the timeout ({:.1?})", self.elapsed);
        }
        let mut s = format!(
            "scenario exit status {:?}, qemu {} after {:.1?}",
            self.status,
            self.qemu_status.as_deref().unwrap_or("killed"),
            self.elapsed
        );
        if !self.qemu_output.trim().is_empty() {
            s.push_str(&format!(
                "; qemu said: {}",
                guest::tail(&self.qemu_output, 5)
            ));
        }
        s
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what busybox `base64 -d` reads).
fn base64(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Decodes base64 (whitespace and padding ignored; stops at anything else).
fn unbase64(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b' ' | b'\t' => continue,
            _ => break,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished scenario that exited `status` after printing `output`.
    fn ended(status: i32, output: &str) -> NestedRun {
        NestedRun {
            status: Some(status),
            console: format!("@@NESTED BEGIN 4.1\n{output}@@NESTED END {status} 30.0\n"),
            ..NestedRun::default()
        }
    }

    #[test]
    fn base64_round_trips_every_length() {
        let data: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        for n in 0..40 {
            let enc = base64(&data[..n]);
            assert_eq!(enc.len() % 4, 0);
            assert_eq!(unbase64(&enc), &data[..n], "length {n}");
        }
        assert_eq!(base64(b"any carnal pleas"), "YW55IGNhcm5hbCBwbGVhcw==");
        assert_eq!(
            unbase64("YW55IGNh\ncm5hbCBw\nbGVhcw==\n"),
            b"any carnal pleas"
        );
    }

    #[test]
    fn parse_reads_files_and_exit_status() {
        let results = "@@NESTED FILE a.json\nAQID\nBA==\n@@NESTED END-FILE\n@@NESTED EXIT 3\n";
        let run = NestedRun::parse(results);
        assert_eq!(run.status, Some(3));
        assert_eq!(
            run.files.get("a.json").map(Vec::as_slice),
            Some(&[1u8, 2, 3, 4][..])
        );
    }

    #[test]
    fn only_a_host_kernel_failure_before_the_scenario_ends_is_the_hosts() {
        let run = |console: &str| NestedRun {
            console: console.to_string(),
            ..NestedRun::default()
        };
        let hung = "@@NESTED BEGIN 4.1\n[  242.9] INFO: task khugepaged:36 blocked for more than 120 seconds.\n";
        assert_eq!(run(hung).host_failure(), Some("hung task"));
        let crashed = "@@NESTED BEGIN 4.1\n[ 32.1] BUG: TASK stack guard page was hit\n";
        assert_eq!(run(crashed).host_failure(), Some("kernel BUG"));
        // The scenario ended: its own status is the verdict.
        let ended = format!("{crashed}@@NESTED END 101 40.2\n");
        assert_eq!(run(&ended).host_failure(), None);
        // A test that hangs with a quiet kernel is the test's failure.
        assert_eq!(run("@@NESTED BEGIN 4.1\nwaiting\n").host_failure(), None);
    }

    #[test]
    fn a_nested_host_that_went_away_without_a_result_is_the_lanes() {
        let begun = "@@NESTED BEGIN 9.2\nrunning 1 test\n";
        let run = |status: Option<i32>, timed_out: bool, qemu: Option<&str>| NestedRun {
            status,
            timed_out,
            qemu_status: qemu.map(String::from),
            console: begun.to_string(),
            ..NestedRun::default()
        };
        let reset = run(None, false, Some("exit status: 0"));
        assert!(reset.host_reset());
        assert_eq!(
            reset.lane_failure().as_deref(),
            Some("the nested host's machine reset itself")
        );
        // A scenario that reported is judged by its status.
        assert_eq!(
            run(Some(101), false, Some("exit status: 0")).lane_failure(),
            None
        );
        // A run killed at the timeout is not a reset.
        assert!(!run(None, true, None).host_reset());
    }

    #[test]
    fn a_guest_triple_fault_is_the_lanes_only_when_the_test_failed() {
        let run = ended;
        let reset = "bulkhead-vmm[155]: INFO vCPU 1: triple fault (guest reset)\n";
        let failed = run(101, reset);
        assert!(failed.guest_triple_fault());
        assert_eq!(
            failed.lane_failure().as_deref(),
            Some("a guest under bulkhead-vmm triple-faulted")
        );
        // A test that expects the reset and passes is not a failure at all.
        assert_eq!(run(0, reset).lane_failure(), None);
        // A failing test without a triple fault is the test's own failure.
        assert_eq!(run(101, "assertion failed\n").lane_failure(), None);
    }

    #[test]
    fn a_guest_timer_stall_is_the_lanes_only_when_the_test_failed() {
        let run = ended;
        let stall =
            "[ 181.2] rcu: rcu_preempt kthread timer wakeup didn't happen for 2501 jiffies!\n";
        assert!(run(101, stall).guest_timer_stall());
        assert_eq!(
            run(101, stall).lane_failure().as_deref(),
            Some("a guest under bulkhead-vmm lost its vCPU timer")
        );
        // A guest that recovered and let the test pass is no failure.
        assert_eq!(run(0, stall).lane_failure(), None);
    }

    #[test]
    fn a_guest_cpu_stall_is_the_lanes_only_with_its_vcpu_thread_inside_kvm_run() {
        let run = ended;
        // As CI saw it: CPU 0 frozen, CPU 1 going on.
        let stall = "[   78.643164] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
            [   78.646958] rcu: \t0-...0: (1 GPs behind) idle=dfcc/1/0x4000000000000000 softirq=3386/3387 fqs=2600\n\
            [   78.650000] rcu: \t(detected by 1, t=21002 jiffies, g=5617, q=83 ncpus=2)\n";
        assert_eq!(run(101, stall).guest_stalled_cpus(), vec![0]);
        let inside = format!(
            "{stall}--- vCPU threads at the timeout:\n\
             vcpu0: {} (state S, syscall [running] then [running], ticks: guest 0, user 0, kernel 100)\n\
             vcpu1: in and out of KVM_RUN (state S, ...)\n",
            vcpus::INSIDE_KVM_RUN
        );
        assert_eq!(
            run(101, &inside).lane_failure().as_deref(),
            Some(
                "a guest under bulkhead-vmm stalled on CPU(s) [0], their vCPU threads inside KVM_RUN"
            )
        );
        // The stalled CPU's thread in our own code: the test's failure.
        let ours = inside
            .replace("vcpu0: inside", "vcpu0: not inside")
            .replace(
                "vcpu1: in and out of KVM_RUN",
                &format!("vcpu1: {}", vcpus::INSIDE_KVM_RUN),
            );
        assert_eq!(run(101, &ours).lane_failure(), None);
        // No report of the threads (the VMM ended by itself): ours too.
        assert_eq!(run(101, stall).lane_failure(), None);
        // A guest that recovered and let the test pass is no failure.
        assert_eq!(run(0, &inside).lane_failure(), None);
    }

    #[test]
    fn a_process_left_with_sigkill_pending_at_the_timeout_is_the_lanes() {
        let listing = "@@NESTED BEGIN 4.1\n\
            @@NESTED WATCHDOG 390.0: the scenario still runs\n\
            @@W 131 S wchan=do_wait pending=0000000000000000/0000000000000000 /nested/bin/boot-x\n\
            @@W 155 D wchan=kvm_vcpu_block pending=0000000000000100/0000000000000000 bulkhead-vmm --kernel k\n\
            @@NESTED WATCHDOG END\n";
        let run = |timed_out: bool| NestedRun {
            console: listing.to_string(),
            timed_out,
            ..NestedRun::default()
        };
        assert_eq!(
            run(true).unkillable(),
            vec![
                "155 D wchan=kvm_vcpu_block pending=0000000000000100/0000000000000000 bulkhead-vmm --kernel k"
            ]
        );
        assert!(
            run(true)
                .lane_failure()
                .is_some_and(|w| w.contains("SIGKILLed process alive (155 D"))
        );
        // A pending SIGKILL the kernel delivers before the timeout is not a
        // hang; without the timeout the scenario's own status decides.
        assert_eq!(run(false).lane_failure(), None);
        // A shared-pending SIGKILL (sent to the thread group) counts too;
        // other signals do not.
        let shared = NestedRun {
            console: "@@W 9 S wchan=x pending=0000000000000000/0000000000000100 a\n\
                      @@W 10 S wchan=x pending=0000000000004002/0000000000000000 b\n"
                .to_string(),
            ..NestedRun::default()
        };
        assert_eq!(shared.unkillable().len(), 1);
    }

    #[test]
    fn a_guest_that_never_printed_is_the_lanes_only_when_the_test_failed() {
        let silent = format!("checks: 0/0 passed\n{}\n", guest::GUEST_SILENT);
        let run = |status: i32| ended(status, &silent);
        assert_eq!(
            run(101).lane_failure().as_deref(),
            Some("a guest under bulkhead-vmm never reached its init")
        );
        assert_eq!(run(0).lane_failure(), None);
    }

    #[test]
    fn a_guest_double_fault_is_the_lanes_only_when_the_test_failed() {
        let panic = "[   22.271060] traps: PANIC: double fault, error_code: 0x0\n";
        let run = |status: i32| ended(status, panic);
        assert!(run(101).guest_double_fault());
        assert_eq!(
            run(101).lane_failure().as_deref(),
            Some("a guest under bulkhead-vmm double-faulted")
        );
        assert_eq!(run(0).lane_failure(), None);
    }

    #[test]
    fn output_is_what_the_scenario_printed() {
        let run = NestedRun {
            console: "kernel noise\n@@NESTED BEGIN 3.2\nhello\nworld\n@@NESTED END 0 9.5\nbye\n"
                .into(),
            ..NestedRun::default()
        };
        assert_eq!(run.output(), "hello\nworld\n");
        assert_eq!(run.scenario_uptime(), Some((3.2, 9.5)));
    }

    #[test]
    fn quote_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
