//! `imgctl encrypt` of plain qcow2 sources, judged by tools that share no code with ours: the
//! expected plaintext is `qemu-img convert -O raw` of the source; the LUKS output is decrypted
//! with cryptsetup's volume key and Python `cryptography` (`independent_decrypt`), the qcow2
//! output by qemu-img with the key as a secret, the VHD output by `tests/support/vhd_decrypt.py`.
//!
//! Sources: compat 0.10 and 1.1, cluster sizes 512 B to 2 MiB, `-c` compressed (zlib, zstd),
//! v3 zero clusters over preallocated and unallocated clusters, preallocation modes, extended
//! L2 entries (subclusters), irregular qemu-io writes. Refused: an encrypted qcow2 without its
//! key, with the way forward (chains and keyed sources: tests/qcow2_chain.rs).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use common::*;

/// A 16 MiB qcow2 made with `qemu-img create -o OPTIONS`, then written by qemu-io: irregular
/// writes (odd lengths and places), v3 zero writes over written and unwritten clusters.
fn written_qcow2(dir: &Path, name: &str, options: &str) -> PathBuf {
    let path = dir.join(name);
    let _ = fs::remove_file(&path);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        options,
        path.to_str().unwrap(),
        "16M",
    ]);
    let mut commands = Vec::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..24 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let offset = (state >> 20) % (15 << 20) / 512 * 512;
        let length = ((state >> 8) % 200 + 1) * 512;
        let pattern = (state >> 3) as u8 | 1;
        commands.push(format!("write -P {pattern} {offset} {length}"));
    }
    if !options.contains("compat=0.10") {
        commands.push("write -z 0 1M".into());
        commands.push(format!("write -z {} 2M", 12 << 20));
    }
    commands.push(format!("write -P 0x5a {} 4096", (16 << 20) - 4096));
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io("qcow2", &path, &commands);
    path
}

/// `qemu-img convert -c` of a written qcow2: compressed clusters (qemu stores a cluster that
/// does not shrink uncompressed, so the text pattern makes sure some do).
fn compressed_qcow2(dir: &Path, options: &str) -> PathBuf {
    let plain = written_qcow2(dir, "to-compress.qcow2", "compat=1.1");
    qemu_io("qcow2", &plain, &["write -P 0x41 4M 3M"]);
    let path = dir.join(format!(
        "compressed-{}.qcow2",
        options.replace([',', '='], "-")
    ));
    let _ = fs::remove_file(&path);
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        "-o",
        options,
        plain.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    path
}

/// What qemu reads from the qcow2 `source`.
fn qemu_raw(source: &Path, dir: &Path) -> PathBuf {
    let raw = dir.join(format!(
        "{}.qemu.raw",
        source.file_name().unwrap().to_str().unwrap()
    ));
    let _ = fs::remove_file(&raw);
    qemu_plaintext_as("qcow2", source, &raw);
    raw
}

fn encrypt(daemon: &Daemon, source: &Path, output: &Path, key: &Path, extra: &[&str]) -> Output {
    let _ = fs::remove_file(output);
    let mut command = daemon.imgctl();
    if extra.contains(&"vhd") {
        encrypt_arguments_keyed(&mut command, source, output, key);
    } else {
        encrypt_arguments(&mut command, source, output, key);
    }
    run(command.args(extra).arg("--json"))
}

fn encrypt_ok(daemon: &Daemon, source: &Path, output: &Path, key: &Path, extra: &[&str]) {
    let result = encrypt(daemon, source, output, key, extra);
    daemon.assert_ok(&result, source.display());
    let summary = last_json_summary(&result.stdout);
    assert_eq!(summary["source_format"], "qcow2", "{summary}");
}

#[test]
fn qcow2_sources_encrypt_to_luks_images_holding_what_qemu_reads() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let mut sources = Vec::new();
    for (name, options) in [
        ("v2-512.qcow2", "compat=0.10,cluster_size=512"),
        ("v3-4k.qcow2", "compat=1.1,cluster_size=4096"),
        ("v3-64k.qcow2", "compat=1.1"),
        ("v3-2m.qcow2", "compat=1.1,cluster_size=2M"),
        ("v2-meta.qcow2", "compat=0.10,preallocation=metadata"),
        ("v3-meta.qcow2", "compat=1.1,preallocation=metadata"),
        ("v3-falloc.qcow2", "compat=1.1,preallocation=falloc"),
        ("v3-full.qcow2", "compat=1.1,preallocation=full"),
        ("v3-extl2.qcow2", "compat=1.1,extended_l2=on"),
    ] {
        sources.push(written_qcow2(dir, name, options));
    }
    sources.push(compressed_qcow2(dir, "compat=1.1"));
    sources.push(compressed_qcow2(dir, "compat=1.1,compression_type=zstd"));
    for source in &sources {
        let output = dir.join("out.luks");
        encrypt_ok(&daemon, source, &output, &key, &[]);
        let plaintext = independent_decrypt(&output, &key, dir);
        assert_plaintext_matches(&plaintext, &qemu_raw(source, dir));
    }
    let small_compressed = compressed_qcow2(dir, "compat=0.10,cluster_size=4096");
    let output = dir.join("out.luks");
    encrypt_ok(&daemon, &small_compressed, &output, &key, &[]);
    let plaintext = independent_decrypt(&output, &key, dir);
    assert_plaintext_matches(&plaintext, &qemu_raw(&small_compressed, dir));
}

#[test]
fn a_qcow2_source_becomes_a_qcow2_or_a_vhd_output_that_other_readers_decrypt() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = compressed_qcow2(dir, "compat=1.1,cluster_size=4096");
    let expected = qemu_raw(&source, dir);

    let qcow2 = dir.join("out.qcow2");
    encrypt_ok(&daemon, &source, &qcow2, &key, &["--format", "qcow2"]);
    let converted = dir.join("qcow2-out.raw");
    qemu_decrypt_qcow2(&qcow2, &key, &converted);
    assert!(fs::read(&converted).unwrap() == fs::read(&expected).unwrap());

    let vhd = dir.join("out.vhd");
    encrypt_ok(&daemon, &source, &vhd, &key, &["--format", "vhd"]);
    let raw_key = dir.join("k.bin");
    let encoded = fs::read_to_string(&key).unwrap();
    fs::write(
        &raw_key,
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .unwrap(),
    )
    .unwrap();
    let plaintext = dir.join("vhd-out.raw");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/vhd_decrypt.py");
    run_ok(
        Command::new("python3")
            .arg(script)
            .arg(&vhd)
            .arg(&raw_key)
            .arg(&plaintext),
    );
    assert_plaintext_matches(&plaintext, &expected);
}

#[test]
fn an_encrypted_qcow2_source_without_its_key_is_refused_with_the_way_forward() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let base = written_qcow2(dir, "base.qcow2", "compat=1.1");
    // Chains are read (tests/qcow2_chain.rs); an encrypted qcow2 (ours) needs its key.
    let output = dir.join("out.luks");
    let encrypted = dir.join("enc.qcow2");
    encrypt_ok(&daemon, &base, &encrypted, &key, &["--format", "qcow2"]);
    let result = encrypt(&daemon, &encrypted, &output, &key, &[]);
    assert!(!result.status.success());
    let text = describe(&result);
    assert!(text.contains("encrypted qcow2"), "{text}");
    assert!(text.contains("--source-key-file"), "{text}");
    assert!(
        text.contains("imgctl decrypt") && text.contains("imgctl rewrite"),
        "{text}"
    );
    assert!(!output.exists());
}
