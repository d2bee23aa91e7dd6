//! Output containers, one module per format: where each run of the encrypted payload goes in
//! the output file, under which IV, and the metadata written around it.
//!
//! Data flows one way. A source format ([`crate::formats`]) says where the guest's bytes are;
//! an output format says where they go in the file and under which IV; the one shared pipeline
//! ([`crate::engines`]) reads, encrypts and writes them; the container then writes its
//! metadata ([`Container::write_metadata`]), with the bytes that make the file a valid image
//! last, so an interrupted job never leaves a file a reader accepts. A new output format is a
//! new module here, never a new copy loop.
//!
//! An output says where the bytes go in one of two ways ([`Payload`]):
//! - **planned**: a list of [`Extent`]s (guest bytes → file offset and IV) fixed before the
//!   copy. Raw LUKS: one extent, every sector written whatever it holds.
//! - **allocated**: an [`Allocator`] that places guest runs as the copy reaches them. The sparse
//!   containers (qcow2, VHD) store only the granules (a qcow2 cluster, a VHD block) that hold a
//!   non-zero byte, and which those are is known only once the bytes are read. The pipeline
//!   walks the source's allocated ranges cut into granule-aligned chunks ([`granule_runs`]); a
//!   worker reads a chunk, drops its all-zero granules, and asks the allocator to place the
//!   rest, in guest order (chunk *i* is placed after chunk *i − 1*, so the file is laid out in
//!   guest order and the same source always gives the same file); the allocator answers with
//!   extents, whose IVs may depend on the placement (qcow2's IV is the host offset), and the
//!   worker encrypts and writes the buffer it already holds. Every source byte is read once.
//!
//! - [`luks`]: raw LUKS, the whole payload as one extent after the header (dm-crypt's layout);
//! - [`qcow2`]: qcow2 v3 with qemu's LUKS encryption (IBM Cloud VPC, OpenStack);
//! - [`vhd`]: a dynamic VHD encrypted the way blktap's `vhd-util copy -k` does (IBM Cloud
//!   classic).

pub mod luks;
pub mod qcow2;
pub mod vhd;

use std::fs::File;
use std::ops::Range;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::{Error, Result};

/// One run of the payload: guest bytes and where their ciphertext lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest (virtual-disk) byte of the run; a multiple of the encryption sector size.
    pub guest_offset: u64,
    /// Bytes in the run; a multiple of the sector size. Bytes past the source's end are
    /// encrypted zeros.
    pub length: u64,
    /// Where `guest_offset`'s ciphertext goes in the output file. When every extent's offset
    /// and length are multiples of 4096 the pipeline writes with O_DIRECT; otherwise through
    /// the page cache.
    pub output_offset: u64,
    /// IV of the run's first 512 bytes; it grows by one per 512 bytes (dm-crypt's rule).
    pub first_iv: u64,
}

impl Extent {
    /// The guest byte just past the run.
    pub fn guest_end(&self) -> u64 {
        self.guest_offset + self.length
    }
}

/// How an output says where its payload goes (see the module documentation).
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    /// Fixed before the copy: sorted by guest offset, disjoint.
    Planned(&'a [Extent]),
    /// Placed during the copy, granule by granule, skipping all-zero granules.
    Allocated(&'a dyn Allocator),
}

/// A sparse output that places the payload as the pipeline reads it.
///
/// The pipeline calls [`Allocator::place`] from one worker at a time, in ascending guest
/// order, with runs that do not overlap; the allocator keeps its own state behind a lock.
pub trait Allocator: Send + Sync {
    /// The allocation unit: a power of two, at least 4096. A granule whose bytes are all zero
    /// is not stored (readers see zeros there).
    fn granule(&self) -> u64;

    /// Guest bytes below this are the payload: the output's virtual size, rounded up to 4096
    /// so that every write suits O_DIRECT (bytes past the source's end are encrypted zeros).
    fn payload_end(&self) -> u64;

    /// Places the guest run `run` (starting on a granule boundary, ending on one or at
    /// [`Self::payload_end`]) and appends to `placed` the extents that hold it, in guest
    /// order, each starting and ending on 4096-byte boundaries of the file. May reserve space
    /// in `output` and write metadata that is complete by then (qcow2's finished L2 tables),
    /// never anything that makes the file look like a valid image.
    fn place(&self, run: Range<u64>, output: &File, placed: &mut Vec<Extent>) -> Result<()>;
}

/// The granule-aligned guest runs a sparse copy goes through: each of `allocated` (sorted,
/// disjoint) widened to whole `granule`s, clipped to `end`, overlaps and contacts merged. Their
/// total is the copy's progress total; holes between them are never read.
pub fn granule_runs(
    allocated: &[Range<u64>],
    granule: u64,
    end: u64,
) -> impl Iterator<Item = Range<u64>> + '_ {
    let mut ranges = allocated.iter().peekable();
    std::iter::from_fn(move || {
        let mut run: Option<Range<u64>> = None;
        while let Some(range) = ranges.peek() {
            if range.is_empty() {
                ranges.next();
                continue;
            }
            let start = (range.start / granule * granule).min(end);
            let stop = range.end.div_ceil(granule).saturating_mul(granule).min(end);
            let start = match &run {
                Some(current) if start <= current.end => current.end.max(start),
                Some(_) => break,
                None => start,
            };
            ranges.next();
            if start >= stop {
                continue;
            }
            match &mut run {
                Some(current) => current.end = current.end.max(stop),
                None => run = Some(start..stop),
            }
        }
        run
    })
}

