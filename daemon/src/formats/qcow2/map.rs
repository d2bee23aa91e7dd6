//! The guest-to-host cluster map, from the active L1 and L2 tables.
//!
//! The walk reads each L2 table once (one cluster buffer at a time) and keeps runs of data
//! clusters that are contiguous in both guest and host space, and runs of v3 zero clusters and
//! subclusters (which read as zeros whatever the backing file holds). Unallocated clusters get
//! no entry: they are the backing file's (zeros without one). Images qemu-img writes are mostly contiguous, so the run list is
//! short; a fragmented one is bounded by [`MAX_RUNS`], and the walk's time by
//! [`MAX_L2_ENTRIES_SCANNED`], whatever the tables point to (tables shared by several L1
//! entries, or lying in holes of a sparse file, cost nothing on disk).
//!
//! For an encrypted image the walk also checks that no L2 table, data cluster or refcount
//! block lies in the LUKS header region: `rewrite -k` writes keyslots there, and must never
//! overwrite the image's own tables or data (nor `decrypt` read the header as guest data).

use std::fs::File;
use std::ops::Range;

use super::header::{Encryption, Header, COMPRESSION_ZLIB};
use super::{OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::formats::read_exact_at;
use crate::{Error, Result};

/// Host offset bits of L1 and L2 entries (9..=55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of a standard L2 entry that must be zero: 1..=8 and 56..=61.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of an L1 entry that must be zero: 0..=8 and 56..=62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// Most L1 entries read: qemu's own limit (`QCOW_MAX_L1_SIZE`, 32 MiB of entries).
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// Most runs of contiguous data clusters kept (24 bytes each: 96 MiB).
pub const MAX_RUNS: usize = 1 << 22;

/// Most L2 entries examined: 2³⁰, i.e. 8 GiB of L2 tables, what a fully allocated 64 TiB disk
/// in 64 KiB clusters (the largest our output writes) has. Without it the walk's time would be
/// the header's to choose: 2²² L1 entries pointing at one 2 MiB L2 table (a 34 MiB file)
/// make 2⁴⁰ entries to examine, hours of a job slot for an Inspect.
pub const MAX_L2_ENTRIES_SCANNED: u64 = 1 << 30;

/// How a run's clusters are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// As they are: guest byte `guest + i` is host byte `host + i`.
    Plain,
    /// One cluster, raw deflate (zlib's `-12` window, as qemu writes it) in `bytes` bytes at
    /// `host` (not aligned), clipped to the end of the file.
    Deflate {
        /// Compressed bytes to read at `host`.
        bytes: u32,
    },
    /// One cluster, a zstd frame (`compression_type` 1), stored like [`Stored::Deflate`].
    Zstd {
        /// Compressed bytes to read at `host`.
        bytes: u32,
    },
    /// v3 zero clusters or subclusters: zeros, never read (`host` is meaningless), and they
    /// hide the backing file's bytes.
    Zero,
}

/// Guest clusters `guest..guest + length` are stored at `host` as `stored` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Guest byte offset (cluster-aligned).
    pub guest: u64,
    /// Host byte offset (cluster-aligned for plain runs).
    pub host: u64,
    /// Bytes (whole clusters or subclusters; one cluster for a compressed run).
    pub length: u64,
    /// How.
    pub stored: Stored,
}

impl Run {
    /// The guest range.
    pub fn guest_range(&self) -> Range<u64> {
        self.guest..self.guest + self.length
    }

    /// Whether the run's bytes are stored in the file (data or compressed), not zeros.
    pub fn is_stored(&self) -> bool {
        self.stored != Stored::Zero
    }
}

/// The run of `runs` (sorted, disjoint) holding guest `offset`, or else where the next run
/// starts (None: no run after `offset`).
pub fn locate(runs: &[Run], offset: u64) -> Result<&Run, Option<u64>> {
    let index = runs.partition_point(|run| run.guest + run.length <= offset);
    match runs.get(index) {
        Some(run) if run.guest <= offset => Ok(run),
        next => Err(next.map(|run| run.guest)),
    }
}

