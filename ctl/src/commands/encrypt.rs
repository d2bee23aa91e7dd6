//! `imgctl encrypt SRC -o OUT [--key-file KEY]`; without `--key-file`, the key ring's
//! `encryption_key`, and with neither an error (never an unencrypted output).
//!
//! The client does every `open` (with the user's own permissions) and hands the daemon three
//! descriptors: the source read-only, `OUT.partial` read-write, and the key file read-only (a
//! fourth, `--source-key-file`, read-only, for an encrypted qcow2 source), plus the files the
//! source references when the daemon asks for them. No key's bytes pass through imgctl's
//! memory; the daemon reads and checks them.
//!
//! A raw LUKS output is resumable: an interrupted run (Ctrl-C, the daemon killed or stopped)
//! keeps `OUT.partial`, and the same command run again passes it back untruncated; the daemon
//! resumes from its checkpoint when the source, the key and the options are unchanged, and
//! otherwise starts over and says why ([`crate::output::Output::create_resumable`]). `--force`
//! discards it and starts over.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use sha2::{Digest, Sha256};

use imgcrypt_proto::api::{
    self, EncryptParameters, EncryptReply, EngineChoice, LuksVersion, OutputFormat, Pbkdf,
    PbkdfKind, Phase, Progress, StreamOutput, Summary, Target,
};

use crate::call;
use crate::commands::jobs;
use crate::companions::{self, Companions};
use crate::connect;
use crate::error::{CtlError, Result};
use crate::keyring::{self, RingLocation};
use crate::output::Output;
use crate::progress::Display;
use crate::stream::{self, ImageStream};
use crate::targets;
use crate::upload::{self, Resume, S3Url, StoreOptions, Upload};

/// Options of `imgctl encrypt`.
#[derive(Debug, clap::Args)]
pub struct EncryptArgs {
    /// Source disk image (RAW, VHD, VHDX or qcow2 with its backing chain, detected by content).
    pub source: PathBuf,
    /// Where to write the LUKS image. Optional with --upload: a raw LUKS image is then
    /// streamed straight into the object, with no local copy.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Key file: its bytes are the LUKS passphrase (32–512 base64 characters, no newline).
    /// Default: the key ring's encryption_key.
    #[arg(long, value_name = "KEY")]
    pub key_file: Option<PathBuf>,
    /// Key file that unlocks an encrypted qcow2 source (qemu's LUKS): its bytes are the
    /// passphrase of one of the source's keyslots. Passed to the daemon as a descriptor.
    #[arg(long, value_name = "FILE")]
    pub source_key_file: Option<PathBuf>,
    /// Write a LUKS1 header instead of LUKS2.
    #[arg(long)]
    pub luks1: bool,
    /// Encryption sector size in bytes (4096 needs LUKS2).
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Key derivation of the keyslot.
    #[command(flatten)]
    pub pbkdf: PbkdfArgs,
    /// Engine: auto (kernel where dm-crypt is usable), userspace or kernel.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    pub engine: EngineArg,
    /// Container of the output: luks (raw LUKS, the default), qcow2 (qemu's LUKS encryption:
    /// IBM Cloud VPC, OpenStack) or vhd (blktap's vhd-util encryption: IBM Cloud classic).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Check a cloud's import rules before anything is written, and say what to do next;
    /// implies the target's --format.
    #[arg(long, value_enum)]
    pub target: Option<TargetArg>,
    /// Replace OUT if it exists, and discard an interrupted run's OUT.partial instead of
    /// resuming it; required to write to a block device.
    #[arg(long)]
    pub force: bool,
    /// Print progress and the summary as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    /// Hand the job to the daemon and return: prints the job's id. The job runs on after
    /// imgctl exits, writing OUT.partial; `imgctl wait ID` follows it and, once it succeeded,
    /// renames OUT.partial to OUT (the daemon never renames). `imgctl status ID` and
    /// `imgctl cancel ID` see or stop it. The files the source references (backing
    /// files, parent disks, extents) are found and passed before the job is handed over.
    #[arg(long)]
    pub detach: bool,
    /// Upload the encrypted image to S3-compatible object storage (IBM Cloud Object Storage,
    /// AWS S3, MinIO, …) as a resumable multipart upload, with your own credentials (the
    /// AWS_* environment or ~/.aws/credentials; never the command line). Without -o a raw
    /// LUKS or qcow2 image is streamed from the daemon into the upload (no local copy); with
    /// -o, or for VHD outputs (which need -o), the file is written and then uploaded.
    #[arg(long, value_name = "s3://BUCKET/KEY")]
    pub upload: Option<String>,
    /// Where and as whom to upload (with --upload).
    #[command(flatten)]
    pub store: StoreOptions,
}

