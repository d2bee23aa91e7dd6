//! Crafted VHDs: valid ones read back byte for byte, and each kind of damage gets its own error.
//!
//! Every image is built here from the specification's layout (footer copy, header, BAT, blocks,
//! footer), independently of the reader; expected guest bytes come from [`guest_byte`], never
//! from the code under test.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use imgcrypt_proto::api::SourceFormat;

use super::dynamic::MAX_BAT_ENTRIES;
use super::footer::build::{footer, reseal, AT_CHECKSUM, AT_CURRENT_SIZE, AT_DATA_OFFSET};
use super::footer::{build::AT_DISK_TYPE, checksum, FOOTER_SIZE, MAX_VIRTUAL_SIZE};
use crate::formats::{open, SourceImage};
use crate::{Error, Result};

const HEADER_AT: u64 = 512;
const TABLE_AT: u64 = 1536;
const HEADER_TABLE_OFFSET_AT: usize = 16;
const HEADER_VERSION_AT: usize = 24;
const HEADER_ENTRIES_AT: usize = 28;
const HEADER_BLOCK_SIZE_AT: usize = 32;
const HEADER_CHECKSUM_AT: usize = 36;

/// The guest's byte at `offset` in every crafted image's allocated blocks: never zero, and
/// different from one sector to the next, so a misplaced read shows.
fn guest_byte(offset: u64) -> u8 {
    let value = (offset / 512).wrapping_mul(37) ^ (offset % 509);
    (value % 255) as u8 + 1
}

/// A dynamic VHD to build.
struct Dynamic {
    /// `current_size` in the footer.
    size: u64,
    block_size: u32,
    creator: [u8; 4],
    geometry: (u16, u8, u8),
    /// Guest block numbers to allocate, in the order their blocks follow each other in the file.
    blocks: Vec<u32>,
    /// Override of `max_table_entries` (default: enough for `size`).
    entries: Option<u32>,
}

/// A built image and where its parts are.
struct Built {
    bytes: Vec<u8>,
    entries: u32,
    /// File offset of each allocated block (bitmap first), by guest block number.
    block_at: Vec<(u32, u64)>,
    block_size: u64,
}

impl Dynamic {
    fn new(size: u64, block_size: u32, blocks: &[u32]) -> Self {
        Self {
            size,
            block_size,
            creator: *b"qem2",
            geometry: (65535, 16, 255),
            blocks: blocks.to_vec(),
            entries: None,
        }
    }

    fn build(&self) -> Built {
        let block_size = u64::from(self.block_size);
        let entries = self
            .entries
            .unwrap_or(self.size.div_ceil(block_size) as u32);
        let bitmap_size = (block_size / 512).div_ceil(8).next_multiple_of(512);
        let table_bytes = (u64::from(entries) * 4).next_multiple_of(512);
        let first_block = TABLE_AT + table_bytes;
        let span = bitmap_size + block_size;
        let end = first_block + span * self.blocks.len() as u64;
        let mut bytes = vec![0u8; (end + FOOTER_SIZE as u64) as usize];

        let foot = footer(3, &self.creator, self.size, self.geometry, HEADER_AT);
        bytes[..FOOTER_SIZE].copy_from_slice(&foot);
        bytes[end as usize..].copy_from_slice(&foot);

        let header = &mut bytes[HEADER_AT as usize..HEADER_AT as usize + 1024];
        header[..8].copy_from_slice(b"cxsparse");
        header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        put_u64(header, HEADER_TABLE_OFFSET_AT, TABLE_AT);
        put_u32(header, HEADER_VERSION_AT, 0x0001_0000);
        put_u32(header, HEADER_ENTRIES_AT, entries);
        put_u32(header, HEADER_BLOCK_SIZE_AT, self.block_size);
        reseal_header(&mut bytes);

        let table = &mut bytes[TABLE_AT as usize..(TABLE_AT + table_bytes) as usize];
        table.fill(0xff);
        let mut block_at = Vec::new();
        for (position, &guest_block) in self.blocks.iter().enumerate() {
            let at = first_block + span * position as u64;
            put_u32(
                &mut bytes,
                (TABLE_AT + u64::from(guest_block) * 4) as usize,
                (at / 512) as u32,
            );
            bytes[at as usize..(at + bitmap_size) as usize].fill(0xff);
            let guest_start = u64::from(guest_block) * block_size;
            for i in 0..block_size {
                bytes[(at + bitmap_size + i) as usize] = guest_byte(guest_start + i);
            }
            block_at.push((guest_block, at));
        }
        Built {
            bytes,
            entries,
            block_at,
            block_size,
        }
    }
}

