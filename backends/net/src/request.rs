//! Parsing what the guest hands the device into validated values.
//!
//! A transmitted packet's `virtio_net_hdr` and a control command (class,
//! command, data) are copied out of guest memory exactly once, here, and
//! checked against what was negotiated. Device logic acts only on the
//! returned [`TxFrame`] or [`CtrlCommand`]; the header the tap receives is
//! the validated copy, never guest memory.

use bulkhead_common::DescriptorChain;
use bulkhead_common::spec::net::{
    VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
};
use vm_memory::ByteValued;

/// Size of an Ethernet header: the shortest frame worth sending.
pub const ETH_HLEN: u64 = 14;
/// Largest frame (without the virtio-net header) the device carries: 64 KiB.
pub const MAX_FRAME_LEN: u64 = 65536;
/// Header size with VERSION_1 or MRG_RXBUF (`virtio_net_hdr_mrg_rxbuf`).
pub const HDR_LEN_V1: usize = 12;
/// Header size of a legacy device without MRG_RXBUF (`virtio_net_hdr`).
pub const HDR_LEN_LEGACY: usize = 10;

/// Most addresses in one MAC filter table.
pub const MAX_MAC_TABLE: u32 = 64;
/// Most data bytes in one control command.
pub const MAX_CTRL_DATA: u64 = 1024;

/// `virtio_net_hdr_mrg_rxbuf`, as the guest lays it out (little endian).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from csum_start.
    pub csum_offset: u16,
    /// Receive buffers the packet spans (MRG_RXBUF).
    pub num_buffers: u16,
}
// SAFETY: plain old data, every bit pattern valid.
unsafe impl ByteValued for VirtioNetHdr {}

/// A MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Whether this is a group (multicast or broadcast) address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// Parses an address a device can own (`--mac`, the launcher's `mac`):
    /// unicast and not all zeroes.
    pub fn parse_unicast(s: &str) -> Result<Self, String> {
        let mac: MacAddr = s.parse()?;
        if mac.is_multicast() || mac.0 == [0; 6] {
            return Err("must be a unicast address, not all zeroes".into());
        }
        Ok(mac)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err("expected six hex bytes separated by ':'".into());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("bad byte {p:?}"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad byte {p:?}"))?;
        }
        Ok(MacAddr(mac))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Offloads the driver may use on transmit (from the negotiated features).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// CSUM: partial checksums (NEEDS_CSUM).
    pub csum: bool,
    /// HOST_TSO4.
    pub tso4: bool,
    /// HOST_TSO6.
    pub tso6: bool,
    /// HOST_ECN.
    pub ecn: bool,
    /// HOST_UFO.
    pub ufo: bool,
}

/// Why a transmitted chain was dropped (a guest error, counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// Fewer readable bytes than the header plus an Ethernet header.
    #[error("frame of {0} bytes is too short for the headers")]
    TooShort(u64),
    /// More than 64 KiB after the header.
    #[error("frame of {0} bytes is too big")]
    TooBig(u64),
    /// Unknown header flags, or NEEDS_CSUM without CSUM.
    #[error("header flags {0:#x} not allowed")]
    BadFlags(u8),
    /// Checksum start and offset point outside the frame.
    #[error("checksum at {start}+{offset} is outside the frame")]
    BadCsum {
        /// csum_start.
        start: u16,
        /// csum_offset.
        offset: u16,
    },
    /// A GSO type that is unknown or was not negotiated.
    #[error("GSO type {0:#x} not allowed")]
    BadGsoType(u8),
    /// GSO fields inconsistent: zero gso_size, hdr_len beyond the frame, no NEEDS_CSUM.
    #[error("GSO fields inconsistent (hdr_len {hdr_len}, gso_size {gso_size})")]
    BadGso {
        /// hdr_len.
        hdr_len: u16,
        /// gso_size.
        gso_size: u16,
    },
}

/// A transmitted packet, validated: its header (a private copy) and frame length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxFrame {
    /// The header to hand to the tap.
    pub hdr: VirtioNetHdr,
    /// Frame bytes after the header in the chain.
    pub len: u64,
}

