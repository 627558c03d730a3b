//! The net benchmark: frames guest → tap through `bulkhead-net` into a
//! network namespace, counted where the kernel receives them (the tap's
//! `rx_packets` inside the namespace).
//!
//! Targets, each measured over the same window (warm-up, then `secs`), run
//! by run interleaved:
//! - `bulkhead-net/kit`: the test kit as frontend, one thread keeping the
//!   whole tx ring (256) full of one-descriptor frames (vnet header and frame
//!   together), interrupts asked for at 3/4 of what is in flight (as Linux's
//!   `virtqueue_enable_cb_delayed`);
//! - `bulkhead-net/testpmd`: DPDK's virtio-user PMD in `txonly` mode as an
//!   independent frontend of a second `bulkhead-net` on the same tap;
//! - `dpdk-vhost/mem`: the same virtio-user client into DPDK's vhost PMD in
//!   `rxonly` mode, memory to memory (counted by that testpmd);
//! - `dpdk-vhost/tap`: the same client into DPDK's vhost PMD forwarding
//!   (`io`) to its tap PMD, a tap-based reference backend (its own tap in the
//!   same namespace);
//! - `raw-tap-writer`: the machine's limit, `write(2)` of the same frames
//!   (with a vnet header) into another queue of the same tap in a loop;
//! - `raw-tap-writev`: the same, as a two-segment `writev(2)` (header, then
//!   frame): what a backend costs the kernel when it hands the guest's frame
//!   over in place behind its own copy of the header.
//!
//! The tap has no address and IPv6 off, and frames go to a foreign MAC, so
//! the namespace's stack drops them at once and sends nothing back. Sizes:
//! 64-byte UDP frames, 1514-byte UDP frames, and TCP frames of 65000 bytes
//! with a GSO (TSO) header (kit and raw writer only: testpmd's txonly sends
//! no GSO frames). Optionally also receive: frames injected on the tap by a
//! packet socket, counted as the kit driver takes them from its rx ring.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use bulkhead_tests::frontend::{Device, Options};
use bulkhead_tests::net::{
    Endpoints, GSO_TCPV4, NEEDS_CSUM, NetDaemon, NetHdr, VIRTIO_NET_F_MRG_RXBUF, tcp_partial, udp,
};
use bulkhead_tests::netns::{NetNs, PacketSocket};
use bulkhead_tests::virtq::{Desc, VIRTQ_DESC_F_WRITE, VirtQueue};
use serde_json::{Value, json};

use super::client::Result;
use super::dpdk::{self, PmdSpec, TestPmd};
use super::profile;
use super::workload::median;

const TAP: &str = "bhbtap0";
const REF_TAP: &str = "bhbref0";
const RX_TAP: &str = "bhbrx0";
/// The tap DPDK's tap PMD makes for the receive reference.
const RX_REF_TAP: &str = "bhbrxref0";
/// vnet header with VERSION_1.
const HDR_LEN: usize = 12;
/// A packet socket's `PACKET_VNET_HDR`: `struct virtio_net_hdr`, no `num_buffers`.
const PACKET_VNET_HDR_LEN: usize = 10;
/// Ring size of every frontend.
const QUEUE_SIZE: u16 = 256;
/// Bytes of each kit buffer (room for the largest frame).
const BUF_LEN: u64 = 65536 + 4096;
/// A run fails when a frontend makes no progress for this long.
const STALL: Duration = Duration::from_secs(10);

const EP: Endpoints = Endpoints {
    src_mac: [0x02, 0, 0, 0, 0, 0x20],
    dst_mac: [0x02, 0, 0, 0, 0, 0x10],
    src_ip: [198, 18, 0, 1],
    dst_ip: [198, 18, 0, 2],
};

/// Frame sizes measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// 64-byte UDP frames.
    Small,
    /// 1514-byte UDP frames (MTU 1500).
    Mtu,
    /// 65000-byte TCP frames with a TSO header (gso_size 1448).
    Tso,
}

impl Size {
    /// Every size, in report order.
    pub const ALL: [Size; 3] = [Size::Small, Size::Mtu, Size::Tso];

    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "64B",
            Size::Mtu => "1514B",
            Size::Tso => "tso-65000B",
        }
    }

    /// Parses [`Size::name`].
    pub fn parse(s: &str) -> Option<Size> {
        Size::ALL.into_iter().find(|x| x.name() == s)
    }

    /// Frame length without the vnet header.
    pub fn frame_len(self) -> usize {
        match self {
            Size::Small => 64,
            Size::Mtu => 1514,
            Size::Tso => 65000,
        }
    }

    /// The vnet header and the frame, as every sender here sends it.
    pub fn packet(self) -> Vec<u8> {
        let (hdr, frame) = match self {
            Size::Small | Size::Mtu => {
                let payload = vec![0x5a; self.frame_len() - 42];
                (NetHdr::default(), udp(&EP, 9, 9, &payload, false))
            }
            Size::Tso => {
                let payload = vec![0x5a; self.frame_len() - 54];
                let hdr = NetHdr {
                    flags: NEEDS_CSUM,
                    gso_type: GSO_TCPV4,
                    hdr_len: 54,
                    gso_size: 1448,
                    csum_start: 34,
                    csum_offset: 16,
                    num_buffers: 0,
                };
                (hdr, tcp_partial(&EP, 9, 9, 1, &payload))
            }
        };
        let mut p = hdr.to_bytes(HDR_LEN);
        p.extend_from_slice(&frame);
        p
    }
}

/// Which sender a target is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetKind {
    /// Test kit → bulkhead-net.
    Kit,
    /// testpmd virtio-user → bulkhead-net.
    Testpmd,
    /// testpmd virtio-user → testpmd vhost rxonly.
    DpdkMem,
    /// testpmd virtio-user → testpmd vhost → tap PMD.
    DpdkTap,
    /// write(2) into the tap.
    Raw,
    /// writev(2) of header and frame into the tap.
    RawWritev,
}

impl NetKind {
    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            NetKind::Kit => "bulkhead-net/kit",
            NetKind::Testpmd => "bulkhead-net/testpmd",
            NetKind::DpdkMem => "dpdk-vhost/mem",
            NetKind::DpdkTap => "dpdk-vhost/tap",
            NetKind::Raw => "raw-tap-writer",
            NetKind::RawWritev => "raw-tap-writev",
        }
    }

    fn sends(self, size: Size) -> bool {
        size != Size::Tso || matches!(self, NetKind::Kit | NetKind::Raw | NetKind::RawWritev)
    }
}

