//! The virtqueues: the split ring (virtio spec 2.7: descriptor, avail and
//! used flags), the packed ring (2.8: avail/used bits, event suppression)
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

/// Feature: the packed virtqueue layout (virtio spec 2.8).
pub const VIRTIO_F_RING_PACKED: u64 = feature(virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED);

/// Packed descriptor flag: the driver's avail bit (set equal to its wrap counter).
pub const VRING_PACKED_DESC_F_AVAIL: u16 = 1 << u16_of(r::VRING_PACKED_DESC_F_AVAIL);
/// Packed descriptor flag: the used bit (the device sets it equal to its wrap counter).
pub const VRING_PACKED_DESC_F_USED: u16 = 1 << u16_of(r::VRING_PACKED_DESC_F_USED);
/// Packed event suppression: notifications enabled.
pub const VRING_PACKED_EVENT_FLAG_ENABLE: u16 = u16_of(r::VRING_PACKED_EVENT_FLAG_ENABLE);
/// Packed event suppression: notifications disabled.
pub const VRING_PACKED_EVENT_FLAG_DISABLE: u16 = u16_of(r::VRING_PACKED_EVENT_FLAG_DISABLE);
/// Packed event suppression: notify at the descriptor `off_wrap` names (EVENT_IDX only).
pub const VRING_PACKED_EVENT_FLAG_DESC: u16 = u16_of(r::VRING_PACKED_EVENT_FLAG_DESC);
/// Bit of `off_wrap` (and of a packed vring base) that holds the wrap counter.
pub const VRING_PACKED_EVENT_F_WRAP_CTR: u16 = 1 << u16_of(r::VRING_PACKED_EVENT_F_WRAP_CTR);
