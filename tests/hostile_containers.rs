//! Issue 9's review: attacks through the new containers (qcow2 with LUKS, blktap-encrypted
//! VHD) on a real root imgcryptd with a key ring, by an unprivileged attacker the test creates.
//!
//! - A vhd-util VHD has no volume key: the key file's bytes are the AES-XTS key. With the
//!   daemon's ring key, every VHD anyone made shares one data key, so a socket user who could
//!   have the daemon encrypt sectors of their choice under it (Encrypt `--format vhd` with no
//!   key, or a `--reencrypt` of a crafted VHD) would get a guess oracle on every other
//!   ring-keyed VHD they can read: same sector, same 16-byte block, same ciphertext. Both are
//!   refused for callers the ring does not decrypt for; root keeps them.
//! - A qcow2's embedded LUKS1 keyslot edited to 4294967295 PBKDF2 iterations is refused before
//!   any derivation, as for raw LUKS (tests/hostile_luks.rs).
//!
//! Each test fails if the attack works again.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use imgcrypt_proto::api::{self, OutputFormat, RewriteParameters};
use imgcrypt_proto::varlink::Reply;

/// Encrypt of `source` into `output` with the daemon's ring key (no key passed) as `format`.
fn encrypt_with_ring(socket: &Path, source: &Path, output: &Path, format: OutputFormat) -> Reply {
    let mut parameters = raw_client::cheap_encrypt_parameters(None);
    parameters["format"] = serde_json::to_value(format).unwrap();
    if format == OutputFormat::Vhd {
        // A VHD has no keyslot to derive.
        parameters["pbkdf"] = serde_json::Value::Null;
    }
    varlink_in_out(socket, api::ENCRYPT, parameters, source, output)
}

/// `Rewrite --reencrypt` of `image` into `output` with the daemon's ring (no keys passed).
fn reencrypt_with_ring(socket: &Path, image: &Path, output: &Path) -> Reply {
    let parameters = serde_json::to_value(RewriteParameters {
        image: 0,
        keys: Vec::new(),
        encryption_key: None,
        reencrypt_output: Some(1),
        pbkdf: None,
        detach: None,
        names: None,
    })
    .unwrap();
    varlink_in_out(socket, api::REWRITE, parameters, image, output)
}

#[test]
fn the_daemons_ring_key_never_encrypts_chosen_vhd_sectors_for_other_users() {
    let (_, attacker) = two_users();
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = daemon_with_ring(dir);
    let work = shared_dir(dir, "attacker");

    // Root's (the operator's) VHD with the ring key: a secret, world-readable.
    let secret = work.join("secret.raw");
    write_secret(&secret, 4 << 20);
    let victim = work.join("secret.vhd");
    write_file(&victim, b"");
    let reply = encrypt_with_ring(&daemon.socket, &secret, &victim, OutputFormat::Vhd);
    assert_eq!(reply.error, None, "{reply:?}\n{}", daemon.log_text());
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();

    // The attacker's chosen plaintext (a guess at the secret's first sector), its outputs, and
    // a copy of the victim's VHD to re-encrypt.
    let guess = work.join("guess.raw");
    write_secret(&guess, 4 << 20);
    let out_encrypt = work.join("guess.vhd");
    let out_reencrypt = work.join("copy.vhd.reencrypt.partial");
    let copy = work.join("copy.vhd");
    fs::copy(&victim, &copy).unwrap();
    for path in [&out_encrypt, &out_reencrypt] {
        write_file(path, b"");
    }
    attacker.own(&[&work, &guess, &out_encrypt, &out_reencrypt, &copy]);

    let socket = daemon.socket.clone();
    let (guess_in, out_in, copy_in, re_in) = (
        guess.clone(),
        out_encrypt.clone(),
        copy.clone(),
        out_reencrypt.clone(),
    );
    let replies = attacker.in_thread(move || {
        [
            encrypt_with_ring(&socket, &guess_in, &out_in, OutputFormat::Vhd),
            reencrypt_with_ring(&socket, &copy_in, &re_in),
        ]
    });
    for (reply, what) in replies.iter().zip(["encrypt a VHD", "re-encrypt a VHD"]) {
        assert_eq!(
            reply.error.as_deref(),
            Some(api::errors::PERMISSION_DENIED),
            "{what}: {reply:?}"
        );
        let text = serde_json::to_string(reply).unwrap();
        assert!(
            text.contains(what) && text.contains("--key-file"),
            "{what}: {text}"
        );
    }
    // Nothing was written for the attacker.
    for path in [&out_encrypt, &out_reencrypt] {
        assert_eq!(fs::metadata(path).unwrap().len(), 0, "{}", path.display());
    }

    // The attacker may still have raw LUKS and qcow2 images made with the ring key: each gets
    // its own random volume key, so they share nothing with anyone's image.
    let out_luks = work.join("guess.luks");
    write_file(&out_luks, b"");
    attacker.own(&[&out_luks]);
    let socket = daemon.socket.clone();
    let (guess_in, out_in) = (guess.clone(), out_luks.clone());
    let reply = attacker
        .in_thread(move || encrypt_with_ring(&socket, &guess_in, &out_in, OutputFormat::Luks));
    assert_eq!(reply.error, None, "{reply:?}\n{}", daemon.log_text());

    // Root keeps its VHD re-encryption with the ring.
    let root_partial = work.join("root.partial");
    write_file(&root_partial, b"");
    let reply = reencrypt_with_ring(&daemon.socket, &victim, &root_partial);
    assert_eq!(reply.error, None, "{reply:?}\n{}", daemon.log_text());
}

