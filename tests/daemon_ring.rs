//! The daemon's own key ring, through the real imgcryptd: an Encrypt call that passes no key
//! uses the ring's `encryption_key` (checked by cryptsetup), picks up a rotated key without a
//! restart, a daemon without a ring answers NoKey, and an unsafe ring stops start-up.
//!
//! The calls are raw Varlink (imgctl always sends a key today), so the daemon's side is tested on
//! its own.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::raw_client::cheap_encrypt_parameters;
use common::*;
use imgcrypt_proto::api::{self, EncryptReply};
use imgcrypt_proto::varlink::Reply;

/// Encrypt `source` into the existing file `output` with no key passed: descriptors 0 and 1.
fn encrypt_without_key(daemon: &Daemon, source: &Path, output: &Path) -> Reply {
    let parameters = cheap_encrypt_parameters(None);
    varlink_in_out(&daemon.socket, api::ENCRYPT, parameters, source, output)
}

fn summary_fingerprint(reply: &Reply) -> String {
    assert_eq!(reply.error, None, "{reply:?}");
    let reply: EncryptReply = serde_json::from_value(reply.parameters.clone().unwrap()).unwrap();
    reply
        .summary
        .expect("final reply has a summary")
        .key_fingerprint
}

fn write_ring(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn no_key_passed_uses_the_rings_encryption_key_and_follows_rotation() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "2M");
    fs::create_dir(dir.join("keys")).unwrap();
    let current = dir.join("keys").join("current.key");
    let next = dir.join("keys").join("next.key");
    write_key(&current);
    write_key(&next);
    let ring = dir.join("keys.toml");
    // Relative paths: resolved beside the ring, not in the daemon's working directory.
    write_ring(
        &ring,
        "encryption_key = \"keys/current.key\"\ndecryption_key1 = \"keys/next.key\"\n",
    );

    let daemon = Daemon::start(dir, &["--keyring", ring.to_str().unwrap()]);
    let log = daemon.log_text();
    let current_fingerprint = coreutils_fingerprint(&current);
    assert!(
        log.contains(&format!("key ring: {}", ring.display()))
            && log.contains(&format!("encryption key sha256:{current_fingerprint}"))
            && log.contains("1 decryption key"),
        "{log}"
    );
    assert!(
        !log.contains(&fs::read_to_string(&current).unwrap()),
        "key bytes logged"
    );

    let output = dir.join("out.luks");
    fs::File::create(&output).unwrap();
    let reply = encrypt_without_key(&daemon, &source, &output);
    assert_eq!(summary_fingerprint(&reply), current_fingerprint);
    assert!(test_passphrase(&output, &current), "ring key must open it");
    assert!(!test_passphrase(&output, &next), "another key must not");

    // The operator rotates: the next job uses the new key, no restart.
    write_ring(&ring, "encryption_key = \"keys/next.key\"\n");
    let rotated = dir.join("rotated.luks");
    fs::File::create(&rotated).unwrap();
    let reply = encrypt_without_key(&daemon, &source, &rotated);
    assert_eq!(summary_fingerprint(&reply), coreutils_fingerprint(&next));
    assert!(test_passphrase(&rotated, &next));
    assert!(!test_passphrase(&rotated, &current));
    let log = daemon.log_text();
    assert!(log.contains("daemon:encryption_key"), "{log}");
}

#[test]
fn without_a_ring_no_key_is_refused_and_the_output_untouched() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::Raw, "2M");
    // --user: a per-user daemon never falls back to /etc/imgcrypt/keys.toml, so the machine's
    // configuration cannot make this test pass or fail.
    let daemon = Daemon::start(dir, &["--user"]);
    assert!(
        daemon.log_text().contains("no key ring"),
        "{}",
        daemon.log_text()
    );

    let output = dir.join("victim.img");
    let original = b"precious bytes that must survive".repeat(1000);
    fs::write(&output, &original).unwrap();
    let reply = encrypt_without_key(&daemon, &source, &output);
    assert_eq!(
        reply.error.as_deref(),
        Some(api::errors::NO_KEY),
        "{reply:?}"
    );
    let message = reply.parameters.unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("--key-file") && message.contains("/etc/imgcrypt/keys.toml"),
        "{message}"
    );
    assert_eq!(
        fs::read(&output).unwrap(),
        original,
        "output must be untouched"
    );
}

#[test]
fn a_group_writable_ring_stops_start_up_naming_the_file() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let key = dir.join("current.key");
    write_key(&key);
    let ring = dir.join("keys.toml");
    write_ring(&ring, "encryption_key = \"current.key\"\n");
    fs::set_permissions(&ring, fs::Permissions::from_mode(0o664)).unwrap();
    let socket = dir.join("sock").join("io.imgcrypt");

    let mut child = Command::new(binary("imgcryptd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--keyring")
        .arg(&ring)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("imgcryptd kept running with a group-writable key ring");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&ring.display().to_string())
            && stderr.contains("writable by group or others")
            && stderr.contains(&format!("chmod 600 {}", ring.display())),
        "{stderr}"
    );
    assert!(!socket.exists(), "it must not have listened");
}
