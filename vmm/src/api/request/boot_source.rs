//! `PUT /boot-source`: kernel, initrd, command line.

use std::fs::File;
use std::path::Path;

use crate::api::{parse_body, ApiError};
use crate::config::BootSource;

fn readable(field: &str, path: &Path) -> Result<(), ApiError> {
    let bad = |why: String| {
        ApiError::bad_request(format!("boot-source: {field} {}: {why}", path.display()))
    };
    let file = File::open(path).map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    Ok(())
}

/// Parses the body of `PUT /boot-source`; the files must be readable now,
/// so a typo fails here rather than at `InstanceStart`.
pub fn parse(body: &[u8]) -> Result<BootSource, ApiError> {
    let b: BootSource = parse_body("boot-source", body)?;
    readable("kernel_image_path", &b.kernel_image_path)?;
    if let Some(initrd) = &b.initrd_path {
        readable("initrd_path", initrd)?;
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_the_files() {
        let ok = parse(br#"{"kernel_image_path":"/proc/self/exe","boot_args":"x"}"#).unwrap();
        assert!(parse(br#"["/proc/self/exe"]"#)
            .unwrap_err()
            .message
            .contains("JSON object"));
        assert_eq!(ok.boot_args.as_deref(), Some("x"));
        let e = parse(br#"{"kernel_image_path":"/"}"#).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{e}");
        let e = parse(br#"{"kernel_image_path":"/nonexistent"}"#).unwrap_err();
        assert!(e.message.contains("kernel_image_path /nonexistent"), "{e}");
        let e =
            parse(br#"{"kernel_image_path":"/proc/self/exe","initrd_path":"/nope"}"#).unwrap_err();
        assert!(e.message.contains("initrd_path /nope"), "{e}");
        assert!(parse(br#"{"boot_args":"x"}"#)
            .unwrap_err()
            .message
            .contains("kernel_image_path"));
    }
}
