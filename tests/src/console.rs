//! A virtio-console guest driver on top of [`Device`], replaying what Linux's
//! `drivers/char/virtio_console.c` does, plus the backend-request channel
//! (config-change notifications), console daemons under test
//! (`bulkhead-console` and rust-vmm's `vhost-device-console`) and host-side
//! clients for them.
//!
//! The Linux sequence replayed by [`ConsoleDriver::linux_probe`]:
//! 1. read the config space (`max_nr_ports` when MULTIPORT was negotiated);
//! 2. with MULTIPORT: fill the control receive queue with page-sized
//!    buffers until it is full, kicking after each (`fill_queue`, `add_inbuf`);
//!    without: add port 0 at once (fill its receive queue; it is the console);
//! 3. send DEVICE_READY (id 0xffffffff, value 1) on the control transmit
//!    queue and wait until the device used it (`__send_control_msg` spins);
//! 4. for each control message, in order, then give its buffer back and kick
//!    (`control_work_handler`):
//!    - PORT_ADD: `add_port`: fill the port's receive queue, then PORT_READY 1;
//!    - CONSOLE_PORT: `init_port_console`: the port is the console, PORT_OPEN 1;
//!    - RESIZE: `{ cols, rows }` after the header (the spec's order, which
//!      Linux follows since its commit 5326ab737a47), for a console port;
//!    - PORT_OPEN: the host side is connected (value);
//!    - PORT_NAME: the name is the rest of the buffer.
//!
//! A named port is opened by a guest process (`port_fops_open`), which sends
//! PORT_OPEN 1: [`ConsoleDriver::open_port`].

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler};

use crate::frontend::{Device, FrontendError, Options};
use crate::le::{le16, le32};
use crate::memory::MemoryError;
use crate::process::{ChildGuard, wait_for_path, workspace_binary};
use crate::virtq::{Buf, VirtqError};

pub use bulkhead_spec::console::{
    VIRTIO_CONSOLE_CONFIG_EMERG_WR_OFFSET as EMERG_WR_OFFSET,
    VIRTIO_CONSOLE_CONSOLE_PORT as CONSOLE_PORT, VIRTIO_CONSOLE_DEVICE_READY as DEVICE_READY,
    VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE,
    VIRTIO_CONSOLE_PORT_ADD as PORT_ADD, VIRTIO_CONSOLE_PORT_NAME as PORT_NAME,
    VIRTIO_CONSOLE_PORT_OPEN as PORT_OPEN, VIRTIO_CONSOLE_PORT_READY as PORT_READY,
    VIRTIO_CONSOLE_PORT_REMOVE as PORT_REMOVE, VIRTIO_CONSOLE_RESIZE as RESIZE,
};

/// Linux's buffer size for receive and control buffers (PAGE_SIZE).
pub const PAGE: u32 = 4096;
/// `id` Linux uses for DEVICE_READY.
pub const BAD_ID: u32 = u32::MAX;
/// Default wait for the device.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from the console driver.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The vhost-user frontend failed.
    #[error("Frontend")]
    Frontend(#[from] FrontendError),
    /// Guest memory failed.
    #[error("Guest memory")]
    Memory(#[from] MemoryError),
    /// A virtqueue failed (full, timeout).
    #[error("Virtqueue")]
    Virtq(#[from] VirtqError),
    /// Socket or process I/O failed.
    #[error("I/O")]
    Io(#[from] io::Error),
    /// No such port or queue.
    #[error("No port {0}")]
    NoPort(u32),
    /// The device did not reach the expected state in time.
    #[error("Timed out: {0}")]
    Timeout(String),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ConsoleError>;

/// `struct virtio_console_config`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
    /// Ports the device has (MULTIPORT).
    pub max_nr_ports: u32,
    /// Emergency write register (reads as 0).
    pub emerg_wr: u32,
}

impl ConsoleConfig {
    /// Parses config bytes; missing bytes read as zero.
    pub fn parse(b: &[u8]) -> Self {
        ConsoleConfig {
            cols: le16(b, 0),
            rows: le16(b, 2),
            max_nr_ports: le32(b, 4),
            emerg_wr: le32(b, 8),
        }
    }
}

/// A control message as the driver received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlEvent {
    /// Port number.
    pub id: u32,
    /// `PORT_ADD`, `CONSOLE_PORT`, ...
    pub event: u16,
    /// Value.
    pub value: u16,
    /// Bytes after the header (name, or `{ cols, rows }`).
    pub payload: Vec<u8>,
}

/// The 8-byte control header.
pub fn control(id: u32, event: u16, value: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..4].copy_from_slice(&id.to_le_bytes());
    b[4..6].copy_from_slice(&event.to_le_bytes());
    b[6..8].copy_from_slice(&value.to_le_bytes());
    b
}

/// What the driver knows about a port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortInfo {
    /// PORT_ADD was received and the port set up.
    pub added: bool,
    /// CONSOLE_PORT was received.
    pub console: bool,
    /// Name from PORT_NAME.
    pub name: Option<String>,
    /// Host side open (PORT_OPEN from the device).
    pub host_open: bool,
    /// (cols, rows) from the last RESIZE.
    pub size: Option<(u16, u16)>,
    /// A guest process has the port open (PORT_OPEN 1 sent).
    pub guest_open: bool,
}

