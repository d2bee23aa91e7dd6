//! The VHDX reader against qemu: images `qemu-img create -f vhdx` makes with every option it
//! has, written by `qemu-io`; the three VHDX images of the qemu sample corpus; and hand-patched
//! copies for what qemu-img cannot make (4096-byte logical sectors, a parent, equal header
//! sequence numbers with different contents).
//!
//! qemu-img 7.2 has no option for the logical sector size: it always writes 512 (its help lists
//! block_size, block_state_zero, log_size, subformat, preallocation only), and qemu 7.2 refuses
//! to open an image whose logical sector size item says 4096 ("Operation not supported"). So
//! the 4096 case patches that item in an image small enough that the BAT layout is the same for
//! both sizes, and compares with qemu reading the unpatched image.

use super::*;
use imgcryptd::formats::files::{Passed, SourceFiles};

const VHDX_CRC_POLY: u32 = 0x82f6_3b78;

/// CRC-32C, written here again so the test does not trust the reader's own.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ VHDX_CRC_POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Opens with our reader, reads everything like the copier, compares with qemu's raw
/// conversion, and checks the allocated ranges cover what `qemu-img map` calls data.
fn assert_vhdx_like_qemu(path: &Path, what: &str) {
    // `qemu-img map` is no help here: qemu's VHDX driver reports no block status, so it calls
    // the whole disk data. assert_reads_like checks that every byte outside our ranges is zero.
    let image = open_source(path);
    assert_image_like_qemu(image.as_ref(), path, "vhdx", SourceFormat::Vhdx, what);
}

/// Deterministic scattered writes of 512 B .. 1 MiB, unaligned to blocks.
fn random_writes(size: u64, count: usize, seed: u64) -> Vec<(u64, u64, u8)> {
    scattered_writes(size, count, seed, |lcg| {
        (lcg.next() % 256 + 1) * 512 * (1 + lcg.next() % 8)
    })
}

