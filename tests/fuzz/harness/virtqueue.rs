//! Target `virtqueue`: `VirtQueue` start/pop/complete/notify over fuzzer-chosen
//! rings and descriptors, with EVENT_IDX and INDIRECT_DESC on or off and an
//! inflight area attached or not, while fuzzer-scripted guest writes change the
//! rings between device operations.
//!
//! Input: layout, [`RingSetup`], op count u8, ops, then memory contents.
//!
//! Invariants: a popped head is below the queue size and never handed out
//! twice while in flight; a ring error breaks the queue for good; completing
//! an in-flight head publishes exactly (head, len) at the next used slot and
//! bumps used->idx by one; completing anything else changes nothing; the
//! inflight area lists exactly the heads in flight; the device writes no guest
//! byte outside the used ring.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bulkhead_common::inflight::InflightRegion;
use bulkhead_common::memory::GuestMemoryHandle;
use bulkhead_common::spec::ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use bulkhead_common::virtqueue::{CallSlot, QueueConfig, RingAddrs, VirtQueue};
use vm_memory::{Address, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::guest::{self, F_INDIRECT, F_NEXT, F_WRITE, Guest, Image, ONE_REGION};
use super::input::{Input, Seed};

/// How an inflight area is attached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum InflightMode {
    /// None.
    None,
    /// A fresh (zeroed) area.
    Fresh,
    /// An area whose first bytes are fuzzer garbage (a hostile or stale frontend area).
    Garbage,
}

/// Queue parameters decoded from the input.
pub struct RingSetup {
    /// Queue size (a power of two, 1..=256).
    pub size: u16,
    /// Negotiated features.
    pub features: u64,
    /// Ring addresses.
    pub addrs: RingAddrs,
    /// SET_VRING_BASE.
    pub next_avail: u16,
    /// Chain byte cap.
    pub max_chain_bytes: u64,
    /// Most descriptors per chain (`set_max_descriptors`; the device's largest queue).
    pub max_descriptors: u16,
    /// Inflight area.
    pub inflight: InflightMode,
    /// Garbage for [`InflightMode::Garbage`].
    pub garbage: Vec<u8>,
}

impl RingSetup {
    /// Decodes: size log2 u8, feature bits u8 (0: EVENT_IDX, 1: INDIRECT_DESC),
    /// desc/avail/used addresses, next avail u16, chain cap u32 (its top four
    /// bits: log2 of the most descriptors per chain), inflight mode
    /// u8 (+ garbage length u16 and bytes).
    pub fn decode(g: &Guest, inp: &mut Input<'_>) -> Self {
        let size = 1u16 << (inp.u8() % 9);
        let f = inp.u8();
        let mut features = 0u64;
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
        let next_avail = inp.u16();
        let cap = inp.u32();
        let max_chain_bytes = u64::from(cap);
        // The cap's top four bits also pick the device's largest queue, 2^n.
        let max_descriptors = 1u16 << (cap >> 28);
        let inflight = match inp.u8() % 3 {
            0 => InflightMode::None,
            1 => InflightMode::Fresh,
            _ => InflightMode::Garbage,
        };
        let garbage = if inflight == InflightMode::Garbage {
            let n = usize::from(inp.u16());
            inp.bytes(n).to_vec()
        } else {
            Vec::new()
        };
        RingSetup {
            size,
            features,
            addrs,
            next_avail,
            max_chain_bytes,
            max_descriptors,
            inflight,
            garbage,
        }
    }

    /// Encodes a setup with rings at offsets from the first region.
    pub fn encode(
        seed: &mut Seed,
        size_log2: u8,
        feature_bits: u8,
        rings: [u32; 3],
        fresh_inflight: bool,
    ) {
        seed.u8(size_log2).u8(feature_bits);
        for r in rings {
            Guest::encode_addr(seed, r);
        }
        seed.u16(0).u32(1 << 20).u8(u8::from(fresh_inflight));
    }

    /// The used ring's byte range (flags, idx, ring, avail_event).
    pub fn used_range(&self) -> (u64, u64) {
        (self.addrs.used.raw_value(), 6 + 8 * u64::from(self.size))
    }

