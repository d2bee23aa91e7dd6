//! `io.imgcrypt.Decrypt`: a LUKS image in, its plaintext payload out through the caller's
//! descriptor.
//!
//! The whole payload is written: LUKS keeps no record of the source's virtual size, so an image
//! imgcrypt made decrypts to the source followed by the zeros of the last MiB. The payload is
//! decrypted in this process (AES-XTS, the same code as the userspace engine) whatever engines
//! the host has: decryption needs no device and is as fast as the copy.

use std::time::Instant;

use imgcrypt_proto::api::{DecryptParameters, DecryptSummary, Phase};

use crate::engines::userspace::UserspaceEngine;
use crate::engines::PayloadJob;
use crate::error::Descriptor;
use crate::luks::LuksPayload;
use crate::server::ServerState;
use crate::sys::descriptors;
use crate::{Error, Result};

use super::encrypt::prepare_output;
use super::unlock::{self, Purpose};
use super::{millis, Job};

/// Runs the job.
pub fn run(mut job: Job<DecryptParameters>, state: &ServerState) -> Result<DecryptSummary> {
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
    let (luks, volume_key, unlocked) = unlock::open_image(&job, &image, &keys)?;
    let payload_size = luks.payload_size();
    let sector_size = luks.sector_size();
    let data_offset = luks.data_offset();
    drop(luks);

    job.check_cancel()?;
    prepare_output(&output, payload_size, 0)?;
    let payload = LuksPayload::new(
        image
            .try_clone()
            .map_err(|e| Error::io("duplicating the image descriptor", e))?,
        data_offset,
        payload_size,
        sector_size,
        &volume_key,
    )?;
    let copy_started = Instant::now();
    job.reporter.progress(Phase::Copy, 0, payload_size);
    let progress = |done: u64| job.reporter.progress(Phase::Copy, done, payload_size);
    UserspaceEngine::new().copy_range(
        &PayloadJob {
            job_id: job.id,
            source: &payload,
            output: &output.file,
            data_offset: 0,
            payload_size,
            sector_size,
            volume_key: volume_key.as_bytes(),
            progress: &progress,
            cancel: &job.cancel,
        },
        false,
        0..payload_size,
    )?;
    let copy_ms = millis(copy_started.elapsed());
    drop(volume_key);

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
