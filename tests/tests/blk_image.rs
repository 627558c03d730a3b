//! What `bulkhead-blk` refuses to serve, and says why: an image another
//! process writes (QEMU's image lock, shared with QEMU, qemu-storage-daemon
//! and qemu-img; a writable daemon holds its writer part only while its
//! device runs), an image in another format than raw, an image it may not
//! write.
//!
//! Run `cargo build -p bulkhead-blk` first.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::blk::{BlkDriver, VIRTIO_BLK_S_OK};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::Options;
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::skip::{SkipReason, skip};

const IMAGE_SIZE: u64 = 4 << 20;

/// `bulkhead-blk` on `image`, with a socket in `scratch`.
fn blk_on(scratch: &Scratch, image: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--image")
        .arg(image)
        .args(args);
    cmd
}

/// Runs a daemon that must refuse to start: its exit code and stderr.
/// Fails the test if it is still running after 20 s (it would serve).
fn refused(mut cmd: Command) -> (i32, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bulkhead-blk (cargo build -p bulkhead-blk)");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bulkhead-blk started where it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `tool` runs here; where not, [`skip`]s `test` (under CI that
/// fails: `.ci/install-deps` installs every tool these tests use).
fn have(test: &str, tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").output().is_ok();
    if !ok {
        skip(test, SkipReason::NotInstalled(tool.into()));
    }
    ok
}

/// A second `bulkhead-blk` on `image`, in its own scratch directory, its
/// stderr in `log` there (to read why its device did not start).
fn second_on(image: &Path, args: &[&str]) -> (Daemon, std::path::PathBuf) {
    let scratch = Scratch::new(0).unwrap();
    let log = scratch.dir().join("log");
    let mut cmd = blk_on(&scratch, image, args);
    cmd.stderr(std::fs::File::create(&log).unwrap());
    let d = Daemon::start("bulkhead-blk", cmd, scratch).expect("a second daemon starts");
    (d, log)
}

fn log_of(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap()
}

fn connect(d: &Daemon) -> bulkhead_tests::blk::Result<BlkDriver> {
    BlkDriver::connect(d.socket(), &Options::default())
}

/// qemu-storage-daemon exporting `image` writable on `socket`.
fn qsd_on(image: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=raw,node-name=disk0,file=file0")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
    cmd
}

#[test]
fn idle_daemons_share_an_image_and_only_a_running_device_writes_it() {
    let first = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[]).expect("start bulkhead-blk");
    let image = first.scratch().image().to_path_buf();
    // A swap target starts beside a running device: it only reads, for now.
    let mut a = connect(&first).expect("the first device starts");
    let (mut second, log) = second_on(&image, &[]);
    assert_eq!(a.write(0, 0, &[7; 512]).unwrap(), VIRTIO_BLK_S_OK);
    let t = Instant::now();
    assert!(
        connect(&second).is_err(),
        "two devices write one image at once"
    );
    // It waited for the lock (a swap's old daemon lets go a moment later).
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    let err = log_of(&log);
    assert!(
        err.contains("is locked") && err.contains("writing it") && err.contains("--no-lock"),
        "{err}"
    );
    assert!(second.is_running(), "a refused start killed the daemon");
    // A reader refuses writers, so it cannot start beside a running device.
    let other = Scratch::new(0).unwrap();
    let (code, err) = refused(blk_on(&other, &image, &["--readonly"]));
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("read-only") && err.contains("writing it"),
        "{err}"
    );
    // GET_VRING_BASE of its only queue: the first lets go, the second runs.
    a.dev.stop_queue(0).unwrap();
    let mut b = connect(&second).expect("the second device starts once the first stopped");
    assert_eq!(b.write(0, 1, &[8; 512]).unwrap(), VIRTIO_BLK_S_OK);
    drop(a);
    assert!(connect(&first).is_err(), "the first took the lock back");
    // A disconnect lets go too.
    drop(b);
    let mut a = connect(&first).expect("the first starts again after the disconnect");
    assert_eq!(a.read(0, 1, 512).unwrap(), (VIRTIO_BLK_S_OK, vec![8; 512]));
}

