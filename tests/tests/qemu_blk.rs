//! A Linux guest (QEMU TCG, `vhost-user-blk-pci`, two queues, two vCPUs)
//! drives a vhost-user block backend: size, serial and queue count as the
//! driver sees them, a random pattern written and read back, an fio
//! write-and-verify job, and an ext2 filesystem made, filled and read again;
//! then the host checks the image itself.
//!
//! The same scenario runs against `qemu-storage-daemon`'s vhost-user-blk
//! export, which proves the scenario sound, and against `bulkhead-blk`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulkhead_tests::guest::{Guest, GuestRun, VHOST_USER_BLK_QUEUE_SIZE, spawn_daemon, tail};
use bulkhead_tests::process::{ChildGuard, wait_for_path, workspace_binary};
use rand::{RngCore, SeedableRng, rngs::StdRng};

const MIB: u64 = 1024 * 1024;
/// Disk size. Layout: ext2 in [0, 64 MiB), the pattern at 64 MiB, fio's
/// region from 80 MiB.
const DISK_SIZE: u64 = 128 * MIB;
const FS_KIB: u64 = 64 * 1024;
const PATTERN_OFFSET_MIB: u64 = 64;
const PATTERN_MIB: u64 = 4;
const FIO_OFFSET_MIB: u64 = 80;
const QUEUES: u16 = 2;
const SERIAL: &str = "bulkhead-test0";
const HELLO: &str = "hello from the guest";

/// What a backend under test is started with.
struct Backend {
    name: &'static str,
    /// The serial the guest must see in /sys/block/vda/serial, if any.
    serial: Option<&'static str>,
    start: fn(image: &Path, socket: &Path, log: &Path) -> ChildGuard,
}

fn start_qsd(image: &Path, socket: &Path, log: &Path) -> ChildGuard {
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},\
             writable=on,num-queues={QUEUES}",
            socket.display()
        ));
    spawn_daemon("qemu-storage-daemon", &mut cmd, log)
        .unwrap_or_else(|e| panic!("{e} (run .ci/install-deps)"))
}

fn start_bulkhead(image: &Path, socket: &Path, log: &Path) -> ChildGuard {
    let bin = workspace_binary("bulkhead-blk");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--image")
        .arg(image)
        .args(["--num-queues", &QUEUES.to_string(), "--serial", SERIAL])
        .env("RUST_LOG", "info");
    spawn_daemon("bulkhead-blk", &mut cmd, log).unwrap_or_else(|e| panic!("{e}"))
}

/// The guest's check that the driver negotiated the packed ring (feature
/// bit 34: the 35th character of the device's `features`), or did not.
fn packed_check(packed: bool) -> String {
    format!(
        "expect_eq packed-ring \"$(cut -c35 /sys/block/vda/device/features)\" {}\n",
        u8::from(packed)
    )
}

