//! Target `chain`: `DescriptorChain::read` over fuzzer-chosen guest memory,
//! descriptor table, head and limits, then the Reader/Writer over the snapshot
//! checked against a byte-level model.
//!
//! Input: layout, queue size u16, flags u8 (bit 0: INDIRECT_DESC; bit 1: use
//! `read_bounded` with 2^(bits 2-5) descriptors at most), total-length
//! cap u32, table address, head u16, op count u8, ops (kind u8, n u16), then
//! memory contents.
//!
//! Invariants: an accepted chain has 1..=queue-size descriptors, all inside
//! guest memory, readable before writable, lengths that add up; the reader
//! returns exactly the guest bytes of the readable buffers in order; the writer
//! changes exactly the bytes of the writable buffers it was asked to and no
//! other byte of guest memory; reads and writes past the end fail.

use std::sync::Arc;

use bulkhead_common::chain::{ChainLimits, DescriptorChain};
use bulkhead_common::{Descriptor, Reader, Writer};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use super::guest::{F_INDIRECT, F_NEXT, F_WRITE, Guest, Image, ONE_REGION, SeedRegion};
use super::input::{Input, Seed};

/// Largest byte count one op moves (keeps iterations fast).
const MAX_OP: u64 = 8192;

/// Maps stream positions of a list of buffers to guest addresses.
struct Stream<'a>(&'a [Descriptor]);

impl Stream<'_> {
    fn gpa(&self, mut pos: u64) -> u64 {
        for d in self.0 {
            if pos < u64::from(d.len) {
                return d.addr.raw_value() + pos;
            }
            pos -= u64::from(d.len);
        }
        panic!("stream position past the end");
    }
}

/// Shadow copy of guest memory, updated with every write the model expects.
struct Shadow<'g> {
    guest: &'g Guest,
    bytes: Vec<Vec<u8>>,
}

impl Shadow<'_> {
    fn slot(&mut self, gpa: u64) -> &mut u8 {
        for (i, &(start, size)) in self.guest.regions.iter().enumerate() {
            if gpa >= start && gpa - start < size {
                return &mut self.bytes[i][(gpa - start) as usize];
            }
        }
        panic!("model touched unmapped guest address {gpa:#x}");
    }
}

fn check_iovecs(guest: &Guest, stream: &Stream<'_>, start: u64, iovs: &[libc::iovec], n: u64) {
    let total: u64 = iovs.iter().map(|v| v.iov_len as u64).sum();
    assert_eq!(total, n, "iovecs cover {total} bytes, {n} asked");
    let mut pos = start;
    for v in iovs {
        if v.iov_len == 0 {
            continue;
        }
        let first = guest.host(stream.gpa(pos));
        let last = guest.host(stream.gpa(pos + v.iov_len as u64 - 1));
        assert_eq!(
            first,
            Some(v.iov_base as usize),
            "iovec start at stream {pos}"
        );
        assert_eq!(
            last,
            Some(v.iov_base as usize + v.iov_len - 1),
            "iovec end at stream {pos}"
        );
        pos += v.iov_len as u64;
    }
}

