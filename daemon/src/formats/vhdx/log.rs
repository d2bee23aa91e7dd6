//! The VHDX log (MS-VHDX 2.3), replayed in memory: metadata updates a writer logged but never
//! wrote in place (the disk was not closed cleanly) are applied to an [`Overlay`] of the file's
//! bytes, through which the region table, the metadata and the BAT are then read. Nothing is
//! ever written to the source.
//!
//! The log is a circular buffer of 4 KiB sectors holding entries. An entry is a header sector
//! (`loge`: a CRC-32C over the whole entry, its length, the tail — where the oldest entry still
//! needed starts —, a sequence number, the descriptor count, the log GUID), more descriptor
//! sectors when needed, then one data sector (`data`) per data descriptor. A data descriptor
//! (`desc`) writes one 4 KiB sector at a file offset: 8 leading bytes and 4 trailing bytes from
//! the descriptor, the 4084 between from its data sector. A zero descriptor (`zero`) writes
//! zeros over a length. Every descriptor and data sector repeats the entry's sequence number.
//!
//! The active sequence: the chain of valid entries, each the next one in the buffer with the
//! sequence number one higher, whose last entry (the head) has the highest sequence number of
//! any chain, and which starts at the head's tail; it is replayed from the tail to the head, in
//! order. qemu (block/vhdx-log.c) finds the same chain; it does not check the tail.
//!
//! Bounds: a log is read into memory only up to [`MAX_REPLAY_LOG_BYTES`] (32 MiB; qemu and
//! Hyper-V make 1 MiB logs); a longer log that needs replaying is refused with what to do. The
//! overlay holds at most the log's data sectors (its size), and the CRC-32C checks hash at most
//! [`MAX_LOG_BYTES_HASHED`] bytes whatever a hostile log claims.

use std::fs::File;
use std::ops::Range;

use super::crc32c::Crc32c;
use super::header::Header;
use super::{le_u32, le_u64, MIB};
use crate::formats::read_exact_at;
use crate::{Error, Result};

/// The longest log replayed in memory.
pub const MAX_REPLAY_LOG_BYTES: u64 = 32 * MIB;
/// Bytes the search hashes at most (each 4 KiB position can claim an entry of the whole log).
pub const MAX_LOG_BYTES_HASHED: u64 = 64 * MIB;
const SECTOR: usize = 4096;
/// Descriptors are 32 bytes; the entry header takes the first two slots of its sector.
const DESCRIPTOR_BYTES: usize = 32;
const DESCRIPTORS_PER_SECTOR: u64 = (SECTOR / DESCRIPTOR_BYTES) as u64;

/// What to tell a user whose log cannot be replayed here.
pub const REPLAY_ADVICE: &str = "replay it into a copy with `qemu-img check -r all COPY` (or open \
                                 the disk once in Hyper-V), then pass the copy";

/// One logged write, as replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    /// One 4 KiB sector at this file offset.
    Sector { at: u64, bytes: Box<[u8]> },
    /// Zeros over this file range.
    Zero(Range<u64>),
}

impl Write {
    fn range(&self) -> Range<u64> {
        match self {
            Self::Sector { at, bytes } => *at..*at + bytes.len() as u64,
            Self::Zero(range) => range.clone(),
        }
    }
}

/// The logged writes over a file, in log order (a later one wins where they overlap).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overlay {
    writes: Vec<Write>,
    /// The sequence number of the head entry replayed (0 when nothing was).
    pub head_sequence: u64,
    /// How many entries were replayed.
    pub entries: usize,
}

impl Overlay {
    /// Whether nothing was replayed.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The file ranges written, in log order.
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.writes.iter().map(Write::range)
    }

    /// Patches `buffer`, read from the file at `offset`, with the writes that cover it.
    fn apply(&self, buffer: &mut [u8], offset: u64) {
        let end = offset + buffer.len() as u64;
        for write in &self.writes {
            let range = write.range();
            let (start, stop) = (range.start.max(offset), range.end.min(end));
            if start >= stop {
                continue;
            }
            let out = &mut buffer[(start - offset) as usize..(stop - offset) as usize];
            match write {
                Write::Sector { at, bytes } => {
                    out.copy_from_slice(&bytes[(start - at) as usize..(stop - at) as usize])
                }
                Write::Zero(_) => out.fill(0),
            }
        }
    }
}

/// The file as its metadata is read: its bytes with the replayed log over them.
#[derive(Debug, Clone, Copy)]
pub struct Sectors<'a> {
    /// The image.
    pub file: &'a File,
    /// What the log changes in it.
    pub overlay: &'a Overlay,
}

impl Sectors<'_> {
    /// Reads `buffer` at `offset` like [`read_exact_at`], with the log applied.
    pub fn read(&self, buffer: &mut [u8], offset: u64, what: &str) -> Result<()> {
        read_exact_at(self.file, buffer, offset, what)?;
        self.overlay.apply(buffer, offset);
        Ok(())
    }
}

