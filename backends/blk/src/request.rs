//! Parsing a validated descriptor chain into a block request.
//!
//! The header (`virtio_blk_outhdr`) and any discard/write-zeroes segments are
//! copied out of guest memory exactly once, here; device logic acts only on
//! the returned [`Request`].

use bulkhead_common::DescriptorChain;
use bulkhead_common::spec::blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{ByteValued, GuestAddress};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = VIRTIO_BLK_SECTOR_SIZE;
/// Bytes of a GET_ID reply.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES;
/// Most discard / write-zeroes segments in one request.
pub const MAX_SEGMENTS: u32 = 16;

/// `virtio_blk_outhdr`, as the guest lays it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OutHdr {
    /// `VIRTIO_BLK_T_*`.
    pub type_: u32,
    /// Ignored.
    pub ioprio: u32,
    /// First sector.
    pub sector: u64,
}
// SAFETY: plain old data.
unsafe impl ByteValued for OutHdr {}

/// `virtio_blk_discard_write_zeroes` segment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RawSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap.
    pub flags: u32,
}
// SAFETY: plain old data.
unsafe impl ByteValued for RawSegment {}

/// A byte range of the disk, checked against its capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

/// What the guest asked for, validated.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `range` into the writable data buffers.
    Read(Range),
    /// Write `range` from the readable data buffers.
    Write(Range),
    /// Flush the write cache.
    Flush,
    /// Return the device id string.
    GetId,
    /// Deallocate these ranges.
    Discard(Vec<Range>),
    /// Zero these ranges; `true` when the range may be unmapped.
    WriteZeroes(Vec<(Range, bool)>),
    /// Fails at once with this status (bad range, read-only, unsupported).
    Fail(u8),
}

/// A parsed request: its kind and where its status byte goes.
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// Guest address of the status byte (last writable byte of the chain).
    pub status: GuestAddress,
}

/// Why a chain is not a block request at all (a guest error, completed with length 0).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer than 16 readable bytes for the header; the status byte is at the address given.
    #[error("chain too short for the request header")]
    NoHeader(GuestAddress),
    /// No writable byte for the status.
    #[error("chain has no writable status byte")]
    NoStatus,
}

/// Disk properties the parser checks requests against.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Capacity in bytes (a multiple of 512).
    pub capacity: u64,
    /// Writes, discards and write-zeroes fail.
    pub readonly: bool,
    /// Largest discard / write-zeroes segment, in sectors.
    pub max_zero_sectors: u32,
}

fn range(g: &Geometry, sector: u64, len: u64) -> Option<Range> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= g.capacity).then_some(Range { offset, len })
}

/// Address of the last writable byte of the chain.
fn status_addr(chain: &DescriptorChain) -> Option<GuestAddress> {
    let d = chain
        .descriptors()
        .iter()
        .rev()
        .find(|d| d.writable && d.len > 0)?;
    Some(GuestAddress(d.addr.0 + u64::from(d.len) - 1))
}

impl Request {
    /// Parses `chain` against the disk geometry `g`.
    pub fn parse(chain: &DescriptorChain, g: &Geometry) -> Result<Request, ParseError> {
        let status = status_addr(chain).ok_or(ParseError::NoStatus)?;
        let mut reader = chain.reader();
        let hdr: OutHdr = reader
            .read_obj()
            .map_err(|_| ParseError::NoHeader(status))?;
        // Data bytes: readable after the header, writable before the status.
        let data_in = chain.writable_len() - 1;
        let data_out = reader.available();
        let kind = match hdr.type_ {
            VIRTIO_BLK_T_IN => match sectors(data_in).and_then(|_| range(g, hdr.sector, data_in)) {
                Some(r) => RequestKind::Read(r),
                None => RequestKind::Fail(VIRTIO_BLK_S_IOERR),
            },
            VIRTIO_BLK_T_OUT if g.readonly => RequestKind::Fail(VIRTIO_BLK_S_IOERR),
            VIRTIO_BLK_T_OUT => {
                match sectors(data_out).and_then(|_| range(g, hdr.sector, data_out)) {
                    Some(r) => RequestKind::Write(r),
                    None => RequestKind::Fail(VIRTIO_BLK_S_IOERR),
                }
            }
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                parse_segments(&mut reader, hdr.type_, g)
            }
            _ => RequestKind::Fail(VIRTIO_BLK_S_UNSUPP),
        };
        Ok(Request { kind, status })
    }
}

