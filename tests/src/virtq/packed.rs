//! The packed-ring side of the kit's driver (virtio spec 2.8): the same
//! well-behaved API as the split ring ([`VirtQueue::add_chain`],
//! [`VirtQueue::publish`], [`VirtQueue::kick_if_needed`],
//! [`VirtQueue::wait_used`]), laid out as Linux's driver does it, so every
//! blk and net check runs on both layouts; and raw writers
//! ([`VirtQueue::write_packed_desc`], [`VirtQueue::set_packed_avail`]) for
//! hostile rings.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use bulkhead_spec::ring::{
    VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED, VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
};

use super::{
    Buf, Result, RingAddrs, UsedElem, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    VirtQueue, VirtqError,
};
use crate::memory::GuestMemory;

/// A packed descriptor, as it sits in the ring or an indirect table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDesc {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length (in a used descriptor: bytes written).
    pub len: u32,
    /// Buffer id.
    pub id: u16,
    /// `VIRTQ_DESC_F_*` plus the avail and used bits.
    pub flags: u16,
}

impl PackedDesc {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.id.to_le_bytes());
        b[14..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// A ring position and the wrap counter that goes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    idx: u16,
    wrap: bool,
}

impl Pos {
    fn advance(&mut self, n: u16, size: u16) {
        let i = u32::from(self.idx) + u32::from(n);
        if i >= u32::from(size) {
            self.idx = (i - u32::from(size)) as u16;
            self.wrap = !self.wrap;
        } else {
            self.idx = i as u16;
        }
    }

    fn encode(self) -> u16 {
        self.idx
            | if self.wrap {
                VRING_PACKED_EVENT_F_WRAP_CTR
            } else {
                0
            }
    }

    fn linear(self, size: u16) -> u32 {
        u32::from(self.idx) + if self.wrap { 0 } else { u32::from(size) }
    }
}

/// The avail/used bits a driver sets on a descriptor it makes available in round `wrap`.
fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        VRING_PACKED_DESC_F_AVAIL
    } else {
        VRING_PACKED_DESC_F_USED
    }
}

/// An indirect table: guest address and length.
type Table = Option<(u64, u64)>;

/// Driver-side state of a packed ring.
pub(super) struct Packed {
    avail: Pos,
    used: Pos,
    free_ids: Vec<u16>,
    free_slots: u16,
    /// Chains added and not published: their ring descriptors and indirect table.
    added: HashMap<u16, (Vec<PackedDesc>, Table)>,
    /// Buffers published and not used: ring slots taken, indirect table.
    in_flight: HashMap<u16, (u16, Table)>,
    kicked: Pos,
}

impl Packed {
    pub(super) fn new(size: u16) -> Self {
        let start = Pos { idx: 0, wrap: true };
        Packed {
            avail: start,
            used: start,
            free_ids: (0..size).rev().collect(),
            free_slots: size,
            added: HashMap::new(),
            in_flight: HashMap::new(),
            kicked: start,
        }
    }

    pub(super) fn free_slots(&self) -> usize {
        usize::from(self.free_slots)
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// Allocates a packed ring of `size` entries and its two event structures.
pub(super) fn alloc(mem: &Arc<GuestMemory>, size: u16) -> Result<RingAddrs> {
    Ok(RingAddrs {
        desc: mem.alloc(16 * u64::from(size), 4096)?,
        avail: mem.alloc(4, 4096)?,
        used: mem.alloc(4, 4096)?,
    })
}

fn desc_of(b: &Buf, last: bool) -> PackedDesc {
    PackedDesc {
        addr: b.addr,
        len: b.len,
        id: 0,
        flags: if b.writable { VIRTQ_DESC_F_WRITE } else { 0 }
            | if last { 0 } else { VIRTQ_DESC_F_NEXT },
    }
}

impl VirtQueue {
    fn packed_mut(&mut self) -> Result<&mut Packed> {
        self.packed.as_mut().ok_or(VirtqError::NotPacked)
    }

    /// True when the queue is a packed ring.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    fn take_id(&mut self, slots: usize) -> Result<u16> {
        let p = self.packed_mut()?;
        if slots > usize::from(p.free_slots) {
            return Err(VirtqError::QueueFull(slots));
        }
        let id = p.free_ids.pop().ok_or(VirtqError::QueueFull(slots))?;
        p.free_slots -= slots as u16;
        Ok(id)
    }

    pub(super) fn packed_add_chain(&mut self, bufs: &[Buf]) -> Result<u16> {
        let id = self.take_id(bufs.len())?;
        let descs = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| desc_of(b, i + 1 == bufs.len()))
            .collect();
        self.packed_mut()?.added.insert(id, (descs, None));
        Ok(id)
    }

