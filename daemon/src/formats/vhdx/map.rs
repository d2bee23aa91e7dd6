//! The block allocation table (MS-VHDX 2.5) turned into a map from guest offsets to where their
//! bytes are: in the file, zeros, or (in a differencing disk) in the parent.
//!
//! The BAT interleaves one sector-bitmap entry after every `chunk_ratio` payload entries, where
//! `chunk_ratio = 2²³ · logical_sector_size / block_size` (the number of payload blocks one
//! 1 MiB sector-bitmap block describes). Payload block *i* is therefore BAT entry
//! `i + i / chunk_ratio`, and the bitmap entry of chunk *c* is entry `(c + 1)(chunk_ratio + 1) - 1`.
//!
//! Each entry holds a state in bits 0–2 and the block's file offset in MiB in bits 20–63.
//! For a disk without a parent, qemu (block/vhdx.c `vhdx_co_readv`) reads NOT_PRESENT (0),
//! UNDEFINED (1), ZERO (2), UNMAPPED (3 in the 0.95 draft, 5 in 1.0) as zeros and
//! FULLY_PRESENT (6) from the file. In a differencing disk NOT_PRESENT and UNDEFINED mean "in
//! the parent", ZERO and UNMAPPED still read as zeros, and PARTIALLY_PRESENT (7) blocks are
//! split by their sector bitmap: one bit per logical sector, least significant bit first, set
//! for the child's sectors, clear for the parent's. State 4 is not defined. Every state is
//! checked when the map is built, never in the middle of a copy.
//!
//! Memory: 8 bytes per payload block (at most [`MAX_BLOCKS`]), plus the bitmap of each partly
//! present block (`block_size / logical_sector_size / 8` bytes, at most [`MAX_BITMAP_BYTES`]
//! in all).

use std::ops::Range;

use super::log::Sectors;
use super::metadata::Metadata;
use super::MIB;
use crate::formats::layout::heap_bytes;
use crate::formats::layout::{Chunk, Mapped};
use crate::{Error, Result};

/// The map holds at most this many payload blocks (32 MiB of memory): 4 TiB of 1 MiB blocks,
/// more than the 64 TiB maximum with the 32 MiB blocks qemu and Hyper-V choose for large disks.
pub const MAX_BLOCKS: u64 = 1 << 22;
/// The sector bitmaps of partly present blocks kept, at most (a differencing disk of 4 TiB in
/// 2 MiB blocks of 512-byte sectors with every block partly present needs 1 GiB: such a
/// disk is refused, with what to do).
pub const MAX_BITMAP_BYTES: u64 = 32 * MIB;
/// The BAT is read in pieces this size.
const READ_CHUNK: usize = 1 << 20;

const STATE_MASK: u64 = 7;
const NOT_PRESENT: u64 = 0;
const UNDEFINED: u64 = 1;
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;
/// A sector bitmap entry's state when its bitmap block is in the file.
const SECTOR_BITMAP_PRESENT: u64 = 6;
const OFFSET_MASK: u64 = !(MIB - 1);
/// Zero states (NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED of the 0.95 draft and of 1.0) of a
/// disk without a parent.
const ZERO_STATES: [u64; 5] = [0, 1, 2, 3, 5];
/// How a sector bitmap block is called in messages.
const BITMAP_BLOCK_BYTES: u64 = MIB;

/// How a block is kept: the file offset (a multiple of 1 MiB, never 0) or'd with one of these.
const KEPT_ZERO: u64 = 0;
const KEPT_BACKING: u64 = 1;
const KEPT_PRESENT: u64 = 2;
const KEPT_PARTIAL: u64 = 3;

/// The payload blocks of a disk.
#[derive(Debug)]
pub struct Map {
    block_size: u64,
    sector_size: u64,
    virtual_size: u64,
    /// Each block: a `KEPT_*` tag in the low bits, the file offset above.
    blocks: Vec<u64>,
    /// The sector bitmaps of the partly present blocks, by block number, sorted.
    bitmaps: Vec<(u64, Box<[u8]>)>,
}

/// What the BAT reader needs of the disk.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Bytes the guest sees.
    pub virtual_size: u64,
    /// Bytes per payload block.
    pub block_size: u32,
    /// 512 or 4096: what a sector bitmap's bit stands for.
    pub logical_sector_size: u32,
    /// A differencing disk: unallocated blocks are in the parent.
    pub has_parent: bool,
}

