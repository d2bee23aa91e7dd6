//! VMDK images (VMware's format, "Virtual Disk Format 5.0"), read the way qemu's
//! `block/vmdk.c` reads them, through the shared [`Layout`] shape.
//!
//! # What is read
//!
//! Found by content ([`super::foreign`] finds the signatures, [`super::open_layer`] hands them
//! here):
//!
//! - `KDMV` at 0: a hosted sparse extent holding its own descriptor: monolithicSparse
//!   ([`sparse`]), or streamOptimized with compressed grains, markers and a footer
//!   ([`stream`]);
//! - a text descriptor ([`descriptor`]): monolithicFlat, twoGbMaxExtentSparse,
//!   twoGbMaxExtentFlat (and `vmfs`): every extent file is a companion the client passes
//!   ([`SourceFiles::companion`], [`Relation::Extent`]), named as the descriptor writes it:
//!   relative names are relative to the descriptor's directory, as qemu resolves them. Extents
//!   are `SPARSE` (`KDMV`, [`sparse`]) or `FLAT`/`VMFS` ([`flat`]);
//! - a tar archive (an OVA, [`ova`]) with exactly one `.vmdk` member, a sparse or
//!   streamOptimized VMDK read in place inside the tar.
//!
//! A delta link (`parentFileNameHint` in the descriptor) is read over its parent, a companion
//! ([`Relation::Parent`]) opened with [`super::open_layer`]: unallocated grains are the
//! parent's, zeroed grains are zeros. The parent must be a VMDK (qemu opens it as one), and its
//! `CID` (from its descriptor: embedded at sector 1 of a sparse extent, or the descriptor file)
//! must equal the child's `parentCID`: VMware and qemu give a VMDK a new `CID` on its first
//! write, so a mismatch means the parent changed after the child was made and the child's
//! grains may no longer fit what lies under them. qemu refuses such a chain ("Invalid
//! argument") at the first read that reaches the parent; it is refused here when opened, saying
//! both ids and what to do.
//!
//! Refused, each with a message saying what to do: ESX `COWD` (vmfsSparse) and ESXi seSparse
//! extents, descriptor create types qemu does not read, a sparse extent with no capacity that
//! only embeds a descriptor, more than [`descriptor::MAX_EXTENTS`] extents.
//!
//! # Memory
//!
//! Descriptors: at most [`descriptor::MAX_DESCRIPTOR_BYTES`]. Sparse extents: their kept grain
//! tables, [`sparse::MAX_MAPPED_GRAINS`] grains for the whole image at most (4 or 8 bytes
//! each); the allocated-range list is at most one entry per stored grain. Tar: one header at a
//! time, [`ova::MAX_MEMBERS`] members at most.

pub mod descriptor;
pub mod flat;
pub mod ova;
pub mod sparse;
pub mod stream;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use imgcrypt_proto::api::SourceFormat;

use self::descriptor::{CidField, ExtentType};
use self::flat::FlatExtent;
use self::sparse::{Grain, Header, SparseMap, MAX_MAPPED_GRAINS};
use super::codec::Codec;
use super::files::{FileKey, Relation, SourceFiles};
use super::foreign::{Foreign, VmdkKind};
use super::layout::{Chunk, FileIndex, LayeredImage, Layout, Mapped};
use super::{le_u16, le_u32, le_u64, push_merged, read_exact_at, SourceImage, RANGE_MERGE_GAP};
use crate::formats::layout::heap_bytes;
use crate::sys::storage;
use crate::{Error, Result};

/// Bytes per VMDK sector.
pub(crate) const SECTOR: u64 = 512;
/// Where qemu reads a sparse extent's embedded descriptor, and how much of it.
const EMBEDDED_DESCRIPTOR_AT: u64 = 0x200;
const EMBEDDED_DESCRIPTOR_BYTES: u64 = 20 * SECTOR;

/// How one extent stores its bytes.
#[derive(Debug)]
enum Storage {
    Flat(FlatExtent),
    Sparse {
        file: FileIndex,
        /// File offset of the extent's byte 0 (a tar member's data offset, else 0).
        base: u64,
        map: SparseMap,
    },
}

#[derive(Debug)]
struct Extent {
    /// Guest offset of its first byte.
    start: u64,
    len: u64,
    storage: Storage,
}

