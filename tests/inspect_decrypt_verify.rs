//! `imgctl inspect`, `decrypt` and `verify` through the real binaries, against what cryptsetup
//! and qemu-img say about the same images.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn sha256sum(path: &Path) -> String {
    let output = run_ok(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn decrypt_writes_the_plaintext_and_verify_hashes_and_compares_it() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    for (kind, extra) in [
        (SourceKind::VhdDynamic, &[][..]),
        (SourceKind::VhdFixed, &["--luks1"][..]),
        (SourceKind::Raw, &["--sector-size", "4096"][..]),
    ] {
        let source = make_source(dir, kind, "6M");
        let image = dir.join("image.luks");
        let _ = fs::remove_file(&image);
        run_ok(daemon.encrypt(&source, &image, &key).args(extra));
        let raw = dir.join("expected.raw");
        qemu_plaintext(&source, &raw);

        let plain = dir.join("plain.raw");
        let _ = fs::remove_file(&plain);
        let output = run(&mut daemon.decrypt(&image, &plain, &key));
        assert!(output.status.success(), "{kind:?}: {}", describe(&output));
        assert!(!dir.join("plain.raw.partial").exists());
        assert_plaintext_matches(&plain, &raw);
        let facts = luks_dump(&image);
        assert_eq!(
            fs::metadata(&plain).unwrap().len(),
            fs::metadata(&image).unwrap().len() - facts.data_offset,
            "the whole payload is written"
        );

        let verified = run(&mut daemon.verify(&image, &source, &key));
        assert!(
            verified.status.success(),
            "{kind:?}: {}",
            describe(&verified)
        );
        let stdout = String::from_utf8_lossy(&verified.stdout);
        assert!(stdout.contains(&sha256sum(&plain)), "{kind:?}: {stdout}");
    }
}

#[test]
fn verify_reports_where_a_different_source_differs() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "4M");
    let image = dir.join("image.luks");
    run_ok(&mut daemon.encrypt(&source, &image, &key));
    let changed = dir.join("changed.raw");
    fs::copy(&source, &changed).unwrap();
    qemu_io("raw", &changed, &["write -P 0x77 1234944 512"]);
    let expected = fs::read(&source).unwrap();
    let first = (1234944..1234944 + 512)
        .find(|&at| expected[at] != 0x77)
        .unwrap();

    let output = run(&mut daemon.verify(&image, &changed, &key));
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains(&first.to_string()),
        "offset {first} not named: {text}"
    );
}

#[test]
fn inspect_reads_the_header_without_a_key_and_agrees_with_cryptsetup() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::VhdDynamic, "3M");
    let image = dir.join("image.luks");
    run_ok(
        daemon
            .encrypt(&source, &image, &key)
            .args(["--sector-size", "4096"]),
    );

    let output = run_ok(daemon.imgctl().args(["inspect", "--json"]).arg(&image));
    let info: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", describe(&output)));
    let uuid = run_ok(Command::new("cryptsetup").arg("luksUUID").arg(&image));
    assert_eq!(info["uuid"], String::from_utf8_lossy(&uuid.stdout).trim());
    let facts = luks_dump(&image);
    assert_eq!(info["luks_version"], "luks2");
    assert_eq!(info["cipher"], facts.cipher);
    assert_eq!(info["sector_size"], facts.sector_size);
    assert_eq!(info["data_offset"], facts.data_offset);
    assert_eq!(
        info["payload_size"],
        fs::metadata(&image).unwrap().len() - facts.data_offset
    );
    assert_eq!(info["keyslots"].as_array().unwrap().len(), 1);
    assert!(info["keyslots"][0]["matching_key"].is_null(), "{info}");

    // With the key, inspect says which one matches; the human form names the facts too.
    let output = run_ok(
        daemon
            .imgctl()
            .arg("inspect")
            .arg(&image)
            .arg("--key-file")
            .arg(&key),
    );
    let text = String::from_utf8_lossy(&output.stdout);
    for fact in [
        "LUKS2".to_string(),
        facts.data_offset.to_string(),
        "4096".to_string(),
        "--key-file".to_string(),
    ] {
        assert!(text.contains(&fact), "{fact} missing: {text}");
    }
}

/// `inspect` on a source (not an encrypted image) says what an encryption would read, with
/// sizes that agree with qemu-img; a container format imgcrypt does not read is refused by name.
#[test]
fn inspect_of_a_source_shows_its_format_and_sizes() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let vhd = make_source(dir, SourceKind::VhdDynamic, "7M");
    let output = run_ok(daemon.imgctl().args(["inspect", "--json"]).arg(&vhd));
    let info: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", describe(&output)));
    assert_eq!(info["format"], "vhd_dynamic", "{info}");
    assert_eq!(
        info["virtual_size"].as_u64().unwrap(),
        qemu_virtual_size(&vhd)
    );
    assert_eq!(
        info["file_size"].as_u64().unwrap(),
        std::fs::metadata(&vhd).unwrap().len()
    );
    assert_eq!(info["allocation_unit"].as_u64(), Some(2 << 20), "{info}");
    let allocated = info["allocated_bytes"].as_u64().unwrap();
    assert!(
        allocated > 0 && allocated <= info["virtual_size"].as_u64().unwrap(),
        "{info}"
    );

    // A sparse raw file: nothing allocated, all of it virtual.
    let raw = dir.join("holes.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let output = run_ok(daemon.imgctl().arg("inspect").arg(&raw));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("(raw, not encrypted)"), "{text}");
    assert!(text.contains("67108864 bytes (64.0 MiB)"), "{text}");
    assert!(text.contains("allocated        0 bytes"), "{text}");

    // A container imgcrypt does not read: refused by name, with the conversion to run.
    let vdi = dir.join("disk.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", vdi.to_str().unwrap(), "8M"]);
    let output = run(daemon.imgctl().arg("inspect").arg(&vdi));
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("VDI") && stderr.contains("qemu-img convert"),
        "{stderr}"
    );
}
