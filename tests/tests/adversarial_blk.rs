//! Adversarial guest and frontend against the real `bulkhead-blk` process.
//!
//! Each test plays a hostile guest (descriptors and rings) or a hostile
//! frontend (vhost-user messages and fds) and then checks that the daemon
//! refused what it had to refuse, touched no guest byte it was not given
//! (canary pages around buffers stay intact), left the image alone, and still
//! serves a brand-new connection. `tests/blk.rs` covers the simple malformed
//! chains (short header, no status byte, a buffer past the end of memory, a
//! direct loop); this file goes beyond them.
//!
//! Run `cargo build -p bulkhead-blk` first.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulkhead_tests::blk::{
    BlkDriver, SECTOR_SIZE, STATUS_UNTOUCHED, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, header,
};
use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_tests::frontend::{
    Device, Options, Parts, RawConnection, VHOST_F_LOG_ALL, VIRTIO_F_RING_PACKED,
};
use bulkhead_tests::memory::GuestMemory;
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::sandbox::Logged;
use bulkhead_tests::virtq::{
    Buf, Desc, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VirtQueue,
};
use vhost::VhostBackend;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vmm_sys_util::eventfd::EventFd;

const IMAGE_SIZE: u64 = 16 << 20;
const CANARY: u8 = 0xcc;
const PAGE: u64 = 4096;
const WAIT: Duration = Duration::from_secs(10);
/// How long a request that must not complete is given.
const QUIET: Duration = Duration::from_millis(500);

const NEXT: u16 = VIRTQ_DESC_F_NEXT;
const WRITE: u16 = VIRTQ_DESC_F_WRITE;
const INDIRECT: u16 = VIRTQ_DESC_F_INDIRECT;

// vhost-user request codes and flags for raw messages.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const ADD_MEM_REG: u32 = 37;
const NEED_REPLY: u32 = 0x8;

fn start(args: &[&str]) -> Daemon {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    Daemon::blk(scratch, args).expect("start bulkhead-blk (run `cargo build -p bulkhead-blk`)")
}

fn connect(d: &Daemon) -> BlkDriver {
    BlkDriver::connect(d.socket(), &Options::default()).expect("vhost-user bring-up")
}

/// The daemon is alive and a brand-new connection can write and read.
fn assert_still_serving(d: &mut Daemon) {
    assert!(d.is_running(), "bulkhead-blk died");
    let mut blk = connect(d);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(blk.write(0, 1000, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.read(0, 1000, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));
}

/// A buffer with a canary page on each side.
struct Guarded {
    mem: Arc<GuestMemory>,
    base: u64,
    len: u64,
}

impl Guarded {
    fn new(mem: &Arc<GuestMemory>, len: u64, fill: u8) -> Self {
        let total = len.div_ceil(PAGE) * PAGE + 2 * PAGE;
        let base = mem.alloc(total, PAGE).unwrap();
        mem.fill(base, total, CANARY).unwrap();
        let g = Guarded {
            mem: mem.clone(),
            base,
            len,
        };
        mem.fill(g.addr(), len, fill).unwrap();
        g
    }

    fn addr(&self) -> u64 {
        self.base + PAGE
    }

    fn bytes(&self) -> Vec<u8> {
        self.mem.read_vec(self.addr(), self.len as usize).unwrap()
    }

    fn assert_canaries(&self) {
        let before = self.mem.read_vec(self.base, PAGE as usize).unwrap();
        let after_start = self.addr() + self.len;
        let end = self.base + self.len.div_ceil(PAGE) * PAGE + 2 * PAGE;
        let after = self
            .mem
            .read_vec(after_start, (end - after_start) as usize)
            .unwrap();
        assert!(before.iter().all(|&b| b == CANARY), "canary before buffer");
        assert!(after.iter().all(|&b| b == CANARY), "canary after buffer");
    }
}

/// Writes `descs` at fresh table indexes (chained in order by the caller's
/// `next` fields, which name positions in `descs`), publishes and kicks.
fn publish_raw(q: &mut VirtQueue, descs: &[Desc]) -> (u16, Vec<u16>) {
    let idx: Vec<u16> = descs.iter().map(|_| q.reserve_desc().unwrap()).collect();
    for (i, d) in descs.iter().enumerate() {
        let mut d = *d;
        if d.flags & NEXT != 0 && usize::from(d.next) < idx.len() {
            d.next = idx[usize::from(d.next)];
        }
        q.write_desc(idx[i], d).unwrap();
    }
    q.publish(idx[0]).unwrap();
    q.kick().unwrap();
    (idx[0], idx)
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

/// Publishes a hand-made chain and checks the daemon completes it with used
/// len 0, writes neither the status byte nor the data buffer, leaves the image
/// alone, and serves the same connection and a new one afterwards.
fn assert_refused(
    opts: &Options,
    build: impl FnOnce(&Arc<GuestMemory>, &Guarded, u64) -> Vec<Desc>,
) {
    let mut d = start(&[]);
    d.scratch().write_image(0, &[0x11; 4096]).unwrap();
    let mut blk = BlkDriver::connect(d.socket(), opts).unwrap();
    let mem = blk.dev.mem.clone();
    let data = Guarded::new(&mem, 4096, 0xa5);
    let status = mem.alloc_with(&[STATUS_UNTOUCHED]).unwrap();
    let descs = build(&mem, &data, status);
    let q = blk.queue(0).unwrap();
    let (head, idx) = publish_raw(q, &descs);
    let used = q.wait_used(WAIT).unwrap();
    assert_eq!((used.id, used.len), (u32::from(head), 0), "refused chain");
    for i in idx {
        q.release_desc(i);
    }
    assert_eq!(mem.read_vec(status, 1).unwrap(), [STATUS_UNTOUCHED]);
    assert!(
        data.bytes().iter().all(|&b| b == 0xa5),
        "data buffer written"
    );
    data.assert_canaries();
    assert_eq!(d.scratch().read_image(0, 4096).unwrap(), vec![0x11; 4096]);
    assert_eq!(blk.write(0, 8, &[9; 512]).unwrap(), VIRTIO_BLK_S_OK);
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn loop_inside_an_indirect_table_is_refused() {
    assert_refused(&Options::default(), |mem, data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        let table = mem.alloc(48, 16).unwrap();
        let entries = [
            desc(hdr, 16, NEXT, 1),
            desc(data.addr(), 512, NEXT | WRITE, 2),
            desc(status, 1, NEXT | WRITE, 1),
        ];
        for (i, e) in entries.iter().enumerate() {
            mem.write(table + 16 * i as u64, &desc_bytes(e)).unwrap();
        }
        vec![desc(table, 48, INDIRECT, 0)]
    });
}

fn desc_bytes(d: &Desc) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..16].copy_from_slice(&d.next.to_le_bytes());
    b
}

