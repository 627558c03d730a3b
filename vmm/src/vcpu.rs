//! vCPUs: initial CPU state for each boot protocol (real mode for small test
//! guests, 32-bit flat protected mode for PVH, 64-bit long mode for a bzImage)
//! with CPUID, MSRs, FPU and LAPIC set up as Linux expects; and the run loop
//! that sends port and MMIO exits to the buses.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::memory::GuestRam;

/// Guest address of the GDT the VMM writes for protected and long mode.
pub const GDT_ADDR: u64 = 0x500;
/// Guest address of the long-mode PML4 (then PDPT and PD follow, a page each).
pub const PML4_ADDR: u64 = 0x9000;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Why the guest or the VMM stopped the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitReason {
    /// Still running.
    None = 0,
    /// The guest powered off.
    PowerOff = 1,
    /// The guest asked for a reboot (keyboard controller reset or triple fault).
    Reboot = 2,
    /// A vCPU failed (KVM error, internal error, failed entry).
    Error = 3,
    /// The VMM was asked to stop (signal, test timeout).
    Stopped = 4,
}

impl ExitReason {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ExitReason::PowerOff,
            2 => ExitReason::Reboot,
            3 => ExitReason::Error,
            4 => ExitReason::Stopped,
            _ => ExitReason::None,
        }
    }
}

/// The VM-wide stop request: the first reason wins; the eventfd wakes the main thread.
pub struct ExitRequest {
    reason: AtomicU8,
    stop: AtomicBool,
    evt: EventFd,
}

