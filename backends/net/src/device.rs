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

use bulkhead_common::device::DEFAULT_PROTOCOL_FEATURES;
use bulkhead_common::spec::VIRTIO_F_VERSION_1;
use bulkhead_common::spec::net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP, VirtioNetConfig,
};
use bulkhead_common::spec::ring::{
    VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use bulkhead_common::state::{
    DeviceType, StateError, StateSection, StateSink, load_features, virtio_features,
};
use bulkhead_common::throttle::Throttle;
use bulkhead_common::{Polled, QueueWorker, VhostUserDevice, VirtQueue, WorkerCtl};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::ByteValued;

pub use crate::ctrl::CtrlWorker;
use crate::request::{CtrlFeatures, HDR_LEN_LEGACY, HDR_LEN_V1, MAX_FRAME_LEN, MacAddr};
pub use crate::rx::{RxFilter, RxWorker};
use crate::state::{Limits, NetState};
pub use crate::stats::NetStats;
use crate::tap::{Tap, offload_flags};
pub use crate::tx::TxWorker;

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

    /// Pair 0 over any fd standing in for its tap (unit tests).
    #[cfg(test)]
    pub(crate) fn for_test(fd: std::os::fd::OwnedFd) -> Self {
        PairUse::new(Arc::new(Pair {
            index: 0,
            tap: Tap::from_fd_for_test(fd),
            users: Mutex::new(0),
        }))
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
/// Length of the RARP announcement: the shortest Ethernet frame (without
/// its FCS), as QEMU's own announcement is.
pub const RARP_FRAME_LEN: usize = 60;

/// The frame that announces `mac` after a migration: a broadcast RARP
/// "reverse request" from `mac` asking for `mac`'s address (RFC 903), the
/// same frame QEMU broadcasts for a device it serves itself. Switches (and
/// Linux bridges) learn from its source address where the guest now is.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut f = [0u8; RARP_FRAME_LEN];
    f[0..6].copy_from_slice(&MacAddr::BROADCAST.0);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&(libc::ETH_P_RARP as u16).to_be_bytes());
    f[14..16].copy_from_slice(&libc::ARPHRD_ETHER.to_be_bytes());
    f[16..18].copy_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&libc::ARPOP_RREQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&mac); // sender hardware address
    // sender protocol address 0.0.0.0
    f[32..38].copy_from_slice(&mac); // target hardware address
    // target protocol address 0.0.0.0, then padding
    f
}

/// The net device served by the daemon.
pub struct NetDevice {
    cfg: NetConfig,
    pairs: Vec<Arc<Pair>>,
    shared: Arc<Shared>,
    /// Counters.
    pub stats: Arc<NetStats>,
    /// Packet and byte limits of both directions (`--rx-pps`, `--tx-bps`, ...).
    throttle: Arc<Throttle>,
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
            throttle: Arc::new(Throttle::unlimited()),
        };
        dev.configure_tap(0)?;
        Ok(dev)
    }

    /// The device with its queues held to `throttle`'s limits: receive is
    /// the read direction, transmit the write direction.
    pub fn with_throttle(mut self, throttle: Arc<Throttle>) -> Self {
        self.throttle = throttle;
        self
    }

    /// The throttle every queue shares: [`Throttle::set_limits`] changes
    /// the limits of a running device.
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
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

    fn stats(&self) -> bulkhead_common::stats::Stats {
        let mut stats = self.stats.snapshot();
        self.throttle.add_to(&mut stats);
        stats
    }

    fn limits_control(&self) -> Option<bulkhead_common::stats_socket::LimitsControl> {
        Some((
            self.throttle.clone(),
            &bulkhead_common::throttle::NET_LIMIT_NAMES,
        ))
    }

    fn device_type(&self) -> DeviceType {
        DeviceType::Net
    }

    fn save_state(&self) -> Vec<u8> {
        self.shared.state().encode()
    }

    fn parse_state(&self, payload: &[u8], acked: Option<u64>) -> Result<NetState, StateError> {
        let limits = Limits {
            acked: load_features(payload, acked, self.features())?,
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

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // SEND_RARP after a migration: see `announce`.
        DEFAULT_PROTOCOL_FEATURES | VhostUserProtocolFeatures::RARP
    }

    fn announce(&self, mac: [u8; 6]) -> io::Result<()> {
        let mac_addr = MacAddr(mac);
        if mac_addr.is_multicast() || mac == [0; 6] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SEND_RARP for {mac_addr}, not an address a guest can own"),
            ));
        }
        let Some(p) = self.pairs.first() else {
            return Err(io::Error::other("no tap queue"));
        };
        // The tap takes a vnet header first (all zero: no offload), of the
        // length the negotiated features set on it.
        let hdr = vnet_hdr_len(self.shared.acked.load(Ordering::Acquire));
        let mut packet = vec![0u8; hdr + RARP_FRAME_LEN];
        packet[hdr..].copy_from_slice(&rarp_frame(mac));
        let n = p.tap.write(&packet).map_err(|e| {
            io::Error::other(format!(
                "tap {}: announcing {mac_addr}: {e}",
                self.tap_name()
            ))
        })?;
        if n != packet.len() {
            return Err(io::Error::other(format!(
                "tap {}: announcing {mac_addr}: wrote {n} of {} bytes",
                self.tap_name(),
                packet.len()
            )));
        }
        bulkhead_common::rate_limited!(
            log::Level::Info,
            "announced {mac_addr} on tap {} (SEND_RARP)",
            self.tap_name()
        );
        Ok(())
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
            | VIRTIO_F_RING_PACKED
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
        if index >= 2 * pairs {
            let features = CtrlFeatures {
                rx: bit(features, VIRTIO_NET_F_CTRL_RX),
                mq: bit(features, VIRTIO_NET_F_MQ),
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
            NetWorker::Rx(RxWorker::new(
                pair,
                features,
                self.shared.clone(),
                self.throttle.clone(),
            ))
        } else {
            NetWorker::Tx(TxWorker::new(
                pair,
                features,
                self.stats.clone(),
                self.throttle.clone(),
            ))
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
            NetWorker::Tx(w) if !w.pending.is_empty() || w.held.is_some() => Polled::Sleep,
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
                let heads = w.take_chains();
                for h in vq.give_back(&heads) {
                    vq.complete(h, 0);
                }
            }
            NetWorker::Tx(w) => {
                // The frame the throttle holds goes back on the ring
                // untouched (nothing was taken after it); so do the frames
                // the tap refused: the next backend sends them.
                if let Some(hold) = w.held.take() {
                    let (chain, _) = w.throttle().release(*hold);
                    if !vq.give_back(&[chain.head()]).is_empty() {
                        w.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                        vq.complete(chain.head(), 0);
                    }
                }
                let heads: Vec<u16> = w.pending.drain(..).map(|(c, _)| c.head()).collect();
                for h in vq.give_back(&heads) {
                    w.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                    vq.complete(h, 0);
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
    fn the_rarp_announcement_is_qemus_frame() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 0x08, 0x00, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|&b| b == 0));
    }

    #[test]
    fn header_is_twelve_bytes_with_version_1_or_mergeable_buffers() {
        assert_eq!(vnet_hdr_len(0), 10);
        assert_eq!(vnet_hdr_len(VIRTIO_F_VERSION_1), 12);
        assert_eq!(vnet_hdr_len(VIRTIO_NET_F_MRG_RXBUF), 12);
    }
}