impl TxFrame {
    /// Parses the readable part of `chain`: `hdr_len` header bytes, then the frame.
    pub fn parse(
        chain: &DescriptorChain,
        hdr_len: usize,
        offloads: TxOffloads,
    ) -> Result<TxFrame, TxError> {
        let total = chain.readable_len();
        let mut raw = [0u8; HDR_LEN_V1];
        let hdr_bytes = raw.get_mut(..hdr_len).ok_or(TxError::TooShort(total))?;
        chain
            .reader()
            .read_exact(hdr_bytes)
            .map_err(|_| TxError::TooShort(total))?;
        let len = total
            .checked_sub(hdr_len as u64)
            .ok_or(TxError::TooShort(total))?;
        Self::validate(raw, len, offloads)
    }

    /// Checks a copied header against a frame of `len` bytes.
    pub fn validate(
        raw: [u8; HDR_LEN_V1],
        len: u64,
        offloads: TxOffloads,
    ) -> Result<TxFrame, TxError> {
        if len < ETH_HLEN {
            return Err(TxError::TooShort(len));
        }
        if len > MAX_FRAME_LEN {
            return Err(TxError::TooBig(len));
        }
        let le = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        let hdr = VirtioNetHdr {
            flags: raw[0],
            gso_type: raw[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: 0,
        };
        let needs_csum = hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        if hdr.flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || (needs_csum && !offloads.csum) {
            return Err(TxError::BadFlags(hdr.flags));
        }
        if needs_csum {
            let (start, offset) = (hdr.csum_start, hdr.csum_offset);
            let end = u64::from(start)
                .checked_add(u64::from(offset))
                .and_then(|v| v.checked_add(2));
            if end.is_none_or(|e| e > len) {
                return Err(TxError::BadCsum { start, offset });
            }
        }
        let ecn = hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        let allowed = match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => !ecn,
            VIRTIO_NET_HDR_GSO_TCPV4 => offloads.tso4 && (!ecn || offloads.ecn),
            VIRTIO_NET_HDR_GSO_TCPV6 => offloads.tso6 && (!ecn || offloads.ecn),
            VIRTIO_NET_HDR_GSO_UDP => offloads.ufo && !ecn,
            _ => false,
        };
        if !allowed {
            return Err(TxError::BadGsoType(hdr.gso_type));
        }
        if hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE
            && (hdr.gso_size == 0 || u64::from(hdr.hdr_len) > len || !needs_csum)
        {
            let (hdr_len, gso_size) = (hdr.hdr_len, hdr.gso_size);
            return Err(TxError::BadGso { hdr_len, gso_size });
        }
        Ok(TxFrame { hdr, len })
    }
}

/// Control-queue features the driver negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlFeatures {
    /// CTRL_RX: promiscuous / all-multicast and MAC tables.
    pub rx: bool,
    /// MQ: queue pair count.
    pub mq: bool,
    /// Queue pairs the device has.
    pub max_pairs: u16,
}

/// A validated control command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtrlCommand {
    /// Promiscuous mode on or off.
    Promisc(bool),
    /// All-multicast on or off.
    AllMulti(bool),
    /// Unicast and multicast MAC filter tables.
    MacTable {
        /// Unicast addresses accepted besides the device's own.
        unicast: Vec<MacAddr>,
        /// Multicast addresses accepted.
        multicast: Vec<MacAddr>,
    },
    /// Use this many queue pairs (1..=max).
    QueuePairs(u16),
}

/// Why a control command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtrlError {
    /// Not a control request at all: no class/command, or no ack byte.
    #[error("control chain has no command header or no ack byte")]
    NoHeaderOrAck,
    /// Class/command the device does not implement or the driver did not negotiate.
    #[error("control class {class} command {cmd} not supported")]
    Unsupported {
        /// Class.
        class: u8,
        /// Command.
        cmd: u8,
    },
    /// Known command with a bad length or value.
    #[error("control class {class} command {cmd}: {why}")]
    Malformed {
        /// Class.
        class: u8,
        /// Command.
        cmd: u8,
        /// What is wrong.
        why: &'static str,
    },
}

