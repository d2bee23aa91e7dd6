//! `io.imgcrypt.Encrypt`: a source image in, a LUKS image out, in one pass.
//!
//! Order matters for safety and for what a failure leaves behind:
//! 1. everything the client sent is checked before any work (options, descriptors, key file,
//!    source format), so bad input costs nothing and touches nothing;
//! 2. the header is formatted on daemon-owned memory, never on the client's descriptor;
//! 3. space for the whole output is reserved before the copy, so a full disk is reported at
//!    once rather than after minutes of work;
//! 4. the payload is written first and the header last, so an interrupted job never leaves
//!    something that looks like a valid LUKS image;
//! 5. the data is made durable (`fdatasync`) before success is reported; only then does the
//!    client give the file its final name.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use imgcrypt_proto::api::{EncryptParameters, LuksVersion, Phase, Summary};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::engines::PayloadJob;
use crate::error::Descriptor;
use crate::keys::ring;
use crate::keys::{self, secret::SecretBytes, strength, CandidateKey};
use crate::luks::cost::KdfCaps;
use crate::luks::{self, layout, HeaderSpec, VOLUME_KEY_BYTES};
use crate::sys::descriptors::{self, CheckedFile};
use crate::sys::storage::{self, StorageKind};
use crate::{formats, Error, Result};

use super::{millis, Job};
use crate::server::ServerState;

/// Chunk used to copy the header from daemon memory into the output.
const HEADER_COPY_CHUNK: usize = 1 << 20;

/// Runs the job to completion on the calling (blocking) thread.
pub fn run(mut job: Job<EncryptParameters>, state: &ServerState) -> Result<Summary> {
    let started = Instant::now();
    let job_id = job.id;
    let parameters = job.parameters.clone();
    let reporter = &job.reporter;
    let cancel: &AtomicBool = &job.cancel;

    let header_spec = HeaderSpec {
        version: parameters.luks_version,
        sector_size: parameters.sector_size,
        pbkdf: parameters.pbkdf.clone().unwrap_or_default(),
    };
    header_spec.validate()?;
    // Non-root callers get tighter caps on what one derivation of their keyslot may cost.
    let caps = KdfCaps::for_caller(job.caller_uid);
    caps.check_request(&header_spec)?;
    let engine = state.engines.resolve(parameters.engine)?;

    // The output last, so a refusal to write over another of the call's files names its role
    // (`PassedDescriptors::take` refuses an output that is the source or the key).
    let passed = &mut job.descriptors;
    let source = descriptors::check_source(passed.take(Descriptor::Source, parameters.source)?)?;
    let passed_key = match parameters.key {
        Some(index) => Some(descriptors::check_key(
            passed.take(Descriptor::Key, index)?,
        )?),
        None => None,
    };
    let output = descriptors::check_output(passed.take(Descriptor::Output, parameters.output)?)?;

    // No key passed: the daemon ring's, re-read now so a rotated key is used without a restart.
    let CandidateKey {
        name: key_name,
        key,
    } = match passed_key {
        Some(file) => CandidateKey {
            name: "passed key".to_string(),
            key: keys::read_key_file(&file)?,
        },
        None => ring::encryption_key_for_job(state.config.key_ring.as_deref())?,
    };
    for warning in &key.warnings {
        tracing::warn!(job = job_id, "{warning}");
        reporter.notice(warning.clone());
    }
    tracing::info!(job = job_id, key = %key_name, fingerprint = %key.fingerprint, "key");

    let source_kind = source.kind;
    let image = formats::open(source.file)?;
    let virtual_size = image.virtual_size();
    if virtual_size == 0 {
        return Err(Error::UnsupportedImage {
            message: "the source disk is empty (virtual size 0): there is nothing to encrypt"
                .to_string(),
        });
    }
    tracing::info!(
        job = job_id,
        format = image.format().display_name(),
        ?source_kind,
        virtual_size,
        luks = parameters.luks_version.display_name(),
        sector_size = parameters.sector_size,
        engine = ?engine.kind(),
        "encrypting"
    );

    job.check_cancel()?;
    reporter.progress(Phase::Format, 0, 0);
    let volume_key = SecretBytes::random(VOLUME_KEY_BYTES)?;
    let header = luks::format_header(&header_spec, &volume_key, &key.passphrase, &key.fingerprint)?;
    caps.check_created(&header.cost)?;
    if !header.fingerprint_stored && parameters.luks_version == LuksVersion::Luks2 {
        if let Some(text) = strength::notice(&key_name, key.passphrase.as_bytes())? {
            tracing::warn!(job = job_id, "{text}");
            reporter.notice(text);
        }
    }
    let output_size = layout::output_size(header.data_offset, virtual_size)?;
    let payload_size = output_size - header.data_offset;

    job.check_cancel()?;
    prepare_output(&output, output_size, header.data_offset)?;

    reporter.progress(Phase::Copy, 0, payload_size);
    let copy_started = Instant::now();
    let progress = |done: u64| reporter.progress(Phase::Copy, done, payload_size);
    let payload_written = engine.write_payload(&PayloadJob {
        job_id,
        source: image.as_ref(),
        output: &output.file,
        data_offset: header.data_offset,
        payload_size,
        sector_size: parameters.sector_size,
        volume_key: volume_key.as_bytes(),
        progress: &progress,
        cancel,
    })?;
    drop(volume_key);
    let copy_elapsed = copy_started.elapsed();

    job.check_cancel()?;
    copy_header(&header.image, &output.file, header.data_offset)?;
    reporter.progress(Phase::Sync, payload_size, payload_size);
    output
        .file
        .sync_data()
        .map_err(|e| Error::io("fdatasync on the output", e))?;

    let elapsed = started.elapsed();
    let summary = Summary {
        source_format: image.format(),
        virtual_size,
        luks_version: parameters.luks_version,
        cipher: header.cipher,
        key_size_bits: header.key_size_bits,
        sector_size: parameters.sector_size,
        data_offset: header.data_offset,
        payload_size,
        output_size,
        key_fingerprint: key.fingerprint,
        pbkdf: header.pbkdf,
        engine: engine.kind(),
        elapsed_ms: millis(elapsed),
        copy_ms: millis(copy_elapsed),
        bytes_written: header.data_offset + payload_written,
    };
    tracing::info!(
        job = job_id,
        output_size,
        data_offset = summary.data_offset,
        elapsed_ms = summary.elapsed_ms,
        fingerprint = %summary.key_fingerprint,
        "encrypted"
    );
    Ok(summary)
}

