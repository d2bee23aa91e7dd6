//! `io.imgcrypt.Rewrite`: rotate an image to the key ring's `encryption_key`.
//!
//! # Header only (the default)
//!
//! The volume key stays; only keyslots change, in an order that never leaves the image without
//! a keyslot some ring key opens:
//! 1. unlock with a candidate key (by fingerprint, else by trial);
//! 2. add a keyslot (and `imgcrypt-key` token) for the new key on the daemon's header copy and
//!    commit it (new key material first, then the primary header, then the secondary, each
//!    synced): the image now opens with the old key and the new one;
//! 3. read the header back from the image and open the new keyslot with the new key, so nothing
//!    is removed on the strength of a write that did not land;
//! 4. remove every other keyslot and its token and commit (headers first, then the wipe of the
//!    old key material).
//!
//! A rerun after an interruption finds the new key's keyslot (it is a candidate too) and
//! finishes step 4.
//!
//! # Full re-encryption (`reencrypt_output`)
//!
//! Header-only rotation does not help against someone who kept a copy of the old header and the
//! old key: the volume key is unchanged. Re-encryption makes a new volume key and rewrites every
//! sector, out of place: the client passes `IMAGE.reencrypt.partial`, the daemon formats a new
//! header there (same LUKS version and sector size, one keyslot for the new key) and copies the
//! payload, decrypting with the old volume key and encrypting with the new, range by range.
//! After each range is synced, a checkpoint record past the end of the new image says how far
//! it got; a rerun with the same partial file resumes there. The record is cut off once the
//! copy is complete and synced, and the client renames the file over the image. The source
//! image is only read, so it stays valid until that rename.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use imgcrypt_proto::api::{
    EngineKind, LuksVersion, OutputFormat, Pbkdf, PbkdfBenchmark, Phase, RemovedKeyslot,
    RewriteParameters, RewriteSummary, Unlocked,
};
use serde::{Deserialize, Serialize};

use crate::context::DaemonContext;
use crate::engines::userspace::UserspaceEngine;
use crate::engines::xts::IvMode;
use crate::engines::PayloadJob;
use crate::error::Descriptor;
use crate::formats::encrypted;
use crate::formats::qcow2;
use crate::keys::{strength, CandidateKey, SecretBytes};
use crate::luks::cost::KdfCaps;
use crate::luks::unlock::Unlocking;
use crate::luks::{crash, Change, HeaderSpec, LuksImage, LuksPayload};
use crate::outputs::luks::payload_extent;
use crate::outputs::qcow2::Qcow2Output;
use crate::outputs::vhd::VhdOutput;
use crate::sys::descriptors::{self, CheckedFile};
use crate::sys::storage::StorageKind;
use crate::{Error, Result};

use super::output::{prepare_output, write_container};
use super::unlock::{self, JobKeys, Purpose};
use super::{millis, Job};
use crate::outputs::luks::copy_header;

/// Payload bytes re-encrypted between two checkpoints: small enough that an interruption loses
/// little work, large enough that the sync after each costs little.
const CHECKPOINT_INTERVAL: u64 = 256 << 20;

/// Size of the checkpoint record appended past the new image's end while re-encrypting.
const CHECKPOINT_RECORD_BYTES: u64 = 4096;

/// Identifies a checkpoint record.
const CHECKPOINT_MAGIC: &str = "imgcrypt-reencrypt-checkpoint";

/// Runs the job.
pub fn run(mut job: Job<RewriteParameters>, state: &DaemonContext) -> Result<RewriteSummary> {
    let parameters = job.parameters.clone();
    match parameters.reencrypt_output {
        None => rotate_header(job, state),
        Some(output) => {
            let image = descriptors::check_readable_image(
                job.descriptors.take(Descriptor::Image, parameters.image)?,
                Descriptor::Image,
            )?;
            let output = descriptors::check_writable_image(
                job.descriptors.take(Descriptor::Output, output)?,
                Descriptor::Output,
            )?;
            reencrypt(job, state, image, output)
        }
    }
}

