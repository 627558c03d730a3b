//! The vhost-user request handler shared by every Bulkhead backend.
//!
//! The `vhost` crate parses each message off the socket; this handler
//! validates what the message asks for (queue indexes, sizes, addresses,
//! memory tables, inflight areas) and drives the queue threads. It implements
//! GET/SET_INFLIGHT_FD, which `vhost-user-backend` 0.24 refuses.
//!
//! Handled: SET_OWNER, RESET_OWNER, RESET_DEVICE, GET/SET_FEATURES,
//! GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_MEM_TABLE, GET_MAX_MEM_SLOTS,
//! ADD_MEM_REG, REM_MEM_REG, SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR,
//! GET_VRING_BASE, SET_VRING_ENABLE, GET/SET_CONFIG, SET_BACKEND_REQ_FD,
//! GET/SET_INFLIGHT_FD, SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE, and dirty
//! logging for migration (`VHOST_F_LOG_ALL`, SET_LOG_BASE with LOG_SHMFD,
//! the used ring's log address; see [`crate::dirty_log`]; SET_LOG_FD, which
//! the `vhost` crate does not dispatch, reaches [`BackendHandler::set_log_fd`]
//! through the serve loop). Refused: shared objects, GPU and shared-memory
//! messages.
//!
//! Device state (see [`crate::state`]) reaches a new daemon one of two
//! ways, and is applied once per connection, before the first queue starts:
//! a DEVICE_STATE load (graceful swap), or else the state section of the
//! inflight area the frontend handed over (restart after a crash).

use std::fs::File;
use std::sync::Arc;

