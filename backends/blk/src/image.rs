//! What the daemon checks on an image before it serves it: that it is not
//! another program's image format (a qcow2 file served raw shows the guest
//! the qcow2 metadata, and the guest's writes corrupt it), and that no other
//! process serves it (two writers corrupt it).
//!
//! The lock is QEMU's: open file description (OFD) locks on single bytes,
//! so bulkhead-blk, QEMU, qemu-storage-daemon and `qemu-img` exclude each
//! other on the same image. QEMU locks byte `100 + i` for each permission
//! `i` it holds and byte `200 + i` for each one it refuses to share, then
//! tests the opposite bytes of everyone else (block/file-posix.c). An OFD
//! lock belongs to the open image (not to a thread or process), so the
//! main thread changes it inside the sandbox: a writable daemon holds the
//! writer part only while its device runs (see [`activate`]), so a swap's
//! new daemon can start beside the old one.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Whether to look at the image's first bytes for another format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatCheck {
    /// Refuse an image that starts like another format (the default).
    Probe,
    /// Serve the bytes as they are (`--format raw`).
    Raw,
}

/// A format that is not raw, recognised by its magic bytes at offset 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Foreign {
    /// Its name, as `qemu-img` spells it.
    pub name: &'static str,
}

/// Magic bytes at offset 0, per format (each format's own specification;
/// the same list `qemu-img info` probes).
const MAGICS: &[(&[u8], &str)] = &[
    (b"QFI\xfb", "qcow2"),
    (b"QED\0", "qed"),
    (b"KDMV", "vmdk"),
    (b"COWD", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"LUKS\xba\xbe", "luks"),
    (b"Bochs Virtual HD Image", "bochs"),
];

/// VDI's signature, little-endian at offset 0x40 (its header text is optional).
const VDI_SIGNATURE: [u8; 4] = 0xbeda_107f_u32.to_le_bytes();

/// Bytes read to probe: enough for every magic, and a multiple of any
/// logical block size so the read also works with `O_DIRECT`.
const PROBE_BYTES: usize = 4096;

/// A page-aligned buffer: an `O_DIRECT` read needs one.
#[repr(C, align(4096))]
struct Aligned([u8; PROBE_BYTES]);

/// The foreign format `head` (an image's first bytes) starts with, if any.
pub fn detect(head: &[u8]) -> Option<Foreign> {
    if let Some((_, name)) = MAGICS.iter().find(|(m, _)| head.starts_with(m)) {
        return Some(Foreign { name });
    }
    if head.get(0x40..0x44) == Some(&VDI_SIGNATURE[..]) {
        return Some(Foreign { name: "vdi" });
    }
    None
}

