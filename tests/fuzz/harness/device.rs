//! What a device may write into guest memory: the used rings of its queues
//! and the buffers some descriptor marks device-writable. Shared by the
//! `blk_request`, `net` and `console` targets.
//!
//! One case escapes a byte-exact check: a guest that makes a descriptor
//! table (or an indirect table) device-writable, by a buffer or a used ring
//! over it. The device's own writes (a status byte, read data, a used entry)
//! then become the descriptors of its next chains within one kick, which no
//! snapshot taken between operations sees (the first `blk_request` finding of
//! the second campaign, `regressions/blk_request/device-writes-its-own-descriptor-table`).
//! Such inputs still run, for panics and leaks, but their writes go unchecked.

use vm_memory::{Address, Bytes, GuestAddress};

use super::guest::{self, F_INDIRECT, F_WRITE, Guest};
use super::virtqueue::{GuestOp, RingSetup};

fn raw_desc(g: &Guest, at: u64) -> Option<(u64, u32, u16)> {
    let mut b = [0u8; 16];
    g.mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    let addr = u64::from_le_bytes(b[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(b[8..12].try_into().ok()?);
    let flags = u16::from_le_bytes(b[12..14].try_into().ok()?);
    Some((addr, len, flags))
}

/// Tracks guest memory around device operations.
pub struct WriteWatch {
    shadow: Vec<Vec<u8>>,
    allowed: Vec<(u64, u64)>,
    /// Descriptor tables seen: each queue's and every indirect table.
    tables: Vec<(u64, u64)>,
}

impl WriteWatch {
    /// Starts from the current contents of `g`.
    pub fn new(g: &Guest) -> Self {
        WriteWatch {
            shadow: g.snapshot(),
            allowed: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Before a device operation: adds every used ring and every buffer a
    /// descriptor (direct or in an indirect table) now marks device-writable.
    /// Ranges stay allowed: a chain taken earlier may be written later.
    pub fn allow_current(&mut self, g: &Guest, setups: &[RingSetup]) {
        for s in setups {
            self.allowed.push(s.used_range());
            let table = s.addrs.desc.raw_value();
            self.tables.push((table, 16 * u64::from(s.size)));
            for i in 0..u64::from(s.size) {
                let Some((addr, len, flags)) = raw_desc(g, table.wrapping_add(16 * i)) else {
                    continue;
                };
                if flags & F_INDIRECT != 0 {
                    let n = (u64::from(len) / 16).min(u64::from(s.size.max(s.max_descriptors)));
                    self.tables.push((addr, 16 * n));
                    for j in 0..n {
                        if let Some((a, l, f)) = raw_desc(g, addr.wrapping_add(16 * j))
                            && f & F_WRITE != 0
                        {
                            self.allowed.push((a, u64::from(l)));
                        }
                    }
                } else if flags & F_WRITE != 0 {
                    self.allowed.push((addr, u64::from(len)));
                }
            }
        }
        self.allowed.sort_unstable();
        self.allowed.dedup();
        self.tables.sort_unstable();
        self.tables.dedup();
    }

    /// Whether some device-writable range overlaps a descriptor table.
    fn self_modifying(&self) -> bool {
        let overlap = |(a, n): (u64, u64), (b, m): (u64, u64)| {
            n > 0 && m > 0 && a < b.saturating_add(m) && b < a.saturating_add(n)
        };
        self.allowed
            .iter()
            .any(|&w| self.tables.iter().any(|&t| overlap(w, t)))
    }

    /// Asserts every guest byte changed since the last check is allowed.
    pub fn check(&mut self, g: &Guest) {
        let now = g.snapshot();
        if self.self_modifying() {
            self.shadow = now;
            return;
        }
        for a in guest::diff(&g.regions, &self.shadow, &now) {
            assert!(
                self.allowed.iter().any(|&(s, n)| guest::contains(s, n, a)),
                "device wrote guest byte {a:#x}, which no descriptor made writable"
            );
        }
        self.shadow = now;
    }

    /// A guest-side write between device operations (checked first).
    pub fn guest(&mut self, g: &Guest, op: &GuestOp, setup: &RingSetup) {
        self.check(g);
        op.apply(g, &mut self.shadow, setup);
    }
}
