//! Target `hostile_frontend`: the daemon's own serve loop
//! (`bulkhead_common::daemon::serve_stream`, with each daemon's real device)
//! against a frontend that sends whatever the fuzzer says, however it says
//! it: whole messages, messages cut anywhere and finished later or never,
//! pauses longer than the message deadline, replies left unread, fds of
//! every kind (eventfds blocking, non-blocking and with a full counter,
//! pipes, memfds, regular files, sockets, /dev/null, the same fd twice, fds
//! the backend sent), kicks through the eventfds it sent, disconnects and
//! reconnects, and a stop signal at any point.
//!
//! Input: daemon u8 (blk, net, console), then up to [`MAX_OPS`] ops, each an
//! op code u8 and its fields (see [`Op::decode`]).
//!
//! Invariants: the serve loop never panics (in any thread) and never
//! blocks: it returns within [`WATCHDOG`] of a disconnect, with
//! `ConnEnd::Signal` within [`WATCHDOG`] of a stop, whatever state the
//! frontend left; after a disconnect the next frontend is served (its
//! GET_FEATURES answered). The message deadline is [`DEADLINE`] here (the
//! daemons use one second), so stalls cost little fuzzing time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use bulkhead_common::VhostUserDevice;
use bulkhead_common::daemon::{ConnEnd, serve_stream};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::blk_request::memfd;
use super::input::{Input, Seed};
use super::vhost_user::{self as vu, Daemon, FdSpec, WithDevice};

/// Most ops per input.
pub const MAX_OPS: usize = 64;
/// Largest payload per message.
const MAX_PAYLOAD: usize = 4096;
/// The serve loop's message deadline in this harness.
pub const DEADLINE: Duration = Duration::from_millis(5);
/// How long the serve loop may take to return after a disconnect or a stop.
pub const WATCHDOG: Duration = Duration::from_secs(5);
/// How long [`Op::Read`] waits for a reply to arrive.
const REPLY_WAIT: Duration = Duration::from_millis(2);
/// Connections per input (a disconnect starts the next one).
const MAX_CONNECTIONS: usize = 3;

/// An fd the frontend attaches.
#[derive(Clone, Debug)]
pub enum FdKind {
    /// A non-blocking eventfd.
    Eventfd,
    /// A blocking eventfd.
    EventfdBlocking,
    /// A blocking eventfd whose counter is full: a write to it would block.
    EventfdSaturated,
    /// A memfd of `pages` pages starting with the bytes.
    Memfd(u8, Vec<u8>),
    /// A memfd of exactly `n` bytes.
    SmallMemfd(u16),
    /// /dev/null.
    DevNull,
    /// One end of a unix stream socketpair.
    Socket,
    /// A pipe's read end.
    PipeRead,
    /// A pipe's write end (whose read end nobody reads).
    PipeWrite,
    /// A regular file (not a memfd) of `pages` pages.
    RegularFile(u8),
    /// The `n`th fd the backend sent (its inflight memfd).
    Received(u8),
    /// The fd attached just before this one, again.
    Again,
}

impl FdKind {
    fn decode(inp: &mut Input<'_>) -> Self {
        match inp.u8() % 12 {
            0 => FdKind::Eventfd,
            1 => FdKind::EventfdBlocking,
            2 => FdKind::EventfdSaturated,
            3 => {
                let pages = inp.u8();
                let n = usize::from(inp.u16());
                FdKind::Memfd(pages, inp.bytes(n).to_vec())
            }
            4 => FdKind::SmallMemfd(inp.u16()),
            5 => FdKind::DevNull,
            6 => FdKind::Socket,
            7 => FdKind::PipeRead,
            8 => FdKind::PipeWrite,
            9 => FdKind::RegularFile(inp.u8()),
            10 => FdKind::Received(inp.u8()),
            _ => FdKind::Again,
        }
    }

