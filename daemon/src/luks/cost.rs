//! What one key derivation on a keyslot costs, and the caps every keyslot must fit before the
//! daemon derives it.
//!
//! libcryptsetup serialises its calls process-wide (the `mutex` feature of libcryptsetup-rs), so
//! one derivation holds every other job's header work for as long as it runs. A keyslot read from
//! an image is attacker-controlled: pbkdf2 with 4294967295 iterations, or argon2id with time
//! 2^32-1 and 4 GiB, is a valid header that would hold the lock for hours. So before any
//! derivation the keyslot's parameters are read from the header (every copy of it: the LUKS2
//! primary, its secondary, and any secondary at the other offsets libcryptsetup probes when the
//! primary is damaged) and its cost estimated; over the caller's cap, it is not derived.
//!
//! The estimate is a model of this daemon's reference machine (2 CPUs, cryptsetup 2.6.1
//! `cryptsetup benchmark` and timed `cryptsetup open --test-passphrase`):
//!
//! - pbkdf2: `iterations * blocks / rate(hash)` where `blocks` is how many hash outputs the
//!   derived key needs (a 64-byte keyslot key is two SHA-256 blocks) and `rate` the measured
//!   iterations per second (`PBKDF2_RATES`); an unknown hash gets the slowest rate.
//! - argon2i/argon2id: `time * memory * ms_per_gib_pass` with 1150 ms per pass over 1 GiB when
//!   it may use 2 threads and 1950 ms with one (measured: t=4, 1 GiB took 4.6 s with 2 threads,
//!   7.8 s with 1).
//! - plus the volume-key digest check every derivation ends with (pbkdf2 with the digest's own
//!   iteration count, attacker-controlled too).
//!
//! Memory, threads and anti-forensic stripes are capped on their own: they are not time but
//! memory, threads and buffer size.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use imgcrypt_proto::api::{LuksVersion, PbkdfKind};
use serde_json::Value;

use super::header::HeaderSpec;
use crate::{Error, Result};

/// Measured pbkdf2 iterations per second for one 256-bit output (cryptsetup benchmark, 2.6.1,
/// reference machine), with each hash's output length in bytes.
const PBKDF2_RATES: [(&str, u64, u64); 7] = [
    ("sha1", 1_176_852, 20),
    ("sha224", 2_252_580, 28),
    ("sha256", 2_252_580, 32),
    ("sha384", 865_161, 48),
    ("sha512", 865_161, 64),
    ("ripemd160", 616_809, 20),
    ("whirlpool", 344_926, 64),
];
/// Rate assumed for a hash not measured: slower than every measured one.
const UNKNOWN_HASH_RATE: (u64, u64) = (300_000, 20);

/// Argon2 milliseconds per pass over 1 GiB, with two threads and with one.
const ARGON2_MS_PER_GIB_PASS_PARALLEL: u64 = 1150;
const ARGON2_MS_PER_GIB_PASS_SINGLE: u64 = 1950;
const GIB_IN_KIB: u64 = 1 << 20;

/// Anti-forensic stripes of every LUKS keyslot cryptsetup makes (`LUKS_STRIPES`).
const MAX_STRIPES: u64 = 4000;

/// Offsets where libcryptsetup looks for a LUKS2 header copy (its secondary-header probe list).
const LUKS2_HEADER_OFFSETS: [u64; 9] = [
    0, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000,
];
const LUKS2_BINARY_HEADER: u64 = 4096;

/// A key derivation function with its parameters, as a header stores them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC with `hash`.
    Pbkdf2 {
        /// Hash name, e.g. `sha256`.
        hash: String,
        /// Iteration count.
        iterations: u64,
    },
    /// argon2i or argon2id.
    Argon2 {
        /// `argon2i` or `argon2id`.
        variant: String,
        /// Time cost (passes).
        time: u64,
        /// Memory cost in KiB.
        memory_kib: u64,
        /// Lanes (threads).
        threads: u64,
    },
    /// Something this daemon cannot bound (an unknown type or missing fields).
    Unknown(String),
}

