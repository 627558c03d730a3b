//! The device trait a backend implements: features, config space, state,
//! and one [`QueueWorker`] per queue (the queue-thread contract lives in
//! [`crate::worker`], which imports nothing from here).

use std::io;
use std::sync::Arc;

use vhost::vhost_user::VhostUserProtocolFeatures;

use crate::state::{DeviceType, StateError, StateSection};
use crate::worker::QueueWorker;

/// Protocol features every device offers, because the shared handler
/// ([`crate::handler`]) implements them the same way for all: multiqueue,
/// replies, config space, memory slots, inflight I/O tracking and reset.
pub const DEFAULT_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::RESET_DEVICE);

/// A virtio device served over vhost-user.
///
/// One instance lives for the whole daemon; per-connection state is reset by
/// [`VhostUserDevice::reset`] when a frontend connects or resets the device.
pub trait VhostUserDevice: Send + Sync + 'static {
    /// Worker type that runs one queue in its own thread.
    type Worker: QueueWorker;

    /// The device state the driver configured, parsed and validated (see
    /// [`crate::state`]): what a swapped or restarted daemon must keep.
    type State: Send + 'static;

    /// Number of queues offered (GET_QUEUE_NUM).
    fn num_queues(&self) -> u16;

    /// Largest queue size accepted in SET_VRING_NUM.
    fn max_queue_size(&self) -> u16;

    /// Virtio feature bits offered; `VHOST_USER_F_PROTOCOL_FEATURES` is added by the handler.
    fn features(&self) -> u64;

    /// Protocol features offered: [`DEFAULT_PROTOCOL_FEATURES`] unless the
    /// device needs more (console: BACKEND_REQ for config-change
    /// notifications). DEVICE_STATE is added by the handler.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        DEFAULT_PROTOCOL_FEATURES
    }

    /// The device's config space as the guest currently sees it.
    fn config(&self) -> Vec<u8>;

    /// A config-space write from the driver (SET_CONFIG).
    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()> {
        let _ = (offset, data);
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "config space is read-only",
        ))
    }

    /// The driver acknowledged `features` (SET_FEATURES), already checked to be a subset of ours.
    fn set_features(&self, features: u64) -> io::Result<()> {
        let _ = features;
        Ok(())
    }

    /// Most descriptors one chain may have on any ring, however small the
    /// frontend made it: what the device's config lets a driver put in one
    /// request (blk: `seg_max` plus header and status). Default: the
    /// largest queue size.
    fn max_chain_descriptors(&self) -> u16 {
        self.max_queue_size()
    }

    /// Most bytes one descriptor chain may carry.
    fn max_chain_bytes(&self) -> u64 {
        u64::from(u32::MAX)
    }

    /// The first queue is about to start (none runs): take what the device
    /// holds only while it serves (blk: the image's writer lock). An error
    /// fails the request that would start the queue.
    fn activate(&self) -> io::Result<()> {
        Ok(())
    }

    /// The last running queue stopped (GET_VRING_BASE, SET_VRING_ENABLE 0,
    /// RESET_DEVICE, a disconnect): let go of what [`activate`] took.
    ///
    /// [`activate`]: VhostUserDevice::activate
    fn deactivate(&self) {}

    /// Announces `mac` on the device's network after a live migration
    /// (SEND_RARP, offered with the RARP protocol feature): net sends a
    /// RARP broadcast from that address so that switches learn where the
    /// guest now is. Default: the device has no network to announce on.
    fn announce(&self, mac: [u8; 6]) -> io::Result<()> {
        let _ = mac;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the device has no network to announce on",
        ))
    }

    /// Back to power-on state: a new frontend connected, or RESET_DEVICE.
    fn reset(&self) {}

    /// The frontend went away and every queue thread has stopped.
    fn disconnected(&self) {}

    /// A snapshot of the device's counters, read from the atomics it keeps
    /// ([`crate::stats`]): logged as a `stats:` line on SIGUSR1 and at exit,
    /// and served on `--stats-socket` ([`crate::scaffold`]). Called from the
    /// scaffold's own threads, never a queue thread. Empty: nothing to count.
    fn stats(&self) -> crate::stats::Stats {
        crate::stats::Stats::new()
    }

    /// The device's I/O limits and how it names them, for the control
    /// socket's `limits` and `limit` requests ([`crate::stats_socket`]);
    /// None: it has no limits.
    fn limits_control(&self) -> Option<crate::stats_socket::LimitsControl> {
        None
    }

    /// The frontend gave us its backend-request channel (for config-change notifications).
    fn set_backend_channel(&self, channel: vhost::vhost_user::Backend) {
        let _ = channel;
    }

    /// The frontend's backend-request channel as a raw notifier, for
    /// config-change notifications (which `vhost`'s `Backend` cannot send).
    /// Called right after [`VhostUserDevice::set_backend_channel`].
    fn set_config_notifier(&self, notifier: crate::notify::ConfigNotifier) {
        let _ = notifier;
    }

    /// The device type written in state blobs.
    fn device_type(&self) -> DeviceType;

    /// The current device state as a payload (the blob without its
    /// envelope). Called with every queue stopped, or from a queue thread
    /// through the device's own [`crate::state::StateSink`].
    fn save_state(&self) -> Vec<u8>;

    /// Parses a payload from another daemon into a validated state, checked
    /// against this daemon's configuration and the features the driver
    /// acked (`acked`, without VHOST_F_LOG_ALL); nothing is applied.
    /// Untrusted input. `acked` is None before SET_FEATURES (a migration's
    /// destination checks the state before the frontend sets the features):
    /// the state is then checked against the features it was saved under
    /// ([`crate::state::load_features`]), and parsed again, with the
    /// driver's, once they are set.
    fn parse_state(&self, payload: &[u8], acked: Option<u64>) -> Result<Self::State, StateError>;

    /// Makes the device behave as the daemon that saved `state` did. Called
    /// with every queue stopped, after SET_FEATURES.
    fn apply_state(&self, state: Self::State);

    /// Whether the device keeps its state in the inflight area, for a
    /// successor after a crash (the area it creates gets a state section).
    fn keeps_state(&self) -> bool {
        false
    }

    /// The state section to write after every change the driver makes,
    /// before the request that made it completes; None detaches it.
    fn set_state_section(&self, section: Option<Arc<StateSection>>) {
        let _ = section;
    }

    /// Queues with the same group share one thread (a [`crate::worker::QueueGroup`]);
    /// `None`, the default, gives queue `index` a thread of its own. Worth
    /// it where requests hop between queues (a console's input and its
    /// echo), not where each queue should have a CPU to itself.
    fn thread_group(&self, index: u16) -> Option<u16> {
        let _ = index;
        None
    }

    /// Creates the worker for queue `index`, about to start with `size`
    /// entries (the frontend's SET_VRING_NUM) and the negotiated `features`.
    fn create_worker(&self, index: u16, size: u16, features: u64) -> io::Result<Self::Worker>;
}
