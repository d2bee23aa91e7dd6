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
//! 64 KiB clusters, 16-bit refcounts. In file order: the header cluster, the LUKS header, then
//! the data clusters as the copy places them ([`Allocator`]), in guest order, each L2 table
//! appended right after the data of the 512 MiB it maps (once the copy has moved past it), then
//! the last L2 table, the L1 table, the refcount blocks and the refcount table. qcow2 allows
//! metadata anywhere; putting it after the data is what lets the data be placed before anyone
//! knows how much of it there is. Every cluster of the file is in use (refcount 1, so the
//! refcounts are all ones up to the last cluster), and each run of stored guest clusters is one
//! contiguous run in the file unless an L2 table lands inside it: one [`Extent`], whose IV
//! counts on with the host offset as qemu expects. Guest clusters that are not stored have no L2
//! entry (or no L2 table): qemu reads zeros there and the file has no bytes for them. The
//! pipeline stores only the clusters of the source's allocated ranges that hold a non-zero byte
//! (like `qemu-img convert`).
//!
//! # Memory
//!
//! Whatever the source's fragmentation: the L1 table (8 bytes per 512 MiB of virtual size:
//! 1 MiB at the 64 TiB limit), the one L2 table being filled (64 KiB), and a few counters. A
//! finished L2 table is written out at once, so nothing grows with the number of runs (the
//! old plan kept one extent per run, up to 2²⁰, and joined holes beyond that).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};

use super::{Allocator, Container, Extent, Payload};
use crate::formats::qcow2::{
    CRYPT_LUKS, EXT_CRYPTO_HEADER, EXT_END, HEADER_LENGTH_V3, MAGIC, OFLAG_COPIED,
};
use crate::sys::aligned::AlignedBuffer;
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

/// Where the LUKS header sits: right after the header cluster.
const LUKS_OFFSET: u64 = CLUSTER_BYTES;

/// Copy buffer for the LUKS header.
const COPY_CHUNK: usize = 1 << 20;

/// Where the metadata after the payload goes, from what the copy placed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tail {
    /// Where the last L2 table goes, when one is still being filled.
    last_l2_offset: Option<u64>,
    l1_offset: u64,
    l1_clusters: u64,
    refblocks_offset: u64,
    refblocks: u64,
    reftable_offset: u64,
    reftable_clusters: u64,
    total_clusters: u64,
}

/// What the copy has placed so far.
#[derive(Debug)]
struct State {
    /// The first cluster of the file not yet used.
    next_cluster: u64,
    data_clusters: u64,
    /// L2 tables written so far (the one being filled not counted).
    l2_tables: u64,
    /// Index (guest offset / 512 MiB) of the L2 table being filled, whose entries are `l2`.
    table: Option<u64>,
    l2: AlignedBuffer,
    /// L1 entries as they go on disk (host offset | COPIED, 0 for none).
    l1: Vec<u64>,
    /// Guest end of the last run placed: runs come in ascending order.
    placed_end: u64,
    reserved: super::ReservedSpace,
}

/// A qcow2+LUKS output: places the data clusters as the copy reaches them, then writes the
/// metadata after them.
#[derive(Debug)]
pub struct Qcow2Output {
    virtual_size: u64,
    luks_length: u64,
    l1_entries: u64,
    state: Mutex<State>,
    /// The libcryptsetup-formatted LUKS1 header (a daemon-owned memfd), `luks_length` bytes.
    luks_header: File,
}

fn div_ceil(value: u64, divisor: u64) -> u64 {
    value.div_ceil(divisor)
}

/// Checks what every qcow2 this module writes needs: a virtual size up to [`MAX_VIRTUAL_SIZE`]
/// and a LUKS header of whole sectors up to 16 MiB. Returns the virtual size rounded up to 512.
fn check_sizes(virtual_size: u64, luks_length: u64) -> Result<u64> {
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the source's virtual size is {virtual_size} bytes; qcow2 output is limited \
                 to {MAX_VIRTUAL_SIZE} bytes (64 TiB): use --format luks for larger disks"
            ),
        });
    }
    if luks_length == 0 || luks_length > MAX_LUKS_HEADER_BYTES || luks_length % 512 != 0 {
        return Err(Error::Luks {
            operation: "format",
            message: format!(
                "the LUKS header is {luks_length} bytes; a qcow2 crypto header must be a \
                 whole number of 512-byte sectors, at most {MAX_LUKS_HEADER_BYTES}"
            ),
        });
    }
    Ok(virtual_size.div_ceil(512) * 512)
}

