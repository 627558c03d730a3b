//! Target `console`: bulkhead-console below the socket — a real
//! `ConsoleDevice` with one or two socket ports (a connected client and a
//! resize-control client on each, as `--port socket=PATH` serves them), its
//! port and control queue workers driving `VirtQueue`s over fuzzer-chosen
//! guest memory and rings, with control messages (DEVICE_READY, PORT_READY,
//! PORT_OPEN, ...), host input, host resize commands, emergency writes and
//! guest ring writes between kicks.
//!
//! Input: layout, port count u8 (1 or 2), negotiated feature bits u8 (SIZE,
//! MULTIPORT, EMERG_WRITE), one [`RingSetup`] per queue (port 0 rx/tx,
//! control rx/tx, port 1 rx/tx), op count u8, ops, then memory contents.
//!
//! Invariants: no panic; every guest byte the device changes lies in a used
//! ring or in a buffer some descriptor marked device-writable; the host
//! client receives no more bytes than the guest sent.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use bulkhead_common::memory::GuestMemoryHandle;
use bulkhead_common::spec::console::{
    VIRTIO_CONSOLE_CONFIG_EMERG_WR_OFFSET as EMERG_WR_OFFSET, VIRTIO_CONSOLE_DEVICE_READY,
    VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE,
    VIRTIO_CONSOLE_PORT_OPEN, VIRTIO_CONSOLE_PORT_READY,
};
use bulkhead_common::{QueueWorker, VhostUserDevice, VirtQueue, WorkerCtl};
use bulkhead_console::device::{ConsoleDevice, ConsoleWorker};
use bulkhead_console::port::{HostSpec, Port, ctl_path};
use vmm_sys_util::eventfd::EventFd;

use super::device::WriteWatch;
use super::guest::{F_NEXT, F_WRITE, Guest, Image, ONE_REGION};
use super::input::{Input, Seed};
use super::virtqueue::{GuestOp, InflightMode, RingSetup};

/// Scrollback of each port (small, so guest output overflows it).
const SCROLLBACK: usize = 2048;

