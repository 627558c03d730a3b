//! Dirty-page logging for live migration (vhost-user "Migration").
//!
//! While the frontend migrates a guest, it copies guest RAM to the
//! destination in passes and must learn which pages changed behind its
//! back: the backend writes guest memory (request data, used rings) without
//! the VMM seeing it. The frontend hands a shared bitmap over with
//! SET_LOG_BASE (an fd, a size and an offset; LOG_SHMFD) and acks
//! `VHOST_F_LOG_ALL`; from then on the backend sets bit `gpa / 4096` (byte
//! `page / 8`, bit `page % 8`) for every page it writes, with an atomic OR
//! since the frontend clears bits concurrently. Used-ring writes are logged
//! at the address SET_VRING_ADDR gave with `VHOST_VRING_F_LOG`.
//!
//! Everything about the region is frontend input: its size and offset are
//! checked for overflow, against an upper bound, against the fd's size (a
//! page past the end of a file would raise SIGBUS here) and against the
//! memory table (one bit per page up to the highest guest address). Marks
//! outside the bitmap are dropped and counted, never written.
//!
//! Queue threads see a [`DirtyLog`] shared with the request handler. When
//! logging is off, the hot path pays one relaxed load of an atomic bool.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use vm_memory::{FileOffset, MmapRegion};

/// Bytes of guest memory one bit of the log covers.
pub const LOG_PAGE_SIZE: u64 = 4096;

/// Largest log accepted: one bit per page of 2^52 bytes of guest physical
/// address space (the x86-64 and arm64 architectural limit).
pub const MAX_LOG_SIZE: u64 = (1 << 52) / LOG_PAGE_SIZE / 8;

/// `used_log` value of a queue whose used ring is not logged.
const NO_USED_LOG: u64 = u64::MAX;

/// Why a SET_LOG_BASE was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log size is zero or above [`MAX_LOG_SIZE`].
    #[error("log size {0:#x} is zero or above {MAX_LOG_SIZE:#x}")]
    BadSize(u64),
    /// Offset plus size overflows.
    #[error("log offset {0:#x} plus size {1:#x} overflows")]
    Overflow(u64, u64),
    /// The log is smaller than the memory table needs.
    #[error(
        "log of {size} bytes covers guest memory up to {covers:#x}, \
         but the memory table reaches {end:#x} (needs {need} bytes)"
    )]
    TooSmall {
        /// Bytes of log offered.
        size: u64,
        /// Guest addresses the log covers.
        covers: u128,
        /// End of the highest memory region.
        end: u64,
        /// Bytes of log needed.
        need: u64,
    },
    /// The fd is not a regular file.
    #[error("log")]
    NotAFile(#[source] crate::frontend_fd::FdError),
    /// The fd holds fewer bytes than offset plus size.
    #[error("log needs {0} bytes of its fd but the fd holds {1}")]
    FileTooSmall(u64, u64),
    /// The fd cannot be inspected.
    #[error("cannot inspect the log fd")]
    Stat(#[source] std::io::Error),
    /// The fd cannot be mapped.
    #[error("cannot map the log: {0}")]
    Map(String),
}

/// Bytes of log needed to cover guest memory up to (not including) `end`.
pub fn log_size_for(end: u64) -> u64 {
    end.div_ceil(LOG_PAGE_SIZE).div_ceil(8)
}

/// The frontend's dirty bitmap, mapped shared.
pub struct LogRegion {
    map: MmapRegion,
    /// Where the bitmap starts in the mapping (which starts on a page).
    skip: usize,
    /// Bytes of bitmap.
    len: usize,
    /// Marks dropped because they fell outside the bitmap.
    missed: AtomicU64,
}

impl std::fmt::Debug for LogRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogRegion").field("len", &self.len).finish()
    }
}

