//! A hostile vhost-user frontend against the real daemons (issue 14).
//!
//! The frontend is untrusted too: every fd it sends and every message it
//! writes (or stops writing halfway) is input. Each test here plays such a
//! frontend against `bulkhead-blk`, `bulkhead-net` and `bulkhead-console`
//! (where the message applies), and checks that the daemon lives, serves the
//! next frontend, and ends cleanly within a second of SIGTERM.
//!
//! The first tests are the regressions of the four findings of issue 14;
//! the matrix after them tries every kind of fd for every message that takes
//! one, and messages out of order. Daemons run under their default sandbox,
//! with stderr on a pipe (so `RLIMIT_FSIZE` is 0 for net and console, as in
//! production). The net daemon needs root (a namespace and a tap); its cases
//! are skipped (`bulkhead_tests::skip`) elsewhere.
//!
//! Run `cargo build -p bulkhead-blk -p bulkhead-net -p bulkhead-console` first.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulkhead_tests::blk::{BlkDriver, VIRTIO_BLK_S_OK};
use bulkhead_tests::console::{ConsoleDriver, tx_queue};
use bulkhead_tests::frontend::{
    Device, Options, RawConnection, VHOST_F_LOG_ALL, VIRTIO_F_RING_PACKED,
};
use bulkhead_tests::memory::GuestMemory;
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::sandbox::{Logged, pass_fds};
use bulkhead_tests::skip::{SkipReason, skip_if};
use tempfile::TempDir;
use vhost::VhostBackend;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vmm_sys_util::eventfd::EventFd;

/// How long a reply or a refusal may take.
const WAIT: Duration = Duration::from_secs(10);
/// How long a daemon may take to exit after SIGTERM.
const SIGTERM_WITHIN: Duration = Duration::from_secs(1);

// vhost-user request codes and header flags for raw messages.
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const SET_VRING_ENABLE: u32 = 18;
const SET_BACKEND_REQ_FD: u32 = 21;
const NEED_REPLY: u32 = 0x8;

/// The daemons under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Blk,
    Net,
    Console,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Blk => "bulkhead-blk",
            Kind::Net => "bulkhead-net",
            Kind::Console => "bulkhead-console",
        }
    }

    /// Options a well-behaved frontend of this daemon uses.
    fn options(self) -> Options {
        match self {
            Kind::Console => ConsoleDriver::options(),
            _ => Options::default(),
        }
    }
}

/// The tap and namespace a `bulkhead-net` under test runs on.
struct NetEnv {
    fds: Vec<OwnedFd>,
    _ns: NetNs,
}

/// A daemon under test: the process (stderr captured), its scratch directory
/// and socket, and for net its tap. Killed on drop if still running.
struct Dut {
    kind: Kind,
    d: Logged,
    socket: PathBuf,
    // Dropped after the daemon: the image, the socket, the tap.
    _dir: TempDir,
    _net: Option<NetEnv>,
}

/// Why `kind` cannot run here (net needs root for its tap), or None.
fn unavailable(kind: Kind) -> Option<SkipReason> {
    match kind {
        Kind::Net => netns::unavailable(),
        _ => None,
    }
}

impl Dut {
    /// Starts `kind` with `args`, or None (and [`skip`]) where it cannot run.
    fn start(kind: Kind, args: &[&str], test: &str) -> Option<Self> {
        if skip_if(&format!("{test} on {}", kind.name()), unavailable(kind)) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-advfe-")
            .tempdir()
            .expect("scratch dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("vhost.sock");
        let mut cmd = Command::new(workspace_binary(kind.name()));
        cmd.arg("--socket-path").arg(&socket);
        let mut net = None;
        match kind {
            Kind::Blk => {
                let image = dir.path().join("disk.img");
                File::create(&image).unwrap().set_len(16 << 20).unwrap();
                cmd.arg("--image").arg(&image);
            }
            Kind::Console => {}
            Kind::Net => {
                let ns = NetNs::new().expect("network namespace");
                ns.add_tap("bhadv0", "10.79.0.1/24", false).expect("tap");
                let fds = ns.open_tap_fds("bhadv0", 1, false).expect("tap fd");
                cmd.arg("--tap-fd").arg("10");
                pass_fds(&mut cmd, vec![(fds[0].as_raw_fd(), 10)]);
                net = Some(NetEnv { fds, _ns: ns });
            }
        }
        cmd.args(args).env("RUST_LOG", "info");
        let d = Logged::start(kind.name(), cmd, &socket);
        if let Some(n) = &mut net {
            // The daemon holds its own copy now.
            n.fds.clear();
        }
        Some(Dut {
            kind,
            d,
            socket,
            _dir: dir,
            _net: net,
        })
    }

    /// The daemon still runs (given a moment to finish dying if it was
    /// about to: its socket closes before its exit status is ready).
    fn assert_alive(&mut self, case: &str) {
        let gone = self.d.guard.wait_timeout(Duration::from_millis(200));
        assert!(
            matches!(gone, Ok(None)),
            "{} died on {case}: {:?}\n{}",
            self.kind.name(),
            gone,
            self.d.log.text()
        );
    }

    /// A new frontend is served: a full bring-up, every queue started and
    /// stopped again (GET_VRING_BASE answered), and for blk a write and a
    /// read back.
    fn assert_serves_next_frontend(&mut self, case: &str) {
        self.assert_alive(case);
        if self.kind == Kind::Blk {
            let mut blk = BlkDriver::connect(&self.socket, &Options::default())
                .unwrap_or_else(|e| panic!("next frontend after {case}: {e}"));
            let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
            assert_eq!(blk.write(0, 100, &data).unwrap(), VIRTIO_BLK_S_OK);
            assert_eq!(blk.read(0, 100, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));
            return;
        }
        let mut dev = Device::connect(&self.socket, &self.kind.options())
            .unwrap_or_else(|e| panic!("next frontend after {case}: {e}"));
        for q in 0..dev.queues.len() {
            dev.stop_queue(q)
                .unwrap_or_else(|e| panic!("GET_VRING_BASE after {case}: {e}"));
        }
    }

    /// SIGTERM ends the daemon cleanly (exit status 0) within a second.
    fn assert_sigterm_ends_it(&mut self, case: &str) {
        self.d.guard.signal(libc::SIGTERM).unwrap();
        let t0 = Instant::now();
        let st = self.d.guard.wait_timeout(SIGTERM_WITHIN).unwrap();
        let Some(st) = st else {
            panic!(
                "{} still running {:?} after SIGTERM ({case})\n{}",
                self.kind.name(),
                SIGTERM_WITHIN,
                self.d.log.text()
            );
        };
        assert!(
            st.success(),
            "{} exited with {st} after SIGTERM ({case}, {:?})\n{}",
            self.kind.name(),
            t0.elapsed(),
            self.d.log.text()
        );
    }
}

/// A connection negotiated through SET_FEATURES (with REPLY_ACK), and with
/// `with_mem` through SET_MEM_TABLE too; raw messages go on the same socket.
struct Session {
    _fe: Frontend,
    mem: Arc<GuestMemory>,
    raw: RawConnection,
}

impl Session {
    fn new(dut: &Dut, with_mem: bool) -> Session {
        let mut fe = Frontend::connect(&dut.socket, 1).expect("connect");
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::LOG_SHMFD;
        let pf = fe.get_protocol_features().unwrap() & want;
        fe.set_protocol_features(pf).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        // Split rings: these cases send 16-bit vring bases (a packed ring's is 32 bits).
        fe.set_features(offered & !VHOST_F_LOG_ALL & !VIRTIO_F_RING_PACKED)
            .unwrap();
        let mem = Arc::new(GuestMemory::new(4 << 20).unwrap());
        if with_mem {
            fe.set_mem_table(&mem.region_infos()).unwrap();
        }
        let raw = RawConnection::from_frontend(&fe).unwrap();
        Session { _fe: fe, mem, raw }
    }

