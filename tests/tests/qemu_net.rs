//! A Linux guest (QEMU TCG, `-netdev vhost-user`, `virtio-net-pci`) on
//! `bulkhead-net`, whose tap lives in a network namespace the test creates:
//! the guest pings the namespace and runs iperf3 both ways against a server
//! there; with two queue pairs and two vCPUs, both pairs carry traffic.
//!
//! The backend's own counters prove the traffic went through it (QEMU falls
//! back to its own virtio-net silently when guest RAM is not shared).
//! Needs root (namespaces, taps) and QEMU; says so when skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use bulkhead_tests::guest::{Guest, GuestRun, spawn_daemon, tail};
use bulkhead_tests::net::NetDaemon;
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::skip::{self, SkipReason, skip_if};

const TAP: &str = "bhtap0";

/// Why these tests cannot run here: no namespaces and taps, or no QEMU.
fn unavailable() -> Option<SkipReason> {
    netns::unavailable().or_else(|| {
        let qemu = std::env::var("BULKHEAD_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
        skip::needs_program(&qemu)
    })
}

/// The guest's script: address, ping, iperf3 up and down, queue checks;
/// the packed ring (feature bit 34) in use or not.
fn guest_script(pairs: usize, packed: bool) -> String {
    let mq = if pairs > 1 {
        r#"
# One ping pinned to each vCPU: XPS maps each CPU to its own tx queue, and
# the tap answers a flow on the queue it came from.
taskset 1 ping -q -c 20 -i 0.05 10.77.0.1 >/tmp/p0 2>&1 &
taskset 2 ping -q -c 20 -i 0.05 10.77.0.1 >/tmp/p1 2>&1 &
wait
cat /tmp/p0 /tmp/p1
expect_eq ping-cpu0 "$(grep -c ' 0% packet loss' /tmp/p0)" 1
expect_eq ping-cpu1 "$(grep -c ' 0% packet loss' /tmp/p1)" 1
grep virtio /proc/interrupts
for q in input.0 input.1 output.0 output.1; do
  n=$(awk -v q="$q" '$NF ~ q"$" { s = 0; for (i = 2; i < NF - 1; i++) if ($i ~ /^[0-9]+$/) s += $i; print s }' /proc/interrupts)
  value "irq-$q" "$n"
done
"#
    } else {
        ""
    };
    format!(
        r#"
expect_eq nic-present "$(ls /sys/class/net | grep -c '^eth0$')" 1
expect_eq packed-ring "$(cut -c35 /sys/class/net/eth0/device/features)" {packed}
expect_eq rx-queues "$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)" {pairs}
value mac "$(cat /sys/class/net/eth0/address)"
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
check ping ping -c 3 -W 5 10.77.0.1
iperf() {{
  name=$1; shift
  timeout 30 iperf3 -c 10.77.0.1 -t 3 -f m "$@" >/tmp/$name.txt 2>&1
  rc=$?
  cat /tmp/$name.txt
  if [ $rc -eq 0 ]; then pass $name; else fail $name "exit $rc"; fi
  value $name-mbps "$(awk '/receiver/ {{ for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i-1) }}' /tmp/$name.txt)"
}}
iperf iperf-guest-to-host
iperf iperf-host-to-guest -R
{mq}
"#,
        packed = u8::from(packed)
    )
}

/// Runs the scenario with `pairs` queue pairs, the packed ring offered
/// (`packed=on`) or not; returns the guest run and the daemon's counters.
fn scenario(pairs: usize, packed: bool) -> (GuestRun, BTreeMap<String, u64>, String) {
    let ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, "10.77.0.1/24", pairs > 1)
        .expect("add the tap");
    assert!(
        workspace_binary("bulkhead-net").exists(),
        "run `cargo build -p bulkhead-net` first"
    );
    let mut daemon = if pairs > 1 {
        NetDaemon::start_in(&ns, &["--tap", TAP, "--queue-pairs", &pairs.to_string()])
    } else {
        let fds = ns.open_tap_fds(TAP, 1, false).expect("open the tap");
        NetDaemon::start_with_fds(fds, &[])
    }
    .expect("start bulkhead-net");
    let iperf_log = daemon.dir().join("iperf3.log");
    let mut server = ns.command("iperf3");
    server.args(["-s", "-B", "10.77.0.1"]);
    let mut server = spawn_daemon("iperf3", &mut server, &iperf_log).expect("start iperf3 -s");

    let mut chardev = std::ffi::OsString::from("socket,id=n0,path=");
    chardev.push(daemon.socket());
    let (netdev, device) = if pairs > 1 {
        (
            format!("vhost-user,id=net0,chardev=n0,queues={pairs}"),
            format!("virtio-net-pci,netdev=net0,mq=on,vectors={}", 2 * pairs + 2),
        )
    } else {
        (
            "vhost-user,id=net0,chardev=n0".to_string(),
            "virtio-net-pci,netdev=net0".to_string(),
        )
    };
    let device = if packed {
        format!("{device},packed=on")
    } else {
        device
    };
    let run = Guest::new(guest_script(pairs, packed))
        .smp(pairs as u32)
        .qemu_args([
            "-chardev".into(),
            chardev,
            "-netdev".into(),
            netdev.into(),
            "-device".into(),
            device.into(),
        ])
        .timeout(Duration::from_secs(240))
        .run();
    let _ = server.kill();
    // The frontend is gone: the daemon logged its per-queue counters; ask for the totals.
    std::thread::sleep(Duration::from_millis(300));
    let stats = daemon.stats().unwrap_or_default();
    let log = daemon.log();
    if !run.passed() {
        panic!(
            "guest test failed\n{}--- bulkhead-net log:\n{}\n--- iperf3 server:\n{}",
            run.report(),
            tail(&log, 40),
            tail(&std::fs::read_to_string(&iperf_log).unwrap_or_default(), 20)
        );
    }
    eprintln!(
        "{pairs} pair(s): guest ran {:.1?}; iperf3 guest->host {} Mbit/s, host->guest {} Mbit/s",
        run.elapsed,
        run.value("iperf-guest-to-host-mbps").unwrap_or("?"),
        run.value("iperf-host-to-guest-mbps").unwrap_or("?"),
    );
    eprintln!("bulkhead-net stats: {stats:?}");
    (run, stats, log)
}

