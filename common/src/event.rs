//! A typed epoll loop: each fd is registered with a token of the caller's own
//! enum, and [`EventLoop::wait`] hands those tokens back, so every wake-up is
//! a `match` arm instead of a u64 constant or a position in a list (crosvm's
//! `WaitContext`/`EventToken`).

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// A value that names one registered fd; it round-trips through epoll's u64.
pub trait EventToken: Copy {
    /// The token as epoll's user data.
    fn to_raw(self) -> u64;
    /// The token back from epoll's user data; `None` for data this loop never
    /// registered (it cannot happen, but a bad value is skipped, not trusted).
    fn from_raw(raw: u64) -> Option<Self>;
}

/// Readiness a registration asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Readable (EPOLLIN).
    pub read: bool,
    /// Writable (EPOLLOUT).
    pub write: bool,
    /// The peer shut its side down (EPOLLRDHUP); hang-ups and errors are
    /// always reported.
    pub hangup: bool,
}

impl Interest {
    /// Readable only.
    pub const READ: Interest = Interest {
        read: true,
        write: false,
        hangup: false,
    };
    /// Writable only.
    pub const WRITE: Interest = Interest {
        read: false,
        write: true,
        hangup: false,
    };
    /// Readable or writable.
    pub const BOTH: Interest = Interest {
        read: true,
        write: true,
        hangup: false,
    };
    /// Nothing: the fd stays registered but never wakes the loop.
    pub const NONE: Interest = Interest {
        read: false,
        write: false,
        hangup: false,
    };

    /// Only the peer's shutdown (and hang-ups and errors).
    pub const HANGUP: Interest = Interest {
        read: false,
        write: false,
        hangup: true,
    };

    fn bits(self) -> u32 {
        let mut e = 0;
        if self.hangup {
            e |= libc::EPOLLRDHUP as u32;
        }
        if self.read {
            e |= libc::EPOLLIN as u32;
        }
        if self.write {
            e |= libc::EPOLLOUT as u32;
        }
        e
    }
}

/// One wake-up: which fd, and what it is ready for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event<T> {
    /// The token the fd was registered with.
    pub token: T,
    /// Readable.
    pub readable: bool,
    /// Writable.
    pub writable: bool,
    /// Hang-up or error (EPOLLHUP, EPOLLERR, EPOLLRDHUP).
    pub hangup: bool,
}

/// Most events one `wait` returns.
const MAX_EVENTS: usize = 16;

/// An epoll instance whose registrations carry tokens of type `T`.
pub struct EventLoop<T: EventToken> {
    epoll: OwnedFd,
    _token: PhantomData<T>,
}

impl<T: EventToken> EventLoop<T> {
    /// A new, empty loop (close-on-exec).
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers; the fd is checked and owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventLoop {
            // SAFETY: a fresh fd we own.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            _token: PhantomData,
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, interest: Interest, token: T) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: interest.bits(),
            u64: token.to_raw(),
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for `interest`, reported as `token`.
    pub fn add(&self, fd: &impl AsRawFd, interest: Interest, token: T) -> io::Result<()> {
        self.add_raw(fd.as_raw_fd(), interest, token)
    }

