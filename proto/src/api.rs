//! The `io.imgcrypt` Varlink interface: method names, parameter and reply types, error names.
//!
//! The human-readable definition is `docs/io.imgcrypt.varlink`; it is compiled in here so
//! `GetInterfaceDescription` always serves exactly what is documented, and a test checks that
//! these types and that text name the same fields.

use serde::{Deserialize, Serialize};

/// Interface name.
pub const INTERFACE: &str = "io.imgcrypt";
/// The interface definition served by `GetInterfaceDescription`.
pub const INTERFACE_DESCRIPTION: &str = include_str!("../../docs/io.imgcrypt.varlink");
/// `io.imgcrypt.Encrypt`.
pub const ENCRYPT: &str = "io.imgcrypt.Encrypt";

/// Error names of `io.imgcrypt`, one per kind of failure a client may want to match.
pub mod errors {
    /// The key file breaks a rule.
    pub const INVALID_KEY_FILE: &str = "io.imgcrypt.InvalidKeyFile";
    /// Format not readable by this version.
    pub const UNSUPPORTED_IMAGE: &str = "io.imgcrypt.UnsupportedImage";
    /// Damaged or inconsistent source.
    pub const CORRUPT_IMAGE: &str = "io.imgcrypt.CorruptImage";
    /// Wrong descriptor type or access mode.
    pub const BAD_DESCRIPTOR: &str = "io.imgcrypt.BadDescriptor";
    /// Invalid option or combination.
    pub const INVALID_OPTION: &str = "io.imgcrypt.InvalidOption";
    /// Output cannot hold the image.
    pub const NO_SPACE: &str = "io.imgcrypt.NoSpace";
    /// Engine cannot run here.
    pub const ENGINE_UNAVAILABLE: &str = "io.imgcrypt.EngineUnavailable";
    /// libcryptsetup failure.
    pub const LUKS_ERROR: &str = "io.imgcrypt.LuksError";
    /// Read or write failure.
    pub const IO_ERROR: &str = "io.imgcrypt.IoError";
    /// Caller not allowed.
    pub const PERMISSION_DENIED: &str = "io.imgcrypt.PermissionDenied";
    /// Malformed, oversized or out-of-protocol message.
    pub const PROTOCOL_ERROR: &str = "io.imgcrypt.ProtocolError";
}

/// LUKS on-disk format version.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LuksVersion {
    /// LUKS1: 2 MiB header, pbkdf2 only, 512-byte sectors only.
    Luks1,
    /// LUKS2: cryptsetup's default since 2.1.
    #[default]
    Luks2,
}

impl LuksVersion {
    /// "LUKS1" / "LUKS2".
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Luks1 => "LUKS1",
            Self::Luks2 => "LUKS2",
        }
    }
}

/// Key-derivation function of a keyslot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PbkdfKind {
    /// Memory-hard; LUKS2 only.
    Argon2id,
    /// The only choice for LUKS1.
    Pbkdf2,
}

/// Which engine writes the payload.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// The kernel engine where dm-crypt is usable, else userspace.
    #[default]
    Auto,
    /// AES-XTS in the daemon's own process.
    Userspace,
    /// Loop device plus dm-crypt.
    Kernel,
}

/// The engine that actually ran.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// AES-XTS in the daemon's own process.
    Userspace,
    /// Loop device plus dm-crypt.
    Kernel,
}

/// Keyslot key-derivation settings; every field falls back to cryptsetup's default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pbkdf {
    /// Function; argon2id for LUKS2 and pbkdf2 for LUKS1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PbkdfKind>,
    /// Target unlock time in milliseconds (benchmarked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iter_time_ms: Option<u32>,
    /// Fixed iteration count, skipping the benchmark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u32>,
    /// Argon2 memory cost in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_kib: Option<u32>,
    /// Argon2 threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
}

/// Parameters of `io.imgcrypt.Encrypt`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EncryptParameters {
    /// Index of the source descriptor among those passed with the call.
    pub source: u32,
    /// Index of the output descriptor.
    pub output: u32,
    /// Index of the key-file descriptor.
    pub key: u32,
    /// Header format.
    pub luks_version: LuksVersion,
    /// Encryption sector size in bytes.
    pub sector_size: u32,
    /// Keyslot key derivation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pbkdf: Option<Pbkdf>,
    /// Engine to use.
    #[serde(default)]
    pub engine: EngineChoice,
}

/// Stage of an encryption job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for another job to finish (the daemon runs a bounded number at once).
    Queued,
    /// Creating the LUKS header (includes the PBKDF benchmark).
    Format,
    /// Encrypting and writing the payload.
    Copy,
    /// Flushing to stable storage.
    Sync,
}

/// A progress report.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// Current stage.
    pub phase: Phase,
    /// Payload bytes written so far.
    pub bytes_done: u64,
    /// Payload bytes in all.
    pub bytes_total: u64,
}

/// Source image formats recognised by content.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SourceFormat {
    /// Raw disk bytes.
    Raw,
    /// VHD with a footer only.
    VhdFixed,
    /// VHD with a block allocation table.
    VhdDynamic,
}

impl SourceFormat {
    /// How users name it.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::VhdFixed => "VHD (fixed)",
            Self::VhdDynamic => "VHD (dynamic)",
        }
    }
}

