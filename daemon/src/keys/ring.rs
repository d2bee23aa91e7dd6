//! The daemon's own key ring: keys the operator configured, used when a client passes none.
//!
//! Same format and rules as the user's ring ([`imgcrypt_proto::keyring`]). Where it comes from,
//! first match wins:
//! 1. `imgcryptd --keyring PATH` (must exist);
//! 2. the systemd credential `keys.toml` (`LoadCredential=keys.toml:/etc/imgcrypt/keys.toml`),
//!    found in `$CREDENTIALS_DIRECTORY`; relative key paths then resolve in that directory, where
//!    the key files arrive as further credentials;
//! 3. `/etc/imgcrypt/keys.toml`, if it exists and this is the system daemon.
//!
//! The per-user daemon (`--user`) uses a ring only when given `--keyring`: the defaults are the
//! system's keys, not the user's.
//!
//! This is the daemon reading its own configuration, not opening paths for a client, but it is
//! still strict: whoever can write the ring or a key file chooses the keys the daemon encrypts
//! with. So both must be regular files (opened with `O_NOFOLLOW`), owned by root or the daemon's
//! own uid, and not writable by group or others; being readable by others is logged as a warning.
//!
//! The ring is read at start-up to validate it, and read again for every job that uses it, so an
//! operator rotates keys by editing the files, without a restart. Key bytes are read only into
//! locked memory ([`crate::keys::read_key_file`]) and named only by fingerprint.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use imgcrypt_proto::keyring::Keyring;

use crate::keys::{read_key_file, CandidateKey};
use crate::mode::Mode;
use crate::sys::storage::{storage_kind, StorageKind};
use crate::{Error, Result};

/// The system daemon's default ring.
pub const SYSTEM_RING: &str = "/etc/imgcrypt/keys.toml";

/// The systemd credential holding the ring (`LoadCredential=keys.toml:…`).
pub const CREDENTIAL_NAME: &str = "keys.toml";

/// Prefix of the names the daemon's keys go by, so a message never confuses them with the
/// client's `encryption_key`.
pub const NAME_PREFIX: &str = "daemon:";

/// Where the daemon's ring is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingLocation {
    /// `--keyring PATH`, made absolute at start-up.
    Explicit(PathBuf),
    /// `$CREDENTIALS_DIRECTORY/keys.toml`, passed by systemd.
    Credential(PathBuf),
    /// The system default, [`SYSTEM_RING`].
    System(PathBuf),
}

impl RingLocation {
    /// The ring file.
    pub fn path(&self) -> &Path {
        match self {
            Self::Explicit(path) | Self::Credential(path) | Self::System(path) => path,
        }
    }

    /// How the ring was found, for the start-up log.
    fn origin(&self) -> &'static str {
        match self {
            Self::Explicit(_) => "--keyring",
            Self::Credential(_) => "systemd credential",
            Self::System(_) => "system default",
        }
    }
}

/// Finds the ring from `--keyring`, `$CREDENTIALS_DIRECTORY` and [`SYSTEM_RING`].
pub fn locate_from_environment(
    explicit: Option<&Path>,
    mode: Mode,
) -> Result<Option<RingLocation>> {
    locate(
        explicit,
        std::env::var_os("CREDENTIALS_DIRECTORY").as_deref(),
        Path::new(SYSTEM_RING),
        mode,
    )
}

/// Finds the ring: `explicit`, else `credentials_directory/keys.toml` if there, else
/// `system_ring` if there; the latter two only for the system daemon. `None`: no ring.
pub fn locate(
    explicit: Option<&Path>,
    credentials_directory: Option<&OsStr>,
    system_ring: &Path,
    mode: Mode,
) -> Result<Option<RingLocation>> {
    if let Some(path) = explicit {
        // Absolute now, so a re-read for a job never depends on the working directory.
        let path = std::path::absolute(path)
            .map_err(|e| Error::io(format!("resolving --keyring {}", path.display()), e))?;
        return Ok(Some(RingLocation::Explicit(path)));
    }
    if mode == Mode::User {
        return Ok(None);
    }
    let credential = credentials_directory
        .map(Path::new)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(CREDENTIAL_NAME));
    if let Some(path) = credential.filter(|path| present(path)) {
        return Ok(Some(RingLocation::Credential(path)));
    }
    Ok(present(system_ring).then(|| RingLocation::System(system_ring.to_path_buf())))
}

