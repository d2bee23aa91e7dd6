//! Keys as a user meets them: `imgctl key generate` and `key fingerprint` through the real
//! binary, and `encrypt` taking its key from a key ring, checked by cryptsetup itself.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn stdout_line(output: &std::process::Output) -> String {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .trim_end()
        .to_string()
}

#[test]
fn generated_key_fingerprint_and_ring_encrypt_open_with_cryptsetup() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let source = make_source(dir, SourceKind::Raw, "2M");

    // Kept in a subdirectory and named relatively, to show the ring resolves it beside itself.
    fs::create_dir(dir.join("keys")).unwrap();
    let key = dir.join("keys").join("current.key");
    let generated = run_ok(daemon.imgctl().args(["key", "generate", "-o"]).arg(&key));
    let printed = stdout_line(&generated);
    assert_eq!(printed, format!("sha256:{}", coreutils_fingerprint(&key)));
    let bytes = fs::read(&key).unwrap();
    assert_eq!(bytes.len(), 44);
    assert!(
        !String::from_utf8_lossy(&generated.stdout).contains(std::str::from_utf8(&bytes).unwrap()),
        "key bytes printed"
    );
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o7777,
        0o600
    );

    let fingerprint = run_ok(daemon.imgctl().args(["key", "fingerprint"]).arg(&key));
    assert_eq!(stdout_line(&fingerprint), printed);

    // Generating again over it is refused and the key is unchanged.
    let again = run(daemon.imgctl().args(["key", "generate", "-o"]).arg(&key));
    assert!(!again.status.success(), "{}", describe(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        describe(&again)
    );
    assert_eq!(fs::read(&key).unwrap(), bytes);

    let ring = dir.join("keys.toml");
    fs::write(
        &ring,
        "encryption_key = \"keys/current.key\"\ndecryption_key1 = \"keys/current.key\"\n\
         decryption_key3 = \"keys/lost.key\"\n",
    )
    .unwrap();
    let output = dir.join("out.luks");
    let encrypted = run_ok(&mut encrypt_with_ring(&daemon, &ring, &source, &output));
    let stdout = String::from_utf8_lossy(&encrypted.stdout);
    assert!(
        stdout.contains(&printed),
        "summary lacks {printed}: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&encrypted.stderr);
    assert!(
        stderr.contains("decryption_key3 ignored: decryption_key2 is missing"),
        "{stderr}"
    );
    assert!(test_passphrase(&output, &key));
    let other = dir.join("other.key");
    write_key(&other);
    assert!(!test_passphrase(&output, &other), "any key opens it?");
}

#[test]
fn encrypt_with_no_key_anywhere_fails_and_leaves_nothing() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let source = make_source(dir, SourceKind::Raw, "2M");
    let output = dir.join("out.luks");
    let config = dir.join("config");
    let before: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();

    // No --key-file, and the default ring (under an empty XDG_CONFIG_HOME) does not exist.
    let result = run(daemon
        .imgctl()
        .env("XDG_CONFIG_HOME", &config)
        .arg("encrypt")
        .arg(&source)
        .arg("-o")
        .arg(&output)
        .args(CHEAP_PBKDF));
    assert!(!result.status.success(), "{}", describe(&result));
    let stderr = String::from_utf8_lossy(&result.stderr);
    let expected = format!(
        "no key: pass --key-file FILE or set encryption_key in {}",
        config.join("imgcrypt/keys.toml").display()
    );
    assert!(stderr.contains(&expected), "{}", describe(&result));
    let after: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after, "files appeared");

    // A ring without encryption_key is no key either; a missing explicit ring is an error.
    let ring = dir.join("old-only.toml");
    fs::write(&ring, "decryption_key1 = \"old.key\"\n").unwrap();
    for ring in [ring.clone(), dir.join("missing.toml")] {
        let result = run(&mut encrypt_with_ring(&daemon, &ring, &source, &output));
        assert!(!result.status.success(), "{}", describe(&result));
        assert!(
            String::from_utf8_lossy(&result.stderr).contains(&ring.display().to_string()),
            "{}",
            describe(&result)
        );
        assert!(!output.exists());
        assert!(!dir.join("out.luks.partial").exists());
    }
}

#[test]
fn restrictive_umask_still_gives_an_owner_readable_0600_key() {
    let scratch_dir = scratch();
    let key = scratch_dir.path().join("k");
    // Umask 0277 would leave mode 0400 if imgctl trusted the mode given at creation.
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("umask 277 && exec \"$0\" key generate -o \"$1\"")
            .arg(binary("imgctl"))
            .arg(&key),
    );
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o7777,
        0o600
    );
}

#[test]
fn fingerprint_of_a_bad_key_names_the_rule() {
    let scratch_dir = scratch();
    let key = scratch_dir.path().join("k");
    write_key(&key);
    let mut bytes = fs::read(&key).unwrap();
    bytes.push(b'\n');
    fs::write(&key, &bytes).unwrap();
    let result = run(Command::new(binary("imgctl"))
        .args(["key", "fingerprint"])
        .arg(&key));
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("ends with a newline"), "{stderr}");
    assert!(
        !stderr.contains(std::str::from_utf8(&bytes[..44]).unwrap()),
        "key bytes in the message"
    );
}

