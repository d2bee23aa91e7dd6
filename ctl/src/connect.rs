//! Finding the daemon: `--socket`, then `IMGCRYPT_SOCKET`, then the system socket, then the
//! per-user socket; if none answers, start a per-user daemon and use it.
//!
//! An explicit choice (`--socket` or the variable) is honoured strictly: if it does not answer
//! that is an error, never a silent fall-back to another daemon.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imgcrypt_proto::paths;

use crate::client::Client;
use crate::error::{CtlError, Result};

/// How long to wait for an auto-started daemon's socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds an auto-started daemon lingers without clients before it exits.
const AUTOSTART_IDLE_SECONDS: &str = "60";

/// Connects to a daemon, starting a per-user one if needed.
pub fn connect(explicit: Option<&Path>) -> Result<Client> {
    if let Some(path) = explicit {
        return probe(path)
            .map_err(|e| CtlError::Connect(format!("--socket {}: {e}", path.display())));
    }
    if let Some(path) = std::env::var_os(paths::SOCKET_ENV) {
        let path = PathBuf::from(path);
        return probe(&path).map_err(|e| {
            CtlError::Connect(format!("{}={}: {e}", paths::SOCKET_ENV, path.display()))
        });
    }

    let mut tried = Vec::new();
    let user_socket = paths::user_socket();
    for path in std::iter::once(PathBuf::from(paths::SYSTEM_SOCKET)).chain(user_socket.clone()) {
        match probe(&path) {
            Ok(client) => return Ok(client),
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }

    let Some(user_socket) = user_socket else {
        return Err(CtlError::Connect(format!(
            "no daemon answered ({}), and no per-user daemon can be started because \
             XDG_RUNTIME_DIR is not set: set it, or pass --socket PATH",
            tried.join("; ")
        )));
    };
    start_user_daemon(&user_socket)
}

/// Connects and asks GetInfo, so a stale socket file or a wrong program is not mistaken for a
/// daemon.
fn probe(path: &Path) -> std::result::Result<Client, String> {
    let mut client = Client::connect(path).map_err(|e| e.to_string())?;
    let info = client.get_info().map_err(|e| e.to_string())?;
    if !info
        .interfaces
        .iter()
        .any(|i| i == imgcrypt_proto::api::INTERFACE)
    {
        return Err(format!(
            "{} does not serve {}",
            info.product,
            imgcrypt_proto::api::INTERFACE
        ));
    }
    Ok(client)
}

/// Starts `imgcryptd --user` in its own process group (so Ctrl-C on our terminal does not reach
/// it) and waits for its socket. Its log goes next to the socket.
fn start_user_daemon(socket: &Path) -> Result<Client> {
    let daemon = daemon_binary();
    let directory = socket.parent().expect("user socket path has a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .create(directory)
        .map_err(|e| CtlError::file(directory, "create the runtime directory", e))?;
    let log_path = directory.join("imgcryptd.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| CtlError::file(&log_path, "open the daemon log", e))?;

    let mut child = Command::new(&daemon)
        .args([
            "--user",
            "--idle-timeout",
            AUTOSTART_IDLE_SECONDS,
            "--socket",
        ])
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| {
            CtlError::Connect(format!(
                "no daemon is running and starting {} failed: {e}; install imgcryptd next to \
                 imgctl or in PATH",
                daemon.display()
            ))
        })?;

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(client) = probe(socket) {
            return Ok(client);
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Lost a race with another imgctl starting the same daemon: use that one.
            if let Ok(client) = probe(socket) {
                return Ok(client);
            }
            return Err(CtlError::Connect(format!(
                "the per-user daemon exited at start ({status}); see {}",
                log_path.display()
            )));
        }
        if Instant::now() > deadline {
            return Err(CtlError::Connect(format!(
                "the per-user daemon did not answer on {} within {:?}; see {}",
                socket.display(),
                START_TIMEOUT,
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `imgcryptd` next to our own executable (an installed pair, or a cargo build), else PATH.
fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("imgcryptd")))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("imgcryptd"))
}
