//! A blocking Varlink client: one call at a time, descriptors sent with the call.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use imgcrypt_proto::fdpass::{recv_with_fds, send_with_fds};
use imgcrypt_proto::varlink::{self, Call, Reply, ServiceInfo};
use imgcrypt_proto::wire::{self, FrameDecoder, MAX_FRAME_LEN};

/// Largest reply accepted. The daemon's frames are bounded by what it sends, not by what a
/// peer may make it hold, and one reply can be larger than a call: `Jobs` for an operator
/// lists up to 256 jobs with their names (a few KiB each at worst).
const MAX_REPLY_LEN: usize = 128 * MAX_FRAME_LEN;

use crate::error::{CtlError, Result};

/// A connection to imgcryptd.
pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            stream: UnixStream::connect(path)?,
            decoder: FrameDecoder::new(MAX_REPLY_LEN),
        })
    }

    /// Sends `call` with `fds` attached.
    pub fn send(&mut self, call: &Call, fds: &[BorrowedFd<'_>]) -> Result<()> {
        send_with_fds(self.stream.as_fd(), &wire::encode(call), fds)
            .map_err(|e| CtlError::Protocol(format!("sending {}: {e}", call.method)))
    }

    /// The next reply. Descriptors are never expected from the daemon; any that arrive are
    /// closed at once.
    pub fn receive(&mut self) -> Result<Reply> {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    return serde_json::from_slice(&frame)
                        .map_err(|e| CtlError::Protocol(format!("malformed reply: {e}")))
                }
                Ok(None) => {}
                Err(e) => return Err(CtlError::Protocol(e.to_string())),
            }
            let mut unexpected = Vec::new();
            let n = recv_with_fds(self.stream.as_fd(), &mut buffer, &mut unexpected)
                .map_err(|e| CtlError::Protocol(format!("reading a reply: {e}")))?;
            drop(unexpected);
            if n == 0 {
                return Err(CtlError::Protocol(
                    "the daemon closed the connection before replying (see its log: \
                     `journalctl -u imgcryptd` or the per-user log)"
                        .to_string(),
                ));
            }
            self.decoder.extend(&buffer[..n]);
        }
    }

    /// `org.varlink.service.GetInfo`: proves a live daemon is on the socket.
    pub fn get_info(&mut self) -> Result<ServiceInfo> {
        let call = Call {
            method: varlink::GET_INFO.to_string(),
            parameters: None,
            more: false,
            oneway: false,
            upgrade: false,
        };
        self.send(&call, &[])?;
        let reply = self.receive()?;
        if let Some(name) = reply.error {
            return Err(CtlError::Protocol(format!("GetInfo failed: {name}")));
        }
        serde_json::from_value(reply.parameters.unwrap_or_default())
            .map_err(|e| CtlError::Protocol(format!("malformed GetInfo reply: {e}")))
    }
}