impl LogRegion {
    /// Validates and maps `size` bytes of `file` at `offset`, for a memory
    /// table whose highest region ends at `mem_end` (0: no table yet).
    pub fn map(file: File, size: u64, offset: u64, mem_end: u64) -> Result<Self, LogError> {
        if size == 0 || size > MAX_LOG_SIZE {
            return Err(LogError::BadSize(size));
        }
        let end = offset
            .checked_add(size)
            .ok_or(LogError::Overflow(offset, size))?;
        let need = log_size_for(mem_end);
        if size < need {
            return Err(LogError::TooSmall {
                size,
                covers: u128::from(size) * 8 * u128::from(LOG_PAGE_SIZE),
                end: mem_end,
                need,
            });
        }
        crate::frontend_fd::regular_file(&file, "log").map_err(LogError::NotAFile)?;
        if let Err(e) = crate::memory::seal_against_shrinking(&file) {
            crate::rate_limited!(
                log::Level::Warn,
                "the log's file cannot be sealed against shrinking ({e}); \
                 a frontend that truncates it stops this daemon (SIGBUS)"
            );
        }
        let have = file.metadata().map_err(LogError::Stat)?.len();
        if have < end {
            return Err(LogError::FileTooSmall(end, have));
        }
        // mmap wants a page-aligned offset: map from the page holding `offset`.
        let page = 4096u64;
        let start = offset - offset % page;
        let skip = offset - start;
        let map_len = usize::try_from(size + skip).map_err(|_| LogError::BadSize(size))?;
        let map = MmapRegion::from_file(FileOffset::new(file, start), map_len)
            .map_err(|e| LogError::Map(e.to_string()))?;
        let len = usize::try_from(size).map_err(|_| LogError::BadSize(size))?;
        Ok(LogRegion {
            map,
            skip: skip as usize,
            len,
            missed: AtomicU64::new(0),
        })
    }

    /// Bytes of bitmap.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a log has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest memory the bitmap covers: addresses below this are logged.
    pub fn covers(&self) -> u128 {
        self.len as u128 * 8 * u128::from(LOG_PAGE_SIZE)
    }

    /// Marks dropped so far because they fell outside the bitmap.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// Byte `i` of the bitmap.
    fn byte(&self, i: usize) -> Option<&AtomicU8> {
        if i >= self.len {
            return None;
        }
        // SAFETY: `skip + i < skip + len`, the mapping's length, and the
        // mapping lives as long as `self`; AtomicU8 has the size and
        // alignment of u8, and this process only touches the shared bitmap
        // atomically.
        Some(unsafe { &*self.map.as_ptr().add(self.skip + i).cast::<AtomicU8>() })
    }

    /// Sets the bit of every page that `[gpa, gpa + len)` touches; nothing
    /// for `len` 0. Pages past the bitmap are counted in [`LogRegion::missed`].
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        let mut page = gpa / LOG_PAGE_SIZE;
        while page <= last {
            let Some(byte) = usize::try_from(page / 8).ok().and_then(|i| self.byte(i)) else {
                let n = last - page + 1;
                if self.missed.fetch_add(n, Ordering::Relaxed) == 0 {
                    crate::rate_limited!(
                        log::Level::Warn,
                        "dirty log: page {page:#x} lies past the log ({} bytes): \
                         the frontend's log is smaller than guest memory",
                        self.len
                    );
                }
                return;
            };
            // The bits of this byte from `page` up to `last`, in one OR.
            let lo = (page % 8) as u32;
            let hi = if last / 8 == page / 8 {
                (last % 8) as u32
            } else {
                7
            };
            let bits = ((0xffu32 >> (7 - hi)) & (0xffu32 << lo)) as u8;
            byte.fetch_or(bits, Ordering::Relaxed);
            page = (page / 8 + 1) * 8;
        }
    }
}

/// The log state one connection shares between its handler and its queue
/// threads.
#[derive(Debug)]
pub struct DirtyLog {
    /// `VHOST_F_LOG_ALL` is acked and a region is mapped.
    active: AtomicBool,
    /// `VHOST_F_LOG_ALL` is acked.
    log_all: AtomicBool,
    region: RwLock<Option<Arc<LogRegion>>>,
    /// Per queue: guest address at which its used ring is logged, or
    /// [`NO_USED_LOG`].
    used: Vec<AtomicU64>,
}

