//! virtio-blk (virtio spec 5.2): features, request types, status codes and
//! the config space.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk as b;
use vm_memory::{ByteValued, Le16, Le32, Le64};

use crate::{feature, u8_of};

/// Feature: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = feature(b::VIRTIO_BLK_F_SIZE_MAX);
/// Feature: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = feature(b::VIRTIO_BLK_F_SEG_MAX);
/// Feature: read-only device.
pub const VIRTIO_BLK_F_RO: u64 = feature(b::VIRTIO_BLK_F_RO);
/// Feature: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = feature(b::VIRTIO_BLK_F_BLK_SIZE);
/// Feature: the flush command.
pub const VIRTIO_BLK_F_FLUSH: u64 = feature(b::VIRTIO_BLK_F_FLUSH);
/// Feature: the topology fields are valid.
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = feature(b::VIRTIO_BLK_F_TOPOLOGY);
/// Feature: `wce` is valid and writable (writeback or writethrough).
pub const VIRTIO_BLK_F_CONFIG_WCE: u64 = feature(b::VIRTIO_BLK_F_CONFIG_WCE);
/// Feature: several queues, `num_queues` is valid.
pub const VIRTIO_BLK_F_MQ: u64 = feature(b::VIRTIO_BLK_F_MQ);
/// Feature: the discard command.
pub const VIRTIO_BLK_F_DISCARD: u64 = feature(b::VIRTIO_BLK_F_DISCARD);
/// Feature: the write-zeroes command.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = feature(b::VIRTIO_BLK_F_WRITE_ZEROES);

pub use b::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Status: the request succeeded.
pub const VIRTIO_BLK_S_OK: u8 = u8_of(b::VIRTIO_BLK_S_OK);
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = u8_of(b::VIRTIO_BLK_S_IOERR);
/// Status: the device does not support the request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = u8_of(b::VIRTIO_BLK_S_UNSUPP);

/// Bytes of a GET_ID reply.
pub const VIRTIO_BLK_ID_BYTES: usize = b::VIRTIO_BLK_ID_BYTES as usize;
/// Bytes of a sector, the unit of every sector field (spec 5.2.6).
pub const VIRTIO_BLK_SECTOR_SIZE: u64 = 512;
/// Discard / write-zeroes segment flag: the device may unmap.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = b::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its
/// padding: the fields Bulkhead offers (no secure erase, no zones).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: Le64,
    /// Largest segment (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: Le32,
    /// Most data segments per request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: Le32,
    /// Legacy geometry: cylinders.
    pub cylinders: Le16,
    /// Legacy geometry: heads.
    pub heads: u8,
    /// Legacy geometry: sectors.
    pub sectors: u8,
    /// Logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: Le32,
    /// log2 of logical blocks per physical block (VIRTIO_BLK_F_TOPOLOGY).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: Le16,
    /// Optimal I/O size, in logical blocks.
    pub opt_io_size: Le32,
    /// Writeback cache on (VIRTIO_BLK_F_CONFIG_WCE).
    pub wce: u8,
    /// Padding.
    pub unused: u8,
    /// Number of queues (VIRTIO_BLK_F_MQ).
    pub num_queues: Le16,
    /// Most sectors in one discard segment.
    pub max_discard_sectors: Le32,
    /// Most segments in one discard request.
    pub max_discard_seg: Le32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: Le32,
    /// Most sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: Le32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_seg: Le32,
    /// Write zeroes may unmap.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

// SAFETY: packed plain old data of integers (no padding, no references);
// every bit pattern is a valid value.
unsafe impl ByteValued for VirtioBlkConfig {}

/// Offset of `wce`, the one field a driver writes.
pub const VIRTIO_BLK_CONFIG_WCE_OFFSET: u32 = offset_of!(VirtioBlkConfig, wce) as u32;

// The layout of Linux's header, checked against the bindings.
const _: () = {
    assert!(size_of::<VirtioBlkConfig>() == 60);
    assert!(offset_of!(VirtioBlkConfig, wce) == offset_of!(b::virtio_blk_config, wce));
    assert!(offset_of!(VirtioBlkConfig, unused1) == offset_of!(b::virtio_blk_config, unused1));
    assert!(offset_of!(VirtioBlkConfig, blk_size) == offset_of!(b::virtio_blk_config, blk_size));
    assert!(
        offset_of!(VirtioBlkConfig, num_queues) == offset_of!(b::virtio_blk_config, num_queues)
    );
    assert!(
        offset_of!(VirtioBlkConfig, max_write_zeroes_seg)
            == offset_of!(b::virtio_blk_config, max_write_zeroes_seg)
    );
};
