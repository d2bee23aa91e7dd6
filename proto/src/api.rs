//! The `io.imgcrypt` Varlink interface: method names, parameter and reply types, error names.
//!
//! The human-readable definition is `docs/io.imgcrypt.varlink`; it is compiled in here so
//! `GetInterfaceDescription` always serves exactly what is documented, and a test checks that
//! these types and that text name the same fields.

use serde::{Deserialize, Serialize};

/// Interface name.
pub const INTERFACE: &str = "io.imgcrypt";
/// The interface definition served by `GetInterfaceDescription`.
pub const INTERFACE_DESCRIPTION: &str = include_str!("../../docs/io.imgcrypt.varlink");
/// `io.imgcrypt.Encrypt`.
pub const ENCRYPT: &str = "io.imgcrypt.Encrypt";
/// `io.imgcrypt.Inspect`.
pub const INSPECT: &str = "io.imgcrypt.Inspect";
/// `io.imgcrypt.Decrypt`.
pub const DECRYPT: &str = "io.imgcrypt.Decrypt";
/// `io.imgcrypt.Verify`.
pub const VERIFY: &str = "io.imgcrypt.Verify";
/// `io.imgcrypt.Rewrite`.
pub const REWRITE: &str = "io.imgcrypt.Rewrite";
// --- jobs ---
/// `io.imgcrypt.Jobs`.
pub const JOBS: &str = "io.imgcrypt.Jobs";
/// `io.imgcrypt.Status`.
pub const STATUS: &str = "io.imgcrypt.Status";
/// `io.imgcrypt.Cancel`.
pub const CANCEL: &str = "io.imgcrypt.Cancel";
/// `io.imgcrypt.Wait`.
pub const WAIT: &str = "io.imgcrypt.Wait";

/// Error names of `io.imgcrypt`, one per kind of failure a client may want to match.
pub mod errors {
    /// The key file breaks a rule.
    pub const INVALID_KEY_FILE: &str = "io.imgcrypt.InvalidKeyFile";
    /// Format not readable by this version.
    pub const UNSUPPORTED_IMAGE: &str = "io.imgcrypt.UnsupportedImage";
    /// Damaged or inconsistent source.
    pub const CORRUPT_IMAGE: &str = "io.imgcrypt.CorruptImage";
    /// Wrong descriptor type or access mode.
    pub const BAD_DESCRIPTOR: &str = "io.imgcrypt.BadDescriptor";
    /// Invalid option or combination.
    pub const INVALID_OPTION: &str = "io.imgcrypt.InvalidOption";
    /// Output cannot hold the image.
    pub const NO_SPACE: &str = "io.imgcrypt.NoSpace";
    /// Engine cannot run here.
    pub const ENGINE_UNAVAILABLE: &str = "io.imgcrypt.EngineUnavailable";
    /// libcryptsetup failure.
    pub const LUKS_ERROR: &str = "io.imgcrypt.LuksError";
    /// Read or write failure.
    pub const IO_ERROR: &str = "io.imgcrypt.IoError";
    /// Caller not allowed.
    pub const PERMISSION_DENIED: &str = "io.imgcrypt.PermissionDenied";
    /// Malformed, oversized or out-of-protocol message.
    pub const PROTOCOL_ERROR: &str = "io.imgcrypt.ProtocolError";
    /// No key passed (or in the daemon's ring) opens the image.
    pub const WRONG_KEY: &str = "io.imgcrypt.WrongKey";
    /// The call needs a key and none was passed, and the daemon has no key ring to fall back on.
    pub const NO_KEY: &str = "io.imgcrypt.NoKey";
    /// The caller already has as many jobs waiting as the daemon allows one user.
    pub const TOO_MANY_JOBS: &str = "io.imgcrypt.TooManyJobs";
    /// The daemon holds as many connections as it allows (one user's, or everyone's).
    pub const TOO_MANY_CONNECTIONS: &str = "io.imgcrypt.TooManyConnections";
    /// The source names a file (backing file, parent, extent) that was not passed.
    pub const NEED_FILE: &str = "io.imgcrypt.NeedFile";
    /// An encryption stopped with its progress checkpointed (`offset`: the payload bytes
    /// kept): the same call again resumes there.
    pub const INTERRUPTED: &str = "io.imgcrypt.Interrupted";
    // --- jobs ---
    /// No job with this id that the caller may see (unknown, expired, or another user's:
    /// the same error for all three).
    pub const NO_SUCH_JOB: &str = "io.imgcrypt.NoSuchJob";
}

/// LUKS on-disk format version.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LuksVersion {
    /// LUKS1: 2 MiB header, pbkdf2 only, 512-byte sectors only.
    Luks1,
    /// LUKS2: cryptsetup's default since 2.1.
    #[default]
    Luks2,
}

impl LuksVersion {
    /// "LUKS1" / "LUKS2".
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Luks1 => "LUKS1",
            Self::Luks2 => "LUKS2",
        }
    }
}

/// Key-derivation function of a keyslot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PbkdfKind {
    /// Memory-hard; LUKS2 only.
    Argon2id,
    /// The only choice for LUKS1.
    Pbkdf2,
}

/// Which engine writes the payload.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// The kernel engine where dm-crypt is usable, else userspace.
    #[default]
    Auto,
    /// AES-XTS in the daemon's own process.
    Userspace,
    /// Loop device plus dm-crypt.
    Kernel,
}

/// The engine that actually ran.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// AES-XTS in the daemon's own process.
    Userspace,
    /// Loop device plus dm-crypt.
    Kernel,
}

/// Keyslot key-derivation settings; every field falls back to cryptsetup's default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pbkdf {
    /// Function; argon2id for LUKS2 and pbkdf2 for LUKS1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PbkdfKind>,
    /// Target unlock time in milliseconds (benchmarked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iter_time_ms: Option<u32>,
    /// Fixed iteration count, skipping the benchmark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u32>,
    /// Argon2 memory cost in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_kib: Option<u32>,
    /// Argon2 threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
}

