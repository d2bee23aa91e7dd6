//! A raw LUKS encryption streamed into a pipe (`EncryptParameters::stream`): the image's
//! bytes strictly in order, preamble first ([`imgcrypt_proto::stream`]), for a client that
//! uploads them (`imgctl encrypt --upload`) without a local copy.
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

use imgcrypt_proto::api::{EncryptParameters, LuksVersion, Phase};
use imgcrypt_proto::stream::Preamble;

use crate::context::DaemonContext;
use crate::engines::xts::IvMode;
use crate::engines::PayloadJob;
use crate::error::Descriptor;
use crate::keys::SecretBytes;
use crate::luks::{self, layout, HeaderContext, HeaderSpec};
use crate::outputs::luks::{copy_header, LuksOutput};
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

/// Checks `resume_from` against the image this job makes (before anything is read).
pub fn check_resume_from(parameters: &EncryptParameters, virtual_size: u64) -> Result<()> {
    let Some(stream) = &parameters.stream else {
        return Ok(());
    };
    if stream.resume_header.is_none() {
        return Ok(());
    }
    let image_size =
        layout::output_size(expected_data_offset(parameters.luks_version), virtual_size)?;
    if stream.resume_from % 4096 != 0 || stream.resume_from >= image_size {
        return Err(Error::InvalidOption {
            parameter: "stream",
            message: format!(
                "resume_from {} is not a multiple of 4096 below the image's size ({image_size} \
                 bytes): resume from the end of the stored parts, or drop resume_header to \
                 start over",
                stream.resume_from
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
    let idle = || super::only_job(state);
    let context = HeaderContext {
        caps: Some(inputs.caps),
        idle: &idle,
    };
    let header = std::thread::scope(|scope| {
        let (_, pending) =
            super::encrypt::start_format(scope, job, &inputs.key, spec, &volume_key, &context)?;
        super::encrypt::finish_keyslot(job, pending, inputs.caps)
    })?;
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
    let restart = |why: String| {
        let text = format!("{why}: the upload starts over");
        tracing::info!(job = job.id, "{text}");
        job.notice(text);
        Ok(None)
    };
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
    let pipe_file = &inputs.output.file;
    let cancel: &AtomicBool = &job.cancel;
    let never = AtomicBool::new(false);
    let data_offset = container.data_offset();
    let image_size = container.output_size();
    job.check_cancel()?;
    let pipe = pipe::StreamPipe::new(pipe_file)?;
    let preamble = Preamble {
        image_size,
        start,
        header_len: data_offset,
        restarted,
    };
    pipe.write_all(&preamble.encode(), cancel, &never)?;

    let payload_from = start.max(data_offset) - data_offset;
    let total = image_size - start;
    let mut sent = 0u64;
    if start < data_offset {
        job.reporter.progress(Phase::Header, 0, 0);
        let mut buffer = vec![0u8; HEADER_CHUNK];
        let mut offset = start;
        while offset < data_offset {
            let len = (data_offset - offset).min(HEADER_CHUNK as u64) as usize;
            header
                .read_exact_at(&mut buffer[..len], offset)
                .map_err(|e| Error::io(format!("reading the header at {offset}"), e))?;
            pipe.write_all(&buffer[..len], cancel, &never)?;
            offset += len as u64;
        }
        sent = data_offset - start;
    }

    let payload_end = container.payload_size();
    job.reporter.progress(Phase::Copy, sent, total);
    let copy_started = Instant::now();
    let progress = |done: u64| job.reporter.progress(Phase::Copy, sent + done, total);
    let crate::outputs::Payload::Planned(extents) = container.payload() else {
        return Err(Error::io(
            "laying out the streamed payload",
            std::io::Error::other("a raw LUKS output has a planned payload"),
        ));
    };
    let payload = PayloadJob {
        job_id: job.id,
        source: inputs.image.as_ref(),
        output: pipe_file,
        extents,
        sector_size: job.parameters.sector_size,
        key,
        iv: IvMode::Plain64,
        progress: &progress,
        cancel,
    };
    let payload_bytes = inputs
        .engine
        .write_stream(&payload, payload_from..payload_end)?;
    Ok(Written {
        payload_bytes,
        copy_elapsed: copy_started.elapsed(),
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
