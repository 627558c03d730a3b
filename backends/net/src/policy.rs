//! What `bulkhead-net` may do once it serves (its sandbox [`Policy`]): its
//! tap queues are open fds, so no path at all, and no network either (a
//! fresh, empty net namespace: the tap fds keep carrying frames of the tap's
//! own namespace). The main thread sets the tap's vnet header size and
//! offloads when the driver acks its features, and attaches a pair's tap
//! queue when its first queue starts; a queue thread reads and writes
//! frames, and detaches its pair's tap queue when the last queue of the pair
//! stops.

use bulkhead_common::sandbox::{Policy, Syscall, fd_budget};

/// Fds one queue holds beyond the tap: kick, call, err, stop, epoll,
/// io_uring, spare.
const FDS_PER_QUEUE: u64 = 8;

/// The policy of a daemon serving `pairs` queue pairs of up to `queue_size` entries.
pub fn policy(pairs: u16, queue_size: u16) -> Policy {
    use libc::*;
    // rx, tx per pair plus the control queue.
    let queues = pairs.saturating_mul(2).saturating_add(1);
    Policy {
        paths: Vec::new(),
        // Each receive queue's ring (`ring.rs`) is made when its queue
        // starts, limited to readv/writev before it is enabled.
        // TUNGETSNDBUF: whether a transmit queue's writes can be refused
        // (`tx.rs`, when the queue starts).
        main: [
            Syscall::ioctl(TUNSETOFFLOAD),
            Syscall::ioctl(TUNSETVNETHDRSZ),
            Syscall::ioctl(TUNGETSNDBUF),
        ]
        .into_iter()
        .chain(Syscall::restricted_io_uring_setup())
        .collect(),
        // readv: frames straight from the tap into guest buffers, one at a
        // time or a batch through the ring.
        worker: vec![
            Syscall::ioctl(TUNSETQUEUE),
            Syscall::any(SYS_readv),
            Syscall::any(SYS_io_uring_enter),
        ],
        needs_network: false,
        max_open_files: fd_budget(queues, FDS_PER_QUEUE),
        writes_files: false,
        // The inflight area (with its device-state section) is the one
        // file it sizes.
        memfd_bytes: bulkhead_common::inflight::max_area_size(queues, queue_size, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::sandbox::{ThreadKind, allowed_syscalls, check};

    #[test]
    fn the_policy_builds_for_one_and_for_16_pairs() {
        check(&policy(1, 256)).unwrap();
        check(&policy(16, 32768)).unwrap();
        assert!(policy(16, 256).max_open_files > policy(1, 256).max_open_files);
    }

    #[test]
    fn the_inflight_area_fits_under_the_file_size_limit() {
        let p = policy(2, 1024);
        assert!(!p.writes_files);
        assert_eq!(
            p.memfd_bytes,
            bulkhead_common::inflight::max_area_size(5, 1024, true)
        );
    }

    #[test]
    fn no_thread_may_exec_trace_open_paths_or_use_the_network() {
        for kind in [ThreadKind::Main, ThreadKind::Worker] {
            let l = allowed_syscalls(kind, &policy(2, 256));
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
        let p = policy(1, 256);
        assert!(p.paths.is_empty() && !p.needs_network);
    }

    #[test]
    fn only_the_main_thread_makes_rings_and_queue_threads_only_enter_them() {
        let p = policy(1, 256);
        let w = allowed_syscalls(ThreadKind::Worker, &p);
        assert!(w.contains(&libc::SYS_io_uring_enter));
        assert!(!w.contains(&libc::SYS_io_uring_setup));
        assert!(!w.contains(&libc::SYS_io_uring_register));
        let m = allowed_syscalls(ThreadKind::Main, &p);
        assert!(m.contains(&libc::SYS_io_uring_setup));
    }
}
