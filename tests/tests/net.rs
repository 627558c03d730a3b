//! Integration tests of the real `bulkhead-net` process, driven by the test
//! kit's virtio-net driver, with its tap inside a network namespace the test
//! creates (and always deletes).
//!
//! Run `cargo build -p bulkhead-net` first. Needs root (namespaces, taps);
//! elsewhere every test prints why it is skipped.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulkhead_tests::frontend::{
    Options, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use bulkhead_tests::net::*;
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::skip::skip_if;
use vhost::vhost_user::VhostUserProtocolFeatures;

const TAP: &str = "bhtap0";
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const WAIT: Duration = Duration::from_secs(5);

/// A namespace with a tap, and `bulkhead-net` serving it.
struct Env {
    daemon: NetDaemon,
    // Dropped last: the daemon must be gone before the namespace is deleted.
    ns: NetNs,
}

/// Namespace and tap `TAP` at 10.77.0.1/24 with the guest's address as a static neighbour.
fn namespace(multi_queue: bool) -> NetNs {
    let ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, "10.77.0.1/24", multi_queue)
        .expect("add the tap");
    ns
}

/// The daemon runs outside the namespace with tap fds the test opened (the unprivileged way).
fn env_fds(pairs: usize, args: &[&str]) -> Env {
    let ns = namespace(pairs > 1);
    let fds = ns
        .open_tap_fds(TAP, pairs, pairs > 1)
        .expect("open the tap queues");
    let daemon = NetDaemon::start_with_fds(fds, args)
        .expect("start bulkhead-net (run `cargo build -p bulkhead-net`)");
    Env { daemon, ns }
}

/// The daemon runs inside the namespace and opens the tap by name.
fn env_named(pairs: usize, args: &[&str]) -> Env {
    let ns = namespace(pairs > 1);
    let mut all = vec!["--tap", TAP];
    let p = pairs.to_string();
    if pairs > 1 {
        all.extend(["--queue-pairs", &p]);
    }
    all.extend(args);
    let daemon = NetDaemon::start_in(&ns, &all).expect("start bulkhead-net in the namespace");
    Env { daemon, ns }
}

fn connect(env: &Env, opts: &Options) -> NetDriver {
    NetDriver::connect(env.daemon.socket(), opts).expect("vhost-user bring-up")
}

fn endpoints(host_mac: [u8; 6]) -> Endpoints {
    Endpoints {
        src_mac: GUEST_MAC,
        dst_mac: host_mac,
        src_ip: GUEST_IP,
        dst_ip: HOST_IP,
    }
}

/// Sends an ARP request for the host on `pair`; returns the host's MAC from the reply.
fn arp(net: &mut NetDriver, pair: usize) -> [u8; 6] {
    let req = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
    net.send(pair, &NetHdr::default(), &req).expect("send ARP");
    let reply = net
        .recv_matching(WAIT, |p| {
            parse_arp_reply(&p.frame).is_some_and(|(_, ip)| ip == HOST_IP)
        })
        .expect("receive")
        .expect("no ARP reply from the namespace");
    assert_eq!(&reply.frame[0..6], &GUEST_MAC, "reply goes to the guest");
    parse_arp_reply(&reply.frame)
        .map(|(m, _)| m)
        .unwrap_or_default()
}

/// Pings the host on `pair` with `len` payload bytes; returns the reply packet.
fn ping(net: &mut NetDriver, pair: usize, host_mac: [u8; 6], id: u16, len: usize) -> RxPacket {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let req = icmp_echo(&endpoints(host_mac), id, 1, &payload);
    net.send(pair, &NetHdr::default(), &req).expect("send echo");
    let reply = net
        .recv_matching(WAIT, |p| {
            parse_echo_reply(&p.frame).is_some_and(|(i, _, _)| i == id)
        })
        .expect("receive")
        .unwrap_or_else(|| panic!("no echo reply for id {id}"));
    let (_, _, n) = parse_echo_reply(&reply.frame).unwrap_or_default();
    assert_eq!(n, len, "echo reply payload length");
    assert!(
        reply.frame.ends_with(&payload),
        "echo reply carries the payload"
    );
    reply
}

