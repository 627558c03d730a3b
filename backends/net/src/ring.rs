//! Several tap reads (or writes) in one system call, through io_uring.
//!
//! On these machines a system call's entry and exit alone cost about 0.6 µs
//! (CPU-buffer clearing and return-stack mitigations), as much as the rest
//! of a small frame's work. A queue thread hands a batch of readv (writev)
//! operations to the ring and enters the kernel once for all of them. Each
//! is flagged `RWF_NOWAIT`, so the kernel runs every one during that single
//! `io_uring_enter` and none waits in the ring for the tap: an empty tap
//! answers `EAGAIN` at once. Nothing is in flight once [`TapRing::run`]
//! returns, so guest memory the iovecs point to is never written after the
//! worker lets go of the chains; a result that did not come back would keep
//! the thread waiting in `run`, never let the kernel write later.

use std::io;
use std::os::unix::io::RawFd;

use io_uring::register::Restriction;
use io_uring::{IoUring, opcode, squeue, types};

/// Most operations in one batch (and the ring's size).
pub(crate) const BATCH_MAX: usize = 32;

/// Times `run` enters the kernel again after `EINTR`/`EAGAIN`/`EBUSY` before it gives up.
const MAX_RETRIES: u32 = 64;

/// An io_uring that runs only non-blocking reads and writes, alone or linked.
///
/// The tap is named by its fd in each operation, not registered with the
/// ring: a registered file is released only by the ring's teardown, which
/// the kernel finishes in a worker some 20 ms after a SIGKILLed daemon is
/// gone, and until then the tap queue stays attached (a single-queue tap
/// answers a restarted daemon's `TUNSETIFF` with `EBUSY`; measured on
/// 6.18, docs/performance-notes.md).
pub(crate) struct TapRing {
    ring: IoUring,
    /// Each operation's result (bytes or a negative errno), in batch order.
    results: Vec<i32>,
}

impl TapRing {
    /// A ring for batches of up to [`BATCH_MAX`], limited to read, readv,
    /// write and writev with no SQE flag but `IO_LINK`. `None` where io_uring
    /// cannot be used here (old kernel, `kernel.io_uring_disabled`, a
    /// container's filter): the worker then makes one system call per
    /// frame, as before.
    pub(crate) fn new() -> Option<TapRing> {
        match Self::build() {
            Ok(ring) => Some(ring),
            Err(e) => {
                bulkhead_common::rate_limited!(
                    log::Level::Info,
                    "io_uring not usable ({e}): one system call per frame"
                );
                None
            }
        }
    }

