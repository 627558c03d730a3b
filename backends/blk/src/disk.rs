//! The host side: the image file or block device and its geometry.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::image::{self, FormatCheck};
use crate::request::SECTOR_SIZE;

/// Where the bytes are.
pub enum Source {
    /// A file or block device, shared by every queue's engine.
    File(Arc<File>),
    /// An image on Ceph RBD, shared by every queue's engine.
    #[cfg(feature = "rbd")]
    Rbd(Arc<crate::rbd::Image>),
}

/// An open disk image.
pub struct Disk {
    /// The image.
    pub source: Source,
    /// Size in bytes, rounded down to whole sectors.
    pub capacity: u64,
    /// True for a block device (discard and write-zeroes use ioctls).
    pub is_block_device: bool,
    /// Logical block size the guest should use.
    pub logical_block_size: u32,
    /// Physical block size (for the topology hint).
    pub physical_block_size: u32,
    /// The image's name, where the device takes QEMU's writer lock while it
    /// runs ([`Disk::activate`]); None: read-only, `--no-lock`, or no OFD
    /// locks on its filesystem.
    writer_lock: Option<String>,
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
    /// Take QEMU's image lock (`image::lock`, and `image::activate` while
    /// the device runs).
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
         QEMU's image lock) and this daemon wants it {mode}; stop that process, or pass \
         --no-lock if you are sure no two writers will share it"
    )]
    Locked {
        /// The image.
        what: String,
        /// Which lock conflicts.
        reason: image::LockError,
        /// "read-write" or "read-only".
        mode: &'static str,
    },
    /// Another process writes the image, or refuses writers, as the device starts.
    #[error(
        "{what} is locked: {reason} (a bulkhead-blk, QEMU, qemu-storage-daemon or qemu-img holds \
         QEMU's image lock), so the device cannot start writing it; stop that process{hint} (a \
         swap's old daemon lets go once its queues stop), or pass --no-lock if you are sure no \
         two writers will share it"
    )]
    InUse {
        /// The image.
        what: String,
        /// Which lock conflicts.
        reason: image::LockError,
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
    /// An RBD image's exclusive lock could not be taken as the device starts.
    #[cfg(feature = "rbd")]
    #[error(transparent)]
    Rbd(#[from] crate::rbd::RbdError),
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

/// `take`, retried for up to [`LOCK_WAIT`] while another holds the lock.
fn lock_waiting(
    what: &str,
    take: impl Fn() -> Result<(), image::LockError>,
) -> Result<(), image::LockError> {
    let start = std::time::Instant::now();
    let mut told = false;
    loop {
        match take() {
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
        let mut writer_lock = None;
        if opts.lock {
            match lock_waiting(&what, || image::lock(&file, opts.readonly)) {
                Ok(()) if !opts.readonly => writer_lock = Some(what.clone()),
                Ok(()) => {}
                Err(e) if image::unsupported(&e) => {
                    log::warn!("{what} is not locked: its filesystem has no OFD locks ({e})")
                }
                Err(reason) => {
                    let mode = if opts.readonly {
                        "read-only"
                    } else {
                        "read-write"
                    };
                    return Err(OpenError::Locked { what, reason, mode });
                }
            }
        }
        let mut disk = Self::from_file(file).map_err(|source| OpenError::Io {
            what: what.clone(),
            source,
        })?;
        disk.writer_lock = writer_lock;
        Ok(disk)
    }

    /// An RBD image, already open (and locked when writable).
    #[cfg(feature = "rbd")]
    pub fn from_rbd(image: Arc<crate::rbd::Image>) -> Self {
        let size = image.size;
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "{} size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                image.spec,
                size % SECTOR_SIZE
            );
        }
        Disk {
            source: Source::Rbd(image),
            capacity: size - size % SECTOR_SIZE,
            is_block_device: false,
            logical_block_size: 512,
            physical_block_size: 4096,
            writer_lock: None,
        }
    }

    /// The image file, or None for an image on RBD.
    fn file(&self) -> Option<&Arc<File>> {
        match &self.source {
            Source::File(f) => Some(f),
            #[cfg(feature = "rbd")]
            Source::Rbd(_) => None,
        }
    }

    /// The device starts: takes the writer part of the image lock, waiting
    /// up to [`LOCK_WAIT`] for a swap's old daemon (which lets go once its
    /// queues stop) or a killed one (whose io_uring holds the image a
    /// moment); for a writable RBD image, its exclusive lock
    /// ([`crate::rbd::Image::acquire_lock`]). Nothing to do for a read-only
    /// or unlocked image.
    pub fn activate(&self) -> Result<(), OpenError> {
        #[cfg(feature = "rbd")]
        if let Source::Rbd(image) = &self.source {
            return Ok(image.acquire_lock(crate::rbd::LOCK_WAIT)?);
        }
        let Some(what) = &self.writer_lock else {
            return Ok(());
        };
        let Some(file) = self.file() else {
            return Ok(());
        };
        lock_waiting(what, || image::activate(file)).map_err(|reason| {
            let hint = match reason {
                image::LockError::Read => {
                    ", or serve it with --readonly too (readers share an image)"
                }
                _ => "",
            };
            OpenError::InUse {
                what: what.clone(),
                reason,
                hint,
            }
        })?;
        log::debug!("{what}: writer lock taken");
        Ok(())
    }

    /// The device stopped: drops the writer part (an RBD image's exclusive
    /// lock), so another daemon (a swap's new one) may write the image.
    pub fn deactivate(&self) {
        #[cfg(feature = "rbd")]
        if let Source::Rbd(image) = &self.source {
            image.release_lock();
            return;
        }
        let Some(what) = &self.writer_lock else {
            return;
        };
        let Some(file) = self.file() else {
            return;
        };
        match image::deactivate(file) {
            Ok(()) => log::debug!("{what}: writer lock released"),
            Err(e) => log::warn!("{what}: cannot release the writer lock: {e}"),
        }
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
            source: Source::File(Arc::new(file)),
            capacity: size - size % SECTOR_SIZE,
            is_block_device,
            logical_block_size: lbs.clamp(512, 65536),
            physical_block_size: pbs.clamp(512, 65536),
            writer_lock: None,
        })
    }
}
