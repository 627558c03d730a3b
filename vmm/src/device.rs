//! The trait between a virtio transport (PCI or MMIO) and the device behind
//! it. Transports own the register state machine, eventfds and interrupts;
//! a device only answers for features, config space, and what happens when
//! the driver says DRIVER_OK or resets.

use vmm_sys_util::eventfd::EventFd;

pub use bulkhead_spec::{VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};

/// Errors a device reports to its transport.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The vhost-user backend refused or failed a message; the string names it.
    #[error("vhost-user {0} failed")]
    Vhost(&'static str, #[source] vhost::Error),
    /// A ring the driver configured is not inside guest RAM.
    #[error("Queue {0} ring is outside guest RAM")]
    RingOutsideRam(usize),
    /// The driver enabled more queues than the device has.
    #[error("Queue {0} does not exist")]
    NoSuchQueue(usize),
    /// The backend reported something the VMM cannot use.
    #[error("Backend: {0}")]
    Backend(String),
}

/// One queue as the driver configured it, handed to [`VirtioDevice::activate`].
#[derive(Debug)]
pub struct ActiveQueue<'a> {
    /// Queue index.
    pub index: usize,
    /// Number of descriptors (a power of two, at most the device maximum).
    pub size: u16,
    /// Descriptor table guest address.
    pub desc: u64,
    /// Available (driver) ring guest address.
    pub avail: u64,
    /// Used (device) ring guest address.
    pub used: u64,
    /// Signalled by the guest's notify (a KVM ioeventfd).
    pub kick: &'a EventFd,
    /// Signalled by the device to interrupt the guest (a KVM irqfd).
    pub call: &'a EventFd,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device type (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Number of queues the device has.
    fn num_queues(&self) -> usize;
    /// Largest queue size the driver may choose.
    fn queue_max_size(&self) -> u16;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads device config space at `offset` (bytes past its end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device after DRIVER_OK with the driver's `features` and its enabled queues.
    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), DeviceError>;
    /// Stops the device (driver reset): queues stop and in-flight work drains.
    fn reset(&mut self) -> Result<(), DeviceError>;
}
