//! Memory for secrets (interface stub).

use crate::Result;

/// Locked, zeroised bytes.
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Random bytes.
    pub fn random(_len: usize) -> Result<Self> {
        todo!()
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}