fn rotate_header(mut job: Job<RewriteParameters>, state: &DaemonContext) -> Result<RewriteSummary> {
    let started = Instant::now();
    let parameters = job.parameters.clone();
    let image = descriptors::check_writable_image(
        job.descriptors.take(Descriptor::Image, parameters.image)?,
        Descriptor::Image,
    )?;
    let keys = unlock::collect(
        &mut job,
        state,
        &parameters.keys,
        parameters.encryption_key.as_ref(),
        Purpose::Other,
    )?;
    let new_key = keys.encryption_key()?;
    job.reporter
        .audit()
        .encryption_key(&new_key.key.fingerprint);
    let pbkdf = chosen_pbkdf(&job, &keys)?;
    let caps = unlock::caps(&job);
    let image = unlock::lock_image(image.file, true)?;
    let mut home = match encrypted::detect(&image)? {
        OutputFormat::Luks => HeaderHome::Luks(&image),
        OutputFormat::Qcow2 => HeaderHome::qcow2(&image)?,
        OutputFormat::Vhd => return Err(vhd_needs_reencryption()),
    };
    // Header only: no payload is decrypted, so any cipher libcryptsetup reads will do.
    let (mut luks, volume_key, unlocked) = unlock::open_header(&job, home.header(), &keys)?;
    job.check_cancel()?;
    job.reporter.progress(Phase::Keyslots, 0, 0);

    let existing = existing_keyslot(&luks, &keys, &unlocked);
    let mut pbkdf_benchmark = None;
    let (keyslot, keyslot_added) = match existing {
        Some(keyslot) => {
            job.notice(format!(
                "keyslot {keyslot} already opens with {} (an earlier rotation was interrupted?): \
                 removing the other keyslots",
                new_key.name
            ));
            (keyslot, false)
        }
        None => {
            caps.check_request(&HeaderSpec {
                version: luks.version(),
                pbkdf: pbkdf.clone(),
                ..HeaderSpec::default()
            })?;
            let idle = || super::only_job(state);
            let (keyslot, benchmark) =
                luks.add_keyslot_with(&volume_key, new_key, &pbkdf, &idle)?;
            pbkdf_benchmark = super::benchmark_summary(benchmark);
            // Checked before the commit: a keyslot the caller could not open again never
            // reaches the image.
            if let Some(cost) = luks.keyslot_cost(keyslot) {
                caps.check_created(cost)?;
            }
            weak_key_notice(&job, new_key, luks.version())?;
            home.commit(&mut luks, Change::Added)?;
            tracing::info!(job = job.id, keyslot, fingerprint = %new_key.key.fingerprint, "keyslot added and synced");
            (keyslot, true)
        }
    };
    confirm_new_keyslot(&home.read_back()?, new_key, keyslot, &volume_key, caps)?;

    let mut removed = Vec::new();
    let others: Vec<u32> = luks
        .keyslots()
        .iter()
        .map(|slot| slot.keyslot)
        .filter(|&slot| slot != keyslot)
        .collect();
    for slot in others {
        let fingerprint = luks.remove_keyslot(slot)?;
        removed.push(RemovedKeyslot {
            keyslot: slot,
            fingerprint,
        });
    }
    if !removed.is_empty() {
        home.commit(&mut luks, Change::Removed)?;
    }
    tracing::info!(
        job = job.id,
        keyslot,
        removed = removed.len(),
        "header-only rotation done"
    );
    Ok(RewriteSummary {
        unlocked,
        fingerprint: new_key.key.fingerprint.clone(),
        keyslot,
        keyslot_added,
        removed,
        reencrypted: false,
        resumed_from: None,
        pbkdf_benchmark,
        elapsed_ms: millis(started.elapsed()),
    })
}