/// Key-derivation options of a new keyslot, shared by `encrypt` and `rewrite -k`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PbkdfArgs {
    /// Key-derivation function of the keyslot.
    #[arg(long, value_enum)]
    pub pbkdf: Option<PbkdfArg>,
    /// Target unlock time of the keyslot, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub iter_time: Option<u32>,
    /// Fixed PBKDF iteration count (skips the benchmark).
    #[arg(long, value_name = "N")]
    pub pbkdf_iterations: Option<u32>,
    /// Argon2 memory cost in KiB.
    #[arg(long, value_name = "KIB")]
    pub pbkdf_memory: Option<u32>,
    /// Argon2 threads.
    #[arg(long, value_name = "N")]
    pub pbkdf_parallel: Option<u32>,
}

impl PbkdfArgs {
    /// The protocol's settings; `None` when every option is left to the daemon's defaults.
    pub fn to_protocol(&self) -> Option<Pbkdf> {
        let pbkdf = Pbkdf {
            kind: self.pbkdf.map(|kind| match kind {
                PbkdfArg::Argon2id => PbkdfKind::Argon2id,
                PbkdfArg::Pbkdf2 => PbkdfKind::Pbkdf2,
            }),
            iter_time_ms: self.iter_time,
            iterations: self.pbkdf_iterations,
            memory_kib: self.pbkdf_memory,
            parallel: self.pbkdf_parallel,
        };
        (pbkdf != Pbkdf::default()).then_some(pbkdf)
    }
}

/// `--pbkdf` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PbkdfArg {
    /// Memory-hard (LUKS2 only).
    Argon2id,
    /// PBKDF2-SHA256.
    Pbkdf2,
}

/// `--engine` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EngineArg {
    /// Kernel where possible, else userspace.
    Auto,
    /// AES-XTS in the daemon's process.
    Userspace,
    /// Loop device + dm-crypt.
    Kernel,
}

/// `--format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// Raw LUKS (cryptsetup, dm-crypt).
    Luks,
    /// qcow2 v3 with qemu's LUKS encryption.
    Qcow2,
    /// Dynamic VHD encrypted as blktap's vhd-util does.
    Vhd,
}

impl FormatArg {
    fn to_protocol(self) -> OutputFormat {
        match self {
            Self::Luks => OutputFormat::Luks,
            Self::Qcow2 => OutputFormat::Qcow2,
            Self::Vhd => OutputFormat::Vhd,
        }
    }
}

/// `--target` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetArg {
    /// Plain LUKS (raw LUKS output).
    Luks,
    /// IBM Cloud VPC custom image (qcow2 with LUKS).
    IbmVpc,
    /// IBM Cloud classic image template (vhd-util-encrypted VHD).
    IbmClassic,
    /// OpenStack encrypted image (qcow2 with LUKS).
    Openstack,
}

impl TargetArg {
    /// The protocol's name for it.
    pub fn to_protocol(self) -> Target {
        match self {
            Self::Luks => Target::Luks,
            Self::IbmVpc => Target::IbmVpc,
            Self::IbmClassic => Target::IbmClassic,
            Self::Openstack => Target::Openstack,
        }
    }
}