/// Where a qcow2's header points: what the header cluster says besides the fixed fields.
pub(crate) struct HeaderFields {
    pub(crate) virtual_size: u64,
    pub(crate) l1_entries: u64,
    pub(crate) l1_offset: u64,
    pub(crate) reftable_offset: u64,
    pub(crate) reftable_clusters: u64,
    pub(crate) luks_length: u64,
}

/// The header cluster's bytes: the v3 header and its extensions (the crypto header at
/// [`LUKS_OFFSET`]).
pub(crate) fn header_bytes(fields: &HeaderFields) -> Vec<u8> {
    let mut header = Vec::with_capacity(256);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&3u32.to_be_bytes()); // version
    header.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset
    header.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
    header.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    header.extend_from_slice(&fields.virtual_size.to_be_bytes());
    header.extend_from_slice(&CRYPT_LUKS.to_be_bytes());
    header.extend_from_slice(&(fields.l1_entries as u32).to_be_bytes());
    header.extend_from_slice(&fields.l1_offset.to_be_bytes());
    header.extend_from_slice(&fields.reftable_offset.to_be_bytes());
    header.extend_from_slice(&(fields.reftable_clusters as u32).to_be_bytes());
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
    header.extend_from_slice(&LUKS_OFFSET.to_be_bytes());
    header.extend_from_slice(&fields.luks_length.to_be_bytes());
    header.extend_from_slice(&EXT_END.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    header
}

/// Fills `block` (one cluster) as refcount block `index` of a file of `total_clusters`
/// clusters, every one of them in use exactly once: ones up to the file's last cluster, zeros
/// after it.
pub(crate) fn fill_refcount_block(block: &mut [u8], index: u64, total_clusters: u64) {
    let used = total_clusters
        .saturating_sub(index * REFCOUNTS_PER_BLOCK)
        .min(REFCOUNTS_PER_BLOCK) as usize;
    for (slot, entry) in block.chunks_exact_mut(2).enumerate() {
        entry.copy_from_slice(&u16::from(slot < used).to_be_bytes());
    }
}

/// The refcount blocks and refcount table clusters a file of `other_clusters` clusters of
/// everything else needs: the blocks count themselves and the table, so both grow until they
/// cover all.
pub(crate) fn refcount_clusters(other_clusters: u64) -> (u64, u64) {
    let (mut refblocks, mut reftable_clusters) = (1u64, 1u64);
    loop {
        let total = other_clusters + reftable_clusters + refblocks;
        let need_blocks = div_ceil(total, REFCOUNTS_PER_BLOCK);
        let need_table = div_ceil(need_blocks, REFTABLE_ENTRIES_PER_CLUSTER).max(1);
        if need_blocks <= refblocks && need_table <= reftable_clusters {
            return (refblocks, reftable_clusters);
        }
        refblocks = refblocks.max(need_blocks);
        reftable_clusters = reftable_clusters.max(need_table);
    }
}

