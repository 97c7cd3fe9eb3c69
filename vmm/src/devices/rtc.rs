//! The CMOS real-time clock at ports 0x70/0x71 (MC146818 style), reading the
//! host's wall clock (UTC). The guest can read the time and the CMOS bytes;
//! writes to the time registers are kept as an offset from the host clock
//! so that `hwclock --systohc` round-trips.

use std::time::{SystemTime, UNIX_EPOCH};

use super::bus::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register B: 24-hour mode.
const B_24H: u8 = 1 << 1;
/// Register B: binary (not BCD) values.
const B_BINARY: u8 = 1 << 2;
/// Register B: SET, the guest is updating the clock.
const B_SET: u8 = 1 << 7;
/// Register D: the CMOS battery is good.
const D_VRT: u8 = 1 << 7;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Converts seconds since the Unix epoch to a UTC date (proleptic
/// Gregorian, the usual days-from-civil arithmetic on 400-year eras).
fn to_datetime(secs: i64) -> DateTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
    let weekday = ((days + 4).rem_euclid(7) + 1) as u8;
    DateTime {
        year,
        month,
        day,
        weekday,
        hour: (rem / 3600) as u8,
        minute: (rem / 60 % 60) as u8,
        second: (rem % 60) as u8,
    }
}

/// Inverse of [`to_datetime`] for the fields the guest can set.
fn from_datetime(t: &DateTime) -> i64 {
    let y = t.year - i64::from(t.month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(t.month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(t.day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + i64::from(t.hour) * 3600 + i64::from(t.minute) * 60 + i64::from(t.second)
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The RTC's saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcSnapshot {
    /// The selected CMOS register.
    pub index: u8,
    /// The 128 CMOS bytes.
    pub cmos: Vec<u8>,
    /// Guest time minus host time, in seconds.
    pub offset: i64,
}

/// The CMOS/RTC device.
pub struct Rtc {
    index: u8,
    cmos: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC showing the host's UTC time, in BCD 24-hour mode.
    pub fn new() -> Self {
        let mut cmos = [0u8; 128];
        cmos[REG_A as usize] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        cmos[REG_B as usize] = B_24H;
        cmos[REG_D as usize] = D_VRT;
        Self {
            index: 0,
            cmos,
            offset: 0,
        }
    }

    /// The CMOS contents and clock offset, for a snapshot.
    pub fn save(&self) -> RtcSnapshot {
        RtcSnapshot {
            index: self.index,
            cmos: self.cmos.to_vec(),
            offset: self.offset,
        }
    }

    /// Puts the CMOS back as saved (the clock keeps the guest's offset
    /// from host time).
    pub fn restore(&mut self, snap: &RtcSnapshot) {
        self.index = snap.index & 0x7f;
        let n = snap.cmos.len().min(self.cmos.len());
        self.cmos[..n].copy_from_slice(&snap.cmos[..n]);
        self.offset = snap.offset;
    }

    fn encode(&self, v: u8) -> u8 {
        if self.cmos[REG_B as usize] & B_BINARY != 0 {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.cmos[REG_B as usize] & B_BINARY != 0 {
            v
        } else {
            (v >> 4) * 10 + (v & 0xf)
        }
    }

    fn now(&self) -> DateTime {
        to_datetime(host_now() + self.offset)
    }

    fn read_reg(&self, reg: u8) -> u8 {
        let t = self.now();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => {
                if self.cmos[REG_B as usize] & B_24H != 0 {
                    self.encode(t.hour)
                } else {
                    let h12 = if t.hour.is_multiple_of(12) {
                        12
                    } else {
                        t.hour % 12
                    };
                    self.encode(h12) | if t.hour >= 12 { 0x80 } else { 0 }
                }
            }
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u8),
            // Update-in-progress never shows: the time is computed on read.
            REG_A => self.cmos[REG_A as usize] & 0x7f,
            REG_C => 0,
            r => self.cmos[usize::from(r & 0x7f)],
        }
    }

    fn write_reg(&mut self, reg: u8, value: u8) {
        let mut t = self.now();
        let v = self.decode(value & 0x7f);
        match reg {
            REG_SECONDS => t.second = v.min(59),
            REG_MINUTES => t.minute = v.min(59),
            REG_HOURS => t.hour = v.min(23),
            REG_DAY => t.day = v.clamp(1, 31),
            REG_MONTH => t.month = v.clamp(1, 12),
            REG_YEAR => t.year = t.year - t.year.rem_euclid(100) + i64::from(self.decode(value)),
            REG_CENTURY => t.year = i64::from(self.decode(value)) * 100 + t.year.rem_euclid(100),
            REG_WEEKDAY => return,
            REG_C | REG_D => return,
            r => {
                self.cmos[usize::from(r & 0x7f)] = value;
                if r == REG_B {
                    self.cmos[REG_B as usize] &= !B_SET;
                }
                return;
            }
        }
        self.offset = from_datetime(&t) - host_now();
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = match offset {
                0 => self.index,
                _ => self.read_reg(self.index),
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; keep only the index.
            0 => self.index = v & 0x7f,
            _ => self.write_reg(self.index, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_conversion_round_trips() {
        // 2026-11-27 09:14:31 UTC, a Friday.
        let t = to_datetime(1_795_770_871);
        assert_eq!((t.year, t.month, t.day), (2026, 11, 27));
        assert_eq!((t.hour, t.minute, t.second), (9, 14, 31));
        assert_eq!(t.weekday, 6);
        assert_eq!(from_datetime(&t), 1_795_770_871);
        let leap = to_datetime(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn reads_bcd_time_and_keeps_guest_writes() {
        let mut rtc = Rtc::new();
        let mut b = [0u8];
        rtc.write(0, &[REG_CENTURY]);
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0x20);
        rtc.write(0, &[REG_YEAR]);
        rtc.write(1, &[0x30]);
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0x30);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0xab);
    }
}
