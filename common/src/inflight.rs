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
//!
//! Packed rings keep their own record in a queue's part
//! ([`QueueInflight::packed_record`]); when the features acked before
//! GET_INFLIGHT_FD include VIRTIO_F_RING_PACKED (or none were set yet), the
//! area also gets one descriptor table per queue, last:
//!
//! ```text
//! queues (split layout above) | state section (if any) | descriptor tables:
//!   header, 64 bytes: magic "BHPT"; u16 version 1; u16 num_queues; u16 queue_size
//!   per queue, queue_size entries: { u64 addr; u32 len; u16 flags; u16 next; }
//! ```
//!
//! A packed buffer of several ring slots (a direct chain) is copied there as
//! it is taken: one entry per ring descriptor, linked by `next`, so that a
//! restarted backend can resubmit it though its ring slots were reused. The
//! split layout and every offset before the tables are unchanged, so an
//! area with tables is still a spec area to another implementation, and an
//! older daemon's area (no tables) still works, without that one thing.
//! The tables' header says where they are (after the queues, or after the
//! state section); an area whose header is missing or names another
//! geometry has none. Which entries are free is known only to the backend
//! (rebuilt at each start from the buffers in flight), so the shared part
//! needs no crash protocol beyond the order of [`QueueInflight::packed_begin`].

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

use crate::chain::PackedDescriptor;

const HEADER_SIZE: usize = 16;
const DESC_STATE_SIZE: usize = 16;
const ALIGN: usize = 64;
/// Header of the descriptor tables: magic, version, geometry, padded.
const TABLES_HEADER: usize = 64;
const TABLES_MAGIC: [u8; 4] = *b"BHPT";
const TABLES_VERSION: u16 = 1;
/// Bytes of one descriptor-table entry.
const TABLE_ENTRY_SIZE: usize = 16;
/// `next` of a chain's last entry.
const TABLE_END: u16 = u16::MAX;
/// Mixed into a multi-slot buffer's record with its chain's head and
/// length ([`chain_tag`]): what says the chain was recorded, by this code.
const CHAIN_TAG: u64 = 0xb001_7ab1_0000_0000;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedEntry {
    /// Buffer id.
    pub id: u16,
    /// Ring slots it took (exact when `descs` is not empty; otherwise the
    /// record's byte, 0 for more than 255).
    pub slots: u16,
    /// Its ring descriptors as copied when it was taken, in chain order;
    /// empty when they were not recorded (a buffer of several slots in an
    /// area without descriptor tables): it cannot be resubmitted.
    pub descs: Vec<PackedDescriptor>,
}

/// A packed ring's record that cannot be true: the area is shared with the
/// frontend, and nothing in it is trusted. The queue does not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PackedRecordError {
    /// A chain's recorded length disagrees with the buffer's ring slots or exceeds the queue.
    #[error("buffer {id}: a chain of {count} descriptors for {slots} ring slot(s) (0: over 255)")]
    ChainLength {
        /// Buffer id.
        id: u16,
        /// Descriptors the record claims.
        count: u32,
        /// The record's slot byte.
        slots: u8,
    },
    /// A chain links to an entry outside its descriptor table.
    #[error("buffer {id}: descriptor table entry {entry} is out of range")]
    EntryOutOfRange {
        /// Buffer id.
        id: u16,
        /// The entry index found.
        entry: u16,
    },
    /// A chain reaches an entry already taken (a cycle, or two chains sharing it).
    #[error("buffer {id}: descriptor table entry {entry} is reached twice")]
    EntryReused {
        /// Buffer id.
        id: u16,
        /// The entry index found.
        entry: u16,
    },
    /// A descriptor's NEXT flag disagrees with its place in the chain.
    #[error("buffer {id}: descriptor {index} of its chain has a wrong NEXT flag")]
    NextFlag {
        /// Buffer id.
        id: u16,
        /// Position in the chain.
        index: u16,
    },
    /// The buffers in flight take more slots than the ring has.
    #[error("buffers in flight take {0} ring slots, more than the ring's {1}")]
    TooManySlots(u32, u16),
}

/// One entry of a packed queue's descriptor table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TableEntry {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

// SAFETY: plain old data, every bit pattern valid.
unsafe impl vm_memory::ByteValued for TableEntry {}

/// What says buffer `id`'s chain of `count` descriptors from entry `head` was recorded.
fn chain_tag(id: u16, head: u16, count: u32) -> u64 {
    CHAIN_TAG ^ (u64::from(id) | u64::from(head) << 16 | u64::from(count) << 32)
}

