//! `--target` presets: the import rules of each cloud, checked before any byte is written.
//!
//! A target fixes the output format and adds the provider's documented limits. Rules on the
//! output's *name* are the client's to check (the daemon never sees paths); the rules that need
//! the source's size are checked here; the key rules of a VHD are the VHD key's own
//! ([`crate::keys`]), whatever the target. Sources, checked 2026-12 (docs/targets/):
//!
//! - IBM Cloud VPC: "Size doesn't exceed 250 GB" (ibm-cloud-docs/vpc `conref.md`), "the minimum
//!   size is 10 GB … rounded up to 10 GB"; VPC counts GB in base 2 (`block_storage_vpc_faq.md`);
//!   an encrypted image of other than exactly 100 GB cannot be re-captured from its instance's
//!   boot volume (`byok-about-data-encryption.md`).
//! - IBM Cloud classic: "Imports are limited to 100 GB disks" (ibm-cloud-docs/image-templates
//!   `import-image.md`); unit unstated, read as base 2 like VPC's.
//! - OpenStack: encrypted qcow2 images are at specification stage (cinder-specs 2026.1
//!   `LUKS-image-encryption`); Cinder today copies raw LUKS onto encrypted volumes.

use imgcrypt_proto::api::{EncryptParameters, OutputFormat, Target};

use crate::{Error, Result};

const GIB: u64 = 1 << 30;
/// IBM Cloud VPC's largest importable boot image.
pub const IBM_VPC_MAX_BYTES: u64 = 250 * GIB;
/// IBM Cloud VPC rounds smaller boot images up to this.
pub const IBM_VPC_MIN_BYTES: u64 = 10 * GIB;
/// The one size whose encrypted VPC image can later be re-captured from its boot volume.
pub const IBM_VPC_RECAPTURE_BYTES: u64 = 100 * GIB;
/// IBM Cloud classic's largest importable disk.
pub const IBM_CLASSIC_MAX_BYTES: u64 = 100 * GIB;

/// The output format a call asks for: its `format`, else its target's, else raw LUKS. A format
/// that contradicts the target is refused.
pub fn resolve_format(parameters: &EncryptParameters) -> Result<OutputFormat> {
    match (parameters.format, parameters.target) {
        (Some(format), Some(target)) if format != target.format() => Err(Error::InvalidOption {
            parameter: "format",
            message: format!(
                "--target {} imports {} images, not {}: drop --format or use --format {}",
                target.cli_name(),
                target.format().cli_name(),
                format.cli_name(),
                target.format().cli_name()
            ),
        }),
        (Some(format), _) => Ok(format),
        (None, Some(target)) => Ok(target.format()),
        (None, None) => Ok(OutputFormat::Luks),
    }
}

/// Checks `target`'s size rules for a disk of `virtual_size` bytes. The error names the rule
/// and the fix; the notices are things the user should know that do not stop the job.
pub fn check(target: Target, virtual_size: u64) -> Result<Vec<String>> {
    let mut notices = Vec::new();
    let size = describe(virtual_size);
    match target {
        Target::IbmVpc => {
            if virtual_size > IBM_VPC_MAX_BYTES {
                return Err(Error::TargetRule {
                    rule: "ibm-vpc-max-size",
                    message: format!(
                        "the source's virtual disk is {size}, but IBM Cloud VPC imports boot \
                         images of at most 250 GB (GiB: VPC counts in base 2; ibm-cloud-docs/vpc \
                         conref.md): shrink the guest's file systems and the disk (e.g. \
                         `qemu-img resize --shrink`) below 250 GiB first"
                    ),
                });
            }
            if virtual_size < IBM_VPC_MIN_BYTES {
                notices.push(format!(
                    "the virtual disk is {size}; IBM Cloud VPC rounds boot images smaller than \
                     10 GB up to 10 GB"
                ));
            }
            if virtual_size % GIB != 0 {
                notices.push(format!(
                    "the virtual disk ({size}) is not a whole number of GiB; VPC records an \
                     image's size in whole GB"
                ));
            }
            if virtual_size != IBM_VPC_RECAPTURE_BYTES {
                notices.push(
                    "IBM Cloud VPC cannot create a new image from the boot volume of an \
                     instance started from an encrypted image that is not exactly 100 GB \
                     (byok-about-data-encryption.md); resize the disk to 100 GiB first if you \
                     will need that"
                        .to_string(),
                );
            }
        }
        Target::IbmClassic => {
            if virtual_size > IBM_CLASSIC_MAX_BYTES {
                return Err(Error::TargetRule {
                    rule: "ibm-classic-max-size",
                    message: format!(
                        "the source's virtual disk is {size}, but IBM Cloud classic imports disks \
                         of at most 100 GB (read as GiB; ibm-cloud-docs/image-templates \
                         import-image.md): shrink the guest's file systems and the disk below \
                         100 GiB first"
                    ),
                });
            }
        }
        Target::Openstack => notices.push(
            "OpenStack's encrypted qcow2 images are at specification stage (cinder-specs \
             2026.1 LUKS-image-encryption); today Cinder consumes raw LUKS: use --target luks \
             --luks1 for a Cinder volume"
                .to_string(),
        ),
        Target::Luks => {}
    }
    Ok(notices)
}

