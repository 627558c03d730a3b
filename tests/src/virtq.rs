//! A virtqueue guest driver laid out in [`GuestMemory`]: a split ring, or a
//! packed one ([`VirtQueue::new_packed`], see [`packed`]) behind the same
//! well-behaved API.
//!
//! The well-behaved path ([`VirtQueue::add_chain`], [`VirtQueue::publish`],
//! [`VirtQueue::kick_if_needed`], [`VirtQueue::wait_used`]) follows the virtio 1.x
//! driver rules, including EVENT_IDX. The raw path ([`VirtQueue::write_desc`],
//! [`VirtQueue::set_avail_entry`], [`VirtQueue::set_avail_idx`], ...) writes any
//! value anywhere in the rings, so adversarial tests need no `unsafe`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::memory::{GuestMemory, MemoryError};

pub mod packed;

pub use bulkhead_spec::ring::{
    VRING_AVAIL_F_NO_INTERRUPT as VIRTQ_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT as VIRTQ_DESC_F_INDIRECT, VRING_DESC_F_NEXT as VIRTQ_DESC_F_NEXT,
    VRING_DESC_F_WRITE as VIRTQ_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY as VIRTQ_USED_F_NO_NOTIFY,
};

/// Errors from the virtqueue driver.
#[derive(Debug, thiserror::Error)]
pub enum VirtqError {
    /// Guest memory access or allocation failed.
    #[error("Guest memory")]
    Memory(#[from] MemoryError),
    /// Eventfd creation, read, write or poll failed.
    #[error("Eventfd")]
    EventFd(#[source] std::io::Error),
    /// Not enough free descriptors for the chain.
    #[error("Queue full: {0} descriptors needed")]
    QueueFull(usize),
    /// The chain has no buffers.
    #[error("Empty chain")]
    EmptyChain,
    /// Queue size is zero, too big or not a power of two.
    #[error("Bad queue size {0}")]
    BadSize(u16),
    /// The device did not complete a request in time.
    #[error("Timed out waiting for the used ring")]
    Timeout,
    /// A packed-ring call on a split queue.
    #[error("Not a packed ring")]
    NotPacked,
    /// A packed ring publishes only ids that [`VirtQueue::add_chain`] returned.
    #[error("Buffer id {0} was not added")]
    NotAdded(u16),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, VirtqError>;

/// A raw split-ring descriptor, exactly as it sits in guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor index when `flags` has NEXT.
    pub next: u16,
}

impl Desc {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        Desc {
            addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }
}

/// One buffer of a chain: guest address, length, and whether the device writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// One used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the completed chain.
    pub id: u32,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// Guest addresses of a queue's three parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

struct Chain {
    descs: Vec<u16>,
    indirect: Option<(u64, u64)>,
}

/// A split virtqueue driver: rings in guest memory plus kick and call eventfds.
pub struct VirtQueue {
    mem: Arc<GuestMemory>,
    size: u16,
    addrs: RingAddrs,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    chains: HashMap<u16, Chain>,
    next_avail: u16,
    kicked_avail: u16,
    last_used: u16,
    event_idx: bool,
    /// The packed ring's state; `None` for a split ring.
    packed: Option<packed::Packed>,
}

impl VirtQueue {
    /// Allocates a queue of `size` entries (a power of two up to 32768) in `mem`, rings zeroed.
    pub fn new(mem: Arc<GuestMemory>, size: u16) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(VirtqError::BadSize(size));
        }
        let n = u64::from(size);
        let desc = mem.alloc(16 * n, 4096)?;
        let avail = mem.alloc(6 + 2 * n, 4096)?;
        let used = mem.alloc(6 + 8 * n, 4096)?;
        Ok(VirtQueue {
            mem,
            size,
            addrs: RingAddrs { desc, avail, used },
            kick: EventFd::new(EFD_NONBLOCK).map_err(VirtqError::EventFd)?,
            call: EventFd::new(EFD_NONBLOCK).map_err(VirtqError::EventFd)?,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            event_idx: false,
            packed: None,
        })
    }

