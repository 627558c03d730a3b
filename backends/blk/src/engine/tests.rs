//! Behaviour tests run against both engines on temporary files.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bulkhead_tests::skip::{SkipReason, skip};

use super::{Completion, Engine, EngineKind, Op, is_queue_full, new_engine};

/// A scratch image file, removed on drop.
struct TempImage {
    path: PathBuf,
    file: Arc<File>,
}

impl TempImage {
    /// A `size`-byte file filled with `fill`, in `dir`.
    fn new(dir: &Path, name: &str, size: usize, fill: u8) -> TempImage {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = dir.join(format!(
            "bulkhead-engine-{}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create temp image");
        file.write_all_at(&vec![fill; size], 0)
            .expect("fill temp image");
        TempImage {
            path,
            file: Arc::new(file),
        }
    }

    fn in_tmp(name: &str, size: usize, fill: u8) -> TempImage {
        TempImage::new(&std::env::temp_dir(), name, size, fill)
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read temp image")
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The engines to test: Sync always, io_uring where it works.
fn kinds() -> Vec<EngineKind> {
    if super::io_uring_available() {
        vec![EngineKind::Sync, EngineKind::IoUring]
    } else {
        // libtest names the test's thread after the test.
        let test = std::thread::current().name().unwrap_or("?").to_string();
        skip(
            &format!("{test} (the io_uring engine)"),
            SkipReason::Unsupported("io_uring".into()),
        );
        vec![EngineKind::Sync]
    }
}

fn engine(kind: EngineKind, file: &Arc<File>, depth: usize) -> Box<dyn Engine> {
    new_engine(kind, Arc::clone(file), depth, false).expect("create engine")
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

/// Submits `op`, commits, and waits for its single completion.
fn run(engine: &mut dyn Engine, token: u64, op: Op) -> io::Result<u64> {
    // SAFETY: every buffer the tests pass outlives this call, which reaps the completion.
    unsafe { engine.submit(token, op) }.expect("submit");
    engine.commit().expect("commit");
    let mut out = Vec::new();
    while out.is_empty() {
        engine.wait(&mut out).expect("wait");
    }
    assert_eq!(out.len(), 1, "exactly one completion");
    assert_eq!(engine.in_flight(), 0);
    let c = out.pop().expect("one completion");
    assert_eq!(c.token, token);
    c.result
}

fn errno(result: io::Result<u64>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

/// Whether `fd` polls readable within `timeout_ms`.
fn readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// Writes `data` at `offset` and reads it back through the engine.
fn write_read(engine: &mut dyn Engine, offset: u64, data: &[u8], fua: bool) -> Vec<u8> {
    let mut src = data.to_vec();
    let op = Op::Write {
        offset,
        iovecs: vec![iov(&mut src)],
        fua,
    };
    assert_eq!(run(engine, 1, op).ok(), Some(data.len() as u64));
    let mut dst = vec![0u8; data.len()];
    let op = Op::Read {
        offset,
        iovecs: vec![iov(&mut dst)],
    };
    assert_eq!(run(engine, 2, op).ok(), Some(data.len() as u64));
    dst
}

#[test]
fn write_then_read_roundtrips_across_iovecs() {
    for kind in kinds() {
        let img = TempImage::in_tmp("roundtrip", 64 * 1024, 0);
        let mut e = engine(kind, &img.file, 8);
        let mut a: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let mut b = vec![0xb5u8; 512];
        let mut c: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let expected: Vec<u8> = [a.clone(), b.clone(), c.clone()].concat();
        let op = Op::Write {
            offset: 8192,
            iovecs: vec![iov(&mut a), iov(&mut b), iov(&mut c)],
            fua: false,
        };
        assert_eq!(run(e.as_mut(), 7, op).ok(), Some(5608), "{kind:?}");

        // Read back split differently.
        let mut x = vec![0u8; 100];
        let mut y = vec![0u8; 5508];
        let op = Op::Read {
            offset: 8192,
            iovecs: vec![iov(&mut x), iov(&mut y)],
        };
        assert_eq!(run(e.as_mut(), 8, op).ok(), Some(5608), "{kind:?}");
        assert_eq!([x, y].concat(), expected, "{kind:?}");
        assert_eq!(
            &img.contents()[8192..8192 + 5608],
            &expected[..],
            "{kind:?}"
        );
    }
}

#[test]
fn more_than_iov_max_iovecs_continue_until_done() {
    for kind in kinds() {
        let img = TempImage::in_tmp("iovmax", 64 * 1024, 0);
        let mut e = engine(kind, &img.file, 4);
        let data: Vec<u8> = (0..2000 * 16).map(|i: u32| (i % 251) as u8).collect();
        let mut src = data.clone();
        let op = Op::Write {
            offset: 512,
            iovecs: src.chunks_mut(16).map(iov).collect(),
            fua: false,
        };
        assert_eq!(run(e.as_mut(), 1, op).ok(), Some(32000), "{kind:?}");
        let mut dst = vec![0u8; data.len()];
        let op = Op::Read {
            offset: 512,
            iovecs: dst.chunks_mut(16).map(iov).collect(),
        };
        assert_eq!(run(e.as_mut(), 2, op).ok(), Some(32000), "{kind:?}");
        assert_eq!(dst, data, "{kind:?}");
    }
}

#[test]
fn flush_succeeds() {
    for kind in kinds() {
        let img = TempImage::in_tmp("flush", 4096, 0);
        let mut e = engine(kind, &img.file, 2);
        assert_eq!(write_read(e.as_mut(), 0, b"durable", false), b"durable");
        assert_eq!(run(e.as_mut(), 3, Op::Flush).ok(), Some(0), "{kind:?}");
    }
}

#[test]
fn fua_write_completes_with_data_in_place() {
    for kind in kinds() {
        let img = TempImage::in_tmp("fua", 8192, 0);
        let mut e = engine(kind, &img.file, 2);
        let data = vec![0x5au8; 3000];
        assert_eq!(write_read(e.as_mut(), 1000, &data, true), data, "{kind:?}");
        assert_eq!(&img.contents()[1000..4000], &data[..], "{kind:?}");
    }
}

/// Checks that `range` of `img` reads as zeroes and the rest still as `fill`.
fn assert_zeroed(
    img: &TempImage,
    size: usize,
    range: std::ops::Range<usize>,
    fill: u8,
    what: &str,
) {
    let contents = img.contents();
    assert_eq!(contents.len(), size, "{what}: size kept");
    for (i, &byte) in contents.iter().enumerate() {
        let want = if range.contains(&i) { 0 } else { fill };
        assert_eq!(byte, want, "{what}: byte {i}");
    }
}

#[test]
fn discard_zeroes_range_and_keeps_size() {
    for kind in kinds() {
        let size = 64 * 1024;
        let img = TempImage::in_tmp("discard", size, 0xaa);
        let mut e = engine(kind, &img.file, 2);
        // Aligned and unaligned edges.
        let op = Op::Discard {
            offset: 4096,
            len: 8192,
        };
        assert_eq!(run(e.as_mut(), 1, op).ok(), Some(0), "{kind:?}");
        assert_zeroed(&img, size, 4096..12288, 0xaa, &format!("{kind:?} aligned"));
        let op = Op::Discard {
            offset: 20000,
            len: 5000,
        };
        assert_eq!(run(e.as_mut(), 2, op).ok(), Some(0), "{kind:?}");
        let contents = img.contents();
        assert!(contents[20000..25000].iter().all(|&b| b == 0), "{kind:?}");
        assert_eq!(contents[19999], 0xaa);
        assert_eq!(contents[25000], 0xaa);
    }
}

#[test]
fn write_zeroes_zeroes_range_with_and_without_unmap() {
    for kind in kinds() {
        for unmap in [false, true] {
            let size = 64 * 1024;
            let img = TempImage::in_tmp("zeroes", size, 0x11);
            let mut e = engine(kind, &img.file, 2);
            let op = Op::WriteZeroes {
                offset: 1000,
                len: 30000,
                unmap,
            };
            assert_eq!(run(e.as_mut(), 1, op).ok(), Some(0), "{kind:?}");
            assert_zeroed(
                &img,
                size,
                1000..31000,
                0x11,
                &format!("{kind:?} unmap={unmap}"),
            );
        }
    }
}

#[test]
fn zeroing_on_tmpfs_falls_back_where_fallocate_modes_are_missing() {
    let shm = Path::new("/dev/shm");
    // SAFETY: statfs is plain integers; all zeroes is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we pass.
    let is_tmpfs = unsafe { libc::statfs(c"/dev/shm".as_ptr(), &mut st) } == 0
        && st.f_type == libc::TMPFS_MAGIC;
    if !is_tmpfs {
        skip(
            "zeroing_on_tmpfs_falls_back_where_fallocate_modes_are_missing",
            SkipReason::Unsupported("/dev/shm is not a tmpfs".into()),
        );
        return;
    }
    for kind in kinds() {
        // Twice per engine: the second round uses the remembered fallback.
        let size = 1 << 20;
        let img = TempImage::new(shm, "tmpfs", size, 0x77);
        let mut e = engine(kind, &img.file, 2);
        for round in 0..2u64 {
            let base = round as usize * 300_000;
            let op = Op::WriteZeroes {
                offset: base as u64 + 100,
                len: 200_000,
                unmap: false,
            };
            assert_eq!(run(e.as_mut(), 1, op).ok(), Some(0), "{kind:?}");
            let op = Op::Discard {
                offset: base as u64 + 204_800,
                len: 8192,
            };
            assert_eq!(run(e.as_mut(), 2, op).ok(), Some(0), "{kind:?}");
            let contents = img.contents();
            assert!(contents[base + 100..base + 200_100].iter().all(|&b| b == 0));
            assert!(
                contents[base + 204_800..base + 212_992]
                    .iter()
                    .all(|&b| b == 0)
            );
            assert_eq!(contents[base + 99], 0x77);
            assert_eq!(contents[base + 200_100], 0x77);
            assert_eq!(contents[base + 212_992], 0x77);
        }
        assert_eq!(img.contents().len(), size);
    }
}

#[test]
fn depth_64_in_flight_completes_every_token_once() {
    for kind in kinds() {
        let img = TempImage::in_tmp("depth64", 64 * 4096, 0);
        let mut e = engine(kind, &img.file, 64);
        let mut bufs: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 4096]).collect();
        for (i, buf) in bufs.iter_mut().enumerate() {
            let op = Op::Write {
                offset: i as u64 * 4096,
                iovecs: vec![iov(buf)],
                fua: false,
            };
            // SAFETY: `bufs` outlives the loop below that reaps every completion.
            unsafe { e.submit(1000 + i as u64, op) }.expect("submit");
        }
        assert_eq!(e.in_flight(), 64);
        let mut extra = [0u8; 16];
        // SAFETY: rejected, so the buffer is never used.
        let full = unsafe {
            e.submit(
                1,
                Op::Read {
                    offset: 0,
                    iovecs: vec![iov(&mut extra)],
                },
            )
        };
        assert!(
            full.as_ref().is_err_and(is_queue_full),
            "{kind:?}: {full:?}"
        );
        e.commit().expect("commit");
        let mut seen = HashSet::new();
        let mut out: Vec<Completion> = Vec::new();
        while e.in_flight() > 0 {
            e.wait(&mut out).expect("wait");
            for c in out.drain(..) {
                assert_eq!(c.result.ok(), Some(4096), "{kind:?}");
                assert!(seen.insert(c.token), "{kind:?}: token {} twice", c.token);
            }
        }
        assert_eq!(seen, (1000..1064).collect::<HashSet<u64>>(), "{kind:?}");
        let contents = img.contents();
        for (i, block) in contents.chunks(4096).enumerate() {
            assert!(block.iter().all(|&b| b == i as u8), "{kind:?}: block {i}");
        }
    }
}

#[test]
fn queue_full_until_completions_are_reaped() {
    for kind in kinds() {
        let img = TempImage::in_tmp("full", 4096, 0);
        let mut e = engine(kind, &img.file, 2);
        assert_eq!(e.depth(), 2);
        // SAFETY: flushes carry no buffers.
        unsafe {
            e.submit(1, Op::Flush).expect("first");
            e.submit(2, Op::Flush).expect("second");
            let err = e.submit(3, Op::Flush).expect_err("queue full");
            assert!(is_queue_full(&err), "{kind:?}: {err}");
        }
        e.commit().expect("commit");
        let mut out = Vec::new();
        while out.len() < 2 {
            e.wait(&mut out).expect("wait");
        }
        assert_eq!(e.in_flight(), 0);
        // SAFETY: no buffers.
        unsafe { e.submit(3, Op::Flush) }.expect("room again after reaping");
        e.commit().expect("commit");
        out.clear();
        while out.is_empty() {
            e.wait(&mut out).expect("wait");
        }
        assert_eq!(out[0].token, 3);
    }
}

#[test]
fn completion_fd_signals_and_reap_clears_it() {
    for kind in kinds() {
        let img = TempImage::in_tmp("evt", 4096, 0);
        let mut e = engine(kind, &img.file, 4);
        let fd = e.completion_fd();
        assert!(!readable(fd, 0), "{kind:?}: idle fd readable");
        // SAFETY: no buffers.
        unsafe { e.submit(9, Op::Flush) }.expect("submit");
        e.commit().expect("commit");
        assert!(readable(fd, 5000), "{kind:?}: completion not signalled");
        let mut out = Vec::new();
        e.reap(&mut out).expect("reap");
        assert_eq!(out.len(), 1, "{kind:?}");
        assert_eq!(e.in_flight(), 0);
        assert!(!readable(fd, 0), "{kind:?}: readiness not cleared");
        // Nothing in flight: wait returns at once.
        e.wait(&mut out).expect("wait");
        assert_eq!(out.len(), 1);
    }
}

#[test]
fn write_to_read_only_file_completes_with_ebadf() {
    for kind in kinds() {
        let img = TempImage::in_tmp("rdonly", 4096, 0);
        let ro = Arc::new(File::open(&img.path).expect("open read-only"));
        let mut e = engine(kind, &ro, 2);
        let mut buf = [1u8; 512];
        let op = Op::Write {
            offset: 0,
            iovecs: vec![iov(&mut buf)],
            fua: false,
        };
        assert_eq!(errno(run(e.as_mut(), 1, op)), Some(libc::EBADF), "{kind:?}");
    }
}

#[test]
fn read_past_end_of_file_completes_with_eio() {
    for kind in kinds() {
        let img = TempImage::in_tmp("eof", 4096, 3);
        let mut e = engine(kind, &img.file, 2);
        // Straddles the end: a short read, then 0 bytes.
        let mut a = [0u8; 2048];
        let mut b = [0u8; 4096];
        let op = Op::Read {
            offset: 2048,
            iovecs: vec![iov(&mut a), iov(&mut b)],
        };
        assert_eq!(errno(run(e.as_mut(), 1, op)), Some(libc::EIO), "{kind:?}");
        // Entirely beyond the end.
        let op = Op::Read {
            offset: 1 << 30,
            iovecs: vec![iov(&mut a)],
        };
        assert_eq!(errno(run(e.as_mut(), 2, op)), Some(libc::EIO), "{kind:?}");
    }
}

#[test]
fn enospc_surfaces_in_the_completion() {
    let Ok(full) = OpenOptions::new().write(true).open("/dev/full") else {
        skip(
            "enospc_surfaces_in_the_completion",
            SkipReason::Unsupported("/dev/full cannot be opened".into()),
        );
        return;
    };
    let full = Arc::new(full);
    for kind in kinds() {
        let mut e = engine(kind, &full, 2);
        let mut buf = [1u8; 512];
        let op = Op::Write {
            offset: 0,
            iovecs: vec![iov(&mut buf)],
            fua: false,
        };
        assert_eq!(
            errno(run(e.as_mut(), 1, op)),
            Some(libc::ENOSPC),
            "{kind:?}"
        );
    }
}

#[test]
fn empty_and_invalid_ops_complete_without_io() {
    for kind in kinds() {
        let img = TempImage::in_tmp("empty", 4096, 0);
        let mut e = engine(kind, &img.file, 4);
        let op = Op::Read {
            offset: 0,
            iovecs: Vec::new(),
        };
        assert_eq!(run(e.as_mut(), 1, op).ok(), Some(0), "{kind:?}");
        let op = Op::WriteZeroes {
            offset: 0,
            len: 0,
            unmap: true,
        };
        assert_eq!(run(e.as_mut(), 2, op).ok(), Some(0), "{kind:?}");
        let op = Op::Discard {
            offset: u64::MAX,
            len: 2,
        };
        assert_eq!(
            errno(run(e.as_mut(), 3, op)),
            Some(libc::EINVAL),
            "{kind:?}"
        );
    }
}

#[test]
fn bad_depth_is_rejected() {
    let img = TempImage::in_tmp("depth", 4096, 0);
    for kind in kinds() {
        assert!(new_engine(kind, Arc::clone(&img.file), 0, false).is_err());
        assert!(new_engine(kind, Arc::clone(&img.file), super::MAX_DEPTH + 1, false).is_err());
    }
}

/// A loop device over a scratch file, detached (and the file removed) on drop.
struct LoopDevice {
    path: PathBuf,
    _backing: TempImage,
}

impl LoopDevice {
    /// A loop device over a fresh `size`-byte file, or why not (`losetup`
    /// needs root and `/dev/loop-control`).
    fn new(size: usize) -> Result<LoopDevice, String> {
        let backing = TempImage::in_tmp("loop", size, 0);
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing.path)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(LoopDevice {
            path,
            _backing: backing,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("--detach")
            .arg(&self.path)
            .status();
    }
}

/// Block-device paths (BLKZEROOUT, BLKDISCARD) need a device: a loop device
/// the test makes (root), or `BULKHEAD_TEST_BLOCK_DEVICE`, a scratch device
/// whose first MiB is overwritten.
#[test]
fn block_device_range_ops_use_ioctls() {
    let mut _loop = None;
    let path = match std::env::var_os("BULKHEAD_TEST_BLOCK_DEVICE") {
        Some(p) => PathBuf::from(p),
        None => match LoopDevice::new(4 << 20) {
            Ok(l) => _loop.insert(l).path.clone(),
            Err(why) => {
                let reason = bulkhead_tests::skip::needs_root().unwrap_or_else(|| {
                    SkipReason::Unsupported(format!(
                        "a loop device ({why}; BULKHEAD_TEST_BLOCK_DEVICE names a scratch device)"
                    ))
                });
                skip("block_device_range_ops_use_ioctls", reason);
                return;
            }
        },
    };
    let dev = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the test block device"),
    );
    for kind in kinds() {
        let mut e = new_engine(kind, Arc::clone(&dev), 4, true).expect("create engine");
        let pattern = vec![0xc3u8; 1 << 20];
        assert_eq!(write_read(e.as_mut(), 0, &pattern, true), pattern);
        for (token, unmap) in [(10, false), (11, true)] {
            let offset = if unmap { 65536 } else { 4096 };
            let op = Op::WriteZeroes {
                offset,
                len: 32768,
                unmap,
            };
            assert_eq!(run(e.as_mut(), token, op).ok(), Some(0), "{kind:?}");
        }
        let op = Op::Discard {
            offset: 512 * 1024,
            len: 65536,
        };
        assert_eq!(run(e.as_mut(), 12, op).ok(), Some(0), "{kind:?}");
        let op = Op::WriteZeroes {
            offset: 1,
            len: 512,
            unmap: false,
        };
        assert_eq!(
            errno(run(e.as_mut(), 13, op)),
            Some(libc::EINVAL),
            "{kind:?}: unaligned"
        );
        let mut back = vec![0u8; 1 << 20];
        dev.read_exact_at(&mut back, 0).expect("read back");
        for (i, &b) in back[..512 * 1024].iter().enumerate() {
            let zero = (4096..36864).contains(&i) || (65536..98304).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0xc3 }, "{kind:?}: byte {i}");
        }
    }
}

#[test]
fn dropping_an_engine_with_ops_in_flight_finishes_them() {
    for kind in kinds() {
        let img = TempImage::in_tmp("drop", 16 * 4096, 0);
        let mut bufs: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i + 1; 4096]).collect();
        {
            let mut e = engine(kind, &img.file, 16);
            for (i, buf) in bufs.iter_mut().enumerate() {
                let op = Op::Write {
                    offset: i as u64 * 4096,
                    iovecs: vec![iov(buf)],
                    fua: false,
                };
                // SAFETY: dropping the engine waits for the kernel to finish with `bufs`.
                unsafe { e.submit(i as u64, op) }.expect("submit");
                if i == 7 {
                    e.commit().expect("commit");
                }
            }
            // Half committed, half still queued: drop finishes both.
        }
        let contents = img.contents();
        for (i, block) in contents.chunks(4096).enumerate() {
            assert!(
                block.iter().all(|&b| b == i as u8 + 1),
                "{kind:?}: block {i}"
            );
        }
    }
}

