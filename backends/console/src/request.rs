//! Control messages of a MULTIPORT virtio console (virtio spec 5.3.6.2).
//!
//! A message from the driver is copied out of guest memory exactly once, in
//! [`ControlMsg::parse`], and becomes a validated [`DriverEvent`]; device
//! logic acts only on that value. Messages to the driver are built as
//! [`DeviceEvent`]s and encoded by [`DeviceEvent::encode`].

use bulkhead_common::DescriptorChain;
use bulkhead_common::spec::console::{
    VIRTIO_CONSOLE_CONSOLE_PORT, VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_PORT_ADD,
    VIRTIO_CONSOLE_PORT_NAME, VIRTIO_CONSOLE_PORT_OPEN, VIRTIO_CONSOLE_PORT_READY,
    VIRTIO_CONSOLE_PORT_REMOVE, VIRTIO_CONSOLE_RESIZE,
};
use vm_memory::ByteValued;

/// Bytes of the control header.
pub const CONTROL_HDR_LEN: usize = 8;
/// Longest port name sent to the driver.
pub const MAX_NAME_LEN: usize = 255;

/// `struct virtio_console_control`, as laid out in guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RawControl {
    /// Port number.
    pub id: u32,
    /// `VIRTIO_CONSOLE_*` event.
    pub event: u16,
    /// Event value.
    pub value: u16,
}
// SAFETY: plain old data, every bit pattern valid.
unsafe impl ByteValued for RawControl {}

/// A control message from the driver, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverEvent {
    /// DEVICE_READY: `true` when the driver set up the device.
    DeviceReady(bool),
    /// PORT_READY for a port that exists: `true` when the driver set it up.
    PortReady(u32, bool),
    /// PORT_OPEN for a port that exists: a guest process opened (true) or closed it.
    PortOpen(u32, bool),
}

/// Why a control chain from the driver was refused (a guest error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Fewer readable bytes than the 8-byte header.
    #[error("control message of {0} bytes, shorter than its header")]
    Short(u64),
    /// An event number that is not defined at all.
    #[error("unknown control event {0}")]
    UnknownEvent(u16),
    /// An event only the device may send.
    #[error("control event {0} is sent by the device, not the driver")]
    DeviceOnlyEvent(u16),
    /// A port number not below `max_nr_ports`.
    #[error("control event {event} for port {id}, beyond the {ports} port(s)")]
    NoSuchPort {
        /// The event.
        event: u16,
        /// The port number.
        id: u32,
        /// Ports the device has.
        ports: u32,
    },
    /// A value other than 0 or 1.
    #[error("control event {event} with value {value}")]
    BadValue {
        /// The event.
        event: u16,
        /// The value.
        value: u16,
    },
}

/// Parsing of driver control messages.
pub struct ControlMsg;

impl ControlMsg {
    /// Copies the header out of `chain` once and validates it against `ports` ports.
    pub fn parse(chain: &DescriptorChain, ports: u32) -> Result<DriverEvent, ControlError> {
        let mut r = chain.reader();
        let raw: RawControl = r
            .read_obj()
            .map_err(|_| ControlError::Short(chain.readable_len()))?;
        Self::validate(raw, ports)
    }

    /// Validates a header already copied out of guest memory (little endian on every host we run on).
    pub fn validate(raw: RawControl, ports: u32) -> Result<DriverEvent, ControlError> {
        let RawControl { id, event, value } = raw;
        let flag = match value {
            0 => false,
            1 => true,
            _ => return Err(ControlError::BadValue { event, value }),
        };
        let port = || {
            if id < ports {
                Ok(id)
            } else {
                Err(ControlError::NoSuchPort { event, id, ports })
            }
        };
        match event {
            // The id of DEVICE_READY is not a port (Linux sends 0xffffffff).
            VIRTIO_CONSOLE_DEVICE_READY => Ok(DriverEvent::DeviceReady(flag)),
            VIRTIO_CONSOLE_PORT_READY => Ok(DriverEvent::PortReady(port()?, flag)),
            VIRTIO_CONSOLE_PORT_OPEN => Ok(DriverEvent::PortOpen(port()?, flag)),
            VIRTIO_CONSOLE_PORT_ADD
            | VIRTIO_CONSOLE_PORT_REMOVE
            | VIRTIO_CONSOLE_CONSOLE_PORT
            | VIRTIO_CONSOLE_RESIZE
            | VIRTIO_CONSOLE_PORT_NAME => Err(ControlError::DeviceOnlyEvent(event)),
            other => Err(ControlError::UnknownEvent(other)),
        }
    }
}

