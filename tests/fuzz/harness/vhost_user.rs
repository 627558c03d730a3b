//! Targets `vhost_user_messages`, `net_messages` and `console_messages`: the
//! common vhost-user request handler with each daemon's real device behind
//! it (`BlkDevice` on a memfd image, `NetDevice` on a stand-in tap,
//! `ConsoleDevice` with a socket port), fed an arbitrary stream of vhost-user
//! messages over a socketpair, with fuzzer-chosen fds attached (memfds of any
//! size and contents, eventfds, sockets, pipes, /dev/null, fds the backend
//! sent back). Queues that the stream starts run in their real worker threads
//! over the memfd guest memory.
//!
//! Input: up to [`MAX_MSGS`] messages, each: request code u8, flags u8 (bit 2:
//! raw version bits 0-1; bit 3: NEED_REPLY; bit 4: REPLY bit; bit 5: lying
//! size u16 follows the payload), payload length u16 and bytes, fd count u8
//! (mod 9), fd specs.
//!
//! Invariants: the handler never panics (in any thread), never blocks, and
//! the connection ends cleanly whatever the frontend sent.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use bulkhead_blk::device::{BlkConfig, BlkDevice};
use bulkhead_blk::disk::Disk;
use bulkhead_blk::engine::EngineKind;
use bulkhead_common::VhostUserDevice;
use bulkhead_common::handler::BackendHandler;
use bulkhead_console::device::ConsoleDevice;
use bulkhead_console::port::{HostSpec, Port};
use bulkhead_net::device::{NetConfig, NetDevice};
use bulkhead_net::tap::Tap;
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::blk_request::memfd;
use super::guest::{F_NEXT, F_WRITE, Image, blk_header};
use super::input::{Input, Seed};

/// Most messages per input.
pub const MAX_MSGS: usize = 48;
/// Largest payload per message.
const MAX_PAYLOAD: usize = 4096;
/// Frontend address of guest address 0 in the seeds.
const UVA: u64 = 0x7f00_0000_0000;

/// vhost-user request codes used by the seeds.
pub mod code {
    #![allow(missing_docs)]
    pub const GET_FEATURES: u8 = 1;
    pub const SET_FEATURES: u8 = 2;
    pub const SET_OWNER: u8 = 3;
    pub const RESET_OWNER: u8 = 4;
    pub const SET_MEM_TABLE: u8 = 5;
    pub const SET_VRING_NUM: u8 = 8;
    pub const SET_VRING_ADDR: u8 = 9;
    pub const SET_VRING_BASE: u8 = 10;
    pub const GET_VRING_BASE: u8 = 11;
    pub const SET_VRING_KICK: u8 = 12;
    pub const SET_VRING_CALL: u8 = 13;
    pub const SET_VRING_ERR: u8 = 14;
    pub const GET_PROTOCOL_FEATURES: u8 = 15;
    pub const SET_PROTOCOL_FEATURES: u8 = 16;
    pub const GET_QUEUE_NUM: u8 = 17;
    pub const SET_VRING_ENABLE: u8 = 18;
    pub const SET_BACKEND_REQ_FD: u8 = 21;
    pub const GET_CONFIG: u8 = 24;
    pub const SET_CONFIG: u8 = 25;
    pub const GET_INFLIGHT_FD: u8 = 31;
    pub const SET_INFLIGHT_FD: u8 = 32;
    pub const RESET_DEVICE: u8 = 34;
    pub const GET_MAX_MEM_SLOTS: u8 = 36;
    pub const ADD_MEM_REG: u8 = 37;
    pub const REM_MEM_REG: u8 = 38;
}

/// An fd to attach, as the fuzzer describes it.
#[derive(Clone, Debug)]
pub enum FdSpec {
    /// A memfd of `pages` pages whose first bytes are `contents`.
    Memfd(u8, Vec<u8>),
    /// An eventfd.
    EventFd,
    /// A memfd of exactly `n` bytes.
    SmallMemfd(u16),
    /// /dev/null (a character device).
    DevNull,
    /// One end of a fresh socketpair.
    Socket,
    /// The read end of a pipe.
    Pipe,
    /// The `n`th fd the backend sent in a reply (e.g. its inflight memfd).
    Received(u8),
}

