//! Dirty-page logging for live migration, end to end: the test kit hands a
//! real daemon a log the way QEMU does when a migration starts (LOG_SHMFD,
//! SET_LOG_BASE with a memfd, `VHOST_F_LOG_ALL`, rings with
//! `VHOST_VRING_F_LOG`), drives I/O, and checks that exactly the pages the
//! device wrote have their bit set: data it read in, status bytes, used
//! rings; never the buffers it only read, and nothing while logging is off.
//!
//! Run `cargo build -p bulkhead-blk -p bulkhead-net` first. The net test
//! needs root (a namespace with a tap) and is skipped elsewhere.

use std::collections::BTreeSet;

use bulkhead_tests::blk::{BlkDriver, SECTOR_SIZE, VIRTIO_BLK_S_OK, header};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::{DirtyLog, LOG_PAGE_SIZE, Options, pages_of};
use bulkhead_tests::net::{NetDaemon, NetDriver, NetHdr, arp_request};
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::skip::skip_if;
use bulkhead_tests::virtq::{Buf, VirtQueue};

use bulkhead_spec::blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const IMAGE_SIZE: u64 = 16 << 20;

fn set(pages: impl IntoIterator<Item = u64>) -> BTreeSet<u64> {
    pages.into_iter().collect()
}

/// Pages of queue `q`'s used ring (flags, entries, index, avail event).
fn used_ring_pages(q: &VirtQueue) -> BTreeSet<u64> {
    let len = 6 + 8 * u64::from(q.size());
    set(pages_of(q.addrs().used, len))
}

/// Checks the log holds exactly `written` plus, at most, used-ring pages
/// of `rings` (which pages of a ring get written depends on the slot; an
/// idle queue writes its flags or avail event too), and at least one page
/// of each of the first `busy` rings.
fn assert_logged(log: &DirtyLog, written: &BTreeSet<u64>, rings: &[BTreeSet<u64>], busy: usize) {
    let dirty = set(log.pages());
    let ring_pages: BTreeSet<u64> = rings.iter().flatten().copied().collect();
    let missing: Vec<_> = written.difference(&dirty).collect();
    assert!(
        missing.is_empty(),
        "pages written but not logged: {missing:?} (log {dirty:?})"
    );
    let extra: Vec<_> = dirty
        .difference(written)
        .filter(|p| !ring_pages.contains(p))
        .collect();
    assert!(
        extra.is_empty(),
        "pages logged but never written: {extra:?}"
    );
    for r in &rings[..busy] {
        assert!(
            !r.is_disjoint(&dirty),
            "used ring (pages {r:?}) not logged: {dirty:?}"
        );
    }
}

/// Blk: a read lands in pages 1..=3 of a chunk (from 0x800 into page 3), the
/// status byte in page 6; the header (page 0) and pages 4, 5, 7 stay clean.
/// A write dirties only its status byte and the used ring.
#[test]
fn blk_reads_and_writes_log_exactly_the_pages_the_device_wrote() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    scratch.write_image(64 * SECTOR_SIZE, &data).unwrap();
    let d =
        Daemon::blk(scratch, &[]).expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)");
    let opts = Options::default().dirty_log().queues(1);
    let mut blk = BlkDriver::connect(d.socket(), &opts).expect("vhost-user bring-up");
    let mem = blk.dev.mem.clone();
    let base = mem.alloc(8 * LOG_PAGE_SIZE, LOG_PAGE_SIZE).unwrap();
    let page0 = base / LOG_PAGE_SIZE;
    let hdr = base;
    let buf = base + LOG_PAGE_SIZE + 0x800;
    let status = base + 6 * LOG_PAGE_SIZE + 7;
    let read = |blk: &mut BlkDriver| {
        mem.write(hdr, &header(VIRTIO_BLK_T_IN, 64)).unwrap();
        mem.write(status, &[0xff]).unwrap();
        let bufs = [
            Buf::readable(hdr, 16),
            Buf::writable(buf, 4096),
            Buf::writable(buf + 4096, 4096),
            Buf::writable(status, 1),
        ];
        blk.submit_raw(0, &bufs, false).unwrap();
        let used = blk.reap_raw(0).unwrap();
        assert_eq!(used.len, 8193);
        assert_eq!(mem.read_vec(status, 1).unwrap(), [VIRTIO_BLK_S_OK]);
        assert_eq!(mem.read_vec(buf, 8192).unwrap(), data);
    };

    read(&mut blk);
    let log = blk.dev.start_dirty_log().expect("start the dirty log");
    assert!(log.pages().is_empty(), "a fresh log is clear");
    let ring = used_ring_pages(&blk.dev.queues[0]);
    read(&mut blk);
    let written = set([page0 + 1, page0 + 2, page0 + 3, page0 + 6]);
    assert_logged(&log, &written, std::slice::from_ref(&ring), 1);
    for clean in [page0, page0 + 4, page0 + 5, page0 + 7] {
        assert!(!log.pages().contains(&clean), "page {clean} logged");
    }

    // A write: the device reads the data and writes only the status byte.
    log.clear().unwrap();
    mem.write(hdr, &header(VIRTIO_BLK_T_OUT, 128)).unwrap();
    mem.write(buf, &data[..4096]).unwrap();
    let bufs = [
        Buf::readable(hdr, 16),
        Buf::readable(buf, 4096),
        Buf::writable(status, 1),
    ];
    blk.submit_raw(0, &bufs, false).unwrap();
    assert_eq!(blk.reap_raw(0).unwrap().len, 1);
    assert_logged(&log, &set([page0 + 6]), std::slice::from_ref(&ring), 1);

    // Logging stopped: nothing more is marked.
    blk.dev.stop_dirty_log().unwrap();
    log.clear().unwrap();
    read(&mut blk);
    assert_eq!(log.pages(), Vec::<u64>::new());
}

