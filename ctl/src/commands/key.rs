//! `imgctl key generate -o FILE`, `imgctl key fingerprint FILE` and
//! `imgctl key fingerprint --vhd FILE`.
//!
//! A generated key is 256 bits from the kernel's CSPRNG (getrandom), written as 44 characters of
//! standard padded base64 with no newline: exactly the form [`imgcrypt_proto::keyfile`] demands.
//! The file is created exclusively (an existing key may be the only way into some image, so it is
//! never replaced) with mode 0600, written, fsynced, and only then reported; on any failure or
//! interruption it is removed. Key bytes live in zeroised buffers and are never printed: only
//! the fingerprint (`sha256:` + base64 SHA-256 of the file's bytes) is.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use imgcrypt_proto::keyfile::{self, MAX_LEN};
use nix::sys::stat::{fchmod, Mode};
use zeroize::Zeroizing;

use crate::error::{CtlError, Result};
use crate::output;

/// Random bytes in a generated key.
const KEY_BYTES: usize = 32;
/// Base64 characters of [`KEY_BYTES`], with padding.
const KEY_TEXT_LEN: usize = KEY_BYTES.div_ceil(3) * 4;

/// `imgctl key …`.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeyCommand {
    /// Write a new random key (256 bits, base64, mode 0600) and print its fingerprint.
    Generate {
        /// The new key file; never overwritten.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
    },
    /// Print the fingerprint of a key file (sha256: + base64 SHA-256 of its bytes), or with
    /// --vhd the key hash a vhd-util-encrypted VHD made with it carries.
    Fingerprint {
        /// The key file.
        file: PathBuf,
        /// Print what `vhd-util key -C -k RAWKEY` prints for the key file's decoded bytes (the
        /// raw key a `--format vhd` image is encrypted with): SHA-256 of 32 zero bytes and the
        /// key, as 64 hex digits. Compare it with `vhd-util key -p -n IMAGE.vhd`.
        #[arg(long)]
        vhd: bool,
    },
}

/// Runs the command.
pub fn run(args: KeyArgs) -> Result<()> {
    match args.command {
        KeyCommand::Generate { output } => println!("sha256:{}", generate(&output)?),
        KeyCommand::Fingerprint { file, vhd: false } => {
            println!("sha256:{}", fingerprint_of_file(&file)?)
        }
        KeyCommand::Fingerprint { file, vhd: true } => println!("{}", vhd_key_hash_of_file(&file)?),
    }
    Ok(())
}

/// Writes a new key to `path` and returns its fingerprint (without the `sha256:` prefix).
pub fn generate(path: &Path) -> Result<String> {
    let mut raw = Zeroizing::new([0u8; KEY_BYTES]);
    getrandom::fill(&mut raw[..]).map_err(|e| {
        CtlError::Usage(format!(
            "cannot get random bytes from the kernel (getrandom): {e}"
        ))
    })?;
    let mut text = Zeroizing::new([0u8; KEY_TEXT_LEN]);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(&raw[..], &mut text[..])
        .expect("44 bytes hold the base64 of 32");
    debug_assert_eq!(written, KEY_TEXT_LEN);
    // Our own output obeys the rules every consumer checks; a failure here is a bug, reported
    // without the key.
    keyfile::validate(&text[..]).map_err(|rule| {
        CtlError::Usage(format!(
            "internal error: a generated key broke the rule '{}'",
            rule.rule()
        ))
    })?;

    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
    };
    let mut file = output::create_removed_on_interrupt(path, create).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CtlError::File {
                path: path.to_path_buf(),
                message: "already exists; imgctl never overwrites a key (images made with it \
                          may need it): choose another name"
                    .to_string(),
            }
        } else {
            CtlError::file(path, "create the key file", e)
        }
    })?;
    match write_durably(&mut file, path, &text[..]) {
        Ok(()) => {
            output::keep_on_interrupt(path, false);
            Ok(keyfile::fingerprint(&text[..]))
        }
        Err(error) => {
            drop(file);
            output::keep_on_interrupt(path, true);
            Err(error)
        }
    }
}

/// Sets mode 0600 whatever the umask, writes `bytes`, and makes the file and its name durable.
fn write_durably(file: &mut File, path: &Path, bytes: &[u8]) -> Result<()> {
    // The umask can only remove bits from the 0600 asked at creation, which could leave even the
    // owner unable to read the key; fchmod sets exactly 0600.
    fchmod(file.as_fd(), Mode::from_bits_truncate(0o600))
        .map_err(|e| CtlError::file(path, "set mode 0600 on the key file", e.into()))?;
    file.write_all(bytes)
        .map_err(|e| CtlError::file(path, "write the key file", e))?;
    file.sync_all()
        .map_err(|e| CtlError::file(path, "flush the key file to disk (fsync)", e))?;
    let directory = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(directory)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| CtlError::file(directory, "flush the new key's directory entry (fsync)", e))
}

