//! The receive worker: frames from the tap queue into the guest's receive
//! buffers, through the receive filter the driver set (CTRL_RX).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bulkhead_common::{DescriptorChain, VirtQueue, WorkerCtl, guest_error};

use crate::device::{PairUse, Shared, features, vnet_hdr_len};
use crate::request::{ETH_HLEN, HDR_LEN_V1, MAX_FRAME_LEN, MacAddr};

/// Receive buffer: the largest packet a tap hands over plus slack.
const RX_BUF_LEN: usize = HDR_LEN_V1 + MAX_FRAME_LEN as usize + 256;
/// Packets a receive worker moves before returning to its event loop.
const RX_BUDGET: u32 = 256;

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

/// What happened to the packet waiting for the guest.
enum Delivery {
    /// Delivered or dropped: the buffer is free again.
    Done,
    /// The guest has no room: keep it and wait for a kick.
    NoRoom,
}

/// Moves packets from the tap queue into the guest's receive buffers.
pub struct RxWorker {
    pub(crate) pair: PairUse,
    hdr_len: usize,
    mergeable: bool,
    guest_csum: bool,
    buf: Vec<u8>,
    /// Length of the one packet read from the tap and not yet delivered.
    pending: Option<usize>,
    /// Receive chains taken off the ring and not used yet (bounded by the queue size).
    pub(crate) spare: VecDeque<DescriptorChain>,
    watching: bool,
    shared: Arc<Shared>,
}

impl RxWorker {
    pub(crate) fn new(pair: PairUse, features: u64, shared: Arc<Shared>) -> Self {
        let bit = |b: u32| features & (1 << b) != 0;
        RxWorker {
            pair,
            hdr_len: vnet_hdr_len(features),
            mergeable: bit(features::MRG_RXBUF),
            guest_csum: bit(features::GUEST_CSUM),
            buf: vec![0; RX_BUF_LEN],
            pending: None,
            spare: VecDeque::new(),
            watching: true,
            shared,
        }
    }

    pub(crate) fn process(&mut self, vq: &mut VirtQueue, ctl: &WorkerCtl) {
        vq.disable_notifications();
        let mut budget = RX_BUDGET;
        loop {
            if self.pending.is_some() {
                match self.deliver(vq) {
                    Delivery::Done => self.pending = None,
                    Delivery::NoRoom => match vq.enable_notifications() {
                        Ok(true) => continue,
                        _ => {
                            // Back-pressure: leave packets in the tap until the guest kicks.
                            if self.watching {
                                self.shared.stats.rx_stalls.fetch_add(1, Ordering::Relaxed);
                                ctl.watch(0, false);
                                self.watching = false;
                            }
                            vq.notify();
                            return;
                        }
                    },
                }
            }
            if budget == 0 || vq.is_broken() {
                break;
            }
            budget -= 1;
            match self.pair.tap().read(&mut self.buf) {
                Ok(n) if n < self.hdr_len + ETH_HLEN as usize => {
                    self.shared.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n) => self.pending = Some(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.shared.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                    bulkhead_common::rate_limited!(
                        log::Level::Warn,
                        "tap {}: read: {e}",
                        self.pair.tap().name()
                    );
                    break;
                }
            }
        }
        if !self.watching {
            ctl.watch(0, true);
            self.watching = true;
        }
        vq.notify();
    }

    /// Takes receive chains until `len` bytes fit (one chain without MRG_RXBUF).
    fn gather(&mut self, vq: &mut VirtQueue, len: u64) -> Option<usize> {
        loop {
            let mut room = 0u64;
            for (i, c) in self.spare.iter().enumerate() {
                room = room.saturating_add(c.writable_len());
                if room >= len || !self.mergeable {
                    return Some(i + 1);
                }
            }
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
                Ok(Some(c)) => self.spare.push_back(c),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    fn deliver(&mut self, vq: &mut VirtQueue) -> Delivery {
        let Some(len) = self.pending else {
            return Delivery::Done;
        };
        let h = self.hdr_len;
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&self.buf[h..h + 6]);
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
            return Delivery::Done;
        }
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
        if !self.guest_csum {
            // The driver cannot take partial checksums; the tap sent none, and
            // DATA_VALID means nothing to it.
            self.buf[0] = 0;
        }
        if h == HDR_LEN_V1 {
            self.buf[10..12].copy_from_slice(&(n as u16).to_le_bytes());
        }
        let mut off = 0usize;
        let mut used = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(c) = self.spare.pop_front() else {
                break;
            };
            let mut w = c.writer();
            let take = (w.available() as usize).min(len - off);
            let written = match w.write_all(&self.buf[off..off + take]) {
                Ok(()) => take,
                Err(_) => 0,
            };
            off += take;
            used.push((c.head(), written as u32));
        }
        for (head, n) in used {
            vq.complete(head, n);
        }
        let s = &self.shared.stats;
        s.rx_frames.fetch_add(1, Ordering::Relaxed);
        s.rx_bytes.fetch_add((len - h) as u64, Ordering::Relaxed);
        Delivery::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
