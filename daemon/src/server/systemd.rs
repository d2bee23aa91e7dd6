//! The two systemd conventions the daemon speaks: socket activation (`LISTEN_FDS`) and
//! notification (`NOTIFY_SOCKET`: READY, STOPPING, and a STATUS text with the running jobs). Both are small enough to do here rather than pull
//! in crates for them.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};

/// First descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening socket systemd passed us, if we were socket-activated.
///
/// Reads and then removes `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`, so children never think
/// the descriptors are theirs.
pub fn take_activated_listener() -> Option<UnixListener> {
    let pid = std::env::var("LISTEN_PID").ok()?;
    let count = std::env::var("LISTEN_FDS").ok()?;
    // SAFETY: called from `main` before the runtime or any other thread starts, so nothing
    // reads the environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if pid.parse::<u32>().ok()? != std::process::id() || count.parse::<u32>().ok()? < 1 {
        return None;
    }
    // SAFETY: systemd guarantees LISTEN_FDS_START is an open socket handed to this process
    // (LISTEN_PID matched), and nothing else in the process has claimed it.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let listener = UnixListener::from(fd);
    listener.set_nonblocking(true).ok()?;
    // The descriptor arrives without FD_CLOEXEC; set it so job helpers never inherit it.
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .ok()?;
    Some(listener)
}

/// The STATUS= text `systemctl status` shows for `running` jobs.
pub fn jobs_status(running: usize) -> String {
    match running {
        0 => "idle, 0 jobs running".to_string(),
        1 => "1 job running".to_string(),
        n => format!("{n} jobs running"),
    }
}

/// Sends `state` (newline-separated `KEY=value` assignments: READY=1, STATUS=…, STOPPING=1)
/// to systemd, if it is listening.
pub fn notify(state: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        notify_to(&path, state);
    }
}

/// [`notify`] to the socket `path` (NOTIFY_SOCKET's value: a path, or `@` and an abstract name).
fn notify_to(path: &std::ffi::OsStr, state: &str) {
    let bytes = path.as_encoded_bytes();
    let address = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(path),
        _ => return,
    };
    let sent = address.and_then(|address| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &address)
    });
    if let Err(error) = sent {
        tracing::debug!(%error, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_running_jobs() {
        assert_eq!(jobs_status(0), "idle, 0 jobs running");
        assert_eq!(jobs_status(1), "1 job running");
        assert_eq!(jobs_status(3), "3 jobs running");
    }

    #[test]
    fn notify_sends_the_assignments_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=idle, 0 jobs running");
        let mut buffer = [0u8; 256];
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1\nSTATUS=idle, 0 jobs running");
    }
}