    fn uva(&self, gpa: u64) -> u64 {
        self.mem.host_addr(gpa).unwrap()
    }

    /// Sends a message asking for an ack; returns the ack (0: accepted), or
    /// None when the daemon closed the connection instead of answering.
    fn send(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> Option<u64> {
        self.raw.send(code, NEED_REPLY, payload, fds).ok()?;
        let r = self.raw.recv(WAIT).ok()??;
        assert_eq!(r.request, code, "reply to another request");
        let b: [u8; 8] = r.payload.get(..8)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }

    /// Sends a message that must be accepted.
    fn ok(&self, code: u32, payload: &[u8], fds: &[RawFd]) {
        assert_eq!(
            self.send(code, payload, fds),
            Some(0),
            "request {code} refused"
        );
    }

    /// Sends a message that must be refused: a non-zero ack or none, then
    /// the daemon closes this connection.
    fn refused(&self, code: u32, payload: &[u8], fds: &[RawFd]) {
        let ack = self.send(code, payload, fds);
        assert_ne!(ack, Some(0), "request {code} accepted");
        assert!(self.raw.closed_within(WAIT), "connection left open");
    }

    /// Queue `q` of `size` entries at fresh rings, its base 0 (no fds yet).
    fn rings(&self, q: u32, size: u32) -> Ring {
        let desc = self.mem.alloc(16 * u64::from(size), 4096).unwrap();
        let avail = self.mem.alloc(6 + 2 * u64::from(size), 4096).unwrap();
        let used = self.mem.alloc(6 + 8 * u64::from(size), 4096).unwrap();
        self.ok(SET_VRING_NUM, &state(q, size), &[]);
        self.ok(
            SET_VRING_ADDR,
            &vring_addr(q, self.uva(desc), self.uva(used), self.uva(avail)),
            &[],
        );
        self.ok(SET_VRING_BASE, &state(q, 0), &[]);
        Ring {
            desc,
            avail,
            size: size as u16,
            next: 0,
        }
    }

    /// Publishes one chain of `bufs` (address, length, device-writable).
    fn publish(&self, ring: &mut Ring, bufs: &[(u64, u32, bool)]) {
        let head = ring.next % ring.size;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % ring.size;
            let last = i + 1 == bufs.len();
            let flags = u16::from(!last) | if writable { 2 } else { 0 };
            let mut d = addr.to_le_bytes().to_vec();
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&((idx + 1) % ring.size).to_le_bytes());
            self.mem.write(ring.desc + 16 * u64::from(idx), &d).unwrap();
        }
        let slot = ring.avail + 4 + 2 * u64::from(ring.next % ring.size);
        self.mem.write(slot, &head.to_le_bytes()).unwrap();
        ring.next = ring.next.wrapping_add(bufs.len() as u16);
        // One avail entry per chain.
        let idx: u16 = self.mem.read_obj(ring.avail + 2).unwrap();
        self.mem
            .write(ring.avail + 2, &idx.wrapping_add(1).to_le_bytes())
            .unwrap();
    }
}

/// Where a queue's rings are, for [`Session::publish`].
struct Ring {
    desc: u64,
    avail: u64,
    size: u16,
    next: u16,
}

