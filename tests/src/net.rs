//! A virtio-net guest driver on top of [`Device`]: config parsing, the vnet
//! header, receive buffers (mergeable or not), transmit, the control queue,
//! and raw submission of any layout; plus builders and parsers for the
//! frames tests send (ARP, ICMP echo, UDP, TCP), and a launcher for
//! `bulkhead-net` that reads its counters.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::frontend::{Device, FrontendError, Options};
use crate::guest::spawn_daemon;
use crate::memory::MemoryError;
use crate::netns::NetNs;
use crate::process::{ChildGuard, workspace_binary};
use crate::virtq::{Buf, UsedElem, VirtqError};

pub use bulkhead_spec::net::{
    VIRTIO_NET_CTRL_MAC as CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET as CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ as CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX as CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI as CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC as CTRL_RX_PROMISC, VIRTIO_NET_ERR as CTRL_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM as NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE as GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4 as GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6 as GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP as GSO_UDP,
    VIRTIO_NET_OK as CTRL_OK,
};

/// Ack byte value before the device writes it.
pub const ACK_UNTOUCHED: u8 = 0xa5;

/// Default wait for one completion.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from the net driver.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The vhost-user frontend failed.
    #[error("Frontend")]
    Frontend(#[from] FrontendError),
    /// Guest memory failed.
    #[error("Guest memory")]
    Memory(#[from] MemoryError),
    /// The virtqueue failed (full, timeout, eventfd).
    #[error("Virtqueue")]
    Virtq(#[from] VirtqError),
    /// No such queue.
    #[error("No queue {0}")]
    NoQueue(usize),
    /// The device completed a head the driver did not post.
    #[error("Completion for unknown head {0:?}")]
    UnknownHead(UsedElem),
    /// A received packet is inconsistent (num_buffers, lengths).
    #[error("Bad receive: {0}")]
    BadReceive(String),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, NetError>;

/// The virtio-net config space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address.
    pub mac: [u8; 6],
    /// Status (bit 0: link up).
    pub status: u16,
    /// Queue pairs the device has.
    pub max_virtqueue_pairs: u16,
    /// MTU.
    pub mtu: u16,
}

impl NetConfig {
    /// Parses config bytes (little endian); missing bytes read as zero.
    pub fn parse(b: &[u8]) -> Self {
        let le16 = |i: usize| {
            b.get(i..i + 2)
                .map(|s| u16::from_le_bytes([s[0], s[1]]))
                .unwrap_or(0)
        };
        let mut mac = [0u8; 6];
        if let Some(m) = b.get(0..6) {
            mac.copy_from_slice(m);
        }
        NetConfig {
            mac,
            status: le16(6),
            max_virtqueue_pairs: le16(8),
            mtu: le16(10),
        }
    }
}

/// The vnet header (`virtio_net_hdr_mrg_rxbuf`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// Flags (NEEDS_CSUM, DATA_VALID).
    pub flags: u8,
    /// GSO type.
    pub gso_type: u8,
    /// Header length hint.
    pub hdr_len: u16,
    /// GSO segment size.
    pub gso_size: u16,
    /// Checksum start.
    pub csum_start: u16,
    /// Checksum offset from csum_start.
    pub csum_offset: u16,
    /// Buffers of a merged receive.
    pub num_buffers: u16,
}

impl NetHdr {
    /// The first `len` (10 or 12) bytes of the header.
    pub fn to_bytes(&self, len: usize) -> Vec<u8> {
        let mut b = vec![self.flags, self.gso_type];
        for v in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.truncate(len);
        b
    }

    /// Parses 10 or 12 header bytes.
    pub fn parse(b: &[u8]) -> Self {
        let le16 = |i: usize| {
            b.get(i..i + 2)
                .map(|s| u16::from_le_bytes([s[0], s[1]]))
                .unwrap_or(0)
        };
        NetHdr {
            flags: b.first().copied().unwrap_or(0),
            gso_type: b.get(1).copied().unwrap_or(0),
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: le16(10),
        }
    }
}

/// A received packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxPacket {
    /// Its header.
    pub hdr: NetHdr,
    /// The Ethernet frame.
    pub frame: Vec<u8>,
    /// Receive buffers it used.
    pub buffers: usize,
    /// Queue pair it arrived on.
    pub pair: usize,
}

