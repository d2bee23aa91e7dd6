//! A qcow2+LUKS image laid out before the copy, metadata first: the layout of a **streamed**
//! qcow2 (`imgctl encrypt --format qcow2 --upload`, [`crate::jobs`]' stream).
//!
//! The file writer ([`super::Qcow2Output`]) places data clusters as the copy finds them and
//! writes the tables after them, which needs a file to seek in. A stream goes strictly in
//! order, so here the data clusters are known first (the source is scanned for them before the
//! copy, [`crate::formats::scan::nonzero_ranges`]) and everything is laid out at once:
//!
//! | clusters                 | what                                                        |
//! |--------------------------|-------------------------------------------------------------|
//! | 0                        | the header (v3, crypto header extension)                    |
//! | 1 ..                     | the LUKS1 header (libcryptsetup's, verbatim)                |
//! | then                     | the refcount table, the refcount blocks                     |
//! | then                     | the L1 table, then one L2 table per 512 MiB holding data    |
//! | then, to the end         | the data clusters, in guest order                           |
//!
//! Every cluster of the file is in use once (refcount 1), the tables cluster-aligned, `COPIED`
//! set on every entry: what `qemu-img check` wants, as for the file writer. The data runs are
//! contiguous in the file, so the pipeline streams them as planned [`Extent`]s one after the
//! other, each with its host offset as IV (qemu's rule for LUKS in qcow2). The metadata is a
//! function of the virtual size, the LUKS header's length and the data ranges only, so an
//! interrupted stream of the same source resumes anywhere: its header cluster, compared with
//! the saved one, says whether the layout is the same ([`PlannedQcow2::header_cluster`]).
//! For that the header cluster carries, after the header extensions' end marker (where qemu
//! reads nothing: the rest of the cluster is unused), a tag and the SHA-256 of the layout
//! ([`LAYOUT_TAG`]): the table offsets alone do not change when a data cluster moves. It says
//! nothing the L2 tables do not (which clusters hold data), and qemu drops it if it ever
//! rewrites the header.
//!
//! Bytes past the source's end in its last cluster are encrypted zeros, so the file ends on a
//! whole cluster. The same layout written to a file (it is a [`Container`] too) is what the
//! tests check with qemu-img.
//!
//! # Memory
//!
//! The data ranges (at most [`crate::formats::scan::MAX_RANGES`]) and their extents, the list
//! of L2 tables in use (one `u64` per 512 MiB of virtual size), and one cluster at a time while
//! the metadata is produced: nothing else grows with the image.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use super::{
    check_sizes, div_ceil, fill_refcount_block, header_bytes, refcount_clusters, HeaderFields,
    CLUSTER_BYTES, L2_SPAN, LUKS_OFFSET, OFLAG_COPIED, REFTABLE_ENTRIES_PER_CLUSTER,
};
use crate::outputs::{Container, Extent, Payload};
use crate::{Error, Result};

/// What precedes the layout's SHA-256 in the header cluster, after the header extensions.
pub const LAYOUT_TAG: &[u8; 16] = b"imgcrypt-layout1";

/// Entries per L1 or L2 table cluster.
const ENTRIES_PER_CLUSTER: u64 = CLUSTER_BYTES / 8;

/// Where each part of the metadata starts, in clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    luks_clusters: u64,
    reftable: u64,
    reftable_clusters: u64,
    refblocks: u64,
    refblock_count: u64,
    l1: u64,
    l1_clusters: u64,
    l2: u64,
    data: u64,
    data_clusters: u64,
}

impl Layout {
    fn total_clusters(&self) -> u64 {
        self.data + self.data_clusters
    }
}

/// A qcow2+LUKS image planned before the copy (see the module documentation).
#[derive(Debug)]
pub struct PlannedQcow2 {
    virtual_size: u64,
    luks_length: u64,
    l1_entries: u64,
    layout: Layout,
    /// The guest index (guest offset / 512 MiB) of each L2 table, in file order.
    tables: Vec<u64>,
    /// The data runs: whole clusters, sorted, apart, each contiguous in the file after the
    /// one before.
    extents: Vec<Extent>,
    /// SHA-256 of the virtual size, the LUKS header's length and the data runs.
    layout_digest: [u8; 32],
    /// The libcryptsetup-formatted LUKS1 header (a daemon-owned memfd), `luks_length` bytes.
    luks_header: File,
}

