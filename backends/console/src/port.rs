//! The host side of each port: a unix socket that clients attach to, a pty,
//! an appended log file, or the daemon's stdio; plus the bounded scrollback
//! that holds guest output nobody has read yet.
//!
//! Every fd is nonblocking, so neither direction ever blocks a queue thread:
//! guest output that the host side cannot take now goes to the scrollback,
//! which drops its oldest bytes when full; host input is read only straight
//! into a guest receive buffer, so when the guest posts none the daemon stops
//! reading (back-pressure).
//!
//! While a client (or pty reader, or stdout) is attached and keeps up, output
//! is lossless: the transmit worker stops taking guest buffers while output
//! is pending and resumes when the host side drained it. If the host side
//! makes no progress for [`STALL_MS`], the port stops waiting for it and the
//! scrollback drops its oldest bytes instead, until the host side catches up.
//!
//! Each port has three epoll sets: the *input* set (the fd host input comes
//! from; the receive worker stops watching it while the guest has no
//! buffers), the *event* set (new clients, resize commands, the
//! terminal-size poll timer, wake-ups; receive worker) and the *output* set
//! (room to write pending output, hang-ups; transmit worker).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bulkhead_common::event::{EventLoop, EventToken, Interest};
use vmm_sys_util::eventfd::EventFd;

/// Default scrollback per port.
pub const DEFAULT_SCROLLBACK: usize = 64 << 10;
/// Longest port name.
pub const MAX_NAME_LEN: usize = crate::request::MAX_NAME_LEN;
/// Resize-control clients served at once per port.
const MAX_CTL_CLIENTS: usize = 4;
/// Longest resize-control command line.
const MAX_CTL_LINE: usize = 256;
/// How long guest output waits for a host side that takes nothing, in milliseconds.
pub const STALL_MS: i64 = 500;
/// How often a pty's or terminal's size is polled, in milliseconds.
const WINSIZE_POLL_MS: i64 = 250;

/// What the event set reports (receive worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostEvent {
    /// The port's wake eventfd.
    Wake,
    /// A client connects to the socket.
    Listener,
    /// A client connects to the resize-control socket.
    CtlListener,
    /// Time to poll the terminal's size.
    Timer,
    /// A resize-control client (its fd) sent something.
    CtlClient(usize),
}
bulkhead_common::event_token!(HostEvent { Wake, Listener, CtlListener, Timer; CtlClient });

/// What the output set reports (transmit worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutEvent {
    /// The host side can take output, or hung up.
    Out,
    /// The port's output wake eventfd.
    Wake,
}
bulkhead_common::event_token!(OutEvent { Out, Wake });

/// The one fd of the input set: where host input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InEvent {
    /// Host input is readable.
    Host,
}
bulkhead_common::event_token!(InEvent { Host });

/// Where a port's host side is, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostSpec {
    /// A unix socket server at this path (plus `PATH.ctl` for resize commands).
    Socket(PathBuf),
    /// A new pty; its path is printed and written to a file.
    Pty,
    /// Output appended to this file; no input.
    File(PathBuf),
    /// The daemon's stdin and stdout.
    Stdio,
}

/// One `--console` or `--port` argument.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PortSpec {
    /// Port name sent to the guest (PORT_NAME); named ports only.
    pub name: Option<String>,
    /// Host side; `None` means a socket beside the vhost-user socket.
    pub host: Option<HostSpec>,
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("port name must be 1 to {MAX_NAME_LEN} bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b',' && b != b'=')
    {
        return Err("port name must be printable ASCII without ',' or '='".into());
    }
    Ok(())
}

impl FromStr for PortSpec {
    type Err = String;

    /// `name=NAME,socket=PATH|pty|file=PATH|stdio`, every part optional.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = PortSpec::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            let host = match (key, value) {
                ("name", Some(v)) => {
                    check_name(v)?;
                    spec.name = Some(v.to_string());
                    continue;
                }
                ("socket", Some(v)) if !v.is_empty() => HostSpec::Socket(PathBuf::from(v)),
                ("file", Some(v)) if !v.is_empty() => HostSpec::File(PathBuf::from(v)),
                ("pty", None) => HostSpec::Pty,
                ("stdio", None) => HostSpec::Stdio,
                _ => {
                    return Err(format!(
                        "unknown `{part}`: expected name=NAME, socket=PATH, pty, file=PATH or stdio"
                    ));
                }
            };
            if spec.host.replace(host).is_some() {
                return Err("give one of socket=, pty, file= or stdio".into());
            }
        }
        Ok(spec)
    }
}

