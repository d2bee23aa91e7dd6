//! The key ring format, shared by imgctl (the user's ring) and imgcryptd (the daemon's own ring):
//! a TOML file naming key files, in the manner of gsutil's customer-supplied keys.
//!
//! ```toml
//! encryption_key = "keys/current.key"
//! decryption_key1 = "keys/old.key"
//! decryption_key2 = "/srv/keys/older.key"
//! ```
//!
//! Decryption keys are numbered from 1 without gaps, at most 100; keys after a gap are ignored
//! with a warning naming them (gsutil's rule: a gap is most likely a key deleted by mistake, and
//! guessing past it would hide that). Unknown keys are errors, since a misspelt `encryption_key`
//! would otherwise silently leave no key. Relative paths resolve against the ring file's
//! directory, so a ring and its keys can move together.
//!
//! This module is the pure part: text (or a reader) and the ring's path in, resolved paths and
//! warnings out. Where a ring is found, and how its file may be opened, is each side's business.
//! The ring holds paths only, never key bytes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Most decryption keys a ring may name (`decryption_key1` … `decryption_key100`).
pub const MAX_DECRYPTION_KEYS: u32 = 100;

/// A ring file larger than this is refused: it names at most 101 paths.
pub const MAX_RING_BYTES: u64 = 1 << 20;

/// The name of the key new images (and rotations) use.
pub const ENCRYPTION_KEY: &str = "encryption_key";

/// The prefix of the numbered decryption keys.
pub const DECRYPTION_KEY_PREFIX: &str = "decryption_key";

/// A ring that cannot be used, with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct RingError {
    /// The ring file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub kind: RingErrorKind,
}

/// What is wrong with a ring. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RingErrorKind {
    /// The file could not be read, or is not UTF-8.
    #[error("cannot read the key ring (is it UTF-8 text?): {0}")]
    Read(#[source] std::io::Error),

    /// The file is implausibly large for a list of paths.
    #[error("is larger than {MAX_RING_BYTES} bytes: a key ring only names key files")]
    TooLarge,

    /// TOML syntax error.
    #[error("is not valid TOML: {0}")]
    NotToml(String),

    /// A key's value is not a string.
    #[error("{name} must be a string naming a key file, e.g. {name} = \"key\"")]
    NotAString {
        /// The ring key, e.g. `encryption_key`.
        name: String,
    },

    /// A key's value is the empty string.
    #[error("{name} is empty: name a key file")]
    EmptyPath {
        /// The ring key, e.g. `decryption_key1`.
        name: String,
    },

    /// Names that are neither `encryption_key` nor `decryption_keyN`.
    #[error(
        "unknown key{} {}: a key ring holds only {ENCRYPTION_KEY} and \
         {DECRYPTION_KEY_PREFIX}1 … {DECRYPTION_KEY_PREFIX}{MAX_DECRYPTION_KEYS}",
        if .0.len() == 1 { "" } else { "s" },
        .0.join(", ")
    )]
    UnknownKeys(Vec<String>),

    /// `decryption_key0`, `decryption_key101` and above, or a number with leading zeros.
    #[error(
        "{}: decryption keys are numbered {DECRYPTION_KEY_PREFIX}1 to \
         {DECRYPTION_KEY_PREFIX}{MAX_DECRYPTION_KEYS} (at most {MAX_DECRYPTION_KEYS}, \
         no leading zeros)",
        .0.join(", ")
    )]
    OutOfRange(Vec<String>),
}

