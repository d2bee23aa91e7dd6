//! The VHD output's placement and metadata, checked against what others make of them: qemu-img
//! reads the container, and the metadata equals what blktap's own `vhd-util copy` wrote for the
//! same disk (the corpus), field for field, except the creation time and the disk's UUID.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;

use super::*;
use crate::formats::vhd::corpus;

const MIB: u64 = 1 << 20;

fn key(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ 0xa7)
        .collect()
}

/// A byte pattern standing in for ciphertext: different in every sector.
fn pattern(offset: u64) -> u8 {
    ((offset / 512).wrapping_mul(31) ^ (offset % 251)) as u8 | 1
}

/// A VHD for `size` bytes with the blocks touching `allocated` placed (as the copy places the
/// blocks it finds data in) on a new file; returns it, its extents and the file.
fn planned(
    size: u64,
    allocated: &[Range<u64>],
    raw_key: &[u8],
) -> Result<(VhdOutput, Vec<Extent>, tempfile::NamedTempFile)> {
    let plan = VhdOutput::new(size, raw_key)?;
    let file = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    let mut extents = Vec::new();
    for run in crate::outputs::granule_runs(allocated, BLOCK_SIZE, plan.payload_end()) {
        plan.place(run, file.as_file(), &mut extents)?;
    }
    Ok((plan, extents, file))
}

/// Writes the payload (the pattern at each extent's guest offsets) and the metadata to `file`.
fn write(
    plan: &VhdOutput,
    extents: &[Extent],
    file: tempfile::NamedTempFile,
) -> tempfile::NamedTempFile {
    for extent in extents {
        let data: Vec<u8> = (0..extent.length)
            .map(|i| pattern(extent.guest_offset + i))
            .collect();
        file.as_file()
            .write_all_at(&data, extent.output_offset)
            .unwrap();
    }
    plan.write_metadata(file.as_file()).unwrap();
    assert_eq!(file.as_file().metadata().unwrap().len(), plan.output_size());
    file
}

#[test]
fn blocks_with_any_allocated_byte_are_allocated_with_aligned_data_and_sector_ivs() {
    let allocated = [
        0..1,
        (4 * MIB + 10)..(4 * MIB + 20),
        (6 * MIB - 512)..(6 * MIB + 512),
        (7 * MIB)..(7 * MIB + 1),
    ];
    let (plan, extents, _file) = planned(9 * MIB + 512, &allocated, &key(64)).unwrap();
    assert_eq!(plan.virtual_size(), 10 * MIB);
    let blocks: Vec<u64> = extents
        .iter()
        .map(|extent| extent.guest_offset / BLOCK_SIZE)
        .collect();
    assert_eq!(blocks, [0, 2, 3]);
    let mut previous_end = 0;
    for extent in &extents {
        assert_eq!(extent.length, BLOCK_SIZE);
        assert_eq!(extent.output_offset % 4096, 0, "{extent:?}");
        assert_eq!(extent.first_iv, extent.guest_offset / 512);
        // The bitmap sector before the data does not overlap the previous block.
        assert!(extent.output_offset - 512 >= previous_end, "{extent:?}");
        previous_end = extent.output_offset + extent.length;
    }
    assert_eq!(plan.output_size(), previous_end + 512);
    assert_eq!(plan.allocated_bytes(), 3 * BLOCK_SIZE);
}

#[test]
fn virtual_size_is_rounded_up_to_whole_2_mib_blocks() {
    for (source, expected) in [
        (512, 2 * MIB),
        (2 * MIB, 2 * MIB),
        (2 * MIB + 512, 4 * MIB),
        (5_257_216, 6 * MIB),
    ] {
        let plan = VhdOutput::new(source, &key(32)).unwrap();
        assert_eq!(plan.virtual_size(), expected, "{source}");
        assert_eq!(plan.allocated_bytes(), 0);
    }
    assert!(VhdOutput::new(0, &key(32)).is_err());
    assert!(VhdOutput::new(MAX_VIRTUAL_SIZE + 1, &key(32)).is_err());
}

