//! Issue 8's attacks on the server layer, each made by the `attacker` test user against a real
//! root daemon that the `victim` test user shares: descriptor floods behind unfinished frames
//! (findings 3), connection hoarding and slow frames, one user queueing many jobs (finding 6),
//! and the protocol items of finding 8. Raw socket attacks are made from threads running with
//! the attacker's credentials, so the daemon's SO_PEERCRED sees the attacker.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::raw_client::{cheap_encrypt_parameters, RawClient};
use common::*;
use imgcrypt_proto::api;
use imgcrypt_proto::fdpass::{send_with_fds, MAX_FDS_PER_MESSAGE};
use imgcrypt_proto::varlink::{self, Call, Reply};
use imgcrypt_proto::wire::MAX_FRAME_LEN;
use serde_json::json;

/// The start of a call whose terminating NUL never comes.
const UNFINISHED: &[u8] = br#"{"method":"io.imgcrypt.Encrypt","parameters":{"#;

/// A connection made by `user` (SO_PEERCRED is taken at connect time).
fn connect_as(user: TestUser, socket: &Path) -> RawClient {
    let socket = socket.to_path_buf();
    RawClient::from_stream(user.in_thread(move || UnixStream::connect(socket).unwrap()))
}

/// `user`'s GetInfo on a fresh connection, with how long the answer took.
fn get_info_as(user: TestUser, socket: &Path) -> (Reply, Duration) {
    let started = Instant::now();
    let mut client = connect_as(user, socket);
    client.call(varlink::GET_INFO, json!({}), &[], false);
    (client.final_reply(), started.elapsed())
}

fn assert_get_info_answered(reply: &Reply) {
    assert_eq!(reply.error, None, "{reply:?}");
    assert!(
        reply.parameters.as_ref().unwrap()["interfaces"].is_array(),
        "{reply:?}"
    );
}

/// `count` descriptors of /dev/null to send.
fn null_descriptors(count: usize) -> Vec<File> {
    (0..count)
        .map(|_| File::open("/dev/null").unwrap())
        .collect()
}

fn borrow(files: &[File]) -> Vec<BorrowedFd<'_>> {
    files.iter().map(|f| f.as_fd()).collect()
}

