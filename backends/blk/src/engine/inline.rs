//! Reads and writes the io_uring engine serves in the submitting thread.
//!
//! io_uring completes a buffered read at submit, in the submitting thread,
//! when the file supports non-blocking reads (`FMODE_NOWAIT`: ext4, xfs,
//! btrfs, block devices) and the data is cached. Otherwise it hands the read
//! to an io-wq worker thread, and every read pays two thread switches; so
//! does every buffered write on a file system without non-blocking buffered
//! writes (ext4 and tmpfs here refuse `RWF_NOWAIT` writes). tmpfs refuses
//! `RWF_NOWAIT`, yet its reads and writes are memory copies: at QD 1 each
//! one waited for a worker wake-up. So, per image, the engine decides once:
//!
//! - [`InlineIo::Memory`]: the file refuses `RWF_NOWAIT` but lives in
//!   memory (tmpfs, ramfs: `fstatfs` magic). A plain `preadv2` or `pwritev2`
//!   never waits for a device (shmem has no writeback to throttle a writer
//!   on), so reads and writes are done in the queue thread; a short or
//!   failed one continues through the ring, which reports any error. (A
//!   tmpfs page pushed out to swap is read back in the queue thread, as
//!   qemu-storage-daemon's `aio=threads` would do.)
//! - [`InlineIo::Writes`]: a buffered image on ext2/3/4 (`fstatfs` magic),
//!   which serves `RWF_NOWAIT` reads from its cache but refuses `RWF_NOWAIT`
//!   buffered writes, so io_uring hands every write to a worker thread. A
//!   buffered write there is a copy into the page cache: it is done in the
//!   queue thread while no operation of the queue is on the ring (so a slow
//!   read the ring is waiting for is never overtaken by a queue-thread
//!   stall, and a queue that keeps writes coming serves them one after the
//!   other, as `--engine sync` does). FUA writes (`RWF_DSYNC`: they wait for
//!   the device) and everything else still go through the ring. The cost:
//!   when the kernel throttles a writer on dirty pages, the queue thread
//!   waits in its write instead of a worker, as qemu-storage-daemon's
//!   `aio=threads` worker would; other queues have threads of their own.
//!   Measured on ext4 (docs/performance-notes.md): QD 1 writes 1.9x the
//!   IOPS at 0.6x the CPU of the ring's worker hand-off.
//! - [`InlineIo::Off`]: everything else. Files that take `RWF_NOWAIT`
//!   (xfs and btrfs on recent kernels take buffered writes too) are already served inline by
//!   the ring itself: trying `preadv2(RWF_NOWAIT)` first measured as pure
//!   overhead there (one syscall per read instead of one per batch). Other
//!   files (network and FUSE filesystems) and every `O_DIRECT` image could
//!   block the queue on a slow device.

use std::io;
use std::os::unix::io::RawFd;

use super::ops::{errno_err, off_t};

/// `statfs` magic of tmpfs (and shmem).
const TMPFS_MAGIC: libc::__fsword_t = 0x0102_1994;
/// `statfs` magic of ext2, ext3 and ext4.
pub(super) const EXT4_MAGIC: libc::__fsword_t = 0xEF53;
/// `statfs` magic of ramfs.
const RAMFS_MAGIC: libc::__fsword_t = 0x8584_58f6u32 as libc::__fsword_t;

/// Whether reads and writes are tried in the submitting thread before the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InlineIo {
    /// Every read goes through the ring.
    Off,
    /// Plain `preadv2`/`pwritev2` first: the file is memory, neither waits for a device.
    Memory,
    /// Non-FUA buffered writes in the queue thread while the ring is idle
    /// (ext2/3/4); reads through the ring.
    Writes,
}

impl InlineIo {
    /// Decides for the image open as `fd` (an error means [`InlineIo::Off`]).
    pub(super) fn classify(fd: RawFd) -> InlineIo {
        // SAFETY: F_GETFL only reads the fd's status flags.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 || fl & libc::O_DIRECT != 0 {
            return InlineIo::Off;
        }
        let mut byte = 0u8;
        let iov = libc::iovec {
            iov_base: (&raw mut byte).cast(),
            iov_len: 1,
        };
        // SAFETY: one iovec over a local byte.
        match unsafe { preadv2(fd, &[iov], 0, libc::RWF_NOWAIT) } {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && is_memory_fs(fd) => {
                InlineIo::Memory
            }
            _ if fs_magic(fd) == Some(EXT4_MAGIC) && is_regular(fd) => InlineIo::Writes,
            // Served inline by the ring already, or not memory.
            _ => InlineIo::Off,
        }
    }

    /// Whether a write (FUA or not) may be tried in the submitting thread
    /// now, with `ring_busy` operations of the queue on the ring.
    pub(super) fn write_here(self, fua: bool, ring_busy: usize) -> bool {
        match self {
            InlineIo::Off => false,
            InlineIo::Memory => true,
            InlineIo::Writes => !fua && ring_busy == 0,
        }
    }

    /// Whether reads are tried in the submitting thread.
    pub(super) fn reads_here(self) -> bool {
        self == InlineIo::Memory
    }
}

/// The `statfs` magic of the file system of `fd`.
pub(super) fn fs_magic(fd: RawFd) -> Option<libc::__fsword_t> {
    // SAFETY: statfs is plain old data; fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs.
    (unsafe { libc::fstatfs(fd, &mut st) } == 0).then_some(st.f_type)
}

/// True if `fd` is a file of tmpfs or ramfs.
fn is_memory_fs(fd: RawFd) -> bool {
    matches!(fs_magic(fd), Some(TMPFS_MAGIC | RAMFS_MAGIC))
}

/// True if `fd` is a regular file (not a block device node on that file system).
fn is_regular(fd: RawFd) -> bool {
    // SAFETY: stat is plain old data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat.
    (unsafe { libc::fstat(fd, &mut st) } == 0) && st.st_mode & libc::S_IFMT == libc::S_IFREG
}

/// One `preadv2` of `iovecs` (at most `IOV_MAX`) at `offset` with `flags`; retries `EINTR`.
///
/// # Safety
/// `iovecs` must describe writable memory.
pub(super) unsafe fn preadv2(
    fd: RawFd,
    iovecs: &[libc::iovec],
    offset: u64,
    flags: libc::c_int,
) -> io::Result<u64> {
    let off = off_t(offset)?;
    let count = libc::c_int::try_from(iovecs.len()).map_err(|_| errno_err(libc::EINVAL))?;
    loop {
        // SAFETY: the caller guarantees the iovecs describe writable memory.
        let n = unsafe { libc::preadv2(fd, iovecs.as_ptr(), count, off, flags) };
        if n >= 0 {
            return Ok(n as u64);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// One `pwritev2` of `iovecs` (at most `IOV_MAX`) at `offset` with `flags`; retries `EINTR`.
///
/// # Safety
/// `iovecs` must describe readable memory.
pub(super) unsafe fn pwritev2(
    fd: RawFd,
    iovecs: &[libc::iovec],
    offset: u64,
    flags: libc::c_int,
) -> io::Result<u64> {
    let off = off_t(offset)?;
    let count = libc::c_int::try_from(iovecs.len()).map_err(|_| errno_err(libc::EINVAL))?;
    loop {
        // SAFETY: the caller guarantees the iovecs describe readable memory.
        let n = unsafe { libc::pwritev2(fd, iovecs.as_ptr(), count, off, flags) };
        if n >= 0 {
            return Ok(n as u64);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}