use crate::spec::ring::VIRTIO_F_RING_PACKED;
use crate::spec::vhost_user::{VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vmm_sys_util::eventfd::EventFd;

use crate::device::VhostUserDevice;
use crate::dirty_log::{DirtyLog, LogRegion};
use crate::inflight::{AreaParts, InflightRegion};
use crate::memory::{GuestMemoryHandle, MAX_MEM_SLOTS, MemoryTable, RegionDesc};
use crate::state::{StateSection, Stored};
use crate::transfer::{TRANSFER_DEADLINE, Transfer};
use crate::virtqueue::{CallSlot, MAX_QUEUE_SIZE, QueueConfig, QueueStats, RingAddrs, VirtQueue};
use crate::worker::{QueueGroup, QueueThread};

/// Config space bytes a frontend may read; beyond the device's own config it reads zeroes.
pub const MAX_CONFIG_SIZE: usize = 256;

/// Per-queue state held between messages.
struct Vring {
    size: u16,
    addrs: Option<RingAddrs>,
    /// The vring base: a split ring's next avail index; a packed ring's avail
    /// (bits 0..15) and used (bits 16..31) positions with wrap counters.
    base: u32,
    kick: Option<EventFd>,
    call: Arc<CallSlot>,
    err: Option<Arc<EventFd>>,
    enabled: bool,
    stats: Arc<QueueStats>,
    thread: Option<Running>,
}

/// Where a started queue runs.
enum Running {
    /// A thread of its own.
    Alone(QueueThread),
    /// The thread of the device's group with this key (see
    /// [`VhostUserDevice::thread_group`]).
    Group(u16),
}

impl Vring {
    fn new() -> Self {
        Vring {
            size: 0,
            addrs: None,
            base: 0,
            kick: None,
            call: Arc::new(CallSlot::default()),
            err: None,
            enabled: false,
            stats: Arc::new(QueueStats::default()),
            thread: None,
        }
    }
}

/// Vhost-user request handler for one frontend connection.
pub struct BackendHandler<D: VhostUserDevice> {
    device: Arc<D>,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    table: MemoryTable,
    mem: GuestMemoryHandle,
    vrings: Vec<Vring>,
    /// Threads shared by groups of queues, by the device's group key; each
    /// ends when its last queue stops.
    groups: std::collections::BTreeMap<u16, QueueGroup>,
    inflight: Option<InflightRegion>,
    /// Duplicate of the backend-request socket peeked off SET_BACKEND_REQ_FD.
    peeked_backend: Option<std::os::unix::net::UnixStream>,
    /// SET_FEATURES was received (rings are then enabled per its PROTOCOL_FEATURES bit).
    features_set: bool,
    /// Longest busy-poll of a queue thread before it sleeps.
    poll_max: std::time::Duration,
    /// The last request was refused without touching any state (see
    /// [`BackendHandler::take_soft_refusal`]).
    soft_refusal: bool,
    /// A SET_DEVICE_STATE_FD transfer whose thread may still run.
    transfer: Option<Transfer>,
    /// Outcome of the last transfer, for CHECK_DEVICE_STATE.
    transfer_result: Option<Result<(), String>>,
    /// The device state was settled for this connection: loaded, restored
    /// from the inflight area, or kept at its defaults (see `settle_state`).
    state_settled: bool,
    /// The inflight area's state section, once the state is settled.
    section: Option<Arc<StateSection>>,
    /// The frontend sent a state to load on this connection: the inflight
    /// area's state is then not restored, whether the load succeeds or not.
    load_sent: bool,
    /// A state loaded before SET_FEATURES (a migration's destination),
    /// checked against the features it was saved under: applied once the
    /// frontend sets the features, if they are those.
    pending_load: Option<Vec<u8>>,
    /// [`VhostUserDevice::activate`] succeeded and no `deactivate` followed.
    active: bool,
    /// Dirty-page log shared with the queue threads (migration).
    dirty: Arc<DirtyLog>,
    /// The eventfd of SET_LOG_FD, kept for the frontend (nothing signals it:
    /// the log is a shared bitmap the frontend reads when it wants).
    log_fd: Option<EventFd>,
}

fn invalid(what: &str) -> VuError {
    crate::rate_limited!(log::Level::Warn, "frontend error: {what}");
    VuError::InvalidParam
}

/// Takes a kick, call or err fd: an eventfd, made non-blocking (see
/// [`crate::frontend_fd`]); anything else is refused.
fn eventfd(file: File, role: &'static str) -> VuResult<EventFd> {
    crate::frontend_fd::eventfd(file, role).map_err(|e| invalid(&e.to_string()))
}

impl<D: VhostUserDevice> BackendHandler<D> {
    /// A handler with fresh state for a new connection.
    pub fn new(device: Arc<D>) -> Self {
        device.reset();
        device.set_state_section(None);
        let n = device.num_queues();
        let empty = vm_memory::GuestMemoryMmap::default();
        BackendHandler {
            device,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            table: MemoryTable::empty(),
            mem: GuestMemoryHandle::new(empty),
            vrings: (0..n).map(|_| Vring::new()).collect(),
            groups: std::collections::BTreeMap::new(),
            inflight: None,
            peeked_backend: None,
            features_set: false,
            poll_max: std::time::Duration::ZERO,
            soft_refusal: false,
            transfer: None,
            transfer_result: None,
            state_settled: false,
            section: None,
            load_sent: false,
            pending_load: None,
            active: false,
            dirty: Arc::new(DirtyLog::new(usize::from(n))),
            log_fd: None,
        }
    }

    /// Takes the eventfd of SET_LOG_FD (an eventfd, made non-blocking, or
    /// refused). The serve loop reads that message itself: the `vhost`
    /// crate does not pass it on.
    pub fn set_log_fd(&mut self, file: File) -> VuResult<()> {
        self.log_fd = Some(eventfd(file, "log")?);
        Ok(())
    }

    /// Warns when the dirty log no longer covers the memory table (a
    /// frontend grows the log before it grows the table); marks past it
    /// are dropped and counted.
    fn check_log_covers_table(&self) {
        if let Some(r) = self.dirty.region()
            && r.covers() < u128::from(self.table.end())
        {
            crate::rate_limited!(
                log::Level::Warn,
                "dirty log covers guest memory up to {:#x}, the memory table reaches {:#x}",
                r.covers(),
                self.table.end()
            );
        }
    }

    /// Lets queue threads busy-poll up to `max` before they sleep (zero,
    /// the default: never); see [`crate::worker::BusyPoll`].
    pub fn with_busy_poll(mut self, max: std::time::Duration) -> Self {
        self.poll_max = max;
        self
    }

    /// Holds a duplicate of the socket the next SET_BACKEND_REQ_FD carries
    /// (see [`crate::notify`]); handed to the device with the channel.
    pub fn offer_backend_socket(&mut self, sock: std::os::unix::net::UnixStream) {
        self.peeked_backend = Some(sock);
    }

    /// Whether a SET_BACKEND_REQ_FD would be accepted: the device offers
    /// BACKEND_REQ and the frontend acked it.
    pub fn expects_backend_channel(&self) -> bool {
        let f = VhostUserProtocolFeatures::BACKEND_REQ;
        self.device.protocol_features().contains(f) && self.acked_protocol.contains(f)
    }

    /// Whether the request that just failed was only refused: well formed,
    /// answered with a failure where the frontend asked for a reply, and no
    /// state changed, so the connection goes on. A config write the device
    /// refuses is one: the guest writes config space and the frontend passes
    /// the write on, so ending the connection there would let a guest make
    /// its VMM reconnect and replay in a loop.
    pub fn take_soft_refusal(&mut self) -> bool {
        std::mem::take(&mut self.soft_refusal)
    }

    /// Stops every queue thread (end of connection).
    pub fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop_queue(i);
        }
        self.deactivate_if_idle();
    }

    /// Tells the device its last queue stopped, once.
    fn deactivate_if_idle(&mut self) {
        if self.active && self.running_queue().is_none() {
            self.active = false;
            self.device.deactivate();
        }
    }

    /// Counters of every queue: (chains, bad chains, interrupts).
    pub fn stats(&self) -> Vec<Arc<QueueStats>> {
        self.vrings.iter().map(|v| v.stats.clone()).collect()
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        let n = self.vrings.len();
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| invalid(&format!("queue index {index} out of range (have {n})")))
    }

    /// SEND_RARP with the guest's `mac` (the serve loop reads that message
    /// itself: the `vhost` crate does not pass it on). Refused unless the
    /// frontend acked the RARP protocol feature, which only a device that
    /// can announce offers.
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> std::io::Result<()> {
        if !self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::RARP)
        {
            return Err(std::io::Error::other(
                "SEND_RARP without the RARP protocol feature",
            ));
        }
        self.device.announce(mac)
    }

    fn protocol_acked(&self) -> bool {
        self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    /// Whether SET_FEATURES acked VHOST_USER_F_PROTOCOL_FEATURES.
    pub fn protocol_features_acked(&self) -> bool {
        self.protocol_acked()
    }

    fn stop_queue(&mut self, i: usize) {
        self.stop_queue_reporting(i, false);
    }

    /// Stops queue `i`; `reporting`: its base goes to the frontend now
    /// (GET_VRING_BASE), so a packed ring's inflight record is not needed.
    fn stop_queue_reporting(&mut self, i: usize, reporting: bool) {
        let vq = match self.vrings[i].thread.take() {
            None => None,
            Some(Running::Alone(t)) => t.stop(),
            Some(Running::Group(key)) => {
                let group = self.groups.get_mut(&key);
                let vq = group.and_then(|g| g.remove(i as u16));
                if self.groups.get(&key).is_some_and(QueueGroup::is_empty) {
                    // Its last queue: the thread ends (joined here).
                    self.groups.remove(&key);
                }
                vq
            }
        };
        if let Some(vq) = vq {
            self.vrings[i].base = vq.vring_base();
            if vq.in_flight() > 0 {
                crate::rate_limited!(
                    log::Level::Warn,
                    "queue {i}: stopped with {} request(s) still in flight",
                    vq.in_flight()
                );
            }
            if reporting {
                vq.base_reported();
            }
        }
    }

    fn maybe_start(&mut self, i: usize) -> VuResult<()> {
        let r = self.try_start(i);
        if r.is_err() {
            self.deactivate_if_idle();
        }
        r
    }

    fn try_start(&mut self, i: usize) -> VuResult<()> {
        let v = &self.vrings[i];
        if v.thread.is_some() || !v.enabled || v.size == 0 || self.table.is_empty() {
            return Ok(());
        }
        if v.addrs.is_none() || v.kick.is_none() {
            return Ok(());
        }
        if self.transfer.as_ref().is_some_and(|t| t.is_load()) {
            // The state must be in place before the device runs.
            self.finish_transfer();
        }
        if !self.state_settled {
            self.settle_state();
        }
        let v = &self.vrings[i];
        let (Some(addrs), Some(kick)) = (v.addrs, v.kick.as_ref()) else {
            return Ok(());
        };
        let kick = kick.try_clone().map_err(VuError::ReqHandlerError)?;
        let inflight = self
            .inflight
            .as_ref()
            .and_then(|r| r.queue(i as u16, v.size));
        let cfg = QueueConfig {
            index: i as u16,
            size: v.size,
            addrs,
            next_avail: v.base as u16,
            used_base: (v.base >> 16) as u16,
            features: self.acked_features,
            max_chain_bytes: self.device.max_chain_bytes(),
        };
        let mut vq = VirtQueue::start(
            cfg,
            self.mem.clone(),
            v.call.clone(),
            v.err.clone(),
            inflight,
            v.stats.clone(),
        )
        .map_err(|e| invalid(&format!("queue {i}: {e}")))?;
        // Drivers size requests from the config (e.g. blk's seg_max), which
        // does not depend on the ring size the frontend chose.
        vq.set_max_descriptors(self.device.max_chain_descriptors());
        vq.set_dirty_log(self.dirty.clone());
        if !self.active {
            self.device.activate().map_err(|e| {
                crate::rate_limited!(log::Level::Warn, "queue {i} not started: {e}");
                VuError::ReqHandlerError(e)
            })?;
            self.active = true;
        }
        let worker = self
            .device
            .create_worker(i as u16, v.size, self.acked_features)
            .map_err(VuError::ReqHandlerError)?;
        let running = match self.device.thread_group(i as u16) {
            None => Running::Alone(
                QueueThread::spawn(vq, worker, kick, self.poll_max)
                    .map_err(VuError::ReqHandlerError)?,
            ),
            Some(key) => {
                let group = match self.groups.entry(key) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(QueueGroup::spawn(i as u16).map_err(VuError::ReqHandlerError)?)
                    }
                };
                let added = group.add(vq, worker, kick, self.poll_max);
                if group.is_empty() {
                    self.groups.remove(&key);
                }
                added.map_err(VuError::ReqHandlerError)?;
                Running::Group(key)
            }
        };
        self.vrings[i].thread = Some(running);
        crate::rate_limited!(log::Level::Debug, "queue {i} started");
        Ok(())
    }

    fn install_table(&mut self, table: MemoryTable) -> VuResult<()> {
        let map = table
            .guest_memory()
            .map_err(|e| invalid(&format!("memory table: {e}")))?;
        match self.mem.lock() {
            Ok(guard) => guard.replace(map),
            Err(_) => return Err(VuError::BackendInternalError),
        }
        self.table = table;
        Ok(())
    }

    /// Protocol features offered: the device's, plus DEVICE_STATE, which
    /// every daemon answers the same way (blk with an empty state), and
    /// LOG_SHMFD (dirty logging, in this layer for every device).
    fn offered_protocol(&self) -> VhostUserProtocolFeatures {
        self.device.protocol_features()
            | VhostUserProtocolFeatures::DEVICE_STATE
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn running_queue(&self) -> Option<usize> {
        self.vrings.iter().position(|v| v.thread.is_some())
    }

    /// Waits for the transfer thread (at most its deadline) and, for a
    /// load, validates the blob and applies it; the outcome is kept for
    /// CHECK_DEVICE_STATE.
    fn finish_transfer(&mut self) {
        let Some(t) = self.transfer.take() else {
            return;
        };
        let load = t.is_load();
        let result = match t.wait() {
            Err(e) => Err(e.to_string()),
            Ok(_) if !load => Ok(()),
            Ok(blob) => {
                let acked = self.features_set.then(|| self.device_features());
                let parsed =
                    crate::state::decode(self.device.device_type(), &blob).and_then(|payload| {
                        self.device
                            .parse_state(payload, acked)
                            .map(|state| (payload, state))
                    });
                match parsed {
                    Ok((_, state)) if acked.is_some() => {
                        self.device.apply_state(state);
                        self.store_state();
                        Ok(())
                    }
                    Ok((payload, _)) => {
                        self.pending_load = Some(payload.to_vec());
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        match &result {
            Ok(()) if load && self.pending_load.is_some() => crate::rate_limited!(
                log::Level::Info,
                "device state loaded from the frontend, applied when it sets the features"
            ),
            Ok(()) if load => {
                crate::rate_limited!(log::Level::Info, "device state loaded from the frontend")
            }
            Ok(()) => crate::rate_limited!(log::Level::Info, "device state saved"),
            Err(e) => crate::rate_limited!(
                log::Level::Warn,
                "device state {} failed, nothing applied: {e}",
                if load { "load" } else { "save" }
            ),
        }
        self.transfer_result = Some(result);
    }

    /// The features the device was given (SET_FEATURES without VHOST_F_LOG_ALL).
    fn device_features(&self) -> u64 {
        self.acked_features & !VHOST_F_LOG_ALL
    }

    /// Applies a state loaded before SET_FEATURES, now that the features
    /// are set: parsed again against them (a state saved under other
    /// features than the driver acks here means nothing to it: defaults,
    /// with a warning).
    fn apply_pending_load(&mut self) {
        let Some(payload) = self.pending_load.take() else {
            return;
        };
        match self
            .device
            .parse_state(&payload, Some(self.device_features()))
        {
            Ok(state) => {
                self.device.apply_state(state);
                self.store_state();
                crate::rate_limited!(log::Level::Info, "device state from the frontend applied");
            }
            Err(e) => crate::rate_limited!(
                log::Level::Warn,
                "device state from the frontend dropped at SET_FEATURES ({e}); starting from defaults"
            ),
        }
    }

    /// Writes the current state into the inflight area's section, if any.
    fn store_state(&self) {
        let Some(section) = &self.section else {
            return;
        };
        let r = crate::state::encode(self.device.device_type(), &self.device.save_state())
            .and_then(|blob| section.store(&blob));
        if let Err(e) = r {
            crate::rate_limited!(
                log::Level::Error,
                "cannot keep the device state in the inflight area: {e}"
            );
        }
    }

    /// Before the first queue of a connection starts (after a pending load
    /// finished): without a load, restores what the inflight area's state
    /// section holds (a predecessor that crashed); then hands the section to
    /// the device, which keeps it current from here on.
    fn settle_state(&mut self) {
        let section = if self.device.keeps_state() {
            self.inflight
                .as_ref()
                .and_then(|r| r.state_section())
                .map(Arc::new)
        } else {
            None
        };
        if let Some(s) = &section {
            let stored = s.load();
            if !self.load_sent {
                self.restore(stored);
            }
        }
        self.section = section;
        self.state_settled = true;
        self.store_state();
        self.device.set_state_section(self.section.clone());
    }

    /// Applies the state a crashed predecessor left in the inflight area;
    /// anything invalid leaves the defaults, with a warning.
    fn restore(&self, stored: Stored) {
        let blob = match stored {
            Stored::Empty => return,
            Stored::Blob(b) => b,
            Stored::Corrupt(why) => {
                crate::rate_limited!(
                    log::Level::Warn,
                    "the inflight area's device state is unusable ({why}); starting from defaults"
                );
                return;
            }
        };
        let r = crate::state::decode(self.device.device_type(), &blob).and_then(|payload| {
            self.device
                .parse_state(payload, Some(self.device_features()))
        });
        match r {
            Ok(state) => {
                self.device.apply_state(state);
                crate::rate_limited!(
                    log::Level::Info,
                    "device state restored from the inflight area"
                );
            }
            Err(e) => crate::rate_limited!(
                log::Level::Warn,
                "the inflight area's device state is refused ({e}); starting from defaults"
            ),
        }
    }

    fn reset_state(&mut self) {
        self.stop_all();
        self.device.reset();
        // A reset driver starts from defaults: so does a successor after a crash.
        self.store_state();
        self.device.set_state_section(None);
        self.section = None;
        self.state_settled = false;
        self.load_sent = false;
        self.pending_load = None;
        self.transfer = None;
        self.transfer_result = None;
        self.acked_features = 0;
        self.features_set = false;
        self.dirty.reset();
        self.log_fd = None;
        // The protocol features stay: they belong to the connection, not
        // to the device (QEMU negotiates them once, at connect, and does
        // not again after RESET_DEVICE; its migration then asks for the
        // device state on the strength of DEVICE_STATE acked back then).
        for v in &mut self.vrings {
            // The counters cover the whole connection (logged when it ends):
            // QEMU resets the device at every stop of a guest.
            let stats = v.stats.clone();
            *v = Vring::new();
            v.stats = stats;
        }
    }
}

impl<D: VhostUserDevice> Drop for BackendHandler<D> {
    fn drop(&mut self) {
        self.stop_all();
        self.device.set_state_section(None);
    }
}

fn region_desc(r: &VhostUserMemoryRegion) -> RegionDesc {
    RegionDesc {
        guest_phys_addr: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

impl<D: VhostUserDevice> VhostUserBackendReqHandlerMut for BackendHandler<D> {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_state();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset_state();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.device.features() | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.get_features()?;
        if features & !offered != 0 {
            return Err(invalid(&format!(
                "features {:#x} not offered",
                features & !offered
            )));
        }
        // A frontend that starts or stops a migration flips LOG_ALL alone,
        // queues running: the device does not see that bit, nor that change.
        let changed = features ^ self.acked_features;
        let log_only = self.features_set && changed == VHOST_F_LOG_ALL;
        if !log_only {
            self.device
                .set_features(features & !VHOST_F_LOG_ALL)
                .map_err(VuError::ReqHandlerError)?;
        }
        if changed & VIRTIO_F_RING_PACKED != 0 && features & VIRTIO_F_RING_PACKED != 0 {
            crate::rate_limited!(log::Level::Info, "the frontend acked packed virtqueues");
        }
        self.acked_features = features;
        self.features_set = true;
        if !log_only {
            self.apply_pending_load();
        }
        let log_all = features & VHOST_F_LOG_ALL != 0;
        if log_all && self.dirty.region().is_none() {
            crate::rate_limited!(
                log::Level::Warn,
                "VHOST_F_LOG_ALL acked without a log (SET_LOG_BASE): writes are not logged"
            );
        }
        self.dirty.set_log_all(log_all);
        if !self.protocol_acked() {
            // Without protocol features, rings are enabled as soon as they start.
            for v in &mut self.vrings {
                v.enabled = true;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<u64>>> {
        let descs: Vec<RegionDesc> = ctx.iter().map(region_desc).collect();
        let table =
            MemoryTable::new(&descs, files).map_err(|e| invalid(&format!("memory table: {e}")))?;
        self.install_table(table)?;
        self.check_log_covers_table();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = u32::from(self.device.max_queue_size().min(MAX_QUEUE_SIZE));
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(invalid(&format!(
                "queue size {num} (must be a power of two, 1..={max})"
            )));
        }
        let v = self.vring(index)?;
        if v.thread.is_some() {
            return Err(invalid("SET_VRING_NUM on a running queue"));
        }
        v.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        // The used ring is logged at `log`, a guest physical address, when
        // the flag says so; the largest used ring must fit below 2^64.
        let used_log = if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            let ring = 6 + 8 * u64::from(MAX_QUEUE_SIZE);
            if log.checked_add(ring).is_none() {
                return Err(invalid(&format!("used ring log address {log:#x}")));
            }
            Some(log)
        } else {
            None
        };
        let gpa = |uva: u64| {
            self.table
                .uva_to_gpa(uva)
                .map_err(|e| invalid(&format!("ring address: {e}")))
        };
        let addrs = RingAddrs {
            desc: gpa(descriptor)?,
            avail: gpa(available)?,
            used: gpa(used)?,
        };
        let v = self.vring(index)?;
        // A frontend starting or ending a migration sends the same rings
        // again, queues running, to switch used-ring logging on or off.
        if v.thread.is_some() && v.addrs != Some(addrs) {
            return Err(invalid("SET_VRING_ADDR moving a running queue"));
        }
        v.addrs = Some(addrs);
        self.dirty.set_used_log(index as usize, used_log);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let packed = self.acked_features & VIRTIO_F_RING_PACKED != 0;
        let v = self.vring(index)?;
        if v.thread.is_some() {
            return Err(invalid("SET_VRING_BASE on a running queue"));
        }
        // A packed ring's base carries the used position in bits 16..31
        // (checked when the queue starts); a split ring's is an avail index.
        if !packed && base > u32::from(u16::MAX) {
            return Err(invalid("vring base above 65535"));
        }
        v.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let i = index as usize;
        self.stop_queue_reporting(i, true);
        self.deactivate_if_idle();
        let protocol = self.protocol_acked();
        let v = &mut self.vrings[i];
        // GET_VRING_BASE stops the ring; SET_VRING_KICK starts it again.
        v.kick = None;
        if protocol {
            v.enabled = false;
        }
        Ok(VhostUserVringState::new(index, v.base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let protocol = self.protocol_acked();
        self.vring(u32::from(index))?;
        let Some(file) = fd else {
            return Err(invalid("polling mode (no kick fd) is not supported"));
        };
        let kick = eventfd(file, "kick")?;
        // A new kick fd for a running queue: restart it around the new fd.
        self.stop_queue(usize::from(index));
        let v = &mut self.vrings[usize::from(index)];
        v.kick = Some(kick);
        if !protocol {
            v.enabled = true;
        }
        let r = self.maybe_start(usize::from(index));
        // A queue restarted around its new fd keeps the device active.
        self.deactivate_if_idle();
        r
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let call = fd.map(|f| eventfd(f, "call")).transpose()?;
        let v = self.vring(u32::from(index))?;
        v.call.set(call);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let err = fd.map(|f| eventfd(f, "err")).transpose()?;
        let v = self.vring(u32::from(index))?;
        if v.thread.is_some() {
            return Err(invalid("SET_VRING_ERR on a running queue"));
        }
        v.err = err.map(Arc::new);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.offered_protocol() | VhostUserProtocolFeatures::REPLY_ACK;
        let f = VhostUserProtocolFeatures::from_bits_truncate(features);
        if f.bits() != features || !offered.contains(f) {
            return Err(invalid(&format!(
                "protocol features {features:#x} not offered"
            )));
        }
        self.acked_protocol = f;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.device.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        // Before SET_FEATURES the frontend may enable rings already (QEMU's
        // vhost-user-net does, when the guest acks its features); refuse only
        // once SET_FEATURES left PROTOCOL_FEATURES out.
        if self.features_set && !self.protocol_acked() {
            return Err(invalid("SET_VRING_ENABLE without protocol features"));
        }
        self.vring(index)?;
        let i = index as usize;
        if enable {
            self.vrings[i].enabled = true;
            self.maybe_start(i)
        } else {
            self.stop_queue(i);
            self.vrings[i].enabled = false;
            self.deactivate_if_idle();
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let (off, len) = (offset as usize, size as usize);
        let end = off
            .checked_add(len)
            .filter(|&e| e <= MAX_CONFIG_SIZE)
            .ok_or_else(|| invalid(&format!("config read {offset}+{size}")))?;
        let mut cfg = self.device.config();
        cfg.resize(MAX_CONFIG_SIZE.max(cfg.len()), 0);
        Ok(cfg[off..end].to_vec())
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        let end = (offset as usize).checked_add(buf.len());
        if end.is_none_or(|e| e > self.device.config().len()) {
            return Err(invalid(&format!("config write {offset}+{}", buf.len())));
        }
        self.device.set_config(offset, buf).map_err(|e| {
            crate::rate_limited!(log::Level::Warn, "guest config write refused: {e}");
            self.soft_refusal = true;
            VuError::ReqHandlerError(e)
        })
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        backend.set_reply_ack_flag(
            self.acked_protocol
                .contains(VhostUserProtocolFeatures::REPLY_ACK),
        );
        self.device.set_backend_channel(backend);
        if let Some(sock) = self.peeked_backend.take() {
            self.device
                .set_config_notifier(crate::notify::ConfigNotifier::new(sock));
        }
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation(
            "shared objects are not supported",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let n = inflight.num_queues;
        let qs = inflight.queue_size;
        if n == 0 || n > self.device.num_queues() || qs > self.device.max_queue_size() {
            return Err(invalid(&format!("inflight area for {n} queues of {qs}")));
        }
        // Descriptor tables for packed rings' buffers of several slots: when
        // the features say packed, or none were set yet (QEMU sets them
        // first; a frontend that does not may still go packed). The split
        // layout before them is the spec's either way.
        let parts = AreaParts {
            state: self.device.keeps_state(),
            packed_tables: !self.features_set || self.acked_features & VIRTIO_F_RING_PACKED != 0,
        };
        let created = InflightRegion::create_with(n, qs, parts);
        let (region, file) = created.map_err(|e| invalid(&format!("inflight: {e}")))?;
        let size = file.metadata().map_err(VuError::ReqHandlerError)?.len();
        self.inflight = Some(region);
        Ok((VhostUserInflight::new(size, 0, n, qs), file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let n = inflight.num_queues;
        let qs = inflight.queue_size;
        if n == 0 || n > self.device.num_queues() || qs > self.device.max_queue_size() {
            return Err(invalid(&format!("inflight area for {n} queues of {qs}")));
        }
        let region = InflightRegion::map(file, inflight.mmap_offset, inflight.mmap_size, n, qs)
            .map_err(|e| invalid(&format!("inflight: {e}")))?;
        if self.state_settled && self.device.keeps_state() {
            // A new area after the state was settled: keep it current there.
            self.section = region.state_section().map(Arc::new);
            self.store_state();
            self.device.set_state_section(self.section.clone());
        }
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<u64>> {
        let table = self
            .table
            .with_region(&region_desc(region), fd)
            .map_err(|e| invalid(&format!("memory region: {e}")))?;
        self.install_table(table)?;
        self.check_log_covers_table();
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let table = self
            .table
            .without_region(&region_desc(region))
            .map_err(|e| invalid(&format!("memory region: {e}")))?;
        self.install_table(table)
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VuResult<Option<File>> {
        if !self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::DEVICE_STATE)
        {
            return Err(invalid(
                "SET_DEVICE_STATE_FD without the DEVICE_STATE protocol feature",
            ));
        }
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(invalid(
                "device state transfer in a phase other than STOPPED",
            ));
        }
        if let Some(i) = self.running_queue() {
            return Err(invalid(&format!(
                "SET_DEVICE_STATE_FD while queue {i} runs (stop every ring first)"
            )));
        }
        if self.transfer.as_ref().is_some_and(|t| !t.is_finished()) {
            return Err(invalid(
                "SET_DEVICE_STATE_FD while a transfer is in progress",
            ));
        }
        // A finished transfer nobody checked: its outcome no longer matters.
        self.transfer = None;
        self.transfer_result = None;
        self.pending_load = None;
        crate::frontend_fd::stream(&fd, "device state").map_err(|e| invalid(&e.to_string()))?;
        let t = match direction {
            VhostTransferStateDirection::SAVE => {
                let blob =
                    crate::state::encode(self.device.device_type(), &self.device.save_state())
                        .map_err(|e| invalid(&format!("device state: {e}")))?;
                Transfer::save(fd, blob, TRANSFER_DEADLINE)
            }
            VhostTransferStateDirection::LOAD => {
                // A load decides the state: the inflight area's is not restored.
                self.load_sent = true;
                Transfer::load(fd, TRANSFER_DEADLINE)
            }
        };
        self.transfer = Some(t.map_err(VuError::ReqHandlerError)?);
        // The fd is used; none is returned (the reply says so).
        Ok(None)
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        if !self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::DEVICE_STATE)
        {
            return Err(invalid(
                "CHECK_DEVICE_STATE without the DEVICE_STATE protocol feature",
            ));
        }
        self.finish_transfer();
        match &self.transfer_result {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(VuError::ReqHandlerError(std::io::Error::other(e.clone()))),
            None => Err(invalid("CHECK_DEVICE_STATE without a transfer")),
        }
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation(
            "shared memory regions are not supported",
        ))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        // The `vhost` crate checked LOG_SHMFD was acked, and sends the reply.
        let region = LogRegion::map(file, log.mmap_size, log.mmap_offset, self.table.end())
            .map_err(|e| invalid(&format!("SET_LOG_BASE: {e}")))?;
        crate::rate_limited!(
            log::Level::Info,
            "dirty log of {} bytes (guest memory up to {:#x})",
            region.len(),
            region.covers()
        );
        self.dirty.set_region(Some(region));
        Ok(())
    }
}
