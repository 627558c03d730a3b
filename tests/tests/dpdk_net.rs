//! DPDK's virtio-user PMD (`dpdk-testpmd --vdev net_virtio_user0,path=SOCK`)
//! as an independent vhost-user frontend for `bulkhead-net`: in txonly mode
//! every frame testpmd sends reaches the tap (counted by the namespace's
//! kernel); in rxonly mode every frame injected on the tap reaches testpmd.
//! The counts match on both sides and in the daemon's own counters; both
//! on split rings and on packed rings (`packed_vq=1`).
//!
//! testpmd runs non-interactively (`-i` with its commands piped in), on one
//! CPU, bounded by a timeout and killed by pid. Needs root and DPDK
//! (`dpdk-dev`, `librte-net-virtio23`, `librte-mempool-ring23`); says so when
//! skipped.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_tests::guest::die_with_parent;
use bulkhead_tests::net::{NetDaemon, ethernet};
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::ChildGuard;
use bulkhead_tests::skip::{SkipReason, skip_if};

const TAP: &str = "bhtap0";
const PMD_DIR: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";

/// Why these tests cannot run here: no namespaces and taps, or no DPDK.
fn unavailable() -> Option<SkipReason> {
    netns::unavailable().or_else(|| {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("dpdk-testpmd").exists()));
        if !found {
            return Some(SkipReason::NotInstalled(
                "dpdk-testpmd (package dpdk)".into(),
            ));
        }
        let pmd = std::fs::read_dir(PMD_DIR).ok().is_some_and(|rd| {
            rd.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("librte_net_virtio")
            })
        });
        (!pmd).then(|| {
            SkipReason::NotInstalled(format!(
                "a virtio PMD in {PMD_DIR} (package librte-net-virtio23)"
            ))
        })
    })
}

/// A running testpmd in interactive mode fed through a pipe.
struct TestPmd {
    guard: ChildGuard,
    out: Arc<Mutex<String>>,
    prefix: String,
}

