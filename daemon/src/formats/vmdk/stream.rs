//! streamOptimized extents (VMDK spec 5.0 §"Stream-Optimized Compressed Sparse Extents"): a
//! sparse extent written front to back, as OVA appliances carry it.
//!
//! Every grain is one zlib stream after a grain marker (`lba` u64, `size` u32: the stream's
//! length). Metadata is preceded by markers of its own (`val` u64 = sectors that follow, `size`
//! u32 = 0, `type` u32): 0 end of stream, 1 grain table, 2 grain directory, 3 footer. A writer
//! that streams cannot know where the GD will be when it writes the header, so it writes
//! `gdOffset` = [`super::sparse::GD_AT_END`] there, and the real header is repeated in the
//! footer: the three sectors before the end of the extent are the footer marker, the footer (a
//! header copy, starting with `KDMV`), and the end-of-stream marker. As qemu does, the footer is
//! then taken instead of the header, after checking the two markers around it. GT and GD
//! markers are not needed to read the extent (the GD locates the GTs) and are not checked,
//! since qemu reads images without them.
//!
//! The grain markers are read when the map is built ([`super::sparse::SparseMap::read`]): their
//! `size` bounds the read of each grain, and the shared reader decompresses it
//! ([`crate::formats::codec::Codec::Zlib`]).

use std::fs::File;

use super::sparse::{Header, GD_AT_END};
use super::{le_u32, le_u64, SECTOR};
use crate::formats::read_exact_at;
use crate::{Error, Result};

const MARKER_END_OF_STREAM: u32 = 0;
const MARKER_FOOTER: u32 = 3;
/// Footer marker, footer, end-of-stream marker.
const FOOTER_BYTES: u64 = 3 * SECTOR;

/// The header to read the extent by: `header` itself, or for a `gdOffset` of
/// [`GD_AT_END`] the footer at the end of the `len`-byte extent at `base` of `file`.
pub fn effective_header(file: &File, base: u64, len: u64, header: Header) -> Result<Header> {
    if header.gd_offset != GD_AT_END {
        return Ok(header);
    }
    let invalid = |what: &str, at: u64| {
        Error::corrupt(
            format!(
                "this streamOptimized VMDK says its grain directory is in the footer, but \
                 {what} (qemu: \"Invalid footer\"): the file was cut short or damaged; obtain a \
                 complete copy"
            ),
            Some(at),
        )
    };
    if len < FOOTER_BYTES + SECTOR {
        return Err(invalid("the extent is too short to hold one", base));
    }
    let at = base + len - FOOTER_BYTES;
    let mut footer = vec![0u8; FOOTER_BYTES as usize];
    read_exact_at(file, &mut footer, at, "the VMDK footer")?;
    let (marker, rest) = footer.split_at(SECTOR as usize);
    let (copy, end) = rest.split_at(SECTOR as usize);
    if le_u32(marker, 8) != 0 || le_u32(marker, 12) != MARKER_FOOTER {
        return Err(invalid(
            &format!("no footer marker is at file offset {at}"),
            at,
        ));
    }
    if le_u64(end, 0) != 0 || le_u32(end, 8) != 0 || le_u32(end, 12) != MARKER_END_OF_STREAM {
        return Err(invalid(
            &format!(
                "no end-of-stream marker is at file offset {}",
                at + 2 * SECTOR
            ),
            at + 2 * SECTOR,
        ));
    }
    let copy: &[u8; 512] = copy.try_into().expect("one sector");
    if &copy[..4] != super::sparse::MAGIC {
        return Err(invalid(
            &format!("the footer at file offset {} has no `KDMV`", at + SECTOR),
            at + SECTOR,
        ));
    }
    Header::parse(copy, at + SECTOR)
}