#[test]
fn vhdx_images_qemu_img_makes_read_back_like_qemu_img_convert() {
    let dir = scratch();
    let mut cases: Vec<Vec<String>> = Vec::new();
    for subformat in ["dynamic", "fixed"] {
        for block_size in ["1M", "8M", "32M"] {
            for zero in ["on", "off"] {
                // qemu warns against block_state_zero=off with dynamic images only for convert.
                cases.push(vec![
                    format!("subformat={subformat}"),
                    format!("block_size={block_size}"),
                    format!("block_state_zero={zero}"),
                ]);
            }
        }
        // Preallocation is qemu's file-level option; the VHDX it writes must read the same.
        for preallocation in ["falloc", "full"] {
            cases.push(vec![
                format!("subformat={subformat}"),
                format!("preallocation={preallocation}"),
            ]);
        }
    }
    let mut index = 0;
    for options in &cases {
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        index += 1;
        let size = 40 * MIB + 3 * 512;
        let path = create(
            dir.path(),
            &format!("{index}.vhdx"),
            "vhdx",
            &size.to_string(),
            &options,
        );
        let mut writes = scatter(size);
        writes.extend(random_writes(size, 12, index));
        write_pattern(&path, "vhdx", &writes);
        assert_vhdx_like_qemu(&path, &format!("{options:?}"));
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn vhdx_with_256_mib_blocks_and_a_bigger_log_reads_like_qemu() {
    let dir = scratch();
    let path = create(
        dir.path(),
        "big-blocks.vhdx",
        "vhdx",
        "600M",
        &["block_size=256M", "log_size=8M"],
    );
    write_pattern(
        &path,
        "vhdx",
        &[(300 * MIB - 512, 8192, 0x42), (599 * MIB, MIB, 0x24)],
    );
    assert_vhdx_like_qemu(&path, "256M blocks");
}

/// 1 MiB blocks and 512-byte sectors put a sector-bitmap entry after every 4096 payload
/// entries: data past 4 GiB is found only if the interleave is right.
#[test]
fn sparse_vhdx_past_the_first_sector_bitmap_chunk_reads_like_qemu() {
    let dir = scratch();
    let size = 9u64 << 30;
    let path = create(dir.path(), "sparse.vhdx", "vhdx", "9G", &["block_size=1M"]);
    let writes = [
        (0, 4096, 0x01u8),
        (4095 * MIB, 2 * MIB, 0x02),
        ((4u64 << 30) + 12345 * 512, 4096, 0x03),
        ((8u64 << 30) + MIB / 2, MIB, 0x04),
        (size - 512, 512, 0x05),
    ];
    write_pattern(&path, "vhdx", &writes);
    let image = open_source(&path);
    assert_eq!(image.virtual_size(), size);
    // Every written byte reads back as written, and the allocated ranges are the 1 MiB blocks
    // the writes touched (qemu allocates whole blocks).
    let mut touched: Vec<Range<u64>> = Vec::new();
    for &(offset, length, pattern) in &writes {
        let mut buffer = vec![0u8; length as usize];
        image.read_at(&mut buffer, offset).unwrap();
        assert!(buffer.iter().all(|&b| b == pattern), "write at {offset}");
        let block = (offset / MIB * MIB)..(offset + length).div_ceil(MIB) * MIB;
        match touched.last_mut() {
            Some(last) if last.end >= block.start => last.end = last.end.max(block.end),
            _ => touched.push(block),
        }
    }
    assert_eq!(image.allocated_ranges(), &touched[..]);
    // And the zeros between them, read through the map, are zeros.
    let mut buffer = vec![0xffu8; 4 << 20];
    image.read_at(&mut buffer, 6u64 << 30).unwrap();
    assert!(buffer.iter().all(|&b| b == 0));
}

/// Region of `path` with `guid`: (file offset, length).
fn region(bytes: &[u8], guid_first: u32) -> u64 {
    let table = &bytes[192 * 1024..256 * 1024];
    let count = u32::from_le_bytes(table[8..12].try_into().unwrap()) as usize;
    (0..count)
        .map(|i| &table[16 + 32 * i..48 + 32 * i])
        .find(|e| u32::from_le_bytes(e[..4].try_into().unwrap()) == guid_first)
        .map(|e| u64::from_le_bytes(e[16..24].try_into().unwrap()))
        .unwrap()
}

const METADATA_GUID_FIRST: u32 = 0x8b7c_a206;

/// Offset in the file of metadata item whose GUID starts with `first`, and the table entry.
fn metadata_item(bytes: &[u8], first: u32) -> (usize, usize) {
    let at = region(bytes, METADATA_GUID_FIRST) as usize;
    let count = u16::from_le_bytes(bytes[at + 10..at + 12].try_into().unwrap()) as usize;
    for i in 0..count {
        let entry = at + 32 + 32 * i;
        if u32::from_le_bytes(bytes[entry..entry + 4].try_into().unwrap()) == first {
            let offset = u32::from_le_bytes(bytes[entry + 16..entry + 20].try_into().unwrap());
            return (at + offset as usize, entry);
        }
    }
    panic!("no metadata item {first:#x}");
}

#[test]
fn vhdx_with_4096_byte_logical_sectors_reads_like_the_same_image_with_512() {
    let dir = scratch();
    // 24 MiB in 1 MiB blocks: fewer blocks than either chunk ratio (4096 for 512-byte sectors,
    // 32768 for 4096-byte ones), so the BAT qemu-img wrote for 512-byte sectors is laid out the
    // same for 4096-byte ones and the guest's bytes are those qemu reads from the unpatched
    // image. qemu 7.2 itself refuses to open the patched one ("Operation not supported").
    let path = create(dir.path(), "4k.vhdx", "vhdx", "24M", &["block_size=1M"]);
    write_pattern(&path, "vhdx", &[(4096, 8192, 0x4b), (23 * MIB, MIB, 0x4c)]);
    let raw = qemu_to_raw(&path, "vhdx");
    let mut bytes = std::fs::read(&path).unwrap();
    let (logical, _) = metadata_item(&bytes, 0x8141_bf1d);
    bytes[logical..logical + 4].copy_from_slice(&4096u32.to_le_bytes());
    let (physical, _) = metadata_item(&bytes, 0xcda3_48c7);
    bytes[physical..physical + 4].copy_from_slice(&4096u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let image = open_source(&path);
    assert_eq!(image.virtual_size(), 24 * MIB);
    assert_reads_like(image.as_ref(), &raw);
    // A size that is not a multiple of the 4096-byte sector is refused.
    let (size, _) = metadata_item(&bytes, 0x2fa5_4224);
    bytes[size..size + 8].copy_from_slice(&(24 * MIB - 512).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    match formats::open(File::open(&path).unwrap()).unwrap_err() {
        Error::CorruptImage { message, .. } => assert!(message.contains("4096"), "{message}"),
        other => panic!("expected CorruptImage, got {other:?}"),
    }
}

/// tests/support/vhdx_diff.py, which writes differencing VHDX per MS-VHDX (qemu-img cannot).
fn generator() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/vhdx_diff.py")
}

/// Writes a differencing VHDX `child` over `parent` with the generator's `options`.
fn make_child(parent: &Path, child: &Path, options: &[String]) {
    let mut args = vec![
        path_str(&generator()).to_string(),
        path_str(parent).to_string(),
        path_str(child).to_string(),
    ];
    args.extend(options.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("python3", &args);
}

/// Opens `child` with `parent` passed under `name`, as imgctl passes it.
fn open_with_parent(
    child: &Path,
    parent: &Path,
    name: &str,
) -> imgcryptd::Result<Box<dyn SourceImage>> {
    let files = SourceFiles::new(
        File::open(child).unwrap(),
        vec![Passed {
            file: File::open(parent).unwrap(),
            name: name.into(),
            referenced_by: 0,
        }],
    )?;
    formats::open_files(&files)
}

/// The guest bytes of `parent` (qemu's read) with the child's `writes` (offset, length, byte)
/// and the `zero` ranges (offset, length) zeroed: what the child must read as.
fn expected_child(
    parent: &Path,
    dir: &Path,
    writes: &[(u64, u64, u8)],
    zero: &[(u64, u64)],
) -> PathBuf {
    let raw = qemu_to_raw(parent, "vhdx");
    let file = OpenOptions::new().write(true).open(&raw).unwrap();
    for &(offset, length, byte) in writes {
        file.write_all_at(&vec![byte; length as usize], offset)
            .unwrap();
    }
    for &(offset, length) in zero {
        file.write_all_at(&vec![0; length as usize], offset)
            .unwrap();
    }
    let expected = dir.join("expected.raw");
    std::fs::rename(&raw, &expected).unwrap();
    expected
}

fn write_options(writes: &[(u64, u64, u8)]) -> Vec<String> {
    writes
        .iter()
        .flat_map(|(offset, length, byte)| {
            ["--write".to_string(), format!("{offset}:{length}:{byte}")]
        })
        .collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A differencing VHDX over a qemu-img dynamic VHDX: fully present, partly present (sector
/// bitmap), not present (the parent's) and zero blocks read as the parent with the child's
/// sectors over it; the parent is asked for by the locator's names when not passed; a parent
/// with another DataWriteGuid or size is refused.
#[test]
fn differencing_vhdx_reads_the_child_over_its_parent() {
    let dir = scratch();
    let parent = create(dir.path(), "parent.vhdx", "vhdx", "16M", &["block_size=1M"]);
    write_pattern(
        &parent,
        "vhdx",
        &[
            (0, 8 * MIB, 0xa1),
            (10 * MIB + 4096, 8192, 0xa2),
            (15 * MIB, MIB, 0xa3),
        ],
    );
    let child = dir.path().join("child.vhdx");
    let writes = [
        // Block 0 partly: sectors 8..10, and the last sector.
        (4096, 1024, 0xc1u8),
        (MIB - 512, 512, 0xc2),
        // Block 2 whole.
        (2 * MIB, MIB, 0xc3),
        // Block 10 partly, next to the parent's data.
        (10 * MIB, 4096, 0xc4),
        (10 * MIB + 12288, 512, 0xc5),
    ];
    let mut options = strings(&[
        "--size",
        &(16 * MIB).to_string(),
        "--block-size",
        &MIB.to_string(),
        "--relative-path",
        ".\\parent.vhdx",
        "--absolute-win32-path",
        "D:\\Hyper-V\\disks\\parent.vhdx",
        "--zero-block",
        "5",
    ]);
    options.extend(write_options(&writes));
    make_child(&parent, &child, &options);
    let expected = expected_child(&parent, dir.path(), &writes, &[(5 * MIB, MIB)]);
    let image = open_with_parent(&child, &parent, "./parent.vhdx").unwrap();
    assert_eq!(image.virtual_size(), 16 * MIB);
    assert_reads_like(image.as_ref(), &expected);
    let (name, below) = image.backing().expect("a parent");
    assert_eq!(name, "./parent.vhdx");
    assert_eq!(below.format(), SourceFormat::Vhdx);
    // What the child stores, and what the parent does (its blocks of 1 MiB).
    let ranges = image.allocated_ranges();
    for (offset, length, _) in writes {
        assert!(
            ranges
                .iter()
                .any(|r| r.start <= offset && offset + length <= r.end),
            "{offset}: {ranges:?}"
        );
    }

    // Not passed: the daemon asks for it by the locator's names, in Hyper-V's order.
    match formats::open(File::open(&child).unwrap()).unwrap_err() {
        Error::NeedFile {
            referenced_by,
            candidates,
            ..
        } => {
            assert_eq!(referenced_by, 0);
            assert_eq!(candidates, strings(&["./parent.vhdx", "parent.vhdx"]));
        }
        other => panic!("expected NeedFile, got {other:?}"),
    }

    // Another parent (a fresh image has another DataWriteGuid), and one of another size.
    let other = create(dir.path(), "other.vhdx", "vhdx", "16M", &["block_size=1M"]);
    match open_with_parent(&child, &other, "./parent.vhdx").unwrap_err() {
        Error::UnsupportedImage { message } => {
            assert!(message.contains("DataWriteGuid"), "{message}")
        }
        other => panic!("expected UnsupportedImage, got {other:?}"),
    }
    let small = create(dir.path(), "small.vhdx", "vhdx", "8M", &[]);
    let resized = dir.path().join("resized.vhdx");
    make_child(&small, &resized, &options);
    match open_with_parent(&resized, &small, "./parent.vhdx").unwrap_err() {
        Error::UnsupportedImage { message } => assert!(message.contains("same size"), "{message}"),
        other => panic!("expected UnsupportedImage, got {other:?}"),
    }
    // parent_linkage2 is accepted too; a wrong parent_linkage alone is not.
    let linked = dir.path().join("linked.vhdx");
    let mut wrong = options.clone();
    wrong.extend(strings(&[
        "--linkage",
        "01234567-89ab-cdef-0123-456789abcdef",
    ]));
    make_child(&parent, &linked, &wrong);
    assert!(matches!(
        open_with_parent(&linked, &parent, "./parent.vhdx"),
        Err(Error::UnsupportedImage { .. })
    ));

    // Damage to the parent locator, the BAT and the sector bitmap (nothing here is
    // checksummed): opening and reading never panic.
    let good = std::fs::read(&child).unwrap();
    let (locator, locator_entry) = metadata_item(&good, 0xa8d3_5f2d);
    let bat = region(&good, 0x2dc2_7766) as usize;
    let bitmap_entry = bat + 4096 * 8;
    let mut positions: Vec<usize> = (locator..locator + 200).collect();
    // The item's offset and length (a hostile length is refused before it is allocated).
    positions.extend(locator_entry + 16..locator_entry + 24);
    positions.extend(bat..bat + 24);
    positions.extend(bitmap_entry..bitmap_entry + 8);
    positions.extend(4 * MIB as usize..4 * MIB as usize + 4);
    let damaged = dir.path().join("damaged.vhdx");
    let mut buffer = vec![0u8; MIB as usize];
    for at in positions {
        for value in [0u8, 0x07, 0xff] {
            let mut bytes = good.clone();
            bytes[at] = value;
            std::fs::write(&damaged, &bytes).unwrap();
            if let Ok(image) = open_with_parent(&damaged, &parent, "./parent.vhdx") {
                for offset in (0..image.virtual_size()).step_by(MIB as usize) {
                    let _ = image.read_at(&mut buffer, offset);
                }
            }
        }
    }
}

/// With 4096-byte logical sectors a bitmap bit stands for 4096 bytes.
#[test]
fn differencing_vhdx_with_4096_byte_sectors_reads_like_its_parent_and_child() {
    let dir = scratch();
    // As in the 4096-byte test above: a parent qemu-img made, patched to 4096-byte sectors
    // (24 blocks of 1 MiB, fewer than either chunk ratio, so the BAT is laid out alike).
    let parent = create(dir.path(), "parent.vhdx", "vhdx", "24M", &["block_size=1M"]);
    write_pattern(&parent, "vhdx", &[(0, 24 * MIB, 0x5a)]);
    let raw_parent = qemu_to_raw(&parent, "vhdx");
    let mut bytes = std::fs::read(&parent).unwrap();
    for guid in [0x8141_bf1d, 0xcda3_48c7] {
        let (item, _) = metadata_item(&bytes, guid);
        bytes[item..item + 4].copy_from_slice(&4096u32.to_le_bytes());
    }
    std::fs::write(&parent, &bytes).unwrap();
    let child = dir.path().join("child.vhdx");
    let writes = [
        (8192, 4096, 0xe1u8),
        (MIB - 4096, 4096, 0xe2),
        (23 * MIB, 12288, 0xe3),
    ];
    let mut options = strings(&[
        "--size",
        &(24 * MIB).to_string(),
        "--block-size",
        &MIB.to_string(),
        "--sector",
        "4096",
        "--relative-path",
        "parent.vhdx",
    ]);
    options.extend(write_options(&writes));
    make_child(&parent, &child, &options);
    let file = OpenOptions::new().write(true).open(&raw_parent).unwrap();
    for &(offset, length, byte) in &writes {
        file.write_all_at(&vec![byte; length as usize], offset)
            .unwrap();
    }
    let image = open_with_parent(&child, &parent, "parent.vhdx").unwrap();
    assert_reads_like(image.as_ref(), &raw_parent);
}

/// Header `n` (1 or 2) of `bytes`, resealed after `edit`.
fn edit_header(bytes: &mut [u8], n: usize, edit: impl Fn(&mut [u8])) {
    let at = n * 64 * 1024;
    edit(&mut bytes[at..at + 4096]);
    bytes[at + 4..at + 8].fill(0);
    let crc = crc32c(&bytes[at..at + 4096]);
    bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn vhdx_headers_are_chosen_like_qemu_chooses_them() {
    let dir = scratch();
    let path = create(dir.path(), "h.vhdx", "vhdx", "8M", &[]);
    write_pattern(&path, "vhdx", &[(MIB, 4096, 0x77)]);
    let good = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8], qemu_opens: bool| {
        std::fs::write(&path, bytes).unwrap();
        let qemu = run_status("qemu-img", &["info", "-f", "vhdx", path_str(&path)]);
        assert_eq!(qemu.is_ok(), qemu_opens, "qemu: {qemu:?}");
        let ours = formats::open(File::open(&path).unwrap());
        if qemu_opens {
            assert_vhdx_like_qemu(&path, "header case");
        } else {
            match ours.unwrap_err() {
                Error::CorruptImage { message, .. } => {
                    assert!(message.contains("header"), "{message}")
                }
                other => panic!("expected CorruptImage, got {other:?}"),
            }
        }
    };
    // One header's checksum broken: the other one is used.
    for n in [1, 2] {
        let mut bytes = good.clone();
        bytes[n * 64 * 1024 + 4] ^= 1;
        check(&bytes, true);
    }
    // Both broken.
    let mut bytes = good.clone();
    bytes[64 * 1024 + 4] ^= 1;
    bytes[128 * 1024 + 4] ^= 1;
    check(&bytes, false);
    // Equal sequence numbers, identical headers (as Disk2VHD writes them): accepted.
    let mut bytes = good.clone();
    let second = bytes[128 * 1024..128 * 1024 + 4096].to_vec();
    edit_header(&mut bytes, 1, |h| h.copy_from_slice(&second));
    check(&bytes, true);
    // Equal sequence numbers, different data write GUIDs: neither can be chosen.
    let mut bytes = good.clone();
    let sequence = good[128 * 1024 + 8..128 * 1024 + 16].to_vec();
    edit_header(&mut bytes, 1, |h| {
        h[8..16].copy_from_slice(&sequence);
        h[32] ^= 0x55;
    });
    check(&bytes, false);
}

#[test]
fn corpus_vhdx_images_read_or_are_refused_like_qemu() {
    let dir = scratch();
    // iotest 070's dynamic image and the Disk2VHD one (iotest 146: equal sequence numbers).
    for name in ["iotest-dynamic-1G.vhdx", "test-disk2vhd.vhdx"] {
        let path = corpus(name, dir.path());
        assert_vhdx_like_qemu(&path, name);
        std::fs::remove_file(path).unwrap();
    }
    // iotest 070's image with an unplayed log: qemu refuses it read-only and replays it
    // read-write. We replay it in memory and never write the source: what we read of the
    // untouched original is what qemu reads of a copy it replayed.
    let dirty = corpus("iotest-dirtylog-10G-4M.vhdx", dir.path());
    let qemu = run_status("qemu-img", &["info", "-f", "vhdx", path_str(&dirty)]).unwrap_err();
    assert!(qemu.contains("needs to be replayed"), "{qemu}");
    let before = std::fs::read(&dirty).unwrap();
    let replayed = dir.path().join("replayed.vhdx");
    std::fs::copy(&dirty, &replayed).unwrap();
    run(
        "qemu-img",
        &[
            "check",
            "-q",
            "-r",
            "all",
            "-f",
            "vhdx",
            path_str(&replayed),
        ],
    );
    assert!(
        std::fs::read(&replayed).unwrap() != before,
        "qemu replayed nothing, so the test would prove nothing"
    );
    let raw = qemu_to_raw(&replayed, "vhdx");
    let image = open_source(&dirty);
    assert_eq!(image.virtual_size(), 10 << 30);
    assert_reads_like(image.as_ref(), &raw);
    let notes = image.read_notes();
    assert!(
        notes.iter().any(|note| note.contains("replayed in memory")),
        "{notes:?}"
    );
    assert!(
        std::fs::read(&dirty).unwrap() == before,
        "the source was changed"
    );
    // Without the log's updates the original reads differently: the replay mattered.
    let mut stale = before.clone();
    let header_2 = 128 * 1024;
    let current = if u64::from_le_bytes(stale[64 * 1024 + 8..64 * 1024 + 16].try_into().unwrap())
        > u64::from_le_bytes(stale[header_2 + 8..header_2 + 16].try_into().unwrap())
    {
        64 * 1024
    } else {
        header_2
    };
    edit_header(&mut stale, current / (64 * 1024), |h| h[48..64].fill(0));
    let stale_path = dir.path().join("stale.vhdx");
    std::fs::write(&stale_path, &stale).unwrap();
    let stale_image = open_source(&stale_path);
    let mut expected = vec![0u8; 1 << 20];
    let mut got = vec![0u8; 1 << 20];
    let raw_file = File::open(&raw).unwrap();
    let differs = stale_image
        .allocated_ranges()
        .iter()
        .chain(image.allocated_ranges())
        .any(|range| {
            let len = (range.end - range.start).min(1 << 20) as usize;
            raw_file
                .read_exact_at(&mut expected[..len], range.start)
                .unwrap();
            stale_image.read_at(&mut got[..len], range.start).unwrap();
            expected[..len] != got[..len]
        })
        || stale_image.allocated_ranges() != image.allocated_ranges();
    assert!(differs, "the log changed nothing the guest sees");
}

/// Flips, zeroes and saturates bytes of every structure of a small VHDX (resealing the
/// checksums so the damage gets past them), and truncates it: opening and reading never
/// panics, and never allocates or reads more than the image's bounds allow.
#[test]
fn damaged_vhdx_never_panics() {
    let dir = scratch();
    let path = create(dir.path(), "d.vhdx", "vhdx", "6M", &["block_size=1M"]);
    write_pattern(
        &path,
        "vhdx",
        &[(0, 4096, 0x31), (3 * MIB, MIB + 512, 0x32)],
    );
    let good = std::fs::read(&path).unwrap();
    let metadata = region(&good, METADATA_GUID_FIRST) as usize;
    let bat = region(&good, 0x2dc2_7766) as usize;
    let mut positions: Vec<usize> = Vec::new();
    positions.extend(0..16);
    positions.extend((64 * 1024..64 * 1024 + 80).step_by(1));
    positions.extend((128 * 1024..128 * 1024 + 80).step_by(3));
    positions.extend((192 * 1024..192 * 1024 + 16 + 64).step_by(1));
    positions.extend((metadata..metadata + 32 + 5 * 32).step_by(1));
    positions.extend((metadata + 64 * 1024..metadata + 64 * 1024 + 40).step_by(1));
    positions.extend((bat..bat + 8 * 8).step_by(1));
    // The checksummed structure holding `at`, if any: (start, length).
    let sealed = |at: usize| {
        [
            (64 * 1024, 4096),
            (128 * 1024, 4096),
            (192 * 1024, 64 * 1024),
        ]
        .into_iter()
        .find(|&(start, len)| (start..start + len).contains(&at))
    };
    let reseal = |bytes: &mut [u8], at: usize| {
        if let Some((start, len)) = sealed(at) {
            bytes[start + 4..start + 8].fill(0);
            let crc = crc32c(&bytes[start..start + len]);
            bytes[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        }
    };
    let damaged = dir.path().join("damaged.vhdx");
    std::fs::write(&damaged, &good).unwrap();
    let file = OpenOptions::new().write(true).open(&damaged).unwrap();
    // Writes back the MiB holding `at` and the header section.
    let store = |bytes: &[u8], at: usize| {
        let mib = MIB as usize;
        for start in [0, at / mib * mib] {
            file.write_all_at(&bytes[start..start + mib], start as u64)
                .unwrap();
        }
    };
    let mut outcomes = [0usize; 2];
    let mut bytes = good.clone();
    for &at in &positions {
        for change in [0x00u8, 0xff, 0x80, 0x01] {
            let original = bytes[at];
            let damage = match change {
                0x80 | 0x01 => original ^ change,
                value => value,
            };
            if damage == original {
                continue;
            }
            bytes[at] = damage;
            reseal(&mut bytes, at);
            store(&bytes, at);
            exercise(&damaged, &mut outcomes);
            bytes[at] = original;
            reseal(&mut bytes, at);
            store(&bytes, at);
        }
    }
    drop(file);
    for length in [
        0,
        7,
        8,
        4096,
        64 * 1024 + 100,
        MIB as usize,
        good.len() - 1,
        good.len() - MIB as usize,
    ] {
        std::fs::write(&damaged, &good[..length]).unwrap();
        exercise(&damaged, &mut outcomes);
    }
    // Both kinds of outcome happen, or the loop tested nothing.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

fn exercise(path: &Path, outcomes: &mut [usize; 2]) {
    match formats::open(File::open(path).unwrap()) {
        Ok(image) => {
            outcomes[0] += 1;
            // Read what is allocated (bounded by the 8 MiB file) and the first and last MiB.
            let size = image.virtual_size();
            let mut buffer = vec![0u8; MIB as usize];
            for range in image.allocated_ranges().iter().take(64) {
                let mut at = range.start;
                while at < range.end {
                    let len = (range.end - at).min(MIB) as usize;
                    let _ = image.read_at(&mut buffer[..len], at);
                    at += len as u64;
                }
            }
            for at in [0, size.saturating_sub(MIB)] {
                let len = (size - at).min(MIB) as usize;
                let _ = image.read_at(&mut buffer[..len], at);
            }
        }
        Err(_) => outcomes[1] += 1,
    }
}

/// A log GUID in the current header with no entry for it in the log is an empty log: qemu
/// opens it read-only and so do we. A valid-looking entry header whose checksum fails is no
/// entry either. (The refused case, a real unplayed log, is the corpus' dirtylog image.)
/// One log entry (MS-VHDX 2.3.1) for `guid` with sequence number `sequence`, its tail at the
/// log's start: data descriptors writing `sectors` (file offset, 4096 bytes) and zero
/// descriptors over `zeros` (file offset, length), sealed with its CRC-32C.
fn log_entry(
    guid: &[u8; 16],
    sequence: u64,
    sectors: &[(u64, Vec<u8>)],
    zeros: &[(u64, u64)],
) -> Vec<u8> {
    let count = sectors.len() + zeros.len();
    let descriptor_sectors = (count + 2).div_ceil(128);
    let length = (descriptor_sectors + sectors.len()) * 4096;
    let mut entry = vec![0u8; length];
    entry[..4].copy_from_slice(b"loge");
    entry[8..12].copy_from_slice(&(length as u32).to_le_bytes());
    entry[16..24].copy_from_slice(&sequence.to_le_bytes());
    entry[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    entry[32..48].copy_from_slice(guid);
    let mut slot = 2;
    for (index, (at, data)) in sectors.iter().enumerate() {
        let d = slot * 32;
        entry[d..d + 4].copy_from_slice(b"desc");
        entry[d + 4..d + 8].copy_from_slice(&data[4092..]);
        entry[d + 8..d + 16].copy_from_slice(&data[..8]);
        entry[d + 16..d + 24].copy_from_slice(&at.to_le_bytes());
        entry[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
        let s = (descriptor_sectors + index) * 4096;
        entry[s..s + 4].copy_from_slice(b"data");
        entry[s + 4..s + 8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
        entry[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        entry[s + 4092..s + 4096].copy_from_slice(&(sequence as u32).to_le_bytes());
        slot += 1;
    }
    for (at, len) in zeros {
        let d = slot * 32;
        entry[d..d + 4].copy_from_slice(b"zero");
        entry[d + 8..d + 16].copy_from_slice(&len.to_le_bytes());
        entry[d + 16..d + 24].copy_from_slice(&at.to_le_bytes());
        entry[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
        slot += 1;
    }
    let crc = crc32c(&entry);
    entry[4..8].copy_from_slice(&crc.to_le_bytes());
    entry
}

/// Opens `path` (with a log to replay) and checks that it reads like qemu's read of a copy
/// qemu replayed, and that `path` is left unchanged.
fn assert_reads_like_replayed(path: &Path, dir: &Path) -> Box<dyn SourceImage> {
    let before = std::fs::read(path).unwrap();
    let copy = dir.join("replayed-copy.vhdx");
    std::fs::copy(path, &copy).unwrap();
    run(
        "qemu-img",
        &["check", "-q", "-r", "all", "-f", "vhdx", path_str(&copy)],
    );
    let raw = qemu_to_raw(&copy, "vhdx");
    let image = open_source(path);
    assert_reads_like(image.as_ref(), &raw);
    assert!(
        std::fs::read(path).unwrap() == before,
        "the source was changed"
    );
    image
}

#[test]
fn a_log_guid_without_a_valid_entry_reads_like_qemu() {
    let dir = scratch();
    let path = create(dir.path(), "log.vhdx", "vhdx", "8M", &[]);
    write_pattern(&path, "vhdx", &[(MIB, 4096, 0x66)]);
    let mut bytes = std::fs::read(&path).unwrap();
    let guid = [0x5au8; 16];
    for n in [1, 2] {
        edit_header(&mut bytes, n, |h| h[48..64].copy_from_slice(&guid));
    }
    // An entry header for that GUID at the log's start, with a wrong checksum.
    let log = u64::from_le_bytes(bytes[64 * 1024 + 72..64 * 1024 + 80].try_into().unwrap());
    let log = log as usize;
    bytes[log..log + 4].copy_from_slice(b"loge");
    bytes[log + 4..log + 8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    bytes[log + 8..log + 12].copy_from_slice(&4096u32.to_le_bytes());
    bytes[log + 16..log + 24].copy_from_slice(&1u64.to_le_bytes());
    bytes[log + 32..log + 48].copy_from_slice(&guid);
    std::fs::write(&path, &bytes).unwrap();
    assert_vhdx_like_qemu(&path, "log GUID, no valid entry");

    // The same entry with its checksum right is a log to replay (with nothing in it): qemu
    // refuses it read-only; we replay it in memory, and read what qemu reads once it replayed.
    let entry = log_entry(&guid, 1, &[], &[]);
    bytes[log..log + entry.len()].copy_from_slice(&entry);
    std::fs::write(&path, &bytes).unwrap();
    let qemu = run_status("qemu-img", &["info", "-f", "vhdx", path_str(&path)]).unwrap_err();
    assert!(qemu.contains("needs to be replayed"), "{qemu}");
    assert_reads_like_replayed(&path, dir.path());

    // A data descriptor that rewrites the BAT sector (block 0 made NOT_PRESENT) and a zero
    // descriptor over free space: read like qemu's replay of a copy.
    let bat = region(&bytes, 0x2dc2_7766) as usize;
    let block = u64::from_le_bytes(bytes[bat..bat + 8].try_into().unwrap()) & !(MIB - 1);
    let mut bat_sector = bytes[bat..bat + 4096].to_vec();
    bat_sector[..8].fill(0);
    let file_len = bytes.len() as u64;
    let entry = log_entry(
        &guid,
        1,
        &[(bat as u64, bat_sector)],
        &[(file_len - 4096, 4096)],
    );
    bytes[log..log + entry.len()].copy_from_slice(&entry);
    std::fs::write(&path, &bytes).unwrap();
    let image = assert_reads_like_replayed(&path, dir.path());
    assert!(image.allocated_ranges().is_empty());

    // One that writes into the data block the guest reads is refused, saying what to do.
    let entry = log_entry(&guid, 1, &[(block + MIB, vec![0x99; 4096])], &[]);
    bytes[log..log + entry.len()].copy_from_slice(&entry);
    std::fs::write(&path, &bytes).unwrap();
    match formats::open(File::open(&path).unwrap()).unwrap_err() {
        Error::UnsupportedImage { message } => {
            assert!(message.contains("qemu-img check -r all"), "{message}");
            assert!(message.contains("data block"), "{message}");
        }
        other => panic!("expected UnsupportedImage, got {other:?}"),
    }
}
