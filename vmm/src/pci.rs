//! PCI bus 0: configuration mechanism #1 (ports 0xCF8/0xCFC), a host bridge
//! at 00:00.0 (Linux probes for one before trusting mechanism #1), and
//! dispatch of the MMIO window to whichever function's BAR holds an address.
//!
//! The VMM assigns every BAR at creation, as firmware would; the guest may
//! move it. Only function 0 of each slot exists; ECAM is not offered.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::transport::{get_le, put_le};

/// The configuration address port.
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
/// Ports 0xCF8..0xD00 belong to the PCI root.
pub const CONFIG_PORTS_LEN: u64 = 8;
/// Start of the 32-bit MMIO window BARs are assigned from.
pub const MMIO_WINDOW_START: u64 = 0xc000_0000;
/// Size of that window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000_0000;
/// Slots on bus 0.
pub const SLOTS: usize = 32;
/// Size of a function's configuration space (conventional PCI).
pub const CONFIG_SPACE_SIZE: usize = 256;

/// A PCI function on bus 0.
pub trait PciFunction: Send {
    /// Reads the configuration dword at byte offset `reg` (a multiple of 4, below 256).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte offset `offset` of configuration space.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// The memory range its BAR decodes now, if memory decoding is on.
    fn bar_range(&self) -> Option<(u64, u64)>;
    /// Guest read inside the BAR.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write inside the BAR.
    fn bar_write(&mut self, offset: u64, data: &[u8]);
}

/// A shared handle to a PCI function.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Errors when adding a function.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// All slots on bus 0 are taken.
    #[error("No free PCI slot")]
    NoSlot,
}

/// The host bridge at 00:00.0: identification only.
struct HostBridge;

impl PciFunction for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        match reg {
            // Vendor: Intel; device: a Q35-era host bridge id.
            0x00 => 0x29c0_8086,
            // Class 06 (bridge) / 00 (host), revision 0.
            0x08 => 0x0600_0000,
            _ => 0,
        }
    }
    fn config_write(&mut self, _offset: usize, _data: &[u8]) {}
    fn bar_range(&self) -> Option<(u64, u64)> {
        None
    }
    fn bar_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// PCI bus 0 and its configuration ports.
pub struct PciRoot {
    config_address: u32,
    slots: Vec<Option<SharedFunction>>,
    next_bar: u64,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedFunction>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge)));
        PciRoot {
            config_address: 0,
            slots,
            next_bar: MMIO_WINDOW_START,
        }
    }

    /// Reserves `size` bytes (a power of two) of the MMIO window, naturally aligned.
    pub fn allocate_bar(&mut self, size: u64) -> Option<u64> {
        let addr = self.next_bar.checked_next_multiple_of(size)?;
        let end = addr.checked_add(size)?;
        if end > MMIO_WINDOW_START + MMIO_WINDOW_SIZE {
            return None;
        }
        self.next_bar = end;
        Some(addr)
    }

    /// Puts `function` in the first free slot and returns the slot number.
    pub fn add(&mut self, function: SharedFunction) -> Result<usize, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoSlot)?;
        self.slots[slot] = Some(function);
        Ok(slot)
    }

    /// The configuration-space target of the current address, if enabled and present.
    fn target(&self) -> Option<(&SharedFunction, usize)> {
        let a = self.config_address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (a >> 16) & 0xff;
        let slot = ((a >> 11) & 0x1f) as usize;
        let func = (a >> 8) & 0x7;
        if bus != 0 || func != 0 {
            return None;
        }
        let reg = (a & 0xfc) as usize;
        self.slots.get(slot)?.as_ref().map(|f| (f, reg))
    }

    fn config_data_read(&self, offset: u64, data: &mut [u8]) {
        let Some((f, reg)) = self.target() else {
            data.fill(0xff);
            return;
        };
        let dword = f.lock().unwrap_or_else(|e| e.into_inner()).config_read(reg);
        put_le(u64::from(dword) >> (offset * 8), data);
    }

    fn config_data_write(&self, offset: u64, data: &[u8]) {
        if let Some((f, reg)) = self.target() {
            let at = reg + offset as usize;
            if at + data.len() <= CONFIG_SPACE_SIZE {
                f.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .config_write(at, data);
            }
        }
    }

    fn bar_owner(&self, addr: u64, len: usize) -> Option<(SharedFunction, u64)> {
        for f in self.slots.iter().flatten() {
            let range = f.lock().unwrap_or_else(|e| e.into_inner()).bar_range();
            if let Some((base, size)) = range
                && addr >= base
                && let Some(off) = addr.checked_sub(base)
                && off.checked_add(len as u64).is_some_and(|end| end <= size)
            {
                return Some((f.clone(), off));
            }
        }
        None
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if base == CONFIG_ADDRESS_PORT {
            match offset {
                0 if data.len() == 4 => put_le(u64::from(self.config_address), data),
                4..=7 if offset as usize + data.len() <= 8 => {
                    self.config_data_read(offset - 4, data)
                }
                _ => data.fill(0xff),
            }
            return;
        }
        let addr = base.saturating_add(offset);
        match self.bar_owner(addr, data.len()) {
            Some((f, off)) => f
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .bar_read(off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if base == CONFIG_ADDRESS_PORT {
            match offset {
                0 if data.len() == 4 => self.config_address = get_le(data) as u32,
                4..=7 if offset as usize + data.len() <= 8 => {
                    self.config_data_write(offset - 4, data)
                }
                _ => {}
            }
            return;
        }
        let addr = base.saturating_add(offset);
        if let Some((f, off)) = self.bar_owner(addr, data.len()) {
            f.lock()
                .unwrap_or_else(|e| e.into_inner())
                .bar_write(off, data);
        }
    }
}