/// Runs the command.
pub fn run(args: EncryptArgs, socket: Option<PathBuf>, ring: &RingLocation) -> Result<()> {
    let url = args.upload.as_deref().map(S3Url::parse).transpose()?;
    let streamed = match (&url, &args.output) {
        (None, None) => {
            return Err(CtlError::Usage(
                "say where the encrypted image goes: -o OUT, or --upload s3://BUCKET/KEY".into(),
            ))
        }
        (None, Some(_)) => {
            if store_options_given(&args.store) {
                return Err(CtlError::Usage(
                    "--endpoint, --region and --profile say where to upload: add --upload                      s3://BUCKET/KEY, or drop them"
                        .into(),
                ));
            }
            false
        }
        (Some(_), output) => {
            if args.detach {
                return Err(CtlError::Usage(
                    "--upload runs in imgctl (it holds your credentials), so it cannot be \
                     detached: drop --detach, or encrypt with -o OUT --detach and upload OUT \
                     later with imgctl upload OUT s3://BUCKET/KEY"
                        .into(),
                ));
            }
            output.is_none()
        }
    };
    if streamed {
        let url = url.expect("streamed implies --upload");
        return encrypt_streamed(&args, &url, socket, ring);
    }
    let output = args.output.clone().expect("checked above");
    encrypt_to_file(&args, &output, socket, ring)?;
    match url {
        // The image is complete under its final name: upload it (resumable like any upload).
        Some(url) => upload_written(&args, &output, &url),
        None => Ok(()),
    }
}

/// Whether any of the upload's location options was given.
fn store_options_given(store: &StoreOptions) -> bool {
    store.endpoint.is_some() || store.region.is_some() || store.profile.is_some()
}

/// Uploads the image just written to `output`.
fn upload_written(args: &EncryptArgs, output: &Path, url: &S3Url) -> Result<()> {
    let mut display = Display::new(args.json);
    let result = crate::commands::upload::upload_file(output, url, &args.store, &mut display);
    if let Err(error) = &result {
        display.error(None, &error.to_string());
    }
    result
}

/// The key to pass: the key file's descriptor (from `--key-file` or the user's ring), or none
/// when neither exists and the daemon's ring may have one (then `parameters.key` is cleared and
/// the advice is kept for a `NoKey` answer).
fn open_encryption_key(
    args: &EncryptArgs,
    ring: &RingLocation,
    parameters: &mut EncryptParameters,
) -> Result<(Option<std::fs::File>, Option<String>)> {
    match keyring::encryption_key(args.key_file.clone(), ring) {
        Ok((key_path, ring_warnings)) => {
            call::warn_all(&ring_warnings);
            Ok((
                Some(call::open_read_only(&key_path, "open the key file")?),
                None,
            ))
        }
        Err(CtlError::Usage(advice)) if args.key_file.is_none() => {
            parameters.key = None;
            Ok((None, Some(advice)))
        }
        Err(error) => Err(error),
    }
}

/// A daemon's `NoKey` with the user's own advice when imgctl found no key either.
fn with_no_key_advice(error: CtlError, no_key_advice: Option<String>) -> CtlError {
    match (error, no_key_advice) {
        (CtlError::Daemon { name, .. }, Some(advice)) if name == api::errors::NO_KEY => {
            CtlError::Usage(format!(
                "{advice} (the daemon has no key ring of its own either)"
            ))
        }
        (error, _) => error,
    }
}

