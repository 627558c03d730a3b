//! The transmit worker: guest frames to the tap queue, headers validated
//! (`TxFrame::parse`), small frames copied behind the header and larger ones
//! written in place, several frames per system call (`ring.rs`); frames the
//! tap refuses wait for the tap to be writable.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bulkhead_common::chain::IoVecBuf;
use bulkhead_common::throttle::{Cost, Direction, Hold, Throttle};
use bulkhead_common::{DescriptorChain, VirtQueue, WorkerCtl, guest_error};

use crate::device::{PairUse, vnet_hdr_len};
use crate::request::{HDR_LEN_V1, TxFrame, TxOffloads};
use crate::ring::TapRing;
use crate::stats::NetStats;

/// Frames a transmit worker sends before returning to its event loop.
const TX_BUDGET: u32 = 1024;
/// Frames written to the tap in one system call, at most. Also how often
/// the worker checks whether the driver asked for an interrupt (its used
/// event), not only when the ring ran dry: a driver that sleeps until 3/4 of
/// its frames are used (Linux's) then wakes while frames are still queued,
/// and refills the ring before it runs dry.
const TX_BATCH: usize = 16;
/// Most iovecs one writev takes.
const IOV_MAX: usize = 1024;
/// Frames up to this many bytes (every frame of a 1500-byte MTU) are copied,
/// behind their header, into one buffer and sent as one segment: in the
/// kernel a single-segment write is cheaper than a two-segment writev by
/// more than the copy costs (docs/performance.md: `raw-tap-writer` against
/// `raw-tap-writev`).
const COPY_MAX: usize = 2048;

/// One write of a batch: the frame's header and, for a small frame, its
/// bytes; the iovecs of its write.
struct TxSlot {
    buf: Box<[u8; HDR_LEN_V1 + COPY_MAX]>,
    iov: IoVecBuf,
}

impl Default for TxSlot {
    fn default() -> Self {
        TxSlot {
            buf: Box::new([0; HDR_LEN_V1 + COPY_MAX]),
            iov: IoVecBuf::default(),
        }
    }
}

/// Sends the guest's frames to the tap queue.
///
/// Frames taken off the ring are staged, each in a slot of its own, and
/// written when the ring has no more or the batch is full: all of a batch
/// in one system call when the ring (io_uring) is usable, one writev each
/// otherwise. A frame the tap refuses (`EAGAIN`) is kept, with the frames
/// of its batch behind it, and they are sent, in order, before anything
/// else once the tap is writable. Where the tap can refuse (see `ordered`)
/// a batch's writes are linked: none is tried after a refusal.
pub struct TxWorker {
    pub(crate) pair: PairUse,
    hdr_len: usize,
    offloads: TxOffloads,
    /// Frames the tap refused with EAGAIN, oldest first, sent before anything else.
    pub(crate) pending: VecDeque<(DescriptorChain, TxFrame)>,
    started: bool,
    scratch: Vec<u8>,
    /// Batched writes; `None`: one system call per frame. Boxed: the
    /// ring's own state is larger than the rest of the worker.
    ring: Option<Box<TapRing>>,
    slots: Vec<TxSlot>,
    /// The frames staged in `slots`, in order.
    batch: Vec<(DescriptorChain, TxFrame)>,
    /// Whether the tap may refuse a write (its send buffer is limited, or a
    /// write was refused): the batch's writes are then linked, so that no
    /// frame overtakes a refused one. Linking costs most of the batch's
    /// gain (each write is issued only once the one before completed: at
    /// 64 B 0.80x the raw tap writer linked, 1.05x not), so it is left off
    /// where the kernel never refuses (the default send buffer).
    ordered: bool,
    pub(crate) stats: Arc<NetStats>,
    /// The device's limits (`--tx-pps`, `--tx-bps`).
    throttle: Arc<Throttle>,
    /// The frame the throttle holds back: nothing more is taken off the
    /// ring until it has gone.
    /// Boxed: a throttled queue is the rare case, and it keeps the worker small.
    pub(crate) held: Option<Box<Hold<(DescriptorChain, TxFrame)>>>,
}

/// Whether a frame could be staged.
enum Staged {
    /// In its slot, ready to be written.
    Ready,
    /// In more pieces than one writev takes: sent alone, through `scratch`.
    TooManyPieces,
}