/// Re-encrypts a qcow2 image into a new qcow2 with a new volume key and one keyslot for the
/// new key, read from the old image's decrypted guest view through the same allocated copy as
/// Encrypt: its data clusters that hold a non-zero byte, placed anew by [`Qcow2Output`].
///
/// Not resumable, unlike raw LUKS: the new file's layout is only final once its metadata is
/// written, so an interrupted run starts over (the partial file is emptied first). The old
/// image is only read, so it stays valid until the client renames the new one over it.
fn reencrypt_qcow2(
    job: &Job<RewriteParameters>,
    state: &DaemonContext,
    image: &File,
    output: &CheckedFile,
    keys: &JobKeys,
    pbkdf: &Pbkdf,
    started: Instant,
) -> Result<RewriteSummary> {
    let new_key = keys.encryption_key()?;
    let caps = unlock::caps(job);
    let opened = unlock::open_plaintext(job, image, keys)?;
    let plaintext = opened.plaintext.as_ref();
    let existing = output
        .file
        .metadata()
        .map_err(|e| Error::io("fstat on the re-encryption output", e))?
        .len();
    if existing != 0 {
        job.notice("a partial qcow2 re-encryption cannot be resumed: starting over".to_string());
    }

    job.check_cancel()?;
    job.reporter.progress(Phase::Format, 0, 0);
    let spec = HeaderSpec {
        version: LuksVersion::Luks1,
        sector_size: 512,
        pbkdf: pbkdf.clone(),
    };
    caps.check_request(&spec)?;
    let (new_volume_key, header) = super::new_luks_header(&spec, &new_key.key, caps, state)?;
    let pbkdf_benchmark = super::benchmark_summary(header.benchmark);
    let container = Qcow2Output::new(plaintext.virtual_size(), &header.image, header.data_offset)?;
    let written = write_container(
        job,
        plaintext,
        output,
        &UserspaceEngine::new(),
        &container,
        512,
        new_volume_key.as_bytes(),
        IvMode::Plain64,
        &mut || Ok(()),
    )?;
    drop(new_volume_key);
    let total = written.payload_bytes;
    tracing::info!(
        job = job.id,
        allocated = total,
        "re-encrypted a qcow2 image"
    );
    Ok(container_reencrypted(
        opened.unlocked,
        &new_key.key.fingerprint,
        pbkdf_benchmark,
        started,
    ))
}

/// The summary of a container re-encryption (qcow2 or VHD): a new image with one key, written
/// from scratch (never resumed).
fn container_reencrypted(
    unlocked: Unlocked,
    fingerprint: &str,
    pbkdf_benchmark: Option<PbkdfBenchmark>,
    started: Instant,
) -> RewriteSummary {
    RewriteSummary {
        unlocked,
        fingerprint: fingerprint.to_string(),
        keyslot: 0,
        keyslot_added: true,
        removed: Vec::new(),
        reencrypted: true,
        resumed_from: None,
        pbkdf_benchmark,
        elapsed_ms: millis(started.elapsed()),
    }
}

/// Where the LUKS header being re-keyed lives.
///
/// A raw LUKS image is its own header file. A qcow2 keeps its LUKS1 header in clusters named by
/// the crypto header extension: libcryptsetup edits a memfd copy of that region, and each
/// commit is then written back into the qcow2 in LUKS1's crash-safe order
/// ([`qcow2::write_back_luks_header`]). The qcow2's own metadata is never touched.
enum HeaderHome<'a> {
    Luks(&'a File),
    Qcow2 {
        image: &'a File,
        offset: u64,
        copy: File,
        /// The region as it is on the image now.
        on_image: Vec<u8>,
    },
}

impl<'a> HeaderHome<'a> {
    fn qcow2(image: &'a File) -> Result<Self> {
        let (qcow2, copy) = unlock::qcow2_luks_header(image)?;
        let (offset, length) = qcow2
            .luks_region()
            .expect("qcow2_luks_header refuses unencrypted images");
        let mut on_image = vec![0u8; length as usize];
        copy.read_exact_at(&mut on_image, 0)
            .map_err(|e| Error::io("reading the qcow2 LUKS header copy", e))?;
        Ok(Self::Qcow2 {
            image,
            offset,
            copy,
            on_image,
        })
    }

    /// What [`LuksImage::read`] opens.
    fn header(&self) -> &File {
        match self {
            Self::Luks(image) => image,
            Self::Qcow2 { copy, .. } => copy,
        }
    }

    /// Makes `luks`'s edits durable on the image.
    fn commit(&mut self, luks: &mut LuksImage, change: Change) -> Result<()> {
        match self {
            Self::Luks(image) => luks.commit(image, change),
            Self::Qcow2 {
                image,
                offset,
                copy,
                on_image,
            } => {
                luks.commit(copy, change)?;
                qcow2::write_back_luks_header(
                    image,
                    *offset,
                    on_image,
                    copy,
                    change == Change::Added,
                )?;
                copy.read_exact_at(on_image, 0)
                    .map_err(|e| Error::io("reading the qcow2 LUKS header copy", e))
            }
        }
    }

