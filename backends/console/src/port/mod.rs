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
//!
//! Files: `spec.rs` (the `--port` argument), `scrollback.rs`, `host.rs`
//! (sockets, pty, terminal, timer), `output.rs` (the output state machine),
//! `input.rs` (host input, client attach), `control.rs` (the `.ctl` text
//! protocol), `stats.rs` (counters and their JSON); this file holds the port
//! itself and its event sets.

mod control;
mod host;
mod input;
mod output;
mod scrollback;
mod spec;
mod stats;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bulkhead_common::event::{EventLoop, EventToken, Interest};
use vmm_sys_util::eventfd::EventFd;

pub use host::{StdinRestore, ctl_path};
use host::{bind, make_raw, open_pty, set_nonblocking, timer, winsize, write_nb};
pub use scrollback::Scrollback;
pub use spec::{HostSpec, MAX_NAME_LEN, PortSpec};
pub use stats::{PortStats, StatsSource};

/// Default scrollback per port.
pub const DEFAULT_SCROLLBACK: usize = 64 << 10;
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
        /// Clients a newer one replaced, oldest first: their output side is
        /// shut, their input is still read (ahead of the new client's) until
        /// they close, so nothing typed before the replacement is lost.
        replaced: Vec<UnixStream>,
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
                        replaced: Vec::new(),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::path::PathBuf;

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