/// An indirect table of `entries` in guest memory; returns its address.
fn indirect_table(mem: &GuestMemory, entries: &[Desc]) -> u64 {
    let table = mem.alloc(16 * entries.len() as u64, 16).unwrap();
    for (i, e) in entries.iter().enumerate() {
        mem.write(table + 16 * i as u64, &desc_bytes(e)).unwrap();
    }
    table
}

#[test]
fn indirect_chain_longer_than_the_queue_is_refused() {
    // Chains may be as long as the queue, or as seg_max (126) allows with
    // its header and status, whichever is more: on a queue of 128, a
    // loop-free indirect chain of 129 one-byte buffers is one too many.
    assert_refused(&Options::default(), |mem, data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        let mut e = vec![desc(hdr, 16, NEXT, 1)];
        for i in 1..128u16 {
            e.push(desc(data.addr() + u64::from(i), 1, NEXT | WRITE, i + 1));
        }
        e.push(desc(status, 1, WRITE, 0));
        assert_eq!(e.len(), 129);
        let t = indirect_table(mem, &e);
        vec![desc(t, 16 * 129, INDIRECT, 0)]
    });
}

#[test]
fn indirect_table_inside_an_indirect_table_is_refused() {
    assert_refused(&Options::default(), |mem, data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        let inner = indirect_table(
            mem,
            &[
                desc(data.addr(), 512, NEXT | WRITE, 1),
                desc(status, 1, WRITE, 0),
            ],
        );
        let outer = indirect_table(mem, &[desc(hdr, 16, NEXT, 1), desc(inner, 32, INDIRECT, 0)]);
        vec![desc(outer, 32, INDIRECT, 0)]
    });
}

#[test]
fn indirect_descriptor_chained_with_next_or_of_bad_length_is_refused() {
    assert_refused(&Options::default(), |mem, data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        let t = indirect_table(
            mem,
            &[
                desc(data.addr(), 512, NEXT | WRITE, 1),
                desc(status, 1, WRITE, 0),
            ],
        );
        vec![desc(hdr, 16, NEXT, 1), desc(t, 32, INDIRECT, 0)]
    });
    assert_refused(&Options::default(), |mem, data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        let t = indirect_table(
            mem,
            &[
                desc(hdr, 16, NEXT, 1),
                desc(data.addr(), 512, NEXT | WRITE, 2),
                desc(status, 1, WRITE, 0),
            ],
        );
        vec![desc(t, 40, INDIRECT, 0)]
    });
}

#[test]
fn indirect_descriptor_without_indirect_desc_negotiated_is_refused() {
    assert_refused(&Options::default().indirect(false), |mem, data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        let t = indirect_table(
            mem,
            &[
                desc(hdr, 16, NEXT, 1),
                desc(data.addr(), 512, NEXT | WRITE, 2),
                desc(status, 1, WRITE, 0),
            ],
        );
        vec![desc(t, 48, INDIRECT, 0)]
    });
}

