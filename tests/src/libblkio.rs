//! libblkio as a second, independent vhost-user-blk client: the `blkio`
//! crate (the pure-Rust libblkio behind QEMU's blkio block driver, fio's
//! libblkio engine and nbdkit's blkio plugin) with its
//! `virtio-blk-vhost-user` driver, at its default settings (one queue of
//! 256 entries, no indirect descriptors, EVENT_IDX). Unlike the kit's own
//! driver, nothing in it was written for Bulkhead.
//!
//! libblkio only does I/O on buffers in memory regions it mapped into the
//! device; a client owns one region, split into `slots` equal buffers so
//! that up to `slots` requests can be in flight (the bench's queue depth).

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Errors from libblkio, with what the client was doing.
#[derive(Debug, thiserror::Error)]
pub enum LibblkioError {
    /// A libblkio call failed.
    #[error("libblkio {0}: {1}")]
    Blkio(&'static str, blkio::Error),
    /// A request completed with an error (negative errno).
    #[error("request {0} failed: errno {1}")]
    Request(usize, i32),
    /// The device is smaller than the range asked for, or a buffer slot is out of range.
    #[error("{0}")]
    Range(String),
}

type Result<T> = std::result::Result<T, LibblkioError>;

fn b<T>(what: &'static str, r: blkio::Result<T>) -> Result<T> {
    r.map_err(|e| LibblkioError::Blkio(what, e))
}

/// One started libblkio queue and its own `slots` buffers.
pub struct LibblkioQueue {
    queue: Blkioq,
    base: usize,
    slot_len: usize,
    slots: usize,
    capacity: u64,
}

/// A connected libblkio `virtio-blk-vhost-user` client with its started
/// queues (one by default).
pub struct LibblkioClient {
    // Dropped first: the queues, then the driver (which unmaps the region).
    queues: Vec<LibblkioQueue>,
    blkio: Blkio,
    _region: MemoryRegion,
    capacity: u64,
    queue_size: i32,
}

impl LibblkioClient {
    /// Connects to the vhost-user-blk socket at `socket` with libblkio's
    /// defaults, starts its queue and maps `slots` buffers of `slot_len`
    /// bytes each.
    pub fn connect(socket: &Path, slots: usize, slot_len: usize) -> Result<Self> {
        Self::connect_queues(socket, None, slots, slot_len)
    }

    /// As [`LibblkioClient::connect`], with `queues` queues when given
    /// (libblkio's `num-queues`; its default is one), each with `slots`
    /// buffers of its own.
    pub fn connect_queues(
        socket: &Path,
        queues: Option<usize>,
        slots: usize,
        slot_len: usize,
    ) -> Result<Self> {
        let mut blkio = b("new", Blkio::new("virtio-blk-vhost-user"))?;
        let path = socket
            .to_str()
            .ok_or_else(|| LibblkioError::Range("socket path is not UTF-8".into()))?;
        b("set path", blkio.set_str("path", path))?;
        b("connect", blkio.connect())?;
        if let Some(n) = queues {
            let n = i32::try_from(n).map_err(|_| LibblkioError::Range("queues".into()))?;
            b("set num-queues", blkio.set_i32("num-queues", n))?;
        }
        let capacity = b("get capacity", blkio.get_u64("capacity"))?;
        let queue_size = b("get queue-size", blkio.get_i32("queue-size"))?;
        let started = b("start", blkio.start())?;
        let align = b(
            "get mem-region-alignment",
            blkio.get_u64("mem-region-alignment"),
        )?;
        let align = usize::try_from(align.max(4096)).unwrap_or(4096);
        let slots = slots.max(1);
        let per_queue = (slots * slot_len).div_ceil(align) * align;
        let n = started.queues.len().max(1);
        let region = b("alloc_mem_region", blkio.alloc_mem_region(per_queue * n))?;
        b("map_mem_region", blkio.map_mem_region(&region))?;
        let queues = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, queue)| LibblkioQueue {
                queue,
                base: region.addr + i * per_queue,
                slot_len,
                slots,
                capacity,
            })
            .collect::<Vec<_>>();
        if queues.is_empty() {
            return Err(LibblkioError::Range("libblkio started no queue".into()));
        }
        Ok(LibblkioClient {
            queues,
            blkio,
            _region: region,
            capacity,
            queue_size,
        })
    }

    /// The device's capacity in bytes, as libblkio read it from the config.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The ring size libblkio set up (its default: 256).
    pub fn queue_size(&self) -> i32 {
        self.queue_size
    }

    /// A libblkio property of the connected device (e.g. `max-segments`).
    pub fn get_i32(&self, name: &str) -> Result<i32> {
        b("get property", self.blkio.get_i32(name))
    }

    /// The started queues, each to be driven by one thread.
    pub fn queues_mut(&mut self) -> &mut [LibblkioQueue] {
        &mut self.queues
    }

    fn q0(&mut self) -> &mut LibblkioQueue {
        // connect_queues refuses a client without queues.
        &mut self.queues[0]
    }

    /// Writes `data` at byte `offset` through the first queue and waits for it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let q = self.q0();
        q.fill(0, data)?;
        q.submit_write(0, offset, data.len())?;
        q.complete(1).map(|_| ())
    }

    /// Reads `len` bytes at byte `offset` through the first queue.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let q = self.q0();
        q.submit_read(0, offset, len)?;
        q.complete(1)?;
        q.slot_bytes(0, len)
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<()> {
        let q = self.q0();
        q.submit_flush(0);
        q.complete(1).map(|_| ())
    }

    /// Copies `data` into buffer `slot` of the first queue.
    pub fn fill(&mut self, slot: usize, data: &[u8]) -> Result<()> {
        self.q0().fill(slot, data)
    }

    /// Buffer `slot` of the first queue.
    pub fn slot_bytes(&mut self, slot: usize, len: usize) -> Result<Vec<u8>> {
        self.q0().slot_bytes(slot, len)
    }

    /// Queues a read on the first queue (see [`LibblkioQueue::submit_read`]).
    pub fn submit_read(&mut self, slot: usize, offset: u64, len: usize) -> Result<()> {
        self.q0().submit_read(slot, offset, len)
    }

    /// Queues a write on the first queue (see [`LibblkioQueue::submit_write`]).
    pub fn submit_write(&mut self, slot: usize, offset: u64, len: usize) -> Result<()> {
        self.q0().submit_write(slot, offset, len)
    }

    /// Completions of the first queue (see [`LibblkioQueue::complete`]).
    pub fn complete(&mut self, min: usize) -> Result<Vec<usize>> {
        self.q0().complete(min)
    }
}

