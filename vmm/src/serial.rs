//! The 16550A UART at COM1 (0x3f8, IRQ 4), from vm-superio. Its interrupt is
//! an eventfd registered as an irqfd on GSI 4.

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1's first port.
pub const COM1_PORT: u64 = 0x3f8;
/// Ports a UART decodes.
pub const COM1_PORTS: u64 = 8;
/// COM1's IRQ line.
pub const COM1_GSI: u32 = 4;

/// An eventfd that vm-superio triggers to raise the UART interrupt.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 writing to `out` (stdout, a file, or a sink).
pub struct SerialPort {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialPort {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues bytes for the guest to read (console input).
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = if data.len() == 1 {
            self.uart.read(offset as u8)
        } else {
            0xff
        };
        data.fill(v);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let [v] = data
            && let Err(e) = self.uart.write(offset as u8, *v)
        {
            log::debug!("serial write: {e:?}");
        }
    }
}

/// Where the serial output goes.
pub fn sink_for(path: Option<&std::path::Path>, stdio: bool) -> io::Result<Box<dyn Write + Send>> {
    Ok(match (path, stdio) {
        (Some(p), _) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        (None, true) => Box::new(io::stdout()),
        (None, false) => Box::new(io::sink()),
    })
}
