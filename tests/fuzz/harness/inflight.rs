//! Target `inflight`: the inflight-area recovery parser
//! (`InflightRegion::map`, `QueueInflight::recover`,
//! `QueueInflight::packed_record`) over arbitrary area bytes and
//! geometries, then the begin/used bookkeeping with simulated crashes.
//!
//! Input: mode u8 (mod 3). Mode 0: queues u8, layout size log2 u8, live
//! size log2 u8, features u64, ring used idx u16, garbage offset u16,
//! garbage length u16 and bytes, op count u8, ops (kind u8, arg u16).
//! Mode 1: file length u32, offset u64, size u64, queues u16, queue size
//! u16. Mode 2 (packed records and descriptor tables): queues u8, layout
//! size log2 u8, live size log2 u8, parts u8 (bit 0 tables, bit 1 state
//! section), used u16, garbage offset u32, garbage length u16 and bytes
//! (anywhere in the area: records, tables' header, table entries), op count
//! u8, ops (kind u8, id u16, slots u8, descriptor seed u64).
//!
//! Invariants: recovery returns distinct heads below the live queue size, and
//! the same heads again when repeated; after recovery the area lists exactly
//! the heads begun and not completed; a crash between publishing a used entry
//! and clearing its flag does not resubmit that head; mapping an area the file
//! cannot back is refused (never SIGBUS). Packed: a record over any bytes
//! is refused or read without panic and in bounded time; what it returns
//! names distinct ids below the live size, each chain of its slots' length
//! with NEXT on all but its last descriptor and no table entry in two
//! chains; after a restart the record holds exactly the buffers begun and
//! not completed, each with the very descriptors it was begun with when
//! the area has tables and room (none lost), and a refused record is
//! refused again, unchanged.

use std::fs::File;
use std::os::unix::fs::FileExt;

use bulkhead_common::chain::PackedDescriptor;
use bulkhead_common::inflight::{AreaParts, InflightRegion, PackedRecord, QueueInflight};
use bulkhead_common::spec::VIRTIO_F_VERSION_1;
use bulkhead_common::spec::ring::VRING_DESC_F_NEXT as F_NEXT;

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

/// Checks what a packed record returned: distinct ids below `live`, each
/// recovered chain as long as its slots, NEXT on all but its last.
fn check_packed(rec: &PackedRecord, live: u16) {
    let mut ids: Vec<u16> = rec.in_flight.iter().map(|e| e.id).collect();
    assert!(ids.iter().all(|&id| id < live), "id >= {live}: {ids:?}");
    ids.dedup();
    assert_eq!(ids.len(), rec.in_flight.len(), "ids twice: {ids:?}");
    for e in &rec.in_flight {
        if e.descs.is_empty() {
            continue;
        }
        assert_eq!(usize::from(e.slots), e.descs.len(), "buffer {}", e.id);
        assert!(e.descs.len() <= usize::from(live), "buffer {}", e.id);
        for (i, d) in e.descs.iter().enumerate() {
            assert_eq!(d.id, e.id);
            if e.descs.len() > 1 {
                let last = i + 1 == e.descs.len();
                assert_eq!(d.flags & F_NEXT == 0, last, "buffer {} NEXT at {i}", e.id);
            }
        }
    }
}

/// A buffer of `n` ring descriptors for `id`, made from `seed`.
fn ring_chain(id: u16, n: u16, seed: u64) -> Vec<PackedDescriptor> {
    (0..n)
        .map(|i| {
            let x = seed.rotate_left(u32::from(i) * 7) ^ u64::from(i);
            let next = if i + 1 < n { F_NEXT } else { 0 };
            PackedDescriptor {
                addr: x,
                len: (x >> 20) as u32,
                id,
                flags: (x as u16 & !F_NEXT) | next,
            }
        })
        .collect()
}