    fn encode(&self, s: &mut Seed) {
        match self {
            FdKind::Eventfd => s.u8(0),
            FdKind::EventfdBlocking => s.u8(1),
            FdKind::EventfdSaturated => s.u8(2),
            FdKind::Memfd(p, c) => s.u8(3).u8(*p).u16(c.len() as u16).bytes(c),
            FdKind::SmallMemfd(n) => s.u8(4).u16(*n),
            FdKind::DevNull => s.u8(5),
            FdKind::Socket => s.u8(6),
            FdKind::PipeRead => s.u8(7),
            FdKind::PipeWrite => s.u8(8),
            FdKind::RegularFile(p) => s.u8(9).u8(*p),
            FdKind::Received(i) => s.u8(10).u8(*i),
            FdKind::Again => s.u8(11),
        };
    }

    /// Opens it; the frontend keeps its own copy (`OwnedFd`).
    fn open(&self, received: &[File], previous: Option<&OwnedFd>) -> Option<OwnedFd> {
        let eventfd = |flags| -> Option<OwnedFd> {
            let e = EventFd::new(flags).ok()?;
            // SAFETY: dup of a valid fd; the OwnedFd owns the copy.
            let fd = unsafe { libc::dup(e.as_raw_fd()) };
            // SAFETY: fd is fresh (checked) and owned by nobody else.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let pipe = |read: bool| -> Option<OwnedFd> {
            let mut fds = [0 as RawFd; 2];
            // SAFETY: pipe2 writes two fds into the array.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return None;
            }
            // SAFETY: both fds are fresh; the end not kept is closed.
            unsafe {
                let (keep, close) = if read {
                    (fds[0], fds[1])
                } else {
                    (fds[1], fds[0])
                };
                libc::close(close);
                Some(OwnedFd::from_raw_fd(keep))
            }
        };
        match self {
            FdKind::Eventfd => eventfd(libc::EFD_NONBLOCK),
            FdKind::EventfdBlocking => eventfd(0),
            FdKind::EventfdSaturated => {
                let fd = eventfd(0)?;
                let max = (u64::MAX - 1).to_ne_bytes();
                // SAFETY: an 8-byte write from a local buffer to our eventfd.
                unsafe { libc::write(fd.as_raw_fd(), max.as_ptr().cast(), max.len()) };
                Some(fd)
            }
            FdKind::Memfd(pages, contents) => {
                let f = memfd(u64::from(*pages) * 4096);
                let n = contents.len().min(usize::from(*pages) * 4096);
                std::os::unix::fs::FileExt::write_all_at(&f, &contents[..n], 0).ok()?;
                Some(f.into())
            }
            FdKind::SmallMemfd(n) => Some(memfd(u64::from(*n)).into()),
            FdKind::DevNull => OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .ok()
                .map(Into::into),
            FdKind::Socket => UnixStream::pair().ok().map(|p| p.0.into()),
            FdKind::PipeRead => pipe(true),
            FdKind::PipeWrite => pipe(false),
            FdKind::RegularFile(pages) => {
                let f = tempfile_in_tmp()?;
                f.set_len(u64::from(*pages) * 4096).ok()?;
                Some(f.into())
            }
            FdKind::Received(i) => {
                let f = received.get(usize::from(*i) % received.len().max(1))?;
                f.try_clone().ok().map(Into::into)
            }
            FdKind::Again => previous.and_then(|p| p.try_clone().ok()),
        }
    }
}

/// An unlinked regular file in the temporary directory.
fn tempfile_in_tmp() -> Option<File> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("bulkhead-fuzz-frontend-{}-{n}", std::process::id()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .ok()?;
    let _ = std::fs::remove_file(&path);
    Some(f)
}

/// A message: request code, header flags, payload, optionally a header size
/// that lies, and its fds.
#[derive(Clone, Debug)]
pub struct Msg {
    /// Request code.
    pub code: u8,
    /// Header flags (version bits included).
    pub flags: u8,
    /// Payload.
    pub payload: Vec<u8>,
    /// Header size when it lies about the payload.
    pub lying_size: Option<u16>,
    /// Fds to attach.
    pub fds: Vec<FdKind>,
}

