//! Guest reads and writes, split per cluster, and the [`DiskImage`] impl.

use super::tables::{Mapping, COPIED};
use super::Qcow2Image;
use crate::{check_range, file, DiskImage, ImageError};

impl Qcow2Image {
    /// Calls `f(guest_cluster, offset_in_cluster, start_in_request, len)` for
    /// each cluster-sized piece of `[offset, offset + len)`.
    pub(crate) fn for_each_cluster(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, usize, usize) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let cs = self.geo.cluster_size;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(len - done);
            f(
                pos >> self.geo.cluster_bits,
                in_off,
                done as usize,
                n as usize,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Fills `buf` with guest data at `pos` as seen below this image.
    pub(crate) fn read_backing(&self, buf: &mut [u8], pos: u64) -> Result<(), ImageError> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(pos).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], pos)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn read_cluster_piece(&self, vcl: u64, in_off: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let mapping = {
            let mut m = self.lock();
            self.lookup(&mut m, vcl)?
        };
        match mapping {
            Mapping::Data { host, .. } => file::read_or_zero(&self.data_file, buf, host + in_off),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.read_backing(buf, (vcl << self.geo.cluster_bits) + in_off),
            Mapping::Compressed => Err(ImageError::Unsupported(format!(
                "guest offset {:#x} is in a compressed cluster (compressed qcow2 is not supported)",
                (vcl << self.geo.cluster_bits) + in_off
            ))),
        }
    }

    /// Writes `data` into guest cluster `vcl` at `in_off`, allocating (with
    /// copy-on-write of the rest of the cluster) if needed.
    pub(crate) fn write_cluster_piece(
        &self,
        vcl: u64,
        in_off: u64,
        data: &[u8],
    ) -> Result<(), ImageError> {
        let cs = self.geo.cluster_size as usize;
        let full = in_off == 0 && data.len() == cs;
        let mut m = self.lock();
        let mapping = self.lookup(&mut m, vcl)?;
        let shared = || {
            ImageError::Unsupported(format!(
                "guest cluster {vcl} is shared with a snapshot (refcount > 1); writing it is not supported"
            ))
        };
        match mapping {
            Mapping::Data { host, copied: true } => {
                drop(m);
                file::write_all(&self.data_file, data, host + in_off)
            }
            Mapping::Data { copied: false, .. } => Err(shared()),
            Mapping::Zero { host, copied } if host != 0 => {
                if !copied {
                    return Err(shared());
                }
                // Preallocated zero cluster: fill it, then clear the flag.
                self.write_new_cluster(host, in_off, data, full, |b| {
                    b.fill(0);
                    Ok(())
                })?;
                self.set_l2_entry(&mut m, vcl, host | COPIED)
            }
            Mapping::Compressed => Err(ImageError::Unsupported(format!(
                "guest cluster {vcl} is compressed (compressed qcow2 is not supported)"
            ))),
            Mapping::Zero { .. } | Mapping::Unallocated => {
                let host = self.alloc_cluster(&mut m)?;
                let from_zero = matches!(mapping, Mapping::Zero { .. });
                let base = vcl << self.geo.cluster_bits;
                self.write_new_cluster(host, in_off, data, full, |b| {
                    if from_zero {
                        b.fill(0);
                        Ok(())
                    } else {
                        self.read_backing(b, base)
                    }
                })?;
                self.set_l2_entry(&mut m, vcl, host | COPIED)
            }
        }
    }

    /// Writes a whole cluster at `host`: `data` at `in_off` over the content
    /// `fill` produces for the rest.
    fn write_new_cluster(
        &self,
        host: u64,
        in_off: u64,
        data: &[u8],
        full: bool,
        fill: impl FnOnce(&mut [u8]) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        if full {
            return file::write_all(&self.meta_file, data, host);
        }
        let mut buf = vec![0u8; self.geo.cluster_size as usize];
        fill(&mut buf)?;
        let start = in_off as usize;
        buf[start..start + data.len()].copy_from_slice(data);
        file::write_all(&self.meta_file, &buf, host)
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.for_each_cluster(offset, buf.len() as u64, |vcl, in_off, start, n| {
            self.read_cluster_piece(vcl, in_off, &mut buf[start..start + n])
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.check_write(offset, buf.len() as u64)?;
        self.for_each_cluster(offset, buf.len() as u64, |vcl, in_off, start, n| {
            self.write_cluster_piece(vcl, in_off, &buf[start..start + n])
        })
    }

    fn flush(&self) -> Result<(), ImageError> {
        // Metadata is written through; one fdatasync covers data and metadata.
        file::sync_data(&self.meta_file)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len, may_unmap)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
