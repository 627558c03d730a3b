//! `bulkhead up` end to end: backends come up, a SIGKILLed backend is
//! restarted automatically, and SIGTERM to the launcher leaves no process
//! (checked by pid) and no socket behind. Once with backends only, once
//! with QEMU (TCG) as the frontend running a Linux guest that keeps writing
//! to the disk across the restart. Build first:
//! `cargo build -p bulkhead-launcher -p bulkhead-blk -p bulkhead-console -p bulkhead-vmm`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::guest;
use bulkhead_tests::process::workspace_binary;

struct Launcher {
    child: Child,
    _dir: tempfile::TempDir,
    run: PathBuf,
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn up(toml_body: &str) -> Launcher {
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
    let child = Command::new(workspace_binary("bulkhead"))
        .args(["up", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .spawn()
        .expect("start bulkhead (cargo build -p bulkhead-launcher)");
    Launcher {
        child,
        _dir: dir,
        run,
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
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
    let (old, new) = kill_and_wait_restart(&l, "blk0");
    // A second crash, with the doubled delay.
    let (_, newer) = kill_and_wait_restart(&l, "blk0");
    assert_eq!(
        pid_of(&l.run, "console0"),
        Some(console),
        "console untouched"
    );
    stop_and_check_clean(l, &[old, new, newer, console]);
}

const GUEST_SCRIPT: &str = r#"
i=0
while [ $i -lt 3000 ]; do
  if dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=$((i % 256)) oflag=direct 2>/dev/null; then
    echo "@@IO ok $i"
  else
    echo "@@IO fail $i"
  fi
  i=$((i+1))
  sleep 0.2
done
"#;

fn last_ok(serial: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(serial).ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("@@IO ok "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

#[test]
fn qemu_frontend_survives_a_backend_restart_and_sigterm_leaves_nothing() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("SKIPPED: qemu-system-x86_64 is not installed\n"),
        );
        return;
    }
    let image = guest::image();
    let work = tempfile::tempdir().unwrap();
    let initrd = work.path().join("initrd.cpio");
    let mut bytes = std::fs::read(&image.initrd).unwrap();
    bytes.extend(guest::newc_archive(&[(
        "test.sh",
        GUEST_SCRIPT.as_bytes(),
        0o755,
    )]));
    std::fs::write(&initrd, bytes).unwrap();
    let serial = work.path().join("serial.log");
    let l = up(&format!(
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
    let before = wait_for("guest I/O", boot, || last_ok(&serial).filter(|n| *n >= 3));
    let (old, new) = kill_and_wait_restart(&l, "blk0");
    eprintln!("bulkhead-blk {old} killed at guest write {before}; restarted as {new}");
    let after = wait_for(
        "guest I/O after the restart",
        Duration::from_secs(120).mul_f64(guest::timeout_scale()),
        || last_ok(&serial).filter(|n| *n >= before + 5),
    );
    assert!(alive(qemu), "QEMU kept running");
    let text = std::fs::read_to_string(&serial).unwrap();
    let fails = text.lines().filter(|l| l.contains("@@IO fail")).count();
    eprintln!("guest writes went on to {after}; {fails} failed");
    assert_eq!(fails, 0, "the guest saw I/O errors across the restart");
    drop(work);
    stop_and_check_clean(l, &[old, new, console, qemu]);
}