fn u64p(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn state(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut b = state(index, 0);
    for v in [desc, used, avail, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"advfe".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// An eventfd whose counter is at its maximum (0xffff_ffff_ffff_fffe): a
/// blocking write to it waits until someone reads it, which nobody will.
fn saturated_eventfd(flags: i32) -> EventFd {
    let e = EventFd::new(flags).unwrap();
    e.write(u64::MAX - 1).unwrap();
    e
}

// ---- Regressions of the four findings of issue 14 ----

/// Finding 1: blk and net do not offer BACKEND_REQ; a SET_BACKEND_REQ_FD
/// with an fd made their serve loop call `fcntl(F_SETFD)` on a duplicate,
/// which their main-thread seccomp filter refused: SIGSYS. Now the message
/// is refused, the connection closed, and the daemon lives.
#[test]
fn backend_req_fd_to_a_daemon_that_does_not_offer_it_is_refused_not_fatal() {
    for kind in [Kind::Blk, Kind::Net] {
        let test = "backend_req_fd_to_a_daemon_that_does_not_offer_it";
        let Some(mut dut) = Dut::start(kind, &[], test) else {
            continue;
        };
        let s = Session::new(&dut, false);
        let (chan, _peer) = UnixStream::pair().unwrap();
        let _ = s
            .raw
            .send(SET_BACKEND_REQ_FD, NEED_REPLY, &[], &[chan.as_raw_fd()]);
        assert!(s.raw.closed_within(WAIT), "connection left open");
        dut.assert_alive("SET_BACKEND_REQ_FD");
        drop(s);
        dut.assert_serves_next_frontend("SET_BACKEND_REQ_FD");
        dut.assert_sigterm_ends_it("SET_BACKEND_REQ_FD");
    }
}

/// Finding 2: a memfd or a regular file given as a call fd was written to
/// at the first interrupt, past `RLIMIT_FSIZE` 0: SIGXFSZ killed net and
/// console. Now such a call fd is refused when it arrives.
#[test]
fn memfd_or_regular_file_as_call_fd_is_refused_and_kills_nothing() {
    let file_dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Console, Kind::Net] {
        for what in ["memfd", "regular file"] {
            let test = "memfd_or_regular_file_as_call_fd";
            let Some(mut dut) = Dut::start(kind, &[], test) else {
                continue;
            };
            let file = match what {
                "memfd" => memfd(0),
                _ => File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(file_dir.path().join(format!("call-{}", kind.name())))
                    .unwrap(),
            };
            let mut dev = Device::connect(&dut.socket, &kind.options()).expect("bring-up");
            let raw = RawConnection::from_frontend(&dev.frontend).unwrap();
            // The transmit queue (1 on both) completes what the guest sends
            // and then interrupts through its call fd.
            let q = match kind {
                Kind::Console => tx_queue(0),
                _ => 1,
            };
            raw.send(
                SET_VRING_CALL,
                NEED_REPLY,
                &u64p(q as u64),
                &[file.as_raw_fd()],
            )
            .unwrap();
            let ack = raw.recv(WAIT).ok().flatten().map(|r| r.payload);
            if ack.as_deref() == Some(&0u64.to_le_bytes()[..]) {
                // Accepted (the old behaviour): make the daemon interrupt.
                let gpa = dev.mem.alloc_with(&[0u8; 64]).unwrap();
                let vq = &mut dev.queues[q];
                let head = vq
                    .add_chain(&[bulkhead_tests::virtq::Buf::readable(gpa, 64)])
                    .unwrap();
                vq.publish(head).unwrap();
                vq.kick().unwrap();
                std::thread::sleep(Duration::from_millis(500));
            }
            dut.assert_alive(&format!("{what} as call fd"));
            assert_ne!(
                ack.as_deref(),
                Some(&0u64.to_le_bytes()[..]),
                "{}: a {what} was accepted as a call fd",
                kind.name()
            );
            assert!(raw.closed_within(WAIT), "connection left open");
            drop(dev);
            dut.assert_serves_next_frontend(what);
            dut.assert_sigterm_ends_it(what);
        }
    }
}

/// Sends GET_VRING_BASE for queue `q` and waits up to `within` for the
/// answer; true when it came.
fn vring_base_answered(raw: &RawConnection, q: u32, within: Duration) -> bool {
    raw.send(GET_VRING_BASE, 0, &state(q, 0), &[]).unwrap();
    match raw.recv(within) {
        Ok(Some(r)) => r.request == GET_VRING_BASE,
        _ => false,
    }
}

/// Finding 3: a blocking call eventfd at its maximum count made the queue
/// thread block in `write` for ever: the next GET_VRING_BASE was never
/// answered and SIGTERM was ignored. Now the daemon makes every eventfd it
/// receives non-blocking, and a full counter is an interrupt already
/// pending.
#[test]
fn saturated_blocking_call_eventfd_blocks_no_queue_thread() {
    let test = "saturated_blocking_call_eventfd";
    let Some(mut dut) = Dut::start(Kind::Blk, &[], test) else {
        return;
    };
    let mut blk = BlkDriver::connect(&dut.socket, &Options::default()).expect("bring-up");
    let raw = RawConnection::from_frontend(&blk.dev.frontend).unwrap();
    let call = saturated_eventfd(0);
    raw.send(SET_VRING_CALL, NEED_REPLY, &u64p(0), &[call.as_raw_fd()])
        .unwrap();
    let ack = raw.recv(WAIT).unwrap().expect("SET_VRING_CALL ack");
    assert_eq!(ack.payload, 0u64.to_le_bytes(), "an eventfd was refused");
    // A request whose completion interrupts through the saturated eventfd.
    let req = bulkhead_tests::blk::Request::write(8, vec![0x5a; 4096]);
    blk.submit(0, &req).unwrap();
    blk.kick(0).unwrap();
    let deadline = Instant::now() + WAIT;
    while blk.dev.queues[0].used_idx().unwrap() == 0 {
        assert!(Instant::now() < deadline, "request not completed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        vring_base_answered(&raw, 0, Duration::from_secs(5)),
        "GET_VRING_BASE not answered: the queue thread is stuck\n{}",
        dut.d.log.text()
    );
    dut.assert_alive("saturated call eventfd");
    drop((raw, blk));
    dut.assert_serves_next_frontend("saturated call eventfd");
    dut.assert_sigterm_ends_it("saturated call eventfd");
}

/// Finding 3, same class: a blocking err eventfd at its maximum count, and
/// a ring error that makes the queue signal it.
#[test]
fn saturated_blocking_err_eventfd_blocks_no_queue_thread() {
    let test = "saturated_blocking_err_eventfd";
    let Some(mut dut) = Dut::start(Kind::Blk, &[], test) else {
        return;
    };
    let s = Session::new(&dut, true);
    let avail = s.rings(0, 128).avail;
    let err = saturated_eventfd(0);
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    s.ok(SET_VRING_ERR, &u64p(0), &[err.as_raw_fd()]);
    s.ok(SET_VRING_CALL, &u64p(0), &[call.as_raw_fd()]);
    s.ok(SET_VRING_KICK, &u64p(0), &[kick.as_raw_fd()]);
    s.ok(SET_VRING_ENABLE, &state(0, 1), &[]);
    // avail->idx jumps past the queue size: a ring error, signalled on err.
    s.mem.write(avail + 2, &1000u16.to_le_bytes()).unwrap();
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        vring_base_answered(&s.raw, 0, Duration::from_secs(5)),
        "GET_VRING_BASE not answered: the queue thread is stuck\n{}",
        dut.d.log.text()
    );
    drop(s);
    dut.assert_serves_next_frontend("saturated err eventfd");
    dut.assert_sigterm_ends_it("saturated err eventfd");
}

/// The name of a queue thread (`vring-*`) of `pid` that sits in `read(2)`,
/// if one does (`/proc/PID/task/TID/syscall` starts with the call number).
fn queue_thread_blocked_in_read(pid: u32) -> Option<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
        let call = std::fs::read_to_string(t.path().join("syscall")).ok()?;
        let nr = call.split_whitespace().next()?;
        (name.starts_with("vring-") && nr == libc::SYS_read.to_string())
            .then(|| name.trim().to_string())
    })
}

/// Finding 3, same class: one blocking eventfd as the kick of several
/// queues. Every queue thread wakes on a kick, one reads the counter, and
/// the others blocked in `read` for ever. Kicked many times, at gaps short
/// enough for the threads to busy-poll and then find the kick pending
/// together, so that they race at least once.
#[test]
fn one_blocking_eventfd_as_the_kick_of_several_queues_blocks_no_queue_thread() {
    const QUEUES: u32 = 4;
    let test = "one_blocking_eventfd_as_several_kicks";
    let Some(mut dut) = Dut::start(Kind::Blk, &["--num-queues", "4"], test) else {
        return;
    };
    let s = Session::new(&dut, true);
    let kick = EventFd::new(0).unwrap();
    let calls: Vec<EventFd> = (0..QUEUES)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    for q in 0..QUEUES {
        let _ = s.rings(q, 128);
        s.ok(
            SET_VRING_CALL,
            &u64p(q.into()),
            &[calls[q as usize].as_raw_fd()],
        );
        s.ok(SET_VRING_KICK, &u64p(q.into()), &[kick.as_raw_fd()]);
        s.ok(SET_VRING_ENABLE, &state(q, 1), &[]);
    }
    // The frontend reads its kick fd too (it holds it): one more reader to
    // race the queue threads for each kick.
    let reader_kick = kick.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            if reader_kick.read().is_err() {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    });
    // Kick until a queue thread is caught blocked in `read` (the old
    // behaviour), or for 3 s.
    let end = Instant::now() + Duration::from_secs(3);
    let mut stuck = None;
    let mut n = 0u64;
    while Instant::now() < end && stuck.is_none() {
        kick.write(1).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(20) {
            std::hint::spin_loop();
        }
        n += 1;
        if n.is_multiple_of(64) {
            std::thread::sleep(Duration::from_millis(2));
            stuck = queue_thread_blocked_in_read(dut.d.pid());
        }
    }
    eprintln!("{n} kicks; queue thread blocked in read: {stuck:?}");
    for q in 0..QUEUES {
        assert!(
            vring_base_answered(&s.raw, q, Duration::from_secs(5)),
            "GET_VRING_BASE {q} not answered: a queue thread is stuck\n{}",
            dut.d.log.text()
        );
    }
    stop.store(true, Ordering::Relaxed);
    kick.write(1).unwrap();
    reader.join().unwrap();
    drop(s);
    dut.assert_serves_next_frontend("one eventfd as several kicks");
    dut.assert_sigterm_ends_it("one eventfd as several kicks");
}

