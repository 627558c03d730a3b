//! The KVM VM: in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, guest RAM
//! slots, GSI routing, and the [`VmEvents`] implementation transports use
//! (ioeventfds, irqfds, MSI routes).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY, KvmIrqRouting,
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
use crate::vm_events::{IoAddr, MsiMessage, VmEvents};

/// Where KVM puts its TSS (3 pages just below the BIOS area at the top of 4 GiB).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// Where KVM puts its identity-map page (for real-mode emulation on VMX).
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// GSIs the in-kernel IOAPIC has pins for.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI free for MSI routes.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// KVM's irqchip numbers.
const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;

/// Errors while building the VM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error("Cannot open /dev/kvm (is the user in the kvm group?)")]
    Open(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed; the string names it.
    #[error("KVM {0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, KvmError> {
    r.map_err(|e| KvmError::Ioctl(what, e))
}

/// A KVM virtual machine.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    events: Arc<KvmVmEvents>,
}

impl Vm {
    /// Opens /dev/kvm and creates an empty VM (no irqchip yet).
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let fd = Arc::new(ioctl("CREATE_VM", kvm.create_vm())?);
        let events = Arc::new(KvmVmEvents {
            vm: fd.clone(),
            msi: Mutex::new(BTreeMap::new()),
        });
        Ok(Vm { kvm, fd, events })
    }

    /// Sets up the x86 platform: TSS, identity map, in-kernel irqchip and PIT.
    pub fn setup_platform(&self) -> Result<(), KvmError> {
        ioctl("SET_TSS_ADDR", self.fd.set_tss_address(TSS_ADDRESS))?;
        ioctl(
            "SET_IDENTITY_MAP_ADDR",
            self.fd.set_identity_map_address(IDENTITY_MAP_ADDRESS),
        )?;
        ioctl("CREATE_IRQCHIP", self.fd.create_irq_chip())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        ioctl("CREATE_PIT2", self.fd.create_pit2(pit))?;
        Ok(())
    }

    /// Maps every RAM region into the guest.
    pub fn map_ram(&self, ram: &GuestRam) -> Result<(), KvmError> {
        for (slot, (region, host)) in ram.host_regions().into_iter().enumerate() {
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.guest_addr,
                memory_size: region.size,
                userspace_addr: host,
            };
            // SAFETY: the mapping lives in `ram`, which the caller keeps alive for
            // as long as the VM (the VMM holds both until exit).
            ioctl("SET_USER_MEMORY_REGION", unsafe {
                self.fd.set_user_memory_region(mr)
            })?;
        }
        Ok(())
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd, KvmError> {
        ioctl("CREATE_VCPU", self.fd.create_vcpu(id))
    }

    /// The KVM system handle (CPUID and MSR lists).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The eventfd plumbing for transports.
    pub fn events(&self) -> Arc<KvmVmEvents> {
        self.events.clone()
    }
}

/// [`VmEvents`] on a KVM VM.
pub struct KvmVmEvents {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl KvmVmEvents {
    /// Installs the whole routing table: the default PIC/IOAPIC routes for
    /// GSIs 0..24 (KVM replaces the table on each call) plus every MSI route.
    fn apply(&self, msi: &BTreeMap<u32, MsiMessage>) -> io::Result<()> {
        let mut entries = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            if gsi < 16 && gsi != 2 {
                let (chip, pin) = if gsi < 8 {
                    (IRQCHIP_PIC_MASTER, gsi)
                } else {
                    (IRQCHIP_PIC_SLAVE, gsi - 8)
                };
                entries.push(irqchip_entry(gsi, chip, pin));
            }
            entries.push(irqchip_entry(gsi, IRQCHIP_IOAPIC, gsi));
        }
        for (gsi, m) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.addr as u32;
            e.u.msi.address_hi = (m.addr >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(io::Error::from)
    }
}

fn kvm_addr(addr: IoAddr) -> IoEventAddress {
    match addr {
        IoAddr::Pio(p) => IoEventAddress::Pio(p),
        IoAddr::Mmio(m) => IoEventAddress::Mmio(m),
    }
}

impl VmEvents for KvmVmEvents {
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoAddr,
        datamatch: Option<u32>,
    ) -> io::Result<()> {
        let a = kvm_addr(addr);
        match datamatch {
            Some(d) => self.vm.register_ioevent(fd, &a, d),
            None => self.vm.register_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(io::Error::from)
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoAddr,
        datamatch: Option<u32>,
    ) -> io::Result<()> {
        let a = kvm_addr(addr);
        match datamatch {
            Some(d) => self.vm.unregister_ioevent(fd, &a, d),
            None => self.vm.unregister_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(io::Error::from)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.register_irqfd(fd, gsi).map_err(io::Error::from)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(io::Error::from)
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        if gsi < FIRST_MSI_GSI {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut map = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match msg {
            Some(m) => map.insert(gsi, m) != Some(m),
            None => map.remove(&gsi).is_some(),
        };
        if changed {
            self.apply(&map)?;
        }
        Ok(())
    }
}