    pub(super) fn packed_add_indirect(&mut self, bufs: &[Buf]) -> Result<u16> {
        let table_len = 16 * bufs.len() as u64;
        let table = self.mem.alloc(table_len, 16)?;
        for (i, b) in bufs.iter().enumerate() {
            // Packed tables are read in order; NEXT has no meaning there.
            let d = desc_of(b, true);
            self.mem.write(table + 16 * i as u64, &d.to_bytes())?;
        }
        let id = match self.take_id(1) {
            Ok(id) => id,
            Err(e) => {
                self.mem.free(table, table_len);
                return Err(e);
            }
        };
        let d = PackedDesc {
            addr: table,
            len: table_len as u32,
            id: 0,
            flags: VIRTQ_DESC_F_INDIRECT,
        };
        self.packed_mut()?
            .added
            .insert(id, (vec![d], Some((table, table_len))));
        Ok(id)
    }

    /// Raw: writes `d` at ring position `idx` exactly as given.
    pub fn write_packed_desc(&self, idx: u16, d: PackedDesc) -> Result<()> {
        Ok(self.mem.write(
            self.addrs.desc + 16 * u64::from(idx % self.size),
            &d.to_bytes(),
        )?)
    }

    /// Raw: the avail/used bits that make a descriptor written at the
    /// driver's next position available (to OR into hand-made flags).
    pub fn packed_avail_bits(&self) -> Result<u16> {
        let p = self.packed.as_ref().ok_or(VirtqError::NotPacked)?;
        Ok(avail_bits(p.avail.wrap))
    }

    /// Raw: the driver's next ring position (bits 0..14) and wrap counter (bit 15).
    pub fn packed_next_avail(&self) -> Result<u16> {
        let p = self.packed.as_ref().ok_or(VirtqError::NotPacked)?;
        Ok(p.avail.encode())
    }

    /// Raw: moves the driver's next position on by `n` slots (after
    /// hand-written descriptors), without any bookkeeping.
    pub fn set_packed_avail(&mut self, n: u16) -> Result<()> {
        let size = self.size;
        self.packed_mut()?.avail.advance(n, size);
        Ok(())
    }

    pub(super) fn packed_publish(&mut self, id: u16) -> Result<()> {
        let size = self.size;
        let p = self.packed_mut()?;
        let (mut descs, indirect) = p.added.remove(&id).ok_or(VirtqError::NotAdded(id))?;
        let first = p.avail;
        let mut pos = first;
        let mut first_flags = 0;
        let n = descs.len() as u16;
        for (i, d) in descs.iter_mut().enumerate() {
            d.id = id;
            d.flags |= avail_bits(pos.wrap);
            if i == 0 {
                first_flags = d.flags;
                // Written whole but not yet available; its flags go last.
                let hidden = PackedDesc {
                    flags: avail_bits(!pos.wrap),
                    ..*d
                };
                self.mem.write(
                    self.addrs.desc + 16 * u64::from(pos.idx),
                    &hidden.to_bytes(),
                )?;
            } else {
                self.mem
                    .write(self.addrs.desc + 16 * u64::from(pos.idx), &d.to_bytes())?;
            }
            pos.advance(1, size);
        }
        fence(Ordering::Release);
        self.mem.store(
            self.addrs.desc + 16 * u64::from(first.idx) + 14,
            first_flags,
            Ordering::Release,
        )?;
        let p = self.packed_mut()?;
        p.avail = pos;
        p.in_flight.insert(id, (n, indirect));
        Ok(())
    }

