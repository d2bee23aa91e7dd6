//! Resuming an interrupted raw LUKS encryption (issue 12, parts 3 and 4), with the real daemon
//! and real files: the daemon killed with SIGKILL at random points, imgctl interrupted with
//! Ctrl-C, the daemon stopped with SIGTERM; each re-run resumes from the checkpoint, and the
//! final image decrypts exactly to the source with an independent implementation
//! (`tests/support/luks_decrypt.py`, the volume key from `cryptsetup luksDump`). A changed key
//! or source restarts from scratch and says why; the checkpoint holds no key material.
//!
//! The jobs are slowed by the debug builds' `IMGCRYPTD_TEST_CHECKPOINT_DELAY_MS` (a pause after
//! each checkpoint) so that a 128 MiB source (eight 16 MiB checkpoint ranges) can be
//! interrupted at random points.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// Pause after each checkpoint: 128 MiB in 16 MiB ranges takes at least 8 × this.
const DELAY: (&str, &str) = ("IMGCRYPTD_TEST_CHECKPOINT_DELAY_MS", "250");

/// Source size: eight 16 MiB checkpoint ranges.
const SOURCE_BYTES: usize = 128 << 20;

/// One checkpoint range of a [`SOURCE_BYTES`] payload.
const RANGE: u64 = 16 << 20;

fn partial_of(output: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", output.display()))
}

/// A source whose every 512-byte sector differs (a sector written to the wrong place, or with
/// the wrong IV, shows).
fn write_source(path: &Path) {
    write_distinct_sectors(path, SOURCE_BYTES);
}

/// A pseudo-random duration in `range` milliseconds (the clock's nanoseconds are random
/// enough to place a kill).
fn random_millis(range: std::ops::Range<u64>) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(range.start + nanos % (range.end - range.start))
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    source: PathBuf,
    key: PathBuf,
    output: PathBuf,
}

fn setup() -> Setup {
    let scratch_dir = scratch();
    let dir = scratch_dir.path().to_path_buf();
    let source = dir.join("disk.raw");
    write_source(&source);
    let key = dir.join("k");
    write_key(&key);
    Setup {
        output: dir.join("disk.luks"),
        _dir: scratch_dir,
        dir,
        source,
        key,
    }
}

fn start_daemon(dir: &Path) -> Daemon {
    Daemon::start_with_env(dir, &["--engine", "userspace"], &[DELAY])
}

/// `imgctl encrypt --json` with cheap keyslot settings, its output piped.
fn encrypt(daemon: &Daemon, setup: &Setup, key: &Path) -> Command {
    let mut command = daemon.encrypt(&setup.source, &setup.output, key);
    command.arg("--json");
    command
}