impl CtrlError {
    /// Whether the command was unsupported rather than malformed.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, CtrlError::Unsupported { .. })
    }
}

/// A control request: the command (or why it is refused).
#[derive(Debug)]
pub struct CtrlRequest {
    /// The command, validated.
    pub command: Result<CtrlCommand, CtrlError>,
    /// Whether the chain has a writable byte for the ack.
    pub has_ack: bool,
}

impl CtrlRequest {
    /// Parses a control-queue chain: class, command, data (readable), ack (last writable byte).
    pub fn parse(chain: &DescriptorChain, f: CtrlFeatures) -> CtrlRequest {
        let has_ack = chain.writable_len() >= 1;
        let mut reader = chain.reader();
        let head: Result<[u8; 2], _> = reader.read_obj();
        let command = match head {
            Ok(_) if !has_ack => Err(CtrlError::NoHeaderOrAck),
            Err(_) => Err(CtrlError::NoHeaderOrAck),
            Ok([class, cmd]) => {
                let n = reader.available();
                if n > MAX_CTRL_DATA {
                    Err(CtrlError::Malformed {
                        class,
                        cmd,
                        why: "command data too long",
                    })
                } else {
                    let mut data = vec![0u8; n as usize];
                    match reader.read_exact(&mut data) {
                        Ok(()) => parse_command(class, cmd, &data, f),
                        Err(_) => Err(CtrlError::NoHeaderOrAck),
                    }
                }
            }
        };
        CtrlRequest { command, has_ack }
    }
}

/// Parses class, command and the data copied out of the chain.
pub fn parse_command(
    class: u8,
    cmd: u8,
    data: &[u8],
    f: CtrlFeatures,
) -> Result<CtrlCommand, CtrlError> {
    let bad = |why| CtrlError::Malformed { class, cmd, why };
    match (class, cmd) {
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI) if f.rx => {
            let on = match data {
                [0] => false,
                [1] => true,
                [_] => return Err(bad("value not 0 or 1")),
                _ => return Err(bad("expected one data byte")),
            };
            Ok(if cmd == VIRTIO_NET_CTRL_RX_PROMISC {
                CtrlCommand::Promisc(on)
            } else {
                CtrlCommand::AllMulti(on)
            })
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) if f.rx => {
            let (unicast, rest) = mac_table(data).ok_or_else(|| bad("bad unicast table"))?;
            let (multicast, rest) = mac_table(rest).ok_or_else(|| bad("bad multicast table"))?;
            if !rest.is_empty() {
                return Err(bad("trailing bytes after the MAC tables"));
            }
            Ok(CtrlCommand::MacTable { unicast, multicast })
        }
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if f.mq => {
            let [lo, hi] = data else {
                return Err(bad("expected a 16-bit pair count"));
            };
            let n = u16::from_le_bytes([*lo, *hi]);
            if n == 0 || n > f.max_pairs {
                return Err(bad("pair count out of range"));
            }
            Ok(CtrlCommand::QueuePairs(n))
        }
        _ => Err(CtrlError::Unsupported { class, cmd }),
    }
}

