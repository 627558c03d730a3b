//! The benchmark clients: a lean virtio-blk driver over the test kit's
//! vhost-user frontend (what a guest does: fixed buffers per slot, one kick
//! per batch, interrupts through the call eventfd), and the same access
//! pattern issued directly on the host with io_uring.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_tests::blk::{
    BlkDriver, BlkError, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, header,
};
use bulkhead_tests::frontend::{DirtyLog, FrontendError, Options};
use bulkhead_tests::memory::GuestMemory;
use bulkhead_tests::virtq::{Buf, Desc, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VirtQueue};
use io_uring::{IoUring, opcode, types};
use vm_memory::MmapRegion;

use super::workload::{Offsets, Sample, Spec};

/// Error type of the benchmark.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// Result type of the benchmark.
pub type Result<T> = std::result::Result<T, Error>;

/// Largest request of any pattern.
pub const MAX_BLOCK: u32 = 128 * 1024;
/// A run fails when no completion arrives for this long.
const STALL: Duration = Duration::from_secs(10);

/// How the client lays its requests on the rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// Split rings; each slot's three descriptors are written once, at
    /// connect, and a request only publishes its head: the least client
    /// work per request (the blk suite's client).
    SplitFixed,
    /// Split rings; each request's chain is written when it is submitted,
    /// as a guest's driver does (the packed suite's split side).
    Split,
    /// Packed rings; each request's chain is written when it is submitted
    /// (a packed ring has no descriptor table to fill in advance).
    Packed,
}

/// One request slot of a queue: its guest buffers, fixed for the whole
/// benchmark, and with [`Ring::SplitFixed`] its descriptors.
struct Slot {
    head: u16,
    data_desc: u16,
    status_desc: u16,
    hdr: u64,
    data: u64,
    status: u64,
    issued: Instant,
}

/// A virtio-blk client of a vhost-user backend.
pub struct VuClient {
    driver: BlkDriver,
    ring: Ring,
    slots: Vec<Vec<Slot>>,
    /// The dirty log while logging is on ([`VuClient::set_dirty_log`]).
    log: Option<DirtyLog>,
}

impl VuClient {
    /// Turns the backend's dirty-page logging on (a fresh log, SET_LOG_BASE,
    /// `VHOST_F_LOG_ALL`, rings with their log address: what QEMU does when
    /// a live migration starts) or off again, queues running.
    pub fn set_dirty_log(&mut self, on: bool) -> Result<()> {
        if on {
            self.log = Some(self.driver.dev.start_dirty_log()?);
        } else {
            self.driver.dev.stop_dirty_log()?;
            self.log = None;
        }
        Ok(())
    }

    /// Pages the backend marked in the current log (0 when logging is off).
    pub fn dirty_pages(&self) -> usize {
        self.log.as_ref().map_or(0, |l| l.pages().len())
    }

    /// Connects to `socket` with `queues` queues and room for `max_qd`
    /// requests on each; `ring` says how requests go on the rings (a
    /// backend that refuses packed rings fails [`Ring::Packed`]).
    pub fn connect(socket: &Path, queues: usize, max_qd: usize, ring: Ring) -> Result<Self> {
        let queue_size = ((3 * max_qd) as u16).next_power_of_two().max(128);
        let per_slot = u64::from(MAX_BLOCK) + 3 * 4096;
        let mem_size = (queues * max_qd) as u64 * per_slot + (16 << 20);
        let opts = Options {
            mem_size: mem_size.next_multiple_of(1 << 20),
            ..Options::default()
        }
        .queues(queues)
        .queue_size(queue_size)
        .packed(ring == Ring::Packed)
        // Acked when offered; nothing is logged until `set_dirty_log`.
        .dirty_log();
        // The daemon creates its socket before it listens: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut driver = loop {
            match BlkDriver::connect(socket, &opts) {
                Ok(d) => break d,
                Err(BlkError::Frontend(FrontendError::Vhost("connect", _)))
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut slots = Vec::with_capacity(queues);
        for q in 0..queues {
            let vq = driver.queue(q)?;
            if vq.is_packed() != (ring == Ring::Packed) {
                return Err(format!(
                    "asked for {ring:?} rings, the backend negotiated {}",
                    if vq.is_packed() { "packed" } else { "split" }
                )
                .into());
            }
            let mem = vq.mem().clone();
            let mut qs = Vec::with_capacity(max_qd);
            for _ in 0..max_qd {
                let hdr = mem.alloc(16, 16)?;
                let data = mem.alloc(u64::from(MAX_BLOCK), 4096)?;
                let status = mem.alloc(1, 16)?;
                if ring != Ring::SplitFixed {
                    qs.push(Slot {
                        head: 0,
                        data_desc: 0,
                        status_desc: 0,
                        hdr,
                        data,
                        status,
                        issued: Instant::now(),
                    });
                    continue;
                }
                let (Some(head), Some(data_desc), Some(status_desc)) =
                    (vq.reserve_desc(), vq.reserve_desc(), vq.reserve_desc())
                else {
                    return Err("queue too small for the queue depth".into());
                };
                vq.write_desc(
                    head,
                    Desc {
                        addr: hdr,
                        len: 16,
                        flags: VIRTQ_DESC_F_NEXT,
                        next: data_desc,
                    },
                )?;
                vq.write_desc(
                    status_desc,
                    Desc {
                        addr: status,
                        len: 1,
                        flags: VIRTQ_DESC_F_WRITE,
                        next: 0,
                    },
                )?;
                qs.push(Slot {
                    head,
                    data_desc,
                    status_desc,
                    hdr,
                    data,
                    status,
                    issued: Instant::now(),
                });
            }
            slots.push(qs);
        }
        Ok(VuClient {
            driver,
            ring,
            slots,
            log: None,
        })
    }

    /// Runs `spec` on every queue at once (one thread per queue, like one vCPU per queue).
    pub fn run(&mut self, spec: &Spec) -> Result<Sample> {
        let queues = self.slots.len();
        let ring = self.ring;
        let parts = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .driver
                .dev
                .queues
                .iter_mut()
                .zip(self.slots.iter_mut())
                .enumerate()
                .map(|(q, (vq, slots))| {
                    s.spawn(move || run_vu_queue(vq, slots, ring, spec, q, queues))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("queue thread panicked".into()))
                })
                .collect::<Result<Vec<Sample>>>()
        })?;
        Ok(Sample::merge(parts))
    }
}

