//! The queue-thread contract and its thread: what a device's per-queue
//! half implements ([`QueueWorker`], [`Polled`], [`WorkerCtl`]), and one
//! thread per running queue running an epoll loop over the kick eventfd, a
//! stop eventfd and the worker's own fds, with an adaptive busy-poll before
//! it sleeps (see [`BusyPoll`]). A worker held back by its throttle asks for
//! a wake-up ([`WorkerCtl::wake_after`]): the thread then sleeps until that
//! deadline (or a stop, a kick, an fd) without busy-polling.

use std::cell::Cell;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::event::{Event, EventLoop, Interest};
use crate::virtqueue::VirtQueue;

/// What woke a queue thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// The guest kicked the queue.
    Kick,
    /// The handler stops the queue.
    Stop,
    /// The worker's own fd at this index of [`QueueWorker::fds`].
    Fd(usize),
}
crate::event_token!(Token { Kick, Stop; Fd });

/// What every queue thread runs first, before it touches its queue.
pub type ThreadStartHook = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

static THREAD_START: OnceLock<ThreadStartHook> = OnceLock::new();

/// Installs the function every queue thread runs first (the sandbox's
/// per-thread seccomp filter, see [`crate::sandbox`]); once per process.
/// A thread whose hook fails does not serve its queue. Gives the hook back if
/// one was installed before.
pub fn set_thread_start_hook(hook: ThreadStartHook) -> Result<(), ThreadStartHook> {
    THREAD_START.set(hook)
}

/// What one call of [`QueueWorker::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Work was waiting and has been handled.
    Work,
    /// Nothing yet; polling on may catch the next request.
    Nothing,
    /// Stop polling and sleep: what comes next is done by other threads
    /// (I/O workers, a full tap draining) that need this CPU more than a
    /// spinning thread does, and whose completion wakes the thread anyway.
    Sleep,
}

/// The per-queue half of a device, run by its own thread.
pub trait QueueWorker: Send + 'static {
    /// The queue thread may busy-poll this worker (see [`QueueWorker::poll`])
    /// before it sleeps; asked once, when the thread starts.
    fn busy_polls(&self) -> bool {
        false
    }

    /// Busy-poll hook: handles work that arrived since the last event and
    /// can be seen without a syscall (new chains on the ring, completions in
    /// a shared ring). Called in a tight loop for a few microseconds before
    /// the queue thread sleeps, so it must be cheap when there is nothing.
    fn poll(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) -> Polled {
        let _ = (vq, ctl);
        Polled::Sleep
    }

    /// Extra fds the worker thread polls (an I/O completion fd, a tap); level-triggered.
    fn fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// The guest kicked the queue (also called once when the queue starts).
    fn on_kick(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl);

    /// The deadline the worker asked for with [`WorkerCtl::wake_after`] has
    /// passed (a throttled request may go now). Default: as a kick.
    fn on_timer(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        self.on_kick(vq, ctl);
    }

    /// Extra fd number `index` (position in [`QueueWorker::fds`]) is ready.
    fn on_fd(&mut self, vq: &mut VirtQueue, index: usize, ctl: &WorkerCtl) {
        let _ = (vq, index, ctl);
    }

    /// The queue is stopping: finish or give up every request in flight.
    fn drain(&mut self, vq: &mut VirtQueue) {
        let _ = vq;
    }
}

/// Lets a worker change which of its fds are watched (back-pressure).
pub struct WorkerCtl {
    events: Option<EventLoop<Token>>,
    fds: Vec<RawFd>,
    /// When to call [`QueueWorker::on_timer`]; None: no timer.
    wake: Cell<Option<Instant>>,
}

impl WorkerCtl {
    /// A control that watches nothing, for driving a worker without a queue
    /// thread (fuzz targets, benchmarks): `watch` and `watch_io` do nothing.
    pub fn detached() -> Self {
        WorkerCtl {
            events: None,
            fds: Vec::new(),
            wake: Cell::new(None),
        }
    }

    /// Asks for [`QueueWorker::on_timer`] after `d` (the earliest of several
    /// asks wins). Until then the thread does not busy-poll: a throttled
    /// queue sleeps, and still wakes at once for a stop, a kick or an fd.
    pub fn wake_after(&self, d: Duration) {
        let at = Instant::now().checked_add(d);
        let at = match (self.wake.get(), at) {
            (Some(old), Some(new)) => Some(old.min(new)),
            (old, new) => old.or(new),
        };
        // A deadline past what Instant can hold: a day (any kick retries).
        let at = at.or_else(|| Instant::now().checked_add(Duration::from_secs(86_400)));
        self.wake.set(at);
    }