/// The guest's script: every step is a named check.
fn guest_script(serial: Option<&str>, packed: bool) -> String {
    let sectors = DISK_SIZE / 512;
    let serial_check = match serial {
        Some(s) => format!("expect_eq serial \"$(cat /sys/block/vda/serial)\" {s}\n"),
        None => "value serial \"$(cat /sys/block/vda/serial 2>/dev/null)\"\n".to_string(),
    };
    let packed_check = packed_check(packed);
    format!(
        r#"
expect_eq disk-present "$(ls /sys/block | grep -c '^vda$')" 1
{packed_check}
expect_eq size "$(cat /sys/block/vda/size)" {sectors}
expect_eq read-write "$(cat /sys/block/vda/ro)" 0
expect_eq queues "$(ls /sys/block/vda/mq | wc -l)" {QUEUES}
{serial_check}value write-cache "$(cat /sys/block/vda/queue/write_cache | tr ' ' _)"
# A request is a header, the data segments and a status byte, in a chain
# no longer than the queue (virtio 1.2, 2.7.5.3.1): seg_max must leave room.
segs=$(cat /sys/block/vda/queue/max_segments)
[ "$segs" -le $(({VHOST_USER_BLK_QUEUE_SIZE} - 2)) ] && pass seg-max-fits-queue \
  || fail seg-max-fits-queue "max_segments $segs, queue size {VHOST_USER_BLK_QUEUE_SIZE}"
value max-hw-sectors-kb "$(cat /sys/block/vda/queue/max_hw_sectors_kb)"

# A random pattern at a known offset, read back past the page cache.
want=$(sha256sum /data/pattern.bin | cut -d' ' -f1)
check pattern-write dd if=/data/pattern.bin of=/dev/vda bs=1M seek={PATTERN_OFFSET_MIB} conv=fsync
sync; echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=1M skip={PATTERN_OFFSET_MIB} count={PATTERN_MIB} 2>/dev/null | sha256sum | cut -d' ' -f1)
expect_eq pattern-readback "$got" "$want"

# fio: one job pinned to each vCPU, so that both queues carry requests,
# writes random 4 KiB blocks with crc32c checksums, then reads them back and
# verifies them.
check fio-verify fio --filename=/dev/vda --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 \
  --direct=1 --verify=crc32c --verify_fatal=1 --size=16M \
  --name=cpu0 --cpus_allowed=0 --offset={FIO_OFFSET_MIB}M \
  --name=cpu1 --cpus_allowed=1 --offset=$(({FIO_OFFSET_MIB} + 16))M
# Each queue has its own MSI-X vector: both must have fired.
cpus=$(grep -c ^processor /proc/cpuinfo)
awk -v n=$cpus '/virtio[0-9]+-req\.[0-9]+/ {{ s = 0; for (i = 2; i <= n + 1; i++) s += $i; print $NF, s }}' \
  /proc/interrupts >/data/irqs
cat /data/irqs
expect_eq queue-interrupts "$(awk '$2 > 0' /data/irqs | wc -l)" {QUEUES}
# Requests as large as the driver makes them (1 MiB of scattered pages:
# as many segments as the device's seg_max allows).
check fio-large fio --name=large --filename=/dev/vda --offset={FIO_OFFSET_MIB}M --size=16M \
  --rw=write --bs=1M --ioengine=libaio --iodepth=2 --direct=1 --verify=crc32c --verify_fatal=1
check fio-sequential fio --name=seq --filename=/dev/vda --offset={FIO_OFFSET_MIB}M --size=32M \
  --rw=write --bs=256k --ioengine=libaio --iodepth=4 --direct=1 --verify=crc32c --verify_fatal=1

# A filesystem in the first 64 MiB, filled, unmounted, mounted again, read.
check mkfs mke2fs -q -L bulkhead /dev/vda {FS_KIB}
check mount mount -t ext2 /dev/vda /mnt
echo "{HELLO}" > /mnt/hello.txt
mkdir -p /mnt/dir
check copy cp /data/pattern.bin /mnt/dir/pattern.bin
ls -lR /mnt
check umount umount /mnt
echo 3 > /proc/sys/vm/drop_caches
check remount mount -t ext2 -o ro /dev/vda /mnt
expect_eq file-readback "$(cat /mnt/hello.txt)" "{HELLO}"
expect_eq copy-readback "$(sha256sum /mnt/dir/pattern.bin | cut -d' ' -f1)" "$want"
check umount-again umount /mnt
"#
    )
}

/// Runs the scenario against one backend, then checks the image on the host;
/// `packed`: the device offers the packed ring (`packed=on`) and the guest
/// must use it.
fn scenario(backend: &Backend, packed: bool) {
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-qemu-blk-")
        .tempdir()
        .expect("tempdir");
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("blk.sock");
    let log = dir.path().join("backend.log");
    File::create(&image)
        .and_then(|f| f.set_len(DISK_SIZE))
        .expect("create image");
    let mut pattern = vec![0u8; (PATTERN_MIB * MIB) as usize];
    StdRng::seed_from_u64(0xb10c).fill_bytes(&mut pattern);

    let mut daemon = (backend.start)(&image, &socket, &log);
    let backend_log = |log: &Path| tail(&fs::read_to_string(log).unwrap_or_default(), 30);
    if let Err(e) = wait_for_path(&socket, Duration::from_secs(10)) {
        let status = daemon.try_wait().ok().flatten();
        panic!(
            "{}: {e}; exited: {status:?}\n--- backend log:\n{}",
            backend.name,
            backend_log(&log)
        );
    }

    let run = Guest::new(guest_script(backend.serial, packed))
        .smp(2)
        .file("/data/pattern.bin", pattern.clone())
        .vhost_user_blk_with(&socket, QUEUES, if packed { "packed=on" } else { "" })
        .timeout(Duration::from_secs(240))
        .run_watching(&mut [&mut daemon]);
    if matches!(daemon.try_wait(), Ok(None)) {
        let _ = daemon.signal(libc::SIGTERM);
        let _ = daemon.wait_timeout(Duration::from_secs(5));
    }
    drop(daemon);
    report_timing(backend.name, &run);
    if !run.passed() {
        panic!(
            "{}: guest test failed\n{}--- backend log:\n{}",
            backend.name,
            run.report(),
            backend_log(&log)
        );
    }
    check_image_on_host(backend.name, &image, &pattern, dir.path());
}

