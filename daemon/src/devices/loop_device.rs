//! The output behind a loop device, attached by descriptor and detached on every path.
//!
//! dm-crypt maps block devices; the output is usually a regular file, and always a descriptor a
//! client passed. The loop device is attached to *that descriptor* (`LOOP_SET_FD`), never to a
//! path we open ourselves, so the kernel writes through exactly the access the client granted
//! (a reopened path could be another file, or one the client may not write).
//!
//! - **autoclear**: the kernel detaches the loop device when its last user closes it, so a
//!   daemon killed with SIGKILL leaves nothing once dm-crypt lets go of it (the start-up sweep
//!   removes a mapping left behind, which releases the loop device under it).
//! - **offset and size limit**: the loop device shows only the part of the output the mapping
//!   may touch.
//! - **direct I/O** (`LOOP_SET_DIRECT_IO`): the loop driver then writes to the file with
//!   `IOCB_DIRECT` instead of through the page cache, saving a copy of every byte. The kernel
//!   accepts it only when the offset is aligned to the file system's block device; where it
//!   refuses, the copy runs buffered and the log says so.
//!
//! Detaching is `LOOP_CLR_FD` and then closing our descriptor: since Linux 5.19 the kernel
//! clears a device on its last close, so [`AttachedLoop::detach`] waits (briefly, bounded) for
//! the device to be unbound before reporting it gone.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use loopdev::{LoopControl, LoopDevice};
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::devices::node::BlockNode;
use crate::sys::direct_io::status_flags;
use crate::{Error, Result};

/// Major number of loop devices (`LOOP_MAJOR` in <linux/major.h>).
pub const LOOP_MAJOR: u32 = 7;

/// Free devices to try when another process takes the one `LOOP_CTL_GET_FREE` offered.
const ATTACH_ATTEMPTS: usize = 8;

/// How long a detach waits for the kernel to unbind the device after our last close.
const UNBIND_WAIT: Duration = Duration::from_secs(3);

/// What a detach achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// The device is unbound from the output.
    Done,
    /// Someone else still holds the device (a mapping whose removal was deferred); autoclear
    /// unbinds it when they let go.
    Pending,
}

/// A loop device attached to a borrowed output descriptor; detached when dropped or
/// [detached](Self::detach).
#[derive(Debug)]
pub struct AttachedLoop<'f> {
    device: Option<LoopDevice>,
    number: (u32, u32),
    /// `loopN`, from sysfs.
    name: String,
    backing: &'f File,
    /// The backing description's status flags before the attach, put back after the detach.
    backing_flags: OFlag,
    direct_io: bool,
}

