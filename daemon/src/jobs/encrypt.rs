//! `io.imgcrypt.Encrypt`: a source image in, an encrypted image out (raw LUKS, qcow2 with
//! LUKS, or a blktap-encrypted VHD), in one pass.
//!
//! Order matters for safety and for what a failure leaves behind:
//! 1. everything the client sent is checked before any work (options, target rules,
//!    descriptors, key file, source format), so bad input costs nothing and touches nothing;
//! 2. a LUKS header is formatted on daemon-owned memory, never on the client's descriptor,
//!    with the PBKDF iterations its benchmark chose (cached per configuration); the keyslot's
//!    key derivation runs on its own thread while the payload is copied;
//! 3. space for the output is reserved before it is written: all of a raw LUKS output before
//!    the copy, so a full disk is reported at once rather than after minutes of work; a sparse
//!    container's clusters or blocks as the copy places them (how many hold data is known only
//!    once they are read; an upper bound from the allocated ranges would refuse a `dd`-made
//!    raw disk that is mostly zeros), so its full disk is reported when the copy reaches it;
//! 4. the payload is written first and made durable, and the metadata (the LUKS header with
//!    its derived keyslot) last ([`Container::write_metadata`]), so an interrupted job never
//!    leaves something that looks like a valid image;
//! 5. the data is made durable (`fdatasync`) before success is reported; only then does the
//!    client give the file its final name.
//!
//! The three formats share all of that ([`super::output::write_container`]); each arm below
//! only formats its header (if any) and plans its container.

use std::time::Instant;

use imgcrypt_proto::api::{
    EncryptParameters, EngineChoice, LuksVersion, OutputFormat, PbkdfBenchmark, Phase, Summary,
};

use crate::engines::xts::IvMode;
use crate::engines::Engine;
use crate::error::Descriptor;
use crate::formats::files::{FileKey, SourceFiles};
use crate::formats::SourceImage;
use crate::keys::ring;
use crate::keys::{self, secret::SecretBytes, strength, CandidateKey, KeyFile};
use crate::luks::cost::KdfCaps;
use crate::luks::{self, HeaderContext, HeaderSpec, Stage, VOLUME_KEY_BYTES};
use crate::outputs::{luks::LuksOutput, qcow2::Qcow2Output, vhd::VhdOutput, Container};
use crate::sys::descriptors::{self, CheckedFile};
use crate::sys::storage::StorageKind;
use crate::{formats, Error, Result};

use super::output::{self, Written};
use super::{millis, resume, targets, unlock, Job};
use crate::context::DaemonContext;

/// What every format's arm starts from: the checked inputs.
pub(super) struct Inputs {
    pub(super) image: Box<dyn SourceImage>,
    /// The output; for a stream, a pipe's write end.
    pub(super) output: CheckedFile,
    pub(super) key_name: String,
    pub(super) key: KeyFile,
    pub(super) engine: std::sync::Arc<dyn Engine>,
    pub(super) caps: &'static KdfCaps,
    /// The source file's identity, for a resume checkpoint.
    stat: resume::SourceStat,
    /// A stream's saved header to resume from, and its length.
    pub(super) resume_header: Option<(std::fs::File, u64)>,
}

/// Runs the job to completion on the calling (blocking) thread.
pub fn run(mut job: Job<EncryptParameters>, state: &DaemonContext) -> Result<Summary> {
    let started = Instant::now();
    let parameters = job.parameters.clone();
    let format = targets::resolve_format(&parameters)?;
    if format != OutputFormat::Luks && parameters.engine == EngineChoice::Kernel {
        return Err(Error::InvalidOption {
            parameter: "engine",
            message: format!(
                "--engine kernel writes raw LUKS only (dm-crypt maps one contiguous payload); a \
                 {} output is written by the userspace engine: drop --engine or use \
                 --engine userspace",
                format.cli_name()
            ),
        });
    }
    if parameters.stream.is_some() {
        refuse_unstreamable(&parameters, format)?;
    }
    let inputs = check_inputs(&mut job, state, format)?;
    if let Some(target) = parameters.target {
        for notice in targets::check(target, inputs.image.virtual_size())? {
            tracing::info!(job = job.id, target = target.cli_name(), "{notice}");
            job.reporter.notice(notice);
        }
    }
    if format != OutputFormat::Luks
        && inputs.output.kind == StorageKind::RegularFile
        && crate::sys::storage::size_of(&inputs.output.file)? > 0
    {
        job.notice(format!(
            "the output already holds data (an interrupted run's?): it is written from scratch, \
             since resuming covers raw LUKS output (--format luks) only, not {}",
            format.cli_name()
        ));
    }
    let mut summary = match format {
        OutputFormat::Luks => encrypt_luks(&job, inputs, state)?,
        OutputFormat::Qcow2 => encrypt_qcow2(&job, inputs, state)?,
        OutputFormat::Vhd => encrypt_vhd(&job, inputs)?,
    };
    summary.target = parameters.target;
    summary.elapsed_ms = millis(started.elapsed());
    tracing::info!(
        job = job.id,
        format = format.cli_name(),
        output_size = summary.output_size,
        allocated_bytes = summary.allocated_bytes,
        elapsed_ms = summary.elapsed_ms,
        fingerprint = %summary.key_fingerprint,
        "encrypted"
    );
    Ok(summary)
}

