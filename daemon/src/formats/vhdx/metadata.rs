//! The VHDX metadata region (MS-VHDX 2.6): a 64 KiB table of items, then the items.
//!
//! Five items are required (file parameters, virtual disk size, page 83 data, logical and
//! physical sector size); the parent locator comes with differencing disks. An unknown item
//! marked required makes the image unreadable, as the specification says.

use std::ops::Range;

use super::log::Sectors;
use super::{le_u16, le_u32, le_u64, Guid, MIB};
use crate::{Error, Result};

const TABLE_BYTES: usize = 64 * 1024;
const MAX_ENTRIES: u16 = 2047;
const ITEM_REQUIRED: u32 = 4;

const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
const PAGE_83: Guid = Guid::from_fields(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);

const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
const HAS_PARENT: u32 = 2;
/// The largest virtual disk the specification allows (64 TiB).
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// What the metadata says about the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Metadata {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Where the parent locator item is in the file, and its length (differencing disks).
    pub parent_locator: Option<(u64, u32)>,
}

/// Reads the metadata table at the start of `region` and the items the reader needs.
pub(super) fn read(sectors: Sectors<'_>, region: &Range<u64>) -> Result<Metadata> {
    let at = region.start;
    let corrupt = |what: String| Error::corrupt(format!("VHDX metadata: {what}"), Some(at));
    if region.end - region.start < TABLE_BYTES as u64 {
        return Err(corrupt(
            "the region is smaller than its 64 KiB table".into(),
        ));
    }
    let mut table = vec![0u8; TABLE_BYTES];
    sectors.read(&mut table, at, "the VHDX metadata table")?;
    if &table[..8] != b"metadata" {
        return Err(corrupt(format!(
            "no \"metadata\" signature at offset {at}: the image is damaged"
        )));
    }
    let count = le_u16(&table, 10);
    if count > MAX_ENTRIES {
        return Err(corrupt(format!(
            "{count} table entries, more than the {MAX_ENTRIES} allowed"
        )));
    }
    let wanted = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        PAGE_83,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ];
    let mut found: [Option<(u32, u32)>; 6] = [None; 6];
    for index in 0..usize::from(count) {
        let entry = &table[32 + 32 * index..64 + 32 * index];
        let guid = Guid(entry[..16].try_into().expect("16 bytes"));
        let offset = le_u32(entry, 16);
        let length = le_u32(entry, 20);
        let flags = le_u32(entry, 24);
        match wanted.iter().position(|&w| w == guid) {
            Some(slot) if found[slot].replace((offset, length)).is_some() => {
                return Err(corrupt(format!("item {guid} is listed twice")));
            }
            Some(_) => {}
            None if flags & ITEM_REQUIRED != 0 => {
                return Err(Error::UnsupportedImage {
                    message: format!(
                        "the VHDX metadata lists a required item {guid} that this reader does \
                         not know: convert the image with Hyper-V (`Convert-VHD`) or qemu-img \
                         to a format imgcrypt reads"
                    ),
                })
            }
            None => {}
        }
    }
    // Reads item `slot`, which must be `N` bytes or longer and inside the region.
    let item = |slot: usize, bytes: &mut [u8]| -> Result<()> {
        let name = [
            "file parameters",
            "virtual disk size",
            "page 83 data",
            "logical sector size",
            "physical sector size",
            "parent locator",
        ][slot];
        let (offset, length) =
            found[slot].ok_or_else(|| corrupt(format!("the required {name} item is missing")))?;
        let start = at + u64::from(offset);
        let end = start + bytes.len() as u64;
        if (length as usize) < bytes.len() || offset < TABLE_BYTES as u32 || end > region.end {
            return Err(corrupt(format!(
                "the {name} item ({length} bytes at offset {offset} of the region) is too short \
                 or outside the {}-byte region",
                region.end - region.start
            )));
        }
        sectors.read(bytes, start, name)
    };
    let mut parameters = [0u8; 8];
    item(0, &mut parameters)?;
    let mut size = [0u8; 8];
    item(1, &mut size)?;
    let mut page_83 = [0u8; 16];
    item(2, &mut page_83)?;
    let mut logical = [0u8; 4];
    item(3, &mut logical)?;
    let mut physical = [0u8; 4];
    item(4, &mut physical)?;

    let block_size = le_u32(&parameters, 0);
    let bits = le_u32(&parameters, 4);
    let metadata = Metadata {
        block_size,
        leave_blocks_allocated: bits & LEAVE_BLOCKS_ALLOCATED != 0,
        has_parent: bits & HAS_PARENT != 0,
        virtual_size: le_u64(&size, 0),
        logical_sector_size: le_u32(&logical, 0),
        physical_sector_size: le_u32(&physical, 0),
        parent_locator: None,
    };
    if !(MIB..=256 * MIB).contains(&u64::from(block_size)) || !block_size.is_power_of_two() {
        return Err(corrupt(format!(
            "block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    for (name, value) in [
        ("logical", metadata.logical_sector_size),
        ("physical", metadata.physical_sector_size),
    ] {
        if value != 512 && value != 4096 {
            return Err(corrupt(format!(
                "{name} sector size {value}; only 512 and 4096 exist"
            )));
        }
    }
    if metadata.virtual_size > MAX_VIRTUAL_SIZE
        || metadata.virtual_size % u64::from(metadata.logical_sector_size) != 0
    {
        return Err(corrupt(format!(
            "virtual disk size {} is not a multiple of the {}-byte logical sector or exceeds \
             the 64 TiB maximum",
            metadata.virtual_size, metadata.logical_sector_size
        )));
    }
    if metadata.has_parent {
        let (offset, length) = found[5].ok_or_else(|| {
            corrupt(
                "the file parameters say the disk has a parent but there is no parent locator"
                    .into(),
            )
        })?;
        let start = at + u64::from(offset);
        if offset < TABLE_BYTES as u32 || start.saturating_add(u64::from(length)) > region.end {
            return Err(corrupt(format!(
                "the parent locator item ({length} bytes at offset {offset} of the region) is \
                 outside the {}-byte region",
                region.end - region.start
            )));
        }
        return Ok(Metadata {
            parent_locator: Some((start, length)),
            ..metadata
        });
    }
    Ok(metadata)
}
