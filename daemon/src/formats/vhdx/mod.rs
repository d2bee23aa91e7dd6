//! VHDX images (Hyper-V's format, MS-VHDX 1.0): fixed, dynamic and differencing disks.
//!
//! # What is read
//!
//! The file identifier `vhdxfile` at offset 0 marks a VHDX ([`super::open`] looks for it after
//! the VHD rule found no VHD). Then, all checked before any block is read:
//!
//! 1. the current header (`header::current_header`): of the two at 64 KiB and 128 KiB, each
//!    with a CRC-32C, the valid one with the higher sequence number; two valid headers with the
//!    same number are accepted only if identical (Microsoft's Disk2VHD writes them so), as qemu
//!    accepts them;
//! 2. the log (`log`): a log GUID in the current header with a valid active sequence means
//!    metadata updates that were never written in place. qemu replays such a log when it opens
//!    the image read-write and refuses it read-only; this reader replays it in memory, into an
//!    overlay through which everything below is read, and never writes the source. A log that
//!    writes into a data block the guest reads is refused (the shared read path reads blocks
//!    from the file), with the command that replays it into a copy;
//! 3. the region table at 192 KiB (CRC-32C): the BAT and metadata regions, which may not
//!    overlap each other, the header section or the log;
//! 4. the metadata items ([`metadata`]): block size, leave-blocks-allocated (fixed disks),
//!    has-parent, virtual disk size, logical (512 or 4096) and physical sector size, and for a
//!    differencing disk the parent locator (`parent`);
//! 5. the BAT ([`map`]): only as many entries as the virtual size needs, each present block
//!    inside the file and outside the structures above, and the sector bitmaps of partly
//!    present blocks.
//!
//! A differencing disk's parent is asked for by the locator's names ([`SourceFiles::companion`]:
//! the client opens it), must be a VHDX whose DataWriteGuid is the child's `parent_linkage` (or
//! `parent_linkage2`) and whose size is the child's, and is opened as the layer below
//! ([`super::open_layer`]); sectors not in the child are read from it. qemu (block/vhdx.c)
//! cannot read differencing VHDX at all.
//!
//! # Memory
//!
//! The headers, region table and metadata table are fixed-size reads (4 KiB, 64 KiB, 64 KiB).
//! The map holds 8 bytes per payload block, at most [`map::MAX_BLOCKS`] (32 MiB), and at most
//! [`map::MAX_BITMAP_BYTES`] of sector bitmaps; sector-bitmap entries are skipped as the BAT
//! is read in 1 MiB pieces. A log is held while it is replayed, at most 32 MiB, and its data
//! sectors stay in the overlay while the metadata is read; the parent locator is at most
//! 64 KiB.
//!
//! # Shape
//!
//! The module parses and checks; the result is a [`VhdxLayout`] ([`Layout`]), read through the
//! shared [`LayeredImage`] like every other format.

pub mod crc32c;
pub mod header;
mod log;
pub mod map;
pub mod metadata;
mod parent;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use imgcrypt_proto::api::SourceFormat;

use self::log::{Overlay, Sectors};
use self::map::{Geometry, Map};
use self::metadata::Metadata;
use super::files::{FileKey, Relation, SourceFiles};
use super::layout::{LayeredImage, Layout, Mapped};
use super::{data_ranges, le_u16, le_u32, le_u64, read_exact_at, SourceImage};
use crate::formats::layout::heap_bytes;
use crate::sys::storage::{self, StorageKind};
use crate::{Error, Result};

/// The file identifier's signature at offset 0.
pub const SIGNATURE: &[u8; 8] = b"vhdxfile";

const MIB: u64 = 1 << 20;

/// A GUID as stored on disk (the MS layout: first three fields little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Guid(pub [u8; 16]);

