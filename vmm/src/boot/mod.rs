//! Loading a Linux kernel into guest RAM with linux-loader, and what each
//! boot protocol needs beside it: the command line, the initrd, the memory
//! map, and an MP table describing CPUs and the IOAPIC.
//!
//! An ELF `vmlinux` with a PVH note boots through the PVH entry (32-bit
//! protected mode, `hvm_start_info` in `ebx`); a bzImage boots through its
//! 64-bit entry with a zero page (`boot_params` in `rsi`).
//!
//! ACPI tables ([`acpi`]) describe the same CPUs and IOAPIC as the MP
//! table, announce virtio-mmio devices as `LNRO0005` nodes (Debian's kernel
//! lacks `VIRTIO_MMIO_CMDLINE_DEVICES`), and let the guest power off through
//! `_S5_` and the PM1a control block ([`crate::pm`]).

pub mod acpi;
pub mod mptable;

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::GuestAddress;

use crate::memory::{GuestRam, MMIO_HOLE_START};

/// Where the kernel is loaded (1 MiB).
pub const KERNEL_START: u64 = 0x10_0000;
/// PVH `hvm_start_info`.
pub const START_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const MODLIST_ADDR: u64 = 0x6100;
/// PVH memory map.
pub const MEMMAP_ADDR: u64 = 0x6200;
/// The bzImage zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack for a 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted (bytes, with the NUL).
pub const CMDLINE_MAX: usize = 4096;
/// The initrd stays below this address (what old kernels can reach).
const INITRD_CEILING: u64 = 0x3800_0000;

const PVH_MAGIC: u32 = 0x336e_c578;

/// Errors while loading the kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("Cannot read {0}")]
    Read(String, #[source] std::io::Error),
    /// The kernel is neither an ELF with a PVH note nor a bzImage.
    #[error("{0} is neither an ELF vmlinux with a PVH entry nor a bzImage")]
    Format(String),
    /// The command line is too long or has a NUL.
    #[error("Kernel command line is too long (max {CMDLINE_MAX} bytes) or contains NUL")]
    Cmdline,
    /// The initrd does not fit in low RAM above the kernel.
    #[error("Initrd of {0} bytes does not fit in guest RAM")]
    InitrdTooBig(u64),
    /// Boot structures could not be written.
    #[error("Cannot write boot structures into guest RAM")]
    Memory(#[source] crate::memory::MemoryError),
}

/// How the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode at `entry` with `start_info` in ebx.
    Pvh {
        /// Entry point.
        entry: u64,
        /// `hvm_start_info` address.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol at `entry` with `boot_params` in rsi.
    Linux64 {
        /// Entry point.
        entry: u64,
        /// Zero page address.
        boot_params: u64,
    },
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootConfig<'a> {
    /// Kernel image path.
    pub kernel: &'a Path,
    /// Initrd path.
    pub initrd: Option<&'a Path>,
    /// Command line.
    pub cmdline: &'a str,
    /// Number of vCPUs (for the MP table and the MADT).
    pub cpus: u8,
    /// virtio-mmio devices to announce in the DSDT.
    pub virtio_mmio: &'a [acpi::MmioDevice],
}

fn mem_err(e: crate::memory::MemoryError) -> BootError {
    BootError::Memory(e)
}

/// Places the initrd page-aligned at the top of low RAM; returns (address, size).
fn load_initrd(ram: &GuestRam, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let data = std::fs::read(path).map_err(|e| BootError::Read(name, e))?;
    let size = data.len() as u64;
    let low_end = ram
        .regions()
        .first()
        .map(|r| r.guest_addr + r.size)
        .unwrap_or(0)
        .min(MMIO_HOLE_START)
        .min(INITRD_CEILING);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooBig(size))?;
    ram.write(addr, &data).map_err(mem_err)?;
    Ok((addr, size))
}

fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    ram.write(CMDLINE_ADDR, &bytes).map_err(mem_err)
}

/// Loads the kernel, command line, initrd and MP table; says how to start vCPU 0.
pub fn load(ram: &GuestRam, cfg: &BootConfig<'_>) -> Result<BootEntry, BootError> {
    let name = cfg.kernel.display().to_string();
    let mut file = File::open(cfg.kernel).map_err(|e| BootError::Read(name.clone(), e))?;
    write_cmdline(ram, cfg.cmdline)?;
    mptable::write(ram, cfg.cpus).map_err(mem_err)?;
    let rsdp = acpi::write(ram, cfg.cpus, cfg.virtio_mmio).map_err(mem_err)?;

    if let Ok(r) = Elf::load(ram.mem(), None, &mut file, Some(GuestAddress(KERNEL_START))) {
        let PvhBootCapability::PvhEntryPresent(entry) = r.pvh_boot_cap else {
            return Err(BootError::Format(name));
        };
        let initrd = match cfg.initrd {
            Some(p) => Some(load_initrd(ram, p, r.kernel_end)?),
            None => None,
        };
        write_pvh_start_info(ram, initrd, rsdp)?;
        return Ok(BootEntry::Pvh {
            entry: entry.0,
            start_info: START_INFO_ADDR,
        });
    }
    let r = BzImage::load(ram.mem(), None, &mut file, Some(GuestAddress(KERNEL_START)))
        .map_err(|_| BootError::Format(name.clone()))?;
    let hdr = r.setup_header.ok_or(BootError::Format(name))?;
    let initrd = match cfg.initrd {
        Some(p) => Some(load_initrd(ram, p, r.kernel_end)?),
        None => None,
    };
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cfg.cmdline.len() as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = ram.e820();
    let n = map.len().min(params.e820_table.len());
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind.code();
    }
    params.e820_entries = n as u8;
    // SAFETY: boot_params is a plain-old-data C struct; viewing its bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&params as *const boot_params).cast::<u8>(),
            size_of::<boot_params>(),
        )
    };
    ram.write(ZERO_PAGE_ADDR, bytes).map_err(mem_err)?;
    // The 64-bit entry is 0x200 past the protected-mode kernel's start.
    Ok(BootEntry::Linux64 {
        entry: u64::from(params.hdr.code32_start) + 0x200,
        boot_params: ZERO_PAGE_ADDR,
    })
}

fn write_pvh_start_info(
    ram: &GuestRam,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let map = ram.e820();
    let mut mm = Vec::new();
    for e in &map {
        mm.extend_from_slice(&e.addr.to_le_bytes());
        mm.extend_from_slice(&e.size.to_le_bytes());
        mm.extend_from_slice(&e.kind.code().to_le_bytes());
        mm.extend_from_slice(&0u32.to_le_bytes());
    }
    ram.write(MEMMAP_ADDR, &mm).map_err(mem_err)?;
    let nr_modules: u32 = if let Some((addr, size)) = initrd {
        let mut m = Vec::new();
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes());
        ram.write(MODLIST_ADDR, &m).map_err(mem_err)?;
        1
    } else {
        0
    };
    let mut si = Vec::new();
    si.extend_from_slice(&PVH_MAGIC.to_le_bytes());
    si.extend_from_slice(&1u32.to_le_bytes()); // version
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    si.extend_from_slice(&nr_modules.to_le_bytes());
    si.extend_from_slice(&MODLIST_ADDR.to_le_bytes());
    si.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    si.extend_from_slice(&rsdp.to_le_bytes());
    si.extend_from_slice(&MEMMAP_ADDR.to_le_bytes());
    si.extend_from_slice(&(map.len() as u32).to_le_bytes());
    si.extend_from_slice(&0u32.to_le_bytes());
    ram.write(START_INFO_ADDR, &si).map_err(mem_err)
}
