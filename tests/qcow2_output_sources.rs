//! `imgctl encrypt --format qcow2` from the newer source formats — VHDX (dynamic and fixed),
//! VMDK (streamOptimized, the OVA disk, and monolithicSparse) and qcow2 (plain, and compressed
//! with clusters smaller than the output's) — judged by qemu-img alone: `check` finds no errors
//! or leaks, `compare` with the source read by qemu's own driver says identical, `info` shows
//! the source's virtual size, and the output stores only what the source holds.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

const MIB: u64 = 1 << 20;

/// `qemu-img convert` of `raw` into `format` with `options` (and `extra` flags such as `-c`).
fn converted(
    raw: &Path,
    dir: &Path,
    name: &str,
    format: &str,
    options: &str,
    extra: &[&str],
) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", format];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend_from_slice(extra);
    args.extend([raw.to_str().unwrap(), path.to_str().unwrap()]);
    qemu_img(&args);
    path
}

fn qemu_info(image: &Path, format: &str) -> serde_json::Value {
    let info = qemu_img(&[
        "info",
        "-f",
        format,
        "--output=json",
        image.to_str().unwrap(),
    ]);
    serde_json::from_slice(&info.stdout).unwrap()
}

#[test]
fn vhdx_vmdk_and_qcow2_sources_become_qcow2_images_qemu_img_finds_identical() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    // Data at the start, mid-image, across a 2 MiB boundary and at the very end; holes between.
    let raw = make_source(dir, SourceKind::Raw, "40M");
    let sources = [
        converted(
            &raw,
            dir,
            "dynamic.vhdx",
            "vhdx",
            "subformat=dynamic,block_size=1M",
            &[],
        ),
        converted(&raw, dir, "fixed.vhdx", "vhdx", "subformat=fixed", &[]),
        converted(
            &raw,
            dir,
            "stream.vmdk",
            "vmdk",
            "subformat=streamOptimized",
            &[],
        ),
        converted(
            &raw,
            dir,
            "sparse.vmdk",
            "vmdk",
            "subformat=monolithicSparse",
            &[],
        ),
        converted(&raw, dir, "plain.qcow2", "qcow2", "compat=1.1", &[]),
        converted(
            &raw,
            dir,
            "compressed.qcow2",
            "qcow2",
            "compat=1.1,cluster_size=4096",
            &["-c"],
        ),
    ];
    let wrong = dir.join("wrong");
    write_key(&wrong);
    for source in &sources {
        let name = source.file_name().unwrap().to_str().unwrap();
        let source_format = qemu_format(source);
        let source_format = if name.ends_with(".qcow2") {
            "qcow2"
        } else {
            source_format
        };
        let output = dir.join(format!("{name}.out.qcow2"));
        let result = run(daemon
            .encrypt(source, &output, &key)
            .args(["--format", "qcow2", "--json"]));
        daemon.assert_ok(&result, name);
        let summary = last_json_summary(&result.stdout);
        assert_eq!(summary["output_format"], "qcow2", "{name}: {summary}");

        let info = qemu_info(&output, "qcow2");
        let source_size = qemu_info(source, source_format)["virtual-size"]
            .as_u64()
            .unwrap();
        assert_eq!(info["virtual-size"], source_size, "{name}: {info}");
        assert_eq!(info["encrypted"], true, "{name}");
        assert_eq!(info["format-specific"]["data"]["encrypt"]["format"], "luks");

        assert_qemu_check_and_compare(&output, &key, source, source_format);

        // The same check with another key fails: the comparison above needed the key.
        let refused = run(std::process::Command::new("qemu-img").args([
            "compare",
            "--object",
            &qemu_secret(&wrong),
            "--image-opts",
            &encrypted_qcow2_opts(&output),
            &format!("driver={source_format},file.filename={}", source.display()),
        ]));
        assert!(!refused.status.success(), "{name}: a wrong key compared");

        // Sparse: make_source writes about 330 KiB; the 40 MiB disk is not stored.
        let allocated = summary["allocated_bytes"].as_u64().unwrap();
        assert!(allocated <= 8 * MIB, "{name}: {summary}");
        let stored = fs::metadata(&output).unwrap().blocks() * 512;
        assert!(
            stored <= allocated + 3 * MIB,
            "{name}: {stored} bytes stored for {allocated} bytes of data"
        );
    }
}
