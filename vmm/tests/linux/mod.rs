//! Linux under `bulkhead-vmm` with `bulkhead-blk`, `bulkhead-net` and
//! `bulkhead-console` attached: the harness of the boot and live-swap tests.
//!
//! A [`Vm`] starts the three backends (net in a network namespace with a tap
//! and an iperf3 server, where namespaces can be made), boots the test kit's
//! kernel and initramfs with the test's script as `/test.sh`, and plays the
//! host: it reads the serial log (the script's `@@BULKHEAD` lines), holds
//! the console's two host sockets (hvc0 and a named port), answers the
//! VMM's control socket, and can kill, restart or swap backends while the
//! guest runs. The guest waits for the host through a mailbox sector on its
//! disk ([`Vm::tell_guest`], the script's `await_host`).
//!
//! These tests need a KVM that runs Linux: each first calls
//! `nested::delegate`, which runs it inside the nested host where the
//! machine's own KVM cannot (tests/src/nested.rs).
//!
//! Every boot has a hard timeout; every process is killed by pid when its
//! guard drops, also on panic; the namespace is deleted on drop.
#![allow(dead_code)]

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::guest::{self, GuestImage, GuestRun};
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::{ChildGuard, workspace_binary};
use bulkhead_tests::skip::skip;

/// Hard limit for one boot, before `BULKHEAD_TIMEOUT_SCALE`.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the guest may go on after a backend exited by itself.
const BACKEND_EXIT_GRACE: Duration = Duration::from_secs(3);
/// Size of the disk image (`/dev/vda`).
pub const DISK_SIZE: u64 = 64 << 20;
/// Where the host leaves words for the guest (the last MiB of the disk).
pub const MAILBOX_OFFSET: u64 = DISK_SIZE - (1 << 20);
/// The tap's name and address in the namespace.
pub const TAP: &str = "bhtap0";
pub const TAP_ADDR: &str = "10.77.0.1";
/// The guest's address and the MAC `bulkhead-net` offers.
pub const GUEST_ADDR: &str = "10.77.0.2";
pub const GUEST_MAC: &str = "52:54:00:b4:1c:01";
/// The console's named port.
pub const PORT_NAME: &str = "org.bulkhead.test";
/// The disk's serial number (`bulkhead-blk --serial`).
pub const DISK_SERIAL: &str = "bulkhead-disk0";

/// How a test's VM is built.
#[derive(Clone)]
pub struct Options {
    /// `pci` or `mmio`, for every device.
    pub transport: &'static str,
    /// vCPUs.
    pub cpus: u32,
    /// `bulkhead-blk --num-queues`.
    pub blk_queues: u16,
    /// Added to the kernel command line.
    pub cmdline: &'static str,
    /// Make the tap multi-queue, so a second bulkhead-net can attach to it
    /// beside the first (a swap).
    pub multi_queue_tap: bool,
    /// `packed=on` on every device: the guest's drivers take packed rings.
    pub packed: bool,
    /// Serve the disk from this RBD image (`POOL/IMAGE`, its Ceph
    /// configuration file) instead of a fresh local image.
    pub rbd: Option<(String, PathBuf)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            transport: "pci",
            cpus: 1,
            blk_queues: 1,
            cmdline: "",
            multi_queue_tap: false,
            packed: false,
            rbd: None,
        }
    }
}

/// Where a daemon's stderr goes: `daemon.log` in its scratch directory
/// (appended to, so a restarted daemon's lines follow the dead one's).
fn log_to(cmd: &mut Command, scratch: &Scratch) {
    let log = File::options()
        .create(true)
        .append(true)
        .open(scratch.dir().join("daemon.log"))
        .expect("daemon log");
    cmd.stderr(log);
}

/// `bulkhead-blk` on `image` with `queues` queues, for `scratch`'s socket.
fn blk_command(scratch: &Scratch, image: &Path, queues: u16) -> Command {
    let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--image")
        .arg(image)
        .args(["--num-queues", &queues.to_string(), "--serial", DISK_SERIAL]);
    log_to(&mut cmd, scratch);
    cmd
}

