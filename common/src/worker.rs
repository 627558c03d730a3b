//! The queue-thread contract and its threads: what a device's per-queue
//! half implements ([`QueueWorker`], [`Polled`], [`WorkerCtl`]), and the
//! threads that run workers: an epoll loop over each queue's kick eventfd
//! and the worker's own fds, with an adaptive busy-poll before it sleeps
//! (see [`BusyPoll`]). A worker held back by its throttle asks for a wake-up
//! ([`WorkerCtl::wake_after`]): the thread then sleeps until that deadline
//! (or a stop, a kick, an fd) without busy-polling.
//!
//! Most queues get a thread of their own ([`QueueThread`]). A device may
//! put several queues on one thread ([`QueueGroup`]) where its requests hop
//! between them (a console's input and its echo): the thread that just ran
//! is still on a warm CPU, while waking a second thread on a CPU that slept
//! for milliseconds costs a wake-up from deep idle (see
//! docs/performance-notes.md, "console echo").

use std::cell::Cell;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::event::{Event, EventLoop, Interest};
use crate::virtqueue::VirtQueue;

/// What woke a queue thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// The handler sent commands (a queue joins or leaves, or the thread ends).
    Control,
    /// The guest kicked the queue in this member slot.
    Kick(usize),
    /// A worker's own fd: [`fd_token`] of its slot and its index in
    /// [`QueueWorker::fds`].
    Fd(usize),
}
crate::event_token!(Token { Control; Kick, Fd });

/// Bits of [`Token::Fd`]'s index that hold the fd's position in its worker's list.
const FD_BITS: u32 = 16;

fn fd_token(slot: usize, index: usize) -> Token {
    Token::Fd((slot << FD_BITS) | (index & ((1 << FD_BITS) - 1)))
}

fn fd_of_token(raw: usize) -> (usize, usize) {
    (raw >> FD_BITS, raw & ((1 << FD_BITS) - 1))
}

/// What every queue thread runs first, before it touches its queue.
pub type ThreadStartHook = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

static THREAD_START: OnceLock<ThreadStartHook> = OnceLock::new();

/// Installs the function every queue thread runs first (the sandbox's
/// per-thread seccomp filter, see [`crate::sandbox`]); once per process.
/// A thread whose hook fails does not serve its queues. Gives the hook back
/// if one was installed before.
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

/// The per-queue half of a device, run by a queue thread.
pub trait QueueWorker: Send + 'static {
    /// The queue thread may busy-poll this worker (see [`QueueWorker::poll`])
    /// before it sleeps; asked once, when the queue starts.
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

    /// Extra fds the worker thread polls (an I/O completion fd, a tap);
    /// level-triggered. Workers sharing a [`QueueGroup`] must not list the
    /// same fd number twice.
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
    events: Option<Rc<EventLoop<Token>>>,
    /// The worker's member slot on its thread (in its fds' tokens).
    slot: usize,
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
            slot: 0,
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
        let _ = events.modify_raw(fd, interest, fd_token(self.slot, index));
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

/// One queue served by a queue thread.
struct Member {
    vq: VirtQueue,
    worker: Box<dyn QueueWorker>,
    kick: EventFd,
    ctl: WorkerCtl,
    poll: BusyPoll,
    /// False when its fds could not be watched: kept (and given back on
    /// remove) but never run.
    served: bool,
}

impl Member {
    /// Runs one worker call on a fresh budget; a round that ran out kicks
    /// the queue again.
    fn run(&mut self, f: impl FnOnce(&mut dyn QueueWorker, &mut VirtQueue, &WorkerCtl)) {
        self.vq.refill_budget();
        f(self.worker.as_mut(), &mut self.vq, &self.ctl);
        rekick_if_exhausted(&mut self.vq, &self.kick);
    }
}

/// A queue joining a thread.
struct Joining {
    vq: VirtQueue,
    worker: Box<dyn QueueWorker>,
    kick: EventFd,
    poll_max: Duration,
}

/// What the handler asks of a queue thread.
enum Command {
    Add(Box<Joining>),
    /// Drain queue `index` and send it back.
    Remove {
        index: u16,
        reply: mpsc::Sender<VirtQueue>,
    },
}

