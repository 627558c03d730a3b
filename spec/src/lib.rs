//! The virtio spec in Rust types: feature bits, request and status codes,
//! ring flags and config-space layouts, shared by the backends, the VMM and
//! the test kit so that no virtio constant is written twice.
//!
//! Values come from `virtio_bindings` (Linux's uapi headers, generated), so
//! they are checked against a source other than this project. Names are the
//! spec's and Linux's; unlike the bindings, each constant has the type of
//! the field it goes into: feature bits are `u64` masks (the bindings give
//! bit numbers), descriptor flags `u16`, status bytes `u8`. The bindings
//! have no virtio-console header: `console.rs` cites the spec instead.
//! vhost-user's own feature bits (`vhost_user.rs`) come from the `vhost`
//! crate.
//! Config spaces are `#[repr(C)]` structs of little-endian fields that
//! implement `ByteValued`, so a device builds its config space by filling
//! in fields, not by writing bytes at offsets.

#![warn(missing_docs)]

pub mod blk;
pub mod console;
pub mod mmio;
pub mod net;
pub mod ring;
pub mod vhost_user;

use virtio_bindings::{virtio_config, virtio_ids};

/// The feature mask of bit number `bit` (a compile error past bit 63).
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// `v` as a `u8`; a compile error when it does not fit.
pub(crate) const fn u8_of(v: u32) -> u8 {
    assert!(v <= u8::MAX as u32);
    v as u8
}

/// `v` as a `u16`; a compile error when it does not fit.
pub(crate) const fn u16_of(v: u32) -> u16 {
    assert!(v <= u16::MAX as u32);
    v as u16
}

/// Feature: the device is a virtio 1.x (modern) device.
pub const VIRTIO_F_VERSION_1: u64 = feature(virtio_config::VIRTIO_F_VERSION_1);

/// Device type: network card.
pub const VIRTIO_ID_NET: u32 = virtio_ids::VIRTIO_ID_NET;
/// Device type: block device.
pub const VIRTIO_ID_BLOCK: u32 = virtio_ids::VIRTIO_ID_BLOCK;
/// Device type: console.
pub const VIRTIO_ID_CONSOLE: u32 = virtio_ids::VIRTIO_ID_CONSOLE;

/// Device status: the guest noticed the device.
pub const VIRTIO_CONFIG_S_ACKNOWLEDGE: u8 = u8_of(virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE);
/// Device status: the guest has a driver for it.
pub const VIRTIO_CONFIG_S_DRIVER: u8 = u8_of(virtio_config::VIRTIO_CONFIG_S_DRIVER);
/// Device status: the driver is set up and ready.
pub const VIRTIO_CONFIG_S_DRIVER_OK: u8 = u8_of(virtio_config::VIRTIO_CONFIG_S_DRIVER_OK);
/// Device status: feature negotiation is complete.
pub const VIRTIO_CONFIG_S_FEATURES_OK: u8 = u8_of(virtio_config::VIRTIO_CONFIG_S_FEATURES_OK);
/// Device status: the device hit an error and needs a reset.
pub const VIRTIO_CONFIG_S_NEEDS_RESET: u8 = u8_of(virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET);
/// Device status: the driver gave up on the device.
pub const VIRTIO_CONFIG_S_FAILED: u8 = u8_of(virtio_config::VIRTIO_CONFIG_S_FAILED);

/// PCI vendor ID of every virtio device (virtio spec 4.1.2).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// PCI device ID of a modern device is this plus its device type (4.1.2.1).
pub const VIRTIO_PCI_MODERN_DEVICE_ID_BASE: u16 = 0x1040;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_masks_are_the_bits_the_spec_numbers() {
        assert_eq!(VIRTIO_F_VERSION_1, 1 << 32);
        assert_eq!(ring::VIRTIO_RING_F_INDIRECT_DESC, 1 << 28);
        assert_eq!(ring::VIRTIO_RING_F_EVENT_IDX, 1 << 29);
        assert_eq!(ring::VIRTIO_F_RING_PACKED, 1 << 34);
        assert_eq!(ring::VRING_PACKED_DESC_F_AVAIL, 0x80);
        assert_eq!(ring::VRING_PACKED_DESC_F_USED, 0x8000);
        assert_eq!(ring::VRING_PACKED_EVENT_F_WRAP_CTR, 0x8000);
        assert_eq!(blk::VIRTIO_BLK_F_WRITE_ZEROES, 1 << 14);
        assert_eq!(net::VIRTIO_NET_F_MQ, 1 << 22);
        assert_eq!(vhost_user::VHOST_USER_F_PROTOCOL_FEATURES, 1 << 30);
        assert_eq!(vhost_user::VHOST_F_LOG_ALL, 1 << 26);
        assert_eq!(console::VIRTIO_CONSOLE_F_EMERG_WRITE, 1 << 2);
    }
}
