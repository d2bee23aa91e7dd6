//! qcow2 images (v2 and v3), read through a passed descriptor: as `encrypt` sources
//! ([`open_layer`], with their backing chains, and encrypted ones when the client passed their
//! key), and the encrypted ones (qemu's LUKS, `crypt_method` 2) that `decrypt`, `verify`,
//! `inspect` and `rewrite` read as containers ([`Qcow2Image::open`], standalone).
//!
//! What is read: the active layer (internal snapshots are ignored), i.e. data clusters through
//! the active L1/L2 tables (standard or extended entries, whose subclusters map separately),
//! v3 zero clusters and subclusters (preallocated or not: both read as zeros, hide the backing
//! file and are never read from the file), zlib (raw deflate) and zstd compressed clusters,
//! the crypto header extension that locates the LUKS1 header, and the backing file name and
//! backing format extension, and an external data file (incompatible bit 2, extension
//! `0x44415441`), a companion ([`Relation::DataFile`]) whose data clusters are at the host
//! offsets the L2 entries give, as qemu reads them. Refused, each with its own message saying
//! what to run instead: dirty or corrupt-flagged images, unknown incompatible features, qemu's
//! legacy AES-CBC encryption, a backing or data file given as a protocol address or `json:`
//! options, a backing file whose content is not the format the image records for it, and, in
//! the standalone containers, backing and data files.
//!
//! A format module parses; the shared reader reads: [`map::walk`] turns the tables into runs
//! at open time, and the image's [`Layout`] answers [`Layout::map`] from them by binary search
//! (data, ciphertext, compressed cluster, zeros, or the backing file's); [`LayeredImage`] does
//! every read, decompression and decryption.
//!
//! # Backing files
//!
//! The name at header offset 8 (length at 16) is handed to the client as it is recorded; a
//! relative name is relative to the directory of the image naming it (qemu's rule), which the
//! client applies ([`super::files`]). The file passed is detected by content and opened as the
//! layer below ([`super::open_layer`], which bounds the depth and refuses cycles); when the
//! image records a backing format (extension `0xE2792ACA`, qemu's driver names `raw`, `qcow2`,
//! `vpc`, `vhdx`, `vmdk`), the detected format must be it. A backing disk smaller than the
//! image reads as zeros past its end ([`LayeredImage::with_backing`]).
//!
//! # Compressed clusters
//!
//! Each is one raw deflate stream (qemu's `qcow2_zlib_compress`: `deflateInit2` with window
//! bits -12), or with `compression_type` 1 one zstd frame: [`Chunk::Compressed`] units of one
//! cluster, decoded by [`super::codec`]; as in qemu's `qcow2_zlib_decompress` and
//! `qcow2_zstd_decompress`, a stream that ends before filling the cluster, or cannot be
//! decoded, is a corrupt image (reported with its guest offset).
//!
//! # Encryption
//!
//! The LUKS1 header lives at the crypto header extension's `offset..offset + length`.
//! [`Qcow2Image::luks_header_copy`] copies that region into a daemon-owned memfd so
//! [`crate::luks::LuksImage`] (libcryptsetup) unlocks it exactly as a raw LUKS image. Each
//! 512-byte sector of a data cluster is aes-xts-plain64 with the IV `host offset / 512` (qemu's
//! `crypt_physical_offset`): [`Chunk::Encrypted`] at the cluster's host offset, decrypted with
//! [`Layout::cipher`].
//!
//! # Memory bound
//!
//! The L1 entries the virtual size needs (at most qemu's 4 Mi: 32 MiB, plus a sorted copy of
//! their L2 offsets while checking that no two share a table), one L2 table and a zero cluster
//! to compare it with (2 × 2 MiB at most), an encrypted image's refcount table (8 MiB at most)
//! while checking the LUKS region, and the run list ([`map::MAX_RUNS`] at most, 128 MiB),
//! whatever the file says, per layer of a chain (at most [`super::files::MAX_CHAIN_DEPTH`]).
//! Time: at most [`map::MAX_L2_ENTRIES_SCANNED`] L2 entries are examined per layer.

