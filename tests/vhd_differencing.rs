//! Differencing VHDs end to end, through imgctl's parent resolution and a real imgcryptd.
//!
//! qemu-img cannot make a differencing VHD, so `tests/support/vhd_diff.py` (written from the
//! VHD specification, no code of ours) writes one over a parent that qemu-img made and qemu-io
//! wrote, and computes the disk it holds: the parent's `qemu-img convert -O raw` with the
//! child's sectors applied. The generator fills the sectors of a child block that its bitmap
//! does not mark with 0xEE, so a reader that ignores the bitmap fails. Its structure is
//! checked by qemu, which reads a differencing VHD's own blocks (ignoring the parent): those
//! must hold what the generator put there. blktap's `vhd-util` is not available here to check
//! the locators and bitmaps too. The LUKS output is decrypted independently (cryptsetup's
//! volume key, Python `cryptography`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

/// A dynamic VHD made by qemu-img at `path`, written by qemu-io with `writes` (pattern, offset,
/// length); returns its guest disk as qemu reads it.
fn qemu_parent(path: &Path, size: &str, writes: &[(u8, u64, u64)]) -> PathBuf {
    qemu_create(path, "vpc", &["-o", "subformat=dynamic"], size);
    qemu_write("vpc", path, writes);
    let raw = path.with_extension("raw");
    qemu_plaintext_as("vpc", path, &raw);
    raw
}

/// Writes the differencing VHD `child` over `parent` (whose guest disk is `parent_raw`) with
/// `arguments` for the generator (locators, name, writes); returns the disk the child holds.
fn differencing(parent: &Path, parent_raw: &Path, child: &Path, arguments: &[&str]) -> PathBuf {
    let expected = child.with_extension("expected");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/vhd_diff.py");
    run_ok(
        Command::new("python3")
            .arg(script)
            .arg(parent)
            .arg(parent_raw)
            .arg(child)
            .arg(&expected)
            .args(arguments),
    );
    check_structure_with_qemu(child, arguments);
    expected
}

/// qemu reads a differencing VHD's own blocks: each 2 MiB block the generator's writes touch
/// holds those writes and 0xEE elsewhere, every other block zeros.
fn check_structure_with_qemu(child: &Path, arguments: &[&str]) {
    let own = child.with_extension("own");
    qemu_plaintext_as("vpc", child, &own);
    let bytes = fs::read(&own).unwrap();
    let block = 2 * MIB as usize;
    let mut model = vec![0u8; bytes.len()];
    let writes: Vec<(usize, usize, u8)> = arguments
        .windows(2)
        .filter(|pair| pair[0] == "--write")
        .map(|pair| {
            let parts: Vec<u64> = pair[1]
                .split(':')
                .map(|part| match part.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
                    None => part.parse().unwrap(),
                })
                .collect();
            (parts[0] as usize, parts[1] as usize, parts[2] as u8)
        })
        .collect();
    for &(offset, length, _) in &writes {
        for index in offset / block..=(offset + length - 1) / block {
            let end = ((index + 1) * block).min(model.len());
            model[index * block..end].fill(0xee);
        }
    }
    for &(offset, length, value) in &writes {
        model[offset..offset + length].fill(value);
    }
    assert!(
        bytes == model,
        "qemu reads other blocks from {} than the generator wrote",
        child.display()
    );
    fs::remove_file(own).unwrap();
}

/// Encrypts `source` and checks that the decrypted output is `expected`; returns the summary.
fn encrypt_and_compare(
    daemon: &Daemon,
    dir: &Path,
    source: &Path,
    key: &Path,
    expected: &Path,
) -> serde_json::Value {
    let image = dir.join("image.luks");
    let _ = fs::remove_file(&image);
    let result = run(daemon.encrypt(source, &image, key).arg("--json"));
    assert!(result.status.success(), "{}", describe(&result));
    let summary = last_json_summary(&result.stdout);
    let plain = independent_decrypt(&image, key, dir);
    assert_plaintext_matches(&plain, expected);
    fs::remove_file(plain).unwrap();
    summary
}

