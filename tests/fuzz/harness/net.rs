//! Target `net`: bulkhead-net below the socket — a real `NetDevice` whose tap
//! queues are `SOCK_SEQPACKET` socketpairs ([`Tap::stand_in`]: no root, no
//! /dev/net/tun), its receive, transmit and control workers driving
//! `VirtQueue`s over fuzzer-chosen guest memory and rings, with packets from
//! the "network" (vnet header and frame), a network that stops reading, and
//! guest ring writes between kicks.
//!
//! Input: layout, queue pairs u8 (1 or 2), a mask u64 over the offered
//! features, MAC bool, one [`RingSetup`] per queue (rx0, tx0, [rx1, tx1,]
//! control), op count u8, ops, then memory contents.
//!
//! Invariants: no panic; every guest byte the device changes lies in a used
//! ring or in a buffer some descriptor marked device-writable; every packet
//! the device sends to the network is one `TxFrame::validate` accepts: a
//! vnet header of the negotiated size with only NEEDS_CSUM (and only with
//! CSUM), a GSO type that was negotiated, and a frame of 14 to 65536 bytes.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use bulkhead_common::memory::GuestMemoryHandle;
use bulkhead_common::spec::VIRTIO_F_VERSION_1;
use bulkhead_common::spec::net::{
    VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
};
use bulkhead_common::{QueueWorker, VhostUserDevice, VirtQueue, WorkerCtl};
use bulkhead_net::device::{NetConfig, NetDevice, NetWorker, vnet_hdr_len};
use bulkhead_net::request::{ETH_HLEN, HDR_LEN_V1, MAX_FRAME_LEN, MacAddr, TxFrame, TxOffloads};
use bulkhead_net::tap::Tap;
use vmm_sys_util::eventfd::EventFd;

use super::device::WriteWatch;
use super::guest::{F_NEXT, F_WRITE, Guest, Image, ONE_REGION};
use super::input::{Input, Seed};
use super::virtqueue::{GuestOp, InflightMode, RingSetup};

/// The MAC address of the device when the input gives it one.
const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
/// Send buffer of the device's end: a few frames fill it (EAGAIN on transmit).
const SNDBUF: libc::c_int = 32 << 10;

