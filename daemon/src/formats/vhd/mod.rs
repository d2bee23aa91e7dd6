//! VHD (Virtual PC / Hyper-V "VHD", qemu's `vpc`) images: fixed, dynamic and differencing.
//!
//! # Detection rule
//!
//! Only content decides, looking at the last 512 bytes ("tail", at EOF−512) and the first 512
//! bytes ("head", where a dynamic disk keeps a copy of its footer). A footer is *valid* when it
//! starts with the cookie `conectix` and its checksum matches.
//!
//! | tail                        | head                                  | result                     |
//! |-----------------------------|---------------------------------------|----------------------------|
//! | valid                       | any                                   | VHD described by the tail¹ |
//! | cookie, bad checksum        | valid, type not fixed                 | dynamic VHD, head's copy²  |
//! | cookie, bad checksum        | anything else                         | `CorruptImage` at EOF−512  |
//! | no cookie                   | valid, type not fixed                 | dynamic VHD, head's copy³  |
//! | no cookie                   | valid, type fixed                     | `CorruptImage` at 0        |
//! | no cookie                   | cookie, bad checksum                  | `CorruptImage` at 0        |
//! | no cookie                   | no cookie                             | RAW                        |
//!
//! Files under 512 bytes are RAW. ¹ For a dynamic or differencing tail, a valid head must
//! describe the same disk, else the two footers contradict each other (`CorruptImage`). ² The
//! footer at the end was damaged; the copy is what the specification keeps it for (qemu always
//! reads dynamic disks through the copy). ³ The trailing footer is missing (the file was cut
//! short or its end overwritten); the blocks are still checked against the file's end.
//!
//! A `conectix` cookie with a bad checksum is never read as RAW: that would copy the VHD's
//! footer (or, for a dynamic disk, its header and tables) into the guest's disk, the bug that
//! started this project. A fixed VHD on a block device larger than the image has no footer at
//! the device's end and therefore reads as RAW; copy the file, not the device, in that case.
//!
//! A dynamic VHD whose blktap batmap carries a key hash was encrypted by `vhd-util copy -k` (or
//! by this daemon's VHD output): read as a plain disk it would hand out ciphertext, so
//! [`super::open`] refuses it ([`Error::UnsupportedFormat`], format `vhd-encrypted`) and
//! [`encrypted`] reads it given its key.
//!
//! A differencing disk is read over its parent, which the client passes as a companion file
//! found through the disk's parent locators ([`differencing`]); the parent may itself be a
//! differencing disk (a chain).
//!
//! Every kind is read through the shared [`LayeredImage`]: a fixed disk is a flat layout cut
//! before its footer, a dynamic or differencing one is [`DynamicVhd`]'s block map.
//!
//! The virtual size follows qemu's rule, documented on [`footer::Footer::virtual_size`].

pub mod batmap;
#[cfg(test)]
pub(crate) mod corpus;
pub mod differencing;
pub mod dynamic;
pub mod encrypted;
pub mod footer;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::sync::Arc;

use imgcrypt_proto::api::SourceFormat;

use self::dynamic::DynamicVhd;
use self::footer::{DiskType, Footer, FooterCheck, FOOTER_SIZE};
use super::files::{FileKey, SourceFiles};
use super::layout::{LayeredImage, Layout};
use super::{raw, read_exact_at, SourceImage};
use crate::sys::storage::StorageKind;
use crate::{Error, Result};

/// What [`detect`] found.
#[derive(Debug)]
pub(crate) enum Detected {
    /// Not a VHD.
    Raw,
    /// A VHD and the footer to read it by.
    Vhd(Found),
}

/// A VHD footer chosen by the detection rule, and where the disk's data must end.
#[derive(Debug)]
pub(crate) struct Found {
    footer: Footer,
    /// Start of the footer at the end of the file, or the file size when there is none there.
    data_end: u64,
}

