//! The i8042 PS/2 controller on ports 0x60 (data) and 0x64 (status/command),
//! with a keyboard on its first port and nothing on its auxiliary (mouse) port.
//!
//! vm-superio's `I8042Device` is not enough: it handles only the 0xFE (pulse
//! reset) command and reads 0 everywhere else, so Linux's i8042 driver cannot
//! even read the controller command byte ("Can't read CTR while initializing
//! i8042", probe error -5), and it has no way to put key presses in the output
//! buffer, which the API's `SendCtrlAltDel` needs. This device implements the
//! controller commands a PC driver uses, a keyboard that answers the usual
//! PS/2 keyboard commands, and an output queue that raises IRQ 1 through an
//! irqfd.
//!
//! Model:
//! - Writes complete at once, so the input buffer is never full (status bit 1
//!   is always clear). The output buffer is the head of a bounded queue;
//!   reading port 0x60 pops it (reading it empty returns the last byte again,
//!   like the hardware's stale buffer).
//! - Every byte that becomes the output buffer's byte (queued while the queue
//!   was empty, or moved up by a read of 0x60) raises IRQ 1 once, if the
//!   command byte (CTR) has keyboard interrupts on (bit 0) and the keyboard
//!   interface enabled (bit 4 clear). Turning that condition on while a byte is
//!   waiting raises it too, as the hardware's OBF-and-interrupt line would.
//! - There is no mouse: the CTR's aux-disable bit (5) always reads 1 and its
//!   aux-interrupt bit (1) always reads 0, whatever the guest writes (so a
//!   driver that tries to enable the aux port sees it stay off), the aux
//!   interface test answers 0x02 ("clock line stuck", which Linux takes as "no
//!   AUX port"; it takes 0x00, 0xFA and 0xFF as a working one), the aux
//!   loopback (0xD3) answers nothing, and a byte for the mouse (0xD4) is
//!   answered 0xFE. Status bit 5 (aux data) is never set.
//! - The CTR starts as a BIOS leaves it: keyboard interrupt, system flag,
//!   aux disabled and scancode translation on (0x65), so Linux keeps
//!   translation and reports an "AT Translated Set 2 keyboard".

use std::collections::VecDeque;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::exit::ExitTrigger;

/// Offset of the data port (0x60) in the device's range.
const DATA: u64 = 0;
/// Offset of the status/command port (0x64) in the device's range.
const CMD: u64 = 4;

// Status register bits.
const SR_OBF: u8 = 1 << 0;
const SR_SYS: u8 = 1 << 2;
const SR_CMD: u8 = 1 << 3;
/// Bit 4: set means the keyboard is not inhibited by the key lock. Linux warns
/// "Keylock active" when it is clear.
const SR_UNLOCKED: u8 = 1 << 4;

// Command byte (CTR) bits.
const CTR_KBD_INT: u8 = 1 << 0;
const CTR_AUX_INT: u8 = 1 << 1;
const CTR_SYS: u8 = 1 << 2;
const CTR_KBD_DIS: u8 = 1 << 4;
const CTR_AUX_DIS: u8 = 1 << 5;
const CTR_XLAT: u8 = 1 << 6;
/// The CTR at power-on, as firmware would leave it.
const CTR_INITIAL: u8 = CTR_KBD_INT | CTR_SYS | CTR_AUX_DIS | CTR_XLAT;

// Output port bits (0xD0/0xD1).
const OUT_RESET: u8 = 1 << 0; // active low: 0 resets the CPU
const OUT_A20: u8 = 1 << 1;
const OUT_KBD_OBF: u8 = 1 << 4;
const OUT_AUX_OBF: u8 = 1 << 5;

/// Input port (0xC0): bit 7 keyboard not inhibited, bit 5 no manufacturing
/// jumper, bit 4 more than 256 KiB of RAM.
const INPUT_PORT: u8 = 0xb0;

/// Bytes the output queue holds; more are dropped (and counted).
pub const QUEUE_LEN: usize = 16;

// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_SELFTEST_OK: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;