/// Settings of the net benchmark.
pub struct NetArgs {
    /// Runs per point.
    pub runs: usize,
    /// Measured seconds per run.
    pub secs: f64,
    /// Seconds of traffic before the window opens.
    pub warmup: f64,
    /// Sizes to measure.
    pub sizes: Vec<Size>,
    /// Include the DPDK targets.
    pub dpdk: bool,
    /// Also measure receive (tap → guest).
    pub rx: bool,
    /// perf-record the daemon for this many seconds at 64 B (0: no).
    pub profile: f64,
    /// Extra `bulkhead-net` arguments.
    pub daemon_args: Vec<String>,
    /// An earlier `bulkhead-net` build whose receive is measured too,
    /// alternating run by run with the current one.
    pub baseline: Option<std::path::PathBuf>,
}

/// The test kit's tx (and rx) rings over a connected `bulkhead-net`.
struct Kit {
    dev: Device,
    bufs: Vec<(u16, u64)>,
    rx_bufs: Vec<(u16, u64)>,
}

/// Receive buffer size (a 1514-byte frame and its header fit).
const RX_BUF: u32 = 2048;

impl Kit {
    fn connect(daemon: &NetDaemon) -> Result<Kit> {
        let opts = Options {
            mem_size: (u64::from(QUEUE_SIZE) * (BUF_LEN + u64::from(RX_BUF)) + (16 << 20))
                .next_multiple_of(1 << 20),
            ..Options::default()
        }
        .queues(2)
        .queue_size(QUEUE_SIZE);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dev = loop {
            match Device::connect(daemon.socket(), &opts) {
                Ok(d) => break d,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mem = dev.mem.clone();
        let mut bufs = Vec::new();
        let mut rx_bufs = Vec::new();
        for (q, out, len) in [
            (1, &mut bufs, BUF_LEN),
            (0, &mut rx_bufs, u64::from(RX_BUF)),
        ] {
            let vq = dev.queues.get_mut(q).ok_or("missing queue")?;
            for _ in 0..QUEUE_SIZE {
                let head = vq.reserve_desc().ok_or("queue too small")?;
                out.push((head, mem.alloc(len, 4096)?));
            }
        }
        let vq = dev.queues.first_mut().ok_or("no rx queue")?;
        for &(head, gpa) in &rx_bufs {
            vq.write_desc(
                head,
                Desc {
                    addr: gpa,
                    len: RX_BUF,
                    flags: VIRTQ_DESC_F_WRITE,
                    next: 0,
                },
            )?;
        }
        Ok(Kit { dev, bufs, rx_bufs })
    }

    /// Writes `packet` into every tx buffer and points each descriptor at it.
    fn set_packet(&mut self, packet: &[u8]) -> Result<()> {
        let mem = self.dev.mem.clone();
        let vq = self.dev.queues.get_mut(1).ok_or("no tx queue")?;
        for &(head, gpa) in &self.bufs {
            mem.write(gpa, packet)?;
            vq.write_desc(
                head,
                Desc {
                    addr: gpa,
                    len: packet.len() as u32,
                    flags: 0,
                    next: 0,
                },
            )?;
        }
        Ok(())
    }
}

/// Waits for used entries: asks for an interrupt once `want` more are used.
fn wait_used(vq: &mut VirtQueue, want: usize) -> Result<()> {
    if vq.event_idx() {
        vq.set_used_event(vq.last_used().wrapping_add(want.saturating_sub(1) as u16))?;
        fence(Ordering::SeqCst);
        if vq.used_idx()? != vq.last_used() {
            return Ok(());
        }
    }
    vq.wait_call(Duration::from_millis(100))?;
    Ok(())
}

/// Keeps every head of `heads` in flight on `vq` until `stop`, then waits for all; returns frames used.
fn kit_tx_loop(vq: &mut VirtQueue, heads: &[u16], stop: &AtomicBool) -> Result<u64> {
    let mut free: Vec<u16> = heads.to_vec();
    let mut outstanding = 0usize;
    let mut used = 0u64;
    let mut last_progress = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping && !free.is_empty() {
            for h in free.drain(..) {
                vq.publish(h)?;
                outstanding += 1;
            }
            vq.kick_if_needed()?;
        }
        let mut got = false;
        while let Some(e) = vq.pop_used()? {
            got = true;
            used += 1;
            outstanding -= 1;
            free.push(e.id as u16);
        }
        if stopping && outstanding == 0 {
            return Ok(used);
        }
        if got {
            last_progress = Instant::now();
            continue;
        }
        if last_progress.elapsed() > STALL {
            return Err(format!("tx: {outstanding} frames not used for {STALL:?}").into());
        }
        wait_used(vq, (outstanding * 3 / 4).max(1))?;
    }
}

/// Keeps the rx ring full of buffers until `stop`; returns the bytes the
/// device wrote (a frame of `n` bytes is `n` + the header, over one buffer
/// or, merged, several).
fn kit_rx_loop(
    vq: &mut VirtQueue,
    heads: &[u16],
    stop: &AtomicBool,
    seen: &AtomicU64,
) -> Result<u64> {
    for &h in heads {
        vq.publish(h)?;
    }
    vq.kick_if_needed()?;
    let mut got_total = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut got = false;
        while let Some(e) = vq.pop_used()? {
            got = true;
            got_total += u64::from(e.len);
            vq.publish(e.id as u16)?;
        }
        if got {
            seen.store(got_total, Ordering::Relaxed);
            vq.kick_if_needed()?;
            continue;
        }
        wait_used(vq, 1)?;
    }
    Ok(got_total)
}

/// A reading of a frame counter.
type Reading = (u64, Instant);

/// Counts between the two readings of a window: frames per second.
fn rate(a: Reading, b: Reading) -> f64 {
    let dt = b.1.saturating_duration_since(a.1).as_secs_f64().max(1e-9);
    b.0.saturating_sub(a.0) as f64 / dt
}

/// Waits out the warm-up, then reads `count` at both ends of the window.
fn window(a: &NetArgs, count: &mut dyn FnMut() -> Result<Reading>) -> Result<f64> {
    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    let r0 = count()?;
    std::thread::sleep(Duration::from_secs_f64(a.secs));
    let r1 = count()?;
    Ok(rate(r0, r1))
}

/// `rx_packets` of `dev` inside `ns`, read at the middle of the read.
fn tap_rx(ns: &NetNs, dev: &str) -> Result<Reading> {
    let t0 = Instant::now();
    let s = ns.run(
        "cat",
        &[&format!("/sys/class/net/{dev}/statistics/rx_packets")],
    )?;
    let t = t0 + (Instant::now() - t0) / 2;
    Ok((s.trim().parse()?, t))
}