fn be64_at(bytes: &[u8], index: usize) -> u64 {
    u64::from_be_bytes(bytes[index * 8..index * 8 + 8].try_into().expect("8 bytes"))
}

/// Walks the active L1 table of `header` and returns the runs in guest order. `data_size` is
/// the size of the external data file holding the data clusters, for an image that has one
/// (their host offsets are in it, as qemu reads them); None: they are in `file`.
pub fn walk(
    file: &File,
    file_size: u64,
    header: &Header,
    data_size: Option<u64>,
) -> Result<Vec<Run>> {
    let data_bound = data_size.unwrap_or(file_size);
    let external = data_size.is_some();
    let cluster = header.cluster_size();
    // Extended L2 entries are 16 bytes: the descriptor, then the subcluster bitmap.
    let entry_words = if header.extended_l2 { 2 } else { 1 };
    let l2_entries = cluster / 8 / entry_words;
    let l2_span = l2_entries * cluster;
    let needed = header.virtual_size.div_ceil(l2_span);
    if needed > MAX_L1_ENTRIES {
        return Err(Error::UnsupportedImage {
            message: format!(
                "a {}-byte qcow2 disk with {cluster}-byte clusters needs {needed} L1 entries, \
                 more than qemu's limit of {MAX_L1_ENTRIES}",
                header.virtual_size
            ),
        });
    }
    if u64::from(header.l1_size) < needed {
        return Err(Error::corrupt(
            format!(
                "the L1 table has {} entries but a {}-byte disk needs {needed}",
                header.l1_size, header.virtual_size
            ),
            Some(36),
        ));
    }
    if u64::from(header.l1_size) > MAX_L1_ENTRIES {
        return Err(Error::corrupt(
            format!(
                "the L1 table has {} entries, more than qemu's limit of {MAX_L1_ENTRIES}",
                header.l1_size
            ),
            Some(36),
        ));
    }
    if header.l1_table_offset % cluster != 0
        || header
            .l1_table_offset
            .checked_add(needed * 8)
            .is_none_or(|end| end > file_size)
    {
        return Err(Error::corrupt(
            format!(
                "the L1 table at {} is not cluster-aligned or ends past the {file_size}-byte file",
                header.l1_table_offset
            ),
            Some(40),
        ));
    }

    // The LUKS header region, which nothing else may share (module documentation).
    let luks = match header.encryption {
        Encryption::Luks { offset, length } => Some(offset..offset + length),
        Encryption::None => None,
    };
    let in_luks_region = |start: u64, bytes: u64, what: &str, at: u64| -> Result<()> {
        match &luks {
            Some(region) if start < region.end && region.start < start.saturating_add(bytes) => {
                Err(Error::corrupt(
                    format!(
                        "{what} at {start} lies in the LUKS header region ({} bytes at {}), \
                         where re-keying writes keyslots: a damaged or crafted image",
                        region.end - region.start,
                        region.start
                    ),
                    Some(at),
                ))
            }
            _ => Ok(()),
        }
    };
    if luks.is_some() {
        check_refcount_blocks(file, file_size, header, &in_luks_region)?;
    }
    // Data clusters in an external data file cannot meet the LUKS region of this one.
    let data_in_luks_region = |start: u64, bytes: u64, what: &str, at: u64| -> Result<()> {
        if external {
            Ok(())
        } else {
            in_luks_region(start, bytes, what, at)
        }
    };

    let mut l1 = vec![0u8; (needed * 8) as usize];
    read_exact_at(file, &mut l1, header.l1_table_offset, "qcow2 L1 table")?;
    // No two L1 entries may share an L2 table (qemu-img check calls that corruption): one
    // table named 2²² times would otherwise be read and examined 2²² times.
    let mut tables: Vec<u64> = (0..needed as usize)
        .map(|index| be64_at(&l1, index) & OFFSET_MASK)
        .filter(|&offset| offset != 0)
        .collect();
    tables.sort_unstable();
    if let Some(pair) = tables.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(Error::corrupt(
            format!(
                "two L1 entries point to the same L2 table at {}: a damaged or crafted image \
                 (qemu-img check -r all repairs it)",
                pair[0]
            ),
            Some(header.l1_table_offset),
        ));
    }
    drop(tables);

    let mut l2 = vec![0u8; cluster as usize];
    // An all-zero table maps nothing: compared whole (memcmp) rather than entry by entry, so
    // tables lying in a sparse file's holes cost a read each.
    let zeros = vec![0u8; cluster as usize];
    let mut runs: Vec<Run> = Vec::new();
    let mut scanned = 0u64;
    for table in 0..needed {
        let l1_at = header.l1_table_offset + table * 8;
        let entry = be64_at(&l1, table as usize);
        if entry & L1_RESERVED != 0 {
            return Err(Error::corrupt(
                format!("L1 entry {table} ({entry:#018x}) has reserved bits set"),
                Some(l1_at),
            ));
        }
        let l2_offset = entry & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        if l2_offset % cluster != 0 || l2_offset.saturating_add(cluster) > file_size {
            return Err(Error::corrupt(
                format!(
                    "L1 entry {table} points to an L2 table at {l2_offset}, not cluster-aligned \
                     or past the {file_size}-byte file"
                ),
                Some(l1_at),
            ));
        }
        in_luks_region(
            l2_offset,
            cluster,
            &format!("the L2 table of L1 entry {table}"),
            l1_at,
        )?;
        let in_disk = l2_entries.min((header.virtual_size - table * l2_span).div_ceil(cluster));
        scanned += in_disk;
        if scanned > MAX_L2_ENTRIES_SCANNED {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "the qcow2 image's L2 tables map more than {MAX_L2_ENTRIES_SCANNED} clusters \
                     (L1 entry {table} reaches past that); this version reads at most that many \
                     (8 GiB of L2 tables, a fully allocated 64 TiB disk in 64 KiB clusters)"
                ),
            });
        }
        read_exact_at(file, &mut l2, l2_offset, "qcow2 L2 table")?;
        if l2 == zeros {
            continue;
        }
        for index in 0..l2_entries {
            let guest = table * l2_span + index * cluster;
            if guest >= header.virtual_size {
                break;
            }
            let l2_at = l2_offset + index * 8 * entry_words;
            let entry = be64_at(&l2, (index * entry_words) as usize);
            if entry & OFLAG_COMPRESSED != 0 {
                if external {
                    return Err(Error::corrupt(
                        format!(
                            "a compressed cluster at guest offset {guest} in an image with an \
                             external data file (qemu calls it corruption too)"
                        ),
                        Some(l2_at),
                    ));
                }
                let run = compressed_run(header, file_size, entry, guest, l2_at)?;
                push_run(&mut runs, run)?;
                continue;
            }
            if entry & L2_RESERVED != 0 {
                return Err(Error::corrupt(
                    format!(
                        "L2 entry for guest offset {guest} ({entry:#018x}) has reserved bits set"
                    ),
                    Some(l2_at),
                ));
            }
            let host = entry & OFFSET_MASK;
            if header.extended_l2 {
                let bitmap = be64_at(&l2, (index * 2 + 1) as usize);
                let subclusters = Subclusters {
                    guest,
                    host,
                    allocated: bitmap as u32,
                    zero: (bitmap >> 32) as u32,
                    l2_at,
                };
                subclusters.push_runs(
                    header,
                    data_bound,
                    external,
                    &mut runs,
                    &data_in_luks_region,
                )?;
                continue;
            }
            if entry & OFLAG_ZERO != 0 {
                if header.version < 3 {
                    return Err(Error::corrupt(
                        format!("a v2 image has the v3 zero flag at guest offset {guest}"),
                        Some(l2_at),
                    ));
                }
                push_run(&mut runs, zero_run(guest, cluster))?;
                continue;
            }
            // Offset 0 is a cluster of an external data file when the entry says it is in use
            // (`docs/interop/qcow2.txt`: "may only be 0 with bit 63 set ... when an external
            // data file is used"); otherwise it is unallocated.
            if host == 0 && !(external && entry & OFLAG_COPIED != 0) {
                continue;
            }
            let needed_bytes = cluster.min(header.virtual_size - guest);
            if host % cluster != 0 || host.saturating_add(needed_bytes) > data_bound {
                return Err(Error::corrupt(
                    format!(
                        "guest offset {guest} maps to host offset {host}, not cluster-aligned \
                         or past the {data_bound}-byte {}",
                        if external { "data file" } else { "file" }
                    ),
                    Some(l2_at),
                ));
            }
            data_in_luks_region(
                host,
                cluster,
                &format!("the data cluster of guest offset {guest}"),
                l2_at,
            )?;
            push_run(
                &mut runs,
                Run {
                    guest,
                    host,
                    length: cluster,
                    stored: Stored::Plain,
                },
            )?;
        }
    }
    Ok(runs)
}

