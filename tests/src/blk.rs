//! A virtio-blk guest driver on top of [`Device`]: config parsing, the request
//! types, a convenience API (`read`, `write`, `flush`, ...) and a queued one
//! (`submit` many, then `reap`), plus raw submission of any descriptor layout.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::frontend::{Device, FrontendError, Options};
use crate::le::{le16, le32, le64};
use crate::memory::MemoryError;
use crate::virtq::{Buf, UsedElem, VirtQueue, VirtqError};

pub use bulkhead_spec::blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use bulkhead_spec::blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_SECTOR_SIZE, VirtioBlkConfig};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = VIRTIO_BLK_SECTOR_SIZE;
/// Length of the classic virtio_blk_config (through write_zeroes_may_unmap + padding).
pub const CONFIG_LEN: u32 = size_of::<VirtioBlkConfig>() as u32;
/// Length of the GET_ID string.
pub const ID_LEN: u32 = VIRTIO_BLK_ID_BYTES as u32;
/// Alignment of data buffers laid out by [`BlkDriver::submit`] (page, like Linux).
pub const DATA_ALIGN: u64 = 4096;
/// Default wait for one completion.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from the block driver.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The vhost-user frontend failed.
    #[error("Frontend")]
    Frontend(#[from] FrontendError),
    /// Guest memory failed.
    #[error("Guest memory")]
    Memory(#[from] MemoryError),
    /// The virtqueue failed (full, timeout, eventfd).
    #[error("Virtqueue")]
    Virtq(#[from] VirtqError),
    /// No such queue.
    #[error("No queue {0}")]
    NoQueue(usize),
    /// The device completed a head the driver did not submit through `submit`.
    #[error("Completion for unknown head {0:?}")]
    UnknownHead(UsedElem),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, BlkError>;

/// The virtio-blk device configuration space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment size.
    pub size_max: u32,
    /// Most segments per request.
    pub seg_max: u32,
    /// Logical block size.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Alignment offset in logical blocks.
    pub alignment_offset: u8,
    /// Minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size: u32,
    /// Writeback cache enabled (CONFIG_WCE).
    pub writeback: u8,
    /// Number of queues (MQ).
    pub num_queues: u16,
    /// Most sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may unmap.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Parses config bytes (little endian); missing bytes read as zero.
    pub fn parse(b: &[u8]) -> Self {
        BlkConfig {
            capacity: le64(b, 0),
            size_max: le32(b, 8),
            seg_max: le32(b, 12),
            blk_size: le32(b, 20),
            physical_block_exp: b.get(24).copied().unwrap_or(0),
            alignment_offset: b.get(25).copied().unwrap_or(0),
            min_io_size: le16(b, 26),
            opt_io_size: le32(b, 28),
            writeback: b.get(32).copied().unwrap_or(0),
            num_queues: le16(b, 34),
            max_discard_sectors: le32(b, 36),
            max_discard_seg: le32(b, 40),
            discard_sector_alignment: le32(b, 44),
            max_write_zeroes_sectors: le32(b, 48),
            max_write_zeroes_seg: le32(b, 52),
            write_zeroes_may_unmap: b.get(56).copied().unwrap_or(0),
        }
    }
}

/// The 16-byte request header `virtio_blk_outhdr`.
pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One discard / write-zeroes segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Unmap flag (write zeroes may deallocate).
    pub unmap: bool,
}

impl Segment {
    /// The 16-byte `virtio_blk_discard_write_zeroes` encoding.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(self.unmap).to_le_bytes());
        b
    }
}

/// The payload of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// No data buffer (FLUSH).
    None,
    /// Device-readable data (OUT, DISCARD, WRITE_ZEROES segments).
    Out(Vec<u8>),
    /// Device-writable buffer of this many bytes (IN, GET_ID).
    In(u32),
}