fn stat(s: &BTreeMap<String, u64>, k: &str) -> u64 {
    *s.get(k)
        .unwrap_or_else(|| panic!("no counter {k} in {s:?}"))
}

/// The daemon is alive and serves a fresh connection: ARP is answered.
fn assert_still_serving(env: &mut Env) {
    assert!(
        env.daemon.is_running(),
        "bulkhead-net died:\n{}",
        env.daemon.log()
    );
    let mut net = connect(env, &Options::default());
    for pair in 0..net.pairs {
        net.post_rx(pair, 16, 2048).unwrap();
    }
    arp(&mut net, 0);
}

#[test]
fn offers_the_documented_features_config_and_capabilities() {
    if skip_if(
        "offers_the_documented_features_config_and_capabilities",
        netns::unavailable(),
    ) {
        return;
    }
    let env = env_named(2, &["--mac", "52:54:00:aa:bb:cc", "--mtu", "1400"]);
    let net = connect(&env, &Options::default());
    let offered = net.dev.offered_features;
    for (name, bit) in [
        ("VERSION_1", VIRTIO_F_VERSION_1),
        ("MAC", VIRTIO_NET_F_MAC),
        ("MTU", VIRTIO_NET_F_MTU),
        ("STATUS", VIRTIO_NET_F_STATUS),
        ("CSUM", VIRTIO_NET_F_CSUM),
        ("GUEST_CSUM", VIRTIO_NET_F_GUEST_CSUM),
        ("GUEST_TSO4", VIRTIO_NET_F_GUEST_TSO4),
        ("GUEST_TSO6", VIRTIO_NET_F_GUEST_TSO6),
        ("GUEST_ECN", VIRTIO_NET_F_GUEST_ECN),
        ("GUEST_UFO", VIRTIO_NET_F_GUEST_UFO),
        ("HOST_TSO4", VIRTIO_NET_F_HOST_TSO4),
        ("HOST_TSO6", VIRTIO_NET_F_HOST_TSO6),
        ("HOST_ECN", VIRTIO_NET_F_HOST_ECN),
        ("HOST_UFO", VIRTIO_NET_F_HOST_UFO),
        ("MRG_RXBUF", VIRTIO_NET_F_MRG_RXBUF),
        ("CTRL_VQ", VIRTIO_NET_F_CTRL_VQ),
        ("CTRL_RX", VIRTIO_NET_F_CTRL_RX),
        ("MQ", VIRTIO_NET_F_MQ),
        ("EVENT_IDX", VIRTIO_RING_F_EVENT_IDX),
        ("INDIRECT_DESC", VIRTIO_RING_F_INDIRECT_DESC),
    ] {
        assert!(offered & bit != 0, "feature {name} not offered");
    }
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(net.dev.offered_protocol.contains(want));
    assert_eq!(net.dev.queue_num, 5, "rx0 tx0 rx1 tx1 ctrl");
    assert_eq!(net.config.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    assert_eq!(net.config.status & 1, 1, "link up");
    assert_eq!(net.config.max_virtqueue_pairs, 2);
    assert_eq!(net.config.mtu, 1400);

    let bin = workspace_binary("bulkhead-net");
    let caps = std::process::Command::new(&bin)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&caps.stdout).unwrap();
    assert_eq!(v["type"], "net");
    let help = std::process::Command::new(&bin)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let doc = std::fs::read_to_string(bulkhead_tests::guest::repo_root().join("docs/net.md"))
        .expect("docs/net.md");
    for flag in [
        "--socket-path",
        "--fd",
        "--print-capabilities",
        "--tap",
        "--tap-fd",
        "--mac",
        "--mtu",
        "--queue-pairs",
        "--queue-size",
        "--poll-max-us",
        "--stats-socket",
        "--rx-pps",
        "--rx-pps-max",
        "--rx-bps",
        "--rx-bps-max",
        "--tx-pps",
        "--tx-pps-max",
        "--tx-bps",
        "--tx-bps-max",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        assert!(doc.contains(flag), "docs/net.md lacks {flag}");
    }
}

