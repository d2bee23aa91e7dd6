//! End-to-end `imgctl encrypt --format vhd`: the vhd-util-encrypted VHD that IBM Cloud classic
//! imports, checked by tools that share no code with ours, and our readers checked against the
//! VHDs blktap's real `vhd-util` wrote (`../shared/corpus/vhd-util/`).
//!
//! - qemu-img reads the container and reports the virtual size the summary states;
//! - `tests/support/vhd_decrypt.py`, written from the format's facts with Python
//!   `cryptography`, reads the output the way tapdisk does and gets the source's plaintext back;
//! - the key hash is SHA-256(32 zero bytes ‖ decoded key), computed here;
//! - keys of 32 and 64 bytes work, 48 bytes and equal halves are refused and leave nothing;
//! - odd source sizes, and a source whose last (partial) block holds data;
//! - our inspect, verify and decrypt read vhd-util's own outputs, and our output of the same
//!   sources carries the same key hash and decrypts to the same plaintext;
//! - an interrupted job leaves no file under OUT.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;

/// Random key material of `len` bytes.
fn random_key(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    bytes
}

/// Writes `raw` as a key file (base64, no newline, mode 0600) and as the raw key file
/// vhd-util and the Python reader take; returns (key file, raw file).
fn key_files(dir: &Path, name: &str, raw: &[u8]) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.dek"));
    fs::write(&key, base64::engine::general_purpose::STANDARD.encode(raw)).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let raw_path = dir.join(format!("{name}.bin"));
    fs::write(&raw_path, raw).unwrap();
    (key, raw_path)
}

/// `imgctl encrypt SOURCE -o OUTPUT --key-file KEY --format vhd --json`.
fn encrypt_vhd(daemon: &Daemon, source: &Path, output: &Path, key: &Path) -> Output {
    run(daemon
        .encrypt_keyed(source, output, key)
        .args(["--format", "vhd", "--json"]))
}

fn summary_of(output: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary line in:\n{text}"))["summary"]
        .clone()
}

/// Runs the independent reader; returns the plaintext path and its facts.
fn python_decrypt(image: &Path, raw_key: &Path, dir: &Path) -> (PathBuf, serde_json::Value) {
    let plaintext = dir.join(format!(
        "{}.py-plain",
        image.file_name().unwrap().to_str().unwrap()
    ));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/vhd_decrypt.py");
    let output = run_ok(
        Command::new("python3")
            .arg(script)
            .arg(image)
            .arg(raw_key)
            .arg(&plaintext),
    );
    let facts = serde_json::from_slice(&output.stdout).unwrap();
    (plaintext, facts)
}

