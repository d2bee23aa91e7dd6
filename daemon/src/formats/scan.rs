//! The zero check: whether a granule of the source holds a non-zero byte.
//!
//! A source's [`super::SourceImage::allocated_ranges`] says where bytes *may* be non-zero: a
//! raw file's extents, a VHD's allocated blocks. A raw image written by `dd` has no holes, so a
//! 100 GiB disk holding 1.3 GiB of data reports 100 GiB allocated, and a sparse container
//! storing all of it would hold 100 GiB of encrypted zeros where `qemu-img convert -O qcow2`
//! stores about 1.3 GiB (qemu skips zero clusters). The sparse outputs therefore store only the
//! *granules* (their allocation unit: a qcow2 cluster, a VHD block) of the allocated ranges
//! that hold a non-zero byte; zeros inside a kept granule are stored (and encrypted) like any
//! other bytes. Raw LUKS has no check: it writes every sector of the payload whatever it holds.
//!
//! # Where it runs
//!
//! In the copy ([`crate::engines::userspace`]) for a file output: each worker checks the
//! granules of the chunk it has just read, before encrypting it in place, and the output places
//! only the granules with data ([`crate::outputs::Allocator`]). Every allocated byte is read
//! once.
//!
//! Before the copy, as a pass of its own ([`nonzero_ranges`]), for a **streamed** qcow2
//! (`imgctl encrypt --format qcow2 --upload`): a stream cannot seek back, so its L1, L2 and
//! refcount tables go out before the data ([`crate::outputs::qcow2::planned`]), and they can
//! only be written once every data cluster is known. That costs one more read of the
//! allocated bytes (holes are never read), against an upload that runs at network speed: a
//! 1 GiB source is scanned in under a second here, and uploaded in ten. The result never holds
//! more than [`MAX_RANGES`] ranges whatever the pattern: when the list would pass the cap, the
//! granule doubles (the ranges found so far are widened to it and merged) as many times as it
//! takes to halve the list. A coarser granule keeps every non-zero byte and only stores more
//! zeros; [`Scan::granule`] says what was used. With 64 KiB granules, no source below 32 GiB
//! can reach the cap.
//!
//! Until 2026-12-03 the check was a separate scan before the copy, which read every allocated
//! byte once more: with O_DIRECT source reads the copy read it from the disk again, so a 2 GiB
//! dynamic VHD with 0.8 GiB of data spent 0.81 s scanning before a 1.6 s copy. The check itself
//! costs far less than the read: it ORs 4 KiB blocks of 128-bit words, and a granule with data
//! usually stops at its first word (the scan read from the page cache at about 6–8 GB/s on the
//! 2-core VM, 4–5 times the disk's speed, most of it the copy out of the cache).
//!
//! Measured after the change (2026-12-03, release builds of both versions side by side, two
//! daemons, `imgctl encrypt` of a 2 GiB dynamic VHD with 820 MiB of scattered data, caches
//! dropped before every job, the order alternated per round, medians of 5 rounds, the machine
//! loaded by other builds, so the absolute figures are noisy): the daemon's `rchar` for the job
//! went from 1644 MiB to 824 MiB for `--format qcow2` and from 1640 MiB to 820 MiB for
//! `--format vhd`; the whole job from 3.32 s to 2.81 s (qcow2, `--pbkdf pbkdf2 --iter-time
//! 10`) and from 3.41 s to 2.84 s (VHD). The old scan's own time in those runs was 1.1–2.0 s;
//! the copy now takes longer than the old copy (2.7 s against 1.8 s) because it does the
//! reading the scan used to do, but less than scan and copy together. Part of that was the
//! reservation, not the reading: `fallocate` per placed chunk drained the O_DIRECT writes in
//! flight each time, and `examples/sparse_copy_throughput` (2 GiB of non-zero data, medians of
//! 3, a quiet machine) put the sparse copy at 1.27× the planned copy; reserving 256 MiB ahead
//! ([`crate::outputs::ReservedSpace`]) brought it to 1.03×.
//!
//! # What it reveals
//!
//! Nothing beyond what allocation already did: the output shows which granules the guest reads
//! as non-zero, where without the check it would show which granules the source had allocated
//! (a superset). The encrypted bytes say nothing about the zeros inside a kept granule.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use super::SourceImage;
use crate::sys::aligned::AlignedBuffer;
use crate::{Error, Result};

