//! `imgctl encrypt --format qcow2` and the jobs that read qcow2 images, judged by the real
//! qemu-img: `check`, `info`, `compare` and `convert` with the key as a qemu secret, a wrong key
//! refused by qemu, the file's allocated size; our `decrypt`/`verify`/`inspect` on images that
//! qemu-img made; `rewrite -k` giving a keyslot qemu then accepts; nothing left behind on
//! cancellation or failure.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn partial_of(output: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", output.display()))
}

/// qemu-img with arguments, success or not (for the refusals).
fn qemu_img_status(args: &[&str]) -> Output {
    run(Command::new("qemu-img").args(args))
}

fn encrypt_qcow2(daemon: &Daemon, source: &Path, output: &Path, key: &Path) -> serde_json::Value {
    let result = run(daemon
        .encrypt(source, output, key)
        .args(["--format", "qcow2", "--json"]));
    daemon.assert_ok(&result, "imgctl failed");
    assert!(!partial_of(output).exists());
    last_json_line(&result.stdout)
}

fn last_json_line(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON in:\n{text}"));
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    value.get("summary").cloned().unwrap_or(value)
}

/// What qemu-img says about an encrypted qcow2 with the right key: check is clean, compare
/// with the source is identical, convert gives the source's plaintext.
fn assert_qemu_reads(image: &Path, key: &Path, source: &Path, dir: &Path) {
    assert_qemu_check_and_compare(image, key, source, qemu_format(source));
    let converted = dir.join("qemu-view.raw");
    let _ = fs::remove_file(&converted);
    qemu_decrypt_qcow2(image, key, &converted);
    let expected = dir.join("expected.raw");
    let _ = fs::remove_file(&expected);
    qemu_plaintext(source, &expected);
    assert_eq!(
        fs::read(&converted).unwrap(),
        fs::read(&expected).unwrap(),
        "qemu-img convert of the output is the source's plaintext"
    );
}

/// qemu-img refuses the image with `key`.
fn assert_qemu_refuses_key(image: &Path, key: &Path) {
    let output = qemu_img_status(&[
        "check",
        "--object",
        &qemu_secret(key),
        "--image-opts",
        &encrypted_qcow2_opts(image),
    ]);
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Invalid password"), "{stderr}");
}

fn qemu_info(image: &Path) -> serde_json::Value {
    let info = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
    serde_json::from_slice(&info.stdout).unwrap()
}

#[test]
fn raw_and_vhd_sources_become_qcow2_images_qemu_img_reads() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let wrong = dir.join("wrong");
    write_key(&wrong);
    for kind in [
        SourceKind::Raw,
        SourceKind::VhdFixed,
        SourceKind::VhdDynamic,
    ] {
        let source = make_source(dir, kind, "40M");
        let output = dir.join("disk.qcow2");
        let _ = fs::remove_file(&output);
        let summary = encrypt_qcow2(&daemon, &source, &output, &key);
        assert_eq!(summary["output_format"], "qcow2", "{kind:?}: {summary}");

        let info = qemu_info(&output);
        let virtual_size = qemu_virtual_size(&source).div_ceil(512) * 512;
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], virtual_size, "{kind:?}");
        assert_eq!(info["encrypted"], true, "{kind:?}");
        let encrypt = &info["format-specific"]["data"]["encrypt"];
        assert_eq!(encrypt["format"], "luks", "{info}");
        assert_eq!(encrypt["cipher-alg"], "aes-256", "{info}");
        assert_eq!(encrypt["cipher-mode"], "xts", "{info}");
        assert_eq!(encrypt["ivgen-alg"], "plain64", "{info}");
        assert_eq!(summary["output_virtual_size"], virtual_size);

        assert_qemu_reads(&output, &key, &source, dir);
        assert_qemu_refuses_key(&output, &wrong);
        // make_source writes about 330 KiB in four places. RAW and fixed VHD sources report
        // those 4 KiB extents (a few 64 KiB clusters here); a dynamic VHD allocates whole 2 MiB
        // blocks, and those are what it holds. Either way the file stores the allocated
        // clusters, 2 MiB of LUKS header and a few clusters of tables, not 40 MiB.
        let allocated = summary["allocated_bytes"].as_u64().unwrap();
        let limit = if kind == SourceKind::VhdDynamic {
            5 * 2 * MIB
        } else {
            MIB
        };
        assert!(allocated <= limit, "{kind:?}: {summary}");
        let stored = fs::metadata(&output).unwrap().blocks() * 512;
        assert!(
            stored <= allocated + 3 * MIB,
            "{kind:?}: {stored} bytes stored for {allocated} bytes of data"
        );
    }
}

