//! The hosted sparse extent (`KDMV`, VMDK spec 5.0 §"Hosted Sparse Extents"): header, grain
//! directory (GD), grain tables (GT), and the compressed grains of a streamOptimized extent
//! (see [`super::stream`] for the footer and the grain markers).
//!
//! The header is the first sector: magic `KDMV`, then little-endian `version`, `flags`,
//! `capacity` (sectors), `grainSize` (sectors), `descriptorOffset`, `descriptorSize`,
//! `numGTEsPerGT`, `rgdOffset`, `gdOffset`, `overHead` (all in sectors), and at byte 77
//! `compressAlgorithm` (1 is deflate in a zlib wrapper). A GD entry is the sector of one GT;
//! a GT entry is the sector of one grain: 0 is unallocated (the parent's bytes, zeros without
//! one), 1 with the zeroed-grain flag (bit 2) reads as zeros.
//!
//! The limits are qemu's (`block/vmdk.c` `vmdk_open_vmdk4`, `vmdk_add_extent`), so an image
//! qemu refuses is refused here with its words: version above 3, more than 512 entries per GT
//! ("L2 table size too big"), a grain of more than 1 GiB ("Invalid granularity"), more than
//! 32 Mi GD entries ("L1 size too big", the fuzzer-made `afl9.vmdk` of qemu's iotest 059), a
//! file shorter than its overhead ("File truncated"). The redundant GD (flag bit 1) is not
//! read: qemu reads through the primary one only, and so does this reader.
//!
//! Memory: the GD is read in 1 MiB pieces and only its non-zero entries are kept; each costs
//! one GT (4 bytes per grain, 8 for a compressed extent), and the grains all kept GTs describe
//! are at most [`MAX_MAPPED_GRAINS`] (128 MiB of table: a fully allocated 2 TiB disk in 64 KiB
//! grains), checked before each GT is read.

use std::fs::File;

use super::{le_u16, le_u32, le_u64, SECTOR};
use crate::formats::layout::heap_bytes;
use crate::formats::layout::{MAX_STORED_BYTES, MAX_UNIT_BYTES};
use crate::formats::read_exact_at;
use crate::{Error, Result};

/// `KDMV` as the bytes at offset 0.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// A `gdOffset` meaning "the real one is in the footer" (streamOptimized).
pub const GD_AT_END: u64 = u64::MAX;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;
/// qemu's largest GT (`L2 table size too big` above it).
const MAX_GTES_PER_GT: u32 = 512;
/// qemu's largest grain: 0x200000 sectors, 1 GiB.
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// qemu's largest GD (`L1 size too big` above it).
pub const MAX_GD_ENTRIES: u64 = 32 << 20;
/// Most grains the kept GTs may describe, all extents of one image together.
pub const MAX_MAPPED_GRAINS: u64 = 1 << 25;
/// The GD is read in pieces this size.
const GD_READ_BYTES: u64 = 1 << 20;
/// A grain marker: `lba` (u64) and `size` (u32) before the compressed bytes.
pub const GRAIN_MARKER_BYTES: u64 = 12;

/// The fields of a sparse extent header used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1, 2 or 3.
    pub version: u32,
    /// The flags word.
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_sectors: u64,
    /// Embedded descriptor: sector and length in sectors (0 when none).
    pub descriptor: (u64, u64),
    /// Entries per GT.
    pub gtes_per_gt: u32,
    /// GD sector, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Sectors before the first grain.
    pub overhead: u64,
    /// `compressAlgorithm`.
    pub compression: u16,
}

impl Header {
    /// Parses the 512-byte sector that starts with the magic (the header, or its copy in a
    /// streamOptimized footer). `at` is its file offset, for messages.
    pub fn parse(sector: &[u8; 512], at: u64) -> Result<Self> {
        if &sector[..4] != MAGIC {
            return Err(Error::corrupt(
                format!("no VMDK sparse extent header (`KDMV`) at file offset {at}"),
                Some(at),
            ));
        }
        Ok(Self {
            version: le_u32(sector, 4),
            flags: le_u32(sector, 8),
            capacity: le_u64(sector, 12),
            grain_sectors: le_u64(sector, 20),
            descriptor: (le_u64(sector, 28), le_u64(sector, 36)),
            gtes_per_gt: le_u32(sector, 44),
            gd_offset: le_u64(sector, 56),
            overhead: le_u64(sector, 64),
            compression: le_u16(sector, 77),
        })
    }

