//! The packed ring (virtio spec 2.8) behind [`VirtQueue`]: the same queue
//! type, the same guarantees as the split ring, another layout.
//!
//! One ring holds both directions: the driver makes a chain available by
//! writing its descriptors at consecutive positions and flipping the avail
//! bit of the first one to its wrap counter; the device writes one used
//! descriptor per buffer (id, bytes written, both bits equal to its own wrap
//! counter) and moves its used position by as many slots as the buffer took.
//!
//! Everything read from the ring is hostile. Each ring descriptor of a chain
//! is copied once into a local list and validated there
//! ([`DescriptorChain::from_packed`]); a chain longer than the slots the
//! driver owns (the ring size less the slots of buffers still in flight)
//! overruns the in-flight buffers and breaks the queue, as do a buffer id
//! out of range and an id already in flight (the packed form of a reused
//! head). A chain that is well delimited but invalid is completed with
//! length 0. Interrupts follow the driver's event suppression structure,
//! kicks are asked for through the device's.

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use vm_memory::{Address, GuestAddress};

use super::{QueueError, VirtQueue};
use crate::chain::{DescriptorChain, PackedDescriptor};
use crate::inflight::PackedRecordError;
use crate::memory::{load_guest, read_guest_obj, store_guest, write_guest_obj};
use crate::spec::ring::{
    VRING_DESC_F_NEXT, VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_F_WRAP_CTR, VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
};

/// Offset of `flags` in a packed descriptor.
const FLAGS_OFFSET: u64 = 14;
/// Offset of `flags` in an event suppression structure (`off_wrap` is at 0).
const EVENT_FLAGS_OFFSET: u64 = 2;

/// A position in the ring and the wrap counter that goes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pos {
    idx: u16,
    wrap: bool,
}

impl Pos {
    /// From the vring-base form: bits 0..14 the index, bit 15 the wrap counter.
    pub(super) fn decode(v: u16) -> Pos {
        Pos {
            idx: v & !VRING_PACKED_EVENT_F_WRAP_CTR,
            wrap: v & VRING_PACKED_EVENT_F_WRAP_CTR != 0,
        }
    }

    /// The vring-base form.
    pub(super) fn encode(self) -> u16 {
        self.idx
            | if self.wrap {
                VRING_PACKED_EVENT_F_WRAP_CTR
            } else {
                0
            }
    }

    /// Moves `n` (at most `size`) slots on, flipping the wrap counter at the end of the ring.
    fn advance(&mut self, n: u16, size: u16) {
        let i = u32::from(self.idx) + u32::from(n);
        if i >= u32::from(size) {
            self.idx = (i - u32::from(size)) as u16;
            self.wrap = !self.wrap;
        } else {
            self.idx = i as u16;
        }
    }

    /// The position on a line of `2 * size` slots that both wrap counters
    /// walk together: differences there are slot counts.
    fn linear(self, size: u16) -> u32 {
        u32::from(self.idx) + if self.wrap { 0 } else { u32::from(size) }
    }

    fn from_linear(l: u32, size: u16) -> Pos {
        let size32 = u32::from(size);
        let l = l % (2 * size32);
        if l >= size32 {
            Pos {
                idx: (l - size32) as u16,
                wrap: false,
            }
        } else {
            Pos {
                idx: l as u16,
                wrap: true,
            }
        }
    }
}

/// `a - b` on the line of `2 * size` slots.
fn distance(a: u32, b: u32, size: u16) -> u32 {
    let m = 2 * u32::from(size);
    (a + m - b % m) % m
}

/// Device-side state of a packed ring.
pub(super) struct PackedRing {
    /// Next position to read and the wrap counter its avail bit must equal.
    avail: Pos,
    /// Next position to write a used descriptor at, and the device's wrap counter.
    used: Pos,
    /// Ring slots each in-flight buffer id took: what its used entry moves `used` by.
    slots_of: Vec<u16>,
    /// The ring descriptors of the chain being taken (kept for the allocation).
    scratch: Vec<PackedDescriptor>,
    /// Buffers a crashed predecessor left in flight, to resubmit (their
    /// ids are in `VirtQueue::resubmit`): their ring descriptors as the
    /// inflight record kept them.
    resubmit: std::collections::HashMap<u16, Vec<PackedDescriptor>>,
}

impl PackedRing {
    /// Checks a frontend's (or the inflight record's) positions for a ring of `size`.
    pub(super) fn new(avail: u16, used: u16, size: u16) -> Result<Self, QueueError> {
        let (a, u) = (Pos::decode(avail), Pos::decode(used));
        let bad = QueueError::BadBase(u32::from(avail) | (u32::from(used) << 16));
        if a.idx >= size || u.idx >= size {
            return Err(bad);
        }
        // The device cannot have taken more than a ring ahead of what it used.
        if distance(a.linear(size), u.linear(size), size) > u32::from(size) {
            return Err(bad);
        }
        Ok(PackedRing {
            avail: a,
            used: u,
            slots_of: vec![0; usize::from(size)],
            scratch: Vec::new(),
            resubmit: std::collections::HashMap::new(),
        })
    }

    /// Slots of buffers taken and not used yet.
    fn slots_in_flight(&self, size: u16) -> u32 {
        distance(self.avail.linear(size), self.used.linear(size), size)
    }

    /// The vring base (GET_VRING_BASE): avail position and wrap counter in
    /// bits 0..15, used position and wrap counter in bits 16..31.
    pub(super) fn base(&self) -> u32 {
        u32::from(self.avail.encode()) | (u32::from(self.used.encode()) << 16)
    }

    pub(super) fn avail(&self) -> u16 {
        self.avail.encode()
    }
}

/// True when `flags` mark a descriptor the driver made available in the
/// round of wrap counter `wrap`.
fn is_avail(flags: u16, wrap: bool) -> bool {
    let avail = flags & VRING_PACKED_DESC_F_AVAIL != 0;
    let used = flags & VRING_PACKED_DESC_F_USED != 0;
    avail == wrap && used != wrap
}

