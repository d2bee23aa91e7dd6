//! imgctl as a user meets it: refusals that protect existing files, errors that say what to do
//! and leave nothing behind, interruption, an unprivileged user through the root daemon, and a
//! daemon started on demand.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A scratch directory holding a daemon, a source made by qemu-img, a valid key, and the output
/// path. The directory comes first so it is dropped last, after the daemon has stopped.
fn setup(kind: SourceKind, size: &str) -> (tempfile::TempDir, Daemon, PathBuf, PathBuf, PathBuf) {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let source = make_source(dir, kind, size);
    let key = dir.join("k");
    write_key(&key);
    let output = dir.join("out.luks");
    (scratch_dir, daemon, source, key, output)
}

fn partial_of(output: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", output.display()))
}

/// Asserts failure with `needle` in stderr, and that neither the output nor its partial exist.
fn assert_fails_cleanly(command: &mut Command, output: &Path, needle: &str) -> String {
    let result = run(command);
    let stderr = String::from_utf8_lossy(&result.stderr).to_string();
    assert!(
        !result.status.success(),
        "expected failure: {}",
        describe(&result)
    );
    assert!(
        stderr.contains(needle),
        "stderr lacks {needle:?}: {}",
        describe(&result)
    );
    assert!(!output.exists(), "{} must not exist", output.display());
    assert!(!partial_of(output).exists(), "partial file left behind");
    stderr
}

#[test]
fn existing_output_is_kept_without_force_and_replaced_with_it() {
    let (_scratch, daemon, source, key, output) = setup(SourceKind::Raw, "2M");
    fs::write(&output, b"keep me").unwrap();

    let result = run(&mut daemon.encrypt(&source, &output, &key));
    assert!(!result.status.success());
    assert!(
        String::from_utf8_lossy(&result.stderr).contains("pass --force"),
        "{}",
        describe(&result)
    );
    assert_eq!(fs::read(&output).unwrap(), b"keep me");
    assert!(!partial_of(&output).exists());

    run_ok(daemon.encrypt(&source, &output, &key).arg("--force"));
    assert!(test_passphrase(&output, &key));
}

#[test]
fn stale_partial_file_is_restarted_for_luks_and_refused_for_qcow2_without_force() {
    let (_scratch, daemon, source, key, output) = setup(SourceKind::Raw, "2M");
    fs::write(partial_of(&output), b"left by a crash").unwrap();

    // Raw LUKS resumes an interrupted run's partial file; one no checkpoint describes is
    // written from scratch, and the notice says why.
    let result = run_ok(&mut daemon.encrypt(&source, &output, &key));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("from scratch") && stderr.contains("no checkpoint"),
        "{}",
        describe(&result)
    );
    assert!(test_passphrase(&output, &key));
    assert!(!partial_of(&output).exists());

    // The sparse containers are not resumed: their stale partial is refused, and replaced
    // with --force.
    let qcow2 = output.with_extension("qcow2");
    fs::write(partial_of(&qcow2), b"left by a crash").unwrap();
    let result = run(daemon
        .encrypt(&source, &qcow2, &key)
        .args(["--format", "qcow2"]));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(stderr.contains("interrupted run"), "{}", describe(&result));
    assert_eq!(
        fs::read(partial_of(&qcow2)).unwrap(),
        b"left by a crash",
        "not ours to delete"
    );
    run_ok(
        daemon
            .encrypt(&source, &qcow2, &key)
            .args(["--format", "qcow2", "--force"]),
    );
    assert!(qcow2.exists());
    assert!(!partial_of(&qcow2).exists());
}

#[test]
fn key_file_with_trailing_newline_is_refused_with_the_fix() {
    let (_scratch, daemon, source, key, output) = setup(SourceKind::Raw, "2M");
    let mut bytes = fs::read(&key).unwrap();
    bytes.push(b'\n');
    fs::write(&key, bytes).unwrap();
    let stderr = assert_fails_cleanly(
        &mut daemon.encrypt(&source, &output, &key),
        &output,
        "echo -n",
    );
    assert!(stderr.contains("newline"), "{stderr}");
}

