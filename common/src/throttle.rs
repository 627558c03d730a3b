//! I/O throttling a guest cannot escape: token buckets for operations/s and
//! bytes/s, read, write and total, shared by every queue of a daemon.
//!
//! With vhost-user the frontend is not on the data path, so only the daemon
//! can hold a guest to a rate. Each limit is a bucket of `burst` tokens that
//! refills at `rate` tokens per second; a request takes one operation token
//! and its length in byte tokens from the total bucket and from its
//! direction's bucket. A request is admitted when every bucket it draws from
//! is not in debt beyond what it asks (a bucket may go below zero by one
//! request larger than the whole bucket, and the next request waits until it
//! is paid back: the long-run rate holds whatever the request sizes).
//!
//! A queue whose request is refused keeps it as its one held request, stops
//! taking chains off its ring (the guest sees back pressure; nothing fails)
//! and sleeps until [`Hold::wait`] has passed (see
//! [`crate::worker::WorkerCtl::wake_after`]). A throttle with no limit set
//! costs one relaxed atomic load per request.
//!
//! Limits change at run time through [`Throttle::set_limits`] (the control
//! socket's call); tests drive a [`ManualClock`] instead of sleeping.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::throttle_group::{Group, SharedLevel, monotonic_ns};

/// The longest a throttled queue sleeps before it looks again, however far
/// off its turn: a run-time change of the limits ([`Throttle::set_limits`])
/// reaches a sleeping queue within this.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Nanoseconds in a second: bucket levels are kept in nano-tokens, so a
/// refill of `rate` tokens/s over `dt` ns adds exactly `rate * dt`.
const NANOS: u128 = 1_000_000_000;

/// A monotonic time source, in nanoseconds from an arbitrary start.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since this clock's start; never goes back.
    fn now_ns(&self) -> u64;
}

/// `CLOCK_MONOTONIC` itself, the one clock the members of a throttle
/// group share (an [`Instant`]'s start differs between processes).
#[derive(Debug)]
pub struct SharedMonotonic;

impl Clock for SharedMonotonic {
    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }
}

/// The real clock (`CLOCK_MONOTONIC` through [`Instant`]).
#[derive(Debug)]
pub struct MonotonicClock(Instant);

impl MonotonicClock {
    /// A clock starting now.
    pub fn new() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to: for deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let now = self.0.load(Ordering::Relaxed);
        self.0.store(now.saturating_add(ns), Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Clock for Arc<ManualClock> {
    fn now_ns(&self) -> u64 {
        self.as_ref().now_ns()
    }
}

/// One limit: a sustained rate and the bucket size (burst).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    /// Tokens per second; 0: unlimited.
    pub rate: u64,
    /// Bucket size: what may go at once after an idle spell; 0: a tenth of
    /// a second's rate (at least 1), as QEMU sizes a bucket without `-max`.
    pub burst: u64,
}

impl Limit {
    /// True when the limit is set.
    pub fn is_set(&self) -> bool {
        self.rate != 0
    }

    /// The bucket size in tokens.
    pub fn bucket(&self) -> u64 {
        if self.burst != 0 {
            self.burst
        } else {
            (self.rate / 10).max(1)
        }
    }
}

/// Every limit of a device, named like QEMU's throttle groups
/// (`iops-total`, `bps-read`, ... and their `-max` burst).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Operations/s of both directions together.
    pub iops_total: Limit,
    /// Read (blk) or receive (net) operations/s.
    pub iops_read: Limit,
    /// Write (blk) or transmit (net) operations/s.
    pub iops_write: Limit,
    /// Bytes/s of both directions together.
    pub bps_total: Limit,
    /// Read (blk) or receive (net) bytes/s.
    pub bps_read: Limit,
    /// Write (blk) or transmit (net) bytes/s.
    pub bps_write: Limit,
}

