//! Block I/O engines: execute block operations on the image fd and report
//! completions asynchronously through an eventfd.
//!
//! Each virtqueue worker owns one [`Engine`]. The worker calls
//! [`Engine::submit`] for each validated request, [`Engine::commit`] once per
//! batch, adds [`Engine::completion_fd`] to its epoll set and calls
//! [`Engine::reap`] when it becomes readable.
//!
//! - [`EngineKind::IoUring`] (`uring.rs`): one ring per worker, an eventfd
//!   registered with the ring, a slab of in-flight operations keyed by the
//!   CQE user data that owns each op's iovec array until it completes. Short
//!   transfers are resubmitted from where they stopped. Reads are first
//!   done in the queue thread on tmpfs/ramfs images (`inline.rs`): those
//!   never wait for a device, and io_uring would hand each one to a worker
//!   thread.
//! - [`EngineKind::Sync`] (`sync.rs`): performs each op in `submit` with the
//!   blocking syscalls and queues its completion; the fallback where io_uring
//!   is unavailable.
//!
//! - RBD (`rbd.rs`, `--image rbd:POOL/IMAGE`): each op is a librbd
//!   asynchronous call, dispatched in the queue thread; librbd's threads
//!   queue the completion and signal the eventfd. Chosen by the image, not
//!   by `--engine`.
//!
//! The file engines share `ops.rs`: range checks, iovec bookkeeping, the blocking
//! syscalls, and the fallback chain for zeroing (punch hole, then zero range,
//! then writing zero buffers: tmpfs supports only punch hole). FUA writes use
//! `RWF_DSYNC`, so a FUA write completes once, after its data is durable. On
//! block devices, discard and write-zeroes are `BLKDISCARD`/`BLKZEROOUT`
//! ioctls issued synchronously at submit.

mod inline;
mod ops;
#[cfg(feature = "rbd")]
mod rbd;
mod sync;
#[cfg(test)]
mod tests;
mod uring;

use std::fs::File;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, OnceLock};

/// Largest queue depth an engine accepts (the largest virtqueue size).
pub const MAX_DEPTH: usize = 32768;

/// One block operation on the image. Buffers are raw iovecs pointing into guest memory
/// that the caller keeps mapped until the operation completes.
#[derive(Debug)]
pub enum Op {
    /// Read into `iovecs` starting at byte `offset` of the image.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Destination buffers, filled in order.
        iovecs: Vec<libc::iovec>,
    },
    /// `fua`: the data must be on stable storage when the op completes (write-through mode).
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Source buffers, written in order.
        iovecs: Vec<libc::iovec>,
        /// Complete only once the data is durable.
        fua: bool,
    },
    /// Make every completed write durable (fdatasync-equivalent; fsync for metadata is fine).
    Flush,
    /// Deallocate the range if possible (punch hole, KEEP_SIZE; BLKDISCARD on block devices); reads of it return zeroes afterwards for files.
    Discard {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Zero the range; with `unmap` the range may be deallocated (punch hole) instead of written.
    WriteZeroes {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The range may be deallocated instead of written.
        unmap: bool,
    },
}

/// The outcome of one operation, tagged with the token given to [`Engine::submit`].
#[derive(Debug)]
pub struct Completion {
    /// The caller's token from [`Engine::submit`].
    pub token: u64,
    /// Bytes transferred, 0 for non-data ops; or the error the operation hit.
    pub result: io::Result<u64>,
}

/// Which engine implementation to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring with an eventfd for completions (the default).
    IoUring,
    /// Blocking syscalls performed at submit (`--engine sync`).
    Sync,
    /// librbd's asynchronous calls (`--image rbd:POOL/IMAGE`).
    Rbd,
}

impl std::fmt::Display for EngineKind {
    /// The word `--engine` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::IoUring => "io-uring",
            EngineKind::Sync => "sync",
            EngineKind::Rbd => "rbd",
        })
    }
}

/// An asynchronous executor of block operations on one image fd.
pub trait Engine: Send {
    /// Fd that becomes readable when completions are ready; the worker adds it to its epoll set.
    fn completion_fd(&self) -> RawFd;
    /// Queues `op`; its completion carries `token`. Errors: queue full (the caller retries after reaping), or a setup failure.
    /// SAFETY contract: iovecs must stay valid until the completion is reaped.
    ///
    /// Queue full is reported as [`io::ErrorKind::WouldBlock`]; see [`is_queue_full`].
    /// Invalid ranges (offset + length overflowing) are reported in the
    /// completion as `EINVAL`, not here.
    ///
    /// # Safety
    /// Every iovec of `op` must describe memory that stays valid (mapped, and
    /// for reads writable) until the completion for `token` has been reaped.
    unsafe fn submit(&mut self, token: u64, op: Op) -> io::Result<()>;
    /// Hands queued operations to the kernel (one syscall for a batch).
    fn commit(&mut self) -> io::Result<()>;
    /// Appends every ready completion to `out` without blocking, and clears the completion fd's readiness.
    fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()>;
    /// Blocks until at least one operation completes (or none is in flight), then reaps like `reap`.
    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()>;
    /// True when `reap` would find a completion, checked without a syscall
    /// (for busy polling). Engines that cannot tell say false: their
    /// completion fd wakes the worker instead.
    fn has_completions(&mut self) -> bool {
        false
    }
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Capacity: at most this many ops in flight.
    fn depth(&self) -> usize;
}

/// True if `err` is the "queue full" error of [`Engine::submit`]: reap, then retry.
pub fn is_queue_full(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::WouldBlock
}

/// Opens an engine of `kind` over `file` (shared by the queues; the engine may dup it or register it) with room for `depth` ops.
///
/// `depth` must be in `1..=MAX_DEPTH`; the engine keeps `file` alive.
pub fn new_engine(
    kind: EngineKind,
    file: Arc<File>,
    depth: usize,
    is_block_device: bool,
) -> io::Result<Box<dyn Engine>> {
    if depth == 0 || depth > MAX_DEPTH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("engine depth {depth} not in 1..={MAX_DEPTH}"),
        ));
    }
    Ok(match kind {
        EngineKind::IoUring => Box::new(uring::UringEngine::new(file, depth, is_block_device)?),
        EngineKind::Sync => Box::new(sync::SyncEngine::new(file, depth, is_block_device)?),
        EngineKind::Rbd => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the rbd engine serves RBD images, not files",
            ));
        }
    })
}

/// Opens an RBD engine over `image` with room for `depth` ops.
#[cfg(feature = "rbd")]
pub fn new_rbd_engine(image: Arc<crate::rbd::Image>, depth: usize) -> io::Result<Box<dyn Engine>> {
    if depth == 0 || depth > MAX_DEPTH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("engine depth {depth} not in 1..={MAX_DEPTH}"),
        ));
    }
    Ok(Box::new(rbd::RbdEngine::new(image, depth)?))
}

/// True if io_uring works here (probe once: create a small ring); the daemon falls back to Sync with a warning otherwise.
pub fn io_uring_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| match uring::probe() {
        Ok(()) => true,
        Err(e) => {
            bulkhead_common::rate_limited!(log::Level::Debug, "io_uring unavailable: {e}");
            false
        }
    })
}
