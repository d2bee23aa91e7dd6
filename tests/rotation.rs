//! Key rotation through the real binaries, judged by cryptsetup: `imgctl rewrite -k` (header
//! only, including a SIGKILL of the daemon at every step of it) and `rewrite -k --reencrypt`
//! (new volume key, resumable), plus how keys are found: by fingerprint, by trial for images
//! made by plain cryptsetup, and the errors for a wrong key and a gap in the ring.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The bytes from `offset` to the end.
fn payload_bytes(image: &Path, offset: u64) -> Vec<u8> {
    fs::read(image).unwrap()[offset as usize..].to_vec()
}

/// Whether the daemon is gone within a few seconds: the client sees the socket close while the
/// killed process is still being torn down, so it may not be reapable at once.
fn exits_soon(daemon: &mut Daemon) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if !daemon.is_running() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// `rewrite -k` with cheap keyslot settings.
fn rewrite(daemon: &Daemon, ring: &Path, image: &Path) -> Command {
    rewrite_k(daemon, ring, image, CHEAP_PBKDF)
}

/// Keys `old`, `new` and `other` and a ring rotating from old to new with `other` first.
fn keys(dir: &Path) -> RotationKeys {
    rotation_keys(dir, &["other.key"])
}

fn encrypted_image(daemon: &Daemon, dir: &Path, key: &Path, extra: &[&str]) -> (PathBuf, PathBuf) {
    let source = make_source(dir, SourceKind::VhdDynamic, "8M");
    let image = dir.join("image.luks");
    run_ok(daemon.encrypt(&source, &image, key).args(extra));
    (source, image)
}

