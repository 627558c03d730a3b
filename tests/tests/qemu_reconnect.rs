//! A Linux guest (QEMU TCG) keeps its disk while `bulkhead-blk` is
//! SIGKILLed and restarted under it.
//!
//! QEMU's `vhost-user-blk-pci` sits on a *reconnecting* client chardev
//! (`reconnect-ms`): when the backend dies, QEMU stops the device, keeps the
//! guest's requests queued and dials the socket again every 200 ms; on
//! reconnect it hands the new backend the same inflight area, which
//! `bulkhead-blk` reads to resubmit every request the dead process had taken
//! off the ring but not completed (see `docs/blk.md`). The guest sees only a
//! pause.
//!
//! - [`qemu_guest_fio_verify_survives_three_backend_sigkills`]: the guest
//!   runs an fio write-and-verify job (4 KiB random writes with crc32c,
//!   every loop written then read back and verified); the host SIGKILLs the
//!   backend 3, 7 and 11 s after fio starts and starts a fresh one on the
//!   same socket and image each time. fio must report no error, the guest
//!   kernel must log no I/O error, and every kill must land while fio runs.
//! - [`qemu_guest_survives_live_upgrade_to_another_binary`]: a live upgrade.
//!   QEMU has no command to move a `vhost-user-blk` device to another
//!   socket, so an in-place upgrade is what QEMU supports: the old process
//!   is killed and the new binary (here a copy of `bulkhead-blk` at another
//!   path, run with the other I/O engine) is started on the same socket
//!   path. Afterwards the guest writes a known pattern with `dd`, and the
//!   host finds those bytes in the image.
//!
//! The guest tells the host when fio starts and ends on a second serial
//! port (`/dev/ttyS1`, a file on the host); the host kills on a clock
//! started there. A backend holds a request for microseconds, so a kill at
//! a random moment rarely finds one in flight; the host therefore watches
//! the backend's inflight area (its memfd, opened through `/proc`), freezes
//! the backend with SIGSTOP when the area shows requests, and SIGKILLs it
//! frozen if they are still there. Each backend logs to its own file; the
//! test prints, per kill, the requests in flight at the SIGKILL and those the
//! successor reported resubmitting ("resubmitting N request(s)"), and the
//! restart test asserts that some were resubmitted and never more than
//! were in flight. Every process is killed by pid when the test ends,
//! passed or not, and QEMU runs under a hard timeout.

use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bulkhead_tests::guest::{
    Guest, GuestRun, VHOST_USER_BLK_QUEUE_SIZE, spawn_daemon, tail, timeout_scale,
};
use bulkhead_tests::process::{ChildGuard, workspace_binary};
use rand::{RngCore, SeedableRng, rngs::StdRng};

const MIB: u64 = 1024 * 1024;
/// Disk size. Layout: fio's region in [0, 32 MiB), the pattern at 64 MiB.
const DISK_SIZE: u64 = 128 * MIB;
const FIO_MIB: u64 = 32;
const PATTERN_OFFSET_MIB: u64 = 64;
const PATTERN_MIB: u64 = 4;
/// How often QEMU dials a lost backend again.
const RECONNECT_MS: u32 = 200;
/// Hard limit for one guest run (boot, fio, checks), before the timeout scale.
const GUEST_TIMEOUT: Duration = Duration::from_secs(360);
/// How long a backend may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines written by the guest to its control port (`/dev/ttyS1`).
const FIO_STARTED: &str = "fio-started";
const FIO_DONE: &str = "fio-done";
/// What each restarted backend logs when it finds requests in flight.
const RESUBMIT_LOG: &str = "resubmitting ";
/// The name `bulkhead-blk` gives the inflight area's memfd.
const INFLIGHT_MEMFD: &str = "bulkhead-inflight";
/// How long, from its scheduled time, a kill waits for a moment when the
/// backend has requests in flight (stretched by the timeout scale).
const CATCH_WINDOW: Duration = Duration::from_secs(4);
/// Inflight area layout (vhost-user spec, split rings): a 16-byte queue
/// header, then 16 bytes per descriptor whose first byte is the flag.
const INFLIGHT_HEADER: usize = 16;
const INFLIGHT_DESC: usize = 16;

