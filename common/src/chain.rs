//! Validated descriptor-chain snapshots and the Reader/Writer over them.
//!
//! [`DescriptorChain::read`] walks a whole chain once, copying each
//! descriptor out of guest memory into a local value, and checks it before any
//! device code runs: every buffer lies inside guest memory with no overflow,
//! readable buffers come before writable ones, the chain is no longer than the
//! queue, an indirect table is well formed and never nested, and the total
//! length is capped. Device code then sees only that snapshot; the guest can
//! rewrite its descriptor table afterwards without effect. A packed ring's
//! chain ([`DescriptorChain::from_packed`]) goes through the same checks,
//! from the ring descriptors the queue copied.

use std::io;

use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};

use crate::memory::{GuestMemorySnapshot, read_guest_obj, region_slice};
use crate::spec::ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// Size of one descriptor in a table.
pub const DESC_SIZE: u64 = 16;

/// A descriptor exactly as the guest laid it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// Index of the next descriptor when `NEXT` is set.
    pub next: u16,
}

// SAFETY: plain old data, every bit pattern valid.
unsafe impl ByteValued for RawDescriptor {}

/// A packed-ring descriptor (virtio spec 2.8.13) exactly as the guest laid it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDescriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer (in a used descriptor: bytes written).
    pub len: u32,
    /// Buffer id (taken from the chain's last descriptor).
    pub id: u16,
    /// `VRING_DESC_F_*` and the avail/used bits.
    pub flags: u16,
}

// SAFETY: plain old data, every bit pattern valid.
unsafe impl ByteValued for PackedDescriptor {}

/// One validated buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address; `addr + len` lies inside guest memory.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// True when the device writes it.
    pub writable: bool,
}

/// Descriptors kept in the chain itself; longer chains spill to the heap.
const INLINE_DESCS: usize = 4;

/// A chain's descriptors: up to [`INLINE_DESCS`] without an allocation (a
/// network frame or a block request), more on the heap.
#[derive(Clone)]
struct DescList {
    inline: [Descriptor; INLINE_DESCS],
    len: usize,
    heap: Vec<Descriptor>,
}

impl DescList {
    const EMPTY: Descriptor = Descriptor {
        addr: GuestAddress(0),
        len: 0,
        writable: false,
    };

    fn new() -> Self {
        DescList {
            inline: [Self::EMPTY; INLINE_DESCS],
            len: 0,
            heap: Vec::new(),
        }
    }

    fn push(&mut self, d: Descriptor) {
        if self.len < INLINE_DESCS {
            self.inline[self.len] = d;
        } else {
            if self.len == INLINE_DESCS {
                self.heap.reserve(2 * INLINE_DESCS);
                self.heap.extend_from_slice(&self.inline);
            }
            self.heap.push(d);
        }
        self.len += 1;
    }

    fn as_slice(&self) -> &[Descriptor] {
        if self.len <= INLINE_DESCS {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }
}

/// Why a chain was refused. Every variant is a guest error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A buffer does not lie inside guest memory.
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    BufferOutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The descriptor table or an entry of it is outside guest memory.
    #[error("descriptor {0} cannot be read from guest memory")]
    DescriptorUnreadable(u16),
    /// An indirect descriptor inside an indirect table.
    #[error("nested indirect table")]
    NestedIndirect,
    /// An indirect descriptor though INDIRECT_DESC was not negotiated.
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// An indirect descriptor that is not the head of the chain, or also has NEXT.
    #[error("indirect descriptor inside a chain")]
    IndirectNotHead,
    /// An indirect table whose length is zero or not a multiple of 16.
    #[error("indirect table of {0} bytes")]
    BadIndirectLength(u32),
    /// `next` points past the table.
    #[error("descriptor index {0} beyond the table")]
    IndexOutOfRange(u16),
    /// More descriptors than the queue holds (a loop, or a runaway chain).
    #[error("chain longer than {0} descriptors")]
    TooLong(u32),
    /// A readable buffer after a writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// The buffers add up to more than the device accepts.
    #[error("chain carries more than {0} bytes")]
    TooManyBytes(u64),
}

/// Limits a chain must respect.
#[derive(Clone, Copy, Debug)]
pub struct ChainLimits {
    /// Queue size: bound on the number of descriptors, and on direct indexes.
    pub queue_size: u16,
    /// Whether VIRTIO_F_INDIRECT_DESC was negotiated.
    pub indirect: bool,
    /// Most bytes all buffers of one chain may add up to.
    pub max_total_len: u64,
}

