//! The per-object upload state that makes an interrupted upload resumable: one JSON file per
//! object under `$XDG_STATE_HOME/imgcrypt/uploads/` (default `~/.local/state/imgcrypt/uploads/`),
//! named by the hex SHA-256 of endpoint, bucket and key, and beside it the saved LUKS header
//! (`<name>.header`) of a streamed encryption.
//!
//! The directory is 0700 and the files 0600: the state names the object and the upload id
//! (enough to abort or complete that upload with the user's credentials, no more), the header
//! holds keyslots (wrapped with the user's key, as in any LUKS image). No credential is ever
//! written here. Every write is atomic (temporary file, fsync, rename, directory fsync), so a
//! crash leaves the previous state or the new one, and the state says only what the server
//! acknowledged: a part is recorded after its upload succeeded.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CtlError, Result};

/// The largest state file read back (10,000 parts of ~250 bytes is 2.5 MB).
pub const MAX_STATE: u64 = 4 << 20;
/// The largest saved header (LUKS2 headers are at most a few MiB; 16 MiB with keyslot areas).
pub const MAX_HEADER: u64 = 64 << 20;
/// The state format's version.
const VERSION: u32 = 1;

/// One part the server acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPart {
    /// The part number, from 1.
    pub number: u32,
    /// Its size in bytes.
    pub size: u64,
    /// The ETag the server returned (normally the hex MD5).
    pub etag: String,
    /// Hex MD5 of the part (for the multipart ETag).
    pub md5: String,
    /// Hex SHA-256 of the part (sent as x-amz-checksum-sha256).
    pub sha256: String,
    /// object_store's opaque part id, needed to complete the upload.
    pub content_id: String,
}

/// What is known about one object's multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    /// Format version.
    pub version: u32,
    /// `s3://BUCKET/KEY`.
    pub url: String,
    /// The endpoint the upload lives at.
    pub endpoint: String,
    /// The multipart upload id.
    pub upload_id: String,
    /// The part size in bytes.
    pub part_size: u64,
    /// The object's size in bytes.
    pub image_size: u64,
    /// The caller's identity of what is uploaded (a hash of the source and parameters).
    pub identity: String,
    /// The parts stored so far, by number.
    pub parts: Vec<StoredPart>,
    /// Hex SHA-256 of the LUKS header saved beside the state (a streamed encryption's): the
    /// header the stored parts were encrypted under. A header file that does not match is not
    /// resumed from (its parts would sit under another volume key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_sha256: Option<String>,
}

impl UploadState {
    /// A new upload's state.
    pub fn new(
        url: String,
        endpoint: String,
        upload_id: String,
        part_size: u64,
        image_size: u64,
        identity: String,
    ) -> Self {
        Self {
            version: VERSION,
            url,
            endpoint,
            upload_id,
            part_size,
            image_size,
            identity,
            parts: Vec::new(),
            header_sha256: None,
        }
    }

    /// Records a stored part (replacing an earlier record of the same number).
    pub fn record(&mut self, part: StoredPart) {
        self.parts.retain(|p| p.number != part.number);
        let at = self.parts.partition_point(|p| p.number < part.number);
        self.parts.insert(at, part);
    }

    /// The end of the contiguous prefix of stored parts: where a resumed stream starts.
    pub fn contiguous_end(&self) -> u64 {
        let mut end = 0;
        for (expected, part) in (1..).zip(&self.parts) {
            if part.number != expected {
                break;
            }
            end += part.size;
        }
        end
    }
}

