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

/// The name a `--key-file` candidate goes by in messages and in the daemon's replies.
pub const KEY_FILE_NAME: &str = "--key-file";

/// A key file offered to the daemon: the name the user knows it by, and its path.
pub type Candidate = (String, PathBuf);

/// The keys to unlock an image with, in the order the daemon tries them: `--key-file` alone when
/// given (it overrides the ring), else the ring's `encryption_key` then `decryption_key1` … in
/// ring order. A file named twice (gsutil allows a key to be both the encryption key and a
/// decryption key) is offered once, under its first name. No ring and no `--key-file` gives no
/// candidates: the daemon then falls back on its own ring, or answers `NoKey`.
/// Returns the candidates and the ring's warnings for the caller to show.
pub fn unlock_candidates(
    key_file: Option<PathBuf>,
    ring: &RingLocation,
) -> Result<(Vec<Candidate>, Vec<String>)> {
    // As in `encryption_key`: an explicit ring is read even when --key-file makes it
    // unnecessary, so a mistyped --keyring is reported.
    let loaded = match (&key_file, ring) {
        (Some(_), RingLocation::Default(_) | RingLocation::Unknown) => None,
        _ => ring.load()?,
    };
    let warnings = loaded
        .as_ref()
        .map(|r| r.warnings.clone())
        .unwrap_or_default();
    if let Some(path) = key_file {
        return Ok((vec![(KEY_FILE_NAME.to_string(), path)], warnings));
    }
    Ok((
        loaded.as_ref().map(ring_order).unwrap_or_default(),
        warnings,
    ))
}

/// Keys for `rewrite -k`: which to unlock with, and which to rotate to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationKeys {
    /// Keys to unlock with, in the order the daemon tries them; each path once.
    pub candidates: Vec<Candidate>,
    /// The ring's `encryption_key`, which the image is rotated to; `None` when there is no ring
    /// (the daemon's own ring then supplies it).
    pub new_key: Option<PathBuf>,
    /// The ring's warnings, for the caller to show.
    pub warnings: Vec<String>,
}

/// The keys of a rotation. The new key is always the ring's `encryption_key` (`--key-file`
/// names the OLD key, as gsutil's `rewrite -k` takes the new key from the configuration): a ring
/// without one is an error before anything is opened. With `--key-file OLD` the candidates are
/// OLD then the new key (so a rerun after an interruption, when only the new key may still open
/// the image, succeeds); otherwise the ring order of [`unlock_candidates`].
pub fn rotation_keys(key_file: Option<PathBuf>, location: &RingLocation) -> Result<RotationKeys> {
    let ring = location.load()?;
    let Some(ring) = ring else {
        let candidates = key_file
            .map(|path| vec![(KEY_FILE_NAME.to_string(), path)])
            .unwrap_or_default();
        return Ok(RotationKeys {
            candidates,
            new_key: None,
            warnings: Vec::new(),
        });
    };
    let Some(new_key) = ring.encryption_key.clone() else {
        return Err(CtlError::Usage(format!(
            "{} has no {ENCRYPTION_KEY}: rewrite -k rotates images to it; add \
             {ENCRYPTION_KEY} = \"NEW.key\" (make one with `imgctl key generate -o NEW.key`)",
            ring.path.display()
        )));
    };
    let candidates = match key_file {
        Some(old) => dedup_by_path([
            (KEY_FILE_NAME.to_string(), old),
            (ENCRYPTION_KEY.to_string(), new_key.clone()),
        ]),
        None => ring_order(&ring),
    };
    Ok(RotationKeys {
        candidates,
        new_key: Some(new_key),
        warnings: ring.warnings,
    })
}

/// `encryption_key` then `decryption_key1` … , each path once under its first name.
fn ring_order(ring: &Keyring) -> Vec<Candidate> {
    let encryption = ring
        .encryption_key
        .iter()
        .map(|path| (ENCRYPTION_KEY.to_string(), path.clone()));
    // decryption_keys holds decryption_key1 … in order, without gaps.
    let decryption = ring
        .decryption_keys
        .iter()
        .enumerate()
        .map(|(index, path)| {
            (
                format!(
                    "{}{}",
                    imgcrypt_proto::keyring::DECRYPTION_KEY_PREFIX,
                    index + 1
                ),
                path.clone(),
            )
        });
    dedup_by_path(encryption.chain(decryption))
}

fn dedup_by_path(candidates: impl IntoIterator<Item = Candidate>) -> Vec<Candidate> {
    let mut kept: Vec<Candidate> = Vec::new();
    for (name, path) in candidates {
        if !kept.iter().any(|(_, seen)| *seen == path) {
            kept.push((name, path));
        }
    }
    kept
}

#[cfg(test)]
mod candidate_tests {
    use super::*;
    use std::path::Path;

