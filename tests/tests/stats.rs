//! `--stats-socket` of every daemon: after I/O through the test kit's
//! drivers, `stats` answers one JSON line whose counters grew by the I/O
//! done and `metrics` answers text that passes the kit's strict Prometheus
//! checker ([`bulkhead_tests::stats::check_exposition`]); hostile clients
//! (an over-long line, silence, a trickle, too many at once) neither stop
//! the socket nor the daemon's I/O.
//!
//! Run `cargo build -p bulkhead-blk -p bulkhead-net -p bulkhead-console`
//! first. The net test needs root (a namespace and a tap); it is skipped
//! elsewhere. The daemons run in their default sandbox (`--sandbox
//! enforce`), so a system call the stats thread makes outside the seccomp
//! allow-list kills the daemon and fails the test.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_tests::blk::{BlkDriver, Payload, Request, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use bulkhead_tests::console::{ConsoleDaemon, ConsoleDriver, HostAddr, TIMEOUT, read_n};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::Options;
use bulkhead_tests::net::{NetDaemon, NetDriver, NetHdr, arp_request, parse_arp_reply};
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::process::wait_for_path;
use bulkhead_tests::skip::skip_if;
use bulkhead_tests::stats::{self, check_exposition};

const IMAGE_SIZE: u64 = 16 << 20;
/// The daemon's per-client deadline (`common::stats_socket::CLIENT_DEADLINE`) and some slack.
const CLIENT_DEADLINE: Duration = Duration::from_secs(2);

fn stats_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bulkhead-stats-")
        .tempdir()
        .expect("temp dir")
}

fn start_blk(stats: &Path, extra: &[&str]) -> Daemon {
    let s = stats.to_str().expect("utf-8 path");
    let mut args = vec!["--stats-socket", s];
    args.extend(extra);
    let d = Daemon::blk(Scratch::new(IMAGE_SIZE).expect("scratch"), &args)
        .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)");
    wait_for_path(stats, Duration::from_secs(5)).expect("stats socket");
    d
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no counter {k} in {v}"))
}

