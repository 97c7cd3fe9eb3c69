//! COM1: a 16550 UART (vm-superio) whose interrupt is an irqfd and whose
//! output goes to stdout, a file, or nowhere.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{lock, BusDevice};
use super::console_writer::ConsoleWriter;

/// An irqfd-backed interrupt line.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Serial output, written to its sink by a thread of its own
/// (`console_writer.rs`), or thrown away.
pub struct SerialOut {
    inner: ConsoleWriter,
}

impl SerialOut {
    /// Output to `sink`, written by a writer thread.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Self {
            inner: ConsoleWriter::start(sink),
        }
    }

    /// Output thrown away.
    pub fn discard() -> Self {
        Self {
            inner: ConsoleWriter::direct(Box::new(io::sink())),
        }
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    /// The UART calls this after every byte: the byte is on its way
    /// already (see `ConsoleWriter::flush`).
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOut>,
}

/// A shared handle, kept by the VMM to feed input and to flush at exit.
pub type SharedSerial = Arc<Mutex<SerialDevice>>;

impl SerialDevice {
    /// A UART raising `irq` on output to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues bytes from the host console for the guest to read. Returns how
    /// many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Returns once all output so far is written (at VM exit).
    pub fn flush(&mut self) {
        self.uart.writer_mut().inner.drain();
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Puts the UART back in a saved state, keeping its output and
    /// interrupt line.
    pub fn restore(&mut self, snap: &SerialSnapshot) -> Result<(), String> {
        let [bdl, bdh, ier, iir, lcr, lsr, mcr, msr, scr] = snap.regs;
        let state = SerialState {
            baud_divisor_low: bdl,
            baud_divisor_high: bdh,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: snap.in_buffer.clone(),
        };
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("serial: {e}"))?;
        // Take the output out of the old UART to give it to the new one.
        let placeholder = Serial::new(
            EventFdTrigger(irq.try_clone().map_err(|e| format!("serial: {e}"))?),
            SerialOut::discard(),
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = Serial::from_state(&state, EventFdTrigger(irq), NoEvents, out)
            .map_err(|e| format!("serial: {e:?}"))?;
        Ok(())
    }
}

/// The UART's saved state: the nine registers (DLL, DLM, IER, IIR, LCR,
/// LSR, MCR, MSR, SCR) and the bytes waiting for the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// The registers, in the order above.
    pub regs: [u8; 9],
    /// The receive FIFO.
    pub in_buffer: Vec<u8>,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are bytes; wider accesses read the first register and
        // pad with ones.
        data.fill(0xff);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A failed write means the sink (stdout, file) is gone; the guest
            // must keep running, so the byte is dropped.
            let _ = self.uart.write(off, value);
        }
    }
}

/// Feeds the host's stdin into the UART until stdin closes. Runs on its own
/// thread; bytes that do not fit in the FIFO wait until the guest drains it.
pub fn forward_stdin(serial: SharedSerial) {
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        let n = match io::Read::read(&mut stdin, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let taken = lock(&serial).enqueue_input(rest);
            rest = &rest[taken..];
            if !rest.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}