fn report_timing(name: &str, run: &GuestRun) {
    eprintln!(
        "{name}: guest ran {:.1?} (init after {:?} s of guest uptime), {} checks",
        run.elapsed,
        run.boot_seconds,
        run.checks.len()
    );
}

/// The bytes and files the guest wrote are in the image file itself.
fn check_image_on_host(name: &str, image: &Path, pattern: &[u8], dir: &Path) {
    let disk = fs::read(image).expect("read image");
    assert_eq!(disk.len() as u64, DISK_SIZE, "{name}: image size changed");
    let at = (PATTERN_OFFSET_MIB * MIB) as usize;
    assert!(
        disk[at..at + pattern.len()] == *pattern,
        "{name}: the pattern is not in the image at {PATTERN_OFFSET_MIB} MiB"
    );

    let debugfs = |what: &str| -> Vec<u8> {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat {what}")])
            .arg(image)
            .output()
            .expect("run debugfs (e2fsprogs)");
        assert!(out.status.success(), "{name}: debugfs cat {what} failed");
        out.stdout
    };
    assert_eq!(
        String::from_utf8_lossy(&debugfs("/hello.txt")),
        format!("{HELLO}\n"),
        "{name}: /hello.txt as the host reads it"
    );
    assert!(
        debugfs("/dir/pattern.bin") == pattern,
        "{name}: /dir/pattern.bin as the host reads it differs"
    );

    // The filesystem is clean (e2fsck on a copy, read-only, forced).
    let copy: PathBuf = dir.join("fsck.img");
    fs::write(&copy, &disk[..(FS_KIB * 1024) as usize]).expect("write fs copy");
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&copy)
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "{name}: e2fsck found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qemu_guest_uses_qemu_storage_daemon_export() {
    scenario(
        &Backend {
            name: "qemu-storage-daemon",
            serial: None,
            start: start_qsd,
        },
        false,
    );
}

#[test]
fn qemu_guest_uses_bulkhead_blk() {
    scenario(
        &Backend {
            name: "bulkhead-blk",
            serial: Some(SERIAL),
            start: start_bulkhead,
        },
        false,
    );
}

#[test]
fn qemu_guest_uses_bulkhead_blk_with_packed_rings() {
    scenario(
        &Backend {
            name: "bulkhead-blk (packed)",
            serial: Some(SERIAL),
            start: start_bulkhead,
        },
        true,
    );
}

#[test]
fn qemu_guest_harness_reports_a_failed_check() {
    let run = Guest::new("pass first\nexpect_eq second one two\nvalue answer 42\n").run();
    assert!(
        !run.passed(),
        "a failed check must fail the run\n{}",
        run.report()
    );
    assert_eq!(run.exit_code, Some(1), "{}", run.report());
    assert!(run.check("first").is_some_and(|c| c.passed));
    let second = run.check("second").expect("second check reported");
    assert!(!second.passed);
    assert_eq!(second.detail, "got 'one', want 'two'");
    assert_eq!(run.value("answer"), Some("42"));
}

#[test]
fn qemu_guest_harness_kills_a_guest_at_the_timeout() {
    let run = Guest::new("pass started\nsleep 600\n")
        .timeout(Duration::from_secs(20))
        .run();
    assert!(run.timed_out, "{}", run.report());
    assert!(run.check("started").is_some(), "{}", run.report());
    assert!(!run.passed());
}
