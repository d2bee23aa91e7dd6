//! Dynamic and differencing VHDs: the dynamic disk header, the block allocation table (BAT),
//! and the [`Layout`] the shared reader reads them through.
//!
//! Layout: a footer copy at 0, a 1024-byte header (cookie `cxsparse`) where the footer's data
//! offset points, a BAT of big-endian u32 entries (one per block; the sector number of the
//! block's start, or `0xFFFFFFFF` for "not allocated"), the blocks, and the footer at the end.
//! Each block is a sector bitmap (one bit per 512-byte sector, padded to whole sectors) followed
//! by `block_size` bytes of data.
//!
//! A dynamic disk's sector bitmap is ignored, as qemu ignores it: every sector of an allocated
//! block is read from the block, and an unallocated block reads as zeros. (A differencing disk's
//! bitmaps decide which sectors are its own, see [`super::differencing`].) For a dynamic (parentless) disk a clear bit means "never written"; such a
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
//! peak of an open. A blktap VHD may be up to 8 TiB (2²² blocks of 2 MiB): its ranges, each a
//! block or more with more than 4 MiB between them, are then at most 1.4 M (22 MiB), so under
//! 55 MiB at the peak. A disk of the format's maximum size, 2040 GiB, in the 2 MiB blocks every
//! known tool makes, needs 1 044 480 entries: 4 MiB of table. A differencing disk adds four
//! bytes per entry and at most 64 MiB of sector bitmaps ([`super::differencing`]).

use std::fs::File;
use std::ops::Range;

use imgcrypt_proto::api::SourceFormat;

use super::batmap::{self, KeyHash};
use super::differencing::Presence;
use super::footer::{be_u32, be_u64, checksum, DiskType, Footer, FOOTER_SIZE};
use crate::formats::layout::heap_bytes;
use crate::formats::layout::{Chunk, Layout, Mapped};
use crate::formats::{push_merged, read_exact_at};
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
pub(super) const UNALLOCATED: u32 = 0xFFFF_FFFF;

/// BAT entries are converted in pieces of this many bytes, so reading the table needs no second
/// full-size buffer.
const BAT_READ_CHUNK: usize = 1 << 20;

/// Most BAT entries a disk may need: 16 MiB of table. Enough for the largest VHD (2040 GiB) in
/// blocks of 512 KiB or more, and for any block size up to 4 GiB of disk per KiB of block.
pub const MAX_BAT_ENTRIES: u64 = 1 << 22;

/// Tables up to this many entries get exact allocated ranges: at most 2¹⁹ ranges (8 MiB).
const EXACT_RANGES_UP_TO: u64 = 1 << 20;

/// Above [`EXACT_RANGES_UP_TO`] entries, allocated ranges are joined across holes of up to this
/// many bytes, which keeps them under 2040 GiB / 4 MiB = 522 240 ranges (8 MiB), or 8 TiB / 6 MiB
/// ≈ 1.4 M ranges (22 MiB) for the largest blktap VHD read. Reading a
/// joined hole costs a memset: unallocated blocks are zero-filled without I/O.
const LARGE_TABLE_JOIN_GAP: u64 = 4 << 20;

/// An open dynamic or differencing VHD: its checked header and table.
#[derive(Debug)]
pub struct DynamicVhd {
    /// [`SourceFormat::VhdDynamic`] or [`SourceFormat::VhdDifferencing`].
    format: SourceFormat,
    /// The dynamic disk header as read (checksum checked): a differencing disk's parent
    /// fields are parsed from it by [`super::differencing`].
    header: Box<[u8; HEADER_SIZE]>,
    virtual_size: u64,
    block_size: u64,
    bitmap_size: u64,
    /// One entry per block of the virtual disk (entries past the virtual size are dropped).
    bat: Vec<u32>,
    allocated: Vec<Range<u64>>,
    /// blktap's batmap, when the disk has one: the key hash, and which blocks are full.
    batmap: Option<Batmap>,
    /// The footer's disk UUID.
    uuid: [u8; 16],
    /// File offset of the first allocated block's data, if any.
    first_data: Option<u64>,
    /// A differencing disk's sector bitmaps, once read ([`Self::set_presence`]).
    presence: Option<Presence>,
    /// What the user should know about how the disk was read.
    notes: Vec<String>,
}