/// Checks options, descriptors, the key and the source; nothing is written.
fn check_inputs(
    job: &mut Job<EncryptParameters>,
    state: &DaemonContext,
    format: OutputFormat,
) -> Result<Inputs> {
    let parameters = job.parameters.clone();
    let job_id = job.id;
    // Non-root callers get tighter caps on what one derivation of their keyslot may cost.
    let caps = KdfCaps::for_caller(job.caller_uid);
    if format != OutputFormat::Vhd {
        let spec = header_spec(&parameters, format);
        spec.validate()?;
        caps.check_request(&spec)?;
    }
    // Containers take the userspace engine whatever `auto` means here: dm-crypt maps one
    // contiguous payload, and a qcow2's IVs follow its host clusters.
    // A stream is the userspace engine's (dm-crypt writes at offsets): `auto` means it.
    let engine = if format == OutputFormat::Luks && parameters.stream.is_none() {
        state.engines.resolve(parameters.engine)?
    } else {
        state.engines.resolve(EngineChoice::Userspace)?
    };

    // The output last, so a refusal to write over another of the call's files names its role
    // (`PassedDescriptors::take` refuses an output that is the source or the key).
    let passed = &mut job.descriptors;
    let source = descriptors::check_source(passed.take(Descriptor::Source, parameters.source)?)?;
    let source_kind = source.kind;
    let stat = resume::SourceStat::of(&source.file)?;
    let mut source = super::source_files(passed, source, &parameters.companions)?;
    let source_key = match parameters.source_key {
        Some(index) => Some(descriptors::check_key(
            passed.take(Descriptor::Key, index)?,
        )?),
        None => None,
    };
    let passed_key = match parameters.key {
        Some(index) => Some(descriptors::check_key(
            passed.take(Descriptor::Key, index)?,
        )?),
        None => None,
    };
    let resume_header = match parameters.stream.as_ref().and_then(|s| s.resume_header) {
        Some(index) => Some(descriptors::check_resume_header(
            passed.take(Descriptor::ResumeHeader, index)?,
            super::stream::MAX_RESUME_HEADER,
        )?),
        None => None,
    };
    let output = passed.take(Descriptor::Output, parameters.output)?;
    let output = if parameters.stream.is_some() {
        descriptors::check_stream_output(output)?
    } else {
        descriptors::check_output(output)?
    };
    // A stream's output is a pipe (checked above); a container file must be a regular file.
    if format != OutputFormat::Luks
        && parameters.stream.is_none()
        && output.kind != StorageKind::RegularFile
    {
        return Err(Error::bad_descriptor(
            Descriptor::Output,
            format!(
                "is a block device; a {} image is a file that a cloud imports: write it to a \
                 regular file",
                format.cli_name()
            ),
        ));
    }

    // A VHD has no volume key: the ring's key itself would be the data key of every VHD made
    // with it, so a caller could encrypt chosen sectors under the key that protects other
    // users' ring-keyed VHDs and compare ciphertexts (AES-XTS is deterministic per sector and
    // 16-byte block): a guess oracle on their plaintext. Only callers the ring may decrypt for
    // (root, a per-user daemon's own user) lose nothing by it.
    if passed_key.is_none()
        && format == OutputFormat::Vhd
        && !ring::may_decrypt_with(job.caller_uid)
    {
        return Err(vhd_ring_key_refusal(job.caller_uid, "encrypt a VHD"));
    }

    // A saved header is opened with the job's key, and the volume key it yields encrypts the
    // rest of the stream. With the ring's key, a caller could pass the header of another
    // user's ring-keyed image and have data of its choice encrypted under that image's volume
    // key (a guess oracle on its plaintext, as for a VHD above), and the restart notice would
    // tell it whether the ring opens a header. Only callers the ring may decrypt for lose
    // nothing by it; everyone else resumes with a key of their own or starts over.
    if resume_header.is_some() && passed_key.is_none() && !ring::may_decrypt_with(job.caller_uid) {
        return Err(Error::PermissionDenied(format!(
            "the daemon's key ring does not resume a streamed upload for uid {}: resuming opens \
             the saved header with the ring's key, and the header of another user's image \
             would let you have data of your choice encrypted under its volume key; start the \
             upload over without a saved header (imgctl upload --abort URL, then encrypt \
             again), or encrypt with your own key (--key-file)",
            job.caller_uid
        )));
    }

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
        job.reporter.notice(warning.clone());
    }
    tracing::info!(job = job_id, key = %key_name, fingerprint = %key.fingerprint, "key");
    job.reporter.audit().encryption_key(&key.fingerprint);
    job.reporter.audit().engine(engine.kind());

    if let Some(source_key) = source_key {
        let volume_key = unlock_source(job, &source, &source_key)?;
        source.set_source_volume_key(volume_key);
    }
    let image = formats::open_files(&source)?;
    if image.virtual_size() == 0 {
        return Err(Error::UnsupportedImage {
            message: "the source disk is empty (virtual size 0): there is nothing to encrypt"
                .to_string(),
        });
    }
    super::stream::check_resume_from(&parameters, format, image.virtual_size())?;
    tracing::info!(
        job = job_id,
        format = image.format().display_name(),
        ?source_kind,
        virtual_size = image.virtual_size(),
        output = format.cli_name(),
        luks = parameters.luks_version.display_name(),
        sector_size = parameters.sector_size,
        engine = ?engine.kind(),
        "encrypting"
    );
    Ok(Inputs {
        image,
        output,
        key_name,
        key,
        engine,
        caps,
        stat,
        resume_header,
    })
}

