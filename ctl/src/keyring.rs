//! The client's key ring: a TOML file naming key files, in the manner of gsutil's
//! customer-supplied keys.
//!
//! ```toml
//! encryption_key = "keys/current.key"
//! decryption_key1 = "keys/old.key"
//! decryption_key2 = "/srv/keys/older.key"
//! ```
//!
//! `--keyring FILE`, else `$XDG_CONFIG_HOME/imgcrypt/keys.toml` (default `~/.config`). Decryption
//! keys are numbered from 1 without gaps, at most 100; keys after a gap are ignored with a warning
//! naming them (gsutil's rule: a gap is most likely a key deleted by mistake, and guessing past it
//! would hide that). Unknown keys are errors, since a misspelt `encryption_key` would otherwise
//! silently leave no key. Relative paths resolve against the ring file's directory, so a ring and
//! its keys can move together.
//!
//! The ring holds paths only, never key bytes.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{CtlError, Result};

/// Most decryption keys a ring may name (`decryption_key1` … `decryption_key100`).
pub const MAX_DECRYPTION_KEYS: u32 = 100;

/// A ring file larger than this is refused: it names at most 101 paths.
const MAX_RING_BYTES: u64 = 1 << 20;

const ENCRYPTION_KEY: &str = "encryption_key";
const DECRYPTION_KEY_PREFIX: &str = "decryption_key";

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
        let mut text = String::new();
        file.take(MAX_RING_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| CtlError::file(path, "read the key ring (is it UTF-8 text?)", e))?;
        if text.len() as u64 > MAX_RING_BYTES {
            return Err(ring_error(
                path,
                format!("is larger than {MAX_RING_BYTES} bytes: a key ring only names key files"),
            ));
        }
        Keyring::parse(&text, path).map(Some)
    }
}

/// A parsed key ring: absolute (or ring-relative, resolved) paths of key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    /// The ring file.
    pub path: PathBuf,
    /// `encryption_key`: what new images and rotations use.
    pub encryption_key: Option<PathBuf>,
    /// `decryption_key1`, `decryption_key2`, … up to the first gap, in order.
    pub decryption_keys: Vec<PathBuf>,
    /// What the user should fix that does not stop the command (ignored keys).
    pub warnings: Vec<String>,
}

impl Keyring {
    /// Parses the text of the ring at `path` (used for messages and to resolve relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ring_error(path, format!("is not valid TOML: {e}")))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let resolve = |name: &str, value: &toml::Value| -> Result<PathBuf> {
            let text = value.as_str().ok_or_else(|| {
                ring_error(
                    path,
                    format!("{name} must be a string naming a key file, e.g. {name} = \"key\""),
                )
            })?;
            if text.is_empty() {
                return Err(ring_error(
                    path,
                    format!("{name} is empty: name a key file"),
                ));
            }
            Ok(base.join(text))
        };

        let mut encryption_key = None;
        let mut numbered = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut out_of_range = Vec::new();
        for (name, value) in &table {
            if name == ENCRYPTION_KEY {
                encryption_key = Some(resolve(name, value)?);
            } else if let Some(number) = decryption_key_number(name) {
                if (1..=MAX_DECRYPTION_KEYS).contains(&number) {
                    numbered.insert(number, resolve(name, value)?);
                } else {
                    out_of_range.push(name.as_str());
                }
            } else {
                unknown.push(name.as_str());
            }
        }
        if !unknown.is_empty() {
            return Err(ring_error(
                path,
                format!(
                    "unknown key{} {}: a key ring holds only {ENCRYPTION_KEY} and \
                     {DECRYPTION_KEY_PREFIX}1 … {DECRYPTION_KEY_PREFIX}{MAX_DECRYPTION_KEYS}",
                    if unknown.len() == 1 { "" } else { "s" },
                    unknown.join(", ")
                ),
            ));
        }
        if !out_of_range.is_empty() {
            return Err(ring_error(
                path,
                format!(
                    "{}: decryption keys are numbered {DECRYPTION_KEY_PREFIX}1 to \
                     {DECRYPTION_KEY_PREFIX}{MAX_DECRYPTION_KEYS} (at most \
                     {MAX_DECRYPTION_KEYS}, no leading zeros)",
                    out_of_range.join(", ")
                ),
            ));
        }

        let mut decryption_keys = Vec::new();
        let mut warnings = Vec::new();
        let first_gap = (1..).find(|n| !numbered.contains_key(n)).unwrap_or(1);
        let ignored: Vec<u32> = numbered.range(first_gap..).map(|(&n, _)| n).collect();
        for number in 1..first_gap {
            if let Some(key) = numbered.remove(&number) {
                decryption_keys.push(key);
            }
        }
        if let Some(&last_ignored) = ignored.last() {
            let names: Vec<String> = ignored
                .iter()
                .map(|n| format!("{DECRYPTION_KEY_PREFIX}{n}"))
                .collect();
            let missing = missing_ranges(&ignored, first_gap, last_ignored);
            warnings.push(format!(
                "{}: {} ignored: {} {} missing (numbering must have no gaps)",
                path.display(),
                names.join(", "),
                missing.join(", "),
                if missing.len() == 1 && !missing[0].contains("..") {
                    "is"
                } else {
                    "are"
                }
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            encryption_key,
            decryption_keys,
            warnings,
        })
    }
}

