//! Guest memory for the test kit: memfd-backed, `MAP_SHARED` regions at chosen
//! guest-physical addresses, a small allocator for rings and buffers, and raw
//! access to any guest address.
//!
//! Everything a test writes here is visible to the backend process that maps the
//! same memfd after SET_MEM_TABLE, so a test can place any bytes it likes (valid
//! or hostile) wherever it likes.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    AtomicAccess, ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestRegionMmap, MmapRegion,
};

/// Granule (and minimum alignment) of the allocator.
const ALLOC_GRANULE: u64 = 64;

/// Errors from guest memory setup and access.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Allocation does not fit in any region.
    #[error("Out of guest memory allocating {0} bytes")]
    OutOfMemory(u64),
    /// Guest address range is not backed by any region.
    #[error("Guest address {addr:#x} (+{len}) is not mapped")]
    Unmapped {
        /// Start of the access.
        addr: u64,
        /// Length of the access.
        len: u64,
    },
    /// Regions are empty, overlapping, unaligned or overflowing.
    #[error("Invalid region layout")]
    BadLayout,
    /// memfd_create or ftruncate failed.
    #[error("Cannot create the memfd")]
    Memfd(#[source] std::io::Error),
    /// mmap of a region failed.
    #[error("Cannot map a region")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the region collection.
    #[error("Cannot build the guest memory map")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, MemoryError>;

/// One guest memory region: where it sits in the guest and in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes (page multiple).
    pub size: u64,
    /// Offset of the region inside the memfd.
    pub file_offset: u64,
}

struct Allocator {
    /// Next free byte per region (bump pointer).
    cursors: Vec<u64>,
    /// Freed blocks by rounded size, reused first.
    free: HashMap<u64, Vec<u64>>,
}

/// Guest RAM backed by one memfd, mapped shared, with one or more regions.
pub struct GuestMemory {
    file: File,
    mem: GuestMemoryMmap,
    layout: Vec<RegionLayout>,
    alloc: Mutex<Allocator>,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let sz = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if sz > 0 { sz as u64 } else { 4096 }
}

fn round_up(v: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    v.checked_add(mask).map(|x| x & !mask)
}

/// A memfd of `size` bytes; `sealable` as QEMU creates its RAM
/// (`MFD_ALLOW_SEALING`), or not (a file nobody can seal).
pub(crate) fn create_memfd(size: u64, sealable: bool) -> Result<File> {
    let name = CString::new("bulkhead-testkit-guest").map_err(|_| MemoryError::BadLayout)?;
    let flags = if sealable {
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING
    } else {
        libc::MFD_CLOEXEC
    };
    // SAFETY: name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    Ok(file)
}

impl GuestMemory {
    /// Creates guest RAM of `size` bytes as a single region at guest address 0.
    pub fn new(size: u64) -> Result<Self> {
        Self::with_regions(&[(0, size)])
    }

    /// Creates guest RAM with regions `(guest_addr, size)`, sorted, page aligned, not overlapping.
    pub fn with_regions(regions: &[(u64, u64)]) -> Result<Self> {
        Self::with_regions_sealable(regions, true)
    }

    /// Like [`GuestMemory::with_regions`]; `sealable: false` makes a memfd
    /// that nobody can seal, so a backend cannot protect itself against the
    /// frontend shrinking it.
    pub fn with_regions_sealable(regions: &[(u64, u64)], sealable: bool) -> Result<Self> {
        let page = page_size();
        if regions.is_empty() {
            return Err(MemoryError::BadLayout);
        }
        let mut layout = Vec::with_capacity(regions.len());
        let mut file_off = 0u64;
        let mut prev_end = 0u64;
        for (i, &(gpa, size)) in regions.iter().enumerate() {
            let end = gpa.checked_add(size).ok_or(MemoryError::BadLayout)?;
            if size == 0 || size % page != 0 || gpa % page != 0 || (i > 0 && gpa < prev_end) {
                return Err(MemoryError::BadLayout);
            }
            layout.push(RegionLayout {
                guest_addr: gpa,
                size,
                file_offset: file_off,
            });
            file_off = file_off.checked_add(size).ok_or(MemoryError::BadLayout)?;
            prev_end = end;
        }
        let file = create_memfd(file_off, sealable)?;
        let mut mmap_regions = Vec::with_capacity(layout.len());
        for r in &layout {
            let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, r.file_offset);
            let size = usize::try_from(r.size).map_err(|_| MemoryError::BadLayout)?;
            let mapping = MmapRegion::from_file(fo, size).map_err(MemoryError::Mmap)?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or(MemoryError::BadLayout)?;
            mmap_regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(mmap_regions).map_err(MemoryError::Collection)?;
        let cursors = layout.iter().map(|r| r.guest_addr).collect();
        Ok(GuestMemory {
            file,
            mem,
            layout,
            alloc: Mutex::new(Allocator {
                cursors,
                free: HashMap::new(),
            }),
        })
    }

    /// The memfd backing all regions.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The region layout, in guest address order.
    pub fn layout(&self) -> &[RegionLayout] {
        &self.layout
    }

