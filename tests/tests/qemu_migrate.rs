//! Live migration of a QEMU (TCG) guest whose disk is served by a
//! vhost-user-blk backend: a source QEMU on one backend migrates, with QMP
//! `migrate`, to a destination QEMU started with `-incoming` on a second
//! backend serving the same image, while the guest loops over reads and
//! writes. Each round drops the page cache and reads eight 4 MiB slots of
//! different random data through it (the device alone writes those pages:
//! `init_on_alloc=0`, the disk held open so its cache survives), then
//! writes a slot and reads it back with O_DIRECT. On the destination the
//! guest reads the slots again from its page cache: a page the backend
//! wrote after QEMU had copied it, and did not log, arrives stale and the
//! checksum fails (it does, with bulkhead-blk's logging switched off).
//! The loop ends when the guest sees the destination's serial (bulkhead-blk
//! is started with `--serial source` and `--serial destination`), or after
//! a while, when the guest idles so the migration converges.
//!
//! The same scenario runs against `qemu-storage-daemon` (the reference)
//! and against `bulkhead-blk`. Run `cargo build -p bulkhead-blk` first.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_tests::guest::{
    Guest, GuestRun, VHOST_USER_BLK_QUEUE_SIZE, image, spawn_daemon, tail,
};
use bulkhead_tests::net::NetDaemon;
use bulkhead_tests::netns::{self, NetNs, PacketSocket};
use bulkhead_tests::process::{ChildGuard, wait_for_path, workspace_binary};
use bulkhead_tests::skip::skip_if;
use serde_json::{Value, json};

const MIB: u64 = 1024 * 1024;
const DISK_SIZE: u64 = 64 * MIB;
/// Guest RAM: the initramfs (about 90 MiB) unpacks into it.
const MEM_MIB: u32 = 512;
/// Longest the guest keeps reading and writing after it reports ready (it
/// stops earlier once it sees the destination's serial).
const LOOP_SECONDS: u32 = 30;
/// When the loop ended on time (not at the switch), how long the guest then
/// stays idle so the migration converges before the checks: a guest that
/// keeps dirtying 32 MiB of page cache a round may keep it from converging
/// (qemu-storage-daemon, which logs as it should, does not converge until
/// the loop ends).
const SETTLE_SECONDS: u32 = 30;
/// 4 MiB slots of the pattern on the disk.
const SLOTS: u32 = 8;
/// Where fio's verify pattern lies on the disk (after the slots), and its size.
const FIO_OFFSET_MIB: u32 = 32;
const FIO_MIB: u32 = 32;

/// Migration bandwidth: slow enough for several passes over guest memory
/// while the guest's loop runs, so pages the device writes after QEMU
/// copied them are common. Checked 2026-12-06 with bulkhead-blk's marks
/// switched off: at 16 MiB/s the cached slots and fio's verify fail; at
/// 64 MiB/s the first pass ended so soon (migration in 4-7 s) that the
/// same run passed, proving nothing. With the log, the device's 32 MiB a
/// round keep the migration from converging until the loop ends (about
/// 32 s).
const MAX_BANDWIDTH: u64 = 16 * MIB;

/// The guest's network in the net scenario (see [`Lan`]).
const GUEST_IP: &str = "10.78.0.2";
const HOST_IP: &str = "10.78.0.1";
/// The MAC QEMU gives the NIC on both sides.
const NIC_MAC: &str = "52:54:00:78:00:02";
/// The MAC the guest sets on its interface before the migration (through
/// QEMU's control queue): part of the receive filter that must move.
const GUEST_MAC: &str = "52:54:00:78:ab:02";