/// Polls `condition` every 20 ms for up to `timeout`; panics with `what` and the log if it
/// never holds.
fn wait_for(daemon: &Daemon, timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; daemon log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's descriptor count once it has stopped changing (connections just closed by a
/// client are closed by the daemon a moment later).
fn settled_descriptors(daemon: &Daemon) -> usize {
    let mut last = daemon.open_descriptors();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = daemon.open_descriptors();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Log lines containing `message` logged for `uid`.
fn log_lines(daemon: &Daemon, message: &str, uid: u32) -> usize {
    daemon
        .log_text()
        .lines()
        .filter(|line| line.contains(message) && logged_for(line, uid))
        .count()
}

fn logged_for(line: &str, uid: u32) -> bool {
    let field = format!("user_uid={uid}");
    line.split_whitespace().any(|word| word == field)
}

/// `imgctl encrypt` as `user`, cheap keyslot, no progress bar.
fn encrypt_as(
    user: TestUser,
    daemon: &Daemon,
    source: &Path,
    output: &Path,
    key: &Path,
) -> Command {
    let mut command = user.imgctl(daemon);
    encrypt_arguments(&mut command, source, output, key);
    command.stdin(Stdio::null());
    command
}

/// A sparse raw file of `size` bytes owned by `user`: slow to encrypt, nothing on disk.
fn sparse_source(path: &Path, user: TestUser, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
    user.own(&[path]);
}

fn read_write(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

#[test]
fn descriptor_flood_behind_unfinished_frames_leaves_nothing_behind() {
    let (victim, attacker) = two_users();
    let dir = scratch();
    let dir = dir.path();
    // The issue's setting: a 1024-descriptor soft limit (the usual default), a higher hard one.
    let daemon = Daemon::start_under(
        dir,
        &["prlimit", "--nofile=1024:20000", "--"],
        &["--socket-mode", "0666"],
        &[],
    );
    let (home, source, key) = user_files(dir, victim, "victim", "8M");
    // Warm up: whatever a first job opens for good is part of the baseline.
    run_ok(&mut encrypt_as(
        victim,
        &daemon,
        &source,
        &home.join("warm.luks"),
        &key,
    ));
    let baseline = settled_descriptors(&daemon);
    let payload = null_descriptors(MAX_FDS_PER_MESSAGE);

    for round in 0..32 {
        // 12 connections × 104 descriptors: more than a 1024 table holds.
        let held: Vec<RawClient> = (0..12)
            .map(|_| {
                let client = connect_as(attacker, &daemon.socket);
                send_with_fds(client.stream.as_fd(), UNFINISHED, &borrow(&payload)).unwrap();
                client
            })
            .collect();
        wait_for(
            &daemon,
            Duration::from_secs(10),
            "the flood to arrive",
            || daemon.open_descriptors() >= baseline + 12 * MAX_FDS_PER_MESSAGE,
        );
        let (reply, took) = get_info_as(victim, &daemon.socket);
        assert_get_info_answered(&reply);
        assert!(
            took < Duration::from_secs(5),
            "GetInfo took {took:?} in round {round}"
        );
        if round == 0 {
            let output = home.join("out.luks");
            run_ok(&mut encrypt_as(victim, &daemon, &source, &output, &key));
        }
        drop(held);
        daemon.wait_for_descriptors(baseline);
    }
    assert_eq!(settled_descriptors(&daemon), baseline);
    assert!(daemon.log_text().contains("raised the descriptor limit"));
}

#[test]
fn descriptors_cut_off_at_a_full_table_are_closed_and_accept_recovers() {
    let (victim, attacker) = two_users();
    let dir = scratch();
    let dir = dir.path();
    const LIMIT: usize = 200;
    // A table this small cannot hold the caps: the daemon warns, and a flood really fills it.
    let daemon = Daemon::start_under(
        dir,
        &["prlimit", &format!("--nofile={LIMIT}:{LIMIT}"), "--"],
        &[
            "--socket-mode",
            "0666",
            "--max-connections",
            "8",
            "--max-connections-per-user",
            "4",
        ],
        &[],
    );
    assert_get_info_answered(&get_info_as(victim, &daemon.socket).0);
    let baseline = settled_descriptors(&daemon);
    assert!(
        baseline + 2 * (MAX_FDS_PER_MESSAGE + 1) > LIMIT
            && baseline + MAX_FDS_PER_MESSAGE + 8 < LIMIT,
        "baseline {baseline} does not suit the limit {LIMIT}"
    );
    let payload = null_descriptors(MAX_FDS_PER_MESSAGE);

    // MSG_CTRUNC: the second connection's 104 do not fit next to the first's.
    for _ in 0..5 {
        let first = connect_as(attacker, &daemon.socket);
        send_with_fds(first.stream.as_fd(), UNFINISHED, &borrow(&payload)).unwrap();
        wait_for(&daemon, Duration::from_secs(10), "the first 104", || {
            daemon.open_descriptors() >= baseline + MAX_FDS_PER_MESSAGE
        });
        let mut second = connect_as(attacker, &daemon.socket);
        send_with_fds(second.stream.as_fd(), UNFINISHED, &borrow(&payload)).unwrap();
        let reply = second.reply().expect("a protocol error before the close");
        assert_eq!(reply.error.as_deref(), Some(api::errors::PROTOCOL_ERROR));
        let message = reply.parameters.unwrap()["message"].to_string();
        assert!(message.contains("MSG_CTRUNC"), "{message}");
        assert!(second.reply().is_none(), "the connection is closed");
        drop(first);
        daemon.wait_for_descriptors(baseline);
        assert_get_info_answered(&get_info_as(victim, &daemon.socket).0);
        daemon.wait_for_descriptors(baseline);
    }

    // Fill the table exactly: accept fails with EMFILE until the attacker lets go.
    let mut held = Vec::new();
    loop {
        let before = settled_descriptors(&daemon);
        if before >= LIMIT {
            break;
        }
        let client = connect_as(attacker, &daemon.socket);
        wait_for(&daemon, Duration::from_secs(10), "the accept", || {
            daemon.open_descriptors() > before
        });
        let room = (LIMIT - (before + 1)).min(MAX_FDS_PER_MESSAGE);
        if room > 0 {
            send_with_fds(client.stream.as_fd(), UNFINISHED, &borrow(&payload[..room])).unwrap();
            wait_for(&daemon, Duration::from_secs(10), "the descriptors", || {
                daemon.open_descriptors() > before + room
            });
        }
        held.push(client);
    }
    let mut waiting = connect_as(victim, &daemon.socket);
    waiting.call(varlink::GET_INFO, json!({}), &[], false);
    wait_for(&daemon, Duration::from_secs(10), "a failed accept", || {
        daemon.log_text().contains("accept failed")
    });
    drop(held);
    assert_get_info_answered(&waiting.final_reply());
    drop(waiting);
    daemon.wait_for_descriptors(baseline);
}

#[test]
fn hoarding_connections_hits_the_caps_and_the_victim_still_gets_in() {
    let (victim, attacker) = two_users();
    let dir = scratch();
    let daemon = shared_daemon(
        dir.path(),
        &["--max-connections", "6", "--max-connections-per-user", "3"],
    );
    // The slowloris of the review: 20 connections kept open.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        let mut client = connect_as(attacker, &daemon.socket);
        match client.unsolicited_reply(Duration::from_millis(1500)) {
            None => {
                client.call(varlink::GET_INFO, json!({}), &[], false);
                assert_get_info_answered(&client.final_reply());
                held.push(client);
            }
            Some(reply) if reply.error.as_deref() == Some(api::errors::TOO_MANY_CONNECTIONS) => {
                let parameters = reply.parameters.unwrap();
                assert_eq!(parameters["limit"], 3);
                let message = parameters["message"].as_str().unwrap();
                assert!(message.contains("--max-connections-per-user"), "{message}");
                refused += 1;
            }
            Some(reply) => panic!("unexpected {reply:?}"),
        }
    }
    assert_eq!(held.len(), 3, "the attacker holds at most the per-user cap");
    assert_eq!(refused, 17);

    // The victim gets in while the attacker holds all it may.
    let victims: Vec<RawClient> = (0..3)
        .map(|_| {
            let mut client = connect_as(victim, &daemon.socket);
            client.call(varlink::GET_INFO, json!({}), &[], false);
            assert_get_info_answered(&client.final_reply());
            client
        })
        .collect();
    // Six in all: even root (exempt from the per-user cap) meets the overall one.
    let mut root = RawClient::connect(&daemon.socket);
    let reply = root.final_reply();
    assert_eq!(
        reply.error.as_deref(),
        Some(api::errors::TOO_MANY_CONNECTIONS)
    );
    let parameters = reply.parameters.unwrap();
    assert_eq!(parameters["limit"], 6);
    assert!(parameters["message"]
        .as_str()
        .unwrap()
        .contains("--max-connections)"));
    drop(held);
    drop(victims);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut client = connect_as(victim, &daemon.socket);
        client.call(varlink::GET_INFO, json!({}), &[], false);
        if client.final_reply().error.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "closed connections never uncounted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn half_sent_frames_and_idle_connections_are_closed() {
    let (victim, attacker) = two_users();
    let dir = scratch();
    let daemon = shared_daemon(
        dir.path(),
        &["--frame-timeout", "1", "--idle-connection-timeout", "3"],
    );
    assert_get_info_answered(&get_info_as(victim, &daemon.socket).0);
    let baseline = settled_descriptors(&daemon);
    let payload = null_descriptors(MAX_FDS_PER_MESSAGE);

    let started = Instant::now();
    let mut half_sent = connect_as(attacker, &daemon.socket);
    send_with_fds(half_sent.stream.as_fd(), UNFINISHED, &borrow(&payload)).unwrap();
    let mut idle = connect_as(attacker, &daemon.socket);
    let mut busy = connect_as(victim, &daemon.socket);

    let reply = half_sent.reply().expect("an error before the close");
    let took = started.elapsed();
    assert_eq!(reply.error.as_deref(), Some(api::errors::PROTOCOL_ERROR));
    let message = reply.parameters.unwrap()["message"].to_string();
    assert!(
        message.contains("terminating NUL did not arrive within 1 s"),
        "{message}"
    );
    assert!(half_sent.reply().is_none(), "closed after the error");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // A connection that keeps making calls is not idle, however long it stays.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1500));
        busy.call(varlink::GET_INFO, json!({}), &[], false);
        assert_get_info_answered(&busy.final_reply());
    }
    // The idle one was closed without a reply (6 s > 3 s).
    assert!(idle.reply().is_none(), "the idle connection is closed");
    assert_eq!(
        log_lines(&daemon, "closing connection idle for 3 s", attacker.uid),
        1
    );
    assert_eq!(
        log_lines(&daemon, "without its terminating NUL for 1 s", attacker.uid),
        1
    );
    drop(busy);
    daemon.wait_for_descriptors(baseline);
}

/// Starts `imgctl encrypt` as the attacker on a fresh sparse source (slow: nothing to read,
/// everything to encrypt).
fn spawn_attacker_job(
    attacker: TestUser,
    daemon: &Daemon,
    home: &Path,
    key: &Path,
    n: usize,
) -> Child {
    let source = home.join(format!("big{n}.raw"));
    sparse_source(&source, attacker, 1 << 30);
    encrypt_as(
        attacker,
        daemon,
        &source,
        &home.join(format!("out{n}.luks")),
        key,
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap()
}

/// A shared daemon that runs one job at a time, with the queue limits in `queue_limits`.
fn one_slot_daemon(dir: &Path, queue_limits: &[&str]) -> Daemon {
    let mut arguments = vec!["--max-jobs", "1", "--max-jobs-per-user", "1"];
    arguments.extend_from_slice(queue_limits);
    shared_daemon(dir, &arguments)
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn one_user_queueing_many_jobs_cannot_push_another_users_job_behind_them() {
    let (victim, attacker) = two_users();
    let dir = scratch();
    let dir = dir.path();
    let daemon = one_slot_daemon(dir, &["--max-queued-per-user", "3"]);
    let (victim_home, victim_source, victim_key) = user_files(dir, victim, "victim", "8M");
    let (home, _, key) = user_files(dir, attacker, "attacker", "1M");

    let first = spawn_attacker_job(attacker, &daemon, &home, &key, 0);
    wait_for(
        &daemon,
        Duration::from_secs(20),
        "the first job to start",
        || log_lines(&daemon, "job started", attacker.uid) == 1,
    );
    let mut queued: Vec<Child> = (1..=3)
        .map(|n| {
            let child = spawn_attacker_job(attacker, &daemon, &home, &key, n);
            wait_for(&daemon, Duration::from_secs(20), "a queued job", || {
                log_lines(&daemon, "job queued", attacker.uid) == n
            });
            child
        })
        .collect();

    // Over the queued limit: refused at once, with the new error.
    let source = home.join("big-refused.raw");
    sparse_source(&source, attacker, 1 << 30);
    let refused = run(&mut encrypt_as(
        attacker,
        &daemon,
        &source,
        &home.join("refused.luks"),
        &key,
    ));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("jobs waiting") && stderr.contains("--max-queued-per-user"),
        "{stderr}"
    );
    assert_eq!(log_lines(&daemon, "job refused", attacker.uid), 1);

    // A job cancelled while queued leaves the queue: the attacker may queue another.
    kill(queued.pop().unwrap());
    wait_for(
        &daemon,
        Duration::from_secs(10),
        "the queued job to leave",
        || log_lines(&daemon, "job left the queue", attacker.uid) == 1,
    );
    queued.push(spawn_attacker_job(attacker, &daemon, &home, &key, 4));
    wait_for(
        &daemon,
        Duration::from_secs(20),
        "the replacement to queue",
        || log_lines(&daemon, "job queued", attacker.uid) == 4,
    );

    // The victim queues behind three of the attacker's jobs...
    let victim_job = encrypt_as(
        victim,
        &daemon,
        &victim_source,
        &victim_home.join("out.luks"),
        &victim_key,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for(
        &daemon,
        Duration::from_secs(20),
        "the victim's job to queue",
        || log_lines(&daemon, "job queued", victim.uid) == 1,
    );
    // ...and when the slot frees, it goes next: round-robin over users, not FIFO.
    kill(first);
    let output = victim_job.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", describe(&output));

    let log = daemon.log_text();
    let after_victim_queued: Vec<&str> = log
        .lines()
        .skip_while(|line| !(line.contains("job queued") && logged_for(line, victim.uid)))
        .filter(|line| line.contains("job started"))
        .collect();
    assert!(
        after_victim_queued
            .first()
            .is_some_and(|line| logged_for(line, victim.uid)),
        "the victim's job must start before the attacker's queued ones:\n{log}"
    );
    for child in queued {
        kill(child);
    }
}

/// `imgctl daemon status --json` as root.
fn daemon_status(daemon: &Daemon) -> serde_json::Value {
    let output = run_ok(daemon.imgctl().args(["daemon", "status", "--json"]));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn detached_jobs_of_many_users_cannot_grow_the_queue_past_its_total_cap() {
    let (victim, attacker) = two_users();
    let dir = scratch();
    let dir = dir.path();
    let daemon = one_slot_daemon(dir, &["--max-queued-per-user", "2", "--max-queued", "2"]);
    let (victim_home, victim_source, victim_key) = user_files(dir, victim, "victim", "1M");
    let (home, _, key) = user_files(dir, attacker, "attacker", "1M");
    assert_eq!(daemon_status(&daemon)["limits"]["max_queued"], 2);

    // Detached jobs: each holds its descriptors in the daemon with no connection left. One
    // runs, two fill the queue (each user is under its own cap).
    for n in 0..3 {
        // 16 GiB: the running one cannot finish (and let a queued one start) during the test.
        let source = home.join(format!("big{n}.raw"));
        sparse_source(&source, attacker, 16 << 30);
        let mut command = encrypt_as(
            attacker,
            &daemon,
            &source,
            &home.join(format!("out{n}.luks")),
            &key,
        );
        let output = run(command.arg("--detach"));
        assert!(output.status.success(), "job {n}: {}", describe(&output));
    }
    let jobs = &daemon_status(&daemon)["jobs"];
    assert_eq!(
        (jobs["running"].as_u64(), jobs["queued"].as_u64()),
        (Some(1), Some(2)),
        "{}",
        String::from_utf8_lossy(&run(daemon.imgctl().args(["jobs", "--json"])).stdout)
    );

    // Another user, with nothing queued of its own, is refused by the total cap, and told so.
    let refused = run(&mut encrypt_as(
        victim,
        &daemon,
        &victim_source,
        &victim_home.join("out.luks"),
        &victim_key,
    ));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("queue is full") && stderr.contains("--max-queued)"),
        "{stderr}"
    );
    assert!(!victim_home.join("out.luks.partial").exists());

    // Root's jobs count towards the cap but have a reserve above it (--max-queued-per-user):
    // users filling the queue cannot refuse the operator's first jobs. Beyond it, root too.
    let root_source = dir.join("root.raw");
    fs::File::create(&root_source)
        .unwrap()
        .set_len(16 << 30)
        .unwrap();
    let root_key = dir.join("root.key");
    write_key(&root_key);
    for n in 0..3 {
        let output = run(daemon
            .encrypt(&root_source, &dir.join(format!("root{n}.luks")), &root_key)
            .arg("--detach")
            .stdin(Stdio::null()));
        if n < 2 {
            assert!(
                output.status.success(),
                "root job {n}: {}",
                describe(&output)
            );
        } else {
            assert!(!output.status.success(), "root past its reserve");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains("4 jobs of all users"), "{stderr}");
        }
    }
    assert_eq!(daemon_status(&daemon)["jobs"]["queued"], 4);
}

/// A raw client of `user` with a running encrypt of a sparse `size`-byte source (streaming),
/// returned once its copy is under way, with its output path.
fn running_encrypt(
    user: TestUser,
    daemon: &Daemon,
    home: &Path,
    key: &Path,
    size: u64,
) -> RawClient {
    let source = home.join("slow.raw");
    sparse_source(&source, user, size);
    let output = home.join("slow.luks");
    let (source, output, key) = (
        File::open(&source).unwrap(),
        read_write(&output),
        File::open(key).unwrap(),
    );
    let mut client = connect_as(user, &daemon.socket);
    client.encrypt(&source, &output, &key);
    client.wait_for_copy();
    client
}

#[test]
fn calls_pipelined_behind_a_running_job_are_answered_in_order() {
    let (_, attacker) = two_users();
    let dir = scratch();
    let dir = dir.path();
    let daemon = shared_daemon(dir, &[]);
    let (home, source, key) = user_files(dir, attacker, "attacker", "1M");
    let mut client = running_encrypt(attacker, &daemon, &home, &key, 192 << 20);

    client.call(varlink::GET_INFO, json!({}), &[], false);
    client.call(
        varlink::GET_INTERFACE_DESCRIPTION,
        json!({"interface": "io.imgcrypt"}),
        &[],
        false,
    );
    let second_output = home.join("second.luks");
    let (source, output, key_file) = (
        File::open(&source).unwrap(),
        read_write(&second_output),
        File::open(&key).unwrap(),
    );
    client.encrypt(&source, &output, &key_file);

    let job = client.final_reply();
    assert_eq!(job.error, None, "the running job finishes: {job:?}");
    assert!(job.parameters.unwrap()["summary"].is_object());
    assert_get_info_answered(&client.final_reply());
    let description = client.final_reply();
    assert_eq!(description.error, None, "{description:?}");
    assert!(description.parameters.unwrap()["description"]
        .as_str()
        .unwrap()
        .contains("interface io.imgcrypt"));
    let second = client.final_reply();
    assert_eq!(second.error.as_deref(), Some(api::errors::PROTOCOL_ERROR));
    let message = second.parameters.unwrap()["message"].to_string();
    assert!(message.contains("one job at a time"), "{message}");
    assert_eq!(
        fs::metadata(&second_output).unwrap().len(),
        0,
        "second output untouched"
    );
    // The connection goes on serving.
    client.call(varlink::GET_INFO, json!({}), &[], false);
    assert_get_info_answered(&client.final_reply());
}

#[test]
fn oneway_encrypt_runs_no_job_and_gets_no_reply() {
    let (_, attacker) = two_users();
    let dir = scratch();
    let dir = dir.path();
    let daemon = shared_daemon(dir, &[]);
    let (home, source, key) = user_files(dir, attacker, "attacker", "4M");
    let output_path = home.join("out.luks");
    let (source, output, key) = (
        File::open(&source).unwrap(),
        read_write(&output_path),
        File::open(&key).unwrap(),
    );
    let mut client = connect_as(attacker, &daemon.socket);
    client.send_call(
        &Call {
            method: api::ENCRYPT.to_string(),
            parameters: Some(cheap_encrypt_parameters(Some(2))),
            more: false,
            oneway: true,
            upgrade: false,
        },
        &[source.as_fd(), output.as_fd(), key.as_fd()],
    );
    client.call(varlink::GET_INFO, json!({}), &[], false);
    // The first reply on the connection is GetInfo's: the oneway call got none.
    assert_get_info_answered(&client.final_reply());
    assert_eq!(
        log_lines(&daemon, "oneway job call not run", attacker.uid),
        1
    );
    assert!(
        !daemon.log_text().contains("encrypt requested"),
        "no job ran"
    );
    assert_eq!(
        fs::metadata(&output_path).unwrap().len(),
        0,
        "output untouched"
    );
}

#[test]
fn invalid_parameter_names_the_field_never_the_value() {
    let (_, attacker) = two_users();
    let dir = scratch();
    let daemon = shared_daemon(dir.path(), &[]);
    let mut client = connect_as(attacker, &daemon.socket);

    let secret = "hunter2-pasted-into-the-wrong-field";
    let mut parameters = cheap_encrypt_parameters(Some(2));
    parameters["pbkdf"]["kind"] = json!(secret);
    client.call(api::ENCRYPT, parameters, &[], false);
    let reply = client.final_reply();
    assert_eq!(
        reply.error.as_deref(),
        Some(varlink::errors::INVALID_PARAMETER)
    );
    let text = serde_json::to_string(&reply).unwrap();
    assert_eq!(
        reply.parameters.unwrap()["parameter"],
        "pbkdf.kind",
        "{text}"
    );
    assert!(
        !text.contains("hunter2"),
        "the value must not be echoed: {text}"
    );

    let mut parameters = cheap_encrypt_parameters(Some(2));
    parameters["source"] = json!(secret);
    client.call(api::ENCRYPT, parameters, &[], false);
    let reply = client.final_reply();
    let text = serde_json::to_string(&reply).unwrap();
    assert_eq!(reply.parameters.unwrap()["parameter"], "source", "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        text.contains("expected u32"),
        "says what was expected: {text}"
    );
}

#[test]
fn oversized_frame_with_its_nul_is_not_called_unterminated() {
    let (_, attacker) = two_users();
    let dir = scratch();
    let daemon = shared_daemon(dir.path(), &[]);

    // Exactly the limit first (still acceptable), then the excess with its NUL, so the daemon
    // sees the NUL in the read that crosses the limit.
    let mut client = connect_as(attacker, &daemon.socket);
    client.send_raw(&vec![b'x'; MAX_FRAME_LEN]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::io::Write::write_all(&mut client.stream, b"xxxx\0");
    let message = client.final_reply().parameters.unwrap()["message"].to_string();
    assert!(message.contains("limit"), "{message}");
    assert!(
        !message.contains("without a terminating NUL"),
        "a NUL was sent: {message}"
    );

    let mut client = connect_as(attacker, &daemon.socket);
    let _ = std::io::Write::write_all(&mut client.stream, &vec![b'x'; MAX_FRAME_LEN + 100]);
    let message = client.final_reply().parameters.unwrap()["message"].to_string();
    assert!(message.contains("without a terminating NUL"), "{message}");
}
