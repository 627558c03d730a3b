//! The blk device's state (see `bulkhead_common::state`): what the driver
//! set that neither the rings nor the inflight area carry. Requests need
//! nothing here (the inflight area keeps them); the one setting is the
//! write cache mode the driver chose through the config space
//! (`VIRTIO_BLK_F_CONFIG_WCE`).
//!
//! Payload, version 1 (little endian): u64 virtio features the driver acked
//! (without VHOST_USER_F_PROTOCOL_FEATURES), u8 writeback (0 writethrough,
//! 1 writeback).

use bulkhead_common::state::{Reader, StateError, Writer, check_features};

/// The blk device's state, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkState {
    /// Virtio features the driver acked.
    pub features: u64,
    /// Write cache in writeback mode.
    pub writeback: bool,
}

impl BlkState {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.features).u8(u8::from(self.writeback));
        w.0
    }

    /// Parses a payload saved by another daemon, for a driver that acked `acked`.
    pub fn parse(payload: &[u8], acked: u64) -> Result<BlkState, StateError> {
        let mut r = Reader::new(payload);
        let features = r.u64("the features")?;
        let writeback = r.flag("the write cache mode")?;
        r.finish()?;
        check_features(features, acked)?;
        Ok(BlkState {
            features,
            writeback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::spec::VIRTIO_F_VERSION_1;

    #[test]
    fn round_trips_and_refuses_other_features_and_bad_values() {
        let s = BlkState {
            features: VIRTIO_F_VERSION_1,
            writeback: false,
        };
        let p = s.encode();
        assert_eq!(BlkState::parse(&p, VIRTIO_F_VERSION_1 | (1 << 30)), Ok(s));
        assert!(matches!(
            BlkState::parse(&p, 1 << 33),
            Err(StateError::Mismatch(_))
        ));
        let mut bad = p.clone();
        bad[8] = 2;
        assert!(matches!(
            BlkState::parse(&bad, VIRTIO_F_VERSION_1),
            Err(StateError::Invalid(_))
        ));
        assert_eq!(
            BlkState::parse(&p[..8], VIRTIO_F_VERSION_1),
            Err(StateError::Short("the write cache mode"))
        );
        let mut long = p;
        long.push(0);
        assert_eq!(
            BlkState::parse(&long, VIRTIO_F_VERSION_1),
            Err(StateError::Trailing(1))
        );
    }
}