impl LibblkioQueue {
    fn slot_ptr(&self, slot: usize, len: usize) -> Result<*mut u8> {
        if slot >= self.slots || len > self.slot_len {
            return Err(LibblkioError::Range(format!(
                "slot {slot} of {}, {len} bytes of {}",
                self.slots, self.slot_len
            )));
        }
        // The region is mapped for the client's whole life; this queue's
        // part is slots * slot_len long.
        Ok((self.base + slot * self.slot_len) as *mut u8)
    }

    /// Copies `data` into buffer `slot`.
    pub fn fill(&mut self, slot: usize, data: &[u8]) -> Result<()> {
        let p = self.slot_ptr(slot, data.len())?;
        // SAFETY: `p` points at `data.len()` bytes of our mapped region, which
        // no request in flight uses (the caller's slot discipline).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// The first `len` bytes of buffer `slot`.
    pub fn slot_bytes(&self, slot: usize, len: usize) -> Result<Vec<u8>> {
        let p = self.slot_ptr(slot, len)?;
        let mut v = vec![0u8; len];
        // SAFETY: `p` points at `len` bytes of our mapped region.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        Ok(v)
    }

    /// Queues a read of `len` bytes at byte `offset` into buffer `slot`
    /// (user data: the slot); sent by the next [`LibblkioQueue::complete`].
    pub fn submit_read(&mut self, slot: usize, offset: u64, len: usize) -> Result<()> {
        self.check_range(offset, len)?;
        let p = self.slot_ptr(slot, len)?;
        self.queue.read(offset, p, len, slot, ReqFlags::empty());
        Ok(())
    }

    /// Queues a write of `len` bytes of buffer `slot` at byte `offset`.
    pub fn submit_write(&mut self, slot: usize, offset: u64, len: usize) -> Result<()> {
        self.check_range(offset, len)?;
        let p = self.slot_ptr(slot, len)?;
        self.queue.write(offset, p, len, slot, ReqFlags::empty());
        Ok(())
    }

    /// Queues a flush (user data `slot`).
    pub fn submit_flush(&mut self, slot: usize) {
        self.queue.flush(slot, ReqFlags::empty());
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.capacity) {
            return Err(LibblkioError::Range(format!(
                "{len} bytes at {offset} past the capacity {}",
                self.capacity
            )));
        }
        Ok(())
    }

    /// Sends what was queued and waits for at least `min` completions;
    /// returns the user data (slot) of each, or the first failure.
    pub fn complete(&mut self, min: usize) -> Result<Vec<usize>> {
        self.complete_within(min, None)?
            .into_iter()
            .map(|(slot, ret)| {
                if ret < 0 {
                    Err(LibblkioError::Request(slot, ret))
                } else {
                    Ok(slot)
                }
            })
            .collect()
    }

    /// Sends what was queued and waits, up to `timeout` when given, for at
    /// least `min` completions; returns each one's user data (slot) and
    /// result (negative: an errno).
    pub fn complete_within(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
    ) -> Result<Vec<(usize, i32)>> {
        let mut done: Vec<MaybeUninit<Completion>> = (0..self.slots.max(min))
            .map(|_| MaybeUninit::uninit())
            .collect();
        let mut left = timeout;
        let n = b(
            "do_io",
            self.queue.do_io(&mut done, min, left.as_mut(), None),
        )?;
        Ok(done[..n]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                (c.user_data, c.ret)
            })
            .collect())
    }

    /// Buffers this queue has (requests it can keep in flight).
    pub fn slots(&self) -> usize {
        self.slots
    }
}