/// What the guest does with its NIC in the net scenario: before it reports
/// ready, takes a MAC of its own, pings the namespace and starts a ping that
/// runs through the migration; after the loop, stops it (its counts) and
/// pings from the destination.
fn net_prelude() -> String {
    format!(
        r#"
ip link set eth0 address {GUEST_MAC}
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
expect_eq guest-mac "$(cat /sys/class/net/eth0/address)" {GUEST_MAC}
check ping-before ping -c 3 -W 5 {HOST_IP}
# One echo at a time, each its own process, until told to stop: a count
# per answer that survives however the loop ends (a background job of a
# script ignores SIGINT, which ping's own summary needs).
while [ ! -e /tmp/ping.stop ]; do
  if ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1; then echo ok; else echo lost; fi >>/tmp/ping.log
  sleep 0.2 2>/dev/null || sleep 1
done &
pingpid=$!
"#
    )
}

fn net_epilogue() -> String {
    format!(
        r#"
touch /tmp/ping.stop
wait $pingpid
value ping-transmitted "$(wc -l </tmp/ping.log)"
value ping-received "$(grep -c ok /tmp/ping.log)"
# Echoes lost in a row at the switch, and the last one answered.
value ping-longest-loss "$(awk '/lost/ {{ n++; if (n > m) m = n }} /ok/ {{ n = 0 }} END {{ print m + 0 }}' /tmp/ping.log)"
expect_eq ping-last-answered "$(tail -1 /tmp/ping.log)" ok
check ping-after ping -c 3 -W 5 {HOST_IP}
expect_eq guest-mac-after "$(cat /sys/class/net/eth0/address)" {GUEST_MAC}
dmesg | grep -E 'NETDEV WATCHDOG|Call Trace|virtio_net.*(error|fail)'
expect_eq guest-net-errors "$(dmesg | grep -c -E 'NETDEV WATCHDOG|Call Trace|virtio_net.*(error|fail)')" 0
"#
    )
}