#[test]
fn arp_and_icmp_echo_sent_on_tx_are_answered_on_rx_with_tap_fds() {
    if skip_if(
        "arp_and_icmp_echo_sent_on_tx_are_answered_on_rx_with_tap_fds",
        netns::unavailable(),
    ) {
        return;
    }
    let mut env = env_fds(1, &[]);
    let mut net = connect(&env, &Options::default());
    assert!(net.mergeable());
    net.post_rx(0, 64, 2048).unwrap();
    let host_mac = arp(&mut net, 0);
    for id in 1..=5 {
        ping(&mut net, 0, host_mac, id, 56);
    }
    let tap = env.ns.link_stats(TAP).unwrap();
    assert!(tap.rx_packets >= 6, "the tap saw our frames: {tap:?}");
    let s = env.daemon.stats().unwrap();
    assert!(
        stat(&s, "tx_frames") >= 6 && stat(&s, "rx_frames") >= 6,
        "{s:?}"
    );
}

#[test]
fn receive_without_mergeable_buffers_uses_one_buffer_per_packet() {
    if skip_if(
        "receive_without_mergeable_buffers_uses_one_buffer_per_packet",
        netns::unavailable(),
    ) {
        return;
    }
    let mut env = env_fds(1, &[]);
    let opts = Options::default().feature(VIRTIO_NET_F_MRG_RXBUF, false);
    let mut net = connect(&env, &opts);
    assert!(!net.mergeable());
    assert_eq!(net.hdr_len(), 12, "VERSION_1 header");
    net.post_rx(0, 32, 1526).unwrap();
    let host_mac = arp(&mut net, 0);
    let reply = ping(&mut net, 0, host_mac, 9, 1400);
    assert_eq!(reply.buffers, 1);
    // A buffer too small for a packet without MRG_RXBUF: dropped, counted, buffer kept.
    drop(net);
    let mut small = connect(&env, &opts);
    small.post_rx(0, 8, 200).unwrap();
    let req = icmp_echo(&endpoints(host_mac), 10, 1, &[7u8; 1000]);
    small.send(0, &NetHdr::default(), &req).unwrap();
    let got = small.recv_matching(Duration::from_secs(1), |p| {
        parse_echo_reply(&p.frame).is_some()
    });
    assert!(
        got.unwrap().is_none(),
        "a 1042-byte reply cannot fit 200 bytes"
    );
    let s = env.daemon.stats().unwrap();
    assert!(stat(&s, "rx_too_big") >= 1, "{s:?}");
}

#[test]
fn receive_with_mergeable_buffers_spans_several_small_buffers() {
    if skip_if(
        "receive_with_mergeable_buffers_spans_several_small_buffers",
        netns::unavailable(),
    ) {
        return;
    }
    let env = env_fds(1, &[]);
    let mut net = connect(&env, &Options::default().indirect(false));
    net.post_rx(0, 128, 256).unwrap();
    let host_mac = arp(&mut net, 0);
    let reply = ping(&mut net, 0, host_mac, 11, 1400);
    // 12 + 14 + 20 + 8 + 1400 bytes over 256-byte buffers.
    assert_eq!(reply.buffers, 6, "num_buffers");
    assert_eq!(usize::from(reply.hdr.num_buffers), reply.buffers);
}

#[test]
fn checksum_offload_frames_with_needs_csum_reach_a_socket_in_the_namespace() {
    if skip_if(
        "checksum_offload_frames_with_needs_csum_reach_a_socket_in_the_namespace",
        netns::unavailable(),
    ) {
        return;
    }
    let env = env_fds(1, &[]);
    let mut net = connect(&env, &Options::default());
    net.post_rx(0, 32, 2048).unwrap();
    let host_mac = arp(&mut net, 0);
    let sock = env.ns.udp_socket("10.77.0.1:7777").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let ep = endpoints(host_mac);
    let hdr = NetHdr {
        flags: NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 6,
        ..NetHdr::default()
    };
    net.send(0, &hdr, &udp(&ep, 5555, 7777, b"partial checksum", true))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = sock
        .recv(&mut buf)
        .expect("datagram with NEEDS_CSUM delivered");
    assert_eq!(&buf[..n], b"partial checksum");
    // The same partial checksum without NEEDS_CSUM is a bad checksum: the stack drops it.
    net.send(0, &NetHdr::default(), &udp(&ep, 5555, 7777, b"bad", true))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(sock.recv(&mut buf).is_err(), "bad checksum must be dropped");
    // And a fully checksummed datagram passes without offload.
    net.send(0, &NetHdr::default(), &udp(&ep, 5555, 7777, b"full", false))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let n = sock.recv(&mut buf).expect("checksummed datagram");
    assert_eq!(&buf[..n], b"full");
}