impl Msg {
    fn decode(inp: &mut Input<'_>) -> Self {
        let code = inp.u8();
        let flags = inp.u8();
        let n = usize::from(inp.u16()) % (MAX_PAYLOAD + 1);
        let payload = inp.bytes(n).to_vec();
        let lying_size = (flags & 0x80 != 0).then(|| inp.u16());
        let nfds = inp.u8() % 9;
        let fds = (0..nfds).map(|_| FdKind::decode(inp)).collect();
        Msg {
            code,
            flags,
            payload,
            lying_size,
            fds,
        }
    }

    fn encode(&self, s: &mut Seed) {
        s.u8(self.code)
            .u8(self.flags)
            .u16(self.payload.len() as u16)
            .bytes(&self.payload);
        if let Some(n) = self.lying_size {
            s.u16(n);
        }
        s.u8(self.fds.len() as u8);
        for f in &self.fds {
            f.encode(s);
        }
    }

    /// From a message of the `*_messages` seeds (whole, asking for an ack).
    fn from_seed(m: &vu::Msg) -> Self {
        let fds = m
            .fds
            .iter()
            .map(|f| match f {
                FdSpec::Memfd(p, c) => FdKind::Memfd(*p, c.clone()),
                FdSpec::EventFd => FdKind::Eventfd,
                FdSpec::SmallMemfd(n) => FdKind::SmallMemfd(*n),
                FdSpec::DevNull => FdKind::DevNull,
                FdSpec::Socket => FdKind::Socket,
                FdSpec::Pipe => FdKind::PipeRead,
                FdSpec::Received(i) => FdKind::Received(*i),
            })
            .collect();
        Msg {
            code: m.code,
            // Version 1, NEED_REPLY.
            flags: 0x1 | 0x8,
            payload: m.payload.clone(),
            lying_size: None,
            fds,
        }
    }

    fn wire(&self) -> Vec<u8> {
        let size = self
            .lying_size
            .map(u32::from)
            .unwrap_or(self.payload.len() as u32);
        let mut b = Vec::with_capacity(12 + self.payload.len());
        b.extend_from_slice(&u32::from(self.code).to_le_bytes());
        b.extend_from_slice(&u32::from(self.flags & 0x7f).to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&self.payload);
        b
    }
}

/// What the frontend does next.
#[derive(Clone, Debug)]
pub enum Op {
    /// Sends a whole message.
    Send(Msg),
    /// Sends a message up to this many times without reading a reply,
    /// until the socket is full.
    Flood(Msg, u16),
    /// Sends the first `cut` bytes of a message (its fds with them); the
    /// rest waits for [`Op::Rest`], or never comes.
    Split(Msg, u16),
    /// Sends what a split left.
    Rest,
    /// Waits this many milliseconds (the deadline is [`DEADLINE`]).
    Pause(u8),
    /// Waits briefly for a reply and reads the replies waiting (the
    /// frontend does not read them otherwise).
    Read,
    /// Writes 1 to the `n`th eventfd it sent (a kick, or a call of its own).
    Kick(u8),
    /// Closes the connection; the next ops go to a new one.
    Disconnect,
    /// Stops the daemon (SIGTERM); the input ends.
    Stop,
}

impl Op {
    fn decode(inp: &mut Input<'_>) -> Self {
        match inp.u8() % 16 {
            0..=6 => Op::Send(Msg::decode(inp)),
            7 => {
                let m = Msg::decode(inp);
                Op::Flood(m, inp.u16())
            }
            8 | 9 => {
                let m = Msg::decode(inp);
                Op::Split(m, inp.u16())
            }
            10 => Op::Rest,
            11 => Op::Pause(inp.u8() % 20),
            12 => Op::Read,
            13 => Op::Kick(inp.u8()),
            14 => Op::Disconnect,
            _ => Op::Stop,
        }
    }

