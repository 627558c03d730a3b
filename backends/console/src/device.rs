//! The virtio-console device: features, config space, the control plane of a
//! MULTIPORT console, and the four kinds of queue worker (port receive, port
//! transmit, control receive, control transmit).
//!
//! Queue layout (virtio spec 5.3.2): port 0 receive (0) and transmit (1),
//! control receive (2) and transmit (3), then port N receive (2N+2) and
//! transmit (2N+3). A port's two workers share the port through an `Arc`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_common::device::DEFAULT_PROTOCOL_FEATURES;
use bulkhead_common::notify::ConfigNotifier;
use bulkhead_common::spec::VIRTIO_F_VERSION_1;
use bulkhead_common::spec::console::{
    VIRTIO_CONSOLE_CONFIG_EMERG_WR_OFFSET, VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE, VirtioConsoleConfig,
};
use bulkhead_common::spec::ring::{
    VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use bulkhead_common::state::{
    DeviceType, StateError, StateSection, StateSink, load_features, virtio_features,
};
use bulkhead_common::stats::Stats;
use bulkhead_common::{
    DescriptorChain, QueueWorker, VhostUserDevice, VirtQueue, WorkerCtl, guest_error,
};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use crate::port::{Input, Port, STALL_MS, StatsSource};
use crate::request::{CONTROL_HDR_LEN, ControlMsg, DeviceEvent, DriverEvent};
use crate::state::{ConsoleState, Limits, PortState};

/// Largest queue size accepted.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most bytes one chain may carry (Linux sends at most 32 KiB per write).
pub const MAX_CHAIN_BYTES: u64 = 1 << 20;
/// Control messages waiting for the driver, at most (plus a few per port).
const MAX_PENDING_CONTROL: usize = 64;

/// Device-wide counters.
#[derive(Default, Debug)]
pub struct DeviceStats {
    /// Control messages from the driver that were refused (guest errors).
    pub malformed_control: AtomicU64,
    /// Receive or control buffers too small or without writable space (guest errors).
    pub bad_buffers: AtomicU64,
    /// Control messages to the driver dropped because it posted no buffers for them.
    pub control_dropped: AtomicU64,
    /// Config-change notifications sent to the frontend.
    pub config_changes: AtomicU64,
    /// Emergency writes (EMERG_WRITE) received.
    pub emerg_writes: AtomicU64,
}

/// The control plane: messages for the driver, negotiated features, the config notifier.
pub struct Control {
    pending: Mutex<VecDeque<DeviceEvent>>,
    wake: EventFd,
    acked: AtomicU64,
    notifier: Mutex<Option<ConfigNotifier>>,
    driver_ready: AtomicBool,
    ports: Vec<Arc<Port>>,
    stats: Arc<DeviceStats>,
    /// Where the state goes after each change (the inflight area).
    sink: StateSink,
}

impl Control {
    fn names(&self) -> Vec<Option<&str>> {
        self.ports.iter().map(|p| p.name()).collect()
    }

    fn state(&self) -> ConsoleState {
        ConsoleState {
            features: virtio_features(self.acked.load(Ordering::Acquire)),
            driver_ready: self.driver_ready.load(Ordering::Acquire),
            ports: self
                .ports
                .iter()
                .map(|p| PortState {
                    ready: p.ready(),
                    guest_open: p.guest_open(),
                    size: p.size(),
                })
                .collect(),
            pending: self
                .pending
                .lock()
                .map(|q| q.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    fn encode_state(&self) -> Vec<u8> {
        self.state().encode(&self.names())
    }

    /// Keeps the state in the inflight area. Called without the pending
    /// lock held, before the control message that changed it completes.
    fn persist(&self) {
        self.sink
            .persist(DeviceType::Console, || self.encode_state());
    }

    fn has(&self, feature: u64) -> bool {
        self.acked.load(Ordering::Acquire) & feature != 0
    }

    fn max_pending(&self) -> usize {
        MAX_PENDING_CONTROL + 8 * self.ports.len()
    }

    /// Queues a message for the driver (bounded; a newer resize replaces an older one).
    fn push(&self, ev: DeviceEvent) {
        let Ok(mut q) = self.pending.lock() else {
            return;
        };
        if let DeviceEvent::Resize { id, .. } = ev
            && let Some(old) = q
                .iter_mut()
                .find(|e| matches!(e, DeviceEvent::Resize { id: i, .. } if *i == id))
        {
            *old = ev;
        } else {
            if q.len() >= self.max_pending() {
                q.pop_front();
                self.stats.control_dropped.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(ev);
        }
        drop(q);
        let _ = self.wake.write(1);
    }

    fn port(&self, id: u32) -> Option<&Arc<Port>> {
        self.ports.get(id as usize)
    }

    /// Acts on a validated message from the driver.
    fn handle(&self, ev: DriverEvent) {
        match ev {
            DriverEvent::DeviceReady(true) => {
                self.driver_ready.store(true, Ordering::Release);
                for p in &self.ports {
                    self.push(DeviceEvent::PortAdd(p.id()));
                }
            }
            DriverEvent::DeviceReady(false) => {
                bulkhead_common::rate_limited!(
                    log::Level::Warn,
                    "the driver failed to set up the console device"
                );
            }
            DriverEvent::PortReady(id, true) => {
                let Some(p) = self.port(id) else { return };
                p.set_ready(true);
                if id == 0 {
                    self.push(DeviceEvent::ConsolePort(0));
                }
                if let Some(name) = p.name() {
                    self.push(DeviceEvent::PortName(id, name.to_string()));
                }
                // The host side is always open: output with no client goes to the scrollback.
                self.push(DeviceEvent::PortOpen(id, true));
                if id == 0
                    && let Some((cols, rows)) = p.size()
                {
                    self.push(DeviceEvent::Resize { id, cols, rows });
                }
            }
            DriverEvent::PortReady(id, false) => {
                bulkhead_common::rate_limited!(
                    log::Level::Warn,
                    "the driver failed to set up port {id}"
                );
            }
            DriverEvent::PortOpen(id, open) => {
                if let Some(p) = self.port(id) {
                    p.set_guest_open(open);
                    p.wake();
                }
            }
        }
    }

    /// The host side of port `id` changed size.
    pub fn port_resized(&self, id: u32, cols: u16, rows: u16) {
        bulkhead_common::rate_limited!(log::Level::Info, "port {id}: size {cols}x{rows}");
        if id != 0 {
            return;
        }
        if self.has(VIRTIO_CONSOLE_F_MULTIPORT) && self.port(0).is_some_and(|p| p.ready()) {
            self.push(DeviceEvent::Resize { id, cols, rows });
        }
        // The new size is what the guest is told (config space or RESIZE).
        self.persist();
        if self.has(VIRTIO_CONSOLE_F_SIZE)
            && let Ok(n) = self.notifier.lock()
            && let Some(n) = n.as_ref()
        {
            match n.config_changed() {
                Ok(()) => {
                    self.stats.config_changes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => bulkhead_common::rate_limited!(
                    log::Level::Warn,
                    "config-change notification not sent: {e}"
                ),
            }
        }
    }
}

impl StatsSource for Control {
    fn device_stats(&self) -> serde_json::Value {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "malformed_control": l(&s.malformed_control),
            "bad_buffers": l(&s.bad_buffers),
            "control_dropped": l(&s.control_dropped),
            "config_changes": l(&s.config_changes),
            "emerg_writes": l(&s.emerg_writes),
        })
    }
}

/// The console device served by the daemon.
pub struct ConsoleDevice {
    control: Arc<Control>,
    /// Counters.
    pub stats: Arc<DeviceStats>,
}

impl ConsoleDevice {
    /// A device over `ports` (port 0 is the console).
    pub fn new(ports: Vec<Port>) -> io::Result<Self> {
        let ports: Vec<Arc<Port>> = ports.into_iter().map(Arc::new).collect();
        let stats = Arc::new(DeviceStats::default());
        let control = Arc::new(Control {
            pending: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            acked: AtomicU64::new(0),
            notifier: Mutex::new(None),
            driver_ready: AtomicBool::new(false),
            ports,
            stats: stats.clone(),
            sink: StateSink::default(),
        });
        for p in &control.ports {
            p.set_stats_source(control.clone());
        }
        Ok(ConsoleDevice { control, stats })
    }

    /// The ports, port 0 first.
    pub fn ports(&self) -> &[Arc<Port>] {
        &self.control.ports
    }

    fn nr_ports(&self) -> u32 {
        self.control.ports.len() as u32
    }
}

/// What a queue is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Port receive queue (device to driver).
    PortRx(u32),
    /// Port transmit queue (driver to device).
    PortTx(u32),
    /// Control receive queue.
    ControlRx,
    /// Control transmit queue.
    ControlTx,
}

/// The role of queue `index` (virtio spec 5.3.2).
pub fn role(index: u16) -> Role {
    match index {
        0 => Role::PortRx(0),
        1 => Role::PortTx(0),
        2 => Role::ControlRx,
        3 => Role::ControlTx,
        i => {
            let port = u32::from(i / 2 - 1);
            if i % 2 == 0 {
                Role::PortRx(port)
            } else {
                Role::PortTx(port)
            }
        }
    }
}

impl VhostUserDevice for ConsoleDevice {
    type Worker = ConsoleWorker;
    type State = ConsoleState;

    /// Device counters, then each port's labelled with its number and name
    /// (`delivered{port="1",name="log"}=...`); a port's `.ctl` socket
    /// answers `stats` with the same numbers as JSON.
    fn stats(&self) -> Stats {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Stats::new();
        out.counter(
            "malformed_control",
            "Control messages from the driver that were refused (guest errors).",
            l(&s.malformed_control),
        )
        .counter(
            "bad_buffers",
            "Receive or control buffers too small or without writable space (guest errors).",
            l(&s.bad_buffers),
        )
        .counter(
            "control_dropped",
            "Control messages to the driver dropped for want of buffers.",
            l(&s.control_dropped),
        )
        .counter(
            "config_changes",
            "Config-change notifications sent to the frontend.",
            l(&s.config_changes),
        )
        .counter(
            "emerg_writes",
            "Emergency writes (EMERG_WRITE) received.",
            l(&s.emerg_writes),
        );
        for p in self.ports() {
            let ps = &p.stats;
            let id = p.id().to_string();
            let labels = [("port", id.as_str()), ("name", p.name().unwrap_or(""))];
            out.counter_with(
                "from_guest_bytes",
                "Bytes the guest sent on a port.",
                &labels,
                l(&ps.from_guest),
            )
            .counter_with(
                "delivered_bytes",
                "Bytes of a port handed to the host side.",
                &labels,
                l(&ps.delivered),
            )
            .counter_with(
                "dropped_bytes",
                "Bytes of a port dropped from its full scrollback.",
                &labels,
                l(&ps.dropped),
            )
            .counter_with(
                "to_guest_bytes",
                "Bytes read from the host side of a port into guest buffers.",
                &labels,
                l(&ps.to_guest),
            )
            .counter_with(
                "attaches",
                "Socket clients attached to a port.",
                &labels,
                l(&ps.attaches),
            )
            .counter_with(
                "write_errors",
                "Host-side write errors of a port.",
                &labels,
                l(&ps.write_errors),
            );
        }
        out
    }

    fn device_type(&self) -> DeviceType {
        DeviceType::Console
    }

    fn save_state(&self) -> Vec<u8> {
        self.control.encode_state()
    }

    fn parse_state(&self, payload: &[u8], acked: Option<u64>) -> Result<ConsoleState, StateError> {
        let c = &self.control;
        let limits = Limits {
            acked: load_features(payload, acked, self.features())?,
            names: c.names(),
            max_pending: c.max_pending(),
        };
        ConsoleState::parse(payload, &limits)
    }

    fn apply_state(&self, state: ConsoleState) {
        let c = &self.control;
        c.driver_ready.store(state.driver_ready, Ordering::Release);
        for (p, s) in c.ports.iter().zip(&state.ports) {
            p.set_ready(s.ready);
            p.set_guest_open(s.guest_open);
            // The host side's size: this daemon's own if its host side has
            // one (a pty), else the size the guest was told.
            if p.size().is_none()
                && let Some((cols, rows)) = s.size
            {
                p.set_size(cols, rows);
            }
        }
        if let Ok(mut q) = c.pending.lock() {
            *q = state.pending.into_iter().collect();
        }
        // A console whose host side has another size than the guest was
        // told: tell it, as a resize would.
        if let (Some(p0), Some(s0)) = (c.port(0), state.ports.first())
            && let Some((cols, rows)) = p0.size()
            && s0.size != Some((cols, rows))
            && c.has(VIRTIO_CONSOLE_F_MULTIPORT)
            && p0.ready()
        {
            c.push(DeviceEvent::Resize { id: 0, cols, rows });
        }
        let _ = c.wake.write(1);
        for p in &c.ports {
            p.wake();
        }
    }

    fn keeps_state(&self) -> bool {
        true
    }

    fn set_state_section(&self, section: Option<Arc<StateSection>>) {
        self.control.sink.attach(section);
    }

    fn num_queues(&self) -> u16 {
        // Two per port plus the control pair; ports are bounded by the CLI.
        (2 * (self.nr_ports() + 1)) as u16
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_CONSOLE_F_SIZE
            | VIRTIO_CONSOLE_F_MULTIPORT
            | VIRTIO_CONSOLE_F_EMERG_WRITE
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_F_RING_PACKED
            | VIRTIO_F_VERSION_1
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Config-change notifications (SIZE) go through the backend channel.
        DEFAULT_PROTOCOL_FEATURES | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn config(&self) -> Vec<u8> {
        let (cols, rows) = self
            .control
            .port(0)
            .and_then(|p| p.size())
            .unwrap_or((0, 0));
        VirtioConsoleConfig {
            cols: cols.into(),
            rows: rows.into(),
            max_nr_ports: self.nr_ports().into(),
            emerg_wr: 0.into(),
        }
        .as_slice()
        .to_vec()
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> io::Result<()> {
        if offset == VIRTIO_CONSOLE_CONFIG_EMERG_WR_OFFSET && (1..=4).contains(&data.len()) {
            // The device offers EMERG_WRITE, and the spec lets a driver
            // use it without negotiating it (an early console writes
            // before it touches the feature bits), so none is checked.
            self.stats.emerg_writes.fetch_add(1, Ordering::Relaxed);
            if let Some(p) = self.control.port(0) {
                // An emergency write never waits for the host side.
                let _ = p.output(&data[..1]);
            }
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "config write at {offset} ({} bytes): only emerg_wr is writable",
                data.len()
            ),
        ))
    }

    fn set_features(&self, features: u64) -> io::Result<()> {
        self.control.acked.store(features, Ordering::Release);
        if features & VIRTIO_CONSOLE_F_MULTIPORT == 0
            && let Some(p) = self.control.port(0)
        {
            // A single-port console is open from the start.
            p.set_guest_open(true);
            p.wake();
        }
        Ok(())
    }

    fn max_chain_bytes(&self) -> u64 {
        MAX_CHAIN_BYTES
    }

    fn reset(&self) {
        let c = &self.control;
        c.acked.store(0, Ordering::Release);
        c.driver_ready.store(false, Ordering::Release);
        if let Ok(mut q) = c.pending.lock() {
            q.clear();
        }
        if let Ok(mut n) = c.notifier.lock() {
            *n = None;
        }
        for p in &c.ports {
            p.reset_guest();
        }
    }

    fn set_config_notifier(&self, notifier: ConfigNotifier) {
        if let Ok(mut n) = self.control.notifier.lock() {
            *n = Some(notifier);
        }
    }

    /// A port's two queues share a thread: typed input and its echo hop
    /// from one to the other, and the thread that just delivered the input
    /// is still on a warm CPU when the echo comes (a second thread would
    /// be woken on a CPU idle since the last keystroke). The control
    /// queues share another.
    fn thread_group(&self, index: u16) -> Option<u16> {
        Some(match role(index) {
            // Port ids come from u16 queue indexes, below u16::MAX.
            Role::PortRx(id) | Role::PortTx(id) => id as u16,
            Role::ControlRx | Role::ControlTx => u16::MAX,
        })
    }

    fn create_worker(&self, index: u16, _size: u16, _features: u64) -> io::Result<ConsoleWorker> {
        let c = self.control.clone();
        let port = |id: u32| {
            c.port(id).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no queue {index}"))
            })
        };
        Ok(match role(index) {
            Role::PortRx(id) => ConsoleWorker::PortRx(RxWorker {
                port: port(id)?,
                control: c.clone(),
                held: None,
                watching: true,
            }),
            Role::PortTx(id) => ConsoleWorker::PortTx(TxWorker {
                port: port(id)?,
                buf: Vec::new(),
                blocked: false,
                stall: stall_timer()?,
            }),
            Role::ControlRx => ConsoleWorker::ControlRx(ControlRxWorker { control: c.clone() }),
            Role::ControlTx => ConsoleWorker::ControlTx(ControlTxWorker { control: c.clone() }),
        })
    }
}

/// Receive queue of a port: host input into guest buffers.
pub struct RxWorker {
    port: Arc<Port>,
    control: Arc<Control>,
    /// A buffer taken off the ring and waiting for input.
    held: Option<DescriptorChain>,
    /// Whether the input set is watched (false: back-pressure).
    watching: bool,
}

impl RxWorker {
    fn watch(&mut self, ctl: &WorkerCtl, on: bool) {
        if self.watching != on {
            ctl.watch(0, on);
            self.watching = on;
        }
    }

    /// Moves host input into guest buffers while both exist.
    fn pump(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        let mut used = false;
        loop {
            if !self.port.guest_open() {
                self.watch(ctl, false);
                break;
            }
            let chain = match self.held.take() {
                Some(c) => c,
                None => match vq.pop() {
                    Ok(Some(c)) => c,
                    Ok(None) => match vq.enable_notifications() {
                        Ok(true) => continue,
                        _ => {
                            // No buffers: stop reading the host side until the guest posts some.
                            self.watch(ctl, false);
                            break;
                        }
                    },
                    Err(_) => {
                        self.watch(ctl, false);
                        break;
                    }
                },
            };
            let mut w = chain.writer();
            let room = w.available();
            if room == 0 {
                self.control
                    .stats
                    .bad_buffers
                    .fetch_add(1, Ordering::Relaxed);
                guest_error!(
                    "queue {}: receive buffer with no writable space",
                    vq.index()
                );
                vq.complete(chain.head(), 0);
                used = true;
                continue;
            }
            let iov = match w.iovecs(room) {
                Ok(v) => v,
                Err(e) => {
                    guest_error!("queue {}: receive buffer: {e}", vq.index());
                    vq.complete(chain.head(), 0);
                    used = true;
                    continue;
                }
            };
            match self.port.read_input(&iov) {
                Input::Data(n) => {
                    // n <= room <= MAX_CHAIN_BYTES, so it fits a u32.
                    vq.complete_chain(&chain, n as u32);
                    used = true;
                }
                Input::Idle => {
                    self.held = Some(chain);
                    self.watch(ctl, true);
                    break;
                }
            }
        }
        if used {
            vq.notify();
        }
    }
}

/// Transmit queue of a port: guest output to the host side.
pub struct TxWorker {
    port: Arc<Port>,
    buf: Vec<u8>,
    /// Waiting for the host side to drain pending output.
    blocked: bool,
    /// Fires when the host side took too long ([`STALL_MS`]).
    stall: OwnedFd,
}

fn arm(timer: &OwnedFd, ms: i64) {
    let ts = libc::timespec {
        tv_sec: ms / 1000,
        tv_nsec: (ms % 1000) * 1_000_000,
    };
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: ts,
    };
    // SAFETY: arming (or, with 0, disarming) our own timerfd.
    unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
}