    /// The pending wake-up deadline, if any.
    pub fn wake_deadline(&self) -> Option<Instant> {
        self.wake.get()
    }

    /// Cancels the wake-up asked for with [`WorkerCtl::wake_after`].
    pub fn cancel_wake(&self) {
        self.wake.set(None);
    }

    /// Starts or stops watching extra fd `index` for readability.
    pub fn watch(&self, index: usize, on: bool) {
        self.watch_io(index, on, false);
    }

    /// Starts or stops watching extra fd `index` for writability (EPOLLOUT), keeping EPOLLIN as given.
    pub fn watch_io(&self, index: usize, read: bool, write: bool) {
        let (Some(events), Some(&fd)) = (&self.events, self.fds.get(index)) else {
            return;
        };
        let interest = Interest {
            read,
            write,
            hangup: false,
        };
        let _ = events.modify_raw(fd, interest, Token::Fd(index));
    }
}

/// How long a queue thread busy-polls before it sleeps in epoll, adapted to
/// the gaps it sees between bursts of work (like QEMU's `poll-max-ns`).
///
/// Sleeping costs a wakeup on the next kick: a cross-CPU interrupt and a
/// scheduler round trip, tens of microseconds in a nested VM. When work keeps
/// arriving within `max`, polling the ring catches it without one. The window
/// starts at zero, doubles (from [`BusyPoll::START`]) while the idle gaps stay
/// shorter than `max`, and drops back to zero after one gap longer than
/// `max`, so an idle queue does not spin.
#[derive(Debug, Clone, Copy)]
pub struct BusyPoll {
    max: Duration,
    window: Duration,
}

impl BusyPoll {
    /// First window after a short gap.
    pub const START: Duration = Duration::from_micros(4);

    /// A poller that never polls longer than `max` (zero: never polls).
    pub fn new(max: Duration) -> Self {
        BusyPoll {
            max,
            window: Duration::ZERO,
        }
    }

    /// The current window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// False when the maximum is zero: the thread never polls, and needs no clock.
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// Adapts the window to an idle gap that polling did not cover: `idle`
    /// from the start of polling until the thread woke from its sleep.
    pub fn adapt(&mut self, idle: Duration) {
        if idle <= self.window {
            // Polled long enough; the work came just after.
        } else if idle > self.max {
            self.window = Duration::ZERO;
        } else if self.window < self.max {
            self.window = if self.window.is_zero() {
                Self::START.min(self.max)
            } else {
                (self.window * 2).min(self.max)
            };
        }
    }
}