/// Refuses a stream of what cannot be streamed, before anything is checked or read: a VHD (its
/// writer places the block table out of order), a detached job, or the kernel engine
/// (dm-crypt writes through a device at offsets).
fn refuse_unstreamable(parameters: &EncryptParameters, format: OutputFormat) -> Result<()> {
    if parameters.detach == Some(true) {
        return Err(Error::InvalidOption {
            parameter: "detach",
            message: "a streamed output cannot be detached: its pipe is read by the client that \
                      started the job, which must stay connected; drop detach (imgctl: drop \
                      --detach), or write a file with -o and detach that"
                .to_string(),
        });
    }
    if format == OutputFormat::Vhd {
        return Err(Error::InvalidOption {
            parameter: "format",
            message: "a vhd output cannot be streamed: its block allocation table, at the \
                      file's start, is known only once every block is written; write it with \
                      -o and upload the file"
                .to_string(),
        });
    }
    if parameters.engine == EngineChoice::Kernel {
        return Err(Error::InvalidOption {
            parameter: "engine",
            message: "--engine kernel cannot stream the output (dm-crypt writes through a \
                      device at offsets, not in order into a pipe): drop --engine or use \
                      --engine userspace"
                .to_string(),
        });
    }
    Ok(())
}

/// Opens the LUKS header of the encrypted qcow2 `source` with the key file `source_key`
/// (`--source-key-file`), as `decrypt` opens a qcow2 container, and returns its volume key.
fn unlock_source(
    job: &Job<EncryptParameters>,
    source: &SourceFiles,
    source_key: &std::fs::File,
) -> Result<SecretBytes> {
    let header =
        formats::qcow2::source_luks_header(source.file(FileKey::SOURCE))?.ok_or_else(|| {
            Error::InvalidOption {
                parameter: "source_key",
                message: "a source key was passed (--source-key-file) but the source is not an \
                      encrypted qcow2 image, the one kind of encrypted source read: drop \
                      --source-key-file"
                    .to_string(),
            }
        })?;
    let name = "source key".to_string();
    let key = keys::read_key_file(source_key).map_err(|error| unlock::name_key(error, &name))?;
    for warning in &key.warnings {
        job.notice(format!("{name}: {warning}"));
    }
    let keys = unlock::JobKeys {
        candidates: vec![CandidateKey { name, key }],
        encryption: None,
        from_daemon_ring: false,
    };
    let (_, volume_key, unlocked) =
        unlock::open_image(job, &header, &keys).map_err(|error| match error {
            Error::WrongKey {
                message,
                tried,
                carried,
            } => Error::WrongKey {
                message: format!(
                    "the encrypted qcow2 source: {}",
                    message.replace(
                        "Add the key the image was made with to your key ring as \
                         decryption_keyN, or pass it with --key-file",
                        "pass the passphrase of one of the source's keyslots with \
                         --source-key-file"
                    )
                ),
                tried,
                carried,
            },
            other => other,
        })?;
    job.notice(format!(
        "the encrypted qcow2 source was unlocked with the source key (keyslot {})",
        unlocked.keyslot
    ));
    Ok(volume_key)
}