fn guest_script(net: bool) -> String {
    let (net_prelude, net_epilogue) = if net {
        (net_prelude(), net_epilogue())
    } else {
        (String::new(), String::new())
    };
    format!(
        r#"
# A different random 4 MiB in each slot, written with O_DIRECT.
i=0
while [ $i -lt {SLOTS} ]; do
  dd if=/dev/urandom of=/tmp/slot-$i.bin bs=1M count=4 2>/dev/null
  sha256sum /tmp/slot-$i.bin | cut -d' ' -f1 >/tmp/want-$i
  dd if=/tmp/slot-$i.bin of=/dev/vda bs=1M seek=$(( i * 4 )) oflag=direct 2>/dev/null || fail write-slot-$i
  i=$(( i + 1 ))
done
expect_eq patterns "$(cat /tmp/want-* | sort -u | wc -l)" {SLOTS}
# Held open: Linux drops a block device's page cache at its last close.
exec 3</dev/vda
# The serial comes from the device on every read (GET_ID): it changes when
# the destination's backend answers.
first=$(cat /sys/block/vda/serial)
value first-serial "$first"
# fio's verify pattern (each 4 KiB block carries its offset and checksum).
check fio-write fio --name=pattern --filename=/dev/vda --offset={FIO_OFFSET_MIB}M --size={FIO_MIB}M \
  --rw=write --bs=4k --direct=1 --ioengine=libaio --iodepth=16 --verify=crc32c --do_verify=0 \
  --eta=never --output=/tmp/fio-write.out
{net_prelude}
# Random O_DIRECT reads at QD32, straight into fio's 32 buffers (the device
# alone writes them, over and over), each block verified in guest memory
# when it completes. Requests in flight when the source stops complete
# there (GET_VRING_BASE drains the queue) and are verified on the
# destination: a buffer the device wrote but did not log arrives stale.
# A read job with verify reads its region once (time_based and loops do
# not apply), so fio runs again and again until told to stop; each run
# logs the serial it started and ended on, and its exit status.
while [ ! -e /tmp/fio.stop ]; do
  at=$(cat /sys/block/vda/serial)
  fio --name=migrate --filename=/dev/vda --offset={FIO_OFFSET_MIB}M --size={FIO_MIB}M \
    --rw=randread --bs=4k --direct=1 --ioengine=libaio --iodepth=32 --verify=crc32c \
    --eta=never --output=/tmp/fio-read.out
  rc=$?
  echo "$at $(cat /sys/block/vda/serial) $rc" >>/tmp/fio-runs
  [ $rc -eq 0 ] || cp /tmp/fio-read.out /tmp/fio-failed.out
done &
fiopid=$!
value ready 1
end=$(( $(date +%s) + {LOOP_SECONDS} ))
rounds=0
bad=0
while [ "$(date +%s)" -lt "$end" ] && [ "$(cat /sys/block/vda/serial)" = "$first" ]; do
  # Buffered reads into fresh page-cache pages (init_on_alloc=0: nothing
  # but the device writes them), which the guest reads again after the
  # switch without asking the disk.
  # The order turns each round: the freed pages, taken again in about the
  # same order, get another slot's data each round.
  echo 3 > /proc/sys/vm/drop_caches
  i=0
  while [ $i -lt {SLOTS} ]; do
    dd if=/dev/vda of=/dev/null bs=1M skip=$(( (i + rounds) % {SLOTS} * 4 )) count=4 2>/dev/null
    i=$(( i + 1 ))
  done
  # A write and an O_DIRECT read back.
  slot=$(( rounds % {SLOTS} ))
  dd if=/tmp/slot-$slot.bin of=/dev/vda bs=1M seek=$(( slot * 4 )) oflag=direct 2>/dev/null || bad=$(( bad + 1 ))
  got=$(dd if=/dev/vda bs=1M skip=$(( slot * 4 )) count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/want-$slot)" ] || {{ bad=$(( bad + 1 )); echo "round $rounds slot $slot: $got"; }}
  rounds=$(( rounds + 1 ))
done
value rounds $rounds
[ "$(cat /sys/block/vda/serial)" = "$first" ] && value loop-ended-at-switch 0 || value loop-ended-at-switch 1
if [ "$(cat /sys/block/vda/serial)" = "$first" ]; then
  # Still on the source, or no serial to tell: let the migration finish.
  sleep {SETTLE_SECONDS}
fi
value last-serial "$(cat /sys/block/vda/serial)"
touch /tmp/fio.stop
wait $fiopid
cat /tmp/fio-runs
[ -e /tmp/fio-failed.out ] && grep -E 'verify|err=' /tmp/fio-failed.out | head -5
value fio-runs "$(wc -l </tmp/fio-runs)"
value fio-spanning-runs "$(grep -c '^source destination ' /tmp/fio-runs)"
expect_eq fio-read-verify "$(awk '$NF != 0' /tmp/fio-runs | wc -l)" 0
{net_epilogue}
expect_eq loop-readbacks $bad 0
[ $rounds -ge 1 ] && pass loop-ran || fail loop-ran "no round"
# What the device read into the page cache on the source, read back from
# the page cache on the destination: a page the device wrote and did not
# log would be stale here.
i=0
while [ $i -lt {SLOTS} ]; do
  got=$(dd if=/dev/vda bs=1M skip=$(( i * 4 )) count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
  expect_eq cached-slot-$i "$got" "$(cat /tmp/want-$i)"
  i=$(( i + 1 ))
done
# And from the disk.
echo 3 > /proc/sys/vm/drop_caches
i=0
while [ $i -lt {SLOTS} ]; do
  got=$(dd if=/dev/vda bs=1M skip=$(( i * 4 )) count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  expect_eq disk-slot-$i "$got" "$(cat /tmp/want-$i)"
  i=$(( i + 1 ))
done
"#
    )
}

/// A QMP connection: greeting read, capabilities negotiated.
struct Qmp {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> Qmp {
        wait_for_path(path, timeout)
            .unwrap_or_else(|e| panic!("QMP socket {}: {e}", path.display()));
        let deadline = Instant::now() + timeout;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect QMP {}: {e}", path.display()),
            }
        };
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("QMP timeout");
        let mut q = Qmp {
            out: sock.try_clone().expect("clone QMP socket"),
            input: BufReader::new(sock),
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.execute("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.input.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP line {line:?}: {e}"))
    }

    /// Runs a command and returns its `return` (events in between are skipped).
    fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.out, "{msg}").expect("write QMP");
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            panic!("QMP {cmd}: {v}");
        }
    }
}

