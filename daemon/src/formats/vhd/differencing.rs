//! Differencing VHDs (disk type 4): a dynamic disk whose sectors not written since it was made
//! are its parent's.
//!
//! # Finding the parent
//!
//! The dynamic header records the parent three ways: its unique id (bytes 40..56), a time
//! stamp (56..60), its UTF-16BE file name (64..576), and up to eight parent locators (576..768,
//! 24 bytes each: platform code, data space, data length, reserved, data offset) whose data
//! lies elsewhere in the file. The locators read here are `W2ru` (a path relative to the
//! child, Windows form, UTF-16LE), `W2ku` (an absolute Windows path, UTF-16LE; blktap writes
//! its relative path there too) and `MacX` (a `file://` URL, UTF-8). The deprecated `Wi2r` and
//! `Wi2k` (codepage text) and `Mac ` (a binary Mac OS alias record) cannot be turned into a
//! name and are skipped.
//!
//! Each becomes a POSIX-form candidate name (backslashes turned into slashes) for the client
//! to resolve relative to the child's directory, as qemu and blktap's `vhd_find_parent` do, in
//! this order: relative names (`W2ru` first), absolute POSIX names (from `MacX`), the header's
//! parent name, and last, the base name of each absolute Windows path (`C:\images\base.vhd` →
//! `base.vhd`: a disk moved off Windows usually keeps its parent beside it). The daemon asks
//! for the first the client passed ([`SourceFiles::companion`]).
//!
//! # Checking the parent
//!
//! The parent must be a VHD whose footer's unique id is the id the child records; anything
//! else is the wrong file (a parent replaced or re-created since), refused. The time stamp is
//! not enforced: the specification calls it the parent's modification time, blktap
//! (`vhd_initialize_header`, `vhd_change_parent`) stores the parent *file's* mtime there and
//! `vhd-util check` compares only the ids, and Virtual Server offers to rewrite a mismatch
//! (`vmStartupOption_FixParentTimestampMismatch`). A parent whose footer time stamp and file
//! mtime both differ from it is read, with a note naming the values. A parent smaller than the
//! child (a differencing disk expanded after it was made) reads as zeros past its end, as
//! Hyper-V and tapdisk show it; a larger one is refused.
//!
//! # Which sectors are the child's
//!
//! In an allocated block, a set bit of the block's sector bitmap (most significant bit first)
//! means the sector is the child's; a clear bit, and every sector of an unallocated block, is
//! the parent's. The bitmaps are read once at open, so [`super::dynamic::DynamicVhd`]'s map
//! does no I/O: a block whose bits are all set or all clear costs four bytes, and the bitmaps
//! of partly written blocks are kept, at most [`MAX_PARTIAL_BITMAP_BYTES`] of them (64 MiB:
//! 256 GiB of partly written 2 MiB blocks), checked before each is stored; a disk beyond that
//! is refused with the merge to run instead.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use imgcrypt_proto::api::SourceFormat;

use super::batmap::{self, test_bit};
use super::dynamic::{DynamicVhd, HEADER_SIZE, UNALLOCATED};
use super::footer::{be_u32, be_u64, Footer};
use super::{detect, Detected};
use crate::formats::files::{FileKey, Relation, SourceFiles};
use crate::formats::layout::heap_bytes;
use crate::formats::layout::Layout;
use crate::formats::{open_layer, read_exact_at, SourceImage};
use crate::sys::storage;
use crate::{Error, Result};

/// Most bytes of partly-set sector bitmaps kept for one disk.
pub const MAX_PARTIAL_BITMAP_BYTES: u64 = 64 << 20;

/// Most bytes of one parent locator's data read: 4096 UTF-16 code units, beyond the longest
/// name a client may pass (4096 bytes).
pub const MAX_LOCATOR_BYTES: u64 = 8192;

/// Longest candidate name handed to the client (what [`SourceFiles`] accepts).
const MAX_NAME_BYTES: usize = 4096;

const PARENT_UUID_AT: usize = 40;
const PARENT_TIMESTAMP_AT: usize = 56;
const PARENT_NAME_AT: usize = 64;
const PARENT_NAME_BYTES: usize = 512;
const LOCATORS_AT: usize = 576;
const LOCATOR_ENTRY_BYTES: usize = 24;
const LOCATOR_COUNT: usize = 8;

/// Platform codes of the locators read.
const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");

/// Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00 UTC.
const VHD_EPOCH_UNIX: i64 = 946_684_800;

/// A block's presence value in [`Presence::kinds`] when every sector is the child's.
const ALL_CHILD: u32 = u32::MAX;
/// … when every sector is the parent's (and for unallocated blocks).
const ALL_PARENT: u32 = u32::MAX - 1;