#[test]
fn a_4_gib_source_with_a_few_mib_of_data_gives_a_few_mib_file() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = dir.join("big.raw");
    fs::File::create(&source).unwrap().set_len(4 << 30).unwrap();
    qemu_io(
        "raw",
        &source,
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 1G 2M",
            "write -P 0x63 3900M 1M",
        ],
    );
    let output = dir.join("big.qcow2");
    let summary = encrypt_qcow2(&daemon, &source, &output, &key);
    assert_eq!(summary["allocated_bytes"], 4 * MIB, "{summary}");
    let metadata = fs::metadata(&output).unwrap();
    assert!(metadata.len() < 8 * MIB, "file length {}", metadata.len());
    assert!(
        metadata.blocks() * 512 < 8 * MIB,
        "{} bytes stored",
        metadata.blocks() * 512
    );
    assert_eq!(qemu_info(&output)["virtual-size"], 4u64 << 30);
    assert_qemu_reads(&output, &key, &source, dir);
}

#[test]
fn zero_clusters_of_a_source_without_holes_are_not_stored_like_qemu_img_convert() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    // 1 GiB written with zeros (no holes at all), then a few MiB of data at scattered, partly
    // unaligned offsets, and one byte at the very end.
    let source = dir.join("dd-made.raw");
    run_ok(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", source.display()),
        "bs=4M",
        "count=256",
        "conv=fsync",
        "status=none",
    ]));
    assert!(
        fs::metadata(&source).unwrap().blocks() * 512 >= 1 << 30,
        "the source must be fully allocated"
    );
    qemu_io(
        "raw",
        &source,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 100M 512k",
            "write -P 0x33 300M 4096",
            "write -P 0x44 777777k 1536k",
            "write -P 0x55 1000M 64k",
            "write -P 0x66 1073741312 512",
        ],
    );
    let output = dir.join("dd-made.qcow2");
    let summary = encrypt_qcow2(&daemon, &source, &output, &key);
    assert_qemu_reads(&output, &key, &source, dir);

    let reference = dir.join("qemu-made.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "--object",
        &qemu_secret(&key),
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        source.to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    let stored = |path: &Path| fs::metadata(path).unwrap().blocks() * 512;
    let (ours, qemus) = (stored(&output), stored(&reference));
    assert!(
        ours <= 2 * qemus + 4 * MIB,
        "ours stores {ours} bytes, qemu-img convert {qemus}: {summary}"
    );
    assert!(fs::metadata(&output).unwrap().len() <= 2 * qemus + 4 * MIB);
    // The data spans 1 MiB + 512 KiB + 64 KiB + 1600 KiB (1536 KiB unaligned: 25 clusters) +
    // 64 KiB + 64 KiB of clusters.
    let allocated = summary["allocated_bytes"].as_u64().unwrap();
    assert_eq!(
        allocated,
        (16 + 8 + 1 + 25 + 1 + 1) * 64 * 1024,
        "{summary}"
    );
}

