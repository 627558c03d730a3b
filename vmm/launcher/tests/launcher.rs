//! `bulkhead up` end to end: backends come up, a SIGKILLed backend is
//! restarted automatically, and SIGTERM to the launcher leaves no process
//! (checked by pid) and no socket behind. Once with backends only, once
//! with QEMU (TCG) as the frontend running a Linux guest that keeps writing
//! to the disk across the restart, and once with `bulkhead-vmm` as the
//! frontend (through the nested host where KVM here cannot run Linux) with
//! blk, net and console, where the guest's own power-off ends the launcher
//! with status 0. Build first:
//! `cargo build -p bulkhead-launcher -p bulkhead-blk -p bulkhead-console -p bulkhead-vmm`.

// Test code: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::guest;
use bulkhead_tests::nested;
use std::os::unix::fs::MetadataExt;

use bulkhead_tests::netns::NetNs;
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::skip::{self, skip_if};

struct Launcher {
    child: Child,
    dir: tempfile::TempDir,
    run: PathBuf,
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn up(toml_body: &str) -> Launcher {
    up_in(None, toml_body)
}

/// `bulkhead up` on `toml_body`, inside network namespace `ns` if given
/// (`ip netns exec` execs the launcher: the child's pid is the launcher's).
fn up_in(ns: Option<&NetNs>, toml_body: &str) -> Launcher {
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-launcher")
        .tempdir()
        .unwrap();
    let run = dir.path().join("run");
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!("runtime_dir = \"{}\"\n{toml_body}", run.display()),
    )
    .unwrap();
    let mut cmd = match ns {
        Some(ns) => ns.command(workspace_binary("bulkhead")),
        None => Command::new(workspace_binary("bulkhead")),
    };
    let child = cmd
        .args(["up", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .spawn()
        .expect("start bulkhead (cargo build -p bulkhead-launcher)");
    Launcher { child, dir, run }
}

fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_or(what, timeout, f, String::new)
}

/// [`wait_for`], with `detail()` added to the timeout's message.
fn wait_for_or<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    detail: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}{}",
            detail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pid_of(run: &Path, id: &str) -> Option<i32> {
    std::fs::read_to_string(run.join(format!("{id}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn connectable(p: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(p).is_ok()
}

/// Waits for `id` to be up: a live pid and a socket that accepts.
fn wait_up(l: &Launcher, id: &str) -> i32 {
    wait_for(&format!("{id} up"), Duration::from_secs(30), || {
        pid_of(&l.run, id).filter(|p| alive(*p) && connectable(&l.run.join(format!("{id}.sock"))))
    })
}

/// SIGKILLs `id` and waits for the launcher to restart it; returns the new pid.
fn kill_and_wait_restart(l: &Launcher, id: &str) -> (i32, i32) {
    let old = wait_up(l, id);
    // SAFETY: kill(2) on the backend's pid, read from the launcher's pid file.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    let new = wait_for(&format!("{id} restarted"), Duration::from_secs(30), || {
        pid_of(&l.run, id)
            .filter(|p| *p != old && alive(*p) && connectable(&l.run.join(format!("{id}.sock"))))
    });
    (old, new)
}

/// SIGTERM to the launcher: it exits 0 and every pid in `pids` is gone, as is the runtime dir.
fn stop_and_check_clean(mut l: Launcher, pids: &[i32]) {
    let launcher = l.child.id() as i32;
    // SAFETY: kill(2) on our child.
    assert_eq!(unsafe { libc::kill(launcher, libc::SIGTERM) }, 0);
    let st = wait_for("the launcher to exit", Duration::from_secs(30), || {
        l.child.try_wait().ok().flatten()
    });
    assert_eq!(st.code(), Some(0), "launcher exit status {st}");
    for &p in pids {
        assert!(!alive(p), "process {p} survived the launcher");
    }
    assert!(
        !l.run.exists(),
        "runtime dir left behind: {:?}",
        std::fs::read_dir(&l.run).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
}

#[test]
fn backends_only_a_killed_backend_is_restarted_and_sigterm_leaves_nothing() {
    let l = up(r#"
frontend = "none"
[restart]
initial_delay_ms = 50
[[blk]]
image = "disk.img"
[[console]]
"#);
    let console = wait_up(&l, "console0");
    // A root launcher runs its backends as nobody by default (least
    // privilege), once they have opened their image and sockets.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        for id in ["console0", "blk0"] {
            let pid = wait_up(&l, id);
            wait_runs_as_nobody(id, pid);
        }
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        assert_image_passed_as_fd(&l, wait_up(&l, "blk0"));
    }
    let (old, new) = kill_and_wait_restart(&l, "blk0");
    if root {
        // Opened afresh for the restarted daemon.
        assert_image_passed_as_fd(&l, new);
    }
    // A second crash, with the doubled delay.
    let (_, newer) = kill_and_wait_restart(&l, "blk0");
    assert_eq!(
        pid_of(&l.run, "console0"),
        Some(console),
        "console untouched"
    );
    // Each backend serves its counters in the runtime directory, the
    // restarted one on the socket its killed predecessor left there.
    for (id, prefix) in [("blk0", "bulkhead_blk_"), ("console0", "bulkhead_console_")] {
        let sock = l.run.join(format!("{id}.sock.stats"));
        let v = wait_for(&format!("{id}'s stats"), Duration::from_secs(5), || {
            bulkhead_tests::stats::stats(&sock).ok()
        });
        assert!(v["queue_chains"].is_array(), "{id}: {v}");
        let text = bulkhead_tests::stats::metrics(&sock).unwrap();
        bulkhead_tests::stats::check_exposition(&text, prefix)
            .unwrap_or_else(|e| panic!("{id}: {e}\n{text}"));
    }
    stop_and_check_clean(l, &[old, new, newer, console]);
}

#[test]
fn throttle_group_members_share_one_memfd_and_a_run_time_change() {
    let l = up(r#"
frontend = "none"
[restart]
initial_delay_ms = 50
[[blk]]
image = "disk.img"
readonly = true
throttle_group = "g1"
throttle = { iops-total = 50 }
[[blk]]
image = "disk.img"
readonly = true
throttle_group = "g1"
"#);
    let group_fd = |pid: i32| -> (String, std::path::PathBuf) {
        let args = cmdline(pid);
        let at = args
            .iter()
            .position(|a| a == "--throttle-group-fd")
            .unwrap_or_else(|| panic!("pid {pid}: no --throttle-group-fd in {args:?}"));
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--iops-total" && w[1] == "50"),
            "every member gets the group's table: {args:?}"
        );
        let n = args[at + 1].clone();
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap();
        (n, link)
    };
    let (a, b) = (wait_up(&l, "blk0"), wait_up(&l, "blk1"));
    let (_, la) = group_fd(a);
    let (_, lb) = group_fd(b);
    assert!(
        la.to_string_lossy()
            .starts_with("/memfd:bulkhead-throttle-group-g1"),
        "{la:?}"
    );
    assert_eq!(la, lb);
    let ino = |pid: i32| {
        let (n, _) = group_fd(pid);
        std::fs::metadata(format!("/proc/{pid}/fd/{n}"))
            .unwrap()
            .ino()
    };
    assert_eq!(ino(a), ino(b), "one memfd for the group");
    // A change through one member's stats socket holds for the other, and
    // for a member the launcher restarts with the configured table.
    let sock = |id: &str| l.run.join(format!("{id}.sock.stats"));
    let limits = |id: &str| {
        wait_for(&format!("{id}'s limits"), Duration::from_secs(5), || {
            control(&sock(id), "limits")
        })
    };
    assert!(
        limits("blk1").contains("\"iops-total\":50"),
        "{}",
        limits("blk1")
    );
    let r = control(&sock("blk0"), "limit iops-total=70").unwrap();
    assert!(r.contains("\"ok\":true"), "{r}");
    assert!(
        limits("blk1").contains("\"iops-total\":70"),
        "{}",
        limits("blk1")
    );
    let (old, new) = kill_and_wait_restart(&l, "blk1");
    assert_eq!(
        ino(new),
        ino(a),
        "the restarted member joins the same group"
    );
    assert!(
        limits("blk1").contains("\"iops-total\":70"),
        "{}",
        limits("blk1")
    );
    stop_and_check_clean(l, &[a, old, new]);
}

/// A process's arguments, from `/proc/PID/cmdline`.
fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// One line to a daemon's stats socket, and its one-line answer.
fn control(socket: &Path, line: &str) -> Option<String> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    (&s).write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).ok()?;
    Some(answer)
}

