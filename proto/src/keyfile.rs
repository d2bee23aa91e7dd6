//! Key files, by the seed procedure's rules: the file's bytes are the LUKS passphrase verbatim
//! (as `cryptsetup --key-file` uses them), and must be 32 to 512 characters of RFC 4648 base64
//! with padding, on a single line with no trailing newline or whitespace.
//!
//! The fingerprint is the base64 SHA-256 of those bytes: the same bytes cryptsetup uses, so a key
//! is recognised by what actually unlocks the image.

/// Fewest bytes a key file may hold.
pub const MIN_LEN: usize = 32;
/// Most bytes a key file may hold.
pub const MAX_LEN: usize = 512;

/// A broken key-file rule. Messages never quote key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// Placeholder until the rules land.
    #[error("key file rules not yet implemented")]
    Unimplemented,
}

impl KeyFileError {
    /// Short machine-readable name of the rule.
    pub fn rule(&self) -> &'static str {
        "unimplemented"
    }
}

/// Checks every rule.
pub fn validate(_bytes: &[u8]) -> Result<(), KeyFileError> {
    todo!("key file validation")
}

/// Base64 SHA-256 of the key file's bytes.
pub fn fingerprint(_bytes: &[u8]) -> String {
    todo!("fingerprint")
}