#[test]
fn a_source_of_written_zeros_gives_a_qcow2_without_data_clusters() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = dir.join("zeros.raw");
    fs::write(&source, vec![0u8; (8 * MIB + 512) as usize]).unwrap();
    let output = dir.join("zeros.qcow2");
    let summary = encrypt_qcow2(&daemon, &source, &output, &key);
    assert_eq!(summary["allocated_bytes"], 0, "{summary}");
    assert_eq!(qemu_info(&output)["virtual-size"], 8 * MIB + 512);
    assert_qemu_reads(&output, &key, &source, dir);
    // Our own readers too: an image without data clusters decrypts and verifies as zeros.
    let plain = dir.join("zeros.plain");
    run_ok(&mut daemon.decrypt(&output, &plain, &key));
    assert_eq!(fs::read(&plain).unwrap(), fs::read(&source).unwrap());
    run_ok(&mut daemon.verify(&output, &source, &key));
}

/// An encrypted qcow2 made by qemu-img alone from `source`, with zero clusters written over
/// part of the data and over a hole; returns it and qemu's plaintext view of it.
fn qemu_made_qcow2(dir: &Path, source: &Path, key: &Path) -> (PathBuf, PathBuf) {
    let image = dir.join("qemu-made.qcow2");
    let _ = fs::remove_file(&image);
    let object = qemu_secret(key);
    let size = qemu_virtual_size(source).to_string();
    qemu_create_encrypted_qcow2(&image, key, &size);
    let opts = encrypted_qcow2_opts(&image);
    qemu_img(&[
        "convert",
        "-n",
        "-f",
        qemu_format(source),
        "--object",
        &object,
        "--target-image-opts",
        source.to_str().unwrap(),
        &opts,
    ]);
    run_ok(Command::new("qemu-io").args([
        "--object",
        &object,
        "--image-opts",
        &opts,
        "-c",
        "write -z 0 64k",
        "-c",
        "write -z 2M 64k",
    ]));
    let view = dir.join("qemu-made.raw");
    let _ = fs::remove_file(&view);
    qemu_decrypt_qcow2(&image, key, &view);
    (image, view)
}

#[test]
fn decrypt_verify_and_inspect_read_qemu_made_and_our_qcow2_images() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::VhdDynamic, "12M");
    let (qemu_made, qemu_view) = qemu_made_qcow2(dir, &source, &key);
    let ours = dir.join("ours.qcow2");
    encrypt_qcow2(&daemon, &source, &ours, &key);
    let source_view = dir.join("source.raw");
    qemu_plaintext(&source, &source_view);

    for (image, expected) in [(&qemu_made, &qemu_view), (&ours, &source_view)] {
        let plain = dir.join("plain.raw");
        let _ = fs::remove_file(&plain);
        let output = run(&mut daemon.decrypt(image, &plain, &key));
        assert!(output.status.success(), "{image:?}: {}", describe(&output));
        assert_eq!(
            fs::read(&plain).unwrap(),
            fs::read(expected).unwrap(),
            "{image:?}: decrypt gives the guest's disk, exactly its virtual size"
        );

        let verified = run(&mut daemon.verify(image, expected, &key));
        assert!(
            verified.status.success(),
            "{image:?}: {}",
            describe(&verified)
        );

        let inspected = run(daemon
            .imgctl()
            .arg("inspect")
            .arg(image)
            .arg("--json")
            .arg("--key-file")
            .arg(&key));
        assert!(
            inspected.status.success(),
            "{image:?}: {}",
            describe(&inspected)
        );
        let info = last_json_line(&inspected.stdout);
        assert_eq!(info["format"], "qcow2", "{info}");
        assert_eq!(info["luks_version"], "luks1", "{info}");
        assert_eq!(
            info["virtual_size"].as_u64(),
            Some(fs::metadata(expected).unwrap().len()),
            "{info}"
        );
        assert_inspect_matches_qemu(&info, image, &key);
    }

    // A different key is refused, and nothing is written.
    let wrong = dir.join("wrong");
    write_key(&wrong);
    let plain = dir.join("wrong.raw");
    let output = run(&mut daemon.decrypt(&qemu_made, &plain, &wrong));
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(!plain.exists() && !partial_of(&plain).exists());
}