impl<'f> AttachedLoop<'f> {
    /// Attaches a free loop device to `backing`, showing `size_limit` bytes from `offset`, with
    /// autoclear, and direct I/O when `direct_io` is asked for and the kernel accepts it.
    pub fn attach(
        backing: &'f File,
        offset: u64,
        size_limit: u64,
        direct_io: bool,
    ) -> Result<Self> {
        let backing_flags = status_flags(backing)?;
        let control = LoopControl::open().map_err(|e| {
            Error::io(
                "opening /dev/loop-control (is the loop module loaded, and does the daemon run \
                 as root?)",
                e,
            )
        })?;
        for _ in 0..ATTACH_ATTEMPTS {
            let device = control
                .next_free()
                .map_err(|e| Error::io("finding a free loop device (LOOP_CTL_GET_FREE)", e))?;
            let attached = device
                .with()
                .offset(offset)
                .size_limit(size_limit)
                .autoclear(true)
                .attach_fd(backing.as_raw_fd());
            match attached {
                Ok(()) => return Self::attached(device, backing, backing_flags, direct_io),
                // Another process attached it between GET_FREE and SET_FD: take the next.
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) => continue,
                Err(error) => {
                    return Err(Error::io(
                        "attaching the output to a loop device (LOOP_SET_FD, LOOP_SET_STATUS64)",
                        error,
                    ))
                }
            }
        }
        Err(Error::io(
            "attaching the output to a loop device",
            std::io::Error::new(
                std::io::ErrorKind::ResourceBusy,
                format!(
                    "every free loop device was taken by another process first \
                     ({ATTACH_ATTEMPTS} tries); retry the job"
                ),
            ),
        ))
    }

    /// Wraps a freshly attached device at once, so any later failure still detaches it.
    fn attached(
        device: LoopDevice,
        backing: &'f File,
        backing_flags: OFlag,
        want_direct_io: bool,
    ) -> Result<Self> {
        let number = match (device.major(), device.minor()) {
            (Ok(major), Ok(minor)) => (major, minor),
            (Err(error), _) | (_, Err(error)) => {
                let _ = device.detach();
                return Err(Error::io("fstat on the attached loop device", error));
            }
        };
        let mut attached = Self {
            device: Some(device),
            number,
            name: block_device_name(number)
                .unwrap_or_else(|| format!("loop?{}:{}", number.0, number.1)),
            backing,
            backing_flags,
            direct_io: false,
        };
        if want_direct_io {
            attached.enable_direct_io();
        }
        tracing::debug!(
            device = %attached.name,
            direct_io = attached.direct_io,
            "output attached to a loop device"
        );
        Ok(attached)
    }

    fn enable_direct_io(&mut self) {
        let Some(device) = &self.device else { return };
        match device.set_direct_io(true) {
            Ok(()) => {
                // The kernel may quietly keep buffered I/O; believe sysfs.
                self.direct_io = read_sysfs(&self.name, "dio").as_deref() == Some("1");
                if !self.direct_io {
                    tracing::info!(device = %self.name, "the loop device kept buffered I/O");
                }
            }
            Err(error) => tracing::info!(
                device = %self.name,
                %error,
                "the output does not allow direct I/O through a loop device (unaligned offset or \
                 no O_DIRECT on its file system); writing through the page cache"
            ),
        }
    }

    /// `(major, minor)` of the loop device, for the dm table.
    pub fn device_number(&self) -> (u32, u32) {
        self.number
    }

    /// The kernel's name, `loopN`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/dev").join(&self.name)
    }

    /// Whether the loop driver writes to the output with direct I/O.
    pub fn is_direct_io(&self) -> bool {
        self.direct_io
    }

    /// Detaches the device and puts the output descriptor's status flags back.
    pub fn detach(mut self) -> Result<Detached> {
        self.detach_now()
    }

    fn detach_now(&mut self) -> Result<Detached> {
        let Some(device) = self.device.take() else {
            return Ok(Detached::Done);
        };
        let cleared = match device.detach() {
            // ENXIO: autoclear already unbound it.
            Err(error) if error.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            other => other,
        };
        // The kernel finishes the detach on the last close: ours.
        drop(device);
        let outcome = if wait_until_unbound(&self.name, UNBIND_WAIT) {
            Detached::Done
        } else {
            Detached::Pending
        };
        // The loop driver shares the output's open file description with the client; whatever
        // it changed there (kernels differ on O_DIRECT), the client and the job's header write
        // after us get the flags the client set.
        let restored = match status_flags(self.backing) {
            Ok(now) if now != self.backing_flags => {
                fcntl(self.backing, FcntlArg::F_SETFL(self.backing_flags))
                    .map(drop)
                    .map_err(|e| Error::io("restoring the output's status flags (F_SETFL)", e))
            }
            Ok(_) => Ok(()),
            Err(error) => Err(error),
        };
        cleared.map_err(|e| Error::io(format!("detaching {} (LOOP_CLR_FD)", self.name), e))?;
        restored?;
        Ok(outcome)
    }
}

impl Drop for AttachedLoop<'_> {
    fn drop(&mut self) {
        match self.detach_now() {
            Ok(Detached::Done) => {}
            Ok(Detached::Pending) => tracing::warn!(
                device = %self.name,
                "the loop device is still held; autoclear detaches it when released"
            ),
            Err(error) => {
                tracing::warn!(device = %self.name, %error, "could not detach the loop device")
            }
        }
    }
}

/// The kernel's name of block device `major:minor` (`loop3`, `dm-0`), from
/// `/sys/dev/block/MAJ:MIN`.
pub fn block_device_name((major, minor): (u32, u32)) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    link.file_name()?.to_str().map(str::to_string)
}

/// `/sys/block/<name>/loop/<attribute>`, trimmed; `None` when the device is not bound (the
/// `loop` directory exists only while it is).
pub fn read_sysfs(name: &str, attribute: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/{name}/loop/{attribute}"))
        .ok()
        .map(|text| text.trim_end().to_string())
}

/// Whether loop device `name` is bound to a file.
pub fn is_bound(name: &str) -> bool {
    read_sysfs(name, "backing_file").is_some()
}