impl PlannedQcow2 {
    /// The image of a `virtual_size`-byte disk (rounded up to 512) whose data lies in `data`
    /// (sorted, disjoint guest ranges; each is widened to whole clusters), encrypted under the
    /// LUKS1 header in `luks_header` (`luks_length` bytes).
    pub fn new(
        virtual_size: u64,
        data: &[Range<u64>],
        luks_header: &File,
        luks_length: u64,
    ) -> Result<Self> {
        let virtual_size = check_sizes(virtual_size, luks_length)?;
        let disk_end = virtual_size.next_multiple_of(CLUSTER_BYTES);
        let mut ranges: Vec<Range<u64>> = Vec::with_capacity(data.len());
        for range in data {
            let start = range.start / CLUSTER_BYTES * CLUSTER_BYTES;
            let end = range
                .end
                .min(disk_end)
                .next_multiple_of(CLUSTER_BYTES)
                .min(disk_end);
            if start >= end {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if start < last.end => {
                    return Err(planning_error(format!(
                        "data range {range:?} is out of order or overlaps the one before"
                    )))
                }
                Some(last) if start == last.end => last.end = end,
                _ => ranges.push(start..end),
            }
        }
        let mut tables: Vec<u64> = Vec::new();
        for range in &ranges {
            for table in range.start / L2_SPAN..=(range.end - 1) / L2_SPAN {
                if tables.last() != Some(&table) {
                    tables.push(table);
                }
            }
        }
        let l1_entries = div_ceil(virtual_size, L2_SPAN);
        let luks_clusters = div_ceil(luks_length, CLUSTER_BYTES);
        let l1_clusters = div_ceil(l1_entries * 8, CLUSTER_BYTES).max(1);
        let data_clusters: u64 = ranges
            .iter()
            .map(|range| (range.end - range.start) / CLUSTER_BYTES)
            .sum();
        let others = 1 + luks_clusters + l1_clusters + tables.len() as u64 + data_clusters;
        let (refblock_count, reftable_clusters) = refcount_clusters(others);
        let reftable = 1 + luks_clusters;
        let refblocks = reftable + reftable_clusters;
        let l1 = refblocks + refblock_count;
        let l2 = l1 + l1_clusters;
        let layout = Layout {
            luks_clusters,
            reftable,
            reftable_clusters,
            refblocks,
            refblock_count,
            l1,
            l1_clusters,
            l2,
            data: l2 + tables.len() as u64,
            data_clusters,
        };
        let mut host = layout.data * CLUSTER_BYTES;
        let extents: Vec<Extent> = ranges
            .iter()
            .map(|range| {
                let extent = Extent {
                    guest_offset: range.start,
                    length: range.end - range.start,
                    output_offset: host,
                    first_iv: host / 512,
                };
                host += extent.length;
                extent
            })
            .collect();
        let mut digest = Sha256::new();
        digest.update(LAYOUT_TAG);
        digest.update(virtual_size.to_be_bytes());
        digest.update(luks_length.to_be_bytes());
        for extent in &extents {
            digest.update(extent.guest_offset.to_be_bytes());
            digest.update(extent.length.to_be_bytes());
        }
        let luks_header = luks_header
            .try_clone()
            .map_err(|error| Error::io("duplicating the LUKS header's memfd", error))?;
        Ok(Self {
            virtual_size,
            luks_length,
            l1_entries,
            layout,
            tables,
            extents,
            layout_digest: digest.finalize().into(),
            luks_header,
        })
    }

    /// The guest disk's size in the header (the source's, rounded up to 512).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Where the LUKS header sits in the file (the crypto header extension's offset).
    pub fn luks_offset(&self) -> u64 {
        LUKS_OFFSET
    }

    /// Payload bytes stored: the data clusters.
    pub fn allocated_bytes(&self) -> u64 {
        self.layout.data_clusters * CLUSTER_BYTES
    }