#[test]
fn tso_frames_reach_the_tap_as_one_gso_packet() {
    if skip_if(
        "tso_frames_reach_the_tap_as_one_gso_packet",
        netns::unavailable(),
    ) {
        return;
    }
    let env = env_fds(1, &[]);
    let mut net = connect(&env, &Options::default());
    net.post_rx(0, 32, 2048).unwrap();
    let host_mac = arp(&mut net, 0);
    let cap = env.ns.packet_socket(TAP, true).unwrap();
    let payload: Vec<u8> = (0..4000).map(|i| (i % 13) as u8).collect();
    let frame = tcp_partial(&endpoints(host_mac), 40000, 5001, 1000, &payload);
    let hdr = NetHdr {
        flags: NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    net.send(0, &hdr, &frame).unwrap();
    let deadline = Instant::now() + WAIT;
    let got = loop {
        let c = cap
            .recv(deadline.saturating_duration_since(Instant::now()))
            .unwrap()
            .expect("the TSO frame reaches the tap");
        if c.frame.len() > 1500 {
            break c;
        }
    };
    assert_eq!(got.frame, frame, "one GSO packet, bytes intact");
    let h = NetHdr::parse(&got.vnet_hdr.unwrap());
    assert_eq!((h.gso_type, h.gso_size), (GSO_TCPV4, 1448), "{h:?}");
}

#[test]
fn two_queue_pairs_carry_traffic_and_the_control_queue_sets_them() {
    if skip_if(
        "two_queue_pairs_carry_traffic_and_the_control_queue_sets_them",
        netns::unavailable(),
    ) {
        return;
    }
    let mut env = env_named(2, &[]);
    let mut net = connect(&env, &Options::default());
    assert_eq!((net.pairs, net.has_ctrl), (2, true));
    assert_eq!(
        net.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &2u16.to_le_bytes())
            .unwrap(),
        CTRL_OK
    );
    for pair in 0..2 {
        net.post_rx(pair, 32, 2048).unwrap();
    }
    let host_mac = arp(&mut net, 0);
    let mut seen = [0usize; 2];
    for id in 0..16u16 {
        let pair = usize::from(id % 2);
        let r = ping(&mut net, pair, host_mac, 100 + id, 64);
        seen[r.pair] += 1;
    }
    assert!(
        seen[0] > 0 && seen[1] > 0,
        "replies arrived on both rx queues: {seen:?}"
    );
    let s = env.daemon.stats().unwrap();
    assert_eq!(stat(&s, "ctrl_ok"), 1);
    drop(net);
    // The daemon logged per-queue counters at disconnect: both tx queues carried frames.
    let deadline = Instant::now() + WAIT;
    while !env.daemon.log().contains("queue 3:") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = env.daemon.log();
    assert!(
        log.contains("queue 1:") && log.contains("queue 3:"),
        "{log}"
    );
}

