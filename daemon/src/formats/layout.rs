//! The one shape every source reader has: a format module parses and checks its metadata, then
//! answers [`Layout::map`] — for a range of the virtual disk, where its bytes are — and the
//! shared [`LayeredImage`] does every read, decompression, decryption and fall-through to a
//! backing layer. A new format is a new [`Layout`], never a new read loop, so the read side is
//! optimised (and bounded) once for every format.
//!
//! Where bytes can be ([`Chunk`]): at an offset of one of the layer's files (the image's own, or
//! a companion the client passed: a VMDK extent, a qcow2 external data file); zeros; not in this
//! layer at all (the backing file's or parent's bytes, zeros without one); inside a compressed
//! unit; or ciphertext that the layer's key decrypts.
//!
//! Memory: one decompressed unit is cached per image (at most [`MAX_UNIT_BYTES`]), plus one
//! compressed buffer and one bounce buffer per read in flight.
//!
//! I/O: data ranges ([`Chunk::Data`], [`Chunk::Encrypted`]) are read with O_DIRECT through a
//! private read-only description where the file allows it, and otherwise through the page cache
//! with the pages dropped behind the reader ([`crate::sys::source_io`]), so copying a large
//! image leaves the host's page cache as it was. Compressed streams are small and unaligned:
//! they are read buffered, and dropped from the cache likewise. Ranges outside
//! [`Layout::allocated_ranges`] are never read.

use std::fmt::Debug;
use std::fs::File;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use imgcrypt_proto::api::SourceFormat;

use super::codec::{self, Codec};
use super::{check_request, read_error, SourceImage};
use crate::engines::xts::{XtsCipher, IV_SECTOR_BYTES};
use crate::sys::source_io::SourceFile;
use crate::{Error, Result};

/// Index of a file among a layer's files: 0 is the layer's own file (the one detected); the
/// others are companions it opened through [`super::files::SourceFiles`], in the order the
/// layer lists them.
pub type FileIndex = usize;

/// Largest compressed unit a layout may describe (decompressed size): qcow2's largest cluster
/// is 2 MiB, VMDK grains are at most 1 MiB in practice; a crafted image asking for more is
/// refused by the format module, and this is checked again here.
pub const MAX_UNIT_BYTES: u64 = 2 << 20;

/// Largest stored (compressed) size of one unit read: a unit's stream can be larger than the
/// unit when it does not compress, plus the codecs' framing.
pub const MAX_STORED_BYTES: u64 = MAX_UNIT_BYTES + (64 << 10);

/// Where the guest bytes of one mapped range are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// In `file` from `offset`: guest byte `start + i` is file byte `offset + i`.
    Data {
        /// Which of the layer's files.
        file: FileIndex,
        /// File offset of the range's first byte.
        offset: u64,
    },
    /// Ciphertext in `file` from `offset`, in 512-byte sectors whose XTS tweak is the sector's
    /// *file* offset / 512 (qemu's LUKS in qcow2, `crypt_physical_offset`), decrypted with the
    /// layer's [`Layout::cipher`]. `offset` need not be sector-aligned; the sectors around it are.
    Encrypted {
        /// Which of the layer's files.
        file: FileIndex,
        /// File offset of the range's first byte.
        offset: u64,
    },
    /// Reads as zeros, whatever lies below (a hole, a zero cluster).
    Zero,
    /// Not stored in this layer: the backing layer's bytes, or zeros when there is none.
    Backing,
    /// Inside one compressed unit.
    Compressed {
        /// Which of the layer's files.
        file: FileIndex,
        /// File offset of the stream.
        offset: u64,
        /// Bytes of stream to read there (at most [`MAX_STORED_BYTES`]; the stream may end
        /// sooner, as qcow2's clipped sector counts do).
        stored: u64,
        /// How it is encoded.
        codec: Codec,
        /// The guest range the unit decompresses to (at most [`MAX_UNIT_BYTES`]); the mapped
        /// range lies inside it.
        unit: Range<u64>,
    },
}