/// The JSON events of an imgctl run.
fn events(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn notices(output: &Output) -> Vec<String> {
    events(output)
        .iter()
        .filter(|event| event["event"] == "notice")
        .map(|event| event["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits for a spawned imgctl and collects its output.
fn collect(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

/// Starts the job and returns once its copy passed `bytes` (at least one checkpoint).
fn start_past(command: &mut Command, bytes: u64) -> Child {
    start_until(command, |value| {
        value["progress"]["phase"] == "copy"
            && value["progress"]["bytes_done"].as_u64() >= Some(bytes)
    })
}

/// The final image is LUKS2 and decrypts exactly to the source, independently of imgcrypt.
fn assert_decrypts_to_source(setup: &Setup, key: &Path) {
    assert!(setup.output.exists(), "no image under the final name");
    assert!(
        !partial_of(&setup.output).exists(),
        "the partial file is left"
    );
    assert_eq!(luks_dump(&setup.output).version, 2);
    let plaintext = independent_decrypt(&setup.output, key, &setup.dir);
    assert_plaintext_matches(&plaintext, &setup.source);
}

/// The partial file is there and nothing recognises it as LUKS.
fn assert_partial_is_not_an_image(output: &Path) {
    let partial = partial_of(output);
    assert!(partial.exists(), "the partial file was not kept");
    assert!(!output.exists(), "an image under the final name");
    let bytes = fs::read(&partial).unwrap();
    assert_ne!(
        &bytes[..6],
        b"LUKS\xba\xbe",
        "the partial has the LUKS magic"
    );
    assert!(
        !run(Command::new("cryptsetup").arg("isLuks").arg(&partial))
            .status
            .success(),
        "cryptsetup takes the partial file for LUKS"
    );
}

/// Every checkpoint file of the test daemon's state directory.
fn checkpoint_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.join("state")];
    while let Some(path) = stack.pop() {
        match fs::read_dir(&path) {
            Ok(entries) => stack.extend(entries.map(|entry| entry.unwrap().path())),
            Err(_) if path.is_file() => found.push(path),
            Err(_) => {}
        }
    }
    found
}

/// Waits until the daemon's log says the job it ran ended.
fn wait_for_log(daemon: &Daemon, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log_text().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no `{needle}` in the daemon's log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn summary_resumed_from(output: &Output) -> Option<u64> {
    last_json_summary(&output.stdout)["resumed_from"].as_u64()
}

/// A daemon with an interrupted encryption of `setup` with `key`: stopped past its second
/// checkpoint range with Ctrl-C, its progress checkpointed.
fn interrupted_run(setup: &Setup, key: &Path) -> Daemon {
    let daemon = start_daemon(&setup.dir);
    let mut child = start_past(&mut encrypt(&daemon, setup, key), 2 * RANGE);
    interrupt(&mut child);
    wait_for_log(&daemon, "progress checkpointed");
    daemon
}

/// Re-runs with `key` and checks that it started from scratch saying `why`, and that the image
/// decrypts to the source.
fn assert_restarts(daemon: &Daemon, setup: &Setup, key: &Path, why: &str) {
    let output = run_ok(&mut encrypt(daemon, setup, key));
    assert_eq!(summary_resumed_from(&output), None, "{}", describe(&output));
    let notices = notices(&output);
    assert!(
        notices
            .iter()
            .any(|n| n.contains("from scratch") && n.contains(why)),
        "{notices:?}"
    );
    assert_decrypts_to_source(setup, key);
}

#[test]
fn a_daemon_killed_at_random_points_resumes_each_time_and_the_image_decrypts_to_the_source() {
    let setup = setup();
    let key_text = fs::read(&setup.key).unwrap();
    let key_raw = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&key_text)
            .unwrap()
    };
    let mut durable = 0;
    for round in 0..3 {
        let mut daemon = start_daemon(&setup.dir);
        // Past the last checkpoint by at least one range, then at a random point within the
        // next (the job pauses 250 ms per range): each round costs at most two of the eight.
        // (Progress inside the next range means the last one is checkpointed.)
        let child = start_past(
            &mut encrypt(&daemon, &setup, &setup.key),
            durable + RANGE + 1,
        );
        std::thread::sleep(random_millis(0..250));
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();
        let output = collect(child);
        assert!(
            !output.status.success(),
            "round {round}: {}",
            describe(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("is kept") && stderr.contains("run the same imgctl encrypt"),
            "round {round}: no advice on resuming: {}",
            describe(&output)
        );
        assert_partial_is_not_an_image(&setup.output);
        // The checkpoint holds neither the passphrase (the key file's text) nor its bytes.
        let files = checkpoint_files(&setup.dir);
        assert_eq!(files.len(), 1, "round {round}: {files:?}");
        for file in files {
            // Private to the daemon: the file 0600, its directories 0700.
            use std::os::unix::fs::PermissionsExt;
            let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&file), 0o600, "{}", file.display());
            assert_eq!(mode(file.parent().unwrap()), 0o700);
            assert_eq!(mode(&setup.dir.join("state/checkpoints")), 0o700);
            let bytes = fs::read(&file).unwrap();
            let checkpoint: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let done = checkpoint["done"].as_u64().unwrap();
            assert!(
                done > durable,
                "round {round}: no progress past {durable}: {done}"
            );
            durable = done;
            for secret in [&key_text, &key_raw] {
                assert!(
                    !bytes
                        .windows(secret.len())
                        .any(|window| window == &secret[..]),
                    "{} holds key material",
                    file.display()
                );
            }
        }
    }
    let daemon = start_daemon(&setup.dir);
    let output = run_ok(&mut encrypt(&daemon, &setup, &setup.key));
    // The log is kept across the restarts: the second and third runs resumed, and this one.
    let resumed = daemon
        .log_text()
        .matches("resuming from a checkpoint")
        .count();
    assert_eq!(resumed, 3, "{}", daemon.log_text());
    let from = summary_resumed_from(&output).expect("the last run resumed");
    assert!(from > 0, "resumed from {from}");
    assert!(
        checkpoint_files(&setup.dir).is_empty(),
        "a finished job's checkpoint is left"
    );
    assert_decrypts_to_source(&setup, &setup.key);
}

