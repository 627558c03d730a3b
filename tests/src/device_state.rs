//! Moving a device's state the way a frontend does it on a swap (vhost-user
//! DEVICE_STATE) and on a restart after a crash (the inflight area), on top
//! of the kit's [`Device`].
//!
//! A graceful swap, as `bulkhead-vmm` does it:
//! 1. on the old daemon, stop every ring (SET_VRING_ENABLE 0, GET_VRING_BASE)
//!    and keep the bases it reports ([`stop_all`]);
//! 2. SET_DEVICE_STATE_FD(SAVE, STOPPED) with the write end of a pipe, read
//!    the other end to its end, CHECK_DEVICE_STATE ([`save`]);
//! 3. bring the new daemon up with the same memory, rings, bases and
//!    inflight area, and before any ring starts SET_DEVICE_STATE_FD(LOAD,
//!    STOPPED) with the read end of a pipe, write the blob, close, then
//!    CHECK_DEVICE_STATE ([`bring_up`]).
//!
//! After a crash there is no old daemon: [`bring_up`] without a blob hands
//! the new daemon the inflight area (bases: the used index), whose state
//! section holds the last state the old one wrote.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserHeaderFlag, VhostUserInflight,
    VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};

use crate::frontend::{
    Device, FrontendError, Inflight, Options, Parts, VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::memory::GuestMemory;
use crate::virtq::VirtQueue;

/// How long the kit waits for a state transfer's end of file.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors moving device state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vhost-user message failed.
    #[error("Frontend")]
    Frontend(#[from] FrontendError),
    /// The backend refused the transfer or reported a failed one.
    #[error("{0} refused")]
    Refused(&'static str, #[source] vhost::Error),
    /// The pipe failed or timed out.
    #[error("State pipe")]
    Io(#[from] io::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, StateError>;

/// `opts` with DEVICE_STATE among the protocol features the frontend acks.
pub fn with_device_state(mut opts: Options) -> Options {
    opts.protocol_features |= VhostUserProtocolFeatures::DEVICE_STATE;
    opts
}

fn vu<T>(what: &'static str, r: vhost::Result<T>) -> Result<T> {
    r.map_err(|e| FrontendError::Vhost(what, e).into())
}

fn pipe() -> io::Result<(File, File)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh fds we own.
    Ok(unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) })
}

/// Stops every ring (SET_VRING_ENABLE 0, GET_VRING_BASE); returns the
/// bases, as a frontend on the `vhost` crate sends them back: 16 bits (a
/// packed ring's avail position and wrap counter; the backend takes the
/// used position to be the same after a stop).
pub fn stop_all(dev: &mut Device) -> Result<Vec<u16>> {
    let mut bases = Vec::with_capacity(dev.queues.len());
    for i in 0..dev.queues.len() {
        let b = dev.stop_queue(i)?;
        let packed = dev.queues.get(i).is_some_and(|q| q.is_packed());
        bases.push(if packed {
            b as u16
        } else {
            u16::try_from(b).unwrap_or(u16::MAX)
        });
    }
    Ok(bases)
}

/// Asks the backend for its state (rings stopped first: see [`stop_all`]).
pub fn save(fe: &Frontend) -> Result<Vec<u8>> {
    let (mut rd, wr) = pipe()?;
    let returned = fe
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(wr),
        )
        .map_err(|e| StateError::Refused("SET_DEVICE_STATE_FD(SAVE)", e))?;
    if let Some(f) = returned {
        rd = f;
    }
    let blob = read_to_end(&mut rd, TRANSFER_TIMEOUT)?;
    fe.check_device_state()
        .map_err(|e| StateError::Refused("CHECK_DEVICE_STATE", e))?;
    Ok(blob)
}

fn read_to_end(rd: &mut File, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no end of file"));
        }
        let mut p = libc::pollfd {
            fd: rd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(1000) as libc::c_int;
        // SAFETY: poll on one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, ms) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if p.revents == 0 {
            continue;
        }
        match rd.read(&mut buf)? {
            0 => return Ok(out),
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Hands `blob` to the backend (rings not started yet); the error says
/// whether SET_DEVICE_STATE_FD or CHECK_DEVICE_STATE failed.
pub fn load(fe: &Frontend, blob: &[u8]) -> Result<()> {
    let (rd, mut wr) = pipe()?;
    let returned = fe
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(rd),
        )
        .map_err(|e| StateError::Refused("SET_DEVICE_STATE_FD(LOAD)", e))?;
    if let Some(f) = returned {
        wr = f;
    }
    // The backend reads in its own thread: a blob larger than the pipe is fine.
    let r = wr.write_all(blob);
    drop(wr);
    if let Err(e) = r
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        return Err(e.into());
    }
    fe.check_device_state()
        .map_err(|e| StateError::Refused("CHECK_DEVICE_STATE", e))
}

