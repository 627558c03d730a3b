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

use bulkhead_common::cli::error_chain;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::device::{ActiveQueue, DeviceError, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::memory::GuestRam;
use crate::seccomp::{self, SeccompMode, Thread};

/// vhost-user feature bit 30: protocol features are negotiated (not a virtio bit).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// vhost feature bit 26: dirty logging (migration), never offered to the guest.
const VHOST_F_LOG_ALL: u64 = 1 << 26;
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

/// Protocol features the frontend uses when the backend offers them.
fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

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
}

fn msg<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, DeviceError> {
    r.map_err(|e| DeviceError::Vhost(what, e))
}

/// Whether `e` means the connection is unusable (as opposed to the backend
/// refusing one request and staying in sync).
fn is_link_error(e: &DeviceError) -> bool {
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

/// Whether the peer of `fd` hung up or the socket has an error (no wait).
fn hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd; poll only writes its revents.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// One live vhost-user connection and what the backend said at negotiation.
struct Connection {
    frontend: Frontend,
    path: PathBuf,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queues: u64,
    config: Vec<u8>,
}

impl Connection {
    /// Connects to `path` and runs SET_OWNER, GET_FEATURES, the protocol
    /// feature negotiation, GET_QUEUE_NUM and GET_CONFIG.
    fn open(path: &Path, config_size: u32) -> Result<Self, ConnectError> {
        let path = path.to_path_buf();
        let fail = |what: &'static str| {
            let p = path.clone();
            move |e| ConnectError::Message(what, p, e)
        };
        let stream =
            UnixStream::connect(&path).map_err(|e| ConnectError::Connect(path.clone(), e))?;
        stream
            .set_read_timeout(Some(MESSAGE_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(MESSAGE_TIMEOUT)))
            .map_err(|e| ConnectError::Connect(path.clone(), e))?;
        let mut fe = Frontend::from_stream(stream, MAX_QUEUES as u64);
        fe.set_owner().map_err(fail("SET_OWNER"))?;
        let features = fe.get_features().map_err(fail("GET_FEATURES"))?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ConnectError::NotModern(path));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = fe
                .get_protocol_features()
                .map_err(fail("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted_protocol();
            fe.set_protocol_features(protocol)
                .map_err(fail("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(fail("GET_QUEUE_NUM"))?
        } else {
            1
        };
        let mut config = Vec::new();
        let size = config_size.min(MAX_CONFIG_SIZE);
        if size > 0 && protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let buf = vec![0u8; size as usize];
            let (_, payload) = fe
                .get_config(0, size, VhostUserConfigFlags::empty(), &buf)
                .map_err(fail("GET_CONFIG"))?;
            config = payload;
        }
        Ok(Connection {
            frontend: fe,
            path,
            features,
            protocol,
            queues,
            config,
        })
    }

    fn protocol_acked(&self) -> bool {
        self.features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    fn fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}

/// One queue as the driver configured it, kept to replay on a new backend.
struct QueueSetup {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// A dup of the transport's kick eventfd (the same file KVM signals).
    kick: EventFd,
    /// A dup of the transport's call eventfd (the same file KVM listens on).
    call: EventFd,
}

/// What the driver set up at DRIVER_OK.
struct ActiveSetup {
    /// Virtio features the driver accepted (without the vhost-user bit).
    features: u64,
    queues: Vec<QueueSetup>,
}

/// Where a device's backend connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Connected and (if the driver is running) replayed.
    Connected,
    /// The backend was lost; the monitor is reconnecting.
    Reconnecting,
}

impl LinkState {
    /// The state's name in the control API.
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connected => "connected",
            LinkState::Reconnecting => "reconnecting",
        }
    }
}

