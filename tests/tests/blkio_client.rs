//! libblkio (the `blkio` crate's `virtio-blk-vhost-user` driver) as a
//! second, independent client of `bulkhead-blk` (issue 14): default flags on
//! both sides, no `--queue-size` on the daemon, no property set on the
//! client beyond its socket path. libblkio sets up one 256-entry ring,
//! without indirect descriptors; `bulkhead-blk`'s old default of 128 refused
//! it. The same client is proven against qemu-storage-daemon first, so a
//! failure here is Bulkhead's.
//!
//! Run `cargo build -p bulkhead-blk` first.

use std::path::Path;

use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::libblkio::LibblkioClient;

const IMAGE_SIZE: u64 = 16 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

/// Writes patterns of several sizes and alignments through libblkio, flushes,
/// reads them back through libblkio, and checks the image file too.
fn round_trips(socket: &Path, scratch: &Scratch) {
    let mut c = LibblkioClient::connect(socket, 1, 1 << 20).expect("libblkio connects and starts");
    assert_eq!(c.queue_size(), 256, "libblkio's default ring");
    assert_eq!(c.capacity(), IMAGE_SIZE);
    let cases: [(u64, usize); 5] = [
        (0, 4096),
        (8192 + 512, 512),
        (3 << 20, 65536),
        (5 << 20, 1 << 20),
        (IMAGE_SIZE - 4096, 4096),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(i as u8 + 1, len);
        c.write(offset, &data)
            .unwrap_or_else(|e| panic!("write {len} at {offset}: {e}"));
    }
    c.flush().expect("flush");
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let want = pattern(i as u8 + 1, len);
        let got = c
            .read(offset, len)
            .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}"));
        assert!(got == want, "read back {len} at {offset} differs");
        let on_disk = scratch.read_image(offset, len).unwrap();
        assert!(on_disk == want, "image at {offset} differs");
    }
}

#[test]
fn libblkio_round_trips_with_qemu_storage_daemon() {
    let d = Daemon::qsd(Scratch::new(IMAGE_SIZE).unwrap(), 1).expect("start qemu-storage-daemon");
    round_trips(d.socket(), d.scratch());
}

#[test]
fn libblkio_reads_and_writes_bulkhead_blk_with_default_flags_on_both_sides() {
    let mut d = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[])
        .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)");
    round_trips(d.socket(), d.scratch());
    // A second libblkio client after the first went away.
    let mut c = LibblkioClient::connect(d.socket(), 1, 4096).expect("second client");
    let data = pattern(77, 4096);
    c.write(8192, &data).unwrap();
    assert_eq!(c.read(8192, 4096).unwrap(), data);
    assert_eq!(
        c.get_i32("max-segments").unwrap(),
        126,
        "seg_max as libblkio read it"
    );
    drop(c);
    assert!(d.is_running());
}

#[test]
fn libblkio_keeps_many_requests_in_flight_on_bulkhead_blk() {
    let d = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[]).expect("start bulkhead-blk");
    const DEPTH: usize = 64;
    let mut c = LibblkioClient::connect(d.socket(), DEPTH, 4096).unwrap();
    for slot in 0..DEPTH {
        c.fill(slot, &pattern(slot as u8, 4096)).unwrap();
        c.submit_write(slot, slot as u64 * 4096, 4096).unwrap();
    }
    let mut done = 0;
    while done < DEPTH {
        done += c.complete(1).unwrap().len();
    }
    for slot in 0..DEPTH {
        c.submit_read(slot, (DEPTH - 1 - slot) as u64 * 4096, 4096)
            .unwrap();
    }
    let mut done = 0;
    while done < DEPTH {
        done += c.complete(1).unwrap().len();
    }
    for slot in 0..DEPTH {
        let want = pattern((DEPTH - 1 - slot) as u8, 4096);
        assert!(c.slot_bytes(slot, 4096).unwrap() == want, "slot {slot}");
    }
}