/// Encrypts into the file `output_path` (the command without --upload, or before uploading).
fn encrypt_to_file(
    args: &EncryptArgs,
    output_path: &Path,
    socket: Option<PathBuf>,
    ring: &RingLocation,
) -> Result<()> {
    let mut parameters = parameters(args, Some(output_path))?;
    // Without a key of our own the daemon's key ring (an operator's) may have one; if it has
    // none either, the user gets our advice, never an unencrypted output.
    let (key, no_key_advice) = open_encryption_key(args, ring, &mut parameters)?;
    let source = call::open_read_only(&args.source, "open the source image")?;
    let mut display = Display::new(args.json);
    // Raw LUKS resumes an interrupted run's OUT.partial; the sparse containers start over.
    let resumable = parameters.format.unwrap_or(OutputFormat::Luks) == OutputFormat::Luks;
    let output = if resumable {
        Output::create_resumable(output_path, args.force)?
    } else {
        Output::create(output_path, args.force)?
    };

    let mut client = connect::connect(socket.as_deref())?;
    let source_key = match &args.source_key_file {
        Some(path) => Some(call::open_read_only(path, "open the source key file")?),
        None => None,
    };
    let mut fds = vec![source.as_fd(), output.file().as_fd()];
    fds.extend(key.as_ref().map(|key| key.as_fd()));
    // The source key, if any, follows the key (or the output, without one).
    parameters.source_key = source_key.as_ref().map(|_| fds.len() as u32);
    fds.extend(source_key.as_ref().map(|key| key.as_fd()));
    parameters.names = Some(jobs::names(&args.source, output_path));
    if args.detach {
        parameters.detach = Some(true);
        let companions = jobs::companions_for_detach(&mut client, &args.source, &source)?;
        parameters.companions = companions.refs(fds.len() as u32);
        fds.extend(companions.fds());
        let id = jobs::submit_detached(client, api::ENCRYPT, &parameters, &fds)?;
        drop(fds);
        output.leave_to_detached_job();
        jobs::report_detached(id, output_path, args.json, &mut display);
        return Ok(());
    }
    let mut companions = Companions::new(&args.source);
    let summary = companions::with_companions(&mut companions, |companions| {
        parameters.companions = companions.refs(fds.len() as u32);
        let all: Vec<_> = fds.iter().copied().chain(companions.fds()).collect();
        call::run_job::<EncryptReply>(&mut client, api::ENCRYPT, &parameters, &all, &mut display)
    })
    .map_err(|error| with_no_key_advice(error, no_key_advice));
    let summary = match summary {
        Ok(summary) => summary,
        Err(error) => {
            // The daemon went away, or stopped the job with its progress checkpointed: the
            // partial file is what the next run resumes.
            let interrupted = match &error {
                CtlError::Protocol(_) => true,
                CtlError::Daemon { name, .. } => name == api::errors::INTERRUPTED,
                _ => false,
            };
            if let Some(advice) = output.abandon(interrupted) {
                eprintln!("imgctl: {advice}");
            }
            return Err(error);
        }
    };
    let final_path = output.commit()?;
    let next = match summary.target {
        Some(target) => targets::next_steps(
            target,
            &args.source,
            &final_path,
            args.key_file.as_deref(),
            &summary,
        ),
        None => Vec::new(),
    };
    display.summary(&args.source, &final_path, &summary, &next);
    Ok(())
}

