//! Opening a block device by its number, without relying on udev to have made its node.
//!
//! devtmpfs creates `/dev/dm-<minor>` and `/dev/loop<N>` as soon as the kernel adds the device,
//! with or without udev. Where `/dev` is a plain tmpfs (some containers, minimal initramfs
//! set-ups) nobody does, so we make the node ourselves with `mknod` and remove it afterwards.
//! Whatever the path holds is trusted only after checking, on the opened descriptor, that it is
//! the block device with the number we expect: a stale node from an earlier device with the same
//! name but another number, or anything planted there, is refused.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::{Error, Result};

/// An open block device, and the node we made for it (removed on drop) if there was none.
#[derive(Debug)]
pub struct BlockNode {
    file: File,
    path: PathBuf,
    device: (u32, u32),
    created: bool,
}

impl BlockNode {
    /// Opens block device `major:minor` read-write through `path`, with the extra `open(2)`
    /// flags in `custom_flags` (e.g. `O_DIRECT`), creating the node (mode 0600) if `path` does
    /// not exist.
    pub fn open(path: &Path, (major, minor): (u32, u32), custom_flags: i32) -> Result<Self> {
        let number = makedev(u64::from(major), u64::from(minor));
        let what = || format!("{} (block device {major}:{minor})", path.display());
        let created = match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                check_is_device(&meta, number).map_err(|e| Error::io(what(), e))?;
                false
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                match mknod(path, SFlag::S_IFBLK, Mode::S_IRUSR | Mode::S_IWUSR, number) {
                    Ok(()) => {
                        tracing::debug!(path = %path.display(), "created the device node");
                        true
                    }
                    // devtmpfs made it between our look and our mknod.
                    Err(Errno::EEXIST) => false,
                    Err(errno) => {
                        return Err(Error::io(
                            format!(
                                "creating the missing device node {} with mknod (the daemon \
                                 needs CAP_MKNOD where /dev is not devtmpfs)",
                                what()
                            ),
                            errno,
                        ))
                    }
                }
            }
            Err(error) => return Err(Error::io(format!("looking at {}", what()), error)),
        };
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | custom_flags)
            .open(path);
        let file = match opened {
            Ok(file) => file,
            Err(error) => {
                if created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(Error::io(format!("opening {}", what()), error));
            }
        };
        // From here on, dropping `node` removes a node we created.
        let node = Self {
            file,
            path: path.to_path_buf(),
            device: (major, minor),
            created,
        };
        // The descriptor, not the path, is what we will write to: check it.
        let meta = node
            .file
            .metadata()
            .map_err(|e| Error::io(format!("fstat on {}", what()), e))?;
        check_is_device(&meta, number).map_err(|e| Error::io(what(), e))?;
        Ok(node)
    }

    /// The open device.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened through.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device's number.
    pub fn device(&self) -> (u32, u32) {
        self.device
    }

    /// Whether we made the node (and will remove it).
    pub fn created_node(&self) -> bool {
        self.created
    }
}

impl Drop for BlockNode {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        // Remove only what is still our node: devtmpfs may have replaced it meanwhile.
        let number = makedev(u64::from(self.device.0), u64::from(self.device.1));
        let still_ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| check_is_device(&meta, number).is_ok());
        if still_ours {
            if let Err(error) = std::fs::remove_file(&self.path) {
                tracing::warn!(%error, path = %self.path.display(), "could not remove the device node we created");
            }
        }
    }
}

fn check_is_device(meta: &std::fs::Metadata, number: u64) -> io::Result<()> {
    if !meta.file_type().is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "exists but is not a block device; remove it",
        ));
    }
    if meta.rdev() != number {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "is block device {}:{} instead (a stale node); remove it",
                nix::sys::stat::major(meta.rdev()),
                nix::sys::stat::minor(meta.rdev())
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Creating, opening and removing a node for a real block device (a loop device, which
    /// exists on every test machine), in /dev like the engine does.
    #[test]
    fn missing_node_is_created_checked_and_removed() {
        let meta = std::fs::metadata("/dev/loop0").expect("/dev/loop0 exists on the test host");
        let number = (
            nix::sys::stat::major(meta.rdev()) as u32,
            nix::sys::stat::minor(meta.rdev()) as u32,
        );
        let path = PathBuf::from(format!("/dev/imgcrypt-test-node-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);

        let node = BlockNode::open(&path, number, 0).unwrap();
        assert!(node.created_node());
        assert_eq!(node.device(), number);
        let opened = node.file().metadata().unwrap();
        assert_eq!(opened.rdev(), meta.rdev());
        assert!(path.exists());
        drop(node);
        assert!(!path.exists(), "the node we made was left behind");

        // An existing node is used and left alone.
        let node = BlockNode::open(Path::new("/dev/loop0"), number, 0).unwrap();
        assert!(!node.created_node());
        drop(node);
        assert!(Path::new("/dev/loop0").exists());
    }

    #[test]
    fn wrong_number_and_non_devices_are_refused() {
        let meta = std::fs::metadata("/dev/loop0").unwrap();
        let major = nix::sys::stat::major(meta.rdev()) as u32;
        let minor = nix::sys::stat::minor(meta.rdev()) as u32;
        let error = BlockNode::open(Path::new("/dev/loop0"), (major, minor + 1), 0).unwrap_err();
        assert!(error.to_string().contains("stale node"), "{error}");

        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let plain = dir.path().join("dm-0");
        std::fs::write(&plain, b"not a device").unwrap();
        let error = BlockNode::open(&plain, (major, minor), 0).unwrap_err();
        assert!(error.to_string().contains("not a block device"), "{error}");
        assert!(plain.exists(), "a file we did not make was removed");

        let link = dir.path().join("dm-1");
        std::os::unix::fs::symlink("/dev/loop0", &link).unwrap();
        let error = BlockNode::open(&link, (major, minor), 0).unwrap_err();
        assert!(error.to_string().contains("not a block device"), "{error}");
    }
}
