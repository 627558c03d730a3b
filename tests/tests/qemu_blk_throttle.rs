//! A Linux guest (QEMU TCG, `vhost-user-blk-pci`) on a throttled
//! `bulkhead-blk` (`--iops-total`): fio's write-and-verify job passes (the
//! throttle delays requests, it never fails or reorders one), and a
//! time-based random-read job gets no more than the bucket allows (an upper
//! bound, which a slow TCG guest cannot fail).

use std::fs::{self, File};
use std::process::Command;
use std::time::Duration;

use bulkhead_tests::guest::{Guest, spawn_daemon, tail};
use bulkhead_tests::process::{wait_for_path, workspace_binary};

const DISK_SIZE: u64 = 64 << 20;
const IOPS: u64 = 400;

fn guest_script() -> String {
    // The bucket (IOPS, bursting to IOPS) allows IOPS + IOPS * t over t s:
    // over a 4 s job at most 1.25 * IOPS per second, plus 20% slack.
    let max = IOPS * 5 / 4 * 6 / 5;
    format!(
        r#"
check fio-verify fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k \
  --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 --size=4M
iops=$(fio --name=rate --filename=/dev/vda --rw=randread --bs=4k --ioengine=libaio \
  --iodepth=16 --direct=1 --time_based --runtime=4 --size=32M --minimal | cut -d';' -f8)
value read-iops "$iops"
[ -n "$iops" ] && [ "$iops" -le {max} ] && pass read-iops-within-limit \
  || fail read-iops-within-limit "fio read at $iops IOPS; the limit is {IOPS} (at most {max})"
"#
    )
}

#[test]
fn qemu_guest_fio_verifies_through_a_throttled_bulkhead_blk() {
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-qemu-throttle-")
        .tempdir()
        .expect("tempdir");
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("blk.sock");
    let log = dir.path().join("backend.log");
    File::create(&image)
        .and_then(|f| f.set_len(DISK_SIZE))
        .expect("create image");
    let bin = workspace_binary("bulkhead-blk");
    let limit = IOPS.to_string();
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--image")
        .arg(&image)
        .args(["--iops-total", &limit, "--iops-total-max", &limit])
        .env("RUST_LOG", "info");
    let mut daemon = spawn_daemon("bulkhead-blk", &mut cmd, &log).unwrap_or_else(|e| panic!("{e}"));
    wait_for_path(&socket, Duration::from_secs(10)).expect("bulkhead-blk listens");
    let run = Guest::new(guest_script())
        .vhost_user_blk(&socket, 1)
        .timeout(Duration::from_secs(240))
        .run_watching(&mut [&mut daemon]);
    let _ = daemon.signal(libc::SIGTERM);
    let _ = daemon.wait_timeout(Duration::from_secs(5));
    drop(daemon);
    eprintln!(
        "guest ran {:.1?}; read IOPS {:?}",
        run.elapsed,
        run.value("read-iops")
    );
    assert!(
        run.passed(),
        "guest test failed\n{}--- backend log:\n{}",
        run.report(),
        tail(&fs::read_to_string(&log).unwrap_or_default(), 30)
    );
}
