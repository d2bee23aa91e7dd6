//! The userspace engine: AES-XTS in this process, bit-identical to dm-crypt.
//!
//! # Pipeline
//!
//! A fixed set of worker threads shares one counter of chunks. Each worker owns one
//! [`AlignedBuffer`] of `chunk_size` bytes and loops: claim the next chunk, read it from the
//! source (reading only the allocated ranges, zero-filling the rest), encrypt it in place, and
//! `pwrite` it to the output with O_DIRECT. Memory in flight is therefore exactly
//! `workers × chunk_size` whatever the image size, and chunks land in the output in roughly
//! ascending order.
//!
//! The output's write speed is the bottleneck (≈0.5 GB/s sustained here against ≈2 GB/s per
//! core for the cipher), so the point is to keep a write always queued: with one more worker
//! than cores, one worker is inside `pwrite` while the others read and encrypt the next chunks
//! and wait to write. A single worker leaves the device idle while it reads and encrypts.
//!
//! Measured with `examples/engine_throughput.rs` on the 2-core VM: a 2 GiB payload to ext4 on
//! /tmp, each round running `dd if=/dev/zero bs=4M oflag=direct` then the engine, medians of 7
//! rounds (the virtual disk swings between ≈0.5 and ≈1.4 GB/s within a minute, so single runs
//! mean little):
//!
//! | workers × chunk          | engine / dd | note                                        |
//! |--------------------------|-------------|---------------------------------------------|
//! | 1 × 4 MiB                | 1.16–1.22   | device idles while the worker encrypts      |
//! | 3 × 4 MiB (default)      | 1.04        | 4096-byte sectors: 1.08                     |
//! | 4 × 4 MiB                | 1.04        | no gain over 3, 4 MiB more memory           |
//! | 3 × 1 MiB, 3 × 8 MiB     | ≈ the same  | within the disk's noise                     |
//!
//! Peak RSS of the whole benchmark process was 14.5 MiB with 3 × 4 MiB for 1, 2 and 6 GiB
//! payloads alike. Writing to tmpfs (no disk limit) the engine reaches 1.2–1.3 GB/s, its CPU
//! ceiling on two cores, above the disk's sustained speed but below its bursts.
//!
//! # The read side
//!
//! Workers read the source through [`SourceImage::read_at`], which for every format goes
//! through the shared [`crate::formats::layout::LayeredImage`]: the format module maps guest
//! ranges to file offsets, and the data is read with O_DIRECT through a private read-only
//! description of the source where its filesystem allows it, else buffered with the pages
//! dropped behind the reader ([`crate::sys::source_io`]). The chunk buffers are 4096-aligned,
//! so the reads land in them directly, without a bounce copy; ranges outside the source's
//! allocated ranges are zero-filled, never read. Each worker reading its own chunk keeps up to
//! `workers` source reads in flight, interleaved with the writes.
//!
//! Measured with `IMGCRYPT_BENCH_SOURCE=` `examples/engine_throughput.rs` (release) on a 2 GiB
//! dynamic VHD with 0.8 GiB of data in 25 runs, caches dropped before every run, 2026-12-03,
//! with the machine loaded by other builds (load average 6–10 on 2 cores, so the figures are
//! noisy and the CPU-bound part is inflated): before and after alternately, four rounds each,
//! the engine took 7.5–8.7 s with buffered reads and 4.3–6.1 s with O_DIRECT reads
//! (engine/dd medians 2.4 and 1.35); `perf` showed `_copy_to_iter` under `pread64` at 41 % of
//! all samples before and gone after, AES-XTS now the top. The page cache held 824 MiB of the
//! source after a buffered run and 84 KiB (its metadata) after an O_DIRECT run. A dedicated
//! reader thread or io_uring was not built: with the reads in the workers, the copy's time
//! tracked the write floor's swings rather than the reads (the sweep below shows no gain from
//! more reads in flight).
//!
//! The same runs with O_DIRECT reads, by workers × chunk (medians of 3, same load; engine
//! seconds are the comparable column, since dd swung 2.3–13.8 s between runs):
//!
//! | workers × chunk | engine s | engine/dd | peak RSS |
//! |-----------------|---------:|----------:|---------:|
//! | 2 × 4 MiB       | 13.97    | 3.60      | 10.7 MiB |
//! | 3 × 4 MiB (default) | 5.53 | 1.15      | 14.7 MiB |
//! | 4 × 4 MiB       | 5.82     | 1.50      | 18.8 MiB |
//! | 6 × 4 MiB       | 7.13     | 2.60      | 26.8 MiB |
//! | 3 × 1 MiB       | 5.32     | 0.95      | 9.6 MiB  |
//! | 3 × 8 MiB       | 5.64     | 1.62      | 30.6 MiB |
//! | 4 × 8 MiB       | 5.66     | 1.85      | 38.7 MiB |
//!
//! Two workers leave the disk idle while both encrypt; beyond three, more writes in flight gain
//! nothing and cost memory (and six contend with the other load for two cores), so the default
//! stays one worker per core plus one with 4 MiB chunks: 12 MiB of buffers in flight.
//!
//! # Errors and cancellation
//!
//! Workers check the job's cancel flag and a shared stop flag between chunks. The first error
//! any worker meets is kept, sets the stop flag, and is what the call returns; errors the other
//! workers meet afterwards are dropped. O_DIRECT is restored on the output on every path (a
//! guard restores it on drop). Nothing is synced: the job does that.