/// Why the daemon's ring key may not be a VHD's data key for this caller (see
/// [`check_inputs`]); `action` says what was asked.
pub(super) fn vhd_ring_key_refusal(uid: u32, action: &str) -> Error {
    Error::PermissionDenied(format!(
        "the daemon's key ring does not {action} for uid {uid}: a vhd-util VHD is encrypted \
         directly with the key file's bytes (no per-image volume key), so every VHD made with \
         the daemon's key shares one data key, and encrypting data of your choice with it \
         would let you test guesses against other users' VHDs; pass your own key with \
         --key-file (imgctl key generate -o FILE makes one)"
    ))
}

/// The LUKS header a format needs: the caller's choice for raw LUKS; for qcow2 what qemu reads
/// (LUKS1, 512-byte sectors, whose only key derivation is PBKDF2).
fn header_spec(parameters: &EncryptParameters, format: OutputFormat) -> HeaderSpec {
    match format {
        OutputFormat::Qcow2 => HeaderSpec {
            version: LuksVersion::Luks1,
            sector_size: parameters.sector_size,
            pbkdf: parameters.pbkdf.clone().unwrap_or_default(),
        },
        _ => HeaderSpec {
            version: parameters.luks_version,
            sector_size: parameters.sector_size,
            pbkdf: parameters.pbkdf.clone().unwrap_or_default(),
        },
    }
}

/// The headers `header_spec` makes for a job with default parameters (what `imgctl encrypt`
/// sends without options): raw LUKS's (LUKS2, argon2id) and qcow2's (LUKS1, pbkdf2), with
/// libcryptsetup's default target time. The start-up benchmark measures these
/// ([`super::startup`]).
pub fn default_header_specs() -> [HeaderSpec; 2] {
    // `header_spec` with imgctl's defaults: LUKS2, 512-byte sectors, no PBKDF options.
    let raw = HeaderSpec::default();
    let qcow2 = HeaderSpec {
        version: LuksVersion::Luks1,
        ..HeaderSpec::default()
    };
    [raw, qcow2]
}

