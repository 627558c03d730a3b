//! The virtio-net device: features, config space, the queue pairs' tap
//! queues, and which worker serves each queue (receive: `rx.rs`; transmit:
//! `tx.rs`; control queue: `ctrl.rs`).
//!
//! Queue layout: rx0, tx0, rx1, tx1, ..., then the control queue. Each queue
//! runs in its own thread; the rx and tx workers of a pair share that pair's
//! tap queue.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_common::state::{DeviceType, StateError, StateSection, StateSink, virtio_features};
use bulkhead_common::virtqueue::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use bulkhead_common::{Polled, QueueWorker, VhostUserDevice, VirtQueue, WorkerCtl};
use vhost::vhost_user::VhostUserProtocolFeatures;

pub use crate::ctrl::CtrlWorker;
use crate::request::{CtrlFeatures, HDR_LEN_LEGACY, HDR_LEN_V1, MAX_FRAME_LEN, MacAddr};
pub use crate::rx::{RxFilter, RxWorker};
use crate::state::{Limits, NetState};
pub use crate::stats::NetStats;
use crate::tap::{Tap, offload_flags};
pub use crate::tx::TxWorker;

/// Virtio-net feature bits (virtio spec 5.1.3).
pub mod features {
    /// Driver may send partial checksums.
    pub const CSUM: u32 = 0;
    /// Driver accepts partial checksums.
    pub const GUEST_CSUM: u32 = 1;
    /// `mtu` in config space is valid.
    pub const MTU: u32 = 3;
    /// `mac` in config space is valid.
    pub const MAC: u32 = 5;
    /// Driver accepts TSOv4.
    pub const GUEST_TSO4: u32 = 7;
    /// Driver accepts TSOv6.
    pub const GUEST_TSO6: u32 = 8;
    /// Driver accepts TSO with ECN.
    pub const GUEST_ECN: u32 = 9;
    /// Driver accepts UFO.
    pub const GUEST_UFO: u32 = 10;
    /// Device accepts TSOv4.
    pub const HOST_TSO4: u32 = 11;
    /// Device accepts TSOv6.
    pub const HOST_TSO6: u32 = 12;
    /// Device accepts TSO with ECN.
    pub const HOST_ECN: u32 = 13;
    /// Device accepts UFO.
    pub const HOST_UFO: u32 = 14;
    /// Driver can merge receive buffers.
    pub const MRG_RXBUF: u32 = 15;
    /// `status` in config space is valid.
    pub const STATUS: u32 = 16;
    /// Control virtqueue.
    pub const CTRL_VQ: u32 = 17;
    /// Control: promiscuous, all-multicast, MAC tables.
    pub const CTRL_RX: u32 = 18;
    /// Several queue pairs.
    pub const MQ: u32 = 22;
}

/// Config status bit: link up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

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

/// One queue pair's tap queue and how many running workers use it.
pub(crate) struct Pair {
    pub(crate) index: u16,
    pub(crate) tap: Tap,
    pub(crate) users: Mutex<u32>,
}

/// A worker's use of a pair: attaches the tap queue while any worker of the pair runs.
pub(crate) struct PairUse(Arc<Pair>);