/// A tmpfs directory for tests, when /dev/shm is one.
fn shm_dir() -> Option<PathBuf> {
    let dir = PathBuf::from("/dev/shm");
    let c = std::ffi::CString::new("/dev/shm").ok()?;
    // SAFETY: statfs is plain old data; statfs(2) fills it from a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0;
    (ok && st.f_type == 0x0102_1994).then_some(dir)
}

#[test]
fn reads_on_tmpfs_are_served_inline_and_return_the_right_bytes() {
    use super::inline::InlineIo;
    use std::os::unix::io::AsRawFd;
    const TEST: &str = "reads_on_tmpfs_are_served_inline_and_return_the_right_bytes";
    let Some(dir) = shm_dir() else {
        skip(
            TEST,
            SkipReason::Unsupported("/dev/shm is not a tmpfs".into()),
        );
        return;
    };
    if !super::io_uring_available() {
        skip(TEST, SkipReason::Unsupported("io_uring".into()));
        return;
    }
    let img = TempImage::new(&dir, "inline", 64 * 1024, 0);
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 13 + 5) as u8).collect();
    img.file.write_all_at(&data, 0).expect("fill");
    assert_eq!(InlineIo::classify(img.file.as_raw_fd()), InlineIo::Memory);
    let mut e = engine(EngineKind::IoUring, &img.file, 4);
    let mut a = vec![0u8; 1000];
    let mut b = vec![0u8; 3096];
    let op = Op::Read {
        offset: 4096,
        iovecs: vec![iov(&mut a), iov(&mut b)],
    };
    assert_eq!(run(e.as_mut(), 7, op).ok(), Some(4096));
    assert_eq!([a, b].concat(), data[4096..8192]);
    // Past the end: the inline read comes up short and the ring reports EIO.
    let mut c = vec![0u8; 8192];
    let op = Op::Read {
        offset: 60 * 1024,
        iovecs: vec![iov(&mut c)],
    };
    assert_eq!(errno(run(e.as_mut(), 8, op)), Some(libc::EIO));
}

