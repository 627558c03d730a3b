//! The io_uring engine.
//!
//! Every submitted op takes a slot of a fixed slab; the slot index is the
//! SQE's user data, and the slot owns the op's iovec array until the final
//! CQE. Each op has at most one SQE in the ring at a time, so a ring of
//! `depth` entries (and a CQ twice that) never overflows. A short transfer,
//! an `EINTR`/`EAGAIN`, or an unsupported `fallocate` mode re-arms the same
//! slot with the remainder or the next fallback step. Block-device range ops
//! run as blocking ioctls at submit and wait in `ready` like the sync engine's.
//! Reads and writes are first tried in the submitting thread where that
//! cannot wait for a device, and ext4's buffered writes while the ring is
//! idle (`inline.rs`); what that leaves goes through the ring.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::register::Restriction;
use io_uring::{IoUring, Probe, opcode, squeue, types};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::inline::{self, InlineIo};
use super::ops::{self, FallocSupport, IovCursor, ZeroStep, errno_err};
use super::{Completion, Engine, Op};

/// The only operations an engine's ring accepts (`IORING_REGISTER_RESTRICTIONS`).
const ALLOWED_OPCODES: [u8; 6] = [
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

/// Times one op is reissued after `EINTR`/`EAGAIN` before the error is reported.
const MAX_RETRIES: u8 = 16;

/// Checks that io_uring works here and supports every opcode the engine uses.
pub(super) fn probe() -> io::Result<()> {
    let ring = IoUring::new(4)?;
    let evt = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    ring.submitter().register_eventfd(evt.as_raw_fd())?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        ("READ", opcode::Read::CODE),
        ("WRITE", opcode::Write::CODE),
        ("READV", opcode::Readv::CODE),
        ("WRITEV", opcode::Writev::CODE),
        ("FSYNC", opcode::Fsync::CODE),
        ("FALLOCATE", opcode::Fallocate::CODE),
    ];
    for (name, code) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks IORING_OP_{name}"),
            ));
        }
    }
    Ok(())
}

/// The errno of a negative CQE result (never panics, even on `i32::MIN`).
fn cqe_errno(res: i32) -> i32 {
    res.checked_neg().unwrap_or(libc::EIO)
}

/// What an in-flight op still has to do.
enum State {
    /// A read or write; `offset` and `cursor` track what is left.
    Rw {
        write: bool,
        fua: bool,
        offset: u64,
        cursor: IovCursor,
        done: u64,
        total: u64,
    },
    /// `fdatasync`.
    Flush,
    /// Zeroing by `fallocate` with the mode of `step` (never `ZeroStep::Write`).
    Fallocate {
        offset: u64,
        len: u64,
        step: ZeroStep,
    },
    /// Zeroing by writing zero buffers; `cursor` covers the next chunk.
    ZeroWrite {
        offset: u64,
        remaining: u64,
        cursor: IovCursor,
    },
}

impl State {
    /// The state that zeroes `len` bytes at `offset` starting with `step`.
    fn zeroing(offset: u64, len: u64, step: ZeroStep) -> State {
        match step {
            ZeroStep::Write => {
                let mut iovecs = Vec::new();
                ops::zero_iovecs(&mut iovecs, len);
                State::ZeroWrite {
                    offset,
                    remaining: len,
                    cursor: IovCursor::new(iovecs),
                }
            }
            step => State::Fallocate { offset, len, step },
        }
    }
}

/// One in-flight op.
struct Slot {
    token: u64,
    state: State,
    /// Bytes the SQE in the ring asks for (data ops), to reject bogus results.
    issued: u64,
    retries: u8,
}

impl Slot {
    /// Builds the SQE for the op's next step and records what it asks for.
    fn sqe(&mut self, fd: RawFd) -> squeue::Entry {
        let fd = types::Fd(fd);
        match &self.state {
            State::Rw {
                write,
                fua,
                offset,
                cursor,
                ..
            } => {
                let flags = if *write && *fua { libc::RWF_DSYNC } else { 0 };
                rw_sqe(fd, *write, *offset, cursor, flags, &mut self.issued)
            }
            State::ZeroWrite { offset, cursor, .. } => {
                rw_sqe(fd, true, *offset, cursor, 0, &mut self.issued)
            }
            State::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            State::Fallocate { offset, len, step } => {
                // `ZeroStep::Write` never reaches this state; 0 is harmless.
                let mode = step.fallocate_mode().unwrap_or(0);
                opcode::Fallocate::new(fd, *len)
                    .offset(*offset)
                    .mode(mode)
                    .build()
            }
        }
    }

