//! libvirt runs a Linux domain whose disk and network card are served by
//! `bulkhead-blk` and `bulkhead-net`: `<disk type='vhostuser'>` and
//! `<interface type='vhostuser'>`, as `contrib/libvirt/bulkhead-vm.xml`
//! shows users. The guest writes a pattern and reads it back past its page
//! cache, runs fio with verification, and pings a tap in a network
//! namespace through `bulkhead-net`; both daemons' logs show libvirt's QEMU
//! connected and their counters show the traffic.
//!
//! libvirtd runs here in session mode (`qemu:///session`) as uid 65534,
//! with its home and XDG directories in the test's own temp dir, so it
//! touches no system state and needs no system user; it starts QEMU (TCG,
//! `<domain type='qemu'>`) as that uid. The daemons run as root and their
//! sockets are opened to that uid. Needs root (namespace, tap, changing
//! uid), QEMU and libvirt (`libvirt-daemon`, `libvirt-daemon-driver-qemu`,
//! `libvirt-clients`: `.ci/install-deps`).

use std::fs::{self, Permissions};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bulkhead_tests::guest::{self, Guest, GuestRun, spawn_daemon, tail, timeout_scale};
use bulkhead_tests::net::NetDaemon;
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::{ChildGuard, workspace_binary};
use bulkhead_tests::skip::{self, SkipReason, skip_if};

const TEST: &str = "libvirt_domain_boots_and_uses_bulkhead_blk_and_bulkhead_net";
/// The uid (and gid) libvirtd and its QEMU run as.
const UID: u32 = 65534;
const TAP: &str = "bhlvtap0";
const MAC: &str = "52:54:00:b4:1c:01";
const DISK_MIB: u64 = 64;
const PATTERN_MIB: u64 = 4;
/// Whole run, boot to power-off, before [`timeout_scale`].
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Why this test cannot run here.
fn unavailable() -> Option<SkipReason> {
    netns::unavailable()
        .or_else(|| skip::needs_program("qemu-system-x86_64"))
        .or_else(|| skip::needs_program("virsh"))
        .or_else(|| skip::needs_program("virt-xml-validate"))
        .or_else(|| skip::needs_program("setpriv"))
        .or_else(|| {
            // libvirtd lives in /usr/sbin, which a root PATH has.
            ["/usr/sbin/libvirtd", "/usr/bin/libvirtd"]
                .iter()
                .all(|p| !Path::new(p).exists())
                .then(|| SkipReason::NotInstalled("libvirtd (libvirt-daemon)".into()))
        })
        .or_else(|| {
            let driver =
                "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so";
            (!Path::new(driver).exists()).then(|| {
                SkipReason::NotInstalled(
                    "libvirt's QEMU driver (libvirt-daemon-driver-qemu)".into(),
                )
            })
        })
}

/// The guest's checks: the disk (pattern, fio verify) and the NIC (ping).
fn guest_script() -> String {
    let sectors = DISK_MIB * 1024 * 1024 / 512;
    format!(
        r#"
expect_eq disk-present "$(ls /sys/block | grep -c '^vda$')" 1
expect_eq disk-size "$(cat /sys/block/vda/size)" {sectors}
want=$(sha256sum /data/pattern.bin | cut -d' ' -f1)
check pattern-write dd if=/data/pattern.bin of=/dev/vda bs=1M conv=fsync
sync; echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=1M count={PATTERN_MIB} 2>/dev/null | sha256sum | cut -d' ' -f1)
expect_eq pattern-readback "$got" "$want"
check fio-verify fio --name=verify --filename=/dev/vda --offset=16M --size=16M --rw=randwrite \
  --bs=4k --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --verify_fatal=1

expect_eq nic-present "$(ls /sys/class/net | grep -c '^eth0$')" 1
expect_eq mac "$(cat /sys/class/net/eth0/address)" {MAC}
ip link set eth0 up
ip addr add 10.78.0.2/24 dev eth0
check ping ping -c 3 -W 5 10.78.0.1
"#
    )
}

/// The domain: direct kernel boot of the kit's kernel, shared memfd RAM (a
/// vhost-user backend maps it), the two vhost-user devices, the serial
/// console into a file.
fn domain_xml(
    name: &str,
    kernel: &Path,
    initrd: &Path,
    blk: &Path,
    net: &Path,
    serial: &Path,
) -> String {
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw'/>
      <source type='unix' path='{blk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='vhostuser'>
      <mac address='{MAC}'/>
      <source type='unix' path='{net}' mode='client'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{serial}'/>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
"#,
        kernel = kernel.display(),
        initrd = initrd.display(),
        blk = blk.display(),
        net = net.display(),
        serial = serial.display(),
    )
}

