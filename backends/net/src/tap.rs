//! The host side: a tap device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), one
//! file per queue pair (`IFF_MULTI_QUEUE` when there are several), opened by
//! name or handed in as already-open fds.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Whether an interface `name` exists in this network namespace.
fn exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Turns a failed open of tap `name` into an error that says why and what
/// to do: the kernel's EPERM is the same for "absent, and creating needs
/// CAP_NET_ADMIN" and "present, but someone else's".
pub fn explain(name: &str, queues: u16, e: io::Error, exists: bool) -> io::Error {
    let mq = if queues > 1 { " multi_queue" } else { "" };
    let create = format!("ip tuntap add dev {name} mode tap vnet_hdr{mq} user $USER");
    let msg = match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) if !exists => format!(
            "tap {name} does not exist, and creating one needs CAP_NET_ADMIN, which this process \
             lacks: create it beforehand (`{create}`, then `ip link set {name} up`), or pass an \
             open tap with --tap-fd ({e})"
        ),
        Some(libc::EPERM | libc::EACCES) => format!(
            "tap {name} exists, but this user may not attach to it: it belongs to another user or \
             group (recreate it with `{create}`), or run with CAP_NET_ADMIN ({e})"
        ),
        Some(libc::ENOENT | libc::ENODEV) => format!(
            "/dev/net/tun is missing: load the tun module (`modprobe tun`), or pass an open tap \
             with --tap-fd ({e})"
        ),
        Some(libc::EINVAL | libc::EBUSY) if exists => format!(
            "{name} exists but cannot be opened as a tap with vnet_hdr{mq} and {queues} queue(s): \
             it is not a tap, or was made with other flags, or its queues are taken; recreate it \
             with `{create}` ({e})"
        ),
        _ => return e,
    };
    io::Error::new(e.kind(), msg)
}

/// Flags every Bulkhead tap queue carries.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// One queue of a tap device, non-blocking.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    multi_queue: bool,
    /// Not a tap (see [`Tap::stand_in`]): the tap ioctls do nothing.
    stand_in: bool,
}

fn ifreq(name: &str, flags: libc::c_int) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= ifr.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    Ok(ifr)
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    check(fl)?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })
}

impl Tap {
    /// Opens (creating it when absent and allowed) tap `name` with `queues`
    /// queues; an error says what to do about it ([`explain`]).
    pub fn open_queues(name: &str, queues: u16) -> io::Result<Vec<Tap>> {
        Self::open_queues_raw(name, queues).map_err(|e| explain(name, queues, e, exists(name)))
    }

    fn open_queues_raw(name: &str, queues: u16) -> io::Result<Vec<Tap>> {
        if queues > 1 {
            return (0..queues).map(|_| Self::open(name, true)).collect();
        }
        match Self::open(name, false) {
            // An existing multi-queue tap refuses a single-queue open.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(vec![Self::open(name, true)?]),
            r => Ok(vec![r?]),
        }
    }

