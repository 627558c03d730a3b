//! Target `inflight`: the inflight-area recovery parser
//! (`InflightRegion::map`, `QueueInflight::recover`) over arbitrary area bytes
//! and geometries, then the begin/used bookkeeping with simulated crashes.
//!
//! Input: mode u8. Mode 0: queues u8, layout size log2 u8, live size log2 u8,
//! features u64, ring used idx u16, garbage offset u16, garbage length u16 and
//! bytes, op count u8, ops (kind u8, arg u16). Mode 1: file length u32, offset
//! u64, size u64, queues u16, queue size u16.
//!
//! Invariants: recovery returns distinct heads below the live queue size, and
//! the same heads again when repeated; after recovery the area lists exactly
//! the heads begun and not completed; a crash between publishing a used entry
//! and clearing its flag does not resubmit that head; mapping an area the file
//! cannot back is refused (never SIGBUS).

use std::fs::File;
use std::os::unix::fs::FileExt;

use bulkhead_common::inflight::{InflightRegion, QueueInflight};
use bulkhead_common::spec::VIRTIO_F_VERSION_1;

use super::input::{Input, Seed};

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"fuzz-inflight".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).expect("size memfd");
    f
}

fn sorted(mut v: Vec<u16>) -> Vec<u16> {
    v.sort_unstable();
    v
}

fn check_recovered(p: &[u16], live: u16) {
    assert!(
        p.iter().all(|&h| h < live),
        "recovered head >= {live}: {p:?}"
    );
    let mut s = p.to_vec();
    s.sort_unstable();
    s.dedup();
    assert_eq!(s.len(), p.len(), "duplicate recovered heads: {p:?}");
}

fn run_map(inp: &mut Input<'_>) {
    let file_len = u64::from(inp.u32() % (1 << 20));
    let offset = inp.u64();
    let size = inp.u64();
    let nq = inp.u16();
    let qs = inp.u16();
    let file = memfd(file_len);
    if let Ok(region) = InflightRegion::map(file, offset, size, nq, qs) {
        for q in 0..nq.min(4) {
            let mut view = region.queue(q, qs).expect("queue inside the mapped layout");
            let p = view.recover(0, 0);
            check_recovered(&p, qs);
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    if inp.u8() % 2 == 1 {
        return run_map(&mut inp);
    }
    let nq = 1 + u16::from(inp.u8() % 4);
    let layout_log2 = inp.u8() % 9;
    let layout = 1u16 << layout_log2;
    let live = 1u16 << (inp.u8() % (layout_log2 + 1));
    let features = inp.u64();
    let mut used = inp.u16();
    let goff = u64::from(inp.u16());
    let glen = usize::from(inp.u16());
    let garbage = inp.bytes(glen);
    let (region, file) = InflightRegion::create(nq, layout).expect("inflight area");
    if !garbage.is_empty() {
        let size = file.metadata().expect("stat").len();
        if goff < size {
            let n = garbage.len().min((size - goff) as usize);
            file.write_all_at(&garbage[..n], goff).expect("write area");
        }
    }
    assert!(
        region.queue(nq, live).is_none(),
        "queue index past the area"
    );
    if layout < u16::MAX {
        assert!(
            region.queue(0, layout + 1).is_none(),
            "queue larger than the layout"
        );
    }
    let view = |q| -> QueueInflight { region.queue(q, live).expect("queue view") };

    let mut recovered = Vec::new();
    for q in 0..nq {
        let p = view(q).recover(features, used);
        check_recovered(&p, live);
        assert_eq!(sorted(view(q).recover(features, used)), sorted(p.clone()));
        if q == 0 {
            recovered = p;
        }
    }

    let mut q0 = view(0);
    let mut model: Vec<u16> = recovered;
    assert_eq!(q0.pending(), sorted(model.clone()));
    let nops = inp.u8() % 32;
    for _ in 0..nops {
        let kind = inp.u8();
        let arg = inp.u16();
        match kind % 4 {
            0 => {
                let h = arg % live;
                if !model.contains(&h) {
                    q0.begin(h);
                    model.push(h);
                }
            }
            1 if !model.is_empty() => {
                let h = model.remove(usize::from(arg) % model.len());
                q0.before_used(h);
                used = used.wrapping_add(1);
                q0.after_used(h, used);
            }
            2 if !model.is_empty() => {
                // Crash after publishing `h` but before clearing its flag.
                let h = model.remove(usize::from(arg) % model.len());
                q0.before_used(h);
                used = used.wrapping_add(1);
                q0 = view(0);
                let p = q0.recover(features, used);
                check_recovered(&p, live);
                assert_eq!(sorted(p), sorted(model.clone()), "after a crash past used");
            }
            3 => {
                // Plain restart.
                q0 = view(0);
                let p = q0.recover(features, used);
                check_recovered(&p, live);
                assert_eq!(sorted(p), sorted(model.clone()), "after a restart");
            }
            _ => {}
        }
        assert_eq!(q0.pending(), sorted(model.clone()), "pending heads");
    }
}

/// Seeds: a clean area with traffic and crashes, a used area replayed, and a
/// map of a frontend-sized area.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let ops: &[(u8, u16)] = &[
        (0, 5),
        (0, 2),
        (0, 7),
        (1, 1),
        (2, 0),
        (0, 1),
        (3, 0),
        (1, 0),
    ];
    let mut s = Seed::new();
    s.u8(0)
        .u8(1)
        .u8(3)
        .u8(3)
        .u64(VIRTIO_F_VERSION_1)
        .u16(0)
        .u16(0)
        .u16(0);
    s.u8(ops.len() as u8);
    for &(k, a) in ops {
        s.u8(k).u16(a);
    }
    out.push(("traffic", s.finish()));

    // An area left by a previous backend: version 1, 8 descriptors, used idx 3,
    // heads 2 and 6 in flight with counters 9 and 4.
    let mut area = vec![0u8; 16 + 16 * 8];
    area[8..10].copy_from_slice(&1u16.to_le_bytes());
    area[10..12].copy_from_slice(&8u16.to_le_bytes());
    area[12..14].copy_from_slice(&2u16.to_le_bytes());
    area[14..16].copy_from_slice(&3u16.to_le_bytes());
    for (h, c) in [(2usize, 9u64), (6, 4)] {
        let off = 16 + 16 * h;
        area[off] = 1;
        area[off + 8..off + 16].copy_from_slice(&c.to_le_bytes());
    }
    let mut s = Seed::new();
    s.u8(0)
        .u8(0)
        .u8(3)
        .u8(3)
        .u64(VIRTIO_F_VERSION_1)
        .u16(3)
        .u16(0);
    s.u16(area.len() as u16).bytes(&area);
    s.u8(3).u8(0).u16(3).u8(3).u16(0).u8(1).u16(0);
    out.push(("stale-area", s.finish()));

    let mut s = Seed::new();
    let size = 2 * (16 + 16 * 128 + 48) as u64;
    s.u8(1).u32(size as u32).u64(0).u64(size).u16(2).u16(128);
    out.push(("map", s.finish()));
    out
}