#[test]
fn addresses_and_lengths_that_overflow_are_refused() {
    for (addr_of, len) in [
        // addr + len wraps past 2^64.
        (None, 32u32),
        // A u32::MAX length from inside memory.
        (Some(()), u32::MAX),
    ] {
        assert_refused(&Options::default(), |mem, data, status| {
            let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
            let addr = match addr_of {
                None => u64::MAX - 15,
                Some(()) => data.addr(),
            };
            vec![
                desc(hdr, 16, NEXT, 1),
                desc(addr, len, NEXT | WRITE, 2),
                desc(status, 1, WRITE, 0),
            ]
        });
    }
}

#[test]
fn chain_carrying_more_than_the_device_cap_is_refused() {
    // The same 32 MiB of guest memory nine times: 288 MiB, over the cap of
    // seg_max (126) * size_max (1 MiB) + 4 KiB.
    assert_refused(&Options::default(), |mem, _data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        let big = mem.alloc(32 << 20, PAGE).unwrap();
        let mut v = vec![desc(hdr, 16, NEXT, 1)];
        for i in 1..=9u16 {
            v.push(desc(big, 32 << 20, NEXT | WRITE, i + 1));
        }
        v.push(desc(status, 1, WRITE, 0));
        v
    });
}

#[test]
fn zero_length_buffer_outside_memory_is_refused() {
    assert_refused(&Options::default(), |mem, data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        vec![
            desc(hdr, 16, NEXT, 1),
            desc(1 << 50, 0, NEXT | WRITE, 2),
            desc(data.addr(), 512, NEXT | WRITE, 3),
            desc(status, 1, WRITE, 0),
        ]
    });
}

#[test]
fn zero_length_buffers_inside_memory_are_harmless() {
    let mut d = start(&[]);
    d.scratch().write_image(0, &[0x11; 512]).unwrap();
    let mut blk = connect(&d);
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let data = Guarded::new(&mem, 512, 0xa5);
    let status = Guarded::new(&mem, 1, STATUS_UNTOUCHED);
    let q = blk.queue(0).unwrap();
    let (head, _) = publish_raw(
        q,
        &[
            desc(hdr, 16, NEXT, 1),
            desc(hdr, 0, NEXT, 2),
            desc(data.addr(), 0, NEXT | WRITE, 3),
            desc(data.addr(), 512, NEXT | WRITE, 4),
            desc(status.addr(), 1, NEXT | WRITE, 5),
            desc(status.addr() + 1, 0, WRITE, 0),
        ],
    );
    let used = q.wait_used(WAIT).unwrap();
    assert_eq!((used.id, used.len), (u32::from(head), 513));
    assert_eq!(status.bytes(), [VIRTIO_BLK_S_OK]);
    assert_eq!(data.bytes(), vec![0x11; 512]);
    data.assert_canaries();
    status.assert_canaries();
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn readable_buffer_after_a_writable_one_is_refused_and_the_image_untouched() {
    assert_refused(&Options::default(), |mem, data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_OUT, 0)).unwrap();
        let payload = mem.alloc_with(&[0x77; 512]).unwrap();
        vec![
            desc(hdr, 16, NEXT, 1),
            desc(data.addr(), 512, NEXT | WRITE, 2),
            desc(payload, 512, NEXT, 3),
            desc(status, 1, WRITE, 0),
        ]
    });
    // A header the device may write is no header at all: the request fails
    // with IOERR in its status byte, and the image stays untouched.
    let mut d = start(&[]);
    d.scratch().write_image(0, &[0x11; 4096]).unwrap();
    let mut blk = BlkDriver::connect(d.socket(), &Options::default()).unwrap();
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_OUT, 0)).unwrap();
    let status = mem.alloc_with(&[STATUS_UNTOUCHED]).unwrap();
    let q = blk.queue(0).unwrap();
    let (head, _) = publish_raw(
        q,
        &[desc(hdr, 16, NEXT | WRITE, 1), desc(status, 1, WRITE, 0)],
    );
    let used = q.wait_used(WAIT).unwrap();
    assert_eq!((used.id, used.len), (u32::from(head), 1));
    assert_eq!(mem.read_vec(status, 1).unwrap(), [VIRTIO_BLK_S_IOERR]);
    assert_eq!(d.scratch().read_image(0, 4096).unwrap(), vec![0x11; 4096]);
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn direct_next_index_past_the_queue_is_refused() {
    assert_refused(&Options::default(), |mem, data, status| {
        let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
        let _ = (data, status);
        // `next` 128 names no descriptor of a 128-entry table.
        vec![desc(hdr, 16, NEXT, 128)]
    });
}