    /// [`EventLoop::add`] for an fd the caller keeps open for the loop's use.
    pub fn add_raw(&self, fd: RawFd, interest: Interest, token: T) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, interest, token)
    }

    /// Changes what a registered fd is watched for (back-pressure).
    pub fn modify_raw(&self, fd: RawFd, interest: Interest, token: T) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, interest, token)
    }

    /// Stops watching `fd`.
    pub fn delete_raw(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for events; `None` waits forever. Returns an empty list on
    /// timeout and on EINTR (the caller's loop looks at its deadline again).
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Vec<Event<T>>> {
        let mut out = Vec::with_capacity(MAX_EVENTS);
        self.wait_into(timeout, &mut out)?;
        Ok(out)
    }

    /// [`EventLoop::wait`] into a list the caller keeps (a hot loop then
    /// does not allocate); `out` is emptied first.
    pub fn wait_into(&self, timeout: Option<Duration>, out: &mut Vec<Event<T>>) -> io::Result<()> {
        out.clear();
        let ms = match timeout {
            None => -1,
            // Round up, so a wait never ends before its timeout.
            Some(t) => i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
        };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        // SAFETY: `events` is writable for its length.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                MAX_EVENTS as i32,
                ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        let hup = (libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32;
        for e in &events[..n as usize] {
            let bits = e.events;
            let raw = e.u64;
            // Data this loop never registered cannot come back; if it did, it is skipped.
            if let Some(token) = T::from_raw(raw) {
                out.push(Event {
                    token,
                    readable: bits & libc::EPOLLIN as u32 != 0,
                    writable: bits & libc::EPOLLOUT as u32 != 0,
                    hangup: bits & hup != 0,
                });
            }
        }
        Ok(())
    }

    /// Waits until `deadline` at the latest (`None`: forever).
    pub fn wait_until(&self, deadline: Option<Instant>) -> io::Result<Vec<Event<T>>> {
        self.wait(deadline.map(|d| d.saturating_duration_since(Instant::now())))
    }
}

impl<T: EventToken> AsRawFd for EventLoop<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// Implements [`EventToken`] for a fieldless enum (`#[derive(Clone, Copy)]`)
/// and for enums whose variants carry one `usize` index:
///
/// ```
/// #[derive(Clone, Copy, Debug, PartialEq)]
/// enum Token { Kick, Stop, Fd(usize) }
/// bulkhead_common::event_token!(Token { Kick, Stop; Fd });
/// ```
///
/// Unit variants are listed before the `;`, indexed ones after it. The
/// variant goes in the low 8 bits, the index in the rest.
#[macro_export]
macro_rules! event_token {
    ($ty:ident { $($unit:ident),* $(,)? $(; $($indexed:ident),* $(,)?)? }) => {
        impl $crate::event::EventToken for $ty {
            #[allow(unused_assignments, unused_mut, unused_variables, irrefutable_let_patterns, unreachable_code)]
            fn to_raw(self) -> u64 {
                let mut tag: u64 = 0;
                $(
                    if let $ty::$unit = self {
                        return tag;
                    }
                    tag += 1;
                )*
                $($(
                    if let $ty::$indexed(i) = self {
                        return tag | ((i as u64) << 8);
                    }
                    tag += 1;
                )*)?
                unreachable!("every variant is listed")
            }
            #[allow(unused_assignments, unused_mut)]
            fn from_raw(raw: u64) -> Option<Self> {
                let want = raw & 0xff;
                let index = usize::try_from(raw >> 8).ok()?;
                let mut tag: u64 = 0;
                $(
                    if want == tag {
                        return (index == 0).then_some($ty::$unit);
                    }
                    tag += 1;
                )*
                $($(
                    if want == tag {
                        return Some($ty::$indexed(index));
                    }
                    tag += 1;
                )*)?
                None
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Token {
        Kick,
        Stop,
        Fd(usize),
    }
    crate::event_token!(Token { Kick, Stop; Fd });

    #[test]
    fn tokens_round_trip_and_unknown_data_is_refused() {
        for t in [Token::Kick, Token::Stop, Token::Fd(0), Token::Fd(7)] {
            assert_eq!(Token::from_raw(t.to_raw()), Some(t));
        }
        assert_eq!(Token::from_raw(3), None);
        assert_eq!(Token::from_raw(1 << 8), None, "a unit variant has no index");
    }

    #[test]
    fn wait_returns_the_token_of_the_ready_fd() {
        let ev = EventLoop::<Token>::new().unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        ev.add(&kick, Interest::READ, Token::Kick).unwrap();
        ev.add(&stop, Interest::READ, Token::Stop).unwrap();
        ev.add(&fd, Interest::READ, Token::Fd(3)).unwrap();
        assert!(ev.wait(Some(Duration::ZERO)).unwrap().is_empty());
        fd.write(1).unwrap();
        let got = ev.wait(Some(Duration::from_secs(1))).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].token, Token::Fd(3));
        assert!(got[0].readable && !got[0].writable);
        // Interest NONE keeps the fd registered but quiet.
        ev.modify_raw(fd.as_raw_fd(), Interest::NONE, Token::Fd(3))
            .unwrap();
        assert!(ev.wait(Some(Duration::ZERO)).unwrap().is_empty());
        ev.delete_raw(fd.as_raw_fd()).unwrap();
        stop.write(1).unwrap();
        let got = ev.wait(None).unwrap();
        assert_eq!(got[0].token, Token::Stop);
    }

    #[test]
    fn a_timeout_is_never_cut_short() {
        let ev = EventLoop::<Token>::new().unwrap();
        let t = Instant::now();
        assert!(
            ev.wait(Some(Duration::from_micros(1500)))
                .unwrap()
                .is_empty()
        );
        assert!(t.elapsed() >= Duration::from_micros(1500));
    }
}