/// One answer of [`Layout::map`]: `len` bytes from the offset asked about are where `chunk` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// How many bytes the answer covers: at least 1, at most what was asked.
    pub len: u64,
    /// Where they are.
    pub chunk: Chunk,
}

/// A format's parsed, checked metadata: what a format module builds, and all the shared reader
/// needs.
pub trait Layout: Send + Sync + Debug {
    /// The format detected.
    fn format(&self) -> SourceFormat;

    /// Size of the disk the guest sees, in bytes.
    fn virtual_size(&self) -> u64;

    /// Where the bytes from guest `offset` are, for up to `len` of them. The caller guarantees
    /// `len > 0` and `offset + len <= virtual_size`. Metadata is parsed at open time, so this is
    /// a lookup; it fails only if the layout finds an inconsistency it did not check earlier.
    fn map(&self, offset: u64, len: u64) -> Result<Mapped>;

    /// Guest ranges this layer stores (every range [`Self::map`] answers with anything but
    /// [`Chunk::Zero`] or [`Chunk::Backing`] lies in one), sorted and disjoint. Everything
    /// outside them reads as zeros or as the backing layer, so a copier may skip reading them.
    fn allocated_ranges(&self) -> &[Range<u64>];

    /// The format's allocation unit (cluster, block, grain), if it has one.
    fn allocation_unit(&self) -> Option<u64> {
        None
    }

    /// What to call this layer's data in error messages: `qcow2 data cluster`, `VHD block`.
    fn data_name(&self) -> &'static str {
        "disk data"
    }

    /// The key that decrypts [`Chunk::Encrypted`] ranges, for an encrypted layer opened with it.
    fn cipher(&self) -> Option<&XtsCipher> {
        None
    }

    /// What the user should know about how the layout was read (a quirk worked around).
    fn read_notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// Heap bytes of parsed metadata this layout keeps while it is read (tables, maps,
    /// bitmaps, range lists): what its format charges to the source's chain-wide budget
    /// ([`super::files::SourceFiles::charge_metadata`]).
    fn metadata_bytes(&self) -> u64;
}

/// Heap bytes `vector` holds: its capacity, which is what the allocator gave it (a slice has
/// only its length).
#[allow(clippy::ptr_arg)]
pub fn heap_bytes<T>(vector: &Vec<T>) -> u64 {
    (vector.capacity() * std::mem::size_of::<T>()) as u64
}

/// A source disk: one layer's [`Layout`], its files, and the layer below it, read through the
/// one shared read path.
#[derive(Debug)]
pub struct LayeredImage {
    layout: Box<dyn Layout>,
    files: Vec<SourceFile>,
    backing: Option<Backing>,
    allocated: Vec<Range<u64>>,
    /// The last unit decompressed: guest start and bytes. Copy workers read neighbouring
    /// ranges, and a unit split between two reads is decompressed once.
    unit_cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

/// The layer below, and the name the layer above recorded for it.
#[derive(Debug)]
struct Backing {
    image: Box<dyn SourceImage>,
    name: String,
}

impl LayeredImage {
    /// A layer with no backing layer. `files[0]` is the layer's own file.
    pub fn new(layout: Box<dyn Layout>, files: Vec<Arc<File>>) -> Self {
        let allocated = layout.allocated_ranges().to_vec();
        Self {
            layout,
            files: files.into_iter().map(SourceFile::new).collect(),
            backing: None,
            allocated,
            unit_cache: Mutex::new(None),
        }
    }

    /// A layer over `backing`, which the layer recorded as `name`. Guest bytes past the end of
    /// a smaller backing disk read as zeros (qemu's rule); a larger one is cut to this layer's
    /// size.
    pub fn with_backing(
        layout: Box<dyn Layout>,
        files: Vec<Arc<File>>,
        backing: Box<dyn SourceImage>,
        name: String,
    ) -> Self {
        let mut image = Self::new(layout, files);
        let limit = image.layout.virtual_size().min(backing.virtual_size());
        let below = backing
            .allocated_ranges()
            .iter()
            .filter(|range| range.start < limit)
            .map(|range| range.start..range.end.min(limit));
        image.allocated = union(&image.allocated, below);
        image.backing = Some(Backing {
            image: backing,
            name,
        });
        image
    }