/// `qemu-img info` of a VHD: its virtual size.
fn qemu_vhd_size(image: &Path) -> u64 {
    let info = qemu_img(&[
        "info",
        "-f",
        "vpc",
        "--output=json",
        image.to_str().unwrap(),
    ]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

fn partial_of(output: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", output.display()))
}

/// Encrypts `source` with a fresh key of `key_len` bytes and checks the output with qemu-img
/// and the independent reader against qemu's plaintext of the source.
fn round_trip(dir: &Path, source: &Path, key_len: usize) -> serde_json::Value {
    let raw = random_key(key_len);
    let (key, raw_file) = key_files(dir, &format!("k{key_len}"), &raw);
    let output = dir.join(format!("out{key_len}.vhd"));
    let daemon = Daemon::start(dir, &[]);
    let result = encrypt_vhd(&daemon, source, &output, &key);
    daemon.assert_ok(&result, "imgctl failed");
    assert!(!partial_of(&output).exists());
    let summary = summary_of(&result);
    assert_eq!(summary["output_format"], "vhd");
    assert_eq!(summary["vhd_key_hash"], vhd_key_hash(&raw));
    assert_eq!(summary["key_size_bits"], key_len as u64 * 8);
    assert_eq!(summary["cipher"], "aes-xts-plain");

    // qemu-img rounds a raw file's size up to whole sectors; we state the file's exact size.
    let source_size = qemu_virtual_size(source);
    let rounded = source_size.next_multiple_of(BLOCK);
    assert_eq!(
        summary["virtual_size"]
            .as_u64()
            .unwrap()
            .next_multiple_of(512),
        source_size
    );
    assert_eq!(summary["output_virtual_size"].as_u64().unwrap(), rounded);
    assert_eq!(qemu_vhd_size(&output), rounded, "qemu-img's virtual size");

    let expected = dir.join(format!("expected{key_len}.raw"));
    qemu_plaintext(source, &expected);
    let (plaintext, facts) = python_decrypt(&output, &raw_file, dir);
    assert_eq!(facts["virtual_size"].as_u64().unwrap(), rounded);
    assert_eq!(facts["key_hash"], vhd_key_hash(&raw));
    assert_eq!(facts["nonce"], "0".repeat(64));
    assert_eq!(facts["batmap_checksum_ok"], true);
    assert_plaintext_matches(&plaintext, &expected);

    // Sparse: a block is allocated exactly when the source has a non-zero byte in it (the
    // copy's zero check drops allocated blocks of zeros, such as the one a fixed VHD's footer shares a
    // file-system block with), and the file holds little more than those.
    let plain = fs::read(&expected).unwrap();
    let with_data: Vec<u64> = plain
        .chunks(BLOCK as usize)
        .enumerate()
        .filter(|(_, block)| block.iter().any(|&b| b != 0))
        .map(|(index, _)| index as u64)
        .collect();
    let allocated: Vec<u64> = facts["allocated_blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(allocated, with_data, "allocated blocks, blocks with data");
    for offset in facts["block_data_offsets"].as_array().unwrap() {
        assert_eq!(
            offset.as_u64().unwrap() % 4096,
            0,
            "block data is 4 KiB-aligned"
        );
    }
    let stored = fs::metadata(&output).unwrap().blocks() * 512;
    assert!(
        stored <= allocated.len() as u64 * (BLOCK + 8192) + MIB,
        "output stores {stored} bytes for {} blocks",
        allocated.len()
    );
    assert_eq!(
        summary["allocated_bytes"].as_u64().unwrap(),
        allocated.len() as u64 * BLOCK
    );
    summary
}

#[test]
fn raw_source_to_vhd_with_a_64_byte_key() {
    let dir = scratch();
    let source = make_source(dir.path(), SourceKind::Raw, "12M");
    round_trip(dir.path(), &source, 64);
}

#[test]
fn raw_source_to_vhd_with_a_32_byte_key() {
    let dir = scratch();
    let source = make_source(dir.path(), SourceKind::Raw, "12M");
    round_trip(dir.path(), &source, 32);
}

#[test]
fn dynamic_vhd_source_to_vhd() {
    let dir = scratch();
    let source = make_source(dir.path(), SourceKind::VhdDynamic, "12M");
    round_trip(dir.path(), &source, 64);
}

#[test]
fn fixed_vhd_source_to_vhd() {
    let dir = scratch();
    let source = make_source(dir.path(), SourceKind::VhdFixed, "8M");
    round_trip(dir.path(), &source, 32);
}

#[test]
fn a_dd_written_raw_source_stores_only_the_blocks_holding_data() {
    let dir = scratch();
    let source = dir.path().join("dd-made.raw");
    // 64 MiB of written zeros (no holes), then data in three blocks, one across a boundary.
    run_ok(Command::new("dd").args([
        "if=/dev/zero",
        &format!("of={}", source.display()),
        "bs=4M",
        "count=16",
        "conv=fsync",
        "status=none",
    ]));
    assert!(fs::metadata(&source).unwrap().blocks() * 512 >= 64 * MIB);
    qemu_io(
        "raw",
        &source,
        &[
            "write -P 0x31 3M 4k",
            "write -P 0x32 40956k 8k",
            "write -P 0x33 67108352 512",
        ],
    );
    let summary = round_trip(dir.path(), &source, 64);
    // Blocks 1, 19 and 20 (the 8 KiB cross the 40 MiB boundary), and 31.
    assert_eq!(summary["allocated_bytes"], 4 * BLOCK, "{summary}");
}

#[test]
fn a_source_of_written_zeros_gives_a_vhd_without_blocks() {
    let dir = scratch();
    let source = dir.path().join("zeros.raw");
    fs::write(&source, vec![0u8; (6 * MIB) as usize]).unwrap();
    let summary = round_trip(dir.path(), &source, 32);
    assert_eq!(summary["allocated_bytes"], 0, "{summary}");
}

/// A raw file of `size` bytes with data at the start and in its last bytes.
fn odd_source(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join(format!("odd-{size}.raw"));
    let file = fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[0x5a; 4096], 0).unwrap();
    let tail: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8 | 1).collect();
    file.write_all_at(&tail, size - 1000).unwrap();
    path
}

#[test]
fn odd_sizes_whose_last_block_holds_data_work() {
    // vhd-util copy fails on these (it reads a whole block past the source's end).
    for size in [5 * MIB + 3 * 512, 3 * MIB + 100, 2 * MIB - 512] {
        let dir = scratch();
        let source = odd_source(dir.path(), size);
        let summary = round_trip(dir.path(), &source, 64);
        assert_eq!(
            summary["output_virtual_size"].as_u64().unwrap(),
            size.next_multiple_of(BLOCK)
        );
    }
}

fn assert_refused_leaving_nothing(raw: &[u8], words: &[&str]) {
    let dir = scratch();
    let dir = dir.path();
    let source = make_source(dir, SourceKind::Raw, "4M");
    let (key, _) = key_files(dir, "bad", raw);
    let output = dir.join("out.vhd");
    let daemon = Daemon::start(dir, &[]);
    let result = encrypt_vhd(&daemon, &source, &output, &key);
    assert!(!result.status.success(), "accepted: {}", describe(&result));
    let stderr = String::from_utf8_lossy(&result.stderr);
    for word in words {
        assert!(stderr.contains(word), "{word:?} not in: {stderr}");
    }
    assert!(!output.exists(), "OUT left behind");
    assert!(!partial_of(&output).exists(), "OUT.partial left behind");
}

#[test]
fn a_48_byte_key_is_refused_and_leaves_nothing() {
    assert_refused_leaving_nothing(
        &random_key(48),
        &["decodes to 48 bytes", "32 bytes", "64 bytes"],
    );
}

#[test]
fn a_key_with_equal_halves_is_refused_and_leaves_nothing() {
    let half = random_key(32);
    assert_refused_leaving_nothing(&[half.clone(), half].concat(), &["halves are equal"]);
}

#[test]
fn interrupt_leaves_no_output() {
    let dir = scratch();
    let dir = dir.path();
    // 1 GiB of written (non-sparse) data, so the copy runs long enough to be interrupted.
    let source = dir.join("full.raw");
    let mut file = fs::File::create(&source).unwrap();
    let chunk = vec![0x77u8; 8 << 20];
    for _ in 0..128 {
        file.write_all(&chunk).unwrap();
    }
    drop(file);
    let (key, _) = key_files(dir, "k", &random_key(64));
    let output = dir.join("out.vhd");
    let daemon = Daemon::start(dir, &[]);
    let mut child = start_until(
        daemon
            .encrypt_keyed(&source, &output, &key)
            .args(["--format", "vhd", "--json"]),
        |value| {
            value["progress"]["phase"] == "copy"
                && value["progress"]["bytes_done"].as_u64() > Some(0)
        },
    );
    assert_eq!(interrupt(&mut child), Some(130));
    assert!(!output.exists(), "nothing under the final name");
    assert!(!partial_of(&output).exists(), "partial file removed");
}

// ---- The corpus: what blktap's real vhd-util wrote. ----

/// Unpacks the vhd-util corpus into `dir`.
fn unpack_corpus(dir: &Path) {
    let tarball =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/vhd-util/samples.tar.xz");
    run_ok(
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir),
    );
}

