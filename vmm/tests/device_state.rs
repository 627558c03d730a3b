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

mod linux;

use std::time::Duration;

use bulkhead_tests::nested;
use bulkhead_tests::netns::PacketSocket;
use linux::{GUEST_ADDR, Options, PORT_NAME, TAP, TAP_ADDR, Vm};

/// Frames the host sends to a foreign MAC per phase.
const FOREIGN_FRAMES: usize = 200;
/// Most of them that may reach the guest (ARP and the like pass too).
const MAX_FOREIGN: u64 = 20;
/// How long the frames and the console input get to arrive.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the guest's console output of a phase gets to arrive.
const OUTPUT_WAIT: Duration = Duration::from_secs(10);

fn script() -> String {
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
for n in 1 2 3; do
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
  if [ $n -lt 3 ]; then await_host next-$n || fail host_next_$n "no word from the host"; fi
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

/// The host's side of phase `n`: foreign frames, console input, a resize;
/// returns what went wrong with the guest's output.
fn host_phase(vm: &mut Vm, frames: &PacketSocket, n: u16) -> Vec<String> {
    vm.await_phase(&format!("ready-{n}"));
    for i in 0..FOREIGN_FRAMES {
        frames
            .send(&foreign_frame(i))
            .expect("send a foreign frame");
    }
    assert!(
        vm.wait_until(|vm| vm.hvc0.send("\n").is_ok() && vm.named.send("").is_ok()),
        "the console's host sockets never accepted a client"
    );
    vm.hvc0
        .send(&format!("echo in >/root/hvc0-in-{n}\n"))
        .expect("type on hvc0");
    vm.named
        .send(&format!("PORT-IN-{n}\n"))
        .expect("write to the named port");
    let port = vm.backends.console_port("console");
    let reply = linux::console_ctl(&port, &format!("resize {} {}", 90 + n, 30 + n))
        .expect("resize through the console's control socket");
    assert_eq!(reply, "ok");
    vm.pause(SETTLE);
    vm.tell_guest(&format!("sent-{n}"));
    vm.await_phase(&format!("checked-{n}"));
    let (hvc0, port) = (format!("HVC0-OUT-{n}"), format!("PORT-OUT-{n}"));
    let until = std::time::Instant::now() + OUTPUT_WAIT;
    vm.wait_until(|vm| {
        (vm.hvc0.contains(&hvc0) && vm.named.contains(&port)) || std::time::Instant::now() >= until
    });
    let mut problems = Vec::new();
    for (what, ok, want) in [
        ("hvc0", vm.hvc0.contains(&hvc0), hvc0.as_str()),
        ("the named port", vm.named.contains(&port), port.as_str()),
    ] {
        if !ok {
            problems.push(format!("phase {n}: the host never read {want:?} on {what}"));
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
        script()
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
    for n in 1..=3u16 {
        let foreign: u64 = boot
            .run
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
        let got = boot.run.value(&format!("stty_{n}")).unwrap_or("-");
        if got != want {
            problems.push(format!("phase {n}: hvc0's size is {got:?}, not {want:?}"));
        }
    }
    boot.assert_passed("device state across a swap and a crash", problems);
}
