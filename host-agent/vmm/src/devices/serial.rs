//! The COM1 8250 UART: `vm-superio`'s [`Serial`] on the port-I/O bus, raising its interrupt
//! through an `EventFd` that KVM injects as GSI 4 (irqfd).
//!
//! Only transmit matters here: the guest's console goes to a [`std::io::Write`] sink (see
//! [`crate::console`]). The other legacy COM ports are left unclaimed: the vCPU loop answers
//! reads of unclaimed ports with `0xff` (no UART) and drops writes.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports an 8250 decodes.
pub const UART_PORT_LEN: u64 = 8;

/// Raises the UART's interrupt by writing to an `EventFd` registered as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `fd`.
    pub fn new(fd: EventFd) -> Self {
        Self(fd)
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// An 8250 UART on the port-I/O bus.
pub struct SerialDevice<W: Write + Send> {
    serial: Serial<EventFdTrigger, NoEvents, W>,
    /// Failed register writes (interrupt or sink errors); counted, never logged per byte.
    errors: u64,
}

impl<W: Write + Send> std::fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART that interrupts through `irq` and transmits into `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger::new(irq), out),
            errors: 0,
        }
    }

    /// The transmit sink.
    pub fn sink(&self) -> &W {
        self.serial.writer()
    }

    /// The transmit sink, mutably.
    pub fn sink_mut(&mut self) -> &mut W {
        self.serial.writer_mut()
    }

    /// Register writes that failed so far.
    pub fn errors(&self) -> u64 {
        self.errors
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.serial.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data)
            && self.serial.write(offset, *byte).is_err()
        {
            self.errors += 1;
            if self.errors == 1 {
                tracing::warn!("serial: a register write failed; further failures are counted");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn transmits_bytes_and_raises_the_interrupt() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Vec::new());
        // Enable the "transmitter holding register empty" interrupt.
        dev.write(1, &[0x02]);
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(dev.sink(), b"hi");
        assert!(irq.read().unwrap() >= 1);
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Wide accesses are not UART accesses.
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(0, b"xy");
        assert_eq!(dev.sink(), b"hi");
    }
}
