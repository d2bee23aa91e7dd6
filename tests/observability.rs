//! Issue 12 part 7 against the real daemon: one audit record per job (who, the files' identity,
//! the key's fingerprint and never the key, engine, bytes, outcome), `imgctl daemon status` as
//! root and as another user, and the default job limit (one per CPU).

mod common;

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_job_gets_one_audit_record_with_who_what_and_the_key_fingerprint_only() {
    let user = test_user(TEST_USER);
    let dir = scratch();
    let daemon = shared_daemon(dir.path(), &[]);
    let (home, source, key) = user_files(dir.path(), user, "user", "3M");

    // A job that succeeds, run by the test user...
    let output = home.join("out.luks");
    let mut command = user.imgctl(&daemon);
    encrypt_arguments(&mut command, &source, &output, &key);
    let result = run(command.arg("--json").stdin(Stdio::null()));
    daemon.assert_ok(&result, "encrypt as the test user");
    let summary = last_json_summary(&result.stdout);
    // ...and one that fails: verify with a key that does not open the image.
    let other_key = home.join("other.key");
    write_key(&other_key);
    user.own(&[&other_key]);
    let mut verify = user.imgctl(&daemon);
    verify
        .args(["verify"])
        .arg(&output)
        .arg("--key-file")
        .arg(&other_key);
    assert!(!run(&mut verify).status.success(), "a wrong key verifies");

    let log = daemon.log_text();
    let records = audit_records(&log);
    assert_eq!(records.len(), 2, "one record per job:\n{log}");

    let encrypt = &records[0];
    let source_meta = fs::metadata(&source).unwrap();
    let output_meta = fs::metadata(&output).unwrap();
    let expect =
        |record: &std::collections::HashMap<String, String>, field: &str, value: String| {
            assert_eq!(
                record.get(field),
                Some(&value),
                "field {field} of {record:#?}"
            );
        };
    expect(encrypt, "message_id", AUDIT_MESSAGE_ID.to_string());
    expect(encrypt, "method", "encrypt".into());
    expect(encrypt, "user_uid", user.uid.to_string());
    expect(encrypt, "user_gid", user.gid.to_string());
    expect(encrypt, "source_dev", source_meta.dev().to_string());
    expect(encrypt, "source_ino", source_meta.ino().to_string());
    expect(encrypt, "source_size", (3u64 << 20).to_string());
    expect(encrypt, "source_mtime", source_meta.mtime().to_string());
    // The output is the client's OUT.partial, renamed since: the same inode.
    expect(encrypt, "output_dev", output_meta.dev().to_string());
    expect(encrypt, "output_ino", output_meta.ino().to_string());
    expect(
        encrypt,
        "key_fingerprint",
        summary["key_fingerprint"].as_str().unwrap().to_string(),
    );
    expect(encrypt, "engine", "userspace".into());
    expect(encrypt, "bytes", (3u64 << 20).to_string());
    expect(encrypt, "result", "succeeded".into());
    assert!(
        encrypt.contains_key("user_pid") && encrypt.contains_key("duration_ms"),
        "{encrypt:#?}"
    );
    assert!(encrypt.contains_key("job_id"), "{encrypt:#?}");

    let verify = &records[1];
    expect(verify, "method", "verify".into());
    expect(verify, "result", "failed".into());
    expect(verify, "error_kind", "WrongKey".into());
    expect(verify, "source_ino", output_meta.ino().to_string());
    assert!(
        !verify.contains_key("output_ino"),
        "verify writes nothing: {verify:#?}"
    );
    assert_ne!(encrypt["job_id"], verify["job_id"]);

    // The job's own lines carry the job's span: job id and uid.
    let job_id = &encrypt["job_id"];
    assert!(
        log.lines().any(|line| line
            .contains(&format!("job{{job_id={job_id} user_uid={}", user.uid))
            && line.contains(" encrypted ")),
        "no `encrypted` line in the job's span:\n{log}"
    );
    // Never the key.
    for key in [&key, &other_key] {
        let secret = fs::read_to_string(key).unwrap();
        assert!(
            !log.contains(secret.trim()),
            "a key file's content is in the log"
        );
        assert!(!log.contains(&secret[..16]), "key bytes are in the log");
    }
}