    /// Applies a CQE result. Returns the op's final result, or `None` if the
    /// slot was re-armed and needs another SQE.
    fn on_result(&mut self, res: i32, support: &mut FallocSupport) -> Option<io::Result<u64>> {
        if res < 0 {
            let errno = cqe_errno(res);
            if (errno == libc::EINTR || errno == libc::EAGAIN) && self.retries < MAX_RETRIES {
                self.retries += 1;
                return None;
            }
            return match &mut self.state {
                State::Fallocate { offset, len, step } => {
                    match support.after_failure(*step, errno) {
                        Some(next) => {
                            self.state = State::zeroing(*offset, *len, next);
                            None
                        }
                        None => Some(Err(errno_err(errno))),
                    }
                }
                _ => Some(Err(errno_err(errno))),
            };
        }
        let n = u64::from(res.unsigned_abs());
        match &mut self.state {
            State::Flush | State::Fallocate { .. } => Some(Ok(0)),
            State::Rw {
                offset,
                cursor,
                done,
                total,
                ..
            } => {
                if n == 0 || n > self.issued {
                    // End of file before the end of a read, a write making no
                    // progress, or a result the SQE cannot have produced.
                    return Some(Err(errno_err(libc::EIO)));
                }
                *done += n;
                if *done >= *total {
                    return Some(Ok(*total));
                }
                *offset += n;
                cursor.advance(n);
                None
            }
            State::ZeroWrite {
                offset,
                remaining,
                cursor,
            } => {
                if n == 0 || n > self.issued {
                    return Some(Err(errno_err(libc::EIO)));
                }
                *remaining -= n;
                if *remaining == 0 {
                    return Some(Ok(0));
                }
                *offset += n;
                let mut iovecs = Vec::new();
                ops::zero_iovecs(&mut iovecs, *remaining);
                *cursor = IovCursor::new(iovecs);
                None
            }
        }
    }
}

/// A read or write SQE for what `cursor` has pending; sets `issued`.
fn rw_sqe(
    fd: types::Fd,
    write: bool,
    offset: u64,
    cursor: &IovCursor,
    rw_flags: i32,
    issued: &mut u64,
) -> squeue::Entry {
    let pending = cursor.pending();
    if let [iov] = pending {
        // One buffer: the non-vectored opcodes. Longer than u32 continues as a short transfer.
        let len = u32::try_from(iov.iov_len).unwrap_or(u32::MAX);
        *issued = u64::from(len);
        if write {
            opcode::Write::new(fd, iov.iov_base.cast::<u8>().cast_const(), len)
                .offset(offset)
                .rw_flags(rw_flags)
                .build()
        } else {
            opcode::Read::new(fd, iov.iov_base.cast::<u8>(), len)
                .offset(offset)
                .rw_flags(rw_flags)
                .build()
        }
    } else {
        *issued = cursor.pending_len();
        // pending.len() <= IOV_MAX.
        let count = pending.len() as u32;
        if write {
            opcode::Writev::new(fd, pending.as_ptr(), count)
                .offset(offset)
                .rw_flags(rw_flags)
                .build()
        } else {
            opcode::Readv::new(fd, pending.as_ptr(), count)
                .offset(offset)
                .rw_flags(rw_flags)
                .build()
        }
    }
}

/// io_uring engine: one ring, its registered eventfd, and the slab of in-flight ops.
pub(super) struct UringEngine {
    ring: IoUring,
    evt: EventFd,
    /// Keeps the image fd open while the ring uses it.
    file: Arc<File>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Ops finished without the ring (block-device ioctls, empty or invalid ops).
    ready: VecDeque<Completion>,
    depth: usize,
    is_block_device: bool,
    support: FallocSupport,
    /// Scratch buffer of (user data, result) pairs drained from the CQ.
    cqes: Vec<(u64, i32)>,
    /// What is tried in the submitting thread before the ring (`inline.rs`).
    inline: InlineIo,
}