/// A validated snapshot of one descriptor chain.
#[derive(Clone)]
pub struct DescriptorChain {
    head: u16,
    descs: DescList,
    readable_len: u64,
    writable_len: u64,
    mem: GuestMemorySnapshot,
}

impl std::fmt::Debug for DescriptorChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DescriptorChain")
            .field("head", &self.head)
            .field("descs", &self.descs.as_slice())
            .finish()
    }
}

impl DescriptorChain {
    /// Reads and validates the chain starting at `head` of the table at `table`.
    pub fn read(
        mem: GuestMemorySnapshot,
        table: GuestAddress,
        head: u16,
        limits: ChainLimits,
    ) -> Result<Self, ChainError> {
        Self::read_bounded(mem, table, head, limits, limits.queue_size)
    }

    /// Like [`DescriptorChain::read`], but a chain (through an indirect table)
    /// may have up to `max(queue_size, max_descriptors)` descriptors: a device
    /// whose `seg_max` follows its largest queue size accepts chains that long
    /// even when the frontend chose a smaller queue.
    pub fn read_bounded(
        mem: GuestMemorySnapshot,
        table: GuestAddress,
        head: u16,
        limits: ChainLimits,
        max_descriptors: u16,
    ) -> Result<Self, ChainError> {
        let max_descs = u32::from(limits.queue_size.max(max_descriptors).max(1));
        let mut chain = Builder::new(limits.max_total_len);
        let mut table_addr = table;
        let mut table_len = u32::from(limits.queue_size);
        let mut index = head;
        let mut in_indirect = false;
        let mut count = 0u32;

        loop {
            if u32::from(index) >= table_len {
                return Err(ChainError::IndexOutOfRange(index));
            }
            count += 1;
            if count > max_descs {
                return Err(ChainError::TooLong(max_descs));
            }
            let raw: RawDescriptor = table_addr
                .checked_add(u64::from(index) * DESC_SIZE)
                .and_then(|a| read_guest_obj(&mem, a))
                .ok_or(ChainError::DescriptorUnreadable(index))?;

            if raw.flags & VRING_DESC_F_INDIRECT != 0 {
                if in_indirect {
                    return Err(ChainError::NestedIndirect);
                }
                let entries = check_indirect(
                    &mem,
                    limits,
                    max_descs,
                    chain.descs.len != 0 || raw.flags & VRING_DESC_F_NEXT != 0,
                    raw.addr,
                    raw.len,
                )?;
                table_addr = GuestAddress(raw.addr);
                table_len = entries;
                in_indirect = true;
                index = 0;
                // The indirect descriptor itself does not count toward the chain.
                count = 0;
                continue;
            }

            chain.push(&mem, raw.addr, raw.len, raw.flags & VRING_DESC_F_WRITE != 0)?;
            if raw.flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            index = raw.next;
        }
        Ok(chain.finish(head, mem))
    }

    /// Validates a packed-ring chain (virtio spec 2.8) whose ring descriptors
    /// the queue already copied out of guest memory, in ring order (`ring`:
    /// the chain's descriptors, the last without NEXT): the same checks as
    /// for a split chain. An indirect descriptor must be the chain's only
    /// one; its table is read here, each entry once, in table order (packed
    /// tables have no `next`).
    pub fn from_packed(
        mem: GuestMemorySnapshot,
        id: u16,
        ring: &[PackedDescriptor],
        limits: ChainLimits,
        max_descriptors: u16,
    ) -> Result<Self, ChainError> {
        let max_descs = u32::from(limits.queue_size.max(max_descriptors).max(1));
        let mut chain = Builder::new(limits.max_total_len);
        if ring.len() > max_descs as usize {
            return Err(ChainError::TooLong(max_descs));
        }
        for raw in ring {
            if raw.flags & VRING_DESC_F_INDIRECT == 0 {
                chain.push(&mem, raw.addr, raw.len, raw.flags & VRING_DESC_F_WRITE != 0)?;
                continue;
            }
            let entries =
                check_indirect(&mem, limits, max_descs, ring.len() != 1, raw.addr, raw.len)?;
            for i in 0..entries {
                let entry: PackedDescriptor = GuestAddress(raw.addr)
                    .checked_add(u64::from(i) * DESC_SIZE)
                    .and_then(|a| read_guest_obj(&mem, a))
                    .ok_or(ChainError::DescriptorUnreadable(i as u16))?;
                if entry.flags & VRING_DESC_F_INDIRECT != 0 {
                    return Err(ChainError::NestedIndirect);
                }
                chain.push(
                    &mem,
                    entry.addr,
                    entry.len,
                    entry.flags & VRING_DESC_F_WRITE != 0,
                )?;
            }
        }
        Ok(chain.finish(id, mem))
    }

