//! Varlink framing: every message is one JSON object followed by a NUL byte.
//!
//! A peer that never sends a NUL must not make us buffer without bound, so the decoder refuses a
//! frame longer than its cap. After such an error the stream cannot be resynchronised reliably
//! (we do not know where the oversized frame ends), so the caller answers once and closes.

use serde::Serialize;

/// Largest frame either side accepts. Our calls carry a handful of small parameters; 64 KiB is
/// far above any legitimate message and small enough that a hostile client cannot pin memory.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// More than `limit` bytes arrived and none of them was the terminating NUL.
    #[error("more than {limit} bytes arrived without a terminating NUL (the frame limit)")]
    Unterminated {
        /// The cap in force.
        limit: usize,
    },
    /// A NUL-terminated frame longer than `limit` bytes.
    #[error("message of {length} bytes exceeds the {limit}-byte frame limit")]
    TooLarge {
        /// Length of the frame, NUL excluded.
        length: usize,
        /// The cap in force.
        limit: usize,
    },
}

/// Splits a byte stream into NUL-terminated frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Bytes of `buffer` already known to contain no NUL, so each byte is scanned once.
    scanned: usize,
    limit: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `limit` bytes (the NUL excluded).
    pub fn new(limit: usize) -> Self {
        Self {
            buffer: Vec::new(),
            scanned: 0,
            limit,
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Whether bytes of an incomplete frame are buffered.
    pub fn has_partial_frame(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// The next complete frame without its NUL, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        match self.buffer[self.scanned..].iter().position(|&b| b == 0) {
            Some(relative) => {
                let end = self.scanned + relative;
                if end > self.limit {
                    return Err(FrameError::TooLarge {
                        length: end,
                        limit: self.limit,
                    });
                }
                let mut frame: Vec<u8> = self.buffer.drain(..=end).collect();
                frame.pop();
                self.scanned = 0;
                Ok(Some(frame))
            }
            None => {
                self.scanned = self.buffer.len();
                if self.buffer.len() > self.limit {
                    Err(FrameError::Unterminated { limit: self.limit })
                } else {
                    Ok(None)
                }
            }
        }
    }
}

/// Serialises `message` as one frame (JSON plus NUL).
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising our own plain data types cannot fail: no maps with non-string keys, no
    // fallible Serialize impls.
    let mut bytes = serde_json::to_vec(message).expect("protocol types always serialise");
    bytes.push(0);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_across_reads() {
        let mut decoder = FrameDecoder::new(100);
        decoder.extend(b"{\"a\":1}\0{\"b\"");
        assert_eq!(decoder.next_frame().unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(decoder.next_frame().unwrap(), None);
        assert!(decoder.has_partial_frame());
        decoder.extend(b":2}\0");
        assert_eq!(decoder.next_frame().unwrap().unwrap(), b"{\"b\":2}");
        assert!(!decoder.has_partial_frame());
    }

    #[test]
    fn refuses_oversized_frame_without_nul() {
        let mut decoder = FrameDecoder::new(8);
        decoder.extend(b"123456789");
        let error = decoder.next_frame().unwrap_err();
        assert_eq!(error, FrameError::Unterminated { limit: 8 });
        assert!(error.to_string().contains("without a terminating NUL"));
    }

    #[test]
    fn refuses_oversized_frame_with_nul() {
        let mut decoder = FrameDecoder::new(4);
        decoder.extend(b"123456\0");
        let error = decoder.next_frame().unwrap_err();
        assert_eq!(
            error,
            FrameError::TooLarge {
                length: 6,
                limit: 4
            }
        );
        // A NUL was sent: the message must not claim otherwise.
        assert!(!error.to_string().contains("NUL"), "{error}");
    }

    #[test]
    fn encode_appends_nul() {
        assert_eq!(encode(&serde_json::json!({"x": 1})), b"{\"x\":1}\0");
    }
}
