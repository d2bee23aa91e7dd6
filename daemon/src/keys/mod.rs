//! Key material: read from passed descriptors into locked, zeroised memory.

pub mod secret;
