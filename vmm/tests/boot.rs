//! End to end: Debian's kernel with the test kit's initramfs booted by the
//! `bulkhead-vmm` binary, with `bulkhead-blk` attached, over virtio-pci and
//! virtio-mmio. A probe first checks that KVM here can run a 64-bit guest
//! (a long-mode guest must reach a port write within a timeout); where it
//! cannot (a nested software hypervisor hangs Linux in its decompressor),
//! each test prints `SKIPPED: <reason>` and passes. Every boot runs under a
//! hard timeout and the VMM is killed with the test.

use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::guest::{self, GuestRun};
use bulkhead_tests::process::workspace_binary;

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Boots the guest image with `bulkhead-blk` over `transport`, running `script`.
fn boot(transport: &str, script: &str) -> GuestRun {
    let image = guest::image();
    let scratch = Scratch::new(64 << 20).expect("scratch");
    let daemon = Daemon::blk(scratch, &[]).expect("start bulkhead-blk");
    let work = tempfile_dir();
    let initrd = work.join("initrd.cpio");
    std::fs::copy(&image.initrd, &initrd).expect("copy initrd");
    let extra = guest::newc_archive(&[("test.sh", script.as_bytes(), 0o755)]);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&initrd)
            .unwrap();
        f.write_all(&extra).unwrap();
    }
    let serial = work.join("serial.log");
    let mut cmd = Command::new(workspace_binary("bulkhead-vmm"));
    cmd.arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", "512M", "--cpus", "1"])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"])
        .arg("--blk")
        .arg(format!(
            "socket={},transport={transport}",
            daemon.socket().display()
        ))
        .arg("--serial")
        .arg(format!("file={}", serial.display()));
    let log = work.join("vmm.log");
    let mut vmm = guest::spawn_daemon("bulkhead-vmm", &mut cmd, &log).expect("start bulkhead-vmm");
    let timeout = BOOT_TIMEOUT.mul_f64(guest::timeout_scale());
    let deadline = Instant::now() + timeout;
    let mut timed_out = true;
    while Instant::now() < deadline {
        if matches!(vmm.try_wait(), Ok(Some(_))) {
            timed_out = false;
            break;
        }
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains("@@BULKHEAD EXIT") {
            // Without ACPI the guest cannot power off; the result is in.
            timed_out = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = vmm.kill();
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    let mut run = GuestRun::parse(&text);
    run.timed_out = timed_out;
    run.qemu_output = std::fs::read_to_string(&log).unwrap_or_default();
    run
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bulkhead-vmm-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const SCRIPT: &str = r#"
check vda_present test -b /dev/vda
dd if=/dev/urandom of=/root/data bs=4096 count=16 2>/dev/null
check write dd if=/root/data of=/dev/vda bs=4096 count=16 oflag=direct
check read dd if=/dev/vda of=/root/back bs=4096 count=16 iflag=direct
check same cmp /root/data /root/back
"#;

#[test]
fn linux_boots_with_bulkhead_blk_over_virtio_pci() {
    if let Some(why) = bulkhead_vmm::probe::probe_long_mode() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let run = boot("pci", SCRIPT);
    run.assert_passed("bulkhead-vmm + bulkhead-blk over virtio-pci");
}

#[test]
fn linux_boots_with_bulkhead_blk_over_virtio_mmio() {
    if let Some(why) = bulkhead_vmm::probe::probe_long_mode() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    // The DSDT announces the device as LNRO0005 (Debian's kernel has no
    // VIRTIO_MMIO_CMDLINE_DEVICES).
    let run = boot("mmio", SCRIPT);
    run.assert_passed("bulkhead-vmm + bulkhead-blk over virtio-mmio (ACPI)");
}
