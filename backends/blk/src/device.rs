//! The virtio-blk device: features, config space, and the per-queue worker
//! that turns requests into engine operations.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bulkhead_common::spec::VIRTIO_F_VERSION_1;
use bulkhead_common::spec::blk::{
    VIRTIO_BLK_CONFIG_WCE_OFFSET, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VirtioBlkConfig,
};
use bulkhead_common::spec::ring::{
    VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use bulkhead_common::state::{
    DeviceType, StateError, StateSection, StateSink, load_features, virtio_features,
};
use bulkhead_common::stats::Stats;
use bulkhead_common::throttle::{Cost, Direction, Hold, Throttle};
use bulkhead_common::{
    DescriptorChain, Polled, QueueWorker, VhostUserDevice, VirtQueue, WorkerCtl, guest_error,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::disk::{Disk, Source};
use crate::engine::{self, Completion, Engine, EngineKind, Op};
use crate::request::{ID_BYTES, MAX_SEGMENTS, ParseError, Request, RequestKind, SECTOR_SIZE};
use crate::state::BlkState;

/// Largest data segment the guest may use.
pub const SIZE_MAX: u32 = 1 << 20;
/// The ring size `seg_max` is made for (see `BlkDevice::seg_max`).
pub const SEG_MAX_RING: u16 = 128;
/// Most operations one queue's engine holds in flight. An io_uring ring of
/// 4096 entries (and its 8192 completions) is about 400 KiB of locked
/// memory; a bigger ring buys nothing a disk image could use.
pub const MAX_ENGINE_DEPTH: usize = 4096;
/// Most sectors in one discard / write-zeroes segment.
const MAX_ZERO_SECTORS: u32 = u32::MAX / 512 / 8 * 8;

/// Daemon settings for the device.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// Refuse writes, discards and write-zeroes; offer VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// Number of queues.
    pub num_queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// GET_ID string (at most 20 bytes).
    pub serial: Option<String>,
    /// I/O engine.
    pub engine: EngineKind,
}

/// Counters shared by every queue.
#[derive(Default, Debug)]
pub struct BlkStats {
    /// Requests completed with OK.
    pub ok: AtomicU64,
    /// Requests completed with IOERR.
    pub ioerr: AtomicU64,
    /// Requests completed with UNSUPP.
    pub unsupp: AtomicU64,
    /// Chains that were not block requests (guest errors).
    pub malformed: AtomicU64,
}

impl BlkStats {
    /// Every counter, for the log line and the stats socket.
    pub fn snapshot(&self) -> Stats {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = Stats::new();
        s.counter("ok", "Requests completed with OK.", c(&self.ok))
            .counter("ioerr", "Requests completed with IOERR.", c(&self.ioerr))
            .counter(
                "unsupported",
                "Requests completed with UNSUPP.",
                c(&self.unsupp),
            )
            .counter(
                "malformed",
                "Chains that were not block requests (guest errors).",
                c(&self.malformed),
            );
        s
    }

    /// All counters as `name=value` pairs on one line.
    pub fn line(&self) -> String {
        self.snapshot().line()
    }
}

/// The block device served by the daemon.
pub struct BlkDevice {
    disk: Disk,
    cfg: BlkConfig,
    /// Writeback cache on (guest-writable through CONFIG_WCE).
    writeback: Arc<AtomicBool>,
    /// Virtio features the driver acked (for state blobs).
    acked: AtomicU64,
    /// Where the state goes after the driver changes it (the inflight area).
    sink: StateSink,
    /// Counters.
    pub stats: Arc<BlkStats>,
    /// I/O limits shared by every queue (`--iops-total` ...).
    throttle: Arc<Throttle>,
}

impl BlkDevice {
    /// A device over `disk`.
    pub fn new(disk: Disk, cfg: BlkConfig) -> Self {
        BlkDevice {
            disk,
            cfg,
            writeback: Arc::new(AtomicBool::new(true)),
            acked: AtomicU64::new(0),
            sink: StateSink::default(),
            stats: Arc::new(BlkStats::default()),
            throttle: Arc::new(Throttle::unlimited()),
        }
    }

    /// The device with its queues held to `throttle`'s limits.
    pub fn with_throttle(mut self, throttle: Arc<Throttle>) -> Self {
        self.throttle = throttle;
        self
    }

    /// The throttle every queue shares: [`Throttle::set_limits`] changes
    /// the limits of a running device.
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    fn state(&self) -> BlkState {
        BlkState {
            features: virtio_features(self.acked.load(Ordering::Acquire)),
            writeback: self.writeback.load(Ordering::Relaxed),
        }
    }

    /// `seg_max`: what QEMU's vhost-user-blk-pci offers (its default ring is
    /// 128 entries: a request of header, 126 segments and status fills it).
    /// Fixed, not derived from `--queue-size`: a driver picks its ring size
    /// after reading the config (Linux and QEMU 128, libblkio 256), and a
    /// request must fit the ring it picked when it has no indirect
    /// descriptors. Smaller with a smaller `--queue-size`.
    fn seg_max(&self) -> u32 {
        // Header and status take two descriptors of the chain.
        u32::from(self.cfg.queue_size.min(SEG_MAX_RING))
            .saturating_sub(2)
            .max(1)
    }

    fn geometry(&self) -> crate::request::Geometry {
        crate::request::Geometry {
            capacity: self.disk.capacity,
            readonly: self.cfg.readonly,
            max_zero_sectors: MAX_ZERO_SECTORS,
        }
    }
}

impl VhostUserDevice for BlkDevice {
    type Worker = BlkWorker;
    type State = BlkState;

    fn stats(&self) -> Stats {
        let mut stats = self.stats.snapshot();
        self.throttle.add_to(&mut stats);
        stats
    }

    fn limits_control(&self) -> Option<bulkhead_common::stats_socket::LimitsControl> {
        Some((
            self.throttle.clone(),
            &bulkhead_common::throttle::BLK_LIMIT_NAMES,
        ))
    }

    fn device_type(&self) -> DeviceType {
        DeviceType::Blk
    }

    fn save_state(&self) -> Vec<u8> {
        self.state().encode()
    }

    fn parse_state(&self, payload: &[u8], acked: Option<u64>) -> Result<BlkState, StateError> {
        BlkState::parse(payload, load_features(payload, acked, self.features())?)
    }

    fn apply_state(&self, state: BlkState) {
        self.writeback.store(state.writeback, Ordering::Relaxed);
    }

    fn keeps_state(&self) -> bool {
        true
    }

    fn set_state_section(&self, section: Option<Arc<StateSection>>) {
        self.sink.attach(section);
    }

    fn set_features(&self, features: u64) -> io::Result<()> {
        self.acked.store(features, Ordering::Release);
        Ok(())
    }

    fn num_queues(&self) -> u16 {
        self.cfg.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_TOPOLOGY
            | VIRTIO_BLK_F_CONFIG_WCE
            | VIRTIO_BLK_F_MQ
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_F_RING_PACKED
            | VIRTIO_F_VERSION_1;
        if self.cfg.readonly {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        let lbs = self.disk.logical_block_size;
        let phys_exp = (self.disk.physical_block_size / lbs)
            .max(1)
            .trailing_zeros() as u8;
        VirtioBlkConfig {
            capacity: (self.disk.capacity / SECTOR_SIZE).into(),
            size_max: SIZE_MAX.into(),
            seg_max: self.seg_max().into(),
            blk_size: lbs.into(),
            physical_block_exp: phys_exp,
            min_io_size: 1.into(), // in logical blocks
            wce: u8::from(self.writeback.load(Ordering::Relaxed)),
            num_queues: self.cfg.num_queues.into(),
            max_discard_sectors: MAX_ZERO_SECTORS.into(),
            max_discard_seg: MAX_SEGMENTS.into(),
            discard_sector_alignment: (4096 / SECTOR_SIZE as u32).into(),
            max_write_zeroes_sectors: MAX_ZERO_SECTORS.into(),
            max_write_zeroes_seg: MAX_SEGMENTS.into(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
        .as_slice()
        .to_vec()
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()> {
        if offset == VIRTIO_BLK_CONFIG_WCE_OFFSET && data.len() == 1 {
            self.writeback.store(data[0] != 0, Ordering::Relaxed);
            // Before the frontend answers: a successor after a crash keeps it.
            self.sink.persist(DeviceType::Blk, || self.state().encode());
            bulkhead_common::rate_limited!(
                log::Level::Info,
                "guest set the write cache to {}",
                if data[0] != 0 {
                    "writeback"
                } else {
                    "writethrough"
                }
            );
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "config write at {offset} ({} bytes): only wce is writable",
                data.len()
            ),
        ))
    }

    fn max_chain_descriptors(&self) -> u16 {
        // seg_max data segments, the header and the status byte.
        u16::try_from(self.seg_max().saturating_add(2)).unwrap_or(u16::MAX)
    }

    fn max_chain_bytes(&self) -> u64 {
        u64::from(self.seg_max()) * u64::from(SIZE_MAX) + 4096
    }

    fn activate(&self) -> io::Result<()> {
        self.disk
            .activate()
            .map_err(|e| io::Error::other(bulkhead_common::cli::error_chain(&e)))
    }

    fn deactivate(&self) {
        self.disk.deactivate();
    }

    fn reset(&self) {
        self.writeback.store(true, Ordering::Relaxed);
        self.acked.store(0, Ordering::Release);
    }

    fn create_worker(&self, index: u16, size: u16, _features: u64) -> io::Result<BlkWorker> {
        // Room for the whole ring the frontend set up plus one discard's
        // segments, within MAX_ENGINE_DEPTH (a full engine only makes the
        // queue wait for completions).
        let depth = (usize::from(size) + MAX_SEGMENTS as usize).min(MAX_ENGINE_DEPTH);
        let file = match &self.disk.source {
            Source::File(file) => file.clone(),
            #[cfg(feature = "rbd")]
            Source::Rbd(image) => {
                return Ok(self.worker(engine::new_rbd_engine(image.clone(), depth)?));
            }
        };
        let bdev = self.disk.is_block_device;
        let engine = match engine::new_engine(self.cfg.engine, file.clone(), depth, bdev) {
            Ok(e) => e,
            // An io_uring ring is locked memory, counted against the
            // user's RLIMIT_MEMLOCK (a ring of a closed connection is freed
            // a little later): where it does not fit, the queue still runs.
            Err(e) if self.cfg.engine == EngineKind::IoUring => {
                bulkhead_common::rate_limited!(
                    log::Level::Warn,
                    "queue {index}: no io_uring ring of {depth} entries ({e}); \
                     using the sync engine for this queue"
                );
                engine::new_engine(EngineKind::Sync, file, depth, bdev)?
            }
            Err(e) => return Err(e),
        };
        bulkhead_common::rate_limited!(
            log::Level::Debug,
            "queue {index}: {} engine, depth {depth}",
            self.cfg.engine
        );
        Ok(self.worker(engine))
    }
}

impl BlkDevice {
    fn worker(&self, engine: Box<dyn Engine>) -> BlkWorker {
        BlkWorker {
            engine,
            geometry: self.geometry(),
            serial: self.cfg.serial.clone().unwrap_or_default().into_bytes(),
            writeback: self.writeback.clone(),
            stats: self.stats.clone(),
            slots: Vec::new(),
            free: Vec::new(),
            completions: Vec::new(),
            stalled: false,
            throttle: self.throttle.clone(),
            held: None,
        }
    }
}

/// A request whose operations are in the engine.
struct InFlight {
    chain: DescriptorChain,
    status_addr: GuestAddress,
    used_len: u32,
    pending: u32,
    status: u8,
}

/// Runs one queue: parses requests, submits them, completes them.
pub struct BlkWorker {
    engine: Box<dyn Engine>,
    geometry: crate::request::Geometry,
    serial: Vec<u8>,
    writeback: Arc<AtomicBool>,
    stats: Arc<BlkStats>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    completions: Vec<Completion>,
    /// Stopped taking requests because the engine is full.
    stalled: bool,
    /// The device's I/O limits.
    throttle: Arc<Throttle>,
    /// The request the throttle holds back: the queue takes nothing else off
    /// its ring until it has gone (its room in the engine is kept for it).
    held: Option<Hold<(DescriptorChain, Request)>>,
}

/// What a request costs against the throttle: reads and writes their
/// bytes, write-zeroes the bytes it zeroes, flush and discard one write
/// operation each; GET_ID and requests that fail at once cost nothing (they
/// touch no disk).
fn cost(kind: &RequestKind) -> Option<Cost> {
    let write = |bytes| {
        Some(Cost {
            dir: Direction::Write,
            bytes,
        })
    };
    match kind {
        RequestKind::Read(r) => Some(Cost {
            dir: Direction::Read,
            bytes: r.len,
        }),
        RequestKind::Write(r) => write(r.len),
        RequestKind::WriteZeroes(rs) => {
            write(rs.iter().fold(0u64, |n, (r, _)| n.saturating_add(r.len)))
        }
        RequestKind::Flush | RequestKind::Discard(_) => write(0),
        RequestKind::GetId | RequestKind::Fail(_) => None,
    }
}

impl BlkWorker {
    fn finish(
        &mut self,
        vq: &mut VirtQueue,
        chain: &DescriptorChain,
        addr: GuestAddress,
        status: u8,
        used_len: u32,
    ) {
        let counter = match status {
            VIRTIO_BLK_S_OK => &self.stats.ok,
            VIRTIO_BLK_S_IOERR => &self.stats.ioerr,
            _ => &self.stats.unsupp,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let _ = chain.memory().write_obj(status, addr);
        // Live migration: the pages written are logged before the used
        // entry (a no-op unless the frontend is logging). The status byte
        // ends the chain; a failed read may have written part of the data.
        vq.log_write(addr, 1);
        if status == VIRTIO_BLK_S_IOERR {
            vq.log_chain(chain, u64::MAX);
        }
        vq.complete_chain(chain, used_len);
    }

    fn slot(&mut self, f: InFlight) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(f);
                i
            }
            None => {
                self.slots.push(Some(f));
                self.slots.len() - 1
            }
        }
    }

    /// Parses one request and starts it, unless the throttle holds it
    /// back: then it becomes the held request, the thread is asked to wake
    /// when it may go, and false says to take nothing more off the ring.
    fn take(&mut self, vq: &mut VirtQueue, chain: DescriptorChain, ctl: &WorkerCtl) -> bool {
        let Some(req) = self.parse(vq, chain) else {
            return true;
        };
        if self.throttle.enabled()
            && let Some(cost) = cost(&req.1.kind)
        {
            match self.throttle.admit(req, cost) {
                Ok((chain, req)) => self.start(vq, chain, req),
                Err(hold) => {
                    ctl.wake_after(hold.sleep());
                    self.held = Some(hold);
                    return false;
                }
            }
        } else {
            self.start(vq, req.0, req.1);
        }
        true
    }

    /// Tries the held request again; true when the queue may take more.
    fn retry_held(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) -> bool {
        let Some(hold) = self.held.take() else {
            return true;
        };
        match self.throttle.retry(hold) {
            Ok((chain, req)) => {
                // Went before the timer (a kick, a completion): the thread
                // may busy-poll again.
                ctl.cancel_wake();
                self.start(vq, chain, req);
                true
            }
            Err(hold) => {
                ctl.wake_after(hold.sleep());
                self.held = Some(hold);
                false
            }
        }
    }

    /// Parses a chain; a chain that is no request is completed here.
    fn parse(
        &mut self,
        vq: &mut VirtQueue,
        chain: DescriptorChain,
    ) -> Option<(DescriptorChain, Request)> {
        match Request::parse(&chain, &self.geometry) {
            Ok(r) => Some((chain, r)),
            Err(e) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                guest_error!("queue {}: head {}: {e}", vq.index(), chain.head());
                match e {
                    // The driver can still be told: fail it with IOERR.
                    ParseError::NoHeader(status) => {
                        let _ = chain.memory().write_obj(VIRTIO_BLK_S_IOERR, status);
                        vq.log_write(status, 1);
                        vq.complete(chain.head(), 1);
                    }
                    // Nowhere to put a status: return the buffers untouched.
                    ParseError::NoStatus => vq.complete(chain.head(), 0),
                }
                None
            }
        }
    }

    /// Starts one parsed request; completes it at once when no I/O is needed.
    fn start(&mut self, vq: &mut VirtQueue, chain: DescriptorChain, req: Request) {
        let fua = !self.writeback.load(Ordering::Relaxed);
        let ops = match self.ops(&chain, &req.kind, fua) {
            Ok(Some(ops)) => ops,
            Ok(None) => {
                // Completed without I/O: GET_ID or a failure status.
                let (status, len) = match &req.kind {
                    RequestKind::Fail(s) => (*s, 1),
                    _ => (VIRTIO_BLK_S_OK, self.write_id(&chain).saturating_add(1)),
                };
                self.finish(vq, &chain, req.status, status, len);
                return;
            }
            Err(e) => {
                guest_error!("queue {}: head {}: {e}", vq.index(), chain.head());
                self.finish(vq, &chain, req.status, VIRTIO_BLK_S_IOERR, 1);
                return;
            }
        };
        let used_len = match req.kind {
            RequestKind::Read(r) => r.len as u32 + 1,
            _ => 1,
        };
        let n = ops.len() as u32;
        let idx = self.slot(InFlight {
            chain,
            status_addr: req.status,
            used_len,
            pending: n,
            status: VIRTIO_BLK_S_OK,
        });
        for op in ops {
            // SAFETY: the iovecs point into guest memory held mapped by the
            // chain's memory snapshot, which stays in `slots[idx]` until every
            // op of the request has completed.
            if let Err(e) = unsafe { self.engine.submit(idx as u64, op) } {
                if engine::is_queue_full(&e) {
                    bulkhead_common::rate_limited!(
                        log::Level::Error,
                        "queue {}: engine full despite the room check",
                        vq.index()
                    );
                } else {
                    bulkhead_common::rate_limited!(
                        log::Level::Error,
                        "queue {}: submit failed: {e}",
                        vq.index()
                    );
                }
                self.op_done(vq, idx, Err(e));
            }
        }
    }

    /// Engine operations for a request; None when it needs none.
    fn ops(
        &self,
        chain: &DescriptorChain,
        kind: &RequestKind,
        fua: bool,
    ) -> io::Result<Option<Vec<Op>>> {
        Ok(Some(match kind {
            RequestKind::Read(r) => {
                let mut w = chain.writer();
                let _status = w.split_tail(1)?;
                vec![Op::Read {
                    offset: r.offset,
                    iovecs: w.iovecs(r.len)?,
                }]
            }
            RequestKind::Write(r) => {
                let mut rd = chain.reader();
                rd.skip(16)?;
                vec![Op::Write {
                    offset: r.offset,
                    iovecs: rd.iovecs(r.len)?,
                    fua,
                }]
            }
            RequestKind::Flush => vec![Op::Flush],
            RequestKind::Discard(rs) => rs
                .iter()
                .map(|r| Op::Discard {
                    offset: r.offset,
                    len: r.len,
                })
                .collect(),
            RequestKind::WriteZeroes(rs) => rs
                .iter()
                .map(|(r, unmap)| Op::WriteZeroes {
                    offset: r.offset,
                    len: r.len,
                    unmap: *unmap,
                })
                .collect(),
            RequestKind::GetId | RequestKind::Fail(_) => return Ok(None),
        }))
    }

    /// Writes the serial (zero-padded to 20 bytes, or as much as fits); returns bytes written.
    fn write_id(&self, chain: &DescriptorChain) -> u32 {
        let mut w = chain.writer();
        if w.split_tail(1).is_err() {
            return 0;
        }
        let mut id = [0u8; ID_BYTES];
        let n = self.serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&self.serial[..n]);
        let len = (w.available() as usize).min(ID_BYTES);
        match w.write_all(&id[..len]) {
            Ok(()) => len as u32,
            Err(_) => 0,
        }
    }

    fn op_done(&mut self, vq: &mut VirtQueue, idx: usize, result: io::Result<u64>) {
        let Some(Some(f)) = self.slots.get_mut(idx) else {
            bulkhead_common::rate_limited!(
                log::Level::Error,
                "completion for unknown request slot {idx}"
            );
            return;
        };
        if let Err(e) = &result {
            if f.status == VIRTIO_BLK_S_OK {
                bulkhead_common::rate_limited!(
                    log::Level::Warn,
                    "queue {}: I/O error: {e}",
                    vq.index()
                );
            }
            f.status = VIRTIO_BLK_S_IOERR;
        }
        f.pending -= 1;
        if f.pending > 0 {
            return;
        }
        if let Some(f) = self.slots[idx].take() {
            self.free.push(idx);
            let used = if f.status == VIRTIO_BLK_S_OK {
                f.used_len
            } else {
                1
            };
            self.finish(vq, &f.chain, f.status_addr, f.status, used);
        }
    }

    fn reap(&mut self, vq: &mut VirtQueue) {
        let mut done = std::mem::take(&mut self.completions);
        if let Err(e) = self.engine.reap(&mut done) {
            bulkhead_common::rate_limited!(
                log::Level::Error,
                "queue {}: reaping completions: {e}",
                vq.index()
            );
        }
        for c in done.drain(..) {
            self.op_done(vq, c.token as usize, c.result);
        }
        self.completions = done;
    }

    /// Takes requests off the ring while the engine has room and the
    /// throttle lets them go.
    fn process(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        if !self.retry_held(vq, ctl) {
            // Still held: notifications stay off (the timer wakes us, not
            // the guest), completions still go back.
            let _ = self.engine.commit();
            self.reap(vq);
            vq.notify();
            return;
        }
        let mut throttled = false;
        loop {
            vq.disable_notifications();
            loop {
                if self.engine.depth() - self.engine.in_flight() < MAX_SEGMENTS as usize {
                    self.stalled = true;
                    break;
                }
                match vq.pop() {
                    Ok(Some(chain)) => {
                        if !self.take(vq, chain, ctl) {
                            throttled = true;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        // The queue is broken; VirtQueue logged why.
                        self.stalled = false;
                        let _ = self.engine.commit();
                        return;
                    }
                }
            }
            if let Err(e) = self.engine.commit() {
                bulkhead_common::rate_limited!(
                    log::Level::Error,
                    "queue {}: submitting I/O: {e}",
                    vq.index()
                );
            }
            if self.stalled || throttled {
                // Resume from the completion handler, which frees room, or
                // from the timer once the held request may go.
                break;
            }
            match vq.enable_notifications() {
                Ok(true) => continue,
                _ => break,
            }
        }
        self.reap(vq);
        vq.notify();
    }
}

