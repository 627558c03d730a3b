//! The transmit worker: guest frames to the tap queue, headers validated
//! (`TxFrame::parse`), small frames copied behind the header and larger ones
//! written in place; a frame the tap refuses waits for the tap to be writable.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bulkhead_common::chain::IoVecBuf;
use bulkhead_common::throttle::{Cost, Direction, Hold, Throttle};
use bulkhead_common::{DescriptorChain, VirtQueue, WorkerCtl, guest_error};

use crate::device::{PairUse, vnet_hdr_len};
use crate::request::{HDR_LEN_V1, TxFrame, TxOffloads};
use crate::stats::NetStats;

/// Frames a transmit worker sends before returning to its event loop.
const TX_BUDGET: u32 = 1024;
/// A transmit worker checks every this many frames whether the driver asked
/// for an interrupt (its used event), not only when the ring ran dry: a driver
/// that sleeps until 3/4 of its frames are used (Linux's) then wakes while
/// frames are still queued, and refills the ring before it runs dry.
const TX_NOTIFY_EVERY: u32 = 16;
/// Most iovecs one writev takes.
const IOV_MAX: usize = 1024;
/// Frames up to this many bytes (every frame of a 1500-byte MTU) are copied,
/// behind their header, into one buffer and sent with one plain write: in
/// the kernel a single-segment write is cheaper than a two-segment writev
/// by more than the copy costs (docs/performance.md: `raw-tap-writer`
/// against `raw-tap-writev`).
const COPY_MAX: usize = 2048;