/// Makes the output exactly `output_size` bytes with all of it reserved, or reports that it
/// cannot hold the image. A block device's old header area is zeroed first, so a job that fails
/// half-way never leaves the device looking like the LUKS volume it used to hold.
pub(super) fn prepare_output(
    output: &CheckedFile,
    output_size: u64,
    data_offset: u64,
) -> Result<()> {
    match output.kind {
        StorageKind::RegularFile => {
            output
                .file
                .set_len(output_size)
                .map_err(|e| Error::io(format!("resizing the output to {output_size} bytes"), e))?;
            let length = i64::try_from(output_size).map_err(|_| no_space(output_size, None))?;
            match fallocate(&output.file, FallocateFlags::empty(), 0, length) {
                Ok(()) => Ok(()),
                Err(Errno::ENOSPC) | Err(Errno::EDQUOT) => Err(no_space(output_size, None)),
                // Filesystems without fallocate still work; ENOSPC then surfaces on write.
                Err(Errno::EOPNOTSUPP) => Ok(()),
                Err(errno) => Err(Error::io(
                    "reserving space for the output (fallocate)",
                    errno,
                )),
            }
        }
        // `check_output` admits only regular files and block devices.
        StorageKind::BlockDevice | StorageKind::Other(_) => {
            let available = storage::size_of(&output.file)?;
            if available < output_size {
                return Err(no_space(output_size, Some(available)));
            }
            let zeros = vec![0u8; HEADER_COPY_CHUNK];
            let mut offset = 0;
            while offset < data_offset {
                let length = (data_offset - offset).min(HEADER_COPY_CHUNK as u64) as usize;
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

fn no_space(required: u64, device_size: Option<u64>) -> Error {
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

/// Copies the formatted header (`0..data_offset` of the daemon's memfd) into the output.
pub(super) fn copy_header(header: &File, output: &File, data_offset: u64) -> Result<()> {
    let mut buffer = vec![0u8; HEADER_COPY_CHUNK];
    let mut offset = 0;
    while offset < data_offset {
        let length = (data_offset - offset).min(HEADER_COPY_CHUNK as u64) as usize;
        header
            .read_exact_at(&mut buffer[..length], offset)
            .map_err(|e| Error::io(format!("reading the formatted header at {offset}"), e))?;
        output
            .write_all_at(&buffer[..length], offset)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    no_space(data_offset, None)
                } else {
                    Error::io(format!("writing the header to the output at {offset}"), e)
                }
            })?;
        offset += length as u64;
    }
    Ok(())
}
