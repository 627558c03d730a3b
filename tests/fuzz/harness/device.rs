//! What a device with several queues may write into guest memory: the used
//! rings of its queues and the buffers some descriptor marks device-writable.
//! Shared by the `net` and `console` targets.

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
}

impl WriteWatch {
    /// Starts from the current contents of `g`.
    pub fn new(g: &Guest) -> Self {
        WriteWatch {
            shadow: g.snapshot(),
            allowed: Vec::new(),
        }
    }

    /// Before a device operation: adds every used ring and every buffer a
    /// descriptor (direct or in an indirect table) now marks device-writable.
    /// Ranges stay allowed: a chain taken earlier may be written later.
    pub fn allow_current(&mut self, g: &Guest, setups: &[RingSetup]) {
        for s in setups {
            self.allowed.push(s.used_range());
            let table = s.addrs.desc.raw_value();
            for i in 0..u64::from(s.size) {
                let Some((addr, len, flags)) = raw_desc(g, table.wrapping_add(16 * i)) else {
                    continue;
                };
                if flags & F_INDIRECT != 0 {
                    let n = (u64::from(len) / 16).min(u64::from(s.size.max(s.max_descriptors)));
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
    }

    /// Asserts every guest byte changed since the last check is allowed.
    pub fn check(&mut self, g: &Guest) {
        let now = g.snapshot();
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