use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use imgcrypt_proto::api::EngineKind;
use nix::fcntl::OFlag;

use crate::engines::xts::{XtsCipher, IV_SECTOR_BYTES};
use crate::engines::{Engine, PayloadJob};
use crate::error::Descriptor;
use crate::formats::SourceImage;
use crate::outputs::Extent;
use crate::sys::aligned::{AlignedBuffer, DIRECT_IO_ALIGNMENT};
use crate::sys::direct_io::{enable_direct_io, status_flags, write_all_at};
use crate::{Error, Result};

/// Chunk size [`UserspaceEngine::new`] uses: large enough that each O_DIRECT write keeps the
/// device queue full (like `dd bs=4M`), small enough that a few fit the memory budget.
pub const DEFAULT_CHUNK_SIZE: usize = 4 << 20;

/// Upper bound on the buffers in flight (`workers × chunk_size`), so the daemon's RSS stays well
/// under 64 MiB during a copy whatever the image size.
pub const MAX_BUFFERED_BYTES: usize = 32 << 20;

/// AES-XTS-plain64 in this process, spread over a few worker threads.
#[derive(Debug, Clone)]
pub struct UserspaceEngine {
    workers: usize,
    chunk_size: usize,
}

impl Default for UserspaceEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl UserspaceEngine {
    /// One worker per core plus one, so a write is always queued while the others read and
    /// encrypt; [`DEFAULT_CHUNK_SIZE`] chunks; capped by [`MAX_BUFFERED_BYTES`].
    ///
    /// On the 2-core machine that is 3 workers × 4 MiB: a 2 GiB payload took 1.04× the time of
    /// `dd bs=4M oflag=direct` writing zeros (median of 7), at 14.5 MiB peak RSS for the whole
    /// process (see the module documentation).
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = (cores + 1).clamp(2, MAX_BUFFERED_BYTES / DEFAULT_CHUNK_SIZE);
        Self {
            workers,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }

    /// An engine with `workers` threads each holding one `chunk_size` buffer.
    ///
    /// `workers` must be at least 1, `chunk_size` a non-zero multiple of 4096, and their product
    /// at most [`MAX_BUFFERED_BYTES`].
    pub fn with_config(workers: usize, chunk_size: usize) -> Result<Self> {
        let invalid = |message: String| Error::InvalidOption {
            parameter: "engine",
            message,
        };
        if workers == 0 {
            return Err(invalid(
                "the userspace engine needs at least one worker".into(),
            ));
        }
        if chunk_size == 0 || chunk_size % DIRECT_IO_ALIGNMENT != 0 {
            return Err(invalid(format!(
                "userspace engine chunk size {chunk_size} is not a non-zero multiple of \
                 {DIRECT_IO_ALIGNMENT}"
            )));
        }
        if workers
            .checked_mul(chunk_size)
            .is_none_or(|total| total > MAX_BUFFERED_BYTES)
        {
            return Err(invalid(format!(
                "{workers} workers × {chunk_size}-byte chunks exceed the {MAX_BUFFERED_BYTES}-byte \
                 buffer budget"
            )));
        }
        Ok(Self {
            workers,
            chunk_size,
        })
    }

