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
//! blocks overlap. The BAT is read only after its claimed size was checked against the file, so
//! the memory it takes is bounded by the file's size.

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
        let described = virtual_size.max(footer.current_size).div_ceil(block_size);
        if entries < needed || entries > described {
            return Err(corrupt(format!(
                "max_table_entries {entries} does not match the disk size: {virtual_size} bytes \
                 in blocks of {block_size} need {needed}{}",
                if described > needed {
                    format!(" (up to {described} for the footer's current size)")
                } else {
                    String::new()
                }
            )));
        }

        let table_offset = be_u64(&header, TABLE_OFFSET_AT);
        let table_bytes = entries * 4;
        let table_fits = table_offset
            .checked_add(table_bytes)
            .is_some_and(|end| end <= data_end);
        if !table_fits {
            return Err(corrupt(format!(
                "block allocation table at offset {table_offset} ({table_bytes} bytes) extends \
                 past the file's {data_end} bytes of data (truncated or damaged file)"
            )));
        }
        let mut areas: Vec<(Range<u64>, Area)> = vec![
            (0..FOOTER_SIZE as u64, Area::FooterCopy),
            (
                header_offset..header_offset + HEADER_SIZE as u64,
                Area::Header,
            ),
            (table_offset..table_offset + table_bytes, Area::Bat),
        ];
        // Metadata first, so a misplaced table is reported as such rather than through the
        // nonsense entries read from wherever it points.
        check_no_overlap(areas.clone(), header_offset, table_offset)?;
        let full_table = read_table(&file, table_offset, entries)?;

        let block_span = bitmap_size + block_size;
        for (index, &entry) in (0u64..).zip(&full_table) {
            if entry == UNALLOCATED {
                continue;
            }
            let start = u64::from(entry) * 512;
            // Cannot overflow: below 2^41 + 2^32 + 2^31.
            let end = start + block_span;
            if end > data_end {
                let entry_offset = table_offset + index * 4;
                return Err(Error::corrupt(
                    format!(
                        "VHD block allocation table entry {index} (at offset {entry_offset}) \
                         places block {index} at {start}..{end}, past the file's {data_end} \
                         bytes of data (truncated or damaged file)"
                    ),
                    Some(entry_offset),
                ));
            }
            areas.push((start..end, Area::Block { index }));
        }
        check_no_overlap(areas, header_offset, table_offset)?;

        let mut bat = full_table;
        // `needed <= entries`, which was the length read.
        bat.truncate(needed as usize);
        bat.shrink_to_fit();
        let mut allocated = Vec::new();
        for (index, &entry) in (0u64..).zip(&bat) {
            if entry != UNALLOCATED {
                let start = index * block_size;
                // Exact: the list is bounded by the BAT, itself bounded by the file's size.
                push_merged(
                    &mut allocated,
                    start..(start + block_size).min(virtual_size),
                    0,
                );
            }
        }
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

/// Reads `entries` big-endian BAT entries at `table_offset`. The caller has checked that they
/// lie inside the file, which bounds the allocation.
fn read_table(file: &File, table_offset: u64, entries: u64) -> Result<Vec<u32>> {
    let total_bytes = entries * 4;
    let capacity = usize::try_from(entries).map_err(|_| {
        Error::corrupt(
            format!("block allocation table of {entries} entries is too large to read"),
            Some(table_offset),
        )
    })?;
    let mut table = Vec::with_capacity(capacity);
    let mut chunk = vec![0u8; BAT_READ_CHUNK.min(total_bytes as usize)];
    let mut done = 0u64;
    while done < total_bytes {
        let length = (total_bytes - done).min(chunk.len() as u64) as usize;
        let piece = &mut chunk[..length];
        read_exact_at(file, piece, table_offset + done, "block allocation table")?;
        table.extend(
            piece
                .chunks_exact(4)
                .map(|entry| u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]])),
        );
        done += length as u64;
    }
    Ok(table)
}

/// Refuses any two areas of the file that share a byte.
fn check_no_overlap(
    mut areas: Vec<(Range<u64>, Area)>,
    header_offset: u64,
    table_offset: u64,
) -> Result<()> {
    // An empty area (a BAT of no entries) holds no byte; left in, it could sit between two
    // overlapping areas after sorting and hide them from the neighbour check.
    areas.retain(|(range, _)| !range.is_empty());
    // Stable, so of two blocks at the same place the later BAT entry is blamed.
    areas.sort_by_key(|(range, _)| (range.start, range.end));
    let describe = |range: &Range<u64>, area: Area| match area {
        Area::FooterCopy => format!("the footer copy at 0..{}", range.end),
        Area::Header => format!("the dynamic disk header at {}..{}", range.start, range.end),
        Area::Bat => format!(
            "the block allocation table at {}..{}",
            range.start, range.end
        ),
        Area::Block { index } => format!("block {index} at {}..{}", range.start, range.end),
    };
    // The structure whose pointer is wrong: a block's BAT entry, else the header.
    let blame = |area: Area| match area {
        Area::Block { index } => table_offset + index * 4,
        _ => header_offset,
    };
    for pair in areas.windows(2) {
        let ((first, first_area), (second, second_area)) = (&pair[0], &pair[1]);
        // Sorted by start, any overlap shows between neighbours.
        if second.start < first.end {
            let culprit = match (first_area, second_area) {
                (_, Area::Block { .. }) => *second_area,
                (Area::Block { .. }, _) => *first_area,
                _ => *second_area,
            };
            return Err(Error::corrupt(
                format!(
                    "dynamic VHD: {} overlaps {} (damaged block allocation table or header)",
                    describe(first, *first_area),
                    describe(second, *second_area)
                ),
                Some(blame(culprit)),
            ));
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