/// Mode 2: packed records and descriptor tables.
fn run_packed(inp: &mut Input<'_>) {
    let nq = 1 + u16::from(inp.u8() % 3);
    let layout_log2 = inp.u8() % 9;
    let layout = 1u16 << layout_log2;
    let live = 1u16 << (inp.u8() % (layout_log2 + 1));
    let p = inp.u8();
    let parts = AreaParts {
        packed_tables: p & 1 != 0,
        state: p & 2 != 0,
    };
    let used = inp.u16();
    let goff = u64::from(inp.u32());
    let glen = usize::from(inp.u16());
    let garbage = inp.bytes(glen);
    let (region, file) = InflightRegion::create_with(nq, layout, parts).expect("inflight area");
    assert_eq!(region.has_packed_tables(), parts.packed_tables);
    let size = file.metadata().expect("stat").len();
    if !garbage.is_empty() && goff < size {
        let n = garbage.len().min((size - goff) as usize);
        file.write_all_at(&garbage[..n], goff).expect("write area");
    }
    // A new process maps the area (the header may be garbage now).
    let region = InflightRegion::map(file, 0, size, nq, layout).expect("map area");
    let tables = region.has_packed_tables();
    let view = |q| -> QueueInflight { region.queue(q, live).expect("queue view") };
    let mut model: Vec<(u16, Vec<PackedDescriptor>)> = Vec::new();
    for q in (0..nq).rev() {
        match view(q).packed_record(0, used) {
            Ok(Some(rec)) => {
                check_packed(&rec, live);
                if q == 0 {
                    model = rec.in_flight.into_iter().map(|e| (e.id, e.descs)).collect();
                }
            }
            Ok(None) => {}
            Err(e) => {
                // Refused, and left as found: refused again.
                assert_eq!(view(q).packed_record(0, used), Err(e), "refused once only");
                if q == 0 {
                    return;
                }
            }
        }
    }
    // The model: each buffer in flight and the descriptors it must come
    // back with (none: not recorded); entries the table has left.
    let chain_len = |d: &Vec<PackedDescriptor>| if d.len() >= 2 { d.len() } else { 0 };
    let entries = if tables { usize::from(layout) } else { 0 };
    let mut q0 = view(0);
    // The view that took the record first; a second view starts again.
    let _ = q0
        .packed_record(0, used)
        .expect("a record read once reads again");
    let nops = inp.u8() % 48;
    for _ in 0..nops {
        let kind = inp.u8();
        let id = inp.u16() % live;
        let n = 1 + u16::from(inp.u8()) % live.min(12);
        let seed = inp.u64();
        let pos = model.iter().position(|m| m.0 == id);
        match (kind % 4, pos) {
            (0, None) => {
                let ring = ring_chain(id, n, seed);
                let held: usize = model.iter().map(|m| chain_len(&m.1)).sum();
                let kept = n == 1 || (tables && usize::from(n) <= entries - held);
                q0.packed_begin(id, &ring);
                model.push((id, if kept { ring } else { Vec::new() }));
            }
            (1, Some(i)) => {
                model.remove(i);
                q0.packed_used(id, used);
            }
            (2, Some(i)) => {
                model.remove(i);
                q0.packed_abort(id);
            }
            (3, _) => {
                // A restart: a new process's view of the same area.
                q0 = view(0);
                let rec = q0
                    .packed_record(0, used)
                    .expect("a record this code wrote")
                    .expect("the record is there");
                check_packed(&rec, live);
                let mut got: Vec<(u16, Vec<PackedDescriptor>)> =
                    rec.in_flight.into_iter().map(|e| (e.id, e.descs)).collect();
                got.sort_by_key(|g| g.0);
                model.sort_by_key(|m| m.0);
                assert_eq!(got, model, "after a restart");
            }
            _ => {}
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    match inp.u8() % 3 {
        1 => return run_map(&mut inp),
        2 => return run_packed(&mut inp),
        _ => {}
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

    // Packed: 2 queues of 8 with tables; buffers of 3, 1 and 2 slots
    // begun, one used, restarts between.
    let packed_ops: &[(u8, u16, u8)] = &[
        (0, 2, 2),
        (0, 4, 0),
        (0, 6, 1),
        (3, 0, 0),
        (1, 4, 0),
        (0, 1, 4),
        (2, 6, 0),
        (3, 0, 0),
    ];
    let packed = |garbage: &[u8], at: u32| {
        let mut s = Seed::new();
        s.u8(2).u8(1).u8(3).u8(3).u8(1).u16(0x8000).u32(at);
        s.u16(garbage.len() as u16).bytes(garbage);
        s.u8(packed_ops.len() as u8);
        for &(k, id, n) in packed_ops {
            s.u8(k)
                .u16(id)
                .u8(n)
                .u64(0x1234_5678_9abc_def0 ^ u64::from(id));
        }
        s.finish()
    };
    out.push(("packed-traffic", packed(&[], 0)));
    // The same over an area whose record claims a chain for buffer 3
    // (version 0xb001, 8 ids; 3 slots from entry 7), whose tag the fuzzer
    // must find, and whose entry 7 links to itself.
    let mut area = vec![0u8; 16 + 16 * 8];
    area[8..10].copy_from_slice(&0xb001u16.to_le_bytes());
    area[10..12].copy_from_slice(&8u16.to_le_bytes());
    let r = 16 + 16 * 3;
    area[r] = 1;
    area[r + 1] = 3;
    area[r + 2..r + 4].copy_from_slice(&7u16.to_le_bytes());
    area[r + 4..r + 8].copy_from_slice(&3u32.to_le_bytes());
    out.push(("packed-claimed-chain", packed(&area, 0)));
    out
}
