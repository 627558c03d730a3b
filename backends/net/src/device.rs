//! The virtio-net device: features, config space, and the per-queue workers
//! (receive: tap to guest; transmit: guest to tap; control queue).
//!
//! Queue layout: rx0, tx0, rx1, tx1, ..., then the control queue. Each queue
//! runs in its own thread; the rx and tx workers of a pair share that pair's
//! tap queue.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_common::chain::IoVecBuf;
use bulkhead_common::spec::VIRTIO_F_VERSION_1;
use bulkhead_common::spec::net::{
    VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP, VirtioNetConfig,
};
use bulkhead_common::spec::ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use bulkhead_common::state::{DeviceType, StateError, StateSection, StateSink, virtio_features};
use bulkhead_common::{
    DescriptorChain, Polled, QueueWorker, VhostUserDevice, VirtQueue, WorkerCtl, guest_error,
};
use vm_memory::ByteValued;

use crate::request::{
    CtrlCommand, CtrlFeatures, CtrlRequest, ETH_HLEN, HDR_LEN_LEGACY, HDR_LEN_V1, MAX_FRAME_LEN,
    MacAddr, TxError, TxFrame, TxOffloads,
};
use crate::state::{Limits, NetState};
use crate::tap::{Tap, offload_flags};

/// Receive buffer: the largest packet a tap hands over plus slack.
const RX_BUF_LEN: usize = HDR_LEN_V1 + MAX_FRAME_LEN as usize + 256;
/// Packets a receive worker moves before returning to its event loop.
const RX_BUDGET: u32 = 256;
/// Frames a transmit worker sends before returning to its event loop.
const TX_BUDGET: u32 = 1024;
/// A transmit worker checks every this many frames whether the driver asked
/// for an interrupt (its used event), not only when the ring ran dry: a driver
/// that sleeps until 3/4 of its frames are used (Linux's) then wakes while
/// frames are still queued, and refills the ring before it runs dry.
const TX_NOTIFY_EVERY: u32 = 16;
/// Most iovecs one writev takes.
const IOV_MAX: usize = 1024;
/// Frames up to this many bytes (every frame of a 1500-byte MTU) are copied,
/// behind their header, into one buffer and sent with one plain write: in
/// the kernel a single-segment write is cheaper than a two-segment writev
/// by more than the copy costs (docs/performance.md: `raw-tap-writer`
/// against `raw-tap-writev`).
const COPY_MAX: usize = 2048;

/// Daemon settings for the device.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// MAC address offered in config space (VIRTIO_NET_F_MAC).
    pub mac: Option<MacAddr>,
    /// MTU offered in config space (VIRTIO_NET_F_MTU).
    pub mtu: Option<u16>,
    /// Number of queue pairs (= tap queues).
    pub queue_pairs: u16,
    /// Largest queue size.
    pub queue_size: u16,
}

/// Counters shared by every queue, logged on disconnect, on exit and on SIGUSR1.
#[derive(Default, Debug)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frame bytes delivered to the guest (without vnet headers).
    pub rx_bytes: AtomicU64,
    /// Frames dropped by the guest's receive filter (CTRL_RX).
    pub rx_filtered: AtomicU64,
    /// Frames larger than a receive buffer without MRG_RXBUF, dropped.
    pub rx_too_big: AtomicU64,
    /// Receive chains too small for a header, returned unused (guest errors).
    pub rx_bad_buffers: AtomicU64,
    /// Times the tap stopped being read because the guest had no buffers.
    pub rx_stalls: AtomicU64,
    /// Tap read errors and runt packets.
    pub rx_errors: AtomicU64,
    /// Frames written to the tap.
    pub tx_frames: AtomicU64,
    /// Frame bytes written to the tap (without vnet headers).
    pub tx_bytes: AtomicU64,
    /// Chains too short for the header and an Ethernet header, dropped.
    pub tx_too_short: AtomicU64,
    /// Frames over 64 KiB, dropped.
    pub tx_too_big: AtomicU64,
    /// Headers with bad flags or checksum fields, dropped.
    pub tx_bad_header: AtomicU64,
    /// Headers with a bad GSO type or GSO fields, dropped.
    pub tx_bad_gso: AtomicU64,
    /// Times the tap was full (EAGAIN); the frame was kept and retried.
    pub tx_eagain: AtomicU64,
    /// Tap write errors (frame dropped).
    pub tx_errors: AtomicU64,
    /// Control commands applied.
    pub ctrl_ok: AtomicU64,
    /// Control commands with bad lengths or values.
    pub ctrl_malformed: AtomicU64,
    /// Control commands of unknown or unnegotiated class/command.
    pub ctrl_unsupported: AtomicU64,
}

