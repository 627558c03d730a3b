//! Packed virtqueues (VIRTIO_F_RING_PACKED) against the real daemons, driven
//! by the test kit's packed driver: the blk and net data checks on both
//! layouts, hostile packed rings, and a SIGKILL with a packed ring.
//!
//! Run `cargo build -p bulkhead-blk -p bulkhead-net` first. The net check
//! needs namespaces and taps (root); elsewhere it says why it is skipped.

use std::time::Duration;

use bulkhead_tests::blk::{BlkDriver, Request, SECTOR_SIZE, VIRTIO_BLK_S_OK};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::{Options, VIRTIO_F_RING_PACKED};
use bulkhead_tests::net::*;
use bulkhead_tests::netns::{self, NetNs};
use bulkhead_tests::skip::skip_if;
use bulkhead_tests::virtq::packed::PackedDesc;
use bulkhead_tests::virtq::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

const IMAGE_SIZE: u64 = 16 << 20;

fn start(args: &[&str]) -> Daemon {
    Daemon::blk(Scratch::new(IMAGE_SIZE).unwrap(), args)
        .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)")
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8).wrapping_mul(29).wrapping_add((i % 253) as u8))
        .collect()
}

fn layout(packed: bool) -> Options {
    Options::default().packed(packed).queue_size(16)
}

/// Batches of writes then reads, of 1 to 3 data segments, direct or
/// indirect: on a 16-entry ring the positions wrap many times, chains wrap
/// mid-way, and buffers complete out of ring order across the two threads
/// of work the engine runs.
fn data_checks(d: &Daemon, packed: bool, indirect: bool, event_idx: bool) {
    let opts = layout(packed).event_idx(event_idx);
    let mut blk = BlkDriver::connect(d.socket(), &opts).expect("vhost-user bring-up");
    assert_eq!(blk.dev.has_feature(VIRTIO_F_RING_PACKED), packed);
    assert_eq!(blk.dev.queues[0].is_packed(), packed);
    blk.use_indirect = indirect;
    let mut n = 0u64;
    for round in 0..40u64 {
        let batch: Vec<(u64, Vec<u8>)> = (0..3)
            .map(|i| {
                n += 1;
                let sector = (n * 8) % 30000;
                (sector, pattern(n, 512 * (1 + ((round + i) % 8) as usize)))
            })
            .collect();
        for (i, (sector, data)) in batch.iter().enumerate() {
            let req = Request::write(*sector, data.clone()).segs(1 + i);
            blk.submit(0, &req).unwrap();
        }
        for _ in &batch {
            assert_eq!(blk.reap(0).unwrap().status, VIRTIO_BLK_S_OK);
        }
        let mut want = std::collections::HashMap::new();
        for (i, (sector, data)) in batch.iter().enumerate() {
            let req = Request::read(*sector, data.len() as u32).segs(3 - i);
            let head = blk.submit(0, &req).unwrap();
            want.insert(head, data.clone());
        }
        for _ in &batch {
            let c = blk.reap(0).unwrap();
            assert_eq!(c.status, VIRTIO_BLK_S_OK);
            assert!(
                c.data == want[&c.head],
                "round {round}: data read back differs"
            );
        }
        let (sector, data) = &batch[2];
        let on_disk = d
            .scratch()
            .read_image(sector * SECTOR_SIZE, data.len())
            .unwrap();
        assert!(on_disk == *data, "round {round}: image differs");
    }
}

#[test]
fn blk_data_checks_pass_on_split_and_packed_rings() {
    let d = start(&[]);
    for packed in [false, true] {
        for (indirect, event_idx) in [(false, true), (true, true), (false, false), (true, false)] {
            eprintln!("packed {packed}, indirect {indirect}, event_idx {event_idx}");
            data_checks(&d, packed, indirect, event_idx);
        }
    }
}

