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

// ---- Successful jobs of the cloud targets: output, format, and the next steps printed. ----

/// A key file (base64, no newline, mode 0600) whose decoded bytes are `len` random bytes;
/// returns its path and the decoded bytes.
fn key_of_len(dir: &Path, name: &str, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    use base64::Engine as _;
    use std::os::unix::fs::PermissionsExt;
    let mut raw = vec![0u8; len];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut raw).unwrap();
    let path = dir.join(name);
    std::fs::write(
        &path,
        base64::engine::general_purpose::STANDARD.encode(&raw),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, raw)
}

/// `imgctl encrypt SOURCE -o OUTPUT --key-file KEY --target TARGET` (cheap key derivation for
/// the targets that have one), `--json` if asked; must succeed.
fn target_job(
    daemon: &Daemon,
    target: &str,
    source: &Path,
    output: &Path,
    key: &Path,
    json: bool,
) -> std::process::Output {
    let mut command = daemon.imgctl();
    encrypt_arguments_keyed(&mut command, source, output, key).args(["--target", target]);
    if target != "ibm-classic" {
        command.args(CHEAP_PBKDF);
    }
    if json {
        command.arg("--json");
    }
    let result = run(&mut command);
    daemon.assert_ok(&result, format!("--target {target}"));
    assert!(
        !Path::new(&format!("{}.partial", output.display())).exists(),
        "--target {target}: OUT.partial left"
    );
    result
}

/// The numbered lines under "Next steps:" of the text summary.
fn text_next_steps(stdout: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(stdout);
    let (_, after) = text
        .split_once("Next steps:\n")
        .unwrap_or_else(|| panic!("no next steps in:\n{text}"));
    after
        .lines()
        .enumerate()
        .map_while(|(index, line)| {
            line.strip_prefix(&format!("  {}. ", index + 1))
                .map(str::to_string)
        })
        .collect()
}

/// The `next_steps` of the `--json` summary.
fn json_next_steps(event: &serde_json::Value) -> Vec<String> {
    event["next_steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no next_steps in {event}"))
        .iter()
        .map(|step| step.as_str().unwrap().to_string())
        .collect()
}

/// The notices of an `imgctl --json` run.
fn json_notices(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "notice")
        .map(|v| v["message"].as_str().unwrap().to_string())
        .collect()
}

/// The shell expression the one `ibmcloud kp key wrap` step passes as its payload (`-p "X"`),
/// or None if no step wraps a key.
fn wrap_payload(steps: &[String]) -> Option<String> {
    let wraps: Vec<&String> = steps
        .iter()
        .filter(|step| step.contains("kp key wrap"))
        .collect();
    assert!(wraps.len() <= 1, "{steps:#?}");
    let step = wraps.first()?;
    let payload = step
        .split_once(" -p \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .unwrap_or_else(|| panic!("no -p \"...\" in {step}"))
        .0;
    Some(payload.to_string())
}

/// The bytes the shell hands to `ibmcloud kp key wrap -p` for `payload`.
fn shell_value(payload: &str) -> Vec<u8> {
    let output = run_ok(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s \"{payload}\"")),
    );
    output.stdout
}

/// Runs the `imgctl verify ...` command the first next step gives, against `daemon`.
fn run_verify_step(daemon: &Daemon, steps: &[String]) {
    let command = steps[0]
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no command in {:?}", steps[0]));
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(&words[..2], ["imgctl", "verify"], "{command}");
    let result = run(daemon.imgctl().args(&words[1..]));
    assert!(
        result.status.success(),
        "the printed `{command}`: {}",
        describe(&result)
    );
}

/// `qemu-img info` with the format probed (no -f): what a cloud's importer will see.
fn qemu_info_probed(image: &Path) -> serde_json::Value {
    let info = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
    serde_json::from_slice(&info.stdout).unwrap()
}

/// A target's job, run twice (text, then `--json`): both print the same next steps; returns
/// them with the JSON summary event and the JSON run's notices.
fn text_and_json_job(
    daemon: &Daemon,
    target: &str,
    source: &Path,
    output: &Path,
    key: &Path,
) -> (Vec<String>, serde_json::Value, Vec<String>) {
    let text = target_job(daemon, target, source, output, key, false);
    let stdout = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        stdout.contains("(its import rules were checked)"),
        "{stdout}"
    );
    let text_steps = text_next_steps(&text.stdout);
    std::fs::remove_file(output).unwrap();
    let json = target_job(daemon, target, source, output, key, true);
    let event = json_event(&json.stdout, "summary");
    let steps = json_next_steps(&event);
    assert_eq!(
        text_steps, steps,
        "--target {target}: text and JSON steps differ"
    );
    // The protocol's enum values are identifiers (varlink): ibm_vpc for --target ibm-vpc.
    assert_eq!(
        event["summary"]["target"],
        target.replace('-', "_"),
        "{event}"
    );
    assert_eq!(event["output"], output.to_str().unwrap(), "{event}");
    (steps, event, json_notices(&json.stdout))
}

