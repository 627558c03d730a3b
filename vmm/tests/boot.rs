//! End to end: Debian's kernel with the test kit's initramfs booted by the
//! `bulkhead-vmm` binary, with `bulkhead-blk`, `bulkhead-net` and
//! `bulkhead-console` attached (default sandbox), over virtio-pci and (second
//! test) over virtio-mmio, on 2 vCPUs, and the guest's checks pass:
//!
//! - blk: `/dev/vda` has the image's size, serial and 2 queues; a random
//!   pattern written with O_DIRECT reads back the same; a marker block lands
//!   in the host image; fio writes and verifies 32 MiB from both vCPUs, and
//!   the backend served chains on both queues;
//! - net: the guest brings up `eth0` (MAC from the backend's config space),
//!   pings the tap's address in a network namespace the test creates (the
//!   daemon runs inside it) and runs iperf3 to and from the host;
//! - console: the guest writes to `/dev/hvc0` and the host reads it from the
//!   console socket; the guest runs `sh </dev/hvc0 >/dev/hvc0`, the host
//!   resizes the console through its control socket and types a command
//!   that prints `stty size` and `MARKER-42`; the named port
//!   `org.bulkhead.test` shows up in `/sys/class/virtio-ports/*/name` and as
//!   `/dev/virtio-ports/NAME`, and what the guest writes there reaches the
//!   port's host socket; bytes written to the config space's `emerg_wr`
//!   register reach hvc0's host socket.
//!
//! A third test checks the documented exit statuses: guest power-off 0,
//! guest reboot 3, guest panic (with `panic=-1`) 3.
//!
//! These need a KVM that runs Linux: where `bulkhead-vmm probe` fails they
//! run inside the nested host (`nested::delegate`, tests/src/nested.rs).
//! Without root (network namespaces) the guest runs without the net device
//! and says so.
//!
//! A fourth test runs here on every machine: the same daemons and the same
//! `bulkhead-vmm` command line over both transports, stopped through the
//! control socket once `list` shows every backend connected (a dry run up
//! to the guest).

// Test code: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod linux;

use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_tests::daemon::Scratch;
use bulkhead_tests::guest;
use bulkhead_tests::nested;
use bulkhead_tests::process::workspace_binary;
use linux::{
    Backends, DISK_SERIAL, DISK_SIZE, GUEST_ADDR, GUEST_MAC, Options, PORT_NAME, TAP_ADDR, Vm,
};

/// How long the dry run waits for every backend to be connected.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);
/// Where the guest writes [`DISK_MARKER`], in bytes.
const DISK_MARKER_OFFSET: u64 = 1 << 20;
/// The line the guest writes at [`DISK_MARKER_OFFSET`]; the host reads it back.
const DISK_MARKER: &str = "BULKHEAD-BOOT-TEST-BLOCK\n";
/// What the guest writes to `/dev/hvc0` before starting the shell.
const HVC0_HELLO: &str = "HVC0-HELLO-FROM-GUEST";
/// What the guest's hvc0 shell prints once it holds the port.
const SHELL_READY: &str = "HVC0-SHELL-READY";
/// The size the host gives the console: columns, rows.
const RESIZE: (u16, u16) = (100, 40);
/// The line the host types into the console once it resized it: waits for
/// the size to arrive, prints it, and proves the shell ran host input.
const TYPED: &str = "i=0; while [ \"$(stty size)\" = '0 0' ] && [ $i -lt 100 ]; do sleep 0.1; \
                     i=$((i+1)); done; echo \"SIZE=$(stty size)\"; echo MARKER-$((6*7)); \
                     echo ok >/root/hvc0-typed\n";
const TYPED_OUTPUT: &str = "MARKER-42";
/// What the guest writes to the named port.
const PORT_HELLO: &str = "NAMED-PORT-HELLO";
/// What the guest writes one byte at a time into `emerg_wr`.
const EMERG_TEXT: &str = "EMERG-WRITE-OK";

