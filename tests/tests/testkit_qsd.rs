//! Proves the test kit itself against a reference backend: qemu-storage-daemon's
//! vhost-user-blk export.

use bulkhead_tests::blk::{BlkDriver, Request, SECTOR_SIZE, VIRTIO_BLK_S_OK};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::{
    Options, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const IMAGE_SIZE: u64 = 8 << 20;

fn qsd(queues: u16) -> Daemon {
    Daemon::qsd(Scratch::new(IMAGE_SIZE).unwrap(), queues).expect("start qemu-storage-daemon")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i * 7) as u8)).collect()
}

#[test]
fn kit_reads_config_and_roundtrips_write_read_flush_with_qsd() {
    let d = qsd(1);
    let mut blk = BlkDriver::connect(d.socket(), &Options::default()).unwrap();
    assert_eq!(blk.config.capacity, IMAGE_SIZE / SECTOR_SIZE);
    eprintln!(
        "qsd offers features {:#x}, protocol {:?}; inflight fd: {}",
        blk.dev.offered_features,
        blk.dev.offered_protocol,
        blk.dev.inflight.is_some()
    );
    let data = pattern(3, 8192);
    assert_eq!(blk.write(0, 16, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.flush(0).unwrap(), VIRTIO_BLK_S_OK);
    let (st, back) = blk.read(0, 16, 8192).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(back, data);
    assert_eq!(d.scratch().read_image(16 * 512, 8192).unwrap(), data);
}

#[test]
fn kit_uses_indirect_descriptors_and_split_buffers_with_qsd() {
    let d = qsd(1);
    let mut blk = BlkDriver::connect(d.socket(), &Options::default().indirect(true)).unwrap();
    assert!(blk.dev.has_feature(VIRTIO_RING_F_INDIRECT_DESC));
    blk.use_indirect = true;
    let data = pattern(9, 4096);
    let c = blk
        .run(0, &Request::write(8, data.clone()).segs(4))
        .unwrap();
    assert_eq!(c.status, VIRTIO_BLK_S_OK);
    let c = blk.run(0, &Request::read(8, 4096).segs(3)).unwrap();
    assert_eq!((c.status, c.data), (VIRTIO_BLK_S_OK, data));
}

#[test]
fn kit_drives_two_queues_with_many_requests_in_flight_with_qsd() {
    for event_idx in [false, true] {
        let d = qsd(2);
        let opts = Options::default().queues(2).event_idx(event_idx);
        let mut blk = BlkDriver::connect(d.socket(), &opts).unwrap();
        assert_eq!(blk.num_queues(), 2);
        assert_eq!(blk.dev.has_feature(VIRTIO_RING_F_EVENT_IDX), event_idx);
        assert_eq!(blk.config.num_queues, 2);
        for q in 0..2 {
            for i in 0..16u64 {
                let sector = (q as u64 * 16 + i) * 8;
                blk.submit(q, &Request::write(sector, pattern(i as u8 + q as u8, 4096)))
                    .unwrap();
            }
        }
        for q in 0..2 {
            for _ in 0..16 {
                assert_eq!(blk.reap(q).unwrap().status, VIRTIO_BLK_S_OK);
            }
        }
        for q in 0..2 {
            for i in 0..16u64 {
                let sector = (q as u64 * 16 + i) * 8;
                let (st, back) = blk.read(q, sector, 4096).unwrap();
                assert_eq!(st, VIRTIO_BLK_S_OK);
                assert_eq!(
                    back,
                    pattern(i as u8 + q as u8, 4096),
                    "event_idx={event_idx}"
                );
            }
        }
    }
}

#[test]
fn raw_connection_speaks_vhost_user_with_qsd() {
    use bulkhead_tests::frontend::RawConnection;
    use std::time::Duration;
    use vhost::vhost_user::message::FrontendReq;
    let d = qsd(1);
    let raw = RawConnection::connect(d.socket()).unwrap();
    raw.send(FrontendReq::GET_FEATURES as u32, 0, &[], &[])
        .unwrap();
    let reply = raw.recv(Duration::from_secs(5)).unwrap().expect("a reply");
    assert_eq!(reply.request, FrontendReq::GET_FEATURES as u32);
    assert_eq!(reply.payload.len(), 8);
    let features = u64::from_le_bytes(reply.payload.try_into().unwrap());
    assert_ne!(features & VIRTIO_F_VERSION_1, 0, "VERSION_1");
}
