//! The thread that watches a device's backend connection and reconnects
//! after a loss, with bounded exponential backoff.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bulkhead_common::event::{EventLoop, Interest};
use vmm_sys_util::eventfd::EventFd;

use super::handle::BackendHandle;
use super::{RECONNECT_MAX_DELAY, RECONNECT_MIN_DELAY};
use crate::seccomp::{self, SeccompMode, Thread};

impl BackendHandle {
    /// Starts the thread that watches the connection and reconnects after a
    /// loss (applies the `Monitor` seccomp filter to itself).
    pub fn start_monitor(self: &Arc<Self>, mode: SeccompMode) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        let watch = Watch::new(&self.wake)?;
        std::thread::Builder::new()
            .name(format!("vu-{}", self.id))
            .spawn(move || {
                if let Err(e) = seccomp::apply(Thread::Monitor, mode) {
                    log::error!("backend monitor: {e}");
                    return;
                }
                monitor(weak, &watch);
            })?;
        Ok(())
    }
}

/// What wakes the monitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// The handle's wake eventfd: a state change to look at.
    Wake,
    /// The watched connection hung up.
    Socket,
}
bulkhead_common::event_token!(Token { Wake, Socket });

/// The monitor's event loop: the handle's wake eventfd always, the
/// connection's socket while one is watched.
pub(super) struct Watch {
    ev: EventLoop<Token>,
}

impl Watch {
    pub(super) fn new(wake: &EventFd) -> io::Result<Self> {
        let ev = EventLoop::new()?;
        ev.add(wake, Interest::READ, Token::Wake)?;
        Ok(Watch { ev })
    }

    /// Waits for `fd` to hang up or `wake` (the one registered) to fire, at
    /// most `timeout`. Returns whether `fd` hung up.
    pub(super) fn wait_hangup(&self, fd: Option<RawFd>, wake: &EventFd, timeout: Duration) -> bool {
        // Registered only for this wait: deleted below before the caller
        // closes it, as epoll keeps a registration while the open file
        // description lives (the connection's own fd shares it).
        let fd = fd.filter(|&fd| {
            self.ev
                .add_raw(fd, Interest::HANGUP, Token::Socket)
                .map_err(|e| log::warn!("backend monitor: cannot watch the socket: {e}"))
                .is_ok()
        });
        let events = self.ev.wait(Some(timeout)).unwrap_or_default();
        if let Some(fd) = fd {
            let _ = self.ev.delete_raw(fd);
        }
        let mut hung_up = false;
        for e in events {
            match e.token {
                Token::Wake => {
                    let _ = wake.read();
                }
                Token::Socket => hung_up |= e.hangup,
            }
        }
        hung_up
    }
}

pub(super) fn monitor(weak: Weak<BackendHandle>, watch: &Watch) {
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
                if watch.wait_hangup(Some(fd.as_raw_fd()), &h.wake, Duration::from_millis(500)) {
                    let mut g = h.lock();
                    if g.generation == generation {
                        g.lose("backend hung up".into());
                    }
                }
            }
            Some((None, _)) => {
                watch.wait_hangup(None, &h.wake, Duration::from_millis(500));
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
                        watch.wait_hangup(None, &h.wake, wait);
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
        let watch = Watch::new(&wake).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        assert!(!watch.wait_hangup(Some(a.as_raw_fd()), &wake, Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(20));
        wake.write(1).unwrap();
        assert!(!watch.wait_hangup(Some(a.as_raw_fd()), &wake, Duration::from_secs(5)));
        assert!(wake.read().is_err(), "the wake-up was consumed");
        drop(b);
        assert!(watch.wait_hangup(Some(a.as_raw_fd()), &wake, Duration::from_secs(5)));
        assert!(!watch.wait_hangup(None, &wake, Duration::ZERO));
    }
}