#[test]
fn buffer_straddling_a_hole_between_memory_regions_is_refused() {
    let mut d = start(&[]);
    // Two regions with a one-page hole between them.
    let mem =
        Arc::new(GuestMemory::with_regions(&[(0, 8 << 20), ((8 << 20) + PAGE, 8 << 20)]).unwrap());
    let opts = Options::default();
    let queues = vec![VirtQueue::new(mem.clone(), opts.queue_size).unwrap()];
    let dev = Device::reconnect(
        d.socket(),
        &opts,
        Parts {
            mem: mem.clone(),
            queues,
            inflight: None,
        },
    )
    .unwrap();
    let mut blk = BlkDriver::from_device(dev).unwrap();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let status = mem.alloc_with(&[STATUS_UNTOUCHED]).unwrap();
    let before = mem.read_vec((8 << 20) - 256, 256).unwrap();
    let q = blk.queue(0).unwrap();
    let (head, _) = publish_raw(
        q,
        &[
            desc(hdr, 16, NEXT, 1),
            desc((8 << 20) - 256, 512, NEXT | WRITE, 2),
            desc(status, 1, WRITE, 0),
        ],
    );
    let used = q.wait_used(WAIT).unwrap();
    assert_eq!((used.id, used.len), (u32::from(head), 0));
    assert_eq!(mem.read_vec((8 << 20) - 256, 256).unwrap(), before);
    // The same connection still serves, with buffers in the second region.
    assert_eq!(blk.write(0, 0, &[1; 512]).unwrap(), VIRTIO_BLK_S_OK);
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn avail_index_jumping_past_the_queue_size_stops_the_queue_until_a_new_connection() {
    let mut d = start(&[]);
    let mut blk = connect(&d);
    let q = blk.queue(0).unwrap();
    let size = q.size();
    q.set_avail_idx(size + 1).unwrap();
    q.kick().unwrap();
    std::thread::sleep(QUIET);
    assert_eq!(q.used_idx().unwrap(), 0, "nothing may be consumed");
    // The queue is broken: a proper request now stays unanswered.
    q.set_avail_idx(0).unwrap();
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let st = mem.alloc_with(&[STATUS_UNTOUCHED]).unwrap();
    let q = blk.queue(0).unwrap();
    q.submit(&[Buf::readable(hdr, 16), Buf::writable(st, 1)], false)
        .unwrap();
    q.kick().unwrap();
    assert!(q.wait_used(QUIET).is_err(), "a broken queue kept serving");
    drop(blk);
    assert_still_serving(&mut d);
}

#[test]
fn same_head_twice_in_flight_is_completed_at_most_once() {
    let mut d = start(&[]);
    let mut blk = connect(&d);
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let data = Guarded::new(&mem, 4096, 0xa5);
    let st = mem.alloc_with(&[STATUS_UNTOUCHED]).unwrap();
    let q = blk.queue(0).unwrap();
    let head = q
        .add_chain(&[
            Buf::readable(hdr, 16),
            Buf::writable(data.addr(), 4096),
            Buf::writable(st, 1),
        ])
        .unwrap();
    q.set_avail_entry(0, head).unwrap();
    q.set_avail_entry(1, head).unwrap();
    q.set_avail_idx(2).unwrap();
    q.kick().unwrap();
    let deadline = Instant::now() + WAIT;
    while q.used_idx().unwrap() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(QUIET);
    assert_eq!(q.used_idx().unwrap(), 1, "head completed once, not twice");
    assert_eq!(q.used_elem(0).unwrap().id, u32::from(head));
    data.assert_canaries();
    drop(blk);
    assert_still_serving(&mut d);
}

/// The TOCTOU test: while the daemon works, a second thread keeps flipping
/// the request header between {IN, sector A} and {GET_ID, sector B (past the
/// end of the disk)} one aligned word at a time, and the data descriptor's
/// address between the guarded buffer and an address outside guest memory.
/// Every combination is a valid guest state; each completion must match
/// exactly one of them, which proves each field was read once.
#[test]
fn toctou_rewrites_of_header_and_descriptors_complete_as_exactly_one_snapshot() {
    let mut d = start(&["--serial", "toctou"]);
    let a_data: Vec<u8> = (0..512u32).map(|i| (i % 13) as u8 + 1).collect();
    d.scratch().write_image(0, &a_data).unwrap();
    let mut blk = connect(&d);
    let mem = blk.dev.mem.clone();
    let hdr = mem.alloc_with(&header(VIRTIO_BLK_T_IN, 0)).unwrap();
    let data = Guarded::new(&mem, 512, 0xa5);
    let st = mem.alloc_with(&[STATUS_UNTOUCHED]).unwrap();
    let q = blk.queue(0).unwrap();
    let idx: Vec<u16> = (0..3).map(|_| q.reserve_desc().unwrap()).collect();
    q.write_desc(idx[0], desc(hdr, 16, NEXT, idx[1])).unwrap();
    q.write_desc(idx[1], desc(data.addr(), 512, NEXT | WRITE, idx[2]))
        .unwrap();
    q.write_desc(idx[2], desc(st, 1, WRITE, 0)).unwrap();
    let desc_addr_gpa = q.addrs().desc + 16 * u64::from(idx[1]);

    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (mem, stop) = (mem.clone(), stop.clone());
        let data_addr = data.addr();
        std::thread::spawn(move || {
            let past_end = IMAGE_SIZE / SECTOR_SIZE + 8;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = if i & 1 == 0 { VIRTIO_BLK_T_IN } else { 8 };
                mem.store(hdr, t, Ordering::Relaxed).unwrap();
                let s = if i & 2 == 0 { 0 } else { past_end };
                mem.store(hdr + 8, s, Ordering::Relaxed).unwrap();
                let a = if i & 4 == 0 { data_addr } else { 1 << 50 };
                mem.store(desc_addr_gpa, a, Ordering::Relaxed).unwrap();
                i = i
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
            }
        })
    };

    let mut seen = [0u32; 4];
    let mut id = b"toctou".to_vec();
    id.resize(20, 0);
    for _ in 0..400 {
        mem.fill(data.addr(), 512, 0xa5).unwrap();
        mem.write(st, &[STATUS_UNTOUCHED]).unwrap();
        let q = blk.queue(0).unwrap();
        q.publish(idx[0]).unwrap();
        q.kick().unwrap();
        let used = q.wait_used(WAIT).unwrap();
        assert_eq!(used.id, u32::from(idx[0]));
        let status = mem.read_vec(st, 1).unwrap()[0];
        let got = data.bytes();
        match used.len {
            // Refused: the data descriptor pointed outside memory.
            0 => {
                assert_eq!(status, STATUS_UNTOUCHED);
                assert!(got.iter().all(|&b| b == 0xa5));
                seen[0] += 1;
            }
            // IN of sector past the end.
            1 => {
                assert_eq!(status, VIRTIO_BLK_S_IOERR);
                assert!(got.iter().all(|&b| b == 0xa5), "IOERR with data written");
                seen[1] += 1;
            }
            // GET_ID.
            21 => {
                assert_eq!(status, VIRTIO_BLK_S_OK);
                assert_eq!(&got[..20], &id[..], "GET_ID wrote something else");
                assert!(got[20..].iter().all(|&b| b == 0xa5));
                seen[2] += 1;
            }
            // IN of sector A.
            513 => {
                assert_eq!(status, VIRTIO_BLK_S_OK);
                assert!(got == a_data, "IN completed with data not from sector A");
                seen[3] += 1;
            }
            n => panic!("used len {n} matches no guest state"),
        }
        data.assert_canaries();
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    eprintln!("outcomes (refused, ioerr, get_id, read): {seen:?}");
    assert!(
        seen.iter().filter(|&&n| n > 0).count() >= 2,
        "the flipper never raced the daemon: {seen:?}"
    );
    drop(blk);
    assert_still_serving(&mut d);
}