#[test]
fn back_pressure_without_rx_buffers_bounds_memory_and_traffic_resumes() {
    if skip_if(
        "back_pressure_without_rx_buffers_bounds_memory_and_traffic_resumes",
        netns::unavailable(),
    ) {
        return;
    }
    let mut env = env_fds(1, &[]);
    let mut net = connect(&env, &Options::default());
    net.post_rx(0, 4, 2048).unwrap();
    let host_mac = arp(&mut net, 0);
    // Nothing posted now. The namespace floods the guest with UDP for 2 s.
    while net.recv(0, Duration::from_millis(100)).unwrap().is_some() {}
    env.ns
        .ip(&[
            "neigh",
            "replace",
            "10.77.0.2",
            "lladdr",
            "52:54:00:12:34:56",
            "dev",
            TAP,
        ])
        .unwrap();
    let rss_before = env.daemon.rss_kib().unwrap();
    let blaster: UdpSocket = env.ns.udp_socket("10.77.0.1:0").unwrap();
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        let t = s.spawn(|| {
            let mut n = 0u64;
            let payload = [0x5au8; 1200];
            while !stop.load(Ordering::Relaxed) {
                if blaster.send_to(&payload, "10.77.0.2:9").is_ok() {
                    n += 1;
                }
            }
            n
        });
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap()
    });
    let rss_after = env.daemon.rss_kib().unwrap();
    let tap = env.ns.link_stats(TAP).unwrap();
    eprintln!(
        "flood: {sent} datagrams sent, tap {tap:?}, daemon RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(sent > 1000, "the flood ran ({sent})");
    assert!(
        tap.tx_dropped > 0,
        "the tap queue filled and dropped: {tap:?}"
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "daemon RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert!(env.daemon.is_running());
    let s = env.daemon.stats().unwrap();
    assert!(stat(&s, "rx_stalls") >= 1, "{s:?}");
    // Buffers again: what the tap queued is delivered, then ping works.
    let mut drained = 0;
    loop {
        net.post_rx(0, 64, 2048).unwrap();
        let mut got = 0;
        while net.recv(0, Duration::from_millis(300)).unwrap().is_some() {
            got += 1;
        }
        drained += got;
        if got < 64 {
            break;
        }
    }
    eprintln!("delivered {drained} queued frames after buffers came back");
    assert!(drained > 0, "traffic resumes when buffers come");
    net.post_rx(0, 16, 2048).unwrap();
    ping(&mut net, 0, host_mac, 77, 100);
}

#[test]
fn malformed_tx_frames_are_dropped_and_counted_and_the_daemon_keeps_serving() {
    if skip_if(
        "malformed_tx_frames_are_dropped_and_counted_and_the_daemon_keeps_serving",
        netns::unavailable(),
    ) {
        return;
    }
    let mut env = env_fds(1, &[]);
    let mut net = connect(&env, &Options::default());
    net.post_rx(0, 16, 2048).unwrap();
    let host_mac = arp(&mut net, 0);
    let ep = endpoints(host_mac);
    let frame = icmp_echo(&ep, 1, 1, &[0u8; 64]);
    let with_hdr = |h: &NetHdr, f: &[u8]| {
        let mut b = h.to_bytes(12);
        b.extend_from_slice(f);
        b
    };
    let before = env.daemon.stats().unwrap();
    // Shorter than the 12-byte header.
    net.send_bytes(0, &[0u8; 7], 1).unwrap();
    // A header and a 10-byte runt.
    net.send_bytes(0, &with_hdr(&NetHdr::default(), &[0u8; 10]), 2)
        .unwrap();
    // More than 64 KiB of frame.
    let big = vec![0u8; 12 + 65536 + 100];
    net.send_bytes(0, &big, 4).unwrap();
    // Unknown GSO type.
    let bad_type = NetHdr {
        flags: NEEDS_CSUM,
        gso_type: 7,
        gso_size: 1448,
        hdr_len: 54,
        csum_start: 34,
        csum_offset: 16,
        ..NetHdr::default()
    };
    net.send_bytes(0, &with_hdr(&bad_type, &frame), 1).unwrap();
    // GSO hdr_len beyond the frame, and gso_size zero.
    let bad_len = NetHdr {
        gso_type: GSO_TCPV4,
        hdr_len: 5000,
        ..bad_type
    };
    net.send_bytes(0, &with_hdr(&bad_len, &frame), 1).unwrap();
    let zero_size = NetHdr {
        gso_type: GSO_TCPV4,
        gso_size: 0,
        ..bad_type
    };
    net.send_bytes(0, &with_hdr(&zero_size, &frame), 1).unwrap();
    // Checksum position outside the frame; unknown flag bits.
    let bad_csum = NetHdr {
        flags: NEEDS_CSUM,
        csum_start: 90,
        csum_offset: 60,
        ..NetHdr::default()
    };
    net.send_bytes(0, &with_hdr(&bad_csum, &frame), 1).unwrap();
    let bad_flags = NetHdr {
        flags: 0x80,
        ..NetHdr::default()
    };
    net.send_bytes(0, &with_hdr(&bad_flags, &frame), 1).unwrap();
    let after = env.daemon.stats().unwrap();
    let delta = |k: &str| stat(&after, k) - stat(&before, k);
    assert_eq!(delta("tx_too_short"), 2, "{after:?}");
    assert_eq!(delta("tx_too_big"), 1, "{after:?}");
    assert_eq!(delta("tx_bad_gso"), 3, "{after:?}");
    assert_eq!(delta("tx_bad_header"), 2, "{after:?}");
    assert_eq!(delta("tx_frames"), 0, "nothing malformed reached the tap");
    ping(&mut net, 0, host_mac, 5, 32);
    drop(net);
    assert_still_serving(&mut env);
}

#[test]
fn malformed_and_unknown_control_commands_are_refused_and_counted() {
    if skip_if(
        "malformed_and_unknown_control_commands_are_refused_and_counted",
        netns::unavailable(),
    ) {
        return;
    }
    let mut env = env_named(2, &[]);
    let mut net = connect(&env, &Options::default());
    let before = env.daemon.stats().unwrap();
    // Unknown class, unknown command of a known class.
    assert_eq!(net.ctrl(42, 0, &[]).unwrap(), CTRL_ERR);
    assert_eq!(net.ctrl(CTRL_RX, 9, &[1]).unwrap(), CTRL_ERR);
    // Malformed: wrong lengths and values.
    assert_eq!(net.ctrl(CTRL_RX, CTRL_RX_PROMISC, &[]).unwrap(), CTRL_ERR);
    assert_eq!(net.ctrl(CTRL_RX, CTRL_RX_PROMISC, &[2]).unwrap(), CTRL_ERR);
    assert_eq!(
        net.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &0u16.to_le_bytes())
            .unwrap(),
        CTRL_ERR
    );
    assert_eq!(
        net.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &3u16.to_le_bytes())
            .unwrap(),
        CTRL_ERR
    );
    assert_eq!(
        net.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &[1]).unwrap(),
        CTRL_ERR
    );
    let mut table = 1000u32.to_le_bytes().to_vec();
    table.extend([0u8; 12]);
    assert_eq!(
        net.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, &table).unwrap(),
        CTRL_ERR
    );
    // Only one byte: no command header. No ack byte at all.
    let (used, ack) = net.ctrl_raw(&[CTRL_RX], 1).unwrap();
    assert_eq!((used, ack), (1, CTRL_ERR));
    let (used, _) = net.ctrl_raw(&[CTRL_RX, CTRL_RX_PROMISC, 1], 0).unwrap();
    assert_eq!(used, 0);
    // Valid ones still work.
    assert_eq!(net.ctrl(CTRL_RX, CTRL_RX_ALLMULTI, &[1]).unwrap(), CTRL_OK);
    let mut ok_table = 1u32.to_le_bytes().to_vec();
    ok_table.extend([0x02, 0, 0, 0, 0, 9]);
    ok_table.extend(1u32.to_le_bytes());
    ok_table.extend([0x01, 0, 0x5e, 0, 0, 1]);
    assert_eq!(
        net.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, &ok_table).unwrap(),
        CTRL_OK
    );
    let after = env.daemon.stats().unwrap();
    let delta = |k: &str| stat(&after, k) - stat(&before, k);
    assert_eq!(delta("ctrl_unsupported"), 2, "{after:?}");
    assert_eq!(delta("ctrl_malformed"), 8, "{after:?}");
    assert_eq!(delta("ctrl_ok"), 2, "{after:?}");
    drop(net);
    assert_still_serving(&mut env);
}