pub mod header;
pub mod map;

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use imgcrypt_proto::api::SourceFormat;

use self::header::{Encryption, Header};
use self::map::{Run, Stored};
use super::codec::Codec;
use super::files::{FileKey, Relation, SourceFiles};
use super::layout::{Chunk, FileIndex, LayeredImage, Layout, Mapped};
use super::{push_merged, read_exact_at, SourceImage, RANGE_MERGE_GAP};
use crate::engines::xts::{IvMode, XtsCipher};
use crate::formats::layout::heap_bytes;
use crate::keys::SecretBytes;
use crate::sys::{memfd, storage};
use crate::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// `crypt_method` values.
pub const CRYPT_NONE: u32 = 0;
/// qemu's legacy AES-CBC.
pub const CRYPT_AES: u32 = 1;
/// qemu's LUKS.
pub const CRYPT_LUKS: u32 = 2;
/// Header extension types (`block/qcow2.c`).
pub const EXT_END: u32 = 0;
/// Where the LUKS header is: `u64 offset, u64 length`.
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// The name of an external data file.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// The backing file's format name (`qcow2`, `raw`...).
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// A v3 header with the compression type byte and its padding, as qemu 5.1+ writes it.
pub const HEADER_LENGTH_V3: u32 = 112;
/// L1/L2 entry flag: the cluster's refcount is exactly 1.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: a compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (v3): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;

/// A qcow2 image: header checked, cluster map walked, nothing decrypted yet.
#[derive(Debug)]
pub struct Qcow2Image {
    file: File,
    file_size: u64,
    header: Header,
    /// The guest size qemu presents: the header's, rounded down to 512 (qemu's
    /// `total_sectors = size / 512`).
    virtual_size: u64,
    runs: Vec<Run>,
}

/// The wire name of an encrypted qcow2 refused as a source.
pub const ENCRYPTED_FORMAT_NAME: &str = "qcow2-encrypted";

/// Opens the qcow2 image `key` of `files` as the layer below `above` (the source itself when
/// `above` is empty), with the layers below it: its backing file is asked of `files` by the
/// name the image records ([`Relation::BackingFile`]), opened by content
/// ([`super::open_layer`]) and checked against the recorded backing format. An encrypted image
/// is read with the volume key `files` holds for it ([`SourceFiles::volume_key`]), and refused
/// without one, before its tables are read.
pub fn open_layer(
    files: &SourceFiles,
    key: FileKey,
    above: &[FileKey],
) -> Result<Box<dyn SourceImage>> {
    let file = files
        .file(key)
        .try_clone()
        .map_err(|error| Error::io("duplicate a qcow2 image descriptor", error))?;
    let file_size = storage::size_of(&file)?;
    let header = header::parse(&file, file_size)?;
    let cipher = match (header.encryption, files.volume_key(key)) {
        (Encryption::None, _) => None,
        (Encryption::Luks { .. }, Some(volume_key)) => {
            Some(XtsCipher::new(volume_key.as_bytes(), IvMode::Plain64)?)
        }
        (Encryption::Luks { .. }, None) => return Err(encrypted_refusal(files, key, above)),
    };
    let backing = match &header.backing_file {
        Some(name) => Some(open_backing(
            files,
            key,
            above,
            name,
            header.backing_format.as_deref(),
        )?),
        None => None,
    };
    let data_file = match &header.data_file {
        Some(name) => {
            let candidate = companion_candidate(files, key, name, Relation::DataFile)?;
            let data_key = files.companion(key, Relation::DataFile, &[candidate])?;
            Some(Arc::clone(files.file(data_key)))
        }
        None => None,
    };
    let data_size = match &data_file {
        Some(data) => Some(storage::size_of(data)?),
        None => None,
    };
    let image = Qcow2Image::walked(file, file_size, header, data_size)?;
    let (mut layout, file) = image.layout(cipher, SourceFormat::Qcow2);
    files.charge_metadata(key, layout.metadata_bytes())?;
    let mut own = vec![Arc::new(file)];
    if let Some(data) = data_file {
        own.push(data);
        layout.data_file = DATA_FILE_INDEX;
    }
    Ok(Box::new(match backing {
        Some((name, below)) => LayeredImage::with_backing(Box::new(layout), own, below, name),
        None => LayeredImage::new(Box::new(layout), own),
    }))
}