impl Built {
    fn footer_at(&self) -> u64 {
        (self.bytes.len() - FOOTER_SIZE) as u64
    }

    /// Changes a header field and fixes the header's checksum.
    fn set_header_u32(&mut self, at: usize, value: u32) {
        put_u32(&mut self.bytes, HEADER_AT as usize + at, value);
        reseal_header(&mut self.bytes);
    }

    fn set_header_u64(&mut self, at: usize, value: u64) {
        put_u64(&mut self.bytes, HEADER_AT as usize + at, value);
        reseal_header(&mut self.bytes);
    }

    /// Changes a BAT entry (the BAT has no checksum).
    fn set_entry(&mut self, index: u32, value: u32) {
        put_u32(
            &mut self.bytes,
            (TABLE_AT + u64::from(index) * 4) as usize,
            value,
        );
    }

    /// Changes a field of both footers and fixes their checksums.
    fn set_footer_u64(&mut self, at: usize, value: u64) {
        let tail = self.footer_at() as usize;
        for start in [0, tail] {
            let mut foot: [u8; FOOTER_SIZE] =
                self.bytes[start..start + FOOTER_SIZE].try_into().unwrap();
            foot[at..at + 8].copy_from_slice(&value.to_be_bytes());
            reseal(&mut foot);
            self.bytes[start..start + FOOTER_SIZE].copy_from_slice(&foot);
        }
    }

    fn set_footer_u32(&mut self, at: usize, value: u32) {
        let tail = self.footer_at() as usize;
        for start in [0, tail] {
            let mut foot: [u8; FOOTER_SIZE] =
                self.bytes[start..start + FOOTER_SIZE].try_into().unwrap();
            foot[at..at + 4].copy_from_slice(&value.to_be_bytes());
            reseal(&mut foot);
            self.bytes[start..start + FOOTER_SIZE].copy_from_slice(&foot);
        }
    }

    /// What the guest sees: block contents where allocated, zeros elsewhere.
    fn expected(&self, virtual_size: u64) -> Vec<u8> {
        let mut guest = vec![0u8; virtual_size as usize];
        for &(block, _) in &self.block_at {
            let start = u64::from(block) * self.block_size;
            let end = (start + self.block_size).min(virtual_size);
            for offset in start..end {
                guest[offset as usize] = guest_byte(offset);
            }
        }
        guest
    }