#[test]
fn ctrl_c_keeps_the_partial_file_and_the_rerun_resumes() {
    let setup = setup();
    let daemon = start_daemon(&setup.dir);
    let mut child = start_past(&mut encrypt(&daemon, &setup, &setup.key), 2 * RANGE);
    assert_eq!(interrupt(&mut child), Some(130));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("run the same imgctl encrypt command again to resume"),
        "{stderr}"
    );
    assert_partial_is_not_an_image(&setup.output);
    wait_for_log(&daemon, "progress checkpointed");

    let output = run_ok(&mut encrypt(&daemon, &setup, &setup.key));
    let from = summary_resumed_from(&output).expect("resumed");
    // Copying past the second range means the first was checkpointed.
    assert!(from >= RANGE, "resumed from {from}");
    // The audit record says so too.
    wait_for_log(&daemon, &format!("resumed_from={from}"));
    assert_decrypts_to_source(&setup, &setup.key);
}

#[test]
fn a_changed_key_restarts_from_scratch_and_only_the_new_key_opens_the_image() {
    let setup = setup();
    let daemon = start_daemon(&setup.dir);
    let mut child = start_past(&mut encrypt(&daemon, &setup, &setup.key), 2 * RANGE);
    interrupt(&mut child);
    wait_for_log(&daemon, "progress checkpointed");
    let new_key = setup.dir.join("k2");
    write_key(&new_key);

    let output = run_ok(&mut encrypt(&daemon, &setup, &new_key));
    assert_eq!(summary_resumed_from(&output), None, "{}", describe(&output));
    let notices = notices(&output);
    assert!(
        notices
            .iter()
            .any(|n| n.contains("from scratch") && n.contains("the key changed")),
        "{notices:?}"
    );
    assert!(test_passphrase(&setup.output, &new_key));
    assert!(!test_passphrase(&setup.output, &setup.key));
    assert_decrypts_to_source(&setup, &new_key);
}

#[test]
fn a_changed_source_restarts_from_scratch() {
    let setup = setup();
    let daemon = interrupted_run(&setup, &setup.key);
    // Rewrite one sector at the start (size unchanged).
    let mut bytes = fs::read(&setup.source).unwrap();
    bytes[..512].fill(0x42);
    fs::write(&setup.source, bytes).unwrap();

    assert_restarts(&daemon, &setup, &setup.key, "the source changed");
}

#[test]
fn sigterm_checkpoints_the_job_and_a_rerun_after_the_restart_resumes() {
    let setup = setup();
    let mut daemon = start_daemon(&setup.dir);
    let child = start_past(&mut encrypt(&daemon, &setup, &setup.key), 2 * RANGE);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.child.wait().unwrap();
    assert!(
        status.success(),
        "the daemon's exit after SIGTERM: {status}"
    );
    let output = collect(child);
    assert!(!output.status.success());
    let text = format!(
        "{} {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("checkpointed") && text.contains("again to resume"),
        "{text}"
    );
    assert!(daemon.log_text().contains("progress checkpointed"));
    assert_partial_is_not_an_image(&setup.output);

    let daemon = start_daemon(&setup.dir);
    let output = run_ok(&mut encrypt(&daemon, &setup, &setup.key));
    let from = summary_resumed_from(&output).expect("resumed");
    // Copying past the second range means the first was checkpointed.
    assert!(from >= RANGE, "resumed from {from}");
    assert_decrypts_to_source(&setup, &setup.key);
}

