//! The serve loop every backend runs: listen, serve one frontend at a time
//! with fresh state, keep serving after it disconnects, and exit cleanly on
//! SIGTERM or SIGINT.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Error as VuError, VhostUserBackendReqHandlerMut};

use crate::cli::VhostUserArgs;
use crate::device::VhostUserDevice;
use crate::event::{EventLoop, Interest};
use crate::handler::BackendHandler;
use crate::rate_limited;
use crate::stats::Stats;
use crate::virtqueue::QueueStats;
use vmm_sys_util::eventfd::EventFd;

/// Errors that stop a daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Cannot listen on the socket path.
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] io::Error),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The fd given with --fd is not a unix stream socket.
    #[error("--fd {0} is not a usable unix socket")]
    BadFd(RawFd, #[source] io::Error),
    /// Neither --socket-path nor --fd was given.
    #[error("one of --socket-path or --fd is required")]
    NoSocket,
    /// Setting up signal handling or polling failed.
    #[error("event setup")]
    Setup(#[source] io::Error),
}

enum EndpointKind {
    Listener(UnixListener, Option<PathBuf>),
    Connected(Option<UnixStream>),
}

fn is_listening(fd: RawFd) -> io::Result<bool> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val != 0)
}

fn open_endpoint(args: &VhostUserArgs) -> Result<EndpointKind, DaemonError> {
    if let Some(fd) = args.fd {
        let listening = is_listening(fd).map_err(|e| DaemonError::BadFd(fd, e))?;
        // SAFETY: the caller handed us this fd to own (backend program conventions).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Make sure it does not leak into anything we might exec.
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        return Ok(if listening {
            EndpointKind::Listener(UnixListener::from(owned), None)
        } else {
            EndpointKind::Connected(Some(UnixStream::from(owned)))
        });
    }
    let path = args.socket_path.clone().ok_or(DaemonError::NoSocket)?;
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(DaemonError::NotASocket(path));
        }
        let _ = std::fs::remove_file(&path);
    }
    let l = UnixListener::bind(&path).map_err(|e| DaemonError::Listen(path.clone(), e))?;
    Ok(EndpointKind::Listener(l, Some(path)))
}

/// What ends the serve loop: readable when it is time to stop.
trait Stop {
    /// The fd that becomes readable.
    fn fd(&self) -> RawFd;
    /// The reason, once `fd` is readable (None: a spurious wake-up).
    fn take(&self) -> Option<i32>;
}

/// A signalfd for SIGTERM and SIGINT, with those signals blocked in every thread spawned later.
struct Signals(OwnedFd);

impl Signals {
    fn new() -> io::Result<Self> {
        // SAFETY: plain libc signal-mask calls on a zeroed sigset_t.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Signals(OwnedFd::from_raw_fd(fd)))
        }
    }
}

impl Stop for Signals {
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn take(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain integers; all zeroes is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading one siginfo record into a buffer of its size.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n as usize == size).then_some(info.ssi_signo as i32)
    }
}

/// An eventfd standing in for the signals (tests and fuzzing).
struct StopEvent<'a>(&'a EventFd);

impl Stop for StopEvent<'_> {
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn take(&self) -> Option<i32> {
        self.0.read().ok().map(|_| libc::SIGTERM)
    }
}