impl NetStats {
    /// All counters as `name=value` pairs on one line.
    pub fn line(&self) -> String {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let fields = [
            ("rx_frames", c(&self.rx_frames)),
            ("rx_bytes", c(&self.rx_bytes)),
            ("rx_filtered", c(&self.rx_filtered)),
            ("rx_too_big", c(&self.rx_too_big)),
            ("rx_bad_buffers", c(&self.rx_bad_buffers)),
            ("rx_stalls", c(&self.rx_stalls)),
            ("rx_errors", c(&self.rx_errors)),
            ("tx_frames", c(&self.tx_frames)),
            ("tx_bytes", c(&self.tx_bytes)),
            ("tx_too_short", c(&self.tx_too_short)),
            ("tx_too_big", c(&self.tx_too_big)),
            ("tx_bad_header", c(&self.tx_bad_header)),
            ("tx_bad_gso", c(&self.tx_bad_gso)),
            ("tx_eagain", c(&self.tx_eagain)),
            ("tx_errors", c(&self.tx_errors)),
            ("ctrl_ok", c(&self.ctrl_ok)),
            ("ctrl_malformed", c(&self.ctrl_malformed)),
            ("ctrl_unsupported", c(&self.ctrl_unsupported)),
        ];
        fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn count_tx_error(&self, e: &TxError) {
        let c = match e {
            TxError::TooShort(_) => &self.tx_too_short,
            TxError::TooBig(_) => &self.tx_too_big,
            TxError::BadFlags(_) | TxError::BadCsum { .. } => &self.tx_bad_header,
            TxError::BadGsoType(_) | TxError::BadGso { .. } => &self.tx_bad_gso,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The receive filter the driver set through CTRL_RX.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFilter {
    /// Accept every frame.
    pub promisc: bool,
    /// Accept every multicast frame.
    pub allmulti: bool,
    /// Extra unicast addresses accepted.
    pub unicast: Vec<MacAddr>,
    /// Multicast addresses accepted.
    pub multicast: Vec<MacAddr>,
}

impl Default for RxFilter {
    fn default() -> Self {
        // Until the driver says otherwise, everything reaches it.
        RxFilter {
            promisc: true,
            allmulti: true,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }
}

impl RxFilter {
    /// Whether a frame for `dst` reaches a device whose address is `own` (None: unknown).
    pub fn accepts(&self, own: Option<MacAddr>, dst: MacAddr) -> bool {
        if self.promisc || dst == MacAddr::BROADCAST {
            return true;
        }
        if dst.is_multicast() {
            return self.allmulti || self.multicast.contains(&dst);
        }
        match own {
            // Without a configured address we cannot tell our frames from others.
            None => true,
            Some(m) => dst == m || self.unicast.contains(&dst),
        }
    }
}

/// One queue pair's tap queue and how many running workers use it.
struct Pair {
    index: u16,
    tap: Tap,
    users: Mutex<u32>,
}

/// A worker's use of a pair: attaches the tap queue while any worker of the pair runs.
struct PairUse(Arc<Pair>);

impl PairUse {
    fn new(pair: Arc<Pair>) -> Self {
        if let Ok(mut n) = pair.users.lock() {
            if *n == 0
                && pair.index > 0
                && let Err(e) = pair.tap.set_queue_attached(true)
            {
                bulkhead_common::rate_limited!(
                    log::Level::Warn,
                    "tap queue {}: attach: {e}",
                    pair.index
                );
            }
            *n += 1;
        }
        PairUse(pair)
    }

    fn tap(&self) -> &Tap {
        &self.0.tap
    }
}

impl Drop for PairUse {
    fn drop(&mut self) {
        let pair = &self.0;
        if let Ok(mut n) = pair.users.lock() {
            *n = n.saturating_sub(1);
            // Queue 0 stays attached: it carries the device-wide settings.
            if *n == 0
                && pair.index > 0
                && let Err(e) = pair.tap.set_queue_attached(false)
            {
                bulkhead_common::rate_limited!(
                    log::Level::Warn,
                    "tap queue {}: detach: {e}",
                    pair.index
                );
            }
        }
    }
}

/// State the device and all its workers share.
struct Shared {
    stats: Arc<NetStats>,
    filter: Mutex<RxFilter>,
    mac: Option<MacAddr>,
    active_pairs: AtomicU16,
    /// Virtio features the driver acked (for state blobs).
    acked: AtomicU64,
    /// Where the state goes after each control command (the inflight area).
    sink: StateSink,
}

impl Shared {
    fn state(&self) -> NetState {
        NetState {
            features: virtio_features(self.acked.load(Ordering::Acquire)),
            filter: self.filter.lock().map(|f| f.clone()).unwrap_or_default(),
            active_pairs: self.active_pairs.load(Ordering::Relaxed),
            mac: self.mac,
        }
    }

    /// Keeps the state in the inflight area; before the command that changed it completes.
    fn persist(&self) {
        self.sink.persist(DeviceType::Net, || self.state().encode());
    }
}

/// The net device served by the daemon.
pub struct NetDevice {
    cfg: NetConfig,
    pairs: Vec<Arc<Pair>>,
    shared: Arc<Shared>,
    /// Counters.
    pub stats: Arc<NetStats>,
}

fn bit(features: u64, mask: u64) -> bool {
    features & mask != 0
}

/// vnet header size for the negotiated features.
pub fn vnet_hdr_len(features: u64) -> usize {
    if bit(features, VIRTIO_F_VERSION_1) || bit(features, VIRTIO_NET_F_MRG_RXBUF) {
        HDR_LEN_V1
    } else {
        HDR_LEN_LEGACY
    }
}

impl NetDevice {
    /// A device over `taps` (one per queue pair); detaches all but the first queue until used.
    pub fn new(cfg: NetConfig, taps: Vec<Tap>) -> io::Result<Self> {
        if taps.is_empty() || taps.len() != usize::from(cfg.queue_pairs) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} tap queue(s) for {} queue pair(s)",
                    taps.len(),
                    cfg.queue_pairs
                ),
            ));
        }
        let pairs: Vec<Arc<Pair>> = taps
            .into_iter()
            .enumerate()
            .map(|(i, tap)| {
                Arc::new(Pair {
                    index: i as u16,
                    tap,
                    users: Mutex::new(0),
                })
            })
            .collect();
        for p in pairs.iter().skip(1) {
            p.tap.set_queue_attached(false)?;
        }
        let stats = Arc::new(NetStats::default());
        let shared = Arc::new(Shared {
            stats: stats.clone(),
            filter: Mutex::new(RxFilter::default()),
            mac: cfg.mac,
            active_pairs: AtomicU16::new(1),
            acked: AtomicU64::new(0),
            sink: StateSink::default(),
        });
        let dev = NetDevice {
            cfg,
            pairs,
            shared,
            stats,
        };
        dev.configure_tap(0)?;
        Ok(dev)
    }