/// `--upload` without `-o`: the daemon streams a raw LUKS or qcow2 image through a pipe
/// ([`crate::stream`]) and this process uploads it as it comes, so no local copy is made and
/// the credentials never leave the user's process.
///
/// An interrupted upload of the same source with the same parameters resumes: the LUKS header
/// saved with it goes back to the daemon, which continues that image (same volume key) from
/// the end of the stored parts; a key that no longer opens it makes the daemon start a new
/// image, and the old upload is aborted.
fn encrypt_streamed(
    args: &EncryptArgs,
    url: &S3Url,
    socket: Option<PathBuf>,
    ring: &RingLocation,
) -> Result<()> {
    let mut parameters = parameters(args, None)?;
    if parameters.format == Some(OutputFormat::Vhd) {
        return Err(CtlError::Usage(
            "a VHD image cannot be streamed into an upload: its block allocation table, at the \
             file's start, is known only once every block is written; add -o OUT and the image \
             is written to OUT, then uploaded"
                .into(),
        ));
    }
    if matches!(args.engine, EngineArg::Kernel) {
        return Err(CtlError::Usage(
            "--engine kernel writes through a dm-crypt device onto a file, and a streamed upload \
             has none: drop --engine (the userspace engine's output is bit-identical), or add \
             -o OUT to write a file and upload it"
                .into(),
        ));
    }
    if args.force {
        if let Some(id) = upload::abort_recorded(url, &args.store)? {
            eprintln!("imgctl: --force: aborted the interrupted upload of {url} (upload id {id})");
        }
    }
    let (key, no_key_advice) = open_encryption_key(args, ring, &mut parameters)?;
    let source = call::open_read_only(&args.source, "open the source image")?;
    let source_key = match &args.source_key_file {
        Some(path) => Some(call::open_read_only(path, "open the source key file")?),
        None => None,
    };
    let identity = stream_identity(&args.source, &source, &parameters)?;
    // The header an interrupted upload of this very image began with, and where it stopped.
    // Only with a key of the user's own: the daemon does not open a header a user hands it with
    // its own ring's key for them (another user's header would be a guess oracle).
    let resume = upload::recorded(url, &args.store)?
        .filter(|recorded| recorded.identity == identity && key.is_some())
        .and_then(|recorded| {
            let header = recorded.header?;
            let parts = upload::parts::part_count(recorded.image_size, recorded.part_size);
            // All parts stored: the last is streamed again (and skipped, being stored) so the
            // daemon's reply still says the image is whole.
            let last_part = parts.saturating_sub(1) * recorded.part_size;
            Some((header, recorded.resume_offset.min(last_part)))
        });

    let passed_header = resume.is_some();
    let mut client = connect::connect(socket.as_deref())?;
    let (read_end, write_end) = stream::pipe()?;
    let mut fds = vec![source.as_fd(), write_end.as_fd()];
    fds.extend(key.as_ref().map(|key| key.as_fd()));
    parameters.source_key = source_key.as_ref().map(|_| fds.len() as u32);
    fds.extend(source_key.as_ref().map(|key| key.as_fd()));
    parameters.stream = Some(StreamOutput {
        resume_header: resume.as_ref().map(|_| fds.len() as u32),
        resume_from: resume.as_ref().map_or(0, |(_, from)| *from),
    });
    fds.extend(resume.as_ref().map(|(header, _)| header.as_fd()));
    // The source's companions are resolved before the call: a streamed call is sent once.
    let companions = jobs::companions_for_detach(&mut client, &args.source, &source)?;
    parameters.companions = companions.refs(fds.len() as u32);
    fds.extend(companions.fds());
    parameters.names = Some(api::JobNames {
        source: Some(
            std::path::absolute(&args.source)
                .unwrap_or_else(|_| args.source.clone())
                .display()
                .to_string(),
        ),
        output: Some(url.to_string()),
    });

    let started = Instant::now();
    call::start_job(&mut client, api::ENCRYPT, &parameters, &fds)?;
    // Our copy of the write end goes now, so the stream ends when the daemon closes its own.
    drop(fds);
    drop(write_end);
    let display = Mutex::new(Display::new(args.json));
    let (job, (upload, sent)) = std::thread::scope(|scope| {
        let uploader = scope.spawn(|| {
            send_stream(
                read_end,
                url,
                &args.store,
                &identity,
                passed_header,
                &display,
            )
        });
        let job =
            call::follow_job::<EncryptReply>(&mut client, api::ENCRYPT, &mut StreamView(&display))
                .map_err(|error| with_no_key_advice(error, no_key_advice));
        // A failed job closes the daemon's end of the pipe, which ends the uploader's stream.
        let sent = uploader.join().unwrap_or_else(|_| {
            (
                None,
                Err(CtlError::Protocol("the upload thread panicked".into())),
            )
        });
        (job, sent)
    });
    let mut display = display.into_inner().unwrap_or_else(|e| e.into_inner());
    let summary = match (job, upload, sent) {
        (Ok(summary), Some(upload), Ok(())) => (summary, upload),
        (job, upload, sent) => return Err(stream_failure(job, upload, sent, &mut display)),
    };
    let (summary, upload) = summary;
    let endpoint = upload.endpoint().to_string();
    let uploaded = upload.complete().inspect_err(|error| {
        display.error(None, &error.to_string());
    })?;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let url_text = url.to_string();
    let output_name = Path::new(&url_text);
    let mut text = crate::progress::render_summary(&args.source, output_name, &summary);
    text.push_str(&crate::progress::render_upload(
        Path::new("the encrypted image"),
        url_text.as_str(),
        &endpoint,
        &uploaded,
        elapsed_ms,
    ));
    display.finish(
        serde_json::json!({
            "event": "summary",
            "source": args.source,
            "output": url_text.as_str(),
            "summary": summary,
            "upload": {
                "url": url_text.as_str(),
                "endpoint": endpoint,
                "size": uploaded.size,
                "etag": uploaded.etag,
                "parts": uploaded.parts,
                "part_size": uploaded.part_size,
            },
        }),
        &text,
    );
    Ok(())
}