/// A virtio-net driver over a connected vhost-user device.
pub struct NetDriver {
    /// The underlying device (memory, queues, frontend).
    pub dev: Device,
    /// Config space read at connect time.
    pub config: NetConfig,
    /// Queue pairs brought up.
    pub pairs: usize,
    /// Whether a control queue was brought up (the queue after the pairs).
    pub has_ctrl: bool,
    /// Wait for one completion at most this long.
    pub timeout: Duration,
    hdr_len: usize,
    mergeable: bool,
    /// Posted buffers per queue: head -> (guest address, length).
    bufs: Vec<HashMap<u16, (u64, u32)>>,
}

impl NetDriver {
    /// Connects to a vhost-user-net backend and brings up all its queues.
    pub fn connect(socket: &Path, opts: &Options) -> Result<Self> {
        Self::from_device(Device::connect(socket, opts)?)
    }

    /// Wraps a brought-up device (queues: rx0, tx0, ..., ctrl) and reads its config.
    pub fn from_device(mut dev: Device) -> Result<Self> {
        let config = NetConfig::parse(&dev.get_config(0, 12)?);
        let n = dev.queues.len();
        let has_ctrl = dev.has_feature(VIRTIO_NET_F_CTRL_VQ) && n % 2 == 1;
        let pairs = n / 2;
        let hdr_len = if dev.has_feature(crate::frontend::VIRTIO_F_VERSION_1)
            || dev.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        {
            12
        } else {
            10
        };
        let mergeable = dev.has_feature(VIRTIO_NET_F_MRG_RXBUF);
        Ok(NetDriver {
            bufs: (0..n).map(|_| HashMap::new()).collect(),
            dev,
            config,
            pairs,
            has_ctrl,
            timeout: DEFAULT_TIMEOUT,
            hdr_len,
            mergeable,
        })
    }