/// The corpus's `.b64` DEK (base64 + newline) as a key file by our rules (no newline).
fn corpus_key(dir: &Path, name: &str) -> PathBuf {
    let text = fs::read(dir.join(format!("{name}.b64"))).unwrap();
    let key = dir.join(format!("{name}.dek"));
    fs::write(&key, text.strip_suffix(b"\n").unwrap()).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    key
}

/// What `vhd-util key -p -n NAME` printed: (nonce, hash).
fn printed_key_hash(dir: &Path, name: &str) -> (String, String) {
    let text = fs::read_to_string(dir.join("keyhash-p.txt")).unwrap();
    let line = text
        .lines()
        .find(|line| line.starts_with(&format!("{name} ")))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[1].to_string(), fields[2].to_string())
}

#[test]
fn inspect_shows_vhd_util_s_key_hash_sizes_and_the_matching_key() {
    let dir = scratch();
    let dir = dir.path();
    unpack_corpus(dir);
    let key32 = corpus_key(dir, "key32");
    let key64 = corpus_key(dir, "key64");
    let wrong = corpus_key(dir, "wrongkey32");
    let daemon = Daemon::start(dir, &[]);
    for (name, size, allocated) in [
        ("encA_aes128.vhd", 4 * MIB, 2 * MIB),
        ("encB_aes256.vhd", 6 * MIB, 4 * MIB),
        ("encC_aes128.vhd", (2 << 40) + 32 * MIB, 4 * MIB),
        ("encD_aes128.vhd", 6 * MIB, 2 * MIB),
        ("encE_aes256.vhd", (2 << 40) + 4 * MIB, 4 * MIB),
    ] {
        let (nonce, hash) = printed_key_hash(dir, name);
        let right = if name.contains("aes128") {
            &key32
        } else {
            &key64
        };
        for (key, matches) in [(right, true), (&wrong, false)] {
            let output = run_ok(
                daemon
                    .imgctl()
                    .arg("inspect")
                    .arg(dir.join(name))
                    .arg("--key-file")
                    .arg(key)
                    .arg("--json"),
            );
            let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            let info = if info["image"].is_object() {
                &info["image"]
            } else {
                &info
            };
            assert_eq!(info["format"], "vhd", "{name}: {info}");
            assert_eq!(info["virtual_size"].as_u64(), Some(size), "{name}");
            assert_eq!(info["allocated_bytes"].as_u64(), Some(allocated), "{name}");
            assert_eq!(info["vhd_key"]["hash"], hash.as_str(), "{name}");
            assert_eq!(info["vhd_key"]["nonce"], nonce.as_str(), "{name}");
            assert_eq!(
                info["vhd_key"]["matching_key"].is_string(),
                matches,
                "{name}: {info}"
            );
        }
    }
}