    fn encode(&self, s: &mut Seed) {
        match self {
            Op::Send(m) => {
                s.u8(0);
                m.encode(s);
            }
            Op::Flood(m, n) => {
                s.u8(7);
                m.encode(s);
                s.u16(*n);
            }
            Op::Split(m, cut) => {
                s.u8(8);
                m.encode(s);
                s.u16(*cut);
            }
            Op::Rest => {
                s.u8(10);
            }
            Op::Pause(ms) => {
                s.u8(11).u8(*ms);
            }
            Op::Read => {
                s.u8(12);
            }
            Op::Kick(i) => {
                s.u8(13).u8(*i);
            }
            Op::Disconnect => {
                s.u8(14);
            }
            Op::Stop => {
                s.u8(15);
            }
        }
    }
}

/// One connection: the frontend's end, the serve loop's thread (reporting
/// how it ended), and what the frontend holds.
struct Conn {
    front: UnixStream,
    done: mpsc::Receiver<ConnEnd>,
    thread: Option<std::thread::JoinHandle<()>>,
    pending: Vec<u8>,
    received: Vec<File>,
    eventfds: Vec<OwnedFd>,
}

fn connect<D: VhostUserDevice + 'static>(dev: &Arc<D>, stop: &Arc<EventFd>) -> Conn {
    let (front, back) = UnixStream::pair().expect("socketpair");
    front.set_nonblocking(true).expect("nonblocking");
    let (tx, done) = mpsc::channel();
    let (dev, stop) = (dev.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("serve".into())
        .spawn(move || {
            let end = serve_stream(back, &dev, &stop, DEADLINE).expect("serve loop setup");
            let _ = tx.send(end);
        })
        .expect("serve thread");
    Conn {
        front,
        done,
        thread: Some(thread),
        pending: Vec::new(),
        received: Vec::new(),
        eventfds: Vec::new(),
    }
}

impl Conn {
    /// Sends `bytes` with `fds`; false once the daemon is gone or its
    /// socket is full (a frontend would give up there too).
    fn send(&self, bytes: &[u8], fds: &[RawFd]) -> bool {
        if bytes.is_empty() {
            return true;
        }
        match self.front.send_with_fds(&[bytes], fds) {
            Ok(n) if n == bytes.len() => true,
            Ok(n) => (&self.front).write_all(&bytes[n..]).is_ok(),
            Err(_) => false,
        }
    }

    /// Waits up to [`REPLY_WAIT`] for a reply (the serve loop runs in its
    /// own thread), then reads every reply waiting, keeping up to four fds
    /// the backend sent.
    fn read(&mut self) {
        let mut p = libc::pollfd {
            fd: self.front.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd.
        unsafe { libc::poll(&mut p, 1, REPLY_WAIT.as_millis() as libc::c_int) };
        let mut buf = [0u8; 4096];
        while let Ok((n, f)) = self.front.recv_with_fd(&mut buf) {
            if let Some(f) = f
                && self.received.len() < 4
            {
                self.received.push(f);
            }
            if n == 0 {
                break;
            }
        }
    }

    fn send_msg(&mut self, m: &Msg, cut: Option<u16>) -> bool {
        let mut keep: Vec<(bool, OwnedFd)> = Vec::new();
        for f in &m.fds {
            let eventfd = matches!(
                f,
                FdKind::Eventfd | FdKind::EventfdBlocking | FdKind::EventfdSaturated
            );
            if let Some(fd) = f.open(&self.received, keep.last().map(|k| &k.1)) {
                keep.push((eventfd, fd));
            }
        }
        let raw: Vec<RawFd> = keep.iter().map(|f| f.1.as_raw_fd()).collect();
        let wire = m.wire();
        let at = cut.map_or(wire.len(), |c| usize::from(c) % (wire.len() + 1));
        let ok = self.send(&wire[..at], &raw);
        self.pending = wire[at..].to_vec();
        // The frontend keeps its eventfds, to kick through them later.
        for (eventfd, fd) in keep {
            if eventfd && self.eventfds.len() < 16 {
                self.eventfds.push(fd);
            }
        }
        ok
    }

    /// Waits for the serve loop to return (it must, within [`WATCHDOG`]),
    /// then for its thread to end: nothing of it outlives the input.
    fn end(&mut self, what: &str) -> ConnEnd {
        let end = self
            .done
            .recv_timeout(WATCHDOG)
            .unwrap_or_else(|_| panic!("the serve loop did not return within the watchdog {what}"));
        if let Some(t) = self.thread.take() {
            t.join().expect("serve thread");
        }
        end
    }

    /// Closes the frontend's end; the serve loop must return.
    fn close(mut self) -> ConnEnd {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        drop(std::mem::replace(&mut self.front, a));
        self.end("after the frontend disconnected")
    }
}

/// Writes 1 to `fd` unless that would block (a full counter).
fn kick(fd: &OwnedFd) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let one = 1u64.to_ne_bytes();
    // SAFETY: poll on one pollfd, then an 8-byte write from a local buffer.
    unsafe {
        if libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLOUT != 0 {
            libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len());
        }
    }
}

