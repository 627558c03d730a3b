//! Fuzzer-chosen guest memory: a few anonymous regions at fuzzer-chosen guest
//! addresses, filled with fuzzer bytes, plus the checks every harness shares:
//! a byte-for-byte snapshot to prove the device wrote nothing it was not given.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::input::{Input, Seed};

/// Page size of the layouts.
pub const PAGE: u64 = 4096;
/// Most regions in a layout.
pub const MAX_REGIONS: u8 = 3;
/// Most pages per region.
pub const MAX_PAGES: u8 = 16;

/// Guest memory built from fuzzer bytes.
pub struct Guest {
    /// The memory map (anonymous, private to this process).
    pub mem: GuestMemoryMmap,
    /// `(guest address, size)` of each region, sorted.
    pub regions: Vec<(u64, u64)>,
}

/// One region in a seed: first page number and page count.
#[derive(Clone, Copy)]
pub struct SeedRegion {
    /// Guest page number of the first byte.
    pub page: u16,
    /// Number of pages (1..=16).
    pub pages: u8,
}

/// The layout most seeds use: one 16-page region at guest address 0.
pub const ONE_REGION: &[SeedRegion] = &[SeedRegion { page: 0, pages: 16 }];

impl Guest {
    /// Decodes a layout: region count, then (page u16, pages u8) per region.
    /// Regions overlapping an earlier one are dropped.
    pub fn decode(inp: &mut Input<'_>) -> Guest {
        let n = 1 + inp.u8() % MAX_REGIONS;
        let mut wanted: Vec<(u64, u64)> = (0..n)
            .map(|_| {
                let gpa = u64::from(inp.u16()) * PAGE;
                let pages = 1 + u64::from(inp.u8() % MAX_PAGES);
                (gpa, pages * PAGE)
            })
            .collect();
        wanted.sort_unstable();
        let mut regions: Vec<(u64, u64)> = Vec::new();
        for r in wanted {
            if regions.last().is_none_or(|l| l.0 + l.1 <= r.0) {
                regions.push(r);
            }
        }
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).expect("anonymous guest memory");
        Guest { mem, regions }
    }

    /// Encodes a layout for [`Guest::decode`].
    pub fn encode(seed: &mut Seed, regions: &[SeedRegion]) {
        seed.u8(regions.len() as u8 - 1);
        for r in regions {
            seed.u16(r.page).u8(r.pages - 1);
        }
    }

    /// Decodes a guest address: a u32 offset from the first region, or, with the
    /// top bit set, a raw u64 that follows.
    pub fn addr(&self, inp: &mut Input<'_>) -> u64 {
        let sel = inp.u32();
        if sel & 0x8000_0000 != 0 {
            inp.u64()
        } else {
            self.regions[0].0 + u64::from(sel)
        }
    }

    /// Encodes an offset from the first region for [`Guest::addr`].
    pub fn encode_addr(seed: &mut Seed, offset: u32) {
        seed.u32(offset & 0x7fff_ffff);
    }

    /// Copies `bytes` into memory: the first region from its start, then the next.
    pub fn fill(&self, mut bytes: &[u8]) {
        for &(gpa, size) in &self.regions {
            if bytes.is_empty() {
                break;
            }
            let n = bytes.len().min(size as usize);
            self.mem
                .write_slice(&bytes[..n], GuestAddress(gpa))
                .expect("write inside a region");
            bytes = &bytes[n..];
        }
    }

    /// A copy of every region.
    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.regions
            .iter()
            .map(|&(gpa, size)| {
                let mut v = vec![0u8; size as usize];
                self.mem
                    .read_slice(&mut v, GuestAddress(gpa))
                    .expect("read inside a region");
                v
            })
            .collect()
    }

    /// Guest addresses whose byte differs from `before` (a [`Guest::snapshot`]).
    pub fn changed(&self, before: &[Vec<u8>]) -> Vec<u64> {
        diff(&self.regions, before, &self.snapshot())
    }

    /// A guest-side write: to memory (where mapped) and to `shadow`.
    pub fn guest_write(&self, shadow: &mut [Vec<u8>], gpa: u64, bytes: &[u8]) {
        self.write(gpa, bytes);
        shadow_write(&self.regions, shadow, gpa, bytes);
    }

    /// Host address of guest address `gpa`, if mapped.
    pub fn host(&self, gpa: u64) -> Option<usize> {
        GuestMemoryBackend::get_host_address(&self.mem, GuestAddress(gpa))
            .ok()
            .map(|p| p as usize)
    }

    /// Writes a little-endian u16 at `gpa` if it is mapped (a guest-side write).
    pub fn write_u16(&self, gpa: u64, v: u16) {
        let _ = self.mem.write_slice(&v.to_le_bytes(), GuestAddress(gpa));
    }

    /// Writes bytes at `gpa`, each byte only where mapped (a guest-side write).
    pub fn write(&self, gpa: u64, b: &[u8]) {
        if self.mem.write_slice(b, GuestAddress(gpa)).is_err() {
            for (k, byte) in b.iter().enumerate() {
                if let Some(a) = gpa.checked_add(k as u64) {
                    let _ = self.mem.write_slice(&[*byte], GuestAddress(a));
                }
            }
        }
    }

    /// Reads a little-endian u16 at `gpa` (0 if unmapped).
    pub fn read_u16(&self, gpa: u64) -> u16 {
        let mut b = [0u8; 2];
        let _ = self.mem.read_slice(&mut b, GuestAddress(gpa));
        u16::from_le_bytes(b)
    }

    /// Reads a little-endian u64 at `gpa` (0 if unmapped).
    pub fn read_u64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        let _ = self.mem.read_slice(&mut b, GuestAddress(gpa));
        u64::from_le_bytes(b)
    }
}