/// Reads the image's first bytes and names the foreign format they show.
pub fn probe(file: &File) -> io::Result<Option<Foreign>> {
    let mut buf = Box::new(Aligned([0; PROBE_BYTES]));
    let mut len = 0;
    while len < PROBE_BYTES {
        match file.read_at(&mut buf.0[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // O_DIRECT refuses a read past a short file's end at an
            // unaligned offset; what was read is enough to probe.
            Err(_) if len > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(detect(&buf.0[..len]))
}

/// Lock bytes (QEMU's `RAW_LOCK_PERM_BASE` and `RAW_LOCK_SHARED_BASE`).
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// QEMU's permission bits, as byte offsets from either base.
const READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

/// Why the image could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another process writes the image.
    Written,
    /// Another process reads it and allows no writer beside it.
    Read,
    /// The lock call failed for another reason.
    Io(io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Written => f.write_str("another process is writing it"),
            LockError::Read => f.write_str("another process is using it and allows no writer"),
            LockError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// True where the filesystem has no OFD locks (some network filesystems):
/// the image is then served unlocked, with a warning.
pub fn unsupported(e: &LockError) -> bool {
    matches!(e, LockError::Io(e) if matches!(e.raw_os_error(),
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)))
}

/// Locks the image as the daemon holds it from start: `readonly`, as a
/// reader that refuses writers (QEMU's read-only disk, `share-rw=off`), for
/// its whole life; writable, as an idle user that reads and shares
/// everything (QEMU's inactive image, on an incoming migration), until its
/// device runs and [`activate`] takes the writer part. So idle daemons and
/// readers share an image, and only a running device or a reader excludes
/// writers.
pub fn lock(file: &File, readonly: bool) -> Result<(), LockError> {
    set(file, PERM_BASE + READ, libc::F_RDLCK).map_err(LockError::Io)?;
    if readonly {
        for p in UNSHARED {
            set(file, SHARED_BASE + p, libc::F_RDLCK).map_err(LockError::Io)?;
        }
    }
    // Both sides lock, then test: of two processes starting at once, at
    // least one sees the other.
    // Writers first, so a writer is named as one (a writer also refuses
    // other writers).
    if readonly && writer_present(file)? {
        return Err(LockError::Written);
    }
    if taken(file, SHARED_BASE + READ).map_err(LockError::Io)? {
        return Err(LockError::Read);
    }
    Ok(())
}

/// What an active writer refuses to share, as QEMU's virtio-blk does.
const UNSHARED: [i64; 2] = [WRITE, RESIZE];

/// Whether another process holds the write or resize permission.
fn writer_present(file: &File) -> Result<bool, LockError> {
    Ok(taken(file, PERM_BASE + WRITE).map_err(LockError::Io)?
        || taken(file, PERM_BASE + RESIZE).map_err(LockError::Io)?)
}

/// Takes the writer part of the lock, on a writable image already
/// [`lock`]ed: "I write, and nobody else may write or resize". Fails, and
/// holds only the idle part again, where another process writes the image
/// or refuses writers (a running device elsewhere, QEMU, qemu-img).
pub fn activate(file: &File) -> Result<(), LockError> {
    let r = (|| {
        set(file, PERM_BASE + WRITE, libc::F_RDLCK).map_err(LockError::Io)?;
        for p in UNSHARED {
            set(file, SHARED_BASE + p, libc::F_RDLCK).map_err(LockError::Io)?;
        }
        if writer_present(file)? {
            return Err(LockError::Written);
        }
        if taken(file, SHARED_BASE + WRITE).map_err(LockError::Io)? {
            return Err(LockError::Read);
        }
        Ok(())
    })();
    if r.is_err() {
        // Back to idle at once: holding half the writer part would block
        // the process we lost to.
        let _ = deactivate(file);
    }
    r
}

/// Drops the writer part: the image is shared again, as at start.
pub fn deactivate(file: &File) -> io::Result<()> {
    set(file, PERM_BASE + WRITE, libc::F_UNLCK)?;
    for p in UNSHARED {
        set(file, SHARED_BASE + p, libc::F_UNLCK)?;
    }
    Ok(())
}

fn flock_at(byte: i64, kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (l_pid must be
    // 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Takes a shared OFD lock on one byte (`F_RDLCK`), failing at once if it
/// conflicts, or drops it (`F_UNLCK`).
fn set(file: &File, byte: i64, kind: libc::c_int) -> io::Result<()> {
    let fl = flock_at(byte, kind);
    // SAFETY: F_OFD_SETLK reads one flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True if another open file holds a lock on `byte` (ours never conflict).
fn taken(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and writes one flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn detect_names_each_foreign_format_and_not_raw() {
        assert_eq!(detect(b"QFI\xfb\0\0\0\x03").unwrap().name, "qcow2");
        assert_eq!(detect(b"LUKS\xba\xbe\0\x02").unwrap().name, "luks");
        assert_eq!(detect(b"vhdxfile").unwrap().name, "vhdx");
        let mut vdi = [0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&VDI_SIGNATURE);
        assert_eq!(detect(&vdi).unwrap().name, "vdi");
        assert_eq!(detect(&[0u8; 512]), None);
        assert_eq!(detect(b"QF"), None);
        assert_eq!(detect(b""), None);
    }

    fn image() -> (tempfile_path::Path, File) {
        let p = tempfile_path::Path::new();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p.0)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        (p, f)
    }

    fn reopen(p: &tempfile_path::Path, write: bool) -> File {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(&p.0)
            .unwrap()
    }

    // OFD locks of two open file descriptions conflict even in one
    // process, so each `reopen` plays another daemon.

    #[test]
    fn idle_daemons_share_an_image_and_only_one_may_be_active() {
        let (p, first) = image();
        let second = reopen(&p, true);
        lock(&first, false).unwrap();
        lock(&second, false).unwrap();
        activate(&first).unwrap();
        // A third idle daemon (a swap target) still starts.
        lock(&reopen(&p, true), false).unwrap();
        assert!(matches!(activate(&second), Err(LockError::Written)));
        // A reader refuses writers: it cannot start beside an active one.
        assert!(matches!(
            lock(&reopen(&p, false), true),
            Err(LockError::Written)
        ));
        deactivate(&first).unwrap();
        activate(&second).unwrap();
        assert!(matches!(activate(&first), Err(LockError::Written)));
        // Closing the image (the daemon exits) drops its lock too.
        drop(second);
        activate_after_close(&first);
    }

    /// Activates `file` once a file just closed lets go: a test running
    /// beside this one may have forked (to exec `losetup`) while the closed
    /// file was open, and its child keeps that open file description, and
    /// so its locks, until the exec closes it.
    fn activate_after_close(file: &File) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match activate(file) {
                Ok(()) => return,
                Err(e) if std::time::Instant::now() >= deadline => {
                    panic!("still locked 5 s after the other file closed: {e:?}")
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }

    #[test]
    fn a_failed_activation_holds_nothing_that_blocks_the_winner() {
        let (p, first) = image();
        let second = reopen(&p, true);
        lock(&first, false).unwrap();
        lock(&second, false).unwrap();
        activate(&first).unwrap();
        assert!(activate(&second).is_err());
        deactivate(&first).unwrap();
        activate(&first).unwrap();
    }

    #[test]
    fn readers_share_and_keep_writers_from_activating() {
        let (p, w) = image();
        lock(&w, false).unwrap();
        let r1 = reopen(&p, false);
        let r2 = reopen(&p, false);
        lock(&r1, true).unwrap();
        lock(&r2, true).unwrap();
        assert!(matches!(activate(&w), Err(LockError::Read)));
        drop(r1);
        assert!(matches!(activate(&w), Err(LockError::Read)));
        drop(r2);
        activate_after_close(&w);
    }

    #[test]
    fn probe_reads_a_short_file() {
        let (p, f) = image();
        f.set_len(4).unwrap();
        f.write_all_at(b"QFI\xfb", 0).unwrap();
        assert_eq!(probe(&reopen(&p, false)).unwrap().unwrap().name, "qcow2");
    }

    /// A file in the temporary directory, removed on drop.
    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Path {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                Path(std::env::temp_dir().join(format!(
                    "bulkhead-image-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                )))
            }
        }
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }
}
