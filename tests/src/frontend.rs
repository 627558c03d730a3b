//! A vhost-user frontend built on the `vhost` crate: connects to a backend socket,
//! negotiates the features a test chooses, hands over guest memory and rings, and
//! keeps the pieces (memory, queues, inflight fd) so a test can reconnect with them.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::memory::{GuestMemory, MemoryError};
use crate::virtq::{VirtQueue, VirtqError};

pub use bulkhead_spec::VIRTIO_F_VERSION_1;
pub use bulkhead_spec::ring::{
    VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
/// vhost-user's bits: protocol features negotiated; dirty logging (acked
/// by the kit only while [`Device::start_dirty_log`] runs a migration's log).
pub use bulkhead_spec::vhost_user::{VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES};

/// Device-type-specific feature bits (0..=23), all acceptable by default.
pub const DEVICE_FEATURES: u64 = (1 << 24) - 1;

/// Errors from the frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The backend does not offer a feature the test requires.
    #[error("Backend lacks feature {0}")]
    MissingFeature(&'static str),
    /// Guest memory failed.
    #[error("Guest memory")]
    Memory(#[from] MemoryError),
    /// More queues requested than the backend has.
    #[error("Backend has {have} queues, {want} requested")]
    TooManyQueues {
        /// Queues the backend reported.
        have: u64,
        /// Queues the test asked for.
        want: usize,
    },
    /// A vhost-user message failed; the string names it.
    #[error("{0} failed")]
    Vhost(&'static str, #[source] vhost::Error),
    /// Creating a queue failed.
    #[error("Virtqueue")]
    Virtq(#[from] VirtqError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, FrontendError>;

fn vu<T>(what: &'static str, r: vhost::Result<T>) -> Result<T> {
    r.map_err(|e| FrontendError::Vhost(what, e))
}

/// What a test wants negotiated.
#[derive(Clone, Debug)]
pub struct Options {
    /// virtio features the driver is willing to ack (ANDed with the offer); by default
    /// the device bits, INDIRECT_DESC, EVENT_IDX and VERSION_1 (never legacy or packed: see [`Options::packed`]).
    pub features: u64,
    /// Protocol features the frontend is willing to ack (ANDed with the offer).
    pub protocol_features: VhostUserProtocolFeatures,
    /// Queues to set up; `None` means all the backend has.
    pub num_queues: Option<usize>,
    /// Entries per queue.
    pub queue_size: u16,
    /// Guest RAM size for a fresh connection.
    pub mem_size: u64,
    /// Negotiate GET/SET_INFLIGHT_FD when the backend offers INFLIGHT_SHMFD.
    pub inflight: bool,
    /// Guest RAM in a memfd that allows sealing, as QEMU's (the default); or
    /// one that does not.
    pub sealable_memory: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            features: DEVICE_FEATURES
                | VIRTIO_RING_F_INDIRECT_DESC
                | VIRTIO_RING_F_EVENT_IDX
                | VIRTIO_F_VERSION_1,
            protocol_features: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::RESET_DEVICE,
            num_queues: None,
            queue_size: 128,
            mem_size: 64 << 20,
            inflight: true,
            sealable_memory: true,
        }
    }
}

impl Options {
    /// Sets or clears virtio feature `bit` in the driver's acceptable set.
    pub fn feature(mut self, bit: u64, on: bool) -> Self {
        if on {
            self.features |= bit;
        } else {
            self.features &= !bit;
        }
        self
    }

    /// Accepts or refuses EVENT_IDX.
    pub fn event_idx(self, on: bool) -> Self {
        self.feature(VIRTIO_RING_F_EVENT_IDX, on)
    }

    /// Accepts or refuses the packed ring layout (VIRTIO_F_RING_PACKED):
    /// when the backend offers it, the queues are packed rings.
    pub fn packed(self, on: bool) -> Self {
        self.feature(VIRTIO_F_RING_PACKED, on)
    }

    /// Accepts or refuses INDIRECT_DESC.
    pub fn indirect(self, on: bool) -> Self {
        self.feature(VIRTIO_RING_F_INDIRECT_DESC, on)
    }

    /// Sets the number of queues to bring up.
    pub fn queues(mut self, n: usize) -> Self {
        self.num_queues = Some(n);
        self
    }

    /// Sets the queue size.
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = n;
        self
    }

    /// Acks LOG_SHMFD when offered, so [`Device::start_dirty_log`] can hand
    /// the backend a log as QEMU does for a live migration.
    pub fn dirty_log(mut self) -> Self {
        self.protocol_features |= VhostUserProtocolFeatures::LOG_SHMFD;
        self
    }
}

/// Bytes of guest memory one bit of a dirty log covers.
pub const LOG_PAGE_SIZE: u64 = 4096;

/// The dirty-page bitmap a frontend shares with the backend (SET_LOG_BASE),
/// sized as QEMU sizes it: whole u64 words, one bit per 4 KiB page.
pub struct DirtyLog {
    /// The memfd holding the bitmap.
    pub file: File,
    /// Bytes of bitmap.
    pub size: u64,
}

impl DirtyLog {
    /// A clear log covering guest memory up to `mem_end`.
    pub fn new(mem_end: u64) -> Result<Self> {
        let size = mem_end.div_ceil(LOG_PAGE_SIZE).div_ceil(64) * 8;
        let file = crate::memory::create_memfd(size.max(8), true)?;
        Ok(DirtyLog {
            file,
            size: size.max(8),
        })
    }

    /// The pages whose bit is set, in order.
    pub fn pages(&self) -> Vec<u64> {
        let mut buf = vec![0u8; self.size as usize];
        if std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut buf, 0).is_err() {
            return Vec::new();
        }
        (0..self.size * 8)
            .filter(|p| buf[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }

    /// Clears every bit (as the frontend does after each pass).
    pub fn clear(&self) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, &vec![0u8; self.size as usize], 0)
    }
}

/// The pages `[gpa, gpa + len)` touches.
pub fn pages_of(gpa: u64, len: u64) -> Vec<u64> {
    if len == 0 {
        return Vec::new();
    }
    (gpa / LOG_PAGE_SIZE..=(gpa + len - 1) / LOG_PAGE_SIZE).collect()
}

/// The inflight-tracking area the backend handed out, kept for a reconnect.
pub struct Inflight {
    /// The GET_INFLIGHT_FD reply (size, offset, queues, queue size).
    pub info: VhostUserInflight,
    /// The shared-memory file.
    pub file: File,
}

impl Inflight {
    /// Bytes of the queues' part of the area (the spec's split layout:
    /// per queue a 16-byte header and 16 bytes per entry, 64-byte
    /// aligned): all an older daemon's area holds, before any state
    /// section or packed descriptor tables.
    pub fn queues_len(&self) -> u64 {
        let per_queue = (16 + 16 * u64::from(self.info.queue_size)).div_ceil(64) * 64;
        per_queue * u64::from(self.info.num_queues)
    }

    /// Entries the area marks in flight, all queues together: split heads,
    /// or packed buffer ids (a packed ring's record keeps its mark in the
    /// same byte, the first of each 16-byte entry).
    pub fn marked(&self) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut part = vec![0u8; self.queues_len() as usize];
        self.file.read_exact_at(&mut part, self.info.mmap_offset)?;
        let per_queue = part.len() / usize::from(self.info.num_queues.max(1));
        let entries = usize::from(self.info.queue_size);
        Ok(part
            .chunks(per_queue.max(1))
            .map(|q| (0..entries).filter(|&e| q[16 + 16 * e] != 0).count())
            .sum())
    }
}