/// Bounded FIFO of guest output not yet delivered; drops its oldest bytes when full.
#[derive(Debug)]
pub struct Scrollback {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Scrollback {
    /// An empty scrollback of at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Scrollback {
            buf: VecDeque::new(),
            cap,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the capacity; returns how many were dropped.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let keep = data.len().min(self.cap);
        let dropped_new = data.len() - keep;
        let over = (self.buf.len() + keep).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(&data[dropped_new..]);
        if self.buf.is_empty() {
            // Give the memory back after a burst.
            self.buf.shrink_to(4096);
        }
        over + dropped_new
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The oldest contiguous run of bytes.
    pub fn front(&self) -> &[u8] {
        self.buf.as_slices().0
    }

    /// Forgets the `n` oldest bytes (they were delivered).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        self.buf.drain(..n);
        if self.buf.is_empty() {
            self.buf.shrink_to(4096);
        }
    }
}

/// Counters of one port.
#[derive(Default, Debug)]
pub struct PortStats {
    /// Bytes the guest sent (tx queue and emergency writes).
    pub from_guest: AtomicU64,
    /// Bytes handed to the host side (socket client, pty, file, stdout).
    pub delivered: AtomicU64,
    /// Bytes dropped from the scrollback when it was full.
    pub dropped: AtomicU64,
    /// Bytes read from the host side into guest buffers.
    pub to_guest: AtomicU64,
    /// Socket clients attached so far.
    pub attaches: AtomicU64,
    /// Host-side write errors (a log file that failed, say).
    pub write_errors: AtomicU64,
}

/// What reading host input into a guest buffer gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// This many bytes were written into the buffer.
    Data(usize),
    /// Nothing to read now (no client, no data, or it just went away).
    Idle,
}

/// What the event set reported, for the worker to act on.
#[derive(Debug, Default)]
pub struct Events {
    /// The host side's terminal size changed to (cols, rows).
    pub resized: Option<(u16, u16)>,
}

struct Client {
    stream: UnixStream,
    /// The peer hung up: no longer watched for output, still drained of input.
    hup: bool,
}

struct CtlClient {
    stream: UnixStream,
    line: Vec<u8>,
}

enum Kind {
    Socket {
        listener: UnixListener,
        ctl: UnixListener,
        client: Option<Client>,
        ctl_clients: Vec<CtlClient>,
    },
    Pty {
        master: File,
        /// Held open so the master never reports a hang-up between users.
        _slave: File,
    },
    File(File),
    Stdio {
        /// stdin can be polled and has not reached end of file.
        input: bool,
        /// stdout can be polled (not a regular file) and has not failed.
        out_pollable: bool,
        out_broken: bool,
    },
}

struct Host {
    kind: Kind,
    pending: Scrollback,
    out_armed: bool,
    timer: Option<OwnedFd>,
    /// The host side did not drain in time: output drops into the scrollback without waiting.
    stalled: bool,
}

/// Per-device counters and resize state the ports' control sockets report.
pub trait StatsSource: Send + Sync {
    /// A JSON object of device-wide counters.
    fn device_stats(&self) -> serde_json::Value;
}

/// One port's host side and its guest-side flags, shared by its two queue workers.
pub struct Port {
    id: u32,
    name: Option<String>,
    what: String,
    input_ep: EventLoop<InEvent>,
    event_ep: EventLoop<HostEvent>,
    out_ep: EventLoop<OutEvent>,
    wake: EventFd,
    out_wake: EventFd,
    host: Mutex<Host>,
    guest_open: AtomicBool,
    ready: AtomicBool,
    /// (cols << 16) | rows; 0 while unknown.
    size: AtomicU32,
    /// Counters.
    pub stats: PortStats,
    /// Weak: the device's control plane owns the ports (no reference cycle).
    device_stats: Mutex<Option<Weak<dyn StatsSource>>>,
}