    /// Name of the tap interface.
    pub fn tap_name(&self) -> &str {
        self.pairs.first().map(|p| p.tap.name()).unwrap_or("")
    }

    /// Sets the tap's vnet header size and offloads for `features`.
    fn configure_tap(&self, features: u64) -> io::Result<()> {
        let Some(p) = self.pairs.first() else {
            return Ok(());
        };
        p.tap.set_vnet_hdr_size(vnet_hdr_len(features))?;
        let off = offload_flags(
            bit(features, VIRTIO_NET_F_GUEST_CSUM),
            bit(features, VIRTIO_NET_F_GUEST_TSO4),
            bit(features, VIRTIO_NET_F_GUEST_TSO6),
            bit(features, VIRTIO_NET_F_GUEST_ECN),
            bit(features, VIRTIO_NET_F_GUEST_UFO),
        );
        p.tap.set_offload(off)
    }
}

impl VhostUserDevice for NetDevice {
    type Worker = NetWorker;
    type State = NetState;

    fn stats(&self) -> String {
        self.stats.line()
    }

    fn device_type(&self) -> DeviceType {
        DeviceType::Net
    }

    fn save_state(&self) -> Vec<u8> {
        self.shared.state().encode()
    }

    fn parse_state(&self, payload: &[u8]) -> Result<NetState, StateError> {
        let limits = Limits {
            acked: self.shared.acked.load(Ordering::Acquire),
            queue_pairs: self.cfg.queue_pairs,
            mac: self.cfg.mac,
        };
        NetState::parse(payload, &limits)
    }

    fn apply_state(&self, state: NetState) {
        if let Ok(mut f) = self.shared.filter.lock() {
            *f = state.filter;
        }
        self.shared
            .active_pairs
            .store(state.active_pairs, Ordering::Relaxed);
    }

    fn keeps_state(&self) -> bool {
        true
    }

    fn set_state_section(&self, section: Option<Arc<StateSection>>) {
        self.shared.sink.attach(section);
    }

