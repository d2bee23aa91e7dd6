//! The keyslot's cost without repeated benchmarks, overlapped with the copy (issue 11):
//! a cached PBKDF benchmark gives later keyslots exactly its iterations and a different
//! configuration is measured on its own; the progress stream names the phases in order; and a
//! daemon killed during the copy, during the key derivation, or between the durable payload and
//! the header leaves nothing that looks like LUKS (or qcow2) under OUT.

mod common;

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::raw_client;
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

/// The summary of [`encrypt_json`].
fn encrypt_summary(
    daemon: &Daemon,
    source: &Path,
    output: &Path,
    key: &Path,
    options: &[&str],
) -> serde_json::Value {
    last_json_summary(&encrypt_json(daemon, source, output, key, options))
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
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "4M");
    let cheap = ["--pbkdf", "pbkdf2", "--iter-time", "10"];

    let first = encrypt_summary(&daemon, &source, &dir.join("1.luks"), &key, &cheap);
    assert_eq!(first["pbkdf_benchmark"]["cached"], false, "{first}");
    assert!(first["pbkdf_benchmark"]["measured_ms"].as_u64().unwrap() > 0);
    let measured = summary_iterations(&first);
    assert_eq!(dumped_iterations(&dir.join("1.luks")), measured);

    std::thread::sleep(Duration::from_millis(50));
    let second = encrypt_summary(&daemon, &source, &dir.join("2.luks"), &key, &cheap);
    assert_eq!(second["pbkdf_benchmark"]["cached"], true, "{second}");
    assert!(
        second["pbkdf_benchmark"]["age_ms"].as_u64().unwrap() >= 50,
        "{second}"
    );
    assert_eq!(dumped_iterations(&dir.join("2.luks")), measured);

    // LUKS1 derives the same 64-byte key with the same pbkdf2: the same measurement.
    let mut luks1 = cheap.to_vec();
    luks1.push("--luks1");
    let third = encrypt_summary(&daemon, &source, &dir.join("3.luks"), &key, &luks1);
    assert_eq!(third["pbkdf_benchmark"]["cached"], true, "{third}");
    assert_eq!(dumped_iterations(&dir.join("3.luks")), measured);

    for image in ["1.luks", "2.luks", "3.luks"] {
        assert!(
            test_passphrase(&dir.join(image), &key),
            "{image} does not open"
        );
    }

    // Another target time, another function: each measured on its own.
    let other_time = encrypt_summary(
        &daemon,
        &source,
        &dir.join("4.luks"),
        &key,
        &["--pbkdf", "pbkdf2", "--iter-time", "40"],
    );
    assert_eq!(
        other_time["pbkdf_benchmark"]["cached"], false,
        "{other_time}"
    );
    assert_eq!(
        dumped_iterations(&dir.join("4.luks")),
        summary_iterations(&other_time)
    );
    let argon = encrypt_summary(
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
    );
    assert_eq!(argon["pbkdf_benchmark"]["cached"], false, "{argon}");
    assert!(
        argon["pbkdf"].as_str().unwrap().starts_with("argon2id"),
        "{argon}"
    );
    assert!(test_passphrase(&dir.join("5.luks"), &key));

    // Fixed iterations are no benchmark at all.
    let fixed = encrypt_summary(&daemon, &source, &dir.join("6.luks"), &key, CHEAP_PBKDF);
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

/// Asserts that `seen` follows `order` (the daemon's progress is a latest-value stream, so a
/// phase that lasts no time may be folded into the next) and includes every phase of `lasting`.
fn assert_phases(seen: &[String], order: &[&str], lasting: &[&str]) {
    let mut rest = order.iter();
    for phase in seen {
        assert!(
            rest.any(|expected| expected == phase),
            "{seen:?} is not in the order {order:?}"
        );
    }
    for phase in lasting {
        assert!(seen.iter().any(|p| p == phase), "{seen:?} lacks {phase}");
    }
}

