//! Resumable raw LUKS encryption: checkpoints of durable progress, and resuming from them.
//!
//! # What is written when
//!
//! The payload is copied range by range ([`checkpoint_interval`]); after each range the output
//! is `fdatasync`ed and a checkpoint saying how far the durable payload reaches is saved in the
//! daemon's state directory ([`crate::context::checkpoints`]). A checkpoint holds no key: to
//! resume, the volume key is recovered from the partial file itself. As soon as the keyslot is
//! derived (it runs alongside the copy), the complete header is written into `OUT.partial` at
//! its place with its magic bytes replaced (LUKS1's and LUKS2's primary `LUKS\xba\xbe`, LUKS2's
//! secondary `SKUL\xba\xbe`), so neither cryptsetup nor blkid nor the kernel takes the file for
//! LUKS; checkpoints are saved only from then on. At the end, once the whole payload is durable,
//! the header is written again with its magic: the rule that the image becomes valid only after
//! its payload is durable holds as before.
//!
//! # Resuming
//!
//! A job whose output is a non-empty regular file looks up the caller's checkpoint for that
//! file (by device and inode), and resumes when the source (device, inode, size, mtime, virtual
//! size, a hash of guest data sampled at the start, middle and end), the key's fingerprint and
//! the parameters that shape the output are the checkpoint's, and the output has the size it
//! had. It then reads the masked header back into a daemon memfd, restores the magic there, and
//! opens its keyslot with the key passed again ([`crate::luks::LuksImage::unlock`], under the
//! caller's caps): that yields the volume key. Otherwise it restarts from scratch, with a
//! notice saying why (gsutil's rule: a changed key always restarts). The engine does not matter:
//! both write the same ciphertext, so a run may resume with the other engine.
//!
//! Why not keep the volume key in the checkpoint, wrapped: the only key the daemon could wrap it
//! with that survives a reboot would be a daemon secret on the same disk, and a root compromise
//! or a stolen disk would then yield every unfinished image's key. The partial header is what
//! the finished image will carry anyway, so resuming adds nothing an attacker does not get from
//! the image.
//!
//! # Interruption
//!
//! A cancel (the client left, or the daemon is stopping on SIGTERM: the server cancels every
//! job) stops the copy between chunks; the job then syncs the output, saves a final checkpoint
//! at the last complete range (the range in flight is redone on resume), and fails with an
//! error saying the progress is kept and how to resume. The kernel engine maps each range on
//! its own device, torn down at the range's end, so no device outlives the job either way.
//! qcow2 and VHD outputs (sparse, allocation state in memory) are not checkpointed: a re-run
//! restarts them from scratch, with a notice.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Instant;

use imgcrypt_proto::api::{EncryptParameters, LuksVersion, OutputFormat, Phase};
use sha2::{Digest, Sha256};

use crate::context::checkpoints::{
    Checkpoint, CheckpointStore, FileIdentity, SourceIdentity, VERSION,
};
use crate::context::DaemonContext;
use crate::engines::xts::IvMode;
use crate::engines::{Engine, PayloadJob};
use crate::formats::SourceImage;
use crate::keys::{strength, CandidateKey, KeyFile, SecretBytes};
use crate::luks::cost::KdfCaps;
use crate::luks::unlock::Unlocking;
use crate::luks::{self, crash, FormattedHeader, HeaderContext, HeaderSpec, LuksImage};
use crate::outputs::luks::{copy_header, LuksOutput};
use crate::outputs::{Container, Extent};
use crate::sys::aligned::AlignedBuffer;
use crate::sys::descriptors::CheckedFile;
use crate::sys::memfd;
use crate::{Error, Result};

use super::output::{prepare_container_output, Written};
use super::Job;

/// The magic of a LUKS1 header and of LUKS2's primary binary header.
const PRIMARY_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// The magic of LUKS2's secondary binary header.
const SECONDARY_MAGIC: &[u8; 6] = b"SKUL\xba\xbe";
/// What replaces the primary magic in a partial file (no format's magic).
const PRIMARY_MASK: &[u8; 6] = b"ICPRT1";
/// What replaces the secondary magic.
const SECONDARY_MASK: &[u8; 6] = b"ICPRT2";

/// Bytes of guest data sampled at each of the start, middle and end of the source.
const SAMPLE_BYTES: u64 = 64 << 10;

