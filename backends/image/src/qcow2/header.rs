//! The qcow2 header and its extensions (big-endian on disk).

use crate::ImageError;

/// "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Header extension: backing file format name.
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Length of the v2 header, where extensions start.
pub(crate) const V2_HEADER_LEN: usize = 72;
/// Length of the v3 header we write (with compression type and padding).
pub(crate) const V3_HEADER_LEN: usize = 112;
/// Offset of refcount_table_offset (u64) followed by refcount_table_clusters (u32).
pub(crate) const OFF_REFCOUNT_TABLE: u64 = 48;
/// Offset of the autoclear feature bits (v3).
pub(crate) const OFF_AUTOCLEAR: u64 = 88;

/// Incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Smallest and largest supported cluster_bits (512 B .. 2 MiB).
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;

/// The fields of a parsed header that the image code uses.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub autoclear: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

pub(crate) fn be16(b: &[u8], o: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[o..o + 2]);
    u16::from_be_bytes(a)
}

pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

fn corrupt(s: impl Into<String>) -> ImageError {
    ImageError::Corrupt(s.into())
}

fn unsupported(s: impl Into<String>) -> ImageError {
    ImageError::Unsupported(s.into())
}

/// Parses the header from the first bytes of the file (`buf` holds up to the
/// first 2 MiB, or the whole file if shorter).
pub(crate) fn parse(buf: &[u8]) -> Result<Header, ImageError> {
    if buf.len() < 4 || buf[0..4] != MAGIC {
        return Err(corrupt("bad magic: not a qcow2 image"));
    }
    if buf.len() < V2_HEADER_LEN {
        return Err(corrupt(format!(
            "truncated header: file is only {} bytes",
            buf.len()
        )));
    }
    let version = be32(buf, 4);
    if version != 2 && version != 3 {
        return Err(unsupported(format!(
            "qcow2 version {version} (only 2 and 3 are supported)"
        )));
    }
    let backing_file_offset = be64(buf, 8);
    let backing_file_size = be32(buf, 16);
    let cluster_bits = be32(buf, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(unsupported(format!(
            "cluster_bits {cluster_bits} (cluster sizes 512 B to 2 MiB are supported)"
        )));
    }
    let cluster_size = 1usize << cluster_bits;
    let crypt_method = be32(buf, 32);
    if crypt_method != 0 {
        return Err(unsupported(format!(
            "encrypted image (crypt_method {crypt_method})"
        )));
    }
    let mut h = Header {
        version,
        cluster_bits,
        size: be64(buf, 24),
        l1_size: be32(buf, 36),
        l1_table_offset: be64(buf, 40),
        refcount_table_offset: be64(buf, 48),
        refcount_table_clusters: be32(buf, 56),
        nb_snapshots: be32(buf, 60),
        autoclear: 0,
        backing_file: None,
        backing_format: None,
    };
    let mut header_len = V2_HEADER_LEN;
    if version == 3 {
        if buf.len() < 104 {
            return Err(corrupt(format!(
                "truncated v3 header: file is only {} bytes",
                buf.len()
            )));
        }
        check_incompatible(be64(buf, 72))?;
        h.autoclear = be64(buf, 88);
        let refcount_order = be32(buf, 96);
        if refcount_order != 4 {
            return Err(unsupported(format!(
                "refcount_order {refcount_order} (only 16-bit refcounts, order 4, are supported)"
            )));
        }
        header_len = be32(buf, 100) as usize;
        if header_len < 104 || header_len > cluster_size || header_len > buf.len() {
            return Err(corrupt(format!("invalid header_length {header_len}")));
        }
    }
    // Header extensions: from the end of the header to the end of the first
    // cluster (or to the backing file name, which follows them).
    let mut limit = cluster_size.min(buf.len());
    if backing_file_offset != 0 && (backing_file_offset as usize) < limit {
        limit = backing_file_offset as usize;
    }
    let mut off = header_len.next_multiple_of(8);
    while off + 8 <= limit {
        let typ = be32(buf, off);
        let len = be32(buf, off + 4) as usize;
        if typ == 0 {
            break;
        }
        let data_end = off + 8 + len;
        if data_end > limit {
            return Err(corrupt(format!(
                "header extension {typ:#x} at {off} overruns the header cluster"
            )));
        }
        if typ == EXT_BACKING_FORMAT {
            let name = std::str::from_utf8(&buf[off + 8..data_end])
                .map_err(|_| corrupt("backing format name is not UTF-8"))?;
            h.backing_format = Some(name.to_string());
        }
        off = (off + 8 + len.next_multiple_of(8)).min(limit);
    }
    if backing_file_offset != 0 {
        let start = backing_file_offset as usize;
        let len = backing_file_size as usize;
        if len == 0 || len > 1023 {
            return Err(corrupt(format!("backing file name length {len}")));
        }
        if backing_file_offset > cluster_size as u64 || start + len > cluster_size.min(buf.len()) {
            return Err(corrupt("backing file name lies outside the header cluster"));
        }
        let name = std::str::from_utf8(&buf[start..start + len])
            .map_err(|_| unsupported("backing file name is not UTF-8"))?;
        h.backing_file = Some(name.to_string());
    }
    Ok(h)
}

