//! Throttle groups: one set of I/O limits shared by several daemons on one
//! host, like qemu-storage-daemon's throttle groups but across processes.
//!
//! The group is a small file (best on a tmpfs such as `/run`) that every
//! member maps shared: the group's limits and its buckets' levels live
//! there, so the members' requests together are held to the limits. The
//! first daemon to open a new file sets its limits; a later one that names
//! limits of its own must name the same (or none, and takes the group's).
//! A run-time change through any member's stats socket changes the group.
//!
//! What one member may do to the others: the file is writable by every
//! member, so a compromised one can rewrite it. Every value read from it is
//! checked before use (limits validated, levels clamped to at most one
//! minute of debt, a lock held too long taken over), so the worst a member
//! can do is what its guest could do anyway: use the whole group's budget.
//! Groups are for daemons that share one owner's budget, not a wall
//! between tenants.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::throttle::{Limit, Limits};

/// "BHTHRGP1": a Bulkhead throttle group, layout 1.
const MAGIC: u64 = u64::from_le_bytes(*b"BHTHRGP1");
/// The file's size: one page.
const FILE_LEN: usize = 4096;
/// Words before the limits: magic, kind, lock, generation.
const HEADER_WORDS: usize = 4;
/// Words of one bucket: level (low, high), last refill.
const BUCKET_WORDS: usize = 3;
/// How long a member may hold the group's lock before another takes it
/// over (a member killed inside its few hundred nanoseconds of update).
const LOCK_TAKEOVER: Duration = Duration::from_millis(50);
/// The most debt a level read from the file may show, in seconds of its
/// rate: a member that wrote more is not believed.
const MAX_DEBT_SECS: i128 = 60;

/// Why a group file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// Opening, sizing or mapping the file failed.
    #[error("throttle group {0}: {1}")]
    Io(PathBuf, io::Error),
    /// The file is not a throttle group of this layout.
    #[error("throttle group {0}: not a Bulkhead throttle group file ({1})")]
    NotAGroup(PathBuf, &'static str),
    /// The group serves another kind of device.
    #[error("throttle group {0} is a group of {1} daemons, not {2}")]
    Kind(PathBuf, &'static str, &'static str),
    /// This daemon's limits differ from the group's.
    #[error(
        "throttle group {0} has other limits ({1}); start without limits to join it, \
         or change the group's through a member's stats socket"
    )]
    Limits(PathBuf, String),
    /// The group's limits in the file make no sense.
    #[error("throttle group {0} holds limits that make no sense: {1}")]
    Invalid(PathBuf, String),
}

/// Which daemons a group's limits are for: the same six limits mean
/// different things in blk (reads, writes) and net (receive, transmit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// bulkhead-blk.
    Blk,
    /// bulkhead-net.
    Net,
}

impl GroupKind {
    fn word(self) -> u64 {
        match self {
            GroupKind::Blk => 2,
            GroupKind::Net => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            GroupKind::Blk => "bulkhead-blk",
            GroupKind::Net => "bulkhead-net",
        }
    }

    fn from_word(w: u64) -> Option<GroupKind> {
        match w {
            2 => Some(GroupKind::Blk),
            1 => Some(GroupKind::Net),
            _ => None,
        }
    }
}

/// One bucket as the group keeps it: the level in nano-tokens (may be
/// negative: debt) and when it was last refilled, in `CLOCK_MONOTONIC` ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedLevel {
    /// Nano-tokens.
    pub level: i128,
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub last_ns: u64,
}

/// A mapped group file.
pub struct Group {
    path: PathBuf,
    words: NonNull<AtomicU64>,
    /// Kept open for the mapping's life (and for the log's sake).
    _file: File,
    /// The limits last read from the file that made sense.
    last_good: std::sync::Mutex<Limits>,
}

