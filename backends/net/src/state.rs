//! The net device's state (see `bulkhead_common::state`): what the driver
//! set through the control queue, which a swapped or restarted daemon must
//! keep so the guest's receive filter holds.
//!
//! Payload, version 1 (little endian):
//!
//! ```text
//! u64 virtio features the driver acked (without VHOST_USER_F_PROTOCOL_FEATURES)
//! u8  receive modes: bit 0 promiscuous, bit 1 all-multicast (other bits 0)
//! u16 queue pairs in use (VQ_PAIRS_SET), 1..=the daemon's pairs
//! u8  MAC present (0/1), then 6 bytes: the daemon's --mac (zeroes without)
//! u8  unicast table length (at most 64), then that many 6-byte addresses
//! u8  multicast table length (at most 64), then that many 6-byte addresses
//! ```
//!
//! Nothing else is kept because nothing else can be set: the device offers
//! no CTRL_MAC_ADDR (the MAC is the daemon's `--mac`, checked to be the
//! same), no CTRL_RX_EXTRA, no CTRL_VLAN and no GUEST_ANNOUNCE, and its link
//! is always up.

use bulkhead_common::spec::net::{VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_MQ};
use bulkhead_common::state::{Reader, StateError, Writer, check_features};

use crate::device::RxFilter;
use crate::request::{MAX_MAC_TABLE, MacAddr};

/// What a state must fit: this daemon and the features its driver acked.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Virtio features the driver acked.
    pub acked: u64,
    /// Queue pairs this daemon has.
    pub queue_pairs: u16,
    /// This daemon's `--mac`.
    pub mac: Option<MacAddr>,
}

/// The net device's state, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    /// Virtio features the driver acked.
    pub features: u64,
    /// The receive filter.
    pub filter: RxFilter,
    /// Queue pairs in use.
    pub active_pairs: u16,
    /// The device's MAC address.
    pub mac: Option<MacAddr>,
}

const PROMISC: u8 = 1;
const ALLMULTI: u8 = 2;

