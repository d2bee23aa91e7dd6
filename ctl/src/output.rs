//! The output file's life: created as `OUT.partial`, renamed to `OUT` only once the daemon has
//! made the data durable, and removed on any failure or interruption, so nothing half-written
//! ever sits under the final name.
//!
//! The exceptions are the files the daemon resumes on the next run: a re-encryption's new image,
//! `IMAGE.reencrypt.partial` ([`ReencryptOutput`]), and an encryption's raw LUKS `OUT.partial`
//! ([`Output::create_resumable`]). They are kept on interruption (Ctrl-C, SIGTERM, the daemon
//! going away or stopping) with advice on resuming or discarding them; they are not valid
//! images meanwhile (a raw LUKS partial's header has its magic masked until the end). A run of
//! `encrypt` that finds `OUT.partial` opens it without truncating it and lets the daemon resume
//! or restart it; `--force` removes it first (start over, never resume).
//!
//! Interruption is handled by a signal thread (SIGINT, SIGTERM, SIGHUP are blocked in every
//! other thread and waited for there), which can take the same lock as the rename: either the
//! rename happened and the signal finds nothing to remove, or the partial file is removed and the
//! rename never happens.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::sys::signal::{SigSet, Signal};

use crate::error::{CtlError, Result};

/// What the signal thread must do about a partial file if we are interrupted.
static PENDING_PARTIAL: Mutex<Option<OnInterrupt>> = Mutex::new(None);

enum OnInterrupt {
    /// Remove the file: nothing can use it.
    Remove(PathBuf),
    /// Keep the file (it can be resumed) and tell the user so.
    Keep(String),
    /// An S3 upload is under way: its state is kept (it can be resumed); tell the user so.
    Upload(String),
    /// Keep the file with this advice unless it is empty and this run created it (nothing to
    /// resume), then remove it.
    KeepUnlessEmpty {
        path: PathBuf,
        created: bool,
        advice: String,
    },
}

impl OnInterrupt {
    /// Does what the registration says; the text for the user.
    fn apply(self) -> String {
        match self {
            Self::Remove(path) => {
                let _ = std::fs::remove_file(&path);
                format!("interrupted; removed {}", path.display())
            }
            Self::Keep(message) | Self::Upload(message) => message,
            Self::KeepUnlessEmpty {
                path,
                created,
                advice,
            } => {
                let empty = std::fs::metadata(&path)
                    .map(|m| m.len() == 0)
                    .unwrap_or(true);
                if created && empty {
                    let _ = std::fs::remove_file(&path);
                    format!("interrupted; removed {}", path.display())
                } else {
                    format!("interrupted: {advice}")
                }
            }
        }
    }
}

/// Blocks the termination signals in this thread (and every thread it starts) and starts the
/// thread that handles them. Call first thing in `main`.
pub fn install_interrupt_cleanup() {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(signal);
    }
    if signals.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        let Ok(signal) = signals.wait() else { return };
        let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(action) = pending.take() {
            eprintln!("\nimgctl: {}", action.apply());
        }
        // 128 + signal number, as shells report it.
        std::process::exit(128 + signal as i32);
    });
}

/// Registers what to say if we are interrupted during an S3 upload (`Some`), or ends that
/// registration (`None`). The upload's state is written atomically after each part, so there is
/// nothing to clean up: the message says how to resume or abort. A pending output file's
/// registration is left alone (it comes first; the caller uploads after writing it).
pub fn upload_interrupt_message(message: Option<String>) {
    let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
    match (message, pending.as_ref()) {
        (Some(message), None | Some(OnInterrupt::Upload(_))) => {
            *pending = Some(OnInterrupt::Upload(message))
        }
        (None, Some(OnInterrupt::Upload(_))) => *pending = None,
        _ => {}
    }
}

/// Where the encrypted image goes.
pub enum Output {
    /// A regular file, written as `final_path.partial` first.
    File(PartialFile),
    /// A block device, written in place (there is nothing to rename).
    Device {
        /// The device node.
        path: PathBuf,
        /// Opened read-write and exclusively (fails if mounted or in use).
        file: File,
    },
}

impl Output {
    /// Prepares `path` for writing. Refuses to replace anything without `force`.
    pub fn create(path: &Path, force: bool) -> Result<Self> {
        Self::create_inner(path, force, false)
    }

