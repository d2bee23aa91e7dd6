//! The keys a job may unlock an image with: the ones the client passed, else the daemon's own
//! key ring; plus the shared steps every unlocking job takes (lock the image, read its header,
//! open it).
//!
//! Key descriptors are read once each even when a call names one descriptor in two roles (the
//! new `encryption_key` of a rotation is also an unlock candidate, so a rerun after an
//! interruption opens the image with it at no extra cost).

use std::collections::HashMap;
use std::fs::File;

use imgcrypt_proto::api::{KeyRef, OutputFormat, Phase, Unlocked};
use nix::fcntl::{Flock, FlockArg};

use crate::context::DaemonContext;
use crate::error::Descriptor;
use crate::formats::qcow2::Qcow2Image;
use crate::formats::vhd::encrypted::EncryptedVhd;
use crate::formats::{encrypted, SourceImage};
use crate::keys::{self, CandidateKey, SecretBytes};
use crate::luks::cost::KdfCaps;
use crate::luks::unlock::Unlocking;
use crate::luks::{LuksImage, LuksPayload};
use crate::sys::descriptors;
use crate::{Error, Result};

use super::Job;

/// What the keys will be used for. Anything a caller learns that depends on the plaintext —
/// the plaintext itself, its hash, or where it differs from a guess — is as good as decrypting
/// (a guessed source compared a byte at a time recovers the plaintext), so the daemon's own ring
/// serves those purposes only to the callers allowed to decrypt with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Reading the header only, or rotating: the caller never sees anything derived from the
    /// plaintext.
    Other,
    /// Hashing the plaintext and comparing it with a source: the answer depends on the
    /// plaintext.
    Verify,
    /// Writing the plaintext to the caller.
    Decrypt,
}

impl Purpose {
    /// Whether the caller's answer depends on the plaintext.
    pub fn reveals_plaintext(self) -> bool {
        matches!(self, Self::Verify | Self::Decrypt)
    }

    /// What the daemon's ring refuses to do for most callers, for messages.
    fn refused_action(self) -> &'static str {
        match self {
            Self::Decrypt => "decrypt",
            _ => "hash or compare plaintext",
        }
    }
}

/// The keys of one job.
#[derive(Debug)]
pub struct JobKeys {
    /// Candidates in ring order (the client's order, or the daemon ring's).
    pub candidates: Vec<CandidateKey>,
    /// Index in `candidates` of the key a rotation moves to, when the call has one.
    pub encryption: Option<usize>,
    /// Whether these came from the daemon's ring rather than the client.
    pub from_daemon_ring: bool,
}

impl JobKeys {
    /// The key a rotation moves to, or the error saying how to name one.
    pub fn encryption_key(&self) -> Result<&CandidateKey> {
        self.encryption
            .map(|index| &self.candidates[index])
            .ok_or_else(|| {
                Error::NoKey(
                    "no key to rotate to: set encryption_key in your key ring (imgctl key \
                     generate -o FILE makes one)"
                        .to_string(),
                )
            })
    }
}

/// Reads the keys `refs` (and `encryption`) names from the call's descriptors; with none, the
/// daemon ring's keys when it has a ring and `purpose` allows it.
pub fn collect<P>(
    job: &mut Job<P>,
    state: &DaemonContext,
    refs: &[KeyRef],
    encryption: Option<&KeyRef>,
    purpose: Purpose,
) -> Result<JobKeys> {
    if refs.is_empty() && encryption.is_none() {
        return from_daemon_ring(job, state, purpose);
    }
    let mut candidates = Vec::new();
    let mut by_descriptor: HashMap<u32, usize> = HashMap::new();
    for key_ref in refs.iter().chain(encryption) {
        if by_descriptor.contains_key(&key_ref.fd) {
            continue;
        }
        let file = descriptors::check_key(job.descriptors.take(Descriptor::Key, key_ref.fd)?)?;
        let key = keys::read_key_file(&file).map_err(|error| name_key(error, &key_ref.name))?;
        for warning in &key.warnings {
            job.notice(format!("{}: {warning}", key_ref.name));
        }
        by_descriptor.insert(key_ref.fd, candidates.len());
        candidates.push(CandidateKey {
            name: key_ref.name.clone(),
            key,
        });
    }
    Ok(JobKeys {
        encryption: encryption.map(|key_ref| by_descriptor[&key_ref.fd]),
        candidates,
        from_daemon_ring: false,
    })
}