impl VirtQueue {
    /// Applies what the inflight area recorded about this packed ring
    /// (see `QueueInflight::packed_record`): a crashed predecessor's used
    /// position (the frontend's base is stale then: it never saw it), a
    /// completion it published but did not record, and the buffers it left
    /// in flight, resubmitted from their recorded descriptors (their ring
    /// slots may be reused by now). A buffer of several slots whose chain
    /// was not recorded (an area without descriptor tables, made by an
    /// older daemon) cannot be, and a record that cannot be true is not
    /// acted on: the queue does not start then (see `docs/architecture.md`).
    pub(super) fn recover_packed(&mut self, features: u64) -> Result<(), QueueError> {
        let size = self.size;
        let index = self.index;
        let mem = self.map();
        let (Some(p), Some(inf)) = (self.packed.as_ref(), self.inflight.as_mut()) else {
            return Ok(());
        };
        let rec = match inf.packed_record(features, p.used.encode()) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ok(()),
            Err(e) => {
                crate::rate_limited!(
                    log::Level::Error,
                    "queue {index}: the packed ring's inflight record is corrupt ({e}): the queue does not start"
                );
                return Err(QueueError::PackedRecordCorrupt(e));
            }
        };
        let mut used = Pos::decode(rec.used);
        if used.idx >= size {
            return Err(QueueError::BadBase(u32::from(rec.used) << 16));
        }
        let mut in_flight = rec.in_flight;
        // One completion may have reached the ring and not the record: its
        // used descriptor sits at the recorded position, with the device's
        // wrap counter in both bits.
        let at = self.addrs.desc.unchecked_add(16 * u64::from(used.idx));
        if let Some(d) = read_guest_obj::<PackedDescriptor>(&mem, at) {
            let both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;
            let want = if used.wrap { both } else { 0 };
            let slots = inf.packed_slots(d.id);
            if d.flags & both == want && d.id < size && slots != 0 {
                in_flight.retain(|e| e.id != d.id);
                inf.packed_used(d.id, {
                    used.advance(slots, size);
                    used.encode()
                });
            }
        }
        let lost = in_flight.iter().filter(|e| e.descs.is_empty()).count() as u32;
        if lost != 0 {
            let why = if inf.has_table() {
                "their descriptors were not recorded"
            } else {
                "the inflight area has no descriptor table: an older daemon made it"
            };
            crate::rate_limited!(
                log::Level::Error,
                "queue {index}: {lost} packed buffer(s) of several ring slots were in flight and cannot be resubmitted ({why}): the queue does not start"
            );
            return Err(QueueError::PackedInFlightLost(lost));
        }
        let total: u32 = in_flight.iter().map(|e| u32::from(e.slots)).sum();
        if total > u32::from(size) {
            let e = PackedRecordError::TooManySlots(total, size);
            crate::rate_limited!(
                log::Level::Error,
                "queue {index}: the packed ring's inflight record is corrupt ({e}): the queue does not start"
            );
            return Err(QueueError::PackedRecordCorrupt(e));
        }
        let mut avail = used;
        avail.advance(total as u16, size);
        let from = self.vring_base();
        let mut ring = PackedRing::new(avail.encode(), used.encode(), size)?;
        let resubmitted = in_flight.len();
        for e in in_flight {
            self.heads.insert(e.id);
            ring.slots_of[usize::from(e.id)] = e.slots;
            self.resubmit.push_back(e.id);
            ring.resubmit.insert(e.id, e.descs);
        }
        self.packed = Some(ring);
        if self.vring_base() != from || resubmitted != 0 {
            crate::rate_limited!(
                log::Level::Info,
                "queue {}: packed ring resumes at {:#x} (inflight record, not {from:#x}), resubmitting {resubmitted} buffer(s)",
                self.index,
                self.vring_base(),
            );
        }
        Ok(())
    }

    fn desc_addr(&self, idx: u16) -> GuestAddress {
        self.addrs.desc.unchecked_add(16 * u64::from(idx))
    }

    pub(super) fn has_pending_packed(&self) -> bool {
        let Some(p) = self.packed.as_ref() else {
            return false;
        };
        if !self.resubmit.is_empty() {
            return true;
        }
        let mem = self.map();
        let addr = self.desc_addr(p.avail.idx).unchecked_add(FLAGS_OFFSET);
        matches!(load_guest::<u16>(&mem, addr, Ordering::Acquire), Some(f) if is_avail(f, p.avail.wrap))
    }

    pub(super) fn pop_packed(&mut self) -> Result<Option<DescriptorChain>, QueueError> {
        let mem = self.memory();
        let size = self.size;
        loop {
            if self.budget == 0 {
                self.exhausted = true;
                return Ok(None);
            }
            self.budget -= 1;
            let Some(p) = self.packed.as_mut() else {
                return Err(QueueError::Broken);
            };
            if let Some(id) = self.resubmit.pop_front() {
                let Some(descs) = p.resubmit.remove(&id) else {
                    continue;
                };
                self.stats.chains.fetch_add(1, Ordering::Relaxed);
                // The same validation as a chain read from the ring.
                let chain = DescriptorChain::from_packed(
                    mem.clone(),
                    id,
                    &descs,
                    self.limits,
                    self.max_descriptors,
                );
                match chain {
                    Ok(chain) => return Ok(Some(chain)),
                    Err(e) => {
                        self.bad_chain(id, e);
                        continue;
                    }
                }
            }
            let start = p.avail;
            let first = self.addrs.desc.unchecked_add(16 * u64::from(start.idx));
            let flags: u16 = load_guest(&mem, first.unchecked_add(FLAGS_OFFSET), Ordering::Acquire)
                .ok_or(QueueError::Memory)?;
            if !is_avail(flags, start.wrap) {
                return Ok(None);
            }
            // Slots the driver owns: those of buffers in flight are not its.
            let room = u32::from(size) - p.slots_in_flight(size).min(u32::from(size));
            let mut ring = std::mem::take(&mut p.scratch);
            ring.clear();
            let mut idx = start.idx;
            let mut overrun = false;
            loop {
                if ring.len() as u32 >= room {
                    overrun = true;
                    break;
                }
                let addr = self.addrs.desc.unchecked_add(16 * u64::from(idx));
                let Some(d) = read_guest_obj::<PackedDescriptor>(&mem, addr) else {
                    p.scratch = ring;
                    return Err(self.fail(QueueError::Memory));
                };
                ring.push(d);
                if d.flags & VRING_DESC_F_NEXT == 0 {
                    break;
                }
                idx = if idx + 1 == size { 0 } else { idx + 1 };
            }
            if overrun {
                p.scratch = ring;
                return Err(self.fail(QueueError::ChainOverrun(room)));
            }
            let slots = ring.len() as u16;
            let id = ring.last().map_or(0, |d| d.id);
            if id >= size {
                p.scratch = ring;
                return Err(self.fail(QueueError::HeadOutOfRange(id)));
            }
            if !self.heads.insert(id) {
                p.scratch = ring;
                return Err(self.fail(QueueError::HeadInFlight(id)));
            }
            p.slots_of[usize::from(id)] = slots;
            self.taken_at[usize::from(id)] = Some(Wrapping(start.linear(size) as u16));
            p.avail.advance(slots, size);
            if let Some(inf) = self.inflight.as_mut() {
                inf.packed_begin(id, &ring);
            }
            self.stats.chains.fetch_add(1, Ordering::Relaxed);
            let chain = DescriptorChain::from_packed(
                mem.clone(),
                id,
                &ring,
                self.limits,
                self.max_descriptors,
            );
            if let Some(p) = self.packed.as_mut() {
                p.scratch = ring;
            }
            match chain {
                Ok(chain) => return Ok(Some(chain)),
                Err(e) => self.bad_chain(id, e),
            }
        }
    }

    pub(super) fn complete_packed(&mut self, id: u16, len: u32) {
        if id >= self.size || !self.heads.remove(id) {
            crate::rate_limited!(
                log::Level::Warn,
                "queue {}: completion for buffer {id} that is not in flight",
                self.index
            );
            return;
        }
        self.taken_at[usize::from(id)] = None;
        let mem = self.map();
        let size = self.size;
        let Some(p) = self.packed.as_mut() else {
            return;
        };
        // A resubmitted buffer completed before it was taken again is not
        // handed out afterwards.
        p.resubmit.remove(&id);
        let at = self.addrs.desc.unchecked_add(16 * u64::from(p.used.idx));
        let flags = if p.used.wrap {
            VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
        } else {
            0
        };
        // Id and length first; the flags publish them.
        let ok = write_guest_obj(&mem, len, at.unchecked_add(8))
            && write_guest_obj(&mem, id, at.unchecked_add(12))
            && store_guest(
                &mem,
                flags,
                at.unchecked_add(FLAGS_OFFSET),
                Ordering::Release,
            );
        p.used.advance(p.slots_of[usize::from(id)], size);
        let used = p.used.encode();
        if !ok {
            let _ = self.fail(QueueError::Memory);
            return;
        }
        if let Some(d) = self.logging() {
            d.mark(at.raw_value(), 16);
        }
        if let Some(inf) = self.inflight.as_mut() {
            inf.packed_used(id, used);
        }
    }

    pub(super) fn notify_packed(&mut self) {
        let size = self.size;
        let Some(p) = self.packed.as_ref() else {
            return;
        };
        let new = p.used.linear(size);
        let now = Some(Wrapping(new as u16));
        if self.signalled_used == now {
            return;
        }
        let Some(old) = self.signalled_used.replace(Wrapping(new as u16)) else {
            // First decision since the queue started: always interrupt (see `notify`).
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            self.call.signal();
            return;
        };
        let mem = self.map();
        fence(Ordering::SeqCst);
        let Some(event) = load_guest::<u32>(&mem, self.addrs.avail, Ordering::Acquire) else {
            return;
        };
        let (off_wrap, flags) = (event as u16, (event >> 16) as u16);
        let needed = match flags {
            VRING_PACKED_EVENT_FLAG_DISABLE => false,
            VRING_PACKED_EVENT_FLAG_DESC if self.event_idx => {
                // Interrupt when a used descriptor went at or past the
                // position the driver named, since the last decision.
                let ev = Pos::decode(off_wrap);
                let ev = u32::from(ev.idx) + if ev.wrap { 0 } else { u32::from(size) };
                distance(new, ev + 1, size) < distance(new, u32::from(old.0), size)
            }
            // ENABLE, and values a driver has no business writing: a spurious
            // interrupt is harmless, a missing one hangs the guest.
            _ => true,
        };
        if needed {
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            self.call.signal();
        }
    }

    pub(super) fn disable_notifications_packed(&mut self) {
        if !self.event_idx {
            let at = self.addrs.used.unchecked_add(EVENT_FLAGS_OFFSET);
            let _ = store_guest(
                &self.map(),
                VRING_PACKED_EVENT_FLAG_DISABLE,
                at,
                Ordering::Relaxed,
            );
            self.log_used(EVENT_FLAGS_OFFSET, 2);
        }
    }

    pub(super) fn enable_notifications_packed(&mut self) -> Result<bool, QueueError> {
        let Some(p) = self.packed.as_ref() else {
            return Err(QueueError::Broken);
        };
        let mem = self.map();
        let flags_at = self.addrs.used.unchecked_add(EVENT_FLAGS_OFFSET);
        let stored = if self.event_idx {
            store_guest(&mem, p.avail.encode(), self.addrs.used, Ordering::Relaxed)
                && store_guest(
                    &mem,
                    VRING_PACKED_EVENT_FLAG_DESC,
                    flags_at,
                    Ordering::Release,
                )
        } else {
            store_guest(
                &mem,
                VRING_PACKED_EVENT_FLAG_ENABLE,
                flags_at,
                Ordering::Relaxed,
            )
        };
        self.log_used(0, 4);
        if !stored {
            return Err(QueueError::Memory);
        }
        fence(Ordering::SeqCst);
        drop(mem);
        Ok(self.has_pending_packed())
    }

    /// [`VirtQueue::ring_state`] for a packed ring.
    pub(super) fn ring_state_packed(&self) -> String {
        let Some(p) = self.packed.as_ref() else {
            return "packed: no ring".into();
        };
        let mem = self.map();
        let flags = |idx: u16| {
            load_guest::<u16>(
                &mem,
                self.desc_addr(idx).unchecked_add(FLAGS_OFFSET),
                Ordering::Acquire,
            )
        };
        let event = |a: GuestAddress| {
            load_guest::<u32>(&mem, a, Ordering::Acquire)
                .map(|v| format!("off_wrap {:#06x} flags {}", v as u16, v >> 16))
        };
        format!(
            "packed: avail {:#06x} (flags there {:?}), used {:#06x} (flags there {:?}), \
             driver event {:?}, device event {:?}, event_idx {}, signalled {:?}, in flight {}",
            p.avail.encode(),
            flags(p.avail.idx),
            p.used.encode(),
            flags(p.used.idx),
            event(self.addrs.avail),
            event(self.addrs.used),
            self.event_idx,
            self.signalled_used.map(|w| w.0),
            self.heads.count(),
        )
    }

    pub(super) fn give_back_packed(&mut self, heads: &[u16]) -> Vec<u16> {
        let size = self.size;
        let mut left: Vec<u16> = heads.to_vec();
        while let Some(p) = self.packed.as_mut() {
            let want = p.avail.linear(size);
            let Some(i) = left.iter().position(|&h| {
                let taken = self.taken_at.get(usize::from(h)).copied().flatten();
                let slots = p.slots_of.get(usize::from(h)).copied().unwrap_or(0);
                taken.is_some_and(|t| distance(want, u32::from(t.0), size) == u32::from(slots))
            }) else {
                break;
            };
            let id = left.swap_remove(i);
            if !self.heads.remove(id) {
                left.push(id);
                break;
            }
            let Some(t) = self.taken_at[usize::from(id)].take() else {
                break;
            };
            p.avail = Pos::from_linear(u32::from(t.0), size);
            if let Some(inf) = self.inflight.as_mut() {
                inf.packed_abort(id);
            }
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddressSpace};
    use vmm_sys_util::eventfd::EventFd;

    use crate::inflight::InflightRegion;
    use crate::memory::GuestMemoryHandle;
    use crate::memory::tests::single_region;
    use crate::spec::ring::{
        VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
        VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE,
    };
    use crate::virtqueue::{CallSlot, QueueConfig, RingAddrs};

    const SIZE: u16 = 8;
    const RING: u64 = 0x1000;
    const DRIVER: u64 = 0x2000;
    const DEVICE: u64 = 0x3000;

    /// A driver's side of one packed ring in test memory, honest unless told otherwise.
    struct Driver {
        mem: GuestMemoryHandle,
        pos: Pos,
    }

    impl Driver {
        fn new() -> Self {
            Driver {
                mem: GuestMemoryHandle::new(single_region(0x20000)),
                pos: Pos { idx: 0, wrap: true },
            }
        }

        fn write(&self, idx: u16, d: PackedDescriptor) {
            self.mem
                .memory()
                .write_obj(d, GuestAddress(RING + 16 * u64::from(idx)))
                .unwrap();
        }

        /// Makes buffer `id` available: `(addr, len, flags)` per descriptor,
        /// NEXT added to all but the last, the first one's flags written last.
        fn offer(&mut self, id: u16, bufs: &[(u64, u32, u16)]) {
            let first = self.pos;
            let mut first_flags = 0;
            for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
                // Each descriptor's bits follow the wrap counter at its own slot.
                let avail = if self.pos.wrap {
                    VRING_PACKED_DESC_F_AVAIL
                } else {
                    VRING_PACKED_DESC_F_USED
                };
                let next = if i + 1 < bufs.len() {
                    VRING_DESC_F_NEXT
                } else {
                    0
                };
                let d = PackedDescriptor {
                    addr,
                    len,
                    id,
                    flags: flags | next | avail,
                };
                if i == 0 {
                    first_flags = d.flags;
                    // Not available yet, in either round.
                    let hidden = if first.wrap {
                        0
                    } else {
                        VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
                    };
                    self.write(self.pos.idx, PackedDescriptor { flags: hidden, ..d });
                } else {
                    self.write(self.pos.idx, d);
                }
                self.pos.advance(1, SIZE);
            }
            self.mem
                .memory()
                .write_obj(
                    first_flags,
                    GuestAddress(RING + 16 * u64::from(first.idx) + 14),
                )
                .unwrap();
        }

        /// The used descriptor at ring position `idx`: (id, len, flags).
        fn used_at(&self, idx: u16) -> (u16, u32, u16) {
            let d: PackedDescriptor = self
                .mem
                .memory()
                .read_obj(GuestAddress(RING + 16 * u64::from(idx)))
                .unwrap();
            (d.id, d.len, d.flags)
        }

        fn set_driver_event(&self, off_wrap: u16, flags: u16) {
            let m = self.mem.memory();
            m.write_obj(off_wrap, GuestAddress(DRIVER)).unwrap();
            m.write_obj(flags, GuestAddress(DRIVER + 2)).unwrap();
        }

        fn device_event(&self) -> (u16, u16) {
            let m = self.mem.memory();
            (
                m.read_obj(GuestAddress(DEVICE)).unwrap(),
                m.read_obj(GuestAddress(DEVICE + 2)).unwrap(),
            )
        }

        fn start(
            &self,
            features: u64,
            base: u32,
            inflight: Option<crate::inflight::QueueInflight>,
        ) -> Result<(VirtQueue, EventFd), QueueError> {
            let call = Arc::new(CallSlot::default());
            let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            call.set(Some(efd.try_clone().unwrap()));
            let cfg = QueueConfig {
                index: 0,
                size: SIZE,
                addrs: RingAddrs {
                    desc: GuestAddress(RING),
                    avail: GuestAddress(DRIVER),
                    used: GuestAddress(DEVICE),
                },
                next_avail: base as u16,
                used_base: (base >> 16) as u16,
                features: features | VIRTIO_F_RING_PACKED,
                max_chain_bytes: 1 << 20,
            };
            let q = VirtQueue::start(
                cfg,
                self.mem.clone(),
                call,
                None,
                inflight,
                Default::default(),
            )?;
            Ok((q, efd))
        }

        fn queue(&self, features: u64) -> (VirtQueue, EventFd) {
            self.start(features, 0x8000_8000, None).unwrap()
        }
    }

    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE;

    #[test]
    fn positions_wrap_and_measure_across_the_wrap() {
        let size = 8;
        let mut p = Pos::decode(0x8000 | 6);
        assert_eq!(p, Pos { idx: 6, wrap: true });
        p.advance(3, size);
        assert_eq!(
            p,
            Pos {
                idx: 1,
                wrap: false
            }
        );
        assert_eq!(p.encode(), 1);
        assert_eq!(
            distance(p.linear(size), Pos::decode(0x8006).linear(size), size),
            3
        );
        p.advance(8, size);
        assert_eq!(p, Pos { idx: 1, wrap: true });
        assert_eq!(Pos::from_linear(p.linear(size), size), p);
        assert_eq!(
            Pos::from_linear(9, size),
            Pos {
                idx: 1,
                wrap: false
            }
        );
    }

    #[test]
    fn a_base_more_than_a_ring_ahead_is_refused() {
        assert!(PackedRing::new(0x8000, 0x8000, 8).is_ok());
        // avail 4 in the second round, used 3 in the first: 9 slots apart.
        assert!(PackedRing::new(4, 0x8003, 8).is_err());
        assert!(PackedRing::new(0x8008, 0x8000, 8).is_err());
        assert!(PackedRing::new(3, 0x8003, 8).is_ok());
        let d = Driver::new();
        assert_eq!(
            d.start(0, 0x8009_8000, None).err(),
            Some(QueueError::BadBase(0x8009_8000))
        );
        // A 16-bit base (the `vhost` crate's frontends, DPDK): used = avail.
        let (q, _) = d.start(0, 0x8003, None).unwrap();
        assert_eq!(q.vring_base(), 0x8003_8003);
        let (q, _) = d.start(0, 0x8005_0003, None).unwrap();
        assert_eq!(q.vring_base(), 0x8005_0003);
    }

    #[test]
    fn chains_are_taken_and_used_across_many_wraps() {
        let mut d = Driver::new();
        let (mut q, efd) = d.queue(0);
        let mut used = Pos { idx: 0, wrap: true };
        for round in 0..20u16 {
            // Buffers of 1, 2 and 3 descriptors, so positions wrap mid-chain.
            let n = 1 + round % 3;
            let id = round % SIZE;
            let bufs: Vec<_> = (0..n)
                .map(|i| {
                    (
                        0x5000 + 0x100 * u64::from(i),
                        16,
                        if i + 1 == n { W } else { R },
                    )
                })
                .collect();
            d.offer(id, &bufs);
            let c = q.pop().unwrap().unwrap();
            assert_eq!(c.head(), id);
            assert_eq!(c.descriptors().len(), usize::from(n));
            assert_eq!(c.writable_len(), 16);
            assert!(q.pop().unwrap().is_none(), "round {round}");
            q.complete(id, 7);
            let flags = if used.wrap {
                VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
            } else {
                0
            };
            assert_eq!(d.used_at(used.idx), (id, 7, flags), "round {round}");
            used.advance(n, SIZE);
            assert_eq!(
                q.vring_base(),
                u32::from(d.pos.encode()) | u32::from(used.encode()) << 16
            );
        }
        q.notify();
        assert_eq!(efd.read().unwrap(), 1);
    }

    #[test]
    fn the_chain_is_a_snapshot_the_driver_cannot_change() {
        let mut d = Driver::new();
        d.offer(2, &[(0x5000, 16, R), (0x6000, 32, W)]);
        let (mut q, _) = d.queue(0);
        let c = q.pop().unwrap().unwrap();
        d.write(
            1,
            PackedDescriptor {
                addr: 0xffff_0000,
                len: 9999,
                id: 2,
                flags: W,
            },
        );
        assert_eq!(c.descriptors()[1].addr, GuestAddress(0x6000));
        assert_eq!(c.descriptors()[1].len, 32);
    }

    #[test]
    fn a_buffer_id_in_flight_or_out_of_range_breaks_the_queue() {
        let mut d = Driver::new();
        d.offer(3, &[(0x5000, 16, R)]);
        d.offer(3, &[(0x5000, 16, R)]);
        let (mut q, _) = d.queue(0);
        assert!(q.pop().unwrap().is_some());
        assert_eq!(q.pop().unwrap_err(), QueueError::HeadInFlight(3));
        assert!(q.is_broken());
        assert_eq!(q.pop().unwrap_err(), QueueError::Broken);

        let mut d = Driver::new();
        d.offer(SIZE, &[(0x5000, 16, R)]);
        let (mut q, _) = d.queue(0);
        assert_eq!(q.pop().unwrap_err(), QueueError::HeadOutOfRange(SIZE));
    }

    #[test]
    fn a_chain_without_end_or_into_buffers_in_flight_breaks_the_queue() {
        // Every slot has NEXT: the chain would loop around the ring.
        let d = Driver::new();
        for i in 0..SIZE {
            let flags = VRING_DESC_F_NEXT | VRING_PACKED_DESC_F_AVAIL;
            d.write(
                i,
                PackedDescriptor {
                    addr: 0x5000,
                    len: 16,
                    id: 0,
                    flags,
                },
            );
        }
        let (mut q, _) = d.queue(0);
        assert_eq!(
            q.pop().unwrap_err(),
            QueueError::ChainOverrun(u32::from(SIZE))
        );

        // Six slots in flight; a chain of three overruns the two left.
        let mut d = Driver::new();
        d.offer(0, &[(0x5000, 16, R); 6]);
        let (mut q, _) = d.queue(0);
        assert!(q.pop().unwrap().is_some());
        d.offer(1, &[(0x5000, 16, R); 3]);
        assert_eq!(q.pop().unwrap_err(), QueueError::ChainOverrun(2));
    }

    #[test]
    fn an_invalid_chain_is_used_with_zero_and_skipped() {
        let mut d = Driver::new();
        d.offer(4, &[(0x5000, 16, W), (0x5000, 16, R)]);
        d.offer(5, &[(0xffff_ffff_0000, 16, R)]);
        // Indirect without the feature.
        d.offer(6, &[(0x7000, 32, VRING_DESC_F_INDIRECT)]);
        d.offer(1, &[(0x5000, 16, R)]);
        let (mut q, _) = d.queue(0);
        assert_eq!(q.pop().unwrap().unwrap().head(), 1);
        assert_eq!(q.stats().bad_chains.load(Ordering::Relaxed), 3);
        let both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;
        // Used entries at 0, 2 (the first buffer took two slots) and 3.
        assert_eq!(d.used_at(0), (4, 0, both));
        assert_eq!(d.used_at(2), (5, 0, both));
        assert_eq!(d.used_at(3), (6, 0, both));
        assert_eq!(q.in_flight(), 1);
    }

    #[test]
    fn indirect_tables_are_read_once_and_must_stand_alone() {
        let mut d = Driver::new();
        let m = d.mem.memory();
        let entry = |addr, len, flags| PackedDescriptor {
            addr,
            len,
            id: 0,
            flags,
        };
        m.write_obj(entry(0x5000, 16, R), GuestAddress(0x7000))
            .unwrap();
        m.write_obj(entry(0x6000, 64, W), GuestAddress(0x7010))
            .unwrap();
        // A nested table.
        m.write_obj(
            entry(0x7000, 32, VRING_DESC_F_INDIRECT),
            GuestAddress(0x8000),
        )
        .unwrap();
        drop(m);
        d.offer(2, &[(0x7000, 32, VRING_DESC_F_INDIRECT)]);
        d.offer(3, &[(0x5000, 16, R), (0x7000, 32, VRING_DESC_F_INDIRECT)]);
        d.offer(4, &[(0x8000, 16, VRING_DESC_F_INDIRECT)]);
        d.offer(5, &[(0x7000, 24, VRING_DESC_F_INDIRECT)]);
        let (mut q, _) = d.queue(VIRTIO_RING_F_INDIRECT_DESC);
        let c = q.pop().unwrap().unwrap();
        assert_eq!((c.head(), c.readable_len(), c.writable_len()), (2, 16, 64));
        assert!(q.pop().unwrap().is_none());
        assert_eq!(q.stats().bad_chains.load(Ordering::Relaxed), 3);
        // The three refused ones used their slots: 2, 1 and 1 after the first.
        let both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;
        assert_eq!(d.used_at(0), (3, 0, both));
        assert_eq!(d.used_at(2), (4, 0, both));
        assert_eq!(d.used_at(3), (5, 0, both));
    }

    #[test]
    fn ring_state_names_positions_and_both_event_structures() {
        let mut d = Driver::new();
        for id in 0..2 {
            d.offer(id, &[(0x5000, 16, W)]);
        }
        let (mut q, _efd) = d.queue(VIRTIO_RING_F_EVENT_IDX);
        let id = q.pop().unwrap().unwrap().head();
        q.complete(id, 0);
        d.set_driver_event(0x8001, VRING_PACKED_EVENT_FLAG_DESC);
        let s = q.ring_state();
        // One taken and used; the second offered at slot 1 (AVAIL, WRITE), not taken.
        assert!(s.contains("avail 0x8001 (flags there Some(130))"), "{s}");
        assert!(s.contains("used 0x8001"), "{s}");
        assert!(
            s.contains("driver event Some(\"off_wrap 0x8001 flags 2\")"),
            "{s}"
        );
        assert!(s.contains("in flight 0"), "{s}");
    }

    #[test]
    fn driver_event_suppression_decides_interrupts() {
        let mut d = Driver::new();
        for id in 0..4 {
            d.offer(id, &[(0x5000, 16, W)]);
        }
        let (mut q, efd) = d.queue(0);
        let ids: Vec<u16> = (0..4).map(|_| q.pop().unwrap().unwrap().head()).collect();
        q.notify(); // first decision after a start
        assert_eq!(efd.read().unwrap(), 1);
        d.set_driver_event(0, VRING_PACKED_EVENT_FLAG_DISABLE);
        q.complete(ids[0], 0);
        q.notify();
        assert!(efd.read().is_err());
        d.set_driver_event(0, VRING_PACKED_EVENT_FLAG_ENABLE);
        q.complete(ids[1], 0);
        q.notify();
        assert_eq!(efd.read().unwrap(), 1);
        q.notify(); // nothing used since
        assert!(efd.read().is_err());
    }

    #[test]
    fn event_idx_interrupts_once_the_named_descriptor_is_used() {
        let mut d = Driver::new();
        for id in 0..6 {
            d.offer(id, &[(0x5000, 16, W)]);
        }
        let (mut q, efd) = d.queue(VIRTIO_RING_F_EVENT_IDX);
        let ids: Vec<u16> = (0..6).map(|_| q.pop().unwrap().unwrap().head()).collect();
        q.notify();
        assert_eq!(efd.read().unwrap(), 1);
        // Interrupt when the used descriptor at position 3 (first round) is written.
        d.set_driver_event(0x8000 | 3, VRING_PACKED_EVENT_FLAG_DESC);
        for &id in &ids[..3] {
            q.complete(id, 0);
            q.notify();
            assert!(efd.read().is_err());
        }
        q.complete(ids[3], 0);
        q.notify();
        assert_eq!(efd.read().unwrap(), 1);
        // The device asks for a kick at its avail position, with its wrap counter.
        d.offer(6, &[(0x5000, 16, W)]);
        assert!(q.enable_notifications().unwrap());
        assert_eq!(d.device_event(), (0x8000 | 6, VRING_PACKED_EVENT_FLAG_DESC));
        assert!(q.pop().unwrap().is_some());
        assert!(!q.enable_notifications().unwrap());
        assert_eq!(d.device_event(), (0x8000 | 7, VRING_PACKED_EVENT_FLAG_DESC));
    }

    #[test]
    fn device_event_suppression_without_event_idx() {
        let d = Driver::new();
        let (mut q, _) = d.queue(0);
        q.disable_notifications();
        assert_eq!(d.device_event().1, VRING_PACKED_EVENT_FLAG_DISABLE);
        assert!(!q.enable_notifications().unwrap());
        assert_eq!(d.device_event().1, VRING_PACKED_EVENT_FLAG_ENABLE);
        assert!(!q.has_pending());
    }

    #[test]
    fn buffers_given_back_are_taken_again_in_order() {
        let mut d = Driver::new();
        d.offer(0, &[(0x5000, 16, W)]);
        d.offer(1, &[(0x5000, 16, R), (0x6000, 16, W)]);
        d.offer(2, &[(0x5000, 16, W)]);
        let (mut q, _) = d.queue(0);
        for _ in 0..3 {
            q.pop().unwrap().unwrap();
        }
        q.complete(0, 4);
        assert!(q.give_back(&[2, 1]).is_empty());
        assert_eq!(q.vring_base(), 0x8001_8001);
        assert_eq!(q.in_flight(), 0);
        let again: Vec<u16> = (0..2).map(|_| q.pop().unwrap().unwrap().head()).collect();
        assert_eq!(again, [1, 2]);
        // One used after another was taken cannot go back.
        q.complete(2, 0);
        assert_eq!(q.give_back(&[1]), [1]);
    }

    #[test]
    fn without_descriptor_tables_a_restart_resubmits_one_slot_buffers_and_refuses_longer_ones() {
        let (region, _file) = InflightRegion::create(1, SIZE).unwrap();
        let mut d = Driver::new();
        for id in 0..3 {
            d.offer(id, &[(0x5000, 16, W), (0x6000, 16, W)]);
        }
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        for _ in 0..3 {
            let c = q.pop().unwrap().unwrap();
            q.complete(c.head(), 1);
        }
        // A one-slot buffer in flight at the kill; then the driver reuses
        // its slot (as it may once later buffers are used there).
        d.offer(3, &[(0x7000, 64, W)]);
        assert_eq!(q.pop().unwrap().unwrap().head(), 3);
        drop(q);
        d.write(6, PackedDescriptor::default());
        // The frontend's base is stale (it never heard of these buffers).
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        assert_eq!(q.vring_base(), 0x8006_8007);
        let c = q.pop().unwrap().unwrap();
        assert_eq!(c.head(), 3);
        assert_eq!(c.descriptors()[0].addr, GuestAddress(0x7000));
        assert_eq!(c.writable_len(), 64);
        assert!(q.pop().unwrap().is_none());
        q.complete(3, 5);
        let both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;
        assert_eq!(d.used_at(6), (3, 5, both));
        assert_eq!(q.vring_base(), 0x8007_8007);

        // A buffer of three slots cannot be: the queue does not start.
        d.offer(4, &[(0x5000, 16, W); 3]);
        assert_eq!(q.pop().unwrap().unwrap().head(), 4);
        drop(q);
        let r = d.start(0, 0x8007_8007, region.queue(0, SIZE));
        assert_eq!(r.err(), Some(QueueError::PackedInFlightLost(1)));
    }

    const WITH_TABLES: crate::inflight::AreaParts = crate::inflight::AreaParts {
        state: false,
        packed_tables: true,
    };

    /// Offset of entry `e` of the only queue's descriptor table in an area
    /// made with [`WITH_TABLES`] (after the queue's part and the tables' 64-byte header).
    fn table_entry_off(e: u16) -> u64 {
        (crate::inflight::queue_region_size(SIZE) + 64 + 16 * usize::from(e)) as u64
    }

    /// The head entry the record names for buffer `id`.
    fn head_entry(file: &std::fs::File, id: u16) -> u16 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 2];
        file.read_exact_at(&mut b, 16 + 16 * u64::from(id) + 2)
            .unwrap();
        u16::from_le_bytes(b)
    }

    #[test]
    fn a_restart_resubmits_multi_slot_chains_once_though_their_slots_were_reused() {
        let (region, _file) = InflightRegion::create_with(1, SIZE, WITH_TABLES).unwrap();
        let mut d = Driver::new();
        // Two buffers of three and two slots, one of one slot.
        d.offer(5, &[(0x5000, 16, R), (0x6000, 512, W), (0x7000, 1, W)]);
        d.offer(1, &[(0x5100, 16, R), (0x7100, 1, W)]);
        d.offer(2, &[(0x7200, 64, W)]);
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        for want in [5, 1, 2] {
            assert_eq!(q.pop().unwrap().unwrap().head(), want);
        }
        // The one-slot buffer completes: its used descriptor goes to slot 0,
        // over the first buffer's first descriptor.
        q.complete(2, 64);
        drop(q); // SIGKILL
        // The driver reuses the slots (count-wise it owns all but five):
        // nothing of the two chains is left in the ring.
        for i in 1..SIZE {
            d.write(
                i,
                PackedDescriptor {
                    addr: 0xdead_0000,
                    len: 7,
                    id: 6,
                    flags: VRING_DESC_F_NEXT,
                },
            );
        }
        // The frontend's base is stale (it never heard of these buffers).
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        assert_eq!(
            q.vring_base(),
            0x8001_8006,
            "used at 1, five slots in flight"
        );
        let a = q.pop().unwrap().unwrap();
        assert_eq!(a.head(), 1);
        assert_eq!(
            (a.descriptors().len(), a.readable_len(), a.writable_len()),
            (2, 16, 1)
        );
        assert_eq!(a.descriptors()[0].addr, GuestAddress(0x5100));
        let b = q.pop().unwrap().unwrap();
        assert_eq!(b.head(), 5);
        assert_eq!(
            (b.descriptors().len(), b.readable_len(), b.writable_len()),
            (3, 16, 513)
        );
        assert_eq!(b.descriptors()[1].addr, GuestAddress(0x6000));
        // Each once: nothing else is taken (the ring holds nothing available).
        assert!(q.pop().unwrap().is_none());
        q.complete(5, 513);
        q.complete(1, 1);
        let both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;
        assert_eq!(d.used_at(1), (5, 513, both));
        assert_eq!(d.used_at(4), (1, 1, both));
        assert_eq!(q.vring_base(), 0x8006_8006);
        // Their entries are free again: more chains are kept and recovered.
        d.pos = Pos { idx: 6, wrap: true };
        d.offer(3, &[(0x5000, 16, R), (0x6000, 16, W), (0x7000, 1, W)]);
        d.offer(4, &[(0x5000, 16, R), (0x6000, 16, W), (0x7000, 1, W)]);
        assert_eq!(q.pop().unwrap().unwrap().head(), 3);
        assert_eq!(q.pop().unwrap().unwrap().head(), 4);
        drop(q);
        let (mut q, _) = d.start(0, 0x8006_8006, region.queue(0, SIZE)).unwrap();
        let mut again = [q.pop().unwrap().unwrap(), q.pop().unwrap().unwrap()]
            .map(|c| (c.head(), c.descriptors().len()));
        again.sort_unstable();
        assert_eq!(again, [(3, 3), (4, 3)]);
        assert!(q.pop().unwrap().is_none());
    }

    #[test]
    fn a_recorded_chain_is_validated_as_one_read_from_the_ring() {
        use std::os::unix::fs::FileExt;
        let (region, file) = InflightRegion::create_with(1, SIZE, WITH_TABLES).unwrap();
        let mut d = Driver::new();
        d.offer(3, &[(0x5000, 16, R), (0x6000, 16, W)]);
        d.offer(4, &[(0x5000, 16, R), (0x6000, 16, W)]);
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        q.pop().unwrap().unwrap();
        q.pop().unwrap().unwrap();
        drop(q);
        // The area is the frontend's: buffer 3's data descriptor now points
        // outside guest memory.
        let head = head_entry(&file, 3);
        let mut e = [0u8; 16];
        file.read_exact_at(&mut e, table_entry_off(head)).unwrap();
        let second = u16::from_le_bytes([e[14], e[15]]);
        file.write_all_at(&0xffff_ffff_0000u64.to_le_bytes(), table_entry_off(second))
            .unwrap();
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        // Refused as a ring chain would be (used with length 0), the other resubmitted.
        assert_eq!(q.pop().unwrap().unwrap().head(), 4);
        assert_eq!(q.stats().bad_chains.load(Ordering::Relaxed), 1);
        let both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;
        assert_eq!(d.used_at(0), (3, 0, both));
        assert!(q.pop().unwrap().is_none());
    }

    #[test]
    fn a_corrupt_table_keeps_the_queue_from_starting() {
        use std::os::unix::fs::FileExt;
        let (region, file) = InflightRegion::create_with(1, SIZE, WITH_TABLES).unwrap();
        let mut d = Driver::new();
        d.offer(3, &[(0x5000, 16, R), (0x5000, 16, R), (0x6000, 16, W)]);
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        q.pop().unwrap().unwrap();
        drop(q);
        // Its head links to itself: a cycle.
        let head = head_entry(&file, 3);
        file.write_all_at(&head.to_le_bytes(), table_entry_off(head) + 14)
            .unwrap();
        let r = d.start(0, 0x8000_8000, region.queue(0, SIZE));
        assert_eq!(
            r.err(),
            Some(QueueError::PackedRecordCorrupt(
                crate::inflight::PackedRecordError::EntryReused { id: 3, entry: head }
            ))
        );
    }

    #[test]
    fn a_completion_in_the_ring_but_not_in_the_record_is_not_resubmitted() {
        let (region, _file) = InflightRegion::create(1, SIZE).unwrap();
        let mut d = Driver::new();
        d.offer(2, &[(0x5000, 16, W)]);
        d.offer(4, &[(0x5000, 16, W)]);
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        let a = q.pop().unwrap().unwrap();
        let _b = q.pop().unwrap().unwrap();
        q.complete(a.head(), 9);
        drop(q);
        // As if killed after publishing 2's used descriptor, before the
        // record saw it: 2 still marked, the used position still 0.
        let mut inf = region.queue(0, SIZE).unwrap();
        inf.packed_begin(2, &[PackedDescriptor::default()]);
        inf.packed_set_used(0x8000);
        drop(inf);
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        assert_eq!(q.vring_base(), 0x8001_8002);
        assert_eq!(q.pop().unwrap().unwrap().head(), 4);
        assert!(q.pop().unwrap().is_none());
    }

    #[test]
    fn with_nothing_in_flight_a_restart_resumes_at_the_record_until_the_base_is_reported() {
        let (region, _file) = InflightRegion::create(1, SIZE).unwrap();
        let mut d = Driver::new();
        d.offer(0, &[(0x5000, 16, W); 3]);
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        let c2 = q.pop().unwrap().unwrap();
        q.complete(c2.head(), 1);
        drop(q);
        d.offer(1, &[(0x5000, 16, W)]);
        let (mut q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        assert_eq!(q.vring_base(), 0x8003_8003);
        assert_eq!(q.pop().unwrap().unwrap().head(), 1);
        assert!(q.pop().unwrap().is_none());
        // After GET_VRING_BASE the frontend's base holds again.
        q.complete(1, 0);
        q.base_reported();
        let (q, _) = d.start(0, 0x8000_8000, region.queue(0, SIZE)).unwrap();
        assert_eq!(q.vring_base(), 0x8000_8000);
    }
}