/// The layer's file index of an external data file (after the image's own, 0).
const DATA_FILE_INDEX: FileIndex = 1;

/// Why an encrypted qcow2 opened without its key is not read.
fn encrypted_refusal(files: &SourceFiles, key: FileKey, above: &[FileKey]) -> Error {
    if above.is_empty() {
        return Error::UnsupportedFormat {
            format: ENCRYPTED_FORMAT_NAME,
            message: "this is an encrypted qcow2 image (qemu's LUKS): pass its key with \
                      `imgctl encrypt --source-key-file FILE` to read it; or change its keys \
                      with `imgctl rewrite`, or `imgctl decrypt` it to a plain image"
                .into(),
        };
    }
    Error::UnsupportedImage {
        message: format!(
            "the backing file `{}` is an encrypted qcow2 image: only the top image of a chain \
             is decrypted (with --source-key-file); make a plain copy of the backing file \
             with `qemu-img convert` and rebase onto it (`qemu-img rebase -u -b COPY IMAGE`)",
            files.name(key)
        ),
    }
}

/// The backing file `name` of the image `key`: resolved through `files`, opened as the layer
/// below `key` and checked against the format the image records for it (`backing_format`).
fn open_backing(
    files: &SourceFiles,
    key: FileKey,
    above: &[FileKey],
    name: &str,
    backing_format: Option<&str>,
) -> Result<(String, Box<dyn SourceImage>)> {
    let candidate = companion_candidate(files, key, name, Relation::BackingFile)?;
    let backing_key = files.companion(key, Relation::BackingFile, &[candidate])?;
    let mut chain = above.to_vec();
    chain.push(key);
    let below = super::open_layer(files, backing_key, &chain)?;
    if let Some(expected) = backing_format {
        check_backing_format(files, key, name, expected, below.format())?;
    }
    Ok((name.to_string(), below))
}

/// The name a client looks the `relation` `name` up by. qemu reads a name with a colon before
/// its first slash as a protocol (`path_has_protocol`): `file:` names a local file, the rest
/// (`nbd://`, `http:`, `json:{...}` option strings) are not files a client can pass.
fn companion_candidate(
    files: &SourceFiles,
    key: FileKey,
    name: &str,
    relation: Relation,
) -> Result<String> {
    let before_slash = name.split('/').next().unwrap_or_default();
    let Some((protocol, _)) = before_slash.split_once(':') else {
        return Ok(name.to_string());
    };
    if protocol == "file" {
        let path = &name["file:".len()..];
        if !path.is_empty() {
            return Ok(path.to_string());
        }
    }
    let what = if protocol == "json" {
        "a `json:` option string".to_string()
    } else {
        format!("a `{protocol}:` protocol address")
    };
    Err(Error::UnsupportedImage {
        message: format!(
            "the {} of `{}` is {what} ({name:?}), not a file: imgcrypt reads only files the \
             client can open; copy it to a local file with `qemu-img convert` and point the \
             image at that ({})",
            relation.describe(),
            files.name(key),
            match relation {
                Relation::DataFile => "`qemu-img amend -o data_file=FILE IMAGE`",
                _ => "`qemu-img rebase -u -b FILE IMAGE`",
            }
        ),
    })
}

