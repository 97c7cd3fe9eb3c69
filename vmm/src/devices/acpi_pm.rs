//! The ACPI PM register block of the ICH9 (PM1a event and control, PM
//! timer, GPE0), at `layout::ACPI_PM_BASE`. Writing SLP_EN with the S5 sleep
//! type powers the machine off, which ends tern.

use std::time::Instant;

use super::bus::BusDevice;
use crate::exit::{ExitReason, ExitSender};
use crate::machine::layout::{
    ACPI_GPE0_BLK, ACPI_GPE0_BLK_LEN, ACPI_PM1A_CNT, ACPI_PM1A_EVT, ACPI_PM_BASE, ACPI_PM_TMR,
    ACPI_S5_SLP_TYP,
};

const PM1_STS: u64 = (ACPI_PM1A_EVT - ACPI_PM_BASE) as u64;
const PM1_EN: u64 = PM1_STS + 2;
const PM1_CNT: u64 = (ACPI_PM1A_CNT - ACPI_PM_BASE) as u64;
const PM_TMR: u64 = (ACPI_PM_TMR - ACPI_PM_BASE) as u64;
const GPE0: u64 = (ACPI_GPE0_BLK - ACPI_PM_BASE) as u64;
const GPE0_HALF: u64 = (ACPI_GPE0_BLK_LEN / 2) as u64;

/// SCI_EN: the machine is in ACPI mode. With SMI_CMD = 0 in the FADT it
/// always is, so the bit reads as set.
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;

/// The PM timer runs at 3.579545 MHz.
const PM_TIMER_HZ: u128 = 3_579_545;

/// The PM block's saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmSnapshot {
    /// PM1 status.
    pub pm1_sts: u16,
    /// PM1 enable.
    pub pm1_en: u16,
    /// PM1 control.
    pub pm1_cnt: u16,
    /// GPE0 status bytes.
    pub gpe0_sts: Vec<u8>,
    /// GPE0 enable bytes.
    pub gpe0_en: Vec<u8>,
    /// Nanoseconds the PM timer had counted.
    pub timer_ns: u64,
}

/// The PM register block.
pub struct AcpiPm {
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    gpe0_sts: [u8; GPE0_HALF as usize],
    gpe0_en: [u8; GPE0_HALF as usize],
    start: Instant,
    exit: ExitSender,
    /// The SCI (an irqfd on ISA IRQ 9), raised when an enabled GPE fires.
    sci: Option<vmm_sys_util::eventfd::EventFd>,
}

impl AcpiPm {
    /// A PM block reporting power-off through `exit`.
    pub fn new(exit: ExitSender) -> Self {
        Self {
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: SCI_EN,
            gpe0_sts: [0; GPE0_HALF as usize],
            gpe0_en: [0; GPE0_HALF as usize],
            start: Instant::now(),
            exit,
            sci: None,
        }
    }

    /// Wires the SCI.
    pub fn set_sci(&mut self, sci: vmm_sys_util::eventfd::EventFd) {
        self.sci = Some(sci);
    }

    /// Sets general-purpose event `bit`'s status and, if the OS enabled
    /// it, raises the SCI.
    pub fn raise_gpe(&mut self, bit: u8) {
        let (byte, mask) = (usize::from(bit / 8), 1u8 << (bit % 8));
        if let Some(s) = self.gpe0_sts.get_mut(byte) {
            *s |= mask;
        }
        self.signal_sci();
    }

    /// Raises the SCI if any enabled GPE is pending.
    fn signal_sci(&self) {
        let pending = self
            .gpe0_sts
            .iter()
            .zip(&self.gpe0_en)
            .any(|(s, e)| s & e != 0);
        if pending {
            if let Some(sci) = &self.sci {
                let _ = sci.write(1);
            }
        }
    }

    /// The PM registers and the timer's age, for a snapshot.
    pub fn save(&self) -> AcpiPmSnapshot {
        AcpiPmSnapshot {
            pm1_sts: self.pm1_sts,
            pm1_en: self.pm1_en,
            pm1_cnt: self.pm1_cnt,
            gpe0_sts: self.gpe0_sts.to_vec(),
            gpe0_en: self.gpe0_en.to_vec(),
            timer_ns: self.start.elapsed().as_nanos() as u64,
        }
    }

