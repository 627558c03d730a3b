//! The receive worker: frames from the tap queue into the guest's receive
//! buffers, through the receive filter the driver set (CTRL_RX).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bulkhead_common::chain::IoVecBuf;
use bulkhead_common::throttle::{Cost, Direction, Throttle};
use bulkhead_common::{DescriptorChain, VirtQueue, WorkerCtl, guest_error};

use bulkhead_common::spec::net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};

use crate::device::{PairUse, Shared, vnet_hdr_len};
use crate::request::{ETH_HLEN, HDR_LEN_V1, MAX_FRAME_LEN, MacAddr};
use crate::ring::{BATCH_MAX, TapRing};

/// Receive buffer: the largest packet a tap hands over plus slack.
const RX_BUF_LEN: usize = HDR_LEN_V1 + MAX_FRAME_LEN as usize + 256;
/// Packets a receive worker moves before returning to its event loop.
const RX_BUDGET: usize = 256;

/// The receive filter the driver set through CTRL_RX.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFilter {
    /// Accept every frame.
    pub promisc: bool,
    /// Accept every multicast frame.
    pub allmulti: bool,
    /// Extra unicast addresses accepted.
    pub unicast: Vec<MacAddr>,
    /// Multicast addresses accepted.
    pub multicast: Vec<MacAddr>,
}

