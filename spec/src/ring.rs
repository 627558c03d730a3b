//! The split virtqueue (virtio spec 2.7): descriptor, avail and used flags,
//! and the ring feature bits.

use virtio_bindings::virtio_ring as r;

use crate::{feature, u16_of};

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = u16_of(r::VRING_DESC_F_NEXT);
/// Descriptor flag: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = u16_of(r::VRING_DESC_F_WRITE);
/// Descriptor flag: the buffer is a table of descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = u16_of(r::VRING_DESC_F_INDIRECT);
/// Used-ring flag: the device does not want kicks.
pub const VRING_USED_F_NO_NOTIFY: u16 = u16_of(r::VRING_USED_F_NO_NOTIFY);
/// Avail-ring flag: the driver does not want interrupts.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = u16_of(r::VRING_AVAIL_F_NO_INTERRUPT);

/// Feature: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = feature(r::VIRTIO_RING_F_INDIRECT_DESC);
/// Feature: `used_event` and `avail_event` suppress interrupts and kicks.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = feature(r::VIRTIO_RING_F_EVENT_IDX);
