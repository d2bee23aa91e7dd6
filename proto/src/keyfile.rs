//! Key files, by the seed procedure's rules: the file's bytes are the LUKS passphrase verbatim
//! (as `cryptsetup --key-file` uses them), and must be 32 to 512 characters of RFC 4648 base64
//! with padding, on a single line with no trailing newline or whitespace.
//!
//! The fingerprint is the base64 SHA-256 of those bytes: the same bytes cryptsetup uses, so a key
//! is recognised by what actually unlocks the image.
//!
//! Why so strict when cryptsetup would take any bytes: the same key is given to other parties
//! (the cloud's import service decodes it as base64 key material), and the usual mistakes — a
//! newline from `echo`, a Windows line ending, `base64` wrapping at 76 columns — silently change
//! the passphrase. Rejecting them here, with the fix in the message, is cheaper than an image
//! nobody can open.
//!
//! The checks run in a fixed order so the most helpful message wins: a key with a trailing
//! newline is told about the newline, not that byte 44 is "not base64".
//!
//! Encoding must also be canonical (the unused low bits of the last character zero, as every
//! standard encoder writes them). Base64 decoders drop those bits, so a non-canonical key decodes
//! to the same key material as a different text: a party that decodes and re-encodes the key
//! would derive another passphrase than the one in the LUKS keyslot.

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Fewest bytes a key file may hold.
pub const MIN_LEN: usize = 32;
/// Most bytes a key file may hold.
pub const MAX_LEN: usize = 512;

/// How to make a good key, quoted by the messages that send the user back to square one.
const GENERATE_HINT: &str = "generate one with `imgctl key generate -o key` \
     (or `head -c 32 /dev/urandom | base64 -w0 > key; chmod 600 key`)";

/// A broken key-file rule. Messages never quote key bytes; they give offsets and lengths only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The file has no bytes.
    #[error("is empty: {GENERATE_HINT}")]
    Empty,

    /// Starts with a UTF-8 byte-order mark, as some Windows editors write.
    #[error(
        "starts with a UTF-8 byte-order mark (saved by a Windows editor?): \
         save it without BOM, or rewrite it with `base64 -w0`; \
         cryptsetup would use the mark as part of the passphrase"
    )]
    ByteOrderMark,

    /// Contains a carriage return.
    #[error(
        "contains a carriage return at byte {offset} (Windows line ending?): \
         remove it with `tr -d '\\r\\n' < key > key.new`; \
         cryptsetup would use it as part of the passphrase"
    )]
    CarriageReturn {
        /// Byte offset of the first carriage return.
        offset: usize,
    },

    /// Ends with a line feed.
    #[error(
        "ends with a newline: write it with `echo -n` or `base64 -w0` \
         (cryptsetup would use the newline as part of the passphrase)"
    )]
    TrailingNewline,

    /// A line feed before the end: more than one line.
    #[error(
        "has a line break at byte {offset}: a key must be a single line \
         (plain `base64` wraps at 76 characters; use `base64 -w0`)"
    )]
    MultipleLines {
        /// Byte offset of the first line feed.
        offset: usize,
    },

    /// Ends with spaces or tabs.
    #[error(
        "ends with whitespace (from byte {offset}): remove it \
         (cryptsetup would use it as part of the passphrase)"
    )]
    TrailingWhitespace {
        /// Byte offset where the trailing whitespace starts.
        offset: usize,
    },

    /// Fewer than [`MIN_LEN`] bytes.
    #[error(
        "is {len} bytes; keys must be {MIN_LEN} to {MAX_LEN} base64 characters: {GENERATE_HINT}"
    )]
    TooShort {
        /// The file's length.
        len: u64,
    },

    /// More than [`MAX_LEN`] bytes.
    #[error(
        "is {len} bytes; keys must be {MIN_LEN} to {MAX_LEN} base64 characters: {GENERATE_HINT}"
    )]
    TooLong {
        /// The file's length (or a lower bound when only part of it was read).
        len: u64,
    },

    /// A `-` or `_`: the URL-safe alphabet, not the standard one.
    #[error(
        "character at byte {offset} is from the URL-safe base64 alphabet (- or _): \
         keys use the RFC 4648 standard alphabet (A–Z a–z 0–9 + /); \
         convert with `tr -- '-_' '+/' < key > key.new`"
    )]
    UrlSafeAlphabet {
        /// Byte offset of the first such character.
        offset: usize,
    },

    /// A byte outside the base64 alphabet.
    #[error(
        "character at byte {offset} is not base64 \
         (RFC 4648 standard alphabet: A–Z a–z 0–9 + /): {GENERATE_HINT}"
    )]
    NotBase64 {
        /// Byte offset of the first such byte.
        offset: usize,
    },

    /// A `=` followed by something other than `=`.
    #[error(
        "has '=' padding at byte {offset} followed by more characters: \
         '=' may only end the key (were two keys joined?)"
    )]
    MisplacedPadding {
        /// Byte offset of the first `=`.
        offset: usize,
    },

    /// Three or more `=` at the end.
    #[error("ends with {count} '=': base64 padding is at most two '=': {GENERATE_HINT}")]
    TooMuchPadding {
        /// How many `=` end the key.
        count: usize,
    },

    /// Length not a multiple of four: missing or extra characters, or padding stripped.
    #[error(
        "is {len} characters, not a multiple of 4 as padded base64 always is: \
         was the trailing '=' padding removed, or a character lost? {GENERATE_HINT}"
    )]
    BadLength {
        /// The file's length.
        len: usize,
    },

    /// The last character carries bits that decoders drop.
    #[error(
        "is not canonical base64: the character before the '=' padding has bits set that \
         decoders ignore, so tools that decode and re-encode the key get a different passphrase; \
         re-encode the key material with `base64 -d < key | base64 -w0`, or {GENERATE_HINT}"
    )]
    NonCanonical,

    /// For a vhd-util VHD: the base64 decodes to neither 32 nor 64 bytes.
    #[error(
        "decodes to {len} bytes, but a VHD encrypted the way vhd-util does (IBM Cloud classic) \
         uses the decoded key itself as the AES-XTS key: it must decode to exactly 32 bytes \
         (AES-128-XTS) or 64 bytes (AES-256-XTS); {RAW_KEY_HINT}"
    )]
    RawKeyLength {
        /// Bytes the key file decodes to.
        len: usize,
    },

    /// For a vhd-util VHD: the decoded key's two halves are equal.
    #[error(
        "decodes to a key whose two halves are equal: AES-XTS refuses such a key (its data and \
         tweak keys would be the same; vhd-util crashes on it); {RAW_KEY_HINT}"
    )]
    RawKeyHalvesEqual,
}