/// A raw writer's queue of the tap.
struct RawTap {
    fd: OwnedFd,
}

impl RawTap {
    fn open(ns: &NetNs) -> Result<RawTap> {
        let fd = ns.open_tap_fds(TAP, 1, true)?.pop().ok_or("no tap fd")?;
        Ok(RawTap { fd })
    }

    /// Writes `packet` in a loop until `stop`, with `write(2)`, or with
    /// `writev(2)` of the header and the frame when `split`; returns the
    /// frames written.
    fn write_loop(&self, packet: &[u8], split: bool, stop: &AtomicBool) -> Result<u64> {
        let size: libc::c_int = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int (device-wide; the daemons set the same value).
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..64 {
                let fd = self.fd.as_raw_fd();
                let r = if split {
                    let (hdr, frame) = packet.split_at(HDR_LEN);
                    let iov = [
                        libc::iovec {
                            iov_base: hdr.as_ptr().cast_mut().cast(),
                            iov_len: hdr.len(),
                        },
                        libc::iovec {
                            iov_base: frame.as_ptr().cast_mut().cast(),
                            iov_len: frame.len(),
                        },
                    ];
                    // SAFETY: both iovecs point into `packet`, readable for their lengths.
                    unsafe { libc::writev(fd, iov.as_ptr(), 2) }
                } else {
                    // SAFETY: writing from a buffer we own, of its length.
                    unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) }
                };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e.into());
                    }
                } else {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// One per-run measurement of a target at a size: frames per second.
fn measure(env: &mut Env, a: &NetArgs, kind: NetKind, size: Size) -> Result<f64> {
    let packet = size.packet();
    let stop = AtomicBool::new(false);
    match kind {
        NetKind::Kit => {
            env.kit.set_packet(&packet)?;
            let heads: Vec<u16> = env.kit.bufs.iter().map(|b| b.0).collect();
            let vq = env.kit.dev.queues.get_mut(1).ok_or("no tx queue")?;
            let ns = &env.ns;
            std::thread::scope(|s| {
                let h = s.spawn(|| kit_tx_loop(vq, &heads, &stop));
                let r = window(a, &mut || tap_rx(ns, TAP));
                stop.store(true, Ordering::Relaxed);
                let sent = h
                    .join()
                    .unwrap_or_else(|_| Err("tx thread panicked".into()));
                sent.and(r)
            })
        }
        NetKind::Raw | NetKind::RawWritev => {
            let raw = &env.raw;
            let ns = &env.ns;
            let split = kind == NetKind::RawWritev;
            std::thread::scope(|s| {
                let h = s.spawn(|| raw.write_loop(&packet, split, &stop));
                let r = window(a, &mut || tap_rx(ns, TAP));
                stop.store(true, Ordering::Relaxed);
                let sent = h.join().unwrap_or_else(|_| Err("writer panicked".into()));
                sent.and(r)
            })
        }
        NetKind::Testpmd | NetKind::DpdkMem | NetKind::DpdkTap => {
            let d = env.dpdk.as_mut().ok_or("no DPDK targets")?;
            let ns = &env.ns;
            // A reference backend busy-polls while it forwards: only during its own runs.
            let server = match kind {
                NetKind::DpdkMem => Some(&mut d.mem_ref),
                NetKind::DpdkTap => Some(&mut d.tap_ref),
                _ => None,
            };
            if let Some(s) = server {
                s.cmd("start")?;
            }
            let (client, mut count): (&mut TestPmd, Box<dyn FnMut() -> Result<Reading> + '_>) =
                match kind {
                    NetKind::Testpmd => (&mut d.to_bulkhead, Box::new(|| tap_rx(ns, TAP))),
                    NetKind::DpdkTap => (&mut d.to_tap_ref, Box::new(|| tap_rx(ns, REF_TAP))),
                    _ => {
                        let mem_ref = &mut d.mem_ref;
                        (
                            &mut d.to_mem_ref,
                            Box::new(move || mem_ref.port_counts(0).map(|(rx, _, t)| (rx, t))),
                        )
                    }
                };
            client.cmd(&format!("set txpkts {}", size.frame_len()))?;
            client.cmd("start")?;
            let r = window(a, &mut *count);
            client.cmd("stop")?;
            drop(count);
            let server = match kind {
                NetKind::DpdkMem => Some(&mut d.mem_ref),
                NetKind::DpdkTap => Some(&mut d.tap_ref),
                _ => None,
            };
            if let Some(s) = server {
                s.cmd("stop")?;
            }
            r
        }
    }
}

/// DPDK peers: three virtio-user clients and two reference backends.
struct Dpdk {
    to_bulkhead: TestPmd,
    mem_ref: TestPmd,
    to_mem_ref: TestPmd,
    tap_ref: TestPmd,
    to_tap_ref: TestPmd,
    _daemon: NetDaemon,
}

/// Everything the net benchmark runs on.
struct Env {
    kit: Kit,
    raw: RawTap,
    daemon: NetDaemon,
    dpdk: Option<Dpdk>,
    // Dropped last: daemons and testpmds go before the namespace.
    ns: NetNs,
}

fn virtio_user(path: &std::path::Path) -> String {
    format!(
        "net_virtio_user0,path={},queues=1,queue_size={QUEUE_SIZE}",
        path.display()
    )
}

fn start_dpdk(ns: &NetNs, daemon_args: &[&str]) -> Result<Dpdk> {
    let fds = ns.open_tap_fds(TAP, 1, true)?;
    let daemon = NetDaemon::start_with_fds(fds, daemon_args)?;
    let client = |name: &str, sock: &std::path::Path| -> Result<TestPmd> {
        let c = TestPmd::start(&PmdSpec {
            name,
            vdevs: vec![virtio_user(sock)],
            mode: "txonly",
            fwd_cpu: 1,
            netns: None,
        })?;
        Ok(c)
    };
    let to_bulkhead = client("c-bulkhead", daemon.socket())?;
    let dir = daemon.dir().to_path_buf();
    let mem_sock = dir.join("dpdk-mem.sock");
    let mem_ref = TestPmd::start(&PmdSpec {
        name: "vhost-mem",
        vdevs: vec![format!("net_vhost0,iface={},queues=1", mem_sock.display())],
        mode: "rxonly",
        fwd_cpu: 0,
        netns: None,
    })?;
    let to_mem_ref = client("c-mem", &mem_sock)?;
    let tap_sock = dir.join("dpdk-tap.sock");
    let tap_ref = TestPmd::start(&PmdSpec {
        name: "vhost-tap",
        vdevs: vec![
            format!("net_vhost0,iface={},queues=1", tap_sock.display()),
            format!("net_tap0,iface={REF_TAP}"),
        ],
        mode: "io",
        fwd_cpu: 0,
        netns: Some(ns),
    })?;
    let to_tap_ref = client("c-tap", &tap_sock)?;
    ns.run(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{REF_TAP}.disable_ipv6=1")],
    )?;
    ns.ip(&["link", "set", REF_TAP, "up"])?;
    Ok(Dpdk {
        to_bulkhead,
        mem_ref,
        to_mem_ref,
        tap_ref,
        to_tap_ref,
        _daemon: daemon,
    })
}

/// Runs the net benchmark; returns its JSON (or a `skipped` reason).
pub fn run(a: &NetArgs) -> Result<Value> {
    if let Some(why) = bulkhead_tests::netns::unavailable() {
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("SKIP net benchmark: {why}\n"),
        );
        return Ok(json!({"skipped": why.to_string()}));
    }
    let ns = NetNs::new()?;
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        TAP,
        "mode",
        "tap",
        "vnet_hdr",
        "multi_queue",
    ])?;
    ns.run(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{TAP}.disable_ipv6=1")],
    )?;
    ns.ip(&["link", "set", TAP, "up"])?;
    let args: Vec<&str> = a.daemon_args.iter().map(String::as_str).collect();
    let daemon = NetDaemon::start_with_fds(ns.open_tap_fds(TAP, 1, true)?, &args)?;
    let kit = Kit::connect(&daemon)?;
    let raw = RawTap::open(&ns)?;
    let mut skipped = Vec::new();
    let dpdk = if !a.dpdk {
        skipped.push("DPDK targets: not requested".to_string());
        None
    } else if let Some(why) = dpdk::unavailable() {
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("SKIP DPDK targets: {why}\n"),
        );
        skipped.push(format!("DPDK targets: {why}"));
        None
    } else {
        Some(start_dpdk(&ns, &args)?)
    };
    let mut configs = vec![json!({
        "target": "bulkhead-net",
        "config": format!("bulkhead-net --socket-path SOCK --tap-fd 10 {}", args.join(" ")),
    })];
    if let Some(d) = &dpdk {
        for (name, p) in [
            ("virtio-user client", &d.to_bulkhead),
            ("dpdk-vhost/mem", &d.mem_ref),
            ("dpdk-vhost/tap", &d.tap_ref),
        ] {
            configs.push(json!({"target": name, "config": p.config}));
        }
    }
    let mut env = Env {
        kit,
        raw,
        daemon,
        dpdk,
        ns,
    };
    let mut kinds = vec![NetKind::Kit];
    if env.dpdk.is_some() {
        kinds.extend([NetKind::Testpmd, NetKind::DpdkTap, NetKind::DpdkMem]);
    }
    kinds.extend([NetKind::Raw, NetKind::RawWritev]);
    let mut points = Vec::new();
    for &size in &a.sizes {
        let ks: Vec<NetKind> = kinds.iter().copied().filter(|k| k.sends(size)).collect();
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); ks.len()];
        let mut cpu: Vec<f64> = Vec::new();
        for r in 0..a.runs {
            for k in 0..ks.len() {
                let i = (k + r) % ks.len();
                let before = profile::cpu_ns(env.daemon.pid());
                let pps = measure(&mut env, a, ks[i], size)?;
                if ks[i] == NetKind::Kit && pps > 0.0 {
                    let used = profile::cpu_ns(env.daemon.pid()).saturating_sub(before);
                    let frames = pps * (a.secs + a.warmup);
                    cpu.push(used as f64 / frames.max(1.0));
                }
                runs[i].push(pps);
            }
        }
        let mut results = serde_json::Map::new();
        let mut line = format!("net {:<11}", size.name());
        for (i, k) in ks.iter().enumerate() {
            let pps = median(&runs[i]);
            let gbps = pps * size.frame_len() as f64 * 8.0 / 1e9;
            line += &format!("  {} {:>9.0}", k.name(), pps);
            let mut v = json!({
                "pps": pps.round(),
                "gbps": (gbps * 1000.0).round() / 1000.0,
                "runs_pps": runs[i].iter().map(|x| x.round()).collect::<Vec<_>>(),
            });
            if *k == NetKind::Kit && !cpu.is_empty() {
                v["daemon_cpu_ns_per_frame"] = json!(median(&cpu).round());
            }
            results.insert(k.name().into(), v);
        }
        eprintln!("{line}");
        points.push(json!({
            "size": size.name(),
            "frame_bytes": size.frame_len(),
            "results": results,
        }));
    }
    let stats = env.daemon.stats().ok();
    // Memory right after the transmit points: bulkhead-net, and DPDK's
    // vhost PMD forwarding to its tap PMD (the same job) when it ran.
    let mut memory = serde_json::Map::new();
    if let Some(m) = profile::mem_kib(env.daemon.pid()) {
        memory.insert("bulkhead-net".into(), m);
    }
    if let Some(m) = env
        .dpdk
        .as_ref()
        .and_then(|d| profile::mem_kib(d.tap_ref.pid()))
    {
        memory.insert("dpdk-vhost/tap".into(), m);
    }
    // Receive at 64 B (the injector's rate bounds it) and at 1514 B.
    let mut rx_sizes = Vec::new();
    let mut rx_before = Vec::new();
    if a.rx {
        for size in Size::ALL {
            if a.sizes.contains(&size) || size == Size::Small {
                match &a.baseline {
                    None if size == Size::Tso => {
                        rx_sizes.push(measure_rx(&env.ns, a, &args, size, None)?);
                    }
                    None => rx_sizes.push(rx_against_raw(&env.ns, a, &args, size)?),
                    Some(old) => {
                        let (now, before) = rx_before_after(&env.ns, a, &args, size, old)?;
                        rx_sizes.push(now);
                        rx_before.push(before);
                    }
                }
            }
        }
    }
    let mut rx_dpdk = Vec::new();
    if a.rx && env.dpdk.is_some() {
        for size in [Size::Small, Size::Mtu] {
            if a.sizes.contains(&size) {
                rx_dpdk.push(dpdk_rx(&env.ns, a, &args, size)?);
            }
        }
    }
    let rx = rx_sizes.first().cloned();
    let prof = if a.profile > 0.0 && profile::perf_available() {
        Some(profile_daemon(&mut env, a)?)
    } else {
        None
    };
    Ok(json!({
        "method": {
            "runs": a.runs, "secs": a.secs, "warmup_secs": a.warmup,
            "queue_size": QUEUE_SIZE,
            "count": "frames counted at the receiving tap (rx_packets inside the namespace) \
                      over the window; dpdk-vhost/mem: testpmd's RX-packets",
        },
        "configs": configs,
        "skipped": skipped,
        "points": points,
        "daemon_stats": stats,
        "memory": memory,
        "rx": rx,
        "rx_sizes": rx_sizes,
        "rx_dpdk": rx_dpdk,
        "rx_before": rx_before,
        "profile": prof,
    }))
}