    fn open(&self) -> Result<Box<dyn SourceImage>> {
        open_bytes(&self.bytes)
    }
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

fn reseal_header(image: &mut [u8]) {
    let header = &mut image[HEADER_AT as usize..HEADER_AT as usize + 1024];
    let sum = checksum(header, HEADER_CHECKSUM_AT);
    put_u32(header, HEADER_CHECKSUM_AT, sum);
}

fn open_bytes(bytes: &[u8]) -> Result<Box<dyn SourceImage>> {
    let file = tempfile::tempfile_in("/tmp").unwrap();
    file.write_all_at(bytes, 0).unwrap();
    open(file)
}

fn read_all(image: &dyn SourceImage) -> Vec<u8> {
    let mut guest = vec![0xeeu8; image.virtual_size() as usize];
    image.read_at(&mut guest, 0).unwrap();
    guest
}

/// Asserts a `CorruptImage` error at `offset` whose message holds every word of `words`.
#[track_caller]
fn assert_corrupt(result: Result<Box<dyn SourceImage>>, offset: u64, words: &[&str]) {
    match result {
        Err(Error::CorruptImage {
            message,
            offset: reported,
        }) => {
            assert_eq!(reported, Some(offset), "offset of: {message}");
            for word in words {
                assert!(message.contains(word), "{word:?} missing from: {message}");
            }
        }
        other => panic!("expected CorruptImage, got {other:?}"),
    }
}

#[track_caller]
fn assert_unsupported(result: Result<Box<dyn SourceImage>>, words: &[&str]) {
    match result {
        Err(Error::UnsupportedImage { message }) => {
            for word in words {
                assert!(message.contains(word), "{word:?} missing from: {message}");
            }
        }
        other => panic!("expected UnsupportedImage, got {other:?}"),
    }
}

const KIB64: u32 = 64 * 1024;

/// Nine and a half blocks of 64 KiB; blocks 4, 0, 3 and the partial last one (9) allocated, in
/// that file order, so guest order and file order differ.
fn sample() -> Built {
    Dynamic::new(9 * 65536 + 32768, KIB64, &[4, 0, 3, 9]).build()
}

// --- valid images -----------------------------------------------------------------------------

#[test]
fn dynamic_reads_back_blocks_in_guest_order_and_holes_as_zeros() {
    let built = sample();
    let image = built.open().unwrap();
    assert_eq!(image.format(), SourceFormat::VhdDynamic);
    assert_eq!(image.virtual_size(), 9 * 65536 + 32768);
    assert_eq!(
        read_all(image.as_ref()),
        built.expected(image.virtual_size())
    );
}

#[test]
fn dynamic_reads_at_unaligned_offsets_across_blocks() {
    let built = sample();
    let image = built.open().unwrap();
    let expected = built.expected(image.virtual_size());
    for (offset, length) in [
        (1u64, 3usize),
        (65535, 2),
        (65000, 200_000),
        (3 * 65536 - 7, 65536 + 14),
        (9 * 65536 + 32767, 1),
        (0, 9 * 65536 + 32768),
    ] {
        let mut piece = vec![0xeeu8; length];
        image.read_at(&mut piece, offset).unwrap();
        assert_eq!(
            piece,
            expected[offset as usize..offset as usize + length],
            "{offset}+{length}"
        );
    }
    let mut past = [0u8; 2];
    assert!(image.read_at(&mut past, 9 * 65536 + 32767).is_err());
}

#[test]
fn dynamic_allocated_ranges_are_the_allocated_blocks_merged() {
    let image = sample().open().unwrap();
    let expected: [Range<u64>; 3] = [0..65536, 3 * 65536..5 * 65536, 9 * 65536..9 * 65536 + 32768];
    assert_eq!(image.allocated_ranges(), &expected);
}

#[test]
fn dynamic_with_2_mib_blocks_like_qemu_makes() {
    let built = Dynamic::new(5 << 20, 2 << 20, &[2, 0]).build();
    let image = built.open().unwrap();
    assert_eq!(image.virtual_size(), 5 << 20);
    assert_eq!(read_all(image.as_ref()), built.expected(5 << 20));
}

#[test]
fn virtual_pc_dynamic_is_sized_by_geometry() {
    // 10 MiB current size, but Virtual PC's geometry 20 × 16 × 63 gives 10 321 920 bytes.
    let mut spec = Dynamic::new(10 << 20, 2 << 20, &[4]);
    spec.creator = *b"vpc ";
    spec.geometry = (20, 16, 63);
    let built = spec.build();
    let image = built.open().unwrap();
    assert_eq!(image.virtual_size(), 20 * 16 * 63 * 512);
    assert_eq!(read_all(image.as_ref()), built.expected(20 * 16 * 63 * 512));
}

#[test]
fn damaged_footer_at_end_falls_back_to_the_copy() {
    let mut built = sample();
    let tail = built.footer_at() as usize;
    built.bytes[tail + 200] ^= 0x40;
    let image = built.open().unwrap();
    assert_eq!(image.format(), SourceFormat::VhdDynamic);
    assert_eq!(read_all(image.as_ref()), built.expected(9 * 65536 + 32768));
}

#[test]
fn missing_footer_at_end_falls_back_to_the_copy() {
    let mut built = sample();
    let tail = built.footer_at() as usize;
    built.bytes.truncate(tail);
    let image = built.open().unwrap();
    assert_eq!(image.format(), SourceFormat::VhdDynamic);
    assert_eq!(read_all(image.as_ref()), built.expected(9 * 65536 + 32768));
}

#[test]
fn fixed_vhd_hides_its_footer() {
    let data: Vec<u8> = (0..(1u64 << 20)).map(guest_byte).collect();
    let mut bytes = data.clone();
    bytes.extend_from_slice(&footer(2, b"qem2", 1 << 20, (65535, 16, 255), u64::MAX));
    let image = open_bytes(&bytes).unwrap();
    assert_eq!(image.format(), SourceFormat::VhdFixed);
    assert_eq!(image.virtual_size(), 1 << 20);
    assert_eq!(read_all(image.as_ref()), data);
    let last = image.allocated_ranges().last().unwrap();
    assert!(last.end <= 1 << 20, "{:?}", image.allocated_ranges());
}

#[test]
fn old_qemu_fixed_vhd_is_sized_by_geometry_below_its_data_area() {
    // Geometry 4 × 4 × 17 = 272 sectors = 139 264 bytes, data area 1 MiB.
    let data: Vec<u8> = (0..(1u64 << 20)).map(guest_byte).collect();
    let mut bytes = data.clone();
    bytes.extend_from_slice(&footer(2, b"qemu", 1 << 20, (4, 4, 17), u64::MAX));
    let image = open_bytes(&bytes).unwrap();
    assert_eq!(image.virtual_size(), 272 * 512);
    assert_eq!(read_all(image.as_ref()), data[..272 * 512]);
}

#[test]
fn raw_file_with_a_zero_tail_and_head_is_raw() {
    let mut bytes = vec![0u8; 4096];
    bytes[1000] = 1;
    let image = open_bytes(&bytes).unwrap();
    assert_eq!(image.format(), SourceFormat::Raw);
    assert_eq!(read_all(image.as_ref()), bytes);
}

#[test]
fn raw_file_mentioning_conectix_elsewhere_is_raw() {
    let mut bytes = vec![7u8; 4096];
    bytes[100..108].copy_from_slice(b"conectix");
    bytes[4096 - 500..4096 - 492].copy_from_slice(b"conectix");
    let image = open_bytes(&bytes).unwrap();
    assert_eq!(image.format(), SourceFormat::Raw);
}

#[test]
fn file_smaller_than_a_footer_is_raw() {
    let image = open_bytes(b"conectix").unwrap();
    assert_eq!(image.format(), SourceFormat::Raw);
    assert_eq!(image.virtual_size(), 8);
}

// --- footers ----------------------------------------------------------------------------------

#[test]
fn fixed_vhd_with_bad_footer_checksum_is_corrupt_not_raw() {
    let mut bytes = vec![0u8; 1 << 20];
    let mut foot = footer(2, b"qem2", 1 << 20, (65535, 16, 255), u64::MAX);
    foot[AT_CHECKSUM] ^= 1;
    bytes.extend_from_slice(&foot);
    assert_corrupt(
        open_bytes(&bytes),
        1 << 20,
        &["checksum", "not read as a raw disk"],
    );
}

#[test]
fn dynamic_with_both_footers_damaged_is_corrupt() {
    let mut built = sample();
    let tail = built.footer_at();
    built.bytes[tail as usize + 300] ^= 1;
    built.bytes[300] ^= 1;
    assert_corrupt(built.open(), tail, &["checksum", "no valid copy"]);
}

#[test]
fn damaged_head_without_footer_at_end_is_corrupt() {
    let mut built = sample();
    let tail = built.footer_at() as usize;
    built.bytes.truncate(tail);
    built.bytes[300] ^= 1;
    assert_corrupt(built.open(), 0, &["conectix", "checksum"]);
}

#[test]
fn fixed_footer_at_the_start_only_is_corrupt() {
    let mut bytes = footer(2, b"qem2", 1 << 20, (65535, 16, 255), u64::MAX).to_vec();
    bytes.resize(1 << 20, 0);
    assert_corrupt(open_bytes(&bytes), 0, &["fixed", "offset 0"]);
}

#[test]
fn footers_that_disagree_are_corrupt() {
    let mut built = sample();
    let mut copy: [u8; FOOTER_SIZE] = built.bytes[..FOOTER_SIZE].try_into().unwrap();
    copy[AT_CURRENT_SIZE..AT_CURRENT_SIZE + 8].copy_from_slice(&(20u64 << 20).to_be_bytes());
    reseal(&mut copy);
    built.bytes[..FOOTER_SIZE].copy_from_slice(&copy);
    assert_corrupt(built.open(), 0, &["different disks"]);
}

#[test]
fn unknown_disk_type_is_corrupt() {
    let mut built = sample();
    built.set_footer_u32(AT_DISK_TYPE, 6);
    let tail = built.footer_at();
    assert_corrupt(built.open(), tail, &["unknown disk type 6"]);
}

#[test]
fn differencing_vhd_naming_no_parent_is_corrupt_with_advice() {
    // A dynamic disk turned into a differencing one: no locator, no parent name.
    let mut built = sample();
    built.set_footer_u32(AT_DISK_TYPE, 4);
    assert_corrupt(
        built.open(),
        HEADER_AT,
        &["names no parent", "vhd-util modify"],
    );
}

#[test]
fn footer_version_2_is_unsupported() {
    let mut built = sample();
    built.set_footer_u32(12, 0x0002_0000);
    assert_unsupported(built.open(), &["version 2.0"]);
}

#[test]
fn absurd_size_is_corrupt() {
    let mut built = sample();
    built.set_footer_u64(AT_CURRENT_SIZE, MAX_VIRTUAL_SIZE + (1 << 20));
    let tail = built.footer_at();
    assert_corrupt(built.open(), tail, &["2040 GiB"]);
    built.set_footer_u64(AT_CURRENT_SIZE, u64::MAX - 511);
    assert_corrupt(built.open(), tail, &["2040 GiB"]);
}

#[test]
fn fixed_vhd_shorter_than_its_footer_says_is_truncated() {
    let mut bytes = vec![1u8; 1 << 20];
    bytes.extend_from_slice(&footer(2, b"qem2", 2 << 20, (65535, 16, 255), u64::MAX));
    assert_corrupt(open_bytes(&bytes), 1 << 20, &["truncated", "2097152"]);
}

// --- dynamic header ---------------------------------------------------------------------------

#[test]
fn header_offset_outside_the_file_is_corrupt() {
    for offset in [u64::MAX, u64::MAX - 1000, 1 << 40] {
        let mut built = sample();
        built.set_footer_u64(AT_DATA_OFFSET, offset);
        let tail = built.footer_at();
        assert_corrupt(built.open(), tail, &["header offset", "outside"]);
    }
}

#[test]
fn header_with_wrong_cookie_is_corrupt() {
    let mut built = sample();
    built.bytes[HEADER_AT as usize] = b'X';
    reseal_header(&mut built.bytes);
    assert_corrupt(built.open(), HEADER_AT, &["cxsparse"]);
}

#[test]
fn header_with_bad_checksum_is_corrupt() {
    let mut built = sample();
    built.bytes[HEADER_AT as usize + 700] ^= 4;
    assert_corrupt(built.open(), HEADER_AT, &["checksum mismatch"]);
}

#[test]
fn header_version_2_is_unsupported() {
    let mut built = sample();
    built.set_header_u32(HEADER_VERSION_AT, 0x0002_0000);
    assert_unsupported(built.open(), &["dynamic VHD header", "version 2.0"]);
}

#[test]
fn block_size_not_a_power_of_two_or_zero_is_corrupt() {
    for bad in [0u32, 3000, 256, 65536 + 512] {
        let mut built = sample();
        built.set_header_u32(HEADER_BLOCK_SIZE_AT, bad);
        assert_corrupt(
            built.open(),
            HEADER_AT,
            &["block size", &bad.to_string(), "power of two"],
        );
    }
}

#[test]
fn max_table_entries_too_small_for_the_size_is_corrupt() {
    for bad in [0u32, 9] {
        let mut built = sample();
        built.set_header_u32(HEADER_ENTRIES_AT, bad);
        assert_corrupt(
            built.open(),
            HEADER_AT,
            &["max_table_entries", &bad.to_string(), "need 10"],
        );
    }
}

#[test]
fn max_table_entries_larger_than_the_size_needs_reads_only_the_needed_ones() {
    // qemu accepts a table declared larger than the disk; only the first 10 entries map guest
    // bytes. The declared table (up to 16 GiB) reaches far past this small file: not read.
    for large in [11u32, 1 << 28, u32::MAX] {
        let mut built = sample();
        built.set_header_u32(HEADER_ENTRIES_AT, large);
        let image = built.open().unwrap_or_else(|e| panic!("{large}: {e}"));
        assert_eq!(
            read_all(image.as_ref()),
            built.expected(image.virtual_size())
        );
    }
}

#[test]
fn bat_past_the_end_of_the_file_is_corrupt() {
    for table in [1 << 30, u64::MAX - 3] {
        let mut built = sample();
        built.set_header_u64(HEADER_TABLE_OFFSET_AT, table);
        assert_corrupt(built.open(), HEADER_AT, &["block allocation table", "past"]);
    }
}

#[test]
fn bat_overlapping_the_header_is_corrupt() {
    let mut built = sample();
    built.set_header_u64(HEADER_TABLE_OFFSET_AT, HEADER_AT + 512);
    assert_corrupt(
        built.open(),
        HEADER_AT,
        &["overlaps", "dynamic disk header", "block allocation table"],
    );
}

#[test]
fn more_entries_than_the_reader_holds_is_refused_before_allocating() {
    // A 2040 GiB disk in 512-byte blocks would need a 16 GiB table.
    let mut built = sample();
    built.set_footer_u64(AT_CURRENT_SIZE, MAX_VIRTUAL_SIZE);
    built.set_header_u32(HEADER_BLOCK_SIZE_AT, 512);
    built.set_header_u32(HEADER_ENTRIES_AT, (MAX_VIRTUAL_SIZE / 512) as u32);
    assert_unsupported(
        built.open(),
        &[
            "4278190080 block allocation table entries",
            &MAX_BAT_ENTRIES.to_string(),
            "qemu-img convert",
        ],
    );
}

// --- block allocation table -------------------------------------------------------------------

#[test]
fn block_past_the_end_of_the_file_is_corrupt() {
    for sector in [0xFFFF_FFFEu32, 1 << 20] {
        let mut built = sample();
        built.set_entry(5, sector);
        assert_corrupt(
            built.open(),
            TABLE_AT + 5 * 4,
            &["entry 5", "past the file"],
        );
    }
}

#[test]
fn block_overlapping_the_footer_at_the_end_is_corrupt() {
    let mut built = sample();
    // The last block ends exactly where the footer starts; one sector later overlaps it.
    let (_, last_at) = built.block_at[3];
    built.set_entry(9, (last_at / 512 + 1) as u32);
    assert_corrupt(
        built.open(),
        TABLE_AT + 9 * 4,
        &["entry 9", "past the file"],
    );
}

#[test]
fn two_entries_sharing_a_block_are_corrupt() {
    let mut built = sample();
    let (_, at) = built.block_at[1];
    built.set_entry(7, (at / 512) as u32);
    assert_corrupt(
        built.open(),
        TABLE_AT + 7 * 4,
        &["block 0 at", "overlaps", "block 7 at"],
    );
}

#[test]
fn blocks_overlapping_partially_are_corrupt() {
    let mut built = sample();
    let (_, at) = built.block_at[1];
    built.set_entry(7, (at / 512 + 3) as u32);
    assert_corrupt(built.open(), TABLE_AT + 7 * 4, &["overlaps", "block 7"]);
}

#[test]
fn block_over_the_metadata_is_corrupt() {
    let cases = [
        (0u32, "footer copy"),
        ((HEADER_AT / 512) as u32 + 1, "dynamic disk header"),
        ((TABLE_AT / 512) as u32, "block allocation table"),
    ];
    for (sector, structure) in cases {
        let mut built = sample();
        built.set_entry(6, sector);
        assert_corrupt(
            built.open(),
            TABLE_AT + 6 * 4,
            &["overlaps", structure, "block 6"],
        );
    }
}

#[test]
fn truncated_dynamic_vhd_is_corrupt() {
    let mut built = sample();
    let cut = built.bytes.len() - FOOTER_SIZE - 1000;
    built.bytes.truncate(cut);
    // Block 9 is last in the file and now runs past its end.
    assert_corrupt(built.open(), TABLE_AT + 9 * 4, &["block 9", "truncated"]);
}

#[test]
fn entries_unused_by_the_virtual_size_are_ignored() {
    // Virtual PC geometry makes the disk smaller than current_size: 2 blocks of 2 MiB hold the
    // 2 .. 4 MiB current size, the geometry 4 × 4 × 17 covers only the first 139 264 bytes.
    let mut spec = Dynamic::new(4 << 20, 2 << 20, &[1]);
    spec.creator = *b"vpc ";
    spec.geometry = (4, 4, 17);
    let built = spec.build();
    assert_eq!(built.entries, 2);
    let image = built.open().unwrap();
    assert_eq!(image.virtual_size(), 272 * 512);
    assert!(image.allocated_ranges().is_empty());
    assert!(read_all(image.as_ref()).iter().all(|&b| b == 0));

    // Entry 1 maps no guest byte, so it is not read: not even a wild value matters.
    let mut wild = spec.build();
    wild.set_entry(1, 0xFFFF_FFF0);
    assert!(wild.open().is_ok());
}

#[test]
fn no_panic_on_any_single_byte_damage_of_the_metadata() {
    // Every byte of footer copy, header, BAT and footer, flipped one at a time: open and, when
    // it opens, read everything. Errors are fine; panics and hangs are not.
    let built = sample();
    let metadata: Vec<usize> = (0..(TABLE_AT as usize + 512))
        .chain(built.footer_at() as usize..built.bytes.len())
        .collect();
    let file = tempfile::tempfile_in("/tmp").unwrap();
    file.write_all_at(&built.bytes, 0).unwrap();
    let mut opened = 0;
    for position in metadata {
        let original = built.bytes[position];
        file.write_all_at(&[original ^ 0xa5], position as u64)
            .unwrap();
        if let Ok(image) = open(File::try_clone(&file).unwrap()) {
            opened += 1;
            let size = image.virtual_size().min(64 << 20) as usize;
            let mut guest = vec![0u8; size];
            let _ = image.read_at(&mut guest, 0);
        }
        file.write_all_at(&[original], position as u64).unwrap();
    }
    // Damage to a footer alone is survived through the other one, so some images open.
    assert!(opened > 0);
}

// --- attacker-sized tables (issue 8, finding 4) -----------------------------------------------

/// Names the file [`open_named_file_and_report_peak_memory`] opens in a child process.
const CHILD_IMAGE_ENV: &str = "IMGCRYPTD_TEST_VHD_MEMORY_IMAGE";

/// Address space the child may use: an allocation sized by the attacker's table (1 GiB and up)
/// fails there instead of eating the machine's memory.
const CHILD_ADDRESS_SPACE: u64 = 1 << 30;

/// Peak resident memory allowed for the whole child, test harness included.
const CHILD_PEAK_LIMIT_KIB: i64 = 64 * 1024;

/// Not a test of its own: [`open_in_a_child`] runs this test binary on it, with the file to open
/// in the environment, so the peak memory measured is that of one `open`.
#[test]
#[ignore = "run in a child process by the attacker-sized table tests"]
fn open_named_file_and_report_peak_memory() {
    use nix::sys::resource::{setrlimit, Resource};
    let Some(path) = std::env::var_os(CHILD_IMAGE_ENV) else {
        return;
    };
    setrlimit(
        Resource::RLIMIT_AS,
        CHILD_ADDRESS_SPACE,
        CHILD_ADDRESS_SPACE,
    )
    .unwrap();
    let outcome = match open(File::open(path).unwrap()) {
        Ok(image) => format!("opened {} bytes", image.virtual_size()),
        Err(error) => format!("error {error}"),
    };
    // VmHWM, not getrusage's ru_maxrss: that one carries the parent's peak across fork and exec.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .unwrap()
        .trim()
        .to_string();
    println!("CHILD-OUTCOME: {outcome}");
    println!("CHILD-PEAK-KIB: {peak}");
}

/// Opens `file` in a child process; returns what `open` said and the child's peak RSS in KiB.
fn open_in_a_child(file: &tempfile::NamedTempFile) -> (String, i64) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "formats::vhd::tests::open_named_file_and_report_peak_memory",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_IMAGE_ENV, file.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| {
        stdout
            .lines()
            // libtest prints the test's name on the same line, before the output.
            .find_map(|line| line.split_once(name).map(|(_, value)| value))
            .map(str::to_string)
    };
    let (Some(outcome), Some(peak)) = (field("CHILD-OUTCOME: "), field("CHILD-PEAK-KIB: ")) else {
        panic!(
            "the child opening the image died ({}), an unbounded allocation?\nstdout: {stdout}\n\
             stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let peak = peak.parse().unwrap();
    println!("peak RSS of the child: {peak} KiB ({outcome})");
    (outcome, peak)
}

/// A sparse dynamic VHD: footer copy, header at 512, a table of `entries` at 1536 whose first
/// `unallocated` entries are `0xFFFFFFFF` and the rest zeros (a hole), and the footer. Only
/// a few KiB are written, whatever the table's size.
fn sparse_dynamic(
    creator: &[u8; 4],
    current_size: u64,
    geometry: (u16, u8, u8),
    block_size: u32,
    entries: u32,
    unallocated: u64,
) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    let foot = footer(3, creator, current_size, geometry, HEADER_AT);
    let end = TABLE_AT + u64::from(entries) * 4;
    file.as_file().set_len(end + FOOTER_SIZE as u64).unwrap();
    file.as_file().write_all_at(&foot, 0).unwrap();
    file.as_file().write_all_at(&foot, end).unwrap();
    let mut header = vec![0u8; 1024];
    header[..8].copy_from_slice(b"cxsparse");
    header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    put_u64(&mut header, HEADER_TABLE_OFFSET_AT, TABLE_AT);
    put_u32(&mut header, HEADER_VERSION_AT, 0x0001_0000);
    put_u32(&mut header, HEADER_ENTRIES_AT, entries);
    put_u32(&mut header, HEADER_BLOCK_SIZE_AT, block_size);
    let sum = checksum(&header, HEADER_CHECKSUM_AT);
    put_u32(&mut header, HEADER_CHECKSUM_AT, sum);
    file.as_file().write_all_at(&header, HEADER_AT).unwrap();
    let mut written = 0;
    while written < unallocated * 4 {
        let piece = (unallocated * 4 - written).min(1 << 20) as usize;
        file.as_file()
            .write_all_at(&vec![0xff; piece], TABLE_AT + written)
            .unwrap();
        written += piece as u64;
    }
    file
}

#[test]
fn bat_of_2_pow_28_entries_in_a_sparse_8_kib_file_is_refused_in_bounded_memory() {
    // The review's image: 128 GiB in 512-byte blocks, a 1 GiB table of zeros (every block at
    // sector 0, over the footer copy). It drove the daemon to 9.4 GB before the error.
    let file = sparse_dynamic(b"qem2", (1 << 28) * 512, (65535, 16, 255), 512, 1 << 28, 0);
    let (outcome, peak) = open_in_a_child(&file);
    assert!(
        outcome.contains("268435456 block allocation table entries")
            && outcome.contains(&MAX_BAT_ENTRIES.to_string()),
        "{outcome}"
    );
    assert!(
        peak < CHILD_PEAK_LIMIT_KIB,
        "peak RSS {peak} KiB: {outcome}"
    );
}

#[test]
fn one_mib_disk_claiming_a_16_gib_table_reads_8_kib_of_it() {
    // Sized by its geometry (32 × 4 × 16 sectors = 1 MiB), with a current size of 2040 GiB and
    // a table declared for all of it in 512-byte blocks: 16 GiB, in a sparse file. The 2048
    // entries the disk needs are unallocated; nothing else may be read.
    let entries = (MAX_VIRTUAL_SIZE / 512) as u32;
    let file = sparse_dynamic(b"qemu", MAX_VIRTUAL_SIZE, (32, 4, 16), 512, entries, 2048);
    let (outcome, peak) = open_in_a_child(&file);
    assert_eq!(outcome, "opened 1048576 bytes");
    assert!(peak < CHILD_PEAK_LIMIT_KIB, "peak RSS {peak} KiB");
}

#[test]
fn table_at_the_entry_limit_fails_at_its_first_bad_entry_in_bounded_memory() {
    // 2^22 entries (the most a disk may need: 16 MiB of table) of zeros, in a sparse file: the
    // first entry puts block 0 over the footer copy, and the error must come from it without
    // the rest of the table being read or any per-block list being built.
    let entries = MAX_BAT_ENTRIES as u32;
    let file = sparse_dynamic(
        b"qem2",
        MAX_BAT_ENTRIES * 512,
        (65535, 16, 255),
        512,
        entries,
        0,
    );
    let (outcome, peak) = open_in_a_child(&file);
    assert!(
        outcome.contains("footer copy") && outcome.contains("block 0 at"),
        "{outcome}"
    );
    // Reading the table is not needed to fail: well under the 16 MiB a full read would touch.
    assert!(peak < 24 * 1024, "peak RSS {peak} KiB: {outcome}");
}
