//! The queue-thread contract and its thread: what a device's per-queue
//! half implements ([`QueueWorker`], [`Polled`], [`WorkerCtl`]), and one
//! thread per running queue running an epoll loop over the kick eventfd, a
//! stop eventfd and the worker's own fds, with an adaptive busy-poll before
//! it sleeps (see [`BusyPoll`]).

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::virtqueue::VirtQueue;

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_FIRST_FD: u64 = 2;

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
    epoll: RawFd,
    fds: Vec<RawFd>,
}

impl WorkerCtl {
    /// A control that watches nothing, for driving a worker without a queue
    /// thread (fuzz targets, benchmarks): `watch` and `watch_io` do nothing.
    pub fn detached() -> Self {
        WorkerCtl {
            epoll: -1,
            fds: Vec::new(),
        }
    }

    /// Starts or stops watching extra fd `index` for readability.
    pub fn watch(&self, index: usize, on: bool) {
        let Some(&fd) = self.fds.get(index) else {
            return;
        };
        let ev = epoll::Event::new(
            if on {
                epoll::Events::EPOLLIN
            } else {
                epoll::Events::empty()
            },
            TOKEN_FIRST_FD + index as u64,
        );
        let _ = epoll::ctl(self.epoll, epoll::ControlOptions::EPOLL_CTL_MOD, fd, ev);
    }

    /// Starts or stops watching extra fd `index` for writability (EPOLLOUT), keeping EPOLLIN as given.
    pub fn watch_io(&self, index: usize, read: bool, write: bool) {
        let Some(&fd) = self.fds.get(index) else {
            return;
        };
        let mut events = epoll::Events::empty();
        if read {
            events |= epoll::Events::EPOLLIN;
        }
        if write {
            events |= epoll::Events::EPOLLOUT;
        }
        let ev = epoll::Event::new(events, TOKEN_FIRST_FD + index as u64);
        let _ = epoll::ctl(self.epoll, epoll::ControlOptions::EPOLL_CTL_MOD, fd, ev);
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

fn add(epoll: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    epoll::ctl(
        epoll,
        epoll::ControlOptions::EPOLL_CTL_ADD,
        fd,
        epoll::Event::new(epoll::Events::EPOLLIN, token),
    )
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
    let epoll = match epoll::create(true) {
        Ok(fd) => fd,
        Err(e) => {
            crate::rate_limited!(log::Level::Error, "queue {}: epoll: {e}", vq.index());
            return vq;
        }
    };
    let fds = worker.fds();
    let mut ok = add(epoll, kick.as_raw_fd(), TOKEN_KICK).is_ok()
        && add(epoll, stop.as_raw_fd(), TOKEN_STOP).is_ok();
    for (i, &fd) in fds.iter().enumerate() {
        ok = ok && add(epoll, fd, TOKEN_FIRST_FD + i as u64).is_ok();
    }
    let ctl = WorkerCtl { epoll, fds };
    if !ok {
        crate::rate_limited!(
            log::Level::Error,
            "queue {}: cannot watch fds: {}",
            vq.index(),
            io::Error::last_os_error()
        );
    } else {
        vq.refill_budget();
        worker.on_kick(&mut vq, &ctl);
        rekick_if_exhausted(&mut vq, &kick);
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 16];
        'outer: loop {
            let idle_since = poll.enabled().then(Instant::now);
            if !poll.window().is_zero() && spin(&mut worker, &mut vq, &ctl, poll.window(), stopping)
            {
                rekick_if_exhausted(&mut vq, &kick);
                continue;
            }
            let n = match epoll::wait(epoll, -1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::rate_limited!(
                        log::Level::Error,
                        "queue {}: epoll wait: {e}",
                        vq.index()
                    );
                    break;
                }
            };
            if let Some(t) = idle_since {
                poll.adapt(t.elapsed());
            }
            for ev in &events[..n] {
                match ev.data {
                    TOKEN_STOP => break 'outer,
                    TOKEN_KICK => {
                        // Non-blocking (`frontend_fd`): another queue given
                        // the same eventfd may have taken this kick.
                        let _ = kick.read();
                        vq.refill_budget();
                        worker.on_kick(&mut vq, &ctl);
                        rekick_if_exhausted(&mut vq, &kick);
                    }
                    t => {
                        vq.refill_budget();
                        worker.on_fd(&mut vq, (t - TOKEN_FIRST_FD) as usize, &ctl);
                        rekick_if_exhausted(&mut vq, &kick);
                    }
                }
            }
        }
    }
    worker.drain(&mut vq);
    // SAFETY: closing the epoll fd we created.
    unsafe { libc::close(epoll) };
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

    #[test]
    fn detached_control_ignores_watch_requests() {
        let ctl = WorkerCtl::detached();
        ctl.watch(0, true);
        ctl.watch_io(3, true, true);
    }
}