#[test]
fn decrypt_and_verify_read_vhd_util_s_outputs() {
    let dir = scratch();
    let dir = dir.path();
    unpack_corpus(dir);
    let key32 = corpus_key(dir, "key32");
    let key64 = corpus_key(dir, "key64");
    let wrong = corpus_key(dir, "wrongkey32");
    let daemon = Daemon::start(dir, &[]);
    // B: vhd-util left the sectors its source never wrote unencrypted; ours reads them as the
    // zeros the source had (module docs of formats::vhd::encrypted).
    for (name, key, reference) in [
        ("encA_aes128.vhd", &key32, "refA.raw"),
        ("encA_aes256.vhd", &key64, "refA.raw"),
        ("encB_aes128.vhd", &key32, "refB.raw"),
        ("encB_aes256.vhd", &key64, "refB.raw"),
        ("encD_aes128.vhd", &key32, "refD.raw"),
    ] {
        let plain = dir.join(format!("{name}.plain"));
        let result = run(&mut daemon.decrypt(dir.join(name), &plain, key));
        assert!(result.status.success(), "{name}: {}", describe(&result));
        assert_plaintext_matches(&plain, &dir.join(reference));
        let told = String::from_utf8_lossy(&result.stderr).contains("stored unencrypted as zeros");
        assert_eq!(
            told,
            name.starts_with("encB"),
            "{name}: {}",
            describe(&result)
        );

        let result = run(&mut daemon.verify(dir.join(name), dir.join(reference), key));
        assert!(
            result.status.success(),
            "{name}: verify: {}",
            describe(&result)
        );

        // The wrong key: refused with the hash the image expects, nothing written.
        let (_, expected) = printed_key_hash(dir, name);
        let bad = dir.join(format!("{name}.bad"));
        let result = run(&mut daemon.decrypt(dir.join(name), &bad, &wrong));
        assert!(!result.status.success(), "{name}: wrong key accepted");
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(stderr.contains(&expected), "{name}: {stderr}");
        assert!(
            !bad.exists() && !partial_of(&bad).exists(),
            "{name}: output left"
        );
    }
}

#[test]
fn vhd_util_outputs_are_refused_as_encrypt_sources() {
    let dir = scratch();
    let dir = dir.path();
    unpack_corpus(dir);
    let daemon = Daemon::start(dir, &[]);
    let (key, _) = key_files(dir, "k", &random_key(64));
    let output = dir.join("twice.vhd");
    let result = encrypt_vhd(&daemon, &dir.join("encB_aes128.vhd"), &output, &key);
    assert!(
        !result.status.success(),
        "an encrypted VHD was encrypted again"
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("already encrypted"), "{stderr}");
    assert!(!output.exists() && !partial_of(&output).exists());
}