fn check_incompatible(bits: u64) -> Result<(), ImageError> {
    if bits & INCOMPAT_DIRTY != 0 {
        return Err(unsupported(
            "the dirty bit is set (refcounts need repair: run `qemu-img check -r all`)",
        ));
    }
    if bits & INCOMPAT_CORRUPT != 0 {
        return Err(unsupported(
            "the corrupt bit is set (run `qemu-img check -r all`)",
        ));
    }
    if bits & INCOMPAT_DATA_FILE != 0 {
        return Err(unsupported("external data files are not supported"));
    }
    if bits & INCOMPAT_COMPRESSION != 0 {
        return Err(unsupported(
            "a non-default compression type is not supported",
        ));
    }
    if bits & INCOMPAT_EXTL2 != 0 {
        return Err(unsupported(
            "extended L2 entries (subclusters) are not supported",
        ));
    }
    if bits != 0 {
        return Err(unsupported(format!(
            "unknown incompatible feature bits {bits:#x}"
        )));
    }
    Ok(())
}

/// Builds the first cluster of a new v3 image.
pub(crate) struct NewHeader<'a> {
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub backing: Option<(&'a str, &'a str)>,
}

impl NewHeader<'_> {
    /// Serializes into one cluster-sized buffer.
    pub(crate) fn to_cluster(&self) -> Result<Vec<u8>, ImageError> {
        let cs = 1usize << self.cluster_bits;
        let mut b = vec![0u8; cs];
        fn put32(b: &mut [u8], o: usize, v: u32) {
            b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        }
        b[0..4].copy_from_slice(&MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, self.cluster_bits);
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        put32(&mut b, 36, self.l1_size);
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, V3_HEADER_LEN as u32);
        let mut off = V3_HEADER_LEN;
        if let Some((name, fmt)) = self.backing {
            if name.is_empty() || name.len() > 1023 {
                return Err(unsupported(format!(
                    "backing file name of {} bytes",
                    name.len()
                )));
            }
            let need = off + 8 + fmt.len().next_multiple_of(8) + 8 + name.len();
            if need > cs {
                return Err(unsupported(
                    "backing file name does not fit in the header cluster",
                ));
            }
            put32(&mut b, off, EXT_BACKING_FORMAT);
            put32(&mut b, off + 4, fmt.len() as u32);
            b[off + 8..off + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
            off += 8 + fmt.len().next_multiple_of(8);
            off += 8; // end-of-extensions marker (zeros)
            b[8..16].copy_from_slice(&(off as u64).to_be_bytes());
            put32(&mut b, 16, name.len() as u32);
            b[off..off + name.len()].copy_from_slice(name.as_bytes());
        }
        Ok(b)
    }
}