/// A snapshot of one device for the control API and tests.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    /// Device id (`blk0`, ...).
    pub id: String,
    /// virtio device type.
    pub virtio_id: u32,
    /// Current backend socket.
    pub socket: PathBuf,
    /// Connection state.
    pub state: LinkState,
    /// Whether the driver has the device running.
    pub active: bool,
    /// Queues the driver enabled.
    pub queues: Vec<usize>,
    /// Times the backend was reconnected after a loss.
    pub reconnects: u64,
    /// Times the device was moved to another backend.
    pub swaps: u64,
    /// Heads the inflight area marks as in flight (None without an area).
    pub inflight: Option<usize>,
    /// Bytes of device state the last swap moved (None: none moved).
    pub swap_state_bytes: Option<usize>,
    /// Why the backend was last lost or a reconnection last failed.
    pub last_error: Option<String>,
}

struct Inner {
    conn: Option<Connection>,
    generation: u64,
    socket: PathBuf,
    ram: Arc<GuestRam>,
    virtio_id: u32,
    num_queues: usize,
    queue_size: u16,
    config_size: u32,
    /// Features offered to the guest (fixed by the first backend).
    guest_features: u64,
    config: Vec<u8>,
    inflight: Option<(VhostUserInflight, File)>,
    active: Option<ActiveSetup>,
    reconnects: u64,
    swaps: u64,
    /// Bytes of device state the last swap moved.
    last_swap_state: Option<usize>,
    last_error: Option<String>,
}

/// How the vring bases of a replay are chosen.
enum Bases<'a> {
    /// The driver just set DRIVER_OK: every ring starts at 0.
    Fresh,
    /// After a crash: the used index in guest memory (as QEMU does).
    UsedRing,
    /// After a clean stop: what GET_VRING_BASE returned, per started queue.
    Given(&'a [(usize, u32)]),
}

impl Inner {
    fn state(&self) -> LinkState {
        if self.conn.is_some() {
            LinkState::Connected
        } else {
            LinkState::Reconnecting
        }
    }

    /// Drops the connection; the monitor reconnects.
    fn lose(&mut self, why: String) {
        if self.conn.take().is_some() {
            log::warn!("{}: backend lost: {why}", self.socket.display());
            self.generation = self.generation.wrapping_add(1);
        }
        self.last_error = Some(why);
    }

    /// Checks that `conn` can serve what the guest already negotiated.
    fn check(&self, conn: &Connection) -> Result<(), ConnectError> {
        let needed = match &self.active {
            Some(a) => a.features,
            None => self.guest_features,
        };
        let missing = needed & !conn.features;
        if missing != 0 {
            return Err(ConnectError::Features {
                path: conn.path.clone(),
                missing,
            });
        }
        if conn.queues < self.num_queues as u64 {
            return Err(ConnectError::Queues {
                path: conn.path.clone(),
                have: conn.queues,
                want: self.num_queues,
            });
        }
        Ok(())
    }

    fn vring_config(&self, q: &QueueSetup) -> Result<VringConfigData, DeviceError> {
        let n = u64::from(q.size);
        let ring = |addr: u64, len: Option<u64>| {
            len.and_then(|l| self.ram.host_addr(addr, l).ok())
                .ok_or(DeviceError::RingOutsideRam(q.index))
        };
        // Split ring sizes (virtio 1.x 2.7): 16 bytes a descriptor; avail and
        // used carry flags, idx and the event word.
        Ok(VringConfigData {
            queue_max_size: self.queue_size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: ring(q.desc, n.checked_mul(16))?,
            avail_ring_addr: ring(q.avail, n.checked_mul(2).and_then(|x| x.checked_add(6)))?,
            used_ring_addr: ring(q.used, n.checked_mul(8).and_then(|x| x.checked_add(6)))?,
            log_addr: None,
        })
    }

    fn used_index(&self, q: &QueueSetup) -> Result<u32, DeviceError> {
        let mut b = [0u8; 2];
        q.used
            .checked_add(2)
            .and_then(|a| self.ram.read(a, &mut b).ok())
            .ok_or(DeviceError::RingOutsideRam(q.index))?;
        Ok(u32::from(u16::from_le_bytes(b)))
    }

    /// Sends the driver's setup to `conn`: features, memory table, vring
    /// sizes, the inflight area, then per queue address, base, call, kick,
    /// enable.
    fn replay(&mut self, conn: &mut Connection, bases: Bases<'_>) -> Result<(), DeviceError> {
        self.replay_with_state(conn, bases, None)
    }

