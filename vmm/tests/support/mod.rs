//! The simulated guest driver shared by the device-model tests: split and
//! packed virtqueues laid out in the VMM's guest RAM, virtio-blk requests, and the
//! register sequences Linux's virtio-pci and virtio-mmio drivers perform.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_spec::blk::{VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH};
use bulkhead_vmm::bus::Bus;
use bulkhead_vmm::device::VIRTIO_F_VERSION_1;
use bulkhead_vmm::memory::GuestRam;
use bulkhead_vmm::transport::pci::{BAR_SIZE, common};
use bulkhead_vmm::transport::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK};
use vmm_sys_util::eventfd::EventFd;

pub const RAM: u64 = 64 << 20;
pub const IMAGE: u64 = 16 << 20;
pub const QUEUE_SIZE: u16 = 64;
pub const MSIX_GSI_BASE: u32 = 24;
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_GSI: u32 = 5;
pub const TIMEOUT: Duration = Duration::from_secs(10);

// Each test binary uses a different part of this module.
#[allow(unused_imports)]
pub use bulkhead_spec::blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
pub use bulkhead_spec::ring::{
    VRING_DESC_F_NEXT as DESC_F_NEXT, VRING_DESC_F_WRITE as DESC_F_WRITE,
};

/// Waits until `fd` is readable (the irqfd stand-in fired) and consumes it.
pub fn wait_irq(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; poll only writes its revents.
    let n = unsafe { libc::poll(&mut p, 1, TIMEOUT.as_millis() as i32) };
    n == 1 && fd.read().is_ok()
}

/// Waits, on `irq`, until the used index of `ring` reaches `n`. Backends may
/// interrupt once more than needed (a queue start interrupts once), so an
/// interrupt alone does not mean a request completed.
pub fn wait_used(ring: &Ring, irq: &EventFd, n: u16) -> bool {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while ring.used_idx() != n {
        if std::time::Instant::now() >= deadline || !wait_irq(irq) {
            return ring.used_idx() == n;
        }
    }
    true
}

/// A split virtqueue laid out by the test in the VMM's guest RAM.
pub struct Ring {
    pub ram: Arc<GuestRam>,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
}

impl Ring {
    pub fn new(ram: Arc<GuestRam>, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4096);
        ram.write(base, &vec![0u8; 0x3000]).unwrap();
        Ring {
            ram,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Writes a chain of (addr, len, device-writable) buffers and publishes it.
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let next = (idx + 1) % self.size;
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.ram.write(self.desc + 16 * u64::from(idx), &d).unwrap();
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.ram.write(slot, &head.to_le_bytes()).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.ram
            .write(self.avail + 2, &self.avail_idx.to_le_bytes())
            .unwrap();
        head
    }

    /// The used ring's entries 0..used_idx as (id, len).
    pub fn used_elems(&self) -> Vec<(u32, u32)> {
        let n = self.used_idx();
        (0..n)
            .map(|i| {
                let mut e = [0u8; 8];
                let slot = self.used + 4 + 8 * u64::from(i % self.size);
                self.ram.read(slot, &mut e).unwrap();
                (
                    u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect()
    }

    pub fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        self.ram.read(self.used + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }
}

/// A packed virtqueue (virtio 1.1, 2.8) laid out by the test in the VMM's
/// guest RAM: the ring, then the driver's and the device's event
/// structures (left zero: interrupts and kicks enabled).
pub struct PackedRing {
    pub ram: Arc<GuestRam>,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The driver's next position and wrap counter.
    next: (u16, bool),
    /// The next used descriptor expected, and its wrap counter.
    next_used: (u16, bool),
    /// Slots each buffer id in flight took.
    slots: Vec<u16>,
}

const PACKED_AVAIL: u16 = 1 << 7;
const PACKED_USED: u16 = 1 << 15;

impl PackedRing {
    pub fn new(ram: Arc<GuestRam>, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = avail + 4;
        ram.write(base, &vec![0u8; 0x3000]).unwrap();
        PackedRing {
            ram,
            size,
            desc,
            avail,
            used,
            next: (0, true),
            next_used: (0, true),
            slots: vec![0; usize::from(size)],
        }
    }

    fn advance(pos: &mut (u16, bool), n: u16, size: u16) {
        pos.0 += n;
        if pos.0 >= size {
            pos.0 -= size;
            pos.1 = !pos.1;
        }
    }

    /// Writes buffer `id`'s descriptors at the next positions, the first
    /// one's flags last, as Linux's driver does.
    pub fn submit(&mut self, id: u16, bufs: &[(u64, u32, bool)]) {
        let first = self.next;
        let mut first_flags = 0u16;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let (idx, wrap) = self.next;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            flags |= if wrap { PACKED_AVAIL } else { PACKED_USED };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&id.to_le_bytes());
            if i == 0 {
                first_flags = flags;
            } else {
                d[14..16].copy_from_slice(&flags.to_le_bytes());
            }
            self.ram.write(self.desc + 16 * u64::from(idx), &d).unwrap();
            Self::advance(&mut self.next, 1, self.size);
        }
        self.slots[usize::from(id)] = bufs.len() as u16;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.ram
            .write(
                self.desc + 16 * u64::from(first.0) + 14,
                &first_flags.to_le_bytes(),
            )
            .unwrap();
    }

    /// The next used buffer (id, len), if the device wrote one.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let (idx, wrap) = self.next_used;
        let mut d = [0u8; 16];
        self.ram
            .read(self.desc + 16 * u64::from(idx), &mut d)
            .unwrap();
        let flags = u16::from_le_bytes([d[14], d[15]]);
        let used = (flags & PACKED_AVAIL != 0) == wrap && (flags & PACKED_USED != 0) == wrap;
        if !used {
            return None;
        }
        let id = u16::from_le_bytes([d[12], d[13]]);
        let len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
        let n = self.slots.get(usize::from(id)).copied().unwrap_or(1).max(1);
        Self::advance(&mut self.next_used, n, self.size);
        Some((id, len))
    }
}