/// Config-change notifications received on the backend-request channel.
#[derive(Default)]
pub struct ConfigChanges {
    count: AtomicU64,
    tx: Mutex<Option<mpsc::Sender<()>>>,
}

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> io::Result<u64> {
        self.count.fetch_add(1, Ordering::SeqCst);
        if let Ok(g) = self.tx.lock()
            && let Some(tx) = g.as_ref()
        {
            let _ = tx.send(());
        }
        Ok(0)
    }
}

/// The frontend end of the backend-request channel, served by a thread.
pub struct BackendChannel {
    changes: Arc<ConfigChanges>,
    rx: mpsc::Receiver<()>,
    _thread: std::thread::JoinHandle<()>,
}

impl BackendChannel {
    /// Sends SET_BACKEND_REQ_FD on `dev` and serves the channel in a thread.
    pub fn attach(dev: &mut Device) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let changes = Arc::new(ConfigChanges::default());
        if let Ok(mut g) = changes.tx.lock() {
            *g = Some(tx);
        }
        let mut handler = FrontendReqHandler::new(changes.clone()).map_err(|e| {
            FrontendError::Vhost("backend channel", vhost::Error::VhostUserProtocol(e))
        })?;
        dev.frontend
            .set_backend_request_fd(&handler.get_tx_raw_fd())
            .map_err(|e| FrontendError::Vhost("SET_BACKEND_REQ_FD", e))?;
        let thread = std::thread::spawn(move || {
            // Ends when the backend closes its end.
            while handler.handle_request().is_ok() {}
        });
        Ok(BackendChannel {
            changes,
            rx,
            _thread: thread,
        })
    }

    /// Config-change notifications received so far.
    pub fn count(&self) -> u64 {
        self.changes.count.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for the next notification.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.rx.recv_timeout(timeout).is_ok()
    }
}

/// Queue index of port `p`'s receive queue (virtio spec 5.3.2).
pub fn rx_queue(p: u32) -> usize {
    if p == 0 { 0 } else { 2 + 2 * p as usize }
}

/// Queue index of port `p`'s transmit queue.
pub fn tx_queue(p: u32) -> usize {
    rx_queue(p) + 1
}

/// Control receive queue.
pub const CTRL_RX: usize = 2;
/// Control transmit queue.
pub const CTRL_TX: usize = 3;

/// A virtio-console driver over a vhost-user [`Device`].
pub struct ConsoleDriver {
    /// The vhost-user device (memory, queues, frontend).
    pub dev: Device,
    /// Config read at probe time.
    pub config: ConsoleConfig,
    /// MULTIPORT negotiated.
    pub multiport: bool,
    /// Ports, by number.
    pub ports: Vec<PortInfo>,
    /// Every control message received, in order.
    pub received: Vec<ControlEvent>,
    /// Posted receive buffers: (queue, head) -> (address, length).
    posted: HashMap<(usize, u16), (u64, u32)>,
    /// Transmit buffers in flight: (queue, head) -> (address, length).
    tx_bufs: HashMap<(usize, u16), (u64, u64)>,
    /// Backend-request channel, when attached.
    pub channel: Option<BackendChannel>,
    /// Used entries whose head the driver did not post (a device bug).
    pub unknown_used: u64,
    /// Receive buffers read but not yet given back: (queue, address, length).
    consumed: Vec<(usize, u64, u32)>,
}