/// How a daemon spells its six limits, in [`Limits`] field order
/// (`iops_total`, `iops_read`, `iops_write`, `bps_total`, `bps_read`,
/// `bps_write`); "" for one it does not have. A burst is `NAME-max`.
pub type LimitNames = [&'static str; 6];

/// bulkhead-blk's names: QEMU's throttle-group properties.
pub const BLK_LIMIT_NAMES: LimitNames = [
    "iops-total",
    "iops-read",
    "iops-write",
    "bps-total",
    "bps-read",
    "bps-write",
];

/// bulkhead-net's names: frames and bytes per second each way (read is
/// receive, write is transmit); no totals.
pub const NET_LIMIT_NAMES: LimitNames = ["", "rx-pps", "tx-pps", "", "rx-bps", "tx-bps"];

/// Limits that make no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// `{0}-max` is set without `{0}`.
    #[error("{0}-max is set but {0} is not (a burst needs a rate)")]
    BurstWithoutRate(&'static str),
    /// `{0}-max` is below `{0}`'s own rate.
    #[error("{0}-max ({1}) is below {0} ({2}): the bucket must hold at least one second's rate")]
    BurstBelowRate(&'static str, u64, u64),
    /// A total set together with a per-direction limit of the same kind.
    #[error("{0}-total and {0}-{1} cannot be used together (as in QEMU)")]
    TotalAndDirection(&'static str, &'static str),
}

impl Limits {
    /// No limit at all.
    pub const NONE: Limits = Limits {
        iops_total: Limit { rate: 0, burst: 0 },
        iops_read: Limit { rate: 0, burst: 0 },
        iops_write: Limit { rate: 0, burst: 0 },
        bps_total: Limit { rate: 0, burst: 0 },
        bps_read: Limit { rate: 0, burst: 0 },
        bps_write: Limit { rate: 0, burst: 0 },
    };

    fn fields_mut(&mut self) -> [&mut Limit; 6] {
        [
            &mut self.iops_total,
            &mut self.iops_read,
            &mut self.iops_write,
            &mut self.bps_total,
            &mut self.bps_read,
            &mut self.bps_write,
        ]
    }

    /// The set limits as a JSON object, by the daemon's `names`: `NAME` for
    /// a rate, `NAME-max` for a burst given explicitly.
    pub fn to_json(&self, names: &LimitNames) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for ((_, l), name) in self.named().iter().zip(names) {
            if name.is_empty() || !l.is_set() {
                continue;
            }
            m.insert((*name).to_string(), l.rate.into());
            if l.burst != 0 {
                m.insert(format!("{name}-max"), l.burst.into());
            }
        }
        serde_json::Value::Object(m)
    }

    /// These limits with `changes` applied: `NAME=VALUE` pairs separated by
    /// commas or spaces, by the daemon's `names` (`NAME-max` for a burst;
    /// 0 lifts a limit; byte values may take K, M or G). Every pair must
    /// parse and the result must [`Limits::validate`], or nothing changes.
    pub fn with_changes(&self, names: &LimitNames, changes: &str) -> Result<Limits, String> {
        let mut out = *self;
        let mut any = false;
        for pair in changes
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not NAME=VALUE"))?;
            let (base, burst) = match key.strip_suffix("-max") {
                Some(b) => (b, true),
                None => (key, false),
            };
            let at = names
                .iter()
                .position(|n| !n.is_empty() && *n == base)
                .ok_or_else(|| {
                    let known: Vec<&str> =
                        names.iter().copied().filter(|n| !n.is_empty()).collect();
                    format!(
                        "unknown limit '{key}' (known: {}, each with -max)",
                        known.join(", ")
                    )
                })?;
            let value = crate::size::parse_memory(value).map_err(|e| format!("{key}: {e}"))?;
            let field = &mut out.fields_mut()[at];
            if burst {
                field.burst = value;
            } else {
                field.rate = value;
                if value == 0 {
                    field.burst = 0;
                }
            }
            any = true;
        }
        if !any {
            return Err("no NAME=VALUE given".into());
        }
        out.validate().map_err(|e| {
            // The checks name blk's limits; say them as this daemon does.
            let mut msg = e.to_string();
            for (blk, own) in BLK_LIMIT_NAMES.iter().zip(names) {
                if !own.is_empty() {
                    msg = msg.replace(blk, own);
                }
            }
            msg
        })?;
        Ok(out)
    }

    /// True when any limit is set.
    pub fn any(&self) -> bool {
        self.named().iter().any(|(_, l)| l.is_set())
    }

    fn named(&self) -> [(&'static str, Limit); 6] {
        [
            ("iops-total", self.iops_total),
            ("iops-read", self.iops_read),
            ("iops-write", self.iops_write),
            ("bps-total", self.bps_total),
            ("bps-read", self.bps_read),
            ("bps-write", self.bps_write),
        ]
    }

    /// Refuses what QEMU refuses: a burst without a rate, a burst smaller
    /// than one second of its rate, and a total together with a per-direction
    /// limit of the same kind (use one or the other).
    pub fn validate(&self) -> Result<(), LimitError> {
        for (name, l) in self.named() {
            if l.burst != 0 && l.rate == 0 {
                return Err(LimitError::BurstWithoutRate(name));
            }
            if l.burst != 0 && l.burst < l.rate {
                return Err(LimitError::BurstBelowRate(name, l.burst, l.rate));
            }
        }
        for (kind, total, read, write) in [
            ("iops", self.iops_total, self.iops_read, self.iops_write),
            ("bps", self.bps_total, self.bps_read, self.bps_write),
        ] {
            if total.is_set() && read.is_set() {
                return Err(LimitError::TotalAndDirection(kind, "read"));
            }
            if total.is_set() && write.is_set() {
                return Err(LimitError::TotalAndDirection(kind, "write"));
            }
        }
        Ok(())
    }
}

/// A request's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// blk read; net receive (tap to guest).
    Read,
    /// blk write, flush, discard, write-zeroes; net transmit (guest to tap).
    Write,
}

