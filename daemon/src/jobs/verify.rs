//! `io.imgcrypt.Verify`: decrypt and hash a LUKS image's payload, and compare it with a source.
//!
//! One sequential pass: SHA-256 is sequential by nature, and one thread decrypts (AES-NI) and
//! hashes faster than the disks here read. With a source, its guest bytes (any format the
//! encrypt path reads) followed by zeros are compared with the plaintext as it streams past;
//! the first differing offset is reported.

use std::time::Instant;

use imgcrypt_proto::api::{Phase, SourceComparison, VerifyParameters, VerifySummary};
use sha2::{Digest, Sha256};

use crate::error::Descriptor;
use crate::formats::{self, SourceImage};
use crate::luks::LuksPayload;
use crate::server::ServerState;
use crate::sys::aligned::AlignedBuffer;
use crate::sys::descriptors;
use crate::{Error, Result};

use super::unlock::{self, Purpose};
use super::{millis, Job};

/// Bytes decrypted and hashed per step.
const CHUNK: usize = 4 << 20;

/// Runs the job.
pub fn run(mut job: Job<VerifyParameters>, state: &ServerState) -> Result<VerifySummary> {
    let started = Instant::now();
    let parameters = job.parameters.clone();
    let image = descriptors::check_readable_image(
        job.descriptors.take(Descriptor::Image, parameters.image)?,
        Descriptor::Image,
    )?;
    let source = match parameters.source {
        Some(index) => {
            let source =
                descriptors::check_source(job.descriptors.take(Descriptor::Source, index)?)?;
            Some(formats::open(source.file)?)
        }
        None => None,
    };
    let keys = unlock::collect(&mut job, state, &parameters.keys, None, Purpose::Verify)?;
    let image = unlock::lock_image(image.file, false)?;
    let (luks, volume_key, unlocked) = unlock::open_image(&job, &image, &keys)?;
    let payload_size = luks.payload_size();
    let payload = LuksPayload::new(
        image
            .try_clone()
            .map_err(|e| Error::io("duplicating the image descriptor", e))?,
        luks.data_offset(),
        payload_size,
        luks.sector_size(),
        &volume_key,
    )?;
    drop(volume_key);
    drop(luks);

    let mut comparison = source
        .as_deref()
        .map(|source| Comparison::new(source, payload_size));
    let mut hasher = Sha256::new();
    let mut plaintext = AlignedBuffer::new(CHUNK)?;
    let mut expected = comparison
        .as_ref()
        .map(|_| AlignedBuffer::new(CHUNK))
        .transpose()?;
    let mut offset = 0u64;
    job.reporter.progress(Phase::Hash, 0, payload_size);
    while offset < payload_size {
        job.check_cancel()?;
        let len = (payload_size - offset).min(CHUNK as u64) as usize;
        let chunk = &mut plaintext[..len];
        payload.read_at(chunk, offset)?;
        hasher.update(&*chunk);
        if let (Some(comparison), Some(expected)) = (comparison.as_mut(), expected.as_mut()) {
            comparison.compare(chunk, &mut expected[..len], offset)?;
        }
        offset += len as u64;
        job.reporter.progress(Phase::Hash, offset, payload_size);
    }
    let plaintext_sha256 = hex(&hasher.finalize());
    let source = comparison.map(Comparison::finish);
    tracing::info!(
        job = job.id,
        payload_size,
        %plaintext_sha256,
        matches = ?source.as_ref().map(|s| s.matches),
        "verified"
    );
    Ok(VerifySummary {
        unlocked,
        payload_size,
        plaintext_sha256,
        source,
        elapsed_ms: millis(started.elapsed()),
    })
}

/// A source image compared chunk by chunk with the plaintext.
struct Comparison<'s> {
    source: &'s dyn SourceImage,
    payload_size: u64,
    first_difference: Option<u64>,
}

impl<'s> Comparison<'s> {
    fn new(source: &'s dyn SourceImage, payload_size: u64) -> Self {
        // A source larger than the payload cannot have been encrypted into it whole.
        let first_difference = (source.virtual_size() > payload_size).then_some(payload_size);
        Self {
            source,
            payload_size,
            first_difference,
        }
    }

    /// Compares `plaintext` (at payload `offset`) with the source's bytes there, using
    /// `expected` as scratch; stops reading the source once a difference is known.
    fn compare(&mut self, plaintext: &[u8], expected: &mut [u8], offset: u64) -> Result<()> {
        if self.first_difference.is_some() {
            return Ok(());
        }
        let readable = self
            .source
            .virtual_size()
            .saturating_sub(offset)
            .min(plaintext.len() as u64) as usize;
        expected[readable..].fill(0);
        if readable > 0 {
            self.source.read_at(&mut expected[..readable], offset)?;
        }
        if let Some(at) = plaintext
            .iter()
            .zip(expected.iter())
            .position(|(a, b)| a != b)
        {
            self.first_difference = Some(offset + at as u64);
        }
        Ok(())
    }

    fn finish(self) -> SourceComparison {
        debug_assert!(self
            .first_difference
            .is_none_or(|at| at <= self.payload_size));
        SourceComparison {
            source_format: self.source.format(),
            virtual_size: self.source.virtual_size(),
            matches: self.first_difference.is_none(),
            first_difference: self.first_difference,
        }
    }
}

/// Lower-case hex, as `sha256sum` prints it.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
