//! Rate-limited logging of everything a guest or a frontend can trigger.
//!
//! A hostile guest can produce an error per request, and a hostile frontend
//! a connection or a refused message per millisecond; logging each would
//! let them fill the host's disk. [`guest_error!`] and [`rate_limited!`] log
//! at most a burst per second per call site and report how many messages
//! they suppressed. Every log line of the daemons that a guest or frontend
//! can cause goes through one of them; only start-up and shutdown lines do
//! not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Messages allowed per call site per second.
pub const BURST: u64 = 10;

/// Per-call-site state of [`guest_error!`].
pub struct RateLimit {
    second: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A fresh limiter.
    pub const fn new() -> Self {
        RateLimit {
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns Some(suppressed count since the last allowed message) if a message may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs a guest error at warn level, at most [`BURST`] per second per call site.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            if suppressed > 0 {
                log::warn!("guest error: {} ({} similar messages suppressed)", format_args!($($arg)*), suppressed);
            } else {
                log::warn!("guest error: {}", format_args!($($arg)*));
            }
        }
    }};
}
pub use guest_error;

/// Logs at `level` (a [`log::Level`]), at most [`BURST`] per second per call
/// site: for lines a guest or a frontend can cause (connections, refused
/// messages, queue errors).
#[macro_export]
macro_rules! rate_limited {
    ($level:expr, $($arg:tt)*) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            if suppressed > 0 {
                log::log!($level, "{} ({} similar messages suppressed)", format_args!($($arg)*), suppressed);
            } else {
                log::log!($level, "{}", format_args!($($arg)*));
            }
        }
    }};
}
pub use rate_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_suppresses() {
        let l = RateLimit::new();
        let allowed = (0..100).filter(|_| l.allow().is_some()).count();
        // The second may tick over during the loop: at most two bursts.
        assert!((BURST as usize..=2 * BURST as usize).contains(&allowed));
    }
}
