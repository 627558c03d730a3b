//! virtio-pci, modern only (virtio 1.x section 4.1), with MSI-X.
//!
//! One 64-bit memory BAR holds every structure:
//!
//! | offset   | what |
//! |----------|------|
//! | `0x0000` | common configuration |
//! | `0x1000` | ISR status |
//! | `0x2000` | device configuration |
//! | `0x3000` | notifications, 4 bytes per queue |
//! | `0x4000` | MSI-X table, one vector per queue plus one for config |
//! | `0x5000` | MSI-X pending bits |
//!
//! MSI-X vector `i` owns GSI `gsi_base + i`; the table entry's message is
//! installed as that GSI's KVM MSI route, and each queue's call eventfd is an
//! irqfd on the GSI of its vector. Notifications are KVM ioeventfds; a write
//! that still reaches the VMM is forwarded to the same eventfd.

use std::io;
use std::sync::Arc;

use bulkhead_spec::{VIRTIO_PCI_MODERN_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID};

use crate::pci::{CONFIG_SPACE_SIZE, PciFunction};
use crate::transport::{NO_VECTOR, QueueField, StatusAction, VirtioState, get_le, put_le};
use crate::vm_events::{IoAddr, MsiMessage, VmEvents};

/// Size of the BAR.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure in the BAR.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure.
pub const COMMON_LEN: u64 = 0x38;
/// Offset of the ISR byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of device configuration.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Length of the device configuration window.
pub const DEVICE_LEN: u64 = 0x1000;
/// Offset of the notification area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Size of one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CAP_START: usize = 0x40;
const MSIX_CAP: usize = 0x84;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_WRITABLE: u16 = 0x0007 | (1 << 10);
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_ENTRY_MASKED: u32 = 1;

/// virtio-pci capability types.
mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
}