impl DirtyLog {
    /// Logging off, for a device of `queues` queues.
    pub fn new(queues: usize) -> Self {
        DirtyLog {
            active: AtomicBool::new(false),
            log_all: AtomicBool::new(false),
            region: RwLock::new(None),
            used: (0..queues).map(|_| AtomicU64::new(NO_USED_LOG)).collect(),
        }
    }

    /// Whether writes are being logged: one relaxed load, for the hot path.
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn update(&self) {
        let mapped = self.region.read().map(|r| r.is_some()).unwrap_or(false);
        let on = mapped && self.log_all.load(Ordering::SeqCst);
        self.active.store(on, Ordering::SeqCst);
    }

    /// Installs a new region (SET_LOG_BASE) or none; the old one stays
    /// mapped until the last queue thread lets go of it.
    pub fn set_region(&self, region: Option<LogRegion>) {
        if let Ok(mut r) = self.region.write() {
            *r = region.map(Arc::new);
        }
        self.update();
    }

    /// The mapped region, if any.
    pub fn region(&self) -> Option<Arc<LogRegion>> {
        self.region.read().ok().and_then(|r| r.clone())
    }

    /// Follows SET_FEATURES: logging runs while `VHOST_F_LOG_ALL` is acked.
    pub fn set_log_all(&self, on: bool) {
        self.log_all.store(on, Ordering::SeqCst);
        self.update();
    }

    /// Logs queue `index`'s used ring at guest address `addr`
    /// (`VHOST_VRING_F_LOG`), or stops logging it.
    pub fn set_used_log(&self, index: usize, addr: Option<u64>) {
        if let Some(u) = self.used.get(index) {
            u.store(addr.unwrap_or(NO_USED_LOG), Ordering::SeqCst);
        }
    }

    /// The guest address at which queue `index` logs its used ring.
    pub fn used_log(&self, index: usize) -> Option<u64> {
        let a = self.used.get(index)?.load(Ordering::Relaxed);
        (a != NO_USED_LOG).then_some(a)
    }