#[test]
fn header_only_rotation_keeps_the_payload_and_swaps_the_keys() {
    for luks1 in [false, true] {
        let scratch_dir = scratch();
        let dir = scratch_dir.path();
        let daemon = Daemon::start(dir, &[]);
        let keys = keys(dir);
        let extra: &[&str] = if luks1 { &["--luks1"] } else { &[] };
        let (source, image) = encrypted_image(&daemon, dir, &keys.old, extra);
        let facts = luks_dump(&image);
        let before = payload_bytes(&image, facts.data_offset);

        let output = run(&mut rewrite(&daemon, &keys.ring, &image));
        assert!(
            output.status.success(),
            "luks1={luks1}: {}",
            describe(&output)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains(&coreutils_fingerprint(&keys.new)), "{text}");

        assert!(
            !test_passphrase(&image, &keys.old),
            "old key still opens (luks1={luks1})"
        );
        assert!(
            test_passphrase(&image, &keys.new),
            "new key does not open (luks1={luks1})"
        );
        assert_eq!(luks_dump(&image), facts, "header geometry changed");
        assert!(
            payload_bytes(&image, facts.data_offset) == before,
            "payload bytes changed"
        );
        assert_plaintext_matches(&independent_decrypt(&image, &keys.new, dir), &{
            let raw = dir.join("source.raw");
            qemu_plaintext(&source, &raw);
            raw
        });

        let log = daemon.log_text();
        // LUKS2 images imgcrypt made carry the old key's fingerprint: found without trials.
        let expected_method = if luks1 {
            "method=Trial"
        } else {
            "method=Token"
        };
        assert!(log.contains(expected_method), "luks1={luks1}: {log}");

        // The rotated image's fingerprint is the new key's, and inspect says the ring matches.
        let inspected = run_ok(
            daemon
                .imgctl()
                .arg("--keyring")
                .arg(&keys.ring)
                .args(["inspect", "--json"])
                .arg(&image),
        );
        let info: serde_json::Value = serde_json::from_slice(&inspected.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", describe(&inspected)));
        let slots = info["keyslots"].as_array().unwrap();
        assert_eq!(slots.len(), 1, "{info}");
        if !luks1 {
            assert_eq!(
                slots[0]["fingerprint"],
                coreutils_fingerprint(&keys.new),
                "{info}"
            );
            assert_eq!(slots[0]["matching_key"], "encryption_key", "{info}");
        }
    }
}

/// Every point in a header-only rotation where the daemon can die, in order; the image must
/// open with the old key before the new keyslot is durable and with the new key after.
const LUKS2_CRASH_POINTS: &[(&str, bool)] = &[
    ("added:keyslots", false),
    ("added:primary-torn", false),
    ("added:primary", true),
    ("added:secondary", true),
    ("removed:primary-torn", true),
    ("removed:primary", true),
    ("removed:secondary", true),
    ("removed:keyslots", true),
];

const LUKS1_CRASH_POINTS: &[(&str, bool)] = &[
    ("added:keyslots", false),
    ("added:primary", true),
    ("removed:primary", true),
    ("removed:keyslots", true),
];

#[test]
fn a_detached_header_only_rotation_is_followed_by_wait() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let keys = keys(dir);
    let (_, image) = encrypted_image(&daemon, dir, &keys.old, &[]);
    let detached = run(rewrite(&daemon, &keys.ring, &image)
        .arg("--detach")
        .stdin(std::process::Stdio::null()));
    assert!(detached.status.success(), "{}", describe(&detached));
    let id: u64 = String::from_utf8_lossy(&detached.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("no job id ({e}): {}", describe(&detached)));
    let waited = run(daemon.imgctl().args(["wait", &id.to_string()]));
    assert!(waited.status.success(), "wait: {}", describe(&waited));
    let text = String::from_utf8_lossy(&waited.stdout);
    assert!(text.contains(&coreutils_fingerprint(&keys.new)), "{text}");
    assert!(
        test_passphrase(&image, &keys.new),
        "the new key does not open"
    );
    assert!(
        !test_passphrase(&image, &keys.old),
        "the old key still opens"
    );
    let status = run_ok(daemon.imgctl().args(["status", &id.to_string(), "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        (&status["kind"], &status["detached"], &status["state"]),
        (&"rewrite".into(), &true.into(), &"succeeded".into()),
        "{status}"
    );
    // A re-encryption is not detached: its rename is imgctl's own.
    let refused = run(rewrite(&daemon, &keys.ring, &image).args(["--reencrypt", "--detach"]));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--detach is for the header-only"),
        "{}",
        describe(&refused)
    );
}

#[test]
fn a_kill_at_each_step_of_a_rotation_leaves_an_image_a_ring_key_opens() {
    for (luks1, points) in [(false, LUKS2_CRASH_POINTS), (true, LUKS1_CRASH_POINTS)] {
        let scratch_dir = scratch();
        let dir = scratch_dir.path();
        let keys = keys(dir);
        let pristine = {
            let daemon = Daemon::start(dir, &[]);
            let extra: &[&str] = if luks1 { &["--luks1"] } else { &[] };
            encrypted_image(&daemon, dir, &keys.old, extra).1
        };
        let data_offset = luks_dump(&pristine).data_offset;
        let payload = payload_bytes(&pristine, data_offset);

        for &(point, new_key_durable) in points {
            let image = dir.join(format!("{}.luks", point.replace(':', "-")));
            fs::copy(&pristine, &image).unwrap();
            {
                let mut daemon = Daemon::start_with_env(dir, &[], &[("IMGCRYPTD_CRASH_AT", point)]);
                let output = run(&mut rewrite(&daemon, &keys.ring, &image));
                assert!(!output.status.success(), "{point}: {}", describe(&output));
                assert!(
                    exits_soon(&mut daemon),
                    "{point}: the crash hook did not fire: {}",
                    describe(&output)
                );
            }
            let old_opens = test_passphrase(&image, &keys.old);
            let new_opens = test_passphrase(&image, &keys.new);
            assert!(
                old_opens || new_opens,
                "luks1={luks1} {point}: no ring key opens the image"
            );
            if new_key_durable {
                assert!(
                    new_opens,
                    "luks1={luks1} {point}: the new keyslot was durable but does not open"
                );
            } else {
                assert!(old_opens, "luks1={luks1} {point}: the old key stopped opening before the new one was durable");
            }
            assert!(
                payload_bytes(&image, data_offset) == payload,
                "{point}: payload changed"
            );

            // Running the same command again finishes the rotation.
            let daemon = Daemon::start(dir, &[]);
            let output = run(&mut rewrite(&daemon, &keys.ring, &image));
            assert!(
                output.status.success(),
                "{point} rerun: {}",
                describe(&output)
            );
            assert!(
                !test_passphrase(&image, &keys.old),
                "{point}: old key opens after the rerun"
            );
            assert!(
                test_passphrase(&image, &keys.new),
                "{point}: new key fails after the rerun"
            );
            assert!(
                payload_bytes(&image, data_offset) == payload,
                "{point}: payload changed"
            );
            fs::remove_file(&image).unwrap();
        }
    }
}

#[test]
fn a_wrong_key_is_refused_without_trials_and_names_the_fingerprints() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let keys = keys(dir);
    let (_, image) = encrypted_image(&daemon, dir, &keys.old, &[]);
    let before = fs::read(&image).unwrap();
    let ring = dir.join("wrong.toml");
    fs::write(
        &ring,
        "encryption_key = \"new.key\"\ndecryption_key1 = \"other.key\"\n",
    )
    .unwrap();

    for command in [
        vec!["verify"],
        vec!["rewrite", "-k"],
        vec!["decrypt", "-o", "plain.raw"],
    ] {
        let output = run(daemon
            .imgctl()
            .current_dir(dir)
            .arg("--keyring")
            .arg(&ring)
            .args(&command[..1])
            .args(&command[1..])
            .arg(&image));
        assert!(
            !output.status.success(),
            "{command:?}: {}",
            describe(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        for tried in [&keys.new, &keys.others[0]] {
            assert!(
                stderr.contains(&coreutils_fingerprint(tried)),
                "{command:?}: {stderr}"
            );
        }
        assert!(
            stderr.contains(&coreutils_fingerprint(&keys.old)),
            "carried fingerprint missing: {stderr}"
        );
        assert!(!dir.join("plain.raw").exists() && !dir.join("plain.raw.partial").exists());
    }
    assert!(
        fs::read(&image).unwrap() == before,
        "a failed unlock changed the image"
    );
    assert!(
        !daemon.log_text().contains("method=Trial"),
        "keys were tried through the PBKDF"
    );
}

#[test]
fn plain_cryptsetup_images_are_opened_by_trial_in_ring_order() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let keys = keys(dir);
    let source = make_source(dir, SourceKind::Raw, "4M");
    let image = dir.join("plain.luks");
    fs::copy(&source, &image).unwrap();
    // Room for the 16 MiB LUKS2 header in front of the data, as a user would make it.
    let file = fs::OpenOptions::new().write(true).open(&image).unwrap();
    file.set_len(32 << 20).unwrap();
    drop(file);
    run_ok(
        Command::new("cryptsetup")
            .args(["luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2"])
            .args(["--pbkdf-force-iterations", "1000", "--key-file"])
            .arg(&keys.old)
            .arg(&image),
    );

    let output = run_ok(
        daemon
            .imgctl()
            .arg("--keyring")
            .arg(&keys.ring)
            .arg("verify")
            .arg(&image),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ring order"), "{}", describe(&output));
    // encryption_key, decryption_key1 (other) and decryption_key2 (old): three derivations.
    assert!(
        daemon.log_text().contains("attempts=3"),
        "{}",
        daemon.log_text()
    );

    run_ok(&mut rewrite(&daemon, &keys.ring, &image));
    assert!(test_passphrase(&image, &keys.new));
    assert!(!test_passphrase(&image, &keys.old));
    // The new keyslot carries a token, so the next unlock needs no trials.
    let output = run_ok(
        daemon
            .imgctl()
            .arg("--keyring")
            .arg(&keys.ring)
            .arg("verify")
            .arg(&image),
    );
    assert!(!String::from_utf8_lossy(&output.stderr).contains("ring order"));
}

#[test]
fn keys_after_a_gap_in_the_ring_are_ignored_with_a_warning() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let keys = keys(dir);
    let (_, image) = encrypted_image(&daemon, dir, &keys.old, &[]);
    let ring = dir.join("gap.toml");
    fs::write(
        &ring,
        "encryption_key = \"new.key\"\ndecryption_key1 = \"other.key\"\ndecryption_key3 = \"old.key\"\n",
    )
    .unwrap();
    let output = run(daemon
        .imgctl()
        .arg("--keyring")
        .arg(&ring)
        .arg("verify")
        .arg(&image));
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("decryption_key3"), "{stderr}");
    assert!(
        !stderr.contains(&format!("tried {}", coreutils_fingerprint(&keys.old))),
        "{stderr}"
    );
}