/// A LUKS output (raw or qcow2) with its key derivation overlapped with the copy.
///
/// A fresh random volume key encrypts the payload; libcryptsetup formats the header on daemon
/// memory without its keyslot (benchmarked iterations from [`luks::bench`]'s cache, or
/// measured now, before the copy, so the copy's CPU time does not skew the measurement), the
/// keyslot's key derivation then runs on its own thread at that fixed iteration count while
/// the payload is copied, and the header is written last, after the payload is durable
/// ([`output::write_container`]). The whole job takes about max(copy, derivation).
///
/// `plan` lays the container out around the header's memfd and data offset (the header bytes
/// are read from the memfd only when the metadata is written).
fn encrypt_with_luks<C: Container>(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    state: &DaemonContext,
    spec: &HeaderSpec,
    plan: impl FnOnce(&std::fs::File, u64) -> Result<C>,
) -> Result<(C, Written, luks::FormattedHeader)> {
    job.check_cancel()?;
    job.reporter.progress(Phase::Format, 0, 0);
    let volume_key = SecretBytes::random(VOLUME_KEY_BYTES)?;
    // A benchmark is cached only when this job is the only one running (see `luks::bench`).
    let idle = || super::only_job(state);
    let context = HeaderContext {
        caps: Some(inputs.caps),
        idle: &idle,
    };
    std::thread::scope(|scope| {
        let (prepared, pending) =
            start_format(scope, job, &inputs.key, spec, &volume_key, &context)?;
        let container = plan(&prepared.image, prepared.data_offset)?;
        let mut pending = Some(pending);
        let mut formatted = None;
        let written = write_image(
            job,
            inputs,
            &container,
            spec.sector_size,
            volume_key.as_bytes(),
            IvMode::Plain64,
            &mut || {
                let Some(pending) = pending.take() else {
                    return Ok(());
                };
                formatted = Some(finish_keyslot(job, pending, inputs.caps)?);
                Ok(())
            },
        )?;
        let header = formatted.ok_or_else(|| Error::Luks {
            operation: "format",
            message: "the keyslot was never derived".to_string(),
        })?;
        Ok((container, written, header))
    })
}

/// Starts formatting `spec`'s header for `key` around `volume_key` on a thread of `scope`
/// ([`luks::start_format`]: the keyslot's derivation goes on there), reporting a benchmark as
/// the job's phase.
pub(super) fn start_format<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    job: &Job<EncryptParameters>,
    key: &'env KeyFile,
    spec: &'env HeaderSpec,
    volume_key: &'env SecretBytes,
    context: &'env HeaderContext<'env>,
) -> Result<(luks::PreparedHeader, luks::PendingKeyslot<'scope>)> {
    luks::start_format(
        scope,
        spec,
        volume_key,
        &key.passphrase,
        &key.fingerprint,
        context,
        &mut |stage| match stage {
            Stage::Benchmarking => job.reporter.progress(Phase::Benchmark, 0, 0),
        },
    )
}

/// Waits for the keyslot's derivation (reported as phase `derive`) and checks what was
/// derived as every reader will check it: the complete header.
pub(super) fn finish_keyslot(
    job: &Job<EncryptParameters>,
    pending: luks::PendingKeyslot<'_>,
    caps: &KdfCaps,
) -> Result<luks::FormattedHeader> {
    job.reporter.progress(Phase::Derive, 0, 0);
    let waited = Instant::now();
    let header = pending.finish()?;
    tracing::info!(
        job = job.id,
        waited_ms = millis(waited.elapsed()),
        pbkdf = %header.pbkdf,
        "keyslot derived"
    );
    caps.check_created(&header.cost)?;
    Ok(header)
}

/// The summary's account of the benchmark behind the keyslot.
fn benchmark_summary(header: &luks::FormattedHeader) -> Option<PbkdfBenchmark> {
    super::benchmark_summary(header.benchmark)
}

