//! LUKS headers made by `imgcryptd::luks::format_header`, checked with the real cryptsetup CLI:
//! what `luksDump` shows matches what we report, the key file unlocks the keyslot (and another
//! does not), and the volume key in the keyslot is exactly the one we generated.
//!
//! Needs `cryptsetup` (package cryptsetup-bin); runs on a plain file, no device-mapper needed.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use imgcrypt_proto::api::{LuksVersion, Pbkdf, PbkdfKind};
use imgcryptd::keys::{read_key_file, SecretBytes};
use imgcryptd::luks::{format_header, output_size, HeaderSpec, VOLUME_KEY_BYTES};

const MIB: u64 = 1 << 20;
/// An odd source size, so the output needs rounding.
const VIRTUAL_SIZE: u64 = 3 * MIB + 512;

/// A fresh key file the way users are told to make one: base64 of 32 random bytes, no newline.
fn write_key_file(path: &Path) {
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 32 /dev/urandom | base64 -w0 > '{}'",
            path.display()
        ))
        .output()
        .unwrap();
    assert!(output.status.success());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn cryptsetup(args: &[&str]) -> Output {
    Command::new("cryptsetup")
        .args(args)
        .output()
        .expect("cryptsetup must be installed (package cryptsetup-bin)")
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The value of the first `name:` line of a `luksDump`, trimmed.
fn field<'a>(dump: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}:");
    dump.lines()
        .map(str::trim_start)
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name:?} in luksDump:\n{dump}"))
        .trim()
}

struct Formatted {
    _dir: tempfile::TempDir,
    image: PathBuf,
    key: PathBuf,
    volume_key: SecretBytes,
    data_offset: u64,
    cipher: String,
    key_size_bits: u32,
    pbkdf: String,
    dump: String,
}

/// Formats a header for `spec`, writes it into a sparse output file of the layout's size, and
/// dumps it with cryptsetup.
fn format_to_file(spec: &HeaderSpec) -> Formatted {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    write_key_file(&key);
    let key_file = read_key_file(&File::open(&key).unwrap()).unwrap();
    assert!(key_file.warnings.is_empty(), "{:?}", key_file.warnings);

    let volume_key = SecretBytes::random(VOLUME_KEY_BYTES).unwrap();
    let header = format_header(
        spec,
        &volume_key,
        &key_file.passphrase,
        &key_file.fingerprint,
    )
    .unwrap();
    assert_eq!(
        header.image.metadata().unwrap().len(),
        header.data_offset,
        "the memfd holds exactly the header"
    );

    let image = dir.path().join("image.luks");
    let size = output_size(header.data_offset, VIRTUAL_SIZE).unwrap();
    let output = File::create(&image).unwrap();
    output.set_len(size).unwrap();
    let mut bytes = vec![0u8; header.data_offset as usize];
    header.image.read_exact_at(&mut bytes, 0).unwrap();
    output.write_all_at(&bytes, 0).unwrap();
    output.sync_all().unwrap();

    let dump = cryptsetup(&["luksDump", path_str(&image)]);
    assert!(dump.status.success(), "{dump:?}");
    Formatted {
        _dir: dir,
        image,
        key,
        volume_key,
        data_offset: header.data_offset,
        cipher: header.cipher,
        key_size_bits: header.key_size_bits,
        pbkdf: header.pbkdf,
        dump: String::from_utf8(dump.stdout).unwrap(),
    }
}

/// The key file opens the keyslot, another key does not, and the keyslot holds our volume key.
fn check_keys(formatted: &Formatted) {
    let image = path_str(&formatted.image);
    let test = cryptsetup(&[
        "open",
        "--test-passphrase",
        "--key-file",
        path_str(&formatted.key),
        image,
    ]);
    assert!(test.status.success(), "{test:?}");

    let other_key = formatted.key.with_file_name("other-key");
    write_key_file(&other_key);
    let test = cryptsetup(&[
        "open",
        "--test-passphrase",
        "--key-file",
        path_str(&other_key),
        image,
    ]);
    assert!(
        !test.status.success(),
        "another key must not open the image"
    );

    let dumped_key = formatted.key.with_file_name("volume-key");
    let dump = cryptsetup(&[
        "luksDump",
        "--dump-volume-key",
        "--volume-key-file",
        path_str(&dumped_key),
        "--key-file",
        path_str(&formatted.key),
        "-q",
        image,
    ]);
    assert!(dump.status.success(), "{dump:?}");
    assert_eq!(
        std::fs::read(&dumped_key).unwrap(),
        formatted.volume_key.as_bytes(),
        "the keyslot must hold our volume key"
    );
}

fn cheap_argon2id() -> Pbkdf {
    Pbkdf {
        kind: Some(PbkdfKind::Argon2id),
        iterations: Some(4),
        memory_kib: Some(32),
        parallel: Some(1),
        ..Pbkdf::default()
    }
}

fn cheap_pbkdf2() -> Pbkdf {
    Pbkdf {
        kind: Some(PbkdfKind::Pbkdf2),
        iterations: Some(1000),
        ..Pbkdf::default()
    }
}