#[test]
fn progress_names_the_phases_in_order() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "4M");
    // A derivation (about 1 s) longer than the 4 MiB copy, so the wait for it is a phase.
    let options = ["--pbkdf", "pbkdf2", "--iter-time", "1000"];
    let order = ["format", "benchmark", "copy", "sync", "derive", "header"];

    let fresh = phases(&encrypt_json(
        &daemon,
        &source,
        &dir.join("1.luks"),
        &key,
        &options,
    ));
    assert_phases(&fresh, &order, &["benchmark", "copy", "derive"]);
    let cached = phases(&encrypt_json(
        &daemon,
        &source,
        &dir.join("2.luks"),
        &key,
        &options,
    ));
    assert_phases(&cached, &order, &["copy", "derive"]);
    assert!(!cached.iter().any(|p| p == "benchmark"), "{cached:?}");

    let mut qcow2 = options.to_vec();
    qcow2.extend(["--format", "qcow2"]);
    let container = phases(&encrypt_json(
        &daemon,
        &source,
        &dir.join("3.qcow2"),
        &key,
        &qcow2,
    ));
    assert_phases(
        &container,
        &["format", "copy", "sync", "derive", "header"],
        &["copy", "derive"],
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

/// Encrypt parameters for `options`' output with a 10 ms pbkdf2 benchmark: source descriptor
/// 0, output 1, key 2.
fn parameters(version: &str, format: &str) -> serde_json::Value {
    let mut parameters = raw_client::cheap_encrypt_parameters(Some(2));
    parameters["pbkdf"] = serde_json::json!({ "kind": "pbkdf2", "iter_time_ms": 10 });
    parameters["luks_version"] = serde_json::json!(version);
    parameters["format"] = serde_json::json!(format);
    parameters
}

#[test]
fn a_killed_job_leaves_nothing_that_looks_like_an_image() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "16M");
    let key = dir.join("k");
    write_key(&key);
    // The daemon is driven directly with an output file of the test's own: no imgctl removes
    // it afterwards, so what the daemon left is exactly what a power cut would leave.
    let outputs = [
        ("out.luks", "luks2", "luks"),
        ("out1.luks", "luks1", "luks"),
        ("out.qcow2", "luks1", "qcow2"),
    ];
    for point in [
        "encrypt:copying",
        "encrypt:deriving",
        "encrypt:payload-durable",
    ] {
        for (name, version, format) in outputs {
            let output = dir.join(name);
            let mut daemon = Daemon::start_with_env(dir, &[], &[("IMGCRYPTD_CRASH_AT", point)]);
            {
                let source_file = fs::File::open(&source).unwrap();
                let output_file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&output)
                    .unwrap();
                let key_file = fs::File::open(&key).unwrap();
                let mut client = raw_client::RawClient::connect(&daemon.socket);
                client.call(
                    imgcrypt_proto::api::ENCRYPT,
                    parameters(version, format),
                    &[source_file.as_fd(), output_file.as_fd(), key_file.as_fd()],
                    true,
                );
                // Replies until the daemon dies: the connection ends without a final reply.
                while let Some(reply) = client.reply() {
                    assert_eq!(reply.error, None, "{point} {name}: {reply:?}");
                    assert!(
                        reply.continues,
                        "{point} {name}: the job finished: {reply:?}"
                    );
                }
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while daemon.is_running() {
                assert!(
                    Instant::now() < deadline,
                    "{point} {name}: the crash hook did not fire"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            // Killed in the key derivation, the daemon may not have prepared the output yet
            // (the derivation starts as soon as the header is formatted); elsewhere it has.
            assert!(
                point == "encrypt:deriving" || fs::metadata(&output).unwrap().len() > 0,
                "{point} {name}: the daemon wrote nothing (was the output prepared?)"
            );
            assert!(
                !looks_like_an_image(&output),
                "{point} {name}: what the daemon left looks like an image"
            );
            drop(daemon);

            // A raw LUKS partial is resumed (from its checkpoint, or from scratch with a notice
            // when there is none yet); the sparse containers' partial is reported as stale and
            // replaced with --force.
            let finished = dir.join(format!("final-{name}"));
            let partial = PathBuf::from(format!("{}.partial", finished.display()));
            fs::rename(&output, &partial).unwrap();
            let daemon = Daemon::start(dir, &[]);
            let mut command = daemon.imgctl();
            encrypt_arguments_keyed(&mut command, &source, &finished, &key)
                .args(CHEAP_PBKDF)
                .args(["--format", format]);
            if version == "luks1" && format == "luks" {
                command.arg("--luks1");
            }
            if format == "luks" {
                run_ok(&mut command);
            } else {
                let refused = run(&mut command);
                assert!(
                    !refused.status.success()
                        && String::from_utf8_lossy(&refused.stderr).contains("interrupted run"),
                    "{point} {name}: {}",
                    describe(&refused)
                );
                run_ok(command.arg("--force"));
            }
            assert!(!partial.exists(), "{point} {name}");
            assert!(looks_like_an_image(&finished), "{point} {name}");
            fs::remove_file(&finished).unwrap();
        }
    }
}

/// Waits (up to `limit`) until the daemon's log has `line`, and returns the log.
fn wait_for_log(daemon: &Daemon, line: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let log = daemon.log_text();
        if log.contains(line) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {line:?} in the daemon log within {limit:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `FIELD=N` of the log line holding `message` and `kind=KIND`.
fn logged(log: &str, message: &str, kind: &str, field: &str) -> u64 {
    let line = log
        .lines()
        .find(|line| line.contains(message) && line.contains(&format!("kind={kind}")))
        .unwrap_or_else(|| panic!("no {message:?} for {kind} in\n{log}"));
    line.split_whitespace()
        .find_map(|pair| pair.strip_prefix(&format!("{field}=")))
        .unwrap_or_else(|| panic!("no {field} in {line}"))
        .parse()
        .unwrap()
}

/// The first argon2 keyslot's `Time cost` and `Memory` (KiB) as `cryptsetup luksDump` shows
/// them (LUKS2).
fn dumped_argon2(image: &Path) -> (u64, u64) {
    let output = run_ok(Command::new("cryptsetup").arg("luksDump").arg(image));
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    (field("Time cost:"), field("Memory:"))
}

#[test]
fn the_startup_benchmark_serves_the_first_default_jobs_and_rewrite() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &["--startup-benchmark"]);
    let RotationKeys {
        old: old_key,
        new: new_key,
        ring,
        ..
    } = rotation_keys(dir, &[]);
    let source = make_source(dir, SourceKind::Raw, "4M");
    // Both default configurations, measured before any call (the deadline only bounds a hang).
    let log = wait_for_log(
        &daemon,
        "start-up PBKDF benchmark finished configurations=2",
        Duration::from_secs(300),
    );
    let cached = "start-up PBKDF benchmark cached";
    let argon2 = (
        logged(&log, cached, "argon2id", "iterations"),
        logged(&log, cached, "argon2id", "memory_kb"),
    );
    let pbkdf2 = logged(&log, cached, "pbkdf2", "iterations");

    // Raw LUKS with default settings: LUKS2 argon2id, exactly the start-up measurement.
    let image = dir.join("default.luks");
    let raw = encrypt_summary(&daemon, &source, &image, &old_key, &[]);
    assert_eq!(raw["pbkdf_benchmark"]["cached"], true, "{raw}");
    assert_eq!(dumped_argon2(&image), argon2, "{raw}");
    assert!(
        test_passphrase(&image, &old_key),
        "cryptsetup does not open it"
    );

    // qcow2 with default settings: LUKS1 pbkdf2, the other start-up measurement.
    let qcow2 = encrypt_summary(
        &daemon,
        &source,
        &dir.join("default.qcow2"),
        &old_key,
        &["--format", "qcow2"],
    );
    assert_eq!(qcow2["pbkdf_benchmark"]["cached"], true, "{qcow2}");
    assert_eq!(summary_iterations(&qcow2), pbkdf2, "{qcow2}");

    // A header-only rotation with default settings adds its keyslot from the cache too.
    let output = run(rewrite_k(&daemon, &ring, &image, &[]).arg("--json"));
    daemon.assert_ok(&output, "rewrite -k");
    let rotated = last_json_summary(&output.stdout);
    assert_eq!(rotated["pbkdf_benchmark"]["cached"], true, "{rotated}");
    assert_eq!(rotated["keyslot_added"], true, "{rotated}");
    assert_eq!(dumped_argon2(&image), argon2, "{rotated}");
    assert!(
        test_passphrase(&image, &new_key),
        "the new key does not open it"
    );
    assert!(
        !test_passphrase(&image, &old_key),
        "the old key still opens it"
    );
}

#[test]
fn without_the_startup_benchmark_the_first_default_job_measures() {
    // tests/common starts daemons with --no-startup-benchmark.
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "4M");
    let first = encrypt_summary(
        &daemon,
        &source,
        &dir.join("1.qcow2"),
        &key,
        &["--format", "qcow2"],
    );
    assert_eq!(first["pbkdf_benchmark"]["cached"], false, "{first}");
    let log = daemon.log_text();
    assert!(!log.contains("start-up PBKDF benchmark"), "{log}");
    assert!(log.contains("--no-startup-benchmark"), "{log}");
}