/// Which sectors of each block are the child's.
#[derive(Debug)]
pub struct Presence {
    /// Per BAT entry: [`ALL_CHILD`], [`ALL_PARENT`], or the index of its bitmap in `partial`.
    kinds: Vec<u32>,
    /// The bitmaps of partly written blocks, `bitmap_bytes` each.
    partial: Vec<u8>,
    bitmap_bytes: usize,
}

impl Presence {
    /// Heap bytes of the per-block kinds and the partial bitmaps.
    pub(super) fn heap_bytes(&self) -> u64 {
        heap_bytes(&self.kinds) + heap_bytes(&self.partial)
    }

    /// Whether block `index` holds any sector of the child's.
    pub(super) fn any_present(&self, index: u64) -> bool {
        self.kinds
            .get(index as usize)
            .is_some_and(|&kind| kind != ALL_PARENT)
    }

    /// For `len` bytes from `within` of allocated block `index` (inside the block): how many
    /// from `within` are all the child's or all the parent's, and whether they are the child's.
    pub(super) fn run(&self, index: u64, within: u64, len: u64) -> (u64, bool) {
        let kind = self
            .kinds
            .get(index as usize)
            .copied()
            .unwrap_or(ALL_PARENT);
        let bits = match kind {
            ALL_CHILD => return (len, true),
            ALL_PARENT => return (len, false),
            slot => {
                let start = slot as usize * self.bitmap_bytes;
                &self.partial[start..start + self.bitmap_bytes]
            }
        };
        let end = within + len;
        let first = within / 512;
        let own = test_bit(bits, first);
        let last = (end - 1) / 512;
        let mut sector = first + 1;
        while sector <= last && test_bit(bits, sector) == own {
            sector += 1;
        }
        ((sector * 512).min(end) - within, own)
    }
}

/// Reads the sector bitmap of every allocated block of `image` (a differencing disk in
/// `file`), within [`MAX_PARTIAL_BITMAP_BYTES`].
pub(super) fn read_presence(file: &File, image: &DynamicVhd) -> Result<Presence> {
    let sectors = image.block_size() / 512;
    // At most 2^32 / 512 / 8 = 1 MiB: the block size is a u32.
    let bitmap_bytes = sectors.div_ceil(8) as usize;
    let mut bitmap = vec![0u8; bitmap_bytes];
    let mut kinds = Vec::with_capacity(image.bat().len());
    let mut partial = Vec::new();
    for (index, &entry) in (0u64..).zip(image.bat()) {
        if entry == UNALLOCATED {
            kinds.push(ALL_PARENT);
            continue;
        }
        let at = u64::from(entry) * 512;
        read_exact_at(
            file,
            &mut bitmap,
            at,
            "a differencing VHD block's sector bitmap",
        )?;
        // Whole bytes compared as bytes; the bits of a last partial byte (blocks under 4 KiB
        // only) one by one, so a block costs its bitmap's length, not its sector count.
        let whole_bytes = (sectors / 8) as usize;
        let all = |byte: u8, bit: bool| {
            bitmap[..whole_bytes].iter().all(|&b| b == byte)
                && (whole_bytes as u64 * 8..sectors).all(|sector| test_bit(&bitmap, sector) == bit)
        };
        let kind = if all(0xff, true) {
            ALL_CHILD
        } else if all(0, false) {
            ALL_PARENT
        } else {
            let slot = partial.len() / bitmap_bytes;
            if (partial.len() + bitmap_bytes) as u64 > MAX_PARTIAL_BITMAP_BYTES {
                return Err(Error::UnsupportedImage {
                    message: format!(
                        "differencing VHD: block {index} is the {}th partly written block; \
                         the sector bitmaps of more than {} MiB of them are not held: merge \
                         the disk into its parent first (`vhd-util coalesce -n CHILD`, or \
                         Hyper-V `Merge-VHD`) and encrypt the merged disk",
                        slot + 1,
                        MAX_PARTIAL_BITMAP_BYTES >> 20
                    ),
                });
            }
            partial.extend_from_slice(&bitmap);
            slot as u32
        };
        kinds.push(kind);
    }
    partial.shrink_to_fit();
    Ok(Presence {
        kinds,
        partial,
        bitmap_bytes,
    })
}

/// The parent, opened.
pub(super) struct Parent {
    /// The layer (and the layers below it).
    pub image: Box<dyn SourceImage>,
    /// The name the child records for it (the candidate the client passed).
    pub name: String,
}