#[test]
fn our_output_of_the_corpus_sources_matches_vhd_util_s() {
    let dir = scratch();
    let dir = dir.path();
    unpack_corpus(dir);
    let printed = fs::read_to_string(dir.join("keyhash-C.txt")).unwrap();
    let printed_for = |bin: &str| {
        printed
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{bin} ")))
            .unwrap()
            .to_string()
    };
    let daemon = Daemon::start(dir, &[]);
    for (source, key_name, reference, theirs) in [
        ("srcA.vhd", "key32", "refA.raw", "encA_aes128.vhd"),
        ("srcA.vhd", "key64", "refA.raw", "encA_aes256.vhd"),
        ("srcB.vhd", "key32", "refB.raw", "encB_aes128.vhd"),
        ("srcD.vhd", "key32", "refD.raw", "encD_aes128.vhd"),
    ] {
        let key = corpus_key(dir, key_name);
        let output = dir.join(format!("ours-{source}-{key_name}"));
        let result = encrypt_vhd(&daemon, &dir.join(source), &output, &key);
        assert!(result.status.success(), "{source}: {}", describe(&result));
        let summary = summary_of(&result);
        let hash = printed_for(&format!("{key_name}.bin"));
        assert_eq!(summary["vhd_key_hash"], hash.as_str(), "{source}");
        let (_, their_hash) = printed_key_hash(dir, theirs);
        assert_eq!(hash, their_hash);
        assert_eq!(
            qemu_vhd_size(&output),
            qemu_vhd_size(&dir.join(theirs)),
            "{source}"
        );

        let (plain, facts) = python_decrypt(&output, &dir.join(format!("{key_name}.bin")), dir);
        assert_eq!(facts["key_hash"], hash.as_str());
        assert_plaintext_matches(&plain, &dir.join(reference));
    }
}

#[test]
fn our_output_of_the_2_tib_corpus_source_is_sparse_and_matches_vhd_util_s() {
    use std::os::unix::fs::FileExt;
    let dir = scratch();
    let dir = dir.path();
    unpack_corpus(dir);
    let daemon = Daemon::start(dir, &[]);
    let key = corpus_key(dir, "key32");
    let output = dir.join("ours-srcC.vhd");
    let result = encrypt_vhd(&daemon, &dir.join("srcC.vhd"), &output, &key);
    assert!(result.status.success(), "{}", describe(&result));
    let summary = summary_of(&result);
    // Over 2 TiB blktap's 32-bit tweak repeats: the user is told.
    assert!(
        describe(&result).contains("sectors 2 TiB apart are encrypted with the same tweak"),
        "{}",
        describe(&result)
    );
    let (_, their_hash) = printed_key_hash(dir, "encC_aes128.vhd");
    assert_eq!(summary["vhd_key_hash"], their_hash.as_str());
    let tib2 = 2u64 << 40;
    assert_eq!(
        summary["output_virtual_size"].as_u64(),
        Some(tib2 + 32 * MIB)
    );
    // Two blocks, as vhd-util allocated: the file is a few MiB, not 2 TiB.
    assert_eq!(summary["allocated_bytes"].as_u64(), Some(2 * BLOCK));
    assert!(fs::metadata(&output).unwrap().len() < 16 * MIB);

    let (plain, facts) = python_decrypt(&output, &dir.join("key32.bin"), dir);
    assert_eq!(facts["allocated_blocks"], serde_json::json!([0, 1 << 20]));
    let plain = fs::File::open(plain).unwrap();
    for (at, reference) in [(0, "refC_lo.raw"), (tib2, "refC_hi.raw")] {
        let want = fs::read(dir.join(reference)).unwrap();
        let mut got = vec![0u8; 2 * BLOCK as usize];
        plain.read_exact_at(&mut got, at).unwrap();
        assert!(got[..want.len()] == want[..], "{reference} differs");
        assert!(
            got[want.len()..].iter().all(|&b| b == 0),
            "{reference}: not zeros after"
        );
    }
}