#[test]
fn short_key_file_is_refused() {
    let (_scratch, daemon, source, key, output) = setup(SourceKind::Raw, "2M");
    fs::write(&key, b"c2hvcnQ=").unwrap();
    assert_fails_cleanly(&mut daemon.encrypt(&source, &output, &key), &output, "32");
}

#[test]
fn group_readable_key_file_gets_a_warning() {
    let (_scratch, daemon, source, key, output) = setup(SourceKind::Raw, "2M");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let result = run_ok(&mut daemon.encrypt(&source, &output, &key));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

#[test]
fn corrupt_vhd_is_refused_and_nothing_is_written() {
    let (_scratch, daemon, source, key, output) = setup(SourceKind::VhdDynamic, "8M");
    // Break the dynamic header's cookie ("cxsparse" at offset 512).
    let mut bytes = fs::read(&source).unwrap();
    bytes[512..520].copy_from_slice(b"garbage!");
    fs::write(&source, bytes).unwrap();
    assert_fails_cleanly(
        &mut daemon.encrypt(&source, &output, &key),
        &output,
        "corrupt",
    );
}

#[test]
fn differencing_vhd_naming_no_parent_is_refused_with_advice() {
    let (scratch_dir, daemon, parent, key, output) = setup(SourceKind::VhdDynamic, "8M");
    let dir = scratch_dir.path();
    let child = dir.join("child.vhd");
    // qemu-img cannot create differencing VHDs; turn a dynamic one into one by its disk type
    // (footer offset 60, copy at 0) and fix both checksums.
    fs::copy(&parent, &child).unwrap();
    let mut bytes = fs::read(&child).unwrap();
    let footer_at = bytes.len() - 512;
    for start in [0, footer_at] {
        bytes[start + 60..start + 64].copy_from_slice(&4u32.to_be_bytes());
        bytes[start + 64..start + 68].copy_from_slice(&[0; 4]);
        let sum: u32 = bytes[start..start + 512]
            .iter()
            .map(|&b| u32::from(b))
            .sum();
        bytes[start + 64..start + 68].copy_from_slice(&(!sum).to_be_bytes());
    }
    fs::write(&child, bytes).unwrap();
    assert_fails_cleanly(
        &mut daemon.encrypt(&child, &output, &key),
        &output,
        "names no parent",
    );
}

#[test]
fn human_summary_names_the_essentials() {
    let (_scratch, daemon, source, key, output) = setup(SourceKind::VhdDynamic, "8M");
    let result = run_ok(&mut daemon.encrypt(&source, &output, &key));
    let stdout = String::from_utf8_lossy(&result.stdout);
    for label in [
        "output",
        "LUKS version",
        "cipher",
        "sector size",
        "data offset",
        "payload size",
        "output size",
        "key fingerprint",
        "engine",
        "time",
        "throughput",
    ] {
        assert!(stdout.contains(label), "summary lacks {label:?}:\n{stdout}");
    }
    let fingerprint = {
        use base64::Engine as _;
        let digest = run_ok(Command::new("sha256sum").arg(&key));
        let hex = String::from_utf8_lossy(&digest.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        base64::engine::general_purpose::STANDARD.encode(raw)
    };
    assert!(
        stdout.contains(&fingerprint),
        "fingerprint {fingerprint} not in:\n{stdout}"
    );
}

#[test]
fn interrupt_keeps_the_partial_file_for_a_resume_and_cancels_the_job() {
    let dir = scratch();
    let dir = dir.path();
    let daemon = Daemon::start(dir, &[]);
    let source = dir.join("big.raw");
    fs::File::create(&source).unwrap().set_len(4 << 30).unwrap();
    let key = dir.join("k");
    write_key(&key);
    let output = dir.join("out.luks");
    let mut child = start_until(
        daemon.encrypt(&source, &output, &key).arg("--json"),
        |value| {
            value["progress"]["phase"] == "copy"
                && value["progress"]["bytes_done"].as_u64() > Some(0)
        },
    );
    assert!(
        partial_of(&output).exists(),
        "the partial file exists while writing"
    );
    assert_eq!(interrupt(&mut child), Some(130), "exit status after SIGINT");
    // Raw LUKS is resumable: the partial file stays (tests/resume.rs resumes it), and it is no
    // image meanwhile.
    assert!(partial_of(&output).exists(), "partial file kept");
    assert!(!test_passphrase(&partial_of(&output), &key));
    assert!(!output.exists(), "nothing under the final name");

    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemon
        .log_text()
        .contains("job ended after its client left: the encryption stopped")
    {
        assert!(
            Instant::now() < deadline,
            "daemon did not cancel:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn unprivileged_user_encrypts_through_the_root_daemon() {
    let user = test_user(TEST_USER);
    let uid = user.uid;
    let dir = scratch();
    let dir = dir.path();
    let daemon = Daemon::start(dir, &["--socket-mode", "0666"]);
    let work = dir.join("user");
    fs::create_dir(&work).unwrap();
    let source = make_source(&work, SourceKind::VhdDynamic, "8M");
    let key = work.join("k");
    write_key(&key);
    user.own(&[&work, &source, &key]);
    // A root-only file the user must not be able to have encrypted through the daemon.
    let secret = dir.join("root-only.raw");
    fs::write(&secret, vec![7u8; 1 << 20]).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();

    let as_user =
        |args: &[&std::ffi::OsStr]| run(user.imgctl(&daemon).args(args).args(CHEAP_PBKDF));
    let output = work.join("out.luks");
    let result = as_user(&[
        "encrypt".as_ref(),
        source.as_os_str(),
        "-o".as_ref(),
        output.as_os_str(),
        "--key-file".as_ref(),
        key.as_os_str(),
    ]);
    assert!(
        result.status.success(),
        "{}\n{}",
        describe(&result),
        daemon.log_text()
    );
    let metadata = fs::metadata(&output).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&metadata),
        uid,
        "the user owns the output"
    );
    assert!(test_passphrase(&output, &key));

    // The daemon is root, but the user cannot make it read a file the user cannot open.
    let stolen = work.join("stolen.luks");
    let result = as_user(&[
        "encrypt".as_ref(),
        secret.as_os_str(),
        "-o".as_ref(),
        stolen.as_os_str(),
        "--key-file".as_ref(),
        key.as_os_str(),
    ]);
    assert!(!result.status.success());
    assert!(
        String::from_utf8_lossy(&result.stderr).contains("Permission denied"),
        "{}",
        describe(&result)
    );
    assert!(!stolen.exists() && !partial_of(&stolen).exists());
    assert!(
        daemon.log_text().contains(&format!("user_uid={uid}")),
        "the daemon logs who called:\n{}",
        daemon.log_text()
    );
}

#[test]
fn imgctl_starts_a_user_daemon_when_none_answers() {
    let dir = scratch();
    let dir = dir.path();
    assert!(
        std::os::unix::net::UnixStream::connect(imgcrypt_proto::paths::SYSTEM_SOCKET).is_err(),
        "a system daemon is running on this machine; this test needs none"
    );
    let runtime = dir.join("xdg");
    fs::create_dir(&runtime).unwrap();
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
    let source = make_source(dir, SourceKind::Raw, "2M");
    let key = dir.join("k");
    write_key(&key);
    let output = dir.join("out.luks");

    let result = run(Command::new(binary("imgctl"))
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove(imgcrypt_proto::paths::SOCKET_ENV)
        .arg("encrypt")
        .arg(&source)
        .arg("-o")
        .arg(&output)
        .arg("--key-file")
        .arg(&key)
        .args(CHEAP_PBKDF));
    let socket = runtime.join("imgcrypt/io.imgcrypt");
    let daemon_pids = processes_with_argument(&socket);
    for pid in &daemon_pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    assert!(
        result.status.success(),
        "{}\nlog: {}",
        describe(&result),
        fs::read_to_string(runtime.join("imgcrypt/imgcryptd.log")).unwrap_or_default()
    );
    assert!(test_passphrase(&output, &key));
    assert_eq!(
        daemon_pids.len(),
        1,
        "exactly one per-user daemon was started"
    );
}

fn processes_with_argument(argument: &Path) -> Vec<i32> {
    let needle = argument.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| cmdline.split(|&b| b == 0).any(|arg| arg == needle))
                .unwrap_or(false)
        })
        .collect()
}