    /// Opens one queue of tap `name` through /dev/net/tun.
    pub fn open(name: &str, multi_queue: bool) -> io::Result<Tap> {
        let file = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let fd = OwnedFd::from(file);
        let flags = TAP_FLAGS
            | if multi_queue {
                libc::IFF_MULTI_QUEUE
            } else {
                0
            };
        let mut ifr = ifreq(name, flags)?;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) })?;
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Tap {
            fd,
            name: ifr_name(&ifr),
            multi_queue,
            stand_in: false,
        })
    }

    /// The queue's fd, to hand to another process (the launcher passes
    /// taps it opened to a daemon that may not open them itself).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Takes ownership of an inherited tap fd and checks it is a tap with a vnet header and no PI.
    pub fn from_raw_fd(raw: RawFd) -> io::Result<Tap> {
        // SAFETY: F_GETFD only checks that the fd is open.
        check(unsafe { libc::fcntl(raw, libc::F_GETFD) })?;
        // SAFETY: the fd is open and was handed to us to own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes an ifreq into `ifr`.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) })?;
        // SAFETY: TUNGETIFF filled the flags member.
        let flags = libc::c_int::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff;
        if flags & TAP_FLAGS != TAP_FLAGS || flags & libc::IFF_TUN != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fd {raw} is not a tap opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (flags {flags:#x})"
                ),
            ));
        }
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Tap {
            fd,
            name: ifr_name(&ifr),
            multi_queue: flags & libc::IFF_MULTI_QUEUE != 0,
            stand_in: false,
        })
    }

    /// Any fd standing in for a tap queue (unit tests: a pipe that fills up).
    #[cfg(test)]
    pub(crate) fn from_fd_for_test(fd: OwnedFd) -> Tap {
        Tap {
            fd,
            name: "test".into(),
            multi_queue: false,
            stand_in: false,
        }
    }

    /// A packet socket or pipe standing in for a tap queue, for tests and fuzz
    /// targets that run without root or /dev/net/tun (say one end of a
    /// `SOCK_SEQPACKET` socketpair): reads and writes go to `fd`, the tap
    /// ioctls (vnet header size, offloads, queue attach) succeed and do nothing.
    /// `fd` should be non-blocking, as a tap queue is.
    pub fn stand_in(fd: OwnedFd) -> Tap {
        Tap {
            fd,
            name: "stand-in".into(),
            multi_queue: false,
            stand_in: true,
        }
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the tap was opened with IFF_MULTI_QUEUE.
    pub fn is_multi_queue(&self) -> bool {
        self.multi_queue
    }

    /// The fd, for polling.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sets the offloads the tap may hand us (`TUN_F_*`), device-wide.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        if self.stand_in {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        check(unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        })
    }

    /// The device's send buffer (`TUNGETSNDBUF`): how many bytes of written
    /// frames the kernel holds before a write answers `EAGAIN`; `i32::MAX`
    /// (the default, and QEMU's) means never. `None` for a stand-in.
    pub fn send_buffer(&self) -> Option<i32> {
        if self.stand_in {
            return None;
        }
        let mut v: libc::c_int = 0;
        // SAFETY: TUNGETSNDBUF writes one int through the pointer.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNGETSNDBUF, &mut v) }).ok()?;
        Some(v)
    }

    /// Sets the vnet header size (10 or 12), device-wide.
    pub fn set_vnet_hdr_size(&self, size: usize) -> io::Result<()> {
        if self.stand_in {
            return Ok(());
        }
        let v = libc::c_int::try_from(size).map_err(io::Error::other)?;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &v) })
    }

    /// Attaches this queue to the device or detaches it (multi-queue taps only).
    pub fn set_queue_attached(&self, on: bool) -> io::Result<()> {
        if !self.multi_queue || self.stand_in {
            return Ok(());
        }
        let flags = if on {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut ifr = ifreq(&self.name, flags)?;
        // SAFETY: TUNSETQUEUE reads an ifreq.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETQUEUE, &mut ifr) })
    }

    /// Reads one packet (vnet header and frame) into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a buffer we own, of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Reads one packet scattered over `iovecs` (a longer packet is cut short).
    ///
    /// # Safety
    /// Every iovec must point to memory writable for its length for the whole call.
    pub unsafe fn readv(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let n = libc::c_int::try_from(iovecs.len()).map_err(io::Error::other)?;
        // SAFETY: the caller guarantees the iovecs are writable.
        let r = unsafe { libc::readv(self.fd.as_raw_fd(), iovecs.as_ptr(), n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Writes one frame (its vnet header first) from `buf`.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is readable for its length.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Writes one packet gathered from `iovecs`.
    ///
    /// # Safety
    /// Every iovec must point to memory readable for its length for the whole call.
    pub unsafe fn writev(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let n = libc::c_int::try_from(iovecs.len()).map_err(io::Error::other)?;
        // SAFETY: the caller guarantees the iovecs are readable.
        let r = unsafe { libc::writev(self.fd.as_raw_fd(), iovecs.as_ptr(), n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

fn ifr_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .map(|&c| c as u8)
        .chain(std::iter::once(0))
        .collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `TUN_F_*` offload flags for the guest's receive features.
pub fn offload_flags(csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> u32 {
    if !csum {
        // Every segmentation offload needs checksum offload.
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if tso4 {
        f |= libc::TUN_F_TSO4;
    }
    if tso6 {
        f |= libc::TUN_F_TSO6;
    }
    if ecn && (tso4 || tso6) {
        f |= libc::TUN_F_TSO_ECN;
    }
    if ufo {
        f |= libc::TUN_F_UFO;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tap_is_named_with_how_to_create_it() {
        let e = explain("tap9", 1, io::Error::from_raw_os_error(libc::EPERM), false).to_string();
        assert!(e.contains("tap tap9 does not exist"), "{e}");
        assert!(e.contains("CAP_NET_ADMIN"), "{e}");
        assert!(
            e.contains("ip tuntap add dev tap9 mode tap vnet_hdr user"),
            "{e}"
        );
        assert!(e.contains("--tap-fd"), "{e}");
        let e = explain("tap9", 2, io::Error::from_raw_os_error(libc::EPERM), true).to_string();
        assert!(e.contains("exists, but this user may not attach"), "{e}");
        assert!(e.contains("multi_queue"), "{e}");
        let e = explain("t", 1, io::Error::from_raw_os_error(libc::ENOENT), false).to_string();
        assert!(e.contains("modprobe tun"), "{e}");
        let e = explain("t", 1, io::Error::from_raw_os_error(libc::EIO), false);
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "other errors pass through"
        );
    }

    #[test]
    fn offloads_need_checksum() {
        assert_eq!(offload_flags(false, true, true, true, true), 0);
        assert_eq!(
            offload_flags(true, true, false, true, false),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN
        );
    }

    #[test]
    fn a_stand_in_carries_packets_and_ignores_the_tap_settings() {
        let mut sv = [0; 2];
        // SAFETY: socketpair writes two fds into the array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: fresh fds we own.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        let tap = Tap::stand_in(a);
        tap.set_vnet_hdr_size(12).unwrap();
        tap.set_offload(libc::TUN_F_CSUM).unwrap();
        tap.set_queue_attached(false).unwrap();
        let mut pkt = *b"0123456789ab-frame";
        let iov = [libc::iovec {
            iov_base: pkt.as_mut_ptr().cast(),
            iov_len: pkt.len(),
        }];
        // SAFETY: the iovec points at `pkt`, alive for the call.
        assert_eq!(unsafe { tap.writev(&iov) }.unwrap(), pkt.len());
        let peer = Tap::stand_in(b);
        let mut buf = [0u8; 64];
        assert_eq!(peer.read(&mut buf).unwrap(), pkt.len());
        assert_eq!(&buf[..pkt.len()], &pkt);
        assert_eq!(
            tap.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("", 0).is_err());
        assert!(ifreq("a-name-far-too-long", 0).is_err());
        assert_eq!(ifr_name(&ifreq("tap0", 0).unwrap()), "tap0");
    }
}
