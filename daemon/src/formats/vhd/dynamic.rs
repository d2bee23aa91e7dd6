//! Dynamic VHDs: the dynamic disk header, the block allocation table (BAT), and reads.
//!
//! Layout: a footer copy at 0, a 1024-byte header (cookie `cxsparse`) where the footer's data
//! offset points, a BAT of big-endian u32 entries (one per block; the sector number of the
//! block's start, or `0xFFFFFFFF` for "not allocated"), the blocks, and the footer at the end.
//! Each block is a sector bitmap (one bit per 512-byte sector, padded to whole sectors) followed
//! by `block_size` bytes of data.
//!
//! The sector bitmap is ignored, as qemu ignores it: every sector of an allocated block is read
//! from the block. For a dynamic (parentless) disk a clear bit means "never written"; such a
//! sector would differ from zeros only if its creator left garbage in a new block's data area
//! (qemu sets every bit when it allocates, and a new block is normally zero-filled file space).
//! Matching qemu keeps the output identical to what `qemu-img convert` produces, and saves a
//! bitmap read per block.
//!
//! Everything the reader later trusts is checked at open: the header and BAT lie inside the
//! file, every allocated block lies inside the file, and no two of footer copy, header, BAT and
//! blocks overlap. Each entry is checked as the BAT streams in, so a bad table fails at its
//! first bad entry (blocks overlapping one another are found once the table is in).
//!
//! # Memory
//!
//! Only the entries the virtual size needs (`ceil(size / block_size)`) are read, whatever
//! `max_table_entries` claims, and they are never more than [`MAX_BAT_ENTRIES`] (2²²): that is
//! checked before anything is allocated. So metadata memory is bounded whatever the input: at
//! most 16 MiB for the table, 16 MiB more while the blocks are checked for overlaps (a sorted
//! copy of the allocated entries), 1 MiB of read buffer, and 8 MiB for the allocated ranges
//! (exact up to 2²⁰ entries, joined across holes of up to 4 MiB above), so under 41 MiB at the
//! peak of an open. A disk of the format's maximum size, 2040 GiB, in the 2 MiB blocks every
//! known tool makes, needs 1 044 480 entries: 4 MiB of table.

use std::fs::File;
use std::ops::Range;

use imgcrypt_proto::api::SourceFormat;

use super::footer::{be_u32, be_u64, checksum, Footer, FOOTER_SIZE};
use crate::formats::{check_request, push_merged, read_exact_at, SourceImage};
use crate::{Error, Result};

/// Size of the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;

/// The header's magic cookie.
const COOKIE: &[u8; 8] = b"cxsparse";

/// The only header version defined (1.0).
const HEADER_VERSION: u32 = 0x0001_0000;

const TABLE_OFFSET_AT: usize = 16;
const VERSION_AT: usize = 24;
const MAX_TABLE_ENTRIES_AT: usize = 28;
const BLOCK_SIZE_AT: usize = 32;
const CHECKSUM_AT: usize = 36;

/// A BAT entry for a block with no data.
const UNALLOCATED: u32 = 0xFFFF_FFFF;

/// BAT entries are converted in pieces of this many bytes, so reading the table needs no second
/// full-size buffer.
const BAT_READ_CHUNK: usize = 1 << 20;

/// Most BAT entries a disk may need: 16 MiB of table. Enough for the largest VHD (2040 GiB) in
/// blocks of 512 KiB or more, and for any block size up to 4 GiB of disk per KiB of block.
pub const MAX_BAT_ENTRIES: u64 = 1 << 22;

/// Tables up to this many entries get exact allocated ranges: at most 2¹⁹ ranges (8 MiB).
const EXACT_RANGES_UP_TO: u64 = 1 << 20;

/// Above [`EXACT_RANGES_UP_TO`] entries, allocated ranges are joined across holes of up to this
/// many bytes, which keeps them under 2040 GiB / 4 MiB = 522 240 ranges (8 MiB). Reading a
/// joined hole costs a memset: unallocated blocks are zero-filled without I/O.
const LARGE_TABLE_JOIN_GAP: u64 = 4 << 20;

/// An open dynamic VHD.
#[derive(Debug)]
pub struct DynamicVhd {
    file: File,
    virtual_size: u64,
    block_size: u64,
    bitmap_size: u64,
    /// One entry per block of the virtual disk (entries past the virtual size are dropped).
    bat: Vec<u32>,
    allocated: Vec<Range<u64>>,
}

