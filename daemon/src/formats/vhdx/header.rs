//! The VHDX header section (the first MiB): the two headers, the region table, and the check
//! whether a log too long to replay in memory has anything left to replay.
//!
//! Layout (MS-VHDX 2.2): file identifier `vhdxfile` at 0, header 1 at 64 KiB, header 2 at
//! 128 KiB, region table at 192 KiB (its copy at 256 KiB is not read). Every structure carries a
//! CRC-32C over itself with the checksum field read as zero: a header over 4 KiB, the region
//! table over 64 KiB.

use std::fs::File;
use std::ops::Range;

use super::crc32c::{checksum_with_hole, Crc32c};
use super::log::Sectors;
use super::{le_u16, le_u32, le_u64, Guid, MIB};
use crate::formats::read_exact_at;
use crate::{Error, Result};

pub(super) const HEADER_1_AT: u64 = 64 * 1024;
pub(super) const HEADER_2_AT: u64 = 128 * 1024;
pub(super) const REGION_TABLE_AT: u64 = 192 * 1024;
/// The header section, which no region or block may overlap.
pub(super) const HEADER_SECTION: Range<u64> = 0..MIB;

const HEADER_BYTES: usize = 4096;
/// The part of a header that holds fields (qemu compares this part when sequence numbers tie).
const HEADER_FIELDS: usize = 80;
const REGION_TABLE_BYTES: usize = 64 * 1024;
const MAX_REGION_ENTRIES: u32 = 2047;
const REGION_REQUIRED: u32 = 1;

/// Region GUIDs, as stored (MS GUID: the first three fields little-endian).
pub(super) const BAT_REGION: Guid = Guid::from_fields(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub(super) const METADATA_REGION: Guid = Guid::from_fields(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);

/// The log may be this long at most; qemu and Hyper-V make 1 MiB logs (logs up to
/// [`super::log::MAX_REPLAY_LOG_BYTES`] are replayed in memory, longer ones only checked here).
const MAX_LOG_BYTES: u64 = 256 * MIB;
/// Bytes the log check hashes at most before it gives up (a hostile log could otherwise make it
/// hash every 4 KiB position's claimed entry).
const MAX_LOG_BYTES_HASHED: u64 = 64 * MIB;
const LOG_SECTOR: u64 = 4096;

/// The fields of the current header that the reader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub sequence: u64,
    /// Changes whenever the disk's contents do: what a differencing child records of its
    /// parent (`parent_linkage`).
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub log_length: u32,
    pub log_offset: u64,
    /// Where it was read.
    pub at: u64,
}

/// Header bytes whose checksum, signature and version hold, or why not.
fn parse_header(bytes: &[u8; HEADER_BYTES], at: u64) -> Option<Header> {
    if &bytes[..4] != b"head" || le_u32(bytes, 4) != checksum_with_hole(bytes, 4) {
        return None;
    }
    // qemu takes only version 1 headers; no other version exists.
    if le_u16(bytes, 66) != 1 {
        return None;
    }
    Some(Header {
        sequence: le_u64(bytes, 8),
        data_write_guid: Guid(bytes[32..48].try_into().expect("16 bytes")),
        log_guid: Guid(bytes[48..64].try_into().expect("16 bytes")),
        log_version: le_u16(bytes, 64),
        log_length: le_u32(bytes, 68),
        log_offset: le_u64(bytes, 72),
        at,
    })
}