impl ConsoleDriver {
    /// Connects and brings the device up (no driver activity yet).
    pub fn connect(socket: &Path, opts: &Options) -> Result<Self> {
        let dev = Device::connect(socket, opts)?;
        let multiport = dev.has_feature(VIRTIO_CONSOLE_F_MULTIPORT);
        Ok(ConsoleDriver {
            dev,
            config: ConsoleConfig::default(),
            multiport,
            ports: Vec::new(),
            received: Vec::new(),
            posted: HashMap::new(),
            tx_bufs: HashMap::new(),
            channel: None,
            unknown_used: 0,
            consumed: Vec::new(),
        })
    }

    /// Default options plus BACKEND_REQ (config-change notifications).
    pub fn options() -> Options {
        let mut o = Options::default();
        o.protocol_features |= VhostUserProtocolFeatures::BACKEND_REQ;
        o
    }

    /// Attaches the backend-request channel (SET_BACKEND_REQ_FD).
    pub fn attach_channel(&mut self) -> Result<()> {
        self.channel = Some(BackendChannel::attach(&mut self.dev)?);
        Ok(())
    }

    /// Reads the 12-byte config space.
    pub fn read_config(&mut self) -> Result<ConsoleConfig> {
        let b = self.dev.get_config(0, 12)?;
        Ok(ConsoleConfig::parse(&b))
    }

    fn queue(&mut self, q: usize) -> Result<&mut crate::virtq::VirtQueue> {
        self.dev
            .queues
            .get_mut(q)
            .ok_or(ConsoleError::NoPort(q as u32))
    }

