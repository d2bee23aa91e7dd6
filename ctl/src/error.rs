//! imgctl's one error type. Every message names the file or socket involved and what to do.

use std::path::PathBuf;

/// Everything imgctl can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The command line is inconsistent in a way clap cannot see.
    #[error("{0}")]
    Usage(String),

    /// A local file could not be used.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong and what to do.
        message: String,
    },

    /// No daemon could be reached or started.
    #[error("cannot reach imgcryptd: {0}")]
    Connect(String),

    /// The daemon answered with an error.
    #[error("{message}")]
    Daemon {
        /// Varlink error name, e.g. `io.imgcrypt.InvalidKeyFile`.
        name: String,
        /// The daemon's message.
        message: String,
    },

    /// The conversation with the daemon broke.
    #[error("talking to imgcryptd: {0}")]
    Protocol(String),

    /// The daemon needs a file the source references (`io.imgcrypt.NeedFile`); resolved by
    /// [`crate::companions::with_companions`], shown only if a caller does not resolve it.
    #[error("{}", .0.message)]
    NeedFile(crate::companions::NeedFile),

    /// `verify --source`: the image decrypted, but its plaintext is not the source's disk.
    #[error("{0}")]
    SourceDiffers(String),

    /// No usable S3 credentials (the message lists where imgctl looked and what to set).
    #[error("{0}")]
    Credentials(String),

    /// The object store refused or failed a request (after the client's retries). The message
    /// names the object, the operation, the part and the endpoint, never a secret.
    #[error("cannot {operation} {url}{}: {message}", part_suffix(*.part))]
    Store {
        /// `s3://BUCKET/KEY`.
        url: String,
        /// What was being done, e.g. "upload part of".
        operation: String,
        /// The part number, for part uploads.
        part: Option<u32>,
        /// What kind of failure, for callers that react to it.
        kind: StoreFailure,
        /// What the server said and what to do.
        message: String,
    },

    /// An upload stopped before the whole image was read (interrupted, or the image ended
    /// early). The multipart upload and its state are kept; the message says how to resume.
    #[error("{0}")]
    UploadInterrupted(String),

    /// The uploaded object, or a local image checked against an ETag, is not what was expected.
    #[error("{0}")]
    ObjectDiffers(String),
}

/// Kinds of object-store failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// The credentials were refused or lack permission.
    Refused,
    /// The bucket does not exist.
    NoBucket,
    /// The object does not exist (HEAD).
    NoObject,
    /// The multipart upload no longer exists.
    NoUpload,
    /// Anything else: server errors, the network.
    Failed,
}

fn part_suffix(part: Option<u32>) -> String {
    part.map(|p| format!(" (part {p})")).unwrap_or_default()
}

impl CtlError {
    /// A file error from an I/O error, with a hint for the common cases.
    pub fn file(path: impl Into<PathBuf>, action: &str, error: std::io::Error) -> Self {
        let hint = match error.kind() {
            std::io::ErrorKind::NotFound => " (check the path)",
            std::io::ErrorKind::PermissionDenied => " (check the file's permissions)",
            _ => "",
        };
        Self::File {
            path: path.into(),
            message: format!("cannot {action}: {error}{hint}"),
        }
    }

    /// The process exit status for this error: 2 for a usage error, 1 for everything else
    /// (a source that differs included, as `cmp` and `diff` report a difference).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::File { .. }
            | Self::Connect(_)
            | Self::Daemon { .. }
            | Self::Protocol(_)
            | Self::NeedFile(_)
            | Self::SourceDiffers(_)
            | Self::Credentials(_)
            | Self::Store { .. }
            | Self::UploadInterrupted(_)
            | Self::ObjectDiffers(_) => 1,
        }
    }
}

/// Result with imgctl's error.
pub type Result<T, E = CtlError> = std::result::Result<T, E>;
