//! Differencing VHDs built here from the specification's layout (footer copy, dynamic header
//! with parent fields and locators, BAT, locator data, blocks of bitmap and data, footer),
//! independently of the reader; the expected guest bytes come from [`model`], which applies
//! each layer's allocated sectors over the one below, never from the code under test.

use std::fs::File;
use std::os::unix::fs::FileExt;

use imgcrypt_proto::api::SourceFormat;

use super::*;
use crate::formats::files::{Passed, SourceFiles};
use crate::formats::open_files;
use crate::formats::vhd::footer::build::{footer, reseal, AT_TIMESTAMP};
use crate::formats::vhd::footer::{checksum, FOOTER_SIZE};

const BLOCK: u32 = 64 * 1024;
const SIZE: u64 = 6 * BLOCK as u64;
const SECTORS: usize = BLOCK as usize / 512;

/// One VHD to build: dynamic (3) or differencing (4).
#[derive(Clone)]
struct Disk {
    disk_type: u32,
    size: u64,
    uuid: [u8; 16],
    timestamp: u32,
    parent_uuid: [u8; 16],
    parent_timestamp: u32,
    parent_name: String,
    /// Platform code and data of each locator, in table order.
    locators: Vec<(u32, Vec<u8>)>,
    /// Guest block and its sector bitmap (one bool per sector).
    blocks: Vec<(u32, Vec<bool>)>,
    /// Tells this layer's data apart from the others'.
    tag: u8,
}

/// The guest byte at `offset` of the layer tagged `tag`: never zero, different per sector.
fn byte(tag: u8, offset: u64) -> u8 {
    (((offset / 512) as u8).wrapping_mul(31) ^ (offset % 251) as u8 ^ tag) | 1
}

fn all(value: bool) -> Vec<bool> {
    vec![value; SECTORS]
}

