//! The `imgcrypt-key` LUKS2 token: which key file opens a keyslot, by fingerprint.
//!
//! ```json
//! {"type": "imgcrypt-key", "keyslots": ["1"], "key_sha256": "<base64 SHA-256 of the key file>"}
//! ```
//!
//! The fingerprint is [`imgcrypt_proto::keyfile::fingerprint`] of the key file's bytes, so the
//! daemon can pick the one keyslot a key opens without running a key derivation per guess. A
//! fingerprint is public (a hash of a 256-bit random key reveals nothing usable), which is why it
//! may sit in the unencrypted header. A token is bound to exactly one keyslot through the
//! header's own `keyslots` list, so libcryptsetup drops it with the keyslot's metadata and
//! `cryptsetup luksDump` shows the binding.
//!
//! Tokens are trusted only as a hint for which keyslot to try: a token whose key then fails to
//! open its keyslot is reported, never believed. A malformed `imgcrypt-key` token is ignored with
//! a warning. LUKS1 has no tokens.

use std::collections::BTreeMap;

use base64::Engine as _;
use libcryptsetup_rs::{CryptDevice, CryptTokenInfo, TokenInput};
use serde_json::{json, Value};

use super::libcryptsetup_error;
use crate::Result;

/// The token's `type`.
pub const TOKEN_TYPE: &str = "imgcrypt-key";

/// Tokens a LUKS2 header can hold (`LUKS2_TOKENS_MAX`).
const MAX_TOKENS: u32 = 32;

/// Bytes of a SHA-256 digest.
const SHA256_BYTES: usize = 32;

/// Adds an `imgcrypt-key` token carrying `fingerprint` and binds it to `keyslot`; returns the
/// token number. LUKS2 only.
pub fn add(device: &mut CryptDevice, keyslot: u32, fingerprint: &str) -> Result<u32> {
    // The keyslot is bound by crypt_token_assign_keyslot rather than written into the JSON, so
    // libcryptsetup itself checks that the keyslot exists.
    let token = json!({
        "type": TOKEN_TYPE,
        "keyslots": [],
        "key_sha256": fingerprint,
    });
    let mut handle = device.token_handle();
    let id = handle
        .json_set(TokenInput::AddToken(&token))
        .map_err(|error| libcryptsetup_error("adding the imgcrypt-key token", error))?;
    if let Err(error) = handle.assign_keyslot(id, Some(keyslot)) {
        let error = libcryptsetup_error("binding the imgcrypt-key token to its keyslot", error);
        // An unbound token would claim nothing; do not leave it behind.
        let _ = handle.json_set(TokenInput::RemoveToken(id));
        return Err(error);
    }
    Ok(id)
}

/// Keyslot number to fingerprint, for every well-formed `imgcrypt-key` token.
///
/// Other token types are skipped silently; a malformed `imgcrypt-key` token, or a second one
/// for a keyslot that disagrees with the first, is skipped with a warning. Pass `is_luks2 =
/// false` for LUKS1, which has no tokens.
pub fn list(device: &mut CryptDevice, is_luks2: bool) -> BTreeMap<u32, String> {
    let mut found = BTreeMap::new();
    if !is_luks2 {
        return found;
    }
    for (id, keyslot, fingerprint) in imgcrypt_tokens(device) {
        match found.get(&keyslot) {
            Some(existing) if *existing != fingerprint => {
                tracing::warn!(
                    token = id,
                    keyslot,
                    "ignoring imgcrypt-key token {id}: keyslot {keyslot} already has a token \
                     with another fingerprint"
                );
            }
            Some(_) => {}
            None => {
                found.insert(keyslot, fingerprint);
            }
        }
    }
    found
}

/// Removes every `imgcrypt-key` token bound to `keyslot`. LUKS2 only.
pub fn remove_for_keyslot(device: &mut CryptDevice, keyslot: u32) -> Result<()> {
    for id in 0..MAX_TOKENS {
        let Some(token) = imgcrypt_token_json(device, id) else {
            continue;
        };
        // Malformed tokens naming this keyslot go too: they are ours and now point nowhere.
        let names_keyslot = token
            .get("keyslots")
            .and_then(Value::as_array)
            .is_some_and(|slots| {
                slots
                    .iter()
                    .any(|s| s.as_str() == Some(&keyslot.to_string()))
            });
        if names_keyslot {
            device
                .token_handle()
                .json_set(TokenInput::RemoveToken(id))
                .map_err(|error| libcryptsetup_error("removing an imgcrypt-key token", error))?;
        }
    }
    Ok(())
}

