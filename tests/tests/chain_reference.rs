//! Differential test of the chain parser (`bulkhead_common::chain`) against
//! rust-vmm's `virtio-queue`, an implementation written independently of
//! Bulkhead: for random descriptor tables, every chain Bulkhead accepts must
//! be exactly the chain virtio-queue walks (same buffers, same lengths, same
//! direction, same order). Bulkhead refuses more (buffers outside memory,
//! writable before readable, misplaced indirect tables, ...); the converse
//! does not hold, and docs/architecture.md says why.

use std::sync::Arc;

use bulkhead_common::chain::{ChainLimits, DescriptorChain, RawDescriptor};
use bulkhead_spec::ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: u64 = 0x10000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x400;
const USED: u64 = 0x800;
/// Indirect tables go here (up to 16 descriptors each, two tables).
const INDIRECT: u64 = 0x1000;
/// Buffers go here, up to the end of memory (and sometimes past it).
const DATA: u64 = 0x2000;

/// One random descriptor: mostly a plausible chain link, sometimes not.
fn descriptor(rng: &mut StdRng, index: u16, table_len: u16, top: bool) -> RawDescriptor {
    let mut flags = 0;
    if rng.random_bool(0.7) {
        flags |= VRING_DESC_F_NEXT;
    }
    if rng.random_bool(0.4) {
        flags |= VRING_DESC_F_WRITE;
    }
    if top && rng.random_bool(if index == 0 { 0.3 } else { 0.05 }) {
        flags |= VRING_DESC_F_INDIRECT;
    }
    if !top && rng.random_bool(0.03) {
        flags |= VRING_DESC_F_INDIRECT;
    }
    let next = if rng.random_bool(0.8) {
        // Forward links make finite chains; the rest may loop or leave the table.
        (index + 1).min(table_len)
    } else {
        rng.random_range(0..table_len + 2)
    };
    let (addr, len) = if flags & VRING_DESC_F_INDIRECT != 0 {
        let n: u32 = if rng.random_bool(0.9) {
            rng.random_range(1..=16)
        } else {
            rng.random_range(0..=20)
        };
        let len = if rng.random_bool(0.9) {
            16 * n
        } else {
            rng.random_range(0..300)
        };
        (INDIRECT + 0x100 * rng.random_range(0..2), len)
    } else if rng.random_bool(0.95) {
        (rng.random_range(DATA..MEM_SIZE), rng.random_range(0..0x800))
    } else {
        (rng.random::<u64>(), rng.random::<u32>())
    };
    RawDescriptor {
        addr,
        len,
        flags,
        next,
    }
}

/// Guest memory with a random descriptor table, two random indirect
/// tables, and head 0 offered at avail index 0.
fn guest(rng: &mut StdRng) -> Arc<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("anonymous guest memory");
    let chain_len = rng.random_range(1..=QUEUE_SIZE);
    for i in 0..QUEUE_SIZE {
        let mut d = descriptor(rng, i, QUEUE_SIZE, true);
        if i + 1 == chain_len && rng.random_bool(0.8) {
            d.flags &= !VRING_DESC_F_NEXT;
        }
        mem.write_obj(d, GuestAddress(DESC + 16 * u64::from(i)))
            .expect("descriptor inside memory");
    }
    for t in 0..2u64 {
        let len = rng.random_range(1..=16u16);
        for i in 0..16u16 {
            let mut d = descriptor(rng, i, 16, false);
            if i + 1 == len && rng.random_bool(0.8) {
                d.flags &= !VRING_DESC_F_NEXT;
            }
            let at = INDIRECT + 0x100 * t + 16 * u64::from(i);
            mem.write_obj(d, GuestAddress(at))
                .expect("indirect descriptor inside memory");
        }
    }
    // avail: flags 0, idx 1, ring[0] = head 0.
    mem.write_obj(1u16, GuestAddress(AVAIL + 2))
        .expect("avail idx");
    mem.write_obj(0u16, GuestAddress(AVAIL + 4))
        .expect("avail ring");
    Arc::new(mem)
}

/// The chain virtio-queue walks from head 0: (address, length, writable).
fn reference(mem: &Arc<GuestMemoryMmap>) -> Vec<(u64, u32, bool)> {
    let mut q = Queue::new(QUEUE_SIZE).expect("a queue");
    q.set_size(QUEUE_SIZE);
    q.try_set_desc_table_address(GuestAddress(DESC))
        .expect("descriptor table address");
    q.try_set_avail_ring_address(GuestAddress(AVAIL))
        .expect("avail ring address");
    q.try_set_used_ring_address(GuestAddress(USED))
        .expect("used ring address");
    q.set_ready(true);
    let chain = q
        .pop_descriptor_chain(mem.as_ref())
        .expect("head 0 is offered");
    chain
        .map(|d| (d.addr().0, d.len(), d.is_write_only()))
        .collect()
}

#[test]
fn every_chain_bulkhead_accepts_is_the_chain_virtio_queue_walks() {
    let mut rng = StdRng::seed_from_u64(0x5eed_c4a1);
    let limits = ChainLimits {
        queue_size: QUEUE_SIZE,
        indirect: true,
        max_total_len: u64::MAX,
    };
    let (mut accepted, mut indirect) = (0, 0);
    const CASES: usize = 20_000;
    for case in 0..CASES {
        let mem = guest(&mut rng);
        let Ok(chain) = DescriptorChain::read(mem.clone(), GuestAddress(DESC), 0, limits) else {
            continue;
        };
        accepted += 1;
        let ours: Vec<(u64, u32, bool)> = chain
            .descriptors()
            .iter()
            .map(|d| (d.addr.0, d.len, d.writable))
            .collect();
        let head: RawDescriptor = mem.read_obj(GuestAddress(DESC)).expect("head");
        if head.flags & VRING_DESC_F_INDIRECT != 0 {
            indirect += 1;
        }
        assert_eq!(ours, reference(&mem), "case {case}: the walks differ");
    }
    // The generator must reach both outcomes, and indirect chains, often.
    assert!(
        accepted > CASES / 20 && accepted < CASES * 19 / 20,
        "{accepted} of {CASES} chains accepted"
    );
    assert!(indirect > accepted / 20, "{indirect} indirect chains");
}