/// A root launcher opened blk0's image and passed it: the daemon was
/// started with `--image-fd 10` and no path, and its fd 10 is the image.
fn assert_image_passed_as_fd(l: &Launcher, pid: i32) {
    let args = cmdline(pid);
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--image-fd" && w[1] == "10"),
        "blk0 (pid {pid}) args {args:?}"
    );
    assert!(!args.iter().any(|a| a == "--image"), "{args:?}");
    let fd10 = std::fs::read_link(format!("/proc/{pid}/fd/10")).unwrap();
    assert_eq!(
        fd10,
        l.dir.path().join("disk.img").canonicalize().unwrap(),
        "blk0's fd 10"
    );
}

/// A SIGKILLed launcher cannot stop its backends: the kernel does
/// (`PR_SET_PDEATHSIG`), also for a backend that switched to another user
/// since (the switch clears the setting; the daemon sets it again).
#[test]
fn a_sigkilled_launcher_takes_its_backends_with_it() {
    let mut l = up(r#"
frontend = "none"
[[blk]]
image = "disk.img"
[[console]]
"#);
    let backends: Vec<(&str, i32)> = ["blk0", "console0"]
        .into_iter()
        .map(|id| (id, wait_up(&l, id)))
        .collect();
    let pids: Vec<i32> = backends.iter().map(|&(_, pid)| pid).collect();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        for &(id, pid) in &backends {
            wait_runs_as_nobody(id, pid);
        }
    }
    // Should this fail, the backends still end with the test.
    let _reaper = KillOnDrop(pids.clone());
    l.child.kill().unwrap();
    l.child.wait().unwrap();
    for &pid in &pids {
        wait_for(
            &format!("backend {pid} to end with the launcher"),
            Duration::from_secs(5),
            || (!alive(pid)).then_some(()),
        );
    }
}

