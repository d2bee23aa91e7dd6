//! The client's key ring: which ring file imgctl reads, and how its failures are reported.
//!
//! `--keyring FILE`, else `$XDG_CONFIG_HOME/imgcrypt/keys.toml` (default `~/.config`). The format
//! and its rules (gsutil's numbering, relative paths beside the ring) live in
//! [`imgcrypt_proto::keyring`], shared with the daemon's own ring; this module only finds and
//! reads the file and maps its errors to [`CtlError`].
//!
//! The ring holds paths only, never key bytes.

use std::ffi::OsString;
use std::path::PathBuf;

pub use imgcrypt_proto::keyring::Keyring;
use imgcrypt_proto::keyring::{RingError, RingErrorKind, ENCRYPTION_KEY};

use crate::error::{CtlError, Result};

/// Where the ring comes from: an explicit `--keyring` must exist, the default need not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingLocation {
    /// Given with `--keyring`.
    Explicit(PathBuf),
    /// The per-user default.
    Default(PathBuf),
    /// No `--keyring` and neither `XDG_CONFIG_HOME` nor `HOME` is set.
    Unknown,
}

impl RingLocation {
    /// From `--keyring` and the process environment.
    pub fn from_environment(explicit: Option<PathBuf>) -> Self {
        Self::new(
            explicit,
            std::env::var_os("XDG_CONFIG_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// From `--keyring`, `XDG_CONFIG_HOME` and `HOME`. A relative or empty `XDG_CONFIG_HOME` is
    /// ignored, as the XDG base-directory specification requires.
    pub fn new(
        explicit: Option<PathBuf>,
        xdg_config: Option<OsString>,
        home: Option<OsString>,
    ) -> Self {
        if let Some(path) = explicit {
            return Self::Explicit(path);
        }
        let config = xdg_config
            .map(PathBuf::from)
            .filter(|dir| dir.is_absolute())
            .or_else(|| {
                home.filter(|home| !home.is_empty())
                    .map(|home| PathBuf::from(home).join(".config"))
            });
        match config {
            Some(config) => Self::Default(config.join("imgcrypt").join("keys.toml")),
            None => Self::Unknown,
        }
    }

    /// How messages name the ring.
    pub fn describe(&self) -> String {
        match self {
            Self::Explicit(path) | Self::Default(path) => path.display().to_string(),
            Self::Unknown => "a key ring (--keyring FILE; HOME is not set)".to_string(),
        }
    }

    /// Reads and parses the ring. `Ok(None)` when the default ring does not exist.
    pub fn load(&self) -> Result<Option<Keyring>> {
        let path = match self {
            Self::Explicit(path) | Self::Default(path) => path,
            Self::Unknown => return Ok(None),
        };
        let file = match std::fs::File::open(path) {
            Err(error)
                if error.kind() == std::io::ErrorKind::NotFound
                    && matches!(self, Self::Default(_)) =>
            {
                return Ok(None)
            }
            Err(error) => return Err(CtlError::file(path, "open the key ring", error)),
            Ok(file) => file,
        };
        Ok(Some(Keyring::read(file, path)?))
    }
}

impl From<RingError> for CtlError {
    /// A ring's own error names its file; a read failure gets the usual hints.
    fn from(error: RingError) -> Self {
        match error.kind {
            RingErrorKind::Read(io) => {
                CtlError::file(error.path, "read the key ring (is it UTF-8 text?)", io)
            }
            kind => CtlError::File {
                path: error.path,
                message: kind.to_string(),
            },
        }
    }
}

/// The key file `encrypt` (and later, rotation) uses: `--key-file`, else the ring's
/// `encryption_key`. With neither it is an error: imgctl never writes an unencrypted image.
/// Returns the path and the ring's warnings for the caller to show.
pub fn encryption_key(
    key_file: Option<PathBuf>,
    location: &RingLocation,
) -> Result<(PathBuf, Vec<String>)> {
    // An explicit ring is always read, so a mistyped --keyring is reported even when
    // --key-file makes it unnecessary.
    let ring = match (&key_file, location) {
        (Some(_), RingLocation::Default(_) | RingLocation::Unknown) => None,
        _ => location.load()?,
    };
    let warnings = ring
        .as_ref()
        .map(|r| r.warnings.clone())
        .unwrap_or_default();
    if let Some(path) = key_file {
        return Ok((path, warnings));
    }
    match ring.and_then(|ring| ring.encryption_key) {
        Some(path) => Ok((path, warnings)),
        None => Err(CtlError::Usage(format!(
            "no key: pass --key-file FILE or set {ENCRYPTION_KEY} in {}",
            location.describe()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_errors_name_the_file_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "encrypton_key = \"a\"\n").unwrap();
        let error = RingLocation::Explicit(path.clone()).load().unwrap_err();
        assert!(
            matches!(&error, CtlError::File { path: p, .. } if p == &path),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "{}: unknown key encrypton_key: a key ring holds only encryption_key and \
                 decryption_key1 … decryption_key100",
                path.display()
            )
        );
        std::fs::write(&path, b"encryption_key = \"\xff\"").unwrap();
        let error = RingLocation::Explicit(path).load().unwrap_err().to_string();
        assert!(
            error.contains("cannot read the key ring (is it UTF-8 text?)"),
            "{error}"
        );
    }

    #[test]
    fn default_location_follows_xdg_then_home() {
        let at = |xdg: Option<&str>, home: Option<&str>| {
            RingLocation::new(None, xdg.map(Into::into), home.map(Into::into))
        };
        assert_eq!(
            at(Some("/x"), Some("/h")),
            RingLocation::Default("/x/imgcrypt/keys.toml".into())
        );
        assert_eq!(
            at(Some("relative"), Some("/h")),
            RingLocation::Default("/h/.config/imgcrypt/keys.toml".into())
        );
        assert_eq!(
            at(Some(""), Some("/h")),
            RingLocation::Default("/h/.config/imgcrypt/keys.toml".into())
        );
        assert_eq!(at(None, None), RingLocation::Unknown);
        assert_eq!(
            RingLocation::new(Some("r.toml".into()), Some("/x".into()), None),
            RingLocation::Explicit("r.toml".into())
        );
    }

    #[test]
    fn missing_default_ring_is_fine_until_a_key_is_needed() {
        let dir = tempfile::tempdir().unwrap();
        let location = RingLocation::Default(dir.path().join("keys.toml"));
        assert_eq!(location.load().unwrap(), None);
        let (path, _) = encryption_key(Some("k".into()), &location).unwrap();
        assert_eq!(path, PathBuf::from("k"));
        let error = encryption_key(None, &location).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "no key: pass --key-file FILE or set encryption_key in {}",
                dir.path().join("keys.toml").display()
            )
        );
    }

    #[test]
    fn missing_explicit_ring_is_an_error_even_with_a_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let location = RingLocation::Explicit(dir.path().join("nope.toml"));
        let error = location.load().unwrap_err().to_string();
        assert!(
            error.contains("nope.toml") && error.contains("open the key ring"),
            "{error}"
        );
        assert!(encryption_key(Some("k".into()), &location).is_err());
    }

    #[test]
    fn ring_supplies_the_encryption_key_and_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(
            &path,
            "encryption_key = \"a.key\"\ndecryption_key2 = \"b\"\n",
        )
        .unwrap();
        let (key, warnings) = encryption_key(None, &RingLocation::Explicit(path)).unwrap();
        assert_eq!(key, dir.path().join("a.key"));
        assert_eq!(warnings.len(), 1);

        // A ring without encryption_key is no key at all.
        let path = dir.path().join("only-old.toml");
        std::fs::write(&path, "decryption_key1 = \"b\"\n").unwrap();
        let error = encryption_key(None, &RingLocation::Explicit(path))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("no key: pass --key-file FILE"), "{error}");
    }

    #[test]
    fn oversized_ring_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        let error = RingLocation::Explicit(path).load().unwrap_err().to_string();
        assert!(error.contains("larger than"), "{error}");
    }
}