    fn num_queues(&self) -> u16 {
        2 * self.cfg.queue_pairs + 1
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_GUEST_ECN
            | VIRTIO_NET_F_GUEST_UFO
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_HOST_ECN
            | VIRTIO_NET_F_HOST_UFO
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CTRL_VQ
            | VIRTIO_NET_F_CTRL_RX
            | VIRTIO_NET_F_MQ
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_F_VERSION_1;
        if self.cfg.mac.is_some() {
            f |= VIRTIO_NET_F_MAC;
        }
        if self.cfg.mtu.is_some() {
            f |= VIRTIO_NET_F_MTU;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        VirtioNetConfig {
            mac: self.cfg.mac.unwrap_or_default().0,
            status: VIRTIO_NET_S_LINK_UP.into(),
            max_virtqueue_pairs: self.cfg.queue_pairs.into(),
            mtu: self.cfg.mtu.unwrap_or(0).into(),
        }
        .as_slice()
        .to_vec()
    }

    fn set_features(&self, features: u64) -> io::Result<()> {
        self.shared.acked.store(features, Ordering::Release);
        self.configure_tap(features).inspect_err(|e| {
            bulkhead_common::rate_limited!(
                log::Level::Error,
                "tap {}: cannot apply features {features:#x}: {e}",
                self.tap_name()
            );
        })
    }

    fn max_chain_bytes(&self) -> u64 {
        // Room for an oversized frame to be seen, counted and dropped by the parser.
        4 * MAX_FRAME_LEN
    }

    fn reset(&self) {
        if let Ok(mut f) = self.shared.filter.lock() {
            *f = RxFilter::default();
        }
        self.shared.active_pairs.store(1, Ordering::Relaxed);
        self.shared.acked.store(0, Ordering::Release);
        if let Err(e) = self.configure_tap(0) {
            bulkhead_common::rate_limited!(
                log::Level::Warn,
                "tap {}: reset offloads: {e}",
                self.tap_name()
            );
        }
    }

    fn disconnected(&self) {
        bulkhead_common::rate_limited!(log::Level::Info, "stats: {}", self.stats.line());
    }

    fn create_worker(&self, index: u16, _size: u16, features: u64) -> io::Result<NetWorker> {
        let pairs = self.cfg.queue_pairs;
        let hdr_len = vnet_hdr_len(features);
        if index >= 2 * pairs {
            return Ok(NetWorker::Ctrl(CtrlWorker {
                shared: self.shared.clone(),
                features: CtrlFeatures {
                    rx: bit(features, VIRTIO_NET_F_CTRL_RX),
                    mq: bit(features, VIRTIO_NET_F_MQ),
                    max_pairs: pairs,
                },
            }));
        }
        let pair = self
            .pairs
            .get(usize::from(index / 2))
            .ok_or_else(|| io::Error::other(format!("no tap queue for queue {index}")))?;
        let pair = PairUse::new(pair.clone());
        Ok(if index.is_multiple_of(2) {
            NetWorker::Rx(RxWorker {
                pair,
                hdr_len,
                mergeable: bit(features, VIRTIO_NET_F_MRG_RXBUF),
                guest_csum: bit(features, VIRTIO_NET_F_GUEST_CSUM),
                buf: vec![0; RX_BUF_LEN],
                pending: None,
                spare: VecDeque::new(),
                watching: true,
                shared: self.shared.clone(),
            })
        } else {
            NetWorker::Tx(TxWorker {
                pair,
                hdr_len,
                offloads: TxOffloads {
                    csum: bit(features, VIRTIO_NET_F_CSUM),
                    tso4: bit(features, VIRTIO_NET_F_HOST_TSO4),
                    tso6: bit(features, VIRTIO_NET_F_HOST_TSO6),
                    ecn: bit(features, VIRTIO_NET_F_HOST_ECN),
                    ufo: bit(features, VIRTIO_NET_F_HOST_UFO),
                },
                pending: None,
                started: false,
                scratch: Vec::new(),
                iov: IoVecBuf::default(),
                small: Box::new([0; HDR_LEN_V1 + COPY_MAX]),
                stats: self.stats.clone(),
            })
        })
    }
}

/// The worker of one queue.
pub enum NetWorker {
    /// A receive queue.
    Rx(RxWorker),
    /// A transmit queue.
    Tx(TxWorker),
    /// The control queue.
    Ctrl(CtrlWorker),
}

impl QueueWorker for NetWorker {
    /// Only transmit queues poll: a receive queue's available buffers wait
    /// for frames from the tap, which only its fd announces.
    fn busy_polls(&self) -> bool {
        matches!(self, NetWorker::Tx(_))
    }

    /// A transmit queue waiting for room in the tap sleeps until it is writable.
    fn poll(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) -> Polled {
        match self {
            NetWorker::Tx(w) if w.pending.is_some() => Polled::Sleep,
            NetWorker::Tx(w) if vq.has_pending() => {
                w.process(vq, ctl);
                Polled::Work
            }
            NetWorker::Tx(_) => Polled::Nothing,
            _ => Polled::Sleep,
        }
    }

    fn fds(&self) -> Vec<RawFd> {
        match self {
            NetWorker::Rx(w) => vec![w.pair.tap().raw_fd()],
            NetWorker::Tx(w) => vec![w.pair.tap().raw_fd()],
            NetWorker::Ctrl(_) => Vec::new(),
        }
    }

    fn on_kick(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        match self {
            NetWorker::Rx(w) => w.process(vq, ctl),
            NetWorker::Tx(w) => w.process(vq, ctl),
            NetWorker::Ctrl(w) => w.process(vq),
        }
    }

