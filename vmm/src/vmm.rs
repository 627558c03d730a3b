//! Putting the VM together: guest RAM, KVM, legacy devices, transports in
//! front of vhost-user backends, the kernel, the vCPU threads; then waiting
//! for the guest (or the API) to end the VM.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::{self, BootConfig, BootEntry};
use crate::bus::Bus;
use crate::config::{DeviceConfig, SerialMode, Transport};
use crate::i8042::{I8042, I8042_PORT, I8042_PORTS};
use crate::kvm::{FIRST_MSI_GSI, Vm};
use crate::memory::GuestRam;
use crate::pci::{self, PciRoot};
use bulkhead_common::event::{EventLoop, Interest};
use bulkhead_common::sandbox::PathAccess;

use crate::seccomp::{self, SeccompMode, Thread};
use crate::serial::{COM1_GSI, COM1_PORT, COM1_PORTS, SerialPort};
use crate::transport::VirtioState;
use crate::transport::mmio::{MMIO_WINDOW, VirtioMmioDevice};
use crate::transport::pci::{BAR_SIZE, VirtioPciDevice};
use crate::vcpu::{self, ExitReason, ExitRequest, Vcpu};
use crate::vhost_user::{VhostUserDevice, VhostUserOptions};
use crate::vm_events::VmEvents;

/// Base of the virtio-mmio device windows.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// ISA IRQs free for virtio-mmio devices (the MP table describes 0..16;
/// 9 is the ACPI SCI).
pub const VIRTIO_MMIO_GSIS: [u32; 7] = [5, 6, 7, 10, 11, 12, 15];
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Everything needed to build the VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u8,
    /// vhost-user devices in command-line order.
    pub devices: Vec<DeviceConfig>,
    /// Serial console.
    pub serial: SerialMode,
    /// Control socket.
    pub api_socket: Option<PathBuf>,
    /// Confinement (`--sandbox`): the seccomp filters' mode; Landlock is on
    /// unless it is [`SeccompMode::Off`].
    pub seccomp: SeccompMode,
    /// Hide CMPXCHG16B from the guest (workaround for nested hypervisors).
    pub hide_cx16: bool,
}

