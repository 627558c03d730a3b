//! Can KVM here run a Linux guest? Two tiny 64-bit guests answer it: one
//! must reach a port write, the other must get through `LOCK CMPXCHG16B`
//! (which Linux's SLUB needs and a nested software hypervisor on the build
//! machines fails). Used by `bulkhead-vmm probe`, the boot test and the
//! launcher's automatic frontend choice.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::{Bus, BusDevice};
use crate::kvm::Vm;
use crate::memory::GuestRam;
use crate::vcpu::{self, ExitReason, ExitRequest, Vcpu};

/// How long each probe guest may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

struct Done(Arc<ExitRequest>);

impl BusDevice for Done {
    fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: u64, _: &[u8]) {
        self.0.request(ExitReason::PowerOff);
    }
}

/// Runs 64-bit `code` at 0x1000 (first GiB identity-mapped); `Ok(true)` when
/// it wrote to port 0x501 within the timeout.
fn run_long_mode(code: &[u8]) -> Result<bool, String> {
    let vm = Vm::new().map_err(|e| e.to_string())?;
    vm.setup_platform().map_err(|e| e.to_string())?;
    let ram = GuestRam::new(16 << 20).map_err(|e| e.to_string())?;
    vm.map_ram(&ram).map_err(|e| e.to_string())?;
    ram.write(0x1000, code).map_err(|e| e.to_string())?;
    let exit = ExitRequest::new().map_err(|e| e.to_string())?;
    let mut pio = Bus::new();
    pio.insert(0x501, 1, Arc::new(Mutex::new(Done(exit.clone()))))
        .map_err(|e| e.to_string())?;
    let fd = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let mut v = Vcpu::new(fd, 0, Arc::new(pio), Arc::new(Bus::new()), exit.clone());
    v.setup_cpuid(vm.kvm(), 1).map_err(|e| e.to_string())?;
    v.setup_long_mode(&ram, 0x1000, 0, 0x8ff0)
        .map_err(|e| e.to_string())?;
    vcpu::install_kick_handler().map_err(|e| e.to_string())?;
    let t = std::thread::spawn(move || v.run());
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while !exit.stopping() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let reached = exit.reason() == ExitReason::PowerOff;
    exit.request(ExitReason::Stopped);
    let tid = std::os::unix::thread::JoinHandleExt::as_pthread_t(&t);
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while !t.is_finished() && Instant::now() < deadline {
        // SAFETY: the thread is alive and owned by this test.
        unsafe { libc::pthread_kill(tid, vcpu::kick_signal()) };
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(reached)
}

/// `None` when KVM here runs a 64-bit guest, including the instructions
/// Linux needs that a nested software hypervisor was seen to fail
/// (CMPXCHG16B, used by SLUB); otherwise why not.
pub fn probe_long_mode() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    #[rustfmt::skip]
    let port_write = [
        0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
        0xee,                   // out dx, al
        0xf4,                   // hlt
    ];
    #[rustfmt::skip]
    let cmpxchg16b = [
        0xbd, 0x00, 0x20, 0x00, 0x00,       // mov ebp, 0x2000
        0x31, 0xc0, 0x31, 0xd2,             // xor eax, eax; xor edx, edx
        0x31, 0xdb, 0x31, 0xc9,             // xor ebx, ebx; xor ecx, ecx
        0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x00, // lock cmpxchg16b [rbp]
        0x66, 0xba, 0x01, 0x05,             // mov dx, 0x501
        0xee,                               // out dx, al
        0xf4,                               // hlt
    ];
    let checks: [(&[u8], &str); 2] = [
        (&port_write, "a long-mode port write"),
        (
            &cmpxchg16b,
            "a long-mode LOCK CMPXCHG16B (Linux's SLUB needs it)",
        ),
    ];
    for (code, what) in checks {
        match run_long_mode(code) {
            Ok(true) => {}
            Ok(false) => {
                return Some(format!(
                    "KVM here cannot run a Linux guest: {what} did not complete (vCPU error, or \
                     no port write within {PROBE_TIMEOUT:?}; nested software hypervisor)"
                ));
            }
            Err(e) => return Some(format!("KVM probe failed: {e}")),
        }
    }
    None
}