#[test]
fn readers_share_an_image_and_keep_a_writer_from_starting_with_the_readonly_hint() {
    let first = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &["--readonly"])
        .expect("start bulkhead-blk --readonly");
    let image = first.scratch().image().to_path_buf();
    let _a = connect(&first).expect("a reader's device starts");
    let (second, _) = second_on(&image, &["--readonly"]);
    let _b = connect(&second).expect("a second reader's device starts");
    let (writer, log) = second_on(&image, &[]);
    assert!(connect(&writer).is_err(), "a writer beside readers");
    let err = log_of(&log);
    assert!(
        err.contains("allows no writer") && err.contains("--readonly too"),
        "{err}"
    );
}

#[test]
fn no_lock_lets_a_second_device_run() {
    let first = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[]).expect("start bulkhead-blk");
    let _a = connect(&first).expect("the first device starts");
    let (other, _) = second_on(first.scratch().image(), &["--no-lock"]);
    let mut b = connect(&other).expect("--no-lock runs beside a locked image");
    assert_eq!(b.write(0, 0, &[1; 512]).unwrap(), VIRTIO_BLK_S_OK);
}

#[test]
fn qemu_img_sees_the_lock_of_a_running_device() {
    if !have("qemu_img_sees_the_lock_of_a_running_device", "qemu-img") {
        return;
    }
    let first = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[]).expect("start bulkhead-blk");
    let _a = connect(&first).expect("the device starts");
    // `qemu-img info` shares everything; `convert` reads and refuses writers.
    let copy = first.scratch().dir().join("copy.img");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(first.scratch().image())
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qemu-img ignored the lock");
    assert!(err.contains("lock"), "{err}");
}

#[test]
fn qemu_storage_daemon_and_a_running_device_exclude_each_other() {
    if !have(
        "qemu_storage_daemon_and_a_running_device_exclude_each_other",
        "qemu-storage-daemon",
    ) {
        return;
    }
    // qemu-storage-daemon takes its lock at start: refused beside a running device.
    let first = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[]).expect("start bulkhead-blk");
    let image = first.scratch().image().to_path_buf();
    let mut a = connect(&first).expect("the device starts");
    let other = Scratch::new(0).unwrap();
    let (code, err) = refused(qsd_on(&image, other.socket()));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("lock"), "{err}");
    // Beside an idle daemon it starts, and that daemon's device then cannot.
    a.dev.stop_queue(0).unwrap();
    let qsd = Daemon::start("qemu-storage-daemon", qsd_on(&image, other.socket()), other)
        .expect("qemu-storage-daemon starts beside an idle bulkhead-blk");
    let mut q = connect(&qsd).expect("qsd serves");
    assert_eq!(q.write(0, 0, &[3; 512]).unwrap(), VIRTIO_BLK_S_OK);
    let (second, log) = second_on(&image, &[]);
    assert!(connect(&second).is_err(), "bulkhead-blk beside qsd");
    let err = log_of(&log);
    assert!(
        err.contains("is locked") && err.contains("writing it"),
        "{err}"
    );
}

#[test]
fn a_qcow2_image_is_refused_unless_format_raw() {
    if !have("a_qcow2_image_is_refused_unless_format_raw", "qemu-img") {
        return;
    }
    let scratch = Scratch::new(0).unwrap();
    let image = scratch.dir().join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (code, err) = refused(blk_on(&scratch, &image, &[]));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("is a qcow2 image"), "{err}");
    assert!(err.contains("--format raw"), "{err}");
    Daemon::start(
        "bulkhead-blk",
        blk_on(&scratch, &image, &["--format", "raw"]),
        scratch,
    )
    .expect("--format raw serves the bytes");
}

#[test]
fn an_image_the_daemon_cannot_write_names_readonly() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let image = scratch.image().to_path_buf();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o444)).unwrap();
    // Root writes any file: run the daemon without CAP_DAC_OVERRIDE then.
    // SAFETY: geteuid has no side effects and cannot fail.
    let cmd = if unsafe { libc::geteuid() } == 0 {
        if !have("an_image_the_daemon_cannot_write_names_readonly", "setpriv") {
            return;
        }
        let mut c = Command::new("setpriv");
        c.args(["--bounding-set=-dac_override,-dac_read_search", "--"])
            .arg(workspace_binary("bulkhead-blk"))
            .arg("--socket-path")
            .arg(scratch.socket())
            .arg("--image")
            .arg(&image);
        c
    } else {
        blk_on(&scratch, &image, &[])
    };
    let (code, err) = refused(cmd);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("read-write") && err.contains("--readonly"),
        "{err}"
    );
    Daemon::start(
        "bulkhead-blk",
        blk_on(&scratch, &image, &["--readonly"]),
        scratch,
    )
    .expect("--readonly serves it");
}