/// Some(()) when `len` is a whole number of sectors.
fn sectors(len: u64) -> Option<()> {
    len.is_multiple_of(SECTOR_SIZE).then_some(())
}

fn parse_segments(
    reader: &mut bulkhead_common::Reader<'_>,
    type_: u32,
    g: &Geometry,
) -> RequestKind {
    if g.readonly {
        return RequestKind::Fail(VIRTIO_BLK_S_IOERR);
    }
    let seg_size = std::mem::size_of::<RawSegment>() as u64;
    let n = reader.available() / seg_size;
    if n == 0 || !reader.available().is_multiple_of(seg_size) || n > u64::from(MAX_SEGMENTS) {
        return RequestKind::Fail(VIRTIO_BLK_S_UNSUPP);
    }
    let mut segs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let Ok(s) = reader.read_obj::<RawSegment>() else {
            return RequestKind::Fail(VIRTIO_BLK_S_IOERR);
        };
        let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // Discard takes no flags; write-zeroes only "unmap".
        if s.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
            || (type_ == VIRTIO_BLK_T_DISCARD && unmap)
        {
            return RequestKind::Fail(VIRTIO_BLK_S_UNSUPP);
        }
        if s.num_sectors > g.max_zero_sectors {
            return RequestKind::Fail(VIRTIO_BLK_S_IOERR);
        }
        match range(g, s.sector, u64::from(s.num_sectors) * SECTOR_SIZE) {
            Some(r) => segs.push((r, unmap)),
            None => return RequestKind::Fail(VIRTIO_BLK_S_IOERR),
        }
    }
    if type_ == VIRTIO_BLK_T_DISCARD {
        RequestKind::Discard(segs.into_iter().map(|(r, _)| r).collect())
    } else {
        RequestKind::WriteZeroes(segs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::chain::{ChainLimits, RawDescriptor};
    use bulkhead_common::memory::{MemoryTable, RegionDesc};
    use bulkhead_common::spec::ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use std::sync::Arc;
    use vm_memory::Bytes;

    const GEO: Geometry = Geometry {
        capacity: 1 << 20,
        readonly: false,
        max_zero_sectors: 1 << 16,
    };

    fn mem() -> Arc<vm_memory::GuestMemoryMmap> {
        // SAFETY: memfd_create with a static name.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: fresh owned fd.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(0x10000).unwrap();
        let d = RegionDesc {
            guest_phys_addr: 0,
            size: 0x10000,
            user_addr: 0x1000_0000,
            mmap_offset: 0,
        };
        Arc::new(
            MemoryTable::new(&[d], vec![f])
                .unwrap()
                .guest_memory()
                .unwrap(),
        )
    }

    /// Builds a chain: header at 0x2000, `data` buffers, status at 0x9000.
    fn chain(hdr: OutHdr, data: &[(u64, u32, bool)], extra: &[u8]) -> DescriptorChain {
        let m = mem();
        m.write_obj(hdr, GuestAddress(0x2000)).unwrap();
        m.write_slice(extra, GuestAddress(0x2010)).unwrap();
        let mut descs = vec![(0x2000u64, 16 + extra.len() as u32, false)];
        descs.extend_from_slice(data);
        descs.push((0x9000, 1, true));
        for (i, (a, l, w)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let d = RawDescriptor {
                addr: *a,
                len: *l,
                flags: if *w { VRING_DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { VRING_DESC_F_NEXT },
                next: i as u16 + 1,
            };
            m.write_obj(d, GuestAddress(0x1000 + 16 * i as u64))
                .unwrap();
        }
        let limits = ChainLimits {
            queue_size: 16,
            indirect: false,
            max_total_len: 1 << 20,
        };
        DescriptorChain::read(m, GuestAddress(0x1000), 0, limits).unwrap()
    }

    fn hdr(type_: u32, sector: u64) -> OutHdr {
        OutHdr {
            type_,
            ioprio: 0,
            sector,
        }
    }

    #[test]
    fn read_and_write_ranges_are_checked_against_capacity() {
        let c = chain(hdr(VIRTIO_BLK_T_IN, 2), &[(0x3000, 1024, true)], &[]);
        let r = Request::parse(&c, &GEO).unwrap();
        assert_eq!(
            r.kind,
            RequestKind::Read(Range {
                offset: 1024,
                len: 1024
            })
        );
        assert_eq!(r.status, GuestAddress(0x9000));

        let last = (1 << 20) / 512 - 1;
        let c = chain(hdr(VIRTIO_BLK_T_OUT, last), &[(0x3000, 1024, false)], &[]);
        assert_eq!(Request::parse(&c, &GEO).unwrap().kind, RequestKind::Fail(1));

        let c = chain(
            hdr(VIRTIO_BLK_T_IN, u64::MAX / 256),
            &[(0x3000, 512, true)],
            &[],
        );
        assert_eq!(Request::parse(&c, &GEO).unwrap().kind, RequestKind::Fail(1));

        let c = chain(hdr(VIRTIO_BLK_T_IN, 0), &[(0x3000, 100, true)], &[]);
        assert_eq!(Request::parse(&c, &GEO).unwrap().kind, RequestKind::Fail(1));
    }

    #[test]
    fn readonly_refuses_writes_and_unknown_types_are_unsupported() {
        let ro = Geometry {
            readonly: true,
            ..GEO
        };
        let c = chain(hdr(VIRTIO_BLK_T_OUT, 0), &[(0x3000, 512, false)], &[]);
        assert_eq!(Request::parse(&c, &ro).unwrap().kind, RequestKind::Fail(1));
        let c = chain(hdr(99, 0), &[], &[]);
        assert_eq!(Request::parse(&c, &GEO).unwrap().kind, RequestKind::Fail(2));
        let c = chain(hdr(VIRTIO_BLK_T_FLUSH, 0), &[], &[]);
        assert_eq!(Request::parse(&c, &ro).unwrap().kind, RequestKind::Flush);
    }

    #[test]
    fn segments_are_parsed_and_flags_checked() {
        let seg = RawSegment {
            sector: 8,
            num_sectors: 8,
            flags: 1,
        };
        let c = chain(hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0), &[], seg.as_slice());
        assert_eq!(
            Request::parse(&c, &GEO).unwrap().kind,
            RequestKind::WriteZeroes(vec![(
                Range {
                    offset: 4096,
                    len: 4096
                },
                true
            )])
        );
        let c = chain(hdr(VIRTIO_BLK_T_DISCARD, 0), &[], seg.as_slice());
        assert_eq!(Request::parse(&c, &GEO).unwrap().kind, RequestKind::Fail(2));
        let c = chain(hdr(VIRTIO_BLK_T_DISCARD, 0), &[], &[0u8; 10]);
        assert_eq!(Request::parse(&c, &GEO).unwrap().kind, RequestKind::Fail(2));
    }

    #[test]
    fn chain_without_status_or_header_is_a_guest_error() {
        let m = mem();
        let d = RawDescriptor {
            addr: 0x2000,
            len: 16,
            flags: 0,
            next: 0,
        };
        m.write_obj(d, GuestAddress(0x1000)).unwrap();
        let limits = ChainLimits {
            queue_size: 4,
            indirect: false,
            max_total_len: 1 << 20,
        };
        let c = DescriptorChain::read(m.clone(), GuestAddress(0x1000), 0, limits).unwrap();
        assert_eq!(Request::parse(&c, &GEO).unwrap_err(), ParseError::NoStatus);
        let d = RawDescriptor {
            addr: 0x2000,
            len: 8,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        };
        m.write_obj(d, GuestAddress(0x1000)).unwrap();
        let c = DescriptorChain::read(m, GuestAddress(0x1000), 0, limits).unwrap();
        assert_eq!(
            Request::parse(&c, &GEO).unwrap_err(),
            ParseError::NoHeader(GuestAddress(0x2007))
        );
    }
}