    /// The header as the image now holds it, read afresh, to confirm a commit landed.
    fn read_back(&self) -> Result<File> {
        match self {
            Self::Luks(image) => image
                .try_clone()
                .map_err(|e| Error::io("duplicating the image descriptor", e)),
            Self::Qcow2 {
                image,
                offset,
                on_image,
                ..
            } => qcow2::copy_luks_region(image, *offset, on_image.len() as u64),
        }
    }
}

/// The PBKDF for the new keyslot: the caller's choice, or the daemon's defaults.
///
/// A keyslot for the daemon ring's key protects plaintext only root may read
/// ([`crate::keys::ring::may_decrypt_with`]); a non-root caller choosing its PBKDF could make it
/// cheap (a copy of another user's ring-keyed image re-keyed to pbkdf2 with 1000 iterations
/// turns every later check of a guess into microseconds). So for such a caller the daemon's
/// defaults apply and an explicit choice is refused.
fn chosen_pbkdf(job: &Job<RewriteParameters>, keys: &JobKeys) -> Result<Pbkdf> {
    let chosen = job.parameters.pbkdf.clone();
    if keys.from_daemon_ring
        && chosen.is_some()
        && !crate::keys::ring::may_decrypt_with(job.caller_uid)
    {
        return Err(Error::PermissionDenied(format!(
            "uid {} may not choose the key derivation of a keyslot for the daemon's key ring: \
             only root may; leave out the PBKDF options (--pbkdf, --iter-time, \
             --pbkdf-iterations, --pbkdf-memory, --pbkdf-parallel) and the daemon's defaults \
             apply, or rotate to your own key with --key-file",
            job.caller_uid
        )));
    }
    Ok(chosen.unwrap_or_default())
}

/// Tells the user when the new key gets no `imgcrypt-key` fingerprint because it does not look
/// generated ([`crate::keys::strength`]); LUKS1 has no tokens at all.
fn weak_key_notice(
    job: &Job<RewriteParameters>,
    new_key: &CandidateKey,
    version: LuksVersion,
) -> Result<()> {
    if version == LuksVersion::Luks2 {
        if let Some(text) = strength::notice(&new_key.name, new_key.key.passphrase.as_bytes())? {
            job.notice(text);
        }
    }
    Ok(())
}

/// The keyslot the new key already opens, if any: its token says so, or it is the very key the
/// image was just unlocked with.
fn existing_keyslot(
    luks: &LuksImage,
    keys: &JobKeys,
    unlocked: &imgcrypt_proto::api::Unlocked,
) -> Option<u32> {
    let new_key = keys.encryption_key().ok()?;
    if unlocked.fingerprint == new_key.key.fingerprint {
        return Some(unlocked.keyslot);
    }
    luks.keyslot_of(&new_key.key.fingerprint)
}

/// Reads the header back from the image and opens `keyslot` with the new key, proving the
/// committed keyslot works before any other is removed.
fn confirm_new_keyslot(
    image: &File,
    new_key: &CandidateKey,
    keyslot: u32,
    volume_key: &SecretBytes,
    caps: &'static KdfCaps,
) -> Result<()> {
    let written = LuksImage::read(image)?;
    let only_new = [CandidateKey {
        name: new_key.name.clone(),
        key: new_key.key.duplicate()?,
    }];
    let (reopened, unlocked) = written.unlock(&only_new, &Unlocking::quiet(caps))?;
    if unlocked.keyslot != keyslot || reopened.as_bytes() != volume_key.as_bytes() {
        return Err(Error::Luks {
            operation: "confirming the new keyslot",
            message: format!(
                "the header read back from the image opens keyslot {} instead of {keyslot} \
                 with the new key; nothing was removed, and the old keys still open the image",
                unlocked.keyslot
            ),
        });
    }
    Ok(())
}

