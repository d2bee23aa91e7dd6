//! Getting a listening socket: from systemd (socket activation) or by binding a path.
//!
//! Binding is guarded by a lock file next to the socket, so two daemons started at once (two
//! `imgctl` invocations auto-starting a per-user daemon) cannot steal each other's socket: the
//! loser sees the lock held and leaves; the winner removes any stale socket file and binds.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::{Error, Result};

/// A socket bound by us, with the lock that proves it is ours. Removing the socket file on drop
/// keeps the directory clean after an orderly exit; the lock makes a leftover harmless anyway.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listener.
    pub listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Ownership and mode for a socket we bind.
#[derive(Debug, Clone, Copy)]
pub struct SocketAccess {
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Group to own it, if any.
    pub group: Option<u32>,
    /// Permission bits of the directory if we create it.
    pub directory_mode: u32,
}

/// Binds `path`, creating its directory if needed.
pub fn bind(path: &Path, access: SocketAccess) -> Result<BoundSocket> {
    let directory = path.parent().ok_or_else(|| {
        Error::io(
            format!("socket path {} has no directory", path.display()),
            std::io::ErrorKind::InvalidInput,
        )
    })?;
    if !directory.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(access.directory_mode)
            .create(directory)
            .map_err(|e| Error::io(format!("creating {}", directory.display()), e))?;
    }

    let lock_path = path.with_extension("lock");
    let lock_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("opening lock file {}", lock_path.display()), e))?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            Error::io(
                format!(
                    "another imgcryptd is already serving {} (lock {} is held)",
                    path.display(),
                    lock_path.display()
                ),
                std::io::ErrorKind::AddrInUse,
            )
        } else {
            Error::io(format!("locking {}", lock_path.display()), errno)
        }
    })?;

    // We hold the lock, so any socket file here is a leftover of a daemon that died.
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::io(
                format!("removing stale socket {}", path.display()),
                e,
            ))
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| Error::io(format!("chown {}", path.display()), e))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("setting the listener non-blocking", e))?;
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        _lock: lock,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> SocketAccess {
        SocketAccess {
            mode: 0o600,
            group: None,
            directory_mode: 0o700,
        }
    }

    #[test]
    fn second_bind_is_refused_while_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/io.imgcrypt");
        let first = bind(&path, access()).unwrap();
        let err = bind(&path, access()).unwrap_err();
        assert!(err.to_string().contains("already serving"), "{err}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(first);
        assert!(!path.exists(), "socket file removed on drop");
        bind(&path, access()).unwrap();
    }

    #[test]
    fn stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("io.imgcrypt");
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let bound = bind(&path, access()).unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(bound);
    }
}
