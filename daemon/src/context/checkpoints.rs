//! Resume checkpoints of interrupted encryptions, kept in the daemon's state directory.
//!
//! A checkpoint says how far an encryption into a given `OUT.partial` got, durably (it is
//! written only after the output's `fdatasync`), and what it was encrypting: the source's
//! identity and a hash of a sample of its guest data, the key's fingerprint and a hash of the
//! job's parameters. It holds no key material: the volume key is recovered on resume from the
//! masked LUKS header in the partial file itself, with the user's key ([`crate::jobs::resume`]).
//!
//! Layout: `STATE_DIR/checkpoints/UID/OUTPUT-ID.json`, directories mode 0700 and files 0600,
//! all the daemon's own (a root daemon's: root's). `OUTPUT-ID` is a hash of the output's device
//! and inode, so the same partial file finds its checkpoint again and no user-chosen name
//! reaches a path. A hostile user cannot fill the disk: at most [`MAX_PER_UID`] checkpoints per
//! uid (saving one more replaces that uid's oldest), each at most [`MAX_BYTES`] bytes.
//!
//! Writes are atomic: a temporary file in the same directory, `fsync`, `rename`, `fsync` of the
//! directory; a crash leaves the old checkpoint or the new one, never a torn one (a stray
//! temporary file is replaced by the next write under the same name).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Checkpoints one uid may have; saving one more replaces the oldest.
pub const MAX_PER_UID: usize = 16;

/// Largest checkpoint file read or written.
pub const MAX_BYTES: usize = 4096;

/// Format version of [`Checkpoint`]; another version is ignored (the job restarts).
pub const VERSION: u32 = 2;

/// The identity of a file as `fstat` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileIdentity {
    /// The identity of `file`.
    pub fn of(file: &File) -> Result<Self> {
        let metadata = file
            .metadata()
            .map_err(|e| Error::io("fstat for a checkpoint", e))?;
        Ok(Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
        })
    }
}

/// What a source was when its encryption was checkpointed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    /// The source file.
    pub file: FileIdentity,
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time, in nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Its inode change time (`st_ctime`), in nanoseconds since the epoch: unlike the
    /// modification time, no user can set it.
    pub ctime_ns: i128,
    /// The guest disk's virtual size.
    pub virtual_size: u64,
    /// Hex SHA-256 of a sample of the guest data (blocks at the start, middle and end).
    pub sample_sha256: String,
}

/// The durable progress of one encryption (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// [`VERSION`].
    pub version: u32,
    /// Who ran the job.
    pub uid: u32,
    /// The output (`OUT.partial`).
    pub output: FileIdentity,
    /// The output's size: the whole image's.
    pub output_size: u64,
    /// The source.
    pub source: SourceIdentity,
    /// Base64 SHA-256 fingerprint of the key file (as the summary shows it); never the key.
    /// `None` for a key that does not look generated (the rule a LUKS2 header's fingerprint
    /// token follows): the keyslot then tells a changed key.
    pub key_fingerprint: Option<String>,
    /// Hex SHA-256 of the parameters that shape the output.
    pub parameters_sha256: String,
    /// Where the payload starts (the header's size).
    pub data_offset: u64,
    /// Payload bytes.
    pub payload_size: u64,
    /// Payload bytes from the start that are written and durable.
    pub done: u64,
    /// The keyslot's key derivation as the summary describes it (public header metadata).
    pub pbkdf: String,
    /// Hex SHA-256 of the masked header staged in the partial file (`0..data_offset`): a
    /// resume opens only that header.
    pub header_sha256: String,
}

/// The checkpoints of every uid, under one state directory.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    root: PathBuf,
    /// The outputs a job is writing now (shared by clones).
    claims: Arc<Claims>,
}

/// Outputs being written, so that two jobs never write the same `OUT.partial` at once. Kept in
/// the daemon rather than as an `flock` on the file: any user who can open the file could hold
/// an `flock` and block its owner's encryption.
#[derive(Debug, Default)]
struct Claims {
    busy: Mutex<HashSet<FileIdentity>>,
    freed: Condvar,
}

