//! `bulkhead-vmm`: a thin KVM VMM whose every virtio device is a vhost-user
//! backend in its own process. The VMM owns guest RAM (a shared memfd), the
//! vCPUs, a serial port, and the virtio-pci / virtio-mmio transports; guest
//! kicks reach backends through KVM ioeventfds and backend interrupts reach
//! the guest through KVM irqfds, so the VMM is off the data path.
#![warn(missing_docs)]

pub mod api;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod device;
pub mod device_state;
pub mod i8042;
pub mod kvm;
pub mod memory;
pub mod pci;
pub mod pm;
pub mod probe;
pub mod seccomp;
pub mod serial;
pub mod transport;
pub mod vcpu;
pub mod vhost_user;
pub mod vm_events;
pub mod vmm;
