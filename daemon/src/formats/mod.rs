//! Source image readers, one module per format, chosen by content and never by file name.
//!
//! Every format answers the same three questions through [`SourceImage`]: how big is the disk
//! the guest sees, what bytes are at an offset (holes read as zeros), and which ranges hold data.
//!
//! Detection ([`open`]) first applies the VHD rule, written out in [`vhd`]'s module
//! documentation, to the last 512 bytes and the first 512 bytes. In short: a `conectix` footer
//! at the end (or, for a dynamic disk, its copy at the start) makes the file a VHD; a
//! footer-like structure that fails its checksum is a corrupt VHD, never a raw disk, because
//! reading it as raw would hand the guest the VHD's metadata as disk content. A file that is not
//! a VHD and starts with the VHDX file identifier `vhdxfile` is a VHDX ([`vhdx`]), read or
//! refused as such, never as raw. Anything else is then checked for every other container
//! signature qemu-img knows, LUKS, and common compressors and archives ([`foreign`]). A qcow2
//! (version 2 or 3) is read by [`qcow2`]; any other match is refused with
//! [`Error::UnsupportedFormat`], naming the format and how to convert it. RAW is what remains.
//!
//! Every reader keeps its metadata memory bounded whatever the input says (the bound is stated
//! in its module documentation): tables are sized by what the virtual size needs, checked
//! against a fixed limit before anything is allocated.
//!
//! [`scan`] reads a source's allocated ranges for the granules (clusters, blocks) that hold a
//! non-zero byte: what the sparse output containers store.

pub mod codec;
pub mod encrypted;
pub mod files;
pub mod foreign;
pub mod layout;
pub mod qcow2;
pub mod raw;
pub mod scan;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use imgcrypt_proto::api::SourceFormat;
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::error::Descriptor;
use crate::sys::storage::{self, StorageKind};
use crate::{Error, Result};
use files::{FileKey, SourceFiles};

/// A disk image opened read-only through a descriptor the client passed.
///
/// Implementations read with positioned I/O only (`pread`), so one image can serve several copy
/// workers at once and the descriptor's shared file offset is never touched.
pub trait SourceImage: Send + Sync + std::fmt::Debug {
    /// The format detected.
    fn format(&self) -> SourceFormat;

    /// Size of the disk the guest sees, in bytes.
    fn virtual_size(&self) -> u64;

    /// Fills `buffer` with the guest's bytes starting at `offset`; unallocated areas read as
    /// zeros. `offset + buffer.len()` must not exceed [`Self::virtual_size`].
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()>;

    /// Guest ranges that may hold non-zero data, sorted and disjoint. Everything outside them
    /// reads as zeros, so a copier may skip reading it.
    fn allocated_ranges(&self) -> &[Range<u64>];

    /// What the user should know about the reads so far (how a reader worked around a quirk of
    /// the image), for a job to pass on as notices once it has read the image. None by default.
    fn read_notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// The format's allocation unit (a dynamic VHD's block, a qcow2's cluster), if it has one:
    /// what `inspect` reports of a source. None by default.
    fn allocation_unit(&self) -> Option<u64> {
        None
    }

    /// The layer below this one (a backing file, a parent disk) and the name this layer
    /// records for it; None for a disk that stands alone.
    fn backing(&self) -> Option<(&str, &dyn SourceImage)> {
        None
    }
}

/// Detects the format of `file` from its content and opens it, as a source with no companion
/// files (one that references another file gets [`Error::NeedFile`]).
///
/// `file` must be a regular file or a block device open for reading.
pub fn open(file: File) -> Result<Box<dyn SourceImage>> {
    open_files(&SourceFiles::single(file)?)
}

/// Opens the source of `files` and every layer below it.
pub fn open_files(files: &SourceFiles) -> Result<Box<dyn SourceImage>> {
    open_layer(files, FileKey::SOURCE, &[])
}