/// One `virtio_net_ctrl_mac` table (le32 count, then the addresses); returns it and the rest.
fn mac_table(data: &[u8]) -> Option<(Vec<MacAddr>, &[u8])> {
    let (count, rest) = data.split_first_chunk::<4>()?;
    let n = u32::from_le_bytes(*count);
    if n > MAX_MAC_TABLE {
        return None;
    }
    let bytes = (n as usize).checked_mul(6)?;
    let (table, rest) = rest.split_at_checked(bytes)?;
    let macs = table
        .chunks_exact(6)
        .map(|c| {
            let mut m = [0u8; 6];
            m.copy_from_slice(c);
            MacAddr(m)
        })
        .collect();
    Some((macs, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
        ufo: true,
    };

    fn hdr(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, cs: u16, co: u16) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0] = flags;
        b[1] = gso;
        b[2..4].copy_from_slice(&hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&cs.to_le_bytes());
        b[8..10].copy_from_slice(&co.to_le_bytes());
        b
    }

    #[test]
    fn plain_and_offloaded_frames_pass() {
        assert!(TxFrame::validate(hdr(0, 0, 0, 0, 0, 0), 60, TxOffloads::default()).is_ok());
        let tso = hdr(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16);
        let f = TxFrame::validate(tso, 3000, ALL).unwrap();
        assert_eq!({ f.hdr.gso_size }, 1448);
    }

    #[test]
    fn short_big_and_bad_fields_are_refused() {
        let plain = hdr(0, 0, 0, 0, 0, 0);
        assert_eq!(
            TxFrame::validate(plain, 13, ALL),
            Err(TxError::TooShort(13))
        );
        assert_eq!(
            TxFrame::validate(plain, MAX_FRAME_LEN + 1, ALL),
            Err(TxError::TooBig(MAX_FRAME_LEN + 1))
        );
        let csum = hdr(1, 0, 0, 0, 34, 6);
        assert!(matches!(
            TxFrame::validate(csum, 60, TxOffloads::default()),
            Err(TxError::BadFlags(1))
        ));
        assert!(matches!(
            TxFrame::validate(hdr(1, 0, 0, 0, 58, 6), 60, ALL),
            Err(TxError::BadCsum { .. })
        ));
        assert!(matches!(
            TxFrame::validate(hdr(1, 0, 0, 0, u16::MAX, u16::MAX), 60, ALL),
            Err(TxError::BadCsum { .. })
        ));
        assert_eq!(
            TxFrame::validate(hdr(1, 7, 54, 1448, 34, 16), 3000, ALL),
            Err(TxError::BadGsoType(7))
        );
        let no_tso = TxOffloads { tso4: false, ..ALL };
        assert!(TxFrame::validate(hdr(1, 1, 54, 1448, 34, 16), 3000, no_tso).is_err());
        assert!(matches!(
            TxFrame::validate(hdr(1, 1, 4000, 1448, 34, 16), 3000, ALL),
            Err(TxError::BadGso { .. })
        ));
        assert!(matches!(
            TxFrame::validate(hdr(1, 1, 54, 0, 34, 16), 3000, ALL),
            Err(TxError::BadGso { .. })
        ));
    }

    #[test]
    fn control_commands_parse_or_are_refused() {
        let f = CtrlFeatures {
            rx: true,
            mq: true,
            max_pairs: 2,
        };
        assert_eq!(parse_command(0, 0, &[1], f), Ok(CtrlCommand::Promisc(true)));
        assert!(parse_command(0, 1, &[2], f).is_err());
        assert_eq!(
            parse_command(4, 0, &2u16.to_le_bytes(), f),
            Ok(CtrlCommand::QueuePairs(2))
        );
        assert!(
            !parse_command(4, 0, &3u16.to_le_bytes(), f)
                .unwrap_err()
                .is_unsupported()
        );
        assert!(parse_command(9, 0, &[], f).unwrap_err().is_unsupported());
        let no_mq = CtrlFeatures { mq: false, ..f };
        assert!(
            parse_command(4, 0, &[1, 0], no_mq)
                .unwrap_err()
                .is_unsupported()
        );
        let mut t = 1u32.to_le_bytes().to_vec();
        t.extend([2, 0, 0, 0, 0, 1]);
        t.extend(0u32.to_le_bytes());
        assert!(matches!(
            parse_command(1, 0, &t, f),
            Ok(CtrlCommand::MacTable { unicast, multicast }) if unicast.len() == 1 && multicast.is_empty()
        ));
        t.push(0);
        assert!(parse_command(1, 0, &t, f).is_err());
        assert!(parse_command(1, 0, &u32::MAX.to_le_bytes(), f).is_err());
    }

    #[test]
    fn mac_addresses_parse_and_print() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        assert!(!m.is_multicast());
        assert!("52:54:00:12:34".parse::<MacAddr>().is_err());
        assert!("52:54:00:12:34:zz".parse::<MacAddr>().is_err());
    }
}