/// How to make a key for a vhd-util VHD, quoted by the raw-key messages.
const RAW_KEY_HINT: &str = "generate one with \
     `head -c 64 /dev/urandom | base64 -w0 > key; chmod 600 key` (64 bytes: AES-256-XTS)";

/// Raw key bytes of a vhd-util VHD for AES-128-XTS.
pub const RAW_KEY_AES128: usize = 32;
/// Raw key bytes of a vhd-util VHD for AES-256-XTS; also the most a raw key holds.
pub const RAW_KEY_AES256: usize = 64;

impl KeyFileError {
    /// Short machine-readable name of the rule.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::ByteOrderMark => "byte-order-mark",
            Self::CarriageReturn { .. } => "carriage-return",
            Self::TrailingNewline => "trailing-newline",
            Self::MultipleLines { .. } => "multiple-lines",
            Self::TrailingWhitespace { .. } => "trailing-whitespace",
            Self::TooShort { .. } => "too-short",
            Self::TooLong { .. } => "too-long",
            Self::UrlSafeAlphabet { .. } => "url-safe-alphabet",
            Self::NotBase64 { .. } => "not-base64",
            Self::MisplacedPadding { .. } => "misplaced-padding",
            Self::TooMuchPadding { .. } => "too-much-padding",
            Self::BadLength { .. } => "bad-length",
            Self::NonCanonical => "non-canonical",
            Self::RawKeyLength { .. } => "raw-key-length",
            Self::RawKeyHalvesEqual => "raw-key-halves-equal",
        }
    }
}

/// Position of the first byte matching `predicate`.
fn find(bytes: &[u8], predicate: impl Fn(u8) -> bool) -> Option<usize> {
    bytes.iter().position(|&byte| predicate(byte))
}

