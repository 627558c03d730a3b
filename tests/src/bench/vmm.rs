//! The VMM suite: how long `bulkhead-vmm` takes to bring the test kit's Linux
//! guest to its init, and how much memory the VMM process holds beyond guest
//! RAM.
//!
//! - **Boot to init**: from spawning `bulkhead-vmm` (its backends already
//!   listening, as a launcher would have them) until the serial log (a file
//!   the VMM appends to) holds the init's first line, `@@BULKHEAD BOOTED`;
//!   polled every millisecond. Median of N boots, with `bulkhead-blk`
//!   attached over virtio-pci and with no device at all.
//! - **Memory overhead**: once the guest's `/test.sh` runs (modules loaded,
//!   devices probed), `/proc/PID/smaps` of the VMM is summed over every
//!   mapping except guest RAM (the `memfd:bulkhead-guest-ram` mapping):
//!   `Rss` (what the VMM adds to the host, including its shared text),
//!   `Private_Dirty` and `Anonymous` (heap, stacks: what only it uses).
//!   Guest RAM's own resident pages are reported apart. KVM's in-kernel
//!   state (vCPU, EPT/shadow page tables) is not in RSS.
//!
//! Both need a KVM that runs a 64-bit Linux guest: `bulkhead-vmm probe`
//! decides, and where it fails the suite records `measured: false` with its
//! reason. A dry run runs everywhere: the same command line, stopped through
//! the API socket once every backend is connected; its RSS is that of the
//! **VMM process before guest boot** (guest RAM already holds the kernel and
//! initrd; the vCPU may have started), not the boot-time target.
//!
//! Every process has a hard timeout and is killed by pid (its guard) on
//! every path, also on error.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::guest::{self, GuestImage};
use bulkhead_tests::process::{ChildGuard, workspace_binary};
use serde_json::{Value, json};

use super::client::Result;
use super::workload::median;

/// Firecracker's published boot target: start of the VMM to the guest's init.
pub const TARGET_BOOT_MS: f64 = 125.0;
/// Firecracker's published memory overhead target.
pub const TARGET_OVERHEAD_MIB: f64 = 5.0;
/// Hard limit for `bulkhead-vmm probe` (its two guests take 5 s each at most).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Hard limit for one boot up to the init's marker, before the timeout scale.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Hard limit for the dry run to see every backend connected.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the VMM may take to exit after `shutdown`.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Guest RAM, vCPUs and kernel command line of every run.
const MEMORY: &str = "512M";
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
/// The name `bulkhead-vmm` gives its guest-RAM memfd (`vmm/src/memory.rs`).
const GUEST_RAM_MAPPING: &str = "memfd:bulkhead-guest-ram";
/// The init's first line (`tests/guest/init`).
const INIT_MARKER: &str = "@@BULKHEAD BOOTED";
/// What `/test.sh` prints once the init has loaded modules and runs it.
const SETTLED_MARKER: &str = "@@BULKHEAD VALUE settled";
/// Disk image size for `bulkhead-blk`.
const DISK_SIZE: u64 = 64 << 20;

/// Settings of the VMM suite.
pub struct VmmArgs {
    /// Boots per configuration.
    pub boots: usize,
    /// Dry runs per configuration.
    pub dry_runs: usize,
}

/// Device configurations: a name and whether `bulkhead-blk` is attached.
const CONFIGS: [(&str, bool); 2] = [("blk", true), ("none", false)];