// ---- Hostile frontend: vhost-user messages ----

fn u64p(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn state(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut b = state(index, 0);
    for v in [desc, used, avail, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

fn region(gpa: u64, size: u64, uva: u64, offset: u64) -> Vec<u8> {
    [gpa, size, uva, offset]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn mem_table(regions: &[Vec<u8>]) -> Vec<u8> {
    let mut b = (regions.len() as u32).to_le_bytes().to_vec();
    b.extend_from_slice(&[0; 4]);
    for r in regions {
        b.extend_from_slice(r);
    }
    b
}

/// A connection negotiated up to (and including) SET_MEM_TABLE, with REPLY_ACK.
struct Session {
    _fe: Frontend,
    mem: Arc<GuestMemory>,
    raw: RawConnection,
}

fn session(d: &Daemon, with_mem: bool) -> Session {
    let fe = Frontend::connect(d.socket(), 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let mut fe = fe;
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    let pf = fe.get_protocol_features().unwrap() & want;
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // Split rings: these cases send 16-bit vring bases (a packed ring's is 32 bits).
    fe.set_features(offered & !VHOST_F_LOG_ALL & !VIRTIO_F_RING_PACKED)
        .unwrap();
    let mem = Arc::new(GuestMemory::new(4 << 20).unwrap());
    if with_mem {
        fe.set_mem_table(&mem.region_infos()).unwrap();
    }
    let raw = RawConnection::from_frontend(&fe).unwrap();
    Session { _fe: fe, mem, raw }
}

impl Session {
    fn uva(&self, gpa: u64) -> u64 {
        self.mem.host_addr(gpa).unwrap()
    }

    /// Sends a message that must be accepted (acked with 0).
    fn ok(&self, code: u32, payload: &[u8], fds: &[RawFd]) {
        self.raw.send(code, NEED_REPLY, payload, fds).unwrap();
        let r = self.raw.recv(WAIT).unwrap().expect("reply");
        assert_eq!(r.payload, 0u64.to_le_bytes(), "request {code} refused");
    }

    /// Sends a message that must be refused: a non-zero ack or none, then the
    /// daemon closes this connection.
    fn refused(&self, code: u32, payload: &[u8], fds: &[RawFd]) {
        let _ = self.raw.send(code, NEED_REPLY, payload, fds);
        if let Ok(Some(r)) = self.raw.recv(WAIT) {
            assert_eq!(r.request, code);
            assert_ne!(r.payload, 0u64.to_le_bytes(), "request {code} accepted");
        }
        assert!(self.raw.closed_within(WAIT), "connection left open");
    }
}

/// Named hostile-frontend cases, each given a fresh session.
type Cases = Vec<(&'static str, Box<dyn Fn(&Session)>)>;

/// Each case runs on its own connection; the daemon must keep serving after each.
fn refused_cases(cases: Cases, with_mem: bool) {
    let mut d = start(&[]);
    for (name, case) in cases {
        eprintln!("case: {name}");
        let s = session(&d, with_mem);
        case(&s);
        assert!(d.is_running(), "bulkhead-blk died on {name}");
    }
    assert_still_serving(&mut d);
}

fn memfd(len: u64) -> std::fs::File {
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"adversarial".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

#[test]
fn bad_queue_sizes_and_queue_indexes_are_refused() {
    let cases: Cases = vec![
        (
            "size 0",
            Box::new(|s| s.refused(SET_VRING_NUM, &state(0, 0), &[])),
        ),
        (
            "size 3",
            Box::new(|s| s.refused(SET_VRING_NUM, &state(0, 3), &[])),
        ),
        (
            "size 2048 > max 1024",
            Box::new(|s| s.refused(SET_VRING_NUM, &state(0, 2048), &[])),
        ),
        (
            "size 65536",
            Box::new(|s| s.refused(SET_VRING_NUM, &state(0, 65536), &[])),
        ),
        (
            "num index 1 of 1",
            Box::new(|s| s.refused(SET_VRING_NUM, &state(1, 128), &[])),
        ),
        (
            "num index u32::MAX",
            Box::new(|s| s.refused(SET_VRING_NUM, &state(u32::MAX, 128), &[])),
        ),
        (
            "base index 99",
            Box::new(|s| s.refused(SET_VRING_BASE, &state(99, 0), &[])),
        ),
        (
            "base above u16",
            Box::new(|s| s.refused(SET_VRING_BASE, &state(0, 70000), &[])),
        ),
        (
            "get base index 7",
            Box::new(|s| s.refused(GET_VRING_BASE, &state(7, 0), &[])),
        ),
        (
            "enable index 5",
            Box::new(|s| s.refused(SET_VRING_ENABLE, &state(5, 1), &[])),
        ),
        (
            "kick index 200",
            Box::new(|s| {
                let e = EventFd::new(0).unwrap();
                s.refused(SET_VRING_KICK, &u64p(200), &[e.as_raw_fd()])
            }),
        ),
        (
            "call index 9",
            Box::new(|s| {
                let e = EventFd::new(0).unwrap();
                s.refused(SET_VRING_CALL, &u64p(9), &[e.as_raw_fd()])
            }),
        ),
        (
            "addr index 3",
            Box::new(|s| {
                let u = s.uva(0);
                s.refused(
                    SET_VRING_ADDR,
                    &vring_addr(3, u, u + 0x1000, u + 0x2000),
                    &[],
                )
            }),
        ),
    ];
    refused_cases(cases, true);
}

#[test]
fn ring_addresses_outside_the_memory_table_are_refused() {
    let cases: Cases = vec![
        (
            "desc outside",
            Box::new(|s| {
                let u = s.uva(0);
                s.refused(
                    SET_VRING_ADDR,
                    &vring_addr(0, 0x1000, u + 0x1000, u + 0x2000),
                    &[],
                )
            }),
        ),
        (
            "used outside",
            Box::new(|s| {
                let u = s.uva(0);
                s.refused(
                    SET_VRING_ADDR,
                    &vring_addr(0, u, u + (8 << 20), u + 0x2000),
                    &[],
                )
            }),
        ),
        (
            "addr before any memory table",
            Box::new(|s| s.refused(SET_VRING_ADDR, &vring_addr(0, 0x1000, 0x2000, 0x3000), &[])),
        ),
        (
            "desc straddling the end of memory, refused at enable",
            Box::new(|s| {
                let end = s.uva(0) + (4 << 20);
                let u = s.uva(0);
                s.ok(SET_VRING_NUM, &state(0, 128), &[]);
                s.ok(
                    SET_VRING_ADDR,
                    &vring_addr(0, end - 1024, u + 0x1000, u + 0x2000),
                    &[],
                );
                s.ok(SET_VRING_BASE, &state(0, 0), &[]);
                let call = EventFd::new(0).unwrap();
                let kick = EventFd::new(0).unwrap();
                s.ok(SET_VRING_CALL, &u64p(0), &[call.as_raw_fd()]);
                s.ok(SET_VRING_KICK, &u64p(0), &[kick.as_raw_fd()]);
                s.refused(SET_VRING_ENABLE, &state(0, 1), &[]);
            }),
        ),
        (
            "used ring on top of the avail ring, refused at enable",
            Box::new(|s| {
                let u = s.uva(0);
                s.ok(SET_VRING_NUM, &state(0, 128), &[]);
                s.ok(
                    SET_VRING_ADDR,
                    &vring_addr(0, u, u + 0x1000, u + 0x1000),
                    &[],
                );
                let kick = EventFd::new(0).unwrap();
                s.ok(SET_VRING_KICK, &u64p(0), &[kick.as_raw_fd()]);
                s.refused(SET_VRING_ENABLE, &state(0, 1), &[]);
            }),
        ),
        (
            "misaligned used ring",
            Box::new(|s| {
                let u = s.uva(0);
                s.refused(
                    SET_VRING_ADDR,
                    &vring_addr(0, u, u + 0x1001, u + 0x2000),
                    &[],
                )
            }),
        ),
    ];
    refused_cases(cases, true);
}

#[test]
fn bogus_memory_tables_are_refused_without_sigbus() {
    let cases: Cases = vec![
        (
            "overlapping guest ranges",
            Box::new(|s| {
                let f = memfd(2 << 20);
                let t = mem_table(&[
                    region(0, 1 << 20, 0x1000_0000, 0),
                    region(0x80000, 1 << 20, 0x2000_0000, 1 << 20),
                ]);
                s.refused(SET_MEM_TABLE, &t, &[f.as_raw_fd(), f.as_raw_fd()])
            }),
        ),
        (
            "overlapping frontend ranges",
            Box::new(|s| {
                let f = memfd(2 << 20);
                let t = mem_table(&[
                    region(0, 1 << 20, 0x1000_0000, 0),
                    region(4 << 20, 1 << 20, 0x1008_0000, 1 << 20),
                ]);
                s.refused(SET_MEM_TABLE, &t, &[f.as_raw_fd(), f.as_raw_fd()])
            }),
        ),
        (
            "fd smaller than the region",
            Box::new(|s| {
                let f = memfd(4096);
                let t = mem_table(&[region(0, 1 << 20, 0x1000_0000, 0)]);
                s.refused(SET_MEM_TABLE, &t, &[f.as_raw_fd()])
            }),
        ),
        (
            "offset past the end of the fd",
            Box::new(|s| {
                let f = memfd(1 << 20);
                let t = mem_table(&[region(0, 4096, 0x1000_0000, 1 << 20)]);
                s.refused(SET_MEM_TABLE, &t, &[f.as_raw_fd()])
            }),
        ),
        (
            "region wrapping the address space",
            Box::new(|s| {
                let f = memfd(1 << 20);
                let t = mem_table(&[region(u64::MAX - 4095, 1 << 20, 0x1000_0000, 0)]);
                s.refused(SET_MEM_TABLE, &t, &[f.as_raw_fd()])
            }),
        ),
        (
            "eventfd as a region",
            Box::new(|s| {
                let e = EventFd::new(0).unwrap();
                let t = mem_table(&[region(0, 1 << 20, 0x1000_0000, 0)]);
                s.refused(SET_MEM_TABLE, &t, &[e.as_raw_fd()])
            }),
        ),
        (
            "pipe as an added region",
            Box::new(|s| {
                let mut fds = [0; 2];
                // SAFETY: pipe writes two fds into the array.
                assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
                let mut b = vec![0u8; 8];
                b.extend(region(16 << 20, 1 << 20, 0x3000_0000, 0));
                s.refused(ADD_MEM_REG, &b, &[fds[0]]);
                // SAFETY: closing the fds we created.
                unsafe {
                    libc::close(fds[0]);
                    libc::close(fds[1]);
                }
            }),
        ),
        (
            "added region overlapping the table",
            Box::new(|s| {
                let f = memfd(1 << 20);
                let mut b = vec![0u8; 8];
                b.extend(region(0x1000, 1 << 20, 0x3000_0000, 0));
                s.refused(ADD_MEM_REG, &b, &[f.as_raw_fd()])
            }),
        ),
    ];
    refused_cases(cases, true);
}

#[test]
fn messages_with_wrong_sizes_or_extra_fds_close_only_that_connection() {
    let cases: Cases = vec![
        (
            "GET_FEATURES with a body",
            Box::new(|s| s.refused(GET_FEATURES, &u64p(1), &[])),
        ),
        (
            "SET_FEATURES of 4 bytes",
            Box::new(|s| s.refused(SET_FEATURES, &[0; 4], &[])),
        ),
        (
            "SET_VRING_NUM of 12 bytes",
            Box::new(|s| s.refused(SET_VRING_NUM, &[0; 12], &[])),
        ),
        (
            "SET_VRING_NUM with an fd",
            Box::new(|s| {
                let e = EventFd::new(0).unwrap();
                s.refused(SET_VRING_NUM, &state(0, 128), &[e.as_raw_fd()])
            }),
        ),
        (
            "memory table with one fd too many",
            Box::new(|s| {
                let f = memfd(1 << 20);
                let t = mem_table(&[region(0, 1 << 20, 0x1000_0000, 0)]);
                s.refused(SET_MEM_TABLE, &t, &[f.as_raw_fd(), f.as_raw_fd()])
            }),
        ),
        (
            "memory table with no fd",
            Box::new(|s| {
                let t = mem_table(&[region(0, 1 << 20, 0x1000_0000, 0)]);
                s.refused(SET_MEM_TABLE, &t, &[])
            }),
        ),
        (
            "memory table claiming 9 regions",
            Box::new(|s| {
                let mut t = mem_table(&[region(0, 1 << 20, 0x1000_0000, 0)]);
                t[0] = 9;
                let f = memfd(1 << 20);
                s.refused(SET_MEM_TABLE, &t, &[f.as_raw_fd()])
            }),
        ),
        (
            "GET_CONFIG past the config space: an empty reply, as the spec says",
            Box::new(|s| {
                let mut b = [250u32, 60, 0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>();
                b.extend_from_slice(&[0; 60]);
                s.raw.send(GET_CONFIG, 0, &b, &[]).unwrap();
                let r = s.raw.recv(WAIT).unwrap().expect("GET_CONFIG reply");
                assert_eq!(r.payload.len(), 12, "config bytes past the end returned");
                // The connection stays usable.
                s.ok(SET_VRING_NUM, &state(0, 128), &[]);
            }),
        ),
        (
            "header claiming 64 KiB that never come",
            Box::new(|s| {
                let mut m = SET_FEATURES.to_le_bytes().to_vec();
                m.extend_from_slice(&1u32.to_le_bytes());
                m.extend_from_slice(&0x10000u32.to_le_bytes());
                s.raw.send_bytes(&m, &[]).unwrap();
                assert!(s.raw.closed_within(WAIT));
            }),
        ),
        (
            "unknown request code",
            Box::new(|s| s.refused(0xdead, &[], &[])),
        ),
    ];
    refused_cases(cases, true);
}

/// A frontend that shrinks guest memory after SET_MEM_TABLE would make the
/// daemon's next access to the lost pages raise SIGBUS. The daemon seals
/// every sealable memory file against shrinking before it maps it, so the
/// truncation itself fails and the daemon keeps serving.
#[test]
fn memfd_shrink_after_set_mem_table_is_refused_by_the_seal() {
    let mut d = start(&[]);
    let mut blk = connect(&d);
    let mem = blk.dev.mem.clone();
    let err = mem
        .file()
        .set_len(0)
        .expect_err("the daemon sealed guest memory against shrinking");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    let data = vec![0x5a; 4096];
    assert_eq!(blk.write(0, 8, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(blk.read(0, 8, 4096).unwrap(), (VIRTIO_BLK_S_OK, data));
    drop(blk);
    assert_still_serving(&mut d);
}

/// Memory a frontend created unsealable (no `MFD_ALLOW_SEALING`) cannot be
/// protected: the daemon warns when it maps it, and when the frontend then
/// truncates it, the daemon stops with a clear message and exit status 75
/// instead of dumping core.
#[test]
fn unsealable_memory_truncated_by_the_frontend_stops_the_daemon_with_a_clear_error() {
    let scratch = Scratch::new(IMAGE_SIZE).unwrap();
    let mut cmd = std::process::Command::new(workspace_binary("bulkhead-blk"));
    cmd.arg("--socket-path")
        .arg(scratch.socket())
        .arg("--image")
        .arg(scratch.image())
        .env("RUST_LOG", "info");
    let mut d = Logged::start("bulkhead-blk", cmd, scratch.socket());
    let opts = Options {
        sealable_memory: false,
        ..Options::default()
    };
    let mut blk = BlkDriver::connect(scratch.socket(), &opts).expect("vhost-user bring-up");
    assert!(
        d.log.wait_for("cannot be sealed against shrinking", WAIT),
        "{}",
        d.log.text()
    );
    let mem = blk.dev.mem.clone();
    let q = blk.queue(0).unwrap();
    q.set_avail_idx(1).unwrap();
    // From here on neither side may touch guest memory without SIGBUS.
    mem.file().set_len(0).unwrap();
    q.kick().unwrap();
    let status = d
        .guard
        .wait_timeout(WAIT)
        .expect("wait for bulkhead-blk")
        .expect("bulkhead-blk still running after its guest memory was truncated");
    assert_eq!(status.code(), Some(75), "{status}: {}", d.log.text());
    assert!(
        d.log.wait_for("ERROR SIGBUS: a shared memory file", WAIT),
        "{}",
        d.log.text()
    );
    drop(blk);
}