#[test]
fn an_ibm_vpc_job_writes_an_encrypted_qcow2_and_says_to_wrap_the_base64_of_the_key_file() {
    let scratch = scratch();
    let daemon = Daemon::start(scratch.path(), &[]);
    let dir = &work_dir(scratch.path());
    let source = make_source(dir, SourceKind::Raw, "6M");
    let key = dir.join("secret.dek");
    write_key(&key);
    let output = dir.join("disk.qcow2");
    let (steps, event, notices) = text_and_json_job(&daemon, "ibm-vpc", &source, &output, &key);
    assert_eq!(event["summary"]["output_format"], "qcow2");
    assert_eq!(event["summary"]["luks_version"], "luks1");
    assert_eq!(
        leftovers(dir, &[&source, &key, &output]),
        Vec::<String>::new()
    );

    // What IBM's importer sees: a qcow2 v3 whose encryption is qemu's LUKS, of the source's
    // size, that qemu-img checks clean and reads back as the source.
    let info = qemu_info_probed(&output);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{info}");
    assert_eq!(info["encrypted"], true, "{info}");
    assert_eq!(
        info["format-specific"]["data"]["encrypt"]["format"], "luks",
        "{info}"
    );
    assert_eq!(info["virtual-size"], 6u64 << 20, "{info}");
    assert_qemu_check_and_compare(&output, &key, &source, "raw");

    // The key bytes to wrap: the base64 of the key file (the passphrase qemu uses is the
    // file's bytes; VPC wants it base64-encoded). Run the printed substitution.
    let payload = wrap_payload(&steps).expect("no Key Protect wrap step");
    assert_eq!(payload, format!("$(base64 -w0 < {})", key.display()));
    let key_text = std::fs::read(&key).unwrap();
    assert_eq!(
        shell_value(&payload),
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &key_text).into_bytes()
    );
    assert!(
        steps.iter().any(|s| s.contains("BASE64 OF THE KEY FILE")),
        "{steps:#?}"
    );
    assert!(
        steps.iter().any(|s| s.contains("ibmcloud is image-create")
            && s.contains("cos://REGION/BUCKET/disk.qcow2")),
        "{steps:#?}"
    );
    assert!(
        steps.iter().any(|s| s.contains(&format!(
            "qemu-img check --object secret,id=sec0,file={}",
            key.display()
        ))),
        "{steps:#?}"
    );
    run_verify_step(&daemon, &steps);
    // IBM's own checks, as printed, pass on the image.
    let checks = steps
        .iter()
        .find(|s| s.starts_with("IBM's own checks"))
        .unwrap_or_else(|| panic!("{steps:#?}"));
    let commands: Vec<&str> = checks.split('`').skip(1).step_by(2).collect();
    assert_eq!(commands.len(), 2, "{checks}");
    for command in commands {
        let result = run_ok(std::process::Command::new("sh").arg("-c").arg(command));
        if command.starts_with("qemu-img check") {
            let stdout = String::from_utf8_lossy(&result.stdout);
            assert!(
                stdout.contains("No errors were found"),
                "{command}: {stdout}"
            );
        }
    }
    // A 6 MiB disk: VPC rounds it up to 10 GB, and it cannot be re-captured (not 100 GB).
    assert!(
        notices.iter().any(|n| n.contains("up to 10 GB")),
        "{notices:?}"
    );
    assert!(
        notices.iter().any(|n| n.contains("exactly 100 GB")),
        "{notices:?}"
    );
}

#[test]
fn an_ibm_classic_job_writes_a_vhd_0_vhd_and_says_to_wrap_the_key_file_as_it_is() {
    let scratch = scratch();
    let daemon = Daemon::start(scratch.path(), &[]);
    let dir = &work_dir(scratch.path());
    let source = make_source(dir, SourceKind::VhdDynamic, "6M");
    for (len, cipher) in [(64, "AES-256-XTS"), (32, "AES-128-XTS")] {
        let (key, raw) = key_of_len(dir, &format!("secret{len}.dek"), len);
        let output = dir.join("disk.vhd-0.vhd");
        let (steps, event, _) = text_and_json_job(&daemon, "ibm-classic", &source, &output, &key);
        let summary = &event["summary"];
        assert_eq!(summary["output_format"], "vhd", "{summary}");
        assert_eq!(summary["key_size_bits"], len * 8, "{summary}");
        // The key hash vhd-util prints: SHA-256 of 32 zero bytes and the decoded key.
        let hash = vhd_key_hash(&raw);
        assert_eq!(summary["vhd_key_hash"], hash.as_str(), "{summary}");
        assert!(
            steps
                .iter()
                .any(|s| s.contains(&format!("compare the key hash {hash}"))),
            "{steps:#?}"
        );
        assert!(
            steps
                .iter()
                .any(|s| s.contains(&format!("encrypted with {cipher}"))),
            "{len}-byte key: {steps:#?}"
        );

        // What IBM's importer sees: a VHD (qemu probes it as vpc) of the source's size
        // rounded up to whole 2 MiB blocks.
        let info = qemu_info_probed(&output);
        let size = qemu_virtual_size(&source).next_multiple_of(2 << 20);
        assert_eq!(info["format"], "vpc", "{info}");
        assert_eq!(info["virtual-size"], size, "{info}");
        assert_eq!(summary["output_virtual_size"], size, "{summary}");

        // The key bytes to wrap: the key file's text itself (IBM decodes it into the data
        // key); not its base64.
        let payload = wrap_payload(&steps).expect("no Key Protect wrap step");
        assert_eq!(payload, format!("$(cat {})", key.display()));
        assert_eq!(shell_value(&payload), std::fs::read(&key).unwrap());
        assert!(steps.iter().any(|s| s.contains("AS IT IS")), "{steps:#?}");
        assert!(
            !steps
                .iter()
                .any(|s| s.contains("kp key wrap") && s.contains("base64")),
            "{steps:#?}"
        );
        assert!(
            steps.iter().any(|s| s.contains("ibmcloud sl image import")
                && s.contains("cos://REGION/BUCKET/disk.vhd-0.vhd")
                && s.contains("--is-encrypted")),
            "{steps:#?}"
        );
        run_verify_step(&daemon, &steps);
        // The hash `imgctl key fingerprint --vhd KEY` prints (a step says to run it) is it.
        let printed = run_ok(
            daemon
                .imgctl()
                .args(["key", "fingerprint", "--vhd"])
                .arg(&key),
        );
        assert_eq!(String::from_utf8_lossy(&printed.stdout).trim(), hash);
        std::fs::remove_file(&output).unwrap();
        std::fs::remove_file(&key).unwrap();
    }
    assert_eq!(leftovers(dir, &[&source]), Vec::<String>::new());
}