/// A log too small for the memory table is refused, and the connection
/// with it: the frontend learns at once instead of migrating a guest whose
/// device writes go unlogged.
#[test]
fn blk_refuses_a_log_too_small_for_guest_memory() {
    let d = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[])
        .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)");
    let opts = Options::default().dirty_log().queues(1);
    let blk = BlkDriver::connect(d.socket(), &opts).expect("vhost-user bring-up");
    let mut d = d;
    // The kit's memory is 64 MiB: 2 KiB of log; offer half.
    let log = DirtyLog::new(32 << 20).unwrap();
    let region = vhost::VhostUserDirtyLogRegion {
        mmap_size: log.size,
        mmap_offset: 0,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&log.file),
    };
    use vhost::VhostBackend;
    assert!(blk.dev.frontend.set_log_base(0, Some(region)).is_err());
    assert!(d.is_running(), "bulkhead-blk died on a bad log");
}

const TAP: &str = "bhtapm0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];

/// Net receive: a frame read from the tap into a buffer that straddles a
/// page boundary logs exactly the pages its bytes landed in (the rest of
/// the buffer stays clean), plus the used rings.
#[test]
fn net_receive_logs_the_pages_the_frame_landed_in() {
    if skip_if(
        "net_receive_logs_the_pages_the_frame_landed_in",
        netns::unavailable(),
    ) {
        return;
    }
    let ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, "10.78.0.1/24", false).expect("add the tap");
    let fds = ns.open_tap_fds(TAP, 1, false).expect("open the tap");
    let daemon = NetDaemon::start_with_fds(fds, &[])
        .expect("start bulkhead-net (run `cargo build -p bulkhead-net`)");
    let opts = Options::default().dirty_log();
    let mut net = NetDriver::connect(daemon.socket(), &opts).expect("vhost-user bring-up");
    let log = net.dev.start_dirty_log().expect("start the dirty log");
    let mem = net.dev.mem.clone();
    let base = mem.alloc(4 * LOG_PAGE_SIZE, LOG_PAGE_SIZE).unwrap();
    let page0 = base / LOG_PAGE_SIZE;
    // 20 bytes before a page boundary, three pages long.
    let buf = base + LOG_PAGE_SIZE - 20;
    net.submit_raw(0, &[Buf::writable(buf, 3 * 4096)], false)
        .unwrap();
    let req = arp_request(GUEST_MAC, [10, 78, 0, 2], [10, 78, 0, 1]);
    net.send(0, &NetHdr::default(), &req).expect("send ARP");
    let used = net.reap_raw(0).expect("a frame from the namespace");
    assert!(used.len > 20, "frame of {} bytes", used.len);
    let written = set(pages_of(buf, u64::from(used.len)));
    assert_eq!(written, set([page0, page0 + 1]));
    // Receive and transmit rings first: those two must show up.
    let rings: Vec<_> = net.dev.queues.iter().map(used_ring_pages).collect();
    let dirty = set(log.pages());
    assert!(
        !dirty.contains(&(page0 + 2)),
        "rest of the buffer logged: {dirty:?}"
    );
    assert_logged(&log, &written, &rings, 2);
    // The daemon goes before the namespace.
    drop(net);
    drop(daemon);
    drop(ns);
}

/// SET_LOG_FD (which the `vhost` crate leaves to the serve loop) takes an
/// eventfd and the connection goes on; anything else is refused and the
/// connection closed, the daemon serving the next frontend.
#[test]
fn blk_keeps_a_log_eventfd_and_refuses_other_fds() {
    use std::os::fd::AsRawFd;
    use vhost::VhostBackend;
    let mut d = Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), &[])
        .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)");
    let opts = Options::default().dirty_log().queues(1);
    let mut blk = BlkDriver::connect(d.socket(), &opts).expect("vhost-user bring-up");
    let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    blk.dev
        .frontend
        .set_log_fd(efd.as_raw_fd())
        .expect("SET_LOG_FD with an eventfd");
    let data = vec![7u8; 4096];
    assert_eq!(blk.write(0, 8, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.read(0, 8, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));

    let (r, _w) = std::io::pipe().unwrap();
    assert!(blk.dev.frontend.set_log_fd(r.as_raw_fd()).is_err());
    drop(blk);
    assert!(d.is_running(), "bulkhead-blk died on a bad log fd");
    let mut again = BlkDriver::connect(d.socket(), &opts).expect("the next frontend");
    assert_eq!(again.flush(0).unwrap(), VIRTIO_BLK_S_OK);
}