/// What one request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Its direction.
    pub dir: Direction,
    /// Bytes it moves (0 for a flush or discard).
    pub bytes: u64,
}

/// One token bucket; the level is in nano-tokens and may go below zero by
/// one oversized request (debt).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: u64,
    /// Bucket size in nano-tokens.
    cap: i128,
    level: i128,
    last_ns: u64,
}

impl Bucket {
    fn new(limit: Limit, now_ns: u64) -> Option<Bucket> {
        if !limit.is_set() {
            return None;
        }
        let cap = nano(limit.bucket());
        Some(Bucket {
            rate: limit.rate,
            cap,
            level: cap,
            last_ns: now_ns,
        })
    }

    fn refill(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        let add = u128::from(self.rate).saturating_mul(u128::from(dt));
        let add = i128::try_from(add).unwrap_or(i128::MAX);
        self.level = self.level.saturating_add(add).min(self.cap);
    }

    /// Nanoseconds until `tokens` may go; 0: now. A request larger than
    /// the bucket needs a full bucket.
    fn wait_ns(&self, tokens: u64) -> u64 {
        let need = nano(tokens).min(self.cap);
        if self.level >= need {
            return 0;
        }
        let short = u128::try_from(need - self.level).unwrap_or(u128::MAX);
        let ns = short.div_ceil(u128::from(self.rate.max(1)));
        u64::try_from(ns).unwrap_or(u64::MAX).max(1)
    }

    fn take(&mut self, tokens: u64) {
        self.level = self.level.saturating_sub(nano(tokens));
    }
}

impl Bucket {
    fn from_shared(limit: Limit, s: SharedLevel) -> Option<Bucket> {
        limit.is_set().then(|| Bucket {
            rate: limit.rate,
            cap: nano(limit.bucket()),
            level: s.level,
            last_ns: s.last_ns,
        })
    }
}

fn nano(tokens: u64) -> i128 {
    i128::from(tokens) * NANOS as i128
}

/// The buckets of every set limit.
#[derive(Debug, Default)]
struct Buckets {
    iops_total: Option<Bucket>,
    iops_read: Option<Bucket>,
    iops_write: Option<Bucket>,
    bps_total: Option<Bucket>,
    bps_read: Option<Bucket>,
    bps_write: Option<Bucket>,
}

impl Buckets {
    fn new(l: &Limits, now: u64) -> Self {
        Buckets {
            iops_total: Bucket::new(l.iops_total, now),
            iops_read: Bucket::new(l.iops_read, now),
            iops_write: Bucket::new(l.iops_write, now),
            bps_total: Bucket::new(l.bps_total, now),
            bps_read: Bucket::new(l.bps_read, now),
            bps_write: Bucket::new(l.bps_write, now),
        }
    }

    /// The buckets of a throttle group, from the levels it keeps.
    fn from_shared(l: &Limits, s: &[SharedLevel; 6]) -> Self {
        Buckets {
            iops_total: Bucket::from_shared(l.iops_total, s[0]),
            iops_read: Bucket::from_shared(l.iops_read, s[1]),
            iops_write: Bucket::from_shared(l.iops_write, s[2]),
            bps_total: Bucket::from_shared(l.bps_total, s[3]),
            bps_read: Bucket::from_shared(l.bps_read, s[4]),
            bps_write: Bucket::from_shared(l.bps_write, s[5]),
        }
    }

