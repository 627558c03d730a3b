//! KVM plumbing with small hand-assembled real-mode guests on this machine's
//! /dev/kvm: port and MMIO exits reach the right bus device, ioeventfds
//! signal without a VM exit to the VMM, and irqfds inject interrupts (both
//! an MSI route, as virtio-pci uses, and a PIC line, as virtio-mmio uses).
//! Without /dev/kvm every test skips (`bulkhead_tests::skip`; CI accepts
//! this one reason).

// Test code: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_tests::skip::SkipReason;
use bulkhead_vmm::bus::{Bus, BusDevice};
use bulkhead_vmm::kvm::Vm;
use bulkhead_vmm::memory::GuestRam;
use bulkhead_vmm::vcpu::{self, ExitReason, ExitRequest, Vcpu};
use bulkhead_vmm::vm_events::{IoAddr, MsiMessage, VmEvents};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const CODE: u64 = 0x1000;
const HANDLER: u64 = 0x1100;
const TEST_PORT: u64 = 0x500;
const DONE_PORT: u64 = 0x501;
const IRQ_PORT: u64 = 0x502;
const IOEVENT_PORT: u64 = 0x600;
const MMIO_DEV: u64 = 0xb8000;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Records every access; reads return `answer`.
struct Recorder {
    log: Log,
    answer: u8,
    exit: Option<Arc<ExitRequest>>,
}

impl BusDevice for Recorder {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(self.answer);
        self.log
            .lock()
            .unwrap()
            .push((offset, data.to_vec(), false));
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.log.lock().unwrap().push((offset, data.to_vec(), true));
        if let Some(e) = &self.exit {
            e.request(ExitReason::PowerOff);
        }
    }
}

type Log = Arc<Mutex<Vec<(u64, Vec<u8>, bool)>>>;

fn recorder(answer: u8, exit: Option<Arc<ExitRequest>>) -> (Arc<Mutex<Recorder>>, Log) {
    let log: Log = Arc::default();
    let r = Recorder {
        log: log.clone(),
        answer,
        exit,
    };
    (Arc::new(Mutex::new(r)), log)
}

fn kvm_unavailable() -> Option<SkipReason> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Some(SkipReason::NoKvm("/dev/kvm does not exist".into()));
    }
    match Vm::new() {
        Ok(_) => None,
        Err(e) => Some(SkipReason::NoKvm(format!(
            "{e}: {:?}",
            std::error::Error::source(&e)
        ))),
    }
}

/// Returns from the calling test, after [`skip`], where KVM is unusable.
macro_rules! require_kvm {
    ($test:expr) => {
        if bulkhead_tests::skip::skip_if($test, kvm_unavailable()) {
            return;
        }
    };
}

struct Rig {
    vm: Vm,
    ram: Arc<GuestRam>,
    pio: Bus,
    mmio: Bus,
    exit: Arc<ExitRequest>,
    done: Log,
}

impl Rig {
    /// RAM below 0xA0000 and 1-2 MiB (the legacy hole stays free for MMIO
    /// devices), in-kernel irqchip and PIT, and the "done" port.
    fn new() -> Self {
        let vm = Vm::new().unwrap();
        vm.setup_platform().unwrap();
        let ram = Arc::new(GuestRam::with_layout(&[(0, 0xa0000), (0x10_0000, 0x10_0000)]).unwrap());
        vm.map_ram(&ram).unwrap();
        let exit = ExitRequest::new().unwrap();
        let mut pio = Bus::new();
        let (done_dev, done) = recorder(0, Some(exit.clone()));
        pio.insert(DONE_PORT, 1, done_dev).unwrap();
        Rig {
            vm,
            ram,
            pio,
            mmio: Bus::new(),
            exit,
            done,
        }
    }

    /// Starts vCPU 0 in real mode at 0:CODE with `code` there.
    fn start(&self, code: &[u8], prepare: impl FnOnce(&Vcpu)) -> JoinHandle<ExitReason> {
        self.ram.write(CODE, code).unwrap();
        let fd = self.vm.create_vcpu(0).unwrap();
        let mut v = Vcpu::new(
            fd,
            0,
            Arc::new(self.pio.clone()),
            Arc::new(self.mmio.clone()),
            self.exit.clone(),
        );
        v.setup_real_mode(0, CODE as u16).unwrap();
        prepare(&v);
        vcpu::install_kick_handler().unwrap();
        std::thread::spawn(move || v.run())
    }