#[test]
fn force_discards_the_partial_file_and_starts_over() {
    let setup = setup();
    let daemon = start_daemon(&setup.dir);
    let mut child = start_past(&mut encrypt(&daemon, &setup, &setup.key), 2 * RANGE);
    interrupt(&mut child);
    wait_for_log(&daemon, "progress checkpointed");
    let output = run_ok(encrypt(&daemon, &setup, &setup.key).arg("--force"));
    assert_eq!(summary_resumed_from(&output), None, "{}", describe(&output));
    assert_decrypts_to_source(&setup, &setup.key);
}

#[test]
fn a_rerun_that_cannot_reach_the_daemon_keeps_the_checkpointed_partial_file() {
    let setup = setup();
    let mut daemon = interrupted_run(&setup, &setup.key);
    let partial = partial_of(&setup.output);
    let before = fs::read(&partial).unwrap();
    // After a reboot, before the socket is up: the re-run reopens the partial, then fails to
    // connect.
    let mut rerun = encrypt(&daemon, &setup, &setup.key);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let output = rerun.output().unwrap();
    assert!(!output.status.success(), "{}", describe(&output));
    assert_eq!(
        fs::read(&partial).unwrap(),
        before,
        "the partial file changed"
    );

    // An flock on the partial file (anyone's who can open it) no longer holds the job up:
    // the daemon serialises the jobs on one output itself.
    let held = nix::fcntl::Flock::lock(
        fs::File::open(&partial).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    let daemon = start_daemon(&setup.dir);
    let started = Instant::now();
    let output = run_ok(&mut encrypt(&daemon, &setup, &setup.key));
    assert!(
        summary_resumed_from(&output).is_some(),
        "{}",
        describe(&output)
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "waited for the flock"
    );
    drop(held);
    assert_decrypts_to_source(&setup, &setup.key);
    // The finished image stays private to its owner, as its partial file was.
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&setup.output).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
}

#[test]
fn the_daemon_restarts_rather_than_resumes_a_partial_file_the_caller_does_not_own() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to give the partial file to another user");
        return;
    }
    let setup = setup();
    let daemon = interrupted_run(&setup, &setup.key);
    // Someone else's file that the caller (root here) may write: imgctl refuses it...
    let partial = partial_of(&setup.output);
    std::os::unix::fs::chown(&partial, Some(65534), None).unwrap();
    let output = encrypt(&daemon, &setup, &setup.key).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("belongs to uid 65534"), "{stderr}");
    assert!(partial.exists());
    // ... and a client that passes it anyway gets no resume from its bytes.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&partial)
        .unwrap();
    let source = fs::File::open(&setup.source).unwrap();
    let key = fs::File::open(&setup.key).unwrap();
    let mut client = common::raw_client::RawClient::connect(&daemon.socket);
    client.encrypt(&source, &file, &key);
    wait_for_log(
        &daemon,
        "OUT.partial belongs to uid 65534, not to the caller",
    );
    assert!(!daemon.log_text().contains("resuming from a checkpoint"));
}

#[test]
fn a_partial_file_whose_staged_header_was_altered_restarts_from_scratch() {
    let setup = setup();
    let daemon = interrupted_run(&setup, &setup.key);
    // One byte of the header area that nothing parses (past the keyslot material): only the
    // checkpoint's hash of the staged header notices.
    let partial = fs::OpenOptions::new()
        .write(true)
        .open(partial_of(&setup.output))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&partial, &[0x5a], 1 << 20).unwrap();
    drop(partial);

    assert_restarts(
        &daemon,
        &setup,
        &setup.key,
        "not the one the interrupted run",
    );
}

