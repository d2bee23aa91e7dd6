//! Giving up, at start-up, every capability the daemon does not use.
//!
//! The systemd unit already limits the daemon to [`KEPT`] (`CapabilityBoundingSet=`), but an
//! operator may run `imgcryptd` by hand, from another service manager or a container, as a
//! root process with every capability. Whatever started it, a root daemon that serves
//! untrusted users should hold only what its own work needs, so that a mistake elsewhere cannot
//! be turned into more: without `CAP_FSETID`, every write the daemon makes clears set-id bits
//! like an ordinary user's; without `CAP_DAC_OVERRIDE`/`CAP_DAC_READ_SEARCH`, a path the daemon
//! opens (its key ring, its devices) is subject to the file's own permissions; without
//! `CAP_CHOWN`/`CAP_FOWNER`, it cannot change who owns or may use a file.
//!
//! What stays: `CAP_SYS_ADMIN` (loop devices and device-mapper ioctls of the kernel engine),
//! `CAP_IPC_LOCK` (locking key memory beyond `RLIMIT_MEMLOCK`) and `CAP_MKNOD` (device nodes
//! where `/dev` is not devtmpfs, see `devices::node`). The bounding set is cut to the same, so
//! no later `execve` could regain the rest, and the inheritable and ambient sets are emptied.
//!
//! Capabilities belong to threads: this must run while the daemon has only its main thread
//! (before the async runtime starts), so that every thread created afterwards inherits the
//! reduced sets. It runs after the socket is bound, since binding may `chown` the socket to its
//! group.

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the daemon keeps.
pub const KEPT: [Capability; 3] = [
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_IPC_LOCK,
    Capability::CAP_MKNOD,
];

/// Why the capabilities could not be reduced.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// The kernel refused a step.
    #[error("dropping capabilities ({step}): {source}")]
    Kernel {
        /// Which step failed.
        step: &'static str,
        /// What the kernel said.
        source: caps::errors::CapsError,
    },
    /// Other threads exist and would keep their capabilities.
    #[error(
        "dropping capabilities: the process already has {0} threads, which would keep theirs \
         (a bug: capabilities must be dropped before any thread starts)"
    )]
    Threads(usize),
}

/// What [`drop_unneeded`] left the process with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    /// Effective (and permitted) capabilities, by name, sorted.
    pub effective: Vec<String>,
    /// How many capabilities were removed from the permitted set.
    pub dropped: usize,
}

/// Reduces the calling thread's (and so, before other threads exist, the process's)
/// capabilities to those of [`KEPT`] it has. A process without capabilities (the per-user
/// daemon) is left as it is, apart from its inheritable and ambient sets.
pub fn drop_unneeded() -> Result<Retained, DropError> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, Iterator::count);
    if threads > 1 {
        return Err(DropError::Threads(threads));
    }
    drop_in_this_thread()
}

/// [`drop_unneeded`] without the check that no other thread exists.
fn drop_in_this_thread() -> Result<Retained, DropError> {
    let step = |step| move |source| DropError::Kernel { step, source };
    let kept: CapsHashSet = KEPT.into_iter().collect();
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(step("reading the permitted set"))?;

    // The bounding set first: removing from it needs CAP_SETPCAP, which goes below.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(step("reading the effective set"))?
    {
        for capability in caps::all().difference(&kept) {
            caps::drop(None, CapSet::Bounding, *capability)
                .map_err(step("reducing the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(step("clearing the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(step("clearing the inheritable set"))?;
    let retained: CapsHashSet = permitted.intersection(&kept).copied().collect();
    // Effective before permitted: the effective set must stay a subset of the permitted one.
    caps::set(None, CapSet::Effective, &retained).map_err(step("setting the effective set"))?;
    caps::set(None, CapSet::Permitted, &retained).map_err(step("setting the permitted set"))?;

    let mut effective: Vec<String> = retained.iter().map(ToString::to_string).collect();
    effective.sort();
    Ok(Retained {
        effective,
        dropped: permitted.len() - retained.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Capabilities are per thread, so the test drops them in a thread of its own and leaves
    /// the other tests' threads as they were.
    #[test]
    fn a_root_thread_keeps_only_what_the_daemon_uses() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (the test suite runs as root)"
        );
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        // A group-writable set-user-ID program, made while we still may.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("program");
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o4775)).unwrap();

        std::thread::spawn(move || {
            let before = caps::read(None, CapSet::Permitted).unwrap();
            assert!(
                before.contains(&Capability::CAP_FSETID),
                "root starts with CAP_FSETID"
            );
            // The test process has other threads: the daemon's entry point refuses that.
            assert!(matches!(drop_unneeded(), Err(DropError::Threads(n)) if n > 1));
            let retained = drop_in_this_thread().unwrap();
            assert_eq!(
                retained.effective,
                ["CAP_IPC_LOCK", "CAP_MKNOD", "CAP_SYS_ADMIN"]
            );
            assert!(retained.dropped > 0);
            let kept: CapsHashSet = KEPT.into_iter().collect();
            for set in [CapSet::Effective, CapSet::Permitted, CapSet::Bounding] {
                assert_eq!(caps::read(None, set).unwrap(), kept, "{set:?}");
            }
            assert!(caps::read(None, CapSet::Inheritable).unwrap().is_empty());
            assert!(caps::read(None, CapSet::Ambient).unwrap().is_empty());

            // What it is for: as root without CAP_FSETID, a write clears the set-user-ID bit.
            let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.write_all(b"x").unwrap();
            drop(file);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o4000,
                0,
                "mode {mode:o}: the set-user-ID bit survived"
            );
            // And root's other powers are gone: no chown to a group it is not in.
            assert!(std::os::unix::fs::chown(&path, None, Some(65534)).is_err());
        })
        .join()
        .expect("capability thread");
    }
}
