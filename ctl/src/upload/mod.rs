//! Uploading images to S3-compatible object storage (AWS S3, IBM Cloud Object Storage, …) as
//! multipart uploads, resumably: imgctl does it with the user's credentials, which never reach
//! the daemon.
//!
//! - [`url`][mod@url]: `s3://BUCKET/KEY`.
//! - [`credentials`]: credentials, region and endpoint from the standard AWS sources.
//! - [`parts`]: the part size rule and the multipart ETag.
//! - [`state`]: the per-object state file (and saved LUKS header) that makes resuming possible.
//! - [`session`]: [`Upload`], one object's upload from begin to complete or abort.
//!
//! A caller (`imgctl upload`, `imgctl encrypt --upload`) does:
//! `Upload::begin` → (on a daemon restart: `restart`) → `send(reader, resume_offset())` →
//! `complete()` only when the whole image was read and its producer succeeded; or
//! `interrupted(why)` / `abort()`.

pub mod credentials;
pub mod parts;
pub mod session;
pub mod state;
pub mod url;

pub use credentials::StoreOptions;
#[allow(
    unused_imports,
    reason = "API for `imgctl encrypt --upload` (streamed), which builds on it next"
)]
pub use session::{
    abort_recorded, head_object, recorded, ObjectInfo, Recorded, Resume, SendProgress, Upload,
    Uploaded,
};
pub use url::S3Url;