/// One area of the file, for the overlap check.
#[derive(Debug, Clone, Copy)]
enum Area {
    FooterCopy,
    Header,
    Bat,
    Block { index: u64 },
}

impl DynamicVhd {
    /// Opens the dynamic disk described by `footer`. `data_end` is where the footer at the end
    /// of the file starts (or the file size, when there is no footer there), so blocks must end
    /// at or before it.
    pub(super) fn open(file: File, footer: &Footer, data_end: u64) -> Result<Self> {
        let virtual_size = footer.virtual_size()?;
        let header_offset = footer.data_offset;
        let header_fits = header_offset
            .checked_add(HEADER_SIZE as u64)
            .is_some_and(|end| end <= data_end);
        if !header_fits {
            return Err(Error::corrupt(
                format!(
                    "VHD footer at offset {}: dynamic disk header offset {header_offset} is \
                     outside the file's {data_end} bytes of data (truncated or damaged file)",
                    footer.offset
                ),
                Some(footer.offset),
            ));
        }
        let mut header = [0u8; HEADER_SIZE];
        read_exact_at(&file, &mut header, header_offset, "dynamic disk header")?;
        let corrupt = |what: String| {
            Error::corrupt(
                format!("dynamic VHD header at offset {header_offset}: {what}"),
                Some(header_offset),
            )
        };
        if &header[..8] != COOKIE {
            return Err(corrupt(
                "cookie is not \"cxsparse\" (wrong data offset in the footer, or damaged header)"
                    .into(),
            ));
        }
        let stored = be_u32(&header, CHECKSUM_AT);
        let computed = checksum(&header, CHECKSUM_AT);
        if stored != computed {
            return Err(corrupt(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let version = be_u32(&header, VERSION_AT);
        if version != HEADER_VERSION {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "dynamic VHD header at offset {header_offset}: version {}.{} (only 1.0 is \
                     defined); convert the image with the tool that made it",
                    version >> 16,
                    version & 0xffff
                ),
            });
        }
        let block_size = be_u32(&header, BLOCK_SIZE_AT);
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(corrupt(format!(
                "block size {block_size} is not a power of two of at least 512 bytes"
            )));
        }
        let block_size = u64::from(block_size);
        // One bit per sector, padded to whole sectors (VHD specification). For blocks of 4 KiB
        // and more this equals qemu's formula; below it qemu computes 0, which the
        // specification contradicts. qemu itself only makes 2 MiB blocks.
        let bitmap_size = (block_size / 512).div_ceil(8).next_multiple_of(512);

        let entries = u64::from(be_u32(&header, MAX_TABLE_ENTRIES_AT));
        let needed = virtual_size.div_ceil(block_size);
        if entries < needed {
            return Err(corrupt(format!(
                "max_table_entries {entries} is too small for the disk: {virtual_size} bytes in \
                 blocks of {block_size} need {needed}"
            )));
        }
        // Checked before anything is allocated: the table kept in memory is this long.
        if needed > MAX_BAT_ENTRIES {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "dynamic VHD header at offset {header_offset}: a {virtual_size}-byte disk in \
                     blocks of {block_size} bytes needs {needed} block allocation table entries, \
                     more than the {MAX_BAT_ENTRIES} this reader holds (enough for the largest \
                     VHD in blocks of 512 KiB or more); rewrite it with 2 MiB blocks first: \
                     `qemu-img convert -f vpc -O vpc SOURCE NEW.vhd`"
                ),
            });
        }

        // Entries past `needed` (a table declared larger than the disk, as Virtual PC does when
        // its geometry rounds the disk down) map no guest byte: they are neither read nor
        // checked, and the table's area in the file is the part that is read.
        let table_offset = be_u64(&header, TABLE_OFFSET_AT);
        let table_bytes = needed * 4;
        let table_fits = table_offset
            .checked_add(table_bytes)
            .is_some_and(|end| end <= data_end);
        if !table_fits {
            return Err(corrupt(format!(
                "block allocation table at offset {table_offset} ({table_bytes} bytes) extends \
                 past the file's {data_end} bytes of data (truncated or damaged file)"
            )));
        }
        let metadata = [
            (0..FOOTER_SIZE as u64, Area::FooterCopy),
            (
                header_offset..header_offset + HEADER_SIZE as u64,
                Area::Header,
            ),
            (table_offset..table_offset + table_bytes, Area::Bat),
        ];
        // Metadata first, so a misplaced table is reported as such rather than through the
        // nonsense entries read from wherever it points.
        check_metadata_overlap(&metadata, header_offset)?;
        let layout = Layout {
            metadata,
            table_offset,
            block_span: bitmap_size + block_size,
            data_end,
        };
        let bat = read_table(&file, &layout, needed)?;
        layout.check_blocks_disjoint(&bat)?;

        let join_gap = if needed <= EXACT_RANGES_UP_TO {
            0
        } else {
            LARGE_TABLE_JOIN_GAP
        };
        let mut allocated = Vec::new();
        for (index, &entry) in (0u64..).zip(&bat) {
            if entry != UNALLOCATED {
                let start = index * block_size;
                push_merged(
                    &mut allocated,
                    start..(start + block_size).min(virtual_size),
                    join_gap,
                );
            }
        }
        allocated.shrink_to_fit();
        Ok(Self {
            file,
            virtual_size,
            block_size,
            bitmap_size,
            bat,
            allocated,
        })
    }
}