#[test]
fn receive_filter_drops_other_unicast_after_promiscuous_mode_is_turned_off() {
    if skip_if(
        "receive_filter_drops_other_unicast_after_promiscuous_mode_is_turned_off",
        netns::unavailable(),
    ) {
        return;
    }
    let mut env = env_fds(1, &["--mac", "52:54:00:12:34:56"]);
    let mut net = connect(&env, &Options::default());
    net.post_rx(0, 32, 2048).unwrap();
    let inject = env.ns.packet_socket(TAP, false).unwrap();
    let other = ethernet(
        [0x02, 0, 0, 0, 0, 0x99],
        [0x02, 0, 0, 0, 0, 1],
        0x88b5,
        &[1u8; 50],
    );
    let mine = ethernet(GUEST_MAC, [0x02, 0, 0, 0, 0, 1], 0x88b5, &[2u8; 50]);
    inject.send(&other).unwrap();
    let got = net.recv_matching(WAIT, |p| p.frame == other).unwrap();
    assert!(got.is_some(), "promiscuous by default");
    assert_eq!(net.ctrl(CTRL_RX, CTRL_RX_PROMISC, &[0]).unwrap(), CTRL_OK);
    inject.send(&other).unwrap();
    inject.send(&mine).unwrap();
    let got = net
        .recv_matching(WAIT, |p| p.frame[12..14] == [0x88, 0xb5])
        .unwrap()
        .expect("the frame for our MAC arrives");
    assert_eq!(got.frame, mine, "the frame for another MAC was filtered");
    let s = env.daemon.stats().unwrap();
    assert_eq!(stat(&s, "rx_filtered"), 1, "{s:?}");
}