fn wait_until_unbound(name: &str, limit: Duration) -> bool {
    let started = Instant::now();
    loop {
        if !is_bound(name) {
            return true;
        }
        if started.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Detaches the loop device `number` if it is bound (for the start-up sweep, which finds loop
/// devices under stale mappings). Returns whether it was bound.
pub fn detach_by_number(number: (u32, u32)) -> Result<Option<(String, Detached)>> {
    let Some(name) = block_device_name(number) else {
        return Ok(None);
    };
    if !is_bound(&name) {
        return Ok(None);
    }
    let path = PathBuf::from("/dev").join(&name);
    // Makes the node if /dev lacks it; removes it again when dropped.
    let node = BlockNode::open(&path, number, 0)?;
    let device =
        LoopDevice::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    match device.detach() {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::ENXIO) => {}
        Err(error) => return Err(Error::io(format!("detaching {name} (LOOP_CLR_FD)"), error)),
    }
    drop(device);
    drop(node);
    let outcome = if wait_until_unbound(&name, UNBIND_WAIT) {
        Detached::Done
    } else {
        Detached::Pending
    };
    Ok(Some((name, outcome)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn output_file(len: u64) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        file.as_file().set_len(len).unwrap();
        file
    }

    /// Attaches a real descriptor, checks everything sysfs says about the device, writes through
    /// it, and detaches leaving nothing.
    #[test]
    fn attach_by_descriptor_then_detach_leaves_nothing() {
        let output = output_file(8 << 20);
        let before = status_flags(output.as_file()).unwrap();
        let offset = 1 << 20;
        let limit = 4 << 20;
        let attached = AttachedLoop::attach(output.as_file(), offset, limit, true).unwrap();
        let name = attached.name().to_string();
        assert!(name.starts_with("loop"), "{name}");
        assert_eq!(attached.device_number().0, LOOP_MAJOR);
        assert_eq!(
            block_device_name(attached.device_number()).as_deref(),
            Some(name.as_str())
        );

        let backing = read_sysfs(&name, "backing_file").unwrap();
        assert_eq!(
            PathBuf::from(&backing),
            output.path().canonicalize().unwrap()
        );
        assert_eq!(read_sysfs(&name, "offset").as_deref(), Some("1048576"));
        assert_eq!(read_sysfs(&name, "sizelimit").as_deref(), Some("4194304"));
        assert_eq!(read_sysfs(&name, "autoclear").as_deref(), Some("1"));
        // /tmp is ext4: the aligned attach gets direct I/O.
        assert!(attached.is_direct_io());
        assert_eq!(read_sysfs(&name, "dio").as_deref(), Some("1"));

        // The device shows `limit` bytes starting at `offset` of the output.
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(attached.path())
            .unwrap();
        assert_eq!(crate::sys::storage::size_of(&device).unwrap(), limit);
        device.write_all_at(b"through the loop", 4096).unwrap();
        device.sync_all().unwrap();
        drop(device);
        let mut back = [0u8; 16];
        output
            .as_file()
            .read_exact_at(&mut back, offset + 4096)
            .unwrap();
        assert_eq!(&back, b"through the loop");

        assert_eq!(attached.detach().unwrap(), Detached::Done);
        assert!(!is_bound(&name), "{name} is still bound");
        assert_eq!(status_flags(output.as_file()).unwrap(), before);
        let listed = std::process::Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "BACK-FILE"])
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(
            !listed.contains(output.path().to_str().unwrap()),
            "losetup still lists the output: {listed}"
        );
    }

    #[test]
    fn dropping_detaches_and_so_does_autoclear() {
        let output = output_file(2 << 20);
        let name = {
            let attached = AttachedLoop::attach(output.as_file(), 0, 2 << 20, false).unwrap();
            assert!(!attached.is_direct_io());
            assert_eq!(read_sysfs(attached.name(), "dio").as_deref(), Some("0"));
            attached.name().to_string()
        };
        assert!(!is_bound(&name));

        // What a SIGKILLed daemon leaves: no detach call at all, only the close of our
        // descriptor, after which autoclear unbinds the device.
        let mut attached = AttachedLoop::attach(output.as_file(), 0, 2 << 20, false).unwrap();
        let name = attached.name().to_string();
        drop(attached.device.take());
        assert!(
            wait_until_unbound(&name, UNBIND_WAIT),
            "autoclear did not detach {name}"
        );
    }

    #[test]
    fn detach_by_number_detaches_a_bound_device_only() {
        let output = output_file(1 << 20);
        let attached = AttachedLoop::attach(output.as_file(), 0, 1 << 20, false).unwrap();
        let number = attached.device_number();
        let name = attached.name().to_string();
        // Keep our descriptor but detach through another path, as the sweep does.
        let (detached, outcome) = detach_by_number(number).unwrap().unwrap();
        assert_eq!(detached, name);
        // We still hold it open, so the unbind waits for our close.
        assert_eq!(outcome, Detached::Pending);
        assert_eq!(attached.detach().unwrap(), Detached::Done);
        assert_eq!(detach_by_number(number).unwrap(), None);
    }

    #[test]
    fn a_read_only_descriptor_cannot_be_attached_writable() {
        let output = output_file(1 << 20);
        let read_only = File::open(output.path()).unwrap();
        // LOOP_SET_FD accepts it but makes the device read-only; prove the device refuses writes
        // rather than writing the file anyway.
        let attached = AttachedLoop::attach(&read_only, 0, 1 << 20, false).unwrap();
        let ro = std::fs::read_to_string(format!("/sys/block/{}/ro", attached.name())).unwrap();
        assert_eq!(ro.trim(), "1");
        attached.detach().unwrap();
    }
}