/// What `stty size` (rows, then columns) shows in the kit's guest after a
/// resize to [`RESIZE`]. bulkhead-console sends the spec's `{ cols, rows }`;
/// Linux read the two swapped until its commit 5326ab737a47 (2025), which
/// the kit's Debian 6.1.192 kernel has (docs/console.md).
fn expected_stty_size() -> String {
    let (cols, rows) = RESIZE;
    format!("{rows} {cols}")
}

/// The guest's checks; the net part only when the net device is attached.
/// `config_offset`: where the transport puts the device config space
/// (virtio-pci: in the BAR at 0x2000; virtio-mmio: at 0x100). `packed`:
/// every device must have negotiated packed rings.
fn tour_script(net: bool, config_offset: u64, packed: bool) -> String {
    let mut s = String::new();
    if packed {
        // The driver's features in sysfs: one character per bit, bit 34
        // (VIRTIO_F_RING_PACKED) the 35th.
        s.push_str(
            r#"
# --- packed rings on every device
n=0
for d in /sys/bus/virtio/devices/*; do
  expect_eq "packed_$(basename "$d")" "$(cut -c35 "$d/features")" 1
  n=$((n + 1))
done
value packed_devices "$n"
"#,
        );
    }
    s.push_str(&format!(
        r#"
# --- blk
check vda_present test -b /dev/vda
expect_eq vda_sectors "$(cat /sys/block/vda/size)" {sectors}
expect_eq vda_serial "$(cat /sys/block/vda/serial)" {DISK_SERIAL}
expect_eq vda_hw_queues "$(ls /sys/block/vda/mq | wc -l)" 2
dd if=/dev/urandom of=/root/data bs=4096 count=16 2>/dev/null
check blk_write dd if=/root/data of=/dev/vda bs=4096 count=16 oflag=direct
check blk_read dd if=/dev/vda of=/root/back bs=4096 count=16 iflag=direct
check blk_same cmp /root/data /root/back
{{ printf '{marker}'; head -c 4096 /dev/zero; }} | head -c 4096 >/root/marker
check blk_marker dd if=/root/marker of=/dev/vda bs=4096 seek={marker_block} oflag=direct
# One job per vCPU, so both queues carry requests.
check fio_verify fio --name=verify --filename=/dev/vda --offset=8M --size=16M \
  --offset_increment=16M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
  --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --direct=1 \
  --verify=crc32c --verify_fatal=1 --group_reporting
"#,
        sectors = DISK_SIZE / 512,
        marker = DISK_MARKER.replace('\n', "\\n"),
        marker_block = DISK_MARKER_OFFSET / 4096,
    ));
    if net {
        s.push_str(&format!(
            r#"
# --- net
check eth0_present test -d /sys/class/net/eth0
expect_eq eth0_mac "$(cat /sys/class/net/eth0/address)" {GUEST_MAC}
check eth0_up ip link set eth0 up
check eth0_addr ip addr add {GUEST_ADDR}/24 dev eth0
check ping ping -c 3 -W 5 {TAP_ADDR}
check iperf3_to_host iperf3 -c {TAP_ADDR} -t 2 -f m
value iperf3_to_host_mbits "$(awk '/receiver/ {{print $7}}' /tmp/.check.out)"
check iperf3_from_host iperf3 -c {TAP_ADDR} -t 2 -f m -R
value iperf3_from_host_mbits "$(awk '/receiver/ {{print $7}}' /tmp/.check.out)"
"#
        ));
    }
    let emerg_bytes: Vec<String> = EMERG_TEXT.bytes().map(|b| b.to_string()).collect();
    s.push_str(&format!(
        r#"
# --- console: hvc0 appears once the driver's control messages are done
i=0
while [ ! -c /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
check hvc0_present test -c /dev/hvc0
check hvc0_write sh -c 'echo {HVC0_HELLO} >/dev/hvc0'
# A shell on hvc0, as a getty would start one; the host types into it.
setsid sh -c 'echo {SHELL_READY}; exec sh' </dev/hvc0 >/dev/hvc0 2>&1 &
i=0
while [ ! -f /root/hvc0-typed ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
check hvc0_shell_ran_host_input test -f /root/hvc0-typed

# --- console: the named port (udev would link /dev/virtio-ports/NAME)
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
  for f in /sys/class/virtio-ports/*/name; do
    [ -f "$f" ] && [ "$(cat "$f")" = {PORT_NAME} ] && port=$(basename "$(dirname "$f")")
  done
  [ -n "$port" ] || sleep 0.1
  i=$((i + 1))
done
check named_port_in_sysfs test -n "$port"
if [ -e /dev/virtio-ports/{PORT_NAME} ]; then
  value named_port_link udev
else
  value named_port_link "made by the test (no udev): /dev/$port"
  mkdir -p /dev/virtio-ports && ln -s "../$port" /dev/virtio-ports/{PORT_NAME}
fi
check named_port_dev test -c /dev/virtio-ports/{PORT_NAME}
check named_port_write sh -c 'echo {PORT_HELLO} >/dev/virtio-ports/{PORT_NAME}'

# --- console: emergency write. The device offers EMERG_WRITE, which a
# driver may use without negotiating it; Linux's driver never does, so the
# guest writes the register itself (iomem=relaxed lets /dev/mem reach a
# region the driver holds).
base=""
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat "$d/device")" = 0x0003 ] || continue
  parent=$(basename "$(readlink -f "$d/..")")
  base=$(grep -m1 " : $parent\$" /proc/iomem | sed 's/^ *//; s/-.*//')
done
check emerg_region_found test -n "$base"
value emerg_region "$base ($parent)"
for b in {emerg}; do devmem $((0x$base + {emerg_off})) 8 $b || fail emerg_write "devmem failed"; done
echo >/dev/hvc0
sync
"#,
        emerg = emerg_bytes.join(" "),
        emerg_off = config_offset + 8,
    ));
    s
}