/// The record that makes a re-encryption resumable, kept just past the new image's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Checkpoint {
    magic: String,
    /// UUID of the image being re-encrypted.
    source_uuid: String,
    /// Fingerprint of the key the new image opens with.
    key_sha256: String,
    /// The payload's size.
    payload_size: u64,
    /// Payload bytes re-encrypted and synced.
    done: u64,
}

impl Checkpoint {
    fn write(&self, output: &File, at: u64) -> Result<()> {
        let mut record = serde_json::to_vec(self).expect("a checkpoint serialises");
        record.resize(CHECKPOINT_RECORD_BYTES as usize, 0);
        output
            .write_all_at(&record, at)
            .map_err(|e| Error::io(format!("writing the re-encryption checkpoint at {at}"), e))?;
        output
            .sync_data()
            .map_err(|e| Error::io("fdatasync after the re-encryption checkpoint", e))
    }

    fn read(output: &File, at: u64) -> Option<Self> {
        let mut record = vec![0u8; CHECKPOINT_RECORD_BYTES as usize];
        output.read_exact_at(&mut record, at).ok()?;
        let end = record.iter().position(|&b| b == 0).unwrap_or(record.len());
        let checkpoint: Self = serde_json::from_slice(&record[..end]).ok()?;
        (checkpoint.magic == CHECKPOINT_MAGIC).then_some(checkpoint)
    }
}