impl TestPmd {
    /// Starts testpmd on `socket` in forwarding `mode`, on packed rings or
    /// split ones, and waits for its prompt.
    fn start(socket: &Path, mode: &str, packed: bool) -> TestPmd {
        let layout = if packed { "packed" } else { "split" };
        let prefix = format!("bhnet-{}-{mode}-{layout}", std::process::id());
        let mut cmd = Command::new("dpdk-testpmd");
        cmd.args(["--no-huge", "--no-pci", "--lcores", "0@0,1@0", "-m", "512"])
            .args(["--file-prefix", &prefix, "--log-level", "lib.eal:error"])
            .arg("--vdev")
            .arg(format!(
                "net_virtio_user0,path={},queues=1,queue_size=256,packed_vq={}",
                socket.display(),
                u8::from(packed)
            ))
            .args([
                "--",
                "-i",
                "--total-num-mbufs=8192",
                "--txd=256",
                "--rxd=256",
            ])
            .arg(format!("--forward-mode={mode}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let mut guard = ChildGuard::spawn("dpdk-testpmd", &mut cmd).expect("start dpdk-testpmd");
        let out = Arc::new(Mutex::new(String::new()));
        let mut stdout = guard.child_mut().stdout.take().expect("stdout pipe");
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let t = TestPmd { guard, out, prefix };
        t.wait_for("testpmd> ", Duration::from_secs(60));
        t
    }

    fn output(&self) -> String {
        self.out.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until the output contains `text` (after what was there already counts too).
    fn wait_for(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(text) {
            assert!(
                Instant::now() < deadline,
                "testpmd never printed {text:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.guard.child_mut().stdin.as_mut().expect("stdin pipe");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("write to testpmd");
    }

    /// Stops forwarding, reads port 0's (RX-packets, TX-packets), and quits.
    fn finish(mut self) -> (u64, u64, String) {
        let before = self.output().len();
        self.send("stop");
        self.send("show port stats 0");
        self.send("quit");
        let exited = self.guard.wait_timeout(Duration::from_secs(30));
        let out = self.output();
        let stats = &out[before.min(out.len())..];
        let block = stats
            .split("NIC statistics for port 0")
            .nth(1)
            .unwrap_or_else(|| {
                panic!("no port stats in testpmd output (exited: {exited:?}):\n{out}")
            });
        let field = |name: &str| -> u64 {
            block
                .split(name)
                .nth(1)
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in:\n{block}"))
        };
        (field("RX-packets:"), field("TX-packets:"), out)
    }
}

impl Drop for TestPmd {
    fn drop(&mut self) {
        let _ = self.guard.kill();
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

fn env() -> (NetNs, NetDaemon) {
    let ns = NetNs::new().expect("create a network namespace");
    // No address: the namespace's stack stays silent, so the counts are exact.
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])
        .expect("add the tap");
    ns.run(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{TAP}.disable_ipv6=1")],
    )
    .expect("disable IPv6 on the tap");
    ns.ip(&["link", "set", TAP, "up"]).expect("tap up");
    let fds = ns.open_tap_fds(TAP, 1, false).expect("open the tap");
    let daemon = NetDaemon::start_with_fds(fds, &[])
        .expect("start bulkhead-net (cargo build -p bulkhead-net)");
    (ns, daemon)
}

#[test]
fn testpmd_txonly_frames_all_reach_the_tap() {
    if skip_if("testpmd_txonly_frames_all_reach_the_tap", unavailable()) {
        return;
    }
    txonly(false);
}

#[test]
fn testpmd_txonly_frames_on_packed_rings_all_reach_the_tap() {
    if skip_if(
        "testpmd_txonly_frames_on_packed_rings_all_reach_the_tap",
        unavailable(),
    ) {
        return;
    }
    txonly(true);
}

fn txonly(packed: bool) {
    let (ns, mut daemon) = env();
    let before = ns.link_stats(TAP).unwrap();
    let mut pmd = TestPmd::start(daemon.socket(), "txonly", packed);
    pmd.send("start");
    pmd.wait_for("txonly packet forwarding", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let (_, tx, out) = pmd.finish();
    // testpmd quit: the daemon saw the disconnect and every frame is through.
    std::thread::sleep(Duration::from_millis(500));
    let after = ns.link_stats(TAP).unwrap();
    let stats = daemon.stats().unwrap();
    let at_tap = (after.rx_packets + after.rx_dropped) - (before.rx_packets + before.rx_dropped);
    eprintln!(
        "txonly (packed {packed}): testpmd sent {tx}, bulkhead-net wrote {}, the tap received {at_tap} ({} dropped by the stack)",
        stats["tx_frames"],
        after.rx_dropped - before.rx_dropped
    );
    assert!(tx > 1000, "testpmd sent only {tx} frames:\n{out}");
    assert_eq!(
        daemon.log().contains("acked packed virtqueues"),
        packed,
        "ring layout\n{}",
        daemon.log()
    );
    assert_eq!(
        stats["tx_frames"],
        tx,
        "daemon count vs testpmd\n{}",
        daemon.log()
    );
    assert_eq!(at_tap, tx, "tap count vs testpmd");
    assert_eq!(
        stats["tx_errors"] + stats["tx_bad_gso"] + stats["tx_bad_header"],
        0
    );
}

#[test]
fn frames_injected_on_the_tap_all_reach_testpmd_rxonly() {
    if skip_if(
        "frames_injected_on_the_tap_all_reach_testpmd_rxonly",
        unavailable(),
    ) {
        return;
    }
    rxonly(false);
}

#[test]
fn frames_injected_on_the_tap_all_reach_testpmd_rxonly_on_packed_rings() {
    if skip_if(
        "frames_injected_on_the_tap_all_reach_testpmd_rxonly_on_packed_rings",
        unavailable(),
    ) {
        return;
    }
    rxonly(true);
}

fn rxonly(packed: bool) {
    let (ns, mut daemon) = env();
    let mut pmd = TestPmd::start(daemon.socket(), "rxonly", packed);
    pmd.send("start");
    pmd.wait_for("rxonly packet forwarding", Duration::from_secs(10));
    let inject = ns
        .packet_socket(TAP, false)
        .expect("packet socket on the tap");
    let before = ns.link_stats(TAP).unwrap();
    const N: u64 = 5000;
    for i in 0..N {
        let mut payload = vec![0u8; 100];
        payload[..8].copy_from_slice(&i.to_be_bytes());
        let f = ethernet(
            [0x02, 0, 0, 0, 0, 0x10],
            [0x02, 0, 0, 0, 0, 0x20],
            0x88b5,
            &payload,
        );
        inject.send(&f).expect("inject a frame");
        if i % 64 == 63 {
            // Paced below what the tap queue (1000 frames) can absorb.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = ns.link_stats(TAP).unwrap();
    let (rx, _, out) = pmd.finish();
    let stats = daemon.stats().unwrap();
    let from_tap = after.tx_packets - before.tx_packets;
    let dropped = after.tx_dropped - before.tx_dropped;
    eprintln!(
        "rxonly (packed {packed}): injected {N}, the tap handed over {from_tap} ({dropped} dropped), bulkhead-net delivered {}, testpmd received {rx}",
        stats["rx_frames"]
    );
    assert_eq!(dropped, 0, "the tap queue overflowed");
    assert_eq!(from_tap, N, "tap count vs injected");
    assert_eq!(stats["rx_frames"], N, "daemon count\n{}", daemon.log());
    assert_eq!(rx, N, "testpmd count:\n{out}");
    assert_eq!(
        daemon.log().contains("acked packed virtqueues"),
        packed,
        "ring layout\n{}",
        daemon.log()
    );
}