/// A VMDK's extents laid end to end.
#[derive(Debug)]
pub struct VmdkLayout {
    virtual_size: u64,
    extents: Vec<Extent>,
    allocated: Vec<Range<u64>>,
    grain_bytes: Option<u64>,
}

impl Layout for VmdkLayout {
    fn metadata_bytes(&self) -> u64 {
        let maps: u64 = self
            .extents
            .iter()
            .map(|extent| match &extent.storage {
                Storage::Flat(_) => 0,
                Storage::Sparse { map, .. } => map.heap_bytes(),
            })
            .sum();
        heap_bytes(&self.extents) + heap_bytes(&self.allocated) + maps
    }

    fn format(&self) -> SourceFormat {
        SourceFormat::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapped> {
        let index = self
            .extents
            .partition_point(|extent| extent.start + extent.len <= offset);
        let extent = self.extents.get(index).ok_or_else(|| {
            Error::corrupt(format!("guest offset {offset} is in no VMDK extent"), None)
        })?;
        let relative = offset - extent.start;
        let len = len.min(extent.len - relative);
        Ok(match &extent.storage {
            Storage::Flat(flat) => {
                let host = flat.offset + relative;
                if host >= flat.file_size {
                    Mapped {
                        len,
                        chunk: Chunk::Zero,
                    }
                } else {
                    Mapped {
                        len: len.min(flat.file_size - host),
                        chunk: Chunk::Data {
                            file: flat.file,
                            offset: host,
                        },
                    }
                }
            }
            Storage::Sparse { file, base, map } => {
                let grain = relative / map.grain_bytes;
                let within = relative % map.grain_bytes;
                let len = len.min(map.grain_bytes - within);
                let chunk = match map.grain(grain) {
                    Grain::Unallocated => Chunk::Backing,
                    Grain::Zero => Chunk::Zero,
                    Grain::Data(at) => {
                        let host = at + within;
                        if host >= map.len {
                            Chunk::Zero
                        } else {
                            return Ok(Mapped {
                                len: len.min(map.len - host),
                                chunk: Chunk::Data {
                                    file: *file,
                                    offset: base + host,
                                },
                            });
                        }
                    }
                    Grain::Compressed(at, stored) => {
                        let unit_start = extent.start + grain * map.grain_bytes;
                        let unit_end =
                            (unit_start + map.grain_bytes).min(extent.start + extent.len);
                        Chunk::Compressed {
                            file: *file,
                            offset: base + at,
                            stored,
                            codec: Codec::Zlib,
                            unit: unit_start..unit_end,
                        }
                    }
                };
                Mapped { len, chunk }
            }
        })
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.allocated
    }

    fn allocation_unit(&self) -> Option<u64> {
        self.grain_bytes
    }

    fn data_name(&self) -> &'static str {
        "VMDK grain"
    }
}

/// Collects the layer's files and extents while a VMDK is opened.
struct Builder<'a> {
    files: &'a SourceFiles,
    key: FileKey,
    /// The layer's files: its own first, then each companion once.
    layer_files: Vec<Arc<File>>,
    layer_keys: Vec<FileKey>,
    extents: Vec<Extent>,
    allocated: Vec<Range<u64>>,
    end: u64,
    budget: u64,
    grain_bytes: Option<u64>,
}

impl<'a> Builder<'a> {
    fn new(files: &'a SourceFiles, key: FileKey, own: File) -> Self {
        Self {
            files,
            key,
            layer_files: vec![Arc::new(own)],
            layer_keys: vec![key],
            extents: Vec::new(),
            allocated: Vec::new(),
            end: 0,
            budget: MAX_MAPPED_GRAINS,
            grain_bytes: None,
        }
    }

    fn index_of(&mut self, key: FileKey) -> FileIndex {
        if let Some(index) = self.layer_keys.iter().position(|&k| k == key) {
            return index;
        }
        self.layer_keys.push(key);
        self.layer_files.push(Arc::clone(self.files.file(key)));
        self.layer_files.len() - 1
    }

    fn push(&mut self, len: u64, storage: Storage) -> Result<()> {
        let start = self.end;
        self.end = start
            .checked_add(len)
            .filter(|&end| end <= i64::MAX as u64)
            .ok_or_else(|| {
                Error::corrupt(
                    "the VMDK's extents add up to more bytes than a disk can have",
                    None,
                )
            })?;
        self.extents.push(Extent {
            start,
            len,
            storage,
        });
        Ok(())
    }