/// One job's claim on an output ([`CheckpointStore::claim`]), released on drop.
#[derive(Debug)]
pub struct OutputClaim<'a> {
    claims: &'a Claims,
    output: FileIdentity,
}

impl Drop for OutputClaim<'_> {
    fn drop(&mut self) {
        let mut busy = self.claims.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.output);
        self.claims.freed.notify_all();
    }
}

impl CheckpointStore {
    /// The store under `state_dir` (created, mode 0700, if missing).
    pub fn open(state_dir: &Path) -> Result<Self> {
        let root = state_dir.join("checkpoints");
        make_private_dir(state_dir)?;
        check_private_dir(state_dir, fs::metadata(state_dir))?;
        make_private_dir(&root)?;
        check_private_dir(&root, fs::symlink_metadata(&root))?;
        Ok(Self {
            root,
            claims: Arc::default(),
        })
    }

    /// Claims `output` for one job: waits (up to `wait`, calling `check` every 100 ms, whose
    /// error ends the wait) while another job holds it, say an interrupted run still saving
    /// its last checkpoint.
    pub fn claim(
        &self,
        output: &FileIdentity,
        wait: Duration,
        check: impl Fn() -> Result<()>,
    ) -> Result<OutputClaim<'_>> {
        let deadline = Instant::now() + wait;
        let mut busy = self.claims.busy.lock().unwrap_or_else(|e| e.into_inner());
        while busy.contains(output) {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::io(
                    "claiming OUT.partial: another imgcrypt job (an interrupted run still \
                     stopping?) is writing it; try again when it has finished",
                    std::io::Error::from(std::io::ErrorKind::WouldBlock),
                ));
            }
            drop(busy);
            check()?;
            busy = self.claims.busy.lock().unwrap_or_else(|e| e.into_inner());
            let step = (deadline - now).min(Duration::from_millis(100));
            busy = self
                .claims
                .freed
                .wait_timeout(busy, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        busy.insert(output.clone());
        Ok(OutputClaim {
            claims: &self.claims,
            output: output.clone(),
        })
    }

    /// Where the checkpoints live.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn uid_dir(&self, uid: u32) -> PathBuf {
        self.root.join(uid.to_string())
    }

    fn path(&self, uid: u32, output: &FileIdentity) -> PathBuf {
        let mut hash = Sha256::new();
        hash.update(b"imgcrypt-checkpoint\0");
        hash.update(output.dev.to_le_bytes());
        hash.update(output.ino.to_le_bytes());
        let name: String = hash.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.uid_dir(uid).join(format!("{name}.json"))
    }

    /// `uid`'s checkpoint for `output`, if there is a readable one of this version.
    pub fn load(&self, uid: u32, output: &FileIdentity) -> Option<Checkpoint> {
        let path = self.path(uid, output);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
            .ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(MAX_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .ok()?;
        if bytes.len() > MAX_BYTES {
            return None;
        }
        let checkpoint: Checkpoint = serde_json::from_slice(&bytes).ok()?;
        (checkpoint.version == VERSION && checkpoint.uid == uid && &checkpoint.output == output)
            .then_some(checkpoint)
    }

    /// Saves `checkpoint` atomically, replacing the uid's oldest when it has
    /// [`MAX_PER_UID`] already.
    pub fn save(&self, checkpoint: &Checkpoint) -> Result<()> {
        let dir = self.uid_dir(checkpoint.uid);
        make_private_dir(&dir)?;
        check_private_dir(&dir, fs::symlink_metadata(&dir))?;
        let path = self.path(checkpoint.uid, &checkpoint.output);
        if !path.exists() {
            self.make_room(&dir)?;
        }
        let bytes = serde_json::to_vec(checkpoint).expect("a checkpoint serialises");
        if bytes.len() > MAX_BYTES {
            return Err(Error::io(
                "saving a checkpoint",
                std::io::Error::other(format!(
                    "{} bytes is more than the {MAX_BYTES} a checkpoint may take",
                    bytes.len()
                )),
            ));
        }
        let temporary = path.with_extension("json.tmp");
        let context = |what: &str| format!("{what} the checkpoint {}", temporary.display());
        let _ = fs::remove_file(&temporary);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temporary)
            .map_err(|e| Error::io(context("creating"), e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(context("writing"), e))?;
        drop(file);
        fs::rename(&temporary, &path).map_err(|e| Error::io(context("renaming"), e))?;
        sync_dir(&dir)
    }

    /// Removes `uid`'s checkpoint for `output` (the job finished, or restarts).
    pub fn remove(&self, uid: u32, output: &FileIdentity) {
        let path = self.path(uid, output);
        if fs::remove_file(&path).is_ok() {
            let _ = sync_dir(&self.uid_dir(uid));
        }
    }

    /// Removes the oldest checkpoints of `dir` until one more fits under [`MAX_PER_UID`].
    fn make_room(&self, dir: &Path) -> Result<()> {
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                // Only what `save` writes: regular files named like its checkpoints.
                let metadata = entry.metadata().ok()?;
                let name = entry.file_name();
                if !metadata.is_file() || !is_checkpoint_name(name.to_str()?) {
                    return None;
                }
                Some((metadata.modified().ok()?, entry.path()))
            })
            .collect();
        entries.sort();
        let excess = (entries.len() + 1).saturating_sub(MAX_PER_UID);
        for (_, path) in entries.into_iter().take(excess) {
            tracing::info!(path = %path.display(), "replacing the oldest checkpoint of this uid");
            let _ = fs::remove_file(path);
        }
        Ok(())
    }
}