    /// Adds one page-sized receive buffer to queue `q` and kicks (Linux `add_inbuf`).
    pub fn add_inbuf(&mut self, q: usize) -> Result<bool> {
        let mem = self.dev.mem.clone();
        let gpa = mem.alloc(u64::from(PAGE), 64)?;
        let vq = self.queue(q)?;
        match vq.add_chain(&[Buf::writable(gpa, PAGE)]) {
            Ok(head) => {
                vq.publish(head)?;
                vq.kick_if_needed()?;
                self.posted.insert((q, head), (gpa, PAGE));
                Ok(true)
            }
            Err(VirtqError::QueueFull(_)) => {
                mem.free(gpa, u64::from(PAGE));
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Re-posts a buffer the device returned.
    fn repost(&mut self, q: usize, gpa: u64, len: u32) -> Result<()> {
        let vq = self.queue(q)?;
        let head = vq.add_chain(&[Buf::writable(gpa, len)])?;
        vq.publish(head)?;
        vq.kick_if_needed()?;
        self.posted.insert((q, head), (gpa, len));
        Ok(())
    }

    /// Fills queue `q` with receive buffers until it is full (Linux `fill_queue`); returns how many.
    pub fn fill_queue(&mut self, q: usize) -> Result<usize> {
        let mut n = 0;
        while self.add_inbuf(q)? {
            n += 1;
        }
        Ok(n)
    }

    /// Sends a control message and waits until the device used it (`__send_control_msg`).
    pub fn send_control(&mut self, id: u32, event: u16, value: u16) -> Result<()> {
        self.send_control_raw(&control(id, event, value))
    }

    /// Sends any bytes as one control buffer and waits for it to be used.
    pub fn send_control_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let mem = self.dev.mem.clone();
        let gpa = mem.alloc(bytes.len() as u64, 64)?;
        mem.write(gpa, bytes)?;
        let vq = self.queue(CTRL_TX)?;
        let head = vq.add_chain(&[Buf::readable(gpa, bytes.len() as u32)])?;
        vq.publish(head)?;
        vq.kick_if_needed()?;
        let used = vq.wait_used(TIMEOUT)?;
        mem.free(gpa, bytes.len() as u64);
        if used.id != u32::from(head) {
            self.unknown_used += 1;
        }
        Ok(())
    }

    /// Replays Linux's probe up to DEVICE_READY (see the module docs).
    pub fn linux_probe(&mut self) -> Result<()> {
        self.config = self.read_config()?;
        let nports = if self.multiport {
            self.config.max_nr_ports.max(1)
        } else {
            1
        };
        self.ports = vec![PortInfo::default(); nports as usize];
        if self.multiport {
            if self.fill_queue(CTRL_RX)? == 0 {
                return Err(ConsoleError::Timeout("no room in the control queue".into()));
            }
            self.send_control(BAD_ID, DEVICE_READY, 1)?;
        } else {
            self.fill_queue(rx_queue(0))?;
            self.ports[0].added = true;
            self.ports[0].console = true;
            self.ports[0].guest_open = true;
        }
        Ok(())
    }

    /// Handles one control message the way Linux's `handle_control_message` does.
    fn handle(&mut self, ev: ControlEvent) -> Result<()> {
        let id = ev.id;
        let known = self.ports.get(id as usize).is_some_and(|p| p.added);
        if !known && ev.event != PORT_ADD {
            // Linux drops it ("Invalid index in control packet").
            self.received.push(ev);
            return Ok(());
        }
        match ev.event {
            PORT_ADD => {
                if known {
                    self.send_control(id, PORT_READY, 1)?;
                } else if (id as usize) < self.ports.len() {
                    self.fill_queue(rx_queue(id))?;
                    self.ports[id as usize].added = true;
                    self.send_control(id, PORT_READY, 1)?;
                }
            }
            CONSOLE_PORT => {
                let p = &mut self.ports[id as usize];
                if ev.value != 0 && !p.console {
                    p.console = true;
                    p.guest_open = true;
                    self.send_control(id, PORT_OPEN, 1)?;
                }
            }
            RESIZE if self.ports[id as usize].console => {
                let cols = le16(&ev.payload, 0);
                let rows = le16(&ev.payload, 2);
                self.ports[id as usize].size = Some((cols, rows));
            }
            PORT_OPEN => self.ports[id as usize].host_open = ev.value != 0,
            PORT_NAME => {
                let p = &mut self.ports[id as usize];
                if p.name.is_none() {
                    let end = ev
                        .payload
                        .iter()
                        .position(|&b| b == 0)
                        .unwrap_or(ev.payload.len());
                    p.name = Some(String::from_utf8_lossy(&ev.payload[..end]).into_owned());
                }
            }
            PORT_REMOVE => self.ports[id as usize] = PortInfo::default(),
            _ => {}
        }
        self.received.push(ev);
        Ok(())
    }

    /// Takes control messages off the control receive queue, handles them and
    /// gives each buffer back (`control_work_handler`), until `done` holds or `timeout`.
    pub fn settle(
        &mut self,
        timeout: Duration,
        done: impl Fn(&ConsoleDriver) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(u) = self.queue(CTRL_RX)?.pop_used()? {
                let Ok(head) = u16::try_from(u.id) else {
                    self.unknown_used += 1;
                    continue;
                };
                let Some((gpa, len)) = self.posted.remove(&(CTRL_RX, head)) else {
                    self.unknown_used += 1;
                    continue;
                };
                let n = u.len.min(len) as usize;
                let bytes = self.dev.mem.read_vec(gpa, n)?;
                if n >= 8 {
                    let ev = ControlEvent {
                        id: le32(&bytes, 0),
                        event: le16(&bytes, 4),
                        value: le16(&bytes, 6),
                        payload: bytes[8..].to_vec(),
                    };
                    self.handle(ev)?;
                }
                self.repost(CTRL_RX, gpa, len)?;
            }
            if done(self) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ConsoleError::Timeout(format!(
                    "control messages so far: {:?}; ports {:?}",
                    self.received, self.ports
                )));
            }
            let vq = self.queue(CTRL_RX)?;
            if vq.event_idx() {
                let last = vq.last_used();
                vq.set_used_event(last)?;
            }
            vq.wait_call((deadline - now).min(Duration::from_millis(50)))?;
        }
    }

    /// Probe, then settle until every port is added, named ports named and port 0 is the console.
    pub fn linux_bring_up(&mut self, names: &[Option<&str>]) -> Result<()> {
        self.linux_probe()?;
        if !self.multiport {
            return Ok(());
        }
        let want: Vec<Option<String>> = names.iter().map(|n| n.map(String::from)).collect();
        self.settle(TIMEOUT, |d| {
            d.ports.iter().all(|p| p.added && p.host_open)
                && d.ports.first().is_some_and(|p| p.console)
                && d.ports
                    .iter()
                    .zip(want.iter())
                    .all(|(p, w)| w.is_none() || p.name == *w)
        })
    }

    /// A guest process opens port `p` (`port_fops_open`: PORT_OPEN 1).
    pub fn open_port(&mut self, p: u32) -> Result<()> {
        self.send_control(p, PORT_OPEN, 1)?;
        if let Some(info) = self.ports.get_mut(p as usize) {
            info.guest_open = true;
        }
        Ok(())
    }

    /// Frees transmit buffers the device has used on queue `q`; returns how many.
    pub fn reclaim_tx(&mut self, q: usize) -> Result<usize> {
        let mut n = 0;
        while let Some(u) = self.queue(q)?.pop_used()? {
            match u16::try_from(u.id)
                .ok()
                .and_then(|h| self.tx_bufs.remove(&(q, h)))
            {
                Some((gpa, len)) => self.dev.mem.free(gpa, len),
                None => self.unknown_used += 1,
            }
            n += 1;
        }
        Ok(n)
    }

    /// Guest output on port `p`, in buffers of `chunk` bytes, waiting for room as needed.
    pub fn write(&mut self, p: u32, data: &[u8], chunk: usize) -> Result<()> {
        let q = tx_queue(p);
        for piece in data.chunks(chunk.max(1)) {
            let deadline = Instant::now() + TIMEOUT;
            while self.queue(q)?.free_descs() == 0 {
                if self.reclaim_tx(q)? == 0 {
                    if Instant::now() >= deadline {
                        return Err(ConsoleError::Timeout("transmit queue stalled".into()));
                    }
                    self.wait_queue(q, Duration::from_millis(50))?;
                }
            }
            let gpa = self.dev.mem.alloc(piece.len() as u64, 64)?;
            self.dev.mem.write(gpa, piece)?;
            let vq = self.queue(q)?;
            let head = vq.add_chain(&[Buf::readable(gpa, piece.len() as u32)])?;
            vq.publish(head)?;
            vq.kick_if_needed()?;
            self.tx_bufs.insert((q, head), (gpa, piece.len() as u64));
        }
        Ok(())
    }

    /// Waits until every transmit buffer of port `p` was used.
    pub fn flush(&mut self, p: u32, timeout: Duration) -> Result<()> {
        let q = tx_queue(p);
        let deadline = Instant::now() + timeout;
        loop {
            self.reclaim_tx(q)?;
            if !self.tx_bufs.keys().any(|(qq, _)| *qq == q) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ConsoleError::Timeout("transmit buffers not used".into()));
            }
            self.wait_queue(q, Duration::from_millis(50))?;
        }
    }

    fn wait_queue(&mut self, q: usize, t: Duration) -> Result<()> {
        let vq = self.queue(q)?;
        if vq.event_idx() {
            let last = vq.last_used();
            vq.set_used_event(last)?;
        }
        vq.wait_call(t)?;
        Ok(())
    }

    /// Guest input on port `p`: takes filled receive buffers until `n` bytes or
    /// `timeout`, and returns what arrived. Like Linux, a buffer goes back to
    /// the device only after its data was consumed: at the next round of
    /// this loop or the next call.
    pub fn read(&mut self, p: u32, n: usize, timeout: Duration) -> Result<Vec<u8>> {
        let q = rx_queue(p);
        let mut out = Vec::with_capacity(n);
        let deadline = Instant::now() + timeout;
        while out.len() < n {
            for (qq, gpa, len) in std::mem::take(&mut self.consumed) {
                self.repost(qq, gpa, len)?;
            }
            let mut got = false;
            while let Some(u) = self.queue(q)?.pop_used()? {
                got = true;
                let Some((gpa, len)) = u16::try_from(u.id)
                    .ok()
                    .and_then(|h| self.posted.remove(&(q, h)))
                else {
                    self.unknown_used += 1;
                    continue;
                };
                let k = u.len.min(len) as usize;
                out.extend_from_slice(&self.dev.mem.read_vec(gpa, k)?);
                self.consumed.push((q, gpa, len));
            }
            if out.len() >= n {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if !got {
                self.wait_queue(q, (deadline - now).min(Duration::from_millis(50)))?;
            }
        }
        Ok(out)
    }

    /// Gives back every receive buffer already read.
    pub fn repost_consumed(&mut self) -> Result<()> {
        for (q, gpa, len) in std::mem::take(&mut self.consumed) {
            self.repost(q, gpa, len)?;
        }
        Ok(())
    }

    /// Receive buffers currently posted on port `p`'s queue.
    pub fn posted_rx(&self, p: u32) -> usize {
        let q = rx_queue(p);
        self.posted.keys().filter(|(qq, _)| *qq == q).count()
    }

    /// Emergency write of one byte (config write at offset 8).
    pub fn emerg_write(&mut self, byte: u8) -> Result<()> {
        self.dev
            .set_config(EMERG_WR_OFFSET, &u32::from(byte).to_le_bytes())?;
        Ok(())
    }
}