/// Spins up to `window` calling the worker's poll hook; true once it found
/// work. Gives up at once when the thread is asked to stop, so a guest that
/// keeps its ring busy cannot keep the thread from its stop request.
fn spin<W: QueueWorker>(
    worker: &mut W,
    vq: &mut VirtQueue,
    ctl: &WorkerCtl,
    window: Duration,
    stopping: &AtomicBool,
) -> bool {
    let start = Instant::now();
    loop {
        if stopping.load(Ordering::Acquire) {
            return false;
        }
        vq.refill_budget();
        match worker.poll(vq, ctl) {
            Polled::Work => return true,
            Polled::Sleep => return false,
            Polled::Nothing => {}
        }
        if start.elapsed() >= window {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// A running queue thread.
pub struct QueueThread {
    stop: EventFd,
    /// Set before `stop` is signalled: seen by a thread that is busy-polling.
    stopping: Arc<AtomicBool>,
    handle: JoinHandle<VirtQueue>,
}

impl QueueThread {
    /// Spawns the thread for `vq`, driven by `kick`, busy-polling up to
    /// `poll_max` before it sleeps where the worker supports it
    /// ([`QueueWorker::busy_polls`]).
    pub fn spawn<W: QueueWorker>(
        vq: VirtQueue,
        worker: W,
        kick: EventFd,
        poll_max: Duration,
    ) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let name = format!("vring-{}", vq.index());
        let poll = BusyPoll::new(if worker.busy_polls() {
            poll_max
        } else {
            Duration::ZERO
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(vq, worker, kick, stop2, poll, &flag))?;
        Ok(QueueThread {
            stop,
            stopping,
            handle,
        })
    }

    /// Stops the thread after its worker drained, and returns the queue.
    pub fn stop(self) -> Option<VirtQueue> {
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        match self.handle.join() {
            Ok(vq) => Some(vq),
            Err(_) => {
                crate::rate_limited!(log::Level::Error, "queue thread panicked");
                None
            }
        }
    }
}

/// A round that ran out of budget left work on the ring: kick ourselves, so
/// the thread returns to it after looking at its other events (stop above all).
fn rekick_if_exhausted(vq: &mut VirtQueue, kick: &EventFd) {
    if vq.take_exhausted() {
        let _ = kick.write(1);
    }
}

fn run<W: QueueWorker>(
    mut vq: VirtQueue,
    mut worker: W,
    kick: EventFd,
    stop: EventFd,
    mut poll: BusyPoll,
    stopping: &AtomicBool,
) -> VirtQueue {
    if let Some(hook) = THREAD_START.get()
        && let Err(e) = hook()
    {
        crate::rate_limited!(
            log::Level::Error,
            "queue {}: cannot confine the queue thread: {e}",
            vq.index()
        );
        return vq;
    }
    let events = match EventLoop::new() {
        Ok(e) => e,
        Err(e) => {
            crate::rate_limited!(log::Level::Error, "queue {}: epoll: {e}", vq.index());
            return vq;
        }
    };
    let fds = worker.fds();
    let mut ok = events.add(&kick, Interest::READ, Token::Kick).is_ok()
        && events.add(&stop, Interest::READ, Token::Stop).is_ok();
    for (i, &fd) in fds.iter().enumerate() {
        ok = ok && events.add_raw(fd, Interest::READ, Token::Fd(i)).is_ok();
    }
    let ctl = WorkerCtl {
        events: Some(events),
        fds,
        wake: Cell::new(None),
    };
    if !ok {
        crate::rate_limited!(
            log::Level::Error,
            "queue {}: cannot watch fds: {}",
            vq.index(),
            io::Error::last_os_error()
        );
    } else if let Some(events) = &ctl.events {
        vq.refill_budget();
        worker.on_kick(&mut vq, &ctl);
        rekick_if_exhausted(&mut vq, &kick);
        let mut ready: Vec<Event<Token>> = Vec::with_capacity(16);
        'outer: loop {
            // A worker waiting for its timer (throttled) neither spins nor adapts the window.
            let deadline = ctl.wake.get();
            if let Some(at) = deadline
                && Instant::now() >= at
            {
                // A worker that keeps asking for an immediate wake-up
                // cannot keep the thread from its stop request.
                if stopping.load(Ordering::Acquire) {
                    break;
                }
                ctl.wake.set(None);
                vq.refill_budget();
                worker.on_timer(&mut vq, &ctl);
                rekick_if_exhausted(&mut vq, &kick);
                continue;
            }
            let idle_since = (poll.enabled() && deadline.is_none()).then(Instant::now);
            if deadline.is_none()
                && !poll.window().is_zero()
                && spin(&mut worker, &mut vq, &ctl, poll.window(), stopping)
            {
                rekick_if_exhausted(&mut vq, &kick);
                continue;
            }
            let timeout = deadline.map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = events.wait_into(timeout, &mut ready) {
                crate::rate_limited!(log::Level::Error, "queue {}: epoll wait: {e}", vq.index());
                break;
            }
            if ready.is_empty() {
                // EINTR, or the timer's deadline: looked at above.
                continue;
            }
            if let Some(t) = idle_since {
                poll.adapt(t.elapsed());
            }
            for ev in &ready {
                match ev.token {
                    Token::Stop => break 'outer,
                    Token::Kick => {
                        // Non-blocking (`frontend_fd`): another queue given
                        // the same eventfd may have taken this kick.
                        let _ = kick.read();
                        vq.refill_budget();
                        worker.on_kick(&mut vq, &ctl);
                        rekick_if_exhausted(&mut vq, &kick);
                    }
                    Token::Fd(i) => {
                        vq.refill_budget();
                        worker.on_fd(&mut vq, i, &ctl);
                        rekick_if_exhausted(&mut vq, &kick);
                    }
                }
            }
        }
    }
    worker.drain(&mut vq);
    vq
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_poll_grows_while_gaps_are_short_and_stops_after_a_long_one() {
        let max = Duration::from_micros(32);
        let mut p = BusyPoll::new(max);
        assert!(p.window().is_zero());
        p.adapt(Duration::from_micros(10));
        assert_eq!(p.window(), BusyPoll::START);
        for _ in 0..10 {
            p.adapt(Duration::from_micros(30));
        }
        assert_eq!(p.window(), max, "doubles up to the maximum, never past it");
        p.adapt(Duration::from_micros(20));
        assert_eq!(p.window(), max, "a gap the window covered changes nothing");
        p.adapt(Duration::from_millis(5));
        assert!(p.window().is_zero(), "an idle queue stops spinning");
    }

    #[test]
    fn busy_poll_with_a_zero_maximum_never_polls() {
        let mut p = BusyPoll::new(Duration::ZERO);
        assert!(!p.enabled());
        for gap in [0, 1, 10, 1000] {
            p.adapt(Duration::from_micros(gap));
            assert!(p.window().is_zero());
        }
    }

    /// A worker whose poll always finds work (a guest that never lets the ring run dry).
    struct AlwaysBusy {
        polls: Arc<std::sync::atomic::AtomicU64>,
        busy_polls: bool,
    }

    impl QueueWorker for AlwaysBusy {
        fn busy_polls(&self) -> bool {
            self.busy_polls
        }
        fn on_kick(&mut self, _vq: &mut VirtQueue, _ctl: &WorkerCtl) {}
        fn poll(&mut self, _vq: &mut VirtQueue, _ctl: &WorkerCtl) -> Polled {
            self.polls.fetch_add(1, Ordering::Relaxed);
            Polled::Work
        }
    }

    /// Spawns a thread over `worker`, lets it run, and stops it; fails
    /// instead of hanging if the stop is not seen within 10 s.
    fn run_then_stop(busy_polls: bool) -> u64 {
        let guest = crate::virtqueue::tests::Guest::new();
        let (vq, _call) = guest.queue(0);
        let polls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker = AlwaysBusy {
            polls: polls.clone(),
            busy_polls,
        };
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = QueueThread::spawn(
            vq,
            worker,
            kick.try_clone().unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
        // Short gaps between kicks open the polling window.
        for _ in 0..20 {
            kick.write(1).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(t.stop().is_some()));
        let stopped = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(stopped, Ok(true), "the queue thread did not stop");
        polls.load(Ordering::Relaxed)
    }

    #[test]
    fn a_thread_that_always_finds_work_while_polling_still_stops() {
        assert!(run_then_stop(true) > 0, "the worker was polled");
    }

    #[test]
    fn a_worker_that_does_not_poll_is_never_polled() {
        assert_eq!(run_then_stop(false), 0);
    }

    /// A worker that is always throttled: every kick or timer asks for a
    /// wake-up after `wait`, and polling finds nothing to do.
    struct Throttled {
        wait: Duration,
        timers: Arc<std::sync::atomic::AtomicU64>,
        polls: Arc<std::sync::atomic::AtomicU64>,
    }

    impl QueueWorker for Throttled {
        fn busy_polls(&self) -> bool {
            true
        }
        fn on_kick(&mut self, _vq: &mut VirtQueue, ctl: &WorkerCtl) {
            ctl.wake_after(self.wait);
        }
        fn on_timer(&mut self, _vq: &mut VirtQueue, ctl: &WorkerCtl) {
            self.timers.fetch_add(1, Ordering::Relaxed);
            ctl.wake_after(self.wait);
        }
        fn poll(&mut self, _vq: &mut VirtQueue, _ctl: &WorkerCtl) -> Polled {
            self.polls.fetch_add(1, Ordering::Relaxed);
            Polled::Nothing
        }
    }

    fn spawn_throttled(
        wait: Duration,
    ) -> (
        QueueThread,
        Arc<std::sync::atomic::AtomicU64>,
        Arc<std::sync::atomic::AtomicU64>,
        EventFd,
    ) {
        let guest = crate::virtqueue::tests::Guest::new();
        let (vq, _call) = guest.queue(0);
        let timers = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let polls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker = Throttled {
            wait,
            timers: timers.clone(),
            polls: polls.clone(),
        };
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = QueueThread::spawn(
            vq,
            worker,
            kick.try_clone().unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
        (t, timers, polls, kick)
    }

    #[test]
    fn a_throttled_worker_gets_its_timer_and_is_not_busy_polled() {
        let (t, timers, polls, kick) = spawn_throttled(Duration::from_millis(5));
        for _ in 0..20 {
            kick.write(1).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(t.stop().is_some());
        assert!(timers.load(Ordering::Relaxed) > 0, "the timer fired");
        assert_eq!(
            polls.load(Ordering::Relaxed),
            0,
            "a waiting worker is not polled"
        );
    }

    #[test]
    fn a_worker_that_always_asks_to_wake_at_once_still_stops() {
        let (t, timers, _, kick) = spawn_throttled(Duration::ZERO);
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(t.stop().is_some()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        assert!(timers.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_stop_is_not_delayed_by_a_long_wake_up() {
        let (t, timers, _, kick) = spawn_throttled(Duration::from_secs(600));
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (tx, rx) = std::sync::mpsc::channel();
        let start = Instant::now();
        std::thread::spawn(move || tx.send(t.stop().is_some()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(timers.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn detached_control_ignores_watch_requests() {
        let ctl = WorkerCtl::detached();
        ctl.watch(0, true);
        ctl.watch_io(3, true, true);
    }
}