    /// Bytes before the data: the header cluster, the LUKS header and the tables.
    pub fn metadata_bytes(&self) -> u64 {
        self.layout.data * CLUSTER_BYTES
    }

    /// Bytes a resume needs back to go on with this image: the header cluster (the layout) and
    /// the LUKS header (the volume key).
    pub fn resume_header_len(&self) -> u64 {
        (1 + self.layout.luks_clusters) * CLUSTER_BYTES
    }

    /// The header cluster as it is in the file: the header and its extensions, the layout's
    /// tag and digest, zeros after them.
    pub fn header_cluster(&self) -> Vec<u8> {
        let mut cluster = header_bytes(&HeaderFields {
            virtual_size: self.virtual_size,
            l1_entries: self.l1_entries,
            l1_offset: self.layout.l1 * CLUSTER_BYTES,
            reftable_offset: self.layout.reftable * CLUSTER_BYTES,
            reftable_clusters: self.layout.reftable_clusters,
            luks_length: self.luks_length,
        });
        cluster.extend_from_slice(LAYOUT_TAG);
        cluster.extend_from_slice(&self.layout_digest);
        cluster.resize(CLUSTER_BYTES as usize, 0);
        cluster
    }

    /// The data runs, in file order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The guest byte whose ciphertext is at file offset `offset`, or `None` when `offset` is
    /// not in the data: where a stream resumed at `offset` starts its copy.
    pub fn guest_at(&self, offset: u64) -> Option<u64> {
        let index = self
            .extents
            .partition_point(|extent| extent.output_offset + extent.length <= offset);
        let extent = self.extents.get(index)?;
        (extent.output_offset <= offset)
            .then(|| extent.guest_offset + offset - extent.output_offset)
    }

    /// Passes the metadata from file offset `from` to the data's start to `sink`, one cluster
    /// (or the rest of one) at a time, in file order.
    pub fn send_metadata(
        &self,
        from: u64,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut cluster = vec![0u8; CLUSTER_BYTES as usize];
        for index in from / CLUSTER_BYTES..self.layout.data {
            self.fill_metadata_cluster(index, &mut cluster)?;
            let offset = index * CLUSTER_BYTES;
            let skip = from.saturating_sub(offset) as usize;
            sink(offset + skip as u64, &cluster[skip..])?;
        }
        Ok(())
    }

    /// Fills `cluster` with metadata cluster `index` (below the data's first cluster).
    fn fill_metadata_cluster(&self, index: u64, cluster: &mut [u8]) -> Result<()> {
        let layout = &self.layout;
        cluster.fill(0);
        if index == 0 {
            let header = self.header_cluster();
            cluster.copy_from_slice(&header);
        } else if index < layout.reftable {
            let at = (index - 1) * CLUSTER_BYTES;
            let len = self.luks_length.saturating_sub(at).min(CLUSTER_BYTES) as usize;
            self.luks_header
                .read_exact_at(&mut cluster[..len], at)
                .map_err(|error| {
                    Error::io(format!("reading the LUKS header's memfd at {at}"), error)
                })?;
        } else if index < layout.refblocks {
            let first = (index - layout.reftable) * REFTABLE_ENTRIES_PER_CLUSTER;
            for (slot, entry) in cluster.chunks_exact_mut(8).enumerate() {
                let block = first + slot as u64;
                if block < layout.refblock_count {
                    let at = (layout.refblocks + block) * CLUSTER_BYTES;
                    entry.copy_from_slice(&at.to_be_bytes());
                }
            }
        } else if index < layout.l1 {
            fill_refcount_block(cluster, index - layout.refblocks, layout.total_clusters());
        } else if index < layout.l2 {
            let first = (index - layout.l1) * ENTRIES_PER_CLUSTER;
            for (slot, entry) in cluster.chunks_exact_mut(8).enumerate() {
                let table = first + slot as u64;
                if table >= self.l1_entries {
                    break;
                }
                if let Ok(position) = self.tables.binary_search(&table) {
                    let at = (layout.l2 + position as u64) * CLUSTER_BYTES;
                    entry.copy_from_slice(&(at | OFLAG_COPIED).to_be_bytes());
                }
            }
        } else {
            self.fill_l2_table(self.tables[(index - layout.l2) as usize], cluster);
        }
        Ok(())
    }

