//! Jobs that outlive their client: `imgctl encrypt --detach`, `jobs`, `status`, `cancel`,
//! `wait`, against a real daemon with real files.
//!
//! The rename of a detached job's output is done by `imgctl wait` (the user's own process),
//! only if `OUT.partial` is still the file the job wrote; the daemon never renames. Two uids
//! (the hostile-user test users) check that one user can neither see, wait on nor cancel the
//! other's job, and gets exactly the error of an unknown id; an operator-group member sees all.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// 4 GiB sparse: the copy runs long enough to be watched and cancelled (it is never finished).
const BIG: u64 = 4 << 30;

fn sparse(path: &Path, size: u64) -> PathBuf {
    fs::File::create(path).unwrap().set_len(size).unwrap();
    path.to_path_buf()
}

fn partial(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Runs `imgctl encrypt ... --detach` and returns the job id it printed.
fn detach(command: &mut Command) -> u64 {
    let output = run(command.arg("--detach").stdin(Stdio::null()));
    assert!(output.status.success(), "detach: {}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let id: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("no job id printed ({e}): {}", describe(&output)));
    assert!(stderr.contains(&format!("imgctl wait {id}")), "{stderr}");
    id
}

/// `imgctl status ID --json` run by `command`'s user.
fn status_with(mut command: Command, id: u64) -> Value {
    let output = run(command.args(["status", &id.to_string(), "--json"]));
    assert!(output.status.success(), "status: {}", describe(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn status(daemon: &Daemon, id: u64) -> Value {
    status_with(daemon.imgctl(), id)
}

/// Polls the job's status until `done` says so (60 s at most).
fn wait_for(daemon: &Daemon, id: u64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = status(daemon, id);
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} never {what}: {job}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn copying(job: &Value) -> bool {
    job["state"] == "running" && job["progress"]["bytes_done"].as_u64().unwrap_or(0) > 0
}

#[test]
fn detach_then_wait_renames_the_output_and_it_decrypts() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "16M");
    let out = dir.join("out.luks");
    let id = detach(&mut daemon.encrypt(&source, &out, &key));
    // imgctl has exited: the partial survives it, the final name is not there yet.
    assert!(partial(&out).exists(), "OUT.partial removed on exit");
    assert!(!out.exists());

    let job = wait_for(&daemon, id, "ended", |job| job["state"] == "succeeded");
    assert_eq!(job["detached"], true);
    assert_eq!(job["names"]["output"], out.to_str().unwrap());
    let text = run_ok(daemon.imgctl().args(["status", &id.to_string()]));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("rename pending"), "{text}");

    let waited = run(daemon.imgctl().args(["wait", &id.to_string(), "--json"]));
    daemon.assert_ok(&waited, "wait");
    let summary = last_json_summary(&waited.stdout);
    assert_eq!(summary["virtual_size"], 16 << 20);
    assert!(out.exists() && !partial(&out).exists());
    let plaintext = independent_decrypt(&out, &key, dir);
    assert_plaintext_matches(&plaintext, &source);

    // A second wait finds it done; status says so.
    daemon.assert_ok(
        &run(daemon.imgctl().args(["wait", &id.to_string()])),
        "second wait",
    );
    let text = run_ok(daemon.imgctl().args(["status", &id.to_string()]));
    assert!(String::from_utf8_lossy(&text.stdout).contains("renamed"));

    // Decrypt detaches the same way; its wait renames RAW.partial to RAW.
    let raw = dir.join("plain.raw");
    let id = detach(&mut daemon.decrypt(&out, &raw, &key));
    let waited = run(daemon.imgctl().args(["wait", &id.to_string()]));
    daemon.assert_ok(&waited, "wait for decrypt");
    assert!(raw.exists() && !partial(&raw).exists());
    assert_plaintext_matches(&raw, &source);
}

#[test]
fn a_detached_qcow2_overlay_gets_its_backing_file_passed_and_decrypts_flattened() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let name = |path: &Path| path.to_str().unwrap().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &name(&base), "8M"]);
    qemu_io(
        "qcow2",
        &base,
        &["write -P 0x5a 0 2M", "write -P 0x33 6M 1M"],
    );
    // The overlay names its backing file relatively, as most chains do.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &name(&top),
    ]);
    qemu_io("qcow2", &top, &["write -P 0xc1 1M 2M"]);
    let out = dir.join("top.luks");
    // Without the backing file resolved before the hand-over, the job would fail later with
    // NeedFile: no client is there to open it.
    let id = detach(&mut daemon.encrypt(&top, &out, &key));
    let waited = run(daemon.imgctl().args(["wait", &id.to_string(), "--json"]));
    daemon.assert_ok(&waited, "wait for the detached overlay");
    let summary = last_json_summary(&waited.stdout);
    assert_eq!(summary["source_format"], "qcow2", "{summary}");
    let expected = dir.join("flat.raw");
    qemu_plaintext_as("qcow2", &top, &expected);
    assert_plaintext_matches(&independent_decrypt(&out, &key, dir), &expected);
}

