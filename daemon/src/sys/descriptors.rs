//! Checks on descriptors a client passed, before the daemon uses them.
//!
//! The daemon runs as root, so the kernel's permission checks happened when the *client* opened
//! each file; the descriptor's access mode is the only record of what the client was allowed to
//! do. We therefore act only within that mode: a source must be readable, an output must have
//! been opened read-write, and nothing is ever reopened (no `/proc/self/fd/N`), which would let
//! a read-only or `O_PATH` descriptor become a writable one.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::error::Descriptor;
use crate::sys::storage::{storage_kind, StorageKind};
use crate::{Error, Result};

/// A passed descriptor that passed its checks.
#[derive(Debug)]
pub struct CheckedFile {
    /// The descriptor, as a `File` for positioned I/O.
    pub file: File,
    /// What it refers to: a regular file or a block device.
    pub kind: StorageKind,
}

impl CheckedFile {
    /// Whether two checked files are the same inode (the same file under any name).
    pub fn same_file_as(&self, other: &CheckedFile) -> Result<bool> {
        Ok(identity(&self.file)? == identity(&other.file)?)
    }
}

/// A source image: readable, regular file or block device.
pub fn check_source(fd: OwnedFd) -> Result<CheckedFile> {
    check_readable_image(fd, Descriptor::Source)
}

/// An output image: regular file or block device opened read-write, without `O_APPEND`.
pub fn check_output(fd: OwnedFd) -> Result<CheckedFile> {
    check_writable_image(fd, Descriptor::Output)
}

/// An image the daemon only reads (`which` names its role in messages): readable, regular file
/// or block device.
pub fn check_readable_image(fd: OwnedFd, which: Descriptor) -> Result<CheckedFile> {
    let flags = status_flags(&fd, which)?;
    if !readable(flags) {
        return Err(Error::bad_descriptor(
            which,
            format!("not opened for reading: open the {which} image read-only (O_RDONLY)"),
        ));
    }
    let file = File::from(fd);
    let kind = image_kind(&file, which)?;
    Ok(CheckedFile { file, kind })
}

/// An image the daemon writes (`which` names its role): regular file or block device opened
/// read-write, without `O_APPEND`.
pub fn check_writable_image(fd: OwnedFd, which: Descriptor) -> Result<CheckedFile> {
    let flags = status_flags(&fd, which)?;
    if flags & OFlag::O_ACCMODE != OFlag::O_RDWR {
        return Err(Error::bad_descriptor(
            which,
            format!(
                "not opened read-write: the daemon writes only through a descriptor the client \
                 opened with O_RDWR; open the {which} read-write"
            ),
        ));
    }
    if flags.contains(OFlag::O_APPEND) {
        return Err(Error::bad_descriptor(
            which,
            "opened with O_APPEND, which would send every positioned write to the end of the \
             file; open it without O_APPEND",
        ));
    }
    let file = File::from(fd);
    let kind = image_kind(&file, which)?;
    refuse_set_id(&file, which)?;
    Ok(CheckedFile { file, kind })
}

