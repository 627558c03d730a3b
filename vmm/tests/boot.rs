//! End to end: Debian's kernel with the test kit's initramfs booted by the
//! `bulkhead-vmm` binary, with `bulkhead-blk`, `bulkhead-net` and
//! `bulkhead-console` attached, over virtio-pci and (second test) over
//! virtio-mmio, and the guest's checks pass:
//!
//! - blk: `/dev/vda` has the image's size; a random pattern written with
//!   O_DIRECT reads back the same; a marker block lands in the host image;
//! - net: the guest brings up `eth0` (MAC from the backend's config space),
//!   gives it an address and pings the tap's address in a network namespace
//!   the test creates and always deletes (the daemon runs inside it);
//! - console: the guest writes to `/dev/hvc0` and the host reads it from the
//!   console socket; the guest runs `sh </dev/hvc0 >/dev/hvc0`, the host
//!   types `echo MARKER-$((6*7))` into the socket and reads `MARKER-42` back;
//!   the named port `org.bulkhead.test` shows up in
//!   `/sys/class/virtio-ports/*/name` and as `/dev/virtio-ports/NAME` (the
//!   guest makes the udev-style link when nothing did), and what the guest
//!   writes there reaches the port's host socket.
//!
//! A probe first checks that KVM here can run a 64-bit guest; where it cannot
//! (a nested software hypervisor hangs Linux in its decompressor) each boot
//! test prints `SKIPPED: <reason>` and passes. `BULKHEAD_BOOT_IGNORE_PROBE=1`
//! runs them anyway (to debug a probe that is wrong). Without root (network
//! namespaces) the guest runs without the net device and says so.
//!
//! A third test runs everywhere: the same daemons and the same `bulkhead-vmm`
//! command line over both transports, stopped through the control socket
//! once `list` shows every backend connected (a dry run up to the guest).
//!
//! Every boot has a hard timeout; every process is killed by pid when its
//! guard drops, also on panic; the namespace is deleted on drop.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::guest::{self, GuestImage, GuestRun};
use bulkhead_tests::nested;
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::{ChildGuard, workspace_binary};

/// Hard limit for one boot, before `BULKHEAD_TIMEOUT_SCALE`.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the dry run waits for every backend to be connected.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the guest may go on after a backend exited.
const BACKEND_EXIT_GRACE: Duration = Duration::from_secs(3);
/// Size of the disk image (`/dev/vda`).
const DISK_SIZE: u64 = 64 << 20;
/// Where the guest writes [`DISK_MARKER`], in bytes.
const DISK_MARKER_OFFSET: u64 = 1 << 20;
/// The line the guest writes at [`DISK_MARKER_OFFSET`]; the host reads it back.
const DISK_MARKER: &str = "BULKHEAD-BOOT-TEST-BLOCK\n";
/// The tap's name and address in the namespace.
const TAP: &str = "bhtap0";
const TAP_ADDR: &str = "10.77.0.1";
/// The guest's address and the MAC `bulkhead-net` offers.
const GUEST_ADDR: &str = "10.77.0.2";
const GUEST_MAC: &str = "52:54:00:b4:1c:01";
/// The console's named port.
const PORT_NAME: &str = "org.bulkhead.test";
/// What the guest writes to `/dev/hvc0` before starting the shell.
const HVC0_HELLO: &str = "HVC0-HELLO-FROM-GUEST";
/// What the guest's hvc0 shell prints once it holds the port.
const SHELL_READY: &str = "HVC0-SHELL-READY";
/// The line the host types into the console; `MARKER-42` proves the shell ran it.
const TYPED: &str = "echo MARKER-$((6*7)); echo ok >/root/hvc0-typed\n";
const TYPED_OUTPUT: &str = "MARKER-42";
/// What the guest writes to the named port.
const PORT_HELLO: &str = "NAMED-PORT-HELLO";

/// The three backends of one VM, and the namespace of the net one.
struct Backends {
    blk: Daemon,
    console: Daemon,
    /// Dropped before the namespace it runs in.
    net: Option<Daemon>,
    /// Held until drop, which kills what runs inside and deletes it.
    _ns: Option<NetNs>,
}