impl Kdf {
    /// As users read it: `pbkdf2-sha256 (1000 iterations)`, `argon2i (4 iterations, 32 KiB, 1
    /// thread)`.
    pub fn describe(&self) -> String {
        match self {
            Kdf::Pbkdf2 { hash, iterations } => format!("pbkdf2-{hash} ({iterations} iterations)"),
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                threads,
            } => format!(
                "{variant} ({time} iterations, {memory_kib} KiB, {threads} thread{})",
                if *threads == 1 { "" } else { "s" }
            ),
            Kdf::Unknown(what) => what.clone(),
        }
    }
}

/// A volume-key digest's pbkdf2: (hash, iterations).
pub type DigestCheck = (String, u64);

/// What opening one keyslot costs: its KDF, its anti-forensic stripes and the digest check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyslotCost {
    /// Keyslot number.
    pub keyslot: u32,
    /// The keyslot's KDF.
    pub kdf: Kdf,
    /// Bytes the KDF derives (the keyslot's key size).
    pub key_bytes: u64,
    /// Anti-forensic stripes.
    pub stripes: u64,
    /// The volume-key digest's pbkdf2 checked after the derivation.
    pub digest: Option<DigestCheck>,
}

fn pbkdf2_ms(hash: &str, iterations: u64, key_bytes: u64) -> u64 {
    let (rate, output) = PBKDF2_RATES
        .iter()
        .find(|(name, _, _)| *name == hash)
        .map(|&(_, rate, output)| (rate, output))
        .unwrap_or(UNKNOWN_HASH_RATE);
    let blocks = key_bytes.max(1).div_ceil(output);
    let ms = u128::from(iterations) * u128::from(blocks) * 1000 / u128::from(rate);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn argon2_ms(time: u64, memory_kib: u64, threads: u64) -> u64 {
    let per_pass = if threads >= 2 {
        ARGON2_MS_PER_GIB_PASS_PARALLEL
    } else {
        ARGON2_MS_PER_GIB_PASS_SINGLE
    };
    let ms =
        u128::from(time) * u128::from(memory_kib) * u128::from(per_pass) / u128::from(GIB_IN_KIB);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

impl KeyslotCost {
    /// Estimated milliseconds of one derivation and digest check on the reference machine;
    /// None when the KDF cannot be bounded.
    pub fn estimated_ms(&self) -> Option<u64> {
        let kdf = match &self.kdf {
            Kdf::Pbkdf2 { hash, iterations } => pbkdf2_ms(hash, *iterations, self.key_bytes),
            Kdf::Argon2 {
                time,
                memory_kib,
                threads,
                ..
            } => argon2_ms(*time, *memory_kib, *threads),
            Kdf::Unknown(_) => return None,
        };
        let digest = self
            .digest
            .as_ref()
            .map_or(0, |(hash, iterations)| pbkdf2_ms(hash, *iterations, 32));
        Some(kdf.saturating_add(digest))
    }
}

/// Who is asking decides how much one derivation may cost: an untrusted caller's job must not
/// hold libcryptsetup's lock long, root's may hold it longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KdfCaps {
    /// "non-root callers" or "root", for messages.
    pub who: &'static str,
    /// Most estimated milliseconds of one derivation with its digest check.
    pub max_ms: u64,
    /// Most argon2 memory in KiB.
    pub max_memory_kib: u64,
    /// Most argon2 threads.
    pub max_threads: u64,
    /// Longest benchmark target (`iter_time_ms`) a new keyslot may ask for.
    pub max_iter_time_ms: u32,
}

/// Caps for callers other than root and the daemon's own user.
///
/// 6 s admits cryptsetup's defaults on the reference machine (LUKS2: argon2id benchmarked to
/// 2 s picks 4 passes over about 400 MiB, 1.8 s; 4 passes over the 1 GiB maximum with 4 threads
/// take 4.6 s; LUKS1: pbkdf2-sha256 for 2 s) and whatever imgcrypt makes for such a caller
/// (benchmarks of at most 3 s).
pub const NON_ROOT_CAPS: KdfCaps = KdfCaps {
    who: "non-root callers",
    max_ms: 6_000,
    max_memory_kib: GIB_IN_KIB,
    max_threads: 4,
    max_iter_time_ms: 3_000,
};

/// Caps for root (and the per-user daemon's owner): benchmarks up to 10 s, 4 GiB.
pub const ROOT_CAPS: KdfCaps = KdfCaps {
    who: "root",
    max_ms: 20_000,
    max_memory_kib: 4 * GIB_IN_KIB,
    max_threads: 4,
    max_iter_time_ms: 10_000,
};

impl KdfCaps {
    /// The caps for the caller `uid`: the trusted class is the one the daemon ring decrypts
    /// for ([`crate::keys::ring::may_decrypt_with`]).
    pub fn for_caller(uid: u32) -> &'static KdfCaps {
        if crate::keys::ring::may_decrypt_with(uid) {
            &ROOT_CAPS
        } else {
            &NON_ROOT_CAPS
        }
    }

    /// Why `cost` may not be derived for this caller, or None when it fits.
    pub fn refusal(&self, cost: &KeyslotCost) -> Option<String> {
        let keyslot = cost.keyslot;
        let slot = format!("keyslot {keyslot} ({})", cost.kdf.describe());
        let over = |what: String| {
            Some(format!(
                "{slot}: {what}; imgcrypt did not derive it. Re-key it with `cryptsetup \
                 luksConvertKey --key-slot {keyslot} --pbkdf argon2id --iter-time 2000 IMAGE`, \
                 or open it with cryptsetup as root"
            ))
        };
        if cost.stripes > MAX_STRIPES {
            return over(format!(
                "{} anti-forensic stripes, more than the {MAX_STRIPES} of every LUKS keyslot",
                cost.stripes
            ));
        }
        if let Kdf::Argon2 {
            variant,
            memory_kib,
            threads,
            ..
        } = &cost.kdf
        {
            if *memory_kib > self.max_memory_kib {
                return over(format!(
                    "{variant} memory {memory_kib} KiB is over this daemon's cap of {} KiB for {}",
                    self.max_memory_kib, self.who
                ));
            }
            if *threads > self.max_threads {
                return over(format!(
                    "{variant} threads {threads} is over this daemon's cap of {} for {}",
                    self.max_threads, self.who
                ));
            }
        }
        if let Some((hash, iterations)) = &cost.digest {
            let digest_ms = pbkdf2_ms(hash, *iterations, 32);
            if digest_ms > self.max_ms {
                return over(format!(
                    "its volume-key digest uses pbkdf2-{hash} with {iterations} iterations, about \
                     {} s per check, over this daemon's cap of {} s per key derivation for {}",
                    seconds(digest_ms),
                    seconds(self.max_ms),
                    self.who
                ));
            }
        }
        let Some(ms) = cost.estimated_ms() else {
            return over(format!(
                "its key derivation cannot be bounded ({}), so this daemon does not run it",
                cost.kdf.describe()
            ));
        };
        if ms > self.max_ms {
            let parameter = match &cost.kdf {
                Kdf::Pbkdf2 { iterations, .. } => format!("{iterations} iterations"),
                Kdf::Argon2 {
                    time, memory_kib, ..
                } => format!("time cost {time} over {memory_kib} KiB"),
                Kdf::Unknown(_) => String::new(),
            };
            return over(format!(
                "{parameter} would take about {} s per key derivation here, over this daemon's \
                 cap of {} s for {}",
                seconds(ms),
                seconds(self.max_ms),
                self.who
            ));
        }
        None
    }

    /// Checks what a new keyslot asks for, before any benchmark or derivation runs; errors
    /// are [`Error::InvalidOption`] naming the parameter.
    pub fn check_request(&self, spec: &HeaderSpec) -> Result<()> {
        let pbkdf = &spec.pbkdf;
        let invalid =
            |parameter: &'static str, message: String| Error::InvalidOption { parameter, message };
        if let Some(ms) = pbkdf.iter_time_ms.filter(|&ms| ms > self.max_iter_time_ms) {
            return Err(invalid(
                "pbkdf.iter_time_ms",
                format!(
                    "an unlock time of {ms} ms is more than this daemon allows for {} ({} ms); \
                     cryptsetup's default is 2000",
                    self.who, self.max_iter_time_ms
                ),
            ));
        }
        let kind = spec.pbkdf_kind();
        if kind == PbkdfKind::Argon2id {
            if let Some(memory) = pbkdf
                .memory_kib
                .filter(|&m| u64::from(m) > self.max_memory_kib)
            {
                return Err(invalid(
                    "pbkdf.memory_kib",
                    format!(
                        "argon2id memory {memory} KiB is more than this daemon allows for {} \
                         ({} KiB)",
                        self.who, self.max_memory_kib
                    ),
                ));
            }
            if let Some(threads) = pbkdf.parallel.filter(|&t| u64::from(t) > self.max_threads) {
                return Err(invalid(
                    "pbkdf.parallel",
                    format!(
                        "{threads} argon2id threads is more than this daemon allows for {} ({})",
                        self.who, self.max_threads
                    ),
                ));
            }
        }
        if let Some(iterations) = pbkdf.iterations {
            // Without a benchmark libcryptsetup uses the memory asked for, else its 1 GiB
            // default, and the threads asked for, else 4.
            let kdf = match kind {
                PbkdfKind::Pbkdf2 => Kdf::Pbkdf2 {
                    hash: "sha256".to_string(),
                    iterations: u64::from(iterations),
                },
                PbkdfKind::Argon2id => Kdf::Argon2 {
                    variant: "argon2id".to_string(),
                    time: u64::from(iterations),
                    memory_kib: pbkdf.memory_kib.map_or(GIB_IN_KIB, u64::from),
                    threads: pbkdf.parallel.map_or(4, u64::from),
                },
            };
            let cost = KeyslotCost {
                keyslot: 0,
                kdf,
                key_bytes: 64,
                stripes: MAX_STRIPES,
                digest: None,
            };
            let ms = cost.estimated_ms().unwrap_or(u64::MAX);
            if ms > self.max_ms {
                return Err(invalid(
                    "pbkdf.iterations",
                    format!(
                        "{iterations} iterations would take about {} s per unlock here, more \
                         than this daemon allows for {} ({} s); ask for a time with \
                         --iter-time instead",
                        seconds(ms),
                        self.who,
                        seconds(self.max_ms)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks a keyslot the daemon just made against the reading caps, so every keyslot imgcrypt
    /// creates for a caller also opens for that caller (a benchmark on a loaded machine could
    /// otherwise pick more than the caps).
    pub fn check_created(&self, cost: &KeyslotCost) -> Result<()> {
        match self.refusal(cost) {
            None => Ok(()),
            Some(why) => Err(Error::InvalidOption {
                parameter: "pbkdf",
                message: format!(
                    "the new keyslot came out more costly than this daemon opens for {}: {why}; \
                     ask for a shorter --iter-time or less memory",
                    self.who
                ),
            }),
        }
    }
}

/// `1.5`
fn seconds(ms: u64) -> String {
    if ms >= 100_000_000 {
        format!("{}", ms / 1000)
    } else {
        format!("{:.1}", ms as f64 / 1000.0)
    }
}

/// The data segment as a LUKS2 header copy describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Segments {
    /// How many segments there are (more than one: a re-encryption is in progress).
    pub count: usize,
    /// Segment 0's `size` in bytes, or None for `dynamic`.
    pub size: Option<u64>,
    /// Segment 0's `iv_tweak` (sectors of 512 bytes added to the IV).
    pub iv_tweak: u64,
    /// Segment 0 carries an `integrity` object (authenticated encryption).
    pub integrity: bool,
    /// Segment 0's `type` (`crypt` for an encrypted payload).
    pub kind: String,
}

/// Everything the cost checks and payload readers need from a header: per keyslot the cost in
/// every header copy, and the segments of every copy.
#[derive(Debug, Clone, Default)]
pub struct HeaderFacts {
    /// Keyslot number to its cost in each header copy found (LUKS1: one).
    pub keyslots: BTreeMap<u32, Vec<KeyslotCost>>,
    /// LUKS2: segment facts of each header copy found.
    pub segments: Vec<Segments>,
}

impl HeaderFacts {
    /// Why keyslot `keyslot` may not be derived under `caps`, or None; a keyslot no header copy
    /// describes is refused (its cost is unknown).
    pub fn refusal(&self, keyslot: u32, caps: &KdfCaps) -> Option<String> {
        match self.keyslots.get(&keyslot) {
            None => Some(format!(
                "keyslot {keyslot}: its parameters could not be read from the header, so its \
                 cost is unknown and imgcrypt did not derive it; check the header with \
                 `cryptsetup luksDump`"
            )),
            Some(copies) => copies.iter().find_map(|cost| caps.refusal(cost)),
        }
    }

    /// The keyslot's KDF as the first (primary) header copy states it.
    pub fn describe(&self, keyslot: u32) -> Option<String> {
        self.keyslots
            .get(&keyslot)
            .and_then(|copies| copies.first())
            .map(|cost| cost.kdf.describe())
    }
}

/// Reads the keyslot costs and segments of the header at the start of `file`.
pub fn read_facts(file: &File, version: LuksVersion, file_len: u64) -> Result<HeaderFacts> {
    match version {
        LuksVersion::Luks1 => luks1_facts(file),
        LuksVersion::Luks2 => Ok(luks2_facts(file, file_len)),
    }
}

/// The volume-key digest's pbkdf2 of a header that may have no keyslot yet (a header being
/// formatted): LUKS1's phdr fields, or LUKS2's first digest in the primary header.
pub fn read_digest(
    file: &File,
    version: LuksVersion,
    file_len: u64,
) -> Result<Option<DigestCheck>> {
    match version {
        LuksVersion::Luks1 => {
            let mut phdr = [0u8; 168];
            read_at(file, &mut phdr, 0)?;
            let hash_field = &phdr[72..104];
            let hash_end = hash_field.iter().position(|&b| b == 0).unwrap_or(32);
            let hash = String::from_utf8_lossy(&hash_field[..hash_end]).to_lowercase();
            let iterations = u32::from_be_bytes(phdr[164..168].try_into().unwrap());
            Ok(Some((hash, u64::from(iterations))))
        }
        LuksVersion::Luks2 => Ok(luks2_json(file, 0, file_len).and_then(|metadata| {
            let digest = metadata
                .get("digests")?
                .as_object()?
                .values()
                .next()?
                .clone();
            let hash = digest.get("hash")?.as_str()?.to_string();
            Some((hash, number(digest.get("iterations")).unwrap_or(u64::MAX)))
        })),
    }
}

fn read_at(file: &File, buffer: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buffer, offset)
        .map_err(|error| Error::io(format!("reading the LUKS header at {offset}"), error))
}

/// LUKS1: one phdr; keyslot entries of 48 bytes from byte 208 (active flag, iterations, salt,
/// material offset, stripes); the hash spec at 72 and the digest iterations at 164.
fn luks1_facts(file: &File) -> Result<HeaderFacts> {
    const ACTIVE: u64 = 0x00AC_71F3;
    let mut phdr = [0u8; 592];
    read_at(file, &mut phdr, 0)?;
    let u32_at = |at: usize| u64::from(u32::from_be_bytes(phdr[at..at + 4].try_into().unwrap()));
    let hash_field = &phdr[72..104];
    let hash_end = hash_field.iter().position(|&b| b == 0).unwrap_or(32);
    let hash = String::from_utf8_lossy(&hash_field[..hash_end]).to_lowercase();
    let key_bytes = u32_at(108);
    let digest_iterations = u32_at(164);
    let mut facts = HeaderFacts::default();
    for slot in 0..8u32 {
        let entry = 208 + slot as usize * 48;
        if u32_at(entry) != ACTIVE {
            continue;
        }
        facts.keyslots.insert(
            slot,
            vec![KeyslotCost {
                keyslot: slot,
                kdf: Kdf::Pbkdf2 {
                    hash: hash.clone(),
                    iterations: u32_at(entry + 4),
                },
                key_bytes,
                stripes: u32_at(entry + 44),
                digest: Some((hash.clone(), digest_iterations)),
            }],
        );
    }
    Ok(facts)
}

/// LUKS2: every header copy libcryptsetup might use; copies that are not valid JSON are
/// skipped (libcryptsetup would reject them too).
fn luks2_facts(file: &File, file_len: u64) -> HeaderFacts {
    let mut facts = HeaderFacts::default();
    for offset in LUKS2_HEADER_OFFSETS {
        let Some(metadata) = luks2_json(file, offset, file_len) else {
            continue;
        };
        for (keyslot, cost) in luks2_keyslots(&metadata) {
            facts.keyslots.entry(keyslot).or_default().push(cost);
        }
        facts.segments.push(luks2_segments(&metadata));
    }
    facts
}

fn luks2_json(file: &File, offset: u64, file_len: u64) -> Option<Value> {
    let mut binary = [0u8; 16];
    if offset + LUKS2_BINARY_HEADER > file_len {
        return None;
    }
    read_at(file, &mut binary, offset).ok()?;
    let magic: &[u8] = if offset == 0 {
        b"LUKS\xba\xbe"
    } else {
        b"SKUL\xba\xbe"
    };
    if &binary[..6] != magic || binary[6..8] != [0, 2] {
        return None;
    }
    let hdr_size = u64::from_be_bytes(binary[8..16].try_into().unwrap());
    if !(16 << 10..=4 << 20).contains(&hdr_size) || offset + hdr_size > file_len {
        return None;
    }
    let mut json = vec![0u8; (hdr_size - LUKS2_BINARY_HEADER) as usize];
    read_at(file, &mut json, offset + LUKS2_BINARY_HEADER).ok()?;
    let end = json.iter().position(|&b| b == 0).unwrap_or(json.len());
    serde_json::from_slice(&json[..end]).ok()
}

/// A LUKS2 number: a JSON integer or (for 64-bit fields) a decimal string.
fn number(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.parse().ok(),
        _ => None,
    }
}

fn luks2_keyslots(metadata: &Value) -> Vec<(u32, KeyslotCost)> {
    let digests: Vec<(Vec<String>, DigestCheck)> = metadata
        .get("digests")
        .and_then(Value::as_object)
        .map(|digests| {
            digests
                .values()
                .map(|digest| {
                    let keyslots = digest
                        .get("keyslots")
                        .and_then(Value::as_array)
                        .map(|list| {
                            list.iter()
                                .filter_map(|id| id.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    let hash = digest.get("hash").and_then(Value::as_str);
                    let iterations = number(digest.get("iterations"));
                    let pbkdf2 = match (digest.get("type").and_then(Value::as_str), hash) {
                        // Missing iterations: assume the worst so it is refused.
                        (Some("pbkdf2"), Some(hash)) => {
                            (hash.to_string(), iterations.unwrap_or(u64::MAX))
                        }
                        _ => ("unknown digest".to_string(), u64::MAX),
                    };
                    (keyslots, pbkdf2)
                })
                .collect()
        })
        .unwrap_or_default();
    let Some(keyslots) = metadata.get("keyslots").and_then(Value::as_object) else {
        return Vec::new();
    };
    keyslots
        .iter()
        .filter_map(|(id, keyslot)| {
            let number_id: u32 = id.parse().ok()?;
            let kdf = keyslot.get("kdf");
            let field = |name: &str| number(kdf.and_then(|kdf| kdf.get(name)));
            let kdf = match kdf.and_then(|kdf| kdf.get("type")).and_then(Value::as_str) {
                Some("pbkdf2") => match (
                    kdf.and_then(|kdf| kdf.get("hash")).and_then(Value::as_str),
                    field("iterations"),
                ) {
                    (Some(hash), Some(iterations)) => Kdf::Pbkdf2 {
                        hash: hash.to_string(),
                        iterations,
                    },
                    _ => Kdf::Unknown("pbkdf2 without a hash or iteration count".to_string()),
                },
                Some(variant @ ("argon2i" | "argon2id")) => {
                    match (field("time"), field("memory"), field("cpus")) {
                        (Some(time), Some(memory_kib), Some(threads)) => Kdf::Argon2 {
                            variant: variant.to_string(),
                            time,
                            memory_kib,
                            threads,
                        },
                        _ => Kdf::Unknown(format!("{variant} without time, memory or cpus")),
                    }
                }
                Some(other) => Kdf::Unknown(format!("KDF type {other:?}")),
                None => Kdf::Unknown("no KDF".to_string()),
            };
            let digest = digests
                .iter()
                .filter(|(slots, _)| slots.iter().any(|slot| slot == id))
                .map(|(_, digest)| digest.clone())
                .max_by_key(|(hash, iterations)| pbkdf2_ms(hash, *iterations, 32));
            let af = keyslot.get("af");
            Some((
                number_id,
                KeyslotCost {
                    keyslot: number_id,
                    kdf,
                    key_bytes: number(keyslot.get("key_size")).unwrap_or(64),
                    stripes: number(af.and_then(|af| af.get("stripes"))).unwrap_or(u64::MAX),
                    digest,
                },
            ))
        })
        .collect()
}

fn luks2_segments(metadata: &Value) -> Segments {
    let segments = metadata.get("segments").and_then(Value::as_object);
    let first = segments.and_then(|segments| segments.get("0"));
    let size = first.and_then(|segment| segment.get("size"));
    Segments {
        count: segments.map_or(0, |segments| segments.len()),
        size: match size.and_then(Value::as_str) {
            Some("dynamic") => None,
            // Unreadable: treat as a zero-byte fixed segment so the payload check refuses it.
            _ => Some(number(size).unwrap_or(0)),
        },
        iv_tweak: number(first.and_then(|segment| segment.get("iv_tweak"))).unwrap_or(u64::MAX),
        integrity: first.is_some_and(|segment| segment.get("integrity").is_some()),
        kind: first
            .and_then(|segment| segment.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pbkdf2(iterations: u64) -> KeyslotCost {
        KeyslotCost {
            keyslot: 1,
            kdf: Kdf::Pbkdf2 {
                hash: "sha256".to_string(),
                iterations,
            },
            key_bytes: 64,
            stripes: 4000,
            digest: Some(("sha256".to_string(), 100_000)),
        }
    }

    fn argon2(time: u64, memory_kib: u64, threads: u64) -> KeyslotCost {
        KeyslotCost {
            kdf: Kdf::Argon2 {
                variant: "argon2id".to_string(),
                time,
                memory_kib,
                threads,
            },
            ..pbkdf2(0)
        }
    }

    #[test]
    fn cryptsetup_defaults_fit_every_caller_class() {
        for caps in [&NON_ROOT_CAPS, &ROOT_CAPS] {
            // LUKS2 default here: argon2id 4 passes, ~400 MiB, 4 threads; at the 1 GiB cap.
            assert_eq!(caps.refusal(&argon2(4, 406_208, 4)), None);
            assert_eq!(caps.refusal(&argon2(4, GIB_IN_KIB, 4)), None);
            // LUKS1 default here: pbkdf2-sha256 for 2 s, 64-byte key (2 blocks).
            assert_eq!(caps.refusal(&pbkdf2(2_252_580)), None);
        }
    }

    #[test]
    fn stalling_keyslots_are_refused_naming_the_parameter_and_cap() {
        let why = NON_ROOT_CAPS.refusal(&pbkdf2(100_000_000)).unwrap();
        assert!(why.contains("keyslot 1"), "{why}");
        assert!(why.contains("100000000 iterations"), "{why}");
        assert!(why.contains("cap of 6.0 s for non-root callers"), "{why}");
        assert!(
            why.contains("cryptsetup luksConvertKey --key-slot 1"),
            "{why}"
        );
        assert!(ROOT_CAPS.refusal(&pbkdf2(u64::from(u32::MAX))).is_some());

        let why = ROOT_CAPS
            .refusal(&argon2(u64::from(u32::MAX), 4 * GIB_IN_KIB, 4))
            .unwrap();
        assert!(why.contains("time cost 4294967295"), "{why}");
        let why = NON_ROOT_CAPS
            .refusal(&argon2(4, 4 * GIB_IN_KIB, 4))
            .unwrap();
        assert!(why.contains("memory 4194304 KiB"), "{why}");
        assert!(why.contains("1048576 KiB"), "{why}");
        let why = NON_ROOT_CAPS.refusal(&argon2(4, 65536, 64)).unwrap();
        assert!(why.contains("threads 64"), "{why}");

        let mut digest = pbkdf2(1000);
        digest.digest = Some(("sha256".to_string(), u64::from(u32::MAX)));
        let why = ROOT_CAPS.refusal(&digest).unwrap();
        assert!(why.contains("digest"), "{why}");
        let mut stripes = pbkdf2(1000);
        stripes.stripes = 4001;
        assert!(ROOT_CAPS.refusal(&stripes).unwrap().contains("stripes"));
        let mut unknown = pbkdf2(1000);
        unknown.kdf = Kdf::Unknown("KDF type \"scrypt\"".to_string());
        assert!(ROOT_CAPS.refusal(&unknown).unwrap().contains("scrypt"));
    }

    #[test]
    fn requests_over_the_callers_caps_are_refused() {
        use imgcrypt_proto::api::Pbkdf;
        let spec = |pbkdf: Pbkdf| HeaderSpec {
            pbkdf,
            ..HeaderSpec::default()
        };
        let parameter = |caps: &KdfCaps, pbkdf: Pbkdf| match caps.check_request(&spec(pbkdf)) {
            Err(Error::InvalidOption { parameter, .. }) => Some(parameter),
            Ok(()) => None,
            Err(other) => panic!("{other:?}"),
        };
        let slow = Pbkdf {
            iter_time_ms: Some(5000),
            ..Pbkdf::default()
        };
        assert_eq!(
            parameter(&NON_ROOT_CAPS, slow.clone()),
            Some("pbkdf.iter_time_ms")
        );
        assert_eq!(parameter(&ROOT_CAPS, slow), None);
        let big = Pbkdf {
            memory_kib: Some(2 * 1024 * 1024),
            ..Pbkdf::default()
        };
        assert_eq!(
            parameter(&NON_ROOT_CAPS, big.clone()),
            Some("pbkdf.memory_kib")
        );
        assert_eq!(parameter(&ROOT_CAPS, big), None);
        let many = Pbkdf {
            iterations: Some(20),
            ..Pbkdf::default()
        };
        assert_eq!(parameter(&ROOT_CAPS, many), Some("pbkdf.iterations"));
        assert_eq!(parameter(&NON_ROOT_CAPS, Pbkdf::default()), None);
    }
}
