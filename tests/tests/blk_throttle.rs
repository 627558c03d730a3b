//! `bulkhead-blk`'s I/O limits (`--iops-total`, `--bps-total`, ...), with the
//! test kit as the guest: throttled requests all complete with the right
//! data, no more complete than the bucket allows (an upper bound, which a
//! loaded machine cannot make fail), and a stop, a disconnect or SIGTERM is
//! not held up by a queue waiting for its throttle.
//!
//! Rates themselves are measured by `bulkhead-bench throttle`, not here.
//! Run `cargo build -p bulkhead-blk` first.

use std::time::{Duration, Instant};

use bulkhead_tests::blk::{BlkDriver, Request, VIRTIO_BLK_S_OK};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::Options;
use bulkhead_tests::guest::spawn_daemon;
use bulkhead_tests::process::{wait_for_path, workspace_binary};

const IMAGE_SIZE: u64 = 16 << 20;

fn start(args: &[&str]) -> Daemon {
    Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), args)
        .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)")
}

/// A driver whose requests take one ring entry each (indirect tables),
/// so 100 fit a ring of 128.
fn connect(d: &Daemon) -> BlkDriver {
    connect_to(d.socket())
}

fn connect_to(socket: &std::path::Path) -> BlkDriver {
    let mut blk = BlkDriver::connect(socket, &Options::default()).expect("vhost-user bring-up");
    blk.use_indirect = true;
    blk
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

/// A limit that, once its first request has gone, holds the next one for
/// about a minute: 1 KiB/s and 64 KiB reads.
const MINUTE_LIMIT: &[&str] = &["--bps-total", "1K"];
const BIG_READ: u32 = 64 << 10;

/// Submits two 64 KiB reads under [`MINUTE_LIMIT`]: the first completes,
/// the second is held by the throttle.
fn one_done_one_held(d: &Daemon) -> BlkDriver {
    let mut blk = connect(d);
    hold_one(&mut blk);
    blk
}

fn hold_one(blk: &mut BlkDriver) {
    blk.submit(0, &Request::read(0, BIG_READ)).unwrap();
    blk.submit(0, &Request::read(128, BIG_READ)).unwrap();
    let c = blk.reap(0).unwrap();
    assert_eq!(c.status, VIRTIO_BLK_S_OK);
    // Give the daemon time to take the second one and hold it.
    std::thread::sleep(Duration::from_millis(200));
    blk.timeout = Duration::from_millis(100);
    assert!(
        blk.reap(0).is_err(),
        "the second read went despite the limit"
    );
}

#[test]
fn throttled_requests_all_complete_with_the_data_written() {
    let mut d = start(&["--iops-total", "200", "--iops-total-max", "200"]);
    let mut blk = connect(&d);
    // 300 writes and 300 reads: a burst of 200, then 200 per second.
    let mut written = Vec::new();
    for i in 0..100u64 {
        let data = pattern(i as u8, 4096);
        blk.submit(0, &Request::write(i * 8, data.clone())).unwrap();
        written.push(data);
    }
    for _ in 0..100 {
        assert_eq!(blk.reap(0).unwrap().status, VIRTIO_BLK_S_OK);
    }
    for round in 0..2 {
        for i in 0..100u64 {
            blk.submit(0, &Request::write(i * 8, written[i as usize].clone()))
                .unwrap();
        }
        for _ in 0..100 {
            assert_eq!(
                blk.reap(0).unwrap().status,
                VIRTIO_BLK_S_OK,
                "round {round}"
            );
        }
    }
    for i in 0..100u64 {
        blk.submit(0, &Request::read(i * 8, 4096)).unwrap();
    }
    let mut seen = 0;
    for _ in 0..100 {
        let c = blk.reap(0).unwrap();
        assert_eq!(c.status, VIRTIO_BLK_S_OK);
        assert!(
            written.contains(&c.data),
            "a read returned data never written"
        );
        seen += 1;
    }
    assert_eq!(seen, 100);
    // In order, one at a time, through the throttle: each read its sector.
    for i in 0..100u64 {
        assert_eq!(
            blk.read(0, i * 8, 4096).unwrap(),
            (VIRTIO_BLK_S_OK, written[i as usize].clone())
        );
    }
    assert!(d.is_running());
}

#[test]
fn no_more_requests_complete_than_the_bucket_allows() {
    // A bucket of 20 requests refilled at 20 per second.
    const RATE: f64 = 20.0;
    const BURST: f64 = 20.0;
    let d = start(&["--iops-read", "20", "--iops-read-max", "20"]);
    let mut blk = connect(&d);
    let start = Instant::now();
    for i in 0..100u64 {
        blk.submit(0, &Request::read(i, 512)).unwrap();
    }
    blk.timeout = Duration::from_millis(20);
    let mut done = 0u32;
    while start.elapsed() < Duration::from_secs(2) {
        if let Ok(c) = blk.reap(0) {
            assert_eq!(c.status, VIRTIO_BLK_S_OK);
            done += 1;
        }
    }
    // The bucket was full at most since the daemon started (before
    // `start`): it cannot have let more through than this by now.
    let allowed = BURST + RATE * start.elapsed().as_secs_f64();
    assert!(
        f64::from(done) <= allowed * 1.2,
        "{done} reads completed in {:?}; the bucket allows {allowed}",
        start.elapsed()
    );
    // Every one completes in the end (about 2 s more).
    blk.timeout = Duration::from_secs(30);
    while done < 100 {
        assert_eq!(blk.reap(0).unwrap().status, VIRTIO_BLK_S_OK);
        done += 1;
    }
}

/// Keeps `depth[q]` reads in flight on each queue for `run`, under one
/// limit shared by the queues; returns how many completed on each.
fn shares(blk: &mut BlkDriver, depth: [usize; 2], run: Duration) -> [u32; 2] {
    let mut done = [0u32; 2];
    let mut next = 0u64;
    for (q, &n) in depth.iter().enumerate() {
        for _ in 0..n {
            blk.submit(q, &Request::read(next % 1024, 512)).unwrap();
            next += 1;
        }
    }
    let start = Instant::now();
    while start.elapsed() < run {
        let mut idle = true;
        for (q, n) in done.iter_mut().enumerate() {
            while blk.has_completion(q).unwrap() {
                idle = false;
                assert_eq!(blk.reap(q).unwrap().status, VIRTIO_BLK_S_OK);
                *n += 1;
                blk.submit(q, &Request::read(next % 1024, 512)).unwrap();
                next += 1;
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    eprintln!("throttled reads completed per queue, {depth:?} in flight: {done:?}");
    done
}

#[test]
fn two_busy_queues_share_one_limit_fairly() {
    // 100 IOPS for the daemon as a whole, both queues asking for more.
    let d = start(&["--num-queues", "2", "--iops-total", "100"]);
    let mut blk = connect(&d);
    assert_eq!(blk.num_queues(), 2);
    let [a, b] = shares(&mut blk, [16, 16], Duration::from_secs(4));
    let total = a + b;
    // A share, not a rate: a loaded machine slows both queues alike.
    assert!(total >= 40, "only {total} reads completed in 4 s");
    for (q, n) in [(0, a), (1, b)] {
        assert!(
            f64::from(n) >= 0.35 * f64::from(total),
            "queue {q} got {n} of {total} throttled reads (queue 0: {a}, queue 1: {b})"
        );
    }
}

#[test]
fn a_busy_queue_does_not_starve_a_light_one() {
    // Queue 0 keeps 32 reads waiting; queue 1 only ever one.
    let d = start(&["--num-queues", "2", "--iops-total", "100"]);
    let mut blk = connect(&d);
    let [busy, light] = shares(&mut blk, [32, 1], Duration::from_secs(4));
    let total = busy + light;
    assert!(total >= 40, "only {total} reads completed in 4 s");
    // Round robin between the queues that wait gives the light queue half
    // while it always has a read waiting; allow for its turn-around.
    assert!(
        f64::from(light) >= 0.3 * f64::from(total),
        "the light queue got {light} of {total} throttled reads (busy queue: {busy})"
    );
}

#[test]
fn two_daemons_in_one_throttle_group_share_its_limit() {
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-test-group")
        .tempdir()
        .unwrap();
    let group = dir.path().join("group");
    let group = group.to_str().unwrap();
    // 20 requests/s with a bucket of 20 for the two daemons together.
    let a = start(&[
        "--throttle-group",
        group,
        "--iops-total",
        "20",
        "--iops-total-max",
        "20",
    ]);
    // The second names no limits: it takes the group's.
    let b = start(&["--throttle-group", group]);
    // One naming other limits is refused with the reason.
    std::fs::File::create(dir.path().join("c.img"))
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let out = std::process::Command::new(workspace_binary("bulkhead-blk"))
        .args([
            "--socket-path",
            &dir.path().join("c.sock").to_string_lossy(),
        ])
        .args(["--image", &dir.path().join("c.img").to_string_lossy()])
        .args(["--throttle-group", group, "--iops-total", "500"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has other limits"), "{err}");

    let mut blks = [connect(&a), connect(&b)];
    let start = Instant::now();
    for blk in &mut blks {
        for i in 0..60u64 {
            blk.submit(0, &Request::read(i, 512)).unwrap();
        }
        blk.timeout = Duration::from_millis(10);
    }
    let mut done = [0u32; 2];
    while start.elapsed() < Duration::from_secs(2) {
        for (blk, n) in blks.iter_mut().zip(done.iter_mut()) {
            if let Ok(c) = blk.reap(0) {
                assert_eq!(c.status, VIRTIO_BLK_S_OK);
                *n += 1;
            }
        }
    }
    // Either daemon alone would have let 20 + 20/s through; together they
    // may not let through more than that.
    let allowed = 20.0 + 20.0 * start.elapsed().as_secs_f64();
    let total = done[0] + done[1];
    assert!(
        f64::from(total) <= allowed * 1.2,
        "{done:?} reads completed in {:?}; the group allows {allowed}",
        start.elapsed()
    );
    assert!(done[0] > 0 && done[1] > 0, "both members served: {done:?}");
}

#[test]
fn sigterm_is_not_held_up_by_a_throttled_queue_and_the_counters_say_why() {
    // Started by hand, for its log: the stats line comes at exit.
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let log = scratch.dir().join("blk.log");
    let mut cmd = std::process::Command::new(workspace_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--image")
        .arg(scratch.image())
        .args(MINUTE_LIMIT);
    let mut daemon = spawn_daemon("bulkhead-blk", &mut cmd, &log).unwrap();
    wait_for_path(scratch.socket(), Duration::from_secs(10)).unwrap();
    let mut blk = connect_to(scratch.socket());
    hold_one(&mut blk);
    let t = Instant::now();
    daemon.signal(libc::SIGTERM).unwrap();
    let status = daemon
        .wait_timeout(Duration::from_secs(20))
        .unwrap()
        .expect("bulkhead-blk did not exit after SIGTERM");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    let stats = log
        .lines()
        .rev()
        .find(|l| l.contains(" stats: "))
        .unwrap_or_else(|| panic!("no stats line at exit:\n{log}"));
    let count = |k: &str| -> u64 {
        stats
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {stats}"))
    };
    assert_eq!(count("throttle_delayed"), 1, "{stats}");
    assert_eq!(count("throttle_held"), 0, "given back at the stop: {stats}");
    assert!(
        count("throttled_ns") >= 100_000_000,
        "held for 200 ms or more: {stats}"
    );
}

#[test]
fn get_vring_base_on_a_throttled_queue_returns_at_once_and_gives_the_held_request_back() {
    let mut d = start(MINUTE_LIMIT);
    let mut blk = one_done_one_held(&d);
    let t = Instant::now();
    let base = blk.dev.stop_queue(0).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "GET_VRING_BASE took {:?}",
        t.elapsed()
    );
    assert_eq!(
        base, 1,
        "the held request is back on the ring: a successor takes it again"
    );
    drop(blk);
    // Still serving (the bucket stays in debt: limits are the daemon's, a
    // new connection does not refill them).
    assert!(d.is_running());
    let t = Instant::now();
    let _blk = connect(&d);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_disconnect_while_throttled_leaves_the_daemon_serving() {
    let mut d = start(&["--iops-total", "1", "--iops-total-max", "1"]);
    let mut blk = connect(&d);
    for i in 0..5u64 {
        blk.submit(0, &Request::read(i, 512)).unwrap();
    }
    assert_eq!(blk.reap(0).unwrap().status, VIRTIO_BLK_S_OK);
    std::thread::sleep(Duration::from_millis(100));
    drop(blk);
    let t = Instant::now();
    let mut blk = connect(&d);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "reconnecting took {:?}",
        t.elapsed()
    );
    blk.timeout = Duration::from_secs(10);
    assert_eq!(blk.read(0, 0, 512).unwrap().0, VIRTIO_BLK_S_OK);
    assert!(d.is_running());
}

#[test]
fn nonsense_limits_are_refused_at_start() {
    let bin = bulkhead_tests::process::workspace_binary("bulkhead-blk");
    for (args, want) in [
        (
            &["--iops-total", "10", "--iops-read", "5"][..],
            "cannot be used together",
        ),
        (&["--bps-write-max", "1M"][..], "needs a rate"),
        (
            &["--iops-write", "100", "--iops-write-max", "10"][..],
            "below",
        ),
        (&["--bps-read", "lots"][..], "not a size"),
    ] {
        let out = std::process::Command::new(&bin)
            .args(["--image", "/nonexistent", "--check"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// Sends one request line on the stats socket and reads one answer line.
fn control(socket: &std::path::Path, line: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(socket).expect("connect the stats socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).unwrap();
    answer
}

#[test]
fn a_limit_changed_at_run_time_takes_effect_and_lifting_it_frees_the_queue() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let stats = scratch.dir().join("blk.stats");
    let d = Daemon::blk(
        scratch,
        &[
            "--iops-read",
            "5000",
            "--stats-socket",
            stats.to_str().unwrap(),
        ],
    )
    .expect("start bulkhead-blk");
    wait_for_path(&stats, Duration::from_secs(10)).unwrap();
    assert_eq!(
        control(&stats, "limits"),
        "{\"limits\":{\"iops-read\":5000}}\n"
    );
    // Down to 10 reads a second, a bucket of 10.
    let set = control(&stats, "limit iops-read=10,iops-read-max=10");
    assert!(
        set.starts_with("{\"limits\":{\"iops-read\":10,\"iops-read-max\":10},\"ok\":true}"),
        "{set}"
    );
    let refused = control(&stats, "limit iops-total=1");
    assert!(
        refused.starts_with("error: limit: iops-total and iops-read"),
        "{refused}"
    );
    let mut blk = connect(&d);
    let start = Instant::now();
    for i in 0..120u64 {
        blk.submit(0, &Request::read(i % 64, 512)).unwrap();
    }
    blk.timeout = Duration::from_millis(20);
    let mut done = 0u32;
    while start.elapsed() < Duration::from_secs(2) {
        if let Ok(c) = blk.reap(0) {
            assert_eq!(c.status, VIRTIO_BLK_S_OK);
            done += 1;
        }
    }
    let allowed = 10.0 + 10.0 * start.elapsed().as_secs_f64();
    assert!(
        f64::from(done) <= allowed * 1.2,
        "{done} reads in {:?} under the new limit; the bucket allows {allowed}",
        start.elapsed()
    );
    // Lifted: the rest (9 s more at 10/s) go at once; a throttled queue
    // looks again within a second.
    assert!(control(&stats, "limit iops-read=0").starts_with("{\"limits\":{},\"ok\":true}"));
    let lifted = Instant::now();
    blk.timeout = Duration::from_secs(4);
    while done < 120 {
        assert_eq!(blk.reap(0).unwrap().status, VIRTIO_BLK_S_OK);
        done += 1;
    }
    assert!(
        lifted.elapsed() < Duration::from_secs(4),
        "the lifted limit still held the queue: {:?}",
        lifted.elapsed()
    );
}
