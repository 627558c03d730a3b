//! virtio-mmio (virtio spec 4.2.2): register offsets and values.

use virtio_bindings::virtio_mmio as m;

/// Register: Magic value, reads "virt".
pub const VIRTIO_MMIO_MAGIC_VALUE: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
/// Register: Transport version.
pub const VIRTIO_MMIO_VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
/// Register: Device type.
pub const VIRTIO_MMIO_DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
/// Register: Vendor ID.
pub const VIRTIO_MMIO_VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
/// Register: Device features, 32 bits at a time.
pub const VIRTIO_MMIO_DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
/// Register: Which 32 feature bits DEVICE_FEATURES shows.
pub const VIRTIO_MMIO_DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
/// Register: Driver features, 32 bits at a time.
pub const VIRTIO_MMIO_DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
/// Register: Which 32 feature bits DRIVER_FEATURES takes.
pub const VIRTIO_MMIO_DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
/// Register: Queue the queue registers refer to.
pub const VIRTIO_MMIO_QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
/// Register: Largest queue size.
pub const VIRTIO_MMIO_QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
/// Register: Queue size.
pub const VIRTIO_MMIO_QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
/// Register: Queue ready.
pub const VIRTIO_MMIO_QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
/// Register: Queue notifier.
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Register: Interrupt status.
pub const VIRTIO_MMIO_INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
/// Register: Interrupt acknowledge.
pub const VIRTIO_MMIO_INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
/// Register: Device status.
pub const VIRTIO_MMIO_STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
/// Register: Descriptor table address, low 32 bits.
pub const VIRTIO_MMIO_QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
/// Register: Descriptor table address, high 32 bits.
pub const VIRTIO_MMIO_QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
/// Register: Driver (avail) area address, low 32 bits.
pub const VIRTIO_MMIO_QUEUE_AVAIL_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
/// Register: Driver (avail) area address, high 32 bits.
pub const VIRTIO_MMIO_QUEUE_AVAIL_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
/// Register: Device (used) area address, low 32 bits.
pub const VIRTIO_MMIO_QUEUE_USED_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
/// Register: Device (used) area address, high 32 bits.
pub const VIRTIO_MMIO_QUEUE_USED_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
/// Register: Config generation.
pub const VIRTIO_MMIO_CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
/// Register: Start of the config space.
pub const VIRTIO_MMIO_CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;

/// What the magic value register reads: "virt" in little endian.
pub const VIRTIO_MMIO_MAGIC: u32 = u32::from_le_bytes(*b"virt");
/// Transport version of virtio 1.x (version 1 is the legacy layout).
pub const VIRTIO_MMIO_VERSION_2: u32 = 2;
/// Interrupt status bit: a used buffer was added.
pub const VIRTIO_MMIO_INT_VRING: u32 = m::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the config space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = m::VIRTIO_MMIO_INT_CONFIG;
