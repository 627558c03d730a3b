//! A virtqueue as seen by a device: takes chains off the avail ring,
//! publishes completions on the used ring, and decides when to interrupt.
//! One type for both layouts: the split ring here, the packed ring
//! (VIRTIO_F_RING_PACKED) in [`packed`]; device code does not know which.
//!
//! Everything read from the rings is treated as hostile: an avail index more
//! than a queue ahead, a head out of range, or a head that is already in
//! flight breaks the queue (reported on the error eventfd) instead of being
//! acted on. A chain that fails validation is completed with length 0 and
//! counted. When an inflight area is attached, every head is recorded there
//! so that a restarted backend can resubmit it.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};

use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryLoadGuard,
};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{ChainError, ChainLimits, DescriptorChain};
use crate::dirty_log::DirtyLog;
use crate::inflight::QueueInflight;
use crate::memory::{
    GuestMemoryHandle, GuestMemorySnapshot, load_guest, read_guest_obj, store_guest,
    write_guest_obj,
};
use crate::ratelimit::guest_error;

use crate::spec::ring::{
    VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY,
};

mod packed;
use packed::PackedRing;

/// Largest queue any Bulkhead backend accepts.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Guest physical addresses of a queue's three parts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table (a packed ring: the ring).
    pub desc: GuestAddress,
    /// Avail (driver) ring (a packed ring: the driver event suppression structure).
    pub avail: GuestAddress,
    /// Used (device) ring (a packed ring: the device event suppression structure).
    pub used: GuestAddress,
}

impl RingAddrs {
    /// Checks alignment and that all three parts of a split ring lie in
    /// guest memory for `size` entries.
    pub fn validate(&self, mem: &vm_memory::GuestMemoryMmap, size: u16) -> Result<(), QueueError> {
        let n = u64::from(size);
        self.check_parts(
            mem,
            [
                (self.desc, 16 * n, 16),
                (self.avail, 6 + 2 * n, 2),
                (self.used, 6 + 8 * n, 4),
            ],
        )
    }

    /// The same for a packed ring: the ring of `size` descriptors and the
    /// two 4-byte event suppression structures.
    pub fn validate_packed(
        &self,
        mem: &vm_memory::GuestMemoryMmap,
        size: u16,
    ) -> Result<(), QueueError> {
        let n = u64::from(size);
        self.check_parts(
            mem,
            [
                (self.desc, 16 * n, 16),
                (self.avail, 4, 4),
                (self.used, 4, 4),
            ],
        )
    }

    /// Parts: (address, length, alignment) of the table, the driver's part
    /// and the device's part, in that order.
    fn check_parts(
        &self,
        mem: &vm_memory::GuestMemoryMmap,
        parts: [(GuestAddress, u64, u64); 3],
    ) -> Result<(), QueueError> {
        for (addr, len, align) in parts {
            if addr.raw_value() % align != 0 {
                return Err(QueueError::RingOutsideMemory(addr.raw_value()));
            }
            if addr.checked_add(len).is_none() || !mem.check_range(addr, len as usize) {
                return Err(QueueError::RingOutsideMemory(addr.raw_value()));
            }
        }
        // The device writes the used ring; if it overlapped what it reads
        // (the table or the avail ring), its own writes would feed it new work
        // forever (an avail index that moves with every completion).
        let (used, used_len) = (parts[2].0.raw_value(), parts[2].1);
        for (addr, len, _) in &parts[..2] {
            let a = addr.raw_value();
            if a < used + used_len && used < a + len {
                return Err(QueueError::RingsOverlap);
            }
        }
        Ok(())
    }
}

/// Errors that break a queue until the frontend resets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The avail index moved more than a queue ahead.
    #[error("avail index {avail} is more than {size} ahead of {next}")]
    AvailIndexJump {
        /// Index read from the ring.
        avail: u16,
        /// Next index the device expected.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// A head index not below the queue size.
    #[error("head {0} out of range")]
    HeadOutOfRange(u16),
    /// A head already in flight was made available again.
    #[error("head {0} made available while still in flight")]
    HeadInFlight(u16),
    /// A ring part does not lie inside guest memory.
    #[error("ring at {0:#x} is outside guest memory or misaligned")]
    RingOutsideMemory(u64),
    /// The used ring overlaps the descriptor table or the avail ring.
    #[error("used ring overlaps the descriptor table or the avail ring")]
    RingsOverlap,
    /// Guest memory could not be accessed.
    #[error("guest memory access failed")]
    Memory,
    /// The queue was broken earlier and awaits a reset.
    #[error("queue is broken")]
    Broken,
    /// A packed ring's base names a position outside the ring, or one more
    /// than a ring ahead of the used position.
    #[error("packed ring base {0:#x} is impossible")]
    BadBase(u32),
    /// A packed chain runs into the slots of buffers still in flight.
    #[error("packed chain longer than the {0} slots the driver owns")]
    ChainOverrun(u32),
    /// A predecessor died with packed buffers of several ring slots in
    /// flight whose descriptors the inflight area could not keep (an area
    /// without descriptor tables): the queue is not started rather than
    /// losing or repeating them silently.
    #[error("{0} packed buffer(s) were in flight when the previous backend stopped")]
    PackedInFlightLost(u32),
    /// A packed ring's inflight record cannot be true (a chain leaving its
    /// table, looping, sharing entries): nothing of it is acted on.
    #[error("corrupt packed inflight record: {0}")]
    PackedRecordCorrupt(crate::inflight::PackedRecordError),
}

