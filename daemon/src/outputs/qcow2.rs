//! qcow2 v3 with qemu's built-in LUKS encryption, written sparse.
//!
//! # What qemu reads (checked in qemu's sources, and against qemu-img 7.2 by the tests)
//!
//! - `crypt_method` 2 (LUKS) and a crypto header extension (`0x0537be77`, 16 bytes: offset and
//!   length, big-endian) pointing to a LUKS1 header stored in clusters of the file
//!   (`block/qcow2.c`, `qcow2_read_extensions`). The offset must be cluster-aligned, and qemu's
//!   LUKS code reads the header only through `qcow2_crypto_hdr_read_func`, which refuses any
//!   read past `length`: every keyslot's key material must lie inside it.
//! - Payload: each 512-byte sector is encrypted with aes-xts-plain64 whose IV is the **host**
//!   offset / 512 (`crypt_physical_offset = true` for LUKS, `block/qcow2.c`;
//!   `qcow2_co_encdec` in `block/qcow2-threads.c` passes the host offset for it). The LUKS
//!   header's own `payload_offset` plays no part inside qcow2.
//! - `qemu-img check` (`block/qcow2-refcount.c`) wants every cluster in use (header, crypto
//!   header, L1, refcount table and blocks, L2 tables, data) to have refcount exactly 1 and
//!   no other cluster referenced, tables cluster-aligned, and `QCOW_OFLAG_COPIED` (bit 63) on
//!   every L1 and L2 entry whose cluster has refcount 1.
//!
//! # The LUKS header
//!
//! libcryptsetup formats it (LUKS1, 512-byte sectors, pbkdf2, aes-xts-plain64 with a 512-bit
//! key) on a memfd; we copy its `data_offset` bytes verbatim. What qemu checks on open
//! (`crypto/block-luks.c`, `qcrypto_block_luks_check_header` and `_parse_header`): magic and
//! version 1, NUL-terminated cipher/mode/hash names it knows (`aes`, `xts-plain64`, `sha256`),
//! every one of the 8 keyslots (active or not) with 4000 stripes, key material starting after
//! the 4 KiB phdr, ending before `payload_offset`, and not overlapping another keyslot's.
//! libcryptsetup's LUKS1 header satisfies all of it: it fills all 8 keyslots with 4000 stripes
//! at 4 KiB-aligned offsets (8, 512, 1016, ... sectors) and puts the payload at 2 MiB, so its
//! 2 MiB header is one qemu accepts as is. The only difference from a qemu-made header is
//! qemu's payload offset (4040 sectors, where the last keyslot ends, rather than libcryptsetup's
//! 2 MiB alignment); both are only bounds inside qcow2, so no conversion is needed. The tests
//! check this with qemu-img itself.
//!
//! # Layout
//!
//! 64 KiB clusters, 16-bit refcounts. In file order: the header cluster, the LUKS header, the
//! refcount table, the refcount blocks, the L1 table, the L2 tables in guest order, then one data
//! cluster per allocated guest cluster, in guest order. Every cluster of the file is therefore in
//! use (refcount 1) and each run of allocated guest clusters is one contiguous run in the file: one
//! [`Extent`], whose IV counts on with the host offset as qemu expects. Guest clusters outside the
//! ranges planned from have no L2 entry (or no L2 table): qemu reads zeros there and the file has
//! no bytes for them. The encrypt job plans from [`crate::formats::scan::nonzero_ranges`] at
//! [`CLUSTER_BYTES`], so a cluster the source allocates but fills with zeros is not stored either
//! (like `qemu-img convert`).
//!
//! # Memory
//!
//! Planning keeps only the extents (one per run of allocated clusters, at most [`MAX_RUNS`]:
//! a source fragmented into more ranges has them joined across ever larger holes, whose
//! clusters are then stored as encrypted zeros) and a few counters.
//! [`Qcow2Output::write_metadata`] streams the refcount blocks and L2 tables one cluster at a
//! time; only the L1 table (8 bytes per 512 MiB of virtual size: 1 MiB at the 64 TiB limit) and
//! the refcount table are built whole.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use super::{Container, Extent};
use crate::formats::qcow2::{
    CRYPT_LUKS, EXT_CRYPTO_HEADER, EXT_END, HEADER_LENGTH_V3, MAGIC, OFLAG_COPIED,
};
use crate::{Error, Result};

