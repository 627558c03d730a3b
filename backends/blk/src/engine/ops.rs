//! Pieces both engines share: range checks, an iovec cursor for short
//! transfers, the zeroing fallback chain, and the blocking syscalls.

use std::io;
use std::os::unix::io::RawFd;

use super::Op;

/// Most iovecs handed to one syscall or SQE (`UIO_MAXIOV`); longer lists
/// continue like a short transfer.
pub(super) const IOV_MAX: usize = libc::UIO_MAXIOV as usize;

/// Size of the shared zero buffer used to write zeroes.
const ZERO_CHUNK: usize = 64 * 1024;
/// Iovecs per zero-writing syscall (16 MiB at most per call).
const ZERO_IOVS: usize = 256;
/// A zero buffer aligned for `O_DIRECT` images.
#[repr(C, align(4096))]
struct Zeroes([u8; ZERO_CHUNK]);
/// Source of zero-writes; only ever read, by us and by the kernel.
static ZEROES: Zeroes = Zeroes([0; ZERO_CHUNK]);

/// `_IO(0x12, 119)`: discard a byte range `[offset, len]` of a block device.
const BLKDISCARD: u32 = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range `[offset, len]` of a block device.
const BLKZEROOUT: u32 = 0x127f;

/// An `io::Error` from an errno value.
pub(super) fn errno_err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// The errno of the last failed libc call.
fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Checks that `offset + len` fits an `off_t`.
pub(super) fn check_range(offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(errno_err(libc::EINVAL)),
    }
}

/// Total length of `iovecs`, or `EINVAL` if it overflows.
pub(super) fn iovecs_len(iovecs: &[libc::iovec]) -> io::Result<u64> {
    iovecs.iter().try_fold(0u64, |acc, iov| {
        acc.checked_add(iov.iov_len as u64)
            .ok_or_else(|| errno_err(libc::EINVAL))
    })
}

/// `offset` as an `off_t`; callers checked the range with [`check_range`].
pub(super) fn off_t(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| errno_err(libc::EINVAL))
}

/// Checks `op`'s range and returns the bytes it transfers (0 for non-data ops).
pub(super) fn validate(op: &Op) -> io::Result<u64> {
    match op {
        Op::Read { offset, iovecs } | Op::Write { offset, iovecs, .. } => {
            let len = iovecs_len(iovecs)?;
            check_range(*offset, len)?;
            Ok(len)
        }
        Op::Flush => Ok(0),
        Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
            check_range(*offset, *len)?;
            Ok(0)
        }
    }
}

/// An owned iovec list and how much of it is done, for resuming short transfers.
pub(super) struct IovCursor {
    iovecs: Vec<libc::iovec>,
    start: usize,
}

// SAFETY: the iovecs are plain addresses of caller-owned memory that the
// `Engine::submit` contract keeps valid until completion; nothing about them is
// tied to the thread that created them.
unsafe impl Send for IovCursor {}

impl IovCursor {
    /// A cursor at the start of `iovecs`; empty iovecs are dropped so every
    /// pending batch transfers at least one byte.
    pub(super) fn new(mut iovecs: Vec<libc::iovec>) -> Self {
        iovecs.retain(|iov| iov.iov_len > 0);
        IovCursor { iovecs, start: 0 }
    }

    /// The iovecs still to transfer, at most [`IOV_MAX`] of them.
    pub(super) fn pending(&self) -> &[libc::iovec] {
        let rest = self.iovecs.get(self.start..).unwrap_or(&[]);
        &rest[..rest.len().min(IOV_MAX)]
    }

    /// Bytes described by [`Self::pending`].
    pub(super) fn pending_len(&self) -> u64 {
        self.pending().iter().map(|iov| iov.iov_len as u64).sum()
    }

    /// Marks `n` more bytes as transferred.
    pub(super) fn advance(&mut self, mut n: u64) {
        while n > 0 {
            let Some(iov) = self.iovecs.get_mut(self.start) else {
                return;
            };
            let len = iov.iov_len as u64;
            if len <= n {
                n -= len;
                self.start += 1;
            } else {
                // n < len <= usize::MAX, so the casts are lossless.
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n as usize).cast();
                iov.iov_len -= n as usize;
                n = 0;
            }
        }
    }
}

