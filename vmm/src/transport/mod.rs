//! virtio transports: the register state machine both transports share
//! ([`VirtioState`]), virtio-pci ([`pci`]) and virtio-mmio ([`mmio`]).
//!
//! The state machine enforces the rules the anchors learnt the hard way:
//! queue registers accept writes only between FEATURES_OK and DRIVER_OK
//! (Firecracker CVE-2026-5747), every selector is bounds-checked before use
//! (Cloud Hypervisor #7917), and features the device did not offer cannot be
//! accepted.

pub mod mmio;
pub mod pci;

use std::io;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use bulkhead_common::ratelimit::RateLimit;

use crate::device::{ActiveQueue, DeviceError, VIRTIO_F_VERSION_1, VirtioDevice};

pub use bulkhead_spec::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as STATUS_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as STATUS_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as STATUS_DRIVER_OK, VIRTIO_CONFIG_S_FAILED as STATUS_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as STATUS_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as STATUS_DEVICE_NEEDS_RESET,
};
/// MSI-X "no vector" value.
pub const NO_VECTOR: u16 = 0xffff;

/// Counts a device's guest errors and logs them through the daemons' rate
/// limiter (`bulkhead_common::ratelimit`: a burst per second, then a count
/// of what was suppressed), so a guest cannot flood the host log.
#[derive(Default)]
pub struct GuestErrors {
    count: u32,
    limit: RateLimit,
}

impl std::fmt::Debug for GuestErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestErrors")
            .field("count", &self.count)
            .finish()
    }
}

impl GuestErrors {
    /// Records a guest error described by `what`; logs it unless the limiter says no.
    pub fn report(&mut self, what: std::fmt::Arguments<'_>) {
        self.count = self.count.saturating_add(1);
        match self.limit.allow() {
            Some(0) => log::warn!("guest error: {what}"),
            Some(n) => log::warn!("guest error: {what} ({n} similar messages suppressed)"),
            None => {}
        }
    }

    /// Guest errors seen so far.
    pub fn count(&self) -> u32 {
        self.count
    }
}

/// One queue's registers as the driver wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueRegs {
    /// Size chosen by the driver (starts at the maximum).
    pub size: u16,
    /// Whether the driver enabled the queue.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// MSI-X vector (PCI only).
    pub vector: u16,
}

/// A queue register the driver writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueField {
    /// Queue size.
    Size(u16),
    /// Queue enable (only 1 means anything).
    Ready(bool),
    /// Low 32 bits of the descriptor table address.
    DescLo(u32),
    /// High 32 bits of the descriptor table address.
    DescHi(u32),
    /// Low 32 bits of the available ring address.
    AvailLo(u32),
    /// High 32 bits of the available ring address.
    AvailHi(u32),
    /// Low 32 bits of the used ring address.
    UsedLo(u32),
    /// High 32 bits of the used ring address.
    UsedHi(u32),
    /// MSI-X vector, already bounds-checked by the transport.
    Vector(u16),
}

/// What a status write asks the transport to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusAction {
    /// Nothing beyond recording the bits.
    None,
    /// The driver wrote 0: reset the device.
    Reset,
    /// The driver set DRIVER_OK: wire the queues and start the device.
    Activate,
}

fn set_lo(v: u64, lo: u32) -> u64 {
    (v & !0xffff_ffff) | u64::from(lo)
}

fn set_hi(v: u64, hi: u32) -> u64 {
    (v & 0xffff_ffff) | (u64::from(hi) << 32)
}

/// The transport-independent virtio register state of one device.
pub struct VirtioState {
    device: Box<dyn VirtioDevice>,
    status: u8,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    active: bool,
    errors: GuestErrors,
}

impl VirtioState {
    /// Wraps `device`, creating one kick and one call eventfd per queue.
    pub fn new(device: Box<dyn VirtioDevice>) -> io::Result<Self> {
        let n = device.num_queues();
        let max = device.queue_max_size();
        let mk = || EventFd::new(EFD_NONBLOCK);
        Ok(VirtioState {
            queues: vec![Self::fresh_queue(max); n],
            kicks: (0..n).map(|_| mk()).collect::<io::Result<_>>()?,
            calls: (0..n).map(|_| mk()).collect::<io::Result<_>>()?,
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            active: false,
            errors: GuestErrors::default(),
        })
    }