/// The container of an encrypted image.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Raw LUKS (LUKS1 or LUKS2): cryptsetup, dm-crypt, OpenStack Cinder volumes.
    #[default]
    Luks,
    /// qcow2 v3 with qemu's built-in LUKS encryption (a LUKS1 header inside the file):
    /// IBM Cloud VPC, OpenStack.
    Qcow2,
    /// A dynamic VHD encrypted the way blktap's `vhd-util copy -k` does: IBM Cloud classic.
    Vhd,
}

impl OutputFormat {
    /// How users name it.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Luks => "raw LUKS",
            Self::Qcow2 => "qcow2 with LUKS encryption",
            Self::Vhd => "VHD encrypted as blktap's vhd-util does",
        }
    }

    /// The name on the command line (`--format`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Luks => "luks",
            Self::Qcow2 => "qcow2",
            Self::Vhd => "vhd",
        }
    }
}

/// A cloud whose import rules an encryption is checked against before any byte is written.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Plain LUKS: cryptsetup, dm-crypt, the 2018 IBM Cloud classic procedure.
    Luks,
    /// IBM Cloud VPC custom images: qcow2 with LUKS.
    IbmVpc,
    /// IBM Cloud classic image templates: vhd-util-encrypted VHD.
    IbmClassic,
    /// OpenStack encrypted images: qcow2 with LUKS.
    Openstack,
}

impl Target {
    /// The output format the target imports.
    pub fn format(self) -> OutputFormat {
        match self {
            Self::Luks => OutputFormat::Luks,
            Self::IbmVpc | Self::Openstack => OutputFormat::Qcow2,
            Self::IbmClassic => OutputFormat::Vhd,
        }
    }

    /// The name on the command line (`--target`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Luks => "luks",
            Self::IbmVpc => "ibm-vpc",
            Self::IbmClassic => "ibm-classic",
            Self::Openstack => "openstack",
        }
    }

    /// How users name it.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Luks => "plain LUKS",
            Self::IbmVpc => "IBM Cloud VPC",
            Self::IbmClassic => "IBM Cloud classic",
            Self::Openstack => "OpenStack",
        }
    }
}

/// A key file passed with a call: its descriptor and the name the user knows it by.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyRef {
    /// Index of the key-file descriptor among those passed with the call.
    pub fd: u32,
    /// How the user names it in messages: `encryption_key`, `decryption_key3`, `--key-file`.
    pub name: String,
}

/// A file a source references (a backing file, a parent disk, a VMDK extent), opened by the
/// client and passed with the call because the daemon opens no path. The daemon asks for each
/// one with `io.imgcrypt.NeedFile`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Companion {
    /// Index of its descriptor (readable) among those passed with the call.
    pub fd: u32,
    /// The name exactly as the referencing file records it: one of `NeedFile`'s `candidates`.
    pub name: String,
    /// The file that names it: 0 for the source, k for the k-th entry of `companions`.
    pub referenced_by: u32,
}

/// Parameters of `io.imgcrypt.Encrypt`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EncryptParameters {
    /// Index of the source descriptor among those passed with the call.
    pub source: u32,
    /// The files the source references (backing files, parents, extents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<Companion>,
    /// Index of the output descriptor.
    pub output: u32,
    /// Index of the key-file descriptor; absent: the daemon's own key ring's `encryption_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<u32>,
    /// Index of the descriptor of the key file that unlocks an encrypted source (a qcow2 with
    /// qemu's LUKS encryption); absent for a plain source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_key: Option<u32>,
    /// Header format.
    pub luks_version: LuksVersion,
    /// Encryption sector size in bytes.
    pub sector_size: u32,
    /// Keyslot key derivation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pbkdf: Option<Pbkdf>,
    /// Engine to use.
    #[serde(default)]
    pub engine: EngineChoice,
    /// Container of the output; when absent, the target's, or raw LUKS without a target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<OutputFormat>,
    /// Cloud whose import rules are checked before anything is written; `format` must be the
    /// target's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// Reply at once with the job's id ([`EncryptReply::job_id`]) and let the job run on
    /// without this connection (`Wait` re-attaches). Absent or false: the job is cancelled when
    /// the connection closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detach: Option<bool>,
    /// How the client names the source and the output, shown by `Jobs`/`Status` only (the
    /// daemon never opens them; at most [`MAX_JOB_NAME_LEN`] bytes are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<JobNames>,
    // --- stream ---
    /// Write the image into the output descriptor as a stream (a pipe's write end): in order,
    /// preamble first ([`crate::stream`]). Raw LUKS or qcow2 output (a qcow2's source is
    /// scanned for its data first, so its tables can go before the data), userspace engine,
    /// not detached. Absent: the output is a file or block device written at offsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamOutput>,
}

/// How a streamed output starts ([`EncryptParameters::stream`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamOutput {
    /// Index of a readable descriptor holding the header an interrupted stream of the same
    /// image began with (the preamble's `header_len` first bytes, saved by the client; for a
    /// qcow2 its header cluster, which must be the one this job would write, and its LUKS
    /// header). The
    /// daemon opens its keyslot with the job's key to recover the volume key, so the bytes it
    /// streams continue that image; if the key does not open it (the key changed) or it is not
    /// a header of these parameters, the daemon starts from scratch with a new header and says
    /// so (the preamble's `restarted`, and a notice with the reason). Absent: a new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_header: Option<u32>,
    /// First image byte to stream when resuming (a multiple of 4096; 0 streams everything,
    /// header included). Ignored without `resume_header`.
    #[serde(default)]
    pub resume_from: u64,
}