/// Says which key a key-file error is about.
pub(super) fn name_key(error: Error, name: &str) -> Error {
    match error {
        Error::BadDescriptor {
            descriptor,
            message,
        } => Error::BadDescriptor {
            descriptor,
            message: format!("{name}: {message}"),
        },
        Error::Io { operation, source } => Error::Io {
            operation: format!("{name}: {operation}"),
            source,
        },
        other => other,
    }
}

fn from_daemon_ring<P>(job: &Job<P>, state: &DaemonContext, purpose: Purpose) -> Result<JobKeys> {
    let Some(ring) = state.config.key_ring.as_ref() else {
        return Err(Error::NoKey(
            "no key was passed and this daemon has no key ring: pass --key-file FILE, or list \
             your keys in your key ring (~/.config/imgcrypt/keys.toml)"
                .to_string(),
        ));
    };
    if purpose.reveals_plaintext() && !crate::keys::ring::may_decrypt_with(job.caller_uid) {
        return Err(Error::PermissionDenied(format!(
            "the daemon's key ring does not {action} for uid {uid}: only root may get plaintext, \
             or answers that depend on it, with the daemon's keys; pass your own key with \
             --key-file",
            action = purpose.refused_action(),
            uid = job.caller_uid
        )));
    }
    let candidates = ring.candidates()?;
    if candidates.is_empty() {
        return Err(Error::NoKey(format!(
            "no key was passed and the daemon's key ring ({}) lists none",
            ring.describe()
        )));
    }
    let encryption = candidates
        .iter()
        .position(|candidate| candidate.name == "daemon:encryption_key");
    tracing::info!(job = job.id, ring = %ring.describe(), keys = candidates.len(), "using the daemon's key ring");
    Ok(JobKeys {
        candidates,
        encryption,
        from_daemon_ring: true,
    })
}

/// Takes a shared (`exclusive == false`) or exclusive `flock` on the image for the job's
/// lifetime, so two jobs never rewrite one image at once and nothing reads a header while it is
/// rewritten. Another holder is an immediate error, never a wait.
pub fn lock_image(file: File, exclusive: bool) -> Result<Flock<File>> {
    let how = if exclusive {
        FlockArg::LockExclusiveNonblock
    } else {
        FlockArg::LockSharedNonblock
    };
    Flock::lock(file, how).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            Error::io(
                "locking the image: another imgcrypt job (or a program holding a flock on it) \
                 is using it; try again when it has finished",
                errno,
            )
        } else {
            Error::io("locking the image (flock)", errno)
        }
    })
}

/// Reads the image's header and opens it with the first key that fits, for a job that decrypts
/// the payload (decrypt, verify, re-encrypt): images whose payload imgcrypt cannot read are
/// refused before any key derivation.
pub fn open_image<P>(
    job: &Job<P>,
    image: &File,
    keys: &JobKeys,
) -> Result<(LuksImage, SecretBytes, Unlocked)> {
    let luks = LuksImage::read(image)?;
    luks.check_payload_supported()?;
    unlock_image(job, luks, keys)
}

/// An encrypted image opened with a key: its plaintext, readable like any source.
pub struct OpenedImage {
    /// The container.
    pub format: OutputFormat,
    /// The decrypted guest view (holes of sparse containers read as zeros).
    pub plaintext: Box<dyn SourceImage>,
    /// Which key opened it, and how.
    pub unlocked: Unlocked,
    /// The encryption sector size: reads of `plaintext` are whole sectors.
    pub sector_size: u32,
}

