//! Whether a key looks generated: the rule for storing its fingerprint in a header.
//!
//! The `imgcrypt-key` token stores an unsalted SHA-256 of the key file. For a generated key (32
//! random bytes, base64) that reveals nothing: 2^256 guesses stay 2^256. For a key a person made
//! up (`base64("Summer2024!Summer2024!Summer2024")` passes every key-file rule), one SHA-256 per
//! guess would replace the keyslot's argon2, and no salt makes one table serve every image. So
//! the daemon writes a token only for a key that looks generated, and warns about the others;
//! their images open by trial (one key derivation per keyslot and candidate).
//!
//! The test, on the key's decoded bytes (the base64 payload; the raw bytes if the passphrase is
//! not base64):
//! - at least 32 bytes (what `imgctl key generate` makes); fewer is below 256 bits whatever
//!   their source;
//! - not all printable ASCII: text encoded as base64 is the usual way a chosen passphrase ends
//!   up in a valid key file. 32 random bytes are all printable with probability
//!   (95/256)^32 ≈ 1.6e-14;
//! - at least 16 distinct byte values: repeated patterns (`\0` padding, one byte repeated).
//!   32 random bytes have fewer with probability far below 1e-20.
//!
//! It cannot recognise every low-entropy key (random-looking bytes from a weak generator pass);
//! it stops the common mistakes at no cost to generated keys.

use base64::Engine as _;

use super::SecretBytes;
use crate::Result;

/// Fewest decoded bytes of a generated key.
pub const GENERATED_BYTES: usize = 32;

/// Fewest distinct byte values among a generated key's bytes.
const MIN_DISTINCT_BYTES: usize = 16;

/// Why a key does not look generated, or None when it does.
pub fn weakness(passphrase: &[u8]) -> Result<Option<String>> {
    // Decode into locked memory: key material never passes through the heap.
    let mut decoded = SecretBytes::zeroed(passphrase.len())?;
    let (bytes, what): (&[u8], &str) = match base64::engine::general_purpose::STANDARD
        .decode_slice(passphrase, decoded.as_mut_bytes())
    {
        Ok(len) => (&decoded.as_bytes()[..len], "decodes to"),
        Err(_) => (passphrase, "is"),
    };
    if bytes.len() < GENERATED_BYTES {
        return Ok(Some(format!(
            "it {what} {} bytes, fewer than the {GENERATED_BYTES} random bytes of a generated key",
            bytes.len()
        )));
    }
    if bytes.iter().all(|byte| (0x20..=0x7e).contains(byte)) {
        return Ok(Some(format!("it {what} printable text, not random bytes")));
    }
    let mut seen = [false; 256];
    for &byte in bytes {
        seen[usize::from(byte)] = true;
    }
    let distinct = seen.iter().filter(|&&seen| seen).count();
    if distinct < MIN_DISTINCT_BYTES {
        return Ok(Some(format!(
            "it {what} only {distinct} distinct byte values, not random bytes"
        )));
    }
    Ok(None)
}

/// The notice for a key that does not look generated, naming it as `name`: why no fingerprint
/// was stored and what to do; None for a generated key.
pub fn notice(name: &str, passphrase: &[u8]) -> Result<Option<String>> {
    Ok(weakness(passphrase)?.map(|why| {
        format!(
            "{name} does not look generated ({why}): no imgcrypt-key fingerprint was stored for \
             it, because an unsalted SHA-256 of a guessable key in the header would let anyone \
             with the image test guesses at SHA-256 speed instead of through the keyslot's key \
             derivation; opening the image will try its keyslots by key derivation instead. \
             Generate keys with `imgctl key generate -o FILE`"
        )
    }))
}

/// Whether the header may carry the fingerprint of `passphrase`.
pub fn may_store_fingerprint(passphrase: &[u8]) -> Result<bool> {
    Ok(weakness(passphrase)?.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_pass() {
        for _ in 0..200 {
            let raw = SecretBytes::random(GENERATED_BYTES).unwrap();
            let key = base64::engine::general_purpose::STANDARD.encode(raw.as_bytes());
            assert_eq!(weakness(key.as_bytes()).unwrap(), None, "{key}");
        }
        // What `imgctl key generate` wrote once.
        assert_eq!(
            weakness(b"8KiOclVIE2tldMbFc5uayeoiL2V/1P0aKhiNNyZZujE=").unwrap(),
            None
        );
    }

    #[test]
    fn chosen_and_short_keys_fail() {
        let summer =
            base64::engine::general_purpose::STANDARD.encode(b"Summer2024!Summer2024!Summer2024");
        assert_eq!(summer.len(), 44);
        let why = weakness(summer.as_bytes()).unwrap().unwrap();
        assert!(why.contains("printable text"), "{why}");

        // 24 random bytes: valid key file (32 characters), below 256 bits.
        let raw = SecretBytes::random(24).unwrap();
        let short = base64::engine::general_purpose::STANDARD.encode(raw.as_bytes());
        let why = weakness(short.as_bytes()).unwrap().unwrap();
        assert!(why.contains("24 bytes"), "{why}");

        let zeros = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        let why = weakness(zeros.as_bytes()).unwrap().unwrap();
        assert!(why.contains("1 distinct"), "{why}");

        // Not base64 at all: the raw bytes are judged.
        let why = weakness(b"first-key-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
            .unwrap()
            .unwrap();
        assert!(why.contains("printable text"), "{why}");
        assert!(weakness(SecretBytes::random(44).unwrap().as_bytes())
            .unwrap()
            .is_none());

        let notice = notice("encryption_key", summer.as_bytes())
            .unwrap()
            .unwrap();
        assert!(
            notice.contains("encryption_key does not look generated"),
            "{notice}"
        );
        assert!(notice.contains("imgctl key generate"), "{notice}");
        assert!(!notice.contains(&summer), "the notice quotes no key bytes");
    }
}