impl Qcow2Output {
    /// A qcow2 image of `virtual_size` guest bytes (rounded up to 512) encrypted under the
    /// LUKS1 header in `luks_header` (`luks_length` bytes, from [`crate::luks::format_header`]),
    /// its data clusters to be placed by the copy.
    pub fn new(virtual_size: u64, luks_header: &File, luks_length: u64) -> Result<Self> {
        let virtual_size = check_sizes(virtual_size, luks_length)?;
        let luks_header = luks_header
            .try_clone()
            .map_err(|error| Error::io("duplicating the LUKS header's memfd", error))?;
        let l1_entries = div_ceil(virtual_size, L2_SPAN);
        let luks_clusters = div_ceil(luks_length, CLUSTER_BYTES);
        Ok(Self {
            virtual_size,
            luks_length,
            l1_entries,
            state: Mutex::new(State {
                next_cluster: 1 + luks_clusters,
                data_clusters: 0,
                l2_tables: 0,
                table: None,
                l2: AlignedBuffer::new(CLUSTER_BYTES as usize)?,
                l1: vec![0; l1_entries as usize],
                placed_end: 0,
                reserved: super::ReservedSpace::default(),
            }),
            luks_header,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the metadata after the payload goes, given what is placed.
    fn tail(&self, state: &State) -> Tail {
        let mut next = state.next_cluster;
        let last_l2_offset = state.table.map(|_| {
            next += 1;
            (next - 1) * CLUSTER_BYTES
        });
        let l1_clusters = div_ceil(self.l1_entries * 8, CLUSTER_BYTES).max(1);
        let l1_offset = next * CLUSTER_BYTES;
        next += l1_clusters;
        let (refblocks, reftable_clusters) = refcount_clusters(next);
        let refblocks_offset = next * CLUSTER_BYTES;
        let reftable_offset = refblocks_offset + refblocks * CLUSTER_BYTES;
        Tail {
            last_l2_offset,
            l1_offset,
            l1_clusters,
            refblocks_offset,
            refblocks,
            reftable_offset,
            reftable_clusters,
            total_clusters: next + refblocks + reftable_clusters,
        }
    }

    /// Writes the filled L2 table `table` at the next free cluster and points L1 to it.
    fn flush_table(&self, state: &mut State, table: u64, output: &File) -> Result<()> {
        let host = state.next_cluster * CLUSTER_BYTES;
        self.write(output, &state.l2, host, "L2 table")?;
        state.l1[table as usize] = host | OFLAG_COPIED;
        state.next_cluster += 1;
        state.l2_tables += 1;
        Ok(())
    }

    /// The guest disk's size in the header (the source's, rounded up to 512).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Payload bytes stored: the data clusters placed.
    pub fn allocated_bytes(&self) -> u64 {
        self.state().data_clusters * CLUSTER_BYTES
    }

    /// Bytes of metadata written: the header cluster's header, the LUKS header, refcounts, L1
    /// and L2 tables.
    pub fn metadata_bytes(&self) -> u64 {
        let state = self.state();
        let tail = self.tail(&state);
        let l2_tables = state.l2_tables + u64::from(tail.last_l2_offset.is_some());
        self.header(&tail).len() as u64
            + self.luks_length
            + (tail.reftable_clusters + tail.refblocks + l2_tables + tail.l1_clusters)
                * CLUSTER_BYTES
    }

    /// Where the LUKS header sits in the file (the crypto header extension's offset).
    pub fn luks_offset(&self) -> u64 {
        LUKS_OFFSET
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
        while done < self.luks_length {
            let n = (self.luks_length - done).min(COPY_CHUNK as u64) as usize;
            self.luks_header
                .read_exact_at(&mut buffer[..n], done)
                .map_err(|error| {
                    Error::io(format!("reading the LUKS header's memfd at {done}"), error)
                })?;
            self.write(output, &buffer[..n], LUKS_OFFSET + done, "LUKS header")?;
            done += n as u64;
        }
        Ok(())
    }

    fn write_refcounts(&self, tail: &Tail, output: &File) -> Result<()> {
        let mut table = vec![0u8; (tail.reftable_clusters * CLUSTER_BYTES) as usize];
        for (index, entry) in table
            .chunks_exact_mut(8)
            .take(tail.refblocks as usize)
            .enumerate()
        {
            let block = tail.refblocks_offset + index as u64 * CLUSTER_BYTES;
            entry.copy_from_slice(&block.to_be_bytes());
        }
        let mut block = vec![0u8; CLUSTER_BYTES as usize];
        for index in 0..tail.refblocks {
            fill_refcount_block(&mut block, index, tail.total_clusters);
            self.write(
                output,
                &block,
                tail.refblocks_offset + index * CLUSTER_BYTES,
                "refcount block",
            )?;
        }
        self.write(output, &table, tail.reftable_offset, "refcount table")
    }

    /// The last L2 table (the one still being filled) and the L1 table.
    fn write_tables(&self, state: &mut State, tail: &Tail, output: &File) -> Result<()> {
        if let (Some(table), Some(at)) = (state.table, tail.last_l2_offset) {
            self.write(output, &state.l2, at, "L2 table")?;
            state.l1[table as usize] = at | OFLAG_COPIED;
        }
        let mut l1 = vec![0u8; (tail.l1_clusters * CLUSTER_BYTES) as usize];
        for (entry, value) in l1.chunks_exact_mut(8).zip(&state.l1) {
            entry.copy_from_slice(&value.to_be_bytes());
        }
        self.write(output, &l1, tail.l1_offset, "L1 table")
    }

    /// The header cluster's bytes.
    fn header(&self, tail: &Tail) -> Vec<u8> {
        header_bytes(&HeaderFields {
            virtual_size: self.virtual_size,
            l1_entries: self.l1_entries,
            l1_offset: tail.l1_offset,
            reftable_offset: tail.reftable_offset,
            reftable_clusters: tail.reftable_clusters,
            luks_length: self.luks_length,
        })
    }
}

impl Allocator for Qcow2Output {
    fn granule(&self) -> u64 {
        CLUSTER_BYTES
    }

    /// The disk's end rounded up to 4 KiB (still inside its last cluster: the pipeline
    /// encrypts zeros past the source), so every extent suits O_DIRECT.
    fn payload_end(&self) -> u64 {
        self.virtual_size.next_multiple_of(4096)
    }

    /// One data cluster per guest cluster of `run`, at the next free clusters of the file; an
    /// L2 table the run moves past is written first, at the next free cluster.
    fn place(&self, run: Range<u64>, output: &File, placed: &mut Vec<Extent>) -> Result<()> {
        let mut state = self.state();
        if run.start % CLUSTER_BYTES != 0 || run.start < state.placed_end || run.is_empty() {
            return Err(Error::io(
                "placing the qcow2 output's data clusters",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "run {run:?} is empty, not cluster-aligned, or before the last run \
                         placed (which ended at {})",
                        state.placed_end
                    ),
                ),
            ));
        }
        let end = run.end.min(self.payload_end());
        let mut guest = run.start;
        while guest < end {
            let table = guest / L2_SPAN;
            if state.table != Some(table) {
                if let Some(previous) = state.table {
                    self.flush_table(&mut state, previous, output)?;
                }
                state.table = Some(table);
                state.l2.fill(0);
            }
            let host = state.next_cluster * CLUSTER_BYTES;
            state.next_cluster += 1;
            state.data_clusters += 1;
            let slot = ((guest % L2_SPAN) / CLUSTER_BYTES) as usize * 8;
            state.l2[slot..slot + 8].copy_from_slice(&(host | OFLAG_COPIED).to_be_bytes());
            let length = (end - guest).min(CLUSTER_BYTES);
            match placed.last_mut() {
                Some(last)
                    if last.guest_end() == guest && last.output_offset + last.length == host =>
                {
                    last.length += length
                }
                _ => placed.push(Extent {
                    guest_offset: guest,
                    length,
                    output_offset: host,
                    first_iv: host / 512,
                }),
            }
            guest += CLUSTER_BYTES;
        }
        state.placed_end = end;
        let required = state.next_cluster * CLUSTER_BYTES;
        state.reserved.cover(output, required, required)
    }
}

impl Container for Qcow2Output {
    fn payload(&self) -> Payload<'_> {
        Payload::Allocated(self)
    }

    fn output_size(&self) -> u64 {
        self.tail(&self.state()).total_clusters * CLUSTER_BYTES
    }

    /// Writes the LUKS header, the last L2 table, the L1 table and the refcounts, makes them
    /// durable, and only then writes the header cluster: until its magic is on disk, no reader
    /// takes the file for a qcow2 image, and once it is, everything it points to is already
    /// there.
    fn write_metadata(&self, output: &File) -> Result<()> {
        let mut state = self.state();
        let tail = self.tail(&state);
        super::ReservedSpace::cut(output, tail.total_clusters * CLUSTER_BYTES)?;
        self.write_luks_header(output)?;
        self.write_tables(&mut state, &tail, output)?;
        self.write_refcounts(&tail, output)?;
        output
            .sync_data()
            .map_err(|error| Error::io("fdatasync on the output before the qcow2 header", error))?;
        self.write(output, &self.header(&tail), 0, "header")
    }
}

pub mod planned;

#[cfg(test)]
pub(crate) mod tests;
