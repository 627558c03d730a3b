//! Parsing the VMM's command-line values: memory sizes and the
//! `key=value,...` device options of `--blk`, `--net`, `--console`,
//! `--vhost-user` and `--serial`. Each parser returns a validated value or a
//! message naming the bad key.

use std::path::PathBuf;

use bulkhead_spec::blk::VirtioBlkConfig;
use bulkhead_spec::console::VirtioConsoleConfig;
use bulkhead_spec::net::VirtioNetConfig;

use crate::device::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};

/// Default largest queue size offered to the driver (net and console).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Default for block devices: bulkhead-blk's and QEMU's vhost-user-blk
/// default, which the backend's `seg_max` is sized for.
pub const DEFAULT_BLK_QUEUE_SIZE: u16 = 128;

/// Which transport a device sits behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// virtio-pci (modern, MSI-X).
    Pci,
    /// virtio-mmio version 2.
    Mmio,
}

/// One vhost-user device from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Device id in logs and the control API (`id=`; default `blk0`, `net0`, ...).
    pub id: Option<String>,
    /// Backend socket.
    pub socket: PathBuf,
    /// Transport.
    pub transport: Transport,
    /// virtio device type.
    pub virtio_id: u32,
    /// Queues to expose (`None`: what the backend reports).
    pub queues: Option<usize>,
    /// Largest queue size.
    pub queue_size: u16,
    /// Config space bytes to read from the backend.
    pub config_size: u32,
    /// Whether packed rings (VIRTIO_F_RING_PACKED) are offered to the
    /// driver when the backend offers them (`packed=on`; default off).
    pub packed: bool,
}

/// The device kinds the CLI knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// `--blk`.
    Blk,
    /// `--net`.
    Net,
    /// `--console`.
    Console,
    /// `--vhost-user` (needs `virtio-id=`).
    Generic,
}

impl DeviceKind {
    fn defaults(self) -> (Option<u32>, u32) {
        // (virtio id, config size): the config spaces the backends serve.
        match self {
            DeviceKind::Blk => (Some(VIRTIO_ID_BLOCK), size_of::<VirtioBlkConfig>() as u32),
            DeviceKind::Net => (Some(VIRTIO_ID_NET), size_of::<VirtioNetConfig>() as u32),
            DeviceKind::Console => (
                Some(VIRTIO_ID_CONSOLE),
                size_of::<VirtioConsoleConfig>() as u32,
            ),
            DeviceKind::Generic => (None, 0),
        }
    }
}

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// This process's stdout (input from stdin).
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
}

/// Parses `512M`, `2G`, `65536K` or a byte count (shared with the launcher).
pub use bulkhead_common::size::parse_memory;

fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{key}={v}: not a valid number"))
}

