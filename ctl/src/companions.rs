//! The files a source references — backing files, parent disks, VMDK extents — found and opened
//! by imgctl with the user's own rights, because the daemon opens no path.
//!
//! imgctl does not parse image formats. It makes the call; when the daemon answers
//! `io.imgcrypt.NeedFile` (this file names that one, by these names), imgctl resolves the names
//! as qemu does — an absolute name as it is, a relative one against the directory of the file
//! that names it — opens the first that exists, and makes the call again with it passed. Each
//! round adds one file, and a name asked for twice stops the loop, so a chain costs one
//! metadata read per layer and the loop always ends.
//!
//! A name comes from the image, which may be hostile: the file is opened read-only, non-blocking
//! (a FIFO cannot hang imgctl) and without becoming a controlling terminal, and anything that is
//! not a regular file or block device is refused. imgctl could read every such file anyway.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use imgcrypt_proto::api::Companion;

use crate::error::{CtlError, Result};

/// Most companions one source may have: the daemon's own limit (`MAX_COMPANIONS`).
pub const MAX_COMPANIONS: usize = 96;

/// What the daemon asked for in an `io.imgcrypt.NeedFile` error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedFile {
    /// The daemon's message, for a client that cannot resolve it.
    pub message: String,
    /// The file naming it: 0 for the source, k for companion k.
    pub referenced_by: u32,
    /// `backing_file`, `parent`, `extent`, `data_file`.
    pub relation: String,
    /// The names to try, in order.
    pub candidates: Vec<String>,
}

/// The companions opened so far for one source.
#[derive(Debug)]
pub struct Companions {
    source: PathBuf,
    files: Vec<File>,
    paths: Vec<PathBuf>,
    names: Vec<(u32, String)>,
}

impl Companions {
    /// None yet, for the source at `source` (as the user named it).
    pub fn new(source: &Path) -> Self {
        Self {
            source: source.to_path_buf(),
            files: Vec::new(),
            paths: Vec::new(),
            names: Vec::new(),
        }
    }

    /// The descriptors, in the order of [`Self::refs`].
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.files.iter().map(|file| file.as_fd())
    }

    /// The protocol's references, descriptors numbered from `first_fd`.
    pub fn refs(&self, first_fd: u32) -> Vec<Companion> {
        self.names
            .iter()
            .enumerate()
            .map(|(index, (referenced_by, name))| Companion {
                fd: first_fd + index as u32,
                name: name.clone(),
                referenced_by: *referenced_by,
            })
            .collect()
    }

    /// The path of file `number` (0: the source).
    fn path_of(&self, number: u32) -> Option<&Path> {
        match number {
            0 => Some(&self.source),
            k => self.paths.get(k as usize - 1).map(PathBuf::as_path),
        }
    }

    /// Opens the file `need` asks for. Errors say which file named it, every path tried and
    /// why each failed, and how to fix the reference.
    pub fn add(&mut self, need: &NeedFile) -> Result<()> {
        let protocol = |why: &str| CtlError::Protocol(format!("{why}: {}", need.message));
        let referencing = self
            .path_of(need.referenced_by)
            .ok_or_else(|| protocol("the daemon asked for a file named by a file never passed"))?
            .to_path_buf();
        if self.names.len() >= MAX_COMPANIONS {
            return Err(CtlError::Usage(format!(
                "{} references more than {MAX_COMPANIONS} files (backing files, parents, \
                 extents); convert it to one file first: qemu-img convert -O qcow2 {} FLAT.qcow2",
                self.source.display(),
                self.source.display()
            )));
        }
        let already = need.candidates.iter().any(|candidate| {
            self.names
                .iter()
                .any(|(by, name)| *by == need.referenced_by && name == candidate)
        });
        if already || need.candidates.is_empty() {
            return Err(protocol("the daemon asked again for a file already passed"));
        }
        let directory = match referencing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tried = Vec::new();
        for candidate in &need.candidates {
            let path = if Path::new(candidate).is_absolute() {
                PathBuf::from(candidate)
            } else {
                directory.join(candidate)
            };
            match open_companion(&path) {
                Ok(file) => {
                    self.files.push(file);
                    self.paths.push(path);
                    self.names.push((need.referenced_by, candidate.clone()));
                    return Ok(());
                }
                Err(why) => tried.push(format!("{} ({why})", path.display())),
            }
        }
        let what = describe(&need.relation);
        Err(CtlError::File {
            path: referencing.clone(),
            message: format!(
                "needs its {what} `{}`, and no file could be opened for it; tried: {}. Put the \
                 file there, or {}",
                need.candidates[0],
                tried.join("; "),
                fix(&need.relation, &referencing)
            ),
        })
    }
}

/// Opens one candidate: read-only, and only a regular file or block device.
fn open_companion(path: &Path) -> std::result::Result<File, String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => "not found".to_string(),
            _ => error.to_string(),
        })?;
    let kind = file
        .metadata()
        .map_err(|error| error.to_string())?
        .file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err("not a regular file or block device".into());
    }
    Ok(file)
}

fn describe(relation: &str) -> &str {
    match relation {
        "backing_file" => "backing file",
        "parent" => "parent disk",
        "extent" => "extent file",
        "data_file" => "external data file",
        other => other,
    }
}

/// How to point the image at a file that moved.
fn fix(relation: &str, image: &Path) -> String {
    match relation {
        "backing_file" => format!(
            "point the image at it: qemu-img rebase -u -b NEW_PATH -F FORMAT {}",
            image.display()
        ),
        "data_file" => format!(
            "point the image at it: qemu-img amend -o data_file=NEW_PATH {}",
            image.display()
        ),
        "extent" => format!(
            "edit the extent lines of the descriptor {}",
            image.display()
        ),
        _ => format!(
            "re-link the differencing disk {} to its parent (Hyper-V's Edit Disk > Reconnect, \
             or `vhd-util modify -p`)",
            image.display()
        ),
    }
}

