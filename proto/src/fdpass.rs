//! File descriptors travel with messages as SCM_RIGHTS ancillary data.
//!
//! The sender attaches descriptors to the first byte of a message; Linux delivers them with the
//! `recvmsg` that reads that byte and never merges two senders' descriptor sets into one read.
//! Every receive uses `MSG_CMSG_CLOEXEC` so a descriptor can never leak into a child process
//! between its arrival and our first chance to mark it.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

/// Most descriptors one message may carry: a call needs at most an image, an output, a source
/// and a full key ring (one encryption key and 100 decryption keys), so 104.
pub const MAX_FDS_PER_MESSAGE: usize = 104;

/// The kernel's own cap on descriptors in one `sendmsg` (`SCM_MAX_FD`). The control buffer is
/// sized for it so the kernel never truncates: on truncation nix hides the descriptors that did
/// arrive, and they would leak. We take ownership of all of them and refuse the excess.
const KERNEL_MAX_FDS: usize = 253;

/// Sends all of `data`, attaching `fds` to its first byte.
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < data.len() {
        let iov = [IoSlice::new(&data[sent..])];
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

/// One `recvmsg` into `buffer`; descriptors that came with the bytes are appended to `fds`.
///
/// Returns the number of bytes read (0 at end of stream). `WouldBlock` is passed through for
/// non-blocking sockets. More than [`MAX_FDS_PER_MESSAGE`] descriptors is an error; all of them
/// are closed before it returns.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut control = nix::cmsg_space!([RawFd; KERNEL_MAX_FDS]);
    let mut iov = [IoSliceMut::new(buffer)];
    let message = loop {
        match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(io::Error::from)?,
        }
    };
    let first_new = fds.len();
    for cmsg in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            for raw in received {
                // SAFETY: the kernel just installed `raw` in our table for this message and
                // nothing else refers to it; taking ownership here guarantees it is closed.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    if fds.len() - first_new > MAX_FDS_PER_MESSAGE {
        fds.truncate(first_new);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS_PER_MESSAGE} descriptors sent with one message"),
        ));
    }
    Ok(message.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_arrive_with_their_message_and_are_cloexec() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"payload").unwrap();
        send_with_fds(a.as_fd(), b"hello\0", &[file.as_fd()]).unwrap();

        let mut buffer = [0u8; 64];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_fd(), &mut buffer, &mut fds).unwrap();
        assert_eq!(&buffer[..n], b"hello\0");
        assert_eq!(fds.len(), 1);
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(
            flags & libc_fd_cloexec() != 0,
            "received descriptor must be close-on-exec"
        );

        let mut received = std::fs::File::from(fds.pop().unwrap());
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "payload");
    }

    #[test]
    fn too_many_descriptors_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..MAX_FDS_PER_MESSAGE + 1)
            .map(|_| tempfile::tempfile().unwrap())
            .collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        send_with_fds(a.as_fd(), b"x\0", &borrowed).unwrap();
        let mut buffer = [0u8; 8];
        let mut fds = Vec::new();
        let err = recv_with_fds(b.as_fd(), &mut buffer, &mut fds).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    fn libc_fd_cloexec() -> i32 {
        nix::fcntl::FdFlag::FD_CLOEXEC.bits()
    }
}