/// Parses the options of a device flag of `kind`.
pub fn parse_device(kind: DeviceKind, s: &str) -> Result<DeviceConfig, String> {
    let (mut virtio_id, mut config_size) = kind.defaults();
    let mut socket = None;
    let mut id = None;
    let mut transport = Transport::Pci;
    let mut queues = None;
    let mut packed = false;
    let mut queue_size = match kind {
        DeviceKind::Blk => DEFAULT_BLK_QUEUE_SIZE,
        _ => DEFAULT_QUEUE_SIZE,
    };
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not key=value"))?;
        match k {
            "socket" | "path" => socket = Some(PathBuf::from(v)),
            "id" => {
                let ok = !v.is_empty()
                    && v.len() <= 32
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !ok {
                    return Err(format!("id={v}: 1 to 32 letters, digits, '-' or '_'"));
                }
                id = Some(v.to_string());
            }
            "transport" => {
                transport = match v {
                    "pci" => Transport::Pci,
                    "mmio" => Transport::Mmio,
                    _ => return Err(format!("transport={v}: expected pci or mmio")),
                }
            }
            "queues" | "num-queues" => {
                let n: usize = number(k, v)?;
                if n == 0 || n > crate::vhost_user::MAX_QUEUES {
                    return Err(format!(
                        "{k}={v}: must be 1 to {}",
                        crate::vhost_user::MAX_QUEUES
                    ));
                }
                queues = Some(n);
            }
            "queue-size" => {
                let n: u16 = number(k, v)?;
                if n == 0 || !n.is_power_of_two() || n > 32768 {
                    return Err(format!("{k}={v}: must be a power of two up to 32768"));
                }
                queue_size = n;
            }
            "packed" => {
                packed = match v {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    _ => return Err(format!("packed={v}: expected on or off")),
                }
            }
            "virtio-id" if kind == DeviceKind::Generic => {
                let id: u32 = number(k, v)?;
                if id == 0 || id > 0x3f {
                    return Err(format!("{k}={v}: must be 1 to 63"));
                }
                virtio_id = Some(id);
            }
            "config-size" => {
                let n: u32 = number(k, v)?;
                if n > crate::vhost_user::MAX_CONFIG_SIZE {
                    return Err(format!(
                        "{k}={v}: at most {}",
                        crate::vhost_user::MAX_CONFIG_SIZE
                    ));
                }
                config_size = n;
            }
            _ => return Err(format!("unknown option '{k}'")),
        }
    }
    let socket = socket.ok_or("socket=PATH is required")?;
    let virtio_id = virtio_id.ok_or("virtio-id=N is required for --vhost-user")?;
    Ok(DeviceConfig {
        id,
        socket,
        transport,
        virtio_id,
        queues,
        queue_size,
        config_size,
        packed,
    })
}

/// Parses `--serial stdio|file=PATH|none`.
pub fn parse_serial(s: &str) -> Result<SerialMode, String> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "none" | "off" => Ok(SerialMode::None),
        _ => match s.split_once('=') {
            Some(("file", p)) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(format!("'{s}': expected stdio, file=PATH or none")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_options() {
        let d = parse_device(DeviceKind::Blk, "socket=/s,transport=mmio,queues=2").unwrap();
        assert_eq!(d.socket, PathBuf::from("/s"));
        assert_eq!(d.transport, Transport::Mmio);
        assert_eq!(d.queues, Some(2));
        assert_eq!(d.virtio_id, VIRTIO_ID_BLOCK);
        assert_eq!(d.id, None);
        let n = parse_device(DeviceKind::Blk, "socket=/s,id=root-disk").unwrap();
        assert_eq!(n.id.as_deref(), Some("root-disk"));
        assert!(parse_device(DeviceKind::Blk, "socket=/s,id=a b").is_err());
        assert!(parse_device(DeviceKind::Blk, "transport=pci").is_err());
        assert!(parse_device(DeviceKind::Blk, "socket=/s,transport=isa").is_err());
        assert!(parse_device(DeviceKind::Blk, "socket=/s,bogus=1").is_err());
        // Packed rings only when asked for, as in QEMU.
        assert!(!d.packed);
        assert!(
            parse_device(DeviceKind::Net, "socket=/s,packed=on")
                .unwrap()
                .packed
        );
        assert!(
            !parse_device(DeviceKind::Net, "socket=/s,packed=off")
                .unwrap()
                .packed
        );
        assert_eq!(
            parse_device(DeviceKind::Net, "socket=/s,packed=yes").unwrap_err(),
            "packed=yes: expected on or off"
        );
        assert!(parse_device(DeviceKind::Blk, "socket=/s,queue-size=100").is_err());
        assert!(parse_device(DeviceKind::Blk, "socket=/s,virtio-id=3").is_err());
        assert!(parse_device(DeviceKind::Generic, "socket=/s").is_err());
        let g = parse_device(DeviceKind::Generic, "socket=/s,virtio-id=26,queues=2").unwrap();
        assert_eq!(g.virtio_id, 26);
    }

    #[test]
    fn serial_modes() {
        assert_eq!(parse_serial("stdio"), Ok(SerialMode::Stdio));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialMode::File("/tmp/x".into()))
        );
        assert!(parse_serial("tcp").is_err());
    }
}