/// Payload bytes between checkpoints: a sixteenth of the payload in whole MiB, at least 16 MiB
/// and at most 256 MiB, so an interruption loses at most that much work and the `fdatasync`
/// after each range costs little (256 MiB at 0.5 GB/s is half a second of copy per sync). The
/// floor keeps each range several of the engines' 4 MiB chunks long, so their workers (and
/// dm-crypt's) still overlap within a range.
pub fn checkpoint_interval(payload_size: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    (payload_size / 16)
        .div_ceil(MIB)
        .saturating_mul(MIB)
        .clamp(16 * MIB, 256 * MIB)
}

/// The source file's `fstat` identity, taken when the job checks its inputs.
#[derive(Debug, Clone)]
pub struct SourceStat {
    file: FileIdentity,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl SourceStat {
    /// `fstat` of the source file.
    pub fn of(file: &File) -> Result<Self> {
        let metadata = file
            .metadata()
            .map_err(|e| Error::io("fstat on the source", e))?;
        Ok(Self {
            file: FileIdentity {
                dev: metadata.dev(),
                ino: metadata.ino(),
            },
            size: crate::sys::storage::size_of(file)?,
            mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
            // Unlike the modification time, no user can set it back.
            ctime_ns: i128::from(metadata.ctime()) * 1_000_000_000
                + i128::from(metadata.ctime_nsec()),
        })
    }
}

/// The source's identity with a hash of guest data at its start, middle and end.
fn source_identity(stat: &SourceStat, image: &dyn SourceImage) -> Result<SourceIdentity> {
    let size = image.virtual_size();
    let align = |offset: u64| offset / 4096 * 4096;
    let mut buffer = AlignedBuffer::new(SAMPLE_BYTES as usize)?;
    let mut hash = Sha256::new();
    for start in [0, align(size / 2), align(size.saturating_sub(SAMPLE_BYTES))] {
        let length = SAMPLE_BYTES.min(size - start) as usize;
        image.read_at(&mut buffer[..length], start)?;
        hash.update(start.to_le_bytes());
        hash.update(&buffer[..length]);
    }
    Ok(SourceIdentity {
        file: stat.file.clone(),
        size: stat.size,
        mtime_ns: stat.mtime_ns,
        ctime_ns: stat.ctime_ns,
        virtual_size: size,
        sample_sha256: hex(&hash.finalize()),
    })
}

/// Hex SHA-256 of what shapes the output besides the source and key. The engine is left out:
/// both engines write the same ciphertext.
fn parameters_sha256(parameters: &EncryptParameters) -> String {
    let shaping = serde_json::json!({
        "format": OutputFormat::Luks,
        "luks_version": parameters.luks_version,
        "sector_size": parameters.sector_size,
        "pbkdf": parameters.pbkdf,
        "target": parameters.target,
    });
    hex(&Sha256::digest(shaping.to_string().as_bytes()))
}

/// Hex SHA-256 of `0..length` of `file`: the staged masked header, which binds a checkpoint to
/// the header it was saved with.
fn header_sha256(file: &File, length: u64) -> Result<String> {
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < length {
        let chunk = (length - offset).min(buffer.len() as u64) as usize;
        file.read_exact_at(&mut buffer[..chunk], offset)
            .map_err(|e| Error::io("reading the header to hash it", e))?;
        hash.update(&buffer[..chunk]);
        offset += chunk as u64;
    }
    Ok(hex(&hash.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replaces the header magic in `header` (a daemon memfd holding a formatted header) by the
/// partial file's masks, or (`restore`) the masks by the magic. Returns whether the primary
/// header had what was to be replaced.
fn swap_magic(header: &File, restore: bool) -> Result<bool> {
    let (from, to, secondary_from, secondary_to) = if restore {
        (PRIMARY_MASK, PRIMARY_MAGIC, SECONDARY_MASK, SECONDARY_MAGIC)
    } else {
        (PRIMARY_MAGIC, PRIMARY_MASK, SECONDARY_MAGIC, SECONDARY_MASK)
    };
    let context = |e| Error::io("swapping the LUKS header magic in daemon memory", e);
    let mut start = [0u8; 16];
    header.read_exact_at(&mut start, 0).map_err(context)?;
    if &start[..6] != from {
        return Ok(false);
    }
    header.write_all_at(to, 0).map_err(context)?;
    // LUKS2 (version 2 at bytes 6..8): the secondary binary header sits at hdr_size (8..16).
    if u16::from_be_bytes([start[6], start[7]]) == 2 {
        let hdr_size = u64::from_be_bytes(start[8..16].try_into().expect("8 bytes"));
        let mut magic = [0u8; 6];
        header
            .read_exact_at(&mut magic, hdr_size)
            .map_err(context)?;
        if &magic == secondary_from {
            header
                .write_all_at(secondary_to, hdr_size)
                .map_err(context)?;
        }
    }
    Ok(true)
}

/// Writes the formatted `header` (`data_offset` bytes of a daemon memfd) into the output with
/// its magic masked, and syncs: from now on the partial file holds what recovers the volume key.
/// Returns the masked header's [`header_sha256`].
fn stage_masked_header(header: &File, output: &File, data_offset: u64) -> Result<String> {
    if !swap_magic(header, false)? {
        return Err(Error::Luks {
            operation: "format",
            message: "the formatted header carries no LUKS magic to mask".to_string(),
        });
    }
    let staged =
        copy_header(header, output, data_offset).and_then(|()| header_sha256(header, data_offset));
    swap_magic(header, true)?;
    let digest = staged?;
    output
        .sync_data()
        .map_err(|e| Error::io("fdatasync after the partial file's masked header", e))?;
    Ok(digest)
}

/// The partial file's staged header as checkpoints record it.
#[derive(Clone)]
struct Staged {
    /// The keyslot's key derivation as the summary describes it.
    pbkdf: String,
    /// [`header_sha256`] of the masked header.
    header_sha256: String,
}

/// What a resumed job recovered from the partial file.
struct Recovered {
    /// A daemon memfd as large as the output with the header (magic restored) at 0.
    header: File,
    volume_key: SecretBytes,
    checkpoint: Checkpoint,
    cipher: String,
    key_size_bits: u32,
}

/// What the summary says about the header and the start.
pub struct HeaderFacts {
    /// Cipher specification.
    pub cipher: String,
    /// Volume key bits.
    pub key_size_bits: u32,
    /// Where the payload starts.
    pub data_offset: u64,
    /// The keyslot's key derivation, as the summary describes it.
    pub pbkdf: String,
    /// The fresh header, with its benchmark; `None` when resumed.
    pub formatted: Option<FormattedHeader>,
    /// The payload byte this run resumed from.
    pub resumed_from: Option<u64>,
}

impl HeaderFacts {
    /// The facts of a header formatted by this run.
    pub fn fresh(header: FormattedHeader) -> Self {
        Self {
            cipher: header.cipher.clone(),
            key_size_bits: header.key_size_bits,
            data_offset: header.data_offset,
            pbkdf: header.pbkdf.clone(),
            formatted: Some(header),
            resumed_from: None,
        }
    }
}

/// The checked inputs a resumable encryption uses.
pub struct ResumeInputs<'a> {
    /// The source.
    pub image: &'a dyn SourceImage,
    /// Its file's identity.
    pub stat: &'a SourceStat,
    /// `OUT.partial`, a regular file.
    pub output: &'a CheckedFile,
    /// The key file.
    pub key: &'a KeyFile,
    /// How the key is named in messages.
    pub key_name: &'a str,
    /// The engine.
    pub engine: &'a dyn Engine,
    /// The caller's keyslot caps.
    pub caps: &'static KdfCaps,
}

/// A raw LUKS encryption that checkpoints, resuming from an earlier run's checkpoint where it
/// may (see the module documentation).
pub fn encrypt(
    job: &Job<EncryptParameters>,
    inputs: &ResumeInputs<'_>,
    state: &DaemonContext,
    store: &CheckpointStore,
    spec: &HeaderSpec,
) -> Result<(LuksOutput, Written, HeaderFacts)> {
    let virtual_size = inputs.image.virtual_size();
    // One job at a time per output, so that a re-run never writes the partial file while the
    // interrupted run is still stopping (serialised in the daemon: see `CheckpointStore::claim`).
    let output_identity = FileIdentity::of(&inputs.output.file)?;
    let _claim = store.claim(&output_identity, CLAIM_WAIT, || job.check_cancel())?;
    let template = Checkpoint {
        version: VERSION,
        uid: job.caller_uid,
        output: output_identity.clone(),
        output_size: 0,
        source: source_identity(inputs.stat, inputs.image)?,
        // Only where a header may carry it too: an unsalted SHA-256 of a guessable key would
        // let whoever reads the state directory test guesses fast. Without it the keyslot
        // itself tells a changed key (see `recover`).
        key_fingerprint: strength::may_store_fingerprint(inputs.key.passphrase.as_bytes())?
            .then(|| inputs.key.fingerprint.clone()),
        parameters_sha256: parameters_sha256(&job.parameters),
        data_offset: 0,
        payload_size: 0,
        done: 0,
        pbkdf: String::new(),
        header_sha256: String::new(),
    };
    if let Some(recovered) = recover(job, inputs, store, &template)? {
        let checkpoint = recovered.checkpoint;
        let container = LuksOutput::plan(&recovered.header, checkpoint.data_offset, virtual_size)?;
        let from = checkpoint.done;
        job.notice(format!(
            "resuming the interrupted encryption into this OUT.partial at payload byte {from} \
             of {} (its checkpoint matches the source, the key and the options)",
            checkpoint.payload_size
        ));
        tracing::info!(job = job.id, from, "resuming from a checkpoint");
        job.reporter.audit().resumed_from(from);
        let pbkdf = checkpoint.pbkdf.clone();
        let staged = Staged {
            pbkdf: pbkdf.clone(),
            header_sha256: checkpoint.header_sha256.clone(),
        };
        let data_offset = checkpoint.data_offset;
        let mut copier = Copier::new(job, inputs, store, checkpoint);
        let written = copier
            .run(&container, recovered.volume_key.as_bytes(), &mut |_| {
                Ok(Some(staged.clone()))
            })
            .map_err(|e| copier.failed(e))?;
        drop(recovered.volume_key);
        copier.finish(&container).map_err(|e| copier.failed(e))?;
        let facts = HeaderFacts {
            cipher: recovered.cipher,
            key_size_bits: recovered.key_size_bits,
            data_offset,
            pbkdf,
            formatted: None,
            resumed_from: Some(from),
        };
        return Ok((container, written, facts));
    }
    fresh(job, inputs, state, store, spec, template)
}

/// How long a job waits for another job on the same `OUT.partial` to let go: an interrupted
/// run still saving its last checkpoint (waiting for its keyslot's derivation at most).
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes a fresh start zeroes at the start of a non-empty partial file: past every place a LUKS1
/// or LUKS2 magic can be (LUKS2's secondary header sits at its primary's size, 4 MiB at most).
const OLD_HEADER_CLEAR: u64 = 16 << 20;

/// Zeroes the start of a non-empty partial file (at most [`OLD_HEADER_CLEAR`] bytes) and syncs,
/// so that no earlier image's header survives over a payload this run only partly rewrites.
fn clear_old_header(output: &File) -> Result<()> {
    let size = crate::sys::storage::size_of(output)?;
    let length = size.min(OLD_HEADER_CLEAR);
    if length == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < length {
        let chunk = (length - offset).min(zeros.len() as u64) as usize;
        output
            .write_all_at(&zeros[..chunk], offset)
            .map_err(|e| Error::io(format!("clearing OUT.partial's old header at {offset}"), e))?;
        offset += chunk as u64;
    }
    output
        .sync_data()
        .map_err(|e| Error::io("fdatasync after clearing OUT.partial's old header", e))
}

/// A fresh start: the header formatted with its keyslot derived alongside the copy (as
/// [`super::encrypt`]'s other outputs do), staged masked in the partial file once derived.
fn fresh(
    job: &Job<EncryptParameters>,
    inputs: &ResumeInputs<'_>,
    state: &DaemonContext,
    store: &CheckpointStore,
    spec: &HeaderSpec,
    mut checkpoint: Checkpoint,
) -> Result<(LuksOutput, Written, HeaderFacts)> {
    // Before anything is written: a checkpoint must never describe bytes this run overwrites.
    store.remove(checkpoint.uid, &checkpoint.output);
    // Nor may an earlier run's header (a complete image left as OUT.partial) sit over the
    // payload this run rewrites: it goes first, durably.
    clear_old_header(&inputs.output.file)?;
    job.check_cancel()?;
    job.reporter.progress(Phase::Format, 0, 0);
    let volume_key = SecretBytes::random(luks::VOLUME_KEY_BYTES)?;
    let idle = || super::only_job(state);
    let context = HeaderContext {
        caps: Some(inputs.caps),
        idle: &idle,
    };
    std::thread::scope(|scope| {
        let (prepared, pending) =
            super::encrypt::start_format(scope, job, inputs.key, spec, &volume_key, &context)?;
        let virtual_size = inputs.image.virtual_size();
        let container = LuksOutput::plan(&prepared.image, prepared.data_offset, virtual_size)?;
        job.check_cancel()?;
        prepare_container_output(inputs.output, &container)?;
        checkpoint.output_size = container.output_size();
        checkpoint.data_offset = prepared.data_offset;
        checkpoint.payload_size = container.payload_size();
        let mut pending = Some(pending);
        let mut formatted: Option<(FormattedHeader, String)> = None;
        // After each durable range: once the keyslot is derived (`wait`: now, waiting for
        // it), the masked header goes into the partial file and checkpoints start.
        let mut staged = |wait: bool| -> Result<Option<Staged>> {
            if formatted.is_none() && (wait || pending.as_ref().is_some_and(|p| p.is_finished())) {
                let Some(pending) = pending.take() else {
                    return Ok(None);
                };
                let header = super::encrypt::finish_keyslot(job, pending, inputs.caps)?;
                let digest =
                    stage_masked_header(&header.image, &inputs.output.file, header.data_offset)?;
                formatted = Some((header, digest));
            }
            Ok(formatted.as_ref().map(|(header, digest)| Staged {
                pbkdf: header.pbkdf.clone(),
                header_sha256: digest.clone(),
            }))
        };
        let mut copier = Copier::new(job, inputs, store, checkpoint);
        let written = copier
            .run(&container, volume_key.as_bytes(), &mut staged)
            .map_err(|e| copier.failed(e))?;
        staged(true).map_err(|e| copier.failed(e))?;
        copier.finish(&container).map_err(|e| copier.failed(e))?;
        let (header, _) = formatted.ok_or_else(|| Error::Luks {
            operation: "format",
            message: "the keyslot was never derived".to_string(),
        })?;
        Ok((container, written, HeaderFacts::fresh(header)))
    })
}

/// The checkpointed copy of one job.
struct Copier<'j, 'i> {
    job: &'j Job<EncryptParameters>,
    inputs: &'j ResumeInputs<'i>,
    store: &'j CheckpointStore,
    /// What the last save wrote (`done`: the payload it says is durable).
    checkpoint: Checkpoint,
    /// Payload bytes from the start that are durable now (saved or not: before the header is
    /// staged there is nothing to save them with).
    durable: u64,
    /// A checkpoint of this output is in the store (saved by this run, or the one resumed).
    checkpointed: bool,
}

/// Called after each durable range (and with `true` when the copy stops or ends, then waiting
/// for what it needs): the keyslot's description once the partial file holds the header that
/// recovers the volume key, `None` while it does not (nothing to checkpoint yet).
type AfterRange<'a> = dyn FnMut(bool) -> Result<Option<Staged>> + 'a;

impl<'j, 'i> Copier<'j, 'i> {
    fn new(
        job: &'j Job<EncryptParameters>,
        inputs: &'j ResumeInputs<'i>,
        store: &'j CheckpointStore,
        checkpoint: Checkpoint,
    ) -> Self {
        Self {
            job,
            inputs,
            store,
            durable: checkpoint.done,
            checkpointed: checkpoint.done > 0,
            checkpoint,
        }
    }

    /// `error` as the job reports it: once a checkpoint is saved, a failure (say EIO) keeps
    /// the partial file resumable, so it is reported as [`Error::FailedAfterCheckpoint`] (an
    /// `Interrupted` on the wire, on which imgctl keeps `OUT.partial`).
    fn failed(&self, error: Error) -> Error {
        match error {
            Error::Interrupted { .. } | Error::FailedAfterCheckpoint { .. } => error,
            error if self.checkpointed => Error::FailedAfterCheckpoint {
                source: Box::new(error),
                done: self.checkpoint.done,
                total: self.checkpoint.payload_size,
            },
            error => error,
        }
    }

    /// Copies the payload from `checkpoint.done` to its end, range by range, saving a
    /// checkpoint after each durable range once `after_range` says the header is staged.
    fn run(
        &mut self,
        container: &LuksOutput,
        key: &[u8],
        after_range: &mut AfterRange<'_>,
    ) -> Result<Written> {
        let job = self.job;
        let output = &self.inputs.output.file;
        let payload_size = container.payload_size();
        let data_offset = container.data_offset();
        let interval = checkpoint_interval(payload_size);
        let mut done = self.checkpoint.done;
        let mut payload_bytes = 0;
        job.reporter.progress(Phase::Copy, done, payload_size);
        let started = Instant::now();
        while done < payload_size {
            let end = (done + interval).min(payload_size);
            let extent = Extent {
                guest_offset: done,
                length: end - done,
                output_offset: data_offset + done,
                first_iv: done / 512,
            };
            let base = done;
            let progress = |written: u64| {
                if base + written > 0 {
                    crash::point("encrypt:copying");
                }
                job.reporter
                    .progress(Phase::Copy, base + written, payload_size)
            };
            let copied = self.inputs.engine.write_payload(&PayloadJob {
                job_id: job.id,
                source: self.inputs.image,
                output,
                extents: &[extent],
                sector_size: job.parameters.sector_size,
                key,
                iv: IvMode::Plain64,
                progress: &progress,
                cancel: &job.cancel,
            });
            match copied {
                Ok(bytes) => payload_bytes += bytes,
                Err(Error::Cancelled) => return Err(self.stop(after_range)),
                Err(error) => return Err(error),
            }
            output
                .sync_data()
                .map_err(|e| Error::io("fdatasync on the output's payload", e))?;
            done = end;
            self.durable = done;
            if let Some(staged) = after_range(false)? {
                self.save(done, staged);
            }
            crash::point("encrypt:checkpoint");
            crash::delay();
        }
        let copy_elapsed = started.elapsed();
        // The payload is durable before any byte that makes the file look like an image.
        job.reporter
            .progress(Phase::Sync, payload_size, payload_size);
        output
            .sync_data()
            .map_err(|e| Error::io("fdatasync on the output's payload", e))?;
        crash::point("encrypt:payload-durable");
        Ok(Written {
            payload_bytes,
            copy_elapsed,
        })
    }

    /// Saves a checkpoint at `done` (best effort: a state directory that fails costs the
    /// resume, not the job).
    fn save(&mut self, done: u64, staged: Staged) {
        self.checkpoint.done = done;
        self.checkpoint.pbkdf = staged.pbkdf;
        self.checkpoint.header_sha256 = staged.header_sha256;
        match self.store.save(&self.checkpoint) {
            Ok(()) => {
                self.checkpointed = true;
                tracing::debug!(job = self.job.id, done, "checkpoint saved")
            }
            Err(error) => tracing::warn!(job = self.job.id, "{error}; this job cannot be resumed"),
        }
    }

    /// The copy was cancelled (client gone, or the daemon stopping): the durable progress is
    /// checkpointed (the header staged first, waiting for its derivation if need be) and the
    /// error says how to resume.
    fn stop(&mut self, after_range: &mut AfterRange<'_>) -> Error {
        let done = self.durable;
        let payload_size = self.checkpoint.payload_size;
        let staged = match self
            .inputs
            .output
            .file
            .sync_data()
            .map_err(|e| Error::io("fdatasync on the output's payload", e))
            .and_then(|()| after_range(true))
        {
            Ok(staged) => staged,
            Err(error) => return error,
        };
        let Some(staged) = staged else {
            return Error::Cancelled;
        };
        self.save(done, staged);
        tracing::info!(job = self.job.id, done, "stopped; progress checkpointed");
        Error::Interrupted {
            done,
            total: payload_size,
        }
    }

    /// After the payload is durable: the header with its magic, synced, and the checkpoint
    /// dropped.
    fn finish(&mut self, container: &LuksOutput) -> Result<()> {
        self.job.check_cancel()?;
        self.job.reporter.progress(Phase::Header, 0, 0);
        let output = &self.inputs.output.file;
        container.write_metadata(output)?;
        output
            .sync_data()
            .map_err(|e| Error::io("fdatasync on the output", e))?;
        crash::point("encrypt:header-written");
        self.store
            .remove(self.checkpoint.uid, &self.checkpoint.output);
        Ok(())
    }
}

/// The checkpoint and volume key to resume with, or `None` (with a notice saying why) to
/// restart from scratch.
fn recover(
    job: &Job<EncryptParameters>,
    inputs: &ResumeInputs<'_>,
    store: &CheckpointStore,
    template: &Checkpoint,
) -> Result<Option<Recovered>> {
    let size = crate::sys::storage::size_of(&inputs.output.file)?;
    if size == 0 {
        // A new file (its inode may be a removed file's): nothing to resume or explain.
        store.remove(template.uid, &template.output);
        return Ok(None);
    }
    let restart = |why: String| {
        let text = format!("restarting the encryption into OUT.partial from scratch: {why}");
        tracing::info!(job = job.id, "{text}");
        job.notice(text);
        Ok(None)
    };
    let owner = inputs
        .output
        .file
        .metadata()
        .map_err(|e| Error::io("fstat on OUT.partial", e))?
        .uid();
    if owner != job.caller_uid {
        // Someone else's file the caller may write: never resumed from its bytes.
        return restart(format!(
            "OUT.partial belongs to uid {owner}, not to the caller (uid {})",
            job.caller_uid
        ));
    }
    let Some(checkpoint) = store.load(template.uid, &template.output) else {
        return restart(
            "no checkpoint of an interrupted run was found for it (it was not left by an \
             encryption this daemon checkpointed, or that checkpoint was replaced)"
                .to_string(),
        );
    };
    match (&checkpoint.key_fingerprint, &template.key_fingerprint) {
        (Some(then), Some(now)) if then != now => {
            return restart(format!(
                "the key changed: the interrupted run used the key with fingerprint {then}, \
                 this run's key ({}) has {now}; a run with another key always starts over",
                inputs.key_name
            ))
        }
        (Some(_), None) | (None, Some(_)) => {
            return restart(format!(
                "the key changed: this run's key ({}) is not the interrupted run's; a run with \
                 another key always starts over",
                inputs.key_name
            ))
        }
        // Both recorded and equal, or neither (a key too guessable to fingerprint): the
        // keyslot decides below.
        _ => {}
    }
    if let Some(why) = source_change(&checkpoint.source, &template.source) {
        return restart(format!(
            "the source changed since the interrupted run ({why})"
        ));
    }
    if checkpoint.parameters_sha256 != template.parameters_sha256 {
        return restart(
            "the options that shape the image (LUKS version, sector size, key derivation, \
             target) differ from the interrupted run's"
                .to_string(),
        );
    }
    let virtual_size = inputs.image.virtual_size();
    let planned = luks::output_size(checkpoint.data_offset, virtual_size).ok();
    if planned != Some(checkpoint.output_size) || size != checkpoint.output_size {
        return restart(format!(
            "OUT.partial is {size} bytes, not the {} the interrupted run left",
            checkpoint.output_size
        ));
    }
    // Checkpoints are saved at whole MiB ranges (or the end) within the payload.
    if checkpoint.done > checkpoint.payload_size
        || (checkpoint.done % (1 << 20) != 0 && checkpoint.done != checkpoint.payload_size)
    {
        return restart(format!(
            "its checkpoint's progress ({} of {} payload bytes) is not one this daemon saves",
            checkpoint.done, checkpoint.payload_size
        ));
    }
    match unlock_partial(job, inputs, &checkpoint) {
        Ok((header, volume_key, cipher, key_size_bits)) => Ok(Some(Recovered {
            header,
            volume_key,
            checkpoint,
            cipher,
            key_size_bits,
        })),
        Err(Error::Cancelled) => Err(Error::Cancelled),
        Err(Error::WrongKey { .. }) => restart(format!(
            "the key changed: this run's key ({}) does not open the interrupted run's keyslot; \
             a run with another key always starts over",
            inputs.key_name
        )),
        Err(error) => restart(format!(
            "its masked header could not be opened with this key: {error}"
        )),
    }
}

/// What differs between the checkpointed source and this run's, if anything.
fn source_change(then: &SourceIdentity, now: &SourceIdentity) -> Option<&'static str> {
    if then.file != now.file {
        Some("it is another file: its device or inode differs")
    } else if then.size != now.size || then.virtual_size != now.virtual_size {
        Some("its size differs")
    } else if then.mtime_ns != now.mtime_ns {
        Some("its modification time differs")
    } else if then.ctime_ns != now.ctime_ns {
        Some("its inode change time differs: it was written, renamed, linked or had its mode or owner changed")
    } else if then.sample_sha256 != now.sample_sha256 {
        Some("its content differs where sampled")
    } else {
        None
    }
}

/// Reads the partial file's masked header into a daemon memfd, restores its magic and opens
/// its keyslot with the job's key: the header (for the final write) and the volume key.
fn unlock_partial(
    job: &Job<EncryptParameters>,
    inputs: &ResumeInputs<'_>,
    checkpoint: &Checkpoint,
) -> Result<(File, SecretBytes, String, u32)> {
    let header = memfd::create("imgcrypt-resume-header")?;
    header
        .set_len(checkpoint.output_size)
        .map_err(|e| Error::io("sizing the in-memory copy of the partial header", e))?;
    copy_header(&inputs.output.file, &header, checkpoint.data_offset)?;
    // Hashed masked: a header already unmasked (the payload was complete and the header
    // written, but the checkpoint's removal was lost) is still the one the checkpoint names.
    swap_magic(&header, false)?;
    if header_sha256(&header, checkpoint.data_offset)? != checkpoint.header_sha256 {
        return Err(Error::UnsupportedImage {
            message: "its header is not the one the interrupted run staged".to_string(),
        });
    }
    if !swap_magic(&header, true)? {
        return Err(Error::UnsupportedImage {
            message: "it carries no masked LUKS header where the interrupted run wrote one"
                .to_string(),
        });
    }
    let opened = open_header(
        job,
        &header,
        inputs.key,
        inputs.key_name,
        inputs.caps,
        checkpoint.data_offset,
        job.parameters.luks_version,
    )
    .map_err(|error| match error {
        Error::UnsupportedImage { message } if message.starts_with("the header is not") => {
            Error::UnsupportedImage {
                message: "the header is not the one the checkpoint describes".to_string(),
            }
        }
        other => other,
    })?;
    Ok((
        header,
        opened.volume_key,
        opened.luks.cipher().to_string(),
        opened.luks.key_size_bits(),
    ))
}

/// A header a job made earlier, opened with the job's key.
pub(super) struct OpenedHeader {
    /// The header as read.
    pub luks: LuksImage,
    /// Its volume key.
    pub volume_key: SecretBytes,
    /// The opened keyslot's key derivation, as the summary describes it.
    pub pbkdf: String,
}

/// Opens the LUKS header on the daemon memfd `header` (sized as the image it heads) with
/// `key`, under the caller's `caps`, after checking that it is a header of the job's
/// parameters (LUKS `version`, sector size, a payload imgcrypt encrypts) with its data at
/// `data_offset`. What a resumed job continues from: the partial file's staged header
/// ([`unlock_partial`]) or the one a client saved from an interrupted stream
/// ([`super::stream`]). A key that opens no keyslot is [`Error::WrongKey`].
pub(super) fn open_header(
    job: &Job<EncryptParameters>,
    header: &File,
    key: &KeyFile,
    key_name: &str,
    caps: &KdfCaps,
    data_offset: u64,
    version: LuksVersion,
) -> Result<OpenedHeader> {
    let luks = LuksImage::read(header)?;
    let parameters = &job.parameters;
    if luks.data_offset() != data_offset
        || luks.version() != version
        || luks.sector_size() != parameters.sector_size
    {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the header is not one of these parameters: a {} header with {}-byte sectors \
                 and its data at byte {}, where this job makes a {} header with {}-byte \
                 sectors and its data at byte {data_offset}",
                luks.version().display_name(),
                luks.sector_size(),
                luks.data_offset(),
                version.display_name(),
                parameters.sector_size,
            ),
        });
    }
    luks.check_payload_supported()?;
    job.reporter.progress(Phase::Unlock, 0, 0);
    let candidates = [CandidateKey {
        name: key_name.to_string(),
        key: key.duplicate()?,
    }];
    let (volume_key, unlocked) = luks.unlock(
        &candidates,
        &Unlocking {
            caps,
            notice: &|_| {},
            cancelled: &|| job.check_cancel().is_err(),
        },
    )?;
    let pbkdf = luks
        .keyslot_cost(unlocked.keyslot)
        .map_or_else(String::new, |cost| cost.kdf.describe());
    Ok(OpenedHeader {
        luks,
        volume_key,
        pbkdf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_whole_mib_within_bounds() {
        assert_eq!(checkpoint_interval(1 << 20), 16 << 20);
        assert_eq!(checkpoint_interval(64 << 20), 16 << 20);
        assert_eq!(checkpoint_interval(1 << 30), 64 << 20);
        assert_eq!(checkpoint_interval(40 << 30), 256 << 20);
        assert_eq!(checkpoint_interval((100 << 20) + 7) % (1 << 20), 0);
    }

    #[test]
    fn masking_hides_both_luks2_magics_and_restores_them() {
        let header = memfd::create("test-mask").unwrap();
        header.set_len(1 << 16).unwrap();
        let mut primary = [0u8; 16];
        primary[..6].copy_from_slice(PRIMARY_MAGIC);
        primary[6..8].copy_from_slice(&2u16.to_be_bytes());
        primary[8..16].copy_from_slice(&0x4000u64.to_be_bytes());
        header.write_all_at(&primary, 0).unwrap();
        header.write_all_at(SECONDARY_MAGIC, 0x4000).unwrap();
        let read = |at: u64| {
            let mut magic = [0u8; 6];
            header.read_exact_at(&mut magic, at).unwrap();
            magic
        };
        assert!(swap_magic(&header, false).unwrap());
        assert_eq!(&read(0), PRIMARY_MASK);
        assert_eq!(&read(0x4000), SECONDARY_MASK);
        // Already masked: masking again finds no magic.
        assert!(!swap_magic(&header, false).unwrap());
        assert!(swap_magic(&header, true).unwrap());
        assert_eq!(&read(0), PRIMARY_MAGIC);
        assert_eq!(&read(0x4000), SECONDARY_MAGIC);
    }
}
