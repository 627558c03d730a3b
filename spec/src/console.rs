//! virtio-console (virtio spec 5.3): features, control events and the
//! config space. `virtio_bindings` has no console header, so the values are
//! written here from the spec (sections 5.3.3 and 5.3.6.2) and Linux's
//! `include/uapi/linux/virtio_console.h`; nowhere else.

use std::mem::size_of;

use vm_memory::{ByteValued, Le16, Le32};

use crate::feature;

/// Feature: `cols` and `rows` are valid.
pub const VIRTIO_CONSOLE_F_SIZE: u64 = feature(0);
/// Feature: several ports and the control queues.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = feature(1);
/// Feature: emergency write through `emerg_wr`.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u64 = feature(2);

/// Driver: it is ready (value 1) or failed to set up the device (0).
pub const VIRTIO_CONSOLE_DEVICE_READY: u16 = 0;
/// Device: a port was added.
pub const VIRTIO_CONSOLE_PORT_ADD: u16 = 1;
/// Device: a port was removed.
pub const VIRTIO_CONSOLE_PORT_REMOVE: u16 = 2;
/// Driver: a port is ready (value 1) or failed (0).
pub const VIRTIO_CONSOLE_PORT_READY: u16 = 3;
/// Device: this port is a console.
pub const VIRTIO_CONSOLE_CONSOLE_PORT: u16 = 4;
/// Device: the console's size changed.
pub const VIRTIO_CONSOLE_RESIZE: u16 = 5;
/// Both: the port was opened (1) or closed (0) on the sender's side.
pub const VIRTIO_CONSOLE_PORT_OPEN: u16 = 6;
/// Device: the port's name follows the header.
pub const VIRTIO_CONSOLE_PORT_NAME: u16 = 7;

/// `struct virtio_console_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioConsoleConfig {
    /// Columns of port 0 (VIRTIO_CONSOLE_F_SIZE).
    pub cols: Le16,
    /// Rows of port 0 (VIRTIO_CONSOLE_F_SIZE).
    pub rows: Le16,
    /// Most ports (VIRTIO_CONSOLE_F_MULTIPORT).
    pub max_nr_ports: Le32,
    /// Emergency write: the driver writes one character here.
    pub emerg_wr: Le32,
}

// SAFETY: plain old data of integers with no padding (checked below);
// every bit pattern is a valid value.
unsafe impl ByteValued for VirtioConsoleConfig {}

/// Offset of `emerg_wr`, the one field a driver writes.
pub const VIRTIO_CONSOLE_CONFIG_EMERG_WR_OFFSET: u32 =
    std::mem::offset_of!(VirtioConsoleConfig, emerg_wr) as u32;

const _: () = assert!(size_of::<VirtioConsoleConfig>() == 12);
