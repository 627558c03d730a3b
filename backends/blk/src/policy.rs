//! What `bulkhead-blk` may do once it serves (its sandbox [`Policy`]): the
//! image is an open fd, so no path at all; no network. The main thread
//! creates each queue's engine (an io_uring ring and its eventfd); a queue
//! thread only submits and reaps.

use bulkhead_common::sandbox::{Policy, Syscall, fd_budget};

/// `BLKDISCARD` and `BLKZEROOUT` (linux/fs.h), the only ioctls a queue issues.
const BLKDISCARD: u64 = 0x1277;
const BLKZEROOUT: u64 = 0x127f;
/// `IORING_REGISTER_EVENTFD`: each engine's completion eventfd.
const IORING_REGISTER_EVENTFD: u64 = 4;
/// `IORING_REGISTER_RESTRICTIONS`: each engine's ring is limited to its opcodes.
const IORING_REGISTER_RESTRICTIONS: u64 = 11;
/// `IORING_REGISTER_ENABLE_RINGS`: starts a ring created disabled.
const IORING_REGISTER_ENABLE_RINGS: u64 = 12;
/// Fds one queue holds: kick, call, err, stop, epoll, engine eventfd, ring, spare.
const FDS_PER_QUEUE: u64 = 8;

/// The policy of a daemon serving `num_queues` queues.
pub fn policy(num_queues: u16) -> Policy {
    use libc::*;
    Policy {
        paths: Vec::new(),
        main: vec![
            Syscall::any(SYS_io_uring_setup),
            Syscall::arg_eq(SYS_io_uring_register, 1, IORING_REGISTER_EVENTFD),
            Syscall::arg_eq(SYS_io_uring_register, 1, IORING_REGISTER_RESTRICTIONS),
            Syscall::arg_eq(SYS_io_uring_register, 1, IORING_REGISTER_ENABLE_RINGS),
            // The io_uring engine asks whether reads may be served inline:
            // O_DIRECT, then the filesystem of the image fd (tmpfs, ramfs).
            Syscall::fcntl(F_GETFL),
            Syscall::any(SYS_fstatfs),
            // QEMU's image lock: the writer part is taken when the first
            // queue starts and dropped when the last stops (`image`).
            Syscall::fcntl(F_OFD_SETLK),
            Syscall::fcntl(F_OFD_GETLK),
        ],
        worker: vec![
            Syscall::any(SYS_io_uring_enter),
            Syscall::any(SYS_preadv),
            Syscall::any(SYS_pwritev),
            Syscall::any(SYS_preadv2),
            Syscall::any(SYS_pwritev2),
            Syscall::any(SYS_fdatasync),
            Syscall::any(SYS_fsync),
            Syscall::any(SYS_fallocate),
            Syscall::ioctl(BLKDISCARD),
            Syscall::ioctl(BLKZEROOUT),
        ],
        needs_network: false,
        max_open_files: fd_budget(num_queues, FDS_PER_QUEUE),
        writes_files: true,
        memfd_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::sandbox::{ThreadKind, allowed_syscalls, check};

    #[test]
    fn the_policy_builds_for_one_and_for_64_queues() {
        check(&policy(1)).unwrap();
        check(&policy(64)).unwrap();
        assert!(policy(64).max_open_files > policy(1).max_open_files);
    }

    #[test]
    fn a_queue_thread_may_do_block_io_but_not_set_up_rings() {
        let w = allowed_syscalls(ThreadKind::Worker, &policy(1));
        for nr in [
            libc::SYS_io_uring_enter,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
        ] {
            assert!(w.contains(&nr), "worker lacks {nr}");
        }
        assert!(!w.contains(&libc::SYS_io_uring_setup));
        assert!(!w.contains(&libc::SYS_io_uring_register));
    }

    #[test]
    fn no_thread_may_exec_trace_open_paths_or_use_the_network() {
        for kind in [ThreadKind::Main, ThreadKind::Worker] {
            let l = allowed_syscalls(kind, &policy(4));
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_connect,
            ] {
                assert!(!l.contains(&nr), "{kind:?} allows {nr}");
            }
        }
        let p = policy(1);
        assert!(p.paths.is_empty() && !p.needs_network);
    }
}
