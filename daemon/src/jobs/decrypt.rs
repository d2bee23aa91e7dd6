//! `io.imgcrypt.Decrypt`: an encrypted image (raw LUKS, qcow2 with LUKS, blktap VHD) in, its
//! plaintext out through the caller's descriptor.
//!
//! The whole guest view is written: for raw LUKS the whole payload (LUKS keeps no record of
//! the source's virtual size, so an image imgcrypt made decrypts to the source followed by the
//! zeros of the last MiB); for containers their virtual size. The payload is decrypted in this
//! process (AES-XTS, the same code as the userspace engine) whatever engines the host has:
//! decryption needs no device and is as fast as the copy.

use std::time::Instant;

use std::ops::Range;

use imgcrypt_proto::api::{DecryptParameters, DecryptSummary, EngineKind, OutputFormat, Phase};

use crate::context::DaemonContext;
use crate::engines::userspace::UserspaceEngine;
use crate::engines::xts::IvMode;
use crate::engines::PayloadJob;
use crate::error::Descriptor;
use crate::outputs::luks::payload_extent;
use crate::sys::descriptors;
use crate::sys::storage::StorageKind;
use crate::{Error, Result};

use super::output::prepare_output;
use super::unlock::{self, Purpose};
use super::{millis, Job};

/// Runs the job.
pub fn run(mut job: Job<DecryptParameters>, state: &DaemonContext) -> Result<DecryptSummary> {
    let started = Instant::now();
    let parameters = job.parameters.clone();
    let image = descriptors::check_readable_image(
        job.descriptors.take(Descriptor::Image, parameters.image)?,
        Descriptor::Image,
    )?;
    let output = descriptors::check_writable_image(
        job.descriptors
            .take(Descriptor::Output, parameters.output)?,
        Descriptor::Output,
    )?;
    if image.same_file_as(&output)? {
        return Err(Error::bad_descriptor(
            Descriptor::Output,
            "is the same file as the image: write the plaintext to a new file",
        ));
    }
    let keys = unlock::collect(&mut job, state, &parameters.keys, None, Purpose::Decrypt)?;
    let image = unlock::lock_image(image.file, false)?;
    let opened = unlock::open_plaintext(&job, &image, &keys)?;
    let unlocked = opened.unlocked;
    let payload_size = opened.plaintext.virtual_size();

    job.check_cancel()?;
    // A sparse container (a 2 TiB VHD holding 4 MiB) decrypts to a sparse file: only its
    // allocated ranges are written, the rest stays holes of a freshly emptied file. Raw LUKS,
    // and any block device (whose old bytes must be overwritten), get every byte written.
    let sparse = opened.format != OutputFormat::Luks && output.kind == StorageKind::RegularFile;
    let ranges: Vec<Range<u64>> = if sparse {
        output
            .file
            .set_len(0)
            .and_then(|()| output.file.set_len(payload_size))
            .map_err(|e| Error::io(format!("resizing the output to {payload_size} bytes"), e))?;
        let sector = u64::from(opened.sector_size);
        opened
            .plaintext
            .allocated_ranges()
            .iter()
            .map(|range| (range.start / sector * sector)..range.end.min(payload_size))
            .filter(|range| !range.is_empty())
            .collect()
    } else {
        prepare_output(&output, payload_size, 0)?;
        std::iter::once(0..payload_size).collect()
    };
    let total: u64 = ranges.iter().map(|range| range.end - range.start).sum();
    let copy_started = Instant::now();
    job.reporter.audit().engine(EngineKind::Userspace);
    job.reporter.progress(Phase::Copy, 0, total);
    let mut done = 0u64;
    let extents = [payload_extent(0, payload_size)];
    for range in ranges {
        let base = done;
        let progress = |written: u64| job.reporter.progress(Phase::Copy, base + written, total);
        UserspaceEngine::new().copy_range(
            &PayloadJob {
                job_id: job.id,
                source: opened.plaintext.as_ref(),
                output: &output.file,
                // The plaintext goes to offset 0 of the output, as read (no cipher: the
                // source decrypts).
                extents: &extents,
                sector_size: opened.sector_size,
                // Unused: the source decrypts, nothing is encrypted on the way out.
                key: &[],
                iv: IvMode::Plain64,
                progress: &progress,
                cancel: &job.cancel,
            },
            false,
            range.clone(),
        )?;
        done += range.end - range.start;
    }
    let copy_ms = millis(copy_started.elapsed());
    for note in opened.plaintext.read_notes() {
        job.notice(note);
    }

    job.check_cancel()?;
    job.reporter
        .progress(Phase::Sync, payload_size, payload_size);
    output
        .file
        .sync_data()
        .map_err(|e| Error::io("fdatasync on the output", e))?;
    tracing::info!(job = job.id, payload_size, key = %unlocked.key_name, "decrypted");
    Ok(DecryptSummary {
        unlocked,
        payload_size,
        elapsed_ms: millis(started.elapsed()),
        copy_ms,
    })
}