/// A host-side connection to a console port (a unix socket or TCP client).
pub trait HostConn: Read + Write + Send {
    /// Sets the read timeout.
    fn timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Raw fd (for nonblocking tricks).
    fn fd(&self) -> i32;
}

impl HostConn for UnixStream {
    fn timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn fd(&self) -> i32 {
        self.as_raw_fd()
    }
}

impl HostConn for TcpStream {
    fn timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn fd(&self) -> i32 {
        self.as_raw_fd()
    }
}

/// Reads from `c` until `n` bytes arrived or `timeout` passed.
pub fn read_n(c: &mut dyn HostConn, n: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; 64 << 10];
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        c.timeout(Some(left.min(Duration::from_millis(200))))?;
        let want = (n - out.len()).min(buf.len());
        match c.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Where a console daemon's port 0 is reached from the host.
#[derive(Clone, Debug)]
pub enum HostAddr {
    /// A unix socket (bulkhead-console).
    Unix(PathBuf),
    /// A TCP port on 127.0.0.1 (vhost-device-console's network backend).
    Tcp(u16),
}

impl HostAddr {
    /// Connects a client, retrying briefly while the listener appears.
    pub fn connect(&self) -> io::Result<Box<dyn HostConn>> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let r: io::Result<Box<dyn HostConn>> = match self {
                HostAddr::Unix(p) => UnixStream::connect(p).map(|s| Box::new(s) as _),
                HostAddr::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).map(|s| {
                    let _ = s.set_nodelay(true);
                    Box::new(s) as _
                }),
            };
            match r {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// A console daemon under test, killed by pid when dropped.
pub struct ConsoleDaemon {
    guard: ChildGuard,
    dir: TempDir,
    socket: PathBuf,
    /// How to reach port 0 from the host.
    pub console: HostAddr,
}

/// Path of rust-vmm's `vhost-device-console`: `$BULKHEAD_VHOST_DEVICE_CONSOLE`, else
/// `target/tools/bin/` of the workspace (where CI installs it), else `$PATH`.
pub fn vhost_device_console_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("BULKHEAD_VHOST_DEVICE_CONSOLE") {
        return Some(PathBuf::from(p));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tools = repo.join("target/tools/bin/vhost-device-console");
    if tools.exists() {
        return Some(tools);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("vhost-device-console"))
            .find(|p| p.exists())
    })
}