/// A control message for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// PORT_ADD.
    PortAdd(u32),
    /// CONSOLE_PORT with value 1.
    ConsolePort(u32),
    /// PORT_NAME followed by the name (no NUL; the driver adds one).
    PortName(u32, String),
    /// PORT_OPEN: the host side is open (1) or closed (0).
    PortOpen(u32, bool),
    /// RESIZE: console size, sent as `{ cols, rows }` (the spec's order).
    Resize {
        /// Port number.
        id: u32,
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
}

impl DeviceEvent {
    /// The port the message is about.
    pub fn port(&self) -> u32 {
        match self {
            DeviceEvent::PortAdd(id)
            | DeviceEvent::ConsolePort(id)
            | DeviceEvent::PortName(id, _)
            | DeviceEvent::PortOpen(id, _)
            | DeviceEvent::Resize { id, .. } => *id,
        }
    }

    /// The bytes written into a control receive buffer.
    pub fn encode(&self) -> Vec<u8> {
        let hdr = |id: u32, event: u16, value: u16| {
            let mut b = Vec::with_capacity(CONTROL_HDR_LEN);
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&event.to_le_bytes());
            b.extend_from_slice(&value.to_le_bytes());
            b
        };
        match self {
            DeviceEvent::PortAdd(id) => hdr(*id, VIRTIO_CONSOLE_PORT_ADD, 1),
            DeviceEvent::ConsolePort(id) => hdr(*id, VIRTIO_CONSOLE_CONSOLE_PORT, 1),
            DeviceEvent::PortName(id, name) => {
                let mut b = hdr(*id, VIRTIO_CONSOLE_PORT_NAME, 1);
                let n = name.len().min(MAX_NAME_LEN);
                b.extend_from_slice(&name.as_bytes()[..n]);
                b
            }
            DeviceEvent::PortOpen(id, open) => hdr(*id, VIRTIO_CONSOLE_PORT_OPEN, u16::from(*open)),
            DeviceEvent::Resize { id, cols, rows } => {
                let mut b = hdr(*id, VIRTIO_CONSOLE_RESIZE, 0);
                // The spec's order. Linux read `{ rows, cols }` until its
                // commit 5326ab737a47 (2025) followed the spec; older
                // guests see the two swapped (docs/console.md).
                b.extend_from_slice(&cols.to_le_bytes());
                b.extend_from_slice(&rows.to_le_bytes());
                b
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(id: u32, event: u16, value: u16) -> RawControl {
        RawControl { id, event, value }
    }

    #[test]
    fn accepts_what_a_driver_sends() {
        let v = |r| ControlMsg::validate(r, 2);
        assert_eq!(
            v(raw(u32::MAX, VIRTIO_CONSOLE_DEVICE_READY, 1)),
            Ok(DriverEvent::DeviceReady(true))
        );
        assert_eq!(
            v(raw(1, VIRTIO_CONSOLE_PORT_READY, 1)),
            Ok(DriverEvent::PortReady(1, true))
        );
        assert_eq!(
            v(raw(0, VIRTIO_CONSOLE_PORT_OPEN, 0)),
            Ok(DriverEvent::PortOpen(0, false))
        );
    }

    #[test]
    fn refuses_bad_ports_values_and_device_events() {
        let v = |r| ControlMsg::validate(r, 2);
        assert!(matches!(
            v(raw(2, VIRTIO_CONSOLE_PORT_READY, 1)),
            Err(ControlError::NoSuchPort { .. })
        ));
        assert!(matches!(
            v(raw(0, VIRTIO_CONSOLE_PORT_OPEN, 7)),
            Err(ControlError::BadValue { .. })
        ));
        assert_eq!(
            v(raw(0, VIRTIO_CONSOLE_RESIZE, 0)),
            Err(ControlError::DeviceOnlyEvent(VIRTIO_CONSOLE_RESIZE))
        );
        assert_eq!(v(raw(0, 99, 0)), Err(ControlError::UnknownEvent(99)));
    }

    #[test]
    fn encodes_names_and_sizes() {
        let b = DeviceEvent::PortName(1, "org.example.log".into()).encode();
        assert_eq!(&b[0..4], &1u32.to_le_bytes());
        assert_eq!(&b[4..6], &VIRTIO_CONSOLE_PORT_NAME.to_le_bytes());
        assert_eq!(&b[8..], b"org.example.log");
        let b = DeviceEvent::Resize {
            id: 0,
            cols: 120,
            rows: 40,
        }
        .encode();
        // The spec's order: cols, then rows.
        assert_eq!(&b[8..10], &120u16.to_le_bytes());
        assert_eq!(&b[10..12], &40u16.to_le_bytes());
    }
}