/// What a streamed encryption that did not succeed reports, and what becomes of its upload:
/// kept for a resume when the daemon went away or stopped the job (`Interrupted`), aborted
/// otherwise, so that no stray multipart upload is left behind. The cause comes first: the
/// upload's own failure, else the job's (a stream that ended early ended because the job did).
fn stream_failure(
    job: Result<Summary>,
    upload: Option<Upload>,
    sent: Result<()>,
    display: &mut Display,
) -> CtlError {
    let resumable = match &job {
        Err(CtlError::Protocol(_)) => true,
        Err(CtlError::Daemon { name, .. }) => name == api::errors::INTERRUPTED,
        _ => false,
    };
    let error = match (job, sent) {
        (Err(job_error), Err(CtlError::UploadInterrupted(_)) | Ok(())) => job_error,
        (_, Err(upload_error)) => upload_error,
        (Ok(_), Ok(())) => {
            CtlError::Protocol("the upload did not start (no stream from the daemon)".into())
        }
    };
    // A server failure already aborted the upload and removed its state (the error policy).
    let already_aborted = matches!(error, CtlError::Store { .. });
    if let Some(upload) = upload {
        if resumable {
            let advice = upload.interrupted("the encryption stopped");
            eprintln!("imgctl: {advice}");
        } else if !already_aborted {
            if let Err(abort_error) = upload.abort() {
                eprintln!("imgctl: warning: could not abort the upload: {abort_error}");
            }
        }
    }
    display.error(None, &error.to_string());
    error
}

