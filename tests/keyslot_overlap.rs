//! The keyslot's cost without repeated benchmarks, overlapped with the copy (issue 11):
//! a cached PBKDF benchmark gives later keyslots exactly its iterations and a different
//! configuration is measured on its own; the progress stream names the phases in order; and a
//! daemon killed during the copy, during the key derivation, or between the durable payload and
//! the header leaves nothing that looks like LUKS (or qcow2) under OUT.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// `imgctl encrypt --json` with `options` (no cheap-PBKDF defaults: the benchmark is the point).
fn encrypt_json(
    daemon: &Daemon,
    source: &Path,
    output: &Path,
    key: &Path,
    options: &[&str],
) -> Vec<u8> {
    let mut command = daemon.imgctl();
    encrypt_arguments_keyed(&mut command, source, output, key)
        .arg("--json")
        .args(options);
    run_ok(&mut command).stdout
}

/// The keyslot-0 (LUKS2) or key-slot-0 (LUKS1) iteration count `cryptsetup luksDump` shows.
fn dumped_iterations(image: &Path) -> u64 {
    let output = run_ok(Command::new("cryptsetup").arg("luksDump").arg(image));
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    // LUKS2: the first `Iterations:` is keyslot 0's (the digest's comes after the keyslots).
    // LUKS1: `Key Slot 0: ENABLED` then `Iterations:`.
    let from = text.find("Key Slot 0: ENABLED").unwrap_or(0);
    text[from..]
        .lines()
        .find_map(|line| line.trim().strip_prefix("Iterations:"))
        .unwrap_or_else(|| panic!("no iterations in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The iteration count in the summary's `pbkdf` text (`pbkdf2-sha256 (8538 iterations; ...)`).
fn summary_iterations(summary: &serde_json::Value) -> u64 {
    let text = summary["pbkdf"].as_str().unwrap();
    let start = text.find('(').unwrap() + 1;
    text[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_cached_benchmark_gives_keyslots_exactly_its_iterations() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let source = make_source(dir, SourceKind::Raw, "4M");
    let key = dir.join("k");
    write_key(&key);
    let cheap = ["--pbkdf", "pbkdf2", "--iter-time", "10"];

    let first = last_json_summary(&encrypt_json(
        &daemon,
        &source,
        &dir.join("1.luks"),
        &key,
        &cheap,
    ));
    assert_eq!(first["pbkdf_benchmark"]["cached"], false, "{first}");
    assert!(first["pbkdf_benchmark"]["measured_ms"].as_u64().unwrap() > 0);
    let measured = summary_iterations(&first);
    assert_eq!(dumped_iterations(&dir.join("1.luks")), measured);

    std::thread::sleep(Duration::from_millis(50));
    let second = last_json_summary(&encrypt_json(
        &daemon,
        &source,
        &dir.join("2.luks"),
        &key,
        &cheap,
    ));
    assert_eq!(second["pbkdf_benchmark"]["cached"], true, "{second}");
    assert!(
        second["pbkdf_benchmark"]["age_ms"].as_u64().unwrap() >= 50,
        "{second}"
    );
    assert_eq!(dumped_iterations(&dir.join("2.luks")), measured);

    // LUKS1 derives the same 64-byte key with the same pbkdf2: the same measurement.
    let mut luks1 = cheap.to_vec();
    luks1.push("--luks1");
    let third = last_json_summary(&encrypt_json(
        &daemon,
        &source,
        &dir.join("3.luks"),
        &key,
        &luks1,
    ));
    assert_eq!(third["pbkdf_benchmark"]["cached"], true, "{third}");
    assert_eq!(dumped_iterations(&dir.join("3.luks")), measured);

    for image in ["1.luks", "2.luks", "3.luks"] {
        assert!(
            test_passphrase(&dir.join(image), &key),
            "{image} does not open"
        );
    }

    // Another target time, another function: each measured on its own.
    let other_time = last_json_summary(&encrypt_json(
        &daemon,
        &source,
        &dir.join("4.luks"),
        &key,
        &["--pbkdf", "pbkdf2", "--iter-time", "40"],
    ));
    assert_eq!(
        other_time["pbkdf_benchmark"]["cached"], false,
        "{other_time}"
    );
    assert_eq!(
        dumped_iterations(&dir.join("4.luks")),
        summary_iterations(&other_time)
    );
    let argon = last_json_summary(&encrypt_json(
        &daemon,
        &source,
        &dir.join("5.luks"),
        &key,
        &[
            "--pbkdf",
            "argon2id",
            "--iter-time",
            "10",
            "--pbkdf-memory",
            "32768",
        ],
    ));
    assert_eq!(argon["pbkdf_benchmark"]["cached"], false, "{argon}");
    assert!(
        argon["pbkdf"].as_str().unwrap().starts_with("argon2id"),
        "{argon}"
    );
    assert!(test_passphrase(&dir.join("5.luks"), &key));

    // Fixed iterations are no benchmark at all.
    let fixed = last_json_summary(&encrypt_json(
        &daemon,
        &source,
        &dir.join("6.luks"),
        &key,
        CHEAP_PBKDF,
    ));
    assert!(fixed.get("pbkdf_benchmark").is_none(), "{fixed}");

    // The text summary says it too.
    let mut command = daemon.imgctl();
    encrypt_arguments_keyed(&mut command, &source, &dir.join("7.luks"), &key).args(cheap);
    let text = String::from_utf8_lossy(&run_ok(&mut command).stdout).to_string();
    assert!(
        text.contains("benchmark") && text.contains("cached, measured"),
        "{text}"
    );
}

/// The phases of a `--json` progress stream, consecutive repeats folded.
fn phases(stdout: &[u8]) -> Vec<String> {
    let mut phases: Vec<String> = Vec::new();
    for line in String::from_utf8_lossy(stdout).lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        if value["event"] == "progress" {
            let phase = value["progress"]["phase"].as_str().unwrap().to_string();
            if phases.last() != Some(&phase) {
                phases.push(phase);
            }
        }
    }
    phases
}

#[test]
fn progress_names_the_phases_in_order() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let source = make_source(dir, SourceKind::Raw, "4M");
    let key = dir.join("k");
    write_key(&key);
    let options = ["--pbkdf", "pbkdf2", "--iter-time", "15"];

    let fresh = encrypt_json(&daemon, &source, &dir.join("1.luks"), &key, &options);
    assert_eq!(
        phases(&fresh),
        ["format", "benchmark", "copy", "sync", "derive", "header"]
    );
    let cached = encrypt_json(&daemon, &source, &dir.join("2.luks"), &key, &options);
    assert_eq!(
        phases(&cached),
        ["format", "copy", "sync", "derive", "header"]
    );

    let mut qcow2 = options.to_vec();
    qcow2.extend(["--format", "qcow2"]);
    let container = encrypt_json(&daemon, &source, &dir.join("3.qcow2"), &key, &qcow2);
    assert_eq!(
        phases(&container),
        ["scan", "format", "copy", "sync", "derive", "header"]
    );
}

/// Whether `path` looks like an image a reader would accept: LUKS magic at 0, a LUKS2
/// secondary header, qcow2's magic, or `cryptsetup isLuks` says so.
fn looks_like_an_image(path: &Path) -> bool {
    let bytes = fs::read(path).unwrap_or_default();
    let at = |offset: usize, magic: &[u8]| bytes.get(offset..offset + magic.len()) == Some(magic);
    at(0, b"LUKS\xba\xbe")
        || at(0x4000, b"SKUL\xba\xbe")
        || at(0, b"QFI\xfb")
        || run(Command::new("cryptsetup").arg("isLuks").arg(path))
            .status
            .success()
}

#[test]
fn a_killed_job_leaves_nothing_that_looks_like_an_image() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "16M");
    let key = dir.join("k");
    write_key(&key);
    let outputs: [(&str, &[&str]); 3] = [
        ("out.luks", &[]),
        ("out1.luks", &["--luks1"]),
        ("out.qcow2", &["--format", "qcow2"]),
    ];
    for point in [
        "encrypt:copying",
        "encrypt:deriving",
        "encrypt:payload-durable",
    ] {
        for (name, options) in outputs {
            let output = dir.join(name);
            let partial = PathBuf::from(format!("{}.partial", output.display()));
            let mut daemon = Daemon::start_with_env(dir, &[], &[("IMGCRYPTD_CRASH_AT", point)]);
            let mut command = daemon.imgctl();
            encrypt_arguments_keyed(&mut command, &source, &output, &key)
                .args(["--pbkdf", "pbkdf2", "--iter-time", "10"])
                .args(options);
            let result = run(&mut command);
            assert!(
                !result.status.success(),
                "{point} {name}: {}",
                describe(&result)
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while daemon.is_running() {
                assert!(
                    Instant::now() < deadline,
                    "{point} {name}: the crash hook did not fire"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(!output.exists(), "{point} {name}: OUT exists");
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_file() && path != source && path != key {
                    assert!(
                        !looks_like_an_image(&path),
                        "{point} {name}: {} looks like an image",
                        path.display()
                    );
                }
            }
            drop(daemon);

            // The partial is handled as before: reported, and replaced with --force.
            let daemon = Daemon::start(dir, &[]);
            let mut command = daemon.imgctl();
            encrypt_arguments_keyed(&mut command, &source, &output, &key)
                .args(CHEAP_PBKDF)
                .args(options)
                .arg("--force");
            run_ok(&mut command);
            assert!(!partial.exists(), "{point} {name}");
            assert!(looks_like_an_image(&output), "{point} {name}");
            fs::remove_file(&output).unwrap();
        }
    }
}
