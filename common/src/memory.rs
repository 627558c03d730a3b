//! Guest memory as announced by the frontend's memory table.
//!
//! Every region arrives as an fd (a memfd or hugetlbfs file) plus the guest
//! physical address, the size, the frontend's own virtual address for it and an
//! offset into the fd. We validate the table (no overlaps, no overflow, the fd
//! really is that large so an access can never SIGBUS), map each region
//! `MAP_SHARED`, and keep the frontend addresses to translate the ring
//! addresses of SET_VRING_ADDR.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use vm_memory::{
    Address, AtomicAccess, ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryAtomic,
    GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
    VolatileSlice,
};

/// Guest memory seen by a backend; cheap to clone, swapped atomically on a new table.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap>;

/// A memory map snapshot that device code may hold while I/O is in flight.
pub type GuestMemorySnapshot = Arc<GuestMemoryMmap>;

/// Most regions a frontend may announce (the vhost-user CONFIGURE_MEM_SLOTS limit we advertise).
pub const MAX_MEM_SLOTS: usize = 32;

/// The host memory of `len` bytes at `addr` when they lie inside one region
/// (the common case; a range across adjacent regions gets `None`).
pub fn region_slice(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
) -> Option<VolatileSlice<'_>> {
    let region = mem.find_region(addr)?;
    let offset = addr.checked_offset_from(region.start_addr())?;
    region
        .as_volatile_slice()
        .ok()?
        .subslice(offset as usize, len)
        .ok()
}

/// Copies a value out of guest memory: one region lookup when it lies inside
/// one region, the general path otherwise; `None` when it is not all in memory.
pub fn read_guest_obj<T: ByteValued>(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<T> {
    match region_slice(mem, addr, std::mem::size_of::<T>()) {
        Some(slice) => slice.read_obj(0).ok(),
        None => mem.read_obj(addr).ok(),
    }
}

/// Writes a value into guest memory, like [`read_guest_obj`]; false when it
/// is not all in memory.
pub fn write_guest_obj<T: ByteValued>(mem: &GuestMemoryMmap, val: T, addr: GuestAddress) -> bool {
    match region_slice(mem, addr, std::mem::size_of::<T>()) {
        Some(slice) => slice.write_obj(val, 0).is_ok(),
        None => mem.write_obj(val, addr).is_ok(),
    }
}

/// Atomically loads a ring field (an index, flags, an event index), like
/// [`read_guest_obj`]; `None` when it is not in memory.
pub fn load_guest<T: AtomicAccess>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    order: std::sync::atomic::Ordering,
) -> Option<T> {
    match region_slice(mem, addr, std::mem::size_of::<T>()) {
        Some(slice) => slice.load(0, order).ok(),
        None => mem.load(addr, order).ok(),
    }
}

/// Atomically stores a ring field, like [`load_guest`]; false when it is not in memory.
pub fn store_guest<T: AtomicAccess>(
    mem: &GuestMemoryMmap,
    val: T,
    addr: GuestAddress,
    order: std::sync::atomic::Ordering,
) -> bool {
    match region_slice(mem, addr, std::mem::size_of::<T>()) {
        Some(slice) => slice.store(val, 0, order).is_ok(),
        None => mem.store(val, addr, order).is_ok(),
    }
}

/// Seals `file` against shrinking (`F_SEAL_SHRINK`), for every holder, the
/// frontend included, so no page mapped here can vanish and raise SIGBUS.
/// Works on memfds created with `MFD_ALLOW_SEALING` (QEMU's, bulkhead-vmm's,
/// the test kit's); other files give an error, and a daemon whose frontend
/// truncates one stops through its SIGBUS handler (`daemon::Endpoint::open`).
pub fn seal_against_shrinking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd we hold, with integer arguments only.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Errors in a memory table sent by the frontend.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Memory region {0} has a zero size or an address range that overflows.
    #[error("memory region {0} has a zero size or an address range that overflows")]
    BadRegion(usize),
    /// Memory region {0} is not backed by a large enough file.
    #[error("memory region {0} needs {1} bytes of its fd but the fd holds {2}")]
    FileTooSmall(usize, u64, u64),
    /// Cannot inspect the fd of memory region {0}.
    #[error("cannot inspect the fd of memory region {0}")]
    Stat(usize, #[source] std::io::Error),
    /// Cannot map memory region {0}.
    #[error("cannot map memory region {0}: {1}")]
    Map(usize, String),
    /// Memory regions overlap or are out of order.
    #[error("memory regions overlap")]
    Overlap,
    /// Too many memory regions.
    #[error("too many memory regions ({0}, at most {MAX_MEM_SLOTS})")]
    TooMany(usize),
    /// The fd of a region is not a file the daemon can map safely.
    #[error("memory region {0}")]
    NotAFile(usize, #[source] crate::frontend_fd::FdError),
    /// No region holds the given address.
    #[error("no memory region holds frontend address {0:#x}")]
    UnknownRegion(u64),
}

/// One region of the table, as the frontend described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Frontend virtual address of the first byte.
    pub user_addr: u64,
    /// Offset of the region in its fd.
    pub mmap_offset: u64,
}

