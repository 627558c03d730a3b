//! The keyboard controller's reset line (port 0x64, command 0xFE): how Linux
//! reboots an x86 PC without ACPI. The VMM treats it as "the guest asked to
//! reboot" and exits, as `qemu -no-reboot` does.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::vcpu::{ExitReason, ExitRequest};

/// First port of the controller.
pub const I8042_PORT: u64 = 0x60;
/// Ports it decodes (0x60..0x65).
pub const I8042_PORTS: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// A keyboard controller that only knows how to reset the machine.
pub struct I8042 {
    exit: Arc<ExitRequest>,
}

impl I8042 {
    /// A controller that requests [`ExitReason::Reboot`] on reset.
    pub fn new(exit: Arc<ExitRequest>) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // Status register: output buffer empty, input buffer empty.
        let _ = offset;
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("guest requested a reset through the keyboard controller");
            self.exit.request(ExitReason::Reboot);
        }
    }
}