impl Default for RxFilter {
    fn default() -> Self {
        // Until the driver says otherwise, everything reaches it.
        RxFilter {
            promisc: true,
            allmulti: true,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }
}

impl RxFilter {
    /// Whether a frame for `dst` reaches a device whose address is `own` (None: unknown).
    pub fn accepts(&self, own: Option<MacAddr>, dst: MacAddr) -> bool {
        if self.promisc || dst == MacAddr::BROADCAST {
            return true;
        }
        if dst.is_multicast() {
            return self.allmulti || self.multicast.contains(&dst);
        }
        match own {
            // Without a configured address we cannot tell our frames from others.
            None => true,
            Some(m) => dst == m || self.unicast.contains(&dst),
        }
    }
}

/// The virtio-net header and the Ethernet header: read from the tap into
/// the worker's own memory (the header to be fixed up, the destination for
/// the receive filter), written into the guest's buffer by the worker.
const PREFIX_MAX: usize = HDR_LEN_V1 + ETH_HLEN as usize;
/// Most iovecs one readv takes.
const IOV_MAX: usize = 1024;

/// What became of a frame waiting for the guest.
enum Delivery {
    /// Delivered or dropped.
    Done,
    /// The guest has no room: keep it and wait for a kick.
    NoRoom,
}

/// What one batch of reads did.
enum Received {
    /// `ops` reads were made; `empty`: the tap answered `EAGAIN` (or
    /// failed), so the worker returns to its event loop once the frames read
    /// are delivered.
    Read { ops: usize, empty: bool },
    /// The queue is broken: nothing more is read.
    Stop,
    /// The guest has no receive buffer: the frames stay in the tap.
    NoRoom,
}

/// A frame read from the tap and not yet delivered.
enum Frame {
    /// The whole frame, header first, in slot 0's overflow area (the copy path).
    Copied(usize),
    /// A frame of `len` bytes read into `chain` behind slot `slot`'s prefix;
    /// what the chain could not hold is in that slot's overflow area.
    Direct {
        slot: usize,
        chain: DescriptorChain,
        len: usize,
    },
}

/// One read of a batch: its local prefix and its iovecs (prefix, the
/// chain's writable buffers behind the prefix, the slot's overflow area).
#[derive(Default)]
struct Slot {
    prefix: [u8; PREFIX_MAX],
    iov: IoVecBuf,
}

/// Moves packets from the tap queue into the guest's receive buffers.
///
/// Frames are read in batches: one readv per receive chain, all of a batch
/// in one system call (`ring.rs`), each straight into its chain behind a
/// local prefix (vnet header and Ethernet header) and ahead of a local
/// overflow area. The prefix is checked (runt, receive filter) and fixed up
/// before the worker writes it into the chain; a frame the chain cannot hold
/// goes on from the overflow into further chains (MRG_RXBUF) or is dropped.
/// A frame that is dropped, and a read that found the tap empty, leave their
/// chain unused, for the next frame. Frames are delivered in the order they
/// were read. Chains too short for the prefix, or in too many pieces for one
/// readv, take the copy path (the whole frame read into the overflow area,
/// then copied). The batch grows while every read finds a frame and shrinks
/// to what the last one found, so an idle tap costs one read per wake-up.
pub struct RxWorker {
    pub(crate) pair: PairUse,
    hdr_len: usize,
    mergeable: bool,
    guest_csum: bool,
    /// Batched reads; `None`: one readv system call per frame. Boxed: the
    /// ring's own state is larger than the rest of the worker.
    ring: Option<Box<TapRing>>,
    /// Reads in the next batch (1..=BATCH_MAX).
    batch: usize,
    slots: Vec<Slot>,
    /// `RX_BUF_LEN` bytes per slot. Large, but only the pages a frame
    /// longer than its chain reaches are ever touched.
    overflow: Vec<u8>,
    /// Frames read and not yet delivered, oldest first (only while a frame
    /// waits for the guest to post buffers; empty whenever a batch starts).
    held: VecDeque<Frame>,
    /// Receive chains taken off the ring and not used yet (bounded by the queue size).
    pub(crate) spare: VecDeque<DescriptorChain>,
    /// The chains of the batch being read, and those it left unused (kept
    /// between batches so the hot path does not allocate).
    taken: Vec<DescriptorChain>,
    unused: Vec<DescriptorChain>,
    watching: bool,
    shared: Arc<Shared>,
    /// The device's limits (`--rx-pps`, `--rx-bps`).
    throttle: Arc<Throttle>,
    /// Since when the throttle has left frames in the tap.
    throttled_since: Option<Instant>,
}

impl RxWorker {
    pub(crate) fn new(
        pair: PairUse,
        features: u64,
        shared: Arc<Shared>,
        throttle: Arc<Throttle>,
    ) -> Self {
        let bit = |m: u64| features & m != 0;
        let ring = TapRing::new().map(Box::new);
        let slots = if ring.is_some() { BATCH_MAX } else { 1 };
        RxWorker {
            pair,
            hdr_len: vnet_hdr_len(features),
            mergeable: bit(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: bit(VIRTIO_NET_F_GUEST_CSUM),
            ring,
            batch: 1,
            slots: (0..slots).map(|_| Slot::default()).collect(),
            overflow: vec![0; slots * RX_BUF_LEN],
            held: VecDeque::new(),
            spare: VecDeque::new(),
            taken: Vec::new(),
            unused: Vec::new(),
            watching: true,
            shared,
            throttle,
            throttled_since: None,
        }
    }

    /// Whether the throttle lets one more frame be read; when not, the tap
    /// is left unwatched (its frames wait there) and the thread wakes when
    /// the buckets have room.
    fn admit(&mut self, ctl: &WorkerCtl) -> bool {
        if !self.throttle.enabled() {
            return true;
        }
        // One packet, and no byte debt: the frame's bytes are charged
        // once read (its size is not known before).
        let peek = Cost {
            dir: Direction::Read,
            bytes: 0,
        };
        match self.throttle.check(peek) {
            Ok(()) => {
                if let Some(t) = self.throttled_since.take() {
                    self.throttle.add_throttled(t.elapsed());
                    ctl.cancel_wake();
                }
                true
            }
            Err(wait) => {
                if self.throttled_since.is_none() {
                    self.throttled_since = Some(Instant::now());
                    self.throttle.count_delayed();
                }
                if self.watching {
                    ctl.watch(0, false);
                    self.watching = false;
                }
                ctl.wake_after(wait.min(bulkhead_common::throttle::MAX_SLEEP));
                false
            }
        }
    }

    pub(crate) fn process(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        if !self.watching {
            // Debug: every stall of a busy queue would flood an info log.
            log::debug!(
                "queue {}: kicked while stalled: {}",
                vq.index(),
                vq.ring_state()
            );
        }
        vq.disable_notifications();
        let mut budget = RX_BUDGET;
        let mut empty = false;
        loop {
            // A frame the guest has no room for stalls the queue before
            // anything more is read.
            if self.deliver_held(vq) {
                if empty || budget == 0 || vq.is_broken() {
                    break;
                }
                if !self.admit(ctl) {
                    vq.notify();
                    return;
                }
                // The throttle admits one frame at a time.
                let want = if self.throttle.enabled() {
                    1
                } else {
                    self.batch.min(budget)
                };
                match self.receive(vq, want) {
                    Received::Read { ops, empty: e } => {
                        budget = budget.saturating_sub(ops.max(1));
                        empty = e;
                        continue;
                    }
                    Received::Stop => break,
                    Received::NoRoom => {}
                }
            }
            match vq.enable_notifications() {
                Ok(true) => continue,
                _ => {
                    // Back-pressure: leave packets in the tap until the guest kicks.
                    if self.watching {
                        log::debug!(
                            "queue {}: stalled, no receive buffer: {}",
                            vq.index(),
                            vq.ring_state()
                        );
                        self.shared.stats.rx_stalls.fetch_add(1, Ordering::Relaxed);
                        ctl.watch(0, false);
                        self.watching = false;
                    }
                    vq.notify();
                    return;
                }
            }
        }
        if !self.watching {
            ctl.watch(0, true);
            self.watching = true;
        }
        vq.notify();
    }

    /// Delivers the frames read, oldest first; false when one waits for
    /// receive buffers (it and those behind it stay held).
    fn deliver_held(&mut self, vq: &mut VirtQueue) -> bool {
        while let Some(frame) = self.held.pop_front() {
            if let Some(frame) = self.deliver(vq, frame) {
                self.held.push_front(frame);
                return false;
            }
        }
        true
    }

    /// Reads up to `want` frames from the tap, each into a receive chain of
    /// its own, and holds them for delivery. Called with nothing held.
    fn receive(&mut self, vq: &mut VirtQueue, want: usize) -> Received {
        if self.fill(vq, want) == 0 {
            if vq.is_broken() {
                return Received::Stop;
            }
            return Received::NoRoom;
        }
        let prefix_len = self.hdr_len + ETH_HLEN as usize;
        let mut count = 0;
        for (i, (chain, slot)) in self.spare.iter().zip(self.slots.iter_mut()).enumerate() {
            if i == want {
                break;
            }
            let over = self
                .overflow
                .get_mut(i * RX_BUF_LEN..(i + 1) * RX_BUF_LEN)
                .unwrap_or_default();
            if !prepare(slot, chain, over, prefix_len) {
                break;
            }
            count += 1;
        }
        if count == 0 {
            return self.receive_copy();
        }
        let mut res = [-libc::EAGAIN; BATCH_MAX];
        let fd = self.pair.tap().raw_fd();
        let via_ring = count > 1 && self.ring.is_some();
        match self.ring.as_mut() {
            Some(ring) if via_ring => {
                // SAFETY: each slot's iovecs point to its prefix and overflow
                // area (owned by the worker, not moved during the call) and
                // into the writable buffers of its chain, whose memory
                // snapshot keeps guest memory mapped (the chains stay in
                // `spare`); `run` returns only when every read is done.
                let r = unsafe {
                    ring.run(
                        fd,
                        false,
                        false,
                        self.slots[..count].iter().map(|s| s.iov.iovecs()),
                    )
                };
                match r {
                    Ok(r) => res[..r.len()].copy_from_slice(r),
                    Err(e) => {
                        self.give_up_ring(log::Level::Warn, &e);
                        return Received::Read {
                            ops: count,
                            empty: false,
                        };
                    }
                }
            }
            _ => {
                // SAFETY: as above, for one read.
                res[0] = match unsafe { self.pair.tap().readv(self.slots[0].iov.iovecs()) } {
                    Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                };
            }
        }
        let mut taken = std::mem::take(&mut self.taken);
        let mut unused = std::mem::take(&mut self.unused);
        taken.extend(self.spare.drain(..count));
        let mut found = 0;
        let mut empty = false;
        let mut refused = None;
        for (i, (chain, &r)) in taken.drain(..).zip(res.iter()).enumerate() {
            let Ok(n) = usize::try_from(r) else {
                if via_ring && matches!(-r, libc::EOPNOTSUPP | libc::EINVAL) {
                    // The ring cannot read this tap without blocking (a
                    // kernel whose tap lacks FMODE_NOWAIT): nothing was read.
                    refused = Some(-r);
                } else {
                    empty |= self.read_failed(-r);
                }
                unused.push(chain);
                continue;
            };
            found += 1;
            if n < prefix_len {
                self.shared.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                unused.push(chain);
            } else if !self.accepts(&self.slots[i].prefix[self.hdr_len..prefix_len]) {
                unused.push(chain);
            } else {
                self.held.push_back(Frame::Direct {
                    slot: i,
                    chain,
                    len: n,
                });
            }
        }
        // Chains left unused go back in front, in their order.
        for chain in unused.drain(..).rev() {
            self.spare.push_front(chain);
        }
        self.taken = taken;
        self.unused = unused;
        if let Some(errno) = refused {
            self.give_up_ring(log::Level::Info, &io::Error::from_raw_os_error(errno));
        }
        if self.ring.is_some() {
            self.batch = if empty {
                (found + 1).max(self.batch / 2)
            } else {
                self.batch * 2
            }
            .clamp(1, BATCH_MAX);
        }
        Received::Read { ops: count, empty }
    }

    /// Reads one frame whole into slot 0's overflow area: the front chain
    /// cannot take a direct read.
    fn receive_copy(&mut self) -> Received {
        let buf = self.overflow.get_mut(..RX_BUF_LEN).unwrap_or_default();
        match self.pair.tap().read(buf) {
            Ok(n) if n < self.hdr_len + ETH_HLEN as usize => {
                self.shared.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
            }
            Ok(n) => self.held.push_back(Frame::Copied(n)),
            Err(e) => {
                return Received::Read {
                    ops: 1,
                    empty: self.read_failed(e.raw_os_error().unwrap_or(libc::EIO)),
                };
            }
        }
        Received::Read {
            ops: 1,
            empty: false,
        }
    }

    /// Accounts a read that failed with `errno`; whether the worker goes
    /// back to its event loop (the tap is empty, or broken).
    fn read_failed(&mut self, errno: i32) -> bool {
        match errno {
            libc::EAGAIN => true,
            libc::EINTR => false,
            _ => {
                self.shared.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                bulkhead_common::rate_limited!(
                    log::Level::Warn,
                    "tap {}: read: {}",
                    self.pair.tap().name(),
                    io::Error::from_raw_os_error(errno)
                );
                true
            }
        }
    }

    /// Stops batching reads: from now on one readv per frame.
    fn give_up_ring(&mut self, level: log::Level, e: &io::Error) {
        bulkhead_common::rate_limited!(
            level,
            "tap {}: no batched reads ({e}): one system call per frame",
            self.pair.tap().name()
        );
        self.ring = None;
        self.batch = 1;
    }

    /// Takes receive chains off the ring until `want` are spare (or the
    /// ring has no more); returns how many are spare.
    fn fill(&mut self, vq: &mut VirtQueue, want: usize) -> usize {
        while self.spare.len() < want && self.take(vq) {}
        self.spare.len()
    }

    /// Takes the next usable receive chain off the ring into `spare`; false
    /// when the ring has none (or is broken).
    fn take(&mut self, vq: &mut VirtQueue) -> bool {
        loop {
            match vq.pop() {
                Ok(Some(c)) if c.writable_len() < self.hdr_len as u64 => {
                    self.shared
                        .stats
                        .rx_bad_buffers
                        .fetch_add(1, Ordering::Relaxed);
                    guest_error!(
                        "queue {}: receive buffer of {} bytes",
                        vq.index(),
                        c.writable_len()
                    );
                    vq.complete(c.head(), 0);
                }
                Ok(Some(c)) => {
                    self.spare.push_back(c);
                    return true;
                }
                Ok(None) | Err(_) => return false,
            }
        }
    }

    /// Whether the receive filter lets a frame with this Ethernet header
    /// through; counts it when not.
    fn accepts(&self, eth: &[u8]) -> bool {
        let mut dst = [0u8; 6];
        let Some(d) = eth.get(..6) else {
            return false;
        };
        dst.copy_from_slice(d);
        let accepted = self
            .shared
            .filter
            .lock()
            .map(|f| f.accepts(self.shared.mac, MacAddr(dst)))
            .unwrap_or(true);
        if !accepted {
            self.shared
                .stats
                .rx_filtered
                .fetch_add(1, Ordering::Relaxed);
        }
        accepted
    }

    /// Fixes up the tap's vnet header for the driver: no checksum flags for a
    /// driver without GUEST_CSUM, and the number of buffers used.
    fn fix_header(&self, hdr: &mut [u8], buffers: u16) {
        if !self.guest_csum {
            // The driver cannot take partial checksums; the tap sent none, and
            // DATA_VALID means nothing to it.
            hdr[0] = 0;
        }
        if self.hdr_len == HDR_LEN_V1 {
            hdr[10..12].copy_from_slice(&buffers.to_le_bytes());
        }
    }

    fn count(&self, len: usize) {
        let s = &self.shared.stats;
        let bytes = len.saturating_sub(self.hdr_len) as u64;
        s.rx_frames.fetch_add(1, Ordering::Relaxed);
        s.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.throttle.charge(Direction::Read, bytes);
    }

    /// Takes receive chains until `len` bytes fit in the spare ones, counted
    /// from the front (one chain without MRG_RXBUF); how many that takes.
    fn gather(&mut self, vq: &mut VirtQueue, len: u64) -> Option<usize> {
        let mut room = 0u64;
        let mut i = 0;
        loop {
            while let Some(c) = self.spare.get(i) {
                room = room.saturating_add(c.writable_len());
                i += 1;
                if room >= len || !self.mergeable {
                    return Some(i);
                }
            }
            if !self.take(vq) {
                return None;
            }
        }
    }

    /// Delivers (or drops) one frame; gives it back when the guest has no
    /// room for it.
    fn deliver(&mut self, vq: &mut VirtQueue, frame: Frame) -> Option<Frame> {
        match frame {
            Frame::Copied(len) => match self.deliver_copied(vq, len) {
                Delivery::Done => None,
                Delivery::NoRoom => Some(frame),
            },
            Frame::Direct { slot, chain, len } => self.deliver_direct(vq, slot, chain, len),
        }
    }

    /// Delivers a frame read into `chain` behind slot `slot`'s prefix.
    fn deliver_direct(
        &mut self,
        vq: &mut VirtQueue,
        slot: usize,
        chain: DescriptorChain,
        len: usize,
    ) -> Option<Frame> {
        let prefix_len = self.hdr_len + ETH_HLEN as usize;
        let head = usize::try_from(chain.writable_len()).map_or(len, |cap| len.min(cap));
        let tail = len - head;
        let mut extra = 0;
        if tail > 0 {
            if !self.mergeable {
                // Without MRG_RXBUF a packet must fit one buffer: drop it, keep the buffer.
                self.shared.stats.rx_too_big.fetch_add(1, Ordering::Relaxed);
                self.spare.push_front(chain);
                return None;
            }
            match self.gather(vq, tail as u64) {
                Some(n) => extra = n,
                None if vq.is_broken() => {
                    self.spare.push_front(chain);
                    return None;
                }
                None => return Some(Frame::Direct { slot, chain, len }),
            }
        }
        let Ok(buffers) = u16::try_from(extra + 1) else {
            // More buffers than a ring holds: cannot happen; drop the frame.
            self.spare.push_front(chain);
            return None;
        };
        let mut prefix = self.slots.get(slot).map(|s| s.prefix).unwrap_or_default();
        self.fix_header(&mut prefix, buffers);
        let written = match chain.writer().write_all(&prefix[..prefix_len]) {
            Ok(()) => head,
            Err(_) => 0,
        };
        vq.complete_chain(&chain, written as u32);
        let over = self
            .overflow
            .get(slot * RX_BUF_LEN..(slot + 1) * RX_BUF_LEN)
            .unwrap_or_default();
        let mut off = 0usize;
        for c in self.spare.drain(..extra) {
            let mut w = c.writer();
            let take = usize::try_from(w.available()).map_or(tail - off, |a| a.min(tail - off));
            let written = match over.get(off..off + take).map(|b| w.write_all(b)) {
                Some(Ok(())) => take,
                _ => 0,
            };
            off += take;
            vq.complete_chain(&c, written as u32);
        }
        self.count(len);
        None
    }

    /// Delivers a frame read whole into slot 0's overflow area (the copy path).
    fn deliver_copied(&mut self, vq: &mut VirtQueue, len: usize) -> Delivery {
        let h = self.hdr_len;
        let Some(frame) = self.overflow.get(..len.min(RX_BUF_LEN)) else {
            return Delivery::Done;
        };
        if !self.accepts(&frame[h..h + ETH_HLEN as usize]) {
            return Delivery::Done;
        }
        let len = frame.len();
        let Some(n) = self.gather(vq, len as u64) else {
            if vq.is_broken() {
                return Delivery::Done;
            }
            return Delivery::NoRoom;
        };
        if !self.mergeable && self.spare.front().map(|c| c.writable_len()) < Some(len as u64) {
            // Without MRG_RXBUF a packet must fit one buffer: drop it, keep the buffer.
            self.shared.stats.rx_too_big.fetch_add(1, Ordering::Relaxed);
            return Delivery::Done;
        }
        let mut hdr = [0u8; HDR_LEN_V1];
        hdr[..h].copy_from_slice(&self.overflow[..h]);
        self.fix_header(&mut hdr[..h], n as u16);
        self.overflow[..h].copy_from_slice(&hdr[..h]);
        let mut off = 0usize;
        for c in self.spare.drain(..n) {
            let mut w = c.writer();
            let take = (w.available() as usize).min(len - off);
            let written = match w.write_all(&self.overflow[off..off + take]) {
                Ok(()) => take,
                Err(_) => 0,
            };
            off += take;
            vq.complete_chain(&c, written as u32);
        }
        self.count(len);
        Delivery::Done
    }

    /// Every receive chain the worker holds, for a stop: the spare ones and
    /// those of frames read and not delivered (lost, as on a wire).
    pub(crate) fn take_chains(&mut self) -> Vec<u16> {
        let held = self.held.drain(..).filter_map(|f| match f {
            Frame::Direct { chain, .. } => Some(chain.head()),
            Frame::Copied(_) => None,
        });
        let mut heads: Vec<u16> = held.collect();
        heads.extend(self.spare.drain(..).map(|c| c.head()));
        heads
    }
}

/// Builds `slot`'s iovecs for a direct read into `chain`: the prefix, the
/// chain's writable buffers behind it, then `overflow`. False (the copy
/// path) when the chain is shorter than the prefix or in too many pieces.
fn prepare(
    slot: &mut Slot,
    chain: &DescriptorChain,
    overflow: &mut [u8],
    prefix_len: usize,
) -> bool {
    let cap = chain.writable_len();
    let iov = slot.iov.start();
    iov.push(libc::iovec {
        iov_base: slot.prefix.as_mut_ptr().cast(),
        iov_len: prefix_len,
    });
    let mut w = chain.writer();
    let direct = cap >= prefix_len as u64
        && w.skip(prefix_len as u64).is_ok()
        && w.iovecs_into(cap - prefix_len as u64, iov).is_ok()
        && iov.len() < IOV_MAX;
    if direct {
        iov.push(libc::iovec {
            iov_base: overflow.as_mut_ptr().cast(),
            iov_len: overflow.len(),
        });
    }
    direct
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::memory::GuestMemoryHandle;
    use bulkhead_common::spec::VIRTIO_F_VERSION_1;
    use bulkhead_common::virtqueue::{CallSlot, QueueConfig, RingAddrs};
    use std::os::fd::{AsRawFd, OwnedFd};
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

    const OWN: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
    const OTHER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
    const BUFS: u64 = 0x8000;

    /// An rx queue of 8 whose chains are the given writable buffers, each
    /// chain a list of descriptor lengths; buffers start at `BUFS`, 0x1000 apart.
    fn rx_queue(chains: &[&[u32]], features: u64) -> (VirtQueue, GuestMemoryHandle) {
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        let m = mem.memory();
        let mut d = 0u16;
        for (i, chain) in chains.iter().enumerate() {
            m.write_obj(d, GuestAddress(0x2004 + 2 * i as u64)).unwrap();
            for (k, &len) in chain.iter().enumerate() {
                let a = 0x1000 + 16 * u64::from(d);
                m.write_obj(BUFS + 0x1000 * u64::from(d), GuestAddress(a))
                    .unwrap();
                m.write_obj(len, GuestAddress(a + 8)).unwrap();
                let more = k + 1 < chain.len();
                let flags: u16 = 2 | if more { 1 } else { 0 };
                m.write_obj(flags, GuestAddress(a + 12)).unwrap();
                m.write_obj(d + 1, GuestAddress(a + 14)).unwrap();
                d += 1;
            }
        }
        m.write_obj(chains.len() as u16, GuestAddress(0x2002))
            .unwrap();
        let cfg = QueueConfig {
            index: 0,
            size: 16,
            addrs: RingAddrs {
                desc: GuestAddress(0x1000),
                avail: GuestAddress(0x2000),
                used: GuestAddress(0x3000),
            },
            next_avail: 0,
            used_base: 0,
            features,
            max_chain_bytes: 1 << 20,
        };
        let call = Arc::new(CallSlot::default());
        let vq = VirtQueue::start(cfg, mem.clone(), call, None, None, Default::default()).unwrap();
        (vq, mem)
    }

    /// Used ring: (head, len) of every used entry.
    fn used(mem: &GuestMemoryHandle) -> Vec<(u32, u32)> {
        let m = mem.memory();
        let n: u16 = m.read_obj(GuestAddress(0x3002)).unwrap();
        (0..u64::from(n))
            .map(|i| {
                let e = 0x3004 + 8 * i;
                (
                    m.read_obj(GuestAddress(e)).unwrap(),
                    m.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn read(mem: &GuestMemoryHandle, desc: u16, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.memory()
            .read_slice(&mut v, GuestAddress(BUFS + 0x1000 * u64::from(desc)))
            .unwrap();
        v
    }

    /// A packet socket standing in for the tap: `send` writes one packet
    /// (12-byte vnet header, frame to `dst` of `len` bytes, byte i = i).
    struct FakeTap {
        peer: OwnedFd,
    }

    impl FakeTap {
        fn send(&self, dst: MacAddr, len: usize) -> Vec<u8> {
            let mut p = vec![0u8; HDR_LEN_V1 + len];
            p[0] = 1; // NEEDS_CSUM, cleared for a driver without GUEST_CSUM
            for (i, b) in p[HDR_LEN_V1..].iter_mut().enumerate() {
                *b = i as u8;
            }
            let k = len.min(6);
            p[HDR_LEN_V1..HDR_LEN_V1 + k].copy_from_slice(&dst.0[..k]);
            // SAFETY: writing a local buffer.
            let n = unsafe { libc::write(self.peer.as_raw_fd(), p.as_ptr().cast(), p.len()) };
            assert_eq!(n, p.len() as isize);
            p
        }
    }

    fn worker(features: u64, filter: Option<RxFilter>) -> (RxWorker, FakeTap, Arc<Shared>) {
        let (a, b) = crate::ring::tests::seqpacket();
        let shared = Arc::new(Shared::for_test(Some(OWN)));
        if let Some(f) = filter {
            *shared.filter.lock().unwrap() = f;
        }
        let w = RxWorker::new(
            PairUse::for_test(a),
            features,
            shared.clone(),
            Arc::new(Throttle::unlimited()),
        );
        (w, FakeTap { peer: b }, shared)
    }

    const V1: u64 = VIRTIO_F_VERSION_1;
    const MRG: u64 = V1 | VIRTIO_NET_F_MRG_RXBUF;

    #[test]
    fn a_throttled_queue_leaves_frames_in_the_tap_until_the_bucket_refills() {
        use bulkhead_common::throttle::{Limit, Limits, ManualClock};
        let (mut w, tap, shared) = worker(V1, None);
        let clock = Arc::new(ManualClock::new());
        let limits = Limits {
            iops_read: Limit { rate: 1, burst: 1 },
            ..Limits::NONE
        };
        w.throttle = Arc::new(Throttle::with_clock(limits, Box::new(clock.clone())).unwrap());
        let (mut vq, mem) = rx_queue(&[&[2048], &[2048], &[2048]], V1);
        for _ in 0..3 {
            tap.send(OWN, 100);
        }
        let ctl = WorkerCtl::detached();
        w.process(&mut vq, &ctl);
        assert_eq!(used(&mem).len(), 1, "one frame per second");
        assert!(ctl.wake_deadline().is_some(), "the queue asked to wake");
        // A kick before the bucket refills reads nothing more.
        w.process(&mut vq, &ctl);
        assert_eq!(used(&mem).len(), 1);
        clock.advance(std::time::Duration::from_secs(1));
        ctl.cancel_wake();
        w.process(&mut vq, &ctl);
        assert_eq!(used(&mem).len(), 2, "the next frame came from the tap");
        assert_eq!(shared.stats.rx_frames.load(Ordering::Relaxed), 2);
        let mut stats = bulkhead_common::stats::Stats::new();
        w.throttle.add_to(&mut stats);
        let line = stats.line();
        assert!(line.contains("throttle_delayed=2"), "once per wait: {line}");
    }

    #[test]
    fn a_frame_lands_in_the_guest_buffer_behind_a_fixed_up_header() {
        let (mut w, tap, shared) = worker(V1, None);
        let (mut vq, mem) = rx_queue(&[&[64, 2048]], V1);
        let sent = tap.send(OWN, 500);
        w.process(&mut vq, &WorkerCtl::detached());
        assert_eq!(used(&mem), vec![(0, sent.len() as u32)]);
        let mut want = sent.clone();
        want[0] = 0;
        want[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut got = read(&mem, 0, 64);
        got.extend(read(&mem, 1, sent.len() - 64));
        assert_eq!(got, want);
        assert_eq!(shared.stats.rx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(shared.stats.rx_bytes.load(Ordering::Relaxed), 500);
    }

    #[test]
    fn a_filtered_runt_or_oversized_frame_leaves_its_buffer_for_the_next() {
        let filter = RxFilter {
            promisc: false,
            allmulti: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
        };
        let (mut w, tap, shared) = worker(V1, Some(filter));
        let (mut vq, mem) = rx_queue(&[&[1024]], V1);
        tap.send(OTHER, 100);
        tap.send(OWN, 5); // runt: shorter than an Ethernet header
        tap.send(OWN, 1500); // larger than the only buffer, no MRG_RXBUF
        let sent = tap.send(OWN, 60);
        w.process(&mut vq, &WorkerCtl::detached());
        let s = &shared.stats;
        assert_eq!(s.rx_filtered.load(Ordering::Relaxed), 1);
        assert_eq!(s.rx_errors.load(Ordering::Relaxed), 1);
        assert_eq!(s.rx_too_big.load(Ordering::Relaxed), 1);
        assert_eq!(
            used(&mem),
            vec![(0, sent.len() as u32)],
            "only the last is seen"
        );
        assert_eq!(read(&mem, 0, sent.len())[HDR_LEN_V1..], sent[HDR_LEN_V1..]);
    }

    #[test]
    fn a_frame_larger_than_its_buffer_spreads_over_mergeable_buffers() {
        let (mut w, tap, _) = worker(MRG, None);
        let (mut vq, mem) = rx_queue(&[&[100], &[100], &[4000]], MRG);
        let sent = tap.send(OWN, 250);
        w.process(&mut vq, &WorkerCtl::detached());
        assert_eq!(used(&mem), vec![(0, 100), (1, 100), (2, 62)]);
        let mut got = read(&mem, 0, 100);
        got.extend(read(&mem, 1, 100));
        got.extend(read(&mem, 2, 62));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[HDR_LEN_V1..], sent[HDR_LEN_V1..]);
    }

    #[test]
    fn a_frame_waits_for_more_buffers_and_buffers_shorter_than_the_headers_take_the_copy_path() {
        let (mut w, tap, _) = worker(MRG, None);
        // The first chain holds less than the two headers: copy path.
        let (mut vq, mem) = rx_queue(&[&[16], &[8, 8]], MRG);
        let sent = tap.send(OWN, 100);
        w.process(&mut vq, &WorkerCtl::detached());
        assert!(used(&mem).is_empty(), "32 bytes of room for 112: waits");
        // The guest posts one more buffer and kicks.
        let m = mem.memory();
        m.write_obj(3u16, GuestAddress(0x2004 + 4)).unwrap();
        let a = 0x1000 + 16 * 3;
        m.write_obj(BUFS + 0x3000, GuestAddress(a)).unwrap();
        m.write_obj(2048u32, GuestAddress(a + 8)).unwrap();
        m.write_obj(2u16, GuestAddress(a + 12)).unwrap();
        m.write_obj(3u16, GuestAddress(0x2002)).unwrap();
        w.process(&mut vq, &WorkerCtl::detached());
        assert_eq!(used(&mem), vec![(0, 16), (1, 16), (3, 80)]);
        let mut got = read(&mem, 0, 16);
        got.extend(read(&mem, 1, 8));
        got.extend(read(&mem, 2, 8));
        got.extend(read(&mem, 3, 80));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
        assert_eq!(got[HDR_LEN_V1..], sent[HDR_LEN_V1..]);
    }

    #[test]
    fn stopping_gives_every_unused_buffer_back() {
        let (mut w, tap, _) = worker(V1, None);
        let (mut vq, mem) = rx_queue(&[&[64], &[64]], V1);
        tap.send(OWN, 1000); // too big for either: dropped, buffer kept
        w.process(&mut vq, &WorkerCtl::detached());
        let heads = w.take_chains();
        assert!(!heads.is_empty());
        assert!(vq.give_back(&heads).is_empty());
        assert!(used(&mem).is_empty());
        assert!(w.spare.is_empty() && w.held.is_empty());
    }

    /// Posts one more receive buffer of `len` bytes as descriptor `d`,
    /// avail entry `d`.
    fn post(mem: &GuestMemoryHandle, d: u16, len: u32) {
        let m = mem.memory();
        m.write_obj(d, GuestAddress(0x2004 + 2 * u64::from(d)))
            .unwrap();
        let a = 0x1000 + 16 * u64::from(d);
        m.write_obj(BUFS + 0x1000 * u64::from(d), GuestAddress(a))
            .unwrap();
        m.write_obj(len, GuestAddress(a + 8)).unwrap();
        m.write_obj(2u16, GuestAddress(a + 12)).unwrap();
        m.write_obj(d + 1, GuestAddress(0x2002)).unwrap();
    }

    #[test]
    fn frames_read_in_batches_arrive_whole_and_in_order() {
        let (mut w, tap, shared) = worker(V1, None);
        assert!(w.ring.is_some(), "io_uring unusable here: batches untested");
        let (mut vq, mem) = rx_queue(&[&[2048u32][..]; 12], V1);
        let sent: Vec<Vec<u8>> = (0..10).map(|i| tap.send(OWN, 60 + 100 * i)).collect();
        w.process(&mut vq, &WorkerCtl::detached());
        let u = used(&mem);
        assert_eq!(u.len(), 10);
        for (i, ((head, len), frame)) in u.iter().zip(&sent).enumerate() {
            assert_eq!(*len as usize, frame.len(), "frame {i}");
            let got = read(&mem, *head as u16, frame.len());
            assert_eq!(got[HDR_LEN_V1..], frame[HDR_LEN_V1..], "frame {i}");
        }
        assert!(w.batch > 1, "the batch grew while every read found a frame");
        assert_eq!(shared.stats.rx_frames.load(Ordering::Relaxed), 10);
        // The chains the last batch found no frame for are spare, not used.
        assert_eq!(w.spare.len() + u.len(), 12);
    }

    #[test]
    fn frames_behind_one_waiting_for_buffers_wait_with_it_in_order() {
        let (mut w, tap, _) = worker(MRG, None);
        assert!(w.ring.is_some(), "io_uring unusable here: batches untested");
        w.batch = 3;
        let (mut vq, mem) = rx_queue(&[&[100], &[100], &[100]], MRG);
        let a = tap.send(OWN, 150); // needs two buffers
        let b = tap.send(OWN, 50);
        let c = tap.send(OWN, 60);
        w.process(&mut vq, &WorkerCtl::detached());
        assert!(
            used(&mem).is_empty(),
            "a waits for a buffer, b and c behind it"
        );
        assert_eq!(w.held.len(), 3);
        post(&mem, 3, 2048);
        w.process(&mut vq, &WorkerCtl::detached());
        let tail = (a.len() - 100) as u32;
        assert_eq!(
            used(&mem),
            vec![
                (0, 100),
                (3, tail),
                (1, b.len() as u32),
                (2, c.len() as u32)
            ]
        );
        let mut got = read(&mem, 0, 100);
        got.extend(read(&mem, 3, tail as usize));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
        assert_eq!(got[HDR_LEN_V1..], a[HDR_LEN_V1..]);
        assert_eq!(read(&mem, 1, b.len())[HDR_LEN_V1..], b[HDR_LEN_V1..]);
        assert_eq!(read(&mem, 2, c.len())[HDR_LEN_V1..], c[HDR_LEN_V1..]);
    }

    #[test]
    fn filter_follows_promisc_allmulti_and_tables() {
        let own = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let other = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
        let mc = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);
        let mut f = RxFilter::default();
        assert!(f.accepts(Some(own), other));
        f.promisc = false;
        f.allmulti = false;
        assert!(f.accepts(Some(own), own));
        assert!(!f.accepts(Some(own), other));
        assert!(f.accepts(None, other));
        assert!(f.accepts(Some(own), MacAddr::BROADCAST));
        assert!(!f.accepts(Some(own), mc));
        f.multicast.push(mc);
        f.unicast.push(other);
        assert!(f.accepts(Some(own), mc));
        assert!(f.accepts(Some(own), other));
    }

    #[test]
    fn a_tap_the_ring_cannot_read_without_blocking_is_read_one_frame_at_a_time() {
        use std::os::fd::AsRawFd;
        let (master, slave) = crate::tx::tests::pty_pair();
        let shared = Arc::new(Shared::for_test(Some(OWN)));
        let mut w = RxWorker::new(
            PairUse::for_test(master),
            V1,
            shared.clone(),
            Arc::new(Throttle::unlimited()),
        );
        assert!(
            w.ring.is_some(),
            "io_uring unusable here: the fallback is untested"
        );
        w.batch = 4;
        let (mut vq, mem) = rx_queue(&[&[2048], &[2048], &[2048], &[2048]], V1);
        // A pty is a byte stream: what is written arrives as one "frame".
        let mut frame = [0u8; HDR_LEN_V1 + 100];
        frame[HDR_LEN_V1..HDR_LEN_V1 + 6].copy_from_slice(&OWN.0);
        // SAFETY: writing a local buffer.
        let n = unsafe { libc::write(slave.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(n, frame.len() as isize);
        w.process(&mut vq, &WorkerCtl::detached());
        assert!(w.ring.is_none(), "the ring was given up");
        assert_eq!(used(&mem), vec![(0, frame.len() as u32)]);
        assert_eq!(shared.stats.rx_errors.load(Ordering::Relaxed), 0);
        assert_eq!(shared.stats.rx_frames.load(Ordering::Relaxed), 1);
    }
}