#[test]
fn rewrite_says_why_a_vhd_needs_reencryption_and_reencrypt_rekeys_it() {
    let dir = scratch();
    let dir = dir.path();
    let source = make_source(dir, SourceKind::Raw, "8M");
    let old_raw = random_key(64);
    let new_raw = random_key(32);
    let (old, _) = key_files(dir, "old", &old_raw);
    let (_, new_raw_file) = key_files(dir, "new", &new_raw);
    let ring = dir.join("keys.toml");
    fs::write(
        &ring,
        "encryption_key = \"new.dek\"\ndecryption_key1 = \"old.dek\"\n",
    )
    .unwrap();
    let image = dir.join("image.vhd");
    let daemon = Daemon::start(dir, &[]);
    let result = encrypt_vhd(&daemon, &source, &image, &old);
    assert!(result.status.success(), "{}", describe(&result));
    let before = fs::read(&image).unwrap();

    let rewrite = |extra: &[&str]| {
        run(daemon
            .imgctl()
            .arg("--keyring")
            .arg(&ring)
            .args(["rewrite", "-k"])
            .arg(&image)
            .args(extra))
    };
    let result = rewrite(&[]);
    assert!(
        !result.status.success(),
        "header-only rewrite of a VHD accepted"
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("IS the data key"), "{stderr}");
    assert!(stderr.contains("--reencrypt"), "{stderr}");
    assert_eq!(fs::read(&image).unwrap(), before, "the image was touched");

    let result = rewrite(&["--reencrypt"]);
    assert!(
        result.status.success(),
        "{}\n{}",
        describe(&result),
        daemon.log_text()
    );
    let expected = dir.join("expected.raw");
    qemu_plaintext(&source, &expected);
    let (plain, facts) = python_decrypt(&image, &new_raw_file, dir);
    assert_eq!(facts["key_hash"], vhd_key_hash(&new_raw));
    assert_plaintext_matches(&plain, &expected);
    assert_eq!(qemu_vhd_size(&image), 8 * MIB);
}

#[test]
fn the_2_tib_vhd_util_images_decrypt_to_sparse_files_without_reading_2_tib() {
    use std::os::unix::fs::FileExt;
    let dir = scratch();
    let dir = dir.path();
    unpack_corpus(dir);
    let key32 = corpus_key(dir, "key32");
    let key64 = corpus_key(dir, "key64");
    let daemon = Daemon::start(dir, &[]);
    let tib2 = 2u64 << 40;
    for (name, key, size) in [
        ("encC_aes128.vhd", &key32, tib2 + 32 * MIB),
        ("encC_aes256.vhd", &key64, tib2 + 32 * MIB),
        ("encE_aes256.vhd", &key64, tib2 + 4 * MIB),
    ] {
        let plain = dir.join(format!("{name}.plain"));
        let started = std::time::Instant::now();
        let result = run(&mut daemon.decrypt(dir.join(name), &plain, key));
        assert!(result.status.success(), "{name}: {}", describe(&result));
        assert!(
            started.elapsed().as_secs() < 60,
            "{name}: took {:?}",
            started.elapsed()
        );
        let metadata = fs::metadata(&plain).unwrap();
        assert_eq!(metadata.len(), size, "{name}");
        assert!(metadata.blocks() * 512 < 64 * MIB, "{name}: not sparse");
        let file = fs::File::open(&plain).unwrap();
        for (at, reference) in [(0, "refC_lo.raw"), (tib2, "refC_hi.raw")] {
            let want = fs::read(dir.join(reference)).unwrap();
            let mut got = vec![0u8; 2 * BLOCK as usize];
            file.read_exact_at(&mut got, at).unwrap();
            assert!(got[..want.len()] == want[..], "{name}: {reference} differs");
            assert!(
                got[want.len()..].iter().all(|&b| b == 0),
                "{name}: {reference}"
            );
        }
        fs::remove_file(&plain).unwrap();
    }
}

/// `imgctl inspect IMAGE --key-file KEY --json`: the image's facts.
fn inspect_vhd(daemon: &Daemon, image: &Path, key: &Path) -> serde_json::Value {
    let output = run_ok(
        daemon
            .imgctl()
            .arg("inspect")
            .arg(image)
            .arg("--key-file")
            .arg(key)
            .arg("--json"),
    );
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    if info["image"].is_object() {
        info["image"].clone()
    } else {
        info
    }
}