#[test]
fn reencryption_changes_the_volume_key_and_every_sector_but_not_the_plaintext() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let keys = keys(dir);
    let (source, image) = encrypted_image(&daemon, dir, &keys.old, &["--sector-size", "4096"]);
    let facts = luks_dump(&image);
    let before = payload_bytes(&image, facts.data_offset);

    let output = run(rewrite(&daemon, &keys.ring, &image).arg("--reencrypt"));
    assert!(output.status.success(), "{}", describe(&output));
    assert!(!dir.join("image.luks.reencrypt.partial").exists());
    assert!(!test_passphrase(&image, &keys.old));
    assert!(test_passphrase(&image, &keys.new));
    let after_facts = luks_dump(&image);
    assert_eq!(after_facts.sector_size, 4096);
    let after = payload_bytes(&image, after_facts.data_offset);
    assert_eq!(after.len(), before.len());
    // Every 4 KiB sector's ciphertext changed (a new volume key).
    let unchanged = before
        .chunks(4096)
        .zip(after.chunks(4096))
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(
        unchanged, 0,
        "{unchanged} sectors kept their old ciphertext"
    );
    let raw = dir.join("source.raw");
    qemu_plaintext(&source, &raw);
    assert_plaintext_matches(&independent_decrypt(&image, &keys.new, dir), &raw);
}