fn utf16le(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

impl Disk {
    fn dynamic(uuid: u8, tag: u8, blocks: &[u32]) -> Self {
        Self {
            disk_type: 3,
            size: SIZE,
            uuid: [uuid; 16],
            timestamp: 1000 + u32::from(uuid),
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: Vec::new(),
            blocks: blocks.iter().map(|&block| (block, all(true))).collect(),
            tag,
        }
    }

    /// A child of `parent`, found as `./NAME` through a W2ru locator.
    fn child_of(parent: &Disk, name: &str, uuid: u8, tag: u8) -> Self {
        Self {
            disk_type: 4,
            size: parent.size,
            uuid: [uuid; 16],
            timestamp: 2000 + u32::from(uuid),
            parent_uuid: parent.uuid,
            parent_timestamp: parent.timestamp,
            parent_name: name.to_string(),
            locators: vec![(PLATFORM_W2RU, utf16le(&format!(".\\{name}")))],
            blocks: Vec::new(),
            tag,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let entries = self.size.div_ceil(u64::from(BLOCK));
        let table_at = 1536u64;
        let table_bytes = (entries * 4).next_multiple_of(512);
        let mut at = table_at + table_bytes;
        let mut placed = Vec::new();
        for (_, data) in &self.locators {
            placed.push(at);
            at += (data.len() as u64).max(1).next_multiple_of(512);
        }
        let first_block = at;
        let span = 512 + u64::from(BLOCK);
        let end = first_block + span * self.blocks.len() as u64;
        let mut bytes = vec![0u8; (end + FOOTER_SIZE as u64) as usize];
        let mut foot = footer(self.disk_type, b"win ", self.size, (65535, 16, 255), 512);
        foot[AT_TIMESTAMP..AT_TIMESTAMP + 4].copy_from_slice(&self.timestamp.to_be_bytes());
        foot[68..84].copy_from_slice(&self.uuid);
        reseal(&mut foot);
        bytes[..FOOTER_SIZE].copy_from_slice(&foot);
        bytes[end as usize..].copy_from_slice(&foot);

        let header = &mut bytes[512..1536];
        header[..8].copy_from_slice(b"cxsparse");
        header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        header[16..24].copy_from_slice(&table_at.to_be_bytes());
        header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        header[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        header[32..36].copy_from_slice(&BLOCK.to_be_bytes());
        header[40..56].copy_from_slice(&self.parent_uuid);
        header[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        let name: Vec<u8> = self
            .parent_name
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        header[64..64 + name.len()].copy_from_slice(&name);
        for (index, ((code, data), &offset)) in self.locators.iter().zip(&placed).enumerate() {
            let entry = &mut header[576 + 24 * index..600 + 24 * index];
            entry[..4].copy_from_slice(&code.to_be_bytes());
            // Data space in bytes, as Hyper-V and blktap write it.
            let space = (data.len() as u32).max(1).next_multiple_of(512);
            entry[4..8].copy_from_slice(&space.to_be_bytes());
            entry[8..12].copy_from_slice(&(data.len() as u32).to_be_bytes());
            entry[16..24].copy_from_slice(&offset.to_be_bytes());
        }
        let sum = checksum(header, 36);
        header[36..40].copy_from_slice(&sum.to_be_bytes());
        for ((_, data), &offset) in self.locators.iter().zip(&placed) {
            bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }

        bytes[table_at as usize..(table_at + table_bytes) as usize].fill(0xff);
        for (position, (guest_block, bits)) in self.blocks.iter().enumerate() {
            let at = first_block + span * position as u64;
            let entry = (table_at + u64::from(*guest_block) * 4) as usize;
            bytes[entry..entry + 4].copy_from_slice(&((at / 512) as u32).to_be_bytes());
            for (sector, &set) in bits.iter().enumerate() {
                if set {
                    bytes[at as usize + sector / 8] |= 0x80 >> (sector % 8);
                }
            }
            let guest_start = u64::from(*guest_block) * u64::from(BLOCK);
            for i in 0..u64::from(BLOCK) {
                bytes[(at + 512 + i) as usize] = byte(self.tag, guest_start + i);
            }
        }
        bytes
    }

    fn file(&self) -> File {
        file_with(&self.bytes())
    }
}

fn file_with(bytes: &[u8]) -> File {
    let file = tempfile::tempfile_in("/tmp").unwrap();
    file.write_all_at(bytes, 0).unwrap();
    file
}

/// The disk `layers` (top first) show: each sector from the first layer holding it (a dynamic
/// layer's allocated block holds all its sectors; a differencing layer's, those whose bit is
/// set), zeros where none does or past a layer's end.
fn model(layers: &[&Disk]) -> Vec<u8> {
    let size = layers[0].size;
    let mut disk = vec![0u8; size as usize];
    for sector in 0..size / 512 {
        let block = (sector * 512 / u64::from(BLOCK)) as u32;
        let in_block = (sector % SECTORS as u64) as usize;
        for layer in layers {
            if sector * 512 >= layer.size {
                break;
            }
            let held = layer
                .blocks
                .iter()
                .any(|(b, bits)| *b == block && (layer.disk_type == 3 || bits[in_block]));
            if held {
                for i in sector * 512..(sector + 1) * 512 {
                    disk[i as usize] = byte(layer.tag, i);
                }
                break;
            }
        }
    }
    disk
}

fn passed(disk: &Disk, name: &str, referenced_by: u32) -> Passed {
    Passed {
        file: disk.file(),
        name: name.into(),
        referenced_by,
    }
}

fn read_all(image: &dyn SourceImage, split: usize) -> Vec<u8> {
    let mut got = vec![0u8; image.virtual_size() as usize];
    for (index, piece) in got.chunks_mut(split).enumerate() {
        image.read_at(piece, (index * split) as u64).unwrap();
    }
    got
}

/// Block 0 all the child's, block 1 partly (runs and single sectors), block 2 only the
/// parent's, block 3 in neither, block 4 allocated in the child with no bit set, block 5 the
/// child's over no parent data.
fn two_layers() -> (Disk, Disk) {
    let parent = Disk::dynamic(0x11, 0x20, &[0, 1, 2, 4]);
    let mut child = Disk::child_of(&parent, "parent.vhd", 0x22, 0x40);
    let mut partial = all(false);
    for sector in [0, 1, 2, 7, 8, 9, 10, 64, SECTORS - 1] {
        partial[sector] = true;
    }
    child.blocks = vec![
        (1, partial),
        (0, all(true)),
        (4, all(false)),
        (5, all(true)),
    ];
    (parent, child)
}

#[test]
fn the_bitmap_decides_each_sector_and_unallocated_blocks_are_the_parents() {
    let (parent, child) = two_layers();
    let files = SourceFiles::new(child.file(), vec![passed(&parent, "./parent.vhd", 0)]).unwrap();
    let image = open_files(&files).unwrap();
    assert_eq!(image.format(), SourceFormat::VhdDifferencing);
    assert_eq!(image.virtual_size(), SIZE);
    assert_eq!(image.allocation_unit(), Some(u64::from(BLOCK)));
    let expected = model(&[&child, &parent]);
    for split in [511, 512, 4096, 5000, BLOCK as usize, SIZE as usize] {
        assert!(read_all(image.as_ref(), split) == expected, "split {split}");
    }
    let (name, below) = image.backing().expect("a parent");
    assert_eq!(name, "./parent.vhd");
    assert_eq!(below.format(), SourceFormat::VhdDynamic);
    // The child's blocks with a sector of its own (0, 1, 5) and the parent's (0, 1, 2, 4).
    let block = u64::from(BLOCK);
    assert_eq!(
        image.allocated_ranges(),
        &[0..3 * block, 4 * block..6 * block]
    );
    assert!(image.read_notes().is_empty(), "{:?}", image.read_notes());
}

#[test]
fn a_chain_of_three_reads_each_sector_from_the_topmost_layer_holding_it() {
    let base = Disk::dynamic(0x01, 0x08, &[0, 1, 2, 3]);
    let mut middle = Disk::child_of(&base, "base.vhd", 0x02, 0x20);
    let mut top = Disk::child_of(&middle, "middle.vhd", 0x03, 0x40);
    let mut half = all(false);
    half[..SECTORS / 2].fill(true);
    let mut odd = all(false);
    for sector in (1..SECTORS).step_by(2) {
        odd[sector] = true;
    }
    middle.blocks = vec![(0, half.clone()), (1, all(true)), (4, odd.clone())];
    top.blocks = vec![(0, odd), (2, half), (5, all(true))];
    let files = SourceFiles::new(
        top.file(),
        vec![
            passed(&middle, "./middle.vhd", 0),
            passed(&base, "./base.vhd", 1),
        ],
    )
    .unwrap();
    let image = open_files(&files).unwrap();
    let expected = model(&[&top, &middle, &base]);
    assert!(read_all(image.as_ref(), 3000) == expected);
    let (_, below) = image.backing().unwrap();
    assert_eq!(below.format(), SourceFormat::VhdDifferencing);
    assert_eq!(below.backing().unwrap().0, "./base.vhd");
}

#[test]
fn a_parent_with_another_unique_id_is_refused_naming_both() {
    let (parent, mut child) = two_layers();
    child.parent_uuid = [0x33; 16];
    let files = SourceFiles::new(child.file(), vec![passed(&parent, "./parent.vhd", 0)]).unwrap();
    match open_files(&files).unwrap_err() {
        Error::UnsupportedImage { message } => {
            for words in [
                "11111111-1111-1111-1111-111111111111",
                "33333333-3333-3333-3333-333333333333",
                "not this disk's parent",
                "vhd-util modify",
            ] {
                assert!(message.contains(words), "{words}: {message}");
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_time_stamp_matching_neither_footer_nor_mtime_is_read_with_a_note() {
    let (parent, mut child) = two_layers();
    child.parent_timestamp = 77;
    let files = SourceFiles::new(child.file(), vec![passed(&parent, "./parent.vhd", 0)]).unwrap();
    let image = open_files(&files).unwrap();
    assert!(read_all(image.as_ref(), 65536) == model(&[&child, &parent]));
    let notes = image.read_notes().join("\n");
    assert!(notes.contains("time stamp 77"), "{notes}");
    assert!(
        notes.contains(&format!("footer time stamp {}", parent.timestamp)),
        "{notes}"
    );
}

#[test]
fn a_missing_parent_is_asked_for_by_every_recorded_name_in_order() {
    let (parent, mut child) = two_layers();
    let _ = parent;
    child.parent_name = "base.vhd".into();
    child.locators = vec![
        (PLATFORM_W2KU, utf16le("C:\\vms\\base.vhd")),
        (PLATFORM_MACX, b"file:///srv/vm%20disks/base.vhd".to_vec()),
        // A Mac OS alias record cannot be read: skipped.
        (u32::from_be_bytes(*b"Mac "), vec![0xde, 0xad]),
        (PLATFORM_W2RU, utf16le(".\\sub\\base.vhd")),
        // blktap writes its relative path in every form.
        (PLATFORM_MACX, b"file://./base.vhd".to_vec()),
        (PLATFORM_W2KU, utf16le("\\\\server\\share\\unc.vhd")),
    ];
    let files = SourceFiles::new(child.file(), Vec::new()).unwrap();
    match open_files(&files).unwrap_err() {
        Error::NeedFile {
            referenced_by,
            relation,
            candidates,
            ..
        } => {
            assert_eq!(referenced_by, 0);
            assert_eq!(relation, Relation::Parent);
            assert_eq!(
                candidates,
                [
                    "./sub/base.vhd",
                    "./base.vhd",
                    "/srv/vm disks/base.vhd",
                    "base.vhd",
                    "unc.vhd",
                ]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_parent_of_a_parent_is_asked_for_by_the_parent() {
    let base = Disk::dynamic(0x01, 0x08, &[0]);
    let middle = Disk::child_of(&base, "base.vhd", 0x02, 0x20);
    let top = Disk::child_of(&middle, "middle.vhd", 0x03, 0x40);
    let files = SourceFiles::new(top.file(), vec![passed(&middle, "./middle.vhd", 0)]).unwrap();
    match open_files(&files).unwrap_err() {
        Error::NeedFile {
            referenced_by,
            referencing_name,
            candidates,
            ..
        } => {
            assert_eq!(referenced_by, 1);
            assert_eq!(referencing_name, "./middle.vhd");
            assert_eq!(candidates, ["./base.vhd", "base.vhd"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_disk_that_is_its_own_parent_is_a_cycle() {
    let mut child = Disk::dynamic(0x44, 0x40, &[0]);
    child.disk_type = 4;
    child.parent_uuid = child.uuid;
    child.locators = vec![(PLATFORM_W2RU, utf16le(".\\self.vhd"))];
    let file = child.file();
    let again = file.try_clone().unwrap();
    let files = SourceFiles::new(
        file,
        vec![Passed {
            file: again,
            name: "./self.vhd".into(),
            referenced_by: 0,
        }],
    )
    .unwrap();
    match open_files(&files).unwrap_err() {
        Error::CorruptImage { message, .. } => assert!(message.contains("cycle"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hostile_locators_are_corrupt_at_their_entry() {
    let (_, child) = two_layers();
    let bytes = child.bytes();
    let entry = 512 + 576;
    for (field, value, words) in [
        (8usize, u64::from(u32::MAX), "more than the 8192"),
        (16, u64::MAX - 4, "outside the file"),
        (16, bytes.len() as u64 - 100, "outside the file"),
        (8, 3, "not UTF-16LE"),
    ] {
        let mut bytes = bytes.clone();
        if field == 8 {
            bytes[entry + 8..entry + 12].copy_from_slice(&(value as u32).to_be_bytes());
        } else {
            bytes[entry + 16..entry + 24].copy_from_slice(&value.to_be_bytes());
        }
        bytes[512 + 36..512 + 40].fill(0);
        let sum = checksum(&bytes[512..1536], 36);
        bytes[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
        let files = SourceFiles::new(file_with(&bytes), Vec::new()).unwrap();
        match open_files(&files).unwrap_err() {
            Error::CorruptImage { message, offset } => {
                assert!(message.contains(words), "{words}: {message}");
                assert!(message.contains("parent locator 0 (W2ru)"), "{message}");
                assert_eq!(offset, Some(entry as u64));
            }
            other => panic!("{words}: {other:?}"),
        }
    }
}

#[test]
fn a_parent_that_is_not_a_vhd_or_larger_is_refused_and_a_smaller_one_ends_in_zeros() {
    let (parent, child) = two_layers();
    let raw = Passed {
        file: file_with(&[7u8; SIZE as usize]),
        name: "./parent.vhd".into(),
        referenced_by: 0,
    };
    let files = SourceFiles::new(child.file(), vec![raw]).unwrap();
    let message = open_files(&files).unwrap_err().to_string();
    assert!(message.contains("is not a VHD"), "{message}");

    let mut larger = parent.clone();
    larger.size = SIZE + u64::from(BLOCK);
    let files = SourceFiles::new(child.file(), vec![passed(&larger, "./parent.vhd", 0)]).unwrap();
    let message = open_files(&files).unwrap_err().to_string();
    assert!(message.contains("larger than the child's"), "{message}");

    let mut smaller = parent.clone();
    smaller.size = 2 * u64::from(BLOCK);
    smaller.blocks.retain(|(block, _)| *block < 2);
    let files = SourceFiles::new(child.file(), vec![passed(&smaller, "./parent.vhd", 0)]).unwrap();
    let image = open_files(&files).unwrap();
    assert!(read_all(image.as_ref(), 8192) == model(&[&child, &smaller]));
}

#[test]
fn runs_stop_where_the_bitmap_changes_and_at_the_range_asked() {
    let mut bits = vec![0u8; SECTORS / 8];
    bits[0] = 0b1110_0000;
    let presence = Presence {
        kinds: vec![0, ALL_CHILD, ALL_PARENT],
        partial: bits,
        bitmap_bytes: SECTORS / 8,
    };
    assert_eq!(presence.run(0, 0, u64::from(BLOCK)), (1536, true));
    assert_eq!(presence.run(0, 100, 1000), (1000, true));
    assert_eq!(presence.run(0, 1000, 4000), (536, true));
    assert_eq!(presence.run(0, 1536, 4000), (4000, false));
    assert_eq!(presence.run(1, 7, 9), (9, true));
    assert_eq!(presence.run(2, 7, 9), (9, false));
    assert!(presence.any_present(0) && presence.any_present(1) && !presence.any_present(2));
}