impl UringEngine {
    /// A ring with room for `depth` ops over `file`, its eventfd registered.
    pub(super) fn new(file: Arc<File>, depth: usize, is_block_device: bool) -> io::Result<Self> {
        let entries =
            u32::try_from(depth.next_power_of_two()).map_err(|_| errno_err(libc::EINVAL))?;
        // Created disabled, so that the opcodes it may run are fixed before
        // it runs any: ring operations are not system calls and seccomp
        // never sees them.
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .setup_r_disabled()
            .build(entries)?;
        let evt = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        let mut allowed: Vec<Restriction> = ALLOWED_OPCODES
            .iter()
            .map(|&op| Restriction::sqe_op(op))
            .collect();
        allowed.push(Restriction::sqe_flags_allowed(0));
        ring.submitter().register_restrictions(&mut allowed)?;
        ring.submitter().register_enable_rings()?;
        let inline = InlineIo::classify(file.as_raw_fd());
        bulkhead_common::rate_limited!(
            log::Level::Debug,
            "io_uring engine: inline reads and writes {inline:?}"
        );
        Ok(UringEngine {
            ring,
            evt,
            file,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            ready: VecDeque::new(),
            depth,
            is_block_device,
            support: FallocSupport::default(),
            cqes: Vec::with_capacity(depth),
            inline,
        })
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Queues a completion that needed no ring and signals the eventfd.
    fn complete_now(&mut self, token: u64, result: io::Result<u64>) {
        // `reap` clears the eventfd, then takes all of `ready`: while `ready`
        // holds anything, the eventfd was signalled after that clear.
        let signalled = !self.ready.is_empty();
        self.ready.push_back(Completion { token, result });
        if signalled {
            return;
        }
        if let Err(e) = self.evt.write(1) {
            // Only fails if the counter would overflow; the next reap still finds it.
            bulkhead_common::rate_limited!(
                log::Level::Warn,
                "Signalling the completion eventfd failed: {e}"
            );
        }
    }

    /// Reads what it can of `cursor` at `offset` in this thread, if the image
    /// is memory (see `inline.rs`); returns the bytes read. Errors, `EAGAIN`
    /// and end of file return what was read so far: the ring redoes the rest
    /// and reports any error itself.
    ///
    /// # Safety
    /// The iovecs of `cursor` must describe writable memory.
    unsafe fn read_inline(&self, offset: u64, cursor: &IovCursor) -> u64 {
        if !self.inline.reads_here() {
            return 0;
        }
        // SAFETY: the caller guarantees the iovecs are writable memory.
        match unsafe { inline::preadv2(self.fd(), cursor.pending(), offset, 0) } {
            // At most what was asked for; a bogus larger count is ignored.
            Ok(n) if n <= cursor.pending_len() => n,
            _ => 0,
        }
    }

    /// Writes what it can of `cursor` at `offset` in this thread where
    /// `inline.rs` allows it (memory images; ext4 buffered writes while the
    /// ring is idle), with `RWF_DSYNC` for FUA; returns the bytes written. As
    /// for reads, the ring redoes the rest and reports any error itself.
    ///
    /// # Safety
    /// The iovecs of `cursor` must describe readable memory.
    unsafe fn write_inline(&self, offset: u64, fua: bool, cursor: &IovCursor) -> u64 {
        let on_ring = self.depth - self.free.len();
        if !self.inline.write_here(fua, on_ring) {
            return 0;
        }
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        // SAFETY: the caller guarantees the iovecs are readable memory.
        match unsafe { inline::pwritev2(self.fd(), cursor.pending(), offset, flags) } {
            Ok(n) if n <= cursor.pending_len() => n,
            _ => 0,
        }
    }

    /// Pushes the SQE of slot `idx` into the submission queue.
    fn push_sqe(&mut self, idx: usize) -> io::Result<()> {
        let fd = self.fd();
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return Err(errno_err(libc::EINVAL));
        };
        let entry = slot.sqe(fd).user_data(idx as u64);
        // SAFETY: the buffers stay valid until the completion is reaped (the
        // `submit` contract); the iovec array is owned by the slot, which lives
        // until this SQE's CQE has been handled.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))
    }

    /// Submits what the SQ holds, retrying `EINTR`; stops if the kernel takes nothing.
    fn submit_queued(&mut self) -> io::Result<()> {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WouldBlock)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Handles one CQE: completes its op into `out`, or re-arms it. True if an SQE was queued.
    fn on_cqe(&mut self, user_data: u64, res: i32, out: &mut Vec<Completion>) -> bool {
        let idx = usize::try_from(user_data).unwrap_or(usize::MAX);
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            bulkhead_common::rate_limited!(
                log::Level::Warn,
                "io_uring completion for unknown slot {user_data} ignored"
            );
            return false;
        };
        let token = slot.token;
        let result = match slot.on_result(res, &mut self.support) {
            Some(result) => result,
            None => match self.push_sqe(idx) {
                Ok(()) => return true,
                Err(e) => Err(e),
            },
        };
        self.slots[idx] = None;
        self.free.push(idx);
        out.push(Completion { token, result });
        false
    }
}

