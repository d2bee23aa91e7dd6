//! `io.imgcrypt.Verify`: decrypt and hash a LUKS image's payload, and compare it with a source.
//!
//! One sequential pass: SHA-256 is sequential by nature, and one thread decrypts (AES-NI) and
//! hashes faster than the disks here read. With a source, its guest bytes (any format the
//! encrypt path reads) followed by zeros are compared with the plaintext as it streams past;
//! the first differing offset is reported (the payload's size when the payload matches a source
//! that is longer than it).

use std::time::Instant;

use imgcrypt_proto::api::{Phase, SourceComparison, VerifyParameters, VerifySummary};
use sha2::{Digest, Sha256};

use crate::context::DaemonContext;
use crate::error::Descriptor;
use crate::formats::{self, SourceImage};
use crate::sys::aligned::AlignedBuffer;
use crate::sys::descriptors;
use crate::Result;

use super::unlock::{self, Purpose};
use super::{millis, Job};

/// Bytes decrypted and hashed per step.
const CHUNK: usize = 4 << 20;

/// Runs the job.
pub fn run(mut job: Job<VerifyParameters>, state: &DaemonContext) -> Result<VerifySummary> {
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
            let files =
                super::source_files(&mut job.descriptors, source, &parameters.source_companions)?;
            Some(formats::open_files(&files)?)
        }
        None => None,
    };
    let keys = unlock::collect(&mut job, state, &parameters.keys, None, Purpose::Verify)?;
    let image = unlock::lock_image(image.file, false)?;
    let opened = unlock::open_plaintext(&job, &image, &keys)?;
    let unlocked = opened.unlocked;
    let payload = opened.plaintext;
    let payload_size = payload.virtual_size();

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
    for note in payload.read_notes() {
        job.notice(note);
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
///
/// The plaintext is compared with the source's bytes followed by zeros. A source larger than the
/// payload is compared over the payload's length like any other, so a difference inside it is
/// reported where it is; if there is none, the first difference is the payload's end, where the
/// source has bytes the image cannot hold (a client tells the two apart with `virtual_size`).
struct Comparison<'s> {
    source: &'s dyn SourceImage,
    payload_size: u64,
    first_difference: Option<u64>,
}

impl<'s> Comparison<'s> {
    fn new(source: &'s dyn SourceImage, payload_size: u64) -> Self {
        Self {
            source,
            payload_size,
            first_difference: None,
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
        let virtual_size = self.source.virtual_size();
        // The whole payload matched, but the source goes on past it.
        let first_difference = self
            .first_difference
            .or((virtual_size > self.payload_size).then_some(self.payload_size));
        debug_assert!(first_difference.is_none_or(|at| at <= self.payload_size));
        SourceComparison {
            source_format: self.source.format(),
            virtual_size,
            matches: first_difference.is_none(),
            first_difference,
        }
    }
}

/// Lower-case hex, as `sha256sum` prints it.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use imgcrypt_proto::api::SourceFormat;

    use super::*;

    /// A source held in memory.
    #[derive(Debug)]
    struct Bytes(Vec<u8>, Vec<Range<u64>>);

    impl Bytes {
        fn new(bytes: Vec<u8>) -> Self {
            let whole = 0..bytes.len() as u64;
            Self(bytes, vec![whole])
        }
    }

    impl SourceImage for Bytes {
        fn format(&self) -> SourceFormat {
            SourceFormat::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
            let start = offset as usize;
            buffer.copy_from_slice(&self.0[start..start + buffer.len()]);
            Ok(())
        }
        fn allocated_ranges(&self) -> &[Range<u64>] {
            &self.1
        }
    }

    /// Compares `plaintext` with `source` in steps of `step` bytes, as `run` does.
    fn compare(plaintext: &[u8], source: &Bytes, step: usize) -> SourceComparison {
        let mut comparison = Comparison::new(source, plaintext.len() as u64);
        let mut expected = vec![0u8; step];
        for (index, chunk) in plaintext.chunks(step).enumerate() {
            comparison
                .compare(chunk, &mut expected[..chunk.len()], (index * step) as u64)
                .unwrap();
        }
        comparison.finish()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 + 1).collect()
    }

    #[test]
    fn a_longer_source_is_reported_where_its_bytes_differ() {
        // The review's case: the source is larger than the payload and differs early; the old
        // code said "differs from the payload size on" without comparing anything.
        let plaintext = pattern(8192);
        let mut source = pattern(12288);
        source[1000] ^= 0xff;
        let result = compare(&plaintext, &Bytes::new(source), 4096);
        assert!(!result.matches);
        assert_eq!(result.first_difference, Some(1000));
        assert_eq!(result.virtual_size, 12288);
    }

    #[test]
    fn a_longer_source_that_matches_the_payload_differs_at_the_payload_end() {
        let plaintext = pattern(8192);
        let result = compare(&plaintext, &Bytes::new(pattern(8192 + 1)), 4096);
        assert!(!result.matches);
        assert_eq!(result.first_difference, Some(8192));
    }

    #[test]
    fn a_shorter_source_is_compared_then_zeros() {
        let mut plaintext = pattern(5000);
        plaintext.resize(8192, 0);
        let result = compare(&plaintext, &Bytes::new(pattern(5000)), 4096);
        assert!(result.matches, "{result:?}");
        assert_eq!(result.first_difference, None);

        plaintext[7000] = 1;
        let result = compare(&plaintext, &Bytes::new(pattern(5000)), 4096);
        assert_eq!(result.first_difference, Some(7000));

        let result = compare(&pattern(8192), &Bytes::new(pattern(8192)), 4096);
        assert!(result.matches);
    }
}