    /// vnet header length in use (10 or 12).
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }

    /// Whether MRG_RXBUF was negotiated.
    pub fn mergeable(&self) -> bool {
        self.mergeable
    }

    fn queue(&mut self, q: usize) -> Result<&mut crate::virtq::VirtQueue> {
        self.dev.queues.get_mut(q).ok_or(NetError::NoQueue(q))
    }

    /// Posts `count` receive buffers of `len` bytes on pair `pair`, then kicks if needed.
    pub fn post_rx(&mut self, pair: usize, count: usize, len: u32) -> Result<()> {
        let q = 2 * pair;
        for _ in 0..count {
            let gpa = self.dev.mem.alloc(u64::from(len), 64)?;
            let vq = self.queue(q)?;
            let head = vq.add_chain(&[Buf::writable(gpa, len)])?;
            vq.publish(head)?;
            self.bufs[q].insert(head, (gpa, len));
        }
        self.queue(q)?.kick_if_needed()?;
        Ok(())
    }

    /// Receive buffers posted on pair `pair` and not yet used.
    pub fn rx_posted(&self, pair: usize) -> usize {
        self.bufs.get(2 * pair).map_or(0, |b| b.len())
    }

    fn take_buf(&mut self, q: usize, e: UsedElem) -> Result<Vec<u8>> {
        let (gpa, len) = u16::try_from(e.id)
            .ok()
            .and_then(|h| self.bufs[q].remove(&h))
            .ok_or(NetError::UnknownHead(e))?;
        if e.len > len {
            return Err(NetError::BadReceive(format!(
                "used length {} over buffer of {len}",
                e.len
            )));
        }
        let data = self.dev.mem.read_vec(gpa, e.len as usize)?;
        self.dev.mem.free(gpa, u64::from(len));
        Ok(data)
    }

    /// Pops one received packet from pair `pair`, waiting up to `timeout`.
    pub fn recv(&mut self, pair: usize, timeout: Duration) -> Result<Option<RxPacket>> {
        let q = 2 * pair;
        let first = match self.queue(q)?.wait_used(timeout) {
            Ok(e) => e,
            Err(VirtqError::Timeout) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let data = self.take_buf(q, first)?;
        if data.len() < self.hdr_len {
            return Err(NetError::BadReceive(format!(
                "{} bytes, shorter than the header",
                data.len()
            )));
        }
        let hdr = NetHdr::parse(&data[..self.hdr_len]);
        let mut frame = data[self.hdr_len..].to_vec();
        let buffers = if self.mergeable {
            usize::from(hdr.num_buffers)
        } else {
            1
        };
        if buffers == 0 {
            return Err(NetError::BadReceive("num_buffers 0".into()));
        }
        for _ in 1..buffers {
            let timeout = self.timeout;
            let e = self.queue(q)?.wait_used(timeout)?;
            frame.extend(self.take_buf(q, e)?);
        }
        Ok(Some(RxPacket {
            hdr,
            frame,
            buffers,
            pair,
        }))
    }

    /// Waits up to `timeout` for a packet on any pair for which `want` holds; others are dropped.
    pub fn recv_matching(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&RxPacket) -> bool,
    ) -> Result<Option<RxPacket>> {
        let deadline = Instant::now() + timeout;
        loop {
            for pair in 0..self.pairs {
                while let Some(p) = self.recv(pair, Duration::ZERO)? {
                    if want(&p) {
                        return Ok(Some(p));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            if self.pairs == 1 {
                let left = deadline.saturating_duration_since(Instant::now());
                if let Some(p) = self.recv(0, left)?
                    && want(&p)
                {
                    return Ok(Some(p));
                }
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Publishes `bufs` (readable then writable) on queue `q` and kicks; returns the head.
    pub fn submit_raw(&mut self, q: usize, bufs: &[Buf], indirect: bool) -> Result<u16> {
        Ok(self.queue(q)?.submit(bufs, indirect)?)
    }

    /// Waits for the next used element on queue `q`.
    pub fn reap_raw(&mut self, q: usize) -> Result<UsedElem> {
        let t = self.timeout;
        Ok(self.queue(q)?.wait_used(t)?)
    }

    /// Sends the bytes `packet` (header included) on pair `pair` split over `segs` descriptors; waits for it.
    pub fn send_bytes(&mut self, pair: usize, packet: &[u8], segs: usize) -> Result<UsedElem> {
        let q = 2 * pair + 1;
        let gpa = self.dev.mem.alloc_with(packet)?;
        let len = packet.len() as u32;
        let chunk = len.div_ceil(segs.max(1) as u32).max(1);
        let mut bufs = Vec::new();
        let mut off = 0u32;
        while off < len {
            let l = chunk.min(len - off);
            bufs.push(Buf::readable(gpa + u64::from(off), l));
            off += l;
        }
        if bufs.is_empty() {
            bufs.push(Buf::readable(gpa, 0));
        }
        self.submit_raw(q, &bufs, false)?;
        let e = self.reap_raw(q);
        self.dev.mem.free(gpa, packet.len() as u64);
        e
    }

    /// Sends `frame` with header `hdr` on pair `pair` (header and frame in separate descriptors).
    pub fn send(&mut self, pair: usize, hdr: &NetHdr, frame: &[u8]) -> Result<UsedElem> {
        let q = 2 * pair + 1;
        let h = self.dev.mem.alloc_with(&hdr.to_bytes(self.hdr_len))?;
        let f = self.dev.mem.alloc_with(frame)?;
        let bufs = [
            Buf::readable(h, self.hdr_len as u32),
            Buf::readable(f, frame.len() as u32),
        ];
        self.submit_raw(q, &bufs, false)?;
        let e = self.reap_raw(q);
        self.dev.mem.free(h, self.hdr_len as u64);
        self.dev.mem.free(f, frame.len() as u64);
        e
    }

    /// Sends a control command with `data`; returns the ack byte ([`ACK_UNTOUCHED`] if unwritten).
    pub fn ctrl(&mut self, class: u8, cmd: u8, data: &[u8]) -> Result<u8> {
        let mut req = vec![class, cmd];
        req.extend_from_slice(data);
        self.ctrl_raw(&req, 1).map(|(_, ack)| ack)
    }

    /// Sends raw control bytes with `ack_len` writable bytes; returns (used length, last ack byte).
    pub fn ctrl_raw(&mut self, req: &[u8], ack_len: u32) -> Result<(u32, u8)> {
        let q = 2 * self.pairs;
        let r = self
            .dev
            .mem
            .alloc_with(if req.is_empty() { &[0] } else { req })?;
        let a = self.dev.mem.alloc(u64::from(ack_len.max(1)), 64)?;
        self.dev
            .mem
            .fill(a, u64::from(ack_len.max(1)), ACK_UNTOUCHED)?;
        let mut bufs = vec![Buf::readable(r, req.len() as u32)];
        if ack_len > 0 {
            bufs.push(Buf::writable(a, ack_len));
        }
        self.submit_raw(q, &bufs, false)?;
        let e = self.reap_raw(q)?;
        let ack = self
            .dev
            .mem
            .read_vec(a + u64::from(ack_len.max(1)) - 1, 1)?[0];
        self.dev.mem.free(r, req.len().max(1) as u64);
        self.dev.mem.free(a, u64::from(ack_len.max(1)));
        Ok((e.len, ack))
    }
}

/// Ethernet type: IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// Ethernet type: ARP.
pub const ETH_P_ARP: u16 = 0x0806;

/// Internet checksum of `data` starting from `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request from (`mac`, `ip`) for `target`, broadcast.
pub fn arp_request(mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&mac);
    a.extend_from_slice(&ip);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    ethernet([0xff; 6], mac, ETH_P_ARP, &a)
}

/// If `frame` is an ARP reply, its sender (MAC, IP).
pub fn parse_arp_reply(frame: &[u8]) -> Option<([u8; 6], [u8; 4])> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() || frame[20..22] != [0, 2] {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[22..28]);
    let mut ip = [0u8; 4];
    ip.copy_from_slice(&frame[28..32]);
    Some((mac, ip))
}

/// An IPv4 header (no options) for `payload_len` bytes of `proto`, checksummed.
pub fn ipv4_header(src: [u8; 4], dst: [u8; 4], proto: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// Addresses of a test frame: Ethernet and IPv4 source and destination.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source IPv4.
    pub src_ip: [u8; 4],
    /// Destination IPv4.
    pub dst_ip: [u8; 4],
}

/// An ICMP echo request with `payload`.
pub fn icmp_echo(ep: &Endpoints, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = ipv4_header(ep.src_ip, ep.dst_ip, 1, icmp.len());
    ip.extend(icmp);
    ethernet(ep.dst_mac, ep.src_mac, ETH_P_IP, &ip)
}

/// If `frame` is an ICMP echo reply, its (id, seq, payload length).
pub fn parse_echo_reply(frame: &[u8]) -> Option<(u16, u16, usize)> {
    if frame.len() < 42 || frame[12..14] != ETH_P_IP.to_be_bytes() || frame[23] != 1 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let icmp = frame.get(14 + ihl..)?;
    if icmp.len() < 8 || icmp[0] != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
    let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
    Some((id, seq, total.saturating_sub(ihl + 8)))
}

fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut s = 0u32;
    for w in [src, dst] {
        s += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    s + u32::from(proto) + len as u32
}

/// Folds a 32-bit one's-complement sum to 16 bits, not inverted (a partial checksum).
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A UDP datagram; with `partial`, the checksum field holds only the pseudo-header sum (for NEEDS_CSUM).
pub fn udp(ep: &Endpoints, sport: u16, dport: u16, payload: &[u8], partial: bool) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let ps = pseudo_sum(ep.src_ip, ep.dst_ip, 17, len);
    let c = if partial {
        fold(ps)
    } else {
        match checksum(&u, ps) {
            0 => 0xffff,
            c => c,
        }
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    let mut ip = ipv4_header(ep.src_ip, ep.dst_ip, 17, u.len());
    ip.extend(u);
    ethernet(ep.dst_mac, ep.src_mac, ETH_P_IP, &ip)
}

/// A TCP segment (ACK|PSH) carrying `payload` with a partial checksum (for NEEDS_CSUM / TSO).
pub fn tcp_partial(ep: &Endpoints, sport: u16, dport: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = 20 + payload.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes());
    t.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    let c = fold(pseudo_sum(ep.src_ip, ep.dst_ip, 6, len));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = ipv4_header(ep.src_ip, ep.dst_ip, 6, t.len());
    ip.extend(t);
    ethernet(ep.dst_mac, ep.src_mac, ETH_P_IP, &ip)
}

/// How long `bulkhead-net` may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `bulkhead-net` with its own scratch directory, socket and log; killed on drop.
pub struct NetDaemon {
    guard: ChildGuard,
    dir: TempDir,
    socket: PathBuf,
    log: PathBuf,
}

impl NetDaemon {
    fn paths() -> io::Result<(TempDir, PathBuf, PathBuf)> {
        let dir = tempfile::Builder::new().prefix("bulkhead-net-").tempdir()?;
        let socket = dir.path().join("net.sock");
        let log = dir.path().join("daemon.log");
        Ok((dir, socket, log))
    }

    /// Starts `bulkhead-net --socket-path S ARGS` inside namespace `ns` (`--tap NAME` there).
    pub fn start_in(ns: &NetNs, args: &[&str]) -> io::Result<Self> {
        let (dir, socket, log) = Self::paths()?;
        let mut cmd = ns.command(workspace_binary("bulkhead-net"));
        cmd.arg("--socket-path").arg(&socket).args(args);
        Self::spawn(cmd, dir, socket, log)
    }

    /// Starts `bulkhead-net` outside any namespace with these tap fds (as `--tap-fd 10 ...`).
    pub fn start_with_fds(fds: Vec<OwnedFd>, args: &[&str]) -> io::Result<Self> {
        Self::start_bin_with_fds(&workspace_binary("bulkhead-net"), fds, args)
    }

    /// As [`NetDaemon::start_with_fds`], with the `bulkhead-net` binary at
    /// `bin` (an earlier build, for a before/after benchmark).
    pub fn start_bin_with_fds(bin: &Path, fds: Vec<OwnedFd>, args: &[&str]) -> io::Result<Self> {
        let (dir, socket, log) = Self::paths()?;
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path").arg(&socket);
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        for i in 0..raw.len() {
            cmd.arg("--tap-fd").arg((10 + i).to_string());
        }
        cmd.args(args);
        crate::process::pass_fds(
            &mut cmd,
            raw.iter()
                .enumerate()
                .map(|(i, &fd)| (fd, 10 + i as i32))
                .collect(),
        );
        let d = Self::spawn(cmd, dir, socket, log);
        drop(fds);
        d
    }

    fn spawn(mut cmd: Command, dir: TempDir, socket: PathBuf, log: PathBuf) -> io::Result<Self> {
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut guard = spawn_daemon("bulkhead-net", &mut cmd, &log)?;
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !socket.exists() {
            if let Some(st) = guard.try_wait()? {
                return Err(io::Error::other(format!(
                    "bulkhead-net exited before creating its socket ({st}):\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no socket"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(NetDaemon {
            guard,
            dir,
            socket,
            log,
        })
    }

    /// The socket the daemon listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.guard.try_wait(), Ok(None))
    }

    /// Resident memory of the daemon in KiB (VmRSS).
    pub fn rss_kib(&self) -> io::Result<u64> {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| io::Error::other("no VmRSS"))
    }

    /// Asks for the counters (SIGUSR1) and returns the new `stats:` line's values.
    pub fn stats(&mut self) -> io::Result<BTreeMap<String, u64>> {
        let before = self.log().matches(" stats: ").count();
        self.guard.signal(libc::SIGUSR1)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if log.matches(" stats: ").count() > before
                && let Some(line) = log.lines().rev().find(|l| l.contains(" stats: "))
            {
                return Ok(parse_stats(line));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no stats line"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns whether it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = self.guard.signal(libc::SIGTERM);
        matches!(self.guard.wait_timeout(timeout), Ok(Some(_)))
    }
}

/// The `name=value` pairs after `stats:` in a log line.
pub fn parse_stats(line: &str) -> BTreeMap<String, u64> {
    line.split(" stats: ")
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_config_parses() {
        let h = NetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(NetHdr::parse(&h.to_bytes(12)), h);
        assert_eq!(h.to_bytes(10).len(), 10);
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        c[6] = 1;
        c[8] = 2;
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        let cfg = NetConfig::parse(&c);
        assert_eq!((cfg.status, cfg.max_virtqueue_pairs, cfg.mtu), (1, 2, 1500));
    }

    #[test]
    fn frames_carry_valid_checksums() {
        let ep = Endpoints {
            src_mac: [2, 0, 0, 0, 0, 2],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_ip: [10, 0, 0, 2],
            dst_ip: [10, 0, 0, 1],
        };
        let f = icmp_echo(&ep, 7, 1, b"hello");
        assert_eq!(checksum(&f[14..34], 0), 0, "IP header checksum");
        assert_eq!(checksum(&f[34..], 0), 0, "ICMP checksum");
        let u = udp(&ep, 1, 2, b"abc", false);
        let ps = pseudo_sum(ep.src_ip, ep.dst_ip, 17, u.len() - 34);
        assert_eq!(checksum(&u[34..], ps), 0, "UDP checksum");
        assert_eq!(
            parse_arp_reply(&arp_request(ep.src_mac, ep.src_ip, ep.dst_ip)),
            None
        );
        assert_eq!(parse_stats("x[1]: INFO stats: a=1 b=2").get("b"), Some(&2));
    }
}