/// `bulkhead-console` with a named port, for `scratch`'s socket.
fn console_command(scratch: &Scratch) -> Command {
    let mut cmd = Command::new(workspace_binary("bulkhead-console"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--port")
        .arg(format!("name={PORT_NAME}"));
    log_to(&mut cmd, scratch);
    cmd
}

/// `bulkhead-net` on [`TAP`] inside `ns`, for `scratch`'s socket. `ip netns
/// exec` execs the daemon, so the guard's pid is the daemon's.
fn net_command(ns: &NetNs, scratch: &Scratch) -> Command {
    let mut cmd = ns.command(workspace_binary("bulkhead-net"));
    // The receive queue's stalls, with the ring's state, in the log a
    // failure report shows.
    cmd.env("RUST_LOG", "info,bulkhead_net::rx=debug");
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .args(["--tap", TAP, "--mac", GUEST_MAC]);
    log_to(&mut cmd, scratch);
    cmd
}

/// Starts `bulkhead-blk` on `image` in a fresh scratch directory.
fn start_blk(image: Option<&Path>, queues: u16) -> Daemon {
    let scratch = Scratch::new(if image.is_some() { 0 } else { DISK_SIZE }).expect("scratch");
    let image = image.map_or_else(|| scratch.image().to_path_buf(), Path::to_path_buf);
    let cmd = blk_command(&scratch, &image, queues);
    Daemon::start("bulkhead-blk", cmd, scratch)
        .expect("start bulkhead-blk (cargo build -p bulkhead-blk)")
}

/// The tail of a daemon's `daemon.log`.
pub fn daemon_log(d: &Daemon) -> String {
    std::fs::read_to_string(d.scratch().dir().join("daemon.log")).unwrap_or_default()
}

/// The three backends of one VM, and the namespace of the net one.
pub struct Backends {
    pub blk: Daemon,
    blk_image: PathBuf,
    blk_queues: u16,
    pub console: Daemon,
    /// Dropped before the namespace it runs in.
    pub net: Option<Daemon>,
    /// iperf3's server on the tap's address, inside the namespace.
    iperf3: Option<ChildGuard>,
    /// Held until drop, which kills what runs inside and deletes it.
    ns: Option<NetNs>,
    /// Directories of backends swapped out (the first holds the image).
    retired: Vec<Scratch>,
}

impl Backends {
    /// Starts `bulkhead-blk` on a fresh image, `bulkhead-console` with a
    /// named port and, where namespaces can be made, `bulkhead-net` on a tap
    /// in a new namespace (else the VM runs without a net device, after a
    /// skip line; under CI that fails).
    pub fn start(opts: &Options) -> Backends {
        let blk = match &opts.rbd {
            None => start_blk(None, opts.blk_queues),
            Some((image, conf)) => {
                let scratch = Scratch::new(0).expect("scratch");
                let mut cmd = blk_command(
                    &scratch,
                    Path::new(&format!("rbd:{image}")),
                    opts.blk_queues,
                );
                cmd.arg("--ceph-conf").arg(conf);
                Daemon::start("bulkhead-blk", cmd, scratch)
                    .expect("start bulkhead-blk on the RBD image")
            }
        };
        let scratch = Scratch::new(0).expect("scratch");
        let cmd = console_command(&scratch);
        let console = Daemon::start("bulkhead-console", cmd, scratch)
            .expect("start bulkhead-console (cargo build -p bulkhead-console)");
        let (net, iperf3, ns) = match netns::unavailable() {
            None => {
                let (net, iperf3, ns) = Self::start_net(opts.multi_queue_tap);
                (Some(net), Some(iperf3), Some(ns))
            }
            Some(why) => {
                // libtest names the test's thread after the test.
                let test = std::thread::current().name().unwrap_or("?").to_string();
                skip(&format!("{test} (net device; blk and console run)"), why);
                (None, None, None)
            }
        };
        Backends {
            blk_image: blk.scratch().image().to_path_buf(),
            blk,
            blk_queues: opts.blk_queues,
            console,
            net,
            iperf3,
            ns,
            retired: Vec::new(),
        }
    }

    /// A namespace with tap [`TAP`] at [`TAP_ADDR`], `bulkhead-net` and an
    /// iperf3 server inside it.
    fn start_net(multi_queue: bool) -> (Daemon, ChildGuard, NetNs) {
        let ns = NetNs::new().expect("create a network namespace");
        ns.add_tap(TAP, &format!("{TAP_ADDR}/24"), multi_queue)
            .expect("add a tap");
        let scratch = Scratch::new(0).expect("scratch");
        let cmd = net_command(&ns, &scratch);
        let net = Daemon::start("bulkhead-net", cmd, scratch)
            .expect("start bulkhead-net (cargo build -p bulkhead-net)");
        let mut cmd = ns.command("iperf3");
        cmd.args(["-s", "-B", TAP_ADDR]);
        let iperf3 = guest::spawn_daemon("iperf3 -s", &mut cmd, Path::new("/dev/null"))
            .expect("start iperf3 (run .ci/install-deps)");
        (net, iperf3, ns)
    }

    /// Host socket of console port `name` (`hvc0` is port 0, `console`).
    pub fn console_port(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}.{name}", self.console.socket().display()))
    }

    /// The first backend that exited, and how.
    pub fn exited(&mut self) -> Option<String> {
        let mut all: Vec<&mut Daemon> = vec![&mut self.blk, &mut self.console];
        all.extend(self.net.as_mut());
        all.into_iter().find_map(|d| {
            let st = d.guard_mut().try_wait().ok().flatten()?;
            let hint = if st.signal() == Some(libc::SIGSYS) {
                " (SIGSYS: a seccomp filter; rerun the daemon with --sandbox log)"
            } else {
                ""
            };
            let name = d.guard_mut().name().to_string();
            Some(format!(
                "{name} exited: {st}{hint}\n{}",
                guest::tail(&daemon_log(d), 20)
            ))
        })
    }

    /// A second `bulkhead-blk` on the same image, on a socket of its own
    /// (the target of a swap).
    /// It starts beside the first: each holds the writer part of the image
    /// lock only while its device runs, and a swap stops the first's queues
    /// before it starts this one's.
    pub fn second_blk(&self) -> Daemon {
        let scratch = Scratch::new(0).expect("scratch");
        let cmd = blk_command(&scratch, &self.image(), self.blk_queues);
        Daemon::start("bulkhead-blk", cmd, scratch).expect("start the second bulkhead-blk")
    }

    /// The disk image every blk backend of this VM serves.
    pub fn image(&self) -> PathBuf {
        self.blk_image.clone()
    }

    /// SIGKILLs `bulkhead-blk` and starts a new one on the same socket and
    /// image; returns the new pid.
    pub fn restart_blk(&mut self) -> u32 {
        let cmd = blk_command(self.blk.scratch(), &self.blk_image, self.blk_queues);
        self.blk
            .restart("bulkhead-blk", cmd)
            .expect("restart bulkhead-blk");
        self.blk.pid()
    }

    /// Makes `new` the blk backend (after a swap to it) and stops the old
    /// one, keeping its directory: the image lies there.
    pub fn replace_blk(&mut self, new: Daemon) {
        let old = std::mem::replace(&mut self.blk, new);
        self.retired
            .push(old.kill_keep_scratch().expect("stop the old bulkhead-blk"));
    }

    /// The net backend's namespace; panics without one.
    pub fn ns(&self) -> &NetNs {
        self.ns.as_ref().expect("a network namespace")
    }

    /// A second `bulkhead-net` on the same (multi-queue) tap, on a socket
    /// of its own (the target of a swap).
    pub fn second_net(&self) -> Daemon {
        let ns = self.ns.as_ref().expect("a namespace with a tap");
        let scratch = Scratch::new(0).expect("scratch");
        let cmd = net_command(ns, &scratch);
        Daemon::start("bulkhead-net", cmd, scratch).expect("start a second bulkhead-net")
    }

    /// Makes `new` the net backend (after a swap to it) and stops the old one.
    pub fn replace_net(&mut self, new: Daemon) {
        self.net = Some(new);
    }

    /// A second `bulkhead-console` with the same ports, on sockets of its
    /// own (the target of a swap).
    pub fn second_console(&self) -> Daemon {
        let scratch = Scratch::new(0).expect("scratch");
        let cmd = console_command(&scratch);
        Daemon::start("bulkhead-console", cmd, scratch).expect("start a second bulkhead-console")
    }

    /// Makes `new` the console backend (after a swap to it) and stops the
    /// old one.
    pub fn replace_console(&mut self, new: Daemon) {
        self.console = new;
    }

    /// SIGKILLs `bulkhead-net` and starts a new one on the same socket and
    /// tap; returns the new pid.
    pub fn restart_net(&mut self) -> u32 {
        let (Some(net), Some(ns)) = (self.net.as_mut(), self.ns.as_ref()) else {
            panic!("no net backend to restart");
        };
        let cmd = net_command(ns, net.scratch());
        net.restart("bulkhead-net", cmd)
            .expect("restart bulkhead-net");
        net.pid()
    }

    /// SIGKILLs `bulkhead-console` and starts a new one on the same sockets;
    /// returns the new pid.
    pub fn restart_console(&mut self) -> u32 {
        let cmd = console_command(self.console.scratch());
        self.console
            .restart("bulkhead-console", cmd)
            .expect("restart bulkhead-console");
        self.console.pid()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        // Processes inside the namespace first, then the namespace.
        self.net = None;
        self.iperf3 = None;
        self.ns = None;
    }
}

/// The host end of one console port socket: connects once the daemon
/// accepts (again after a restart), and collects what the guest writes.
pub struct PortClient {
    path: PathBuf,
    stream: Option<UnixStream>,
    got: Vec<u8>,
    /// How many times it connected.
    pub connections: usize,
}

impl PortClient {
    /// A client of the port socket at `path` (it connects on the first poll).
    pub fn new(path: PathBuf) -> Self {
        PortClient {
            path,
            stream: None,
            got: Vec::new(),
            connections: 0,
        }
    }

    /// Connects if not yet connected, then reads whatever is there.
    pub fn poll(&mut self) {
        if self.stream.is_none() {
            let Ok(s) = UnixStream::connect(&self.path) else {
                return;
            };
            if s.set_nonblocking(true).is_err() {
                return;
            }
            self.stream = Some(s);
            self.connections += 1;
        }
        let Some(s) = self.stream.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    // Replaced by another client or the daemon is gone.
                    self.stream = None;
                    return;
                }
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.stream = None;
                    return;
                }
            }
        }
    }

    /// Sends `text` to the guest (blocking until the socket took it all).
    pub fn send(&mut self, text: &str) -> std::io::Result<()> {
        let s = self
            .stream
            .as_mut()
            .ok_or_else(|| std::io::Error::other("not connected"))?;
        s.set_nonblocking(false)?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        let r = s.write_all(text.as_bytes());
        s.set_nonblocking(true)?;
        r
    }

    /// Everything read so far, carriage returns dropped.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.got).replace('\r', "")
    }

    /// Whether the guest wrote `what`.
    pub fn contains(&self, what: &str) -> bool {
        self.text().contains(what)
    }

    /// Forgets the connection (the next poll connects anew).
    pub fn reconnect(&mut self) {
        self.stream = None;
    }
}