/// The frame SEND_RARP must put on the tap for `mac`: QEMU's announcement
/// (a broadcast RARP reverse request from and for `mac`, 60 bytes).
fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..22].copy_from_slice(&[0x80, 0x35, 0, 1, 0x08, 0x00, 6, 4, 0, 3]);
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

/// SEND_RARP, which QEMU sends on a migration's destination once the guest
/// runs there (the guest not having acked GUEST_ANNOUNCE): bulkhead-net
/// offers the RARP protocol feature and puts the announcement on its tap.
/// A MAC no guest can own, or the message from a frontend that did not ack
/// the feature, is refused with a NACK and serving goes on; a malformed
/// message closes the connection and the daemon serves the next frontend.
#[test]
fn net_announces_the_guest_on_its_tap_after_send_rarp() {
    use bulkhead_tests::frontend::RawConnection;
    use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};
    if skip_if(
        "net_announces_the_guest_on_its_tap_after_send_rarp",
        netns::unavailable(),
    ) {
        return;
    }
    const NEED_REPLY: u32 = 0x8;
    let send_rarp = FrontendReq::SEND_RARP as u32;
    let ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, "10.78.0.1/24", false).expect("add the tap");
    let capture = ns.packet_socket(TAP, false).expect("packet socket");
    let fds = ns.open_tap_fds(TAP, 1, false).expect("open the tap");
    let mut daemon = NetDaemon::start_with_fds(fds, &[])
        .expect("start bulkhead-net (run `cargo build -p bulkhead-net`)");
    let rarps = |mac: [u8; 6]| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            if let Some(c) = capture.recv(left).expect("capture")
                && c.frame.len() >= 14
                && c.frame[12..14] == [0x80, 0x35]
                && c.frame[6..12] == mac
            {
                got.push(c.frame);
            }
        }
        got
    };
    let ack = |raw: &RawConnection| -> u64 {
        let r = raw
            .recv(std::time::Duration::from_secs(5))
            .expect("reply")
            .expect("the connection stays open");
        assert_eq!(r.request, send_rarp);
        u64::from_le_bytes(r.payload[..8].try_into().expect("a u64"))
    };
    let payload = |mac: [u8; 6]| {
        let mut p = [0u8; 8];
        p[..6].copy_from_slice(&mac);
        p
    };

    let mut opts = Options::default();
    opts.protocol_features |= VhostUserProtocolFeatures::RARP;
    let mut net = NetDriver::connect(daemon.socket(), &opts).expect("vhost-user bring-up");
    assert!(
        net.dev
            .acked_protocol
            .contains(VhostUserProtocolFeatures::RARP),
        "bulkhead-net does not offer RARP"
    );
    let raw = RawConnection::from_frontend(&net.dev.frontend).expect("raw connection");
    raw.send(send_rarp, NEED_REPLY, &payload(GUEST_MAC), &[])
        .expect("send SEND_RARP");
    assert_eq!(ack(&raw), 0, "SEND_RARP refused");
    let got = rarps(GUEST_MAC);
    assert_eq!(got, vec![rarp_frame(GUEST_MAC)], "the announcement");
    assert!(daemon.log().contains("announced 52:54:00:12:34:57"));

    // A multicast source address: refused, nothing sent, serving goes on.
    let group = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
    raw.send(send_rarp, NEED_REPLY, &payload(group), &[])
        .expect("send SEND_RARP");
    assert_ne!(ack(&raw), 0, "SEND_RARP of a multicast address accepted");
    assert!(rarps(group).is_empty());
    let req = arp_request(GUEST_MAC, [10, 78, 0, 2], [10, 78, 0, 1]);
    net.post_rx(0, 4, 2048).expect("post receive buffers");
    net.send(0, &NetHdr::default(), &req)
        .expect("the connection still carries traffic");
    assert!(
        net.recv(0, std::time::Duration::from_secs(5))
            .expect("receive")
            .is_some(),
        "no ARP reply after the refused SEND_RARP"
    );

    // A malformed SEND_RARP (a 4-byte payload) closes the connection.
    raw.send(send_rarp, NEED_REPLY, &[0; 4], &[])
        .expect("send SEND_RARP");
    assert!(raw.closed_within(std::time::Duration::from_secs(5)));
    drop(net);
    assert!(daemon.is_running(), "bulkhead-net died on a bad SEND_RARP");

    // Without the RARP protocol feature acked: refused, nothing sent.
    let plain =
        NetDriver::connect(daemon.socket(), &Options::default()).expect("the next frontend");
    let raw = RawConnection::from_frontend(&plain.dev.frontend).expect("raw connection");
    raw.send(send_rarp, NEED_REPLY, &payload(GUEST_MAC), &[])
        .expect("send SEND_RARP");
    assert_ne!(ack(&raw), 0, "SEND_RARP accepted without the feature");
    assert!(rarps(GUEST_MAC).is_empty());
    drop(raw);
    drop(plain);
    drop(daemon);
    drop(ns);
}