/// What a blktap batmap says (see [`super::batmap`]).
#[derive(Debug)]
pub(crate) struct Batmap {
    /// Set on an encrypted VHD.
    pub key_hash: Option<KeyHash>,
    /// The map's bits, one per block ("every sector present"), as far as libvhd checks them;
    /// empty when the checksum is wrong, as tapdisk then ignores the map and reads the bitmaps.
    /// Read only for encrypted VHDs, whose reads need it.
    pub full_blocks: Vec<u8>,
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
    pub(super) fn open(file: &File, footer: &Footer, data_end: u64) -> Result<Self> {
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
        read_exact_at(file, &mut header, header_offset, "dynamic disk header")?;
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
        let areas = FileAreas {
            metadata,
            table_offset,
            block_span: bitmap_size + block_size,
            data_end,
        };
        let bat = read_table(file, &areas, needed)?;
        areas.check_blocks_disjoint(&bat)?;

        let allocated = allocated_blocks(&bat, block_size, virtual_size, |_| true);
        let batmap = read_batmap(file, footer, table_offset, entries, data_end)?;
        let first_data = bat
            .iter()
            .filter(|&&entry| entry != UNALLOCATED)
            .min()
            .map(|&entry| u64::from(entry) * 512 + bitmap_size);
        let format = if footer.disk_type()? == DiskType::Differencing {
            SourceFormat::VhdDifferencing
        } else {
            SourceFormat::VhdDynamic
        };
        Ok(Self {
            format,
            header: Box::new(header),
            uuid: footer.uuid,
            first_data,
            virtual_size,
            block_size,
            bitmap_size,
            bat,
            allocated,
            batmap,
            presence: None,
            notes: Vec::new(),
        })
    }

    /// The dynamic disk header, as read.
    pub(super) fn header(&self) -> &[u8; HEADER_SIZE] {
        &self.header
    }

    /// The BAT entries the virtual size needs.
    pub(super) fn bat(&self) -> &[u32] {
        &self.bat
    }

    /// Makes a differencing disk's sector bitmaps decide which sectors are its own; the
    /// allocated ranges become the blocks with at least one of them.
    pub(super) fn set_presence(&mut self, presence: Presence) {
        self.allocated = allocated_blocks(&self.bat, self.block_size, self.virtual_size, |index| {
            presence.any_present(index)
        });
        self.presence = Some(presence);
    }

    /// Adds a note for the user (how the disk was read).
    pub(super) fn add_note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// The key hash of a VHD that blktap encrypted (`vhd-util copy -k`), from its batmap.
    pub fn key_hash(&self) -> Option<&KeyHash> {
        self.batmap.as_ref()?.key_hash.as_ref()
    }

    /// The batmap, when the disk has one.
    pub(crate) fn batmap(&self) -> Option<&Batmap> {
        self.batmap.as_ref()
    }

    /// The footer's disk UUID, as text (8-4-4-4-12 hex digits).
    pub fn uuid(&self) -> String {
        super::batmap::uuid_text(&self.uuid)
    }

    /// File offset of the lowest allocated block's data (where the payload starts), if any.
    pub fn first_data_offset(&self) -> Option<u64> {
        self.first_data
    }

    /// Block size in bytes.
    pub(crate) fn block_size(&self) -> u64 {
        self.block_size
    }

    /// File offset of block `index`'s sector bitmap, or `None` when the block is unallocated.
    /// The block's data follows the bitmap. `index` must be below the virtual size's blocks.
    pub(crate) fn block_at(&self, index: u64) -> Option<(u64, u64)> {
        match self.bat[index as usize] {
            UNALLOCATED => None,
            sector => {
                let bitmap = u64::from(sector) * 512;
                Some((bitmap, bitmap + self.bitmap_size))
            }
        }
    }

    /// Bytes of the sector bitmap of each block.
    pub(crate) fn bitmap_size(&self) -> u64 {
        self.bitmap_size
    }

    /// Bytes in allocated blocks (whole blocks, as stored).
    pub fn allocated_bytes(&self) -> u64 {
        self.bat
            .iter()
            .filter(|&&entry| entry != UNALLOCATED)
            .count() as u64
            * self.block_size
    }
}

/// The guest ranges of the allocated blocks that `keep` accepts (by block index), merged: exact
/// up to [`EXACT_RANGES_UP_TO`] entries, joined across holes of [`LARGE_TABLE_JOIN_GAP`] above.
fn allocated_blocks(
    bat: &[u32],
    block_size: u64,
    virtual_size: u64,
    keep: impl Fn(u64) -> bool,
) -> Vec<Range<u64>> {
    let join_gap = if bat.len() as u64 <= EXACT_RANGES_UP_TO {
        0
    } else {
        LARGE_TABLE_JOIN_GAP
    };
    let mut allocated = Vec::new();
    for (index, &entry) in (0u64..).zip(bat) {
        if entry != UNALLOCATED && keep(index) {
            let start = index * block_size;
            push_merged(
                &mut allocated,
                start..(start + block_size).min(virtual_size),
                join_gap,
            );
        }
    }
    allocated.shrink_to_fit();
    allocated
}

