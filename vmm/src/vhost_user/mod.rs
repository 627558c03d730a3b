//! The vhost-user frontend: one [`VhostUserDevice`] per `--blk`, `--net`,
//! `--console` or `--vhost-user` device, speaking to its backend daemon.
//!
//! At creation: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
//! GET_QUEUE_NUM (MQ), GET_CONFIG (CONFIG). At the guest's DRIVER_OK
//! ([`VirtioDevice::activate`]): SET_FEATURES, SET_MEM_TABLE with the guest
//! RAM memfd, SET_VRING_NUM for each enabled queue, GET/SET_INFLIGHT_FD, then
//! per queue SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL, SET_VRING_KICK,
//! SET_VRING_ENABLE(1). At a driver reset: SET_VRING_ENABLE(0) and
//! GET_VRING_BASE per queue, which returns only once the backend has stopped
//! the queue (its in-flight requests drained or recorded in the inflight area).
//!
//! **Backend loss.** The device's state lives in a [`BackendHandle`] shared
//! with a monitor thread ([`BackendHandle::start_monitor`]) and the control
//! socket. When the backend hangs up (POLLHUP/POLLRDHUP on the socket) or a
//! message fails at the socket level, the connection is dropped and the
//! monitor reconnects to the same socket path with bounded exponential
//! backoff, then replays what the guest configured: the negotiated features
//! and protocol features, the memory table, vring sizes and addresses, vring
//! bases (the used index read from guest memory, as QEMU does after a
//! crash), the inflight area from the first GET_INFLIGHT_FD (the same fd,
//! never a new one) and the same kick and call eventfds, which stay
//! registered with KVM. The backend resubmits what the inflight area marks
//! as in flight. Each queue is then kicked and its interrupt raised once, so
//! a kick the dead backend consumed, or an interrupt it never sent, is not
//! lost (both are harmless when spurious).
//!
//! **Swap** ([`BackendHandle::swap`]): connect to a new backend and
//! negotiate; quiesce the old one (SET_VRING_ENABLE 0, GET_VRING_BASE per
//! queue); replay the same state on the new one with the bases from
//! GET_VRING_BASE; close the old connection. The guest sees nothing. When
//! both backends offer DEVICE_STATE, the old one's state (what the driver
//! set outside the rings) is saved once its rings stopped and loaded into
//! the new one before its rings start ([`crate::device_state`]); an old
//! backend that cannot give it keeps the device.
//!
//! Files: `connect.rs` (one connection and its negotiation), `replay.rs`
//! (what the driver set up, replayed onto a backend; quiescing one),
//! `handle.rs` (the shared [`BackendHandle`]: state, reconnection, swap),
//! `monitor.rs` (the thread that notices a lost backend and reconnects),
//! `device.rs` ([`VhostUserDevice`], the transport's side).

mod connect;
mod device;
#[cfg(test)]
mod fake;
mod handle;
mod monitor;
mod replay;

use std::path::PathBuf;
use std::time::Duration;

use crate::device::DeviceError;

pub use device::VhostUserDevice;
pub use handle::{BackendHandle, BackendInfo, LinkState};

use bulkhead_spec::vhost_user::VHOST_F_LOG_ALL;
pub use bulkhead_spec::vhost_user::VHOST_USER_F_PROTOCOL_FEATURES;
/// Most queues the frontend accepts from a backend.
pub const MAX_QUEUES: usize = 64;
/// Largest config space the frontend reads from a backend.
pub const MAX_CONFIG_SIZE: u32 = 256;
/// How long one vhost-user message may take before the connection is
/// considered lost (a hung backend must not hang a vCPU for ever).
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// First delay between reconnection attempts.
pub const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(10);
/// Longest delay between reconnection attempts (the backoff's bound).
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Errors while connecting to a backend.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket could not be reached.
    #[error("Cannot connect to vhost-user backend at {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// A message of the initial negotiation failed.
    #[error("vhost-user {0} failed with backend at {1}")]
    Message(&'static str, PathBuf, #[source] vhost::Error),
    /// The backend is not a modern (VERSION_1) device.
    #[error("Backend at {0} does not offer VIRTIO_F_VERSION_1")]
    NotModern(PathBuf),
    /// The backend has fewer queues than requested, or none.
    #[error("Backend at {path} has {have} queues, {want} requested")]
    Queues {
        /// Socket path.
        path: PathBuf,
        /// Queues the backend reported.
        have: u64,
        /// Queues requested.
        want: usize,
    },
    /// A replacement backend lacks features the guest already uses.
    #[error("Backend at {path} lacks features {missing:#x} the driver negotiated")]
    Features {
        /// Socket path.
        path: PathBuf,
        /// Feature bits missing.
        missing: u64,
    },
}

/// Errors of a backend swap.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The new backend could not be reached or is not compatible; the old one keeps running.
    #[error("New backend refused")]
    Connect(#[from] ConnectError),
    /// The device has no connected backend to quiesce.
    #[error("Device has no connected backend (state: {0})")]
    NotConnected(&'static str),
    /// Bringing up the new backend failed; the old one was restarted.
    #[error("New backend failed the bring-up; the old one was restarted")]
    BringUp(#[source] DeviceError),
    /// Bringing up the new backend failed and so did restarting the old one;
    /// the monitor reconnects to the old socket.
    #[error("New backend failed the bring-up and the old one could not be restarted")]
    Lost(#[source] DeviceError),
}

/// What the VMM asks of one vhost-user device.
#[derive(Clone, Debug)]
pub struct VhostUserOptions {
    /// Backend socket.
    pub socket: PathBuf,
    /// virtio device type.
    pub virtio_id: u32,
    /// Queues to expose; `None` means what the backend reports (1 without MQ).
    pub queues: Option<usize>,
    /// Largest queue size offered to the driver.
    pub queue_size: u16,
    /// Bytes of config space to fetch from the backend (0 for none).
    pub config_size: u32,
    /// Offer packed rings to the driver when the backend does. Off by
    /// default, as in QEMU (`packed=off`): a backend restarted after a
    /// crash resumes a packed ring only while no buffer of more than one
    /// slot was in flight, a split ring always.
    pub packed: bool,
}

pub(super) fn msg<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, DeviceError> {
    r.map_err(|e| DeviceError::Vhost(what, e))
}

/// Whether `e` means the connection is unusable (as opposed to the backend
/// refusing one request and staying in sync).
pub(super) fn is_link_error(e: &DeviceError) -> bool {
    use vhost::vhost_user::Error as U;
    match e {
        DeviceError::Vhost(_, vhost::Error::IOError(_)) => true,
        DeviceError::Vhost(_, vhost::Error::VhostUserProtocol(u)) => matches!(
            u,
            U::PartialMessage
                | U::Disconnected
                | U::SocketError(_)
                | U::SocketBroken(_)
                | U::SocketRetry(_)
                | U::InvalidMessage
                | U::OversizedMsg
                | U::IncorrectFds
        ),
        _ => false,
    }
}

/// The one error-chain printer every binary uses.
pub(super) use bulkhead_common::cli::error_chain;
