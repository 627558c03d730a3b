//! The host side: the image file or block device and its geometry.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::request::SECTOR_SIZE;

/// An open disk image.
pub struct Disk {
    /// The image, shared by every queue's engine.
    pub file: Arc<File>,
    /// Size in bytes, rounded down to whole sectors.
    pub capacity: u64,
    /// True for a block device (discard and write-zeroes use ioctls).
    pub is_block_device: bool,
    /// Logical block size the guest should use.
    pub logical_block_size: u32,
    /// Physical block size (for the topology hint).
    pub physical_block_size: u32,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;

fn ioctl_u64(f: &File, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the ioctl writes one u64 into `v`.
    if unsafe { libc::ioctl(f.as_raw_fd(), req, &mut v) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_u32(f: &File, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the ioctl writes one int into `v`.
    if unsafe { libc::ioctl(f.as_raw_fd(), req, &mut v) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v as u32)
}

impl Disk {
    /// Opens `path` read-write (or read-only), optionally with O_DIRECT.
    pub fn open(path: &Path, readonly: bool, direct: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        Self::from_file(file)
    }

    /// Uses an already-open image (an fd passed by a launcher).
    pub fn from_file(file: File) -> io::Result<Self> {
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let (size, lbs, pbs) = if is_block_device {
            (
                ioctl_u64(&file, BLKGETSIZE64)?,
                ioctl_u32(&file, BLKSSZGET).unwrap_or(512),
                ioctl_u32(&file, BLKPBSZGET).unwrap_or(4096),
            )
        } else if meta.file_type().is_file() {
            (meta.len(), 512, 4096)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "image must be a regular file or a block device",
            ));
        };
        if size % SECTOR_SIZE != 0 {
            bulkhead_common::rate_limited!(
                log::Level::Warn,
                "image size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                size % SECTOR_SIZE
            );
        }
        Ok(Disk {
            file: Arc::new(file),
            capacity: size - size % SECTOR_SIZE,
            is_block_device,
            logical_block_size: lbs.clamp(512, 65536),
            physical_block_size: pbs.clamp(512, 65536),
        })
    }
}
