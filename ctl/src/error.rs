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
            | Self::SourceDiffers(_) => 1,
        }
    }
}

/// Result with imgctl's error.
pub type Result<T, E = CtlError> = std::result::Result<T, E>;