/// A connected, configured vhost-user device with its guest memory and queues.
pub struct Device {
    /// The `vhost` crate frontend (send further messages through it).
    pub frontend: Frontend,
    /// Guest RAM shared with the backend.
    pub mem: Arc<GuestMemory>,
    /// The rings, one per enabled queue.
    pub queues: Vec<VirtQueue>,
    /// virtio features the backend offered.
    pub offered_features: u64,
    /// virtio features acked with SET_FEATURES.
    pub acked_features: u64,
    /// Protocol features the backend offered.
    pub offered_protocol: VhostUserProtocolFeatures,
    /// Protocol features acked with SET_PROTOCOL_FEATURES.
    pub acked_protocol: VhostUserProtocolFeatures,
    /// Queue count from GET_QUEUE_NUM (1 without MQ).
    pub queue_num: u64,
    /// Inflight area, when negotiated.
    pub inflight: Option<Inflight>,
}

/// Pieces of a [`Device`] that survive a disconnect, for [`Device::reconnect`].
pub struct Parts {
    /// Guest RAM.
    pub mem: Arc<GuestMemory>,
    /// Rings with their driver state.
    pub queues: Vec<VirtQueue>,
    /// Inflight area, if any.
    pub inflight: Option<Inflight>,
}

impl Device {
    /// Connects to `socket` and brings the device up with fresh memory and queues.
    pub fn connect(socket: &Path, opts: &Options) -> Result<Self> {
        let mem = Arc::new(GuestMemory::with_regions_sealable(
            &[(0, opts.mem_size)],
            opts.sealable_memory,
        )?);
        Self::bring_up(socket, opts, mem, None, None)
    }

