//! The files one source is made of: the image the client passed as `source`, and the companions
//! it references by name — backing files and parents (qcow2, VHD and VHDX chains), VMDK extents,
//! qcow2 external data files.
//!
//! The daemon never opens a path. A format module that needs a companion asks [`SourceFiles::
//! companion`] for it by the names the image records; when the client did not pass it, the
//! answer is [`Error::NeedFile`], which tells the client which file, named how, by which file.
//! imgctl then resolves the name the way qemu does (relative to the directory of the file that
//! names it), opens it with the user's own rights, and repeats the call with it passed. A client
//! can only ever hand over files it could read itself, so a hostile image can make the daemon
//! read nothing its caller could not.
//!
//! Chains are bounded: at most [`MAX_COMPANIONS`] companions per call and [`MAX_CHAIN_DEPTH`]
//! layers, and a file that is its own ancestor (the same inode) is a cycle, refused. The parsed
//! metadata of all layers together is bounded too ([`MAX_CHAIN_METADATA_BYTES`]): each format
//! bounds its own tables, and each layer charges what it keeps ([`SourceFiles::charge_metadata`])
//! as soon as it has parsed them, before it opens the layer below, so a hostile chain of
//! sixteen layers with the largest tables each is refused part-way instead of held whole.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::keys::SecretBytes;
use crate::{Error, Result};

/// Most companions one call may pass: the frame's descriptor limit (104) less the source,
/// output and key descriptors and a margin. A twoGbMaxExtent VMDK of up to 190 GiB fits.
pub const MAX_COMPANIONS: usize = 96;

/// Most layers in a backing chain, the image itself included. qemu has no fixed limit; 16 is
/// far beyond the depth real build pipelines make (base, a few overlays) and bounds the work a
/// hostile chain can cause.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Most memory the parsed metadata of one source's layers may hold together (block tables, grain
/// tables, run and range lists, bitmaps). One layer's own limits allow up to about 300 MiB (a
/// 2 TiB monolithicSparse VMDK's grain tables: 256 MiB); a real chain holds a few MiB. Without
/// this bound, sixteen crafted layers could make one call hold gigabytes.
pub const MAX_CHAIN_METADATA_BYTES: u64 = 512 << 20;

/// Which file of a [`SourceFiles`]: the source (0) or the k-th companion passed (k).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey(usize);

impl FileKey {
    /// The file passed as `source`.
    pub const SOURCE: FileKey = FileKey(0);

    /// The wire number: 0 for the source, k for `companions[k - 1]`.
    pub fn wire(self) -> u32 {
        self.0 as u32
    }
}

/// What a companion is to the file that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// A qcow2 backing file.
    BackingFile,
    /// A VHD or VHDX differencing disk's parent.
    Parent,
    /// One extent of a VMDK described by a text descriptor.
    Extent,
    /// A qcow2 external data file.
    DataFile,
}

impl Relation {
    /// The wire name (an `io.imgcrypt.NeedFile` parameter).
    pub fn wire(self) -> &'static str {
        match self {
            Self::BackingFile => "backing_file",
            Self::Parent => "parent",
            Self::Extent => "extent",
            Self::DataFile => "data_file",
        }
    }

    /// How messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::BackingFile => "backing file",
            Self::Parent => "parent disk",
            Self::Extent => "extent file",
            Self::DataFile => "external data file",
        }
    }
}

#[derive(Debug)]
struct Entry {
    file: Arc<File>,
    /// The name the referencing file records (the client's own name for the source).
    name: String,
    /// The file that names this one; None for the source.
    referenced_by: Option<FileKey>,
    /// Device and inode, to find cycles.
    identity: (u64, u64),
}

/// The source's files, as passed with one call.
#[derive(Debug)]
pub struct SourceFiles {
    entries: Vec<Entry>,
    /// The source's volume key, when it is an encrypted image the job unlocked (an encrypted
    /// qcow2 read with `--source-key-file`).
    source_volume_key: Option<SecretBytes>,
    /// Metadata bytes the layers opened so far keep ([`Self::charge_metadata`]).
    metadata_bytes: AtomicU64,
    /// Most they may keep: [`MAX_CHAIN_METADATA_BYTES`] unless a test lowers it.
    metadata_budget: u64,
    /// How many layers have charged.
    layers_charged: AtomicUsize,
}

/// One companion as the client passed it.
#[derive(Debug)]
pub struct Passed {
    /// The descriptor, already checked readable.
    pub file: File,
    /// The name, exactly as the referencing file records it (one of the candidates a
    /// [`Error::NeedFile`] listed).
    pub name: String,
    /// Wire number of the referencing file: 0 for the source, k for companion k.
    pub referenced_by: u32,
}