    fn create_inner(path: &Path, force: bool, resumable: bool) -> Result<Self> {
        match std::fs::metadata(path) {
            Ok(metadata) if metadata.file_type().is_block_device() => {
                if !force {
                    return Err(CtlError::File {
                        path: path.to_path_buf(),
                        message: "is a block device; pass --force to overwrite it".to_string(),
                    });
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
                    .open(path)
                    .map_err(|e| {
                        CtlError::file(
                            path,
                            "open the device exclusively (is it mounted or in use?)",
                            e,
                        )
                    })?;
                Ok(Self::Device {
                    path: path.to_path_buf(),
                    file,
                })
            }
            Ok(metadata) if metadata.is_dir() => Err(CtlError::File {
                path: path.to_path_buf(),
                message: "is a directory; name the output file, e.g. -o dir/disk.luks".to_string(),
            }),
            Ok(_) if !force => Err(CtlError::File {
                path: path.to_path_buf(),
                message: "already exists; pass --force to replace it".to_string(),
            }),
            _ => PartialFile::create(path, force, resumable).map(Self::File),
        }
    }

    /// [`Self::create`] for an output the daemon can resume (an encryption's raw LUKS): an
    /// existing `OUT.partial` is opened read-write without truncation for the daemon to resume
    /// (or restart, saying why); `force` removes it first. On interruption it is kept.
    pub fn create_resumable(path: &Path, force: bool) -> Result<Self> {
        Self::create_inner(path, force, true)
    }

    /// After a failure: a resumable partial file that holds progress is kept (an earlier
    /// run's always, since this run did not make it) when `interrupted` (the daemon stopped or
    /// went away), and the advice on resuming it is returned; anything else is removed.
    pub fn abandon(self, interrupted: bool) -> Option<String> {
        let Self::File(mut partial) = self else {
            return None;
        };
        if partial.kept(interrupted) {
            partial.committed = true;
            forget_pending();
            return Some(format!(
                "{} is kept (it is not a valid image yet): {}",
                partial.partial_path.display(),
                encrypt_resume_advice(&partial.partial_path)
            ));
        }
        None
    }

    /// The descriptor the daemon writes to.
    pub fn file(&self) -> &File {
        match self {
            Self::File(partial) => &partial.file,
            Self::Device { file, .. } => file,
        }
    }

    /// Leaves the output to a detached job: `OUT.partial` stays (neither removed now nor on an
    /// interrupt from here on) for `imgctl wait` to rename once the job succeeded.
    pub fn leave_to_detached_job(self) {
        match self {
            Self::File(mut partial) => {
                let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
                *pending = None;
                // Not committed, but not ours to remove either: the job writes it on.
                partial.committed = true;
            }
            Self::Device { .. } => {}
        }
    }

    /// Gives the data its final name; called only after the daemon reported it durable.
    pub fn commit(self) -> Result<PathBuf> {
        match self {
            Self::File(partial) => partial.commit(),
            Self::Device { path, .. } => Ok(path),
        }
    }
}

/// `OUT.partial`, removed on drop unless committed.
pub struct PartialFile {
    file: File,
    partial_path: PathBuf,
    final_path: PathBuf,
    committed: bool,
    /// The daemon can resume it: kept on interruption.
    resumable: bool,
    /// An earlier run's file, reopened.
    reopened: bool,
}

impl PartialFile {
    fn create(final_path: &Path, force: bool, resumable: bool) -> Result<Self> {
        let partial_path = partial_path(final_path);
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                // A resumable partial lives long and holds the keyslot from early on: private
                // to its owner (and so is the finished image; `chmod` it to share it).
                .mode(if resumable { 0o600 } else { 0o666 })
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&partial_path)
        };
        let advice = encrypt_resume_advice(&partial_path);
        let on_interrupt = |created: bool| {
            if resumable {
                OnInterrupt::KeepUnlessEmpty {
                    path: partial_path.clone(),
                    created,
                    advice: advice.clone(),
                }
            } else {
                OnInterrupt::Remove(partial_path.clone())
            }
        };
        // Register before creating, so an interrupt between the two still cleans up.
        *PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner()) = Some(on_interrupt(true));
        let mut reopened = false;
        let file = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && force => {
                std::fs::remove_file(&partial_path).map_err(|e| {
                    CtlError::file(&partial_path, "remove the stale partial file", e)
                })?;
                open()
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && resumable => {
                // An earlier run's: the daemon resumes it, or restarts it and says why.
                reopened = true;
                *PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(on_interrupt(false));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                    .open(&partial_path);
                match file {
                    Ok(file) => match reopen_refusal(&file) {
                        None => Ok(file),
                        Some(why) => {
                            forget_pending();
                            return Err(CtlError::File {
                                path: partial_path,
                                message: format!(
                                    "{why}: it is not resumed; delete it or pass --force to \
                                     start over"
                                ),
                            });
                        }
                    },
                    Err(e) => Err(e),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                forget_pending();
                return Err(CtlError::File {
                    path: partial_path,
                    message: "already exists, probably left by an interrupted run: remove it or \
                              pass --force"
                        .to_string(),
                });
            }
            other => other,
        }
        .map_err(|e| {
            forget_pending();
            CtlError::file(&partial_path, "create the output", e)
        })?;
        Ok(Self {
            file,
            partial_path,
            final_path: final_path.to_path_buf(),
            committed: false,
            resumable,
            reopened,
        })
    }

    /// Whether an uncommitted partial file stays when the run ends without success: a
    /// resumable one that an earlier run left (it may hold hours of checkpointed work, and
    /// whether the daemon restarted it is not ours to guess), or one this run created that
    /// the daemon stopped, checkpointed, and wrote something into (`interrupted`).
    fn kept(&self, interrupted: bool) -> bool {
        let empty = self.file.metadata().map(|m| m.len() == 0).unwrap_or(true);
        self.resumable && (self.reopened || (interrupted && !empty))
    }

    fn commit(mut self) -> Result<PathBuf> {
        let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::rename(&self.partial_path, &self.final_path).map_err(|e| {
            CtlError::file(&self.final_path, "rename the finished output into place", e)
        })?;
        *pending = None;
        self.committed = true;
        drop(pending);
        sync_directory_of(&self.final_path);
        Ok(self.final_path.clone())
    }
}