    /// Writes the levels back for the group.
    fn to_shared(&self, s: &mut [SharedLevel; 6]) {
        let all = [
            &self.iops_total,
            &self.iops_read,
            &self.iops_write,
            &self.bps_total,
            &self.bps_read,
            &self.bps_write,
        ];
        for (b, s) in all.into_iter().zip(s.iter_mut()) {
            if let Some(b) = b {
                *s = SharedLevel {
                    level: b.level,
                    last_ns: b.last_ns,
                };
            }
        }
    }

    /// Takes `bytes` of direction `dir` unconditionally.
    fn charge(&mut self, dir: Direction, bytes: u64, now: u64) {
        let bps = match dir {
            Direction::Read => &mut self.bps_read,
            Direction::Write => &mut self.bps_write,
        };
        for b in [self.bps_total.as_mut(), bps.as_mut()]
            .into_iter()
            .flatten()
        {
            b.refill(now);
            b.take(bytes);
        }
    }

    /// The buckets `cost` draws from, with the tokens it takes from each.
    fn for_cost(&mut self, cost: Cost) -> [(Option<&mut Bucket>, u64); 4] {
        let (iops, bps) = match cost.dir {
            Direction::Read => (&mut self.iops_read, &mut self.bps_read),
            Direction::Write => (&mut self.iops_write, &mut self.bps_write),
        };
        [
            (self.iops_total.as_mut(), 1),
            (iops.as_mut(), 1),
            (self.bps_total.as_mut(), cost.bytes),
            (bps.as_mut(), cost.bytes),
        ]
    }

    /// Takes `cost` and returns 0, or returns how many ns until it can.
    fn try_take(&mut self, cost: Cost, now: u64) -> u64 {
        let mut wait = 0;
        for (b, tokens) in self.for_cost(cost) {
            if let Some(b) = b {
                b.refill(now);
                wait = wait.max(b.wait_ns(tokens));
            }
        }
        if wait == 0 {
            for (b, tokens) in self.for_cost(cost) {
                if let Some(b) = b {
                    b.take(tokens);
                }
            }
        }
        wait
    }
}

/// A device's throttle, shared by all its queues.
pub struct Throttle {
    /// Some limit is set: the one check on the hot path.
    enabled: AtomicBool,
    limits: Mutex<(Limits, Buckets)>,
    /// A group shared with other daemons: its limits and buckets replace
    /// `limits`.
    group: Option<Group>,
    clock: Box<dyn Clock>,
    /// Total time requests spent held, ns.
    throttled_ns: AtomicU64,
    /// Requests held right now (at most one per queue).
    held: AtomicU64,
    /// Requests that had to wait.
    delayed: AtomicU64,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("limits", &self.limits())
            .finish_non_exhaustive()
    }
}

/// A request refused for now: the queue keeps it and tries again after
/// [`Hold::wait`].
#[derive(Debug)]
pub struct Hold<T> {
    item: T,
    cost: Cost,
    since_ns: u64,
    wait: Duration,
}

impl<T> Hold<T> {
    /// How long until it may go, as of the last try.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// How long its queue sleeps before trying again: [`Hold::wait`], at
    /// most [`MAX_SLEEP`].
    pub fn sleep(&self) -> Duration {
        self.wait.min(MAX_SLEEP)
    }

    /// The held request.
    pub fn item(&self) -> &T {
        &self.item
    }
}

impl Throttle {
    /// A throttle with `limits` on the real clock.
    pub fn new(limits: Limits) -> Result<Self, LimitError> {
        Self::with_clock(limits, Box::new(MonotonicClock::new()))
    }

    /// A throttle that never holds anything.
    pub fn unlimited() -> Self {
        Self::build(Limits::NONE, Box::new(MonotonicClock::new()))
    }

    /// A throttle with `limits` on `clock` (tests: a [`ManualClock`]).
    pub fn with_clock(limits: Limits, clock: Box<dyn Clock>) -> Result<Self, LimitError> {
        limits.validate()?;
        Ok(Self::build(limits, clock))
    }

    /// A throttle whose limits and buckets are `group`'s, shared with the
    /// group's other daemons (see [`crate::throttle_group`]).
    pub fn grouped(group: Group) -> Self {
        let mut t = Self::build(Limits::NONE, Box::new(SharedMonotonic));
        t.group = Some(group);
        t.enabled.store(true, Ordering::Relaxed);
        t
    }