/// Guest bytes qemu says `image` holds as data (`qemu-img map` with the key: extents with
/// data, not zero clusters). qemu reports no file offsets for an encrypted qcow2.
fn qemu_data_bytes(image: &Path, key: &Path) -> u64 {
    let map = qemu_img(&[
        "map",
        "--output=json",
        "--object",
        &qemu_secret(key),
        "--image-opts",
        &encrypted_qcow2_opts(image),
    ]);
    let extents: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout).unwrap();
    extents
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// The data clusters of a qcow2 (v2/v3, no extended L2 entries, no backing file) read from its
/// L1 and L2 tables as the qcow2 specification lays them out: (guest bytes they hold, clipped
/// to the virtual size; lowest host offset).
fn data_clusters_from_tables(image: &Path) -> (u64, Option<u64>) {
    let bytes = fs::read(image).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as u64;
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    assert_eq!(&bytes[..4], b"QFI\xfb");
    let cluster_bits = be32(20);
    let cluster = 1u64 << cluster_bits;
    let virtual_size = be64(24);
    let l1_size = be32(36);
    let l1_offset = be64(40) as usize;
    if be32(4) >= 3 {
        assert_eq!(be64(72) & (1 << 4), 0, "extended L2 entries");
    }
    const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    let per_l2 = cluster / 8;
    let (mut guest_bytes, mut first) = (0u64, None::<u64>);
    for l1_index in 0..l1_size {
        let l2_offset = (be64(l1_offset + 8 * l1_index as usize) & OFFSET_MASK) as usize;
        if l2_offset == 0 {
            continue;
        }
        for l2_index in 0..per_l2 {
            let guest = (l1_index * per_l2 + l2_index) * cluster;
            if guest >= virtual_size {
                break;
            }
            let entry = be64(l2_offset + 8 * l2_index as usize);
            assert_eq!(entry & (1 << 62), 0, "a compressed cluster");
            let host = entry & OFFSET_MASK;
            if host == 0 || entry & 1 != 0 {
                continue; // unallocated, or reads as zeros
            }
            guest_bytes += cluster.min(virtual_size - guest);
            first = Some(first.map_or(host, |f| f.min(host)));
        }
    }
    (guest_bytes, first)
}

