//! `imgctl encrypt` of qcow2 backing chains and of encrypted qcow2 sources, judged by tools
//! that share no code with ours: the expected plaintext is `qemu-img convert -O raw` of the top
//! image (qemu resolving the chain itself), and the LUKS output is decrypted with cryptsetup's
//! volume key and Python `cryptography` (`independent_decrypt`).
//!
//! Chains: depth 3 of qcow2 over qcow2 over raw with relative names into other directories,
//! qcow2 over VHD (vpc) and over VHDX by absolute names, backing disks smaller than the image,
//! zero clusters over backing data. A missing backing file is named and leaves no output. An
//! encrypted qcow2 (qemu-img's `encrypt.format=luks`) is read with `--source-key-file`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img create -f qcow2 -b BACKING -F FORMAT IMAGE [SIZE]`, the name recorded as given
/// (relative names are relative to IMAGE's directory, as qemu resolves them).
fn overlay(image: &Path, backing: &str, format: &str, size: Option<&str>) {
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        format,
        text(image),
    ];
    args.extend(size);
    qemu_img(&args);
}

/// qemu-io writes of `pattern` at `(offset, length)` pairs, in `format`.
fn write(format: &str, image: &Path, pattern: u8, writes: &[(&str, &str)]) {
    let commands: Vec<String> = writes
        .iter()
        .map(|(offset, length)| format!("write -P {pattern} {offset} {length}"))
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(format, image, &commands);
}

fn encrypt(daemon: &Daemon, source: &Path, output: &Path, key: &Path, extra: &[&str]) -> Output {
    let _ = fs::remove_file(output);
    let mut command = daemon.imgctl();
    encrypt_arguments(&mut command, source, output, key);
    run(command.args(extra).arg("--json"))
}

/// Encrypts `top` to a LUKS image and checks that its independent decryption is what qemu
/// reads of `top`, chain and all.
fn assert_encrypts_as_qemu_reads(daemon: &Daemon, dir: &Path, top: &Path, key: &Path) {
    let output = dir.join("out.luks");
    let result = encrypt(daemon, top, &output, key, &[]);
    daemon.assert_ok(&result, top.display());
    let summary = last_json_summary(&result.stdout);
    assert_eq!(summary["source_format"], "qcow2", "{summary}");
    let expected = dir.join("expected.raw");
    let _ = fs::remove_file(&expected);
    qemu_plaintext_as("qcow2", top, &expected);
    let plaintext = independent_decrypt(&output, key, dir);
    assert_plaintext_matches(&plaintext, &expected);
    assert_eq!(
        summary["virtual_size"].as_u64(),
        Some(fs::metadata(&expected).unwrap().len()),
        "{summary}"
    );
}

#[test]
fn chains_of_mixed_formats_encrypt_to_what_qemu_reads_of_the_top_image() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();

    // Depth 3: top.qcow2 -> mid/mid.qcow2 -> base/base.raw, by relative names, each layer
    // larger than the one below (a smaller backing disk reads as zeros past its end).
    fs::create_dir(dir.join("base")).unwrap();
    fs::create_dir(dir.join("mid")).unwrap();
    let base = dir.join("base/base.raw");
    qemu_img(&["create", "-q", "-f", "raw", text(&base), "8M"]);
    write(
        "raw",
        &base,
        0x11,
        &[("0", "3M"), ("5M", "64k"), ("7M", "1M")],
    );
    let mid = dir.join("mid/mid.qcow2");
    overlay(&mid, "../base/base.raw", "raw", Some("12M"));
    write("qcow2", &mid, 0x22, &[("1M", "512k"), ("9M", "4k")]);
    let top = dir.join("top.qcow2");
    overlay(&top, "mid/mid.qcow2", "qcow2", Some("16M"));
    write("qcow2", &top, 0x33, &[("2M", "4k"), ("13M", "100k")]);
    // Zero clusters over the layers' data, and over the smaller base's end.
    qemu_io(
        "qcow2",
        &top,
        &["write -z 0 64k", "write -z 1M 128k", "write -z 7M 2M"],
    );
    assert_encrypts_as_qemu_reads(&daemon, dir, &top, &key);

    // qcow2 over a dynamic VHD and over a VHDX, by absolute names, the overlay larger.
    for (format, name) in [("vpc", "base.vhd"), ("vhdx", "base.vhdx")] {
        let base = dir.join(name);
        qemu_img(&["create", "-q", "-f", format, text(&base), "6M"]);
        write(format, &base, 0x44, &[("0", "1M"), ("3M", "300k")]);
        let top = dir.join(format!("over-{format}.qcow2"));
        overlay(&top, text(&base), format, Some("10M"));
        write("qcow2", &top, 0x55, &[("512k", "64k"), ("8M", "1M")]);
        qemu_io("qcow2", &top, &["write -z 3M 64k"]);
        assert_encrypts_as_qemu_reads(&daemon, dir, &top, &key);
    }

    // qcow2 over qcow2 over a compressed qcow2, sizes taken from the backing file.
    let packed = dir.join("packed.qcow2");
    let loose = dir.join("loose.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", text(&loose), "4M"]);
    write("qcow2", &loose, 0x66, &[("0", "2M")]);
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        text(&loose),
        text(&packed),
    ]);
    let middle = dir.join("middle.qcow2");
    overlay(&middle, "packed.qcow2", "qcow2", None);
    write("qcow2", &middle, 0x77, &[("1M", "4k")]);
    let upper = dir.join("upper.qcow2");
    overlay(&upper, "middle.qcow2", "qcow2", None);
    qemu_io("qcow2", &upper, &["write -z 0 64k"]);
    assert_encrypts_as_qemu_reads(&daemon, dir, &upper, &key);
}

