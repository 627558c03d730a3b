//! What `bulkhead-blk` refuses to serve, and says why: an image another
//! process holds (QEMU's image lock, shared with QEMU and qemu-img), an
//! image in another format than raw, an image it may not write.
//!
//! Run `cargo build -p bulkhead-blk` first.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::daemon::{Daemon, Scratch};
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

#[test]
fn a_second_daemon_on_a_served_image_is_refused_and_told_why() {
    let first = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[]).expect("start bulkhead-blk");
    let image = first.scratch().image();
    let other = Scratch::new(0).unwrap();
    let (code, err) = refused(blk_on(&other, image, &[]));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("is locked"), "{err}");
    assert!(err.contains("writing it"), "{err}");
    assert!(err.contains("--no-lock"), "{err}");
    // A reader beside a writer is refused too: it would read torn data.
    let (code, err) = refused(blk_on(&other, image, &["--readonly"]));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("read-only"), "{err}");
}

#[test]
fn readers_share_an_image_and_a_writer_is_then_refused_with_the_readonly_hint() {
    let first = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &["--readonly"])
        .expect("start bulkhead-blk --readonly");
    let image = first.scratch().image().to_path_buf();
    let other = Scratch::new(0).unwrap();
    let _second = Daemon::start(
        "bulkhead-blk",
        blk_on(&other, &image, &["--readonly"]),
        other,
    )
    .expect("a second reader starts");
    let third = Scratch::new(0).unwrap();
    let (code, err) = refused(blk_on(&third, &image, &[]));
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("allows no writer") && err.contains("--readonly too"),
        "{err}"
    );
}

#[test]
fn no_lock_lets_a_second_daemon_start() {
    let first = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[]).expect("start bulkhead-blk");
    let image = first.scratch().image().to_path_buf();
    let other = Scratch::new(0).unwrap();
    Daemon::start(
        "bulkhead-blk",
        blk_on(&other, &image, &["--no-lock"]),
        other,
    )
    .expect("--no-lock starts beside a locked image");
}

#[test]
fn qemu_img_sees_the_lock_of_a_serving_daemon() {
    const TEST: &str = "qemu_img_sees_the_lock_of_a_serving_daemon";
    if !have(TEST, "qemu-img") {
        return;
    }
    let first = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[]).expect("start bulkhead-blk");
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
    // And the other way round: an image qemu-storage-daemon serves.
    drop(first);
    if !have(TEST, "qemu-storage-daemon") {
        return;
    }
    let qsd = Daemon::qsd(Scratch::new(IMAGE_SIZE).unwrap(), 1).expect("start qsd");
    let other = Scratch::new(0).unwrap();
    let (code, err) = refused(blk_on(&other, qsd.scratch().image(), &[]));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("is locked"), "{err}");
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