/// A descriptor of a valid entry.
#[derive(Debug, Clone, Copy)]
enum Descriptor {
    Data {
        at: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
    },
    Zero {
        at: u64,
        length: u64,
    },
}

/// A valid log entry at a position of the log.
#[derive(Debug, Clone)]
struct Entry {
    position: u64,
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    /// How many descriptors it has (they are read again when it is replayed, so that the
    /// search holds no more than one entry's header per position).
    count: u64,
    /// Position of the first data sector.
    data_at: u64,
}

/// The log buffer, read whole.
struct Log<'a> {
    bytes: &'a [u8],
    guid: [u8; 16],
}

impl Log<'_> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The 4 KiB sector at `position` (taken modulo the length: the buffer is circular).
    fn sector(&self, position: u64) -> &[u8] {
        let at = (position % self.len()) as usize;
        &self.bytes[at..at + SECTOR]
    }

    /// The entry at `position` if it is valid (MS-VHDX 2.3.1: signature, GUID, sizes,
    /// descriptors and data sectors carrying the sequence number, CRC-32C), counting the bytes
    /// hashed in `hashed`.
    fn entry(&self, position: u64, hashed: &mut u64) -> Result<Option<Entry>> {
        let head = self.sector(position);
        if &head[..4] != b"loge" || head[32..48] != self.guid {
            return Ok(None);
        }
        let length = u64::from(le_u32(head, 8));
        let tail = u64::from(le_u32(head, 12));
        let sequence = le_u64(head, 16);
        let count = u64::from(le_u32(head, 24));
        let descriptor_sectors = (count + 2).div_ceil(DESCRIPTORS_PER_SECTOR);
        if length == 0
            || length % SECTOR as u64 != 0
            || length > self.len()
            || tail % SECTOR as u64 != 0
            || tail >= self.len()
            || sequence == 0
            || descriptor_sectors * SECTOR as u64 > length
        {
            return Ok(None);
        }
        *hashed += length;
        if *hashed > MAX_LOG_BYTES_HASHED {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "the VHDX log holds too many candidate entries to check (more than \
                     {MAX_LOG_BYTES_HASHED} bytes to hash): {REPLAY_ADVICE}"
                ),
            });
        }
        let mut crc = Crc32c::new();
        for index in 0..length / SECTOR as u64 {
            let sector = self.sector(position + index * SECTOR as u64);
            if index == 0 {
                crc.update(&sector[..4]);
                crc.update(&[0; 4]);
                crc.update(&sector[8..]);
            } else {
                crc.update(sector);
            }
        }
        if crc.finish() != le_u32(head, 4) {
            return Ok(None);
        }
        let data_at = position + descriptor_sectors * SECTOR as u64;
        if !self.descriptors(position, count, sequence, length, |_| {}) {
            return Ok(None);
        }
        Ok(Some(Entry {
            position,
            length,
            tail,
            sequence,
            count,
            flushed_file_offset: le_u64(head, 48),
            data_at,
        }))
    }

    /// Calls `each` with the `count` descriptors of the entry at `position` (sequence number
    /// `sequence`, `length` bytes), in order; false as soon as one is invalid (a wrong sequence
    /// number or signature, an unaligned offset or length, a data sector missing or not
    /// carrying the sequence number, more data sectors than the entry holds).
    fn descriptors(
        &self,
        position: u64,
        count: u64,
        sequence: u64,
        length: u64,
        mut each: impl FnMut(Descriptor),
    ) -> bool {
        let descriptor_sectors = (count + 2).div_ceil(DESCRIPTORS_PER_SECTOR);
        let data_at = position + descriptor_sectors * SECTOR as u64;
        let mut data_sectors = 0u64;
        for index in 0..count {
            let slot = index + 2;
            let sector = self.sector(position + slot / DESCRIPTORS_PER_SECTOR * SECTOR as u64);
            let at = (slot % DESCRIPTORS_PER_SECTOR) as usize * DESCRIPTOR_BYTES;
            let raw = &sector[at..at + DESCRIPTOR_BYTES];
            let file_offset = le_u64(raw, 16);
            if le_u64(raw, 24) != sequence || file_offset % SECTOR as u64 != 0 {
                return false;
            }
            let descriptor = match &raw[..4] {
                b"desc" => {
                    if (descriptor_sectors + data_sectors + 1) * SECTOR as u64 > length {
                        return false;
                    }
                    let data = self.sector(data_at + data_sectors * SECTOR as u64);
                    data_sectors += 1;
                    let data_sequence =
                        u64::from(le_u32(data, 4)) << 32 | u64::from(le_u32(data, 4092));
                    if &data[..4] != b"data" || data_sequence != sequence {
                        return false;
                    }
                    Descriptor::Data {
                        at: file_offset,
                        leading: raw[8..16].try_into().expect("8 bytes"),
                        trailing: raw[4..8].try_into().expect("4 bytes"),
                    }
                }
                b"zero" => {
                    let length = le_u64(raw, 8);
                    if length % SECTOR as u64 != 0 {
                        return false;
                    }
                    Descriptor::Zero {
                        at: file_offset,
                        length,
                    }
                }
                _ => return false,
            };
            each(descriptor);
        }
        true
    }
}