fn stall_timer() -> io::Result<OwnedFd> {
    // SAFETY: creating a timerfd; checked below.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl TxWorker {
    fn process(&mut self, vq: &mut VirtQueue) {
        if self.blocked {
            return;
        }
        loop {
            vq.disable_notifications();
            loop {
                let chain = match vq.pop() {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(_) => return,
                };
                // Bounded by MAX_CHAIN_BYTES through the chain limits.
                let len = chain.readable_len() as usize;
                self.buf.resize(len, 0);
                // The one copy out of guest memory.
                let congested = match chain.reader().read_exact(&mut self.buf) {
                    Ok(()) => self.port.output(&self.buf),
                    Err(e) => {
                        guest_error!("queue {}: transmit buffer: {e}", vq.index());
                        false
                    }
                };
                vq.complete(chain.head(), 0);
                if congested {
                    // Wait for the host side (at most STALL_MS) before taking more.
                    self.blocked = true;
                    arm(&self.stall, STALL_MS);
                    vq.notify();
                    return;
                }
            }
            vq.notify();
            match vq.enable_notifications() {
                Ok(true) => continue,
                _ => break,
            }
        }
        if self.buf.capacity() > 64 << 10 {
            self.buf = Vec::new();
        }
    }

    fn unblock(&mut self, vq: &mut VirtQueue) {
        self.blocked = false;
        arm(&self.stall, 0);
        self.process(vq);
    }
}