/// Waits, on `irq`, for the next used buffer of `ring`.
pub fn wait_packed_used(ring: &mut PackedRing, irq: &EventFd) -> Option<(u16, u32)> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(u) = ring.pop_used() {
            return Some(u);
        }
        if std::time::Instant::now() >= deadline || !wait_irq(irq) {
            return ring.pop_used();
        }
    }
}

/// Guest buffers of one virtio-blk request.
pub struct BlkRequest {
    pub hdr: u64,
    pub data: u64,
    pub status: u64,
}

impl BlkRequest {
    pub fn new(ram: &GuestRam, at: u64, kind: u32, sector: u64, payload: Option<&[u8]>) -> Self {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        ram.write(at, &h).unwrap();
        let data = at + 0x1000;
        match payload {
            Some(p) => ram.write(data, p).unwrap(),
            None => ram.write(data, &[0u8; 4096]).unwrap(),
        }
        let status = at + 0x2000;
        ram.write(status, &[0xff]).unwrap();
        BlkRequest {
            hdr: at,
            data,
            status,
        }
    }

    pub fn chain(&self, device_writes_data: bool) -> [(u64, u32, bool); 3] {
        [
            (self.hdr, 16, false),
            (self.data, 4096, device_writes_data),
            (self.status, 1, true),
        ]
    }

    pub fn status(&self, ram: &GuestRam) -> u8 {
        let mut b = [0u8; 1];
        ram.read(self.status, &mut b).unwrap();
        b[0]
    }
}

pub fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------- virtio-pci

/// What Linux's PCI core and virtio_pci_modern do, one register at a time.
pub struct PciDriver {
    pub pio: Bus,
    pub mmio: Bus,
    pub slot: u32,
    pub bar: u64,
    pub common: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub device_cfg: u64,
    pub msix_cap: u32,
}

impl PciDriver {
    pub fn cfg_addr(&self, reg: u32) -> [u8; 4] {
        (0x8000_0000u32 | (self.slot << 11) | (reg & 0xfc)).to_le_bytes()
    }

    pub fn cfg_read32(&self, reg: u32) -> u32 {
        assert!(self.pio.write(0xcf8, &self.cfg_addr(reg)));
        let mut b = [0u8; 4];
        assert!(self.pio.read(0xcfc, &mut b));
        u32::from_le_bytes(b)
    }

    pub fn cfg_write(&self, reg: u32, data: &[u8]) {
        assert!(self.pio.write(0xcf8, &self.cfg_addr(reg)));
        assert!(self.pio.write(0xcfc + u64::from(reg & 3), data));
    }