/// Applies a guest-side write to a [`Guest::snapshot`] copy as well.
pub fn shadow_write(regions: &[(u64, u64)], shadow: &mut [Vec<u8>], gpa: u64, bytes: &[u8]) {
    for (k, b) in bytes.iter().enumerate() {
        let Some(a) = gpa.checked_add(k as u64) else {
            return;
        };
        if let Some(i) = regions.iter().position(|&(s, n)| contains(s, n, a)) {
            shadow[i][(a - regions[i].0) as usize] = *b;
        }
    }
}

/// Guest addresses where `now` differs from `before` (two snapshots).
pub fn diff(regions: &[(u64, u64)], before: &[Vec<u8>], now: &[Vec<u8>]) -> Vec<u64> {
    let mut out = Vec::new();
    for ((&(gpa, _), a), b) in regions.iter().zip(before).zip(now) {
        if a != b {
            out.extend(
                a.iter()
                    .zip(b)
                    .enumerate()
                    .filter(|(_, (x, y))| x != y)
                    .map(|(i, _)| gpa + i as u64),
            );
        }
    }
    out
}

/// True when `[start, start + len)` contains `addr` (no overflow).
pub fn contains(start: u64, len: u64, addr: u64) -> bool {
    addr >= start && addr - start < len
}

/// A sparse guest memory image for seeds: bytes placed at offsets from the
/// first region's start, zeroes between.
#[derive(Default)]
pub struct Image(pub Vec<u8>);

impl Image {
    /// An empty image.
    pub fn new() -> Self {
        Image(Vec::new())
    }

    /// Places `bytes` at `offset`.
    pub fn put(&mut self, offset: u64, bytes: &[u8]) -> &mut Self {
        let off = offset as usize;
        if self.0.len() < off + bytes.len() {
            self.0.resize(off + bytes.len(), 0);
        }
        self.0[off..off + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// Places a split-ring descriptor at table `table`, index `i`.
    pub fn desc(
        &mut self,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        self.put(table + 16 * u64::from(i), &desc(addr, len, flags, next))
    }

    /// Publishes `heads` in the avail ring at `avail` (flags 0, idx = count).
    pub fn avail(&mut self, avail: u64, heads: &[u16]) -> &mut Self {
        self.put(avail + 2, &(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            self.put(avail + 4 + 2 * i as u64, &h.to_le_bytes());
        }
        self
    }
}

pub use bulkhead_common::spec::ring::{
    VRING_DESC_F_INDIRECT as F_INDIRECT, VRING_DESC_F_NEXT as F_NEXT, VRING_DESC_F_WRITE as F_WRITE,
};

/// The 16 bytes of a split-ring descriptor.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    b
}

/// A virtio-blk request header.
pub fn blk_header(type_: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&type_.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}