/// A block request and how to lay it out in descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `VIRTIO_BLK_T_*`.
    pub kind: u32,
    /// Start sector.
    pub sector: u64,
    /// Data.
    pub payload: Payload,
    /// Split the data into this many descriptors (at least 1).
    pub data_segs: usize,
    /// Put the header in two 8-byte descriptors.
    pub split_header: bool,
}

impl Request {
    /// A request with one data descriptor and a whole header.
    pub fn new(kind: u32, sector: u64, payload: Payload) -> Self {
        Request {
            kind,
            sector,
            payload,
            data_segs: 1,
            split_header: false,
        }
    }

    /// A read of `len` bytes at `sector`.
    pub fn read(sector: u64, len: u32) -> Self {
        Self::new(VIRTIO_BLK_T_IN, sector, Payload::In(len))
    }

    /// A write of `data` at `sector`.
    pub fn write(sector: u64, data: Vec<u8>) -> Self {
        Self::new(VIRTIO_BLK_T_OUT, sector, Payload::Out(data))
    }

    /// Splits the data over `n` descriptors.
    pub fn segs(mut self, n: usize) -> Self {
        self.data_segs = n.max(1);
        self
    }

    /// Splits the header over two descriptors.
    pub fn split_header(mut self) -> Self {
        self.split_header = true;
        self
    }
}

/// A completed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index.
    pub head: u16,
    /// Used length reported by the device.
    pub used_len: u32,
    /// Status byte the device wrote.
    pub status: u8,
    /// Device-written data (IN / GET_ID), empty otherwise.
    pub data: Vec<u8>,
}

struct Pending {
    header: u64,
    data: Option<(u64, u32)>,
    data_in: bool,
    status: u64,
}

/// A virtio-blk driver over a connected vhost-user device.
pub struct BlkDriver {
    /// The underlying device (memory, queues, frontend).
    pub dev: Device,
    /// Config space read at connect time (zeroes without CONFIG).
    pub config: BlkConfig,
    /// Submit requests through indirect tables.
    pub use_indirect: bool,
    /// Wait for one completion at most this long.
    pub timeout: Duration,
    /// Publish requests without kicking; [`BlkDriver::kick`] sends the kick.
    pub defer_kick: bool,
    pending: Vec<HashMap<u16, Pending>>,
}

/// Status byte written before submission so an untouched status is visible.
pub const STATUS_UNTOUCHED: u8 = 0xff;

impl BlkDriver {
    /// Connects to a vhost-user-blk backend and reads its config.
    pub fn connect(socket: &Path, opts: &Options) -> Result<Self> {
        Self::from_device(Device::connect(socket, opts)?)
    }

    /// Wraps an already brought-up device and reads its config.
    pub fn from_device(mut dev: Device) -> Result<Self> {
        let config = if dev
            .acked_protocol
            .contains(vhost::vhost_user::VhostUserProtocolFeatures::CONFIG)
        {
            BlkConfig::parse(&dev.get_config(0, CONFIG_LEN)?)
        } else {
            BlkConfig::default()
        };
        let pending = dev.queues.iter().map(|_| HashMap::new()).collect();
        Ok(BlkDriver {
            dev,
            config,
            use_indirect: false,
            timeout: DEFAULT_TIMEOUT,
            defer_kick: false,
            pending,
        })
    }

    /// Reconnects to a (restarted) backend at `socket`, replaying memory, rings
    /// and the inflight area; requests still pending stay pending and can be reaped.
    pub fn reconnect(self, socket: &Path, opts: &Options) -> Result<Self> {
        let BlkDriver {
            dev,
            config,
            use_indirect,
            timeout,
            defer_kick,
            pending,
        } = self;
        let dev = Device::reconnect(socket, opts, dev.disconnect())?;
        Ok(BlkDriver {
            dev,
            config,
            use_indirect,
            timeout,
            defer_kick,
            pending,
        })
    }

    /// Kicks queue `q` (after requests published with `defer_kick`).
    pub fn kick(&mut self, q: usize) -> Result<()> {
        let vq = self.dev.queues.get_mut(q).ok_or(BlkError::NoQueue(q))?;
        Ok(vq.kick()?)
    }