    fn fresh_queue(max: u16) -> QueueRegs {
        QueueRegs {
            size: max,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            vector: NO_VECTOR,
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Mutable access to the device (config writes).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Guest error counter.
    pub fn errors(&mut self) -> &mut GuestErrors {
        &mut self.errors
    }

    /// Guest errors seen so far.
    pub fn error_count(&self) -> u32 {
        self.errors.count()
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Whether the device is running (DRIVER_OK accepted).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The kick eventfd of queue `i`.
    pub fn kick(&self, i: usize) -> Option<&EventFd> {
        self.kicks.get(i)
    }

    /// The call eventfd of queue `i`.
    pub fn call(&self, i: usize) -> Option<&EventFd> {
        self.calls.get(i)
    }

    /// All queues' registers.
    pub fn queues(&self) -> &[QueueRegs] {
        &self.queues
    }

    /// The 32-bit word of device features the selector points at (0 past bit 63).
    pub fn device_features_word(&self) -> u32 {
        let f = self.device.features();
        match self.device_features_sel {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    /// Sets the device feature word selector (any value; reads past 1 give 0).
    pub fn set_device_features_sel(&mut self, v: u32) {
        self.device_features_sel = v;
    }

    /// The device feature word selector.
    pub fn device_features_sel(&self) -> u32 {
        self.device_features_sel
    }

    /// Sets the driver feature word selector.
    pub fn set_driver_features_sel(&mut self, v: u32) {
        self.driver_features_sel = v;
    }

    /// The driver feature word selector.
    pub fn driver_features_sel(&self) -> u32 {
        self.driver_features_sel
    }

    /// The driver feature word the selector points at.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The features the driver accepted so far.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Writes the driver feature word; refused outside DRIVER..FEATURES_OK.
    pub fn write_driver_features(&mut self, v: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            self.errors.report(format_args!(
                "driver features written in status {:#x}",
                self.status
            ));
            return;
        }
        self.driver_features = match self.driver_features_sel {
            0 => set_lo(self.driver_features, v),
            1 => set_hi(self.driver_features, v),
            sel => {
                if v != 0 {
                    self.errors
                        .report(format_args!("driver feature word {sel} does not exist"));
                }
                self.driver_features
            }
        };
    }

    /// The queue selector as the driver wrote it.
    pub fn queue_sel(&self) -> u32 {
        self.queue_sel
    }

    /// Sets the queue selector (stored as written; every use bounds-checks it).
    pub fn set_queue_sel(&mut self, v: u32) {
        self.queue_sel = v;
    }

    /// The selected queue, or `None` when the selector is out of range.
    pub fn selected_queue(&self) -> Option<&QueueRegs> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// Index of the selected queue if in range.
    pub fn selected_index(&self) -> Option<usize> {
        usize::try_from(self.queue_sel)
            .ok()
            .filter(|i| *i < self.queues.len())
    }

    /// Whether queue registers are writable now: FEATURES_OK set, DRIVER_OK
    /// not yet, and the device not failed.
    pub fn queue_writable(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0
    }

    /// Writes a register of the selected queue; returns whether it was accepted.
    pub fn write_queue(&mut self, field: QueueField) -> bool {
        if !self.queue_writable() {
            self.errors.report(format_args!(
                "queue register write {field:?} in status {:#x} refused",
                self.status
            ));
            return false;
        }
        let max = self.device.queue_max_size();
        let sel = self.queue_sel;
        let Some(q) = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            self.errors
                .report(format_args!("queue select {sel} out of range"));
            return false;
        };
        match field {
            QueueField::Size(n) => {
                if n == 0 || !n.is_power_of_two() || n > max {
                    self.errors
                        .report(format_args!("queue {sel} size {n} refused (max {max})"));
                    return false;
                }
                q.size = n;
            }
            QueueField::Ready(r) => q.ready = r,
            QueueField::DescLo(v) => q.desc = set_lo(q.desc, v),
            QueueField::DescHi(v) => q.desc = set_hi(q.desc, v),
            QueueField::AvailLo(v) => q.avail = set_lo(q.avail, v),
            QueueField::AvailHi(v) => q.avail = set_hi(q.avail, v),
            QueueField::UsedLo(v) => q.used = set_lo(q.used, v),
            QueueField::UsedHi(v) => q.used = set_hi(q.used, v),
            QueueField::Vector(v) => q.vector = v,
        }
        true
    }

    /// Handles a write of the status register and says what the transport must do.
    pub fn write_status(&mut self, v: u8) -> StatusAction {
        if v == 0 {
            return StatusAction::Reset;
        }
        let old = self.status;
        if v & old != old {
            self.errors.report(format_args!(
                "status {v:#x} clears bits of {old:#x} without a reset"
            ));
            return StatusAction::None;
        }
        let mut new = v & !STATUS_DEVICE_NEEDS_RESET | (old & STATUS_DEVICE_NEEDS_RESET);
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let f = self.driver_features;
            if f & !offered != 0 || f & VIRTIO_F_VERSION_1 == 0 {
                self.errors.report(format_args!(
                    "features {f:#x} not acceptable (offered {offered:#x})"
                ));
                new &= !STATUS_FEATURES_OK;
            }
        }
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            if new & STATUS_FEATURES_OK == 0 || new & STATUS_FAILED != 0 {
                self.errors
                    .report(format_args!("DRIVER_OK without FEATURES_OK"));
                self.status = new & !STATUS_DRIVER_OK;
                return StatusAction::None;
            }
            self.status = new;
            return StatusAction::Activate;
        }
        self.status = new;
        StatusAction::None
    }

    /// Starts the device with the enabled queues (after the transport wired
    /// their eventfds). On failure the device asks for a reset.
    pub fn activate(&mut self) -> Result<(), DeviceError> {
        let queues: Vec<ActiveQueue<'_>> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready)
            .map(|(i, q)| ActiveQueue {
                index: i,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: &self.kicks[i],
                call: &self.calls[i],
            })
            .collect();
        let r = self.device.activate(self.driver_features, &queues);
        match &r {
            Ok(()) => self.active = true,
            Err(e) => {
                log::error!("device activation failed: {e}");
                self.fail();
            }
        }
        r
    }

    /// Marks the device as needing a reset (a transport-side failure).
    pub fn fail(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
    }

    /// Resets the device and every register to its initial value.
    pub fn reset(&mut self) {
        if self.active
            && let Err(e) = self.device.reset()
        {
            log::error!("device reset: {e}");
        }
        self.active = false;
        let max = self.device.queue_max_size();
        for q in &mut self.queues {
            *q = Self::fresh_queue(max);
        }
        for fd in self.kicks.iter().chain(self.calls.iter()) {
            // Drain stale counts so a fresh driver starts clean.
            let _ = fd.read();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }
}

/// Reads a little-endian value of `data.len()` bytes (1, 2, 4 or 8) out of `v`.
pub fn put_le(v: u64, data: &mut [u8]) {
    let bytes = v.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

/// The little-endian value of `data` (at most 8 bytes).
pub fn get_le(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    for (i, b) in data.iter().take(8).enumerate() {
        bytes[i] = *b;
    }
    u64::from_le_bytes(bytes)
}