    /// Adds the sparse extent of `len` bytes at `base` of layer file `index`.
    fn sparse(&mut self, index: FileIndex, base: u64, len: u64, what: &str) -> Result<()> {
        let file = Arc::clone(&self.layer_files[index]);
        let header = read_header(&file, base, len, what)?;
        if header.capacity == 0 && header.descriptor.0 != 0 {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "{what} is a VMDK sparse extent with no capacity that only embeds a \
                     descriptor naming other extents, which imgcrypt does not read: convert it \
                     first (`qemu-img convert -f vmdk -O qcow2 SRC NEW.qcow2`)"
                ),
            });
        }
        let header = stream::effective_header(&file, base, len, header)?;
        let gd_entries = header.check(base, len)?;
        let gd_offset = header.gd_offset.checked_mul(SECTOR).ok_or_else(|| {
            Error::corrupt(
                format!("{what}: the VMDK grain directory offset is past any file"),
                Some(base),
            )
        })?;
        let map = SparseMap::read(
            &file,
            base,
            len,
            &header,
            gd_entries,
            gd_offset,
            &mut self.budget,
        )?;
        let start = self.end;
        for grain in map.stored_grains() {
            let from = start + grain * map.grain_bytes;
            let to = (from + map.grain_bytes).min(start + map.capacity);
            push_merged(&mut self.allocated, from..to, RANGE_MERGE_GAP);
        }
        self.grain_bytes.get_or_insert(map.grain_bytes);
        tracing::debug!(
            what,
            capacity = map.capacity,
            grain = map.grain_bytes,
            compressed = map.compressed(),
            "opened a VMDK sparse extent"
        );
        self.push(
            map.capacity,
            Storage::Sparse {
                file: index,
                base,
                map,
            },
        )
    }

    /// Adds the extents a descriptor lists.
    fn descriptor(&mut self, text: &str) -> Result<()> {
        let parsed = descriptor::parse(text)?;
        match parsed.create_type.as_str() {
            "monolithicFlat" | "vmfs" | "twoGbMaxExtentSparse" | "twoGbMaxExtentFlat" => {}
            "vmfsSparse" | "seSparse" => return Err(esx_refusal(&parsed.create_type)),
            other => {
                return Err(Error::UnsupportedImage {
                    message: format!(
                        "this VMDK descriptor's createType is `{other}`, which qemu does not \
                         read from a descriptor file either (\"Unsupported image type\"): \
                         convert it with the VMware tool that made it"
                    ),
                })
            }
        }
        for line in &parsed.extents {
            if matches!(line.kind, ExtentType::VmfsSparse | ExtentType::SeSparse) {
                return Err(esx_refusal(&line.name));
            }
            let key = self.files.companion(
                self.key,
                Relation::Extent,
                std::slice::from_ref(&line.name),
            )?;
            let index = self.index_of(key);
            let file = Arc::clone(&self.layer_files[index]);
            let what = format!("extent `{}`", line.name);
            match line.kind {
                ExtentType::Flat { offset } => {
                    let len = line.sectors.checked_mul(SECTOR).ok_or_else(|| {
                        Error::corrupt(format!("{what}: its size is past any disk"), None)
                    })?;
                    let flat =
                        FlatExtent::open(&file, index, offset, self.end, len, &mut self.allocated)?;
                    self.push(len, Storage::Flat(flat))?;
                }
                ExtentType::Sparse => {
                    let size = storage::size_of(&file)?;
                    let mut magic = [0u8; 4];
                    if size >= 4 {
                        read_exact_at(&file, &mut magic, 0, "the extent's magic")?;
                    }
                    if &magic == b"COWD" {
                        return Err(esx_refusal(&line.name));
                    }
                    self.sparse(index, 0, size, &what)?;
                }
                ExtentType::VmfsSparse | ExtentType::SeSparse => unreachable!("refused above"),
            }
        }
        if self.extents.is_empty() {
            return Err(Error::corrupt(
                "the VMDK descriptor lists no extent qemu reads (`RW` lines with a positive \
                 size): the disk would be empty",
                Some(0),
            ));
        }
        Ok(())
    }

    /// The image: over its parent if the layer's descriptor `text` names one.
    fn finish(self, text: &str, above: &[FileKey]) -> Result<Box<dyn SourceImage>> {
        let parent = descriptor::parent_hint(text)?;
        let layout = VmdkLayout {
            virtual_size: self.end,
            extents: self.extents,
            allocated: self.allocated,
            grain_bytes: self.grain_bytes,
        };
        self.files
            .charge_metadata(self.key, layout.metadata_bytes())?;
        let Some(parent) = parent else {
            return Ok(Box::new(LayeredImage::new(
                Box::new(layout),
                self.layer_files,
            )));
        };
        let parent_key =
            self.files
                .companion(self.key, Relation::Parent, std::slice::from_ref(&parent))?;
        let mut chain = above.to_vec();
        chain.push(self.key);
        let below = super::open_layer(self.files, parent_key, &chain)?;
        if below.format() != SourceFormat::Vmdk {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "this VMDK delta link's parent `{parent}` is {}, not a VMDK (qemu opens a \
                     VMDK parent only): fix the parentFileNameHint, or convert the chain first",
                    below.format().display_name()
                ),
            });
        }
        check_parent_cid(text, &parent, self.files.file(parent_key))?;
        Ok(Box::new(LayeredImage::with_backing(
            Box::new(layout),
            self.layer_files,
            below,
            parent,
        )))
    }
}