/// Boots the tour over `transport` (on packed rings when `packed`) and
/// checks what the host saw.
fn tour(transport: &'static str, config_offset: u64, packed: bool) {
    let opts = Options {
        transport,
        cpus: 2,
        blk_queues: 2,
        cmdline: "iomem=relaxed",
        packed,
        ..Options::default()
    };
    let mut vm = Vm::boot(opts, |b| {
        tour_script(b.net.is_some(), config_offset, packed)
    });
    // The shell holds hvc0: resize, then type.
    if vm.wait_until(|vm| vm.hvc0.contains(SHELL_READY)) {
        let port = vm.backends.console_port("console");
        let (cols, rows) = RESIZE;
        let reply = linux::console_ctl(&port, &format!("resize {cols} {rows}"))
            .expect("resize through the console's control socket");
        assert_eq!(reply, "ok", "resize {cols} {rows}");
        vm.hvc0.send(TYPED).expect("type into the console socket");
    }
    let boot = vm.finish();
    let mut problems = Vec::new();
    let size = format!("SIZE={}", expected_stty_size());
    for (name, text, want) in [
        ("hvc0 (guest write)", &boot.hvc0, HVC0_HELLO),
        ("hvc0 (host-typed command)", &boot.hvc0, TYPED_OUTPUT),
        (
            "hvc0 (stty size after the resize)",
            &boot.hvc0,
            size.as_str(),
        ),
        ("hvc0 (emergency write)", &boot.hvc0, EMERG_TEXT),
        ("named port", &boot.named_port, PORT_HELLO),
    ] {
        if !text.contains(want) {
            problems.push(format!("{name}: the host never read {want:?}"));
        }
    }
    let marker = boot
        .backends
        .blk
        .scratch()
        .read_image(DISK_MARKER_OFFSET, DISK_MARKER.len())
        .unwrap_or_default();
    if marker != DISK_MARKER.as_bytes() {
        problems.push(format!(
            "the host image holds {:?} at {DISK_MARKER_OFFSET}, not the guest's marker",
            String::from_utf8_lossy(&marker)
        ));
    }
    let chains = boot.blk_chains_per_queue();
    if chains.len() != 2 || chains.contains(&0) {
        problems.push(format!(
            "bulkhead-blk should have served chains on both queues, served {chains:?}"
        ));
    }
    if boot.net {
        for c in ["ping", "iperf3_to_host", "iperf3_from_host"] {
            if !boot.run.check(c).is_some_and(|c| c.passed) {
                problems.push(format!("net: the guest's {c} did not run or failed"));
            }
        }
    }
    let want = if boot.net { "3" } else { "2" };
    if packed && boot.run.value("packed_devices") != Some(want) {
        problems.push(format!(
            "the guest checked packed rings on {:?} devices, not {want}",
            boot.run.value("packed_devices")
        ));
    }
    let rings = if packed { " on packed rings" } else { "" };
    boot.assert_passed(
        &format!("bulkhead-vmm + blk, net, console over virtio-{transport}{rings}"),
        problems,
    );
    eprintln!(
        "virtio-{transport}: guest done in {:.1?}; blk chains per queue {chains:?}; iperf3 to host \
         {} Mbit/s, from host {} Mbit/s",
        boot.run.elapsed,
        boot.run.value("iperf3_to_host_mbits").unwrap_or("-"),
        boot.run.value("iperf3_from_host_mbits").unwrap_or("-"),
    );
}