fn reencrypt(
    mut job: Job<RewriteParameters>,
    state: &DaemonContext,
    image: CheckedFile,
    output: CheckedFile,
) -> Result<RewriteSummary> {
    let started = Instant::now();
    let parameters = job.parameters.clone();
    if output.kind != StorageKind::RegularFile {
        return Err(Error::bad_descriptor(
            Descriptor::Output,
            "re-encryption writes a new image file beside the old one and renames it over \
             the image; a block device cannot be re-encrypted in place here: copy the image to \
             a file first",
        ));
    }
    if image.same_file_as(&output)? {
        return Err(Error::bad_descriptor(
            Descriptor::Output,
            "is the image itself: re-encryption writes a new file (IMAGE.reencrypt.partial)",
        ));
    }
    let keys = unlock::collect(
        &mut job,
        state,
        &parameters.keys,
        parameters.encryption_key.as_ref(),
        Purpose::Other,
    )?;
    let new_key = keys.encryption_key()?;
    job.reporter
        .audit()
        .encryption_key(&new_key.key.fingerprint);
    let pbkdf = chosen_pbkdf(&job, &keys)?;
    let caps = unlock::caps(&job);
    let image = unlock::lock_image(image.file, false)?;
    let output_file = unlock::lock_image(output.file, true)?;
    let output = CheckedFile {
        file: output_file
            .try_clone()
            .map_err(|e| Error::io("duplicating the output descriptor", e))?,
        kind: output.kind,
    };
    match encrypted::detect(&image)? {
        OutputFormat::Luks => {}
        OutputFormat::Qcow2 => {
            return reencrypt_qcow2(&job, state, &image, &output, &keys, &pbkdf, started);
        }
        OutputFormat::Vhd => {
            return reencrypt_vhd(job, &keys, &image, &output, started);
        }
    }
    let (luks, old_volume_key, unlocked) = unlock::open_image(&job, &image, &keys)?;
    let payload_size = luks.payload_size();
    let sector_size = luks.sector_size();
    let source_uuid = luks.uuid().to_string();
    let old_payload = LuksPayload::new(
        image
            .try_clone()
            .map_err(|e| Error::io("duplicating the image descriptor", e))?,
        luks.data_offset(),
        payload_size,
        sector_size,
        &old_volume_key,
    )?;
    drop(old_volume_key);

    let existing_size = output
        .file
        .metadata()
        .map_err(|e| Error::io("fstat on the re-encryption output", e))?
        .len();
    let mut pbkdf_benchmark = None;
    let (new_volume_key, data_offset, resumed_from) = if existing_size == 0 {
        job.reporter.progress(Phase::Format, 0, 0);
        let spec = HeaderSpec {
            version: luks.version(),
            sector_size,
            pbkdf,
        };
        caps.check_request(&spec)?;
        let (new_volume_key, header) = super::new_luks_header(&spec, &new_key.key, caps, state)?;
        pbkdf_benchmark = super::benchmark_summary(header.benchmark);
        weak_key_notice(&job, new_key, luks.version())?;
        let output_size = header.data_offset + payload_size;
        prepare_output(
            &output,
            output_size + CHECKPOINT_RECORD_BYTES,
            header.data_offset,
        )?;
        copy_header(&header.image, &output.file, header.data_offset)?;
        Checkpoint {
            magic: CHECKPOINT_MAGIC.to_string(),
            source_uuid: source_uuid.clone(),
            key_sha256: new_key.key.fingerprint.clone(),
            payload_size,
            done: 0,
        }
        .write(&output.file, output_size)?;
        (new_volume_key, header.data_offset, None)
    } else {
        let (new_volume_key, data_offset, done) = resume_point(
            &job,
            &output.file,
            existing_size,
            new_key,
            &source_uuid,
            payload_size,
            caps,
        )?;
        (new_volume_key, data_offset, Some(done))
    };
    drop(luks);

    let output_size = data_offset + payload_size;
    let mut done = resumed_from.unwrap_or(0);
    let engine = UserspaceEngine::new();
    job.reporter.audit().engine(EngineKind::Userspace);
    job.reporter.progress(Phase::Copy, done, payload_size);
    while done < payload_size {
        job.check_cancel()?;
        let end = (done + CHECKPOINT_INTERVAL).min(payload_size);
        let base = done;
        let progress = |written: u64| {
            job.reporter
                .progress(Phase::Copy, base + written, payload_size)
        };
        engine.copy_range(
            &PayloadJob {
                job_id: job.id,
                source: &old_payload,
                output: &output.file,
                extents: &[payload_extent(data_offset, payload_size)],
                sector_size,
                key: new_volume_key.as_bytes(),
                iv: IvMode::Plain64,
                progress: &progress,
                cancel: &job.cancel,
            },
            true,
            done..end,
        )?;
        output
            .file
            .sync_data()
            .map_err(|e| Error::io("fdatasync on the re-encrypted image", e))?;
        Checkpoint {
            magic: CHECKPOINT_MAGIC.to_string(),
            source_uuid: source_uuid.clone(),
            key_sha256: new_key.key.fingerprint.clone(),
            payload_size,
            done: end,
        }
        .write(&output.file, output_size)?;
        done = end;
        crash::point("reencrypt:checkpoint");
    }
    drop(new_volume_key);

    job.reporter
        .progress(Phase::Sync, payload_size, payload_size);
    output
        .file
        .set_len(output_size)
        .map_err(|e| Error::io("cutting the checkpoint record off the new image", e))?;
    output
        .file
        .sync_all()
        .map_err(|e| Error::io("fsync on the re-encrypted image", e))?;
    tracing::info!(job = job.id, payload_size, ?resumed_from, "re-encrypted");
    Ok(RewriteSummary {
        unlocked,
        fingerprint: new_key.key.fingerprint.clone(),
        keyslot: 0,
        keyslot_added: true,
        removed: Vec::new(),
        reencrypted: true,
        resumed_from,
        pbkdf_benchmark,
        elapsed_ms: millis(started.elapsed()),
    })
}

/// Why a vhd-util VHD cannot be rotated header-only.
fn vhd_needs_reencryption() -> Error {
    Error::UnsupportedImage {
        message: "a vhd-util-encrypted VHD cannot be re-keyed in place: it has no key slots, \
                  its sectors are encrypted directly with the key file's decoded bytes (the key \
                  IS the data key), so a new key means re-encrypting every sector: run `imgctl \
                  rewrite -k IMAGE --reencrypt`"
            .to_string(),
    }
}

