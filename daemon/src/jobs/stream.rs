//! A raw LUKS or qcow2 encryption streamed into a pipe (`EncryptParameters::stream`): the
//! image's bytes strictly in order, preamble first ([`imgcrypt_proto::stream`]), for a client
//! that uploads them (`imgctl encrypt --upload`) without a local copy.
//!
//! # Header first
//!
//! A file output gets its header last, once the payload is durable, so that an interrupted job
//! never leaves something that looks like a valid image. A stream cannot seek back, so the
//! header goes first: the job waits for the keyslot's derivation (seconds, against minutes of
//! upload), then streams the preamble, the header and the payload. That is safe for the upload
//! the stream feeds: an S3 object exists only once its multipart upload completes, and the
//! client completes it only when it read the whole stream *and* the daemon's final reply is a
//! success, so no reader ever sees the header over an incomplete payload.
//!
//! # Resuming
//!
//! The client keeps the resume state (which parts are stored, and the header it saved from the
//! stream's first `header_len` bytes); the daemon keeps nothing: no checkpoint, no claim on the
//! output (a pipe has no identity worth claiming). Passed the saved header again
//! (`resume_header`) with the byte to go on from (`resume_from`), the daemon reads it into its
//! own memory (at most [`MAX_RESUME_HEADER`] bytes), checks that it is a header of these
//! parameters for this image's size ([`expected_data_offset`], the payload size), and opens its
//! keyslot with the job's key under the caller's caps (`resume::open_header`, the
//! same path as resuming a file output). The volume key it yields continues the image the
//! stored parts began; nothing is stored, and the caller learns nothing it could not decrypt
//! itself with its key and its header. If the key does not open it, or it is not such a
//! header, the job starts a new image from byte 0 (new volume key, new header), sets the
//! preamble's `restarted` and says why in a notice.
//!
//! # qcow2
//!
//! The file writer puts a qcow2's tables after its data, which a stream cannot do. A streamed
//! qcow2 is laid out metadata first instead ([`PlannedQcow2`]): the source is scanned for its
//! data clusters before anything is sent ([`scan::nonzero_ranges`], phase `scan`: one more
//! read of the allocated bytes, holes never read), then the header cluster, the LUKS header,
//! the refcounts, L1 and L2 tables go out, then the data clusters in guest order. The saved
//! header is the header cluster and the LUKS header (`header_len` = 64 KiB + 2 MiB). On a
//! resume the daemon scans again and plans again; the saved header cluster must be the one it
//! would write (same disk size, same data clusters, so the stored parts are this layout's),
//! and the saved LUKS header must open with the job's key, or the stream starts over, saying
//! why. A VHD is not streamed: its writer fills the block table (at the file's start) as the
//! copy places blocks; planning it from a scan the same way would work, and is not done yet.
//!
//! # A reader that stops
//!
//! Every write goes through a relay pipe only the daemon holds and is spliced on without
//! blocking, whatever flags the client sets on its own pipe, waiting in short `poll` slices
//! that check the job's cancel flag ([`crate::sys::pipe`]): a client that stops reading pins
//! nothing once its connection closes or the job is cancelled, one that takes nothing for
//! [`pipe::STALL_LIMIT`] ends the job with an error that says so, and one that closed the pipe
//! gets the error "the client stopped reading the stream". A streamed job cannot be detached
//! (`detach`): its output is a pipe only the connected client reads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use imgcrypt_proto::api::{EncryptParameters, LuksVersion, OutputFormat, Phase};
use imgcrypt_proto::stream::Preamble;

use crate::context::DaemonContext;
use crate::engines::xts::IvMode;
use crate::engines::PayloadJob;
use crate::error::Descriptor;
use crate::formats::scan;
use crate::keys::SecretBytes;
use crate::luks::{self, layout, HeaderContext, HeaderSpec};
use crate::outputs::luks::{copy_header, copy_header_span, LuksOutput};
use crate::outputs::qcow2::planned::PlannedQcow2;
use crate::outputs::qcow2::CLUSTER_BYTES;
use crate::outputs::Container;
use crate::sys::{memfd, pipe};
use crate::{Error, Result};