/// Receive: a packet socket floods a tap of its own (single queue, its own
/// daemon) with frames of `size`; the kit counts what reaches its rx ring,
/// and the daemon's CPU time is divided by the frames it delivered. TSO
/// frames go in with a virtio_net_hdr (PACKET_VNET_HDR) asking for TCPv4
/// segmentation: the tap, whose offloads the daemon turned on for the
/// kit's GUEST_TSO4, queues each as one 65000-byte frame, which the daemon
/// spreads over the kit's 2 KiB buffers (MRG_RXBUF).
fn measure_rx(
    ns: &NetNs,
    a: &NetArgs,
    daemon_args: &[&str],
    size: Size,
    bin: Option<&std::path::Path>,
) -> Result<Value> {
    add_rx_tap(ns)?;
    let fds = ns.open_tap_fds(RX_TAP, 1, false)?;
    let mut daemon = match bin {
        Some(b) => NetDaemon::start_bin_with_fds(b, fds, daemon_args)?,
        None => NetDaemon::start_with_fds(fds, daemon_args)?,
    };
    let mut kit = Kit::connect(&daemon)?;
    let gso = size == Size::Tso;
    if gso && !kit.dev.has_feature(VIRTIO_NET_F_MRG_RXBUF) {
        return Err("receive of TSO frames needs MRG_RXBUF, which the kit did not get".into());
    }
    let sock: PacketSocket = ns.packet_socket(RX_TAP, gso)?;
    // A packet socket's vnet header is the 10-byte virtio_net_hdr.
    let frame = if gso {
        let p = size.packet();
        let mut v = p[..PACKET_VNET_HDR_LEN].to_vec();
        v.extend_from_slice(&p[HDR_LEN..]);
        v
    } else {
        size.packet()[HDR_LEN..].to_vec()
    };
    let per_frame = (size.frame_len() + HDR_LEN) as u64;
    let heads: Vec<u16> = kit.rx_bufs.iter().map(|b| b.0).collect();
    let cpu_before = profile::cpu_ns(daemon.pid());
    let vq = kit.dev.queues.first_mut().ok_or("no rx queue")?;
    let stop = AtomicBool::new(false);
    let seen = AtomicU64::new(0);
    let mut runs = Vec::new();
    let injected = std::thread::scope(|s| -> Result<u64> {
        let rx = s.spawn(|| kit_rx_loop(vq, &heads, &stop, &seen));
        let inj = s.spawn(|| -> u64 {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sent = if gso {
                    sock.send_raw(&frame)
                } else {
                    sock.send(&frame)
                };
                if sent.is_ok() {
                    n += 1;
                }
            }
            n
        });
        let mut err = None;
        for _ in 0..a.runs {
            match window(a, &mut || {
                Ok((seen.load(Ordering::Relaxed) / per_frame, Instant::now()))
            }) {
                Ok(x) => runs.push(x),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let injected = inj.join().map_err(|_| "injector panicked")?;
        rx.join().map_err(|_| "rx thread panicked")??;
        match err {
            Some(e) => Err(e),
            None => Ok(injected),
        }
    })?;
    let cpu = profile::cpu_ns(daemon.pid()).saturating_sub(cpu_before);
    let delivered = seen.load(Ordering::Relaxed) / per_frame;
    let cpu_per_frame = (cpu as f64 / delivered.max(1) as f64).round();
    let stats = daemon.stats().ok();
    drop(kit);
    drop(daemon);
    // The next size gets a fresh tap.
    let _ = ns.ip(&["link", "del", RX_TAP]);
    let pps = median(&runs);
    eprintln!(
        "net rx {:<5} bulkhead-net/kit {pps:>9.0} ({cpu_per_frame:.0} ns daemon CPU per frame)",
        size.name()
    );
    Ok(json!({
        "size": size.name(),
        "pps": pps.round(),
        "runs_pps": runs.iter().map(|x| x.round()).collect::<Vec<_>>(),
        "injected": injected,
        "daemon_cpu_ns_per_frame": cpu_per_frame,
        "daemon_stats": stats,
        "how": format!("an AF_PACKET socket on a tap of its own sends {}-byte frames in a loop \
                (the tap's queue drops what the daemon does not take){}; frames counted as \
                the kit takes them from its rx ring (256 buffers of 2 KiB, reposted at once; \
                bytes written / (frame + 12-byte header)); \
                daemon CPU divided by the frames delivered over the whole point", size.frame_len(),
                if gso { " with a TCPv4 GSO virtio_net_hdr (gso_size 1448), merged over the kit's buffers" } else { "" }),
    }))
}

/// Makes the receive benchmarks' tap, [`RX_TAP`].
fn add_rx_tap(ns: &NetNs) -> Result<()> {
    add_tap(ns, RX_TAP)
}

/// Makes tap `name` in `ns` (single queue, no IPv6 chatter), up.
fn add_tap(ns: &NetNs, name: &str) -> Result<()> {
    ns.ip(&["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"])?;
    ns.run(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{name}.disable_ipv6=1")],
    )?;
    ns.ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// Receive through a DPDK frontend, against DPDK as the backend: a packet
/// socket floods a tap with `size` frames; `bulkhead-net` on that tap, or
/// testpmd's tap PMD forwarding (`io`) to its vhost PMD, delivers them to
/// a virtio-user testpmd in `rxonly`, whose RX-packets are counted. The
/// two setups run one after the other, `a.runs` windows each.
fn dpdk_rx(ns: &NetNs, a: &NetArgs, daemon_args: &[&str], size: Size) -> Result<Value> {
    let frame = size.packet()[HDR_LEN..].to_vec();
    let flood = |iface: &str, client: &mut TestPmd| -> Result<f64> {
        let mut runs = Vec::new();
        for _ in 0..a.runs {
            runs.push(flood_window(ns, a, iface, &frame, client)?);
        }
        Ok(median(&runs))
    };
    let client = |name: &str, sock: &std::path::Path| {
        TestPmd::start(&PmdSpec {
            name,
            vdevs: vec![virtio_user(sock)],
            mode: "rxonly",
            fwd_cpu: 1,
            netns: None,
        })
    };
    // bulkhead-net.
    add_rx_tap(ns)?;
    let ours = {
        let daemon = NetDaemon::start_with_fds(ns.open_tap_fds(RX_TAP, 1, false)?, daemon_args)?;
        let mut c = client("c-rx-bulkhead", daemon.socket())?;
        let pps = flood(RX_TAP, &mut c);
        drop(c);
        drop(daemon);
        pps
    };
    let _ = ns.ip(&["link", "del", RX_TAP]);
    let ours = ours?;
    // DPDK: tap PMD -> vhost PMD.
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-bench-rx")
        .tempdir()?;
    let vsock = dir.path().join("dpdk-rx.sock");
    let mut server = TestPmd::start(&PmdSpec {
        name: "vhost-tap-rx",
        vdevs: vec![
            format!("net_vhost0,iface={},queues=1", vsock.display()),
            format!("net_tap0,iface={RX_REF_TAP}"),
        ],
        mode: "io",
        fwd_cpu: 0,
        netns: Some(ns),
    })?;
    let mut c = client("c-rx-dpdk", &vsock)?;
    ns.run(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{RX_REF_TAP}.disable_ipv6=1")],
    )?;
    ns.ip(&["link", "set", RX_REF_TAP, "up"])?;
    server.cmd("start")?;
    let theirs = flood(RX_REF_TAP, &mut c);
    let _ = server.cmd("stop");
    drop(c);
    drop(server);
    let theirs = theirs?;
    eprintln!(
        "net rx {:<5} bulkhead-net/testpmd {ours:>9.0}  dpdk-vhost/tap {theirs:>9.0}",
        size.name()
    );
    Ok(json!({
        "size": size.name(),
        "bulkhead_pps": ours.round(),
        "dpdk_pps": theirs.round(),
        "ratio": (ours / theirs.max(1.0) * 100.0).round() / 100.0,
    }))
}

/// The machine's limit for receive: the same injector into a tap of its
/// own, read by one thread with `read(2)` (vnet header included, as the
/// daemon reads) instead of a daemon and a guest ring; frames per second.
fn measure_rx_raw(ns: &NetNs, a: &NetArgs, size: Size) -> Result<f64> {
    add_rx_tap(ns)?;
    let fd = ns
        .open_tap_fds(RX_TAP, 1, false)?
        .pop()
        .ok_or("no tap fd")?;
    let raw = fd.as_raw_fd();
    let hdr: libc::c_int = HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int; F_SETFL on our own fd.
    unsafe {
        if libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &hdr) < 0
            || libc::fcntl(raw, libc::F_SETFL, libc::O_NONBLOCK) < 0
        {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    let sock: PacketSocket = ns.packet_socket(RX_TAP, false)?;
    let frame = size.packet()[HDR_LEN..].to_vec();
    let stop = AtomicBool::new(false);
    let seen = AtomicU64::new(0);
    let mut runs = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let reader = s.spawn(|| {
            let mut buf = vec![0u8; 65550 + HDR_LEN];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: reading into a buffer we own, of its length.
                let r = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
                if r > 0 {
                    seen.fetch_add(1, Ordering::Relaxed);
                } else {
                    let mut p = libc::pollfd {
                        fd: raw,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one pollfd of ours.
                    unsafe { libc::poll(&mut p, 1, 50) };
                }
            }
        });
        let inj = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let _ = sock.send(&frame);
            }
        });
        let mut err = None;
        for _ in 0..a.runs {
            match window(a, &mut || {
                Ok((seen.load(Ordering::Relaxed), Instant::now()))
            }) {
                Ok(x) => runs.push(x),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = inj.join();
        let _ = reader.join();
        err.map_or(Ok(()), Err)
    })?;
    drop(fd);
    let _ = ns.ip(&["link", "del", RX_TAP]);
    let pps = median(&runs);
    eprintln!("net rx {:<5} raw-tap-reader   {pps:>9.0}", size.name());
    Ok(pps)
}