/// Control receive queue: messages for the driver.
pub struct ControlRxWorker {
    control: Arc<Control>,
}

impl ControlRxWorker {
    fn deliver(&mut self, vq: &mut VirtQueue) {
        let c = self.control.clone();
        let Ok(mut q) = c.pending.lock() else { return };
        let mut used = false;
        while let Some(ev) = q.front() {
            let chain = match vq.pop() {
                Ok(Some(ch)) => ch,
                Ok(None) => match vq.enable_notifications() {
                    Ok(true) => continue,
                    _ => break,
                },
                Err(_) => break,
            };
            let bytes = ev.encode();
            let mut w = chain.writer();
            let room = usize::try_from(w.available()).unwrap_or(usize::MAX);
            if room < CONTROL_HDR_LEN {
                c.stats.bad_buffers.fetch_add(1, Ordering::Relaxed);
                guest_error!("queue {}: control buffer of {room} bytes", vq.index());
                vq.complete(chain.head(), 0);
                used = true;
                continue;
            }
            let n = bytes.len().min(room);
            let len = match w.write_all(&bytes[..n]) {
                Ok(()) => n as u32,
                Err(_) => 0,
            };
            vq.complete_chain(&chain, len);
            used = true;
            q.pop_front();
        }
        drop(q);
        if used {
            vq.notify();
            // After the messages went out: a crash in between sends one
            // again (harmless: Linux takes each again), never loses one.
            c.persist();
        }
    }
}