use super::encrypt::Inputs;
use super::output::Written;
use super::resume::{open_header, HeaderFacts};
use super::Job;

/// The largest saved header the daemon reads back: the largest header it makes (LUKS2's, see
/// [`expected_data_offset`]).
pub const MAX_RESUME_HEADER: u64 = 16 << 20;

/// Where the payload of a header this daemon formats starts: libcryptsetup's default layout
/// for the daemon's parameters (no data alignment asked, a 512-bit key). LUKS2: 16 MiB (two
/// 16 KiB metadata copies and the default keyslot area); LUKS1: 2 MiB (the phdr and eight
/// keyslots' anti-forensic material, aligned to 1 MiB). Checked against real formats by this
/// module's tests; a saved header with another data offset is not one this job would make.
pub fn expected_data_offset(version: LuksVersion) -> u64 {
    match version {
        LuksVersion::Luks1 => 2 << 20,
        LuksVersion::Luks2 => 16 << 20,
    }
}

/// Checks `resume_from` against the raw LUKS image this job makes (before anything is read; a
/// streamed qcow2's size is known once its source is scanned, and it is checked then).
pub fn check_resume_from(
    parameters: &EncryptParameters,
    format: OutputFormat,
    virtual_size: u64,
) -> Result<()> {
    let Some(stream) = &parameters.stream else {
        return Ok(());
    };
    if stream.resume_header.is_none() || format != OutputFormat::Luks {
        return Ok(());
    }
    let image_size =
        layout::output_size(expected_data_offset(parameters.luks_version), virtual_size)?;
    check_resume_offset(stream.resume_from, image_size)
}

/// Refuses a `resume_from` that is not a 4096-byte boundary inside an image of `image_size`.
fn check_resume_offset(resume_from: u64, image_size: u64) -> Result<()> {
    if resume_from % 4096 != 0 || resume_from >= image_size {
        return Err(Error::InvalidOption {
            parameter: "stream",
            message: format!(
                "resume_from {resume_from} is not a multiple of 4096 below the image's size \
                 ({image_size} bytes): resume from the end of the stored parts, or drop \
                 resume_header to start over"
            ),
        });
    }
    Ok(())
}

/// The header and volume key a stream goes on with.
struct Resumed {
    /// Daemon memfd sized as the image; its first `data_offset` bytes are the saved header.
    header: File,
    volume_key: SecretBytes,
    facts: HeaderFacts,
}

/// Streams the raw LUKS image of `inputs` into the output pipe (see the module
/// documentation): a resumed stream from `resume_from` with the saved header's volume key, or
/// a new image from byte 0.
pub(super) fn encrypt(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    state: &DaemonContext,
    spec: &HeaderSpec,
) -> Result<(LuksOutput, Written, HeaderFacts)> {
    let virtual_size = inputs.image.virtual_size();
    let stream = job.parameters.stream.clone().unwrap_or_default();
    let resumed = match &inputs.resume_header {
        Some((saved, len)) => resume(job, inputs, saved, *len)?,
        None => None,
    };
    let restarted = inputs.resume_header.is_some() && resumed.is_none();
    if let Some(resumed) = resumed {
        let from = stream.resume_from;
        job.notice(format!(
            "resuming the interrupted stream at image byte {from}: the saved header is this \
             image's and the key opens it"
        ));
        job.reporter.audit().resumed_from(from);
        let container = LuksOutput::plan(&resumed.header, resumed.facts.data_offset, virtual_size)?;
        let written = send(
            job,
            inputs,
            &container,
            &resumed.header,
            resumed.volume_key.as_bytes(),
            from,
            false,
        )?;
        return Ok((container, written, resumed.facts));
    }

    // A new image: its header complete (the keyslot derived) before the first byte goes out.
    job.check_cancel()?;
    job.reporter.progress(Phase::Format, 0, 0);
    let volume_key = SecretBytes::random(luks::VOLUME_KEY_BYTES)?;
    let header = format_now(job, inputs, state, spec, &volume_key)?;
    tracing::info!(job = job.id, "the header is complete: streaming it first");
    let container = LuksOutput::plan(&header.image, header.data_offset, virtual_size)?;
    let written = send(
        job,
        inputs,
        &container,
        &header.image,
        volume_key.as_bytes(),
        0,
        restarted,
    )?;
    Ok((container, written, HeaderFacts::fresh(header)))
}