fn check_chain(guest: &Guest, c: &DescriptorChain, head: u16, limits: ChainLimits, max: u16) {
    assert_eq!(c.head(), head);
    let descs = c.descriptors();
    assert!(!descs.is_empty(), "empty chain accepted");
    assert!(
        descs.len() <= usize::from(limits.queue_size.max(max).max(1)),
        "{} descriptors in a queue of {} (device maximum {max})",
        descs.len(),
        limits.queue_size
    );
    let mut seen_writable = false;
    let (mut r, mut w) = (0u64, 0u64);
    for d in descs {
        let a = d.addr.raw_value();
        assert!(a.checked_add(u64::from(d.len)).is_some(), "{d:?} overflows");
        if d.len > 0 {
            assert!(
                guest.mem.check_range(d.addr, d.len as usize),
                "{d:?} outside guest memory"
            );
        } else {
            assert!(guest.mem.address_in_range(d.addr), "{d:?} outside");
        }
        assert!(!seen_writable || d.writable, "readable after writable");
        seen_writable |= d.writable;
        if d.writable {
            w += u64::from(d.len);
        } else {
            r += u64::from(d.len);
        }
    }
    assert_eq!((c.readable_len(), c.writable_len()), (r, w));
    assert!(
        r + w <= limits.max_total_len,
        "total {} over the cap",
        r + w
    );
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let guest = Guest::decode(&mut inp);
    let queue_size = inp.u16();
    let flags = inp.u8();
    let max_total_len = u64::from(inp.u32());
    let table = guest.addr(&mut inp);
    let head = inp.u16();
    let nops = inp.u8() % 16;
    let ops: Vec<(u8, u64)> = (0..nops)
        .map(|_| (inp.u8(), u64::from(inp.u16()) % (MAX_OP + 1)))
        .collect();
    guest.fill(inp.rest());

    let limits = ChainLimits {
        queue_size,
        indirect: flags & 1 != 0,
        max_total_len,
    };
    let mem = Arc::new(guest.mem.clone());
    // Flag bit 1: a device that allows chains as long as its largest queue,
    // 2^(bits 2-5) descriptors.
    let max_descriptors = (flags & 2 != 0).then(|| 1u16 << ((flags >> 2) & 15));
    let read = match max_descriptors {
        Some(m) => DescriptorChain::read_bounded(mem, GuestAddress(table), head, limits, m),
        None => DescriptorChain::read(mem, GuestAddress(table), head, limits),
    };
    let Ok(chain) = read else {
        return;
    };
    check_chain(&guest, &chain, head, limits, max_descriptors.unwrap_or(0));

    let descs = chain.descriptors();
    let nread = descs.iter().take_while(|d| !d.writable).count();
    let rstream = Stream(&descs[..nread]);
    let wstream = Stream(&descs[nread..]);
    let mut shadow = Shadow {
        guest: &guest,
        bytes: guest.snapshot(),
    };
    let mut reader: Reader<'_> = chain.reader();
    let mut writer: Writer<'_> = chain.writer();
    let mut tail: Option<Writer<'_>> = None;
    let (mut rpos, rend) = (0u64, chain.readable_len());
    let (mut wpos, mut wend) = (0u64, chain.writable_len());
    let (mut tpos, mut tend) = (0u64, 0u64);

    for (i, &(kind, n)) in ops.iter().enumerate() {
        let pattern = |p: u64| (p as u8) ^ (i as u8).wrapping_mul(37) ^ 0x5a;
        match kind % 8 {
            0 | 7 => {
                let n = if kind % 8 == 7 { 8 } else { n };
                let mut buf = vec![0u8; n as usize];
                let ok = reader.read_exact(&mut buf).is_ok();
                assert_eq!(ok, n <= rend - rpos, "read_exact({n}) at {rpos}/{rend}");
                if ok {
                    for (k, b) in buf.iter().enumerate() {
                        let want = *shadow.slot(rstream.gpa(rpos + k as u64));
                        assert_eq!(*b, want, "reader byte {} differs", rpos + k as u64);
                    }
                    rpos += n;
                }
            }
            1 => {
                let ok = reader.skip(n).is_ok();
                assert_eq!(ok, n <= rend - rpos, "skip({n}) at {rpos}/{rend}");
                if ok {
                    rpos += n;
                }
            }
            2 => match reader.iovecs(n) {
                Ok(iovs) => {
                    assert!(n <= rend - rpos, "iovecs({n}) past the end");
                    check_iovecs(&guest, &rstream, rpos, &iovs, n);
                    rpos += n;
                }
                Err(_) => assert!(n > rend - rpos, "iovecs({n}) refused at {rpos}/{rend}"),
            },
            3 => {
                let buf: Vec<u8> = (0..n).map(pattern).collect();
                let ok = writer.write_all(&buf).is_ok();
                assert_eq!(ok, n <= wend - wpos, "write_all({n}) at {wpos}/{wend}");
                if ok {
                    for (k, b) in buf.iter().enumerate() {
                        *shadow.slot(wstream.gpa(wpos + k as u64)) = *b;
                    }
                    wpos += n;
                }
            }
            4 => match writer.split_tail(n) {
                Ok(t) => {
                    assert!(n <= wend - wpos, "split_tail({n}) past the end");
                    wend -= n;
                    (tpos, tend) = (wend, wend + n);
                    tail = Some(t);
                }
                Err(_) => assert!(n > wend - wpos, "split_tail({n}) refused"),
            },
            5 => match writer.iovecs(n) {
                Ok(iovs) => {
                    assert!(n <= wend - wpos, "writer iovecs({n}) past the end");
                    check_iovecs(&guest, &wstream, wpos, &iovs, n);
                    wpos += n;
                }
                Err(_) => assert!(n > wend - wpos, "writer iovecs({n}) refused"),
            },
            _ => {
                let Some(t) = tail.as_mut() else { continue };
                let buf: Vec<u8> = (0..n).map(pattern).collect();
                let ok = t.write_all(&buf).is_ok();
                assert_eq!(ok, n <= tend - tpos, "tail write_all({n}) at {tpos}/{tend}");
                if ok {
                    for (k, b) in buf.iter().enumerate() {
                        *shadow.slot(wstream.gpa(tpos + k as u64)) = *b;
                    }
                    tpos += n;
                }
            }
        }
        assert_eq!(reader.available(), rend - rpos);
        assert_eq!(writer.available(), wend - wpos);
    }
    let now = guest.snapshot();
    for (r, (a, b)) in now.iter().zip(&shadow.bytes).enumerate() {
        if let Some(k) = a.iter().zip(b).position(|(x, y)| x != y) {
            panic!(
                "guest byte {:#x} is {:#x}, the model says {:#x}",
                guest.regions[r].0 + k as u64,
                a[k],
                b[k]
            );
        }
    }
}