    /// [`Inner::replay`], loading the device state `state` (from the backend
    /// this one replaces) before any ring starts.
    fn replay_with_state(
        &mut self,
        conn: &mut Connection,
        bases: Bases<'_>,
        state: Option<&[u8]>,
    ) -> Result<(), DeviceError> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        let mut acked = active.features;
        if conn.protocol_acked() {
            acked |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        let configs = active
            .queues
            .iter()
            .map(|q| self.vring_config(q))
            .collect::<Result<Vec<_>, _>>()?;
        let mut base_of = Vec::with_capacity(active.queues.len());
        for q in &active.queues {
            base_of.push(match &bases {
                Bases::Fresh => 0,
                Bases::UsedRing => self.used_index(q)?,
                Bases::Given(list) => list
                    .iter()
                    .find(|(i, _)| *i == q.index)
                    .map(|(_, b)| *b)
                    .ok_or(DeviceError::NoSuchQueue(q.index))?,
            });
        }
        let proto_acked = conn.protocol_acked();
        let conn_protocol = conn.protocol;
        let conn_path = conn.path.clone();
        let fe = &mut conn.frontend;
        msg("SET_FEATURES", fe.set_features(acked))?;
        msg("SET_MEM_TABLE", fe.set_mem_table(&self.ram.vhost_regions()))?;
        for q in &active.queues {
            msg("SET_VRING_NUM", fe.set_vring_num(q.index, q.size))?;
        }
        if conn_protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.inflight.is_none() {
                let nq = u16::try_from(self.num_queues)
                    .map_err(|_| DeviceError::NoSuchQueue(self.num_queues))?;
                let req = VhostUserInflight::new(0, 0, nq, self.queue_size);
                self.inflight = Some(msg("GET_INFLIGHT_FD", fe.get_inflight_fd(&req))?);
            }
            if let Some((info, file)) = &self.inflight {
                msg(
                    "SET_INFLIGHT_FD",
                    fe.set_inflight_fd(info, file.as_raw_fd()),
                )?;
            }
        } else if self.inflight.is_some() {
            log::warn!(
                "{}: backend does not take the inflight area; requests in flight at a crash are not resubmitted",
                conn_path.display()
            );
        }
        if let Some(blob) = state {
            crate::device_state::load(fe, blob)?;
        }
        for ((q, cfg), base) in active.queues.iter().zip(&configs).zip(&base_of) {
            msg("SET_VRING_ADDR", fe.set_vring_addr(q.index, cfg))?;
            msg("SET_VRING_BASE", fe.set_vring_base(q.index, *base as u16))?;
            msg("SET_VRING_CALL", fe.set_vring_call(q.index, &q.call))?;
            msg("SET_VRING_KICK", fe.set_vring_kick(q.index, &q.kick))?;
            if proto_acked {
                msg("SET_VRING_ENABLE", fe.set_vring_enable(q.index, true))?;
            }
        }
        if !matches!(bases, Bases::Fresh) {
            // A kick the old backend consumed without acting on it, or an
            // interrupt it never sent, would stall the guest: give one of each.
            for q in &active.queues {
                let _ = q.kick.write(1);
                let _ = q.call.write(1);
            }
        }
        Ok(())
    }

    /// SET_VRING_ENABLE(0) and GET_VRING_BASE for every started queue.
    fn quiesce(&self, conn: &mut Connection) -> Result<Vec<(usize, u32)>, DeviceError> {
        let mut bases = Vec::new();
        if let Some(active) = &self.active {
            for q in &active.queues {
                if conn.protocol_acked() {
                    msg(
                        "SET_VRING_ENABLE",
                        conn.frontend.set_vring_enable(q.index, false),
                    )?;
                }
                let base = msg("GET_VRING_BASE", conn.frontend.get_vring_base(q.index))?;
                bases.push((q.index, base));
            }
        }
        Ok(bases)
    }

    /// Installs a freshly negotiated connection and replays onto it.
    fn install(&mut self, mut conn: Connection, bases: Bases<'_>) -> Result<(), DeviceError> {
        if !conn.config.is_empty() && conn.config != self.config {
            log::info!(
                "{}: the new backend's config space differs; the guest sees it at its next read",
                conn.path.display()
            );
            self.config = conn.config.clone();
        }
        self.replay(&mut conn, bases)?;
        self.socket = conn.path.clone();
        self.conn = Some(conn);
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    fn inflight_count(&self) -> Option<usize> {
        let (info, file) = self.inflight.as_ref()?;
        let qs = u64::from(info.queue_size);
        let per_queue = (16 + 16 * qs).div_ceil(64) * 64;
        let mut n = 0;
        for q in 0..u64::from(info.num_queues) {
            for d in 0..qs {
                let mut flag = [0u8];
                let off = info.mmap_offset + q * per_queue + 16 + 16 * d;
                if file.read_exact_at(&mut flag, off).is_ok() && flag[0] == 1 {
                    n += 1;
                }
            }
        }
        Some(n)
    }
}