    /// Finds the first virtio device, sizes and enables its BAR, walks its capabilities.
    pub fn probe(pio: Bus, mmio: Bus) -> Self {
        let mut d = PciDriver {
            pio,
            mmio,
            slot: 0,
            bar: 0,
            common: 0,
            notify: 0,
            notify_mult: 0,
            device_cfg: 0,
            msix_cap: 0,
        };
        d.slot = (0..32)
            .find(|&s| {
                d.slot = s;
                d.cfg_read32(0) & 0xffff == 0x1af4
            })
            .expect("a virtio function on bus 0");
        assert_eq!(d.cfg_read32(0) >> 16, 0x1042, "modern virtio-blk id");
        // Size BAR0 as the PCI core does, then restore it.
        let lo = d.cfg_read32(0x10);
        assert_eq!(lo & 0x6, 0x4, "64-bit memory BAR");
        d.cfg_write(0x10, &u32::MAX.to_le_bytes());
        let mask = d.cfg_read32(0x10) & !0xf;
        assert_eq!(u64::from(!mask) + 1, BAR_SIZE);
        d.cfg_write(0x10, &lo.to_le_bytes());
        d.bar = u64::from(lo & !0xf) | (u64::from(d.cfg_read32(0x14)) << 32);
        // Memory decode and bus mastering on.
        d.cfg_write(0x04, &0x0006u16.to_le_bytes());
        // Capabilities.
        assert_ne!(d.cfg_read32(0x04) & (1 << 20), 0, "capability list");
        let mut cap = d.cfg_read32(0x34) & 0xff;
        while cap != 0 {
            let w0 = d.cfg_read32(cap);
            let (id, next) = (w0 & 0xff, (w0 >> 8) & 0xff);
            if id == 0x09 {
                let ty = (w0 >> 24) & 0xff;
                let off = u64::from(d.cfg_read32(cap + 8));
                match ty {
                    1 => d.common = d.bar + off,
                    2 => {
                        d.notify = d.bar + off;
                        d.notify_mult = d.cfg_read32(cap + 16);
                    }
                    4 => d.device_cfg = d.bar + off,
                    _ => {}
                }
            } else if id == 0x11 {
                d.msix_cap = cap;
            }
            cap = next;
        }
        assert!(d.common != 0 && d.notify != 0 && d.device_cfg != 0 && d.msix_cap != 0);
        d
    }

    pub fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.mmio.read(self.common + off, &mut b[..len]));
        u64::from_le_bytes(b)
    }

    pub fn w(&self, off: u64, len: usize, v: u64) {
        assert!(self.mmio.write(self.common + off, &v.to_le_bytes()[..len]));
    }

    pub fn status(&self) -> u8 {
        self.r(common::DEVICE_STATUS, 1) as u8
    }

    pub fn set_status(&self, s: u8) {
        self.w(common::DEVICE_STATUS, 1, u64::from(s));
    }

    /// Enables MSI-X (function-masked while the table is programmed, as Linux does).
    pub fn enable_msix(&self, vectors: u32) {
        let ctl = self.cfg_read32(self.msix_cap) >> 16;
        assert_eq!((ctl & 0x7ff) + 1, vectors);
        let table = self.bar + u64::from(self.cfg_read32(self.msix_cap + 4) & !7);
        self.cfg_write(self.msix_cap + 2, &0xc000u16.to_le_bytes());
        for v in 0..u64::from(vectors) {
            let e = table + 16 * v;
            assert!(self.mmio.write(e, &0xfee0_0000u32.to_le_bytes()));
            assert!(self.mmio.write(e + 4, &0u32.to_le_bytes()));
            assert!(self.mmio.write(e + 8, &(0x40 + v as u32).to_le_bytes()));
            assert!(self.mmio.write(e + 12, &0u32.to_le_bytes()));
        }
        self.cfg_write(self.msix_cap + 2, &0x8000u16.to_le_bytes());
    }

    /// reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    pub fn negotiate(&self) -> u64 {
        self.negotiate_with(0)
    }

    /// Like [`PciDriver::negotiate`], also accepting `extra` (when offered).
    pub fn negotiate_with(&self, extra: u64) -> u64 {
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.w(common::DEVICE_FEATURE_SELECT, 4, 0);
        let lo = self.r(common::DEVICE_FEATURE, 4);
        self.w(common::DEVICE_FEATURE_SELECT, 4, 1);
        let hi = self.r(common::DEVICE_FEATURE, 4);
        let offered = lo | (hi << 32);
        assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
        assert_eq!(
            offered & bulkhead_spec::vhost_user::VHOST_USER_F_PROTOCOL_FEATURES,
            0,
            "vhost-user protocol bit hidden"
        );
        let acked =
            offered & (VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_BLK_SIZE | extra);
        self.w(common::DRIVER_FEATURE_SELECT, 4, 0);
        self.w(common::DRIVER_FEATURE, 4, acked & 0xffff_ffff);
        self.w(common::DRIVER_FEATURE_SELECT, 4, 1);
        self.w(common::DRIVER_FEATURE, 4, acked >> 32);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(self.status() & STATUS_FEATURES_OK, 0, "FEATURES_OK kept");
        acked
    }

    /// Sets up queue `q` with `ring` on MSI-X vector `vector`.
    pub fn setup_queue(&self, q: u16, ring: &Ring, vector: u16) {
        self.setup_queue_at(q, ring.size, [ring.desc, ring.avail, ring.used], vector);
    }

    /// Sets up queue `q` with a packed ring on MSI-X vector `vector`.
    pub fn setup_packed_queue(&self, q: u16, ring: &PackedRing, vector: u16) {
        self.setup_queue_at(q, ring.size, [ring.desc, ring.avail, ring.used], vector);
    }

    /// Sets up queue `q` of `size` at `parts` (descriptors, driver, device).
    fn setup_queue_at(&self, q: u16, size: u16, parts: [u64; 3], vector: u16) {
        self.w(common::QUEUE_SELECT, 2, u64::from(q));
        assert_eq!(self.r(common::QUEUE_SIZE, 2), u64::from(QUEUE_SIZE));
        self.w(common::QUEUE_SIZE, 2, u64::from(size));
        self.w(common::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        assert_eq!(self.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(vector));
        for (lo, v) in [
            (common::QUEUE_DESC_LO, parts[0]),
            (common::QUEUE_DRIVER_LO, parts[1]),
            (common::QUEUE_DEVICE_LO, parts[2]),
        ] {
            self.w(lo, 4, v & 0xffff_ffff);
            self.w(lo + 4, 4, v >> 32);
        }
        self.w(common::QUEUE_ENABLE, 2, 1);
    }

    pub fn notify_addr(&self, q: u16) -> u64 {
        self.w(common::QUEUE_SELECT, 2, u64::from(q));
        let off = self.r(common::QUEUE_NOTIFY_OFF, 2);
        self.notify + off * u64::from(self.notify_mult)
    }

    pub fn kick(&self, q: u16) {
        let addr = self.notify_addr(q);
        assert!(self.mmio.write(addr, &q.to_le_bytes()));
    }
}