    fn on_fd(&mut self, vq: &mut VirtQueue, _index: usize, ctl: &WorkerCtl) {
        match self {
            NetWorker::Rx(w) => w.process(vq, ctl),
            NetWorker::Tx(w) => {
                // Writable again (or our own wake-up): stop watching, then send.
                ctl.watch_io(0, false, false);
                w.process(vq, ctl)
            }
            NetWorker::Ctrl(_) => {}
        }
    }

    fn drain(&mut self, vq: &mut VirtQueue) {
        match self {
            NetWorker::Rx(w) => {
                // Receive buffers taken and not used go back on the ring
                // (the next avail index moves back over them), so stops and
                // swaps never eat the guest's buffers; any that cannot are
                // used empty, and the driver reposts them. A packet read from
                // the tap and not yet delivered is lost, as on a wire.
                let heads: Vec<u16> = w.spare.drain(..).map(|c| c.head()).collect();
                for h in vq.give_back(&heads) {
                    vq.complete(h, 0);
                }
            }
            NetWorker::Tx(w) => {
                // The frame the tap refused goes back on the ring too: the
                // next backend sends it.
                if let Some((chain, _)) = w.pending.take()
                    && !vq.give_back(&[chain.head()]).is_empty()
                {
                    w.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                    vq.complete(chain.head(), 0);
                }
            }
            NetWorker::Ctrl(_) => {}
        }
        vq.notify();
    }
}

/// What happened to the packet waiting for the guest.
enum Delivery {
    /// Delivered or dropped: the buffer is free again.
    Done,
    /// The guest has no room: keep it and wait for a kick.
    NoRoom,
}

/// Moves packets from the tap queue into the guest's receive buffers.
pub struct RxWorker {
    pair: PairUse,
    hdr_len: usize,
    mergeable: bool,
    guest_csum: bool,
    buf: Vec<u8>,
    /// Length of the one packet read from the tap and not yet delivered.
    pending: Option<usize>,
    /// Receive chains taken off the ring and not used yet (bounded by the queue size).
    spare: VecDeque<DescriptorChain>,
    watching: bool,
    shared: Arc<Shared>,
}

impl RxWorker {
    fn process(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        vq.disable_notifications();
        let mut budget = RX_BUDGET;
        loop {
            if self.pending.is_some() {
                match self.deliver(vq) {
                    Delivery::Done => self.pending = None,
                    Delivery::NoRoom => match vq.enable_notifications() {
                        Ok(true) => continue,
                        _ => {
                            // Back-pressure: leave packets in the tap until the guest kicks.
                            if self.watching {
                                self.shared.stats.rx_stalls.fetch_add(1, Ordering::Relaxed);
                                ctl.watch(0, false);
                                self.watching = false;
                            }
                            vq.notify();
                            return;
                        }
                    },
                }
            }
            if budget == 0 || vq.is_broken() {
                break;
            }
            budget -= 1;
            match self.pair.tap().read(&mut self.buf) {
                Ok(n) if n < self.hdr_len + ETH_HLEN as usize => {
                    self.shared.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n) => self.pending = Some(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.shared.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                    bulkhead_common::rate_limited!(
                        log::Level::Warn,
                        "tap {}: read: {e}",
                        self.pair.tap().name()
                    );
                    break;
                }
            }
        }
        if !self.watching {
            ctl.watch(0, true);
            self.watching = true;
        }
        vq.notify();
    }