    /// Allocates a packed ring of `size` entries in `mem` (VIRTIO_F_RING_PACKED).
    pub fn new_packed(mem: Arc<GuestMemory>, size: u16) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(VirtqError::BadSize(size));
        }
        let addrs = packed::alloc(&mem, size)?;
        Ok(VirtQueue {
            mem,
            size,
            addrs,
            kick: EventFd::new(EFD_NONBLOCK).map_err(VirtqError::EventFd)?,
            call: EventFd::new(EFD_NONBLOCK).map_err(VirtqError::EventFd)?,
            free: Vec::new(),
            chains: HashMap::new(),
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            event_idx: false,
            packed: Some(packed::Packed::new(size)),
        })
    }

    /// What a frontend sends as SET_VRING_BASE when it (re)starts this
    /// queue: a split ring's used index; a packed ring's used position and
    /// wrap counter.
    pub fn vring_base(&self) -> Result<u16> {
        if self.packed.is_some() {
            return self.packed_base();
        }
        self.used_idx()
    }

    /// Queue size (number of descriptors).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest addresses of the rings.
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// The guest memory the queue lives in.
    pub fn mem(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The kick eventfd (driver -> device).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (device -> driver).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Turns the EVENT_IDX driver rules on or off (match the negotiated features).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Whether EVENT_IDX rules are in force.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Number of free descriptors.
    pub fn free_descs(&self) -> usize {
        if let Some(p) = &self.packed {
            return p.free_slots();
        }
        self.free.len()
    }

    /// Number of chains published and not yet popped from the used ring.
    pub fn in_flight(&self) -> usize {
        if let Some(p) = &self.packed {
            return p.in_flight();
        }
        self.chains.len()
    }

    /// The driver's next avail index (shadow of avail->idx).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The driver's count of used entries consumed so far.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    fn desc_gpa(&self, idx: u16) -> u64 {
        self.addrs.desc + 16 * u64::from(idx)
    }

    /// Writes a whole descriptor at table index `idx` (any index, any content).
    pub fn write_desc(&self, idx: u16, d: Desc) -> Result<()> {
        Ok(self.mem.write(self.desc_gpa(idx), &d.to_bytes())?)
    }

    /// Reads descriptor `idx` of the table.
    pub fn read_desc(&self, idx: u16) -> Result<Desc> {
        let mut b = [0u8; 16];
        self.mem.read(self.desc_gpa(idx), &mut b)?;
        Ok(Desc::from_bytes(&b))
    }

    /// Writes a descriptor at any guest address (for hand-made indirect tables).
    pub fn write_desc_at(&self, gpa: u64, d: Desc) -> Result<()> {
        Ok(self.mem.write(gpa, &d.to_bytes())?)
    }

    /// Takes a free descriptor index out of the driver's free list, for raw use.
    pub fn reserve_desc(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Returns a descriptor index taken with [`VirtQueue::reserve_desc`].
    pub fn release_desc(&mut self, idx: u16) {
        if idx < self.size && !self.free.contains(&idx) {
            self.free.push(idx);
        }
    }

    /// Writes `bufs` as a chain of direct descriptors; returns the head (not yet published).
    pub fn add_chain(&mut self, bufs: &[Buf]) -> Result<u16> {
        if bufs.is_empty() {
            return Err(VirtqError::EmptyChain);
        }
        if self.packed.is_some() {
            return self.packed_add_chain(bufs);
        }
        if bufs.len() > self.free.len() {
            return Err(VirtqError::QueueFull(bufs.len()));
        }
        let at = self.free.len() - bufs.len();
        let mut idxs: Vec<u16> = self.free.split_off(at);
        idxs.reverse();
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let d = Desc {
                addr: b.addr,
                len: b.len,
                flags: if b.writable { VIRTQ_DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { VIRTQ_DESC_F_NEXT },
                next: if last { 0 } else { idxs[i + 1] },
            };
            if let Err(e) = self.write_desc(idxs[i], d) {
                self.free.extend(idxs);
                return Err(e);
            }
        }
        let head = idxs[0];
        self.chains.insert(
            head,
            Chain {
                descs: idxs,
                indirect: None,
            },
        );
        Ok(head)
    }

    /// Writes `bufs` into a fresh indirect table referenced by one descriptor; returns the head.
    pub fn add_indirect(&mut self, bufs: &[Buf]) -> Result<u16> {
        if bufs.is_empty() {
            return Err(VirtqError::EmptyChain);
        }
        if self.packed.is_some() {
            return self.packed_add_indirect(bufs);
        }
        let table_len = 16 * bufs.len() as u64;
        let table = self.mem.alloc(table_len, 16)?;
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let d = Desc {
                addr: b.addr,
                len: b.len,
                flags: if b.writable { VIRTQ_DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { VIRTQ_DESC_F_NEXT },
                next: if last { 0 } else { (i + 1) as u16 },
            };
            self.write_desc_at(table + 16 * i as u64, d)?;
        }
        let Some(head) = self.free.pop() else {
            self.mem.free(table, table_len);
            return Err(VirtqError::QueueFull(1));
        };
        let d = Desc {
            addr: table,
            len: table_len as u32,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        };
        if let Err(e) = self.write_desc(head, d) {
            self.free.push(head);
            return Err(e);
        }
        self.chains.insert(
            head,
            Chain {
                descs: vec![head],
                indirect: Some((table, table_len)),
            },
        );
        Ok(head)
    }

    /// Puts `head` (any value) in the next avail slot and publishes the new avail idx (release).
    pub fn publish(&mut self, head: u16) -> Result<()> {
        if self.packed.is_some() {
            return self.packed_publish(head);
        }
        let slot = self.next_avail % self.size;
        self.set_avail_entry(slot, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(self.next_avail)
    }

    /// Adds a chain (indirect or direct), publishes it and kicks if the device wants it.
    pub fn submit(&mut self, bufs: &[Buf], indirect: bool) -> Result<u16> {
        let head = if indirect {
            self.add_indirect(bufs)?
        } else {
            self.add_chain(bufs)?
        };
        self.publish(head)?;
        self.kick_if_needed()?;
        Ok(head)
    }

    /// Raw: writes `head` into avail ring slot `slot` (any value, no bookkeeping).
    pub fn set_avail_entry(&self, slot: u16, head: u16) -> Result<()> {
        let gpa = self.addrs.avail + 4 + 2 * u64::from(slot);
        Ok(self.mem.store(gpa, head, Ordering::Relaxed)?)
    }

    /// Raw: stores avail->idx with release ordering (any value; the shadow is untouched).
    pub fn set_avail_idx(&self, idx: u16) -> Result<()> {
        fence(Ordering::Release);
        Ok(self
            .mem
            .store(self.addrs.avail + 2, idx, Ordering::Release)?)
    }

    /// Raw: sets the driver's shadow avail index (after hand-made avail idx changes).
    pub fn set_next_avail(&mut self, idx: u16) {
        self.next_avail = idx;
    }

    /// Raw: writes avail->flags (e.g. `VIRTQ_AVAIL_F_NO_INTERRUPT`).
    pub fn set_avail_flags(&self, flags: u16) -> Result<()> {
        Ok(self.mem.store(self.addrs.avail, flags, Ordering::Release)?)
    }

    /// Writes used_event (in the avail ring) for EVENT_IDX.
    pub fn set_used_event(&self, v: u16) -> Result<()> {
        let gpa = self.addrs.avail + 4 + 2 * u64::from(self.size);
        Ok(self.mem.store(gpa, v, Ordering::Release)?)
    }

    /// Reads avail_event (in the used ring) written by the device for EVENT_IDX.
    pub fn avail_event(&self) -> Result<u16> {
        let gpa = self.addrs.used + 4 + 8 * u64::from(self.size);
        Ok(self.mem.load(gpa, Ordering::Acquire)?)
    }

    /// Reads used->flags.
    pub fn used_flags(&self) -> Result<u16> {
        Ok(self.mem.load(self.addrs.used, Ordering::Acquire)?)
    }

    /// Reads used->idx (acquire).
    pub fn used_idx(&self) -> Result<u16> {
        Ok(self.mem.load(self.addrs.used + 2, Ordering::Acquire)?)
    }

    /// Reads used ring element `slot` (taken modulo the queue size).
    pub fn used_elem(&self, slot: u16) -> Result<UsedElem> {
        let gpa = self.addrs.used + 4 + 8 * u64::from(slot % self.size);
        let id = self.mem.load::<u32>(gpa, Ordering::Relaxed)?;
        let len = self.mem.load::<u32>(gpa + 4, Ordering::Relaxed)?;
        Ok(UsedElem { id, len })
    }

    /// Whether the device asked for a kick for what was published since the last check.
    pub fn needs_kick(&mut self) -> Result<bool> {
        if self.packed.is_some() {
            return self.packed_needs_kick();
        }
        fence(Ordering::SeqCst);
        let old = self.kicked_avail;
        let new = self.next_avail;
        self.kicked_avail = new;
        if self.event_idx {
            let event = self.avail_event()?;
            Ok(new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old))
        } else {
            Ok(self.used_flags()? & VIRTQ_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Kicks the device if [`VirtQueue::needs_kick`] says so; returns whether it kicked.
    pub fn kick_if_needed(&mut self) -> Result<bool> {
        let need = self.needs_kick()?;
        if need {
            self.kick()?;
        }
        Ok(need)
    }

    /// Kicks the device unconditionally.
    pub fn kick(&self) -> Result<()> {
        self.kick.write(1).map_err(VirtqError::EventFd)
    }

    /// Waits up to `timeout` for the call eventfd; returns whether it fired (and clears it).
    pub fn wait_call(&self, timeout: Duration) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.call),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: pfd is a valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(VirtqError::EventFd(e));
        }
        if r == 0 {
            return Ok(false);
        }
        match self.call.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(VirtqError::EventFd(e)),
        }
    }

    /// Pops the next used element, if any, freeing its chain; updates used_event with EVENT_IDX.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>> {
        if self.packed.is_some() {
            return self.packed_pop_used();
        }
        if self.used_idx()? == self.last_used {
            return Ok(None);
        }
        let elem = self.used_elem(self.last_used)?;
        self.last_used = self.last_used.wrapping_add(1);
        if let Ok(head) = u16::try_from(elem.id)
            && let Some(chain) = self.chains.remove(&head)
        {
            if let Some((gpa, len)) = chain.indirect {
                self.mem.free(gpa, len);
            }
            self.free.extend(chain.descs);
        }
        if self.event_idx {
            self.set_used_event(self.last_used)?;
        }
        Ok(Some(elem))
    }

    /// Before sleeping on the call eventfd: with EVENT_IDX, asks for an
    /// interrupt at the next used entry (either layout) and returns whether
    /// one arrived meanwhile (then the driver must look again instead of
    /// sleeping); without EVENT_IDX the device interrupts anyway: false.
    pub fn arm_call(&mut self) -> Result<bool> {
        if !self.event_idx {
            return Ok(false);
        }
        if self.packed.is_some() {
            self.packed_set_used_event()?;
            fence(Ordering::SeqCst);
            self.packed_has_used()
        } else {
            self.set_used_event(self.last_used)?;
            fence(Ordering::SeqCst);
            Ok(self.used_idx()? != self.last_used)
        }
    }

    /// Pops a used element, sleeping on the call eventfd (no polling) up to `timeout`.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<UsedElem> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.pop_used()? {
                return Ok(e);
            }
            if self.arm_call()? {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VirtqError::Timeout);
            }
            self.wait_call(deadline - now)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_link_descriptors_and_publish_to_the_avail_ring() {
        let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
        let mut q = VirtQueue::new(mem.clone(), 8).unwrap();
        let head = q
            .add_chain(&[Buf::readable(0x1000, 16), Buf::writable(0x2000, 1)])
            .unwrap();
        let d0 = q.read_desc(head).unwrap();
        assert_eq!(d0.flags, VIRTQ_DESC_F_NEXT);
        let d1 = q.read_desc(d0.next).unwrap();
        assert_eq!((d1.addr, d1.len, d1.flags), (0x2000, 1, VIRTQ_DESC_F_WRITE));
        q.publish(head).unwrap();
        let a = q.addrs().avail;
        assert_eq!(mem.load::<u16>(a + 2, Ordering::Acquire).unwrap(), 1);
        assert_eq!(mem.load::<u16>(a + 4, Ordering::Acquire).unwrap(), head);
        // Fake a device completion.
        let u = q.addrs().used;
        mem.store(u + 4, u32::from(head), Ordering::Relaxed)
            .unwrap();
        mem.store(u + 8, 7u32, Ordering::Relaxed).unwrap();
        mem.store(u + 2, 1u16, Ordering::Release).unwrap();
        assert_eq!(
            q.pop_used().unwrap(),
            Some(UsedElem {
                id: head.into(),
                len: 7
            })
        );
        assert_eq!(q.free_descs(), 8);
    }

    #[test]
    fn event_idx_kick_honours_avail_event() {
        let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
        let mut q = VirtQueue::new(mem.clone(), 8).unwrap();
        q.set_event_idx(true);
        let used_end = q.addrs().used + 4 + 8 * 8;
        // Device wants a kick when avail idx passes 0.
        q.add_chain(&[Buf::readable(0x1000, 1)])
            .and_then(|h| q.publish(h))
            .unwrap();
        assert!(q.needs_kick().unwrap());
        // Device says: notify only after entry 5.
        mem.store(used_end, 5u16, Ordering::Release).unwrap();
        q.add_chain(&[Buf::readable(0x1000, 1)])
            .and_then(|h| q.publish(h))
            .unwrap();
        assert!(!q.needs_kick().unwrap());
    }
}