/// Detects the format of the file `key` of `files` by its content and opens it as the layer
/// below `above` (the layers over it, the top first; empty for the source itself). Format
/// modules call this for their backing files and parents, after which the chain is checked
/// ([`SourceFiles::check_chain`]: depth and cycles).
pub fn open_layer(
    files: &SourceFiles,
    key: FileKey,
    above: &[FileKey],
) -> Result<Box<dyn SourceImage>> {
    files.check_chain(key, above)?;
    // A descriptor of its own per layer: the reader owns it.
    let file = files
        .file(key)
        .try_clone()
        .map_err(|error| Error::io("duplicate a source descriptor", error))?;
    let kind = storage::storage_kind(&file)?;
    if let StorageKind::Other(what) = kind {
        return Err(Error::bad_descriptor(
            Descriptor::Source,
            format!("it is {what}; pass a regular file or a block device opened for reading"),
        ));
    }
    let file_size = storage::size_of(&file)?;
    match vhd::detect(&file, file_size)? {
        vhd::Detected::Raw => {
            if vhdx::detect(&file, file_size)? {
                return vhdx::open(files, key, above);
            }
            if let Some(found) = foreign::detect(&file, file_size)? {
                if found == foreign::Foreign::Qcow2 {
                    return qcow2::open_layer(files, key, above);
                }
                if matches!(found, foreign::Foreign::Vmdk(_) | foreign::Foreign::Tar) {
                    return vmdk::open(files, key, above, found, file, file_size);
                }
                tracing::info!(format = found.name(), "source refused: a format not read");
                return Err(found.refusal());
            }
            let image = raw::open(file, kind, file_size)?;
            files.charge_metadata(key, image.own_metadata_bytes())?;
            Ok(Box::new(image))
        }
        vhd::Detected::Vhd(found) => vhd::open(files, key, above, file, kind, found),
    }
}

/// Refuses a request that reaches past the end of the virtual disk (a caller's bug, reported
/// as an error rather than a panic).
fn check_request(virtual_size: u64, offset: u64, len: usize) -> Result<()> {
    let fits = (len as u64)
        .checked_add(offset)
        .is_some_and(|end| end <= virtual_size);
    if fits {
        Ok(())
    } else {
        Err(Error::io(
            format!("read {len} bytes at guest offset {offset}"),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("past the end of the {virtual_size}-byte virtual disk"),
            ),
        ))
    }
}

/// Fills `buffer` from `file` at `offset` with `pread`, retrying short reads and `EINTR` (std's
/// `read_exact_at` does both). Reaching the end of the file early means the image is shorter
/// than its own structures say: a corrupt (truncated) image, reported at `offset`.
fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64, what: &str) -> Result<()> {
    file.read_exact_at(buffer, offset)
        .map_err(|e| read_error(e, buffer.len(), offset, what))
}

/// The error of a failed read of `len` bytes of `what` at `offset`: a truncation (the image is
/// shorter than its structures say) or the I/O error.
fn read_error(e: io::Error, len: usize, offset: u64, what: &str) -> Error {
    {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::corrupt(
                format!(
                    "truncated: the file ends inside the {} bytes of {what} at offset {offset}; \
                     the image was cut short (an interrupted copy or download?): obtain a \
                     complete copy",
                    len
                ),
                Some(offset),
            )
        } else {
            Error::io(format!("read {len} bytes of {what} at offset {offset}"), e)
        }
    }
}

/// The little-endian integers of on-disk structures (VHDX, VMDK) at byte `at` of `bytes`,
/// which the caller has checked is long enough.
fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}

/// See [`le_u16`].
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// See [`le_u16`].
fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Two data ranges no further apart than this are reported as one, which bounds the list's length by the
/// image size (one entry per MiB at worst) whatever the file's fragmentation. Reading a gap of
/// zeros costs far less than the bookkeeping of millions of tiny ranges.
const RANGE_MERGE_GAP: u64 = 1 << 20;

/// The parts of `file` in `0..end` that hold data, from `SEEK_DATA`/`SEEK_HOLE`.
///
/// Block devices, and file systems that do not answer `SEEK_DATA`, report everything as data.
///
/// `lseek` moves the descriptor's shared file offset (shared with the client that passed it, too).
/// That is acceptable: every read in this module is positioned (`pread`), and nothing relies on
/// the offset.
fn data_ranges(file: &File, kind: StorageKind, end: u64) -> Result<Vec<Range<u64>>> {
    let everything = || {
        let whole: Range<u64> = 0..end;
        if whole.is_empty() {
            Vec::new()
        } else {
            vec![whole]
        }
    };
    if kind != StorageKind::RegularFile {
        return Ok(everything());
    }
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut position = 0u64;
    while position < end {
        let Ok(seek_from) = i64::try_from(position) else {
            return Ok(everything());
        };
        let data_start = match lseek(file, seek_from, Whence::SeekData) {
            Ok(found) => found as u64,
            // No data at or after `position`.
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(everything()),
            Err(errno) => {
                return Err(Error::io(
                    format!("lseek(SEEK_DATA) at offset {position} of the source"),
                    errno,
                ))
            }
        };
        if data_start >= end {
            break;
        }
        let hole_start = match lseek(file, data_start as i64, Whence::SeekHole) {
            Ok(found) => found as u64,
            // The file shrank between the two calls; what is left of it is data.
            Err(Errno::ENXIO) => end,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(everything()),
            Err(errno) => {
                return Err(Error::io(
                    format!("lseek(SEEK_HOLE) at offset {data_start} of the source"),
                    errno,
                ))
            }
        };
        // A hole at or before the data start cannot happen on a sane file system; treating the
        // rest as data keeps the loop finite whatever the kernel answers.
        let data_end = if hole_start <= data_start {
            end
        } else {
            hole_start.min(end)
        };
        push_merged(&mut ranges, data_start..data_end, RANGE_MERGE_GAP);
        position = data_end;
    }
    Ok(ranges)
}