#[test]
fn keys_of_other_sizes_or_with_equal_halves_are_refused() {
    for len in [0usize, 16, 31, 33, 48, 63, 65, 128] {
        let error = VhdOutput::new(MIB, &key(len)).unwrap_err();
        assert!(
            matches!(
                error,
                Error::KeyFile(KeyFileError::RawKeyLength { len: found }) if found == len
            ),
            "{len}: {error:?}"
        );
    }
    for len in [32usize, 64] {
        let half = key(len / 2);
        let error = VhdOutput::new(MIB, &[half.clone(), half].concat()).unwrap_err();
        assert!(
            matches!(error, Error::KeyFile(KeyFileError::RawKeyHalvesEqual)),
            "{error:?}"
        );
    }
}

#[test]
fn geometry_is_libvhd_s_wrapping_above_2_tib_included() {
    // Corpus encA (4 MiB), encB/encD (6 MiB), encC (2 TiB + 32 MiB), encE (2 TiB + 4 MiB).
    assert_eq!(geometry(4 * MIB), 0x0078_0411);
    assert_eq!(geometry(6 * MIB), 0x00b4_0411);
    assert_eq!(geometry((2 << 40) + 32 * MIB), 0x03c3_0411);
    assert_eq!(geometry((2 << 40) + 4 * MIB), 0x0078_0411);
}

#[test]
fn qemu_img_reads_the_container_with_its_size_and_blocks() {
    // An odd size whose last block holds data, and a hole between two blocks.
    let size = 5 * MIB + 3 * 512;
    let (plan, extents, file) = planned(size, &[0..4096, (5 * MIB)..size], &key(32)).unwrap();
    let file = write(&plan, &extents, file);
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vpc"])
        .arg(file.path())
        .output()
        .expect("qemu-img must be installed");
    assert!(info.status.success(), "{info:?}");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 6 * MIB, "{info}");

    let raw = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    let convert = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(file.path())
        .arg(raw.path())
        .output()
        .unwrap();
    assert!(convert.status.success(), "{convert:?}");
    let guest = std::fs::read(raw.path()).unwrap();
    assert_eq!(guest.len() as u64, 6 * MIB);
    for (offset, &byte) in (0u64..).zip(&guest) {
        let block = offset / BLOCK_SIZE;
        let expected = if block == 1 { 0 } else { pattern(offset) };
        assert_eq!(byte, expected, "guest byte {offset}");
    }
}

/// Reads `length` bytes at `offset`.
fn bytes_at(file: &File, offset: u64, length: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; length];
    file.read_exact_at(&mut buffer, offset).unwrap();
    buffer
}

/// Compares our metadata for `source`'s size and allocated blocks with what vhd-util wrote.
fn compare_with_vhd_util(reference: &str, key_file: &str, virtual_size: u64, blocks: &[u64]) {
    let dir = corpus::unpack(&[reference, key_file]);
    let theirs = File::open(dir.path().join(reference)).unwrap();
    let raw_key = std::fs::read(dir.path().join(key_file)).unwrap();
    let allocated: Vec<_> = blocks
        .iter()
        .map(|block| block * BLOCK_SIZE..block * BLOCK_SIZE + 1)
        .collect();
    let (plan, extents, file) = planned(virtual_size, &allocated, &raw_key).unwrap();
    let ours_file = write(&plan, &extents, file);
    let ours = ours_file.as_file();
    assert_eq!(
        ours.metadata().unwrap().len(),
        theirs.metadata().unwrap().len(),
        "{reference}: file size"
    );

    let (our_footer, their_footer) = (bytes_at(ours, 0, 512), bytes_at(&theirs, 0, 512));
    // All but the timestamp (24..28), checksum (64..68) and UUID (68..84).
    for range in [0..24, 28..64, 84..512] {
        assert_eq!(
            our_footer[range.clone()],
            their_footer[range.clone()],
            "{reference}: footer bytes {range:?}"
        );
    }
    let end = plan.output_size() - 512;
    assert_eq!(bytes_at(ours, end, 512), our_footer, "footer at the end");

    // Header and BAT byte for byte.
    let table_end = 1536 + (virtual_size / BLOCK_SIZE * 4).next_multiple_of(512);
    assert_eq!(
        bytes_at(ours, 512, (table_end - 512) as usize),
        bytes_at(&theirs, 512, (table_end - 512) as usize),
        "{reference}: header and block allocation table"
    );
    // Batmap header (with the key hash) and the part of the map libvhd writes.
    let checked = batmap::checksummed_bytes(virtual_size) as usize;
    assert_eq!(
        bytes_at(ours, table_end, 512 + checked),
        bytes_at(&theirs, table_end, 512 + checked),
        "{reference}: batmap header and map"
    );
    // Every block's bitmap is full, and every block's data is where vhd-util put it.
    for extent in &extents {
        assert_eq!(
            bytes_at(&theirs, extent.output_offset - 512, 512),
            [0xff; 512],
            "{reference}: vhd-util's bitmap"
        );
        assert_eq!(bytes_at(ours, extent.output_offset - 512, 512), [0xff; 512]);
    }
}