/// `--reencrypt` of a vhd-util VHD: the whole image is written anew into the partial file with
/// the new key's decoded bytes ([`VhdOutput`]), from the old image's decrypted guest view,
/// through the shared pipeline (the allocated copy: blocks holding a non-zero byte, placed as
/// they are read). No checkpoints: a VHD's blocks are placed as the copy goes, and an
/// interrupted run starts over (the partial file is emptied first); the old image is only
/// read, so it stays valid until the client's rename.
fn reencrypt_vhd(
    job: Job<RewriteParameters>,
    keys: &JobKeys,
    image: &File,
    output: &CheckedFile,
    started: Instant,
) -> Result<RewriteSummary> {
    // The ring's keys would be the data keys themselves (see `encrypt::vhd_ring_key_refusal`):
    // a crafted VHD carrying a ring key's hash would have the daemon decrypt chosen sectors
    // under one ring key and encrypt them under another.
    if keys.from_daemon_ring && !crate::keys::ring::may_decrypt_with(job.caller_uid) {
        return Err(super::encrypt::vhd_ring_key_refusal(
            job.caller_uid,
            "re-encrypt a VHD",
        ));
    }
    let new_key = keys.encryption_key()?;
    let new_raw = crate::keys::raw_vhd_key(&new_key.key)?;
    let opened = unlock::open_plaintext(&job, image, keys)?;
    let plaintext = opened.plaintext;
    let container = VhdOutput::new(plaintext.virtual_size(), new_raw.as_bytes())?;
    if let Some(text) = crate::outputs::vhd::tweak_reuse_notice(container.virtual_size()) {
        job.notice(text);
    }
    write_container(
        &job,
        plaintext.as_ref(),
        output,
        &UserspaceEngine::new(),
        &container,
        512,
        new_raw.as_bytes(),
        IvMode::Plain,
        &mut || Ok(()),
    )?;
    drop(new_raw);
    tracing::info!(
        job = job.id,
        key_hash = %container.key_hash().hash_hex(),
        "re-encrypted a vhd-util VHD"
    );
    Ok(container_reencrypted(
        opened.unlocked,
        &new_key.key.fingerprint,
        None,
        started,
    ))
}

/// Checks that `output` is an interrupted re-encryption of this image to this key and returns
/// its volume key, data offset and how far it got.
fn resume_point(
    job: &Job<RewriteParameters>,
    output: &File,
    existing_size: u64,
    new_key: &CandidateKey,
    source_uuid: &str,
    payload_size: u64,
    caps: &'static KdfCaps,
) -> Result<(SecretBytes, u64, u64)> {
    let not_ours = |why: String| {
        Error::bad_descriptor(
            Descriptor::Output,
            format!(
                "the existing IMAGE.reencrypt.partial cannot be resumed: {why}; delete it to start \
                 the re-encryption over"
            ),
        )
    };
    let partial = LuksImage::read(output).map_err(|e| not_ours(format!("its header: {e}")))?;
    let data_offset = partial.data_offset();
    let output_size = data_offset + payload_size;
    if existing_size == output_size {
        return Err(not_ours(
            "it is complete but carries no checkpoint (the previous run finished; if it reported \
             success, the rename over the image was interrupted: rename it yourself)"
                .to_string(),
        ));
    }
    let checkpoint = Checkpoint::read(output, output_size)
        .ok_or_else(|| not_ours("it carries no readable checkpoint".to_string()))?;
    if checkpoint.source_uuid != source_uuid || checkpoint.payload_size != payload_size {
        return Err(not_ours(format!(
            "it is a re-encryption of another image (UUID {})",
            checkpoint.source_uuid
        )));
    }
    if checkpoint.key_sha256 != new_key.key.fingerprint {
        return Err(not_ours(format!(
            "it was started with another encryption key (sha256:{}), not {} (sha256:{})",
            checkpoint.key_sha256, new_key.name, new_key.key.fingerprint
        )));
    }
    if checkpoint.done > payload_size {
        return Err(not_ours(
            "its checkpoint is past the payload's end".to_string(),
        ));
    }
    job.reporter.progress(Phase::Unlock, 0, 0);
    let only_new = [CandidateKey {
        name: new_key.name.clone(),
        key: new_key.key.duplicate()?,
    }];
    // The partial file is the client's: its keyslot gets the same caps as any image's.
    let (volume_key, _) = partial.unlock(
        &only_new,
        &Unlocking {
            caps,
            notice: &|_| {},
            cancelled: &|| job.check_cancel().is_err(),
        },
    )?;
    job.notice(format!(
        "resuming the re-encryption at {} of {payload_size} bytes",
        checkpoint.done
    ));
    Ok((volume_key, data_offset, checkpoint.done))
}