/// Read size: the engine's chunk and `dd bs=4M`'s, large enough that the device sees long
/// sequential requests, small enough that cancelling waits for at most one read (a few ms).
pub const BUFFER_BYTES: usize = 4 << 20;

/// Most ranges a scan returns: 256 Ki ranges are 4 MiB here and 8 MiB of qcow2 extents, well
/// inside the daemon's memory budget.
pub const MAX_RANGES: usize = 1 << 18;

/// Smallest granule accepted: one 512-byte sector.
const MIN_GRANULE: u64 = 512;

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Guest ranges whose granules hold a non-zero byte: sorted, disjoint, non-adjacent, each
    /// starting on a granule boundary and ending on one (or at the virtual size).
    pub ranges: Vec<Range<u64>>,
    /// The granule the ranges are aligned to: the one asked for, or a power-of-two multiple of
    /// it when the ranges had to be coarsened to stay under [`MAX_RANGES`].
    pub granule: u64,
    /// Bytes of the source read.
    pub scanned_bytes: u64,
}

impl Scan {
    /// Guest bytes in [`Self::ranges`].
    pub fn data_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .map(|range| range.end - range.start)
            .sum()
    }
}

/// Reads `image`'s allocated ranges and returns the `granule`-aligned ranges holding any
/// non-zero byte (see the module documentation).
///
/// `granule` is the container's allocation unit: a power of two of at least 512 bytes.
/// `progress` is called with `(bytes read, bytes to read)` after every read; `cancel` is
/// checked before every read and stops the scan with [`Error::Cancelled`].
pub fn nonzero_ranges(
    image: &dyn SourceImage,
    granule: u64,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
) -> Result<Scan> {
    scan(image, granule, MAX_RANGES, BUFFER_BYTES, progress, cancel)
}

/// [`nonzero_ranges`] with the limits as parameters, so the tests can reach them cheaply.
fn scan(
    image: &dyn SourceImage,
    granule: u64,
    max_ranges: usize,
    buffer_bytes: usize,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
) -> Result<Scan> {
    if granule < MIN_GRANULE || !granule.is_power_of_two() || max_ranges < 2 {
        return Err(Error::io(
            "scanning the source for data",
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the granule ({granule} bytes) must be a power of two of at least \
                     {MIN_GRANULE}, and the range cap ({max_ranges}) at least 2"
                ),
            ),
        ));
    }
    let size = image.virtual_size();
    let clipped = |range: &Range<u64>| range.start.min(size)..range.end.min(size);
    let total: u64 = image
        .allocated_ranges()
        .iter()
        .map(|range| clipped(range).end - clipped(range).start)
        .sum();
    let mut buffer = AlignedBuffer::new(buffer_bytes)?;
    let mut found = Found {
        ranges: Vec::new(),
        granule,
        max_ranges,
    };
    let mut done = 0u64;
    progress(0, total);
    for range in image.allocated_ranges() {
        let Range { start, end } = clipped(range);
        let mut position = start;
        while position < end {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            // A granule already known to hold data need not be read again (a range that
            // starts inside the granule where the previous one ended, or a coarsened granule).
            let covered = found.covered_end(position).min(end);
            if covered > position {
                done += covered - position;
                position = covered;
                continue;
            }
            let length = (end - position).min(buffer_bytes as u64) as usize;
            let chunk = &mut buffer.as_mut_slice()[..length];
            image.read_at(chunk, position)?;
            let chunk_end = position + length as u64;
            let mut at = position;
            while at < chunk_end {
                // Re-read per piece: a mark may have coarsened the granule.
                let granule = found.granule;
                let piece_end = (at / granule + 1).saturating_mul(granule).min(chunk_end);
                let piece = &chunk[(at - position) as usize..(piece_end - position) as usize];
                if found.covered_end(at) <= at && !is_zero(piece) {
                    found.mark(at);
                }
                at = piece_end;
            }
            done += length as u64;
            position = chunk_end;
            progress(done, total);
        }
    }
    let mut ranges = found.ranges;
    if let Some(last) = ranges.last_mut() {
        last.end = last.end.min(size);
    }
    Ok(Scan {
        ranges,
        granule: found.granule,
        scanned_bytes: done,
    })
}

/// The granules found so far, as granule-aligned ranges (the last may end past the virtual
/// size until the scan clips it).
struct Found {
    ranges: Vec<Range<u64>>,
    granule: u64,
    max_ranges: usize,
}

