//! vhost-user's own feature bits, which share the virtio feature word but
//! are no virtio feature: the frontend and backend negotiate them, the
//! guest never sees them. Values come from the `vhost` crate
//! (`VhostUserVirtioFeatures`), as `u64` masks like the virtio features
//! beside them. The protocol features (`GET/SET_PROTOCOL_FEATURES`) are
//! `vhost`'s `VhostUserProtocolFeatures`, which every crate takes from
//! `vhost` with the frontend and backend APIs that use it.

use vhost::vhost_user::message::VhostUserVirtioFeatures;

/// Feature bit 30: protocol features are negotiated
/// (`VHOST_USER_F_PROTOCOL_FEATURES`; not a virtio bit).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Feature bit 26: dirty logging for migration (`VHOST_F_LOG_ALL`), never
/// offered to the guest.
pub const VHOST_F_LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