    /// The layout read.
    pub fn layout(&self) -> &dyn Layout {
        self.layout.as_ref()
    }

    fn file(&self, index: FileIndex) -> Result<&SourceFile> {
        self.files.get(index).ok_or_else(|| {
            Error::corrupt(
                format!(
                    "the {} layout refers to file {index} of {}",
                    self.layout.data_name(),
                    self.files.len()
                ),
                None,
            )
        })
    }

    fn read_backing(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            buffer.fill(0);
            return Ok(());
        };
        let size = backing.image.virtual_size();
        let inside = size.saturating_sub(offset).min(buffer.len() as u64) as usize;
        let (below, past) = buffer.split_at_mut(inside);
        if !below.is_empty() {
            backing.image.read_at(below, offset)?;
        }
        past.fill(0);
        Ok(())
    }

    fn read_encrypted(&self, buffer: &mut [u8], file: &SourceFile, host: u64) -> Result<()> {
        let cipher = self.layout.cipher().ok_or_else(|| {
            Error::corrupt(
                format!(
                    "the {} at file offset {host} is encrypted and no key was given",
                    self.layout.data_name()
                ),
                Some(host),
            )
        })?;
        let sector = IV_SECTOR_BYTES as u64;
        let end = host + buffer.len() as u64;
        let aligned_start = host / sector * sector;
        let aligned_end = end.div_ceil(sector) * sector;
        let what = self.layout.data_name();
        if aligned_start == host && aligned_end == end {
            read_data(file, buffer, host, what)?;
            return cipher.decrypt_sectors(buffer, IV_SECTOR_BYTES, host / sector);
        }
        // An unaligned read: decrypt the whole sectors around it and copy the part asked for.
        let mut bounce = vec![0u8; (aligned_end - aligned_start) as usize];
        read_data(file, &mut bounce, aligned_start, what)?;
        cipher.decrypt_sectors(&mut bounce, IV_SECTOR_BYTES, aligned_start / sector)?;
        let skip = (host - aligned_start) as usize;
        buffer.copy_from_slice(&bounce[skip..skip + buffer.len()]);
        Ok(())
    }

    /// The decompressed unit `unit`, from the cache or from `stored` bytes at `offset`.
    fn unit(
        &self,
        file: &SourceFile,
        offset: u64,
        stored: u64,
        codec: Codec,
        unit: &Range<u64>,
    ) -> Result<Arc<Vec<u8>>> {
        if let Some((start, bytes)) = &*self.unit_cache.lock().expect("unit cache") {
            if *start == unit.start && bytes.len() as u64 == unit.end - unit.start {
                return Ok(Arc::clone(bytes));
            }
        }
        let unit_len = unit.end.saturating_sub(unit.start);
        if unit_len == 0 || unit_len > MAX_UNIT_BYTES || stored == 0 || stored > MAX_STORED_BYTES {
            return Err(Error::corrupt(
                format!(
                    "a compressed unit of {unit_len} bytes stored in {stored} bytes at file \
                     offset {offset} is outside the limits ({MAX_UNIT_BYTES} and \
                     {MAX_STORED_BYTES} bytes): a damaged or hostile image"
                ),
                Some(offset),
            ));
        }
        let mut compressed = vec![0u8; stored as usize];
        file.read_buffered(&mut compressed, offset)
            .map_err(|e| read_error(e, compressed.len(), offset, "compressed unit"))?;
        let mut bytes = vec![0u8; unit_len as usize];
        codec::decompress(codec, &compressed, &mut bytes).map_err(|why| {
            Error::corrupt(
                format!(
                    "the {} compressed unit of guest offset {} ({stored} bytes at file offset \
                     {offset}) does not decompress to {unit_len} bytes ({why}): a damaged \
                     image; check it with `qemu-img check`, or restore a good copy",
                    codec.name(),
                    unit.start,
                ),
                Some(offset),
            )
        })?;
        let bytes = Arc::new(bytes);
        *self.unit_cache.lock().expect("unit cache") = Some((unit.start, Arc::clone(&bytes)));
        Ok(bytes)
    }
}