/// The call eventfd, replaceable while the queue runs (SET_VRING_CALL).
///
/// An interrupt decided while no eventfd is set is kept and delivered to
/// the next one: QEMU starts a ring (SET_VRING_KICK) before it hands over
/// the call eventfd when the guest's MSI-X vectors are in use, and on a
/// migration's destination frames already wait on the tap at that moment.
/// With EVENT_IDX, an interrupt lost then is never made up for: the queue
/// counts it as sent and the guest, which never saw it, waits for it.
#[derive(Default)]
pub struct CallSlot(Mutex<CallState>);

#[derive(Default)]
struct CallState {
    fd: Option<EventFd>,
    /// An interrupt was due while no eventfd was set.
    missed: bool,
}

impl CallSlot {
    /// Replaces the eventfd; signals the new one if an interrupt was missed.
    pub fn set(&self, fd: Option<EventFd>) {
        if let Ok(mut g) = self.0.lock() {
            g.fd = fd;
            if g.missed
                && let Some(fd) = g.fd.as_ref()
            {
                let _ = fd.write(1);
                g.missed = false;
            }
        }
    }

    /// Signals the guest, or remembers the interrupt until an eventfd is
    /// set. The eventfd is non-blocking (`frontend_fd`): a counter so full
    /// that the write fails with EAGAIN is an interrupt already pending,
    /// and nothing more is needed.
    pub fn signal(&self) {
        if let Ok(mut g) = self.0.lock() {
            match g.fd.as_ref() {
                Some(fd) => {
                    let _ = fd.write(1);
                }
                None => g.missed = true,
            }
        }
    }
}

/// Counters a queue keeps; shared so the daemon can log them.
#[derive(Default, Debug)]
pub struct QueueStats {
    /// Chains taken off the ring.
    pub chains: AtomicU64,
    /// Chains refused by validation (guest errors).
    pub bad_chains: AtomicU64,
    /// Interrupts signalled.
    pub interrupts: AtomicU64,
}

/// Bitset of heads taken and not yet completed.
struct HeadSet(Vec<u64>);

impl HeadSet {
    fn new(size: u16) -> Self {
        HeadSet(vec![0; usize::from(size).div_ceil(64)])
    }
    fn insert(&mut self, h: u16) -> bool {
        let (w, b) = (usize::from(h) / 64, h % 64);
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        !was
    }
    fn remove(&mut self, h: u16) -> bool {
        let (w, b) = (usize::from(h) / 64, h % 64);
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] &= !(1 << b);
        was
    }
    fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
}

/// Everything needed to (re)start a queue.
pub struct QueueConfig {
    /// Queue index within the device.
    pub index: u16,
    /// Number of entries (a power of two).
    pub size: u16,
    /// Ring addresses.
    pub addrs: RingAddrs,
    /// Next avail index to read (SET_VRING_BASE); a packed ring: bits
    /// 0..14 the position, bit 15 the wrap counter.
    pub next_avail: u16,
    /// A packed ring's used position and wrap counter (bits 16..31 of
    /// SET_VRING_BASE; 0, what a 16-bit base leaves, means "as avail");
    /// unused by a split ring, which keeps its used index in guest memory.
    pub used_base: u16,
    /// Negotiated virtio features.
    pub features: u64,
    /// Most bytes one chain may carry.
    pub max_chain_bytes: u64,
}

/// A running virtqueue, split or packed, owned by one worker thread.
pub struct VirtQueue {
    index: u16,
    size: u16,
    addrs: RingAddrs,
    mem: GuestMemoryHandle,
    next_avail: Wrapping<u16>,
    /// The driver's avail index as last read and checked (at most `size`
    /// ahead of `next_avail`): entries up to it are taken without reading
    /// the index again, a cache line the driver keeps writing.
    avail_shadow: Wrapping<u16>,
    next_used: Wrapping<u16>,
    signalled_used: Option<Wrapping<u16>>,
    event_idx: bool,
    limits: ChainLimits,
    heads: HeadSet,
    /// Avail index each in-flight head was taken at; None for a head
    /// resubmitted from the inflight area (see [`VirtQueue::give_back`]).
    taken_at: Vec<Option<Wrapping<u16>>>,
    resubmit: VecDeque<u16>,
    inflight: Option<QueueInflight>,
    call: Arc<CallSlot>,
    err: Option<Arc<EventFd>>,
    broken: bool,
    stats: Arc<QueueStats>,
    /// Most descriptors one chain may have (at least the queue size).
    max_descriptors: u16,
    /// Heads `pop` may still take before the queue thread must look at its
    /// other events (its stop fd above all); unlimited outside a queue thread.
    budget: u32,
    /// `pop` stopped because the budget ran out, not because the ring was empty.
    exhausted: bool,
    /// Dirty-page log of the connection (migration); see [`crate::dirty_log`].
    dirty: Option<Arc<DirtyLog>>,
    /// The packed ring's state when VIRTIO_F_RING_PACKED was negotiated; the
    /// split fields above (`next_avail`, `next_used`, ...) are then unused,
    /// `heads` holds buffer ids, `taken_at` the linear position each was
    /// taken at and `signalled_used` a linear used position.
    packed: Option<PackedRing>,
}