/// What survives of the old connection for [`bring_up`]: memory, rings with
/// their driver state, the inflight area, and each ring's base (from
/// GET_VRING_BASE on a swap, the used index after a crash).
pub struct Carried {
    /// Memory, rings and inflight area.
    pub parts: Parts,
    /// Next avail index per ring.
    pub bases: Vec<u16>,
}

impl Carried {
    /// After a crash: the bases are the rings' used indexes, as QEMU and
    /// `bulkhead-vmm` restore them (a packed ring: the driver's used
    /// position, which the backend's inflight record overrides).
    pub fn after_crash(parts: Parts) -> Result<Self> {
        let bases = parts
            .queues
            .iter()
            .map(|q| q.vring_base())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(FrontendError::Virtq)?;
        Ok(Carried { parts, bases })
    }
}

/// Connects to `socket` and brings the device up as [`Device::connect`] and
/// [`Device::reconnect`] do, with the pieces `carried` over (or fresh
/// ones), and with `state` loaded through DEVICE_STATE before any ring
/// starts. Loading fails the bring-up when the backend refuses the state.
pub fn bring_up(
    socket: &Path,
    opts: &Options,
    carried: Option<Carried>,
    state: Option<&[u8]>,
) -> Result<Device> {
    let (dev, loaded) = bring_up_loading(socket, opts, carried, state)?;
    loaded?;
    Ok(dev)
}

/// Like [`bring_up`], but goes on when the backend refuses the state (a
/// frontend that starts the device anyway), and returns how the load went.
pub fn bring_up_loading(
    socket: &Path,
    opts: &Options,
    carried: Option<Carried>,
    state: Option<&[u8]>,
) -> Result<(Device, Result<()>)> {
    bring_up_with(socket, opts, carried, state, false)
}

/// Like [`bring_up_loading`], in a live migration's order as QEMU 10 keeps
/// it on the destination: the state goes to the backend (SET_DEVICE_STATE_FD
/// LOAD, CHECK_DEVICE_STATE) right after the protocol features, before
/// SET_FEATURES and everything that starts the device.
pub fn bring_up_migrating(
    socket: &Path,
    opts: &Options,
    carried: Option<Carried>,
    state: Option<&[u8]>,
) -> Result<(Device, Result<()>)> {
    bring_up_with(socket, opts, carried, state, true)
}