#[test]
fn metadata_equals_vhd_util_s_for_the_same_disks() {
    compare_with_vhd_util("encA_aes128.vhd", "key32.bin", 4 * MIB, &[1]);
    compare_with_vhd_util("encB_aes256.vhd", "key64.bin", 6 * MIB, &[0, 2]);
    // 5257216 bytes rounded up to 6 MiB, as vhd-util copy rounds.
    compare_with_vhd_util("encD_aes128.vhd", "key32.bin", 5_257_216, &[0]);
    compare_with_vhd_util(
        "encC_aes128.vhd",
        "key32.bin",
        (2 << 40) + 32 * MIB,
        &[0, 1 << 20],
    );
}

#[test]
fn the_whole_batmap_is_written_where_libvhd_skips_its_last_sector() {
    // 2 TiB + 4 MiB (corpus encE): the map has 257 sectors, libvhd checks and writes 256, and
    // block 2^20 (allocated) has its bit in the 257th.
    compare_with_vhd_util(
        "encE_aes256.vhd",
        "key64.bin",
        (2 << 40) + 4 * MIB,
        &[0, 1 << 20],
    );
    let (plan, extents, file) = planned(
        (2 << 40) + 4 * MIB,
        &[0..1, (2 << 40)..(2 << 40) + 1],
        &key(64),
    )
    .unwrap();
    let file = write(&plan, &extents, file);
    let header_at = batmap::header_offset(TABLE_AT, plan.entries() as u32);
    let header: [u8; 512] = bytes_at(file.as_file(), header_at, 512).try_into().unwrap();
    let header = batmap::parse(&header).unwrap();
    assert_eq!(header.map_sectors, 257);
    let map = bytes_at(file.as_file(), header.map_offset, 257 * 512);
    assert!(batmap::test_bit(&map, 0) && batmap::test_bit(&map, 1 << 20));
    assert_eq!(map.iter().filter(|&&b| b != 0).count(), 2);
    // The checksum is libvhd's: over the first 256 sectors.
    assert_eq!(header.checksum, !0x80u32);
}

#[test]
fn blocks_are_placed_once_in_guest_order() {
    let (plan, extents, file) = planned(10 * MIB, &[0..1, 4 * MIB..4 * MIB + 1], &key(32)).unwrap();
    let mut more = Vec::new();
    // A block already placed, an unaligned run, a run past the disk: refused.
    assert!(plan
        .place(4 * MIB..6 * MIB, file.as_file(), &mut more)
        .is_err());
    assert!(plan
        .place(6 * MIB + 512..8 * MIB, file.as_file(), &mut more)
        .is_err());
    assert!(plan
        .place(10 * MIB..12 * MIB, file.as_file(), &mut more)
        .is_err());
    assert!(more.is_empty());
    // The next block goes right after the last one: its bitmap sector, then its data.
    plan.place(8 * MIB..10 * MIB, file.as_file(), &mut more)
        .unwrap();
    assert_eq!(
        more[0].output_offset,
        extents[1].output_offset + BLOCK_SIZE + 4096
    );
    assert_eq!(plan.output_size(), more[0].output_offset + BLOCK_SIZE + 512);
    assert_eq!(plan.data_offset(), extents[0].output_offset);
}