/// The directory of upload states.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// `$XDG_STATE_HOME/imgcrypt/uploads`, else `$HOME/.local/state/imgcrypt/uploads`.
    pub fn from_environment() -> Result<Self> {
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|home| PathBuf::from(home).join(".local/state"))
            })
            .ok_or_else(|| {
                CtlError::Usage(
                    "neither XDG_STATE_HOME nor HOME is set: imgctl keeps upload states there"
                        .into(),
                )
            })?;
        Ok(Self::at(base.join("imgcrypt/uploads")))
    }

    /// A state directory at `dir`.
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The state file's name for an object: hex SHA-256 of endpoint, bucket and key.
    pub fn name(endpoint: &str, bucket: &str, key: &str) -> String {
        let mut hash = Sha256::new();
        for field in [endpoint, bucket, key] {
            // Length-prefixed, so no two different triples hash the same bytes.
            hash.update((field.len() as u64).to_le_bytes());
            hash.update(field.as_bytes());
        }
        super::parts::hex(&hash.finalize())
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn header_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.header"))
    }

    fn create(&self) -> Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| CtlError::file(&self.dir, "create the upload state directory", e))?;
        self.check_owned()?;
        // `recursive` leaves an existing directory's mode alone: make sure it is ours alone.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| CtlError::file(&self.dir, "restrict the upload state directory", e))
    }

    /// Refuses a state directory that is a symlink or not the user's own: another user who
    /// could plant or swap files there would choose which upload and which header a resume
    /// uses. Missing is fine (nothing is recorded).
    fn check_owned(&self) -> Result<()> {
        let metadata = match std::fs::symlink_metadata(&self.dir) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(CtlError::file(
                    &self.dir,
                    "check the upload state directory",
                    e,
                ))
            }
        };
        let refuse = |why: &str| {
            Err(CtlError::File {
                path: self.dir.clone(),
                message: format!(
                    "{why}: imgctl keeps upload states only in a directory of your own; remove \
                     it, or point XDG_STATE_HOME elsewhere"
                ),
            })
        };
        if !metadata.file_type().is_dir() {
            return refuse("is not a directory (a symlink?)");
        }
        if metadata.uid() != nix::unistd::geteuid().as_raw() {
            return refuse(&format!("belongs to uid {}, not to you", metadata.uid()));
        }
        Ok(())
    }

    /// [`Self::check_owned`], and closed to others: what a resume reads must be the user's.
    fn check_trusted(&self) -> Result<()> {
        self.check_owned()?;
        match std::fs::symlink_metadata(&self.dir) {
            Ok(metadata) if metadata.mode() & 0o077 != 0 => Err(CtlError::File {
                path: self.dir.clone(),
                message: format!(
                    "is open to other users (mode {:o}): chmod 700 it, and check its files",
                    metadata.mode() & 0o777
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Loads an object's state, `None` if there is none.
    pub fn load(&self, name: &str) -> Result<Option<UploadState>> {
        self.check_trusted()?;
        let path = self.state_path(name);
        let Some(bytes) = read_bounded(&path, MAX_STATE, "upload state")? else {
            return Ok(None);
        };
        let state: UploadState = serde_json::from_slice(&bytes).map_err(|e| CtlError::File {
            path: path.clone(),
            message: format!(
                "is not an imgctl upload state ({e}): remove it (and abort the upload with \
                 `imgctl upload --abort`)"
            ),
        })?;
        if state.version != VERSION {
            return Err(CtlError::File {
                path,
                message: format!(
                    "is an upload state of version {}, this imgctl reads version {VERSION}",
                    state.version
                ),
            });
        }
        Ok(Some(state))
    }

    /// Saves an object's state atomically.
    pub fn save(&self, name: &str, state: &UploadState) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).expect("the state serializes");
        if bytes.len() as u64 > MAX_STATE {
            return Err(CtlError::File {
                path: self.state_path(name),
                message: format!("the upload state would be over {MAX_STATE} bytes"),
            });
        }
        self.write_atomically(&self.state_path(name), &bytes, "upload state")
    }

    /// Saves the LUKS header of a streamed encryption beside the state (mode 0600).
    pub fn save_header(&self, name: &str, header: &[u8]) -> Result<()> {
        self.write_atomically(&self.header_path(name), header, "saved LUKS header")
    }

    /// Opens the saved header for reading (to pass to the daemon), `None` if there is none.
    pub fn open_header(&self, name: &str) -> Result<Option<File>> {
        self.check_trusted()?;
        let path = self.header_path(name);
        match open_own_file(&path) {
            Ok(file) => {
                let size = file
                    .metadata()
                    .map_err(|e| CtlError::file(&path, "read the saved LUKS header", e))?
                    .len();
                if size > MAX_HEADER {
                    return Err(CtlError::File {
                        path,
                        message: format!("is over {MAX_HEADER} bytes: not a saved LUKS header"),
                    });
                }
                Ok(Some(file))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CtlError::file(&path, "open the saved LUKS header", e)),
        }
    }

    /// Removes an object's state and saved header (done once the upload completed or was
    /// aborted).
    pub fn remove(&self, name: &str) -> Result<()> {
        for path in [self.state_path(name), self.header_path(name)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CtlError::file(&path, "remove the upload state", e)),
            }
        }
        sync_dir(&self.dir);
        Ok(())
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8], what: &str) -> Result<()> {
        self.create()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let action = format!("write the {what}");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| CtlError::file(&tmp, &action, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| CtlError::file(&tmp, &action, e))?;
        std::fs::rename(&tmp, path).map_err(|e| CtlError::file(path, &action, e))?;
        sync_dir(&self.dir);
        Ok(())
    }
}

/// Makes a rename or removal in `dir` durable (best effort: a failure leaves the old state,
/// which resumes correctly too).
fn sync_dir(dir: &Path) {
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// Opens a state directory's file for reading: not through a symlink, and only a regular file
/// of the user's own (anything else is refused as a planted file).
fn open_own_file(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() || metadata.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "not a regular file of your own: remove it",
        ));
    }
    Ok(file)
}