/// Finding 3, same class: a pipe as a call fd blocks once it is full (8192
/// interrupts). Only eventfds are accepted as call, kick and err fds.
#[test]
fn pipe_as_call_fd_is_refused() {
    for kind in [Kind::Blk, Kind::Net, Kind::Console] {
        let Some(mut dut) = Dut::start(kind, &[], "pipe_as_call_fd") else {
            continue;
        };
        let s = Session::new(&dut, true);
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        s.refused(SET_VRING_CALL, &u64p(0), &[fds[1]]);
        // SAFETY: closing the fds we created.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        drop(s);
        dut.assert_serves_next_frontend("pipe as call fd");
        dut.assert_sigterm_ends_it("pipe as call fd");
    }
}

/// Finding 4: `--queue-size 32768` was accepted, but no queue could start
/// (the io_uring engine wanted queue size + 16 entries, over its limit).
/// Every size the command line accepts must run.
#[test]
fn blk_runs_a_queue_of_the_largest_size_its_command_line_accepts() {
    let test = "blk_largest_queue_size";
    let Some(mut dut) = Dut::start(Kind::Blk, &["--queue-size", "32768"], test) else {
        return;
    };
    let opts = Options::default().queue_size(32768);
    let mut blk = BlkDriver::connect(&dut.socket, &opts).expect("a queue of 32768 starts");
    let data = vec![0xa5; 8192];
    assert_eq!(blk.write(0, 16, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.read(0, 16, 8192).unwrap(), (VIRTIO_BLK_S_OK, data));
    drop(blk);
    dut.assert_sigterm_ends_it("queue size 32768");
}

/// Every daemon accepts every power-of-two ring up to 1024 with its default
/// flags (libblkio sets up 256 entries, qemu-storage-daemon accepts 1024;
/// `bulkhead-blk`'s old default of 128 refused libblkio): each size is
/// brought up and stopped, and for blk a write is read back through it.
#[test]
fn every_daemon_runs_every_power_of_two_ring_up_to_1024_by_default() {
    for kind in [Kind::Blk, Kind::Net, Kind::Console] {
        let Some(mut dut) = Dut::start(kind, &[], "every_power_of_two_ring") else {
            continue;
        };
        for shift in 0..=10 {
            let size = 1u16 << shift;
            let opts = kind.options().queue_size(size);
            if kind == Kind::Blk {
                let mut blk = BlkDriver::connect(&dut.socket, &opts)
                    .unwrap_or_else(|e| panic!("blk, ring of {size}: {e}"));
                // A request is three descriptors: smaller rings need an
                // indirect table.
                blk.use_indirect = size < 4;
                let data = vec![shift as u8; 4096];
                assert_eq!(
                    blk.write(0, 8 * u64::from(size), &data).unwrap(),
                    VIRTIO_BLK_S_OK
                );
                assert_eq!(
                    blk.read(0, 8 * u64::from(size), 4096).unwrap(),
                    (VIRTIO_BLK_S_OK, data)
                );
            } else {
                let mut dev = Device::connect(&dut.socket, &opts)
                    .unwrap_or_else(|e| panic!("{}, ring of {size}: {e}", kind.name()));
                for q in 0..dev.queues.len() {
                    dev.stop_queue(q).unwrap();
                }
            }
        }
        dut.assert_sigterm_ends_it("every ring size");
    }
}

/// blk's `seg_max` does not follow `--queue-size`: a request with as many
/// segments as it allows fits a ring of 128 without indirect descriptors
/// (Linux, QEMU), and any smaller ring through an indirect table, whatever
/// the largest queue size is.
#[test]
fn blk_seg_max_fits_every_ring_a_driver_may_pick() {
    for max in [128u16, 1024, 32768] {
        let arg = max.to_string();
        let Some(mut dut) = Dut::start(Kind::Blk, &["--queue-size", &arg], "blk_seg_max") else {
            return;
        };
        let rings = [(128u16, false), (256, false), (8, true), (1024, true)];
        for (size, indirect) in rings.into_iter().filter(|&(size, _)| size <= max) {
            let opts = Options::default().queue_size(size).indirect(indirect);
            let mut blk = BlkDriver::connect(&dut.socket, &opts).unwrap();
            assert_eq!(blk.config.seg_max, 126, "--queue-size {max}");
            blk.use_indirect = indirect;
            let segs = blk.config.seg_max as usize;
            let data: Vec<u8> = (0..segs * 512).map(|i| (i % 241) as u8).collect();
            let req = bulkhead_tests::blk::Request::write(64, data.clone()).segs(segs);
            let done = blk.run(0, &req).unwrap();
            assert_eq!(
                done.status, VIRTIO_BLK_S_OK,
                "ring {size}, indirect {indirect}"
            );
            let req = bulkhead_tests::blk::Request::read(64, data.len() as u32).segs(segs);
            let done = blk.run(0, &req).unwrap();
            assert_eq!((done.status, done.data), (VIRTIO_BLK_S_OK, data));
        }
        dut.assert_sigterm_ends_it("seg_max");
    }
}

/// The largest `--queue-size` net accepts runs too.
#[test]
fn net_runs_a_queue_of_the_largest_size_its_command_line_accepts() {
    let test = "net_largest_queue_size";
    let Some(mut dut) = Dut::start(Kind::Net, &["--queue-size", "32768"], test) else {
        return;
    };
    let mut dev = Device::connect(&dut.socket, &Options::default().queue_size(32768))
        .expect("queues of 32768 start");
    for q in 0..dev.queues.len() {
        dev.stop_queue(q).unwrap();
    }
    drop(dev);
    dut.assert_sigterm_ends_it("net queue size 32768");
}

// ---- Every kind of fd for every message that takes one ----

const SET_LOG_BASE: u32 = 6;
const SET_INFLIGHT_FD: u32 = 32;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;

/// The kinds of fd the hostile frontend sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fd {
    EventfdBlocking,
    EventfdNonBlocking,
    EventfdSaturated,
    PipeRead,
    PipeWrite,
    Memfd,
    RegularFile,
    Socket,
    DevNull,
    Closed,
    SameTwice,
}

impl Fd {
    const ALL: [Fd; 11] = [
        Fd::EventfdBlocking,
        Fd::EventfdNonBlocking,
        Fd::EventfdSaturated,
        Fd::PipeRead,
        Fd::PipeWrite,
        Fd::Memfd,
        Fd::RegularFile,
        Fd::Socket,
        Fd::DevNull,
        Fd::Closed,
        Fd::SameTwice,
    ];