/// A device's backend state, shared by the transport (through
/// [`VhostUserDevice`]), the monitor thread and the control socket.
pub struct BackendHandle {
    id: String,
    inner: Mutex<Inner>,
    wake: EventFd,
}

impl BackendHandle {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device id given at creation (`blk0`, ...).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A snapshot of the device's state.
    pub fn info(&self) -> BackendInfo {
        let g = self.lock();
        BackendInfo {
            id: self.id.clone(),
            virtio_id: g.virtio_id,
            socket: g.socket.clone(),
            state: g.state(),
            active: g.active.is_some(),
            queues: g
                .active
                .as_ref()
                .map(|a| a.queues.iter().map(|q| q.index).collect())
                .unwrap_or_default(),
            reconnects: g.reconnects,
            swaps: g.swaps,
            swap_state_bytes: g.last_swap_state,
            inflight: g.inflight_count(),
            last_error: g.last_error.clone(),
        }
    }

    /// Connection state now.
    pub fn state(&self) -> LinkState {
        self.lock().state()
    }

    /// Times the backend was reconnected after a loss.
    pub fn reconnects(&self) -> u64 {
        self.lock().reconnects
    }

    /// Checks the connection now: drops it if the backend hung up. Returns
    /// whether a connection is up afterwards.
    pub fn check_link(&self) -> bool {
        let mut g = self.lock();
        if let Some(c) = &g.conn
            && hung_up(c.fd())
        {
            g.lose("backend hung up".into());
            let _ = self.wake.write(1);
        }
        g.conn.is_some()
    }

    /// One reconnection attempt to the current socket path: negotiate, check
    /// compatibility, replay with the used ring's indexes as bases.
    pub fn try_reconnect(&self) -> Result<(), String> {
        let (path, config_size) = {
            let g = self.lock();
            if g.conn.is_some() {
                return Ok(());
            }
            (g.socket.clone(), g.config_size)
        };
        let conn = Connection::open(&path, config_size).map_err(|e| error_chain(&e))?;
        let mut g = self.lock();
        if g.conn.is_some() {
            return Ok(()); // a swap got there first
        }
        g.check(&conn).map_err(|e| error_chain(&e))?;
        match g.install(conn, Bases::UsedRing) {
            Ok(()) => {
                g.reconnects += 1;
                log::info!(
                    "{}: {} reconnected to {}, state replayed",
                    self.id,
                    g.socket.display(),
                    if g.active.is_some() {
                        "running device"
                    } else {
                        "idle device"
                    }
                );
                Ok(())
            }
            Err(e) => Err(error_chain(&e)),
        }
    }