/// Whether `file` may be an image that references other files (qcow2, VHD, VHDX, VMDK or its
/// descriptor, a tar/OVA), by the signatures the daemon detects formats by. Only a hint for
/// `--detach`, which resolves companions beforehand with an `Inspect` that, like any job,
/// waits for a slot: a source with none of these signatures (a RAW disk) is detached at once.
/// The daemon still decides what the file is: a wrong "no" only means the detached job fails
/// with `NeedFile`, a wrong "yes" costs one `Inspect`. An unreadable file says "yes".
pub fn may_reference_files(file: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 512];
    let Ok(read) = file.read_at(&mut head, 0) else {
        return true;
    };
    let head = &head[..read];
    let signature_at = |bytes: &[u8], offset: usize, signature: &[u8]| {
        bytes.get(offset..offset + signature.len()) == Some(signature)
    };
    let signed = [&b"QFI\xfb"[..], b"vhdxfile", b"conectix", b"KDMV", b"COWD"]
        .iter()
        .any(|signature| signature_at(head, 0, signature))
        || signature_at(head, 257, b"ustar");
    // A VMDK descriptor is text; a disk's first sector almost never is.
    let text = !head.is_empty()
        && head
            .iter()
            .all(|&byte| byte.is_ascii_graphic() || byte.is_ascii_whitespace());
    // A VHD's footer is its last 512 bytes (511 for some old writers).
    let size = match file.metadata() {
        Ok(metadata) if metadata.is_file() => metadata.len(),
        _ => return true,
    };
    let mut tail = [0u8; 513];
    let tail_start = size.saturating_sub(513);
    let footer = match file.read_at(&mut tail, tail_start) {
        Ok(read) => tail[..read].windows(8).any(|window| window == b"conectix"),
        Err(_) => true,
    };
    signed || text || footer
}

/// Runs `call` with the companions found so far, adding the file the daemon asks for after each
/// `NeedFile` answer, until the call succeeds or fails otherwise.
pub fn with_companions<T>(
    companions: &mut Companions,
    mut call: impl FnMut(&Companions) -> Result<T>,
) -> Result<T> {
    loop {
        match call(companions) {
            Err(CtlError::NeedFile(need)) => companions.add(&need)?,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(referenced_by: u32, candidates: &[&str]) -> NeedFile {
        NeedFile {
            message: "m".into(),
            referenced_by,
            relation: "backing_file".into(),
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn names_resolve_against_the_directory_of_the_file_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("a/top.qcow2"), b"top").unwrap();
        std::fs::write(dir.path().join("b/mid.qcow2"), b"mid").unwrap();
        std::fs::write(dir.path().join("b/base.raw"), b"base").unwrap();
        let mut companions = Companions::new(&dir.path().join("a/top.qcow2"));
        // A missing first candidate is skipped.
        companions
            .add(&need(0, &["missing.qcow2", "../b/mid.qcow2"]))
            .unwrap();
        // Relative to b/, where the file naming it lives, not to a/.
        companions.add(&need(1, &["base.raw"])).unwrap();
        let absolute = dir.path().join("b/base.raw");
        companions
            .add(&need(2, &[absolute.to_str().unwrap()]))
            .unwrap();
        let refs = companions.refs(3);
        assert_eq!(
            refs.iter()
                .map(|r| (r.fd, r.name.as_str(), r.referenced_by))
                .collect::<Vec<_>>(),
            vec![
                (3, "../b/mid.qcow2", 0),
                (4, "base.raw", 1),
                (5, absolute.to_str().unwrap(), 2)
            ]
        );
        assert_eq!(companions.fds().count(), 3);
        // Asked again: a daemon bug or a loop, never an endless one.
        assert!(matches!(
            companions.add(&need(1, &["base.raw"])),
            Err(CtlError::Protocol(_))
        ));
        // Named by a file that was never passed.
        assert!(matches!(
            companions.add(&need(9, &["x"])),
            Err(CtlError::Protocol(_))
        ));
    }

    #[test]
    fn only_files_with_a_format_signature_may_reference_files() {
        let dir = tempfile::tempdir().unwrap();
        let check = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            may_reference_files(&File::open(&path).unwrap())
        };
        let mut raw = vec![0u8; 1 << 20];
        raw[510] = 0x55;
        raw[511] = 0xaa;
        assert!(!check("disk.raw", &raw));
        let mut qcow2 = raw.clone();
        qcow2[..4].copy_from_slice(b"QFI\xfb");
        assert!(check("disk.qcow2", &qcow2));
        let mut vhd = raw.clone();
        let footer = vhd.len() - 512;
        vhd[footer..footer + 8].copy_from_slice(b"conectix");
        assert!(check("disk.vhd", &vhd));
        assert!(check("disk.vmdk", b"# Disk DescriptorFile\nversion=1\n"));
        // A block device is left to the daemon.
        if let Ok(device) = File::open("/dev/loop-control") {
            assert!(may_reference_files(&device));
        }
    }

    #[test]
    fn a_missing_file_or_a_fifo_is_an_error_naming_every_path_tried() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut companions = Companions::new(&dir.path().join("top.qcow2"));
        let error = companions
            .add(&need(0, &["gone.qcow2", "fifo"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("gone.qcow2 (not found)"), "{error}");
        assert!(error.contains("fifo (not a regular file"), "{error}");
        assert!(error.contains("qemu-img rebase -u -b"), "{error}");
        assert_eq!(companions.refs(0), Vec::new());
    }
}