/// Checks that the backing file `name`, detected as `detected`, is what the image `key`
/// records (`expected`, a qemu driver name). qemu opens a backing file with the recorded
/// driver rather than probing; one whose content says otherwise is not read.
fn check_backing_format(
    files: &SourceFiles,
    key: FileKey,
    name: &str,
    expected: &str,
    detected: SourceFormat,
) -> Result<()> {
    let matches = match expected {
        "raw" => detected == SourceFormat::Raw,
        "qcow2" => detected == SourceFormat::Qcow2,
        "vpc" => matches!(detected, SourceFormat::VhdFixed | SourceFormat::VhdDynamic),
        "vhdx" => detected == SourceFormat::Vhdx,
        "vmdk" => detected
            .display_name()
            .to_ascii_lowercase()
            .contains("vmdk"),
        other => {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "`{}` records its backing file {name:?} as format {other:?}, which imgcrypt \
                     does not read (raw, qcow2, vpc, vhdx and vmdk are read): flatten the chain \
                     with `qemu-img convert -O qcow2 SRC FLAT.qcow2`",
                    files.name(key)
                ),
            })
        }
    };
    if matches {
        return Ok(());
    }
    Err(Error::UnsupportedImage {
        message: format!(
            "`{}` records its backing file {name:?} as {expected}, but its content is {}: the \
             chain is not what the image says (a replaced file?); fix the reference with \
             `qemu-img rebase -u -b {name} -F FORMAT IMAGE` if the file is right",
            files.name(key),
            detected.display_name()
        ),
    })
}

/// A daemon-owned memfd copy of the LUKS header of `file`, when it is an encrypted qcow2 (None
/// for a plain one): what a job unlocks with `--source-key-file` before the source is opened
/// ([`SourceFiles::set_source_volume_key`]). Only the header is read; a backing file is
/// allowed (it is opened with the source).
pub fn source_luks_header(file: &File) -> Result<Option<File>> {
    let file_size = storage::size_of(file)?;
    if file_size < 4 {
        return Ok(None);
    }
    let mut magic = [0u8; 4];
    read_exact_at(file, &mut magic, 0, "qcow2 magic")?;
    if &magic != MAGIC {
        return Ok(None);
    }
    match header::parse(file, file_size)?.encryption {
        Encryption::Luks { offset, length } => copy_luks_region(file, offset, length).map(Some),
        Encryption::None => Ok(None),
    }
}