    fn name(self) -> &'static str {
        match self {
            Fd::EventfdBlocking => "eventfd, blocking",
            Fd::EventfdNonBlocking => "eventfd, non-blocking",
            Fd::EventfdSaturated => "eventfd, blocking, counter full",
            Fd::PipeRead => "pipe (read end)",
            Fd::PipeWrite => "pipe (write end)",
            Fd::Memfd => "memfd (4 MiB)",
            Fd::RegularFile => "regular file (4 MiB)",
            Fd::Socket => "unix stream socket",
            Fd::DevNull => "/dev/null",
            Fd::Closed => "a closed fd",
            Fd::SameTwice => "one eventfd attached twice",
        }
    }

    fn is_eventfd(self) -> bool {
        matches!(
            self,
            Fd::EventfdBlocking | Fd::EventfdNonBlocking | Fd::EventfdSaturated
        )
    }

    /// Opens one (files of 4 MiB, in `dir`); the fds to attach and what
    /// keeps them open.
    fn open(self, dir: &std::path::Path) -> (Vec<RawFd>, Vec<OwnedFd>) {
        const LEN: u64 = 4 << 20;
        let one = |f: OwnedFd| (vec![f.as_raw_fd()], vec![f]);
        let eventfd = |flags| -> OwnedFd {
            let e = EventFd::new(flags).unwrap();
            // SAFETY: dup of a valid fd; the OwnedFd owns the copy.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(e.as_raw_fd())) }
        };
        match self {
            Fd::EventfdBlocking => one(eventfd(0)),
            Fd::EventfdNonBlocking => one(eventfd(libc::EFD_NONBLOCK)),
            Fd::EventfdSaturated => {
                let e = eventfd(0);
                let max = (u64::MAX - 1).to_ne_bytes();
                // SAFETY: an 8-byte write from a local buffer to our eventfd.
                let n = unsafe { libc::write(e.as_raw_fd(), max.as_ptr().cast(), 8) };
                assert_eq!(n, 8);
                one(e)
            }
            Fd::PipeRead | Fd::PipeWrite => {
                let mut fds = [0; 2];
                // SAFETY: pipe2 writes two fds into the array.
                assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
                // SAFETY: both fds are fresh and owned by nobody else.
                let (r, w) = unsafe {
                    (
                        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
                        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
                    )
                };
                let attach = if self == Fd::PipeRead { fds[0] } else { fds[1] };
                (vec![attach], vec![r, w])
            }
            Fd::Memfd => one(memfd(LEN).into()),
            Fd::RegularFile => {
                let f = tempfile::tempfile_in(dir).unwrap();
                f.set_len(LEN).unwrap();
                one(f.into())
            }
            Fd::Socket => one(UnixStream::pair().unwrap().0.into()),
            Fd::DevNull => one(File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .unwrap()
                .into()),
            // No process has an fd this high: sendmsg fails with EBADF.
            Fd::Closed => (vec![i32::MAX], Vec::new()),
            Fd::SameTwice => {
                let e = eventfd(libc::EFD_NONBLOCK);
                (vec![e.as_raw_fd(), e.as_raw_fd()], vec![e])
            }
        }
    }
}

/// The messages that carry an fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FdMsg {
    Kick,
    Call,
    Err,
    MemTable,
    AddMemReg,
    RemMemReg,
    Inflight,
    BackendReq,
    LogBase,
}

impl FdMsg {
    fn name(self) -> &'static str {
        match self {
            FdMsg::Kick => "SET_VRING_KICK",
            FdMsg::Call => "SET_VRING_CALL",
            FdMsg::Err => "SET_VRING_ERR",
            FdMsg::MemTable => "SET_MEM_TABLE",
            FdMsg::AddMemReg => "ADD_MEM_REG",
            FdMsg::RemMemReg => "REM_MEM_REG",
            FdMsg::Inflight => "SET_INFLIGHT_FD",
            FdMsg::BackendReq => "SET_BACKEND_REQ_FD",
            FdMsg::LogBase => "SET_LOG_BASE",
        }
    }

    /// What the daemon must do with it: accept it, or refuse it and close
    /// the connection.
    fn accepts(self, kind: Kind, fd: Fd) -> bool {
        match self {
            FdMsg::Kick | FdMsg::Call | FdMsg::Err => fd.is_eventfd(),
            FdMsg::MemTable | FdMsg::AddMemReg => matches!(fd, Fd::Memfd | Fd::RegularFile),
            // Fds here are a mistake the spec tells backends to forgive:
            // they are closed unused, whatever they are.
            FdMsg::RemMemReg => true,
            // Every daemon offers INFLIGHT_SHMFD (net and console keep
            // their device state there since issue 22).
            FdMsg::Inflight => matches!(fd, Fd::Memfd | Fd::RegularFile),
            // Only console offers BACKEND_REQ; the channel is a unix stream socket.
            FdMsg::BackendReq => kind == Kind::Console && fd == Fd::Socket,
            // Every daemon offers dirty logging (LOG_SHMFD); the log is
            // a file whose size can be checked before it is mapped.
            FdMsg::LogBase => matches!(fd, Fd::Memfd | Fd::RegularFile),
        }
    }
}

/// What one case ended as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Refused,
    /// The frontend's own `sendmsg` failed (a closed fd): nothing reached the daemon.
    NotSent,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused, connection closed",
            Outcome::NotSent => "not sent (EBADF at the frontend)",
        }
    }
}

/// The chain a queue of `kind` completes at once: a blk read, a net frame,
/// console output.
fn one_chain(s: &Session, kind: Kind) -> Vec<(u64, u32, bool)> {
    match kind {
        Kind::Blk => {
            let hdr = s.mem.alloc_with(&[0u8; 16]).unwrap();
            let data = s.mem.alloc(512, 512).unwrap();
            let status = s.mem.alloc(1, 1).unwrap();
            vec![(hdr, 16, false), (data, 512, true), (status, 1, true)]
        }
        Kind::Net => {
            let mut pkt = vec![0u8; 12];
            pkt.extend_from_slice(&[0xff; 6]);
            pkt.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9]);
            pkt.extend_from_slice(&[0x08, 0x06]);
            pkt.resize(12 + 60, 0);
            let a = s.mem.alloc_with(&pkt).unwrap();
            vec![(a, pkt.len() as u32, false)]
        }
        Kind::Console => {
            let a = s.mem.alloc_with(b"hostile frontend").unwrap();
            vec![(a, 16, false)]
        }
    }
}

