//! The daemon's one error type.
//!
//! Each variant is a kind a caller can match and maps to one `io.imgcrypt` Varlink error, so a
//! client sees the same distinction the daemon makes. Messages carry context (which descriptor,
//! which offset, which operation) and say what to do; they never carry key bytes.

use imgcrypt_proto::api::{errors, ErrorParameters};
use imgcrypt_proto::keyfile::KeyFileError;

/// Result with the daemon's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which passed descriptor a problem concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    /// The source image.
    Source,
    /// The output image.
    Output,
    /// The key file.
    Key,
    /// An existing LUKS image (inspected, decrypted, verified or rewritten).
    Image,
    /// A file a source references (backing file, parent, extent), passed as a companion.
    Companion,
    /// The saved LUKS header of an interrupted stream (`StreamOutput::resume_header`).
    ResumeHeader,
}

impl Descriptor {
    /// Lower-case name used in messages and error parameters.
    pub fn name(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Output => "output",
            Self::Key => "key",
            Self::Image => "image",
            Self::Companion => "companion",
            Self::ResumeHeader => "resume header",
        }
    }
}

impl std::fmt::Display for Descriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can go wrong in the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key file breaks one of the key-file rules.
    #[error("key file: {0}")]
    KeyFile(#[from] KeyFileError),

    /// The source is in a format (or variant) this version does not read.
    #[error("{message}")]
    UnsupportedImage {
        /// What it is and what to do instead.
        message: String,
    },

    /// The source is in a container format imgcrypt recognises but does not read (qcow2, VMDK,
    /// an existing LUKS image, a gzip file...): refused rather than encrypted as a raw disk.
    #[error("{message}")]
    UnsupportedFormat {
        /// Short name of the format (qemu-img's, or the compressor's): `qcow2`, `luks`, `gzip`.
        format: &'static str,
        /// What it is and the command that turns it into something imgcrypt reads.
        message: String,
    },

    /// The source image is damaged or inconsistent.
    #[error("image is corrupt: {message}")]
    CorruptImage {
        /// What is wrong, in the format's own terms.
        message: String,
        /// Byte offset in the source file of the offending structure, when known.
        offset: Option<u64>,
    },

    /// A passed descriptor is missing or has the wrong type or access mode.
    #[error("{descriptor} descriptor: {message}")]
    BadDescriptor {
        /// Which one.
        descriptor: Descriptor,
        /// What is wrong and how to open it instead.
        message: String,
    },

    /// An option is out of range or conflicts with another.
    #[error("{message}")]
    InvalidOption {
        /// The parameter's protocol name.
        parameter: &'static str,
        /// What is allowed.
        message: String,
    },

    /// The image breaks a rule of the cloud it is meant for (`--target`).
    #[error("{message}")]
    TargetRule {
        /// The rule's name, e.g. `ibm-vpc-max-size`.
        rule: &'static str,
        /// What the provider says (with where), and the fix.
        message: String,
    },

    /// The output cannot hold the encrypted image.
    #[error("{message}")]
    NoSpace {
        /// Bytes the output needs.
        required_bytes: u64,
        /// What is short and what to do.
        message: String,
    },

    /// The requested engine cannot run here.
    #[error("{engine} engine unavailable: {reason}")]
    EngineUnavailable {
        /// `kernel` or `userspace`.
        engine: &'static str,
        /// Why, and what to use instead.
        reason: String,
    },

    /// libcryptsetup failed.
    #[error("LUKS {operation}: {message}")]
    Luks {
        /// What we asked libcryptsetup to do.
        operation: &'static str,
        /// What it said.
        message: String,
    },

    /// A system call on a descriptor or device failed.
    #[error("{operation}: {source}")]
    Io {
        /// What we were doing, with offsets where they help.
        operation: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The caller may not use this daemon.
    #[error("{0}")]
    PermissionDenied(String),

    /// No candidate key opens the image.
    #[error("{message}")]
    WrongKey {
        /// Which keys were tried, which fingerprints the image carries, and what to do.
        message: String,
        /// Fingerprints of the keys tried, in order.
        tried: Vec<String>,
        /// Fingerprints the image's `imgcrypt-key` tokens carry.
        carried: Vec<String>,
    },

    /// The call needs a key, none was passed, and the daemon has no key ring to fall back on.
    #[error("{0}")]
    NoKey(String),

    /// The source names a file (a backing file, a parent, an extent) the client did not pass.
    /// A client resolves the name and repeats the call with it passed as a companion.
    #[error(
        "`{referencing_name}` needs its {} `{}`, which was not passed: imgctl opens it from \
         the directory of the file that names it (put it there, or fix the reference); other \
         clients pass it as a companion of file {referenced_by} (docs/protocol.md)",
        relation.describe(),
        candidates.first().map(String::as_str).unwrap_or("")
    )]
    NeedFile {
        /// Wire number of the file that names it: 0 for the source, k for companion k.
        referenced_by: u32,
        /// That file's name (`source`, or the name its own referencing file recorded).
        referencing_name: String,
        /// What it is to that file.
        relation: crate::formats::files::Relation,
        /// The names recorded for it, in the order to try them: relative names are relative to
        /// the directory of the referencing file, as qemu resolves them.
        candidates: Vec<String>,
    },

    /// The client went away or the daemon is shutting down.
    #[error("cancelled")]
    Cancelled,

    /// An encryption stopped (cancelled, or the daemon is stopping) after its durable progress
    /// was checkpointed: the same call again resumes at `done`.
    #[error(
        "the encryption stopped at payload byte {done} of {total} (the daemon is stopping, or \
         the job was cancelled); its progress is checkpointed: run the same `imgctl encrypt` \
         command again to resume from there (imgctl keeps OUT.partial for it)"
    )]
    Interrupted {
        /// Payload bytes durable and checkpointed.
        done: u64,
        /// The payload's size.
        total: u64,
    },

    /// An encryption failed (an I/O or LUKS error, not a cancellation) after a checkpoint was
    /// saved: the partial file is worth keeping, so it is reported as `Interrupted` (imgctl
    /// keeps `OUT.partial`), with the underlying error in the message.
    #[error(
        "{source}; the progress up to payload byte {done} of {total} is checkpointed: once \
         that is fixed, run the same `imgctl encrypt` command again to resume from there \
         (imgctl keeps OUT.partial for it)"
    )]
    FailedAfterCheckpoint {
        /// What failed.
        source: Box<Error>,
        /// Payload bytes durable and checkpointed.
        done: u64,
        /// The payload's size.
        total: u64,
    },
}