#[test]
fn a_job_arriving_during_the_startup_benchmark_ends_it() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &["--startup-benchmark"]);
    let key = dir.join("k");
    write_key(&key);
    let source = make_source(dir, SourceKind::Raw, "4M");
    // At once: the start-up run is in its first configuration (argon2id, seconds).
    let cheap = ["--pbkdf", "pbkdf2", "--iter-time", "10"];
    let first = encrypt_summary(&daemon, &source, &dir.join("1.luks"), &key, &cheap);
    assert_eq!(first["pbkdf_benchmark"]["cached"], false, "{first}");
    let log = daemon.log_text();
    let position = |what: &str| {
        log.find(what)
            .unwrap_or_else(|| panic!("no {what:?} in\n{log}"))
    };
    // The order of events: the job arrives, the start-up measurement stops at its next
    // progress callback and keeps nothing, then the job measures its own configuration.
    let requested = position("encrypt requested");
    let interrupted = position("start-up PBKDF benchmark interrupted by a job");
    let own = log
        .match_indices("PBKDF benchmark ")
        .map(|(at, _)| at)
        .find(|&at| {
            let line = log[at..].lines().next().unwrap_or_default();
            line.contains("time_ms=10") && line.contains("iterations=")
        })
        .unwrap_or_else(|| panic!("the job's own benchmark is not logged:\n{log}"));
    assert!(requested < interrupted, "{log}");
    assert!(interrupted < own, "{log}");
    assert!(!log.contains("start-up PBKDF benchmark cached"), "{log}");
    assert!(!log.contains("start-up PBKDF benchmark finished"), "{log}");

    // Nothing of the interrupted run was kept, and it does not resume: the default qcow2
    // configuration is measured by the job that needs it.
    let second = encrypt_summary(
        &daemon,
        &source,
        &dir.join("2.qcow2"),
        &key,
        &["--format", "qcow2"],
    );
    assert_eq!(second["pbkdf_benchmark"]["cached"], false, "{second}");
}