    fn build() -> io::Result<TapRing> {
        // Created disabled, so that the opcodes it may run are fixed before
        // it runs any: ring operations are not system calls, and seccomp
        // never sees them.
        let entries = BATCH_MAX as u32;
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .setup_r_disabled()
            .build(entries)?;
        let mut allowed = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_flags_allowed(squeue::Flags::IO_LINK.bits()),
        ];
        ring.submitter().register_restrictions(&mut allowed)?;
        ring.submitter().register_enable_rings()?;
        Ok(TapRing {
            ring,
            results: Vec::with_capacity(BATCH_MAX),
        })
    }

    /// Runs one read (`write` false) or write per iovec list on `fd`, in
    /// order, each non-blocking, and returns their results in the same order:
    /// bytes moved, or a negative errno (`-EAGAIN`: the tap was empty, or full).
    /// `linked`: each runs only if the one before moved all its bytes, the
    /// rest answer `-ECANCELED` (so a refused frame is never overtaken).
    /// Lists beyond [`BATCH_MAX`] are not run (their results are absent).
    ///
    /// An `Err` means the ring itself failed; the caller stops using it (the
    /// operations already submitted have completed or will be cancelled
    /// when the ring is dropped, and each was non-blocking).
    ///
    /// # Safety
    /// Every iovec must point to memory writable (readable, for `write`) for
    /// its length until this returns.
    pub(crate) unsafe fn run<'a>(
        &mut self,
        fd: RawFd,
        write: bool,
        linked: bool,
        lists: impl ExactSizeIterator<Item = &'a [libc::iovec]>,
    ) -> io::Result<&[i32]> {
        let mut n = 0usize;
        let count = lists.len().min(BATCH_MAX);
        {
            let mut sq = self.ring.submission();
            for list in lists.take(BATCH_MAX) {
                let op = match (write, list) {
                    // One buffer (a small frame copied behind its header):
                    // a plain read or write, which spares the kernel the
                    // iovec array's copy and import.
                    (true, [one]) => {
                        let len = u32::try_from(one.iov_len).map_err(io::Error::other)?;
                        opcode::Write::new(types::Fd(fd), one.iov_base.cast_const().cast(), len)
                            .rw_flags(libc::RWF_NOWAIT)
                            .build()
                    }
                    (false, [one]) => {
                        let len = u32::try_from(one.iov_len).map_err(io::Error::other)?;
                        opcode::Read::new(types::Fd(fd), one.iov_base.cast(), len)
                            .rw_flags(libc::RWF_NOWAIT)
                            .build()
                    }
                    (true, _) => {
                        let len = u32::try_from(list.len()).map_err(io::Error::other)?;
                        opcode::Writev::new(types::Fd(fd), list.as_ptr(), len)
                            .rw_flags(libc::RWF_NOWAIT)
                            .build()
                    }
                    (false, _) => {
                        let len = u32::try_from(list.len()).map_err(io::Error::other)?;
                        opcode::Readv::new(types::Fd(fd), list.as_ptr(), len)
                            .rw_flags(libc::RWF_NOWAIT)
                            .build()
                    }
                };
                let op = if linked && n + 1 < count {
                    op.flags(squeue::Flags::IO_LINK)
                } else {
                    op
                };
                // SAFETY: the caller keeps every iovec's memory valid until
                // this returns, and `run` returns only once every operation
                // pushed here has completed (or the ring is given up).
                if unsafe { sq.push(&op.user_data(n as u64)) }.is_err() {
                    break;
                }
                n += 1;
            }
        }
        self.results.clear();
        self.results.resize(n, -libc::EAGAIN);
        let mut done = 0usize;
        let mut retries = 0u32;
        while done < n {
            match self.ring.submit_and_wait(n - done) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) && retries < MAX_RETRIES =>
                {
                    retries += 1;
                }
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                if let Some(r) = usize::try_from(cqe.user_data())
                    .ok()
                    .and_then(|i| self.results.get_mut(i))
                {
                    *r = cqe.result();
                    done += 1;
                }
            }
        }
        Ok(&self.results)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A non-blocking `SOCK_SEQPACKET` pair: a stand-in tap, one packet per read.
    pub(crate) fn seqpacket() -> (OwnedFd, OwnedFd) {
        let mut sv = [0; 2];
        // SAFETY: socketpair writes two fds into the array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: fresh fds we own.
        unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) }
    }

    fn iov(b: &mut [u8]) -> [libc::iovec; 1] {
        [libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }]
    }

    #[test]
    fn a_batch_reads_what_is_there_and_the_rest_answers_eagain_at_once() {
        let (a, b) = seqpacket();
        let Some(mut ring) = TapRing::new() else {
            // The worker falls back to readv; its tests cover that path.
            panic!("io_uring unusable on this machine: the batched path is untested");
        };
        for k in 0..3u8 {
            // SAFETY: writing a local buffer.
            let n =
                unsafe { libc::write(b.as_raw_fd(), [k; 10].as_ptr().cast(), 10 + usize::from(k)) };
            assert!(n > 0);
        }
        let mut bufs = [[0xffu8; 64]; 5];
        let lists: Vec<[libc::iovec; 1]> = bufs.iter_mut().map(|b| iov(b)).collect();
        // SAFETY: the buffers outlive the call.
        let r = unsafe { ring.run(a.as_raw_fd(), false, false, lists.iter().map(|l| &l[..])) }
            .unwrap()
            .to_vec();
        assert_eq!(r, vec![10, 11, 12, -libc::EAGAIN, -libc::EAGAIN]);
        for (k, b) in bufs.iter().take(3).enumerate() {
            assert_eq!(b[0], k as u8, "frames stay in order");
        }
        // Writes: each list is one packet.
        let mut out = [[7u8; 20], [8u8; 20]];
        let lists: Vec<[libc::iovec; 1]> = out.iter_mut().map(|b| iov(b)).collect();
        // SAFETY: the buffers outlive the call.
        let r = unsafe { ring.run(a.as_raw_fd(), true, true, lists.iter().map(|l| &l[..])) }
            .unwrap()
            .to_vec();
        assert_eq!(r, vec![20, 20]);
        let mut got = [0u8; 64];
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(b.as_raw_fd(), got.as_mut_ptr().cast(), 64) };
        assert_eq!((n, got[0]), (20, 7));
        // SAFETY: as above.
        let n = unsafe { libc::read(b.as_raw_fd(), got.as_mut_ptr().cast(), 64) };
        assert_eq!((n, got[0]), (20, 8));
        // A frame in two pieces (a writev) and one in one buffer (a write);
        // then two packets read the same two ways (a readv, a read).
        let (mut head, mut tail, mut whole) = ([1u8; 4], [2u8; 6], [3u8; 9]);
        let lists = [
            vec![iov(&mut head)[0], iov(&mut tail)[0]],
            iov(&mut whole).to_vec(),
        ];
        // SAFETY: the buffers outlive the call.
        let r = unsafe { ring.run(a.as_raw_fd(), true, false, lists.iter().map(Vec::as_slice)) }
            .unwrap()
            .to_vec();
        assert_eq!(r, vec![10, 9]);
        let (mut x, mut y, mut z) = ([0u8; 5], [0u8; 59], [0u8; 64]);
        let lists = [vec![iov(&mut x)[0], iov(&mut y)[0]], iov(&mut z).to_vec()];
        // SAFETY: reading back what went out: `b` is the other end.
        let n = unsafe { libc::read(b.as_raw_fd(), got.as_mut_ptr().cast(), 64) };
        assert_eq!(&got[..n as usize], &[1, 1, 1, 1, 2, 2, 2, 2, 2, 2]);
        // SAFETY: writing local buffers to the ring's end.
        unsafe {
            libc::write(b.as_raw_fd(), [4u8; 7].as_ptr().cast(), 7);
            libc::write(b.as_raw_fd(), [5u8; 3].as_ptr().cast(), 3);
        }
        // SAFETY: the buffers outlive the call.
        let r = unsafe { ring.run(a.as_raw_fd(), false, false, lists.iter().map(Vec::as_slice)) }
            .unwrap()
            .to_vec();
        assert_eq!(r, vec![7, 3]);
        assert_eq!(
            (x, &y[..2], &z[..3]),
            ([4; 5], &[4u8, 4][..], &[5u8, 5, 5][..])
        );
        // SAFETY: draining the one packet left, the `whole` frame.
        let n = unsafe { libc::read(b.as_raw_fd(), got.as_mut_ptr().cast(), 64) };
        assert_eq!(&got[..n as usize], &[3; 9]);
        // A full peer: the first linked write is refused, the rest never tried.
        // SAFETY: writing a local buffer.
        while unsafe { libc::write(a.as_raw_fd(), got.as_ptr().cast(), 64) } > 0 {}
        let lists: Vec<[libc::iovec; 1]> = out.iter_mut().map(|b| iov(b)).collect();
        // SAFETY: the buffers outlive the call.
        let r = unsafe { ring.run(a.as_raw_fd(), true, true, lists.iter().map(|l| &l[..])) }
            .unwrap()
            .to_vec();
        assert_eq!(r, vec![-libc::EAGAIN, -libc::ECANCELED]);
    }
}