/// Sends the guest's frames to the tap queue.
pub struct TxWorker {
    pub(crate) pair: PairUse,
    hdr_len: usize,
    offloads: TxOffloads,
    /// The frame the tap refused with EAGAIN, sent before anything else.
    pub(crate) pending: Option<(DescriptorChain, TxFrame)>,
    started: bool,
    scratch: Vec<u8>,
    /// The iovecs of the frame being sent, kept between frames.
    iov: IoVecBuf,
    /// Header and bytes of a frame of at most [`COPY_MAX`] bytes.
    small: Box<[u8; HDR_LEN_V1 + COPY_MAX]>,
    pub(crate) stats: Arc<NetStats>,
    /// The device's limits (`--tx-pps`, `--tx-bps`).
    throttle: Arc<Throttle>,
    /// The frame the throttle holds back: nothing more is taken off the
    /// ring until it has gone.
    /// Boxed: a throttled queue is the rare case, and it keeps the worker small.
    pub(crate) held: Option<Box<Hold<(DescriptorChain, TxFrame)>>>,
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
            pending: None,
            started: false,
            scratch: Vec::new(),
            iov: IoVecBuf::default(),
            small: Box::new([0; HDR_LEN_V1 + COPY_MAX]),
            stats,
            throttle,
            held: None,
        }
    }

    /// The device's throttle.
    pub(crate) fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Writes the validated header and the chain's frame bytes to the tap in
    /// one write: small frames copied behind the header, larger ones as a
    /// writev straight from guest memory.
    fn send(&mut self, chain: &DescriptorChain, frame: &TxFrame) -> io::Result<()> {
        let h = &frame.hdr;
        let mut hdr = [0u8; HDR_LEN_V1];
        hdr[0] = h.flags;
        hdr[1] = h.gso_type;
        hdr[2..4].copy_from_slice(&{ h.hdr_len }.to_le_bytes());
        hdr[4..6].copy_from_slice(&{ h.gso_size }.to_le_bytes());
        hdr[6..8].copy_from_slice(&{ h.csum_start }.to_le_bytes());
        hdr[8..10].copy_from_slice(&{ h.csum_offset }.to_le_bytes());
        let mut reader = chain.reader();
        reader.skip(self.hdr_len as u64)?;
        let total = self.hdr_len + frame.len as usize;
        if frame.len as usize <= COPY_MAX {
            let buf = &mut self.small[..total];
            buf[..self.hdr_len].copy_from_slice(&hdr[..self.hdr_len]);
            reader.read_exact(&mut buf[self.hdr_len..])?;
            let n = self.pair.tap().write(buf)?;
            if n != total {
                return Err(io::Error::other(format!("short tap write of {n} bytes")));
            }
            return Ok(());
        }
        let iov = self.iov.start();
        iov.push(libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: self.hdr_len,
        });
        reader.iovecs_into(frame.len, iov)?;
        if iov.len() > IOV_MAX {
            // Too many pieces for one writev: gather them here (at most 64 KiB).
            iov.truncate(1);
            let mut r = chain.reader();
            r.skip(self.hdr_len as u64)?;
            self.scratch.resize(frame.len as usize, 0);
            r.read_exact(&mut self.scratch)?;
            iov.push(libc::iovec {
                iov_base: self.scratch.as_mut_ptr().cast(),
                iov_len: self.scratch.len(),
            });
        }
        // SAFETY: `hdr` and `scratch` live through the call; the other iovecs
        // point into guest memory kept mapped by the chain's memory snapshot.
        let n = unsafe { self.pair.tap().writev(iov) }?;
        if n as u64 != frame.len + self.hdr_len as u64 {
            return Err(io::Error::other(format!("short tap write of {n} bytes")));
        }
        Ok(())
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

    /// Tries to send one frame; false when the tap is full and the frame was kept.
    fn try_send(&mut self, vq: &mut VirtQueue, chain: DescriptorChain, frame: TxFrame) -> bool {
        match self.send(&chain, &frame) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.stats.tx_eagain.fetch_add(1, Ordering::Relaxed);
                self.pending = Some((chain, frame));
                false
            }
            r => {
                self.finish(vq, &chain, &frame, r);
                true
            }
        }
    }

    pub(crate) fn process(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        if !self.started {
            // The tap fd is registered for EPOLLIN; the rx worker reads it, not us.
            ctl.watch_io(0, false, false);
            self.started = true;
        }
        if let Some((chain, frame)) = self.pending.take()
            && !self.try_send(vq, chain, frame)
        {
            ctl.watch_io(0, false, true);
            vq.notify();
            return;
        }
        if let Some(hold) = self.held.take() {
            match self.throttle.retry(*hold) {
                Ok((chain, frame)) => {
                    ctl.cancel_wake();
                    if !self.try_send(vq, chain, frame) {
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
                    ctl.watch_io(0, false, true);
                    vq.notify();
                    return;
                }
                let chain = match vq.pop() {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(_) => {
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
                                ctl.wake_after(hold.sleep());
                                self.held = Some(Box::new(hold));
                                vq.notify();
                                return;
                            }
                        };
                        if !self.try_send(vq, chain, frame) {
                            ctl.watch_io(0, false, true);
                            vq.notify();
                            return;
                        }
                    }
                }
                if budget.is_multiple_of(TX_NOTIFY_EVERY) {
                    vq.notify();
                }
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
mod tests {
    use super::*;
    use crate::device::Pair;
    use crate::tap::Tap;
    use bulkhead_common::memory::GuestMemoryHandle;
    use bulkhead_common::spec::VIRTIO_F_VERSION_1;
    use std::sync::Mutex;

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
        let stats = Arc::new(NetStats::default());
        let pair = Arc::new(Pair {
            index: 0,
            tap: Tap::from_fd_for_test(wr),
            users: Mutex::new(0),
        });
        let mut w = TxWorker::new(
            PairUse::new(pair),
            VIRTIO_F_VERSION_1,
            stats.clone(),
            Arc::new(Throttle::unlimited()),
        );
        let (mut vq, mem) = tx_queue(5);
        let ctl = WorkerCtl::detached();
        w.process(&mut vq, &ctl);
        assert!(w.pending.is_some(), "the refused frame is kept");
        assert_eq!(used_idx(&mem), 0, "nothing completed, nothing lost");
        assert_eq!(
            vq.next_avail(),
            1,
            "no more frames taken while the tap is full"
        );
        assert_eq!(stats.tx_eagain.load(Ordering::Relaxed), 1);
        // A kick while still full changes nothing.
        w.process(&mut vq, &ctl);
        assert_eq!((used_idx(&mem), vq.next_avail()), (0, 1));
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
}
