//! Where the daemon listens.
//!
//! The system daemon (root, socket-activated by systemd) and a per-user daemon (`imgcryptd
//! --user`) run the same code and differ only in where their socket is and who may connect.

use std::path::PathBuf;

/// The system daemon's socket.
pub const SYSTEM_SOCKET: &str = "/run/imgcrypt/io.imgcrypt";
/// Environment variable naming the socket a client should use.
pub const SOCKET_ENV: &str = "IMGCRYPT_SOCKET";
/// Socket file name inside the per-user runtime directory.
const USER_SOCKET_DIR: &str = "imgcrypt";
const SOCKET_NAME: &str = "io.imgcrypt";

/// The per-user daemon's socket, `$XDG_RUNTIME_DIR/imgcrypt/io.imgcrypt`, if that variable is
/// set to an absolute path (the XDG spec says to ignore a relative one).
pub fn user_socket() -> Option<PathBuf> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")?;
    let runtime = PathBuf::from(runtime);
    runtime
        .is_absolute()
        .then(|| runtime.join(USER_SOCKET_DIR).join(SOCKET_NAME))
}