/// The fingerprint (without `sha256:`) of a valid key file; a rule violation is reported with
/// that rule's message.
pub fn fingerprint_of_file(path: &Path) -> Result<String> {
    let bytes = read_valid_key_file(path)?;
    Ok(keyfile::fingerprint(&bytes))
}

/// The vhd-util key hash of a valid key file's decoded bytes: exactly what `vhd-util key -C -k`
/// prints (64 lower-case hex digits) for a file holding those raw bytes. The key file is read
/// by the same rules as for every other format (base64 on one line, no newline), the way
/// `imgctl encrypt --format vhd` reads it, and must decode to 32 or 64 bytes.
pub fn vhd_key_hash_of_file(path: &Path) -> Result<String> {
    let bytes = read_valid_key_file(path)?;
    let mut raw = Zeroizing::new([0u8; keyfile::RAW_KEY_AES256]);
    let len = keyfile::decode_raw_key(&bytes, &mut raw).map_err(|error| CtlError::File {
        path: path.to_path_buf(),
        message: error.to_string(),
    })?;
    Ok(keyfile::vhd_key_hash_hex(&raw[..len]))
}

/// The bytes of a key file that follows the key-file rules, in zeroised memory.
fn read_valid_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    // O_NONBLOCK: opening a FIFO must not hang waiting for a writer; it is refused below.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| CtlError::file(path, "open the key file", e))?;
    let metadata = file
        .metadata()
        .map_err(|e| CtlError::file(path, "read the key file's status", e))?;
    if !metadata.is_file() {
        return Err(CtlError::File {
            path: path.to_path_buf(),
            message: "is not a regular file: a key file must be a file".to_string(),
        });
    }
    // One byte past the limit is enough to know it is too long; the buffer never grows, so no
    // copy of the key is left behind in freed memory.
    let mut bytes = Zeroizing::new(vec![0u8; MAX_LEN + 1]);
    let mut filled = 0;
    let mut reader = file;
    while filled < bytes.len() {
        match reader.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CtlError::file(path, "read the key file", e)),
        }
    }
    if filled > MAX_LEN {
        let error = keyfile::KeyFileError::TooLong {
            len: metadata.len().max(filled as u64),
        };
        return Err(CtlError::File {
            path: path.to_path_buf(),
            message: error.to_string(),
        });
    }
    keyfile::validate(&bytes[..filled]).map_err(|error| CtlError::File {
        path: path.to_path_buf(),
        message: error.to_string(),
    })?;
    // Shrinks in place: no copy of the key is left in freed memory.
    bytes.truncate(filled);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    /// `sha256sum FILE` turned into base64 by `xxd -r -p | base64 -w0`: an implementation of
    /// the fingerprint that shares nothing with ours.
    fn coreutils_fingerprint(path: &Path) -> String {
        let output = Command::new("sh")
            .arg("-c")
            .arg("sha256sum \"$1\" | cut -d' ' -f1 | xxd -r -p | base64 -w0")
            .arg("sh")
            .arg(path)
            .output()
            .expect("sh, sha256sum, xxd and base64 must be installed");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn generated_key_is_44_base64_chars_mode_0600_and_valid_even_with_umask_0() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        // umask is process-wide, so other tests may briefly see it too: 0 only widens modes
        // nobody here relies on being narrow. (A restrictive umask, which would break
        // concurrent tests, is checked in a separate process by tests/keys.rs.)
        let old = nix::sys::stat::umask(Mode::empty());
        let result = generate(&path);
        nix::sys::stat::umask(old);
        let fingerprint = result.unwrap();

        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 44);
        assert!(!bytes.contains(&b'\n'));
        assert_eq!(keyfile::validate(&bytes), Ok(()));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&bytes)
            .unwrap();
        assert_eq!(decoded.len(), 32);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        assert_eq!(fingerprint, coreutils_fingerprint(&path));
        assert_eq!(fingerprint_of_file(&path).unwrap(), fingerprint);
    }

    #[test]
    fn generated_keys_differ() {
        let dir = tempfile::tempdir().unwrap();
        let a = generate(&dir.path().join("a")).unwrap();
        let b = generate(&dir.path().join("b")).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn generate_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, b"precious").unwrap();
        let error = generate(&path).unwrap_err().to_string();
        assert!(error.contains("already exists"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");

        // A dangling symlink is not followed to create its target.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        assert!(generate(&link).is_err());
        assert!(!dir.path().join("target").exists());
    }

    #[test]
    fn generate_into_missing_directory_fails_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("k");
        let error = generate(&path).unwrap_err().to_string();
        assert!(error.contains("create the key file"), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn fingerprint_reports_the_broken_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = b"q83vEjRWeJq8zd7wESIzRFVmd4iZqrvM3e7/ABEiM0Q=";
        let mut with_newline = key.to_vec();
        with_newline.push(b'\n');
        std::fs::write(&path, &with_newline).unwrap();
        let error = fingerprint_of_file(&path).unwrap_err().to_string();
        assert!(error.contains("ends with a newline"), "{error}");
        assert!(!error.contains("q83vEj"), "message quotes the key: {error}");

        std::fs::write(&path, vec![b'A'; 4096]).unwrap();
        let error = fingerprint_of_file(&path).unwrap_err().to_string();
        assert!(error.contains("4096 bytes"), "{error}");

        std::fs::write(&path, key).unwrap();
        assert_eq!(
            fingerprint_of_file(&path).unwrap(),
            coreutils_fingerprint(&path)
        );
        let error = fingerprint_of_file(dir.path()).unwrap_err().to_string();
        assert!(error.contains("not a regular file"), "{error}");
    }

    /// Unpacks `name` from the vhd-util corpus (beside the repository) into `dir`.
    fn corpus_file(dir: &Path, name: &str) -> std::path::PathBuf {
        let tarball = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/corpus/vhd-util/samples.tar.xz");
        let status = Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir)
            .arg(format!("./{name}"))
            .status()
            .unwrap();
        assert!(
            status.success(),
            "unpacking {name} from {}",
            tarball.display()
        );
        dir.join(name)
    }

    #[test]
    fn vhd_key_hash_is_what_vhd_util_printed_for_the_decoded_key() {
        let dir = tempfile::tempdir().unwrap();
        let printed = std::fs::read_to_string(corpus_file(dir.path(), "keyhash-C.txt")).unwrap();
        for (b64, bin) in [
            ("key32.b64", "key32.bin"),
            ("key64.b64", "key64.bin"),
            ("wrongkey32.b64", "wrongkey32.bin"),
        ] {
            // The corpus's DEK form ends with a newline; the key-file rules refuse it, and
            // the message says how to fix it.
            let with_newline = corpus_file(dir.path(), b64);
            let error = vhd_key_hash_of_file(&with_newline).unwrap_err().to_string();
            assert!(error.contains("ends with a newline"), "{error}");
            let text = std::fs::read(&with_newline).unwrap();
            let key = dir.path().join(format!("{b64}.key"));
            std::fs::write(&key, text.strip_suffix(b"\n").unwrap()).unwrap();
            // vhd-util printed "HASH"; the corpus recorded it as "RAWKEYFILE HASH".
            let expected = printed
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{bin} ")))
                .unwrap();
            assert_eq!(vhd_key_hash_of_file(&key).unwrap(), expected, "{b64}");
        }
    }

    #[test]
    fn vhd_key_hash_of_ibm_s_documented_example_is_the_hash_ibm_shows() {
        // ibm-cloud-docs/image-templates `create-encrypted-image.md`, steps 4-5: this DEK,
        // decoded into aes512.dek, makes `vhd-util key -C -k aes512.dek` print this hash.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dek");
        std::fs::write(
            &path,
            "Nrfen98EpMxF2B+wdgLfagzrqvgUZfMK4vL2T0NsT20ihrsNC9pUUHtizF6218pze8RLCgQ6kwxuE58IWLzgDA==",
        )
        .unwrap();
        assert_eq!(
            vhd_key_hash_of_file(&path).unwrap(),
            "21681bba94f04b33b112f5f90a0faa885a6d1dbf1bd68ed16c5b995143088eda"
        );
    }

    #[test]
    fn vhd_key_hash_refuses_keys_of_other_sizes_and_equal_halves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let encode = |raw: &[u8]| base64::engine::general_purpose::STANDARD.encode(raw);
        std::fs::write(&path, encode(&[7u8; 48])).unwrap();
        let error = vhd_key_hash_of_file(&path).unwrap_err().to_string();
        assert!(error.contains("decodes to 48 bytes"), "{error}");
        let half: Vec<u8> = (1..=32).collect();
        std::fs::write(&path, encode(&[half.clone(), half].concat())).unwrap();
        let error = vhd_key_hash_of_file(&path).unwrap_err().to_string();
        assert!(error.contains("halves are equal"), "{error}");
    }

    #[test]
    fn fingerprint_does_not_hang_on_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let error = fingerprint_of_file(&fifo).unwrap_err().to_string();
        assert!(error.contains("not a regular file"), "{error}");
    }
}