/// The next frontend is served: its GET_FEATURES is answered.
fn next_frontend_served(conn: Conn) {
    let get_features = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    assert!(conn.send(&get_features, &[]), "next frontend cannot send");
    let mut p = libc::pollfd {
        fd: conn.front.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = WATCHDOG.as_millis() as libc::c_int;
    // SAFETY: poll on one pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    assert_eq!(r, 1, "the next frontend's GET_FEATURES was not answered");
    let mut buf = [0u8; 20];
    let n = (&conn.front).read(&mut buf).unwrap_or(0);
    assert!(n >= 12, "no reply to the next frontend's GET_FEATURES");
    assert_eq!(buf[0], 1, "reply to another request");
    let _ = conn.close();
}

struct Play<'a>(&'a [Op]);

impl WithDevice for Play<'_> {
    fn run<D: VhostUserDevice + 'static>(self, dev: Arc<D>) {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let mut conn = connect(&dev, &stop);
        let mut connections = 1;
        for op in self.0 {
            match op {
                Op::Send(m) => {
                    if !conn.send_msg(m, None) {
                        conn.read();
                    }
                }
                Op::Flood(m, n) => {
                    for _ in 0..*n {
                        if !conn.send_msg(m, None) {
                            break;
                        }
                    }
                }
                Op::Split(m, cut) => {
                    conn.send_msg(m, Some(*cut));
                }
                Op::Rest => {
                    let rest = std::mem::take(&mut conn.pending);
                    conn.send(&rest, &[]);
                }
                Op::Pause(ms) => std::thread::sleep(Duration::from_millis(u64::from(*ms))),
                Op::Read => conn.read(),
                Op::Kick(i) => {
                    if let Some(fd) = conn
                        .eventfds
                        .get(usize::from(*i) % conn.eventfds.len().max(1))
                    {
                        kick(fd);
                    }
                }
                Op::Disconnect => {
                    let end = conn.close();
                    assert_eq!(end, ConnEnd::Disconnected);
                    if connections == MAX_CONNECTIONS {
                        next_frontend_served(connect(&dev, &stop));
                        return;
                    }
                    connections += 1;
                    conn = connect(&dev, &stop);
                }
                Op::Stop => {
                    stop.write(1).expect("stop");
                    let end = conn.end("after a stop");
                    if end == ConnEnd::Disconnected {
                        // It had dropped this frontend already; the daemon
                        // would be waiting for the next one, which sees
                        // the stop at once.
                        let mut next = connect(&dev, &stop);
                        let end = next.end("after a stop");
                        assert_eq!(end, ConnEnd::Signal(libc::SIGTERM));
                    } else {
                        assert_eq!(end, ConnEnd::Signal(libc::SIGTERM));
                    }
                    return;
                }
            }
        }
        let end = conn.close();
        assert_eq!(end, ConnEnd::Disconnected);
        next_frontend_served(connect(&dev, &stop));
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    vu::ignore_sigpipe();
    let mut inp = Input::new(data);
    let daemon = match inp.u8() % 3 {
        0 => Daemon::Blk,
        1 => Daemon::Net,
        _ => Daemon::Console,
    };
    let ops: Vec<Op> = (0..MAX_OPS)
        .map_while(|_| (!inp.is_empty()).then(|| Op::decode(&mut inp)))
        .collect();
    vu::with_device(daemon, "frontend", Play(&ops));
}

