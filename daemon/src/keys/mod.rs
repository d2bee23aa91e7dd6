//! Key material: read from passed descriptors into locked, zeroised memory.
//!
//! The key file's bytes are the LUKS passphrase verbatim (as `cryptsetup --key-file` uses them);
//! [`imgcrypt_proto::keyfile`] holds the rules it must follow, shared with the client. [`ring`] is
//! the daemon's own key ring, used when a client passes no key.

pub mod fingerprint;
pub mod ring;
pub mod secret;
pub mod strength;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

use imgcrypt_proto::keyfile::{self, KeyFileError, MAX_LEN};

use crate::error::Descriptor;
use crate::sys::storage::{storage_kind, StorageKind};
use crate::{Error, Result};
pub use secret::SecretBytes;

/// A validated key file.
#[derive(Debug)]
pub struct KeyFile {
    /// The file's bytes: the LUKS passphrase.
    pub passphrase: SecretBytes,
    /// Base64 SHA-256 of the passphrase, to tell the user which key was used.
    pub fingerprint: String,
    /// Things the user should fix that do not stop the job, as text for them.
    pub warnings: Vec<String>,
}

impl KeyFile {
    /// A second copy in its own locked memory, for a job that hands one key to two users.
    pub fn duplicate(&self) -> Result<Self> {
        let mut passphrase = SecretBytes::zeroed(self.passphrase.len())?;
        passphrase
            .as_mut_bytes()
            .copy_from_slice(self.passphrase.as_bytes());
        Ok(Self {
            passphrase,
            fingerprint: self.fingerprint.clone(),
            warnings: Vec::new(),
        })
    }
}

/// The raw key of a vhd-util-style encrypted VHD: the key file's base64 decoded (32 bytes for
/// AES-128-XTS, 64 for AES-256-XTS), decoded straight into locked memory.
pub fn raw_vhd_key(key: &KeyFile) -> Result<SecretBytes> {
    let mut raw = SecretBytes::zeroed(keyfile::RAW_KEY_AES256)?;
    let out: &mut [u8; keyfile::RAW_KEY_AES256] = raw
        .as_mut_bytes()
        .try_into()
        .map_err(|_| Error::io("sizing the raw key buffer", std::io::ErrorKind::InvalidData))?;
    let len = keyfile::decode_raw_key(key.passphrase.as_bytes(), out)?;
    raw.truncate(len);
    Ok(raw)
}

/// A key offered to unlock an image, with the name the user knows it by (`encryption_key`,
/// `decryption_key2`, `--key-file`, `daemon:encryption_key`), for messages.
#[derive(Debug)]
pub struct CandidateKey {
    /// How the user names it.
    pub name: String,
    /// The key itself.
    pub key: KeyFile,
}

/// Reads and validates the key file behind a passed descriptor.
///
/// Reads with `pread` from offset 0, so the descriptor's shared offset (the client may hold the
/// same open file) neither matters nor moves. Reads at most [`MAX_LEN`] + 1 bytes, straight into
/// [`SecretBytes`]: a key never passes through the heap, and a huge file costs nothing. Only
/// regular files are accepted: a pipe or terminal could block forever and cannot be re-read.
pub fn read_key_file(file: &File) -> Result<KeyFile> {
    read_key_file_then(file, || {})
}

/// What must not change while a key file is read: a rewrite (truncate, write) changes at least
/// one of these, and a file that changed while we read it may have given us a prefix of the
/// old key, of the new one, or a mix — each of which could pass the key-file rules and become
/// a passphrase nobody holds.
fn stable_identity(metadata: &std::fs::Metadata) -> [i64; 7] {
    [
        metadata.dev() as i64,
        metadata.ino() as i64,
        metadata.size() as i64,
        metadata.mtime(),
        metadata.mtime_nsec(),
        metadata.ctime(),
        metadata.ctime_nsec(),
    ]
}