/// Finds, checks and opens the parent of `image`, the differencing disk `key` (open as `file`,
/// its footer `footer`, data before `data_end`) below `above`.
pub(super) fn open_parent(
    files: &SourceFiles,
    key: FileKey,
    above: &[FileKey],
    file: &File,
    footer: &Footer,
    image: &mut DynamicVhd,
    data_end: u64,
) -> Result<Parent> {
    let header = image.header();
    let header_offset = footer.data_offset;
    let mut parent_uuid = [0u8; 16];
    parent_uuid.copy_from_slice(&header[PARENT_UUID_AT..PARENT_UUID_AT + 16]);
    let parent_timestamp = be_u32(header, PARENT_TIMESTAMP_AT);
    let candidates = parent_candidates(file, header, header_offset, data_end)?;
    let child = files.name(key).to_string();
    if candidates.is_empty() {
        return Err(Error::corrupt(
            format!(
                "differencing VHD `{child}`: its header at offset {header_offset} names no \
                 parent (no readable parent locator and no parent name); re-link it to its \
                 parent with `vhd-util modify -n CHILD -p PARENT`, or merge it (Hyper-V \
                 `Merge-VHD`)"
            ),
            Some(header_offset),
        ));
    }
    let parent_key = files.companion(key, Relation::Parent, &candidates)?;
    let mut chain = above.to_vec();
    chain.push(key);
    files.check_chain(parent_key, &chain)?;
    let name = files.name(parent_key).to_string();
    let parent_file = files.file(parent_key);
    let parent_size = storage::size_of(parent_file)?;
    let Detected::Vhd(found) = detect(parent_file, parent_size)? else {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the parent `{name}` of differencing VHD `{child}` is not a VHD (no VHD footer): \
                 a differencing VHD's parent is a VHD; pass the right file, or merge the disk \
                 into its parent where it was made"
            ),
        });
    };
    let found_uuid = found.footer.uuid;
    if found_uuid != parent_uuid {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the parent `{name}` of differencing VHD `{child}` has unique id {} but the \
                 child was made over unique id {}: it is not this disk's parent (replaced or \
                 re-created since). Pass the right parent; if this is it, re-link the child \
                 (`vhd-util modify -n CHILD -p PARENT`, or Hyper-V's Inspect Disk → Reconnect)",
                batmap::uuid_text(&found_uuid),
                batmap::uuid_text(&parent_uuid)
            ),
        });
    }
    let mtime = parent_file
        .metadata()
        .map_err(|error| Error::io(format!("fstat the parent `{name}`"), error))?
        .mtime();
    let mtime_vhd = mtime - VHD_EPOCH_UNIX;
    if parent_timestamp != found.footer.timestamp && i64::from(parent_timestamp) != mtime_vhd {
        image.add_note(format!(
            "differencing VHD `{child}` records parent time stamp {parent_timestamp} (seconds \
             since 2000-01-01 UTC) but its parent `{name}` has footer time stamp {} and was \
             last modified at {mtime_vhd}; its unique id matches, so it was read as the parent \
             (blktap records the parent file's mtime there, which a copy changes). If the \
             parent was written to since the child was made, the disk is not what it was",
            found.footer.timestamp
        ));
    }
    let parent = open_layer(files, parent_key, &chain)?;
    let vhd = matches!(
        parent.format(),
        SourceFormat::VhdFixed | SourceFormat::VhdDynamic | SourceFormat::VhdDifferencing
    );
    if !vhd {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the parent `{name}` of differencing VHD `{child}` reads as {}, not as a VHD; \
                 pass the right parent",
                parent.format().display_name()
            ),
        });
    }
    if parent.virtual_size() > image.virtual_size() {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the parent `{name}` of differencing VHD `{child}` is a {}-byte disk, larger \
                 than the child's {} bytes; no tool makes such a chain: pass the right parent, \
                 or merge the chain where it was made",
                parent.virtual_size(),
                image.virtual_size()
            ),
        });
    }
    Ok(Parent {
        image: parent,
        name,
    })
}

/// How a recorded name is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// Relative, from a `W2ru` locator.
    RelativeW2ru,
    /// Relative, from another locator.
    Relative,
    /// An absolute POSIX path.
    Absolute,
    /// The header's parent name.
    HeaderName,
    /// The base name of an absolute Windows path, looked for beside the child.
    BaseName,
}