/// Stage of an encryption job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for another job to finish (the daemon runs a bounded number at once).
    Queued,
    /// Creating the LUKS header without its keyslot (fast: the volume key is ours).
    Format,
    /// Measuring how many PBKDF iterations the requested unlock time takes on this machine
    /// (once per PBKDF configuration; later jobs reuse the result for up to an hour).
    Benchmark,
    /// Deriving the keyslot's key from the passphrase at its fixed iteration count. It runs
    /// alongside the copy; this phase is reported when the copy is done and the derivation is
    /// still running (or has just finished).
    Derive,
    /// Writing the LUKS header (or the container's metadata with it) after the payload is
    /// durable.
    Header,
    /// A separate read of the source for its data before the copy: a streamed qcow2's (its
    /// tables go before its data, so its data clusters must be known first). File outputs
    /// find their data in the copy itself and do not send it.
    Scan,
    /// Encrypting and writing the payload.
    Copy,
    /// Flushing to stable storage.
    Sync,
    /// Deriving a keyslot key from a passphrase to unlock an image (one PBKDF run per try).
    Unlock,
    /// Adding or removing keyslots (header-only key rotation).
    Keyslots,
    /// Reading and hashing the decrypted payload (`Verify`).
    Hash,
}

/// A progress report.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// Current stage.
    pub phase: Phase,
    /// Payload bytes written so far.
    pub bytes_done: u64,
    /// Payload bytes in all.
    pub bytes_total: u64,
    /// With phase `queued`: the job's place in the dispatch order (1: starts next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
}

/// Source image formats recognised by content. On the wire in snake case (`vhd_fixed`): Varlink
/// enum values are `[A-Za-z](_?[A-Za-z0-9])*`, no dashes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// Raw disk bytes.
    Raw,
    /// VHD with a footer only.
    VhdFixed,
    /// VHD with a block allocation table.
    VhdDynamic,
    /// VHDX (Hyper-V), fixed or dynamic.
    Vhdx,
    /// qcow2 (v2 or v3), its active layer.
    Qcow2,
    /// A LUKS image's decrypted payload (what `Decrypt`, `Verify` and re-encryption read).
    Luks,
    /// VMDK: monolithicSparse, streamOptimized (also inside an OVA), monolithicFlat,
    /// twoGbMaxExtentSparse/Flat.
    Vmdk,
    /// A differencing VHD read over its parent chain.
    VhdDifferencing,
}

impl SourceFormat {
    /// How users name it.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::VhdFixed => "VHD (fixed)",
            Self::VhdDynamic => "VHD (dynamic)",
            Self::Vhdx => "VHDX",
            Self::Qcow2 => "qcow2",
            Self::Luks => "LUKS",
            Self::Vmdk => "VMDK",
            Self::VhdDifferencing => "VHD (differencing)",
        }
    }
}

/// What a finished encryption produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    /// Format detected from the source's content.
    pub source_format: SourceFormat,
    /// Guest-visible size of the source in bytes.
    pub virtual_size: u64,
    /// Container written.
    #[serde(default)]
    pub output_format: OutputFormat,
    /// Guest-visible size of the output (the source's, rounded up as the container needs).
    #[serde(default)]
    pub output_virtual_size: u64,
    /// LUKS header format written (LUKS1 inside qcow2); absent for a VHD, which has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luks_version: Option<LuksVersion>,
    /// Cipher specification, e.g. `aes-xts-plain64`.
    pub cipher: String,
    /// Volume key size in bits.
    pub key_size_bits: u32,
    /// Encryption sector size in bytes.
    pub sector_size: u32,
    /// Byte offset of the encrypted payload (the header's size).
    pub data_offset: u64,
    /// Encrypted payload bytes (virtual size rounded up to whole MiB of output).
    pub payload_size: u64,
    /// Total output size.
    pub output_size: u64,
    /// Base64 SHA-256 of the key file's bytes.
    pub key_fingerprint: String,
    /// Keyslot key derivation used, e.g. `argon2id (4 iterations, 1048576 KiB, 2 threads)`.
    pub pbkdf: String,
    /// Where the keyslot's iteration count came from when a benchmark chose it: measured for
    /// this job, or the daemon's cached measurement of the same configuration. Absent when the
    /// iterations were given (`--pbkdf-iterations`) or the output has no keyslot (VHD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pbkdf_benchmark: Option<PbkdfBenchmark>,
    /// Engine that wrote the payload.
    pub engine: EngineKind,
    /// Wall time of the whole job, key derivation included.
    pub elapsed_ms: u64,
    /// Wall time of the payload copy alone (what the throughput is measured over).
    pub copy_ms: u64,
    /// Bytes written to the output, header included.
    pub bytes_written: u64,
    /// Payload bytes stored (container outputs store only what the source holds).
    #[serde(default)]
    pub allocated_bytes: u64,
    /// For a VHD: the key hash in `vhd-util key -C`'s form (hex SHA-256 of nonce and key), to
    /// compare with what IBM's instructions print.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhd_key_hash: Option<String>,
    /// The target whose rules were checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    // --- resume ---
    /// The payload byte this run resumed from (an interrupted run's durable checkpoint); for a
    /// streamed output, the image byte the stream resumed from (`StreamOutput::resume_from`).
    /// Absent when it started from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u64>,
}

/// How a keyslot's benchmarked iteration count was obtained ([`Summary::pbkdf_benchmark`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PbkdfBenchmark {
    /// True when the daemon reused an earlier measurement of the same PBKDF configuration
    /// (type, hash, memory, threads, target time, key size); false when it measured for this
    /// job.
    pub cached: bool,
    /// Age of the measurement when the job used it, in milliseconds (0 when fresh).
    pub age_ms: u64,
    /// How long the measurement itself took, in milliseconds.
    pub measured_ms: u64,
}

/// One reply of `io.imgcrypt.Encrypt`: exactly one field is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EncryptReply {
    /// A progress report (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Something the user should know that does not stop the job (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The result (final reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// The job's id: the only field of the final reply to a call with `detach: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
}

/// How an image was unlocked.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnlockMethod {
    /// The key's fingerprint matched an `imgcrypt-key` token: one key derivation, no trials.
    Token,
    /// The image carries no token for the key (LUKS1, or made by plain cryptsetup): keys were
    /// tried in ring order, each costing a key derivation.
    Trial,
}

