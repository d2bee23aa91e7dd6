//! Source image readers, one module per format, chosen by content and never by file name.
//!
//! Every format answers the same three questions through [`SourceImage`]: how big is the disk
//! the guest sees, what bytes are at an offset (holes read as zeros), and which ranges hold data.

use std::fs::File;
use std::ops::Range;

use imgcrypt_proto::api::SourceFormat;

use crate::Result;

/// A disk image opened read-only through a descriptor the client passed.
///
/// Implementations read with positioned I/O only (`pread`), so one image can serve several copy
/// workers at once and the descriptor's shared file offset is never touched.
pub trait SourceImage: Send + Sync + std::fmt::Debug {
    /// The format detected.
    fn format(&self) -> SourceFormat;

    /// Size of the disk the guest sees, in bytes.
    fn virtual_size(&self) -> u64;

    /// Fills `buffer` with the guest's bytes starting at `offset`; unallocated areas read as
    /// zeros. `offset + buffer.len()` must not exceed [`Self::virtual_size`].
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()>;

    /// Guest ranges that may hold non-zero data, sorted and disjoint. Everything outside them
    /// reads as zeros, so a copier may skip reading it.
    fn allocated_ranges(&self) -> &[Range<u64>];
}

/// Detects the format of `file` from its content and opens it.
pub fn open(file: File) -> Result<Box<dyn SourceImage>> {
    let _ = file;
    todo!("format detection")
}
