//! Who the daemon serves: the system daemon or a per-user one.
//!
//! A leaf of its own because layers at every height ask it: the key ring (which defaults apply),
//! the context jobs see, the server (who may connect).

/// Who the daemon serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The system daemon: any local user who can connect to the socket (the socket's mode and
    /// group decide who can).
    System,
    /// A per-user daemon: only its own user (and root).
    User,
}