impl Engine for UringEngine {
    fn completion_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    unsafe fn submit(&mut self, token: u64, op: Op) -> io::Result<()> {
        if self.in_flight() >= self.depth {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let total = match ops::validate(&op) {
            Ok(total) => total,
            Err(e) => {
                self.complete_now(token, Err(e));
                return Ok(());
            }
        };
        let fd = self.fd();
        let state = match op {
            Op::Read { .. } | Op::Write { .. } if total == 0 => {
                self.complete_now(token, Ok(0));
                return Ok(());
            }
            Op::Read { offset, iovecs } => {
                let mut cursor = IovCursor::new(iovecs);
                // SAFETY: the `submit` contract: the iovecs are writable memory.
                let done = unsafe { self.read_inline(offset, &cursor) };
                if done == total {
                    self.complete_now(token, Ok(total));
                    return Ok(());
                }
                cursor.advance(done);
                State::Rw {
                    write: false,
                    fua: false,
                    offset: offset + done,
                    cursor,
                    done,
                    total,
                }
            }
            Op::Write {
                offset,
                iovecs,
                fua,
            } => {
                let mut cursor = IovCursor::new(iovecs);
                // SAFETY: the `submit` contract: the iovecs are readable memory.
                let done = unsafe { self.write_inline(offset, fua, &cursor) };
                if done == total {
                    self.complete_now(token, Ok(total));
                    return Ok(());
                }
                cursor.advance(done);
                State::Rw {
                    write: true,
                    fua,
                    offset: offset + done,
                    cursor,
                    done,
                    total,
                }
            }
            Op::Flush => State::Flush,
            Op::Discard { len: 0, .. } | Op::WriteZeroes { len: 0, .. } => {
                self.complete_now(token, Ok(0));
                return Ok(());
            }
            Op::Discard { offset, len } if self.is_block_device => {
                let result = ops::blk_discard(fd, offset, len);
                self.complete_now(token, result);
                return Ok(());
            }
            Op::WriteZeroes { offset, len, .. } if self.is_block_device => {
                let result = ops::blk_zeroout(fd, offset, len);
                self.complete_now(token, result);
                return Ok(());
            }
            Op::Discard { offset, len } => {
                State::zeroing(offset, len, self.support.first_step(true))
            }
            Op::WriteZeroes { offset, len, unmap } => {
                State::zeroing(offset, len, self.support.first_step(unmap))
            }
        };
        let Some(idx) = self.free.pop() else {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        };
        self.slots[idx] = Some(Slot {
            token,
            state,
            issued: 0,
            retries: 0,
        });
        if let Err(e) = self.push_sqe(idx) {
            self.slots[idx] = None;
            self.free.push(idx);
            return Err(e);
        }
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        self.submit_queued()
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || !self.ring.completion().is_empty()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        // Clear readiness first: a CQE posted after this read signals again.
        match self.evt.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        out.extend(self.ready.drain(..));
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            if cqes.is_empty() {
                break;
            }
            let mut requeued = false;
            for &(user_data, res) in &cqes {
                requeued |= self.on_cqe(user_data, res, out);
            }
            if requeued {
                // Continuations stay queued if this fails; commit or wait retries.
                if let Err(e) = self.submit_queued() {
                    bulkhead_common::rate_limited!(
                        log::Level::Debug,
                        "Resubmitting continuations deferred: {e}"
                    );
                }
            }
        }
        self.cqes = cqes;
        Ok(())
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        loop {
            let before = out.len();
            self.reap(out)?;
            if out.len() > before || self.in_flight() == 0 {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn in_flight(&self) -> usize {
        (self.depth - self.free.len()) + self.ready.len()
    }

    fn depth(&self) -> usize {
        self.depth
    }
}

impl Drop for UringEngine {
    /// Waits for the ops still in the ring, so the kernel is done with their
    /// buffers and iovec arrays before the slab is freed.
    fn drop(&mut self) {
        let mut pending = self.depth - self.free.len();
        while pending > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    bulkhead_common::rate_limited!(
                        log::Level::Error,
                        "Draining io_uring on drop failed: {e}"
                    );
                    return;
                }
            }
            for cqe in self.ring.completion() {
                let idx = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
                if let Some(slot) = self.slots.get_mut(idx)
                    && slot.take().is_some()
                {
                    pending -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_refuses_opcodes_outside_its_restrictions() {
        let path = std::env::temp_dir().join(format!("bulkhead-uring-{}", std::process::id()));
        let file = Arc::new(File::create(&path).unwrap());
        let _ = std::fs::remove_file(&path);
        let mut e = UringEngine::new(file, 8, false).unwrap();
        // A NOP is not among the engine's operations: the kernel must refuse it.
        let nop = opcode::Nop::new().build().user_data(7);
        // SAFETY: a NOP references no memory.
        unsafe { e.ring.submission().push(&nop).unwrap() };
        e.ring.submit_and_wait(1).unwrap();
        let cqe = e.ring.completion().next().unwrap();
        assert_eq!((cqe.user_data(), cqe.result()), (7, -libc::EACCES));
    }
}
