//! Ports a guest writes to without expecting anything back: the POST code
//! port 0x80 (Linux uses it as an I/O delay). Claiming them keeps such writes
//! off the "unhandled port" path.

use super::bus::BusDevice;

/// Ignores writes; reads as zero.
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