/// Detects the container of `image` and opens it with the first key that fits, for a job that
/// reads the plaintext (decrypt, verify).
pub fn open_plaintext<P>(job: &Job<P>, image: &File, keys: &JobKeys) -> Result<OpenedImage> {
    match encrypted::detect(image)? {
        OutputFormat::Luks => {
            let (luks, volume_key, unlocked) = open_image(job, image, keys)?;
            let payload = LuksPayload::new(
                image
                    .try_clone()
                    .map_err(|e| Error::io("duplicating the image descriptor", e))?,
                luks.data_offset(),
                luks.payload_size(),
                luks.sector_size(),
                &volume_key,
            )?;
            Ok(OpenedImage {
                format: OutputFormat::Luks,
                plaintext: Box::new(payload),
                unlocked,
                sector_size: luks.sector_size(),
            })
        }
        OutputFormat::Qcow2 => {
            let (qcow2, header) = qcow2_luks_header(image)?;
            let (luks, volume_key, unlocked) = open_image(job, &header, keys)?;
            let sector_size = luks.sector_size();
            drop(luks);
            Ok(OpenedImage {
                format: OutputFormat::Qcow2,
                plaintext: Box::new(qcow2.into_source(Some(&volume_key))?),
                unlocked,
                sector_size,
            })
        }
        OutputFormat::Vhd => {
            let file = image
                .try_clone()
                .map_err(|e| Error::io("duplicating the image descriptor", e))?;
            let vhd = EncryptedVhd::open(file)?;
            job.check_cancel()?;
            job.reporter.progress(Phase::Unlock, 0, 0);
            let (plaintext, unlocked) = vhd.unlock_with(&keys.candidates)?;
            tracing::info!(
                job = job.id,
                key = %unlocked.key_name,
                fingerprint = %unlocked.fingerprint,
                cipher = plaintext.cipher_name(),
                "unlocked a vhd-util VHD (key hash matched)"
            );
            job.reporter.audit().unlock_key(&unlocked.fingerprint);
            Ok(OpenedImage {
                format: OutputFormat::Vhd,
                plaintext: Box::new(plaintext),
                unlocked,
                sector_size: 512,
            })
        }
    }
}

/// An encrypted qcow2 image's cluster map and a daemon-owned memfd copy of its LUKS header,
/// which [`LuksImage::read`] opens as it opens a raw LUKS image. The copy is exactly the crypto
/// header extension's region; qemu reads nothing of the header outside it.
pub fn qcow2_luks_header(image: &File) -> Result<(Qcow2Image, File)> {
    let qcow2 = Qcow2Image::open(
        image
            .try_clone()
            .map_err(|e| Error::io("duplicating the image descriptor", e))?,
    )?;
    if qcow2.luks_region().is_none() {
        return Err(Error::UnsupportedImage {
            message: "the qcow2 image is not encrypted: there is nothing to decrypt or re-key \
                      (read it with qemu-img as it is)"
                .to_string(),
        });
    }
    let header = qcow2.luks_header_copy()?;
    Ok((qcow2, header))
}

/// [`open_image`] for a job that changes only keyslots (header-only rotation): any cipher
/// libcryptsetup reads will do, since no payload is decrypted.
pub fn open_header<P>(
    job: &Job<P>,
    image: &File,
    keys: &JobKeys,
) -> Result<(LuksImage, SecretBytes, Unlocked)> {
    unlock_image(job, LuksImage::read(image)?, keys)
}

/// The caller's derivation caps ([`KdfCaps::for_caller`]) for a job.
pub fn caps<P>(job: &Job<P>) -> &'static KdfCaps {
    KdfCaps::for_caller(job.caller_uid)
}

/// Opens `luks` under the caller's caps, reporting the unlock phase, passing trial notices on,
/// and stopping between derivations once the job is cancelled (the client hung up).
fn unlock_image<P>(
    job: &Job<P>,
    luks: LuksImage,
    keys: &JobKeys,
) -> Result<(LuksImage, SecretBytes, Unlocked)> {
    job.check_cancel()?;
    job.reporter.progress(Phase::Unlock, 0, 0);
    let how = Unlocking {
        caps: caps(job),
        notice: &|text| job.notice(text),
        cancelled: &|| job.check_cancel().is_err(),
    };
    let (volume_key, unlocked) = luks.unlock(&keys.candidates, &how)?;
    tracing::info!(
        job = job.id,
        key = %unlocked.key_name,
        fingerprint = %unlocked.fingerprint,
        keyslot = unlocked.keyslot,
        method = ?unlocked.method,
        attempts = unlocked.attempts,
        "unlocked"
    );
    job.reporter.audit().unlock_key(&unlocked.fingerprint);
    Ok((luks, volume_key, unlocked))
}