/// What an output format tells the shared pipeline.
pub trait Container: Send + Sync {
    /// Where the payload goes.
    fn payload(&self) -> Payload<'_>;

    /// The output file's final length. Container outputs are sparse: what no extent or
    /// metadata covers stays a hole. An allocated output knows it only once the payload is
    /// placed.
    fn output_size(&self) -> u64;

    /// Writes everything that is not payload. Called after the whole payload is written and
    /// before `fdatasync`; the bytes that make the file look like a valid image go last.
    fn write_metadata(&self, output: &File) -> Result<()>;
}

/// Checks the invariants every container promises, so a planning bug surfaces as an error
/// rather than as a corrupt image: extents sorted, disjoint in the guest and in the file,
/// sector-aligned, inside `output_size`.
pub fn check_extents(extents: &[Extent], sector_size: u64, output_size: u64) -> Result<()> {
    let problem = |message: String| {
        Err(crate::Error::io(
            "planning the output",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
        ))
    };
    for extent in extents {
        if extent.guest_offset % sector_size != 0 || extent.length % sector_size != 0 {
            return problem(format!(
                "extent {extent:?} is not aligned to the {sector_size}-byte sector"
            ));
        }
        let end = extent.output_offset.checked_add(extent.length);
        if end.is_none_or(|end| end > output_size) || extent.length == 0 {
            return problem(format!(
                "extent {extent:?} is empty or ends past the {output_size}-byte output"
            ));
        }
    }
    for pair in extents.windows(2) {
        if pair[0].guest_end() > pair[1].guest_offset {
            return problem(format!(
                "extents {:?} and {:?} overlap or are out of order",
                pair[0], pair[1]
            ));
        }
    }
    let mut by_file: Vec<(u64, u64)> = extents
        .iter()
        .map(|e| (e.output_offset, e.output_offset + e.length))
        .collect();
    by_file.sort_unstable();
    if by_file.windows(2).any(|pair| pair[0].1 > pair[1].0) {
        return problem("two extents overlap in the output file".to_string());
    }
    Ok(())
}

/// `fallocate`s `length` bytes at `offset` of `file` (growing it); ENOSPC is the no-space
/// error at once, with `required` the bytes the output needs as far as known.
pub fn reserve(file: &File, offset: u64, length: u64, required: u64) -> Result<()> {
    let (Ok(at), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
        return Err(no_space(required, None));
    };
    match fallocate(file, FallocateFlags::empty(), at, len) {
        Ok(()) => Ok(()),
        Err(Errno::ENOSPC) | Err(Errno::EDQUOT) => Err(no_space(required, None)),
        // Filesystems without fallocate still work; ENOSPC then surfaces on write.
        Err(Errno::EOPNOTSUPP) => Ok(()),
        Err(errno) => Err(Error::io(
            "reserving space for the output (fallocate)",
            errno,
        )),
    }
}

/// How far ahead of its placements a sparse output reserves space. `fallocate` waits for every
/// O_DIRECT write in flight on the file (ext4's `inode_dio_wait`), so reserving each 4 MiB chunk
/// as it was placed drained the write queue once per chunk: the copy of all-data sources ran
/// at 1.27× the planned copy (`examples/sparse_copy_throughput`, 2 GiB, medians of 3). One
/// reservation per 256 MiB drains it once per 64 chunks.
pub const RESERVE_AHEAD: u64 = 256 << 20;

/// The space a sparse output has reserved so far: placements reserve [`RESERVE_AHEAD`] at a
/// time. What is reserved past the last placement grows the file; the container cuts the file
/// to its [`Container::output_size`] ([`ReservedSpace::cut`]) before it writes its metadata.
#[derive(Debug, Default)]
pub struct ReservedSpace {
    end: u64,
}

impl ReservedSpace {
    /// Makes sure `file` has space up to `end`, reserving ahead when it must reserve at all.
    /// On a filesystem too full for the step ahead, it reserves just up to `end`, so the
    /// reach never fails an image that fits.
    pub fn cover(&mut self, file: &File, end: u64, required: u64) -> Result<()> {
        if end <= self.end {
            return Ok(());
        }
        let ahead = end.max(self.end.saturating_add(RESERVE_AHEAD));
        match reserve(file, self.end, ahead - self.end, required) {
            Ok(()) => self.end = ahead,
            Err(crate::Error::NoSpace { .. }) if ahead > end => {
                reserve(file, self.end, end - self.end, required)?;
                self.end = end;
            }
            Err(error) => return Err(error),
        }
        Ok(())
    }

