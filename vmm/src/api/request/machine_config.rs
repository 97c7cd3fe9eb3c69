//! `PUT` and `PATCH /machine-config`.

use serde::Deserialize;

use crate::api::{parse_body, ApiError};
use crate::config::{HugePages, MachineConfig};
use crate::kvm::cpuid::CpuTemplate;

/// The fields of a `PATCH`: any subset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    pub vcpu_count: Option<u32>,
    /// RAM in MiB.
    pub mem_size_mib: Option<u64>,
    /// SMT.
    pub smt: Option<bool>,
    /// CPU template.
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// Huge pages.
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    /// `base` with this update applied.
    pub fn apply(&self, base: &MachineConfig) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(base.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(base.mem_size_mib),
            smt: self.smt.unwrap_or(base.smt),
            cpu_template: self.cpu_template.or(base.cpu_template),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(base.track_dirty_pages),
            huge_pages: self.huge_pages.unwrap_or(base.huge_pages),
        }
    }
}

fn checked(m: MachineConfig) -> Result<MachineConfig, ApiError> {
    m.validate()
        .map_err(|e| ApiError::bad_request(format!("machine-config: {e}")))?;
    Ok(m)
}

/// Parses the body of `PUT /machine-config`: `vcpu_count` and
/// `mem_size_mib` are required, the rest take their defaults.
pub fn parse_put(body: &[u8]) -> Result<MachineConfig, ApiError> {
    checked(parse_body("machine-config", body)?)
}

/// Parses the body of `PATCH /machine-config`.
pub fn parse_patch(body: &[u8]) -> Result<MachineConfigUpdate, ApiError> {
    let u: MachineConfigUpdate = parse_body("machine-config", body)?;
    // Check the ranges of what is given, against the defaults for the rest.
    checked(u.apply(&MachineConfig::default()))?;
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_needs_both_sizes_and_checks_ranges() {
        let m = parse_put(br#"{"vcpu_count":2,"mem_size_mib":256}"#).unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 256));
        assert!(parse_put(br#"{"vcpu_count":2}"#)
            .unwrap_err()
            .message
            .contains("mem_size_mib"));
        assert!(parse_put(br#"{"vcpu_count":0,"mem_size_mib":256}"#)
            .unwrap_err()
            .message
            .contains("vcpu_count 0"));
        assert!(parse_put(br#"{"vcpu_count":1,"mem_size_mib":0}"#)
            .unwrap_err()
            .message
            .contains("mem_size_mib 0"));
        assert!(parse_put(br#"{"vcpu_count":"two","mem_size_mib":256}"#)
            .unwrap_err()
            .message
            .contains("invalid type"));
        assert!(
            parse_put(br#"{"vcpu_count":1,"mem_size_mib":64,"ht":true}"#)
                .unwrap_err()
                .message
                .contains("`ht`")
        );
        assert!(parse_put(br#"{"vcpu_count":1,"mem_size_mib":64,"huge_pages":"1G"}"#).is_err());
    }

    #[test]
    fn patch_changes_only_what_is_given() {
        let u = parse_patch(br#"{"vcpu_count":4}"#).unwrap();
        let m = u.apply(&MachineConfig {
            mem_size_mib: 512,
            ..Default::default()
        });
        assert_eq!((m.vcpu_count, m.mem_size_mib), (4, 512));
        assert!(parse_patch(br#"{"vcpu_count":100000}"#).is_err());
    }
}