impl Drop for PartialFile {
    /// An early error (no daemon, a companion that fails, TooManyJobs) drops the output:
    /// removed, unless [`PartialFile::kept`] says it stays.
    fn drop(&mut self) {
        if !self.committed {
            let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
            if !self.kept(false) {
                let _ = std::fs::remove_file(&self.partial_path);
            }
            *pending = None;
        }
    }
}

/// Creates a new file with `create` while the interrupt handler is held off, and registers it to
/// be removed if we are interrupted before [`keep_on_interrupt`]. Holding the lock across the
/// creation means an interrupt either comes first (nothing was created) or finds the file
/// registered; a failed creation registers nothing, so an existing file is never removed.
pub fn create_removed_on_interrupt<T>(
    path: &Path,
    create: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
    let created = create()?;
    *pending = Some(OnInterrupt::Remove(path.to_path_buf()));
    Ok(created)
}

/// Ends the registration made by [`create_removed_on_interrupt`]; with `remove`, removes the
/// file first (under the same lock, so the interrupt handler never races the removal).
pub fn keep_on_interrupt(path: &Path, remove: bool) {
    let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
    if remove {
        let _ = std::fs::remove_file(path);
    }
    *pending = None;
}

/// Why an existing `OUT.partial` is not ours to resume, if it is not: it must be a regular file
/// we own with no other name (a hard link planted by someone else, or their file, would have
/// the daemon write into a file that is not this run's).
fn reopen_refusal(file: &File) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let metadata = match file.metadata() {
        Ok(metadata) => metadata,
        Err(e) => return Some(format!("cannot be examined ({e})")),
    };
    let euid = nix::unistd::geteuid().as_raw();
    if !metadata.is_file() {
        Some("exists and is not a regular file".to_string())
    } else if metadata.uid() != euid {
        Some(format!(
            "exists and belongs to uid {}, not to you (uid {euid})",
            metadata.uid()
        ))
    } else if metadata.nlink() != 1 {
        Some(format!(
            "exists with {} hard links (an interrupted run leaves it with one)",
            metadata.nlink()
        ))
    } else {
        None
    }
}