impl VirtQueue {
    /// Starts a queue: validates the rings, reads the used index, and recovers
    /// inflight heads for resubmission when an inflight area is attached.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cfg: QueueConfig,
        mem: GuestMemoryHandle,
        call: Arc<CallSlot>,
        err: Option<Arc<EventFd>>,
        mut inflight: Option<QueueInflight>,
        stats: Arc<QueueStats>,
    ) -> Result<Self, QueueError> {
        if cfg.size == 0 || !cfg.size.is_power_of_two() || cfg.size > MAX_QUEUE_SIZE {
            return Err(QueueError::HeadOutOfRange(cfg.size));
        }
        if cfg.features & VIRTIO_F_RING_PACKED != 0 {
            return Self::start_packed(cfg, mem, call, err, inflight, stats);
        }
        let snapshot = mem.memory();
        cfg.addrs.validate(&snapshot, cfg.size)?;
        let used_idx: u16 = snapshot
            .load(cfg.addrs.used.unchecked_add(2), Ordering::Acquire)
            .map_err(|_| QueueError::Memory)?;
        let mut next_avail = Wrapping(cfg.next_avail);
        let mut resubmit = VecDeque::new();
        if let Some(inf) = inflight.as_mut() {
            let pending = inf.recover(cfg.features, used_idx);
            if !pending.is_empty() {
                crate::rate_limited!(
                    log::Level::Info,
                    "queue {}: resubmitting {} request(s) left in flight",
                    cfg.index,
                    pending.len()
                );
                // Every head taken off the ring is either used or still in flight.
                next_avail = Wrapping(used_idx) + Wrapping(pending.len() as u16);
            }
            resubmit.extend(pending);
        }
        let mut heads = HeadSet::new(cfg.size);
        for &h in &resubmit {
            heads.insert(h);
        }
        Ok(VirtQueue {
            index: cfg.index,
            size: cfg.size,
            addrs: cfg.addrs,
            mem,
            next_avail,
            avail_shadow: next_avail,
            next_used: Wrapping(used_idx),
            // Unknown: the first notify after a start interrupts once. A
            // previous backend may have died between publishing a used
            // entry and signalling it; without this the guest would wait
            // for that interrupt forever. A spurious interrupt is harmless.
            signalled_used: None,
            event_idx: cfg.features & VIRTIO_RING_F_EVENT_IDX != 0,
            limits: ChainLimits {
                queue_size: cfg.size,
                indirect: cfg.features & VIRTIO_RING_F_INDIRECT_DESC != 0,
                max_total_len: cfg.max_chain_bytes,
            },
            heads,
            taken_at: vec![None; usize::from(cfg.size)],
            resubmit,
            inflight,
            call,
            err,
            broken: false,
            stats,
            max_descriptors: cfg.size,
            budget: u32::MAX,
            exhausted: false,
            dirty: None,
            packed: None,
        })
    }

    /// [`VirtQueue::start`] for a packed ring: the positions come from the
    /// vring base, or from the inflight area's record when a predecessor
    /// crashed (a frontend's base is stale then).
    fn start_packed(
        cfg: QueueConfig,
        mem: GuestMemoryHandle,
        call: Arc<CallSlot>,
        err: Option<Arc<EventFd>>,
        inflight: Option<QueueInflight>,
        stats: Arc<QueueStats>,
    ) -> Result<Self, QueueError> {
        cfg.addrs.validate_packed(&mem.memory(), cfg.size)?;
        // A frontend that sends only 16 bits (the `vhost` crate's, DPDK's
        // reading) stopped the ring with nothing in flight: used = avail.
        let used = if cfg.used_base == 0 {
            cfg.next_avail
        } else {
            cfg.used_base
        };
        let ring = PackedRing::new(cfg.next_avail, used, cfg.size)?;
        let mut q = VirtQueue {
            index: cfg.index,
            size: cfg.size,
            addrs: cfg.addrs,
            mem,
            next_avail: Wrapping(0),
            avail_shadow: Wrapping(0),
            next_used: Wrapping(0),
            signalled_used: None,
            event_idx: cfg.features & VIRTIO_RING_F_EVENT_IDX != 0,
            limits: ChainLimits {
                queue_size: cfg.size,
                indirect: cfg.features & VIRTIO_RING_F_INDIRECT_DESC != 0,
                max_total_len: cfg.max_chain_bytes,
            },
            heads: HeadSet::new(cfg.size),
            taken_at: vec![None; usize::from(cfg.size)],
            resubmit: VecDeque::new(),
            inflight,
            call,
            err,
            broken: false,
            stats,
            max_descriptors: cfg.size,
            budget: u32::MAX,
            exhausted: false,
            dirty: None,
            packed: Some(ring),
        };
        q.recover_packed(cfg.features)?;
        Ok(q)
    }

    /// True when the queue runs the packed layout.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// What GET_VRING_BASE returns: a split ring's next avail index; a
    /// packed ring's avail position and wrap counter (bits 0..15) and used
    /// position and wrap counter (bits 16..31).
    pub fn vring_base(&self) -> u32 {
        match &self.packed {
            Some(p) => p.base(),
            None => u32::from(self.next_avail.0),
        }
    }

    /// Retires a stopped queue whose exact base the frontend now holds
    /// (GET_VRING_BASE answered): with nothing in flight, a packed ring's
    /// record in the inflight area is not needed to restart it, and must
    /// not override a base the frontend sets later (after a device reset,
    /// say). It takes the queue: a running one must keep its record.
    pub fn base_reported(mut self) {
        if self.packed.is_some()
            && self.heads.count() == 0
            && let Some(inf) = self.inflight.as_mut()
        {
            inf.packed_forget();
        }
    }

    /// Logs what the queue writes into guest memory in `log` while logging
    /// is active there (live migration).
    pub fn set_dirty_log(&mut self, log: Arc<DirtyLog>) {
        self.dirty = Some(log);
    }

    /// Marks `len` bytes at `addr` dirty when the frontend is logging (a
    /// write the device made outside [`VirtQueue::complete_chain`]'s
    /// prefix, such as blk's status byte at the end of a chain). One
    /// predictable branch when it is not.
    #[inline]
    pub fn log_write(&self, addr: GuestAddress, len: u64) {
        if let Some(d) = &self.dirty {
            d.mark(addr.raw_value(), len);
        }
    }

    #[inline]
    fn logging(&self) -> Option<&DirtyLog> {
        self.dirty.as_deref().filter(|d| d.is_active())
    }

    /// Marks a part of this queue's used ring dirty (when logging).
    #[inline]
    fn log_used(&self, offset: u64, len: u64) {
        if let Some(d) = self.logging() {
            d.mark_used(usize::from(self.index), offset, len);
        }
    }

    /// Publishes `chain` as used with `len` bytes written into its writable
    /// buffers, in order from the first: when the frontend is logging, the
    /// pages of those bytes are marked dirty before the used entry makes
    /// them visible. Whatever wrote them (a [`crate::Writer`], iovecs handed
    /// to the kernel), the chain's validated writable buffers say where.
    pub fn complete_chain(&mut self, chain: &DescriptorChain, len: u32) {
        self.log_chain(chain, u64::from(len));
        self.complete(chain.head(), len);
    }

    /// Marks the first `len` bytes of `chain`'s writable buffers dirty when
    /// the frontend is logging (`u64::MAX`: all of them).
    #[inline]
    pub fn log_chain(&self, chain: &DescriptorChain, len: u64) {
        if let Some(d) = self.logging() {
            let mut left = len;
            for desc in chain.descriptors().iter().filter(|d| d.writable) {
                if left == 0 {
                    break;
                }
                let n = left.min(u64::from(desc.len));
                d.mark(desc.addr.raw_value(), n);
                left -= n;
            }
        }
    }

    /// Lets chains have up to `n` descriptors even when the queue is smaller
    /// (through an indirect table): the longest chain the device's config
    /// lets a driver build (blk: `seg_max` + 2), whatever ring it picked.
    pub fn set_max_descriptors(&mut self, n: u16) {
        self.max_descriptors = n.max(self.size);
    }

    /// Gives `pop` a fresh budget of heads for one round of the queue thread:
    /// a guest that refills the ring as fast as the device drains it cannot
    /// keep the thread from seeing its stop request.
    pub fn refill_budget(&mut self) {
        self.budget = 4 * u32::from(self.size).max(64);
        self.exhausted = false;
    }

    /// True (once) if `pop` ran out of budget since the last refill.
    pub fn take_exhausted(&mut self) -> bool {
        std::mem::take(&mut self.exhausted)
    }

    /// Queue index within the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Next avail index to read (a packed ring: position and wrap counter).
    pub fn next_avail(&self) -> u16 {
        match &self.packed {
            Some(p) => p.avail(),
            None => self.next_avail.0,
        }
    }

    /// Heads taken off the ring and not completed yet.
    pub fn in_flight(&self) -> u32 {
        self.heads.count()
    }

    /// Where the ring stands, read now from guest memory: the device's
    /// positions, what the driver published and both sides' notification
    /// suppression. For a log line when a queue stalls: it tells a lost
    /// kick (the driver made buffers available past the device's event)
    /// from a lost interrupt (used entries past the driver's event).
    pub fn ring_state(&self) -> String {
        if self.packed.is_some() {
            return self.ring_state_packed();
        }
        let mem = self.map();
        let at = |a: GuestAddress| load_guest::<u16>(&mem, a, Ordering::Acquire);
        let ring_end = 4 + 2 * u64::from(self.size);
        format!(
            "split: next avail {}, avail idx {:?}, next used {}, used idx {:?}, \
             avail flags {:?}, used_event {:?}, used flags {:?}, avail_event {:?}, \
             signalled {:?}, in flight {}",
            self.next_avail,
            at(self.addrs.avail.unchecked_add(2)),
            self.next_used,
            at(self.addrs.used.unchecked_add(2)),
            at(self.addrs.avail),
            at(self.addrs.avail.unchecked_add(ring_end)),
            at(self.addrs.used),
            at(self.addrs.used.unchecked_add(4 + 8 * u64::from(self.size))),
            self.signalled_used.map(|w| w.0),
            self.heads.count(),
        )
    }

    /// True after a fatal guest error; the queue processes nothing more.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The counters of this queue.
    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Current memory map.
    pub fn memory(&self) -> GuestMemorySnapshot {
        self.mem.memory().into_inner()
    }

    fn fail(&mut self, e: QueueError) -> QueueError {
        if !self.broken {
            crate::rate_limited!(
                log::Level::Error,
                "queue {}: {e}; the queue stops until reset",
                self.index
            );
            self.broken = true;
            if let Some(err) = &self.err {
                // Non-blocking (`frontend_fd`): a full counter has told the
                // frontend already.
                let _ = err.write(1);
            }
        }
        e
    }

    fn avail_idx(&self, mem: &vm_memory::GuestMemoryMmap) -> Result<Wrapping<u16>, QueueError> {
        load_guest(mem, self.addrs.avail.unchecked_add(2), Ordering::Acquire)
            .map(Wrapping)
            .ok_or(QueueError::Memory)
    }

    /// The current memory map, for an access that does not outlive the call
    /// (no reference count taken, unlike [`VirtQueue::memory`]).
    fn map(&self) -> GuestMemoryLoadGuard<vm_memory::GuestMemoryMmap> {
        self.mem.memory()
    }

    /// True when [`VirtQueue::pop`] has a chain to look at: the driver made
    /// new entries available (or a resubmitted one is waiting). For busy
    /// polling: one load from the avail ring, no side effect.
    pub fn has_pending(&self) -> bool {
        if self.broken {
            return false;
        }
        if self.packed.is_some() {
            return self.has_pending_packed();
        }
        if !self.resubmit.is_empty() || self.avail_shadow != self.next_avail {
            return true;
        }
        let mem = self.map();
        matches!(self.avail_idx(&mem), Ok(avail) if avail != self.next_avail)
    }

    /// Takes the next valid chain, or None when the ring is empty.
    ///
    /// Invalid chains are completed with length 0 and skipped; ring-level
    /// errors break the queue.
    pub fn pop(&mut self) -> Result<Option<DescriptorChain>, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        if self.packed.is_some() {
            return self.pop_packed();
        }
        // One snapshot for the pop, moved into the chain it returns: no
        // second reference count taken and dropped per chain.
        let mut mem = self.memory();
        loop {
            if self.budget == 0 {
                self.exhausted = true;
                return Ok(None);
            }
            self.budget -= 1;
            let head = if let Some(h) = self.resubmit.pop_front() {
                h
            } else {
                if self.avail_shadow == self.next_avail {
                    let avail = self.avail_idx(&mem)?;
                    let pending = avail - self.next_avail;
                    if pending.0 == 0 {
                        return Ok(None);
                    }
                    if pending.0 > self.size {
                        let e = QueueError::AvailIndexJump {
                            avail: avail.0,
                            next: self.next_avail.0,
                            size: self.size,
                        };
                        return Err(self.fail(e));
                    }
                    self.avail_shadow = avail;
                }
                let slot = u64::from(self.next_avail.0 % self.size);
                let addr = self.addrs.avail.unchecked_add(4 + 2 * slot);
                let head: u16 = read_guest_obj(&mem, addr).ok_or(QueueError::Memory)?;
                if head >= self.size {
                    return Err(self.fail(QueueError::HeadOutOfRange(head)));
                }
                if !self.heads.insert(head) {
                    return Err(self.fail(QueueError::HeadInFlight(head)));
                }
                self.taken_at[usize::from(head)] = Some(self.next_avail);
                self.next_avail += Wrapping(1);
                if let Some(inf) = self.inflight.as_mut() {
                    inf.begin(head);
                }
                head
            };
            self.stats.chains.fetch_add(1, Ordering::Relaxed);
            let chain = DescriptorChain::read_bounded(
                mem,
                self.addrs.desc,
                head,
                self.limits,
                self.max_descriptors,
            );
            match chain {
                Ok(chain) => return Ok(Some(chain)),
                Err(e) => {
                    self.bad_chain(head, e);
                    mem = self.memory();
                }
            }
        }
    }

    /// Puts chains the device took and never used back on the avail ring:
    /// the next avail index moves back over them, so GET_VRING_BASE reports
    /// them as not taken and the next backend takes them again. Only the
    /// most recently taken heads can go back (the index moves over a
    /// contiguous run); returns the heads that could not, for the caller to
    /// complete with length 0. For receive buffers held at a stop: used
    /// with length 0 they would be gone until the driver posts them again.
    pub fn give_back(&mut self, heads: &[u16]) -> Vec<u16> {
        if self.packed.is_some() {
            return self.give_back_packed(heads);
        }
        let mut left: Vec<u16> = heads.to_vec();
        loop {
            let want = self.next_avail - Wrapping(1);
            let Some(i) = left
                .iter()
                .position(|&h| self.taken_at.get(usize::from(h)).copied().flatten() == Some(want))
            else {
                break;
            };
            let head = left.swap_remove(i);
            if !self.heads.remove(head) {
                left.push(head);
                break;
            }
            self.taken_at[usize::from(head)] = None;
            if let Some(inf) = self.inflight.as_mut() {
                inf.abort(head);
            }
            self.next_avail = want;
        }
        // Entries up to the driver's index are read again from the ring.
        self.avail_shadow = self.next_avail;
        left
    }

    fn bad_chain(&mut self, head: u16, e: ChainError) {
        self.stats.bad_chains.fetch_add(1, Ordering::Relaxed);
        guest_error!("queue {}: head {head}: {e}", self.index);
        self.complete(head, 0);
    }

    /// Publishes `head` as used with `len` bytes written, marking it no longer in flight.
    pub fn complete(&mut self, head: u16, len: u32) {
        if self.packed.is_some() {
            return self.complete_packed(head, len);
        }
        if head >= self.size || !self.heads.remove(head) {
            crate::rate_limited!(
                log::Level::Warn,
                "queue {}: completion for head {head} that is not in flight",
                self.index
            );
            return;
        }
        self.taken_at[usize::from(head)] = None;
        let mem = self.map();
        let slot = u64::from(self.next_used.0 % self.size);
        let elem = self.addrs.used.unchecked_add(4 + 8 * slot);
        if let Some(inf) = self.inflight.as_mut() {
            inf.before_used(head);
        }
        let entry = (u64::from(len) << 32) | u64::from(head);
        if !write_guest_obj(&mem, entry, elem) {
            let _ = self.fail(QueueError::Memory);
            return;
        }
        // Logged before the index that publishes it: the entry and the index.
        self.log_used(4 + 8 * slot, 8);
        self.log_used(2, 2);
        self.next_used += Wrapping(1);
        if !store_guest(
            &mem,
            self.next_used.0,
            self.addrs.used.unchecked_add(2),
            Ordering::Release,
        ) {
            let _ = self.fail(QueueError::Memory);
            return;
        }
        if let Some(inf) = self.inflight.as_mut() {
            inf.after_used(head, self.next_used.0);
        }
    }

    /// Interrupts the guest if it asked for it since the last interrupt.
    pub fn notify(&mut self) {
        if self.packed.is_some() {
            return self.notify_packed();
        }
        if self.signalled_used == Some(self.next_used) {
            // Nothing was completed since the last decision.
            return;
        }
        if self.signalled_used.is_none() {
            // First decision since the queue started: always interrupt.
            self.signalled_used = Some(self.next_used);
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            self.call.signal();
            return;
        }
        let mem = self.map();
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            let addr = self.addrs.avail.unchecked_add(4 + 2 * u64::from(self.size));
            let Some(used_event) = load_guest::<u16>(&mem, addr, Ordering::Acquire) else {
                return;
            };
            // As vhost does: the window is [last evaluation, now).
            let new = self.next_used;
            let old = self.signalled_used.replace(new);
            match old {
                None => true,
                Some(old) => (new - Wrapping(used_event) - Wrapping(1)).0 < (new - old).0,
            }
        } else {
            let Some(flags) = load_guest::<u16>(&mem, self.addrs.avail, Ordering::Acquire) else {
                return;
            };
            self.signalled_used = Some(self.next_used);
            flags & VRING_AVAIL_F_NO_INTERRUPT == 0
        };
        if needed {
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            self.call.signal();
        }
    }

    /// Asks the guest not to kick while the device is busy.
    pub fn disable_notifications(&mut self) {
        if self.packed.is_some() {
            return self.disable_notifications_packed();
        }
        if !self.event_idx {
            let _ = store_guest(
                &self.map(),
                VRING_USED_F_NO_NOTIFY,
                self.addrs.used,
                Ordering::Relaxed,
            );
            self.log_used(0, 2);
        }
    }

    /// Asks the guest to kick again; returns true if buffers arrived meanwhile.
    pub fn enable_notifications(&mut self) -> Result<bool, QueueError> {
        if self.broken || self.exhausted {
            // Out of budget: the queue thread comes back after its other events.
            return Ok(false);
        }
        if self.packed.is_some() {
            return self.enable_notifications_packed();
        }
        let mem = self.map();
        let stored = if self.event_idx {
            let offset = 4 + 8 * u64::from(self.size);
            self.log_used(offset, 2);
            store_guest(
                &mem,
                self.next_avail.0,
                self.addrs.used.unchecked_add(offset),
                Ordering::Relaxed,
            )
        } else {
            self.log_used(0, 2);
            store_guest(&mem, 0u16, self.addrs.used, Ordering::Relaxed)
        };
        if !stored {
            return Err(QueueError::Memory);
        }
        fence(Ordering::SeqCst);
        Ok(!self.resubmit.is_empty() || self.avail_idx(&mem)? != self.next_avail)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn an_interrupt_due_before_the_call_eventfd_reaches_the_next_one() {
        let slot = CallSlot::default();
        slot.signal();
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        slot.set(Some(fd.try_clone().unwrap()));
        assert_eq!(fd.read().unwrap(), 1, "the missed interrupt");
        // Delivered once: the next eventfd gets nothing.
        let other = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        slot.set(Some(other.try_clone().unwrap()));
        assert!(other.read().is_err(), "signalled twice");
        slot.signal();
        assert_eq!(other.read().unwrap(), 1);
    }
    use crate::chain::RawDescriptor;
    use crate::memory::tests::single_region;
    use crate::spec::ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const SIZE: u16 = 8;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// A driver's side of one queue in test memory.
    pub(crate) struct Guest {
        mem: GuestMemoryHandle,
        avail_idx: u16,
    }

    impl Guest {
        pub(crate) fn new() -> Self {
            Guest {
                mem: GuestMemoryHandle::new(single_region(0x20000)),
                avail_idx: 0,
            }
        }
        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let d = RawDescriptor {
                addr,
                len,
                flags,
                next,
            };
            self.mem
                .memory()
                .write_obj(d, GuestAddress(DESC + 16 * u64::from(i)))
                .unwrap();
        }
        fn offer(&mut self, head: u16) {
            let m = self.mem.memory();
            let slot = u64::from(self.avail_idx % SIZE);
            m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
        }
        fn used(&self) -> (u16, Vec<(u32, u32)>) {
            let m = self.mem.memory();
            let idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
            let elems = (0..idx.min(SIZE))
                .map(|i| {
                    let e: u64 = m
                        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(i)))
                        .unwrap();
                    (e as u32, (e >> 32) as u32)
                })
                .collect();
            (idx, elems)
        }
        pub(crate) fn queue(&self, features: u64) -> (VirtQueue, EventFd) {
            self.queue_at(0, features)
        }
        /// A queue numbered `index` over the same rings (for tests that
        /// need several queue numbers but do not touch the rings).
        pub(crate) fn queue_at(&self, index: u16, features: u64) -> (VirtQueue, EventFd) {
            let call = Arc::new(CallSlot::default());
            let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            call.set(Some(efd.try_clone().unwrap()));
            let cfg = QueueConfig {
                index,
                size: SIZE,
                addrs: RingAddrs {
                    desc: GuestAddress(DESC),
                    avail: GuestAddress(AVAIL),
                    used: GuestAddress(USED),
                },
                next_avail: 0,
                used_base: 0,
                features,
                max_chain_bytes: 1 << 20,
            };
            let q = VirtQueue::start(cfg, self.mem.clone(), call, None, None, Default::default())
                .unwrap();
            (q, efd)
        }
    }

    #[test]
    fn pops_completes_and_interrupts() {
        let mut g = Guest::new();
        g.desc(0, 0x5000, 16, VRING_DESC_F_NEXT, 1);
        g.desc(1, 0x6000, 1, VRING_DESC_F_WRITE, 0);
        g.offer(0);
        let (mut q, efd) = g.queue(0);
        let c = q.pop().unwrap().unwrap();
        assert_eq!(c.head(), 0);
        assert!(q.pop().unwrap().is_none());
        q.complete(0, 1);
        q.notify();
        assert_eq!(efd.read().unwrap(), 1);
        assert_eq!(g.used(), (1, vec![(0, 1)]));
    }

    #[test]
    fn same_head_twice_in_flight_breaks_the_queue() {
        let mut g = Guest::new();
        g.desc(0, 0x5000, 16, 0, 0);
        g.offer(0);
        g.offer(0);
        let (mut q, _efd) = g.queue(0);
        assert!(q.pop().unwrap().is_some());
        assert_eq!(q.pop().unwrap_err(), QueueError::HeadInFlight(0));
        assert!(q.is_broken());
        assert_eq!(q.pop().unwrap_err(), QueueError::Broken);
    }

    #[test]
    fn avail_index_jump_and_bad_head_break_the_queue() {
        let g = Guest::new();
        g.mem
            .memory()
            .write_obj(SIZE + 1, GuestAddress(AVAIL + 2))
            .unwrap();
        let (mut q, _) = g.queue(0);
        assert!(matches!(q.pop(), Err(QueueError::AvailIndexJump { .. })));

        let mut g = Guest::new();
        g.offer(SIZE);
        let (mut q, _) = g.queue(0);
        assert_eq!(q.pop().unwrap_err(), QueueError::HeadOutOfRange(SIZE));
    }

    #[test]
    fn used_ring_overlapping_what_the_device_reads_is_refused() {
        // Found by the `virtqueue` fuzz target: with used == avail, every
        // completion of a refused chain moved avail->idx, and pop never returned.
        let g = Guest::new();
        let start = |desc, avail, used| {
            let cfg = QueueConfig {
                index: 0,
                size: SIZE,
                addrs: RingAddrs {
                    desc: GuestAddress(desc),
                    avail: GuestAddress(avail),
                    used: GuestAddress(used),
                },
                next_avail: 0,
                used_base: 0,
                features: 0,
                max_chain_bytes: 1 << 20,
            };
            let call = Arc::new(CallSlot::default());
            VirtQueue::start(cfg, g.mem.clone(), call, None, None, Default::default()).err()
        };
        assert_eq!(start(DESC, AVAIL, AVAIL), Some(QueueError::RingsOverlap));
        assert_eq!(
            start(DESC, AVAIL, AVAIL + 16),
            Some(QueueError::RingsOverlap)
        );
        assert_eq!(
            start(DESC, AVAIL, DESC + 64),
            Some(QueueError::RingsOverlap)
        );
        // Rings side by side are fine (avail ends at +22); the avail ring may
        // overlap the table (the device only reads both).
        assert_eq!(start(DESC, AVAIL, AVAIL + 24), None);
        assert_eq!(start(DESC, DESC, USED), None);
    }

    #[test]
    fn invalid_chain_is_completed_with_zero_and_skipped() {
        let mut g = Guest::new();
        g.desc(0, 0xffff_ffff_0000, 16, 0, 0);
        g.desc(1, 0x5000, 16, 0, 0);
        g.offer(0);
        g.offer(1);
        let (mut q, _) = g.queue(0);
        let c = q.pop().unwrap().unwrap();
        assert_eq!(c.head(), 1);
        assert_eq!(g.used(), (1, vec![(0, 0)]));
        assert_eq!(q.stats().bad_chains.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn budget_ends_a_round_even_when_the_guest_keeps_refilling() {
        let mut g = Guest::new();
        g.desc(0, 0x5000, 16, 0, 0);
        let (mut q, _) = g.queue(0);
        q.refill_budget();
        let mut taken = 0;
        // The guest offers head 0 again each time it completes.
        loop {
            g.offer(0);
            match q.pop().unwrap() {
                Some(c) => {
                    q.complete(c.head(), 0);
                    taken += 1;
                }
                None => break,
            }
            assert!(taken <= 1000, "pop never stopped");
        }
        assert_eq!(taken, 4 * 64);
        assert!(!q.enable_notifications().unwrap());
        assert!(q.take_exhausted());
        assert!(!q.take_exhausted());
        q.refill_budget();
        assert!(q.pop().unwrap().is_some());
    }

    #[test]
    fn held_buffers_given_back_are_taken_again_and_never_used() {
        let mut g = Guest::new();
        for i in 0..4 {
            g.desc(i, 0x5000 + 0x100 * u64::from(i), 16, VRING_DESC_F_WRITE, 0);
            g.offer(i);
        }
        let (mut q, _) = g.queue(0);
        let taken: Vec<u16> = (0..4).map(|_| q.pop().unwrap().unwrap().head()).collect();
        q.complete(taken[0], 8);
        // Heads 1..4 are held; the base moves back over all three.
        assert!(q.give_back(&[taken[3], taken[1], taken[2]]).is_empty());
        assert_eq!(q.next_avail(), 1);
        assert_eq!(q.in_flight(), 0);
        assert_eq!(g.used(), (1, vec![(0, 8)]));
        // The same queue (or the next backend from this base) takes them again.
        let again: Vec<u16> = (0..3).map(|_| q.pop().unwrap().unwrap().head()).collect();
        assert_eq!(again, vec![1, 2, 3]);
    }

    #[test]
    fn only_the_most_recently_taken_heads_can_go_back() {
        let mut g = Guest::new();
        for i in 0..4 {
            g.desc(i, 0x5000 + 0x100 * u64::from(i), 16, VRING_DESC_F_WRITE, 0);
            g.offer(i);
        }
        let (mut q, _) = g.queue(0);
        for _ in 0..4 {
            q.pop().unwrap().unwrap();
        }
        // Head 3 was used after head 1 was taken: 1 cannot go back.
        q.complete(2, 0);
        let left = q.give_back(&[0, 1, 3]);
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.contains(&0) && left.contains(&1));
        assert_eq!(q.next_avail(), 3);
        // A head not in flight is never given back.
        assert_eq!(q.give_back(&[2]), vec![2]);
    }

    #[test]
    fn event_idx_suppresses_interrupts_until_used_event() {
        let mut g = Guest::new();
        for i in 0..4 {
            g.desc(i, 0x5000, 16, 0, 0);
            g.offer(i);
        }
        // Guest wants an interrupt only once used idx passes 3.
        g.mem
            .memory()
            .write_obj(2u16, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
            .unwrap();
        let (mut q, efd) = g.queue(VIRTIO_RING_F_EVENT_IDX);
        let mut heads = vec![];
        while let Some(c) = q.pop().unwrap() {
            heads.push(c.head());
        }
        q.notify(); // first decision after a start: one interrupt, in case a dead predecessor owed one
        assert_eq!(efd.read().unwrap(), 1);
        q.notify(); // nothing used since: no interrupt
        assert!(efd.read().is_err());
        q.complete(heads[0], 0);
        q.notify(); // used idx 1: 1-2-1 = 0xfffe, not < 1
        assert!(efd.read().is_err());
        q.complete(heads[1], 0);
        q.notify(); // used idx 2: 2-2-1 = 0xffff, not < 1
        assert!(efd.read().is_err());
        q.complete(heads[2], 0);
        q.notify(); // used idx 3 crosses used_event 2
        assert_eq!(efd.read().unwrap(), 1);
        assert!(!q.enable_notifications().unwrap());
        let avail_event: u16 = g
            .mem
            .memory()
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(SIZE)))
            .unwrap();
        assert_eq!(avail_event, 4);
    }

    #[test]
    fn completion_logs_written_pages_and_the_used_ring_at_its_log_address() {
        use crate::dirty_log::LogRegion;
        use crate::memory::tests::memfd;
        let mut g = Guest::new();
        g.desc(0, 0x5000, 16, VRING_DESC_F_NEXT, 1);
        // Writable: 0x20 bytes across the 0x7000 page boundary, then a page at 0xa000.
        g.desc(1, 0x6ff0, 0x20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
        g.desc(2, 0xa000, 0x1000, VRING_DESC_F_WRITE, 0);
        g.offer(0);
        g.offer(0);
        let log_fd = memfd(4096);
        let probe = log_fd.try_clone().unwrap();
        let bitmap = || {
            let mut b = [0u8; 8];
            std::os::unix::fs::FileExt::read_at(&probe, &mut b, 0).unwrap();
            (0..64u64)
                .filter(|p| b[(p / 8) as usize] & (1 << (p % 8)) != 0)
                .collect::<Vec<_>>()
        };
        let log = Arc::new(DirtyLog::new(1));
        log.set_region(Some(LogRegion::map(log_fd, 8, 0, 0x20000).unwrap()));
        log.set_used_log(0, Some(0x9000));
        let (mut q, _efd) = g.queue(0);
        q.set_dirty_log(log.clone());

        // LOG_ALL not acked: nothing is marked.
        let c = q.pop().unwrap().unwrap();
        q.complete_chain(&c, 0x21);
        assert_eq!(bitmap(), Vec::<u64>::new());

        log.set_log_all(true);
        g.desc(0, 0x5000, 16, VRING_DESC_F_NEXT, 1);
        let c = q.pop().unwrap().unwrap();
        // 0x20 bytes fill descriptor 1, one more lands on page 0xa; the
        // readable page 5 and the used ring's own page 3 stay clean: the
        // used ring is logged at 0x9000, where SET_VRING_ADDR said.
        q.complete_chain(&c, 0x21);
        assert_eq!(bitmap(), [6, 7, 9, 10]);
        assert_eq!(g.used().0, 2);
    }
}
