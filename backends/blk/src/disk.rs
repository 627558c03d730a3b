//! The host side: the image file or block device and its geometry.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::image::{self, FormatCheck};
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

/// How the daemon opens its image (`--readonly`, `--direct`, `--format`,
/// `--no-lock`).
#[derive(Clone, Copy, Debug)]
pub struct ImageOptions {
    /// Open read-only and lock as a reader.
    pub readonly: bool,
    /// Open with `O_DIRECT`.
    pub direct: bool,
    /// Refuse a foreign format, or serve the bytes as they are.
    pub format: FormatCheck,
    /// Take QEMU's image lock (`image::lock`).
    pub lock: bool,
}

/// Why an image cannot be served; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The image starts like another format.
    #[error(
        "{what} is a {format} image, not a raw disk; convert it (qemu-img convert -O raw) or serve it \
         with qemu-storage-daemon; if these bytes are the guest's own data, pass --format raw"
    )]
    Foreign {
        /// The image.
        what: String,
        /// The format found.
        format: &'static str,
    },
    /// Another process holds a conflicting lock.
    #[error(
        "{what} is locked: {reason} (a bulkhead-blk, QEMU, qemu-storage-daemon or qemu-img holds \
         QEMU's image lock) and this daemon wants it {mode}; stop that process{hint}, or pass \
         --no-lock if you are sure no two writers will share it"
    )]
    Locked {
        /// The image.
        what: String,
        /// Which lock conflicts.
        reason: image::LockError,
        /// "read-write" or "read-only".
        mode: &'static str,
        /// What else may help.
        hint: &'static str,
    },
    /// Opening read-write is not permitted.
    #[error(
        "cannot open {what} read-write; serve it with --readonly, or give the daemon's user write access"
    )]
    NotWritable {
        /// The image.
        what: String,
        /// The open's error.
        #[source]
        source: io::Error,
    },
    /// Anything else.
    #[error("cannot open {what}")]
    Io {
        /// The image.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How long a conflicting lock is retried. A SIGKILLed predecessor's image
/// stays open (and locked) until its io_uring requests in flight complete,
/// after the process is gone; a restart right away must not fail on that.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// [`image::lock`], retried for up to [`LOCK_WAIT`] while another holds it.
fn lock_waiting(file: &File, readonly: bool, what: &str) -> Result<(), image::LockError> {
    let start = std::time::Instant::now();
    let mut told = false;
    loop {
        match image::lock(file, readonly) {
            Err(image::LockError::Io(e)) => return Err(image::LockError::Io(e)),
            Err(e) if start.elapsed() < LOCK_WAIT => {
                if !told {
                    log::info!("{what}: {e}; waiting up to {LOCK_WAIT:?} for its lock");
                    told = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

impl Disk {
    /// Opens `path`, refuses a foreign format and takes the image lock.
    pub fn open(path: &Path, opts: ImageOptions) -> Result<Self, OpenError> {
        let what = format!("image {}", path.display());
        let mut o = OpenOptions::new();
        o.read(true).write(!opts.readonly);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|source| {
            let denied = matches!(
                source.raw_os_error(),
                Some(libc::EACCES | libc::EROFS | libc::EPERM)
            );
            if denied && !opts.readonly {
                OpenError::NotWritable {
                    what: what.clone(),
                    source,
                }
            } else {
                OpenError::Io {
                    what: what.clone(),
                    source,
                }
            }
        })?;
        Self::checked(file, what, opts)
    }

    /// Uses an inherited image fd after the same checks as [`Disk::open`].
    pub fn from_fd_checked(file: File, fd: i32, opts: ImageOptions) -> Result<Self, OpenError> {
        Self::checked(file, format!("image fd {fd}"), opts)
    }

    fn checked(file: File, what: String, opts: ImageOptions) -> Result<Self, OpenError> {
        if opts.format == FormatCheck::Probe {
            match image::probe(&file) {
                Ok(Some(f)) => {
                    return Err(OpenError::Foreign {
                        what,
                        format: f.name,
                    });
                }
                Ok(None) => {}
                Err(source) => return Err(OpenError::Io { what, source }),
            }
        }
        if opts.lock {
            match lock_waiting(&file, opts.readonly, &what) {
                Ok(()) => {}
                Err(e) if image::unsupported(&e) => {
                    log::warn!("{what} is not locked: its filesystem has no OFD locks ({e})")
                }
                Err(reason) => {
                    let hint = match reason {
                        image::LockError::Read if !opts.readonly => {
                            ", or serve it with --readonly too (readers share an image)"
                        }
                        _ => "",
                    };
                    let mode = if opts.readonly {
                        "read-only"
                    } else {
                        "read-write"
                    };
                    return Err(OpenError::Locked {
                        what,
                        reason,
                        mode,
                        hint,
                    });
                }
            }
        }
        Self::from_file(file).map_err(|source| OpenError::Io { what, source })
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