    /// Puts the registers back; the PM timer continues from its saved count.
    pub fn restore(&mut self, snap: &AcpiPmSnapshot) {
        self.pm1_sts = snap.pm1_sts;
        self.pm1_en = snap.pm1_en;
        self.pm1_cnt = snap.pm1_cnt | SCI_EN;
        for (dst, src) in [
            (&mut self.gpe0_sts, &snap.gpe0_sts),
            (&mut self.gpe0_en, &snap.gpe0_en),
        ] {
            let n = dst.len().min(src.len());
            dst[..n].copy_from_slice(&src[..n]);
        }
        let now = Instant::now();
        self.start = now
            .checked_sub(std::time::Duration::from_nanos(snap.timer_ns))
            .unwrap_or(now);
    }

    fn timer(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        (ticks & 0xff_ffff) as u32
    }

    fn read_byte(&self, offset: u64) -> u8 {
        let half = |v: u16, hi: bool| if hi { (v >> 8) as u8 } else { v as u8 };
        match offset {
            o if o == PM1_STS || o == PM1_STS + 1 => half(self.pm1_sts, o == PM1_STS + 1),
            o if o == PM1_EN || o == PM1_EN + 1 => half(self.pm1_en, o == PM1_EN + 1),
            o if o == PM1_CNT || o == PM1_CNT + 1 => half(self.pm1_cnt, o == PM1_CNT + 1),
            o if (PM_TMR..PM_TMR + 4).contains(&o) => (self.timer() >> ((o - PM_TMR) * 8)) as u8,
            o if (GPE0..GPE0 + GPE0_HALF).contains(&o) => self.gpe0_sts[(o - GPE0) as usize],
            o if (GPE0 + GPE0_HALF..GPE0 + 2 * GPE0_HALF).contains(&o) => {
                self.gpe0_en[(o - GPE0 - GPE0_HALF) as usize]
            }
            _ => 0,
        }
    }

    fn write_pm1_cnt(&mut self, value: u16) {
        self.pm1_cnt = (value & !SLP_EN) | SCI_EN;
        if value & SLP_EN != 0 {
            let typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            if typ == u16::from(ACPI_S5_SLP_TYP) {
                self.exit.send(ExitReason::PowerOff);
            }
            // Other sleep states are not offered in the DSDT; a guest asking
            // for one anyway keeps running, as on hardware without S3.
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_byte(offset + i as u64);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let word = |d: &[u8]| u16::from_le_bytes([d[0], d.get(1).copied().unwrap_or(0)]);
        match offset {
            // Status bits are write-one-to-clear.
            PM1_STS if !data.is_empty() => self.pm1_sts &= !word(data),
            PM1_EN if !data.is_empty() => self.pm1_en = word(data),
            PM1_CNT if !data.is_empty() => {
                let v = if data.len() == 1 {
                    (self.pm1_cnt & 0xff00) | u16::from(data[0])
                } else {
                    word(data)
                };
                self.write_pm1_cnt(v);
            }
            o if o == PM1_CNT + 1 && data.len() == 1 => {
                self.write_pm1_cnt((self.pm1_cnt & 0x00ff) | (u16::from(data[0]) << 8));
            }
            o if (GPE0..GPE0 + 2 * GPE0_HALF).contains(&o) => {
                for (i, &b) in data.iter().enumerate() {
                    let at = o - GPE0 + i as u64;
                    if at < GPE0_HALF {
                        self.gpe0_sts[at as usize] &= !b;
                    } else if at < 2 * GPE0_HALF {
                        self.gpe0_en[(at - GPE0_HALF) as usize] = b;
                    }
                }
                // An event that was waiting for its enable bit fires now.
                self.signal_sci();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::exit_channel;

    #[test]
    fn s5_powers_off_and_other_states_do_not() {
        let (tx, rx) = exit_channel().unwrap();
        let mut pm = AcpiPm::new(tx);
        let s3 = (3u16 << SLP_TYP_SHIFT) | SLP_EN;
        pm.write(PM1_CNT, &s3.to_le_bytes());
        assert!(rx.reasons.try_recv().is_err());
        let s5 = (u16::from(ACPI_S5_SLP_TYP) << SLP_TYP_SHIFT) | SLP_EN;
        pm.write(PM1_CNT, &s5.to_le_bytes());
        assert_eq!(rx.reasons.try_recv().unwrap(), ExitReason::PowerOff);
        let mut b = [0u8; 2];
        pm.read(PM1_CNT, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
    }

    #[test]
    fn pm_timer_advances() {
        let (tx, _rx) = exit_channel().unwrap();
        let mut pm = AcpiPm::new(tx);
        let mut a = [0u8; 4];
        pm.read(PM_TMR, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut b = [0u8; 4];
        pm.read(PM_TMR, &mut b);
        assert!(u32::from_le_bytes(b) > u32::from_le_bytes(a));
    }
}