/// The saved header opened with the job's key, or `None` (with a notice saying why) to start
/// over.
fn resume(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    saved: &File,
    len: u64,
) -> Result<Option<Resumed>> {
    let parameters = &job.parameters;
    let version = parameters.luks_version.display_name();
    let data_offset = expected_data_offset(parameters.luks_version);
    let virtual_size = inputs.image.virtual_size();
    let restart = |why: String| start_over(job, why);
    let not_this_image = |why: String| {
        restart(format!(
            "the saved header of the interrupted upload is not a {version} header of this \
             image's size ({virtual_size}-byte disk, {}-byte sectors): {why}",
            parameters.sector_size
        ))
    };
    if len != data_offset {
        return not_this_image(format!(
            "it is {len} bytes, where this image's header is {data_offset}"
        ));
    }
    let image_size = layout::output_size(data_offset, virtual_size)?;
    // Daemon memory sized as the image (what libcryptsetup checks the header against), holding
    // the saved bytes only: read on this blocking thread, at most MAX_RESUME_HEADER of them.
    let header = memfd::create("imgcrypt-stream-resume-header")?;
    header
        .set_len(image_size)
        .map_err(|e| Error::io("sizing the in-memory copy of the saved header", e))?;
    copy_header(saved, &header, len).map_err(|error| match error {
        Error::Io { operation, source } => Error::Io {
            operation: format!("{} descriptor: {operation}", Descriptor::ResumeHeader),
            source,
        },
        other => other,
    })?;
    job.check_cancel()?;
    let opened = match open_header(
        job,
        &header,
        &inputs.key,
        &inputs.key_name,
        inputs.caps,
        data_offset,
        parameters.luks_version,
    ) {
        Ok(opened) => opened,
        Err(Error::Cancelled) => return Err(Error::Cancelled),
        Err(Error::WrongKey { .. }) => {
            return restart(
                "the key no longer opens the header of the interrupted upload".to_string(),
            )
        }
        Err(error) => return not_this_image(error.to_string()),
    };
    let payload_size = layout::payload_size(data_offset, virtual_size)?;
    if opened.luks.payload_size() != payload_size {
        return not_this_image(format!(
            "its payload is {} bytes, where this image's is {payload_size}",
            opened.luks.payload_size()
        ));
    }
    let facts = HeaderFacts {
        cipher: opened.luks.cipher().to_string(),
        key_size_bits: opened.luks.key_size_bits(),
        data_offset,
        pbkdf: opened.pbkdf,
        formatted: None,
        resumed_from: parameters.stream.as_ref().map(|stream| stream.resume_from),
    };
    Ok(Some(Resumed {
        header,
        volume_key: opened.volume_key,
        facts,
    }))
}

/// Starts the stream over from byte 0, saying why in a notice (and the log).
fn start_over<T>(job: &Job<EncryptParameters>, why: String) -> Result<Option<T>> {
    let text = format!("{why}: the upload starts over");
    tracing::info!(job = job.id, "{text}");
    job.notice(text);
    Ok(None)
}

/// Chunk in which the header goes into the pipe.
const HEADER_CHUNK: usize = 1 << 20;