/// `imgctl --keyring RING encrypt SOURCE -o OUTPUT`: the key comes from the ring, not a flag.
fn encrypt_with_ring(daemon: &Daemon, ring: &Path, source: &Path, output: &Path) -> Command {
    let mut command = daemon.imgctl();
    command
        .arg("--keyring")
        .arg(ring)
        .arg("encrypt")
        .arg(source)
        .arg("-o")
        .arg(output)
        .args(CHEAP_PBKDF);
    command
}

/// `imgctl key fingerprint --vhd KEY` through the binary, its stdout's one line.
fn vhd_fingerprint(key: &Path) -> std::process::Output {
    run(Command::new(binary("imgctl"))
        .args(["key", "fingerprint", "--vhd"])
        .arg(key))
}

#[test]
fn fingerprint_vhd_prints_the_hash_vhd_util_printed_and_stored_for_the_corpus_keys() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let tarball =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/vhd-util/samples.tar.xz");
    let members = [
        "./keyhash-C.txt",
        "./keyhash-p.txt",
        "./key32.b64",
        "./key32.bin",
        "./key64.b64",
        "./key64.bin",
        "./wrongkey32.b64",
        "./wrongkey32.bin",
    ];
    run_ok(
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir)
            .args(members),
    );
    // `vhd-util key -C -k KEY.bin` as the corpus recorded it: "KEY.bin HASH".
    let printed_c = fs::read_to_string(dir.join("keyhash-C.txt")).unwrap();
    // `vhd-util key -p -n ENC.vhd`, the hash stored in each image: "ENC.vhd NONCE HASH".
    let printed_p = fs::read_to_string(dir.join("keyhash-p.txt")).unwrap();
    for (name, images) in [
        (
            "key32",
            &["encA_aes128.vhd", "encB_aes128.vhd", "encD_aes128.vhd"][..],
        ),
        (
            "key64",
            &["encA_aes256.vhd", "encB_aes256.vhd", "encE_aes256.vhd"][..],
        ),
        ("wrongkey32", &[][..]),
    ] {
        // The corpus's DEK form ends with a newline: refused, naming the rule, printing nothing.
        let with_newline = dir.join(format!("{name}.b64"));
        let result = vhd_fingerprint(&with_newline);
        assert!(!result.status.success(), "{name}: {}", describe(&result));
        assert!(result.stdout.is_empty(), "{name}: {}", describe(&result));
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(stderr.contains("ends with a newline"), "{name}: {stderr}");

        let key = dir.join(format!("{name}.dek"));
        let text = fs::read(&with_newline).unwrap();
        fs::write(&key, text.strip_suffix(b"\n").unwrap()).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let result = vhd_fingerprint(&key);
        assert!(result.status.success(), "{name}: {}", describe(&result));
        let hash = stdout_line(&result);

        let from_vhd_util = printed_c
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}.bin ")))
            .unwrap();
        assert_eq!(hash, from_vhd_util, "{name}: vhd-util key -C");
        // Computed here from the raw key: SHA-256 of vhd-util copy's zero nonce and the key.
        let raw = fs::read(dir.join(format!("{name}.bin"))).unwrap();
        let computed = vhd_key_hash(&raw);
        assert_eq!(hash, computed, "{name}");
        for image in images {
            let fields: Vec<&str> = printed_p
                .lines()
                .find(|line| line.starts_with(&format!("{image} ")))
                .unwrap()
                .split_whitespace()
                .collect();
            assert_eq!(fields[2], hash, "{name}: the hash stored in {image}");
        }
        // Not the ordinary fingerprint (SHA-256 of the key file's bytes).
        let plain = run_ok(
            Command::new(binary("imgctl"))
                .args(["key", "fingerprint"])
                .arg(&key),
        );
        assert_eq!(
            stdout_line(&plain),
            format!("sha256:{}", coreutils_fingerprint(&key))
        );
        assert!(!stdout_line(&plain).contains(&hash));
    }
}

#[test]
fn fingerprint_vhd_refuses_keys_vhd_util_copy_cannot_use() {
    use base64::Engine as _;
    let scratch_dir = scratch();
    let key = scratch_dir.path().join("k");
    let encode = |raw: &[u8]| base64::engine::general_purpose::STANDARD.encode(raw);
    let half: Vec<u8> = (1..=32).collect();
    for (raw, rule) in [
        (vec![7u8; 48], "decodes to 48 bytes"),
        (vec![7u8; 24], "decodes to 24 bytes"),
        ([half.clone(), half].concat(), "halves are equal"),
    ] {
        fs::write(&key, encode(&raw)).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let result = vhd_fingerprint(&key);
        assert!(!result.status.success(), "{rule}: {}", describe(&result));
        assert!(result.stdout.is_empty(), "{rule}: {}", describe(&result));
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(stderr.contains(rule), "{rule}: {stderr}");
    }
    // IBM's documented DEK (ibm-cloud-docs/image-templates create-encrypted-image.md) prints
    // the hash IBM shows for it.
    fs::write(
        &key,
        "Nrfen98EpMxF2B+wdgLfagzrqvgUZfMK4vL2T0NsT20ihrsNC9pUUHtizF6218pze8RLCgQ6kwxuE58IWLzgDA==",
    )
    .unwrap();
    let result = vhd_fingerprint(&key);
    assert!(result.status.success(), "{}", describe(&result));
    assert_eq!(
        stdout_line(&result),
        "21681bba94f04b33b112f5f90a0faa885a6d1dbf1bd68ed16c5b995143088eda"
    );
}