    /// Index of the head descriptor (a packed ring: the buffer id): what
    /// the completion names.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The validated buffers, in chain order.
    pub fn descriptors(&self) -> &[Descriptor] {
        self.descs.as_slice()
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// The memory map the chain was validated against (kept alive with it).
    pub fn memory(&self) -> &GuestMemorySnapshot {
        &self.mem
    }

    /// The readable buffers and the writable ones (validated: no readable after a writable).
    fn split(&self) -> (&[Descriptor], &[Descriptor]) {
        let descs = self.descs.as_slice();
        descs.split_at(descs.iter().take_while(|d| !d.writable).count())
    }

    /// A reader over the readable buffers.
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            mem: &self.mem,
            bufs: Cursor::new(self.split().0),
        }
    }

    /// A writer over the writable buffers.
    pub fn writer(&self) -> Writer<'_> {
        Writer {
            mem: &self.mem,
            bufs: Cursor::new(self.split().1),
            written: 0,
        }
    }
}

/// Checks an indirect descriptor (`not_alone`: it has NEXT, or is not the
/// chain's first) and its table; returns the table's entry count.
fn check_indirect(
    mem: &GuestMemoryMmap,
    limits: ChainLimits,
    max_descs: u32,
    not_alone: bool,
    addr: u64,
    len: u32,
) -> Result<u32, ChainError> {
    if !limits.indirect {
        return Err(ChainError::IndirectNotNegotiated);
    }
    if not_alone {
        return Err(ChainError::IndirectNotHead);
    }
    if len == 0 || u64::from(len) % DESC_SIZE != 0 {
        return Err(ChainError::BadIndirectLength(len));
    }
    let entries = u64::from(len) / DESC_SIZE;
    if entries > u64::from(max_descs) {
        return Err(ChainError::TooLong(max_descs));
    }
    check_range(mem, addr, len)?;
    Ok(entries as u32)
}

/// A chain being validated, one buffer at a time (split and packed alike).
struct Builder {
    descs: DescList,
    readable_len: u64,
    writable_len: u64,
    seen_writable: bool,
    max_total_len: u64,
}

impl Builder {
    fn new(max_total_len: u64) -> Self {
        Builder {
            descs: DescList::new(),
            readable_len: 0,
            writable_len: 0,
            seen_writable: false,
            max_total_len,
        }
    }

    /// Checks one buffer and appends it.
    #[inline]
    fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> Result<(), ChainError> {
        // A flag, not a scan of `descs`: a scan made a long chain quadratic.
        if !writable && self.seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        self.seen_writable |= writable;
        check_range(mem, addr, len)?;
        let total = self.readable_len + self.writable_len + u64::from(len);
        if total > self.max_total_len {
            return Err(ChainError::TooManyBytes(self.max_total_len));
        }
        if writable {
            self.writable_len += u64::from(len);
        } else {
            self.readable_len += u64::from(len);
        }
        self.descs.push(Descriptor {
            addr: GuestAddress(addr),
            len,
            writable,
        });
        Ok(())
    }

    fn finish(self, head: u16, mem: GuestMemorySnapshot) -> DescriptorChain {
        DescriptorChain {
            head,
            descs: self.descs,
            readable_len: self.readable_len,
            writable_len: self.writable_len,
            mem,
        }
    }
}

fn check_range(mem: &GuestMemoryMmap, addr: u64, len: u32) -> Result<(), ChainError> {
    let bad = ChainError::BufferOutsideMemory { addr, len };
    if addr.checked_add(u64::from(len)).is_none() {
        return Err(bad);
    }
    if len == 0 {
        // An empty buffer touches no memory, but its address must still be sane.
        return if mem.address_in_range(GuestAddress(addr)) {
            Ok(())
        } else {
            Err(bad)
        };
    }
    // Most buffers lie inside one region: one lookup, no slice iterator.
    if region_slice(mem, GuestAddress(addr), len as usize).is_some()
        || mem.check_range(GuestAddress(addr), len as usize)
    {
        Ok(())
    } else {
        Err(bad)
    }
}

