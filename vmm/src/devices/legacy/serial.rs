//! The COM1 16550 UART (vm-superio) writing guest output to a file or pipe, its interrupt
//! delivered through an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::super::bus::{BusAction, BusDevice};

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's legacy IRQ.
pub const COM1_IRQ: u32 = 4;

/// Why the serial device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("creating the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("restoring the serial state: {0}")]
    Restore(String),
}

/// Raises the serial IRQ by writing to an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Guest output sink.
pub type SerialOut = Box<dyn Write + Send>;

/// Most guest output written to a serial file; the rest is dropped. The guest decides what
/// it prints, and the file is on the host's disk.
pub const MAX_SERIAL_OUTPUT: u64 = 16 << 20;

/// The serial output for a configured path: the file (created, or appended to; a FIFO
/// works too), capped at [`MAX_SERIAL_OUTPUT`] bytes, or discarded when there is none.
pub fn open_output(path: Option<&std::path::Path>) -> std::io::Result<SerialOut> {
    open_capped(path, MAX_SERIAL_OUTPUT)
}

fn open_capped(path: Option<&std::path::Path>, cap: u64) -> std::io::Result<SerialOut> {
    Ok(match path {
        Some(path) => Box::new(Capped {
            out: std::fs::File::options()
                .create(true)
                .append(true)
                .open(path)?,
            left: cap,
        }),
        None => Box::new(std::io::sink()),
    })
}

/// A writer that passes on the first `left` bytes, then says once that it stopped, then
/// drops everything (still reporting success, so the UART carries on).
struct Capped<W> {
    out: W,
    left: u64,
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(buf.len());
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let written = self.out.write(&buf[..n])?;
        self.left -= written as u64;
        if self.left == 0 {
            // Best effort: the marker is for whoever reads the log.
            let _ = self
                .out
                .write_all(b"\n[sessiond: serial output limit reached; the rest is dropped]\n");
        }
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The UART and its output.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
}

/// The UART's registers, as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// A UART in its reset state; `irq` is the eventfd KVM listens on for its IRQ line.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A UART with saved registers.
    pub fn restore(
        irq: EventFd,
        out: SerialOut,
        state: &SerialSnapshot,
    ) -> Result<Self, SerialError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(SerialDevice { uart })
    }

    /// The registers to save.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
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

    /// Flushes buffered guest output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, *b) {
                tracing::warn!(error = ?e, "serial write failed");
            }
        }
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_files_stop_growing_at_the_cap() {
        let path = std::env::temp_dir().join(format!("vmm-serial-cap-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut out = open_capped(Some(&path), 100).unwrap();
        for _ in 0..50 {
            out.write_all(b"0123456789").unwrap();
        }
        out.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&"0123456789".repeat(10)), "{text}");
        assert!(
            text.ends_with("limit reached; the rest is dropped]\n"),
            "{text}"
        );
        assert!(text.len() < 200, "{} bytes", text.len());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output_and_state_round_trips() {
        let cap = Capture::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(cap.clone()));
        dev.write(7, &[0x5a]); // scratch register
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*cap.0.lock().unwrap(), b"hi");
        let snap = dev.snapshot();
        assert_eq!(snap.scratch, 0x5a);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut back = SerialDevice::restore(irq, Box::new(std::io::sink()), &snap).unwrap();
        let mut b = [0u8];
        back.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
    }
}
