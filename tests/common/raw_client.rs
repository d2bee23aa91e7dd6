//! A hand-rolled Varlink client, so tests can send what imgctl never would: wrong descriptors,
//! malformed, pipelined, oneway and unfinished messages.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use imgcrypt_proto::api::{EncryptParameters, EngineChoice, LuksVersion, Pbkdf, PbkdfKind};
use imgcrypt_proto::fdpass::send_with_fds;
use imgcrypt_proto::varlink::{Call, Reply};
use imgcrypt_proto::wire::{self, FrameDecoder, MAX_FRAME_LEN};

/// One connection to the daemon.
pub struct RawClient {
    /// The socket.
    pub stream: UnixStream,
    decoder: FrameDecoder,
}

impl RawClient {
    /// Connects to `socket`; reads time out after 30 s.
    pub fn connect(socket: &Path) -> Self {
        Self::from_stream(UnixStream::connect(socket).unwrap())
    }

    /// Wraps a connected stream (made by a test user's thread, say).
    pub fn from_stream(stream: UnixStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self {
            stream,
            decoder: FrameDecoder::new(4 * MAX_FRAME_LEN),
        }
    }

    /// Writes `bytes` as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends a call with `fds` attached.
    pub fn call(
        &mut self,
        method: &str,
        parameters: serde_json::Value,
        fds: &[BorrowedFd<'_>],
        more: bool,
    ) {
        self.send_call(
            &Call {
                method: method.to_string(),
                parameters: Some(parameters),
                more,
                oneway: false,
                upgrade: false,
            },
            fds,
        );
    }

    /// Sends a streaming Encrypt of `source` into `output` with the key file `key`, cheap
    /// keyslot (descriptors in that order).
    pub fn encrypt(&mut self, source: &impl AsFd, output: &impl AsFd, key: &impl AsFd) {
        self.call(
            imgcrypt_proto::api::ENCRYPT,
            cheap_encrypt_parameters(Some(2)),
            &[source.as_fd(), output.as_fd(), key.as_fd()],
            true,
        );
    }

    /// Sends any call envelope with `fds` attached.
    pub fn send_call(&mut self, call: &Call, fds: &[BorrowedFd<'_>]) {
        send_with_fds(self.stream.as_fd(), &wire::encode(call), fds).unwrap();
    }

    /// The next reply, or None at end of stream. Panics on a read timeout.
    pub fn reply(&mut self) -> Option<Reply> {
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return Some(serde_json::from_slice(&frame).unwrap());
            }
            let n = match self.stream.read(&mut buffer) {
                Ok(n) => n,
                // The daemon closed with unread data of ours in its buffer.
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(error) => panic!("reading a reply: {error}"),
            };
            if n == 0 {
                return None;
            }
            self.decoder.extend(&buffer[..n]);
        }
    }

    /// A reply the daemon sends without being asked (a refusal right after connecting), if one
    /// comes within `wait`.
    pub fn unsolicited_reply(&mut self, wait: Duration) -> Option<Reply> {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut buffer = [0u8; 4096];
        let reply = loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                break Some(serde_json::from_slice(&frame).unwrap());
            }
            match self.stream.read(&mut buffer) {
                Ok(0) => break None,
                Ok(n) => self.decoder.extend(&buffer[..n]),
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break None
                }
                Err(error) => panic!("reading: {error}"),
            }
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        reply
    }

    /// Reads a streaming job's replies until its copy is under way (some bytes done).
    pub fn wait_for_copy(&mut self) {
        loop {
            let reply = self.reply().expect("progress");
            assert_eq!(reply.error, None, "{reply:?}");
            let progress = &reply.parameters.unwrap()["progress"];
            if progress["phase"] == "copy" && progress["bytes_done"].as_u64().unwrap_or(0) > 0 {
                return;
            }
        }
    }

    /// Replies until the final one.
    pub fn final_reply(&mut self) -> Reply {
        loop {
            let reply = self
                .reply()
                .expect("connection closed before the final reply");
            if !reply.continues {
                return reply;
            }
        }
    }
}

/// Encrypt parameters with a cheap keyslot: source descriptor 0, output 1, and the key at
/// `key` (`None`: the daemon's ring).
pub fn cheap_encrypt_parameters(key: Option<u32>) -> serde_json::Value {
    serde_json::to_value(EncryptParameters {
        source: 0,
        companions: Vec::new(),
        output: 1,
        key,
        source_key: None,
        luks_version: LuksVersion::Luks2,
        sector_size: 512,
        pbkdf: Some(Pbkdf {
            kind: Some(PbkdfKind::Pbkdf2),
            iterations: Some(1000),
            ..Pbkdf::default()
        }),
        engine: EngineChoice::Auto,
        format: None,
        target: None,
        detach: None,
        names: None,
        stream: None,
    })
    .unwrap()
}