impl FdSpec {
    fn decode(inp: &mut Input<'_>) -> Self {
        match inp.u8() % 7 {
            0 => {
                let pages = inp.u8();
                let n = usize::from(inp.u16());
                FdSpec::Memfd(pages, inp.bytes(n).to_vec())
            }
            1 => FdSpec::EventFd,
            2 => FdSpec::SmallMemfd(inp.u16()),
            3 => FdSpec::DevNull,
            4 => FdSpec::Socket,
            5 => FdSpec::Pipe,
            _ => FdSpec::Received(inp.u8()),
        }
    }

    fn encode(&self, s: &mut Seed) {
        match self {
            FdSpec::Memfd(pages, c) => {
                s.u8(0).u8(*pages).u16(c.len() as u16).bytes(c);
            }
            FdSpec::EventFd => {
                s.u8(1);
            }
            FdSpec::SmallMemfd(n) => {
                s.u8(2).u16(*n);
            }
            FdSpec::DevNull => {
                s.u8(3);
            }
            FdSpec::Socket => {
                s.u8(4);
            }
            FdSpec::Pipe => {
                s.u8(5);
            }
            FdSpec::Received(i) => {
                s.u8(6).u8(*i);
            }
        }
    }

    fn open(&self, received: &[File]) -> Option<OwnedFd> {
        Some(match self {
            FdSpec::Memfd(pages, contents) => {
                let f = memfd(u64::from(*pages) * 4096);
                let n = contents.len().min(usize::from(*pages) * 4096);
                std::os::unix::fs::FileExt::write_all_at(&f, &contents[..n], 0).ok()?;
                f.into()
            }
            FdSpec::EventFd => {
                let e = EventFd::new(libc::EFD_NONBLOCK).ok()?;
                // SAFETY: dup of a valid fd we own; the dup is owned by the OwnedFd.
                unsafe { OwnedFd::from_raw_fd(libc::dup(e.as_raw_fd())) }
            }
            FdSpec::SmallMemfd(n) => memfd(u64::from(*n)).into(),
            FdSpec::DevNull => OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .ok()?
                .into(),
            FdSpec::Socket => UnixStream::pair().ok()?.0.into(),
            FdSpec::Pipe => {
                let mut fds = [0 as RawFd; 2];
                // SAFETY: pipe2 writes two fds into the array.
                if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                    return None;
                }
                // SAFETY: both fds are fresh; the write end is closed at once.
                unsafe {
                    libc::close(fds[1]);
                    OwnedFd::from_raw_fd(fds[0])
                }
            }
            FdSpec::Received(i) => {
                let f = received.get(usize::from(*i) % received.len().max(1))?;
                f.try_clone().ok()?.into()
            }
        })
    }
}

/// One message as the fuzzer describes it.
#[derive(Clone, Debug)]
pub struct Msg {
    /// Request code.
    pub code: u8,
    /// Harness flags (see the module doc).
    pub flags: u8,
    /// Payload.
    pub payload: Vec<u8>,
    /// Header size when it lies about the payload.
    pub lying_size: Option<u16>,
    /// Fds to attach.
    pub fds: Vec<FdSpec>,
}

const NEED_REPLY: u8 = 8;

impl Msg {
    /// A well-formed message asking for an ack.
    pub fn new(code: u8, payload: &[u8], fds: Vec<FdSpec>) -> Self {
        Msg {
            code,
            flags: NEED_REPLY,
            payload: payload.to_vec(),
            lying_size: None,
            fds,
        }
    }

    fn decode(inp: &mut Input<'_>) -> Self {
        let code = inp.u8();
        let flags = inp.u8();
        let n = usize::from(inp.u16()) % (MAX_PAYLOAD + 1);
        let payload = inp.bytes(n).to_vec();
        let lying_size = (flags & 32 != 0).then(|| inp.u16());
        let nfds = inp.u8() % 9;
        let fds = (0..nfds).map(|_| FdSpec::decode(inp)).collect();
        Msg {
            code,
            flags,
            payload,
            lying_size,
            fds,
        }
    }