/// Reads the daemon's stream from `read_end` and uploads it; returns the upload (to complete
/// or abort once the job's reply is in) and how sending went. `passed_header`: the call asked
/// the daemon to continue the image of the header saved with the upload.
fn send_stream(
    mut read_end: std::fs::File,
    url: &S3Url,
    store: &StoreOptions,
    identity: &str,
    passed_header: bool,
    display: &Mutex<Display>,
) -> (Option<Upload>, Result<()>) {
    let show =
        |f: &mut dyn FnMut(&mut Display)| f(&mut display.lock().unwrap_or_else(|e| e.into_inner()));
    let preamble = match stream::read_preamble(&mut read_end) {
        Ok(preamble) => preamble,
        Err(error) => return (None, Err(error)),
    };
    let (mut upload, resume, warnings) =
        match Upload::begin(url, store, preamble.image_size, identity) {
            Ok(begun) => begun,
            Err(error) => return (None, Err(error)),
        };
    for warning in &warnings {
        show(&mut |display| display.notice(warning));
    }
    // The stored parts continue only if the daemon continues their image: from the header they
    // were encrypted under (passed, and opened by the key). Otherwise they go.
    let continues_stored = passed_header && !preamble.restarted;
    match &resume {
        Resume::New => {}
        Resume::Resumed {
            offset,
            stored_parts,
        } if continues_stored => show(&mut |display| {
            display.info(&format!(
                "resuming the upload of {url}: {stored_parts} parts already stored, the \
                 daemon continues the image from byte {}",
                preamble.start.min(*offset)
            ))
        }),
        Resume::Resumed { .. } => {
            let why = if preamble.restarted {
                "the daemon started a new image (its notice says why)"
            } else {
                "the LUKS header the stored parts were encrypted under is missing or not the one \
                 recorded, so the daemon makes a new image"
            };
            match upload.restart(why) {
                Ok(message) => show(&mut |display| display.info(&message)),
                Err(error) => return (None, Err(error)),
            }
        }
        Resume::Restarted { why } => show(&mut |display| {
            display.info(&format!(
                "aborted the interrupted upload of {url} and starting over: {why}"
            ))
        }),
    }
    if preamble.start > upload.resume_offset() || preamble.start % upload.part_size() != 0 {
        let error = CtlError::Protocol(format!(
            "the daemon's stream starts at byte {}, but the stored parts of {url} end at byte {}: \
             another upload of the same object ran meanwhile? Run the command again",
            preamble.start,
            upload.resume_offset()
        ));
        return (Some(upload), Err(error));
    }
    let header = match stream::read_header(&mut read_end, &preamble) {
        Ok(header) => header,
        Err(error) => return (Some(upload), Err(error)),
    };
    // A new image's header is kept (with its digest in the state) before any part is stored.
    if preamble.start == 0 {
        if let Err(error) = upload.set_header(&header) {
            return (Some(upload), Err(error));
        }
    }
    let start = preamble.start;
    let mut image = ImageStream::new(read_end, preamble, header);
    let sent = upload.send(&mut image, start, &mut |done, total| {
        show(&mut |display| display.transfer("uploading", done, total))
    });
    (Some(upload), sent)
}

/// The daemon's progress while its output is uploaded: the byte count shown is the upload's,
/// so the daemon's own copy progress (a pipe's buffer ahead of it) is not shown.
struct StreamView<'d>(&'d Mutex<Display>);

impl call::JobView for StreamView<'_> {
    fn progress(&mut self, progress: &Progress) {
        if !matches!(progress.phase, Phase::Copy | Phase::Sync) {
            self.display().progress(progress);
        }
    }
    fn notice(&mut self, text: &str) {
        self.display().notice(text);
    }
    fn error(&mut self, name: Option<&str>, message: &str) {
        self.display().error(name, message);
    }
}

impl StreamView<'_> {
    fn display(&self) -> std::sync::MutexGuard<'_, Display> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a streamed upload is of, for resuming it: the source file as it is now (device, inode,
/// size, times) and every parameter of the image. The key is not part of it: the daemon tells a
/// changed key by the saved header's keyslot.
fn stream_identity(
    path: &Path,
    source: &std::fs::File,
    parameters: &EncryptParameters,
) -> Result<String> {
    let metadata = source
        .metadata()
        .map_err(|e| CtlError::file(path, "read the source's metadata", e))?;
    let described = EncryptParameters {
        names: None,
        stream: None,
        detach: None,
        companions: Vec::new(),
        ..parameters.clone()
    };
    let text = format!(
        "imgctl encrypt --upload v1\0dev={} ino={} rdev={} size={} mtime={}.{} ctime={}.{}\0{}",
        metadata.dev(),
        metadata.ino(),
        metadata.rdev(),
        metadata.len(),
        metadata.mtime(),
        metadata.mtime_nsec(),
        metadata.ctime(),
        metadata.ctime_nsec(),
        serde_json::to_string(&described).expect("parameters serialise")
    );
    Ok(upload::parts::hex(&Sha256::digest(text.as_bytes())))
}