/// A session-mode libvirtd as [`UID`], its state in `home`; on drop the
/// domain it started is destroyed (QEMU is not libvirtd's child once
/// running, so its pid is killed too) and libvirtd is killed.
struct Libvirtd {
    home: PathBuf,
    daemon: ChildGuard,
    log: PathBuf,
    domain: Option<String>,
}

impl Libvirtd {
    fn start(home: &Path) -> Libvirtd {
        for d in ["run", "config/libvirt", "cache", "data"] {
            fs::create_dir_all(home.join(d)).unwrap();
        }
        // QEMU's stdio straight into a file: no virtlogd to start and stop.
        fs::write(
            home.join("config/libvirt/qemu.conf"),
            "stdio_handler = \"file\"\n",
        )
        .unwrap();
        chown_tree(home);
        fs::set_permissions(home.join("run"), Permissions::from_mode(0o700)).unwrap();
        let log = home.join("libvirtd.log");
        let mut cmd = Libvirtd::as_user(home, "libvirtd");
        cmd.args(["--timeout", "0"]);
        let daemon = spawn_daemon("libvirtd", &mut cmd, &log).expect("start libvirtd");
        let sock = home.join("run/libvirt/libvirt-sock");
        let deadline = Instant::now() + Duration::from_secs(30).mul_f64(timeout_scale());
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "libvirtd did not create {}:\n{}",
                sock.display(),
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Libvirtd {
            home: home.to_path_buf(),
            daemon,
            log,
            domain: None,
        }
    }

    /// `program` as [`UID`] with the session's environment.
    fn as_user(home: &Path, program: &str) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            format!("--reuid={UID}"),
            format!("--regid={UID}"),
            "--clear-groups".into(),
            "--".into(),
            program.into(),
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("XDG_DATA_HOME", home.join("data"));
        cmd
    }

    fn virsh(&self, args: &[&str]) -> Output {
        Libvirtd::as_user(&self.home, "virsh")
            .args(["-c", "qemu:///session"])
            .args(args)
            .output()
            .expect("run virsh")
    }

    /// `virsh create FILE` (a transient domain: gone once it powers off).
    fn create(&mut self, name: &str, xml: &Path) {
        self.domain = Some(name.to_string());
        let out = self.virsh(&["create", &xml.to_string_lossy()]);
        assert!(
            out.status.success(),
            "virsh create: {}{}\n--- libvirtd:\n{}\n--- QEMU's log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&fs::read_to_string(&self.log).unwrap_or_default(), 20),
            self.qemu_log(name)
        );
    }

    /// Whether the domain still exists (a transient one ends at power-off).
    fn running(&self, name: &str) -> bool {
        let out = self.virsh(&["list", "--name"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == name)
    }

    fn qemu_log(&self, name: &str) -> String {
        let path = self.home.join(format!("cache/libvirt/qemu/log/{name}.log"));
        tail(&fs::read_to_string(path).unwrap_or_default(), 15)
    }

    fn qemu_pid(&self, name: &str) -> Option<i32> {
        let path = self.home.join(format!("run/libvirt/qemu/run/{name}.pid"));
        fs::read_to_string(path).ok()?.trim().parse().ok()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if let Some(name) = self.domain.take() {
            let pid = self.qemu_pid(&name);
            let _ = self.virsh(&["destroy", &name]);
            if let Some(pid) = pid.filter(|&p| p > 1) {
                // SAFETY: kill(2) with a pid read from this run's own pid
                // file and a plain signal number; no memory is shared.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = self.daemon.kill();
    }
}

/// Hands `dir` and everything under it to [`UID`].
fn chown_tree(dir: &Path) {
    chown(dir, Some(UID), Some(UID)).unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            chown_tree(&path);
        } else {
            chown(&path, Some(UID), Some(UID)).unwrap();
        }
    }
}