/// Reads both headers and returns the current one: the valid one, or of two valid ones the one
/// with the higher sequence number. Equal sequence numbers are accepted only when the two
/// headers are identical, as Microsoft's Disk2VHD writes them (qemu's rule, block/vhdx.c
/// `vhdx_parse_header`); header 1 is used then.
pub(super) fn current_header(file: &File) -> Result<Header> {
    let mut first = [0u8; HEADER_BYTES];
    read_exact_at(file, &mut first, HEADER_1_AT, "VHDX header 1")?;
    let mut second = [0u8; HEADER_BYTES];
    read_exact_at(file, &mut second, HEADER_2_AT, "VHDX header 2")?;
    let current = match (
        parse_header(&first, HEADER_1_AT),
        parse_header(&second, HEADER_2_AT),
    ) {
        (Some(one), None) => one,
        (None, Some(two)) => two,
        (None, None) => {
            return Err(Error::corrupt(
                "neither VHDX header (at 64 KiB and 128 KiB) has a valid signature, CRC-32C \
                 checksum and version: the image is damaged",
                Some(HEADER_1_AT),
            ))
        }
        (Some(one), Some(two)) => {
            if one.sequence > two.sequence {
                one
            } else if two.sequence > one.sequence {
                two
            } else if first[..HEADER_FIELDS] == second[..HEADER_FIELDS] {
                one
            } else {
                return Err(Error::corrupt(
                    format!(
                        "the two VHDX headers have the same sequence number ({}) but different \
                         contents, so neither can be chosen as current: the image is damaged",
                        one.sequence
                    ),
                    Some(HEADER_1_AT),
                ));
            }
        }
    };
    // qemu refuses these whether or not the log is in use (vhdx-log.c `vhdx_parse_log`).
    if current.log_offset < MIB || current.log_offset % MIB != 0 {
        return Err(Error::corrupt(
            format!(
                "the VHDX header at offset {} puts the log at offset {}, which is not a \
                 multiple of 1 MiB past the header section: the image is damaged",
                current.at, current.log_offset
            ),
            Some(current.at),
        ));
    }
    if current.log_version != 0 {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the VHDX header at offset {} has log version {}; only version 0 exists: \
                 convert the image with the tool that made it",
                current.at, current.log_version
            ),
        });
    }
    Ok(current)
}

/// Where the BAT and the metadata region are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Regions {
    pub bat: Range<u64>,
    pub metadata: Range<u64>,
}

/// Reads and checks the region table. `taken` are the file ranges already in use (header
/// section, log); regions must not overlap them or each other.
pub(super) fn regions(
    sectors: Sectors<'_>,
    file_size: u64,
    taken: &mut Vec<Range<u64>>,
) -> Result<Regions> {
    let mut table = vec![0u8; REGION_TABLE_BYTES];
    sectors.read(&mut table, REGION_TABLE_AT, "the VHDX region table")?;
    let corrupt =
        |what: String| Error::corrupt(format!("VHDX region table: {what}"), Some(REGION_TABLE_AT));
    if &table[..4] != b"regi" {
        return Err(corrupt(
            "no \"regi\" signature at 192 KiB: the image is damaged".into(),
        ));
    }
    let stored = le_u32(&table, 4);
    let computed = checksum_with_hole(&table, 4);
    if stored != computed {
        return Err(corrupt(format!(
            "bad CRC-32C checksum (stored {stored:#010x}, computed {computed:#010x}): the image \
             is damaged"
        )));
    }
    let count = le_u32(&table, 8);
    if count > MAX_REGION_ENTRIES {
        return Err(corrupt(format!(
            "{count} entries, more than the {MAX_REGION_ENTRIES} the specification allows"
        )));
    }
    let (mut bat, mut metadata) = (None, None);
    for index in 0..count as usize {
        let entry = &table[16 + 32 * index..48 + 32 * index];
        let guid = Guid(entry[..16].try_into().expect("16 bytes"));
        let offset = le_u64(entry, 16);
        let length = u64::from(le_u32(entry, 24));
        let flags = le_u32(entry, 28);
        let range = offset
            .checked_add(length)
            .filter(|&end| end <= file_size)
            .map(|end| offset..end)
            .ok_or_else(|| {
                corrupt(format!(
                    "entry {index} ({length} bytes at offset {offset}) reaches past the end of \
                     the {file_size}-byte file: the image is truncated or damaged"
                ))
            })?;
        if offset % MIB != 0 || length == 0 || length % MIB != 0 {
            return Err(corrupt(format!(
                "entry {index} ({length} bytes at offset {offset}) is not a whole number of MiB \
                 at a MiB boundary"
            )));
        }
        if let Some(other) = taken
            .iter()
            .find(|t| t.start < range.end && range.start < t.end)
        {
            return Err(corrupt(format!(
                "entry {index} (bytes {}..{}) overlaps bytes {}..{} used by another structure",
                range.start, range.end, other.start, other.end
            )));
        }
        taken.push(range.clone());
        let slot = if guid == BAT_REGION {
            &mut bat
        } else if guid == METADATA_REGION {
            &mut metadata
        } else if flags & REGION_REQUIRED != 0 {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "the VHDX region table lists a required region {guid} that this reader \
                     does not know (a newer VHDX version?): convert the image with Hyper-V \
                     (`Convert-VHD`) or qemu-img to a format imgcrypt reads"
                ),
            });
        } else {
            continue;
        };
        if slot.replace(range).is_some() {
            return Err(corrupt(format!("entry {index} repeats the {guid} region")));
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        _ => Err(corrupt(
            "the BAT or the metadata region is missing; both are required".into(),
        )),
    }
}

