//! Anonymous in-memory files owned by the daemon.
//!
//! Work that libraries do through a path (libcryptsetup formats a "device") happens on a memfd
//! first, never on a client's descriptor: a failure then leaves the client's file untouched, and
//! no library ever reopens something a client controls. A memfd is sparse like any tmpfs file,
//! so a large size costs nothing until pages are written.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::{Error, Result};

/// Creates an empty memfd named `name` (visible only in `/proc/PID/fd` links), close-on-exec so
/// it never leaks into a child process.
pub fn create(name: &str) -> Result<File> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC)
        .map_err(|errno| Error::io(format!("creating in-memory file {name:?}"), errno))?;
    Ok(File::from(fd))
}

/// A path that opens `file` again, for libraries that take paths.
///
/// Only for descriptors the daemon owns: opening `/proc/self/fd/N` re-opens the file itself
/// (with fresh access checks), not a duplicate of the descriptor.
pub fn proc_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn memfd_is_cloexec_sparse_and_reopenable_by_path() {
        let mut file = create("imgcrypt-test").unwrap();
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);

        file.set_len(1 << 30).unwrap();
        let metadata = file.metadata().unwrap();
        assert_eq!(metadata.len(), 1 << 30);
        assert_eq!(metadata.blocks(), 0, "a fresh memfd must be sparse");

        file.write_all(b"header").unwrap();
        let mut reopened = std::fs::OpenOptions::new()
            .read(true)
            .open(proc_path(&file))
            .unwrap();
        let mut start = [0u8; 6];
        reopened.read_exact(&mut start).unwrap();
        assert_eq!(&start, b"header");
        // A re-open has its own offset: the path is the file, not our descriptor.
        assert_eq!(reopened.seek(SeekFrom::Start(0)).unwrap(), 0);
        assert_eq!(file.stream_position().unwrap(), 6);
    }
}
