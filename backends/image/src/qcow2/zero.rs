//! Discard and write-zeroes: zero flags and deallocation of whole clusters,
//! written zeros for partial ones.

use super::tables::{Mapping, COPIED, ZERO};
use super::Qcow2Image;
use crate::{file, ImageError};

impl Qcow2Image {
    /// Makes `[offset, offset + len)` read as zeros; with `unmap`, whole
    /// clusters are deallocated.
    pub(crate) fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<(), ImageError> {
        let cs = self.geo.cluster_size;
        let zeros = vec![0u8; cs.min(len) as usize];
        self.for_each_cluster(offset, len, |vcl, in_off, _, n| {
            if n as u64 == cs {
                self.zero_cluster(vcl, unmap, &zeros)
            } else {
                let mapping = {
                    let mut m = self.lock();
                    self.lookup(&mut m, vcl)?
                };
                let reads_zero = matches!(mapping, Mapping::Zero { .. })
                    || (mapping == Mapping::Unallocated && self.backing.is_none());
                if reads_zero {
                    Ok(())
                } else {
                    self.write_cluster_piece(vcl, in_off, &zeros[..n])
                }
            }
        })
    }

    fn zero_cluster(&self, vcl: u64, unmap: bool, zeros: &[u8]) -> Result<(), ImageError> {
        let v3 = self.version >= 3;
        let mut m = self.lock();
        match self.lookup(&mut m, vcl)? {
            Mapping::Zero { .. } => Ok(()),
            Mapping::Unallocated if self.backing.is_none() => Ok(()),
            Mapping::Unallocated if v3 => self.set_l2_entry(&mut m, vcl, ZERO),
            Mapping::Unallocated => {
                drop(m);
                self.write_cluster_piece(vcl, 0, zeros)
            }
            Mapping::Compressed => Err(ImageError::Unsupported(format!(
                "guest cluster {vcl} is compressed (compressed qcow2 is not supported)"
            ))),
            Mapping::Data { copied: false, .. } => Err(ImageError::Unsupported(format!(
                "guest cluster {vcl} is shared with a snapshot (refcount > 1)"
            ))),
            Mapping::Data { host, copied: true } => {
                if v3 && unmap {
                    // L2 first, then the refcount: a crash leaks at worst.
                    self.set_l2_entry(&mut m, vcl, ZERO)?;
                    self.free_cluster(&mut m, host)
                } else if v3 {
                    self.set_l2_entry(&mut m, vcl, host | COPIED | ZERO)
                } else if unmap && self.backing.is_none() {
                    self.set_l2_entry(&mut m, vcl, 0)?;
                    self.free_cluster(&mut m, host)
                } else {
                    drop(m);
                    file::write_all(&self.meta_file, zeros, host)
                }
            }
        }
    }
}
