//! The COM1 8250 UART: `vm-superio`'s [`Serial`] on the port-I/O bus, raising its interrupt
//! through an `EventFd` that KVM injects as GSI 4 (irqfd).
//!
//! Only transmit matters here: the guest's console goes to a [`std::io::Write`] sink (see
//! [`crate::console`]). The other legacy COM ports are left unclaimed: the vCPU loop answers
//! reads of unclaimed ports with `0xff` (no UART) and drops writes.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
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

/// The UART's registers and receive FIFO, for a snapshot ([`crate::snapshot`]): `vm-superio`'s
/// [`SerialState`], which is not serde-able, mirrored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Default for UartState {
    /// The power-on state.
    fn default() -> Self {
        SerialState::default().into()
    }
}

/// A [`UartState`] the UART cannot take.
#[derive(Debug, thiserror::Error)]
#[error("serial state: {0:?}")]
pub struct UartStateError(vm_superio::serial::Error<std::io::Error>);

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

    /// A UART in the saved `state` (a restore). An interrupt the state has pending is raised
    /// at once.
    pub fn with_state(irq: EventFd, out: W, state: &UartState) -> Result<Self, UartStateError> {
        let serial = Serial::from_state(
            &SerialState::from(state),
            EventFdTrigger::new(irq),
            NoEvents,
            out,
        )
        .map_err(UartStateError)?;
        Ok(Self { serial, errors: 0 })
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> UartState {
        self.serial.state().into()
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

    #[test]
    fn the_state_carries_over_to_a_new_uart() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Vec::new());
        // 8N1 at 9600 baud through the divisor latch, a scratch byte, THR interrupt on.
        dev.write(3, &[0x80]);
        dev.write(0, &[0x0c]);
        dev.write(3, &[0x03]);
        dev.write(7, &[0x5a]);
        dev.write(1, &[0x02]);
        let state = dev.state();
        assert_eq!(state.baud_divisor_low, 0x0c);
        assert_eq!(state.scratch, 0x5a);
        while irq.read().is_ok() {}
        let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut other =
            SerialDevice::with_state(irq2.try_clone().unwrap(), Vec::new(), &state).unwrap();
        assert_eq!(other.state(), state);
        let mut scratch = [0u8];
        other.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        // The pending THR-empty interrupt is raised again on the new UART's line.
        assert!(irq2.read().unwrap() >= 1);
        let full = UartState {
            in_buffer: vec![0; 65],
            ..state
        };
        assert!(SerialDevice::with_state(irq2, Vec::new(), &full).is_err());
        assert_eq!(
            UartState::default().line_control,
            SerialState::default().line_control
        );
    }
}
