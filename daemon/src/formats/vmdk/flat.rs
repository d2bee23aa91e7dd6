//! Flat extents (`FLAT`, `VMFS`): the guest bytes of the extent lie as they are in a file,
//! from a sector offset the descriptor gives (monolithicFlat's `NAME-flat.vmdk`,
//! twoGbMaxExtentFlat's `NAME-fNNN.vmdk`).
//!
//! A flat file shorter than its extent reads as zeros past its end, as qemu reads it (its file
//! driver fills reads past the end with zeros). Which parts hold data comes from the file's
//! holes (`SEEK_DATA`), so a sparse flat file costs reads of its data only.

use std::fs::File;
use std::ops::Range;

use crate::formats::layout::FileIndex;
use crate::formats::{data_ranges, push_merged, RANGE_MERGE_GAP};
use crate::sys::storage;
use crate::Result;

/// One flat extent.
#[derive(Debug)]
pub struct FlatExtent {
    /// Which of the layer's files.
    pub file: FileIndex,
    /// File offset of the extent's first byte.
    pub offset: u64,
    /// Size of the file.
    pub file_size: u64,
}

impl FlatExtent {
    /// The extent of `len` bytes at `offset` of `file` (layer file `index`), and the guest
    /// ranges (from `start`) that hold data, appended to `allocated`.
    pub fn open(
        file: &File,
        index: FileIndex,
        offset: u64,
        start: u64,
        len: u64,
        allocated: &mut Vec<Range<u64>>,
    ) -> Result<Self> {
        let kind = storage::storage_kind(file)?;
        let file_size = storage::size_of(file)?;
        let end = offset.saturating_add(len).min(file_size);
        if offset < end {
            for range in data_ranges(file, kind, end)? {
                let from = range.start.max(offset);
                if from < range.end {
                    push_merged(
                        allocated,
                        start + (from - offset)..start + (range.end - offset),
                        RANGE_MERGE_GAP,
                    );
                }
            }
        }
        Ok(Self {
            file: index,
            offset,
            file_size,
        })
    }
}