#[test]
fn daemon_serves_a_new_connection_after_a_disconnect_and_exits_on_sigterm() {
    if skip_if(
        "daemon_serves_a_new_connection_after_a_disconnect_and_exits_on_sigterm",
        netns::unavailable(),
    ) {
        return;
    }
    let mut env = env_fds(1, &[]);
    for _ in 0..3 {
        let mut net = connect(&env, &Options::default().event_idx(false));
        net.post_rx(0, 16, 2048).unwrap();
        let mac = arp(&mut net, 0);
        ping(&mut net, 0, mac, 3, 10);
    }
    assert!(
        env.daemon.log().contains("stats: rx_frames="),
        "counters logged at disconnect"
    );
    assert!(
        env.daemon.terminate(Duration::from_secs(5)),
        "exits on SIGTERM"
    );
}

#[test]
fn tap_is_created_by_name_when_absent() {
    if skip_if("tap_is_created_by_name_when_absent", netns::unavailable()) {
        return;
    }
    let ns = NetNs::new().unwrap();
    let mut d = NetDaemon::start_in(&ns, &["--tap", "bhnew0"]).expect("start");
    let links = ns
        .ip(&["-o", "link", "show", "bhnew0"])
        .expect("bhnew0 exists");
    assert!(links.contains("bhnew0"), "{links}");
    assert!(d.is_running());
    // A socket that is not a tap is refused.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let fd = std::os::fd::OwnedFd::from(sock);
    let r = NetDaemon::start_with_fds(vec![fd], &[]);
    assert!(
        r.is_err(),
        "a UDP socket passed as --tap-fd must be refused"
    );
}

#[test]
fn a_missing_tap_without_cap_net_admin_says_so_and_how_to_make_one() {
    let scratch = bulkhead_tests::daemon::Scratch::new(0).unwrap();
    let bin = workspace_binary("bulkhead-net");
    // SAFETY: geteuid has no side effects and cannot fail.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        // Root has CAP_NET_ADMIN: drop it, as an unprivileged daemon lacks it.
        let mut c = std::process::Command::new("setpriv");
        c.args(["--bounding-set=-net_admin", "--"]).arg(&bin);
        c
    } else {
        std::process::Command::new(&bin)
    };
    let out = cmd
        .arg("--socket-path")
        .arg(scratch.socket())
        .args(["--tap", "bhnotap0", "--sandbox", "off"])
        .output()
        .expect("run bulkhead-net");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("tap bhnotap0 does not exist"), "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert!(err.contains("ip tuntap add dev bhnotap0"), "{err}");
    assert!(err.contains("--tap-fd"), "{err}");
}
