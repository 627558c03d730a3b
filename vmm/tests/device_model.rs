//! The virtio transports without a vCPU: a simulated guest driver performs the
//! register accesses Linux's virtio-pci and virtio-mmio drivers perform,
//! against bulkhead-vmm's transports wired to a real `bulkhead-blk` process
//! (build it first: `cargo build -p bulkhead-blk`). Requests are laid out by
//! hand in the VMM's own guest RAM; completion is seen through the eventfd
//! the transport registered as the queue's irqfd.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_vmm::bus::Bus;
use bulkhead_vmm::device::{VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK};
use bulkhead_vmm::memory::GuestRam;
use bulkhead_vmm::pci::{self, PciRoot};
use bulkhead_vmm::transport::mmio::{MMIO_WINDOW, VirtioMmioDevice};
use bulkhead_vmm::transport::pci::{BAR_SIZE, VirtioPciDevice, common};
use bulkhead_vmm::transport::{
    NO_VECTOR, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VirtioState,
};
use bulkhead_vmm::vhost_user::{VhostUserDevice, VhostUserOptions};
use bulkhead_vmm::vm_events::{IoAddr, TestVmEvents, VmEvents};
use vmm_sys_util::eventfd::EventFd;

const RAM: u64 = 64 << 20;
const IMAGE: u64 = 16 << 20;
const QUEUE_SIZE: u16 = 64;
const MSIX_GSI_BASE: u32 = 24;
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_GSI: u32 = 5;
const TIMEOUT: Duration = Duration::from_secs(10);

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