#[test]
fn an_interrupted_reencryption_resumes_from_its_checkpoint() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let keys = keys(dir);
    // 600 MiB with data spread over it: three checkpoints' worth.
    let source = dir.join("big.raw");
    let file = fs::File::create(&source).unwrap();
    file.set_len(600 << 20).unwrap();
    drop(file);
    qemu_io(
        "raw",
        &source,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 300M 1M",
            "write -P 0x3c 599M 1M",
        ],
    );
    let image = dir.join("image.luks");
    {
        let daemon = Daemon::start(dir, &[]);
        run_ok(&mut daemon.encrypt(&source, &image, &keys.old));
    }
    let before = fs::read(&image).unwrap();
    {
        let mut daemon =
            Daemon::start_with_env(dir, &[], &[("IMGCRYPTD_CRASH_AT", "reencrypt:checkpoint")]);
        let output = run(rewrite(&daemon, &keys.ring, &image).arg("--reencrypt"));
        assert!(!output.status.success(), "{}", describe(&output));
        assert!(exits_soon(&mut daemon), "{}", describe(&output));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("resume"),
            "{}",
            describe(&output)
        );
    }
    assert!(dir.join("image.luks.reencrypt.partial").exists());
    assert!(
        fs::read(&image).unwrap() == before,
        "the image changed before the rename"
    );
    assert!(test_passphrase(&image, &keys.old));

    let daemon = Daemon::start(dir, &[]);
    let output = run(rewrite(&daemon, &keys.ring, &image).arg("--reencrypt"));
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        daemon
            .log_text()
            .contains("resuming the re-encryption at 268435456"),
        "{}",
        daemon.log_text()
    );
    assert!(!dir.join("image.luks.reencrypt.partial").exists());
    assert!(test_passphrase(&image, &keys.new));
    assert!(!test_passphrase(&image, &keys.old));
    let verified = run(daemon
        .imgctl()
        .arg("--keyring")
        .arg(&keys.ring)
        .arg("verify")
        .arg(&image)
        .arg("--source")
        .arg(&source));
    assert!(verified.status.success(), "{}", describe(&verified));
    // And independently of our own decryption.
    assert_plaintext_matches(&independent_decrypt(&image, &keys.new, dir), &source);
}