#[test]
fn inspect_verify_and_decrypt_read_our_own_vhd_output() {
    let dir = scratch();
    let dir = dir.path();
    let daemon = Daemon::start(dir, &[]);
    let dynamic = make_source(dir, SourceKind::VhdDynamic, "12M");
    let odd = odd_source(dir, 5 * MIB + 3 * 512);
    let (wrong, _) = key_files(dir, "wrong", &random_key(64));
    for (source, key_len) in [(&dynamic, 64), (&odd, 32)] {
        let name = source.file_name().unwrap().to_str().unwrap();
        let raw = random_key(key_len);
        let (key, _) = key_files(dir, &format!("k{key_len}"), &raw);
        let image = dir.join(format!("ours-{name}.vhd"));
        let result = encrypt_vhd(&daemon, source, &image, &key);
        assert!(result.status.success(), "{name}: {}", describe(&result));
        let summary = summary_of(&result);
        let expected = dir.join(format!("{name}.expected"));
        qemu_plaintext(source, &expected);
        let virtual_size = qemu_virtual_size(source).next_multiple_of(BLOCK);
        // Blocks that hold a non-zero byte, counted here from the plaintext.
        let blocks_with_data = fs::read(&expected)
            .unwrap()
            .chunks(BLOCK as usize)
            .filter(|block| block.iter().any(|&b| b != 0))
            .count() as u64;
        assert!(blocks_with_data > 0, "{name}");

        // inspect: the container, its sizes, the key hash computed here, the key that matches.
        for (candidate, matches) in [(&key, true), (&wrong, false)] {
            let info = inspect_vhd(&daemon, &image, candidate);
            assert_eq!(info["format"], "vhd", "{name}: {info}");
            assert_eq!(info["virtual_size"], virtual_size, "{name}: {info}");
            assert_eq!(
                info["allocated_bytes"],
                blocks_with_data * BLOCK,
                "{name}: {info}"
            );
            assert_eq!(info["allocated_bytes"], summary["allocated_bytes"]);
            assert_eq!(info["cipher"], "aes-xts-plain", "{name}: {info}");
            // The image does not record its key's size: only a matching key tells it.
            let bits = if matches { key_len as u64 * 8 } else { 0 };
            assert_eq!(info["key_size_bits"], bits, "{name}: {info}");
            assert_eq!(info["image_size"], fs::metadata(&image).unwrap().len());
            assert_eq!(info["vhd_key"]["hash"], vhd_key_hash(&raw), "{name}");
            assert_eq!(info["vhd_key"]["nonce"], "0".repeat(64), "{name}");
            assert_eq!(
                info["vhd_key"]["matching_key"].is_string(),
                matches,
                "{name}: {info}"
            );
            assert!(info.get("luks_version").is_none(), "{name}: {info}");
        }

        // verify against the source: it passes, and a one-byte change in the source fails it.
        let verify = |against: &Path| run(&mut daemon.verify(&image, against, &key));
        let result = verify(source);
        assert!(result.status.success(), "{name}: {}", describe(&result));
        let changed = dir.join(format!("{name}.changed.raw"));
        fs::copy(&expected, &changed).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let file = fs::OpenOptions::new().write(true).open(&changed).unwrap();
            // Inside make_source's and odd_source's first data run (bytes 0..4096 hold data).
            file.write_all_at(&[0xee], 1000).unwrap();
        }
        let result = verify(&changed);
        assert!(
            !result.status.success(),
            "{name}: verify passed against a different source"
        );

        // decrypt: the guest's disk, the source's plaintext then zeros to the container's size.
        let plain = dir.join(format!("{name}.plain"));
        let result = run(&mut daemon.decrypt(&image, &plain, &key));
        assert!(result.status.success(), "{name}: {}", describe(&result));
        assert_eq!(fs::metadata(&plain).unwrap().len(), virtual_size, "{name}");
        assert_plaintext_matches(&plain, &expected);

        // decrypt with the wrong key: refused, naming the hash the image expects; nothing left.
        let bad = dir.join(format!("{name}.bad"));
        let result = run(&mut daemon.decrypt(&image, &bad, &wrong));
        assert!(!result.status.success(), "{name}: wrong key accepted");
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(stderr.contains(&vhd_key_hash(&raw)), "{name}: {stderr}");
        assert!(!bad.exists() && !partial_of(&bad).exists(), "{name}");
    }
}