/// A controller command (written to 0x64) waiting for its data byte on 0x60.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PendingCmd {
    /// 0x60-0x7F: write byte `n` of the controller RAM (0 is the CTR).
    Ram(u8),
    /// 0xD1: write the output port.
    OutputPort,
    /// 0xD2: queue the byte as if it came from the keyboard.
    KbdBuffer,
    /// 0xD3: write the aux output buffer (no aux port: dropped).
    AuxBuffer,
    /// 0xD4: send the byte to the mouse (no mouse: answered 0xFE).
    Aux,
}

/// A keyboard command waiting for its argument byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KbdArg {
    /// 0xED: set the LEDs.
    Leds,
    /// 0xF0: get (0) or set (1-3) the scancode set.
    ScancodeSet,
    /// 0xF3: set the typematic rate and delay.
    Typematic,
}

/// The i8042's saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Snapshot {
    /// Controller RAM (byte 0: the command byte).
    pub ram: Vec<u8>,
    /// The output port.
    pub output_port: u8,
    /// The last write went to the command port.
    pub last_write_cmd: bool,
    /// Bytes waiting for the guest.
    pub queue: Vec<u8>,
    /// The byte last read.
    pub last_read: u8,
    /// The keyboard scans.
    pub kbd_scanning: bool,
    /// The keyboard's scancode set.
    pub kbd_set: u8,
}

/// The i8042 on ports 0x60-0x64.
pub struct I8042 {
    reset: ExitTrigger,
    irq: EventFd,
    /// Controller RAM; byte 0 is the command byte (CTR).
    ram: [u8; 32],
    output_port: u8,
    /// Status bit 3: the last write went to 0x64 (command) rather than 0x60.
    last_write_cmd: bool,
    pending: Option<PendingCmd>,
    queue: VecDeque<u8>,
    /// The byte last read from 0x60 (read again when the buffer is empty).
    last_read: u8,
    /// Bytes dropped because the queue was full.
    dropped: u64,
    /// The keyboard scans (sends key codes): 0xF4 on, 0xF5 off, reset on.
    kbd_scanning: bool,
    kbd_arg: Option<KbdArg>,
    /// The keyboard's scancode set (1-3) as set by 0xF0.
    kbd_set: u8,
}

