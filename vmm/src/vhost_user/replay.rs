//! What the driver set up at DRIVER_OK, and its replay onto a backend: at
//! activation, after a reconnection and at a swap; quiescing a backend.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::connect::Connection;
use super::handle::Inner;
use super::{VHOST_USER_F_PROTOCOL_FEATURES, msg};
use crate::device::DeviceError;
use bulkhead_spec::ring::{VIRTIO_F_RING_PACKED, VRING_PACKED_EVENT_F_WRAP_CTR};

/// One queue as the driver configured it, kept to replay on a new backend.
pub(super) struct QueueSetup {
    pub(super) index: usize,
    pub(super) size: u16,
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
    /// A dup of the transport's kick eventfd (the same file KVM signals).
    pub(super) kick: EventFd,
    /// A dup of the transport's call eventfd (the same file KVM listens on).
    pub(super) call: EventFd,
}

/// What the driver set up at DRIVER_OK.
pub(super) struct ActiveSetup {
    /// Virtio features the driver accepted (without the vhost-user bit).
    pub(super) features: u64,
    pub(super) queues: Vec<QueueSetup>,
}

/// How the vring bases of a replay are chosen.
pub(super) enum Bases<'a> {
    /// The driver just set DRIVER_OK: every ring starts at 0.
    Fresh,
    /// After a crash: the used index in guest memory (as QEMU does).
    UsedRing,
    /// After a clean stop: what GET_VRING_BASE returned, per started queue.
    Given(&'a [(usize, u32)]),
}

impl Inner {
    pub(super) fn vring_config(
        &self,
        q: &QueueSetup,
        packed: bool,
    ) -> Result<VringConfigData, DeviceError> {
        let n = u64::from(q.size);
        let ring = |addr: u64, len: Option<u64>| {
            len.and_then(|l| self.ram.host_addr(addr, l).ok())
                .ok_or(DeviceError::RingOutsideRam(q.index))
        };
        // Split ring sizes (virtio 1.x 2.7): 16 bytes a descriptor; avail and
        // used carry flags, idx and the event word. A packed ring (2.8): the
        // ring of 16-byte descriptors and two 4-byte event structures.
        let (avail_len, used_len) = if packed {
            (Some(4), Some(4))
        } else {
            (
                n.checked_mul(2).and_then(|x| x.checked_add(6)),
                n.checked_mul(8).and_then(|x| x.checked_add(6)),
            )
        };
        Ok(VringConfigData {
            queue_max_size: self.queue_size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: ring(q.desc, n.checked_mul(16))?,
            avail_ring_addr: ring(q.avail, avail_len)?,
            used_ring_addr: ring(q.used, used_len)?,
            log_addr: None,
        })
    }

    pub(super) fn used_index(&self, q: &QueueSetup) -> Result<u32, DeviceError> {
        let mut b = [0u8; 2];
        q.used
            .checked_add(2)
            .and_then(|a| self.ram.read(a, &mut b).ok())
            .ok_or(DeviceError::RingOutsideRam(q.index))?;
        Ok(u32::from(u16::from_le_bytes(b)))
    }

    /// Sends the driver's setup to `conn`: features, memory table, vring
    /// sizes, the inflight area, then per queue address, base, call, kick,
    /// enable.
    pub(super) fn replay(
        &mut self,
        conn: &mut Connection,
        bases: Bases<'_>,
    ) -> Result<(), DeviceError> {
        self.replay_with_state(conn, bases, None)
    }

