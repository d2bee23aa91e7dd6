//! The contract between `imgcryptd` and its clients.
//!
//! Everything both sides must agree on lives here and nowhere else:
//! - [`wire`]: Varlink framing (NUL-terminated JSON) with a frame-size cap,
//! - [`fdpass`]: sending and receiving file descriptors with a message (SCM_RIGHTS),
//! - [`varlink`]: the generic call/reply envelope and the `org.varlink.service` errors,
//! - [`api`]: the `io.imgcrypt` interface: methods, parameters, replies and error names,
//! - [`keyfile`]: what a valid key file is, and its fingerprint,
//! - [`keyring`]: the key ring format (which key files a ring names, gsutil's numbering rules),
//! - [`paths`]: where the daemon's socket lives,
//! - [`stream`]: the preamble of an `Encrypt` output streamed into a pipe (`imgctl encrypt --upload`).
//!
//! The daemon is the authority on every rule (it re-checks whatever a client sends); the client
//! uses the same code to give an early, local error without a round trip.

pub mod api;
pub mod fdpass;
pub mod keyfile;
pub mod keyring;
pub mod paths;
pub mod stream;
pub mod varlink;
pub mod wire;