impl I8042 {
    /// An i8042 whose reset line fires `reset` and whose keyboard interrupt is
    /// `irq` (an eventfd registered as the irqfd of GSI 1).
    pub fn new(reset: ExitTrigger, irq: EventFd) -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CTR_INITIAL;
        Self {
            reset,
            irq,
            ram,
            output_port: OUT_RESET | OUT_A20,
            last_write_cmd: false,
            pending: None,
            queue: VecDeque::with_capacity(QUEUE_LEN),
            last_read: 0,
            dropped: 0,
            kbd_scanning: true,
            kbd_arg: None,
            kbd_set: 2,
        }
    }

    /// The controller's RAM, output port, queued bytes and keyboard mode,
    /// for a snapshot. A command half-way through its argument byte is not
    /// kept (the guest's driver retries).
    pub fn save(&self) -> I8042Snapshot {
        I8042Snapshot {
            ram: self.ram.to_vec(),
            output_port: self.output_port,
            last_write_cmd: self.last_write_cmd,
            queue: self.queue.iter().copied().collect(),
            last_read: self.last_read,
            kbd_scanning: self.kbd_scanning,
            kbd_set: self.kbd_set,
        }
    }

    /// Puts the controller back as saved.
    pub fn restore(&mut self, snap: &I8042Snapshot) {
        let n = snap.ram.len().min(self.ram.len());
        self.ram[..n].copy_from_slice(&snap.ram[..n]);
        self.output_port = snap.output_port;
        self.last_write_cmd = snap.last_write_cmd;
        self.pending = None;
        self.queue = snap.queue.iter().copied().take(QUEUE_LEN).collect();
        self.last_read = snap.last_read;
        self.kbd_scanning = snap.kbd_scanning;
        self.kbd_arg = None;
        self.kbd_set = snap.kbd_set;
    }

    /// Bytes dropped so far because the output queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard: press Ctrl, press
    /// Alt, press Delete, release Delete, release Alt, release Ctrl (left
    /// Ctrl and Alt; Delete is an extended key, so it has the 0xE0 prefix).
    ///
    /// The codes depend on what the guest reads from port 0x60:
    /// - With translation on (CTR bit 6, XLAT, as Linux and every BIOS set
    ///   it), the controller turns the keyboard's set 2 into scancode set 1,
    ///   so the guest sees set 1: `1d 38 e0 53 e0 d3 b8 9d` (a release is the
    ///   make code with bit 7 set). The same is queued if the guest chose set
    ///   1 on the keyboard itself.
    /// - Otherwise the keyboard's own set: set 2 (the default)
    ///   `14 11 e0 71 e0 f0 71 f0 11 f0 14` (a release is 0xF0 before the
    ///   make code, after any 0xE0), or set 3 `11 19 64 f0 64 f0 19 f0 11`.
    ///
    /// Nothing is sent while the keyboard has scanning disabled (0xF5, e.g.
    /// while a driver probes it), as a real keyboard would not; and the whole
    /// sequence is dropped (and counted) if the queue cannot take all of it,
    /// so the guest never sees half of it.
    pub fn send_ctrl_alt_del(&mut self) {
        const SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
        const SET2: &[u8] = &[
            0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
        ];
        const SET3: &[u8] = &[0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11];
        if !self.kbd_scanning {
            return;
        }
        let seq = if self.ctr() & CTR_XLAT != 0 || self.kbd_set == 1 {
            SET1
        } else if self.kbd_set == 3 {
            SET3
        } else {
            SET2
        };
        if QUEUE_LEN - self.queue.len() < seq.len() {
            self.dropped += seq.len() as u64;
            return;
        }
        for &b in seq {
            self.push(b);
        }
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn set_ctr(&mut self, v: u8) {
        let was = self.irq_enabled();
        // No aux port: it stays disabled, without interrupts.
        self.ram[0] = (v | CTR_AUX_DIS) & !CTR_AUX_INT;
        if !was {
            self.irq_if_pending();
        }
    }

    fn irq_enabled(&self) -> bool {
        self.ctr() & CTR_KBD_INT != 0 && self.ctr() & CTR_KBD_DIS == 0
    }

    /// Raises IRQ 1 for the byte now in the output buffer, if interrupts are on.
    fn irq_if_pending(&self) {
        if !self.queue.is_empty() && self.irq_enabled() {
            // A full eventfd counter still means "raised"; nothing to do on error.
            let _ = self.irq.write(1);
        }
    }

    /// Queues a byte for the guest (dropped, and counted, if the queue is full).
    fn push(&mut self, b: u8) {
        if self.queue.len() >= QUEUE_LEN {
            self.dropped += 1;
            return;
        }
        self.queue.push_back(b);
        if self.queue.len() == 1 {
            self.irq_if_pending();
        }
    }

    fn pop(&mut self) -> u8 {
        if let Some(b) = self.queue.pop_front() {
            self.last_read = b;
            self.irq_if_pending();
        }
        self.last_read
    }

    fn status(&self) -> u8 {
        let mut s = SR_UNLOCKED;
        if !self.queue.is_empty() {
            s |= SR_OBF;
        }
        if self.ctr() & CTR_SYS != 0 {
            s |= SR_SYS;
        }
        if self.last_write_cmd {
            s |= SR_CMD;
        }
        s
    }

    fn pulse_reset(&self) {
        // ExitTrigger cannot fail.
        let _ = self.reset.trigger();
    }

    /// A controller command written to port 0x64.
    fn command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            0x20..=0x3f => self.push(self.ram[usize::from(cmd & 0x1f)]),
            0x60..=0x7f => self.pending = Some(PendingCmd::Ram(cmd & 0x1f)),
            0xa7 | 0xa8 => {} // disable/enable aux: there is none, AUX_DIS stays set
            0xa9 => self.push(0x02), // aux interface test: clock line stuck, i.e. no aux port
            0xaa => {
                // Self-test passed; the system flag goes up as after POST.
                self.ram[0] |= CTR_SYS;
                self.push(0x55);
            }
            0xab => self.push(0x00), // keyboard interface test: no error
            0xad => self.set_ctr(self.ctr() | CTR_KBD_DIS),
            0xae => self.set_ctr(self.ctr() & !CTR_KBD_DIS),
            0xc0 => self.push(INPUT_PORT),
            0xd0 => {
                let mut v = self.output_port & !(OUT_KBD_OBF | OUT_AUX_OBF);
                if !self.queue.is_empty() {
                    v |= OUT_KBD_OBF;
                }
                self.push(v);
            }
            0xd1 => self.pending = Some(PendingCmd::OutputPort),
            0xd2 => self.pending = Some(PendingCmd::KbdBuffer),
            0xd3 => self.pending = Some(PendingCmd::AuxBuffer),
            0xd4 => self.pending = Some(PendingCmd::Aux),
            0xfe => self.pulse_reset(),
            _ => {}
        }
    }

    /// A byte written to port 0x60.
    fn data(&mut self, v: u8) {
        match self.pending.take() {
            Some(PendingCmd::Ram(0)) => self.set_ctr(v),
            Some(PendingCmd::Ram(n)) => self.ram[usize::from(n)] = v,
            Some(PendingCmd::OutputPort) => {
                self.output_port = v;
                if v & OUT_RESET == 0 {
                    self.pulse_reset();
                }
            }
            Some(PendingCmd::KbdBuffer) => self.push(v),
            Some(PendingCmd::AuxBuffer) => {}
            Some(PendingCmd::Aux) => self.push(KBD_RESEND),
            None => self.keyboard(v),
        }
    }

    /// A byte sent to the keyboard.
    fn keyboard(&mut self, v: u8) {
        if let Some(arg) = self.kbd_arg.take() {
            self.push(KBD_ACK);
            if arg == KbdArg::ScancodeSet {
                match v {
                    0 => self.push(self.kbd_set),
                    1..=3 => self.kbd_set = v,
                    _ => {}
                }
            }
            return;
        }
        match v {
            0xff => {
                self.kbd_defaults();
                self.kbd_scanning = true;
                self.push(KBD_ACK);
                self.push(KBD_SELFTEST_OK);
            }
            0xf2 => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(0x83);
            }
            0xf4 => {
                self.kbd_scanning = true;
                self.push(KBD_ACK);
            }
            0xf5 => {
                self.kbd_defaults();
                self.kbd_scanning = false;
                self.push(KBD_ACK);
            }
            0xf6 => {
                self.kbd_defaults();
                self.push(KBD_ACK);
            }
            0xed => self.kbd_wants(KbdArg::Leds),
            0xf0 => self.kbd_wants(KbdArg::ScancodeSet),
            0xf3 => self.kbd_wants(KbdArg::Typematic),
            0xee => self.push(KBD_ECHO),
            _ => self.push(KBD_ACK),
        }
    }

    fn kbd_wants(&mut self, arg: KbdArg) {
        self.kbd_arg = Some(arg);
        self.push(KBD_ACK);
    }

    fn kbd_defaults(&mut self) {
        self.kbd_set = 2;
        self.kbd_arg = None;
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = match offset {
            DATA => self.pop(),
            CMD => self.status(),
            _ => 0,
        };
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            DATA => {
                self.last_write_cmd = false;
                self.data(v);
            }
            CMD => {
                self.last_write_cmd = true;
                self.command(v);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{exit_channel, ExitReason};
    use std::sync::mpsc::Receiver;

    fn dev() -> (I8042, Receiver<ExitReason>) {
        let (tx, rx) = exit_channel().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = I8042::new(ExitTrigger::new(tx, ExitReason::Reset("i8042")), irq);
        (d, rx.reasons)
    }

    fn cmd(d: &mut I8042, v: u8) {
        d.write(CMD, &[v]);
    }

    fn out(d: &mut I8042, v: u8) {
        d.write(DATA, &[v]);
    }

    fn status(d: &mut I8042) -> u8 {
        let mut b = [0u8];
        d.read(CMD, &mut b);
        b[0]
    }

    /// Everything in the output buffer, read the way a polling driver does.
    fn drain(d: &mut I8042) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..64 {
            if status(d) & SR_OBF == 0 {
                break;
            }
            let mut b = [0u8];
            d.read(DATA, &mut b);
            v.push(b[0]);
        }
        v
    }

    /// IRQs raised since the last call.
    fn irqs(d: &I8042) -> u64 {
        d.irq.read().unwrap_or(0)
    }

    #[test]
    fn status_bits() {
        let (mut d, _rx) = dev();
        let s = status(&mut d);
        assert_eq!(s & SR_OBF, 0);
        assert_eq!(s & 0x02, 0, "IBF never set");
        assert_ne!(s & SR_UNLOCKED, 0);
        assert_eq!(s & 0x20, 0, "no aux data");
        cmd(&mut d, 0x20);
        let s = status(&mut d);
        assert_ne!(s & SR_OBF, 0);
        assert_ne!(s & SR_CMD, 0);
        assert_eq!(drain(&mut d), vec![CTR_INITIAL]);
        cmd(&mut d, 0x60);
        out(&mut d, 0x00);
        assert_eq!(status(&mut d) & (SR_CMD | SR_SYS), 0);
        cmd(&mut d, 0xaa);
        assert_eq!(drain(&mut d), vec![0x55]);
        assert_ne!(status(&mut d) & SR_SYS, 0, "self-test sets SYS");
    }

    #[test]
    fn controller_commands() {
        let (mut d, rx) = dev();
        cmd(&mut d, 0xab);
        assert_eq!(drain(&mut d), vec![0x00]);
        cmd(&mut d, 0xa9);
        let aux = drain(&mut d);
        assert_eq!(aux.len(), 1);
        assert!(
            ![0x00, 0xfa, 0xff].contains(&aux[0]),
            "Linux must see no aux port"
        );
        // No aux port: enabling it does not stick.
        cmd(&mut d, 0xa8);
        cmd(&mut d, 0x60);
        out(&mut d, 0x03);
        cmd(&mut d, 0x20);
        assert_eq!(drain(&mut d), vec![0x21]);
        cmd(&mut d, 0xad);
        cmd(&mut d, 0x20);
        assert_eq!(drain(&mut d), vec![0x31]);
        cmd(&mut d, 0xae);
        cmd(&mut d, 0x20);
        assert_eq!(drain(&mut d), vec![0x21]);
        cmd(&mut d, 0xc0);
        assert_eq!(drain(&mut d), vec![INPUT_PORT]);
        cmd(&mut d, 0xd0);
        assert_eq!(drain(&mut d), vec![OUT_RESET | OUT_A20]);
        cmd(&mut d, 0xd2);
        out(&mut d, 0x42);
        assert_eq!(drain(&mut d), vec![0x42]);
        cmd(&mut d, 0xd3);
        out(&mut d, 0x5a);
        assert_eq!(drain(&mut d), Vec::<u8>::new());
        cmd(&mut d, 0xd4);
        out(&mut d, 0xf2);
        assert_eq!(drain(&mut d), vec![0xfe]);
        // Controller RAM beyond the CTR.
        cmd(&mut d, 0x65);
        out(&mut d, 0x99);
        cmd(&mut d, 0x25);
        assert_eq!(drain(&mut d), vec![0x99]);
        // Unknown commands are ignored, and the next data byte goes to the keyboard.
        cmd(&mut d, 0x11);
        cmd(&mut d, 0xf0);
        cmd(&mut d, 0xc8);
        out(&mut d, 0xee);
        assert_eq!(drain(&mut d), vec![0xee]);
        assert!(rx.try_recv().is_err(), "no reset");
        // Reading an empty buffer repeats the last byte.
        let mut b = [0u8];
        d.read(DATA, &mut b);
        assert_eq!(b[0], 0xee);
        // Odd offsets and sizes are harmless.
        d.write(1, &[0xfe]);
        d.write(CMD, &[]);
        let mut w = [0xffu8; 4];
        d.read(2, &mut w);
        assert_eq!(w, [0; 4]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn keyboard_commands() {
        let (mut d, _rx) = dev();
        out(&mut d, 0xff);
        assert_eq!(drain(&mut d), vec![0xfa, 0xaa]);
        out(&mut d, 0xf2);
        assert_eq!(drain(&mut d), vec![0xfa, 0xab, 0x83]);
        for c in [0xf4, 0xf5, 0xf6, 0x12] {
            out(&mut d, c);
            assert_eq!(drain(&mut d), vec![0xfa], "command {c:#x}");
        }
        out(&mut d, 0xee);
        assert_eq!(drain(&mut d), vec![0xee]);
        // Commands with an argument: both bytes acknowledged.
        out(&mut d, 0xed);
        out(&mut d, 0x07);
        assert_eq!(drain(&mut d), vec![0xfa, 0xfa]);
        out(&mut d, 0xf3);
        out(&mut d, 0xff); // an argument, not a reset
        assert_eq!(drain(&mut d), vec![0xfa, 0xfa]);
        out(&mut d, 0xf0);
        out(&mut d, 0x00);
        assert_eq!(drain(&mut d), vec![0xfa, 0xfa, 0x02]);
        out(&mut d, 0xf0);
        out(&mut d, 0x03);
        out(&mut d, 0xf0);
        out(&mut d, 0x00);
        assert_eq!(drain(&mut d), vec![0xfa, 0xfa, 0xfa, 0xfa, 0x03]);
        out(&mut d, 0xff);
        out(&mut d, 0xf0);
        out(&mut d, 0x00);
        assert_eq!(drain(&mut d), vec![0xfa, 0xaa, 0xfa, 0xfa, 0x02]);
    }

    #[test]
    fn queue_is_bounded() {
        let (mut d, _rx) = dev();
        for _ in 0..10 {
            out(&mut d, 0xf2); // 3 bytes each
        }
        assert_eq!(d.dropped(), 30 - QUEUE_LEN as u64);
        assert_eq!(drain(&mut d).len(), QUEUE_LEN);
    }

    #[test]
    fn irq_once_per_byte() {
        let (mut d, _rx) = dev();
        // Interrupts on at power-on.
        out(&mut d, 0xff);
        assert_eq!(irqs(&d), 1, "first byte available");
        let mut b = [0u8];
        d.read(DATA, &mut b);
        assert_eq!(irqs(&d), 1, "second byte moved up");
        d.read(DATA, &mut b);
        assert_eq!(irqs(&d), 0, "queue empty");
        d.read(DATA, &mut b);
        assert_eq!(irqs(&d), 0);

        // Interrupts off: polling only.
        cmd(&mut d, 0x60);
        out(&mut d, 0x64);
        out(&mut d, 0xf2);
        assert_eq!(drain(&mut d), vec![0xfa, 0xab, 0x83]);
        assert_eq!(irqs(&d), 0);

        // Turning interrupts on with a byte waiting raises the line.
        out(&mut d, 0xee);
        assert_eq!(irqs(&d), 0);
        cmd(&mut d, 0x60);
        out(&mut d, 0x65);
        assert_eq!(irqs(&d), 1);
        assert_eq!(drain(&mut d), vec![0xee]);

        // Keyboard interface disabled: no interrupt until it is enabled again.
        cmd(&mut d, 0xad);
        out(&mut d, 0xee);
        assert_eq!(irqs(&d), 0);
        cmd(&mut d, 0xae);
        assert_eq!(irqs(&d), 1);
        assert_eq!(drain(&mut d), vec![0xee]);
        assert_eq!(irqs(&d), 0);
    }

    #[test]
    fn ctrl_alt_del_set1_when_translating() {
        let (mut d, _rx) = dev();
        d.send_ctrl_alt_del();
        assert_eq!(irqs(&d), 1);
        assert_eq!(
            drain(&mut d),
            vec![0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
        assert_eq!(irqs(&d), 7, "one per byte");
    }

    #[test]
    fn ctrl_alt_del_set2_without_translation() {
        let (mut d, _rx) = dev();
        cmd(&mut d, 0x60);
        out(&mut d, 0x01);
        d.send_ctrl_alt_del();
        assert_eq!(
            drain(&mut d),
            vec![0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
        assert_eq!(irqs(&d), 11);
        // Set 3 when the guest chose it.
        out(&mut d, 0xf0);
        out(&mut d, 0x03);
        drain(&mut d);
        d.send_ctrl_alt_del();
        assert_eq!(
            drain(&mut d),
            vec![0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11]
        );
    }

    #[test]
    fn ctrl_alt_del_not_while_scanning_disabled_or_full() {
        let (mut d, _rx) = dev();
        out(&mut d, 0xf5);
        drain(&mut d);
        d.send_ctrl_alt_del();
        assert_eq!(drain(&mut d), Vec::<u8>::new());
        out(&mut d, 0xf4);
        drain(&mut d);
        // Not room for all 8 bytes: none queued.
        for _ in 0..3 {
            out(&mut d, 0xf2);
        }
        d.send_ctrl_alt_del();
        assert_eq!(drain(&mut d).len(), 9);
        assert_eq!(d.dropped(), 8);
        d.send_ctrl_alt_del();
        assert_eq!(drain(&mut d).len(), 8);
    }

    #[test]
    fn reset_by_pulse() {
        let (mut d, rx) = dev();
        cmd(&mut d, 0xfe);
        assert_eq!(rx.try_recv().unwrap(), ExitReason::Reset("i8042"));
    }

    #[test]
    fn reset_by_output_port() {
        let (mut d, rx) = dev();
        cmd(&mut d, 0xd1);
        out(&mut d, 0x03); // reset line high: nothing happens
        assert!(rx.try_recv().is_err());
        cmd(&mut d, 0xd0);
        assert_eq!(drain(&mut d), vec![0x03]);
        cmd(&mut d, 0xd1);
        out(&mut d, 0x02);
        assert_eq!(rx.try_recv().unwrap(), ExitReason::Reset("i8042"));
    }

    /// What Linux's i8042 and atkbd drivers do at boot.
    #[test]
    fn linux_probe() {
        let (mut d, rx) = dev();
        // i8042_flush, self-test.
        assert_eq!(drain(&mut d), Vec::<u8>::new());
        cmd(&mut d, 0xaa);
        assert_eq!(drain(&mut d), vec![0x55]);
        // Read the CTR twice until stable.
        cmd(&mut d, 0x20);
        let ctr0 = drain(&mut d);
        cmd(&mut d, 0x20);
        assert_eq!(drain(&mut d), ctr0);
        let ctr = ctr0[0];
        assert_ne!(
            ctr & CTR_XLAT,
            0,
            "Linux keeps translation only if the BIOS set it"
        );
        assert_ne!(status(&mut d) & SR_UNLOCKED, 0);
        // Keyboard disabled, its interrupt off, translation kept.
        let ctr = (ctr | CTR_KBD_DIS) & !CTR_KBD_INT;
        cmd(&mut d, 0x60);
        out(&mut d, ctr);
        assert_eq!(drain(&mut d), Vec::<u8>::new());
        cmd(&mut d, 0x20);
        assert_eq!(drain(&mut d), vec![ctr]);
        // Keyboard port test, then enable the port with its interrupt.
        cmd(&mut d, 0xab);
        assert_eq!(drain(&mut d), vec![0x00]);
        let ctr = (ctr & !CTR_KBD_DIS) | CTR_KBD_INT;
        cmd(&mut d, 0x60);
        out(&mut d, ctr);
        irqs(&d);
        // atkbd: disable scanning, identify, reset, set LEDs, typematic, enable.
        let mut got = Vec::new();
        for c in [0xf5, 0xf2, 0xff, 0xed, 0x00, 0xf3, 0x00, 0xf4] {
            out(&mut d, c);
            got.extend(drain(&mut d));
        }
        assert_eq!(
            got,
            vec![0xfa, 0xfa, 0xab, 0x83, 0xfa, 0xaa, 0xfa, 0xfa, 0xfa, 0xfa, 0xfa]
        );
        assert_eq!(irqs(&d), got.len() as u64, "an IRQ for every byte");
        assert!(rx.try_recv().is_err());
        d.send_ctrl_alt_del();
        assert_eq!(
            drain(&mut d),
            vec![0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
    }
}