/// What an area holds besides the queues' records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AreaParts {
    /// A device-state section ([`crate::state::StateSection`]).
    pub state: bool,
    /// Descriptor tables for packed rings' buffers of several slots.
    pub packed_tables: bool,
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

/// Bytes of the descriptor tables for `num_queues` packed queues of `queue_size`.
pub fn tables_size(num_queues: u16, queue_size: u16) -> usize {
    TABLES_HEADER + TABLE_ENTRY_SIZE * usize::from(queue_size) * usize::from(num_queues)
}

/// Bytes of an area for `num_queues` queues of `queue_size` entries with `parts`.
pub fn area_size(num_queues: u16, queue_size: u16, parts: AreaParts) -> u64 {
    let mut size = queue_region_size(queue_size) as u64 * u64::from(num_queues);
    if parts.state {
        size += crate::state::SECTION_LEN as u64;
    }
    if parts.packed_tables {
        size += tables_size(num_queues, queue_size) as u64;
    }
    size
}

/// Bytes of the largest area a daemon with `num_queues` queues of at most
/// `max_queue_size` entries creates (with a state section when
/// `with_state`; descriptor tables always, for packed rings): its
/// `RLIMIT_FSIZE` must allow sizing that memfd.
pub fn max_area_size(num_queues: u16, max_queue_size: u16, with_state: bool) -> u64 {
    let parts = AreaParts {
        state: with_state,
        packed_tables: true,
    };
    area_size(num_queues, max_queue_size, parts)
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
    /// Offset of the descriptor tables (their header), when the area has them.
    tables: Option<usize>,
}

impl InflightRegion {
    /// Creates a zeroed area in a new memfd (GET_INFLIGHT_FD); returns it and its fd.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Self, File), InflightError> {
        Self::create_with(num_queues, queue_size, AreaParts::default())
    }

    /// Like [`InflightRegion::create`], with a device-state section after the queues.
    pub fn create_with_state(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(Self, File), InflightError> {
        let parts = AreaParts {
            state: true,
            packed_tables: false,
        };
        Self::create_with(num_queues, queue_size, parts)
    }

    /// Like [`InflightRegion::create`], with the parts asked for after the queues.
    pub fn create_with(
        num_queues: u16,
        queue_size: u16,
        parts: AreaParts,
    ) -> Result<(Self, File), InflightError> {
        if num_queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(InflightError::BadGeometry(num_queues, queue_size));
        }
        let size = area_size(num_queues, queue_size, parts) as usize;
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
        let mut region = Self::map(file.try_clone()?, 0, size as u64, num_queues, queue_size)?;
        if parts.packed_tables {
            // Through the mapping (the sandbox allows no pwrite), before the
            // area is handed out; then the layout is read as a new process
            // reads it.
            let at = size - tables_size(num_queues, queue_size);
            let mut header = [0u8; 10];
            header[..4].copy_from_slice(&TABLES_MAGIC);
            header[4..6].copy_from_slice(&TABLES_VERSION.to_le_bytes());
            header[6..8].copy_from_slice(&num_queues.to_le_bytes());
            header[8..10].copy_from_slice(&queue_size.to_le_bytes());
            region
                .mapping
                .get_slice(at, header.len())
                .and_then(|s| s.write_slice(&header, 0))
                .map_err(|e| io::Error::other(e.to_string()))?;
            (region.section, region.tables) =
                locate(&region.mapping, size as u64, num_queues, queue_size);
        }
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
        // The largest of the layouts this code creates that the size allows;
        // which one it is, the tables' header says once mapped.
        let section = crate::state::SECTION_LEN as u64;
        let tables = tables_size(num_queues, queue_size) as u64;
        let needed = [
            queues + section + tables,
            queues + tables.max(section),
            queues + tables.min(section),
            queues,
        ]
        .into_iter()
        .find(|&n| n <= size)
        .unwrap_or(queues);
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
        let (section_at, tables_at) = locate(&mapping, needed, num_queues, queue_size);
        Ok(InflightRegion {
            mapping: Arc::new(mapping),
            num_queues,
            queue_size,
            section: section_at,
            tables: tables_at,
        })
    }

    /// Whether the area has descriptor tables (packed rings' buffers of
    /// several slots can then be resubmitted).
    pub fn has_packed_tables(&self) -> bool {
        self.tables.is_some()
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
        let table = self.tables.map(|t| {
            t + TABLES_HEADER + TABLE_ENTRY_SIZE * usize::from(self.queue_size) * usize::from(index)
        });
        Some(QueueInflight {
            mapping: self.mapping.clone(),
            base: queue_region_size(self.queue_size) * usize::from(index),
            desc_num: self.queue_size,
            queue_size,
            counter: 0,
            table,
            chains: Chains::default(),
        })
    }
}