/// `N bytes (X GiB)`.
fn describe(bytes: u64) -> String {
    format!("{bytes} bytes ({:.2} GiB)", bytes as f64 / GIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_of(result: Result<Vec<String>>) -> &'static str {
        match result {
            Err(Error::TargetRule { rule, .. }) => rule,
            other => panic!("expected a target rule error, got {other:?}"),
        }
    }

    #[test]
    fn vpc_takes_up_to_250_gib_and_says_what_it_rounds() {
        assert_eq!(
            rule_of(check(Target::IbmVpc, IBM_VPC_MAX_BYTES + 512)),
            "ibm-vpc-max-size"
        );
        let at_limit = check(Target::IbmVpc, IBM_VPC_MAX_BYTES).unwrap();
        assert_eq!(at_limit.len(), 1, "{at_limit:?}");
        assert!(at_limit[0].contains("100 GB"));
        let exact = check(Target::IbmVpc, IBM_VPC_RECAPTURE_BYTES).unwrap();
        assert!(exact.is_empty(), "{exact:?}");
        let small = check(Target::IbmVpc, (3 << 30) + 4096).unwrap();
        assert!(small.iter().any(|n| n.contains("10 GB")), "{small:?}");
        assert!(
            small.iter().any(|n| n.contains("whole number of GiB")),
            "{small:?}"
        );
    }

    #[test]
    fn classic_takes_up_to_100_gib() {
        let error = check(Target::IbmClassic, IBM_CLASSIC_MAX_BYTES + 1).unwrap_err();
        assert!(error.to_string().contains("100 GB"), "{error}");
        assert!(error.to_string().contains("import-image.md"), "{error}");
        assert_eq!(
            error.varlink_parameters().rule.as_deref(),
            Some("ibm-classic-max-size")
        );
        assert_eq!(
            error.varlink_parameters().parameter.as_deref(),
            Some("target")
        );
        assert!(check(Target::IbmClassic, IBM_CLASSIC_MAX_BYTES)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn openstack_says_where_the_standard_stands_and_luks_has_no_rules() {
        let notices = check(Target::Openstack, 1 << 30).unwrap();
        assert!(notices[0].contains("--target luks"), "{notices:?}");
        assert!(check(Target::Luks, u64::MAX / 2).unwrap().is_empty());
    }

    #[test]
    fn a_format_that_contradicts_the_target_is_refused() {
        let mut parameters: EncryptParameters = serde_json::from_value(serde_json::json!({
            "source": 0, "output": 1, "luks_version": "luks2", "sector_size": 512
        }))
        .unwrap();
        assert_eq!(resolve_format(&parameters).unwrap(), OutputFormat::Luks);
        parameters.target = Some(Target::IbmClassic);
        assert_eq!(resolve_format(&parameters).unwrap(), OutputFormat::Vhd);
        parameters.format = Some(OutputFormat::Qcow2);
        let error = resolve_format(&parameters).unwrap_err();
        assert!(error.to_string().contains("--format vhd"), "{error}");
        parameters.target = Some(Target::IbmVpc);
        assert_eq!(resolve_format(&parameters).unwrap(), OutputFormat::Qcow2);
    }
}
