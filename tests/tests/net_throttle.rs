//! `bulkhead-net`'s limits (`--tx-pps`, `--rx-pps`, ...), with the test
//! kit's virtio-net driver and a tap in a network namespace: no more frames
//! pass than the bucket allows each way (upper bounds only, which a loaded
//! machine cannot make fail), and SIGTERM is not held up by a throttled
//! queue. Rates are measured by `bulkhead-bench`, not here.
//!
//! Run `cargo build -p bulkhead-net` first. Needs root (namespaces, taps);
//! elsewhere every test prints why it is skipped.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulkhead_tests::frontend::Options;
use bulkhead_tests::net::*;
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::skip::skip_if;
use bulkhead_tests::virtq::Buf;

const TAP: &str = "bhtap0";
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn env(args: &[&str]) -> (NetDaemon, NetNs) {
    let ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, "10.77.0.1/24", false).expect("add the tap");
    let fds = ns.open_tap_fds(TAP, 1, false).expect("open the tap queue");
    let daemon = NetDaemon::start_with_fds(fds, args)
        .expect("start bulkhead-net (run `cargo build -p bulkhead-net`)");
    (daemon, ns)
}

/// The most a bucket of `burst` refilled at `rate` per second lets through
/// in `secs` (it was full at most since the daemon started), with 20% and
/// one frame of slack.
fn allowed(rate: f64, burst: f64, secs: f64) -> f64 {
    (burst + rate * secs) * 1.2 + 1.0
}

#[test]
fn transmit_passes_no_more_frames_than_the_bucket_allows_and_sigterm_is_prompt() {
    if skip_if(
        "transmit_passes_no_more_frames_than_the_bucket_allows_and_sigterm_is_prompt",
        netns::unavailable(),
    ) {
        return;
    }
    let (mut daemon, _ns) = env(&["--tx-pps", "10", "--tx-pps-max", "10"]);
    let mut net = NetDriver::connect(daemon.socket(), &Options::default()).unwrap();
    let frame = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
    let hdr = NetHdr::default().to_bytes(net.hdr_len());
    let start = Instant::now();
    // 50 frames published at once: 10 go at once, then 10 per second.
    for _ in 0..50 {
        let h = net.dev.mem.alloc_with(&hdr).unwrap();
        let f = net.dev.mem.alloc_with(&frame).unwrap();
        let bufs = [
            Buf::readable(h, hdr.len() as u32),
            Buf::readable(f, frame.len() as u32),
        ];
        net.submit_raw(1, &bufs, false).unwrap();
    }
    net.timeout = Duration::from_millis(20);
    let mut sent = 0u32;
    while start.elapsed() < Duration::from_secs(2) {
        if net.reap_raw(1).is_ok() {
            sent += 1;
        }
    }
    let limit = allowed(10.0, 10.0, start.elapsed().as_secs_f64());
    eprintln!(
        "{sent} frames sent in {:?} (at most {limit})",
        start.elapsed()
    );
    assert!(
        f64::from(sent) <= limit,
        "{sent} frames sent; the bucket allows {limit}"
    );
    let s = daemon.stats().unwrap();
    assert!(
        s.get("throttle_delayed").copied().unwrap_or(0) >= 1,
        "{s:?}"
    );
    assert!(s.get("throttle_held").copied().unwrap_or(9) <= 1, "{s:?}");
    // About 3 s of frames are still waiting; SIGTERM does not wait for them.
    let t = Instant::now();
    assert!(
        daemon.terminate(Duration::from_secs(20)),
        "exits on SIGTERM"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "SIGTERM took {:?}",
        t.elapsed()
    );
}