/// Which key opened an image, and how.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Unlocked {
    /// The key's name as the client gave it (`encryption_key`, `decryption_key2`, `--key-file`,
    /// or `daemon:` plus the name in the daemon's ring).
    pub key_name: String,
    /// Base64 SHA-256 of the key file's bytes.
    pub fingerprint: String,
    /// Keyslot it opened.
    pub keyslot: u32,
    /// Matched by token or found by trial.
    pub method: UnlockMethod,
    /// Key derivations run, the successful one included.
    pub attempts: u32,
}

/// One active keyslot of an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyslotInfo {
    /// Keyslot number.
    pub keyslot: u32,
    /// Key derivation, e.g. `argon2id` or `pbkdf2-sha256`.
    pub pbkdf: String,
    /// Fingerprint from the keyslot's `imgcrypt-key` token; absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Name of the passed key whose fingerprint matches, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matching_key: Option<String>,
}

/// What a LUKS image's header says, read without unlocking it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    /// The container.
    #[serde(default)]
    pub format: OutputFormat,
    /// LUKS1 or LUKS2 (LUKS1 inside qcow2); absent for a VHD, which has no LUKS header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luks_version: Option<LuksVersion>,
    /// Guest-visible size, for containers that record it (qcow2, VHD; raw LUKS does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    /// Payload bytes actually stored, for sparse containers (qcow2, VHD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<u64>,
    /// A blktap-encrypted VHD's key hash, and which passed key matches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhd_key: Option<VhdKeyInfo>,
    /// The header's UUID.
    pub uuid: String,
    /// Cipher specification, e.g. `aes-xts-plain64`.
    pub cipher: String,
    /// Volume key size in bits.
    pub key_size_bits: u32,
    /// Encryption sector size in bytes.
    pub sector_size: u32,
    /// Byte offset of the encrypted payload.
    pub data_offset: u64,
    /// Encrypted payload bytes (image size minus data offset).
    pub payload_size: u64,
    /// Size of the whole image.
    pub image_size: u64,
    /// Active keyslots, by number.
    pub keyslots: Vec<KeyslotInfo>,
}

/// The key hash a blktap-encrypted VHD carries in its batmap header.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VhdKeyInfo {
    /// The 32-byte nonce, hex (zeros from `vhd-util copy`).
    pub nonce: String,
    /// SHA-256(nonce ‖ key), hex: what `vhd-util key -p -n` prints.
    pub hash: String,
    /// Name of the passed key whose hash matches, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matching_key: Option<String>,
}

/// Parameters of `io.imgcrypt.Inspect`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InspectParameters {
    /// Index of the image descriptor (readable).
    pub image: u32,
    /// The files the image references, when it is a source (backing files, parents, extents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<Companion>,
    /// Keys to match against the image's fingerprints (read and hashed, never tried).
    #[serde(default)]
    pub keys: Vec<KeyRef>,
}

/// What a source image (one imgcrypt encrypts from) is, read without encrypting anything.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceInfo {
    /// Format detected from the content.
    pub format: SourceFormat,
    /// Size of the disk the guest sees, in bytes.
    pub virtual_size: u64,
    /// Length of the file (or block device) in bytes.
    pub file_size: u64,
    /// Guest bytes that may hold data (what an encryption reads); everything else reads as
    /// zeros. An upper bound: ranges closer than 1 MiB are counted as one.
    pub allocated_bytes: u64,
    /// The format's allocation unit (a VHD's block size), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_unit: Option<u64>,
    /// The layers below it (backing files, parent disks), nearest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing_chain: Vec<BackingLayer>,
}

/// One layer of a source's backing chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackingLayer {
    /// The name the layer above records for it.
    pub name: String,
    /// Its format, detected from its content.
    pub format: SourceFormat,
    /// Its virtual size.
    pub virtual_size: u64,
}

/// Reply of `io.imgcrypt.Inspect`: exactly one field is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InspectReply {
    /// An encrypted image: its header's contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
    /// A source image (not encrypted): what an encryption would read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceInfo>,
}

/// Parameters of `io.imgcrypt.Decrypt`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DecryptParameters {
    /// Index of the LUKS image descriptor (readable).
    pub image: u32,
    /// Index of the output descriptor (read-write regular file or block device).
    pub output: u32,
    /// Candidate keys in ring order; empty: the daemon's own ring.
    #[serde(default)]
    pub keys: Vec<KeyRef>,
    /// As Encrypt's `detach`: reply at once with the job's id ([`DecryptReply::job_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detach: Option<bool>,
    /// As Encrypt's `names` (`source`: the image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<JobNames>,
}

/// What `Decrypt` produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DecryptSummary {
    /// Which key opened the image.
    pub unlocked: Unlocked,
    /// Plaintext bytes written (the whole payload).
    pub payload_size: u64,
    /// Wall time of the whole job.
    pub elapsed_ms: u64,
    /// Wall time of the copy alone.
    pub copy_ms: u64,
}

/// One reply of `io.imgcrypt.Decrypt`: exactly one field is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DecryptReply {
    /// A progress report (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Something the user should know (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The result (final reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decrypted: Option<DecryptSummary>,
    /// The job's id: the only field of the final reply to a call with `detach: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
}

/// Parameters of `io.imgcrypt.Verify`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VerifyParameters {
    /// Index of the LUKS image descriptor (readable).
    pub image: u32,
    /// Index of a source image (RAW or VHD) to compare the plaintext with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<u32>,
    /// The files `source` references (backing files, parents, extents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_companions: Vec<Companion>,
    /// Candidate keys in ring order; empty: the daemon's own ring.
    #[serde(default)]
    pub keys: Vec<KeyRef>,
}

/// How the plaintext compares with a source image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceComparison {
    /// The source's format, detected by content.
    pub source_format: SourceFormat,
    /// The source's virtual size.
    pub virtual_size: u64,
    /// Whether the plaintext is the source's disk followed by zeros to the payload's end.
    pub matches: bool,
    /// Offset of the first differing byte (in the plaintext), when they differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_difference: Option<u64>,
}