/// The number of a `decryption_keyN` name; `None` for anything else, including leading zeros
/// (`decryption_key01` would otherwise alias `decryption_key1`).
fn decryption_key_number(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(DECRYPTION_KEY_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.starts_with('0') {
        // Out of range rather than unknown, so the message explains the numbering.
        return Some(0);
    }
    // More digits than fit are simply out of range.
    Some(digits.parse().unwrap_or(u32::MAX))
}

/// The missing numbers from `from` to `to`, as `decryption_keyA..B` ranges.
fn missing_ranges(present: &[u32], from: u32, to: u32) -> Vec<String> {
    let mut ranges = Vec::new();
    let mut start = None;
    for n in from..=to + 1 {
        let missing = n <= to && !present.contains(&n);
        match (missing, start) {
            (true, None) => start = Some(n),
            (false, Some(first)) => {
                let last = n - 1;
                ranges.push(if first == last {
                    format!("{DECRYPTION_KEY_PREFIX}{first}")
                } else {
                    format!("{DECRYPTION_KEY_PREFIX}{first}..{last}")
                });
                start = None;
            }
            _ => {}
        }
    }
    ranges
}

fn ring_error(path: &Path, message: String) -> CtlError {
    CtlError::File {
        path: path.to_path_buf(),
        message,
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

    fn ring(text: &str) -> Result<Keyring> {
        Keyring::parse(text, Path::new("/etc/ring/keys.toml"))
    }

    fn decryption_lines(numbers: impl IntoIterator<Item = u32>) -> String {
        numbers
            .into_iter()
            .map(|n| format!("decryption_key{n} = \"/k/{n}\"\n"))
            .collect()
    }

    #[test]
    fn full_ring_in_order_with_relative_paths_resolved() {
        let parsed = ring(
            "encryption_key = \"current.key\"\n\
             decryption_key2 = \"/abs/two\"\n\
             decryption_key1 = \"old/one\"\n",
        )
        .unwrap();
        assert_eq!(
            parsed.encryption_key,
            Some(PathBuf::from("/etc/ring/current.key"))
        );
        assert_eq!(
            parsed.decryption_keys,
            vec![
                PathBuf::from("/etc/ring/old/one"),
                PathBuf::from("/abs/two")
            ]
        );
        assert!(parsed.warnings.is_empty());
    }

    #[test]
    fn relative_ring_path_resolves_relative_keys_beside_it() {
        let parsed = Keyring::parse("encryption_key = \"k\"", Path::new("conf/keys.toml")).unwrap();
        assert_eq!(parsed.encryption_key, Some(PathBuf::from("conf/k")));
        let bare = Keyring::parse("encryption_key = \"k\"", Path::new("keys.toml")).unwrap();
        assert_eq!(bare.encryption_key, Some(PathBuf::from("k")));
    }

    #[test]
    fn gap_ignores_later_keys_and_names_them() {
        let mut text = decryption_lines([1]);
        text += &decryption_lines([9, 10]);
        let parsed = ring(&text).unwrap();
        assert_eq!(parsed.decryption_keys, vec![PathBuf::from("/k/1")]);
        assert_eq!(
            parsed.warnings,
            vec![
                "/etc/ring/keys.toml: decryption_key9, decryption_key10 ignored: \
                 decryption_key2..8 are missing (numbering must have no gaps)"
                    .to_string()
            ]
        );
    }

    #[test]
    fn gap_warning_lists_every_missing_range() {
        let parsed = ring(&decryption_lines([1, 2, 4, 6, 7])).unwrap();
        assert_eq!(parsed.decryption_keys.len(), 2);
        let warning = &parsed.warnings[0];
        assert!(
            warning.contains("decryption_key4, decryption_key6, decryption_key7 ignored"),
            "{warning}"
        );
        assert!(
            warning.contains("decryption_key3, decryption_key5 are missing"),
            "{warning}"
        );
        let single = ring(&decryption_lines([2])).unwrap();
        assert!(single.decryption_keys.is_empty());
        assert!(
            single.warnings[0].contains("decryption_key2 ignored: decryption_key1 is missing"),
            "{:?}",
            single.warnings
        );
    }

    #[test]
    fn hundred_keys_accepted_more_refused() {
        let parsed = ring(&decryption_lines(1..=100)).unwrap();
        assert_eq!(parsed.decryption_keys.len(), 100);
        assert_eq!(parsed.decryption_keys[99], PathBuf::from("/k/100"));
        assert!(parsed.warnings.is_empty());

        let error = ring(&decryption_lines(1..=101)).unwrap_err().to_string();
        assert!(
            error.contains("decryption_key101") && error.contains("at most 100"),
            "{error}"
        );
        for name in [
            "decryption_key0",
            "decryption_key007",
            "decryption_key99999999999",
        ] {
            let error = ring(&format!("{name} = \"k\"")).unwrap_err().to_string();
            assert!(error.contains(name), "{error}");
        }
    }

    #[test]
    fn unknown_keys_are_errors_naming_them() {
        let error = ring("encryption_key = \"a\"\nencrypton_key = \"b\"\ndecryption_keyX = \"c\"")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unknown keys decryption_keyX, encrypton_key"),
            "{error}"
        );
        assert!(error.starts_with("/etc/ring/keys.toml: "), "{error}");
    }

    #[test]
    fn values_must_be_non_empty_strings_and_syntax_errors_say_toml() {
        let error = ring("encryption_key = 5").unwrap_err().to_string();
        assert!(error.contains("must be a string"), "{error}");
        let error = ring("decryption_key1 = \"\"").unwrap_err().to_string();
        assert!(error.contains("decryption_key1 is empty"), "{error}");
        let error = ring("encryption_key = ").unwrap_err().to_string();
        assert!(error.contains("not valid TOML"), "{error}");
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
                format!("{DECRYPTION_KEY_PREFIX}{}", index + 1),
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