    /// Takes receive chains until `len` bytes fit (one chain without MRG_RXBUF).
    fn gather(&mut self, vq: &mut VirtQueue, len: u64) -> Option<usize> {
        loop {
            let mut room = 0u64;
            for (i, c) in self.spare.iter().enumerate() {
                room = room.saturating_add(c.writable_len());
                if room >= len || !self.mergeable {
                    return Some(i + 1);
                }
            }
            match vq.pop() {
                Ok(Some(c)) if c.writable_len() < self.hdr_len as u64 => {
                    self.shared
                        .stats
                        .rx_bad_buffers
                        .fetch_add(1, Ordering::Relaxed);
                    guest_error!(
                        "queue {}: receive buffer of {} bytes",
                        vq.index(),
                        c.writable_len()
                    );
                    vq.complete(c.head(), 0);
                }
                Ok(Some(c)) => self.spare.push_back(c),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    fn deliver(&mut self, vq: &mut VirtQueue) -> Delivery {
        let Some(len) = self.pending else {
            return Delivery::Done;
        };
        let h = self.hdr_len;
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&self.buf[h..h + 6]);
        let accepted = self
            .shared
            .filter
            .lock()
            .map(|f| f.accepts(self.shared.mac, MacAddr(dst)))
            .unwrap_or(true);
        if !accepted {
            self.shared
                .stats
                .rx_filtered
                .fetch_add(1, Ordering::Relaxed);
            return Delivery::Done;
        }
        let Some(n) = self.gather(vq, len as u64) else {
            if vq.is_broken() {
                return Delivery::Done;
            }
            return Delivery::NoRoom;
        };
        if !self.mergeable && self.spare.front().map(|c| c.writable_len()) < Some(len as u64) {
            // Without MRG_RXBUF a packet must fit one buffer: drop it, keep the buffer.
            self.shared.stats.rx_too_big.fetch_add(1, Ordering::Relaxed);
            return Delivery::Done;
        }
        if !self.guest_csum {
            // The driver cannot take partial checksums; the tap sent none, and
            // DATA_VALID means nothing to it.
            self.buf[0] = 0;
        }
        if h == HDR_LEN_V1 {
            self.buf[10..12].copy_from_slice(&(n as u16).to_le_bytes());
        }
        let mut off = 0usize;
        let mut used = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(c) = self.spare.pop_front() else {
                break;
            };
            let mut w = c.writer();
            let take = (w.available() as usize).min(len - off);
            let written = match w.write_all(&self.buf[off..off + take]) {
                Ok(()) => take,
                Err(_) => 0,
            };
            off += take;
            used.push((c.head(), written as u32));
        }
        for (head, n) in used {
            vq.complete(head, n);
        }
        let s = &self.shared.stats;
        s.rx_frames.fetch_add(1, Ordering::Relaxed);
        s.rx_bytes.fetch_add((len - h) as u64, Ordering::Relaxed);
        Delivery::Done
    }
}

/// Sends the guest's frames to the tap queue.
pub struct TxWorker {
    pair: PairUse,
    hdr_len: usize,
    offloads: TxOffloads,
    /// The frame the tap refused with EAGAIN, sent before anything else.
    pending: Option<(DescriptorChain, TxFrame)>,
    started: bool,
    scratch: Vec<u8>,
    /// The iovecs of the frame being sent, kept between frames.
    iov: IoVecBuf,
    /// Header and bytes of a frame of at most [`COPY_MAX`] bytes.
    small: Box<[u8; HDR_LEN_V1 + COPY_MAX]>,
    stats: Arc<NetStats>,
}

impl TxWorker {
    /// Writes the validated header and the chain's frame bytes to the tap in
    /// one write: small frames copied behind the header, larger ones as a
    /// writev straight from guest memory.
    fn send(&mut self, chain: &DescriptorChain, frame: &TxFrame) -> io::Result<()> {
        let h = &frame.hdr;
        let mut hdr = [0u8; HDR_LEN_V1];
        hdr[0] = h.flags;
        hdr[1] = h.gso_type;
        hdr[2..4].copy_from_slice(&{ h.hdr_len }.to_le_bytes());
        hdr[4..6].copy_from_slice(&{ h.gso_size }.to_le_bytes());
        hdr[6..8].copy_from_slice(&{ h.csum_start }.to_le_bytes());
        hdr[8..10].copy_from_slice(&{ h.csum_offset }.to_le_bytes());
        let mut reader = chain.reader();
        reader.skip(self.hdr_len as u64)?;
        let total = self.hdr_len + frame.len as usize;
        if frame.len as usize <= COPY_MAX {
            let buf = &mut self.small[..total];
            buf[..self.hdr_len].copy_from_slice(&hdr[..self.hdr_len]);
            reader.read_exact(&mut buf[self.hdr_len..])?;
            let n = self.pair.tap().write(buf)?;
            if n != total {
                return Err(io::Error::other(format!("short tap write of {n} bytes")));
            }
            return Ok(());
        }
        let iov = self.iov.start();
        iov.push(libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: self.hdr_len,
        });
        reader.iovecs_into(frame.len, iov)?;
        if iov.len() > IOV_MAX {
            // Too many pieces for one writev: gather them here (at most 64 KiB).
            iov.truncate(1);
            let mut r = chain.reader();
            r.skip(self.hdr_len as u64)?;
            self.scratch.resize(frame.len as usize, 0);
            r.read_exact(&mut self.scratch)?;
            iov.push(libc::iovec {
                iov_base: self.scratch.as_mut_ptr().cast(),
                iov_len: self.scratch.len(),
            });
        }
        // SAFETY: `hdr` and `scratch` live through the call; the other iovecs
        // point into guest memory kept mapped by the chain's memory snapshot.
        let n = unsafe { self.pair.tap().writev(iov) }?;
        if n as u64 != frame.len + self.hdr_len as u64 {
            return Err(io::Error::other(format!("short tap write of {n} bytes")));
        }
        Ok(())
    }

    fn finish(
        &mut self,
        vq: &mut VirtQueue,
        chain: &DescriptorChain,
        frame: &TxFrame,
        r: io::Result<()>,
    ) {
        match r {
            Ok(()) => {
                self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.stats.tx_bytes.fetch_add(frame.len, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                guest_error!("queue {}: tap write: {e}", vq.index());
            }
        }
        vq.complete(chain.head(), 0);
    }

    /// Tries to send one frame; false when the tap is full and the frame was kept.
    fn try_send(&mut self, vq: &mut VirtQueue, chain: DescriptorChain, frame: TxFrame) -> bool {
        match self.send(&chain, &frame) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.stats.tx_eagain.fetch_add(1, Ordering::Relaxed);
                self.pending = Some((chain, frame));
                false
            }
            r => {
                self.finish(vq, &chain, &frame, r);
                true
            }
        }
    }