/// How one backend process is started.
#[derive(Clone, Debug)]
struct BackendSpec {
    /// The executable.
    binary: PathBuf,
    /// The I/O engine (`io-uring` or `sync`).
    engine: &'static str,
}

/// A kill of the running backend, `after` fio started, followed by a start
/// of `successor` on the same socket and image.
struct Kill {
    after: Duration,
    successor: BackendSpec,
}

/// One backend process the test started and what became of it.
#[derive(Debug)]
struct Generation {
    spec: BackendSpec,
    pid: u32,
    log: PathBuf,
    /// When it was started.
    started: Instant,
    /// How it ended: killed on schedule, died by itself, or stopped at the end.
    end: String,
    /// Time from the SIGKILL of its predecessor to its socket being there.
    restart_took: Option<Duration>,
    /// Requests its inflight area marked in flight once it was SIGKILLed
    /// (`None`: not killed, or the area could not be read).
    in_flight_at_kill: Option<usize>,
    /// SIGSTOPs it took to freeze it with requests in flight.
    freezes: u32,
}

impl Generation {
    fn new(spec: BackendSpec, child: &ChildGuard, log: PathBuf) -> Self {
        Generation {
            spec,
            pid: child.pid(),
            log,
            started: Instant::now(),
            end: String::new(),
            restart_took: None,
            in_flight_at_kill: None,
            freezes: 0,
        }
    }

    /// Requests this process reported resubmitting, summed over its queues.
    fn resubmitted(&self) -> u64 {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| {
                let rest = &l[l.find(RESUBMIT_LOG)? + RESUBMIT_LOG.len()..];
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

/// What the supervisor thread saw.
#[derive(Debug, Default)]
struct Report {
    generations: Vec<Generation>,
    /// When the guest said fio was starting.
    fio_start: Option<Instant>,
    /// Everything that went wrong on the host side; empty on success.
    errors: Vec<String>,
    /// Kills done, with whether fio was still running at each.
    kills: Vec<(Duration, bool)>,
}

/// Paths one scenario works with.
struct Setup {
    dir: PathBuf,
    image: PathBuf,
    socket: PathBuf,
    /// The host end of the guest's `/dev/ttyS1`.
    control: PathBuf,
}

/// Starts one backend generation with its own log file and waits for its
/// socket. The stale socket of a killed predecessor is removed first, so
/// that the socket's appearance means the new process listens (QEMU's
/// reconnect attempts just fail until then).
fn start_backend(
    setup: &Setup,
    spec: &BackendSpec,
    index: usize,
) -> Result<(ChildGuard, PathBuf), String> {
    let log = setup.dir.join(format!("backend-{index}.log"));
    match fs::remove_file(&setup.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("remove stale socket: {e}")),
    }
    let mut cmd = Command::new(&spec.binary);
    cmd.arg("--socket-path")
        .arg(&setup.socket)
        .arg("--image")
        .arg(&setup.image)
        .args(["--num-queues", "1", "--engine", spec.engine])
        .env("RUST_LOG", "info");
    let mut child = spawn_daemon(&format!("bulkhead-blk #{index}"), &mut cmd, &log)
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + SOCKET_TIMEOUT.mul_f64(timeout_scale());
    while !setup.socket.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "backend #{index} exited before creating its socket: {st}\n{}",
                log_tail(&log)
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("backend #{index} created no socket in time"));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok((child, log))
}

fn log_tail(log: &Path) -> String {
    tail(&fs::read_to_string(log).unwrap_or_default(), 20)
}

/// The inflight area of the backend `pid`, opened through `/proc` (the
/// memfd it created or was handed back by QEMU).
fn open_inflight_area(pid: u32) -> Option<File> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    fds.flatten()
        .find(|fd| {
            fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().contains(INFLIGHT_MEMFD))
        })
        .and_then(|fd| File::open(fd.path()).ok())
}

