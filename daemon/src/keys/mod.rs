//! Key material: read from passed descriptors into locked, zeroised memory.
//! (interface stub; the real module lands from the keys-luks branch)

pub mod secret;

use std::fs::File;

use crate::Result;
use secret::SecretBytes;

/// A validated key file.
pub struct KeyFile {
    /// The passphrase bytes.
    pub passphrase: SecretBytes,
    /// Base64 SHA-256 of the bytes.
    pub fingerprint: String,
    /// Warnings for the user.
    pub warnings: Vec<String>,
}

/// Reads and validates a key file.
pub fn read_key_file(_file: &File) -> Result<KeyFile> {
    todo!()
}