/// `imgctl inspect`'s facts of a qcow2+LUKS image against the file and what qemu-img reports:
/// stored bytes and the first data cluster (the file's tables, and `qemu-img map`), the file's
/// size, and the LUKS header's UUID, cipher and active keyslots (`qemu-img info`).
fn assert_inspect_matches_qemu(info: &serde_json::Value, image: &Path, key: &Path) {
    let (stored, first) = data_clusters_from_tables(image);
    assert!(stored > 0, "{image:?}: no data clusters");
    assert_eq!(
        qemu_data_bytes(image, key),
        stored,
        "{image:?}: qemu-img map"
    );
    assert_eq!(
        info["allocated_bytes"].as_u64(),
        Some(stored),
        "{image:?}: {info}"
    );
    assert_eq!(
        info["payload_size"].as_u64(),
        Some(stored),
        "{image:?}: {info}"
    );
    assert_eq!(info["data_offset"].as_u64(), first, "{image:?}: {info}");
    assert_eq!(
        info["image_size"].as_u64(),
        Some(fs::metadata(image).unwrap().len()),
        "{image:?}: {info}"
    );
    let qemu = qemu_info(image);
    let encrypt = &qemu["format-specific"]["data"]["encrypt"];
    assert_eq!(info["uuid"], encrypt["uuid"], "{image:?}: {info}");
    // qemu's aes-256 in xts mode is a 512-bit XTS key; plain64 IVs; 512-byte sectors.
    assert_eq!(
        (
            encrypt["cipher-alg"].as_str(),
            encrypt["cipher-mode"].as_str()
        ),
        (Some("aes-256"), Some("xts"))
    );
    assert_eq!(info["cipher"], "aes-xts-plain64", "{image:?}: {info}");
    assert_eq!(info["key_size_bits"], 512, "{image:?}: {info}");
    assert_eq!(info["sector_size"], 512, "{image:?}: {info}");
    let active = encrypt["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|slot| slot["active"] == true)
        .count();
    assert_eq!(
        info["keyslots"].as_array().map(Vec::len),
        Some(active),
        "{image:?}: {info}"
    );
}

/// `old.key`, `new.key` and the ring rotating from old to new.
fn old_new_ring(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let keys = rotation_keys(dir, &[]);
    (keys.old, keys.new, keys.ring)
}

#[test]
fn rewrite_k_gives_a_qcow2_a_keyslot_qemu_accepts_and_removes_the_old_one() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let (old, new, ring) = old_new_ring(dir);
    let source = make_source(dir, SourceKind::Raw, "8M");
    let ours = dir.join("ours.qcow2");
    encrypt_qcow2(&daemon, &source, &ours, &old);
    let (qemu_made, _) = qemu_made_qcow2(dir, &source, &old);

    for image in [&ours, &qemu_made] {
        let before = fs::read(image).unwrap();
        let output = run(&mut rewrite_k(&daemon, &ring, image, CHEAP_PBKDF));
        assert!(output.status.success(), "{image:?}: {}", describe(&output));
        assert_qemu_refuses_key(image, &old);
        let object = qemu_secret(&new);
        let check = qemu_img(&[
            "check",
            "--object",
            &object,
            "--image-opts",
            &encrypted_qcow2_opts(image),
        ]);
        assert!(String::from_utf8_lossy(&check.stdout).contains("No errors were found"));
        // Only the LUKS header region changed: qcow2 metadata and data clusters are as before.
        let after = fs::read(image).unwrap();
        assert_eq!(after.len(), before.len());
        let info = qemu_info(image);
        assert_eq!(info["encrypted"], true);
        let changed: Vec<usize> = before
            .chunks(65536)
            .zip(after.chunks(65536))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(index, _)| index)
            .collect();
        assert!(!changed.is_empty());
        // Our layout and qemu-img's both keep the LUKS header in the 2 MiB after the first
        // clusters; nothing past it changes.
        assert!(
            changed.iter().all(|&cluster| (1..40).contains(&cluster)),
            "{image:?}: clusters {changed:?} changed"
        );
    }
    assert_qemu_reads(&ours, &new, &source, dir);
}

