//! Issue 8's attacks on what the root daemon writes and answers, replayed against a real
//! imgcryptd (root, with a key ring) by an unprivileged attacker created by the test:
//!
//! - finding 1: the Verify oracle. The attacker copies a victim's image that the daemon's ring
//!   key protects and asks Verify to compare it with guessed sources (`first_difference`) or to
//!   hash it. Every answer that depends on plaintext is root-only with the ring's keys.
//! - finding 5: a group-writable set-user-ID program passed as Decrypt's output.
//! - finding 8: a key file passed again as the output (it would be overwritten).
//!
//! Each test fails if the attack works again.

mod common;

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use imgcrypt_proto::api::{self, DecryptParameters, KeyRef, VerifyParameters};
use imgcrypt_proto::varlink::Reply;

/// The victim's image, encrypted by the daemon with its ring key (no key passed) and left
/// world-readable, as images on a shared build host often are; returns it and its plaintext.
fn victim_image(daemon: &Daemon, victim: TestUser, dir: &Path) -> (PathBuf, PathBuf) {
    let work = shared_dir(dir, "victim");
    let plaintext = work.join("secret.raw");
    write_secret(&plaintext, 1 << 20);
    let image = work.join("secret.luks");
    write_file(&image, b"");
    victim.own(&[&work, &plaintext, &image]);
    let socket = daemon.socket.clone();
    let (source, output) = (plaintext.clone(), image.clone());
    let reply = victim.in_thread(move || {
        let parameters = raw_client::cheap_encrypt_parameters(None);
        varlink_in_out(&socket, api::ENCRYPT, parameters, &source, &output)
    });
    assert_eq!(reply.error, None, "{reply:?}\n{}", daemon.log_text());
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();
    (image, plaintext)
}

/// `Verify` of `image` against `guess` (if any) with no key: the daemon's ring.
fn verify_with_ring(socket: &Path, image: &Path, guess: Option<&Path>) -> Reply {
    let image = fs::File::open(image).unwrap();
    let guess = guess.map(|path| fs::File::open(path).unwrap());
    let mut fds = vec![image.as_fd()];
    fds.extend(guess.as_ref().map(AsFd::as_fd));
    let parameters = serde_json::to_value(VerifyParameters {
        image: 0,
        source: guess.as_ref().map(|_| 1),
        source_companions: Vec::new(),
        keys: Vec::new(),
    })
    .unwrap();
    varlink_call(socket, api::VERIFY, parameters, &fds)
}

#[test]
fn verify_with_the_daemons_ring_is_no_plaintext_oracle_for_other_users() {
    let (victim, attacker) = two_users();
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = daemon_with_ring(dir);
    let (image, plaintext) = victim_image(&daemon, victim, dir);

    // The attacker copies what it can read: the header and the first MiB of the payload.
    let work = dir.join("attacker");
    fs::create_dir(&work).unwrap();
    attacker.own(&[&work]);
    let copy = work.join("copy.luks");
    let header_and_payload = fs::read(&image).unwrap();
    write_file(&copy, &header_and_payload);
    // Guesses: one right in its first 17 bytes, one wrong from the first byte.
    let right = work.join("right.raw");
    write_file(&right, b"PASSWORD=hunter2 and then anything");
    let wrong = work.join("wrong.raw");
    write_file(&wrong, b"XASSWORD=");
    attacker.own(&[&copy, &right, &wrong]);

    let socket = daemon.socket.clone();
    let (copy_in, right_in, wrong_in) = (copy.clone(), right.clone(), wrong.clone());
    let replies = attacker.in_thread(move || {
        [
            verify_with_ring(&socket, &copy_in, Some(&right_in)),
            verify_with_ring(&socket, &copy_in, Some(&wrong_in)),
            verify_with_ring(&socket, &copy_in, None),
        ]
    });
    let expected_hash = {
        use std::process::Command;
        let output = run_ok(Command::new("sha256sum").arg(&plaintext));
        String::from_utf8_lossy(&output.stdout)[..64].to_string()
    };
    for reply in &replies {
        assert_eq!(
            reply.error.as_deref(),
            Some(api::errors::PERMISSION_DENIED),
            "{reply:?}"
        );
        let text = serde_json::to_string(reply).unwrap();
        assert!(
            !text.contains("first_difference") && !text.contains(&expected_hash),
            "the refusal tells nothing about the plaintext: {text}"
        );
        assert!(text.contains("only root may get plaintext"), "{text}");
    }
    // The two guesses, one right and one wrong, got the same answer.
    assert_eq!(replies[0], replies[1]);

    // Root, whom the ring serves, still verifies (the hash is the plaintext's, zero-padded).
    let reply = verify_with_ring(&daemon.socket, &image, Some(&plaintext));
    assert_eq!(reply.error, None, "{reply:?}\n{}", daemon.log_text());
}

