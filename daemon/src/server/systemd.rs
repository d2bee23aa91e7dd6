//! The two systemd conventions the daemon speaks: socket activation (`LISTEN_FDS`) and
//! readiness notification (`NOTIFY_SOCKET`). Both are small enough to do here rather than pull
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

/// Tells systemd (if it is listening) that the daemon is ready or stopping.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let address = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(&path),
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