/// One extended L2 entry of a standard cluster (qemu's `docs/interop/qcow2.txt`, "Extended L2
/// Entries"): 32 subclusters, bit `i` of `allocated` saying subcluster `i` is stored at
/// `host + i * cluster / 32`, bit `i` of `zero` that it reads as zeros (never both). Neither:
/// unallocated, zeros with no backing file. Bit 0 of the descriptor, the zero flag of standard
/// entries, is not consulted with subclusters (qemu's `qcow2_get_subcluster_type`).
struct Subclusters {
    guest: u64,
    host: u64,
    allocated: u32,
    zero: u32,
    l2_at: u64,
}

impl Subclusters {
    fn push_runs(
        &self,
        header: &Header,
        file_size: u64,
        external: bool,
        runs: &mut Vec<Run>,
        in_luks_region: &dyn Fn(u64, u64, &str, u64) -> Result<()>,
    ) -> Result<()> {
        let (guest, host) = (self.guest, self.host);
        if self.allocated & self.zero != 0 {
            return Err(Error::corrupt(
                format!(
                    "the subcluster bitmap of guest offset {guest} marks subclusters both \
                     allocated and zero ({:#010x}, {:#010x})",
                    self.allocated, self.zero
                ),
                Some(self.l2_at + 8),
            ));
        }
        let cluster = header.cluster_size();
        let sub = cluster / 32;
        if self.allocated == 0 {
            return self.push_zero_runs(header, runs, sub);
        }
        if (host == 0 && !external) || host % cluster != 0 {
            return Err(Error::corrupt(
                format!(
                    "guest offset {guest} has allocated subclusters but host offset {host}, \
                     not a cluster-aligned offset"
                ),
                Some(self.l2_at),
            ));
        }
        in_luks_region(
            host,
            cluster,
            &format!("the data cluster of guest offset {guest}"),
            self.l2_at,
        )?;
        for index in 0..32u64 {
            let at = guest + index * sub;
            if at >= header.virtual_size {
                break;
            }
            if self.zero & (1 << index) != 0 {
                push_run(runs, zero_run(at, sub))?;
                continue;
            }
            if self.allocated & (1 << index) == 0 {
                continue;
            }
            let stored = host + index * sub;
            if stored.saturating_add(sub.min(header.virtual_size - at)) > file_size {
                return Err(Error::corrupt(
                    format!(
                        "guest offset {at} maps to host offset {stored}, past the \
                         {file_size}-byte file"
                    ),
                    Some(self.l2_at),
                ));
            }
            push_run(
                runs,
                Run {
                    guest: at,
                    host: stored,
                    length: sub,
                    stored: Stored::Plain,
                },
            )?;
        }
        Ok(())
    }