/// QEMU's arguments, identical on both sides but for `extra`.
fn qemu(initrd: &Path, serial: &Path, blk: &Path, qmp: &Path, extra: &[String]) -> Command {
    let img = image();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-nodefaults", "-nographic", "-no-reboot"])
        .arg("-m")
        .arg(format!("{MEM_MIB}M"))
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on"
        ))
        .args(["-M", "q35,memory-backend=mem", "-smp", "1"])
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(initrd)
        // init_on_alloc=0: a page-cache page gets its contents from the
        // device alone (see the guest script).
        .args(["-append", "console=ttyS0 quiet panic=-1 init_on_alloc=0"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-chardev")
        .arg(format!("socket,id=vu0,path={}", blk.display()))
        .arg("-device")
        .arg(format!(
            "vhost-user-blk-pci,chardev=vu0,num-queues=1,queue-size={VHOST_USER_BLK_QUEUE_SIZE}"
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra);
    cmd
}

struct Backend {
    name: &'static str,
    /// Starts the backend; the serial its device reports is the last
    /// argument where the backend can set one.
    start: fn(image: &Path, socket: &Path, log: &Path, serial: &str) -> ChildGuard,
    /// Whether the guest sees the switch in the serial (bulkhead-blk's
    /// `--serial`; qemu-storage-daemon's export has none to set).
    serials: bool,
}

fn start_qsd(image: &Path, socket: &Path, log: &Path, _serial: &str) -> ChildGuard {
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},locking=off",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},\
             writable=on,num-queues=1",
            socket.display()
        ));
    spawn_daemon("qemu-storage-daemon", &mut cmd, log)
        .unwrap_or_else(|e| panic!("{e} (run .ci/install-deps)"))
}