    /// The group this throttle shares, if any.
    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    fn build(limits: Limits, clock: Box<dyn Clock>) -> Self {
        let now = clock.now_ns();
        Throttle {
            enabled: AtomicBool::new(limits.any()),
            limits: Mutex::new((limits, Buckets::new(&limits, now))),
            group: None,
            clock,
            throttled_ns: AtomicU64::new(0),
            held: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
        }
    }

    /// Whether any limit is set (a queue may skip costing its requests).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        if let Some(g) = &self.group {
            return g.limits();
        }
        match self.limits.lock() {
            Ok(g) => g.0,
            Err(p) => p.into_inner().0,
        }
    }

    /// Replaces every limit, at run time (the control socket's call):
    /// buckets start full. A held request is retried when its queue wakes,
    /// within [`MAX_SLEEP`]; with [`Limits::NONE`] it goes then.
    pub fn set_limits(&self, limits: Limits) -> Result<(), LimitError> {
        limits.validate()?;
        if let Some(g) = &self.group {
            g.set_limits(&limits);
            return Ok(());
        }
        let now = self.clock.now_ns();
        let mut g = match self.limits.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = (limits, Buckets::new(&limits, now));
        self.enabled.store(limits.any(), Ordering::Relaxed);
        Ok(())
    }

    fn try_take(&self, cost: Cost) -> (u64, Duration) {
        let now = self.clock.now_ns();
        if !self.enabled() {
            return (now, Duration::ZERO);
        }
        if let Some(group) = &self.group {
            let wait = group.with_levels(|l, s| {
                let mut b = Buckets::from_shared(l, s);
                let wait = b.try_take(cost, now);
                b.to_shared(s);
                wait
            });
            return (now, Duration::from_nanos(wait));
        }
        let mut g = match self.limits.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        (now, Duration::from_nanos(g.1.try_take(cost, now)))
    }

    /// Admits a new request (takes its tokens) or holds it.
    pub fn admit<T>(&self, item: T, cost: Cost) -> Result<T, Hold<T>> {
        if !self.enabled() {
            return Ok(item);
        }
        let (now, wait) = self.try_take(cost);
        if wait.is_zero() {
            return Ok(item);
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        self.delayed.fetch_add(1, Ordering::Relaxed);
        Err(Hold {
            item,
            cost,
            since_ns: now,
            wait,
        })
    }

    /// Tries a held request again.
    pub fn retry<T>(&self, mut hold: Hold<T>) -> Result<T, Hold<T>> {
        let (now, wait) = self.try_take(hold.cost);
        if wait.is_zero() {
            return Ok(self.release_at(hold, now));
        }
        hold.wait = wait;
        Err(hold)
    }

    /// Gives a held request back without taking tokens (its queue stops).
    pub fn release<T>(&self, hold: Hold<T>) -> T {
        self.release_at(hold, self.clock.now_ns())
    }

    fn release_at<T>(&self, hold: Hold<T>, now: u64) -> T {
        self.held.fetch_sub(1, Ordering::Relaxed);
        self.throttled_ns
            .fetch_add(now.saturating_sub(hold.since_ns), Ordering::Relaxed);
        hold.item
    }

    /// For a queue that cannot hold a request (net receive: a frame's size
    /// is known only once read): takes `cost` now, or says how long until
    /// it can. With `bytes` 0 it only checks that the byte buckets are not
    /// in debt; [`Throttle::charge`] then takes the bytes read.
    pub fn check(&self, cost: Cost) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let (_, wait) = self.try_take(cost);
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    /// Counts one more request that had to wait, for a queue that uses
    /// [`Throttle::check`] (once per wait, not per try).
    pub fn count_delayed(&self) {
        self.delayed.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes `bytes` of direction `dir` unconditionally (they have moved);
    /// a bucket may go into debt, which later requests wait out.
    pub fn charge(&self, dir: Direction, bytes: u64) {
        if !self.enabled() || bytes == 0 {
            return;
        }
        let now = self.clock.now_ns();
        if let Some(group) = &self.group {
            group.with_levels(|l, s| {
                let mut b = Buckets::from_shared(l, s);
                b.charge(dir, bytes, now);
                b.to_shared(s);
            });
            return;
        }
        let mut g = match self.limits.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.1.charge(dir, bytes, now);
    }

    /// Adds time a queue spent waiting without holding a request (net
    /// receive leaves frames in the tap) to the throttled time.
    pub fn add_throttled(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.throttled_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Total time requests have been held, ns (held ones count once admitted).
    pub fn throttled_ns(&self) -> u64 {
        self.throttled_ns.load(Ordering::Relaxed)
    }

    /// Requests held right now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Adds the throttle's counters to a daemon's stats.
    pub fn add_to(&self, stats: &mut crate::stats::Stats) {
        stats
            .counter(
                "throttled_ns",
                "Time queues spent held back by an I/O limit, in nanoseconds.",
                self.throttled_ns(),
            )
            .counter(
                "throttle_delayed",
                "Requests or frames an I/O limit made wait.",
                self.delayed.load(Ordering::Relaxed),
            )
            .gauge(
                "throttle_held",
                "Requests held back by an I/O limit now.",
                self.held(),
            );
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::unlimited()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Cost = Cost {
        dir: Direction::Read,
        bytes: 4096,
    };
    const WRITE: Cost = Cost {
        dir: Direction::Write,
        bytes: 4096,
    };

    fn rate(rate: u64, burst: u64) -> Limit {
        Limit { rate, burst }
    }

    fn throttle(l: Limits) -> (Throttle, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let t = Throttle::with_clock(l, Box::new(clock.clone())).unwrap();
        (t, clock)
    }

    /// Admits as many `cost` requests as go without time passing.
    fn drain(t: &Throttle, cost: Cost) -> (u64, Duration) {
        let mut n = 0;
        loop {
            match t.admit((), cost) {
                Ok(()) => n += 1,
                Err(h) => {
                    let w = h.wait();
                    t.release(h);
                    return (n, w);
                }
            }
            assert!(n < 10_000_000, "never throttled");
        }
    }

    #[test]
    fn run_time_changes_parse_by_the_daemons_names_and_validate_as_a_whole() {
        let l = Limits::NONE
            .with_changes(
                &BLK_LIMIT_NAMES,
                "iops-total=500,bps-write=10M bps-write-max=20M",
            )
            .unwrap();
        assert_eq!(
            l.iops_total,
            Limit {
                rate: 500,
                burst: 0
            }
        );
        assert_eq!(
            l.bps_write,
            Limit {
                rate: 10 << 20,
                burst: 20 << 20
            }
        );
        let json = l.to_json(&BLK_LIMIT_NAMES);
        assert_eq!(json["iops-total"], 500);
        assert_eq!(json["bps-write-max"], 20 << 20);
        // 0 lifts a limit and its burst.
        let lifted = l.with_changes(&BLK_LIMIT_NAMES, "bps-write=0").unwrap();
        assert_eq!(lifted.bps_write, Limit::default());
        // Net's own names; blk's are unknown there.
        let n = Limits::NONE
            .with_changes(&NET_LIMIT_NAMES, "tx-pps=1000")
            .unwrap();
        assert_eq!(n.iops_write.rate, 1000);
        assert_eq!(n.to_json(&NET_LIMIT_NAMES)["tx-pps"], 1000);
        let e = Limits::NONE
            .with_changes(&NET_LIMIT_NAMES, "iops-total=5")
            .unwrap_err();
        assert!(e.contains("unknown limit 'iops-total'"), "{e}");
        // A bad pair, nothing, or a result QEMU would refuse: no change.
        for bad in [
            "iops-total",
            "iops-total=lots",
            "",
            "iops-total=5,iops-read=5",
        ] {
            assert!(l.with_changes(&BLK_LIMIT_NAMES, bad).is_err(), "{bad}");
        }
        let e = Limits::NONE
            .with_changes(&NET_LIMIT_NAMES, "tx-pps=100,tx-pps-max=50")
            .unwrap_err();
        assert!(e.contains("tx-pps-max"), "said in net's words: {e}");
    }

    #[test]
    fn no_limit_admits_everything_and_counts_nothing() {
        let t = Throttle::unlimited();
        assert!(!t.enabled());
        for _ in 0..100_000 {
            assert!(t.admit((), READ).is_ok());
        }
        assert_eq!((t.held(), t.throttled_ns()), (0, 0));
    }

    #[test]
    fn a_full_bucket_admits_its_burst_then_refills_at_the_rate() {
        let (t, clock) = throttle(Limits {
            iops_total: rate(100, 0),
            ..Limits::NONE
        });
        // No -max: a tenth of a second's rate.
        let (n, wait) = drain(&t, READ);
        assert_eq!(n, 10);
        assert_eq!(wait, Duration::from_millis(10), "one token takes 10 ms");
        clock.advance(Duration::from_millis(9));
        assert_eq!(drain(&t, READ).0, 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(drain(&t, READ).0, 1);
        // Over a long spell the bucket never holds more than its size.
        clock.advance(Duration::from_secs(100));
        assert_eq!(drain(&t, READ).0, 10);
        // Sustained: 100 per second.
        let mut total = 0;
        for _ in 0..1000 {
            clock.advance(Duration::from_millis(1));
            total += drain(&t, READ).0;
        }
        assert_eq!(total, 100);
    }

    #[test]
    fn max_sets_the_burst() {
        let (t, clock) = throttle(Limits {
            iops_write: rate(50, 500),
            ..Limits::NONE
        });
        assert_eq!(drain(&t, WRITE).0, 500);
        clock.advance(Duration::from_secs(1));
        assert_eq!(drain(&t, WRITE).0, 50);
        // Reads are not limited by a write limit.
        for _ in 0..10_000 {
            assert!(t.admit((), READ).is_ok());
        }
    }

    #[test]
    fn read_write_and_total_limits_each_hold() {
        let (t, clock) = throttle(Limits {
            iops_read: rate(100, 100),
            bps_write: rate(8192, 8192),
            ..Limits::NONE
        });
        assert_eq!(drain(&t, WRITE).0, 2, "two 4 KiB writes fill 8 KiB/s");
        assert_eq!(drain(&t, READ).0, 100, "reads have their own bucket");
        clock.advance(Duration::from_millis(500));
        assert_eq!(drain(&t, WRITE).0, 1);
        assert_eq!(drain(&t, READ).0, 50);

        let (t, clock) = throttle(Limits {
            iops_total: rate(10, 10),
            ..Limits::NONE
        });
        let mut n = 0;
        for i in 0..100 {
            let cost = if i % 2 == 0 { READ } else { WRITE };
            if t.admit((), cost).is_ok() {
                n += 1;
            } else {
                break;
            }
        }
        assert_eq!(n, 10, "reads and writes share the total bucket");
        clock.advance(Duration::from_secs(1));
        // The held request from the loop still counts as held.
        assert_eq!(t.held(), 1);
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_when_it_is_full_and_leaves_debt() {
        let (t, clock) = throttle(Limits {
            bps_total: rate(1000, 1000),
            ..Limits::NONE
        });
        let big = Cost {
            dir: Direction::Write,
            bytes: 5000,
        };
        assert!(t.admit((), big).is_ok(), "a full bucket admits any size");
        // 4000 bytes of debt plus 1000 for the next one: 5 s.
        let h = t.admit((), big).unwrap_err();
        assert_eq!(h.wait(), Duration::from_secs(5));
        assert_eq!(h.sleep(), MAX_SLEEP, "a queue looks again every second");
        clock.advance(Duration::from_secs(4));
        let h = t.retry(h).unwrap_err();
        assert_eq!(h.wait(), Duration::from_secs(1));
        clock.advance(Duration::from_secs(1));
        assert!(t.retry(h).is_ok());
    }

    #[test]
    fn held_time_and_count_are_reported() {
        let (t, clock) = throttle(Limits {
            iops_total: rate(1, 1),
            ..Limits::NONE
        });
        assert!(t.admit(1, READ).is_ok());
        let h = t.admit(2, READ).unwrap_err();
        assert_eq!(*h.item(), 2);
        assert_eq!(t.held(), 1);
        clock.advance(Duration::from_millis(400));
        let h = t.retry(h).unwrap_err();
        assert_eq!(h.wait(), Duration::from_millis(600));
        clock.advance(Duration::from_millis(600));
        assert_eq!(t.retry(h).unwrap(), 2);
        assert_eq!(t.held(), 0);
        assert_eq!(t.throttled_ns(), 1_000_000_000);
        let mut stats = crate::stats::Stats::default();
        t.add_to(&mut stats);
        let line = stats.line();
        assert!(line.contains("throttled_ns=1000000000"), "{line}");
        assert!(line.contains("throttle_held=0"), "{line}");
        // Released without admission: counted, tokens untouched.
        let h = t.admit(3, READ).unwrap_err();
        clock.advance(Duration::from_millis(10));
        assert_eq!(t.release(h), 3);
        assert_eq!(t.held(), 0);
        assert_eq!(t.throttled_ns(), 1_010_000_000);
    }

    #[test]
    fn huge_values_neither_overflow_nor_stall() {
        let (t, clock) = throttle(Limits {
            iops_total: rate(u64::MAX, u64::MAX),
            bps_total: rate(u64::MAX, 0),
            ..Limits::NONE
        });
        for _ in 0..1000 {
            assert!(
                t.admit(
                    (),
                    Cost {
                        dir: Direction::Read,
                        bytes: u64::MAX / 20_000
                    }
                )
                .is_ok()
            );
        }
        clock.advance(Duration::from_secs(u64::MAX / 2));
        clock.advance(Duration::from_secs(u64::MAX / 2));
        assert!(t.admit((), READ).is_ok());

        // One token per ~584 years: the wait saturates, it does not wrap.
        let (t, _) = throttle(Limits {
            bps_read: rate(1, 1),
            ..Limits::NONE
        });
        let huge = Cost {
            dir: Direction::Read,
            bytes: u64::MAX,
        };
        assert!(t.admit((), huge).is_ok());
        let h = t.admit((), huge).unwrap_err();
        assert!(h.wait() >= Duration::from_secs(1 << 33));
    }

    #[test]
    fn nonsense_is_refused_with_a_clear_error() {
        let bad = |l: Limits| Throttle::new(l).unwrap_err().to_string();
        let e = bad(Limits {
            iops_read: rate(0, 10),
            ..Limits::NONE
        });
        assert_eq!(
            e,
            "iops-read-max is set but iops-read is not (a burst needs a rate)"
        );
        let e = bad(Limits {
            bps_write: rate(100, 10),
            ..Limits::NONE
        });
        assert!(
            e.contains("bps-write-max (10) is below bps-write (100)"),
            "{e}"
        );
        let e = bad(Limits {
            iops_total: rate(100, 0),
            iops_write: rate(10, 0),
            ..Limits::NONE
        });
        assert!(e.contains("iops-total and iops-write"), "{e}");
        // Zero everywhere is no limit.
        assert!(!Throttle::new(Limits::NONE).unwrap().enabled());
    }

    #[test]
    fn check_and_charge_hold_a_receive_queue_to_its_byte_rate() {
        let (t, clock) = throttle(Limits {
            bps_read: rate(1000, 1000),
            iops_read: rate(100, 100),
            ..Limits::NONE
        });
        let peek = Cost {
            dir: Direction::Read,
            bytes: 0,
        };
        assert_eq!(t.check(peek), Ok(()));
        t.charge(Direction::Read, 3000);
        // 2000 bytes of debt: 2 s until the byte bucket is back at zero.
        assert_eq!(t.check(peek), Err(Duration::from_secs(2)));
        clock.advance(Duration::from_secs(2));
        assert_eq!(t.check(peek), Ok(()));
        // Writes are not charged against reads.
        t.charge(Direction::Write, 1 << 40);
        assert_eq!(t.check(peek), Ok(()));
        t.add_throttled(Duration::from_millis(5));
        assert_eq!(t.throttled_ns(), 5_000_000);
    }

    #[test]
    fn limits_change_at_run_time() {
        let (t, clock) = throttle(Limits {
            iops_total: rate(1, 1),
            ..Limits::NONE
        });
        assert!(t.admit((), READ).is_ok());
        let h = t.admit((), READ).unwrap_err();
        t.set_limits(Limits::NONE).unwrap();
        assert!(!t.enabled());
        assert!(
            t.retry(h).is_ok(),
            "lifting the limits frees the held request"
        );
        let tighter = Limits {
            iops_total: rate(2, 2),
            ..Limits::NONE
        };
        t.set_limits(tighter).unwrap();
        assert_eq!(t.limits(), tighter);
        assert_eq!(drain(&t, WRITE).0, 2);
        clock.advance(Duration::from_secs(1));
        assert_eq!(drain(&t, WRITE).0, 2);
        assert!(
            t.set_limits(Limits {
                iops_total: rate(0, 1),
                ..Limits::NONE
            })
            .is_err()
        );
        assert_eq!(t.limits(), tighter, "a refused change changes nothing");
    }
}