impl Geometry {
    pub(super) fn of(metadata: &Metadata) -> Self {
        Self {
            virtual_size: metadata.virtual_size,
            block_size: metadata.block_size,
            logical_sector_size: metadata.logical_sector_size,
            has_parent: metadata.has_parent,
        }
    }
}

impl Map {
    /// Heap bytes of the block table and the kept sector bitmaps.
    pub fn heap_bytes(&self) -> u64 {
        let bitmaps: u64 = self
            .bitmaps
            .iter()
            .map(|(_, bitmap)| bitmap.len() as u64)
            .sum();
        heap_bytes(&self.blocks) + heap_bytes(&self.bitmaps) + bitmaps
    }

    /// Reads the BAT in `bat` (through `sectors`, so a replayed log is seen) for a disk of
    /// `geometry`. Present blocks and sector bitmaps must lie inside the file (as far as the
    /// guest sees them) and outside the structures in `taken`.
    pub fn read(
        sectors: Sectors<'_>,
        file_size: u64,
        bat: &Range<u64>,
        geometry: Geometry,
        taken: &[Range<u64>],
    ) -> Result<Self> {
        let Geometry {
            virtual_size,
            has_parent,
            ..
        } = geometry;
        let block_size = u64::from(geometry.block_size);
        let sector_size = u64::from(geometry.logical_sector_size);
        let blocks = virtual_size.div_ceil(block_size);
        if blocks > MAX_BLOCKS {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "this VHDX has {blocks} blocks of {block_size} bytes, more than the \
                     {MAX_BLOCKS} this reader holds; convert it with a larger block size \
                     (`qemu-img convert -O vhdx -o block_size=32M`) or to raw"
                ),
            });
        }
        let chunk_ratio = (1u64 << 23) * sector_size / block_size;
        let chunks = blocks.div_ceil(chunk_ratio);
        // A differencing disk's BAT ends with the last chunk's bitmap entry; a disk without a
        // parent needs none after its last payload entry.
        let entries = match (blocks, has_parent) {
            (0, _) => 0,
            (_, true) => chunks * (chunk_ratio + 1),
            (_, false) => blocks + (blocks - 1) / chunk_ratio,
        };
        let bat_bytes = bat.end - bat.start;
        if entries * 8 > bat_bytes {
            return Err(Error::corrupt(
                format!(
                    "the VHDX BAT region ({bat_bytes} bytes at offset {}) is too small for the \
                     {entries} entries a {virtual_size}-byte disk of {block_size}-byte blocks \
                     needs",
                    bat.start
                ),
                Some(bat.start),
            ));
        }
        // `blocks <= MAX_BLOCKS` and `chunks <= blocks`, so these allocations are bounded.
        let mut map = Vec::with_capacity(blocks as usize);
        let mut bitmap_entries: Vec<u64> = Vec::with_capacity(chunks as usize);
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut index = 0u64;
        while index < entries {
            let count = (entries - index).min((READ_CHUNK / 8) as u64);
            let bytes = &mut chunk[..count as usize * 8];
            sectors.read(bytes, bat.start + index * 8, "the VHDX BAT")?;
            for (i, raw) in bytes.chunks_exact(8).enumerate() {
                let entry_index = index + i as u64;
                let entry = u64::from_le_bytes(raw.try_into().expect("8 bytes"));
                // Every (chunk_ratio + 1)th entry is a sector bitmap entry.
                if (entry_index + 1) % (chunk_ratio + 1) == 0 {
                    bitmap_entries.push(entry);
                    continue;
                }
                let block = map.len() as u64;
                if block == blocks {
                    // Past the last block, before the last chunk's bitmap entry.
                    continue;
                }
                map.push(check_entry(
                    Entry {
                        value: entry,
                        block,
                        index: entry_index,
                        at: bat.start + entry_index * 8,
                    },
                    has_parent,
                    file_size,
                    (virtual_size - block * block_size).min(block_size),
                    taken,
                )?);
            }
            index += count;
        }
        debug_assert_eq!(map.len() as u64, blocks);
        let mut built = Self {
            block_size,
            sector_size,
            virtual_size,
            blocks: map,
            bitmaps: Vec::new(),
        };
        built.read_bitmaps(
            sectors,
            file_size,
            bat.start,
            chunk_ratio,
            &bitmap_entries,
            taken,
        )?;
        Ok(built)
    }

    /// Reads the sector bitmap of every partly present block.
    fn read_bitmaps(
        &mut self,
        sectors: Sectors<'_>,
        file_size: u64,
        bat_at: u64,
        chunk_ratio: u64,
        bitmap_entries: &[u64],
        taken: &[Range<u64>],
    ) -> Result<()> {
        let per_block = self.block_size / self.sector_size / 8;
        let partial = self
            .blocks
            .iter()
            .filter(|&&kept| kept & STATE_MASK == KEPT_PARTIAL)
            .count() as u64;
        if partial.saturating_mul(per_block) > MAX_BITMAP_BYTES {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "this differencing VHDX has {partial} partly present blocks, whose sector \
                     bitmaps ({per_block} bytes each) exceed the {MAX_BITMAP_BYTES} bytes this \
                     reader holds: merge it into its parent first (Hyper-V `Merge-VHD`)"
                ),
            });
        }
        for block in 0..self.blocks.len() as u64 {
            if self.blocks[block as usize] & STATE_MASK != KEPT_PARTIAL {
                continue;
            }
            let chunk = block / chunk_ratio;
            let entry_index = (chunk + 1) * (chunk_ratio + 1) - 1;
            let at = bat_at + entry_index * 8;
            let entry = bitmap_entries.get(chunk as usize).copied().unwrap_or(0);
            if entry & STATE_MASK != SECTOR_BITMAP_PRESENT {
                return Err(Error::corrupt(
                    format!(
                        "VHDX block {block} is PARTIALLY_PRESENT but the sector bitmap entry of \
                         its chunk (BAT entry {entry_index}) has state {}, not present: the \
                         image is damaged",
                        entry & STATE_MASK
                    ),
                    Some(at),
                ));
            }
            let start = entry & OFFSET_MASK;
            let end = start.saturating_add(BITMAP_BLOCK_BYTES);
            if start < MIB || end > file_size {
                return Err(Error::corrupt(
                    format!(
                        "VHDX BAT entry {entry_index} puts a sector bitmap at bytes \
                         {start}..{end}, in the header section or past the end of the \
                         {file_size}-byte file"
                    ),
                    Some(at),
                ));
            }
            if let Some(other) = taken.iter().find(|t| t.start < end && start < t.end) {
                return Err(Error::corrupt(
                    format!(
                        "VHDX BAT entry {entry_index} puts a sector bitmap at bytes \
                         {start}..{end}, over bytes {}..{} of the image's own structures",
                        other.start, other.end
                    ),
                    Some(at),
                ));
            }
            let mut bitmap = vec![0u8; per_block as usize].into_boxed_slice();
            let within = (block % chunk_ratio) * per_block;
            sectors.read(&mut bitmap, start + within, "a VHDX sector bitmap")?;
            self.bitmaps.push((block, bitmap));
        }
        Ok(())
    }

    /// Where the bytes from guest `offset` are, for up to `len` of them (never past the end of
    /// the block, nor past a change of bit in a partly present block's bitmap). The caller
    /// guarantees `0 < len` and `offset + len <= virtual_size`.
    pub fn map(&self, offset: u64, len: u64) -> Result<Mapped> {
        let block = offset / self.block_size;
        let within = offset % self.block_size;
        let len = len
            .min(self.block_size - within)
            .min(self.virtual_size.saturating_sub(offset));
        let kept = *self.blocks.get(block as usize).ok_or_else(|| {
            Error::corrupt(
                format!("guest offset {offset} is past the VHDX block map"),
                None,
            )
        })?;
        let start = kept & !STATE_MASK;
        let chunk = match kept & STATE_MASK {
            KEPT_ZERO => Chunk::Zero,
            KEPT_BACKING => Chunk::Backing,
            KEPT_PRESENT => Chunk::Data {
                file: 0,
                offset: start + within,
            },
            _ => {
                let bitmap = self.bitmap(block)?;
                let first = within / self.sector_size;
                let bit = |sector: u64| bitmap[(sector / 8) as usize] >> (sector % 8) & 1 == 1;
                let present = bit(first);
                let last = (within + len).div_ceil(self.sector_size);
                let mut sector = first + 1;
                while sector < last && bit(sector) == present {
                    sector += 1;
                }
                let run = (sector * self.sector_size).min(within + len) - within;
                let chunk = if present {
                    Chunk::Data {
                        file: 0,
                        offset: start + within,
                    }
                } else {
                    Chunk::Backing
                };
                return Ok(Mapped { len: run, chunk });
            }
        };
        Ok(Mapped { len, chunk })
    }

    fn bitmap(&self, block: u64) -> Result<&[u8]> {
        self.bitmaps
            .binary_search_by_key(&block, |(number, _)| *number)
            .map(|found| &*self.bitmaps[found].1)
            .map_err(|_| {
                Error::corrupt(
                    format!("VHDX block {block} is partly present but has no sector bitmap"),
                    None,
                )
            })
    }

    /// Guest ranges this disk stores, adjacent ones joined, in order: the present blocks for
    /// which `has_data(file range)` holds (so that a block the file system holds as a hole is
    /// skipped), and the sectors a partly present block's bitmap marks.
    pub fn present(&self, has_data: impl Fn(Range<u64>) -> bool) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let mut push = |range: Range<u64>| match ranges.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => ranges.push(range),
        };
        for (block, &kept) in self.blocks.iter().enumerate() {
            let start = block as u64 * self.block_size;
            let end = (start + self.block_size).min(self.virtual_size);
            let at = kept & !STATE_MASK;
            match kept & STATE_MASK {
                KEPT_PRESENT if has_data(at..at + (end - start)) => push(start..end),
                KEPT_PARTIAL => {
                    let mut offset = start;
                    while offset < end {
                        let Ok(mapped) = self.map(offset, end - offset) else {
                            break;
                        };
                        if matches!(mapped.chunk, Chunk::Data { .. }) {
                            push(offset..offset + mapped.len);
                        }
                        offset += mapped.len;
                    }
                }
                _ => {}
            }
        }
        ranges
    }

    /// The file ranges of the blocks whose bytes the guest reads from the file (present and
    /// partly present ones), sorted by file offset.
    pub fn payload_in_file(&self) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = self
            .blocks
            .iter()
            .filter(|&&kept| matches!(kept & STATE_MASK, KEPT_PRESENT | KEPT_PARTIAL))
            .map(|&kept| {
                let at = kept & !STATE_MASK;
                at..at + self.block_size
            })
            .collect();
        ranges.sort_by_key(|range| range.start);
        ranges
    }
}