    fn process(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        if !self.started {
            // The tap fd is registered for EPOLLIN; the rx worker reads it, not us.
            ctl.watch_io(0, false, false);
            self.started = true;
        }
        if let Some((chain, frame)) = self.pending.take()
            && !self.try_send(vq, chain, frame)
        {
            ctl.watch_io(0, false, true);
            vq.notify();
            return;
        }
        let mut budget = TX_BUDGET;
        loop {
            vq.disable_notifications();
            loop {
                if budget == 0 {
                    // Yield to the event loop; the writable tap wakes us at once.
                    ctl.watch_io(0, false, true);
                    vq.notify();
                    return;
                }
                let chain = match vq.pop() {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(_) => {
                        vq.notify();
                        return;
                    }
                };
                budget -= 1;
                match TxFrame::parse(&chain, self.hdr_len, self.offloads) {
                    Err(e) => {
                        self.stats.count_tx_error(&e);
                        guest_error!("queue {}: head {}: {e}", vq.index(), chain.head());
                        vq.complete(chain.head(), 0);
                    }
                    Ok(frame) => {
                        if !self.try_send(vq, chain, frame) {
                            ctl.watch_io(0, false, true);
                            vq.notify();
                            return;
                        }
                    }
                }
                if budget.is_multiple_of(TX_NOTIFY_EVERY) {
                    vq.notify();
                }
            }
            match vq.enable_notifications() {
                Ok(true) => continue,
                _ => break,
            }
        }
        vq.notify();
    }
}

/// Runs the control queue.
pub struct CtrlWorker {
    shared: Arc<Shared>,
    features: CtrlFeatures,
}

impl CtrlWorker {
    fn apply(&self, cmd: CtrlCommand) {
        match cmd {
            CtrlCommand::QueuePairs(n) => {
                self.shared.active_pairs.store(n, Ordering::Relaxed);
                bulkhead_common::rate_limited!(log::Level::Info, "driver uses {n} queue pair(s)");
            }
            cmd => {
                if let Ok(mut f) = self.shared.filter.lock() {
                    match cmd {
                        CtrlCommand::Promisc(on) => f.promisc = on,
                        CtrlCommand::AllMulti(on) => f.allmulti = on,
                        CtrlCommand::MacTable { unicast, multicast } => {
                            f.unicast = unicast;
                            f.multicast = multicast;
                        }
                        CtrlCommand::QueuePairs(_) => {}
                    }
                    bulkhead_common::rate_limited!(log::Level::Debug, "receive filter: {f:?}");
                }
            }
        }
    }

    fn process(&mut self, vq: &mut VirtQueue) {
        loop {
            vq.disable_notifications();
            loop {
                let chain = match vq.pop() {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(_) => return,
                };
                let req = CtrlRequest::parse(&chain, self.features);
                let s = &self.shared.stats;
                let ack = match req.command {
                    Ok(cmd) => {
                        self.apply(cmd);
                        // In the inflight area before the driver sees the ack:
                        // a daemon killed after the ack leaves the new state.
                        self.shared.persist();
                        s.ctrl_ok.fetch_add(1, Ordering::Relaxed);
                        VIRTIO_NET_OK
                    }
                    Err(e) => {
                        let c = if e.is_unsupported() {
                            &s.ctrl_unsupported
                        } else {
                            &s.ctrl_malformed
                        };
                        c.fetch_add(1, Ordering::Relaxed);
                        guest_error!("queue {}: head {}: {e}", vq.index(), chain.head());
                        VIRTIO_NET_ERR
                    }
                };
                let mut used = 0;
                if req.has_ack
                    && let Ok(mut tail) = chain.writer().split_tail(1)
                    && tail.write_obj(ack).is_ok()
                {
                    used = 1;
                }
                vq.complete(chain.head(), used);
            }
            match vq.enable_notifications() {
                Ok(true) => continue,
                _ => break,
            }
        }
        vq.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::memory::GuestMemoryHandle;

    #[test]
    fn filter_follows_promisc_allmulti_and_tables() {
        let own = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let other = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
        let mc = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);
        let mut f = RxFilter::default();
        assert!(f.accepts(Some(own), other));
        f.promisc = false;
        f.allmulti = false;
        assert!(f.accepts(Some(own), own));
        assert!(!f.accepts(Some(own), other));
        assert!(f.accepts(None, other));
        assert!(f.accepts(Some(own), MacAddr::BROADCAST));
        assert!(!f.accepts(Some(own), mc));
        f.multicast.push(mc);
        f.unicast.push(other);
        assert!(f.accepts(Some(own), mc));
        assert!(f.accepts(Some(own), other));
    }