    /// Waits for `cond`, then stops the vCPU (kicking it out of KVM_RUN) and
    /// returns whether `cond` came true before the timeout.
    fn wait_and_stop(&self, vcpu: JoinHandle<ExitReason>, cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        let mut ok = false;
        while Instant::now() < deadline {
            if cond() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.exit.request(ExitReason::Stopped);
        let tid = std::os::unix::thread::JoinHandleExt::as_pthread_t(&vcpu);
        let deadline = Instant::now() + TIMEOUT;
        while !vcpu.is_finished() {
            assert!(Instant::now() < deadline, "vCPU thread does not stop");
            // SAFETY: the thread is alive (not finished) and owned by this test.
            unsafe { libc::pthread_kill(tid, vcpu::kick_signal()) };
            std::thread::sleep(Duration::from_millis(5));
        }
        vcpu.join().unwrap();
        ok
    }

    fn done_value(&self) -> Option<u8> {
        self.done.lock().unwrap().first().map(|(_, d, _)| d[0])
    }
}

#[test]
fn port_and_mmio_exits_reach_the_right_device() {
    require_kvm!("port_and_mmio_exits_reach_the_right_device");
    let mut rig = Rig::new();
    let (port_dev, port_log) = recorder(0x99, None);
    rig.pio.insert(TEST_PORT, 1, port_dev).unwrap();
    let (mmio_dev, mmio_log) = recorder(0x55, None);
    rig.mmio.insert(MMIO_DEV, 0x1000, mmio_dev).unwrap();
    #[rustfmt::skip]
    let code = [
        0xba, 0x00, 0x05,       // mov dx, 0x500
        0xb0, 0x42,             // mov al, 0x42
        0xee,                   // out dx, al        -> port device gets 0x42
        0xec,                   // in al, dx         -> 0x99
        0xbb, 0x00, 0xb8,       // mov bx, 0xb800
        0x8e, 0xc3,             // mov es, bx
        0x26, 0xa2, 0x10, 0x00, // mov [es:0x10], al -> MMIO write of 0x99 at +0x10
        0x26, 0xa0, 0x20, 0x00, // mov al, [es:0x20] -> MMIO read at +0x20: 0x55
        0xba, 0x01, 0x05,       // mov dx, 0x501
        0xee,                   // out dx, al        -> done with 0x55
        0xf4,                   // hlt
    ];
    let t = rig.start(&code, |_| {});
    assert!(
        rig.wait_and_stop(t, || rig.done_value().is_some()),
        "guest never reached the done port"
    );
    assert_eq!(
        rig.done_value(),
        Some(0x55),
        "MMIO read answered by the device"
    );
    assert_eq!(
        *port_log.lock().unwrap(),
        vec![(0, vec![0x42], true), (0, vec![0x99], false)]
    );
    assert_eq!(
        *mmio_log.lock().unwrap(),
        vec![(0x10, vec![0x99], true), (0x20, vec![0x55], false)]
    );
}

#[test]
fn ioeventfd_signals_the_backend_without_an_exit_to_the_vmm() {
    require_kvm!("ioeventfd_signals_the_backend_without_an_exit_to_the_vmm");
    let mut rig = Rig::new();
    let (port_dev, port_log) = recorder(0, None);
    rig.pio.insert(IOEVENT_PORT, 1, port_dev).unwrap();
    let (mmio_dev, mmio_log) = recorder(0, None);
    rig.mmio.insert(MMIO_DEV, 0x1000, mmio_dev).unwrap();
    let events = rig.vm.events();
    let pio_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let mmio_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    events
        .register_ioevent(&pio_kick, IoAddr::Pio(IOEVENT_PORT), None)
        .unwrap();
    events
        .register_ioevent(&mmio_kick, IoAddr::Mmio(MMIO_DEV + 0x50), None)
        .unwrap();
    #[rustfmt::skip]
    let code = [
        0xba, 0x00, 0x06,       // mov dx, 0x600
        0xb0, 0x01,             // mov al, 1
        0xee,                   // out dx, al        -> ioeventfd
        0xee,                   // out dx, al        -> ioeventfd again
        0xbb, 0x00, 0xb8,       // mov bx, 0xb800
        0x8e, 0xc3,             // mov es, bx
        0x26, 0xa2, 0x50, 0x00, // mov [es:0x50], al -> MMIO ioeventfd
        0x26, 0xa2, 0x54, 0x00, // mov [es:0x54], al -> ordinary MMIO exit
        0xba, 0x01, 0x05,       // mov dx, 0x501
        0xee,                   // out dx, al        -> done
        0xf4,                   // hlt
    ];
    let t = rig.start(&code, |_| {});
    assert!(rig.wait_and_stop(t, || rig.done_value().is_some()));
    assert_eq!(pio_kick.read().unwrap(), 2, "both port writes signalled");
    assert_eq!(mmio_kick.read().unwrap(), 1, "the MMIO write signalled");
    assert!(port_log.lock().unwrap().is_empty(), "no exit for the port");
    assert_eq!(
        *mmio_log.lock().unwrap(),
        vec![(0x54, vec![1], true)],
        "only the unregistered address exited"
    );
    events
        .unregister_ioevent(&pio_kick, IoAddr::Pio(IOEVENT_PORT), None)
        .unwrap();
}

/// Halts with IF=1; the handler for `vector` writes 0x77 to IRQ_PORT.
fn interrupt_guest(rig: &Rig, vector: u8, prologue: &[u8], eoi: &[u8]) -> Vec<u8> {
    let ivt = u64::from(vector) * 4;
    rig.ram.write(ivt, &(HANDLER as u16).to_le_bytes()).unwrap();
    rig.ram.write(ivt + 2, &0u16.to_le_bytes()).unwrap();
    let mut handler = vec![
        0xba, 0x02, 0x05, // mov dx, 0x502
        0xb0, 0x77, // mov al, 0x77
        0xee, // out dx, al
    ];
    handler.extend_from_slice(eoi);
    handler.extend_from_slice(&[0xcf]); // iret
    rig.ram.write(HANDLER, &handler).unwrap();
    let mut code = prologue.to_vec();
    code.extend_from_slice(&[
        0xfb, // sti
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ]);
    code
}

fn irq_seen(log: &Log) -> bool {
    log.lock()
        .unwrap()
        .iter()
        .any(|(_, d, w)| *w && d == &[0x77])
}

#[test]
fn irqfd_on_an_msi_route_interrupts_a_halted_guest() {
    require_kvm!("irqfd_on_an_msi_route_interrupts_a_halted_guest");
    let mut rig = Rig::new();
    let (irq_dev, irq_log) = recorder(0, None);
    rig.pio.insert(IRQ_PORT, 1, irq_dev).unwrap();
    let events = rig.vm.events();
    let gsi = bulkhead_vmm::kvm::FIRST_MSI_GSI + 3;
    // The message Linux writes into an MSI-X entry: LAPIC 0, fixed, vector 0x30.
    events
        .set_msi_route(
            gsi,
            Some(MsiMessage {
                addr: 0xfee0_0000,
                data: 0x30,
            }),
        )
        .unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    events.register_irqfd(&call, gsi).unwrap();
    // The LAPIC must be software-enabled to take fixed interrupts; EOI at 0xb0.
    let code = interrupt_guest(&rig, 0x30, &[], &[]);
    let t = rig.start(&code, |v| {
        let mut lapic = v.fd().get_lapic().unwrap();
        for (i, b) in 0x1ffu32.to_le_bytes().iter().enumerate() {
            lapic.regs[0xf0 + i] = *b as i8;
        }
        v.fd().set_lapic(&lapic).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(!irq_seen(&irq_log), "no interrupt before the irqfd fires");
    call.write(1).unwrap();
    assert!(
        rig.wait_and_stop(t, || irq_seen(&irq_log)),
        "MSI through the irqfd never reached the guest"
    );
}

#[test]
fn irqfd_on_a_pic_line_interrupts_a_halted_guest() {
    require_kvm!("irqfd_on_a_pic_line_interrupts_a_halted_guest");
    let mut rig = Rig::new();
    let (irq_dev, irq_log) = recorder(0, None);
    rig.pio.insert(IRQ_PORT, 1, irq_dev).unwrap();
    let events = rig.vm.events();
    let gsi = 5;
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    events.register_irqfd(&call, gsi).unwrap();
    #[rustfmt::skip]
    let init_pic = [
        0xb0, 0x11, 0xe6, 0x20, // ICW1: edge, cascade, ICW4
        0xb0, 0x20, 0xe6, 0x21, // ICW2: vectors 0x20..0x27
        0xb0, 0x04, 0xe6, 0x21, // ICW3: slave on IRQ2
        0xb0, 0x01, 0xe6, 0x21, // ICW4: 8086 mode
        0xb0, 0xdf, 0xe6, 0x21, // OCW1: only IRQ5 unmasked
    ];
    let eoi = [0xb0, 0x20, 0xe6, 0x20]; // non-specific EOI
    let code = interrupt_guest(&rig, 0x25, &init_pic, &eoi);
    let t = rig.start(&code, |v| v.setup_lapic().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!irq_seen(&irq_log), "no interrupt before the irqfd fires");
    call.write(1).unwrap();
    assert!(
        rig.wait_and_stop(t, || irq_seen(&irq_log)),
        "GSI 5 through the irqfd never reached the guest"
    );
}