/// How many descriptors queue 0's inflight area marks in flight.
fn in_flight_heads(area: &File) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; INFLIGHT_HEADER + INFLIGHT_DESC * VHOST_USER_BLK_QUEUE_SIZE as usize];
    area.read_exact_at(&mut buf, 0)?;
    Ok(buf[INFLIGHT_HEADER..]
        .chunks_exact(INFLIGHT_DESC)
        .filter(|d| d[0] == 1)
        .count())
}

/// Whether every thread of process `pid` is stopped (by SIGSTOP).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // "tid (comm) STATE ...": comm may hold spaces and parentheses.
            stat.rfind(')')
                .and_then(|at| stat[at + 1..].split_whitespace().next())
                .is_some_and(|state| state == "T")
        })
    })
}

/// SIGKILLs the backend at a moment when its inflight area holds requests,
/// so that its successor has some to resubmit: when the area shows some,
/// the backend is frozen with SIGSTOP and the area read again; if they are
/// still there it is killed frozen, else it goes on (SIGCONT) and the next
/// moment is tried. Past [`CATCH_WINDOW`] (or without the area) it is killed
/// anyway. Returns how it ended and the requests in flight at its death;
/// counts the freezes in `freezes`.
fn kill_with_requests_in_flight(
    child: &mut ChildGuard,
    area: Option<&File>,
    freezes: &mut u32,
) -> (Option<ExitStatus>, Option<usize>) {
    let busy = |area: &File| in_flight_heads(area).is_ok_and(|n| n > 0);
    if let Some(area) = area {
        let deadline = Instant::now() + CATCH_WINDOW.mul_f64(timeout_scale().max(1.0));
        while Instant::now() < deadline {
            if !busy(area) {
                std::hint::spin_loop();
                continue;
            }
            if child.signal(libc::SIGSTOP).is_err() {
                break;
            }
            let frozen_by = Instant::now() + Duration::from_secs(1);
            while !all_threads_stopped(child.pid()) && Instant::now() < frozen_by {
                thread::sleep(Duration::from_micros(100));
            }
            *freezes += 1;
            if all_threads_stopped(child.pid()) && busy(area) {
                break;
            }
            let _ = child.signal(libc::SIGCONT);
        }
    }
    let status = child.kill().ok().flatten();
    (status, area.and_then(|a| in_flight_heads(a).ok()))
}

/// Whether the guest wrote `line` to its control port.
fn control_says(control: &Path, line: &str) -> bool {
    fs::read_to_string(control)
        .map(|s| s.lines().any(|l| l.trim() == line))
        .unwrap_or(false)
}

/// How a process the test meant to SIGKILL ended; an error unless by SIGKILL.
fn killed_by_sigkill(status: Option<ExitStatus>) -> Result<(), String> {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(st) if st.signal() == Some(libc::SIGKILL) => Ok(()),
        // SIGSYS would be the sandbox's seccomp filter (see dmesg).
        Some(st) => Err(format!("had already ended: {st}")),
        None => Err("was not running".to_string()),
    }
}

/// The host side of a scenario, on its own thread: waits for fio to start,
/// then kills and replaces the backend on the schedule, watches for
/// unexpected deaths, and at the end stops the last backend. The backends
/// it starts die with this thread (see `guest::die_with_parent`), so it
/// lives until the guest is done.
struct Supervisor {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Report>>,
}