/// Streams the preamble, then image bytes `start..` of `container`: the bytes of `header`
/// (a daemon memfd whose first `data_offset` bytes are the header) that fall there, then the
/// payload through the engine's pipeline.
fn send(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    container: &LuksOutput,
    header: &File,
    key: &[u8],
    start: u64,
    restarted: bool,
) -> Result<Written> {
    let data_offset = container.data_offset();
    let crate::outputs::Payload::Planned(extents) = container.payload() else {
        return Err(Error::io(
            "laying out the streamed payload",
            std::io::Error::other("a raw LUKS output has a planned payload"),
        ));
    };
    let payload_from = start.max(data_offset) - data_offset;
    let image = StreamedImage {
        preamble: Preamble {
            image_size: container.output_size(),
            start,
            header_len: data_offset,
            restarted,
        },
        head_end: data_offset,
        extents,
        payload: payload_from..container.payload_size(),
        sector_size: job.parameters.sector_size,
    };
    stream_image(job, inputs, &image, key, &mut |sink| {
        let mut buffer = vec![0u8; HEADER_CHUNK];
        let mut offset = start;
        while offset < data_offset {
            let len = (data_offset - offset).min(HEADER_CHUNK as u64) as usize;
            header
                .read_exact_at(&mut buffer[..len], offset)
                .map_err(|e| Error::io(format!("reading the header at {offset}"), e))?;
            sink(&buffer[..len])?;
            offset += len as u64;
        }
        Ok(())
    })
}

/// What [`stream_image`] sends: the preamble, the image's head (its bytes before the payload:
/// a header, or a qcow2's metadata) from `preamble.start`, then the guest range `payload` of
/// `extents`, whose ciphertext follows the head in the image without a gap.
struct StreamedImage<'a> {
    preamble: Preamble,
    /// Where the head ends and the payload starts in the image.
    head_end: u64,
    extents: &'a [crate::outputs::Extent],
    payload: std::ops::Range<u64>,
    sector_size: u32,
}

/// Where a stream's head goes: into the pipe, in order.
type Sink<'a> = dyn FnMut(&[u8]) -> Result<()> + 'a;