fn esx_refusal(what: &str) -> Error {
    Error::UnsupportedFormat {
        format: "vmdk",
        message: format!(
            "this VMDK uses an ESX extent type (`{what}`: vmfsSparse COWD or seSparse), which \
             imgcrypt does not read: convert it on the ESXi host (`vmkfstools -i SRC -d thin \
             NEW.vmdk`) or with `qemu-img convert -f vmdk -O qcow2 SRC NEW.qcow2`"
        ),
    }
}

fn read_header(file: &File, base: u64, len: u64, what: &str) -> Result<Header> {
    if len < SECTOR {
        return Err(Error::corrupt(
            format!(
                "truncated: {what} is a VMDK sparse extent of {len} bytes, shorter than its header"
            ),
            Some(base),
        ));
    }
    let mut sector = [0u8; 512];
    read_exact_at(file, &mut sector, base, "the VMDK sparse extent header")?;
    Header::parse(&sector, base)
}

/// The text of a descriptor of `len` bytes at `at`, cut at [`descriptor::MAX_DESCRIPTOR_BYTES`]
/// and at its first NUL, as qemu reads it.
fn read_text(file: &File, at: u64, len: u64) -> Result<String> {
    let mut bytes = vec![0u8; len.min(descriptor::MAX_DESCRIPTOR_BYTES) as usize];
    read_exact_at(file, &mut bytes, at, "the VMDK descriptor")?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    bytes.truncate(end);
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The descriptor a sparse extent of `len` bytes at `base` embeds (qemu reads 10 KiB at 512),
/// empty if the extent is too short to hold one.
fn embedded_text(file: &File, base: u64, len: u64) -> Result<String> {
    if len <= EMBEDDED_DESCRIPTOR_AT {
        return Ok(String::new());
    }
    let bytes = (len - EMBEDDED_DESCRIPTOR_AT).min(EMBEDDED_DESCRIPTOR_BYTES);
    read_text(file, base + EMBEDDED_DESCRIPTOR_AT, bytes)
}

/// The descriptor a sparse VMDK embeds. A sparse file opened as the disk must embed a
/// descriptor with a `CID`, as qemu requires (`vmdk_read_cid`): one without is an extent of a
/// multi-file VMDK, whose descriptor is what to pass.
fn embedded_descriptor(file: &File, base: u64, len: u64) -> Result<String> {
    let text = embedded_text(file, base, len)?;
    if !text.contains("CID") {
        return Err(Error::UnsupportedImage {
            message: "this is one extent of a multi-file VMDK (twoGbMaxExtentSparse), not a \
                      whole disk: the sparse extent embeds no descriptor (no `CID` at offset \
                      512); pass the descriptor .vmdk that names it (qemu refuses the extent \
                      alone too)"
                .into(),
        });
    }
    Ok(text)
}

/// Refuses a delta link (descriptor `text`) whose `parentCID` is not the `CID` of its parent
/// `name` (`file`, already opened as a VMDK), as qemu's `vmdk_is_cid_valid` does. The parent's
/// descriptor is where qemu reads it: embedded at 512 in a sparse extent, else the file itself.
fn check_parent_cid(text: &str, name: &str, file: &File) -> Result<()> {
    let recorded = descriptor::cid(text, CidField::Parent).ok_or_else(|| {
        Error::corrupt(
            format!(
                "this VMDK delta link names the parent `{name}` but its descriptor has no \
                 readable parentCID, so it cannot be checked against the parent (qemu refuses \
                 it too)"
            ),
            None,
        )
    })?;
    let size = storage::size_of(file)?;
    let mut magic = [0u8; 4];
    if size >= 4 {
        read_exact_at(file, &mut magic, 0, "the VMDK parent's magic")?;
    }
    let parent_text = if &magic == sparse::MAGIC {
        embedded_text(file, 0, size)?
    } else {
        read_text(file, 0, size.min(EMBEDDED_DESCRIPTOR_BYTES))?
    };
    let Some(actual) = descriptor::cid(&parent_text, CidField::Own) else {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the parent `{name}` of this VMDK delta link has no CID in its descriptor, so \
                 it cannot be the VMDK the child was made over (qemu refuses it too): pass the \
                 right parent"
            ),
        });
    };
    if actual != recorded {
        return Err(Error::UnsupportedImage {
            message: format!(
                "this VMDK delta link was made over a parent whose CID was {recorded:08x} (its \
                 parentCID), but its parent `{name}` now has CID {actual:08x}: the parent was \
                 changed after the child was made (a VMDK gets a new CID on its first write), \
                 so the child's grains may no longer fit the data under them, and qemu refuses \
                 to read it too (\"Invalid argument\"). Pass the parent as it was when the \
                 child was made; if you know this parent is the right one, set the child's \
                 parentCID to {actual:08x} (edit its descriptor in place, keeping its length: \
                 for a sparse child it is the text at byte 512); `qemu-img rebase` cannot \
                 re-point a VMDK (\"Operation not supported\")"
            ),
        });
    }
    Ok(())
}