/// A parsed key ring: the key files it names, resolved against the ring's directory.
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
    /// Reads at most [`MAX_RING_BYTES`] from `reader` and parses it as the ring at `path`.
    pub fn read(reader: impl Read, path: &Path) -> Result<Self, RingError> {
        let error = |kind| RingError {
            path: path.to_path_buf(),
            kind,
        };
        let mut text = String::new();
        reader
            .take(MAX_RING_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| error(RingErrorKind::Read(e)))?;
        if text.len() as u64 > MAX_RING_BYTES {
            return Err(error(RingErrorKind::TooLarge));
        }
        Self::parse(&text, path)
    }

    /// Parses the text of the ring at `path` (used for messages and to resolve relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Self, RingError> {
        let error = |kind| RingError {
            path: path.to_path_buf(),
            kind,
        };
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| error(RingErrorKind::NotToml(e.to_string())))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let resolve = |name: &str, value: &toml::Value| -> Result<PathBuf, RingError> {
            let name = name.to_string();
            match value.as_str() {
                None => Err(error(RingErrorKind::NotAString { name })),
                Some("") => Err(error(RingErrorKind::EmptyPath { name })),
                Some(text) => Ok(base.join(text)),
            }
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
                    out_of_range.push(name.clone());
                }
            } else {
                unknown.push(name.clone());
            }
        }
        if !unknown.is_empty() {
            return Err(error(RingErrorKind::UnknownKeys(unknown)));
        }
        if !out_of_range.is_empty() {
            return Err(error(RingErrorKind::OutOfRange(out_of_range)));
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
            let names: Vec<String> = ignored.iter().map(|&n| decryption_key_name(n)).collect();
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

    /// Every key the ring names with its ring name: `encryption_key` first, then
    /// `decryption_key1`, `decryption_key2`, … in order.
    pub fn entries(&self) -> Vec<(String, &Path)> {
        let encryption = self
            .encryption_key
            .as_deref()
            .map(|path| (ENCRYPTION_KEY.to_string(), path));
        let decryption = self
            .decryption_keys
            .iter()
            .zip(1..)
            .map(|(path, n)| (decryption_key_name(n), path.as_path()));
        encryption.into_iter().chain(decryption).collect()
    }
}

/// `decryption_keyN`.
pub fn decryption_key_name(number: u32) -> String {
    format!("{DECRYPTION_KEY_PREFIX}{number}")
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
                    decryption_key_name(first)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(text: &str) -> Result<Keyring, RingError> {
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
    fn entries_are_named_encryption_key_first_then_in_number_order() {
        let parsed =
            ring("decryption_key2 = \"two\"\nencryption_key = \"e\"\ndecryption_key1 = \"one\"\n")
                .unwrap();
        let names: Vec<(String, PathBuf)> = parsed
            .entries()
            .into_iter()
            .map(|(name, path)| (name, path.to_path_buf()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("encryption_key".to_string(), "/etc/ring/e".into()),
                ("decryption_key1".to_string(), "/etc/ring/one".into()),
                ("decryption_key2".to_string(), "/etc/ring/two".into()),
            ]
        );
        assert!(ring("").unwrap().entries().is_empty());
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

        let error = ring(&decryption_lines(1..=101)).unwrap_err();
        assert!(
            matches!(&error.kind, RingErrorKind::OutOfRange(names) if names == &["decryption_key101"]),
            "{error:?}"
        );
        let error = error.to_string();
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
            .unwrap_err();
        assert_eq!(error.path, Path::new("/etc/ring/keys.toml"));
        let error = error.to_string();
        assert!(
            error.contains("unknown keys decryption_keyX, encrypton_key"),
            "{error}"
        );
        assert!(error.starts_with("/etc/ring/keys.toml: "), "{error}");
        let error = ring("encrypton_key = \"b\"").unwrap_err().to_string();
        assert!(error.contains("unknown key encrypton_key:"), "{error}");
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
    fn reading_refuses_oversized_and_non_utf8_rings() {
        let path = Path::new("/r/keys.toml");
        let big = std::io::repeat(b' ').take(MAX_RING_BYTES + 10);
        let error = Keyring::read(big, path).unwrap_err();
        assert!(matches!(error.kind, RingErrorKind::TooLarge), "{error:?}");
        assert!(error.to_string().contains("larger than"), "{error}");

        let error = Keyring::read(&b"encryption_key = \"\xff\""[..], path).unwrap_err();
        assert!(matches!(error.kind, RingErrorKind::Read(_)), "{error:?}");

        let exactly_at_limit = "#".repeat(MAX_RING_BYTES as usize);
        let parsed = Keyring::read(exactly_at_limit.as_bytes(), path).unwrap();
        assert_eq!(parsed.encryption_key, None);
    }
}