#[test]
fn writes_on_tmpfs_are_served_inline_and_land_in_the_image() {
    use std::os::unix::fs::FileExt;
    const TEST: &str = "writes_on_tmpfs_are_served_inline_and_land_in_the_image";
    let Some(dir) = shm_dir() else {
        skip(
            TEST,
            SkipReason::Unsupported("/dev/shm is not a tmpfs".into()),
        );
        return;
    };
    if !super::io_uring_available() {
        skip(TEST, SkipReason::Unsupported("io_uring".into()));
        return;
    }
    let img = TempImage::new(&dir, "inline-w", 64 * 1024, 0);
    let mut e = engine(EngineKind::IoUring, &img.file, 4);
    let mut a: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 1) as u8).collect();
    let mut b: Vec<u8> = (0..3096u32).map(|i| (i * 11 + 3) as u8).collect();
    for (token, fua) in [(1u64, false), (2, true)] {
        let op = Op::Write {
            offset: 8192 * token,
            iovecs: vec![iov(&mut a), iov(&mut b)],
            fua,
        };
        assert_eq!(run(e.as_mut(), token, op).ok(), Some(4096), "fua {fua}");
        let mut back = vec![0u8; 4096];
        img.file
            .read_exact_at(&mut back, 8192 * token)
            .expect("read back");
        assert_eq!(back, [a.clone(), b.clone()].concat(), "fua {fua}");
    }
    assert_eq!(img.file.metadata().expect("stat").len(), 64 * 1024);
}