    /// Worker threads per payload (fewer when the payload has fewer chunks).
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Bytes each worker reads, encrypts and writes at a time.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Writes the guest bytes `range` of `job`'s extents to the output, encrypted with the
    /// job's key when `encrypt` is set and as read otherwise (decryption, where the source
    /// itself decrypts). Re-encryption runs this range by range to checkpoint; the IVs follow
    /// the extents, so ranges may be written in any order and any number of times.
    ///
    /// `range` must start on a sector boundary; nothing is synced.
    pub fn copy_range(&self, job: &PayloadJob<'_>, encrypt: bool, range: Range<u64>) -> Result<()> {
        let cipher = if encrypt {
            Some(XtsCipher::new(job.key, job.iv)?)
        } else {
            None
        };
        let payload_end = job.extents.last().map_or(0, |extent| extent.guest_end());
        if range.end > payload_end || range.start > range.end {
            return Err(Error::io(
                "copying part of a payload",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("range {range:?} is outside the payload, which ends at {payload_end}"),
                ),
            ));
        }
        if range.is_empty() {
            return Ok(());
        }
        let copy = Copy::new(
            self.workers,
            self.chunk_size,
            job,
            cipher.as_ref(),
            Destination::Output(job.output),
        )
        .within(range);
        let direct = direct_io_if_aligned(job.output, &copy)?;
        let copied = copy.run();
        let restored = direct.map_or(Ok(()), |direct| direct.restore());
        copied?;
        restored
    }
}

/// Switches O_DIRECT on for `output` when every write of `copy` will be 4096-aligned in offset
/// and length; `None` (buffered writes) otherwise.
fn direct_io_if_aligned<'f>(
    output: &'f File,
    copy: &Copy<'_, '_>,
) -> Result<Option<crate::sys::direct_io::DirectIoGuard<'f>>> {
    if copy.all_writes_aligned(DIRECT_IO_ALIGNMENT as u64) {
        Ok(Some(enable_direct_io(output)?))
    } else {
        tracing::debug!("output extents are not 4096-aligned; writing through the page cache");
        Ok(None)
    }
}

impl Engine for UserspaceEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Userspace
    }

    fn write_payload(&self, job: &PayloadJob<'_>) -> Result<u64> {
        check_layout(job)?;
        let cipher = XtsCipher::new(job.key, job.iv)?;
        let payload_bytes = job.payload_bytes();
        if payload_bytes == 0 {
            return Ok(0);
        }
        if status_flags(job.output)?.contains(OFlag::O_APPEND) {
            return Err(Error::bad_descriptor(
                Descriptor::Output,
                "is open for appending (O_APPEND), which would put every positioned write at the \
                 end of the file; open the output without O_APPEND",
            ));
        }

        let copy = Copy::new(
            self.workers,
            self.chunk_size,
            job,
            Some(&cipher),
            Destination::Output(job.output),
        );
        let direct = direct_io_if_aligned(job.output, &copy)?;
        tracing::debug!(
            direct_io = direct.as_ref().is_some_and(|d| d.is_direct()),
            workers = self.workers,
            chunk_size = self.chunk_size,
            extents = job.extents.len(),
            payload_bytes,
            "userspace engine copy starting"
        );
        let copied = copy.run();
        // Restore before reporting, and prefer the copy's error: it is the cause.
        let restored = direct.map_or(Ok(()), |direct| direct.restore());
        copied?;
        restored?;
        Ok(payload_bytes)
    }
}

