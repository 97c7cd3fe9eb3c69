//! Guest buffers as byte streams: virtio-scsi lays a request out as one
//! device-readable stream (header, then data-out) and one device-writable
//! stream (response, then data-in), each possibly scattered over many
//! descriptors. These helpers read and write such streams, and implement
//! [`DataIn`]/[`DataOut`] over them with zero-copy image I/O.

use tern_image::DiskImage;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::lun::{DataError, DataIn, DataOut};

/// A guest buffer: `len` bytes at `addr`, checked to lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0 once in a stream).
    pub len: u32,
}

/// Total length of a stream.
pub fn stream_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Split a stream after `n` bytes; `None` if it is shorter than `n`.
pub fn split_stream(segs: &[Segment], n: u64) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = n;
    for s in segs {
        let len = u64::from(s.len);
        if left >= len {
            head.push(*s);
            left -= len;
        } else if left > 0 {
            // `left < len <= u32::MAX`, and the segment was checked to lie in
            // guest memory, so neither the cast nor the addition overflows.
            head.push(Segment {
                addr: s.addr,
                len: left as u32,
            });
            tail.push(Segment {
                addr: s.addr.unchecked_add(left),
                len: s.len - left as u32,
            });
            left = 0;
        } else {
            tail.push(*s);
        }
    }
    (left == 0).then_some((head, tail))
}

/// Walk the pieces of `segs` covering `[offset, offset + len)`, calling `f`
/// with each piece's guest address, length and position in the range.
fn for_each_piece(
    segs: &[Segment],
    offset: u64,
    len: u64,
    mut f: impl FnMut(GuestAddress, usize, u64) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut skip = offset;
    let mut done = 0u64;
    for s in segs {
        if done == len {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let n = (slen - skip).min(len - done);
        f(s.addr.unchecked_add(skip), n as usize, done)?;
        skip = 0;
        done += n;
    }
    if done == len {
        Ok(())
    } else {
        Err(DataError::GuestMemory(0))
    }
}

/// Read `buf.len()` bytes of a stream from `offset`.
pub fn read_stream<G: GuestMemory + ?Sized>(
    mem: &G,
    segs: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), DataError> {
    for_each_piece(segs, offset, buf.len() as u64, |addr, n, at| {
        let at = at as usize;
        mem.read_slice(&mut buf[at..at + n], addr)
            .map_err(|_| DataError::GuestMemory(addr.0))
    })
}

/// Write `data` into a stream at `offset` (marking the pages dirty).
pub fn write_stream<G: GuestMemory + ?Sized>(
    mem: &G,
    segs: &[Segment],
    offset: u64,
    data: &[u8],
) -> Result<(), DataError> {
    for_each_piece(segs, offset, data.len() as u64, |addr, n, at| {
        let at = at as usize;
        mem.write_slice(&data[at..at + n], addr)
            .map_err(|_| DataError::GuestMemory(addr.0))
    })
}

/// The data-in stream of a request.
pub struct GuestIn<'a, G: ?Sized> {
    mem: &'a G,
    segs: &'a [Segment],
    len: u64,
    pos: u64,
}

impl<'a, G: GuestMemory + ?Sized> GuestIn<'a, G> {
    /// Data-in over `segs` of `mem`.
    pub fn new(mem: &'a G, segs: &'a [Segment]) -> Self {
        GuestIn {
            mem,
            segs,
            len: stream_len(segs),
            pos: 0,
        }
    }
}

impl<G: GuestMemory + ?Sized> DataIn for GuestIn<'_, G> {
    fn len(&self) -> u64 {
        self.len
    }

    fn written(&self) -> u64 {
        self.pos
    }

    fn put(&mut self, data: &[u8]) -> Result<u64, DataError> {
        let n = (self.len - self.pos).min(data.len() as u64);
        write_stream(self.mem, self.segs, self.pos, &data[..n as usize])?;
        self.pos += n;
        Ok(n)
    }

    fn put_from_image(
        &mut self,
        image: &dyn DiskImage,
        offset: u64,
        len: u64,
    ) -> Result<(), DataError> {
        if len > self.len - self.pos {
            return Err(DataError::GuestMemory(0));
        }
        let mem = self.mem;
        for_each_piece(self.segs, self.pos, len, |addr, n, at| {
            let gone = || DataError::GuestMemory(addr.0);
            let mut pos = offset + at;
            for slice in mem
                .get_slices(addr, n, Permissions::Write)
                .map_err(|_| gone())?
            {
                let slice = slice.map_err(|_| gone())?;
                let guard = slice.ptr_guard_mut();
                // SAFETY: `guard` points to `slice.len()` bytes of mapped
                // guest memory that stay mapped while `mem` and the guard
                // live; `u8` has no invalid values. The guest gave this
                // buffer to the device and does not look at it until the
                // request completes (if it does, it only garbles its own data).
                let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
                image.read_at(buf, pos)?;
                // The store bypassed VolatileSlice: log it for migration ourselves.
                slice.bitmap().mark_dirty(0, slice.len());
                pos += slice.len() as u64;
            }
            Ok(())
        })?;
        self.pos += len;
        Ok(())
    }
}

/// The data-out stream of a request.
pub struct GuestOut<'a, G: ?Sized> {
    mem: &'a G,
    segs: &'a [Segment],
    len: u64,
}

impl<'a, G: GuestMemory + ?Sized> GuestOut<'a, G> {
    /// Data-out over `segs` of `mem`.
    pub fn new(mem: &'a G, segs: &'a [Segment]) -> Self {
        GuestOut {
            mem,
            segs,
            len: stream_len(segs),
        }
    }
}

impl<G: GuestMemory + ?Sized> DataOut for GuestOut<'_, G> {
    fn len(&self) -> u64 {
        self.len
    }

    fn get(&self, offset: u64, buf: &mut [u8]) -> Result<(), DataError> {
        read_stream(self.mem, self.segs, offset, buf)
    }

    fn to_image(&self, image: &dyn DiskImage, offset: u64, len: u64) -> Result<(), DataError> {
        let mem = self.mem;
        for_each_piece(self.segs, 0, len, |addr, n, at| {
            let gone = || DataError::GuestMemory(addr.0);
            let mut pos = offset + at;
            for slice in mem
                .get_slices(addr, n, Permissions::Read)
                .map_err(|_| gone())?
            {
                let slice = slice.map_err(|_| gone())?;
                let guard = slice.ptr_guard();
                // SAFETY: `guard` points to `slice.len()` bytes of mapped
                // guest memory that stay mapped while `mem` and the guard
                // live; `u8` has no invalid values. A guest changing a buffer
                // it submitted only changes what lands on its own disk.
                let buf = unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) };
                image.write_at(buf, pos)?;
                pos += slice.len() as u64;
            }
            Ok(())
        })
    }
}