/// Replaces `out` with iovecs over the shared zero buffer covering up to `len` bytes.
pub(super) fn zero_iovecs(out: &mut Vec<libc::iovec>, mut len: u64) {
    out.clear();
    while len > 0 && out.len() < ZERO_IOVS {
        let chunk = len.min(ZERO_CHUNK as u64);
        out.push(libc::iovec {
            // The kernel only reads from write buffers.
            iov_base: ZEROES.0.as_ptr().cast_mut().cast(),
            iov_len: chunk as usize,
        });
        len -= chunk;
    }
}

/// One way of zeroing a file range, in the order they are tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ZeroStep {
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: deallocate.
    PunchHole,
    /// `fallocate(ZERO_RANGE | KEEP_SIZE)`: zero without writing data.
    ZeroRange,
    /// Write zero buffers: works everywhere.
    Write,
}

impl ZeroStep {
    /// The `fallocate` mode of this step; `None` for [`ZeroStep::Write`].
    pub(super) fn fallocate_mode(self) -> Option<i32> {
        match self {
            ZeroStep::PunchHole => Some(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
            ZeroStep::ZeroRange => Some(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE),
            ZeroStep::Write => None,
        }
    }
}

/// The `fallocate` modes a file turned out not to support (learned from `EOPNOTSUPP`).
#[derive(Debug, Default)]
pub(super) struct FallocSupport {
    no_punch_hole: bool,
    no_zero_range: bool,
}

impl FallocSupport {
    /// The first step to try for zeroing (`unmap`: deallocation allowed).
    pub(super) fn first_step(&self, unmap: bool) -> ZeroStep {
        self.skip_unsupported(if unmap {
            ZeroStep::PunchHole
        } else {
            ZeroStep::ZeroRange
        })
    }

    /// After `step` failed with `errno`: the step to try next, or `None` if the
    /// error is final. `EOPNOTSUPP` is remembered; `EINVAL` (also "mode not
    /// supported" on some filesystems) only falls back for this operation.
    pub(super) fn after_failure(&mut self, step: ZeroStep, errno: i32) -> Option<ZeroStep> {
        if errno != libc::EOPNOTSUPP && errno != libc::EINVAL {
            return None;
        }
        let next = match step {
            ZeroStep::PunchHole => ZeroStep::ZeroRange,
            ZeroStep::ZeroRange => ZeroStep::Write,
            ZeroStep::Write => return None,
        };
        if errno == libc::EOPNOTSUPP {
            match step {
                ZeroStep::PunchHole => self.no_punch_hole = true,
                ZeroStep::ZeroRange => self.no_zero_range = true,
                ZeroStep::Write => {}
            }
        }
        bulkhead_common::rate_limited!(
            log::Level::Debug,
            "fallocate {step:?} failed with errno {errno}, falling back to {next:?}"
        );
        Some(self.skip_unsupported(next))
    }

    fn skip_unsupported(&self, mut step: ZeroStep) -> ZeroStep {
        loop {
            step = match step {
                ZeroStep::PunchHole if self.no_punch_hole => ZeroStep::ZeroRange,
                ZeroStep::ZeroRange if self.no_zero_range => ZeroStep::Write,
                _ => return step,
            };
        }
    }
}

/// Repeats `f` while it fails with `EINTR`; returns its non-negative result.
fn retry_eintr(mut f: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let ret = f();
        if ret >= 0 {
            return Ok(ret as usize);
        }
        let errno = last_errno();
        if errno != libc::EINTR {
            return Err(errno_err(errno));
        }
    }
}

/// `preadv`/`pwritev` of all of `iovecs` at `offset`, continuing short transfers.
/// A read hitting end of file before the end is `EIO`.
///
/// # Safety
/// `iovecs` must describe valid memory (writable for reads).
pub(super) unsafe fn rw_blocking(
    fd: RawFd,
    write: bool,
    mut offset: u64,
    iovecs: Vec<libc::iovec>,
) -> io::Result<u64> {
    let total = iovecs_len(&iovecs)?;
    check_range(offset, total)?;
    let mut cursor = IovCursor::new(iovecs);
    let mut done = 0u64;
    while done < total {
        let pending = cursor.pending();
        // pending.len() <= IOV_MAX, which fits a c_int.
        let count = pending.len() as libc::c_int;
        let off = off_t(offset)?;
        let n = retry_eintr(|| {
            // SAFETY: the caller guarantees the iovecs describe valid memory.
            unsafe {
                if write {
                    libc::pwritev(fd, pending.as_ptr(), count, off)
                } else {
                    libc::preadv(fd, pending.as_ptr(), count, off)
                }
            }
        })? as u64;
        if n == 0 {
            return Err(errno_err(libc::EIO));
        }
        let n = n.min(total - done);
        done += n;
        offset += n;
        cursor.advance(n);
    }
    Ok(total)
}