/// Rejects a job whose geometry an engine would otherwise write wrongly.
pub(crate) fn check_layout(job: &PayloadJob<'_>) -> Result<()> {
    let sector_size = job.sector_size as usize;
    if sector_size != IV_SECTOR_BYTES && sector_size != 4096 {
        return Err(Error::InvalidOption {
            parameter: "sector_size",
            message: format!(
                "encryption sector size {} is not supported: use 512 or 4096",
                job.sector_size
            ),
        });
    }
    let sector = u64::from(job.sector_size);
    let misaligned = job
        .extents
        .iter()
        .find(|e| e.guest_offset % sector != 0 || e.length % sector != 0);
    let problem = if let Some(extent) = misaligned {
        Some(format!(
            "extent {extent:?} is not a whole number of {sector}-byte sectors"
        ))
    } else if job
        .extents
        .iter()
        .any(|e| e.output_offset.checked_add(e.length).is_none())
    {
        Some("an extent ends past the largest file offset".to_string())
    } else if !job
        .extents
        .windows(2)
        .all(|pair| pair[0].guest_end() <= pair[1].guest_offset)
    {
        Some("the output's extents are not sorted and disjoint".to_string())
    } else if !is_sorted_and_disjoint(job.source.allocated_ranges()) {
        Some("the source's allocated ranges are not sorted and disjoint".to_string())
    } else {
        None
    };
    match problem {
        // These are the caller's invariants, not the user's input: report them as what they are.
        Some(message) => Err(Error::io(
            "laying out the encrypted payload",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
        )),
        None => Ok(()),
    }
}

fn is_sorted_and_disjoint(ranges: &[Range<u64>]) -> bool {
    ranges.iter().all(|range| range.start <= range.end)
        && ranges.windows(2).all(|pair| pair[0].end <= pair[1].start)
}