    /// The vm-memory view of this RAM (for code that wants its `Bytes` API).
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Region descriptions for the vhost-user SET_MEM_TABLE message.
    pub fn region_infos(&self) -> Vec<VhostUserMemoryRegionInfo> {
        GuestMemoryBackend::iter(&self.mem)
            .zip(self.layout.iter())
            .map(|(region, l)| VhostUserMemoryRegionInfo {
                guest_phys_addr: l.guest_addr,
                memory_size: l.size,
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: l.file_offset,
                mmap_handle: self.file.as_raw_fd(),
            })
            .collect()
    }

    /// Frontend (this process's) virtual address of guest address `gpa`.
    pub fn host_addr(&self, gpa: u64) -> Result<u64> {
        GuestMemoryBackend::get_host_address(&self.mem, GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| MemoryError::Unmapped { addr: gpa, len: 0 })
    }

    /// Allocates `len` bytes aligned to `align` (a power of two), zeroed.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64> {
        let align = align.max(ALLOC_GRANULE);
        if !align.is_power_of_two() {
            return Err(MemoryError::BadLayout);
        }
        let size = round_up(len.max(1), ALLOC_GRANULE).ok_or(MemoryError::OutOfMemory(len))?;
        let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = a.free.get_mut(&size)
            && let Some(pos) = list.iter().position(|&g| g % align == 0)
        {
            let gpa = list.swap_remove(pos);
            drop(a);
            self.fill(gpa, size, 0)?;
            return Ok(gpa);
        }
        for (i, r) in self.layout.iter().enumerate() {
            let Some(start) = round_up(a.cursors[i], align) else {
                continue;
            };
            let Some(end) = start.checked_add(size) else {
                continue;
            };
            if end <= r.guest_addr + r.size {
                a.cursors[i] = end;
                return Ok(start);
            }
        }
        Err(MemoryError::OutOfMemory(len))
    }

    /// Returns a block from [`GuestMemory::alloc`] (same `len`) for reuse.
    pub fn free(&self, gpa: u64, len: u64) {
        if let Some(size) = round_up(len.max(1), ALLOC_GRANULE) {
            let mut a = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            a.free.entry(size).or_default().push(gpa);
        }
    }

    /// Allocates a buffer and copies `data` into it.
    pub fn alloc_with(&self, data: &[u8]) -> Result<u64> {
        let gpa = self.alloc(data.len() as u64, ALLOC_GRANULE)?;
        self.write(gpa, data)?;
        Ok(gpa)
    }

    /// Writes `data` at guest address `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| MemoryError::Unmapped {
                addr: gpa,
                len: data.len() as u64,
            })
    }

    /// Reads `buf.len()` bytes from guest address `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::Unmapped { addr: gpa, len })
    }

    /// Reads `len` bytes from guest address `gpa` into a new vector.
    pub fn read_vec(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Sets `len` bytes at `gpa` to `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<()> {
        let chunk = [byte; 4096];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(chunk.len() as u64);
            let at = gpa
                .checked_add(off)
                .ok_or(MemoryError::Unmapped { addr: gpa, len })?;
            self.write(at, &chunk[..n as usize])?;
            off += n;
        }
        Ok(())
    }

    /// Writes a plain-data value at `gpa`.
    pub fn write_obj<T: ByteValued>(&self, gpa: u64, val: T) -> Result<()> {
        self.mem
            .write_obj(val, GuestAddress(gpa))
            .map_err(|_| MemoryError::Unmapped {
                addr: gpa,
                len: size_of::<T>() as u64,
            })
    }

    /// Reads a plain-data value from `gpa`.
    pub fn read_obj<T: ByteValued>(&self, gpa: u64) -> Result<T> {
        self.mem
            .read_obj(GuestAddress(gpa))
            .map_err(|_| MemoryError::Unmapped {
                addr: gpa,
                len: size_of::<T>() as u64,
            })
    }

    /// Atomically stores `val` at the naturally aligned address `gpa`.
    pub fn store<T: AtomicAccess>(&self, gpa: u64, val: T, order: Ordering) -> Result<()> {
        self.mem
            .store(val, GuestAddress(gpa), order)
            .map_err(|_| MemoryError::Unmapped {
                addr: gpa,
                len: size_of::<T>() as u64,
            })
    }

    /// Atomically loads a value from the naturally aligned address `gpa`.
    pub fn load<T: AtomicAccess>(&self, gpa: u64, order: Ordering) -> Result<T> {
        self.mem
            .load(GuestAddress(gpa), order)
            .map_err(|_| MemoryError::Unmapped {
                addr: gpa,
                len: size_of::<T>() as u64,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_disjoint_and_reused_after_free() {
        let mem = GuestMemory::with_regions(&[(0x10000, 0x10000), (0x100000, 0x10000)]).unwrap();
        let a = mem.alloc(100, 4096).unwrap();
        let b = mem.alloc(100, 16).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(b >= a + 100);
        mem.write(b, b"hello").unwrap();
        assert_eq!(mem.read_vec(b, 5).unwrap(), b"hello");
        mem.free(b, 100);
        assert_eq!(mem.alloc(100, 16).unwrap(), b);
        assert_eq!(mem.read_vec(b, 5).unwrap(), [0; 5]);
        let big = mem.alloc(0x10000, 64).unwrap();
        assert!(big >= 0x100000, "spills into the second region");
        assert!(mem.write(0x20000, b"x").is_err());
        assert_eq!(mem.region_infos().len(), 2);
        assert_eq!(mem.region_infos()[1].mmap_offset, 0x10000);
    }
}