impl Found {
    /// Where the data already found around `offset` ends: past `offset` when `offset` lies in
    /// a granule already kept (scanning goes forward, so only the last range can hold it).
    fn covered_end(&self, offset: u64) -> u64 {
        match self.ranges.last() {
            Some(last) if last.start <= offset && offset < last.end => last.end,
            _ => 0,
        }
    }

    /// Keeps the granule holding `offset`, coarsening when the list passes the cap.
    fn mark(&mut self, offset: u64) {
        let start = offset / self.granule * self.granule;
        let end = start.saturating_add(self.granule);
        match self.ranges.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => self.ranges.push(start..end),
        }
        if self.ranges.len() > self.max_ranges {
            while self.ranges.len() > self.max_ranges / 2 {
                self.coarsen();
            }
            tracing::debug!(
                granule = self.granule,
                ranges = self.ranges.len(),
                "zero scan coarsened its granule to stay under its range cap"
            );
        }
    }

    /// Doubles the granule: widens every range to it and merges those that then touch.
    fn coarsen(&mut self) {
        let granule = self.granule.saturating_mul(2);
        self.granule = granule;
        let mut kept = 0usize;
        for index in 0..self.ranges.len() {
            let range = self.ranges[index].clone();
            let start = range.start / granule * granule;
            let end = range.end.div_ceil(granule).saturating_mul(granule);
            if kept > 0 && start <= self.ranges[kept - 1].end {
                let last = &mut self.ranges[kept - 1];
                last.end = last.end.max(end);
            } else {
                self.ranges[kept] = start..end;
                kept += 1;
            }
        }
        self.ranges.truncate(kept);
    }
}

/// Bytes per block of [`is_zero`]: the OR of a block vectorises; the early exit is per block.
const ZERO_CHECK_BLOCK: usize = 4096;