/// Streams `image` into the job's output pipe: the preamble, the head's bytes from the
/// stream's start (`send_head` passes them, in order, to the sink it is given), then the
/// payload through the engine's pipeline.
fn stream_image(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    image: &StreamedImage<'_>,
    key: &[u8],
    send_head: &mut dyn FnMut(&mut Sink<'_>) -> Result<()>,
) -> Result<Written> {
    let pipe_file = &inputs.output.file;
    let cancel: &AtomicBool = &job.cancel;
    let never = AtomicBool::new(false);
    let start = image.preamble.start;
    job.check_cancel()?;
    let pipe = pipe::StreamPipe::new(pipe_file)?;
    pipe.write_all(&image.preamble.encode(), cancel, &never)?;
    let total = image.preamble.image_size - start;
    if start < image.head_end {
        job.reporter.progress(Phase::Header, 0, 0);
        send_head(&mut |bytes| pipe.write_all(bytes, cancel, &never))?;
    }
    let sent = image.head_end.saturating_sub(start);
    job.reporter.progress(Phase::Copy, sent, total);
    let copy_started = Instant::now();
    let payload_bytes = if image.payload.is_empty() {
        0
    } else {
        let progress = |done: u64| job.reporter.progress(Phase::Copy, sent + done, total);
        let payload = PayloadJob {
            job_id: job.id,
            source: inputs.image.as_ref(),
            output: pipe_file,
            extents: image.extents,
            sector_size: image.sector_size,
            key,
            iv: IvMode::Plain64,
            progress: &progress,
            cancel,
        };
        inputs
            .engine
            .write_stream(&payload, image.payload.clone())?
    };
    Ok(Written {
        payload_bytes,
        copy_elapsed: copy_started.elapsed(),
    })
}

/// Streams the qcow2 image of `inputs` into the output pipe (see the module documentation):
/// the source scanned for its data clusters, the image planned metadata first
/// ([`PlannedQcow2`]), then a resumed stream from `resume_from` with the saved header's volume
/// key, or a new image from byte 0.
pub(super) fn encrypt_qcow2(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    state: &DaemonContext,
    spec: &HeaderSpec,
) -> Result<(PlannedQcow2, Written, HeaderFacts)> {
    let image = inputs.image.as_ref();
    let stream = job.parameters.stream.clone().unwrap_or_default();
    let ranges = {
        let progress = |done: u64, total: u64| job.reporter.progress(Phase::Scan, done, total);
        let scanned = scan::nonzero_ranges(image, CLUSTER_BYTES, &progress, &job.cancel)?;
        tracing::info!(
            job = job.id,
            data_bytes = scanned.data_bytes(),
            scanned_bytes = scanned.scanned_bytes,
            granule = scanned.granule,
            "scanned the source for the streamed qcow2's data clusters"
        );
        scanned.ranges
    };
    let resumed = match &inputs.resume_header {
        Some((saved, len)) => resume_qcow2(job, inputs, &ranges, saved, *len)?,
        None => None,
    };
    let restarted = inputs.resume_header.is_some() && resumed.is_none();
    if let Some((plan, volume_key, facts)) = resumed {
        let from = stream.resume_from;
        job.notice(format!(
            "resuming the interrupted stream at image byte {from}: the saved header is this \
             image's and the key opens it"
        ));
        job.reporter.audit().resumed_from(from);
        let written = send_qcow2(job, inputs, &plan, volume_key.as_bytes(), from, false)?;
        return Ok((plan, written, facts));
    }

    job.check_cancel()?;
    job.reporter.progress(Phase::Format, 0, 0);
    let volume_key = SecretBytes::random(luks::VOLUME_KEY_BYTES)?;
    let header = format_now(job, inputs, state, spec, &volume_key)?;
    let plan = PlannedQcow2::new(
        image.virtual_size(),
        &ranges,
        &header.image,
        header.data_offset,
    )?;
    tracing::info!(
        job = job.id,
        "the header is complete: streaming the qcow2's metadata first"
    );
    let written = send_qcow2(job, inputs, &plan, volume_key.as_bytes(), 0, restarted)?;
    Ok((plan, written, HeaderFacts::fresh(header)))
}

/// Formats the header around `volume_key` and waits for its keyslot: a stream's header goes
/// out complete, before the first byte.
fn format_now(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    state: &DaemonContext,
    spec: &HeaderSpec,
    volume_key: &SecretBytes,
) -> Result<luks::FormattedHeader> {
    let idle = || super::only_job(state);
    let context = HeaderContext {
        caps: Some(inputs.caps),
        idle: &idle,
    };
    std::thread::scope(|scope| {
        let (_, pending) =
            super::encrypt::start_format(scope, job, &inputs.key, spec, volume_key, &context)?;
        super::encrypt::finish_keyslot(job, pending, inputs.caps)
    })
}

/// The saved header of an interrupted qcow2 stream, checked and opened: the plan (which must
/// have the saved header cluster: the same disk size and data clusters), the volume key, and
/// the facts; or `None` (with a notice saying why) to start over.
fn resume_qcow2(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    ranges: &[std::ops::Range<u64>],
    saved: &File,
    len: u64,
) -> Result<Option<(PlannedQcow2, SecretBytes, HeaderFacts)>> {
    let luks_length = expected_data_offset(LuksVersion::Luks1);
    let virtual_size = inputs.image.virtual_size();
    let not_this_image = |why: String| {
        start_over(
            job,
            format!(
                "the saved header of the interrupted upload is not the qcow2 header of this \
                 image ({virtual_size}-byte disk, data where the source has it now): {why}"
            ),
        )
    };
    let expected_len = CLUSTER_BYTES + luks_length;
    if len != expected_len {
        return not_this_image(format!(
            "it is {len} bytes, where this image's header cluster and LUKS header are \
             {expected_len}"
        ));
    }
    let descriptor_error = |error: Error| match error {
        Error::Io { operation, source } => Error::Io {
            operation: format!("{} descriptor: {operation}", Descriptor::ResumeHeader),
            source,
        },
        other => other,
    };
    let mut saved_cluster = vec![0u8; CLUSTER_BYTES as usize];
    saved
        .read_exact_at(&mut saved_cluster, 0)
        .map_err(|e| descriptor_error(Error::io("reading the saved qcow2 header cluster", e)))?;
    // Daemon memory holding the saved LUKS header at offset 0, where libcryptsetup reads it.
    let luks_header = memfd::create("imgcrypt-stream-resume-header")?;
    luks_header
        .set_len(luks_length + virtual_size.next_multiple_of(512))
        .map_err(|e| Error::io("sizing the in-memory copy of the saved header", e))?;
    copy_header_span(saved, CLUSTER_BYTES, &luks_header, 0, luks_length)
        .map_err(descriptor_error)?;
    let plan = PlannedQcow2::new(virtual_size, ranges, &luks_header, luks_length)?;
    if plan.header_cluster() != saved_cluster {
        return not_this_image(
            "its header cluster differs from this image's (the disk's size, or where its data \
             lies, has changed)"
                .to_string(),
        );
    }
    let stream = job.parameters.stream.clone().unwrap_or_default();
    check_resume_offset(stream.resume_from, plan.output_size())?;
    job.check_cancel()?;
    let opened = match open_header(
        job,
        &luks_header,
        &inputs.key,
        &inputs.key_name,
        inputs.caps,
        luks_length,
        LuksVersion::Luks1,
    ) {
        Ok(opened) => opened,
        Err(Error::Cancelled) => return Err(Error::Cancelled),
        Err(Error::WrongKey { .. }) => {
            return start_over(
                job,
                "the key no longer opens the header of the interrupted upload".to_string(),
            )
        }
        Err(error) => return not_this_image(error.to_string()),
    };
    let facts = HeaderFacts {
        cipher: opened.luks.cipher().to_string(),
        key_size_bits: opened.luks.key_size_bits(),
        data_offset: luks_length,
        pbkdf: opened.pbkdf,
        formatted: None,
        resumed_from: Some(stream.resume_from),
    };
    Ok(Some((plan, opened.volume_key, facts)))
}

/// Streams the preamble, then bytes `start..` of the planned qcow2 `plan`: its metadata from
/// there, then its data runs through the engine's pipeline.
fn send_qcow2(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    plan: &PlannedQcow2,
    key: &[u8],
    start: u64,
    restarted: bool,
) -> Result<Written> {
    let extents = plan.extents();
    let payload = match (extents.first(), extents.last()) {
        (Some(first), Some(last)) => {
            plan.guest_at(start).unwrap_or(first.guest_offset)..last.guest_end()
        }
        // No data: the metadata is the whole image.
        _ => 0..0,
    };
    let image = StreamedImage {
        preamble: Preamble {
            image_size: plan.output_size(),
            start,
            header_len: plan.resume_header_len(),
            restarted,
        },
        head_end: plan.metadata_bytes(),
        extents,
        payload,
        sector_size: 512,
    };
    stream_image(job, inputs, &image, key, &mut |sink| {
        plan.send_metadata(start, &mut |_, bytes| sink(bytes))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_data_offsets_are_what_the_daemon_formats() {
        for (version, sector_size) in [
            (LuksVersion::Luks1, 512),
            (LuksVersion::Luks2, 512),
            (LuksVersion::Luks2, 4096),
        ] {
            let spec = HeaderSpec {
                version,
                sector_size,
                pbkdf: imgcrypt_proto::api::Pbkdf {
                    kind: Some(imgcrypt_proto::api::PbkdfKind::Pbkdf2),
                    iterations: Some(1000),
                    ..Default::default()
                },
            };
            let volume_key = SecretBytes::random(luks::VOLUME_KEY_BYTES).unwrap();
            let mut passphrase = SecretBytes::zeroed(10).unwrap();
            passphrase.as_mut_bytes().copy_from_slice(b"passphrase");
            let header = luks::format_header(&spec, &volume_key, &passphrase, "fp").unwrap();
            assert_eq!(
                header.data_offset,
                expected_data_offset(version),
                "{version:?}"
            );
            assert!(header.data_offset <= MAX_RESUME_HEADER);
        }
    }
}