    /// Requests submitted on queue `q` and not reaped yet.
    pub fn pending(&self, q: usize) -> usize {
        self.pending.get(q).map_or(0, |p| p.len())
    }

    /// Whether queue `q` has a completion to reap now (no waiting).
    pub fn has_completion(&self, q: usize) -> Result<bool> {
        let vq = self.dev.queues.get(q).ok_or(BlkError::NoQueue(q))?;
        Ok(vq.used_idx()? != vq.last_used())
    }

    /// Number of queues brought up.
    pub fn num_queues(&self) -> usize {
        self.dev.queues.len()
    }

    /// Queue `q` for raw use.
    pub fn queue(&mut self, q: usize) -> Result<&mut VirtQueue> {
        self.dev.queues.get_mut(q).ok_or(BlkError::NoQueue(q))
    }

    /// Lays out `req` in guest memory and publishes it on queue `q`; returns the head.
    pub fn submit(&mut self, q: usize, req: &Request) -> Result<u16> {
        let mem = self.dev.mem.clone();
        let indirect = self.use_indirect;
        let hdr = mem.alloc_with(&header(req.kind, req.sector))?;
        let status = mem.alloc_with(&[STATUS_UNTOUCHED])?;
        let mut bufs = Vec::new();
        if req.split_header {
            bufs.push(Buf::readable(hdr, 8));
            bufs.push(Buf::readable(hdr + 8, 8));
        } else {
            bufs.push(Buf::readable(hdr, 16));
        }
        let (data, data_in) = match &req.payload {
            Payload::None => (None, false),
            Payload::Out(d) => {
                let gpa = mem.alloc(d.len() as u64, DATA_ALIGN)?;
                mem.write(gpa, d)?;
                (Some((gpa, d.len() as u32)), false)
            }
            Payload::In(len) => {
                let gpa = mem.alloc(u64::from(*len), DATA_ALIGN)?;
                mem.fill(gpa, u64::from(*len), 0xa5)?;
                (Some((gpa, *len)), true)
            }
        };
        if let Some((gpa, len)) = data {
            let chunk = len.div_ceil(req.data_segs.max(1) as u32).max(1);
            let mut off = 0u32;
            loop {
                let l = chunk.min(len - off);
                bufs.push(Buf {
                    addr: gpa + u64::from(off),
                    len: l,
                    writable: data_in,
                });
                off += l;
                if off >= len {
                    break;
                }
            }
        }
        bufs.push(Buf::writable(status, 1));
        let vq = self.dev.queues.get_mut(q).ok_or(BlkError::NoQueue(q))?;
        let head = if self.defer_kick {
            let head = if indirect {
                vq.add_indirect(&bufs)?
            } else {
                vq.add_chain(&bufs)?
            };
            vq.publish(head)?;
            head
        } else {
            vq.submit(&bufs, indirect)?
        };
        self.pending[q].insert(
            head,
            Pending {
                header: hdr,
                data,
                data_in,
                status,
            },
        );
        Ok(head)
    }

    /// Waits for the next completion on queue `q` and collects its status and data.
    pub fn reap(&mut self, q: usize) -> Result<Completion> {
        let timeout = self.timeout;
        let vq = self.dev.queues.get_mut(q).ok_or(BlkError::NoQueue(q))?;
        let elem = vq.wait_used(timeout)?;
        let p = u16::try_from(elem.id)
            .ok()
            .and_then(|h| self.pending[q].remove(&h).map(|p| (h, p)));
        let Some((head, p)) = p else {
            return Err(BlkError::UnknownHead(elem));
        };
        let mem = &self.dev.mem;
        let mut st = [0u8; 1];
        mem.read(p.status, &mut st)?;
        let mut data = Vec::new();
        if let Some((gpa, len)) = p.data {
            if p.data_in {
                data = mem.read_vec(gpa, len as usize)?;
            }
            mem.free(gpa, u64::from(len));
        }
        mem.free(p.header, 16);
        mem.free(p.status, 1);
        Ok(Completion {
            head,
            used_len: elem.len,
            status: st[0],
            data,
        })
    }