impl Qcow2Image {
    /// Opens the qcow2 image behind `file` (a regular file or block device open for reading)
    /// standalone, as the encrypted containers `decrypt`, `verify`, `inspect` and `rewrite`
    /// read: one with a backing file is refused (its clusters are partly in another file, and
    /// these calls pass none).
    pub fn open(file: File) -> Result<Self> {
        let file_size = storage::size_of(&file)?;
        let header = header::parse(&file, file_size)?;
        if let Some(name) = &header.data_file {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "the qcow2 image keeps its guest data in an external data file {name:?}: \
                     an encrypted qcow2 is read here only standalone; make a standalone copy \
                     with `qemu-img convert -O qcow2` (with its --object secret options) first"
                ),
            });
        }
        if let Some(name) = &header.backing_file {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "the qcow2 image has a backing file {name:?}: an encrypted qcow2 is read \
                     here only standalone; make a standalone copy with `qemu-img convert -O \
                     qcow2` (with its --object secret options) first"
                ),
            });
        }
        Self::walked(file, file_size, header, None)
    }

    /// The image with its tables walked; `data_size` is its external data file's size, if it
    /// has one.
    fn walked(file: File, file_size: u64, header: Header, data_size: Option<u64>) -> Result<Self> {
        let runs = map::walk(&file, file_size, &header, data_size)?;
        Ok(Self {
            virtual_size: header.virtual_size / 512 * 512,
            file,
            file_size,
            header,
            runs,
        })
    }

    /// The header, checked.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Guest disk size.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Bytes of the file.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// Bytes of guest data clusters stored in the file.
    pub fn allocated_bytes(&self) -> u64 {
        self.stored_runs().map(|run| run.length).sum()
    }

    /// The lowest file offset of a guest data cluster, if any is stored.
    pub fn first_data_offset(&self) -> Option<u64> {
        self.stored_runs().map(|run| run.host).min()
    }

    fn stored_runs(&self) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(|run| run.is_stored())
    }

    /// Where the LUKS header is (`offset`, `length`), if the image is encrypted.
    pub fn luks_region(&self) -> Option<(u64, u64)> {
        match self.header.encryption {
            Encryption::Luks { offset, length } => Some((offset, length)),
            Encryption::None => None,
        }
    }

    /// A daemon-owned memfd holding exactly the LUKS header region, for
    /// [`crate::luks::LuksImage::read`]. Edits to the copy reach the image only through
    /// [`write_back_luks_header`].
    pub fn luks_header_copy(&self) -> Result<File> {
        let (offset, length) = self.luks_region().ok_or_else(|| Error::UnsupportedImage {
            message: "the qcow2 image is not encrypted: there is no LUKS header to open".into(),
        })?;
        copy_luks_region(&self.file, offset, length)
    }

    /// The guest's plaintext view: decrypted with `volume_key` (the LUKS header's, 64 bytes)
    /// when the image is encrypted. An encrypted image needs the key; a plain one takes none.
    /// Read as a container's payload, it reports [`SourceFormat::Luks`] when decrypted.
    pub fn into_source(self, volume_key: Option<&SecretBytes>) -> Result<LayeredImage> {
        let (cipher, format) = match (self.header.encryption, volume_key) {
            (Encryption::Luks { .. }, Some(key)) => (
                Some(XtsCipher::new(key.as_bytes(), IvMode::Plain64)?),
                SourceFormat::Luks,
            ),
            (Encryption::Luks { .. }, None) => {
                return Err(Error::NoKey(
                    "the qcow2 image is encrypted: its volume key is needed to read it".into(),
                ))
            }
            (Encryption::None, Some(_)) => {
                return Err(Error::UnsupportedImage {
                    message: "the qcow2 image is not encrypted, but a volume key was given".into(),
                })
            }
            (Encryption::None, None) => (None, SourceFormat::Qcow2),
        };
        let (layout, file) = self.layout(cipher, format);
        Ok(LayeredImage::new(Box::new(layout), vec![Arc::new(file)]))
    }

    /// The walked map as a [`Layout`], and the image's file (the layout's file 0).
    fn layout(self, cipher: Option<XtsCipher>, format: SourceFormat) -> (Qcow2Layout, File) {
        let mut allocated = Vec::new();
        for run in self.stored_runs() {
            let range = run.guest..(run.guest + run.length).min(self.virtual_size);
            push_merged(&mut allocated, range, RANGE_MERGE_GAP);
        }
        let layout = Qcow2Layout {
            format,
            virtual_size: self.virtual_size,
            cluster_size: self.header.cluster_size(),
            runs: self.runs,
            allocated,
            cipher,
            data_file: 0,
        };
        (layout, self.file)
    }
}

/// A qcow2 layer's map: the runs the walk found, answered by binary search.
#[derive(Debug)]
struct Qcow2Layout {
    format: SourceFormat,
    virtual_size: u64,
    cluster_size: u64,
    runs: Vec<Run>,
    allocated: Vec<Range<u64>>,
    cipher: Option<XtsCipher>,
    /// Which of the layer's files holds the data clusters: the image's own, or its external
    /// data file (at the same host offsets, as qemu reads them).
    data_file: FileIndex,
}

impl Layout for Qcow2Layout {
    fn metadata_bytes(&self) -> u64 {
        heap_bytes(&self.runs) + heap_bytes(&self.allocated)
    }

    fn format(&self) -> SourceFormat {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapped> {
        let end = offset.saturating_add(len);
        let run = match map::locate(&self.runs, offset) {
            Ok(run) => run,
            Err(next) => {
                let stop = next.map_or(end, |start| start.min(end));
                return Ok(Mapped {
                    len: stop - offset,
                    chunk: Chunk::Backing,
                });
            }
        };
        let len = end.min(run.guest + run.length) - offset;
        let host = run.host + (offset - run.guest);
        let compressed = |stored: u32, codec: Codec| Chunk::Compressed {
            file: 0,
            offset: run.host,
            stored: stored.into(),
            codec,
            unit: run.guest_range(),
        };
        let chunk = match run.stored {
            Stored::Plain if self.cipher.is_some() => Chunk::Encrypted {
                file: self.data_file,
                offset: host,
            },
            Stored::Plain => Chunk::Data {
                file: self.data_file,
                offset: host,
            },
            Stored::Zero => Chunk::Zero,
            Stored::Deflate { bytes } => compressed(bytes, Codec::Deflate),
            Stored::Zstd { bytes } => compressed(bytes, Codec::Zstd),
        };
        Ok(Mapped { len, chunk })
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.allocated
    }

    fn allocation_unit(&self) -> Option<u64> {
        Some(self.cluster_size)
    }

    fn data_name(&self) -> &'static str {
        "qcow2 data cluster"
    }

