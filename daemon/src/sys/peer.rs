//! The groups of a Unix-socket peer, from the kernel (`SO_PEERGROUPS`, Linux 4.13+).
//!
//! SO_PEERCRED gives the peer's uid, gid and pid as of `connect`; SO_PEERGROUPS gives its
//! supplementary groups at the same moment. Both are the kernel's record, not anything the
//! client says, so the daemon can decide who is an operator (`imgcryptd --operator-group`)
//! without looking the user up by name (which a user could not influence either, but which
//! would see group changes made after the client connected).

use std::os::fd::{AsRawFd, BorrowedFd};

/// Most groups read: the kernel's own limit (NGROUPS_MAX, 65536); a peer that reports more
/// is refused (an error: the caller then treats it as no operator) rather than read in part.
const MAX_GROUPS: usize = 65536;

/// The peer's supplementary groups, or the error of `getsockopt`.
pub fn peer_groups(socket: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    read_groups(|groups, len| {
        // SAFETY: `groups` is a live, writable buffer of exactly `len` bytes (`read_groups`
        // sets `len` from its length); the kernel writes at most `len` bytes and stores the
        // size it needs (or wrote) in `len`, a valid `socklen_t` we own. The descriptor is
        // borrowed for the call.
        let result = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                len,
            )
        };
        if result == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    })
}

/// The loop around `getsockopt` (`get` fills the buffer and sets the length, or fails): grows
/// the buffer on `ERANGE` to the size the kernel asked for. Only groups the kernel wrote are
/// returned, never the buffer's zero fill (gid 0 would read as group root).
fn read_groups(
    mut get: impl FnMut(&mut [libc::gid_t], &mut libc::socklen_t) -> std::io::Result<()>,
) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .unwrap_or(libc::socklen_t::MAX);
        let result = get(&mut groups, &mut len);
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        let error = match result {
            Ok(()) => {
                groups.truncate(count.min(groups.len()));
                return Ok(groups);
            }
            Err(error) => error,
        };
        // ERANGE: the buffer was too small and `len` now says how large it must be.
        if error.raw_os_error() == Some(libc::ERANGE) && count > groups.len() {
            if count > MAX_GROUPS {
                return Err(std::io::Error::other(format!(
                    "the peer reports {count} supplementary groups, more than the {MAX_GROUPS} \
                     read"
                )));
            }
            groups.resize(count, 0);
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

    #[test]
    fn more_groups_than_read_is_an_error_not_a_zero_filled_list() {
        let erange = |groups: &mut [libc::gid_t], len: &mut libc::socklen_t| {
            // A peer with more groups than we read: the kernel asks for more, every time.
            let _ = groups;
            *len = ((MAX_GROUPS + 10) * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
            Err(std::io::Error::from_raw_os_error(libc::ERANGE))
        };
        assert!(read_groups(erange).is_err());
        // Asked to grow once, then answered: only what the kernel wrote.
        let mut calls = 0;
        let grows = |groups: &mut [libc::gid_t], len: &mut libc::socklen_t| {
            calls += 1;
            let size = std::mem::size_of::<libc::gid_t>();
            if groups.len() < 100 {
                *len = (100 * size) as libc::socklen_t;
                return Err(std::io::Error::from_raw_os_error(libc::ERANGE));
            }
            groups[..100].fill(7);
            *len = (100 * size) as libc::socklen_t;
            Ok(())
        };
        assert_eq!(read_groups(grows).unwrap(), vec![7; 100]);
    }
}
