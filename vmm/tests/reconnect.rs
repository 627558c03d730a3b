//! Backend loss and replacement under a running driver, without a vCPU: the
//! simulated virtio-mmio driver of `support` keeps I/O going while the
//! backend process is SIGKILLed and restarted on the same socket (the VMM's
//! monitor reconnects and replays), or while the device is moved to another
//! backend process (`swap`, through the control socket and `bulkhead-vmm
//! ctl`), including a qemu-storage-daemon export. Build the binaries first:
//! `cargo build -p bulkhead-blk -p bulkhead-net -p bulkhead-console -p bulkhead-vmm`.

// Test code: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::skip::{self, skip_if};
use bulkhead_vmm::bus::Bus;
use bulkhead_vmm::device::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};
use bulkhead_vmm::memory::GuestRam;
use bulkhead_vmm::seccomp::SeccompMode;
use bulkhead_vmm::transport::mmio::{MMIO_WINDOW, VirtioMmioDevice};
use bulkhead_vmm::transport::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VirtioState,
};
use bulkhead_vmm::vcpu::ExitRequest;
use bulkhead_vmm::vhost_user::{BackendHandle, LinkState, VhostUserDevice, VhostUserOptions};
use bulkhead_vmm::vm_events::{IoAddr, TestVmEvents, VmEvents};
use serde_json::json;
use support::*;
use vmm_sys_util::eventfd::EventFd;

const BLK_IMAGE: u64 = 32 << 20;
const RING_SIZE: u16 = 256;
/// Writes per round: 3 descriptors each, so a 256-entry ring holds 85.
const PER_ROUND: usize = 80;
const REQ_BYTES: usize = 64 << 10;
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The VMM side of one device: guest RAM, a virtio-mmio transport wired to
/// a real backend, the simulated driver, and the device's backend handle
/// with its monitor thread running.
struct Rig {
    ram: Arc<GuestRam>,
    events: Arc<TestVmEvents>,
    dev: Arc<Mutex<VirtioMmioDevice>>,
    d: MmioDriver,
    handle: Arc<BackendHandle>,
}