#[test]
fn linux_under_bulkhead_vmm_uses_blk_net_and_console_over_virtio_pci() {
    if nested::delegate("linux_under_bulkhead_vmm_uses_blk_net_and_console_over_virtio_pci") {
        return;
    }
    tour("pci", 0x2000, false);
}

#[test]
fn linux_under_bulkhead_vmm_uses_packed_rings_over_virtio_pci() {
    if nested::delegate("linux_under_bulkhead_vmm_uses_packed_rings_over_virtio_pci") {
        return;
    }
    tour("pci", 0x2000, true);
}

#[test]
fn linux_under_bulkhead_vmm_uses_blk_net_and_console_over_virtio_mmio() {
    if nested::delegate("linux_under_bulkhead_vmm_uses_blk_net_and_console_over_virtio_mmio") {
        return;
    }
    // The DSDT announces each device as LNRO0005 (Debian's kernel has no
    // VIRTIO_MMIO_CMDLINE_DEVICES).
    tour("mmio", 0x100, false);
}

/// Boots the kit's guest with no device and `script` as its test; returns
/// the VMM's exit code and the serial log.
fn boot_bare(script: &str) -> (Option<i32>, String) {
    let image = guest::image();
    let work = Scratch::new(0).expect("work dir");
    let initrd = linux::initrd(image, work.dir(), script);
    let serial = work.dir().join("serial.log");
    let log = work.dir().join("vmm.log");
    let mut cmd = Command::new(workspace_binary("bulkhead-vmm"));
    cmd.arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", "512M"])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"])
        .arg("--serial")
        .arg(format!("file={}", serial.display()));
    let mut vmm = guest::spawn_daemon("bulkhead-vmm", &mut cmd, &log).expect("start bulkhead-vmm");
    let status = vmm
        .wait_timeout(linux::BOOT_TIMEOUT.mul_f64(guest::timeout_scale()))
        .expect("wait for bulkhead-vmm");
    let _ = vmm.kill();
    let text = String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
    if std::env::var_os("BULKHEAD_SHOW_SERIAL").is_some() {
        eprintln!("--- serial console:\n{text}--- end of serial console");
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    (
        status.and_then(|s| s.code()),
        format!(
            "{}\n--- bulkhead-vmm:\n{}",
            guest::tail(&text, 60),
            guest::tail(&log, 10)
        ),
    )
}