    /// Submits `req` on queue `q` and waits for it.
    pub fn run(&mut self, q: usize, req: &Request) -> Result<Completion> {
        self.submit(q, req)?;
        self.reap(q)
    }

    /// Reads `len` bytes at `sector`; returns (status, data).
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> Result<(u8, Vec<u8>)> {
        let c = self.run(q, &Request::read(sector, len))?;
        Ok((c.status, c.data))
    }

    /// Writes `data` at `sector`; returns the status.
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> Result<u8> {
        Ok(self.run(q, &Request::write(sector, data.to_vec()))?.status)
    }

    /// Flushes; returns the status.
    pub fn flush(&mut self, q: usize) -> Result<u8> {
        let req = Request::new(VIRTIO_BLK_T_FLUSH, 0, Payload::None);
        Ok(self.run(q, &req)?.status)
    }

    /// Asks for the device id string; returns (status, 20 bytes).
    pub fn get_id(&mut self, q: usize) -> Result<(u8, Vec<u8>)> {
        let req = Request::new(VIRTIO_BLK_T_GET_ID, 0, Payload::In(ID_LEN));
        let c = self.run(q, &req)?;
        Ok((c.status, c.data))
    }

    /// Discards `segs`; returns the status.
    pub fn discard(&mut self, q: usize, segs: &[Segment]) -> Result<u8> {
        self.segment_request(q, VIRTIO_BLK_T_DISCARD, segs)
    }

    /// Writes zeroes over `segs`; returns the status.
    pub fn write_zeroes(&mut self, q: usize, segs: &[Segment]) -> Result<u8> {
        self.segment_request(q, VIRTIO_BLK_T_WRITE_ZEROES, segs)
    }

    fn segment_request(&mut self, q: usize, kind: u32, segs: &[Segment]) -> Result<u8> {
        let data = segs.iter().flat_map(|s| s.to_bytes()).collect();
        Ok(self
            .run(q, &Request::new(kind, 0, Payload::Out(data)))?
            .status)
    }

    /// Raw: publishes any buffer list on queue `q` (direct or indirect); returns the head.
    pub fn submit_raw(&mut self, q: usize, bufs: &[Buf], indirect: bool) -> Result<u16> {
        let vq = self.dev.queues.get_mut(q).ok_or(BlkError::NoQueue(q))?;
        Ok(vq.submit(bufs, indirect)?)
    }

    /// Raw: waits for the next used element on queue `q`.
    pub fn reap_raw(&mut self, q: usize) -> Result<UsedElem> {
        let timeout = self.timeout;
        let vq = self.dev.queues.get_mut(q).ok_or(BlkError::NoQueue(q))?;
        Ok(vq.wait_used(timeout)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fields_parse_at_spec_offsets() {
        let mut b = [0u8; 60];
        b[0..8].copy_from_slice(&2048u64.to_le_bytes());
        b[12..16].copy_from_slice(&126u32.to_le_bytes());
        b[20..24].copy_from_slice(&512u32.to_le_bytes());
        b[32] = 1;
        b[34..36].copy_from_slice(&4u16.to_le_bytes());
        b[48..52].copy_from_slice(&99u32.to_le_bytes());
        let c = BlkConfig::parse(&b);
        assert_eq!(
            (c.capacity, c.seg_max, c.blk_size, c.writeback),
            (2048, 126, 512, 1)
        );
        assert_eq!((c.num_queues, c.max_write_zeroes_sectors), (4, 99));
    }

    #[test]
    fn header_is_type_then_ioprio_then_sector() {
        let h = header(VIRTIO_BLK_T_OUT, 0x0102030405060708);
        assert_eq!(&h[0..4], &[1, 0, 0, 0]);
        assert_eq!(&h[4..8], &[0; 4]);
        assert_eq!(h[8], 8);
    }
}