    /// Connects again and replays memory, rings (at their current used idx) and inflight fd.
    pub fn reconnect(socket: &Path, opts: &Options, parts: Parts) -> Result<Self> {
        Self::bring_up(socket, opts, parts.mem, Some(parts.queues), parts.inflight)
    }

    /// Closes the connection, keeping memory, queues and the inflight area.
    pub fn disconnect(self) -> Parts {
        Parts {
            mem: self.mem,
            queues: self.queues,
            inflight: self.inflight,
        }
    }

    /// Whether virtio feature `bit` was acked.
    pub fn has_feature(&self, bit: u64) -> bool {
        self.acked_features & bit != 0
    }

    fn bring_up(
        socket: &Path,
        opts: &Options,
        mem: Arc<GuestMemory>,
        queues: Option<Vec<VirtQueue>>,
        inflight: Option<Inflight>,
    ) -> Result<Self> {
        let mut fe = vu("connect", Frontend::connect(socket, 1))?;
        vu("SET_OWNER", fe.set_owner())?;
        let offered = vu("GET_FEATURES", fe.get_features())?;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(FrontendError::MissingFeature("VERSION_1"));
        }
        let mut offered_protocol = VhostUserProtocolFeatures::empty();
        let mut acked_protocol = VhostUserProtocolFeatures::empty();
        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            offered_protocol = vu("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
            acked_protocol = offered_protocol & opts.protocol_features;
            vu(
                "SET_PROTOCOL_FEATURES",
                fe.set_protocol_features(acked_protocol),
            )?;
            if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let queue_num = if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            vu("GET_QUEUE_NUM", fe.get_queue_num())?
        } else {
            1
        };
        let acked = offered & (opts.features | VHOST_USER_F_PROTOCOL_FEATURES) & !VHOST_F_LOG_ALL;
        vu("SET_FEATURES", fe.set_features(acked))?;
        vu("SET_MEM_TABLE", fe.set_mem_table(&mem.region_infos()))?;

        let mut queues = match queues {
            Some(q) => q,
            None => {
                let n = opts.num_queues.unwrap_or(queue_num as usize);
                let packed = acked & VIRTIO_F_RING_PACKED != 0;
                (0..n)
                    .map(|_| {
                        if packed {
                            VirtQueue::new_packed(mem.clone(), opts.queue_size)
                        } else {
                            VirtQueue::new(mem.clone(), opts.queue_size)
                        }
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?
            }
        };
        if queues.len() as u64 > queue_num {
            return Err(FrontendError::TooManyQueues {
                have: queue_num,
                want: queues.len(),
            });
        }
        let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
        for (i, q) in queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            vu("SET_VRING_NUM", fe.set_vring_num(i, q.size()))?;
        }

        let inflight = if opts.inflight
            && acked_protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
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

        for (i, q) in queues.iter().enumerate() {
            let a = q.addrs();
            let cfg = VringConfigData {
                queue_max_size: q.size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: mem.host_addr(a.desc)?,
                used_ring_addr: mem.host_addr(a.used)?,
                avail_ring_addr: mem.host_addr(a.avail)?,
                log_addr: None,
            };
            vu("SET_VRING_ADDR", fe.set_vring_addr(i, &cfg))?;
            vu("SET_VRING_BASE", fe.set_vring_base(i, q.vring_base()?))?;
            vu("SET_VRING_CALL", fe.set_vring_call(i, q.call_fd()))?;
            vu("SET_VRING_KICK", fe.set_vring_kick(i, q.kick_fd()))?;
            if acked & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                vu("SET_VRING_ENABLE", fe.set_vring_enable(i, true))?;
            }
        }