fn encode(daemon: u8, ops: &[Op]) -> Vec<u8> {
    let mut s = Seed::new();
    s.u8(daemon);
    for op in ops {
        op.encode(&mut s);
    }
    s.finish()
}

/// Seeds: each daemon's bring-up (as the `*_messages` seeds have it), then:
/// kicks and a clean disconnect; a message cut in two and finished; one
/// cut and never finished (dropped at the deadline); a bring-up with
/// blocking and saturated eventfds and a pipe as a call fd; replies left
/// unread; a stop mid-message.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (d, daemon, names) in [
        (
            0u8,
            Daemon::Blk,
            [
                "blk-kick-disconnect",
                "blk-split",
                "blk-stall",
                "blk-bad-fds",
                "blk-unread",
                "blk-stop",
            ],
        ),
        (
            1,
            Daemon::Net,
            [
                "net-kick-disconnect",
                "net-split",
                "net-stall",
                "net-bad-fds",
                "net-unread",
                "net-stop",
            ],
        ),
        (
            2,
            Daemon::Console,
            [
                "console-kick-disconnect",
                "console-split",
                "console-stall",
                "console-bad-fds",
                "console-unread",
                "console-stop",
            ],
        ),
    ] {
        let bring_up: Vec<Op> = vu::bring_up(daemon, matches!(daemon, Daemon::Blk))
            .iter()
            .map(|m| Op::Send(Msg::from_seed(m)))
            .collect();
        let with = |extra: Vec<Op>| {
            let mut v = vec![];
            for op in &bring_up {
                v.push(op.clone());
                v.push(Op::Read);
            }
            v.extend(extra);
            v
        };
        let get_features = Msg {
            code: 1,
            flags: 1,
            payload: vec![],
            lying_size: None,
            fds: vec![],
        };
        let set_num = Msg {
            code: 8,
            flags: 0x9,
            payload: [0u32, 16].iter().flat_map(|v| v.to_le_bytes()).collect(),
            lying_size: None,
            fds: vec![],
        };
        let call = |fd: FdKind| Msg {
            code: 13,
            flags: 0x9,
            payload: 0u64.to_le_bytes().to_vec(),
            lying_size: None,
            fds: vec![fd],
        };
        let kick = Msg {
            code: 12,
            flags: 0x9,
            payload: 0u64.to_le_bytes().to_vec(),
            lying_size: None,
            fds: vec![FdKind::EventfdBlocking],
        };
        let cases: [Vec<Op>; 6] = [
            with(vec![
                Op::Kick(0),
                Op::Kick(1),
                Op::Pause(5),
                Op::Read,
                Op::Disconnect,
            ]),
            with(vec![
                Op::Split(set_num.clone(), 14),
                Op::Pause(2),
                Op::Rest,
                Op::Read,
            ]),
            with(vec![Op::Split(set_num.clone(), 7), Op::Pause(15), Op::Read]),
            with(vec![
                Op::Send(call(FdKind::EventfdSaturated)),
                Op::Send(kick),
                Op::Kick(0),
                Op::Pause(5),
                Op::Read,
                Op::Send(call(FdKind::PipeWrite)),
                Op::Read,
            ]),
            with(vec![Op::Flood(get_features, 20000), Op::Pause(15)]),
            with(vec![Op::Split(set_num, 5), Op::Stop]),
        ];
        for (name, ops) in names.into_iter().zip(cases) {
            out.push((name, encode(d, &ops)));
        }
    }
    out
}