/// `a` with one run per point, for measurements taken in turn.
fn one_run(a: &NetArgs) -> NetArgs {
    NetArgs {
        runs: 1,
        sizes: a.sizes.clone(),
        daemon_args: a.daemon_args.clone(),
        baseline: None,
        ..*a
    }
}

/// `runs` rounds of `first` and `second`, the order alternating round by
/// round: whichever goes second finds the machine (caches, the injector's
/// socket, the host) as the first left it.
fn in_turn<A, B>(
    runs: usize,
    mut first: impl FnMut() -> Result<A>,
    mut second: impl FnMut() -> Result<B>,
) -> Result<(Vec<A>, Vec<B>)> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 0..runs {
        if i % 2 == 0 {
            x.push(first()?);
            y.push(second()?);
        } else {
            y.push(second()?);
            x.push(first()?);
        }
    }
    Ok((x, y))
}

/// Receive through `bulkhead-net` and with a raw `read(2)` tap reader, one
/// run each in turn, the order alternating, `a.runs` rounds (a machine's
/// slower moments fall on both); the daemon's point with the medians of its
/// rounds and the reader's (`raw_reader_pps`, `runs_raw_reader_pps`).
fn rx_against_raw(ns: &NetNs, a: &NetArgs, daemon_args: &[&str], size: Size) -> Result<Value> {
    let one = one_run(a);
    let (ours, raw) = in_turn(
        a.runs,
        || measure_rx(ns, &one, daemon_args, size, None),
        || measure_rx_raw(ns, &one, size),
    )?;
    let col = |k: &str| -> Vec<f64> { ours.iter().filter_map(|x| x[k].as_f64()).collect() };
    let (pps, cpu) = (median(&col("pps")), median(&col("daemon_cpu_ns_per_frame")));
    let raw_pps = median(&raw);
    let mut v = ours.first().cloned().ok_or("no receive run")?;
    v["pps"] = json!(pps.round());
    v["runs_pps"] = json!(col("pps"));
    v["daemon_cpu_ns_per_frame"] = json!(cpu.round());
    v["injected"] = json!(
        ours.iter()
            .filter_map(|x| x["injected"].as_u64())
            .sum::<u64>()
    );
    v["daemon_stats"] = ours
        .last()
        .map_or(Value::Null, |x| x["daemon_stats"].clone());
    v["raw_reader_pps"] = json!(raw_pps.round());
    v["runs_raw_reader_pps"] = json!(raw.iter().map(|x| x.round()).collect::<Vec<_>>());
    v["raw_ratio"] = json!((pps / raw_pps.max(1.0) * 100.0).round() / 100.0);
    v["interleaved"] = json!(true);
    eprintln!(
        "net rx {:<5} bulkhead-net/kit {pps:>9.0}, raw-tap-reader {raw_pps:>9.0} (medians of {} interleaved runs)",
        size.name(),
        a.runs
    );
    Ok(v)
}