/// The candidate names for the parent, in the order to try them (module documentation).
pub(super) fn parent_candidates(
    file: &File,
    header: &[u8; HEADER_SIZE],
    header_offset: u64,
    data_end: u64,
) -> Result<Vec<String>> {
    let mut ranked: Vec<(Rank, String)> = Vec::new();
    for index in 0..LOCATOR_COUNT {
        let entry = LOCATORS_AT + index * LOCATOR_ENTRY_BYTES;
        let code = be_u32(header, entry);
        if !matches!(code, PLATFORM_W2RU | PLATFORM_W2KU | PLATFORM_MACX) {
            continue;
        }
        let length = u64::from(be_u32(header, entry + 8));
        let offset = be_u64(header, entry + 16);
        let entry_at = header_offset + entry as u64;
        let corrupt = |what: String| {
            Error::corrupt(
                format!(
                    "differencing VHD header at offset {header_offset}: parent locator {index} \
                     ({}) {what}; re-link the disk to its parent with `vhd-util modify -n \
                     CHILD -p PARENT`",
                    String::from_utf8_lossy(&code.to_be_bytes())
                ),
                Some(entry_at),
            )
        };
        if length == 0 {
            continue;
        }
        if length > MAX_LOCATOR_BYTES {
            return Err(corrupt(format!(
                "claims {length} bytes of data, more than the {MAX_LOCATOR_BYTES} a path takes"
            )));
        }
        let inside = offset
            .checked_add(length)
            .is_some_and(|end| end <= data_end);
        if !inside {
            return Err(corrupt(format!(
                "places its {length} bytes at offset {offset}, outside the file's {data_end} \
                 bytes of data"
            )));
        }
        // `length` ≤ MAX_LOCATOR_BYTES.
        let mut data = vec![0u8; length as usize];
        read_exact_at(file, &mut data, offset, "a VHD parent locator")?;
        let text = if code == PLATFORM_MACX {
            let utf8 = data.split(|&b| b == 0).next().unwrap_or(&[]);
            let text = std::str::from_utf8(utf8).map_err(|_| corrupt("is not UTF-8".into()))?;
            from_file_url(text).ok_or_else(|| corrupt("is not a file URL".into()))?
        } else {
            utf16(&data, u16::from_le_bytes)
                .ok_or_else(|| corrupt("is not UTF-16LE text".into()))?
        };
        if text.is_empty() {
            continue;
        }
        for (rank, name) in posix_forms(&text) {
            let rank = match (rank, code) {
                (Rank::Relative, PLATFORM_W2RU) => Rank::RelativeW2ru,
                (rank, _) => rank,
            };
            ranked.push((rank, name));
        }
    }
    let name_field = &header[PARENT_NAME_AT..PARENT_NAME_AT + PARENT_NAME_BYTES];
    match utf16(name_field, u16::from_be_bytes) {
        Some(name) if !name.is_empty() => {
            for (rank, name) in posix_forms(&name) {
                let rank = if rank == Rank::BaseName {
                    Rank::BaseName
                } else {
                    Rank::HeaderName
                };
                ranked.push((rank, name));
            }
        }
        Some(_) => {}
        None => tracing::warn!(header_offset, "VHD parent name is not UTF-16BE; ignored"),
    }
    ranked.sort_by_key(|(rank, _)| *rank);
    let mut candidates: Vec<String> = Vec::new();
    for (_, name) in ranked {
        if name.len() <= MAX_NAME_BYTES && !candidates.contains(&name) {
            candidates.push(name);
        }
    }
    Ok(candidates)
}

/// UTF-16 text up to its first NUL, or None when it is not UTF-16 (odd length, unpaired
/// surrogates).
fn utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> Option<String> {
    if bytes.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|pair| unit([pair[0], pair[1]]))
        .take_while(|&unit| unit != 0)
        .collect();
    String::from_utf16(&units).ok()
}

/// The path of a `file://` URL (`file:///abs`, `file://localhost/abs`, blktap's
/// `file://./rel`), percent-decoded; text without the scheme is taken as a path.
fn from_file_url(text: &str) -> Option<String> {
    let path = match text.strip_prefix("file://") {
        Some(rest) => rest.strip_prefix("localhost").unwrap_or(rest),
        None => text,
    };
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            decoded.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// The POSIX forms of a recorded path and how each ranks: a relative path as is (`\` → `/`);
/// an absolute POSIX path as is; an absolute Windows path (drive letter, UNC, or rooted) only
/// by its base name.
fn posix_forms(recorded: &str) -> Vec<(Rank, String)> {
    let windows = recorded.contains('\\');
    let path = recorded.replace('\\', "/");
    let drive =
        path.len() >= 2 && path.as_bytes()[0].is_ascii_alphabetic() && path.as_bytes()[1] == b':';
    let base = |path: &str| {
        let name = path.rsplit('/').next().unwrap_or("");
        let name = if drive && !path.contains('/') {
            &name[2..]
        } else {
            name
        };
        (!name.is_empty() && name != "." && name != "..")
            .then(|| (Rank::BaseName, name.to_string()))
    };
    if drive || path.starts_with("//") || (path.starts_with('/') && windows) {
        return base(&path).into_iter().collect();
    }
    if path.starts_with('/') {
        return [Some((Rank::Absolute, path.clone())), base(&path)]
            .into_iter()
            .flatten()
            .collect();
    }
    vec![(Rank::Relative, path)]
}

#[cfg(test)]
#[path = "differencing_tests.rs"]
mod tests;