/// Sends one command line to a console port's control socket
/// (`PATH.ctl`) and returns the reply line.
pub fn console_ctl(port: &Path, command: &str) -> std::io::Result<String> {
    let mut ctl = PathBuf::from(port).into_os_string();
    ctl.push(".ctl");
    let mut s = UnixStream::connect(ctl)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut b = [0u8; 256];
    while !reply.ends_with(b"\n") {
        let n = s.read(&mut b)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&b[..n]);
    }
    Ok(String::from_utf8_lossy(&reply).trim().to_string())
}

/// The shell helpers every guest script starts with (after
/// `tests/guest/bulkhead.sh`'s).
pub fn prelude() -> String {
    format!(
        r#"
# phase NAME: tells the host the guest reached NAME.
phase() {{ echo "@@BULKHEAD VALUE phase $1"; }}
# await_host WORD: waits (up to 120 s) until the host wrote WORD into the
# mailbox sector of /dev/vda, read past the guest's cache.
await_host() {{
  _i=0
  while [ $_i -lt 600 ]; do
    _w=$(dd if=/dev/vda bs=4096 skip={mailbox_block} count=1 iflag=direct 2>/dev/null | head -c ${{#1}})
    [ "$_w" = "$1" ] && return 0
    sleep 0.2
    _i=$((_i + 1))
  done
  echo "the host never wrote $1"
  return 1
}}
"#,
        mailbox_block = MAILBOX_OFFSET / 4096
    )
}

/// A work directory for one VM (initrd, serial log, VMM log, API socket),
/// removed on drop.
fn work_dir() -> Scratch {
    Scratch::new(0).expect("work dir")
}

/// The test initrd: the kit's base initramfs with `script` as `/test.sh`.
pub fn initrd(image: &GuestImage, dir: &Path, script: &str) -> PathBuf {
    let path = dir.join("initrd.cpio");
    std::fs::copy(&image.initrd, &path).expect("copy initrd");
    let extra = guest::newc_archive(&[("test.sh", script.as_bytes(), 0o755)]);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open initrd");
    f.write_all(&extra).expect("append to initrd");
    path
}

/// The `bulkhead-vmm` command line for `backends` per `opts`.
pub fn vmm_command(
    image: &GuestImage,
    initrd: &Path,
    backends: &Backends,
    opts: &Options,
    dir: &Path,
) -> Command {
    let mut cmd = Command::new(workspace_binary("bulkhead-vmm"));
    let transport = opts.transport;
    let packed = if opts.packed { ",packed=on" } else { "" };
    let dev = |d: &Daemon| {
        format!(
            "socket={},transport={transport}{packed}",
            d.socket().display()
        )
    };
    cmd.env("RUST_LOG", "info")
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--memory", "512M", "--cpus", &opts.cpus.to_string()])
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 quiet {}",
            opts.cmdline
        ))
        .arg("--blk")
        .arg(dev(&backends.blk))
        .arg("--console")
        .arg(dev(&backends.console));
    if let Some(net) = &backends.net {
        cmd.arg("--net").arg(dev(net));
    }
    cmd.arg("--serial")
        .arg(format!("file={}", dir.join("serial.log").display()))
        .arg("--api-socket")
        .arg(dir.join("api.sock"));
    cmd
}

/// Runs `bulkhead-vmm ctl --api-socket API ARGS` and parses its JSON reply.
pub fn ctl(api: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(workspace_binary("bulkhead-vmm"))
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run bulkhead-vmm ctl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).map_err(|e| {
        format!(
            "ctl {args:?}: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A running VM and its host side.
pub struct Vm {
    pub backends: Backends,
    pub opts: Options,
    work: Scratch,
    vmm: ChildGuard,
    serial: PathBuf,
    log: PathBuf,
    pub api: PathBuf,
    /// Port 0 (the guest's hvc0) and the named port.
    pub hvc0: PortClient,
    pub named: PortClient,
    started: Instant,
    deadline: Instant,
    vmm_status: Option<ExitStatus>,
    backend_exit: Option<String>,
    grace_until: Option<Instant>,
    /// Whether the guest reported its result (`@@BULKHEAD EXIT`).
    finished: bool,
}

impl Vm {
    /// Starts the backends and boots the kit's guest with the script
    /// `script` writes for them (after [`prelude`]) as its test.
    pub fn boot(opts: Options, script: impl FnOnce(&Backends) -> String) -> Vm {
        let image = guest::image();
        let backends = Backends::start(&opts);
        let work = work_dir();
        let script = format!("{}{}", prelude(), script(&backends));
        let initrd = initrd(image, work.dir(), &script);
        let serial = work.dir().join("serial.log");
        let log = work.dir().join("vmm.log");
        let api = work.dir().join("api.sock");
        let mut cmd = vmm_command(image, &initrd, &backends, &opts, work.dir());
        let hvc0 = PortClient::new(backends.console_port("console"));
        let named = PortClient::new(backends.console_port(PORT_NAME));
        let started = Instant::now();
        let vmm = guest::spawn_daemon("bulkhead-vmm", &mut cmd, &log).expect("start bulkhead-vmm");
        Vm {
            backends,
            opts,
            work,
            vmm,
            serial,
            log,
            api,
            hvc0,
            named,
            started,
            deadline: started + BOOT_TIMEOUT.mul_f64(guest::timeout_scale()),
            vmm_status: None,
            backend_exit: None,
            grace_until: None,
            finished: false,
        }
    }

    /// The serial log so far, carriage returns dropped.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).replace('\r', "")
    }

    /// Whether the guest reported phase `name` (the script's `phase NAME`).
    pub fn reached(&self, name: &str) -> bool {
        self.serial().lines().any(|l| {
            l.trim_end()
                .ends_with(&format!("@@BULKHEAD VALUE phase {name}"))
        })
    }

    /// One round of the host side: reads the console ports and notes a VMM
    /// or backend exit and the guest's result. False once the run is over
    /// (the VMM exited, the guest reported, the time is up, or a backend
    /// exited and its grace passed).
    pub fn poll(&mut self) -> bool {
        self.hvc0.poll();
        self.named.poll();
        if self.vmm_status.is_none()
            && let Ok(Some(st)) = self.vmm.try_wait()
        {
            self.vmm_status = Some(st);
        }
        if self.vmm_status.is_some() {
            return false;
        }
        if !self.finished && self.serial().contains("@@BULKHEAD EXIT") {
            self.finished = true;
        }
        if self.finished || Instant::now() >= self.deadline {
            return false;
        }
        if self.backend_exit.is_none() {
            self.backend_exit = self.backends.exited();
            if self.backend_exit.is_some() {
                self.grace_until = Some(Instant::now() + BACKEND_EXIT_GRACE);
            }
        }
        self.grace_until.is_none_or(|g| Instant::now() < g)
    }

    /// Polls until `done(self)` holds (true) or the run is over (false).
    pub fn wait_until(&mut self, mut done: impl FnMut(&mut Vm) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if !self.poll() {
                return done(self);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Points the console's host clients at the current console backend's
    /// sockets (after a swap to another one).
    pub fn follow_console(&mut self) {
        self.hvc0 = PortClient::new(self.backends.console_port("console"));
        self.named = PortClient::new(self.backends.console_port(PORT_NAME));
    }

    /// Plays the host side for `time` (or until the run is over).
    pub fn pause(&mut self, time: Duration) {
        let until = Instant::now() + time;
        self.wait_until(|_| Instant::now() >= until);
    }

    /// Polls until the guest reached phase `name`; panics with the serial
    /// log if it never does.
    pub fn await_phase(&mut self, name: &str) {
        if !self.wait_until(|vm| vm.reached(name)) {
            panic!(
                "the guest never reached phase {name} ({:.1?} in):\n{}\n--- bulkhead-vmm:\n{}",
                self.started.elapsed(),
                guest::tail(&self.serial(), 60),
                guest::tail(&self.vmm_log(), 20)
            );
        }
    }

    /// Leaves `word` in the guest's mailbox sector (its `await_host WORD`
    /// returns), writing the image file under the backend.
    pub fn tell_guest(&self, word: &str) {
        use std::os::unix::fs::FileExt;
        let f = File::options()
            .write(true)
            .open(self.backends.image())
            .expect("open the disk image");
        f.write_all_at(word.as_bytes(), MAILBOX_OFFSET)
            .and_then(|()| f.sync_all())
            .expect("write the mailbox");
    }

    /// `bulkhead-vmm ctl` on this VM's control socket.
    pub fn ctl(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        ctl(&self.api, args)
    }

    /// The VMM's own log so far.
    pub fn vmm_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the run to end (the guest's result, the VMM's exit, a
    /// dead backend or the timeout), stops the VMM, and collects the results.
    pub fn finish(mut self) -> Boot {
        while self.poll() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.finished && self.vmm_status.is_none() {
            // The result is in; give the VMM a moment to see the power-off.
            if let Ok(Some(st)) = self.vmm.wait_timeout(Duration::from_secs(10)) {
                self.vmm_status = Some(st);
            }
        }
        let timed_out = !self.finished && self.vmm_status.is_none() && self.backend_exit.is_none();
        // Where a stuck guest's vCPUs are: in KVM or in our own code.
        let vcpu_threads = if timed_out {
            bulkhead_tests::vcpus::report(self.vmm.pid(), Duration::from_secs(1))
        } else {
            String::new()
        };
        let _ = self.vmm.kill();
        // Output the guest wrote just before powering off may still be in flight.
        let settle = Instant::now() + Duration::from_secs(1);
        while Instant::now() < settle {
            self.hvc0.poll();
            self.named.poll();
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = self.serial();
        if std::env::var_os("BULKHEAD_SHOW_SERIAL").is_some() {
            eprintln!("--- serial console:\n{text}--- end of serial console");
        }
        let mut run = GuestRun::parse(&text);
        run.timed_out = timed_out;
        run.vcpu_threads = vcpu_threads;
        run.backend_exit = self.backend_exit.take();
        run.qemu_status = self.vmm_status.map(|s| s.to_string());
        run.qemu_output = self.vmm_log();
        run.elapsed = self.started.elapsed();
        Boot {
            run,
            vmm_status: self.vmm_status,
            hvc0: self.hvc0.text(),
            named_port: self.named.text(),
            net: self.backends.net.is_some(),
            backends: self.backends,
            _work: self.work,
        }
    }
}

/// What one boot produced: the guest's report and what the host saw. The
/// backends are still running (their logs and image readable) until dropped.
pub struct Boot {
    pub run: GuestRun,
    pub vmm_status: Option<ExitStatus>,
    pub hvc0: String,
    pub named_port: String,
    pub net: bool,
    pub backends: Backends,
    _work: Scratch,
}

impl Boot {
    /// Panics with everything known unless the guest's checks passed, the
    /// VMM exited 0 (the guest powered off) and `problems` is empty.
    pub fn assert_passed(&self, what: &str, mut problems: Vec<String>) {
        if !self.run.passed() {
            problems.insert(0, "the guest's checks did not all pass".to_string());
        }
        if self.vmm_status.and_then(|s| s.code()) != Some(0) {
            problems.push(format!(
                "bulkhead-vmm should exit 0 after the guest's power-off, not {}",
                self.vmm_status
                    .map_or("killed".to_string(), |s| s.to_string())
            ));
        }
        if !problems.is_empty() {
            panic!(
                "{what}:\n  {}\n{}--- hvc0 as the host read it:\n{}\n\
                 --- {PORT_NAME} as the host read it:\n{}\n--- bulkhead-blk:\n{}\n\
                 --- bulkhead-console:\n{}\n--- bulkhead-net:\n{}",
                problems.join("\n  "),
                self.run.report(),
                guest::tail(&self.hvc0, 40),
                guest::tail(&self.named_port, 10),
                guest::tail(&daemon_log(&self.backends.blk), 20),
                guest::tail(&daemon_log(&self.backends.console), 20),
                self.backends
                    .net
                    .as_ref()
                    .map_or("(none)".to_string(), |n| guest::tail(&daemon_log(n), 20)),
            );
        }
    }

    /// Chains the blk backend served per queue, from its exit log lines
    /// (`queue N: C chains`), summed over every connection it had.
    pub fn blk_chains_per_queue(&self) -> Vec<u64> {
        let mut per = Vec::new();
        for line in daemon_log(&self.backends.blk).lines() {
            let Some(rest) = line.split(" INFO queue ").nth(1) else {
                continue;
            };
            let Some((q, rest)) = rest.split_once(": ") else {
                continue;
            };
            let (Ok(q), Some(Ok(n))) = (
                q.parse::<usize>(),
                rest.split_whitespace().next().map(str::parse::<u64>),
            ) else {
                continue;
            };
            if per.len() <= q {
                per.resize(q + 1, 0);
            }
            per[q] += n;
        }
        per
    }
}