impl ExitRequest {
    /// A request that has not fired.
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(ExitRequest {
            reason: AtomicU8::new(0),
            stop: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// Asks every vCPU to stop for `reason` (ignored if a reason is already set).
    pub fn request(&self, reason: ExitReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// The reason, once requested.
    pub fn reason(&self) -> ExitReason {
        ExitReason::from_u8(self.reason.load(Ordering::SeqCst))
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Readable once a stop is requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for [`kick_signal`] (once per process), so
/// the signal interrupts KVM_RUN instead of killing the process.
pub fn install_kick_handler() -> io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// One vCPU and the buses its exits go to.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitRequest>,
    hide_cx16: bool,
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long && type_ & 0x8 != 0),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn gdt_entry(seg: &kvm_segment) -> u64 {
    let base = seg.base;
    let limit = u64::from(if seg.g != 0 {
        seg.limit >> 12
    } else {
        seg.limit
    });
    let access = u64::from(seg.type_)
        | (u64::from(seg.s) << 4)
        | (u64::from(seg.dpl) << 5)
        | (u64::from(seg.present) << 7);
    let flags = (u64::from(seg.avl))
        | (u64::from(seg.l) << 1)
        | (u64::from(seg.db) << 2)
        | (u64::from(seg.g) << 3);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// Errors while configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed; the string names it.
    #[error("KVM {0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// Boot structures did not fit in guest RAM.
    #[error("Cannot write the vCPU boot structures into guest RAM")]
    Memory(#[source] crate::memory::MemoryError),
    /// A FAM wrapper (CPUID, MSR list) could not be built.
    #[error("Cannot build the {0} list")]
    Fam(&'static str),
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
    r.map_err(|e| VcpuError::Ioctl(what, e))
}

impl Vcpu {
    /// Its index (and APIC ID): thread names and logs say `vcpuN`.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Wraps vCPU `id` with the buses it dispatches to.
    pub fn new(fd: VcpuFd, id: u8, pio: Arc<Bus>, mmio: Arc<Bus>, exit: Arc<ExitRequest>) -> Self {
        Vcpu {
            fd,
            id,
            pio,
            mmio,
            exit,
            hide_cx16: false,
        }
    }

    /// Hides CMPXCHG16B from the guest's CPUID (some nested hypervisors fail
    /// to run it: Linux's SLUB then stops with a KVM internal error).
    pub fn set_hide_cx16(&mut self, hide: bool) {
        self.hide_cx16 = hide;
    }

    /// The KVM vCPU (for tests that set registers themselves).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets CPUID from what KVM supports, with this vCPU's APIC ID and the
    /// hypervisor bit.
    pub fn setup_cpuid(&self, kvm: &Kvm, cpus: u8) -> Result<(), VcpuError> {
        let mut cpuid: CpuId = ioctl(
            "GET_SUPPORTED_CPUID",
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x0000_ffff)
                        | (u32::from(self.id) << 24)
                        | (u32::from(cpus) << 16);
                    e.ecx |= 1 << 31; // running under a hypervisor
                    if self.hide_cx16 {
                        e.ecx &= !(1 << 13);
                    }
                    if cpus > 1 {
                        e.edx |= 1 << 28; // HTT: the count in EBX is valid
                    }
                }
                0xb => e.edx = u32::from(self.id),
                _ => {}
            }
        }
        ioctl("SET_CPUID2", self.fd.set_cpuid2(&cpuid))
    }

    /// Sets the MSRs Linux expects at boot (syscall MSRs zero, fast strings on).
    pub fn setup_msrs(&self) -> Result<(), VcpuError> {
        const MSRS: [(u32, u64); 9] = [
            (0x174, 0),       // IA32_SYSENTER_CS
            (0x175, 0),       // IA32_SYSENTER_ESP
            (0x176, 0),       // IA32_SYSENTER_EIP
            (0xc000_0081, 0), // STAR
            (0xc000_0082, 0), // LSTAR
            (0xc000_0083, 0), // CSTAR
            (0xc000_0084, 0), // SYSCALL_MASK
            (0xc000_0102, 0), // KERNEL_GS_BASE
            (0x1a0, 1),       // IA32_MISC_ENABLE: fast strings
        ];
        let entries: Vec<kvm_msr_entry> = MSRS
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Fam("MSR"))?;
        let n = ioctl("SET_MSRS", self.fd.set_msrs(&msrs))?;
        if n != entries.len() {
            log::warn!("vCPU {}: KVM took {n} of {} MSRs", self.id, entries.len());
        }
        Ok(())
    }

    /// Sets the FPU to its reset state (x87 control word, MXCSR).
    pub fn setup_fpu(&self) -> Result<(), VcpuError> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        ioctl("SET_FPU", self.fd.set_fpu(&fpu))
    }

    /// Programs LINT0 as ExtINT and LINT1 as NMI, as the BIOS would.
    pub fn setup_lapic(&self) -> Result<(), VcpuError> {
        const LVT_LINT0: usize = 0x350;
        const LVT_LINT1: usize = 0x360;
        let mut lapic = ioctl("GET_LAPIC", self.fd.get_lapic())?;
        let set = |regs: &mut [i8; 1024], off: usize, mode: u32| {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                regs[off + i] = *x as i8;
            }
        };
        set(&mut lapic.regs, LVT_LINT0, 7);
        set(&mut lapic.regs, LVT_LINT1, 4);
        ioctl("SET_LAPIC", self.fd.set_lapic(&lapic))
    }