impl Backends {
    /// Starts `bulkhead-blk` on a fresh image, `bulkhead-console` with a named
    /// port and, where namespaces can be made, `bulkhead-net` on a tap in a
    /// new namespace.
    fn start() -> Backends {
        let blk = Daemon::blk(Scratch::new(DISK_SIZE).expect("scratch"), &[])
            .expect("start bulkhead-blk (cargo build -p bulkhead-blk)");
        let scratch = Scratch::new(0).expect("scratch");
        let mut cmd = Command::new(workspace_binary("bulkhead-console"));
        cmd.arg("--socket-path")
            .arg(scratch.socket())
            .arg("--port")
            .arg(format!("name={PORT_NAME}"));
        let console = Daemon::start("bulkhead-console", cmd, scratch)
            .expect("start bulkhead-console (cargo build -p bulkhead-console)");
        let (net, ns) = match start_net() {
            Ok((net, ns)) => (Some(net), Some(ns)),
            Err(why) => {
                let _ = std::io::Write::write_fmt(
                    &mut std::io::stderr(),
                    format_args!(
                        "SKIPPED (net device only): {why}; the guest runs with blk and console\n"
                    ),
                );
                (None, None)
            }
        };
        Backends {
            blk,
            console,
            net,
            _ns: ns,
        }
    }

    /// Host socket of console port `name` (`hvc0` is port 0, `console`).
    fn console_port(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}.{name}", self.console.socket().display()))
    }

    /// The first backend that exited, and how.
    fn exited(&mut self) -> Option<String> {
        let mut all: Vec<&mut Daemon> = vec![&mut self.blk, &mut self.console];
        all.extend(self.net.as_mut());
        all.into_iter().find_map(|d| {
            let st = d.guard_mut().try_wait().ok().flatten()?;
            let hint = if st.signal() == Some(libc::SIGSYS) {
                " (SIGSYS: a seccomp filter; rerun the daemon with --sandbox log)"
            } else {
                ""
            };
            Some(format!("{} exited: {st}{hint}", d.guard_mut().name()))
        })
    }
}