/// The traffic went through bulkhead-net (not QEMU's own virtio-net).
fn assert_through_backend(stats: &BTreeMap<String, u64>, log: &str) {
    let get = |k: &str| stats.get(k).copied().unwrap_or(0);
    // Several seconds of iperf3 each way: thousands of (mostly 64 KiB TSO) frames.
    assert!(get("tx_frames") > 1_000, "backend tx {stats:?}\n{log}");
    assert!(get("rx_frames") > 1_000, "backend rx {stats:?}\n{log}");
    assert!(log.contains("frontend connected"), "{log}");
}

/// Chains the backend took off queue `q`, from its disconnect log line.
fn queue_chains(log: &str, q: usize) -> u64 {
    let key = format!("queue {q}: ");
    log.lines()
        .filter_map(|l| l.split(&key).nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn qemu_guest_pings_and_runs_iperf3_through_bulkhead_net() {
    if skip_if(
        "qemu_guest_pings_and_runs_iperf3_through_bulkhead_net",
        unavailable(),
    ) {
        return;
    }
    let (run, stats, log) = scenario(1, false);
    assert_through_backend(&stats, &log);
    for name in ["ping", "iperf-guest-to-host", "iperf-host-to-guest"] {
        run.assert_check("one pair", name);
    }
}

#[test]
fn qemu_guest_pings_and_runs_iperf3_through_bulkhead_net_on_packed_rings() {
    if skip_if(
        "qemu_guest_pings_and_runs_iperf3_through_bulkhead_net_on_packed_rings",
        unavailable(),
    ) {
        return;
    }
    let (run, stats, log) = scenario(1, true);
    assert_through_backend(&stats, &log);
    for name in [
        "packed-ring",
        "ping",
        "iperf-guest-to-host",
        "iperf-host-to-guest",
    ] {
        run.assert_check("one pair, packed", name);
    }
}

#[test]
fn qemu_guest_uses_two_queue_pairs_of_bulkhead_net() {
    if skip_if(
        "qemu_guest_uses_two_queue_pairs_of_bulkhead_net",
        unavailable(),
    ) {
        return;
    }
    let (run, stats, log) = scenario(2, false);
    assert_through_backend(&stats, &log);
    for name in ["rx-queues", "ping", "ping-cpu0", "ping-cpu1"] {
        run.assert_check("two pairs", name);
    }
    let chains: Vec<u64> = (0..4).map(|q| queue_chains(&log, q)).collect();
    let irqs: Vec<&str> = ["input.0", "input.1", "output.0", "output.1"]
        .iter()
        .map(|q| run.value(&format!("irq-{q}")).unwrap_or("?"))
        .collect();
    eprintln!(
        "chains per queue (rx0 tx0 rx1 tx1): {chains:?}; guest interrupts (in0 in1 out0 out1): {irqs:?}"
    );
    // Both pairs' queues carried chains through the backend: rx0 tx0 rx1 tx1.
    for q in 0..4 {
        assert!(
            queue_chains(&log, q) > 0,
            "queue {q} carried nothing\n{}",
            tail(&log, 30)
        );
    }
}
