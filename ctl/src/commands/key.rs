//! `imgctl key generate -o FILE` and `imgctl key fingerprint FILE`.
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
    /// Print the fingerprint of a key file (sha256: + base64 SHA-256 of its bytes).
    Fingerprint {
        /// The key file.
        file: PathBuf,
    },
}

/// Runs the command.
pub fn run(args: KeyArgs) -> Result<()> {
    let fingerprint = match args.command {
        KeyCommand::Generate { output } => generate(&output)?,
        KeyCommand::Fingerprint { file } => fingerprint_of_file(&file)?,
    };
    println!("sha256:{fingerprint}");
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
    Ok(keyfile::fingerprint(&bytes[..filled]))
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

    #[test]
    fn fingerprint_does_not_hang_on_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let error = fingerprint_of_file(&fifo).unwrap_err().to_string();
        assert!(error.contains("not a regular file"), "{error}");
    }
}
