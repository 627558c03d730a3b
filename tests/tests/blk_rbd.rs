//! `bulkhead-blk` serving an image on Ceph RBD (`--image rbd:POOL/IMAGE`),
//! against a throwaway one-node cluster (`bulkhead_tests::ceph`), driven by
//! the test kit's virtio-blk driver. Each test starts its own cluster
//! (about 12 s) and tears it down when it ends. Every daemon runs with the
//! default sandbox (`enforce`: librados' threads under their own list);
//! the test of a forbidden call builds a `test-hooks` daemon into
//! `target/hooked` (see `tests/tests/sandbox.rs`).
//!
//! Run `cargo build -p bulkhead-blk` first.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::blk::{BlkDriver, Request, SECTOR_SIZE, Segment, VIRTIO_BLK_S_OK};
use bulkhead_tests::ceph::{Cluster, needs_ceph};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::Options;
use bulkhead_tests::guest::{Guest, spawn_daemon};
use bulkhead_tests::process::{ChildGuard, wait_for_path, workspace_binary};
use bulkhead_tests::sandbox::{Logged, confined_workers, field, hooked_binary, threads};
use bulkhead_tests::skip::skip_if;

const IMAGE_SIZE: u64 = 32 << 20;
/// librbd's default object size: a discard of whole objects removes them.
const OBJECT: u64 = 4 << 20;

fn cluster(test: &str) -> Option<Cluster> {
    if skip_if(test, needs_ceph()) {
        return None;
    }
    let c = Cluster::start().expect("start the one-node Ceph cluster");
    c.create_image("disk", IMAGE_SIZE).expect("rbd create");
    Some(c)
}

fn blk_command(c: &Cluster, scratch: &Scratch, extra: &[&str]) -> Command {
    blk_command_on(c, "rbd:rbd/disk", scratch, extra)
}

fn blk_command_on(c: &Cluster, image: &str, scratch: &Scratch, extra: &[&str]) -> Command {
    let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .args(["--image", image, "--ceph-conf"])
        .arg(c.conf())
        .args(extra);
    cmd
}

fn start(c: &Cluster, extra: &[&str]) -> Daemon {
    let scratch = Scratch::new(4096).unwrap();
    let cmd = blk_command(c, &scratch, extra);
    Daemon::start("bulkhead-blk", cmd, scratch).expect("start bulkhead-blk on RBD")
}

/// Runs a daemon that must exit by itself (a refusal): its exit code and
/// stderr. One that keeps running fails the test after 60 s instead of
/// hanging it.
fn exit_of(mut cmd: Command) -> (Option<i32>, String) {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut g = ChildGuard::spawn_quiet("bulkhead-blk", &mut cmd).unwrap();
    let st = g
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("bulkhead-blk should have refused to start, but still runs");
    let mut err = String::new();
    if let Some(mut e) = g.child_mut().stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (st.code(), err)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) ^ (i / 4096) as u8)
        .collect()
}