/// A `SOCK_SEQPACKET` pair: the tap's end and the network's end.
pub fn packet_pair() -> (OwnedFd, OwnedFd) {
    let mut sv = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair");
    // SAFETY: fresh fds we own.
    let (dev, net) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    // SAFETY: setting an int socket option from a local.
    unsafe {
        libc::setsockopt(
            dev.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&SNDBUF as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    (dev, net)
}

fn send(fd: &OwnedFd, pkt: &[u8]) {
    // SAFETY: sending from a live buffer of its length.
    unsafe {
        libc::send(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: receiving into a live buffer of its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).ok()
}

enum Op {
    Kick(u8),
    Fd(u8),
    Packet(u8, Vec<u8>),
    BigPacket(u8, u16, u8),
    Drain(u8),
    Guest(u8, GuestOp),
    Reset,
}

fn decode_op(inp: &mut Input<'_>) -> Op {
    match inp.u8() % 10 {
        0..=2 => Op::Kick(inp.u8()),
        3 => Op::Fd(inp.u8()),
        4 | 5 => {
            let p = inp.u8();
            let n = usize::from(inp.u16() % 2048);
            Op::Packet(p, inp.bytes(n).to_vec())
        }
        6 => Op::BigPacket(inp.u8(), inp.u16(), inp.u8()),
        7 => Op::Drain(inp.u8()),
        8 => {
            let q = inp.u8();
            Op::Guest(q, GuestOp::decode(inp.u8(), inp))
        }
        _ => Op::Reset,
    }
}

/// Checks one packet the device sent to the network.
fn check_sent(pkt: &[u8], hdr_len: usize, offloads: TxOffloads) {
    let len = pkt.len() as u64;
    assert!(
        len >= hdr_len as u64 + ETH_HLEN && len <= hdr_len as u64 + MAX_FRAME_LEN,
        "sent a packet of {len} bytes (header {hdr_len})"
    );
    let mut raw = [0u8; HDR_LEN_V1];
    raw[..hdr_len].copy_from_slice(&pkt[..hdr_len]);
    if let Err(e) = TxFrame::validate(raw, len - hdr_len as u64, offloads) {
        panic!("sent a packet whose header the parser refuses: {e}");
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let g = Guest::decode(&mut inp);
    let pairs = 1 + u16::from(inp.u8() % 2);
    let mask = inp.u64();
    let mac = inp.bool().then_some(MAC);
    let nq = 2 * usize::from(pairs) + 1;
    let raw: Vec<RingSetup> = (0..nq).map(|_| RingSetup::decode(&g, &mut inp)).collect();
    let nops = inp.u8() % 48;
    let ops: Vec<Op> = (0..nops).map(|_| decode_op(&mut inp)).collect();
    g.fill(inp.rest());

    let mut taps = Vec::new();
    let mut nets = Vec::new();
    for _ in 0..pairs {
        let (dev, net) = packet_pair();
        taps.push(Tap::stand_in(dev));
        nets.push(net);
    }
    let cfg = NetConfig {
        mac,
        mtu: None,
        queue_pairs: pairs,
        queue_size: 256,
    };
    let dev = NetDevice::new(cfg, taps).expect("net device over stand-ins");
    let acked = dev.features() & mask;
    dev.set_features(acked).expect("features");
    let hdr_len = vnet_hdr_len(acked);
    let bit = |mask: u64| acked & mask != 0;
    let offloads = TxOffloads {
        csum: bit(VIRTIO_NET_F_CSUM),
        tso4: bit(VIRTIO_NET_F_HOST_TSO4),
        tso6: bit(VIRTIO_NET_F_HOST_TSO6),
        ecn: bit(VIRTIO_NET_F_HOST_ECN),
        ufo: bit(VIRTIO_NET_F_HOST_UFO),
    };

    let handle = GuestMemoryHandle::new(g.mem.clone());
    let setups: Vec<RingSetup> = raw
        .into_iter()
        .map(|s| RingSetup {
            max_chain_bytes: dev.max_chain_bytes(),
            max_descriptors: dev.max_queue_size(),
            inflight: InflightMode::None,
            garbage: Vec::new(),
            ..s
        })
        .collect();
    let mut queues: Vec<Option<(VirtQueue, EventFd, NetWorker)>> = setups
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (vq, call) = s.start(handle.clone(), None)?;
            // The queue's ring features plus the device features.
            let w = dev
                .create_worker(i as u16, s.size, acked | s.features)
                .expect("worker");
            Some((vq, call, w))
        })
        .collect();
    let ctl = WorkerCtl::detached();
    let mut watch = WriteWatch::new(&g);
    let mut buf = vec![0u8; HDR_LEN_V1 + MAX_FRAME_LEN as usize + 64];
    let drain = |net: &OwnedFd, buf: &mut Vec<u8>| {
        while let Some(n) = recv(net, buf) {
            if n == 0 {
                break;
            }
            check_sent(&buf[..n], hdr_len, offloads);
        }
    };

    for op in &ops {
        if !matches!(op, Op::Guest(..)) {
            watch.allow_current(&g, &setups);
        }
        match op {
            Op::Kick(q) | Op::Fd(q) => {
                if let Some((vq, _, w)) = queues[usize::from(*q) % nq].as_mut() {
                    match op {
                        Op::Fd(_) => w.on_fd(vq, 0, &ctl),
                        _ => w.on_kick(vq, &ctl),
                    }
                    // What the queue thread does next: one round of its busy-poll.
                    let _ = w.poll(vq, &ctl);
                }
            }
            Op::Packet(p, bytes) => send(&nets[usize::from(*p) % nets.len()], bytes),
            Op::BigPacket(p, len, fill) => {
                let n = hdr_len + usize::from(*len) + usize::from(*fill);
                let mut pkt = vec![*fill; n];
                pkt[..hdr_len].fill(0);
                send(&nets[usize::from(*p) % nets.len()], &pkt);
            }
            Op::Drain(p) => drain(&nets[usize::from(*p) % nets.len()], &mut buf),
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
    for net in &nets {
        drain(net, &mut buf);
    }
}

/// Seeds: a driver with VERSION_1, MRG_RXBUF, offloads and the control queue
/// (promiscuous off, a MAC table, two queue pairs) transmitting a plain and a
/// checksum-offloaded frame, receiving a frame for it, one for another
/// address, and one spanning two mergeable buffers; and a legacy driver
/// (10-byte header, no MRG_RXBUF) with one queue pair.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Queue q's rings (size 16) at q * 0x400: desc +0, avail +0x100, used +0x200;
    // contents from 0x1800, receive buffers (no contents) from 0x8000.
    let ring = |q: u32| [q * 0x400, q * 0x400 + 0x100, q * 0x400 + 0x200];
    let frame = |dst: [u8; 6], n: usize| {
        let mut f = vec![0u8; n];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        for (i, b) in f.iter_mut().enumerate().skip(14) {
            *b = i as u8;
        }
        f
    };
    let mut out = Vec::new();
    for (name, pairs, modern) in [("modern-two-pairs-ctrl", 2u8, true), ("legacy", 1, false)] {
        let hdr = if modern { 12 } else { 10 };
        let mut img = Image::new();
        // tx0 (queue 1): a plain frame (header and frame in one descriptor)
        // and a NEEDS_CSUM frame (header, then frame).
        let f = frame(MAC.0, 60);
        let mut pkt = vec![0u8; hdr];
        pkt.extend_from_slice(&f);
        img.put(0x1800, &pkt)
            .desc(0x400, 0, 0x1800, pkt.len() as u32, 0, 0);
        let mut h = vec![0u8; hdr];
        h[0] = 1; // NEEDS_CSUM
        h[6..8].copy_from_slice(&34u16.to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
        img.put(0x1860, &h)
            .put(0x1870, &f)
            .desc(0x400, 1, 0x1860, hdr as u32, F_NEXT, 2)
            .desc(0x400, 2, 0x1870, 60, 0, 0)
            .avail(0x500, &[0, 1]);
        // rx0 (queue 0): four 1 KiB buffers.
        for i in 0..4u16 {
            img.desc(0, i, 0x8000 + 0x400 * u64::from(i), 0x400, F_WRITE, 0);
        }
        img.avail(0x100, &[0, 1, 2, 3]);
        let ctrl_q = 2 * u64::from(pairs);
        if modern {
            // Control queue: promisc off; MAC table (1 unicast, 1 multicast); 2 pairs.
            let base = ctrl_q * 0x400;
            let cmds: [(u8, u8, Vec<u8>); 3] = [
                (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, vec![0]),
                (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, {
                    let mut t = 1u32.to_le_bytes().to_vec();
                    t.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9]);
                    t.extend_from_slice(&1u32.to_le_bytes());
                    t.extend_from_slice(&[0x01, 0, 0x5e, 0, 0, 1]);
                    t
                }),
                (
                    VIRTIO_NET_CTRL_MQ,
                    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                    2u16.to_le_bytes().to_vec(),
                ),
            ];
            for (i, (class, cmd, data)) in cmds.iter().enumerate() {
                let at = 0x1900 + 0x40 * i as u64;
                let d = 3 * i as u16;
                img.put(at, &[*class, *cmd])
                    .put(at + 0x10, data)
                    .desc(base, d, at, 2, F_NEXT, d + 1)
                    .desc(base, d + 1, at + 0x10, data.len() as u32, F_NEXT, d + 2)
                    .desc(base, d + 2, at + 0x30, 1, F_WRITE, 0);
            }
            img.avail(base + 0x100, &[0, 3, 6]);
        }
        let mut s = Seed::new();
        Guest::encode(&mut s, ONE_REGION);
        let mut mask = VIRTIO_NET_F_MAC;
        if modern {
            mask |= VIRTIO_F_VERSION_1
                | VIRTIO_NET_F_MRG_RXBUF
                | VIRTIO_NET_F_CSUM
                | VIRTIO_NET_F_GUEST_CSUM
                | VIRTIO_NET_F_HOST_TSO4
                | VIRTIO_NET_F_CTRL_VQ
                | VIRTIO_NET_F_CTRL_RX
                | VIRTIO_NET_F_MQ;
        }
        s.u8(pairs - 1).u64(mask).bool(true);
        for q in 0..2 * u32::from(pairs) + 1 {
            RingSetup::encode(&mut s, 4, if modern { 3 } else { 0 }, ring(q), false);
        }
        let mut ops = Seed::new();
        // Control first, then transmit, network packets, receive.
        ops.u8(0).u8(2 * pairs);
        ops.u8(0).u8(1);
        ops.u8(7).u8(0);
        let mut rx = vec![0u8; hdr];
        rx.extend_from_slice(&frame(MAC.0, 60));
        ops.u8(4).u8(0).u16(rx.len() as u16).bytes(&rx);
        let mut other = vec![0u8; hdr];
        other.extend_from_slice(&frame([0x52, 0x54, 0, 0, 0, 0x77], 60));
        ops.u8(4).u8(0).u16(other.len() as u16).bytes(&other);
        // A 1500-byte frame: two mergeable buffers (or dropped without MRG_RXBUF).
        ops.u8(6).u8(0).u16(1500 - 0x41).u8(0x41);
        ops.u8(3).u8(0);
        ops.u8(0).u8(0);
        ops.u8(9);
        let ops = ops.finish();
        s.u8(9).bytes(&ops).bytes(&img.0);
        out.push((name, s.finish()));
    }
    out
}