fn scratch() -> io::Result<TempDir> {
    tempfile::Builder::new()
        .prefix("bulkhead-console-test")
        .tempdir()
}

impl ConsoleDaemon {
    /// Starts `bulkhead-console --socket-path DIR/vhost.sock <args>`; port 0 at `DIR/vhost.sock.console`.
    pub fn bulkhead(args: &[&str]) -> io::Result<Self> {
        let dir = scratch()?;
        let socket = dir.path().join("vhost.sock");
        let mut cmd = Command::new(workspace_binary("bulkhead-console"));
        cmd.arg("--socket-path").arg(&socket).args(args);
        let console = HostAddr::Unix(dir.path().join("vhost.sock.console"));
        Self::start("bulkhead-console", cmd, dir, socket, console)
    }

    /// Starts `vhost-device-console --backend network --tcp-port P --socket-path DIR/vhost.sock`
    /// (which listens on `DIR/vhost.sock0`).
    pub fn vhost_device_console(binary: &Path) -> io::Result<Self> {
        let dir = scratch()?;
        let base = dir.path().join("vhost.sock");
        let port = free_tcp_port()?;
        let mut cmd = Command::new(binary);
        cmd.arg("--socket-path")
            .arg(&base)
            .arg("--socket-count")
            .arg("1")
            .arg("--backend")
            .arg("network")
            .arg("--tcp-port")
            .arg(port.to_string());
        let socket = dir.path().join("vhost.sock0");
        Self::start(
            "vhost-device-console",
            cmd,
            dir,
            socket,
            HostAddr::Tcp(port),
        )
    }

