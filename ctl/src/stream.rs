//! The client's end of an `Encrypt` output streamed through a pipe ([`imgcrypt_proto::stream`]):
//! the pipe itself, the preamble, the image's header (a raw LUKS header, or a qcow2's header
//! cluster and LUKS header; read first, so it is saved before any part:
//! an interrupted upload resumes from it), and a reader over the image bytes that refuses a
//! stream that ends early or runs on past the image.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;

use imgcrypt_proto::stream::{Preamble, PREAMBLE_LEN};

use crate::error::{CtlError, Result};

/// A new pipe: `(read end, write end)`, both close-on-exec. The write end goes to the daemon as
/// the output descriptor and must be dropped here once passed, so the read end sees the end of
/// the stream when the daemon closes its copy.
pub fn pipe() -> Result<(File, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| CtlError::Protocol(format!("cannot create the pipe for the stream: {e}")))?;
    Ok((File::from(read), write))
}

/// Reads and checks the preamble; an immediate end of file means the daemon refused the job
/// (its reply says why).
pub fn read_preamble(reader: &mut impl Read) -> Result<Preamble> {
    let mut bytes = [0u8; PREAMBLE_LEN];
    reader.read_exact(&mut bytes).map_err(|error| {
        CtlError::Protocol(format!(
            "the daemon's stream ended before its preamble ({error}); the job failed before \
             writing anything"
        ))
    })?;
    Preamble::decode(&bytes).map_err(|error| CtlError::Protocol(error.to_string()))
}

/// Reads the header bytes a stream carries right after its preamble (`start..header_len`; all
/// of the header when the stream starts at 0, none when it starts past it), so the caller can
/// save them before any part holding payload is stored.
pub fn read_header(reader: &mut impl Read, preamble: &Preamble) -> Result<Vec<u8>> {
    let length = preamble.header_len.saturating_sub(preamble.start);
    let mut header = vec![0u8; usize::try_from(length).unwrap_or(usize::MAX)];
    reader.read_exact(&mut header).map_err(|error| {
        CtlError::Protocol(format!(
            "the daemon's stream ended inside the image's header: {}",
            early_end(error)
        ))
    })?;
    Ok(header)
}

/// The image bytes `preamble.start..preamble.image_size` of a stream, read in order: the header
/// bytes [`read_header`] took first, then the rest from the pipe. A stream that ends early, or
/// runs on past the image, is an error.
pub struct ImageStream<R> {
    inner: R,
    preamble: Preamble,
    position: u64,
    header: Vec<u8>,
}

impl<R: Read> ImageStream<R> {
    /// A reader over `inner`, positioned after the preamble and the `header` bytes read from it.
    pub fn new(inner: R, preamble: Preamble, header: Vec<u8>) -> Self {
        Self {
            inner,
            preamble,
            position: preamble.start,
            header,
        }
    }
}

impl<R: Read> Read for ImageStream<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        // Header bytes read ahead are handed out first.
        let header_end = self.preamble.start + self.header.len() as u64;
        if self.position < header_end {
            let from = (self.position - self.preamble.start) as usize;
            let count = buffer.len().min(self.header.len() - from);
            buffer[..count].copy_from_slice(&self.header[from..from + count]);
            self.position += count as u64;
            return Ok(count);
        }
        let left = self.preamble.image_size - self.position;
        if left == 0 {
            // The image is complete: anything more is a broken stream.
            let mut extra = [0u8; 1];
            return match self.inner.read(&mut extra)? {
                0 => Ok(0),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the daemon's stream runs on past the image's size",
                )),
            };
        }
        let wanted = buffer
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let count = self.inner.read(&mut buffer[..wanted])?;
        if count == 0 {
            return Err(early_end(std::io::ErrorKind::UnexpectedEof.into()));
        }
        self.position += count as u64;
        Ok(count)
    }
}

fn early_end(error: std::io::Error) -> std::io::Error {
    if error.kind() == std::io::ErrorKind::UnexpectedEof {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon's stream ended before the image was complete (the job failed or was \
             stopped; its reply says why)",
        )
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(preamble: Preamble, image: &[u8]) -> Vec<u8> {
        let mut bytes = preamble.encode().to_vec();
        bytes.extend_from_slice(&image[preamble.start as usize..]);
        bytes
    }

    #[test]
    fn the_header_is_read_first_and_handed_out_again_in_order() {
        let image: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let preamble = Preamble {
            image_size: image.len() as u64,
            start: 0,
            header_len: 4096,
            restarted: false,
        };
        let bytes = stream_of(preamble, &image);
        let mut reader = &bytes[..];
        let read = read_preamble(&mut reader).unwrap();
        assert_eq!(read, preamble);
        let header = read_header(&mut reader, &read).unwrap();
        assert_eq!(header, image[..4096]);
        let mut stream = ImageStream::new(reader, read, header);
        let mut first = [0u8; 100];
        stream.read_exact(&mut first).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert_eq!([&first[..], &rest[..]].concat(), image);
    }

    #[test]
    fn a_resumed_stream_starts_at_its_offset_and_an_early_end_is_an_error() {
        let image = vec![7u8; 20_000];
        let preamble = Preamble {
            image_size: image.len() as u64,
            start: 8192,
            header_len: 4096,
            restarted: false,
        };
        let bytes = stream_of(preamble, &image);
        let mut body = &bytes[PREAMBLE_LEN..];
        let header = read_header(&mut body, &preamble).unwrap();
        assert!(
            header.is_empty(),
            "a stream past the header carries none of it"
        );
        let mut stream = ImageStream::new(body, preamble, header);
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert_eq!(stream.position, 20_000);
        assert_eq!(rest.len(), 20_000 - 8192);

        let cut = &bytes[PREAMBLE_LEN..bytes.len() - 1];
        let mut stream = ImageStream::new(cut, preamble, Vec::new());
        let error = stream.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);

        let mut long = bytes[PREAMBLE_LEN..].to_vec();
        long.push(0);
        let mut stream = ImageStream::new(&long[..], preamble, Vec::new());
        let error = stream.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_truncated_preamble_or_header_is_the_jobs_failure() {
        let error = read_preamble(&mut &[0u8; 10][..]).unwrap_err();
        assert!(error.to_string().contains("before its preamble"), "{error}");
        let preamble = Preamble {
            image_size: 1 << 20,
            start: 0,
            header_len: 4096,
            restarted: false,
        };
        let error = read_header(&mut &[0u8; 100][..], &preamble).unwrap_err();
        assert!(
            error.to_string().contains("inside the image's header"),
            "{error}"
        );
    }
}