    #[test]
    fn header_is_twelve_bytes_with_version_1_or_mergeable_buffers() {
        assert_eq!(vnet_hdr_len(0), 10);
        assert_eq!(vnet_hdr_len(VIRTIO_F_VERSION_1), 12);
        assert_eq!(vnet_hdr_len(VIRTIO_NET_F_MRG_RXBUF), 12);
    }

    /// A guest with one tx queue of 8 holding `n` single-descriptor frames (header + 60 bytes, byte 12+14 = seq).
    fn tx_queue(n: u16) -> (VirtQueue, GuestMemoryHandle) {
        use bulkhead_common::virtqueue::{CallSlot, QueueConfig, RingAddrs};
        use vm_memory::{
            Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
        };
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        let m = mem.memory();
        for i in 0..n {
            let buf = 0x4000 + 0x100 * u64::from(i);
            let mut pkt = [0u8; 72];
            pkt[26] = i as u8;
            m.write_slice(&pkt, GuestAddress(buf)).unwrap();
            let d = 0x1000 + 16 * u64::from(i);
            m.write_obj(buf, GuestAddress(d)).unwrap();
            m.write_obj(72u32, GuestAddress(d + 8)).unwrap();
            m.write_obj(0u32, GuestAddress(d + 12)).unwrap();
            m.write_obj(i, GuestAddress(0x2004 + 2 * u64::from(i)))
                .unwrap();
        }
        m.write_obj(n, GuestAddress(0x2002)).unwrap();
        let cfg = QueueConfig {
            index: 1,
            size: 8,
            addrs: RingAddrs {
                desc: GuestAddress(0x1000),
                avail: GuestAddress(0x2000),
                used: GuestAddress(0x3000),
            },
            next_avail: 0,
            features: VIRTIO_F_VERSION_1,
            max_chain_bytes: 1 << 20,
        };
        let call = Arc::new(CallSlot::default());
        let vq = VirtQueue::start(cfg, mem.clone(), call, None, None, Default::default()).unwrap();
        (vq, mem)
    }

    fn used_idx(mem: &GuestMemoryHandle) -> u16 {
        use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
        mem.memory().read_obj(GuestAddress(0x3002)).unwrap()
    }

    #[test]
    fn tx_keeps_the_frame_the_tap_refused_and_sends_everything_in_order_later() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(
            unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) },
            0
        );
        // SAFETY: fresh fds we own.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        // Fill the pipe: the "tap" answers EAGAIN.
        let junk = [0u8; 4096];
        // SAFETY: writing a local buffer.
        while unsafe { libc::write(wr.as_raw_fd(), junk.as_ptr().cast(), junk.len()) } > 0 {}
        let stats = Arc::new(NetStats::default());
        let pair = Arc::new(Pair {
            index: 0,
            tap: Tap::from_fd_for_test(wr),
            users: Mutex::new(0),
        });
        let mut w = TxWorker {
            pair: PairUse::new(pair),
            hdr_len: HDR_LEN_V1,
            offloads: TxOffloads::default(),
            pending: None,
            started: false,
            scratch: Vec::new(),
            iov: IoVecBuf::default(),
            small: Box::new([0; HDR_LEN_V1 + COPY_MAX]),
            stats: stats.clone(),
        };
        let (mut vq, mem) = tx_queue(5);
        let ctl = WorkerCtl::detached();
        w.process(&mut vq, &ctl);
        assert!(w.pending.is_some(), "the refused frame is kept");
        assert_eq!(used_idx(&mem), 0, "nothing completed, nothing lost");
        assert_eq!(
            vq.next_avail(),
            1,
            "no more frames taken while the tap is full"
        );
        assert_eq!(stats.tx_eagain.load(Ordering::Relaxed), 1);
        // A kick while still full changes nothing.
        w.process(&mut vq, &ctl);
        assert_eq!((used_idx(&mem), vq.next_avail()), (0, 1));
        // Drain the pipe; the next event sends all five, in order.
        let mut buf = vec![0u8; 1 << 20];
        // SAFETY: reading into a local buffer of its length.
        while unsafe { libc::read(rd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        w.process(&mut vq, &ctl);
        assert_eq!(used_idx(&mem), 5);
        assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 5);
        // SAFETY: as above.
        let n = unsafe { libc::read(rd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(n, 5 * 72);
        let seqs: Vec<u8> = buf[..360].chunks(72).map(|c| c[26]).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn stats_line_names_every_counter() {
        let s = NetStats::default();
        s.tx_bad_gso.fetch_add(3, Ordering::Relaxed);
        let line = s.line();
        assert!(line.contains("tx_bad_gso=3"));
        assert_eq!(line.split(' ').count(), 18);
    }
}
