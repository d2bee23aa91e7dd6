//! The output file's life: created as `OUT.partial`, renamed to `OUT` only once the daemon has
//! made the data durable, and removed on any failure or interruption, so nothing half-written
//! ever sits under the final name.
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

/// The partial file the signal thread must remove if we are interrupted.
static PENDING_PARTIAL: Mutex<Option<PathBuf>> = Mutex::new(None);

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
        if let Some(path) = pending.take() {
            let _ = std::fs::remove_file(&path);
            eprintln!("\nimgctl: interrupted; removed {}", path.display());
        }
        // 128 + signal number, as shells report it.
        std::process::exit(128 + signal as i32);
    });
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
            _ => PartialFile::create(path, force).map(Self::File),
        }
    }

    /// The descriptor the daemon writes to.
    pub fn file(&self) -> &File {
        match self {
            Self::File(partial) => &partial.file,
            Self::Device { file, .. } => file,
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
}

impl PartialFile {
    fn create(final_path: &Path, force: bool) -> Result<Self> {
        let mut name = final_path.as_os_str().to_owned();
        name.push(".partial");
        let partial_path = PathBuf::from(name);
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o666)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&partial_path)
        };
        // Register before creating, so an interrupt between the two still cleans up.
        *PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner()) = Some(partial_path.clone());
        let file = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && force => {
                std::fs::remove_file(&partial_path).map_err(|e| {
                    CtlError::file(&partial_path, "remove the stale partial file", e)
                })?;
                open()
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
        })
    }

    fn commit(mut self) -> Result<PathBuf> {
        let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::rename(&self.partial_path, &self.final_path).map_err(|e| {
            CtlError::file(&self.final_path, "rename the finished output into place", e)
        })?;
        *pending = None;
        self.committed = true;
        drop(pending);
        // Make the rename itself durable.
        let directory = match self.final_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if let Ok(dir) = File::open(&directory) {
            let _ = dir.sync_all();
        }
        Ok(self.final_path.clone())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            let mut pending = PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
            let _ = std::fs::remove_file(&self.partial_path);
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
    *pending = Some(path.to_path_buf());
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

fn forget_pending() {
    *PENDING_PARTIAL.lock().unwrap_or_else(|e| e.into_inner()) = None;
}
