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

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bulkhead_tests::blk::{BlkDriver, SECTOR_SIZE, VIRTIO_BLK_S_OK};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::Options;
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::sandbox::{
    Logged, NOBODY, assert_no_capabilities, assert_nobody_without_capabilities,
    assert_seccomp_logged, confined_workers, field, has_test_hooks, hooked_binary, pass_fds,
    proc_status,
};

const IMAGE_SIZE: u64 = 16 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(13).wrapping_add((i % 253) as u8))
        .collect()
}

/// Writes and reads back on every queue, checking the image file too.
fn serve_io(socket: &Path, scratch: &Scratch, queues: usize) -> BlkDriver {
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
    blk
}

#[test]
fn every_thread_of_a_serving_daemon_has_a_seccomp_filter_and_no_new_privs() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    // The stats socket's thread runs too, and answers under the filter.
    let stats = scratch.dir().join("stats.sock");
    let stats_arg = stats.to_str().unwrap().to_owned();
    let d = Daemon::blk(
        scratch,
        &["--num-queues", "2", "--stats-socket", &stats_arg],
    )
    .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)");
    // Keep the connection up so both queue threads run while we look.
    let mut blk = BlkDriver::connect(d.socket(), &Options::default().queues(2)).unwrap();
    for q in 0..2 {
        assert_eq!(blk.write(q, 8, &pattern(9, 4096)).unwrap(), VIRTIO_BLK_S_OK);
    }
    let v = bulkhead_tests::stats::stats(&stats).expect("stats under the sandbox");
    assert_eq!(v["ok"], 2);
    let workers = confined_workers(d.pid(), 2);
    assert_eq!(workers.len(), 2, "expected two queue threads: {workers:?}");
    assert_no_capabilities(&proc_status(d.pid()));
}

#[test]
fn under_user_nobody_the_daemon_serves_io_holding_no_capability() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    std::os::unix::fs::chown(scratch.image(), Some(NOBODY), Some(NOBODY)).unwrap();
    let mut d = Daemon::blk(scratch, &["--num-queues", "2", "--user", "nobody"]).unwrap();
    // The socket exists before the daemon confines itself; it serves only after.
    // Look while the frontend is connected and the queue threads run.
    let blk = serve_io(d.socket(), d.scratch(), 2);
    assert_nobody_without_capabilities(d.pid());
    drop(blk);
    // A second frontend after the first went away.
    drop(serve_io(d.socket(), d.scratch(), 2));
    assert_nobody_without_capabilities(d.pid());
    assert!(d.is_running());
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
    let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
    cmd.args(["--fd", "100", "--image-fd", "101"]);
    pass_fds(
        &mut cmd,
        vec![(listener.as_raw_fd(), 100), (image.as_raw_fd(), 101)],
    );
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
    let d = Logged::start("bulkhead-blk", cmd, scratch.socket());
    assert!(d.log.wait_for("--sandbox off", Duration::from_secs(10)));
    serve_io(scratch.socket(), &scratch, 1);
    assert_eq!(
        field(&proc_status(d.pid()), "Seccomp").as_deref(),
        Some("0")
    );
}

fn hooked(scratch: &Scratch, hook: &str, mode: &str) -> Command {
    let mut cmd = Command::new(hooked_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--image")
        .arg(scratch.image())
        .args(["--sandbox", mode])
        .env("BULKHEAD_TEST_HOOK", hook);
    cmd
}

#[test]
fn a_forbidden_syscall_kills_the_daemon_with_sigsys() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let mut d = Logged::spawn("bulkhead-blk", hooked(&scratch, "socket-inet", "enforce")).unwrap();
    assert_eq!(d.killed_by(), Some(libc::SIGSYS));
    let text = d.log.text();
    assert!(
        text.contains("test-hook: calling socket(AF_INET)"),
        "{text}"
    );
    assert!(!text.contains("returned an fd"), "{text}");
}

#[test]
fn opening_a_path_is_a_forbidden_syscall_too_under_enforce() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let mut d = Logged::spawn(
        "bulkhead-blk",
        hooked(&scratch, "open:/etc/passwd", "enforce"),
    )
    .unwrap();
    assert_eq!(d.killed_by(), Some(libc::SIGSYS));
}

#[test]
fn in_log_mode_a_forbidden_syscall_is_logged_and_the_daemon_lives() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    assert_seccomp_logged(libc::SYS_socket, || {
        // A daemon of an earlier attempt left its socket file.
        let _ = std::fs::remove_file(scratch.socket());
        let cmd = hooked(&scratch, "socket-inet", "log");
        let mut d = Logged::start("bulkhead-blk", cmd, scratch.socket());
        assert!(
            d.log
                .wait_for("socket(AF_INET) returned an fd", Duration::from_secs(10)),
            "{}",
            d.log.text()
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(d.is_running());
        serve_io(scratch.socket(), &scratch, 1);
        assert!(d.is_running());
        d
    });
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
        let mut d = Logged::start("bulkhead-blk", cmd, scratch.socket());
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
    assert!(
        !has_test_hooks(&workspace_binary("bulkhead-blk")),
        "the normal bulkhead-blk was built with the test-hooks feature"
    );
}
