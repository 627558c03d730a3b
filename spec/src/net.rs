//! virtio-net (virtio spec 5.1): features, header flags and GSO types,
//! control classes, commands and acks, and the config space.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_net as n;
use vm_memory::{ByteValued, Le16};

use crate::{feature, u8_of, u16_of};

/// Feature: the driver may send packets with a partial checksum.
pub const VIRTIO_NET_F_CSUM: u64 = feature(n::VIRTIO_NET_F_CSUM);
/// Feature: the driver accepts packets with a partial checksum.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = feature(n::VIRTIO_NET_F_GUEST_CSUM);
/// Feature: `mtu` is valid.
pub const VIRTIO_NET_F_MTU: u64 = feature(n::VIRTIO_NET_F_MTU);
/// Feature: `mac` is valid.
pub const VIRTIO_NET_F_MAC: u64 = feature(n::VIRTIO_NET_F_MAC);
/// Feature: the driver accepts TSOv4.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = feature(n::VIRTIO_NET_F_GUEST_TSO4);
/// Feature: the driver accepts TSOv6.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = feature(n::VIRTIO_NET_F_GUEST_TSO6);
/// Feature: the driver accepts TSO with ECN.
pub const VIRTIO_NET_F_GUEST_ECN: u64 = feature(n::VIRTIO_NET_F_GUEST_ECN);
/// Feature: the driver accepts UFO.
pub const VIRTIO_NET_F_GUEST_UFO: u64 = feature(n::VIRTIO_NET_F_GUEST_UFO);
/// Feature: the device accepts TSOv4.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = feature(n::VIRTIO_NET_F_HOST_TSO4);
/// Feature: the device accepts TSOv6.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = feature(n::VIRTIO_NET_F_HOST_TSO6);
/// Feature: the device accepts TSO with ECN.
pub const VIRTIO_NET_F_HOST_ECN: u64 = feature(n::VIRTIO_NET_F_HOST_ECN);
/// Feature: the device accepts UFO.
pub const VIRTIO_NET_F_HOST_UFO: u64 = feature(n::VIRTIO_NET_F_HOST_UFO);
/// Feature: the driver can merge receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = feature(n::VIRTIO_NET_F_MRG_RXBUF);
/// Feature: `status` is valid.
pub const VIRTIO_NET_F_STATUS: u64 = feature(n::VIRTIO_NET_F_STATUS);
/// Feature: the control queue.
pub const VIRTIO_NET_F_CTRL_VQ: u64 = feature(n::VIRTIO_NET_F_CTRL_VQ);
/// Feature: control: promiscuous, all-multicast, MAC filter tables.
pub const VIRTIO_NET_F_CTRL_RX: u64 = feature(n::VIRTIO_NET_F_CTRL_RX);
/// Feature: several queue pairs.
pub const VIRTIO_NET_F_MQ: u64 = feature(n::VIRTIO_NET_F_MQ);

/// Header flag: the device completes the checksum at `csum_start` + `csum_offset`.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = u8_of(n::VIRTIO_NET_HDR_F_NEEDS_CSUM);
/// Header flag (receive): the checksum was verified.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = u8_of(n::VIRTIO_NET_HDR_F_DATA_VALID);
/// GSO type: none.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = u8_of(n::VIRTIO_NET_HDR_GSO_NONE);
/// GSO type: TCP over IPv4.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = u8_of(n::VIRTIO_NET_HDR_GSO_TCPV4);
/// GSO type: UDP fragmentation.
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = u8_of(n::VIRTIO_NET_HDR_GSO_UDP);
/// GSO type: TCP over IPv6.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = u8_of(n::VIRTIO_NET_HDR_GSO_TCPV6);
/// GSO type bit: TCP with ECN.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = u8_of(n::VIRTIO_NET_HDR_GSO_ECN);
/// Control class: receive filtering.
pub const VIRTIO_NET_CTRL_RX: u8 = u8_of(n::VIRTIO_NET_CTRL_RX);
/// Receive-filter command: promiscuous mode on or off.
pub const VIRTIO_NET_CTRL_RX_PROMISC: u8 = u8_of(n::VIRTIO_NET_CTRL_RX_PROMISC);
/// Receive-filter command: all-multicast on or off.
pub const VIRTIO_NET_CTRL_RX_ALLMULTI: u8 = u8_of(n::VIRTIO_NET_CTRL_RX_ALLMULTI);
/// Control class: MAC filter tables.
pub const VIRTIO_NET_CTRL_MAC: u8 = u8_of(n::VIRTIO_NET_CTRL_MAC);
/// MAC command: set the unicast and multicast tables.
pub const VIRTIO_NET_CTRL_MAC_TABLE_SET: u8 = u8_of(n::VIRTIO_NET_CTRL_MAC_TABLE_SET);
/// Control class: multi-queue.
pub const VIRTIO_NET_CTRL_MQ: u8 = u8_of(n::VIRTIO_NET_CTRL_MQ);
/// Multi-queue command: number of queue pairs in use.
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = u8_of(n::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET);
/// Control ack: done.
pub const VIRTIO_NET_OK: u8 = u8_of(n::VIRTIO_NET_OK);
/// Control ack: refused.
pub const VIRTIO_NET_ERR: u8 = u8_of(n::VIRTIO_NET_ERR);

/// Config status bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = u16_of(n::VIRTIO_NET_S_LINK_UP);

/// `struct virtio_net_config` up to `mtu`: the fields Bulkhead offers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetConfig {
    /// MAC address (VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_*` (VIRTIO_NET_F_STATUS).
    pub status: Le16,
    /// Most queue pairs (VIRTIO_NET_F_MQ).
    pub max_virtqueue_pairs: Le16,
    /// MTU (VIRTIO_NET_F_MTU).
    pub mtu: Le16,
}

// SAFETY: plain old data of integers with no padding (checked below);
// every bit pattern is a valid value.
unsafe impl ByteValued for VirtioNetConfig {}

// The layout of Linux's header, checked against the bindings.
const _: () = {
    assert!(size_of::<VirtioNetConfig>() == 12);
    assert!(offset_of!(VirtioNetConfig, status) == offset_of!(n::virtio_net_config, status));
    assert!(
        offset_of!(VirtioNetConfig, max_virtqueue_pairs)
            == offset_of!(n::virtio_net_config, max_virtqueue_pairs)
    );
    assert!(offset_of!(VirtioNetConfig, mtu) == offset_of!(n::virtio_net_config, mtu));
};