/// Creates `dir` (and missing parents, as a per-user daemon's `~/.local/state` may be) with
/// mode 0700 if missing; refuses one that is not a directory.
fn make_private_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(Error::io(
            format!(
                "creating the state directory {} (give the daemon one it owns with \
                 --state-dir)",
                dir.display()
            ),
            e,
        )),
    }
}

/// A name [`CheckpointStore::save`] writes: 32 hex digits, `.json` or `.json.tmp`.
fn is_checkpoint_name(name: &str) -> bool {
    let stem = name
        .strip_suffix(".json")
        .or_else(|| name.strip_suffix(".json.tmp"));
    stem.is_some_and(|stem| {
        stem.len() == 32 && stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Refuses a state directory (given `metadata`, of its `lstat` below the state directory) that
/// is not a directory owned by the daemon's euid, or that others may write: the daemon trusts
/// what it reads there, and with every level its own and closed to others nobody else can put
/// a symbolic link or a file in its way.
fn check_private_dir(dir: &Path, metadata: std::io::Result<fs::Metadata>) -> Result<()> {
    let metadata = metadata.map_err(|e| {
        Error::io(
            format!("examining the state directory {}", dir.display()),
            e,
        )
    })?;
    let euid = nix::unistd::geteuid().as_raw();
    let why = if !metadata.is_dir() {
        Some("is not a directory".to_string())
    } else if metadata.uid() != euid {
        Some(format!(
            "belongs to uid {}, not the daemon's {euid}",
            metadata.uid()
        ))
    } else if metadata.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by others (mode {:o})",
            metadata.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::io(
            format!(
                "using the state directory {} (it {why}; give the daemon a directory of its own, \
                 not group- or world-writable, with --state-dir)",
                dir.display()
            ),
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        )),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| Error::io(format!("fsync on {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn one_job_at_a_time_claims_an_output_and_the_next_waits_or_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        let output = FileIdentity { dev: 1, ino: 7 };
        let other = FileIdentity { dev: 1, ino: 8 };
        let ok = || Ok(());
        let first = store.claim(&output, Duration::ZERO, ok).unwrap();
        // Another output is free; the same one is refused, saying why.
        drop(store.claim(&other, Duration::ZERO, ok).unwrap());
        let refused = store
            .claim(&output, Duration::from_millis(150), ok)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("another imgcrypt job"), "{refused}");
        // A cancelled waiter stops waiting.
        let cancelled = store.claim(&output, Duration::from_secs(10), || Err(Error::Cancelled));
        assert!(matches!(cancelled, Err(Error::Cancelled)));
        // A waiter gets it once the holder lets go (a clone of the store shares the claims).
        let clone = store.clone();
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| clone.claim(&output, Duration::from_secs(10), ok).is_ok());
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
            assert!(waiter.join().unwrap());
        });
    }

    fn checkpoint(uid: u32, ino: u64) -> Checkpoint {
        Checkpoint {
            version: VERSION,
            uid,
            output: FileIdentity { dev: 1, ino },
            output_size: 1 << 20,
            source: SourceIdentity {
                file: FileIdentity { dev: 1, ino: 99 },
                size: 4096,
                mtime_ns: 5,
                ctime_ns: 6,
                virtual_size: 4096,
                sample_sha256: "00".into(),
            },
            key_fingerprint: Some("fp".into()),
            parameters_sha256: "pp".into(),
            data_offset: 4096,
            payload_size: 4096,
            done: 0,
            pbkdf: "pbkdf2".into(),
            header_sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn saved_checkpoints_load_per_uid_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(&dir.path().join("state")).unwrap();
        let mut saved = checkpoint(1000, 7);
        store.save(&saved).unwrap();
        saved.done = 2048;
        store.save(&saved).unwrap();
        assert_eq!(store.load(1000, &saved.output), Some(saved.clone()));
        // Another uid never sees it.
        assert_eq!(store.load(1001, &saved.output), None);
        let path = store.path(1000, &saved.output);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(!path.with_extension("json.tmp").exists());
        store.remove(1000, &saved.output);
        assert_eq!(store.load(1000, &saved.output), None);
    }

    #[test]
    fn a_uid_keeps_at_most_the_cap_and_loses_its_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        for ino in 0..(MAX_PER_UID as u64 + 3) {
            store.save(&checkpoint(7, ino)).unwrap();
            // Distinct modification times, so "oldest" is well defined.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let count = fs::read_dir(store.uid_dir(7)).unwrap().count();
        assert_eq!(count, MAX_PER_UID);
        assert_eq!(store.load(7, &FileIdentity { dev: 1, ino: 0 }), None);
        assert!(store
            .load(
                7,
                &FileIdentity {
                    dev: 1,
                    ino: MAX_PER_UID as u64 + 2
                }
            )
            .is_some());
    }

    #[test]
    fn oversized_or_foreign_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        let saved = checkpoint(3, 1);
        store.save(&saved).unwrap();
        let path = store.path(3, &saved.output);
        fs::write(&path, vec![b' '; MAX_BYTES + 1]).unwrap();
        assert_eq!(store.load(3, &saved.output), None);
        fs::write(&path, b"{not json").unwrap();
        assert_eq!(store.load(3, &saved.output), None);
        // A FIFO under a checkpoint's name neither blocks nor loads.
        fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(store.load(3, &saved.output), None);
    }

    #[test]
    fn making_room_removes_only_checkpoint_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        store.save(&checkpoint(4, 0)).unwrap();
        let uid_dir = store.uid_dir(4);
        let foreign = uid_dir.join("notes.txt");
        fs::write(&foreign, b"not ours").unwrap();
        let odd_dir = uid_dir.join(format!("{}.json", "0".repeat(32)));
        fs::create_dir(&odd_dir).unwrap();
        for ino in 1..=MAX_PER_UID as u64 + 2 {
            store.save(&checkpoint(4, ino)).unwrap();
        }
        assert!(foreign.exists() && odd_dir.is_dir());
        assert!(is_checkpoint_name(&format!("{}.json.tmp", "ab".repeat(16))));
        assert!(!is_checkpoint_name(&format!("{}.json", "AB".repeat(16))));
        assert!(!is_checkpoint_name("x.json"));
    }

    #[test]
    fn a_state_directory_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        let error = CheckpointStore::open(&state).unwrap_err().to_string();
        assert!(error.contains("writable by others"), "{error}");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        // A symbolic link in place of the checkpoints directory is refused too.
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, state.join("checkpoints")).unwrap();
        let error = CheckpointStore::open(&state).unwrap_err().to_string();
        assert!(error.contains("is not a directory"), "{error}");
        fs::remove_file(state.join("checkpoints")).unwrap();
        assert!(CheckpointStore::open(&state).is_ok());
    }
}