    pub(super) fn packed_needs_kick(&mut self) -> Result<bool> {
        fence(Ordering::SeqCst);
        let size = self.size;
        let event: u32 = self.mem.load(self.addrs.used, Ordering::Acquire)?;
        let (off_wrap, flags) = (event as u16, (event >> 16) as u16);
        let event_idx = self.event_idx;
        let p = self.packed_mut()?;
        let (old, new) = (p.kicked.linear(size), p.avail.linear(size));
        p.kicked = p.avail;
        let m = 2 * u32::from(size);
        Ok(match flags {
            VRING_PACKED_EVENT_FLAG_DISABLE => false,
            VRING_PACKED_EVENT_FLAG_DESC if event_idx => {
                let off = u32::from(off_wrap & !VRING_PACKED_EVENT_F_WRAP_CTR);
                let ev = off
                    + if off_wrap & VRING_PACKED_EVENT_F_WRAP_CTR != 0 {
                        0
                    } else {
                        u32::from(size)
                    };
                (new + 2 * m - ev - 1) % m < (new + m - old) % m
            }
            _ => true,
        })
    }

    /// Whether the device wrote a used descriptor at the driver's used position.
    pub(super) fn packed_has_used(&self) -> Result<bool> {
        let p = self.packed.as_ref().ok_or(VirtqError::NotPacked)?;
        let flags: u16 = self.mem.load(
            self.addrs.desc + 16 * u64::from(p.used.idx) + 14,
            Ordering::Acquire,
        )?;
        let bit = |b: u16| flags & b != 0;
        Ok(bit(VRING_PACKED_DESC_F_AVAIL) == p.used.wrap
            && bit(VRING_PACKED_DESC_F_USED) == p.used.wrap)
    }

    /// Asks for an interrupt at the next used descriptor (EVENT_IDX).
    pub(super) fn packed_set_used_event(&self) -> Result<()> {
        let p = self.packed.as_ref().ok_or(VirtqError::NotPacked)?;
        let v = u32::from(p.used.encode()) | (u32::from(VRING_PACKED_EVENT_FLAG_DESC) << 16);
        Ok(self.mem.store(self.addrs.avail, v, Ordering::Release)?)
    }

    pub(super) fn packed_pop_used(&mut self) -> Result<Option<UsedElem>> {
        if !self.packed_has_used()? {
            return Ok(None);
        }
        let size = self.size;
        let at = {
            let p = self.packed.as_ref().ok_or(VirtqError::NotPacked)?;
            self.addrs.desc + 16 * u64::from(p.used.idx)
        };
        let len: u32 = self.mem.load(at + 8, Ordering::Relaxed)?;
        let id: u16 = self.mem.load(at + 12, Ordering::Relaxed)?;
        let p = self.packed_mut()?;
        // A device naming an id not in flight moves the position by one.
        let (slots, indirect) = p.in_flight.remove(&id).unwrap_or((1, None));
        if slots != 0 && !p.free_ids.contains(&id) && id < size {
            p.free_ids.push(id);
            p.free_slots += slots;
        }
        p.used.advance(slots, size);
        if let Some((gpa, l)) = indirect {
            self.mem.free(gpa, l);
        }
        if self.event_idx {
            self.packed_set_used_event()?;
        }
        Ok(Some(UsedElem {
            id: u32::from(id),
            len,
        }))
    }

    /// What a frontend sends as SET_VRING_BASE for this packed ring: the
    /// driver's used position and wrap counter (all it knows of the device).
    pub(super) fn packed_base(&self) -> Result<u16> {
        let p = self.packed.as_ref().ok_or(VirtqError::NotPacked)?;
        Ok(p.used.encode())
    }
}