/// Where a dynamic disk's structures are, for checking each BAT entry against them.
struct Layout {
    /// Footer copy, header and the part of the BAT that is read.
    metadata: [(Range<u64>, Area); 3],
    table_offset: u64,
    /// Bytes each block takes in the file: its sector bitmap and its data.
    block_span: u64,
    /// Blocks must end at or before this (the footer at the end, or the end of the file).
    data_end: u64,
}

impl Layout {
    /// File offset of BAT entry `index`, which a bad block is reported at.
    fn entry_offset(&self, index: u64) -> u64 {
        self.table_offset + index * 4
    }

    fn block(&self, entry: u32) -> Range<u64> {
        let start = u64::from(entry) * 512;
        // Cannot overflow: below 2^41 + 2^32 + 2^31.
        start..start + self.block_span
    }

    /// Checks allocated entry `index` on its own: its block lies inside the file's data and
    /// off the metadata. (Entries count 512-byte sectors, so every block is sector-aligned by
    /// construction; the specification asks for no coarser alignment, and qemu for none.)
    fn check_entry(&self, index: u64, entry: u32) -> Result<()> {
        let block = self.block(entry);
        let entry_offset = self.entry_offset(index);
        if block.end > self.data_end {
            return Err(Error::corrupt(
                format!(
                    "VHD block allocation table entry {index} (at offset {entry_offset}) \
                     places block {index} at {}..{}, past the file's {} bytes of data \
                     (truncated or damaged file)",
                    block.start, block.end, self.data_end
                ),
                Some(entry_offset),
            ));
        }
        for (area, what) in &self.metadata {
            if block.start < area.end && area.start < block.end {
                return Err(Error::corrupt(
                    format!(
                        "dynamic VHD: {} overlaps {} (damaged block allocation table or header)",
                        describe(area, *what),
                        describe(&block, Area::Block { index })
                    ),
                    Some(entry_offset),
                ));
            }
        }
        Ok(())
    }

    /// Refuses two allocated blocks that share a byte.
    ///
    /// Sorts a copy of the allocated entries (4 bytes each, so at most as large as `bat`
    /// itself) rather than a list of ranges with their indices; only when an overlap is found
    /// is the BAT scanned again to name the two entries.
    fn check_blocks_disjoint(&self, bat: &[u32]) -> Result<()> {
        let mut starts: Vec<u32> = bat
            .iter()
            .copied()
            .filter(|&entry| entry != UNALLOCATED)
            .collect();
        starts.sort_unstable();
        let clash = starts
            .windows(2)
            .find(|pair| self.block(pair[0]).end > self.block(pair[1]).start)
            .map(|pair| (pair[0], pair[1]));
        drop(starts);
        let Some((lower, upper)) = clash else {
            return Ok(());
        };
        // Cannot fail: both values were taken from the table (equal values twice over).
        let first = bat.iter().position(|&entry| entry == lower).unwrap_or(0);
        let second = bat
            .iter()
            .enumerate()
            .position(|(index, &entry)| entry == upper && index != first)
            .unwrap_or(0);
        let (first, second) = (first as u64, second as u64);
        Err(Error::corrupt(
            format!(
                "dynamic VHD: {} overlaps {} (damaged block allocation table or header)",
                describe(&self.block(lower), Area::Block { index: first }),
                describe(&self.block(upper), Area::Block { index: second })
            ),
            // Of two entries, the later one is blamed: the earlier one was there first.
            Some(self.entry_offset(first.max(second))),
        ))
    }
}