impl Guid {
    const fn from_fields(a: u32, b: u16, c: u16, d: [u8; 8]) -> Self {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        Self([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-",
            u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
            u16::from_le_bytes([g[4], g[5]]),
            u16::from_le_bytes([g[6], g[7]]),
            g[8],
            g[9]
        )?;
        g[10..].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Whether the file starts with the VHDX file identifier.
pub(crate) fn detect(file: &File, file_size: u64) -> Result<bool> {
    if file_size < SIGNATURE.len() as u64 {
        return Ok(false);
    }
    let mut head = [0u8; 8];
    read_exact_at(file, &mut head, 0, "the first bytes")?;
    Ok(&head == SIGNATURE)
}

/// A VHDX layer's parsed, checked metadata.
#[derive(Debug)]
pub struct VhdxLayout {
    map: Map,
    virtual_size: u64,
    block_size: u64,
    allocated: Vec<Range<u64>>,
    replayed: Option<(usize, u64)>,
}

impl Layout for VhdxLayout {
    fn metadata_bytes(&self) -> u64 {
        self.map.heap_bytes() + heap_bytes(&self.allocated)
    }

    fn format(&self) -> SourceFormat {
        SourceFormat::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapped> {
        self.map.map(offset, len)
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.allocated
    }

    fn allocation_unit(&self) -> Option<u64> {
        Some(self.block_size)
    }

    fn data_name(&self) -> &'static str {
        "VHDX block"
    }

    fn read_notes(&self) -> Vec<String> {
        self.replayed
            .into_iter()
            .map(|(entries, head)| {
                format!(
                    "the VHDX log held {entries} entries never written in place (up to \
                     sequence number {head}); they were replayed in memory, and the source \
                     file was left unchanged"
                )
            })
            .collect()
    }
}

/// Opens the VHDX `key` of `files` (which `detect` recognised) as the layer below `above`,
/// with its parent when it is a differencing disk.
pub fn open(files: &SourceFiles, key: FileKey, above: &[FileKey]) -> Result<Box<dyn SourceImage>> {
    let file = files.file(key);
    let kind = storage::storage_kind(file)?;
    let file_size = storage::size_of(file)?;
    let (layout, metadata, overlay) = read_layout(file, kind, file_size)?;
    files.charge_metadata(key, layout.metadata_bytes())?;
    let own = vec![Arc::clone(file)];
    if !metadata.has_parent {
        return Ok(Box::new(LayeredImage::new(Box::new(layout), own)));
    }
    let (at, length) = metadata
        .parent_locator
        .ok_or_else(|| Error::corrupt("a differencing VHDX without a parent locator", None))?;
    if length > parent::MAX_LOCATOR_BYTES {
        return Err(Error::corrupt(
            format!(
                "the VHDX parent locator at offset {at} is {length} bytes, more than the \
                 {} this reader accepts: the differencing disk is damaged",
                parent::MAX_LOCATOR_BYTES
            ),
            Some(at),
        ));
    }
    let mut bytes = vec![0u8; length as usize];
    Sectors {
        file,
        overlay: &overlay,
    }
    .read(&mut bytes, at, "the VHDX parent locator")?;
    let locator = parent::parse(&bytes, at)?;
    let candidates = locator.candidates();
    if candidates.is_empty() {
        return Err(Error::corrupt(
            format!(
                "the VHDX parent locator at offset {at} names no parent path (no \
                 relative_path, volume_path or absolute_win32_path): the differencing disk \
                 cannot be read; merge it on the machine that made it (Hyper-V `Merge-VHD`)"
            ),
            Some(at),
        ));
    }
    let parent_key = files.companion(key, Relation::Parent, &candidates)?;
    let parent_name = files.name(parent_key).to_string();
    let parent_file = files.file(parent_key);
    let parent_size = storage::size_of(parent_file)?;
    if !detect(parent_file, parent_size)? || parent_size < MIB {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the parent `{parent_name}` of this differencing VHDX is not a VHDX; pass the \
                 parent it was made from"
            ),
        });
    }
    let parent_header = header::current_header(parent_file)?;
    if !locator.links_to(&parent_header.data_write_guid) {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the parent `{parent_name}` is not the disk this differencing VHDX was made \
                 from, or it changed since: its DataWriteGuid is {{{}}}, the child's \
                 parent_linkage is {}{}; pass the right parent (Hyper-V's \
                 `Set-VHD -ParentPath` relinks a child when you are sure)",
                parent_header.data_write_guid,
                locator.parent_linkage,
                locator
                    .parent_linkage2
                    .as_deref()
                    .map(|second| format!(" (parent_linkage2 {second})"))
                    .unwrap_or_default(),
            ),
        });
    }
    let mut chain = above.to_vec();
    chain.push(key);
    let parent = super::open_layer(files, parent_key, &chain)?;
    if parent.virtual_size() != layout.virtual_size {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the parent `{parent_name}` is {} bytes and this differencing VHDX {} bytes; \
                 a VHDX child and its parent have the same size: pass the right parent",
                parent.virtual_size(),
                layout.virtual_size
            ),
        });
    }
    Ok(Box::new(LayeredImage::with_backing(
        Box::new(layout),
        own,
        parent,
        parent_name,
    )))
}

