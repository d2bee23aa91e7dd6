//! VHDX sources end to end: images `qemu-img create -f vhdx` makes (dynamic and fixed, block
//! sizes 1, 8 and 32 MiB, both block_state_zero settings), written irregularly by `qemu-io`,
//! encrypted by imgctl through a real imgcryptd. The LUKS output is decrypted by cryptsetup's
//! volume key and Python `cryptography` (no code of ours) and compared with
//! `qemu-img convert -O raw` of the source; one case also goes through `imgctl decrypt` and
//! `imgctl verify --source`.
//!
//! 4096-byte logical sectors, the corpus images and damaged images are tested against the
//! reader in `daemon/tests/formats_qemu/vhdx.rs` (qemu-img cannot create 4096-sector VHDX).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

const MIB: u64 = 1 << 20;

/// A VHDX of `size` bytes with `options`, written at scattered places (some unaligned, some
/// across block boundaries) with `seed` choosing a few more.
fn make_vhdx(dir: &Path, name: &str, size: u64, options: &str, seed: u64) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        options,
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
    let mut writes = vec![
        (0x11u8, 0u64, 64 * 1024u64),
        (0x22, 8 * MIB - 4096, 8192),
        (0x33, 13 * MIB + 512, 3 * 512),
        (0x44, size - 4096, 4096),
    ];
    let mut state = seed;
    for pattern in 0x50..0x58u8 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let offset = (state >> 20) % (size / 512) * 512;
        let length = ((state >> 8) % 64 + 1) * 4096;
        writes.push((pattern, offset, length.min(size - offset)));
    }
    let commands: Vec<String> = writes
        .iter()
        .map(|(pattern, offset, length)| format!("write -P {pattern:#x} {offset} {length}"))
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io("vhdx", &path, &commands);
    path
}

#[test]
fn vhdx_sources_encrypt_to_what_qemu_reads() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let size = 40 * MIB + 512;
    let mut seed = 7;
    for subformat in ["dynamic", "fixed"] {
        for block_size in ["1M", "8M", "32M"] {
            for zero in ["on", "off"] {
                seed += 1;
                let options = format!(
                    "subformat={subformat},block_size={block_size},block_state_zero={zero}"
                );
                let source = make_vhdx(dir, "src.vhdx", size, &options, seed);
                let image = dir.join("image.luks");
                let _ = fs::remove_file(&image);
                let result = run(daemon.encrypt(&source, &image, &key).arg("--json"));
                assert!(result.status.success(), "{options}: {}", describe(&result));
                let summary = last_json_summary(&result.stdout);
                assert_eq!(summary["source_format"], "vhdx", "{options}");
                assert_eq!(summary["virtual_size"].as_u64().unwrap(), size, "{options}");
                let expected = dir.join("expected.raw");
                qemu_plaintext(&source, &expected);
                let plain = independent_decrypt(&image, &key, dir);
                assert_plaintext_matches(&plain, &expected);
                for file in [&source, &image, &expected, &plain] {
                    fs::remove_file(file).unwrap();
                }
            }
        }
    }
}

#[test]
fn a_vhdx_source_decrypts_and_verifies_through_imgctl() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_vhdx(dir, "src.vhdx", 24 * MIB, "block_size=1M", 99);
    let image = dir.join("image.luks");
    run_ok(
        daemon
            .encrypt(&source, &image, &key)
            .args(["--sector-size", "4096"]),
    );
    let expected = dir.join("expected.raw");
    qemu_plaintext(&source, &expected);
    let plain = dir.join("plain.raw");
    run_ok(&mut daemon.decrypt(&image, &plain, &key));
    assert_plaintext_matches(&plain, &expected);
    let verified = run(&mut daemon.verify(&image, &source, &key));
    assert!(verified.status.success(), "{}", describe(&verified));
}

/// A differencing VHDX (tests/support/vhdx_diff.py; qemu-img cannot make one) in another
/// directory than its parent, named by a relative Windows path: imgctl finds the parent the
/// way Hyper-V does, passes it, and the encrypted disk is the parent with the child's sectors
/// over it; without the parent, the error names where it looked.
#[test]
fn a_differencing_vhdx_encrypts_with_its_parent_found_by_imgctl() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let size = 24 * MIB;
    fs::create_dir(dir.join("base")).unwrap();
    fs::create_dir(dir.join("child")).unwrap();
    let parent = make_vhdx(&dir.join("base"), "parent.vhdx", size, "block_size=1M", 5);
    let child = dir.join("child").join("child.vhdx");
    let writes = [
        (0x71u8, 4096u64, 1024u64),
        (0x72, 3 * MIB, MIB),
        (0x73, 13 * MIB + 512, 512),
    ];
    let mut args: Vec<String> = vec![
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/vhdx_diff.py").into(),
        parent.to_str().unwrap().into(),
        child.to_str().unwrap().into(),
        "--size".into(),
        size.to_string(),
        "--block-size".into(),
        MIB.to_string(),
        "--relative-path".into(),
        "..\\base\\parent.vhdx".into(),
        "--absolute-win32-path".into(),
        "C:\\VMs\\base\\parent.vhdx".into(),
    ];
    for (byte, offset, length) in writes {
        args.push("--write".into());
        args.push(format!("{offset}:{length}:{byte}"));
    }
    run_ok(std::process::Command::new("python3").args(&args));

    let expected = dir.join("expected.raw");
    qemu_plaintext(&parent, &expected);
    let file = fs::OpenOptions::new().write(true).open(&expected).unwrap();
    for (byte, offset, length) in writes {
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![byte; length as usize], offset)
            .unwrap();
    }

    let image = dir.join("image.luks");
    let result = run(daemon.encrypt(&child, &image, &key).arg("--json"));
    assert!(result.status.success(), "{}", describe(&result));
    let plain = independent_decrypt(&image, &key, dir);
    assert_plaintext_matches(&plain, &expected);

    // The parent moved away: the error says which names were tried.
    fs::rename(&parent, dir.join("elsewhere.vhdx")).unwrap();
    let _ = fs::remove_file(&image);
    let result = run(&mut daemon.encrypt(&child, &image, &key));
    assert!(!result.status.success());
    let text = describe(&result);
    assert!(text.contains("parent.vhdx"), "{text}");
    assert!(text.contains("parent disk"), "{text}");
}