/// Control transmit queue: messages from the driver.
pub struct ControlTxWorker {
    control: Arc<Control>,
}

impl ControlTxWorker {
    fn process(&mut self, vq: &mut VirtQueue) {
        let ports = self.control.ports.len() as u32;
        loop {
            vq.disable_notifications();
            loop {
                let chain = match vq.pop() {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(_) => return,
                };
                match ControlMsg::parse(&chain, ports) {
                    Ok(ev) => {
                        self.control.handle(ev);
                        // Before the driver sees the message used.
                        self.control.persist();
                    }
                    Err(e) => {
                        self.control
                            .stats
                            .malformed_control
                            .fetch_add(1, Ordering::Relaxed);
                        guest_error!("queue {}: head {}: {e}", vq.index(), chain.head());
                    }
                }
                vq.complete(chain.head(), 0);
            }
            vq.notify();
            match vq.enable_notifications() {
                Ok(true) => continue,
                _ => break,
            }
        }
    }
}

/// The worker of one queue, by role.
pub enum ConsoleWorker {
    /// Port receive queue.
    PortRx(RxWorker),
    /// Port transmit queue.
    PortTx(TxWorker),
    /// Control receive queue.
    ControlRx(ControlRxWorker),
    /// Control transmit queue.
    ControlTx(ControlTxWorker),
}

