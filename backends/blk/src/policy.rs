//! What `bulkhead-blk` may do once it serves (its sandbox [`Policy`]): the
//! image is an open fd, so no path at all; no network. The main thread
//! creates each queue's engine (an io_uring ring and its eventfd); a queue
//! thread only submits and reaps.
//!
//! An image on Ceph RBD is open through librados, whose threads (started
//! when it connects, before the sandbox) talk to the monitors and OSDs:
//! [`librados_threads`] is their list, by name. The serving threads' lists
//! are the same as for a file: a queue thread calls into librbd, whose
//! layers run in it and hand each request to librados' threads (they
//! connect, send and receive), and the main thread only waits for them
//! when it takes or releases the exclusive lock.

use bulkhead_common::sandbox::{LibraryThreads, Policy, Syscall, fd_budget};

/// `BLKDISCARD` and `BLKZEROOUT` (linux/fs.h), the only ioctls a queue issues.
const BLKDISCARD: u64 = 0x1277;
const BLKZEROOUT: u64 = 0x127f;
/// `IORING_REGISTER_EVENTFD`: each engine's completion eventfd.
const IORING_REGISTER_EVENTFD: u64 = 4;
/// Fds one queue holds: kick, call, err, stop, epoll, engine eventfd, ring, spare.
const FDS_PER_QUEUE: u64 = 8;

/// The policy of a daemon serving `num_queues` queues.
pub fn policy(num_queues: u16) -> Policy {
    use libc::*;
    Policy {
        paths: Vec::new(),
        main: Syscall::restricted_io_uring_setup()
            .into_iter()
            .chain([
                Syscall::arg_eq(SYS_io_uring_register, 1, IORING_REGISTER_EVENTFD),
                // The io_uring engine asks whether reads may be served inline:
                // O_DIRECT, then the filesystem of the image fd (tmpfs, ramfs).
                Syscall::fcntl(F_GETFL),
                Syscall::any(SYS_fstatfs),
                // QEMU's image lock: the writer part is taken when the first
                // queue starts and dropped when the last stops (`image`).
                Syscall::fcntl(F_OFD_SETLK),
                Syscall::fcntl(F_OFD_GETLK),
            ])
            .collect(),
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

/// Fds librados may hold beyond a file daemon's: a TCP connection to each
/// monitor and to each OSD the image's objects live on (it connects to an
/// OSD at its first request), its event loops' pipes, its log.
pub const LIBRADOS_FDS: u64 = 4096;

/// The policy of a daemon serving an RBD image on `num_queues` queues: a
/// file daemon's, with room for librados' fds, and `poll` for a queue
/// thread that waits for its last completions as it stops (the rbd
/// engine's eventfd).
pub fn rbd_policy(num_queues: u16) -> Policy {
    let mut p = policy(num_queues);
    p.max_open_files += LIBRADOS_FDS;
    p.worker.push(Syscall::any(libc::SYS_poll));
    p
}

/// What librados' threads call beyond the main list (measured with
/// `strace -f` over connect, lock hand-over, I/O and shutdown; Ceph 16):
/// TCP sockets to the monitors and OSDs (IPv4 or IPv6, streams only; their
/// addresses come from the monitor map, which seccomp cannot check) and
/// their options (`TCP_NODELAY`), and `uname`; the rest (sendmsg, read, epoll, futex,
/// clone for its thread pools) is in the main list already. Nothing that
/// opens a path: every `open` is answered `EPERM` (ceph.conf, the keyring
/// and OpenSSL's configuration are read while connecting, before the
/// sandbox). Threads it starts later inherit this list.
pub fn librados_threads() -> LibraryThreads {
    use libc::*;
    LibraryThreads {
        library: "librados",
        calls: vec![
            Syscall::socket_of(AF_INET, SOCK_STREAM),
            Syscall::socket_of(AF_INET6, SOCK_STREAM),
            Syscall::any(SYS_connect),
            Syscall::any(SYS_getsockname),
            Syscall::any(SYS_setsockopt),
            Syscall::any(SYS_shutdown),
            // Its timer thread asks for the host name every few seconds.
            Syscall::any(SYS_uname),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::sandbox::{ThreadKind, allowed_syscalls, check, library_syscalls};

    #[test]
    fn librados_threads_may_use_tcp_but_not_exec_trace_or_bind() {
        let p = rbd_policy(2);
        check(&p).unwrap();
        let l = library_syscalls(&p, &librados_threads().calls);
        for nr in [libc::SYS_socket, libc::SYS_connect, libc::SYS_sendmsg] {
            assert!(l.contains(&nr), "librados lacks {nr}");
        }
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_unshare,
            libc::SYS_mount,
        ] {
            assert!(!l.contains(&nr), "librados allows {nr}");
        }
        // The serving threads keep the lists of a file daemon.
        for kind in [ThreadKind::Main, ThreadKind::Worker] {
            let s = allowed_syscalls(kind, &p);
            assert!(!s.contains(&libc::SYS_socket) && !s.contains(&libc::SYS_connect));
        }
        assert!(p.max_open_files > policy(2).max_open_files);
    }

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