// SAFETY: the mapping is only accessed through atomics, and stays mapped
// until the Group is dropped.
unsafe impl Send for Group {}
// SAFETY: as above: shared access goes through `AtomicU64`s only.
unsafe impl Sync for Group {}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("path", &self.path).finish()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `words` is the start of a FILE_LEN mapping made in `open`
        // and nothing uses it after the Group is gone.
        unsafe {
            libc::munmap(self.words.as_ptr().cast(), FILE_LEN);
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the one clock every member shares.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

impl Group {
    /// Opens (creating it if need be) the group file at `path` for a daemon
    /// of `kind` with its own `limits` ([`Limits::NONE`]: take the group's).
    /// A new file gets `limits`; an existing one must hold the same, or
    /// `limits` must be none. Called before the sandbox.
    pub fn open(path: &Path, kind: GroupKind, limits: Limits) -> Result<Group, GroupError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| GroupError::Io(path.to_path_buf(), e))?;
        Self::from_file(file, path, kind, limits, false)
    }

    /// [`Group::open`] for a group file handed over as an open fd (the
    /// launcher's: a memfd, sealed here against shrinking and growing so no
    /// member can take the mapping away from the others). The launcher
    /// gives every member the same limits, so limits that differ from the
    /// group's were changed at run time: they hold, for a restarted member
    /// too.
    pub fn from_fd(fd: OwnedFd, kind: GroupKind, limits: Limits) -> Result<Group, GroupError> {
        let name = PathBuf::from(format!("fd {}", fd.as_raw_fd()));
        Self::from_file(File::from(fd), &name, kind, limits, true)
    }

    fn from_file(
        file: File,
        path: &Path,
        kind: GroupKind,
        limits: Limits,
        adopt: bool,
    ) -> Result<Group, GroupError> {
        let err = |e| GroupError::Io(path.to_path_buf(), e);
        let meta = file.metadata().map_err(err)?;
        if !meta.file_type().is_file() {
            return Err(GroupError::NotAGroup(
                path.to_path_buf(),
                "not a regular file",
            ));
        }
        // One member at a time sets a new file up.
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let len = file.metadata().map_err(err)?.len();
        if len == 0 {
            file.set_len(FILE_LEN as u64).map_err(err)?;
        } else if len != FILE_LEN as u64 {
            return Err(GroupError::NotAGroup(path.to_path_buf(), "wrong size"));
        }
        // A memfd is sealed so that no member can shrink it under the
        // others' mappings (SIGBUS); a file on a file system cannot be
        // (EINVAL), and its members must trust each other that far.
        // SAFETY: fcntl on an fd we own, with an integer argument.
        unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        // SAFETY: a shared mapping of FILE_LEN bytes of a file that is
        // FILE_LEN long; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err(io::Error::last_os_error()));
        }
        let words = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| err(io::Error::other("mmap returned null")))?;
        let group = Group {
            path: path.to_path_buf(),
            words,
            _file: file,
            last_good: std::sync::Mutex::new(limits),
        };
        // A file of zeros is new, or its first member died setting it up
        // (the magic is written last).
        let joined = if group.word(0).load(Ordering::Acquire) == 0 {
            group.word(1).store(kind.word(), Ordering::Relaxed);
            group.write_limits(&limits);
            group.fill_buckets(&limits, monotonic_ns());
            group.word(0).store(MAGIC, Ordering::Release);
            Ok(())
        } else {
            group.check_joins(kind, limits, adopt)
        };
        // SAFETY: flock on an fd the group owns.
        unsafe { libc::flock(group._file.as_raw_fd(), libc::LOCK_UN) };
        joined.map(|()| group)
    }

    fn check_joins(&self, kind: GroupKind, limits: Limits, adopt: bool) -> Result<(), GroupError> {
        if self.word(0).load(Ordering::Acquire) != MAGIC {
            return Err(GroupError::NotAGroup(self.path.clone(), "no magic"));
        }
        match GroupKind::from_word(self.word(1).load(Ordering::Relaxed)) {
            Some(k) if k == kind => {}
            Some(k) => return Err(GroupError::Kind(self.path.clone(), k.name(), kind.name())),
            None => return Err(GroupError::NotAGroup(self.path.clone(), "unknown kind")),
        }
        let theirs = self.read_limits();
        theirs
            .validate()
            .map_err(|e| GroupError::Invalid(self.path.clone(), e.to_string()))?;
        if limits.any() && limits != theirs {
            if !adopt {
                return Err(GroupError::Limits(self.path.clone(), format!("{theirs:?}")));
            }
            log::info!(
                "throttle group {}: its limits were changed at run time; they hold",
                self.path.display()
            );
        }
        *self.last_good_lock() = theirs;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < FILE_LEN / 8, "group word {i} out of the page");
        // SAFETY: `i` is within the FILE_LEN mapping (checked above), the
        // mapping is page-aligned so every word is aligned, and it lives as
        // long as `self`.
        unsafe { &*self.words.as_ptr().add(i) }
    }

    fn last_good_lock(&self) -> std::sync::MutexGuard<'_, Limits> {
        match self.last_good.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn limit_words(i: usize) -> (usize, usize) {
        (HEADER_WORDS + 2 * i, HEADER_WORDS + 2 * i + 1)
    }

    fn bucket_words(i: usize) -> usize {
        HEADER_WORDS + 12 + BUCKET_WORDS * i
    }

    fn read_limits(&self) -> Limits {
        let mut l = Limits::NONE;
        for (i, f) in fields_mut(&mut l).into_iter().enumerate() {
            let (r, b) = Self::limit_words(i);
            *f = Limit {
                rate: self.word(r).load(Ordering::Relaxed),
                burst: self.word(b).load(Ordering::Relaxed),
            };
        }
        l
    }

    fn write_limits(&self, limits: &Limits) {
        let mut l = *limits;
        for (i, f) in fields_mut(&mut l).into_iter().enumerate() {
            let (r, b) = Self::limit_words(i);
            self.word(r).store(f.rate, Ordering::Relaxed);
            self.word(b).store(f.burst, Ordering::Relaxed);
        }
    }

    fn fill_buckets(&self, limits: &Limits, now: u64) {
        let mut l = *limits;
        for (i, f) in fields_mut(&mut l).into_iter().enumerate() {
            let full = i128::from(f.bucket()) * 1_000_000_000;
            self.store_level(
                i,
                SharedLevel {
                    level: full,
                    last_ns: now,
                },
            );
        }
    }

    fn load_level(&self, i: usize) -> SharedLevel {
        let w = Self::bucket_words(i);
        let lo = self.word(w).load(Ordering::Relaxed);
        let hi = self.word(w + 1).load(Ordering::Relaxed);
        SharedLevel {
            level: ((i128::from(hi as i64)) << 64) | i128::from(lo),
            last_ns: self.word(w + 2).load(Ordering::Relaxed),
        }
    }

    fn store_level(&self, i: usize, s: SharedLevel) {
        let w = Self::bucket_words(i);
        self.word(w).store(s.level as u64, Ordering::Relaxed);
        self.word(w + 1)
            .store((s.level >> 64) as i64 as u64, Ordering::Relaxed);
        self.word(w + 2).store(s.last_ns, Ordering::Relaxed);
    }

    /// Takes the group's lock: a word holding the holder's pid and a count.
    /// A holder that keeps it past [`LOCK_TAKEOVER`] (killed inside its
    /// update) loses it to the next member.
    fn lock(&self) -> GroupGuard<'_> {
        let lock = self.word(2);
        // Unique among this process's lockers (never 0: the free value).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let me = (u64::from(std::process::id()) << 32)
            | u64::from(NEXT.fetch_add(1, Ordering::Relaxed) | 1);
        let mut seen = (0u64, Instant::now());
        let mut spins = 0u32;
        loop {
            match lock.compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return GroupGuard { group: self, me },
                Err(0) => continue,
                Err(held) => {
                    if held != seen.0 {
                        seen = (held, Instant::now());
                    } else if seen.1.elapsed() > LOCK_TAKEOVER
                        && lock
                            .compare_exchange(held, me, Ordering::Acquire, Ordering::Relaxed)
                            .is_ok()
                    {
                        crate::rate_limited!(
                            log::Level::Warn,
                            "throttle group {}: took over a lock held for over {:?} by pid {}",
                            self.path.display(),
                            LOCK_TAKEOVER,
                            held >> 32
                        );
                        return GroupGuard { group: self, me };
                    }
                }
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Runs `f` on the group's limits and bucket levels under its lock and
    /// stores the levels `f` leaves. Limits that make no sense (a member
    /// wrote them) are replaced by the last good ones; levels are clamped
    /// to between a full bucket and [`MAX_DEBT_SECS`] of debt.
    pub fn with_levels<R>(&self, f: impl FnOnce(&Limits, &mut [SharedLevel; 6]) -> R) -> R {
        let _g = self.lock();
        let mut limits = self.read_limits();
        if limits.validate().is_ok() {
            *self.last_good_lock() = limits;
        } else {
            limits = *self.last_good_lock();
            self.write_limits(&limits);
        }
        let mut levels = [SharedLevel {
            level: 0,
            last_ns: 0,
        }; 6];
        let now = monotonic_ns();
        let mut l = limits;
        for (i, lim) in fields_mut(&mut l).into_iter().enumerate() {
            let mut s = self.load_level(i);
            // A refill time in the future would stop the bucket refilling.
            s.last_ns = s.last_ns.min(now);
            let cap = i128::from(lim.bucket()) * 1_000_000_000;
            let floor = -cap - i128::from(lim.rate) * 1_000_000_000 * MAX_DEBT_SECS;
            s.level = s.level.clamp(floor, cap);
            levels[i] = s;
        }
        let r = f(&limits, &mut levels);
        for (i, s) in levels.iter().enumerate() {
            self.store_level(i, *s);
        }
        r
    }

    /// The group's limits.
    pub fn limits(&self) -> Limits {
        self.with_levels(|l, _| *l)
    }

    /// Replaces the group's limits for every member; the buckets start full.
    pub fn set_limits(&self, limits: &Limits) {
        let _g = self.lock();
        self.write_limits(limits);
        self.fill_buckets(limits, monotonic_ns());
        *self.last_good_lock() = *limits;
        self.word(3).fetch_add(1, Ordering::Relaxed);
    }
}