/// What a finished encryption produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    /// Format detected from the source's content.
    pub source_format: SourceFormat,
    /// Guest-visible size of the source in bytes.
    pub virtual_size: u64,
    /// Header format written.
    pub luks_version: LuksVersion,
    /// Cipher specification, e.g. `aes-xts-plain64`.
    pub cipher: String,
    /// Volume key size in bits.
    pub key_size_bits: u32,
    /// Encryption sector size in bytes.
    pub sector_size: u32,
    /// Byte offset of the encrypted payload (the header's size).
    pub data_offset: u64,
    /// Encrypted payload bytes (virtual size rounded up to whole MiB of output).
    pub payload_size: u64,
    /// Total output size.
    pub output_size: u64,
    /// Base64 SHA-256 of the key file's bytes.
    pub key_fingerprint: String,
    /// Keyslot key derivation used, e.g. `argon2id (4 iterations, 1048576 KiB, 2 threads)`.
    pub pbkdf: String,
    /// Engine that wrote the payload.
    pub engine: EngineKind,
    /// Wall time of the whole job, key derivation included.
    pub elapsed_ms: u64,
    /// Wall time of the payload copy alone (what the throughput is measured over).
    pub copy_ms: u64,
    /// Bytes written to the output, header included.
    pub bytes_written: u64,
}

/// One reply of `io.imgcrypt.Encrypt`: exactly one field is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EncryptReply {
    /// A progress report (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Something the user should know that does not stop the job (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The result (final reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
}

/// Parameters of every `io.imgcrypt` error: a message for people, plus what a program matches.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorParameters {
    /// What went wrong and what to do about it.
    pub message: String,
    /// The key-file rule broken (`InvalidKeyFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The descriptor at fault: `source`, `output` or `key` (`BadDescriptor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor: Option<String>,
    /// The parameter at fault (`InvalidOption`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// Byte offset in the source where corruption was found (`CorruptImage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Bytes the output needs (`NoSpace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_bytes: Option<u64>,
    /// The engine asked for (`EngineUnavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

impl ErrorParameters {
    /// Parameters carrying only a message.
    pub fn message(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field name of the Rust types must appear in the documented interface, so the
    /// served description cannot drift from what the daemon accepts and sends.
    #[test]
    fn documented_interface_names_every_field() {
        let samples = [
            serde_json::to_value(EncryptParameters {
                source: 0,
                output: 1,
                key: 2,
                luks_version: LuksVersion::Luks2,
                sector_size: 512,
                pbkdf: Some(Pbkdf {
                    kind: Some(PbkdfKind::Argon2id),
                    iter_time_ms: Some(1),
                    iterations: Some(4),
                    memory_kib: Some(32),
                    parallel: Some(1),
                }),
                engine: EngineChoice::Auto,
            })
            .unwrap(),
            serde_json::to_value(Progress {
                phase: Phase::Copy,
                bytes_done: 0,
                bytes_total: 0,
            })
            .unwrap(),
        ];
        let mut names = Vec::new();
        for sample in &samples {
            collect_keys(sample, &mut names);
        }
        for name in [
            "source_format",
            "virtual_size",
            "luks_version",
            "cipher",
            "key_size_bits",
            "sector_size",
            "data_offset",
            "payload_size",
            "output_size",
            "key_fingerprint",
            "pbkdf",
            "engine",
            "elapsed_ms",
            "copy_ms",
            "bytes_written",
            "notice",
            "summary",
            "progress",
        ] {
            names.push(name.to_string());
        }
        for name in names {
            assert!(
                INTERFACE_DESCRIPTION.contains(&format!("{name}:")),
                "field {name} missing from docs/io.imgcrypt.varlink"
            );
        }
        for error in [
            errors::INVALID_KEY_FILE,
            errors::UNSUPPORTED_IMAGE,
            errors::CORRUPT_IMAGE,
            errors::BAD_DESCRIPTOR,
            errors::INVALID_OPTION,
            errors::NO_SPACE,
            errors::ENGINE_UNAVAILABLE,
            errors::LUKS_ERROR,
            errors::IO_ERROR,
            errors::PERMISSION_DENIED,
            errors::PROTOCOL_ERROR,
        ] {
            let short = error.strip_prefix("io.imgcrypt.").unwrap();
            assert!(
                INTERFACE_DESCRIPTION.contains(&format!("error {short} (")),
                "error {short} missing from docs/io.imgcrypt.varlink"
            );
        }
    }

    fn collect_keys(value: &serde_json::Value, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = value {
            for (key, inner) in map {
                out.push(key.clone());
                collect_keys(inner, out);
            }
        }
    }

    #[test]
    fn summary_uses_documented_enum_spellings() {
        assert_eq!(
            serde_json::to_string(&SourceFormat::VhdDynamic).unwrap(),
            "\"vhd-dynamic\""
        );
        assert_eq!(
            serde_json::to_string(&LuksVersion::Luks1).unwrap(),
            "\"luks1\""
        );
        assert_eq!(
            serde_json::to_string(&EngineKind::Userspace).unwrap(),
            "\"userspace\""
        );
    }
}
