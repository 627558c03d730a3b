//! Targets `vmm_pci` and `vmm_mmio`: `bulkhead-vmm`'s virtio-pci and
//! virtio-mmio register handling, driven without KVM: a fake device behind
//! [`VirtioState`], the record-only [`TestVmEvents`], and a script of guest
//! accesses (offset, size, read or write, value).
//!
//! Input: device (queue count u8, log2 of the largest queue size u8, offered
//! features u64, activation fails bool), op count u8, then ops: kind u8,
//! offset u16, size u8 (1, 2, 4 or 8 bytes), value u64. PCI ops reach the
//! function's BAR directly (offsets wrap into the BAR), or its configuration
//! space through the PCI root's 0xCF8/0xCFC ports, or the PCI root's MMIO
//! window (wherever the guest moved the BAR); MMIO ops reach the 4 KiB window.
//!
//! Invariants: nothing panics; queue registers change only between
//! FEATURES_OK and DRIVER_OK (or to their reset values on a reset), so they
//! are frozen while DRIVER_OK is set; a queue size is a power of two no larger
//! than the device's; an MSI-X vector (queue or config) is NO_VECTOR or in
//! range; FEATURES_OK implies the accepted features were offered and include
//! VERSION_1; out-of-range queue selectors read as zero; the device is
//! activated only with features it offered and queues it has, and
//! eventfds are wired into the hypervisor exactly while it runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_vmm::bus::{Bus, BusDevice};
use bulkhead_vmm::device::{
    ActiveQueue, DeviceError, VIRTIO_F_VERSION_1, VIRTIO_ID_NET, VirtioDevice,
};
use bulkhead_vmm::pci::{self, PciFunction, PciRoot};
use bulkhead_vmm::transport::mmio::{MMIO_WINDOW, QUEUE_NOTIFY_OFFSET, VirtioMmioDevice};
use bulkhead_vmm::transport::pci::{BAR_SIZE, VirtioPciDevice, common};
use bulkhead_vmm::transport::{
    NO_VECTOR, QueueRegs, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VirtioState,
};
use bulkhead_vmm::vm_events::{TestVmEvents, VmEvents};

use super::input::{Input, Seed};

/// GSI of the first MSI-X vector (as the VMM assigns them).
const GSI_BASE: u32 = 24;
/// Where the MMIO transport sits.
const MMIO_BASE: u64 = 0xd000_0000;
/// Bytes of the fake device's config space.
const CONFIG_LEN: usize = 24;

