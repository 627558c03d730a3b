//! What `bulkhead-console` may do once it serves (its sandbox [`Policy`]):
//! every host side is open before it enters the sandbox (sockets bound and
//! listening, ptys opened and their path files written, log files opened),
//! so no path at all and no network (a fresh net namespace; bound unix
//! sockets keep accepting). The main thread creates each transmit queue's
//! stall timer; a queue thread accepts clients on the port and control
//! sockets, moves bytes between them and the guest, polls terminal sizes and
//! arms timers.

use bulkhead_common::sandbox::{Policy, Syscall, fd_budget};

use crate::device::MAX_QUEUE_SIZE;

/// Fds per queue: its own (kick, call, err, stop, epoll, stall timer) and
/// its share of its port's (epolls, wake eventfds, listener, control socket
/// and its clients, the attached client, pty or file, size timer).
const FDS_PER_QUEUE: u64 = 16;

/// The policy of a daemon with `ports` ports; `writes_files` when a port's
/// host side is a log file (no file size limit then).
pub fn policy(ports: usize, writes_files: bool) -> Policy {
    use libc::*;
    // A receive and a transmit queue per port, plus the control pair.
    let queues = u16::try_from(ports)
        .unwrap_or(u16::MAX)
        .saturating_add(1)
        .saturating_mul(2);
    Policy {
        paths: Vec::new(),
        main: vec![
            Syscall::any(SYS_timerfd_create),
            // The backend-request channel (config-change notifications): the
            // vhost crate checks the socket it receives.
            Syscall::getsockopt(SOL_SOCKET, SO_DOMAIN),
            Syscall::getsockopt(SOL_SOCKET, SO_TYPE),
            // Restoring stdin's terminal settings at exit (tcsetattr).
            Syscall::ioctl(TCSETS),
        ],
        worker: vec![
            Syscall::any(SYS_accept4),
            // UnixStream::set_nonblocking on an accepted client.
            Syscall::ioctl(FIONBIO),
            Syscall::ioctl(TIOCGWINSZ),
            // Ending a replaced client's output side (it reads end of file).
            Syscall::any(SYS_shutdown),
            Syscall::any(SYS_readv),
            Syscall::any(SYS_sendto),
            Syscall::any(SYS_timerfd_settime),
        ],
        needs_network: false,
        max_open_files: fd_budget(queues, FDS_PER_QUEUE),
        writes_files,
        // The inflight area (with its device-state section) is the one
        // file it sizes, unless a file= port needs no limit at all.
        memfd_bytes: bulkhead_common::inflight::max_area_size(queues, MAX_QUEUE_SIZE, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::sandbox::{ThreadKind, allowed_syscalls, check};

    #[test]
    fn the_policy_builds_for_one_and_for_31_ports() {
        check(&policy(1, false)).unwrap();
        check(&policy(31, true)).unwrap();
        assert!(policy(31, false).max_open_files > policy(1, false).max_open_files);
    }

    #[test]
    fn a_queue_thread_accepts_clients_but_cannot_create_sockets_or_timers() {
        let w = allowed_syscalls(ThreadKind::Worker, &policy(2, false));
        assert!(w.contains(&libc::SYS_accept4));
        for nr in [libc::SYS_socket, libc::SYS_bind, libc::SYS_timerfd_create] {
            assert!(!w.contains(&nr), "worker allows {nr}");
        }
    }

    #[test]
    fn no_thread_may_exec_trace_open_paths_or_use_the_network() {
        for kind in [ThreadKind::Main, ThreadKind::Worker] {
            let l = allowed_syscalls(kind, &policy(2, true));
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
        let p = policy(1, false);
        assert!(p.paths.is_empty() && !p.needs_network);
    }
}
