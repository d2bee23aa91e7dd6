//! What every fuzz target shares: building source files from the fuzzer's bytes, and driving
//! the whole source path on them as the daemon does (open with companions, read what is
//! allocated).
//!
//! Inputs are **sparse file descriptions**, not flat files: a run of records
//! `[sector: u32 LE][length: u16 LE][bytes]`, each placing `bytes` at `sector * 512` of a file
//! whose holes read as zeros. Formats put structures megabytes apart (a VHDX's metadata sits at
//! 1 MiB or beyond, a VHD's footer at the very end), which a flat input of a few hundred KiB
//! never reaches; a sparse description reaches them at a few KiB, and the fuzzer mutates the
//! placement as well as the bytes. A record with sector `u32::MAX` starts the next file (a
//! backing file, parent or extent). `scripts/fuzz` encodes qemu-img images this way as seeds.

use std::fs::File;
use std::os::unix::fs::FileExt;

use imgcryptd::formats::files::{Passed, SourceFiles};
use imgcryptd::formats::{self, SourceImage};
use imgcryptd::Error;

/// Largest file a description may make (sparse, so cheap): past every structure's usual place.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// Most files one input makes: the source and up to three companions.
pub const MAX_FILES: usize = 4;

/// Bytes read per allocated range at most, so one input cannot take long.
const READ_LIMIT: u64 = 1 << 20;

/// The files `data` describes (at least one, possibly empty).
pub fn decode(data: &[u8]) -> Vec<File> {
    let mut files = Vec::new();
    let Some(mut current) = new_file() else {
        return files;
    };
    let mut rest = data;
    while rest.len() >= 6 && files.len() < MAX_FILES {
        let sector = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
        let length = u16::from_le_bytes(rest[4..6].try_into().expect("2 bytes")) as usize;
        rest = &rest[6..];
        if sector == u32::MAX {
            files.push(current);
            match new_file() {
                Some(file) => current = file,
                None => return files,
            }
            continue;
        }
        let bytes = &rest[..length.min(rest.len())];
        rest = &rest[bytes.len()..];
        let offset = u64::from(sector) * 512;
        if offset + bytes.len() as u64 <= MAX_FILE_BYTES {
            let _ = current.write_all_at(bytes, offset);
        }
    }
    if files.len() < MAX_FILES {
        files.push(current);
    }
    files
}

fn new_file() -> Option<File> {
    imgcryptd::sys::memfd::create("fuzz-source").ok()
}

/// Opens `files[0]` as a source the way a job does: when it names a file, the next of `files`
/// is passed as that companion (under the first name asked for) and the open repeated. Then
/// reads up to 16 allocated ranges in whole sectors, as the pipeline does. Any input must give
/// an image or an error: never a panic, a hang, or an unbounded allocation.
pub fn exercise(mut files: Vec<File>) {
    if files.is_empty() {
        return;
    }
    let source = files.remove(0);
    let mut passed: Vec<(String, u32)> = Vec::new();
    let image = loop {
        let Ok(source) = source.try_clone() else {
            return;
        };
        let companions = passed
            .iter()
            .zip(&files)
            .filter_map(|((name, referenced_by), file)| {
                Some(Passed {
                    file: file.try_clone().ok()?,
                    name: name.clone(),
                    referenced_by: *referenced_by,
                })
            })
            .collect();
        let Ok(all) = SourceFiles::new(source, companions) else {
            return;
        };
        match formats::open_files(&all) {
            Ok(image) => break image,
            Err(Error::NeedFile {
                referenced_by,
                candidates,
                ..
            }) if passed.len() < files.len() => {
                let Some(name) = candidates.into_iter().next() else {
                    return;
                };
                passed.push((name, referenced_by));
            }
            Err(_) => return,
        }
    };
    read_allocated(image.as_ref());
}

fn read_allocated(image: &dyn SourceImage) {
    let size = image.virtual_size();
    let mut buffer = vec![0u8; READ_LIMIT as usize];
    for range in image.allocated_ranges().iter().take(16) {
        let start = range.start.min(size) / 512 * 512;
        let end = range.end.min(size).min(start + READ_LIMIT) / 512 * 512;
        if end > start {
            let _ = image.read_at(&mut buffer[..(end - start) as usize], start);
        }
    }
}

/// Writes `magic` at `offset` of `file`, so every input of a format's target is detected as
/// that format and the fuzzer's time goes into its parser.
pub fn force_magic(file: &File, offset: u64, magic: &[u8]) {
    let _ = file.write_all_at(magic, offset);
}

/// Rewrites the checksum field at `checksum_at` of the `length`-byte structure at `offset`
/// with `checksum(structure, checksum_at)`, so a mutated structure gets past its checksum and
/// into the fields behind it.
pub fn fix_checksum(
    file: &File,
    offset: u64,
    length: usize,
    checksum_at: usize,
    little_endian: bool,
    checksum: impl Fn(&[u8], usize) -> u32,
) {
    let mut structure = vec![0u8; length];
    if file.read_exact_at(&mut structure, offset).is_err() {
        return;
    }
    let value = checksum(&structure, checksum_at);
    let bytes = if little_endian {
        value.to_le_bytes()
    } else {
        value.to_be_bytes()
    };
    let _ = file.write_all_at(&bytes, offset + checksum_at as u64);
}

/// The file's size.
pub fn size_of(file: &File) -> u64 {
    file.metadata().map(|m| m.len()).unwrap_or(0)
}