impl QueueWorker for ConsoleWorker {
    fn fds(&self) -> Vec<RawFd> {
        match self {
            ConsoleWorker::PortRx(w) => vec![w.port.input_fd(), w.port.event_fd()],
            ConsoleWorker::PortTx(w) => vec![w.port.out_fd(), w.stall.as_raw_fd()],
            ConsoleWorker::ControlRx(w) => vec![w.control.wake.as_raw_fd()],
            _ => Vec::new(),
        }
    }

    fn on_kick(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        match self {
            ConsoleWorker::PortRx(w) => {
                // Handle host events first (a client may be waiting).
                let ev = w.port.handle_events();
                if let Some((c, r)) = ev.resized {
                    w.control.port_resized(w.port.id(), c, r);
                }
                w.pump(vq, ctl);
            }
            ConsoleWorker::PortTx(w) => w.process(vq),
            ConsoleWorker::ControlRx(w) => w.deliver(vq),
            ConsoleWorker::ControlTx(w) => w.process(vq),
        }
    }

    fn on_fd(&mut self, vq: &mut VirtQueue, index: usize, ctl: &WorkerCtl) {
        match self {
            ConsoleWorker::PortRx(w) => {
                if index == 1 {
                    let ev = w.port.handle_events();
                    if let Some((c, r)) = ev.resized {
                        w.control.port_resized(w.port.id(), c, r);
                    }
                }
                w.pump(vq, ctl);
            }
            ConsoleWorker::PortTx(w) => {
                if index == 0 {
                    if !w.port.handle_out_events() && w.blocked {
                        w.unblock(vq);
                    }
                } else {
                    let mut b = [0u8; 8];
                    // SAFETY: reading the expiry count of our timerfd into 8 bytes.
                    unsafe { libc::read(w.stall.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
                    if w.blocked {
                        w.port.give_up_waiting();
                        w.unblock(vq);
                    }
                }
            }
            ConsoleWorker::ControlRx(w) => {
                let _ = w.control.wake.read();
                w.deliver(vq);
            }
            _ => {}
        }
    }

    fn drain(&mut self, vq: &mut VirtQueue) {
        if let ConsoleWorker::PortRx(w) = self
            && let Some(chain) = w.held.take()
        {
            // The receive buffer held for input goes back on the ring (the
            // next avail index moves back over it), so stops and swaps never
            // eat the guest's buffers; used empty only if it cannot.
            if !vq.give_back(&[chain.head()]).is_empty() {
                vq.complete(chain.head(), 0);
                vq.notify();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_device_drops_its_ports() {
        use crate::port::HostSpec;
        let path =
            std::env::temp_dir().join(format!("bulkhead-console-drop-{}", std::process::id()));
        let (port, _) = Port::open(0, None, &HostSpec::File(path.clone()), 64).unwrap();
        let dev = ConsoleDevice::new(vec![port]).unwrap();
        let port = Arc::downgrade(&dev.ports()[0]);
        assert!(dev.ports()[0].stats_json()["device"].is_object());
        drop(dev);
        let _ = std::fs::remove_file(&path);
        assert!(
            port.upgrade().is_none(),
            "the ports (and their fds) outlive the device"
        );
    }

    #[test]
    fn queue_roles_follow_the_spec_layout() {
        assert_eq!(role(0), Role::PortRx(0));
        assert_eq!(role(1), Role::PortTx(0));
        assert_eq!(role(2), Role::ControlRx);
        assert_eq!(role(3), Role::ControlTx);
        assert_eq!(role(4), Role::PortRx(1));
        assert_eq!(role(5), Role::PortTx(1));
        assert_eq!(role(7), Role::PortTx(2));
    }
}