/// Where the state section and the descriptor tables of a mapped area of
/// `len` bytes lie: the tables right after the queues (no state section),
/// or after the section, where their header says so (a state section's own
/// header never reads as theirs); the section after the queues when there
/// is room for it and the tables are not there.
fn locate(
    mapping: &MmapRegion,
    len: u64,
    num_queues: u16,
    queue_size: u16,
) -> (Option<usize>, Option<usize>) {
    let queues = (queue_region_size(queue_size) * usize::from(num_queues)) as u64;
    let section = crate::state::SECTION_LEN as u64;
    let tables = tables_size(num_queues, queue_size) as u64;
    let tables_at = [queues, queues + section].into_iter().find(|&at| {
        at + tables <= len && tables_header_ok(mapping, at as usize, num_queues, queue_size)
    });
    let section_at = match tables_at {
        Some(at) if at == queues => None,
        _ => (len >= queues + section).then_some(queues as usize),
    };
    (section_at, tables_at.map(|at| at as usize))
}

/// Whether the descriptor tables' header at `at` names this geometry.
fn tables_header_ok(mapping: &MmapRegion, at: usize, num_queues: u16, queue_size: u16) -> bool {
    let Ok(s) = mapping.get_slice(at, TABLES_HEADER) else {
        return false;
    };
    let mut h = [0u8; 10];
    if s.read_slice(&mut h, 0).is_err() {
        return false;
    }
    h[..4] == TABLES_MAGIC
        && h[4..6] == TABLES_VERSION.to_le_bytes()
        && h[6..8] == num_queues.to_le_bytes()
        && h[8..10] == queue_size.to_le_bytes()
}

/// A packed queue's private view of its descriptor table: which entries
/// are free, and which each buffer in flight holds. Never shared, so it
/// needs no crash protocol: a new backend rebuilds it from the record.
#[derive(Default)]
struct Chains {
    /// Free entries (a stack).
    free: Vec<u16>,
    /// Per buffer id: its chain's head entry and length (0: none).
    of: Vec<(u16, u16)>,
    /// Per entry: the next one of its chain, as written to the table.
    next: Vec<u16>,
}

impl Chains {
    /// All `n` entries free.
    fn reset(&mut self, n: u16) {
        self.free = (0..n).rev().collect();
        self.of = vec![(0, 0); usize::from(n)];
        self.next = vec![TABLE_END; usize::from(n)];
    }

    /// Returns buffer `id`'s entries, if it holds any, to the free list.
    fn release(&mut self, id: u16) {
        let Some(&(head, count)) = self.of.get(usize::from(id)) else {
            return;
        };
        self.of[usize::from(id)] = (0, 0);
        let mut e = head;
        for _ in 0..count {
            let Some(&next) = self.next.get(usize::from(e)) else {
                return;
            };
            self.free.push(e);
            e = next;
        }
    }
}