    /// Cuts `file` to `size`, dropping what was reserved past the container's end; the
    /// containers call it first in [`Container::write_metadata`], since a reader finds a VHD's
    /// footer at the file's end.
    pub fn cut(file: &File, size: u64) -> Result<()> {
        file.set_len(size)
            .map_err(|e| crate::Error::io(format!("cutting the output to its {size} bytes"), e))
    }
}

/// The no-space error for an output that needs `required` bytes (on a device of
/// `device_size`, if it is one).
pub fn no_space(required: u64, device_size: Option<u64>) -> Error {
    let message = match device_size {
        Some(size) => format!(
            "the output device holds {size} bytes but the encrypted image needs {required} \
             bytes: use a larger device"
        ),
        None => format!(
            "not enough space for the output: the encrypted image needs {required} bytes \
             ({} MiB); free space or write it to another filesystem",
            required.div_ceil(1 << 20)
        ),
    };
    Error::NoSpace {
        required_bytes: required,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(guest_offset: u64, length: u64, output_offset: u64) -> Extent {
        Extent {
            guest_offset,
            length,
            output_offset,
            first_iv: 0,
        }
    }

    #[test]
    fn planning_bugs_are_caught() {
        let good = [extent(0, 4096, 8192), extent(8192, 512, 4096)];
        check_extents(&good, 512, 16384).unwrap();
        // Out of guest order, overlapping in the guest, in the file, unaligned, past the end.
        assert!(check_extents(&[good[1], good[0]], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 4096, 0), extent(512, 512, 8192)], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 4096, 0), extent(4096, 512, 1024)], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 1000, 0)], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 4096, 16000)], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 0, 0)], 512, 16384).is_err());
    }

    #[test]
    fn granule_runs_widen_merge_and_clip() {
        const K: u64 = 1024;
        let runs = |allocated: &[Range<u64>], end: u64| {
            granule_runs(allocated, 64 * K, end).collect::<Vec<_>>()
        };
        // Widened to whole granules; ranges sharing or touching a granule merge; a gap of a
        // whole granule does not.
        assert_eq!(
            runs(&[100..200, 65 * K..70 * K, 200 * K..300 * K], 1 << 30),
            vec![0..128 * K, 192 * K..320 * K]
        );
        // Clipped to the end, which need not be a granule boundary; past it nothing.
        assert_eq!(runs(&[0..K, 100 * K..10 << 20], 132 * K), vec![0..132 * K]);
        let past_the_end = 200 * K..300 * K;
        assert_eq!(
            runs(std::slice::from_ref(&past_the_end), 132 * K),
            Vec::<Range<u64>>::new()
        );
        assert_eq!(runs(&[], 1 << 30), Vec::<Range<u64>>::new());
        // Empty ranges count for nothing.
        assert_eq!(
            runs(&[5..5, 70 * K..70 * K], 1 << 30),
            Vec::<Range<u64>>::new()
        );
    }

    #[test]
    fn reserved_space_reaches_ahead_once_and_is_cut_to_the_container() {
        use std::os::unix::fs::MetadataExt;
        let file = tempfile::tempfile_in("/var/tmp").unwrap();
        let mut reserved = ReservedSpace::default();
        reserved.cover(&file, 4 << 20, 4 << 20).unwrap();
        // One reservation reaches RESERVE_AHEAD past the start, not just the 4 MiB asked for.
        assert_eq!(file.metadata().unwrap().len(), RESERVE_AHEAD);
        let blocks = file.metadata().unwrap().blocks();
        assert!(blocks * 512 >= RESERVE_AHEAD, "{blocks} blocks reserved");
        // Placements inside it reserve nothing more; one past it reaches ahead again.
        reserved.cover(&file, RESERVE_AHEAD - 4096, 0).unwrap();
        assert_eq!(file.metadata().unwrap().len(), RESERVE_AHEAD);
        reserved.cover(&file, RESERVE_AHEAD + 4096, 0).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 2 * RESERVE_AHEAD);
        // The container's end drops the rest, blocks included.
        ReservedSpace::cut(&file, (4 << 20) + 512).unwrap();
        let metadata = file.metadata().unwrap();
        assert_eq!(metadata.len(), (4 << 20) + 512);
        assert!(
            metadata.blocks() * 512 < (8 << 20),
            "{} blocks kept",
            metadata.blocks()
        );
    }

    #[test]
    fn on_a_nearly_full_filesystem_it_reserves_just_what_is_placed() {
        // A 64 MiB tmpfs (tmpfs has fallocate): the 256 MiB step cannot fit, the placement can.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "mounting a tmpfs (the tests run as root)"
        );
        let result = std::panic::catch_unwind(|| {
            let file = File::create(dir.path().join("out")).unwrap();
            let mut reserved = ReservedSpace::default();
            reserved.cover(&file, 8 << 20, 8 << 20).unwrap();
            assert_eq!(file.metadata().unwrap().len(), 8 << 20);
            let full = reserved.cover(&file, 80 << 20, 80 << 20).unwrap_err();
            assert!(
                matches!(full, crate::Error::NoSpace { .. }),
                "{full:?} is not the no-space error"
            );
        });
        let _ = std::process::Command::new("umount")
            .arg(dir.path())
            .status();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}