/// Position inside a list of buffers, consumed from the front and optionally
/// shortened at the back.
#[derive(Clone, Debug)]
struct Cursor<'a> {
    descs: &'a [Descriptor],
    /// Bytes already consumed of `descs[0]`.
    offset: u32,
    /// Bytes not yet consumed, up to the cut-off tail: kept, not summed on
    /// each call (that made reading a long chain quadratic).
    remaining: u64,
}

impl<'a> Cursor<'a> {
    fn new(descs: &'a [Descriptor]) -> Self {
        Cursor {
            descs,
            offset: 0,
            remaining: descs.iter().map(|d| u64::from(d.len)).sum(),
        }
    }

    fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Next contiguous piece of at most `max` bytes, advancing past it.
    fn next_piece(&mut self, max: u64) -> Option<(GuestAddress, usize)> {
        loop {
            let remaining = self.remaining();
            let first = self.descs.first()?;
            if remaining == 0 {
                return None;
            }
            let avail_in_first = u64::from(first.len - self.offset).min(remaining);
            if avail_in_first == 0 {
                self.descs = &self.descs[1..];
                self.offset = 0;
                continue;
            }
            let n = avail_in_first.min(max);
            let addr = first.addr.unchecked_add(u64::from(self.offset));
            self.offset += n as u32;
            self.remaining -= n;
            if self.offset == first.len {
                self.descs = &self.descs[1..];
                self.offset = 0;
            }
            return Some((addr, n as usize));
        }
    }

    /// Splits off the last `n` bytes into their own cursor.
    fn split_tail(&mut self, n: u64) -> Option<Cursor<'a>> {
        if n > self.remaining() {
            return None;
        }
        let mut tail = self.clone();
        let skip = self.remaining() - n;
        tail.advance(skip);
        self.remaining -= n;
        Some(tail)
    }

    fn advance(&mut self, mut n: u64) {
        while n > 0 {
            match self.next_piece(n) {
                Some((_, len)) => n -= len as u64,
                None => break,
            }
        }
    }
}

/// Error of a Reader or Writer: the chain has fewer bytes than needed.
fn short() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "descriptor chain too short")
}

/// Host I/O vectors for a byte range of guest buffers.
pub type IoVecs = Vec<libc::iovec>;

/// An [`IoVecs`] kept by a worker between requests, so its hot path does
/// not allocate.
#[derive(Default)]
pub struct IoVecBuf(IoVecs);

// SAFETY: the pointers are only handed to the system call each batch is
// built for, on the thread holding the buffer; `start` empties the buffer
// before it is filled again, so no pointer outlives its request.
unsafe impl Send for IoVecBuf {}

impl IoVecBuf {
    /// The emptied vector, ready for one request's iovecs.
    pub fn start(&mut self) -> &mut IoVecs {
        self.0.clear();
        &mut self.0
    }

    /// The iovecs pushed since the last [`IoVecBuf::start`].
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.0
    }
}