/// One queue's part of the area, owned by that queue's worker.
pub struct QueueInflight {
    mapping: Arc<MmapRegion>,
    base: usize,
    desc_num: u16,
    queue_size: u16,
    counter: u64,
    /// Offset of this queue's descriptor table in the mapping, when the area has tables.
    table: Option<usize>,
    /// Private bookkeeping of the table (set up by [`QueueInflight::packed_record`]).
    chains: Chains,
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
    /// the area is then set up for a packed ring at `used`. A record that
    /// cannot be true (a chain that leaves its table, loops, or shares an
    /// entry with another) is an error, and the area is left as found.
    ///
    /// A packed ring's area holds Bulkhead's own record, not the spec's
    /// packed layout, in the split layout's place: `version` is
    /// [`PACKED_RECORD_VERSION`] (no split implementation takes it for its
    /// own), `used_idx` is the device's used position and wrap counter, and
    /// `desc[id]` describes buffer `id`: byte 0 set while it is in flight,
    /// byte 1 the ring slots it took (0: more than 255), then
    ///
    /// - for a buffer of one slot, its descriptor (flags at 2, len at 4,
    ///   addr at 8);
    /// - for a buffer of several, when the area has descriptor tables, its
    ///   chain's head entry in this queue's table (u16 at 2), its length
    ///   (u32 at 4), and at 8 a tag mixing both with the id ([`chain_tag`]),
    ///   which says the chain was recorded; the chain's entries follow
    ///   `next` from the head, exactly that many.
    ///
    /// An older daemon that takes the area over reads this record as it
    /// always did (it ignores bytes 2..16 of a buffer of several slots), so
    /// the version stays. A completion clears the tag before the mark, so no
    /// tag outlives its buffer for an older daemon to leave behind. The
    /// avail position is the used one plus the slots in flight.
    pub fn packed_record(
        &mut self,
        features: u64,
        used: u16,
    ) -> Result<Option<PackedRecord>, PackedRecordError> {
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
            self.chains.reset(self.table_entries());
            return Ok(None);
        }
        // Entries reachable from a buffer in flight are taken, the rest free.
        let mut taken = vec![false; usize::from(self.table_entries())];
        let mut in_flight = Vec::new();
        let mut chains = Vec::new();
        for id in 0..self.queue_size {
            let off = Self::desc_off(id);
            if self.read::<u8>(off) == 0 {
                continue;
            }
            let byte: u8 = self.read(off + 1);
            let entry = if byte == 1 {
                PackedEntry {
                    id,
                    slots: 1,
                    descs: vec![PackedDescriptor {
                        addr: self.read(off + 8),
                        len: self.read(off + 4),
                        id,
                        flags: self.read(off + 2),
                    }],
                }
            } else {
                match self.read_chain(id, byte, &mut taken)? {
                    Some((head, descs)) => {
                        chains.push((id, head, descs.len() as u16));
                        PackedEntry {
                            id,
                            slots: descs.len() as u16,
                            descs,
                        }
                    }
                    None => PackedEntry {
                        id,
                        slots: u16::from(byte),
                        descs: Vec::new(),
                    },
                }
            };
            in_flight.push(entry);
        }
        self.write(OFF_FEATURES, features);
        // Marks beyond the live queue size cannot be valid ids: drop them.
        for id in self.queue_size..self.desc_num {
            self.write(Self::desc_off(id), 0u8);
        }
        self.chains.reset(self.table_entries());
        self.chains.free.retain(|&e| !taken[usize::from(e)]);
        for (id, head, count) in chains {
            self.chains.of[usize::from(id)] = (head, count);
            let mut e = head;
            for _ in 0..count {
                let next = self.table_entry(e).next;
                self.chains.next[usize::from(e)] = next;
                e = next;
            }
        }
        Ok(Some(PackedRecord {
            used: self.read(OFF_USED_IDX),
            in_flight,
        }))
    }

    /// Entries in this queue's descriptor table (0: the area has none).
    fn table_entries(&self) -> u16 {
        if self.table.is_some() {
            self.desc_num
        } else {
            0
        }
    }

    /// Whether the area has a descriptor table for this queue (a packed
    /// buffer of several slots left in flight can then be resubmitted).
    pub fn has_table(&self) -> bool {
        self.table.is_some()
    }

    #[expect(
        clippy::expect_used,
        reason = "in range by construction: the tables lie inside the mapping and e < desc_num"
    )]
    fn table_slice(&self, e: u16) -> Option<VolatileSlice<'_>> {
        let t = self.table?;
        (e < self.desc_num).then(|| {
            self.mapping
                .get_slice(t + TABLE_ENTRY_SIZE * usize::from(e), TABLE_ENTRY_SIZE)
                .expect("descriptor table entry inside its mapping")
        })
    }

    fn table_entry(&self, e: u16) -> TableEntry {
        self.table_slice(e)
            .and_then(|s| s.read_obj(0).ok())
            .unwrap_or_default()
    }

    /// Buffer `id`'s chain from the table: its head entry and descriptors,
    /// None when the record holds none for it (no tables, no tag), or an
    /// error when what it holds cannot be true. `byte` is the record's slot
    /// byte; entries reached are marked in `taken`, which must hold none
    /// twice across all buffers.
    fn read_chain(
        &self,
        id: u16,
        byte: u8,
        taken: &mut [bool],
    ) -> Result<Option<(u16, Vec<PackedDescriptor>)>, PackedRecordError> {
        if self.table.is_none() {
            return Ok(None);
        }
        let off = Self::desc_off(id);
        let head: u16 = self.read(off + 2);
        let count: u32 = self.read(off + 4);
        if self.read::<u64>(off + 8) != chain_tag(id, head, count) {
            return Ok(None);
        }
        let agrees = if count > 255 {
            byte == 0
        } else {
            u32::from(byte) == count
        };
        if count < 2 || count > u32::from(self.queue_size) || !agrees {
            return Err(PackedRecordError::ChainLength {
                id,
                count,
                slots: byte,
            });
        }
        let mut descs = Vec::with_capacity(count as usize);
        let mut e = head;
        for i in 0..count as u16 {
            let Some(seen) = taken.get_mut(usize::from(e)) else {
                return Err(PackedRecordError::EntryOutOfRange { id, entry: e });
            };
            if std::mem::replace(seen, true) {
                return Err(PackedRecordError::EntryReused { id, entry: e });
            }
            let t = self.table_entry(e);
            let last = u32::from(i) + 1 == count;
            if (t.flags & crate::spec::ring::VRING_DESC_F_NEXT == 0) != last {
                return Err(PackedRecordError::NextFlag { id, index: i });
            }
            descs.push(PackedDescriptor {
                addr: t.addr,
                len: t.len,
                id,
                flags: t.flags,
            });
            e = t.next;
        }
        Ok(Some((head, descs)))
    }

    /// The ring slots buffer `id` took when it was last taken (0: unknown).
    pub fn packed_slots(&self, id: u16) -> u16 {
        if id >= self.desc_num {
            return 0;
        }
        let off = Self::desc_off(id);
        match self.read::<u8>(off + 1) {
            // More than 255: the chain's length, kept when the tag is cleared.
            0 => match self.read::<u32>(off + 4) {
                n @ 256.. if n <= u32::from(self.queue_size) => n as u16,
                _ => 0,
            },
            n => u16::from(n),
        }
    }

    /// Records the used position (vring-base form).
    pub fn packed_set_used(&mut self, used: u16) {
        self.write(OFF_USED_IDX, used);
        fence(Ordering::Release);
    }

    /// Records that packed buffer `id` was taken, with `ring`: its ring
    /// descriptors as copied (one per slot it took). A buffer of one slot
    /// keeps its descriptor in its record; one of several, when the area has
    /// descriptor tables, its chain in free entries of this queue's table,
    /// written (links included) before the record that names them, and the
    /// mark last: a backend killed before the mark leaves only garbage in
    /// entries nobody holds.
    pub fn packed_begin(&mut self, id: u16, ring: &[PackedDescriptor]) {
        if id >= self.desc_num {
            return;
        }
        self.chains.release(id);
        let off = Self::desc_off(id);
        let slots = ring.len();
        self.write(off + 1, u8::try_from(slots).unwrap_or(0));
        match ring {
            [d] => {
                self.write(off + 2, d.flags);
                self.write(off + 4, d.len);
                self.write(off + 8, d.addr);
            }
            _ if self.table.is_some()
                && slots >= 2
                && slots <= self.chains.free.len()
                && slots <= usize::from(self.queue_size) =>
            {
                let entries = self.chains.free.split_off(self.chains.free.len() - slots);
                for (i, d) in ring.iter().enumerate() {
                    let e = entries[slots - 1 - i];
                    let next = if i + 1 < slots {
                        entries[slots - 2 - i]
                    } else {
                        TABLE_END
                    };
                    self.chains.next[usize::from(e)] = next;
                    if let Some(s) = self.table_slice(e) {
                        let entry = TableEntry {
                            addr: d.addr,
                            len: d.len,
                            flags: d.flags,
                            next,
                        };
                        let _ = s.write_obj(entry, 0);
                    }
                }
                let head = entries[slots - 1];
                self.chains.of[usize::from(id)] = (head, slots as u16);
                self.write(off + 2, head);
                self.write(off + 4, slots as u32);
                fence(Ordering::Release);
                self.write(off + 8, chain_tag(id, head, slots as u32));
            }
            // No table (an older daemon's area), or no room (cannot happen:
            // the slots in flight never exceed the ring): not recorded.
            _ => {
                self.write(off + 4, slots as u32);
                self.write(off + 8, 0u64);
            }
        }
        fence(Ordering::Release);
        self.write(off, 1u8);
        fence(Ordering::Release);
    }

    /// Clears buffer `id`'s mark, its chain's tag first, and frees its entries.
    fn packed_clear(&mut self, id: u16) {
        let off = Self::desc_off(id);
        if self
            .chains
            .of
            .get(usize::from(id))
            .is_some_and(|c| c.1 != 0)
        {
            self.write(off + 8, 0u64);
            fence(Ordering::Release);
        }
        self.write(off, 0u8);
        self.chains.release(id);
    }

    /// Records that packed buffer `id` was published as used and the used
    /// position is now `used`. The mark goes first: a crash between the two
    /// leaves the used descriptor in the ring at the recorded position,
    /// where the next backend finds it (`VirtQueue` start), and never a
    /// buffer both used and resubmitted.
    pub fn packed_used(&mut self, id: u16, used: u16) {
        if id < self.desc_num {
            self.packed_clear(id);
        }
        fence(Ordering::Release);
        self.write(OFF_USED_IDX, used);
        fence(Ordering::Release);
    }

    /// Records that packed buffer `id` went back to the driver unused.
    pub fn packed_abort(&mut self, id: u16) {
        if id < self.desc_num {
            self.packed_clear(id);
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
    use crate::spec::ring::VRING_DESC_F_NEXT;

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
        // An area without descriptor tables (as an older daemon made it).
        let (region, file) = InflightRegion::create(1, 8).unwrap();
        assert!(!region.has_packed_tables());
        let mut q = region.queue(0, 8).unwrap();
        assert_eq!(q.packed_record(0, 0x8000), Ok(None));
        let d = PackedDescriptor {
            addr: 0x1234_5678,
            len: 99,
            id: 3,
            flags: 6,
        };
        q.packed_begin(3, &[d]);
        q.packed_begin(5, &[d; 3]);
        q.packed_begin(6, &[d]);
        q.packed_used(6, 0x8001);
        q.packed_begin(7, &[d]);
        q.packed_abort(7);
        drop(q);
        // A new process maps the same fd.
        let size = file.metadata().unwrap().len();
        let region = InflightRegion::map(file, 0, size, 1, 8).unwrap();
        let mut q = region.queue(0, 8).unwrap();
        let rec = q.packed_record(0, 0x8000).unwrap().unwrap();
        assert_eq!(rec.used, 0x8001);
        assert_eq!(
            rec.in_flight,
            vec![
                PackedEntry {
                    id: 3,
                    slots: 1,
                    descs: vec![d]
                },
                // Three slots, not recorded: no table to keep them in.
                PackedEntry {
                    id: 5,
                    slots: 3,
                    descs: Vec::new(),
                },
            ]
        );
        assert_eq!(q.packed_slots(6), 1);
        assert_eq!(q.pending(), vec![3, 5]);
        // Once the frontend holds the base, the record is gone.
        q.packed_forget();
        assert_eq!(q.packed_record(0, 0x8000), Ok(None));
        // A split start after a packed one starts clean, and back.
        assert!(q.recover(0, 0).is_empty());
        assert_eq!(q.packed_record(0, 0x8000), Ok(None));
    }

    const PACKED: AreaParts = AreaParts {
        state: false,
        packed_tables: true,
    };

    /// A chain of `n` ring descriptors of buffer `id` (NEXT on all but the last).
    fn chain(id: u16, n: u16) -> Vec<PackedDescriptor> {
        (0..n)
            .map(|i| PackedDescriptor {
                addr: 0x10_000 * u64::from(id) + 0x100 * u64::from(i),
                len: 16 + u32::from(i),
                id,
                flags: (if i + 1 < n { VRING_DESC_F_NEXT } else { 0 }) | (2 * (i & 1)),
            })
            .collect()
    }

    /// Maps `file` again, as a new process does.
    fn remap(file: &File, nq: u16, qs: u16) -> InflightRegion {
        let size = file.metadata().unwrap().len();
        InflightRegion::map(file.try_clone().unwrap(), 0, size, nq, qs).unwrap()
    }

    #[test]
    fn multi_slot_chains_are_recorded_in_the_table_and_recovered_once() {
        let (region, file) = InflightRegion::create_with(2, 8, PACKED).unwrap();
        assert!(region.has_packed_tables());
        let mut q = region.queue(1, 8).unwrap();
        assert_eq!(q.packed_record(0, 0x8000), Ok(None));
        q.packed_begin(2, &chain(2, 3));
        q.packed_begin(4, &chain(4, 1));
        q.packed_begin(6, &chain(6, 2));
        q.packed_begin(1, &chain(1, 3));
        // Completed and given back: their entries go back to the free list
        // and are taken again.
        q.packed_used(6, 0x8002);
        q.packed_abort(1);
        q.packed_begin(0, &chain(0, 4));
        drop(q);
        let region = remap(&file, 2, 8);
        let mut q = region.queue(1, 8).unwrap();
        let rec = q.packed_record(0, 0x8000).unwrap().unwrap();
        assert_eq!(rec.used, 0x8002);
        let got: Vec<(u16, u16, Vec<PackedDescriptor>)> = rec
            .in_flight
            .into_iter()
            .map(|e| (e.id, e.slots, e.descs))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 4, chain(0, 4)),
                (2, 3, chain(2, 3)),
                (4, 1, chain(4, 1)),
            ]
        );
        // The other queue's part is untouched.
        assert_eq!(
            region.queue(0, 8).unwrap().packed_record(0, 0x8000),
            Ok(None)
        );
        // The rebuilt free list holds the 8 - 7 entries not taken: a chain of
        // two does not fit until one completes, then does, and nothing taken
        // is overwritten.
        q.packed_begin(5, &chain(5, 2));
        q.packed_used(0, 0x8006);
        q.packed_begin(3, &chain(3, 2));
        drop(q);
        let region = remap(&file, 2, 8);
        let mut q = region.queue(1, 8).unwrap();
        let rec = q.packed_record(0, 0x8000).unwrap().unwrap();
        let got: Vec<(u16, Vec<PackedDescriptor>)> =
            rec.in_flight.into_iter().map(|e| (e.id, e.descs)).collect();
        assert_eq!(
            got,
            vec![
                (2, chain(2, 3)),
                (3, chain(3, 2)),
                (4, chain(4, 1)),
                (5, Vec::new()),
            ]
        );
    }

    /// Offsets of buffer `id`'s record and of entry `e` of queue 0's table
    /// in an area of one queue of 8 made with [`PACKED`].
    fn rec_off(id: u64) -> u64 {
        HEADER_SIZE as u64 + DESC_STATE_SIZE as u64 * id
    }

    fn entry_off(e: u64) -> u64 {
        (queue_region_size(8) + TABLES_HEADER) as u64 + TABLE_ENTRY_SIZE as u64 * e
    }

    fn read_u16(file: &File, off: u64) -> u16 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 2];
        file.read_exact_at(&mut b, off).unwrap();
        u16::from_le_bytes(b)
    }

    fn write_u16(file: &File, off: u64, v: u16) {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&v.to_le_bytes(), off).unwrap();
    }

    /// An area with buffer 2 (3 slots) and buffer 5 (2 slots) in flight.
    fn area_with_two_chains() -> File {
        let (region, file) = InflightRegion::create_with(1, 8, PACKED).unwrap();
        let mut q = region.queue(0, 8).unwrap();
        q.packed_record(0, 0x8000).unwrap();
        q.packed_begin(2, &chain(2, 3));
        q.packed_begin(5, &chain(5, 2));
        file
    }

    fn recovered(file: &File) -> Result<Option<PackedRecord>, PackedRecordError> {
        remap(file, 1, 8)
            .queue(0, 8)
            .unwrap()
            .packed_record(0, 0x8000)
    }

    #[test]
    fn corrupt_descriptor_tables_are_refused_without_panic() {
        let file = area_with_two_chains();
        assert!(matches!(recovered(&file), Ok(Some(r)) if r.in_flight.len() == 2));
        let head2 = read_u16(&file, rec_off(2) + 2);
        let head5 = read_u16(&file, rec_off(5) + 2);
        let second2 = read_u16(&file, entry_off(head2.into()) + 14);

        // A cycle: buffer 2's second entry links back to its head.
        let file = area_with_two_chains();
        write_u16(&file, entry_off(second2.into()) + 14, head2);
        assert_eq!(
            recovered(&file),
            Err(PackedRecordError::EntryReused {
                id: 2,
                entry: head2
            })
        );
        // A self-loop on the head.
        let file = area_with_two_chains();
        write_u16(&file, entry_off(head2.into()) + 14, head2);
        assert!(matches!(
            recovered(&file),
            Err(PackedRecordError::EntryReused { id: 2, .. })
        ));

        // A link out of the table.
        for bad in [8u16, 0x7fff, TABLE_END] {
            let file = area_with_two_chains();
            write_u16(&file, entry_off(head2.into()) + 14, bad);
            assert_eq!(
                recovered(&file),
                Err(PackedRecordError::EntryOutOfRange { id: 2, entry: bad })
            );
        }

        // Two buffers sharing an entry: 5's head links into 2's chain.
        let file = area_with_two_chains();
        write_u16(&file, entry_off(head5.into()) + 14, second2);
        assert_eq!(
            recovered(&file),
            Err(PackedRecordError::EntryReused {
                id: 5,
                entry: second2
            })
        );

        // A head out of range, with a tag that matches it (a frontend can
        // compute one): refused, not followed.
        let file = area_with_two_chains();
        {
            use std::os::unix::fs::FileExt;
            write_u16(&file, rec_off(5) + 2, 200);
            file.write_all_at(&chain_tag(5, 200, 2).to_le_bytes(), rec_off(5) + 8)
                .unwrap();
        }
        assert_eq!(
            recovered(&file),
            Err(PackedRecordError::EntryOutOfRange { id: 5, entry: 200 })
        );

        // A length that disagrees with the slots, or exceeds the queue.
        for (count, byte) in [(3u32, 2u8), (9, 9), (70_000, 0), (1, 1)] {
            let file = area_with_two_chains();
            use std::os::unix::fs::FileExt;
            file.write_all_at(&count.to_le_bytes(), rec_off(2) + 4)
                .unwrap();
            file.write_all_at(&[byte], rec_off(2) + 1).unwrap();
            file.write_all_at(&chain_tag(2, head2, count).to_le_bytes(), rec_off(2) + 8)
                .unwrap();
            let r = recovered(&file);
            if byte == 1 {
                // One slot: read as a one-slot record, never as a chain.
                assert!(r.is_ok(), "{r:?}");
            } else {
                assert!(
                    matches!(r, Err(PackedRecordError::ChainLength { id: 2, .. })),
                    "{count}: {r:?}"
                );
            }
        }

        // A NEXT flag that ends the chain early.
        let file = area_with_two_chains();
        write_u16(&file, entry_off(head2.into()) + 12, 0);
        assert_eq!(
            recovered(&file),
            Err(PackedRecordError::NextFlag { id: 2, index: 0 })
        );

        // A refused record is left as found: refused again.
        assert!(recovered(&file).is_err());

        // A tag that does not match: that buffer is not recorded (lost,
        // which the queue refuses to start over), the other is.
        let file = area_with_two_chains();
        write_u16(&file, rec_off(5) + 2, head5 ^ 1);
        let rec = recovered(&file).unwrap().unwrap();
        assert_eq!(rec.in_flight[0].descs, chain(2, 3));
        assert!(rec.in_flight[1].descs.is_empty());
    }

    #[test]
    fn an_area_too_small_for_the_tables_has_none() {
        let (_, file) = InflightRegion::create_with(2, 8, PACKED).unwrap();
        let size = file.metadata().unwrap().len();
        assert_eq!(size, area_size(2, 8, PACKED));
        let queues = 2 * queue_region_size(8) as u64;
        // The queues alone (an older daemon's area), or one byte short.
        for short in [queues, size - 1] {
            let r = InflightRegion::map(file.try_clone().unwrap(), 0, short, 2, 8).unwrap();
            assert!(!r.has_packed_tables(), "{short}");
            assert!(r.state_section().is_none());
            let mut q = r.queue(0, 8).unwrap();
            q.packed_record(0, 0x8000).unwrap();
            q.packed_begin(1, &chain(1, 3));
            let rec = q.packed_record(0, 0x8000).unwrap().unwrap();
            assert!(rec.in_flight[0].descs.is_empty(), "{short}");
        }
        // A header of another geometry, or none: no tables.
        let r = InflightRegion::map(file.try_clone().unwrap(), 0, size, 1, 8).unwrap();
        assert!(!r.has_packed_tables());
        write_u16(&file, queues, 0);
        assert!(!remap(&file, 2, 8).has_packed_tables());
    }

    #[test]
    fn tables_and_state_section_find_their_places() {
        use crate::state::{SECTION_LEN, Stored};
        let both = AreaParts {
            state: true,
            packed_tables: true,
        };
        for qs in [8u16, 4096] {
            let (region, file) = InflightRegion::create_with(4, qs, both).unwrap();
            assert!(region.has_packed_tables());
            region.state_section().unwrap().store(b"blob").unwrap();
            let mut q = region.queue(3, qs).unwrap();
            q.packed_record(0, 0x8000).unwrap();
            q.packed_begin(1, &chain(1, 3));
            drop((q, region));
            let again = remap(&file, 4, qs);
            assert_eq!(
                again.state_section().unwrap().load(),
                Stored::Blob(b"blob".to_vec())
            );
            let mut q = again.queue(3, qs).unwrap();
            let rec = q.packed_record(0, 0x8000).unwrap().unwrap();
            assert_eq!(rec.in_flight[0].descs, chain(1, 3));
            // Without the tables (a daemon that keeps state, split rings).
            let queues = 4 * queue_region_size(qs) as u64;
            let r = InflightRegion::map(
                file.try_clone().unwrap(),
                0,
                queues + SECTION_LEN as u64,
                4,
                qs,
            )
            .unwrap();
            assert!(!r.has_packed_tables());
            assert!(r.state_section().is_some());
            // Tables and no section (blk): the tables are not a section.
            let (r, f) = InflightRegion::create_with(4, qs, PACKED).unwrap();
            assert!(r.has_packed_tables());
            assert!(r.state_section().is_none());
            assert!(remap(&f, 4, qs).state_section().is_none());
        }
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