fn table(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<MacAddr>, StateError> {
    let n = r.u8(what)?;
    if u32::from(n) > MAX_MAC_TABLE {
        return Err(StateError::Invalid(format!(
            "{what} of {n} addresses, at most {MAX_MAC_TABLE}"
        )));
    }
    let bytes = r.bytes(usize::from(n) * 6, what)?;
    Ok(bytes
        .chunks_exact(6)
        .map(|c| {
            let mut m = [0u8; 6];
            m.copy_from_slice(c);
            MacAddr(m)
        })
        .collect())
}

fn put_table(w: &mut Writer, t: &[MacAddr]) {
    // At most MAX_MAC_TABLE (64) entries: the control-queue parser's bound.
    let n = t.len().min(MAX_MAC_TABLE as usize);
    w.u8(n as u8);
    for m in &t[..n] {
        w.bytes(&m.0);
    }
}

impl NetState {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        let f = &self.filter;
        let modes = if f.promisc { PROMISC } else { 0 } | if f.allmulti { ALLMULTI } else { 0 };
        w.u64(self.features).u8(modes).u16(self.active_pairs);
        match self.mac {
            Some(m) => w.u8(1).bytes(&m.0),
            None => w.u8(0).bytes(&[0; 6]),
        };
        put_table(&mut w, &f.unicast);
        put_table(&mut w, &f.multicast);
        w.0
    }

    /// Parses a payload saved by another daemon, field by field, against
    /// this daemon's `limits`.
    pub fn parse(payload: &[u8], limits: &Limits) -> Result<NetState, StateError> {
        let mut r = Reader::new(payload);
        let features = r.u64("the features")?;
        let modes = r.u8("the receive modes")?;
        let active_pairs = r.u16("the queue pair count")?;
        let has_mac = r.flag("the MAC flag")?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(r.bytes(6, "the MAC")?);
        let unicast = table(&mut r, "the unicast table")?;
        let multicast = table(&mut r, "the multicast table")?;
        r.finish()?;

        check_features(features, limits.acked)?;
        let bit = |mask: u64| features & mask != 0;
        if modes & !(PROMISC | ALLMULTI) != 0 {
            return Err(StateError::Invalid(format!(
                "receive modes {modes:#x} (only promiscuous and all-multicast exist)"
            )));
        }
        let filter = RxFilter {
            promisc: modes & PROMISC != 0,
            allmulti: modes & ALLMULTI != 0,
            unicast,
            multicast,
        };
        if !bit(VIRTIO_NET_F_CTRL_RX) && filter != RxFilter::default() {
            return Err(StateError::Invalid(
                "a receive filter set without CTRL_RX".into(),
            ));
        }
        if active_pairs == 0 {
            return Err(StateError::Invalid("0 queue pairs in use".into()));
        }
        if active_pairs > limits.queue_pairs {
            return Err(StateError::Mismatch(format!(
                "{active_pairs} queue pairs in use, this daemon has {}",
                limits.queue_pairs
            )));
        }
        if !bit(VIRTIO_NET_F_MQ) && active_pairs != 1 {
            return Err(StateError::Invalid(format!(
                "{active_pairs} queue pairs in use without MQ"
            )));
        }
        let mac = if has_mac {
            Some(MacAddr(mac))
        } else if mac != [0; 6] {
            return Err(StateError::Invalid("a MAC without its flag".into()));
        } else {
            None
        };
        if mac != limits.mac {
            let show = |m: Option<MacAddr>| m.map_or("none".to_string(), |m| m.to_string());
            return Err(StateError::Mismatch(format!(
                "MAC {} saved, this daemon's is {}",
                show(mac),
                show(limits.mac)
            )));
        }
        Ok(NetState {
            features,
            filter,
            active_pairs,
            mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::spec::VIRTIO_F_VERSION_1;
    use bulkhead_common::spec::net::VIRTIO_NET_F_CTRL_VQ;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    const FEATURES: u64 =
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_CTRL_RX | VIRTIO_NET_F_MQ;

    fn limits() -> Limits {
        Limits {
            acked: FEATURES | (1 << 30),
            queue_pairs: 2,
            mac: Some(MAC),
        }
    }

    fn state() -> NetState {
        NetState {
            features: FEATURES,
            filter: RxFilter {
                promisc: false,
                allmulti: true,
                unicast: vec![MacAddr([2, 0, 0, 0, 0, 7])],
                multicast: vec![MacAddr([1, 0, 0x5e, 0, 0, 1]); 64],
            },
            active_pairs: 2,
            mac: Some(MAC),
        }
    }

    #[test]
    fn every_field_round_trips() {
        let s = state();
        assert_eq!(NetState::parse(&s.encode(), &limits()), Ok(s));
        let d = NetState {
            features: FEATURES,
            filter: RxFilter::default(),
            active_pairs: 1,
            mac: Some(MAC),
        };
        assert_eq!(NetState::parse(&d.encode(), &limits()), Ok(d));
    }

    fn refused(p: &[u8]) -> StateError {
        NetState::parse(p, &limits()).unwrap_err()
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let good = state().encode();
        // Unknown receive mode bits.
        let mut p = good.clone();
        p[8] |= 4;
        assert!(matches!(refused(&p), StateError::Invalid(_)));
        // 0 queue pairs.
        let mut p = good.clone();
        p[9..11].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(refused(&p), StateError::Invalid(_)));
        // MAC flag 2.
        let mut p = good.clone();
        p[11] = 2;
        assert!(matches!(refused(&p), StateError::Invalid(_)));
        // A table of 65 addresses.
        let mut s = state();
        s.filter.unicast = vec![MacAddr([2; 6]); 64];
        let mut p = s.encode();
        p[18] = 65;
        p.extend_from_slice(&[2; 6]);
        assert!(matches!(refused(&p), StateError::Invalid(m) if m.contains("at most 64")));
        // A table longer than the payload.
        let mut s = state();
        s.filter.multicast.clear();
        let mut p = s.encode();
        p[18] = 9;
        assert!(matches!(refused(&p), StateError::Short(_)));
        let mut p = good;
        p.push(0);
        assert_eq!(refused(&p), StateError::Trailing(1));
    }

    #[test]
    fn a_state_for_another_daemon_or_driver_is_refused() {
        let p = state().encode();
        let other = |l: Limits| NetState::parse(&p, &l).unwrap_err();
        assert!(matches!(
            other(Limits {
                queue_pairs: 1,
                ..limits()
            }),
            StateError::Mismatch(m) if m.contains("2 queue pairs")
        ));
        assert!(matches!(
            other(Limits {
                mac: None,
                ..limits()
            }),
            StateError::Mismatch(m) if m.contains("MAC")
        ));
        assert!(matches!(
            other(Limits {
                acked: VIRTIO_F_VERSION_1,
                ..limits()
            }),
            StateError::Mismatch(_)
        ));
        // A filter without CTRL_RX, pairs without MQ.
        let mut s = state();
        s.features = VIRTIO_F_VERSION_1;
        let l = Limits {
            acked: VIRTIO_F_VERSION_1,
            ..limits()
        };
        assert!(matches!(
            NetState::parse(&s.encode(), &l),
            Err(StateError::Invalid(_))
        ));
        s.filter = RxFilter::default();
        assert!(matches!(
            NetState::parse(&s.encode(), &l),
            Err(StateError::Invalid(m)) if m.contains("without MQ")
        ));
    }
}