#[test]
fn an_openstack_job_writes_an_encrypted_qcow2_and_stores_the_key_file_as_a_passphrase() {
    let scratch = scratch();
    let daemon = Daemon::start(scratch.path(), &[]);
    let dir = &work_dir(scratch.path());
    let source = make_source(dir, SourceKind::VhdFixed, "6M");
    let key = dir.join("secret.dek");
    write_key(&key);
    // OpenStack sets no naming rule.
    let output = dir.join("disk.img");
    let (steps, event, notices) = text_and_json_job(&daemon, "openstack", &source, &output, &key);
    assert_eq!(event["summary"]["output_format"], "qcow2");
    let info = qemu_info_probed(&output);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(
        info["format-specific"]["data"]["encrypt"]["format"], "luks",
        "{info}"
    );
    assert_eq!(info["virtual-size"], qemu_virtual_size(&source), "{info}");
    assert_qemu_check_and_compare(&output, &key, &source, "vpc");

    assert_eq!(
        wrap_payload(&steps),
        None,
        "OpenStack wraps nothing: {steps:#?}"
    );
    assert!(
        steps.iter().any(|s| s.contains(&format!(
            "openstack secret store --secret-type passphrase --file {}",
            key.display()
        ))),
        "{steps:#?}"
    );
    assert!(
        steps.iter().any(|s| s.contains("--disk-format qcow2")
            && s.contains(&format!("--file {}", output.display()))
            && s.contains("os_encrypt_format=LUKSv1")),
        "{steps:#?}"
    );
    run_verify_step(&daemon, &steps);
    assert!(
        notices.iter().any(|n| n.contains("specification stage")),
        "{notices:?}"
    );
    assert_eq!(
        leftovers(dir, &[&source, &key, &output]),
        Vec::<String>::new()
    );
}

#[test]
fn a_48_byte_key_is_refused_under_ibm_classic_and_leaves_nothing() {
    let scratch = scratch();
    let daemon = Daemon::start(scratch.path(), &[]);
    let dir = &work_dir(scratch.path());
    let source = make_source(dir, SourceKind::Raw, "4M");
    let (key, _) = key_of_len(dir, "secret.dek", 48);
    let stderr = refused(
        &daemon,
        &["--target", "ibm-classic"],
        &source,
        &dir.join("disk.vhd-0.vhd"),
        &key,
    );
    assert!(
        stderr.contains("decodes to 48 bytes")
            && stderr.contains("32 bytes")
            && stderr.contains("64 bytes"),
        "{stderr}"
    );
    assert_eq!(leftovers(dir, &[&source, &key]), Vec::<String>::new());
}

#[test]
fn engine_kernel_with_a_vhd_output_is_a_clear_error() {
    let scratch = scratch();
    let daemon = Daemon::start(scratch.path(), &[]);
    let dir = &work_dir(scratch.path());
    let source = make_source(dir, SourceKind::Raw, "4M");
    let (key, _) = key_of_len(dir, "secret.dek", 64);
    for args in [
        &["--format", "vhd", "--engine", "kernel"][..],
        &["--target", "ibm-classic", "--engine", "kernel"][..],
    ] {
        let name = if args[0] == "--target" {
            "disk.vhd-0.vhd"
        } else {
            "disk.vhd"
        };
        let stderr = refused(&daemon, args, &source, &dir.join(name), &key);
        assert!(
            stderr.contains("--engine kernel writes raw LUKS only")
                && stderr.contains("a vhd output is written by the userspace engine")
                && stderr.contains("drop --engine"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(leftovers(dir, &[&source, &key]), Vec::<String>::new());
}
