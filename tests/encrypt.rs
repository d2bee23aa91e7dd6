//! End-to-end encryption: sources made by qemu-img, encrypted by imgctl through a real
//! imgcryptd, checked by tools that share no code with ours.
//!
//! For every source format (RAW, fixed VHD, dynamic VHD) and header variant (LUKS2/512,
//! LUKS2/4096, LUKS1): cryptsetup unlocks the output with the key file; the payload decrypted
//! by Python `cryptography` with the volume key cryptsetup dumps equals `qemu-img convert -O raw`
//! of the source (and zeros after it); luksDump agrees with the summary; the output size follows
//! the rule data offset + virtual size rounded up to whole MiB. LUKS1 outputs are also read back
//! through qemu-img's own `luks` driver.

mod common;

use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
enum Variant {
    Luks2Sector512,
    Luks2Sector4096,
    Luks1,
}

impl Variant {
    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Luks2Sector512 => &[],
            Self::Luks2Sector4096 => &["--sector-size", "4096"],
            Self::Luks1 => &["--luks1"],
        }
    }
}

fn round_trip(kind: SourceKind, variant: Variant) {
    let dir = scratch();
    let dir = dir.path();
    let source = make_source(dir, kind, "12M");
    let key = dir.join("secret.dek");
    write_key(&key);
    let output = dir.join("disk.luks");

    let daemon = Daemon::start(dir, &[]);
    let result = run(daemon
        .encrypt(&source, &output, &key)
        .args(variant.args())
        .arg("--json"));
    daemon.assert_ok(&result, "imgctl failed");
    assert!(!Path::new(&format!("{}.partial", output.display())).exists());

    let summary = last_json_summary(&result.stdout);
    let facts = luks_dump(&output);
    let (version, sector) = match variant {
        Variant::Luks2Sector512 => (2, 512),
        Variant::Luks2Sector4096 => (2, 4096),
        Variant::Luks1 => (1, 512),
    };
    assert_eq!(facts.version, version);
    assert_eq!(facts.sector_size, sector);
    assert_eq!(facts.cipher, "aes-xts-plain64");
    assert_eq!(summary["data_offset"].as_u64().unwrap(), facts.data_offset);
    assert_eq!(summary["sector_size"].as_u64().unwrap(), sector);
    assert_eq!(summary["cipher"], "aes-xts-plain64");
    assert_eq!(summary["key_size_bits"], 512);
    assert_eq!(summary["engine"], "userspace");

    // The size rule, from independent facts: qemu-img's virtual size and luksDump's offset.
    let virtual_size = qemu_virtual_size(&source);
    assert_eq!(summary["virtual_size"].as_u64().unwrap(), virtual_size);
    let expected_size = (facts.data_offset + virtual_size).div_ceil(MIB) * MIB;
    let actual_size = std::fs::metadata(&output).unwrap().len();
    assert_eq!(actual_size, expected_size, "output size rule");
    assert_eq!(summary["output_size"].as_u64().unwrap(), actual_size);
    assert_eq!(
        summary["payload_size"].as_u64().unwrap(),
        actual_size - facts.data_offset
    );

    assert!(
        test_passphrase(&output, &key),
        "cryptsetup cannot unlock the output"
    );
    let wrong = dir.join("wrong.dek");
    write_key(&wrong);
    assert!(
        !test_passphrase(&output, &wrong),
        "a different key must not unlock the output"
    );

    let expected = dir.join("expected.raw");
    qemu_plaintext(&source, &expected);
    let plaintext = independent_decrypt(&output, &key, dir);
    assert_plaintext_matches(&plaintext, &expected);

    if let Variant::Luks1 = variant {
        let through_qemu = dir.join("qemu-luks.raw");
        let secret = format!("secret,id=sec0,file={}", key.display());
        let image = format!(
            "driver=luks,key-secret=sec0,file.driver=file,file.filename={}",
            output.display()
        );
        qemu_img(&[
            "convert",
            "--object",
            &secret,
            "--image-opts",
            &image,
            "-O",
            "raw",
            through_qemu.to_str().unwrap(),
        ]);
        assert_plaintext_matches(&through_qemu, &expected);
    }
}

#[test]
fn raw_to_luks2_512() {
    round_trip(SourceKind::Raw, Variant::Luks2Sector512);
}

#[test]
fn raw_to_luks2_4096() {
    round_trip(SourceKind::Raw, Variant::Luks2Sector4096);
}

#[test]
fn raw_to_luks1() {
    round_trip(SourceKind::Raw, Variant::Luks1);
}

#[test]
fn fixed_vhd_to_luks2_512() {
    round_trip(SourceKind::VhdFixed, Variant::Luks2Sector512);
}

#[test]
fn fixed_vhd_to_luks2_4096() {
    round_trip(SourceKind::VhdFixed, Variant::Luks2Sector4096);
}

#[test]
fn fixed_vhd_to_luks1() {
    round_trip(SourceKind::VhdFixed, Variant::Luks1);
}

#[test]
fn dynamic_vhd_to_luks2_512() {
    round_trip(SourceKind::VhdDynamic, Variant::Luks2Sector512);
}

#[test]
fn dynamic_vhd_to_luks2_4096() {
    round_trip(SourceKind::VhdDynamic, Variant::Luks2Sector4096);
}

#[test]
fn dynamic_vhd_to_luks1() {
    round_trip(SourceKind::VhdDynamic, Variant::Luks1);
}