/// (token number, keyslot, fingerprint) of every well-formed `imgcrypt-key` token.
fn imgcrypt_tokens(device: &mut CryptDevice) -> Vec<(u32, u32, String)> {
    let mut tokens = Vec::new();
    for id in 0..MAX_TOKENS {
        let Some(token) = imgcrypt_token_json(device, id) else {
            continue;
        };
        match parse(&token) {
            Ok((keyslot, fingerprint)) => tokens.push((id, keyslot, fingerprint)),
            Err(problem) => tracing::warn!(
                token = id,
                "ignoring malformed imgcrypt-key token {id}: {problem}"
            ),
        }
    }
    tokens
}

/// The JSON of token `id` when it is an `imgcrypt-key` token.
fn imgcrypt_token_json(device: &mut CryptDevice, id: u32) -> Option<Value> {
    let mut handle = device.token_handle();
    match handle.status(id) {
        Ok(CryptTokenInfo::External(kind) | CryptTokenInfo::ExternalUnknown(kind))
            if kind == TOKEN_TYPE => {}
        _ => return None,
    }
    match handle.json_get(id) {
        Ok(token) => Some(token),
        Err(error) => {
            tracing::warn!(token = id, "cannot read imgcrypt-key token {id}: {error}");
            None
        }
    }
}

/// The keyslot and fingerprint of a token, or what is wrong with it.
fn parse(token: &Value) -> std::result::Result<(u32, String), String> {
    let keyslots = token
        .get("keyslots")
        .and_then(Value::as_array)
        .ok_or("no keyslots list")?;
    let [keyslot] = keyslots.as_slice() else {
        return Err(format!(
            "bound to {} keyslots, not exactly one",
            keyslots.len()
        ));
    };
    let keyslot: u32 = keyslot
        .as_str()
        .and_then(|slot| slot.parse().ok())
        .ok_or("its keyslot is not a number in a string")?;
    let fingerprint = token
        .get("key_sha256")
        .and_then(Value::as_str)
        .ok_or("no key_sha256 string")?;
    let digest = base64::engine::general_purpose::STANDARD
        .decode(fingerprint)
        .map_err(|_| "key_sha256 is not base64")?;
    if digest.len() != SHA256_BYTES {
        return Err(format!(
            "key_sha256 holds {} bytes, not a SHA-256 digest",
            digest.len()
        ));
    }
    Ok((keyslot, fingerprint.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FINGERPRINT: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn parses_only_well_formed_tokens() {
        let good = json!({"type": TOKEN_TYPE, "keyslots": ["3"], "key_sha256": FINGERPRINT});
        assert_eq!(parse(&good).unwrap(), (3, FINGERPRINT.to_string()));
        for (bad, words) in [
            (
                json!({"type": TOKEN_TYPE, "keyslots": [], "key_sha256": FINGERPRINT}),
                "0 keyslots",
            ),
            (
                json!({"type": TOKEN_TYPE, "keyslots": ["1", "2"], "key_sha256": FINGERPRINT}),
                "2 keyslots",
            ),
            (
                json!({"type": TOKEN_TYPE, "keyslots": [1], "key_sha256": FINGERPRINT}),
                "number",
            ),
            (
                json!({"type": TOKEN_TYPE, "keyslots": ["x"], "key_sha256": FINGERPRINT}),
                "number",
            ),
            (
                json!({"type": TOKEN_TYPE, "keyslots": ["1"]}),
                "no key_sha256",
            ),
            (
                json!({"type": TOKEN_TYPE, "keyslots": ["1"], "key_sha256": "!!"}),
                "base64",
            ),
            (
                json!({"type": TOKEN_TYPE, "keyslots": ["1"], "key_sha256": "AAAA"}),
                "3 bytes",
            ),
        ] {
            let problem = parse(&bad).unwrap_err();
            assert!(problem.contains(words), "{problem:?} lacks {words:?}");
        }
    }
}