/// Common configuration register offsets (virtio 1.x 4.1.4.3).
pub mod common {
    /// `device_feature_select` register.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature` register.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select` register.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature` register.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `config_msix_vector` register.
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// `num_queues` register.
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status` register.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `config_generation` register.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `queue_select` register.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size` register.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector` register.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `queue_enable` register.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `queue_notify_off` register.
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `queue_desc_lo` register.
    pub const QUEUE_DESC_LO: u64 = 0x20;
    /// `queue_desc_hi` register.
    pub const QUEUE_DESC_HI: u64 = 0x24;
    /// `queue_driver_lo` register.
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    /// `queue_driver_hi` register.
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    /// `queue_device_lo` register.
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    /// `queue_device_hi` register.
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
}

#[derive(Clone, Copy, Debug, Default)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.control & MSIX_ENTRY_MASKED != 0
    }
}

/// PCI class code (class, subclass) for a virtio device type.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        crate::device::VIRTIO_ID_NET => (0x02, 0x00),
        crate::device::VIRTIO_ID_BLOCK => (0x01, 0x80),
        crate::device::VIRTIO_ID_CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

/// A virtio-pci function in front of a device.
pub struct VirtioPciDevice {
    state: VirtioState,
    events: Arc<dyn VmEvents>,
    config: [u8; CONFIG_SPACE_SIZE],
    bar: u64,
    msix: Vec<MsixEntry>,
    config_vector: u16,
    gsi_base: u32,
    wired_kicks: Vec<(usize, u64)>,
    wired_calls: Vec<(usize, u32)>,
}

impl VirtioPciDevice {
    /// Builds the function with its BAR at `bar` and MSI-X vectors on
    /// GSIs `gsi_base..gsi_base + num_queues + 1`.
    pub fn new(
        state: VirtioState,
        events: Arc<dyn VmEvents>,
        bar: u64,
        gsi_base: u32,
    ) -> io::Result<Self> {
        let vectors = state.num_queues() + 1;
        let table_size = u16::try_from(vectors - 1)
            .ok()
            .filter(|n| *n < 2048)
            .ok_or_else(|| io::Error::other("too many MSI-X vectors"))?;
        let dev_type = state.device().device_type();
        let device_id = u16::try_from(dev_type)
            .ok()
            .and_then(|t| VIRTIO_PCI_MODERN_DEVICE_ID_BASE.checked_add(t))
            .ok_or_else(|| io::Error::other("virtio device type out of range"))?;
        let (class, subclass) = class_of(dev_type);
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        let put16 = |c: &mut [u8; CONFIG_SPACE_SIZE], at: usize, v: u16| {
            c[at..at + 2].copy_from_slice(&v.to_le_bytes())
        };
        put16(&mut config, 0x00, VIRTIO_PCI_VENDOR_ID);
        put16(&mut config, 0x02, device_id);
        put16(&mut config, 0x06, 1 << 4); // status: capability list
        config[0x08] = 1; // revision 1: modern
        config[0x0a] = subclass;
        config[0x0b] = class;
        put16(&mut config, 0x2c, VIRTIO_PCI_VENDOR_ID);
        put16(&mut config, 0x2e, 0x40); // subsystem id (>= 0x40: modern)
        config[0x34] = CAP_START as u8;
        let notify_len = u32::try_from(state.num_queues())
            .ok()
            .and_then(|n| n.checked_mul(NOTIFY_MULTIPLIER))
            .ok_or_else(|| io::Error::other("too many queues"))?;
        let caps: [(u8, u64, u32, usize); 4] = [
            (cfg_type::COMMON, COMMON_OFFSET, COMMON_LEN as u32, 16),
            (cfg_type::ISR, ISR_OFFSET, 1, 16),
            (cfg_type::DEVICE, DEVICE_OFFSET, DEVICE_LEN as u32, 16),
            (cfg_type::NOTIFY, NOTIFY_OFFSET, notify_len, 20),
        ];
        let mut at = CAP_START;
        for (i, (ty, off, len, cap_len)) in caps.iter().enumerate() {
            let next = if i + 1 < caps.len() {
                at + cap_len
            } else {
                MSIX_CAP
            };
            config[at] = CAP_VENDOR;
            config[at + 1] = next as u8;
            config[at + 2] = *cap_len as u8;
            config[at + 3] = *ty;
            config[at + 4] = 0; // BAR 0
            config[at + 8..at + 12].copy_from_slice(&(*off as u32).to_le_bytes());
            config[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
            if *ty == cfg_type::NOTIFY {
                config[at + 16..at + 20].copy_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
            }
            at += cap_len;
        }
        config[MSIX_CAP] = CAP_MSIX;
        config[MSIX_CAP + 1] = 0;
        put16(&mut config, MSIX_CAP + 2, table_size);
        config[MSIX_CAP + 4..MSIX_CAP + 8]
            .copy_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        config[MSIX_CAP + 8..MSIX_CAP + 12]
            .copy_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let mut dev = VirtioPciDevice {
            state,
            events,
            config,
            bar: 0,
            msix: vec![
                MsixEntry {
                    control: MSIX_ENTRY_MASKED,
                    ..MsixEntry::default()
                };
                vectors
            ],
            config_vector: NO_VECTOR,
            gsi_base,
            wired_kicks: Vec::new(),
            wired_calls: Vec::new(),
        };
        dev.set_bar(bar);
        Ok(dev)
    }

    /// The virtio register state (for tests and diagnostics).
    pub fn state(&self) -> &VirtioState {
        &self.state
    }

    /// Number of MSI-X vectors.
    pub fn msix_vectors(&self) -> usize {
        self.msix.len()
    }

    /// The GSI of MSI-X vector `v`.
    pub fn vector_gsi(&self, v: u16) -> Option<u32> {
        (usize::from(v) < self.msix.len()).then(|| self.gsi_base + u32::from(v))
    }

    /// The config-change vector as the driver set it.
    pub fn config_vector(&self) -> u16 {
        self.config_vector
    }

    fn command(&self) -> u16 {
        u16::from_le_bytes([self.config[4], self.config[5]])
    }

    fn msix_control(&self) -> u16 {
        u16::from_le_bytes([self.config[MSIX_CAP + 2], self.config[MSIX_CAP + 3]])
    }

    fn set_bar(&mut self, addr: u64) {
        self.bar = addr & !(BAR_SIZE - 1);
        let lo = (self.bar as u32) | 0x4; // 64-bit memory BAR
        self.config[0x10..0x14].copy_from_slice(&lo.to_le_bytes());
        self.config[0x14..0x18].copy_from_slice(&((self.bar >> 32) as u32).to_le_bytes());
    }

    fn vector_in_range(&self, v: u16) -> bool {
        usize::from(v) < self.msix.len()
    }

    fn vector_live(&self, v: usize) -> bool {
        let ctl = self.msix_control();
        ctl & MSIX_ENABLE != 0
            && ctl & MSIX_FUNCTION_MASK == 0
            && self.msix.get(v).is_some_and(|e| !e.masked())
    }

    fn update_route(&mut self, v: usize, was_live: bool) {
        let Some(e) = self.msix.get(v).copied() else {
            return;
        };
        let live = self.vector_live(v);
        let msg = live.then(|| MsiMessage {
            addr: (u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo),
            data: e.data,
        });
        let gsi = self.gsi_base + v as u32;
        if let Err(err) = self.events.set_msi_route(gsi, msg) {
            log::error!("MSI route for GSI {gsi}: {err}");
        }
        // The backend signals irqfds directly, so an interrupt raised while
        // the vector was masked is lost; raise one on unmask instead (a
        // spurious virtio interrupt is harmless).
        if live && !was_live && self.state.is_active() {
            for (i, q) in self.state.queues().iter().enumerate() {
                if q.ready
                    && usize::from(q.vector) == v
                    && let Some(call) = self.state.call(i)
                {
                    let _ = call.write(1);
                }
            }
        }
    }

    fn write_config_space(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        let live_before: Vec<bool> = (0..self.msix.len()).map(|v| self.vector_live(v)).collect();
        for (i, b) in data.iter().enumerate() {
            let at = offset + i;
            match at {
                0x04 | 0x05 => {
                    let shift = (at - 4) * 8;
                    let cmd = (self.command() & !(0xff << shift)) | (u16::from(*b) << shift);
                    let cmd = cmd & COMMAND_WRITABLE;
                    self.config[4..6].copy_from_slice(&cmd.to_le_bytes());
                }
                0x3c => self.config[at] = *b,
                x if x == MSIX_CAP + 3 => {
                    self.config[at] = *b & 0xc0;
                }
                _ => {}
            }
        }
        // BARs are written as whole dwords.
        if offset == 0x10 && data.len() == 4 {
            let lo = get_le(data);
            self.set_bar((self.bar & !0xffff_ffff) | lo);
        } else if offset == 0x14 && data.len() == 4 {
            let hi = get_le(data);
            self.set_bar((self.bar & 0xffff_ffff) | (hi << 32));
        }
        if offset <= MSIX_CAP + 3 && end > MSIX_CAP + 2 {
            for (v, was) in live_before.into_iter().enumerate() {
                self.update_route(v, was);
            }
        }
    }

    fn read_common(&self, offset: u64, len: usize) -> Option<u64> {
        let s = &self.state;
        let q = s.selected_queue();
        let v = match (offset, len) {
            (common::DEVICE_FEATURE_SELECT, 4) => u64::from(s.device_features_sel()),
            (common::DEVICE_FEATURE, 4) => u64::from(s.device_features_word()),
            (common::DRIVER_FEATURE_SELECT, 4) => u64::from(s.driver_features_sel()),
            (common::DRIVER_FEATURE, 4) => u64::from(s.driver_features_word()),
            (common::CONFIG_MSIX_VECTOR, 2) => u64::from(self.config_vector),
            (common::NUM_QUEUES, 2) => s.num_queues() as u64,
            (common::DEVICE_STATUS, 1) => u64::from(s.status()),
            (common::CONFIG_GENERATION, 1) => 0,
            (common::QUEUE_SELECT, 2) => u64::from(s.queue_sel() as u16),
            (common::QUEUE_SIZE, 2) => q.map_or(0, |q| u64::from(q.size)),
            (common::QUEUE_MSIX_VECTOR, 2) => {
                q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector))
            }
            (common::QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.ready)),
            (common::QUEUE_NOTIFY_OFF, 2) => s.selected_index().map_or(0, |i| i as u64),
            (common::QUEUE_DESC_LO, 4) => q.map_or(0, |q| q.desc & 0xffff_ffff),
            (common::QUEUE_DESC_HI, 4) => q.map_or(0, |q| q.desc >> 32),
            (common::QUEUE_DRIVER_LO, 4) => q.map_or(0, |q| q.avail & 0xffff_ffff),
            (common::QUEUE_DRIVER_HI, 4) => q.map_or(0, |q| q.avail >> 32),
            (common::QUEUE_DEVICE_LO, 4) => q.map_or(0, |q| q.used & 0xffff_ffff),
            (common::QUEUE_DEVICE_HI, 4) => q.map_or(0, |q| q.used >> 32),
            _ => return None,
        };
        Some(v)
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let v = get_le(data);
        let field = match (offset, data.len()) {
            (common::DEVICE_FEATURE_SELECT, 4) => {
                self.state.set_device_features_sel(v as u32);
                return;
            }
            (common::DRIVER_FEATURE_SELECT, 4) => {
                self.state.set_driver_features_sel(v as u32);
                return;
            }
            (common::DRIVER_FEATURE, 4) => {
                self.state.write_driver_features(v as u32);
                return;
            }
            (common::CONFIG_MSIX_VECTOR, 2) => {
                let v = v as u16;
                self.config_vector = if v == NO_VECTOR || self.vector_in_range(v) {
                    v
                } else {
                    self.state
                        .errors()
                        .report(format_args!("config MSI-X vector {v} out of range"));
                    NO_VECTOR
                };
                return;
            }
            (common::DEVICE_STATUS, 1) => {
                self.write_status(v as u8);
                return;
            }
            (common::QUEUE_SELECT, 2) => {
                self.state.set_queue_sel(v as u32);
                return;
            }
            (common::QUEUE_SIZE, 2) => QueueField::Size(v as u16),
            (common::QUEUE_MSIX_VECTOR, 2) => {
                let v = v as u16;
                if v != NO_VECTOR && !self.vector_in_range(v) {
                    self.state
                        .errors()
                        .report(format_args!("queue MSI-X vector {v} out of range"));
                    // Reading back NO_VECTOR tells the driver the mapping failed.
                    QueueField::Vector(NO_VECTOR)
                } else {
                    QueueField::Vector(v)
                }
            }
            (common::QUEUE_ENABLE, 2) => QueueField::Ready(v == 1),
            (common::QUEUE_DESC_LO, 4) => QueueField::DescLo(v as u32),
            (common::QUEUE_DESC_HI, 4) => QueueField::DescHi(v as u32),
            (common::QUEUE_DRIVER_LO, 4) => QueueField::AvailLo(v as u32),
            (common::QUEUE_DRIVER_HI, 4) => QueueField::AvailHi(v as u32),
            (common::QUEUE_DEVICE_LO, 4) => QueueField::UsedLo(v as u32),
            (common::QUEUE_DEVICE_HI, 4) => QueueField::UsedHi(v as u32),
            _ => {
                self.state.errors().report(format_args!(
                    "common config write of {} bytes at {offset:#x}",
                    data.len()
                ));
                return;
            }
        };
        self.state.write_queue(field);
    }

    fn write_status(&mut self, v: u8) {
        match self.state.write_status(v) {
            StatusAction::None => {}
            StatusAction::Reset => {
                self.unwire();
                self.state.reset();
                self.config_vector = NO_VECTOR;
            }
            StatusAction::Activate => {
                if let Err(e) = self.wire() {
                    log::error!("virtio-pci: cannot wire eventfds: {e}");
                    self.unwire();
                    self.state.fail();
                    return;
                }
                if self.state.activate().is_err() {
                    self.unwire();
                }
            }
        }
    }

    fn wire(&mut self) -> io::Result<()> {
        if self.command() & COMMAND_MEMORY == 0 {
            return Err(io::Error::other("DRIVER_OK with memory decoding off"));
        }
        let ready: Vec<(usize, u16)> = self
            .state
            .queues()
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready)
            .map(|(i, q)| (i, q.vector))
            .collect();
        for (i, vector) in ready {
            let (Some(kick), Some(call)) = (self.state.kick(i), self.state.call(i)) else {
                continue;
            };
            let addr = (i as u64)
                .checked_mul(u64::from(NOTIFY_MULTIPLIER))
                .and_then(|o| o.checked_add(self.bar.checked_add(NOTIFY_OFFSET)?))
                .ok_or_else(|| io::Error::other("notify address overflows"))?;
            self.events
                .register_ioevent(kick, IoAddr::Mmio(addr), None)?;
            self.wired_kicks.push((i, addr));
            match self.vector_gsi(vector) {
                Some(gsi) => {
                    self.events.register_irqfd(call, gsi)?;
                    self.wired_calls.push((i, gsi));
                }
                None => log::warn!("virtio-pci: queue {i} has no MSI-X vector: no interrupts"),
            }
        }
        Ok(())
    }

    fn unwire(&mut self) {
        for (i, addr) in std::mem::take(&mut self.wired_kicks) {
            if let Some(kick) = self.state.kick(i)
                && let Err(e) = self
                    .events
                    .unregister_ioevent(kick, IoAddr::Mmio(addr), None)
            {
                log::warn!("unregister ioeventfd of queue {i}: {e}");
            }
        }
        for (i, gsi) in std::mem::take(&mut self.wired_calls) {
            if let Some(call) = self.state.call(i)
                && let Err(e) = self.events.unregister_irqfd(call, gsi)
            {
                log::warn!("unregister irqfd of queue {i}: {e}");
            }
        }
    }

    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let idx = usize::try_from(offset / MSIX_ENTRY_SIZE).unwrap_or(usize::MAX);
        let Some(e) = self.msix.get(idx) else {
            data.fill(0);
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let field = (offset % MSIX_ENTRY_SIZE) as usize / 4;
        let v = match data.len() {
            4 => u64::from(words[field]),
            8 if field.is_multiple_of(2) => {
                u64::from(words[field]) | (u64::from(words[field + 1]) << 32)
            }
            _ => 0,
        };
        put_le(v, data);
    }

    fn msix_write(&mut self, offset: u64, data: &[u8]) {
        let idx = usize::try_from(offset / MSIX_ENTRY_SIZE).unwrap_or(usize::MAX);
        if idx >= self.msix.len() || !offset.is_multiple_of(4) || !matches!(data.len(), 4 | 8) {
            self.state.errors().report(format_args!(
                "MSI-X table write of {} bytes at {offset:#x} refused",
                data.len()
            ));
            return;
        }
        let was_live = self.vector_live(idx);
        let v = get_le(data);
        let field = (offset % MSIX_ENTRY_SIZE) as usize / 4;
        let parts: &[(usize, u32)] = &[(field, v as u32), (field + 1, (v >> 32) as u32)];
        let count = data.len() / 4;
        let e = &mut self.msix[idx];
        for &(f, w) in &parts[..count] {
            match f {
                0 => e.addr_lo = w,
                1 => e.addr_hi = w,
                2 => e.data = w,
                3 => e.control = w & MSIX_ENTRY_MASKED,
                _ => {}
            }
        }
        self.update_route(idx, was_live);
    }

    fn forward_notify(&mut self, offset: u64) {
        if !self.state.is_active() {
            return;
        }
        let q = offset / u64::from(NOTIFY_MULTIPLIER);
        match usize::try_from(q).ok().and_then(|i| self.state.kick(i)) {
            Some(kick) => {
                let _ = kick.write(1);
            }
            None => self
                .state
                .errors()
                .report(format_args!("notify of queue {q} out of range")),
        }
    }
}

impl PciFunction for VirtioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        match self.config.get(reg..reg + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if offset
            .checked_add(data.len())
            .is_some_and(|e| e <= CONFIG_SPACE_SIZE)
        {
            self.write_config_space(offset, data);
        }
    }

    fn bar_range(&self) -> Option<(u64, u64)> {
        (self.command() & COMMAND_MEMORY != 0 && self.bar != 0).then_some((self.bar, BAR_SIZE))
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => {
                let v = self.read_common(o, data.len()).unwrap_or(0);
                put_le(v, data);
            }
            ISR_OFFSET => data.fill(0),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.state.device().read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix_read(o - MSIX_TABLE_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.write_common(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => self
                .state
                .device_mut()
                .write_config(o - DEVICE_OFFSET, data),
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                self.forward_notify(o - NOTIFY_OFFSET)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}