/// Refuses a set-user-ID or set-group-ID file as something the daemon writes.
///
/// The daemon writes as root. The kernel clears set-id bits on a write only when the writer
/// lacks `CAP_FSETID` (dropped at start-up, see `sys::capabilities`), and a group member who
/// may write a `root:group 4775` program must never get root's content into it: whoever can
/// write such a file could otherwise have a program of their choice (a decrypted image they
/// crafted) run with its owner's rights. No real output is set-id (imgctl creates
/// `OUT.partial` with mode 0600), so refusing costs nothing.
fn refuse_set_id(file: &File, which: Descriptor) -> Result<()> {
    let mode = file
        .metadata()
        .map_err(|e| Error::io(format!("fstat on the {which} descriptor"), e))?
        .mode();
    let set_id = mode & (libc::S_ISUID | libc::S_ISGID);
    if set_id != 0 {
        let bits = match (mode & libc::S_ISUID != 0, mode & libc::S_ISGID != 0) {
            (true, true) => "set-user-ID and set-group-ID bits",
            (true, false) => "set-user-ID bit",
            _ => "set-group-ID bit",
        };
        return Err(Error::bad_descriptor(
            which,
            format!(
                "has the {bits} (mode {:04o}): the daemon will not write into a file that runs \
                 with its owner's rights; write to a new file, or `chmod ug-s` it first",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// A key file descriptor: readable. Its type and contents are the key reader's business
/// (`keys::read_key_file`), which refuses anything but a regular file.
pub fn check_key(fd: OwnedFd) -> Result<File> {
    let flags = status_flags(&fd, Descriptor::Key)?;
    if !readable(flags) {
        return Err(Error::bad_descriptor(
            Descriptor::Key,
            "not opened for reading: open the key file read-only",
        ));
    }
    Ok(File::from(fd))
}

/// A streamed output ([`imgcrypt_proto::stream`]): a pipe (FIFO) opened for writing. The
/// kind is `Other`; nothing positioned, sized or synced is ever done with it.
pub fn check_stream_output(fd: OwnedFd) -> Result<CheckedFile> {
    let flags = status_flags(&fd, Descriptor::Output)?;
    let file = File::from(fd);
    let kind = storage_kind(&file)?;
    let is_fifo = file
        .metadata()
        .map_err(|e| Error::io("fstat on the output descriptor", e))?
        .file_type()
        .is_fifo();
    if !is_fifo {
        let what = kind.description();
        return Err(Error::bad_descriptor(
            Descriptor::Output,
            format!(
                "is {what}, but a streamed output (the stream parameter) must be a pipe's write \
                 end: pass a pipe, or drop the stream parameter to write the image into the \
                 file at offsets"
            ),
        ));
    }
    let mode = flags & OFlag::O_ACCMODE;
    if mode != OFlag::O_WRONLY && mode != OFlag::O_RDWR {
        return Err(Error::bad_descriptor(
            Descriptor::Output,
            "is a pipe not opened for writing: pass the pipe's write end",
        ));
    }
    Ok(CheckedFile { file, kind })
}

/// The saved header of an interrupted stream: a readable regular file of at most `max_len`
/// bytes (read whole into daemon memory, so its size is bounded before anything is read).
/// Returns the file and its length.
pub fn check_resume_header(fd: OwnedFd, max_len: u64) -> Result<(File, u64)> {
    let which = Descriptor::ResumeHeader;
    let flags = status_flags(&fd, which)?;
    if !readable(flags) {
        return Err(Error::bad_descriptor(
            which,
            "not opened for reading: open the saved header read-only",
        ));
    }
    let file = File::from(fd);
    if storage_kind(&file)? != StorageKind::RegularFile {
        return Err(Error::bad_descriptor(
            which,
            "is not a regular file: pass the header file saved from the interrupted stream",
        ));
    }
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("fstat on the {which} descriptor"), e))?
        .len();
    if len == 0 || len > max_len {
        return Err(Error::bad_descriptor(
            which,
            format!(
                "is {len} bytes; a saved LUKS header is between 1 byte and {max_len} bytes: \
                 pass the header file saved from the interrupted stream"
            ),
        ));
    }
    Ok((file, len))
}

/// The descriptor's status flags. `O_PATH` descriptors grant no I/O at all and are refused
/// here, before anything else looks at them.
fn status_flags(fd: &OwnedFd, which: Descriptor) -> Result<OFlag> {
    let bits = fcntl(fd.as_fd(), FcntlArg::F_GETFL)
        .map_err(|e| Error::io(format!("fcntl(F_GETFL) on the {which} descriptor"), e))?;
    let flags = OFlag::from_bits_retain(bits);
    if flags.contains(OFlag::O_PATH) {
        return Err(Error::bad_descriptor(
            which,
            "is an O_PATH descriptor, which grants no access to the file's contents",
        ));
    }
    Ok(flags)
}

fn readable(flags: OFlag) -> bool {
    let mode = flags & OFlag::O_ACCMODE;
    mode == OFlag::O_RDONLY || mode == OFlag::O_RDWR
}

fn image_kind(file: &File, which: Descriptor) -> Result<StorageKind> {
    match storage_kind(file)? {
        StorageKind::Other(what) => Err(Error::bad_descriptor(
            which,
            format!("is {what}; images must be regular files or block devices"),
        )),
        kind => Ok(kind),
    }
}

fn identity(file: &File) -> Result<(u64, u64)> {
    let metadata = file.metadata().map_err(|e| Error::io("fstat", e))?;
    Ok((metadata.dev(), metadata.ino()))
}

/// Closes descriptors a client passed (or anything holding them: a job's work not run) on a
/// blocking thread, never on an async worker: the last close of a file on FUSE sends FLUSH, and
/// a user's file system that never answers it would freeze the worker (two would freeze the
/// daemon). Outside a runtime (unit tests) they are closed here.
pub fn close_in_background<T: Send + 'static>(held: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(held))),
        Err(_) => drop(held),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    fn open(path: &std::path::Path, options: &mut OpenOptions) -> OwnedFd {
        OwnedFd::from(options.open(path).unwrap())
    }

    /// Stands for a FUSE file whose FLUSH is not answered: its drop blocks until released.
    struct StuckClose {
        release: std::sync::mpsc::Receiver<()>,
        closed_on: std::sync::mpsc::Sender<std::thread::ThreadId>,
    }

    impl Drop for StuckClose {
        fn drop(&mut self) {
            let _ = self.release.recv_timeout(std::time::Duration::from_secs(5));
            let _ = self.closed_on.send(std::thread::current().id());
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_close_that_never_returns_does_not_hold_the_async_thread() {
        let (release, release_rx) = std::sync::mpsc::channel();
        let (closed_on_tx, closed_on) = std::sync::mpsc::channel();
        let started = std::time::Instant::now();
        close_in_background(StuckClose {
            release: release_rx,
            closed_on: closed_on_tx,
        });
        // The runtime's only thread goes on at once.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        release.send(()).unwrap();
        let thread = closed_on
            .recv_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        assert_ne!(thread, std::thread::current().id());
    }

    #[test]
    fn read_only_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"").unwrap();
        let err = check_output(open(&path, OpenOptions::new().read(true))).unwrap_err();
        assert!(matches!(
            err,
            Error::BadDescriptor {
                descriptor: Descriptor::Output,
                ..
            }
        ));
        assert!(err.to_string().contains("read-write"), "{err}");
    }

    #[test]
    fn write_only_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let err =
            check_output(open(&path, OpenOptions::new().write(true).create(true))).unwrap_err();
        assert!(err.to_string().contains("read-write"), "{err}");
    }

    #[test]
    fn append_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let fd = open(
            &path,
            OpenOptions::new().read(true).append(true).create(true),
        );
        let err = check_output(fd).unwrap_err();
        assert!(err.to_string().contains("O_APPEND"), "{err}");
    }

    #[test]
    fn read_write_regular_output_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let checked = check_output(open(
            &path,
            OpenOptions::new().read(true).write(true).create(true),
        ))
        .unwrap();
        assert_eq!(checked.kind, StorageKind::RegularFile);
    }

    #[test]
    fn o_path_descriptor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src");
        std::fs::write(&path, b"data").unwrap();
        let fd = open(
            &path,
            OpenOptions::new().read(true).custom_flags(libc::O_PATH),
        );
        let err = check_source(fd).unwrap_err();
        assert!(err.to_string().contains("O_PATH"), "{err}");
    }

    #[test]
    fn directory_source_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_source(open(dir.path(), OpenOptions::new().read(true))).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
    }

    #[test]
    fn write_only_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let err = check_key(open(&path, OpenOptions::new().write(true).create(true))).unwrap_err();
        assert!(matches!(
            err,
            Error::BadDescriptor {
                descriptor: Descriptor::Key,
                ..
            }
        ));
        assert!(check_key(open(&path, OpenOptions::new().read(true))).is_ok());
    }

    #[test]
    fn set_id_outputs_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for (mode, words) in [
            (0o4775, "set-user-ID bit (mode 4775)"),
            (0o2775, "set-group-ID bit (mode 2775)"),
            (0o6755, "set-user-ID and set-group-ID bits (mode 6755)"),
        ] {
            let path = dir.path().join(format!("out{mode:o}"));
            std::fs::write(&path, b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err =
                check_output(open(&path, OpenOptions::new().read(true).write(true))).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::BadDescriptor {
                        descriptor: Descriptor::Output,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(err.to_string().contains(words), "{err}");
            assert_eq!(std::fs::read(&path).unwrap(), b"#!/bin/sh\n");
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
                mode,
                "the refusal changes nothing"
            );
        }
        // Executable without set-id bits is an ordinary file to write.
        let path = dir.path().join("plain");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o775)).unwrap();
        check_output(open(&path, OpenOptions::new().read(true).write(true))).unwrap();
    }

    #[test]
    fn same_file_under_two_descriptors_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").unwrap();
        let a = check_source(open(&path, OpenOptions::new().read(true))).unwrap();
        let b = check_output(open(&path, OpenOptions::new().read(true).write(true))).unwrap();
        assert!(a.same_file_as(&b).unwrap());
    }

    #[test]
    fn a_stream_output_is_a_pipe_write_end_and_nothing_else() {
        let (read, write) = nix::unistd::pipe().unwrap();
        let checked = check_stream_output(write).unwrap();
        assert!(matches!(checked.kind, StorageKind::Other(_)));
        let err = check_stream_output(read).unwrap_err().to_string();
        assert!(err.contains("pass the pipe's write end"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let err = check_stream_output(open(
            &path,
            OpenOptions::new().read(true).write(true).create(true),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("is a regular file") && err.contains("must be a pipe's write end"),
            "{err}"
        );
    }

    #[test]
    fn a_resume_header_is_a_bounded_readable_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("header");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let (_, len) =
            check_resume_header(open(&path, OpenOptions::new().read(true)), 8192).unwrap();
        assert_eq!(len, 8192);
        let err = check_resume_header(open(&path, OpenOptions::new().read(true)), 4096)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is 8192 bytes") && err.contains("4096 bytes"),
            "{err}"
        );
        let err = check_resume_header(open(&path, OpenOptions::new().write(true)), 8192)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not opened for reading"), "{err}");
        let (read, _write) = nix::unistd::pipe().unwrap();
        let err = check_resume_header(read, 8192).unwrap_err();
        assert!(
            matches!(
                err,
                Error::BadDescriptor {
                    descriptor: Descriptor::ResumeHeader,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