impl TxWorker {
    pub(crate) fn new(
        pair: PairUse,
        features: u64,
        stats: Arc<NetStats>,
        throttle: Arc<Throttle>,
    ) -> Self {
        use bulkhead_common::spec::net::{
            VIRTIO_NET_F_CSUM as CSUM, VIRTIO_NET_F_HOST_ECN as HOST_ECN,
            VIRTIO_NET_F_HOST_TSO4 as HOST_TSO4, VIRTIO_NET_F_HOST_TSO6 as HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO as HOST_UFO,
        };
        let bit = |m: u64| features & m != 0;
        let ring = TapRing::new().map(Box::new);
        let slots = if ring.is_some() { TX_BATCH } else { 1 };
        let ordered = pair.tap().send_buffer() != Some(i32::MAX);
        TxWorker {
            pair,
            hdr_len: vnet_hdr_len(features),
            offloads: TxOffloads {
                csum: bit(CSUM),
                tso4: bit(HOST_TSO4),
                tso6: bit(HOST_TSO6),
                ecn: bit(HOST_ECN),
                ufo: bit(HOST_UFO),
            },
            pending: VecDeque::new(),
            started: false,
            scratch: Vec::new(),
            ring,
            slots: (0..slots).map(|_| TxSlot::default()).collect(),
            batch: Vec::with_capacity(slots),
            ordered,
            stats,
            throttle,
            held: None,
        }
    }

