//! The two traits a backend implements: the device (features, config space,
//! one worker per queue) and the queue worker (what to do on a kick).

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use vhost::vhost_user::VhostUserProtocolFeatures;

use crate::state::{DeviceType, StateError, StateSection};
use crate::virtqueue::VirtQueue;
use crate::worker::WorkerCtl;

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

    /// Protocol features offered.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;

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

    /// Back to power-on state: a new frontend connected, or RESET_DEVICE.
    fn reset(&self) {}

    /// The frontend went away and every queue thread has stopped (log counters here).
    fn disconnected(&self) {}

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
    /// acked; nothing is applied. Untrusted input.
    fn parse_state(&self, payload: &[u8]) -> Result<Self::State, StateError>;

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

    /// Creates the worker for queue `index`, about to start with `size`
    /// entries (the frontend's SET_VRING_NUM) and the negotiated `features`.
    fn create_worker(&self, index: u16, size: u16, features: u64) -> io::Result<Self::Worker>;
}

/// What one call of [`QueueWorker::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Work was waiting and has been handled.
    Work,
    /// Nothing yet; polling on may catch the next request.
    Nothing,
    /// Stop polling and sleep: what comes next is done by other threads
    /// (I/O workers, a full tap draining) that need this CPU more than a
    /// spinning thread does, and whose completion wakes the thread anyway.
    Sleep,
}

/// The per-queue half of a device, run by its own thread.
pub trait QueueWorker: Send + 'static {
    /// The queue thread may busy-poll this worker (see [`QueueWorker::poll`])
    /// before it sleeps; asked once, when the thread starts.
    fn busy_polls(&self) -> bool {
        false
    }

    /// Busy-poll hook: handles work that arrived since the last event and
    /// can be seen without a syscall (new chains on the ring, completions in
    /// a shared ring). Called in a tight loop for a few microseconds before
    /// the queue thread sleeps, so it must be cheap when there is nothing.
    fn poll(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) -> Polled {
        let _ = (vq, ctl);
        Polled::Sleep
    }

    /// Extra fds the worker thread polls (an I/O completion fd, a tap); level-triggered.
    fn fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// The guest kicked the queue (also called once when the queue starts).
    fn on_kick(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl);

    /// Extra fd number `index` (position in [`QueueWorker::fds`]) is ready.
    fn on_fd(&mut self, vq: &mut VirtQueue, index: usize, ctl: &WorkerCtl) {
        let _ = (vq, index, ctl);
    }

    /// The queue is stopping: finish or give up every request in flight.
    fn drain(&mut self, vq: &mut VirtQueue) {
        let _ = vq;
    }
}