    /// Real mode at `cs:ip` (cs base = cs * 16), for hand-assembled test guests.
    pub fn setup_real_mode(&self, cs: u16, ip: u16) -> Result<(), VcpuError> {
        let mut sregs = ioctl("GET_SREGS", self.fd.get_sregs())?;
        sregs.cs.selector = cs;
        sregs.cs.base = u64::from(cs) << 4;
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            s.selector = cs;
            s.base = u64::from(cs) << 4;
        }
        ioctl("SET_SREGS", self.fd.set_sregs(&sregs))?;
        let regs = kvm_regs {
            rip: u64::from(ip),
            rsp: 0xfff0,
            rflags: 2,
            ..Default::default()
        };
        ioctl("SET_REGS", self.fd.set_regs(&regs))
    }

    fn write_gdt(ram: &GuestRam, code: &kvm_segment, data: &kvm_segment) -> Result<(), VcpuError> {
        let gdt = [0u64, gdt_entry(code), gdt_entry(data)];
        let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
        ram.write(GDT_ADDR, &bytes).map_err(VcpuError::Memory)
    }

    /// 32-bit flat protected mode, paging off, `ebx` = `start_info`: the PVH
    /// boot protocol's entry state.
    pub fn setup_pvh(&self, ram: &GuestRam, entry: u64, start_info: u64) -> Result<(), VcpuError> {
        let code = segment(0x8, 0xb, false);
        let data = segment(0x10, 0x3, false);
        Self::write_gdt(ram, &code, &data)?;
        let mut sregs = ioctl("GET_SREGS", self.fd.get_sregs())?;
        sregs.cs = code;
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            *s = data;
        }
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        ioctl("SET_SREGS", self.fd.set_sregs(&sregs))?;
        let regs = kvm_regs {
            rip: entry,
            rbx: start_info,
            rflags: 2,
            ..Default::default()
        };
        ioctl("SET_REGS", self.fd.set_regs(&regs))
    }

    /// 64-bit long mode with the first GiB identity-mapped (2 MiB pages),
    /// `rsi` = `boot_params`: the Linux 64-bit boot protocol's entry state.
    pub fn setup_long_mode(
        &self,
        ram: &GuestRam,
        entry: u64,
        boot_params: u64,
        stack: u64,
    ) -> Result<(), VcpuError> {
        let code = segment(0x8, 0xb, true);
        let data = segment(0x10, 0x3, true);
        Self::write_gdt(ram, &code, &data)?;
        let pdpt = PML4_ADDR + 0x1000;
        let pd = PML4_ADDR + 0x2000;
        let mem = |a: u64, v: &[u8]| ram.write(a, v).map_err(VcpuError::Memory);
        mem(PML4_ADDR, &(pdpt | 0x3).to_le_bytes())?;
        mem(pdpt, &(pd | 0x3).to_le_bytes())?;
        let pde: Vec<u8> = (0..512u64)
            .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
            .collect();
        mem(pd, &pde)?;
        let mut sregs = ioctl("GET_SREGS", self.fd.get_sregs())?;
        sregs.cs = code;
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            *s = data;
        }
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = X86_CR4_PAE;
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.efer = EFER_LME | EFER_LMA;
        ioctl("SET_SREGS", self.fd.set_sregs(&sregs))?;
        let regs = kvm_regs {
            rip: entry,
            rsi: boot_params,
            rsp: stack,
            rbp: stack,
            rflags: 2,
            ..Default::default()
        };
        ioctl("SET_REGS", self.fd.set_regs(&regs))
    }

    /// Logs the registers that say where a failed or reset guest was, at
    /// `level` (an error for a failure; info for a triple fault, which
    /// a guest may cause on purpose to reboot).
    pub fn log_state(&self, level: log::Level) {
        if let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            log::log!(
                level,
                "vCPU {}: rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x} idt {:#x}+{:#x} gdt {:#x}+{:#x}",
                self.id,
                r.rip,
                r.rsp,
                r.rflags,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.idt.base,
                s.idt.limit,
                s.gdt.base,
                s.gdt.limit
            );
        }
    }

    /// Runs the vCPU until a stop is requested; returns why it stopped.
    pub fn run(&mut self) -> ExitReason {
        loop {
            if self.exit.stopping() {
                return self.exit.reason();
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => {
                    log::info!("vCPU {} halted", self.id);
                    self.exit.request(ExitReason::PowerOff);
                }
                Ok(VcpuExit::Shutdown) => {
                    log::info!("vCPU {}: triple fault (guest reset)", self.id);
                    self.log_state(log::Level::Info);
                    self.exit.request(ExitReason::Reboot);
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    log::info!("vCPU {}: system event {kind}", self.id);
                    let r = if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                        ExitReason::Reboot
                    } else {
                        ExitReason::PowerOff
                    };
                    self.exit.request(r);
                }
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    let what = format!("{other:?}");
                    let suberror = self.fd.get_kvm_run().exit_reason;
                    log::error!(
                        "vCPU {}: unhandled exit {what} (exit reason {suberror})",
                        self.id
                    );
                    self.log_state(log::Level::Error);
                    self.exit.request(ExitReason::Error);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    log::error!("vCPU {}: KVM_RUN failed: {e}", self.id);
                    self.exit.request(ExitReason::Error);
                }
            }
        }
    }
}
