//! How transports wire eventfds into the hypervisor: ioeventfds on notify
//! addresses (guest kick -> backend, no VM exit), irqfds on GSIs (backend
//! call -> guest interrupt) and MSI routes for GSIs.
//!
//! [`crate::kvm::KvmVmEvents`] is the real implementation. [`TestVmEvents`]
//! only records what was asked, so the transports run without KVM: a test
//! finds the eventfd registered for a notify address or GSI and uses it as the
//! hypervisor would.

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// A notify address a guest write to which signals an ioeventfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IoAddr {
    /// A port.
    Pio(u64),
    /// A guest-physical MMIO address.
    Mmio(u64),
}

/// An MSI message: where the guest asked the interrupt to be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

/// The hypervisor services a transport needs.
pub trait VmEvents: Send + Sync {
    /// Signals `fd` when the guest writes to `addr` (with value `datamatch`, if given).
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoAddr,
        datamatch: Option<u32>,
    ) -> io::Result<()>;
    /// Undoes [`VmEvents::register_ioevent`].
    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoAddr,
        datamatch: Option<u32>,
    ) -> io::Result<()>;
    /// Injects interrupt `gsi` whenever `fd` is signalled.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Undoes [`VmEvents::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Routes `gsi` to an MSI message, or removes its route with `None`
    /// (a masked vector: its interrupts are dropped, not delivered).
    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
}

/// A record-only [`VmEvents`] for tests without KVM.
#[derive(Default)]
pub struct TestVmEvents {
    ioevents: Mutex<BTreeMap<(IoAddr, Option<u32>), EventFd>>,
    irqfds: Mutex<BTreeMap<u32, Vec<EventFd>>>,
    routes: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl TestVmEvents {
    /// The eventfd registered at `addr` / `datamatch`, if any.
    pub fn ioevent(&self, addr: IoAddr, datamatch: Option<u32>) -> Option<EventFd> {
        let map = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(addr, datamatch))
            .and_then(|fd| fd.try_clone().ok())
    }

    /// Number of registered ioeventfds.
    pub fn ioevent_count(&self) -> usize {
        self.ioevents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The eventfds registered as irqfds on `gsi`.
    pub fn irqfds(&self, gsi: u32) -> Vec<EventFd> {
        let map = self.irqfds.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&gsi)
            .map(|v| v.iter().filter_map(|fd| fd.try_clone().ok()).collect())
            .unwrap_or_default()
    }

    /// GSIs that have at least one irqfd.
    pub fn irqfd_gsis(&self) -> Vec<u32> {
        let map = self.irqfds.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(g, _)| *g)
            .collect()
    }

    /// The MSI route of `gsi`, if one is set.
    pub fn msi_route(&self, gsi: u32) -> Option<MsiMessage> {
        let map = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&gsi).copied()
    }
}

fn same_fd(a: &EventFd, b: &EventFd) -> bool {
    use std::os::fd::AsRawFd;
    // Clones have different fd numbers; compare the underlying files instead.
    let stat = |fd: i32| {
        // SAFETY: fstat fills the struct we pass and touches nothing else.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: see above; fd is open for the lifetime of the EventFd.
        let rc = unsafe { libc::fstat(fd, &mut st) };
        (rc == 0).then_some((st.st_dev, st.st_ino))
    };
    matches!((stat(a.as_raw_fd()), stat(b.as_raw_fd())), (Some(x), Some(y)) if x == y)
}

impl VmEvents for TestVmEvents {
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoAddr,
        datamatch: Option<u32>,
    ) -> io::Result<()> {
        let mut map = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&(addr, datamatch)) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        map.insert((addr, datamatch), fd.try_clone()?);
        Ok(())
    }

    fn unregister_ioevent(
        &self,
        _fd: &EventFd,
        addr: IoAddr,
        datamatch: Option<u32>,
    ) -> io::Result<()> {
        let mut map = self.ioevents.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&(addr, datamatch))
            .map(|_| ())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        let mut map = self.irqfds.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(gsi).or_default().push(fd.try_clone()?);
        Ok(())
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        let mut map = self.irqfds.lock().unwrap_or_else(|e| e.into_inner());
        let list = map
            .get_mut(&gsi)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let before = list.len();
        list.retain(|f| !same_fd(f, fd));
        if list.len() == before {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(())
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut map = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        match msg {
            Some(m) => map.insert(gsi, m),
            None => map.remove(&gsi),
        };
        Ok(())
    }
}
