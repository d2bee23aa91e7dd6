//! The output side every job that writes an encrypted image shares: reserving the output for
//! a container, running the one pipeline over the container's payload (planned extents, or an
//! allocator placing the granules that hold data as the copy reads them), writing the
//! container's metadata last, and making it durable.
//!
//! Encrypt uses it for every format, and re-encryption (`Rewrite --reencrypt`) of qcow2 and VHD
//! images for theirs, so what an interrupted or failed job leaves behind is the same everywhere.

use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use imgcrypt_proto::api::Phase;

use crate::engines::xts::IvMode;
use crate::engines::{Engine, PayloadJob};
use crate::formats::SourceImage;
use crate::luks::crash;
use crate::outputs::{self, no_space, reserve, Container, Payload};
use crate::sys::descriptors::CheckedFile;
use crate::sys::storage::{self, StorageKind};
use crate::{Error, Result};

use super::Job;

/// Chunk used to clear an output device's old header area.
const HEADER_CLEAR_CHUNK: usize = 1 << 20;

/// What the shared write step reports.
pub struct Written {
    /// Payload bytes the engine wrote.
    pub payload_bytes: u64,
    /// Wall time of the payload copy alone.
    pub copy_elapsed: Duration,
}

/// Reserves `output` for `container`, runs `engine` over the container's payload reading
/// `source` (an allocated payload is reserved as it is placed), makes the payload durable
/// (`fdatasync`), calls `before_metadata` (an encryption waits there for its keyslot's
/// derivation, which ran alongside the copy), writes the
/// container's metadata last, and makes that durable too. Progress goes to the job's reporter
/// (copy, sync, whatever `before_metadata` reports, header); the job's cancel flag stops the
/// copy and is checked again before the metadata, so a cancelled job never writes it.
///
/// Crash points ([`crate::luks::crash`]): `encrypt:copying` once the first payload bytes are
/// written, `encrypt:payload-durable` after the payload's `fdatasync`, before the metadata.
#[allow(clippy::too_many_arguments)]
pub fn write_container<P: Sync>(
    job: &Job<P>,
    source: &dyn SourceImage,
    output: &CheckedFile,
    engine: &dyn Engine,
    container: &dyn Container,
    sector_size: u32,
    key: &[u8],
    iv: IvMode,
    before_metadata: &mut dyn FnMut() -> Result<()>,
) -> Result<Written> {
    let (extents, total) = match container.payload() {
        Payload::Planned(extents) => {
            let output_size = container.output_size();
            outputs::check_extents(extents, u64::from(sector_size), output_size)?;
            (extents, extents.iter().map(|e| e.length).sum())
        }
        // The copy goes through the granules of the source's allocated ranges, whether it then
        // stores them or drops them as zeros: that is its progress.
        Payload::Allocated(allocator) => (
            &[][..],
            outputs::granule_runs(
                source.allocated_ranges(),
                allocator.granule(),
                allocator.payload_end(),
            )
            .map(|run| run.end - run.start)
            .sum(),
        ),
    };
    job.check_cancel()?;
    prepare_container_output(output, container)?;

    let cancel: &AtomicBool = &job.cancel;
    job.reporter.progress(Phase::Copy, 0, total);
    let copy_started = Instant::now();
    let progress = |done: u64| {
        if done > 0 {
            crash::point("encrypt:copying");
        }
        job.reporter.progress(Phase::Copy, done, total)
    };
    let payload = PayloadJob {
        job_id: job.id,
        source,
        output: &output.file,
        extents,
        sector_size,
        key,
        iv,
        progress: &progress,
        cancel,
    };
    let payload_bytes = match container.payload() {
        Payload::Planned(_) => engine.write_payload(&payload)?,
        Payload::Allocated(allocator) => engine.write_allocated(&payload, allocator)?,
    };
    let copy_elapsed = copy_started.elapsed();

    // The payload is durable before any byte that makes the file look like an image is
    // written: a crash from here on leaves a payload without metadata, never the reverse.
    job.reporter.progress(Phase::Sync, total, total);
    output
        .file
        .sync_data()
        .map_err(|e| Error::io("fdatasync on the output's payload", e))?;
    crash::point("encrypt:payload-durable");
    before_metadata()?;
    job.check_cancel()?;
    job.reporter.progress(Phase::Header, 0, 0);
    container.write_metadata(&output.file)?;
    output
        .file
        .sync_data()
        .map_err(|e| Error::io("fdatasync on the output", e))?;
    Ok(Written {
        payload_bytes,
        copy_elapsed,
    })
}

/// Reserves the output for `container`: raw LUKS fills its whole file, so all of it is
/// reserved; a sparse container starts from an empty file (so its holes read as zeros, never
/// as an earlier file's bytes), its extents reserved as the copy places them.
pub fn prepare_container_output(output: &CheckedFile, container: &dyn Container) -> Result<()> {
    let extents = match container.payload() {
        Payload::Planned(extents) => extents,
        Payload::Allocated(_) => {
            return output
                .file
                .set_len(0)
                .map_err(|e| Error::io("emptying the output", e))
        }
    };
    let dense =
        matches!(extents, [only] if only.output_offset + only.length == container.output_size());
    if dense || output.kind != StorageKind::RegularFile {
        let data_offset = extents.first().map_or(0, |e| e.output_offset);
        return prepare_output(output, container.output_size(), data_offset);
    }
    let size = container.output_size();
    output
        .file
        .set_len(0)
        .and_then(|()| output.file.set_len(size))
        .map_err(|e| Error::io(format!("resizing the output to {size} bytes"), e))?;
    let mut reserved = 0u64;
    for extent in extents {
        reserve(&output.file, extent.output_offset, extent.length, size)?;
        reserved += extent.length;
    }
    tracing::debug!(
        reserved,
        output_size = size,
        "reserved the container's extents"
    );
    Ok(())
}

/// Makes the output exactly `output_size` bytes with all of it reserved, or reports that it
/// cannot hold the image. A block device's old header area is zeroed first, so a job that fails
/// half-way never leaves the device looking like the LUKS volume it used to hold.
pub fn prepare_output(output: &CheckedFile, output_size: u64, data_offset: u64) -> Result<()> {
    match output.kind {
        StorageKind::RegularFile => {
            output
                .file
                .set_len(output_size)
                .map_err(|e| Error::io(format!("resizing the output to {output_size} bytes"), e))?;
            reserve(&output.file, 0, output_size, output_size)
        }
        // `check_output` admits only regular files and block devices.
        StorageKind::BlockDevice | StorageKind::Other(_) => {
            let available = storage::size_of(&output.file)?;
            if available < output_size {
                return Err(no_space(output_size, Some(available)));
            }
            let zeros = vec![0u8; HEADER_CLEAR_CHUNK];
            let mut offset = 0;
            while offset < data_offset {
                let length = (data_offset - offset).min(HEADER_CLEAR_CHUNK as u64) as usize;
                output
                    .file
                    .write_all_at(&zeros[..length], offset)
                    .map_err(|e| Error::io(format!("clearing the output header at {offset}"), e))?;
                offset += length as u64;
            }
            Ok(())
        }
    }
}
