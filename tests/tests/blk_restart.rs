//! `bulkhead-blk` killed with SIGKILL while requests are in flight, then
//! restarted: the new process takes the inflight area the frontend hands
//! back and resubmits what was in flight, so every request the frontend
//! submitted completes exactly once and every acknowledged write is in the
//! image.

use std::time::Duration;

use bulkhead_tests::blk::{BlkDriver, Request, SECTOR_SIZE, VIRTIO_BLK_S_OK};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::Options;

const IMAGE_SIZE: u64 = 32 << 20;
/// Requests each queue keeps in flight per round (the kit's queues hold 128, indirect).
const PER_QUEUE: u64 = 64;
const REQ_BYTES: usize = 64 << 10;
const ROUNDS: u64 = 6;

fn data_for(round: u64, q: u64, i: u64) -> Vec<u8> {
    let seed = (round * 7919 + q * 104729 + i * 31) as u32;
    (0..REQ_BYTES as u32)
        .map(|b| (seed.wrapping_mul(2654435761).wrapping_add(b * 13) >> 7) as u8)
        .collect()
}

fn sector_for(q: u64, i: u64) -> u64 {
    (q * PER_QUEUE + i) * (REQ_BYTES as u64 / SECTOR_SIZE)
}

/// Submits one round of writes on every queue without waiting; returns the writes.
fn submit_round(blk: &mut BlkDriver, round: u64) -> Vec<(u64, Vec<u8>)> {
    let mut writes = Vec::new();
    for q in 0..blk.num_queues() as u64 {
        for i in 0..PER_QUEUE {
            let data = data_for(round, q, i);
            let sector = sector_for(q, i);
            blk.submit(q as usize, &Request::write(sector, data.clone()))
                .expect("submit write");
            writes.push((sector, data));
        }
    }
    writes
}

/// Reaps every pending request; each must complete once with OK.
fn reap_all(blk: &mut BlkDriver) -> usize {
    let mut n = 0;
    for q in 0..blk.num_queues() {
        while blk.pending(q) > 0 {
            let c = blk.reap(q).expect("every request completes exactly once");
            assert_eq!(c.status, VIRTIO_BLK_S_OK, "request {} failed", c.head);
            n += 1;
        }
        // Nothing completes twice: no used entry beyond those reaped.
        let extra = blk.queue(q).unwrap().wait_used(Duration::from_millis(200));
        assert!(extra.is_err(), "queue {q}: extra completion {extra:?}");
    }
    n
}

/// Heads the inflight area marks as in flight (spec layout: per queue a
/// 16-byte header then 16 bytes per descriptor, the first being the flag).
fn inflight_marked(blk: &BlkDriver) -> usize {
    use std::os::unix::fs::FileExt;
    let inf = blk.dev.inflight.as_ref().unwrap();
    let qs = u64::from(inf.info.queue_size);
    let per_queue = (16 + 16 * qs).div_ceil(64) * 64;
    let mut n = 0;
    for q in 0..u64::from(inf.info.num_queues) {
        for d in 0..qs {
            let mut flag = [0u8];
            let off = inf.info.mmap_offset + q * per_queue + 16 + 16 * d;
            inf.file.read_exact_at(&mut flag, off).unwrap();
            n += usize::from(flag[0] == 1);
        }
    }
    n
}

fn restart(scratch: Scratch, engine: &str) -> Daemon {
    // O_DIRECT keeps writes slow enough for a SIGKILL to land mid-run.
    Daemon::blk(
        scratch,
        &["--num-queues", "2", "--engine", engine, "--direct"],
    )
    .expect("restart bulkhead-blk")
}

fn kill_mid_run_and_resubmit(engine: &str) {
    let opts = Options::default().queues(2);
    let mut daemon = restart(Scratch::new(IMAGE_SIZE).unwrap(), engine);
    let mut blk = BlkDriver::connect(daemon.socket(), &opts).expect("bring-up");
    // One descriptor per request, so a 128-entry queue holds PER_QUEUE of them.
    blk.use_indirect = true;
    assert!(
        blk.dev.inflight.is_some(),
        "backend must hand out an inflight area"
    );
    let mut expected = Vec::new();
    let mut submitted = 0;
    let mut resubmitted = 0;
    for round in 0..ROUNDS {
        // Fill both rings, kick once, and SIGKILL while the backend works
        // through them: some requests done, some in flight, some not yet
        // taken off the ring.
        blk.defer_kick = true;
        expected = submit_round(&mut blk, round);
        submitted += expected.len();
        blk.kick(0).unwrap();
        blk.kick(1).unwrap();
        std::thread::sleep(Duration::from_micros(
            [0, 100, 300, 1000, 2000, 5000][round as usize % 6],
        ));
        blk.defer_kick = false;
        let scratch = daemon.kill_keep_scratch().unwrap();
        let marked = inflight_marked(&blk);
        let used: Vec<u16> = (0..2)
            .map(|q| blk.queue(q).unwrap().used_idx().unwrap())
            .collect();
        eprintln!("round {round}: {marked} in flight at the kill, used idx {used:?}");
        resubmitted += marked;
        daemon = restart(scratch, engine);
        blk = blk.reconnect(daemon.socket(), &opts).expect("reconnect");
        let done = reap_all(&mut blk);
        assert_eq!(done, expected.len(), "round {round}");
    }
    assert_eq!(submitted, ROUNDS as usize * 2 * PER_QUEUE as usize);
    eprintln!("{resubmitted} request(s) were in flight at a SIGKILL and resubmitted");
    assert!(
        resubmitted > 0,
        "no kill caught a request in flight: the resubmission path was not exercised"
    );
    daemon
        .scratch()
        .assert_holds(expected.iter().map(|(s, d)| (*s, d.as_slice())));
    // The restarted daemon serves new requests normally.
    let data = vec![0x5a; 4096];
    assert_eq!(blk.write(1, 60000, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.read(0, 60000, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));
}

#[test]
fn sigkill_mid_write_run_resubmits_inflight_exactly_once_io_uring() {
    kill_mid_run_and_resubmit("io-uring");
}

#[test]
fn sigkill_mid_write_run_resubmits_inflight_exactly_once_sync() {
    kill_mid_run_and_resubmit("sync");
}