fn identity(file: &File, what: &str) -> Result<(u64, u64)> {
    let metadata = file
        .metadata()
        .map_err(|error| Error::io(format!("fstat the {what}"), error))?;
    Ok((metadata.dev(), metadata.ino()))
}

impl SourceFiles {
    /// A source with no companions.
    pub fn single(source: File) -> Result<Self> {
        Self::new(source, Vec::new())
    }

    /// The source and its companions. Each companion must be named by the source or by an
    /// earlier companion, and no file may name the same companion twice.
    pub fn new(source: File, companions: Vec<Passed>) -> Result<Self> {
        if companions.len() > MAX_COMPANIONS {
            return Err(Error::InvalidOption {
                parameter: "companions",
                message: format!(
                    "{} companion files passed; at most {MAX_COMPANIONS} are read for one \
                     source: convert the image to one file first (`qemu-img convert -O qcow2`)",
                    companions.len()
                ),
            });
        }
        let mut entries = vec![Entry {
            identity: identity(&source, "source")?,
            file: Arc::new(source),
            name: "source".into(),
            referenced_by: None,
        }];
        for (index, passed) in companions.into_iter().enumerate() {
            let number = index + 1;
            let referencing = passed.referenced_by as usize;
            if referencing >= number {
                return Err(Error::InvalidOption {
                    parameter: "companions",
                    message: format!(
                        "companion {number} says file {referencing} names it; a companion must \
                         be named by the source (0) or by an earlier companion"
                    ),
                });
            }
            let duplicate = entries.iter().any(|entry| {
                entry.referenced_by == Some(FileKey(referencing)) && entry.name == passed.name
            });
            if duplicate || passed.name.is_empty() || passed.name.len() > 4096 {
                return Err(Error::InvalidOption {
                    parameter: "companions",
                    message: format!(
                        "companion {number}: its name is empty, longer than 4096 bytes, or \
                         passed twice for file {referencing}"
                    ),
                });
            }
            entries.push(Entry {
                identity: identity(&passed.file, "companion file")?,
                file: Arc::new(passed.file),
                name: passed.name,
                referenced_by: Some(FileKey(referencing)),
            });
        }
        Ok(Self {
            entries,
            source_volume_key: None,
            metadata_bytes: AtomicU64::new(0),
            metadata_budget: MAX_CHAIN_METADATA_BYTES,
            layers_charged: AtomicUsize::new(0),
        })
    }

    /// Adds the `bytes` of parsed metadata that layer `key` keeps to the source's total, and
    /// refuses the source when the total passes [`MAX_CHAIN_METADATA_BYTES`]. A format calls
    /// this as soon as its layout is built, before it opens the layer below.
    pub fn charge_metadata(&self, key: FileKey, bytes: u64) -> Result<()> {
        let total = self.metadata_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let layers = self.layers_charged.fetch_add(1, Ordering::Relaxed) + 1;
        if total <= self.metadata_budget {
            return Ok(());
        }
        Err(Error::UnsupportedImage {
            message: format!(
                "the tables of this source's layers need more than the {} MiB of memory one \
                 source may use: {layers} layer(s) read so far hold {} MiB, `{}` {} MiB of \
                 them; merge the chain into one image first (`qemu-img convert -O qcow2 TOP \
                 MERGED.qcow2`) and encrypt that",
                self.metadata_budget >> 20,
                total.div_ceil(1 << 20),
                self.name(key),
                bytes.div_ceil(1 << 20),
            ),
        })
    }

    /// Metadata bytes the layers opened so far have charged.
    pub fn metadata_charged(&self) -> u64 {
        self.metadata_bytes.load(Ordering::Relaxed)
    }

    /// Lowers the chain-wide metadata budget (tests reach it with small images this way).
    pub fn set_metadata_budget(&mut self, bytes: u64) {
        self.metadata_budget = bytes.min(MAX_CHAIN_METADATA_BYTES);
    }

    /// Gives the source's volume key, for a source that is an encrypted image the job unlocked.
    pub fn set_source_volume_key(&mut self, volume_key: SecretBytes) {
        self.source_volume_key = Some(volume_key);
    }

    /// The volume key that decrypts `key`'s data, if the job unlocked it (only the source's).
    pub fn volume_key(&self, key: FileKey) -> Option<&SecretBytes> {
        self.source_volume_key
            .as_ref()
            .filter(|_| key == FileKey::SOURCE)
    }

    /// The file behind `key`.
    pub fn file(&self, key: FileKey) -> &Arc<File> {
        &self.entries[key.0].file
    }

    /// The name `key` is known by: what the image naming it records, `source` for the source.
    pub fn name(&self, key: FileKey) -> &str {
        &self.entries[key.0].name
    }

    /// How many companions were passed.
    pub fn companion_count(&self) -> usize {
        self.entries.len() - 1
    }

