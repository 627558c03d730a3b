//! The thread that watches a device's backend connection and reconnects
//! after a loss, with bounded exponential backoff.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::handle::BackendHandle;
use super::{RECONNECT_MAX_DELAY, RECONNECT_MIN_DELAY};
use crate::seccomp::{self, SeccompMode, Thread};

impl BackendHandle {
    /// Starts the thread that watches the connection and reconnects after a
    /// loss (applies the `Monitor` seccomp filter to itself).
    pub fn start_monitor(self: &Arc<Self>, mode: SeccompMode) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name(format!("vu-{}", self.id))
            .spawn(move || {
                if let Err(e) = seccomp::apply(Thread::Monitor, mode) {
                    log::error!("backend monitor: {e}");
                    return;
                }
                monitor(weak);
            })?;
        Ok(())
    }
}

/// Waits for `fd` to hang up or `wake` to fire, at most `timeout`.
/// Returns whether `fd` hung up.
pub(super) fn wait_hangup(fd: Option<RawFd>, wake: &EventFd, timeout: Duration) -> bool {
    let mut fds = vec![libc::pollfd {
        fd: wake.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(fd) = fd {
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        });
    }
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: a valid array of pollfds; poll only writes their revents.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return false;
    }
    if fds[0].revents & libc::POLLIN != 0 {
        let _ = wake.read();
    }
    fds.get(1).is_some_and(|p| {
        p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
    })
}

pub(super) fn monitor(weak: Weak<BackendHandle>) {
    let mut delay = RECONNECT_MIN_DELAY;
    let mut failures = 0u32;
    loop {
        let Some(h) = weak.upgrade() else {
            return;
        };
        // Watch a dup of the socket so a replaced connection cannot leave us
        // polling a reused fd number.
        let watched = {
            let g = h.lock();
            g.conn.as_ref().map(|c| {
                // SAFETY: dup of a live fd; the result is owned below.
                let fd = unsafe { libc::dup(c.fd()) };
                (
                    (fd >= 0).then(|| {
                        // SAFETY: fd is a fresh descriptor we own.
                        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                    }),
                    g.generation,
                )
            })
        };
        match watched {
            Some((Some(fd), generation)) => {
                delay = RECONNECT_MIN_DELAY;
                failures = 0;
                if wait_hangup(Some(fd.as_raw_fd()), &h.wake, Duration::from_millis(500)) {
                    let mut g = h.lock();
                    if g.generation == generation {
                        g.lose("backend hung up".into());
                    }
                }
            }
            Some((None, _)) => {
                wait_hangup(None, &h.wake, Duration::from_millis(500));
            }
            None => {
                let started = Instant::now();
                match h.try_reconnect() {
                    Ok(()) => {
                        delay = RECONNECT_MIN_DELAY;
                        failures = 0;
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        // Log the first failures and then every 30th, not every attempt.
                        if failures <= 3 || failures.is_multiple_of(30) {
                            log::warn!(
                                "{}: reconnect attempt {failures} failed: {e} (retrying)",
                                h.id
                            );
                        }
                        h.lock().last_error = Some(e);
                        let wait = delay.saturating_sub(started.elapsed());
                        wait_hangup(None, &h.wake, wait);
                        delay = (delay * 2).min(RECONNECT_MAX_DELAY);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn wait_hangup_reports_a_hang_up_and_not_a_wake_or_a_timeout() {
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        assert!(!wait_hangup(
            Some(a.as_raw_fd()),
            &wake,
            Duration::from_millis(20)
        ));
        assert!(t.elapsed() >= Duration::from_millis(20));
        wake.write(1).unwrap();
        assert!(!wait_hangup(
            Some(a.as_raw_fd()),
            &wake,
            Duration::from_secs(5)
        ));
        assert!(wake.read().is_err(), "the wake-up was consumed");
        drop(b);
        assert!(wait_hangup(
            Some(a.as_raw_fd()),
            &wake,
            Duration::from_secs(5)
        ));
        assert!(!wait_hangup(None, &wake, Duration::ZERO));
    }
}