/// Sends `msg` with `fds` on queue `q` (kick/call/err) after setting the
/// other two up with good eventfds; when accepted, starts the queue, has it
/// complete a chain (an interrupt through the call fd), breaks its ring (a
/// signal through the err fd), and checks GET_VRING_BASE is still answered.
fn vring_case(s: &Session, kind: Kind, msg: FdMsg, fds: &[RawFd]) -> Outcome {
    let q: u32 = if kind == Kind::Blk { 0 } else { 1 };
    let mut ring = s.rings(q, 64);
    let good: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let mut kick_fd = good[2].as_raw_fd();
    for (role, code, good) in [
        (FdMsg::Err, SET_VRING_ERR, &good[0]),
        (FdMsg::Call, SET_VRING_CALL, &good[1]),
        (FdMsg::Kick, SET_VRING_KICK, &good[2]),
    ] {
        let attach = if role == msg {
            fds.to_vec()
        } else {
            vec![good.as_raw_fd()]
        };
        if role == msg
            && s.raw
                .send(code, NEED_REPLY, &u64p(q.into()), &attach)
                .is_err()
        {
            return Outcome::NotSent;
        }
        if role != msg {
            s.ok(code, &u64p(q.into()), &attach);
            continue;
        }
        let ack = s.raw.recv(WAIT).ok().flatten();
        if ack.as_ref().map(|r| r.payload.as_slice()) != Some(&0u64.to_le_bytes()[..]) {
            assert!(
                s.raw.closed_within(WAIT),
                "connection left open after a refusal"
            );
            return Outcome::Refused;
        }
        if role == FdMsg::Kick {
            kick_fd = fds[0];
        }
    }
    s.ok(SET_VRING_ENABLE, &state(q, 1), &[]);
    let bufs = one_chain(s, kind);
    s.publish(&mut ring, &bufs);
    let kick = |fd: RawFd| {
        let one = 1u64.to_ne_bytes();
        // A full counter is readable already; a write would block.
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: poll on one pollfd, then an 8-byte write from a local buffer.
        unsafe {
            if libc::poll(&mut p, 1, 0) == 1 {
                libc::write(fd, one.as_ptr().cast(), one.len());
            }
        }
    };
    kick(kick_fd);
    std::thread::sleep(Duration::from_millis(100));
    // avail->idx far ahead: a ring error, signalled through the err fd.
    s.mem.write(ring.avail + 2, &1000u16.to_le_bytes()).unwrap();
    kick(kick_fd);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        vring_base_answered(&s.raw, q, Duration::from_secs(5)),
        "GET_VRING_BASE not answered after {} with an accepted fd",
        msg.name()
    );
    Outcome::Accepted
}