#[test]
fn a_missing_backing_file_is_named_and_leaves_no_output() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone/base.qcow2",
        "-F",
        "qcow2",
        text(&top),
        "4M",
    ]);
    let output = dir.join("out.luks");
    let result = encrypt(&daemon, &top, &output, &key, &[]);
    assert!(!result.status.success(), "{}", describe(&result));
    let message = describe(&result);
    assert!(message.contains("gone/base.qcow2"), "{message}");
    assert!(message.contains("backing file"), "{message}");
    assert!(message.contains("not found"), "{message}");
    assert!(!output.exists());
    let leftovers: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().contains("out.luks"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn an_encrypted_qcow2_source_is_read_with_its_source_key() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source_key = dir.join("source.k");
    write_key(&source_key);
    let object = qemu_secret(&source_key);
    let source = dir.join("enc.qcow2");
    qemu_create_encrypted_qcow2(&source, &source_key, "16M");
    let opts = encrypted_qcow2_opts(&source);
    run_ok(
        std::process::Command::new("qemu-io")
            .args(["--object", &object, "--image-opts", &opts])
            .args(["-c", "write -P 0x5a 0 1M", "-c", "write -P 0x6b 5M 300k"])
            .args(["-c", "write -z 512k 64k", "-c", "write -P 0x7c 15M 1M"]),
    );
    let expected = dir.join("expected.raw");
    qemu_decrypt_qcow2(&source, &source_key, &expected);

    let output = dir.join("out.luks");
    // Without the source key: refused, saying how to pass it.
    let result = encrypt(&daemon, &source, &output, &key, &[]);
    assert!(!result.status.success());
    let message = describe(&result);
    assert!(message.contains("--source-key-file"), "{message}");
    assert!(!output.exists());
    // With the wrong one: WrongKey, nothing written.
    let result = encrypt(
        &daemon,
        &source,
        &output,
        &key,
        &["--source-key-file", text(&key)],
    );
    assert!(!result.status.success());
    let message = describe(&result);
    assert!(message.contains("wrong key"), "{message}");
    assert!(message.contains("--source-key-file"), "{message}");
    assert!(!output.exists());

    let result = encrypt(
        &daemon,
        &source,
        &output,
        &key,
        &["--source-key-file", text(&source_key)],
    );
    daemon.assert_ok(&result, "imgctl");
    assert_eq!(last_json_summary(&result.stdout)["source_format"], "qcow2");
    let plaintext = independent_decrypt(&output, &key, dir);
    assert_plaintext_matches(&plaintext, &expected);

    // A source key for a plain source is a mistake, said so.
    let plain = dir.join("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", text(&plain), "1M"]);
    let result = encrypt(
        &daemon,
        &plain,
        &output,
        &key,
        &["--source-key-file", text(&source_key)],
    );
    assert!(!result.status.success());
    assert!(
        describe(&result).contains("not an encrypted qcow2"),
        "{}",
        describe(&result)
    );
}

#[test]
fn a_qcow2_with_an_external_data_file_encrypts_to_what_qemu_reads() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    fs::create_dir(dir.join("data")).unwrap();
    let data = dir.join("data/guest.raw");
    let meta = dir.join("meta.qcow2");
    // An absolute name: qemu and imgctl find it the same way.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        text(&meta),
        "8M",
    ]);
    write("qcow2", &meta, 0x21, &[("0", "1M"), ("6M", "64k")]);
    qemu_io("qcow2", &meta, &["write -z 512k 64k"]);
    assert_encrypts_as_qemu_reads(&daemon, dir, &meta, &key);
}