impl Error {
    /// An I/O error with what we were doing.
    pub fn io(operation: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Self::Io {
            operation: operation.into(),
            source: source.into(),
        }
    }

    /// A corrupt-image error.
    pub fn corrupt(message: impl Into<String>, offset: Option<u64>) -> Self {
        Self::CorruptImage {
            message: message.into(),
            offset,
        }
    }

    /// A wrong-descriptor error.
    pub fn bad_descriptor(descriptor: Descriptor, message: impl Into<String>) -> Self {
        Self::BadDescriptor {
            descriptor,
            message: message.into(),
        }
    }

    /// Whether the job stopped because it was cancelled (by its user, its client leaving or
    /// the daemon stopping) rather than failing: plain [`Error::Cancelled`], or
    /// [`Error::Interrupted`] with its progress checkpointed.
    pub fn is_cancellation(&self) -> bool {
        matches!(self, Self::Cancelled | Self::Interrupted { .. })
    }

    /// The Varlink error name this error is reported as.
    pub fn varlink_name(&self) -> &'static str {
        match self {
            Self::KeyFile(_) => errors::INVALID_KEY_FILE,
            Self::UnsupportedImage { .. } | Self::UnsupportedFormat { .. } => {
                errors::UNSUPPORTED_IMAGE
            }
            Self::CorruptImage { .. } => errors::CORRUPT_IMAGE,
            Self::BadDescriptor { .. } => errors::BAD_DESCRIPTOR,
            Self::InvalidOption { .. } | Self::TargetRule { .. } => errors::INVALID_OPTION,
            Self::NoSpace { .. } => errors::NO_SPACE,
            Self::EngineUnavailable { .. } => errors::ENGINE_UNAVAILABLE,
            Self::Luks { .. } => errors::LUKS_ERROR,
            Self::Io { .. } | Self::Cancelled => errors::IO_ERROR,
            Self::Interrupted { .. } | Self::FailedAfterCheckpoint { .. } => errors::INTERRUPTED,
            Self::PermissionDenied(_) => errors::PERMISSION_DENIED,
            Self::WrongKey { .. } => errors::WRONG_KEY,
            Self::NoKey(_) => errors::NO_KEY,
            Self::NeedFile { .. } => errors::NEED_FILE,
        }
    }

    /// The Varlink error parameters: the message plus the fields a program matches on.
    pub fn varlink_parameters(&self) -> ErrorParameters {
        let mut parameters = ErrorParameters::message(self.to_string());
        match self {
            Self::KeyFile(error) => parameters.rule = Some(error.rule().to_string()),
            Self::UnsupportedFormat { format, .. } => parameters.format = Some(format.to_string()),
            Self::CorruptImage { offset, .. } => parameters.offset = *offset,
            Self::Interrupted { done, .. } | Self::FailedAfterCheckpoint { done, .. } => {
                parameters.offset = Some(*done)
            }
            Self::BadDescriptor { descriptor, .. } => {
                parameters.descriptor = Some(descriptor.name().to_string())
            }
            Self::InvalidOption { parameter, .. } => {
                parameters.parameter = Some(parameter.to_string())
            }
            Self::TargetRule { rule, .. } => {
                parameters.parameter = Some("target".to_string());
                parameters.rule = Some(rule.to_string());
            }
            Self::NoSpace { required_bytes, .. } => {
                parameters.required_bytes = Some(*required_bytes)
            }
            Self::EngineUnavailable { engine, .. } => parameters.engine = Some(engine.to_string()),
            Self::WrongKey { tried, carried, .. } => {
                parameters.tried = Some(tried.clone());
                parameters.carried = Some(carried.clone());
            }
            Self::NeedFile {
                referenced_by,
                relation,
                candidates,
                ..
            } => {
                parameters.referenced_by = Some(*referenced_by);
                parameters.relation = Some(relation.wire().to_string());
                parameters.candidates = Some(candidates.clone());
            }
            _ => {}
        }
        parameters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_after_a_checkpoint_is_reported_as_interrupted_but_not_as_a_cancellation() {
        let error = Error::FailedAfterCheckpoint {
            source: Box::new(Error::io(
                "writing the output",
                std::io::Error::from_raw_os_error(libc::EIO),
            )),
            done: 32 << 20,
            total: 128 << 20,
        };
        // imgctl keeps OUT.partial on Interrupted.
        assert_eq!(error.varlink_name(), errors::INTERRUPTED);
        assert_eq!(error.varlink_parameters().offset, Some(32 << 20));
        // The audit record says it failed.
        assert!(!error.is_cancellation());
        let message = error.to_string();
        assert!(
            message.contains("writing the output") && message.contains("run the same"),
            "{message}"
        );
    }
}