/// Applies the detection rule (module documentation) to `file` of `file_size` bytes.
pub(crate) fn detect(file: &File, file_size: u64) -> Result<Detected> {
    if file_size < FOOTER_SIZE as u64 {
        return Ok(Detected::Raw);
    }
    let tail_offset = file_size - FOOTER_SIZE as u64;
    let mut tail_bytes = [0u8; FOOTER_SIZE];
    read_exact_at(
        file,
        &mut tail_bytes,
        tail_offset,
        "the VHD footer position",
    )?;
    let mut head_bytes = [0u8; FOOTER_SIZE];
    read_exact_at(file, &mut head_bytes, 0, "the first sector")?;
    let head = footer::parse(&head_bytes, 0);

    match footer::parse(&tail_bytes, tail_offset) {
        FooterCheck::Valid(tail) => {
            // A fixed disk has no copy: its first sector is guest data, whatever it holds.
            if tail.disk_type != 2 {
                if let FooterCheck::Valid(copy) = &head {
                    if !copy.same_disk(&tail) {
                        return Err(Error::corrupt(
                            format!(
                                "the VHD footer copy at offset 0 and the footer at offset \
                                 {tail_offset} describe different disks (size, geometry, type \
                                 or header offset differ); the image is damaged"
                            ),
                            Some(0),
                        ));
                    }
                }
            }
            Ok(Detected::Vhd(Found {
                footer: tail,
                data_end: tail_offset,
            }))
        }
        FooterCheck::BadChecksum { stored, computed } => match head {
            FooterCheck::Valid(copy) if copy.disk_type != 2 => {
                tracing::warn!(
                    footer_offset = tail_offset,
                    "source VHD footer at the end has a bad checksum; using its copy at offset 0"
                );
                Ok(Detected::Vhd(Found {
                    footer: copy,
                    data_end: tail_offset,
                }))
            }
            _ => Err(Error::corrupt(
                format!(
                    "VHD footer at offset {tail_offset} (the last 512 bytes) has a bad checksum \
                     (stored {stored:#010x}, computed {computed:#010x}) and there is no valid \
                     copy at offset 0; the image is damaged. It is not read as a raw disk, which \
                     would put the VHD's footer into the guest's disk: repair the image or \
                     convert it with the tool that made it"
                ),
                Some(tail_offset),
            )),
        },
        FooterCheck::NoCookie => match head {
            FooterCheck::Valid(copy) if copy.disk_type != 2 => {
                tracing::warn!(
                    "source VHD has no footer at its end; using the footer copy at offset 0"
                );
                Ok(Detected::Vhd(Found {
                    footer: copy,
                    data_end: file_size,
                }))
            }
            FooterCheck::Valid(_) => Err(Error::corrupt(
                "a fixed-disk VHD footer is at offset 0 but none is at the end, where fixed \
                 disks keep it; the image is damaged or was cut short",
                Some(0),
            )),
            FooterCheck::BadChecksum { stored, computed } => Err(Error::corrupt(
                format!(
                    "the first sector starts with the VHD cookie \"conectix\" but its checksum \
                     is wrong (stored {stored:#010x}, computed {computed:#010x}) and there is no \
                     footer at the end: a damaged VHD, not read as a raw disk"
                ),
                Some(0),
            )),
            FooterCheck::NoCookie => Ok(Detected::Raw),
        },
    }
}

/// Opens the VHD that [`detect`] found in `file` (a descriptor of file `key` of `files`), as
/// the layer below `above`; a differencing disk's parent is opened below it.
pub(crate) fn open(
    files: &SourceFiles,
    key: FileKey,
    above: &[FileKey],
    file: File,
    kind: StorageKind,
    found: Found,
) -> Result<Box<dyn SourceImage>> {
    let Found { footer, data_end } = found;
    let disk_type = footer.disk_type()?;
    footer.check_version()?;
    if disk_type == DiskType::Fixed {
        let virtual_size = footer.virtual_size()?;
        if virtual_size > data_end {
            return Err(Error::corrupt(
                format!(
                    "fixed VHD truncated: the footer at offset {} describes a {virtual_size}-\
                     byte disk but only {data_end} bytes precede it (file size {}); obtain a \
                     complete copy",
                    footer.offset,
                    data_end + FOOTER_SIZE as u64
                ),
                Some(footer.offset),
            ));
        }
        let image = raw::flat(file, kind, SourceFormat::VhdFixed, virtual_size)?;
        files.charge_metadata(key, image.own_metadata_bytes())?;
        return Ok(Box::new(image));
    }
    let mut image = DynamicVhd::open(&file, &footer, data_end)?;
    if let Some(key_hash) = image.key_hash() {
        return Err(encrypted::refusal_as_plaintext(key_hash));
    }
    if disk_type == DiskType::Dynamic {
        files.charge_metadata(key, image.metadata_bytes())?;
        return Ok(Box::new(LayeredImage::new(
            Box::new(image),
            vec![Arc::new(file)],
        )));
    }
    image.set_presence(differencing::read_presence(&file, &image)?);
    files.charge_metadata(key, image.metadata_bytes())?;
    let parent =
        differencing::open_parent(files, key, above, &file, &footer, &mut image, data_end)?;
    Ok(Box::new(LayeredImage::with_backing(
        Box::new(image),
        vec![Arc::new(file)],
        parent.image,
        parent.name,
    )))
}