/// What the log holds.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LogState {
    /// No log GUID, or no entry that belongs to it: the file's structures are current.
    Clean,
    /// A valid entry for the header's log GUID at this offset: metadata updates not yet
    /// written in place.
    NeedsReplay { entry_at: u64 },
}

/// Where `header`'s log lies in a file of `file_size` bytes: `None` when the header gives none
/// (a zero log GUID or length, as qemu reads it). Refused, as corrupt, when its length is not a
/// multiple of 1 MiB or more than [`MAX_LOG_BYTES`], or when it reaches past the end of the
/// file.
pub(super) fn log_range(file_size: u64, header: &Header) -> Result<Option<Range<u64>>> {
    if header.log_guid.is_zero() || header.log_length == 0 {
        return Ok(None);
    }
    let length = u64::from(header.log_length);
    let corrupt = |what: String| Error::corrupt(format!("VHDX log: {what}"), Some(header.at));
    if length % MIB != 0 || length > MAX_LOG_BYTES {
        return Err(corrupt(format!(
            "the header at offset {} gives a {length}-byte log; it must be a multiple of 1 MiB \
             and this reader checks logs up to {MAX_LOG_BYTES} bytes",
            header.at
        )));
    }
    let log = header.log_offset..header.log_offset.saturating_add(length);
    if log.end > file_size {
        return Err(corrupt(format!(
            "the log (bytes {}..{}) reaches past the end of the {file_size}-byte file: the \
             image is truncated",
            log.start, log.end
        )));
    }
    Ok(Some(log))
}

/// Looks for a log entry that a writer would replay, the way qemu's `vhdx_log_search` decides a
/// log is non-empty: an entry header (`loge`) at a 4 KiB boundary of the log whose GUID is the
/// current header's log GUID, whose sizes are sane, and whose CRC-32C over the whole entry
/// (wrapping around the circular log) holds. The log is never replayed here: the source is
/// opened read-only and never written.
pub(super) fn log_state(file: &File, file_size: u64, header: &Header) -> Result<LogState> {
    let Some(log) = log_range(file_size, header)? else {
        return Ok(LogState::Clean);
    };
    let length = log.end - log.start;
    let mut hashed = 0u64;
    let mut sector = [0u8; LOG_SECTOR as usize];
    for position in (0..length).step_by(LOG_SECTOR as usize) {
        let at = log.start + position;
        read_exact_at(file, &mut sector, at, "a VHDX log sector")?;
        if &sector[..4] != b"loge" || sector[32..48] != header.log_guid.0 {
            continue;
        }
        let entry_length = u64::from(le_u32(&sector, 8));
        let sequence = le_u64(&sector, 16);
        let descriptors = u64::from(le_u32(&sector, 24));
        if entry_length == 0
            || entry_length > length
            || entry_length % LOG_SECTOR != 0
            || sequence == 0
            || descriptors * 32 > entry_length
        {
            continue;
        }
        hashed += entry_length;
        if hashed > MAX_LOG_BYTES_HASHED {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "the VHDX log at offset {} holds too many candidate entries to check; \
                     replay it first (`qemu-img check -r all SOURCE`, or open the disk once in \
                     Hyper-V), which writes its updates into the image, then pass it again",
                    log.start
                ),
            });
        }
        let mut crc = Crc32c::new();
        let stored = le_u32(&sector, 4);
        let mut first = sector;
        first[4..8].fill(0);
        crc.update(&first);
        let mut offset = position;
        let mut buffer = [0u8; LOG_SECTOR as usize];
        for _ in 1..entry_length / LOG_SECTOR {
            offset = (offset + LOG_SECTOR) % length;
            read_exact_at(file, &mut buffer, log.start + offset, "a VHDX log sector")?;
            crc.update(&buffer);
        }
        if crc.finish() == stored {
            return Ok(LogState::NeedsReplay { entry_at: at });
        }
    }
    Ok(LogState::Clean)
}