/// What `Verify` found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifySummary {
    /// Which key opened the image.
    pub unlocked: Unlocked,
    /// Plaintext bytes hashed (the whole payload).
    pub payload_size: u64,
    /// Lower-case hex SHA-256 of the whole decrypted payload.
    pub plaintext_sha256: String,
    /// The comparison with `source`, when one was passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceComparison>,
    /// Wall time of the whole job.
    pub elapsed_ms: u64,
}

/// One reply of `io.imgcrypt.Verify`: exactly one field is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReply {
    /// A progress report (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Something the user should know (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The result (final reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifySummary>,
}

/// Parameters of `io.imgcrypt.Rewrite`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RewriteParameters {
    /// Index of the LUKS image descriptor: read-write for a header-only rotation, readable for
    /// a re-encryption (which writes `reencrypt_output`).
    pub image: u32,
    /// Candidate keys to unlock with, in ring order; empty: the daemon's own ring.
    #[serde(default)]
    pub keys: Vec<KeyRef>,
    /// The key the image is rotated to; absent: the daemon's ring's `encryption_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<KeyRef>,
    /// Re-encryption: index of the read-write descriptor of the new image (`IMAGE.reencrypt.partial`:
    /// empty to start, or a previous run's file to resume). Absent: header-only rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reencrypt_output: Option<u32>,
    /// Key derivation of the new keyslot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pbkdf: Option<Pbkdf>,
    /// As Encrypt's `detach`: reply at once with the job's id ([`RewriteReply::job_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detach: Option<bool>,
    /// As Encrypt's `names` (`source`: the image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<JobNames>,
}

/// A keyslot removed by a rotation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemovedKeyslot {
    /// Its number.
    pub keyslot: u32,
    /// The fingerprint its token carried, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// What `Rewrite` did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RewriteSummary {
    /// Which key opened the image.
    pub unlocked: Unlocked,
    /// Fingerprint of the key the image now opens with.
    pub fingerprint: String,
    /// Keyslot of the new key.
    pub keyslot: u32,
    /// False when the key already had a keyslot (a rerun after an interruption).
    pub keyslot_added: bool,
    /// Keyslots removed.
    pub removed: Vec<RemovedKeyslot>,
    /// True for `--reencrypt`: a new volume key, every sector rewritten.
    pub reencrypted: bool,
    /// Payload offset a re-encryption resumed from (0 for a fresh start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u64>,
    /// Where the new keyslot's iteration count came from when a benchmark chose it (as in
    /// [`Summary::pbkdf_benchmark`]). Absent when no keyslot was made (the key already had
    /// one, or a resumed re-encryption reuses the header written before), when the iterations
    /// were given, and for a VHD (no keyslots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pbkdf_benchmark: Option<PbkdfBenchmark>,
    /// Wall time of the whole job.
    pub elapsed_ms: u64,
}

/// One reply of `io.imgcrypt.Rewrite`: exactly one field is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RewriteReply {
    /// A progress report (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Something the user should know (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The result (final reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewritten: Option<RewriteSummary>,
    /// The job's id: the only field of the final reply to a call with `detach: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<u64>,
}

/// Replies streamed by a job: progress and notices, then one result.
pub trait StreamedReply: Serialize + Default {
    /// The final result.
    type Done;
    /// A partial reply carrying progress.
    fn progress(progress: Progress) -> Self;
    /// A partial reply carrying a notice.
    fn notice(text: String) -> Self;
    /// The final reply.
    fn done(done: Self::Done) -> Self;
}

macro_rules! streamed_reply {
    ($reply:ty, $field:ident, $done:ty) => {
        impl StreamedReply for $reply {
            type Done = $done;
            fn progress(progress: Progress) -> Self {
                Self {
                    progress: Some(progress),
                    ..Self::default()
                }
            }
            fn notice(text: String) -> Self {
                Self {
                    notice: Some(text),
                    ..Self::default()
                }
            }
            fn done(done: $done) -> Self {
                Self {
                    $field: Some(done),
                    ..Self::default()
                }
            }
        }
    };
}

streamed_reply!(EncryptReply, summary, Summary);
streamed_reply!(DecryptReply, decrypted, DecryptSummary);
streamed_reply!(VerifyReply, verified, VerifySummary);
streamed_reply!(RewriteReply, rewritten, RewriteSummary);

// --- jobs ---

/// Longest source or output name a job keeps (longer ones are cut at a character boundary).
pub const MAX_JOB_NAME_LEN: usize = 512;
/// Most jobs one `Jobs` reply lists (the newest ones the caller may see).
pub const MAX_LISTED_JOBS: usize = 256;

/// Whether `c` must not reach a terminal from a job's names: a control character, or one of the
/// bidirectional-text controls that reorder what is shown. The daemon replaces these when it
/// stores names; imgctl escapes them when it prints anything the daemon was told.
pub fn is_unsafe_in_names(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// How the client names a job's files: for display, and for `imgctl wait`'s rename.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JobNames {
    /// The source as the user named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The final output path (absolute), without `.partial`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// What a job does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// `Encrypt`.
    Encrypt,
    /// `Decrypt`.
    Decrypt,
    /// `Verify`.
    Verify,
    /// `Rewrite`.
    Rewrite,
    /// `Inspect`.
    Inspect,
}

