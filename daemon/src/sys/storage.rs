//! What kind of storage a descriptor refers to, and how many bytes it holds.
//!
//! Sources and outputs are either regular files or block devices. A regular file's length comes
//! from `fstat`; a block device's `st_size` is 0, so its size comes from the `BLKGETSIZE64`
//! ioctl instead.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

use crate::{Error, Result};

/// The raw ioctl, kept private: callers use [`size_of`].
mod ioctl {
    nix::ioctl_read!(
        /// `BLKGETSIZE64` is `_IOR(0x12, 114, size_t)` in <linux/fs.h>; `size_t` is 64 bits on
        /// every target the daemon builds for, and the kernel writes a `u64`.
        blk_get_size64,
        0x12,
        114,
        u64
    );
}

/// The kinds of storage the daemon reads and writes images on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    /// A regular file.
    RegularFile,
    /// A block device (disk, partition, loop device, logical volume).
    BlockDevice,
    /// Anything else; the name says what it is, for messages ("a directory", "a pipe (FIFO)", ...).
    Other(&'static str),
}

impl StorageKind {
    /// "a regular file", "a block device", "a pipe (FIFO)", …: for messages.
    pub fn description(self) -> &'static str {
        match self {
            Self::RegularFile => "a regular file",
            Self::BlockDevice => "a block device",
            Self::Other(what) => what,
        }
    }
}

/// Classifies the descriptor with `fstat`.
pub fn storage_kind(file: &File) -> Result<StorageKind> {
    let file_type = file
        .metadata()
        .map_err(|e| Error::io("fstat", e))?
        .file_type();
    Ok(if file_type.is_file() {
        StorageKind::RegularFile
    } else if file_type.is_block_device() {
        StorageKind::BlockDevice
    } else if file_type.is_dir() {
        StorageKind::Other("a directory")
    } else if file_type.is_fifo() {
        StorageKind::Other("a pipe (FIFO)")
    } else if file_type.is_socket() {
        StorageKind::Other("a socket")
    } else if file_type.is_char_device() {
        StorageKind::Other("a character device")
    } else {
        StorageKind::Other("a special file")
    })
}

/// Size in bytes of a regular file or block device.
///
/// Anything else is an [`Error::Io`] with kind `InvalidInput` saying what the descriptor is, so
/// the caller can tell the user which descriptor to reopen.
pub fn size_of(file: &File) -> Result<u64> {
    match storage_kind(file)? {
        StorageKind::RegularFile => Ok(file.metadata().map_err(|e| Error::io("fstat", e))?.len()),
        StorageKind::BlockDevice => {
            let mut size: u64 = 0;
            // SAFETY: the descriptor is open for the duration of the call (borrowed from `file`),
            // and BLKGETSIZE64 writes exactly one u64 through the pointer, which points to a live,
            // aligned, writable u64 on our stack.
            unsafe { ioctl::blk_get_size64(file.as_raw_fd(), &mut size) }
                .map_err(|errno| Error::io("BLKGETSIZE64 on block device", errno))?;
            Ok(size)
        }
        StorageKind::Other(what) => Err(Error::io(
            "size of descriptor",
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("it is {what}; pass a regular file or a block device"),
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn regular_file_size_is_its_length_even_when_odd_and_sparse() {
        let mut file = tempfile::tempfile_in("/tmp").unwrap();
        file.write_all(b"abc").unwrap();
        assert_eq!(size_of(&file).unwrap(), 3);
        file.set_len(5 * 1024 * 1024 * 1024 + 7).unwrap();
        assert_eq!(size_of(&file).unwrap(), 5 * 1024 * 1024 * 1024 + 7);
        assert_eq!(storage_kind(&file).unwrap(), StorageKind::RegularFile);
    }

    #[test]
    fn directory_is_refused_with_what_it_is() {
        let dir = File::open("/tmp").unwrap();
        assert_eq!(
            storage_kind(&dir).unwrap(),
            StorageKind::Other("a directory")
        );
        let error = size_of(&dir).unwrap_err();
        match &error {
            Error::Io { source, .. } => assert_eq!(source.kind(), io::ErrorKind::InvalidInput),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        let message = error.to_string();
        assert!(message.contains("directory"), "{message}");
        assert!(message.contains("block device"), "{message}");
    }

    #[test]
    fn character_device_is_refused() {
        let null = File::open("/dev/null").unwrap();
        assert_eq!(
            storage_kind(&null).unwrap(),
            StorageKind::Other("a character device")
        );
        assert!(size_of(&null)
            .unwrap_err()
            .to_string()
            .contains("character device"));
    }
}
