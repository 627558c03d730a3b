//! Network namespaces and tap devices for tests, removed when dropped.
//!
//! A [`NetNs`] is a fresh namespace named `bhnet-<pid>-<n>`; dropping it
//! kills what still runs inside and deletes it, also when the test panics.
//! Namespaces left behind by a test process that was killed outright are
//! swept by the next [`NetNs::new`] (their creator pid is gone). Inside one,
//! [`NetNs::add_tap`] makes a persistent tap with an address, and
//! [`NetNs::enter`] runs a closure on a thread that joined the namespace, to
//! open tap fds, packet sockets or UDP sockets that then work from anywhere.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::skip::{self, SkipReason};

/// Prefix of every namespace the kit creates.
const PREFIX: &str = "bhnet-";

/// Why net tests cannot run here, or None when they can (root, `ip`, /dev/net/tun).
pub fn unavailable() -> Option<SkipReason> {
    if let Some(why) = skip::needs_root() {
        return Some(why);
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some(SkipReason::Unsupported("/dev/net/tun is missing".into()));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some(SkipReason::NotInstalled("the `ip` tool (iproute2)".into())),
    }
}

fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kills every process in namespace `name` (they were started by tests) and deletes it.
fn destroy(name: &str) {
    if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", name])) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) on a pid inside our test namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = run(Command::new("ip").args(["netns", "delete", name]));
}

/// Deletes namespaces left by test processes that no longer exist.
fn sweep_stale() {
    let Ok(list) = run(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            destroy(name);
        }
    }
}

/// Interface counters of a device, as the namespace's kernel counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames the device received (for a tap: written by the backend).
    pub rx_packets: u64,
    /// Frames dropped on receive.
    pub rx_dropped: u64,
    /// Frames the device sent (for a tap: read by the backend).
    pub tx_packets: u64,
    /// Frames dropped on transmit (for a tap: its queue was full).
    pub tx_dropped: u64,
}

/// A network namespace, deleted (with everything in it) on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a fresh namespace with loopback up.
    pub fn new() -> io::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NS ARGS` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`; same pid).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program ARGS` inside the namespace and returns its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> io::Result<String> {
        run(self.command(program).args(args))
    }

    /// Runs `f` on a thread that joined the namespace; sockets and fds it opens stay there.
    pub fn enter<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> io::Result<T> + Send,
    {
        // iproute2 keeps named namespaces in /run/netns (/var/run is a
        // link to /run on a full system, absent in the nested host).
        let ns = File::open(format!("/run/netns/{}", self.name))
            .or_else(|_| File::open(format!("/var/run/netns/{}", self.name)))?;
        std::thread::scope(|s| {
            let t = s.spawn(move || {
                // SAFETY: setns on this thread only, with an fd of a namespace file.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            });
            match t.join() {
                Ok(r) => r,
                Err(_) => Err(io::Error::other("namespace thread panicked")),
            }
        })
    }

    /// Adds a persistent tap `dev` with address `cidr` (e.g. `10.77.0.1/24`), IPv6 off, up.
    pub fn add_tap(&self, dev: &str, cidr: &str, multi_queue: bool) -> io::Result<()> {
        let mut args = vec!["tuntap", "add", "dev", dev, "mode", "tap", "vnet_hdr"];
        if multi_queue {
            args.push("multi_queue");
        }
        self.ip(&args)?;
        self.run(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")],
        )?;
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// Opens `queues` queues of tap `dev` (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, multi-queue if more than one).
    pub fn open_tap_fds(
        &self,
        dev: &str,
        queues: usize,
        multi_queue: bool,
    ) -> io::Result<Vec<OwnedFd>> {
        let dev = dev.to_string();
        self.enter(move || (0..queues).map(|_| open_tap(&dev, multi_queue)).collect())
    }

    /// Counters of device `dev`.
    pub fn link_stats(&self, dev: &str) -> io::Result<LinkStats> {
        let read = |what: &str| -> io::Result<u64> {
            let s = self.run("cat", &[&format!("/sys/class/net/{dev}/statistics/{what}")])?;
            s.trim().parse().map_err(io::Error::other)
        };
        Ok(LinkStats {
            rx_packets: read("rx_packets")?,
            rx_dropped: read("rx_dropped")?,
            tx_packets: read("tx_packets")?,
            tx_dropped: read("tx_dropped")?,
        })
    }

    /// A raw packet socket bound to `dev`; with `vnet_hdr`, frames carry a 10-byte virtio_net_hdr.
    pub fn packet_socket(&self, dev: &str, vnet_hdr: bool) -> io::Result<PacketSocket> {
        let dev = dev.to_string();
        self.enter(move || PacketSocket::open(&dev, vnet_hdr))
    }

    /// A UDP socket bound to `addr` inside the namespace.
    pub fn udp_socket(&self, addr: &str) -> io::Result<UdpSocket> {
        let addr = addr.to_string();
        self.enter(move || UdpSocket::bind(addr.as_str()))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        destroy(&self.name);
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens one queue of tap `dev` in the current namespace.
pub fn open_tap(dev: &str, multi_queue: bool) -> io::Result<OwnedFd> {
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let fd = OwnedFd::from(file);
    // SAFETY: ifreq is plain old data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        return Err(io::Error::other("interface name too long"));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes an ifreq.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) })?;
    Ok(fd)
}

/// A frame a [`PacketSocket`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    /// The 10-byte virtio_net_hdr, when the socket was opened with `vnet_hdr`.
    pub vnet_hdr: Option<[u8; 10]>,
    /// The Ethernet frame.
    pub frame: Vec<u8>,
}

/// An AF_PACKET socket on one device: sees frames arriving on it, injects frames out of it.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    vnet_hdr: bool,
}

impl PacketSocket {
    /// Opens a socket on `dev` in the current namespace.
    pub fn open(dev: &str, vnet_hdr: bool) -> io::Result<Self> {
        let name = CString::new(dev).map_err(io::Error::other)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        })?;
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if vnet_hdr {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a pointer to an int of its size.
            cvt(unsafe {
                libc::setsockopt(
                    raw,
                    libc::SOL_PACKET,
                    libc::PACKET_VNET_HDR,
                    (&one as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            })?;
        }
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: bind with a sockaddr_ll of its size.
        cvt(unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(PacketSocket {
            fd,
            ifindex,
            vnet_hdr,
        })
    }

    /// Waits up to `timeout` for a frame arriving on the device (frames it sent are skipped).
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<Captured>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 70000];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(60_000) as i32) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Ok(None);
            }
            // SAFETY: sockaddr_ll is plain old data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom into our buffer and address of their sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(e);
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let data = &buf[..n as usize];
            return Ok(Some(if self.vnet_hdr && data.len() >= 10 {
                let mut h = [0u8; 10];
                h.copy_from_slice(&data[..10]);
                Captured {
                    vnet_hdr: Some(h),
                    frame: data[10..].to_vec(),
                }
            } else {
                Captured {
                    vnet_hdr: None,
                    frame: data.to_vec(),
                }
            }));
        }
    }

    /// Sends `frame` out of the device (for a tap: toward the backend).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let mut data = Vec::with_capacity(frame.len() + 10);
        if self.vnet_hdr {
            data.extend_from_slice(&[0u8; 10]);
        }
        data.extend_from_slice(frame);
        self.send_raw(&data)
    }

    /// Sends `data` as it is: on a socket with a vnet header, its first 10
    /// bytes are that header (a GSO frame's, say).
    pub fn send_raw(&self, data: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        // SAFETY: sendto from our buffer with a sockaddr_ll of its size.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
