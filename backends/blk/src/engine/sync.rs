//! The synchronous engine: each op runs to completion inside `submit` with
//! blocking syscalls; its completion waits in a queue and the eventfd is
//! signalled, so the worker sees the same asynchronous interface as io_uring.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::ops::{self, FallocSupport};
use super::{Completion, Engine, Op};

/// Blocking engine over pread/pwrite-family syscalls (`--engine sync`).
pub(super) struct SyncEngine {
    /// Keeps the image fd open.
    file: Arc<File>,
    evt: EventFd,
    ready: VecDeque<Completion>,
    depth: usize,
    is_block_device: bool,
    support: FallocSupport,
}

impl SyncEngine {
    /// A sync engine over `file` with room for `depth` unreaped completions.
    pub(super) fn new(file: Arc<File>, depth: usize, is_block_device: bool) -> io::Result<Self> {
        Ok(SyncEngine {
            file,
            evt: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            ready: VecDeque::with_capacity(depth),
            depth,
            is_block_device,
            support: FallocSupport::default(),
        })
    }
}

impl Engine for SyncEngine {
    fn completion_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    unsafe fn submit(&mut self, token: u64, op: Op) -> io::Result<()> {
        if self.ready.len() >= self.depth {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: the caller keeps the iovecs valid until the completion is
        // reaped, which is after this call returns.
        let result =
            unsafe { ops::execute_blocking(fd, op, self.is_block_device, &mut self.support) };
        self.ready.push_back(Completion { token, result });
        if let Err(e) = self.evt.write(1) {
            // Only fails if the counter would overflow; the completion is
            // still queued and is returned by the next reap.
            bulkhead_common::rate_limited!(
                log::Level::Warn,
                "Signalling the completion eventfd failed: {e}"
            );
        }
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        match self.evt.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        // Every submitted op has already completed.
        self.reap(out)
    }

    fn in_flight(&self) -> usize {
        self.ready.len()
    }

    fn depth(&self) -> usize {
        self.depth
    }
}
