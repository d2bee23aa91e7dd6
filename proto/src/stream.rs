//! The streamed output of an `Encrypt` call ([`crate::api::StreamOutput`]): instead of writing
//! an output file at offsets, the daemon writes the whole encrypted image, strictly in order,
//! into a pipe the client passed as the output descriptor. `imgctl encrypt --upload` reads it
//! and uploads it as an S3 multipart upload, so the client's credentials never reach the
//! daemon and no local copy of the image is needed.
//!
//! The stream is a fixed [`PREAMBLE_LEN`]-byte preamble ([`Preamble`]), then the image's bytes
//! `start..image_size` in order, then end of file. The preamble comes before any image byte so
//! the client knows, before it uploads anything, how large the image is, where the stream
//! starts (a resumed stream starts where the stored parts end) and whether the daemon had to
//! start from scratch (the key no longer opens the saved header).
//!
//! A stream that ends early, or a job whose final reply is an error, is not an image: the
//! client completes the upload only when it has read exactly `image_size - start` bytes *and*
//! the daemon's final reply is a success. The image's header (the first `header_len` bytes: a
//! raw LUKS header, or a qcow2's header cluster and the LUKS header after it) comes first in
//! the stream, but an S3 object exists only once its multipart upload completes, so
//! no reader ever sees a header over an incomplete payload.

/// First 16 bytes of every stream (the last byte is the preamble's version).
pub const MAGIC: [u8; 16] = *b"IMGCRYPT-STREAM1";

/// Bytes of the preamble: magic, four little-endian u64 fields, 16 reserved zero bytes.
pub const PREAMBLE_LEN: usize = 64;

/// Flag bit: the daemon could not resume from the header the client saved (the key no longer
/// opens it, or it is not the header of these parameters) and started a new image from byte 0
/// with a new header and volume key. The client must discard every part stored so far.
const FLAG_RESTARTED: u64 = 1;

/// What precedes the image bytes of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Size of the whole encrypted image (header plus payload).
    pub image_size: u64,
    /// Offset in the image of the first byte that follows the preamble.
    pub start: u64,
    /// Bytes of header at the image's start: a raw LUKS image's header (its payload's data
    /// offset), or a qcow2's header cluster and LUKS header (64 KiB + 2 MiB). The client
    /// saves them to resume an interrupted upload ([`crate::api::StreamOutput::resume_header`]).
    pub header_len: u64,
    /// The daemon started from scratch although a resume was asked for.
    pub restarted: bool,
}

/// Why bytes are not a valid preamble.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The magic does not match: not an imgcrypt stream, or another version of it.
    #[error(
        "the daemon's stream does not start with the imgcrypt stream magic: it is not an \
             imgcrypt stream, or a version this imgctl does not read (update imgctl to the \
             daemon's version)"
    )]
    BadMagic,
    /// Fields that contradict each other.
    #[error("the daemon's stream preamble is inconsistent: {0}")]
    Inconsistent(String),
}

impl Preamble {
    /// The preamble as written to the pipe.
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut bytes = [0u8; PREAMBLE_LEN];
        bytes[..16].copy_from_slice(&MAGIC);
        bytes[16..24].copy_from_slice(&self.image_size.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.start.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.header_len.to_le_bytes());
        let flags = if self.restarted { FLAG_RESTARTED } else { 0 };
        bytes[40..48].copy_from_slice(&flags.to_le_bytes());
        bytes
    }

    /// Parses and checks a preamble read from the pipe.
    pub fn decode(bytes: &[u8; PREAMBLE_LEN]) -> Result<Self, StreamError> {
        if bytes[..16] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        let field = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let preamble = Self {
            image_size: field(16),
            start: field(24),
            header_len: field(32),
            restarted: field(40) & FLAG_RESTARTED != 0,
        };
        if field(40) & !FLAG_RESTARTED != 0 || bytes[48..].iter().any(|&b| b != 0) {
            return Err(StreamError::Inconsistent(
                "unknown flags or reserved bytes are set".to_string(),
            ));
        }
        if preamble.header_len == 0 || preamble.header_len >= preamble.image_size {
            return Err(StreamError::Inconsistent(format!(
                "a {}-byte header in a {}-byte image",
                preamble.header_len, preamble.image_size
            )));
        }
        if preamble.start >= preamble.image_size || (preamble.restarted && preamble.start != 0) {
            return Err(StreamError::Inconsistent(format!(
                "the stream starts at byte {} of a {}-byte image{}",
                preamble.start,
                preamble.image_size,
                if preamble.restarted {
                    " although it restarted"
                } else {
                    ""
                }
            )));
        }
        Ok(preamble)
    }

    /// Image bytes that follow the preamble.
    pub fn stream_len(&self) -> u64 {
        self.image_size - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preamble_round_trips_and_rejects_nonsense() {
        let preamble = Preamble {
            image_size: 1 << 30,
            start: 16 << 20,
            header_len: 16 << 20,
            restarted: false,
        };
        let bytes = preamble.encode();
        assert_eq!(Preamble::decode(&bytes), Ok(preamble));
        assert_eq!(preamble.stream_len(), (1 << 30) - (16 << 20));

        let mut wrong = bytes;
        wrong[0] ^= 1;
        assert_eq!(Preamble::decode(&wrong), Err(StreamError::BadMagic));
        let mut reserved = bytes;
        reserved[63] = 1;
        assert!(Preamble::decode(&reserved).is_err());
        let restarted_late = Preamble {
            restarted: true,
            ..preamble
        };
        assert!(Preamble::decode(&restarted_late.encode()).is_err());
        let past_end = Preamble {
            start: 1 << 30,
            ..preamble
        };
        assert!(Preamble::decode(&past_end.encode()).is_err());
        let no_header = Preamble {
            header_len: 0,
            ..preamble
        };
        assert!(Preamble::decode(&no_header.encode()).is_err());
    }
}
