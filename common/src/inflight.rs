//! Inflight I/O tracking (vhost-user spec, "Inflight I/O tracking", split
//! rings; a packed ring keeps a record of its own, see
//! [`QueueInflight::packed_record`]).
//!
//! The backend allocates a shared memory area (GET_INFLIGHT_FD) that the
//! frontend keeps; a restarted backend receives it back (SET_INFLIGHT_FD) and
//! learns which requests were taken off the avail ring but never completed,
//! so it can resubmit them. The layout is the one the spec documents, so that
//! another implementation can take over the same region:
//!
//! ```text
//! per queue, 64-byte aligned:
//!   u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//!   desc[desc_num] { u8 inflight; u8 pad[5]; u16 next; u64 counter; }
//! ```
//!
//! A daemon that keeps device state (net, console) makes the area it creates
//! [`crate::state::SECTION_LEN`] bytes longer and keeps its state blob there,
//! after the queues ([`crate::state::StateSection`]); the frontend only
//! keeps the fd and the size the daemon chose, so any frontend carries it.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

use crate::chain::PackedDescriptor;

const HEADER_SIZE: usize = 16;
const DESC_STATE_SIZE: usize = 16;
const ALIGN: usize = 64;
/// Region layout version this implementation writes.
pub const INFLIGHT_VERSION: u16 = 1;
/// `version` of a queue area holding a packed ring's record (see
/// [`QueueInflight::packed_record`]); no spec layout uses it.
pub const PACKED_RECORD_VERSION: u16 = 0xb001;

/// A packed ring's record in the inflight area (see
/// [`QueueInflight::packed_record`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRecord {
    /// The used position and wrap counter (vring-base form).
    pub used: u16,
    /// Buffers marked in flight, by id.
    pub in_flight: Vec<PackedEntry>,
}

/// One buffer a packed ring's record marks in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedEntry {
    /// Buffer id.
    pub id: u16,
    /// Ring slots it took (0: more than 255).
    pub slots: u8,
    /// Its ring descriptor, when it took one slot.
    pub desc: PackedDescriptor,
}

const OFF_FEATURES: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;

/// Bytes one queue's area takes for a queue of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> usize {
    let raw = HEADER_SIZE + DESC_STATE_SIZE * usize::from(queue_size);
    raw.div_ceil(ALIGN) * ALIGN
}

/// Bytes of the largest area a daemon with `num_queues` queues of at most
/// `max_queue_size` entries creates (with a state section when
/// `with_state`): its `RLIMIT_FSIZE` must allow sizing that memfd.
pub fn max_area_size(num_queues: u16, max_queue_size: u16, with_state: bool) -> u64 {
    let queues = queue_region_size(max_queue_size) as u64 * u64::from(num_queues);
    queues
        + if with_state {
            crate::state::SECTION_LEN as u64
        } else {
            0
        }
}

