//! The BAT interleave on synthetic tables (qemu-img cannot write 4096-byte-sector images, and
//! reaching a second chunk with it takes a 4 GiB+ disk; `daemon/tests/formats_qemu/vhdx.rs`
//! compares whole images with qemu).

use std::os::unix::fs::FileExt;

use super::log::{Overlay, Sectors};
use super::map::{Geometry, Map};
use super::MIB;
use crate::formats::layout::{Chunk, Mapped};
use crate::Error;

/// Reads the BAT of a disk without a parent through an empty overlay.
fn read_map(
    file: &std::fs::File,
    file_size: u64,
    bat: &std::ops::Range<u64>,
    virtual_size: u64,
    block_size: u32,
    sector: u32,
    taken: &[std::ops::Range<u64>],
) -> crate::Result<Map> {
    let overlay = Overlay::default();
    let geometry = Geometry {
        virtual_size,
        block_size,
        logical_sector_size: sector,
        has_parent: false,
    };
    Map::read(
        Sectors {
            file,
            overlay: &overlay,
        },
        file_size,
        bat,
        geometry,
        taken,
    )
}

fn data(offset: u64, len: u64) -> Mapped {
    Mapped {
        len,
        chunk: Chunk::Data { file: 0, offset },
    }
}

const PRESENT: u64 = 6;

/// A sparse file with a BAT at 1 MiB holding `entries` (index, value).
fn file_with_bat(size: u64, entries: &[(u64, u64)]) -> std::fs::File {
    let file = tempfile::tempfile_in("/tmp").unwrap();
    file.set_len(size).unwrap();
    for &(index, value) in entries {
        file.write_all_at(&value.to_le_bytes(), MIB + index * 8)
            .unwrap();
    }
    file
}

/// Block `chunk_ratio` (the first of the second chunk) is BAT entry `chunk_ratio + 1`: the
/// entry between is a sector bitmap entry, skipped even when it looks like a present block.
fn second_chunk_is_found_past_the_bitmap_entry(sector: u32, chunk_ratio: u64) {
    let virtual_size = (chunk_ratio + 1) * MIB;
    let file = file_with_bat(
        16 * MIB,
        &[
            (0, (4 * MIB) | PRESENT),
            (chunk_ratio, (5 * MIB) | PRESENT),
            (chunk_ratio + 1, (6 * MIB) | PRESENT),
        ],
    );
    let bat = MIB..3 * MIB;
    let map = read_map(&file, 16 * MIB, &bat, virtual_size, MIB as u32, sector, &[]).unwrap();
    assert_eq!(map.map(10, 2 * MIB).unwrap(), data(4 * MIB + 10, MIB - 10));
    assert_eq!(
        map.map(MIB, MIB).unwrap(),
        Mapped {
            len: MIB,
            chunk: Chunk::Zero
        }
    );
    assert_eq!(
        map.map(chunk_ratio * MIB + 512, MIB).unwrap(),
        data(6 * MIB + 512, MIB - 512)
    );
    assert_eq!(
        map.present(|_| true),
        vec![0..MIB, chunk_ratio * MIB..(chunk_ratio + 1) * MIB]
    );
}

#[test]
fn chunk_ratio_for_512_byte_sectors_is_4096_with_1_mib_blocks() {
    second_chunk_is_found_past_the_bitmap_entry(512, 4096);
}

#[test]
fn chunk_ratio_for_4096_byte_sectors_is_32768_with_1_mib_blocks() {
    second_chunk_is_found_past_the_bitmap_entry(4096, 32768);
}

#[test]
fn a_bat_too_small_for_the_virtual_size_is_refused_before_allocating() {
    let file = file_with_bat(4 * MIB, &[]);
    let bat = MIB..2 * MIB;
    // 1 MiB of BAT holds 131072 entries; 64 TiB in 32 MiB blocks needs more than 2 million.
    let error = read_map(&file, 4 * MIB, &bat, 64 << 40, 32 << 20, 512, &[]).unwrap_err();
    assert!(matches!(error, Error::CorruptImage { .. }), "{error:?}");
}

#[test]
fn blocks_over_the_structures_or_past_the_end_are_refused() {
    let bat = MIB..2 * MIB;
    for (entry, words) in [
        (PRESENT, "header section"),
        (MIB | PRESENT, "structures"),
        ((4 * MIB) | PRESENT, "past the end"),
        ((2 * MIB) | 7, "PARTIALLY_PRESENT"),
        ((2 * MIB) | 4, "undefined state"),
    ] {
        let file = file_with_bat(4 * MIB, &[(0, entry)]);
        let taken = [0..MIB, bat.clone()];
        match read_map(&file, 4 * MIB, &bat, MIB, MIB as u32, 512, &taken).unwrap_err() {
            Error::CorruptImage { message, offset } => {
                assert!(message.contains(words), "{message}");
                assert_eq!(offset, Some(MIB));
            }
            other => panic!("expected CorruptImage, got {other:?}"),
        }
    }
}

#[test]
fn more_blocks_than_the_map_holds_are_refused_before_reading_the_bat() {
    let file = file_with_bat(4 * MIB, &[]);
    let bat = MIB..2 * MIB;
    // 64 TiB in 1 MiB blocks: 2^26 blocks, 16 times the limit.
    match read_map(&file, 4 * MIB, &bat, 64 << 40, MIB as u32, 512, &[]).unwrap_err() {
        Error::UnsupportedImage { message } => assert!(message.contains("block_size"), "{message}"),
        other => panic!("expected UnsupportedImage, got {other:?}"),
    }
}