/// A namespace with tap [`TAP`] at [`TAP_ADDR`] and `bulkhead-net` inside
/// it, or why not.
fn start_net() -> Result<(Daemon, NetNs), String> {
    if let Some(why) = netns::unavailable() {
        return Err(why);
    }
    let ns = NetNs::new().map_err(|e| format!("cannot create a namespace: {e}"))?;
    ns.add_tap(TAP, &format!("{TAP_ADDR}/24"), false)
        .map_err(|e| format!("cannot add a tap: {e}"))?;
    let scratch = Scratch::new(0).map_err(|e| e.to_string())?;
    // `ip netns exec` execs the daemon: the guard's pid is the daemon's.
    let mut cmd = ns.command(workspace_binary("bulkhead-net"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .args(["--tap", TAP, "--mac", GUEST_MAC]);
    let net = Daemon::start("bulkhead-net", cmd, scratch)
        .map_err(|e| format!("cannot start bulkhead-net (cargo build -p bulkhead-net): {e}"))?;
    Ok((net, ns))
}

/// The guest's checks; the net part only when the net device is attached.
fn guest_script(net: bool) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        r#"
# --- blk
check vda_present test -b /dev/vda
expect_eq vda_sectors "$(cat /sys/block/vda/size)" {sectors}
dd if=/dev/urandom of=/root/data bs=4096 count=16 2>/dev/null
check blk_write dd if=/root/data of=/dev/vda bs=4096 count=16 oflag=direct
check blk_read dd if=/dev/vda of=/root/back bs=4096 count=16 iflag=direct
check blk_same cmp /root/data /root/back
{{ printf '{marker}'; head -c 4096 /dev/zero; }} | head -c 4096 >/root/marker
check blk_marker dd if=/root/marker of=/dev/vda bs=4096 seek={marker_block} oflag=direct
"#,
        sectors = DISK_SIZE / 512,
        marker = DISK_MARKER.replace('\n', "\\n"),
        marker_block = DISK_MARKER_OFFSET / 4096,
    ));
    if net {
        s.push_str(&format!(
            r#"
# --- net
check eth0_present test -d /sys/class/net/eth0
expect_eq eth0_mac "$(cat /sys/class/net/eth0/address)" {GUEST_MAC}
check eth0_up ip link set eth0 up
check eth0_addr ip addr add {GUEST_ADDR}/24 dev eth0
check ping ping -c 3 -W 5 {TAP_ADDR}
"#
        ));
    }
    s.push_str(&format!(
        r#"
# --- console: hvc0 appears once the driver's control messages are done
i=0
while [ ! -c /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
check hvc0_present test -c /dev/hvc0
check hvc0_write sh -c 'echo {HVC0_HELLO} >/dev/hvc0'
# A shell on hvc0, as a getty would start one; the host types into it.
setsid sh -c 'echo {SHELL_READY}; exec sh' </dev/hvc0 >/dev/hvc0 2>&1 &
i=0
while [ ! -f /root/hvc0-typed ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
check hvc0_shell_ran_host_input test -f /root/hvc0-typed

# --- console: the named port (udev would link /dev/virtio-ports/NAME)
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
  for f in /sys/class/virtio-ports/*/name; do
    [ -f "$f" ] && [ "$(cat "$f")" = {PORT_NAME} ] && port=$(basename "$(dirname "$f")")
  done
  [ -n "$port" ] || sleep 0.1
  i=$((i + 1))
done
check named_port_in_sysfs test -n "$port"
if [ -e /dev/virtio-ports/{PORT_NAME} ]; then
  value named_port_link udev
else
  value named_port_link "made by the test (no udev): /dev/$port"
  mkdir -p /dev/virtio-ports && ln -s "../$port" /dev/virtio-ports/{PORT_NAME}
fi
check named_port_dev test -c /dev/virtio-ports/{PORT_NAME}
check named_port_write sh -c 'echo {PORT_HELLO} >/dev/virtio-ports/{PORT_NAME}'
sync
"#
    ));
    s
}

/// The host end of one console port socket: connects once the daemon
/// accepts, and collects what the guest writes.
struct PortClient {
    path: PathBuf,
    stream: Option<UnixStream>,
    got: Vec<u8>,
}

impl PortClient {
    fn new(path: PathBuf) -> Self {
        PortClient {
            path,
            stream: None,
            got: Vec::new(),
        }
    }

    /// Connects if not yet connected, then reads whatever is there.
    fn poll(&mut self) {
        if self.stream.is_none() {
            let Ok(s) = UnixStream::connect(&self.path) else {
                return;
            };
            if s.set_nonblocking(true).is_err() {
                return;
            }
            self.stream = Some(s);
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
                Err(_) => return,
            }
        }
    }

    /// Sends `text` to the guest (blocking until the socket took it all).
    fn send(&mut self, text: &str) -> std::io::Result<()> {
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

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.got).replace('\r', "")
    }

    fn contains(&self, what: &str) -> bool {
        self.text().contains(what)
    }
}

/// A work directory for one VM (initrd, serial log, VMM log, API socket),
/// removed on drop.
fn work_dir() -> Scratch {
    Scratch::new(0).expect("work dir")
}

/// The test initrd: the kit's base initramfs with `script` as `/test.sh`.
fn initrd(image: &GuestImage, dir: &Path, script: &str) -> PathBuf {
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

/// The `bulkhead-vmm` command line for `backends` over `transport`.
fn vmm_command(
    image: &GuestImage,
    initrd: &Path,
    backends: &Backends,
    transport: &str,
    dir: &Path,
) -> Command {
    let mut cmd = Command::new(workspace_binary("bulkhead-vmm"));
    let dev = |d: &Daemon| format!("socket={},transport={transport}", d.socket().display());
    cmd.env("RUST_LOG", "info")
        .arg("--kernel")
        .arg(&image.kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--memory", "512M", "--cpus", "1"])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"])
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

/// What one boot produced: the guest's report and what the host saw.
struct Boot {
    run: GuestRun,
    net: bool,
    hvc0: String,
    named_port: String,
    disk_marker: Vec<u8>,
    vmm_status: Option<String>,
}

impl Boot {
    /// Panics with everything known unless the guest and the host checks passed.
    fn assert_passed(&self, what: &str) {
        let mut problems = Vec::new();
        if !self.run.passed() {
            problems.push("the guest's checks did not all pass".to_string());
        }
        for (name, text, want) in [
            ("hvc0 (guest write)", &self.hvc0, HVC0_HELLO),
            ("hvc0 (host-typed command)", &self.hvc0, TYPED_OUTPUT),
            ("named port", &self.named_port, PORT_HELLO),
        ] {
            if !text.contains(want) {
                problems.push(format!("{name}: the host never read {want:?}"));
            }
        }
        if self.disk_marker != DISK_MARKER.as_bytes() {
            problems.push(format!(
                "the host image holds {:?} at {DISK_MARKER_OFFSET}, not the guest's marker",
                String::from_utf8_lossy(&self.disk_marker)
            ));
        }
        if self.net && !self.run.check("ping").is_some_and(|c| c.passed) {
            problems.push("net: the guest's ping did not run or failed".to_string());
        }
        if !problems.is_empty() {
            panic!(
                "{what}:\n  {}\nbulkhead-vmm: {}\n{}--- hvc0 as the host read it:\n{}\n\
                 --- {PORT_NAME} as the host read it:\n{}",
                problems.join("\n  "),
                self.vmm_status.as_deref().unwrap_or("killed"),
                self.run.report(),
                self.hvc0,
                self.named_port
            );
        }
    }
}

/// Boots the test guest under `bulkhead-vmm` with all three backends over
/// `transport`, plays the host side of the console, and collects the results.
fn boot(transport: &str) -> Boot {
    let image = guest::image();
    let mut backends = Backends::start();
    let net = backends.net.is_some();
    let work = work_dir();
    let initrd = initrd(image, work.dir(), &guest_script(net));
    let serial = work.dir().join("serial.log");
    let log = work.dir().join("vmm.log");
    let mut cmd = vmm_command(image, &initrd, &backends, transport, work.dir());
    let mut hvc0 = PortClient::new(backends.console_port("console"));
    let mut named = PortClient::new(backends.console_port(PORT_NAME));

    let started = Instant::now();
    let mut vmm: ChildGuard =
        guest::spawn_daemon("bulkhead-vmm", &mut cmd, &log).expect("start bulkhead-vmm");
    let deadline = started + BOOT_TIMEOUT.mul_f64(guest::timeout_scale());
    let mut typed = false;
    let mut timed_out = true;
    let mut vmm_status = None;
    let mut backend_exit = None;
    let mut grace_until = None;
    while Instant::now() < deadline {
        hvc0.poll();
        named.poll();
        if !typed && hvc0.contains(SHELL_READY) {
            // Typed only once the shell holds hvc0, so the line cannot meet
            // a closed tty.
            hvc0.send(TYPED).expect("type into the console socket");
            typed = true;
        }
        if let Ok(Some(st)) = vmm.try_wait() {
            vmm_status = Some(st.to_string());
            timed_out = false;
            break;
        }
        if std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains("@@BULKHEAD EXIT")
        {
            // The result is in; give the VMM a moment to see the power-off.
            if let Ok(Some(st)) = vmm.wait_timeout(Duration::from_secs(5)) {
                vmm_status = Some(st.to_string());
            }
            timed_out = false;
            break;
        }
        if backend_exit.is_none() {
            backend_exit = backends.exited();
            if backend_exit.is_some() {
                grace_until = Some(Instant::now() + BACKEND_EXIT_GRACE);
            }
        }
        if grace_until.is_some_and(|g| Instant::now() >= g) {
            timed_out = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = vmm.kill();
    // Output the guest wrote just before powering off may still be in flight.
    let settle = Instant::now() + Duration::from_secs(1);
    while Instant::now() < settle && !(hvc0.contains(TYPED_OUTPUT) && named.contains(PORT_HELLO)) {
        hvc0.poll();
        named.poll();
        std::thread::sleep(Duration::from_millis(20));
    }
    let text =
        String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).replace('\r', "");
    if std::env::var_os("BULKHEAD_SHOW_SERIAL").is_some() {
        eprintln!("--- serial console:\n{text}--- end of serial console");
    }
    let mut run = GuestRun::parse(&text);
    run.timed_out = timed_out;
    run.backend_exit = backend_exit;
    run.qemu_status = vmm_status.clone();
    run.qemu_output = std::fs::read_to_string(&log).unwrap_or_default();
    run.elapsed = started.elapsed();
    let disk_marker = backends
        .blk
        .scratch()
        .read_image(DISK_MARKER_OFFSET, DISK_MARKER.len())
        .unwrap_or_default();
    Boot {
        run,
        net,
        hvc0: hvc0.text(),
        named_port: named.text(),
        disk_marker,
        vmm_status,
    }
}

#[test]
fn linux_under_bulkhead_vmm_uses_blk_net_and_console_over_virtio_pci() {
    if nested::delegate("linux_under_bulkhead_vmm_uses_blk_net_and_console_over_virtio_pci") {
        return;
    }
    boot("pci").assert_passed("bulkhead-vmm + blk, net, console over virtio-pci");
}

#[test]
fn linux_under_bulkhead_vmm_uses_blk_net_and_console_over_virtio_mmio() {
    if nested::delegate("linux_under_bulkhead_vmm_uses_blk_net_and_console_over_virtio_mmio") {
        return;
    }
    // The DSDT announces each device as LNRO0005 (Debian's kernel has no
    // VIRTIO_MMIO_CMDLINE_DEVICES).
    boot("mmio").assert_passed("bulkhead-vmm + blk, net, console over virtio-mmio (ACPI)");
}

/// Runs `bulkhead-vmm ctl --api-socket API ARGS` and parses its JSON reply.
fn ctl(api: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
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

/// Whether `list` shows `want` devices, all connected.
fn all_connected(reply: &serde_json::Value, want: usize) -> bool {
    let Some(devs) = reply.get("devices").and_then(|d| d.as_array()) else {
        return false;
    };
    devs.len() == want
        && devs
            .iter()
            .all(|d| d.get("state").and_then(|s| s.as_str()) == Some("connected"))
}

#[test]
fn bulkhead_vmm_connects_to_blk_net_and_console_over_pci_and_mmio() {
    // No probe: this stops before the guest matters. The guest's script
    // only sleeps, so where KVM does run it, nothing finishes early.
    let image = guest::image();
    for transport in ["pci", "mmio"] {
        let mut backends = Backends::start();
        let want = 2 + usize::from(backends.net.is_some());
        let work = work_dir();
        let initrd = initrd(image, work.dir(), "sleep 600\n");
        let log = work.dir().join("vmm.log");
        let api = work.dir().join("api.sock");
        let mut cmd = vmm_command(image, &initrd, &backends, transport, work.dir());
        let mut vmm =
            guest::spawn_daemon("bulkhead-vmm", &mut cmd, &log).expect("start bulkhead-vmm");
        let vmm_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let deadline = Instant::now() + ATTACH_TIMEOUT.mul_f64(guest::timeout_scale());
        let mut last = Err("no reply yet".to_string());
        loop {
            if let Ok(Some(st)) = vmm.try_wait() {
                panic!(
                    "{transport}: bulkhead-vmm exited early: {st}\n{}",
                    vmm_log()
                );
            }
            if let Some(why) = backends.exited() {
                panic!("{transport}: {why}\n{}", vmm_log());
            }
            if api.exists() {
                last = ctl(&api, &["list"]);
                if last.as_ref().is_ok_and(|r| all_connected(r, want)) {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{transport}: not every backend connected within {ATTACH_TIMEOUT:?}: {last:?}\n{}",
                vmm_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let list = last.expect("list reply");
        let types: Vec<&str> = list["devices"]
            .as_array()
            .map(|d| d.iter().filter_map(|d| d["type"].as_str()).collect())
            .unwrap_or_default();
        let mut expected = vec!["blk", "console"];
        if backends.net.is_some() {
            expected.push("net");
        }
        let mut sorted = types.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, expected, "{transport}: {list}");
        let reply = ctl(&api, &["shutdown"]).expect("shutdown");
        assert_eq!(reply["ok"], true, "{transport}: shutdown: {reply}");
        let status = vmm
            .wait_timeout(Duration::from_secs(10))
            .expect("wait for bulkhead-vmm");
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(5),
            "{transport}: bulkhead-vmm should exit 5 (stopped through the API)\n{}",
            vmm_log()
        );
        assert!(
            !api.exists(),
            "{transport}: the control socket outlived the VMM"
        );
        if let Some(why) = backends.exited() {
            panic!("{transport}: a backend died with the VMM: {why}");
        }
        eprintln!("{transport}: bulkhead-vmm attached {types:?} and stopped cleanly");
    }
}