fn fields_mut(l: &mut Limits) -> [&mut Limit; 6] {
    [
        &mut l.iops_total,
        &mut l.iops_read,
        &mut l.iops_write,
        &mut l.bps_total,
        &mut l.bps_read,
        &mut l.bps_write,
    ]
}

struct GroupGuard<'a> {
    group: &'a Group,
    me: u64,
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        // Only our own lock: one taken over from us stays the taker's.
        let _ =
            self.group
                .word(2)
                .compare_exchange(self.me, 0, Ordering::Release, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::{Cost, Direction, Throttle};

    /// A group file in a fresh directory, removed afterwards.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new() -> Self {
            use std::sync::atomic::AtomicU32;
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "bulkhead-throttle-group-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).expect("temp dir");
            Scratch(p)
        }
        fn file(&self) -> PathBuf {
            self.0.join("group")
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn iops(rate: u64, burst: u64) -> Limits {
        Limits {
            iops_total: Limit { rate, burst },
            ..Limits::NONE
        }
    }

    const READ: Cost = Cost {
        dir: Direction::Read,
        bytes: 512,
    };

    #[test]
    fn the_first_member_sets_the_limits_and_the_others_take_or_match_them() {
        let d = Scratch::new();
        let a = Group::open(&d.file(), GroupKind::Blk, iops(100, 0)).expect("create");
        assert_eq!(a.limits(), iops(100, 0));
        let b = Group::open(&d.file(), GroupKind::Blk, Limits::NONE).expect("join");
        assert_eq!(b.limits(), iops(100, 0));
        Group::open(&d.file(), GroupKind::Blk, iops(100, 0)).expect("same limits join");
        let other = Group::open(&d.file(), GroupKind::Blk, iops(200, 0));
        assert!(matches!(other, Err(GroupError::Limits(..))), "{other:?}");
        let net = Group::open(&d.file(), GroupKind::Net, Limits::NONE);
        assert!(matches!(net, Err(GroupError::Kind(..))), "{net:?}");
    }

    #[test]
    fn a_file_that_is_not_a_group_is_refused() {
        let d = Scratch::new();
        std::fs::write(d.file(), b"hello").expect("write");
        let r = Group::open(&d.file(), GroupKind::Blk, Limits::NONE);
        assert!(matches!(r, Err(GroupError::NotAGroup(..))), "{r:?}");
        let mut junk = vec![0u8; FILE_LEN];
        junk[0] = 1;
        std::fs::write(d.file(), junk).expect("write");
        let r = Group::open(&d.file(), GroupKind::Blk, Limits::NONE);
        assert!(matches!(r, Err(GroupError::NotAGroup(..))), "{r:?}");
        // All zeros: a first member died setting it up; the next one does.
        std::fs::write(d.file(), vec![0u8; FILE_LEN]).expect("write");
        let g = Group::open(&d.file(), GroupKind::Blk, iops(5, 0)).expect("set up again");
        assert_eq!(g.limits(), iops(5, 0));
        let r = Group::open(&d.0, GroupKind::Blk, Limits::NONE);
        assert!(r.is_err(), "a directory: {r:?}");
    }

    #[test]
    fn a_memfd_group_is_sealed_against_shrinking() {
        // SAFETY: a memfd of our own, owned at once.
        let fd = unsafe { libc::memfd_create(c"group".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh fd no one else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let dup = fd.try_clone().expect("dup");
        let again = fd.try_clone().expect("dup");
        let g = Group::from_fd(fd, GroupKind::Blk, iops(3, 0)).expect("memfd group");
        let f = File::from(dup);
        assert!(f.set_len(0).is_err(), "a member could shrink the group");
        assert_eq!(g.limits(), iops(3, 0));
        // Changed at run time, then a member restarted by the launcher
        // with the configured limits: the group's hold.
        g.set_limits(&iops(7, 0));
        let restarted = Group::from_fd(again, GroupKind::Blk, iops(3, 0)).expect("rejoin");
        assert_eq!(restarted.limits(), iops(7, 0));
    }

    #[test]
    fn members_draw_from_one_bucket() {
        let d = Scratch::new();
        // 1 request/s with a bucket of 4: four go at once, from either member.
        let a = Throttle::grouped(Group::open(&d.file(), GroupKind::Blk, iops(1, 4)).expect("a"));
        let b = Throttle::grouped(Group::open(&d.file(), GroupKind::Blk, Limits::NONE).expect("b"));
        for t in [&a, &b, &a, &b] {
            assert!(t.admit((), READ).is_ok());
        }
        let held = b.admit((), READ).expect_err("the group's bucket is empty");
        assert!(
            held.wait() > Duration::from_millis(500),
            "{:?}",
            held.wait()
        );
        assert!(a.admit((), READ).is_err());
    }

    #[test]
    fn a_limit_changed_through_one_member_holds_for_all() {
        let d = Scratch::new();
        let a = Throttle::grouped(Group::open(&d.file(), GroupKind::Net, iops(1, 1)).expect("a"));
        let b = Throttle::grouped(Group::open(&d.file(), GroupKind::Net, Limits::NONE).expect("b"));
        assert!(b.admit((), READ).is_ok());
        assert!(b.admit((), READ).is_err());
        a.set_limits(Limits::NONE).expect("lift");
        assert_eq!(b.limits(), Limits::NONE);
        for _ in 0..100 {
            assert!(b.admit((), READ).is_ok());
        }
        assert!(a.set_limits(iops(0, 5)).is_err(), "nonsense is refused");
    }

    #[test]
    fn what_a_rogue_member_writes_is_bounded() {
        let d = Scratch::new();
        let g = Group::open(&d.file(), GroupKind::Blk, iops(10, 0)).expect("create");
        let t = Throttle::grouped(Group::open(&d.file(), GroupKind::Blk, Limits::NONE).expect("b"));
        // Endless debt and a refill time far in the future.
        g.store_level(
            0,
            SharedLevel {
                level: i128::MIN / 2,
                last_ns: u64::MAX,
            },
        );
        let held = t.admit((), READ).expect_err("in debt");
        let most = Duration::from_secs(MAX_DEBT_SECS as u64 + 1);
        assert!(held.wait() <= most, "waits {:?}", held.wait());
        // Limits that make no sense: the last good ones stay.
        g.word(HEADER_WORDS).store(0, Ordering::Relaxed);
        g.word(HEADER_WORDS + 1).store(7, Ordering::Relaxed);
        assert_eq!(t.limits(), iops(10, 0));
        // A lock its holder never gives back is taken over.
        g.word(2).store(0xdead_0000_0001, Ordering::Relaxed);
        let start = Instant::now();
        assert_eq!(t.limits(), iops(10, 0));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
