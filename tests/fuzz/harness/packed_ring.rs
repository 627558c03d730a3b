//! Target `packed_ring`: a packed `VirtQueue` (VIRTIO_F_RING_PACKED)
//! started, popped, completed, notified, given back and restarted over
//! fuzzer-chosen rings and bases, with EVENT_IDX and INDIRECT_DESC on or off
//! and an inflight area attached or not, while fuzzer-scripted guest writes
//! change the ring and the driver's event structure between operations.
//!
//! Input: layout, setup (size log2 u8, features u8, ring/driver/device
//! addresses, base u32, chain cap u32, inflight mode u8 (+ garbage offset
//! u16, length u16, bytes)), op count u8, ops, then memory contents.
//! Inflight modes: none; a fresh area with descriptor tables; one with
//! fuzzer garbage at a chosen offset (the record, the tables' header or
//! entries: corrupt chains); a fresh area without tables (an older daemon's).
//!
//! Invariants: a popped id is below the queue size and never handed out
//! twice while in flight; the slots in flight never exceed the ring; a ring
//! error breaks the queue for good; completing an in-flight id writes
//! exactly (id, len, both bits = the used wrap counter) at the used
//! position and moves it; completing anything else changes nothing; the
//! inflight area marks exactly the ids in flight; a restart over the same
//! area resumes at the same base with nothing in flight, resubmits each
//! buffer in flight exactly once (popped again before anything new, never
//! twice; a direct chain with the very descriptors it was first taken
//! with, whatever the ring holds now), and refuses to start only when one
//! of several slots was in flight in an area without descriptor tables;
//! garbage in the area never panics or loops; the device writes no guest
//! byte outside the ring and its own event structure.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bulkhead_common::chain::Descriptor;
use bulkhead_common::inflight::{AreaParts, InflightRegion};
use bulkhead_common::memory::GuestMemoryHandle;
use bulkhead_common::spec::ring::{
    VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED,
};
use bulkhead_common::virtqueue::{CallSlot, QueueConfig, QueueError, RingAddrs, VirtQueue};
use vm_memory::{Address, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::guest::{self, F_INDIRECT, F_NEXT, F_WRITE, Guest, Image, ONE_REGION};
use super::input::{Input, Seed};

/// Queue parameters decoded from the input.
struct Setup {
    size: u16,
    features: u64,
    addrs: RingAddrs,
    base: u32,
    max_chain_bytes: u64,
    /// 0: no inflight area, 1: a fresh one, 2: one with fuzzer garbage,
    /// 3: a fresh one without descriptor tables.
    inflight: u8,
    garbage_at: u64,
    garbage: Vec<u8>,
}

impl Setup {
    fn decode(g: &Guest, inp: &mut Input<'_>) -> Self {
        let size = 1u16 << (inp.u8() % 9);
        let f = inp.u8();
        let mut features = VIRTIO_F_RING_PACKED;
        if f & 1 != 0 {
            features |= VIRTIO_RING_F_EVENT_IDX;
        }
        if f & 2 != 0 {
            features |= VIRTIO_RING_F_INDIRECT_DESC;
        }
        let addrs = RingAddrs {
            desc: GuestAddress(g.addr(inp)),
            avail: GuestAddress(g.addr(inp)),
            used: GuestAddress(g.addr(inp)),
        };
        let base = inp.u32();
        let max_chain_bytes = u64::from(inp.u32());
        let inflight = inp.u8() % 4;
        let (garbage_at, garbage) = if inflight == 2 {
            let at = u64::from(inp.u16());
            let n = usize::from(inp.u16());
            (at, inp.bytes(n).to_vec())
        } else {
            (0, Vec::new())
        };
        Setup {
            size,
            features,
            addrs,
            base,
            max_chain_bytes,
            inflight,
            garbage_at,
            garbage,
        }
    }

    fn region(&self) -> Option<(InflightRegion, File)> {
        if self.inflight == 0 {
            return None;
        }
        let parts = AreaParts {
            state: false,
            packed_tables: self.inflight != 3,
        };
        let (region, file) =
            InflightRegion::create_with(1, self.size, parts).expect("inflight memfd");
        if !self.garbage.is_empty() {
            file.write_all_at(&self.garbage, self.garbage_at)
                .expect("write inflight area");
        }
        Some((region, file))
    }

    fn start(
        &self,
        mem: &GuestMemoryHandle,
        region: Option<&InflightRegion>,
        base: u32,
    ) -> Result<VirtQueue, QueueError> {
        let call = Arc::new(CallSlot::default());
        call.set(Some(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
        let cfg = QueueConfig {
            index: 0,
            size: self.size,
            addrs: self.addrs,
            next_avail: base as u16,
            used_base: (base >> 16) as u16,
            features: self.features,
            max_chain_bytes: self.max_chain_bytes,
        };
        let inflight = region.and_then(|r| r.queue(0, self.size));
        VirtQueue::start(cfg, mem.clone(), call, None, inflight, Default::default())
    }
}

#[derive(Debug)]
enum Op {
    Pop,
    CompleteOldest(u32),
    Complete(u16, u32),
    Notify,
    Enable,
    Disable,
    GiveBackNewest,
    Restart,
    BaseReported,
    /// Ring slot `i % size` = raw bytes.
    Desc(u16, [u8; 16]),
    /// The driver's event structure: off_wrap, flags.
    Event(u16, u16),
}

/// Linear position (0..2*size) of a vring-base half.
fn linear(half: u16, size: u16) -> u32 {
    u32::from(half & 0x7fff)
        + if half & 0x8000 != 0 {
            0
        } else {
            u32::from(size)
        }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let g = Guest::decode(&mut inp);
    let s = Setup::decode(&g, &mut inp);
    let nops = inp.u8() % 64;
    let ops: Vec<Op> = (0..nops)
        .map(|_| match inp.u8() % 14 {
            0..=2 => Op::Pop,
            3 => Op::CompleteOldest(inp.u32()),
            4 => Op::Complete(inp.u16(), inp.u32()),
            5 => Op::Notify,
            6 => Op::Enable,
            7 => Op::Disable,
            8 => Op::GiveBackNewest,
            9 => Op::Restart,
            10 => Op::BaseReported,
            11 | 12 => {
                let i = inp.u16();
                let mut d = [0u8; 16];
                let b = inp.bytes(16);
                d[..b.len()].copy_from_slice(b);
                Op::Desc(i, d)
            }
            _ => Op::Event(inp.u16(), inp.u16()),
        })
        .collect();
    g.fill(inp.rest());

    let area = s.region();
    let region = area.as_ref().map(|a| &a.0);
    let mem = GuestMemoryHandle::new(g.mem.clone());
    let Ok(mut vq) = s.start(&mem, region, s.base) else {
        return;
    };
    let exact = s.inflight != 2;
    let mut shadow = g.snapshot();
    let mut in_flight: Vec<u16> = Vec::new();
    // Ids in flight that a restarted queue hands out again (once).
    let mut resubmitted: Vec<u16> = Vec::new();
    let mut broken = false;
    let size = s.size;
    let desc = s.addrs.desc.raw_value();
    // The descriptors each direct chain in flight was taken with.
    let mut taken_with: std::collections::HashMap<u16, Vec<Descriptor>> = Default::default();
    for op in &ops {
        match op {
            Op::Pop => match vq.pop() {
                Ok(Some(c)) => {
                    assert!(!broken, "pop succeeded on a broken queue");
                    assert!(c.head() < size, "id {} out of range", c.head());
                    if let Some(i) = resubmitted.iter().position(|&h| h == c.head()) {
                        resubmitted.remove(i);
                        assert!(in_flight.contains(&c.head()));
                        if let Some(d) = taken_with.get(&c.head()) {
                            assert_eq!(
                                c.descriptors(),
                                &d[..],
                                "buffer {} resubmitted with other descriptors",
                                c.head()
                            );
                        }
                    } else {
                        taken_with.remove(&c.head());
                        let avail = vq.vring_base() as u16;
                        if let Some(d) = direct_chain(&g, desc, size, avail, c.descriptors()) {
                            taken_with.insert(c.head(), d);
                        }
                        // Resubmitted buffers come first; any left were
                        // refused (completed with length 0: the guest
                        // changed an indirect table), which the in-flight
                        // count checks below.
                        in_flight.retain(|h| !resubmitted.contains(h));
                        resubmitted.clear();
                        assert!(
                            !in_flight.contains(&c.head()),
                            "id {} popped twice",
                            c.head()
                        );
                        in_flight.push(c.head());
                    }
                }
                Ok(None) => {
                    assert!(!broken, "broken queue reported empty");
                    in_flight.retain(|h| !resubmitted.contains(h));
                    resubmitted.clear();
                }
                Err(_) => {
                    broken = true;
                    assert!(vq.is_broken());
                    // The ring is read only once no resubmitted buffer is
                    // left: any were refused and completed.
                    in_flight.retain(|h| !resubmitted.contains(h));
                    resubmitted.clear();
                }
            },
            Op::CompleteOldest(_) | Op::Complete(..) => {
                let (id, len) = match *op {
                    Op::CompleteOldest(len) if !in_flight.is_empty() => (in_flight[0], len),
                    Op::CompleteOldest(_) => continue,
                    Op::Complete(h, len) => (h, len),
                    _ => unreachable!(),
                };
                let before = vq.vring_base();
                let used = (before >> 16) as u16;
                vq.complete(id, len);
                if let Some(pos) = in_flight.iter().position(|&h| h == id) {
                    in_flight.remove(pos);
                    resubmitted.retain(|&h| h != id);
                    let at = desc + 16 * u64::from(used & 0x7fff);
                    let elem = g.read_u64(at + 8);
                    let flags = if used & 0x8000 != 0 {
                        VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
                    } else {
                        0
                    };
                    let want = u64::from(len) | (u64::from(id) << 32) | (u64::from(flags) << 48);
                    if !vq.is_broken() {
                        assert_eq!(elem, want, "used descriptor at {used:#x}");
                        assert_ne!(vq.vring_base() >> 16, before >> 16, "used position moved");
                    }
                } else if exact {
                    assert_eq!(vq.vring_base(), before, "completion of an id not in flight");
                }
            }
            Op::Notify => vq.notify(),
            Op::Enable => {
                let _ = vq.enable_notifications();
            }
            Op::Disable => vq.disable_notifications(),
            Op::GiveBackNewest => {
                if let Some(&id) = in_flight.last()
                    && vq.give_back(&[id]).is_empty()
                {
                    assert!(!resubmitted.contains(&id), "a resubmitted buffer went back");
                    in_flight.pop();
                }
            }
            Op::Restart | Op::BaseReported => {
                // BaseReported: GET_VRING_BASE answered, then a new start.
                let base = vq.vring_base();
                let reported = matches!(op, Op::BaseReported);
                if reported {
                    vq.base_reported();
                } else {
                    drop(vq);
                }
                let with_record = exact && region.is_some();
                // A used descriptor (both bits = the used wrap counter) at
                // the used position naming a buffer in flight reads as a
                // completion the record missed: that buffer is done.
                let used = (base >> 16) as u16;
                let at = desc + 16 * u64::from(used & 0x7fff);
                let word = g.read_u64(at + 8);
                let (id_at, flags_at) = ((word >> 32) as u16, (word >> 48) as u16);
                let both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;
                let want = if used & 0x8000 != 0 { both } else { 0 };
                let looks_used = flags_at & both == want;
                if with_record && looks_used {
                    in_flight.retain(|&h| h != id_at);
                }
                match s.start(&mem, region, base) {
                    Ok(q) => {
                        if with_record {
                            // Every buffer in flight comes back, once.
                            assert_eq!(q.in_flight() as usize, in_flight.len(), "resubmitted");
                            // With nothing in flight the record, or the
                            // reported base, puts it back where it was.
                            // (A used-looking descriptor at the used position
                            // moves it: a guest can write one.)
                            // The avail position is derived (used + slots in
                            // flight), so a frontend's base that put it
                            // elsewhere is not kept.
                            if in_flight.is_empty() && !looks_used {
                                assert_eq!(q.vring_base() >> 16, base >> 16, "resumed elsewhere");
                            }
                            resubmitted = in_flight.clone();
                        } else {
                            // A new backend knows nothing of the old one's buffers.
                            in_flight.clear();
                            resubmitted.clear();
                        }
                        vq = q;
                    }
                    Err(e) => {
                        if with_record && !in_flight.is_empty() {
                            assert!(
                                matches!(e, QueueError::PackedInFlightLost(n)
                                    if n >= 1 && n as usize <= in_flight.len() + 1),
                                "{e:?} with {} in flight",
                                in_flight.len()
                            );
                            // With descriptor tables every chain was kept.
                            assert_eq!(s.inflight, 3, "{e:?} though the area has tables");
                        }
                        return;
                    }
                }
                broken = false;
            }
            Op::Desc(i, d) => g.guest_write(
                &mut shadow,
                desc + 16 * (u64::from(*i) % u64::from(size)),
                d,
            ),
            Op::Event(off, flags) => {
                let mut b = [0u8; 4];
                b[..2].copy_from_slice(&off.to_le_bytes());
                b[2..].copy_from_slice(&flags.to_le_bytes());
                g.guest_write(&mut shadow, s.addrs.avail.raw_value(), &b);
            }
        }
        let base = vq.vring_base();
        let (avail, used) = (linear(base as u16, size), linear((base >> 16) as u16, size));
        let slots = (avail + 4 * u32::from(size) - used) % (2 * u32::from(size));
        assert!(
            slots <= u32::from(size),
            "{slots} slots in flight on a ring of {size}"
        );
        if exact {
            assert_eq!(vq.in_flight() as usize, in_flight.len(), "in-flight count");
            if let Some(r) = region {
                let q = r.queue(0, size).expect("inflight view");
                let mut want = in_flight.clone();
                want.sort_unstable();
                assert_eq!(q.pending(), want, "inflight area disagrees");
            }
        }
    }
    let ring = 16 * u64::from(size);
    for a in g.changed(&shadow) {
        assert!(
            guest::contains(desc, ring, a) || guest::contains(s.addrs.used.raw_value(), 4, a),
            "device wrote guest byte {a:#x} outside the ring and its event structure"
        );
    }
}

/// The descriptors of chain `descs`, just taken with the device's avail
/// position now at `avail` (vring-base form), when it came straight from
/// the ring (its last slots, none indirect): what a resubmission must
/// reproduce. None for an indirect one (its table is read again).
fn direct_chain(
    g: &Guest,
    desc: u64,
    size: u16,
    avail: u16,
    descs: &[Descriptor],
) -> Option<Vec<Descriptor>> {
    let n = u16::try_from(descs.len())
        .ok()
        .filter(|&n| n >= 1 && n <= size)?;
    let end = avail & 0x7fff;
    for k in 1..=n {
        let idx = (end + size - k) % size;
        let flags = (g.read_u64(desc + 16 * u64::from(idx) + 8) >> 48) as u16;
        if flags & F_INDIRECT != 0 {
            return None;
        }
    }
    Some(descs.to_vec())
}

/// The 16 bytes of a packed descriptor.
fn pdesc(addr: u64, len: u32, id: u16, flags: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&id.to_le_bytes());
    b[14..16].copy_from_slice(&flags.to_le_bytes());
    b
}

/// Seeds: a ring of 8 at 0x0, driver events at 0x80, device events at
/// 0x100; three buffers available (two slots, an indirect one, one slot).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let a = VRING_PACKED_DESC_F_AVAIL;
    let mut img = Image::new();
    img.put(0x00, &pdesc(0x400, 16, 2, F_NEXT | a))
        .put(0x10, &pdesc(0x800, 512, 2, F_WRITE | a))
        .put(0x20, &pdesc(0x200, 32, 5, F_INDIRECT | a))
        .put(0x30, &pdesc(0x400, 16, 7, a))
        .put(0x200, &pdesc(0x400, 16, 0, 0))
        .put(0x210, &pdesc(0xa00, 1, 0, F_WRITE));
    let mut out = Vec::new();
    for (name, features, inflight) in [
        ("plain", 0u8, 0u8),
        ("event-idx-indirect", 3, 0),
        ("event-idx-indirect-inflight", 3, 1),
    ] {
        let mut s = Seed::new();
        Guest::encode(&mut s, ONE_REGION);
        s.u8(3).u8(features);
        for r in [0u32, 0x80, 0x100] {
            Guest::encode_addr(&mut s, r);
        }
        s.u32(0x8000_8000).u32(1 << 20).u8(inflight);
        // pop x4, complete oldest, notify, restart, pop, complete oldest,
        // enable, give back, base reported, restart.
        s.u8(13);
        s.u8(0).u8(0).u8(0).u8(0);
        s.u8(3).u32(513).u8(5).u8(9);
        s.u8(0).u8(3).u32(1).u8(6).u8(8).u8(10).u8(9);
        s.bytes(&img.0);
        out.push((name, s.finish()));
    }
    out
}