#[test]
fn guest_poweroff_exits_0_and_guest_reboot_or_panic_exits_3() {
    if nested::delegate("guest_poweroff_exits_0_and_guest_reboot_or_panic_exits_3") {
        return;
    }
    // The init powers off after the script; `reboot -f` goes through the
    // keyboard controller (reboot=k); a panic reboots at once (panic=-1).
    for (what, script, want) in [
        ("power-off", "echo powering off\n", 0),
        ("reboot", "echo rebooting; reboot -f; sleep 60\n", 3),
        (
            "panic",
            "echo 1 >/proc/sys/kernel/sysrq; echo c >/proc/sysrq-trigger; sleep 60\n",
            3,
        ),
    ] {
        let started = Instant::now();
        let (code, output) = boot_bare(script);
        assert_eq!(
            code,
            Some(want),
            "guest {what}: bulkhead-vmm should exit {want}\n{output}"
        );
        eprintln!(
            "guest {what}: bulkhead-vmm exited {want} after {:.1?}",
            started.elapsed()
        );
    }
}

/// Whether `list` shows `want` devices, all connected.
fn all_connected(reply: &serde_json::Value, want: usize) -> bool {
    let Some(devs) = reply.get("devices").and_then(|d| d.as_array()) else {
        return false;
    };
    devs.len() == want
        && devs
            .iter()
            .all(|d| d.get("state").and_then(|s| s.as_str()) == Some("connected"))
}

#[test]
fn bulkhead_vmm_connects_to_blk_net_and_console_over_pci_and_mmio() {
    // No KVM lane: this stops before the guest matters. The guest's script
    // only sleeps, so where KVM does run it, nothing finishes early.
    let image = guest::image();
    for transport in ["pci", "mmio"] {
        let opts = Options {
            transport,
            ..Options::default()
        };
        let mut backends = Backends::start(&opts);
        let want = 2 + usize::from(backends.net.is_some());
        let work = Scratch::new(0).expect("work dir");
        let initrd = linux::initrd(image, work.dir(), "sleep 600\n");
        let log = work.dir().join("vmm.log");
        let api = work.dir().join("api.sock");
        let mut cmd = linux::vmm_command(image, &initrd, &backends, &opts, work.dir());
        let mut vmm =
            guest::spawn_daemon("bulkhead-vmm", &mut cmd, &log).expect("start bulkhead-vmm");
        let vmm_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let deadline = Instant::now() + ATTACH_TIMEOUT.mul_f64(guest::timeout_scale());
        let mut last = Err("no reply yet".to_string());
        loop {
            if let Ok(Some(st)) = vmm.try_wait() {
                panic!(
                    "{transport}: bulkhead-vmm exited early: {st}\n{}",
                    vmm_log()
                );
            }
            if let Some(why) = backends.exited() {
                panic!("{transport}: {why}\n{}", vmm_log());
            }
            if api.exists() {
                last = linux::ctl(&api, &["list"]);
                if last.as_ref().is_ok_and(|r| all_connected(r, want)) {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{transport}: not every backend connected within {ATTACH_TIMEOUT:?}: {last:?}\n{}",
                vmm_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let list = last.expect("list reply");
        let types: Vec<&str> = list["devices"]
            .as_array()
            .map(|d| d.iter().filter_map(|d| d["type"].as_str()).collect())
            .unwrap_or_default();
        let mut expected = vec!["blk", "console"];
        if backends.net.is_some() {
            expected.push("net");
        }
        let mut sorted = types.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, expected, "{transport}: {list}");
        let reply = linux::ctl(&api, &["shutdown"]).expect("shutdown");
        assert_eq!(reply["ok"], true, "{transport}: shutdown: {reply}");
        let status = vmm
            .wait_timeout(Duration::from_secs(10))
            .expect("wait for bulkhead-vmm");
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(5),
            "{transport}: bulkhead-vmm should exit 5 (stopped through the API)\n{}",
            vmm_log()
        );
        assert!(
            !api.exists(),
            "{transport}: the control socket outlived the VMM"
        );
        if let Some(why) = backends.exited() {
            panic!("{transport}: a backend died with the VMM: {why}");
        }
        eprintln!("{transport}: bulkhead-vmm attached {types:?} and stopped cleanly");
    }
}