    /// Appends the message to a seed.
    pub fn encode(&self, s: &mut Seed) {
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

    fn wire(&self) -> Vec<u8> {
        let mut hdr_flags: u32 = if self.flags & 4 != 0 {
            u32::from(self.flags & 3)
        } else {
            1
        };
        if self.flags & NEED_REPLY != 0 {
            hdr_flags |= 0x8;
        }
        if self.flags & 16 != 0 {
            hdr_flags |= 0x4;
        }
        let size = self
            .lying_size
            .map(u32::from)
            .unwrap_or(self.payload.len() as u32);
        let mut b = Vec::with_capacity(12 + self.payload.len());
        b.extend_from_slice(&u32::from(self.code).to_le_bytes());
        b.extend_from_slice(&hdr_flags.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&self.payload);
        b
    }
}

fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, no timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// Reads every pending reply, keeping up to four fds the backend sent.
fn drain(front: &UnixStream, received: &mut Vec<File>) {
    let mut buf = [0u8; 4096];
    while let Ok((n, f)) = front.recv_with_fd(&mut buf) {
        if let Some(f) = f
            && received.len() < 4
        {
            received.push(f);
        }
        if n == 0 {
            break;
        }
    }
}

/// The daemon whose device sits behind the handler.
#[derive(Clone, Copy, Debug)]
pub enum Daemon {
    /// `bulkhead-blk`: 2 queues of up to 64, sync engine on a memfd image.
    Blk,
    /// `bulkhead-net`: one queue pair and the control queue, a stand-in tap.
    Net,
    /// `bulkhead-console`: port 0 on a unix socket, control queues.
    Console,
}

impl Daemon {
    /// The virtio features the seeds acknowledge (offered by the device).
    fn seed_features(self) -> u64 {
        use bulkhead_common::spec::vhost_user::VHOST_USER_F_PROTOCOL_FEATURES;
        use bulkhead_common::spec::{VIRTIO_F_VERSION_1, blk::*, console::*, net::*, ring::*};
        let common = VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC;
        match self {
            Daemon::Blk => {
                common
                    | VIRTIO_BLK_F_FLUSH
                    | VIRTIO_BLK_F_DISCARD
                    | VIRTIO_BLK_F_WRITE_ZEROES
                    | VIRTIO_BLK_F_SEG_MAX
            }
            Daemon::Net => {
                common
                    | VIRTIO_NET_F_CSUM
                    | VIRTIO_NET_F_MAC
                    | VIRTIO_NET_F_MRG_RXBUF
                    | VIRTIO_NET_F_STATUS
                    | VIRTIO_NET_F_CTRL_VQ
                    | VIRTIO_NET_F_CTRL_RX
            }
            Daemon::Console => {
                common
                    | VIRTIO_CONSOLE_F_SIZE
                    | VIRTIO_CONSOLE_F_MULTIPORT
                    | VIRTIO_CONSOLE_F_EMERG_WRITE
            }
        }
    }

    /// The protocol features the seeds acknowledge.
    fn seed_protocol(self) -> u64 {
        // MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS.
        let common = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15);
        match self {
            // INFLIGHT_SHMFD, RESET_DEVICE.
            Daemon::Blk => common | (1 << 12) | (1 << 13),
            Daemon::Net => common,
            // BACKEND_REQ.
            Daemon::Console => common | (1 << 5),
        }
    }

    /// Bytes of the device's config space.
    fn config_len(self) -> u32 {
        match self {
            Daemon::Blk => 60,
            Daemon::Net | Daemon::Console => 12,
        }
    }
}

/// Runs one input against `bulkhead-blk`'s device.
pub fn run(data: &[u8]) {
    run_for(Daemon::Blk, data);
}

/// Runs one input against `bulkhead-net`'s device.
pub fn run_net(data: &[u8]) {
    run_for(Daemon::Net, data);
}

