//! The RBD engine: each op becomes one librbd asynchronous call, which
//! runs librbd's layers in the queue thread and returns once librados has
//! the request (`rbd_non_blocking_aio` is off, `rbd.rs`). librbd completes
//! it on one of its own threads, which runs [`on_complete`]: the result
//! goes into a queue shared with the worker and the engine's eventfd is
//! signalled, so the queue thread reaps it from its event loop like an
//! io_uring completion. No queue thread waits for an answer from the
//! cluster; it can wait for room in librados' budget of requests in flight.
//! A call that fails at once may call back before it returns (in this
//! thread): `push` takes only the completion queue's lock.

use std::ffi::c_void;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Completion, Engine, Op};
use crate::rbd::{Image, sys};

/// What the worker and librbd's callback threads share.
struct Shared {
    evt: EventFd,
    done: Mutex<Vec<Completion>>,
}

/// One operation in librbd's hands: owned by the completion's callback
/// argument, freed in [`on_complete`].
struct Pending {
    shared: Arc<Shared>,
    token: u64,
    /// Bytes a read must return.
    read_len: Option<u64>,
    /// The iovec array librbd was given, kept until the op completes.
    iovecs: Vec<libc::iovec>,
}

extern "C" fn on_complete(c: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Pending> leaked in `submit` for this
    // completion; librbd calls back exactly once.
    let pending = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    // SAFETY: `c` is the completion this callback is for.
    let ret = unsafe { sys::rbd_aio_get_return_value(c) };
    // SAFETY: released once, here, after its value is read (as QEMU does).
    unsafe { sys::rbd_aio_release(c) };
    let result = if ret < 0 {
        Err(io::Error::from_raw_os_error(
            i32::try_from(-ret).unwrap_or(libc::EIO),
        ))
    } else {
        match pending.read_len {
            Some(want) if ret as u64 != want => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read from RBD: {ret} of {want} bytes"),
            )),
            _ => Ok(ret as u64),
        }
    };
    push(&pending.shared, pending.token, result);
}

fn push(shared: &Shared, token: u64, result: io::Result<u64>) {
    shared
        .done
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Completion { token, result });
    if let Err(e) = shared.evt.write(1) {
        bulkhead_common::rate_limited!(
            log::Level::Warn,
            "Signalling the RBD completion eventfd failed: {e}"
        );
    }
}

/// Asynchronous engine over librbd (`--image rbd:POOL/IMAGE`).
pub(crate) struct RbdEngine {
    image: Arc<Image>,
    shared: Arc<Shared>,
    depth: usize,
    in_flight: usize,
}

impl RbdEngine {
    /// An engine over `image` with room for `depth` ops in flight.
    pub(crate) fn new(image: Arc<Image>, depth: usize) -> io::Result<Self> {
        Ok(RbdEngine {
            image,
            shared: Arc::new(Shared {
                evt: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
                done: Mutex::new(Vec::with_capacity(depth)),
            }),
            depth,
            in_flight: 0,
        })
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.image.size)
    }
}

fn iov_len(iovecs: &[libc::iovec]) -> Option<u64> {
    iovecs
        .iter()
        .try_fold(0u64, |acc, v| acc.checked_add(v.iov_len as u64))
}

impl Engine for RbdEngine {
    fn completion_fd(&self) -> RawFd {
        self.shared.evt.as_raw_fd()
    }

    unsafe fn submit(&mut self, token: u64, op: Op) -> io::Result<()> {
        if self.in_flight >= self.depth {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        // Check the range and pick the call before anything is handed to librbd.
        let (iovecs, read_len) = match &op {
            Op::Read { offset, iovecs } | Op::Write { offset, iovecs, .. } => {
                let len = iov_len(iovecs);
                let ok = len.is_some_and(|l| self.in_range(*offset, l))
                    && i32::try_from(iovecs.len()).is_ok();
                if !ok {
                    self.in_flight += 1;
                    push(&self.shared, token, Err(einval()));
                    return Ok(());
                }
                let read_len = matches!(op, Op::Read { .. }).then_some(len.unwrap_or(0));
                (iovecs.clone(), read_len)
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                if !self.in_range(*offset, *len) || usize::try_from(*len).is_err() {
                    self.in_flight += 1;
                    push(&self.shared, token, Err(einval()));
                    return Ok(());
                }
                (Vec::new(), None)
            }
            Op::Flush => (Vec::new(), None),
        };
        let arg = Box::into_raw(Box::new(Pending {
            shared: Arc::clone(&self.shared),
            token,
            read_len,
            iovecs,
        }));
        let mut c: sys::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `arg` stays valid until the callback reclaims it;
        // out-pointer to a local.
        let ret = unsafe { sys::rbd_aio_create_completion(arg.cast(), on_complete, &mut c) };
        if ret < 0 {
            // SAFETY: not handed to librbd; reclaimed once, here.
            drop(unsafe { Box::from_raw(arg) });
            return Err(io::Error::from_raw_os_error(-ret));
        }
        let image = self.image.handle();
        // SAFETY: `arg` is live until the callback; its iovec array (a copy
        // of the op's, kept in Pending) describes guest memory the caller
        // keeps valid until this op is reaped (the submit contract); the
        // ranges were checked above; `c` is a fresh completion.
        let ret = unsafe {
            let iov = &(*arg).iovecs;
            match op {
                Op::Read { offset, .. } => {
                    sys::rbd_aio_readv(image, iov.as_ptr(), iov.len() as i32, offset, c)
                }
                // The write cache is off (`rbd.rs`): a completed write is
                // on the OSDs, which is what FUA asks.
                Op::Write { offset, .. } => {
                    sys::rbd_aio_writev(image, iov.as_ptr(), iov.len() as i32, offset, c)
                }
                Op::Flush => sys::rbd_aio_flush(image, c),
                Op::Discard { offset, len } => sys::rbd_aio_discard(image, offset, len, c),
                // Never a discard: librbd skips discards under 64 KiB
                // (rbd_skip_partial_discard), which would leave old data.
                Op::WriteZeroes { offset, len, .. } => {
                    sys::rbd_aio_write_zeroes(image, offset, len as usize, c, 0, 0)
                }
            }
        };
        if ret < 0 {
            // Not queued: librbd will not call back.
            // SAFETY: `c` is ours and unused; `arg` reclaimed once, here.
            unsafe { sys::rbd_aio_release(c) };
            // SAFETY: as above.
            drop(unsafe { Box::from_raw(arg) });
            self.in_flight += 1;
            push(&self.shared, token, Err(io::Error::from_raw_os_error(-ret)));
            return Ok(());
        }
        self.in_flight += 1;
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        match self.shared.evt.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let mut done = self
            .shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.in_flight = self.in_flight.saturating_sub(done.len());
        out.append(&mut done);
        Ok(())
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        let before = out.len();
        loop {
            self.reap(out)?;
            if out.len() > before || self.in_flight == 0 {
                return Ok(());
            }
            let mut pfd = libc::pollfd {
                fd: self.shared.evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on the stack.
            if unsafe { libc::poll(&mut pfd, 1, 1000) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    fn has_completions(&mut self) -> bool {
        !self
            .shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn depth(&self) -> usize {
        self.depth
    }
}

impl Drop for RbdEngine {
    fn drop(&mut self) {
        // Callbacks still to come own their Pending (and an Arc of Shared);
        // the guest memory they point at must outlive them: wait for them.
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            if self.wait(&mut sink).is_err() {
                break;
            }
            sink.clear();
        }
    }
}