/// Appends `range` to sorted, disjoint `ranges`, joining it to the last one when they touch or
/// the gap between them is under `join_gap`. `range` must not start before the last one ends.
fn push_merged(ranges: &mut Vec<Range<u64>>, range: Range<u64>, join_gap: u64) {
    if range.is_empty() {
        return;
    }
    match ranges.last_mut() {
        Some(last) if range.start.saturating_sub(last.end) <= join_gap => {
            last.end = last.end.max(range.end)
        }
        _ => ranges.push(range),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sparse_file(size: u64, data_at: &[u64]) -> File {
        let file = tempfile::tempfile_in("/tmp").unwrap();
        file.set_len(size).unwrap();
        for &offset in data_at {
            file.write_all_at(&[0x5a; 4096], offset).unwrap();
        }
        file
    }

    #[test]
    fn data_ranges_find_the_written_extents_and_skip_the_holes() {
        let mib = 1u64 << 20;
        let file = sparse_file(64 * mib, &[0, 10 * mib, 40 * mib + 8192]);
        let ranges = data_ranges(&file, StorageKind::RegularFile, 64 * mib).unwrap();
        assert_eq!(ranges.len(), 3, "{ranges:?}");
        // ext4 allocates in 4 KiB blocks, so each written block is one extent.
        assert_eq!(ranges[0], 0..4096);
        assert_eq!(ranges[1], 10 * mib..10 * mib + 4096);
        assert_eq!(ranges[2], 40 * mib + 8192..40 * mib + 12288);
    }

    #[test]
    fn data_ranges_are_clipped_to_the_end_given() {
        let mib = 1u64 << 20;
        let file = sparse_file(8 * mib, &[0, 6 * mib]);
        let ranges = data_ranges(&file, StorageKind::RegularFile, 2048).unwrap();
        assert_eq!(ranges, vec![0..2048]);
        let none = data_ranges(&file, StorageKind::RegularFile, 0).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn data_ranges_close_together_are_merged() {
        let file = sparse_file(4 << 20, &[0, 64 * 1024, 512 * 1024]);
        let ranges = data_ranges(&file, StorageKind::RegularFile, 4 << 20).unwrap();
        assert_eq!(ranges, vec![0..512 * 1024 + 4096]);
    }

    #[test]
    fn block_devices_report_everything_as_data() {
        let file = sparse_file(1 << 20, &[]);
        let ranges = data_ranges(&file, StorageKind::BlockDevice, 1 << 20).unwrap();
        assert_eq!(ranges, vec![0..1 << 20]);
    }

    #[test]
    fn read_past_end_of_file_is_a_truncation_error() {
        let mut file = tempfile::tempfile_in("/tmp").unwrap();
        file.write_all(&[1; 1000]).unwrap();
        let mut buffer = [0u8; 100];
        let error = read_exact_at(&file, &mut buffer, 950, "block 3").unwrap_err();
        match error {
            Error::CorruptImage { message, offset } => {
                assert_eq!(offset, Some(950));
                assert!(message.contains("truncated"), "{message}");
                assert!(message.contains("block 3"), "{message}");
            }
            other => panic!("expected CorruptImage, got {other:?}"),
        }
    }

    #[test]
    fn requests_past_the_virtual_size_are_refused() {
        assert!(check_request(1000, 0, 1000).is_ok());
        assert!(check_request(1000, 1, 1000).is_err());
        assert!(check_request(1000, u64::MAX, 2).is_err());
    }

    #[test]
    fn a_fifo_is_a_bad_source_descriptor() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // O_RDWR so opening a FIFO does not wait for a writer.
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        match open(fifo).unwrap_err() {
            Error::BadDescriptor {
                descriptor,
                message,
            } => {
                assert_eq!(descriptor, Descriptor::Source);
                assert!(message.contains("FIFO"), "{message}");
            }
            other => panic!("expected BadDescriptor, got {other:?}"),
        }
    }
}