/// A device that only checks what its transport asks of it.
struct FakeDevice {
    queues: usize,
    max: u16,
    features: u64,
    fail: bool,
    config: [u8; CONFIG_LEN],
    running: Arc<AtomicBool>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn queue_max_size(&self) -> u16 {
        self.max
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get_mut(o))
            {
                *slot = *b;
            }
        }
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), DeviceError> {
        assert!(
            !self.running.load(Ordering::SeqCst),
            "activated while running"
        );
        assert_eq!(
            features & !self.features,
            0,
            "activated with features {features:#x} never offered ({:#x})",
            self.features
        );
        assert_ne!(
            features & VIRTIO_F_VERSION_1,
            0,
            "activated without VERSION_1"
        );
        for q in queues {
            assert!(
                q.index < self.queues,
                "activated queue {} of {}",
                q.index,
                self.queues
            );
            assert!(
                q.size.is_power_of_two() && q.size <= self.max,
                "queue {} activated with size {} (max {})",
                q.index,
                q.size,
                self.max
            );
        }
        if self.fail {
            return Err(DeviceError::Backend("fuzz: activation refused".into()));
        }
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        assert!(self.running.load(Ordering::SeqCst), "reset while stopped");
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// The device parameters decoded from the input.
struct DeviceSetup {
    queues: usize,
    max: u16,
    features: u64,
    fail: bool,
}

impl DeviceSetup {
    fn decode(inp: &mut Input<'_>) -> Self {
        DeviceSetup {
            queues: 1 + usize::from(inp.u8() % 8),
            max: 1 << (inp.u8() % 16),
            features: inp.u64(),
            fail: inp.bool(),
        }
    }

    fn encode(seed: &mut Seed, queues: u8, max_log2: u8, features: u64) {
        seed.u8(queues - 1).u8(max_log2).u64(features).bool(false);
    }

    fn state(&self, running: Arc<AtomicBool>) -> VirtioState {
        let dev = FakeDevice {
            queues: self.queues,
            max: self.max,
            features: self.features,
            fail: self.fail,
            config: [0x5a; CONFIG_LEN],
            running,
        };
        VirtioState::new(Box::new(dev)).expect("eventfds")
    }
}

/// One guest access.
struct Op {
    kind: u8,
    offset: u16,
    size: usize,
    value: u64,
}

impl Op {
    fn decode(inp: &mut Input<'_>) -> Self {
        Op {
            kind: inp.u8(),
            offset: inp.u16(),
            size: [1, 2, 4, 8][usize::from(inp.u8() % 4)],
            value: inp.u64(),
        }
    }

    fn encode(seed: &mut Seed, kind: u8, offset: u16, size: usize, value: u64) {
        let s = match size {
            1 => 0,
            2 => 1,
            4 => 2,
            _ => 3,
        };
        seed.u8(kind).u16(offset).u8(s).u64(value);
    }

    fn bytes(&self) -> Vec<u8> {
        self.value.to_le_bytes()[..self.size].to_vec()
    }
}

fn decode_ops(inp: &mut Input<'_>) -> Vec<Op> {
    let n = inp.u8() % 96;
    (0..n).map(|_| Op::decode(inp)).collect()
}

/// Checks shared by both transports after every access.
fn check_state(
    s: &VirtioState,
    setup: &DeviceSetup,
    before: &(u8, Vec<QueueRegs>, bool),
    events: &TestVmEvents,
    running: &AtomicBool,
) {
    let (old_status, old_queues, was_writable) = before;
    let status = s.status();
    let fresh = |q: &QueueRegs| {
        q.size == setup.max && !q.ready && q.desc == 0 && q.avail == 0 && q.used == 0
    };
    if s.queues() != old_queues.as_slice() {
        let reset = status == 0 && s.queues().iter().all(fresh);
        assert!(
            *was_writable || reset,
            "queue registers changed in status {old_status:#x}: {old_queues:?} -> {:?}",
            s.queues()
        );
        assert!(
            reset || old_status & STATUS_DRIVER_OK == 0,
            "queue registers changed after DRIVER_OK"
        );
    }
    for q in s.queues() {
        assert!(
            q.size.is_power_of_two() && q.size <= setup.max,
            "queue size {} (max {})",
            q.size,
            setup.max
        );
    }
    if status & STATUS_FEATURES_OK != 0 {
        let f = s.driver_features();
        assert_eq!(
            f & !setup.features,
            0,
            "FEATURES_OK with unoffered features"
        );
        assert_ne!(f & VIRTIO_F_VERSION_1, 0, "FEATURES_OK without VERSION_1");
    }
    if s.is_active() {
        assert_ne!(status & STATUS_DRIVER_OK, 0, "active without DRIVER_OK");
    }
    assert_eq!(
        s.is_active(),
        running.load(Ordering::SeqCst),
        "device and transport disagree"
    );
    if !s.is_active() {
        assert_eq!(
            events.ioevent_count(),
            0,
            "ioeventfds left wired on a stopped device"
        );
        assert!(
            events.irqfd_gsis().is_empty(),
            "irqfds left wired on a stopped device"
        );
    }
}

fn snapshot(s: &VirtioState) -> (u8, Vec<QueueRegs>, bool) {
    (s.status(), s.queues().to_vec(), s.queue_writable())
}

/// Runs one `vmm_pci` input.
pub fn run_pci(data: &[u8]) {
    let mut inp = Input::new(data);
    let setup = DeviceSetup::decode(&mut inp);
    let ops = decode_ops(&mut inp);

    let running = Arc::new(AtomicBool::new(false));
    let events = Arc::new(TestVmEvents::default());
    let mut root = PciRoot::new();
    let bar = root.allocate_bar(BAR_SIZE).expect("BAR");
    let dev = Arc::new(Mutex::new(
        VirtioPciDevice::new(
            setup.state(running.clone()),
            events.clone() as Arc<dyn VmEvents>,
            bar,
            GSI_BASE,
        )
        .expect("virtio-pci function"),
    ));
    let slot = root.add(dev.clone()).expect("slot");
    let root = Arc::new(Mutex::new(root));
    let mut pio = Bus::new();
    pio.insert(
        pci::CONFIG_ADDRESS_PORT,
        pci::CONFIG_PORTS_LEN,
        root.clone(),
    )
    .expect("config ports");
    let mut mmio = Bus::new();
    mmio.insert(pci::MMIO_WINDOW_START, pci::MMIO_WINDOW_SIZE, root)
        .expect("MMIO window");
    let lock = || dev.lock().unwrap_or_else(|e| e.into_inner());

    for op in &ops {
        let before = snapshot(lock().state());
        let mut buf = vec![0u8; op.size];
        match op.kind % 6 {
            0 => lock().bar_write(u64::from(op.offset) % BAR_SIZE, &op.bytes()),
            1 => {
                let off = u64::from(op.offset) % BAR_SIZE;
                lock().bar_read(off, &mut buf);
                check_read(lock().state(), off, &buf);
            }
            2 | 3 => {
                // Configuration space through mechanism #1: address, then data.
                let reg = u32::from(op.offset as u8);
                let addr = 0x8000_0000 | ((slot as u32) << 11) | (reg & 0xfc);
                pio.write(pci::CONFIG_ADDRESS_PORT, &addr.to_le_bytes());
                let port = pci::CONFIG_ADDRESS_PORT + 4 + u64::from(reg & 3);
                if op.kind % 6 == 2 {
                    pio.write(port, &op.bytes());
                } else {
                    pio.read(port, &mut buf);
                }
            }
            4 => {
                let addr = pci::MMIO_WINDOW_START + (op.value >> 32) % pci::MMIO_WINDOW_SIZE;
                mmio.write(addr, &op.bytes()[..op.size.min(4)]);
            }
            _ => {
                // Somewhere in the first pages of the window, where the BAR starts.
                let addr = pci::MMIO_WINDOW_START + u64::from(op.offset) * 2;
                mmio.read(addr, &mut buf);
            }
        }
        let d = lock();
        let s = d.state();
        check_state(s, &setup, &before, &events, &running);
        let vectors = d.msix_vectors();
        let in_range = |v: u16| v == NO_VECTOR || usize::from(v) < vectors;
        assert!(
            in_range(d.config_vector()),
            "config vector {}",
            d.config_vector()
        );
        for q in s.queues() {
            assert!(in_range(q.vector), "queue vector {}", q.vector);
        }
    }
    let mut d = lock();
    // A reset stops everything and unwires every eventfd.
    d.bar_write(common::DEVICE_STATUS, &[0]);
    assert!(!d.state().is_active() && !running.load(Ordering::SeqCst));
    assert_eq!(events.ioevent_count(), 0);
}

/// Out-of-range queue selectors read as zero (or NO_VECTOR).
fn check_read(s: &VirtioState, off: u64, buf: &[u8]) {
    if s.selected_index().is_some() || buf.len() != 2 && buf.len() != 4 {
        return;
    }
    let v = buf.iter().rev().fold(0u64, |a, b| (a << 8) | u64::from(*b));
    match (off, buf.len()) {
        (common::QUEUE_SIZE, 2) | (common::QUEUE_ENABLE, 2) | (common::QUEUE_NOTIFY_OFF, 2) => {
            assert_eq!(v, 0, "register {off:#x} of an out-of-range queue reads {v}")
        }
        (common::QUEUE_MSIX_VECTOR, 2) => assert_eq!(v, u64::from(NO_VECTOR)),
        (o, 4) if (common::QUEUE_DESC_LO..=common::QUEUE_DEVICE_HI).contains(&o) => {
            assert_eq!(v, 0, "register {off:#x} of an out-of-range queue reads {v}")
        }
        _ => {}
    }
}

/// Runs one `vmm_mmio` input.
pub fn run_mmio(data: &[u8]) {
    let mut inp = Input::new(data);
    let setup = DeviceSetup::decode(&mut inp);
    let ops = decode_ops(&mut inp);

    let running = Arc::new(AtomicBool::new(false));
    let events = Arc::new(TestVmEvents::default());
    let mut dev = VirtioMmioDevice::new(
        setup.state(running.clone()),
        events.clone() as Arc<dyn VmEvents>,
        MMIO_BASE,
        5,
    );
    for op in &ops {
        let before = snapshot(dev.state());
        let off = u64::from(op.offset) % MMIO_WINDOW;
        if op.kind & 1 == 0 {
            dev.write(MMIO_BASE, off, &op.bytes());
        } else {
            let mut buf = vec![0u8; op.size];
            dev.read(MMIO_BASE, off, &mut buf);
            let s = dev.state();
            // QueueNumMax (0x34), QueueReady (0x44) of an out-of-range queue: 0.
            if s.selected_index().is_none() && op.size == 4 && (off == 0x34 || off == 0x44) {
                assert_eq!(buf, [0; 4], "register {off:#x} of an out-of-range queue");
            }
        }
        check_state(dev.state(), &setup, &before, &events, &running);
    }
    dev.write(MMIO_BASE, 0x70, &0u32.to_le_bytes());
    assert!(!dev.state().is_active() && !running.load(Ordering::SeqCst));
    assert_eq!(events.ioevent_count(), 0);
}

/// Offered features of the seeds: VERSION_1 plus a few device bits.
const SEED_FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b1010_0001;

/// Seeds for `vmm_pci`: the Linux driver's bring-up (memory decoding and
/// MSI-X on, negotiation, two queues with vectors, DRIVER_OK), a kick, writes
/// refused after DRIVER_OK, a reset and a second bring-up; one with
/// out-of-range selectors and vectors.
pub fn seeds_pci() -> Vec<(&'static str, Vec<u8>)> {
    let bring_up = |s: &mut Seed| {
        // Command register: memory decoding; MSI-X control: enable.
        Op::encode(s, 2, 0x04, 2, 0x0006);
        Op::encode(s, 2, 0x86, 2, 0x8000);
        Op::encode(s, 0, common::DEVICE_STATUS as u16, 1, 0);
        Op::encode(
            s,
            0,
            common::DEVICE_STATUS as u16,
            1,
            u64::from(STATUS_ACKNOWLEDGE),
        );
        let ad = u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        Op::encode(s, 0, common::DEVICE_STATUS as u16, 1, ad);
        for sel in 0..2u64 {
            Op::encode(s, 0, common::DEVICE_FEATURE_SELECT as u16, 4, sel);
            Op::encode(s, 1, common::DEVICE_FEATURE as u16, 4, 0);
            Op::encode(s, 0, common::DRIVER_FEATURE_SELECT as u16, 4, sel);
            Op::encode(
                s,
                0,
                common::DRIVER_FEATURE as u16,
                4,
                SEED_FEATURES >> (32 * sel),
            );
        }
        let fok = ad | u64::from(STATUS_FEATURES_OK);
        Op::encode(s, 0, common::DEVICE_STATUS as u16, 1, fok);
        Op::encode(s, 1, common::DEVICE_STATUS as u16, 1, 0);
        Op::encode(s, 0, common::CONFIG_MSIX_VECTOR as u16, 2, 0);
        for q in 0..2u64 {
            Op::encode(s, 0, common::QUEUE_SELECT as u16, 2, q);
            Op::encode(s, 1, common::QUEUE_SIZE as u16, 2, 0);
            Op::encode(s, 0, common::QUEUE_SIZE as u16, 2, 64);
            Op::encode(s, 0, common::QUEUE_MSIX_VECTOR as u16, 2, q + 1);
            let base = 0x10_0000 + 0x4000 * q;
            Op::encode(s, 0, common::QUEUE_DESC_LO as u16, 4, base);
            Op::encode(s, 0, common::QUEUE_DESC_HI as u16, 4, 0);
            Op::encode(s, 0, common::QUEUE_DRIVER_LO as u16, 4, base + 0x400);
            Op::encode(s, 0, common::QUEUE_DRIVER_HI as u16, 4, 0);
            Op::encode(s, 0, common::QUEUE_DEVICE_LO as u16, 4, base + 0x1000);
            Op::encode(s, 0, common::QUEUE_DEVICE_HI as u16, 4, 0);
            Op::encode(s, 0, common::QUEUE_ENABLE as u16, 2, 1);
        }
        // MSI-X table: vector 1 address, data, unmask.
        Op::encode(s, 0, 0x4010, 8, 0xfee0_0000);
        Op::encode(s, 0, 0x4018, 4, 0x41);
        Op::encode(s, 0, 0x401c, 4, 0);
        Op::encode(
            s,
            0,
            common::DEVICE_STATUS as u16,
            1,
            fok | u64::from(STATUS_DRIVER_OK),
        );
    };
    let mut out = Vec::new();

    let mut s = Seed::new();
    DeviceSetup::encode(&mut s, 3, 8, SEED_FEATURES);
    let mut ops = Seed::new();
    bring_up(&mut ops);
    // Kick queue 1; refused writes after DRIVER_OK; reset; bring up again.
    Op::encode(&mut ops, 0, 0x3004, 2, 1);
    Op::encode(&mut ops, 0, common::QUEUE_SIZE as u16, 2, 16);
    Op::encode(&mut ops, 0, common::QUEUE_DESC_LO as u16, 4, 0xdead_0000);
    Op::encode(&mut ops, 0, common::DRIVER_FEATURE as u16, 4, 0);
    Op::encode(&mut ops, 0, common::DEVICE_STATUS as u16, 1, 0);
    bring_up(&mut ops);
    let ops = ops.finish();
    s.u8((ops.len() / 12) as u8).bytes(&ops);
    out.push(("bring-up-kick-reset", s.finish()));

    let mut s = Seed::new();
    DeviceSetup::encode(&mut s, 2, 4, SEED_FEATURES);
    let mut ops = Seed::new();
    bring_up(&mut ops);
    Op::encode(&mut ops, 0, common::QUEUE_SELECT as u16, 2, 0xffff);
    Op::encode(&mut ops, 1, common::QUEUE_SIZE as u16, 2, 0);
    Op::encode(&mut ops, 1, common::QUEUE_DESC_LO as u16, 4, 0);
    Op::encode(&mut ops, 0, common::QUEUE_MSIX_VECTOR as u16, 2, 0x7ff);
    Op::encode(&mut ops, 0, common::CONFIG_MSIX_VECTOR as u16, 2, 0x800);
    Op::encode(&mut ops, 0, 0x4ff0, 4, 1);
    Op::encode(&mut ops, 0, 0x3ffc, 4, 0);
    // Move the BAR (a dword write of BAR0) and read through the window.
    Op::encode(&mut ops, 2, 0x10, 4, 0xc001_0000);
    Op::encode(&mut ops, 5, 0x8000, 4, 0);
    let ops = ops.finish();
    s.u8((ops.len() / 12) as u8).bytes(&ops);
    out.push(("bring-up-bad-selectors-bar-move", s.finish()));
    out
}

/// Seeds for `vmm_mmio`: Linux's bring-up (negotiation, two queues,
/// DRIVER_OK), a notify, writes refused after DRIVER_OK, a reset and another
/// bring-up; out-of-range selectors and a misaligned access.
pub fn seeds_mmio() -> Vec<(&'static str, Vec<u8>)> {
    let w = |s: &mut Seed, off: u16, v: u64| Op::encode(s, 0, off, 4, v);
    let r = |s: &mut Seed, off: u16| Op::encode(s, 1, off, 4, 0);
    let bring_up = |s: &mut Seed| {
        for off in [0x000, 0x004, 0x008, 0x00c] {
            r(s, off);
        }
        w(s, 0x70, 0);
        w(s, 0x70, u64::from(STATUS_ACKNOWLEDGE));
        let ad = u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(s, 0x70, ad);
        for sel in 0..2u64 {
            w(s, 0x14, sel);
            r(s, 0x10);
            w(s, 0x24, sel);
            w(s, 0x20, (SEED_FEATURES >> (32 * sel)) & 0xffff_ffff);
        }
        let fok = ad | u64::from(STATUS_FEATURES_OK);
        w(s, 0x70, fok);
        r(s, 0x70);
        for q in 0..2u64 {
            w(s, 0x30, q);
            r(s, 0x34);
            w(s, 0x38, 64);
            let base = 0x10_0000 + 0x4000 * q;
            w(s, 0x80, base);
            w(s, 0x84, 0);
            w(s, 0x90, base + 0x400);
            w(s, 0x94, 0);
            w(s, 0xa0, base + 0x1000);
            w(s, 0xa4, 0);
            w(s, 0x44, 1);
        }
        w(s, 0x70, fok | u64::from(STATUS_DRIVER_OK));
    };
    let mut out = Vec::new();
    let mut s = Seed::new();
    DeviceSetup::encode(&mut s, 2, 8, SEED_FEATURES);
    let mut ops = Seed::new();
    bring_up(&mut ops);
    w(&mut ops, QUEUE_NOTIFY_OFFSET as u16, 1);
    r(&mut ops, 0x60);
    w(&mut ops, 0x64, 1);
    w(&mut ops, 0x38, 16);
    w(&mut ops, 0x80, 0xdead_0000);
    w(&mut ops, 0x20, 0);
    r(&mut ops, 0x100);
    w(&mut ops, 0x70, 0);
    bring_up(&mut ops);
    let ops = ops.finish();
    s.u8((ops.len() / 12) as u8).bytes(&ops);
    out.push(("bring-up-notify-reset", s.finish()));

    let mut s = Seed::new();
    DeviceSetup::encode(&mut s, 1, 4, SEED_FEATURES);
    let mut ops = Seed::new();
    bring_up(&mut ops);
    w(&mut ops, 0x30, 0xffff_ffff);
    r(&mut ops, 0x34);
    r(&mut ops, 0x44);
    w(&mut ops, 0x38, 0x1_0000);
    Op::encode(&mut ops, 0, 0x72, 2, 0);
    Op::encode(&mut ops, 0, 0x100, 8, u64::MAX);
    let ops = ops.finish();
    s.u8((ops.len() / 12) as u8).bytes(&ops);
    out.push(("bring-up-bad-selectors", s.finish()));
    out
}