    /// Moves the device to the backend listening at `socket` without the
    /// guest noticing; returns the vring bases the old backend reported.
    pub fn swap(&self, socket: &Path) -> Result<Vec<(usize, u32)>, SwapError> {
        let config_size = self.lock().config_size;
        let mut new = Connection::open(socket, config_size)?;
        let mut g = self.lock();
        g.check(&new)?;
        let Some(old) = g.conn.take() else {
            return Err(SwapError::NotConnected(g.state().name()));
        };
        g.generation = g.generation.wrapping_add(1);
        let mut old = old;
        let bases = match g.quiesce(&mut old) {
            Ok(b) => b,
            Err(e) => {
                // The old backend is gone: bring the new one up as after a crash.
                log::warn!("{}: quiescing the old backend failed: {e}", self.id);
                drop(old);
                let r = g.replay(&mut new, Bases::UsedRing);
                return match r {
                    Ok(()) => {
                        g.finish_swap(new);
                        let _ = self.wake.write(1);
                        Ok(Vec::new())
                    }
                    Err(e) => {
                        g.lose(error_chain(&e));
                        let _ = self.wake.write(1);
                        Err(SwapError::Lost(e))
                    }
                };
            }
        };
        // What the driver set that the rings do not carry, when both
        // backends can move it; if the old one cannot give it, it keeps
        // the device.
        let state = match g.take_state(&mut old, &new) {
            Ok(s) => s,
            Err(e) => {
                let r = g.replay(&mut old, Bases::Given(&bases));
                let _ = self.wake.write(1);
                return match r {
                    Ok(()) => {
                        g.conn = Some(old);
                        Err(SwapError::BringUp(e))
                    }
                    Err(e2) => {
                        g.lose(error_chain(&e2));
                        Err(SwapError::Lost(e))
                    }
                };
            }
        };
        let r = g.replay_with_state(&mut new, Bases::Given(&bases), state.as_deref());
        let out = match r {
            Ok(()) => {
                g.finish_swap(new);
                drop(old);
                log::info!(
                    "{}: moved to {}{}",
                    self.id,
                    socket.display(),
                    match &state {
                        Some(s) => format!(" with {} bytes of device state", s.len()),
                        None => String::new(),
                    }
                );
                g.last_swap_state = state.map(|s| s.len());
                Ok(bases)
            }
            Err(e) => {
                drop(new);
                match g.replay(&mut old, Bases::Given(&bases)) {
                    Ok(()) => {
                        g.conn = Some(old);
                        Err(SwapError::BringUp(e))
                    }
                    Err(e2) => {
                        g.lose(error_chain(&e2));
                        Err(SwapError::Lost(e))
                    }
                }
            }
        };
        let _ = self.wake.write(1);
        out
    }

    /// Starts the thread that watches the connection and reconnects after a
    /// loss (applies the `Monitor` seccomp filter to itself).
    pub fn start_monitor(self: &Arc<Self>, mode: SeccompMode) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name(format!("vu-{}", self.id))
            .spawn(move || {
                if let Err(e) = seccomp::apply(Thread::Monitor, mode) {
                    log::error!("backend monitor: {e}");
                    return;
                }
                monitor(weak);
            })?;
        Ok(())
    }
}