fn encode(
    regions: &[SeedRegion],
    queue_size: u16,
    indirect: bool,
    table: u32,
    head: u16,
    ops: &[(u8, u16)],
    image: &Image,
) -> Vec<u8> {
    let mut s = Seed::new();
    Guest::encode(&mut s, regions);
    s.u16(queue_size).bool(indirect).u32(1 << 20);
    Guest::encode_addr(&mut s, table);
    s.u16(head).u8(ops.len() as u8);
    for &(k, n) in ops {
        s.u8(k).u16(n);
    }
    s.bytes(&image.0);
    s.finish()
}

/// Seeds: a block-like request, an indirect one, and one spanning two regions.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let ops: &[(u8, u16)] = &[(0, 16), (4, 1), (3, 512), (6, 1)];

    let mut img = Image::new();
    img.desc(0, 0, 0x400, 16, F_NEXT, 1)
        .desc(0, 1, 0x800, 512, F_NEXT | F_WRITE, 2)
        .desc(0, 2, 0xa00, 1, F_WRITE, 0)
        .put(0x400, &super::guest::blk_header(0, 8));
    out.push(("direct", encode(ONE_REGION, 8, false, 0, 0, ops, &img)));

    let mut img = Image::new();
    img.desc(0, 3, 0x100, 48, F_INDIRECT, 0)
        .desc(0x100, 0, 0x400, 16, F_NEXT, 1)
        .desc(0x100, 1, 0x800, 512, F_NEXT | F_WRITE, 2)
        .desc(0x100, 2, 0xa00, 1, F_WRITE, 0);
    out.push(("indirect", encode(ONE_REGION, 8, true, 0, 3, ops, &img)));

    // Two adjacent regions; the data buffer straddles the boundary.
    let two = &[
        SeedRegion { page: 0, pages: 1 },
        SeedRegion { page: 1, pages: 1 },
    ];
    let mut img = Image::new();
    img.desc(0, 0, 0x100, 16, F_NEXT, 1)
        .desc(0, 1, 0xf00, 512, F_NEXT, 2)
        .desc(0, 2, 0x1200, 0x200, F_WRITE | F_NEXT, 3)
        .desc(0, 3, 0x1400, 1, F_WRITE, 0);
    let ops: &[(u8, u16)] = &[(0, 16), (2, 512), (5, 0x100), (3, 0x101)];
    out.push(("two-regions", encode(two, 4, false, 0, 0, ops, &img)));
    out
}