    /// Whether grains are compressed (streamOptimized).
    pub fn compressed(&self) -> bool {
        self.compression == COMPRESSION_DEFLATE
    }

    /// Whether compressed grains start with a grain marker.
    pub fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// qemu's checks, in qemu's order, once the footer (if any) has replaced the header.
    /// `len` is the extent's length in the file.
    pub fn check(&self, at: u64, len: u64) -> Result<u64> {
        let refuse = |what: String| {
            Err(Error::corrupt(
                format!(
                    "the VMDK sparse extent header at file offset {at} {what}; qemu refuses \
                     this image too: restore a good copy"
                ),
                Some(at),
            ))
        };
        if self.version > 3 {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "VMDK sparse extent version {} (header at file offset {at}): versions 1 \
                     to 3 are read (qemu: \"Unsupported VMDK version\"); convert it with the \
                     VMware tool that made it (`vmware-vdiskmanager -r SRC -t 0 NEW.vmdk`)",
                    self.version
                ),
            });
        }
        if self.gtes_per_gt > MAX_GTES_PER_GT {
            return refuse(format!(
                "says {} entries per grain table, more than {MAX_GTES_PER_GT} (qemu: \"L2 \
                 table size too big\")",
                self.gtes_per_gt
            ));
        }
        let gd_entry_sectors = u64::from(self.gtes_per_gt) * self.grain_sectors;
        if gd_entry_sectors == 0 {
            return refuse(
                "has a zero grain size or zero entries per grain table (qemu: \"L1 \
                           entry size is invalid\")"
                    .into(),
            );
        }
        let gd_entries = self.capacity.div_ceil(gd_entry_sectors);
        if len / SECTOR < self.overhead {
            return Err(Error::corrupt(
                format!(
                    "truncated: the VMDK sparse extent at file offset {at} says its grains start \
                     after {} bytes of metadata, but it is {len} bytes long (qemu: \"File \
                     truncated\"): obtain a complete copy",
                    self.overhead.saturating_mul(SECTOR)
                ),
                Some(at),
            ));
        }
        if self.grain_sectors > MAX_GRAIN_SECTORS {
            return refuse(format!(
                "says grains of {} sectors, more than 1 GiB (qemu: \"Invalid granularity, image \
                 may be corrupt\")",
                self.grain_sectors
            ));
        }
        if gd_entries > MAX_GD_ENTRIES {
            return refuse(format!(
                "says a capacity of {} sectors in grain tables of {} sectors: {gd_entries} grain \
                 directory entries, more than {MAX_GD_ENTRIES} (qemu: \"L1 size too big\")",
                self.capacity, gd_entry_sectors
            ));
        }
        // qemu's limits above bound it already for real grain sizes; this keeps byte
        // arithmetic in range for any.
        if self.capacity > i64::MAX as u64 / SECTOR {
            return refuse(format!(
                "says a capacity of {} sectors, more than a disk can have",
                self.capacity
            ));
        }
        if self.compressed() && self.grain_sectors * SECTOR > MAX_UNIT_BYTES {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "this streamOptimized VMDK has compressed grains of {} bytes; at most \
                     {MAX_UNIT_BYTES} are read: convert it first (`qemu-img convert -f vmdk -O \
                     qcow2 SRC NEW.qcow2`)",
                    self.grain_sectors * SECTOR
                ),
            });
        }
        Ok(gd_entries)
    }
}

/// Where one grain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not in this extent (the parent's, zeros without one).
    Unallocated,
    /// A zeroed grain (GT entry 1 with the zeroed-grain flag).
    Zero,
    /// Stored plainly from this offset of the extent.
    Data(u64),
    /// A compressed stream of `stored` bytes at this offset of the extent (after the marker).
    Compressed(u64, u64),
}

