//! Images on Ceph RBD (`--image rbd:POOL/IMAGE`): the cluster connection,
//! the open image and its exclusive lock. The I/O path is
//! `engine/rbd.rs`; the bindings are `rbd/sys.rs`.
//!
//! Ownership follows the file image lock (`image.rs`): a writable image is
//! opened at start, and its exclusive lock taken with
//! `rbd_lock_acquire(EXCLUSIVE)` when the device starts (its first queue,
//! [`Image::acquire_lock`]) and let go when the device stops (its last
//! queue, [`Image::release_lock`]). So a `ctl swap`'s, a launcher
//! restart's or a migration's new daemon starts beside the old one on the
//! same image, and takes the lock once the old one's queues have stopped,
//! waiting up to [`LOCK_WAIT`]; if the holder does not let go by then, the
//! queue does not start and the log names the holder. A client that
//! acquired the lock this way keeps it: every other writer's I/O fails
//! (`-EROFS`) until it lets go, and after letting go its own writes fail
//! the same way (librbd does not take the lock back by itself).
//!
//! `--break-lock` breaks off the holder at start (`rbd_lock_break`, which
//! also blocklists it at the OSDs, so a holder that is still alive can no
//! longer write: fencing). Without it, librbd itself breaks the lock of a
//! holder that is dead once its watch expires (about 30 s).

use std::ffi::{CStr, CString, c_char};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long the device's start waits for another holder of the lock to
/// let go (a swap's or migration's old daemon lets go once its queues
/// stop, within milliseconds).
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

pub(crate) mod sys;

/// Where an RBD image is: `rbd:POOL/IMAGE` on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    /// The pool.
    pub pool: String,
    /// The image in the pool.
    pub image: String,
}

impl ImageSpec {
    /// The prefix that marks an RBD image in `--image`.
    pub const PREFIX: &'static str = "rbd:";

    /// Parses `--image`: `Some` for `rbd:POOL/IMAGE`, an error for a bad
    /// one, `None` for a path.
    pub fn parse(arg: &Path) -> Option<Result<Self, String>> {
        let s = arg.to_str()?;
        let rest = s.strip_prefix(Self::PREFIX)?;
        Some(match rest.split_once('/') {
            Some((pool, image))
                if !pool.is_empty()
                    && !image.is_empty()
                    && !image.contains(['/', '@', '\0'])
                    && !pool.contains('\0') =>
            {
                Ok(ImageSpec {
                    pool: pool.to_string(),
                    image: image.to_string(),
                })
            }
            _ => Err(format!(
                "{s}: an RBD image is rbd:POOL/IMAGE (no snapshot); a file whose name starts \
                 with rbd: is ./rbd:..."
            )),
        })
    }
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}/{}", self.pool, self.image)
    }
}

/// How to reach the cluster and what to do with the lock.
#[derive(Clone, Debug, Default)]
pub struct RbdOptions {
    /// `--ceph-conf`: None searches as Ceph does ($CEPH_CONF,
    /// /etc/ceph/ceph.conf, ~/.ceph/ceph.conf, ./ceph.conf).
    pub conf: Option<PathBuf>,
    /// `--ceph-id`: the client name without `client.` (default admin).
    pub id: Option<String>,
    /// Open read-only and take no lock.
    pub readonly: bool,
    /// Break another client's exclusive lock (and blocklist it).
    pub break_lock: bool,
}