    /// The zero subclusters of an entry with no allocated ones.
    fn push_zero_runs(&self, header: &Header, runs: &mut Vec<Run>, sub: u64) -> Result<()> {
        for index in 0..32u64 {
            let at = self.guest + index * sub;
            if at >= header.virtual_size {
                break;
            }
            if self.zero & (1 << index) != 0 {
                push_run(runs, zero_run(at, sub))?;
            }
        }
        Ok(())
    }
}

/// Zero clusters or subclusters at guest `guest..guest + length`.
fn zero_run(guest: u64, length: u64) -> Run {
    Run {
        guest,
        host: 0,
        length,
        stored: Stored::Zero,
    }
}

/// Appends `run` (after every run in `runs`), joining it to the last one when both are plain
/// and contiguous in guest and host space, or both zeros and contiguous in guest space.
fn push_run(runs: &mut Vec<Run>, run: Run) -> Result<()> {
    if let Some(last) = runs.last_mut() {
        let touching = last.guest + last.length == run.guest;
        let joins = match (last.stored, run.stored) {
            (Stored::Plain, Stored::Plain) => last.host + last.length == run.host,
            (Stored::Zero, Stored::Zero) => true,
            _ => false,
        };
        if touching && joins {
            last.length += run.length;
            return Ok(());
        }
    }
    if runs.len() == MAX_RUNS {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the qcow2 image is fragmented into more than {MAX_RUNS} runs of clusters \
                 (compressed clusters count one each, as do runs of zero clusters); defragment \
                 it first \
                 (qemu-img convert -O qcow2 SRC DEFRAGMENTED.qcow2)"
            ),
        });
    }
    runs.push(run);
    Ok(())
}