/// Receive with the current build and with `old`, one run each in turn (the
/// order alternating), `a.runs` rounds (so both see the same machine load);
/// returns the current build's point and the earlier build's, each with the
/// medians of its rounds.
fn rx_before_after(
    ns: &NetNs,
    a: &NetArgs,
    daemon_args: &[&str],
    size: Size,
    old: &std::path::Path,
) -> Result<(Value, Value)> {
    let one = one_run(a);
    let (now, before) = in_turn(
        a.runs,
        || measure_rx(ns, &one, daemon_args, size, None),
        || measure_rx(ns, &one, daemon_args, size, Some(old)),
    )?;
    let sum = |v: &[Value], label: &str| -> Value {
        let col = |k: &str| -> Vec<f64> { v.iter().filter_map(|x| x[k].as_f64()).collect() };
        let (pps, cpu) = (col("pps"), col("daemon_cpu_ns_per_frame"));
        json!({
            "size": size.name(),
            "binary": label,
            "pps": median(&pps).round(),
            "runs_pps": pps,
            "daemon_cpu_ns_per_frame": median(&cpu).round(),
            "runs_daemon_cpu_ns_per_frame": cpu,
            "how": v.first().map(|x| x["how"].clone()).unwrap_or(Value::Null),
            "injected": v.iter().filter_map(|x| x["injected"].as_u64()).sum::<u64>(),
        })
    };
    let now_v = sum(&now, "current");
    let before_v = sum(&before, &old.display().to_string());
    eprintln!(
        "net rx {:<5} daemon CPU per frame: current {:.0} ns, before {:.0} ns",
        size.name(),
        now_v["daemon_cpu_ns_per_frame"].as_f64().unwrap_or(0.0),
        before_v["daemon_cpu_ns_per_frame"].as_f64().unwrap_or(0.0)
    );
    Ok((now_v, before_v))
}