/// Where a copy's writes go.
#[derive(Clone, Copy)]
pub(crate) enum Destination<'f> {
    /// The output file, at each extent's output offset (ciphertext).
    Output(&'f File),
    /// A device that presents the payload from offset 0 and encrypts on the way down (the
    /// kernel engine's dm-crypt device): guest offset `g` is written at `g`.
    PlaintextDevice(&'f File),
}

/// One payload copy in progress, shared by its workers.
///
/// Both engines use it: the userspace engine encrypts each chunk (`cipher`) and writes it to the
/// output at its extent's place; the kernel engine passes no cipher and writes the plaintext to
/// the dm-crypt device, which encrypts on the way to the output.
///
/// The extents (clipped to the range being copied) are cut into chunks of at most `chunk_size`
/// bytes, each starting on its extent's start or a multiple of `chunk_size` after it; workers
/// claim chunks by index from one shared counter.
pub(crate) struct Copy<'j, 'a> {
    job: &'j PayloadJob<'a>,
    cipher: Option<&'j XtsCipher>,
    destination: Destination<'j>,
    workers: usize,
    chunk_size: u64,
    /// The extents being copied (the job's, or clipped to a range).
    runs: std::borrow::Cow<'j, [Extent]>,
    /// `first_chunk[i]`: index of run `i`'s first chunk; the last entry is the chunk count.
    first_chunk: Vec<u64>,
    next_chunk: AtomicU64,
    stop: AtomicBool,
    first_error: Mutex<Option<Error>>,
    /// Bytes written so far; the lock also keeps `progress` calls in increasing order.
    written: Mutex<u64>,
    /// What the target is, when it is not the output itself (the kernel engine's dm device).
    target_note: Option<String>,
}

/// One chunk: guest bytes `guest..guest + len`, written at `write_at` with IV `iv`.
struct Chunk {
    guest: u64,
    len: usize,
    write_at: u64,
    iv: u64,
}

impl<'j, 'a> Copy<'j, 'a> {
    /// A copy of `job`'s extents by at most `workers` threads, each holding one `chunk_size`
    /// buffer (a non-zero multiple of [`DIRECT_IO_ALIGNMENT`]), into `destination`.
    pub(crate) fn new(
        workers: usize,
        chunk_size: usize,
        job: &'j PayloadJob<'a>,
        cipher: Option<&'j XtsCipher>,
        destination: Destination<'j>,
    ) -> Self {
        let mut copy = Self {
            job,
            cipher,
            destination,
            workers,
            chunk_size: chunk_size as u64,
            runs: std::borrow::Cow::Borrowed(job.extents),
            first_chunk: Vec::new(),
            next_chunk: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            first_error: Mutex::new(None),
            written: Mutex::new(0),
            target_note: None,
        };
        copy.count_chunks();
        copy
    }

    /// Copies only the guest bytes in `range` of the extents.
    pub(crate) fn within(mut self, range: Range<u64>) -> Self {
        let clipped: Vec<Extent> = self
            .job
            .extents
            .iter()
            .filter_map(|extent| {
                let start = extent.guest_offset.max(range.start);
                let end = extent.guest_end().min(range.end);
                (start < end).then(|| {
                    let skipped = start - extent.guest_offset;
                    Extent {
                        guest_offset: start,
                        length: end - start,
                        output_offset: extent.output_offset + skipped,
                        first_iv: extent.first_iv + skipped / IV_SECTOR_BYTES as u64,
                    }
                })
            })
            .collect();
        self.runs = std::borrow::Cow::Owned(clipped);
        self.count_chunks();
        self
    }

    fn count_chunks(&mut self) {
        let mut total = 0u64;
        self.first_chunk = Vec::with_capacity(self.runs.len() + 1);
        for run in self.runs.iter() {
            self.first_chunk.push(total);
            total += run.length.div_ceil(self.chunk_size);
        }
        self.first_chunk.push(total);
        self.workers = self
            .workers
            .min(usize::try_from(total).unwrap_or(usize::MAX))
            .max(1);
    }

    fn chunks(&self) -> u64 {
        self.first_chunk.last().copied().unwrap_or(0)
    }

    /// Whether every write lands on `alignment` in offset and length (O_DIRECT's condition).
    pub(crate) fn all_writes_aligned(&self, alignment: u64) -> bool {
        self.chunk_size % alignment == 0
            && self.runs.iter().all(|run| {
                let offset = match self.destination {
                    Destination::Output(_) => run.output_offset,
                    Destination::PlaintextDevice(_) => run.guest_offset,
                };
                offset % alignment == 0 && run.length % alignment == 0
            })
    }

    /// Chunk `index` (below [`Self::chunks`]).
    fn chunk(&self, index: u64) -> Chunk {
        let run_index = self.first_chunk.partition_point(|&first| first <= index) - 1;
        let run = &self.runs[run_index];
        let skipped = (index - self.first_chunk[run_index]) * self.chunk_size;
        let guest = run.guest_offset + skipped;
        Chunk {
            guest,
            len: self.chunk_size.min(run.length - skipped) as usize,
            write_at: match self.destination {
                Destination::Output(_) => run.output_offset + skipped,
                Destination::PlaintextDevice(_) => guest,
            },
            iv: run.first_iv + skipped / IV_SECTOR_BYTES as u64,
        }
    }

    /// Adds `note` (what the target is, how its offsets relate to the output) to every write
    /// error, for targets that are not the output itself.
    pub(crate) fn describing_target(mut self, note: String) -> Self {
        self.target_note = Some(note);
        self
    }

    /// Copies every chunk; the first error any worker met, or `Cancelled`.
    pub(crate) fn run(&self) -> Result<()> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..self.workers)
                .map(|_| scope.spawn(|| self.worker()))
                .collect();
            for handle in handles {
                if handle.join().is_err() {
                    self.fail(Error::io(
                        "userspace engine worker",
                        std::io::Error::other("a worker thread panicked; see the daemon log"),
                    ));
                }
            }
        });
        match self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Keeps `error` if it is the first, and tells every worker to stop.
    fn fail(&self, error: Error) {
        let mut slot = self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(error);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn worker(&self) {
        // A panicking worker must not leave the others copying a doomed payload.
        let _stop_on_panic = StopOnPanic(&self.stop);
        if let Err(error) = self.copy_chunks() {
            self.fail(error);
        }
    }

    fn copy_chunks(&self) -> Result<()> {
        let mut buffer = AlignedBuffer::new(self.chunk_size as usize)?;
        let target = match self.destination {
            Destination::Output(file) | Destination::PlaintextDevice(file) => file,
        };
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if self.job.cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            let index = self.next_chunk.fetch_add(1, Ordering::SeqCst);
            if index >= self.chunks() {
                return Ok(());
            }
            let chunk = self.chunk(index);
            let bytes = &mut buffer[..chunk.len];

            read_source(self.job.source, bytes, chunk.guest).map_err(source_context)?;
            if let Some(cipher) = self.cipher {
                cipher.encrypt_sectors(bytes, self.job.sector_size as usize, chunk.iv)?;
            }
            write_all_at(target, bytes, chunk.write_at)
                .map_err(|error| self.output_context(error))?;

            let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
            *written += chunk.len as u64;
            (self.job.progress)(*written);
        }
    }

    /// Says which descriptor a write error concerns, and how much the output needs in total.
    fn output_context(&self, error: Error) -> Error {
        let note = self
            .target_note
            .as_ref()
            .map_or(String::new(), |note| format!(" ({note})"));
        let required = self
            .job
            .extents
            .iter()
            .map(|extent| extent.output_offset + extent.length)
            .max()
            .unwrap_or(0);
        match error {
            Error::NoSpace { message, .. } => Error::NoSpace {
                required_bytes: required,
                message: format!(
                    "{message} (the encrypted image needs {required} bytes in all){note}"
                ),
            },
            Error::Io { operation, source } => Error::Io {
                operation: format!("output: {operation}{note}"),
                source,
            },
            other => other,
        }
    }
}