/// [`read_key_file`], running `between` after the bytes are read and before the file is checked
/// for changes (tests change the file there).
fn read_key_file_then(file: &File, between: impl FnOnce()) -> Result<KeyFile> {
    let kind = storage_kind(file)?;
    if kind != StorageKind::RegularFile {
        return Err(Error::bad_descriptor(
            Descriptor::Key,
            format!(
                "is {}, not a regular file: pass the key as a file \
                 (a pipe such as `<(...)` or standard input cannot be used)",
                kind.description()
            ),
        ));
    }
    let metadata = file
        .metadata()
        .map_err(|error| Error::io("reading the key file's status (fstat)", error))?;

    let mut buffer = SecretBytes::zeroed(MAX_LEN + 1)?;
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read_at(&mut buffer.as_mut_bytes()[filled..], filled as u64) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) if error.raw_os_error() == Some(libc::EBADF) => {
                return Err(Error::bad_descriptor(
                    Descriptor::Key,
                    "is not open for reading: open the key file read-only",
                ))
            }
            Err(error) => {
                return Err(Error::io(
                    format!("reading the key file at byte {filled}"),
                    error,
                ))
            }
        }
    }
    buffer.truncate(filled);
    between();
    let after = file
        .metadata()
        .map_err(|error| Error::io("reading the key file's status again (fstat)", error))?;
    if stable_identity(&after) != stable_identity(&metadata) {
        return Err(Error::bad_descriptor(
            Descriptor::Key,
            "changed while the daemon read it (rewritten or truncated meanwhile): write key \
             files under a temporary name and rename them into place, then try again",
        ));
    }

    // We stop reading one byte past the limit; report the file's real size when it is larger.
    if filled > MAX_LEN && metadata.len() > filled as u64 {
        return Err(KeyFileError::TooLong {
            len: metadata.len(),
        }
        .into());
    }
    keyfile::validate(buffer.as_bytes())?;

    let mut warnings = Vec::new();
    let mode = metadata.mode() & 0o7777;
    if mode & 0o044 != 0 {
        warnings.push(format!(
            "key file is readable by group/others (mode {mode:04o}): chmod 600 it"
        ));
    }
    Ok(KeyFile {
        fingerprint: fingerprint::fingerprint(buffer.as_bytes())?,
        passphrase: buffer,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::PermissionsExt;

    const KEY: &[u8] = b"q83vEjRWeJq8zd7wESIzRFVmd4iZqrvM3e7/ABEiM0Q=";

    fn key_file(content: &[u8], mode: u32) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(content).unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .unwrap();
        file
    }

    #[test]
    fn reads_a_valid_key_regardless_of_the_shared_offset() {
        let mut file = key_file(KEY, 0o600);
        // The client's write left the offset at the end; a `read` would see nothing.
        assert_eq!(file.stream_position().unwrap(), KEY.len() as u64);
        let key = read_key_file(&file).unwrap();
        assert_eq!(key.passphrase.as_bytes(), KEY);
        assert_eq!(key.fingerprint, keyfile::fingerprint(KEY));
        assert!(key.warnings.is_empty(), "{:?}", key.warnings);
        assert_eq!(file.stream_position().unwrap(), KEY.len() as u64);
        file.seek(SeekFrom::Start(3)).unwrap();
        assert_eq!(read_key_file(&file).unwrap().passphrase.as_bytes(), KEY);
    }

    #[test]
    fn a_key_file_rewritten_while_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, KEY).unwrap();
        let file = File::open(&path).unwrap();
        // Rewritten after our read: truncated to a 32-character prefix, itself a valid key.
        let error = read_key_file_then(&file, || {
            std::fs::write(&path, &KEY[..32]).unwrap();
        })
        .unwrap_err();
        assert!(
            matches!(&error, Error::BadDescriptor { descriptor: Descriptor::Key, message }
                if message.contains("changed while the daemon read it")),
            "{error:?}"
        );
        // Rewritten in place with the same length and other bytes: the times tell.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let error = read_key_file_then(&file, || {
            let other = b"AAAAEjRWeJq8zd7wESIzRFVmd4iZqrvM3e7/ABEiM0Q=";
            std::fs::write(&path, &other[..32]).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .write_all_at(&KEY[..32], 0)
                .unwrap();
        })
        .unwrap_err();
        assert!(error.to_string().contains("changed while"), "{error}");
        // Left alone, the same descriptor reads fine.
        assert_eq!(
            read_key_file(&file).unwrap().passphrase.as_bytes(),
            &KEY[..32]
        );
    }

    #[test]
    fn warns_when_others_can_read() {
        let key = read_key_file(&key_file(KEY, 0o644)).unwrap();
        assert_eq!(
            key.warnings,
            ["key file is readable by group/others (mode 0644): chmod 600 it"]
        );
        let key = read_key_file(&key_file(KEY, 0o640)).unwrap();
        assert_eq!(key.warnings.len(), 1);
        assert!(key.warnings[0].contains("0640"));
    }

    #[test]
    fn rule_violations_become_key_file_errors() {
        let mut with_newline = KEY.to_vec();
        with_newline.push(b'\n');
        let error = read_key_file(&key_file(&with_newline, 0o600)).unwrap_err();
        assert!(
            matches!(error, Error::KeyFile(KeyFileError::TrailingNewline)),
            "{error:?}"
        );
        assert_eq!(
            error.varlink_parameters().rule.as_deref(),
            Some("trailing-newline")
        );
        assert!(error
            .to_string()
            .starts_with("key file: ends with a newline"));
    }

    #[test]
    fn a_huge_file_reports_its_real_size() {
        let error = read_key_file(&key_file(&vec![b'A'; 100_000], 0o600)).unwrap_err();
        assert!(
            matches!(
                error,
                Error::KeyFile(KeyFileError::TooLong { len: 100_000 })
            ),
            "{error:?}"
        );
        // Just past the limit: the file was read whole, so the usual order of rules applies.
        let mut just_past = vec![b'A'; MAX_LEN];
        just_past.push(b'\n');
        let error = read_key_file(&key_file(&just_past, 0o600)).unwrap_err();
        assert!(matches!(
            error,
            Error::KeyFile(KeyFileError::TrailingNewline)
        ));
    }

    #[test]
    fn rejects_pipes_and_write_only_descriptors() {
        let (reader, _writer) = nix::unistd::pipe().unwrap();
        let error = read_key_file(&File::from(reader)).unwrap_err();
        assert!(
            matches!(&error, Error::BadDescriptor { descriptor: Descriptor::Key, message }
                if message.contains("pipe")),
            "{error:?}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, KEY).unwrap();
        let write_only = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let error = read_key_file(&write_only).unwrap_err();
        assert!(
            matches!(&error, Error::BadDescriptor { message, .. } if message.contains("not open for reading")),
            "{error:?}"
        );
    }
}