/// `OUT.partial` for the final name `OUT`.
pub fn partial_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// A detached job's output directory, opened once (`O_DIRECTORY | O_NOFOLLOW`): the check of
/// `OUT.partial`'s identity and the rename or removal that follows both go through this one
/// descriptor, so nobody can swap the directory (or a link to another one) in between.
struct OutputDirectory {
    dir: std::os::fd::OwnedFd,
    final_name: std::ffi::OsString,
    partial_name: std::ffi::OsString,
}

impl OutputDirectory {
    fn open(final_path: &Path) -> Result<Self> {
        use nix::fcntl::OFlag;
        let final_name = final_path
            .file_name()
            .ok_or_else(|| CtlError::File {
                path: final_path.to_path_buf(),
                message: "has no file name: the job's names are not a file's".to_string(),
            })?
            .to_os_string();
        let directory = match final_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let dir = nix::fcntl::open(
            directory,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| CtlError::file(directory, "open the output's directory", e.into()))?;
        let mut partial_name = final_name.clone();
        partial_name.push(".partial");
        Ok(Self {
            dir,
            final_name,
            partial_name,
        })
    }

    /// Whether `name` in the directory is a regular file (not a link) with `identity`;
    /// `Err` for a name that cannot be examined, `ENOENT` included.
    fn is_job_file(&self, name: &std::ffi::OsStr, identity: (u64, u64)) -> nix::Result<bool> {
        let stat =
            nix::sys::stat::fstatat(&self.dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let regular = stat.st_mode & libc::S_IFMT == libc::S_IFREG;
        Ok(regular && (stat.st_dev, stat.st_ino) == identity)
    }

    /// Renames `OUT.partial` to `OUT` within the directory; without `replace`, fails with
    /// `EEXIST` if `OUT` exists.
    fn rename(&self, replace: bool) -> nix::Result<()> {
        use nix::fcntl::RenameFlags;
        let (from, to) = (self.partial_name.as_os_str(), self.final_name.as_os_str());
        if replace {
            return nix::fcntl::renameat(&self.dir, from, &self.dir, to);
        }
        match nix::fcntl::renameat2(
            &self.dir,
            from,
            &self.dir,
            to,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            // A file system without RENAME_NOREPLACE: check, then rename (a window remains
            // there, for whoever else may write the user's directory).
            Err(nix::errno::Errno::EINVAL) => {
                match nix::sys::stat::fstatat(
                    &self.dir,
                    to,
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Err(nix::errno::Errno::ENOENT) => {
                        nix::fcntl::renameat(&self.dir, from, &self.dir, to)
                    }
                    Ok(_) => Err(nix::errno::Errno::EEXIST),
                    Err(error) => Err(error),
                }
            }
            other => other,
        }
    }

    fn sync(&self) {
        let _ = nix::unistd::fsync(&self.dir);
    }
}

/// Whether `path` is a block device (following links, as [`Output::create`] does): a detached
/// job then wrote it in place, and there is no `OUT.partial` to rename or remove.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Gives a detached job's output its final name, in the user's own process with the user's
/// own rights: renames `OUT.partial` to `OUT` only if the file at `OUT.partial` is still the
/// very file the job wrote (`identity`: `(st_dev, st_ino)` of the daemon's own fstat of the
/// descriptor it was given). Anything else there (replaced, moved, a link) is refused, so
/// nobody who can write the directory makes us rename their file in. The check and the rename
/// go through one descriptor of the directory ([`OutputDirectory`]), and an `OUT` that appeared
/// since the job was submitted is not replaced unless `replace` (`imgctl wait --force`).
/// Idempotent: an output already renamed by an earlier `wait` is reported as done. A block
/// device was written in place: nothing to rename.
pub fn finish_detached(final_path: &Path, identity: (u64, u64), replace: bool) -> Result<PathBuf> {
    if is_block_device(final_path) {
        return Ok(final_path.to_path_buf());
    }
    let dir = OutputDirectory::open(final_path)?;
    let partial = partial_path(final_path);
    let rename_error = |e: nix::errno::Errno| {
        CtlError::file(
            final_path,
            "rename the finished output into place",
            e.into(),
        )
    };
    match dir.is_job_file(&dir.partial_name, identity) {
        Ok(true) => {
            match dir.rename(replace) {
                Ok(()) => {}
                Err(nix::errno::Errno::EEXIST) => {
                    return Err(CtlError::File {
                        path: final_path.to_path_buf(),
                        message: format!(
                            "already exists (it appeared after the job was submitted): not \
                             replacing it; the job's output stays {}: pass --force to replace \
                             the file there",
                            partial.display()
                        ),
                    })
                }
                Err(error) => return Err(rename_error(error)),
            }
            dir.sync();
            Ok(final_path.to_path_buf())
        }
        Ok(false) => Err(CtlError::File {
            path: partial,
            message: "is not the file the job wrote (it was replaced or moved since): not \
                      renaming it; the job's output is the file with the identity `imgctl status` \
                      shows — find it, check it and rename it yourself"
                .to_string(),
        }),
        Err(nix::errno::Errno::ENOENT) => match dir.is_job_file(&dir.final_name, identity) {
            Ok(true) => Ok(final_path.to_path_buf()),
            _ => Err(CtlError::File {
                path: partial,
                message: "does not exist any more, and the output is not under its final \
                          name either: it was moved or removed"
                    .to_string(),
            }),
        },
        Err(error) => Err(CtlError::file(
            &partial,
            "examine the job's output",
            error.into(),
        )),
    }
}

/// Whether the file at `path` is the one with `identity` (not following links).
pub fn is_file_with_identity(path: &Path, identity: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.file_type().is_file() && (m.dev(), m.ino()) == identity)
}