fn host_iovecs(
    mem: &GuestMemoryMmap,
    cursor: &mut Cursor<'_>,
    mut len: u64,
    out: &mut IoVecs,
) -> io::Result<()> {
    while len > 0 {
        let (addr, n) = cursor.next_piece(len).ok_or_else(short)?;
        len -= n as u64;
        if let Some(slice) = region_slice(mem, addr, n) {
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            continue;
        }
        // A validated buffer may still span two adjacent regions: split it.
        for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
            let slice: VolatileSlice<_> = slice.map_err(|e| io::Error::other(e.to_string()))?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// Reads the readable part of a chain as one byte stream.
pub struct Reader<'a> {
    mem: &'a GuestMemoryMmap,
    bufs: Cursor<'a>,
}

impl Reader<'_> {
    /// Bytes not yet read.
    pub fn available(&self) -> u64 {
        self.bufs.remaining()
    }

    /// Copies exactly `buf.len()` bytes out of guest memory.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if (buf.len() as u64) > self.available() {
            return Err(short());
        }
        let mut done = 0;
        while done < buf.len() {
            let (addr, n) = self
                .bufs
                .next_piece((buf.len() - done) as u64)
                .ok_or_else(short)?;
            let dst = &mut buf[done..done + n];
            match region_slice(self.mem, addr, n) {
                Some(slice) => slice.copy_to(dst),
                None => self
                    .mem
                    .read_slice(dst, addr)
                    .map(|()| n)
                    .map_err(|e| io::Error::other(e.to_string()))?,
            };
            done += n;
        }
        Ok(())
    }

    /// Copies one value (a request header, say) out of guest memory, once.
    pub fn read_obj<T: ByteValued + Default>(&mut self) -> io::Result<T> {
        let mut v = T::default();
        self.read_exact(v.as_mut_slice())?;
        Ok(v)
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: u64) -> io::Result<()> {
        if n > self.available() {
            return Err(short());
        }
        self.bufs.advance(n);
        Ok(())
    }

    /// Host iovecs for the next `len` bytes (zero-copy I/O), consuming them.
    pub fn iovecs(&mut self, len: u64) -> io::Result<IoVecs> {
        let mut out = Vec::new();
        self.iovecs_into(len, &mut out)?;
        Ok(out)
    }

    /// Like [`Reader::iovecs`], appending to `out` (a vector kept between
    /// requests, so the hot path allocates nothing).
    pub fn iovecs_into(&mut self, len: u64, out: &mut IoVecs) -> io::Result<()> {
        if len > self.available() {
            return Err(short());
        }
        host_iovecs(self.mem, &mut self.bufs, len, out)
    }
}

/// Writes the writable part of a chain as one byte stream.
pub struct Writer<'a> {
    mem: &'a GuestMemoryMmap,
    bufs: Cursor<'a>,
    written: u64,
}

impl<'a> Writer<'a> {
    /// Room left.
    pub fn available(&self) -> u64 {
        self.bufs.remaining()
    }

