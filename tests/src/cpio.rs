//! Uncompressed "newc" cpio archives, the format of a Linux initramfs.
//!
//! Linux unpacks archives laid end to end, later entries replacing earlier
//! ones, so a test adds its files to a base initramfs by appending one more
//! archive. [`NewcWriter`] streams entries to any writer (the nested host's
//! layer is hundreds of MiB of files copied from disk);
//! [`crate::guest::newc_archive`] builds a small one in memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

/// Mode bits of a directory and of a regular file.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

/// Writes a newc archive entry by entry; [`NewcWriter::finish`] ends it.
pub struct NewcWriter<W: Write> {
    out: W,
    /// Bytes written so far (entries are 4-byte aligned).
    at: u64,
    ino: u32,
    /// Directories already written, so each is written once.
    dirs: Vec<String>,
}

impl<W: Write> NewcWriter<W> {
    /// A new archive written to `out`.
    pub fn new(out: W) -> Self {
        NewcWriter {
            out,
            at: 0,
            ino: 0x4000_0000,
            dirs: Vec::new(),
        }
    }

    /// Adds a regular file at `path` (relative to the root; leading `/`
    /// ignored) with permission bits `mode` and contents `data`, writing
    /// the directories above it first.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let name = self.parents(path)?;
        self.header(&name, S_IFREG | (mode & 0o7777), data.len())?;
        self.out.write_all(data)?;
        self.at += data.len() as u64;
        self.pad()
    }

    /// Adds the file at `src` on this machine as `path`, with its own
    /// permission bits, streaming its contents.
    pub fn copy(&mut self, path: &str, src: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mut f = File::open(src)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        let meta = f.metadata()?;
        let len = usize::try_from(meta.len())
            .ok()
            .filter(|&l| u32::try_from(l).is_ok())
            .ok_or_else(|| io::Error::other(format!("{} is over 4 GiB", src.display())))?;
        let name = self.parents(path)?;
        self.header(&name, S_IFREG | (meta.permissions().mode() & 0o7777), len)?;
        let copied = io::copy(&mut (&mut f).take(len as u64), &mut self.out)?;
        if copied != len as u64 {
            return Err(io::Error::other(format!(
                "{} shrank while being archived",
                src.display()
            )));
        }
        self.at += copied;
        self.pad()
    }

    /// Ends the archive with its trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0)?;
        self.pad()?;
        Ok(self.out)
    }

    /// Writes every directory above `path` not yet written; returns the
    /// normalised path.
    fn parents(&mut self, path: &str) -> io::Result<String> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut prefix = String::new();
        for dir in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(dir);
            if !self.dirs.contains(&prefix) {
                self.dirs.push(prefix.clone());
                let p = prefix.clone();
                self.header(&p, S_IFDIR | 0o755, 0)?;
                self.pad()?;
            }
        }
        Ok(parts.join("/"))
    }

    /// One entry's header and name, padded; the data follows.
    fn header(&mut self, name: &str, mode: u32, size: usize) -> io::Result<()> {
        self.ino += 1;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(size).map_err(|_| io::Error::other("entry over 4 GiB"))?,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        let mut h = Vec::with_capacity(110 + name.len() + 4);
        h.extend_from_slice(b"070701");
        for v in fields {
            h.extend_from_slice(format!("{v:08X}").as_bytes());
        }
        h.extend_from_slice(name.as_bytes());
        h.push(0);
        self.out.write_all(&h)?;
        self.at += h.len() as u64;
        self.pad()
    }

    /// Zero bytes up to the next 4-byte boundary.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.at % 4) % 4;
        self.out.write_all(&[0u8; 3][..n as usize])?;
        self.at += n;
        Ok(())
    }
}