#[test]
fn receive_passes_no_more_frames_than_the_bucket_allows() {
    if skip_if(
        "receive_passes_no_more_frames_than_the_bucket_allows",
        netns::unavailable(),
    ) {
        return;
    }
    let (mut daemon, ns) = env(&["--rx-pps", "20", "--rx-pps-max", "20"]);
    let mut net = NetDriver::connect(daemon.socket(), &Options::default()).unwrap();
    ns.ip(&[
        "neigh",
        "replace",
        "10.77.0.2",
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        TAP,
    ])
    .unwrap();
    net.post_rx(0, 64, 2048).unwrap();
    let blaster: UdpSocket = ns.udp_socket("10.77.0.1:0").unwrap();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            let payload = [0x5au8; 200];
            while !stop.load(Ordering::Relaxed) {
                let _ = blaster.send_to(&payload, "10.77.0.2:9");
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let mut got = 0u32;
        while start.elapsed() < Duration::from_secs(2) {
            if net.recv(0, Duration::from_millis(20)).unwrap().is_some() {
                got += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        got
    });
    let limit = allowed(20.0, 20.0, start.elapsed().as_secs_f64());
    eprintln!(
        "{got} frames received in {:?} (at most {limit})",
        start.elapsed()
    );
    assert!(
        f64::from(got) <= limit,
        "{got} frames received; the bucket allows {limit}"
    );
    assert!(daemon.is_running());
    let s = daemon.stats().unwrap();
    assert!(
        s.get("throttle_delayed").copied().unwrap_or(0) >= 1,
        "{s:?}"
    );
    assert!(daemon.terminate(Duration::from_secs(5)), "exits on SIGTERM");
}

#[test]
fn two_daemons_in_one_throttle_group_share_its_transmit_limit() {
    if skip_if(
        "two_daemons_in_one_throttle_group_share_its_transmit_limit",
        netns::unavailable(),
    ) {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-test-netgroup")
        .tempdir()
        .unwrap();
    let group = dir.path().join("group");
    let group = group.to_str().unwrap();
    let ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, "10.77.0.1/24", false).expect("add the tap");
    ns.add_tap("bhtap1", "10.78.0.1/24", false)
        .expect("add the second tap");
    let start = |tap: &str, args: &[&str]| {
        let fds = ns.open_tap_fds(tap, 1, false).expect("open the tap queue");
        NetDaemon::start_with_fds(fds, args).expect("start bulkhead-net")
    };
    // 10 frames/s with a bucket of 10 for both daemons together; the
    // second names no limits and takes the group's.
    let a = start(
        TAP,
        &[
            "--throttle-group",
            group,
            "--tx-pps",
            "10",
            "--tx-pps-max",
            "10",
        ],
    );
    let b = start("bhtap1", &["--throttle-group", group]);
    let frame = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
    let mut nets = [a.socket(), b.socket()].map(|s| {
        let mut net = NetDriver::connect(s, &Options::default()).unwrap();
        let hdr = NetHdr::default().to_bytes(net.hdr_len());
        for _ in 0..30 {
            let h = net.dev.mem.alloc_with(&hdr).unwrap();
            let f = net.dev.mem.alloc_with(&frame).unwrap();
            let bufs = [
                Buf::readable(h, hdr.len() as u32),
                Buf::readable(f, frame.len() as u32),
            ];
            net.submit_raw(1, &bufs, false).unwrap();
        }
        net.timeout = Duration::from_millis(10);
        net
    });
    let t0 = Instant::now();
    let mut sent = [0u32; 2];
    while t0.elapsed() < Duration::from_secs(2) {
        for (net, n) in nets.iter_mut().zip(sent.iter_mut()) {
            if net.reap_raw(1).is_ok() {
                *n += 1;
            }
        }
    }
    // Each daemon alone would allow this much; together no more.
    let limit = allowed(10.0, 10.0, t0.elapsed().as_secs_f64());
    let total = sent[0] + sent[1];
    assert!(
        f64::from(total) <= limit,
        "{sent:?} frames sent; the group allows {limit}"
    );
    assert!(sent[0] > 0 && sent[1] > 0, "both members sent: {sent:?}");
    drop(nets);
    // A group of blk daemons is refused, with the reason.
    ns.add_tap("bhtap2", "10.79.0.1/24", false)
        .expect("add the third tap");
    let blk_group = dir.path().join("blk-group");
    let _g = bulkhead_common::throttle_group::Group::open(
        &blk_group,
        bulkhead_common::throttle_group::GroupKind::Blk,
        bulkhead_common::throttle::Limits::NONE,
    )
    .unwrap();
    let out = ns
        .command(bulkhead_tests::process::workspace_binary("bulkhead-net"))
        .args([
            "--socket-path",
            &dir.path().join("c.sock").to_string_lossy(),
        ])
        .args(["--tap", "bhtap2", "--throttle-group"])
        .arg(&blk_group)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is a group of bulkhead-blk daemons, not bulkhead-net"),
        "{err}"
    );
}
