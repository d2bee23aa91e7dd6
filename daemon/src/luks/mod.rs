//! LUKS headers (interface stub).

use std::fs::File;

use imgcrypt_proto::api::{LuksVersion, Pbkdf};

use crate::keys::secret::SecretBytes;
use crate::Result;

/// Volume key length.
pub const VOLUME_KEY_BYTES: usize = 64;

/// What to format.
pub struct HeaderSpec {
    /// Version.
    pub version: LuksVersion,
    /// Sector size.
    pub sector_size: u32,
    /// PBKDF.
    pub pbkdf: Pbkdf,
}

impl HeaderSpec {
    /// Checks options.
    pub fn validate(&self) -> Result<()> {
        todo!()
    }
}

/// A formatted header.
pub struct FormattedHeader {
    /// memfd.
    pub image: File,
    /// Data offset.
    pub data_offset: u64,
    /// Cipher.
    pub cipher: String,
    /// Key bits.
    pub key_size_bits: u32,
    /// PBKDF description.
    pub pbkdf: String,
}

/// Formats.
pub fn format_header(
    _spec: &HeaderSpec,
    _volume_key: &SecretBytes,
    _passphrase: &SecretBytes,
) -> Result<FormattedHeader> {
    todo!()
}

/// Layout.
pub mod layout {
    use crate::Result;
    /// Output size.
    pub fn output_size(_data_offset: u64, _virtual_size: u64) -> Result<u64> {
        todo!()
    }
}
