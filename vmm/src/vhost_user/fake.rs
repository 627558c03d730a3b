//! A scripted vhost-user backend for unit tests: it accepts one connection,
//! answers the requests that need an answer from its [`Offer`], and records
//! every message it received.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

/// Request codes the tests look for (vhost-user spec).
pub(super) mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
}

/// What the fake backend answers.
#[derive(Clone, Debug, Default)]
pub(super) struct Offer {
    pub features: u64,
    pub protocol: u64,
    pub queues: u64,
    /// Config space bytes (GET_CONFIG answers the bytes asked for, from these).
    pub config: Vec<u8>,
    /// What GET_VRING_BASE answers.
    pub base: u32,
}

/// One message as received.
#[derive(Clone, Debug)]
pub(super) struct Msg {
    pub code: u32,
    pub payload: Vec<u8>,
    pub fds: usize,
}

impl Msg {
    /// The payload's u32 at `off` (little endian).
    pub fn u32_at(&self, off: usize) -> u32 {
        let b = &self.payload[off..off + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The payload's u64 at `off`.
    pub fn u64_at(&self, off: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.payload[off..off + 8]);
        u64::from_le_bytes(a)
    }
}

/// A fake backend serving one frontend on a socket path of its own.
pub(super) struct FakeBackend {
    pub path: PathBuf,
    thread: Option<JoinHandle<Vec<Msg>>>,
}

impl FakeBackend {
    pub fn start(offer: Offer) -> FakeBackend {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-vmm-fake-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("backend.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let got = serve(&stream, &offer);
            let _ = std::fs::remove_dir_all(&dir);
            got
        });
        FakeBackend {
            path,
            thread: Some(thread),
        }
    }

    /// Every message received, once the frontend closed the connection.
    pub fn messages(mut self) -> Vec<Msg> {
        self.thread.take().unwrap().join().unwrap()
    }
}

const NEED_REPLY: u32 = 0x8;

fn serve(stream: &UnixStream, offer: &Offer) -> Vec<Msg> {
    let mut got: Vec<Msg> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let fds = match recv(stream, &mut buf) {
            Ok((0, _)) | Err(_) => return got,
            Ok((_, fds)) => fds,
        };
        // The kernel ends a read after the part that carried fds: they
        // belong to the last whole message of this read.
        let before = got.len();
        while buf.len() >= 12 {
            let word = |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
            let (code, flags, size) = (word(0), word(4), word(8) as usize);
            if buf.len() < 12 + size {
                break;
            }
            let payload = buf[12..12 + size].to_vec();
            buf.drain(..12 + size);
            let m = Msg {
                code,
                payload,
                fds: 0,
            };
            reply(stream, offer, &m, flags);
            got.push(m);
        }
        if got.len() > before
            && let Some(m) = got.last_mut()
        {
            m.fds = fds;
        }
    }
}

/// Reads what the socket holds into `buf`; returns the bytes and fds read.
fn recv(stream: &UnixStream, buf: &mut Vec<u8>) -> io::Result<(usize, usize)> {
    let mut data = vec![0u8; 65536];
    let mut cmsg = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: zeroed msghdr, filled below with pointers to live locals.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cmsg.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: recvmsg into the buffers named by `mh`.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = 0;
    // SAFETY: walking the control messages the kernel wrote into `cmsg`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<i32>();
                for i in 0..len / 4 {
                    drop(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                    fds += 1;
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    buf.extend_from_slice(&data[..n as usize]);
    Ok((n as usize, fds))
}

fn reply(stream: &UnixStream, offer: &Offer, m: &Msg, flags: u32) {
    use code::*;
    let body: Option<Vec<u8>> = match m.code {
        GET_FEATURES => Some(offer.features.to_le_bytes().to_vec()),
        GET_PROTOCOL_FEATURES => Some(offer.protocol.to_le_bytes().to_vec()),
        GET_QUEUE_NUM => Some(offer.queues.to_le_bytes().to_vec()),
        GET_VRING_BASE => {
            let mut b = m.payload[..4].to_vec();
            b.extend_from_slice(&offer.base.to_le_bytes());
            Some(b)
        }
        GET_CONFIG => {
            let mut b = m.payload[..12].to_vec();
            let size = m.u32_at(4) as usize;
            let mut cfg = offer.config.clone();
            cfg.resize(size, 0);
            b.extend_from_slice(&cfg);
            Some(b)
        }
        _ if flags & NEED_REPLY != 0 => Some(0u64.to_le_bytes().to_vec()),
        _ => None,
    };
    if let Some(body) = body {
        let mut out = Vec::with_capacity(12 + body.len());
        out.extend_from_slice(&m.code.to_le_bytes());
        // Version 1, a reply.
        out.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        use std::io::Write;
        let _ = (&*stream).write_all(&out);
    }
}