/// The grain map of one sparse extent, offsets relative to the extent's start in its file.
#[derive(Debug)]
pub struct SparseMap {
    /// Grain size in bytes.
    pub grain_bytes: u64,
    /// Extent size in bytes.
    pub capacity: u64,
    /// Bytes of the extent in its file (a tar member's size, or the file's).
    pub len: u64,
    gtes_per_gt: u64,
    zero_grain: bool,
    compressed: bool,
    /// Bytes before a compressed grain's stream: its marker, if the extent has markers.
    stream_skip: u64,
    /// (GD index, slot) of each non-zero GD entry, by GD index.
    tables: Vec<(u32, u32)>,
    /// The kept GTs, `gtes_per_gt` entries per slot.
    entries: Vec<u32>,
    /// For a compressed extent: the stored size of each entry's grain.
    stored: Vec<u32>,
}

impl SparseMap {
    /// Heap bytes of the kept grain tables and their index.
    pub fn heap_bytes(&self) -> u64 {
        heap_bytes(&self.tables) + heap_bytes(&self.entries) + heap_bytes(&self.stored)
    }

    /// Reads the GD at `gd_offset` (bytes, relative to `base`) and every GT it names, for an
    /// extent of `len` bytes starting at `base` of `file`. `budget` is what is left of
    /// [`MAX_MAPPED_GRAINS`] for the whole image; it is reduced by what this extent keeps.
    pub fn read(
        file: &File,
        base: u64,
        len: u64,
        header: &Header,
        gd_entries: u64,
        gd_offset: u64,
        budget: &mut u64,
    ) -> Result<Self> {
        let gtes_per_gt = u64::from(header.gtes_per_gt);
        let grain_bytes = header.grain_sectors * SECTOR;
        let mut map = Self {
            grain_bytes,
            capacity: header.capacity * SECTOR,
            len,
            gtes_per_gt,
            zero_grain: header.flags & FLAG_ZERO_GRAIN != 0,
            compressed: header.compressed(),
            stream_skip: if header.markers() {
                GRAIN_MARKER_BYTES
            } else {
                0
            },
            tables: Vec::new(),
            entries: Vec::new(),
            stored: Vec::new(),
        };
        let gd_bytes = gd_entries * 4;
        if gd_offset.checked_add(gd_bytes).is_none_or(|end| end > len) {
            return Err(Error::corrupt(
                format!(
                    "the VMDK grain directory ({gd_entries} entries at extent offset \
                     {gd_offset}) does not fit in the {len}-byte extent at file offset {base}"
                ),
                Some(base.saturating_add(gd_offset)),
            ));
        }
        let mut piece = vec![0u8; gd_bytes.min(GD_READ_BYTES) as usize];
        let mut gt = vec![0u8; (gtes_per_gt * 4) as usize];
        let mut done = 0u64;
        while done < gd_bytes {
            let bytes = &mut piece[..(gd_bytes - done).min(GD_READ_BYTES) as usize];
            read_exact_at(
                file,
                bytes,
                base + gd_offset + done,
                "the VMDK grain directory",
            )?;
            for (i, raw) in bytes.chunks_exact(4).enumerate() {
                let gt_sector = u64::from(u32::from_le_bytes(raw.try_into().expect("4 bytes")));
                if gt_sector == 0 {
                    continue;
                }
                let index = done / 4 + i as u64;
                let entry_at = base + gd_offset + index * 4;
                if *budget < gtes_per_gt {
                    return Err(Error::UnsupportedImage {
                        message: format!(
                            "this VMDK's grain tables describe more than {MAX_MAPPED_GRAINS} \
                             grains, more than this reader holds; convert it first \
                             (`qemu-img convert -f vmdk -O qcow2 SRC NEW.qcow2`)"
                        ),
                    });
                }
                *budget -= gtes_per_gt;
                let gt_offset = gt_sector * SECTOR;
                if gt_offset + gtes_per_gt * 4 > len {
                    return Err(Error::corrupt(
                        format!(
                            "VMDK grain directory entry {index} (file offset {entry_at}) names \
                             a grain table at extent offset {gt_offset}, past the end of the \
                             {len}-byte extent"
                        ),
                        Some(entry_at),
                    ));
                }
                read_exact_at(file, &mut gt, base + gt_offset, "a VMDK grain table")?;
                let slot = map.tables.len() as u32;
                map.tables.push((index as u32, slot));
                for (j, raw) in gt.chunks_exact(4).enumerate() {
                    let sector = u32::from_le_bytes(raw.try_into().expect("4 bytes"));
                    let grain = index * gtes_per_gt + j as u64;
                    let entry_at = base + gt_offset + j as u64 * 4;
                    let stored = map.check_grain(file, base, sector, grain, entry_at, header)?;
                    map.entries.push(sector);
                    if map.compressed {
                        map.stored.push(stored);
                    }
                }
            }
            done += bytes.len() as u64;
        }
        Ok(map)
    }