    /// The companion `referencing` names, by the first of `candidates` (the names the image
    /// records, in the order a resolver should try them) that the client passed; or
    /// [`Error::NeedFile`] asking for it.
    pub fn companion(
        &self,
        referencing: FileKey,
        relation: Relation,
        candidates: &[String],
    ) -> Result<FileKey> {
        for candidate in candidates {
            let found = self.entries.iter().position(|entry| {
                entry.referenced_by == Some(referencing) && entry.name == *candidate
            });
            if let Some(index) = found {
                return Ok(FileKey(index));
            }
        }
        Err(Error::NeedFile {
            referenced_by: referencing.wire(),
            referencing_name: self.name(referencing).to_string(),
            relation,
            candidates: candidates.to_vec(),
        })
    }

    /// Checks that `key` may be opened as the layer below `above` (the layers over it, the
    /// top first): the chain stays within [`MAX_CHAIN_DEPTH`] and `key` is none of them.
    pub fn check_chain(&self, key: FileKey, above: &[FileKey]) -> Result<()> {
        if above.len() + 1 > MAX_CHAIN_DEPTH {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "the backing chain is deeper than {MAX_CHAIN_DEPTH} layers (at `{}`): \
                     flatten it first with `qemu-img convert -O qcow2 SRC FLAT.qcow2`",
                    self.name(key)
                ),
            });
        }
        let identity = self.entries[key.0].identity;
        if let Some(same) = above
            .iter()
            .find(|layer| self.entries[layer.0].identity == identity)
        {
            return Err(Error::corrupt(
                format!(
                    "the backing chain is a cycle: `{}` is the same file as `{}` above it; fix \
                     the image's backing reference (`qemu-img rebase -u -b …`)",
                    self.name(key),
                    self.name(*same)
                ),
                None,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(file: &File, name: &str, referenced_by: u32) -> Passed {
        Passed {
            file: file.try_clone().unwrap(),
            name: name.into(),
            referenced_by,
        }
    }

    #[test]
    fn companions_are_found_by_name_and_referencing_file_or_asked_for() {
        let source = tempfile::tempfile().unwrap();
        let base = tempfile::tempfile().unwrap();
        let deeper = tempfile::tempfile().unwrap();
        let files = SourceFiles::new(
            source,
            vec![
                passed(&base, "base.qcow2", 0),
                passed(&deeper, "base.qcow2", 1),
            ],
        )
        .unwrap();
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let first = files
            .companion(
                FileKey::SOURCE,
                Relation::BackingFile,
                &names(&["x", "base.qcow2"]),
            )
            .unwrap();
        assert_eq!(first.wire(), 1);
        let second = files
            .companion(first, Relation::BackingFile, &names(&["base.qcow2"]))
            .unwrap();
        assert_eq!(second.wire(), 2);
        match files.companion(second, Relation::Parent, &names(&["p.vhd", "./p.vhd"])) {
            Err(Error::NeedFile {
                referenced_by,
                relation,
                candidates,
                ..
            }) => {
                assert_eq!(referenced_by, 2);
                assert_eq!(relation, Relation::Parent);
                assert_eq!(candidates, names(&["p.vhd", "./p.vhd"]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forward_references_duplicates_depth_and_cycles_are_refused() {
        let source = tempfile::tempfile().unwrap();
        let other = tempfile::tempfile().unwrap();
        let forward = SourceFiles::new(source.try_clone().unwrap(), vec![passed(&other, "a", 1)]);
        assert!(matches!(forward, Err(Error::InvalidOption { .. })));
        let twice = SourceFiles::new(
            source.try_clone().unwrap(),
            vec![passed(&other, "a", 0), passed(&other, "a", 0)],
        );
        assert!(matches!(twice, Err(Error::InvalidOption { .. })));
        // The source passed again as its own backing file: a cycle.
        let files = SourceFiles::new(
            source.try_clone().unwrap(),
            vec![passed(&source, "self", 0)],
        )
        .unwrap();
        let again = files
            .companion(FileKey::SOURCE, Relation::BackingFile, &["self".into()])
            .unwrap();
        assert!(matches!(
            files.check_chain(again, &[FileKey::SOURCE]),
            Err(Error::CorruptImage { .. })
        ));
        let deep = vec![FileKey::SOURCE; MAX_CHAIN_DEPTH];
        let files = SourceFiles::new(source, vec![passed(&other, "b", 0)]).unwrap();
        let key = files
            .companion(FileKey::SOURCE, Relation::BackingFile, &["b".into()])
            .unwrap();
        assert!(files.check_chain(key, &deep[..1]).is_ok());
        assert!(matches!(
            files.check_chain(key, &deep),
            Err(Error::UnsupportedImage { .. })
        ));
    }
}