        Ok(Device {
            frontend: fe,
            mem,
            queues,
            offered_features: offered,
            acked_features: acked,
            offered_protocol,
            acked_protocol,
            queue_num,
            inflight,
        })
    }

    /// Reads `len` bytes of device config space at `offset` (GET_CONFIG).
    pub fn get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; len as usize];
        let (_, payload) = vu(
            "GET_CONFIG",
            self.frontend
                .get_config(offset, len, VhostUserConfigFlags::empty(), &buf),
        )?;
        Ok(payload)
    }

    /// Writes device config space at `offset` (SET_CONFIG).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        vu(
            "SET_CONFIG",
            self.frontend
                .set_config(offset, VhostUserConfigFlags::WRITABLE, data),
        )
    }

    /// Starts dirty logging as QEMU does when a live migration begins:
    /// SET_LOG_BASE with a fresh log, SET_FEATURES with `VHOST_F_LOG_ALL`,
    /// then SET_VRING_ADDR again for each queue with `VHOST_VRING_F_LOG`
    /// and the used ring's guest address as its log address (queues keep
    /// running). Needs LOG_SHMFD acked ([`Options::dirty_log`]).
    pub fn start_dirty_log(&mut self) -> Result<DirtyLog> {
        if !self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::LOG_SHMFD)
        {
            return Err(FrontendError::MissingFeature("LOG_SHMFD"));
        }
        if self.offered_features & VHOST_F_LOG_ALL == 0 {
            return Err(FrontendError::MissingFeature("VHOST_F_LOG_ALL"));
        }
        let end = self
            .mem
            .layout()
            .iter()
            .map(|r| r.guest_addr + r.size)
            .max()
            .unwrap_or(0);
        let log = DirtyLog::new(end)?;
        let region = VhostUserDirtyLogRegion {
            mmap_size: log.size,
            mmap_offset: 0,
            mmap_handle: log.file.as_raw_fd(),
        };
        vu("SET_LOG_BASE", self.frontend.set_log_base(0, Some(region)))?;
        self.set_logging(true)?;
        Ok(log)
    }

    /// Ends dirty logging (a migration cancelled, or the source resuming):
    /// SET_FEATURES without `VHOST_F_LOG_ALL`, rings without the log flag.
    pub fn stop_dirty_log(&mut self) -> Result<()> {
        self.set_logging(false)
    }

    fn set_logging(&mut self, on: bool) -> Result<()> {
        let features = if on {
            self.acked_features | VHOST_F_LOG_ALL
        } else {
            self.acked_features & !VHOST_F_LOG_ALL
        };
        vu("SET_FEATURES", self.frontend.set_features(features))?;
        for (i, q) in self.queues.iter().enumerate() {
            let a = q.addrs();
            let cfg = VringConfigData {
                queue_max_size: q.size(),
                queue_size: q.size(),
                flags: u32::from(on),
                desc_table_addr: self.mem.host_addr(a.desc)?,
                used_ring_addr: self.mem.host_addr(a.used)?,
                avail_ring_addr: self.mem.host_addr(a.avail)?,
                log_addr: on.then_some(a.used),
            };
            vu("SET_VRING_ADDR", self.frontend.set_vring_addr(i, &cfg))?;
        }
        Ok(())
    }

    /// Starts queue `i` again after [`Device::stop_queue`], at `base` (what
    /// GET_VRING_BASE returned): its addresses, base, eventfds, enabled, as
    /// a frontend does when it resumes a stopped device (a migration that
    /// failed resumes the source).
    pub fn start_queue(&mut self, i: usize, base: u16) -> Result<()> {
        let q = &self.queues[i];
        let a = q.addrs();
        let cfg = VringConfigData {
            queue_max_size: q.size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: self.mem.host_addr(a.desc)?,
            used_ring_addr: self.mem.host_addr(a.used)?,
            avail_ring_addr: self.mem.host_addr(a.avail)?,
            log_addr: None,
        };
        vu("SET_VRING_ADDR", self.frontend.set_vring_addr(i, &cfg))?;
        vu("SET_VRING_BASE", self.frontend.set_vring_base(i, base))?;
        vu(
            "SET_VRING_CALL",
            self.frontend.set_vring_call(i, q.call_fd()),
        )?;
        vu(
            "SET_VRING_KICK",
            self.frontend.set_vring_kick(i, q.kick_fd()),
        )?;
        if self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            vu("SET_VRING_ENABLE", self.frontend.set_vring_enable(i, true))?;
        }
        Ok(())
    }

    /// Stops queue `i` (SET_VRING_ENABLE 0, GET_VRING_BASE) and returns the device's avail index.
    pub fn stop_queue(&mut self, i: usize) -> Result<u32> {
        if self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            vu("SET_VRING_ENABLE", self.frontend.set_vring_enable(i, false))?;
        }
        vu("GET_VRING_BASE", self.frontend.get_vring_base(i))
    }
}