    /// Checks the GT entry of `grain`; for a compressed grain, reads its marker and returns its
    /// stored size.
    fn check_grain(
        &self,
        file: &File,
        base: u64,
        sector: u32,
        grain: u64,
        entry_at: u64,
        header: &Header,
    ) -> Result<u32> {
        let start = grain * self.grain_bytes;
        if sector == 0 || (sector == 1 && self.zero_grain) || start >= self.capacity {
            return Ok(0);
        }
        let offset = u64::from(sector) * SECTOR;
        if offset >= self.len {
            return Err(Error::corrupt(
                format!(
                    "the VMDK grain table entry at file offset {entry_at} puts grain {grain} at \
                     extent offset {offset}, past the end of the {}-byte extent: the image is \
                     truncated or damaged; obtain a complete copy",
                    self.len
                ),
                Some(entry_at),
            ));
        }
        if !self.compressed {
            return Ok(0);
        }
        let room = self.len - offset;
        if !header.markers() {
            // qemu reads two grains and lets zlib find the end of the stream.
            return Ok((2 * self.grain_bytes).min(room).min(MAX_STORED_BYTES) as u32);
        }
        let mut marker = [0u8; GRAIN_MARKER_BYTES as usize];
        read_exact_at(file, &mut marker, base + offset, "a VMDK grain marker")?;
        let size = u64::from(le_u32(&marker, 8));
        if size == 0
            || size > 2 * self.grain_bytes
            || size > MAX_STORED_BYTES
            || GRAIN_MARKER_BYTES + size > room
        {
            return Err(Error::corrupt(
                format!(
                    "the VMDK grain marker of grain {grain} at file offset {} says {size} \
                     compressed bytes, which a {}-byte grain in a {}-byte extent cannot hold: \
                     a damaged image; restore a good copy",
                    base + offset,
                    self.grain_bytes,
                    self.len
                ),
                Some(base + offset),
            ));
        }
        Ok(size as u32)
    }

    /// Where grain `grain` (an index within the extent) is.
    pub fn grain(&self, grain: u64) -> Grain {
        let table = grain / self.gtes_per_gt;
        let Ok(found) = self
            .tables
            .binary_search_by_key(&table, |&(index, _)| u64::from(index))
        else {
            return Grain::Unallocated;
        };
        let slot = u64::from(self.tables[found].1);
        self.entry((slot * self.gtes_per_gt + grain % self.gtes_per_gt) as usize)
    }

    /// What kept GT entry `at` (slot × entries per GT + index in the GT) says.
    fn entry(&self, at: usize) -> Grain {
        let sector = self.entries[at];
        match sector {
            0 => Grain::Unallocated,
            1 if self.zero_grain => Grain::Zero,
            _ if self.compressed => {
                let offset = u64::from(sector) * SECTOR;
                let stored = u64::from(self.stored[at]);
                if stored == 0 {
                    // Only grains past the capacity are left unchecked, and none is asked for.
                    Grain::Unallocated
                } else {
                    Grain::Compressed(offset + self.stream_skip, stored)
                }
            }
            _ => Grain::Data(u64::from(sector) * SECTOR),
        }
    }

    /// The grains stored in the extent (plain or compressed), in order. Walks each kept GT's
    /// entries directly: a 2 TiB extent has 32 Mi grains, and a table search per grain made
    /// opening one take a minute.
    pub fn stored_grains(&self) -> impl Iterator<Item = u64> + '_ {
        let grains = self.grain_count();
        self.tables.iter().flat_map(move |&(index, slot)| {
            let first = u64::from(index) * self.gtes_per_gt;
            let base = u64::from(slot) * self.gtes_per_gt;
            (first..(first + self.gtes_per_gt).min(grains)).filter(move |&grain| {
                matches!(
                    self.entry((base + grain - first) as usize),
                    Grain::Data(_) | Grain::Compressed(..)
                )
            })
        })
    }

    /// Whether the grains are compressed.
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// How many grains the extent has.
    pub fn grain_count(&self) -> u64 {
        self.capacity.div_ceil(self.grain_bytes)
    }
}