/// SIGKILLs each of its pids that still runs when dropped.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if alive(pid) {
                // SAFETY: kill(2) on a backend this test saw the launcher start.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Waits for backend `id` (`pid`) to run as nobody: it switches right
/// after its socket listens, so give it a moment.
fn wait_runs_as_nobody(id: &str, pid: i32) {
    wait_for(
        &format!("{id} to run as nobody"),
        Duration::from_secs(5),
        || {
            let uid = status_field(pid, "Uid")?;
            uid.split_whitespace().all(|u| u == "65534").then_some(())
        },
    );
}

/// A `Name:` field of `/proc/PID/status`.
fn status_field(pid: i32, name: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

#[test]
fn the_launcher_confines_itself_and_its_children_inherit_it() {
    let l = up(r#"
frontend = "none"
[[blk]]
image = "disk.img"
"#);
    let blk = wait_up(&l, "blk0");
    let launcher = l.child.id() as i32;
    assert_eq!(status_field(launcher, "NoNewPrivs").as_deref(), Some("1"));
    assert_eq!(status_field(launcher, "Seccomp").as_deref(), Some("2"));
    let own: u32 = status_field(launcher, "Seccomp_filters")
        .unwrap()
        .parse()
        .unwrap();
    let child: u32 = status_field(blk, "Seccomp_filters")
        .unwrap()
        .parse()
        .unwrap();
    // The daemon stacks its own filters on the launcher's.
    assert!(child > own, "launcher {own} filters, blk {child}");
    stop_and_check_clean(l, &[blk]);
}

/// The guest's disk writer: a 4 KiB O_DIRECT write every 200 ms, each
/// reported as `@@IO ok N` or `@@IO fail N`; with `stop`, it ends once the
/// host left `STOP` at that byte offset of the disk, saying `@@IO stopped`.
fn io_loop(stop: Option<u64>) -> String {
    let check_stop = stop.map_or(String::new(), |offset| {
        format!(
            "  [ \"$(dd if=/dev/vda bs=4096 skip={} count=1 iflag=direct 2>/dev/null | head -c 4)\" \
             = STOP ] && break\n",
            offset / 4096
        )
    });
    format!(
        r#"
i=0
while [ $i -lt 3000 ]; do
  if dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=$((i % 256)) oflag=direct 2>/dev/null; then
    echo "@@IO ok $i"
  else
    echo "@@IO fail $i"
  fi
  i=$((i+1))
{check_stop}  sleep 0.2
done
echo "@@IO stopped"
"#
    )
}

fn last_ok(serial: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(serial).ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("@@IO ok "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

/// Waits until the guest has logged I/O number `min` or later on `serial`,
/// and returns the latest. Fails at once when the launcher exited (its
/// frontend, and the guest, gone), and at the timeout, either way with the
/// end of the guest's serial log: a guest that panicked says why there
/// (and the nested lane's checks read it from this message).
fn wait_guest_io(l: &mut Launcher, serial: &Path, what: &str, timeout: Duration, min: u64) -> u64 {
    let tail = || {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        format!(
            "\n--- guest serial (last 40 lines):\n{}",
            guest::tail(&text, 40)
        )
    };
    wait_for_or(
        what,
        timeout,
        || {
            if let Some(n) = last_ok(serial).filter(|n| *n >= min) {
                return Some(n);
            }
            if let Some(st) = l.child.try_wait().ok().flatten() {
                panic!("the launcher exited ({st}) waiting for {what}{}", tail());
            }
            None
        },
        tail,
    )
}

#[test]
fn qemu_frontend_survives_a_backend_restart_and_sigterm_leaves_nothing() {
    if skip_if(
        "qemu_frontend_survives_a_backend_restart_and_sigterm_leaves_nothing",
        skip::needs_program("qemu-system-x86_64"),
    ) {
        return;
    }
    let image = guest::image();
    let work = tempfile::tempdir().unwrap();
    let initrd = work.path().join("initrd.cpio");
    let mut bytes = std::fs::read(&image.initrd).unwrap();
    bytes.extend(guest::newc_archive(&[(
        "test.sh",
        io_loop(None).as_bytes(),
        0o755,
    )]));
    std::fs::write(&initrd, bytes).unwrap();
    let serial = work.path().join("serial.log");
    let mut l = up(&format!(
        r#"
frontend = "qemu"
[vm]
kernel = "{}"
initrd = "{}"
cmdline = "console=ttyS0 reboot=k panic=-1 quiet"
memory = "512M"
serial = "{}"
[qemu]
accel = "tcg"
reconnect_ms = 200
[restart]
initial_delay_ms = 200
[[blk]]
image = "disk.img"
[[console]]
"#,
        image.kernel.display(),
        initrd.display(),
        serial.display()
    ));
    let console = wait_up(&l, "console0");
    let qemu = wait_for("QEMU", Duration::from_secs(30), || {
        pid_of(&l.run, "frontend").filter(|p| alive(*p))
    });
    let boot = Duration::from_secs(240).mul_f64(guest::timeout_scale());
    let before = wait_guest_io(&mut l, &serial, "guest I/O", boot, 3);
    let (old, new) = kill_and_wait_restart(&l, "blk0");
    eprintln!("bulkhead-blk {old} killed at guest write {before}; restarted as {new}");
    let after = wait_guest_io(
        &mut l,
        &serial,
        "guest I/O after the restart",
        Duration::from_secs(120).mul_f64(guest::timeout_scale()),
        before + 5,
    );
    assert!(alive(qemu), "QEMU kept running");
    let text = std::fs::read_to_string(&serial).unwrap();
    let fails = text.lines().filter(|l| l.contains("@@IO fail")).count();
    eprintln!("guest writes went on to {after}; {fails} failed");
    assert_eq!(fails, 0, "the guest saw I/O errors across the restart");
    drop(work);
    stop_and_check_clean(l, &[old, new, console, qemu]);
}

/// Where the bulkhead-vmm test's host tells the guest to stop (byte offset
/// in its 16 MiB disk).
const STOP_OFFSET: u64 = 15 << 20;

/// The guest of the bulkhead-vmm test: pings the tap, writes to hvc0, then
/// runs [`io_loop`] until the host leaves `STOP` at [`STOP_OFFSET`], and
/// powers off.
fn vmm_guest_script() -> String {
    r#"
ip link set eth0 up && ip addr add 10.78.0.2/24 dev eth0
if ping -c 2 -W 5 10.78.0.1 >/dev/null; then echo "@@NET ok"; else echo "@@NET fail"; fi
i=0
while [ ! -c /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo LAUNCHED-GUEST-ON-HVC0 >/dev/hvc0
"#
    .to_string()
        + &io_loop(Some(STOP_OFFSET))
}

#[test]
fn bulkhead_vmm_frontend_runs_blk_net_and_console_across_a_restart_and_exits_with_the_guest() {
    if nested::delegate(
        "bulkhead_vmm_frontend_runs_blk_net_and_console_across_a_restart_and_exits_with_the_guest",
    ) {
        return;
    }
    let ns = NetNs::new().expect("network namespace (needs root)");
    ns.add_tap("bhtap1", "10.78.0.1/24", false).expect("tap");
    let image = guest::image();
    let work = tempfile::tempdir().unwrap();
    let initrd = work.path().join("initrd.cpio");
    let mut bytes = std::fs::read(&image.initrd).unwrap();
    bytes.extend(guest::newc_archive(&[(
        "test.sh",
        vmm_guest_script().as_bytes(),
        0o755,
    )]));
    std::fs::write(&initrd, bytes).unwrap();
    let serial = work.path().join("serial.log");
    let mut l = up_in(
        Some(&ns),
        &format!(
            r#"
frontend = "bulkhead-vmm"
[vm]
kernel = "{}"
initrd = "{}"
cmdline = "console=ttyS0 reboot=k panic=-1 quiet"
memory = "512M"
cpus = 2
serial = "{}"
[restart]
initial_delay_ms = 200
[[blk]]
image = "disk.img"
num_queues = 2
[[net]]
tap = "bhtap1"
[[console]]
transport = "mmio"
"#,
            image.kernel.display(),
            initrd.display(),
            serial.display()
        ),
    );
    let console = wait_up(&l, "console0");
    let net = wait_up(&l, "net0");
    let vmm = wait_for("bulkhead-vmm", Duration::from_secs(30), || {
        pid_of(&l.run, "frontend").filter(|p| alive(*p))
    });
    let boot = Duration::from_secs(240).mul_f64(guest::timeout_scale());
    let before = wait_guest_io(&mut l, &serial, "guest I/O", boot, 3);
    let (old, new) = kill_and_wait_restart(&l, "blk0");
    eprintln!("bulkhead-blk {old} killed at guest write {before}; restarted as {new}");
    wait_guest_io(
        &mut l,
        &serial,
        "guest I/O after the restart",
        Duration::from_secs(120).mul_f64(guest::timeout_scale()),
        before + 5,
    );
    // The launcher gave bulkhead-vmm its control socket.
    let out = Command::new(workspace_binary("bulkhead-vmm"))
        .args(["ctl", "--api-socket"])
        .arg(l.run.join("api.sock"))
        .arg("list")
        .output()
        .expect("bulkhead-vmm ctl list");
    let list = String::from_utf8_lossy(&out.stdout);
    for id in ["blk0", "net0", "console0"] {
        assert!(
            list.contains(&format!("\"id\":\"{id}\"")),
            "{id} missing: {list}"
        );
    }
    assert_eq!(
        list.matches("\"connected\"").count(),
        3,
        "all connected: {list}"
    );
    // What the guest wrote to hvc0 waits in the console's scrollback.
    let mut hvc0 =
        std::os::unix::net::UnixStream::connect(l.run.join("console0.sock.console")).unwrap();
    hvc0.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("LAUNCHED-GUEST-ON-HVC0") {
        match std::io::Read::read(&mut hvc0, &mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("hvc0: {other:?} after {:?}", String::from_utf8_lossy(&got)),
        }
    }

    // The guest stops and powers off; the launcher exits with bulkhead-vmm's 0.
    let disk = l.dir.path().join("disk.img");
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"STOP", STOP_OFFSET).unwrap();
    f.sync_all().unwrap();
    let st = wait_for("the launcher to exit with the guest", boot, || {
        l.child.try_wait().ok().flatten()
    });
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(
        st.code(),
        Some(0),
        "launcher exit status {st}\n{}",
        guest::tail(&text, 40)
    );
    assert!(
        text.contains("@@NET ok"),
        "the guest's ping failed:\n{}",
        guest::tail(&text, 40)
    );
    assert!(text.contains("@@IO stopped"), "{}", guest::tail(&text, 40));
    assert_eq!(
        text.matches("@@IO fail").count(),
        0,
        "guest I/O errors across the restart"
    );
    for p in [old, new, console, net, vmm] {
        assert!(!alive(p), "process {p} survived the launcher");
    }
    assert!(!l.run.exists(), "runtime dir left behind");
}