/// Removes a cancelled or failed detached job's `OUT.partial`, but only if it is still the
/// file the job wrote (checked and removed through one descriptor of the directory). Returns
/// whether it did. A block device was written in place: nothing is removed.
pub fn remove_detached_partial(final_path: &Path, identity: (u64, u64)) -> bool {
    if is_block_device(final_path) {
        return false;
    }
    let Ok(dir) = OutputDirectory::open(final_path) else {
        return false;
    };
    dir.is_job_file(&dir.partial_name, identity) == Ok(true)
        && nix::unistd::unlinkat(
            &dir.dir,
            dir.partial_name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .is_ok()
}

fn forget_pending() {
    *PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Makes a rename in `path`'s directory durable. Best effort: the data itself is already synced,
/// and a directory that cannot be opened for reading still took the rename.
fn sync_directory_of(path: &Path) {
    let directory = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let Ok(dir) = File::open(&directory) {
        let _ = dir.sync_all();
    }
}

/// Suffix of the new image a re-encryption writes beside the old one.
pub const REENCRYPT_SUFFIX: &str = ".reencrypt.partial";

/// `IMAGE.reencrypt.partial`.
pub fn reencrypt_partial_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(REENCRYPT_SUFFIX);
    PathBuf::from(name)
}

/// The new image of `rewrite -k --reencrypt`: `IMAGE.reencrypt.partial`, renamed over `IMAGE`
/// only once the daemon reports it durable. Unlike [`PartialFile`] it is kept on failure and on
/// interruption, since the daemon resumes a previous run's file.
pub struct ReencryptOutput {
    file: File,
    partial_path: PathBuf,
    image: PathBuf,
    /// A previous run's file, opened to be resumed.
    resumed: bool,
}

impl ReencryptOutput {
    /// Opens a previous run's `IMAGE.reencrypt.partial` without truncating it, or creates it
    /// (exclusively, mode 0600 less the umask). `image` must be a regular file, since the result
    /// replaces it by rename.
    pub fn open(image: &Path) -> Result<Self> {
        let metadata = std::fs::symlink_metadata(image)
            .map_err(|e| CtlError::file(image, "examine the image", e))?;
        if !metadata.file_type().is_file() {
            return Err(CtlError::File {
                path: image.to_path_buf(),
                message: "is not a regular file: --reencrypt writes a new image beside it and                           renames it over the old one; name the image file itself (not a link                           or a device), or rotate the header only (without --reencrypt)"
                    .to_string(),
            });
        }
        let partial_path = reencrypt_partial_path(image);
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW);
        let (file, resumed) = match options
            .clone()
            .create_new(true)
            .mode(0o600)
            .open(&partial_path)
        {
            Ok(file) => (file, false),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let file = options.open(&partial_path).map_err(|e| {
                    CtlError::file(&partial_path, "open the interrupted re-encryption", e)
                })?;
                let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(false);
                if !is_file {
                    return Err(CtlError::File {
                        path: partial_path,
                        message: "exists and is not a regular file: remove it".to_string(),
                    });
                }
                (file, true)
            }
            Err(e) => return Err(CtlError::file(&partial_path, "create the new image", e)),
        };
        *PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner()) = Some(OnInterrupt::Keep(
            format!("interrupted: {}", resume_advice(&partial_path)),
        ));
        Ok(Self {
            file,
            partial_path,
            image: image.to_path_buf(),
            resumed,
        })
    }

    /// The descriptor the daemon writes the new image to.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// `IMAGE.reencrypt.partial`.
    pub fn path(&self) -> &Path {
        &self.partial_path
    }

    /// Whether a previous run's file is being resumed.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Replaces the image with the new one; called only after the daemon reported it durable.
    /// The new image gets the old one's permission bits, syncs, is renamed over it, and the
    /// rename is synced, so `IMAGE` is at every moment either the old image or the whole new one.
    pub fn commit(self) -> Result<PathBuf> {
        let permissions = std::fs::metadata(&self.image)
            .map_err(|e| CtlError::file(&self.image, "examine the image", e))?
            .permissions();
        self.file
            .set_permissions(permissions)
            .map_err(|e| CtlError::file(&self.partial_path, "copy the image's permissions", e))?;
        self.file
            .sync_all()
            .map_err(|e| CtlError::file(&self.partial_path, "sync the new image", e))?;
        let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::rename(&self.partial_path, &self.image).map_err(|e| {
            CtlError::file(
                &self.image,
                &format!(
                    "replace the image with the finished {} (it is complete: rename it over                      the image yourself)",
                    self.partial_path.display()
                ),
                e,
            )
        })?;
        *pending = None;
        drop(pending);
        sync_directory_of(&self.image);
        Ok(self.image.clone())
    }

    /// After a failure: keeps the file for the next run and returns what to tell the user, or
    /// removes it when this run created it and nothing was written (there is nothing to resume).
    pub fn abandon(self) -> Option<String> {
        let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
        *pending = None;
        let empty = self.file.metadata().map(|m| m.len() == 0).unwrap_or(false);
        if !self.resumed && empty && std::fs::remove_file(&self.partial_path).is_ok() {
            return None;
        }
        Some(format!(
            "{} is kept: {}",
            self.partial_path.display(),
            resume_advice(&self.partial_path)
        ))
    }
}