    /// The device's throttle.
    pub(crate) fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Puts the validated header and the chain's frame bytes into the next
    /// free slot: small frames copied behind the header, larger ones as
    /// iovecs straight into guest memory.
    fn stage(&mut self, chain: &DescriptorChain, frame: &TxFrame) -> io::Result<Staged> {
        let Some(slot) = self.slots.get_mut(self.batch.len()) else {
            return Err(io::Error::other("no free transmit slot"));
        };
        let h = &frame.hdr;
        let hdr = &mut slot.buf[..HDR_LEN_V1];
        hdr[0] = h.flags;
        hdr[1] = h.gso_type;
        hdr[2..4].copy_from_slice(&{ h.hdr_len }.to_le_bytes());
        hdr[4..6].copy_from_slice(&{ h.gso_size }.to_le_bytes());
        hdr[6..8].copy_from_slice(&{ h.csum_start }.to_le_bytes());
        hdr[8..10].copy_from_slice(&{ h.csum_offset }.to_le_bytes());
        hdr[10..12].fill(0);
        let mut reader = chain.reader();
        reader.skip(self.hdr_len as u64)?;
        let total = self.hdr_len + frame.len as usize;
        let iov = slot.iov.start();
        if frame.len as usize <= COPY_MAX {
            let buf = &mut slot.buf[..total];
            reader.read_exact(&mut buf[self.hdr_len..])?;
            iov.push(libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: total,
            });
        } else {
            iov.push(libc::iovec {
                iov_base: slot.buf.as_mut_ptr().cast(),
                iov_len: self.hdr_len,
            });
            reader.iovecs_into(frame.len, iov)?;
            if iov.len() > IOV_MAX {
                return Ok(Staged::TooManyPieces);
            }
        }
        Ok(Staged::Ready)
    }

    /// Sends a frame in more pieces than one writev takes, gathered here
    /// (at most 64 KiB), behind the header staged in the next free slot.
    fn send_gathered(&mut self, chain: &DescriptorChain, frame: &TxFrame) -> io::Result<()> {
        let Some(slot) = self.slots.get_mut(self.batch.len()) else {
            return Err(io::Error::other("no free transmit slot"));
        };
        let mut r = chain.reader();
        r.skip(self.hdr_len as u64)?;
        self.scratch.resize(frame.len as usize, 0);
        r.read_exact(&mut self.scratch)?;
        let iov = [
            libc::iovec {
                iov_base: slot.buf.as_mut_ptr().cast(),
                iov_len: self.hdr_len,
            },
            libc::iovec {
                iov_base: self.scratch.as_mut_ptr().cast(),
                iov_len: self.scratch.len(),
            },
        ];
        // SAFETY: the slot's header and `scratch` live through the call.
        let n = unsafe { self.pair.tap().writev(&iov) }?;
        if n as u64 != frame.len + self.hdr_len as u64 {
            return Err(io::Error::other(format!("short tap write of {n} bytes")));
        }
        Ok(())
    }

    /// Writes the staged frames; false when the tap refused one (it and the
    /// others refused are kept in `pending`, in order).
    fn flush(&mut self, vq: &mut VirtQueue) -> bool {
        let n = self.batch.len();
        if n == 0 {
            return true;
        }
        let mut res = [-libc::EAGAIN; TX_BATCH];
        let fd = self.pair.tap().raw_fd();
        let via_ring = n > 1 && self.ring.is_some();
        match self.ring.as_mut() {
            Some(ring) if via_ring => {
                // SAFETY: each slot's iovecs point into its own buffer (owned
                // by the worker, not moved during the call) and into the
                // readable buffers of its chain, whose memory snapshot keeps
                // guest memory mapped (the chains stay in `batch`); `run`
                // returns only when every write is done.
                let r = unsafe {
                    ring.run(
                        fd,
                        true,
                        self.ordered,
                        self.slots[..n].iter().map(|s| s.iov.iovecs()),
                    )
                };
                match r {
                    Ok(r) => res[..r.len()].copy_from_slice(r),
                    Err(e) => {
                        // Whether any was written is unknown: counted as lost.
                        self.give_up_ring(log::Level::Warn, &e);
                        res[..n].fill(-libc::EIO);
                    }
                }
            }
            _ => {
                // SAFETY: as above, for one write.
                res[0] = match unsafe { self.pair.tap().writev(self.slots[0].iov.iovecs()) } {
                    Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                };
            }
        }
        let mut batch = std::mem::take(&mut self.batch);
        let mut refused = None;
        for ((chain, frame), &r) in batch.drain(..).zip(res.iter()) {
            let result = match r {
                r if r == -libc::EAGAIN || r == -libc::ECANCELED => {
                    if r == -libc::EAGAIN {
                        self.stats.tx_eagain.fetch_add(1, Ordering::Relaxed);
                        self.ordered = true;
                    }
                    self.pending.push_back((chain, frame));
                    continue;
                }
                r if via_ring && (r == -libc::EOPNOTSUPP || r == -libc::EINVAL) => {
                    // The ring cannot write this tap without blocking (a
                    // kernel whose tap lacks FMODE_NOWAIT): nothing was
                    // written; the frame goes again with a system call.
                    refused = Some(-r);
                    self.pending.push_back((chain, frame));
                    continue;
                }
                r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                r if r as u64 != frame.len + self.hdr_len as u64 => {
                    Err(io::Error::other(format!("short tap write of {r} bytes")))
                }
                _ => Ok(()),
            };
            self.finish(vq, &chain, &frame, result);
        }
        self.batch = batch;
        if let Some(errno) = refused {
            self.give_up_ring(log::Level::Info, &io::Error::from_raw_os_error(errno));
            // Sent at once, one system call each.
            return self.send_pending(vq);
        }
        self.pending.is_empty()
    }

    /// Stops batching writes: from now on one system call per frame.
    fn give_up_ring(&mut self, level: log::Level, e: &io::Error) {
        bulkhead_common::rate_limited!(
            level,
            "tap {}: no batched writes ({e}): one system call per frame",
            self.pair.tap().name()
        );
        self.ring = None;
        self.slots.truncate(1);
    }

    fn finish(
        &mut self,
        vq: &mut VirtQueue,
        chain: &DescriptorChain,
        frame: &TxFrame,
        r: io::Result<()>,
    ) {
        match r {
            Ok(()) => {
                self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.stats.tx_bytes.fetch_add(frame.len, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                guest_error!("queue {}: tap write: {e}", vq.index());
            }
        }
        vq.complete(chain.head(), 0);
    }

    /// Stages one frame, writing the batch first when it is full; false
    /// when the tap is full (the frames refused are kept).
    fn queue(&mut self, vq: &mut VirtQueue, chain: DescriptorChain, frame: TxFrame) -> bool {
        if self.batch.len() == self.slots.len() && !self.flush(vq) {
            self.pending.push_back((chain, frame));
            return false;
        }
        match self.stage(&chain, &frame) {
            Ok(Staged::Ready) => {
                self.batch.push((chain, frame));
                true
            }
            Ok(Staged::TooManyPieces) => {
                if !self.flush(vq) {
                    self.pending.push_back((chain, frame));
                    return false;
                }
                match self.send_gathered(&chain, &frame) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.stats.tx_eagain.fetch_add(1, Ordering::Relaxed);
                        self.pending.push_back((chain, frame));
                        false
                    }
                    r => {
                        self.finish(vq, &chain, &frame, r);
                        true
                    }
                }
            }
            Err(e) => {
                self.finish(vq, &chain, &frame, Err(e));
                true
            }
        }
    }

    /// Sends the frames the tap refused before; false when it is still full.
    fn send_pending(&mut self, vq: &mut VirtQueue) -> bool {
        // Taken out whole: a batch that is refused again puts its frames
        // back first, and those not tried yet go in behind them, in order.
        let mut todo = std::mem::take(&mut self.pending);
        while let Some((chain, frame)) = todo.pop_front() {
            if !self.queue(vq, chain, frame) {
                self.pending.extend(todo);
                return false;
            }
        }
        self.flush(vq)
    }

    pub(crate) fn process(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        if !self.started {
            // The tap fd is registered for EPOLLIN; the rx worker reads it, not us.
            ctl.watch_io(0, false, false);
            self.started = true;
        }
        if !self.send_pending(vq) {
            ctl.watch_io(0, false, true);
            vq.notify();
            return;
        }
        if let Some(hold) = self.held.take() {
            match self.throttle.retry(*hold) {
                Ok((chain, frame)) => {
                    ctl.cancel_wake();
                    if !self.queue(vq, chain, frame) || !self.flush(vq) {
                        ctl.watch_io(0, false, true);
                        vq.notify();
                        return;
                    }
                }
                Err(hold) => {
                    // Notifications stay off: the timer wakes the queue.
                    ctl.wake_after(hold.sleep());
                    self.held = Some(Box::new(hold));
                    vq.notify();
                    return;
                }
            }
        }
        let mut budget = TX_BUDGET;
        loop {
            vq.disable_notifications();
            loop {
                if budget == 0 {
                    // Yield to the event loop; the writable tap wakes us at once.
                    // (Refused frames wait for the same wake-up.)
                    self.flush(vq);
                    ctl.watch_io(0, false, true);
                    vq.notify();
                    return;
                }
                let chain = match vq.pop() {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(_) => {
                        self.flush(vq);
                        vq.notify();
                        return;
                    }
                };
                budget -= 1;
                match TxFrame::parse(&chain, self.hdr_len, self.offloads) {
                    Err(e) => {
                        self.stats.count_tx_error(&e);
                        guest_error!("queue {}: head {}: {e}", vq.index(), chain.head());
                        vq.complete(chain.head(), 0);
                    }
                    Ok(frame) => {
                        let cost = Cost {
                            dir: Direction::Write,
                            bytes: frame.len,
                        };
                        let (chain, frame) = match self.throttle.admit((chain, frame), cost) {
                            Ok(f) => f,
                            Err(hold) => {
                                // What was staged goes first; then the timer
                                // (or a writable tap) wakes the queue.
                                if !self.flush(vq) {
                                    ctl.watch_io(0, false, true);
                                }
                                ctl.wake_after(hold.sleep());
                                self.held = Some(Box::new(hold));
                                vq.notify();
                                return;
                            }
                        };
                        if !self.queue(vq, chain, frame) {
                            ctl.watch_io(0, false, true);
                            vq.notify();
                            return;
                        }
                    }
                }
                if self.batch.len() == self.slots.len() {
                    if !self.flush(vq) {
                        ctl.watch_io(0, false, true);
                        vq.notify();
                        return;
                    }
                    vq.notify();
                }
            }
            if !self.flush(vq) {
                ctl.watch_io(0, false, true);
                vq.notify();
                return;
            }
            match vq.enable_notifications() {
                Ok(true) => continue,
                _ => break,
            }
        }
        vq.notify();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bulkhead_common::memory::GuestMemoryHandle;
    use bulkhead_common::spec::VIRTIO_F_VERSION_1;

    /// A guest with one tx queue of 8 holding `n` single-descriptor frames (header + 60 bytes, byte 12+14 = seq).
    fn tx_queue(n: u16) -> (VirtQueue, GuestMemoryHandle) {
        use bulkhead_common::virtqueue::{CallSlot, QueueConfig, RingAddrs};
        use vm_memory::{
            Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
        };
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        let m = mem.memory();
        for i in 0..n {
            let buf = 0x4000 + 0x100 * u64::from(i);
            let mut pkt = [0u8; 72];
            pkt[26] = i as u8;
            m.write_slice(&pkt, GuestAddress(buf)).unwrap();
            let d = 0x1000 + 16 * u64::from(i);
            m.write_obj(buf, GuestAddress(d)).unwrap();
            m.write_obj(72u32, GuestAddress(d + 8)).unwrap();
            m.write_obj(0u32, GuestAddress(d + 12)).unwrap();
            m.write_obj(i, GuestAddress(0x2004 + 2 * u64::from(i)))
                .unwrap();
        }
        m.write_obj(n, GuestAddress(0x2002)).unwrap();
        let cfg = QueueConfig {
            index: 1,
            size: 8,
            addrs: RingAddrs {
                desc: GuestAddress(0x1000),
                avail: GuestAddress(0x2000),
                used: GuestAddress(0x3000),
            },
            next_avail: 0,
            used_base: 0,
            features: VIRTIO_F_VERSION_1,
            max_chain_bytes: 1 << 20,
        };
        let call = Arc::new(CallSlot::default());
        let vq = VirtQueue::start(cfg, mem.clone(), call, None, None, Default::default()).unwrap();
        (vq, mem)
    }

    /// A transmit worker (VERSION_1, no limit) writing to `fd` as its tap.
    fn tx_worker(fd: std::os::fd::OwnedFd) -> (TxWorker, Arc<NetStats>) {
        let stats = Arc::new(NetStats::default());
        let w = TxWorker::new(
            PairUse::for_test(fd),
            VIRTIO_F_VERSION_1,
            stats.clone(),
            Arc::new(Throttle::unlimited()),
        );
        (w, stats)
    }

    fn used_idx(mem: &GuestMemoryHandle) -> u16 {
        use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
        mem.memory().read_obj(GuestAddress(0x3002)).unwrap()
    }

    #[test]
    fn tx_keeps_the_frame_the_tap_refused_and_sends_everything_in_order_later() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        let rc = unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: fresh fds we own.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        // Fill the pipe: the "tap" answers EAGAIN.
        let junk = [0u8; 4096];
        // SAFETY: writing a local buffer.
        while unsafe { libc::write(wr.as_raw_fd(), junk.as_ptr().cast(), junk.len()) } > 0 {}
        let (mut w, stats) = tx_worker(wr);
        let (mut vq, mem) = tx_queue(5);
        let ctl = WorkerCtl::detached();
        w.process(&mut vq, &ctl);
        // The five were written as one batch: every one refused and kept.
        assert_eq!(w.pending.len(), 5, "the refused frames are kept");
        assert_eq!(used_idx(&mem), 0, "nothing completed, nothing lost");
        assert_eq!(vq.next_avail(), 5);
        assert_eq!(
            stats.tx_eagain.load(Ordering::Relaxed),
            1,
            "the first refused, the rest not tried"
        );
        // A kick while still full changes nothing.
        w.process(&mut vq, &ctl);
        assert_eq!((used_idx(&mem), vq.next_avail()), (0, 5));
        assert_eq!(w.pending.len(), 5);
        // Drain the pipe; the next event sends all five, in order.
        let mut buf = vec![0u8; 1 << 20];
        // SAFETY: reading into a local buffer of its length.
        while unsafe { libc::read(rd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        w.process(&mut vq, &ctl);
        assert_eq!(used_idx(&mem), 5);
        assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 5);
        // SAFETY: as above.
        let n = unsafe { libc::read(rd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(n, 5 * 72);
        let seqs: Vec<u8> = buf[..360].chunks(72).map(|c| c[26]).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    }

    /// A pty pair in raw mode, its master non-blocking: a "tap" whose file
    /// takes no `RWF_NOWAIT` (as a tap on kernels whose tun lacks
    /// FMODE_NOWAIT), so the ring answers EOPNOTSUPP.
    pub(crate) fn pty_pair() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        use std::os::fd::{FromRawFd, OwnedFd};
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty writes two fds; the other pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: fresh fds we own.
        let (m, s) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        use std::os::fd::AsRawFd;
        // SAFETY: termios calls on our own tty fds.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(s.as_raw_fd(), &mut t), 0);
            libc::cfmakeraw(&mut t);
            assert_eq!(libc::tcsetattr(s.as_raw_fd(), libc::TCSANOW, &t), 0);
            let fl = libc::fcntl(m.as_raw_fd(), libc::F_GETFL);
            assert_eq!(
                libc::fcntl(m.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK),
                0
            );
        }
        (m, s)
    }

    #[test]
    fn a_tap_the_ring_cannot_write_without_blocking_loses_no_frame() {
        use std::os::fd::AsRawFd;
        let (master, slave) = pty_pair();
        let (mut w, stats) = tx_worker(master);
        assert!(
            w.ring.is_some(),
            "io_uring unusable here: the fallback is untested"
        );
        let (mut vq, mem) = tx_queue(5);
        w.process(&mut vq, &WorkerCtl::detached());
        assert!(w.ring.is_none(), "the ring was given up");
        assert_eq!(used_idx(&mem), 5);
        assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 5);
        assert_eq!(stats.tx_errors.load(Ordering::Relaxed), 0);
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while got.len() < 5 * 72 {
            // SAFETY: reading into a local buffer of its length.
            let n = unsafe { libc::read(slave.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            assert!(n > 0, "the frames reached the pty");
            got.extend_from_slice(&buf[..n as usize]);
        }
        let seqs: Vec<u8> = got.chunks(72).map(|c| c[26]).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4], "each once, in order");
    }
}