/// Most operations in flight in io_uring's worker threads at which a queue
/// thread still busy-polls for their completions.
const POLL_MAX_IN_FLIGHT: usize = 1;

impl QueueWorker for BlkWorker {
    fn busy_polls(&self) -> bool {
        true
    }

    fn fds(&self) -> Vec<RawFd> {
        vec![self.engine.completion_fd()]
    }

    /// Spins only while nothing is in flight: an operation in an io_uring
    /// worker thread needs the CPU more than we do, and its completion
    /// wakes us (polling through queue-depth-32 writes cost 30% of their
    /// IOPS on a 2-CPU machine).
    fn poll(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) -> Polled {
        if self.engine.has_completions() {
            self.on_fd(vq, 0, ctl);
            Polled::Work
        } else if self.held.is_some() {
            // Throttled: the timer wakes the thread.
            Polled::Sleep
        } else if !self.stalled && vq.has_pending() {
            self.process(vq, ctl);
            Polled::Work
        } else if self.engine.in_flight() > POLL_MAX_IN_FLIGHT {
            Polled::Sleep
        } else {
            Polled::Nothing
        }
    }

    fn on_kick(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        self.process(vq, ctl);
    }

    fn on_fd(&mut self, vq: &mut VirtQueue, _index: usize, ctl: &WorkerCtl) {
        self.reap(vq);
        vq.notify();
        if self.stalled {
            self.stalled = false;
            self.process(vq, ctl);
        }
    }

    fn drain(&mut self, vq: &mut VirtQueue) {
        // A held request goes back on the ring, untouched: the next daemon
        // (or this one after a restart) takes it again. If it cannot (it
        // is not the last chain taken), it is started without waiting for
        // the throttle, as the stop must not wait for it.
        if let Some(hold) = self.held.take() {
            let (chain, req) = self.throttle.release(hold);
            if !vq.give_back(&[chain.head()]).is_empty() {
                self.start(vq, chain, req);
            }
        }
        let _ = self.engine.commit();
        while self.engine.in_flight() > 0 {
            let mut done = Vec::new();
            if let Err(e) = self.engine.wait(&mut done) {
                bulkhead_common::rate_limited!(
                    log::Level::Error,
                    "queue {}: waiting for I/O: {e}",
                    vq.index()
                );
                break;
            }
            for c in done {
                self.op_done(vq, c.token as usize, c.result);
            }
        }
        vq.notify();
    }
}