/// Largest reply payload [`RawConnection::recv`] accepts.
const RAW_MAX_PAYLOAD: usize = 64 << 10;

/// A reply read by [`RawConnection::recv`].
#[derive(Debug)]
pub struct RawReply {
    /// Request code echoed by the backend.
    pub request: u32,
    /// Header flags.
    pub flags: u32,
    /// Payload bytes (the header's size field says how many).
    pub payload: Vec<u8>,
    /// A file descriptor that came with the reply, if any.
    pub file: Option<File>,
}

/// A raw vhost-user socket: sends any bytes and fds, for malformed-message tests.
pub struct RawConnection {
    sock: UnixStream,
}

impl RawConnection {
    /// Connects a fresh socket to `path` (no messages sent).
    pub fn connect(path: &Path) -> io::Result<Self> {
        Ok(RawConnection {
            sock: UnixStream::connect(path)?,
        })
    }

    /// Shares the socket of an established [`Frontend`], to inject messages mid-session.
    pub fn from_frontend(fe: &Frontend) -> io::Result<Self> {
        // SAFETY: the frontend keeps its socket open for the duration of this call, and
        // the borrowed fd is only used to duplicate it.
        let fd = unsafe { BorrowedFd::borrow_raw(fe.as_raw_fd()) };
        Ok(RawConnection {
            sock: fd.try_clone_to_owned()?.into(),
        })
    }

    /// Sends a message: a header (`request`, `flags` | version 1, payload length) then `payload`.
    pub fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let size = u32::try_from(payload.len()).map_err(io::Error::other)?;
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&(flags | 1).to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(payload);
        self.send_bytes(&msg, fds)
    }

    /// Sends `bytes` verbatim (a lying header, a truncated body) with `fds` attached.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let sent = self.sock.send_with_fds(&[bytes], fds)?;
        if sent != bytes.len() {
            (&self.sock).write_all(&bytes[sent..])?;
        }
        Ok(())
    }

    /// Reads one reply, waiting up to `timeout`; `Ok(None)` when the backend closed the socket.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<RawReply>> {
        self.sock.set_read_timeout(Some(timeout))?;
        let mut hdr = [0u8; 12];
        let (n, file) = self.sock.recv_with_fd(&mut hdr)?;
        if n == 0 {
            return Ok(None);
        }
        if n < hdr.len() {
            (&self.sock).read_exact(&mut hdr[n..])?;
        }
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let size = word(8) as usize;
        if size > RAW_MAX_PAYLOAD {
            return Err(io::Error::other(format!("reply payload {size} too big")));
        }
        let mut payload = vec![0u8; size];
        (&self.sock).read_exact(&mut payload)?;
        Ok(Some(RawReply {
            request: word(0),
            flags: word(4),
            payload,
            file,
        }))
    }

    /// Whether the backend closes the socket within `timeout` (after a fatal message).
    pub fn closed_within(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.recv(left) {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}
