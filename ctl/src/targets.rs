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
    use std::process::Command;

    use imgcrypt_proto::api::{EngineKind, SourceFormat};

    use super::*;

    fn summary(target: Target, key_size_bits: u32, vhd_key_hash: Option<&str>) -> Summary {
        Summary {
            source_format: SourceFormat::Raw,
            virtual_size: 4 << 20,
            output_format: target.format(),
            output_virtual_size: 4 << 20,
            luks_version: None,
            cipher: "aes-xts-plain64".into(),
            key_size_bits,
            sector_size: 512,
            data_offset: 0,
            payload_size: 4 << 20,
            output_size: 6 << 20,
            key_fingerprint: "abc=".into(),
            pbkdf: "pbkdf2".into(),
            pbkdf_benchmark: None,
            engine: EngineKind::Userspace,
            elapsed_ms: 1,
            copy_ms: 1,
            bytes_written: 6 << 20,
            allocated_bytes: 1 << 20,
            vhd_key_hash: vhd_key_hash.map(str::to_string),
            target: Some(target),
            resumed_from: None,
        }
    }

    /// The one step that wraps a key with Key Protect, and the shell expression it passes as
    /// the payload (`-p "EXPR"`).
    fn wrap_step(steps: &[String]) -> (&str, &str) {
        let wraps: Vec<&String> = steps
            .iter()
            .filter(|step| step.contains("kp key wrap"))
            .collect();
        assert_eq!(wraps.len(), 1, "{steps:#?}");
        let step = wraps[0].as_str();
        let payload = step
            .split_once(" -p \"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(payload, _)| payload)
            .unwrap_or_else(|| panic!("no -p \"...\" in {step}"));
        (step, payload)
    }

    /// What the shell passes to `ibmcloud kp key wrap -p` for `payload`.
    fn shell_value(payload: &str) -> Vec<u8> {
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s \"{payload}\""))
            .output()
            .unwrap();
        assert!(output.status.success(), "{payload}: {output:?}");
        output.stdout
    }

    #[test]
    fn vpc_wraps_the_base64_of_the_key_file_and_classic_the_key_file_as_it_is() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secret.dek");
        // A key file's text: base64 of 32 random-looking bytes, no newline.
        let text = base64::engine::general_purpose::STANDARD.encode((1..=32u8).collect::<Vec<_>>());
        std::fs::write(&key, &text).unwrap();
        let source = Path::new("/images/src.raw");
        let hash = "ab".repeat(32);

        let vpc = next_steps(
            Target::IbmVpc,
            source,
            Path::new("/out/disk.qcow2"),
            Some(&key),
            &summary(Target::IbmVpc, 512, None),
        );
        let classic = next_steps(
            Target::IbmClassic,
            source,
            Path::new("/out/disk.vhd-0.vhd"),
            Some(&key),
            &summary(Target::IbmClassic, 256, Some(&hash)),
        );
        let (vpc_step, vpc_payload) = wrap_step(&vpc);
        let (classic_step, classic_payload) = wrap_step(&classic);
        assert_eq!(vpc_payload, format!("$(base64 -w0 < {})", key.display()));
        assert_eq!(classic_payload, format!("$(cat {})", key.display()));
        assert_ne!(vpc_payload, classic_payload);
        assert!(vpc_step.contains("BASE64 OF THE KEY FILE"), "{vpc_step}");
        assert!(classic_step.contains("AS IT IS"), "{classic_step}");

        // The bytes the shell hands to Key Protect: VPC the base64 of the key file's bytes
        // (its passphrase is the file's bytes), classic the file's text itself (IBM decodes it
        // into the raw data key).
        let vpc_bytes = shell_value(vpc_payload);
        assert_eq!(
            vpc_bytes,
            base64::engine::general_purpose::STANDARD
                .encode(text.as_bytes())
                .into_bytes()
        );
        assert_eq!(shell_value(classic_payload), text.as_bytes());

        // Each names the object it uploads and the import command of its cloud.
        assert!(
            vpc.iter().any(|s| s.contains("ibmcloud is image-create")
                && s.contains("cos://REGION/BUCKET/disk.qcow2")
                && s.contains("--encrypted-data-key WDEK")),
            "{vpc:#?}"
        );
        assert!(
            classic
                .iter()
                .any(|s| s.contains("ibmcloud sl image import")
                    && s.contains("cos://REGION/BUCKET/disk.vhd-0.vhd")
                    && s.contains("--wrapped-dek")),
            "{classic:#?}"
        );
        // Classic: the hash to compare, and the cipher the key size gives.
        assert!(
            classic.iter().any(|s| s.contains(&hash)
                && s.contains("vhd-util key -p -n /out/disk.vhd-0.vhd")
                && s.contains(&format!("imgctl key fingerprint --vhd {}", key.display()))),
            "{classic:#?}"
        );
        assert!(
            classic.iter().any(|s| s.contains("AES-128-XTS")),
            "{classic:#?}"
        );
        let classic64 = next_steps(
            Target::IbmClassic,
            source,
            Path::new("/out/disk.vhd-0.vhd"),
            Some(&key),
            &summary(Target::IbmClassic, 512, Some(&hash)),
        );
        assert!(
            classic64
                .iter()
                .any(|s| s.contains("with AES-256-XTS (a 64-byte key")),
            "{classic64:#?}"
        );
        // Both start with the check that imgctl itself runs.
        for (steps, name) in [(&vpc, "disk.qcow2"), (&classic, "disk.vhd-0.vhd")] {
            let verify = format!(
                "imgctl verify /out/{name} --source /images/src.raw --key-file {}",
                key.display()
            );
            assert!(steps[0].contains(&verify), "{steps:#?}");
        }
    }

    #[test]
    fn openstack_and_luks_steps_wrap_nothing_and_name_their_tools() {
        let key = Path::new("/keys/secret.dek");
        let openstack = next_steps(
            Target::Openstack,
            Path::new("src.vhd"),
            Path::new("/out/disk.qcow2"),
            Some(key),
            &summary(Target::Openstack, 512, None),
        );
        assert!(!openstack.iter().any(|s| s.contains("kp key wrap")));
        assert!(
            openstack.iter().any(|s| s.contains(
                "openstack secret store --secret-type passphrase --file /keys/secret.dek"
            )),
            "{openstack:#?}"
        );
        assert!(
            openstack
                .iter()
                .any(|s| s.contains("openstack image create --disk-format qcow2")
                    && s.contains("--file /out/disk.qcow2")
                    && s.contains("os_encrypt_format=LUKSv1")),
            "{openstack:#?}"
        );
        let luks = next_steps(
            Target::Luks,
            Path::new("src.vhd"),
            Path::new("/out/disk.luks"),
            Some(key),
            &summary(Target::Luks, 512, None),
        );
        assert!(!luks.iter().any(|s| s.contains("kp key wrap")));
        assert!(
            luks.iter()
                .any(|s| s.contains("cryptsetup open --key-file /keys/secret.dek /out/disk.luks")),
            "{luks:#?}"
        );
        // Without --key-file (the key ring's key) the steps say KEY, never a made-up path.
        let ring = next_steps(
            Target::IbmVpc,
            Path::new("src.vhd"),
            Path::new("/out/disk.qcow2"),
            None,
            &summary(Target::IbmVpc, 512, None),
        );
        assert_eq!(wrap_step(&ring).1, "$(base64 -w0 < KEY)");
    }

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
