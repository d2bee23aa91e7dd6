//! Where the daemon listens.
//!
//! The system daemon (root, socket-activated by systemd) and a per-user daemon (`imgcryptd
//! --user`) run the same code and differ only in where their socket is and who may connect.
//! Both the daemon and the client call [`user_socket`], so they always agree.

use std::path::PathBuf;

/// The system daemon's socket.
pub const SYSTEM_SOCKET: &str = "/run/imgcrypt/io.imgcrypt";
/// Environment variable naming the socket a client should use.
pub const SOCKET_ENV: &str = "IMGCRYPT_SOCKET";
/// Directory of the per-user socket inside the user's runtime directory.
const USER_SOCKET_DIR: &str = "imgcrypt";
/// Socket file name.
const SOCKET_NAME: &str = "io.imgcrypt";

/// The per-user daemon's socket: `$XDG_RUNTIME_DIR/imgcrypt/io.imgcrypt`, or under
/// `/run/user/UID` when the variable is unset (as after `su` or in some CI shells) and that
/// directory exists. A relative `XDG_RUNTIME_DIR` is ignored, as the XDG spec requires.
pub fn user_socket() -> Option<PathBuf> {
    user_runtime_dir().map(|dir| dir.join(USER_SOCKET_DIR).join(SOCKET_NAME))
}

fn user_runtime_dir() -> Option<PathBuf> {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            dir.is_absolute().then_some(dir)
        }
        None => {
            let dir = PathBuf::from(format!("/run/user/{}", nix::unistd::getuid()));
            dir.is_dir().then_some(dir)
        }
    }
}
