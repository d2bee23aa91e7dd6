//! The client's half of `--target`: the provider's rules on the output's name (the daemon never
//! sees paths), and what the user must do next once the image is written — above all which
//! bytes of the key to wrap, which differs per cloud. Sources: `docs/targets/`.

use std::path::Path;

use imgcrypt_proto::api::{Summary, Target};

use crate::error::{CtlError, Result};

/// Checks the rules `target` sets on the output file's name.
pub fn check_output_name(target: Target, output: &Path) -> Result<()> {
    let name = output
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (suffix, rule) = match target {
        Target::IbmVpc => (
            ".qcow2",
            "IBM Cloud VPC imports need the lowercase extension .qcow2 (uppercase ones fail \
             validation: ibm-cloud-docs/vpc vsi_is_import_images.md)",
        ),
        Target::IbmClassic => (
            ".vhd-0.vhd",
            "IBM Cloud classic imports must be named like filename.vhd-0.vhd \
             (ibm-cloud-docs/image-templates import-image.md)",
        ),
        Target::Openstack | Target::Luks => return Ok(()),
    };
    if name.ends_with(suffix) && name.len() > suffix.len() {
        return Ok(());
    }
    let stem = name
        .strip_suffix(".qcow2")
        .or_else(|| name.strip_suffix(".vhd"))
        .unwrap_or(&name)
        .split('.')
        .next()
        .filter(|stem| !stem.is_empty())
        .unwrap_or("image");
    Err(CtlError::Usage(format!(
        "{rule}; the output is named {name:?}: use -o {stem}{suffix}"
    )))
}

/// What to do after writing `output` from `source` for `target` with the key file `key_file`
/// (absent: the key ring's encryption key).
pub fn next_steps(
    target: Target,
    source: &Path,
    output: &Path,
    key_file: Option<&Path>,
    summary: &Summary,
) -> Vec<String> {
    let key = key_file.map_or_else(|| "KEY".to_string(), |path| path.display().to_string());
    let out = output.display().to_string();
    let object = output
        .file_name()
        .map_or_else(|| out.clone(), |name| name.to_string_lossy().into_owned());
    let verify = format!(
        "check it: `imgctl verify {out} --source {} --key-file {key}`",
        source.display()
    );
    match target {
        Target::IbmVpc => vec![
            verify,
            format!(
                "IBM's own checks: `qemu-img check --object secret,id=sec0,file={key} \
                 --image-opts driver=qcow2,encrypt.key-secret=sec0,file.filename={out}` and \
                 `qemu-img info {out}`"
            ),
            format!("upload {object} to a Cloud Object Storage bucket, keeping its name"),
            format!(
                "wrap the passphrase with Key Protect — the BASE64 OF THE KEY FILE, not the key \
                 file itself: `ibmcloud kp key wrap ROOT_KEY_ID -i KP_INSTANCE_ID -p \"$(base64 \
                 -w0 < {key})\"` (the result is the WDEK)"
            ),
            format!(
                "import: `ibmcloud is image-create NAME --file cos://REGION/BUCKET/{object} \
                 --os-name OS --encrypted-data-key WDEK --encryption-key ROOT_KEY_CRN`"
            ),
            "the image holds LUKS1 (qemu reads no other), so no key fingerprint travels in \
             it: imgctl inspect/verify/decrypt open it by trying keys"
                .to_string(),
        ],
        Target::IbmClassic => vec![
            verify,
            format!(
                "compare the key hash {} with `vhd-util key -p -n {out}` (second value) and with \
                 `imgctl key fingerprint --vhd {key}`",
                summary.vhd_key_hash.as_deref().unwrap_or("(see above)")
            ),
            format!(
                "the data is encrypted with {}",
                if summary.key_size_bits == 256 {
                    "AES-128-XTS (a 32-byte key, IBM's \"AES 256 bit\"); for AES-256-XTS use a \
                     64-byte key: (umask 077; head -c 64 /dev/urandom | base64 -w0 > KEY)"
                } else {
                    "AES-256-XTS (a 64-byte key, IBM's \"AES 512 bit\")"
                }
            ),
            format!(
                "upload {object} to a regional Cloud Object Storage bucket in the key manager's \
                 region"
            ),
            format!(
                "wrap the key file's text AS IT IS: `ibmcloud kp key wrap ROOT_KEY_ID -i \
                 KP_INSTANCE_ID -p \"$(cat {key})\"` (the result is the wrapped DEK)"
            ),
            format!(
                "import: `ibmcloud sl image import NAME cos://REGION/BUCKET/{object} IBM_API_KEY \
                 --os-code OS_CODE --cloud-init --is-encrypted --root-key-crn ROOT_KEY_CRN \
                 --wrapped-dek WRAPPED_DEK`"
            ),
            "the key file IS the data key: rotating it means re-encrypting (`imgctl rewrite \
             --reencrypt`)"
                .to_string(),
        ],
        Target::Openstack => vec![
            verify,
            format!(
                "store the passphrase as a Barbican secret of type passphrase: `openstack secret \
                 store --secret-type passphrase --file {key}`"
            ),
            format!(
                "upload: `openstack image create --disk-format qcow2 --container-format bare \
                 --file {out} --property os_encrypt_format=LUKSv1 --property \
                 os_encrypt_key_id=SECRET_UUID NAME`"
            ),
        ],
        Target::Luks => vec![
            verify,
            format!("open it anywhere: `cryptsetup open --key-file {key} {out} NAME`"),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ibm_names_are_checked_and_the_fix_is_given() {
        check_output_name(Target::IbmVpc, Path::new("/x/disk.qcow2")).unwrap();
        check_output_name(Target::IbmClassic, Path::new("disk.vhd-0.vhd")).unwrap();
        check_output_name(Target::Luks, Path::new("anything")).unwrap();
        check_output_name(Target::Openstack, Path::new("disk.img")).unwrap();
        let upper = check_output_name(Target::IbmVpc, Path::new("disk.QCOW2"))
            .unwrap_err()
            .to_string();
        assert!(
            upper.contains("lowercase") && upper.contains("-o disk.qcow2"),
            "{upper}"
        );
        let classic = check_output_name(Target::IbmClassic, Path::new("disk.vhd"))
            .unwrap_err()
            .to_string();
        assert!(classic.contains("-o disk.vhd-0.vhd"), "{classic}");
        assert!(check_output_name(Target::IbmVpc, Path::new(".qcow2")).is_err());
    }
}