impl Inner {
    /// The stopped `old` backend's device state, when it and `new` both
    /// offer DEVICE_STATE; `None` (and a warning where the old one had
    /// state to give) otherwise.
    fn take_state(
        &self,
        old: &mut Connection,
        new: &Connection,
    ) -> Result<Option<Vec<u8>>, DeviceError> {
        let f = VhostUserProtocolFeatures::DEVICE_STATE;
        match (old.protocol.contains(f), new.protocol.contains(f)) {
            (true, true) => crate::device_state::save(&mut old.frontend).map(Some),
            (true, false) => {
                log::warn!(
                    "{}: the new backend cannot load device state: what the driver set outside \
                     the rings starts from the new backend's defaults",
                    new.path.display()
                );
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    fn finish_swap(&mut self, new: Connection) {
        if !new.config.is_empty() {
            self.config = new.config.clone();
        }
        self.socket = new.path.clone();
        self.conn = Some(new);
        self.generation = self.generation.wrapping_add(1);
        self.swaps += 1;
    }
}

/// Waits for `fd` to hang up or `wake` to fire, at most `timeout`.
/// Returns whether `fd` hung up.
fn wait_hangup(fd: Option<RawFd>, wake: &EventFd, timeout: Duration) -> bool {
    let mut fds = vec![libc::pollfd {
        fd: wake.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(fd) = fd {
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        });
    }
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: a valid array of pollfds; poll only writes their revents.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return false;
    }
    if fds[0].revents & libc::POLLIN != 0 {
        let _ = wake.read();
    }
    fds.get(1).is_some_and(|p| {
        p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
    })
}

fn monitor(weak: Weak<BackendHandle>) {
    let mut delay = RECONNECT_MIN_DELAY;
    let mut failures = 0u32;
    loop {
        let Some(h) = weak.upgrade() else {
            return;
        };
        // Watch a dup of the socket so a replaced connection cannot leave us
        // polling a reused fd number.
        let watched = {
            let g = h.lock();
            g.conn.as_ref().map(|c| {
                // SAFETY: dup of a live fd; the result is owned below.
                let fd = unsafe { libc::dup(c.fd()) };
                (
                    (fd >= 0).then(|| {
                        // SAFETY: fd is a fresh descriptor we own.
                        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                    }),
                    g.generation,
                )
            })
        };
        match watched {
            Some((Some(fd), generation)) => {
                delay = RECONNECT_MIN_DELAY;
                failures = 0;
                if wait_hangup(Some(fd.as_raw_fd()), &h.wake, Duration::from_millis(500)) {
                    let mut g = h.lock();
                    if g.generation == generation {
                        g.lose("backend hung up".into());
                    }
                }
            }
            Some((None, _)) => {
                wait_hangup(None, &h.wake, Duration::from_millis(500));
            }
            None => {
                let started = Instant::now();
                match h.try_reconnect() {
                    Ok(()) => {
                        delay = RECONNECT_MIN_DELAY;
                        failures = 0;
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        // Log the first failures and then every 30th, not every attempt.
                        if failures <= 3 || failures.is_multiple_of(30) {
                            log::warn!(
                                "{}: reconnect attempt {failures} failed: {e} (retrying)",
                                h.id
                            );
                        }
                        h.lock().last_error = Some(e);
                        let wait = delay.saturating_sub(started.elapsed());
                        wait_hangup(None, &h.wake, wait);
                        delay = (delay * 2).min(RECONNECT_MAX_DELAY);
                    }
                }
            }
        }
    }
}

/// A virtio device served by a vhost-user backend process.
pub struct VhostUserDevice {
    handle: Arc<BackendHandle>,
    virtio_id: u32,
    num_queues: usize,
    queue_size: u16,
    guest_features: u64,
}

impl VhostUserDevice {
    /// Connects to the backend and runs the initial negotiation; the device
    /// is named `id` in logs and the control API.
    pub fn connect_named(
        id: &str,
        opts: &VhostUserOptions,
        ram: Arc<GuestRam>,
    ) -> Result<Self, ConnectError> {
        let conn = Connection::open(&opts.socket, opts.config_size)?;
        let have = conn.queues;
        let want = opts
            .queues
            .unwrap_or_else(|| usize::try_from(have).unwrap_or(MAX_QUEUES).min(MAX_QUEUES));
        if want == 0 || want > MAX_QUEUES || (want as u64) > have {
            return Err(ConnectError::Queues {
                path: opts.socket.clone(),
                have,
                want,
            });
        }
        let guest_features = conn.features & !(VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL);
        log::info!(
            "{id}: vhost-user device type {} at {}: features {:#x}, protocol {:#x}, {want} queue(s)",
            opts.virtio_id,
            opts.socket.display(),
            conn.features,
            conn.protocol.bits()
        );
        let inner = Inner {
            socket: opts.socket.clone(),
            config: conn.config.clone(),
            conn: Some(conn),
            generation: 0,
            ram,
            virtio_id: opts.virtio_id,
            num_queues: want,
            queue_size: opts.queue_size,
            config_size: opts.config_size,
            guest_features,
            inflight: None,
            active: None,
            reconnects: 0,
            swaps: 0,
            last_swap_state: None,
            last_error: None,
        };
        let wake = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| ConnectError::Connect(opts.socket.clone(), e))?;
        Ok(VhostUserDevice {
            handle: Arc::new(BackendHandle {
                id: id.to_string(),
                inner: Mutex::new(inner),
                wake,
            }),
            virtio_id: opts.virtio_id,
            num_queues: want,
            queue_size: opts.queue_size,
            guest_features,
        })
    }

    /// [`VhostUserDevice::connect_named`] with the id `vhost-user`.
    pub fn connect(opts: &VhostUserOptions, ram: Arc<GuestRam>) -> Result<Self, ConnectError> {
        Self::connect_named("vhost-user", opts, ram)
    }

    /// The shared state: for the monitor thread, the control API and tests.
    pub fn handle(&self) -> Arc<BackendHandle> {
        self.handle.clone()
    }

    /// The backend's socket path now.
    pub fn socket(&self) -> PathBuf {
        self.handle.lock().socket.clone()
    }

    /// Protocol features in use (empty while disconnected).
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.handle
            .lock()
            .conn
            .as_ref()
            .map(|c| c.protocol)
            .unwrap_or_else(VhostUserProtocolFeatures::empty)
    }