/// One thread serving a changing set of queues. Queues join with
/// [`QueueGroup::add`] and leave, drained, with [`QueueGroup::remove`]; the
/// others keep running meanwhile. Dropping the group ends the thread (its
/// remaining queues drained).
pub struct QueueGroup {
    commands: Option<mpsc::Sender<Command>>,
    /// Wakes the thread for its commands.
    control: EventFd,
    /// Commands are waiting: set after each is sent (and when the group is
    /// dropped), seen by a thread that is busy-polling.
    stopping: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    members: usize,
}

impl QueueGroup {
    /// Spawns a thread named `vring-{first}` that serves no queue yet.
    pub fn spawn(first: u16) -> io::Result<Self> {
        let control = EventFd::new(libc::EFD_NONBLOCK)?;
        let control2 = control.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vring-{first}"))
            .spawn(move || run(rx, control2, &flag))?;
        Ok(QueueGroup {
            commands: Some(tx),
            control,
            stopping,
            handle: Some(handle),
            members: 0,
        })
    }

    fn send(&self, cmd: Command) -> io::Result<()> {
        let sent = self.commands.as_ref().is_some_and(|c| c.send(cmd).is_ok());
        if !sent {
            return Err(io::Error::other("queue thread ended"));
        }
        // After the send: a thread that takes the flag down sees the command.
        self.stopping.store(true, Ordering::Release);
        self.control.write(1)
    }

    /// Starts serving `vq` on this thread, driven by `kick`, busy-polling
    /// up to `poll_max` before the thread sleeps where the worker supports
    /// it ([`QueueWorker::busy_polls`]).
    pub fn add<W: QueueWorker>(
        &mut self,
        vq: VirtQueue,
        worker: W,
        kick: EventFd,
        poll_max: Duration,
    ) -> io::Result<()> {
        self.send(Command::Add(Box::new(Joining {
            vq,
            worker: Box::new(worker),
            kick,
            poll_max,
        })))?;
        self.members += 1;
        Ok(())
    }

    /// Stops serving queue `index` after its worker drained, and returns
    /// it; `None` if the thread does not hold it (it ended or panicked).
    pub fn remove(&mut self, index: u16) -> Option<VirtQueue> {
        self.members = self.members.saturating_sub(1);
        let (reply, answer) = mpsc::channel();
        if self.send(Command::Remove { index, reply }).is_err() {
            return None;
        }
        let vq = answer.recv().ok();
        if vq.is_none() {
            crate::rate_limited!(
                log::Level::Error,
                "queue {index}: its thread ended or panicked"
            );
        }
        vq
    }

    /// Queues added and not removed.
    pub fn len(&self) -> usize {
        self.members
    }

    /// No queue is left on the thread.
    pub fn is_empty(&self) -> bool {
        self.members == 0
    }
}

impl Drop for QueueGroup {
    fn drop(&mut self) {
        // A closed channel ends the thread once it looks at its commands.
        self.commands = None;
        self.stopping.store(true, Ordering::Release);
        let _ = self.control.write(1);
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            crate::rate_limited!(log::Level::Error, "queue thread panicked");
        }
    }
}

/// A thread of its own for one queue.
pub struct QueueThread {
    group: QueueGroup,
    index: u16,
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
        let index = vq.index();
        let mut group = QueueGroup::spawn(index)?;
        group.add(vq, worker, kick, poll_max)?;
        Ok(QueueThread { group, index })
    }

    /// Stops the thread after its worker drained, and returns the queue.
    pub fn stop(mut self) -> Option<VirtQueue> {
        self.group.remove(self.index)
    }
}

/// A round that ran out of budget left work on the ring: kick ourselves, so
/// the thread returns to it after looking at its other events (stop above all).
fn rekick_if_exhausted(vq: &mut VirtQueue, kick: &EventFd) {
    if vq.take_exhausted() {
        let _ = kick.write(1);
    }
}

