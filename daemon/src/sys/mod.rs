//! Thin, audited wrappers around the system calls the rest of the daemon relies on.

pub mod aligned;
pub mod capabilities;
pub mod descriptors;
pub mod direct_io;
pub mod memfd;
pub mod peer;
pub mod pipe;
pub mod source_io;
pub mod storage;