pub fn read_image(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

// --------------------------------------------------------------- virtio-mmio

pub struct MmioDriver {
    pub bus: Bus,
    pub device_id: u32,
    pub queue_max: u16,
}

impl MmioDriver {
    /// A driver for the virtio-blk device the device-model tests build.
    pub fn blk(bus: Bus) -> Self {
        MmioDriver {
            bus,
            device_id: bulkhead_vmm::device::VIRTIO_ID_BLOCK,
            queue_max: QUEUE_SIZE,
        }
    }

    pub fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.bus.read(MMIO_BASE + off, &mut b));
        u32::from_le_bytes(b)
    }

    pub fn w(&self, off: u64, v: u32) {
        assert!(self.bus.write(MMIO_BASE + off, &v.to_le_bytes()));
    }

    /// Linux virtio_mmio: probe, reset, ACK, DRIVER, features, FEATURES_OK.
    pub fn negotiate(&self) {
        self.negotiate_with(0);
    }

    /// Like [`MmioDriver::negotiate`], accepting `low` of the low feature word too.
    pub fn negotiate_with(&self, low: u32) {
        assert_eq!(self.r(0x000), 0x7472_6976, "magic");
        assert_eq!(self.r(0x004), 2, "version 2");
        assert_eq!(self.r(0x008), self.device_id);
        self.w(0x014, 0);
        let offered_lo = self.r(0x010);
        assert_eq!(low & !offered_lo, 0, "features {low:#x} not offered");
        self.w(0x070, 0);
        self.w(0x070, u32::from(STATUS_ACKNOWLEDGE));
        self.w(0x070, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        self.w(0x014, 1);
        let hi = self.r(0x010);
        assert_ne!(hi & 1, 0, "VERSION_1");
        self.w(0x024, 0);
        self.w(0x020, low);
        self.w(0x024, 1);
        self.w(0x020, 1);
        self.w(
            0x070,
            u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
        );
        assert_ne!(self.r(0x070) & u32::from(STATUS_FEATURES_OK), 0);
    }

    pub fn setup_queue(&self, q: u32, ring: &Ring) {
        self.w(0x030, q);
        assert_eq!(self.r(0x044), 0, "queue not ready yet");
        assert_eq!(self.r(0x034), u32::from(self.queue_max));
        self.w(0x038, u32::from(ring.size));
        for (lo, v) in [(0x080, ring.desc), (0x090, ring.avail), (0x0a0, ring.used)] {
            self.w(lo, v as u32);
            self.w(lo + 4, (v >> 32) as u32);
        }
        self.w(0x044, 1);
        assert_eq!(self.r(0x044), 1);
    }
}