/// Spins, calling the poll hook of each member that busy-polls and waits for
/// no timer, each up to its own window; true once one found work. Gives up
/// at once when the thread is asked to stop a queue, so a guest that keeps
/// its ring busy cannot keep the thread from its stop request.
fn spin(members: &mut [Option<Member>], stopping: &AtomicBool) -> bool {
    let start = Instant::now();
    let mut asleep = 0u64; // members that said Sleep (slots >= 64 never do)
    loop {
        if stopping.load(Ordering::Acquire) {
            return false;
        }
        let elapsed = start.elapsed();
        let mut polled = false;
        let mut found = false;
        for (slot, m) in members.iter_mut().enumerate() {
            let Some(m) = m else { continue };
            let bit = 1u64.checked_shl(slot as u32).unwrap_or(0);
            if !m.served
                || asleep & bit != 0
                || m.ctl.wake.get().is_some()
                || elapsed >= m.poll.window()
            {
                continue;
            }
            polled = true;
            m.vq.refill_budget();
            match m.worker.poll(&mut m.vq, &m.ctl) {
                Polled::Work => {
                    rekick_if_exhausted(&mut m.vq, &m.kick);
                    found = true;
                }
                Polled::Sleep => asleep |= bit,
                Polled::Nothing => {}
            }
        }
        if found {
            return true;
        }
        if !polled {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Watches a joining queue's kick and fds in `slot` and runs its first kick.
fn join(j: Joining, slot: usize, events: &Rc<EventLoop<Token>>) -> Member {
    let Joining {
        vq,
        worker,
        kick,
        poll_max,
    } = j;
    let fds = worker.fds();
    let mut ok = events.add(&kick, Interest::READ, Token::Kick(slot)).is_ok();
    for (i, &fd) in fds.iter().enumerate() {
        ok = ok
            && events
                .add_raw(fd, Interest::READ, fd_token(slot, i))
                .is_ok();
    }
    if !ok {
        crate::rate_limited!(
            log::Level::Error,
            "queue {}: cannot watch fds: {}",
            vq.index(),
            io::Error::last_os_error()
        );
    }
    let poll = BusyPoll::new(if worker.busy_polls() {
        poll_max
    } else {
        Duration::ZERO
    });
    let mut m = Member {
        vq,
        worker,
        kick,
        ctl: WorkerCtl {
            events: Some(events.clone()),
            slot,
            fds,
            wake: Cell::new(None),
        },
        poll,
        served: ok,
    };
    if ok {
        m.run(|w, vq, ctl| w.on_kick(vq, ctl));
    } else {
        leave_events(&m, events);
    }
    m
}

/// Stops watching a member's kick and fds (they stay open elsewhere: the
/// handler keeps the kick, the device its fds).
fn leave_events(m: &Member, events: &EventLoop<Token>) {
    let _ = events.delete_raw(m.kick.as_raw_fd());
    for &fd in &m.ctl.fds {
        let _ = events.delete_raw(fd);
    }
}

/// Drains a leaving member and gives its queue back.
fn leave(mut m: Member, events: Option<&EventLoop<Token>>) -> VirtQueue {
    if let Some(events) = events {
        leave_events(&m, events);
    }
    m.worker.drain(&mut m.vq);
    m.vq
}

/// Carries out one command of the handler.
fn apply(cmd: Command, members: &mut Vec<Option<Member>>, events: Option<&Rc<EventLoop<Token>>>) {
    match cmd {
        Command::Add(j) => {
            let slot = members
                .iter()
                .position(Option::is_none)
                .unwrap_or(members.len());
            let m = match events {
                Some(events) => join(*j, slot, events),
                // A thread that could not set up serves nothing but keeps
                // its queues to give them back.
                None => Member {
                    ctl: WorkerCtl::detached(),
                    poll: BusyPoll::new(Duration::ZERO),
                    served: false,
                    vq: j.vq,
                    worker: j.worker,
                    kick: j.kick,
                },
            };
            if slot == members.len() {
                members.push(Some(m));
            } else {
                members[slot] = Some(m);
            }
        }
        Command::Remove { index, reply } => {
            let found = members
                .iter()
                .position(|m| m.as_ref().is_some_and(|m| m.vq.index() == index));
            if let Some(m) = found.and_then(|slot| members[slot].take()) {
                let _ = reply.send(leave(m, events.map(|e| &**e)));
            }
        }
    }
}

/// Carries out the commands waiting; false once the handler dropped the group.
fn apply_commands(
    commands: &mpsc::Receiver<Command>,
    members: &mut Vec<Option<Member>>,
    events: &Rc<EventLoop<Token>>,
    stopping: &AtomicBool,
) -> bool {
    // Taken down before reading. The handler raises it after each send, so
    // either this swap sees it raised, and with it every command sent
    // before (Acquire), or the raise comes after and stays up for the
    // next look: a command never waits behind a thread that keeps spinning.
    stopping.swap(false, Ordering::AcqRel);
    loop {
        match commands.try_recv() {
            Ok(cmd) => apply(cmd, members, Some(events)),
            Err(mpsc::TryRecvError::Empty) => return true,
            Err(mpsc::TryRecvError::Disconnected) => return false,
        }
    }
}

/// Confines the thread and makes its epoll; `None` (logged) if either fails.
fn setup(control: &EventFd) -> Option<Rc<EventLoop<Token>>> {
    let name = std::thread::current().name().unwrap_or("queue").to_string();
    if let Some(hook) = THREAD_START.get()
        && let Err(e) = hook()
    {
        crate::rate_limited!(
            log::Level::Error,
            "{name}: cannot confine the queue thread: {e}"
        );
        return None;
    }
    let events = EventLoop::new().and_then(|events| {
        events.add(control, Interest::READ, Token::Control)?;
        Ok(events)
    });
    match events {
        Ok(events) => Some(Rc::new(events)),
        Err(e) => {
            crate::rate_limited!(log::Level::Error, "{name}: epoll: {e}");
            None
        }
    }
}

fn run(commands: mpsc::Receiver<Command>, control: EventFd, stopping: &AtomicBool) {
    let mut members: Vec<Option<Member>> = Vec::new();
    match setup(&control) {
        Some(events) => {
            serve(&commands, &control, &events, &mut members, stopping);
            for m in members.into_iter().flatten() {
                let _ = leave(m, Some(&events));
            }
        }
        None => {
            while let Ok(cmd) = commands.recv() {
                apply(cmd, &mut members, None);
            }
        }
    }
}

/// Whether `m` may busy-poll now: it polls, and waits for no timer.
fn may_poll(m: &Member) -> bool {
    m.served && m.poll.enabled() && m.ctl.wake.get().is_none()
}

/// The thread's loop: due timers, then a busy-poll, then epoll; returns
/// when the handler dropped the group or epoll failed.
fn serve(
    commands: &mpsc::Receiver<Command>,
    control: &EventFd,
    events: &Rc<EventLoop<Token>>,
    members: &mut Vec<Option<Member>>,
    stopping: &AtomicBool,
) {
    let mut ready: Vec<Event<Token>> = Vec::with_capacity(16);
    loop {
        // Commands first: a worker that keeps finding work or keeps asking
        // for an immediate wake-up cannot hold a removal back.
        if stopping.load(Ordering::Acquire) {
            let _ = control.read();
            if !apply_commands(commands, members, events, stopping) {
                return;
            }
        }
        // Timers that are due (a throttled request may go now).
        let mut now = None;
        let mut next: Option<Instant> = None;
        let mut fired = false;
        for m in members.iter_mut().flatten() {
            let Some(at) = m.ctl.wake.get() else { continue };
            if *now.get_or_insert_with(Instant::now) >= at {
                m.ctl.wake.set(None);
                m.run(|w, vq, ctl| w.on_timer(vq, ctl));
                fired = true;
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        if fired {
            continue;
        }
        // A worker waiting for its timer (throttled) neither spins nor adapts its window.
        let idle_since = members.iter().flatten().any(may_poll).then(Instant::now);
        let spins = members
            .iter()
            .flatten()
            .any(|m| may_poll(m) && !m.poll.window().is_zero());
        if spins && spin(members, stopping) {
            continue;
        }
        let timeout = next.map(|at| at.saturating_duration_since(Instant::now()));
        if let Err(e) = events.wait_into(timeout, &mut ready) {
            crate::rate_limited!(log::Level::Error, "queue thread: epoll wait: {e}");
            return;
        }
        if let Some(t) = idle_since {
            let idle = t.elapsed();
            for (slot, m) in members.iter_mut().enumerate() {
                let woke = |ev: &Event<Token>| match ev.token {
                    Token::Kick(s) => s == slot,
                    Token::Fd(raw) => fd_of_token(raw).0 == slot,
                    Token::Control => false,
                };
                if let Some(m) = m
                    && may_poll(m)
                    && ready.iter().any(woke)
                {
                    m.poll.adapt(idle);
                }
            }
        }
        let mut control_ready = false;
        for ev in &ready {
            match ev.token {
                Token::Control => control_ready = true,
                Token::Kick(slot) => {
                    if let Some(Some(m)) = members.get_mut(slot) {
                        // Non-blocking (`frontend_fd`): another queue given
                        // the same eventfd may have taken this kick.
                        let _ = m.kick.read();
                        m.run(|w, vq, ctl| w.on_kick(vq, ctl));
                    }
                }
                Token::Fd(raw) => {
                    let (slot, i) = fd_of_token(raw);
                    if let Some(Some(m)) = members.get_mut(slot) {
                        m.run(|w, vq, ctl| w.on_fd(vq, i, ctl));
                    }
                }
            }
        }
        if control_ready {
            let _ = control.read();
            if !apply_commands(commands, members, events, stopping) {
                return;
            }
        }
    }
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

    /// Counts its kicks (the first, at start, included).
    struct Counting(Arc<std::sync::atomic::AtomicU64>);

    impl QueueWorker for Counting {
        fn on_kick(&mut self, _vq: &mut VirtQueue, _ctl: &WorkerCtl) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn wait_for(count: &std::sync::atomic::AtomicU64, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::Relaxed) < at_least {
            assert!(Instant::now() < deadline, "no kick handled within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_group_serves_each_of_its_queues_and_the_rest_keep_running_when_one_leaves() {
        let guest = crate::virtqueue::tests::Guest::new();
        let mut group = QueueGroup::spawn(0).unwrap();
        let counts: Vec<_> = (0..2)
            .map(|_| Arc::new(std::sync::atomic::AtomicU64::new(0)))
            .collect();
        let kicks: Vec<_> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        for i in 0..2 {
            let (vq, _call) = guest.queue_at(i as u16, 0);
            let kick = kicks[i].try_clone().unwrap();
            group
                .add(vq, Counting(counts[i].clone()), kick, Duration::ZERO)
                .unwrap();
        }
        assert_eq!(group.len(), 2);
        for i in 0..2 {
            wait_for(&counts[i], 1);
            kicks[i].write(1).unwrap();
            wait_for(&counts[i], 2);
        }
        let vq = group.remove(0).expect("queue 0 comes back");
        assert_eq!(vq.index(), 0);
        assert!(group.remove(0).is_none(), "queue 0 left already");
        // Queue 0's kick is no longer watched; queue 1 is still served.
        let before = counts[0].load(Ordering::Relaxed);
        kicks[0].write(1).unwrap();
        kicks[1].write(1).unwrap();
        wait_for(&counts[1], 3);
        assert_eq!(counts[0].load(Ordering::Relaxed), before);
        // A queue may join again, in the slot queue 0 left.
        let (vq, _call) = guest.queue_at(2, 0);
        group
            .add(
                vq,
                Counting(counts[0].clone()),
                kicks[0].try_clone().unwrap(),
                Duration::ZERO,
            )
            .unwrap();
        wait_for(&counts[0], before + 1);
        assert_eq!(group.remove(1).map(|q| q.index()), Some(1));
        assert_eq!(group.remove(2).map(|q| q.index()), Some(2));
        assert!(group.is_empty());
        drop(group);
    }

    #[test]
    fn detached_control_ignores_watch_requests() {
        let ctl = WorkerCtl::detached();
        ctl.watch(0, true);
        ctl.watch_io(3, true, true);
    }
}