fn start_bulkhead(image: &Path, socket: &Path, log: &Path, serial: &str) -> ChildGuard {
    let bin = workspace_binary("bulkhead-blk");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p bulkhead-blk` first",
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--image")
        .arg(image)
        .args(["--num-queues", "1", "--serial", serial])
        .env("RUST_LOG", "info");
    spawn_daemon("bulkhead-blk", &mut cmd, log).unwrap_or_else(|e| panic!("{e}"))
}

const BRIDGE: &str = "bhmigbr0";
const SRC_TAP: &str = "bhmigsrc0";
const DST_TAP: &str = "bhmigdst0";

/// The net scenario's network, as two hosts on one LAN would have it: in a
/// namespace, a bridge carrying the address the guest pings, and two taps
/// on it, the source host's and the destination host's, each served by its
/// own `bulkhead-net`. After the move only the destination's tap reaches
/// the guest: the bridge must learn the guest's MAC on that port, which the
/// destination daemon's RARP announcement (QEMU's SEND_RARP) teaches it; a
/// packet socket on that tap catches the announcement.
struct Lan {
    src: NetDaemon,
    dst: NetDaemon,
    capture: PacketSocket,
    /// Dropped last: deleting it kills what runs inside.
    _ns: NetNs,
}

impl Lan {
    fn new() -> Lan {
        let ns = NetNs::new().expect("create a network namespace");
        let ip = |args: &[&str]| {
            ns.ip(args)
                .unwrap_or_else(|e| panic!("ip {}: {e}", args.join(" ")))
        };
        ns.run("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])
            .expect("sysctl");
        ip(&["link", "add", BRIDGE, "type", "bridge"]);
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE]);
        ip(&["link", "set", BRIDGE, "up"]);
        for tap in [SRC_TAP, DST_TAP] {
            ip(&["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
            ip(&["link", "set", tap, "master", BRIDGE]);
            ip(&["link", "set", tap, "up"]);
        }
        assert!(
            workspace_binary("bulkhead-net").exists(),
            "run `cargo build -p bulkhead-net` first"
        );
        let start = |tap: &str| {
            let fds = ns.open_tap_fds(tap, 1, false).expect("open the tap");
            NetDaemon::start_with_fds(fds, &[]).expect("start bulkhead-net")
        };
        let src = start(SRC_TAP);
        let dst = start(DST_TAP);
        let capture = ns
            .packet_socket(DST_TAP, false)
            .expect("packet socket on the destination's tap");
        Lan {
            src,
            dst,
            capture,
            _ns: ns,
        }
    }

    /// QEMU's arguments for a NIC on `daemon` (the same MAC on both sides).
    fn qemu_args(daemon: &NetDaemon) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("socket,id=vn0,path={}", daemon.socket().display()),
            "-netdev".into(),
            "vhost-user,id=net0,chardev=vn0".into(),
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,id=nic0,mac={NIC_MAC}"),
        ]
    }

    /// RARP frames from `mac` that reach the destination's tap within
    /// `wait` (QEMU sends its announcement rounds within about a second
    /// and a half of the guest resuming).
    fn rarps_from(&self, mac: [u8; 6], wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.capture.recv(left.min(Duration::from_millis(200))) {
                Ok(Some(c)) if c.frame.len() >= 14 && c.frame[12..14] == [0x80, 0x35] => {
                    if c.frame[6..12] == mac {
                        got.push(c.frame);
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("capture on {DST_TAP}: {e}"),
            }
        }
        got
    }
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(s.split(':')) {
        *b = u8::from_str_radix(p, 16).expect("hex byte");
    }
    mac
}

fn read_lossy(p: &Path) -> String {
    String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).replace('\r', "")
}

fn scenario(backend: &Backend, net: bool) {
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-qemu-migrate-")
        .tempdir()
        .expect("tempdir");
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    File::create(p("disk.img"))
        .and_then(|f| f.set_len(DISK_SIZE))
        .expect("create image");
    let lan = net.then(Lan::new);
    Guest::new(guest_script(net))
        .write_initrd_to(&p("initrd.cpio"))
        .expect("write the guest initrd");

    let mut src_blk = (backend.start)(
        &p("disk.img"),
        &p("src-blk.sock"),
        &p("src-blk.log"),
        "source",
    );
    let mut dst_blk = (backend.start)(
        &p("disk.img"),
        &p("dst-blk.sock"),
        &p("dst-blk.log"),
        "destination",
    );
    for s in ["src-blk.sock", "dst-blk.sock"] {
        wait_for_path(&p(s), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{}: {s}: {e}", backend.name));
    }
    let logs = || {
        format!(
            "--- source serial:\n{}\n--- destination serial:\n{}\n--- source QEMU:\n{}\n\
             --- destination QEMU:\n{}\n--- source backend:\n{}\n--- destination backend:\n{}",
            tail(&read_lossy(&p("src.serial")), 30),
            tail(&read_lossy(&p("dst.serial")), 30),
            tail(&read_lossy(&p("src-qemu.log")), 20),
            tail(&read_lossy(&p("dst-qemu.log")), 20),
            tail(&read_lossy(&p("src-blk.log")), 20),
            tail(&read_lossy(&p("dst-blk.log")), 20),
        ) + &net_logs(lan.as_ref())
    };

    let incoming = format!("unix:{}", p("migrate.sock").display());
    let mut dst = spawn_daemon(
        "qemu (destination)",
        &mut qemu(
            &p("initrd.cpio"),
            &p("dst.serial"),
            &p("dst-blk.sock"),
            &p("dst.qmp"),
            &[
                vec!["-incoming".into(), incoming.clone()],
                lan.as_ref()
                    .map(|l| Lan::qemu_args(&l.dst))
                    .unwrap_or_default(),
            ]
            .concat(),
        ),
        &p("dst-qemu.log"),
    )
    .expect("start the destination QEMU");
    let mut src = spawn_daemon(
        "qemu (source)",
        &mut qemu(
            &p("initrd.cpio"),
            &p("src.serial"),
            &p("src-blk.sock"),
            &p("src.qmp"),
            &lan.as_ref()
                .map(|l| Lan::qemu_args(&l.src))
                .unwrap_or_default(),
        ),
        &p("src-qemu.log"),
    )
    .expect("start the source QEMU");
    let mut src_qmp = Qmp::connect(&p("src.qmp"), Duration::from_secs(30));
    let mut dst_qmp = Qmp::connect(&p("dst.qmp"), Duration::from_secs(30));

    // The guest boots and starts its I/O loop on the source.
    let deadline = Instant::now() + Duration::from_secs(180);
    while !read_lossy(&p("src.serial")).contains("@@BULKHEAD VALUE ready 1") {
        assert!(
            Instant::now() < deadline && matches!(src.try_wait(), Ok(None)),
            "{}: the guest never got ready\n{}",
            backend.name,
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let the loop run a little on the source first.
    std::thread::sleep(Duration::from_secs(2));
    // The receive filter the guest set (its MAC, its multicast groups),
    // which QEMU keeps: it handles virtio-net's control queue itself.
    let src_filter = net.then(|| src_qmp.execute("query-rx-filter", json!({})));
    src_qmp.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": MAX_BANDWIDTH }),
    );
    let started = Instant::now();
    src_qmp.execute("migrate", json!({ "uri": incoming }));
    let status = loop {
        let info = src_qmp.execute("query-migrate", json!({}));
        let status = info
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            if status != "completed" {
                eprintln!("query-migrate: {info}");
            }
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{}: migration still {status} after 120 s\n{}",
            backend.name,
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        status,
        "completed",
        "{}: migration\n{}",
        backend.name,
        logs()
    );
    eprintln!(
        "{}: migration completed in {:.1?}",
        backend.name,
        started.elapsed()
    );
    // Right away: the guest powers off when its checks are done.
    assert!(
        matches!(dst.try_wait(), Ok(None)),
        "{}: the destination QEMU is gone\n{}",
        backend.name,
        logs()
    );
    let dst_filter = net.then(|| dst_qmp.execute("query-rx-filter", json!({})));
    // The source is paused now (or gone): done with it.
    let _ = writeln!(src_qmp.out, "{}", json!({ "execute": "quit" }));
    if !matches!(src.wait_timeout(Duration::from_secs(10)), Ok(Some(_))) {
        let _ = src.kill();
    }
    if let Some(lan) = lan.as_ref() {
        // The destination announces the NIC on its tap: QEMU passes in
        // SEND_RARP the MAC the NIC was configured with (`mac=`), not the
        // one the guest set since, as it does for its own announcements.
        let rarps = lan.rarps_from(parse_mac(NIC_MAC), Duration::from_secs(5));
        assert!(
            !rarps.is_empty(),
            "no RARP announcement of {NIC_MAC} on the destination's tap\n{}",
            logs()
        );
        let mut want = vec![0u8; 60];
        want[..6].copy_from_slice(&[0xff; 6]);
        want[6..12].copy_from_slice(&parse_mac(NIC_MAC));
        want[12..22].copy_from_slice(&[0x80, 0x35, 0, 1, 0x08, 0x00, 6, 4, 0, 3]);
        want[22..28].copy_from_slice(&parse_mac(NIC_MAC));
        want[32..38].copy_from_slice(&parse_mac(NIC_MAC));
        assert_eq!(rarps[0], want, "the RARP announcement");
        eprintln!("{}: {} RARP announcement(s)", backend.name, rarps.len());
        assert!(
            lan.dst.log().contains(&format!("announced {NIC_MAC}")),
            "{}",
            lan.dst.log()
        );
        let src_filter = src_filter.expect("the source's filter");
        let dst_filter = dst_filter.expect("the destination's filter");
        assert_eq!(
            dst_filter, src_filter,
            "the receive filter changed in the move"
        );
        let nic = &src_filter[0];
        assert_eq!(nic["main-mac"], GUEST_MAC, "the guest's MAC: {src_filter}");
        assert_eq!(nic["promiscuous"], false, "{src_filter}");
    }

    // The destination's guest finishes the loop and powers off.
    let exited = dst
        .wait_timeout(Duration::from_secs(180))
        .expect("wait for the destination QEMU");
    if exited.is_none() {
        let _ = dst.kill();
    }
    for d in [&mut src_blk, &mut dst_blk] {
        let _ = d.signal(libc::SIGTERM);
        let _ = d.wait_timeout(Duration::from_secs(5));
    }
    let serial = read_lossy(&p("src.serial")) + &read_lossy(&p("dst.serial"));
    let run = GuestRun::parse(&serial);
    let dst_run = GuestRun::parse(&read_lossy(&p("dst.serial")));
    assert!(
        exited.is_some() && run.passed(),
        "{}: guest test failed (destination QEMU exited: {exited:?})\n{}\n{}",
        backend.name,
        run.report(),
        logs()
    );
    assert!(
        dst_run.check("loop-readbacks").is_some(),
        "{}: the checks did not finish on the destination\n{}",
        backend.name,
        logs()
    );
    assert!(
        dst_run.check("fio-read-verify").is_some(),
        "{}: fio's verify did not end on the destination\n{}",
        backend.name,
        run.report()
    );
    assert!(
        run.value("fio-runs")
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|n| n > 0),
        "{}: fio never ran\n{}",
        backend.name,
        run.report()
    );
    eprintln!(
        "{}: {} fio runs, each verified in guest memory; {} of them from the source to the destination",
        backend.name,
        run.value("fio-runs").unwrap_or("?"),
        run.value("fio-spanning-runs").unwrap_or("?")
    );
    if backend.serials {
        assert_eq!(
            dst_run.value("last-serial"),
            Some("destination"),
            "{}: the guest did not see the destination's serial\n{}",
            backend.name,
            run.report()
        );
    }
    eprintln!(
        "{}: {} rounds, {} checks",
        backend.name,
        run.value("rounds").unwrap_or("?"),
        run.checks.len()
    );
    if net {
        for c in [
            "ping-before",
            "ping-after",
            "ping-last-answered",
            "guest-net-errors",
        ] {
            assert!(
                dst_run.check(c).is_some() || run.check(c).is_some(),
                "{}: no {c} check\n{}",
                backend.name,
                run.report()
            );
        }
        let sent: u64 = run
            .value("ping-transmitted")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let got: u64 = run
            .value("ping-received")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        eprintln!(
            "{}: ping through the migration: {got} of {sent} answered",
            backend.name
        );
        assert!(
            sent > 0 && got > 0,
            "{}: ping {got}/{sent}\n{}",
            backend.name,
            run.report()
        );
        eprintln!(
            "{}: at most {} echoes lost in a row",
            backend.name,
            run.value("ping-longest-loss").unwrap_or("?")
        );
    }
}

fn net_logs(lan: Option<&Lan>) -> String {
    match lan {
        None => String::new(),
        Some(l) => format!(
            "\n--- source bulkhead-net:\n{}\n--- destination bulkhead-net:\n{}",
            tail(&l.src.log(), 20),
            tail(&l.dst.log(), 20)
        ),
    }
}

#[test]
fn qemu_guest_migrates_with_qemu_storage_daemon_export() {
    scenario(
        &Backend {
            name: "qemu-storage-daemon",
            start: start_qsd,
            serials: false,
        },
        false,
    );
}

#[test]
fn qemu_guest_migrates_with_bulkhead_blk() {
    scenario(
        &Backend {
            name: "bulkhead-blk",
            start: start_bulkhead,
            serials: true,
        },
        false,
    );
}

#[test]
fn qemu_guest_migrates_with_bulkhead_blk_and_net() {
    if skip_if(
        "qemu_guest_migrates_with_bulkhead_blk_and_net",
        netns::unavailable(),
    ) {
        return;
    }
    scenario(
        &Backend {
            name: "bulkhead-blk and bulkhead-net",
            start: start_bulkhead,
            serials: true,
        },
        true,
    );
}