impl Supervisor {
    fn start(setup: Setup, first: (ChildGuard, Generation), schedule: Vec<Kill>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || supervise(&setup, first, schedule, &flag));
        Supervisor {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the supervisor (and the last backend) and returns its report.
    fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.handle.take().expect("supervisor runs");
        handle.join().unwrap_or_else(|_| Report {
            errors: vec!["the supervisor thread panicked".to_string()],
            ..Report::default()
        })
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn supervise(
    setup: &Setup,
    first: (ChildGuard, Generation),
    schedule: Vec<Kill>,
    stop: &AtomicBool,
) -> Report {
    let mut report = Report::default();
    let (mut current, gen0) = first;
    report.generations.push(gen0);
    let stopped = || stop.load(Ordering::SeqCst);

    // Watches the running backend until `until` (or the stop flag); a
    // backend that dies by itself is an error, and it is replaced so that
    // the guest can finish and report.
    let watch = |current: &mut ChildGuard, report: &mut Report, until: Option<Instant>| {
        loop {
            if stopped() || until.is_some_and(|t| Instant::now() >= t) {
                return;
            }
            if let Ok(Some(st)) = current.try_wait() {
                let n = report.generations.len();
                let last = report.generations.last_mut().expect("a generation");
                last.end = format!("died by itself: {st}");
                report.errors.push(format!(
                    "backend #{} ({}) died by itself: {st} (SIGSYS: the sandbox; \
                     see dmesg)\n{}",
                    n - 1,
                    last.pid,
                    log_tail(&last.log)
                ));
                if n > 6 {
                    return;
                }
                let spec = last.spec.clone();
                match start_backend(setup, &spec, n) {
                    Ok((child, log)) => {
                        report.generations.push(Generation::new(spec, &child, log));
                        *current = child;
                    }
                    Err(e) => {
                        report.errors.push(e);
                        return;
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
    };

    // The clock starts when the guest says fio is starting.
    loop {
        watch(&mut current, &mut report, Some(Instant::now()));
        if stopped() {
            report
                .errors
                .push("the guest ended before fio started".to_string());
            return report;
        }
        if control_says(&setup.control, FIO_STARTED) {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let fio_start = Instant::now();
    report.fio_start = Some(fio_start);

    for (i, kill) in schedule.into_iter().enumerate() {
        watch(&mut current, &mut report, Some(fio_start + kill.after));
        if stopped() {
            report
                .errors
                .push(format!("the guest ended before kill {}", i + 1));
            return report;
        }
        let area = open_inflight_area(current.pid());
        let n = report.generations.len();
        let last = report.generations.last_mut().expect("a generation");
        let (status, in_flight) =
            kill_with_requests_in_flight(&mut current, area.as_ref(), &mut last.freezes);
        let killed_at = Instant::now();
        let fio_running = !control_says(&setup.control, FIO_DONE);
        report.kills.push((killed_at - fio_start, fio_running));
        last.in_flight_at_kill = in_flight;
        match killed_by_sigkill(status) {
            Ok(()) => {
                last.end = format!(
                    "SIGKILLed {:.1} s after fio started",
                    (killed_at - fio_start).as_secs_f64()
                )
            }
            Err(e) => {
                last.end = e.clone();
                report
                    .errors
                    .push(format!("backend #{} {e}\n{}", n - 1, log_tail(&last.log)));
            }
        }
        if !fio_running {
            report.errors.push(format!(
                "kill {} came {:.1?} after fio started, but fio had finished: \
                 the guest's fio job is too short for this machine",
                i + 1,
                killed_at - fio_start
            ));
        }
        match start_backend(setup, &kill.successor, n) {
            Ok((child, log)) => {
                let mut next = Generation::new(kill.successor, &child, log);
                next.restart_took = Some(killed_at.elapsed());
                report.generations.push(next);
                current = child;
            }
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        }
    }
    watch(&mut current, &mut report, None);

    // A clean stop of the last backend: its exit totals go to its log.
    let _ = current.signal(libc::SIGTERM);
    let status = current.wait_timeout(Duration::from_secs(10)).ok().flatten();
    if let Some(last) = report.generations.last_mut()
        && last.end.is_empty()
    {
        last.end = match status {
            Some(st) => format!("stopped at the end: {st}"),
            None => "killed at the end (SIGTERM ignored)".to_string(),
        };
    }
    report
}

/// The guest's script. `pattern`: also write `/data/pattern.bin` at
/// [`PATTERN_OFFSET_MIB`] after fio and read it back.
fn guest_script(fio_loops: u32, pattern: bool) -> String {
    let sectors = DISK_SIZE / 512;
    let pattern_steps = if pattern {
        format!(
            r#"
# A known pattern, written through the last backend, read back past the
# page cache; the host then reads it from the image.
want=$(sha256sum /data/pattern.bin | cut -d' ' -f1)
check pattern-write dd if=/data/pattern.bin of=/dev/vda bs=1M seek={PATTERN_OFFSET_MIB} conv=fsync
sync; echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=1M skip={PATTERN_OFFSET_MIB} count={PATTERN_MIB} 2>/dev/null | sha256sum | cut -d' ' -f1)
expect_eq pattern-readback "$got" "$want"
"#
        )
    } else {
        String::new()
    };
    format!(
        r#"
mkdir -p /data
expect_eq disk-present "$(ls /sys/block | grep -c '^vda$')" 1
expect_eq size "$(cat /sys/block/vda/size)" {sectors}

# fio: 4 KiB random writes with crc32c checksums over {FIO_MIB} MiB, then
# every block read back and verified, {fio_loops} times over. The host
# kills the backend on a clock started by the control-port line.
echo {FIO_STARTED} > /dev/ttyS1
t0=$(cut -d' ' -f1 /proc/uptime)
fio --name=restart --filename=/dev/vda --size={FIO_MIB}M --rw=randwrite --bs=4k \
  --ioengine=libaio --iodepth=16 --direct=1 --loops={fio_loops} \
  --verify=crc32c --verify_fatal=1 --do_verify=1 >/data/fio.out 2>&1
rc=$?
echo {FIO_DONE} > /dev/ttyS1
t1=$(cut -d' ' -f1 /proc/uptime)
cat /data/fio.out
value fio-seconds "$(awk -v a=$t0 -v b=$t1 'BEGIN {{ print b - a }}')"
value fio-issued "$(grep -o 'issued rwts: total=[0-9,]*' /data/fio.out | cut -d= -f2)"
expect_eq fio-exit-code $rc 0
expect_eq fio-errors "$(grep -o 'err= *[0-9]*' /data/fio.out | tr -d ' ')" err=0
# Each loop reads back every block it wrote.
expect_eq fio-verified-all "$(grep -o 'issued rwts: total=[0-9]*,[0-9]*' /data/fio.out \
  | cut -d= -f2 | awk -F, '{{ print ($1 == $2 && $2 == {fio_loops} * {FIO_MIB} * 256) }}')" 1
{pattern_steps}
# The guest kernel saw no failed request.
dmesg >/data/dmesg
grep -E 'I/O error|blk_update_request|critical medium|virtio_blk.*err' /data/dmesg >/data/ioerr
expect_eq no-io-error-in-dmesg "$(wc -l </data/ioerr) $(head -n 3 /data/ioerr | tr '\n' ' ')" "0 "
grep -i virtio /data/dmesg | tail -n 5
"#
    )
}

/// Creates the scenario's directory, image and first backend.
fn prepare(name: &str, first: &BackendSpec) -> (tempfile::TempDir, (ChildGuard, Generation)) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("bulkhead-{name}-"))
        .tempdir()
        .expect("tempdir");
    let setup = setup_in(dir.path());
    File::create(&setup.image)
        .and_then(|f| f.set_len(DISK_SIZE))
        .expect("create image");
    let (child, log) = start_backend(&setup, first, 0).unwrap_or_else(|e| panic!("{e}"));
    let generation = Generation::new(first.clone(), &child, log);
    (dir, (child, generation))
}

fn setup_in(dir: &Path) -> Setup {
    Setup {
        dir: dir.to_path_buf(),
        image: dir.join("disk.img"),
        socket: dir.join("blk.sock"),
        control: dir.join("control.log"),
    }
}

/// Boots the guest on a reconnecting chardev while the supervisor works
/// through `schedule`; returns the guest's run and the host's report, having
/// printed both.
fn run_scenario(
    name: &str,
    dir: &Path,
    first: (ChildGuard, Generation),
    schedule: Vec<Kill>,
    guest: Guest,
    packed: bool,
) -> (GuestRun, Report) {
    let setup = setup_in(dir);
    let mut chardev = OsString::from(format!("socket,id=c0,reconnect-ms={RECONNECT_MS},path="));
    chardev.push(setup.socket.as_os_str());
    let mut control = OsString::from("file:");
    control.push(setup.control.as_os_str());
    let guest = guest
        .qemu_args([
            "-chardev".into(),
            chardev,
            "-device".into(),
            format!(
                "vhost-user-blk-pci,chardev=c0,num-queues=1,queue-size={VHOST_USER_BLK_QUEUE_SIZE}{}",
                if packed { ",packed=on" } else { "" }
            )
            .into(),
            // The control port: the guest's /dev/ttyS1.
            "-serial".into(),
            control,
        ])
        .timeout(GUEST_TIMEOUT);

    let supervisor = Supervisor::start(setup, first, schedule);
    let run = guest.run();
    let report = supervisor.finish();

    eprintln!(
        "{name}: guest ran {:.1?}, fio took {} s (guest clock), issued r,w = {}",
        run.elapsed,
        run.value("fio-seconds").unwrap_or("?"),
        run.value("fio-issued").unwrap_or("?")
    );
    for (i, (at, running)) in report.kills.iter().enumerate() {
        eprintln!(
            "{name}: kill {} at {:.2?} after fio started (fio running: {running})",
            i + 1,
            at
        );
    }
    for (i, g) in report.generations.iter().enumerate() {
        eprintln!(
            "{name}: backend #{i} pid {} {} --engine {}: started {}, restart took {}, \
             {} in flight at its kill ({} freeze(s)), resubmitted {} request(s), {}",
            g.pid,
            g.spec.binary.display(),
            g.spec.engine,
            match report.fio_start {
                Some(t) if g.started >= t => {
                    format!("{:.2?} after fio started", g.started - t)
                }
                _ => "before fio started".to_string(),
            },
            g.restart_took
                .map(|d| format!("{d:.2?}"))
                .unwrap_or_else(|| "-".to_string()),
            g.in_flight_at_kill
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".to_string()),
            g.freezes,
            g.resubmitted(),
            g.end
        );
    }
    let failed = !run.passed() || !report.errors.is_empty();
    if failed {
        let logs: String = report
            .generations
            .iter()
            .enumerate()
            .map(|(i, g)| format!("--- backend #{i} log:\n{}\n", log_tail(&g.log)))
            .collect();
        let stalled = if run.timed_out {
            "the guest stalled: the last backend's exit totals say whether it served any \
             request after its restart\n"
        } else {
            ""
        };
        panic!(
            "{name} failed\n{stalled}host-side errors: {:#?}\n{}{logs}",
            report.errors,
            run.report()
        );
    }
    (run, report)
}

fn bulkhead_blk() -> PathBuf {
    let bin = workspace_binary("bulkhead-blk");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// Per kill: requests in flight at the backend's death, and requests its
/// successor reported resubmitting. Printed; returns them.
fn resubmissions(name: &str, report: &Report) -> Vec<(Option<usize>, u64)> {
    let pairs: Vec<(Option<usize>, u64)> = report
        .generations
        .windows(2)
        .map(|w| (w[0].in_flight_at_kill, w[1].resubmitted()))
        .collect();
    for (i, (caught, resubmitted)) in pairs.iter().enumerate() {
        eprintln!(
            "{name}: kill {}: {} request(s) in flight at the SIGKILL, {resubmitted} resubmitted \
             by the next backend",
            i + 1,
            caught.map_or_else(|| "?".to_string(), |n| n.to_string())
        );
    }
    pairs
}

#[test]
fn qemu_guest_fio_verify_survives_three_backend_sigkills() {
    let spec = BackendSpec {
        binary: bulkhead_blk(),
        engine: "io-uring",
    };
    let (dir, first) = prepare("qemu-reconnect", &spec);
    let schedule = [3, 7, 11]
        .into_iter()
        .map(|s| Kill {
            after: Duration::from_secs(s),
            successor: spec.clone(),
        })
        .collect();
    let guest = Guest::new(guest_script(8, false));
    let (_, report) = run_scenario("restart", dir.path(), first, schedule, guest, false);
    assert_eq!(report.generations.len(), 4);
    let pairs = resubmissions("restart", &report);
    // A restarted backend resubmits what was in flight, never more (one
    // fewer when the kill fell between publishing a used entry and
    // clearing its flag).
    for (i, (caught, resubmitted)) in pairs.iter().enumerate() {
        if let Some(caught) = caught {
            assert!(
                *resubmitted <= *caught as u64,
                "kill {}: {resubmitted} resubmitted, only {caught} were in flight",
                i + 1
            );
        }
    }
    assert!(
        pairs.iter().any(|(_, r)| *r > 0),
        "no restart resubmitted anything: the inflight path did not run ({pairs:?})"
    );
}

/// The same three SIGKILLs with `packed=on`: the guest's driver uses the
/// packed ring (feature bit 34), its requests are indirect (one ring slot
/// each), and each restarted backend resubmits them from its inflight record.
#[test]
fn qemu_guest_fio_verify_survives_three_backend_sigkills_on_packed_rings() {
    let spec = BackendSpec {
        binary: bulkhead_blk(),
        engine: "io-uring",
    };
    let (dir, first) = prepare("qemu-reconnect-packed", &spec);
    let schedule = [3, 7, 11]
        .into_iter()
        .map(|s| Kill {
            after: Duration::from_secs(s),
            successor: spec.clone(),
        })
        .collect();
    let script = format!(
        "expect_eq packed-ring \"$(cut -c35 /sys/block/vda/device/features)\" 1\n{}",
        guest_script(8, false)
    );
    let (run, report) = run_scenario(
        "restart-packed",
        dir.path(),
        first,
        schedule,
        Guest::new(script),
        true,
    );
    run.assert_check("packed", "packed-ring");
    assert_eq!(report.generations.len(), 4);
    let pairs = resubmissions("restart-packed", &report);
    for (i, (caught, resubmitted)) in pairs.iter().enumerate() {
        if let Some(caught) = caught {
            assert!(
                *resubmitted <= *caught as u64,
                "kill {}: {resubmitted} resubmitted, only {caught} were in flight",
                i + 1
            );
        }
    }
    assert!(
        pairs.iter().any(|(_, r)| *r > 0),
        "no restart resubmitted anything: the packed inflight path did not run ({pairs:?})"
    );
}

#[test]
fn qemu_guest_survives_live_upgrade_to_another_binary() {
    let old = BackendSpec {
        binary: bulkhead_blk(),
        engine: "io-uring",
    };
    let (dir, first) = prepare("qemu-upgrade", &old);
    // The "new version": another executable file, run with the other engine.
    let new_binary = dir.path().join("bulkhead-blk-new");
    fs::copy(&old.binary, &new_binary).expect("copy the binary");
    let new = BackendSpec {
        binary: new_binary,
        engine: "sync",
    };
    let schedule = vec![Kill {
        after: Duration::from_secs(4),
        successor: new.clone(),
    }];
    let mut pattern = vec![0u8; (PATTERN_MIB * MIB) as usize];
    StdRng::seed_from_u64(0x5eed_b10c).fill_bytes(&mut pattern);
    let guest = Guest::new(guest_script(4, true)).file("/data/pattern.bin", pattern.clone());
    let (_, report) = run_scenario("upgrade", dir.path(), first, schedule, guest, false);
    assert_eq!(report.generations.len(), 2);
    assert_eq!(report.generations[1].spec.binary, new.binary);
    resubmissions("upgrade", &report);

    // The bytes the guest wrote through the new binary are in the image.
    let disk = fs::read(dir.path().join("disk.img")).expect("read image");
    assert_eq!(disk.len() as u64, DISK_SIZE, "image size changed");
    let at = (PATTERN_OFFSET_MIB * MIB) as usize;
    assert!(
        disk[at..at + pattern.len()] == *pattern,
        "the guest's pattern is not in the image at {PATTERN_OFFSET_MIB} MiB"
    );
}