#[test]
fn direct_images_are_never_read_inline() {
    use super::inline::InlineIo;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let img = TempImage::in_tmp("direct", 8192, 1);
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&img.path)
    else {
        skip(
            "direct_images_are_never_read_inline",
            SkipReason::Unsupported("O_DIRECT in the temp dir".into()),
        );
        return;
    };
    assert_eq!(InlineIo::classify(f.as_raw_fd()), InlineIo::Off);
}

#[test]
fn inline_write_policy_follows_the_file_system_fua_and_ring() {
    use super::inline::InlineIo;
    // Memory images write inline always; ext4 only non-FUA writes with an
    // idle ring (a FUA write waits for the device; a busy ring may hold a
    // read that a queue-thread stall would delay); others never.
    for busy in [0, 1, 7] {
        for fua in [false, true] {
            assert!(InlineIo::Memory.write_here(fua, busy));
            assert!(!InlineIo::Off.write_here(fua, busy));
            assert_eq!(InlineIo::Writes.write_here(fua, busy), !fua && busy == 0);
        }
    }
    assert!(InlineIo::Memory.reads_here());
    assert!(!InlineIo::Writes.reads_here());
    assert!(!InlineIo::Off.reads_here());
}

#[test]
fn buffered_writes_on_the_temp_dir_land_whatever_its_file_system() {
    use super::inline::InlineIo;
    use std::os::unix::io::AsRawFd;
    if !super::io_uring_available() {
        skip(
            "buffered_writes_on_the_temp_dir_land_whatever_its_file_system",
            SkipReason::Unsupported("io_uring".into()),
        );
        return;
    }
    let img = TempImage::in_tmp("inline-ext4", 64 * 1024, 0);
    let fd = img.file.as_raw_fd();
    let magic = super::inline::fs_magic(fd).expect("fstatfs of the temp dir");
    let class = InlineIo::classify(fd);
    if magic == super::inline::EXT4_MAGIC {
        assert_eq!(class, InlineIo::Writes, "ext4 temp dir");
    } else {
        assert_ne!(class, InlineIo::Writes, "temp dir fs {magic:#x}");
    }
    // Two writes in flight at once (the second sees a busy ring), then a
    // FUA one and a lone one: every byte lands, whichever path took it.
    let mut e = engine(EngineKind::IoUring, &img.file, 4);
    let mut bufs: Vec<Vec<u8>> = (0..4u32)
        .map(|k| (0..4096u32).map(|i| (i * 7 + k * 31 + 1) as u8).collect())
        .collect();
    let ops: Vec<Op> = bufs
        .iter_mut()
        .enumerate()
        .map(|(k, b)| Op::Write {
            offset: 8192 * k as u64,
            iovecs: vec![iov(b)],
            fua: k == 2,
        })
        .collect();
    let mut ops = ops.into_iter();
    for token in [0u64, 1] {
        // SAFETY: `bufs` outlives the engine's use of it: both are reaped below.
        unsafe { e.submit(token, ops.next().expect("op")) }.expect("submit");
    }
    e.commit().expect("commit");
    let mut out: Vec<Completion> = Vec::new();
    while out.len() < 2 {
        e.wait(&mut out).expect("wait");
    }
    let mut done: Vec<_> = out.into_iter().map(|c| (c.token, c.result.ok())).collect();
    done.sort();
    assert_eq!(done, vec![(0, Some(4096)), (1, Some(4096))]);
    for (token, op) in (2u64..).zip(ops) {
        assert_eq!(run(e.as_mut(), token, op).ok(), Some(4096));
    }
    let image = img.contents();
    for (k, b) in bufs.iter().enumerate() {
        assert_eq!(&image[8192 * k..8192 * k + 4096], &b[..], "write {k}");
    }
}