impl JobKind {
    /// Lower-case name, as on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::Verify => "verify",
            Self::Rewrite => "rewrite",
            Self::Inspect => "inspect",
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a slot (`queue_position` says where).
    Queued,
    /// Holding a slot.
    Running,
    /// Ended with its result.
    Succeeded,
    /// Ended with an error.
    Failed,
    /// Cancelled (by its owner, an operator, its client leaving, or the daemon stopping).
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// One job as `Jobs`, `Status` and `Cancel` report it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobInfo {
    /// Its id (`jobs::next_job_id`).
    pub id: u64,
    /// The uid that submitted it (SO_PEERCRED).
    pub uid: u32,
    /// What it does.
    pub kind: JobKind,
    /// Where it is.
    pub state: JobState,
    /// With state `queued`: its place in the dispatch order (1: starts next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// Latest progress report.
    pub progress: Progress,
    /// Bytes per second in the current phase (absent until measurable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Estimated milliseconds left in the current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// The engine, once the job has chosen it (while it runs too, not only from its result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineKind>,
    /// Milliseconds since the Unix epoch when it was submitted, started, ended.
    pub created_ms: u64,
    /// See `created_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// See `created_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// Submitted with `detach`: runs without a client.
    pub detached: bool,
    /// The source and output as the client named them (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<JobNames>,
    /// `st_dev` and `st_ino` of the output descriptor, from the daemon's own fstat: what
    /// `imgctl wait` compares with `OUT.partial` before it renames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_identity: Option<FileIdentity>,
    /// For a failed job: the error's name (`io.imgcrypt.NoSpace`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a failed or cancelled job: what happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A file's identity: `(st_dev, st_ino)`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileIdentity {
    /// `st_dev`.
    pub device: u64,
    /// `st_ino`.
    pub inode: u64,
}

/// Parameters of `Status`, `Cancel` and `Wait`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JobId {
    /// The job.
    pub id: u64,
}

/// Reply of `Jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobsReply {
    /// The caller's jobs (everyone's for root and the operator group), oldest first; at most
    /// the newest [`MAX_LISTED_JOBS`].
    pub jobs: Vec<JobInfo>,
}

/// Reply of `Status` and `Cancel`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobReply {
    /// The job (for `Cancel`: as it is right after the cancel was asked for).
    pub job: JobInfo,
}

/// One reply of `Wait`: progress and notices like the job's own call, then that call's final
/// reply (its `summary`, `decrypted`, `verified`, `rewritten`, or Inspect's `image`/`source`),
/// or its error.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WaitReply {
    /// A progress report (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// A notice (partial replies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// Encrypt's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// Decrypt's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decrypted: Option<DecryptSummary>,
    /// Verify's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifySummary>,
    /// Rewrite's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewritten: Option<RewriteSummary>,
    /// Inspect's result for an encrypted image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
    /// Inspect's result for a source image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceInfo>,
}

/// `Wait` streams like the job calls; its final reply is the job's own, sent as recorded.
impl StreamedReply for WaitReply {
    type Done = WaitReply;
    fn progress(progress: Progress) -> Self {
        Self {
            progress: Some(progress),
            ..Self::default()
        }
    }
    fn notice(text: String) -> Self {
        Self {
            notice: Some(text),
            ..Self::default()
        }
    }
    fn done(done: WaitReply) -> Self {
        done
    }
}

/// Parameters of every `io.imgcrypt` error: a message for people, plus what a program matches.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorParameters {
    /// What went wrong and what to do about it.
    pub message: String,
    /// The key-file rule broken (`InvalidKeyFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The descriptor at fault: `source`, `output` or `key` (`BadDescriptor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor: Option<String>,
    /// The parameter at fault (`InvalidOption`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// Byte offset in the source where corruption was found (`CorruptImage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Bytes the output needs (`NoSpace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_bytes: Option<u64>,
    /// The engine asked for (`EngineUnavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Fingerprints of the keys tried (`WrongKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tried: Option<Vec<String>>,
    /// Fingerprints the image's tokens carry (`WrongKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<Vec<String>>,
    /// The container format recognised and not read, e.g. `qcow2`, `luks`, `gzip`
    /// (`UnsupportedImage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The limit that was reached (`TooManyJobs`, `TooManyConnections`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The file that names the missing one: 0 for the source, k for `companions[k - 1]`
    /// (`NeedFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referenced_by: Option<u32>,
    /// What the missing file is to it: `backing_file`, `parent`, `extent`, `data_file`
    /// (`NeedFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// The names the referencing file records for it, in the order to try (`NeedFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<String>>,
    /// The job asked for (`NoSuchJob`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
}

impl ErrorParameters {
    /// Parameters carrying only a message.
    pub fn message(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::default()
        }
    }
}

// --- daemon status ---

/// `imgctl daemon status`: the daemon's version, engines, jobs, limits and uptime.
pub const GET_DAEMON_STATUS: &str = "io.imgcrypt.GetDaemonStatus";

/// Who a daemon serves.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DaemonMode {
    /// The system daemon: every user who may open its socket.
    System,
    /// A per-user daemon (`imgcryptd --user`): its own user only.
    User,
}

/// One engine: whether it can run here, and if not, why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EngineStatus {
    /// Which engine.
    pub engine: EngineKind,
    /// Whether jobs may use it.
    pub available: bool,
    /// Why not, and what to do (absent when available).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether a job asking for `auto` gets this engine.
    pub auto: bool,
}

/// Jobs holding a slot and jobs waiting for one.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobCounts {
    /// Jobs running.
    pub running: u64,
    /// Jobs waiting for a slot.
    pub queued: u64,
}

/// One user's share of the daemon (shown to root only).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserJobs {
    /// The user.
    pub uid: u32,
    /// Jobs running.
    pub running: u64,
    /// Jobs waiting for a slot.
    pub queued: u64,
}

/// The daemon's limits in force (after its adjustments).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonLimits {
    /// Jobs running at once, all users together (--max-jobs).
    pub max_jobs: u64,
    /// Jobs of one user running at once (--max-jobs-per-user).
    pub max_jobs_per_user: u64,
    /// Jobs of one user waiting for a slot (--max-queued-per-user; root is exempt).
    pub max_queued_per_user: u64,
    /// Jobs of all users together waiting for a slot (--max-queued; root may exceed it by
    /// max_queued_per_user).
    pub max_queued: u64,
    /// Connections of all users together (--max-connections).
    pub max_connections: u64,
    /// Connections of one user (--max-connections-per-user; root is exempt).
    pub max_connections_per_user: u64,
    /// Seconds an idle connection stays open (--idle-connection-timeout).
    pub idle_connection_timeout_s: u64,
}