#[test]
fn a_restart_into_a_complete_old_image_never_leaves_its_header_over_a_partial_payload() {
    let setup = setup();
    {
        let daemon = start_daemon(&setup.dir);
        run_ok(&mut encrypt(&daemon, &setup, &setup.key));
    }
    // A complete image under the partial name (its rename was lost), no checkpoint for it.
    fs::rename(&setup.output, partial_of(&setup.output)).unwrap();
    let new_key = setup.dir.join("k2");
    write_key(&new_key);
    let daemon = Daemon::start_with_env(
        &setup.dir,
        &["--engine", "userspace"],
        &[DELAY, ("IMGCRYPTD_CRASH_AT", "encrypt:copying")],
    );
    let output = encrypt(&daemon, &setup, &new_key).output().unwrap();
    assert!(!output.status.success(), "{}", describe(&output));
    // Killed with the first payload bytes of the restart written: the old header is gone.
    assert_partial_is_not_an_image(&setup.output);
}

#[test]
fn a_finished_image_whose_checkpoint_outlived_it_is_completed_by_the_rerun() {
    let setup = setup();
    {
        // Killed with the header (magic and all) durable, its checkpoint not yet removed.
        let daemon = Daemon::start_with_env(
            &setup.dir,
            &["--engine", "userspace"],
            &[("IMGCRYPTD_CRASH_AT", "encrypt:header-written")],
        );
        let output = encrypt(&daemon, &setup, &setup.key).output().unwrap();
        assert!(!output.status.success(), "{}", describe(&output));
        assert!(partial_of(&setup.output).exists());
        assert_eq!(checkpoint_files(&setup.dir).len(), 1);
    }
    let daemon = start_daemon(&setup.dir);
    let output = run_ok(&mut encrypt(&daemon, &setup, &setup.key));
    // Its unmasked header is the staged one: resumed at the end, nothing copied again.
    assert_eq!(
        summary_resumed_from(&output),
        Some(SOURCE_BYTES as u64),
        "{}",
        describe(&output)
    );
    assert!(checkpoint_files(&setup.dir).is_empty());
    assert_decrypts_to_source(&setup, &setup.key);
}

#[test]
fn an_edit_with_its_modification_time_set_back_still_restarts_from_scratch() {
    let setup = setup();
    let daemon = interrupted_run(&setup, &setup.key);
    // One sector away from the sampled blocks, size unchanged, mtime put back as it was: only
    // the inode change time (which no user can set) tells.
    let modified = fs::metadata(&setup.source).unwrap().modified().unwrap();
    let source = fs::OpenOptions::new()
        .write(true)
        .open(&setup.source)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&source, &[0x42; 512], 32 << 20).unwrap();
    source
        .set_times(fs::FileTimes::new().set_modified(modified))
        .unwrap();
    drop(source);

    assert_restarts(&daemon, &setup, &setup.key, "inode change time");
}

#[test]
fn a_guessable_key_is_not_fingerprinted_in_the_checkpoint_and_its_keyslot_tells_a_change() {
    let setup = setup();
    let weak = setup.dir.join("weak");
    // Valid base64, but of printable text: not a generated key.
    let text_key = |text: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(text)
    };
    fs::write(&weak, text_key("my disk passphrase is not random at all!")).unwrap();
    fs::set_permissions(&weak, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let daemon = interrupted_run(&setup, &weak);
    let files = checkpoint_files(&setup.dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let checkpoint: serde_json::Value =
        serde_json::from_slice(&fs::read(&files[0]).unwrap()).unwrap();
    assert!(checkpoint["key_fingerprint"].is_null(), "{checkpoint}");

    let other = setup.dir.join("weak2");
    fs::write(
        &other,
        text_key("another passphrase that is not random at all"),
    )
    .unwrap();
    fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert_restarts(
        &daemon,
        &setup,
        &other,
        "does not open the interrupted run's keyslot",
    );
}