/// Opens the VMDK (or OVA) `found` detected in `file` (file `key` of `files`, `file_size`
/// bytes), as the layer below `above`.
pub fn open(
    files: &SourceFiles,
    key: FileKey,
    above: &[FileKey],
    found: Foreign,
    file: File,
    file_size: u64,
) -> Result<Box<dyn SourceImage>> {
    match found {
        Foreign::Vmdk(VmdkKind::Sparse | VmdkKind::StreamOptimized) => {
            let mut builder = Builder::new(files, key, file);
            builder.sparse(0, 0, file_size, "the source")?;
            let text = embedded_descriptor(&builder.layer_files[0], 0, file_size)?;
            builder.finish(&text, above)
        }
        Foreign::Vmdk(VmdkKind::EsxSparse) => Err(esx_refusal("COWD")),
        Foreign::Vmdk(VmdkKind::Descriptor) => {
            let text = read_text(&file, 0, file_size)?;
            let mut builder = Builder::new(files, key, file);
            builder.descriptor(&text)?;
            builder.finish(&text, above)
        }
        Foreign::Tar => {
            let Some(disk) = ova::the_disk(&file, file_size)? else {
                return Err(found.refusal());
            };
            let mut magic = [0u8; 4];
            if disk.size >= 4 {
                read_exact_at(&file, &mut magic, disk.offset, "the OVA disk's magic")?;
            }
            if &magic != sparse::MAGIC {
                return Err(Error::UnsupportedImage {
                    message: format!(
                        "the disk `{}` in this OVA is not a sparse or streamOptimized VMDK (a \
                         descriptor or a flat extent), which is read only outside a tar: \
                         extract it with its extents (`tar -xf SOURCE`) and encrypt the \
                         descriptor",
                        disk.name
                    ),
                });
            }
            let mut builder = Builder::new(files, key, file);
            let what = format!("OVA member `{}`", disk.name);
            builder.sparse(0, disk.offset, disk.size, &what)?;
            let text = embedded_descriptor(&builder.layer_files[0], disk.offset, disk.size)?;
            if descriptor::parent_hint(&text)?.is_some() {
                return Err(Error::UnsupportedImage {
                    message: format!(
                        "the disk `{}` in this OVA is a delta link whose parent is outside the \
                         archive: extract both (`tar -xf SOURCE`) and encrypt the child",
                        disk.name
                    ),
                });
            }
            builder.finish(&text, above)
        }
        other => Err(other.refusal()),
    }
}
