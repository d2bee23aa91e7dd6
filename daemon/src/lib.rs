//! `imgcryptd`: a privileged daemon that turns virtual-machine disk images into LUKS images for
//! unprivileged clients, over the `io.imgcrypt` Varlink interface.
//!
//! Where things live:
//! - [`server`]: the socket, connections, Varlink dispatch, peer credentials;
//! - [`jobs`]: what one call does, from checking descriptors to the summary;
//! - [`engines`]: the ways to write an encrypted payload (userspace AES-XTS; kernel dm-crypt);
//! - [`devices`]: the kernel engine's loop devices, dm-crypt mappings and keyring keys;
//! - [`formats`]: source image readers, one module per format, detected by content;
//! - [`luks`]: LUKS headers through libcryptsetup, and the output layout rule;
//! - [`keys`]: key material in locked, zeroised memory, read from passed descriptors;
//! - [`sys`]: thin wrappers around the system calls the rest relies on;
//! - [`error`]: the crate's one error type and its mapping to Varlink errors.

pub mod devices;
pub mod engines;
pub mod error;
pub mod formats;
pub mod jobs;
pub mod keys;
pub mod luks;
pub mod server;
pub mod sys;

pub use error::{Error, Result};