/// Errors while building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Guest RAM.
    #[error("Guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    /// KVM.
    #[error("KVM")]
    Kvm(#[from] crate::kvm::KvmError),
    /// vCPU setup.
    #[error("vCPU setup")]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// A backend could not be reached or negotiated with.
    #[error("vhost-user device")]
    Connect(#[from] crate::vhost_user::ConnectError),
    /// Kernel loading.
    #[error("Boot")]
    Boot(#[from] crate::boot::BootError),
    /// Seccomp.
    #[error("Seccomp")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Landlock refused the VMM's ruleset.
    #[error("Landlock")]
    Landlock(#[source] bulkhead_common::sandbox::SandboxError),
    /// Too many devices for the address space or IRQs.
    #[error("Too many devices: {0}")]
    TooManyDevices(&'static str),
    /// An OS call failed; the string says which.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// The bus refused a device range.
    #[error("Device layout")]
    Bus(#[from] crate::bus::BusError),
    /// Two devices have the same id.
    #[error("Device id '{0}' is used twice")]
    DuplicateId(String),
    /// The number of vCPUs is out of range.
    #[error("--cpus must be 1 to {0}")]
    Cpus(u8),
}

/// Builds the VM described by `cfg`, runs it, and returns why it ended.
pub fn run(cfg: &VmConfig) -> Result<ExitReason, VmmError> {
    if cfg.cpus == 0 || cfg.cpus > boot::mptable::MAX_CPUS {
        return Err(VmmError::Cpus(boot::mptable::MAX_CPUS));
    }
    let ram = Arc::new(GuestRam::new(cfg.memory)?);
    let vm = Vm::new()?;
    vm.setup_platform()?;
    vm.map_ram(&ram)?;
    let events: Arc<dyn VmEvents> = vm.events();
    let exit = ExitRequest::new().map_err(|e| VmmError::Io("eventfd", e))?;

    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    // Serial.
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Io("eventfd", e))?;
    events
        .register_irqfd(&serial_irq, COM1_GSI)
        .map_err(|e| VmmError::Io("serial irqfd", e))?;
    let out = match &cfg.serial {
        SerialMode::Stdio => crate::serial::sink_for(None, true),
        SerialMode::File(p) => crate::serial::sink_for(Some(p), false),
        SerialMode::None => crate::serial::sink_for(None, false),
    }
    .map_err(|e| VmmError::Io("cannot open the serial output", e))?;
    let serial = Arc::new(Mutex::new(SerialPort::new(serial_irq, out)));
    pio.insert(COM1_PORT, COM1_PORTS, serial.clone())?;
    pio.insert(
        crate::pm::PM_PORT,
        crate::pm::PM_PORTS,
        Arc::new(Mutex::new(crate::pm::PmDevice::new(exit.clone()))),
    )?;
    pio.insert(
        I8042_PORT,
        I8042_PORTS,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;

    // virtio devices.
    let mut root = PciRoot::new();
    let mut next_gsi = FIRST_MSI_GSI;
    let mut mmio_count = 0usize;
    let mut handles = Vec::new();
    let mut mmio_devices = Vec::new();
    let mut per_type: std::collections::BTreeMap<&'static str, usize> = Default::default();
    for d in &cfg.devices {
        let kind = crate::api::type_name(d.virtio_id);
        let n = per_type.entry(kind).or_default();
        let id = d.id.clone().unwrap_or_else(|| format!("{kind}{n}"));
        *n += 1;
        if handles
            .iter()
            .any(|h: &Arc<crate::vhost_user::BackendHandle>| h.id() == id)
        {
            return Err(VmmError::DuplicateId(id));
        }
        let opts = VhostUserOptions {
            socket: d.socket.clone(),
            virtio_id: d.virtio_id,
            queues: d.queues,
            queue_size: d.queue_size,
            config_size: d.config_size,
            packed: d.packed,
        };
        let dev = VhostUserDevice::connect_named(&id, &opts, ram.clone())?;
        handles.push(dev.handle());
        let state = VirtioState::new(Box::new(dev)).map_err(|e| VmmError::Io("eventfd", e))?;
        match d.transport {
            Transport::Pci => {
                let bar = root
                    .allocate_bar(BAR_SIZE)
                    .ok_or(VmmError::TooManyDevices("PCI MMIO window full"))?;
                let vectors = state.num_queues() as u32 + 1;
                let f = VirtioPciDevice::new(state, events.clone(), bar, next_gsi)
                    .map_err(|e| VmmError::Io("virtio-pci", e))?;
                next_gsi += vectors;
                root.add(Arc::new(Mutex::new(f)))
                    .map_err(|_| VmmError::TooManyDevices("no free PCI slot"))?;
            }
            Transport::Mmio => {
                let gsi = *VIRTIO_MMIO_GSIS
                    .get(mmio_count)
                    .ok_or(VmmError::TooManyDevices("no free IRQ for virtio-mmio"))?;
                let base = VIRTIO_MMIO_BASE + mmio_count as u64 * MMIO_WINDOW;
                mmio_count += 1;
                let dev = VirtioMmioDevice::new(state, events.clone(), base, gsi);
                mmio.insert(base, MMIO_WINDOW, Arc::new(Mutex::new(dev)))?;
                mmio_devices.push(boot::acpi::MmioDevice {
                    base,
                    len: MMIO_WINDOW,
                    irq: gsi,
                });
                log::info!("virtio-mmio device at {base:#x}, IRQ {gsi} (announced in the DSDT)");
            }
        }
    }
    let root = Arc::new(Mutex::new(root));
    pio.insert(
        pci::CONFIG_ADDRESS_PORT,
        pci::CONFIG_PORTS_LEN,
        root.clone(),
    )?;
    mmio.insert(pci::MMIO_WINDOW_START, pci::MMIO_WINDOW_SIZE, root)?;

    // Kernel.
    let entry = boot::load(
        &ram,
        &BootConfig {
            kernel: &cfg.kernel,
            initrd: cfg.initrd.as_deref(),
            cmdline: &cfg.cmdline,
            cpus: cfg.cpus,
            virtio_mmio: &mmio_devices,
        },
    )?;
    log::info!("boot entry: {entry:?}");

    // vCPUs.
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    vcpu::install_kick_handler().map_err(|e| VmmError::Io("signal handler", e))?;
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        let fd = vm.create_vcpu(u64::from(id))?;
        let mut v = Vcpu::new(fd, id, pio.clone(), mmio.clone(), exit.clone());
        v.set_hide_cx16(cfg.hide_cx16);
        v.setup_cpuid(vm.kvm(), cfg.cpus)?;
        v.setup_msrs()?;
        v.setup_fpu()?;
        v.setup_lapic()?;
        if id == 0 {
            match entry {
                BootEntry::Pvh { entry, start_info } => v.setup_pvh(&ram, entry, start_info)?,
                BootEntry::Linux64 { entry, boot_params } => {
                    v.setup_long_mode(&ram, entry, boot_params, boot::BOOT_STACK)?
                }
            }
        }
        vcpus.push(v);
    }
    // Compile filters before any thread starts, so a bad filter fails early.
    seccomp::filter(Thread::Vcpu, cfg.seccomp)?;
    // Every file is open now (RAM, /dev/kvm, kernel, initrd, serial) and
    // every backend connected: Landlock before the first thread, so every
    // thread inherits it.
    if cfg.seccomp != SeccompMode::Off {
        let what = bulkhead_common::sandbox::landlock::restrict(&landlock_paths(cfg), false)
            .map_err(VmmError::Landlock)?;
        log::info!("Landlock {what}");
    }
    for h in &handles {
        h.start_monitor(cfg.seccomp)
            .map_err(|e| VmmError::Io("cannot start a backend monitor thread", e))?;
    }
    if let Some(path) = &cfg.api_socket {
        crate::api::start(path, exit.clone(), cfg.seccomp, handles.clone())
            .map_err(|e| VmmError::Io("cannot start the API socket", e))?;
    }
    let mode = cfg.seccomp;
    let mut threads = Vec::new();
    for mut v in vcpus {
        let exit = exit.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{}", v.id()))
            .spawn(move || {
                if let Err(e) = seccomp::apply(Thread::Vcpu, mode) {
                    log::error!("vCPU seccomp: {e}");
                    exit.request(ExitReason::Error);
                    return ExitReason::Error;
                }
                v.run()
            })
            .map_err(|e| VmmError::Io("cannot start a vCPU thread", e))?;
        threads.push(t);
    }
    if cfg.serial == SerialMode::Stdio {
        spawn_stdin(serial, cfg.seccomp);
    }
    let exit_loop = EventLoop::new()
        .and_then(|l| {
            l.add(exit.eventfd(), Interest::READ, MainToken::Exit)
                .map(|()| l)
        })
        .map_err(|e| VmmError::Io("cannot watch the exit request", e))?;
    seccomp::apply(Thread::Main, cfg.seccomp)?;
    wait(&exit, &exit_loop);
    let reason = exit.reason();
    // Kick vCPUs out of KVM_RUN so they see the stop; the process exits next
    // either way, and with it any thread still inside the kernel.
    for t in &threads {
        if !t.is_finished() {
            let tid = std::os::unix::thread::JoinHandleExt::as_pthread_t(t);
            // SAFETY: the thread is alive and belongs to this process.
            unsafe { libc::pthread_kill(tid, vcpu::kick_signal()) };
        }
    }
    if let Some(path) = &cfg.api_socket {
        let _ = std::fs::remove_file(path);
    }
    // Keep RAM and the VM alive until here (KVM and backends map them).
    drop(vm);
    drop(ram);
    Ok(reason)
}

/// What the VMM still reaches by path once it runs: the directory of its
/// control socket (bound by the API thread, removed at exit). Backend
/// sockets are reached with `connect`, which Landlock does not restrict.
pub fn landlock_paths(cfg: &VmConfig) -> Vec<PathAccess> {
    let dir = |p: &std::path::Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    cfg.api_socket
        .iter()
        .map(|p| PathAccess::Directory(dir(p)))
        .collect()
}

/// What the main thread waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MainToken {
    /// The exit request's eventfd.
    Exit,
}
bulkhead_common::event_token!(MainToken { Exit });

/// Waits until the exit request fires. `exit_loop` watches its eventfd; the
/// one-second timeout is a backstop, never the way a stop is seen.
fn wait(exit: &ExitRequest, exit_loop: &EventLoop<MainToken>) {
    while !exit.stopping() {
        if let Err(e) = exit_loop.wait(Some(Duration::from_secs(1))) {
            log::error!("waiting for the exit request: {e}");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Forwards stdin to the UART (console input); ends quietly at EOF.
fn spawn_stdin(serial: Arc<Mutex<SerialPort>>, mode: SeccompMode) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::Read;
            if let Err(e) = seccomp::apply(Thread::Main, mode) {
                log::error!("stdin thread: {e}");
                return;
            }
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
                serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .input(&buf[..n]);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_tests::skip::{SkipReason, skip_if};

    fn cfg(api_socket: Option<&str>) -> VmConfig {
        VmConfig {
            kernel: "/vmlinux".into(),
            initrd: None,
            cmdline: String::new(),
            memory: 1 << 20,
            cpus: 1,
            devices: Vec::new(),
            serial: SerialMode::None,
            api_socket: api_socket.map(PathBuf::from),
            seccomp: SeccompMode::Kill,
            hide_cx16: false,
        }
    }

    #[test]
    fn the_vmm_keeps_only_its_control_sockets_directory() {
        assert!(landlock_paths(&cfg(None)).is_empty());
        let p = landlock_paths(&cfg(Some("/run/vm/api.sock")));
        assert!(
            matches!(&p[..], [PathAccess::Directory(d)] if d == std::path::Path::new("/run/vm"))
        );
        let p = landlock_paths(&cfg(Some("api.sock")));
        assert!(matches!(&p[..], [PathAccess::Directory(d)] if d == std::path::Path::new(".")));
    }

    #[test]
    fn under_its_ruleset_the_vmm_cannot_open_the_kernel_again_but_reaches_backends() {
        let tmp = |what: &str| {
            std::env::temp_dir().join(format!("bulkhead-vmm-{what}-{}", std::process::id()))
        };
        let (dir, kernel, backend) = (tmp("ll"), tmp("kernel"), tmp("backend"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&kernel, b"k").unwrap();
        let _ = std::fs::remove_file(&backend);
        // A backend's socket outside: reconnections and swaps must still reach it.
        let listener = std::os::unix::net::UnixListener::bind(&backend).unwrap();
        let c = cfg(Some(dir.join("api.sock").to_str().unwrap()));
        let (k, be) = (kernel.clone(), backend.clone());
        let (status, kernel_read, bound, connected) = std::thread::spawn(move || {
            let status =
                bulkhead_common::sandbox::landlock::restrict(&landlock_paths(&c), false).unwrap();
            let bound = std::os::unix::net::UnixListener::bind(c.api_socket.as_ref().unwrap());
            let connected = std::os::unix::net::UnixStream::connect(&be);
            let read = std::fs::read(&k).map_err(|e| e.kind());
            (status, read, bound.map(|_| ()), connected.map(|_| ()))
        })
        .join()
        .unwrap();
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&kernel).unwrap();
        std::fs::remove_file(&backend).unwrap();
        if skip_if(
            "under_its_ruleset_the_vmm_cannot_open_the_kernel_again_but_reaches_backends",
            (status == "not enforced").then(|| SkipReason::Unsupported("Landlock".into())),
        ) {
            return;
        }
        assert_eq!(kernel_read, Err(std::io::ErrorKind::PermissionDenied));
        bound.unwrap();
        connected.unwrap();
    }
}
