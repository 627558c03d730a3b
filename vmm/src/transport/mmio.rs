//! virtio-mmio (version 2, virtio 1.x section 4.2) in front of a device.
//!
//! Each device gets a 4 KiB window and one edge-triggered GSI. The backend
//! signals the GSI's irqfd directly, so the VMM never sees an interrupt and
//! cannot track InterruptStatus; like Firecracker it always reports the
//! "used buffer" bit while the device runs, so the driver scans its queues.
//! QueueNotify is a KVM ioeventfd per queue (datamatch = queue index); a
//! write that still reaches the VMM (no KVM, or registration failed) is
//! forwarded to the same eventfd.

use std::io;
use std::sync::Arc;

use bulkhead_spec::mmio::{VIRTIO_MMIO_MAGIC, VIRTIO_MMIO_VERSION_2};

use crate::bus::BusDevice;
use crate::transport::{QueueField, StatusAction, VirtioState, get_le, put_le};
use crate::vm_events::{IoAddr, VmEvents};

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;

const VENDOR_ID: u32 = 0x4b4c_4842; // "BHLK"

/// Register offsets (virtio 1.x 4.2.2), short names for the match below.
mod reg {
    pub use bulkhead_spec::mmio::{
        VIRTIO_MMIO_CONFIG as CONFIG, VIRTIO_MMIO_CONFIG_GENERATION as CONFIG_GENERATION,
        VIRTIO_MMIO_DEVICE_FEATURES as DEVICE_FEATURES,
        VIRTIO_MMIO_DEVICE_FEATURES_SEL as DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID as DEVICE_ID,
        VIRTIO_MMIO_DRIVER_FEATURES as DRIVER_FEATURES,
        VIRTIO_MMIO_DRIVER_FEATURES_SEL as DRIVER_FEATURES_SEL,
        VIRTIO_MMIO_INTERRUPT_ACK as INTERRUPT_ACK,
        VIRTIO_MMIO_INTERRUPT_STATUS as INTERRUPT_STATUS, VIRTIO_MMIO_MAGIC_VALUE as MAGIC,
        VIRTIO_MMIO_QUEUE_AVAIL_HIGH as QUEUE_DRIVER_HIGH,
        VIRTIO_MMIO_QUEUE_AVAIL_LOW as QUEUE_DRIVER_LOW,
        VIRTIO_MMIO_QUEUE_DESC_HIGH as QUEUE_DESC_HIGH,
        VIRTIO_MMIO_QUEUE_DESC_LOW as QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY as QUEUE_NOTIFY,
        VIRTIO_MMIO_QUEUE_NUM as QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX as QUEUE_NUM_MAX,
        VIRTIO_MMIO_QUEUE_READY as QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL as QUEUE_SEL,
        VIRTIO_MMIO_QUEUE_USED_HIGH as QUEUE_DEVICE_HIGH,
        VIRTIO_MMIO_QUEUE_USED_LOW as QUEUE_DEVICE_LOW, VIRTIO_MMIO_STATUS as STATUS,
        VIRTIO_MMIO_VENDOR_ID as VENDOR_ID, VIRTIO_MMIO_VERSION as VERSION,
    };
}

/// Offset of the QueueNotify register (for tests and the ACPI table).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// InterruptStatus bit: a used buffer was added.
pub use bulkhead_spec::mmio::VIRTIO_MMIO_INT_VRING as INT_VRING;

/// A virtio-mmio transport at a fixed guest address with a fixed GSI.
pub struct VirtioMmioDevice {
    state: VirtioState,
    events: Arc<dyn VmEvents>,
    base: u64,
    gsi: u32,
    wired: Vec<usize>,
}

impl VirtioMmioDevice {
    /// Puts `state`'s device at guest address `base`, interrupting on `gsi`.
    pub fn new(state: VirtioState, events: Arc<dyn VmEvents>, base: u64, gsi: u32) -> Self {
        VirtioMmioDevice {
            state,
            events,
            base,
            gsi,
            wired: Vec::new(),
        }
    }

    /// The register window's guest address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The device's GSI.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The virtio register state (for tests and diagnostics).
    pub fn state(&self) -> &VirtioState {
        &self.state
    }

    fn notify_addr(&self) -> IoAddr {
        IoAddr::Mmio(self.base + reg::QUEUE_NOTIFY)
    }

