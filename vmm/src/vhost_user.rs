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

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};

use crate::device::{ActiveQueue, DeviceError, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::memory::GuestRam;

/// vhost-user feature bit 30: protocol features are negotiated (not a virtio bit).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// vhost feature bit 26: dirty logging (migration), never offered to the guest.
const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// Most queues the frontend accepts from a backend.
pub const MAX_QUEUES: usize = 64;
/// Largest config space the frontend reads from a backend.
pub const MAX_CONFIG_SIZE: u32 = 256;

/// Protocol features the frontend uses when the backend offers them.
fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Errors while connecting to a backend.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket could not be reached.
    #[error("Cannot connect to vhost-user backend at {0}")]
    Connect(PathBuf, #[source] vhost::Error),
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

/// A virtio device served by a vhost-user backend process.
pub struct VhostUserDevice {
    frontend: Frontend,
    ram: Arc<GuestRam>,
    socket: PathBuf,
    virtio_id: u32,
    num_queues: usize,
    queue_size: u16,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    inflight: Option<(VhostUserInflight, File)>,
    started: Vec<usize>,
}

impl VhostUserDevice {
    /// Connects to the backend and runs the initial negotiation.
    pub fn connect(opts: &VhostUserOptions, ram: Arc<GuestRam>) -> Result<Self, ConnectError> {
        let path = opts.socket.clone();
        let fail = |what: &'static str| {
            let p = path.clone();
            move |e| ConnectError::Message(what, p, e)
        };
        let mut fe = Frontend::connect(&path, MAX_QUEUES as u64)
            .map_err(|e| ConnectError::Connect(path.clone(), e))?;
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
        let have = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(fail("GET_QUEUE_NUM"))?
        } else {
            1
        };
        let want = opts
            .queues
            .unwrap_or_else(|| usize::try_from(have).unwrap_or(MAX_QUEUES).min(MAX_QUEUES));
        if want == 0 || want > MAX_QUEUES || (want as u64) > have {
            return Err(ConnectError::Queues { path, have, want });
        }
        let mut config = Vec::new();
        let size = opts.config_size.min(MAX_CONFIG_SIZE);
        if size > 0 && protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let buf = vec![0u8; size as usize];
            let (_, payload) = fe
                .get_config(0, size, VhostUserConfigFlags::empty(), &buf)
                .map_err(fail("GET_CONFIG"))?;
            config = payload;
        }
        log::info!(
            "vhost-user device type {} at {}: features {features:#x}, protocol {:#x}, {want} queue(s)",
            opts.virtio_id,
            path.display(),
            protocol.bits()
        );
        Ok(VhostUserDevice {
            frontend: fe,
            ram,
            socket: path,
            virtio_id: opts.virtio_id,
            num_queues: want,
            queue_size: opts.queue_size,
            backend_features: features,
            protocol,
            config,
            inflight: None,
            started: Vec::new(),
        })
    }

    /// The backend's socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Protocol features in use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Whether an inflight area was negotiated at the last activation.
    pub fn has_inflight(&self) -> bool {
        self.inflight.is_some()
    }

    fn protocol_acked(&self) -> bool {
        self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    fn vring_config(&self, q: &ActiveQueue<'_>) -> Result<VringConfigData, DeviceError> {
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

    fn setup_inflight(&mut self) -> Result<(), DeviceError> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Ok(());
        }
        if self.inflight.is_none() {
            let nq = u16::try_from(self.num_queues)
                .map_err(|_| DeviceError::NoSuchQueue(self.num_queues))?;
            let req = VhostUserInflight::new(0, 0, nq, self.queue_size);
            let got = msg("GET_INFLIGHT_FD", self.frontend.get_inflight_fd(&req))?;
            self.inflight = Some(got);
        }
        if let Some((info, file)) = &self.inflight {
            msg(
                "SET_INFLIGHT_FD",
                self.frontend.set_inflight_fd(info, file.as_raw_fd()),
            )?;
        }
        Ok(())
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
        self.backend_features & !(VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o).copied())
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
        if end > self.config.len() || !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            log::debug!("config write at {offset:#x} ignored");
            return;
        }
        match self
            .frontend
            .set_config(off, VhostUserConfigFlags::WRITABLE, data)
        {
            Ok(()) => {
                let start = end - data.len();
                self.config[start..end].copy_from_slice(data);
            }
            Err(e) => log::warn!("{}: SET_CONFIG failed: {e}", self.socket.display()),
        }
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), DeviceError> {
        let mut acked = features & self.features();
        if self.protocol_acked() {
            acked |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        let configs = queues
            .iter()
            .map(|q| {
                if q.index >= self.num_queues {
                    return Err(DeviceError::NoSuchQueue(q.index));
                }
                self.vring_config(q)
            })
            .collect::<Result<Vec<_>, _>>()?;
        msg("SET_FEATURES", self.frontend.set_features(acked))?;
        msg(
            "SET_MEM_TABLE",
            self.frontend.set_mem_table(&self.ram.vhost_regions()),
        )?;
        for q in queues {
            msg(
                "SET_VRING_NUM",
                self.frontend.set_vring_num(q.index, q.size),
            )?;
        }
        self.setup_inflight()?;
        self.started.clear();
        for (q, cfg) in queues.iter().zip(configs.iter()) {
            msg("SET_VRING_ADDR", self.frontend.set_vring_addr(q.index, cfg))?;
            msg("SET_VRING_BASE", self.frontend.set_vring_base(q.index, 0))?;
            msg(
                "SET_VRING_CALL",
                self.frontend.set_vring_call(q.index, q.call),
            )?;
            msg(
                "SET_VRING_KICK",
                self.frontend.set_vring_kick(q.index, q.kick),
            )?;
            if self.protocol_acked() {
                msg(
                    "SET_VRING_ENABLE",
                    self.frontend.set_vring_enable(q.index, true),
                )?;
            }
            self.started.push(q.index);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        let started = std::mem::take(&mut self.started);
        let mut first_err = None;
        for i in started {
            if self.protocol_acked()
                && let Err(e) = self.frontend.set_vring_enable(i, false)
            {
                first_err.get_or_insert(DeviceError::Vhost("SET_VRING_ENABLE", e));
            }
            match self.frontend.get_vring_base(i) {
                Ok(base) => log::debug!("queue {i} stopped at avail index {base}"),
                Err(e) => {
                    first_err.get_or_insert(DeviceError::Vhost("GET_VRING_BASE", e));
                }
            }
        }
        // A fresh driver starts from index 0: the old inflight area no longer applies.
        self.inflight = None;
        first_err.map_or(Ok(()), Err)
    }
}