/// log2 of the cluster size: 64 KiB, qemu-img's default.
pub const CLUSTER_BITS: u32 = 16;
/// Bytes per cluster.
pub const CLUSTER_BYTES: u64 = 1 << CLUSTER_BITS;
/// L2 entries per table (one cluster of 8-byte entries).
const L2_ENTRIES: u64 = CLUSTER_BYTES / 8;
/// Guest bytes one L2 table maps: 512 MiB.
const L2_SPAN: u64 = L2_ENTRIES * CLUSTER_BYTES;
/// log2 of the refcount width in bits: 16-bit refcounts, qemu-img's default.
const REFCOUNT_ORDER: u32 = 4;
/// Refcounts per refcount block.
const REFCOUNTS_PER_BLOCK: u64 = (CLUSTER_BYTES * 8) >> REFCOUNT_ORDER;
/// Refcount-block pointers per refcount table cluster.
const REFTABLE_ENTRIES_PER_CLUSTER: u64 = CLUSTER_BYTES / 8;

/// Largest virtual size we write: 64 TiB. The metadata stays small (a 1 MiB L1 table), but a
/// larger disk is not something any cloud imports, and qemu's own limit (a 32 MiB L1, 2 PiB at
/// 64 KiB clusters) is far off.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// Largest LUKS header we store: LUKS1 headers are 2 MiB (libcryptsetup's alignment); 16 MiB
/// leaves room for any alignment a caller might choose.
const MAX_LUKS_HEADER_BYTES: u64 = 16 << 20;

/// Copy buffer for the LUKS header.
const COPY_CHUNK: usize = 1 << 20;

/// Most runs of allocated clusters a plan keeps (one [`Extent`] each, 48 bytes with the run:
/// 48 MiB). A 64 TiB disk fits in 2²⁰ runs once holes under 64 MiB are joined.
pub const MAX_RUNS: usize = 1 << 20;

/// The 64 KiB guest clusters touching `allocated` (sorted, disjoint), clipped to
/// `virtual_size`, as runs joined when fewer than `join_gap` bytes apart; `None` when they make
/// more than [`MAX_RUNS`] runs.
fn cluster_runs(
    allocated: &[Range<u64>],
    virtual_size: u64,
    join_gap: u64,
) -> Result<Option<Vec<Range<u64>>>> {
    let guest_end = div_ceil(virtual_size, CLUSTER_BYTES) * CLUSTER_BYTES;
    let mut runs: Vec<Range<u64>> = Vec::new();
    for range in allocated {
        let start = range.start / CLUSTER_BYTES * CLUSTER_BYTES;
        let end = div_ceil(range.end.min(virtual_size), CLUSTER_BYTES) * CLUSTER_BYTES;
        let end = end.min(guest_end);
        if start >= end {
            continue;
        }
        let full = runs.len() == MAX_RUNS;
        match runs.last_mut() {
            Some(last) if start < last.start => {
                return Err(Error::io(
                    "planning the qcow2 output",
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "the source's allocated ranges are not sorted",
                    ),
                ))
            }
            // Ranges that share a cluster, touch, or lie closer than the gap become one run.
            Some(last) if start <= last.end.saturating_add(join_gap) => {
                last.end = last.end.max(end)
            }
            _ if full => return Ok(None),
            _ => runs.push(start..end),
        }
    }
    Ok(Some(runs))
}

/// Where each structure sits, in clusters and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    luks_offset: u64,
    luks_length: u64,
    reftable_offset: u64,
    reftable_clusters: u64,
    refblocks_offset: u64,
    refblocks: u64,
    l1_offset: u64,
    l1_entries: u64,
    l2_offset: u64,
    l2_tables: u64,
    data_offset: u64,
    data_clusters: u64,
    total_clusters: u64,
}

/// A planned qcow2+LUKS output: the extents for the pipeline and the metadata to write after.
#[derive(Debug)]
pub struct Qcow2Output {
    virtual_size: u64,
    layout: Layout,
    extents: Vec<Extent>,
    /// The libcryptsetup-formatted LUKS1 header (a daemon-owned memfd), `luks_length` bytes.
    luks_header: File,
}