/// Raw LUKS: a libcryptsetup header, then the payload as one extent (either engine).
fn encrypt_luks(
    job: &Job<EncryptParameters>,
    inputs: Inputs,
    state: &DaemonContext,
) -> Result<Summary> {
    let parameters = &job.parameters;
    let header_spec = header_spec(parameters, OutputFormat::Luks);
    if parameters.luks_version == LuksVersion::Luks2
        && !strength::may_store_fingerprint(inputs.key.passphrase.as_bytes())?
    {
        if let Some(text) = strength::notice(&inputs.key_name, inputs.key.passphrase.as_bytes())? {
            tracing::warn!(job = job.id, "{text}");
            job.reporter.notice(text);
        }
    }
    let virtual_size = inputs.image.virtual_size();
    // A regular file is checkpointed and resumable (see `resume`); a block device, or a daemon
    // without a state directory, copies in one go as the container outputs do.
    let store = state
        .checkpoints()
        .filter(|_| inputs.output.kind == StorageKind::RegularFile);
    let (container, written, facts) = match store {
        // A stream keeps no checkpoint: the client holds its resume state.
        _ if parameters.stream.is_some() => {
            super::stream::encrypt(job, &inputs, state, &header_spec)?
        }
        Some(store) => resume::encrypt(
            job,
            &resume::ResumeInputs {
                image: inputs.image.as_ref(),
                stat: &inputs.stat,
                output: &inputs.output,
                key: &inputs.key,
                key_name: &inputs.key_name,
                engine: inputs.engine.as_ref(),
                caps: inputs.caps,
            },
            state,
            store,
            &header_spec,
        )?,
        None => {
            let (container, written, header) =
                encrypt_with_luks(job, &inputs, state, &header_spec, |image, data_offset| {
                    LuksOutput::plan(image, data_offset, virtual_size)
                })?;
            (container, written, resume::HeaderFacts::fresh(header))
        }
    };
    let payload_size = container.payload_size();
    let output_size = container.output_size();
    let bytes_written = if parameters.stream.is_some() {
        // The image bytes streamed: from where the stream started (a resumed stream's
        // `resumed_from` is an image byte).
        output_size - facts.resumed_from.unwrap_or(0)
    } else {
        facts.data_offset + written.payload_bytes
    };
    Ok(Summary {
        source_format: inputs.image.format(),
        virtual_size,
        output_format: OutputFormat::Luks,
        output_virtual_size: payload_size,
        luks_version: Some(parameters.luks_version),
        cipher: facts.cipher,
        key_size_bits: facts.key_size_bits,
        sector_size: parameters.sector_size,
        data_offset: facts.data_offset,
        payload_size,
        output_size,
        key_fingerprint: inputs.key.fingerprint.clone(),
        pbkdf_benchmark: facts.formatted.as_ref().and_then(benchmark_summary),
        pbkdf: facts.pbkdf,
        engine: inputs.engine.kind(),
        elapsed_ms: 0,
        copy_ms: millis(written.copy_elapsed),
        bytes_written,
        allocated_bytes: payload_size,
        vhd_key_hash: None,
        target: None,
        resumed_from: facts.resumed_from,
    })
}

/// qcow2 with qemu's LUKS: a LUKS1 header inside the file, data clusters only where the source
/// has non-zero data (found by the copy as it reads), IVs from host offsets ([`outputs::qcow2`]).
fn encrypt_qcow2(
    job: &Job<EncryptParameters>,
    inputs: Inputs,
    state: &DaemonContext,
) -> Result<Summary> {
    let parameters = &job.parameters;
    let header_spec = header_spec(parameters, OutputFormat::Qcow2);
    // LUKS1 has no tokens: the key's fingerprint cannot travel with the image, and jobs that
    // open it later find the key by trial.
    let virtual_size = inputs.image.virtual_size();
    let image = if parameters.stream.is_some() {
        let (plan, written, facts) =
            super::stream::encrypt_qcow2(job, &inputs, state, &header_spec)?;
        let output_size = plan.output_size();
        Qcow2Image {
            virtual_size: plan.virtual_size(),
            luks_offset: plan.luks_offset(),
            allocated_bytes: plan.allocated_bytes(),
            output_size,
            // The image bytes streamed: from where the stream started.
            bytes_written: output_size - facts.resumed_from.unwrap_or(0),
            written,
            facts,
        }
    } else {
        let (container, written, header) =
            encrypt_with_luks(job, &inputs, state, &header_spec, |image, data_offset| {
                Qcow2Output::new(virtual_size, image, data_offset)
            })?;
        Qcow2Image {
            virtual_size: container.virtual_size(),
            luks_offset: container.luks_offset(),
            allocated_bytes: written.payload_bytes,
            output_size: container.output_size(),
            bytes_written: container.metadata_bytes() + written.payload_bytes,
            written,
            facts: resume::HeaderFacts::fresh(header),
        }
    };
    let facts = image.facts;
    Ok(Summary {
        source_format: inputs.image.format(),
        virtual_size,
        output_format: OutputFormat::Qcow2,
        output_virtual_size: image.virtual_size,
        luks_version: Some(LuksVersion::Luks1),
        cipher: facts.cipher,
        key_size_bits: facts.key_size_bits,
        sector_size: header_spec.sector_size,
        // Where the LUKS header sits inside the qcow2 file (its crypto header extension).
        data_offset: image.luks_offset,
        payload_size: image.allocated_bytes,
        output_size: image.output_size,
        key_fingerprint: inputs.key.fingerprint.clone(),
        pbkdf_benchmark: facts.formatted.as_ref().and_then(benchmark_summary),
        pbkdf: facts.pbkdf,
        engine: inputs.engine.kind(),
        elapsed_ms: 0,
        copy_ms: millis(image.written.copy_elapsed),
        bytes_written: image.bytes_written,
        allocated_bytes: image.allocated_bytes,
        vhd_key_hash: None,
        target: None,
        resumed_from: facts.resumed_from,
    })
}