impl RegionDesc {
    fn is_valid(&self) -> bool {
        self.size != 0
            && self.guest_phys_addr.checked_add(self.size).is_some()
            && self.user_addr.checked_add(self.size).is_some()
            && self.mmap_offset.checked_add(self.size).is_some()
            && usize::try_from(self.size).is_ok()
    }
}

/// The validated, mapped memory table plus the frontend address map.
pub struct MemoryTable {
    regions: Vec<(RegionDesc, Arc<GuestRegionMmap>)>,
}

impl MemoryTable {
    /// An empty table (before the first SET_MEM_TABLE).
    pub fn empty() -> Self {
        MemoryTable {
            regions: Vec::new(),
        }
    }

    /// Validates and maps `regions`, each backed by the matching fd in `files`.
    pub fn new(descs: &[RegionDesc], files: Vec<File>) -> Result<Self, MemoryError> {
        if descs.len() > MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany(descs.len()));
        }
        let mut regions = Vec::with_capacity(descs.len());
        for (i, (desc, file)) in descs.iter().zip(files).enumerate() {
            regions.push((*desc, Arc::new(map_region(i, desc, file)?)));
        }
        let table = MemoryTable { regions };
        table.check_overlaps()?;
        Ok(table)
    }

    /// Returns a copy of this table with one more region (ADD_MEM_REG).
    pub fn with_region(&self, desc: &RegionDesc, file: File) -> Result<Self, MemoryError> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany(self.regions.len() + 1));
        }
        let mut regions = self.regions.clone();
        regions.push((*desc, Arc::new(map_region(regions.len(), desc, file)?)));
        let table = MemoryTable { regions };
        table.check_overlaps()?;
        Ok(table)
    }

    /// Returns a copy of this table without the region matching `desc` (REM_MEM_REG).
    pub fn without_region(&self, desc: &RegionDesc) -> Result<Self, MemoryError> {
        let before = self.regions.len();
        let regions: Vec<_> = self
            .regions
            .iter()
            .filter(|(d, _)| !(d.guest_phys_addr == desc.guest_phys_addr && d.size == desc.size))
            .cloned()
            .collect();
        if regions.len() == before {
            return Err(MemoryError::UnknownRegion(desc.user_addr));
        }
        Ok(MemoryTable { regions })
    }

    fn check_overlaps(&self) -> Result<(), MemoryError> {
        let mut gpa: Vec<(u64, u64)> = self
            .regions
            .iter()
            .map(|(d, _)| (d.guest_phys_addr, d.guest_phys_addr + d.size))
            .collect();
        let mut uva: Vec<(u64, u64)> = self
            .regions
            .iter()
            .map(|(d, _)| (d.user_addr, d.user_addr + d.size))
            .collect();
        for ranges in [&mut gpa, &mut uva] {
            ranges.sort_unstable();
            if ranges.windows(2).any(|w| w[0].1 > w[1].0) {
                return Err(MemoryError::Overlap);
            }
        }
        Ok(())
    }

    /// The guest memory map built from this table (empty once REM_MEM_REG
    /// removed the last region).
    pub fn guest_memory(&self) -> Result<GuestMemoryMmap, MemoryError> {
        if self.regions.is_empty() {
            return Ok(GuestMemoryMmap::default());
        }
        let mut regions: Vec<Arc<GuestRegionMmap>> =
            self.regions.iter().map(|(_, r)| r.clone()).collect();
        regions.sort_by_key(|r| vm_memory::GuestMemoryRegion::start_addr(r.as_ref()));
        GuestMemoryMmap::from_arc_regions(regions).map_err(|_| MemoryError::Overlap)
    }

    /// Translates a frontend virtual address to a guest physical address.
    pub fn uva_to_gpa(&self, uva: u64) -> Result<GuestAddress, MemoryError> {
        self.regions
            .iter()
            .find(|(d, _)| uva >= d.user_addr && uva - d.user_addr < d.size)
            .map(|(d, _)| GuestAddress(d.guest_phys_addr + (uva - d.user_addr)))
            .ok_or(MemoryError::UnknownRegion(uva))
    }

    /// End of the highest region's guest addresses (0 for an empty table):
    /// what a dirty log must cover.
    pub fn end(&self) -> u64 {
        self.regions
            .iter()
            .map(|(d, _)| d.guest_phys_addr.saturating_add(d.size))
            .max()
            .unwrap_or(0)
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// True before the first table.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
}