/// Why an RBD image cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// Setting up or connecting to the cluster failed.
    #[error(
        "cannot connect to the Ceph cluster ({step}); check --ceph-conf, --ceph-id and the keyring"
    )]
    Connect {
        /// What failed.
        step: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The pool or image cannot be opened.
    #[error("cannot open {what}")]
    Open {
        /// The image.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another client holds the exclusive lock.
    #[error(
        "{what} is locked by another client ({owners}), which did not let go within \
         {waited:?}; stop it (a swap's old daemon lets go once its queues stop), or restart \
         this daemon with --break-lock to break its lock and blocklist it (only when it is dead \
         or must be fenced off)"
    )]
    Locked {
        /// The image.
        what: String,
        /// The holders librbd names.
        owners: String,
        /// How long the device's start waited.
        waited: Duration,
    },
    /// The image cannot be locked: it lacks the feature.
    #[error(
        "{what} has no exclusive-lock feature, so this daemon cannot keep other writers off it; \
         enable it (rbd feature enable {what_plain} exclusive-lock) or serve it with --readonly"
    )]
    NoLockFeature {
        /// The image.
        what: String,
        /// POOL/IMAGE.
        what_plain: String,
    },
    /// Taking or breaking the lock failed.
    #[error("cannot take the exclusive lock of {what} ({step})")]
    Lock {
        /// The image.
        what: String,
        /// What failed.
        step: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn errno(ret: i32) -> io::Error {
    io::Error::from_raw_os_error(ret.saturating_neg())
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Blocks SIGTERM and SIGINT in the calling thread, so the threads librados
/// starts inherit the mask: the daemon takes those signals through its
/// signalfd (created later, blocking them only in threads started after
/// it), and one delivered to a librados thread would kill the process
/// before it lets go of the lock.
fn block_stop_signals() {
    // SAFETY: a sigset_t on the stack, initialised by sigemptyset before
    // use; pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut());
    }
}

/// A connected cluster handle with the pool's I/O context.
struct Cluster {
    rados: sys::rados_t,
    ioctx: sys::rados_ioctx_t,
}

impl Cluster {
    fn connect(opts: &RbdOptions, pool: &str) -> Result<Self, RbdError> {
        block_stop_signals();
        let fail = |step: &str, ret: i32| RbdError::Connect {
            step: step.to_string(),
            source: errno(ret),
        };
        let name = format!("client.{}", opts.id.as_deref().unwrap_or("admin"));
        let cname = cstring(&name).map_err(|source| RbdError::Connect {
            step: format!("client name {name}"),
            source,
        })?;
        let cluster_name = c"ceph";
        let mut rados: sys::rados_t = ptr::null_mut();
        // SAFETY: out-pointer to a local; the strings are NUL-terminated and
        // outlive the call (librados copies them).
        let ret =
            unsafe { sys::rados_create2(&mut rados, cluster_name.as_ptr(), cname.as_ptr(), 0) };
        if ret < 0 {
            return Err(fail("rados_create2", ret));
        }
        // From here `Drop` shuts the handle down (ioctx null until created).
        let mut cluster = Cluster {
            rados,
            ioctx: ptr::null_mut(),
        };
        let conf = match &opts.conf {
            Some(p) => {
                Some(
                    CString::new(p.as_os_str().as_bytes()).map_err(|_| RbdError::Connect {
                        step: format!("--ceph-conf {}", p.display()),
                        source: io::Error::from(io::ErrorKind::InvalidInput),
                    })?,
                )
            }
            None => None,
        };
        let conf_ptr = conf.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        // SAFETY: a live handle; a NUL-terminated path, or NULL for Ceph's search.
        let ret = unsafe { sys::rados_conf_read_file(cluster.rados, conf_ptr) };
        if ret < 0 {
            let what = match &opts.conf {
                Some(p) => format!("reading {}", p.display()),
                None => "finding ceph.conf ($CEPH_CONF, /etc/ceph/ceph.conf)".to_string(),
            };
            return Err(fail(&what, ret));
        }
        // The write cache off: a write completes once the OSDs have it, so
        // FUA needs nothing more and a flush has nothing to wait for.
        // SAFETY: a live handle; NUL-terminated strings.
        let ret =
            unsafe { sys::rados_conf_set(cluster.rados, c"rbd_cache".as_ptr(), c"false".as_ptr()) };
        if ret < 0 {
            return Err(fail("rados_conf_set rbd_cache", ret));
        }
        // Each request goes through librbd's layers in the queue thread that
        // submits it, not handed to librbd's one dispatch thread first
        // (`rbd_non_blocking_aio`, true by default): one thread wake-up less
        // per request (CPU per request against qsd's went from 0.91-1.05x
        // to 0.83-0.91x, docs/performance-notes.md). The layers queue what
        // must wait (the lock, a refresh) and return; librados sends from
        // its own threads.
        // What can hold the queue thread is librados' budget of operations
        // in flight (`objecter_inflight_ops`, `objecter_inflight_op_bytes`),
        // until the OSDs answer; with the hand-off the dispatch thread
        // would wait there instead, for every queue at once.
        // SAFETY: a live handle; NUL-terminated strings.
        let ret = unsafe {
            sys::rados_conf_set(
                cluster.rados,
                c"rbd_non_blocking_aio".as_ptr(),
                c"false".as_ptr(),
            )
        };
        if ret < 0 {
            return Err(fail("rados_conf_set rbd_non_blocking_aio", ret));
        }
        // SAFETY: a configured handle.
        let ret = unsafe { sys::rados_connect(cluster.rados) };
        if ret < 0 {
            return Err(fail(&format!("rados_connect as {name}"), ret));
        }
        let cpool = cstring(pool).map_err(|source| RbdError::Open {
            what: format!("pool {pool}"),
            source,
        })?;
        // SAFETY: a connected handle; out-pointer to a field of ours.
        let ret =
            unsafe { sys::rados_ioctx_create(cluster.rados, cpool.as_ptr(), &mut cluster.ioctx) };
        if ret < 0 {
            cluster.ioctx = ptr::null_mut();
            return Err(RbdError::Open {
                what: format!("pool {pool}"),
                source: errno(ret),
            });
        }
        Ok(cluster)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.ioctx.is_null() {
            // SAFETY: created by rados_ioctx_create; every image on it is closed.
            unsafe { sys::rados_ioctx_destroy(self.ioctx) };
        }
        // SAFETY: created by rados_create2, not used after this.
        unsafe { sys::rados_shutdown(self.rados) };
    }
}

/// An open RBD image, shared by every queue's engine.
pub struct Image {
    handle: sys::rbd_image_t,
    /// Size in bytes.
    pub size: u64,
    /// What it is, for messages.
    pub spec: ImageSpec,
    /// Opened for writing: the device takes the exclusive lock while it runs.
    writable: bool,
    /// This client holds the exclusive lock.
    held: AtomicBool,
    /// Dropped after the image is closed.
    _cluster: Cluster,
}

// SAFETY: librbd's C API may be called on one image from any thread at
// once (QEMU and qemu-storage-daemon do); the handle is only closed in Drop.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Connects, opens `spec` and (unless read-only) takes its exclusive lock.
    pub fn open(spec: &ImageSpec, opts: &RbdOptions) -> Result<Self, RbdError> {
        let cluster = Cluster::connect(opts, &spec.pool)?;
        let what = spec.to_string();
        let open_err = |source| RbdError::Open {
            what: what.clone(),
            source,
        };
        let name = cstring(&spec.image).map_err(open_err)?;
        let mut handle: sys::rbd_image_t = ptr::null_mut();
        // SAFETY: a live ioctx; NUL-terminated name; no snapshot (NULL);
        // out-pointer to a local.
        let ret = unsafe {
            if opts.readonly {
                sys::rbd_open_read_only(cluster.ioctx, name.as_ptr(), &mut handle, ptr::null())
            } else {
                sys::rbd_open(cluster.ioctx, name.as_ptr(), &mut handle, ptr::null())
            }
        };
        if ret < 0 {
            return Err(open_err(errno(ret)));
        }
        let mut image = Image {
            handle,
            size: 0,
            spec: spec.clone(),
            writable: !opts.readonly,
            held: AtomicBool::new(false),
            _cluster: cluster,
        };
        // SAFETY: an open image; out-pointer to a field of ours.
        let ret = unsafe { sys::rbd_get_size(image.handle, &mut image.size) };
        if ret < 0 {
            return Err(open_err(errno(ret)));
        }
        if !opts.readonly {
            image.check_lock(opts.break_lock)?;
        }
        Ok(image)
    }

    /// What `--check` reports: connects, opens the image as the daemon
    /// would (taking no lock, breaking none, writing nothing) and, for a
    /// writer, checks it has the exclusive-lock feature and names who holds
    /// the lock now (a start waits for that holder to let go). An error is
    /// what the start would fail on: no cluster, no pool, no image, no lock
    /// feature.
    pub fn probe(spec: &ImageSpec, opts: &RbdOptions) -> Result<String, RbdError> {
        let look = RbdOptions {
            break_lock: false,
            ..opts.clone()
        };
        let image = Image::open(spec, &look)?;
        let mut what = format!("{spec}: {} bytes", image.size);
        if !opts.readonly {
            let owners = image
                .owners()
                .map_err(|e| image.lock_error("rbd_lock_get_owners", e))?;
            if owners.is_empty() {
                what.push_str(", exclusive lock free");
            } else {
                what.push_str(&format!(
                    ", exclusive lock held by {} ({})",
                    owners.join(", "),
                    if opts.break_lock {
                        "--break-lock would break it"
                    } else {
                        "a start waits for it to let go"
                    }
                ));
            }
        }
        Ok(what)
    }

    /// The raw handle for the engine.
    pub(crate) fn handle(&self) -> sys::rbd_image_t {
        self.handle
    }

    /// The current holders of the exclusive lock (empty if none).
    fn owners(&self) -> io::Result<Vec<String>> {
        let mut names: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut count = names.len();
        let mut mode: sys::rbd_lock_mode_t = 0;
        // SAFETY: an open image; `names` has room for `count` pointers.
        let ret = unsafe {
            sys::rbd_lock_get_owners(self.handle, &mut mode, names.as_mut_ptr(), &mut count)
        };
        if ret == -libc::ENOENT {
            return Ok(Vec::new());
        }
        if ret < 0 {
            return Err(errno(ret));
        }
        let count = count.min(names.len());
        let owners = names[..count]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: librbd filled these with NUL-terminated strings.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: the `count` strings librbd allocated above, freed once.
        unsafe { sys::rbd_lock_get_owners_cleanup(names.as_mut_ptr(), count) };
        Ok(owners)
    }

    /// At start: refuses an image without the exclusive-lock feature, and
    /// with `break_lock` breaks off (and blocklists) whoever holds the lock.
    /// Another holder is otherwise left alone: the device waits for it to
    /// let go when it starts ([`Image::acquire_lock`]).
    fn check_lock(&self, break_lock: bool) -> Result<(), RbdError> {
        let what = self.spec.to_string();
        let owners = self
            .owners()
            .map_err(|e| self.lock_error("rbd_lock_get_owners", e))?;
        if owners.is_empty() {
            return Ok(());
        }
        if !break_lock {
            log::info!(
                "{what}: the exclusive lock is held by {}; this daemon takes it when its device \
                 starts, once that holder lets go (waiting up to {LOCK_WAIT:?})",
                owners.join(", ")
            );
            return Ok(());
        }
        for owner in &owners {
            log::warn!(
                "{what}: breaking the exclusive lock of {owner} (--break-lock); it is blocklisted"
            );
            let c = cstring(owner).map_err(|e| self.lock_error("owner name", e))?;
            // SAFETY: an open image; a NUL-terminated owner name.
            let ret = unsafe {
                sys::rbd_lock_break(self.handle, sys::RBD_LOCK_MODE_EXCLUSIVE, c.as_ptr())
            };
            if ret < 0 && ret != -libc::ENOENT {
                return Err(self.lock_error("rbd_lock_break", errno(ret)));
            }
        }
        Ok(())
    }

    /// What a failed lock call means: no exclusive-lock feature (EINVAL),
    /// or the call's error.
    fn lock_error(&self, step: &'static str, e: io::Error) -> RbdError {
        if e.raw_os_error() == Some(libc::EINVAL) {
            RbdError::NoLockFeature {
                what: self.spec.to_string(),
                what_plain: format!("{}/{}", self.spec.pool, self.spec.image),
            }
        } else {
            RbdError::Lock {
                what: self.spec.to_string(),
                step,
                source: e,
            }
        }
    }

    /// The device starts: takes the exclusive lock, waiting up to `wait`
    /// while another client holds it. Nothing to do when read-only or held.
    pub fn acquire_lock(&self, wait: Duration) -> Result<(), RbdError> {
        if !self.writable || self.held.load(Ordering::SeqCst) {
            return Ok(());
        }
        let what = self.spec.to_string();
        let start = Instant::now();
        let mut told = false;
        loop {
            // rbd_lock_acquire on a lock another client holds asks that
            // client for it and blocks (up to its watch timeout, about
            // 30 s) when it refuses: wait for the holder to let go first.
            let owners = self
                .owners()
                .map_err(|e| self.lock_error("rbd_lock_get_owners", e))?;
            if !owners.is_empty() {
                if start.elapsed() >= wait {
                    return Err(RbdError::Locked {
                        what,
                        owners: owners.join(", "),
                        waited: wait,
                    });
                }
                if !told {
                    log::info!(
                        "{what}: the exclusive lock is held by {}; waiting up to {wait:?} for it",
                        owners.join(", ")
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            // SAFETY: an open image.
            let ret = unsafe { sys::rbd_lock_acquire(self.handle, sys::RBD_LOCK_MODE_EXCLUSIVE) };
            if ret >= 0 {
                self.held.store(true, Ordering::SeqCst);
                log::info!("{what}: exclusive lock taken");
                return Ok(());
            }
            // Another client took it first: wait for it as above.
            if start.elapsed() >= wait || self.owners().map_or(true, |o| o.is_empty()) {
                return Err(self.lock_error("rbd_lock_acquire", errno(ret)));
            }
        }
    }

    /// The device stopped (or serving ended): lets go of the exclusive
    /// lock, so the next daemon takes it without waiting or `--break-lock`.
    /// Nothing to do when it is not held.
    pub fn release_lock(&self) {
        if !self.held.swap(false, Ordering::SeqCst) {
            return;
        }
        // SAFETY: an open image.
        let ret = unsafe { sys::rbd_lock_release(self.handle) };
        if ret < 0 {
            log::warn!(
                "{}: cannot release the exclusive lock: {}",
                self.spec,
                errno(ret)
            );
        } else {
            log::info!("{}: exclusive lock released", self.spec);
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened in `open`; every engine holding an Arc is gone, so
        // no operation is in flight. Closing releases the lock.
        unsafe { sys::rbd_close(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_specs_parse_and_paths_are_not_specs() {
        assert_eq!(
            ImageSpec::parse(Path::new("rbd:pool/img")),
            Some(Ok(ImageSpec {
                pool: "pool".into(),
                image: "img".into()
            }))
        );
        assert!(ImageSpec::parse(Path::new("/var/lib/disk.img")).is_none());
        assert!(ImageSpec::parse(Path::new("./rbd:pool/img")).is_none());
        for bad in [
            "rbd:",
            "rbd:pool",
            "rbd:/img",
            "rbd:pool/",
            "rbd:p/a/b",
            "rbd:p/i@snap",
        ] {
            assert!(
                matches!(ImageSpec::parse(Path::new(bad)), Some(Err(_))),
                "{bad}"
            );
        }
    }
}
