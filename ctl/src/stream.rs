//! The client's end of an `Encrypt` output streamed through a pipe ([`imgcrypt_proto::stream`]):
//! the pipe itself, the preamble, and a reader over the image bytes that keeps the LUKS header
//! as it passes (an interrupted upload resumes from it) and refuses a stream that ends early or
//! runs on past the image.

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

/// What is called with the whole header once it has passed.
type HeaderSink<'h> = Box<dyn FnMut(&[u8]) -> Result<()> + 'h>;

/// The image bytes `preamble.start..preamble.image_size` of a stream, read in order.
///
/// The header bytes that pass (all of them when the stream starts at 0) are collected and given
/// to `on_header` once complete, *before* the reader hands out any payload byte: a part that
/// holds payload can then only be stored after the header it needs to resume is saved.
pub struct ImageStream<'h, R> {
    inner: R,
    preamble: Preamble,
    position: u64,
    header: Vec<u8>,
    on_header: Option<HeaderSink<'h>>,
}

impl<'h, R: Read> ImageStream<'h, R> {
    /// A reader over `inner`, positioned just after the preamble.
    pub fn new(
        inner: R,
        preamble: Preamble,
        on_header: impl FnMut(&[u8]) -> Result<()> + 'h,
    ) -> Self {
        let keeps_header = preamble.start == 0;
        Self {
            inner,
            preamble,
            position: preamble.start,
            header: Vec::new(),
            on_header: keeps_header.then(|| Box::new(on_header) as Box<_>),
        }
    }

    /// Reads the rest of the header and hands it to `on_header` (only for a stream from 0).
    fn take_header(&mut self) -> std::io::Result<()> {
        let Some(mut on_header) = self.on_header.take() else {
            return Ok(());
        };
        let length = usize::try_from(self.preamble.header_len)
            .map_err(|_| std::io::Error::other("the stream's header length does not fit"))?;
        self.header.resize(length, 0);
        self.inner.read_exact(&mut self.header).map_err(early_end)?;
        on_header(&self.header).map_err(std::io::Error::other)?;
        Ok(())
    }
}

impl<R: Read> Read for ImageStream<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        self.take_header()?;
        // Header bytes read ahead are handed out first.
        let header_left = self.preamble.header_len.min(self.header.len() as u64);
        if self.position < header_left {
            let from = self.position as usize;
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
    fn the_header_is_kept_before_any_payload_byte_is_handed_out() {
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
        let mut saved = Vec::new();
        let mut stream = ImageStream::new(reader, read, |header| {
            saved = header.to_vec();
            Ok(())
        });
        let mut first = [0u8; 100];
        stream.read_exact(&mut first).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        drop(stream);
        assert_eq!(saved, image[..4096]);
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
        let mut called = false;
        let mut stream = ImageStream::new(&bytes[PREAMBLE_LEN..], preamble, |_| {
            called = true;
            Ok(())
        });
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert_eq!(stream.position, 20_000);
        drop(stream);
        assert!(!called, "a resumed stream has no header to keep");
        assert_eq!(rest.len(), 20_000 - 8192);

        let cut = &bytes[PREAMBLE_LEN..bytes.len() - 1];
        let mut stream = ImageStream::new(cut, preamble, |_| Ok(()));
        let error = stream.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);

        let mut long = bytes[PREAMBLE_LEN..].to_vec();
        long.push(0);
        let mut stream = ImageStream::new(&long[..], preamble, |_| Ok(()));
        let error = stream.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_truncated_preamble_is_the_jobs_failure() {
        let error = read_preamble(&mut &[0u8; 10][..]).unwrap_err();
        assert!(error.to_string().contains("before its preamble"), "{error}");
    }
}
