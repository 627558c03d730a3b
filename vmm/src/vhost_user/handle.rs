//! The state of one device's backend link, shared by the transport, the
//! monitor thread and the control socket: reconnection and swap.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vmm_sys_util::eventfd::EventFd;

use super::connect::Connection;
use super::replay::{ActiveSetup, Bases};
use super::{ConnectError, SwapError, error_chain};
use crate::device::DeviceError;
use crate::memory::GuestRam;

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

pub(super) struct Inner {
    pub(super) conn: Option<Connection>,
    pub(super) generation: u64,
    pub(super) socket: PathBuf,
    pub(super) ram: Arc<GuestRam>,
    pub(super) virtio_id: u32,
    pub(super) num_queues: usize,
    pub(super) queue_size: u16,
    pub(super) config_size: u32,
    /// Features offered to the guest (fixed by the first backend).
    pub(super) guest_features: u64,
    pub(super) config: Vec<u8>,
    pub(super) inflight: Option<(VhostUserInflight, File)>,
    pub(super) active: Option<ActiveSetup>,
    pub(super) reconnects: u64,
    pub(super) swaps: u64,
    /// Bytes of device state the last swap moved.
    pub(super) last_swap_state: Option<usize>,
    pub(super) last_error: Option<String>,
}

impl Inner {
    pub(super) fn state(&self) -> LinkState {
        if self.conn.is_some() {
            LinkState::Connected
        } else {
            LinkState::Reconnecting
        }
    }

    /// Drops the connection; the monitor reconnects.
    pub(super) fn lose(&mut self, why: String) {
        if self.conn.take().is_some() {
            log::warn!("{}: backend lost: {why}", self.socket.display());
            self.generation = self.generation.wrapping_add(1);
        }
        self.last_error = Some(why);
    }

    /// Checks that `conn` can serve what the guest already negotiated.
    pub(super) fn check(&self, conn: &Connection) -> Result<(), ConnectError> {
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
}

/// A device's backend state, shared by the transport (through
/// [`VhostUserDevice`]), the monitor thread and the control socket.
pub struct BackendHandle {
    pub(super) id: String,
    pub(super) inner: Mutex<Inner>,
    pub(super) wake: EventFd,
}

impl BackendHandle {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
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
            && c.hung_up()
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
}

impl Inner {
    /// The stopped `old` backend's device state, when it and `new` both
    /// offer DEVICE_STATE; `None` (and a warning where the old one had
    /// state to give) otherwise.
    pub(super) fn take_state(
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

    pub(super) fn finish_swap(&mut self, new: Connection) {
        if !new.config.is_empty() {
            self.config = new.config.clone();
        }
        self.socket = new.path.clone();
        self.conn = Some(new);
        self.generation = self.generation.wrapping_add(1);
        self.swaps += 1;
    }
}