/// Errors setting up an inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for an impossible geometry.
    #[error("invalid inflight geometry: {0} queues of size {1}")]
    BadGeometry(u16, u16),
    /// The area given is smaller than the geometry needs.
    #[error("inflight area of {0} bytes is too small, {1} needed")]
    TooSmall(u64, u64),
    /// The fd is not a file the daemon can map safely.
    #[error("inflight area")]
    NotAFile(#[from] crate::frontend_fd::FdError),
    /// Creating, sizing or mapping the shared memory failed.
    #[error("inflight shared memory")]
    Io(#[from] io::Error),
}

/// The whole shared area: one part per queue, and the device-state section
/// when the area has room for one.
pub struct InflightRegion {
    mapping: Arc<MmapRegion>,
    num_queues: u16,
    queue_size: u16,
    /// Offset of the state section, when mapped.
    section: Option<usize>,
}

impl InflightRegion {
    /// Creates a zeroed area in a new memfd (GET_INFLIGHT_FD); returns it and its fd.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Self, File), InflightError> {
        Self::create_sized(num_queues, queue_size, false)
    }

    /// Like [`InflightRegion::create`], with a device-state section after the queues.
    pub fn create_with_state(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(Self, File), InflightError> {
        Self::create_sized(num_queues, queue_size, true)
    }

    fn create_sized(
        num_queues: u16,
        queue_size: u16,
        with_state: bool,
    ) -> Result<(Self, File), InflightError> {
        if num_queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(InflightError::BadGeometry(num_queues, queue_size));
        }
        let mut size = queue_region_size(queue_size) * usize::from(num_queues);
        if with_state {
            size += crate::state::SECTION_LEN;
        }
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe {
            libc::memfd_create(
                c"bulkhead-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor that we own.
        let file = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        let region = Self::map(file.try_clone()?, 0, size as u64, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps an area the frontend handed back (SET_INFLIGHT_FD), after
    /// checking its size; an area with room for a state section after the
    /// queues gets it mapped too.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::BadGeometry(num_queues, queue_size));
        }
        let queues = (queue_region_size(queue_size) * usize::from(num_queues)) as u64;
        if size < queues {
            return Err(InflightError::TooSmall(size, queues));
        }
        let with_section = queues + crate::state::SECTION_LEN as u64;
        let needed = if size >= with_section {
            with_section
        } else {
            queues
        };
        crate::frontend_fd::regular_file(&file, "inflight area")?;
        // As for guest memory: seal, then check the size (a file that cannot
        // be sealed is still used; the SIGBUS handler covers it).
        if let Err(e) = crate::memory::seal_against_shrinking(&file) {
            crate::rate_limited!(
                log::Level::Warn,
                "inflight area: cannot seal its file against shrinking ({e})"
            );
        }
        let meta = file.metadata()?;
        let end = offset
            .checked_add(needed)
            .ok_or(InflightError::TooSmall(size, needed))?;
        if meta.file_type().is_file() && meta.len() < end {
            return Err(InflightError::TooSmall(meta.len(), end));
        }
        let mapping = MmapRegion::from_file(FileOffset::new(file, offset), needed as usize)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(InflightRegion {
            mapping: Arc::new(mapping),
            num_queues,
            queue_size,
            section: (needed > queues).then_some(queues as usize),
        })
    }

    /// The device-state section, when the area has one.
    pub fn state_section(&self) -> Option<crate::state::StateSection> {
        crate::state::StateSection::new(self.mapping.clone(), self.section?)
    }

    /// Number of queues the area covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue size the area was laid out for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The part for queue `index`, or None if out of range or the queue is larger than the layout.
    pub fn queue(&self, index: u16, queue_size: u16) -> Option<QueueInflight> {
        if index >= self.num_queues || queue_size > self.queue_size {
            return None;
        }
        Some(QueueInflight {
            mapping: self.mapping.clone(),
            base: queue_region_size(self.queue_size) * usize::from(index),
            desc_num: self.queue_size,
            queue_size,
            counter: 0,
        })
    }
}

/// One queue's part of the area, owned by that queue's worker.
pub struct QueueInflight {
    mapping: Arc<MmapRegion>,
    base: usize,
    desc_num: u16,
    queue_size: u16,
    counter: u64,
}

impl QueueInflight {
    #[expect(
        clippy::expect_used,
        reason = "in range by construction: base + region size <= mapping size"
    )]
    fn slice(&self) -> VolatileSlice<'_> {
        self.mapping
            .get_slice(self.base, queue_region_size(self.desc_num))
            .expect("inflight queue area inside its mapping")
    }

    fn write<T: vm_memory::ByteValued>(&self, off: usize, v: T) {
        let _ = self.slice().write_obj(v, off);
    }

    fn read<T: vm_memory::ByteValued + Default>(&self, off: usize) -> T {
        self.slice().read_obj(off).unwrap_or_default()
    }

    fn desc_off(head: u16) -> usize {
        HEADER_SIZE + DESC_STATE_SIZE * usize::from(head)
    }

    /// Prepares the area for a queue start and returns the heads to resubmit,
    /// oldest first. `ring_used_idx` is the used index found in guest memory.
    pub fn recover(&mut self, features: u64, ring_used_idx: u16) -> Vec<u16> {
        let version: u16 = self.read(OFF_VERSION);
        let desc_num: u16 = self.read(OFF_DESC_NUM);
        if version != INFLIGHT_VERSION || desc_num != self.desc_num {
            // Fresh (zeroed) or foreign layout: start clean.
            let _ = self
                .slice()
                .write_slice(&vec![0u8; queue_region_size(self.desc_num)], 0);
            self.write(OFF_FEATURES, features);
            self.write(OFF_DESC_NUM, self.desc_num);
            self.write(OFF_USED_IDX, ring_used_idx);
            fence(Ordering::Release);
            self.write(OFF_VERSION, INFLIGHT_VERSION);
            self.counter = 0;
            return Vec::new();
        }
        // A crash between publishing a used entry and clearing its inflight
        // flag leaves used_idx behind the ring: that head is already done.
        let used_idx: u16 = self.read(OFF_USED_IDX);
        if used_idx != ring_used_idx {
            let last: u16 = self.read(OFF_LAST_BATCH_HEAD);
            if last < self.desc_num {
                self.write(Self::desc_off(last), 0u8);
            }
            fence(Ordering::Release);
            self.write(OFF_USED_IDX, ring_used_idx);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.queue_size)
            .filter(|&h| self.read::<u8>(Self::desc_off(h)) == 1)
            .map(|h| (self.read::<u64>(Self::desc_off(h) + 8), h))
            .collect();
        // Entries beyond the live queue size cannot be valid heads: drop them.
        for h in self.queue_size..self.desc_num {
            self.write(Self::desc_off(h), 0u8);
        }
        pending.sort_unstable();
        // Renumber 1..=n in submission order: the counters came from shared
        // memory, and one near u64::MAX would overflow the next `begin`.
        for (i, &(_, h)) in pending.iter().enumerate() {
            self.write(Self::desc_off(h) + 8, i as u64 + 1);
        }
        self.counter = pending.len() as u64;
        self.write(OFF_FEATURES, features);
        pending.into_iter().map(|p| p.1).collect()
    }

    /// Records that `head` was taken off the avail ring.
    pub fn begin(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.counter += 1;
        let off = Self::desc_off(head);
        self.write(off + 8, self.counter);
        self.write(off + 6, 0u16);
        fence(Ordering::Release);
        self.write(off, 1u8);
    }

    /// Records that `head` went back to the avail ring unused (the queue
    /// rewound its next avail index over it), so nobody resubmits it.
    pub fn abort(&mut self, head: u16) {
        if head < self.desc_num {
            self.write(Self::desc_off(head), 0u8);
            fence(Ordering::Release);
        }
    }

    /// Records that `head` is about to be published in the used ring.
    pub fn before_used(&mut self, head: u16) {
        self.write(OFF_LAST_BATCH_HEAD, head);
        fence(Ordering::Release);
    }

    /// Records that `head` was published and the ring's used index is now `used_idx`.
    pub fn after_used(&mut self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.write(Self::desc_off(head), 0u8);
        }
        fence(Ordering::Release);
        self.write(OFF_USED_IDX, used_idx);
    }

    /// A packed ring's record at its start, or None when the area holds
    /// none (fresh, foreign, or dropped by [`QueueInflight::packed_forget`]):
    /// the area is then set up for a packed ring at `used`.
    ///
    /// A packed ring's area holds Bulkhead's own record, not the spec's
    /// packed layout, in the split layout's place: `version` is
    /// [`PACKED_RECORD_VERSION`] (no split implementation takes it for its
    /// own), `used_idx` is the device's used position and wrap counter, and
    /// `desc[id]` describes buffer `id`: byte 0 set while it is in flight,
    /// byte 1 the ring slots it took (0: more than 255), and for a buffer of
    /// one slot its descriptor (flags at 2, len at 4, addr at 8), so that it
    /// can be resubmitted though its ring slot was reused. The avail
    /// position is the used one plus the slots in flight.
    pub fn packed_record(&mut self, features: u64, used: u16) -> Option<PackedRecord> {
        let version: u16 = self.read(OFF_VERSION);
        let desc_num: u16 = self.read(OFF_DESC_NUM);
        if version != PACKED_RECORD_VERSION || desc_num != self.desc_num {
            let _ = self
                .slice()
                .write_slice(&vec![0u8; queue_region_size(self.desc_num)], 0);
            self.write(OFF_FEATURES, features);
            self.write(OFF_DESC_NUM, self.desc_num);
            self.write(OFF_USED_IDX, used);
            fence(Ordering::Release);
            self.write(OFF_VERSION, PACKED_RECORD_VERSION);
            return None;
        }
        self.write(OFF_FEATURES, features);
        let in_flight = (0..self.queue_size)
            .filter(|&id| self.read::<u8>(Self::desc_off(id)) != 0)
            .map(|id| {
                let off = Self::desc_off(id);
                PackedEntry {
                    id,
                    slots: self.read(off + 1),
                    desc: PackedDescriptor {
                        addr: self.read(off + 8),
                        len: self.read(off + 4),
                        id,
                        flags: self.read(off + 2),
                    },
                }
            })
            .collect();
        // Marks beyond the live queue size cannot be valid ids: drop them.
        for id in self.queue_size..self.desc_num {
            self.write(Self::desc_off(id), 0u8);
        }
        Some(PackedRecord {
            used: self.read(OFF_USED_IDX),
            in_flight,
        })
    }

    /// The ring slots buffer `id` took when it was last taken (0: unknown).
    pub fn packed_slots(&self, id: u16) -> u8 {
        if id < self.desc_num {
            self.read(Self::desc_off(id) + 1)
        } else {
            0
        }
    }

    /// Records the used position (vring-base form).
    pub fn packed_set_used(&mut self, used: u16) {
        self.write(OFF_USED_IDX, used);
        fence(Ordering::Release);
    }

    /// Records that packed buffer `id`, of `slots` ring slots, was taken;
    /// `desc`: its one ring descriptor (as copied), for a one-slot buffer.
    pub fn packed_begin(&mut self, id: u16, slots: u16, desc: Option<&PackedDescriptor>) {
        if id >= self.desc_num {
            return;
        }
        let off = Self::desc_off(id);
        self.write(off + 1, u8::try_from(slots).unwrap_or(0));
        if let Some(d) = desc {
            self.write(off + 2, d.flags);
            self.write(off + 4, d.len);
            self.write(off + 8, d.addr);
        }
        fence(Ordering::Release);
        self.write(off, 1u8);
        fence(Ordering::Release);
    }

    /// Records that packed buffer `id` was published as used and the used
    /// position is now `used`. The mark goes first: a crash between the two
    /// leaves the used descriptor in the ring at the recorded position,
    /// where the next backend finds it (`VirtQueue` start), and never a
    /// buffer both used and resubmitted.
    pub fn packed_used(&mut self, id: u16, used: u16) {
        if id < self.desc_num {
            self.write(Self::desc_off(id), 0u8);
        }
        fence(Ordering::Release);
        self.write(OFF_USED_IDX, used);
        fence(Ordering::Release);
    }

    /// Records that packed buffer `id` went back to the driver unused.
    pub fn packed_abort(&mut self, id: u16) {
        if id < self.desc_num {
            self.write(Self::desc_off(id), 0u8);
            fence(Ordering::Release);
        }
    }

    /// Drops a packed ring's record (the frontend holds the exact base now):
    /// the next start takes the frontend's base.
    pub fn packed_forget(&mut self) {
        if self.read::<u16>(OFF_VERSION) == PACKED_RECORD_VERSION {
            self.write(OFF_VERSION, 0u16);
            fence(Ordering::Release);
        }
    }

    /// Heads currently marked in flight (for tests and diagnostics).
    pub fn pending(&self) -> Vec<u16> {
        (0..self.queue_size)
            .filter(|&h| self.read::<u8>(Self::desc_off(h)) == 1)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_size_follows_spec_layout() {
        assert_eq!(queue_region_size(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_region_size(256) % 64, 0);
    }

    #[test]
    fn resubmits_in_submission_order_after_restart() {
        let (region, file) = InflightRegion::create(2, 8).unwrap();
        let mut q = region.queue(1, 8).unwrap();
        assert!(q.recover(0, 0).is_empty());
        q.begin(5);
        q.begin(2);
        q.begin(7);
        q.before_used(2);
        q.after_used(2, 1);
        drop(q);
        drop(region);
        // A new process maps the same fd.
        let size = file.metadata().unwrap().len();
        let region = InflightRegion::map(file, 0, size, 2, 8).unwrap();
        let mut q = region.queue(1, 8).unwrap();
        assert_eq!(q.recover(0, 1), vec![5, 7]);
        let mut other = region.queue(0, 8).unwrap();
        assert!(other.recover(0, 0).is_empty());
    }

    #[test]
    fn crash_between_used_and_clear_is_not_resubmitted() {
        let (region, _file) = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0, 8).unwrap();
        q.recover(0, 0);
        q.begin(3);
        q.begin(4);
        q.before_used(3);
        // Crash here: the ring's used idx went to 1, the area still says 0.
        assert_eq!(q.recover(0, 1), vec![4]);
    }

    #[test]
    fn counters_from_the_area_are_renumbered_so_begin_cannot_overflow() {
        // Found by the `inflight` fuzz target: a counter of u64::MAX in the
        // area overflowed the counter of the next request.
        let (region, file) = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0, 8).unwrap();
        q.recover(0, 0);
        q.begin(1);
        q.begin(4);
        drop(q);
        let desc = |h: u64| HEADER_SIZE as u64 + DESC_STATE_SIZE as u64 * h + 8;
        use std::os::unix::fs::FileExt;
        file.write_all_at(&u64::MAX.to_le_bytes(), desc(1)).unwrap();
        file.write_all_at(&7u64.to_le_bytes(), desc(4)).unwrap();
        let mut q = region.queue(0, 8).unwrap();
        assert_eq!(q.recover(0, 0), vec![4, 1]);
        q.begin(2);
        drop(q);
        let mut q = region.queue(0, 8).unwrap();
        assert_eq!(q.recover(0, 0), vec![4, 1, 2]);
    }

    #[test]
    fn an_area_created_with_state_maps_back_with_its_section() {
        use crate::state::{SECTION_LEN, Stored};
        let (region, file) = InflightRegion::create_with_state(2, 8).unwrap();
        let size = file.metadata().unwrap().len();
        assert_eq!(size as usize, 2 * queue_region_size(8) + SECTION_LEN);
        region.state_section().unwrap().store(b"blob").unwrap();
        drop(region);
        let again = InflightRegion::map(file.try_clone().unwrap(), 0, size, 2, 8).unwrap();
        assert_eq!(
            again.state_section().unwrap().load(),
            Stored::Blob(b"blob".to_vec())
        );
        // The queue part alone (as another implementation sizes it): no section.
        let queues = 2 * queue_region_size(8) as u64;
        let short = InflightRegion::map(file, 0, queues, 2, 8).unwrap();
        assert!(short.state_section().is_none());
        let (plain, _) = InflightRegion::create(2, 8).unwrap();
        assert!(plain.state_section().is_none());
    }

    #[test]
    fn an_aborted_head_is_not_resubmitted() {
        let (region, _file) = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0, 8).unwrap();
        q.recover(0, 0);
        q.begin(1);
        q.begin(2);
        q.abort(2);
        assert_eq!(q.recover(0, 0), vec![1]);
    }

    #[test]
    fn packed_record_keeps_positions_slots_and_one_slot_descriptors() {
        let (region, file) = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0, 8).unwrap();
        assert_eq!(q.packed_record(0, 0x8000), None);
        let d = PackedDescriptor {
            addr: 0x1234_5678,
            len: 99,
            id: 3,
            flags: 6,
        };
        q.packed_begin(3, 1, Some(&d));
        q.packed_begin(5, 3, None);
        q.packed_begin(6, 1, Some(&d));
        q.packed_used(6, 0x8001);
        q.packed_begin(7, 1, Some(&d));
        q.packed_abort(7);
        drop(q);
        // A new process maps the same fd.
        let size = file.metadata().unwrap().len();
        let region = InflightRegion::map(file, 0, size, 1, 8).unwrap();
        let mut q = region.queue(0, 8).unwrap();
        let rec = q.packed_record(0, 0x8000).unwrap();
        assert_eq!(rec.used, 0x8001);
        assert_eq!(
            rec.in_flight,
            vec![
                PackedEntry {
                    id: 3,
                    slots: 1,
                    desc: d
                },
                PackedEntry {
                    id: 5,
                    slots: 3,
                    desc: PackedDescriptor {
                        id: 5,
                        ..Default::default()
                    }
                },
            ]
        );
        assert_eq!(q.packed_slots(6), 1);
        assert_eq!(q.pending(), vec![3, 5]);
        // Once the frontend holds the base, the record is gone.
        q.packed_forget();
        assert_eq!(q.packed_record(0, 0x8000), None);
        // A split start after a packed one starts clean, and back.
        assert!(q.recover(0, 0).is_empty());
        assert_eq!(q.packed_record(0, 0x8000), None);
    }

    #[test]
    fn rejects_short_areas() {
        let (_r, file) = InflightRegion::create(1, 8).unwrap();
        assert!(matches!(
            InflightRegion::map(file, 0, 64, 4, 8),
            Err(InflightError::TooSmall(..))
        ));
        assert!(InflightRegion::create(1, 6).is_err());
    }
}