/// Stops watching `fd` in `set` (it may not be there: nothing to do then).
fn ep_del<T: EventToken>(set: &EventLoop<T>, fd: RawFd) {
    let _ = set.delete_raw(fd);
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl flag calls on an fd we hold.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A nonblocking write (send without SIGPIPE for sockets).
fn write_nb(fd: RawFd, data: &[u8], socket: bool) -> io::Result<usize> {
    loop {
        // SAFETY: writing from a live buffer of the given length to an fd we hold.
        let n = unsafe {
            if socket {
                libc::send(
                    fd,
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            } else {
                libc::write(fd, data.as_ptr().cast(), data.len())
            }
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The terminal size of `fd` as (cols, rows), if it is a terminal with a size.
fn winsize(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize struct.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above; ws outlives the call.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } < 0 {
        return None;
    }
    (ws.ws_col != 0 && ws.ws_row != 0).then_some((ws.ws_col, ws.ws_row))
}

fn make_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios calls on a terminal fd we hold, with a zeroed struct filled by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(fd, libc::TCSANOW, &t) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn timer(ms: i64) -> io::Result<OwnedFd> {
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
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let ts = libc::timespec {
        tv_sec: ms / 1000,
        tv_nsec: (ms % 1000) * 1_000_000,
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: arming our timerfd with a valid itimerspec.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Path of the resize-control socket beside a port's socket.
pub fn ctl_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// Opens a new pty: (master, slave, slave path). The slave is put in raw mode.
fn open_pty() -> io::Result<(File, File, PathBuf)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: m is a fresh fd we own.
    let master = unsafe { File::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt/ptsname_r on our master, into a buffer of the given size.
    unsafe {
        if libc::grantpt(m) < 0
            || libc::unlockpt(m) < 0
            || libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into name.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let path = PathBuf::from(path.to_string_lossy().into_owned());
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&path)?;
    make_raw(slave.as_raw_fd())?;
    set_nonblocking(m)?;
    Ok((master, slave, path))
}

use std::os::unix::fs::OpenOptionsExt;

/// Terminal settings of stdin to restore at exit, when the stdio port put it in raw mode.
pub struct StdinRestore(libc::termios);

impl StdinRestore {
    /// Restores stdin's terminal settings.
    pub fn restore(&self) {
        // SAFETY: restoring settings read earlier from the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

impl Port {
    /// Sets up port `id` (listening, opening the pty or the file).
    ///
    /// Returns the port and, for a stdio port on a terminal, the settings to restore at exit.
    pub fn open(
        id: u32,
        name: Option<String>,
        host: &HostSpec,
        scrollback: usize,
    ) -> io::Result<(Self, Option<StdinRestore>)> {
        let input_ep = EventLoop::new()?;
        let event_ep = EventLoop::new()?;
        let out_ep = EventLoop::new()?;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        event_ep.add(&wake, Interest::READ, HostEvent::Wake)?;
        let out_wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        out_ep.add(&out_wake, Interest::READ, OutEvent::Wake)?;
        let mut restore = None;
        let mut size = None;
        let mut timer_fd = None;
        let (kind, what) = match host {
            HostSpec::Socket(path) => {
                let listener = bind(path)?;
                let cpath = ctl_path(path);
                let ctl = bind(&cpath)?;
                event_ep.add(&listener, Interest::READ, HostEvent::Listener)?;
                event_ep.add(&ctl, Interest::READ, HostEvent::CtlListener)?;
                (
                    Kind::Socket {
                        listener,
                        ctl,
                        client: None,
                        ctl_clients: Vec::new(),
                    },
                    format!("socket {} (resize: {})", path.display(), cpath.display()),
                )
            }
            HostSpec::Pty => {
                let (master, slave, path) = open_pty()?;
                input_ep.add(&master, Interest::READ, InEvent::Host)?;
                out_ep.add(&master, Interest::NONE, OutEvent::Out)?;
                size = winsize(master.as_raw_fd());
                let t = timer(WINSIZE_POLL_MS)?;
                event_ep.add(&t, Interest::READ, HostEvent::Timer)?;
                timer_fd = Some(t);
                (
                    Kind::Pty {
                        master,
                        _slave: slave,
                    },
                    format!("pty {}", path.display()),
                )
            }
            HostSpec::File(path) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
                    })?;
                (Kind::File(f), format!("file {}", path.display()))
            }
            HostSpec::Stdio => {
                // SAFETY: isatty has no memory effects.
                if unsafe { libc::isatty(0) } == 1 {
                    // SAFETY: reading stdin's settings into a zeroed struct.
                    let mut t: libc::termios = unsafe { std::mem::zeroed() };
                    // SAFETY: as above.
                    if unsafe { libc::tcgetattr(0, &mut t) } == 0 {
                        restore = Some(StdinRestore(t));
                        make_raw(0)?;
                    }
                    size = winsize(0);
                    let t = timer(WINSIZE_POLL_MS)?;
                    event_ep.add(&t, Interest::READ, HostEvent::Timer)?;
                    timer_fd = Some(t);
                }
                let input = set_nonblocking(0).is_ok()
                    && input_ep.add_raw(0, Interest::READ, InEvent::Host).is_ok();
                let out_pollable = set_nonblocking(1).is_ok()
                    && out_ep.add_raw(1, Interest::NONE, OutEvent::Out).is_ok();
                (
                    Kind::Stdio {
                        input,
                        out_pollable,
                        out_broken: false,
                    },
                    "stdio".to_string(),
                )
            }
        };
        let packed = size.map(|(c, r)| (u32::from(c) << 16) | u32::from(r));
        Ok((
            Port {
                id,
                name,
                what,
                input_ep,
                event_ep,
                out_ep,
                wake,
                out_wake,
                host: Mutex::new(Host {
                    kind,
                    pending: Scrollback::new(scrollback),
                    out_armed: false,
                    timer: timer_fd,
                    stalled: false,
                }),
                guest_open: AtomicBool::new(false),
                ready: AtomicBool::new(false),
                size: AtomicU32::new(packed.unwrap_or(0)),
                stats: PortStats::default(),
                device_stats: Mutex::new(None),
            },
            restore,
        ))
    }

    /// Port number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Name sent to the guest, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// What the host side is, for logs.
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Lets the control socket report device-wide counters too.
    pub fn set_stats_source(&self, src: Arc<dyn StatsSource>) {
        if let Ok(mut g) = self.device_stats.lock() {
            *g = Some(Arc::downgrade(&src));
        }
    }

    /// The epoll set host input comes from (watch it only while the guest has buffers).
    pub fn input_fd(&self) -> RawFd {
        self.input_ep.as_raw_fd()
    }

    /// The epoll set of host events.
    pub fn event_fd(&self) -> RawFd {
        self.event_ep.as_raw_fd()
    }

    /// The epoll set of output readiness (for the transmit worker).
    pub fn out_fd(&self) -> RawFd {
        self.out_ep.as_raw_fd()
    }

    /// Pokes the receive worker (the guest opened or closed the port).
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Whether a guest process has the port open (input flows only then).
    pub fn guest_open(&self) -> bool {
        self.guest_open.load(Ordering::Acquire)
    }

    /// Records that the guest opened or closed the port.
    pub fn set_guest_open(&self, open: bool) {
        self.guest_open.store(open, Ordering::Release);
    }

    /// Whether the driver reported the port ready.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Records the driver's PORT_READY.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Terminal size (cols, rows), if known.
    pub fn size(&self) -> Option<(u16, u16)> {
        let v = self.size.load(Ordering::Acquire);
        (v != 0).then_some(((v >> 16) as u16, v as u16))
    }

    /// Sets the size; returns true if it changed.
    pub fn set_size(&self, cols: u16, rows: u16) -> bool {
        let v = (u32::from(cols) << 16) | u32::from(rows);
        self.size.swap(v, Ordering::AcqRel) != v
    }

    /// Bytes of guest output waiting in the scrollback.
    pub fn scrollback_len(&self) -> usize {
        self.lock().map(|h| h.pending.len()).unwrap_or(0)
    }

    fn lock(&self) -> Option<MutexGuard<'_, Host>> {
        self.host.lock().ok()
    }

    /// Back to power-on state on the guest side; the host side (clients, scrollback) stays.
    pub fn reset_guest(&self) {
        self.set_guest_open(false);
        self.set_ready(false);
    }

    /// Guest output: delivered now if the host side takes it, else kept in the
    /// scrollback. Returns true when the caller should wait for the host side
    /// to drain before sending more (see [`Port::handle_out_events`]).
    pub fn output(&self, data: &[u8]) -> bool {
        self.stats
            .from_guest
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let Some(mut h) = self.lock() else {
            return false;
        };
        if let Kind::File(f) = &mut h.kind {
            match f.write_all(data) {
                Ok(()) => {
                    self.stats
                        .delivered
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    bulkhead_common::rate_limited!(
                        log::Level::Warn,
                        "port {}: writing the log file: {e}",
                        self.id
                    );
                }
            }
            return false;
        }
        let mut rest = data;
        if h.pending.is_empty()
            && let Some((fd, socket)) = out_fd(&h.kind)
        {
            match write_nb(fd, data, socket) {
                Ok(n) => {
                    self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
                    rest = &data[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => self.out_failed(&mut h, &e),
            }
        }
        if !rest.is_empty() {
            let dropped = h.pending.push(rest);
            self.stats
                .dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        self.update_out_interest(&mut h);
        congested(&h)
    }

    /// Handles output readiness (transmit worker); returns whether output is still congested.
    pub fn handle_out_events(&self) -> bool {
        let evs = self.out_ep.wait(Some(Duration::ZERO)).unwrap_or_default();
        let Some(mut h) = self.lock() else {
            return false;
        };
        for ev in &evs {
            match ev.token {
                OutEvent::Wake => {
                    let _ = self.out_wake.read();
                }
                OutEvent::Out => {
                    if ev.writable {
                        self.flush(&mut h);
                    }
                    if ev.hangup {
                        self.hung_up(&mut h);
                    }
                }
            }
        }
        congested(&h)
    }

    /// The host side made no progress in time: stop waiting for it (drop-oldest) until it drains.
    pub fn give_up_waiting(&self) {
        if let Some(mut h) = self.lock()
            && !h.stalled
            && congested(&h)
        {
            bulkhead_common::rate_limited!(
                log::Level::Info,
                "port {}: host side not reading; dropping the oldest output beyond the scrollback",
                self.id
            );
            h.stalled = true;
        }
    }

    /// Writes scrollback bytes while the host side takes them.
    fn flush(&self, h: &mut Host) {
        while !h.pending.is_empty() {
            let Some((fd, socket)) = out_fd(&h.kind) else {
                break;
            };
            match write_nb(fd, h.pending.front(), socket) {
                Ok(0) => break,
                Ok(n) => {
                    h.pending.consume(n);
                    self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
                    if h.pending.is_empty() {
                        h.stalled = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.out_failed(h, &e);
                    break;
                }
            }
        }
        self.update_out_interest(h);
    }

    /// The output fd failed for good: a socket client is detached, stdout given up.
    fn out_failed(&self, h: &mut Host, e: &io::Error) {
        match &mut h.kind {
            Kind::Socket { client, .. } => {
                if let Some(c) = client.take() {
                    bulkhead_common::rate_limited!(
                        log::Level::Info,
                        "port {}: client detached ({e})",
                        self.id
                    );
                    self.forget_client(&c);
                }
            }
            Kind::Stdio { out_broken, .. } => {
                if !*out_broken {
                    bulkhead_common::rate_limited!(
                        log::Level::Warn,
                        "port {}: stdout failed ({e}); output kept in the scrollback",
                        self.id
                    );
                }
                *out_broken = true;
                ep_del(&self.out_ep, 1);
            }
            Kind::Pty { .. } => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            Kind::File(_) => {}
        }
        h.out_armed = false;
    }

    fn forget_client(&self, c: &Client) {
        ep_del(&self.input_ep, c.stream.as_raw_fd());
        ep_del(&self.out_ep, c.stream.as_raw_fd());
        // A transmit worker waiting for this client must re-evaluate.
        let _ = self.out_wake.write(1);
    }

    /// Watches for room to write exactly while output is pending.
    fn update_out_interest(&self, h: &mut Host) {
        let fd = match &h.kind {
            Kind::Socket {
                client: Some(c), ..
            } if !c.hup => Some(c.stream.as_raw_fd()),
            Kind::Pty { master, .. } => Some(master.as_raw_fd()),
            Kind::Stdio {
                out_pollable: true,
                out_broken: false,
                ..
            } => Some(1),
            _ => None,
        };
        let want = fd.is_some() && !h.pending.is_empty();
        if let Some(fd) = fd
            && want != h.out_armed
        {
            let ev = if want {
                Interest::WRITE
            } else {
                Interest::NONE
            };
            if self.out_ep.modify_raw(fd, ev, OutEvent::Out).is_ok() {
                h.out_armed = want;
            }
        } else if fd.is_none() {
            h.out_armed = false;
        }
    }

    /// Reads host input straight into the guest buffer `iov` (one copy, by the kernel).
    pub fn read_input(&self, iov: &[libc::iovec]) -> Input {
        let Some(mut h) = self.lock() else {
            return Input::Idle;
        };
        let fd = match &h.kind {
            Kind::Socket {
                client: Some(c), ..
            } => c.stream.as_raw_fd(),
            Kind::Pty { master, .. } => master.as_raw_fd(),
            Kind::Stdio { input: true, .. } => 0,
            _ => return Input::Idle,
        };
        let cnt = iov.len().min(1024) as libc::c_int;
        // SAFETY: the iovecs point into guest memory kept mapped by the caller's
        // chain snapshot; readv writes at most their lengths.
        let n = unsafe { libc::readv(fd, iov.as_ptr(), cnt) };
        if n > 0 {
            self.stats.to_guest.fetch_add(n as u64, Ordering::Relaxed);
            return Input::Data(n as usize);
        }
        let err = (n < 0).then(io::Error::last_os_error);
        if let Some(e) = &err
            && matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            )
        {
            return Input::Idle;
        }
        // End of input, or an error: this source is done.
        match &mut h.kind {
            Kind::Socket { client, .. } => {
                if let Some(c) = client.take() {
                    bulkhead_common::rate_limited!(
                        log::Level::Info,
                        "port {}: client detached",
                        self.id
                    );
                    self.forget_client(&c);
                }
                h.out_armed = false;
            }
            Kind::Stdio { input, .. } => {
                *input = false;
                ep_del(&self.input_ep, 0);
            }
            Kind::Pty { .. } | Kind::File(_) => {}
        }
        Input::Idle
    }

    /// Handles whatever the event set reports (never blocks).
    pub fn handle_events(&self) -> Events {
        let mut out = Events::default();
        let evs = self.event_ep.wait(Some(Duration::ZERO)).unwrap_or_default();
        if evs.is_empty() {
            return out;
        }
        let Some(mut h) = self.lock() else {
            return out;
        };
        for ev in &evs {
            match ev.token {
                HostEvent::Wake => {
                    let _ = self.wake.read();
                }
                HostEvent::Listener => self.accept(&mut h),
                HostEvent::CtlListener => self.accept_ctl(&mut h),
                HostEvent::Timer => {
                    if let Some(t) = &h.timer {
                        let mut b = [0u8; 8];
                        // SAFETY: reading the 8-byte expiry count of our timerfd.
                        unsafe { libc::read(t.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
                    }
                    let fd = match &h.kind {
                        Kind::Pty { master, .. } => Some(master.as_raw_fd()),
                        Kind::Stdio { .. } => Some(0),
                        _ => None,
                    };
                    if let Some((c, r)) = fd.and_then(winsize)
                        && self.set_size(c, r)
                    {
                        out.resized = Some((c, r));
                    }
                }
                HostEvent::CtlClient(fd) => {
                    if let Ok(fd) = RawFd::try_from(fd)
                        && let Some(sz) = self.ctl_readable(&mut h, fd)
                    {
                        out.resized = Some(sz);
                    }
                }
            }
        }
        out
    }

    fn hung_up(&self, h: &mut Host) {
        match &mut h.kind {
            Kind::Socket {
                client: Some(c), ..
            } => {
                // Keep draining its input; stop watching it for output.
                c.hup = true;
                ep_del(&self.out_ep, c.stream.as_raw_fd());
                h.out_armed = false;
            }
            Kind::Stdio { out_broken, .. } => {
                *out_broken = true;
                ep_del(&self.out_ep, 1);
                h.out_armed = false;
            }
            _ => {}
        }
    }

    fn accept(&self, h: &mut Host) {
        let Kind::Socket {
            listener, client, ..
        } = &mut h.kind
        else {
            return;
        };
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    bulkhead_common::rate_limited!(
                        log::Level::Warn,
                        "port {}: accept: {e}",
                        self.id
                    );
                }
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let fd = stream.as_raw_fd();
        if let Some(old) = client.take() {
            bulkhead_common::rate_limited!(
                log::Level::Info,
                "port {}: a new client replaces the attached one",
                self.id
            );
            self.forget_client(&old);
        }
        let rdhup = Interest {
            read: true,
            write: false,
            hangup: true,
        };
        if self.input_ep.add_raw(fd, rdhup, InEvent::Host).is_err()
            || self
                .out_ep
                .add_raw(fd, Interest::NONE, OutEvent::Out)
                .is_err()
        {
            ep_del(&self.input_ep, fd);
            return;
        }
        *client = Some(Client { stream, hup: false });
        h.out_armed = false;
        self.stats.attaches.fetch_add(1, Ordering::Relaxed);
        bulkhead_common::rate_limited!(
            log::Level::Info,
            "port {}: client attached ({} bytes of scrollback)",
            self.id,
            h.pending.len()
        );
        // The scrollback goes first.
        h.stalled = false;
        self.flush(h);
        let _ = self.out_wake.write(1);
    }

    fn accept_ctl(&self, h: &mut Host) {
        let Kind::Socket {
            ctl, ctl_clients, ..
        } = &mut h.kind
        else {
            return;
        };
        let Ok((stream, _)) = ctl.accept() else {
            return;
        };
        if ctl_clients.len() >= MAX_CTL_CLIENTS || stream.set_nonblocking(true).is_err() {
            return;
        }
        let fd = stream.as_raw_fd();
        let Ok(token) = usize::try_from(fd).map(HostEvent::CtlClient) else {
            return;
        };
        if self.event_ep.add_raw(fd, Interest::READ, token).is_ok() {
            ctl_clients.push(CtlClient {
                stream,
                line: Vec::new(),
            });
        }
    }

    /// Reads resize-control commands; returns a new size if one was set.
    fn ctl_readable(&self, h: &mut Host, fd: RawFd) -> Option<(u16, u16)> {
        let Kind::Socket { ctl_clients, .. } = &mut h.kind else {
            return None;
        };
        let i = ctl_clients
            .iter()
            .position(|c| c.stream.as_raw_fd() == fd)?;
        let mut buf = [0u8; 256];
        // SAFETY: reading into a local buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let mut resized = None;
        let mut close = n == 0;
        if n < 0 {
            let e = io::Error::last_os_error();
            close = e.kind() != io::ErrorKind::WouldBlock;
        } else if n > 0 {
            let c = &mut ctl_clients[i];
            c.line.extend_from_slice(&buf[..n as usize]);
            while let Some(pos) = c.line.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = c.line.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                let (reply, size) = self.command(line.trim());
                if let Some((cols, rows)) = size
                    && self.set_size(cols, rows)
                {
                    resized = Some((cols, rows));
                }
                let _ = write_nb(fd, reply.as_bytes(), true);
            }
            if c.line.len() > MAX_CTL_LINE {
                let _ = write_nb(fd, b"error: line too long\n", true);
                close = true;
            }
        }
        if close {
            ep_del(&self.event_ep, fd);
            ctl_clients.swap_remove(i);
        }
        resized
    }

    /// Runs one control command; returns the reply line and a size to set.
    fn command(&self, line: &str) -> (String, Option<(u16, u16)>) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["resize", cols, rows] => match (cols.parse::<u16>(), rows.parse::<u16>()) {
                (Ok(c), Ok(r)) if c > 0 && r > 0 => ("ok\n".into(), Some((c, r))),
                _ => ("error: resize COLS ROWS, each 1..=65535\n".into(), None),
            },
            ["size"] => match self.size() {
                Some((c, r)) => (format!("{c} {r}\n"), None),
                None => ("unknown\n".into(), None),
            },
            ["stats"] => (format!("{}\n", self.stats_json()), None),
            _ => (
                "error: commands are `resize COLS ROWS`, `size`, `stats`\n".into(),
                None,
            ),
        }
    }

    /// The port's counters (and the device's) as one JSON object.
    pub fn stats_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let device = self
            .device_stats
            .lock()
            .ok()
            .and_then(|g| g.as_ref().and_then(Weak::upgrade))
            .map(|d| d.device_stats())
            .unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "port": self.id,
            "name": self.name,
            "from_guest": l(&s.from_guest),
            "delivered": l(&s.delivered),
            "dropped": l(&s.dropped),
            "to_guest": l(&s.to_guest),
            "attaches": l(&s.attaches),
            "write_errors": l(&s.write_errors),
            "device": device,
        })
    }
}

/// Whether output is pending for a host side that is expected to drain it.
fn congested(h: &Host) -> bool {
    !h.pending.is_empty() && !h.stalled && out_fd(&h.kind).is_some()
}

/// The fd guest output goes to now, and whether it is a socket.
fn out_fd(kind: &Kind) -> Option<(RawFd, bool)> {
    match kind {
        Kind::Socket {
            client: Some(c), ..
        } if !c.hup => Some((c.stream.as_raw_fd(), true)),
        Kind::Pty { master, .. } => Some((master.as_raw_fd(), false)),
        Kind::Stdio {
            out_broken: false, ..
        } => Some((1, false)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn parses_port_specs() {
        let s: PortSpec = "name=org.example.log,socket=/tmp/x".parse().unwrap();
        assert_eq!(s.name.as_deref(), Some("org.example.log"));
        assert_eq!(s.host, Some(HostSpec::Socket("/tmp/x".into())));
        assert_eq!("pty".parse::<PortSpec>().unwrap().host, Some(HostSpec::Pty));
        assert_eq!(
            "stdio".parse::<PortSpec>().unwrap().host,
            Some(HostSpec::Stdio)
        );
        assert!("pty,stdio".parse::<PortSpec>().is_err());
        assert!("name=a b".parse::<PortSpec>().is_err());
        assert!("bogus=1".parse::<PortSpec>().is_err());
    }

    #[test]
    fn scrollback_drops_oldest_and_stays_bounded() {
        let mut s = Scrollback::new(8);
        assert_eq!(s.push(b"abcdef"), 0);
        assert_eq!(s.push(b"ghij"), 2);
        assert_eq!(s.len(), 8);
        let all: Vec<u8> = s.buf.iter().copied().collect();
        assert_eq!(all, b"cdefghij");
        assert_eq!(s.push(b"0123456789"), 10);
        let all: Vec<u8> = s.buf.iter().copied().collect();
        assert_eq!(all, b"23456789");
        s.consume(3);
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn socket_port_keeps_scrollback_until_a_client_attaches() {
        let dir = tempdir();
        let path = dir.join("p.sock");
        let (port, _) = Port::open(0, None, &HostSpec::Socket(path.clone()), 16).unwrap();
        port.output(b"hello ");
        port.output(b"world, this is long");
        assert_eq!(port.scrollback_len(), 16);
        let mut c = UnixStream::connect(&path).unwrap();
        port.handle_events();
        port.output(b"!");
        let mut got = vec![0u8; 17];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ld, this is long!");
        assert_eq!(port.stats.dropped.load(Ordering::Relaxed), 9);
        std::fs::remove_dir_all(&dir).ok();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "bulkhead-console-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