/// The run of the compressed cluster at `guest` whose L2 entry (at `l2_at`) is `entry`.
///
/// The descriptor (qemu's `docs/interop/qcow2.txt`, "Compressed Clusters Descriptor"), with
/// `x = 62 - (cluster_bits - 8)`: bits `0..x` are the host byte offset, bits `x..62` the number
/// of 512-byte sectors used beyond the one holding that offset. The compressed size is thus
/// `(sectors + 1) * 512 - offset % 512` (qemu's `qcow2_parse_compressed_l2_entry`); the last
/// sector may run past the end of the file, which qemu reads as zeros, so it is clipped.
fn compressed_run(
    header: &Header,
    file_size: u64,
    entry: u64,
    guest: u64,
    l2_at: u64,
) -> Result<Run> {
    if header.encryption != Encryption::None {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the encrypted qcow2 image has a compressed cluster at guest offset {guest}, \
                 which qemu does not write and this version does not read"
            ),
        });
    }
    let shift = 62 - (header.cluster_bits - 8);
    let host = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (header.cluster_bits - 8)) - 1)) + 1;
    let bytes = sectors * 512 - host % 512;
    // The offset field is wider than 56 bits for small clusters; those bits must be zero.
    if host == 0 || host >= file_size || host >= 1 << 56 {
        return Err(Error::corrupt(
            format!(
                "the compressed cluster of guest offset {guest} is at host offset {host}, \
                 outside the {file_size}-byte file"
            ),
            Some(l2_at),
        ));
    }
    let bytes = bytes.min(file_size - host);
    Ok(Run {
        guest,
        host,
        length: header.cluster_size(),
        // At most 2 × 2 MiB: the sector count has cluster_bits - 8 bits.
        stored: if header.compression_type == COMPRESSION_ZLIB {
            Stored::Deflate {
                bytes: bytes as u32,
            }
        } else {
            // `header::parse` lets through no other type.
            Stored::Zstd {
                bytes: bytes as u32,
            }
        },
    })
}

/// Checks, for an encrypted image, that no refcount block lies in the LUKS header region
/// (`in_luks_region`). The table is at most 8 MiB ([`super::header::MAX_REFTABLE_BYTES`]) and
/// read in one piece; a table outside the file is left to qemu (nothing here reads refcounts).
fn check_refcount_blocks(
    file: &File,
    file_size: u64,
    header: &Header,
    in_luks_region: &dyn Fn(u64, u64, &str, u64) -> Result<()>,
) -> Result<()> {
    let cluster = header.cluster_size();
    let (offset, bytes) = (header.refcount_table_offset, header.refcount_table_bytes);
    if offset.checked_add(bytes).is_none_or(|end| end > file_size) {
        return Err(Error::corrupt(
            format!(
                "the refcount table at {offset} ({bytes} bytes) ends past the {file_size}-byte file"
            ),
            Some(48),
        ));
    }
    let mut table = vec![0u8; bytes as usize];
    read_exact_at(file, &mut table, offset, "qcow2 refcount table")?;
    for index in 0..(bytes / 8) as usize {
        let block = be64_at(&table, index) & !(cluster - 1);
        if block != 0 {
            in_luks_region(
                block,
                cluster,
                &format!("refcount block {index}"),
                offset + index as u64 * 8,
            )?;
        }
    }
    Ok(())
}
