//! Hostile LUKS headers and keys against the real root daemon, as the two test users: the
//! attacker edits keyslots to stall the daemon, hangs up mid-trial, re-keys a copy of the
//! victim's ring-keyed image to a cheap PBKDF; the victim's weak key gets no fingerprint; inspect
//! and header-only rotation handle what cryptsetup makes (argon2i, unbound keyslots, ciphers
//! imgcrypt does not decrypt); LUKS2 segment `size` and `iv_tweak` are honoured or refused.
//!
//! Evidence that no key derivation ran is libcryptsetup's own debug log in the daemon's log
//! ("Trying to open key slot" for LUKS1, "Trying to open LUKS2 keyslot" for LUKS2), not timings.

mod common;

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use imgcrypt_proto::api::{self, errors, KeyRef, Pbkdf, PbkdfKind};
use imgcrypt_proto::varlink::Reply;
use serde_json::{json, Value};

/// A scratch directory every test user can traverse, and a root daemon they can all reach.
fn setup(extra: &[&str]) -> (tempfile::TempDir, Daemon) {
    let scratch_dir = scratch();
    fs::set_permissions(scratch_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut args = vec!["--socket-mode", "0666"];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(scratch_dir.path(), &args);
    fs::set_permissions(
        daemon.socket.parent().unwrap(),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    (scratch_dir, daemon)
}

/// A generated key file owned by `user`.
fn key_for(user: &TestUser, path: &Path) -> PathBuf {
    write_key(path);
    user.own(&[path]);
    path.to_path_buf()
}

/// A 20 MiB image at `path` made by `cryptsetup luksFormat --key-file KEY` with `args`, owned
/// by `user`.
fn luks_format(user: &TestUser, path: &Path, key: &Path, args: &[&str]) {
    fs::File::create(path).unwrap().set_len(20 << 20).unwrap();
    run_ok(
        Command::new("cryptsetup")
            .args(["luksFormat", "--batch-mode"])
            .args(args)
            .arg("--key-file")
            .arg(key)
            .arg(path),
    );
    user.own(&[path]);
}

/// [`luks_format`] of a `kind` (luks1/luks2) image with cheap pbkdf2 plus `extra`.
fn cryptsetup_image(user: &TestUser, path: &Path, kind: &str, key: &Path, extra: &[&str]) {
    let mut args = vec![
        "--type",
        kind,
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ];
    args.extend_from_slice(extra);
    luks_format(user, path, key, &args);
}

/// Edits the header with tests/support/luks_edit.py (LUKS2 JSON with checksums fixed, or LUKS1
/// phdr fields): what any user can do to their own file.
fn edit_header(path: &Path, assignments: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/luks_edit.py");
    run_ok(
        Command::new("python3")
            .arg(script)
            .arg(path)
            .args(assignments),
    );
}

/// How a file is opened for a call.
#[derive(Clone, Copy)]
enum Open {
    Read,
    ReadWrite,
}

/// Makes a raw call as `user` (from a thread with the user's credentials, so SO_PEERCRED sees
/// them), opening `files` with the user's rights; descriptor i is `files[i]`.
fn call_as(
    user: &TestUser,
    daemon: &Daemon,
    method: &'static str,
    parameters: Value,
    files: &[(&Path, Open)],
) -> Reply {
    call_on(user, &daemon.socket, method, parameters, files)
}

/// [`call_as`] on the daemon listening at `socket`.
fn call_on(
    user: &TestUser,
    socket: &Path,
    method: &'static str,
    parameters: Value,
    files: &[(&Path, Open)],
) -> Reply {
    let socket = socket.to_path_buf();
    let files: Vec<(PathBuf, Open)> = files.iter().map(|(p, o)| (p.to_path_buf(), *o)).collect();
    user.in_thread(move || {
        let opened: Vec<fs::File> = files
            .iter()
            .map(|(path, open)| {
                fs::OpenOptions::new()
                    .read(true)
                    .write(matches!(open, Open::ReadWrite))
                    .open(path)
                    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
            })
            .collect();
        let fds: Vec<_> = opened.iter().map(|file| file.as_fd()).collect();
        varlink_call(&socket, method, parameters, &fds)
    })
}

fn key_ref(fd: u32, name: &str) -> Value {
    serde_json::to_value(KeyRef {
        fd,
        name: name.to_string(),
    })
    .unwrap()
}

fn cheap_pbkdf() -> Value {
    serde_json::to_value(Pbkdf {
        kind: Some(PbkdfKind::Pbkdf2),
        iterations: Some(1000),
        ..Pbkdf::default()
    })
    .unwrap()
}

/// The error message of a failed reply, asserting its error name.
fn refused(reply: &Reply, error: &str) -> String {
    assert_eq!(reply.error.as_deref(), Some(error), "{reply:?}");
    reply.parameters.as_ref().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Keyslot derivations libcryptsetup started, by its debug log.
fn derivations(daemon: &Daemon) -> usize {
    let log = daemon.log_text();
    log.matches("Trying to open key slot").count()
        + log.matches("Trying to open LUKS2 keyslot").count()
}

/// A method, its parameters and the files to open for it.
type Call<'a> = (&'static str, Value, Vec<(&'a Path, Open)>);

/// The calls an attacker makes on `image` opened by `key` (descriptors: image, key[, output or
/// new key]); each must be refused naming keyslot 0 without a derivation.
fn attack_every_job(attacker: &TestUser, daemon: &Daemon, dir: &Path, image: &Path, key: &Path) {
    let new_key = key_for(attacker, &dir.join("attacker-new.key"));
    let output = dir.join("attacker.raw");
    fs::File::create(&output).unwrap();
    attacker.own(&[&output]);
    let before = derivations(daemon);
    let calls: [Call<'_>; 4] = [
        (
            api::VERIFY,
            json!({"image": 0, "keys": [key_ref(1, "--key-file")]}),
            vec![(image, Open::Read), (key, Open::Read)],
        ),
        (
            api::DECRYPT,
            json!({"image": 0, "output": 2, "keys": [key_ref(1, "--key-file")]}),
            vec![
                (image, Open::Read),
                (key, Open::Read),
                (&output, Open::ReadWrite),
            ],
        ),
        (
            api::REWRITE,
            json!({"image": 0, "keys": [key_ref(1, "old")], "encryption_key": key_ref(2, "encryption_key"), "pbkdf": cheap_pbkdf()}),
            vec![
                (image, Open::ReadWrite),
                (key, Open::Read),
                (&new_key, Open::Read),
            ],
        ),
        (
            api::REWRITE,
            json!({"image": 0, "keys": [key_ref(1, "old")], "encryption_key": key_ref(2, "encryption_key"), "reencrypt_output": 3, "pbkdf": cheap_pbkdf()}),
            vec![
                (image, Open::Read),
                (key, Open::Read),
                (&new_key, Open::Read),
                (&output, Open::ReadWrite),
            ],
        ),
    ];
    for (method, parameters, files) in calls {
        let started = Instant::now();
        let reply = call_as(attacker, daemon, method, parameters, &files);
        let message = refused(&reply, errors::UNSUPPORTED_IMAGE);
        assert!(message.contains("keyslot 0"), "{method}: {message}");
        assert!(message.contains("non-root callers"), "{method}: {message}");
        assert!(message.contains("luksConvertKey"), "{method}: {message}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{method} took {:?}",
            started.elapsed()
        );
    }
    // Inspect derives nothing and shows the keyslot as it is.
    let reply = call_as(
        attacker,
        daemon,
        api::INSPECT,
        json!({"image": 0, "keys": [key_ref(1, "--key-file")]}),
        &[(image, Open::Read), (key, Open::Read)],
    );
    assert_eq!(reply.error, None, "{reply:?}");
    assert_eq!(
        derivations(daemon),
        before,
        "a key derivation ran on the hostile keyslot:\n{}",
        daemon.log_text()
    );
}

#[test]
fn keyslots_edited_to_stall_the_daemon_are_refused_without_a_derivation() {
    let (scratch_dir, daemon) = setup(&[]);
    let dir = scratch_dir.path();
    let (_, attacker) = two_users();
    let key = key_for(&attacker, &dir.join("attacker.key"));
    let edits: [(&str, &[&str]); 4] = [
        ("luks2", &["keyslots.0.kdf.iterations=4294967295"]),
        (
            "luks2",
            &[
                r#"keyslots.0.kdf={"type":"argon2id","time":4294967295,"memory":4194304,"cpus":4,"salt":"GUhnD2Rimni10iWp3G5bv/57RpwHUgn28oObyAXGquc="}"#,
            ],
        ),
        ("luks2", &["digests.0.iterations=4294967295"]),
        ("luks1", &["luks1.keyslot.0.iterations=4294967295"]),
    ];
    for (kind, edit) in edits {
        let image = dir.join("hostile.luks");
        cryptsetup_image(&attacker, &image, kind, &key, &[]);
        edit_header(&image, edit);
        attack_every_job(&attacker, &daemon, dir, &image, &key);
    }
}

#[test]
fn a_hostile_keyslot_does_not_delay_another_users_encrypt() {
    let (scratch_dir, daemon) = setup(&[]);
    let dir = scratch_dir.path();
    let (victim, attacker) = two_users();
    let key = key_for(&attacker, &dir.join("attacker.key"));
    let image = dir.join("hostile.luks");
    cryptsetup_image(&attacker, &image, "luks2", &key, &[]);
    edit_header(&image, &["keyslots.0.kdf.iterations=4294967295"]);

    // The attacker keeps asking for verifies of the hostile image while the victim encrypts.
    let attacking = {
        let socket = daemon.socket.clone();
        let (image, key) = (image.clone(), key.clone());
        std::thread::spawn(move || {
            let mut refusals = 0;
            for _ in 0..10 {
                let reply = call_on(
                    &attacker,
                    &socket,
                    api::VERIFY,
                    json!({"image": 0, "keys": [key_ref(1, "--key-file")]}),
                    &[(&image, Open::Read), (&key, Open::Read)],
                );
                refused(&reply, errors::UNSUPPORTED_IMAGE);
                refusals += 1;
            }
            refusals
        })
    };
    let source = make_source(dir, SourceKind::Raw, "4M");
    let victim_key = key_for(&victim, &dir.join("victim.key"));
    victim.own(&[&source]);
    let out_dir = dir.join("victim-out");
    fs::create_dir(&out_dir).unwrap();
    victim.own(&[&out_dir]);
    let output = out_dir.join("victim.luks");
    let started = Instant::now();
    let mut encrypt = victim.imgctl(&daemon);
    encrypt
        .arg("encrypt")
        .arg(&source)
        .arg("-o")
        .arg(&output)
        .arg("--key-file")
        .arg(&victim_key)
        .args(CHEAP_PBKDF)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = encrypt.spawn().unwrap();
    // An hours-long derivation holding libcryptsetup's lock would keep the victim waiting.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the victim's encrypt did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{:?}", child.wait_with_output());
    let elapsed = started.elapsed();
    assert_eq!(attacking.join().unwrap(), 10);
    assert!(test_passphrase(&output, &victim_key));
    eprintln!("victim's encrypt took {elapsed:?} during the attack");
    // Encrypt opens no keyslot, so any keyslot opening logged was the attacker's.
    assert_eq!(derivations(&daemon), 0, "{}", daemon.log_text());
}

#[test]
fn a_trial_stops_when_its_client_hangs_up() {
    let (scratch_dir, daemon) = setup(&[]);
    let dir = scratch_dir.path();
    let (_, attacker) = two_users();
    let key = key_for(&attacker, &dir.join("attacker.key"));
    // One keyslot whose derivation takes about 1.8 s here (within the caps), no token, and 8
    // wrong keys: 8 derivations, about 15 s, if the trial ignored the hang-up.
    let image = dir.join("slow.luks");
    let slow = [
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "2000000",
    ];
    luks_format(&attacker, &image, &key, &slow);
    let wrong: Vec<PathBuf> = (0..8)
        .map(|i| key_for(&attacker, &dir.join(format!("wrong{i}.key"))))
        .collect();

    let socket = daemon.socket.clone();
    let (image_path, wrong_paths) = (image.clone(), wrong.clone());
    attacker.in_thread(move || {
        use imgcrypt_proto::varlink::Call;
        let mut files = vec![fs::File::open(&image_path).unwrap()];
        files.extend(wrong_paths.iter().map(|path| fs::File::open(path).unwrap()));
        let fds: Vec<_> = files.iter().map(|file| file.as_fd()).collect();
        let keys: Vec<Value> = (1..=8).map(|fd| key_ref(fd, &format!("k{fd}"))).collect();
        let call = Call {
            method: api::VERIFY.to_string(),
            parameters: Some(json!({"image": 0, "keys": keys})),
            more: true,
            oneway: false,
            upgrade: false,
        };
        let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        imgcrypt_proto::fdpass::send_with_fds(
            stream.as_fd(),
            &imgcrypt_proto::wire::encode(&call),
            &fds,
        )
        .unwrap();
        // Hang up while the first derivation runs.
        std::thread::sleep(Duration::from_millis(700));
        drop(stream);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon
        .log_text()
        .contains("job ended after its client left")
    {
        assert!(Instant::now() < deadline, "{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = daemon.log_text();
    assert!(log.contains("client went away"), "{log}");
    let ran = derivations(&daemon);
    assert!(
        (1..=2).contains(&ran),
        "{ran} derivations ran after the hang-up (8 without cancellation):\n{log}"
    );
}

#[test]
fn non_root_callers_cannot_create_keyslots_over_their_caps() {
    let (scratch_dir, daemon) = setup(&[]);
    let dir = scratch_dir.path();
    let (_, attacker) = two_users();
    let key = key_for(&attacker, &dir.join("attacker.key"));
    let source = make_source(dir, SourceKind::Raw, "1M");
    attacker.own(&[&source]);
    for (pbkdf, parameter) in [
        (json!({"iter_time_ms": 5000}), "pbkdf.iter_time_ms"),
        (
            json!({"kind": "argon2id", "memory_kib": 2097152}),
            "pbkdf.memory_kib",
        ),
        (
            json!({"kind": "pbkdf2", "iterations": 50000000}),
            "pbkdf.iterations",
        ),
    ] {
        let output = dir.join("out.luks");
        fs::File::create(&output).unwrap();
        attacker.own(&[&output]);
        let reply = call_as(
            &attacker,
            &daemon,
            api::ENCRYPT,
            json!({"source": 0, "output": 1, "key": 2, "luks_version": "luks2", "sector_size": 512, "pbkdf": pbkdf, "engine": "auto"}),
            &[
                (&source, Open::Read),
                (&output, Open::ReadWrite),
                (&key, Open::Read),
            ],
        );
        let message = refused(&reply, errors::INVALID_OPTION);
        assert_eq!(
            reply.parameters.as_ref().unwrap()["parameter"],
            parameter,
            "{message}"
        );
        assert!(message.contains("non-root callers"), "{message}");
        assert_eq!(fs::metadata(&output).unwrap().len(), 0, "output touched");
    }
}

/// The JSON tokens of a LUKS2 image, by cryptsetup.
fn tokens(image: &Path) -> Vec<Value> {
    let output = run_ok(
        Command::new("cryptsetup")
            .args(["luksDump", "--dump-json-metadata"])
            .arg(image),
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    metadata["tokens"]
        .as_object()
        .unwrap()
        .values()
        .cloned()
        .collect()
}

#[test]
fn a_weak_key_gets_no_fingerprint_token_and_still_opens_by_trial() {
    let (scratch_dir, daemon) = setup(&[]);
    let dir = scratch_dir.path();
    let (victim, _) = two_users();
    let source = make_source(dir, SourceKind::Raw, "1M");
    victim.own(&[&source]);
    let out_dir = dir.join("victim");
    fs::create_dir(&out_dir).unwrap();
    victim.own(&[&out_dir]);

    // base64("Summer2024!Summer2024!Summer2024"): passes every key-file rule.
    let weak = out_dir.join("weak.key");
    fs::write(&weak, "U3VtbWVyMjAyNCFTdW1tZXIyMDI0IVN1bW1lcjIwMjQ=").unwrap();
    fs::set_permissions(&weak, fs::Permissions::from_mode(0o600)).unwrap();
    victim.own(&[&weak]);
    let generated = key_for(&victim, &out_dir.join("generated.key"));

    for (key, weak_key) in [(&weak, true), (&generated, false)] {
        let image = out_dir.join(format!(
            "{}.luks",
            key.file_stem().unwrap().to_str().unwrap()
        ));
        let output = run(victim
            .imgctl(&daemon)
            .arg("encrypt")
            .arg(&source)
            .arg("-o")
            .arg(&image)
            .arg("--key-file")
            .arg(key)
            .args(CHEAP_PBKDF));
        assert!(output.status.success(), "{}", describe(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tokens = tokens(&image);
        if weak_key {
            assert!(
                tokens.is_empty(),
                "a weak key's fingerprint was stored: {tokens:?}"
            );
            assert!(stderr.contains("does not look generated"), "{stderr}");
            assert!(stderr.contains("printable text"), "{stderr}");
            assert!(!stderr.contains("U3VtbWVy"), "the notice quotes the key");
        } else {
            assert_eq!(tokens.len(), 1, "{tokens:?}");
            assert_eq!(tokens[0]["type"], "imgcrypt-key");
            assert!(!stderr.contains("does not look generated"), "{stderr}");
        }
        assert!(test_passphrase(&image, key));

        let output = run_ok(
            victim
                .imgctl(&daemon)
                .args(["verify", "--json", "--key-file"])
                .arg(key)
                .arg(&image),
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let method = if weak_key { "\"trial\"" } else { "\"token\"" };
        assert!(stdout.contains(method), "{stdout}");
    }
}

#[test]
fn a_non_root_rewrite_of_a_ring_keyed_copy_cannot_choose_its_pbkdf() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let keys = dir.join("keys");
    fs::create_dir(&keys).unwrap();
    let ring_key = keys.join("ring.key");
    write_key(&ring_key);
    let ring = dir.join("keys.toml");
    fs::write(&ring, "encryption_key = \"keys/ring.key\"\n").unwrap();
    fs::set_permissions(&ring, fs::Permissions::from_mode(0o600)).unwrap();
    let daemon = Daemon::start(
        dir,
        &["--socket-mode", "0666", "--keyring", ring.to_str().unwrap()],
    );
    fs::set_permissions(
        daemon.socket.parent().unwrap(),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let (victim, attacker) = two_users();

    // The victim's image, encrypted with the ring's key, readable by others.
    let victim_image = dir.join("victim.luks");
    let argon2id = [
        "--type",
        "luks2",
        "--pbkdf",
        "argon2id",
        "--pbkdf-force-iterations",
        "4",
    ];
    let args = [&argon2id[..], &["--pbkdf-memory", "65536"]].concat();
    luks_format(&victim, &victim_image, &ring_key, &args);
    fs::set_permissions(&victim_image, fs::Permissions::from_mode(0o644)).unwrap();

    // The attacker's copy, re-keyed through Rewrite to a cheap PBKDF with the ring's keys.
    let copy = dir.join("copy.luks");
    fs::copy(&victim_image, &copy).unwrap();
    attacker.own(&[&copy]);
    let before = fs::read(&copy).unwrap();
    let output = dir.join("copy.reencrypt.partial");
    fs::File::create(&output).unwrap();
    attacker.own(&[&output]);
    for parameters in [
        json!({"image": 0, "pbkdf": cheap_pbkdf()}),
        json!({"image": 0, "reencrypt_output": 1, "pbkdf": cheap_pbkdf()}),
    ] {
        let files: Vec<(&Path, Open)> = if parameters.get("reencrypt_output").is_some() {
            vec![(&copy, Open::Read), (&output, Open::ReadWrite)]
        } else {
            vec![(&copy, Open::ReadWrite)]
        };
        let reply = call_as(&attacker, &daemon, api::REWRITE, parameters, &files);
        let message = refused(&reply, errors::PERMISSION_DENIED);
        assert!(message.contains("key derivation"), "{message}");
        assert!(message.contains("daemon's key ring"), "{message}");
    }
    assert!(
        fs::read(&copy).unwrap() == before,
        "the copy's header changed"
    );
    assert_eq!(fs::metadata(&output).unwrap().len(), 0);
    assert_eq!(derivations(&daemon), 0, "{}", daemon.log_text());
}

#[test]
fn inspect_lists_argon2i_and_unbound_keyslots() {
    let (scratch_dir, daemon) = setup(&[]);
    let dir = scratch_dir.path();
    let (_, attacker) = two_users();
    let key = key_for(&attacker, &dir.join("attacker.key"));
    let other = key_for(&attacker, &dir.join("unbound.key"));
    let image = dir.join("argon2i.luks");
    let argon2i = [
        "--type",
        "luks2",
        "--pbkdf",
        "argon2i",
        "--pbkdf-force-iterations",
        "4",
    ];
    luks_format(
        &attacker,
        &image,
        &key,
        &[&argon2i[..], &["--pbkdf-memory", "32"]].concat(),
    );
    run_ok(
        Command::new("cryptsetup")
            .args([
                "luksAddKey",
                "--batch-mode",
                "--unbound",
                "--key-size",
                "512",
            ])
            .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
            .arg(&image)
            .arg(&other),
    );
    attacker.own(&[&image]);
    let output = run_ok(
        attacker
            .imgctl(&daemon)
            .args(["inspect", "--json", "--key-file"])
            .arg(&key)
            .arg(&image),
    );
    let info: Value = serde_json::from_slice(&output.stdout).unwrap();
    let keyslots = info["keyslots"]
        .as_array()
        .unwrap_or_else(|| panic!("{info}"));
    assert_eq!(keyslots.len(), 2, "{info}");
    assert!(
        keyslots[0]["pbkdf"]
            .as_str()
            .unwrap()
            .starts_with("argon2i (4 iterations, 32 KiB"),
        "{info}"
    );
    assert_eq!(keyslots[1]["keyslot"], 1);
    assert!(
        keyslots[1]["pbkdf"].as_str().unwrap().contains("unbound"),
        "{info}"
    );
    let output = run_ok(
        attacker
            .imgctl(&daemon)
            .args(["inspect", "--key-file"])
            .arg(&key)
            .arg(&image),
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("argon2i") && text.contains("unbound"),
        "{text}"
    );
}

#[test]
fn header_only_rewrite_works_for_ciphers_imgcrypt_cannot_decrypt() {
    let (scratch_dir, daemon) = setup(&[]);
    let dir = scratch_dir.path();
    let (victim, _) = two_users();
    let old = key_for(&victim, &dir.join("old.key"));
    let new = key_for(&victim, &dir.join("new.key"));
    for cipher in [
        // (serpent needs the kernel's device-mapper here, which the test host lacks.)
        &["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"][..],
        &["--cipher", "aes-xts-plain64", "--key-size", "256"][..],
    ] {
        let image = dir.join("other-cipher.luks");
        cryptsetup_image(&victim, &image, "luks2", &old, cipher);
        let reply = call_as(
            &victim,
            &daemon,
            api::REWRITE,
            json!({"image": 0, "keys": [key_ref(1, "old")], "encryption_key": key_ref(2, "encryption_key"), "pbkdf": cheap_pbkdf()}),
            &[
                (&image, Open::ReadWrite),
                (&old, Open::Read),
                (&new, Open::Read),
            ],
        );
        assert_eq!(reply.error, None, "{cipher:?}: {reply:?}");
        assert!(test_passphrase(&image, &new), "{cipher:?}");
        assert!(!test_passphrase(&image, &old), "{cipher:?}");
        // Decrypting still needs a cipher imgcrypt decrypts.
        let output = dir.join("plain.raw");
        fs::File::create(&output).unwrap();
        victim.own(&[&output]);
        let reply = call_as(
            &victim,
            &daemon,
            api::DECRYPT,
            json!({"image": 0, "output": 2, "keys": [key_ref(1, "--key-file")]}),
            &[
                (&image, Open::Read),
                (&new, Open::Read),
                (&output, Open::ReadWrite),
            ],
        );
        let message = refused(&reply, errors::UNSUPPORTED_IMAGE);
        assert!(message.contains(cipher[1]), "{message}");
        assert!(message.contains("256-bit key"), "{message}");
    }
}

#[test]
fn segment_iv_tweak_is_refused_and_a_fixed_size_is_honoured() {
    let (scratch_dir, daemon) = setup(&[]);
    let dir = scratch_dir.path();
    let (victim, _) = two_users();
    let key = key_for(&victim, &dir.join("victim.key"));
    let image = dir.join("segment.luks");
    cryptsetup_image(&victim, &image, "luks2", &key, &["--sector-size", "512"]);
    // Random ciphertext: whatever it decrypts to, ours must equal the independent decryption.
    let data_offset = luks_dump(&image).data_offset;
    run_ok(
        Command::new("dd")
            .args([
                "if=/dev/urandom",
                "bs=1M",
                "count=4",
                "conv=notrunc",
                "status=none",
            ])
            .arg(format!("of={}", image.display()))
            .arg(format!("seek={data_offset}"))
            .arg("oflag=seek_bytes"),
    );

    // A fixed 3 MiB segment: the payload ends there, as for dm-crypt.
    edit_header(&image, &[r#"segments.0.size="3145728""#]);
    let output = dir.join("plain.raw");
    fs::File::create(&output).unwrap();
    victim.own(&[&output]);
    let reply = call_as(
        &victim,
        &daemon,
        api::DECRYPT,
        json!({"image": 0, "output": 2, "keys": [key_ref(1, "--key-file")]}),
        &[
            (&image, Open::Read),
            (&key, Open::Read),
            (&output, Open::ReadWrite),
        ],
    );
    assert_eq!(reply.error, None, "{reply:?}");
    assert_eq!(fs::metadata(&output).unwrap().len(), 3 << 20);
    let independent = independent_decrypt(&image, &key, dir);
    let ours = fs::read(&output).unwrap();
    let theirs = fs::read(&independent).unwrap();
    assert!(ours[..] == theirs[..3 << 20], "plaintext differs");

    // An IV tweak: the IVs would start elsewhere; refused, not decrypted wrongly.
    edit_header(
        &image,
        &[r#"segments.0.size="dynamic""#, r#"segments.0.iv_tweak="8""#],
    );
    for (method, parameters, files) in [
        (
            api::DECRYPT,
            json!({"image": 0, "output": 2, "keys": [key_ref(1, "--key-file")]}),
            vec![
                (&image, Open::Read),
                (&key, Open::Read),
                (&output, Open::ReadWrite),
            ],
        ),
        (
            api::VERIFY,
            json!({"image": 0, "keys": [key_ref(1, "--key-file")]}),
            vec![(&image, Open::Read), (&key, Open::Read)],
        ),
    ] {
        let files: Vec<(&Path, Open)> = files.iter().map(|(p, o)| (p.as_path(), *o)).collect();
        let reply = call_as(&victim, &daemon, method, parameters, &files);
        let message = refused(&reply, errors::UNSUPPORTED_IMAGE);
        assert!(message.contains("iv_tweak 8"), "{method}: {message}");
    }
}
