//! A scripted peer for the commands' tests. It plays imgcryptd's side of one connection
//! (GetInfo, then one call) so that the client's real socket, framing, descriptor passing and
//! file handling run; what it replies is the test's script, since the daemon is not under test.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;

use imgcrypt_proto::api::INTERFACE;
use imgcrypt_proto::fdpass::{recv_with_fds, send_with_fds};
use imgcrypt_proto::varlink::{Call, Reply, ServiceInfo};
use imgcrypt_proto::wire::{self, FrameDecoder, MAX_FRAME_LEN};

/// A peer serving one client on a socket in its own temporary directory.
pub struct Peer {
    /// The socket to pass as `--socket`.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    thread: JoinHandle<Call>,
}

impl Peer {
    /// Starts a peer that answers the one call with `script(call, descriptors)`'s replies.
    pub fn serve<F>(script: F) -> Self
    where
        F: FnOnce(&Call, Vec<OwnedFd>) -> Vec<Reply> + Send + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("io.imgcrypt");
        let listener = UnixListener::bind(&socket).unwrap();
        let thread = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
            let (get_info, _) = read_call(&mut stream, &mut decoder);
            assert_eq!(get_info.method, "org.varlink.service.GetInfo");
            send(
                &stream,
                &Reply::ok(ServiceInfo {
                    vendor: "test".into(),
                    product: "test peer".into(),
                    version: "0".into(),
                    url: String::new(),
                    interfaces: vec![INTERFACE.to_string()],
                }),
            );
            let (call, fds) = read_call(&mut stream, &mut decoder);
            for reply in script(&call, fds) {
                send(&stream, &reply);
            }
            call
        });
        Self {
            socket,
            _dir: dir,
            thread,
        }
    }

    /// The call the client made (re-raises the peer's own assertion failures).
    pub fn call(self) -> Call {
        self.thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

fn read_call(stream: &mut UnixStream, decoder: &mut FrameDecoder) -> (Call, Vec<OwnedFd>) {
    let mut fds = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            return (serde_json::from_slice(&frame).unwrap(), fds);
        }
        let n = recv_with_fds(stream.as_fd(), &mut buffer, &mut fds).unwrap();
        assert!(n > 0, "the client hung up before calling");
        decoder.extend(&buffer[..n]);
    }
}

fn send(stream: &UnixStream, reply: &Reply) {
    // The client may have hung up after an error reply; that is its right.
    let _ = send_with_fds(stream.as_fd(), &wire::encode(reply), &[]);
}

/// Device and inode of a descriptor, to check which file the client passed.
pub fn identity(fd: &impl AsFd) -> (u64, u64) {
    let stat = nix::sys::stat::fstat(fd.as_fd()).unwrap();
    (stat.st_dev, stat.st_ino)
}

/// Device and inode of a path.
pub fn identity_of(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).unwrap();
    (metadata.dev(), metadata.ino())
}

/// A ring in `dir` naming `new.key` as encryption_key and `old.key` as decryption_key1 (their
/// contents do not matter: the client never reads them).
pub fn ring(dir: &std::path::Path) -> (crate::keyring::RingLocation, PathBuf, PathBuf) {
    let new_key = dir.join("new.key");
    let old_key = dir.join("old.key");
    std::fs::write(&new_key, "new").unwrap();
    std::fs::write(&old_key, "old").unwrap();
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        "encryption_key = \"new.key\"\ndecryption_key1 = \"old.key\"\n",
    )
    .unwrap();
    (
        crate::keyring::RingLocation::Explicit(path),
        new_key,
        old_key,
    )
}

/// The call's parameters as `T`.
pub fn parameters<T: serde::de::DeserializeOwned>(call: &Call) -> T {
    serde_json::from_value(call.parameters.clone().unwrap()).unwrap()
}

/// A sample `Unlocked`.
pub fn unlocked() -> imgcrypt_proto::api::Unlocked {
    imgcrypt_proto::api::Unlocked {
        key_name: "decryption_key1".into(),
        fingerprint: "fp=".into(),
        keyslot: 1,
        method: imgcrypt_proto::api::UnlockMethod::Token,
        attempts: 1,
    }
}

/// An error reply as the daemon sends it.
pub fn error_reply(name: &str, message: &str) -> Reply {
    Reply::error(name, imgcrypt_proto::api::ErrorParameters::message(message))
}