#[test]
fn a_differencing_vhd_encrypts_to_its_parent_with_its_sectors_applied() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    fs::create_dir(dir.join("sub")).unwrap();
    let parent = dir.join("sub/parent.vhd");
    let parent_raw = qemu_parent(
        &parent,
        "12M",
        &[
            (0x11, 0, MIB),
            (0x22, 3 * MIB, 512 * 1024),
            (0x23, 6 * MIB - 4096, 8192),
            (0x24, 9 * MIB + 512, 1536),
        ],
    );
    // A decoy beside the child under the parent's base name: another disk (another unique
    // id). The relative locator comes first, so it is never chosen.
    qemu_parent(&dir.join("parent.vhd"), "12M", &[(0x99, 0, MIB)]);
    let child = dir.join("child.vhd");
    let expected = differencing(
        &parent,
        &parent_raw,
        &child,
        &[
            "--locator",
            "w2ku:C:\\vms\\parent.vhd",
            "--locator",
            "w2ru:.\\sub\\parent.vhd",
            "--name",
            "parent.vhd",
            // Inside the parent's data, across a block boundary, single sectors, and in a
            // block the parent never wrote.
            "--write",
            "4096:8192:0x33",
            "--write",
            "2096640:1024:0x34",
            "--write",
            "3146240:512:0x35",
            "--write",
            "6291456:4096:0x36",
            "--write",
            "10485760:65536:0x37",
        ],
    );
    let summary = encrypt_and_compare(&daemon, dir, &child, &key, &expected);
    assert_eq!(summary["source_format"], "vhd_differencing", "{summary}");
    assert_eq!(
        summary["virtual_size"].as_u64().unwrap(),
        fs::metadata(&parent_raw).unwrap().len()
    );
}

/// base.vhd (qemu-img) in layers/, middle.vhd over it beside it, top.vhd over middle in `dir`;
/// returns top.vhd and the disk it holds.
fn chain_of_three(dir: &Path) -> (PathBuf, PathBuf) {
    fs::create_dir(dir.join("layers")).unwrap();
    let base = dir.join("layers/base.vhd");
    let base_raw = qemu_parent(&base, "8M", &[(0x41, 0, 3 * MIB), (0x42, 5 * MIB, MIB)]);
    let middle = dir.join("layers/middle.vhd");
    // blktap's form: its relative path as a file:// URL (relative to middle.vhd's directory).
    let middle_disk = differencing(
        &base,
        &base_raw,
        &middle,
        &[
            "--locator",
            "macx:file://./base.vhd",
            "--write",
            "1048576:1048576:0x51",
            "--write",
            "6291456:512:0x52",
        ],
    );
    let top = dir.join("top.vhd");
    let expected = differencing(
        &middle,
        &middle_disk,
        &top,
        &[
            "--locator",
            "w2ru:.\\layers\\middle.vhd",
            "--write",
            "1572864:4096:0x61",
            "--write",
            "7340032:8192:0x62",
        ],
    );
    (top, expected)
}

#[test]
fn a_chain_of_three_resolves_each_parent_beside_the_file_naming_it() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let (top, expected) = chain_of_three(dir);
    let summary = encrypt_and_compare(&daemon, dir, &top, &key, &expected);
    assert_eq!(summary["source_format"], "vhd_differencing", "{summary}");
}

#[test]
fn inspect_shows_the_chain_by_the_names_each_layer_records() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let (top, _) = chain_of_three(dir);
    let result = run_ok(daemon.imgctl().arg("inspect").arg(&top).arg("--json"));
    let info: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    let chain = find(&info, "backing_chain").unwrap_or_else(|| panic!("no chain: {info}"));
    let layers: Vec<(&str, &str)> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            (
                layer["name"].as_str().unwrap(),
                layer["format"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        layers,
        [
            ("./layers/middle.vhd", "vhd_differencing"),
            ("./base.vhd", "vhd_dynamic")
        ],
        "{info}"
    );
}

/// The first value under `key` anywhere in `value`.
fn find<'v>(value: &'v serde_json::Value, key: &str) -> Option<&'v serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|inner| find(inner, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|inner| find(inner, key)),
        _ => None,
    }
}

#[test]
fn a_missing_parent_is_named_and_nothing_is_written() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let parent = dir.join("gone.vhd");
    let parent_raw = qemu_parent(&parent, "4M", &[(0x11, 0, MIB)]);
    let child = dir.join("child.vhd");
    differencing(
        &parent,
        &parent_raw,
        &child,
        &["--locator", "w2ru:.\\gone.vhd", "--write", "0:4096:0x33"],
    );
    fs::remove_file(&parent).unwrap();
    let output = dir.join("out.luks");
    let result = run(&mut daemon.encrypt(&child, &output, &key));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{}", describe(&result));
    for words in ["parent disk", "./gone.vhd", "not found", "vhd-util modify"] {
        assert!(stderr.contains(words), "{words}: {}", describe(&result));
    }
    assert!(!output.exists());
    assert!(!PathBuf::from(format!("{}.partial", output.display())).exists());
}