    /// Creates the inflight area the setup asks for.
    pub fn inflight_region(&self) -> Option<(InflightRegion, File)> {
        if self.inflight == InflightMode::None {
            return None;
        }
        let (region, file) = InflightRegion::create(1, self.size).expect("inflight memfd");
        if !self.garbage.is_empty() {
            file.write_all_at(&self.garbage, 0)
                .expect("write inflight area");
        }
        Some((region, file))
    }

    /// Starts a queue over `mem` with this setup.
    pub fn start(
        &self,
        mem: GuestMemoryHandle,
        region: Option<&InflightRegion>,
    ) -> Option<(VirtQueue, EventFd)> {
        let call = Arc::new(CallSlot::default());
        let efd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        call.set(Some(efd.try_clone().expect("eventfd clone")));
        let cfg = QueueConfig {
            index: 0,
            size: self.size,
            addrs: self.addrs,
            next_avail: self.next_avail,
            used_base: 0,
            features: self.features,
            max_chain_bytes: self.max_chain_bytes,
        };
        let inflight = region.and_then(|r| r.queue(0, self.size));
        let mut vq = VirtQueue::start(cfg, mem, call, None, inflight, Default::default()).ok()?;
        vq.set_max_descriptors(self.max_descriptors);
        Some((vq, efd))
    }
}

/// A guest-side write between device operations.
#[derive(Debug)]
pub enum GuestOp {
    /// avail->idx = v.
    AvailIdx(u16),
    /// avail->ring[slot % size] = head.
    AvailSlot(u16, u16),
    /// Descriptor `i % size` of the table = raw bytes.
    Desc(u16, [u8; 16]),
    /// used_event = v, avail->flags = flags.
    Event(u16, u16),
}

impl GuestOp {
    /// Decodes one guest op from its kind (0..4) and the input.
    pub fn decode(kind: u8, inp: &mut Input<'_>) -> Self {
        match kind % 4 {
            0 => GuestOp::AvailIdx(inp.u16()),
            1 => GuestOp::AvailSlot(inp.u16(), inp.u16()),
            2 => {
                let i = inp.u16();
                let mut d = [0u8; 16];
                let b = inp.bytes(16);
                d[..b.len()].copy_from_slice(b);
                GuestOp::Desc(i, d)
            }
            _ => GuestOp::Event(inp.u16(), inp.u16()),
        }
    }

