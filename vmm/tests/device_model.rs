//! The virtio transports without a vCPU: a simulated guest driver performs the
//! register accesses Linux's virtio-pci and virtio-mmio drivers perform,
//! against bulkhead-vmm's transports wired to a real `bulkhead-blk` process
//! (build it first: `cargo build -p bulkhead-blk`). Requests are laid out by
//! hand in the VMM's own guest RAM; completion is seen through the eventfd
//! the transport registered as the queue's irqfd.

// Test code: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};

use bulkhead_tests::daemon::{Daemon, Scratch};
use bulkhead_vmm::bus::Bus;
use bulkhead_vmm::device::VIRTIO_ID_BLOCK;
use bulkhead_vmm::memory::GuestRam;
use bulkhead_vmm::pci::{self, PciRoot};
use bulkhead_vmm::transport::mmio::{MMIO_WINDOW, VirtioMmioDevice};
use bulkhead_vmm::transport::pci::{BAR_SIZE, VirtioPciDevice, common};
use bulkhead_vmm::transport::{
    NO_VECTOR, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VirtioState,
};
use bulkhead_vmm::vhost_user::{VhostUserDevice, VhostUserOptions};
use bulkhead_vmm::vm_events::{IoAddr, TestVmEvents, VmEvents};
use support::*;

fn start_blk() -> Daemon {
    let _ = env_logger::builder().is_test(true).try_init();
    let scratch = Scratch::new(IMAGE).expect("scratch dir");
    Daemon::blk(scratch, &["--num-queues", "2"])
        .expect("start bulkhead-blk (run `cargo build -p bulkhead-blk` first)")
}

/// bulkhead-blk behind the VMM's device; `packed`: the VMM's `packed=on`.
fn blk_device(daemon: &Daemon, ram: &Arc<GuestRam>, packed: bool) -> VirtioState {
    let opts = VhostUserOptions {
        socket: daemon.socket().to_path_buf(),
        virtio_id: VIRTIO_ID_BLOCK,
        queues: None,
        queue_size: QUEUE_SIZE,
        config_size: 60,
        packed,
    };
    let dev = VhostUserDevice::connect(&opts, ram.clone()).expect("connect to bulkhead-blk");
    VirtioState::new(Box::new(dev)).expect("virtio state")
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
    pci_rig_with(false)
}

fn pci_rig_with(packed: bool) -> PciRig {
    let daemon = start_blk();
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    let events = Arc::new(TestVmEvents::default());
    let state = blk_device(&daemon, &ram, packed);
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
    assert!(wait_used(&ring, &irq[0], 1), "interrupt after the write");
    assert_eq!(w.status(&rig.ram), 0, "VIRTIO_BLK_S_OK");
    assert_eq!(read_image(&rig.image, 8 * 512, 4096), data);

    // A read, kicked by an MMIO write that reached the VMM (forwarded).
    let r = BlkRequest::new(&rig.ram, 0x30_0000, VIRTIO_BLK_T_IN, 8, None);
    ring.submit(&r.chain(true));
    d.kick(0);
    assert!(wait_used(&ring, &irq[0], 2), "interrupt after the read");
    assert_eq!(r.status(&rig.ram), 0);
    let mut back = vec![0u8; 4096];
    rig.ram.read(r.data, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn pci_driver_with_packed_rings_completes_block_io_through_bulkhead_blk() {
    use bulkhead_spec::ring::VIRTIO_F_RING_PACKED;
    // Without packed=on the VMM keeps the bit from the driver.
    let split = pci_rig();
    assert_eq!(
        split.driver.negotiate_with(VIRTIO_F_RING_PACKED) & VIRTIO_F_RING_PACKED,
        0,
        "packed rings are offered only with packed=on"
    );
    drop(split);
    let rig = pci_rig_with(true);
    let d = &rig.driver;
    d.enable_msix(3);
    let acked = d.negotiate_with(VIRTIO_F_RING_PACKED);
    assert_ne!(
        acked & VIRTIO_F_RING_PACKED,
        0,
        "with packed=on the VMM offers what bulkhead-blk offers"
    );
    d.w(common::CONFIG_MSIX_VECTOR, 2, 0);
    let mut ring = PackedRing::new(rig.ram.clone(), 0x10_0000, QUEUE_SIZE);
    d.setup_packed_queue(0, &ring, 1);
    d.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert_eq!(
        d.status() & 0x40,
        0,
        "no DEVICE_NEEDS_RESET: {:#x}",
        d.status()
    );
    let irq = rig.events.irqfds(MSIX_GSI_BASE + 1);
    let kick = rig
        .events
        .ioevent(IoAddr::Mmio(d.notify_addr(0)), None)
        .expect("ioeventfd on queue 0's notify address");
    // Writes then reads of 3-slot chains: 60 requests go round the 64-slot
    // ring nearly three times, the wrap counters flipping mid-chain.
    for i in 0..30u16 {
        let data = pattern(i as u8);
        let sector = 8 * u64::from(i);
        let w = BlkRequest::new(&rig.ram, 0x20_0000, VIRTIO_BLK_T_OUT, sector, Some(&data));
        ring.submit(i % QUEUE_SIZE, &w.chain(false));
        kick.write(1).unwrap();
        assert_eq!(
            wait_packed_used(&mut ring, &irq[0]).map(|u| u.0),
            Some(i % QUEUE_SIZE)
        );
        assert_eq!(w.status(&rig.ram), 0, "write {i}");
        assert_eq!(read_image(&rig.image, sector * 512, 4096), data);
        let r = BlkRequest::new(&rig.ram, 0x30_0000, VIRTIO_BLK_T_IN, sector, None);
        ring.submit((i + 1) % QUEUE_SIZE, &r.chain(true));
        d.kick(0);
        let used = wait_packed_used(&mut ring, &irq[0]);
        assert_eq!(used, Some(((i + 1) % QUEUE_SIZE, 4097)), "read {i}");
        let mut back = vec![0u8; 4096];
        rig.ram.read(r.data, &mut back).unwrap();
        assert_eq!(back, data);
    }
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
        assert!(wait_used(&ring, &irq[0], 1), "round {round}: interrupt");
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

#[test]
fn mmio_driver_sequence_completes_block_io_and_enforces_the_rules() {
    let daemon = start_blk();
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    let events = Arc::new(TestVmEvents::default());
    let state = blk_device(&daemon, &ram, false);
    let dev = Arc::new(Mutex::new(VirtioMmioDevice::new(
        state,
        events.clone() as Arc<dyn VmEvents>,
        MMIO_BASE,
        MMIO_GSI,
    )));
    let mut bus = Bus::new();
    bus.insert(MMIO_BASE, MMIO_WINDOW, dev.clone()).unwrap();
    let d = MmioDriver::blk(bus);
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
    assert!(wait_used(&ring, &irq[0], 1), "interrupt after the write");
    assert_eq!(w.status(&ram), 0);
    assert_eq!(read_image(daemon.scratch().image(), 16 * 512, 4096), data);

    let r = BlkRequest::new(&ram, 0x30_0000, VIRTIO_BLK_T_IN, 16, None);
    ring.submit(&r.chain(true));
    d.w(0x050, 0); // QueueNotify that reached the VMM: forwarded
    assert!(wait_used(&ring, &irq[0], 2), "interrupt after the read");
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
        packed: false,
    };
    let err = VhostUserDevice::connect(&opts, ram)
        .err()
        .expect("connect must fail")
        .to_string();
    assert!(err.contains("/nonexistent/bulkhead.sock"), "{err}");
}