#[test]
fn a_cancelled_or_failed_qcow2_encryption_leaves_no_output() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();

    // Failure before any byte: qemu reads only LUKS1, whose keyslots are pbkdf2.
    let source = make_source(dir, SourceKind::Raw, "8M");
    let output = dir.join("refused.qcow2");
    let refused = run(daemon
        .encrypt_keyed(&source, &output, &key)
        .args(["--format", "qcow2", "--pbkdf", "argon2id"]));
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(!output.exists() && !partial_of(&output).exists());

    // Cancellation mid-copy: 1 GiB of written, non-zero data takes seconds to encrypt (zeros
    // would be dropped by the copy's zero check, leaving nothing to write).
    let big = dir.join("dense.raw");
    let file = fs::File::create(&big).unwrap();
    let block = vec![0x5au8; MIB as usize];
    for index in 0..1024u64 {
        std::os::unix::fs::FileExt::write_all_at(&file, &block, index * MIB).unwrap();
    }
    drop(file);
    for (round, phase) in ["copy"].into_iter().enumerate() {
        let output = dir.join(format!("cancelled-{phase}.qcow2"));
        let mut child = start_until(
            daemon
                .encrypt(&big, &output, &key)
                .args(["--format", "qcow2", "--json"]),
            |value| {
                let in_phase = value["progress"]["phase"] == phase;
                let done = value["progress"]["bytes_done"].as_u64().unwrap_or(0);
                in_phase && done > 0
            },
        );
        assert_eq!(interrupt(&mut child), Some(130), "{phase}");
        assert!(!output.exists() && !partial_of(&output).exists(), "{phase}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while daemon
            .log_text()
            .matches("job ended after its client left: cancelled")
            .count()
            <= round
        {
            assert!(Instant::now() < deadline, "{phase}: {}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether qemu-img opens `image` with `key` (and finds it consistent).
fn qemu_opens(image: &Path, key: &Path) -> bool {
    qemu_img_status(&[
        "check",
        "--object",
        &qemu_secret(key),
        "--image-opts",
        &encrypted_qcow2_opts(image),
    ])
    .status
    .success()
}

#[test]
fn a_kill_at_each_step_of_a_qcow2_rotation_leaves_an_image_qemu_opens_with_a_ring_key() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let (old, new, ring) = old_new_ring(dir);
    let source = make_source(dir, SourceKind::Raw, "8M");
    let pristine = dir.join("pristine.qcow2");
    {
        let daemon = Daemon::start(dir, &[]);
        encrypt_qcow2(&daemon, &source, &pristine, &old);
    }
    // (point, whether the new key must open afterwards, whether the old one must).
    let points = [
        ("added:primary", false, true),
        ("qcow2:added:keyslots", false, true),
        ("removed:primary", true, true),
        ("qcow2:removed:primary", true, false),
    ];
    for (point, new_must_open, old_must_open) in points {
        let image = dir.join(format!("{}.qcow2", point.replace(':', "-")));
        fs::copy(&pristine, &image).unwrap();
        {
            let mut daemon = Daemon::start_with_env(dir, &[], &[("IMGCRYPTD_CRASH_AT", point)]);
            let output = run(&mut rewrite_k(&daemon, &ring, &image, CHEAP_PBKDF));
            assert!(!output.status.success(), "{point}: {}", describe(&output));
            let deadline = Instant::now() + Duration::from_secs(5);
            while daemon.is_running() {
                assert!(
                    Instant::now() < deadline,
                    "{point}: the crash hook did not fire"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let (old_opens, new_opens) = (qemu_opens(&image, &old), qemu_opens(&image, &new));
        assert!(
            old_opens || new_opens,
            "{point}: no ring key opens the image"
        );
        assert!(
            !new_must_open || new_opens,
            "{point}: the new key does not open"
        );
        assert!(
            !old_must_open || old_opens,
            "{point}: the old key stopped opening too early"
        );

        let daemon = Daemon::start(dir, &[]);
        let output = run(&mut rewrite_k(&daemon, &ring, &image, CHEAP_PBKDF));
        assert!(
            output.status.success(),
            "{point} rerun: {}",
            describe(&output)
        );
        assert!(
            !qemu_opens(&image, &old),
            "{point}: old key opens after the rerun"
        );
        assert_qemu_reads(&image, &new, &source, dir);
        fs::remove_file(&image).unwrap();
    }
}

#[test]
fn reencrypt_makes_a_new_qcow2_with_a_new_volume_key_and_the_same_disk() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let (old, new, ring) = old_new_ring(dir);
    let source = make_source(dir, SourceKind::VhdDynamic, "12M");
    let (image, _) = qemu_made_qcow2(dir, &source, &old);
    let before = fs::read(&image).unwrap();
    let uuid =
        |image: &Path| qemu_info(image)["format-specific"]["data"]["encrypt"]["uuid"].clone();
    let old_uuid = uuid(&image);
    let output = run(rewrite_k(&daemon, &ring, &image, CHEAP_PBKDF).arg("--reencrypt"));
    assert!(output.status.success(), "{}", describe(&output));
    assert!(!dir.join("qemu-made.qcow2.reencrypt.partial").exists());
    assert!(!qemu_opens(&image, &old));
    // The whole disk as qemu saw it before (zero clusters included) is what it sees now.
    let view = dir.join("qemu-made.raw");
    let after = dir.join("after.raw");
    qemu_decrypt_qcow2(&image, &new, &after);
    assert_eq!(fs::read(&after).unwrap(), fs::read(&view).unwrap());
    assert!(qemu_opens(&image, &new));
    assert_ne!(fs::read(&image).unwrap(), before);
    // A new LUKS header, hence a new volume key (a header-only rotation keeps the UUID).
    assert_ne!(uuid(&image), old_uuid);
}

/// A daemon SIGKILLed in the middle of a qcow2 `--reencrypt` leaves the image exactly as it was
/// (the new image is written beside it and renamed only when complete), still opened by qemu
/// with the old key; running the re-encryption again starts over and completes.
#[test]
fn a_daemon_killed_during_a_qcow2_reencryption_leaves_the_image_as_it_was() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let (old, new, ring) = old_new_ring(dir);
    // 256 MiB of written data, so the re-encryption's copy runs long enough to be interrupted.
    let source = dir.join("full.raw");
    let chunk = vec![0x77u8; 8 << 20];
    let mut bytes = Vec::with_capacity(256 << 20);
    for _ in 0..32 {
        bytes.extend_from_slice(&chunk);
    }
    fs::write(&source, &bytes).unwrap();
    drop(bytes);
    let image = dir.join("image.qcow2");
    {
        let daemon = Daemon::start(dir, &[]);
        encrypt_qcow2(&daemon, &source, &image, &old);
    }
    let before = fs::read(&image).unwrap();
    {
        let mut daemon = Daemon::start(dir, &[]);
        let mut command = rewrite_k(&daemon, &ring, &image, CHEAP_PBKDF);
        command.args(["--reencrypt", "--json"]);
        let mut client = start_until(&mut command, |line| {
            line["progress"]["phase"] == "copy" && line["progress"]["bytes_done"].as_u64() > Some(0)
        });
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();
        let status = client.wait().unwrap();
        assert!(
            !status.success(),
            "imgctl succeeded after the daemon was killed"
        );
    }
    assert!(
        fs::read(&image).unwrap() == before,
        "the image changed before the new one was complete"
    );
    assert!(
        qemu_opens(&image, &old),
        "the old key no longer opens the image"
    );
    assert!(!qemu_opens(&image, &new));

    let daemon = Daemon::start(dir, &[]);
    let output = run(rewrite_k(&daemon, &ring, &image, CHEAP_PBKDF).arg("--reencrypt"));
    assert!(output.status.success(), "{}", describe(&output));
    assert!(!dir.join("image.qcow2.reencrypt.partial").exists());
    assert!(qemu_opens(&image, &new));
    assert!(!qemu_opens(&image, &old));
    assert_qemu_check_and_compare(&image, &new, &source, "raw");
}

#[test]
fn an_odd_sized_source_whose_last_cluster_holds_data_rounds_up_to_512() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = dir.join("odd.raw");
    let size = 3 * MIB + 1000;
    let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
    fs::write(&source, &bytes).unwrap();
    let output = dir.join("odd.qcow2");
    let summary = encrypt_qcow2(&daemon, &source, &output, &key);
    assert_eq!(summary["output_virtual_size"], 3 * MIB + 1024, "{summary}");
    assert_eq!(qemu_info(&output)["virtual-size"], 3 * MIB + 1024);
    let converted = dir.join("converted.raw");
    qemu_decrypt_qcow2(&output, &key, &converted);
    let mut expected = bytes;
    expected.resize((3 * MIB + 1024) as usize, 0);
    assert_eq!(fs::read(&converted).unwrap(), expected);
    let check = qemu_img(&[
        "check",
        "--object",
        &qemu_secret(&key),
        "--image-opts",
        &encrypted_qcow2_opts(&output),
    ]);
    assert!(String::from_utf8_lossy(&check.stdout).contains("No errors were found"));
}