fn start_blk() -> Daemon {
    let _ = env_logger::builder().is_test(true).try_init();
    let scratch = Scratch::new(IMAGE).expect("scratch dir");
    Daemon::blk(scratch, &["--num-queues", "2"])
        .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk` first)")
}

fn blk_device(daemon: &Daemon, ram: &Arc<GuestRam>) -> VirtioState {
    let opts = VhostUserOptions {
        socket: daemon.socket().to_path_buf(),
        virtio_id: VIRTIO_ID_BLOCK,
        queues: None,
        queue_size: QUEUE_SIZE,
        config_size: 60,
    };
    let dev = VhostUserDevice::connect(&opts, ram.clone()).expect("connect to bulkhead-blk");
    VirtioState::new(Box::new(dev)).expect("virtio state")
}

/// Waits until `fd` is readable (the irqfd stand-in fired) and consumes it.
fn wait_irq(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; poll only writes its revents.
    let n = unsafe { libc::poll(&mut p, 1, TIMEOUT.as_millis() as i32) };
    n == 1 && fd.read().is_ok()
}

/// A split virtqueue laid out by the test in the VMM's guest RAM.
struct Ring {
    ram: Arc<GuestRam>,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn new(ram: Arc<GuestRam>, base: u64, size: u16) -> Self {
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
    fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
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

    fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        self.ram.read(self.used + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }
}

/// Guest buffers of one virtio-blk request.
struct BlkRequest {
    hdr: u64,
    data: u64,
    status: u64,
}

impl BlkRequest {
    fn new(ram: &GuestRam, at: u64, kind: u32, sector: u64, payload: Option<&[u8]>) -> Self {
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

    fn chain(&self, device_writes_data: bool) -> [(u64, u32, bool); 3] {
        [
            (self.hdr, 16, false),
            (self.data, 4096, device_writes_data),
            (self.status, 1, true),
        ]
    }

    fn status(&self, ram: &GuestRam) -> u8 {
        let mut b = [0u8; 1];
        ram.read(self.status, &mut b).unwrap();
        b[0]
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------- virtio-pci

/// What Linux's PCI core and virtio_pci_modern do, one register at a time.
struct PciDriver {
    pio: Bus,
    mmio: Bus,
    slot: u32,
    bar: u64,
    common: u64,
    notify: u64,
    notify_mult: u32,
    device_cfg: u64,
    msix_cap: u32,
}

impl PciDriver {
    fn cfg_addr(&self, reg: u32) -> [u8; 4] {
        (0x8000_0000u32 | (self.slot << 11) | (reg & 0xfc)).to_le_bytes()
    }

    fn cfg_read32(&self, reg: u32) -> u32 {
        assert!(self.pio.write(0xcf8, &self.cfg_addr(reg)));
        let mut b = [0u8; 4];
        assert!(self.pio.read(0xcfc, &mut b));
        u32::from_le_bytes(b)
    }

    fn cfg_write(&self, reg: u32, data: &[u8]) {
        assert!(self.pio.write(0xcf8, &self.cfg_addr(reg)));
        assert!(self.pio.write(0xcfc + u64::from(reg & 3), data));
    }

    /// Finds the first virtio device, sizes and enables its BAR, walks its capabilities.
    fn probe(pio: Bus, mmio: Bus) -> Self {
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

    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.mmio.read(self.common + off, &mut b[..len]));
        u64::from_le_bytes(b)
    }

    fn w(&self, off: u64, len: usize, v: u64) {
        assert!(self.mmio.write(self.common + off, &v.to_le_bytes()[..len]));
    }

    fn status(&self) -> u8 {
        self.r(common::DEVICE_STATUS, 1) as u8
    }

    fn set_status(&self, s: u8) {
        self.w(common::DEVICE_STATUS, 1, u64::from(s));
    }

    /// Enables MSI-X (function-masked while the table is programmed, as Linux does).
    fn enable_msix(&self, vectors: u32) {
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
    fn negotiate(&self) -> u64 {
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
        assert_eq!(offered & (1 << 30), 0, "vhost-user protocol bit hidden");
        let acked = offered & (VIRTIO_F_VERSION_1 | (1 << 9) | (1 << 6));
        self.w(common::DRIVER_FEATURE_SELECT, 4, 0);
        self.w(common::DRIVER_FEATURE, 4, acked & 0xffff_ffff);
        self.w(common::DRIVER_FEATURE_SELECT, 4, 1);
        self.w(common::DRIVER_FEATURE, 4, acked >> 32);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(self.status() & STATUS_FEATURES_OK, 0, "FEATURES_OK kept");
        acked
    }

    /// Sets up queue `q` with `ring` on MSI-X vector `vector`.
    fn setup_queue(&self, q: u16, ring: &Ring, vector: u16) {
        self.w(common::QUEUE_SELECT, 2, u64::from(q));
        assert_eq!(self.r(common::QUEUE_SIZE, 2), u64::from(QUEUE_SIZE));
        self.w(common::QUEUE_SIZE, 2, u64::from(ring.size));
        self.w(common::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        assert_eq!(self.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(vector));
        for (lo, v) in [
            (common::QUEUE_DESC_LO, ring.desc),
            (common::QUEUE_DRIVER_LO, ring.avail),
            (common::QUEUE_DEVICE_LO, ring.used),
        ] {
            self.w(lo, 4, v & 0xffff_ffff);
            self.w(lo + 4, 4, v >> 32);
        }
        self.w(common::QUEUE_ENABLE, 2, 1);
    }

    fn notify_addr(&self, q: u16) -> u64 {
        self.w(common::QUEUE_SELECT, 2, u64::from(q));
        let off = self.r(common::QUEUE_NOTIFY_OFF, 2);
        self.notify + off * u64::from(self.notify_mult)
    }

    fn kick(&self, q: u16) {
        let addr = self.notify_addr(q);
        assert!(self.mmio.write(addr, &q.to_le_bytes()));
    }
}

struct PciRig {
    _daemon: Daemon,
    ram: Arc<GuestRam>,
    events: Arc<TestVmEvents>,
    dev: Arc<Mutex<VirtioPciDevice>>,
    driver: PciDriver,
    image: std::path::PathBuf,
}

fn pci_rig() -> PciRig {
    let daemon = start_blk();
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    let events = Arc::new(TestVmEvents::default());
    let state = blk_device(&daemon, &ram);
    let mut root = PciRoot::new();
    let bar = root.allocate_bar(BAR_SIZE).unwrap();
    let dev = Arc::new(Mutex::new(
        VirtioPciDevice::new(
            state,
            events.clone() as Arc<dyn VmEvents>,
            bar,
            MSIX_GSI_BASE,
        )
        .unwrap(),
    ));
    root.add(dev.clone()).unwrap();
    let root = Arc::new(Mutex::new(root));
    let mut pio = Bus::new();
    pio.insert(
        pci::CONFIG_ADDRESS_PORT,
        pci::CONFIG_PORTS_LEN,
        root.clone(),
    )
    .unwrap();
    let mut mmio = Bus::new();
    mmio.insert(pci::MMIO_WINDOW_START, pci::MMIO_WINDOW_SIZE, root)
        .unwrap();
    let image = daemon.scratch().image().to_path_buf();
    PciRig {
        _daemon: daemon,
        ram,
        events,
        dev,
        driver: PciDriver::probe(pio, mmio),
        image,
    }
}

fn read_image(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

#[test]
fn pci_driver_sequence_completes_block_io_through_bulkhead_blk() {
    let rig = pci_rig();
    let d = &rig.driver;
    // Device config comes from the backend (GET_CONFIG): capacity in sectors.
    let mut cap = [0u8; 8];
    assert!(d.mmio.read(d.device_cfg, &mut cap));
    assert_eq!(u64::from_le_bytes(cap), IMAGE / 512);
    assert_eq!(d.r(common::NUM_QUEUES, 2), 2);

    d.enable_msix(3);
    d.negotiate();
    d.w(common::CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(d.r(common::CONFIG_MSIX_VECTOR, 2), 0);
    let mut ring = Ring::new(rig.ram.clone(), 0x10_0000, QUEUE_SIZE);
    d.setup_queue(0, &ring, 1);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert_eq!(
        d.status() & 0x40,
        0,
        "no DEVICE_NEEDS_RESET: {:#x}",
        d.status()
    );

    // Vector 1 is routed to its GSI with the message the driver wrote.
    let gsi = MSIX_GSI_BASE + 1;
    let route = rig.events.msi_route(gsi).expect("MSI route for vector 1");
    assert_eq!((route.addr, route.data), (0xfee0_0000, 0x41));
    let irq = rig.events.irqfds(gsi);
    assert_eq!(
        irq.len(),
        1,
        "queue 0's call eventfd is the irqfd on GSI {gsi}"
    );
    let notify = d.notify_addr(0);
    let kick = rig
        .events
        .ioevent(IoAddr::Mmio(notify), None)
        .expect("ioeventfd on queue 0's notify address");

    // A write, kicked through the ioeventfd exactly as KVM would signal it.
    let data = pattern(3);
    let w = BlkRequest::new(&rig.ram, 0x20_0000, VIRTIO_BLK_T_OUT, 8, Some(&data));
    ring.submit(&w.chain(false));
    kick.write(1).unwrap();
    assert!(wait_irq(&irq[0]), "interrupt after the write");
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(w.status(&rig.ram), 0, "VIRTIO_BLK_S_OK");
    assert_eq!(read_image(&rig.image, 8 * 512, 4096), data);

    // A read, kicked by an MMIO write that reached the VMM (forwarded).
    let r = BlkRequest::new(&rig.ram, 0x30_0000, VIRTIO_BLK_T_IN, 8, None);
    ring.submit(&r.chain(true));
    d.kick(0);
    assert!(wait_irq(&irq[0]), "interrupt after the read");
    assert_eq!(ring.used_idx(), 2);
    assert_eq!(r.status(&rig.ram), 0);
    let mut back = vec![0u8; 4096];
    rig.ram.read(r.data, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn pci_refuses_out_of_range_selectors_and_queue_writes_outside_the_window() {
    let rig = pci_rig();
    let d = &rig.driver;
    d.enable_msix(3);
    let errors = || rig.dev.lock().unwrap().state().error_count();

    // Before FEATURES_OK: queue registers refuse writes.
    d.set_status(0);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    d.w(common::QUEUE_SELECT, 2, 0);
    d.w(common::QUEUE_SIZE, 2, 16);
    assert_eq!(d.r(common::QUEUE_SIZE, 2), u64::from(QUEUE_SIZE));
    d.w(common::QUEUE_DESC_LO, 4, 0x1234_0000);
    assert_eq!(d.r(common::QUEUE_DESC_LO, 4), 0);

    // Features not offered do not get FEATURES_OK.
    d.w(common::DRIVER_FEATURE_SELECT, 4, 1);
    d.w(common::DRIVER_FEATURE, 4, 1 | (1 << 31));
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(
        d.status() & STATUS_FEATURES_OK,
        0,
        "unoffered feature refused"
    );

    d.negotiate();
    // queue_select out of range: reads 0, writes refused.
    let before = errors();
    d.w(common::QUEUE_SELECT, 2, 7);
    assert_eq!(d.r(common::QUEUE_SIZE, 2), 0);
    d.w(common::QUEUE_SIZE, 2, 16);
    d.w(common::QUEUE_ENABLE, 2, 1);
    assert!(errors() > before);
    d.w(common::QUEUE_SELECT, 2, 0xffff);
    d.w(common::QUEUE_DESC_LO, 4, 0x1000);
    assert_eq!(d.r(common::QUEUE_DESC_LO, 4), 0);

    // Queue sizes must be a power of two no larger than the maximum.
    d.w(common::QUEUE_SELECT, 2, 0);
    d.w(common::QUEUE_SIZE, 2, 48);
    assert_eq!(d.r(common::QUEUE_SIZE, 2), u64::from(QUEUE_SIZE));
    d.w(common::QUEUE_SIZE, 2, u64::from(QUEUE_SIZE) * 2);
    assert_eq!(d.r(common::QUEUE_SIZE, 2), u64::from(QUEUE_SIZE));

    // MSI-X vector indexes beyond the table read back as NO_VECTOR.
    d.w(common::QUEUE_MSIX_VECTOR, 2, 3);
    assert_eq!(d.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    d.w(common::CONFIG_MSIX_VECTOR, 2, 0x7ff);
    assert_eq!(d.r(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    // MSI-X table writes beyond the table are dropped (no panic, no route).
    let table = d.bar + u64::from(d.cfg_read32(d.msix_cap + 4) & !7);
    assert!(d.mmio.write(table + 16 * 3, &0xfee0_0000u32.to_le_bytes()));
    assert!(d.mmio.write(table + 0xff0, &0u32.to_le_bytes()));
    assert!(rig.events.msi_route(MSIX_GSI_BASE + 3).is_none());

    // A good queue, then DRIVER_OK: queue configuration is frozen.
    let ring = Ring::new(rig.ram.clone(), 0x10_0000, 32);
    d.setup_queue(0, &ring, 1);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert!(rig.dev.lock().unwrap().state().is_active());
    let before = errors();
    d.w(common::QUEUE_SELECT, 2, 0);
    d.w(common::QUEUE_DESC_LO, 4, 0x4000_0000);
    d.w(common::QUEUE_SIZE, 2, 16);
    d.w(common::QUEUE_MSIX_VECTOR, 2, 2);
    d.w(common::QUEUE_SELECT, 2, 1);
    d.w(common::QUEUE_ENABLE, 2, 1);
    assert!(errors() >= before + 4);
    d.w(common::QUEUE_SELECT, 2, 0);
    assert_eq!(d.r(common::QUEUE_DESC_LO, 4), ring.desc);
    assert_eq!(d.r(common::QUEUE_SIZE, 2), 32);
    assert_eq!(d.r(common::QUEUE_MSIX_VECTOR, 2), 1);
    d.w(common::QUEUE_SELECT, 2, 1);
    assert_eq!(d.r(common::QUEUE_ENABLE, 2), 0);
    // Driver features are frozen too.
    d.w(common::DRIVER_FEATURE_SELECT, 4, 0);
    let f = d.r(common::DRIVER_FEATURE, 4);
    d.w(common::DRIVER_FEATURE, 4, 0);
    assert_eq!(d.r(common::DRIVER_FEATURE, 4), f);
}

#[test]
fn pci_reset_stops_the_backend_queue_and_a_fresh_driver_works_again() {
    let rig = pci_rig();
    let d = &rig.driver;
    d.enable_msix(3);
    for round in 0..2u8 {
        d.negotiate();
        let mut ring = Ring::new(rig.ram.clone(), 0x10_0000, QUEUE_SIZE);
        d.setup_queue(0, &ring, 1);
        d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(rig.events.ioevent_count(), 1);
        let irq = rig.events.irqfds(MSIX_GSI_BASE + 1);
        let data = pattern(round);
        let w = BlkRequest::new(&rig.ram, 0x20_0000, VIRTIO_BLK_T_OUT, 0, Some(&data));
        ring.submit(&w.chain(false));
        d.kick(0);
        assert!(wait_irq(&irq[0]), "round {round}: interrupt");
        assert_eq!(w.status(&rig.ram), 0);
        assert_eq!(read_image(&rig.image, 0, 4096), data);
        // Reset: SET_VRING_ENABLE 0 + GET_VRING_BASE; eventfds unwired.
        d.set_status(0);
        assert_eq!(d.status(), 0);
        assert!(!rig.dev.lock().unwrap().state().is_active());
        assert_eq!(rig.events.ioevent_count(), 0);
        assert!(rig.events.irqfd_gsis().is_empty());
    }
}

// --------------------------------------------------------------- virtio-mmio

struct MmioDriver {
    bus: Bus,
}

impl MmioDriver {
    fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.bus.read(MMIO_BASE + off, &mut b));
        u32::from_le_bytes(b)
    }

    fn w(&self, off: u64, v: u32) {
        assert!(self.bus.write(MMIO_BASE + off, &v.to_le_bytes()));
    }

    /// Linux virtio_mmio: probe, reset, ACK, DRIVER, features, FEATURES_OK.
    fn negotiate(&self) {
        assert_eq!(self.r(0x000), 0x7472_6976, "magic");
        assert_eq!(self.r(0x004), 2, "version 2");
        assert_eq!(self.r(0x008), VIRTIO_ID_BLOCK);
        self.w(0x070, 0);
        self.w(0x070, u32::from(STATUS_ACKNOWLEDGE));
        self.w(0x070, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        self.w(0x014, 1);
        let hi = self.r(0x010);
        assert_ne!(hi & 1, 0, "VERSION_1");
        self.w(0x024, 0);
        self.w(0x020, 0);
        self.w(0x024, 1);
        self.w(0x020, 1);
        self.w(
            0x070,
            u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
        );
        assert_ne!(self.r(0x070) & u32::from(STATUS_FEATURES_OK), 0);
    }

    fn setup_queue(&self, q: u32, ring: &Ring) {
        self.w(0x030, q);
        assert_eq!(self.r(0x044), 0, "queue not ready yet");
        assert_eq!(self.r(0x034), u32::from(QUEUE_SIZE));
        self.w(0x038, u32::from(ring.size));
        for (lo, v) in [(0x080, ring.desc), (0x090, ring.avail), (0x0a0, ring.used)] {
            self.w(lo, v as u32);
            self.w(lo + 4, (v >> 32) as u32);
        }
        self.w(0x044, 1);
        assert_eq!(self.r(0x044), 1);
    }
}

#[test]
fn mmio_driver_sequence_completes_block_io_and_enforces_the_rules() {
    let daemon = start_blk();
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    let events = Arc::new(TestVmEvents::default());
    let state = blk_device(&daemon, &ram);
    let dev = Arc::new(Mutex::new(VirtioMmioDevice::new(
        state,
        events.clone() as Arc<dyn VmEvents>,
        MMIO_BASE,
        MMIO_GSI,
    )));
    let mut bus = Bus::new();
    bus.insert(MMIO_BASE, MMIO_WINDOW, dev.clone()).unwrap();
    let d = MmioDriver { bus };
    let errors = || dev.lock().unwrap().state().error_count();

    // Config space from the backend.
    let mut cap = [0u8; 8];
    assert!(d.bus.read(MMIO_BASE + 0x100, &mut cap));
    assert_eq!(u64::from_le_bytes(cap), IMAGE / 512);

    // Queue writes before FEATURES_OK are refused.
    d.w(0x070, 0);
    d.w(0x070, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
    d.w(0x030, 0);
    d.w(0x038, 16);
    d.w(0x044, 1);
    assert_eq!(d.r(0x044), 0);

    d.negotiate();
    // Out-of-range queue select: QueueNumMax reads 0, writes refused.
    let before = errors();
    d.w(0x030, 2);
    assert_eq!(d.r(0x034), 0);
    d.w(0x044, 1);
    d.w(0x030, u32::MAX);
    d.w(0x080, 0x1000);
    assert!(errors() >= before + 2);

    let mut ring = Ring::new(ram.clone(), 0x10_0000, 32);
    d.setup_queue(0, &ring);
    assert_eq!(d.r(0x060), 0, "no interrupt status before DRIVER_OK");
    d.w(
        0x070,
        u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
    );
    assert_eq!(d.r(0x070) & 0x40, 0, "no DEVICE_NEEDS_RESET");
    // vhost-user: the VMM cannot see interrupts, so it reports VRING.
    assert_eq!(d.r(0x060), 1);

    // Frozen after DRIVER_OK.
    let before = errors();
    d.w(0x030, 0);
    d.w(0x038, 8);
    d.w(0x080, 0x5000);
    d.w(0x030, 1);
    d.w(0x044, 1);
    assert!(errors() >= before + 3);
    d.w(0x030, 1);
    assert_eq!(d.r(0x044), 0);

    let irq = events.irqfds(MMIO_GSI);
    assert_eq!(irq.len(), 1, "queue 0's call is an irqfd on the device GSI");
    let kick = events
        .ioevent(IoAddr::Mmio(MMIO_BASE + 0x50), Some(0))
        .expect("ioeventfd on QueueNotify with datamatch 0");

    let data = pattern(9);
    let w = BlkRequest::new(&ram, 0x20_0000, VIRTIO_BLK_T_OUT, 16, Some(&data));
    ring.submit(&w.chain(false));
    kick.write(1).unwrap();
    assert!(wait_irq(&irq[0]), "interrupt after the write");
    assert_eq!(w.status(&ram), 0);
    assert_eq!(read_image(daemon.scratch().image(), 16 * 512, 4096), data);

    let r = BlkRequest::new(&ram, 0x30_0000, VIRTIO_BLK_T_IN, 16, None);
    ring.submit(&r.chain(true));
    d.w(0x050, 0); // QueueNotify that reached the VMM: forwarded
    assert!(wait_irq(&irq[0]), "interrupt after the read");
    let mut back = vec![0u8; 4096];
    ram.read(r.data, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(ring.used_idx(), 2);

    // Notify of a queue that does not exist: counted, ignored.
    let before = errors();
    d.w(0x050, 9);
    assert_eq!(errors(), before + 1);

    // Reset drains the backend and unwires.
    d.w(0x070, 0);
    assert_eq!(d.r(0x070), 0);
    assert_eq!(d.r(0x060), 0);
    assert_eq!(events.ioevent_count(), 0);
    assert!(events.irqfds(MMIO_GSI).is_empty());
}

#[test]
fn unreachable_backend_socket_is_a_clear_error() {
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    let opts = VhostUserOptions {
        socket: "/nonexistent/bulkhead.sock".into(),
        virtio_id: VIRTIO_ID_BLOCK,
        queues: None,
        queue_size: QUEUE_SIZE,
        config_size: 60,
    };
    let err = VhostUserDevice::connect(&opts, ram)
        .err()
        .expect("connect must fail")
        .to_string();
    assert!(err.contains("/nonexistent/bulkhead.sock"), "{err}");
}
