//! Backend daemons under test: `bulkhead-blk` and `qemu-storage-daemon`, each in
//! its own scratch directory with its own image, killed by pid when dropped.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{ChildGuard, workspace_binary};

/// How long a daemon may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// A scratch directory holding a disk image and the socket path a daemon listens on.
pub struct Scratch {
    dir: TempDir,
    image: PathBuf,
    socket: PathBuf,
}

impl Scratch {
    /// Creates a fresh directory with a zero-filled (sparse) image of `image_size` bytes.
    pub fn new(image_size: u64) -> io::Result<Self> {
        Self::new_in(&std::env::temp_dir(), image_size)
    }

    /// As [`Scratch::new`], in a directory under `parent` (e.g. `/dev/shm`,
    /// a tmpfs, where bulkhead-blk serves reads and writes in its queue
    /// threads).
    pub fn new_in(parent: &Path, image_size: u64) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-test")
            .tempdir_in(parent)?;
        let image = dir.path().join("disk.img");
        File::create(&image)?.set_len(image_size)?;
        let socket = dir.path().join("vhost.sock");
        Ok(Scratch { dir, image, socket })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The image file path.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Writes `data` into the image file at byte `offset`.
    pub fn write_image(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(&self.image)?;
        f.write_all_at(data, offset)?;
        f.sync_all()
    }

    /// Reads `len` bytes of the image file at byte `offset`.
    pub fn read_image(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        File::open(&self.image)?.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Panics unless each `(sector, data)` of `writes` is on the image.
    pub fn assert_holds<'a>(&self, writes: impl IntoIterator<Item = (u64, &'a [u8])>) {
        for (sector, data) in writes {
            let on_disk = self
                .read_image(sector * crate::blk::SECTOR_SIZE, data.len())
                .unwrap();
            assert!(
                on_disk == data,
                "write at sector {sector} missing from the image"
            );
        }
    }

    /// Bytes of disk the image file occupies (st_blocks * 512): drops when holes are punched.
    pub fn image_allocated(&self) -> io::Result<u64> {
        Ok(std::fs::metadata(&self.image)?.blocks() * 512)
    }
}

/// A running backend daemon; SIGKILLed and reaped on drop, then its scratch directory removed.
pub struct Daemon {
    guard: ChildGuard,
    scratch: Scratch,
}

impl Daemon {
    /// Starts `bulkhead-blk --socket-path S --image I <args>` in `scratch`.
    pub fn blk(scratch: Scratch, args: &[&str]) -> io::Result<Self> {
        let mut cmd = Command::new(workspace_binary("bulkhead-blk"));
        cmd.arg("--socket-path")
            .arg(scratch.socket())
            .arg("--image")
            .arg(scratch.image())
            .args(args);
        Self::start("bulkhead-blk", cmd, scratch)
    }

    /// Starts qemu-storage-daemon exporting the image as vhost-user-blk with `num_queues` queues.
    pub fn qsd(scratch: Scratch, num_queues: u16) -> io::Result<Self> {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                scratch.image().display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
                scratch.socket().display()
            ));
        Self::start("qemu-storage-daemon", cmd, scratch)
    }

    /// Spawns `cmd` and waits until the socket appears (or the process dies).
    pub fn start(name: &str, mut cmd: Command, scratch: Scratch) -> io::Result<Self> {
        let mut guard = ChildGuard::spawn_quiet(name, &mut cmd)?;
        wait_for_socket(name, &mut guard, scratch.socket())?;
        Ok(Daemon { guard, scratch })
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The socket the daemon listens on.
    pub fn socket(&self) -> &Path {
        self.scratch.socket()
    }

    /// The scratch directory and image.
    pub fn scratch(&self) -> &Scratch {
        &self.scratch
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.guard.pid() != 0 && matches!(self.guard.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` and reports whether the process is still running then.
    pub fn still_running_after(&mut self, timeout: Duration) -> bool {
        self.guard.pid() != 0 && matches!(self.guard.wait_timeout(timeout), Ok(None))
    }

    /// Kills the daemon (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        self.guard.kill().map(|_| ())
    }

    /// The underlying child guard.
    pub fn guard_mut(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// SIGKILLs the daemon and starts `cmd`, named `name`, in its place on
    /// the same scratch directory (socket and image); returns once the new
    /// one listens (the dead one's socket file is removed first, so the
    /// wait is for the new one's).
    pub fn restart(&mut self, name: &str, mut cmd: Command) -> io::Result<()> {
        self.guard.kill()?;
        match std::fs::remove_file(self.scratch.socket()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.guard = ChildGuard::spawn_quiet(name, &mut cmd)?;
        wait_for_socket(name, &mut self.guard, self.scratch.socket())
    }

    /// Kills the daemon (SIGKILL) and hands back its scratch directory, image
    /// and socket path intact, for a successor daemon.
    pub fn kill_keep_scratch(self) -> io::Result<Scratch> {
        let Daemon { mut guard, scratch } = self;
        guard.kill()?;
        // A SIGKILLed daemon leaves its socket file behind; the successor replaces it.
        Ok(scratch)
    }
}

/// Waits until `socket` exists, or fails if `guard`'s process exits first
/// or the time is up.
fn wait_for_socket(name: &str, guard: &mut ChildGuard, socket: &Path) -> io::Result<()> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while !socket.exists() {
        if let Some(st) = guard.try_wait()? {
            return Err(io::Error::other(format!(
                "{name} exited before creating its socket: {st}"
            )));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{name} did not create {}", socket.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