/// Submits slot `i` as a `kind` request at `offset` of `len` bytes; with
/// per-request chains, records which slot the chain's head (split) or
/// buffer id (packed) belongs to in `by_head`.
#[allow(clippy::too_many_arguments)]
fn submit(
    vq: &mut VirtQueue,
    mem: &GuestMemory,
    ring: Ring,
    slots: &mut [Slot],
    by_head: &mut [usize],
    i: usize,
    kind: u32,
    offset: u64,
    len: u32,
) -> Result<()> {
    let s = &mut slots[i];
    mem.write(s.hdr, &header(kind, offset / 512))?;
    mem.write(s.status, &[0xff])?;
    s.issued = Instant::now();
    if ring == Ring::SplitFixed {
        vq.publish(s.head)?;
        return Ok(());
    }
    let data = if kind == VIRTIO_BLK_T_OUT {
        Buf::readable(s.data, len)
    } else {
        Buf::writable(s.data, len)
    };
    let head = vq.add_chain(&[Buf::readable(s.hdr, 16), data, Buf::writable(s.status, 1)])?;
    *by_head
        .get_mut(usize::from(head))
        .ok_or("chain head beyond the ring")? = i;
    vq.publish(head)?;
    Ok(())
}

fn run_vu_queue(
    vq: &mut VirtQueue,
    slots: &mut [Slot],
    ring: Ring,
    spec: &Spec,
    q: usize,
    queues: usize,
) -> Result<Sample> {
    let mem: Arc<GuestMemory> = vq.mem().clone();
    let bs = spec.pattern.block_size();
    let write = spec.pattern.is_write();
    let kind = if write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let qd = spec.qd.min(slots.len()).max(1);
    let slots = &mut slots[..qd];
    let mut by_head = vec![usize::MAX; usize::from(vq.size())];
    for (i, s) in slots
        .iter()
        .enumerate()
        .filter(|_| ring == Ring::SplitFixed)
    {
        by_head[usize::from(s.head)] = i;
        let flags = VIRTQ_DESC_F_NEXT | if write { 0 } else { VIRTQ_DESC_F_WRITE };
        vq.write_desc(
            s.data_desc,
            Desc {
                addr: s.data,
                len: bs,
                flags,
                next: s.status_desc,
            },
        )?;
    }
    let mut offsets = Offsets::new(spec, q, queues);
    let mut sample = Sample {
        lat_ns: Vec::with_capacity(1 << 16),
        ..Sample::default()
    };
    let start = Instant::now();
    let deadline = start + spec.duration;
    for i in 0..qd {
        let at = offsets.next_offset();
        submit(vq, &mem, ring, slots, &mut by_head, i, kind, at, bs)?;
    }
    vq.kick_if_needed()?;
    let mut outstanding = qd;
    let mut last_progress = Instant::now();
    while outstanding > 0 {
        let mut resubmitted = false;
        let mut got = false;
        while let Some(e) = vq.pop_used()? {
            got = true;
            let now = Instant::now();
            let i = by_head
                .get(e.id as usize)
                .copied()
                .filter(|&i| i != usize::MAX)
                .ok_or_else(|| format!("completion for unknown head {}", e.id))?;
            let s = &slots[i];
            let status: u8 = mem.read_obj(s.status)?;
            if status != VIRTIO_BLK_S_OK {
                sample.errors += 1;
            }
            if now <= deadline {
                sample.ops += 1;
                let ns = now.duration_since(s.issued).as_nanos();
                sample.lat_ns.push(u32::try_from(ns).unwrap_or(u32::MAX));
                let at = offsets.next_offset();
                submit(vq, &mem, ring, slots, &mut by_head, i, kind, at, bs)?;
                resubmitted = true;
            } else {
                outstanding -= 1;
            }
        }
        if resubmitted {
            vq.kick_if_needed()?;
        }
        if got {
            last_progress = Instant::now();
            continue;
        }
        if vq.arm_call()? {
            continue;
        }
        if !vq.wait_call(Duration::from_millis(500))? && last_progress.elapsed() > STALL {
            return Err(format!("queue {q}: no completion for {STALL:?}").into());
        }
    }
    sample.secs = spec.duration.as_secs_f64();
    sample.bytes = sample.ops * u64::from(bs);
    Ok(sample)
}