    /// Marks `[gpa, gpa + len)` when logging is active.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if self.is_active() {
            self.mark_slow(gpa, len);
        }
    }

    #[cold]
    fn mark_slow(&self, gpa: u64, len: u64) {
        if let Ok(r) = self.region.read()
            && let Some(r) = r.as_ref()
        {
            r.mark(gpa, len);
        }
    }

    /// Marks `[offset, offset + len)` of queue `index`'s used ring when
    /// logging is active and that ring is logged.
    #[inline]
    pub fn mark_used(&self, index: usize, offset: u64, len: u64) {
        if self.is_active()
            && let Some(base) = self.used_log(index)
        {
            self.mark_slow(base.saturating_add(offset), len);
        }
    }

    /// Back to logging off (RESET_OWNER, RESET_DEVICE).
    pub fn reset(&self) {
        for u in &self.used {
            u.store(NO_USED_LOG, Ordering::SeqCst);
        }
        self.log_all.store(false, Ordering::SeqCst);
        self.set_region(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::memfd;

    fn bits(r: &LogRegion) -> Vec<u64> {
        (0..r.len() * 8)
            .filter(|&p| r.byte(p / 8).unwrap().load(Ordering::Relaxed) & (1 << (p % 8)) != 0)
            .map(|p| p as u64)
            .collect()
    }

    #[test]
    fn log_size_is_one_bit_per_page_of_the_highest_address() {
        assert_eq!(log_size_for(0), 0);
        assert_eq!(log_size_for(1), 1);
        assert_eq!(log_size_for(8 * 4096), 1);
        assert_eq!(log_size_for(8 * 4096 + 1), 2);
        assert_eq!(log_size_for(1 << 30), (1 << 30) / 4096 / 8);
    }

    #[test]
    fn bad_sizes_and_overflowing_offsets_are_refused() {
        let f = || memfd(8192);
        assert!(matches!(
            LogRegion::map(f(), 0, 0, 0),
            Err(LogError::BadSize(0))
        ));
        assert!(matches!(
            LogRegion::map(f(), MAX_LOG_SIZE + 1, 0, 0),
            Err(LogError::BadSize(_))
        ));
        assert!(matches!(
            LogRegion::map(f(), 4096, u64::MAX - 100, 0),
            Err(LogError::Overflow(..))
        ));
        // Past the end of the fd: the first mark there would raise SIGBUS.
        assert!(matches!(
            LogRegion::map(f(), 4096, 8192, 0),
            Err(LogError::FileTooSmall(12288, 8192))
        ));
        assert!(LogRegion::map(memfd(1), 1, 0, 0).is_ok());
    }

    #[test]
    fn log_too_small_for_the_memory_table_is_refused() {
        // 1 GiB of guest memory needs 32 KiB of log.
        let e = LogRegion::map(memfd(1 << 16), 32 * 1024 - 1, 0, 1 << 30).unwrap_err();
        assert!(matches!(e, LogError::TooSmall { need: 32768, .. }), "{e}");
        assert!(e.to_string().contains("needs 32768 bytes"), "{e}");
        assert!(LogRegion::map(memfd(1 << 16), 32 * 1024, 0, 1 << 30).is_ok());
    }

    #[test]
    fn marks_exactly_the_pages_a_write_touches() {
        let r = LogRegion::map(memfd(4096), 16, 0, 16 * 8 * 4096).unwrap();
        r.mark(0x1000, 1);
        assert_eq!(bits(&r), [1]);
        // 2 bytes across the 0x3000 boundary: pages 2 and 3.
        r.mark(0x2fff, 2);
        assert_eq!(bits(&r), [1, 2, 3]);
        // Pages 6..=17 span three bytes of the bitmap.
        r.mark(6 * 4096 + 10, 11 * 4096 + 1);
        assert_eq!(
            bits(&r),
            [1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
        );
        // Ends exactly on a page boundary: the next page stays clean.
        r.mark(20 * 4096, 4096);
        assert_eq!(bits(&r).last(), Some(&20));
        r.mark(100 * 4096, 0);
        assert_eq!(bits(&r).len(), 16);
        assert_eq!(r.missed(), 0);
    }

    #[test]
    fn marks_past_the_log_are_dropped_and_counted() {
        let r = LogRegion::map(memfd(4096), 1, 0, 0).unwrap();
        r.mark(7 * 4096, 3 * 4096);
        assert_eq!(bits(&r), [7]);
        assert_eq!(r.missed(), 2);
        r.mark(u64::MAX - 10, 100);
        assert_eq!(r.missed(), 3);
    }

    #[test]
    fn an_unaligned_offset_maps_the_bitmap_at_that_offset() {
        let f = memfd(8192);
        let probe = f.try_clone().unwrap();
        let r = LogRegion::map(f, 8, 4100, 0).unwrap();
        r.mark(9 * 4096, 1);
        let mut buf = [0u8; 8192];
        std::os::unix::fs::FileExt::read_at(&probe, &mut buf, 0).unwrap();
        assert_eq!(buf[4101], 0b10);
        assert_eq!(buf.iter().filter(|&&b| b != 0).count(), 1);
    }

    #[test]
    fn dirty_log_marks_only_while_log_all_is_acked_and_a_region_is_mapped() {
        let d = DirtyLog::new(2);
        d.set_log_all(true);
        d.mark(0, 1);
        assert!(!d.is_active());
        d.set_log_all(false);
        d.set_region(Some(LogRegion::map(memfd(4096), 8, 0, 0).unwrap()));
        d.mark(0, 1);
        assert!(!d.is_active());
        d.set_log_all(true);
        assert!(d.is_active());
        d.mark(4096, 1);
        // Used ring of queue 1 not logged until SET_VRING_ADDR asks.
        d.mark_used(1, 12, 8);
        d.set_used_log(1, Some(0x5000));
        d.mark_used(1, 12, 8);
        d.mark_used(0, 0, 8);
        assert_eq!(bits(&d.region().unwrap()), [1, 5]);
        d.reset();
        assert!(!d.is_active());
        assert_eq!(d.used_log(1), None);
        assert!(d.region().is_none());
    }
}