/// Reads a file of at most `limit` bytes; `None` if it does not exist.
fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Option<Vec<u8>>> {
    let file = match open_own_file(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CtlError::file(path, &format!("read the {what}"), e)),
    };
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CtlError::file(path, &format!("read the {what}"), e))?;
    if bytes.len() as u64 > limit {
        return Err(CtlError::File {
            path: path.into(),
            message: format!("is over {limit} bytes: not an imgctl {what}; remove it"),
        });
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn part(number: u32, size: u64) -> StoredPart {
        StoredPart {
            number,
            size,
            etag: format!("e{number}"),
            md5: "00".repeat(16),
            sha256: "00".repeat(32),
            content_id: format!("c{number}"),
        }
    }

    #[test]
    fn saves_atomically_private_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let states = StateDir::at(dir.path().join("imgcrypt/uploads"));
        let name = StateDir::name("http://e", "b", "k");
        assert_eq!(name.len(), 64);
        assert_ne!(name, StateDir::name("http://e", "bk", ""));
        assert!(states.load(&name).unwrap().is_none());
        let mut state = UploadState::new(
            "s3://b/k".into(),
            "http://e".into(),
            "id".into(),
            16,
            40,
            "ident".into(),
        );
        state.record(part(2, 16));
        state.record(part(1, 16));
        states.save(&name, &state).unwrap();
        states.save_header(&name, b"LUKS\xba\xbe").unwrap();
        assert_eq!(states.load(&name).unwrap().unwrap(), state);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(states.path()), 0o700);
        assert_eq!(mode(&states.state_path(&name)), 0o600);
        assert_eq!(mode(&states.header_path(&name)), 0o600);
        let mut header = Vec::new();
        states
            .open_header(&name)
            .unwrap()
            .unwrap()
            .read_to_end(&mut header)
            .unwrap();
        assert_eq!(header, b"LUKS\xba\xbe");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(states.path()).unwrap().count(), 2);
        states.remove(&name).unwrap();
        assert!(states.load(&name).unwrap().is_none());
        assert!(states.open_header(&name).unwrap().is_none());
    }

    #[test]
    fn a_state_directory_others_could_plant_files_in_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let name = StateDir::name("http://e", "b", "k");
        let real = dir.path().join("real");
        let states = StateDir::at(real.clone());
        let state = UploadState::new(
            "s3://b/k".into(),
            "http://e".into(),
            "id".into(),
            16,
            40,
            "ident".into(),
        );
        states.save(&name, &state).unwrap();
        states.save_header(&name, b"header").unwrap();

        // Reached through a symlink: refused, for reading and for writing.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let through_link = StateDir::at(link);
        let error = through_link.load(&name).unwrap_err().to_string();
        assert!(error.contains("not a directory"), "{error}");
        assert!(through_link.save(&name, &state).is_err());

        // Open to others: refused until it is closed again.
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o733)).unwrap();
        let error = states.load(&name).unwrap_err().to_string();
        assert!(error.contains("open to other users"), "{error}");
        assert!(states.open_header(&name).is_err());
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(states.load(&name).unwrap().is_some());

        // A header replaced by a symlink to another file is not followed.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"not yours").unwrap();
        std::fs::remove_file(states.header_path(&name)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, states.header_path(&name)).unwrap();
        assert!(states.open_header(&name).is_err());
    }

    #[test]
    fn the_resume_offset_is_the_contiguous_prefix() {
        let mut state = UploadState::new(
            "s3://b/k".into(),
            "e".into(),
            "id".into(),
            16,
            100,
            "i".into(),
        );
        assert_eq!(state.contiguous_end(), 0);
        state.record(part(2, 16));
        assert_eq!(state.contiguous_end(), 0);
        state.record(part(1, 16));
        state.record(part(4, 16));
        assert_eq!(state.contiguous_end(), 32);
        assert_eq!(
            state.parts.iter().map(|p| p.number).collect::<Vec<_>>(),
            [1, 2, 4]
        );
        state.record(part(4, 16));
        assert_eq!(state.parts.len(), 3);
    }

    #[test]
    fn oversized_or_garbled_states_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let states = StateDir::at(dir.path().to_path_buf());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(states.state_path("x"), vec![b' '; MAX_STATE as usize + 1]).unwrap();
        let error = states.load("x").unwrap_err().to_string();
        assert!(error.contains("over 4194304 bytes"), "{error}");
        std::fs::write(states.state_path("y"), b"{}").unwrap();
        let error = states.load("y").unwrap_err().to_string();
        assert!(error.contains("not an imgctl upload state"), "{error}");
    }
}