impl LayeredImage {
    /// Heap bytes of this layer's own parsed metadata (not the layers below): what a format
    /// that builds its layer through [`super::raw`] charges.
    pub fn own_metadata_bytes(&self) -> u64 {
        self.layout.metadata_bytes() + heap_bytes(&self.allocated)
    }
}

impl SourceImage for LayeredImage {
    fn format(&self) -> SourceFormat {
        self.layout.format()
    }

    fn virtual_size(&self) -> u64 {
        self.layout.virtual_size()
    }

    fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.layout.virtual_size(), offset, buffer.len())?;
        let end = offset + buffer.len() as u64;
        let mut position = offset;
        while position < end {
            let mapped = self.layout.map(position, end - position)?;
            if mapped.len == 0 || mapped.len > end - position {
                return Err(Error::corrupt(
                    format!(
                        "the {} map answered {} bytes for {} at guest offset {position}",
                        self.layout.data_name(),
                        mapped.len,
                        end - position
                    ),
                    None,
                ));
            }
            let out = &mut buffer[(position - offset) as usize..][..mapped.len as usize];
            match mapped.chunk {
                Chunk::Data { file, offset: host } => {
                    read_data(self.file(file)?, out, host, self.layout.data_name())?
                }
                Chunk::Encrypted { file, offset: host } => {
                    self.read_encrypted(out, self.file(file)?, host)?
                }
                Chunk::Zero => out.fill(0),
                Chunk::Backing => self.read_backing(out, position)?,
                Chunk::Compressed {
                    file,
                    offset: stream,
                    stored,
                    codec,
                    ref unit,
                } => {
                    if position < unit.start || position + mapped.len > unit.end {
                        return Err(Error::corrupt(
                            format!(
                                "guest offset {position} is mapped into the compressed unit at \
                                 {}..{}, which does not hold it",
                                unit.start, unit.end
                            ),
                            Some(stream),
                        ));
                    }
                    let bytes = self.unit(self.file(file)?, stream, stored, codec, unit)?;
                    let skip = (position - unit.start) as usize;
                    out.copy_from_slice(&bytes[skip..skip + out.len()]);
                }
            }
            position += mapped.len;
        }
        Ok(())
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.allocated
    }

    fn read_notes(&self) -> Vec<String> {
        let mut notes = self.layout.read_notes();
        if let Some(backing) = &self.backing {
            notes.extend(backing.image.read_notes());
        }
        notes
    }

    fn allocation_unit(&self) -> Option<u64> {
        self.layout.allocation_unit()
    }

    fn backing(&self) -> Option<(&str, &dyn SourceImage)> {
        self.backing
            .as_ref()
            .map(|backing| (backing.name.as_str(), backing.image.as_ref()))
    }
}

/// Fills `buffer` with the data range of `file` at `offset` through the uncached read path.
fn read_data(file: &SourceFile, buffer: &mut [u8], offset: u64, what: &str) -> Result<()> {
    file.read_data(buffer, offset)
        .map_err(|e| read_error(e, buffer.len(), offset, what))
}

