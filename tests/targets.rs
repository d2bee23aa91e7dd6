//! `--target` presets end to end: each rule's violation has its message and leaves nothing
//! behind (no OUT, no OUT.partial, nothing in the directory but the inputs); a conforming job
//! prints the target's next steps, in text and in `--json`.

mod common;

use std::path::Path;

use common::*;

/// Files in `dir` other than the inputs named.
fn leftovers(dir: &Path, inputs: &[&Path]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| !inputs.contains(&path.as_path()))
        .map(|path| path.display().to_string())
        .collect()
}

/// A directory for the job's files beside the daemon's socket and log.
fn work_dir(scratch: &Path) -> std::path::PathBuf {
    let dir = scratch.join("work");
    std::fs::create_dir(&dir).unwrap();
    dir
}

/// A sparse raw source of `bytes` (holes only: nothing is read).
fn sparse_source(dir: &Path, bytes: u64) -> std::path::PathBuf {
    let path = dir.join("big.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    path
}

fn refused(daemon: &Daemon, args: &[&str], source: &Path, output: &Path, key: &Path) -> String {
    let result = run(encrypt_arguments_keyed(&mut daemon.imgctl(), source, output, key).args(args));
    assert!(!result.status.success(), "accepted: {}", describe(&result));
    String::from_utf8_lossy(&result.stderr).into_owned()
}

#[test]
fn name_rules_are_checked_before_anything_is_opened() {
    let scratch = scratch();
    let daemon = Daemon::start(scratch.path(), &[]);
    let dir = &work_dir(scratch.path());
    let source = make_source(dir, SourceKind::Raw, "4M");
    let key = dir.join("secret.dek");
    write_key(&key);

    let upper = refused(
        &daemon,
        &["--target", "ibm-vpc"],
        &source,
        &dir.join("disk.QCOW2"),
        &key,
    );
    assert!(upper.contains("lowercase extension .qcow2"), "{upper}");
    assert!(upper.contains("-o disk.qcow2"), "{upper}");
    let classic = refused(
        &daemon,
        &["--target", "ibm-classic"],
        &source,
        &dir.join("disk.vhd"),
        &key,
    );
    assert!(
        classic.contains(".vhd-0.vhd") && classic.contains("import-image.md"),
        "{classic}"
    );
    let mismatch = refused(
        &daemon,
        &["--target", "ibm-vpc", "--format", "vhd"],
        &source,
        &dir.join("disk.qcow2"),
        &key,
    );
    assert!(
        mismatch.contains("--target ibm-vpc imports qcow2"),
        "{mismatch}"
    );
    let kernel = refused(
        &daemon,
        &["--format", "qcow2", "--engine", "kernel"],
        &source,
        &dir.join("disk.qcow2"),
        &key,
    );
    assert!(kernel.contains("raw LUKS only"), "{kernel}");
    let sector = refused(
        &daemon,
        &["--format", "vhd", "--sector-size", "4096"],
        &source,
        &dir.join("disk.vhd"),
        &key,
    );
    assert!(sector.contains("512-byte"), "{sector}");
    let argon = refused(
        &daemon,
        &["--format", "qcow2", "--pbkdf", "argon2id"],
        &source,
        &dir.join("disk.qcow2"),
        &key,
    );
    assert!(argon.contains("LUKS1"), "{argon}");
    assert_eq!(leftovers(dir, &[&source, &key]), Vec::<String>::new());
}

#[test]
fn size_rules_are_checked_by_the_daemon_before_any_byte_is_written() {
    let scratch = scratch();
    let daemon = Daemon::start(scratch.path(), &[]);
    let dir = &work_dir(scratch.path());
    let key = dir.join("secret.dek");
    write_key(&key);
    let gib = 1u64 << 30;
    for (target, name, size, rule) in [
        ("ibm-vpc", "disk.qcow2", 250 * gib + 512, "250 GB"),
        (
            "ibm-classic",
            "disk.vhd-0.vhd",
            100 * gib + (1 << 20),
            "100 GB",
        ),
    ] {
        let source = sparse_source(dir, size);
        let output = dir.join(name);
        let stderr = refused(
            &daemon,
            &["--target", target, "--json"],
            &source,
            &output,
            &key,
        );
        assert!(
            stderr.contains(rule) && stderr.contains("shrink"),
            "{target}: {stderr}"
        );
        assert_eq!(
            leftovers(dir, &[&source, &key]),
            Vec::<String>::new(),
            "{target} left files behind"
        );
        std::fs::remove_file(&source).unwrap();
    }
}

#[test]
fn a_luks_target_job_prints_its_next_steps() {
    let dir = scratch();
    let dir = dir.path();
    let source = make_source(dir, SourceKind::VhdDynamic, "6M");
    let key = dir.join("secret.dek");
    write_key(&key);
    let output = dir.join("disk.luks");
    let daemon = Daemon::start(dir, &[]);
    let mut text = daemon.encrypt(&source, &output, &key);
    let result = run_ok(text.args(["--target", "luks"]));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("Next steps:"), "{stdout}");
    assert!(
        stdout.contains(&format!("cryptsetup open --key-file {}", key.display())),
        "{stdout}"
    );
    assert!(stdout.contains("plain LUKS"), "{stdout}");
    assert!(test_passphrase(&output, &key));

    std::fs::remove_file(&output).unwrap();
    let mut json = daemon.encrypt(&source, &output, &key);
    let result = run_ok(json.args(["--target", "luks", "--json"]));
    let event = json_event(&result.stdout, "summary");
    assert_eq!(event["summary"]["target"], "luks");
    assert_eq!(event["summary"]["output_format"], "luks");
    let steps = event["next_steps"].as_array().unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s.as_str().unwrap().contains("imgctl verify")),
        "{steps:?}"
    );
}