/// Reads the first `entries` big-endian BAT entries, `BAT_READ_CHUNK` bytes at a time, checking
/// each allocated one as it arrives, so a bad table fails at its first bad entry. The caller
/// has checked `entries` against [`MAX_BAT_ENTRIES`] and the file, which bounds the allocation.
fn read_table(file: &File, layout: &Layout, entries: u64) -> Result<Vec<u32>> {
    let total_bytes = entries * 4;
    // `entries <= MAX_BAT_ENTRIES`, so these conversions are exact.
    let mut table = Vec::with_capacity(entries as usize);
    let mut chunk = vec![0u8; BAT_READ_CHUNK.min(total_bytes as usize)];
    let mut done = 0u64;
    while done < total_bytes {
        let length = (total_bytes - done).min(chunk.len() as u64) as usize;
        let piece = &mut chunk[..length];
        read_exact_at(
            file,
            piece,
            layout.table_offset + done,
            "block allocation table",
        )?;
        for raw in piece.chunks_exact(4) {
            let entry = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            if entry != UNALLOCATED {
                layout.check_entry(table.len() as u64, entry)?;
            }
            table.push(entry);
        }
        done += length as u64;
    }
    Ok(table)
}

/// How an area is named in messages.
fn describe(range: &Range<u64>, area: Area) -> String {
    match area {
        Area::FooterCopy => format!("the footer copy at 0..{}", range.end),
        Area::Header => format!("the dynamic disk header at {}..{}", range.start, range.end),
        Area::Bat => format!(
            "the block allocation table at {}..{}",
            range.start, range.end
        ),
        Area::Block { index } => format!("block {index} at {}..{}", range.start, range.end),
    }
}

/// Refuses two of footer copy, header and BAT that share a byte; the header, which holds the
/// table's offset, is blamed.
fn check_metadata_overlap(metadata: &[(Range<u64>, Area); 3], header_offset: u64) -> Result<()> {
    for (i, (first, first_area)) in metadata.iter().enumerate() {
        for (second, second_area) in &metadata[i + 1..] {
            // An empty area (a BAT of no entries) holds no byte.
            if first.is_empty() || second.is_empty() {
                continue;
            }
            if first.start < second.end && second.start < first.end {
                let (a, b) = if first.start <= second.start {
                    ((first, *first_area), (second, *second_area))
                } else {
                    ((second, *second_area), (first, *first_area))
                };
                return Err(Error::corrupt(
                    format!(
                        "dynamic VHD: {} overlaps {} (damaged block allocation table or header)",
                        describe(a.0, a.1),
                        describe(b.0, b.1)
                    ),
                    Some(header_offset),
                ));
            }
        }
    }
    Ok(())
}

impl SourceImage for DynamicVhd {
    fn format(&self) -> SourceFormat {
        SourceFormat::VhdDynamic
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// One `pread` per allocated block touched: a block's data is contiguous in the file, but two
    /// blocks' data never are (the next block's bitmap sits between them). Unallocated blocks are
    /// zero-filled without I/O.
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.virtual_size, offset, buffer.len())?;
        let mut done = 0usize;
        while done < buffer.len() {
            let position = offset + done as u64;
            let index = position / self.block_size;
            let within_block = position % self.block_size;
            let length = (buffer.len() - done).min((self.block_size - within_block) as usize);
            let piece = &mut buffer[done..done + length];
            // `index` is below `bat.len()`: the request ends within the virtual size, and the
            // BAT kept one entry per block of it.
            match self.bat[index as usize] {
                UNALLOCATED => piece.fill(0),
                sector => {
                    let data_offset = u64::from(sector) * 512 + self.bitmap_size + within_block;
                    read_exact_at(&self.file, piece, data_offset, "a dynamic VHD block")?;
                }
            }
            done += length;
        }
        Ok(())
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.allocated
    }
}
