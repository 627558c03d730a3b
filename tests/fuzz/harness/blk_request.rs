//! Target `blk_request`: bulkhead-blk end to end below the socket — a real
//! `BlkDevice` over a small memfd image with the sync engine, its worker
//! driving a `VirtQueue` over fuzzer-chosen guest memory and rings, with
//! guest writes between kicks.
//!
//! Input: layout, [`RingSetup`], image size u8 (in 4 KiB units, minus one),
//! flags u8 (bit 0 read-only, bit 1 write-through), op count u8, ops, then
//! memory contents.
//!
//! Invariants: no panic; every guest byte the device changes lies in the used
//! ring or in a buffer some descriptor (direct or in an indirect table) marked
//! device-writable at the time ([`WriteWatch`]); the image never grows.

use std::fs::File;

use bulkhead_blk::device::{BlkConfig, BlkDevice};
use bulkhead_blk::disk::Disk;
use bulkhead_blk::engine::EngineKind;
use bulkhead_common::memory::GuestMemoryHandle;
use bulkhead_common::{QueueWorker, VhostUserDevice, WorkerCtl};

use super::device::WriteWatch;
use super::guest::{F_INDIRECT, F_NEXT, F_WRITE, Guest, Image, ONE_REGION, blk_header};
use super::input::{Input, Seed};
use super::virtqueue::{GuestOp, RingSetup};

/// A memfd of `len` bytes (the disk image).
pub fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"fuzz-image".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).expect("size memfd");
    f
}

enum Op {
    Kick,
    Reap,
    Wce(u8),
    Guest(GuestOp),
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let g = Guest::decode(&mut inp);
    let s = RingSetup::decode(&g, &mut inp);
    let image_len = (u64::from(inp.u8()) + 1) * 4096;
    let flags = inp.u8();
    let nops = inp.u8() % 32;
    let ops: Vec<Op> = (0..nops)
        .map(|_| match inp.u8() % 6 {
            0 | 1 => Op::Kick,
            2 => Op::Reap,
            3 => Op::Wce(inp.u8()),
            _ => Op::Guest(GuestOp::decode(inp.u8(), &mut inp)),
        })
        .collect();
    g.fill(inp.rest());

    let image = memfd(image_len);
    let probe = image.try_clone().expect("dup image");
    let disk = Disk::from_file(image).expect("memfd image");
    let dev = BlkDevice::new(
        disk,
        BlkConfig {
            readonly: flags & 1 != 0,
            num_queues: 1,
            // The daemon's default largest queue; the ring may be smaller.
            queue_size: s.size.max(128),
            serial: Some("bulkhead-fuzz".into()),
            engine: EngineKind::Sync,
        },
    );
    if flags & 2 != 0 {
        dev.set_config(32, &[0]).expect("wce is writable");
    }
    let setup = RingSetup {
        max_chain_bytes: dev.max_chain_bytes(),
        max_descriptors: dev.max_chain_descriptors(),
        garbage: s.garbage.clone(),
        ..s
    };
    let area = setup.inflight_region();
    let handle = GuestMemoryHandle::new(g.mem.clone());
    let Some((mut vq, _call)) = setup.start(handle, area.as_ref().map(|a| &a.0)) else {
        return;
    };
    let mut worker = dev
        .create_worker(0, setup.size, setup.features)
        .expect("worker");
    let ctl = WorkerCtl::detached();

    let setups = std::slice::from_ref(&setup);
    let mut watch = WriteWatch::new(&g);
    for op in &ops {
        if !matches!(op, Op::Guest(_)) {
            watch.allow_current(&g, setups);
        }
        match op {
            Op::Kick | Op::Reap => {
                if matches!(op, Op::Kick) {
                    worker.on_kick(&mut vq, &ctl);
                } else {
                    worker.on_fd(&mut vq, 0, &ctl);
                }
                // What the queue thread does next: one round of its busy-poll.
                let _ = worker.poll(&mut vq, &ctl);
            }
            Op::Wce(v) => {
                let _ = dev.set_config(32, &[*v]);
            }
            Op::Guest(gop) => watch.guest(&g, gop, &setup),
        }
    }
    watch.allow_current(&g, setups);
    worker.drain(&mut vq);
    watch.check(&g);
    let len = probe.metadata().expect("stat image").len();
    assert_eq!(len, image_len, "the image grew or shrank");
}

/// Seeds: a write, a read, a flush, GET_ID, discard and write-zeroes (direct
/// and indirect), with and without EVENT_IDX.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut img = Image::new();
    // Rings (size 16): desc 0x0, avail 0x100, used 0x200. Buffers from 0x400.
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&n.to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b
    };
    img.put(0x400, &blk_header(1, 2)) // OUT sector 2
        .put(0x600, &[0xab; 512])
        .desc(0, 0, 0x400, 16, F_NEXT, 1)
        .desc(0, 1, 0x600, 512, F_NEXT, 2)
        .desc(0, 2, 0x800, 1, F_WRITE, 0)
        .put(0x410, &blk_header(0, 2)) // IN sector 2
        .desc(0, 3, 0x410, 16, F_NEXT, 4)
        .desc(0, 4, 0xa00, 512, F_NEXT | F_WRITE, 5)
        .desc(0, 5, 0x801, 1, F_WRITE, 0)
        .put(0x420, &blk_header(4, 0)) // FLUSH
        .desc(0, 6, 0x420, 16, F_NEXT, 7)
        .desc(0, 7, 0x802, 1, F_WRITE, 0)
        .put(0x430, &blk_header(8, 0)) // GET_ID
        .desc(0, 8, 0x430, 16, F_NEXT, 9)
        .desc(0, 9, 0xc00, 20, F_NEXT | F_WRITE, 10)
        .desc(0, 10, 0x803, 1, F_WRITE, 0)
        .put(0x440, &blk_header(11, 0)) // DISCARD
        .put(0x450, &seg(0, 8, 0))
        .put(0x460, &blk_header(13, 0)) // WRITE_ZEROES (unmap)
        .put(0x470, &seg(8, 8, 1))
        // Indirect tables for the two segment requests.
        .desc(0, 11, 0x300, 48, F_INDIRECT, 0)
        .desc(0x300, 0, 0x440, 32, F_NEXT, 1)
        .desc(0x300, 1, 0x804, 1, F_WRITE, 0)
        .desc(0, 12, 0x340, 48, F_INDIRECT, 0)
        .desc(0x340, 0, 0x460, 32, F_NEXT, 1)
        .desc(0x340, 1, 0x805, 1, F_WRITE, 0)
        .avail(0x100, &[0, 3, 6, 8, 11, 12]);
    let mut out = Vec::new();
    for (name, features, flags) in [
        ("mixed", 2u8, 0u8),
        ("mixed-event-idx", 3, 0),
        ("mixed-readonly-writethrough", 3, 3),
    ] {
        let mut s = Seed::new();
        Guest::encode(&mut s, ONE_REGION);
        RingSetup::encode(&mut s, 4, features, [0, 0x100, 0x200], features == 3);
        s.u8(15).u8(flags);
        // kick, reap, guest republishes head 0 (idx 7), kick, reap
        s.u8(6).u8(0).u8(2);
        s.u8(4).u8(1).u16(6).u16(0);
        s.u8(4).u8(0).u16(7);
        s.u8(0).u8(2);
        s.bytes(&img.0);
        out.push((name, s.finish()));
    }
    out
}