/// Protocol parameters from the options, with the checks that need no daemon; `output` is the
/// local output's path, `None` for a streamed upload.
fn parameters(args: &EncryptArgs, output: Option<&Path>) -> Result<EncryptParameters> {
    let luks_version = if args.luks1 {
        LuksVersion::Luks1
    } else {
        LuksVersion::Luks2
    };
    let target = args.target.map(TargetArg::to_protocol);
    let format = match (args.format.map(FormatArg::to_protocol), target) {
        (Some(format), Some(target)) if format != target.format() => {
            return Err(CtlError::Usage(format!(
                "--target {} imports {} images, not {}: drop --format or use --format {}",
                target.cli_name(),
                target.format().cli_name(),
                format.cli_name(),
                target.format().cli_name()
            )))
        }
        (Some(format), _) => format,
        (None, Some(target)) => target.format(),
        (None, None) => OutputFormat::Luks,
    };
    check_format_options(args, format)?;
    if let (Some(target), Some(output)) = (target, output) {
        targets::check_output_name(target, output)?;
    }
    if args.luks1 && args.sector_size != 512 {
        return Err(CtlError::Usage(
            "--sector-size 4096 needs LUKS2: drop --luks1 or use --sector-size 512".to_string(),
        ));
    }
    // The descriptors' order in the call: source, output, key.
    Ok(EncryptParameters {
        source: 0,
        companions: Vec::new(),
        output: 1,
        key: Some(2),
        source_key: None,
        luks_version,
        sector_size: args.sector_size,
        pbkdf: args.pbkdf.to_protocol(),
        engine: match args.engine {
            EngineArg::Auto => EngineChoice::Auto,
            EngineArg::Userspace => EngineChoice::Userspace,
            EngineArg::Kernel => EngineChoice::Kernel,
        },
        format: (format != OutputFormat::Luks || args.format.is_some()).then_some(format),
        target,
        detach: None,
        names: None,
        stream: None,
    })
}

/// Refuses options the chosen container cannot honour, before anything is opened.
fn check_format_options(args: &EncryptArgs, format: OutputFormat) -> Result<()> {
    let refuse = |text: String| Err(CtlError::Usage(text));
    if format != OutputFormat::Luks && matches!(args.engine, EngineArg::Kernel) {
        return refuse(format!(
            "--engine kernel writes raw LUKS only (dm-crypt maps one contiguous payload); a {} \
             output is written by the userspace engine: drop --engine",
            format.cli_name()
        ));
    }
    if format != OutputFormat::Luks && args.sector_size != 512 {
        return refuse(format!(
            "--sector-size {} is not possible with --format {}: {} uses 512-byte encryption \
             sectors; drop --sector-size",
            args.sector_size,
            format.cli_name(),
            format.display_name()
        ));
    }
    match format {
        OutputFormat::Qcow2 if matches!(args.pbkdf.pbkdf, Some(PbkdfArg::Argon2id)) => refuse(
            "--pbkdf argon2id is not possible with --format qcow2: qemu's LUKS inside qcow2 is \
             LUKS1, whose only key derivation is pbkdf2; drop --pbkdf"
                .to_string(),
        ),
        OutputFormat::Vhd if args.luks1 || args.pbkdf.to_protocol().is_some() => refuse(
            "--luks1 and the --pbkdf options do not apply to --format vhd: a blktap-encrypted VHD \
             has no LUKS header and no key derivation (the key file's decoded bytes are the \
             AES-XTS key itself); drop them"
                .to_string(),
        ),
        _ => Ok(()),
    }
}

fn parse_sector_size(text: &str) -> std::result::Result<u32, String> {
    match text {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("the encryption sector size must be 512 or 4096".to_string()),
    }
}
