//! Thin, audited wrappers around the system calls the rest of the daemon relies on.

pub mod aligned;
pub mod blockdev;
pub mod descriptors;
pub mod direct_io;
pub mod memfd;
