//! Guest RAM: one memfd, mapped `MAP_SHARED`, so the same pages can be handed
//! to every vhost-user backend; plus the x86 physical memory map (e820).
//!
//! RAM below 4 GiB stops at [`MMIO_HOLE_START`]; whatever does not fit there
//! continues at 4 GiB. The hole holds the PCI and virtio-mmio windows, the
//! IOAPIC and the LAPIC.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

/// Start of the 32-bit MMIO hole (3 GiB).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// First address above 4 GiB, where RAM resumes.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Smallest guest RAM accepted (the boot structures live in the first MiB).
pub const MIN_RAM: u64 = 2 << 20;
/// Largest guest RAM accepted (1 TiB).
pub const MAX_RAM: u64 = 1 << 40;

/// Errors from guest memory setup.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is below [`MIN_RAM`], above [`MAX_RAM`] or not page aligned
    /// (or a custom layout is unaligned or overlapping).
    #[error("Guest RAM size {0:#x} is not a page multiple between 2 MiB and 1 TiB")]
    BadSize(u64),
    /// memfd_create or ftruncate failed.
    #[error("Cannot create the guest RAM memfd")]
    Memfd(#[source] std::io::Error),
    /// mmap of a region failed.
    #[error("Cannot map guest RAM")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the region list.
    #[error("Cannot build the guest memory map")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
    /// A guest range is not backed by RAM.
    #[error("Guest range {addr:#x}+{len:#x} is not RAM")]
    Unmapped {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

/// One e820 entry type the VMM reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM (type 1).
    Ram,
    /// Reserved (type 2).
    Reserved,
}

impl E820Kind {
    /// The e820 type number.
    pub fn code(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }
}

/// One entry of the physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What is there.
    pub kind: E820Kind,
}

/// One RAM region: where it sits in the guest and in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset inside the memfd.
    pub file_offset: u64,
}

/// Guest RAM backed by one shared memfd.
pub struct GuestRam {
    file: File,
    mem: GuestMemoryMmap,
    regions: Vec<RamRegion>,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let sz = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(sz).ok().filter(|s| *s > 0).unwrap_or(4096)
}

fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let name = CString::new("bulkhead-guest-ram")
        .map_err(|e| MemoryError::Memfd(std::io::Error::other(e)))?;
    // SAFETY: name is a valid NUL-terminated string; the result is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    // As QEMU's memory-backend-memfd: RAM never changes size, so no backend
    // that maps it can lose a page to a truncation (SIGBUS).
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own fd with integer arguments.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Asks for transparent huge pages under guest RAM, as QEMU does for every
/// RAM block: KVM then maps the guest in 2 MiB pages where the host backs
/// it so (for this shared memfd, where the host's `shmem_enabled` is
/// `advise` or `always`), so each first touch of guest memory costs one
/// nested-paging fault per 2 MiB, not per 4 KiB. Advice only: refused, it
/// changes nothing.
fn advise_huge_pages(mapping: &MmapRegion) {
    // SAFETY: the range is exactly this mapping, which we own; MADV_HUGEPAGE
    // changes no contents.
    let r = unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE) };
    if r != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE) on guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM laid out around the MMIO hole.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if !(MIN_RAM..=MAX_RAM).contains(&size) || !size.is_multiple_of(page_size()) {
            return Err(MemoryError::BadSize(size));
        }
        let low = size.min(MMIO_HOLE_START);
        let mut layout = vec![(0, low)];
        if size > low {
            layout.push((HIGH_RAM_START, size - low));
        }
        Self::with_layout(&layout)
    }

    /// Creates RAM with regions `(guest_addr, size)`: page aligned, sorted,
    /// not overlapping (small test guests use this to leave MMIO holes).
    pub fn with_layout(layout: &[(u64, u64)]) -> Result<Self, MemoryError> {
        let page = page_size();
        let mut regions = Vec::with_capacity(layout.len());
        let mut file_offset = 0u64;
        let mut prev_end = 0u64;
        for &(guest_addr, size) in layout {
            let end = guest_addr.checked_add(size);
            if size == 0
                || !size.is_multiple_of(page)
                || !guest_addr.is_multiple_of(page)
                || guest_addr < prev_end
                || end.is_none()
            {
                return Err(MemoryError::BadSize(size));
            }
            regions.push(RamRegion {
                guest_addr,
                size,
                file_offset,
            });
            file_offset = file_offset
                .checked_add(size)
                .ok_or(MemoryError::BadSize(size))?;
            prev_end = end.unwrap_or(u64::MAX);
        }
        if regions.is_empty() {
            return Err(MemoryError::BadSize(0));
        }
        let total = file_offset;
        let file = create_memfd(total)?;
        let mut mapped = Vec::with_capacity(regions.len());
        for r in &regions {
            let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, r.file_offset);
            let len = usize::try_from(r.size).map_err(|_| MemoryError::BadSize(total))?;
            let mapping = MmapRegion::from_file(fo, len).map_err(MemoryError::Mmap)?;
            advise_huge_pages(&mapping);
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or(MemoryError::BadSize(total))?;
            mapped.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(MemoryError::Collection)?;
        Ok(GuestRam { file, mem, regions })
    }

    /// The vm-memory view (for loaders and ring access).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd backing all of RAM.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The RAM regions, in guest address order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Host virtual address and length of each region, for KVM memory slots.
    pub fn host_regions(&self) -> Vec<(RamRegion, u64)> {
        GuestMemoryBackend::iter(&self.mem)
            .zip(self.regions.iter())
            .map(|(m, r)| (*r, m.as_ptr() as u64))
            .collect()
    }

    /// Region descriptions for vhost-user SET_MEM_TABLE.
    pub fn vhost_regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.host_regions()
            .into_iter()
            .map(|(r, host)| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: host,
                mmap_offset: r.file_offset,
                mmap_handle: self.file.as_raw_fd(),
            })
            .collect()
    }

    /// This process's address of the guest range `addr..addr+len`, which
    /// must lie inside one region (rings handed to a backend must).
    pub fn host_addr(&self, addr: u64, len: u64) -> Result<u64, MemoryError> {
        let bad = MemoryError::Unmapped { addr, len };
        let end = addr
            .checked_add(len)
            .ok_or(MemoryError::Unmapped { addr, len })?;
        let region = GuestMemoryBackend::find_region(&self.mem, GuestAddress(addr)).ok_or(bad)?;
        let region_end = region
            .start_addr()
            .0
            .checked_add(region.len())
            .ok_or(MemoryError::Unmapped { addr, len })?;
        if end > region_end {
            return Err(MemoryError::Unmapped { addr, len });
        }
        GuestMemoryBackend::get_host_address(&self.mem, GuestAddress(addr))
            .map(|p| p as u64)
            .map_err(|_| MemoryError::Unmapped { addr, len })
    }

    /// Writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| MemoryError::Unmapped {
                addr,
                len: data.len() as u64,
            })
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len() as u64;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::Unmapped { addr, len })
    }

    /// The e820 map: RAM regions, with the legacy VGA/BIOS area
    /// (0xA0000..0x100000) carved out of low RAM and reported reserved.
    pub fn e820(&self) -> Vec<E820Entry> {
        const EBDA_START: u64 = 0x9_FC00;
        const HIGH_LOW_RAM: u64 = 0x10_0000;
        let mut map = Vec::new();
        for r in &self.regions {
            if r.guest_addr == 0 {
                map.push(E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820Kind::Ram,
                });
                map.push(E820Entry {
                    addr: EBDA_START,
                    size: HIGH_LOW_RAM - EBDA_START,
                    kind: E820Kind::Reserved,
                });
                if r.size > HIGH_LOW_RAM {
                    map.push(E820Entry {
                        addr: HIGH_LOW_RAM,
                        size: r.size - HIGH_LOW_RAM,
                        kind: E820Kind::Ram,
                    });
                }
            } else {
                map.push(E820Entry {
                    addr: r.guest_addr,
                    size: r.size,
                    kind: E820Kind::Ram,
                });
            }
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_above_the_hole_continues_at_4g() {
        let ram = GuestRam::new(MMIO_HOLE_START + (64 << 20)).unwrap();
        assert_eq!(ram.regions().len(), 2);
        assert_eq!(ram.regions()[1].guest_addr, HIGH_RAM_START);
        assert_eq!(ram.regions()[1].file_offset, MMIO_HOLE_START);
        assert_eq!(ram.vhost_regions().len(), 2);
        assert!(ram.host_addr(MMIO_HOLE_START - 8, 16).is_err());
        assert!(ram.host_addr(HIGH_RAM_START, 16).is_ok());
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(GuestRam::new(4096).is_err());
        assert!(GuestRam::new((64 << 20) + 1).is_err());
    }

    #[test]
    fn e820_reserves_the_legacy_hole() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let map = ram.e820();
        assert_eq!(map[1].kind, E820Kind::Reserved);
        assert_eq!(map[2].addr + map[2].size, 64 << 20);
    }
}