    /// [`Inner::replay`], loading the device state `state` (from the backend
    /// this one replaces) before any ring starts.
    pub(super) fn replay_with_state(
        &mut self,
        conn: &mut Connection,
        bases: Bases<'_>,
        state: Option<&[u8]>,
    ) -> Result<(), DeviceError> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        let mut acked = active.features;
        if conn.protocol_acked() {
            acked |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        let packed = active.features & VIRTIO_F_RING_PACKED != 0;
        let configs = active
            .queues
            .iter()
            .map(|q| self.vring_config(q, packed))
            .collect::<Result<Vec<_>, _>>()?;
        // A packed ring starts at position 0 with wrap counters 1. The
        // `vhost` crate's frontend sends 16-bit bases: the backend takes the
        // used position to be the avail one (true after a clean stop).
        let fresh = if packed {
            u32::from(VRING_PACKED_EVENT_F_WRAP_CTR)
        } else {
            0
        };
        if packed
            && matches!(bases, Bases::UsedRing)
            && !conn
                .protocol
                .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            // After a crash only the backend's inflight record knows where
            // a packed ring stood: guest memory does not say.
            return Err(DeviceError::Backend(format!(
                "{}: a packed ring cannot be resumed after a crash without the inflight area",
                conn.path.display()
            )));
        }
        let mut base_of = Vec::with_capacity(active.queues.len());
        for q in &active.queues {
            base_of.push(match &bases {
                Bases::Fresh => fresh,
                // The packed record in the inflight area overrides this.
                Bases::UsedRing if packed => fresh,
                Bases::UsedRing => self.used_index(q)?,
                Bases::Given(list) => list
                    .iter()
                    .find(|(i, _)| *i == q.index)
                    .map(|(_, b)| *b)
                    .ok_or(DeviceError::NoSuchQueue(q.index))?,
            });
        }
        let proto_acked = conn.protocol_acked();
        let conn_protocol = conn.protocol;
        let conn_path = conn.path.clone();
        let fe = &mut conn.frontend;
        msg("SET_FEATURES", fe.set_features(acked))?;
        msg("SET_MEM_TABLE", fe.set_mem_table(&self.ram.vhost_regions()))?;
        for q in &active.queues {
            msg("SET_VRING_NUM", fe.set_vring_num(q.index, q.size))?;
        }
        if conn_protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.inflight.is_none() {
                let nq = u16::try_from(self.num_queues)
                    .map_err(|_| DeviceError::NoSuchQueue(self.num_queues))?;
                let req = VhostUserInflight::new(0, 0, nq, self.queue_size);
                self.inflight = Some(msg("GET_INFLIGHT_FD", fe.get_inflight_fd(&req))?);
            }
            if let Some((info, file)) = &self.inflight {
                msg(
                    "SET_INFLIGHT_FD",
                    fe.set_inflight_fd(info, file.as_raw_fd()),
                )?;
            }
        } else if self.inflight.is_some() {
            log::warn!(
                "{}: backend does not take the inflight area; requests in flight at a crash are not resubmitted",
                conn_path.display()
            );
        }
        if let Some(blob) = state {
            crate::device_state::load(fe, blob)?;
        }
        for ((q, cfg), base) in active.queues.iter().zip(&configs).zip(&base_of) {
            msg("SET_VRING_ADDR", fe.set_vring_addr(q.index, cfg))?;
            msg("SET_VRING_BASE", fe.set_vring_base(q.index, *base as u16))?;
            msg("SET_VRING_CALL", fe.set_vring_call(q.index, &q.call))?;
            msg("SET_VRING_KICK", fe.set_vring_kick(q.index, &q.kick))?;
            if proto_acked {
                msg("SET_VRING_ENABLE", fe.set_vring_enable(q.index, true))?;
            }
        }
        if !matches!(bases, Bases::Fresh) {
            // A kick the old backend consumed without acting on it, or an
            // interrupt it never sent, would stall the guest: give one of each.
            for q in &active.queues {
                let _ = q.kick.write(1);
                let _ = q.call.write(1);
            }
        }
        Ok(())
    }

    /// SET_VRING_ENABLE(0) and GET_VRING_BASE for every started queue.
    pub(super) fn quiesce(&self, conn: &mut Connection) -> Result<Vec<(usize, u32)>, DeviceError> {
        let mut bases = Vec::new();
        if let Some(active) = &self.active {
            for q in &active.queues {
                if conn.protocol_acked() {
                    msg(
                        "SET_VRING_ENABLE",
                        conn.frontend.set_vring_enable(q.index, false),
                    )?;
                }
                let base = msg("GET_VRING_BASE", conn.frontend.get_vring_base(q.index))?;
                bases.push((q.index, base));
            }
        }
        Ok(bases)
    }

    /// Installs a freshly negotiated connection and replays onto it.
    pub(super) fn install(
        &mut self,
        mut conn: Connection,
        bases: Bases<'_>,
    ) -> Result<(), DeviceError> {
        if !conn.config.is_empty() && conn.config != self.config {
            log::info!(
                "{}: the new backend's config space differs; the guest sees it at its next read",
                conn.path.display()
            );
            self.config = conn.config.clone();
        }
        self.replay(&mut conn, bases)?;
        self.socket = conn.path.clone();
        self.conn = Some(conn);
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    pub(super) fn inflight_count(&self) -> Option<usize> {
        let (info, file) = self.inflight.as_ref()?;
        let qs = u64::from(info.queue_size);
        let per_queue = (16 + 16 * qs).div_ceil(64) * 64;
        let mut n = 0;
        for q in 0..u64::from(info.num_queues) {
            for d in 0..qs {
                let mut flag = [0u8];
                let off = info.mmap_offset + q * per_queue + 16 + 16 * d;
                if file.read_exact_at(&mut flag, off).is_ok() && flag[0] == 1 {
                    n += 1;
                }
            }
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::VIRTIO_F_VERSION_1;
    use crate::memory::GuestRam;
    use crate::vhost_user::fake::{FakeBackend, Msg, Offer, code};
    use std::path::PathBuf;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const PROTOCOL_BIT: u64 = VHOST_USER_F_PROTOCOL_FEATURES;

    fn fake(base: u32) -> FakeBackend {
        FakeBackend::start(Offer {
            features: VIRTIO_F_VERSION_1 | PROTOCOL_BIT,
            protocol: VhostUserProtocolFeatures::MQ.bits(),
            queues: 2,
            config: Vec::new(),
            base,
        })
    }

    /// A driver that set up queue 1 (size 16) of two, used index 5 in guest memory.
    fn inner() -> Inner {
        let ram = Arc::new(GuestRam::new(64 << 20).unwrap());
        ram.write(0x3002, &5u16.to_le_bytes()).unwrap();
        let q = QueueSetup {
            index: 1,
            size: 16,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        Inner {
            conn: None,
            generation: 0,
            socket: PathBuf::new(),
            ram,
            virtio_id: 2,
            num_queues: 2,
            queue_size: 256,
            config_size: 0,
            guest_features: VIRTIO_F_VERSION_1,
            config: Vec::new(),
            inflight: None,
            active: Some(ActiveSetup {
                features: VIRTIO_F_VERSION_1,
                queues: vec![q],
            }),
            reconnects: 0,
            swaps: 0,
            last_swap_state: None,
            last_error: None,
        }
    }

    /// The messages after the negotiation (SET_OWNER ... GET_QUEUE_NUM).
    fn after_negotiation(msgs: Vec<Msg>) -> Vec<Msg> {
        let i = msgs
            .iter()
            .position(|m| m.code == code::GET_QUEUE_NUM)
            .unwrap();
        msgs[i + 1..].to_vec()
    }

    #[test]
    fn a_replay_after_a_crash_sends_the_setup_in_order_from_the_used_index_and_kicks_once() {
        let fake = fake(0);
        let mut conn = Connection::open(&fake.path, 0).unwrap();
        let mut inner = inner();
        inner.replay(&mut conn, Bases::UsedRing).unwrap();
        drop(conn);
        let msgs = after_negotiation(fake.messages());
        use code::*;
        let codes: Vec<u32> = msgs.iter().map(|m| m.code).collect();
        assert_eq!(
            codes,
            [
                SET_FEATURES,
                SET_MEM_TABLE,
                SET_VRING_NUM,
                SET_VRING_ADDR,
                SET_VRING_BASE,
                SET_VRING_CALL,
                SET_VRING_KICK,
                SET_VRING_ENABLE
            ]
        );
        assert_eq!(msgs[0].u64_at(0), VIRTIO_F_VERSION_1 | PROTOCOL_BIT);
        assert!(msgs[1].fds >= 1, "the memory table carries the RAM fd");
        assert_eq!((msgs[2].u32_at(0), msgs[2].u32_at(4)), (1, 16));
        assert_eq!(
            (msgs[4].u32_at(0), msgs[4].u32_at(4)),
            (1, 5),
            "base = used idx"
        );
        assert_eq!((msgs[5].fds, msgs[6].fds), (1, 1));
        assert_eq!((msgs[7].u32_at(0), msgs[7].u32_at(4)), (1, 1));
        // A kick and an interrupt, in case the dead backend swallowed one.
        let q = &inner.active.as_ref().unwrap().queues[0];
        assert_eq!(q.kick.read().unwrap(), 1);
        assert_eq!(q.call.read().unwrap(), 1);
    }

    #[test]
    fn a_fresh_replay_starts_at_zero_without_kicks_and_given_bases_are_used() {
        let fake1 = fake(0);
        let mut conn = Connection::open(&fake1.path, 0).unwrap();
        let mut inner = inner();
        inner.replay(&mut conn, Bases::Fresh).unwrap();
        drop(conn);
        let msgs = after_negotiation(fake1.messages());
        let base = msgs
            .iter()
            .find(|m| m.code == code::SET_VRING_BASE)
            .unwrap();
        assert_eq!(base.u32_at(4), 0);
        assert!(
            inner.active.as_ref().unwrap().queues[0]
                .kick
                .read()
                .is_err()
        );

        let fake2 = fake(0);
        let mut conn = Connection::open(&fake2.path, 0).unwrap();
        inner.replay(&mut conn, Bases::Given(&[(1, 77)])).unwrap();
        assert!(matches!(
            inner.replay(&mut conn, Bases::Given(&[(0, 1)])),
            Err(DeviceError::NoSuchQueue(1))
        ));
        drop(conn);
        let msgs = after_negotiation(fake2.messages());
        let base = msgs
            .iter()
            .find(|m| m.code == code::SET_VRING_BASE)
            .unwrap();
        assert_eq!(base.u32_at(4), 77);
    }

    #[test]
    fn a_packed_ring_is_sized_as_packed_starts_at_wrap_counter_one_and_needs_inflight_after_a_crash()
     {
        let base_sent = |fake: FakeBackend| {
            after_negotiation(fake.messages())
                .iter()
                .find(|m| m.code == code::SET_VRING_BASE)
                .map(|m| m.u32_at(4))
        };
        let packed = |inner: &mut Inner| {
            inner.active.as_mut().unwrap().features |= VIRTIO_F_RING_PACKED;
        };
        // The event structures are 4 bytes: a device area in the last 4
        // bytes of RAM is fine for a packed ring, not for a split one.
        let mut inner = inner();
        inner.active.as_mut().unwrap().queues[0].used = (64 << 20) - 4;
        let fake1 = fake(0);
        let mut conn = Connection::open(&fake1.path, 0).unwrap();
        assert!(matches!(
            inner.replay(&mut conn, Bases::Fresh),
            Err(DeviceError::RingOutsideRam(1))
        ));
        packed(&mut inner);
        inner.replay(&mut conn, Bases::Fresh).unwrap();
        drop(conn);
        assert_eq!(base_sent(fake1), Some(0x8000));

        // After a crash guest memory does not say where a packed ring
        // stood: without the inflight area (whose record does) it is refused.
        let fake2 = fake(0);
        let mut conn = Connection::open(&fake2.path, 0).unwrap();
        assert!(matches!(
            inner.replay(&mut conn, Bases::UsedRing),
            Err(DeviceError::Backend(_))
        ));
        drop(conn);
        assert_eq!(base_sent(fake2), None);
    }

    #[test]
    fn rings_outside_guest_ram_are_refused_before_any_message() {
        let fake = fake(0);
        let mut conn = Connection::open(&fake.path, 0).unwrap();
        let mut inner = inner();
        inner.active.as_mut().unwrap().queues[0].used = u64::MAX - 8;
        assert!(matches!(
            inner.replay(&mut conn, Bases::Fresh),
            Err(DeviceError::RingOutsideRam(1))
        ));
        drop(conn);
        assert!(after_negotiation(fake.messages()).is_empty());
    }

    #[test]
    fn quiesce_disables_each_ring_and_returns_its_base() {
        let fake = fake(9);
        let mut conn = Connection::open(&fake.path, 0).unwrap();
        let mut inner = inner();
        inner.replay(&mut conn, Bases::Fresh).unwrap();
        assert_eq!(inner.quiesce(&mut conn).unwrap(), vec![(1, 9)]);
        drop(conn);
        let msgs = after_negotiation(fake.messages());
        let i = msgs
            .iter()
            .rposition(|m| m.code == code::SET_VRING_ENABLE && m.u32_at(4) == 0)
            .unwrap();
        let msgs = &msgs[i..];
        let codes: Vec<u32> = msgs.iter().map(|m| m.code).collect();
        assert_eq!(codes, [code::SET_VRING_ENABLE, code::GET_VRING_BASE]);
        assert_eq!((msgs[0].u32_at(0), msgs[0].u32_at(4)), (1, 0));
    }
}