    fn ring_file(dir: &Path, text: &str) -> RingLocation {
        let path = dir.join("keys.toml");
        std::fs::write(&path, text).unwrap();
        RingLocation::Explicit(path)
    }

    fn names(candidates: &[Candidate]) -> Vec<&str> {
        candidates.iter().map(|(name, _)| name.as_str()).collect()
    }

    #[test]
    fn ring_order_is_encryption_key_then_decryption_keys() {
        let dir = tempfile::tempdir().unwrap();
        let location = ring_file(
            dir.path(),
            "decryption_key2 = \"two\"\nencryption_key = \"new\"\ndecryption_key1 = \"one\"\n",
        );
        let (candidates, warnings) = unlock_candidates(None, &location).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(
            candidates,
            vec![
                ("encryption_key".to_string(), dir.path().join("new")),
                ("decryption_key1".to_string(), dir.path().join("one")),
                ("decryption_key2".to_string(), dir.path().join("two")),
            ]
        );
    }

    #[test]
    fn key_file_overrides_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let location = ring_file(
            dir.path(),
            "encryption_key = \"new\"\ndecryption_key1 = \"a\"",
        );
        let (candidates, _) = unlock_candidates(Some("/k/mine".into()), &location).unwrap();
        assert_eq!(
            candidates,
            vec![("--key-file".to_string(), PathBuf::from("/k/mine"))]
        );
        // A missing explicit ring is still reported, as encrypt does.
        let missing = RingLocation::Explicit(dir.path().join("nope.toml"));
        assert!(unlock_candidates(Some("/k/mine".into()), &missing).is_err());
    }

    #[test]
    fn a_key_named_twice_is_offered_once_under_its_first_name() {
        let dir = tempfile::tempdir().unwrap();
        let location = ring_file(
            dir.path(),
            "encryption_key = \"same\"\ndecryption_key1 = \"same\"\ndecryption_key2 = \"old\"\n\
             decryption_key3 = \"old\"\n",
        );
        let (candidates, _) = unlock_candidates(None, &location).unwrap();
        assert_eq!(names(&candidates), ["encryption_key", "decryption_key2"]);
        assert_eq!(candidates[1].1, dir.path().join("old"));
    }

    #[test]
    fn no_ring_and_no_key_file_gives_no_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let absent = RingLocation::Default(dir.path().join("keys.toml"));
        assert_eq!(unlock_candidates(None, &absent).unwrap(), (vec![], vec![]));
        assert_eq!(
            unlock_candidates(None, &RingLocation::Unknown).unwrap(),
            (vec![], vec![])
        );
    }

    #[test]
    fn ring_warnings_are_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let location = ring_file(
            dir.path(),
            "decryption_key1 = \"a\"\ndecryption_key3 = \"c\"",
        );
        let (candidates, warnings) = unlock_candidates(None, &location).unwrap();
        assert_eq!(names(&candidates), ["decryption_key1"]);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("decryption_key3 ignored"),
            "{warnings:?}"
        );
    }

    #[test]
    fn rotation_takes_the_new_key_from_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let location = ring_file(
            dir.path(),
            "encryption_key = \"new\"\ndecryption_key1 = \"old\"",
        );
        let keys = rotation_keys(None, &location).unwrap();
        assert_eq!(keys.new_key, Some(dir.path().join("new")));
        assert_eq!(
            names(&keys.candidates),
            ["encryption_key", "decryption_key1"]
        );

        let keys = rotation_keys(Some("/k/old".into()), &location).unwrap();
        assert_eq!(
            keys.candidates,
            vec![
                ("--key-file".to_string(), PathBuf::from("/k/old")),
                ("encryption_key".to_string(), dir.path().join("new")),
            ]
        );

        // --key-file naming the new key itself: one candidate.
        let keys = rotation_keys(Some(dir.path().join("new")), &location).unwrap();
        assert_eq!(names(&keys.candidates), ["--key-file"]);
    }

    #[test]
    fn rotation_without_a_new_key_in_the_ring_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let location = ring_file(dir.path(), "decryption_key1 = \"old\"");
        let error = rotation_keys(Some("/k/old".into()), &location).unwrap_err();
        assert!(matches!(error, CtlError::Usage(_)));
        assert!(
            error.to_string().contains("has no encryption_key"),
            "{error}"
        );
    }

    #[test]
    fn rotation_without_a_ring_leaves_the_new_key_to_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let absent = RingLocation::Default(dir.path().join("keys.toml"));
        let keys = rotation_keys(Some("/k/old".into()), &absent).unwrap();
        assert_eq!(keys.new_key, None);
        assert_eq!(names(&keys.candidates), ["--key-file"]);
        assert!(rotation_keys(None, &absent).unwrap().candidates.is_empty());
    }
}
