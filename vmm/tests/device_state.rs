//! What the guest configured outside the rings survives a swap and a crash
//! (issue 22), under Linux and `bulkhead-vmm` (the nested host where KVM here
//! cannot run Linux), in three phases: the first daemons; after `ctl swap`
//! of net0 and console0 to second daemons (which get the first ones' state
//! through DEVICE_STATE); after SIGKILL and a restart of those on their
//! sockets (state from the inflight area the VMM keeps). In every phase:
//!
//! - the receive filter holds: Linux turned promiscuous mode off, and of
//!   200 frames the host sends to a foreign MAC almost none reach the guest
//!   (its `rx_packets` rises by fewer than [`MAX_FOREIGN`]); ping works;
//! - console: what the guest writes to hvc0 and to the named port reaches
//!   the host; what the host types on hvc0 reaches a shell there and what it
//!   writes to the named port reaches the guest's reader, which opened the
//!   port once, before the first phase; a resize reaches hvc0's tty.

// Test code: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod linux;

use std::path::PathBuf;
use std::time::Duration;

use bulkhead_tests::daemon::Scratch;
use bulkhead_tests::guest::{self, GuestRun};
use bulkhead_tests::nested;
use bulkhead_tests::netns::{NetNs, PacketSocket};
use bulkhead_tests::process::{ChildGuard, workspace_binary};
use linux::{GUEST_ADDR, Options, PORT_NAME, PortClient, TAP, TAP_ADDR, Vm};

/// Frames the host sends to a foreign MAC per phase.
const FOREIGN_FRAMES: usize = 200;
/// Most of them that may reach the guest (ARP and the like pass too).
const MAX_FOREIGN: u64 = 20;
/// How long the frames and the console input get to arrive.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the guest's console output of a phase gets to arrive.
const OUTPUT_WAIT: Duration = Duration::from_secs(10);