/// Checks the daemon kept only what it uses: CAP_SYS_ADMIN (21), CAP_IPC_LOCK (14) and
/// CAP_MKNOD (27), in the effective, permitted and bounding sets.
#[test]
fn the_root_daemon_runs_with_only_the_capabilities_it_uses() {
    let scratch_dir = scratch();
    let daemon = Daemon::start(scratch_dir.path(), &[]);
    let status = fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).unwrap();
    let expected = (1u64 << 21) | (1 << 14) | (1 << 27);
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let value = status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .unwrap_or_else(|| panic!("{field} missing"));
        let bits = u64::from_str_radix(value.trim(), 16).unwrap();
        assert_eq!(bits, expected, "{field} {value}");
    }
    for field in ["CapInh:", "CapAmb:"] {
        let value = status.lines().find_map(|line| line.strip_prefix(field));
        assert_eq!(
            u64::from_str_radix(value.unwrap().trim(), 16).unwrap(),
            0,
            "{field}"
        );
    }
    assert!(
        daemon.log_text().contains("capabilities reduced"),
        "{}",
        daemon.log_text()
    );
}

/// The attacker's own image and key, made through the daemon with the attacker's key.
fn attacker_image(daemon: &Daemon, attacker: TestUser, work: &Path) -> (PathBuf, PathBuf) {
    let source = make_source(work, SourceKind::Raw, "1M");
    let key = work.join("attacker.key");
    write_key(&key);
    let image = work.join("attacker.luks");
    attacker.own(&[&source, &key]);
    let output = run(attacker
        .imgctl(daemon)
        .arg("encrypt")
        .arg(&source)
        .arg("-o")
        .arg(&image)
        .arg("--key-file")
        .arg(&key)
        .args(CHEAP_PBKDF));
    assert!(output.status.success(), "{}", describe(&output));
    (image, key)
}

#[test]
fn a_group_writable_set_uid_program_cannot_be_decrypted_into() {
    let (_, attacker) = two_users();
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &["--socket-mode", "0666"]);
    let work = dir.join("attacker");
    fs::create_dir(&work).unwrap();
    attacker.own(&[&work]);
    let (image, key) = attacker_image(&daemon, attacker, &work);

    // root:<attacker's group> 4775: the attacker may write it but must never make root's
    // program out of its own bytes.
    let program = dir.join("program");
    write_file(&program, b"#!/bin/sh\necho original\n");
    std::os::unix::fs::chown(&program, Some(0), Some(attacker.gid)).unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o4775)).unwrap();

    let socket = daemon.socket.clone();
    let (image_in, key_in, program_in) = (image.clone(), key.clone(), program.clone());
    let reply = attacker.in_thread(move || {
        let image = fs::File::open(image_in).unwrap();
        let key = fs::File::open(key_in).unwrap();
        let output = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(program_in)
            .expect("the attacker may open the group-writable program read-write");
        let parameters = serde_json::to_value(DecryptParameters {
            image: 0,
            output: 1,
            keys: vec![KeyRef {
                fd: 2,
                name: "--key-file".to_string(),
            }],
            detach: None,
            names: None,
        })
        .unwrap();
        varlink_call(
            &socket,
            api::DECRYPT,
            parameters,
            &[image.as_fd(), output.as_fd(), key.as_fd()],
        )
    });
    assert_eq!(
        reply.error.as_deref(),
        Some(api::errors::BAD_DESCRIPTOR),
        "{reply:?}"
    );
    let message = serde_json::to_string(&reply).unwrap();
    assert!(message.contains("set-user-ID bit (mode 4775)"), "{message}");
    assert_eq!(fs::read(&program).unwrap(), b"#!/bin/sh\necho original\n");
    let metadata = fs::metadata(&program).unwrap();
    assert_eq!(metadata.mode() & 0o7777, 0o4775);
    assert_eq!(metadata.uid(), 0);
}

#[test]
fn a_key_passed_again_as_the_output_is_not_overwritten() {
    let (_, attacker) = two_users();
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &["--socket-mode", "0666"]);
    let work = dir.join("attacker");
    fs::create_dir(&work).unwrap();
    attacker.own(&[&work]);
    let source = make_source(&work, SourceKind::Raw, "1M");
    let key = work.join("k");
    write_key(&key);
    attacker.own(&[&source, &key]);
    let key_bytes = fs::read(&key).unwrap();

    let socket = daemon.socket.clone();
    let (source_in, key_in) = (source.clone(), key.clone());
    let reply = attacker.in_thread(move || {
        let source = fs::File::open(source_in).unwrap();
        let key = fs::File::open(&key_in).unwrap();
        let output = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&key_in)
            .unwrap();
        let parameters = raw_client::cheap_encrypt_parameters(Some(2));
        varlink_call(
            &socket,
            api::ENCRYPT,
            parameters,
            &[source.as_fd(), output.as_fd(), key.as_fd()],
        )
    });
    assert_eq!(
        reply.error.as_deref(),
        Some(api::errors::BAD_DESCRIPTOR),
        "{reply:?}"
    );
    let message = serde_json::to_string(&reply).unwrap();
    assert!(
        message.contains("is the same file as the key (descriptor 2)"),
        "{message}"
    );
    assert_eq!(fs::read(&key).unwrap(), key_bytes, "the key is intact");
}
