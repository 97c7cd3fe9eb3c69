//! Creating empty qcow2 v3 images.

use std::fs::OpenOptions;
use std::path::Path;

use super::header::{NewHeader, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::MAX_L1_BYTES;
use crate::{file, Format, ImageError};

/// Creates a new (the file must not exist) qcow2 v3 image of `size` bytes with
/// clusters of `1 << cluster_bits` bytes (9..=21), optionally on top of a
/// backing file, stored as given (a relative path is taken relative to the
/// new image's directory when opened).
///
/// Layout: header, refcount table, refcount blocks, L1 table.
pub fn create_qcow2(
    path: &Path,
    size: u64,
    cluster_bits: u32,
    backing: Option<(&Path, Format)>,
) -> Result<(), ImageError> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(ImageError::Unsupported(format!(
            "cluster_bits {cluster_bits} (cluster sizes 512 B to 2 MiB are supported)"
        )));
    }
    let cs = 1u64 << cluster_bits;
    let per_l2 = cs * (cs / 8);
    let l1_size = size.div_ceil(per_l2);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(ImageError::Unsupported(format!(
            "virtual size {size} is too large for {cs}-byte clusters"
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let rb_entries = cs / 2;
    let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + rb_count + l1_clusters;
        let need_rb = total.div_ceil(rb_entries);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb <= rb_count && need_rt <= rt_clusters {
            break;
        }
        rb_count = rb_count.max(need_rb);
        rt_clusters = rt_clusters.max(need_rt);
    }
    let total = 1 + rt_clusters + rb_count + l1_clusters;
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + rb_count * cs;

    let backing_name = match backing {
        None => None,
        Some((p, fmt)) => {
            let s = p.to_str().ok_or_else(|| {
                ImageError::Unsupported(format!("backing path {} is not UTF-8", p.display()))
            })?;
            Some((s, fmt.as_str()))
        }
    };
    let hdr = NewHeader {
        cluster_bits,
        size,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt_clusters as u32,
        backing: backing_name,
    }
    .to_cluster()?;

    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for i in 0..rb_count {
        let e = (rb_off + i * cs).to_be_bytes();
        rt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e);
    }
    let mut rbs = vec![0u8; (rb_count * cs) as usize];
    for c in 0..total {
        rbs[(c * 2) as usize..(c * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
    }

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|err| ImageError::Open {
            path: path.to_path_buf(),
            err,
        })?;
    file::write_all(&f, &hdr, 0)?;
    file::write_all(&f, &rt, rt_off)?;
    file::write_all(&f, &rbs, rb_off)?;
    f.set_len(total * cs).map_err(|err| ImageError::Io {
        op: "set_len",
        offset: total * cs,
        err,
    })?;
    f.sync_all().map_err(|err| ImageError::Io {
        op: "fsync",
        offset: 0,
        err,
    })?;
    Ok(())
}