struct StopOnPanic<'s>(&'s AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Fills `chunk` with the source's bytes at payload offset `start`: reads only the allocated
/// ranges and zero-fills the gaps and anything past the source's end.
/// Says that a read error concerns the source, and what to check: it is never the output's fault.
fn source_context(error: Error) -> Error {
    match error {
        Error::Io { operation, source } => Error::Io {
            operation: format!(
                "source image: {operation} (the disk or file holding the source failed to read: \
                 check it, e.g. with `dmesg`, or copy the image elsewhere)"
            ),
            source,
        },
        other => other,
    }
}

fn read_source(source: &dyn SourceImage, chunk: &mut [u8], start: u64) -> Result<()> {
    let end = start + chunk.len() as u64;
    let readable_end = end.min(source.virtual_size());
    let ranges = source.allocated_ranges();
    let first = ranges.partition_point(|range| range.end <= start);
    let mut prepared = start;
    for range in &ranges[first..] {
        let from = range.start.max(prepared);
        let to = range.end.min(readable_end);
        if from >= readable_end {
            break;
        }
        if from >= to {
            continue;
        }
        chunk[(prepared - start) as usize..(from - start) as usize].fill(0);
        source.read_at(
            &mut chunk[(from - start) as usize..(to - start) as usize],
            from,
        )?;
        prepared = to;
    }
    chunk[(prepared - start) as usize..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcrypt_proto::api::SourceFormat;

    /// Records which ranges were read, so the test can see holes being skipped.
    #[derive(Debug)]
    struct RecordingSource {
        size: u64,
        allocated: Vec<Range<u64>>,
        reads: Mutex<Vec<Range<u64>>>,
    }

    impl SourceImage for RecordingSource {
        fn format(&self) -> SourceFormat {
            SourceFormat::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
            self.reads
                .lock()
                .unwrap()
                .push(offset..offset + buffer.len() as u64);
            for (i, byte) in buffer.iter_mut().enumerate() {
                *byte = ((offset + i as u64) % 255 + 1) as u8;
            }
            Ok(())
        }
        fn allocated_ranges(&self) -> &[Range<u64>] {
            &self.allocated
        }
    }

    #[test]
    fn source_read_errors_name_the_source_not_the_output() {
        let io = source_context(Error::io(
            "read 4096 bytes of disk data at offset 8388608",
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
        let text = io.to_string();
        assert!(text.starts_with("source image: read 4096 bytes"), "{text}");
        assert!(
            text.contains("dmesg") && !text.contains("output:"),
            "{text}"
        );
        let corrupt = source_context(Error::corrupt("truncated", Some(7)));
        assert!(matches!(
            corrupt,
            Error::CorruptImage {
                offset: Some(7),
                ..
            }
        ));
    }

    #[test]
    fn read_source_reads_only_allocated_bytes_and_zero_fills_the_rest() {
        let source = RecordingSource {
            size: 10_000,
            allocated: vec![0..100, 1000..1500, 2000..2001, 4000..4500, 9000..20_000],
            reads: Mutex::new(Vec::new()),
        };
        let mut chunk = vec![0xeeu8; 8192];
        read_source(&source, &mut chunk, 1024).unwrap();
        for (i, &byte) in chunk.iter().enumerate() {
            let at = 1024 + i as u64;
            let inside = source.allocated.iter().any(|r| r.contains(&at)) && at < source.size;
            let expected = if inside { (at % 255 + 1) as u8 } else { 0 };
            assert_eq!(byte, expected, "payload byte {at}");
        }
        assert_eq!(
            *source.reads.lock().unwrap(),
            vec![1024..1500, 2000..2001, 4000..4500, 9000..9216]
        );

        // Past the source's end: nothing read, all zeros.
        source.reads.lock().unwrap().clear();
        let mut chunk = vec![0xeeu8; 4096];
        read_source(&source, &mut chunk, 12_288).unwrap();
        assert!(chunk.iter().all(|&b| b == 0));
        assert!(source.reads.lock().unwrap().is_empty());
    }

    /// Counts the bytes asked of a real source.
    #[derive(Debug)]
    struct CountingSource {
        inner: Box<dyn SourceImage>,
        bytes: std::sync::atomic::AtomicU64,
    }

    impl SourceImage for CountingSource {
        fn format(&self) -> SourceFormat {
            self.inner.format()
        }
        fn virtual_size(&self) -> u64 {
            self.inner.virtual_size()
        }
        fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
            self.bytes
                .fetch_add(buffer.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.inner.read_at(buffer, offset)
        }
        fn allocated_ranges(&self) -> &[Range<u64>] {
            self.inner.allocated_ranges()
        }
    }

    #[test]
    fn a_sparse_qcow2_costs_reads_of_its_data_only() {
        // 4 GiB virtual, 3 MiB written by qemu-io (plus a 64 KiB zero cluster).
        let image = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        let path = image.path().to_string_lossy().into_owned();
        let run = |program: &str, args: &[&str]| {
            let output = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
        };
        run("qemu-img", &["create", "-q", "-f", "qcow2", &path, "4G"]);
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 1 100M 1M",
                "-c",
                "write -P 2 3G 2M",
                "-c",
                "write -z 2G 64k",
                &path,
            ],
        );
        let source = CountingSource {
            inner: crate::formats::open(std::fs::File::open(image.path()).unwrap()).unwrap(),
            bytes: Default::default(),
        };
        let mut chunk = vec![0u8; 8 << 20];
        for start in (0..source.virtual_size()).step_by(chunk.len()) {
            read_source(&source, &mut chunk, start).unwrap();
            if start == 3 << 30 {
                assert!(chunk[..2 << 20].iter().all(|&b| b == 2));
                assert!(chunk[2 << 20..].iter().all(|&b| b == 0));
            }
        }
        let read = source.bytes.load(std::sync::atomic::Ordering::Relaxed);
        assert!((3 << 20..=4 << 20).contains(&read), "{read} bytes read");
    }

    #[test]
    fn configuration_limits() {
        assert!(UserspaceEngine::with_config(0, 4096).is_err());
        assert!(UserspaceEngine::with_config(2, 0).is_err());
        assert!(UserspaceEngine::with_config(2, 4095).is_err());
        assert!(UserspaceEngine::with_config(usize::MAX, 4096).is_err());
        assert!(UserspaceEngine::with_config(9, 4 << 20).is_err());
        let engine = UserspaceEngine::with_config(8, 4 << 20).unwrap();
        assert_eq!((engine.workers(), engine.chunk_size()), (8, 4 << 20));
        let default = UserspaceEngine::new();
        assert!(default.workers() >= 2);
        assert!(default.workers() * default.chunk_size() <= MAX_BUFFERED_BYTES);
    }

    #[test]
    fn unsorted_ranges_are_refused() {
        assert!(is_sorted_and_disjoint(&[0..10, 10..20, 30..30]));
        assert!(!is_sorted_and_disjoint(&[0..10, 5..20]));
        assert!(!is_sorted_and_disjoint(&[10..20, 0..5]));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = [0..5, 20..10];
        assert!(!is_sorted_and_disjoint(&reversed));
    }
}