/// SIGXFSZ and SIGPIPE cannot end a daemon: a write past `RLIMIT_FSIZE`
/// fails with EFBIG and a write to a closed pipe or socket with EPIPE, as
/// any other failed write. (The frontend decides what some fds are; the
/// daemon checks them, and this is the net under that check.)
fn ignore_write_signals() -> io::Result<()> {
    for sig in [libc::SIGXFSZ, libc::SIGPIPE] {
        // SAFETY: setting a disposition to SIG_IGN; no handler code runs.
        if unsafe { libc::signal(sig, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What woke the serve loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// A signal (or the test's stop eventfd).
    Stop,
    /// The frontend's socket, or the listener.
    Conn,
}
crate::event_token!(Wake { Stop, Conn });

/// An event loop over the stop fd and `conn`, both watched for readability.
fn stop_and(stop: RawFd, conn: RawFd) -> io::Result<EventLoop<Wake>> {
    let events = EventLoop::new()?;
    events.add_raw(stop, Interest::READ, Wake::Stop)?;
    events.add_raw(conn, Interest::READ, Wake::Conn)?;
    Ok(events)
}

/// Waits until a watched fd is ready; returns the tokens that woke.
fn wait_ready(events: &EventLoop<Wake>) -> io::Result<Vec<Wake>> {
    loop {
        let ready = events.wait(None)?;
        if !ready.is_empty() {
            return Ok(ready.iter().map(|e| e.token).collect());
        }
    }
}

/// How long a frontend may take to send the rest of a message it started,
/// or to read the replies it asked for, before it is dropped. Frontends
/// send each message with one `sendmsg` and wait for each reply, so a whole
/// second is generous; a frontend that stalls longer would otherwise keep
/// the serve loop (and the next frontend) waiting for ever.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(1);

/// Bytes of a vhost-user message header.
const HEADER_LEN: usize = 12;

/// Largest payload the `vhost` crate reads (`MAX_MSG_SIZE`); it refuses a
/// header announcing more without waiting for the payload.
const MAX_PAYLOAD: usize = vhost::vhost_user::message::MAX_MSG_SIZE;

/// What [`wait_for_message`] found.
enum Next {
    /// A whole message is queued (or the peer closed the socket, which the
    /// `vhost` crate then reads as a disconnect), and a reply will not block.
    Message,
    /// Time to stop (a signal).
    Stop(i32),
    /// The frontend stalled or framed its message so that it cannot be read
    /// without blocking; the string says how.
    Stalled(&'static str),
}

/// Bytes queued on the socket, across every send of the frontend.
fn queued(conn: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(conn, libc::FIONREAD, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// The payload size the next header announces; None when fewer than
/// [`HEADER_LEN`] bytes can be peeked in one piece.
fn peek_payload_len(conn: RawFd) -> Option<usize> {
    let mut hdr = [0u8; HEADER_LEN];
    // SAFETY: peeking into a local buffer of its length; no control buffer.
    let n = unsafe {
        libc::recv(
            conn,
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    (n == HEADER_LEN as isize)
        .then(|| u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize)
}

/// Waits, for ever, for the first byte of the next message or for `stop`;
/// then up to `deadline` for the whole message and for room for its reply.
///
/// The `vhost` crate reads a message with blocking `recvmsg` calls and loops
/// on a short read, and sends a reply with blocking `sendmsg` calls: a
/// frontend that stopped halfway, or never read its replies, would keep the
/// main thread there, deaf to signals. So it gets a message only once the
/// socket holds all of it and could take a reply. A frontend that sends a
/// header with fds attached to fewer than [`HEADER_LEN`] bytes cannot be
/// read in one piece either, and is dropped.
fn wait_for_message(conn: RawFd, stop: &dyn Stop, deadline: Duration) -> io::Result<Next> {
    let events = stop_and(stop.fd(), conn)?;
    loop {
        let ready = wait_ready(&events)?;
        if ready.contains(&Wake::Stop) {
            if let Some(sig) = stop.take() {
                return Ok(Next::Stop(sig));
            }
            if !ready.contains(&Wake::Conn) {
                continue;
            }
        }
        break;
    }
    let started = Instant::now();
    loop {
        let have = queued(conn)?;
        if have == 0 {
            // Readable with nothing queued: end of stream.
            return Ok(Next::Message);
        }
        let mut need_room = false;
        if have >= HEADER_LEN {
            let Some(len) = peek_payload_len(conn) else {
                return Ok(Next::Stalled("sent fds with less than a message header"));
            };
            // A header announcing too much is refused at once: no payload to wait for.
            let need = HEADER_LEN + if len > MAX_PAYLOAD { 0 } else { len };
            if have >= need {
                events.modify_raw(conn, Interest::WRITE, Wake::Conn)?;
                let ready = events.wait(Some(Duration::ZERO))?;
                if let Some(e) = ready.iter().find(|e| e.token == Wake::Conn) {
                    // Writable; or hung up or in error, and the reply cannot
                    // go anywhere: the crate sees the error.
                    if e.writable || e.hangup {
                        return Ok(Next::Message);
                    }
                }
                need_room = true;
            }
        }
        let Some(left) = deadline.checked_sub(started.elapsed()) else {
            return Ok(Next::Stalled(if need_room {
                "did not read its replies"
            } else {
                "stopped in the middle of a message"
            }));
        };
        // Partial data keeps the socket readable: sleep in short slices on
        // the stop fd, watching for the peer to hang up or (when a reply
        // waits for room) for room.
        let interest = if need_room {
            Interest::WRITE
        } else {
            Interest::HANGUP
        };
        events.modify_raw(conn, interest, Wake::Conn)?;
        let ready = events.wait(Some(left.min(Duration::from_millis(10))))?;
        if ready.iter().any(|e| e.token == Wake::Stop)
            && let Some(sig) = stop.take()
        {
            return Ok(Next::Stop(sig));
        }
        let hung_up = ready.iter().any(|e| e.token == Wake::Conn && e.hangup);
        if !need_room && hung_up {
            // Hung up mid-message (a hang-up after a whole message was
            // caught above): nothing more will come.
            if queued(conn)? == have {
                return Ok(Next::Stalled("hung up in the middle of a message"));
            }
        }
    }
}

/// vhost-user request code of SET_VRING_ENABLE.
const SET_VRING_ENABLE: u32 = 18;
/// Header flag: this is a reply.
const FLAG_REPLY: u32 = 0x4;
/// Header flag: the frontend wants a REPLY_ACK.
const FLAG_NEED_REPLY: u32 = 0x8;

/// Answers a SET_VRING_ENABLE that arrives before SET_FEATURES acked
/// PROTOCOL_FEATURES; returns Ok(true) when it consumed one.
///
/// QEMU's vhost-user-net enables (and disables) rings as soon as the guest
/// acks its features, before it sends SET_FEATURES; the `vhost` crate refuses
/// SET_VRING_ENABLE until PROTOCOL_FEATURES is acked and would close the
/// connection, so the serve loop reads that message itself and hands it to
/// the handler. Everything else goes through the `vhost` crate.
fn early_vring_enable<D: VhostUserDevice>(
    conn: RawFd,
    handler: &Mutex<BackendHandler<D>>,
) -> io::Result<bool> {
    let mut msg = [0u8; 20];
    // SAFETY: peeking into a local buffer of its length; no control buffer.
    let n = unsafe {
        libc::recv(
            conn,
            msg.as_mut_ptr().cast(),
            12,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != 12 {
        return Ok(false);
    }
    let word = |m: &[u8; 20], i: usize| u32::from_le_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
    let (code, flags, size) = (word(&msg, 0), word(&msg, 4), word(&msg, 8));
    if code != SET_VRING_ENABLE || size != 8 {
        return Ok(false);
    }
    let Ok(mut h) = handler.lock() else {
        return Ok(false);
    };
    if h.protocol_features_acked() {
        return Ok(false);
    }
    // SAFETY: reading the whole message into a local buffer of its length.
    let n = unsafe { libc::recv(conn, msg.as_mut_ptr().cast(), msg.len(), libc::MSG_WAITALL) };
    if n != msg.len() as isize {
        return Err(io::Error::other("truncated SET_VRING_ENABLE"));
    }
    let (index, num) = (word(&msg, 12), word(&msg, 16));
    let res = match num {
        0 | 1 => h
            .set_vring_enable(index, num == 1)
            .map_err(|e| io::Error::other(e.to_string())),
        _ => Err(io::Error::other(format!("SET_VRING_ENABLE value {num}"))),
    };
    drop(h);
    if flags & FLAG_NEED_REPLY != 0 {
        send_ack(conn, SET_VRING_ENABLE, res.is_ok())?;
    }
    res.map(|()| true)
}

/// Sends the REPLY_ACK of request `code`: a u64, 0 for success.
fn send_ack(conn: RawFd, code: u32, ok: bool) -> io::Result<()> {
    let mut reply = [0u8; 20];
    reply[0..4].copy_from_slice(&code.to_le_bytes());
    reply[4..8].copy_from_slice(&(FLAG_REPLY | 1).to_le_bytes());
    reply[8..12].copy_from_slice(&8u32.to_le_bytes());
    reply[12..20].copy_from_slice(&u64::from(!ok).to_le_bytes());
    // SAFETY: sending a local buffer of its length.
    let sent = unsafe { libc::send(conn, reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL) };
    if sent != reply.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// vhost-user request code of SET_LOG_FD.
const SET_LOG_FD: u32 = 7;

/// Answers SET_LOG_FD, which the `vhost` crate refuses (it has no handler
/// method for it) and would close the connection on; returns Ok(true) when
/// it consumed one. The message carries an eventfd and no payload (a u64 is
/// tolerated); the handler checks and keeps the fd.
fn log_fd_message<D: VhostUserDevice>(
    conn: RawFd,
    handler: &Mutex<BackendHandler<D>>,
) -> io::Result<bool> {
    let mut hdr = [0u8; HEADER_LEN];
    // SAFETY: peeking into a local buffer of its length; no control buffer.
    let n = unsafe {
        libc::recv(
            conn,
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != HEADER_LEN as isize {
        return Ok(false);
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8));
    if code != SET_LOG_FD {
        return Ok(false);
    }
    if size != 0 && size != 8 {
        return Err(io::Error::other(format!(
            "SET_LOG_FD with a {size}-byte payload"
        )));
    }
    let mut msg = [0u8; HEADER_LEN + 8];
    let len = HEADER_LEN + size as usize;
    let Some((got, mut fds)) =
        crate::notify::recv_with_fds(conn, &mut msg[..len], libc::MSG_DONTWAIT)
    else {
        return Err(io::Error::other("truncated SET_LOG_FD"));
    };
    if got != len {
        return Err(io::Error::other("truncated SET_LOG_FD"));
    }
    if fds.len() != 1 {
        return Err(io::Error::other(format!(
            "SET_LOG_FD with {} fds",
            fds.len()
        )));
    }
    let Some(fd) = fds.pop() else {
        return Err(io::Error::other("SET_LOG_FD without an fd"));
    };
    let res = match handler.lock() {
        Ok(mut h) => h
            .set_log_fd(std::fs::File::from(fd))
            .map_err(|e| io::Error::other(e.to_string())),
        Err(_) => Err(io::Error::other("handler poisoned")),
    };
    if flags & FLAG_NEED_REPLY != 0 {
        send_ack(conn, SET_LOG_FD, res.is_ok())?;
    }
    res.map(|()| true)
}

/// vhost-user request code of SEND_RARP.
const SEND_RARP: u32 = 19;

/// Answers SEND_RARP, which the `vhost` crate has no handler method for
/// (it would close the connection); returns Ok(true) when it consumed one.
/// QEMU sends it on the migration destination, once the guest runs there,
/// when the guest did not ack VIRTIO_NET_F_GUEST_ANNOUNCE: its payload (a
/// u64) carries the guest's MAC address in its first six bytes, and the
/// device announces that address on its network ([`VhostUserDevice::announce`]).
/// A malformed message (another size, fds) closes the connection; a refused
/// announcement (the RARP protocol feature not acked, the device failed to
/// send) is answered with an error and serving goes on.
fn rarp_message<D: VhostUserDevice>(
    conn: RawFd,
    handler: &Mutex<BackendHandler<D>>,
) -> io::Result<bool> {
    let mut hdr = [0u8; HEADER_LEN];
    // SAFETY: peeking into a local buffer of its length; no control buffer.
    let n = unsafe {
        libc::recv(
            conn,
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != HEADER_LEN as isize {
        return Ok(false);
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8));
    if code != SEND_RARP {
        return Ok(false);
    }
    if size != 8 {
        return Err(io::Error::other(format!(
            "SEND_RARP with a {size}-byte payload"
        )));
    }
    let mut msg = [0u8; HEADER_LEN + 8];
    let Some((got, fds)) = crate::notify::recv_with_fds(conn, &mut msg, libc::MSG_DONTWAIT) else {
        return Err(io::Error::other("truncated SEND_RARP"));
    };
    if got != msg.len() {
        return Err(io::Error::other("truncated SEND_RARP"));
    }
    if !fds.is_empty() {
        return Err(io::Error::other(format!(
            "SEND_RARP with {} fds",
            fds.len()
        )));
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&msg[HEADER_LEN..HEADER_LEN + 6]);
    let res = match handler.lock() {
        Ok(mut h) => h.send_rarp(mac),
        Err(_) => Err(io::Error::other("handler poisoned")),
    };
    if let Err(e) = &res {
        rate_limited!(log::Level::Warn, "SEND_RARP refused: {e}");
    }
    if flags & FLAG_NEED_REPLY != 0 {
        send_ack(conn, SEND_RARP, res.is_ok())?;
    }
    Ok(true)
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEnd {
    /// The frontend went away, or was dropped after a bad or stalled message.
    Disconnected,
    /// A signal (or the stop fd of [`serve_stream`]) ended it.
    Signal(i32),
}

/// Each queue's counters over the daemon's life, for the stats: those of
/// the connections that ended plus those of the one being served (whose
/// handler keeps its own, logged when it ends).
#[derive(Debug, Default)]
pub struct QueueCounters {
    inner: Mutex<QueueCountersInner>,
}

#[derive(Debug, Default)]
struct QueueCountersInner {
    /// Per queue: chains, bad chains, interrupts of the connections that ended.
    ended: Vec<[u64; 3]>,
    /// The counters of the connection being served.
    current: Vec<Arc<QueueStats>>,
}

fn load(s: &QueueStats) -> [u64; 3] {
    [
        s.chains.load(Ordering::Relaxed),
        s.bad_chains.load(Ordering::Relaxed),
        s.interrupts.load(Ordering::Relaxed),
    ]
}

impl QueueCountersInner {
    /// Adds the current connection's counts to `ended` and forgets them.
    fn fold(&mut self) {
        for (i, s) in std::mem::take(&mut self.current).iter().enumerate() {
            if self.ended.len() <= i {
                self.ended.resize(i + 1, [0; 3]);
            }
            for (t, v) in self.ended[i].iter_mut().zip(load(s)) {
                *t = t.saturating_add(v);
            }
        }
    }
}

impl QueueCounters {
    /// Shows `queues` queues (zeros) before any frontend connects.
    pub(crate) fn size(&self, queues: u16) {
        if let Ok(mut g) = self.inner.lock()
            && g.ended.len() < usize::from(queues)
        {
            g.ended.resize(usize::from(queues), [0; 3]);
        }
    }

    /// A connection starts with these counters (a previous one that did not
    /// detach is folded in first).
    fn attach(&self, current: Vec<Arc<QueueStats>>) {
        if let Ok(mut g) = self.inner.lock() {
            g.fold();
            g.current = current;
        }
    }

    /// The connection ended.
    fn detach(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.fold();
        }
    }

    /// Adds `queue_chains`, `queue_bad_chains` and `queue_interrupts`,
    /// labelled `queue`, to `stats`.
    pub fn add_to(&self, stats: &mut Stats) {
        let Ok(g) = self.inner.lock() else {
            return;
        };
        let n = g.ended.len().max(g.current.len());
        let totals: Vec<[u64; 3]> = (0..n)
            .map(|i| {
                let e = g.ended.get(i).copied().unwrap_or_default();
                let c = g.current.get(i).map(|s| load(s)).unwrap_or_default();
                [
                    e[0].saturating_add(c[0]),
                    e[1].saturating_add(c[1]),
                    e[2].saturating_add(c[2]),
                ]
            })
            .collect();
        drop(g);
        for (name, help, k) in [
            (
                "queue_chains",
                "Descriptor chains a queue took off its ring.",
                0,
            ),
            (
                "queue_bad_chains",
                "Chains a queue refused in validation (guest errors).",
                1,
            ),
            ("queue_interrupts", "Interrupts a queue signalled.", 2),
        ] {
            for (i, t) in totals.iter().enumerate() {
                stats.counter_with(name, help, &[("queue", &i.to_string())], t[k]);
            }
        }
    }
}

fn serve_connection<D: VhostUserDevice>(
    stream: UnixStream,
    device: &Arc<D>,
    stop: &dyn Stop,
    poll_max: Duration,
    deadline: Duration,
    counters: &QueueCounters,
) -> Result<ConnEnd, DaemonError> {
    let handler = Arc::new(Mutex::new(
        BackendHandler::new(device.clone()).with_busy_poll(poll_max),
    ));
    if let Ok(h) = handler.lock() {
        counters.attach(h.stats());
    }
    let conn_fd = stream.as_raw_fd();
    let mut req = BackendReqHandler::from_stream(stream, handler.clone());
    let end = loop {
        match wait_for_message(conn_fd, stop, deadline).map_err(DaemonError::Setup)? {
            Next::Message => {}
            Next::Stop(sig) => break ConnEnd::Signal(sig),
            Next::Stalled(how) => {
                rate_limited!(
                    log::Level::Warn,
                    "dropping the frontend: it {how} (deadline {deadline:?})"
                );
                break ConnEnd::Disconnected;
            }
        }
        // Only a device that offered the channel, to a frontend that acked
        // it, gets one (the others refuse the message in the `vhost` crate).
        let wants_channel = handler
            .lock()
            .map(|h| h.expects_backend_channel())
            .unwrap_or(false);
        if wants_channel
            && let Some(sock) = crate::notify::peek_backend_req_fd(conn_fd)
            && let Ok(mut h) = handler.lock()
        {
            h.offer_backend_socket(sock);
        }
        match early_vring_enable(conn_fd, &handler)
            .and_then(|done| Ok(done || log_fd_message(conn_fd, &handler)?))
            .and_then(|done| Ok(done || rarp_message(conn_fd, &handler)?))
        {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                rate_limited!(
                    log::Level::Warn,
                    "closing the connection after a bad request from the frontend: {e}"
                );
                break ConnEnd::Disconnected;
            }
        }
        match req.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected) | Err(VuError::PartialMessage) => {
                rate_limited!(log::Level::Info, "frontend disconnected");
                break ConnEnd::Disconnected;
            }
            // Refused (and answered, if asked) but nothing changed: serve on.
            Err(VuError::ReqHandlerError(_))
                if handler.lock().is_ok_and(|mut h| h.take_soft_refusal()) => {}
            Err(e) => {
                rate_limited!(
                    log::Level::Warn,
                    "closing the connection after a bad request from the frontend: {e}"
                );
                break ConnEnd::Disconnected;
            }
        }
    };
    if let Ok(mut h) = handler.lock() {
        h.stop_all();
        counters.detach();
        for (i, s) in h.stats().iter().enumerate() {
            let chains = s.chains.load(Ordering::Relaxed);
            if chains > 0 {
                rate_limited!(
                    log::Level::Info,
                    "queue {i}: {chains} chains, {} refused, {} interrupts",
                    s.bad_chains.load(Ordering::Relaxed),
                    s.interrupts.load(Ordering::Relaxed)
                );
            }
        }
    }
    device.disconnected();
    Ok(end)
}

/// Serves one frontend on `stream` as the daemon does (fresh device state,
/// whole messages only, `deadline` for a message or a reply), until it
/// disconnects, is dropped, or `stop` becomes readable. For tests and fuzz
/// targets that run the serve loop in-process.
pub fn serve_stream<D: VhostUserDevice>(
    stream: UnixStream,
    device: &Arc<D>,
    stop: &EventFd,
    deadline: Duration,
) -> Result<ConnEnd, DaemonError> {
    serve_connection(
        stream,
        device,
        &StopEvent(stop),
        Duration::ZERO,
        deadline,
        &QueueCounters::default(),
    )
}

/// Exit status of a daemon stopped by SIGBUS (see [`install_sigbus_handler`]).
pub const EXIT_SIGBUS: i32 = 75;

/// Message the SIGBUS handler writes to stderr before the daemon exits.
pub const SIGBUS_MESSAGE: &str = "ERROR SIGBUS: a shared memory file (guest memory or the inflight area) \
     shrank under this daemon: the frontend truncated it after handing it over; \
     exiting (status 75)\n";

extern "C" fn on_sigbus(_: libc::c_int) {
    // Only async-signal-safe calls: an atomic load, write(2), then _exit(2).
    // In the journal the line carries its priority (crate::logging).
    let journal = crate::logging::Sink::current() == crate::logging::Sink::Journal;
    // SAFETY: writing static buffers to fd 2 and exiting.
    unsafe {
        if journal {
            libc::write(2, b"<3>".as_ptr().cast(), 3);
        }
        libc::write(2, SIGBUS_MESSAGE.as_ptr().cast(), SIGBUS_MESSAGE.len());
        libc::_exit(EXIT_SIGBUS);
    }
}

/// Makes SIGBUS (an access to a page of a mapped file that its owner
/// truncated, when the file could not be sealed) stop the daemon with a
/// clear message and [`EXIT_SIGBUS`] instead of a core dump. The frontend
/// sees the connection close, as after any crash, and may reconnect to a new
/// daemon (the inflight area lets it resubmit what was in flight).
pub fn install_sigbus_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask.
    let r = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut())
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The daemon's vhost-user socket (listening or connected) and its signalfd,
/// opened before the daemon enters its sandbox.
pub struct Endpoint {
    kind: EndpointKind,
    signals: Signals,
    poll_max: Duration,
    queue_counters: Arc<QueueCounters>,
}

impl Endpoint {
    /// Opens the socket `--socket-path` or `--fd` names (creating and binding
    /// a socket path) and blocks SIGTERM/SIGINT into a signalfd. Call it
    /// single-threaded: the signal mask is inherited by every later thread.
    pub fn open(args: &VhostUserArgs) -> Result<Self, DaemonError> {
        install_sigbus_handler().map_err(DaemonError::Setup)?;
        ignore_write_signals().map_err(DaemonError::Setup)?;
        crate::frontend_fd::init();
        let signals = Signals::new().map_err(DaemonError::Setup)?;
        let kind = open_endpoint(args)?;
        Ok(Endpoint {
            kind,
            signals,
            poll_max: Duration::ZERO,
            queue_counters: Arc::default(),
        })
    }

    /// Lets queue threads busy-poll up to `max` before they sleep (default:
    /// never); see [`crate::worker::BusyPoll`].
    pub fn with_busy_poll(mut self, max: Duration) -> Self {
        self.poll_max = max;
        self
    }

    /// Each queue's counters over every connection this endpoint serves.
    pub fn queue_counters(&self) -> Arc<QueueCounters> {
        self.queue_counters.clone()
    }
}

/// Serves `device` on the socket the arguments name until SIGTERM/SIGINT.
///
/// With a listening socket, each frontend gets a fresh device state and the
/// daemon keeps accepting after a disconnect. With an already-connected fd
/// (`--fd` of a socketpair end), the daemon exits when that peer goes away.
/// Same as [`Endpoint::open`] then [`serve_endpoint`].
pub fn serve<D: VhostUserDevice>(args: &VhostUserArgs, device: Arc<D>) -> Result<(), DaemonError> {
    serve_endpoint(Endpoint::open(args)?, device)
}

/// Serves `device` on an endpoint opened before (see [`serve`]). A daemon in
/// its sandbox leaves a socket path it created in place at exit (its
/// filesystem is out of reach); the next start replaces the stale socket.
pub fn serve_endpoint<D: VhostUserDevice>(
    endpoint: Endpoint,
    device: Arc<D>,
) -> Result<(), DaemonError> {
    let Endpoint {
        kind: mut endpoint,
        signals,
        poll_max,
        queue_counters: counters,
    } = endpoint;
    counters.size(device.num_queues());
    let result = match &mut endpoint {
        EndpointKind::Connected(stream) => {
            if let Some(s) = stream.take() {
                log::info!("serving the frontend on fd {}", s.as_raw_fd());
                serve_connection(s, &device, &signals, poll_max, MESSAGE_DEADLINE, &counters)
                    .map(|_| ())
            } else {
                Ok(())
            }
        }
        EndpointKind::Listener(listener, path) => {
            match path {
                Some(p) => log::info!("listening on {}", p.display()),
                None => log::info!("listening on fd {}", listener.as_raw_fd()),
            }
            let events =
                stop_and(signals.fd(), listener.as_raw_fd()).map_err(DaemonError::Setup)?;
            loop {
                let ready = wait_ready(&events).map_err(DaemonError::Setup)?;
                if ready.contains(&Wake::Stop) {
                    if let Some(sig) = signals.take() {
                        log::info!("signal {sig}: shutting down");
                        break Ok(());
                    }
                    if !ready.contains(&Wake::Conn) {
                        continue;
                    }
                }
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) => {
                        rate_limited!(log::Level::Warn, "accept: {e}");
                        continue;
                    }
                };
                rate_limited!(log::Level::Info, "frontend connected");
                match serve_connection(
                    stream,
                    &device,
                    &signals,
                    poll_max,
                    MESSAGE_DEADLINE,
                    &counters,
                )? {
                    ConnEnd::Disconnected => continue,
                    ConnEnd::Signal(sig) => {
                        log::info!("signal {sig}: shutting down");
                        break Ok(());
                    }
                }
            }
        }
    };
    if let EndpointKind::Listener(_, Some(path)) = &endpoint
        && !crate::sandbox::is_active()
    {
        let _ = std::fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(chains: u64, bad: u64, irqs: u64) -> Arc<QueueStats> {
        let q = QueueStats::default();
        q.chains.store(chains, Ordering::Relaxed);
        q.bad_chains.store(bad, Ordering::Relaxed);
        q.interrupts.store(irqs, Ordering::Relaxed);
        Arc::new(q)
    }

    #[test]
    fn queue_counters_add_every_connection_and_never_go_back() {
        let c = QueueCounters::default();
        c.size(2);
        let mut s = Stats::new();
        c.add_to(&mut s);
        assert_eq!(s.get("queue_chains", &[("queue", "1")]), Some(0));

        let first = vec![queue(5, 1, 4), queue(2, 0, 2)];
        c.attach(first.clone());
        first[0].chains.store(7, Ordering::Relaxed);
        let mut s = Stats::new();
        c.add_to(&mut s);
        assert_eq!(s.get("queue_chains", &[("queue", "0")]), Some(7));
        c.detach();
        // A connection that ended without detaching is folded in by the next.
        c.attach(vec![queue(3, 0, 3), queue(0, 0, 0)]);
        c.attach(vec![queue(1, 1, 1), queue(0, 0, 0)]);
        let mut s = Stats::new();
        c.add_to(&mut s);
        assert_eq!(s.get("queue_chains", &[("queue", "0")]), Some(11));
        assert_eq!(s.get("queue_bad_chains", &[("queue", "0")]), Some(2));
        assert_eq!(s.get("queue_interrupts", &[("queue", "1")]), Some(2));
        assert!(s.line().contains("queue_chains{queue=\"0\"}=11"));
    }
}