/// `fdatasync(fd)`, retried on `EINTR`.
pub(super) fn fdatasync(fd: RawFd) -> io::Result<()> {
    // SAFETY: fdatasync takes no pointers.
    retry_eintr(|| unsafe { libc::fdatasync(fd) } as isize).map(drop)
}

/// `fallocate(fd, mode, offset, len)`, retried on `EINTR`; errors carry the errno.
fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (off_t(offset)?, off_t(len)?);
    // SAFETY: fallocate takes no pointers.
    retry_eintr(|| unsafe { libc::fallocate(fd, mode, off, len) } as isize).map(drop)
}

/// Zeroes `len` bytes of a regular file at `offset` with blocking calls,
/// trying the steps of the fallback chain from `support.first_step(unmap)`.
pub(super) fn zero_file_blocking(
    fd: RawFd,
    offset: u64,
    len: u64,
    unmap: bool,
    support: &mut FallocSupport,
) -> io::Result<u64> {
    check_range(offset, len)?;
    if len == 0 {
        return Ok(0);
    }
    let mut step = support.first_step(unmap);
    while let Some(mode) = step.fallocate_mode() {
        match fallocate(fd, mode, offset, len) {
            Ok(()) => return Ok(0),
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                step = support.after_failure(step, errno).ok_or(e)?;
            }
        }
    }
    let mut iovecs = Vec::with_capacity(ZERO_IOVS);
    let mut done = 0u64;
    while done < len {
        zero_iovecs(&mut iovecs, len - done);
        // SAFETY: the iovecs point into the static zero buffer.
        let n = unsafe { rw_blocking(fd, true, offset + done, iovecs.clone())? };
        done += n;
    }
    Ok(0)
}

/// Issues a block-device range ioctl (`BLKDISCARD`/`BLKZEROOUT`), retried on `EINTR`.
fn blk_range_ioctl(fd: RawFd, request: u32, offset: u64, len: u64) -> io::Result<()> {
    check_range(offset, len)?;
    let range: [u64; 2] = [offset, len];
    // SAFETY: both ioctls read a `[u64; 2]` that lives across the call.
    retry_eintr(|| unsafe { libc::ioctl(fd, request as _, range.as_ptr()) } as isize).map(drop)
}

/// Discards a block-device range; a device without discard support is not an
/// error (discard is a hint there, as in QEMU).
pub(super) fn blk_discard(fd: RawFd, offset: u64, len: u64) -> io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    match blk_range_ioctl(fd, BLKDISCARD, offset, len) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            bulkhead_common::rate_limited!(
                log::Level::Debug,
                "BLKDISCARD not supported by the device; ignored"
            );
            Ok(0)
        }
        other => other.map(|()| 0),
    }
}

/// Zeroes a block-device range (`BLKZEROOUT`; the kernel writes zeroes itself
/// where the device has no write-zeroes command).
pub(super) fn blk_zeroout(fd: RawFd, offset: u64, len: u64) -> io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    blk_range_ioctl(fd, BLKZEROOUT, offset, len).map(|()| 0)
}