#[test]
fn jobs_and_status_show_progress_and_cancel_stops_a_detached_job() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = sparse(&dir.join("big.raw"), BIG);
    let out = dir.join("big.luks");
    let descriptors_before = daemon.open_descriptors();
    let id = detach(&mut daemon.encrypt(&source, &out, &key));
    let job = wait_for(&daemon, id, "copied", copying);
    assert_eq!(job["kind"], "encrypt");
    // The engine is known while the job runs (from the job's audit facts), not only from
    // its final summary; `status` says it in text too.
    let engine = job["engine"]
        .as_str()
        .unwrap_or_else(|| panic!("no engine: {job}"));
    assert!(["userspace", "kernel"].contains(&engine), "{job}");
    let text = run_ok(daemon.imgctl().args(["status", &id.to_string()]));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("engine: {engine}")), "{text}");
    assert_eq!(job["progress"]["bytes_total"], BIG);
    assert!(job["started_ms"].as_u64().unwrap() >= job["created_ms"].as_u64().unwrap());
    // Rate and ETA appear once the copy has run a moment.
    let job = wait_for(&daemon, id, "had a rate", |job| {
        job["rate"].as_u64().is_some()
    });
    assert!(job["eta_ms"].as_u64().is_some(), "{job}");

    let table = run_ok(daemon.imgctl().arg("jobs"));
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table
        .lines()
        .find(|line| line.starts_with(&format!("{id} ")))
        .unwrap_or_else(|| panic!("job {id} not listed:\n{table}"));
    assert!(row.contains("root") && row.contains("encrypt") && row.contains("running"));
    assert!(
        row.contains('%') && row.contains("/s") && row.contains("big.luks"),
        "{row}"
    );
    let listed: Value =
        serde_json::from_slice(&run_ok(daemon.imgctl().args(["jobs", "--json"])).stdout).unwrap();
    assert!(listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id));

    // A wait that follows the running copy and is killed leaves the job running.
    let mut follower = start_until(
        daemon.imgctl().args(["wait", &id.to_string(), "--json"]),
        |line| line["event"] == "progress" && line["progress"]["phase"] == "copy",
    );
    follower.kill().unwrap();
    follower.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(&daemon, id)["state"], "running");

    let cancelled = run(daemon.imgctl().args(["cancel", &id.to_string()]));
    daemon.assert_ok(&cancelled, "cancel");
    let said = String::from_utf8_lossy(&cancelled.stdout);
    assert!(said.contains("cancelled on request"), "{said}");
    assert!(said.contains("removed"), "{said}");
    let job = status(&daemon, id);
    assert_eq!(job["state"], "cancelled", "{job}");
    assert!(job["ended_ms"].as_u64().is_some());
    assert!(!out.exists() && !partial(&out).exists());
    // Nothing of the job is left open in the daemon: none of its files (the daemon opens
    // its random sources lazily, so the count alone would not do), no more descriptors than
    // those and the connections account for.
    let open = || -> Vec<PathBuf> {
        fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
            .unwrap()
            .filter_map(|entry| fs::read_link(entry.unwrap().path()).ok())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while open().iter().any(|path| {
        path.starts_with(dir) && !path.ends_with("imgcryptd.log") && !path.ends_with("io.lock")
    }) {
        assert!(
            Instant::now() < deadline,
            "the job's files are still open: {:?}",
            open()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Connections of the imgctl calls just made close as the daemon sees them leave: on a
    // loaded machine that can take a moment, so the count is polled too.
    while daemon.open_descriptors() > descriptors_before + 2 {
        assert!(Instant::now() < deadline, "{:?}", open());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Waiting on it gives the job's own final reply: the cancellation.
    let waited = run(daemon.imgctl().args(["wait", &id.to_string()]));
    assert!(!waited.status.success());
    assert!(String::from_utf8_lossy(&waited.stderr).contains("cancelled"));
}

#[test]
fn queued_jobs_report_their_position_and_a_killed_wait_does_not_cancel() {
    let dir = scratch();
    let dir = dir.path();
    let daemon = Daemon::start(dir, &["--max-jobs", "1"]);
    let key = dir.join("key");
    write_key(&key);
    let big = sparse(&dir.join("big.raw"), BIG);
    let source = make_source(dir, SourceKind::Raw, "8M");
    let blocker = detach(&mut daemon.encrypt(&big, &dir.join("big.luks"), &key));
    wait_for(&daemon, blocker, "copied", copying);
    let first_out = dir.join("first.luks");
    let second_out = dir.join("second.luks");
    let first = detach(&mut daemon.encrypt(&source, &first_out, &key));
    let second = detach(&mut daemon.encrypt(&source, &second_out, &key));
    assert_eq!(status(&daemon, first)["queue_position"], 1);
    let job = status(&daemon, second);
    assert_eq!(job["state"], "queued");
    assert_eq!(job["queue_position"], 2);
    assert_eq!(job["progress"]["queue_position"], 2);
    let text = run_ok(daemon.imgctl().args(["status", &second.to_string()]));
    assert!(String::from_utf8_lossy(&text.stdout).contains("queued (position 2)"));

    // Followers that are killed (as by SIGKILL) cancel nothing.
    let mut followers: Vec<_> = [first, second]
        .iter()
        .map(|id| {
            daemon
                .imgctl()
                .args(["wait", &id.to_string(), "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for follower in &mut followers {
        follower.kill().unwrap();
        follower.wait().unwrap();
    }
    // A wait streams the queued position too: read what one said before it was killed.
    let mut said = String::new();
    std::io::Read::read_to_string(followers[1].stdout.as_mut().unwrap(), &mut said).unwrap();
    assert!(said.contains("\"queue_position\":2"), "{said}");

    // The blocker goes; the first moves up and runs; the second follows.
    run_ok(daemon.imgctl().args(["cancel", &blocker.to_string()]));
    for (id, out) in [(first, &first_out), (second, &second_out)] {
        wait_for(&daemon, id, "succeeded", |job| job["state"] == "succeeded");
        daemon.assert_ok(
            &run(daemon.imgctl().args(["wait", &id.to_string()])),
            "wait after the killed follower",
        );
        assert_eq!(luks_dump(out).version, 2);
    }
}

#[test]
fn wait_refuses_to_rename_a_partial_that_is_not_the_jobs_file() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "8M");
    let out = dir.join("out.luks");
    let id = detach(&mut daemon.encrypt(&source, &out, &key));
    wait_for(&daemon, id, "succeeded", |job| job["state"] == "succeeded");
    // Someone puts another file where the job's output was.
    let moved = dir.join("moved.luks");
    fs::rename(partial(&out), &moved).unwrap();
    fs::write(partial(&out), b"not the job's output").unwrap();

    let waited = run(daemon.imgctl().args(["wait", &id.to_string()]));
    assert!(!waited.status.success(), "{}", describe(&waited));
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert!(stderr.contains("is not the file the job wrote"), "{stderr}");
    assert!(!out.exists());
    assert_eq!(fs::read(partial(&out)).unwrap(), b"not the job's output");
    let text = run_ok(daemon.imgctl().args(["status", &id.to_string()]));
    assert!(String::from_utf8_lossy(&text.stdout).contains("not the file the job wrote"));

    // With the job's own file back, the rename goes through.
    fs::rename(&moved, partial(&out)).unwrap();
    daemon.assert_ok(
        &run(daemon.imgctl().args(["wait", &id.to_string()])),
        "wait",
    );
    assert_eq!(luks_dump(&out).version, 2);
}

/// A system group for the operator test, created if missing.
fn operator_group() -> (String, u32) {
    let name = "imgcrypt-test-ops";
    if nix::unistd::Group::from_name(name).unwrap().is_none() {
        let output = run(Command::new("groupadd").args(["--system", name]));
        assert!(
            matches!(output.status.code(), Some(0 | 9)),
            "groupadd: {}",
            describe(&output)
        );
    }
    let gid = nix::unistd::Group::from_name(name)
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    (name.to_string(), gid)
}

/// Two test users, a daemon both may use with the operator group set, and the victim's directory
/// with a key in it.
struct Shared {
    victim: TestUser,
    attacker: TestUser,
    gid: u32,
    daemon: Daemon,
    home: PathBuf,
    key: PathBuf,
}

fn shared(dir: &Path) -> Shared {
    let (victim, attacker) = two_users();
    let (group, gid) = operator_group();
    let daemon = Daemon::start(dir, &["--socket-mode", "0666", "--operator-group", &group]);
    let home = shared_dir(dir, "victim");
    let key = home.join("key");
    write_key(&key);
    victim.own(&[&home, &key]);
    Shared {
        victim,
        attacker,
        gid,
        daemon,
        home,
        key,
    }
}

#[test]
fn users_cannot_see_each_others_jobs_and_operators_see_all() {
    let dir = scratch();
    let Shared {
        victim,
        attacker,
        gid,
        daemon,
        home,
        key,
    } = shared(dir.path());
    let source = sparse(&home.join("big.raw"), BIG);
    victim.own(&[&source]);
    let out = home.join("big.luks");
    let mut command = victim.imgctl(&daemon);
    encrypt_arguments(&mut command, &source, &out, &key);
    let id = detach(&mut command);
    wait_for(&daemon, id, "copied", copying);

    // The attacker: not listed, and every call on the id fails exactly as for an unknown id.
    let listed: Value =
        serde_json::from_slice(&run_ok(attacker.imgctl(&daemon).args(["jobs", "--json"])).stdout)
            .unwrap();
    assert_eq!(listed["jobs"], serde_json::json!([]), "{listed}");
    let unknown = 999_999u64;
    for verb in ["status", "wait", "cancel"] {
        let theirs = run(attacker.imgctl(&daemon).args([verb, &id.to_string()]));
        let none = run(attacker.imgctl(&daemon).args([verb, &unknown.to_string()]));
        assert!(!theirs.status.success(), "{verb}: {}", describe(&theirs));
        assert_eq!(theirs.status.code(), none.status.code());
        let theirs = String::from_utf8_lossy(&theirs.stderr).replace(&id.to_string(), "N");
        let none = String::from_utf8_lossy(&none.stderr).replace(&unknown.to_string(), "N");
        assert_eq!(
            theirs, none,
            "{verb} tells another user's job from an unknown one"
        );
        assert!(theirs.contains("no job N of yours"), "{theirs}");
    }
    assert_eq!(status_with(victim.imgctl(&daemon), id)["state"], "running");

    // The victim sees it; the same attacker in the operator group sees and may cancel it.
    let own: Value =
        serde_json::from_slice(&run_ok(victim.imgctl(&daemon).args(["jobs", "--json"])).stdout)
            .unwrap();
    assert_eq!(own["jobs"][0]["id"], id);
    assert_eq!(own["jobs"][0]["uid"], victim.uid);
    let operator = || as_operator(&attacker, gid, &daemon);
    let all: Value =
        serde_json::from_slice(&run_ok(operator().args(["jobs", "--json"])).stdout).unwrap();
    assert!(
        all["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id),
        "{all}"
    );
    daemon.assert_ok(
        &run(operator().args(["cancel", &id.to_string()])),
        "operator cancel",
    );
    assert_eq!(
        status_with(victim.imgctl(&daemon), id)["state"],
        "cancelled"
    );
    // The operator's imgctl removes nothing of the victim's; the victim's own cancel does not
    // either once the job has ended, but the partial is still the job's and theirs to remove.
    assert!(partial(&out).exists());
    assert!(!out.exists());
}

/// `command` as the attacker test user with the operator group as a supplementary group.
fn as_operator(user: &TestUser, gid: u32, daemon: &Daemon) -> Command {
    let mut command = Command::new("/usr/bin/setpriv");
    command
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg(format!("--groups={gid}"))
        .arg(binary("imgctl"))
        .arg("--socket")
        .arg(&daemon.socket);
    command
}

#[test]
fn only_the_owner_renames_and_gets_the_summary_of_a_wait() {
    let dir = scratch();
    let Shared {
        victim,
        attacker,
        gid,
        daemon,
        home,
        key,
    } = shared(dir.path());
    let source = make_source(&home, SourceKind::Raw, "16M");
    victim.own(&[&source]);
    let out = home.join("small.luks");
    let mut command = victim.imgctl(&daemon);
    encrypt_arguments(&mut command, &source, &out, &key);
    let id = detach(&mut command);
    wait_for(&daemon, id, "succeeded", |job| job["state"] == "succeeded");

    // An operator's wait: the outcome only, no summary (key fingerprint, header hashes).
    let waited =
        run(as_operator(&attacker, gid, &daemon).args(["wait", &id.to_string(), "--json"]));
    daemon.assert_ok(&waited, "operator wait");
    let stdout = String::from_utf8_lossy(&waited.stdout);
    assert!(stdout.contains("succeeded"), "{stdout}");
    for secret in ["summary", "key_fingerprint", "vhd_key_hash", "sha256"] {
        assert!(
            !stdout.contains(secret),
            "{secret} sent to an operator: {stdout}"
        );
    }
    // Root's wait renames nothing of the victim's (the names are the client's word).
    let waited = run(daemon.imgctl().args(["wait", &id.to_string()]));
    daemon.assert_ok(&waited, "root's wait");
    let stdout = String::from_utf8_lossy(&waited.stdout);
    assert!(
        stdout.contains(&format!("its owner's `imgctl wait {id}`")),
        "{stdout}"
    );
    assert!(
        partial(&out).exists() && !out.exists(),
        "root's wait renamed the output"
    );

    // The owner's wait gets the summary and renames.
    let waited = run(victim
        .imgctl(&daemon)
        .args(["wait", &id.to_string(), "--json"]));
    daemon.assert_ok(&waited, "owner's wait");
    assert_eq!(last_json_summary(&waited.stdout)["virtual_size"], 16 << 20);
    assert!(out.exists() && !partial(&out).exists());
}

#[test]
fn wait_does_not_replace_an_output_that_appeared_unless_forced() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "16M");
    let out = dir.join("out.luks");
    let id = detach(&mut daemon.encrypt(&source, &out, &key));
    wait_for(&daemon, id, "succeeded", |job| job["state"] == "succeeded");
    fs::write(&out, b"made after submit").unwrap();
    let waited = run(daemon.imgctl().args(["wait", &id.to_string()]));
    assert!(!waited.status.success(), "{}", describe(&waited));
    assert!(
        String::from_utf8_lossy(&waited.stderr).contains("--force"),
        "{}",
        describe(&waited)
    );
    assert_eq!(fs::read(&out).unwrap(), b"made after submit");
    assert!(partial(&out).exists());
    daemon.assert_ok(
        &run(daemon.imgctl().args(["wait", &id.to_string(), "--force"])),
        "forced wait",
    );
    assert!(!partial(&out).exists());
    assert_eq!(luks_dump(&out).version, 2);
}

#[test]
fn cancel_of_an_ended_detached_job_removes_its_partial() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = sparse(&dir.join("big.raw"), BIG);
    let out = dir.join("big.luks");
    let id = detach(&mut daemon.encrypt(&source, &out, &key));
    wait_for(&daemon, id, "copied", copying);
    // Cancelled by a plain Cancel call (no imgctl to clean up): it ends, its partial stays.
    let reply = varlink_call(
        &daemon.socket,
        "io.imgcrypt.Cancel",
        serde_json::json!({ "id": id }),
        &[],
    );
    assert!(reply.error.is_none(), "{reply:?}");
    wait_for(&daemon, id, "cancelled", |job| job["state"] == "cancelled");
    assert!(partial(&out).exists());
    let again = run_ok(daemon.imgctl().args(["cancel", &id.to_string()]));
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("removed"), "{text}");
    assert!(!partial(&out).exists());
}

#[test]
fn idle_exit_waits_for_a_detached_job() {
    let dir = scratch();
    let dir = dir.path();
    let mut daemon = Daemon::start(dir, &["--idle-timeout", "1"]);
    let key = dir.join("key");
    write_key(&key);
    let source = sparse(&dir.join("big.raw"), BIG);
    let id = detach(&mut daemon.encrypt(&source, &dir.join("big.luks"), &key));
    // No connection for three idle timeouts, but a job runs: the daemon stays.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        daemon.is_running(),
        "exited with a job running:\n{}",
        daemon.log_text()
    );
    assert_eq!(status(&daemon, id)["state"], "running");
    run_ok(daemon.imgctl().args(["cancel", &id.to_string()]));
    // Now idle: gone within the timeout and some slack.
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.is_running() {
        assert!(
            Instant::now() < deadline,
            "no idle exit:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.log_text().contains("exiting"));
}

#[test]
fn a_stopping_daemon_cancels_detached_jobs_as_a_stop() {
    let dir = scratch();
    let dir = dir.path();
    let mut daemon = Daemon::start(dir, &[]);
    let key = dir.join("key");
    write_key(&key);
    let source = sparse(&dir.join("big.raw"), BIG);
    let out = dir.join("big.luks");
    let id = detach(&mut daemon.encrypt(&source, &out, &key));
    wait_for(&daemon, id, "copied", copying);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.is_running() {
        assert!(
            Instant::now() < deadline,
            "did not stop:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = daemon.log_text();
    // The job was told it is a stop (not a user's cancel), and it ended before the daemon.
    assert!(
        log.contains(&format!("job cancel asked for job_id={id}")),
        "{log}"
    );
    assert!(log.contains("reason=DaemonStopping"), "{log}");
    assert!(
        !log.contains("did not finish within the shutdown grace"),
        "{log}"
    );
    // The daemon renamed and removed nothing: the partial is the owner's to deal with.
    assert!(partial(&out).exists() && !out.exists());
}
