//! The groups of a Unix-socket peer, from the kernel (`SO_PEERGROUPS`, Linux 4.13+).
//!
//! SO_PEERCRED gives the peer's uid, gid and pid as of `connect`; SO_PEERGROUPS gives its
//! supplementary groups at the same moment. Both are the kernel's record, not anything the
//! client says, so the daemon can decide who is an operator (`imgcryptd --operator-group`)
//! without looking the user up by name (which a user could not influence either, but which
//! would see group changes made after the client connected).

use std::os::fd::{AsRawFd, BorrowedFd};

/// Most groups read: the kernel's own limit (NGROUPS_MAX, 65536) is far more than any real
/// user has; a peer with more is treated as having these first ones only.
const MAX_GROUPS: usize = 65536;

/// The peer's supplementary groups, or the error of `getsockopt`.
pub fn peer_groups(socket: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` is a live, writable buffer of exactly `len` bytes; the kernel writes
        // at most `len` bytes and stores the size it needs (or wrote) in `len`, which is a
        // valid `socklen_t` we own. The descriptor is borrowed for the call.
        let result = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if result == 0 {
            groups.truncate(count.min(groups.len()));
            return Ok(groups);
        }
        let error = std::io::Error::last_os_error();
        // ERANGE: the buffer was too small and `len` now says how large it must be.
        if error.raw_os_error() == Some(libc::ERANGE) && count > groups.len() {
            groups.resize(count.min(MAX_GROUPS), 0);
            if count > MAX_GROUPS {
                return Ok(groups);
            }
            continue;
        }
        return Err(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_socket_pair_peer_has_our_groups() {
        let (one, _two) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut theirs = peer_groups(one.as_fd()).unwrap();
        ours.sort_unstable();
        ours.dedup();
        theirs.sort_unstable();
        theirs.dedup();
        assert_eq!(theirs, ours);
    }
}