/// Whether every byte of `bytes` is zero, at memory speed: the aligned middle is read as
/// 128-bit words, ORed a block at a time, stopping at the first block holding a non-zero bit.
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid `u128`, and `align_to` only puts in the middle slice
    // properly aligned, in-bounds words of `bytes` (whose borrow it keeps).
    let (head, words, tail) = unsafe { bytes.align_to::<u128>() };
    head.iter().all(|&byte| byte == 0)
        && tail.iter().all(|&byte| byte == 0)
        && words
            .chunks(ZERO_CHECK_BLOCK / 16)
            .all(|block| block.iter().fold(0u128, |acc, &word| acc | word) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcrypt_proto::api::SourceFormat;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    const KIB: u64 = 1024;
    const MIB: u64 = 1 << 20;

    /// An in-memory source with chosen allocated ranges; counts the bytes read and can set a
    /// cancel flag after some reads.
    #[derive(Debug)]
    struct Memory {
        bytes: Vec<u8>,
        allocated: Vec<Range<u64>>,
        reads: Mutex<Vec<Range<u64>>>,
        cancel_after: Option<(usize, &'static AtomicBool)>,
        calls: AtomicUsize,
    }

    impl Memory {
        fn new(bytes: Vec<u8>, allocated: Vec<Range<u64>>) -> Self {
            Self {
                bytes,
                allocated,
                reads: Mutex::new(Vec::new()),
                cancel_after: None,
                calls: AtomicUsize::new(0),
            }
        }

        fn dense(bytes: Vec<u8>) -> Self {
            let all = 0..bytes.len() as u64;
            Self::new(bytes, vec![all])
        }
    }

    impl SourceImage for Memory {
        fn format(&self) -> SourceFormat {
            SourceFormat::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
            super::super::check_request(self.virtual_size(), offset, buffer.len())?;
            let start = offset as usize;
            buffer.copy_from_slice(&self.bytes[start..start + buffer.len()]);
            self.reads
                .lock()
                .unwrap()
                .push(offset..offset + buffer.len() as u64);
            let calls = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some((after, flag)) = self.cancel_after {
                if calls >= after {
                    flag.store(true, Ordering::Relaxed);
                }
            }
            Ok(())
        }
        fn allocated_ranges(&self) -> &[Range<u64>] {
            &self.allocated
        }
    }

    fn run(image: &Memory, granule: u64, max_ranges: usize, buffer: usize) -> Scan {
        let cancel = AtomicBool::new(false);
        scan(image, granule, max_ranges, buffer, &|_, _| {}, &cancel).unwrap()
    }

    /// What the scan must find, computed the slow, obvious way: every granule with a
    /// non-zero byte inside an allocated range, merged when adjacent.
    fn expected(image: &Memory, granule: u64) -> Vec<Range<u64>> {
        let size = image.bytes.len() as u64;
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for index in 0..size.div_ceil(granule) {
            let start = index * granule;
            let end = (start + granule).min(size);
            let data = (start..end).any(|offset| {
                image.bytes[offset as usize] != 0
                    && image.allocated.iter().any(|r| r.contains(&offset))
            });
            if !data {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => ranges.push(start..end),
            }
        }
        ranges
    }

    #[test]
    fn an_all_zero_source_has_no_data() {
        let image = Memory::dense(vec![0; (3 * MIB) as usize]);
        let found = run(&image, 64 * KIB, MAX_RANGES, 1 << 20);
        assert!(found.ranges.is_empty(), "{:?}", found.ranges);
        assert_eq!(found.scanned_bytes, 3 * MIB);
        assert_eq!(found.granule, 64 * KIB);
    }

    #[test]
    fn an_all_data_source_is_one_range() {
        let image = Memory::dense(vec![0xa5; (3 * MIB + 512) as usize]);
        let found = run(&image, 64 * KIB, MAX_RANGES, 1 << 20);
        assert_eq!(found.ranges, vec![0..3 * MIB + 512]);
        assert_eq!(found.data_bytes(), 3 * MIB + 512);
    }

    #[test]
    fn alternating_granules_are_found_one_by_one() {
        let mut bytes = vec![0u8; (4 * MIB) as usize];
        for cluster in (0..64).step_by(2) {
            let start = cluster * 64 * KIB as usize;
            bytes[start..start + 64 * KIB as usize].fill(0x11);
        }
        let image = Memory::dense(bytes);
        // A buffer that is not a multiple of the granule puts granules across reads.
        let found = run(&image, 64 * KIB, MAX_RANGES, 100_000);
        assert_eq!(found.ranges.len(), 32);
        assert_eq!(found.ranges, expected(&image, 64 * KIB));
        assert_eq!(found.ranges[1], 128 * KIB..192 * KIB);
    }

    #[test]
    fn data_at_the_very_end_of_an_odd_sized_source_is_kept() {
        let size = 5 * MIB + 12_345;
        let mut bytes = vec![0u8; size as usize];
        *bytes.last_mut().unwrap() = 1;
        let image = Memory::dense(bytes);
        let found = run(&image, 2 * MIB, MAX_RANGES, 1 << 20);
        assert_eq!(found.ranges, vec![4 * MIB..size]);
    }

    #[test]
    fn a_single_non_zero_byte_keeps_its_whole_granule() {
        let size = 2 * MIB;
        let granule = 64 * KIB;
        let mut bytes = vec![0u8; size as usize];
        // One byte in every granule, at a different place each time (first, last, middle...).
        for index in 0..size / granule {
            let within = (index * 4099) % granule;
            bytes[(index * granule + within) as usize] = 0x80;
        }
        let image = Memory::dense(bytes);
        assert_eq!(
            run(&image, granule, MAX_RANGES, 1 << 20).ranges,
            vec![0..size]
        );
        // Every other granule: the ones left hold no byte at all.
        let mut bytes = vec![0u8; size as usize];
        for index in (0..size / granule).step_by(2) {
            bytes[(index * granule + granule - 1) as usize] = 1;
        }
        let image = Memory::dense(bytes);
        let found = run(&image, granule, MAX_RANGES, 1 << 20);
        assert_eq!(found.ranges, expected(&image, granule));
        assert_eq!(found.ranges.len(), 16);
    }

    #[test]
    fn holes_are_never_read_and_their_bytes_never_count() {
        let granule = 64 * KIB;
        let mut bytes = vec![0u8; (8 * MIB) as usize];
        // Non-zero bytes outside the allocated ranges stand for what a hole would be: the
        // scan must not look there.
        bytes[(3 * MIB) as usize] = 9;
        bytes[(MIB + 100) as usize] = 7;
        let allocated = vec![MIB..MIB + 4096, 5 * MIB..6 * MIB];
        let image = Memory::new(bytes, allocated.clone());
        let found = run(&image, granule, MAX_RANGES, 1 << 20);
        assert_eq!(found.ranges, vec![MIB..MIB + granule]);
        assert_eq!(found.scanned_bytes, 4096 + MIB);
        for read in image.reads.lock().unwrap().iter() {
            assert!(
                allocated
                    .iter()
                    .any(|range| range.start <= read.start && read.end <= range.end),
                "read {read:?} outside the allocated ranges"
            );
        }
    }

    #[test]
    fn a_granule_known_to_hold_data_is_not_read_again() {
        let granule = 2 * MIB;
        let mut bytes = vec![0u8; (4 * MIB) as usize];
        bytes[0] = 1;
        // Two ranges inside one granule: the second is skipped once the first proved data.
        let image = Memory::new(bytes, vec![0..4096, 8192..MIB]);
        let found = run(&image, granule, MAX_RANGES, 1 << 20);
        assert_eq!(found.ranges, vec![0..granule]);
        assert_eq!(*image.reads.lock().unwrap(), vec![0..4096]);
        assert_eq!(found.scanned_bytes, 4096 + MIB - 8192);
    }

    #[test]
    fn too_many_ranges_coarsen_the_granule_and_keep_every_byte() {
        let granule = 512;
        let mut bytes = vec![0u8; (2 * MIB) as usize];
        // 2048 alternating data sectors, with a few longer gaps, against a cap of 64.
        for sector in (0..4096).step_by(2) {
            if sector % 700 < 600 {
                bytes[sector * 512 + 17] = 3;
            }
        }
        let image = Memory::dense(bytes);
        let found = run(&image, granule, 64, 1 << 16);
        assert!(found.ranges.len() <= 64, "{}", found.ranges.len());
        assert!(found.granule > granule && found.granule % granule == 0);
        let fine = expected(&image, granule);
        for range in &fine {
            assert!(
                found
                    .ranges
                    .iter()
                    .any(|r| r.start <= range.start && range.end <= r.end),
                "{range:?} lost by coarsening"
            );
        }
        for pair in found.ranges.windows(2) {
            assert!(
                pair[0].end < pair[1].start,
                "{pair:?} not disjoint and apart"
            );
        }
        for range in &found.ranges {
            assert_eq!(range.start % found.granule, 0);
            assert_eq!(range.end % found.granule, 0);
        }
    }

    #[test]
    fn cancel_stops_the_scan_before_the_next_read() {
        static CANCEL: AtomicBool = AtomicBool::new(false);
        let mut image = Memory::dense(vec![1; (16 * MIB) as usize]);
        image.cancel_after = Some((2, &CANCEL));
        let error = scan(&image, 64 * KIB, MAX_RANGES, 1 << 20, &|_, _| {}, &CANCEL).unwrap_err();
        assert!(matches!(error, Error::Cancelled), "{error:?}");
        assert_eq!(image.reads.lock().unwrap().len(), 2);
    }

    #[test]
    fn progress_counts_up_to_the_allocated_bytes() {
        let image = Memory::new(
            vec![0u8; (4 * MIB) as usize],
            vec![0..MIB, 2 * MIB..3 * MIB],
        );
        let seen = Mutex::new(Vec::new());
        let cancel = AtomicBool::new(false);
        let record = |done, total| seen.lock().unwrap().push((done, total));
        scan(&image, 64 * KIB, MAX_RANGES, 1 << 19, &record, &cancel).unwrap();
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.first(), Some(&(0, 2 * MIB)));
        assert_eq!(seen.last(), Some(&(2 * MIB, 2 * MIB)));
        assert!(seen.windows(2).all(|pair| pair[0].0 <= pair[1].0));
    }

    #[test]
    fn bad_granules_are_refused() {
        let image = Memory::dense(vec![0; 4096]);
        let cancel = AtomicBool::new(false);
        for granule in [0, 256, 3 * 512] {
            assert!(nonzero_ranges(&image, granule, &|_, _| {}, &cancel).is_err());
        }
    }

    #[test]
    fn the_zero_check_sees_every_byte_whatever_the_alignment() {
        let mut bytes = vec![0u8; 3 * ZERO_CHECK_BLOCK + 37];
        for start in [0, 1, 7, 15, 16, 100] {
            let slice = &bytes[start..];
            assert!(is_zero(slice));
        }
        for position in [0, 1, 15, 16, 4095, 4096, 8191, bytes.len() - 1] {
            bytes[position] = 0x40;
            for start in [0usize, 1, 3] {
                if start <= position {
                    assert!(!is_zero(&bytes[start..]), "byte {position} from {start}");
                }
            }
            bytes[position] = 0;
        }
        assert!(is_zero(&[]));
    }
}