/// Lets [`UID`] connect to a root daemon's socket.
fn open_socket_to_user(socket: &Path) {
    if let Some(dir) = socket.parent() {
        fs::set_permissions(dir, Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(socket, Permissions::from_mode(0o666)).unwrap();
}

#[test]
fn libvirt_domain_boots_and_uses_bulkhead_blk_and_bulkhead_net() {
    if skip_if(TEST, unavailable()) {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-libvirt-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), Permissions::from_mode(0o755)).unwrap();
    let pattern: Vec<u8> = (0..PATTERN_MIB * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();

    // The guest's files, readable by libvirt's QEMU.
    let img = dir.path().join("img");
    fs::create_dir(&img).unwrap();
    fs::set_permissions(&img, Permissions::from_mode(0o755)).unwrap();
    let kernel = img.join("vmlinux");
    fs::copy(&guest::image().kernel, &kernel).unwrap();
    let initrd = img.join("initrd.cpio");
    Guest::new(guest_script())
        .file("/data/pattern.bin", pattern.clone())
        .write_initrd_to(&initrd)
        .unwrap();
    for f in [&kernel, &initrd] {
        fs::set_permissions(f, Permissions::from_mode(0o644)).unwrap();
    }

    // bulkhead-blk on an image file.
    let disk = dir.path().join("disk.raw");
    fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_MIB * 1024 * 1024)
        .unwrap();
    let blk_sock = dir.path().join("blk.sock");
    let blk_log = dir.path().join("blk.log");
    let mut blk_cmd = Command::new(workspace_binary("bulkhead-blk"));
    blk_cmd
        .arg("--socket-path")
        .arg(&blk_sock)
        .arg("--image")
        .arg(&disk)
        .env("RUST_LOG", "info");
    let mut blk = spawn_daemon("bulkhead-blk", &mut blk_cmd, &blk_log).unwrap();
    bulkhead_tests::process::wait_for_path(&blk_sock, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", fs::read_to_string(&blk_log).unwrap_or_default()));
    open_socket_to_user(&blk_sock);

    // bulkhead-net on a tap in a namespace of the test's own.
    let ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, "10.78.0.1/24", false).expect("add the tap");
    let fds = ns.open_tap_fds(TAP, 1, false).expect("open the tap");
    let mut net = NetDaemon::start_with_fds(fds, &["--mac", MAC]).expect("start bulkhead-net");
    open_socket_to_user(net.socket());

    let home = dir.path().join("home");
    let mut libvirtd = Libvirtd::start(&home);
    let name = format!("bulkhead-test-{}", std::process::id());
    let serial = home.join("serial.log");
    let xml = home.join("domain.xml");
    fs::write(
        &xml,
        domain_xml(&name, &kernel, &initrd, &blk_sock, net.socket(), &serial),
    )
    .unwrap();
    chown(&xml, Some(UID), Some(UID)).unwrap();
    let valid = Command::new("virt-xml-validate")
        .arg(&xml)
        .arg("domain")
        .output()
        .unwrap();
    assert!(
        valid.status.success(),
        "virt-xml-validate: {}{}",
        String::from_utf8_lossy(&valid.stdout),
        String::from_utf8_lossy(&valid.stderr)
    );

    let started = Instant::now();
    libvirtd.create(&name, &xml);
    let deadline = started + RUN_TIMEOUT.mul_f64(timeout_scale());
    let mut ended = false;
    while Instant::now() < deadline {
        if !libvirtd.running(&name) {
            ended = true;
            break;
        }
        if let Some(st) = blk.try_wait().unwrap() {
            panic!("bulkhead-blk exited during the run: {st}");
        }
        assert!(net.is_running(), "bulkhead-net exited during the run");
        std::thread::sleep(Duration::from_millis(500));
    }
    let console = fs::read_to_string(&serial)
        .unwrap_or_default()
        .replace('\r', "");
    let run = GuestRun::parse(&console);
    let blk_text = fs::read_to_string(&blk_log).unwrap_or_default();
    let net_stats = net.stats().unwrap_or_default();
    let report = || {
        format!(
            "{}--- serial console:\n{}\n--- QEMU's log (libvirt):\n{}\n--- bulkhead-blk:\n{}\n--- bulkhead-net:\n{}",
            run.report(),
            tail(&console, 40),
            libvirtd.qemu_log(&name),
            tail(&blk_text, 15),
            tail(&net.log(), 15)
        )
    };
    assert!(
        ended,
        "the domain did not power off within {:?}\n{}",
        started.elapsed(),
        report()
    );
    assert!(run.passed(), "guest checks failed\n{}", report());
    for check in [
        "disk-present",
        "disk-size",
        "pattern-readback",
        "fio-verify",
        "mac",
        "ping",
    ] {
        assert!(
            run.check(check).is_some(),
            "no '{check}' check ran\n{}",
            report()
        );
    }
    // libvirt's QEMU drove both daemons (QEMU would fall back to its own
    // virtio-net, silently, were guest RAM not shared).
    assert!(blk_text.contains("frontend connected"), "{}", report());
    assert!(net.log().contains("frontend connected"), "{}", report());
    let frames = |k: &str| net_stats.get(k).copied().unwrap_or(0);
    assert!(
        frames("tx_frames") >= 3 && frames("rx_frames") >= 3,
        "bulkhead-net carried too little: {net_stats:?}\n{}",
        report()
    );
    // The pattern is on the image, where the guest put it.
    let on_disk = fs::read(&disk).unwrap();
    assert!(
        on_disk[..pattern.len()] == pattern[..],
        "the image does not hold the guest's pattern"
    );
    eprintln!(
        "libvirt domain {name}: powered off after {:.1?}; bulkhead-net {net_stats:?}",
        started.elapsed()
    );
}