/// `bulkhead-vmm probe` under a hard timeout: `None` when KVM here can run a
/// 64-bit Linux guest, otherwise why not.
fn probe(vmm: &Path) -> Option<String> {
    let out = match tempfile::NamedTempFile::new() {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot create a temp file: {e}")),
    };
    let (Ok(o1), Ok(o2)) = (out.reopen(), out.reopen()) else {
        return Some("cannot reopen the temp file".into());
    };
    let mut cmd = Command::new(vmm);
    cmd.arg("probe").stdin(Stdio::null()).stdout(o1).stderr(o2);
    guest::die_with_parent(&mut cmd);
    let mut child = match ChildGuard::spawn("bulkhead-vmm probe", &mut cmd) {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    let status = child.wait_timeout(PROBE_TIMEOUT);
    let text = std::fs::read_to_string(out.path()).unwrap_or_default();
    // One line: the probe's reason, then the vCPU registers it logged.
    let text = text.trim().lines().collect::<Vec<_>>().join("; ");
    match status {
        Ok(Some(st)) if st.success() => None,
        Ok(Some(st)) => Some(if text.is_empty() {
            format!("bulkhead-vmm probe: {st}")
        } else {
            text
        }),
        Ok(None) => {
            let _ = child.kill();
            Some(format!(
                "bulkhead-vmm probe did not finish within {PROBE_TIMEOUT:?}"
            ))
        }
        Err(e) => Some(format!("bulkhead-vmm probe: {e}")),
    }
}

/// The VMM's memory, from `/proc/PID/smaps`, in KiB.
#[derive(Clone, Copy, Default)]
struct Mem {
    rss: u64,
    guest_rss: u64,
    private_dirty: u64,
    anonymous: u64,
    threads: u64,
}

impl Mem {
    fn sample(pid: u32) -> Result<Mem> {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .map_err(|e| format!("cannot read /proc/{pid}/smaps: {e}"))?;
        let mut m = Mem::default();
        let mut guest = false;
        let mut seen_guest = false;
        for line in smaps.lines() {
            let mut it = line.split_whitespace();
            let Some(first) = it.next() else { continue };
            if !first.ends_with(':') {
                // A mapping's header: "start-end perms offset dev inode [path]".
                guest = line.contains(GUEST_RAM_MAPPING);
                seen_guest |= guest;
                continue;
            }
            let kib: u64 = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            match (first, guest) {
                ("Rss:", true) => m.guest_rss += kib,
                ("Rss:", false) => m.rss += kib,
                ("Private_Dirty:", false) => m.private_dirty += kib,
                ("Anonymous:", false) => m.anonymous += kib,
                _ => {}
            }
        }
        if !seen_guest {
            return Err(format!("no {GUEST_RAM_MAPPING} mapping in /proc/{pid}/smaps").into());
        }
        m.threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        Ok(m)
    }
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 100.0).round() / 100.0
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Medians of memory samples, in MiB.
fn mem_json(samples: &[Mem]) -> Value {
    let med = |f: fn(&Mem) -> u64| {
        let v: Vec<f64> = samples.iter().map(|m| f(m) as f64).collect();
        mib(median(&v) as u64)
    };
    json!({
        "overhead_rss_mib": med(|m| m.rss),
        "overhead_private_dirty_mib": med(|m| m.private_dirty),
        "overhead_anonymous_mib": med(|m| m.anonymous),
        "guest_ram_rss_mib": med(|m| m.guest_rss),
        "threads": median(&samples.iter().map(|m| m.threads as f64).collect::<Vec<_>>()),
        "runs_overhead_rss_mib": samples.iter().map(|m| mib(m.rss)).collect::<Vec<_>>(),
    })
}

/// One VM's work directory (initrd, serial log, VMM log, API socket) and
/// its backend; everything is killed and removed on drop.
struct Vm {
    work: Scratch,
    blk: Option<Daemon>,
    vmm: Option<ChildGuard>,
}

impl Vm {
    /// Prepares the initrd (the kit's, plus `script` as `/test.sh`) and
    /// starts `bulkhead-blk` when `blk`.
    fn prepare(image: &GuestImage, script: &str, blk: bool) -> Result<Vm> {
        let work = Scratch::new(0)?;
        let initrd = work.dir().join("initrd.cpio");
        std::fs::copy(&image.initrd, &initrd)?;
        let extra = guest::newc_archive(&[("test.sh", script.as_bytes(), 0o755)]);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&initrd)?
            .write_all(&extra)?;
        let blk = if blk {
            Some(Daemon::blk(Scratch::new(DISK_SIZE)?, &[])?)
        } else {
            None
        };
        Ok(Vm {
            work,
            blk,
            vmm: None,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.dir().join(name)
    }

    fn command(&self, vmm: &Path, image: &GuestImage) -> Command {
        let mut cmd = Command::new(vmm);
        cmd.arg("--kernel")
            .arg(&image.kernel)
            .arg("--initrd")
            .arg(self.path("initrd.cpio"))
            .args(["--memory", MEMORY, "--cpus", "1", "--cmdline", CMDLINE]);
        if let Some(b) = &self.blk {
            cmd.arg("--blk")
                .arg(format!("socket={},transport=pci", b.socket().display()));
        }
        cmd.arg("--serial")
            .arg(format!("file={}", self.path("serial.log").display()))
            .arg("--api-socket")
            .arg(self.path("api.sock"));
        cmd
    }

    /// Spawns the VMM; returns when it was spawned.
    fn spawn(&mut self, vmm: &Path, image: &GuestImage) -> Result<Instant> {
        let mut cmd = self.command(vmm, image);
        let t0 = Instant::now();
        self.vmm = Some(guest::spawn_daemon(
            "bulkhead-vmm",
            &mut cmd,
            &self.path("vmm.log"),
        )?);
        Ok(t0)
    }

    fn vmm(&mut self) -> &mut ChildGuard {
        self.vmm.as_mut().expect("spawned")
    }

    /// Fails with the VMM's log when it or the backend exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(st)) = self.vmm().try_wait() {
            return Err(format!("bulkhead-vmm exited early: {st}; {}", self.log_tail()).into());
        }
        if let Some(b) = self.blk.as_mut()
            && !b.is_running()
        {
            return Err(format!("bulkhead-blk exited; {}", self.log_tail()).into());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.path("vmm.log")).unwrap_or_default();
        format!("vmm log: {}", guest::tail(&log, 5).replace('\n', " | "))
    }

    /// One request on the API socket, with timeouts.
    fn api(&self, req: &str) -> Result<Value> {
        let mut s = UnixStream::connect(self.path("api.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("{{\"cmd\":\"{req}\"}}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(serde_json::from_str(line.trim())?)
    }

    /// Stops the VMM through the API socket (exit status 5), and kills it by
    /// pid if that does not work within [`STOP_TIMEOUT`]. `Ok(true)` when it
    /// stopped cleanly.
    fn stop(&mut self) -> Result<bool> {
        let asked = self.api("shutdown").is_ok_and(|r| r["ok"] == true);
        let st = self.vmm().wait_timeout(STOP_TIMEOUT)?;
        let _ = self.vmm().kill();
        Ok(asked && st.and_then(|s| s.code()) == Some(5))
    }
}

/// Reads what was appended to a file since the last call.
struct Tail {
    path: PathBuf,
    pos: u64,
    text: String,
}

impl Tail {
    fn poll(&mut self) -> &str {
        if let Ok(mut f) = std::fs::File::open(&self.path)
            && f.seek(SeekFrom::Start(self.pos)).is_ok()
        {
            let mut buf = Vec::new();
            if let Ok(n) = f.read_to_end(&mut buf) {
                self.pos += n as u64;
                self.text.push_str(&String::from_utf8_lossy(&buf));
            }
        }
        &self.text
    }
}

/// One boot: milliseconds to the init's marker, the guest's own uptime
/// then, and the memory sample once `/test.sh` runs.
fn boot(vmm: &Path, image: &GuestImage, blk: bool) -> Result<(f64, f64, Mem)> {
    let script = format!("echo \"{SETTLED_MARKER} $(cut -d' ' -f1 /proc/uptime)\"\nsleep 600\n");
    let mut vm = Vm::prepare(image, &script, blk)?;
    let mut serial = Tail {
        path: vm.path("serial.log"),
        pos: 0,
        text: String::new(),
    };
    let t0 = vm.spawn(vmm, image)?;
    let deadline = t0 + BOOT_TIMEOUT.mul_f64(guest::timeout_scale());
    let mut init = None;
    loop {
        let now = Instant::now();
        let text = serial.poll();
        if init.is_none() && text.contains(INIT_MARKER) {
            init = Some(now - t0);
        }
        if text.contains(SETTLED_MARKER) {
            break;
        }
        vm.check_alive()?;
        if now >= deadline {
            return Err(format!(
                "no {:?} on the serial console within {:?}; serial: {}",
                if init.is_none() {
                    INIT_MARKER
                } else {
                    SETTLED_MARKER
                },
                BOOT_TIMEOUT.mul_f64(guest::timeout_scale()),
                guest::tail(&serial.text, 5).replace('\n', " | ")
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(if init.is_none() { 1 } else { 10 }));
    }
    let init = init.ok_or("no init marker")?;
    let uptime = serial
        .text
        .lines()
        .find_map(|l| l.split(INIT_MARKER).nth(1))
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    // Let the guest reach its idle sleep before sampling.
    std::thread::sleep(Duration::from_millis(300));
    let pid = vm.vmm().pid();
    let mem = Mem::sample(pid)?;
    vm.stop()?;
    Ok((ms(init), uptime * 1000.0, mem))
}

/// One dry run: the API socket's appearance, every backend connected, the
/// memory then; stopped through the API socket.
fn dry_run(vmm: &Path, image: &GuestImage, blk: bool) -> Result<(f64, f64, Mem, bool)> {
    let mut vm = Vm::prepare(image, "sleep 600\n", blk)?;
    let t0 = vm.spawn(vmm, image)?;
    let deadline = t0 + ATTACH_TIMEOUT.mul_f64(guest::timeout_scale());
    let mut api_ready = None;
    let want = usize::from(blk);
    let attached = loop {
        vm.check_alive()?;
        let now = Instant::now();
        if let Ok(r) = vm.api("list") {
            api_ready.get_or_insert(now - t0);
            let devs = r["devices"].as_array().cloned().unwrap_or_default();
            if devs.len() == want && devs.iter().all(|d| d["state"] == "connected") {
                break now - t0;
            }
        }
        if now >= deadline {
            return Err(format!(
                "not every backend connected within {ATTACH_TIMEOUT:?}; {}",
                vm.log_tail()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mem = Mem::sample(vm.vmm().pid())?;
    let clean = vm.stop()?;
    Ok((ms(api_ready.unwrap_or(attached)), ms(attached), mem, clean))
}

fn dry_runs(vmm: &Path, image: &GuestImage, runs: usize, blk: bool) -> Value {
    let mut api = Vec::new();
    let mut attached = Vec::new();
    let mut mems = Vec::new();
    let mut clean = 0;
    for _ in 0..runs {
        match dry_run(vmm, image, blk) {
            Ok((a, c, m, ok)) => {
                api.push(a);
                attached.push(c);
                mems.push(m);
                clean += usize::from(ok);
            }
            Err(e) => return json!({"error": e.to_string()}),
        }
    }
    let mut v = mem_json(&mems);
    v["api_ready_ms"] = json!(median(&api));
    v["attached_ms"] = json!(median(&attached));
    v["runs"] = json!(runs);
    v["stopped_cleanly"] = json!(clean);
    v
}

fn boots(vmm: &Path, image: &GuestImage, runs: usize, blk: bool) -> Value {
    let mut init = Vec::new();
    let mut uptime = Vec::new();
    let mut mems = Vec::new();
    for _ in 0..runs {
        match boot(vmm, image, blk) {
            Ok((t, u, m)) => {
                init.push(t);
                uptime.push(u);
                mems.push(m);
            }
            Err(e) => return json!({"error": e.to_string()}),
        }
    }
    let mut v = mem_json(&mems);
    v["boot_to_init_ms"] = json!(median(&init));
    v["runs_boot_to_init_ms"] = json!(init);
    v["guest_uptime_at_init_ms"] = json!((median(&uptime) * 10.0).round() / 10.0);
    v["runs"] = json!(runs);
    v
}

/// Runs the suite; never fails for a KVM that cannot boot Linux (that is
/// `measured: false`), only for a missing binary or image.
pub fn run(a: &VmmArgs) -> Result<Value> {
    let vmm = workspace_binary("bulkhead-vmm");
    if !vmm.exists() {
        return Err(format!(
            "{} not found (cargo build --release -p bulkhead-vmm)",
            vmm.display()
        )
        .into());
    }
    let t = Instant::now();
    let probe = probe(&vmm);
    let probe_s = (t.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    match &probe {
        None => eprintln!("vmm: probe: KVM here runs a 64-bit Linux guest"),
        Some(why) => eprintln!("vmm: probe: cannot boot Linux here: {why}"),
    }
    let image = std::panic::catch_unwind(guest::image)
        .map_err(|_| "the guest image could not be built (tests/guest/build-image)")?;
    let mut dry = serde_json::Map::new();
    for (name, blk) in CONFIGS {
        let v = dry_runs(&vmm, image, a.dry_runs, blk);
        eprintln!("vmm: dry run ({name}): {v}");
        dry.insert(name.into(), v);
    }
    let mut boot_json = serde_json::Map::new();
    if probe.is_none() {
        for (name, blk) in CONFIGS {
            let v = boots(&vmm, image, a.boots, blk);
            eprintln!("vmm: boots ({name}): {v}");
            boot_json.insert(name.into(), v);
        }
    }
    let measured = probe.is_none() && boot_json.values().all(|v| v.get("error").is_none());
    let reason = match &probe {
        Some(why) => Some(why.clone()),
        None => boot_json
            .values()
            .find_map(|v| v["error"].as_str().map(String::from)),
    };
    let command = std::env::var("BULKHEAD_BENCH_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let generated = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    Ok(json!({
        "generated": generated,
        "command": command,
        "load_after": load,
        "measured": measured,
        "reason": reason,
        "probe": {"ok": probe.is_none(), "reason": probe, "secs": probe_s},
        "targets": {"boot_to_init_ms": TARGET_BOOT_MS, "overhead_mib": TARGET_OVERHEAD_MIB},
        "method": {
            "boots": a.boots,
            "dry_runs": a.dry_runs,
            "memory": MEMORY,
            "cpus": 1,
            "cmdline": CMDLINE,
            "kernel": image.kernel_release,
            "transport": "pci",
        },
        "boots": if boot_json.is_empty() { Value::Null } else { Value::Object(boot_json) },
        "dry_run": Value::Object(dry),
    }))
}