    fn wire(&mut self) -> io::Result<()> {
        let ready: Vec<usize> = (0..self.state.num_queues())
            .filter(|i| self.state.queues()[*i].ready)
            .collect();
        for i in ready {
            let (Some(kick), Some(call)) = (self.state.kick(i), self.state.call(i)) else {
                continue;
            };
            let dm = u32::try_from(i).map_err(io::Error::other)?;
            self.events
                .register_ioevent(kick, self.notify_addr(), Some(dm))?;
            if let Err(e) = self.events.register_irqfd(call, self.gsi) {
                let _ = self
                    .events
                    .unregister_ioevent(kick, self.notify_addr(), Some(dm));
                return Err(e);
            }
            self.wired.push(i);
        }
        Ok(())
    }

    fn unwire(&mut self) {
        for i in std::mem::take(&mut self.wired) {
            let (Some(kick), Some(call)) = (self.state.kick(i), self.state.call(i)) else {
                continue;
            };
            let dm = i as u32;
            if let Err(e) = self
                .events
                .unregister_ioevent(kick, self.notify_addr(), Some(dm))
            {
                log::warn!("unregister ioeventfd of queue {i}: {e}");
            }
            if let Err(e) = self.events.unregister_irqfd(call, self.gsi) {
                log::warn!("unregister irqfd of queue {i}: {e}");
            }
        }
    }

    fn write_status(&mut self, v: u8) {
        match self.state.write_status(v) {
            StatusAction::None => {}
            StatusAction::Reset => {
                self.unwire();
                self.state.reset();
            }
            StatusAction::Activate => {
                if let Err(e) = self.wire() {
                    log::error!("virtio-mmio at {:#x}: cannot wire eventfds: {e}", self.base);
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

    fn read_reg(&self, offset: u64) -> u32 {
        let s = &self.state;
        let q = s.selected_queue();
        match offset {
            reg::MAGIC => VIRTIO_MMIO_MAGIC,
            reg::VERSION => VIRTIO_MMIO_VERSION_2,
            reg::DEVICE_ID => s.device().device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => s.device_features_word(),
            reg::QUEUE_NUM_MAX => q.map_or(0, |_| u32::from(s.device().queue_max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS if s.is_active() => INT_VRING,
            reg::STATUS => u32::from(s.status()),
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let field = match offset {
            reg::DEVICE_FEATURES_SEL => {
                self.state.set_device_features_sel(v);
                return;
            }
            reg::DRIVER_FEATURES => {
                self.state.write_driver_features(v);
                return;
            }
            reg::DRIVER_FEATURES_SEL => {
                self.state.set_driver_features_sel(v);
                return;
            }
            reg::QUEUE_SEL => {
                self.state.set_queue_sel(v);
                return;
            }
            reg::QUEUE_NOTIFY => {
                self.forward_notify(v);
                return;
            }
            reg::INTERRUPT_ACK => return,
            reg::STATUS => {
                self.write_status(v as u8);
                return;
            }
            reg::QUEUE_NUM => match u16::try_from(v) {
                Ok(n) => QueueField::Size(n),
                Err(_) => QueueField::Size(0),
            },
            reg::QUEUE_READY => QueueField::Ready(v == 1),
            reg::QUEUE_DESC_LOW => QueueField::DescLo(v),
            reg::QUEUE_DESC_HIGH => QueueField::DescHi(v),
            reg::QUEUE_DRIVER_LOW => QueueField::AvailLo(v),
            reg::QUEUE_DRIVER_HIGH => QueueField::AvailHi(v),
            reg::QUEUE_DEVICE_LOW => QueueField::UsedLo(v),
            reg::QUEUE_DEVICE_HIGH => QueueField::UsedHi(v),
            _ => {
                self.state
                    .errors()
                    .report(format_args!("virtio-mmio write to read-only {offset:#x}"));
                return;
            }
        };
        self.state.write_queue(field);
    }

    fn forward_notify(&mut self, v: u32) {
        if !self.state.is_active() {
            return;
        }
        match usize::try_from(v).ok().and_then(|i| self.state.kick(i)) {
            Some(kick) => {
                let _ = kick.write(1);
            }
            None => self
                .state
                .errors()
                .report(format_args!("notify of queue {v} out of range")),
        }
    }
}

impl BusDevice for VirtioMmioDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.state.device().read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            put_le(0, data);
            return;
        }
        put_le(u64::from(self.read_reg(offset)), data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.state
                .device_mut()
                .write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.state.errors().report(format_args!(
                "virtio-mmio {}-byte access at {offset:#x}",
                data.len()
            ));
            return;
        }
        self.write_reg(offset, get_le(data) as u32);
    }
}
