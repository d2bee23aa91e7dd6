//! O_DIRECT on a descriptor the client passed, and positioned writes that finish or say why.
//!
//! We never reopen a client's descriptor (that would bypass the access the client granted), so
//! O_DIRECT is switched on with `fcntl(F_SETFL)` on the open file description itself. That
//! description is shared with the client's copy of the descriptor, so the original flags are put
//! back when the copy ends, on every path: [`DirectIoGuard`] restores them when dropped.
//!
//! Filesystems without O_DIRECT (ramfs, some FUSE and network filesystems) refuse the flag with
//! `EINVAL`; the copy then goes through the page cache, which is slower and pollutes the cache
//! but writes the same bytes. Since Linux 6.6 tmpfs accepts O_DIRECT.

use std::fs::File;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::{Error, Result};

/// Holds O_DIRECT on a file (when the filesystem took it) and restores the file's original
/// status flags when dropped or [restored](Self::restore).
#[derive(Debug)]
pub struct DirectIoGuard<'a> {
    file: &'a File,
    original: OFlag,
    direct: bool,
    restored: bool,
}

/// The descriptor's current status flags (`F_GETFL`).
pub fn status_flags(file: &File) -> Result<OFlag> {
    let bits = fcntl(file, FcntlArg::F_GETFL)
        .map_err(|errno| Error::io("reading descriptor status flags (F_GETFL)", errno))?;
    Ok(OFlag::from_bits_retain(bits))
}

/// Switches O_DIRECT on for `file` if its filesystem supports it, and returns a guard that
/// restores the original flags.
///
/// [`DirectIoGuard::is_direct`] tells whether the flag took; when the filesystem refuses it the
/// guard still exists (and restores nothing that changed) and the fall-back to buffered I/O is
/// logged.
pub fn enable_direct_io(file: &File) -> Result<DirectIoGuard<'_>> {
    let original = status_flags(file)?;
    let mut guard = DirectIoGuard {
        file,
        original,
        direct: original.contains(OFlag::O_DIRECT),
        restored: false,
    };
    if guard.direct {
        return Ok(guard);
    }
    match fcntl(file, FcntlArg::F_SETFL(original | OFlag::O_DIRECT)) {
        Ok(_) => {
            // Trust the kernel's word only after reading it back.
            guard.direct = status_flags(file)?.contains(OFlag::O_DIRECT);
            if !guard.direct {
                tracing::info!("the output ignored O_DIRECT; writing through the page cache");
            }
        }
        Err(Errno::EINVAL) => {
            tracing::info!(
                "the output's filesystem does not support O_DIRECT; writing through the page cache"
            );
        }
        Err(errno) => return Err(Error::io("enabling O_DIRECT (F_SETFL)", errno)),
    }
    Ok(guard)
}

impl DirectIoGuard<'_> {
    /// Whether writes to the file now bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The flags the file had before, which [`Self::restore`] puts back.
    pub fn original_flags(&self) -> OFlag {
        self.original
    }

    /// Puts the original status flags back, reporting failure (dropping the guard does the same
    /// but can only log it).
    pub fn restore(mut self) -> Result<()> {
        self.restore_flags()
    }

    fn restore_flags(&mut self) -> Result<()> {
        if self.restored {
            return Ok(());
        }
        self.restored = true;
        if self.original.contains(OFlag::O_DIRECT) || !self.direct {
            return Ok(());
        }
        fcntl(self.file, FcntlArg::F_SETFL(self.original))
            .map(drop)
            .map_err(|errno| {
                Error::io("restoring descriptor flags after O_DIRECT (F_SETFL)", errno)
            })
    }
}

impl Drop for DirectIoGuard<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.restore_flags() {
            tracing::warn!(%error, "the output descriptor may keep O_DIRECT");
        }
    }
}

/// Writes all of `buffer` at `offset`, retrying short writes and `EINTR`.
///
/// A full filesystem (`ENOSPC`, or `EDQUOT` for a quota) becomes [`Error::NoSpace`] with the end
/// of this write as the lower bound of the bytes needed; every other failure is an
/// [`Error::Io`] naming the offset.
pub fn write_all_at(file: &File, buffer: &[u8], offset: u64) -> Result<()> {
    let mut written = 0usize;
    while written < buffer.len() {
        let at = offset + written as u64;
        match file.write_at(&buffer[written..], at) {
            Ok(0) => {
                return Err(Error::io(
                    format!("writing {} bytes at offset {at}", buffer.len() - written),
                    std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "the output accepted no bytes",
                    ),
                ));
            }
            Ok(count) => written += count,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) if matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                let end = offset + buffer.len() as u64;
                return Err(Error::NoSpace {
                    required_bytes: end,
                    message: format!(
                        "the output's filesystem is full ({error}) writing {} bytes at offset \
                         {at}: free at least {} bytes there or write the image to another \
                         filesystem",
                        buffer.len() - written,
                        end - at
                    ),
                });
            }
            Err(error) => {
                return Err(Error::io(
                    format!("writing {} bytes at offset {at}", buffer.len() - written),
                    error,
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::aligned::AlignedBuffer;
    use std::os::unix::fs::FileExt;

    #[test]
    fn direct_io_on_ext4_is_set_then_restored() {
        // /tmp is ext4 on the project machines (see docs/environment.md).
        let file = tempfile::tempfile_in("/tmp").unwrap();
        let before = status_flags(&file).unwrap();
        assert!(!before.contains(OFlag::O_DIRECT));
        let guard = enable_direct_io(&file).unwrap();
        assert!(guard.is_direct());
        assert!(status_flags(&file).unwrap().contains(OFlag::O_DIRECT));
        guard.restore().unwrap();
        assert_eq!(status_flags(&file).unwrap(), before);

        // Dropping restores too.
        let guard = enable_direct_io(&file).unwrap();
        assert!(status_flags(&file).unwrap().contains(OFlag::O_DIRECT));
        drop(guard);
        assert_eq!(status_flags(&file).unwrap(), before);
    }

    #[test]
    fn flags_already_direct_stay_direct() {
        let file = tempfile::tempfile_in("/tmp").unwrap();
        fcntl(&file, FcntlArg::F_SETFL(OFlag::O_DIRECT)).unwrap();
        let guard = enable_direct_io(&file).unwrap();
        assert!(guard.is_direct());
        guard.restore().unwrap();
        assert!(status_flags(&file).unwrap().contains(OFlag::O_DIRECT));
    }

    #[test]
    fn write_all_at_writes_aligned_buffers_under_direct_io() {
        let file = tempfile::tempfile_in("/tmp").unwrap();
        let guard = enable_direct_io(&file).unwrap();
        let mut buffer = AlignedBuffer::new(64 << 10).unwrap();
        for (i, byte) in buffer.iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        write_all_at(&file, &buffer, 8192).unwrap();
        // An unaligned O_DIRECT write fails, and the error names the offset.
        let error = write_all_at(&file, &buffer[1..4097], 3).unwrap_err();
        assert!(error.to_string().contains("offset 3"), "{error}");
        drop(guard);
        let mut back = vec![0u8; buffer.len() + 8192];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..8192].iter().all(|&b| b == 0));
        assert!(back[8192..] == buffer[..]);
    }
}