    /// Fills `cluster` with the L2 table of guest span `table`: every data cluster there.
    fn fill_l2_table(&self, table: u64, cluster: &mut [u8]) {
        let span = table * L2_SPAN..(table + 1) * L2_SPAN;
        let first = self
            .extents
            .partition_point(|extent| extent.guest_end() <= span.start);
        for extent in self.extents[first..]
            .iter()
            .take_while(|extent| extent.guest_offset < span.end)
        {
            let start = extent.guest_offset.max(span.start);
            let end = extent.guest_end().min(span.end);
            for guest in (start..end).step_by(CLUSTER_BYTES as usize) {
                let host = extent.output_offset + (guest - extent.guest_offset);
                let slot = ((guest - span.start) / CLUSTER_BYTES * 8) as usize;
                cluster[slot..slot + 8].copy_from_slice(&(host | OFLAG_COPIED).to_be_bytes());
            }
        }
    }
}

fn planning_error(message: String) -> Error {
    Error::io(
        "planning the streamed qcow2 output",
        std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
    )
}

impl Container for PlannedQcow2 {
    fn payload(&self) -> Payload<'_> {
        Payload::Planned(&self.extents)
    }

    fn output_size(&self) -> u64 {
        self.layout.total_clusters() * CLUSTER_BYTES
    }

    /// Writes the tables and the LUKS header, makes them durable, then the header cluster:
    /// the file writer's order, so an interrupted write never leaves a valid-looking image.
    fn write_metadata(&self, output: &File) -> Result<()> {
        let write = |offset: u64, bytes: &[u8]| {
            output.write_all_at(bytes, offset).map_err(|error| {
                Error::io(
                    format!(
                        "writing the qcow2 metadata ({} bytes at offset {offset}) to the output",
                        bytes.len()
                    ),
                    error,
                )
            })
        };
        output
            .set_len(self.output_size())
            .map_err(|error| Error::io("sizing the qcow2 output", error))?;
        self.send_metadata(CLUSTER_BYTES, &mut |offset, bytes| write(offset, bytes))?;
        output
            .sync_data()
            .map_err(|error| Error::io("fdatasync on the output before the qcow2 header", error))?;
        write(0, &self.header_cluster())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::engines::xts::IvMode;
    use crate::engines::{Engine, PayloadJob};
    use crate::formats::qcow2::test_images::{
        image_opts, qemu_raw_encrypted, secret_object, sparse_source, temp_with, MIB,
    };
    use crate::formats::scan::nonzero_ranges;
    use crate::keys::SecretBytes;
    use crate::outputs::qcow2::tests::{awkward_source, luks1_header, qemu_img, KEY_FILE};

    fn memfd_of(len: u64) -> File {
        let file = crate::sys::memfd::create("planned-qcow2-test").unwrap();
        file.set_len(len).unwrap();
        file
    }

    /// Plans and writes the image of `source` to a file through the userspace engine's planned
    /// copy, then its metadata; returns the plan and the file.
    fn write_planned(source: &tempfile::NamedTempFile) -> (PlannedQcow2, tempfile::NamedTempFile) {
        let opened = crate::formats::open(source.reopen().unwrap()).unwrap();
        let cancel = AtomicBool::new(false);
        let scan = nonzero_ranges(opened.as_ref(), CLUSTER_BYTES, &|_, _| {}, &cancel).unwrap();
        let volume_key = SecretBytes::random(64).unwrap();
        let header = luks1_header(&volume_key);
        let plan = PlannedQcow2::new(
            opened.virtual_size(),
            &scan.ranges,
            &header.image,
            header.data_offset,
        )
        .unwrap();
        crate::outputs::check_extents(plan.extents(), 512, plan.output_size()).unwrap();
        let output = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        let engine = crate::engines::userspace::UserspaceEngine::with_config(3, 1 << 20).unwrap();
        engine
            .write_payload(&PayloadJob {
                job_id: 0,
                source: opened.as_ref(),
                output: output.as_file(),
                extents: plan.extents(),
                sector_size: 512,
                key: volume_key.as_bytes(),
                iv: IvMode::Plain64,
                progress: &|_| {},
                cancel: &cancel,
            })
            .unwrap();
        plan.write_metadata(output.as_file()).unwrap();
        assert_eq!(
            output.as_file().metadata().unwrap().len(),
            plan.output_size()
        );
        (plan, output)
    }

    #[test]
    fn qemu_img_accepts_checks_and_decrypts_the_planned_layout() {
        // The file writer's awkward source, with 4 MiB of written zeros (allocated, no data).
        let source = awkward_source();
        source
            .as_file()
            .write_all_at(&vec![0u8; 4 << 20], 200 * MIB)
            .unwrap();
        let (plan, output) = write_planned(&source);
        // Clusters: 1 (first), 6 (across the boundary), 1 (scrap), 1 (last); two L2 tables.
        assert_eq!(plan.allocated_bytes(), 9 * CLUSTER_BYTES);
        assert_eq!(plan.tables, vec![0, 1]);
        assert_eq!(plan.extents().len(), 4);
        let key = temp_with(KEY_FILE);
        let object = secret_object(key.path());
        let opts = image_opts(output.path());
        let check = qemu_img(&["check", "--object", &object, "--image-opts", &opts]);
        let text = String::from_utf8_lossy(&check.stdout).to_string();
        assert!(check.status.success(), "qemu-img check: {check:?}");
        assert!(text.contains("No errors were found"), "{text}");
        let plaintext = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        qemu_raw_encrypted(&object, &opts, plaintext.path());
        let expected = std::fs::read(source.path()).unwrap();
        let got = std::fs::read(plaintext.path()).unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "qemu's plaintext differs from the source");
        // Only the data clusters are mapped: qemu sees the written zeros as unallocated.
        let map = qemu_img(&[
            "map",
            "--output=json",
            "--object",
            &object,
            "--image-opts",
            &opts,
        ]);
        let map = String::from_utf8_lossy(&map.stdout).to_string();
        let data_bytes: u64 = serde_json::from_str::<Vec<serde_json::Value>>(&map)
            .unwrap()
            .iter()
            .filter(|entry| entry["data"] == true)
            .map(|entry| entry["length"].as_u64().unwrap())
            .sum();
        assert_eq!(
            data_bytes,
            9 * CLUSTER_BYTES - (CLUSTER_BYTES - 3 * 512 % CLUSTER_BYTES)
        );
    }

    #[test]
    fn metadata_sent_from_any_offset_is_the_same_bytes() {
        let source = sparse_source(64 * MIB, &[(3 * MIB, 5000), (40 * MIB, 2 * MIB)]);
        let (plan, output) = write_planned(&source);
        let written = std::fs::read(output.path()).unwrap();
        let metadata = plan.metadata_bytes() as usize;
        for from in [
            0u64,
            4096,
            CLUSTER_BYTES,
            CLUSTER_BYTES + 8192,
            plan.metadata_bytes() - 4096,
        ] {
            let mut sent = Vec::new();
            let mut next = from;
            plan.send_metadata(from, &mut |offset, bytes| {
                assert_eq!(offset, next);
                next += bytes.len() as u64;
                sent.extend_from_slice(bytes);
                Ok(())
            })
            .unwrap();
            assert_eq!(next, plan.metadata_bytes());
            assert!(sent == written[from as usize..metadata], "from {from}");
        }
        assert_eq!(
            &written[..CLUSTER_BYTES as usize],
            &plan.header_cluster()[..]
        );
        // The data follows the metadata with no gap, run after run.
        assert_eq!(plan.extents()[0].output_offset, plan.metadata_bytes());
        for pair in plan.extents().windows(2) {
            assert_eq!(
                pair[0].output_offset + pair[0].length,
                pair[1].output_offset
            );
        }
        let last = plan.extents().last().unwrap();
        assert_eq!(last.output_offset + last.length, plan.output_size());
        assert_eq!(plan.guest_at(plan.metadata_bytes()), Some(3 * MIB));
        assert_eq!(
            plan.guest_at(plan.metadata_bytes() + CLUSTER_BYTES),
            Some(40 * MIB)
        );
        assert_eq!(plan.guest_at(plan.metadata_bytes() - 1), None);
        assert_eq!(plan.guest_at(plan.output_size()), None);
    }

    #[test]
    fn a_one_tib_disk_full_of_data_plans_small_metadata_in_bounded_memory() {
        let luks = memfd_of(2 << 20);
        let size = 1u64 << 40;
        let plan =
            PlannedQcow2::new(size, std::slice::from_ref(&(0..size)), &luks, 2 << 20).unwrap();
        let layout = plan.layout;
        assert_eq!(plan.extents().len(), 1);
        assert_eq!(plan.tables.len(), 2048);
        assert_eq!(layout.data_clusters, size / CLUSTER_BYTES);
        // Every cluster is counted by a refcount block, and the table covers every block.
        assert!(layout.refblock_count * (CLUSTER_BYTES * 8 / 16) >= layout.total_clusters());
        assert!(layout.reftable_clusters * REFTABLE_ENTRIES_PER_CLUSTER >= layout.refblock_count);
        // 2 MiB LUKS, one reftable cluster, 513 refcount blocks (16-bit counts for 2^24 + 2596
        // clusters), one L1 cluster, 2048 L2 tables (128 MiB).
        assert_eq!(
            plan.metadata_bytes(),
            (1 + 32 + 1 + 513 + 1 + 2048) * CLUSTER_BYTES
        );
        assert_eq!(plan.output_size(), plan.metadata_bytes() + size);
        // The last L2 table's last entry is the disk's last cluster, at the file's end.
        let mut cluster = vec![0u8; CLUSTER_BYTES as usize];
        plan.fill_l2_table(2047, &mut cluster);
        let last = u64::from_be_bytes(cluster[cluster.len() - 8..].try_into().unwrap());
        assert_eq!(last, (plan.output_size() - CLUSTER_BYTES) | OFLAG_COPIED);
    }

    #[test]
    fn the_header_cluster_changes_when_any_data_cluster_moves() {
        let luks = memfd_of(2 << 20);
        let plan = |data: &[Range<u64>]| {
            PlannedQcow2::new(64 * MIB, data, &luks, 2 << 20)
                .unwrap()
                .header_cluster()
        };
        let base = plan(&[MIB..2 * MIB, 8 * MIB..9 * MIB]);
        assert_eq!(base, plan(&[MIB..2 * MIB, 8 * MIB..9 * MIB]));
        // The same number of clusters (so the same table offsets), placed elsewhere.
        assert_ne!(base, plan(&[MIB..2 * MIB, 10 * MIB..11 * MIB]));
        assert_ne!(
            base,
            plan(&[MIB..2 * MIB, 8 * MIB..9 * MIB + CLUSTER_BYTES])
        );
        let tag_at = base
            .windows(LAYOUT_TAG.len())
            .position(|window| window == LAYOUT_TAG)
            .unwrap();
        // After the header extensions' end marker (type 0, length 0).
        assert_eq!(&base[tag_at - 8..tag_at], &[0u8; 8]);
    }

    #[test]
    fn ranges_out_of_order_are_a_planning_error_and_sizes_are_checked() {
        let luks = memfd_of(2 << 20);
        let error = PlannedQcow2::new(8 * MIB, &[4 * MIB..5 * MIB, MIB..2 * MIB], &luks, 2 << 20)
            .unwrap_err();
        assert!(error.to_string().contains("out of order"), "{error}");
        assert!(PlannedQcow2::new(65 << 40, &[], &luks, 2 << 20).is_err());
        let empty = PlannedQcow2::new(8 * MIB, &[], &luks, 2 << 20).unwrap();
        assert_eq!(empty.allocated_bytes(), 0);
        assert_eq!(empty.output_size(), empty.metadata_bytes());
    }
}