#[test]
fn reads_writes_discards_and_write_zeroes_match_rbd_export() {
    let Some(c) = cluster("reads_writes_discards_and_write_zeroes_match_rbd_export") else {
        return;
    };
    let d = start(&c, &["--serial", "rbd-disk-1", "--num-queues", "2"]);
    let mut blk = BlkDriver::connect(d.socket(), &Options::default().queues(2)).unwrap();
    assert_eq!(blk.config.capacity, IMAGE_SIZE / SECTOR_SIZE);

    // A pattern over several objects, written on both queues, some of it
    // in many segments; each read back through the device.
    let mut expected = vec![0u8; IMAGE_SIZE as usize];
    for (i, (off, len)) in [
        (0u64, 4096usize),
        (OBJECT - 8192, 64 << 10),
        (9 << 20, 1 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(i as u8 + 1, len);
        let q = i % 2;
        let req = Request::write(off / SECTOR_SIZE, data.clone()).segs(1 + i * 7);
        assert_eq!(blk.run(q, &req).unwrap().status, VIRTIO_BLK_S_OK);
        assert_eq!(
            blk.read(1 - q, off / SECTOR_SIZE, len as u32).unwrap(),
            (VIRTIO_BLK_S_OK, data.clone())
        );
        expected[off as usize..off as usize + len].copy_from_slice(&data);
    }
    assert_eq!(blk.flush(0).unwrap(), VIRTIO_BLK_S_OK);
    let (st, id) = blk.get_id(0).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(&id[..10], b"rbd-disk-1");
    assert!(
        c.export("disk").unwrap() == expected,
        "rbd export differs after writes"
    );

    // Write-zeroes of 4 KiB inside written data (a discard this small
    // librbd would skip), and a discard of two whole objects.
    let seg = |off: u64, len: u64| Segment {
        sector: off / SECTOR_SIZE,
        num_sectors: (len / SECTOR_SIZE) as u32,
        unmap: false,
    };
    let zero_at = OBJECT - 4096;
    assert_eq!(
        blk.write_zeroes(0, &[seg(zero_at, 4096)]).unwrap(),
        VIRTIO_BLK_S_OK
    );
    expected[zero_at as usize..(zero_at + 4096) as usize].fill(0);
    let mut unmap = seg(9 << 20, 4096);
    unmap.unmap = true;
    assert_eq!(blk.write_zeroes(1, &[unmap]).unwrap(), VIRTIO_BLK_S_OK);
    expected[9 << 20..(9 << 20) + 4096].fill(0);
    assert_eq!(
        blk.discard(0, &[seg(2 * OBJECT, 2 * OBJECT)]).unwrap(),
        VIRTIO_BLK_S_OK
    );
    expected[2 * OBJECT as usize..4 * OBJECT as usize].fill(0);
    for (off, len) in [(zero_at, 4096u32), (9 << 20, 8192), (2 * OBJECT, 1 << 20)] {
        let (st, data) = blk.read(0, off / SECTOR_SIZE, len).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(
            data == expected[off as usize..off as usize + len as usize],
            "read back at {off} differs"
        );
    }
    assert!(
        c.export("disk").unwrap() == expected,
        "rbd export differs after zeroing"
    );
}

#[test]
fn a_second_daemon_is_refused_and_a_killed_one_is_replaced_with_break_lock() {
    let Some(c) =
        cluster("a_second_daemon_is_refused_and_a_killed_one_is_replaced_with_break_lock")
    else {
        return;
    };
    let opts = Options::default().queues(2);
    let mut d = start(&c, &["--num-queues", "2"]);
    let mut blk = BlkDriver::connect(d.socket(), &opts).unwrap();
    let first = pattern(9, 8192);
    assert_eq!(blk.write(0, 0, &first).unwrap(), VIRTIO_BLK_S_OK);

    // A second daemon on the same image while the first serves: it starts
    // (a swap's new daemon must), but its device does not, and its log
    // names the holder.
    let other = Scratch::new(4096).unwrap();
    let mut second = Logged::start("bulkhead-blk", blk_command(&c, &other, &[]), other.socket());
    let t = Instant::now();
    let refused = match BlkDriver::connect(other.socket(), &Options::default()) {
        Err(_) => true,
        Ok(mut b) => b
            .write(0, 0, &[5u8; 512])
            .map_or(true, |st| st != VIRTIO_BLK_S_OK),
    };
    let log = second.log.text();
    assert!(refused, "a second daemon wrote the image: {log}");
    assert!(
        second
            .log
            .wait_for("locked by another client", Duration::from_secs(10)),
        "unclear refusal: {}",
        second.log.text()
    );
    let log = second.log.text();
    // The holder is named (librbd names it by its address).
    assert!(
        log.contains("locked by another client (127.0.0.1:") && log.contains("--break-lock"),
        "{log}"
    );
    eprintln!("second daemon's device refused after {:?}", t.elapsed());
    assert!(second.is_running(), "the refused daemon died: {log}");
    drop(second);
    // The first still serves.
    assert_eq!(
        blk.read(1, 0, 8192).unwrap(),
        (VIRTIO_BLK_S_OK, first.clone())
    );

    // Writes in flight at a SIGKILL are resubmitted by the frontend to the
    // successor, which breaks the dead one's lock and serves at once.
    blk.defer_kick = true;
    let mut writes = Vec::new();
    for q in 0..2u64 {
        for i in 0..16u64 {
            let sector = (1 << 20) / SECTOR_SIZE + (q * 16 + i) * 128;
            let data = pattern((q * 16 + i) as u8, 64 << 10);
            blk.submit(q as usize, &Request::write(sector, data.clone()))
                .unwrap();
            writes.push((sector, data));
        }
    }
    blk.kick(0).unwrap();
    blk.kick(1).unwrap();
    blk.defer_kick = false;
    std::thread::sleep(Duration::from_millis(2));
    let scratch = d.kill_keep_scratch().unwrap();
    let _ = std::fs::remove_file(scratch.socket());
    let t = Instant::now();
    let cmd = blk_command(&c, &scratch, &["--num-queues", "2", "--break-lock"]);
    d = Daemon::start("bulkhead-blk", cmd, scratch).expect("restart with --break-lock");
    blk = blk.reconnect(d.socket(), &opts).expect("reconnect");
    let mut done = 0;
    for q in 0..2 {
        while blk.pending(q) > 0 {
            let c = blk.reap(q).expect("every request completes exactly once");
            assert_eq!(c.status, VIRTIO_BLK_S_OK, "request {} failed", c.head);
            done += 1;
        }
        // Nothing completes twice: no used entry beyond those reaped.
        let extra = blk.queue(q).unwrap().wait_used(Duration::from_millis(200));
        assert!(extra.is_err(), "queue {q}: extra completion {extra:?}");
    }
    assert_eq!(done, writes.len());
    let took = t.elapsed();
    eprintln!("successor serving {done} resubmitted write(s) after {took:?}");
    assert!(took < Duration::from_secs(10), "restart took {took:?}");
    assert_eq!(blk.read(0, 0, 8192).unwrap(), (VIRTIO_BLK_S_OK, first));
    let image = c.export("disk").unwrap();
    for (sector, data) in &writes {
        let off = (sector * SECTOR_SIZE) as usize;
        assert!(
            image[off..off + data.len()] == data[..],
            "write at {sector} lost"
        );
    }
    // A clean stop (SIGTERM) lets go of the lock: the next daemon needs no
    // --break-lock.
    d.guard_mut().signal(libc::SIGTERM).unwrap();
    let st = d.guard_mut().wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(st.is_some_and(|s| s.success()), "SIGTERM: {st:?}");
    let scratch = Scratch::new(4096).unwrap();
    let cmd = blk_command(&c, &scratch, &[]);
    let d = Daemon::start("bulkhead-blk", cmd, scratch).expect("start after a clean stop");
    let mut blk = BlkDriver::connect(d.socket(), &Options::default()).unwrap();
    assert_eq!(blk.write(0, 0, &[7u8; 512]).unwrap(), VIRTIO_BLK_S_OK);
}

#[test]
fn readonly_serves_reads_and_refuses_writes_without_taking_the_lock() {
    let Some(c) = cluster("readonly_serves_reads_and_refuses_writes_without_taking_the_lock")
    else {
        return;
    };
    let writer = start(&c, &[]);
    let mut w = BlkDriver::connect(writer.socket(), &Options::default()).unwrap();
    let data = pattern(3, 4096);
    assert_eq!(w.write(0, 8, &data).unwrap(), VIRTIO_BLK_S_OK);
    let reader = start(&c, &["--readonly"]);
    let mut r = BlkDriver::connect(reader.socket(), &Options::default()).unwrap();
    assert_eq!(r.read(0, 8, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));
    assert_ne!(r.write(0, 8, &[1u8; 4096]).unwrap(), VIRTIO_BLK_S_OK);

    // An image without the exclusive-lock feature cannot be served for
    // writing: nothing would keep a second writer off it.
    c.rbd(&[
        "create",
        "--size",
        "4M",
        "--image-feature",
        "layering",
        "rbd/nolock",
    ])
    .unwrap();
    let scratch = Scratch::new(4096).unwrap();
    let (code, err) = exit_of(blk_command_on(&c, "rbd:rbd/nolock", &scratch, &[]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no exclusive-lock feature") && err.contains("--readonly"),
        "{err}"
    );
}

#[test]
fn a_linux_guest_runs_fio_verify_on_an_rbd_image() {
    let Some(c) = cluster("a_linux_guest_runs_fio_verify_on_an_rbd_image") else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-qemu-rbd-")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("blk.sock");
    let log = dir.path().join("backend.log");
    let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(&socket)
        .args(["--image", "rbd:rbd/disk", "--ceph-conf"])
        .arg(c.conf())
        .args(["--num-queues", "2", "--serial", "rbd0"]);
    let mut daemon = spawn_daemon("bulkhead-blk", &mut cmd, &log).unwrap();
    wait_for_path(&socket, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    let pattern = pattern(0x5a, 1 << 20);
    let sectors = IMAGE_SIZE / SECTOR_SIZE;
    let script = format!(
        r#"
expect_eq size "$(cat /sys/block/vda/size)" {sectors}
expect_eq serial "$(cat /sys/block/vda/serial)" rbd0
check fio-verify fio --filename=/dev/vda --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 \
  --direct=1 --verify=crc32c --verify_fatal=1 --size=8M \
  --name=cpu0 --cpus_allowed=0 --offset=0 --name=cpu1 --cpus_allowed=1 --offset=8M
check fio-large fio --name=large --filename=/dev/vda --offset=16M --size=8M \
  --rw=write --bs=1M --ioengine=libaio --iodepth=2 --direct=1 --verify=crc32c --verify_fatal=1
check pattern-write dd if=/data/pattern.bin of=/dev/vda bs=1M seek=28 conv=fsync
"#
    );
    let run = Guest::new(script)
        .smp(2)
        .file("/data/pattern.bin", pattern.clone())
        .vhost_user_blk(&socket, 2)
        .timeout(Duration::from_secs(300))
        .run_watching(&mut [&mut daemon]);
    let _ = daemon.signal(libc::SIGTERM);
    let _ = daemon.wait_timeout(Duration::from_secs(10));
    assert!(
        run.passed(),
        "guest test failed\n{}--- backend log:\n{}",
        run.report(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for check in ["fio-verify", "fio-large", "pattern-write"] {
        assert!(
            run.check(check).is_some_and(|c| c.passed),
            "{check} not passed"
        );
    }
    eprintln!("guest ran {:.1?}, {} checks", run.elapsed, run.checks.len());
    let image = c.export("disk").unwrap();
    assert!(
        image[28 << 20..29 << 20] == pattern[..],
        "the guest's pattern is not in rbd export"
    );
}

#[test]
fn rbd_images_refuse_options_that_do_not_apply() {
    // No cluster needed: the refusal comes before connecting.
    let scratch = Scratch::new(4096).unwrap();
    // Options of one kind of image are refused for the other, not ignored.
    for (image, flag) in [
        ("rbd:rbd/disk", "--no-lock"),
        ("rbd:rbd/disk", "--direct"),
        (scratch.image().to_str().unwrap(), "--break-lock"),
    ] {
        let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
        cmd.arg("--socket-path")
            .arg(scratch.socket())
            .args(["--image", image, flag]);
        let (code, err) = exit_of(cmd);
        assert_eq!(code, Some(2), "{image} {flag}: {err}");
        assert!(err.contains(flag), "{err}");
    }
}

#[test]
fn break_lock_fences_off_a_holder_that_is_still_alive() {
    let Some(c) = cluster("break_lock_fences_off_a_holder_that_is_still_alive") else {
        return;
    };
    let mut old = start(&c, &[]);
    let mut a = BlkDriver::connect(old.socket(), &Options::default()).unwrap();
    assert_eq!(a.write(0, 0, &pattern(1, 4096)).unwrap(), VIRTIO_BLK_S_OK);
    // The successor breaks the lock of a daemon that still runs.
    let new = start(&c, &["--break-lock"]);
    let mut b = BlkDriver::connect(new.socket(), &Options::default()).unwrap();
    let data = pattern(2, 4096);
    assert_eq!(b.write(0, 0, &data).unwrap(), VIRTIO_BLK_S_OK);
    // The old one is blocklisted: its writes fail (and it stays up), so
    // nothing it still had to say lands on the image.
    let t = Instant::now();
    let st = a.write(0, 0, &pattern(3, 4096)).unwrap();
    eprintln!(
        "the fenced daemon's write completed with status {st} after {:?}",
        t.elapsed()
    );
    assert_ne!(st, VIRTIO_BLK_S_OK, "a fenced-off daemon's write succeeded");
    assert!(old.is_running(), "the fenced-off daemon died");
    assert_eq!(b.read(0, 0, 4096).unwrap(), (VIRTIO_BLK_S_OK, data.clone()));
    assert!(c.export("disk").unwrap()[..4096] == data[..]);
}

#[test]
fn a_swap_hands_the_lock_to_the_new_daemon_without_losing_io() {
    let Some(c) = cluster("a_swap_hands_the_lock_to_the_new_daemon_without_losing_io") else {
        return;
    };
    let opts = Options::default().queues(2);
    let mut old = start(&c, &["--num-queues", "2"]);
    let mut blk = BlkDriver::connect(old.socket(), &opts).unwrap();
    let first = pattern(4, 8192);
    assert_eq!(blk.write(0, 0, &first).unwrap(), VIRTIO_BLK_S_OK);

    // The new daemon starts beside the old one, which holds the lock.
    let new = start(&c, &["--num-queues", "2"]);
    // Writes in flight on the old daemon as the frontend moves (what `ctl
    // swap` and a launcher restart do): the old one lets go of the lock
    // once its queues stop, the new one takes it as its queues start and
    // serves the resubmitted writes.
    blk.defer_kick = true;
    let mut writes = Vec::new();
    for q in 0..2u64 {
        for i in 0..16u64 {
            let sector = (2 << 20) / SECTOR_SIZE + (q * 16 + i) * 128;
            let data = pattern(100 + (q * 16 + i) as u8, 64 << 10);
            blk.submit(q as usize, &Request::write(sector, data.clone()))
                .unwrap();
            writes.push((sector, data));
        }
    }
    blk.kick(0).unwrap();
    blk.kick(1).unwrap();
    blk.defer_kick = false;
    let t = Instant::now();
    // As `ctl swap` does: stop the old daemon's queues (GET_VRING_BASE
    // answers once its queue thread is done), then move to the new one.
    for q in 0..2 {
        blk.dev
            .stop_queue(q)
            .expect("stop a queue of the old daemon");
    }
    blk = blk
        .reconnect(new.socket(), &opts)
        .expect("reconnect to the new daemon");
    let mut done = 0;
    for q in 0..2 {
        while blk.pending(q) > 0 {
            let c = blk.reap(q).expect("every request completes exactly once");
            assert_eq!(c.status, VIRTIO_BLK_S_OK, "request {} failed", c.head);
            done += 1;
        }
        let extra = blk.queue(q).unwrap().wait_used(Duration::from_millis(200));
        assert!(extra.is_err(), "queue {q}: extra completion {extra:?}");
    }
    // Served by the new daemon: it holds the lock now.
    let data = pattern(5, 4096);
    assert_eq!(blk.write(1, 64, &data).unwrap(), VIRTIO_BLK_S_OK);
    let took = t.elapsed();
    eprintln!("swap: {done} in-flight write(s) served by the new daemon after {took:?}");
    assert_eq!(done, writes.len());
    assert!(
        took < Duration::from_secs(5),
        "the hand-over took {took:?} (the lock wait is 5 s)"
    );
    assert!(old.is_running(), "the old daemon died");
    assert_eq!(blk.read(0, 0, 8192).unwrap(), (VIRTIO_BLK_S_OK, first));
    let image = c.export("disk").unwrap();
    for (sector, data) in writes.iter().chain([(64, data)].iter()) {
        let off = (sector * SECTOR_SIZE) as usize;
        assert!(
            image[off..off + data.len()] == data[..],
            "write at {sector} lost"
        );
    }
    // The old daemon, without the lock, cannot write any more; back on it
    // (a swap back), it takes the lock again once the new one lets go.
    for q in 0..2 {
        blk.dev
            .stop_queue(q)
            .expect("stop a queue of the new daemon");
    }
    blk = blk.reconnect(old.socket(), &opts).expect("swap back");
    assert_eq!(blk.write(0, 8, &[6u8; 4096]).unwrap(), VIRTIO_BLK_S_OK);
    assert!(c.export("disk").unwrap()[4096..8192] == [6u8; 4096][..]);
}

#[test]
fn every_thread_of_an_rbd_daemon_is_confined_and_a_forbidden_call_kills_it() {
    let Some(c) =
        cluster("every_thread_of_an_rbd_daemon_is_confined_and_a_forbidden_call_kills_it")
    else {
        return;
    };
    // The default is --sandbox enforce, as for a file.
    let d = start(&c, &["--num-queues", "2"]);
    let mut blk = BlkDriver::connect(d.socket(), &Options::default().queues(2)).unwrap();
    for q in 0..2 {
        assert_eq!(blk.write(q, 8, &pattern(9, 4096)).unwrap(), VIRTIO_BLK_S_OK);
    }
    // Every thread, librados' included, is in seccomp filter mode with
    // no_new_privs; each queue thread stacked its own filter.
    let workers = confined_workers(d.pid(), 2);
    assert_eq!(workers.len(), 2, "expected two queue threads: {workers:?}");
    let all = threads(d.pid());
    let filters = |name: &str| {
        all.iter()
            .find(|(_, n, _)| n.starts_with(name))
            .and_then(|(_, _, s)| field(s, "Seccomp_filters"))
            .and_then(|v| v.parse::<u32>().ok())
    };
    let main = filters("bulkhead-blk").expect("main thread");
    let msgr = filters("msgr-worker").expect("a librados messenger thread");
    // The messenger threads have the library's filters, the main thread
    // its own on top of them.
    assert!(msgr >= 1 && msgr < main, "msgr {msgr}, main {main}");

    // A forbidden call on the main thread still kills the daemon, though
    // librados' threads may open TCP sockets.
    let scratch = Scratch::new(4096).unwrap();
    let mut cmd = Command::new(hooked_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .args(["--image", "rbd:rbd/other", "--ceph-conf"])
        .arg(c.conf())
        .env("BULKHEAD_TEST_HOOK", "socket-inet");
    c.create_image("other", 4 << 20).unwrap();
    let mut hooked = Logged::spawn("bulkhead-blk", cmd).unwrap();
    assert_eq!(
        hooked.killed_by(),
        Some(libc::SIGSYS),
        "{}",
        hooked.log.text()
    );
    let text = hooked.log.text();
    assert!(text.contains("threads of librados"), "{text}");
    assert!(
        text.contains("test-hook: calling socket(AF_INET)"),
        "{text}"
    );
    assert!(!text.contains("returned an fd"), "{text}");
}

#[test]
fn bulkhead_check_opens_rbd_images_and_names_each_problem() {
    let Some(c) = cluster("bulkhead_check_opens_rbd_images_and_names_each_problem") else {
        return;
    };
    c.rbd(&[
        "create",
        "--size",
        "4M",
        "--image-feature",
        "layering",
        "rbd/nolock",
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = c.conf().display().to_string();
    let check = |body: &str| {
        let cfg = dir.path().join("vm.toml");
        std::fs::write(&cfg, body).unwrap();
        let out = Command::new(workspace_binary("bulkhead"))
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .expect("run bulkhead (cargo build -p bulkhead-launcher)");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A good image: no file is looked for, the daemon opens it.
    let (code, err) = check(&format!(
        "frontend = \"none\"\n[[blk]]\nimage = \"rbd:rbd/disk\"\nargs = [\"--ceph-conf\", \"{conf}\"]\n"
    ));
    assert_eq!(code, Some(0), "{err}");
    // Each problem named by its device: a missing image, one without the
    // lock feature (fine read-only), a missing pool, a bad spec, a missing
    // configuration file.
    let (code, err) = check(&format!(
        "frontend = \"none\"\n\
         [[blk]]\nid = \"gone\"\nimage = \"rbd:rbd/missing\"\nargs = [\"--ceph-conf\", \"{conf}\"]\n\
         [[blk]]\nid = \"nolock\"\nimage = \"rbd:rbd/nolock\"\nargs = [\"--ceph-conf={conf}\"]\n\
         [[blk]]\nid = \"ro\"\nimage = \"rbd:rbd/nolock\"\nreadonly = true\nargs = [\"--ceph-conf\", \"{conf}\"]\n\
         [[blk]]\nid = \"nopool\"\nimage = \"rbd:nopool/disk\"\nargs = [\"--ceph-conf\", \"{conf}\"]\n\
         [[blk]]\nid = \"bad\"\nimage = \"rbd:rbd\"\n\
         [[blk]]\nid = \"noconf\"\nimage = \"rbd:rbd/disk\"\nargs = [\"--ceph-conf\", \"/nonexistent/ceph.conf\"]\n"
    ));
    assert_eq!(code, Some(1), "{err}");
    for needle in [
        "gone: bulkhead-blk refuses its options: cannot open rbd:rbd/missing",
        "nolock: bulkhead-blk refuses its options: rbd:rbd/nolock has no exclusive-lock feature",
        "nopool: bulkhead-blk refuses its options: cannot open pool nopool",
        "bad: bulkhead-blk refuses its options: rbd:rbd: an RBD image is rbd:POOL/IMAGE",
        "noconf: --ceph-conf = \"/nonexistent/ceph.conf\"",
    ] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    assert!(!err.contains("ro:"), "{err}");
}

/// A QMP connection (greeting read, capabilities negotiated): just what
/// the migration test below needs.
struct Qmp {
    out: std::os::unix::net::UnixStream,
    input: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Qmp {
    fn connect(path: &std::path::Path) -> Qmp {
        wait_for_path(path, Duration::from_secs(30)).unwrap();
        let sock = std::os::unix::net::UnixStream::connect(path).expect("connect QMP");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut q = Qmp {
            out: sock.try_clone().unwrap(),
            input: std::io::BufReader::new(sock),
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.execute("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn read(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        assert!(
            self.input.read_line(&mut line).expect("read QMP") > 0,
            "QMP closed"
        );
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP line {line:?}: {e}"))
    }

    /// Runs a command and returns its `return` (events in between skipped).
    fn execute(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        let msg = serde_json::json!({ "execute": cmd, "arguments": args });
        writeln!(self.out, "{msg}").expect("write QMP");
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                continue;
            }
            match v.get("return") {
                Some(r) => return r.clone(),
                None => panic!("QMP {cmd}: {v}"),
            }
        }
    }
}

#[test]
fn a_migration_moves_the_lock_from_the_source_daemon_to_the_destination() {
    use bulkhead_tests::guest::{GuestRun, image, tail};
    let Some(c) = cluster("a_migration_moves_the_lock_from_the_source_daemon_to_the_destination")
    else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-rbd-migrate-")
        .tempdir()
        .unwrap();
    let p = |n: &str| dir.path().join(n);
    // The guest writes and reads back with O_DIRECT until the serial it
    // reads (GET_ID, from the device on every read) says the destination's
    // daemon answers, then writes once more there.
    let script = r#"
dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null
want=$(sha256sum < /tmp/a | cut -d' ' -f1)
first=$(cat /sys/block/vda/serial)
value first-serial "$first"
value ready 1
end=$(( $(date +%s) + 90 ))
rounds=0
bad=0
while [ "$(date +%s)" -lt "$end" ] && [ "$(cat /sys/block/vda/serial)" = "$first" ]; do
  slot=$(( rounds % 4 ))
  dd if=/tmp/a of=/dev/vda bs=1M seek=$(( slot * 4 )) oflag=direct 2>/dev/null || bad=$(( bad + 1 ))
  got=$(dd if=/dev/vda bs=1M skip=$(( slot * 4 )) count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || bad=$(( bad + 1 ))
  rounds=$(( rounds + 1 ))
done
value rounds $rounds
value last-serial "$(cat /sys/block/vda/serial)"
expect_eq loop-readbacks $bad 0
check dst-write dd if=/tmp/a of=/dev/vda bs=1M seek=20 oflag=direct
expect_eq dst-readback "$(dd if=/dev/vda bs=1M skip=20 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)" "$want"
"#;
    bulkhead_tests::guest::Guest::new(script.to_string())
        .write_initrd_to(&p("initrd.cpio"))
        .unwrap();
    let daemon = |side: &str| {
        let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
        cmd.arg("--socket-path")
            .arg(p(&format!("{side}-blk.sock")))
            .args(["--image", "rbd:rbd/disk", "--ceph-conf"])
            .arg(c.conf())
            .args(["--num-queues", "1", "--serial", side]);
        let g = spawn_daemon("bulkhead-blk", &mut cmd, &p(&format!("{side}-blk.log"))).unwrap();
        wait_for_path(&p(&format!("{side}-blk.sock")), Duration::from_secs(30)).unwrap();
        g
    };
    // Both daemons run on the image from the start; the destination's takes
    // the lock only when its device starts.
    let mut src_blk = daemon("source");
    let mut dst_blk = daemon("destination");
    let qemu = |side: &str, extra: &[String]| {
        let img = image();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-m",
            "512M",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-M", "q35,memory-backend=mem", "-smp", "1", "-kernel"])
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(p("initrd.cpio"))
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", p(&format!("{side}.serial")).display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=vu0,path={}",
            p(&format!("{side}-blk.sock")).display()
        ))
        .args(["-device", "vhost-user-blk-pci,chardev=vu0,num-queues=1"])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            p(&format!("{side}.qmp")).display()
        ))
        .args(extra);
        spawn_daemon("qemu", &mut cmd, &p(&format!("{side}-qemu.log"))).unwrap()
    };
    let read = |n: &str| {
        String::from_utf8_lossy(&std::fs::read(p(n)).unwrap_or_default()).replace('\r', "")
    };
    let logs = || {
        format!(
            "--- source serial:\n{}\n--- destination serial:\n{}\n--- source daemon:\n{}\n\
             --- destination daemon:\n{}\n--- destination QEMU:\n{}",
            tail(&read("source.serial"), 20),
            tail(&read("destination.serial"), 20),
            tail(&read("source-blk.log"), 20),
            tail(&read("destination-blk.log"), 20),
            tail(&read("destination-qemu.log"), 20),
        )
    };
    let incoming = format!("unix:{}", p("migrate.sock").display());
    let mut dst = qemu("destination", &["-incoming".into(), incoming.clone()]);
    let mut src = qemu("source", &[]);
    let mut src_qmp = Qmp::connect(&p("source.qmp"));
    let _dst_qmp = Qmp::connect(&p("destination.qmp"));
    let deadline = Instant::now() + Duration::from_secs(180);
    while !read("source.serial").contains("@@BULKHEAD VALUE ready 1") {
        assert!(
            Instant::now() < deadline && matches!(src.try_wait(), Ok(None)),
            "the guest never got ready\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    src_qmp.execute("migrate", serde_json::json!({ "uri": incoming }));
    loop {
        let info = src_qmp.execute("query-migrate", serde_json::json!({}));
        let status = info["status"].as_str().unwrap_or("none").to_string();
        if status == "completed" {
            break;
        }
        assert!(
            !matches!(status.as_str(), "failed" | "cancelled")
                && started.elapsed() < Duration::from_secs(120),
            "migration {status}: {info}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("migration completed in {:.1?}", started.elapsed());
    {
        use std::io::Write;
        let _ = writeln!(src_qmp.out, "{}", serde_json::json!({ "execute": "quit" }));
    }
    if !matches!(src.wait_timeout(Duration::from_secs(10)), Ok(Some(_))) {
        let _ = src.kill();
    }
    let exited = dst.wait_timeout(Duration::from_secs(180)).unwrap();
    if exited.is_none() {
        let _ = dst.kill();
    }
    for d in [&mut src_blk, &mut dst_blk] {
        let _ = d.signal(libc::SIGTERM);
        let _ = d.wait_timeout(Duration::from_secs(10));
    }
    let run = GuestRun::parse(&(read("source.serial") + &read("destination.serial")));
    let dst_run = GuestRun::parse(&read("destination.serial"));
    assert!(
        exited.is_some() && run.passed(),
        "guest test failed (destination QEMU exited: {exited:?})\n{}\n{}",
        run.report(),
        logs()
    );
    assert_eq!(
        dst_run.value("last-serial"),
        Some("destination"),
        "{}",
        logs()
    );
    assert!(dst_run.check("dst-readback").is_some(), "{}", logs());
    // The lock moved: released by the source as its device stopped, taken
    // by the destination as its device started.
    let (src_log, dst_log) = (read("source-blk.log"), read("destination-blk.log"));
    assert!(src_log.contains("exclusive lock released"), "{}", logs());
    assert!(dst_log.contains("exclusive lock taken"), "{}", logs());
    eprintln!(
        "{} rounds on the source, lock handed over",
        run.value("rounds").unwrap_or("?")
    );
    let image = c.export("disk").unwrap();
    assert!(
        image[20 << 20..24 << 20] == image[0..4 << 20],
        "the destination's write is not in rbd export"
    );
}

#[test]
fn the_sandboxed_launcher_serves_an_rbd_image() {
    let Some(c) = cluster("the_sandboxed_launcher_serves_an_rbd_image") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let cfg = dir.path().join("vm.toml");
    // Backends as root: the cluster's directory is private to its owner.
    std::fs::write(
        &cfg,
        format!(
            "runtime_dir = \"{}\"\nfrontend = \"none\"\nuser = \"root\"\n[[blk]]\nid = \"rbd0\"\n\
             image = \"rbd:rbd/disk\"\nargs = [\"--ceph-conf\", \"{}\"]\n",
            run.display(),
            c.conf().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(workspace_binary("bulkhead"));
    cmd.args(["up", "--config"]).arg(&cfg).stdin(Stdio::null());
    let mut launcher = ChildGuard::spawn("bulkhead", &mut cmd).unwrap();
    // The launcher confines itself (Landlock inherited by its children) but
    // leaves TCP to them: the daemon reaches the cluster and serves.
    let socket = run.join("rbd0.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut blk = loop {
        if let Ok(b) = BlkDriver::connect(&socket, &Options::default()) {
            break b;
        }
        assert!(
            Instant::now() < deadline && matches!(launcher.try_wait(), Ok(None)),
            "the launcher's rbd0 never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let data = pattern(8, 4096);
    assert_eq!(blk.write(0, 16, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(
        blk.read(0, 16, 4096).unwrap(),
        (VIRTIO_BLK_S_OK, data.clone())
    );
    drop(blk);
    launcher.signal(libc::SIGTERM).unwrap();
    let st = launcher.wait_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(st.and_then(|s| s.code()), Some(0), "launcher exit: {st:?}");
    assert!(c.export("disk").unwrap()[16 * 512..16 * 512 + 4096] == data[..]);
}
