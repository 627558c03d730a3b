//! Micro-benchmarks of the per-request device-side work: the validated
//! descriptor-chain snapshot against a plain `virtio-queue` walk of the same
//! chain (the copy-before-use overhead), block request parsing, inflight
//! bookkeeping, and a whole `VirtQueue` pop + complete cycle.
//!
//! `cargo bench -p bulkhead-tests --bench micro -- [--quick] [--json FILE]`.
//! Each benchmark is timed in batches sized to about 20 ms (5 ms with
//! `--quick`); the median and the fastest ns/op of 9 batches (3 with
//! `--quick`) are reported. On a shared, loaded machine the fastest batch is
//! the better estimate of the code's own cost, so the ratios use it.

use std::hint::black_box;
use std::num::Wrapping;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bulkhead_blk::request::{Geometry, OutHdr, Request};
use bulkhead_common::chain::{ChainLimits, DescriptorChain, RawDescriptor};
use bulkhead_common::dirty_log::DirtyLog;
use bulkhead_common::inflight::InflightRegion;
use bulkhead_common::virtqueue::{QueueConfig, RingAddrs, VirtQueue};
use bulkhead_spec::blk::VIRTIO_BLK_T_IN;
use bulkhead_spec::ring::{VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use serde_json::json;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const HEADER: u64 = 0x10000;
const STATUS: u64 = 0x11000;
const DATA: u64 = 0x20000;
const MEM_SIZE: u64 = 1 << 20;

/// Guest memory holding a virtio-blk read chain of `data_segs` 4 KiB data
/// descriptors (plus header and status) at head 0, offered once in the avail ring.
fn guest(data_segs: u16) -> Arc<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("anonymous guest memory");
    let hdr = OutHdr {
        type_: VIRTIO_BLK_T_IN,
        ioprio: 0,
        sector: 8,
    };
    mem.write_obj(hdr, GuestAddress(HEADER)).unwrap();
    let mut descs = vec![RawDescriptor {
        addr: HEADER,
        len: 16,
        flags: VRING_DESC_F_NEXT,
        next: 1,
    }];
    for i in 0..data_segs {
        descs.push(RawDescriptor {
            addr: DATA + 4096 * u64::from(i),
            len: 4096,
            flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            next: i + 2,
        });
    }
    descs.push(RawDescriptor {
        addr: STATUS,
        len: 1,
        flags: VRING_DESC_F_WRITE,
        next: 0,
    });
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(DESC + 16 * i as u64))
            .unwrap();
    }
    // avail: flags 0, idx 1, ring[0] = head 0.
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    Arc::new(mem)
}

fn limits() -> ChainLimits {
    ChainLimits {
        queue_size: QUEUE_SIZE,
        indirect: true,
        max_total_len: 1 << 30,
    }
}

/// A measured benchmark.
struct Measured {
    name: &'static str,
    what: &'static str,
    ns_per_op: f64,
    min_ns: f64,
}

struct Bencher {
    batch: Duration,
    samples: usize,
    results: Vec<Measured>,
}

impl Bencher {
    /// Times `f` and records its median ns per call.
    fn run<F: FnMut()>(&mut self, name: &'static str, what: &'static str, mut f: F) -> f64 {
        // Calibrate: how many calls fill one batch.
        let mut n = 1u64;
        loop {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            let el = t.elapsed();
            if el >= self.batch / 4 {
                let per = el.as_secs_f64() / n as f64;
                n = ((self.batch.as_secs_f64() / per) as u64).max(1);
                break;
            }
            n *= 2;
        }
        let mut per_op: Vec<f64> = (0..self.samples)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed().as_secs_f64() * 1e9 / n as f64
            })
            .collect();
        per_op.sort_by(f64::total_cmp);
        let median = per_op[per_op.len() / 2];
        let min = per_op[0];
        println!("{name:<40} {median:>10.1} ns/op median {min:>10.1} min   ({what})");
        self.results.push(Measured {
            name,
            what,
            ns_per_op: median,
            min_ns: min,
        });
        min
    }
}

/// A plain virtio-queue 0.18 queue over `mem` with the chain offered at avail index 0.
fn vq_queue() -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    q
}

/// Pops the chain with virtio-queue and walks every descriptor, touching what a device reads.
fn virtio_queue_walk(q: &mut Queue, mem: &GuestMemoryMmap) -> u64 {
    q.set_next_avail(0);
    let chain = q.pop_descriptor_chain(mem).expect("chain offered");
    let mut acc = 0u64;
    for d in chain {
        acc = acc
            .wrapping_add(d.addr().0)
            .wrapping_add(u64::from(d.len()))
            .wrapping_add(u64::from(d.is_write_only()));
    }
    acc
}

fn bulkhead_queue(
    mem: Arc<GuestMemoryMmap>,
    inflight: bool,
) -> (VirtQueue, Option<InflightRegion>) {
    let cfg = QueueConfig {
        index: 0,
        size: QUEUE_SIZE,
        addrs: RingAddrs {
            desc: GuestAddress(DESC),
            avail: GuestAddress(AVAIL),
            used: GuestAddress(USED),
        },
        next_avail: 0,
        used_base: 0,
        features: VIRTIO_RING_F_INDIRECT_DESC,
        max_chain_bytes: 1 << 30,
    };
    let (region, qi) = if inflight {
        let (region, _file) = InflightRegion::create(1, QUEUE_SIZE).expect("inflight memfd");
        let qi = region.queue(0, QUEUE_SIZE);
        (Some(region), qi)
    } else {
        (None, None)
    };
    let vq = VirtQueue::start(
        cfg,
        GuestMemoryAtomic::from(mem),
        Default::default(),
        None,
        qi,
        Default::default(),
    )
    .expect("queue start");
    (vq, region)
}