impl PairUse {
    pub(crate) fn new(pair: Arc<Pair>) -> Self {
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

    pub(crate) fn tap(&self) -> &Tap {
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
pub(crate) struct Shared {
    pub(crate) stats: Arc<NetStats>,
    pub(crate) filter: Mutex<RxFilter>,
    pub(crate) mac: Option<MacAddr>,
    pub(crate) active_pairs: AtomicU16,
    /// Virtio features the driver acked (for state blobs).
    acked: AtomicU64,
    /// Where the state goes after each control command (the inflight area).
    sink: StateSink,
}

impl Shared {
    /// Shared state for a worker under test: device address `mac`.
    #[cfg(test)]
    pub(crate) fn for_test(mac: Option<MacAddr>) -> Self {
        Shared {
            stats: Arc::new(NetStats::default()),
            filter: Mutex::new(RxFilter::default()),
            mac,
            active_pairs: AtomicU16::new(1),
            acked: AtomicU64::new(0),
            sink: StateSink::default(),
        }
    }

    fn state(&self) -> NetState {
        NetState {
            features: virtio_features(self.acked.load(Ordering::Acquire)),
            filter: self.filter.lock().map(|f| f.clone()).unwrap_or_default(),
            active_pairs: self.active_pairs.load(Ordering::Relaxed),
            mac: self.mac,
        }
    }

    /// Keeps the state in the inflight area; before the command that changed it completes.
    pub(crate) fn persist(&self) {
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

fn bit(features: u64, b: u32) -> bool {
    features & (1 << b) != 0
}

/// vnet header size for the negotiated features.
pub fn vnet_hdr_len(features: u64) -> usize {
    if bit(features, VIRTIO_F_VERSION_1) || bit(features, features::MRG_RXBUF) {
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
        use features::*;
        let Some(p) = self.pairs.first() else {
            return Ok(());
        };
        p.tap.set_vnet_hdr_size(vnet_hdr_len(features))?;
        let off = offload_flags(
            bit(features, GUEST_CSUM),
            bit(features, GUEST_TSO4),
            bit(features, GUEST_TSO6),
            bit(features, GUEST_ECN),
            bit(features, GUEST_UFO),
        );
        p.tap.set_offload(off)
    }
}

/// Little-endian config space writer.
struct Config(Vec<u8>);

impl Config {
    fn put(&mut self, off: usize, bytes: &[u8]) {
        self.0[off..off + bytes.len()].copy_from_slice(bytes);
    }
}

impl VhostUserDevice for NetDevice {
    type Worker = NetWorker;
    type State = NetState;

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
        use features::*;
        let mut f: u64 = [
            CSUM,
            GUEST_CSUM,
            GUEST_TSO4,
            GUEST_TSO6,
            GUEST_ECN,
            GUEST_UFO,
            HOST_TSO4,
            HOST_TSO6,
            HOST_ECN,
            HOST_UFO,
            MRG_RXBUF,
            STATUS,
            CTRL_VQ,
            CTRL_RX,
            MQ,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_VERSION_1,
        ]
        .iter()
        .fold(0, |acc, b| acc | 1 << b);
        if self.cfg.mac.is_some() {
            f |= 1 << MAC;
        }
        if self.cfg.mtu.is_some() {
            f |= 1 << MTU;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn config(&self) -> Vec<u8> {
        // struct virtio_net_config up to mtu (12 bytes).
        let mut c = Config(vec![0; 12]);
        c.put(0, &self.cfg.mac.unwrap_or_default().0);
        c.put(6, &VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c.put(8, &self.cfg.queue_pairs.to_le_bytes());
        c.put(10, &self.cfg.mtu.unwrap_or(0).to_le_bytes());
        c.0
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
        if index >= 2 * pairs {
            let features = CtrlFeatures {
                rx: bit(features, features::CTRL_RX),
                mq: bit(features, features::MQ),
                max_pairs: pairs,
            };
            return Ok(NetWorker::Ctrl(CtrlWorker::new(
                self.shared.clone(),
                features,
            )));
        }
        let pair = self
            .pairs
            .get(usize::from(index / 2))
            .ok_or_else(|| io::Error::other(format!("no tap queue for queue {index}")))?;
        let pair = PairUse::new(pair.clone());
        Ok(if index.is_multiple_of(2) {
            NetWorker::Rx(RxWorker::new(pair, features, self.shared.clone()))
        } else {
            NetWorker::Tx(TxWorker::new(pair, features, self.stats.clone()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_twelve_bytes_with_version_1_or_mergeable_buffers() {
        assert_eq!(vnet_hdr_len(0), 10);
        assert_eq!(vnet_hdr_len(1 << VIRTIO_F_VERSION_1), 12);
        assert_eq!(vnet_hdr_len(1 << features::MRG_RXBUF), 12);
    }
}