/// Runs one input against `bulkhead-console`'s device.
pub fn run_console(data: &[u8]) {
    run_for(Daemon::Console, data);
}

fn run_for(daemon: Daemon, data: &[u8]) {
    ignore_sigpipe();
    let mut inp = Input::new(data);
    let msgs: Vec<Msg> = (0..MAX_MSGS)
        .map_while(|_| (!inp.is_empty()).then(|| Msg::decode(&mut inp)))
        .collect();
    struct Serve<'a>(&'a [Msg]);
    impl WithDevice for Serve<'_> {
        fn run<D: VhostUserDevice + 'static>(self, dev: Arc<D>) {
            serve(self.0, dev);
        }
    }
    with_device(daemon, "messages", Serve(&msgs));
}

/// As in the daemon, where Rust's runtime ignores SIGPIPE (libFuzzer's own
/// main does not): a reply or notification to a closed peer is EPIPE.
pub fn ignore_sigpipe() {
    static IGNORE_SIGPIPE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal disposition to SIG_IGN, no handler code runs.
    IGNORE_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

/// Something to run with a daemon's real device.
pub trait WithDevice {
    /// Runs with `dev`.
    fn run<D: VhostUserDevice + 'static>(self, dev: Arc<D>);
}

/// Builds `daemon`'s real device, small (blk: 2 queues of up to 64 on a
/// memfd image, sync engine; net: one pair on a stand-in tap; console: port
/// 0 on a unix socket in a scratch directory named after `tag`), and hands
/// it to `w`.
pub fn with_device(daemon: Daemon, tag: &str, w: impl WithDevice) {
    match daemon {
        Daemon::Blk => {
            let disk = Disk::from_file(memfd(1 << 16)).expect("memfd image");
            let cfg = BlkConfig {
                readonly: false,
                num_queues: 2,
                queue_size: 64,
                serial: Some("bulkhead-fuzz".into()),
                engine: EngineKind::Sync,
            };
            w.run(Arc::new(BlkDevice::new(disk, cfg)));
        }
        Daemon::Net => {
            // The harness keeps the network end open; what the device
            // transmits piles up there until the pair is dropped.
            let (dev, _network) = super::net::packet_pair();
            let cfg = NetConfig {
                mac: Some(bulkhead_net::request::MacAddr([
                    0x52, 0x54, 0, 0x12, 0x34, 0x56,
                ])),
                mtu: Some(1500),
                queue_pairs: 1,
                queue_size: 256,
            };
            let net = NetDevice::new(cfg, vec![Tap::stand_in(dev)]).expect("net device");
            w.run(Arc::new(net));
        }
        Daemon::Console => {
            // A directory of its own: the `console` harness removes its
            // directory after each input, and the stable replay runs the
            // harnesses side by side in one process.
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "bulkhead-fuzz-console-{tag}-{}-{n}",
                std::process::id()
            ));
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join("port0");
            let (port, _) = Port::open(0, None, &HostSpec::Socket(path), 4096).expect("port");
            w.run(Arc::new(ConsoleDevice::new(vec![port]).expect("console")));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Feeds `msgs` to a handler over `dev`, as the daemon's serve loop would.
fn serve<D: VhostUserDevice + 'static>(msgs: &[Msg], dev: Arc<D>) {
    let (front, back) = UnixStream::pair().expect("socketpair");
    front.set_nonblocking(true).expect("nonblocking");
    back.set_nonblocking(true).expect("nonblocking");
    let back_fd = back.as_raw_fd();
    let handler = Arc::new(Mutex::new(BackendHandler::new(dev)));
    let mut req = BackendReqHandler::from_stream(back, handler.clone());
    let mut received: Vec<File> = Vec::new();

    for m in msgs {
        let fds: Vec<OwnedFd> = m.fds.iter().filter_map(|f| f.open(&received)).collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if front.send_with_fds(&[&m.wire()[..]], &raw).is_err() {
            break;
        }
        drop(fds);
        if !readable(back_fd) {
            continue;
        }
        // As the daemon's serve loop: any error ends the connection.
        let r = req.handle_request();
        drain(&front, &mut received);
        if r.is_err() {
            break;
        }
    }
    drop(req);
    handler.lock().expect("handler lock").stop_all();
}

fn u64b(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn state(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

/// A SET_MEM_TABLE / ADD_MEM_REG region: gpa, size, frontend address, offset.
pub fn region(gpa: u64, size: u64, uva: u64, offset: u64) -> Vec<u8> {
    [gpa, size, uva, offset]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn inflight(size: u64, nq: u16, qs: u16) -> Vec<u8> {
    let mut b = u64b(size);
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&nq.to_le_bytes());
    b.extend_from_slice(&qs.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

/// Guest memory of the seeds: queue 0 (size 16) at desc 0x0, avail 0x100,
/// used 0x200, with a write and a read of sector 2 published.
pub fn guest_image() -> Vec<u8> {
    let mut img = Image::new();
    img.put(0x400, &blk_header(1, 2))
        .put(0x600, &[0xab; 512])
        .desc(0, 0, 0x400, 16, F_NEXT, 1)
        .desc(0, 1, 0x600, 512, F_NEXT, 2)
        .desc(0, 2, 0x800, 1, F_WRITE, 0)
        .put(0x410, &blk_header(0, 2))
        .desc(0, 3, 0x410, 16, F_NEXT, 4)
        .desc(0, 4, 0xa00, 512, F_NEXT | F_WRITE, 5)
        .desc(0, 5, 0x801, 1, F_WRITE, 0)
        .avail(0x100, &[0, 3]);
    img.0
}

/// The bring-up a frontend sends, as in ARCHITECTURE.md, up to a running queue 0.
pub fn bring_up(daemon: Daemon, with_inflight: bool) -> Vec<Msg> {
    use code::*;
    let protocol = daemon.seed_protocol();
    let features = daemon.seed_features();
    let mut mem = 1u32.to_le_bytes().to_vec();
    mem.extend_from_slice(&[0; 4]);
    mem.extend(region(0, 0x10000, UVA, 0));
    let mut get_config = [0u32, daemon.config_len(), 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>();
    get_config.resize(12 + daemon.config_len() as usize, 0);
    let mut addr = state(0, 0);
    for a in [UVA, UVA + 0x200, UVA + 0x100, 0] {
        addr.extend_from_slice(&a.to_le_bytes());
    }
    let mut v = vec![
        Msg::new(SET_OWNER, &[], vec![]),
        Msg::new(GET_FEATURES, &[], vec![]),
        Msg::new(GET_PROTOCOL_FEATURES, &[], vec![]),
        Msg::new(SET_PROTOCOL_FEATURES, &u64b(protocol), vec![]),
        Msg::new(GET_QUEUE_NUM, &[], vec![]),
        Msg::new(SET_FEATURES, &u64b(features), vec![]),
        Msg::new(GET_CONFIG, &get_config, vec![]),
        Msg::new(SET_MEM_TABLE, &mem, vec![FdSpec::Memfd(16, guest_image())]),
        Msg::new(SET_VRING_NUM, &state(0, 16), vec![]),
    ];
    if with_inflight {
        v.push(Msg::new(GET_INFLIGHT_FD, &inflight(0, 1, 16), vec![]));
        v.push(Msg::new(
            SET_INFLIGHT_FD,
            &inflight(320, 1, 16),
            vec![FdSpec::Received(0)],
        ));
    }
    v.extend([
        Msg::new(SET_VRING_ADDR, &addr, vec![]),
        Msg::new(SET_VRING_BASE, &state(0, 0), vec![]),
        Msg::new(SET_VRING_CALL, &u64b(0), vec![FdSpec::EventFd]),
        Msg::new(SET_VRING_ERR, &u64b(0), vec![FdSpec::EventFd]),
        Msg::new(SET_VRING_KICK, &u64b(0), vec![FdSpec::EventFd]),
        Msg::new(SET_VRING_ENABLE, &state(0, 1), vec![]),
    ]);
    v
}

fn encode(msgs: &[Msg]) -> Vec<u8> {
    let mut s = Seed::new();
    for m in msgs {
        m.encode(&mut s);
    }
    s.finish()
}

/// Seeds of `vhost_user_messages` (blk): bring-up with and without
/// inflight, then stop/config/reset traffic, memory slot changes, and a few
/// refused messages.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    seeds_for(Daemon::Blk)
}

/// Seeds of `net_messages`: as [`seeds`], with net's features and config.
pub fn seeds_net() -> Vec<(&'static str, Vec<u8>)> {
    seeds_for(Daemon::Net)
}

/// Seeds of `console_messages`: as [`seeds`], with console's features,
/// config and backend channel.
pub fn seeds_console() -> Vec<(&'static str, Vec<u8>)> {
    seeds_for(Daemon::Console)
}

fn seeds_for(daemon: Daemon) -> Vec<(&'static str, Vec<u8>)> {
    use code::*;
    let inflight = matches!(daemon, Daemon::Blk);
    let mut out = Vec::new();
    let mut set_config = [32u32, 1, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>();
    set_config.push(0);

    let mut a = bring_up(daemon, inflight);
    if matches!(daemon, Daemon::Blk) {
        a.extend([
            Msg::new(GET_VRING_BASE, &state(0, 0), vec![]),
            Msg::new(SET_CONFIG, &set_config, vec![]),
            Msg::new(SET_VRING_KICK, &u64b(0), vec![FdSpec::EventFd]),
            Msg::new(RESET_DEVICE, &[], vec![]),
        ]);
    } else {
        // Net and console refuse config writes:
        // the refused write comes last, as it ends the connection.
        a.extend([
            Msg::new(GET_VRING_BASE, &state(0, 0), vec![]),
            Msg::new(SET_VRING_KICK, &u64b(0), vec![FdSpec::EventFd]),
            Msg::new(SET_VRING_ENABLE, &state(0, 1), vec![]),
            Msg::new(SET_CONFIG, &set_config, vec![]),
        ]);
    }
    let name = if inflight {
        "bring-up-inflight"
    } else {
        "bring-up-stop-restart"
    };
    out.push((name, encode(&a)));

    let mut b = bring_up(daemon, false);
    let mut single = vec![0u8; 8];
    single.extend(region(0x100000, 0x1000, UVA + 0x100000, 0));
    b.extend([
        Msg::new(GET_MAX_MEM_SLOTS, &[], vec![]),
        Msg::new(ADD_MEM_REG, &single, vec![FdSpec::Memfd(1, vec![])]),
        Msg::new(REM_MEM_REG, &single, vec![]),
        Msg::new(SET_VRING_ENABLE, &state(0, 0), vec![]),
        Msg::new(RESET_OWNER, &[], vec![]),
    ]);
    out.push(("bring-up-mem-slots", encode(&b)));

    // Refused: a region larger than its fd, a queue index out of range, a
    // queue size not a power of two, a memory table with an extra fd.
    // Each ends the connection, as the daemon does on any refused message.
    let mut big = 1u32.to_le_bytes().to_vec();
    big.extend_from_slice(&[0; 4]);
    big.extend(region(0, 0x100000, UVA, 0));
    for (name, m) in [
        (
            "refused-fd-too-small",
            Msg::new(SET_MEM_TABLE, &big, vec![FdSpec::SmallMemfd(4096)]),
        ),
        (
            "refused-extra-fd",
            Msg::new(
                SET_MEM_TABLE,
                &big,
                vec![FdSpec::Memfd(1, vec![]), FdSpec::EventFd],
            ),
        ),
        (
            "refused-queue-index",
            Msg::new(SET_VRING_NUM, &state(7, 16), vec![]),
        ),
        (
            "refused-queue-size",
            Msg::new(SET_VRING_NUM, &state(0, 3), vec![]),
        ),
        (
            "refused-backend-channel",
            Msg::new(SET_BACKEND_REQ_FD, &[], vec![FdSpec::Socket]),
        ),
    ] {
        let mut c = bring_up(daemon, false)[..6].to_vec();
        c.push(m);
        out.push((name, encode(&c)));
    }
    out
}
