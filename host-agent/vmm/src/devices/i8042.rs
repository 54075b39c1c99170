//! Just enough of the i8042 keyboard controller for `reboot=k`: the guest resets the machine by
//! pulsing the CPU reset line (command 0xFE on port 0x64, or clearing bit 0 of the output port
//! through command 0xD1).
//!
//! There is no keyboard and no interrupt. The controller answers the probes the Linux driver makes
//! (self-test, interface test, the control byte) so that a kernel built with the i8042 driver sees
//! a quiet controller instead of spinning. The device sits on ports 0x60..0x65; port 0x61 is the
//! in-kernel PIT's speaker port and never reaches it.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::bus::BusDevice;

/// First port of the range the device is inserted at.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Length of that range (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
/// Keyboard not inhibited (the key lock is off).
const STATUS_UNLOCKED: u8 = 1 << 4;

const CMD_READ_CONTROL: u8 = 0x20;
const CMD_WRITE_CONTROL: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_TEST_OK: u8 = 0x00;
const OUTPUT_PORT_RESET_LINE: u8 = 1 << 0;
/// Output port at power-on: reset line high (not asserted), A20 on.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;
/// Control byte at power-on: keyboard interrupt on, system flag, translation.
const CONTROL_DEFAULT: u8 = 0x45;
const FIFO_LIMIT: usize = 16;

/// What a data-port write means, set by the previous command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingWrite {
    None,
    Control,
    OutputPort,
}

/// The controller's registers, for a snapshot ([`crate::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status register (without the output-full bit, which follows `out`).
    pub status: u8,
    /// Control byte.
    pub control: u8,
    /// Output port.
    pub output_port: u8,
    /// What the next data-port write means: 0 nothing, 1 the control byte, 2 the output port.
    pub pending: u8,
    /// Bytes waiting for the guest to read (at most 16).
    pub out: Vec<u8>,
}

/// An [`I8042State`] the controller cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum I8042StateError {
    /// The pending-write code is not 0, 1 or 2.
    #[error("i8042 state: pending write {0} is not 0, 1 or 2")]
    Pending(u8),
    /// More bytes wait than the controller holds.
    #[error("i8042 state: {0} bytes wait, more than {FIFO_LIMIT}")]
    Fifo(usize),
}

/// The i8042 controller. `on_reset` runs once per reset request the guest makes.
pub struct I8042 {
    status: u8,
    control: u8,
    output_port: u8,
    pending: PendingWrite,
    out: VecDeque<u8>,
    on_reset: Box<dyn FnMut() + Send>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("status", &self.status)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller that calls `on_reset` when the guest resets the CPU through it.
    pub fn new(on_reset: Box<dyn FnMut() + Send>) -> Self {
        Self {
            status: STATUS_SYSTEM_FLAG | STATUS_UNLOCKED,
            control: CONTROL_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            pending: PendingWrite::None,
            out: VecDeque::new(),
            on_reset,
        }
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output_port: self.output_port,
            pending: match self.pending {
                PendingWrite::None => 0,
                PendingWrite::Control => 1,
                PendingWrite::OutputPort => 2,
            },
            out: self.out.iter().copied().collect(),
        }
    }

    /// Takes the registers of `state` (a restore); nothing changes when it is refused.
    pub fn set_state(&mut self, state: &I8042State) -> Result<(), I8042StateError> {
        let pending = match state.pending {
            0 => PendingWrite::None,
            1 => PendingWrite::Control,
            2 => PendingWrite::OutputPort,
            other => return Err(I8042StateError::Pending(other)),
        };
        if state.out.len() > FIFO_LIMIT {
            return Err(I8042StateError::Fifo(state.out.len()));
        }
        self.status = state.status & !STATUS_OUTPUT_FULL;
        self.control = state.control;
        self.output_port = state.output_port;
        self.pending = pending;
        self.out = state.out.iter().copied().collect();
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.out.len() < FIFO_LIMIT {
            self.out.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let full = if self.out.is_empty() {
            0
        } else {
            STATUS_OUTPUT_FULL
        };
        self.status | full
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        self.pending = PendingWrite::None;
        match cmd {
            CMD_READ_CONTROL => self.push(self.control),
            CMD_WRITE_CONTROL => self.pending = PendingWrite::Control,
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(INTERFACE_TEST_OK),
            CMD_READ_OUTPUT_PORT => self.push(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.pending = PendingWrite::OutputPort,
            CMD_PULSE_RESET => (self.on_reset)(),
            CMD_DISABLE_AUX | CMD_ENABLE_AUX | CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
            // Other commands (password, aux loopback, 0xf0..0xfd pulses without the reset bit)
            // have nothing to emulate here.
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match std::mem::replace(&mut self.pending, PendingWrite::None) {
            PendingWrite::Control => self.control = byte,
            PendingWrite::OutputPort => {
                self.output_port = byte;
                if byte & OUTPUT_PORT_RESET_LINE == 0 {
                    (self.on_reset)();
                }
            }
            // A byte for the (absent) keyboard: answer nothing.
            PendingWrite::None => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.out.pop_front().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA_OFFSET => self.data(byte),
            COMMAND_OFFSET => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn device() -> (I8042, Arc<AtomicU32>) {
        let resets = Arc::new(AtomicU32::new(0));
        let r = resets.clone();
        let dev = I8042::new(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        (dev, resets)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_command_resets() {
        let (mut dev, resets) = device();
        // kb_wait(): the input buffer is never full; the key lock is off.
        let status = read(&mut dev, 4);
        assert_eq!(status & 0x02, 0);
        assert_ne!(status & STATUS_UNLOCKED, 0);
        dev.write(4, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn clearing_the_reset_line_in_the_output_port_resets() {
        let (mut dev, resets) = device();
        dev.write(4, &[0xd1]);
        dev.write(0, &[0x03]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(4, &[0xd1]);
        dev.write(0, &[0x02]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn answers_driver_probes() {
        let (mut dev, resets) = device();
        assert_eq!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        dev.write(4, &[0xaa]);
        assert_ne!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, 0), 0x55);
        assert_eq!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        dev.write(4, &[0x60]);
        dev.write(0, &[0x11]);
        dev.write(4, &[0x20]);
        assert_eq!(read(&mut dev, 0), 0x11);
        // Unknown keyboard bytes are swallowed, and the queue is bounded.
        dev.write(0, &[0xff]);
        for _ in 0..100 {
            dev.write(4, &[0xaa]);
        }
        assert_eq!(dev.out.len(), FIFO_LIMIT);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_state_carries_over_to_a_new_controller() {
        let (mut dev, _) = device();
        dev.write(4, &[0x60]);
        dev.write(0, &[0x11]);
        dev.write(4, &[0xaa]);
        dev.write(4, &[0xd1]);
        let state = dev.state();
        assert_eq!((state.pending, state.out.as_slice()), (2, &[0x55][..]));
        let (mut other, resets) = device();
        other.set_state(&state).unwrap();
        assert_eq!(other.state(), state);
        assert_eq!(read(&mut other, 0), 0x55);
        // The pending output-port write goes on where it was: clearing the reset line resets.
        other.write(0, &[0x02]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);

        let bad = I8042State {
            pending: 3,
            ..state.clone()
        };
        assert_eq!(other.set_state(&bad), Err(I8042StateError::Pending(3)));
        let bad = I8042State {
            out: vec![0; FIFO_LIMIT + 1],
            ..state
        };
        assert_eq!(other.set_state(&bad), Err(I8042StateError::Fifo(17)));
    }
}
