//! The console device's state (see `bulkhead_common::state`): what the
//! driver told the device through the control queue, which a swapped or
//! restarted daemon must keep so host input keeps reaching an opened port
//! and a resize keeps reaching the console without the driver saying
//! anything again (it will not: Linux sends PORT_READY and PORT_OPEN once).
//!
//! Payload, version 1 (little endian):
//!
//! ```text
//! u64 virtio features the driver acked (without VHOST_USER_F_PROTOCOL_FEATURES)
//! u8  driver ready (DEVICE_READY 1 received): 0/1
//! u32 ports; must equal this daemon's
//! per port, in order:
//!   u8  flags: bit 0 ready (PORT_READY 1), bit 1 open in the guest
//!       (PORT_OPEN 1), bit 2 console (port 0 exactly); other bits 0
//!   u8  name length (0: port 0, no name), then the name; must equal this daemon's
//!   u16 cols, u16 rows: the size the guest was told (0, 0: none yet)
//! u16 control messages not yet delivered to the driver (bounded as the queue is)
//! per message: u16 event (PORT_ADD 1, CONSOLE_PORT 4, RESIZE 5, PORT_OPEN 6,
//!   PORT_NAME 7), u32 port, then PORT_OPEN: u8 value; RESIZE: u16 cols,
//!   u16 rows; the others nothing (a name is the port's own)
//! ```

use bulkhead_common::spec::console::{
    VIRTIO_CONSOLE_CONSOLE_PORT, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_PORT_ADD,
    VIRTIO_CONSOLE_PORT_NAME, VIRTIO_CONSOLE_PORT_OPEN, VIRTIO_CONSOLE_RESIZE,
};
use bulkhead_common::state::{Reader, StateError, Writer, check_features};

use crate::request::DeviceEvent;

/// One port's part of the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortState {
    /// The driver set the port up (PORT_READY 1).
    pub ready: bool,
    /// A guest process has it open (PORT_OPEN 1); host input flows.
    pub guest_open: bool,
    /// The size the guest was told, if any.
    pub size: Option<(u16, u16)>,
}

/// The console device's state, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleState {
    /// Virtio features the driver acked.
    pub features: u64,
    /// DEVICE_READY 1 was received.
    pub driver_ready: bool,
    /// Every port, port 0 first.
    pub ports: Vec<PortState>,
    /// Control messages queued for the driver.
    pub pending: Vec<DeviceEvent>,
}

/// What a state must fit: this daemon and the features its driver acked.
pub struct Limits<'a> {
    /// Virtio features the driver acked.
    pub acked: u64,
    /// Each port's name, port 0 (no name) first.
    pub names: Vec<Option<&'a str>>,
    /// Most control messages that may wait for the driver.
    pub max_pending: usize,
}

const READY: u8 = 1;
const GUEST_OPEN: u8 = 2;
const CONSOLE: u8 = 4;