/// Parses and checks the VHDX in `file` (which [`detect`] recognised), replaying its log in
/// memory when it needs it: the layout, the metadata, and the replayed writes.
fn read_layout(
    file: &File,
    kind: StorageKind,
    file_size: u64,
) -> Result<(VhdxLayout, Metadata, Overlay)> {
    if file_size < MIB {
        return Err(Error::corrupt(
            format!(
                "a VHDX (it starts with \"vhdxfile\") of only {file_size} bytes, shorter \
                 than its 1 MiB header section: the image is truncated"
            ),
            Some(0),
        ));
    }
    let header = header::current_header(file)?;
    let overlay = log::replay(file, file_size, &header)?;
    let sectors = Sectors {
        file,
        overlay: &overlay,
    };
    let mut taken = vec![header::HEADER_SECTION];
    if header.log_length > 0 {
        let end = header
            .log_offset
            .saturating_add(u64::from(header.log_length));
        taken.push(header.log_offset..end);
    }
    let regions = header::regions(sectors, file_size, &mut taken)?;
    let metadata = metadata::read(sectors, &regions.metadata)?;
    let map = Map::read(
        sectors,
        file_size,
        &regions.bat,
        Geometry::of(&metadata),
        &taken,
    )?;
    if !overlay.is_empty() {
        refuse_payload_writes(&overlay, &map)?;
    }
    let data = data_ranges(file, kind, file_size)?;
    let has_data = |range: Range<u64>| {
        let first = data.partition_point(|d| d.end <= range.start);
        data.get(first).is_some_and(|d| d.start < range.end)
    };
    let allocated = map.present(has_data);
    tracing::debug!(
        virtual_size = metadata.virtual_size,
        block_size = metadata.block_size,
        logical_sector_size = metadata.logical_sector_size,
        fixed = metadata.leave_blocks_allocated,
        differencing = metadata.has_parent,
        replayed_entries = overlay.entries,
        "opened a VHDX layer"
    );
    let replayed = (overlay.entries > 0).then_some((overlay.entries, overlay.head_sequence));
    Ok((
        VhdxLayout {
            map,
            virtual_size: metadata.virtual_size,
            block_size: u64::from(metadata.block_size),
            allocated,
            replayed,
        },
        metadata,
        overlay,
    ))
}

/// Refuses a replayed log that writes into a block the guest reads from the file: the shared
/// read path reads payload from the file only, so those bytes would be stale. (qemu's and
/// Hyper-V's logs carry metadata: BAT, sector bitmaps, region table, metadata region.)
fn refuse_payload_writes(overlay: &Overlay, map: &Map) -> Result<()> {
    let payload = map.payload_in_file();
    for written in overlay.ranges() {
        let first = payload.partition_point(|block| block.end <= written.start);
        if let Some(block) = payload.get(first).filter(|block| block.start < written.end) {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "this VHDX's log (never replayed: the disk was not closed cleanly) writes \
                     bytes {}..{} of the file, inside the data block at {}..{}; imgcrypt \
                     replays logs in memory for metadata only and never writes a source: \
                     {}",
                    written.start,
                    written.end,
                    block.start,
                    block.end,
                    log::REPLAY_ADVICE
                ),
            });
        }
    }
    Ok(())
}
