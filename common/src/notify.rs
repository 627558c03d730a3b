//! Config-change notifications on the backend-request channel.
//!
//! The `vhost` crate's `Backend` (0.18) cannot send
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`: its `handle_config_change` is the
//! trait default that returns ENOSYS without writing anything, and it does not
//! expose its socket. So the serve loop takes its own duplicate of the socket
//! the frontend passes with SET_BACKEND_REQ_FD: it peeks at each message
//! header before `vhost` reads it, and when the message is SET_BACKEND_REQ_FD
//! it peeks again with room for the attached fd, which makes the kernel
//! install a duplicate of it (MSG_PEEK on a unix socket copies SCM_RIGHTS
//! fds). `vhost` then consumes the message as usual. The device receives the
//! duplicate as a [`ConfigNotifier`]. Only a device that offers
//! BACKEND_REQ, on a connection that acked it, peeks.
//!
//! Notifications are sent without NEED_REPLY, so a frontend that never reads
//! the channel cannot stall the device: a send that would block is dropped
//! and counted.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// vhost-user request code of SET_BACKEND_REQ_FD.
const SET_BACKEND_REQ_FD: u32 = 21;
/// Backend request code of CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 1;

/// Sends config-change notifications to the frontend.
pub struct ConfigNotifier {
    sock: UnixStream,
    broken: AtomicBool,
    /// Notifications sent.
    pub sent: AtomicU64,
    /// Notifications dropped (channel full or broken).
    pub dropped: AtomicU64,
}

impl ConfigNotifier {
    /// A notifier writing to `sock`, the frontend's backend-request channel.
    pub fn new(sock: UnixStream) -> Self {
        ConfigNotifier {
            sock,
            broken: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Tells the frontend the config space changed (never blocks).
    pub fn config_changed(&self) -> io::Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "backend channel broken",
            ));
        }
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // SAFETY: send on a socket we own, from a buffer of the given length.
        let n = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n == msg.len() as isize {
            self.sent.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        let e = if n < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::new(io::ErrorKind::WriteZero, "partial message")
        };
        if n >= 0 || e.kind() != io::ErrorKind::WouldBlock {
            // A partial header or a dead peer: the stream is no longer usable.
            self.broken.store(true, Ordering::Relaxed);
        }
        Err(e)
    }
}

/// If the next message on `conn` is SET_BACKEND_REQ_FD with exactly one fd,
/// returns a duplicate of that fd, leaving the message unread.
pub fn peek_backend_req_fd(conn: RawFd) -> Option<UnixStream> {
    let mut hdr = [0u8; 12];
    // SAFETY: peeking into a local buffer of the given length; no control
    // buffer, so no fds are installed.
    let n = unsafe {
        libc::recv(
            conn,
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != hdr.len() as isize {
        return None;
    }
    let code = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if code != SET_BACKEND_REQ_FD {
        return None;
    }
    // The duplicate arrives close-on-exec (no fcntl, which the blk and net
    // sandboxes once refused with SIGSYS).
    let (_, mut fds) = recv_with_fds(conn, &mut hdr, libc::MSG_PEEK | libc::MSG_DONTWAIT)?;
    if fds.len() != 1 {
        return None;
    }
    let fd = fds.pop()?;
    Some(UnixStream::from(fd))
}

/// Receives into `buf` with `flags` (plus `MSG_CMSG_CLOEXEC`), taking up to
/// a few fds from the control data (extra ones arrive and are closed, not
/// truncated); None when nothing came.
pub(crate) fn recv_with_fds(
    conn: RawFd,
    buf: &mut [u8],
    flags: libc::c_int,
) -> Option<(usize, Vec<OwnedFd>)> {
    const MAX_FDS: usize = 4;
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut cbuf = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; we fill in the pointers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live local buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(conn, &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return None;
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Some((n as usize, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    #[test]
    fn peeks_the_backend_channel_and_leaves_the_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let (chan_backend, mut chan_frontend) = UnixStream::pair().unwrap();
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&SET_BACKEND_REQ_FD.to_le_bytes());
        msg[4..8].copy_from_slice(&1u32.to_le_bytes());
        a.send_with_fd(&msg[..], chan_backend.as_raw_fd()).unwrap();
        drop(chan_backend);
        let dup = peek_backend_req_fd(b.as_raw_fd()).expect("fd");
        // The message is still there for the real reader.
        let mut again = [0u8; 12];
        let (n, file) = b.recv_with_fd(&mut again).unwrap();
        assert_eq!((n, again), (12, msg));
        assert!(file.is_some());
        let notifier = ConfigNotifier::new(dup);
        notifier.config_changed().unwrap();
        let mut got = [0u8; 12];
        chan_frontend.read_exact(&mut got).unwrap();
        assert_eq!(u32::from_le_bytes(got[0..4].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(got[8..12].try_into().unwrap()), 0);
    }

    #[test]
    fn ignores_other_messages() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&1u32.to_le_bytes());
        std::io::Write::write_all(&mut &a, &msg).unwrap();
        assert!(peek_backend_req_fd(b.as_raw_fd()).is_none());
    }
}