impl ConsoleState {
    /// The payload bytes, with the ports' names from `names`.
    pub fn encode(&self, names: &[Option<&str>]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.features)
            .u8(u8::from(self.driver_ready))
            .u32(self.ports.len() as u32);
        for (id, p) in self.ports.iter().enumerate() {
            let mut flags = 0;
            if p.ready {
                flags |= READY;
            }
            if p.guest_open {
                flags |= GUEST_OPEN;
            }
            if id == 0 {
                flags |= CONSOLE;
            }
            // Names are at most 255 bytes (the CLI checks).
            let name = names.get(id).copied().flatten().unwrap_or("").as_bytes();
            let name = &name[..name.len().min(255)];
            let (cols, rows) = p.size.unwrap_or((0, 0));
            w.u8(flags)
                .u8(name.len() as u8)
                .bytes(name)
                .u16(cols)
                .u16(rows);
        }
        // Bounded by the control queue's limit, far below u16::MAX.
        let n = self.pending.len().min(usize::from(u16::MAX));
        w.u16(n as u16);
        for ev in &self.pending[..n] {
            match ev {
                DeviceEvent::PortAdd(id) => w.u16(VIRTIO_CONSOLE_PORT_ADD).u32(*id),
                DeviceEvent::ConsolePort(id) => w.u16(VIRTIO_CONSOLE_CONSOLE_PORT).u32(*id),
                DeviceEvent::PortName(id, _) => w.u16(VIRTIO_CONSOLE_PORT_NAME).u32(*id),
                DeviceEvent::PortOpen(id, open) => {
                    w.u16(VIRTIO_CONSOLE_PORT_OPEN).u32(*id).u8(u8::from(*open))
                }
                DeviceEvent::Resize { id, cols, rows } => {
                    w.u16(VIRTIO_CONSOLE_RESIZE).u32(*id).u16(*cols).u16(*rows)
                }
            };
        }
        w.0
    }

    /// Parses a payload saved by another daemon, field by field, against
    /// this daemon's `limits`.
    pub fn parse(payload: &[u8], limits: &Limits<'_>) -> Result<ConsoleState, StateError> {
        let invalid = |m: String| Err(StateError::Invalid(m));
        let mut r = Reader::new(payload);
        let features = r.u64("the features")?;
        check_features(features, limits.acked)?;
        let multiport = features & VIRTIO_CONSOLE_F_MULTIPORT != 0;
        let driver_ready = r.flag("the driver-ready flag")?;
        let nports = r.u32("the port count")?;
        if usize::try_from(nports).ok() != Some(limits.names.len()) {
            return Err(StateError::Mismatch(format!(
                "{nports} ports saved, this daemon has {}",
                limits.names.len()
            )));
        }
        if driver_ready && !multiport {
            return invalid("driver ready without MULTIPORT".into());
        }
        let mut ports = Vec::with_capacity(limits.names.len());
        for (id, want) in limits.names.iter().enumerate() {
            let flags = r.u8("a port's flags")?;
            let len = r.u8("a port's name length")?;
            let name = r.bytes(usize::from(len), "a port's name")?;
            let cols = r.u16("a port's columns")?;
            let rows = r.u16("a port's rows")?;
            if flags & !(READY | GUEST_OPEN | CONSOLE) != 0 {
                return invalid(format!("port {id} flags {flags:#x}"));
            }
            if (flags & CONSOLE != 0) != (id == 0) {
                return invalid(format!(
                    "port {id} console flag (only port 0 is the console)"
                ));
            }
            let want = want.unwrap_or("").as_bytes();
            if name != want {
                return Err(StateError::Mismatch(format!(
                    "port {id} is named {:?} in the state, {:?} here",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(want)
                )));
            }
            let ready = flags & READY != 0;
            let guest_open = flags & GUEST_OPEN != 0;
            if multiport && (ready && !driver_ready || guest_open && !ready) {
                return invalid(format!("port {id} open or ready out of order"));
            }
            if !multiport && (ready || guest_open && id != 0) {
                return invalid(format!("port {id} set up without MULTIPORT"));
            }
            if (cols == 0) != (rows == 0) {
                return invalid(format!("port {id} size {cols}x{rows}"));
            }
            ports.push(PortState {
                ready,
                guest_open,
                size: (cols != 0).then_some((cols, rows)),
            });
        }
        let n = usize::from(r.u16("the control message count")?);
        if n > limits.max_pending {
            return invalid(format!(
                "{n} control messages pending, at most {}",
                limits.max_pending
            ));
        }
        if n > 0 && !multiport {
            return invalid("control messages without MULTIPORT".into());
        }
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            let event = r.u16("a control message")?;
            let id = r.u32("a control message's port")?;
            let Some(name) = limits.names.get(id as usize) else {
                return invalid(format!("control message for port {id}"));
            };
            let ev = match event {
                VIRTIO_CONSOLE_PORT_ADD => DeviceEvent::PortAdd(id),
                VIRTIO_CONSOLE_CONSOLE_PORT => DeviceEvent::ConsolePort(id),
                VIRTIO_CONSOLE_PORT_NAME => match name {
                    Some(n) => DeviceEvent::PortName(id, n.to_string()),
                    None => return invalid(format!("PORT_NAME for unnamed port {id}")),
                },
                VIRTIO_CONSOLE_PORT_OPEN => DeviceEvent::PortOpen(id, r.flag("a PORT_OPEN value")?),
                VIRTIO_CONSOLE_RESIZE => {
                    let cols = r.u16("a RESIZE's columns")?;
                    let rows = r.u16("a RESIZE's rows")?;
                    if cols == 0 || rows == 0 {
                        return invalid(format!("RESIZE to {cols}x{rows}"));
                    }
                    DeviceEvent::Resize { id, cols, rows }
                }
                e => return invalid(format!("control message event {e}")),
            };
            pending.push(ev);
        }
        r.finish()?;
        Ok(ConsoleState {
            features,
            driver_ready,
            ports,
            pending,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::spec::VIRTIO_F_VERSION_1;
    use bulkhead_common::spec::console::VIRTIO_CONSOLE_F_SIZE;

    const MP: u64 = VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT | VIRTIO_CONSOLE_F_SIZE;

    fn limits() -> Limits<'static> {
        Limits {
            acked: MP | (1 << 30),
            names: vec![None, Some("org.example.log")],
            max_pending: 80,
        }
    }

    fn state() -> ConsoleState {
        ConsoleState {
            features: MP,
            driver_ready: true,
            ports: vec![
                PortState {
                    ready: true,
                    guest_open: true,
                    size: Some((120, 40)),
                },
                PortState {
                    ready: true,
                    guest_open: false,
                    size: None,
                },
            ],
            pending: vec![
                DeviceEvent::PortAdd(1),
                DeviceEvent::PortName(1, "org.example.log".into()),
                DeviceEvent::PortOpen(1, true),
                DeviceEvent::ConsolePort(0),
                DeviceEvent::Resize {
                    id: 0,
                    cols: 80,
                    rows: 25,
                },
            ],
        }
    }

    fn encode(s: &ConsoleState) -> Vec<u8> {
        s.encode(&limits().names)
    }

    #[test]
    fn every_field_round_trips() {
        let s = state();
        assert_eq!(ConsoleState::parse(&encode(&s), &limits()), Ok(s));
    }

    #[test]
    fn another_port_layout_or_names_are_refused() {
        let p = encode(&state());
        let l = Limits {
            names: vec![None, Some("other")],
            ..limits()
        };
        assert!(matches!(
            ConsoleState::parse(&p, &l),
            Err(StateError::Mismatch(m)) if m.contains("named")
        ));
        let l = Limits {
            names: vec![None],
            ..limits()
        };
        assert!(matches!(
            ConsoleState::parse(&p, &l),
            Err(StateError::Mismatch(m)) if m.contains("2 ports")
        ));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let refused = |s: ConsoleState| ConsoleState::parse(&encode(&s), &limits()).unwrap_err();
        let mut s = state();
        s.driver_ready = false;
        assert!(
            matches!(refused(s), StateError::Invalid(_)),
            "ready before DEVICE_READY"
        );
        let mut s = state();
        s.ports[1] = PortState {
            ready: false,
            guest_open: true,
            size: None,
        };
        assert!(
            matches!(refused(s), StateError::Invalid(_)),
            "open before ready"
        );
        let mut s = state();
        s.pending = vec![DeviceEvent::PortOpen(7, true)];
        assert!(matches!(refused(s), StateError::Invalid(_)), "no port 7");
        let mut s = state();
        s.pending = vec![DeviceEvent::PortAdd(0); 81];
        assert!(
            matches!(refused(s), StateError::Invalid(_)),
            "too many pending"
        );
        let mut s = state();
        s.pending = vec![DeviceEvent::PortName(0, String::new())];
        assert!(
            matches!(refused(s), StateError::Invalid(_)),
            "name of port 0"
        );
        // Byte-level damage: flags, a size half zero, an unknown event.
        let good = encode(&state());
        let port0 = 8 + 1 + 4;
        let mut p = good.clone();
        p[port0] |= 8;
        assert!(matches!(
            ConsoleState::parse(&p, &limits()),
            Err(StateError::Invalid(_))
        ));
        let mut p = good.clone();
        p[port0] &= !CONSOLE;
        assert!(matches!(
            ConsoleState::parse(&p, &limits()),
            Err(StateError::Invalid(_))
        ));
        let mut p = good.clone();
        p[port0 + 2..port0 + 4].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(
            ConsoleState::parse(&p, &limits()),
            Err(StateError::Invalid(_))
        ));
        let mut s = state();
        s.pending = vec![DeviceEvent::PortAdd(1)];
        let mut p = encode(&s);
        let at = p.len() - 6;
        p[at..at + 2].copy_from_slice(&99u16.to_le_bytes());
        assert!(matches!(
            ConsoleState::parse(&p, &limits()),
            Err(StateError::Invalid(_))
        ));
        assert!(matches!(
            ConsoleState::parse(&good[..good.len() - 1], &limits()),
            Err(StateError::Short(_))
        ));
    }

    #[test]
    fn a_single_port_driver_keeps_only_port_0_open() {
        let l = Limits {
            acked: VIRTIO_F_VERSION_1,
            names: vec![None],
            max_pending: 80,
        };
        let s = ConsoleState {
            features: VIRTIO_F_VERSION_1,
            driver_ready: false,
            ports: vec![PortState {
                ready: false,
                guest_open: true,
                size: None,
            }],
            pending: Vec::new(),
        };
        let names = [None];
        assert_eq!(ConsoleState::parse(&s.encode(&names), &l), Ok(s.clone()));
        let mut bad = s;
        bad.driver_ready = true;
        assert!(ConsoleState::parse(&bad.encode(&names), &l).is_err());
    }
}