/// The same access pattern issued on the image directly, one io_uring per queue thread.
pub struct HostClient {
    file: Arc<File>,
    queues: Vec<(IoUring, MmapRegion)>,
}

impl HostClient {
    /// Opens `image` read-write, buffered (the daemons' cache mode), with `queues` rings of `max_qd`.
    pub fn open(image: &Path, queues: usize, max_qd: usize) -> Result<Self> {
        let file = Arc::new(OpenOptions::new().read(true).write(true).open(image)?);
        let mut qs = Vec::with_capacity(queues);
        for _ in 0..queues {
            let ring = IoUring::new((max_qd as u32).next_power_of_two().max(2))?;
            let bufs = MmapRegion::new(max_qd * MAX_BLOCK as usize)
                .map_err(|e| format!("buffer mapping: {e}"))?;
            qs.push((ring, bufs));
        }
        Ok(HostClient { file, queues: qs })
    }

    /// Runs `spec` on every ring at once.
    pub fn run(&mut self, spec: &Spec) -> Result<Sample> {
        let queues = self.queues.len();
        let fd = self.file.as_raw_fd();
        let parts = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .queues
                .iter_mut()
                .enumerate()
                .map(|(q, (ring, bufs))| {
                    s.spawn(move || run_host_queue(ring, bufs, fd, spec, q, queues))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("ring thread panicked".into()))
                })
                .collect::<Result<Vec<Sample>>>()
        })?;
        Ok(Sample::merge(parts))
    }
}

fn run_host_queue(
    ring: &mut IoUring,
    bufs: &MmapRegion,
    fd: i32,
    spec: &Spec,
    q: usize,
    queues: usize,
) -> Result<Sample> {
    let bs = spec.pattern.block_size();
    let write = spec.pattern.is_write();
    let qd = spec.qd.clamp(1, bufs.size() / MAX_BLOCK as usize);
    let mut offsets = Offsets::new(spec, q, queues);
    let mut issued = vec![Instant::now(); qd];
    let mut sample = Sample {
        lat_ns: Vec::with_capacity(1 << 16),
        ..Sample::default()
    };
    let push =
        |ring: &mut IoUring, issued: &mut [Instant], slot: usize, offset: u64| -> Result<()> {
            // In range: slot < qd <= bufs.size() / MAX_BLOCK.
            let ptr = bufs.as_ptr().wrapping_add(slot * MAX_BLOCK as usize);
            let sqe = if write {
                opcode::Write::new(types::Fd(fd), ptr, bs)
                    .offset(offset)
                    .build()
            } else {
                opcode::Read::new(types::Fd(fd), ptr, bs)
                    .offset(offset)
                    .build()
            }
            .user_data(slot as u64);
            issued[slot] = Instant::now();
            // SAFETY: the buffer lives in `bufs`, mapped until this function
            // returns, and every submitted entry is reaped before it returns.
            unsafe { ring.submission().push(&sqe) }.map_err(|_| "submission queue full")?;
            Ok(())
        };
    let start = Instant::now();
    let deadline = start + spec.duration;
    for slot in 0..qd {
        push(ring, &mut issued, slot, offsets.next_offset())?;
    }
    let mut outstanding = qd;
    let mut done = Vec::with_capacity(qd);
    while outstanding > 0 {
        ring.submit_and_wait(1)?;
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        let now = Instant::now();
        for &(slot, res) in &done {
            if res != bs as i32 {
                sample.errors += 1;
            }
            if now <= deadline {
                sample.ops += 1;
                let ns = now.duration_since(issued[slot]).as_nanos();
                sample.lat_ns.push(u32::try_from(ns).unwrap_or(u32::MAX));
                push(ring, &mut issued, slot, offsets.next_offset())?;
            } else {
                outstanding -= 1;
            }
        }
    }
    sample.secs = spec.duration.as_secs_f64();
    sample.bytes = sample.ops * u64::from(bs);
    Ok(sample)
}