/// Guest side of one request: offer head 0 again at the next avail slot.
fn offer(mem: &GuestMemoryMmap, idx: &mut Wrapping<u16>) {
    let slot = u64::from(idx.0 % QUEUE_SIZE);
    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
        .unwrap();
    *idx += Wrapping(1);
    mem.store(idx.0, GuestAddress(AVAIL + 2), Ordering::Release)
        .unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let mut b = Bencher {
        batch: Duration::from_millis(if quick { 5 } else { 20 }),
        samples: if quick { 3 } else { 9 },
        results: Vec::new(),
    };

    let mut snap = [0f64; 2];
    let mut walk = [0f64; 2];
    for (i, segs) in [1u16, 16].into_iter().enumerate() {
        let mem = guest(segs);
        let n = segs + 2;
        let (sn, wn): (&'static str, &'static str) = if segs == 1 {
            ("chain/snapshot/3-desc", "chain/virtio-queue-walk/3-desc")
        } else {
            ("chain/snapshot/18-desc", "chain/virtio-queue-walk/18-desc")
        };
        snap[i] = b.run(sn, "DescriptorChain::read: copy + validate", || {
            let c = DescriptorChain::read(mem.clone(), GuestAddress(DESC), 0, limits());
            black_box(c.map(|c| c.descriptors().len()).unwrap_or(0));
        });
        let mut q = vq_queue();
        walk[i] = b.run(wn, "virtio-queue 0.18 pop + iterate", || {
            black_box(virtio_queue_walk(&mut q, &mem));
        });
        assert_eq!(
            DescriptorChain::read(mem.clone(), GuestAddress(DESC), 0, limits())
                .unwrap()
                .descriptors()
                .len(),
            usize::from(n)
        );
    }

    let mem = guest(1);
    let chain = DescriptorChain::read(mem.clone(), GuestAddress(DESC), 0, limits()).unwrap();
    let geo = Geometry {
        capacity: 1 << 30,
        readonly: false,
        max_zero_sectors: 1 << 16,
    };
    assert!(Request::parse(&chain, &geo).is_ok());
    let parse = b.run("request/parse/read-4k", "Request::parse", || {
        black_box(Request::parse(black_box(&chain), &geo).ok());
    });

    let (region, _file) = InflightRegion::create(1, QUEUE_SIZE).expect("inflight memfd");
    let mut qi = region.queue(0, QUEUE_SIZE).expect("queue 0");
    qi.recover(0, 0);
    let mut head = 0u16;
    let mut used = 0u16;
    let inflight = b.run(
        "inflight/begin+before_used+after_used",
        "QueueInflight bookkeeping per request",
        || {
            qi.begin(head);
            qi.before_used(head);
            used = used.wrapping_add(1);
            qi.after_used(head, used);
            head = (head + 1) % QUEUE_SIZE;
        },
    );

    let mut cycle = [0f64; 2];
    for (i, with_inflight) in [false, true].into_iter().enumerate() {
        let mem = guest(1);
        let (mut vq, _region) = bulkhead_queue(mem.clone(), with_inflight);
        let mut idx = Wrapping(1u16);
        let name = if with_inflight {
            "virtqueue/pop+complete/inflight"
        } else {
            "virtqueue/pop+complete"
        };
        // As a daemon runs it: a dirty log attached, logging off (no
        // migration), so completing costs one check of an atomic bool.
        vq.set_dirty_log(Arc::new(DirtyLog::new(1)));
        // The first offer is already in the ring.
        let c = vq.pop().unwrap().unwrap();
        vq.complete_chain(&c, 4097);
        cycle[i] = b.run(name, "VirtQueue::pop (3-desc chain) + complete", || {
            offer(&mem, &mut idx);
            let c = vq.pop().unwrap().expect("offered");
            vq.complete_chain(&c, 4097);
        });
    }

    let overhead = snap[0] - walk[0];
    println!(
        "copy-before-use: snapshot {:.1} ns vs plain walk {:.1} ns (3 descriptors): +{:.1} ns, {:.2}x",
        snap[0],
        walk[0],
        overhead,
        snap[0] / walk[0]
    );

    if let Some(path) = json {
        let benchmarks: Vec<_> = b
            .results
            .iter()
            .map(|m| json!({"name": m.name, "what": m.what, "ns_per_op": m.ns_per_op, "min_ns": m.min_ns}))
            .collect();
        let out = json!({
            "quick": quick,
            "benchmarks": benchmarks,
            "copy_before_use": {
                "snapshot_ns": snap[0],
                "walk_ns": walk[0],
                "overhead_ns": overhead,
                "snapshot_18_ns": snap[1],
                "walk_18_ns": walk[1],
                "parse_ns": parse,
                "inflight_ns": inflight,
                "pop_complete_ns": cycle[0],
                "pop_complete_inflight_ns": cycle[1],
            },
        });
        if let Some(dir) = std::path::Path::new(&path).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let text = serde_json::to_string_pretty(&out).expect("JSON");
        std::fs::write(&path, text + "\n").expect("write the JSON results");
        println!("wrote {path}");
    }
}