    fn start(
        name: &str,
        mut cmd: Command,
        dir: TempDir,
        socket: PathBuf,
        console: HostAddr,
    ) -> io::Result<Self> {
        let mut guard = ChildGuard::spawn_quiet(name, &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(st) = guard.try_wait()? {
                return Err(io::Error::other(format!(
                    "{name} exited before creating its socket: {st}"
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!("{name} created no socket")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let HostAddr::Unix(p) = &console {
            wait_for_path(p, Duration::from_secs(5))?;
        }
        Ok(ConsoleDaemon {
            guard,
            dir,
            socket,
            console,
        })
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.guard.try_wait(), Ok(None))
    }

    /// Resident memory of the daemon in KiB (VmRSS).
    pub fn rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

/// Sends one line to a bulkhead-console resize-control socket and returns the reply line.
pub fn ctl_command(ctl: &Path, line: &str) -> io::Result<String> {
    let mut s = UnixStream::connect(ctl)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 {
        if b[0] == b'\n' {
            break;
        }
        reply.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn free_tcp_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A deterministic printable-ASCII pattern (valid UTF-8 in any chunking).
pub fn ascii_pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            b' ' + ((x >> 33) % 95) as u8
        })
        .collect()
}

/// A deterministic pattern of every byte value.
pub fn binary_pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The test-kit suite run against every console backend (the subset every
/// backend supports: VERSION_1, MULTIPORT with one port, EVENT_IDX).
pub mod suite {
    use super::*;

    /// Brings up a driver as Linux does and checks the console port came up.
    pub fn linux_console_bring_up(d: &ConsoleDaemon) -> ConsoleDriver {
        let mut drv =
            ConsoleDriver::connect(d.socket(), &Options::default()).expect("vhost-user bring-up");
        assert!(drv.multiport, "MULTIPORT not negotiated");
        drv.linux_bring_up(&[None]).expect("Linux probe sequence");
        let p0 = &drv.ports[0];
        assert!(p0.added && p0.console && p0.host_open, "port 0: {p0:?}");
        // The first messages are PORT_ADD for port 0, then CONSOLE_PORT before PORT_OPEN.
        let events: Vec<u16> = drv.received.iter().map(|e| e.event).collect();
        assert_eq!(events.first(), Some(&PORT_ADD), "{events:?}");
        let console = events.iter().position(|&e| e == CONSOLE_PORT);
        let open = events.iter().position(|&e| e == PORT_OPEN);
        assert!(console.is_some() && console < open, "{events:?}");
        assert_eq!(drv.unknown_used, 0);
        drv
    }

    /// Guest output arrives byte-exact at host client `c`; returns the client and MiB/s.
    pub fn output_is_byte_exact(
        mut c: Box<dyn HostConn>,
        drv: &mut ConsoleDriver,
        data: &[u8],
    ) -> (Box<dyn HostConn>, f64) {
        let n = data.len();
        let reader = std::thread::spawn(move || {
            let r = read_n(c.as_mut(), n, Duration::from_secs(120));
            (c, r)
        });
        let t0 = Instant::now();
        drv.write(0, data, PAGE as usize).expect("guest write");
        drv.flush(0, Duration::from_secs(120)).expect("flush");
        let (c, got) = reader.join().expect("reader");
        let got = got.expect("read");
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(got.len(), data.len(), "short output");
        assert!(got == data, "output differs");
        (c, (n as f64 / (1 << 20) as f64) / secs)
    }

    /// Host input typed one byte at a time reaches the guest byte-exact.
    pub fn typed_input_reaches_the_guest(
        c: &mut dyn HostConn,
        drv: &mut ConsoleDriver,
        line: &[u8],
    ) {
        let mut got = Vec::new();
        for &b in line {
            // Typing speed; also keeps vhost-device-console 0.1.0 from
            // swallowing the buffer given back for the previous byte.
            std::thread::sleep(Duration::from_millis(5));
            c.write_all(&[b]).expect("host write");
            let r = drv.read(0, 1, TIMEOUT).expect("guest read");
            got.extend_from_slice(&r);
        }
        assert_eq!(got, line);
    }
}
