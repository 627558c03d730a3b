//! The ACPI PM1a event and control blocks the FADT points at: reads say
//! ACPI mode is on (SCI_EN), a write of SLP_EN with the `_S5_` sleep type
//! powers the guest off (the VMM exits with status 0).

use std::sync::Arc;

use crate::boot::acpi::{PM1A_CNT_PORT, PM1A_EVT_PORT, S5_SLP_TYP};
use crate::bus::BusDevice;
use crate::vcpu::{ExitReason, ExitRequest};

/// First port of the device (the PM1a event block).
pub const PM_PORT: u64 = PM1A_EVT_PORT as u64;
/// Ports covered: PM1_STS, PM1_EN (2 each), PM1_CNT (2).
pub const PM_PORTS: u64 = 6;

const CNT_OFFSET: u64 = (PM1A_CNT_PORT - PM1A_EVT_PORT) as u64;
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;

/// The power-management device.
pub struct PmDevice {
    exit: Arc<ExitRequest>,
    enable: u16,
    control: u16,
}

impl PmDevice {
    /// A device that stops the VM through `exit` on S5.
    pub fn new(exit: Arc<ExitRequest>) -> Self {
        PmDevice {
            exit,
            enable: 0,
            control: SCI_EN,
        }
    }
}

impl BusDevice for PmDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v: u16 = match offset {
            2 => self.enable,
            CNT_OFFSET => self.control,
            _ => 0, // PM1_STS: no events
        };
        crate::transport::put_le(u64::from(v), data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let v = crate::transport::get_le(data) as u16;
        match offset {
            2 => self.enable = v,
            CNT_OFFSET => {
                if v & SLP_EN != 0 && ((v >> 10) & 7) as u8 == S5_SLP_TYP {
                    log::info!("guest entered S5: powering off");
                    self.exit.request(ExitReason::PowerOff);
                }
                self.control = (v & !SLP_EN) | SCI_EN;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_sci_en_reads_set() {
        let exit = ExitRequest::new().unwrap();
        let mut pm = PmDevice::new(exit.clone());
        let mut b = [0u8; 2];
        pm.read(PM_PORT, CNT_OFFSET, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
        // Linux writes SLP_TYP first, then SLP_TYP | SLP_EN.
        let typ = u16::from(S5_SLP_TYP) << 10;
        pm.write(PM_PORT, CNT_OFFSET, &typ.to_le_bytes());
        assert!(!exit.stopping());
        pm.write(PM_PORT, CNT_OFFSET, &(typ | SLP_EN).to_le_bytes());
        assert_eq!(exit.reason(), ExitReason::PowerOff);
    }
}