/// What a qcow2 job wrote, from either writer (a file's or a stream's).
struct Qcow2Image {
    virtual_size: u64,
    luks_offset: u64,
    allocated_bytes: u64,
    output_size: u64,
    bytes_written: u64,
    written: Written,
    facts: resume::HeaderFacts,
}

/// A blktap-encrypted VHD: the key file's decoded bytes are the AES-XTS key ([`outputs::vhd`]).
fn encrypt_vhd(job: &Job<EncryptParameters>, inputs: Inputs) -> Result<Summary> {
    if job.parameters.sector_size != VHD_SECTOR_BYTES {
        return Err(Error::InvalidOption {
            parameter: "sector_size",
            message: format!(
                "a vhd-util VHD encrypts each 512-byte sector on its own (blktap's format has no \
                 other sector size), so --sector-size {} cannot apply: drop it",
                job.parameters.sector_size
            ),
        });
    }
    // Decoded and checked (32 or 64 bytes, halves differ) before anything is written.
    let raw_key = keys::raw_vhd_key(&inputs.key)?;
    let virtual_size = inputs.image.virtual_size();
    job.check_cancel()?;
    job.reporter.progress(Phase::Format, 0, 0);
    let container = VhdOutput::new(virtual_size, raw_key.as_bytes())?;
    if let Some(text) = crate::outputs::vhd::tweak_reuse_notice(container.virtual_size()) {
        tracing::info!(job = job.id, "{text}");
        job.reporter.notice(text);
    }
    if container.virtual_size() != virtual_size {
        let text = format!(
            "the VHD's disk is {} bytes: the source's {virtual_size} rounded up to whole 2 MiB \
             blocks, as vhd-util and XenServer size their VHDs (the guest sees zeros past the \
             source's end)",
            container.virtual_size()
        );
        tracing::info!(job = job.id, "{text}");
        job.reporter.notice(text);
    }
    let written = write_image(
        job,
        &inputs,
        &container,
        VHD_SECTOR_BYTES,
        raw_key.as_bytes(),
        IvMode::Plain,
        &mut || Ok(()),
    )?;
    let key_bits = raw_key.len() as u32 * 8;
    drop(raw_key);
    let allocated = container.allocated_bytes();
    Ok(Summary {
        source_format: inputs.image.format(),
        virtual_size,
        output_format: OutputFormat::Vhd,
        output_virtual_size: container.virtual_size(),
        luks_version: None,
        cipher: "aes-xts-plain".to_string(),
        key_size_bits: key_bits,
        sector_size: VHD_SECTOR_BYTES,
        data_offset: container.data_offset(),
        payload_size: allocated,
        output_size: container.output_size(),
        key_fingerprint: inputs.key.fingerprint.clone(),
        pbkdf: "none (the key file's decoded bytes are the data key)".to_string(),
        pbkdf_benchmark: None,
        engine: inputs.engine.kind(),
        elapsed_ms: 0,
        copy_ms: millis(written.copy_elapsed),
        bytes_written: written.payload_bytes + container.metadata_bytes(),
        allocated_bytes: allocated,
        vhd_key_hash: Some(container.key_hash().hash_hex()),
        target: None,
        resumed_from: None,
    })
}

/// The only sector size of a blktap-encrypted VHD.
const VHD_SECTOR_BYTES: u32 = 512;

/// The step every format shares ([`output::write_container`]), over this job's checked inputs.
fn write_image(
    job: &Job<EncryptParameters>,
    inputs: &Inputs,
    container: &dyn Container,
    sector_size: u32,
    key: &[u8],
    iv: IvMode,
    before_metadata: &mut dyn FnMut() -> Result<()>,
) -> Result<Written> {
    output::write_container(
        job,
        inputs.image.as_ref(),
        &inputs.output,
        inputs.engine.as_ref(),
        container,
        sector_size,
        key,
        iv,
        before_metadata,
    )
}