/// One payload entry of the BAT, and where it is.
struct Entry {
    value: u64,
    block: u64,
    index: u64,
    /// Its file offset.
    at: u64,
}

/// Checks one payload entry and returns how its block is kept.
fn check_entry(
    entry: Entry,
    has_parent: bool,
    file_size: u64,
    guest_bytes: u64,
    taken: &[Range<u64>],
) -> Result<u64> {
    let Entry {
        value,
        block,
        index: entry_index,
        at,
    } = entry;
    let state = value & STATE_MASK;
    if has_parent && (state == NOT_PRESENT || state == UNDEFINED) {
        return Ok(KEPT_BACKING);
    }
    if ZERO_STATES.contains(&state) {
        return Ok(KEPT_ZERO);
    }
    if state == PARTIALLY_PRESENT && !has_parent {
        return Err(Error::corrupt(
            format!(
                "VHDX BAT entry {entry_index} marks block {block} PARTIALLY_PRESENT, a state \
                 only differencing disks use, in a disk without a parent: the image is damaged"
            ),
            Some(at),
        ));
    }
    if state != FULLY_PRESENT && state != PARTIALLY_PRESENT {
        return Err(Error::corrupt(
            format!("VHDX BAT entry {entry_index} (block {block}) has the undefined state {state}"),
            Some(at),
        ));
    }
    let start = value & OFFSET_MASK;
    let end = start.saturating_add(guest_bytes);
    if start < MIB {
        return Err(Error::corrupt(
            format!(
                "VHDX BAT entry {entry_index} puts block {block} at offset {start}, inside the \
                 header section"
            ),
            Some(at),
        ));
    }
    if end > file_size {
        return Err(Error::corrupt(
            format!(
                "VHDX BAT entry {entry_index} puts block {block} at bytes {start}..{end}, past \
                 the end of the {file_size}-byte file: the image is truncated; obtain a \
                 complete copy"
            ),
            Some(at),
        ));
    }
    if let Some(other) = taken.iter().find(|t| t.start < end && start < t.end) {
        return Err(Error::corrupt(
            format!(
                "VHDX BAT entry {entry_index} puts block {block} at bytes {start}..{end}, over \
                 bytes {}..{} of the image's own structures (log, BAT or metadata)",
                other.start, other.end
            ),
            Some(at),
        ));
    }
    Ok(start
        | if state == FULLY_PRESENT {
            KEPT_PRESENT
        } else {
            KEPT_PARTIAL
        })
}
