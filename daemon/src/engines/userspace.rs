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
//! # Sparse outputs: the zero check in the copy
//!
//! For qcow2 and VHD ([`Engine::write_allocated`]) there are no extents in advance: the chunks
//! are the source's allocated ranges in the output's granules (64 KiB clusters, 2 MiB blocks;
//! [`crate::outputs::granule_runs`]), claimed with a ticket each. A worker reads its chunk into
//! its buffer, finds the granules holding a non-zero byte (`formats::scan::is_zero`),
//! waits until the chunk before its own is placed, has the output place its granules
//! ([`crate::outputs::Allocator::place`], which answers with file offsets and IVs: qcow2's IV
//! is the host offset, so placement comes before encryption), passes the turn on, and
//! encrypts and writes the placed pieces of the buffer it holds. The data is read once; the
//! file is laid out in guest order, the same for any number of workers or chunk size; memory
//! stays `workers × chunk_size` plus the output's own bounded state. The serial part is the
//! placement alone; a worker waiting for its turn holds its read chunk, so at most `workers`
//! chunks are in flight as before.
//!
//! # Errors and cancellation
//!
//! Workers check the job's cancel flag and a shared stop flag between chunks (and while waiting
//! for their turn to place). The first error any worker meets is kept, sets the stop flag,
//! wakes the waiting workers, and is what the call returns; errors the other
//! workers meet afterwards are dropped. O_DIRECT is restored on the output on every path (a
//! guard restores it on drop). Nothing is synced: the job does that.

use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use imgcrypt_proto::api::EngineKind;
use nix::fcntl::OFlag;

use crate::engines::xts::{XtsCipher, IV_SECTOR_BYTES};
use crate::engines::{Engine, PayloadJob};
use crate::error::Descriptor;
use crate::formats::scan::is_zero;
use crate::formats::SourceImage;
use crate::outputs::{granule_runs, Allocator, Extent};
use crate::sys::aligned::{AlignedBuffer, DIRECT_IO_ALIGNMENT};
use crate::sys::direct_io::{enable_direct_io, status_flags, write_all_at};
use crate::sys::pipe;
use crate::{Error, Result};

/// Chunk size [`UserspaceEngine::new`] uses: large enough that each O_DIRECT write keeps the
/// device queue full (like `dd bs=4M`), small enough that a few fit the memory budget.
pub const DEFAULT_CHUNK_SIZE: usize = 4 << 20;

/// Upper bound on the buffers in flight (`workers × chunk_size`), so the daemon's RSS stays well
/// under 64 MiB during a copy whatever the image size.
pub const MAX_BUFFERED_BYTES: usize = 32 << 20;

/// Positioned writes to a file open with O_APPEND would all land at its end: refused.
fn refuse_append(output: &File) -> Result<()> {
    if status_flags(output)?.contains(OFlag::O_APPEND) {
        return Err(Error::bad_descriptor(
            Descriptor::Output,
            "is open for appending (O_APPEND), which would put every positioned write at the end \
             of the file; open the output without O_APPEND",
        ));
    }
    Ok(())
}

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

    /// A copy of `job` with this engine's workers and chunks.
    fn copy<'j, 'a>(
        &self,
        job: &'j PayloadJob<'a>,
        cipher: Option<&'j XtsCipher>,
        destination: Destination<'j>,
    ) -> Copy<'j, 'a> {
        Copy::new(self.workers, self.chunk_size, job, cipher, destination)
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
        check_range(job, &range, "copying part of a payload")?;
        if range.is_empty() {
            return Ok(());
        }
        let copy = self
            .copy(job, cipher.as_ref(), Destination::Output(job.output))
            .within(range);
        let direct = direct_io_if_aligned(job.output, &copy)?;
        let copied = copy.run();
        let restored = direct.map_or(Ok(()), |direct| direct.restore());
        copied?;
        restored
    }
}

