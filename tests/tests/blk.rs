//! Integration tests of the real `bulkhead-blk` process, driven by the test kit.
//!
//! Run `cargo build -p bulkhead-blk` first: the tests start the binary next to
//! the test executable (or `$BULKHEAD_BIN_BULKHEAD_BLK`).

use std::time::Duration;

use bulkhead_tests::blk::{
    BlkDriver, Payload, Request, SECTOR_SIZE, STATUS_UNTOUCHED, Segment, VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, header,
};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::{
    Options, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use bulkhead_tests::memory::GuestMemory;
use bulkhead_tests::virtq::{Buf, Desc};
use vhost::vhost_user::VhostUserProtocolFeatures;

const IMAGE_SIZE: u64 = 16 << 20;
const CAPACITY: u64 = IMAGE_SIZE / SECTOR_SIZE;

fn start(args: &[&str]) -> Daemon {
    start_in(Scratch::new(IMAGE_SIZE).unwrap(), args)
}

fn start_in(scratch: Scratch, args: &[&str]) -> Daemon {
    Daemon::blk(scratch, args).expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)")
}

fn connect(d: &Daemon, opts: &Options) -> BlkDriver {
    BlkDriver::connect(d.socket(), opts).expect("vhost-user bring-up")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

/// The daemon is alive and a brand-new connection can write and read.
fn assert_still_serving(d: &mut Daemon) {
    assert!(d.is_running(), "bulkhead-blk died");
    let mut blk = connect(d, &Options::default());
    let data = pattern(77, 4096);
    assert_eq!(blk.write(0, 1000, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.read(0, 1000, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));
}

/// Write, read back (from the device and the image file), flush, on queue 0.
fn roundtrip(blk: &mut BlkDriver, d: &Daemon, sector: u64, seed: u8, len: usize) {
    let data = pattern(seed, len);
    assert_eq!(blk.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.flush(0).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(
        blk.read(0, sector, len as u32).unwrap(),
        (VIRTIO_BLK_S_OK, data.clone())
    );
    let on_disk = d.scratch().read_image(sector * SECTOR_SIZE, len).unwrap();
    assert!(on_disk == data, "image file differs at sector {sector}");
}

#[test]
fn offers_the_documented_virtio_and_protocol_features_and_config() {
    let d = start(&[]);
    let blk = connect(&d, &Options::default());
    let offered = blk.dev.offered_features;
    for (name, bit) in [
        ("VERSION_1", VIRTIO_F_VERSION_1),
        ("SIZE_MAX", VIRTIO_BLK_F_SIZE_MAX),
        ("SEG_MAX", VIRTIO_BLK_F_SEG_MAX),
        ("BLK_SIZE", VIRTIO_BLK_F_BLK_SIZE),
        ("TOPOLOGY", VIRTIO_BLK_F_TOPOLOGY),
        ("FLUSH", VIRTIO_BLK_F_FLUSH),
        ("CONFIG_WCE", VIRTIO_BLK_F_CONFIG_WCE),
        ("DISCARD", VIRTIO_BLK_F_DISCARD),
        ("WRITE_ZEROES", VIRTIO_BLK_F_WRITE_ZEROES),
        ("MQ", VIRTIO_BLK_F_MQ),
        ("EVENT_IDX", VIRTIO_RING_F_EVENT_IDX),
        ("INDIRECT_DESC", VIRTIO_RING_F_INDIRECT_DESC),
    ] {
        assert!(offered & bit != 0, "feature {name} not offered");
    }
    assert_eq!(
        offered & VIRTIO_BLK_F_RO,
        0,
        "RO offered without --readonly"
    );
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::LOG_SHMFD;
    // Live migration: dirty logging (QEMU blocks migration without both).
    assert!(
        offered & bulkhead_tests::frontend::VHOST_F_LOG_ALL != 0,
        "VHOST_F_LOG_ALL not offered"
    );
    assert!(
        blk.dev.offered_protocol.contains(want),
        "protocol features {:?}",
        blk.dev.offered_protocol
    );
    assert!(blk.dev.inflight.is_some(), "GET_INFLIGHT_FD gave no area");
    let c = blk.config;
    assert_eq!(c.capacity, CAPACITY);
    assert_eq!(c.blk_size, 512);
    assert!(c.seg_max >= 1, "seg_max {}", c.seg_max);
    assert!(c.size_max >= 4096, "size_max {}", c.size_max);
    assert!(c.num_queues >= 1);
    assert!(c.max_discard_sectors > 0 && c.max_discard_seg > 0);
    assert!(c.max_write_zeroes_sectors > 0 && c.max_write_zeroes_seg > 0);
}

#[test]
fn write_read_and_flush_roundtrip_to_the_image_with_the_io_uring_engine() {
    let d = start(&["--engine", "io-uring"]);
    let mut blk = connect(&d, &Options::default());
    roundtrip(&mut blk, &d, 0, 1, 512);
    roundtrip(&mut blk, &d, 8, 2, 65536);
    roundtrip(&mut blk, &d, CAPACITY - 8, 3, 4096);
}

#[test]
fn on_tmpfs_writes_and_reads_served_in_the_queue_thread_roundtrip_to_the_image() {
    // On a tmpfs the io_uring engine does reads and writes in the queue
    // thread (engine/inline.rs); the data must land exactly as through the ring.
    let shm = std::path::Path::new("/dev/shm");
    let d = start_in(
        Scratch::new_in(shm, IMAGE_SIZE).unwrap(),
        &["--engine", "io-uring"],
    );
    let mut blk = connect(&d, &Options::default());
    roundtrip(&mut blk, &d, 0, 11, 512);
    roundtrip(&mut blk, &d, 8, 12, 65536);
    roundtrip(&mut blk, &d, CAPACITY - 8, 13, 4096);
    let data = pattern(14, 16384);
    let c = blk
        .run(0, &Request::write(200, data.clone()).segs(8))
        .unwrap();
    assert_eq!(c.status, VIRTIO_BLK_S_OK);
    let c = blk.run(0, &Request::read(200, 16384).segs(5)).unwrap();
    assert_eq!((c.status, c.data), (VIRTIO_BLK_S_OK, data.clone()));
    assert!(d.scratch().read_image(200 * SECTOR_SIZE, 16384).unwrap() == data);
    // Past the end: refused, and the image does not grow.
    let c = blk
        .run(0, &Request::write(CAPACITY, pattern(15, 4096)))
        .unwrap();
    assert_ne!(c.status, VIRTIO_BLK_S_OK);
    let len = std::fs::metadata(d.scratch().image()).unwrap().len();
    assert_eq!(len, IMAGE_SIZE);
}

#[test]
fn write_read_and_flush_roundtrip_to_the_image_with_the_sync_engine() {
    let d = start(&["--engine", "sync"]);
    let mut blk = connect(&d, &Options::default());
    roundtrip(&mut blk, &d, 0, 4, 512);
    roundtrip(&mut blk, &d, 8, 5, 65536);
    roundtrip(&mut blk, &d, CAPACITY - 8, 6, 4096);
}

#[test]
fn reads_see_data_already_in_the_image_file() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let data = pattern(42, 8192);
    scratch.write_image(100 * SECTOR_SIZE, &data).unwrap();
    let d = start_in(scratch, &[]);
    let mut blk = connect(&d, &Options::default());
    assert_eq!(blk.read(0, 100, 8192).unwrap(), (VIRTIO_BLK_S_OK, data));
}

#[test]
fn data_split_over_many_descriptors_is_gathered_and_scattered() {
    let d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    let data = pattern(8, 16384);
    let c = blk
        .run(0, &Request::write(64, data.clone()).segs(8))
        .unwrap();
    assert_eq!(c.status, VIRTIO_BLK_S_OK);
    let c = blk.run(0, &Request::read(64, 16384).segs(5)).unwrap();
    assert_eq!((c.status, c.data), (VIRTIO_BLK_S_OK, data));
}

#[test]
fn get_id_returns_the_serial_given_on_the_command_line() {
    let d = start(&["--serial", "bulkhead-disk-7"]);
    let mut blk = connect(&d, &Options::default());
    let (st, id) = blk.get_id(0).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    // A NUL-padded string: the serial, then NUL.
    assert_eq!(&id[..15], b"bulkhead-disk-7", "id {id:?}");
    assert_eq!(id[15], 0, "id not NUL-terminated: {id:?}");
}

#[test]
fn discard_punches_a_hole_that_reads_back_as_zeroes_in_the_image() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    scratch.write_image(0, &vec![0xab; 2 << 20]).unwrap();
    let d = start_in(scratch, &[]);
    let before = d.scratch().image_allocated().unwrap();
    let mut blk = connect(&d, &Options::default());
    let n = blk.config.max_discard_sectors.min(2048);
    assert!(n >= 8, "max_discard_sectors {n}");
    let seg = Segment {
        sector: 0,
        num_sectors: n,
        unmap: false,
    };
    assert_eq!(blk.discard(0, &[seg]).unwrap(), VIRTIO_BLK_S_OK);
    let len = n as usize * 512;
    let img = d.scratch().read_image(0, len + 512).unwrap();
    assert!(
        img[..len].iter().all(|&b| b == 0),
        "discarded range not zero"
    );
    assert!(
        img[len..].iter().all(|&b| b == 0xab),
        "discard went too far"
    );
    let after = d.scratch().image_allocated().unwrap();
    assert!(
        after < before,
        "no hole punched: {before} -> {after} bytes allocated"
    );
    assert_eq!(
        blk.read(0, 0, 512).unwrap(),
        (VIRTIO_BLK_S_OK, vec![0; 512])
    );
}

#[test]
fn write_zeroes_zeroes_exactly_the_requested_ranges_in_the_image() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    scratch.write_image(0, &vec![0xcd; 1 << 20]).unwrap();
    let d = start_in(scratch, &[]);
    let mut blk = connect(&d, &Options::default());
    let segs = [
        Segment {
            sector: 8,
            num_sectors: 8,
            unmap: false,
        },
        Segment {
            sector: 64,
            num_sectors: 16,
            unmap: true,
        },
    ];
    let nsegs = (blk.config.max_write_zeroes_seg as usize).clamp(1, 2);
    assert_eq!(
        blk.write_zeroes(0, &segs[..nsegs]).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let img = d.scratch().read_image(0, 128 * 512).unwrap();
    for (i, chunk) in img.chunks(512).enumerate() {
        let zeroed = segs[..nsegs]
            .iter()
            .any(|s| (s.sector..s.sector + u64::from(s.num_sectors)).contains(&(i as u64)));
        let want = if zeroed { 0 } else { 0xcd };
        assert!(chunk.iter().all(|&b| b == want), "sector {i} wrong");
    }
}

#[test]
fn two_queues_serve_many_requests_in_flight_each() {
    let d = start(&["--num-queues", "2"]);
    let mut blk = connect(&d, &Options::default().queues(2));
    assert_eq!(blk.dev.queue_num, 2);
    assert_eq!(blk.config.num_queues, 2);
    for q in 0..2 {
        for i in 0..32u64 {
            let sector = (q as u64 * 32 + i) * 8;
            let req = Request::write(sector, pattern((q * 32) as u8 + i as u8, 4096));
            blk.submit(q, &req).unwrap();
        }
    }
    for q in 0..2 {
        for _ in 0..32 {
            assert_eq!(blk.reap(q).unwrap().status, VIRTIO_BLK_S_OK);
        }
    }
    for q in 0..2 {
        for i in 0..32u64 {
            let sector = ((1 - q) as u64 * 32 + i) * 8;
            let (st, data) = blk.read(q, sector, 4096).unwrap();
            assert_eq!(st, VIRTIO_BLK_S_OK);
            assert!(data == pattern(((1 - q) * 32) as u8 + i as u8, 4096));
        }
    }
}

fn deep_queue_roundtrip(event_idx: bool) {
    let d = start(&[]);
    let mut blk = connect(&d, &Options::default().event_idx(event_idx).queue_size(64));
    assert_eq!(blk.dev.has_feature(VIRTIO_RING_F_EVENT_IDX), event_idx);
    // Several rounds so the ring indexes wrap past the queue size.
    for round in 0..4u64 {
        for i in 0..20u64 {
            let req = Request::write(i * 8, pattern((round * 20 + i) as u8, 4096));
            blk.submit(0, &req).unwrap();
        }
        for _ in 0..20 {
            assert_eq!(blk.reap(0).unwrap().status, VIRTIO_BLK_S_OK);
        }
        for i in 0..20u64 {
            blk.submit(0, &Request::read(i * 8, 4096)).unwrap();
        }
        let mut done = 0;
        while done < 20 {
            let c = blk.reap(0).unwrap();
            assert_eq!(c.status, VIRTIO_BLK_S_OK);
            done += 1;
        }
    }
    for i in 0..20u64 {
        let (_, data) = blk.read(0, i * 8, 4096).unwrap();
        assert!(
            data == pattern((3 * 20 + i) as u8, 4096),
            "sector {}",
            i * 8
        );
    }
    if event_idx {
        assert_ne!(
            blk.queue(0).unwrap().avail_event().unwrap(),
            0,
            "avail_event never written"
        );
    }
}

#[test]
fn event_idx_negotiated_deep_queue_completes_and_notifies() {
    deep_queue_roundtrip(true);
}

#[test]
fn event_idx_refused_deep_queue_completes_and_notifies() {
    deep_queue_roundtrip(false);
}

#[test]
fn indirect_descriptor_tables_carry_whole_requests() {
    let d = start(&[]);
    let mut blk = connect(&d, &Options::default().indirect(true));
    assert!(blk.dev.has_feature(VIRTIO_RING_F_INDIRECT_DESC));
    blk.use_indirect = true;
    let data = pattern(11, 8192);
    let c = blk
        .run(0, &Request::write(16, data.clone()).segs(4))
        .unwrap();
    assert_eq!(c.status, VIRTIO_BLK_S_OK);
    let c = blk.run(0, &Request::read(16, 8192).segs(2)).unwrap();
    assert_eq!((c.status, c.data), (VIRTIO_BLK_S_OK, data));
    assert_eq!(blk.flush(0).unwrap(), VIRTIO_BLK_S_OK);
}

#[test]
fn readonly_offers_ro_and_fails_writes_with_ioerr_leaving_the_image_unchanged() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let orig = pattern(5, 4096);
    scratch.write_image(0, &orig).unwrap();
    let mut d = start_in(scratch, &["--readonly"]);
    let mut blk = connect(&d, &Options::default());
    assert_ne!(
        blk.dev.offered_features & VIRTIO_BLK_F_RO,
        0,
        "RO not offered"
    );
    assert_eq!(blk.write(0, 0, &[0u8; 4096]).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!(
        blk.read(0, 0, 4096).unwrap(),
        (VIRTIO_BLK_S_OK, orig.clone())
    );
    assert_eq!(d.scratch().read_image(0, 4096).unwrap(), orig);
    drop(blk);
    assert!(d.is_running());
}

#[test]
fn out_of_range_sectors_fail_with_ioerr() {
    let mut d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    assert_eq!(blk.read(0, CAPACITY, 512).unwrap().0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        blk.read(0, CAPACITY - 1, 1024).unwrap().0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        blk.write(0, CAPACITY, &[1; 512]).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    // Sector * 512 overflows u64.
    assert_eq!(
        blk.read(0, u64::MAX / 256, 512).unwrap().0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        blk.write(0, u64::MAX, &[1; 512]).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    let seg = Segment {
        sector: CAPACITY - 4,
        num_sectors: 8,
        unmap: false,
    };
    assert_eq!(blk.write_zeroes(0, &[seg]).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!(blk.read(0, CAPACITY - 1, 512).unwrap().0, VIRTIO_BLK_S_OK);
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn unknown_request_type_fails_with_unsupp() {
    let mut d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    for kind in [2u32, 0xdead, u32::MAX] {
        let c = blk
            .run(0, &Request::new(kind, 0, Payload::In(512)))
            .unwrap();
        assert_eq!(c.status, VIRTIO_BLK_S_UNSUPP, "type {kind:#x}");
    }
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn header_split_over_two_descriptors_is_accepted() {
    let d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    let data = pattern(13, 4096);
    let c = blk
        .run(0, &Request::write(24, data.clone()).split_header())
        .unwrap();
    assert_eq!(c.status, VIRTIO_BLK_S_OK);
    let c = blk.run(0, &Request::read(24, 4096).split_header()).unwrap();
    assert_eq!((c.status, c.data), (VIRTIO_BLK_S_OK, data));
}

#[test]
fn header_and_status_sharing_one_odd_layout_still_work() {
    // Header, data and status as separate buffers but the data of a read split at
    // an odd boundary: any framing is allowed by the spec.
    let d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    let data = pattern(21, 1024);
    assert_eq!(blk.write(0, 40, &data).unwrap(), VIRTIO_BLK_S_OK);
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 40)).unwrap();
    let buf = mem.alloc(1024, 64).unwrap();
    let st = mem.alloc_with(&[STATUS_UNTOUCHED]).unwrap();
    let bufs = [
        Buf::readable(hdr, 16),
        Buf::writable(buf, 3),
        Buf::writable(buf + 3, 1021),
        Buf::writable(st, 1),
    ];
    let head = blk.submit_raw(0, &bufs, false).unwrap();
    let used = blk.reap_raw(0).unwrap();
    assert_eq!(used.id, u32::from(head));
    assert_eq!(mem.read_vec(st, 1).unwrap(), [VIRTIO_BLK_S_OK]);
    assert_eq!(mem.read_vec(buf, 1024).unwrap(), data);
    assert_eq!(used.len, 1025, "used len = data + status");
}

/// Publishes the chain `layout` builds and checks the daemon completes it with used
/// len 0, leaves the status byte alone, and keeps serving.
fn assert_guest_error_completes_with_zero_len(layout: impl FnOnce(&GuestMemory) -> Vec<Buf>) {
    let mut d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    let mem = blk.dev.mem.clone();
    let bufs = layout(&mem);
    let head = blk.submit_raw(0, &bufs, false).unwrap();
    let used = blk.reap_raw(0).unwrap();
    assert_eq!(used.id, u32::from(head));
    assert_eq!(used.len, 0, "guest error must complete with used len 0");
    // The same connection keeps working.
    assert_eq!(blk.write(0, 0, &[9; 512]).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(
        blk.read(0, 0, 512).unwrap(),
        (VIRTIO_BLK_S_OK, vec![9; 512])
    );
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn chain_too_short_for_the_header_fails_with_ioerr_and_daemon_keeps_serving() {
    let mut d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let st = mem.alloc_with(&[STATUS_UNTOUCHED]).unwrap();
    let bufs = vec![Buf::readable(hdr, 8), Buf::writable(st, 1)];
    let head = blk.submit_raw(0, &bufs, false).unwrap();
    let used = blk.reap_raw(0).unwrap();
    assert_eq!((used.id, used.len), (u32::from(head), 1));
    assert_eq!(mem.read_vec(st, 1).unwrap(), [VIRTIO_BLK_S_IOERR]);
    assert_eq!(blk.write(0, 0, &[9; 512]).unwrap(), VIRTIO_BLK_S_OK);
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn chain_without_a_status_byte_completes_with_zero_len_and_daemon_keeps_serving() {
    assert_guest_error_completes_with_zero_len(|mem| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_OUT, 0)).unwrap();
        let data = mem.alloc_with(&[1; 512]).unwrap();
        vec![Buf::readable(hdr, 16), Buf::readable(data, 512)]
    });
}

#[test]
fn chain_with_only_a_header_completes_with_zero_len_and_daemon_keeps_serving() {
    assert_guest_error_completes_with_zero_len(|mem| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        vec![Buf::readable(hdr, 16)]
    });
}

#[test]
fn data_length_not_a_multiple_of_512_fails_with_ioerr() {
    let mut d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    assert_eq!(blk.write(0, 0, &[3; 1000]).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!(blk.read(0, 0, 100).unwrap().0, VIRTIO_BLK_S_IOERR);
    assert_eq!(blk.read(0, 0, 513).unwrap().0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.scratch().read_image(0, 1000).unwrap(), vec![0; 1000]);
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn reconnect_after_disconnect_starts_fresh_and_keeps_the_data() {
    let mut d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    for i in 0..5u64 {
        assert_eq!(
            blk.write(0, i * 8, &pattern(i as u8, 4096)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
    drop(blk);
    // New memory, new rings starting at index 0, other features: a fresh device.
    for event_idx in [false, true] {
        let mut blk = connect(&d, &Options::default().event_idx(event_idx));
        for i in 0..5u64 {
            let (st, data) = blk.read(0, i * 8, 4096).unwrap();
            assert_eq!(st, VIRTIO_BLK_S_OK);
            assert!(data == pattern(i as u8, 4096));
        }
    }
    assert_still_serving(&mut d);
}

#[test]
fn disconnect_with_requests_in_flight_leaves_the_daemon_serving() {
    let mut d = start(&["--num-queues", "2"]);
    let mut blk = connect(&d, &Options::default().queues(2));
    for q in 0..2 {
        for i in 0..16u64 {
            blk.submit(q, &Request::write(i * 128, vec![q as u8; 65536]))
                .unwrap();
        }
    }
    drop(blk);
    std::thread::sleep(Duration::from_millis(100));
    assert_still_serving(&mut d);
}

#[test]
fn direct_io_roundtrips_with_both_engines() {
    for engine in ["io-uring", "sync"] {
        let d = start(&["--direct", "--engine", engine]);
        let mut blk = connect(&d, &Options::default());
        roundtrip(&mut blk, &d, 8, 31, 4096);
        roundtrip(&mut blk, &d, 4096, 32, 131072);
    }
}

#[test]
fn daemon_keeps_running_idle_until_killed_by_its_pid() {
    let mut d = start(&[]);
    let pid = d.pid();
    assert!(pid > 0);
    assert!(d.still_running_after(Duration::from_millis(200)));
    d.kill().unwrap();
    assert!(!d.is_running());
}

/// Polls used->idx (without touching used_event) until it reaches `want`.
fn spin_until_used_idx(blk: &mut BlkDriver, want: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while blk.queue(0).unwrap().used_idx().unwrap() != want {
        assert!(std::time::Instant::now() < deadline, "used idx stuck");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn event_idx_calls_are_suppressed_until_used_event_is_reached() {
    let d = start(&[]);
    let mut blk = connect(&d, &Options::default().event_idx(true));
    assert!(blk.dev.has_feature(VIRTIO_RING_F_EVENT_IDX));
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let buf = mem.alloc(512, 4096).unwrap();
    let st = mem.alloc(1, 64).unwrap();
    let bufs = [
        Buf::readable(hdr, 16),
        Buf::writable(buf, 512),
        Buf::writable(st, 1),
    ];
    // One full round trip first: a device may always signal its first completion.
    assert_eq!(blk.read(0, 0, 512).unwrap().0, VIRTIO_BLK_S_OK);
    // Ask for a call only when the third next request completes (used idx 3 -> 4).
    let q = blk.queue(0).unwrap();
    q.set_used_event(3).unwrap();
    while q.wait_call(Duration::ZERO).unwrap() {}
    for used in [2u16, 3] {
        blk.submit_raw(0, &bufs, false).unwrap();
        spin_until_used_idx(&mut blk, used);
        let q = blk.queue(0).unwrap();
        assert!(
            !q.wait_call(Duration::from_millis(50)).unwrap(),
            "call for used idx {used} before used_event 3"
        );
    }
    blk.submit_raw(0, &bufs, false).unwrap();
    spin_until_used_idx(&mut blk, 4);
    let q = blk.queue(0).unwrap();
    assert!(
        q.wait_call(Duration::from_secs(5)).unwrap(),
        "no call at used_event"
    );
}

#[test]
fn no_interrupt_flag_suppresses_calls_without_event_idx() {
    let d = start(&[]);
    let mut blk = connect(&d, &Options::default().event_idx(false));
    assert_eq!(blk.read(0, 0, 512).unwrap().0, VIRTIO_BLK_S_OK);
    let q = blk.queue(0).unwrap();
    q.set_avail_flags(bulkhead_tests::virtq::VIRTQ_AVAIL_F_NO_INTERRUPT)
        .unwrap();
    while q.wait_call(Duration::ZERO).unwrap() {}
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let buf = mem.alloc(512, 4096).unwrap();
    let st = mem.alloc(1, 64).unwrap();
    let bufs = [
        Buf::readable(hdr, 16),
        Buf::writable(buf, 512),
        Buf::writable(st, 1),
    ];
    blk.submit_raw(0, &bufs, false).unwrap();
    spin_until_used_idx(&mut blk, 2);
    let q = blk.queue(0).unwrap();
    assert!(
        !q.wait_call(Duration::from_millis(100)).unwrap(),
        "call despite NO_INTERRUPT"
    );
    q.set_avail_flags(0).unwrap();
    blk.submit_raw(0, &bufs, false).unwrap();
    spin_until_used_idx(&mut blk, 3);
    assert!(
        blk.queue(0)
            .unwrap()
            .wait_call(Duration::from_secs(5))
            .unwrap()
    );
}

#[test]
fn descriptor_outside_guest_memory_completes_with_zero_len_and_daemon_keeps_serving() {
    assert_guest_error_completes_with_zero_len(|mem| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        let st = mem.alloc(1, 64).unwrap();
        let end = mem.layout()[0].guest_addr + mem.layout()[0].size;
        vec![
            Buf::readable(hdr, 16),
            Buf::writable(end - 256, 512),
            Buf::writable(st, 1),
        ]
    });
}

#[test]
fn descriptor_chain_loop_completes_with_zero_len_and_daemon_keeps_serving() {
    let mut d = start(&[]);
    let mut blk = connect(&d, &Options::default());
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let buf = mem.alloc(512, 4096).unwrap();
    let q = blk.queue(0).unwrap();
    let (a, b) = (q.reserve_desc().unwrap(), q.reserve_desc().unwrap());
    let next = bulkhead_tests::virtq::VIRTQ_DESC_F_NEXT;
    let write = bulkhead_tests::virtq::VIRTQ_DESC_F_WRITE;
    q.write_desc(
        a,
        Desc {
            addr: hdr,
            len: 16,
            flags: next,
            next: b,
        },
    )
    .unwrap();
    q.write_desc(
        b,
        Desc {
            addr: buf,
            len: 512,
            flags: next | write,
            next: b,
        },
    )
    .unwrap();
    q.publish(a).unwrap();
    q.kick().unwrap();
    let used = q.wait_used(Duration::from_secs(10)).unwrap();
    assert_eq!((used.id, used.len), (u32::from(a), 0));
    q.release_desc(a);
    q.release_desc(b);
    assert_eq!(blk.write(0, 0, &[9; 512]).unwrap(), VIRTIO_BLK_S_OK);
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn every_option_in_help_is_documented_in_docs_blk_md() {
    let help =
        std::process::Command::new(bulkhead_tests::process::workspace_binary("bulkhead-blk"))
            .arg("--help")
            .output()
            .expect("bulkhead-blk --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let doc = std::fs::read_to_string(bulkhead_tests::guest::repo_root().join("docs/blk.md"))
        .expect("docs/blk.md");
    let flags: Vec<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .filter(|w| !["--help", "--version"].contains(w))
        .collect();
    assert!(flags.contains(&"--poll-max-us"), "{help}");
    for flag in flags {
        assert!(
            doc.contains(&format!("`{flag}")),
            "docs/blk.md lacks {flag}"
        );
    }
}