fn script(phases: u16) -> String {
    format!(
        r#"
check eth0_up ip link set eth0 up
check eth0_addr ip addr add {GUEST_ADDR}/24 dev eth0
i=0
while [ ! -c /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
  for f in /sys/class/virtio-ports/*/name; do
    [ -f "$f" ] && [ "$(cat "$f")" = {PORT_NAME} ] && port=/dev/$(basename "$(dirname "$f")")
  done
  [ -n "$port" ] || sleep 0.1
  i=$((i + 1))
done
check named_port test -c "$port"
# Opened once (a port takes one opener), held across every swap and
# restart: read in the background, written through the same fd.
exec 3<>"$port"
cat <&3 >/tmp/portin &
setsid sh -c 'exec sh' </dev/hvc0 >/dev/hvc0 2>&1 &
sleep 1
for n in $(seq 1 {phases}); do
  before=$(cat /sys/class/net/eth0/statistics/rx_packets)
  phase ready-$n
  await_host sent-$n || fail host_sent_$n "no word from the host"
  after=$(cat /sys/class/net/eth0/statistics/rx_packets)
  value foreign_rx_$n $((after - before))
  check ping_$n ping -c 2 -W 5 {TAP_ADDR}
  check port_input_$n grep -q PORT-IN-$n /tmp/portin
  check hvc0_input_$n test -f /root/hvc0-in-$n
  value stty_$n "$(stty -F /dev/hvc0 size)"
  echo HVC0-OUT-$n >/dev/hvc0
  echo PORT-OUT-$n >&3
  phase checked-$n
  if [ $n -lt {phases} ]; then await_host next-$n || fail host_next_$n "no word from the host"; fi
done
"#
    )
}

/// A frame to a MAC no one has, from one no one has.
fn foreign_frame(i: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x99, 0x02, 0, 0, 0, 0, 0x98, 0x88, 0xb5];
    f.extend_from_slice(format!("foreign frame {i:04}").as_bytes());
    f.resize(64, 0);
    f
}

/// What [`host_phase`] needs of a running guest: the harness's [`Vm`], or
/// a guest `bulkhead up` runs ([`Launched`]).
trait GuestHost {
    /// One round of the host side; false once the run is over.
    fn poll(&mut self) -> bool;
    /// Whether the guest reported phase `name`.
    fn reached(&self, name: &str) -> bool;
    /// The end of the serial log, for a failure message.
    fn serial_tail(&self) -> String;
    /// Leaves `word` in the guest's mailbox.
    fn tell_guest(&self, word: &str);
    /// The console's host clients: hvc0 and the named port.
    fn clients(&mut self) -> (&mut PortClient, &mut PortClient);
    /// The socket of the console's port `name` ("console" for port 0; its
    /// `.ctl` takes resizes and answers `stats`).
    fn port_socket(&self, name: &str) -> PathBuf;
}

impl GuestHost for Vm {
    fn poll(&mut self) -> bool {
        Vm::poll(self)
    }
    fn reached(&self, name: &str) -> bool {
        Vm::reached(self, name)
    }
    fn serial_tail(&self) -> String {
        bulkhead_tests::guest::tail(&self.serial(), 60)
    }
    fn tell_guest(&self, word: &str) {
        Vm::tell_guest(self, word)
    }
    fn clients(&mut self) -> (&mut PortClient, &mut PortClient) {
        (&mut self.hvc0, &mut self.named)
    }
    fn port_socket(&self, name: &str) -> PathBuf {
        self.backends.console_port(name)
    }
}

/// Polls until `done` holds (true) or the run is over (false).
fn wait_until<H: GuestHost>(h: &mut H, mut done: impl FnMut(&mut H) -> bool) -> bool {
    loop {
        if done(h) {
            return true;
        }
        if !h.poll() {
            return done(h);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn await_phase<H: GuestHost>(h: &mut H, name: &str) {
    if !wait_until(h, |h| h.reached(name)) {
        panic!("the guest never reached phase {name}:\n{}", h.serial_tail());
    }
}

/// The host's side of phase `n`: foreign frames, console input, a resize;
/// returns what went wrong with the guest's output.
fn host_phase<H: GuestHost>(h: &mut H, frames: &PacketSocket, n: u16) -> Vec<String> {
    await_phase(h, &format!("ready-{n}"));
    for i in 0..FOREIGN_FRAMES {
        frames
            .send(&foreign_frame(i))
            .expect("send a foreign frame");
    }
    assert!(
        wait_until(h, |h| {
            let (hvc0, named) = h.clients();
            hvc0.send("\n").is_ok() && named.send("").is_ok()
        }),
        "the console's host sockets never accepted a client"
    );
    let (hvc0, named) = h.clients();
    hvc0.send(&format!("echo in >/root/hvc0-in-{n}\n"))
        .expect("type on hvc0");
    named
        .send(&format!("PORT-IN-{n}\n"))
        .expect("write to the named port");
    let reply = linux::console_ctl(
        &h.port_socket("console"),
        &format!("resize {} {}", 90 + n, 30 + n),
    )
    .expect("resize through the console's control socket");
    assert_eq!(reply, "ok");
    let settle = std::time::Instant::now() + SETTLE;
    wait_until(h, |_| std::time::Instant::now() >= settle);
    h.tell_guest(&format!("sent-{n}"));
    await_phase(h, &format!("checked-{n}"));
    let (hvc0_out, port_out) = (format!("HVC0-OUT-{n}"), format!("PORT-OUT-{n}"));
    let until = std::time::Instant::now() + OUTPUT_WAIT;
    wait_until(h, |h| {
        let (hvc0, named) = h.clients();
        (hvc0.contains(&hvc0_out) && named.contains(&port_out))
            || std::time::Instant::now() >= until
    });
    let (hvc0, named) = h.clients();
    // (what, port, wanted, read it, client connections, bytes read)
    let seen = [
        ("hvc0", "console", &hvc0_out, hvc0),
        ("the named port", PORT_NAME, &port_out, named),
    ]
    .map(|(what, port, want, c)| {
        let got = (c.contains(want), c.connections, c.text().len());
        (what, port, want, got)
    });
    let mut problems = Vec::new();
    for (what, port, want, (ok, connections, bytes)) in seen {
        if !ok {
            // What the daemon counted (bytes from the guest, delivered,
            // dropped) tells a guest that never wrote from output lost
            // on the way to the client.
            let stats = linux::console_ctl(&h.port_socket(port), "stats")
                .unwrap_or_else(|e| format!("no stats: {e}"));
            problems.push(format!(
                "phase {n}: the host never read {want:?} on {what} \
                 (client: {connections} connection(s), {bytes} bytes read; daemon: {stats})"
            ));
        }
    }
    problems
}

/// What went wrong with the guest's own measurements of phases 1..=`phases`.
fn guest_problems(run: &GuestRun, phases: u16) -> Vec<String> {
    let mut problems = Vec::new();
    for n in 1..=phases {
        let foreign: u64 = run
            .value(&format!("foreign_rx_{n}"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        if foreign >= MAX_FOREIGN {
            problems.push(format!(
                "phase {n}: {foreign} of {FOREIGN_FRAMES} frames to a foreign MAC reached the guest"
            ));
        }
        // `stty size` prints rows, then columns.
        let want = format!("{} {}", 30 + n, 90 + n);
        let got = run.value(&format!("stty_{n}")).unwrap_or("-");
        if got != want {
            problems.push(format!("phase {n}: hvc0's size is {got:?}, not {want:?}"));
        }
    }
    problems
}

#[test]
fn net_filter_and_console_state_survive_a_swap_and_a_crash_under_linux() {
    if nested::delegate("net_filter_and_console_state_survive_a_swap_and_a_crash_under_linux") {
        return;
    }
    let opts = Options {
        cpus: 2,
        multi_queue_tap: true,
        ..Options::default()
    };
    let mut vm = Vm::boot(opts, |b| {
        assert!(b.net.is_some(), "this test needs bulkhead-net (root)");
        script(3)
    });
    let frames = vm
        .backends
        .ns()
        .packet_socket(TAP, false)
        .expect("packet socket on the tap");
    let mut problems = host_phase(&mut vm, &frames, 1);

    // Phase 2: both moved to new daemons.
    for (id, new) in [
        ("net0", vm.backends.second_net()),
        ("console0", vm.backends.second_console()),
    ] {
        let socket = new.socket().to_string_lossy().into_owned();
        let reply = vm
            .ctl(&["swap", id, "--socket", &socket])
            .expect("ctl swap");
        assert_eq!(
            reply["ok"],
            true,
            "swap {id}: {reply}\n{}\n--- the new daemon:\n{}",
            vm.vmm_log(),
            linux::daemon_log(&new)
        );
        if id == "net0" {
            vm.backends.replace_net(new);
        } else {
            vm.backends.replace_console(new);
        }
    }
    vm.follow_console();
    eprintln!("swapped: {}", vm.ctl(&["list"]).unwrap_or_default());
    vm.tell_guest("next-1");
    problems.extend(host_phase(&mut vm, &frames, 2));

    // Phase 3: those killed and restarted on their sockets.
    vm.backends.restart_net();
    vm.backends.restart_console();
    vm.follow_console();
    vm.pause(Duration::from_secs(1));
    vm.tell_guest("next-2");
    problems.extend(host_phase(&mut vm, &frames, 3));

    let boot = vm.finish();
    problems.extend(guest_problems(&boot.run, 3));
    boot.assert_passed("device state across a swap and a crash", problems);
}

/// A guest `bulkhead up` runs with `bulkhead-vmm` as the frontend and blk,
/// net and console backends it supervises, in a network namespace of its
/// own; the launcher (and so everything it started) ends on drop.
struct Launched {
    launcher: ChildGuard,
    dir: Scratch,
    run: PathBuf,
    serial: PathBuf,
    hvc0: PortClient,
    named: PortClient,
    deadline: std::time::Instant,
    exit: Option<std::process::ExitStatus>,
    ns: NetNs,
}

impl Launched {
    fn up(script: &str) -> Launched {
        let ns = NetNs::new().expect("network namespace (needs root)");
        ns.add_tap(TAP, &format!("{TAP_ADDR}/24"), false)
            .expect("tap");
        let image = guest::image();
        let dir = Scratch::new(0).expect("temp dir");
        let run = dir.dir().join("run");
        std::fs::File::create(dir.dir().join("disk.img"))
            .and_then(|f| f.set_len(linux::DISK_SIZE))
            .expect("disk image");
        let initrd = linux::initrd(image, dir.dir(), &format!("{}{script}", linux::prelude()));
        let serial = dir.dir().join("serial.log");
        let cfg = dir.dir().join("vm.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"runtime_dir = "{}"
frontend = "bulkhead-vmm"
[vm]
kernel = "{}"
initrd = "{}"
cmdline = "console=ttyS0 reboot=k panic=-1 quiet"
memory = "512M"
cpus = 2
serial = "{}"
[restart]
initial_delay_ms = 200
[[blk]]
image = "disk.img"
[[net]]
tap = "{TAP}"
[[console]]
args = ["--port", "name={PORT_NAME}"]
"#,
                run.display(),
                image.kernel.display(),
                initrd.display(),
                serial.display()
            ),
        )
        .expect("write vm.toml");
        let mut cmd = ns.command(workspace_binary("bulkhead"));
        cmd.args(["up", "--config"]).arg(&cfg);
        let launcher = guest::spawn_daemon("bulkhead", &mut cmd, &dir.dir().join("launcher.log"))
            .expect("start bulkhead up (cargo build -p bulkhead-launcher)");
        let port = |name: &str| PortClient::new(run.join(format!("console0.sock.{name}")));
        Launched {
            launcher,
            hvc0: port("console"),
            named: port(PORT_NAME),
            run,
            serial,
            dir,
            deadline: std::time::Instant::now()
                + linux::BOOT_TIMEOUT.mul_f64(guest::timeout_scale()),
            exit: None,
            ns,
        }
    }

    fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).replace('\r', "")
    }

    fn pid(&self, id: &str) -> Option<i32> {
        std::fs::read_to_string(self.run.join(format!("{id}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.dir().join("launcher.log")).unwrap_or_default()
    }

    /// SIGKILLs backend `id` and waits until the launcher restarted it and
    /// the new process listens.
    fn crash(&mut self, id: &str) {
        let old = self.pid(id).unwrap_or_else(|| panic!("no pid for {id}"));
        // SAFETY: kill(2) on a backend's pid from the launcher's pid file.
        assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0, "kill {id}");
        let socket = self.run.join(format!("{id}.sock"));
        let restarted = wait_until(self, |l| {
            l.pid(id).is_some_and(|p| p != old)
                && std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        assert!(
            restarted,
            "the launcher never restarted {id}:\n{}",
            self.log()
        );
    }

    /// Waits for the guest to power off and the launcher to exit; returns
    /// the guest's report and the launcher's exit status.
    fn finish(mut self) -> (GuestRun, Option<std::process::ExitStatus>, String, String) {
        while self.poll() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.exit.is_none()
            && let Ok(Some(st)) = self.launcher.wait_timeout(Duration::from_secs(30))
        {
            self.exit = Some(st);
        }
        let run = GuestRun::parse(&self.serial());
        (run, self.exit, self.log(), self.hvc0.text())
    }
}

impl GuestHost for Launched {
    fn poll(&mut self) -> bool {
        self.hvc0.poll();
        self.named.poll();
        if self.exit.is_none()
            && let Ok(Some(st)) = self.launcher.try_wait()
        {
            self.exit = Some(st);
        }
        self.exit.is_none()
            && !self.serial().contains("@@BULKHEAD EXIT")
            && std::time::Instant::now() < self.deadline
    }
    fn reached(&self, name: &str) -> bool {
        self.serial().lines().any(|l| {
            l.trim_end()
                .ends_with(&format!("@@BULKHEAD VALUE phase {name}"))
        })
    }
    fn serial_tail(&self) -> String {
        format!(
            "{}\n--- the launcher:\n{}",
            guest::tail(&self.serial(), 60),
            guest::tail(&self.log(), 30)
        )
    }
    fn tell_guest(&self, word: &str) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options()
            .write(true)
            .open(self.dir.dir().join("disk.img"))
            .expect("open the disk image");
        f.write_all_at(word.as_bytes(), linux::MAILBOX_OFFSET)
            .and_then(|()| f.sync_all())
            .expect("write the mailbox");
    }
    fn clients(&mut self) -> (&mut PortClient, &mut PortClient) {
        (&mut self.hvc0, &mut self.named)
    }
    fn port_socket(&self, name: &str) -> PathBuf {
        self.run.join(format!("console0.sock.{name}"))
    }
}

/// The same when `bulkhead up` restarts crashed daemons: the launcher hands
/// nothing over itself; bulkhead-vmm gives each restarted daemon the
/// inflight area, whose state section holds what the driver configured.
#[test]
fn net_filter_and_console_state_survive_a_launcher_restart_under_linux() {
    if nested::delegate("net_filter_and_console_state_survive_a_launcher_restart_under_linux") {
        return;
    }
    let mut l = Launched::up(&script(2));
    let frames =
        l.ns.packet_socket(TAP, false)
            .expect("packet socket on the tap");
    let mut problems = host_phase(&mut l, &frames, 1);
    l.crash("net0");
    l.crash("console0");
    l.hvc0.reconnect();
    l.named.reconnect();
    // bulkhead-vmm reconnects to both (and replays) within its retry delay.
    let settle = std::time::Instant::now() + Duration::from_secs(2);
    wait_until(&mut l, |_| std::time::Instant::now() >= settle);
    l.tell_guest("next-1");
    problems.extend(host_phase(&mut l, &frames, 2));
    let (run, exit, log, hvc0) = l.finish();
    problems.extend(guest_problems(&run, 2));
    if !run.passed() {
        problems.insert(0, "the guest's checks did not all pass".into());
    }
    if exit.and_then(|s| s.code()) != Some(0) {
        problems.push(format!(
            "the launcher should exit 0 with the guest's power-off, not {exit:?}"
        ));
    }
    assert!(
        problems.is_empty(),
        "device state across a launcher restart:\n  {}\n{}--- hvc0:\n{}\n--- the launcher:\n{}",
        problems.join("\n  "),
        run.report(),
        guest::tail(&hvc0, 30),
        guest::tail(&log, 60)
    );
}