fn check_luks2(sector_size: u32) {
    let formatted = format_to_file(&HeaderSpec {
        version: LuksVersion::Luks2,
        sector_size,
        pbkdf: cheap_argon2id(),
    });
    let dump = &formatted.dump;
    assert_eq!(field(dump, "Version"), "2");
    assert_eq!(field(dump, "cipher"), formatted.cipher);
    assert_eq!(formatted.cipher, "aes-xts-plain64");
    assert_eq!(field(dump, "sector"), format!("{sector_size} [bytes]"));
    assert_eq!(
        field(dump, "offset"),
        format!("{} [bytes]", formatted.data_offset)
    );
    // cryptsetup's documented LUKS2 default header size.
    assert_eq!(formatted.data_offset, 16 * MIB);
    assert_eq!(field(dump, "length"), "(whole device)");
    assert_eq!(
        field(dump, "Key"),
        format!("{} bits", formatted.key_size_bits)
    );
    assert_eq!(formatted.key_size_bits, 512);
    assert_eq!(field(dump, "PBKDF"), "argon2id");
    assert_eq!(field(dump, "Time cost"), "4");
    assert_eq!(field(dump, "Memory"), "32");
    assert_eq!(field(dump, "Threads"), "1");
    assert_eq!(formatted.pbkdf, "argon2id (4 iterations, 32 KiB, 1 thread)");
    assert_eq!(
        dump.lines()
            .filter(|line| line.trim_end().ends_with(": luks2"))
            .count(),
        1,
        "exactly one keyslot:\n{dump}"
    );
    check_keys(&formatted);
}

#[test]
fn luks2_512() {
    check_luks2(512);
}

#[test]
fn luks2_4096() {
    check_luks2(4096);
}

#[test]
fn luks1() {
    let formatted = format_to_file(&HeaderSpec {
        version: LuksVersion::Luks1,
        sector_size: 512,
        pbkdf: cheap_pbkdf2(),
    });
    let dump = &formatted.dump;
    assert_eq!(field(dump, "Version"), "1");
    assert_eq!(
        format!(
            "{}-{}",
            field(dump, "Cipher name"),
            field(dump, "Cipher mode")
        ),
        formatted.cipher
    );
    assert_eq!(formatted.cipher, "aes-xts-plain64");
    assert_eq!(
        field(dump, "Payload offset").parse::<u64>().unwrap() * 512,
        formatted.data_offset
    );
    // cryptsetup's LUKS1 header with a 512-bit key, aligned to 1 MiB.
    assert_eq!(formatted.data_offset, 2 * MIB);
    assert_eq!(field(dump, "MK bits"), formatted.key_size_bits.to_string());
    assert_eq!(field(dump, "Hash spec"), "sha256");
    assert_eq!(field(dump, "Key Slot 0"), "ENABLED");
    assert_eq!(field(dump, "Key Slot 1"), "DISABLED");
    assert_eq!(field(dump, "Iterations"), "1000");
    assert_eq!(formatted.pbkdf, "pbkdf2-sha256 (1000 iterations)");
    check_keys(&formatted);
}

#[test]
fn luks2_with_pbkdf2() {
    let formatted = format_to_file(&HeaderSpec {
        version: LuksVersion::Luks2,
        sector_size: 512,
        pbkdf: cheap_pbkdf2(),
    });
    assert_eq!(field(&formatted.dump, "PBKDF"), "pbkdf2");
    assert_eq!(formatted.pbkdf, "pbkdf2-sha256 (1000 iterations)");
    check_keys(&formatted);
}

/// cryptsetup's defaults: argon2id benchmarked to 2000 ms. Prints how long that takes here.
#[test]
fn default_pbkdf_is_benchmarked_argon2id() {
    let started = Instant::now();
    let formatted = format_to_file(&HeaderSpec::default());
    let elapsed = started.elapsed();
    let dump = &formatted.dump;
    assert_eq!(field(dump, "PBKDF"), "argon2id");
    let memory: u32 = field(dump, "Memory").parse().unwrap();
    let threads: u32 = field(dump, "Threads").parse().unwrap();
    let iterations: u32 = field(dump, "Time cost").parse().unwrap();
    assert!(
        memory <= 1024 * 1024 && threads <= 4 && iterations >= 4,
        "{dump}"
    );
    assert_eq!(
        formatted.pbkdf,
        format!(
            "argon2id ({iterations} iterations, {memory} KiB, {threads} thread{}; \
             benchmarked for 2000 ms)",
            if threads == 1 { "" } else { "s" }
        )
    );
    let mut stderr = std::io::stderr();
    writeln!(
        stderr,
        "default argon2id format (benchmark + keyslot): {elapsed:?}; {}",
        formatted.pbkdf
    )
    .unwrap();
    let unlock = Instant::now();
    let test = cryptsetup(&[
        "open",
        "--test-passphrase",
        "--key-file",
        path_str(&formatted.key),
        path_str(&formatted.image),
    ]);
    assert!(test.status.success(), "{test:?}");
    writeln!(
        stderr,
        "cryptsetup unlock of that keyslot: {:?}",
        unlock.elapsed()
    )
    .unwrap();
}

#[test]
fn luks1_4096_is_refused_before_libcryptsetup() {
    let volume_key = SecretBytes::random(VOLUME_KEY_BYTES).unwrap();
    let passphrase = SecretBytes::random(44).unwrap();
    let error = format_header(
        &HeaderSpec {
            version: LuksVersion::Luks1,
            sector_size: 4096,
            pbkdf: Pbkdf::default(),
        },
        &volume_key,
        &passphrase,
        "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
    )
    .unwrap_err();
    assert_eq!(
        error.varlink_parameters().parameter.as_deref(),
        Some("sector_size")
    );
}