/// perf-records the daemon while the kit sends 64-byte frames.
fn profile_daemon(env: &mut Env, a: &NetArgs) -> Result<Value> {
    let pid = env.daemon.pid();
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("perf-net.data");
    let rec = profile::Recording::start(pid, &data)?;
    let pa = NetArgs {
        baseline: None,
        runs: 1,
        secs: a.profile,
        warmup: 0.0,
        sizes: Vec::new(),
        dpdk: false,
        rx: false,
        profile: 0.0,
        daemon_args: Vec::new(),
    };
    let pps = measure(env, &pa, NetKind::Kit, Size::Small)?;
    let mut v = rec.finish(20)?;
    v["pps"] = json!(pps.round());
    eprintln!("profiled bulkhead-net");
    Ok(v)
}

/// The throttle suite's net half: `bulkhead-net` with each `--tx-pps`
/// limit, the test kit keeping its 256-entry transmit ring full of 64-byte
/// frames for `secs`; returns rows as `throttle::run` does: the rate the
/// tap received against the limit, and the daemon's CPU while it held the
/// guest back; then the same limits as `--rx-pps`, a packet socket
/// flooding the tap with 64-byte frames and the kit's receive ring taking
/// what the daemon delivers. `Err` with the reason when taps cannot be made
/// here. Limits below 1000 would leave the ring draining for over a quarter of a
/// second after the window; the kit needs no less.
pub fn throttled(pps: &[u64], secs: f64) -> Result<std::result::Result<Vec<Value>, String>> {
    if let Some(why) = bulkhead_tests::netns::unavailable() {
        return Ok(Err(why.to_string()));
    }
    let mut rows = Vec::new();
    for &n in pps {
        let ns = NetNs::new()?;
        ns.ip(&[
            "tuntap",
            "add",
            "dev",
            TAP,
            "mode",
            "tap",
            "vnet_hdr",
            "multi_queue",
        ])?;
        ns.run(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{TAP}.disable_ipv6=1")],
        )?;
        ns.ip(&["link", "set", TAP, "up"])?;
        let limit = n.to_string();
        let daemon =
            NetDaemon::start_with_fds(ns.open_tap_fds(TAP, 1, true)?, &["--tx-pps", &limit])?;
        let mut kit = Kit::connect(&daemon)?;
        kit.set_packet(&Size::Small.packet())?;
        let heads: Vec<u16> = kit.bufs.iter().map(|b| b.0).collect();
        let vq = kit.dev.queues.get_mut(1).ok_or("no tx queue")?;
        let stop = AtomicBool::new(false);
        let pid = daemon.pid();
        let (rate, cpu) = std::thread::scope(|s| -> Result<(f64, f64)> {
            let h = s.spawn(|| kit_tx_loop(vq, &heads, &stop));
            std::thread::sleep(Duration::from_millis(500));
            let r0 = tap_rx(&ns, TAP);
            let c0 = profile::cpu_ns(pid);
            std::thread::sleep(Duration::from_secs_f64(secs));
            let r1 = tap_rx(&ns, TAP);
            let c1 = profile::cpu_ns(pid);
            stop.store(true, Ordering::Relaxed);
            let sent = h
                .join()
                .unwrap_or_else(|_| Err("tx thread panicked".into()));
            let (r0, r1) = (r0?, r1?);
            sent?;
            let wall = r1.1.saturating_duration_since(r0.1).as_secs_f64().max(1e-9);
            Ok((rate(r0, r1), c1.saturating_sub(c0) as f64 / 1e9 / wall))
        })?;
        let row = json!({
            "limit": format!("bulkhead-net --tx-pps {n}"),
            "workload": format!("64 B frames guest → tap, {QUEUE_SIZE} in flight"),
            "measured": (rate * 10.0).round() / 10.0,
            "unit": "pps",
            "ratio": (rate / n as f64 * 1000.0).round() / 1000.0,
            "daemon_cpu_pct": (10000.0 * cpu).round() / 100.0,
        });
        eprintln!("throttle: {row}");
        rows.push(row);
        drop(kit);
        drop(daemon);
    }
    // Receive: a packet socket floods the tap well above the limit; the
    // daemon leaves what it may not take in the tap (which drops it).
    for &n in pps {
        let ns = NetNs::new()?;
        let one = NetArgs {
            runs: 1,
            secs,
            warmup: 0.5,
            sizes: vec![Size::Small],
            dpdk: false,
            rx: true,
            profile: 0.0,
            daemon_args: Vec::new(),
            baseline: None,
        };
        let limit = n.to_string();
        let point = measure_rx(&ns, &one, &["--rx-pps", &limit], Size::Small, None)?;
        let rate = point["pps"].as_f64().unwrap_or(0.0);
        let ns_per_frame = point["daemon_cpu_ns_per_frame"].as_f64().unwrap_or(0.0);
        let row = json!({
            "limit": format!("bulkhead-net --rx-pps {n}"),
            "workload": "64 B frames tap → guest, flooded by a packet socket",
            "measured": (rate * 10.0).round() / 10.0,
            "unit": "pps",
            "ratio": (rate / n as f64 * 1000.0).round() / 1000.0,
            // CPU per delivered frame times the rate: the daemon's share
            // of one CPU while it held the flood back.
            "daemon_cpu_pct": (ns_per_frame * rate / 1e7 * 100.0).round() / 100.0,
            "daemon_stats": point["daemon_stats"],
        });
        eprintln!("throttle: {row}");
        rows.push(row);
    }
    Ok(Ok(rows))
}