/// Whether something is at `path`. Anything but "not found" counts, so a symbolic link or an
/// unreadable directory is reported by the load rather than silently meaning "no ring".
fn present(path: &Path) -> bool {
    !matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// Whether a client with this uid may have plaintext decrypted with the daemon ring's keys.
///
/// Encrypting with the daemon's keys, and anything that only proves a key matches, is open to
/// anyone allowed on the socket. Decrypting hands out plaintext that only the ring's keys protect,
/// so it is reserved to root and to the daemon's own user (the per-user daemon's owner, whose
/// keys they are).
pub fn may_decrypt_with(peer_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == nix::unistd::geteuid().as_raw()
}

/// The daemon's key ring, validated at start-up and re-read for every use.
#[derive(Debug)]
pub struct DaemonRing {
    location: RingLocation,
    /// What start-up found, for [`DaemonRing::describe`].
    at_start: String,
}

impl DaemonRing {
    /// Reads the ring and every key it names, and checks them all; warnings go to the log. A
    /// broken ring is an error naming the file and the fix, so the daemon refuses to start.
    pub fn load(location: RingLocation) -> Result<Self> {
        let ring = read_ring(&location)?;
        let keys = read_keys(&ring, &ring.entries())?;
        let encryption = keys
            .iter()
            .find(|key| key.name == daemon_name(imgcrypt_proto::keyring::ENCRYPTION_KEY))
            .map_or_else(
                || "no encryption key".to_string(),
                |key| format!("encryption key sha256:{}", key.key.fingerprint),
            );
        let decryption = ring.decryption_keys.len();
        let at_start = format!(
            "{} ({}; {encryption}, {decryption} decryption key{})",
            location.path().display(),
            location.origin(),
            if decryption == 1 { "" } else { "s" }
        );
        Ok(Self { location, at_start })
    }

    /// Where the ring is.
    pub fn location(&self) -> &RingLocation {
        &self.location
    }

    /// The ring as start-up found it: path, origin, encryption key fingerprint, number of
    /// decryption keys. Never key bytes.
    pub fn describe(&self) -> &str {
        &self.at_start
    }

    /// The ring's `encryption_key` as it is now (`daemon:encryption_key`), or `None` when the
    /// ring names none. Only that key file is read.
    pub fn encryption_key(&self) -> Result<Option<CandidateKey>> {
        let ring = read_ring(&self.location)?;
        let entries = ring.entries();
        let wanted: Vec<_> = entries
            .into_iter()
            .filter(|(name, _)| name == imgcrypt_proto::keyring::ENCRYPTION_KEY)
            .collect();
        Ok(read_keys(&ring, &wanted)?.pop())
    }

    /// Every key of the ring as it is now, to unlock an image: `encryption_key` first, then the
    /// decryption keys in order, named `daemon:encryption_key`, `daemon:decryption_key1`, ….
    pub fn candidates(&self) -> Result<Vec<CandidateKey>> {
        let ring = read_ring(&self.location)?;
        read_keys(&ring, &ring.entries())
    }
}

/// The key an Encrypt job uses when the client passed none: the daemon ring's `encryption_key`,
/// or a [`Error::NoKey`] saying what to do instead.
pub fn encryption_key_for_job(ring: Option<&DaemonRing>) -> Result<CandidateKey> {
    const USER_OPTIONS: &str =
        "pass --key-file FILE, or set encryption_key in your key ring (~/.config/imgcrypt/keys.toml)";
    let Some(ring) = ring else {
        return Err(Error::NoKey(format!(
            "no key was passed and this daemon has no key ring: {USER_OPTIONS}, or ask the \
             operator to configure {SYSTEM_RING}"
        )));
    };
    ring.encryption_key()?.ok_or_else(|| {
        Error::NoKey(format!(
            "no key was passed and the daemon's key ring {} has no encryption_key: \
             {USER_OPTIONS}, or ask the operator to set encryption_key there",
            ring.location.path().display()
        ))
    })
}

fn daemon_name(name: &str) -> String {
    format!("{NAME_PREFIX}{name}")
}

/// Reads and parses the ring file after checking who may have written it. Its warnings (keys
/// ignored after a gap, readable by others) go to the log.
fn read_ring(location: &RingLocation) -> Result<Keyring> {
    let path = location.path();
    let (file, warning) = open_trusted(path, "key ring")?;
    let ring = Keyring::read(file, path)
        .map_err(|error| Error::NoKey(format!("daemon key ring {error}")))?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    for warning in &ring.warnings {
        tracing::warn!("daemon key ring {warning}");
    }
    Ok(ring)
}

/// Reads the named key files of `ring`, each after the same ownership checks as the ring.
fn read_keys(ring: &Keyring, entries: &[(String, &Path)]) -> Result<Vec<CandidateKey>> {
    entries
        .iter()
        .map(|(name, path)| {
            let what = format!("key file {name} of {}", ring.path.display());
            let (file, _) = open_trusted(path, &what)?;
            let mut key = read_key_file(&file).map_err(|error| {
                Error::NoKey(format!("daemon {what}: {}: {error}", path.display()))
            })?;
            // For the operator, not the client: logged here, never sent with a job's replies.
            // read_key_file's own warning covers "readable by others" for key files.
            for warning in std::mem::take(&mut key.warnings) {
                tracing::warn!("daemon {what}: {}: {warning}", path.display());
            }
            Ok(CandidateKey {
                name: daemon_name(name),
                key,
            })
        })
        .collect()
}

/// Opens one of the daemon's own configuration files, refusing what someone other than root or
/// the daemon's user could have written. Returns the file and, when others can read it, a
/// warning. `what` names the file's role in messages.
fn open_trusted(path: &Path, what: &str) -> Result<(File, Option<String>)> {
    let refuse =
        |problem: String| Error::NoKey(format!("daemon {what} {}: {problem}", path.display()));
    // O_NOFOLLOW: a link could point the daemon at a file nobody vetted. O_NONBLOCK: opening a
    // FIFO must not hang start-up; it is refused just below. std adds O_CLOEXEC.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| match error.raw_os_error() {
            Some(libc::ELOOP) => refuse(
                "is a symbolic link: name the file itself (the daemon does not follow links to \
                 its keys)"
                    .to_string(),
            ),
            _ => refuse(format!("cannot open it: {error}")),
        })?;
    let kind = storage_kind(&file)?;
    if kind != StorageKind::RegularFile {
        return Err(refuse(format!(
            "is {}, not a regular file",
            kind.description()
        )));
    }
    let metadata = file
        .metadata()
        .map_err(|e| Error::io(format!("reading the status of {}", path.display()), e))?;
    let own_uid = nix::unistd::geteuid().as_raw();
    let fix = if own_uid == 0 {
        format!("chown root:root {0}; chmod 600 {0}", path.display())
    } else {
        format!("chown {own_uid} {0}; chmod 600 {0}", path.display())
    };
    if metadata.uid() != 0 && metadata.uid() != own_uid {
        return Err(refuse(format!(
            "is owned by uid {}, not by root or the daemon's uid {own_uid}: whoever owns it \
             chooses the daemon's keys; {fix}",
            metadata.uid()
        )));
    }
    let mode = metadata.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "is writable by group or others (mode {mode:04o}): anyone who can write it chooses \
             the daemon's keys; {fix}"
        )));
    }
    let warning = (mode & 0o004 != 0).then(|| {
        format!(
            "daemon {what} {} is readable by others (mode {mode:04o}): chmod 600 {}",
            path.display(),
            path.display()
        )
    });
    Ok((file, warning))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcrypt_proto::keyfile::fingerprint;
    use std::os::unix::fs::PermissionsExt;

    const KEY_A: &str = "q83vEjRWeJq8zd7wESIzRFVmd4iZqrvM3e7/ABEiM0Q=";
    const KEY_B: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A directory with key files `a.key`, `b.key` and a ring `keys.toml` with `text`.
    fn ring_dir(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.key"), KEY_A, 0o600);
        write(&dir.path().join("b.key"), KEY_B, 0o600);
        write(&dir.path().join("keys.toml"), text, 0o600);
        dir
    }

    fn no_key_message(error: Error) -> String {
        match error {
            Error::NoKey(message) => message,
            other => panic!("expected NoKey, got {other:?}"),
        }
    }

    #[test]
    fn explicit_ring_wins_and_is_made_absolute() {
        let etc = ring_dir("");
        let system = etc.path().join("keys.toml");
        let found = locate(
            Some(Path::new("rel/keys.toml")),
            Some(etc.path().as_os_str()),
            &system,
            Mode::User,
        )
        .unwrap();
        let expected = std::env::current_dir().unwrap().join("rel/keys.toml");
        assert_eq!(found, Some(RingLocation::Explicit(expected)));
    }

    #[test]
    fn credentials_then_system_default_only_for_the_system_daemon() {
        let credentials = ring_dir("");
        let etc = ring_dir("");
        let system = etc.path().join("keys.toml");
        let creds = Some(credentials.path().as_os_str());

        assert_eq!(
            locate(None, creds, &system, Mode::System).unwrap(),
            Some(RingLocation::Credential(
                credentials.path().join("keys.toml")
            ))
        );
        // Credentials without keys.toml (other credentials only): the default applies.
        let other_credentials = tempfile::tempdir().unwrap();
        assert_eq!(
            locate(
                None,
                Some(other_credentials.path().as_os_str()),
                &system,
                Mode::System
            )
            .unwrap(),
            Some(RingLocation::System(system.clone()))
        );
        assert_eq!(
            locate(None, None, &system, Mode::System).unwrap(),
            Some(RingLocation::System(system.clone()))
        );
        let absent = etc.path().join("absent.toml");
        assert_eq!(locate(None, None, &absent, Mode::System).unwrap(), None);
        // The per-user daemon never falls back to the system's keys.
        assert_eq!(locate(None, creds, &system, Mode::User).unwrap(), None);
        assert_eq!(locate(None, None, &system, Mode::User).unwrap(), None);
    }

    #[test]
    fn credential_ring_resolves_relative_keys_in_the_credentials_directory() {
        let credentials = ring_dir("encryption_key = \"a.key\"\ndecryption_key1 = \"b.key\"\n");
        let location = locate(
            None,
            Some(credentials.path().as_os_str()),
            Path::new("/nonexistent"),
            Mode::System,
        )
        .unwrap()
        .unwrap();
        let ring = DaemonRing::load(location).unwrap();
        let candidates = ring.candidates().unwrap();
        let named: Vec<(&str, &str)> = candidates
            .iter()
            .map(|c| (c.name.as_str(), c.key.fingerprint.as_str()))
            .collect();
        let (fa, fb) = (fingerprint(KEY_A.as_bytes()), fingerprint(KEY_B.as_bytes()));
        assert_eq!(
            named,
            [
                ("daemon:encryption_key", fa.as_str()),
                ("daemon:decryption_key1", fb.as_str())
            ]
        );
        assert!(
            ring.describe()
                .contains(&format!("encryption key sha256:{fa}, 1 decryption key)")),
            "{}",
            ring.describe()
        );
        assert!(
            ring.describe().contains("systemd credential"),
            "{}",
            ring.describe()
        );
    }

    #[test]
    fn each_use_rereads_the_ring_and_its_keys() {
        let dir = ring_dir("encryption_key = \"a.key\"\n");
        let path = dir.path().join("keys.toml");
        let ring = DaemonRing::load(RingLocation::Explicit(path.clone())).unwrap();
        let key = ring.encryption_key().unwrap().unwrap();
        assert_eq!(key.name, "daemon:encryption_key");
        assert_eq!(key.key.fingerprint, fingerprint(KEY_A.as_bytes()));

        write(
            &path,
            "encryption_key = \"b.key\"\ndecryption_key1 = \"a.key\"\n",
            0o600,
        );
        let key = ring.encryption_key().unwrap().unwrap();
        assert_eq!(key.key.fingerprint, fingerprint(KEY_B.as_bytes()));
        assert_eq!(ring.candidates().unwrap().len(), 2);

        // A key file replaced in place is picked up too.
        write(&dir.path().join("b.key"), KEY_A, 0o600);
        let key = ring.encryption_key().unwrap().unwrap();
        assert_eq!(key.key.fingerprint, fingerprint(KEY_A.as_bytes()));

        // Broken since start-up: the use fails, naming the file.
        write(&path, "encryption_key = \"missing.key\"\n", 0o600);
        let message = no_key_message(ring.encryption_key().unwrap_err());
        assert!(
            message.contains("missing.key") && message.contains("cannot open"),
            "{message}"
        );

        // No encryption_key now: the job is told what to do.
        write(&path, "decryption_key1 = \"a.key\"\n", 0o600);
        assert!(ring.encryption_key().unwrap().is_none());
        let message = no_key_message(encryption_key_for_job(Some(&ring)).unwrap_err());
        assert!(
            message.contains("has no encryption_key") && message.contains("--key-file"),
            "{message}"
        );
    }

    #[test]
    fn without_a_ring_a_job_gets_no_key_saying_what_to_do() {
        let message = no_key_message(encryption_key_for_job(None).unwrap_err());
        assert!(
            message.contains("--key-file") && message.contains(SYSTEM_RING),
            "{message}"
        );
    }

    #[test]
    fn encryption_key_reads_only_its_own_key_file() {
        let dir = ring_dir("encryption_key = \"a.key\"\ndecryption_key1 = \"gone.key\"\n");
        let location = RingLocation::Explicit(dir.path().join("keys.toml"));
        // Start-up validates every key...
        let message = no_key_message(DaemonRing::load(location.clone()).unwrap_err());
        assert!(
            message.contains("decryption_key1") && message.contains("gone.key"),
            "{message}"
        );
        // ...but a later encrypt does not need the decryption keys.
        write(&dir.path().join("gone.key"), KEY_B, 0o600);
        let ring = DaemonRing::load(location).unwrap();
        std::fs::remove_file(dir.path().join("gone.key")).unwrap();
        assert!(ring.encryption_key().unwrap().is_some());
        assert!(ring.candidates().is_err());
    }

    #[test]
    fn group_or_other_writable_files_are_refused_with_the_fix() {
        let dir = ring_dir("encryption_key = \"a.key\"\n");
        let path = dir.path().join("keys.toml");
        for mode in [0o620, 0o602, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let message =
                no_key_message(DaemonRing::load(RingLocation::Explicit(path.clone())).unwrap_err());
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains(&format!("mode {mode:04o}")), "{message}");
            assert!(
                message.contains(&format!(
                    "chown root:root {0}; chmod 600 {0}",
                    path.display()
                )),
                "{message}"
            );
        }
        // Readable by others is only a warning.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        DaemonRing::load(RingLocation::Explicit(path.clone())).unwrap();

        // The same rule for key files.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = dir.path().join("a.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o660)).unwrap();
        let message = no_key_message(DaemonRing::load(RingLocation::Explicit(path)).unwrap_err());
        assert!(
            message.contains("encryption_key") && message.contains(&key.display().to_string()),
            "{message}"
        );
        assert!(message.contains("writable by group or others"), "{message}");
    }

    #[test]
    fn files_owned_by_another_user_are_refused() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root to chown"
        );
        let dir = ring_dir("encryption_key = \"a.key\"\n");
        let path = dir.path().join("keys.toml");
        std::os::unix::fs::chown(&path, Some(1000), Some(1000)).unwrap();
        let message =
            no_key_message(DaemonRing::load(RingLocation::Explicit(path.clone())).unwrap_err());
        assert!(message.contains("owned by uid 1000"), "{message}");
        assert!(message.contains("chown root:root"), "{message}");

        std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
        std::os::unix::fs::chown(dir.path().join("a.key"), Some(1000), None).unwrap();
        let message = no_key_message(DaemonRing::load(RingLocation::Explicit(path)).unwrap_err());
        assert!(
            message.contains("a.key") && message.contains("owned by uid 1000"),
            "{message}"
        );
    }

    #[test]
    fn links_and_non_regular_files_are_refused() {
        let dir = ring_dir("encryption_key = \"a.key\"\n");
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(dir.path().join("keys.toml"), &link).unwrap();
        let message = no_key_message(DaemonRing::load(RingLocation::Explicit(link)).unwrap_err());
        assert!(message.contains("symbolic link"), "{message}");

        let fifo = dir.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let message = no_key_message(DaemonRing::load(RingLocation::Explicit(fifo)).unwrap_err());
        assert!(message.contains("not a regular file"), "{message}");

        let message = no_key_message(
            DaemonRing::load(RingLocation::Explicit(dir.path().to_path_buf())).unwrap_err(),
        );
        assert!(message.contains("not a regular file"), "{message}");
    }

    #[test]
    fn ring_format_errors_and_bad_keys_name_the_file() {
        let dir = ring_dir("encrypton_key = \"a.key\"\n");
        let path = dir.path().join("keys.toml");
        let message =
            no_key_message(DaemonRing::load(RingLocation::Explicit(path.clone())).unwrap_err());
        assert!(
            message.starts_with(&format!("daemon key ring {}: unknown key", path.display())),
            "{message}"
        );
        write(&path, "encryption_key = \"a.key\"\n", 0o600);
        write(&dir.path().join("a.key"), &format!("{KEY_A}\n"), 0o600);
        let message = no_key_message(DaemonRing::load(RingLocation::Explicit(path)).unwrap_err());
        assert!(
            message.contains("a.key") && message.contains("newline"),
            "{message}"
        );
    }

    #[test]
    fn only_root_and_the_daemons_own_user_may_decrypt() {
        let own = nix::unistd::geteuid().as_raw();
        assert!(may_decrypt_with(0));
        assert!(may_decrypt_with(own));
        assert!(!may_decrypt_with(if own == 1000 { 1001 } else { 1000 }));
    }
}