fn map_region(i: usize, desc: &RegionDesc, file: File) -> Result<GuestRegionMmap, MemoryError> {
    if !desc.is_valid() {
        return Err(MemoryError::BadRegion(i));
    }
    crate::frontend_fd::regular_file(&file, "memory region")
        .map_err(|e| MemoryError::NotAFile(i, e))?;
    let end = desc.mmap_offset + desc.size;
    // Seal first, then check the size: the frontend cannot shrink the file
    // in between, nor later, while the pages are mapped here.
    if let Err(e) = seal_against_shrinking(&file) {
        crate::rate_limited!(
            log::Level::Warn,
            "memory region {i}: its file cannot be sealed against shrinking ({e}); \
             a frontend that truncates it stops this daemon (SIGBUS)"
        );
    }
    let meta = file.metadata().map_err(|e| MemoryError::Stat(i, e))?;
    // Regular files (memfd, hugetlbfs, tmpfs) must hold the whole range, or a
    // guest access past the end would raise SIGBUS in this process.
    if meta.file_type().is_file() && meta.len() < end {
        return Err(MemoryError::FileTooSmall(i, end, meta.len()));
    }
    let _ = file.as_raw_fd();
    let region = MmapRegion::from_file(FileOffset::new(file, desc.mmap_offset), desc.size as usize)
        .map_err(|e| MemoryError::Map(i, e.to_string()))?;
    GuestRegionMmap::new(region, GuestAddress(desc.guest_phys_addr))
        .ok_or(MemoryError::BadRegion(i))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A memfd of `size` bytes.
    pub(crate) fn memfd(size: u64) -> File {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe {
            libc::memfd_create(
                c"bulkhead-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, owned descriptor.
        let f = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    /// One-region guest memory of `size` bytes at guest address 0.
    pub(crate) fn single_region(size: u64) -> GuestMemoryMmap {
        let desc = RegionDesc {
            guest_phys_addr: 0,
            size,
            user_addr: 0x7000_0000_0000,
            mmap_offset: 0,
        };
        MemoryTable::new(&[desc], vec![memfd(size)])
            .unwrap()
            .guest_memory()
            .unwrap()
    }

    #[test]
    fn table_translates_frontend_addresses() {
        let descs = [
            RegionDesc {
                guest_phys_addr: 0,
                size: 0x10000,
                user_addr: 0x1000_0000,
                mmap_offset: 0,
            },
            RegionDesc {
                guest_phys_addr: 0x100000,
                size: 0x10000,
                user_addr: 0x2000_0000,
                mmap_offset: 0,
            },
        ];
        let t = MemoryTable::new(&descs, vec![memfd(0x10000), memfd(0x10000)]).unwrap();
        assert_eq!(t.uva_to_gpa(0x2000_0010).unwrap(), GuestAddress(0x100010));
        assert!(t.uva_to_gpa(0x2001_0000).is_err());
        assert!(t.guest_memory().is_ok());
    }

    #[test]
    fn removing_the_last_region_leaves_an_empty_map() {
        let d = RegionDesc {
            guest_phys_addr: 0,
            size: 0x10000,
            user_addr: 0x1000_0000,
            mmap_offset: 0,
        };
        let t = MemoryTable::new(&[d], vec![memfd(0x10000)]).unwrap();
        let empty = t.without_region(&d).unwrap();
        assert!(empty.is_empty());
        let map = empty.guest_memory().unwrap();
        assert_eq!(vm_memory::GuestMemoryBackend::num_regions(&map), 0);
    }

    #[test]
    fn overlapping_regions_are_rejected() {
        let d = RegionDesc {
            guest_phys_addr: 0,
            size: 0x10000,
            user_addr: 0x1000_0000,
            mmap_offset: 0,
        };
        let mut d2 = d;
        d2.guest_phys_addr = 0x8000;
        d2.user_addr = 0x3000_0000;
        assert!(matches!(
            MemoryTable::new(&[d, d2], vec![memfd(0x10000), memfd(0x10000)]),
            Err(MemoryError::Overlap)
        ));
    }

    #[test]
    fn fd_smaller_than_region_is_rejected() {
        let d = RegionDesc {
            guest_phys_addr: 0,
            size: 0x20000,
            user_addr: 0x1000_0000,
            mmap_offset: 0,
        };
        assert!(matches!(
            MemoryTable::new(&[d], vec![memfd(0x10000)]),
            Err(MemoryError::FileTooSmall(0, _, _))
        ));
        let mut f = memfd(0);
        f.write_all(&[0u8; 16]).unwrap();
        let d = RegionDesc {
            size: 0x1000,
            mmap_offset: u64::MAX - 10,
            ..d
        };
        assert!(MemoryTable::new(&[d], vec![f]).is_err());
    }
}
