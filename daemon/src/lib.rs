//! `imgcryptd`: a privileged daemon that turns virtual-machine disk images into LUKS images for
//! unprivileged clients, over the `io.imgcrypt` Varlink interface.
//!
//! Where things live:
//! - [`server`]: the socket, connections, Varlink dispatch, peer credentials;
//! - [`jobs`]: what one call does, from checking descriptors to the summary;
//! - [`context`]: what the jobs share, below the server: engines, key ring, job slots;
//! - [`engines`]: the one pipeline that reads, encrypts and writes a payload (userspace AES-XTS;
//!   kernel dm-crypt);
//! - [`devices`]: the kernel engine's loop devices, dm-crypt mappings and keyring keys;
//! - [`formats`]: source image readers, one module per format, detected by content, and the zero
//!   scan that tells the sparse outputs which clusters hold data;
//! - [`outputs`]: output containers (raw LUKS, qcow2+LUKS, blktap VHD), one module per format:
//!   where each run of the payload goes and with which IV, and the metadata around it;
//! - [`luks`]: LUKS headers through libcryptsetup, and the output layout rule;
//! - [`keys`]: key material in locked, zeroised memory, read from passed descriptors;
//! - [`sys`]: thin wrappers around the system calls the rest relies on;
//! - [`mode`]: system or per-user daemon;
//! - [`error`]: the crate's one error type and its mapping to Varlink errors.
//!
//! The top layers use only those below them: `server` (and `main`) → `jobs` → `context` → the
//! machinery (`engines`, `outputs`, `formats`, `luks`, `keys`, `devices`, `sys`). Nothing below
//! `server` names it, so a job runs with a [`context::DaemonContext`] and no socket.

pub mod context;
pub mod devices;
pub mod engines;
pub mod error;
pub mod formats;
pub mod jobs;
pub mod keys;
pub mod luks;
pub mod mode;
pub mod outputs;
pub mod server;
pub mod sys;

pub use error::{Error, Result};
