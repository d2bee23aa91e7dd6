//! Issue 12 part 2's load test: 50 `imgctl encrypt` clients of 3 users at once against one root
//! daemon with small limits (2 jobs at once, 1 per user, 20 queued per user). Every job
//! completes and none is lost (one succeeded audit record per job, every output opens with its
//! user's key, one per user decrypts, by an independent implementation, to that user's
//! source), no user ever runs more than its share, the daemon's peak memory stays bounded, and
//! short calls (GetInfo, GetDaemonStatus) are answered quickly on fresh connections all along.

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::raw_client::RawClient;
use common::*;
use imgcrypt_proto::api;
use imgcrypt_proto::varlink;
use serde_json::{json, Value};

/// Clients in all.
const CLIENTS: usize = 50;
/// Bytes of each user's source.
const SOURCE_BYTES: usize = 3 << 20;
/// Longest a short call may take to be answered while the load runs.
const ANSWER_BOUND: Duration = Duration::from_secs(2);
/// The daemon's peak resident memory may not exceed this (VmHWM; about 40 MiB here, debug
/// build): two jobs' buffers plus 50 connections. A leak per job or per connection would show
/// well above it.
const MEMORY_CEILING_KIB: u64 = 128 * 1024;
/// The whole load must be done within this.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// One answer to a call made while the load ran.
struct Answer {
    method: &'static str,
    took: Duration,
    reply: varlink::Reply,
}

/// Calls made again and again, each on a fresh connection as a new client would, until
/// stopped; see [`calls_answered_meanwhile`].
struct Meanwhile {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Answer>>,
}

impl Meanwhile {
    /// Stops calling and returns every answer.
    fn finish(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the calling thread panicked")
    }
}

