//! The control queue: receive-filter and queue-pair commands (CTRL_RX, MQ),
//! applied to the state every worker shares and persisted before the ack.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bulkhead_common::{VirtQueue, guest_error};
use vm_memory::{Address, GuestAddress};

use crate::device::Shared;
use bulkhead_common::spec::net::{VIRTIO_NET_ERR, VIRTIO_NET_OK};

use crate::request::{CtrlCommand, CtrlFeatures, CtrlRequest};

/// Runs the control queue.
pub struct CtrlWorker {
    shared: Arc<Shared>,
    features: CtrlFeatures,
}

impl CtrlWorker {
    pub(crate) fn new(shared: Arc<Shared>, features: CtrlFeatures) -> Self {
        CtrlWorker { shared, features }
    }
}

impl CtrlWorker {
    fn apply(&self, cmd: CtrlCommand) {
        match cmd {
            CtrlCommand::QueuePairs(n) => {
                self.shared.active_pairs.store(n, Ordering::Relaxed);
                bulkhead_common::rate_limited!(log::Level::Info, "driver uses {n} queue pair(s)");
            }
            cmd => {
                if let Ok(mut f) = self.shared.filter.lock() {
                    match cmd {
                        CtrlCommand::Promisc(on) => f.promisc = on,
                        CtrlCommand::AllMulti(on) => f.allmulti = on,
                        CtrlCommand::MacTable { unicast, multicast } => {
                            f.unicast = unicast;
                            f.multicast = multicast;
                        }
                        CtrlCommand::QueuePairs(_) => {}
                    }
                    bulkhead_common::rate_limited!(log::Level::Debug, "receive filter: {f:?}");
                }
            }
        }
    }

    pub(crate) fn process(&mut self, vq: &mut VirtQueue) {
        loop {
            vq.disable_notifications();
            loop {
                let chain = match vq.pop() {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(_) => return,
                };
                let req = CtrlRequest::parse(&chain, self.features);
                let s = &self.shared.stats;
                let ack = match req.command {
                    Ok(cmd) => {
                        self.apply(cmd);
                        // In the inflight area before the driver sees the ack:
                        // a daemon killed after the ack leaves the new state.
                        self.shared.persist();
                        s.ctrl_ok.fetch_add(1, Ordering::Relaxed);
                        VIRTIO_NET_OK
                    }
                    Err(e) => {
                        let c = if e.is_unsupported() {
                            &s.ctrl_unsupported
                        } else {
                            &s.ctrl_malformed
                        };
                        c.fetch_add(1, Ordering::Relaxed);
                        guest_error!("queue {}: head {}: {e}", vq.index(), chain.head());
                        VIRTIO_NET_ERR
                    }
                };
                let mut used = 0;
                if req.has_ack
                    && let Ok(mut tail) = chain.writer().split_tail(1)
                    && tail.write_obj(ack).is_ok()
                {
                    used = 1;
                    // The ack is the last writable byte (live migration log).
                    if let Some(d) = chain
                        .descriptors()
                        .iter()
                        .rfind(|d| d.writable && d.len > 0)
                    {
                        let last = d.addr.raw_value() + u64::from(d.len) - 1;
                        vq.log_write(GuestAddress(last), 1);
                    }
                }
                vq.complete(chain.head(), used);
            }
            match vq.enable_notifications() {
                Ok(true) => continue,
                _ => break,
            }
        }
        vq.notify();
    }
}
