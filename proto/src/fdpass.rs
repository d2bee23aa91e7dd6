//! File descriptors travel with messages as SCM_RIGHTS ancillary data.
//!
//! The sender attaches descriptors to the first byte of a message; Linux delivers them with the
//! `recvmsg` that reads that byte and never merges two senders' descriptor sets into one read.
//! Every receive uses `MSG_CMSG_CLOEXEC` so a descriptor can never leak into a child process
//! between its arrival and our first chance to mark it.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

/// Most descriptors one message may carry: a call needs at most an image, an output, a source
/// and a full key ring (one encryption key and 100 decryption keys), so 104.
pub const MAX_FDS_PER_MESSAGE: usize = 104;

/// The kernel's own cap on descriptors in one `sendmsg` (`SCM_MAX_FD`). The control buffer is
/// sized for it so a short buffer never truncates; we take ownership of all of them and refuse
/// the excess. (A full descriptor table still truncates: see [`recv_with_fds`].)
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
/// non-blocking sockets. Every descriptor the kernel installed is owned before anything can
/// fail, so none can leak on any path. Two cases are `InvalidData` errors, with every
/// descriptor of the message closed before return:
/// - more than [`MAX_FDS_PER_MESSAGE`] descriptors;
/// - a truncated control message (`MSG_CTRUNC`): the kernel stops installing descriptors when
///   our table is full (`RLIMIT_NOFILE`), installs the ones that fit and drops the rest, so the
///   call can never be served as sent.
///
/// The control messages are walked with the C macros rather than nix's parser: on truncation
/// nix refuses the whole buffer (`ENOBUFS`) without closing the descriptors it holds.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let fd_bytes = KERNEL_MAX_FDS * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 elements: the buffer must be aligned for `cmsghdr` (size_t-aligned).
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = space as _;
    let bytes = loop {
        // SAFETY: `header` points at `iov` (covering `buffer`) and `control`, all alive and
        // exclusively borrowed for the call; the kernel writes within the given lengths.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    };

    let first_new = fds.len();
    take_descriptors(&header, fds);
    let received = fds.len() - first_new;
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        fds.truncate(first_new);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the descriptors sent with this message were cut off (MSG_CTRUNC: the \
                 receiver's descriptor table is full); the {received} that arrived were closed; \
                 retry later"
            ),
        ));
    }
    if received > MAX_FDS_PER_MESSAGE {
        fds.truncate(first_new);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS_PER_MESSAGE} descriptors sent with one message"),
        ));
    }
    Ok(bytes)
}

/// Takes ownership of every descriptor in the `SCM_RIGHTS` messages of `header`'s control
/// buffer, as far as the kernel filled it (`msg_controllen`, `cmsg_len`).
// The lengths are `size_t` on glibc and `socklen_t` elsewhere, so the casts are needed there.
#[allow(clippy::unnecessary_cast)]
fn take_descriptors(header: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    let control_start = header.msg_control as usize;
    let control_end = control_start + header.msg_controllen as usize;
    // SAFETY: `header` was filled by recvmsg; the macros only do bounds-checked pointer
    // arithmetic within its control buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(header) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return a properly aligned header lying within the
        // control buffer, or null.
        let (level, kind, length) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_DATA points just past the header.
            let data = unsafe { libc::CMSG_DATA(cmsg) } as usize;
            // Never trust a length beyond what the kernel says it wrote.
            let end = (cmsg as usize + length as usize).min(control_end);
            let count = end.saturating_sub(data) / std::mem::size_of::<RawFd>();
            for index in 0..count {
                // SAFETY: `data + index * 4` lies within the control buffer (bounded by `end`);
                // read_unaligned because CMSG_DATA only guarantees the header's alignment.
                let raw = unsafe { (data as *const RawFd).add(index).read_unaligned() };
                // SAFETY: the kernel just installed `raw` in our table for this message and
                // nothing else refers to it; owning it here guarantees it is closed.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `cmsg` is a header of this buffer; CMSG_NXTHDR bounds-checks the next one.
        cmsg = unsafe { libc::CMSG_NXTHDR(header, cmsg) };
    }
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