/// Refuses a `range` outside `job`'s payload (a caller's bug, reported as such).
fn check_range(job: &PayloadJob<'_>, range: &Range<u64>, operation: &str) -> Result<()> {
    let payload_end = job.extents.last().map_or(0, |extent| extent.guest_end());
    if range.end > payload_end || range.start > range.end {
        return Err(Error::io(
            operation.to_string(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("range {range:?} is outside the payload, which ends at {payload_end}"),
            ),
        ));
    }
    Ok(())
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
        refuse_append(job.output)?;

        let copy = self.copy(job, Some(&cipher), Destination::Output(job.output));
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

    fn write_stream(&self, job: &PayloadJob<'_>, range: Range<u64>) -> Result<u64> {
        check_layout(job)?;
        let cipher = XtsCipher::new(job.key, job.iv)?;
        check_range(job, &range, "streaming part of a payload")?;
        let bytes = range.end - range.start;
        if bytes == 0 {
            return Ok(0);
        }
        let pipe = pipe::StreamPipe::new(job.output)?;
        let copy = self
            .copy(job, Some(&cipher), Destination::Stream(&pipe))
            .within(range);
        tracing::debug!(
            workers = copy.workers,
            chunk_size = self.chunk_size,
            bytes,
            "userspace engine stream starting"
        );
        copy.run()?;
        Ok(bytes)
    }

    fn write_allocated(&self, job: &PayloadJob<'_>, allocator: &dyn Allocator) -> Result<u64> {
        check_layout(job)?;
        let cipher = XtsCipher::new(job.key, job.iv)?;
        refuse_append(job.output)?;
        let copy = self
            .copy(job, Some(&cipher), Destination::Output(job.output))
            .allocating(allocator)?;
        // The allocator's extents are 4096-aligned (its contract, checked per write).
        let direct = direct_io_if_aligned(job.output, &copy)?;
        tracing::debug!(
            direct_io = direct.as_ref().is_some_and(|d| d.is_direct()),
            workers = copy.workers,
            chunk_size = copy.chunk_size,
            granule = allocator.granule(),
            "userspace engine sparse copy starting"
        );
        let copied = copy.run();
        let restored = direct.map_or(Ok(()), |direct| direct.restore());
        copied?;
        restored?;
        Ok(copy
            .allocation
            .as_ref()
            .map_or(0, |allocation| allocation.stored.load(Ordering::SeqCst)))
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
    /// A pipe (a streamed output, [`imgcrypt_proto::stream`]): every chunk is written at the
    /// pipe's current position, strictly in chunk order, with bounded non-blocking writes
    /// ([`crate::sys::pipe`]); a chunk's `write_at` is ignored.
    Stream(&'f pipe::StreamPipe<'f>),
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
///
/// An allocated copy ([`Self::allocating`]) has no extents: workers claim chunks of the
/// source's allocated ranges in the allocator's granules, each with a ticket; a worker reads its
/// chunk, finds the granules holding a non-zero byte, waits for its ticket's turn, has the
/// allocator place them, passes the turn on, then encrypts and writes them where they were
/// placed. Only the placement is serial (a few microseconds per chunk); reads, the zero check,
/// encryption and writes overlap as in a planned copy.
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
    /// Set for an allocated copy.
    allocation: Option<Allocation<'j>>,
    /// The guest offset a [`Destination::PlaintextDevice`] presents at its offset 0.
    device_base: u64,
    /// Whose turn it is in the serial step: an allocated copy's placement (by ticket), a
    /// stream's write (by chunk index).
    turns: Turns,
}

/// Serialises one step of a copy in ticket order while everything else runs in parallel:
/// a worker holding ticket `t` waits until the step for `t - 1` is done.
struct Turns {
    /// The ticket whose step runs next.
    turn: Mutex<u64>,
    changed: Condvar,
}

impl Turns {
    fn new() -> Self {
        Self {
            turn: Mutex::new(0),
            changed: Condvar::new(),
        }
    }

    /// Waits until it is `ticket`'s turn; `false` when `stop` was set meanwhile.
    fn wait(&self, ticket: u64, stop: &AtomicBool) -> bool {
        let mut turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        while *turn != ticket {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            // Timed, so that a stop set without a notification (a panicking worker) is seen.
            turn = self
                .changed
                .wait_timeout(turn, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        !stop.load(Ordering::SeqCst)
    }

    /// Passes the turn to the next ticket.
    fn advance(&self) {
        let mut turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        *turn += 1;
        self.changed.notify_all();
    }

    /// Wakes every waiting worker (so they see a stop).
    fn wake(&self) {
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        self.changed.notify_all();
    }
}

/// The shared state of an allocated copy.
struct Allocation<'j> {
    allocator: &'j dyn Allocator,
    granule: u64,
    /// The chunks still to claim, and the next ticket.
    cursor: Mutex<Cursor<'j>>,
    /// Payload bytes placed (and written, once the copy succeeds).
    stored: AtomicU64,
}

/// Where the next chunk of an allocated copy starts.
struct Cursor<'j> {
    runs: Box<dyn Iterator<Item = Range<u64>> + Send + 'j>,
    /// What is left of the run being cut.
    current: Range<u64>,
    next_ticket: u64,
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
            allocation: None,
            device_base: 0,
            turns: Turns::new(),
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

    /// Makes this an allocated copy: the source's allocated ranges in `allocator`'s granules
    /// (see [`Copy`]), each chunk a whole number of granules.
    pub(crate) fn allocating(mut self, allocator: &'j dyn Allocator) -> Result<Self> {
        let granule = allocator.granule();
        let chunk = self.chunk_size / granule.max(1) * granule;
        if !granule.is_power_of_two()
            || granule % DIRECT_IO_ALIGNMENT as u64 != 0
            || chunk == 0
            || allocator.payload_end() % DIRECT_IO_ALIGNMENT as u64 != 0
        {
            return Err(Error::io(
                "laying out the encrypted payload",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "the output's granule ({granule} bytes) must be a power of two of at \
                         least 4096 and no larger than the engine's {}-byte chunks, and its \
                         payload end ({}) a multiple of 4096",
                        self.chunk_size,
                        allocator.payload_end()
                    ),
                ),
            ));
        }
        self.chunk_size = chunk;
        self.runs = std::borrow::Cow::Owned(Vec::new());
        self.first_chunk = vec![0];
        let ranges: &'j [Range<u64>] = self.job.source.allocated_ranges();
        self.allocation = Some(Allocation {
            allocator,
            granule,
            cursor: Mutex::new(Cursor {
                runs: Box::new(granule_runs(ranges, granule, allocator.payload_end())),
                current: 0..0,
                next_ticket: 0,
            }),
            stored: AtomicU64::new(0),
        });
        Ok(self)
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
                    // Not a file: O_DIRECT does not apply.
                    Destination::Stream(_) => return false,
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
                Destination::Output(_) | Destination::Stream(_) => run.output_offset + skipped,
                Destination::PlaintextDevice(_) => guest - self.device_base,
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

    /// For a [`Destination::PlaintextDevice`] that maps only part of the payload: its offset 0
    /// is guest byte `guest_offset` (the first byte copied).
    pub(crate) fn device_starting_at(mut self, guest_offset: u64) -> Self {
        self.device_base = guest_offset;
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
        drop(slot);
        // Wake the workers waiting for their turn, so they see the stop.
        self.turns.wake();
    }

    fn worker(&self) {
        // A panicking worker must not leave the others copying a doomed payload.
        let _stop_on_panic = StopOnPanic(&self.stop);
        if let Err(error) = self.copy_chunks() {
            self.fail(error);
        }
    }

    fn copy_chunks(&self) -> Result<()> {
        if let Some(allocation) = &self.allocation {
            return self.copy_allocated(allocation);
        }
        let mut buffer = AlignedBuffer::new(self.chunk_size as usize)?;
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
            match self.destination {
                Destination::Output(file) | Destination::PlaintextDevice(file) => {
                    write_all_at(file, bytes, chunk.write_at)
                        .map_err(|error| self.output_context(error))?;
                }
                Destination::Stream(pipe) => {
                    // Chunk indexes are the stream's order: wait for the one before to be out.
                    if !self.turns.wait(index, &self.stop) {
                        return Ok(());
                    }
                    let sent = pipe.write_all(bytes, self.job.cancel, &self.stop);
                    // The next chunk's turn whatever happened: on an error the stop flag ends
                    // the copy.
                    self.turns.advance();
                    sent?;
                }
            }

            let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
            *written += chunk.len as u64;
            (self.job.progress)(*written);
        }
    }

    /// The worker loop of an allocated copy (see [`Copy`]).
    fn copy_allocated(&self, allocation: &Allocation<'_>) -> Result<()> {
        let mut buffer = AlignedBuffer::new(self.chunk_size as usize)?;
        let target = match self.destination {
            Destination::Output(file) | Destination::PlaintextDevice(file) => file,
            Destination::Stream(_) => {
                return Err(Error::io(
                    "laying out the encrypted payload",
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "a sparse container cannot be streamed: its allocator writes metadata \
                         out of order",
                    ),
                ))
            }
        };
        let mut kept: Vec<Range<u64>> = Vec::new();
        let mut placed: Vec<Extent> = Vec::new();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if self.job.cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            let Some((ticket, chunk)) = self.claim(allocation) else {
                return Ok(());
            };
            let len = (chunk.end - chunk.start) as usize;
            let bytes = &mut buffer[..len];
            read_source(self.job.source, bytes, chunk.start).map_err(source_context)?;
            nonzero_granules(bytes, chunk.start, allocation.granule, &mut kept);

            placed.clear();
            if !self.turns.wait(ticket, &self.stop) {
                return Ok(());
            }
            let placing = kept
                .iter()
                .try_for_each(|run| allocation.allocator.place(run.clone(), target, &mut placed));
            // The next chunk's turn whatever happened: on an error the stop flag ends the copy.
            self.turns.advance();
            placing?;

            for extent in &placed {
                let from = extent.guest_offset.checked_sub(chunk.start);
                let inside = from.is_some_and(|from| from + extent.length <= len as u64);
                let aligned = extent.output_offset % DIRECT_IO_ALIGNMENT as u64 == 0
                    && extent.length % DIRECT_IO_ALIGNMENT as u64 == 0;
                let (Some(from), true, true) = (from, inside, aligned) else {
                    return Err(Error::io(
                        "laying out the encrypted payload",
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!(
                                "the output placed {extent:?}, which is outside chunk \
                                 {chunk:?} or not 4096-aligned"
                            ),
                        ),
                    ));
                };
                let piece = &mut bytes[from as usize..(from + extent.length) as usize];
                if let Some(cipher) = self.cipher {
                    cipher.encrypt_sectors(
                        piece,
                        self.job.sector_size as usize,
                        extent.first_iv,
                    )?;
                }
                write_all_at(target, piece, extent.output_offset)
                    .map_err(|error| self.output_context(error))?;
                allocation.stored.fetch_add(extent.length, Ordering::SeqCst);
            }

            let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
            *written += len as u64;
            (self.job.progress)(*written);
        }
    }

    /// The next chunk of an allocated copy and its ticket; `None` when all are claimed.
    fn claim(&self, allocation: &Allocation<'_>) -> Option<(u64, Range<u64>)> {
        let mut cursor = allocation
            .cursor
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cursor.current.is_empty() {
            cursor.current = cursor.runs.next()?;
        }
        let start = cursor.current.start;
        let end = cursor.current.end.min(start + self.chunk_size);
        cursor.current.start = end;
        let ticket = cursor.next_ticket;
        cursor.next_ticket += 1;
        Some((ticket, start..end))
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
            // An allocated output's size is known only at the end; the allocator's reservation
            // reports what it needed.
            Error::NoSpace { .. } if required == 0 => error,
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

/// The runs of `granule`s of `chunk` (guest bytes from `start`, a granule boundary) holding a
/// non-zero byte, into `kept`; a last granule cut short by the chunk's end counts as one.
fn nonzero_granules(chunk: &[u8], start: u64, granule: u64, kept: &mut Vec<Range<u64>>) {
    kept.clear();
    for (index, piece) in chunk.chunks(granule as usize).enumerate() {
        if is_zero(piece) {
            continue;
        }
        let from = start + index as u64 * granule;
        let to = from + piece.len() as u64;
        match kept.last_mut() {
            Some(last) if last.end == from => last.end = to,
            _ => kept.push(from..to),
        }
    }
}

/// Fills `chunk` with the source's bytes at payload offset `start`: reads only the allocated
/// ranges and zero-fills the gaps and anything past the source's end.
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

    /// A guest disk in memory, all of it allocated.
    #[derive(Debug)]
    struct MemorySource {
        bytes: Vec<u8>,
        allocated: Vec<Range<u64>>,
    }

    impl SourceImage for MemorySource {
        fn format(&self) -> SourceFormat {
            SourceFormat::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
            let start = offset as usize;
            buffer.copy_from_slice(&self.bytes[start..start + buffer.len()]);
            Ok(())
        }
        fn allocated_ranges(&self) -> &[Range<u64>] {
            &self.allocated
        }
    }

    /// Places every run at its guest offset (IV 0), records the runs, and fails its
    /// `fail_at`-th placement.
    struct IdentityAllocator {
        granule: u64,
        end: u64,
        runs: Mutex<Vec<Range<u64>>>,
        fail_at: Option<usize>,
    }

    impl Allocator for IdentityAllocator {
        fn granule(&self) -> u64 {
            self.granule
        }
        fn payload_end(&self) -> u64 {
            self.end
        }
        fn place(&self, run: Range<u64>, _: &File, placed: &mut Vec<Extent>) -> Result<()> {
            let mut runs = self.runs.lock().unwrap();
            if Some(runs.len()) == self.fail_at {
                return Err(Error::io("placing", std::io::Error::other("test failure")));
            }
            runs.push(run.clone());
            placed.push(Extent {
                guest_offset: run.start,
                length: run.end - run.start,
                output_offset: run.start,
                first_iv: 0,
            });
            Ok(())
        }
    }

    fn allocated_copy(
        source: &MemorySource,
        allocator: &IdentityAllocator,
        workers: usize,
        chunk: usize,
    ) -> (Result<u64>, Vec<u8>) {
        let output = tempfile::tempfile_in("/var/tmp").unwrap();
        let cancel = AtomicBool::new(false);
        let engine = UserspaceEngine::with_config(workers, chunk).unwrap();
        let key: Vec<u8> = (1..=64).collect();
        let result = engine.write_allocated(
            &PayloadJob {
                job_id: 0,
                source,
                output: &output,
                extents: &[],
                sector_size: 512,
                key: &key,
                iv: crate::engines::xts::IvMode::Plain64,
                progress: &|_| {},
                cancel: &cancel,
            },
            allocator,
        );
        let mut written = Vec::new();
        std::io::Read::read_to_end(&mut &output, &mut written).unwrap();
        (result, written)
    }

    #[test]
    fn the_allocated_copy_places_only_non_zero_granules_in_guest_order() {
        const G: u64 = 64 << 10;
        // 64 granules; data in granules 0, 1, 5, 9..12, 40 and the last; granules 2..4 are
        // allocated zeros; 20..30 are a hole (never read, never placed).
        let mut bytes = vec![0u8; 64 * G as usize];
        for granule in [0u64, 1, 5, 9, 10, 11, 40, 63] {
            bytes[(granule * G + 100) as usize] = 0x11;
        }
        let source = MemorySource {
            bytes,
            allocated: vec![0..20 * G, 30 * G..64 * G],
        };
        for (workers, chunk) in [(1, 4 << 20), (3, 128 << 10), (4, 64 << 10)] {
            let allocator = IdentityAllocator {
                granule: G,
                end: 64 * G,
                runs: Mutex::new(Vec::new()),
                fail_at: None,
            };
            let (stored, written) = allocated_copy(&source, &allocator, workers, chunk as usize);
            let runs = allocator.runs.into_inner().unwrap();
            let mut granules: Vec<u64> = runs
                .iter()
                .flat_map(|run| run.start / G..run.end / G)
                .collect();
            // Placed in guest order, each once, only the granules with data.
            assert!(
                runs.windows(2).all(|pair| pair[0].end <= pair[1].start),
                "{runs:?}"
            );
            assert_eq!(
                granules,
                [0, 1, 5, 9, 10, 11, 40, 63],
                "{workers} × {chunk}"
            );
            assert_eq!(stored.unwrap(), 8 * G);
            // Every placed granule was written (ciphertext, not zeros), nothing else.
            granules.sort_unstable();
            for granule in 0..64u64 {
                let piece = written
                    .get((granule * G) as usize..((granule + 1) * G) as usize)
                    .unwrap_or(&[]);
                let has_bytes = piece.iter().any(|&byte| byte != 0);
                assert_eq!(has_bytes, granules.contains(&granule), "granule {granule}");
            }
        }
    }

    #[test]
    fn a_failed_placement_stops_every_worker_and_is_the_error() {
        const G: u64 = 64 << 10;
        let source = MemorySource {
            bytes: vec![0x5a; 256 * G as usize],
            allocated: std::iter::once(0..256 * G).collect(),
        };
        let allocator = IdentityAllocator {
            granule: G,
            end: 256 * G,
            runs: Mutex::new(Vec::new()),
            fail_at: Some(5),
        };
        let (result, _) = allocated_copy(&source, &allocator, 4, 64 << 10);
        let error = result.unwrap_err().to_string();
        assert!(error.contains("test failure"), "{error}");
        assert_eq!(allocator.runs.lock().unwrap().len(), 5);
        // A granule larger than the chunks is refused before anything is read.
        let coarse = IdentityAllocator {
            granule: 2 << 20,
            end: 256 * G,
            runs: Mutex::new(Vec::new()),
            fail_at: None,
        };
        assert!(allocated_copy(&source, &coarse, 2, 1 << 20).0.is_err());
    }

    /// A source of `len` pseudo-random bytes, all allocated.
    fn random_source(len: usize) -> MemorySource {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let bytes = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        MemorySource {
            bytes,
            allocated: std::iter::once(0..len as u64).collect(),
        }
    }

    /// Streams `range` of `source`'s payload (one extent at `DATA_OFFSET`) into a pipe read on
    /// another thread; the result and what the reader got.
    fn stream(
        source: &MemorySource,
        engine: &UserspaceEngine,
        range: Range<u64>,
        cancel: &AtomicBool,
    ) -> (Result<u64>, Vec<u8>) {
        let (read, write) = nix::unistd::pipe().unwrap();
        let (mut read, write) = (File::from(read), File::from(write));
        let key: Vec<u8> = (1..=64).collect();
        let extents = [Extent {
            guest_offset: 0,
            length: source.bytes.len() as u64,
            output_offset: DATA_OFFSET,
            first_iv: 0,
        }];
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || {
                let mut got = Vec::new();
                std::io::Read::read_to_end(&mut read, &mut got).unwrap();
                got
            });
            let result = engine.write_stream(
                &PayloadJob {
                    job_id: 0,
                    source,
                    output: &write,
                    extents: &extents,
                    sector_size: 512,
                    key: &key,
                    iv: crate::engines::xts::IvMode::Plain64,
                    progress: &|_| {},
                    cancel,
                },
                range,
            );
            drop(write);
            (result, reader.join().unwrap())
        })
    }

    const DATA_OFFSET: u64 = 16 << 10;

    #[test]
    fn a_stream_carries_exactly_the_bytes_a_file_output_gets_in_order() {
        let source = random_source((3 << 20) + (12 << 10));
        let len = source.bytes.len() as u64;
        // The file output, written at offsets by the planned copy.
        let output = tempfile::tempfile_in("/var/tmp").unwrap();
        let key: Vec<u8> = (1..=64).collect();
        let extents = [Extent {
            guest_offset: 0,
            length: len,
            output_offset: DATA_OFFSET,
            first_iv: 0,
        }];
        let cancel = AtomicBool::new(false);
        UserspaceEngine::with_config(2, 1 << 20)
            .unwrap()
            .write_payload(&PayloadJob {
                job_id: 0,
                source: &source,
                output: &output,
                extents: &extents,
                sector_size: 512,
                key: &key,
                iv: crate::engines::xts::IvMode::Plain64,
                progress: &|_| {},
                cancel: &cancel,
            })
            .unwrap();
        let mut file = Vec::new();
        std::io::Read::read_to_end(&mut &output, &mut file).unwrap();
        let payload = &file[DATA_OFFSET as usize..];
        assert_eq!(payload.len() as u64, len);
        // Many small chunks over more workers than cores: chunks finish out of order, and the
        // stream must still be in order.
        for (workers, chunk) in [(1, 4096), (6, 4096), (4, 64 << 10)] {
            let engine = UserspaceEngine::with_config(workers, chunk).unwrap();
            let (result, streamed) = stream(&source, &engine, 0..len, &cancel);
            assert_eq!(result.unwrap(), len);
            assert!(
                streamed == payload,
                "{workers} × {chunk}: the stream differs"
            );
            // A resumed stream: from a 4096-multiple on, the same bytes as the file's.
            let from = 1_052_672;
            let (result, streamed) = stream(&source, &engine, from..len, &cancel);
            assert_eq!(result.unwrap(), len - from);
            assert!(
                streamed == payload[from as usize..],
                "{workers} × {chunk} from {from}"
            );
        }
    }

    #[test]
    fn a_stream_nobody_reads_ends_promptly_on_cancel_and_a_closed_reader_is_an_error() {
        let source = random_source(8 << 20);
        let engine = UserspaceEngine::with_config(3, 64 << 10).unwrap();
        let key: Vec<u8> = (1..=64).collect();
        let extents = [Extent {
            guest_offset: 0,
            length: 8 << 20,
            output_offset: 0,
            first_iv: 0,
        }];
        let (read, write) = nix::unistd::pipe().unwrap();
        let write = File::from(write);
        let cancel = AtomicBool::new(false);
        let job = PayloadJob {
            job_id: 0,
            source: &source,
            output: &write,
            extents: &extents,
            sector_size: 512,
            key: &key,
            iv: crate::engines::xts::IvMode::Plain64,
            progress: &|_| {},
            cancel: &cancel,
        };
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| engine.write_stream(&job, 0..8 << 20));
            std::thread::sleep(Duration::from_millis(500));
            assert!(!writer.is_finished(), "nobody reads: the stream must wait");
            let cancelled = std::time::Instant::now();
            cancel.store(true, Ordering::SeqCst);
            let result = writer.join().unwrap();
            assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
            assert!(cancelled.elapsed() < Duration::from_secs(2));
        });
        // The reader goes away: EPIPE, as an error that says so (SIGPIPE is ignored).
        cancel.store(false, Ordering::SeqCst);
        drop(read);
        let error = engine
            .write_stream(&job, 0..8 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("the client stopped reading the stream"),
            "{error}"
        );
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