fn mem_region_payload(gpa: u64, size: u64, uva: u64) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    for v in [gpa, size, uva, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// Sends a message other than kick/call/err with `fds`.
fn other_case(s: &Session, msg: FdMsg, fds: &[RawFd]) -> Outcome {
    let (code, payload) = match msg {
        FdMsg::MemTable => {
            let mut t = 1u32.to_le_bytes().to_vec();
            t.extend_from_slice(&[0; 4]);
            t.extend_from_slice(&mem_region_payload(0, 4 << 20, 0x7000_0000_0000)[8..]);
            (SET_MEM_TABLE, t)
        }
        FdMsg::AddMemReg => (
            ADD_MEM_REG,
            mem_region_payload(64 << 20, 1 << 20, 0x7100_0000_0000),
        ),
        FdMsg::RemMemReg => (REM_MEM_REG, mem_region_payload(0, 4 << 20, s.uva(0))),
        FdMsg::Inflight => {
            let mut b = (1u64 << 20).to_le_bytes().to_vec();
            b.extend_from_slice(&0u64.to_le_bytes());
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&64u16.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            (SET_INFLIGHT_FD, b)
        }
        FdMsg::BackendReq => (SET_BACKEND_REQ_FD, Vec::new()),
        FdMsg::LogBase => {
            let mut b = 4096u64.to_le_bytes().to_vec();
            b.extend_from_slice(&0u64.to_le_bytes());
            (SET_LOG_BASE, b)
        }
        FdMsg::Kick | FdMsg::Call | FdMsg::Err => unreachable!("vring_case"),
    };
    if s.raw.send(code, NEED_REPLY, &payload, fds).is_err() {
        return Outcome::NotSent;
    }
    match s.raw.recv(WAIT) {
        // SET_LOG_BASE's reply echoes the log's size and offset.
        Ok(Some(r))
            if r.payload == 0u64.to_le_bytes()
                || (msg == FdMsg::LogBase && r.request == SET_LOG_BASE && r.payload == payload) =>
        {
            // Still served: the next message is answered.
            s.ok(SET_VRING_NUM, &state(0, 64), &[]);
            Outcome::Accepted
        }
        _ => {
            assert!(
                s.raw.closed_within(WAIT),
                "connection left open after a refusal"
            );
            Outcome::Refused
        }
    }
}

/// One row of the matrix's table.
struct Row {
    daemon: &'static str,
    message: &'static str,
    fd: &'static str,
    outcome: Outcome,
    sigterm_ms: u128,
}

impl Dut {
    /// The checks every case ends with: alive, the next frontend served,
    /// SIGTERM honoured within a second; returns how long SIGTERM took.
    fn survived(&mut self, case: &str) -> u128 {
        self.assert_alive(case);
        self.assert_serves_next_frontend(case);
        let t0 = Instant::now();
        self.assert_sigterm_ends_it(case);
        t0.elapsed().as_millis()
    }
}

/// Every fd kind in `msg`, against every daemon; each case on a fresh
/// daemon. Prints the rows (docs/security.md keeps the table).
fn fd_matrix(msg: FdMsg) {
    let files = tempfile::tempdir().unwrap();
    // The three daemons' cases side by side: each case mostly waits for
    // its daemon (start, replies, SIGTERM), not for a CPU.
    let rows: Vec<Row> = std::thread::scope(|scope| {
        let each: Vec<_> = [Kind::Blk, Kind::Net, Kind::Console]
            .into_iter()
            .map(|kind| {
                let files = files.path();
                scope.spawn(move || fd_cases(msg, kind, files))
            })
            .collect();
        each.into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    for r in &rows {
        eprintln!(
            "| {} | {} | {} | {} | lived, next frontend served | {} ms |",
            r.message,
            r.fd,
            r.daemon,
            r.outcome.name(),
            r.sigterm_ms
        );
    }
}

/// [`fd_matrix`]'s cases against `kind`, one after the other.
fn fd_cases(msg: FdMsg, kind: Kind, files: &std::path::Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for fd in Fd::ALL {
        let case = format!("{} with {}", msg.name(), fd.name());
        let Some(mut dut) = Dut::start(kind, &[], &case) else {
            break;
        };
        // The memory table itself is the case for SET_MEM_TABLE.
        let s = Session::new(&dut, msg != FdMsg::MemTable);
        let (fds, keep) = fd.open(files);
        let outcome = match msg {
            FdMsg::Kick | FdMsg::Call | FdMsg::Err => vring_case(&s, kind, msg, &fds),
            _ => other_case(&s, msg, &fds),
        };
        let want = if fd == Fd::Closed {
            Outcome::NotSent
        } else if msg.accepts(kind, fd) {
            Outcome::Accepted
        } else {
            Outcome::Refused
        };
        assert_eq!(outcome, want, "{}: {case}", kind.name());
        drop((s, keep));
        let sigterm_ms = dut.survived(&case);
        rows.push(Row {
            daemon: kind.name(),
            message: msg.name(),
            fd: fd.name(),
            outcome,
            sigterm_ms,
        });
    }
    rows
}

#[test]
fn every_kind_of_fd_as_a_kick_fd() {
    fd_matrix(FdMsg::Kick);
}

#[test]
fn every_kind_of_fd_as_a_call_fd() {
    fd_matrix(FdMsg::Call);
}

#[test]
fn every_kind_of_fd_as_an_err_fd() {
    fd_matrix(FdMsg::Err);
}

#[test]
fn every_kind_of_fd_as_a_memory_table_region() {
    fd_matrix(FdMsg::MemTable);
}

#[test]
fn every_kind_of_fd_as_an_added_memory_region() {
    fd_matrix(FdMsg::AddMemReg);
}

#[test]
fn every_kind_of_fd_with_a_removed_memory_region() {
    fd_matrix(FdMsg::RemMemReg);
}

#[test]
fn every_kind_of_fd_as_an_inflight_area() {
    fd_matrix(FdMsg::Inflight);
}

#[test]
fn every_kind_of_fd_as_a_backend_request_channel() {
    fd_matrix(FdMsg::BackendReq);
}

#[test]
fn every_kind_of_fd_as_a_dirty_log() {
    fd_matrix(FdMsg::LogBase);
}

// ---- Messages out of order, half messages, stalls, disconnects ----

const SET_OWNER: u32 = 3;
const RESET_OWNER: u32 = 4;
const GET_FEATURES: u32 = 1;

/// A named hostile sequence, played on a fresh connection of a fresh daemon.
type Sequence = (&'static str, fn(&Session, Kind));

/// Starts queue 0 with good eventfds; returns its rings and the eventfds.
fn running_queue(s: &Session) -> (Ring, Vec<EventFd>) {
    let ring = s.rings(0, 64);
    let fds: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    s.ok(SET_VRING_CALL, &u64p(0), &[fds[0].as_raw_fd()]);
    s.ok(SET_VRING_KICK, &u64p(0), &[fds[1].as_raw_fd()]);
    s.ok(SET_VRING_ENABLE, &state(0, 1), &[]);
    (ring, fds)
}

fn mem_table_payload(s: &Session) -> Vec<u8> {
    let mut t = 1u32.to_le_bytes().to_vec();
    t.extend_from_slice(&[0; 4]);
    t.extend_from_slice(&mem_region_payload(0, 4 << 20, s.uva(0))[8..]);
    t
}

const OUT_OF_ORDER: &[Sequence] = &[
    ("kick before the memory table", |s, _| {
        // Session::new(.., false): no table yet. Accepted, the queue waits.
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        s.ok(SET_VRING_NUM, &state(0, 64), &[]);
        s.ok(SET_VRING_KICK, &u64p(0), &[kick.as_raw_fd()]);
        s.ok(SET_VRING_ENABLE, &state(0, 1), &[]);
        kick.write(1).unwrap();
        let f = s.mem.file().try_clone().unwrap();
        s.ok(SET_MEM_TABLE, &mem_table_payload(s), &[f.as_raw_fd()]);
        assert!(vring_base_answered(&s.raw, 0, WAIT));
    }),
    ("a new memory table while a queue runs", |s, _| {
        let f = s.mem.file().try_clone().unwrap();
        s.ok(SET_MEM_TABLE, &mem_table_payload(s), &[f.as_raw_fd()]);
        let (_ring, fds) = running_queue(s);
        let other = memfd(4 << 20);
        let mut t = 1u32.to_le_bytes().to_vec();
        t.extend_from_slice(&[0; 4]);
        t.extend_from_slice(&mem_region_payload(0, 4 << 20, 0x7200_0000_0000)[8..]);
        s.ok(SET_MEM_TABLE, &t, &[other.as_raw_fd()]);
        fds[1].write(1).unwrap();
        assert!(vring_base_answered(&s.raw, 0, WAIT));
    }),
    ("SET_VRING_ADDR on a running queue", |s, _| {
        let f = s.mem.file().try_clone().unwrap();
        s.ok(SET_MEM_TABLE, &mem_table_payload(s), &[f.as_raw_fd()]);
        let (_ring, _fds) = running_queue(s);
        let u = s.uva(0);
        s.refused(
            SET_VRING_ADDR,
            &vring_addr(0, u, u + 0x1000, u + 0x2000),
            &[],
        );
    }),
    ("SET_VRING_NUM on a running queue", |s, _| {
        let f = s.mem.file().try_clone().unwrap();
        s.ok(SET_MEM_TABLE, &mem_table_payload(s), &[f.as_raw_fd()]);
        let (_ring, _fds) = running_queue(s);
        s.refused(SET_VRING_NUM, &state(0, 32), &[]);
    }),
    ("SET_VRING_ERR on a running queue", |s, _| {
        let f = s.mem.file().try_clone().unwrap();
        s.ok(SET_MEM_TABLE, &mem_table_payload(s), &[f.as_raw_fd()]);
        let (_ring, _fds) = running_queue(s);
        let e = EventFd::new(0).unwrap();
        s.refused(SET_VRING_ERR, &u64p(0), &[e.as_raw_fd()]);
    }),
    ("GET_VRING_BASE of a queue never set up", |s, _| {
        assert!(vring_base_answered(&s.raw, 0, WAIT));
    }),
    ("the memory table removed under a running queue", |s, _| {
        let f = s.mem.file().try_clone().unwrap();
        s.ok(SET_MEM_TABLE, &mem_table_payload(s), &[f.as_raw_fd()]);
        let (_ring, fds) = running_queue(s);
        s.ok(REM_MEM_REG, &mem_region_payload(0, 4 << 20, s.uva(0)), &[]);
        fds[1].write(1).unwrap();
        assert!(vring_base_answered(&s.raw, 0, WAIT));
    }),
    (
        "RESET_OWNER while a queue runs, then a second bring-up",
        |s, _| {
            let f = s.mem.file().try_clone().unwrap();
            s.ok(SET_MEM_TABLE, &mem_table_payload(s), &[f.as_raw_fd()]);
            let (_ring, _fds) = running_queue(s);
            s.raw.send(RESET_OWNER, 0, &[], &[]).unwrap();
            s.raw.send(SET_OWNER, 0, &[], &[]).unwrap();
            s.raw.send(GET_FEATURES, 0, &[], &[]).unwrap();
            let r = s.raw.recv(WAIT).unwrap().expect("GET_FEATURES answered");
            assert_eq!(r.request, GET_FEATURES);
        },
    ),
];

/// Raw bytes on the socket: a header of `code` announcing `size` bytes.
fn header(code: u32, size: u32) -> Vec<u8> {
    let mut h = code.to_le_bytes().to_vec();
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

/// How soon a stalled frontend must be dropped: the daemon's one-second
/// message deadline, plus slack for a loaded machine.
const DROPPED_WITHIN: Duration = Duration::from_secs(3);

const STALLS: &[Sequence] = &[
    ("half a header, then nothing", |s, _| {
        s.raw
            .send_bytes(&header(GET_FEATURES, 0)[..6], &[])
            .unwrap();
        assert!(s.raw.closed_within(DROPPED_WITHIN), "not dropped");
    }),
    ("a header and half its payload, then nothing", |s, _| {
        let mut m = header(SET_VRING_NUM, 8);
        m.extend_from_slice(&[0; 4]);
        s.raw.send_bytes(&m, &[]).unwrap();
        assert!(s.raw.closed_within(DROPPED_WITHIN), "not dropped");
    }),
    ("fds attached to four bytes", |s, _| {
        let e = EventFd::new(0).unwrap();
        s.raw
            .send_bytes(&header(SET_VRING_CALL, 8)[..4], &[e.as_raw_fd()])
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.raw
            .send_bytes(
                &[&header(SET_VRING_CALL, 8)[4..], &u64p(0)[..]].concat(),
                &[],
            )
            .unwrap();
        assert!(s.raw.closed_within(DROPPED_WITHIN), "not dropped");
    }),
    ("a header announcing 64 KiB that never come", |s, _| {
        s.raw
            .send_bytes(&header(SET_FEATURES_CODE, 0x10000), &[])
            .unwrap();
        assert!(s.raw.closed_within(DROPPED_WITHIN), "not dropped");
    }),
    ("requests whose replies are never read", |s, _| {
        // Our end never reads; once the daemon's replies fill the socket,
        // it stops reading too, and drops us.
        let sock = s.raw_socket();
        sock.set_nonblocking(true).unwrap();
        let msg = header(GET_FEATURES, 0);
        let deadline = Instant::now() + WAIT;
        let mut sent = 0u64;
        loop {
            match std::io::Write::write(&mut &sock, &msg) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => break, // dropped: EPIPE / ECONNRESET
            }
            assert!(
                Instant::now() < deadline,
                "never dropped ({sent} requests sent)"
            );
            if sent.is_multiple_of(1024) && peer_closed(&sock) {
                break;
            }
        }
    }),
];

const SET_FEATURES_CODE: u32 = 2;

/// Whether the other end of `sock` has closed it (our writes would fail).
fn peer_closed(sock: &UnixStream) -> bool {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll on one pollfd without waiting.
    unsafe { libc::poll(&mut p, 1, 0) };
    p.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

impl Session {
    /// A duplicate of the raw socket, for byte-level games.
    fn raw_socket(&self) -> UnixStream {
        // SAFETY: the frontend keeps its socket open while we duplicate it.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self._fe.as_raw_fd()) };
        fd.try_clone_to_owned().unwrap().into()
    }
}

/// Plays each sequence on a fresh daemon of every kind; each must leave the
/// daemon alive, serving the next frontend, ending within a second of SIGTERM.
fn sequences(list: &[Sequence], with_mem: bool) {
    for kind in [Kind::Blk, Kind::Net, Kind::Console] {
        for (name, play) in list {
            let Some(mut dut) = Dut::start(kind, &[], name) else {
                break;
            };
            let s = Session::new(&dut, with_mem);
            play(&s, kind);
            drop(s);
            let ms = dut.survived(name);
            eprintln!(
                "| {name} | {} | lived, next frontend served | {ms} ms |",
                kind.name()
            );
        }
    }
}

#[test]
fn messages_out_of_order_are_refused_or_harmless() {
    sequences(OUT_OF_ORDER, false);
}

#[test]
fn a_frontend_that_stalls_mid_message_or_ignores_replies_is_dropped() {
    sequences(STALLS, true);
}

/// SIGTERM while a frontend holds the daemon mid-message (or with replies
/// unread) ends it within a second: the serve loop waits for the rest of a
/// message on the signalfd too.
#[test]
fn sigterm_during_a_half_message_ends_the_daemon_within_a_second() {
    for kind in [Kind::Blk, Kind::Net, Kind::Console] {
        let Some(mut dut) = Dut::start(kind, &[], "sigterm mid-message") else {
            continue;
        };
        let s = Session::new(&dut, true);
        s.raw
            .send_bytes(&header(SET_VRING_NUM, 8)[..7], &[])
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        dut.assert_sigterm_ends_it("SIGTERM mid-message");
        drop(s);
    }
}

/// A frontend that disconnects after each step of a bring-up (as
/// `bulkhead-vmm` and QEMU send it), on a fresh daemon each time.
#[test]
fn a_disconnect_at_every_step_of_a_bring_up_leaves_the_daemon_serving() {
    use bulkhead_tests::virtq::VirtQueue;
    use vhost::VringConfigData;
    const STEPS: usize = 14;
    for kind in [Kind::Blk, Kind::Net, Kind::Console] {
        for k in 0..=STEPS {
            let case = format!("disconnect after {k} of {STEPS} bring-up steps");
            let Some(mut dut) = Dut::start(kind, &[], &case) else {
                break;
            };
            {
                let mut fe = Frontend::connect(&dut.socket, 1).expect("connect");
                let mem = Arc::new(GuestMemory::new(4 << 20).unwrap());
                let q = VirtQueue::new(mem.clone(), 64).unwrap();
                let mut features = 0;
                let mut step = 0;
                let mut next = || {
                    step += 1;
                    step <= k
                };
                let _ = (|| -> vhost::Result<()> {
                    if next() {
                        fe.set_owner()?;
                    }
                    if next() {
                        features = fe.get_features()?;
                    }
                    if next() {
                        let _ = fe.get_protocol_features()?;
                    }
                    if next() {
                        fe.set_protocol_features(
                            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG,
                        )?;
                    }
                    if next() {
                        fe.get_queue_num()?;
                    }
                    if next() {
                        fe.set_features(features & !VHOST_F_LOG_ALL)?;
                    }
                    if next() {
                        fe.set_mem_table(&mem.region_infos())?;
                    }
                    if next() {
                        fe.set_vring_num(0, 64)?;
                    }
                    let a = q.addrs();
                    if next() {
                        let cfg = VringConfigData {
                            queue_max_size: 64,
                            queue_size: 64,
                            flags: 0,
                            desc_table_addr: mem.host_addr(a.desc).unwrap(),
                            used_ring_addr: mem.host_addr(a.used).unwrap(),
                            avail_ring_addr: mem.host_addr(a.avail).unwrap(),
                            log_addr: None,
                        };
                        fe.set_vring_addr(0, &cfg)?;
                    }
                    if next() {
                        fe.set_vring_base(0, 0)?;
                    }
                    if next() {
                        fe.set_vring_call(0, q.call_fd())?;
                    }
                    if next() {
                        fe.set_vring_kick(0, q.kick_fd())?;
                    }
                    if next() {
                        fe.set_vring_enable(0, true)?;
                    }
                    if next() {
                        q.kick().unwrap();
                        fe.get_vring_base(0)?;
                    }
                    Ok(())
                })();
            }
            let ms = dut.survived(&case);
            if k == STEPS {
                eprintln!(
                    "| disconnect after each of the {STEPS} bring-up steps | {} | lived, next frontend served | {ms} ms (last) |",
                    kind.name()
                );
            }
        }
    }
}