    fn cipher(&self) -> Option<&XtsCipher> {
        self.cipher.as_ref()
    }
}

/// A daemon-owned memfd holding bytes `offset..offset + length` of `image`: the LUKS header
/// region a crypto header extension names (checked by [`Qcow2Image::open`], at most 16 MiB).
pub fn copy_luks_region(image: &File, offset: u64, length: u64) -> Result<File> {
    let mut bytes = vec![0u8; length as usize];
    read_exact_at(image, &mut bytes, offset, "qcow2 LUKS header")?;
    let copy = memfd::create("imgcrypt-qcow2-luks")?;
    copy.write_all_at(&bytes, 0)
        .map_err(|error| Error::io("copying the qcow2 LUKS header into memory", error))?;
    Ok(copy)
}

/// Writes a LUKS header copy edited by [`crate::luks::LuksImage`] back into the qcow2 image at
/// `offset`, crash-safe in LUKS1's order: for an added keyslot its key material first and the
/// 4 KiB phdr last; for a removed one the phdr first and the wiped material after, with an
/// `fdatasync` between, so the header on disk never points to material that is not there.
/// `original` is the region as it was on the image; only the 4 KiB blocks that differ are
/// written.
pub fn write_back_luks_header(
    image: &File,
    offset: u64,
    original: &[u8],
    edited: &File,
    added: bool,
) -> Result<()> {
    const BLOCK: usize = 4096;
    // libcryptsetup writes a keyslot's material where the header says it lies; a crafted header
    // could put it past the region the crypto header extension gives, and the copy would then
    // have grown. Writing back only the region would leave the new keyslot without its
    // material, so nothing is written at all.
    let edited_length = edited
        .metadata()
        .map_err(|error| Error::io("fstat on the edited LUKS header copy", error))?
        .len();
    if edited_length != original.len() as u64 {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the re-keyed LUKS header is {edited_length} bytes but the qcow2's crypto header \
                 extension gives it {} at {offset}: its keyslots reach outside the region, so \
                 nothing was written back (the image is unchanged)",
                original.len()
            ),
        });
    }
    let mut edited_bytes = vec![0u8; original.len()];
    edited
        .read_exact_at(&mut edited_bytes, 0)
        .map_err(|error| Error::io("reading the edited LUKS header copy", error))?;
    let write_blocks = |blocks: Range<usize>| -> Result<()> {
        for start in blocks.step_by(BLOCK) {
            let end = (start + BLOCK).min(original.len());
            if original[start..end] != edited_bytes[start..end] {
                image
                    .write_all_at(&edited_bytes[start..end], offset + start as u64)
                    .map_err(|error| {
                        Error::io(
                            format!(
                                "writing the LUKS header back into the qcow2 image at {}",
                                offset + start as u64
                            ),
                            error,
                        )
                    })?;
            }
        }
        image
            .sync_data()
            .map_err(|error| Error::io("fdatasync on the qcow2 image", error))
    };
    let phdr = 0..BLOCK.min(original.len());
    let material = BLOCK.min(original.len())..original.len();
    if added {
        write_blocks(material)?;
        crate::luks::crash::point("qcow2:added:keyslots");
        write_blocks(phdr)
    } else {
        write_blocks(phdr)?;
        crate::luks::crash::point("qcow2:removed:primary");
        write_blocks(material)
    }
}

#[cfg(test)]
mod chain_tests;
#[cfg(test)]
mod source_tests;
#[cfg(test)]
pub(crate) mod test_images;
#[cfg(test)]
mod tests;
