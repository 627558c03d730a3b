//! [`VhostUserDevice`]: a virtio device whose queues a backend process
//! serves; the transport's side of the link.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::connect::Connection;
use super::handle::{BackendHandle, Inner};
use super::replay::{ActiveSetup, Bases, QueueSetup};
use super::*;
use crate::device::{ActiveQueue, VirtioDevice};
use crate::memory::GuestRam;
use bulkhead_spec::ring::VIRTIO_F_RING_PACKED;

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
        // Packed rings (VIRTIO_F_RING_PACKED) pass through when asked for
        // and the backend offers them: the replay sizes and starts them as
        // such.
        let mut guest_features =
            conn.features & !(VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL);
        if !opts.packed {
            guest_features &= !VIRTIO_F_RING_PACKED;
        }
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
            g.vring_config(q, acked & VIRTIO_F_RING_PACKED != 0)?;
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
            Err(e) if is_link_error(&e) || conn.hung_up() => {
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
            && (is_link_error(e) || g.conn.as_ref().is_some_and(|c| c.hung_up()))
        {
            g.lose(error_chain(e));
            let _ = self.handle.wake.write(1);
            return Ok(());
        }
        r
    }
}