/// Reads blktap's batmap header where `vhd_has_batmap` says one is (see [`super::batmap`]), and
/// for an encrypted VHD the part of the map libvhd checks. A header that cannot be there (past
/// the file's data) or lacks its cookie means "no batmap", as for libvhd.
fn read_batmap(
    file: &File,
    footer: &Footer,
    table_offset: u64,
    declared_entries: u64,
    data_end: u64,
) -> Result<Option<Batmap>> {
    if batmap::expected(footer) == Some(false) {
        return Ok(None);
    }
    // `declared_entries` came from a u32 field.
    let header_at = batmap::header_offset(table_offset, declared_entries as u32);
    let fits = header_at
        .checked_add(batmap::HEADER_SIZE as u64)
        .is_some_and(|end| end <= data_end);
    if !fits {
        tracing::warn!(header_at, "blktap VHD without room for its batmap header");
        return Ok(None);
    }
    let mut bytes = [0u8; batmap::HEADER_SIZE];
    read_exact_at(file, &mut bytes, header_at, "batmap header")?;
    let Some(header) = batmap::parse(&bytes) else {
        if batmap::expected(footer) == Some(true) {
            tracing::warn!(header_at, "blktap VHD without its batmap header");
        }
        return Ok(None);
    };
    if header.key_hash.is_none() {
        return Ok(Some(Batmap {
            key_hash: None,
            full_blocks: Vec::new(),
        }));
    }
    // What libvhd reads: at most 512 KiB for the largest disk read (8 TiB >> 24).
    let checked = batmap::checksummed_bytes(footer.current_size);
    let readable = u64::from(header.map_sectors) * 512 >= checked
        && header
            .map_offset
            .checked_add(checked)
            .is_some_and(|end| end <= data_end);
    let mut full_blocks = Vec::new();
    if readable {
        // `checked` ≤ 512 KiB (current_size ≤ 8 TiB, checked by the caller's virtual size).
        full_blocks = vec![0u8; checked as usize];
        read_exact_at(file, &mut full_blocks, header.map_offset, "batmap")?;
        let computed = batmap::checksum(&full_blocks, header.version);
        if computed != header.checksum {
            tracing::warn!(
                stored = header.checksum,
                computed,
                "batmap checksum mismatch: ignoring the batmap and reading the block bitmaps, \
                 as tapdisk does"
            );
            full_blocks = Vec::new();
        }
    } else {
        tracing::warn!(
            map_offset = header.map_offset,
            "batmap outside the file or smaller than libvhd reads: reading the block bitmaps"
        );
    }
    Ok(Some(Batmap {
        key_hash: header.key_hash,
        full_blocks,
    }))
}

/// Where a dynamic disk's structures are, for checking each BAT entry against them.
struct FileAreas {
    /// Footer copy, header and the part of the BAT that is read.
    metadata: [(Range<u64>, Area); 3],
    table_offset: u64,
    /// Bytes each block takes in the file: its sector bitmap and its data.
    block_span: u64,
    /// Blocks must end at or before this (the footer at the end, or the end of the file).
    data_end: u64,
}

impl FileAreas {
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
fn read_table(file: &File, areas: &FileAreas, entries: u64) -> Result<Vec<u32>> {
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
            areas.table_offset + done,
            "block allocation table",
        )?;
        for raw in piece.chunks_exact(4) {
            let entry = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            if entry != UNALLOCATED {
                areas.check_entry(table.len() as u64, entry)?;
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

impl Layout for DynamicVhd {
    fn metadata_bytes(&self) -> u64 {
        let batmap = self
            .batmap
            .as_ref()
            .map_or(0, |batmap| heap_bytes(&batmap.full_blocks));
        let presence = self.presence.as_ref().map_or(0, Presence::heap_bytes);
        HEADER_SIZE as u64 + heap_bytes(&self.bat) + heap_bytes(&self.allocated) + batmap + presence
    }

    fn format(&self) -> SourceFormat {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Within one block: a block's data is contiguous in the file, but two blocks' data never
    /// are (the next block's bitmap sits between them). A dynamic disk's unallocated block is
    /// zeros; a differencing disk's is its parent's, and in an allocated block the sector
    /// bitmap decides, sector by sector.
    fn map(&self, offset: u64, len: u64) -> Result<Mapped> {
        let index = offset / self.block_size;
        let within_block = offset % self.block_size;
        let rest_of_block = (self.block_size - within_block).min(len);
        // `index` is below `bat.len()`: the caller keeps the range within the virtual size,
        // and the BAT kept one entry per block of it.
        let entry = self.bat.get(index as usize).copied().ok_or_else(|| {
            Error::corrupt(
                format!("guest offset {offset} is past the VHD's block allocation table"),
                None,
            )
        })?;
        if entry == UNALLOCATED {
            let chunk = if self.presence.is_some() {
                Chunk::Backing
            } else {
                Chunk::Zero
            };
            return Ok(Mapped {
                len: rest_of_block,
                chunk,
            });
        }
        let data = u64::from(entry) * 512 + self.bitmap_size + within_block;
        let (len, own) = match &self.presence {
            None => (rest_of_block, true),
            Some(presence) => presence.run(index, within_block, rest_of_block),
        };
        let chunk = if own {
            Chunk::Data {
                file: 0,
                offset: data,
            }
        } else {
            Chunk::Backing
        };
        Ok(Mapped { len, chunk })
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.allocated
    }

    fn allocation_unit(&self) -> Option<u64> {
        Some(self.block_size)
    }

    fn data_name(&self) -> &'static str {
        "VHD block"
    }

    fn read_notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}