/// Runs `op` to completion with blocking syscalls; the result a completion carries.
///
/// # Safety
/// The iovecs of `op` must describe valid memory (writable for reads).
pub(super) unsafe fn execute_blocking(
    fd: RawFd,
    op: Op,
    is_block_device: bool,
    support: &mut FallocSupport,
) -> io::Result<u64> {
    validate(&op)?;
    match op {
        // SAFETY: forwarded from the caller.
        Op::Read { offset, iovecs } => unsafe { rw_blocking(fd, false, offset, iovecs) },
        Op::Write {
            offset,
            iovecs,
            fua,
        } => {
            // SAFETY: forwarded from the caller.
            let n = unsafe { rw_blocking(fd, true, offset, iovecs)? };
            if fua {
                fdatasync(fd)?;
            }
            Ok(n)
        }
        Op::Flush => fdatasync(fd).map(|()| 0),
        Op::Discard { offset, len } if is_block_device => blk_discard(fd, offset, len),
        Op::WriteZeroes { offset, len, .. } if is_block_device => blk_zeroout(fd, offset, len),
        Op::Discard { offset, len } => zero_file_blocking(fd, offset, len, true, support),
        Op::WriteZeroes { offset, len, unmap } => {
            zero_file_blocking(fd, offset, len, unmap, support)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    #[test]
    fn cursor_advance_splits_and_skips_iovecs() {
        let mut c = IovCursor::new(vec![iov(0x1000, 10), iov(0x2000, 20), iov(0x3000, 5)]);
        assert_eq!(c.pending_len(), 35);
        c.advance(4);
        assert_eq!(c.pending()[0].iov_base as usize, 0x1004);
        assert_eq!(c.pending()[0].iov_len, 6);
        c.advance(6 + 19);
        assert_eq!(c.pending().len(), 2);
        assert_eq!(c.pending()[0].iov_base as usize, 0x2000 + 19);
        assert_eq!(c.pending_len(), 6);
        c.advance(100);
        assert!(c.pending().is_empty());
    }

    #[test]
    fn cursor_drops_empty_iovecs() {
        let mut v = vec![iov(0x1000, 0); IOV_MAX + 3];
        v.push(iov(0x2000, 8));
        let c = IovCursor::new(v);
        assert_eq!(c.pending().len(), 1);
        assert_eq!(c.pending_len(), 8);
    }

    #[test]
    fn cursor_caps_pending_at_iov_max() {
        let c = IovCursor::new(vec![iov(0x1000, 1); IOV_MAX + 5]);
        assert_eq!(c.pending().len(), IOV_MAX);
    }

    #[test]
    fn range_overflow_is_einval() {
        assert!(check_range(u64::MAX, 1).is_err());
        assert!(check_range(i64::MAX as u64, 1).is_err());
        assert!(check_range(0, i64::MAX as u64).is_ok());
        let big = [iov(0, usize::MAX), iov(0, usize::MAX)];
        assert!(iovecs_len(&big).is_err() || usize::BITS < 64);
    }

    #[test]
    fn zero_fallback_chain_order_and_memory() {
        let mut s = FallocSupport::default();
        assert_eq!(s.first_step(true), ZeroStep::PunchHole);
        assert_eq!(s.first_step(false), ZeroStep::ZeroRange);
        assert_eq!(s.after_failure(ZeroStep::PunchHole, libc::EIO), None);
        assert_eq!(
            s.after_failure(ZeroStep::ZeroRange, libc::EINVAL),
            Some(ZeroStep::Write)
        );
        // EINVAL is not remembered.
        assert_eq!(s.first_step(false), ZeroStep::ZeroRange);
        assert_eq!(
            s.after_failure(ZeroStep::ZeroRange, libc::EOPNOTSUPP),
            Some(ZeroStep::Write)
        );
        assert_eq!(s.first_step(false), ZeroStep::Write);
        assert_eq!(s.first_step(true), ZeroStep::PunchHole);
        assert_eq!(
            s.after_failure(ZeroStep::PunchHole, libc::EOPNOTSUPP),
            Some(ZeroStep::Write)
        );
        assert_eq!(s.first_step(true), ZeroStep::Write);
        assert_eq!(s.after_failure(ZeroStep::Write, libc::EOPNOTSUPP), None);
    }

    #[test]
    fn zero_iovecs_cover_requested_length() {
        let mut v = Vec::new();
        zero_iovecs(&mut v, 3 * ZERO_CHUNK as u64 + 7);
        assert_eq!(v.len(), 4);
        assert_eq!(iovecs_len(&v).ok(), Some(3 * ZERO_CHUNK as u64 + 7));
        zero_iovecs(&mut v, u64::MAX);
        assert_eq!(v.len(), ZERO_IOVS);
    }
}
