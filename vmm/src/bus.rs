//! Port I/O and MMIO dispatch: a vCPU exit at an address goes to the one
//! device whose range holds it, with the offset inside that range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes on a bus.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` in the range starting at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` in the range starting at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors when placing a device on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range is empty, wraps around, or overlaps another device.
    #[error("Bus range {0:#x}+{1:#x} is empty or overlaps another device")]
    Overlap(u64, u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap(base, len))?;
        if let Some((b, e)) = self.ranges.range(..end).next_back()
            && b.checked_add(e.len).is_none_or(|e_end| e_end > base)
        {
            return Err(BusError::Overlap(base, len));
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, u64, &SharedDevice)> {
        let (base, e) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(len as u64)?;
        (end <= e.len).then_some((*base, offset, &e.device))
    }

    /// Dispatches a read; `false` when no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(base, offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` when no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(base, offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u64)>);
    impl BusDevice for Echo {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.0.push((base, offset));
        }
        fn write(&mut self, base: u64, offset: u64, _data: &[u8]) {
            self.0.push((base, offset));
        }
    }

    #[test]
    fn dispatch_finds_the_owner_and_refuses_overlap_and_straddling() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        assert!(bus.insert(0x108, 0x10, a.clone()).is_err());
        assert!(bus.insert(0xf8, 0x10, a.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, a.clone()).is_err());
        bus.insert(0x110, 0x10, a.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(!bus.read(0x10f, &mut [0u8; 2]), "straddles two devices");
        assert!(!bus.write(0x120, &[1]));
        assert_eq!(a.lock().unwrap().0, vec![(0x100, 4)]);
    }
}