    /// Bytes written so far through this writer.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Copies all of `buf` into guest memory.
    pub fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if (buf.len() as u64) > self.available() {
            return Err(short());
        }
        let mut done = 0;
        while done < buf.len() {
            let (addr, n) = self
                .bufs
                .next_piece((buf.len() - done) as u64)
                .ok_or_else(short)?;
            let src = &buf[done..done + n];
            match region_slice(self.mem, addr, n) {
                Some(slice) => slice.copy_from(src),
                None => self
                    .mem
                    .write_slice(src, addr)
                    .map_err(|e| io::Error::other(e.to_string()))?,
            }
            done += n;
        }
        self.written += buf.len() as u64;
        Ok(())
    }

    /// Writes one value.
    pub fn write_obj<T: ByteValued>(&mut self, v: T) -> io::Result<()> {
        self.write_all(v.as_slice())
    }

    /// Carves the last `n` bytes off into their own writer (a status byte, say).
    pub fn split_tail(&mut self, n: u64) -> io::Result<Writer<'a>> {
        let tail = self.bufs.split_tail(n).ok_or_else(short)?;
        Ok(Writer {
            mem: self.mem,
            bufs: tail,
            written: 0,
        })
    }

    /// Skips `n` bytes (written later through another writer), counted as written.
    pub fn skip(&mut self, n: u64) -> io::Result<()> {
        if n > self.available() {
            return Err(short());
        }
        self.bufs.advance(n);
        self.written += n;
        Ok(())
    }

    /// [`Writer::iovecs`] appended to a vector the caller keeps.
    pub fn iovecs_into(&mut self, len: u64, out: &mut IoVecs) -> io::Result<()> {
        if len > self.available() {
            return Err(short());
        }
        host_iovecs(self.mem, &mut self.bufs, len, out)?;
        self.written += len;
        Ok(())
    }

    /// Host iovecs for the next `len` bytes (zero-copy I/O), counted as written.
    pub fn iovecs(&mut self, len: u64) -> io::Result<IoVecs> {
        if len > self.available() {
            return Err(short());
        }
        let mut v = Vec::new();
        host_iovecs(self.mem, &mut self.bufs, len, &mut v)?;
        self.written += len;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::single_region;
    use std::sync::Arc;

    const TABLE: u64 = 0x1000;

    fn put(mem: &GuestMemoryMmap, table: u64, i: u16, d: RawDescriptor) {
        mem.write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    fn limits() -> ChainLimits {
        ChainLimits {
            queue_size: 8,
            indirect: true,
            max_total_len: 1 << 20,
        }
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor {
            addr,
            len,
            flags,
            next,
        }
    }

    #[test]
    fn reads_a_direct_chain_and_splits_readable_from_writable() {
        let mem = Arc::new(single_region(0x10000));
        put(&mem, TABLE, 0, d(0x2000, 16, VRING_DESC_F_NEXT, 3));
        put(
            &mem,
            TABLE,
            3,
            d(0x3000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 5),
        );
        put(&mem, TABLE, 5, d(0x4000, 1, VRING_DESC_F_WRITE, 0));
        mem.write_slice(&[7u8; 16], GuestAddress(0x2000)).unwrap();
        let c = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits()).unwrap();
        assert_eq!(c.descriptors().len(), 3);
        assert_eq!((c.readable_len(), c.writable_len()), (16, 513));
        let mut hdr = [0u8; 16];
        c.reader().read_exact(&mut hdr).unwrap();
        assert_eq!(hdr, [7u8; 16]);
        let mut w = c.writer();
        let mut status = w.split_tail(1).unwrap();
        assert_eq!(w.available(), 512);
        status.write_obj(1u8).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(), 1);
        assert_eq!(w.iovecs(512).unwrap().len(), 1);
    }

    #[test]
    fn snapshot_is_immune_to_later_rewrites() {
        let mem = Arc::new(single_region(0x10000));
        put(&mem, TABLE, 0, d(0x2000, 16, 0, 0));
        let c = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits()).unwrap();
        put(
            &mem,
            TABLE,
            0,
            d(0xdead_0000, 0xffff, VRING_DESC_F_WRITE, 0),
        );
        assert_eq!(c.descriptors()[0].addr, GuestAddress(0x2000));
        assert_eq!(c.readable_len(), 16);
    }

    #[test]
    fn refuses_loops_out_of_range_and_bad_order() {
        let mem = Arc::new(single_region(0x10000));
        put(&mem, TABLE, 0, d(0x2000, 16, VRING_DESC_F_NEXT, 1));
        put(&mem, TABLE, 1, d(0x2000, 16, VRING_DESC_F_NEXT, 0));
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits());
        assert_eq!(e.unwrap_err(), ChainError::TooLong(8));

        put(&mem, TABLE, 0, d(0x2000, 16, VRING_DESC_F_NEXT, 9));
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits());
        assert_eq!(e.unwrap_err(), ChainError::IndexOutOfRange(9));

        put(
            &mem,
            TABLE,
            0,
            d(0x2000, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
        );
        put(&mem, TABLE, 1, d(0x2000, 16, 0, 0));
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits());
        assert_eq!(e.unwrap_err(), ChainError::ReadableAfterWritable);

        put(&mem, TABLE, 0, d(0xfff0, 0x20, 0, 0));
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits());
        assert!(matches!(e, Err(ChainError::BufferOutsideMemory { .. })));

        put(&mem, TABLE, 0, d(u64::MAX - 4, 16, 0, 0));
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits());
        assert!(matches!(e, Err(ChainError::BufferOutsideMemory { .. })));
    }

    #[test]
    fn follows_indirect_tables_but_never_nested_ones() {
        let mem = Arc::new(single_region(0x10000));
        let ind = 0x5000;
        put(&mem, TABLE, 2, d(ind, 32, VRING_DESC_F_INDIRECT, 0));
        put(&mem, ind, 0, d(0x2000, 16, VRING_DESC_F_NEXT, 1));
        put(&mem, ind, 1, d(0x3000, 1, VRING_DESC_F_WRITE, 0));
        let c = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 2, limits()).unwrap();
        assert_eq!(c.head(), 2);
        assert_eq!((c.readable_len(), c.writable_len()), (16, 1));

        put(&mem, ind, 1, d(0x6000, 16, VRING_DESC_F_INDIRECT, 0));
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 2, limits());
        assert_eq!(e.unwrap_err(), ChainError::NestedIndirect);

        put(&mem, TABLE, 2, d(ind, 24, VRING_DESC_F_INDIRECT, 0));
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 2, limits());
        assert_eq!(e.unwrap_err(), ChainError::BadIndirectLength(24));

        put(&mem, TABLE, 2, d(ind, 32, VRING_DESC_F_INDIRECT, 0));
        let no_ind = ChainLimits {
            indirect: false,
            ..limits()
        };
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 2, no_ind);
        assert_eq!(e.unwrap_err(), ChainError::IndirectNotNegotiated);
    }

    #[test]
    fn readable_after_an_empty_writable_descriptor_is_refused() {
        let mem = Arc::new(single_region(0x10000));
        put(
            &mem,
            TABLE,
            0,
            d(0x2000, 0, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
        );
        put(&mem, TABLE, 1, d(0x2000, 16, 0, 0));
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits());
        assert_eq!(e.unwrap_err(), ChainError::ReadableAfterWritable);
    }

    #[test]
    fn descriptor_list_keeps_order_inline_and_after_spilling() {
        for n in [
            0usize,
            1,
            INLINE_DESCS,
            INLINE_DESCS + 1,
            3 * INLINE_DESCS + 2,
        ] {
            let mut l = DescList::new();
            let want: Vec<Descriptor> = (0..n)
                .map(|i| Descriptor {
                    addr: GuestAddress(0x1000 * i as u64),
                    len: i as u32,
                    writable: i % 2 == 1,
                })
                .collect();
            for &d in &want {
                l.push(d);
            }
            assert_eq!(l.as_slice(), &want[..], "{n} descriptors");
            assert_eq!(l.heap.is_empty(), n <= INLINE_DESCS, "{n} descriptors");
        }
    }

    #[test]
    fn longest_chain_is_walked_in_linear_time() {
        // Found by the `chain` fuzz target: a 65535-descriptor loop of readable
        // buffers took seconds when each step scanned the chain so far.
        let mem = Arc::new(single_region(0x200000));
        for i in 0..u16::MAX {
            put(
                &mem,
                0x10000,
                i,
                d(0x2000, 1, VRING_DESC_F_NEXT, (i + 1) % u16::MAX),
            );
        }
        let big = ChainLimits {
            queue_size: u16::MAX,
            ..limits()
        };
        let start = std::time::Instant::now();
        let e = DescriptorChain::read(mem.clone(), GuestAddress(0x10000), 0, big);
        assert_eq!(e.unwrap_err(), ChainError::TooLong(u32::from(u16::MAX)));
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn indirect_tables_may_be_as_long_as_the_devices_largest_queue() {
        let mem = Arc::new(single_region(0x10000));
        let ind = 0x5000;
        put(&mem, TABLE, 0, d(ind, 16 * 12, VRING_DESC_F_INDIRECT, 0));
        for i in 0..12u16 {
            let flags = if i == 11 {
                VRING_DESC_F_WRITE
            } else {
                VRING_DESC_F_NEXT
            };
            put(&mem, ind, i, d(0x2000, 16, flags, i + 1));
        }
        // Queue of 8: 12 descriptors are too many, unless the device allows 16.
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits());
        assert_eq!(e.unwrap_err(), ChainError::TooLong(8));
        let c = DescriptorChain::read_bounded(mem.clone(), GuestAddress(TABLE), 0, limits(), 16);
        assert_eq!(c.unwrap().descriptors().len(), 12);
        let e = DescriptorChain::read_bounded(mem, GuestAddress(TABLE), 0, limits(), 10);
        assert_eq!(e.unwrap_err(), ChainError::TooLong(10));
    }

    #[test]
    fn caps_total_length() {
        let mem = Arc::new(single_region(0x10000));
        put(&mem, TABLE, 0, d(0x2000, 0x8000, 0, 0));
        let small = ChainLimits {
            max_total_len: 0x1000,
            ..limits()
        };
        let e = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, small);
        assert_eq!(e.unwrap_err(), ChainError::TooManyBytes(0x1000));
    }

    #[test]
    fn reader_spans_descriptors_and_reports_short_chains() {
        let mem = Arc::new(single_region(0x10000));
        put(&mem, TABLE, 0, d(0x2000, 4, VRING_DESC_F_NEXT, 1));
        put(&mem, TABLE, 1, d(0x3000, 12, 0, 0));
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x2000))
            .unwrap();
        mem.write_slice(&[5; 12], GuestAddress(0x3000)).unwrap();
        let c = DescriptorChain::read(mem.clone(), GuestAddress(TABLE), 0, limits()).unwrap();
        let mut r = c.reader();
        let v: u64 = r.read_obj().unwrap();
        assert_eq!(v.to_le_bytes(), [1, 2, 3, 4, 5, 5, 5, 5]);
        assert_eq!(r.available(), 8);
        assert!(r.read_obj::<[u8; 16]>().is_err());
        assert!(c.writer().split_tail(1).is_err());
    }
}