    /// Whether an inflight area was negotiated at the last activation.
    pub fn has_inflight(&self) -> bool {
        self.handle.lock().inflight.is_some()
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.virtio_id
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.guest_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let g = self.handle.lock();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| g.config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(off) = u32::try_from(offset) else {
            return;
        };
        let Some(end) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
        else {
            return;
        };
        let mut g = self.handle.lock();
        let writable = g.conn.as_ref().is_some_and(|c| {
            c.protocol.contains(VhostUserProtocolFeatures::CONFIG) && end <= g.config.len()
        });
        if !writable {
            log::debug!("config write at {offset:#x} ignored");
            return;
        }
        let r = match g.conn.as_mut() {
            Some(c) => c
                .frontend
                .set_config(off, VhostUserConfigFlags::WRITABLE, data),
            None => return,
        };
        match r {
            Ok(()) => {
                let start = end - data.len();
                g.config[start..end].copy_from_slice(data);
            }
            Err(e) => {
                let e = DeviceError::Vhost("SET_CONFIG", e);
                log::warn!("{}: {}", self.handle.id, error_chain(&e));
                if is_link_error(&e) {
                    g.lose(error_chain(&e));
                    let _ = self.handle.wake.write(1);
                }
            }
        }
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), DeviceError> {
        let acked = features & self.guest_features;
        let mut setup = Vec::with_capacity(queues.len());
        for q in queues {
            if q.index >= self.num_queues {
                return Err(DeviceError::NoSuchQueue(q.index));
            }
            let dup = |fd: &EventFd| {
                fd.try_clone()
                    .map_err(|e| DeviceError::Backend(format!("cannot dup an eventfd: {e}")))
            };
            setup.push(QueueSetup {
                index: q.index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: dup(q.kick)?,
                call: dup(q.call)?,
            });
        }
        let mut g = self.handle.lock();
        for q in &setup {
            g.vring_config(q)?;
        }
        g.active = Some(ActiveSetup {
            features: acked,
            queues: setup,
        });
        let Some(mut conn) = g.conn.take() else {
            // The monitor replays this once the backend is back.
            return Ok(());
        };
        match g.replay(&mut conn, Bases::Fresh) {
            Ok(()) => {
                g.conn = Some(conn);
                Ok(())
            }
            Err(e) if is_link_error(&e) || hung_up(conn.fd()) => {
                g.conn = Some(conn);
                g.lose(error_chain(&e));
                let _ = self.handle.wake.write(1);
                Ok(())
            }
            Err(e) => {
                g.conn = Some(conn);
                g.active = None;
                Err(e)
            }
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        let mut g = self.handle.lock();
        let mut conn = g.conn.take();
        let r = match conn.as_mut() {
            Some(c) => g.quiesce(c).map(|bases| {
                for (i, b) in bases {
                    log::debug!("queue {i} stopped at avail index {b}");
                }
            }),
            None => Ok(()),
        };
        g.conn = conn;
        g.active = None;
        // A fresh driver starts from index 0: the old inflight area no longer applies.
        g.inflight = None;
        if let Err(e) = &r
            && (is_link_error(e) || g.conn.as_ref().is_some_and(|c| hung_up(c.fd())))
        {
            g.lose(error_chain(e));
            let _ = self.handle.wake.write(1);
            return Ok(());
        }
        r
    }
}