/// A per-process directory for the port sockets.
fn socket_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("bulkhead-fuzz-console-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

/// A port's host side as the harness plays it.
struct HostClient {
    data: UnixStream,
    ctl: UnixStream,
    received: u64,
}

enum Op {
    Kick(u8),
    Fd(u8, u8),
    HostInput(u8, Vec<u8>),
    HostDrain(u8),
    HostCtl(u8, Vec<u8>),
    Emerg(u8, Vec<u8>),
    Guest(u8, GuestOp),
    Reset,
}

fn decode_op(inp: &mut Input<'_>) -> Op {
    match inp.u8() % 10 {
        0..=2 => Op::Kick(inp.u8()),
        3 => Op::Fd(inp.u8(), inp.u8()),
        4 => {
            let p = inp.u8();
            let n = usize::from(inp.u8());
            Op::HostInput(p, inp.bytes(n).to_vec())
        }
        5 => Op::HostDrain(inp.u8()),
        6 => {
            let p = inp.u8();
            let n = usize::from(inp.u8() % 64);
            Op::HostCtl(p, inp.bytes(n).to_vec())
        }
        7 => {
            let off = inp.u8();
            let n = usize::from(inp.u8() % 8);
            Op::Emerg(off, inp.bytes(n).to_vec())
        }
        8 => {
            let q = inp.u8();
            Op::Guest(q, GuestOp::decode(inp.u8(), inp))
        }
        _ => Op::Reset,
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let g = Guest::decode(&mut inp);
    let nports = 1 + u32::from(inp.u8() % 2);
    let fbits = inp.u8();
    let mut acked = 0u64;
    for (bit, f) in [
        (1, VIRTIO_CONSOLE_F_SIZE),
        (2, VIRTIO_CONSOLE_F_MULTIPORT),
        (4, VIRTIO_CONSOLE_F_EMERG_WRITE),
    ] {
        if fbits & bit != 0 {
            acked |= f;
        }
    }
    let nq = 2 + 2 * nports as usize;
    let raw: Vec<RingSetup> = (0..nq).map(|_| RingSetup::decode(&g, &mut inp)).collect();
    let nops = inp.u8() % 48;
    let ops: Vec<Op> = (0..nops).map(|_| decode_op(&mut inp)).collect();
    g.fill(inp.rest());

    let dir = socket_dir();
    let mut ports = Vec::new();
    for id in 0..nports {
        let path = dir.join(format!("port{id}"));
        let name = (id > 0).then(|| "org.bulkhead.fuzz".to_string());
        let (p, _) = Port::open(id, name, &HostSpec::Socket(path), SCROLLBACK).expect("port");
        ports.push(p);
    }
    let mut hosts: Vec<HostClient> = (0..nports)
        .map(|id| {
            let path = dir.join(format!("port{id}"));
            let data = UnixStream::connect(&path).expect("connect port");
            let ctl = UnixStream::connect(ctl_path(&path)).expect("connect ctl");
            data.set_nonblocking(true).expect("nonblocking");
            ctl.set_nonblocking(true).expect("nonblocking");
            HostClient {
                data,
                ctl,
                received: 0,
            }
        })
        .collect();
    let dev = ConsoleDevice::new(ports).expect("console device");
    dev.set_features(acked).expect("features");

    let handle = GuestMemoryHandle::new(g.mem.clone());
    let setups: Vec<RingSetup> = raw
        .into_iter()
        .map(|s| RingSetup {
            max_chain_bytes: dev.max_chain_bytes(),
            max_descriptors: dev.max_chain_descriptors(),
            inflight: InflightMode::None,
            garbage: Vec::new(),
            ..s
        })
        .collect();
    // A queue whose rings the transport would refuse is not started.
    let mut queues: Vec<Option<(VirtQueue, EventFd, ConsoleWorker)>> = setups
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (vq, call) = s.start(handle.clone(), None)?;
            let w = dev
                .create_worker(i as u16, s.size, s.features)
                .expect("worker");
            Some((vq, call, w))
        })
        .collect();
    let ctl = WorkerCtl::detached();
    let mut watch = WriteWatch::new(&g);

    for op in &ops {
        if !matches!(op, Op::Guest(..)) {
            watch.allow_current(&g, &setups);
        }
        match op {
            Op::Kick(q) | Op::Fd(q, _) => {
                let i = usize::from(*q) % nq;
                if let Some((vq, _, w)) = queues[i].as_mut() {
                    match op {
                        Op::Fd(_, idx) => w.on_fd(vq, usize::from(*idx % 2), &ctl),
                        _ => w.on_kick(vq, &ctl),
                    }
                }
            }
            Op::HostInput(p, bytes) => {
                let h = &mut hosts[usize::from(*p) % nports as usize];
                let _ = h.data.write(bytes);
            }
            Op::HostDrain(p) => {
                let h = &mut hosts[usize::from(*p) % nports as usize];
                let mut buf = [0u8; 4096];
                while let Ok(n) = h.data.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    h.received += n as u64;
                }
                let mut junk = [0u8; 1024];
                while matches!(h.ctl.read(&mut junk), Ok(n) if n > 0) {}
            }
            Op::HostCtl(p, bytes) => {
                let h = &mut hosts[usize::from(*p) % nports as usize];
                let _ = h.ctl.write(bytes);
            }
            Op::Emerg(off, bytes) => {
                let _ = dev.set_config(EMERG_WR_OFFSET.wrapping_add(u32::from(*off % 4)), bytes);
            }
            Op::Guest(q, gop) => {
                // Only on rings the queue accepted (GuestOp wants them in memory).
                let i = usize::from(*q) % nq;
                if queues[i].is_some() {
                    watch.guest(&g, gop, &setups[i]);
                }
            }
            Op::Reset => {
                for (vq, _, w) in queues.iter_mut().flatten() {
                    w.drain(vq);
                }
                dev.reset();
                dev.set_features(acked).expect("features");
            }
        }
    }
    watch.allow_current(&g, &setups);
    for (vq, _, w) in queues.iter_mut().flatten() {
        w.drain(vq);
    }
    watch.check(&g);
    // The host never receives more than the guest sent (tx queues and emergency writes).
    for (h, p) in hosts.iter().zip(dev.ports()) {
        let sent = p
            .stats
            .from_guest
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            h.received <= sent,
            "port {}: host received {} bytes, guest sent {sent}",
            p.id(),
            h.received
        );
    }
    drop(queues);
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seeds: Linux's MULTIPORT bring-up (DEVICE_READY, then PORT_READY and
/// PORT_OPEN for each port, with control receive buffers for PORT_ADD,
/// CONSOLE_PORT, PORT_NAME, PORT_OPEN and RESIZE), output on each port,
/// host input into posted receive buffers, a resize from the control socket
/// and an emergency write; and a single-port console without MULTIPORT.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Queue q's rings (size 16) at q * 0x400: desc +0, avail +0x100, used +0x200;
    // contents from 0x1800, receive buffers (no contents) from 0x8000.
    let ring = |q: u32| [q * 0x400, q * 0x400 + 0x100, q * 0x400 + 0x200];
    let ctrl = |id: u32, event: u16, value: u16| {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&id.to_le_bytes());
        b[4..6].copy_from_slice(&event.to_le_bytes());
        b[6..8].copy_from_slice(&value.to_le_bytes());
        b
    };
    let mut out = Vec::new();

    // MULTIPORT with two ports.
    let mut img = Image::new();
    // Control tx (queue 3): DEVICE_READY, PORT_READY 0/1, PORT_OPEN 0/1.
    let msgs = [
        ctrl(0xffff_ffff, VIRTIO_CONSOLE_DEVICE_READY, 1),
        ctrl(0, VIRTIO_CONSOLE_PORT_READY, 1),
        ctrl(1, VIRTIO_CONSOLE_PORT_READY, 1),
        ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 1),
        ctrl(1, VIRTIO_CONSOLE_PORT_OPEN, 1),
    ];
    for (i, m) in msgs.iter().enumerate() {
        let at = 0x1800 + 8 * i as u64;
        img.put(at, m).desc(0xc00, i as u16, at, 8, 0, 0);
    }
    img.avail(0xd00, &[0, 1, 2, 3, 4]);
    // Control rx (queue 2): eight 64-byte buffers.
    for i in 0..8u16 {
        img.desc(0x800, i, 0x9000 + 64 * u64::from(i), 64, F_WRITE, 0);
    }
    img.avail(0x900, &[0, 1, 2, 3, 4, 5, 6, 7]);
    // Port 0 tx (queue 1): "hello\r\n" in two descriptors; port 1 tx (queue 5).
    img.put(0x1840, b"hello")
        .put(0x1850, b"\r\n")
        .desc(0x400, 0, 0x1840, 5, F_NEXT, 1)
        .desc(0x400, 1, 0x1850, 2, 0, 0)
        .avail(0x500, &[0]);
    img.put(0x1860, b"port one output")
        .desc(0x1400, 0, 0x1860, 15, 0, 0)
        .avail(0x1500, &[0]);
    // Port 0 rx (queue 0) and port 1 rx (queue 4): two buffers each.
    for (q, base) in [(0u64, 0xb000u64), (0x1000, 0xb800)] {
        img.desc(q, 0, base, 256, F_WRITE, 0)
            .desc(q, 1, base + 0x100, 256, F_WRITE, 0)
            .avail(q + 0x100, &[0, 1]);
    }
    let mut s = Seed::new();
    Guest::encode(&mut s, ONE_REGION);
    s.u8(1).u8(7);
    for q in 0..6 {
        RingSetup::encode(&mut s, 4, 3, ring(q), false);
    }
    let mut ops = Seed::new();
    // Accept the clients (port rx kicks handle host events), then the control plane.
    ops.u8(0).u8(0).u8(0).u8(4);
    ops.u8(0).u8(3).u8(0).u8(2);
    ops.u8(0).u8(1).u8(0).u8(5);
    ops.u8(4).u8(0).u8(5).bytes(b"input");
    ops.u8(4).u8(1).u8(3).bytes(b"abc");
    ops.u8(6).u8(0).u8(12).bytes(b"resize 80 25");
    ops.u8(6).u8(0).u8(1).bytes(b"\n");
    ops.u8(3).u8(0).u8(1).u8(3).u8(4).u8(1);
    ops.u8(0).u8(2);
    ops.u8(7).u8(0).u8(1).bytes(b"!");
    ops.u8(5).u8(0).u8(5).u8(1);
    ops.u8(6).u8(1).u8(6).bytes(b"stats\n");
    ops.u8(5).u8(1);
    let ops = ops.finish();
    s.u8(18).bytes(&ops).bytes(&img.0);
    out.push(("multiport-bring-up", s.finish()));

    // A single-port console without MULTIPORT: open from the start.
    let mut img = Image::new();
    img.put(0x1800, b"login: ")
        .desc(0x400, 0, 0x1800, 7, 0, 0)
        .avail(0x500, &[0])
        .desc(0, 0, 0xb000, 128, F_WRITE, 0)
        .avail(0x100, &[0]);
    let mut s = Seed::new();
    Guest::encode(&mut s, ONE_REGION);
    s.u8(0).u8(1);
    for q in 0..4 {
        RingSetup::encode(&mut s, 4, 1, ring(q), false);
    }
    let mut ops = Seed::new();
    ops.u8(0).u8(1).u8(4).u8(0).u8(5).bytes(b"root\n");
    ops.u8(0).u8(0).u8(5).u8(0).u8(9);
    let ops = ops.finish();
    s.u8(5).bytes(&ops).bytes(&img.0);
    out.push(("single-port", s.finish()));
    out
}