/// Replays the log of `header` in memory: the writes of its active sequence, or an empty
/// overlay when the log is empty or holds no valid entry. `file_size` is the image's size.
pub fn replay(file: &File, file_size: u64, header: &Header) -> Result<Overlay> {
    let Some(log) = super::header::log_range(file_size, header)? else {
        return Ok(Overlay::default());
    };
    let length = log.end - log.start;
    let corrupt = |what: String| Error::corrupt(format!("VHDX log: {what}"), Some(header.at));
    if length > MAX_REPLAY_LOG_BYTES {
        // Too long to hold: only say whether it needs replaying.
        return match super::header::log_state(file, file_size, header)? {
            super::header::LogState::Clean => Ok(Overlay::default()),
            super::header::LogState::NeedsReplay { entry_at } => Err(Error::UnsupportedImage {
                message: format!(
                    "this VHDX has a log entry at offset {entry_at} that was never replayed \
                     (the disk was not closed cleanly), in a {length}-byte log, longer than \
                     the {MAX_REPLAY_LOG_BYTES} bytes imgcrypt replays in memory: \
                     {REPLAY_ADVICE}"
                ),
            }),
        };
    }
    // `length <= MAX_REPLAY_LOG_BYTES`, checked above.
    let mut bytes = vec![0u8; length as usize];
    read_exact_at(file, &mut bytes, log.start, "the VHDX log")?;
    let log = Log {
        bytes: &bytes,
        guid: header.log_guid.0,
    };
    let sequence = active_sequence(&log)?;
    let mut overlay = Overlay::default();
    for entry in &sequence {
        if entry.flushed_file_offset > file_size {
            return Err(corrupt(format!(
                "log entry {} says the file was at least {} bytes when it was written, but it \
                 has {file_size}: the image was truncated after; obtain a complete copy",
                entry.sequence, entry.flushed_file_offset
            )));
        }
        let mut descriptors = Vec::new();
        log.descriptors(
            entry.position,
            entry.count,
            entry.sequence,
            entry.length,
            |descriptor| descriptors.push(descriptor),
        );
        let mut data = entry.data_at;
        for descriptor in descriptors {
            let write = match descriptor {
                Descriptor::Data {
                    at,
                    leading,
                    trailing,
                } => {
                    let mut sector = log.sector(data).to_vec().into_boxed_slice();
                    data += SECTOR as u64;
                    sector[..8].copy_from_slice(&leading);
                    sector[SECTOR - 4..].copy_from_slice(&trailing);
                    if at.checked_add(SECTOR as u64).is_none() {
                        return Err(corrupt(format!("a data descriptor at offset {at}")));
                    }
                    Write::Sector { at, bytes: sector }
                }
                Descriptor::Zero { at, length } => Write::Zero(
                    at..at.checked_add(length).ok_or_else(|| {
                        corrupt(format!(
                            "a zero descriptor of {length} bytes at offset {at}"
                        ))
                    })?,
                ),
            };
            overlay.writes.push(write);
        }
        overlay.head_sequence = entry.sequence;
        overlay.entries += 1;
    }
    if !sequence.is_empty() {
        tracing::info!(
            entries = overlay.entries,
            writes = overlay.writes.len(),
            head_sequence = overlay.head_sequence,
            "replayed a VHDX log in memory"
        );
    }
    Ok(overlay)
}

/// The active sequence of `log`, tail first; empty when no entry is valid.
fn active_sequence(log: &Log<'_>) -> Result<Vec<Entry>> {
    let positions = log.len() / SECTOR as u64;
    let mut hashed = 0u64;
    // Every position is validated once; chains are then followed through this table.
    let mut valid: Vec<Option<Entry>> = Vec::with_capacity(positions as usize);
    for index in 0..positions {
        valid.push(log.entry(index * SECTOR as u64, &mut hashed)?);
    }
    let mut best: Option<(u64, Vec<usize>)> = None;
    for start in 0..valid.len() {
        let Some(first) = &valid[start] else {
            continue;
        };
        let mut chain = vec![start];
        let mut last = first;
        // A chain cannot hold more entries than the log has sectors (it would be a cycle).
        while chain.len() < valid.len() {
            let next = ((last.position + last.length) % log.len() / SECTOR as u64) as usize;
            match &valid[next] {
                Some(entry) if entry.sequence == last.sequence.wrapping_add(1) => {
                    chain.push(next);
                    last = entry;
                }
                _ => break,
            }
        }
        // The head's tail must be where this chain starts: the entries before it are no
        // longer needed and those after it are the ones to replay.
        if last.tail != first.position {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(sequence, _)| last.sequence > *sequence)
        {
            best = Some((last.sequence, chain));
        }
    }
    Ok(best
        .map(|(_, chain)| {
            chain
                .into_iter()
                .filter_map(|index| valid[index].take())
                .collect()
        })
        .unwrap_or_default())
}