/// Value of a character of the standard base64 alphabet.
fn base64_value(byte: u8) -> Option<u8> {
    match byte {
        b'A'..=b'Z' => Some(byte - b'A'),
        b'a'..=b'z' => Some(byte - b'a' + 26),
        b'0'..=b'9' => Some(byte - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Checks every rule, in the order that gives the most helpful message first.
pub fn validate(bytes: &[u8]) -> Result<(), KeyFileError> {
    if bytes.is_empty() {
        return Err(KeyFileError::Empty);
    }
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err(KeyFileError::ByteOrderMark);
    }
    // Line-ending mistakes before the length: a 512-character key plus "\n" is a newline
    // problem, not a length problem.
    if let Some(offset) = find(bytes, |b| b == b'\r') {
        return Err(KeyFileError::CarriageReturn { offset });
    }
    if bytes.ends_with(b"\n") {
        return Err(KeyFileError::TrailingNewline);
    }
    if let Some(offset) = find(bytes, |b| b == b'\n') {
        return Err(KeyFileError::MultipleLines { offset });
    }
    let content_end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |last| last + 1);
    if content_end < bytes.len() {
        return Err(KeyFileError::TrailingWhitespace {
            offset: content_end,
        });
    }

    let len = bytes.len() as u64;
    if bytes.len() < MIN_LEN {
        return Err(KeyFileError::TooShort { len });
    }
    if bytes.len() > MAX_LEN {
        return Err(KeyFileError::TooLong { len });
    }

    if let Some(offset) = find(bytes, |b| b == b'-' || b == b'_') {
        return Err(KeyFileError::UrlSafeAlphabet { offset });
    }
    if let Some(offset) = find(bytes, |b| b != b'=' && base64_value(b).is_none()) {
        return Err(KeyFileError::NotBase64 { offset });
    }

    let data_end = find(bytes, |b| b == b'=').unwrap_or(bytes.len());
    if bytes[data_end..].iter().any(|&b| b != b'=') {
        return Err(KeyFileError::MisplacedPadding { offset: data_end });
    }
    let padding = bytes.len() - data_end;
    if padding > 2 {
        return Err(KeyFileError::TooMuchPadding { count: padding });
    }
    if bytes.len() % 4 != 0 {
        return Err(KeyFileError::BadLength { len: bytes.len() });
    }

    // With one '=' the last character holds 4 data bits and 2 unused; with two, 2 and 4.
    let unused_bits_mask = match padding {
        1 => 0b0000_0011,
        2 => 0b0000_1111,
        _ => 0,
    };
    let last_value = base64_value(bytes[data_end - 1]).unwrap_or(0);
    if last_value & unused_bits_mask != 0 {
        return Err(KeyFileError::NonCanonical);
    }
    Ok(())
}

/// The raw key a vhd-util-style encrypted VHD uses: a key file's base64, decoded into `out`.
/// Returns how many bytes of `out` hold the key (32 or 64).
///
/// The key file must first pass [`validate`], so the same file serves every output format
/// (and a text another tool would decode differently is refused). Its length is checked
/// before anything is decoded, so `out` is the only place the key material is written:
/// callers pass zeroised memory.
pub fn decode_raw_key(bytes: &[u8], out: &mut [u8; RAW_KEY_AES256]) -> Result<usize, KeyFileError> {
    validate(bytes)?;
    let padding = bytes.iter().rev().take_while(|&&b| b == b'=').count();
    let len = bytes.len() / 4 * 3 - padding;
    if len != RAW_KEY_AES128 && len != RAW_KEY_AES256 {
        return Err(KeyFileError::RawKeyLength { len });
    }
    let written = base64::engine::general_purpose::STANDARD
        .decode_slice(bytes, &mut out[..len])
        .map_err(|_| KeyFileError::NotBase64 { offset: 0 })?;
    debug_assert_eq!(written, len);
    let (first, second) = out[..len].split_at(len / 2);
    if first == second {
        out.fill(0);
        return Err(KeyFileError::RawKeyHalvesEqual);
    }
    Ok(len)
}

/// The key hash `vhd-util key -C -k RAWKEY` prints for a raw key: SHA-256(32 zero bytes ‖ key)
/// (the zero nonce `vhd-util copy` uses) as 64 lower-case hex digits.
pub fn vhd_key_hash_hex(raw_key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update([0u8; 32])
        .chain_update(raw_key)
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Base64 SHA-256 of the key file's bytes.
pub fn fingerprint(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// Base64 of 32 bytes: 44 characters ending in one '='.
    const KEY_44: &[u8] = b"q83vEjRWeJq8zd7wESIzRFVmd4iZqrvM3e7/ABEiM0Q=";

    fn expect(bytes: &[u8], rule: &str, words: &[&str]) {
        let error = validate(bytes).expect_err("must be rejected");
        assert_eq!(error.rule(), rule, "{error}");
        let message = error.to_string();
        for word in words {
            assert!(message.contains(word), "{message:?} lacks {word:?}");
        }
    }

    /// A valid key made by an encoder we do not write: the `base64` crate over random bytes.
    fn encoded(raw: &[u8]) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .encode(raw)
            .into_bytes()
    }

    #[test]
    fn accepts_standard_keys_of_every_padding() {
        for raw_len in [24, 32, 33, 34, 64, 100, 384] {
            let raw: Vec<u8> = (0..raw_len).map(|i| (i * 37 + 11) as u8).collect();
            let key = encoded(&raw);
            assert_eq!(validate(&key), Ok(()), "{} bytes of key material", raw_len);
        }
        assert_eq!(validate(KEY_44), Ok(()));
    }

    #[test]
    fn length_limits_are_inclusive() {
        assert_eq!(validate(&[b'A'; MIN_LEN]), Ok(()));
        assert_eq!(validate(&[b'A'; MAX_LEN]), Ok(()));
        expect(
            &[b'A'; 28],
            "too-short",
            &["28 bytes", "32 to 512", "head -c 32"],
        );
        expect(&[b'A'; 516], "too-long", &["516 bytes", "32 to 512"]);
        expect(&[b'A'; 20], "too-short", &["is 20 bytes", "base64 -w0"]);
    }

    #[test]
    fn empty() {
        expect(
            b"",
            "empty",
            &[
                "is empty",
                "imgctl key generate -o key",
                "head -c 32 /dev/urandom",
            ],
        );
    }

    #[test]
    fn trailing_newline_wins_over_length_and_alphabet() {
        let mut key = KEY_44.to_vec();
        key.push(b'\n');
        expect(
            &key,
            "trailing-newline",
            &["ends with a newline", "echo -n"],
        );
        // 512 characters plus the newline: still the newline's fault, not the length's.
        let mut long = vec![b'A'; MAX_LEN];
        long.push(b'\n');
        expect(&long, "trailing-newline", &["newline"]);
    }

    #[test]
    fn carriage_return() {
        let mut key = KEY_44.to_vec();
        key.extend_from_slice(b"\r\n");
        expect(
            &key,
            "carriage-return",
            &["carriage return", "byte 44", "Windows line ending"],
        );
    }

    #[test]
    fn wrapped_base64_is_multiple_lines() {
        // What plain `base64` (76-column wrapping) makes of 64 bytes of key material.
        let full = encoded(&[7u8; 64]);
        let mut wrapped = full[..76].to_vec();
        wrapped.push(b'\n');
        wrapped.extend_from_slice(&full[76..]);
        expect(
            &wrapped,
            "multiple-lines",
            &["line break at byte 76", "base64 -w0"],
        );
    }

    #[test]
    fn trailing_whitespace() {
        let mut key = KEY_44.to_vec();
        key.extend_from_slice(b" \t");
        expect(&key, "trailing-whitespace", &["whitespace", "byte 44"]);
    }

    #[test]
    fn byte_order_mark() {
        let mut key = b"\xEF\xBB\xBF".to_vec();
        key.extend_from_slice(KEY_44);
        expect(&key, "byte-order-mark", &["byte-order mark"]);
    }

    #[test]
    fn not_base64_names_the_offset_never_the_byte() {
        let mut key = KEY_44.to_vec();
        key[10] = b'!';
        expect(&key, "not-base64", &["byte 10", "A–Z a–z 0–9 + /"]);
        let message = validate(&key).unwrap_err().to_string();
        assert!(
            !message.contains('!'),
            "message quotes a key byte: {message}"
        );
        assert!(
            !message.contains("q83vEj"),
            "message quotes the key: {message}"
        );

        key[10] = b' ';
        expect(&key, "not-base64", &["byte 10"]);
    }

    #[test]
    fn url_safe_alphabet() {
        let mut key = KEY_44.to_vec();
        key[5] = b'_';
        expect(&key, "url-safe-alphabet", &["byte 5", "URL-safe", "tr"]);
    }

    #[test]
    fn padding_rules() {
        let mut key = KEY_44.to_vec();
        key[20] = b'=';
        expect(&key, "misplaced-padding", &["byte 20", "may only end"]);

        let mut three = vec![b'A'; 33];
        three.extend_from_slice(b"===");
        expect(&three, "too-much-padding", &["3 '='", "at most two"]);

        // A key with its padding stripped: 43 characters.
        expect(
            &KEY_44[..43],
            "bad-length",
            &["43 characters", "multiple of 4", "'='"],
        );
    }

    #[test]
    fn non_canonical_trailing_bits() {
        // 'Q' (16 = 0b010000) is canonical before one '='; 'R' (17) sets an unused bit.
        let mut key = KEY_44.to_vec();
        key[42] = b'R';
        expect(&key, "non-canonical", &["not canonical", "base64 -d"]);
        // Independent check: a strict decoder rejects it too, and accepts the original.
        let strict = base64::engine::general_purpose::STANDARD;
        assert!(strict.decode(&key).is_err());
        assert!(strict.decode(KEY_44).is_ok());

        // Two '=': the last character has four unused bits.
        let mut two = encoded(&[9u8; 34]);
        assert!(two.ends_with(b"=="));
        let at = two.len() - 3;
        two[at] = b'B';
        assert!(strict.decode(&two).is_err());
        expect(&two, "non-canonical", &["canonical"]);
    }

    #[test]
    fn every_rule_has_its_own_name() {
        let errors = [
            KeyFileError::Empty,
            KeyFileError::ByteOrderMark,
            KeyFileError::CarriageReturn { offset: 0 },
            KeyFileError::TrailingNewline,
            KeyFileError::MultipleLines { offset: 0 },
            KeyFileError::TrailingWhitespace { offset: 0 },
            KeyFileError::TooShort { len: 0 },
            KeyFileError::TooLong { len: 0 },
            KeyFileError::UrlSafeAlphabet { offset: 0 },
            KeyFileError::NotBase64 { offset: 0 },
            KeyFileError::MisplacedPadding { offset: 0 },
            KeyFileError::TooMuchPadding { count: 3 },
            KeyFileError::BadLength { len: 0 },
            KeyFileError::NonCanonical,
            KeyFileError::RawKeyLength { len: 48 },
            KeyFileError::RawKeyHalvesEqual,
        ];
        let mut names: Vec<_> = errors.iter().map(KeyFileError::rule).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), errors.len());
    }

    #[test]
    fn raw_keys_decode_to_32_or_64_bytes_only() {
        let mut out = [0u8; RAW_KEY_AES256];
        for len in [32usize, 64] {
            let raw: Vec<u8> = (0..len).map(|i| (i * 41 + 7) as u8).collect();
            assert_eq!(decode_raw_key(&encoded(&raw), &mut out), Ok(len));
            assert_eq!(&out[..len], &raw[..]);
        }
        for len in [24usize, 31, 33, 48, 63, 65, 96] {
            let raw: Vec<u8> = (0..len).map(|i| (i * 41 + 7) as u8).collect();
            let error = decode_raw_key(&encoded(&raw), &mut out).unwrap_err();
            assert_eq!(error, KeyFileError::RawKeyLength { len }, "{len}");
            let message = error.to_string();
            assert!(
                message.contains(&format!("decodes to {len} bytes")),
                "{message}"
            );
            assert!(
                message.contains("32 bytes") && message.contains("64 bytes"),
                "{message}"
            );
        }
        // The text rules come first: a newline is reported as such.
        let mut with_newline = encoded(&[5u8; 32]);
        with_newline.push(b'\n');
        assert_eq!(
            decode_raw_key(&with_newline, &mut out),
            Err(KeyFileError::TrailingNewline)
        );
    }

    #[test]
    fn raw_keys_with_equal_halves_are_refused_and_wiped() {
        let mut out = [0u8; RAW_KEY_AES256];
        for len in [32usize, 64] {
            let half: Vec<u8> = (0..len / 2).map(|i| i as u8 + 1).collect();
            let raw = [half.clone(), half].concat();
            let error = decode_raw_key(&encoded(&raw), &mut out).unwrap_err();
            assert_eq!(error, KeyFileError::RawKeyHalvesEqual);
            assert!(error.to_string().contains("halves are equal"), "{error}");
            assert!(out.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn fingerprint_matches_a_known_vector() {
        // SHA-256("abc") from FIPS 180-2, in base64.
        assert_eq!(
            fingerprint(b"abc"),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
    }

    #[test]
    fn fingerprint_matches_openssl() {
        let mut child = Command::new("sh")
            .args(["-c", "openssl dgst -sha256 -binary | base64 -w0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl and base64 must be installed");
        child.stdin.take().unwrap().write_all(KEY_44).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        assert_eq!(
            fingerprint(KEY_44),
            String::from_utf8(output.stdout).unwrap()
        );
    }
}