/// Publishes hand-made descriptors at the driver's next positions (the
/// first one's flags last) and kicks.
fn publish_raw(blk: &mut BlkDriver, descs: &[PackedDesc]) {
    let q = blk.queue(0).unwrap();
    let start = q.packed_next_avail().unwrap() & 0x7fff;
    let bits = q.packed_avail_bits().unwrap();
    for (i, d) in descs.iter().enumerate().skip(1) {
        let flags = d.flags | bits;
        q.write_packed_desc(start + i as u16, PackedDesc { flags, ..*d })
            .unwrap();
    }
    let first = PackedDesc {
        flags: descs[0].flags | bits,
        ..descs[0]
    };
    q.write_packed_desc(start, first).unwrap();
    q.set_packed_avail(descs.len() as u16).unwrap();
    q.kick().unwrap();
}

/// The daemon is alive and a new packed connection writes and reads.
fn assert_still_serving(d: &mut Daemon) {
    assert!(d.is_running(), "bulkhead-blk died");
    let mut blk = BlkDriver::connect(d.socket(), &layout(true)).unwrap();
    let data = pattern(5, 4096);
    assert_eq!(blk.write(0, 64, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.read(0, 64, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));
}

#[test]
fn hostile_packed_rings_break_only_their_queue() {
    let mut d = start(&[]);
    let hdr_and_status = |blk: &BlkDriver, id: u16| {
        let mem = &blk.dev.mem;
        let hdr = mem.alloc_with(&bulkhead_tests::blk::header(0, 0)).unwrap();
        let status = mem.alloc_with(&[0xff]).unwrap();
        [
            PackedDesc {
                addr: hdr,
                len: 16,
                id,
                flags: VIRTQ_DESC_F_NEXT,
            },
            PackedDesc {
                addr: status,
                len: 1,
                id,
                flags: VIRTQ_DESC_F_WRITE,
            },
        ]
    };
    // A buffer id beyond the ring, then one reused while in flight, then a
    // chain that never ends: each stops the queue; nothing is completed twice.
    for case in ["id out of range", "id in flight", "endless chain"] {
        let mut blk = BlkDriver::connect(d.socket(), &layout(true)).unwrap();
        blk.timeout = Duration::from_millis(500);
        match case {
            "id out of range" => {
                let descs = hdr_and_status(&blk, 16);
                publish_raw(&mut blk, &descs);
            }
            "id in flight" => {
                // Both made visible at once: the second is taken while the
                // first is in flight (the queue breaks) or right after its
                // completion (a fresh id then: allowed, completed once).
                let a = hdr_and_status(&blk, 3);
                let b = hdr_and_status(&blk, 3);
                let mut both = a.to_vec();
                both.extend(b);
                publish_raw(&mut blk, &both);
            }
            _ => {
                let mem = &blk.dev.mem;
                let buf = mem.alloc(64, 64).unwrap();
                let endless = [PackedDesc {
                    addr: buf,
                    len: 64,
                    id: 1,
                    flags: VIRTQ_DESC_F_NEXT,
                }; 16];
                publish_raw(&mut blk, &endless);
            }
        }
        let mut used = 0;
        while blk.reap_raw(0).is_ok() {
            used += 1;
        }
        match case {
            "id out of range" | "endless chain" => assert_eq!(used, 0, "{case}"),
            _ => assert!(used <= 2, "{case}: {used} completions"),
        }
        drop(blk);
        assert_still_serving(&mut d);
    }
}

/// Writes of 1, 2 and 3 data segments, direct: 3, 4 and 5 ring slots.
fn multi_slot_writes(seed: u64) -> Vec<(u64, Vec<u8>, usize)> {
    (0..3u64)
        .map(|i| {
            (
                256 + 16 * (seed * 3 + i),
                pattern(seed * 3 + i + 1, 4096),
                1 + i as usize,
            )
        })
        .collect()
}

/// Every pending request on queue 0 completes once, OK; nothing after.
fn reap_exactly_once(blk: &mut BlkDriver) -> Vec<u16> {
    let mut heads = Vec::new();
    while blk.pending(0) > 0 {
        let c = blk.reap(0).expect("every request completes exactly once");
        assert_eq!(c.status, VIRTIO_BLK_S_OK, "request {} failed", c.head);
        heads.push(c.head);
    }
    let extra = blk.queue(0).unwrap().wait_used(Duration::from_millis(300));
    assert!(extra.is_err(), "a completion twice: {extra:?}");
    heads
}

#[test]
fn sigkill_with_multi_slot_packed_writes_in_flight_completes_each_exactly_once() {
    // 1 KiB/s: the first 64 KiB write goes, the next ones are held.
    let d = start(&["--bps-total", "1K"]);
    let opts = layout(true);
    let mut blk = BlkDriver::connect(d.socket(), &opts).unwrap();
    assert!(
        !blk.use_indirect,
        "direct chains: one ring slot per descriptor"
    );
    let first = Request::write(0, pattern(9, 64 << 10));
    blk.submit(0, &first).unwrap();
    assert_eq!(blk.reap(0).unwrap().status, VIRTIO_BLK_S_OK);
    // Held: buffers of 4 and 5 slots (header, 2 or 3 data, status).
    let held = &multi_slot_writes(1)[1..];
    for (sector, data, segs) in held {
        blk.submit(0, &Request::write(*sector, data.clone()).segs(*segs))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let inflight = blk.dev.inflight.as_ref().expect("an inflight area");
    let marked = inflight.marked().unwrap();
    assert!(marked >= 1, "no write was taken before the kill");
    let scratch = d.kill_keep_scratch().unwrap();
    // What the ring held of the buffers in flight is gone, as after other
    // completions wrote used descriptors there and the driver reused the
    // slots: the first write took slots 0..3, those in flight follow.
    let slots: u16 = [4u16, 5][..marked].iter().sum();
    let q = blk.queue(0).unwrap();
    for i in 3..3 + slots {
        let junk = PackedDesc {
            addr: 0xdead_0000,
            len: 1,
            id: 15,
            flags: 0,
        };
        q.write_packed_desc(i, junk).unwrap();
    }
    let d = start_in(scratch, &[]);
    let mut blk = blk.reconnect(d.socket(), &opts).expect("the queue starts");
    assert_eq!(reap_exactly_once(&mut blk).len(), held.len());
    for (sector, data, _) in held {
        let on_disk = d
            .scratch()
            .read_image(sector * SECTOR_SIZE, data.len())
            .unwrap();
        assert!(on_disk == *data, "write at sector {sector} missing");
    }
    // The ring goes on from where it was.
    for (sector, data, segs) in multi_slot_writes(2) {
        let req = Request::write(sector, data.clone()).segs(segs);
        assert_eq!(blk.run(0, &req).unwrap().status, VIRTIO_BLK_S_OK);
        assert_eq!(blk.read(0, sector, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));
    }
}

#[test]
fn an_area_without_descriptor_tables_refuses_a_lost_multi_slot_buffer_loudly() {
    // 1 KiB/s: the first 64 KiB read goes, the second is held (in flight):
    // three ring slots (header, data, status).
    let d = start(&["--bps-total", "1K"]);
    let opts = layout(true);
    let mut blk = BlkDriver::connect(d.socket(), &opts).unwrap();
    blk.submit(0, &Request::read(0, 64 << 10)).unwrap();
    blk.submit(0, &Request::read(128, 64 << 10)).unwrap();
    assert_eq!(blk.reap(0).unwrap().status, VIRTIO_BLK_S_OK);
    std::thread::sleep(Duration::from_millis(200));
    let scratch = d.kill_keep_scratch().unwrap();
    let mut d = start_in(scratch, &[]);
    // The frontend hands back only the queues' part, as an older daemon
    // sized it: no descriptor tables. The new backend cannot resubmit the
    // held read (its ring slots may be reused): it refuses to start the
    // queue, loudly, rather than lose it or run it twice.
    let inf = blk.dev.inflight.as_mut().expect("an inflight area");
    assert!(
        inf.info.mmap_size > inf.queues_len(),
        "tables for a packed ring"
    );
    inf.info.mmap_size = inf.queues_len();
    let r = blk.reconnect(d.socket(), &opts);
    assert!(r.is_err(), "the queue started though a buffer was lost");
    assert_still_serving(&mut d);
}

#[test]
fn sigkill_mid_run_of_direct_packed_writes_completes_each_exactly_once() {
    // A 32-slot ring of writes of 3 to 5 slots, SIGKILLed at different
    // moments while the backend works through them (O_DIRECT keeps it
    // busy): some done, some in flight, some not taken. Completions come
    // out of ring order, so used descriptors land on the slots of buffers
    // still in flight and the driver reuses them.
    let opts = Options::default().packed(true).queue_size(32);
    let restart = |scratch| Daemon::blk(scratch, &["--direct"]).expect("start bulkhead-blk");
    let mut d = restart(Scratch::new(IMAGE_SIZE).unwrap());
    let mut blk = BlkDriver::connect(d.socket(), &opts).unwrap();
    assert!(blk.dev.queues[0].is_packed());
    let mut written = std::collections::HashMap::new();
    let mut resubmitted = 0;
    for round in 0..8u64 {
        blk.defer_kick = true;
        for i in 0..7u64 {
            let n = round * 7 + i;
            let sector = 8 * (n % 40);
            let data = pattern(n + 100, 512 * (1 + (n % 8) as usize));
            let segs = 1 + (n % 3) as usize;
            blk.submit(0, &Request::write(sector, data.clone()).segs(segs))
                .unwrap();
            written.insert(sector, data);
        }
        blk.kick(0).unwrap();
        blk.defer_kick = false;
        std::thread::sleep(Duration::from_micros(
            [0, 200, 500, 1000, 2000, 4000][round as usize % 6],
        ));
        let scratch = d.kill_keep_scratch().unwrap();
        let marked = blk.dev.inflight.as_ref().unwrap().marked().unwrap();
        eprintln!("round {round}: {marked} buffer(s) in flight at the kill");
        resubmitted += marked;
        d = restart(scratch);
        blk = blk.reconnect(d.socket(), &opts).expect("the queue starts");
        assert_eq!(reap_exactly_once(&mut blk).len(), 7, "round {round}");
    }
    eprintln!("{resubmitted} buffer(s) were in flight at a SIGKILL and resubmitted");
    assert!(resubmitted > 0, "no kill caught a write in flight");
    d.scratch()
        .assert_holds(written.iter().map(|(s, d)| (*s, d.as_slice())));
}

#[test]
fn sigkill_with_a_one_slot_packed_buffer_in_flight_resubmits_it_exactly_once() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let data = pattern(42, 64 << 10);
    scratch.write_image(128 * SECTOR_SIZE, &data).unwrap();
    // 1 KiB/s: the first 64 KiB read goes, the second is held (in flight).
    let d = start_in(scratch, &["--bps-total", "1K"]);
    let opts = layout(true);
    let mut blk = BlkDriver::connect(d.socket(), &opts).unwrap();
    // Indirect: each request takes one ring slot, which the inflight
    // record keeps a copy of.
    blk.use_indirect = true;
    blk.submit(0, &Request::read(0, 64 << 10)).unwrap();
    let held = blk.submit(0, &Request::read(128, 64 << 10)).unwrap();
    assert_eq!(blk.reap(0).unwrap().status, VIRTIO_BLK_S_OK);
    std::thread::sleep(Duration::from_millis(200));
    let scratch = d.kill_keep_scratch().unwrap();
    let d = start_in(scratch, &[]);
    let mut blk = blk.reconnect(d.socket(), &opts).expect("reconnect");
    let c = blk.reap(0).expect("the held read, resubmitted");
    assert_eq!((c.head, c.status), (held, VIRTIO_BLK_S_OK));
    assert!(
        c.data == data,
        "the resubmitted read returns the image's data"
    );
    blk.timeout = Duration::from_millis(300);
    assert!(blk.reap(0).is_err(), "completed twice");
    // The ring goes on from where it was.
    blk.timeout = Duration::from_secs(5);
    let more = pattern(43, 4096);
    assert_eq!(blk.write(0, 512, &more).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.read(0, 512, 4096).unwrap(), (VIRTIO_BLK_S_OK, more));
}

fn start_in(scratch: Scratch, args: &[&str]) -> Daemon {
    Daemon::blk(scratch, args).expect("restart bulkhead-blk")
}

#[test]
fn sigkill_with_nothing_in_flight_resumes_a_packed_ring_where_it_stopped() {
    let d = start(&[]);
    let opts = layout(true);
    let mut blk = BlkDriver::connect(d.socket(), &opts).unwrap();
    // 7 requests of 3 descriptors: the ring wrapped once, positions at 5.
    for i in 0..7u64 {
        assert_eq!(
            blk.write(0, 8 * i, &pattern(i, 512)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
    let scratch = d.kill_keep_scratch().unwrap();
    let d = start_in(scratch, &[]);
    let mut blk = blk.reconnect(d.socket(), &opts).expect("reconnect");
    for i in 7..30u64 {
        assert_eq!(
            blk.write(0, 8 * i, &pattern(i, 512)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
    for i in 0..30u64 {
        assert_eq!(
            blk.read(0, 8 * i, 512).unwrap(),
            (VIRTIO_BLK_S_OK, pattern(i, 512))
        );
    }
}

const TAP: &str = "bhptap0";

#[test]
fn net_arp_and_ping_pass_on_split_and_packed_rings() {
    if skip_if(
        "net_arp_and_ping_pass_on_split_and_packed_rings",
        netns::unavailable(),
    ) {
        return;
    }
    let ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, "10.78.0.1/24", false).expect("add the tap");
    let fds = ns.open_tap_fds(TAP, 1, false).expect("open the tap");
    let daemon = NetDaemon::start_with_fds(fds, &[]).expect("start bulkhead-net");
    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x78];
    const GUEST_IP: [u8; 4] = [10, 78, 0, 2];
    const HOST_IP: [u8; 4] = [10, 78, 0, 1];
    let wait = Duration::from_secs(5);
    for packed in [false, true] {
        let opts = Options::default().packed(packed).queue_size(32);
        let mut net = NetDriver::connect(daemon.socket(), &opts).expect("bring-up");
        assert_eq!(net.dev.has_feature(VIRTIO_F_RING_PACKED), packed);
        net.post_rx(0, 24, 2048).unwrap();
        let req = arp_request(GUEST_MAC, GUEST_IP, HOST_IP);
        net.send(0, &NetHdr::default(), &req).unwrap();
        let reply = net
            .recv_matching(wait, |p| parse_arp_reply(&p.frame).is_some())
            .unwrap()
            .expect("ARP reply");
        let (host_mac, _) = parse_arp_reply(&reply.frame).unwrap();
        let ep = Endpoints {
            src_mac: GUEST_MAC,
            dst_mac: host_mac,
            src_ip: GUEST_IP,
            dst_ip: HOST_IP,
        };
        // More pings than rx buffers and ring slots: both rings wrap.
        for seq in 1..=80u16 {
            let payload: Vec<u8> = (0..(56 + usize::from(seq) * 13)).map(|i| i as u8).collect();
            let echo = icmp_echo(&ep, 7, seq, &payload);
            net.send(0, &NetHdr::default(), &echo).unwrap();
            let got = net
                .recv_matching(wait, |p| {
                    parse_echo_reply(&p.frame).is_some_and(|(id, s, _)| id == 7 && s == seq)
                })
                .unwrap()
                .unwrap_or_else(|| panic!("packed {packed}: no reply to ping {seq}"));
            assert!(got.frame.ends_with(&payload));
            net.post_rx(0, got.buffers, 2048).unwrap();
        }
    }
    drop(daemon);
    drop(ns);
}