/// The union of two sorted, disjoint range lists, sorted and disjoint (touching ranges merged).
fn union(ours: &[Range<u64>], theirs: impl Iterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = ours.iter().cloned().chain(theirs).collect();
    all.sort_by_key(|range| range.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(all.len());
    for range in all.into_iter().filter(|range| !range.is_empty()) {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A layout written out by hand: `map` answers from a fixed table.
    #[derive(Debug)]
    struct Table {
        size: u64,
        entries: Vec<(Range<u64>, Chunk)>,
        allocated: Vec<Range<u64>>,
    }

    impl Layout for Table {
        fn format(&self) -> SourceFormat {
            SourceFormat::Raw
        }
        fn metadata_bytes(&self) -> u64 {
            0
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn map(&self, offset: u64, len: u64) -> Result<Mapped> {
            let (range, chunk) = self
                .entries
                .iter()
                .find(|(range, _)| range.contains(&offset))
                .expect("mapped");
            let skip = offset - range.start;
            let chunk = match *chunk {
                Chunk::Data { file, offset } => Chunk::Data {
                    file,
                    offset: offset + skip,
                },
                ref other => other.clone(),
            };
            Ok(Mapped {
                len: len.min(range.end - offset),
                chunk,
            })
        }
        fn allocated_ranges(&self) -> &[Range<u64>] {
            &self.allocated
        }
    }

    fn file_with(bytes: &[u8]) -> Arc<File> {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(bytes, 0).unwrap();
        Arc::new(file)
    }

    #[test]
    fn every_chunk_kind_reads_what_it_says_across_any_split() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let unit: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8 + 1).collect();
        let stream = miniz_oxide::deflate::compress_to_vec(&unit, 6);
        let mut own = vec![0u8; 100];
        own.extend_from_slice(&stream);
        let own = file_with(&own);
        let extent = file_with(&data);
        let below: Vec<u8> = vec![0xbb; 12288];
        let backing = LayeredImage::new(
            Box::new(Table {
                size: 12288,
                entries: vec![(0..12288, Chunk::Data { file: 0, offset: 0 })],
                allocated: vec![0..12288],
            }),
            vec![file_with(&below)],
        );
        let top = Table {
            size: 16384,
            entries: vec![
                (
                    0..4096,
                    Chunk::Data {
                        file: 1,
                        offset: 4096,
                    },
                ),
                (4096..8192, Chunk::Zero),
                (
                    8192..12288,
                    Chunk::Compressed {
                        file: 0,
                        offset: 100,
                        stored: stream.len() as u64,
                        codec: Codec::Deflate,
                        unit: 8192..12288,
                    },
                ),
                (12288..16384, Chunk::Backing),
            ],
            allocated: vec![0..4096, 8192..12288],
        };
        let image = LayeredImage::with_backing(
            Box::new(top),
            vec![own, extent],
            Box::new(backing),
            "base".into(),
        );
        let mut expected = data[4096..].to_vec();
        expected.extend(vec![0u8; 4096]);
        expected.extend_from_slice(&unit);
        // The backing disk is 12288 bytes: past it, zeros.
        expected.extend(vec![0u8; 4096]);
        for split in [1usize, 7, 512, 4096, 5000, 16384] {
            let mut got = vec![0u8; 16384];
            for (index, piece) in got.chunks_mut(split).enumerate() {
                image.read_at(piece, (index * split) as u64).unwrap();
            }
            assert_eq!(got, expected, "split {split}");
        }
        // The backing layer's data under 4096..12288 is hidden by this layer, but counted as
        // allocated (a superset is allowed); what only the backing holds is included.
        assert_eq!(image.allocated_ranges(), &[0..12288]);
        assert_eq!(image.backing().map(|(name, _)| name), Some("base"));
        let mut past = vec![0u8; 1];
        assert!(image.read_at(&mut past, 16384).is_err());
    }

    #[test]
    fn a_unit_outside_the_limits_or_not_holding_the_range_is_corrupt() {
        let own = file_with(&[0u8; 64]);
        for (range, unit, stored) in [
            (0..4096, 0..(MAX_UNIT_BYTES + 512), 10),
            (0..4096, 4096..8192, 10),
            (0..4096, 0..4096, MAX_STORED_BYTES + 1),
        ] {
            let image = LayeredImage::new(
                Box::new(Table {
                    size: 4096,
                    entries: vec![(
                        range,
                        Chunk::Compressed {
                            file: 0,
                            offset: 0,
                            stored,
                            codec: Codec::Zstd,
                            unit,
                        },
                    )],
                    allocated: vec![0..4096],
                }),
                vec![Arc::clone(&own)],
            );
            let mut buffer = vec![0u8; 512];
            assert!(matches!(
                image.read_at(&mut buffer, 0),
                Err(Error::CorruptImage { .. })
            ));
        }
    }

    #[test]
    fn union_merges_overlapping_and_touching_ranges() {
        assert_eq!(
            union(
                &[0..10, 20..30],
                [5..12, 30..31, 40..41, 50..50].into_iter()
            ),
            vec![0..12, 20..31, 40..41]
        );
    }
}