/// A slow job: a sparse 1 GiB source (nothing to read, everything to encrypt).
fn slow_job(user: TestUser, daemon: &Daemon, home: &Path, key: &Path, n: usize) -> Child {
    let source = home.join(format!("big{n}.raw"));
    File::create(&source).unwrap().set_len(1 << 30).unwrap();
    user.own(&[&source]);
    let mut command = user.imgctl(daemon);
    encrypt_arguments(
        &mut command,
        &source,
        &home.join(format!("big{n}.luks")),
        key,
    );
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn daemon_status_shows_engines_jobs_and_limits_and_other_users_only_to_root() {
    let (first, second) = two_users();
    let dir = scratch();
    let daemon = shared_daemon(
        dir.path(),
        &[
            "--max-jobs",
            "1",
            "--max-jobs-per-user",
            "1",
            "--max-queued-per-user",
            "5",
        ],
    );
    let (home, _, key) = user_files(dir.path(), first, "first", "1M");

    let idle = daemon_status(first.imgctl(&daemon));
    assert_eq!(idle["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(idle["mode"], "system");
    assert_eq!(idle["jobs"], serde_json::json!({"running": 0, "queued": 0}));
    assert_eq!(idle["limits"]["max_jobs"], 1);
    assert_eq!(idle["limits"]["max_jobs_per_user"], 1);
    assert_eq!(idle["limits"]["max_queued_per_user"], 5);
    assert_eq!(idle["limits"]["max_connections_per_user"], 16);
    assert!(idle["uptime_s"].is_u64(), "{idle}");
    assert!(
        idle.get("users").is_none(),
        "a user sees no per-user counts: {idle}"
    );
    let engines = idle["engines"].as_array().unwrap();
    let userspace = engines.iter().find(|e| e["engine"] == "userspace").unwrap();
    assert_eq!(userspace["available"], true);
    let kernel = engines.iter().find(|e| e["engine"] == "kernel").unwrap();
    assert!(
        kernel["available"] == true || kernel["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "an unavailable kernel engine says why: {kernel}"
    );

    // One running job and one queued, both the first user's.
    let mut jobs = vec![slow_job(first, &daemon, &home, &key, 0)];
    wait_until("the first job to start", Duration::from_secs(20), || {
        daemon_status(daemon.imgctl())["jobs"]["running"] == 1
    });
    jobs.push(slow_job(first, &daemon, &home, &key, 1));
    wait_until("the second job to queue", Duration::from_secs(20), || {
        daemon_status(daemon.imgctl())["jobs"]["queued"] == 1
    });

    let own = daemon_status(first.imgctl(&daemon));
    assert_eq!(
        own["own_jobs"],
        serde_json::json!({"running": 1, "queued": 1})
    );
    let other = daemon_status(second.imgctl(&daemon));
    assert_eq!(
        other["jobs"],
        serde_json::json!({"running": 1, "queued": 1})
    );
    assert_eq!(
        other["own_jobs"],
        serde_json::json!({"running": 0, "queued": 0})
    );
    assert!(other.get("users").is_none(), "{other}");
    let root = daemon_status(daemon.imgctl());
    assert_eq!(
        root["users"],
        serde_json::json!([{"uid": first.uid, "running": 1, "queued": 1}])
    );
    assert!(root["connections"].as_u64().unwrap() >= 3, "{root}");

    // The text form says the same.
    let text = run_ok(first.imgctl(&daemon).args(["daemon", "status"]));
    let text = String::from_utf8(text.stdout).unwrap();
    for expected in [
        "(system daemon), up ",
        "userspace  available",
        "jobs: 1 running, 1 queued (yours: 1 running, 1 queued)",
        "limits: 1 jobs at once, 1 per user, 5 queued per user",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }

    // The queued job's client first, so its job cannot take the slot the other frees.
    for mut job in jobs.into_iter().rev() {
        let _ = job.kill();
        let _ = job.wait();
        wait_until("the queued job to leave", Duration::from_secs(20), || {
            daemon.log_text().contains("job left the queue")
        });
    }
    // The running job was cancelled when its client died: its audit record says so. The
    // queued one never ran and has none.
    wait_until(
        "the cancelled job's audit record",
        Duration::from_secs(20),
        || !audit_records(&daemon.log_text()).is_empty(),
    );
    let records = audit_records(&daemon.log_text());
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["result"], "cancelled");
    assert_eq!(records[0]["user_uid"], first.uid.to_string());
    assert!(!records[0].contains_key("error_kind"), "{records:#?}");
}

#[test]
fn the_default_job_limit_is_one_per_cpu() {
    let dir = scratch();
    let daemon = Daemon::start(dir.path(), &[]);
    let status = daemon_status(daemon.imgctl());
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(status["limits"]["max_jobs"], cpus as u64, "{status}");
    assert_eq!(status["limits"]["max_jobs_per_user"], 2.min(cpus) as u64);
    assert_eq!(status["limits"]["max_queued_per_user"], 8);
    assert_eq!(status["limits"]["max_queued"], 64, "{status}");
    assert!(daemon.log_text().contains(&format!("max_jobs={cpus}")));
    assert!(daemon.log_text().contains("max_queued=64"));
}