fn div_ceil(value: u64, divisor: u64) -> u64 {
    value.div_ceil(divisor)
}

impl Qcow2Output {
    /// Plans a qcow2 image of `virtual_size` guest bytes (rounded up to 512) whose data clusters
    /// are the 64 KiB guest clusters that touch `allocated` (sorted, disjoint guest ranges, as
    /// [`crate::formats::SourceImage::allocated_ranges`] gives them), encrypted under the LUKS1
    /// header in `luks_header` (`luks_length` bytes, from [`crate::luks::format_header`]).
    pub fn plan(
        virtual_size: u64,
        allocated: &[Range<u64>],
        luks_header: &File,
        luks_length: u64,
    ) -> Result<Self> {
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "the source's virtual size is {virtual_size} bytes; qcow2 output is limited \
                     to {MAX_VIRTUAL_SIZE} bytes (64 TiB): use --format luks for larger disks"
                ),
            });
        }
        let virtual_size = virtual_size.div_ceil(512) * 512;
        if luks_length == 0 || luks_length > MAX_LUKS_HEADER_BYTES || luks_length % 512 != 0 {
            return Err(Error::Luks {
                operation: "format",
                message: format!(
                    "the LUKS header is {luks_length} bytes; a qcow2 crypto header must be a \
                     whole number of 512-byte sectors, at most {MAX_LUKS_HEADER_BYTES}"
                ),
            });
        }
        let luks_header = luks_header
            .try_clone()
            .map_err(|error| Error::io("duplicating the LUKS header's memfd", error))?;

        // Guest runs of whole clusters, clipped to the disk and merged when they touch; a
        // source fragmented into more runs than [`MAX_RUNS`] is joined across ever larger holes
        // (their clusters are written as encrypted zeros), so the plan stays bounded.
        let mut join_gap = 0u64;
        let runs = loop {
            if let Some(runs) = cluster_runs(allocated, virtual_size, join_gap)? {
                break runs;
            }
            join_gap = (join_gap * 2).max(CLUSTER_BYTES);
        };

        let data_clusters: u64 = runs.iter().map(|r| (r.end - r.start) / CLUSTER_BYTES).sum();
        let mut l2_tables = 0u64;
        let mut last_table: Option<u64> = None;
        for run in &runs {
            let first = run.start / L2_SPAN;
            let last = (run.end - 1) / L2_SPAN;
            l2_tables += last - first + 1;
            if last_table == Some(first) {
                l2_tables -= 1;
            }
            last_table = Some(last);
        }

        let l1_entries = div_ceil(virtual_size, L2_SPAN);
        let l1_clusters = div_ceil(l1_entries * 8, CLUSTER_BYTES).max(1);
        let luks_clusters = div_ceil(luks_length, CLUSTER_BYTES);
        let fixed = 1 + luks_clusters + l1_clusters + l2_tables + data_clusters;
        // The refcount blocks count themselves and the table: grow both until they cover all.
        let (mut refblocks, mut reftable_clusters) = (1u64, 1u64);
        loop {
            let total = fixed + reftable_clusters + refblocks;
            let need_blocks = div_ceil(total, REFCOUNTS_PER_BLOCK);
            let need_table = div_ceil(need_blocks, REFTABLE_ENTRIES_PER_CLUSTER).max(1);
            if need_blocks <= refblocks && need_table <= reftable_clusters {
                break;
            }
            refblocks = refblocks.max(need_blocks);
            reftable_clusters = reftable_clusters.max(need_table);
        }

        let luks_offset = CLUSTER_BYTES;
        let reftable_offset = luks_offset + luks_clusters * CLUSTER_BYTES;
        let refblocks_offset = reftable_offset + reftable_clusters * CLUSTER_BYTES;
        let l1_offset = refblocks_offset + refblocks * CLUSTER_BYTES;
        let l2_offset = l1_offset + l1_clusters * CLUSTER_BYTES;
        let data_offset = l2_offset + l2_tables * CLUSTER_BYTES;
        let total_clusters = data_offset / CLUSTER_BYTES + data_clusters;
        debug_assert_eq!(total_clusters, fixed + reftable_clusters + refblocks);

        let mut extents = Vec::with_capacity(runs.len());
        let mut host = data_offset;
        // The last run stops at the disk's end rounded up to 4 KiB (still inside its cluster:
        // the pipeline encrypts zeros past the source), so every extent suits O_DIRECT.
        let payload_end = virtual_size.div_ceil(4096) * 4096;
        for run in &runs {
            let length = run.end.min(payload_end) - run.start;
            extents.push(Extent {
                guest_offset: run.start,
                length,
                output_offset: host,
                first_iv: host / 512,
            });
            host += run.end - run.start;
        }
        drop(runs);

        Ok(Self {
            virtual_size,
            layout: Layout {
                luks_offset,
                luks_length,
                reftable_offset,
                reftable_clusters,
                refblocks_offset,
                refblocks,
                l1_offset,
                l1_entries,
                l2_offset,
                l2_tables,
                data_offset,
                data_clusters,
                total_clusters,
            },
            extents,
            luks_header,
        })
    }

    /// The guest disk's size in the header (the source's, rounded up to 512).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Payload bytes stored: the allocated data clusters.
    pub fn allocated_bytes(&self) -> u64 {
        self.layout.data_clusters * CLUSTER_BYTES
    }

    /// Bytes of metadata written: the header cluster's header, the LUKS header, refcounts, L1
    /// and L2 tables.
    pub fn metadata_bytes(&self) -> u64 {
        let layout = &self.layout;
        self.header().len() as u64
            + layout.luks_length
            + (layout.reftable_clusters + layout.refblocks + layout.l2_tables) * CLUSTER_BYTES
            + div_ceil(layout.l1_entries * 8, CLUSTER_BYTES).max(1) * CLUSTER_BYTES
    }

    /// Where the LUKS header sits in the file (the crypto header extension's offset).
    pub fn luks_offset(&self) -> u64 {
        self.layout.luks_offset
    }

    fn write(&self, output: &File, bytes: &[u8], offset: u64, what: &str) -> Result<()> {
        output.write_all_at(bytes, offset).map_err(|error| {
            Error::io(
                format!(
                    "writing the qcow2 {what} ({} bytes at offset {offset}) to the output",
                    bytes.len()
                ),
                error,
            )
        })
    }

    fn write_luks_header(&self, output: &File) -> Result<()> {
        let mut buffer = vec![0u8; COPY_CHUNK];
        let mut done = 0u64;
        while done < self.layout.luks_length {
            let n = (self.layout.luks_length - done).min(COPY_CHUNK as u64) as usize;
            self.luks_header
                .read_exact_at(&mut buffer[..n], done)
                .map_err(|error| {
                    Error::io(format!("reading the LUKS header's memfd at {done}"), error)
                })?;
            self.write(
                output,
                &buffer[..n],
                self.layout.luks_offset + done,
                "LUKS header",
            )?;
            done += n as u64;
        }
        Ok(())
    }

    fn write_refcounts(&self, output: &File) -> Result<()> {
        let layout = &self.layout;
        let mut table = vec![0u8; (layout.reftable_clusters * CLUSTER_BYTES) as usize];
        for (index, entry) in table
            .chunks_exact_mut(8)
            .take(layout.refblocks as usize)
            .enumerate()
        {
            let block = layout.refblocks_offset + index as u64 * CLUSTER_BYTES;
            entry.copy_from_slice(&block.to_be_bytes());
        }
        // Every cluster of the file is in use exactly once: all blocks but the last are full of
        // ones, the last has ones up to the last cluster.
        let mut block = vec![0u8; CLUSTER_BYTES as usize];
        for entry in block.chunks_exact_mut(2) {
            entry.copy_from_slice(&1u16.to_be_bytes());
        }
        for index in 0..layout.refblocks {
            let first = index * REFCOUNTS_PER_BLOCK;
            let used = layout
                .total_clusters
                .saturating_sub(first)
                .min(REFCOUNTS_PER_BLOCK);
            if used < REFCOUNTS_PER_BLOCK {
                block[used as usize * 2..].fill(0);
            }
            self.write(
                output,
                &block,
                layout.refblocks_offset + index * CLUSTER_BYTES,
                "refcount block",
            )?;
        }
        self.write(output, &table, layout.reftable_offset, "refcount table")
    }

    fn write_tables(&self, output: &File) -> Result<()> {
        let layout = &self.layout;
        let l1_bytes = div_ceil(layout.l1_entries * 8, CLUSTER_BYTES).max(1) * CLUSTER_BYTES;
        let mut l1 = vec![0u8; l1_bytes as usize];
        let mut l2 = vec![0u8; CLUSTER_BYTES as usize];
        let mut current: Option<u64> = None;
        let mut written = 0u64;
        let mut flush = |table: u64, l2: &mut Vec<u8>, l1: &mut Vec<u8>| -> Result<()> {
            let host = layout.l2_offset + written * CLUSTER_BYTES;
            self.write(output, l2, host, "L2 table")?;
            l2.fill(0);
            let slot = table as usize * 8;
            l1[slot..slot + 8].copy_from_slice(&(host | OFLAG_COPIED).to_be_bytes());
            written += 1;
            Ok(())
        };
        for extent in &self.extents {
            let clusters = div_ceil(extent.length, CLUSTER_BYTES);
            for cluster in 0..clusters {
                let guest = extent.guest_offset + cluster * CLUSTER_BYTES;
                let host = extent.output_offset + cluster * CLUSTER_BYTES;
                let table = guest / L2_SPAN;
                if let Some(previous) = current.filter(|&previous| previous != table) {
                    flush(previous, &mut l2, &mut l1)?;
                }
                current = Some(table);
                let slot = ((guest % L2_SPAN) / CLUSTER_BYTES) as usize * 8;
                l2[slot..slot + 8].copy_from_slice(&(host | OFLAG_COPIED).to_be_bytes());
            }
        }
        if let Some(last) = current {
            flush(last, &mut l2, &mut l1)?;
        }
        if written != layout.l2_tables {
            return Err(Error::io(
                "writing the qcow2 L2 tables",
                std::io::Error::other(format!(
                    "planned {} L2 tables but wrote {written}",
                    layout.l2_tables
                )),
            ));
        }
        self.write(output, &l1, layout.l1_offset, "L1 table")
    }

    /// The header cluster's bytes: the v3 header and its extensions.
    fn header(&self) -> Vec<u8> {
        let layout = &self.layout;
        let mut header = Vec::with_capacity(256);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&3u32.to_be_bytes()); // version
        header.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset
        header.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
        header.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
        header.extend_from_slice(&self.virtual_size.to_be_bytes());
        header.extend_from_slice(&CRYPT_LUKS.to_be_bytes());
        header.extend_from_slice(&(layout.l1_entries as u32).to_be_bytes());
        header.extend_from_slice(&layout.l1_offset.to_be_bytes());
        header.extend_from_slice(&layout.reftable_offset.to_be_bytes());
        header.extend_from_slice(&(layout.reftable_clusters as u32).to_be_bytes());
        header.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
        header.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
        header.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
        header.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
        header.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
        header.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        header.extend_from_slice(&HEADER_LENGTH_V3.to_be_bytes());
        // compression_type 0 (zlib; no cluster is compressed) and padding to 8 bytes.
        header.resize(HEADER_LENGTH_V3 as usize, 0);
        header.extend_from_slice(&EXT_CRYPTO_HEADER.to_be_bytes());
        header.extend_from_slice(&16u32.to_be_bytes());
        header.extend_from_slice(&layout.luks_offset.to_be_bytes());
        header.extend_from_slice(&layout.luks_length.to_be_bytes());
        header.extend_from_slice(&EXT_END.to_be_bytes());
        header.extend_from_slice(&0u32.to_be_bytes());
        header
    }
}

impl Container for Qcow2Output {
    fn extents(&self) -> &[Extent] {
        &self.extents
    }

    fn output_size(&self) -> u64 {
        self.layout.total_clusters * CLUSTER_BYTES
    }

    /// Writes the LUKS header, refcounts, L2 and L1 tables, makes them durable, and only then
    /// writes the header cluster: until its magic is on disk, no reader takes the file for a
    /// qcow2 image, and once it is, everything it points to is already there.
    fn write_metadata(&self, output: &File) -> Result<()> {
        self.write_luks_header(output)?;
        self.write_refcounts(output)?;
        self.write_tables(output)?;
        output
            .sync_data()
            .map_err(|error| Error::io("fdatasync on the output before the qcow2 header", error))?;
        self.write(output, &self.header(), 0, "header")
    }
}

#[cfg(test)]
pub(crate) mod tests;