/// Starts calling each of `calls` (method, parameters) in turn, as root, on fresh connections
/// to `socket`, every 100 ms. Add a method here to have it checked under load too.
fn calls_answered_meanwhile(socket: &Path, calls: Vec<(&'static str, Value)>) -> Meanwhile {
    let stop = Arc::new(AtomicBool::new(false));
    let socket = socket.to_path_buf();
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut answers = Vec::new();
        while !stopped.load(Ordering::Relaxed) {
            for (method, parameters) in &calls {
                let started = Instant::now();
                let mut client = RawClient::connect(&socket);
                client.call(method, parameters.clone(), &[], false);
                let reply = client.final_reply();
                answers.push(Answer {
                    method,
                    took: started.elapsed(),
                    reply,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        answers
    });
    Meanwhile { stop, thread }
}

/// A user's directory with a source of its own content (so a mix-up between users shows) and
/// a key.
struct UserFiles {
    user: TestUser,
    home: PathBuf,
    source: PathBuf,
    key: PathBuf,
}

fn user_files(dir: &Path, user: TestUser, index: u8) -> UserFiles {
    let home = shared_dir(dir, &format!("user{index}"));
    let source = home.join("src.raw");
    let bytes: Vec<u8> = (0..SOURCE_BYTES)
        .map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ index.wrapping_mul(97) ^ 1)
        .collect();
    write_file(&source, &bytes);
    let key = home.join("key");
    write_key(&key);
    user.own(&[&home, &source, &key]);
    UserFiles {
        user,
        home,
        source,
        key,
    }
}

/// The daemon's `VmHWM` (peak resident) and `VmRSS` in KiB.
fn daemon_memory(daemon: &Daemon) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn fifty_clients_of_three_users_all_complete_with_bounded_memory_and_prompt_answers() {
    let users = [
        test_user(TEST_USER),
        test_user(VICTIM_USER),
        test_user(ATTACKER_USER),
    ];
    let dir = scratch();
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--socket-mode",
            "0666",
            "--max-jobs",
            "2",
            "--max-jobs-per-user",
            "1",
            "--max-queued-per-user",
            "20",
            // Each client holds one connection while its job waits: 17 of one user.
            "--max-connections-per-user",
            "20",
        ],
    );
    let files: Vec<UserFiles> = users
        .iter()
        .enumerate()
        .map(|(index, &user)| user_files(dir.path(), user, index as u8))
        .collect();
    let (_, rss_before) = daemon_memory(&daemon);

    let meanwhile = calls_answered_meanwhile(
        &daemon.socket,
        vec![
            (varlink::GET_INFO, json!({})),
            (api::GET_DAEMON_STATUS, json!({})),
            (api::JOBS, json!({})),
        ],
    );
    let started = Instant::now();
    let clients: Vec<(usize, Child)> = (0..CLIENTS)
        .map(|n| {
            let owner = &files[n % files.len()];
            let mut command = owner.user.imgctl(&daemon);
            encrypt_arguments(
                &mut command,
                &owner.source,
                &owner.home.join(format!("out{n}.luks")),
                &owner.key,
            );
            let child = command
                .arg("--json")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (n, child)
        })
        .collect();
    let mut failures = Vec::new();
    let mut fingerprints = HashSet::new();
    for (n, child) in clients {
        let output = child.wait_with_output().unwrap();
        if output.status.success() {
            fingerprints.insert(last_json_summary(&output.stdout)["key_fingerprint"].clone());
        } else {
            failures.push(format!("client {n}: {}", describe(&output)));
        }
    }
    let took = started.elapsed();
    let answers = meanwhile.finish();
    let (peak, rss_after) = daemon_memory(&daemon);
    let log = daemon.log_text();
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients failed:\n{}\ndaemon log tail:\n{}",
        failures.len(),
        failures.join("\n"),
        log.lines().rev().take(60).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(fingerprints.len(), files.len(), "one key per user");
    assert!(took < LOAD_TIMEOUT, "the load took {took:?}");

    // None lost: one succeeded audit record per job, of distinct jobs, each user's count right.
    let records: Vec<_> = audit_records(&log)
        .into_iter()
        .filter(|record| record["method"] == "encrypt")
        .collect();
    assert_eq!(records.len(), CLIENTS, "audit records of encrypt jobs");
    assert!(records.iter().all(|record| record["result"] == "succeeded"));
    let jobs: HashSet<_> = records
        .iter()
        .map(|record| record["job_id"].clone())
        .collect();
    assert_eq!(jobs.len(), CLIENTS, "distinct job ids");
    for (index, owner) in files.iter().enumerate() {
        let expected = (0..CLIENTS).filter(|n| n % files.len() == index).count();
        let own = records
            .iter()
            .filter(|record| record["user_uid"] == owner.user.uid.to_string())
            .count();
        assert_eq!(own, expected, "audit records of uid {}", owner.user.uid);
    }

    // Every output opens with its owner's key; one of each user decrypts to that user's source.
    for n in 0..CLIENTS {
        let owner = &files[n % files.len()];
        let output = owner.home.join(format!("out{n}.luks"));
        assert!(
            test_passphrase(&output, &owner.key),
            "{} does not open with its key",
            output.display()
        );
        assert!(!owner.home.join(format!("out{n}.luks.partial")).exists());
    }
    for (n, owner) in files.iter().enumerate() {
        let output = owner.home.join(format!("out{n}.luks"));
        let plaintext = independent_decrypt(&output, &owner.key, dir.path());
        assert_plaintext_matches(&plaintext, &owner.source);
    }

    // Short calls were answered promptly all along, and saw the limits kept.
    let mut slowest = Duration::ZERO;
    let mut most_queued = 0;
    let mut most_listed = 0;
    for answer in &answers {
        assert_eq!(
            answer.reply.error, None,
            "{} failed: {:?}",
            answer.method, answer.reply
        );
        assert!(
            answer.took < ANSWER_BOUND,
            "{} took {:?} under load",
            answer.method,
            answer.took
        );
        slowest = slowest.max(answer.took);
        if answer.method == api::GET_DAEMON_STATUS {
            let status = answer.reply.parameters.as_ref().unwrap();
            assert!(status["jobs"]["running"].as_u64().unwrap() <= 2, "{status}");
            for user in status["users"].as_array().unwrap() {
                assert!(user["running"].as_u64().unwrap() <= 1, "{status}");
            }
            most_queued = most_queued.max(status["jobs"]["queued"].as_u64().unwrap());
        }
        if answer.method == api::JOBS {
            let jobs = answer.reply.parameters.as_ref().unwrap()["jobs"]
                .as_array()
                .unwrap()
                .len();
            most_listed = most_listed.max(jobs);
        }
    }
    let rounds = answers.len() / 3;
    assert!(rounds >= 3, "only {rounds} rounds of calls during the load");
    assert!(
        most_queued > 0,
        "the status never showed a queued job: no load?"
    );
    // Root sees every user's jobs; once all ended, each is listed as succeeded.
    assert!(most_listed > 0, "Jobs never listed a job during the load");
    let mut root = RawClient::connect(&daemon.socket);
    root.call(api::JOBS, json!({}), &[], false);
    let listed = root.final_reply();
    let states: Vec<&str> = listed.parameters.as_ref().unwrap()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states.iter().filter(|state| **state == "succeeded").count(),
        CLIENTS,
        "after the load, Jobs lists {states:?}"
    );

    println!(
        "load: {CLIENTS} clients of {} users in {took:.1?}; daemon memory: VmRSS {rss_before} KiB \
         before, {rss_after} KiB after, VmHWM {peak} KiB (ceiling {MEMORY_CEILING_KIB} KiB); \
         {rounds} rounds of GetInfo + GetDaemonStatus + Jobs, slowest answer {slowest:?}, most queued \
         {most_queued}",
        files.len()
    );
    assert!(
        peak < MEMORY_CEILING_KIB,
        "the daemon's peak memory {peak} KiB is over {MEMORY_CEILING_KIB} KiB"
    );
}
