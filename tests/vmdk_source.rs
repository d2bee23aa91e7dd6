//! VMDK sources end to end through imgctl and a real imgcryptd: a twoGbMaxExtentSparse
//! descriptor in another directory than the one imgctl runs in (imgctl resolves its extent
//! relative to the descriptor, opens it and passes it as a companion), a monolithicFlat one,
//! and an OVA built with `tar` around a streamOptimized disk. The LUKS output is decrypted
//! independently (cryptsetup's volume key and Python `cryptography`) and by `imgctl decrypt`,
//! and compared with `qemu-img convert -O raw` of the source.
//!
//! Every subformat, extent boundaries at 2 GiB, the corpus VMDKs and hostile images are tested
//! against the reader in `daemon/tests/formats_qemu/vmdk.rs`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

/// A VMDK of `size` bytes made by `qemu-img create -o subformat=…` and written by `qemu-io` at
/// scattered, partly unaligned places.
fn make_vmdk(dir: &Path, name: &str, size: u64, subformat: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        &format!("subformat={subformat}"),
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
    qemu_io(
        "vmdk",
        &path,
        &[
            "write -P 0x11 0 65536",
            "write -P 0x22 3146240 9216",
            "write -P 0x33 17825792 1048576",
            &format!("write -P 0x44 {} 4096", size - 4096),
        ],
    );
    path
}

/// Encrypts `source` (imgctl running in `cwd`), checks the summary, and compares both
/// decryptions with qemu's reading of the VMDK.
fn assert_encrypts_like_qemu(
    daemon: &Daemon,
    dir: &Path,
    cwd: &Path,
    source: &Path,
    qemu_source: &Path,
) {
    let key = dir.join("k");
    write_key(&key);
    let image = dir.join("image.luks");
    let _ = fs::remove_file(&image);
    let result = run(daemon
        .encrypt(source, &image, &key)
        .current_dir(cwd)
        .arg("--json"));
    assert!(result.status.success(), "{}", describe(&result));
    let summary = last_json_summary(&result.stdout);
    assert_eq!(summary["source_format"], "vmdk");
    let expected = dir.join("expected.raw");
    qemu_plaintext_as("vmdk", qemu_source, &expected);
    assert_eq!(
        summary["virtual_size"].as_u64().unwrap(),
        fs::metadata(&expected).unwrap().len()
    );
    let plain = independent_decrypt(&image, &key, dir);
    assert_plaintext_matches(&plain, &expected);
    let decrypted = dir.join("decrypted.raw");
    let _ = fs::remove_file(&decrypted);
    run_ok(&mut daemon.decrypt(&image, &decrypted, &key));
    assert_plaintext_matches(&decrypted, &expected);
    for file in [&image, &expected, &plain, &decrypted] {
        fs::remove_file(file).unwrap();
    }
}

#[test]
fn multi_file_vmdks_in_another_directory_encrypt_to_what_qemu_reads() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let disks = dir.join("vm").join("disks");
    fs::create_dir_all(&disks).unwrap();
    let elsewhere = dir.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    for subformat in ["twoGbMaxExtentSparse", "monolithicFlat"] {
        let descriptor = make_vmdk(
            &disks,
            &format!("{subformat}.vmdk"),
            40 * MIB + 512,
            subformat,
        );
        // A relative source path from another directory: the extent is still found beside
        // the descriptor.
        let relative = PathBuf::from("../vm/disks").join(descriptor.file_name().unwrap());
        assert_encrypts_like_qemu(&daemon, dir, &elsewhere, &relative, &descriptor);
    }
}

#[test]
fn an_ova_encrypts_to_what_qemu_reads_from_its_disk() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let sparse = make_vmdk(dir, "sparse.vmdk", 24 * MIB, "monolithicSparse");
    let disk = dir.join("appliance-disk1.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "vmdk",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        sparse.to_str().unwrap(),
        disk.to_str().unwrap(),
    ]);
    fs::write(dir.join("appliance.ovf"), "<Envelope/>\n").unwrap();
    let ova = dir.join("appliance.ova");
    run_ok(
        Command::new("tar")
            .current_dir(dir)
            .arg("-cf")
            .arg(&ova)
            .args(["appliance.ovf", "appliance-disk1.vmdk"]),
    );
    assert_encrypts_like_qemu(&daemon, dir, dir, &ova, &disk);
}