/// The taps of the packed suite's two `bulkhead-net` daemons (split, packed).
const LAYOUT_TAPS: [&str; 2] = ["bhbsplit0", "bhbpacked0"];

/// The packed suite's net half: split rings against packed rings, one
/// client. DPDK's virtio-user PMD (`packed_vq=0` and `packed_vq=1`) is the
/// frontend of two `bulkhead-net` daemons started alike, each on a
/// single-queue tap of its own. Transmit: testpmd `txonly`, frames counted
/// at the tap; receive: a packet socket floods the tap, testpmd `rxonly`
/// counts what reaches it. The two layouts alternate run by run (order
/// rotated); the daemon's CPU is divided by the frames it moved.
pub fn packed(a: &NetArgs) -> Result<Value> {
    let unavailable = if a.dpdk {
        bulkhead_tests::netns::unavailable().map(|w| w.to_string())
    } else {
        Some("DPDK targets: not requested".into())
    };
    if let Some(why) = unavailable.or_else(dpdk::unavailable) {
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("SKIP packed net rows: {why}\n"),
        );
        return Ok(json!({"skipped": why.to_string()}));
    }
    let ns = NetNs::new()?;
    let args: Vec<&str> = a.daemon_args.iter().map(String::as_str).collect();
    let mut daemons = Vec::new();
    let mut clients = Vec::new();
    let mut configs = Vec::new();
    for (i, tap) in LAYOUT_TAPS.iter().enumerate() {
        add_tap(&ns, tap)?;
        let daemon = NetDaemon::start_with_fds(ns.open_tap_fds(tap, 1, false)?, &args)?;
        let client = TestPmd::start(&PmdSpec {
            name: ["c-split", "c-packed"][i],
            vdevs: vec![format!("{},packed_vq={i}", virtio_user(daemon.socket()))],
            mode: "txonly",
            fwd_cpu: 1,
            netns: None,
        })?;
        configs.push(json!({"target": LAYOUTS[i], "client": client.config}));
        daemons.push(daemon);
        clients.push(client);
    }
    let mut points = Vec::new();
    for rx in [false, true] {
        for &size in a.sizes.iter().filter(|s| **s != Size::Tso) {
            let frame = size.packet()[HDR_LEN..].to_vec();
            let mut pps = [Vec::new(), Vec::new()];
            let mut cpu = [Vec::new(), Vec::new()];
            for c in &mut clients {
                c.cmd(&format!("set fwd {}", if rx { "rxonly" } else { "txonly" }))?;
                c.cmd(&format!("set txpkts {}", size.frame_len()))?;
            }
            for r in 0..a.runs {
                for k in 0..2 {
                    let i = (k + r) % 2;
                    let pid = daemons[i].pid();
                    let before = profile::cpu_ns(pid);
                    let c = &mut clients[i];
                    let tap = LAYOUT_TAPS[i];
                    let v = if rx {
                        flood_window(&ns, a, tap, &frame, c)?
                    } else {
                        c.cmd("start")?;
                        let v = window(a, &mut || tap_rx(&ns, tap));
                        c.cmd("stop")?;
                        v?
                    };
                    let used = profile::cpu_ns(pid).saturating_sub(before) as f64;
                    cpu[i].push(used / (v * (a.secs + a.warmup)).max(1.0));
                    pps[i].push(v);
                }
            }
            let (split, packed) = (median(&pps[0]), median(&pps[1]));
            let dir = if rx { "rx" } else { "tx" };
            eprintln!(
                "packed net {dir} {:<5} split {split:>9.0}  packed {packed:>9.0}",
                size.name()
            );
            let layout = |i: usize| {
                json!({
                    "pps": median(&pps[i]).round(),
                    "runs_pps": pps[i].iter().map(|x| x.round()).collect::<Vec<_>>(),
                    "daemon_cpu_ns_per_frame": median(&cpu[i]).round(),
                })
            };
            points.push(json!({
                "direction": dir,
                "size": size.name(),
                "split": layout(0),
                "packed": layout(1),
                "ratio": (packed / split.max(1.0) * 1000.0).round() / 1000.0,
            }));
        }
    }
    drop(clients);
    drop(daemons);
    let daemon = ["bulkhead-net --socket-path SOCK --tap-fd N"]
        .into_iter()
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    Ok(json!({
        "runs": a.runs, "secs": a.secs, "warmup_secs": a.warmup,
        "daemon": daemon,
        "configs": configs,
        "points": points,
    }))
}

/// Names of the two layouts, split first (JSON and tables).
const LAYOUTS: [&str; 2] = ["split", "packed"];

/// One receive window: a packet socket floods `tap` with `frame` while
/// `client` (in `rxonly`) counts what arrives; frames per second.
fn flood_window(
    ns: &NetNs,
    a: &NetArgs,
    tap: &str,
    frame: &[u8],
    client: &mut TestPmd,
) -> Result<f64> {
    let sock: PacketSocket = ns.packet_socket(tap, false)?;
    let stop = AtomicBool::new(false);
    client.cmd("start")?;
    let r = std::thread::scope(|s| {
        let inj = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let _ = sock.send(frame);
            }
        });
        let r = window(a, &mut || client.port_counts(0).map(|(rx, _, t)| (rx, t)));
        stop.store(true, Ordering::Relaxed);
        let _ = inj.join();
        r
    });
    client.cmd("stop")?;
    r
}