/// `metrics` passes the strict checker, and every JSON counter appears in
/// it with the same value (`name_total` for a counter).
fn check_metrics(socket: &Path, prefix: &str) -> bulkhead_tests::stats::Exposition {
    let json = stats::stats(socket).expect("stats");
    let text = stats::metrics(socket).expect("metrics");
    let exp = check_exposition(&text, prefix).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let obj = json.as_object().expect("stats is an object");
    assert!(!obj.is_empty(), "no counters");
    for (k, v) in obj {
        let counter = format!("{prefix}{k}_total");
        if exp.types.get(&counter).map(String::as_str) != Some("counter") {
            // Not a counter: then a gauge (a throttle's held requests).
            let gauge = format!("{prefix}{k}");
            let ty = exp.types.get(&gauge).map(String::as_str);
            assert_eq!(
                ty,
                Some("gauge"),
                "{k}: neither {counter} nor {gauge} in\n{text}"
            );
            continue;
        }
        if let Some(n) = v.as_u64() {
            // The counters only grow between the two requests.
            let m = exp
                .value(&counter, &[])
                .unwrap_or_else(|| panic!("no {counter}"));
            assert!(m >= n as f64, "{counter}: {m} < {n}");
        }
    }
    exp
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn blk_stats_count_the_requests_done_and_metrics_are_valid_prometheus_text() {
    let dir = stats_dir();
    let sock = dir.path().join("stats.sock");
    let mut d = start_blk(&sock, &[]);
    let mut blk = BlkDriver::connect(d.socket(), &Options::default()).expect("bring-up");
    let before = stats::stats(&sock).expect("stats");
    for i in 0..5u64 {
        assert_eq!(
            blk.write(0, i * 8, &pattern(4096)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(blk.read(0, i * 8, 4096).unwrap().0, VIRTIO_BLK_S_OK);
    }
    let bad = Request::new(0x7777, 0, Payload::In(512));
    assert_eq!(blk.run(0, &bad).unwrap().status, VIRTIO_BLK_S_UNSUPP);
    let after = stats::stats(&sock).expect("stats");
    assert_eq!(
        u(&after, "ok") - u(&before, "ok"),
        10,
        "{before} -> {after}"
    );
    assert_eq!(
        u(&after, "unsupported") - u(&before, "unsupported"),
        1,
        "{after}"
    );
    assert_eq!(u(&after, "ioerr"), 0);
    assert_eq!(u(&after, "malformed"), 0);
    // The common crate's per-queue counters, labelled by queue.
    let chains = |v: &serde_json::Value| {
        assert_eq!(v["queue_chains"][0]["queue"], "0", "{v}");
        v["queue_chains"][0]["value"]
            .as_u64()
            .expect("queue_chains")
    };
    assert_eq!(chains(&after) - chains(&before), 11, "{after}");

    let exp = check_metrics(&sock, "bulkhead_blk_");
    assert_eq!(
        exp.value("bulkhead_blk_ok_total", &[]),
        Some(u(&after, "ok") as f64)
    );
    // Several requests on one connection: `stats` keeps it open.
    let c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    (&c).write_all(b"stats\nstats\n").unwrap();
    let mut r = std::io::BufReader::new(&c);
    for _ in 0..2 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        assert_eq!(u(&v, "ok"), u(&after, "ok"));
    }
    // A disconnect keeps them: counters only grow while the daemon runs.
    drop(blk);
    drop(r);
    let _ = BlkDriver::connect(d.socket(), &Options::default()).expect("bring-up");
    let later = stats::stats(&sock).expect("stats");
    assert!(chains(&later) >= chains(&after), "{later}");
    let exp = check_metrics(&sock, "bulkhead_blk_");
    assert!(
        exp.value("bulkhead_blk_queue_chains_total", &[("queue", "0")])
            .is_some_and(|v| v >= chains(&after) as f64)
    );
    assert!(d.is_running());
}

#[test]
fn hostile_stats_clients_neither_hold_the_socket_nor_stop_io() {
    let dir = stats_dir();
    let sock = dir.path().join("stats.sock");
    let mut d = start_blk(&sock, &[]);

    // An over-long line: an error line, then closed.
    let answer = stats::request(&sock, &[b'x'; 64 * 1024]).expect("answer");
    assert!(
        answer.starts_with("error: request line longer than"),
        "{answer:?}"
    );
    // Unknown and binary requests: a clear error line.
    for req in [&b"shutdown\n"[..], b"\x00\xff\xfe\n", b"STATS\n"] {
        let a = stats::request(&sock, req).expect("answer");
        assert!(a.starts_with("error: unknown request"), "{req:?}: {a:?}");
    }

    // One client that trickles a byte at a time, never a whole line, and
    // many silent ones: the first 8 are held, the others told busy.
    let trickle = UnixStream::connect(&sock).unwrap();
    let held_since = Instant::now();
    let silent: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    // One more is told the socket is busy instead of waiting.
    std::thread::sleep(Duration::from_millis(200));
    let busy = stats::request(&sock, b"stats\n").expect("answer");
    assert_eq!(busy, "error: busy, try again\n");
    let told_busy = stats::request(&sock, b"").expect("answer");
    assert_eq!(told_busy, "error: busy, try again\n");

    // I/O goes on meanwhile.
    let mut blk = BlkDriver::connect(d.socket(), &Options::default()).expect("bring-up");
    for i in 0..8u64 {
        (&trickle).write_all(b"s").expect("the trickle is held");
        assert_eq!(blk.write(0, i, &pattern(512)).unwrap(), VIRTIO_BLK_S_OK);
        assert_eq!(
            blk.read(0, i, 512).unwrap(),
            (VIRTIO_BLK_S_OK, pattern(512))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Trickled bytes do not extend the deadline: the daemon closes it.
    while (&trickle).write_all(b"s").is_ok() {
        assert!(
            held_since.elapsed() < CLIENT_DEADLINE * 3,
            "a trickle held for {:?}",
            held_since.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every silent client held is closed by its deadline too.
    for c in silent.iter().take(7) {
        c.set_read_timeout(Some(CLIENT_DEADLINE * 3)).unwrap();
        let mut rest = Vec::new();
        (&*c).read_to_end(&mut rest).expect("closed, not timed out");
        assert!(rest.is_empty(), "a silent client got {rest:?}");
    }
    assert!(
        held_since.elapsed() < CLIENT_DEADLINE * 3,
        "held for {:?}",
        held_since.elapsed()
    );
    drop(silent);

    // And the socket serves again, the daemon alive and counting.
    let deadline = Instant::now() + TIMEOUT;
    let v = loop {
        match stats::stats(&sock) {
            Ok(v) => break v,
            Err(e) => assert!(Instant::now() < deadline, "no stats after the flood: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(u(&v, "ok"), 16);
    assert!(d.is_running(), "bulkhead-blk died");
}

#[test]
fn a_stale_stats_socket_is_replaced_and_removed_at_exit_outside_the_sandbox() {
    let dir = stats_dir();
    let sock = dir.path().join("stats.sock");
    // A socket file left by a daemon killed before it could remove it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut d = start_blk(&sock, &["--sandbox", "off"]);
    stats::stats(&sock).expect("the new daemon answers on the old path");
    d.guard_mut().signal(libc::SIGTERM).unwrap();
    let st = d.guard_mut().wait_timeout(TIMEOUT).unwrap();
    assert!(st.is_some_and(|s| s.success()), "exit {st:?}");
    assert!(!sock.exists(), "the stats socket outlived the daemon");
}

#[test]
fn a_stats_socket_path_that_is_a_file_fails_the_start_and_keeps_the_file() {
    let dir = stats_dir();
    let file = dir.path().join("precious");
    std::fs::write(&file, b"keep").unwrap();
    // The vhost-user socket may appear first: the start fails just after.
    if let Ok(mut d) = Daemon::blk(
        Scratch::new(IMAGE_SIZE).unwrap(),
        &["--stats-socket", file.to_str().unwrap()],
    ) {
        let st = d.guard_mut().wait_timeout(TIMEOUT).unwrap();
        assert_eq!(
            st.and_then(|s| s.code()),
            Some(1),
            "served over a regular file"
        );
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

fn console_stats_socket() -> (ConsoleDaemon, tempfile::TempDir, PathBuf) {
    let dir = stats_dir();
    let sock = dir.path().join("stats.sock");
    let d = ConsoleDaemon::bulkhead(&["--stats-socket", sock.to_str().unwrap()])
        .expect("start bulkhead-console (run `cargo build -p bulkhead-console`)");
    wait_for_path(&sock, Duration::from_secs(5)).expect("stats socket");
    (d, dir, sock)
}

#[test]
fn console_port_counters_appear_on_the_stats_socket_and_as_labelled_metrics() {
    let (mut d, _dir, sock) = console_stats_socket();
    let mut drv = ConsoleDriver::connect(d.socket(), &ConsoleDriver::options()).expect("bring-up");
    drv.linux_bring_up(&[None]).expect("Linux bring-up");
    let mut c = HostAddr::Unix(d.dir().join("vhost.sock.console"))
        .connect()
        .expect("host client");
    let deadline = Instant::now() + TIMEOUT;
    let attaches = |v: &serde_json::Value| v["attaches"][0]["value"].as_u64();
    while attaches(&stats::stats(&sock).unwrap()) < Some(1) {
        assert!(Instant::now() < deadline, "client never attached");
        std::thread::sleep(Duration::from_millis(10));
    }
    let data = b"hello, stats";
    drv.write(0, data, 64).unwrap();
    assert_eq!(read_n(c.as_mut(), data.len(), TIMEOUT).unwrap(), data);
    c.write_all(b"back").unwrap();
    assert_eq!(drv.read(0, 4, TIMEOUT).unwrap(), b"back");

    let v = stats::stats(&sock).unwrap();
    let port0 = |k: &str| {
        let s = &v[k][0];
        assert_eq!(s["port"], "0", "{v}");
        s["value"]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {v}"))
    };
    assert_eq!(port0("from_guest_bytes"), data.len() as u64);
    assert_eq!(port0("delivered_bytes"), data.len() as u64);
    assert_eq!(port0("to_guest_bytes"), 4);

    let text = stats::metrics(&sock).unwrap();
    let exp =
        check_exposition(&text, "bulkhead_console_").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        exp.value(
            "bulkhead_console_from_guest_bytes_total",
            &[("port", "0"), ("name", "")]
        ),
        Some(data.len() as f64),
        "{text}"
    );
    assert!(
        exp.value("bulkhead_console_emerg_writes_total", &[])
            .is_some()
    );
    assert!(d.is_running());
}

/// ARP for the host through the daemon: one frame out, one in.
fn arp_once(net: &mut NetDriver) {
    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let req = arp_request(GUEST_MAC, [10, 77, 0, 2], [10, 77, 0, 1]);
    net.send(0, &NetHdr::default(), &req).expect("send ARP");
    net.recv_matching(TIMEOUT, |p| parse_arp_reply(&p.frame).is_some())
        .expect("receive")
        .expect("no ARP reply");
}

#[test]
fn net_stats_count_frames_and_agree_with_the_sigusr1_log_line() {
    let test = "net_stats_count_frames_and_agree_with_the_sigusr1_log_line";
    if skip_if(test, netns::unavailable()) {
        return;
    }
    let ns = NetNs::new().expect("namespace");
    ns.add_tap("bhtap0", "10.77.0.1/24", false).expect("tap");
    let fds = ns.open_tap_fds("bhtap0", 1, false).expect("tap fd");
    let dir = stats_dir();
    let sock = dir.path().join("stats.sock");
    let mut daemon = NetDaemon::start_with_fds(fds, &["--stats-socket", sock.to_str().unwrap()])
        .expect("start bulkhead-net (run `cargo build -p bulkhead-net`)");
    wait_for_path(&sock, Duration::from_secs(5)).expect("stats socket");
    let mut net = NetDriver::connect(daemon.socket(), &Options::default()).expect("bring-up");
    net.post_rx(0, 16, 2048).unwrap();
    let before = stats::stats(&sock).unwrap();
    arp_once(&mut net);
    let after = stats::stats(&sock).unwrap();
    assert!(u(&after, "tx_frames") > u(&before, "tx_frames"), "{after}");
    assert!(u(&after, "rx_frames") > u(&before, "rx_frames"), "{after}");
    assert!(
        u(&after, "rx_bytes") >= u(&before, "rx_bytes") + 42,
        "{after}"
    );
    check_metrics(&sock, "bulkhead_net_");
    // The SIGUSR1 log line is the same snapshot in `name=value` form.
    let line = daemon.stats().expect("stats line");
    let now = stats::stats(&sock).unwrap();
    let plain = now.as_object().unwrap().values().filter(|v| v.is_u64());
    assert_eq!(line.len(), plain.count(), "{line:?} {now}");
    for (k, v) in &line {
        assert!(*v <= u(&now, k), "{k}");
        assert!(*v >= u(&after, k), "{k}");
    }
    drop(daemon);
    drop(ns);
}