/// What to do with a kept `OUT.partial` of an encryption.
fn encrypt_resume_advice(partial: &Path) -> String {
    format!(
        "run the same imgctl encrypt command again to resume from its checkpoint (with the same \
         key; another key or a changed source starts over), or delete {} (or pass --force) to \
         start over",
        partial.display()
    )
}

fn resume_advice(partial: &Path) -> String {
    format!(
        "run the same command again to resume from {}, or delete it to start over",
        partial.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_detached_output_is_renamed_only_if_it_is_the_jobs_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.luks");
        let partial = partial_path(&out);
        std::fs::write(&partial, b"the job's").unwrap();
        let metadata = std::fs::metadata(&partial).unwrap();
        let identity = (metadata.dev(), metadata.ino());

        // Replaced by another file under the same name: refused, nothing renamed.
        std::fs::rename(&partial, dir.path().join("moved")).unwrap();
        std::fs::write(&partial, b"someone else's").unwrap();
        let error = finish_detached(&out, identity, false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("is not the file the job wrote"), "{error}");
        assert!(!out.exists());
        // A symbolic link to the job's file is refused too.
        std::fs::remove_file(&partial).unwrap();
        std::os::unix::fs::symlink(dir.path().join("moved"), &partial).unwrap();
        assert!(finish_detached(&out, identity, false).is_err());
        assert!(!out.exists());

        // The job's own file: renamed, and a second wait finds it done.
        std::fs::remove_file(&partial).unwrap();
        std::fs::rename(dir.path().join("moved"), &partial).unwrap();
        assert_eq!(finish_detached(&out, identity, false).unwrap(), out);
        assert_eq!(std::fs::read(&out).unwrap(), b"the job's");
        assert!(!partial.exists());
        assert_eq!(finish_detached(&out, identity, false).unwrap(), out);
    }

    /// The job's file and its identity, at `out`'s partial name.
    fn job_partial(out: &Path, data: &[u8]) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let partial = partial_path(out);
        std::fs::write(&partial, data).unwrap();
        let metadata = std::fs::metadata(&partial).unwrap();
        (metadata.dev(), metadata.ino())
    }

    #[test]
    fn a_detached_output_does_not_replace_a_file_that_appeared_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.luks");
        let identity = job_partial(&out, b"the job's");
        std::fs::write(&out, b"made after submit").unwrap();
        let error = finish_detached(&out, identity, false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("already exists") && error.contains("--force"),
            "{error}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"made after submit");
        assert!(partial_path(&out).exists());
        assert_eq!(finish_detached(&out, identity, true).unwrap(), out);
        assert_eq!(std::fs::read(&out).unwrap(), b"the job's");
        assert!(!partial_path(&out).exists());
    }

    #[test]
    fn a_detached_output_is_not_renamed_or_removed_through_a_linked_directory() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let identity = job_partial(&real.join("disk.luks"), b"the job's");
        // The job's directory, swapped for a link to it after submit: refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let out = link.join("disk.luks");
        assert!(finish_detached(&out, identity, false).is_err());
        assert!(!remove_detached_partial(&out, identity));
        assert!(partial_path(&real.join("disk.luks")).exists());
        assert!(!real.join("disk.luks").exists());
    }

    #[test]
    fn only_the_jobs_own_partial_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.luks");
        let identity = job_partial(&out, b"the job's");
        std::fs::rename(partial_path(&out), dir.path().join("moved")).unwrap();
        std::fs::write(partial_path(&out), b"someone else's").unwrap();
        assert!(!remove_detached_partial(&out, identity));
        assert!(partial_path(&out).exists());
        std::fs::remove_file(partial_path(&out)).unwrap();
        std::fs::rename(dir.path().join("moved"), partial_path(&out)).unwrap();
        assert!(remove_detached_partial(&out, identity));
        assert!(!partial_path(&out).exists());
    }

    #[test]
    fn a_device_output_has_nothing_to_rename() {
        let Some(device) = ["/dev/loop0", "/dev/ram0", "/dev/sda", "/dev/vda"]
            .into_iter()
            .map(Path::new)
            .find(|path| is_block_device(path))
        else {
            panic!("no block device node to test with");
        };
        assert_eq!(finish_detached(device, (0, 0), false).unwrap(), device);
        assert!(!remove_detached_partial(device, (0, 0)));
    }

    #[test]
    fn a_resumable_partial_is_reopened_untruncated_and_kept_only_with_progress() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.luks");
        let partial = dir.path().join("disk.luks.partial");

        // A fresh run that fails outright leaves nothing.
        let output = Output::create_resumable(&out, false).unwrap();
        let mode = std::fs::metadata(&partial).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "a resumable partial is private: {mode:o}");
        assert_eq!(output.abandon(false), None);
        assert!(!partial.exists());

        // Interrupted with progress: kept, with the advice.
        let mut output = Output::create_resumable(&out, false).unwrap();
        if let Output::File(file) = &mut output {
            file.file.write_all(b"progress").unwrap();
        }
        let advice = output.abandon(true).unwrap();
        assert!(
            advice.contains("run the same imgctl encrypt command"),
            "{advice}"
        );
        assert_eq!(std::fs::read(&partial).unwrap(), b"progress");

        // The next run reopens it without truncating, and keeps it whatever fails.
        let output = Output::create_resumable(&out, false).unwrap();
        assert_eq!(std::fs::read(&partial).unwrap(), b"progress");
        assert!(output.abandon(false).is_some());
        assert!(partial.exists());

        // A second name for it is refused (the file is kept as it was).
        let link = dir.path().join("elsewhere");
        std::fs::hard_link(&partial, &link).unwrap();
        let refused = Output::create_resumable(&out, false)
            .err()
            .unwrap()
            .to_string();
        assert!(refused.contains("2 hard links"), "{refused}");
        assert_eq!(std::fs::read(&partial).unwrap(), b"progress");
        std::fs::remove_file(&link).unwrap();
        // Another user's is refused too (root can make one).
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&partial, Some(65534), None).unwrap();
            let refused = Output::create_resumable(&out, false)
                .err()
                .unwrap()
                .to_string();
            assert!(refused.contains("belongs to uid 65534"), "{refused}");
            assert!(partial.exists());
            std::os::unix::fs::chown(&partial, Some(0), None).unwrap();
        }

        // --force starts over; other outputs still refuse a stale partial.
        let output = Output::create_resumable(&out, true).unwrap();
        assert_eq!(std::fs::read(&partial).unwrap(), b"");
        drop(output);
        std::fs::write(&partial, b"stale").unwrap();
        let refused = Output::create(&out, false).err().unwrap().to_string();
        assert!(refused.contains("interrupted run"), "{refused}");
    }

    #[test]
    fn dropping_a_reopened_partial_keeps_it_and_a_fresh_one_goes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.luks");
        let partial = partial_path(&out);

        // This run's own file, dropped by an early error (say no daemon): removed.
        drop(Output::create_resumable(&out, false).unwrap());
        assert!(!partial.exists());

        // An earlier run's checkpointed file, reopened, then dropped by the same early
        // error: kept as it was.
        std::fs::write(&partial, b"hours of work").unwrap();
        drop(Output::create_resumable(&out, false).unwrap());
        assert_eq!(std::fs::read(&partial).unwrap(), b"hours of work");

        // Outputs that cannot resume still remove theirs.
        std::fs::remove_file(&partial).unwrap();
        drop(Output::create(&out, false).unwrap());
        assert!(!partial.exists());
    }

    #[test]
    fn reencrypt_partial_sits_beside_the_image() {
        assert_eq!(
            reencrypt_partial_path(Path::new("/imgs/disk.luks")),
            PathBuf::from("/imgs/disk.luks.reencrypt.partial")
        );
        assert_eq!(
            reencrypt_partial_path(Path::new("disk")),
            PathBuf::from("disk.reencrypt.partial")
        );
    }

    #[test]
    fn fresh_partial_is_private_and_an_empty_one_is_removed_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.luks");
        std::fs::write(&image, b"old").unwrap();
        let output = ReencryptOutput::open(&image).unwrap();
        assert!(!output.resumed());
        let path = output.path().to_path_buf();
        assert_eq!(path, dir.path().join("disk.luks.reencrypt.partial"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        // Nothing written: nothing to resume, so nothing is left.
        assert_eq!(output.abandon(), None);
        assert!(!path.exists());
        assert_eq!(std::fs::read(&image).unwrap(), b"old");
    }

    #[test]
    fn partial_with_progress_is_kept_on_failure_and_resumed_untruncated() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.luks");
        std::fs::write(&image, b"old").unwrap();
        let mut output = ReencryptOutput::open(&image).unwrap();
        let path = output.path().to_path_buf();
        output.file.write_all(b"half").unwrap();
        let note = output.abandon().unwrap();
        assert!(
            note.contains("run the same command again to resume from")
                && note.contains("disk.luks.reencrypt.partial"),
            "{note}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"half");

        let resumed = ReencryptOutput::open(&image).unwrap();
        assert!(resumed.resumed());
        assert_eq!(std::fs::read(&path).unwrap(), b"half");
        assert!(resumed.abandon().is_some());
        assert!(path.exists());

        // A resumed file is kept even when empty: this run did not make it.
        std::fs::write(&path, b"").unwrap();
        let resumed = ReencryptOutput::open(&image).unwrap();
        assert!(resumed.resumed());
        assert!(resumed.abandon().is_some());
        assert!(path.exists());
    }

    #[test]
    fn commit_replaces_the_image_keeping_its_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.luks");
        std::fs::write(&image, b"old").unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut output = ReencryptOutput::open(&image).unwrap();
        let path = output.path().to_path_buf();
        output.file.write_all(b"new image").unwrap();
        assert_eq!(output.commit().unwrap(), image);
        assert_eq!(std::fs::read(&image).unwrap(), b"new image");
        assert!(!path.exists());
        let mode = std::fs::metadata(&image).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640);
    }

    #[test]
    fn reencryption_needs_a_regular_image_file() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.luks");
        std::fs::write(&image, b"old").unwrap();
        let link = dir.path().join("link.luks");
        std::os::unix::fs::symlink(&image, &link).unwrap();
        let error = ReencryptOutput::open(&link).err().unwrap().to_string();
        assert!(error.contains("not a regular file"), "{error}");
        assert!(!reencrypt_partial_path(&link).exists());
        assert!(ReencryptOutput::open(dir.path()).is_err());
        assert!(ReencryptOutput::open(&dir.path().join("absent")).is_err());
    }
}
