//! One live connection to a backend and the negotiation that opens it.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_common::event::{EventLoop, Interest};

use vhost::VhostBackend;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

use super::{
    ConnectError, MAX_CONFIG_SIZE, MAX_QUEUES, MESSAGE_TIMEOUT, VHOST_USER_F_PROTOCOL_FEATURES,
};
use crate::device::VIRTIO_F_VERSION_1;

/// Protocol features the frontend uses when the backend offers them.
fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// The token of a connection's own event loop: its socket, watched for a
/// hang-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Link {
    Socket,
}
bulkhead_common::event_token!(Link { Socket });

/// A loop watching `stream` for a hang-up.
fn watch_link(stream: &UnixStream) -> std::io::Result<EventLoop<Link>> {
    let link = EventLoop::new()?;
    link.add(stream, Interest::HANGUP, Link::Socket)?;
    Ok(link)
}

/// Whether `link`'s socket hung up or has an error (no wait).
fn link_hung_up(link: &EventLoop<Link>) -> bool {
    link.wait(Some(Duration::ZERO))
        .is_ok_and(|events| events.iter().any(|e| e.hangup))
}

/// One live vhost-user connection and what the backend said at negotiation.
pub(super) struct Connection {
    pub(super) frontend: Frontend,
    pub(super) path: PathBuf,
    pub(super) features: u64,
    pub(super) protocol: VhostUserProtocolFeatures,
    pub(super) queues: u64,
    pub(super) config: Vec<u8>,
    /// The socket registered for a hang-up, so [`Connection::hung_up`] is one
    /// `epoll_wait` on any thread (no fd, no new registration).
    link: EventLoop<Link>,
}

impl Connection {
    /// Connects to `path` and runs SET_OWNER, GET_FEATURES, the protocol
    /// feature negotiation, GET_QUEUE_NUM and GET_CONFIG.
    pub(super) fn open(path: &Path, config_size: u32) -> Result<Self, ConnectError> {
        let path = path.to_path_buf();
        let fail = |what: &'static str| {
            let p = path.clone();
            move |e| ConnectError::Message(what, p, e)
        };
        let stream =
            UnixStream::connect(&path).map_err(|e| ConnectError::Connect(path.clone(), e))?;
        stream
            .set_read_timeout(Some(MESSAGE_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(MESSAGE_TIMEOUT)))
            .map_err(|e| ConnectError::Connect(path.clone(), e))?;
        let link = watch_link(&stream).map_err(|e| ConnectError::Connect(path.clone(), e))?;
        let mut fe = Frontend::from_stream(stream, MAX_QUEUES as u64);
        fe.set_owner().map_err(fail("SET_OWNER"))?;
        let features = fe.get_features().map_err(fail("GET_FEATURES"))?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ConnectError::NotModern(path));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = fe
                .get_protocol_features()
                .map_err(fail("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted_protocol();
            fe.set_protocol_features(protocol)
                .map_err(fail("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(fail("GET_QUEUE_NUM"))?
        } else {
            1
        };
        let mut config = Vec::new();
        let size = config_size.min(MAX_CONFIG_SIZE);
        if size > 0 && protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let buf = vec![0u8; size as usize];
            let (_, payload) = fe
                .get_config(0, size, VhostUserConfigFlags::empty(), &buf)
                .map_err(fail("GET_CONFIG"))?;
            config = payload;
        }
        Ok(Connection {
            frontend: fe,
            path,
            features,
            protocol,
            queues,
            config,
            link,
        })
    }

    pub(super) fn protocol_acked(&self) -> bool {
        self.features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    pub(super) fn fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// Whether the backend hung up or the socket has an error (no wait).
    pub(super) fn hung_up(&self) -> bool {
        link_hung_up(&self.link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_user::fake::{FakeBackend, Offer, code};

    fn offer() -> Offer {
        Offer {
            features: VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | (1 << 5),
            protocol: (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG).bits(),
            queues: 3,
            config: vec![1, 2, 3, 4, 5, 6, 7, 8],
            base: 0,
        }
    }

    #[test]
    fn open_negotiates_features_protocol_queues_and_config() {
        let fake = FakeBackend::start(offer());
        let conn = Connection::open(&fake.path, 6).unwrap();
        assert_eq!(conn.features, offer().features);
        assert!(conn.protocol_acked());
        assert_eq!(
            conn.protocol,
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
        );
        assert_eq!(conn.queues, 3);
        assert_eq!(conn.config, vec![1, 2, 3, 4, 5, 6]);
        drop(conn);
        let codes: Vec<u32> = fake.messages().iter().map(|m| m.code).collect();
        use code::*;
        assert_eq!(
            codes,
            [
                SET_OWNER,
                GET_FEATURES,
                GET_PROTOCOL_FEATURES,
                SET_PROTOCOL_FEATURES,
                GET_QUEUE_NUM,
                GET_CONFIG
            ]
        );
    }

    #[test]
    fn a_backend_without_version_1_is_refused() {
        let fake = FakeBackend::start(Offer {
            features: VHOST_USER_F_PROTOCOL_FEATURES,
            ..offer()
        });
        assert!(matches!(
            Connection::open(&fake.path, 0),
            Err(ConnectError::NotModern(_))
        ));
    }

    #[test]
    fn only_the_wanted_protocol_features_are_acked() {
        let all = VhostUserProtocolFeatures::all().bits();
        let fake = FakeBackend::start(Offer {
            protocol: all,
            ..offer()
        });
        let conn = Connection::open(&fake.path, 0).unwrap();
        assert_eq!(conn.protocol, wanted_protocol());
        drop(conn);
        let msgs = fake.messages();
        let set = msgs
            .iter()
            .find(|m| m.code == code::SET_PROTOCOL_FEATURES)
            .unwrap();
        assert_eq!(set.u64_at(0), wanted_protocol().bits());
    }

    #[test]
    fn hung_up_sees_the_peer_close() {
        let (a, b) = UnixStream::pair().unwrap();
        let link = watch_link(&a).unwrap();
        assert!(!link_hung_up(&link));
        drop(b);
        assert!(link_hung_up(&link));
        assert!(link_hung_up(&link), "level-triggered: still reported");
    }
}