/// Byte offset of LUKS1 keyslot `slot`'s iteration count inside the phdr (cryptsetup's
/// `luks1` on-disk format: keyslots from byte 208, 48 bytes each, `active` then
/// `iterations`, both big-endian u32).
fn luks1_keyslot_iterations_at(slot: u64) -> u64 {
    208 + 48 * slot + 4
}

#[test]
fn a_qcow2_keyslot_edited_to_stall_the_daemon_is_refused_without_a_derivation() {
    let (_, attacker) = two_users();
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &["--socket-mode", "0666"]);
    let work = dir.join("attacker");
    fs::create_dir(&work).unwrap();
    let key = work.join("key");
    write_key(&key);
    let source = make_source(&work, SourceKind::Raw, "4M");
    let image = work.join("image.qcow2");
    let mut command = daemon.imgctl();
    encrypt_arguments(&mut command, &source, &image, &key);
    let output = run(command.args(["--format", "qcow2"]));
    assert!(output.status.success(), "{}", describe(&output));

    // The LUKS header is where the crypto header extension says (qemu-img info shows it).
    let info = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format-specific"]["data"]["encrypt"]["format"], "luks");
    let luks_at = find_luks_magic(&image);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    file.write_all_at(
        &u32::MAX.to_be_bytes(),
        luks_at + luks1_keyslot_iterations_at(0),
    )
    .unwrap();
    drop(file);
    attacker.own(&[&work, &key, &image]);

    for verb in ["verify", "decrypt"] {
        let started = Instant::now();
        let mut command = attacker.imgctl(&daemon);
        command.arg(verb).arg(&image).arg("--key-file").arg(&key);
        if verb == "decrypt" {
            command.arg("-o").arg(work.join("plain.raw"));
        }
        let output = run(&mut command);
        let text = describe(&output);
        assert!(!output.status.success(), "{verb}: {text}");
        assert!(
            text.contains("keyslot 0") && text.contains("4294967295"),
            "{verb}: {text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{verb} took {:?}",
            started.elapsed()
        );
    }
    let output = run(attacker
        .imgctl(&daemon)
        .arg("inspect")
        .arg(&image)
        .arg("--key-file")
        .arg(&key));
    assert!(output.status.success(), "{}", describe(&output));
}

/// The file offset of the LUKS1 magic inside a qcow2 (cluster-aligned, so only cluster starts
/// are looked at).
fn find_luks_magic(image: &Path) -> u64 {
    let bytes = fs::read(image).unwrap();
    (0..bytes.len())
        .step_by(65536)
        .find(|&at| bytes[at..].starts_with(b"LUKS\xba\xbe"))
        .expect("a LUKS header in the qcow2") as u64
}