    /// Performs the write on `g` and on `shadow`.
    pub fn apply(&self, g: &Guest, shadow: &mut [Vec<u8>], s: &RingSetup) {
        let avail = s.addrs.avail.raw_value();
        let n = u64::from(s.size);
        match *self {
            GuestOp::AvailIdx(v) => g.guest_write(shadow, avail + 2, &v.to_le_bytes()),
            GuestOp::AvailSlot(slot, head) => {
                let at = avail + 4 + 2 * (u64::from(slot) % n);
                g.guest_write(shadow, at, &head.to_le_bytes())
            }
            GuestOp::Desc(i, d) => {
                let at = s.addrs.desc.raw_value() + 16 * (u64::from(i) % n);
                g.guest_write(shadow, at, &d)
            }
            GuestOp::Event(ev, flags) => {
                g.guest_write(shadow, avail + 4 + 2 * n, &ev.to_le_bytes());
                g.guest_write(shadow, avail, &flags.to_le_bytes());
            }
        }
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
    Guest(GuestOp),
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let g = Guest::decode(&mut inp);
    let s = RingSetup::decode(&g, &mut inp);
    let nops = inp.u8() % 48;
    let ops: Vec<Op> = (0..nops)
        .map(|_| match inp.u8() % 10 {
            0 | 1 => Op::Pop,
            2 => Op::CompleteOldest(inp.u32()),
            3 => Op::Complete(inp.u16(), inp.u32()),
            4 => Op::Notify,
            5 => Op::Enable,
            6 => Op::Disable,
            _ => Op::Guest(GuestOp::decode(inp.u8(), &mut inp)),
        })
        .collect();
    g.fill(inp.rest());

    let area = s.inflight_region();
    let handle = GuestMemoryHandle::new(g.mem.clone());
    let Some((mut vq, _call)) = s.start(handle, area.as_ref().map(|a| &a.0)) else {
        return;
    };
    let exact = s.inflight != InflightMode::Garbage;
    if exact {
        assert_eq!(vq.in_flight(), 0, "fresh queue with heads in flight");
    }
    let mut shadow = g.snapshot();
    let mut in_flight: Vec<u16> = Vec::new();
    let mut broken = false;
    let used = s.addrs.used.raw_value();
    for op in &ops {
        match op {
            Op::Pop => match vq.pop() {
                Ok(Some(c)) => {
                    assert!(!broken, "pop succeeded on a broken queue");
                    assert!(c.head() < s.size, "head {} out of range", c.head());
                    assert!(
                        !in_flight.contains(&c.head()),
                        "head {} popped twice",
                        c.head()
                    );
                    in_flight.push(c.head());
                }
                Ok(None) => assert!(!broken, "broken queue reported empty"),
                Err(_) => {
                    broken = true;
                    assert!(vq.is_broken());
                }
            },
            Op::CompleteOldest(_) | Op::Complete(..) => {
                let (head, len) = match *op {
                    Op::CompleteOldest(len) if !in_flight.is_empty() => (in_flight[0], len),
                    Op::CompleteOldest(_) => continue,
                    Op::Complete(h, len) => (h, len),
                    _ => unreachable!(),
                };
                let idx = g.read_u16(used + 2);
                vq.complete(head, len);
                if let Some(pos) = in_flight.iter().position(|&h| h == head) {
                    in_flight.remove(pos);
                    assert_eq!(g.read_u16(used + 2), idx.wrapping_add(1), "used idx");
                    let slot = u64::from(idx % s.size);
                    let elem = g.read_u64(used + 4 + 8 * slot);
                    assert_eq!(elem, u64::from(head) | (u64::from(len) << 32), "used elem");
                } else if exact {
                    assert_eq!(
                        g.read_u16(used + 2),
                        idx,
                        "completion of a head not in flight"
                    );
                }
            }
            Op::Notify => vq.notify(),
            Op::Enable => {
                let _ = vq.enable_notifications();
            }
            Op::Disable => vq.disable_notifications(),
            Op::Guest(gop) => gop.apply(&g, &mut shadow, &s),
        }
        if exact {
            assert_eq!(vq.in_flight() as usize, in_flight.len(), "in-flight count");
            if let Some((region, _)) = &area {
                let q = region.queue(0, s.size).expect("inflight view");
                let mut want: Vec<u16> = in_flight.clone();
                want.sort_unstable();
                assert_eq!(q.pending(), want, "inflight area disagrees");
            }
        }
    }
    let (ustart, ulen) = s.used_range();
    for a in g.changed(&shadow) {
        assert!(
            guest::contains(ustart, ulen, a),
            "device wrote guest byte {a:#x} outside the used ring"
        );
    }
    let heads: BTreeSet<u16> = in_flight.iter().copied().collect();
    assert_eq!(heads.len(), in_flight.len());
}

/// Seeds: rings at 0x0/0x80/0x100 (size 8), three chains published.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut img = Image::new();
    img.desc(0, 0, 0x400, 16, F_NEXT, 1)
        .desc(0, 1, 0x800, 512, F_NEXT | F_WRITE, 2)
        .desc(0, 2, 0xa00, 1, F_WRITE, 0)
        .desc(0, 3, 0x200, 32, F_INDIRECT, 0)
        .desc(0x200, 0, 0x400, 16, F_NEXT, 1)
        .desc(0x200, 1, 0xa00, 1, F_WRITE, 0)
        .desc(0, 4, 0x400, 16, 0, 0)
        .avail(0x80, &[0, 3, 4]);
    let mut out = Vec::new();
    for (name, features, inflight) in [
        ("plain", 0u8, false),
        ("event-idx-indirect", 3, false),
        ("event-idx-indirect-inflight", 3, true),
    ] {
        let mut s = Seed::new();
        Guest::encode(&mut s, ONE_REGION);
        RingSetup::encode(&mut s, 3, features, [0, 0x80, 0x100], inflight);
        // pop x4, complete oldest, notify, guest publishes head 0 again, pop, complete, enable.
        s.u8(12);
        s.u8(0).u8(0).u8(0).u8(0);
        s.u8(2).u32(513).u8(4);
        s.u8(8).u8(1).u16(3).u16(0); // avail slot 3 = head 0
        s.u8(7).u8(0).u16(4); // avail idx = 4
        s.u8(0).u8(2).u32(1).u8(4).u8(5);
        s.bytes(&img.0);
        out.push((name, s.finish()));
    }
    out
}