fn bring_up_with(
    socket: &Path,
    opts: &Options,
    carried: Option<Carried>,
    state: Option<&[u8]>,
    load_first: bool,
) -> Result<(Device, Result<()>)> {
    let (mem, queues, inflight, bases) = match carried {
        Some(c) => (
            c.parts.mem,
            Some(c.parts.queues),
            c.parts.inflight,
            Some(c.bases),
        ),
        None => (
            Arc::new(
                GuestMemory::with_regions_sealable(&[(0, opts.mem_size)], opts.sealable_memory)
                    .map_err(FrontendError::Memory)?,
            ),
            None,
            None,
            None,
        ),
    };
    let mut fe = vu("connect", Frontend::connect(socket, 1))?;
    vu("SET_OWNER", fe.set_owner())?;
    let offered = vu("GET_FEATURES", fe.get_features())?;
    if offered & VIRTIO_F_VERSION_1 == 0 || offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
        return Err(FrontendError::MissingFeature("VERSION_1 or PROTOCOL_FEATURES").into());
    }
    let offered_protocol = vu("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
    let acked_protocol = offered_protocol & opts.protocol_features;
    vu(
        "SET_PROTOCOL_FEATURES",
        fe.set_protocol_features(acked_protocol),
    )?;
    if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let queue_num = if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
        vu("GET_QUEUE_NUM", fe.get_queue_num())?
    } else {
        1
    };
    let early = match state {
        Some(blob) if load_first => Some(load(&fe, blob)),
        _ => None,
    };
    let acked = offered & (opts.features | VHOST_USER_F_PROTOCOL_FEATURES) & !VHOST_F_LOG_ALL;
    vu("SET_FEATURES", fe.set_features(acked))?;
    vu("SET_MEM_TABLE", fe.set_mem_table(&mem.region_infos()))?;
    let mut queues = match queues {
        Some(q) => q,
        None => {
            let n = opts.num_queues.unwrap_or(queue_num as usize);
            (0..n)
                .map(|_| VirtQueue::new(mem.clone(), opts.queue_size))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(FrontendError::Virtq)?
        }
    };
    if queues.len() as u64 > queue_num {
        return Err(FrontendError::TooManyQueues {
            have: queue_num,
            want: queues.len(),
        }
        .into());
    }
    let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
    for (i, q) in queues.iter_mut().enumerate() {
        q.set_event_idx(event_idx);
        vu("SET_VRING_NUM", fe.set_vring_num(i, q.size()))?;
    }
    let inflight =
        if opts.inflight && acked_protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            let inf = match inflight {
                Some(inf) => inf,
                None => {
                    let qsize = queues.first().map(|q| q.size()).unwrap_or(opts.queue_size);
                    let req = VhostUserInflight::new(0, 0, queues.len() as u16, qsize);
                    let (info, file) = vu("GET_INFLIGHT_FD", fe.get_inflight_fd(&req))?;
                    Inflight { info, file }
                }
            };
            vu(
                "SET_INFLIGHT_FD",
                fe.set_inflight_fd(&inf.info, inf.file.as_raw_fd()),
            )?;
            Some(inf)
        } else {
            None
        };
    let loaded = match (early, state) {
        (Some(r), _) => r,
        (None, Some(blob)) => load(&fe, blob),
        (None, None) => Ok(()),
    };
    for (i, q) in queues.iter().enumerate() {
        let a = q.addrs();
        let cfg = VringConfigData {
            queue_max_size: q.size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: mem.host_addr(a.desc).map_err(FrontendError::Memory)?,
            used_ring_addr: mem.host_addr(a.used).map_err(FrontendError::Memory)?,
            avail_ring_addr: mem.host_addr(a.avail).map_err(FrontendError::Memory)?,
            log_addr: None,
        };
        vu("SET_VRING_ADDR", fe.set_vring_addr(i, &cfg))?;
        let base = match bases.as_ref().and_then(|b| b.get(i)) {
            Some(&b) => b,
            None => q.used_idx().map_err(FrontendError::Virtq)?,
        };
        vu("SET_VRING_BASE", fe.set_vring_base(i, base))?;
        vu("SET_VRING_CALL", fe.set_vring_call(i, q.call_fd()))?;
        vu("SET_VRING_KICK", fe.set_vring_kick(i, q.kick_fd()))?;
        vu("SET_VRING_ENABLE", fe.set_vring_enable(i, true))?;
    }
    let dev = Device {
        frontend: fe,
        mem,
        queues,
        offered_features: offered,
        acked_features: acked,
        offered_protocol,
        acked_protocol,
        queue_num,
        inflight,
    };
    Ok((dev, loaded))
}

/// Takes memory, rings and inflight area out of `dev` (its connection stays
/// open until `dev` is replaced or dropped).
pub fn take_parts(dev: &mut Device) -> Parts {
    Parts {
        mem: dev.mem.clone(),
        queues: std::mem::take(&mut dev.queues),
        inflight: dev.inflight.take(),
    }
}

/// A graceful swap of `dev` to the daemon at `socket`: stop every ring,
/// save, bring the new daemon up with the state, then close the old
/// connection; returns the blob that moved.
pub fn swap(dev: &mut Device, socket: &Path, opts: &Options) -> Result<Vec<u8>> {
    let bases = stop_all(dev)?;
    let blob = save(&dev.frontend)?;
    let carried = Carried {
        parts: take_parts(dev),
        bases,
    };
    *dev = bring_up(socket, opts, Some(carried), Some(&blob))?;
    Ok(blob)
}

/// What a frontend does after its daemon died: connects to the daemon now
/// at `socket` and replays everything, with the same inflight area (whose
/// state section the dead daemon kept current) and the used indexes as bases.
pub fn reconnect_after_crash(dev: &mut Device, socket: &Path, opts: &Options) -> Result<()> {
    let carried = Carried::after_crash(take_parts(dev))?;
    *dev = bring_up(socket, opts, Some(carried), None)?;
    Ok(())
}