impl Rig {
    fn new(id: &str, socket: &Path, virtio_id: u32, config_size: u32) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let ram = Arc::new(GuestRam::new(RAM).unwrap());
        let events = Arc::new(TestVmEvents::default());
        let opts = VhostUserOptions {
            socket: socket.to_path_buf(),
            virtio_id,
            queues: None,
            queue_size: RING_SIZE,
            config_size,
            packed: false,
        };
        let dev = VhostUserDevice::connect_named(id, &opts, ram.clone()).expect("connect");
        let handle = dev.handle();
        handle.start_monitor(SeccompMode::Off).unwrap();
        let state = VirtioState::new(Box::new(dev)).unwrap();
        let dev = Arc::new(Mutex::new(VirtioMmioDevice::new(
            state,
            events.clone() as Arc<dyn VmEvents>,
            MMIO_BASE,
            MMIO_GSI,
        )));
        let mut bus = Bus::new();
        bus.insert(MMIO_BASE, MMIO_WINDOW, dev.clone()).unwrap();
        Rig {
            ram,
            events,
            dev,
            d: MmioDriver {
                bus,
                device_id: virtio_id,
                queue_max: RING_SIZE,
            },
            handle,
        }
    }

    /// Negotiates `low` features, sets up `queues` (index, ring base) and sets DRIVER_OK.
    fn start(&self, low: u32, queues: &[u32]) -> Vec<Ring> {
        self.d.negotiate_with(low);
        let rings: Vec<Ring> = queues
            .iter()
            .map(|&q| {
                let ring = Ring::new(
                    self.ram.clone(),
                    0x10_0000 + 0x4000 * u64::from(q),
                    RING_SIZE,
                );
                self.d.setup_queue(q, &ring);
                ring
            })
            .collect();
        self.d.w(
            0x070,
            u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
        );
        assert_eq!(self.d.r(0x070) & 0x40, 0, "no DEVICE_NEEDS_RESET");
        assert!(self.dev.lock().unwrap().state().is_active());
        rings
    }

    /// The ioeventfd KVM would signal for a notify of queue `q`.
    fn kick(&self, q: u32) -> EventFd {
        self.events
            .ioevent(IoAddr::Mmio(MMIO_BASE + 0x50), Some(q))
            .expect("ioeventfd")
    }

    /// The irqfd of the `nth` enabled queue (all share the device's GSI).
    fn irq(&self, nth: usize) -> EventFd {
        self.events.irqfds(MMIO_GSI).remove(nth)
    }

    /// Waits until the backend is connected again after `before` reconnections.
    fn wait_reconnected(&self, before: u64) {
        let deadline = Instant::now() + RECONNECT_TIMEOUT;
        while self.handle.reconnects() <= before || self.handle.state() != LinkState::Connected {
            assert!(
                Instant::now() < deadline,
                "no reconnection: {:?}",
                self.handle.info()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn bin(name: &str) -> PathBuf {
    workspace_binary(name)
}

// ------------------------------------------------------------------ blk

struct Write {
    head: u16,
    sector: u64,
    data: Vec<u8>,
    status: u64,
}

fn data_for(round: usize, i: usize) -> Vec<u8> {
    let seed = (round * 7919 + i * 31) as u32;
    (0..REQ_BYTES as u32)
        .map(|b| (seed.wrapping_mul(2_654_435_761).wrapping_add(b * 13) >> 7) as u8)
        .collect()
}

/// Lays out and publishes one 64 KiB write in slot `slot` (no kick).
fn submit_write(ring: &mut Ring, ram: &GuestRam, slot: usize, sector: u64, data: Vec<u8>) -> Write {
    let at = 0x40_0000 + slot as u64 * 0x2_0000;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    ram.write(at, &h).unwrap();
    ram.write(at + 0x1000, &data).unwrap();
    let status = at + 0x1000 + REQ_BYTES as u64;
    ram.write(status, &[0xff]).unwrap();
    let head = ring.submit(&[
        (at, 16, false),
        (at + 0x1000, REQ_BYTES as u32, false),
        (status, 1, true),
    ]);
    Write {
        head,
        sector,
        data,
        status,
    }
}

/// Used entries `from..to` of `ring`.
fn used_between(ring: &Ring, from: u16, to: u16) -> Vec<u32> {
    let mut out = Vec::new();
    let mut i = from;
    while i != to {
        let mut e = [0u8; 4];
        ring.ram
            .read(ring.used + 4 + 8 * u64::from(i % ring.size), &mut e)
            .unwrap();
        out.push(u32::from_le_bytes(e));
        i = i.wrapping_add(1);
    }
    out
}

/// Waits until the ring's used index reaches `target`, consuming interrupts;
/// returns how many interrupts fired.
fn wait_used(ring: &Ring, irq: &EventFd, target: u16) -> usize {
    let deadline = Instant::now() + RECONNECT_TIMEOUT;
    let mut irqs = 0;
    while ring.used_idx() != target {
        assert!(
            Instant::now() < deadline,
            "used index stuck at {} (want {target})",
            ring.used_idx()
        );
        if wait_irq_for(irq, Duration::from_millis(50)) {
            irqs += 1;
        }
    }
    while wait_irq_for(irq, Duration::from_millis(0)) {
        irqs += 1;
    }
    irqs
}

fn wait_irq_for(fd: &EventFd, t: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; poll only writes its revents.
    let n = unsafe { libc::poll(&mut p, 1, t.as_millis() as i32) };
    n == 1 && fd.read().is_ok()
}

/// Checks that the round's writes each completed exactly once with OK.
fn check_round(ring: &Ring, ram: &GuestRam, writes: &[Write], from: u16) {
    let to = ring.used_idx();
    let used = used_between(ring, from, to);
    let heads: BTreeSet<u32> = writes.iter().map(|w| u32::from(w.head)).collect();
    let seen: BTreeSet<u32> = used.iter().copied().collect();
    assert_eq!(used.len(), writes.len(), "one used entry per request");
    assert_eq!(seen.len(), used.len(), "no request completed twice");
    assert_eq!(seen, heads, "exactly the submitted heads completed");
    for w in writes {
        let mut s = [0u8];
        ram.read(w.status, &mut s).unwrap();
        assert_eq!(s[0], 0, "request {} status", w.head);
    }
    // Nothing more arrives later.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ring.used_idx(), to, "extra completions after the round");
}

fn start_blk(scratch: Scratch) -> Daemon {
    // O_DIRECT and the sync engine keep writes slow enough for a SIGKILL to
    // land while requests are in flight.
    Daemon::blk(
        scratch,
        &[
            "--num-queues",
            "1",
            "--queue-size",
            "256",
            "--engine",
            "sync",
            "--direct",
        ],
    )
    .expect("start bulkhead-blk (cargo build -p bulkhead-blk)")
}

/// A second bulkhead-blk serving the same image on another socket. It
/// starts beside the first (both hold only the reader part of the image
/// lock until their device runs) and takes the writer part when the swap
/// starts its queue, after the first's stopped.
fn second_blk(image: &Path) -> Daemon {
    let scratch = Scratch::new(4096).unwrap();
    let mut cmd = Command::new(bin("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--image")
        .arg(image)
        .args([
            "--num-queues",
            "1",
            "--queue-size",
            "256",
            "--engine",
            "sync",
            "--direct",
        ]);
    Daemon::start("bulkhead-blk", cmd, scratch).expect("start the second bulkhead-blk")
}

#[test]
fn blk_sigkill_mid_run_reconnects_and_completes_every_request_exactly_once() {
    let mut daemon = start_blk(Scratch::new(BLK_IMAGE).unwrap());
    let rig = Rig::new("blk0", daemon.socket(), VIRTIO_ID_BLOCK, 60);
    let mut rings = rig.start(0, &[0]);
    let ring = &mut rings[0];
    let kick = rig.kick(0);
    let irq = rig.irq(0);
    let mut all = Vec::new();
    let mut in_flight_at_kill = 0;
    for (round, delay_us) in [0u64, 300, 1000, 3000, 8000].into_iter().enumerate() {
        let from = ring.used_idx();
        let writes: Vec<Write> = (0..PER_ROUND)
            .map(|i| {
                submit_write(
                    ring,
                    &rig.ram,
                    i,
                    (i * REQ_BYTES / 512) as u64,
                    data_for(round, i),
                )
            })
            .collect();
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_micros(delay_us));
        let scratch = daemon.kill_keep_scratch().unwrap();
        let info = rig.handle.info();
        let done = ring.used_idx().wrapping_sub(from);
        eprintln!(
            "round {round}: killed with {done}/{PER_ROUND} done, {:?} marked in flight",
            info.inflight
        );
        in_flight_at_kill += info.inflight.unwrap_or(0);
        let before = rig.handle.reconnects();
        daemon = start_blk(scratch);
        rig.wait_reconnected(before);
        let target = from.wrapping_add(PER_ROUND as u16);
        let irqs = wait_used(ring, &irq, target);
        if done < PER_ROUND as u16 {
            assert!(
                irqs > 0,
                "round {round}: the interrupt fired after the reconnect"
            );
        }
        check_round(ring, &rig.ram, &writes, from);
        all = writes;
    }
    eprintln!("{in_flight_at_kill} request(s) were in flight at a SIGKILL and resubmitted");
    assert!(rig.handle.info().inflight.is_some(), "inflight area kept");
    for w in &all {
        let on_disk = daemon
            .scratch()
            .read_image(w.sector * 512, REQ_BYTES)
            .unwrap();
        assert!(on_disk == w.data, "write at sector {} missing", w.sector);
    }
    assert_eq!(rig.handle.reconnects(), 5);
}

/// Runs `bulkhead-vmm ctl --api-socket API ARGS` and returns its JSON reply.
fn ctl(api: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("bulkhead-vmm"))
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run bulkhead-vmm ctl");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "ctl {args:?}: {e}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `bulkhead-vmm ctl ARGS`'s output as text (`metrics`).
fn ctl_text(api: &Path, args: &[&str]) -> String {
    let out = Command::new(bin("bulkhead-vmm"))
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run bulkhead-vmm ctl");
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start_api(rig: &Rig, dir: &Path) -> PathBuf {
    let api = dir.join("api.sock");
    bulkhead_vmm::api::start(
        &api,
        ExitRequest::new().unwrap(),
        SeccompMode::Off,
        vec![rig.handle.clone()],
    )
    .unwrap();
    api
}

/// Swaps blk0 to `target` while a round of writes is in flight; checks the
/// round and a following one complete exactly once through the new backend.
fn swap_blk_under_load(
    target_socket: &Path,
    old: &mut Daemon,
    rig: &Rig,
    api: &Path,
    image: &Path,
) {
    let mut rings = rig.start(0, &[0]);
    let ring = &mut rings[0];
    let kick = rig.kick(0);
    let irq = rig.irq(0);
    let list = ctl(api, &["list"]);
    assert_eq!(list["devices"][0]["id"], "blk0", "{list}");
    assert_eq!(list["devices"][0]["state"], "connected", "{list}");
    assert_eq!(list["devices"][0]["active"], true, "{list}");

    let writes: Vec<Write> = (0..PER_ROUND)
        .map(|i| {
            submit_write(
                ring,
                &rig.ram,
                i,
                (i * REQ_BYTES / 512) as u64,
                data_for(1, i),
            )
        })
        .collect();
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_micros(500));
    let reply = ctl(
        api,
        &[
            "swap",
            "blk0",
            "--socket",
            &target_socket.display().to_string(),
        ],
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let base = reply["bases"][0][1]
        .as_u64()
        .expect("GET_VRING_BASE of queue 0");
    eprintln!("old backend stopped queue 0 at avail index {base}");
    assert!(base <= PER_ROUND as u64);
    // The old backend is done with the device: killing it changes nothing.
    old.kill().unwrap();
    wait_used(ring, &irq, PER_ROUND as u16);
    check_round(ring, &rig.ram, &writes, 0);
    // A second round runs entirely on the new backend.
    let writes2: Vec<Write> = (0..PER_ROUND)
        .map(|i| {
            submit_write(
                ring,
                &rig.ram,
                i,
                ((PER_ROUND + i) * REQ_BYTES / 512) as u64,
                data_for(2, i),
            )
        })
        .collect();
    kick.write(1).unwrap();
    assert!(wait_used(ring, &irq, 2 * PER_ROUND as u16) > 0);
    check_round(ring, &rig.ram, &writes2, PER_ROUND as u16);
    let list = ctl(api, &["list"]);
    assert_eq!(
        list["devices"][0]["socket"],
        target_socket.display().to_string(),
        "{list}"
    );
    assert_eq!(list["devices"][0]["swaps"], 1, "{list}");
    // `ctl metrics` prints the same numbers as Prometheus text.
    let id = list["devices"][0]["id"].as_str().unwrap_or_default();
    let text = ctl_text(api, &["metrics"]);
    let exp = bulkhead_tests::stats::check_exposition(&text, "bulkhead_vmm_")
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let labels = [("id", id), ("type", "blk")];
    let swaps = exp.value("bulkhead_vmm_swaps_total", &labels);
    assert_eq!(swaps, Some(1.0), "{text}");
    let connected = [labels[0], labels[1], ("state", "connected")];
    let state = exp.value("bulkhead_vmm_link_state", &connected);
    assert_eq!(state, Some(1.0), "{text}");
    for w in writes.iter().chain(&writes2) {
        let mut on_disk = vec![0u8; REQ_BYTES];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(image)
            .unwrap()
            .read_exact_at(&mut on_disk, w.sector * 512)
            .unwrap();
        assert!(on_disk == w.data, "write at sector {} missing", w.sector);
    }
}

#[test]
fn blk_swap_to_a_second_bulkhead_blk_through_ctl_keeps_io_running() {
    let mut old = start_blk(Scratch::new(BLK_IMAGE).unwrap());
    let image = old.scratch().image().to_path_buf();
    let new = second_blk(&image);
    let rig = Rig::new("blk0", old.socket(), VIRTIO_ID_BLOCK, 60);
    let api = start_api(&rig, old.scratch().dir());
    swap_blk_under_load(new.socket(), &mut old, &rig, &api, &image);
    // The image lock moved with the device: a reader (which refuses
    // writers) cannot start beside the new backend.
    let reader = Scratch::new(4096).unwrap();
    let out = Command::new(bin("bulkhead-blk"))
        .arg("--socket-path")
        .arg(reader.socket())
        .arg("--image")
        .arg(&image)
        .arg("--readonly")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is locked"),
        "a reader started beside the swapped-to backend: {err}"
    );
    // The swapped-to backend survives a crash too: reconnect goes to its socket.
    assert_eq!(rig.handle.info().socket, new.socket());
}

#[test]
fn blk_swap_to_qemu_storage_daemon_keeps_io_running() {
    if skip_if(
        "blk_swap_to_qemu_storage_daemon_keeps_io_running",
        skip::needs_program("qemu-storage-daemon"),
    ) {
        return;
    }
    let mut old = start_blk(Scratch::new(BLK_IMAGE).unwrap());
    let image = old.scratch().image().to_path_buf();
    let qsd_scratch = Scratch::new(4096).unwrap();
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            // qemu-storage-daemon takes the writer lock as it starts
            // (bulkhead-blk takes it only while its device runs), so one of
            // the two would be refused without this.
            "driver=file,node-name=file0,filename={},cache.direct=on,locking=off",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=raw,node-name=disk0,file=file0")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            qsd_scratch.socket().display()
        ));
    let qsd = Daemon::start("qemu-storage-daemon", cmd, qsd_scratch).expect("start qsd");
    let rig = Rig::new("blk0", old.socket(), VIRTIO_ID_BLOCK, 60);
    let api = start_api(&rig, old.scratch().dir());
    swap_blk_under_load(qsd.socket(), &mut old, &rig, &api, &image);
}

// -------------------------------------------------------------- console

fn start_console(scratch: Scratch) -> Daemon {
    let mut cmd = Command::new(bin("bulkhead-console"));
    cmd.arg("--socket-path").arg(scratch.socket());
    Daemon::start("bulkhead-console", cmd, scratch)
        .expect("start bulkhead-console (cargo build -p bulkhead-console)")
}

/// Connects to the console's host socket (`SOCKET.console`).
fn console_client(vhost_socket: &Path) -> UnixStream {
    let path = PathBuf::from(format!("{}.console", vhost_socket.display()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = UnixStream::connect(&path) {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no console socket {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads from `s` until `want` has been seen (or times out); returns all bytes read.
fn read_until(s: &mut UnixStream, want: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !got.windows(want.len()).any(|w| w == want) {
        assert!(
            Instant::now() < deadline,
            "console output {:?} never arrived; got {:?}",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(&got)
        );
        let mut b = [0u8; 4096];
        match s.read(&mut b) {
            Ok(0) => std::thread::sleep(Duration::from_millis(20)),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(_) => {}
        }
    }
    got
}

/// Writes `text` on the console's transmit queue (queue 1) and waits for its completion.
fn console_write(rig: &Rig, tx: &mut Ring, irq: &EventFd, slot: u64, text: &[u8]) {
    let at = 0x40_0000 + slot * 0x1000;
    rig.ram.write(at, text).unwrap();
    tx.submit(&[(at, text.len() as u32, false)]);
    let target = tx.avail_idx;
    rig.kick(1).write(1).unwrap();
    wait_used(tx, irq, target);
}

#[test]
fn console_sigkill_reconnects_and_output_after_the_restart_arrives() {
    let daemon = start_console(Scratch::new(4096).unwrap());
    let rig = Rig::new("console0", daemon.socket(), VIRTIO_ID_CONSOLE, 12);
    let mut rings = rig.start(0, &[0, 1]);
    let irq = rig.irq(1);
    let mut client = console_client(daemon.socket());
    console_write(&rig, &mut rings[1], &irq, 0, b"before-the-crash\n");
    read_until(&mut client, b"before-the-crash\n");

    let scratch = daemon.kill_keep_scratch().unwrap();
    let before = rig.handle.reconnects();
    // Written while the backend is dead: the kick waits in the eventfd.
    let at = 0x40_0000 + 0x1000;
    rig.ram.write(at, b"while-it-was-down\n").unwrap();
    rings[1].submit(&[(at, 18, false)]);
    rig.kick(1).write(1).unwrap();
    let daemon = start_console(scratch);
    rig.wait_reconnected(before);
    let mut client = console_client(daemon.socket());
    wait_used(&rings[1], &irq, rings[1].avail_idx);
    console_write(&rig, &mut rings[1], &irq, 2, b"after-the-restart\n");
    let got = read_until(&mut client, b"after-the-restart\n");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("while-it-was-down"), "{text}");
    let used = used_between(&rings[1], 0, rings[1].used_idx());
    assert_eq!(used.len(), 3, "each transmit completed once: {used:?}");
}

#[test]
fn console_swap_output_before_and_after_arrives_on_each_backend() {
    let old = start_console(Scratch::new(4096).unwrap());
    let new = start_console(Scratch::new(4096).unwrap());
    let rig = Rig::new("console0", old.socket(), VIRTIO_ID_CONSOLE, 12);
    let api = start_api(&rig, old.scratch().dir());
    let mut rings = rig.start(0, &[0, 1]);
    let irq = rig.irq(1);
    let mut old_client = console_client(old.socket());
    let mut new_client = console_client(new.socket());
    console_write(&rig, &mut rings[1], &irq, 0, b"before-the-swap\n");
    let reply = bulkhead_vmm::api::request(
        &api,
        &json!({"cmd": "swap", "device": "console0", "socket": new.socket()}),
    )
    .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["bases"], json!([[0, 0], [1, 1]]), "{reply}");
    console_write(&rig, &mut rings[1], &irq, 1, b"after-the-swap\n");
    read_until(&mut old_client, b"before-the-swap\n");
    read_until(&mut new_client, b"after-the-swap\n");
    drop(old);
    console_write(&rig, &mut rings[1], &irq, 2, b"old-one-gone\n");
    read_until(&mut new_client, b"old-one-gone\n");
}

// ------------------------------------------------------------------ net

const ETHERTYPE: u16 = 0x88b5;

fn start_net(ns: &NetNs, tap: &str) -> Daemon {
    let scratch = Scratch::new(4096).unwrap();
    let mut cmd = ns.command(bin("bulkhead-net"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .args(["--tap", tap]);
    Daemon::start("bulkhead-net", cmd, scratch)
        .expect("start bulkhead-net (cargo build -p bulkhead-net)")
}

/// Sends one frame carrying `marker` on the transmit queue (queue 1).
fn net_send(rig: &Rig, tx: &mut Ring, irq: &EventFd, slot: u64, marker: &[u8]) {
    let frame =
        bulkhead_tests::net::ethernet([0xff; 6], [0x52, 0x54, 0, 0, 0, 1], ETHERTYPE, marker);
    let mut buf = vec![0u8; 12]; // virtio_net_hdr_v1: no offloads
    buf.extend_from_slice(&frame);
    let at = 0x40_0000 + slot * 0x1000;
    rig.ram.write(at, &buf).unwrap();
    tx.submit(&[(at, buf.len() as u32, false)]);
    let target = tx.avail_idx;
    rig.kick(1).write(1).unwrap();
    wait_used(tx, irq, target);
}

fn wait_frame(sock: &netns::PacketSocket, marker: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "frame {:?} never reached the tap",
            String::from_utf8_lossy(marker)
        );
        if let Ok(Some(c)) = sock.recv(Duration::from_millis(200))
            && c.frame.len() >= 14
            && c.frame[12..14] == ETHERTYPE.to_be_bytes()
            && c.frame[14..].starts_with(marker)
        {
            return;
        }
    }
}

/// A fresh namespace, or None (and [`skip`]) where namespaces and taps are
/// unavailable.
fn net_setup(test: &str) -> Option<NetNs> {
    if skip_if(test, netns::unavailable()) {
        return None;
    }
    Some(NetNs::new().expect("create a network namespace"))
}

#[test]
fn net_sigkill_reconnects_and_frames_flow_again() {
    let Some(ns) = net_setup("net_sigkill_reconnects_and_frames_flow_again") else {
        return;
    };
    ns.add_tap("tap0", "10.91.0.1/24", false).expect("tap0");
    let sock = ns.packet_socket("tap0", false).unwrap();
    let daemon = start_net(&ns, "tap0");
    let rig = Rig::new("net0", daemon.socket(), VIRTIO_ID_NET, 12);
    let mut rings = rig.start(0, &[0, 1]);
    let irq = rig.irq(1);
    net_send(&rig, &mut rings[1], &irq, 0, b"frame-before");
    wait_frame(&sock, b"frame-before");

    let scratch = daemon.kill_keep_scratch().unwrap();
    let before = rig.handle.reconnects();
    let mut cmd = ns.command(bin("bulkhead-net"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .args(["--tap", "tap0"]);
    let _daemon = Daemon::start("bulkhead-net", cmd, scratch).expect("restart bulkhead-net");
    rig.wait_reconnected(before);
    net_send(&rig, &mut rings[1], &irq, 1, b"frame-after");
    wait_frame(&sock, b"frame-after");
}

#[test]
fn net_swap_to_a_second_bulkhead_net_moves_traffic_to_its_tap() {
    let Some(ns) = net_setup("net_swap_to_a_second_bulkhead_net_moves_traffic_to_its_tap") else {
        return;
    };
    ns.add_tap("tap0", "10.92.0.1/24", false).expect("tap0");
    ns.add_tap("tap1", "10.93.0.1/24", false).expect("tap1");
    let sock0 = ns.packet_socket("tap0", false).unwrap();
    let sock1 = ns.packet_socket("tap1", false).unwrap();
    let old = start_net(&ns, "tap0");
    let new = start_net(&ns, "tap1");
    let rig = Rig::new("net0", old.socket(), VIRTIO_ID_NET, 12);
    let mut rings = rig.start(0, &[0, 1]);
    let irq = rig.irq(1);
    net_send(&rig, &mut rings[1], &irq, 0, b"via-old");
    wait_frame(&sock0, b"via-old");
    let bases = rig.handle.swap(new.socket()).expect("swap");
    assert_eq!(bases, vec![(0, 0), (1, 1)]);
    drop(old);
    net_send(&rig, &mut rings[1], &irq, 1, b"via-new");
    wait_frame(&sock1, b"via-new");
}