/// The reply of `GetDaemonStatus`. Every caller sees the totals and its own counts; only root
/// sees `users` (who else is using the daemon is not other users' business).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonStatus {
    /// The daemon's version (as `GetInfo`'s).
    pub version: String,
    /// System or per-user daemon.
    pub mode: DaemonMode,
    /// Seconds since the daemon started serving.
    pub uptime_s: u64,
    /// Each engine, the kernel's with why it cannot run here.
    pub engines: Vec<EngineStatus>,
    /// Jobs of all users.
    pub jobs: JobCounts,
    /// The caller's own jobs.
    pub own_jobs: JobCounts,
    /// Connections open now, all users together (this one included).
    pub connections: u64,
    /// Limits in force.
    pub limits: DaemonLimits,
    /// PBKDF configurations whose benchmark is cached (the start-up benchmark caches the two a
    /// job with default settings uses).
    pub pbkdf_benchmarks_cached: u64,
    /// Per-user counts of every user with a job running or queued (root only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<UserJobs>>,
}

#[cfg(test)]
mod daemon_status_tests {
    use super::*;

    /// Every field of the reply is in the documented method, and the method is defined.
    #[test]
    fn daemon_status_is_documented() {
        let status = DaemonStatus {
            version: "0".into(),
            mode: DaemonMode::User,
            uptime_s: 1,
            engines: vec![EngineStatus {
                engine: EngineKind::Kernel,
                available: false,
                reason: Some("no dm_mod".into()),
                auto: false,
            }],
            jobs: JobCounts::default(),
            own_jobs: JobCounts::default(),
            connections: 1,
            limits: DaemonLimits {
                max_jobs: 2,
                max_jobs_per_user: 1,
                max_queued_per_user: 8,
                max_queued: 64,
                max_connections: 256,
                max_connections_per_user: 16,
                idle_connection_timeout_s: 120,
            },
            pbkdf_benchmarks_cached: 0,
            users: Some(vec![UserJobs {
                uid: 1000,
                running: 1,
                queued: 0,
            }]),
        };
        let value = serde_json::to_value(&status).unwrap();
        let mut names = Vec::new();
        fn keys(value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, inner) in map {
                        out.push(key.clone());
                        keys(inner, out);
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|item| keys(item, out)),
                _ => {}
            }
        }
        keys(&value, &mut names);
        let block = INTERFACE_DESCRIPTION
            .split("# --- daemon status ---")
            .nth(1)
            .expect("the daemon status block in docs/io.imgcrypt.varlink");
        for name in names {
            assert!(block.contains(&format!("{name}:")), "{name} undocumented");
        }
        assert_eq!(value["mode"], "user");
        assert_eq!(value["engines"][0]["engine"], "kernel");
        let members = crate::varlink::grammar::check(INTERFACE_DESCRIPTION).unwrap();
        let short = GET_DAEMON_STATUS.strip_prefix("io.imgcrypt.").unwrap();
        assert!(members.iter().any(|member| member == short));
        let back: DaemonStatus = serde_json::from_value(value).unwrap();
        assert_eq!(back, status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire names of the new enums are valid Varlink enum values (no dashes) and match the
    /// documented interface.
    #[test]
    fn format_and_target_wire_names() {
        for (target, wire) in [
            (Target::Luks, "luks"),
            (Target::IbmVpc, "ibm_vpc"),
            (Target::IbmClassic, "ibm_classic"),
            (Target::Openstack, "openstack"),
        ] {
            assert_eq!(serde_json::to_value(target).unwrap(), wire);
            assert!(
                INTERFACE_DESCRIPTION.contains("target: ?(luks, ibm_vpc, ibm_classic, openstack)")
            );
        }
        for (format, wire) in [
            (OutputFormat::Luks, "luks"),
            (OutputFormat::Qcow2, "qcow2"),
            (OutputFormat::Vhd, "vhd"),
        ] {
            assert_eq!(serde_json::to_value(format).unwrap(), wire);
            assert_eq!(format.cli_name(), wire);
        }
        assert!(INTERFACE_DESCRIPTION.contains("format: ?(luks, qcow2, vhd)"));
        assert_eq!(Target::IbmClassic.format(), OutputFormat::Vhd);
        assert_eq!(Target::IbmVpc.format(), OutputFormat::Qcow2);
        assert_eq!(Target::Openstack.format(), OutputFormat::Qcow2);
        assert_eq!(Target::Luks.format(), OutputFormat::Luks);
    }

    /// Every field name of the Rust types must appear in the documented interface, so the
    /// served description cannot drift from what the daemon accepts and sends.
    #[test]
    fn documented_interface_names_every_field() {
        let samples = [
            serde_json::to_value(EncryptParameters {
                source: 0,
                companions: vec![Companion {
                    fd: 3,
                    name: "base.qcow2".into(),
                    referenced_by: 0,
                }],
                output: 1,
                key: Some(2),
                source_key: Some(4),
                luks_version: LuksVersion::Luks2,
                sector_size: 512,
                pbkdf: Some(Pbkdf {
                    kind: Some(PbkdfKind::Argon2id),
                    iter_time_ms: Some(1),
                    iterations: Some(4),
                    memory_kib: Some(32),
                    parallel: Some(1),
                }),
                engine: EngineChoice::Auto,
                format: Some(OutputFormat::Qcow2),
                target: Some(Target::IbmVpc),
                detach: Some(true),
                names: Some(JobNames {
                    source: Some(String::new()),
                    output: Some(String::new()),
                }),
                stream: Some(StreamOutput {
                    resume_header: Some(0),
                    resume_from: 0,
                }),
            })
            .unwrap(),
            serde_json::to_value(JobInfo {
                id: 1,
                uid: 0,
                kind: JobKind::Encrypt,
                state: JobState::Queued,
                queue_position: Some(1),
                progress: Progress {
                    phase: Phase::Queued,
                    bytes_done: 0,
                    bytes_total: 0,
                    queue_position: Some(1),
                },
                rate: Some(1),
                eta_ms: Some(1),
                engine: Some(EngineKind::Userspace),
                created_ms: 0,
                started_ms: Some(0),
                ended_ms: Some(0),
                detached: true,
                names: None,
                output_identity: Some(FileIdentity {
                    device: 0,
                    inode: 0,
                }),
                error: Some(String::new()),
                message: Some(String::new()),
            })
            .unwrap(),
            serde_json::to_value(VhdKeyInfo {
                nonce: String::new(),
                hash: String::new(),
                matching_key: Some(String::new()),
            })
            .unwrap(),
            serde_json::to_value(Progress {
                phase: Phase::Copy,
                bytes_done: 0,
                bytes_total: 0,
                queue_position: None,
            })
            .unwrap(),
        ];
        let mut names = Vec::new();
        for sample in &samples {
            collect_keys(sample, &mut names);
        }
        for name in [
            "source_format",
            "virtual_size",
            "luks_version",
            "cipher",
            "key_size_bits",
            "sector_size",
            "data_offset",
            "payload_size",
            "output_size",
            "key_fingerprint",
            "pbkdf",
            "pbkdf_benchmark",
            "age_ms",
            "measured_ms",
            "engine",
            "elapsed_ms",
            "copy_ms",
            "bytes_written",
            "output_format",
            "output_virtual_size",
            "allocated_bytes",
            "vhd_key_hash",
            "vhd_key",
            "format",
            "notice",
            "summary",
            "progress",
            "job_id",
            "jobs",
            "job",
            "decrypted",
            "verified",
            "rewritten",
        ] {
            names.push(name.to_string());
        }
        for name in names {
            assert!(
                INTERFACE_DESCRIPTION.contains(&format!("{name}:")),
                "field {name} missing from docs/io.imgcrypt.varlink"
            );
        }
        for error in [
            errors::INVALID_KEY_FILE,
            errors::UNSUPPORTED_IMAGE,
            errors::CORRUPT_IMAGE,
            errors::BAD_DESCRIPTOR,
            errors::INVALID_OPTION,
            errors::NO_SPACE,
            errors::ENGINE_UNAVAILABLE,
            errors::LUKS_ERROR,
            errors::IO_ERROR,
            errors::PERMISSION_DENIED,
            errors::PROTOCOL_ERROR,
            errors::TOO_MANY_JOBS,
            errors::TOO_MANY_CONNECTIONS,
            errors::NO_SUCH_JOB,
        ] {
            let short = error.strip_prefix("io.imgcrypt.").unwrap();
            assert!(
                INTERFACE_DESCRIPTION.contains(&format!("error {short} (")),
                "error {short} missing from docs/io.imgcrypt.varlink"
            );
        }
    }

    fn collect_keys(value: &serde_json::Value, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = value {
            for (key, inner) in map {
                out.push(key.clone());
                collect_keys(inner, out);
            }
        }
    }

    /// The served description is valid Varlink (every name by the specification's rules) and
    /// defines every method and error the daemon uses.
    #[test]
    fn interface_description_is_valid_varlink() {
        let members = crate::varlink::grammar::check(INTERFACE_DESCRIPTION)
            .unwrap_or_else(|e| panic!("docs/io.imgcrypt.varlink: {e}"));
        for name in [
            ENCRYPT,
            INSPECT,
            DECRYPT,
            VERIFY,
            REWRITE,
            JOBS,
            STATUS,
            CANCEL,
            WAIT,
            errors::NO_SUCH_JOB,
            errors::INVALID_KEY_FILE,
            errors::UNSUPPORTED_IMAGE,
            errors::CORRUPT_IMAGE,
            errors::BAD_DESCRIPTOR,
            errors::INVALID_OPTION,
            errors::NO_SPACE,
            errors::ENGINE_UNAVAILABLE,
            errors::LUKS_ERROR,
            errors::IO_ERROR,
            errors::PERMISSION_DENIED,
            errors::PROTOCOL_ERROR,
            errors::WRONG_KEY,
            errors::NO_KEY,
            errors::TOO_MANY_JOBS,
            errors::TOO_MANY_CONNECTIONS,
            errors::NEED_FILE,
        ] {
            let short = name.strip_prefix("io.imgcrypt.").unwrap();
            assert!(
                members.iter().any(|member| member == short),
                "{short} is not defined in docs/io.imgcrypt.varlink"
            );
        }
    }

    /// Enum values on the wire are the documented Varlink names: no dashes (imgctl maps its
    /// command-line spellings, such as `--target ibm-vpc`, to these).
    #[test]
    fn source_formats_travel_as_varlink_names() {
        for (format, wire) in [
            (SourceFormat::Raw, "raw"),
            (SourceFormat::VhdFixed, "vhd_fixed"),
            (SourceFormat::VhdDynamic, "vhd_dynamic"),
            (SourceFormat::Vhdx, "vhdx"),
            (SourceFormat::Qcow2, "qcow2"),
            (SourceFormat::Luks, "luks"),
            (SourceFormat::Vmdk, "vmdk"),
            (SourceFormat::VhdDifferencing, "vhd_differencing"),
        ] {
            assert_eq!(serde_json::to_value(format).unwrap(), wire);
            assert_eq!(
                serde_json::from_value::<SourceFormat>(wire.into()).unwrap(),
                format
            );
        }
        let documented = "(raw, vhd_fixed, vhd_dynamic, vhdx, qcow2, luks, vmdk, vhd_differencing)";
        assert_eq!(INTERFACE_DESCRIPTION.matches(documented).count(), 4);
    }

    #[test]
    fn summary_uses_documented_enum_spellings() {
        assert_eq!(
            serde_json::to_string(&SourceFormat::VhdDynamic).unwrap(),
            "\"vhd_dynamic\""
        );
        assert_eq!(
            serde_json::to_string(&LuksVersion::Luks1).unwrap(),
            "\"luks1\""
        );
        assert_eq!(
            serde_json::to_string(&EngineKind::Userspace).unwrap(),
            "\"userspace\""
        );
    }
}
