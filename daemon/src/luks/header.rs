//! LUKS header creation through libcryptsetup, on a daemon-owned memfd.
//!
//! libcryptsetup formats "devices" it opens by path. We give it `/proc/self/fd/N` of a memfd of
//! our own, never a client's descriptor: nothing is written to the output until the header is
//! complete, a failure leaves the output untouched, and libcryptsetup never re-opens anything a
//! client controls. The job then copies the header bytes (`0..data_offset` of the memfd) to the
//! output.
//!
//! The memfd is sized far beyond any header (it is sparse, so this costs nothing): libcryptsetup
//! refuses an empty device and a size not aligned to the encryption sector, and warns when no
//! room is left for data; the header itself does not depend on the size. LUKS2's data segment is
//! `dynamic` (its length is whatever the device has past the data offset when opened) and LUKS1
//! stores no size at all, so the same header fits the output whatever its final size. Measured
//! with the cryptsetup 2.6.1 CLI on files of 1000 bytes, 4 MiB, 16 MiB, 1 GiB and 3 GiB: same
//! data offsets, same `length: (whole device)`.
//!
//! We generate the volume key ourselves and pass it in, so the caller holds it for the payload
//! without a second PBKDF run to recover it from the keyslot.
//!
//! Formatting is split in two so the key derivation overlaps the copy ([`start_format`]): on a
//! thread of its own, libcryptsetup formats the header without a keyslot (`crypt_format` with
//! our volume key, milliseconds) using explicit iterations with `CRYPT_PBKDF_NO_BENCHMARK`
//! (the caller's, or the benchmark's from [`super::bench`]), the planned keyslot is checked
//! against the caller's caps, and the caller is told the data offset; the same thread then adds
//! the keyslot (`crypt_keyslot_add_by_key`: the derivation) while the caller copies the payload,
//! and [`PendingKeyslot::finish`] hands over the finished header. The `CryptDevice` never leaves
//! that thread. With explicit iterations LUKS1's volume-key digest gets `iterations * 125 /
//! time_ms` (at least 1000) iterations, what libcryptsetup would compute from its own benchmark,
//! and LUKS2's digest 1000 (the digest checks a random 512-bit volume key; it does not guard the
//! passphrase).

use std::fs::File;

use imgcrypt_proto::api::{LuksVersion, Pbkdf, PbkdfKind};
use libcryptsetup_rs::consts::flags::{CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, EncryptionFormat, LuksType};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks1, CryptParamsLuks1Ref, CryptParamsLuks2,
    CryptParamsLuks2Ref, CryptPbkdfType, CryptSettingsHandle, Either,
};

use super::bench::{self, BenchKey, Origin};
use super::cost::{Kdf, KdfCaps, KeyslotCost};
use super::{clear_errors, libcryptsetup_error, route_libcryptsetup_logs, token};
use crate::keys::SecretBytes;
use crate::sys::memfd;
use crate::{Error, Result};

/// Volume key length: AES-XTS with two AES-256 keys.
pub const VOLUME_KEY_BYTES: usize = 64;

/// Cipher and mode, as cryptsetup names them (its default).
const CIPHER: (&str, &str) = ("aes", "xts-plain64");

/// Hash of the LUKS1 header and of pbkdf2 keyslots: cryptsetup's default (`sha256`).
const HASH: &str = "sha256";

/// Size of the scratch memfd the header is formatted on. Larger than the largest LUKS2 header
/// (4 MiB metadata twice plus a 128 MiB keyslot area), a multiple of every sector size.
const SCRATCH_DEVICE_BYTES: u64 = 256 << 20;

/// Encryption sector sizes we offer.
const SECTOR_SIZES: [u32; 2] = [512, 4096];

/// libcryptsetup's lower limits (`crypt_pbkdf_get_limits`), checked here for clear messages.
const PBKDF2_MIN_ITERATIONS: u32 = 1000;
const ARGON2_MIN_ITERATIONS: u32 = 4;
const ARGON2_MIN_MEMORY_KIB: u32 = 32;
const ARGON2_MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;

// Upper bounds on keyslot cost. libcryptsetup serialises every call process-wide (the `mutex`
// feature), so one client asking for an hour-long PBKDF would stall every other job's header.
// These allow roughly 10-30x cryptsetup's defaults, far beyond any sensible unlock time.
/// Longest benchmarked unlock time any client may ask for (root's cap; non-root callers get
/// less, see [`super::cost`]).
const MAX_ITER_TIME_MS: u32 = super::cost::ROOT_CAPS.max_iter_time_ms;
/// Most pbkdf2 iterations (cryptsetup's 2 s default is a few million here).
const PBKDF2_MAX_ITERATIONS: u32 = 50_000_000;
/// Most argon2id iterations (cryptsetup's 2 s default is 4 at up to 1 GiB).
const ARGON2_MAX_ITERATIONS: u32 = 64;

/// What header to make.
///
/// Defaults follow cryptsetup (libcryptsetup 2.6's compiled-in defaults, read from the library
/// at format time, not copied here): LUKS2; 512-byte encryption sectors (the cryptsetup CLI
/// would pick 4096 for files, which changes the sector size a guest sees); argon2id for LUKS2
/// and pbkdf2-sha256 for LUKS1, benchmarked to 2000 ms; argon2id at most 1 GiB of memory
/// (never more than half the RAM) and 4 threads (never more than the online CPUs).
///
/// libcryptsetup applies those caps (4 threads, online CPUs, half the RAM) to explicit values
/// too, silently; [`FormattedHeader::pbkdf`] reports what the keyslot actually got. With a
/// target time, `memory_kib` is the most the benchmark may use, and it may pick less.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSpec {
    /// LUKS1 or LUKS2.
    pub version: LuksVersion,
    /// Encryption sector size: 512, or 4096 for LUKS2.
    pub sector_size: u32,
    /// Keyslot key derivation; absent fields take cryptsetup's defaults.
    pub pbkdf: Pbkdf,
}

impl Default for HeaderSpec {
    fn default() -> Self {
        Self {
            version: LuksVersion::Luks2,
            sector_size: 512,
            pbkdf: Pbkdf::default(),
        }
    }
}

fn invalid(parameter: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidOption {
        parameter,
        message: message.into(),
    }
}

impl HeaderSpec {
    /// The key-derivation function: the one asked for, else the version's default.
    pub fn pbkdf_kind(&self) -> PbkdfKind {
        self.pbkdf.kind.unwrap_or(match self.version {
            LuksVersion::Luks1 => PbkdfKind::Pbkdf2,
            LuksVersion::Luks2 => PbkdfKind::Argon2id,
        })
    }

    /// Checks every option and combination, without calling into libcryptsetup (so it is cheap
    /// and safe on any thread). Errors are [`Error::InvalidOption`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let version = self.version.display_name();
        if !SECTOR_SIZES.contains(&self.sector_size) {
            return Err(invalid(
                "sector_size",
                format!(
                    "sector size {} is not supported: use 512 (the default; what guests \
                     expect) or 4096 (LUKS2 only)",
                    self.sector_size
                ),
            ));
        }
        if self.version == LuksVersion::Luks1 && self.sector_size != 512 {
            return Err(invalid(
                "sector_size",
                format!(
                    "LUKS1 supports only 512-byte encryption sectors, not {}: \
                     use sector size 512, or LUKS2 for 4096",
                    self.sector_size
                ),
            ));
        }

        let kind = self.pbkdf_kind();
        let pbkdf = &self.pbkdf;
        if self.version == LuksVersion::Luks1 && kind == PbkdfKind::Argon2id {
            return Err(invalid(
                "pbkdf.kind",
                "LUKS1 keyslots support only pbkdf2, not argon2id: use pbkdf2, or LUKS2",
            ));
        }
        if pbkdf.iterations.is_some() && pbkdf.iter_time_ms.is_some() {
            return Err(invalid(
                "pbkdf.iterations",
                "give either a fixed iteration count (no benchmark) or a target time \
                 iter_time_ms (benchmarked), not both",
            ));
        }
        if pbkdf.iter_time_ms == Some(0) {
            return Err(invalid(
                "pbkdf.iter_time_ms",
                "the target unlock time must be at least 1 ms (cryptsetup's default is 2000)",
            ));
        }
        if let Some(ms) = pbkdf.iter_time_ms.filter(|&ms| ms > MAX_ITER_TIME_MS) {
            return Err(invalid(
                "pbkdf.iter_time_ms",
                format!(
                    "an unlock time of {ms} ms is more than this daemon allows \
                     ({MAX_ITER_TIME_MS} ms); cryptsetup's default is 2000"
                ),
            ));
        }
        let max_iterations = match kind {
            PbkdfKind::Pbkdf2 => PBKDF2_MAX_ITERATIONS,
            PbkdfKind::Argon2id => ARGON2_MAX_ITERATIONS,
        };
        if let Some(iterations) = pbkdf.iterations.filter(|&i| i > max_iterations) {
            return Err(invalid(
                "pbkdf.iterations",
                format!(
                    "{iterations} iterations is more than this daemon allows for {} \
                     ({max_iterations}); leave it to the benchmark (--iter-time)",
                    kind_name(kind)
                ),
            ));
        }
        match kind {
            PbkdfKind::Pbkdf2 => {
                if let Some(iterations) = pbkdf.iterations.filter(|&i| i < PBKDF2_MIN_ITERATIONS) {
                    return Err(invalid(
                        "pbkdf.iterations",
                        format!(
                            "pbkdf2 needs at least {PBKDF2_MIN_ITERATIONS} iterations \
                             (libcryptsetup's minimum), not {iterations}"
                        ),
                    ));
                }
                if pbkdf.memory_kib.is_some() {
                    return Err(invalid(
                        "pbkdf.memory_kib",
                        format!("a memory cost applies to argon2id only, not pbkdf2 ({version})"),
                    ));
                }
                if pbkdf.parallel.is_some() {
                    return Err(invalid(
                        "pbkdf.parallel",
                        format!("threads apply to argon2id only, not pbkdf2 ({version})"),
                    ));
                }
            }
            PbkdfKind::Argon2id => {
                if let Some(iterations) = pbkdf.iterations.filter(|&i| i < ARGON2_MIN_ITERATIONS) {
                    return Err(invalid(
                        "pbkdf.iterations",
                        format!(
                            "argon2id needs at least {ARGON2_MIN_ITERATIONS} iterations \
                             (libcryptsetup's minimum), not {iterations}"
                        ),
                    ));
                }
                if let Some(memory) = pbkdf.memory_kib {
                    if !(ARGON2_MIN_MEMORY_KIB..=ARGON2_MAX_MEMORY_KIB).contains(&memory) {
                        return Err(invalid(
                            "pbkdf.memory_kib",
                            format!(
                                "argon2id memory must be {ARGON2_MIN_MEMORY_KIB} to \
                                 {ARGON2_MAX_MEMORY_KIB} KiB (libcryptsetup's limits), \
                                 not {memory}"
                            ),
                        ));
                    }
                }
                if pbkdf.parallel == Some(0) {
                    return Err(invalid(
                        "pbkdf.parallel",
                        "argon2id needs at least 1 thread",
                    ));
                }
            }
        }
        Ok(())
    }

    /// libcryptsetup's default settings for our version with the caller's choices applied.
    ///
    /// Shared with keyslots added to existing images ([`super::LuksImage::add_keyslot`]).
    pub(crate) fn pbkdf_settings(&self) -> Result<CryptPbkdfType> {
        let kind = self.pbkdf_kind();
        let luks_type = match (self.version, kind) {
            (LuksVersion::Luks1, _) | (_, PbkdfKind::Pbkdf2) => LuksType::Luks1,
            (LuksVersion::Luks2, PbkdfKind::Argon2id) => LuksType::Luks2,
        };
        // The LUKS1 default is pbkdf2 and the LUKS2 default argon2id (unless libcryptsetup was
        // built otherwise: then the type is overridden below and the other defaults kept).
        let mut settings = CryptSettingsHandle::get_pbkdf_default(&luks_type)
            .map_err(|error| libcryptsetup_error("reading PBKDF defaults", error))?;
        settings.type_ = match kind {
            PbkdfKind::Pbkdf2 => CryptKdf::Pbkdf2,
            PbkdfKind::Argon2id => CryptKdf::Argon2Id,
        };
        if settings.hash.is_none() {
            settings.hash = Some(HASH.to_string());
        }
        if kind == PbkdfKind::Pbkdf2 {
            settings.max_memory_kb = 0;
            settings.parallel_threads = 0;
        } else {
            if let Some(memory) = self.pbkdf.memory_kib {
                settings.max_memory_kb = memory;
            }
            if let Some(parallel) = self.pbkdf.parallel {
                settings.parallel_threads = parallel;
            }
        }
        if let Some(time_ms) = self.pbkdf.iter_time_ms {
            settings.time_ms = time_ms;
        }
        settings.flags = CryptPbkdf::empty();
        settings.iterations = 0;
        if let Some(iterations) = self.pbkdf.iterations {
            settings.iterations = iterations;
            settings.flags = CryptPbkdf::NO_BENCHMARK;
        }
        Ok(settings)
    }
}

/// A formatted header, ready to be copied to the output.
#[derive(Debug)]
pub struct FormattedHeader {
    /// Daemon-owned memfd holding exactly the header: `data_offset` bytes.
    pub image: File,
    /// Byte offset of the payload, read back from the header written.
    pub data_offset: u64,
    /// Cipher specification, `aes-xts-plain64`.
    pub cipher: String,
    /// Volume key size in bits (512).
    pub key_size_bits: u32,
    /// The keyslot's key derivation as stored, e.g. `argon2id (5 iterations, 1048576 KiB,
    /// 2 threads; benchmarked for 2000 ms)` or `pbkdf2-sha256 (1000 iterations)`.
    pub pbkdf: String,
    /// What opening the keyslot costs, for the caller's caps ([`super::cost::KdfCaps`]).
    pub cost: KeyslotCost,
    /// Whether the header carries the key's `imgcrypt-key` fingerprint (LUKS2, and only for a
    /// key that looks generated: [`crate::keys::strength`]).
    pub fingerprint_stored: bool,
    /// Where the benchmarked iterations came from; None when the caller gave them.
    pub benchmark: Option<Benchmark>,
}

/// How a keyslot's iterations were benchmarked ([`super::bench`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Benchmark {
    /// Cached or measured for this job.
    pub origin: Origin,
    /// How long the measurement took (whenever it was taken).
    pub took: std::time::Duration,
}

/// What a header job says before its keyslot is derived.
#[derive(Debug)]
pub enum Stage {
    /// No fresh measurement of this PBKDF configuration is cached: measuring now.
    Benchmarking,
}

/// A header formatted without its keyslot: enough to plan and copy the payload. The keyslot is
/// being derived on its own thread ([`PendingKeyslot`]).
#[derive(Debug)]
pub struct PreparedHeader {
    /// Daemon-owned memfd the header is formatted on; its first `data_offset` bytes are the
    /// header once [`PendingKeyslot::finish`] returns (before, the keyslot is missing).
    pub image: File,
    /// Byte offset of the payload.
    pub data_offset: u64,
}

/// What the thread reports to [`start_format`].
enum Event {
    Stage(Stage),
    /// The header exists without its keyslot; the keyslot's planned cost passed the caps.
    Prepared {
        data_offset: u64,
    },
}

/// What the thread returns once the keyslot is derived.
struct Derived {
    cipher: String,
    key_size_bits: u32,
    pbkdf: String,
    fingerprint_stored: bool,
    benchmark: Option<Benchmark>,
}

/// The keyslot's key derivation, running on its own thread while the caller copies the
/// payload.
pub struct PendingKeyslot<'scope> {
    thread: std::thread::ScopedJoinHandle<'scope, Result<Derived>>,
    image: File,
    data_offset: u64,
    version: LuksVersion,
}

/// What a header job needs besides the header itself.
pub struct HeaderContext<'a> {
    /// The caller's caps: the keyslot's planned cost is checked before it is derived, and the
    /// stored one after.
    pub caps: Option<&'a KdfCaps>,
    /// Whether no other job runs now (a benchmark is cached only when it was taken idle).
    pub idle: &'a (dyn Fn() -> bool + Sync),
}

/// No caps, and a benchmark measured here is used but never cached (the caller cannot say
/// whether other jobs run, and a busy process skews libcryptsetup's CPU-time measurement).
pub const UNCAPPED: HeaderContext<'static> = HeaderContext {
    caps: None,
    idle: &|| false,
};

/// Formats a LUKS header with `volume_key` and one keyslot opened by `passphrase`, all on the
/// calling thread: [`start_format`] and [`PendingKeyslot::finish`] in one.
///
/// For LUKS2 the keyslot also gets an `imgcrypt-key` token carrying `fingerprint` (the key
/// file's, see [`super::token`]), so decrypting later finds the keyslot without trials, unless
/// the key does not look generated ([`crate::keys::strength`]). LUKS1 has no tokens and ignores
/// it.
///
/// # Threads
///
/// Call this from a thread that may block: the key derivation takes the target time (seconds
/// by default). libcryptsetup is not thread-safe: each `CryptDevice` lives on one thread from
/// creation to free (it is `!Send`), and the `mutex` feature of libcryptsetup-rs serialises each
/// libcryptsetup call across threads, so a derivation on one thread makes every other thread's
/// libcryptsetup calls wait for it.
pub fn format_header(
    spec: &HeaderSpec,
    volume_key: &SecretBytes,
    passphrase: &SecretBytes,
    fingerprint: &str,
) -> Result<FormattedHeader> {
    format_header_with(spec, volume_key, passphrase, fingerprint, &UNCAPPED)
}

/// [`format_header`] under `context`'s caps.
pub fn format_header_with(
    spec: &HeaderSpec,
    volume_key: &SecretBytes,
    passphrase: &SecretBytes,
    fingerprint: &str,
    context: &HeaderContext<'_>,
) -> Result<FormattedHeader> {
    std::thread::scope(|scope| {
        let (_, pending) = start_format(
            scope,
            spec,
            volume_key,
            passphrase,
            fingerprint,
            context,
            &mut |_| {},
        )?;
        pending.finish()
    })
}

/// Starts formatting a header with `volume_key` and one keyslot opened by `passphrase` on a
/// thread of `scope`, and returns once the header exists without its keyslot (the PBKDF
/// configuration benchmarked or found in [`super::bench`]'s cache, the planned keyslot cost
/// checked). The keyslot's derivation goes on meanwhile at the fixed iteration count; the
/// payload needs only the volume key, so the caller copies it and then calls
/// [`PendingKeyslot::finish`]. `on_stage` hears about a benchmark before it runs.
///
/// See [`format_header`] for the token and for threads.
pub fn start_format<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    spec: &'env HeaderSpec,
    volume_key: &'env SecretBytes,
    passphrase: &'env SecretBytes,
    fingerprint: &'env str,
    context: &'env HeaderContext<'env>,
    on_stage: &mut dyn FnMut(Stage),
) -> Result<(PreparedHeader, PendingKeyslot<'scope>)> {
    spec.validate()?;
    if volume_key.len() != VOLUME_KEY_BYTES {
        return Err(Error::Luks {
            operation: "format",
            message: format!(
                "the volume key is {} bytes; aes-xts-plain64 here uses {VOLUME_KEY_BYTES}",
                volume_key.len()
            ),
        });
    }
    let image = memfd::create("imgcrypt-luks-header")?;
    image
        .set_len(SCRATCH_DEVICE_BYTES)
        .map_err(|error| Error::io("sizing the in-memory LUKS header device", error))?;
    let device_file = image
        .try_clone()
        .map_err(|error| Error::io("duplicating the in-memory LUKS header device", error))?;

    let (events, received) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("imgcrypt-keyslot".to_string())
        .spawn_scoped(scope, move || {
            format_on_this_thread(
                &device_file,
                spec,
                volume_key,
                passphrase,
                fingerprint,
                context,
                &events,
            )
        })
        .map_err(|error| Error::io("starting the keyslot thread", error))?;

    let mut prepared = None;
    // The thread sends its stages, then `Prepared`; it hangs up early only on failure.
    for event in received.iter() {
        match event {
            Event::Stage(stage) => on_stage(stage),
            Event::Prepared { data_offset } => {
                prepared = Some(data_offset);
                break;
            }
        }
    }
    let Some(data_offset) = prepared else {
        return Err(match thread.join() {
            Ok(Err(error)) => error,
            Ok(Ok(_)) => Error::Luks {
                operation: "format",
                message: "the keyslot thread ended without formatting the header".to_string(),
            },
            Err(panic) => std::panic::resume_unwind(panic),
        });
    };
    let header = PreparedHeader {
        image: image
            .try_clone()
            .map_err(|error| Error::io("duplicating the in-memory LUKS header", error))?,
        data_offset,
    };
    Ok((
        header,
        PendingKeyslot {
            thread,
            image,
            data_offset,
            version: spec.version,
        },
    ))
}

impl PendingKeyslot<'_> {
    /// Whether the derivation is over ([`Self::finish`] would not wait).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the keyslot's derivation and returns the complete header.
    pub fn finish(self) -> Result<FormattedHeader> {
        let derived = match self.thread.join() {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let Self {
            image,
            data_offset,
            version,
            ..
        } = self;
        image
            .set_len(data_offset)
            .map_err(|error| Error::io("trimming the in-memory LUKS header", error))?;
        let cost = super::cost::read_facts(&image, version, data_offset)?
            .keyslots
            .into_values()
            .next()
            .and_then(|copies| copies.into_iter().next())
            .ok_or_else(|| Error::Luks {
                operation: "format",
                message: "the new header describes no keyslot".to_string(),
            })?;
        Ok(FormattedHeader {
            image,
            data_offset,
            cipher: derived.cipher,
            key_size_bits: derived.key_size_bits,
            pbkdf: derived.pbkdf,
            cost,
            fingerprint_stored: derived.fingerprint_stored,
            benchmark: derived.benchmark,
        })
    }
}

/// The keyslot thread: the whole life of the `CryptDevice`.
fn format_on_this_thread(
    device_file: &File,
    spec: &HeaderSpec,
    volume_key: &SecretBytes,
    passphrase: &SecretBytes,
    fingerprint: &str,
    context: &HeaderContext<'_>,
    events: &std::sync::mpsc::Sender<Event>,
) -> Result<Derived> {
    route_libcryptsetup_logs();
    clear_errors();
    let started = std::time::Instant::now();
    let mut device = CryptInit::init(&memfd::proc_path(device_file))
        .map_err(|error| libcryptsetup_error("opening the in-memory header device", error))?;

    let on_measure = || {
        let _ = events.send(Event::Stage(Stage::Benchmarking));
    };
    let (settings, benchmark) = fixed_settings(&mut device, spec, context.idle, &on_measure)?;
    let data_offset = format_without_keyslot(&mut device, spec, volume_key)?;
    if data_offset == 0 || data_offset > SCRATCH_DEVICE_BYTES {
        return Err(Error::Luks {
            operation: "format",
            message: format!(
                "libcryptsetup reported a data offset of {data_offset} bytes, \
                 outside the {SCRATCH_DEVICE_BYTES}-byte header device"
            ),
        });
    }
    // What the keyslot will cost, checked before it is derived (the benchmark may have picked
    // more than the caller may open) and before the caller starts the copy.
    let planned = planned_cost(spec.version, &settings, device_file, data_offset)?;
    if let Some(caps) = context.caps {
        caps.check_created(&planned)?;
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        data_offset,
        "formatted {} header without its keyslot",
        spec.version.display_name()
    );
    // The caller may have gone (its job failed): then there is nothing to derive for.
    if events.send(Event::Prepared { data_offset }).is_err() {
        return Err(Error::Cancelled);
    }

    super::crash::point("encrypt:deriving");
    let derive_started = std::time::Instant::now();
    let keyslot = device
        .keyslot_handle()
        .add_by_key(
            None,
            Some(Either::Left(volume_key.as_bytes())),
            passphrase.as_bytes(),
            CryptVolumeKey::empty(),
        )
        .map_err(|error| libcryptsetup_error("adding the keyslot", error))?;
    tracing::debug!(
        elapsed_ms = derive_started.elapsed().as_millis() as u64,
        "derived the keyslot key"
    );
    let fingerprint_stored = spec.version == LuksVersion::Luks2
        && crate::keys::strength::may_store_fingerprint(passphrase.as_bytes())?;
    if fingerprint_stored {
        token::add(&mut device, keyslot, fingerprint)?;
    }

    let sector_size = libcryptsetup_rs::get_sector_size(Some(&mut device));
    if u32::try_from(sector_size).ok() != Some(spec.sector_size) {
        return Err(Error::Luks {
            operation: "format",
            message: format!(
                "the header has {sector_size}-byte sectors, not the {} asked for",
                spec.sector_size
            ),
        });
    }
    let mut status = device.status_handle();
    let cipher = super::cipher_spec(&mut status)?;
    let key_size_bits = u32::try_from(status.get_volume_key_size())
        .ok()
        .and_then(|bytes| bytes.checked_mul(8))
        .ok_or_else(|| Error::Luks {
            operation: "format",
            message: "libcryptsetup reported a negative volume key size".to_string(),
        })?;
    let stored = device
        .keyslot_handle()
        .get_pbkdf(keyslot)
        .map_err(|error| libcryptsetup_error("reading the keyslot's PBKDF", error))?;
    // The keyslot must have exactly what was set: libcryptsetup falls back to benchmarking
    // silently when it rejects settings.
    if stored.iterations != settings.iterations
        || (stored.type_ != CryptKdf::Pbkdf2
            && (stored.max_memory_kb != settings.max_memory_kb
                || stored.parallel_threads != settings.parallel_threads))
    {
        return Err(Error::Luks {
            operation: "adding the keyslot",
            message: format!(
                "the keyslot got {} instead of the {} set",
                describe_pbkdf(&stored, None),
                describe_pbkdf(&settings, None)
            ),
        });
    }
    let pbkdf = describe_pbkdf(&stored, benchmark.map(|_| settings.time_ms));
    drop(device);
    Ok(Derived {
        cipher,
        key_size_bits,
        pbkdf,
        fingerprint_stored,
        benchmark,
    })
}

/// Sets the keyslot's PBKDF on `device` with explicit iterations and libcryptsetup's
/// no-benchmark flag: the caller's, or the benchmark's for the caller's target time (from the
/// cache, else measured now). Returns what was set and how it was benchmarked.
///
/// `idle` says whether no other job runs (a measurement is cached only then); `on_measure` is
/// called before a measurement starts. Shared with keyslots added to existing images
/// ([`super::LuksImage::add_keyslot_with`]).
pub(super) fn fixed_settings(
    device: &mut CryptDevice,
    spec: &HeaderSpec,
    idle: &dyn Fn() -> bool,
    on_measure: &dyn Fn(),
) -> Result<(CryptPbkdfType, Option<Benchmark>)> {
    let requested = spec.pbkdf_settings()?;
    let mut benchmark = None;
    let settings = if requested.flags.contains(CryptPbkdf::NO_BENCHMARK) {
        requested
    } else {
        let (capped, key) = capped_configuration(device, &requested)?;
        let (measured, origin) = bench::cache().get_or_measure(&key, idle, |key| {
            on_measure();
            bench::measure(key)
        })?;
        benchmark = Some(Benchmark {
            origin,
            took: measured.took,
        });
        let mut fixed = capped;
        fixed.iterations = measured.iterations;
        if fixed.type_ != CryptKdf::Pbkdf2 {
            fixed.max_memory_kb = measured.memory_kb;
            fixed.parallel_threads = measured.threads;
        }
        fixed.flags = CryptPbkdf::NO_BENCHMARK;
        fixed
    };
    device
        .settings_handle()
        .set_pbkdf_type(&settings)
        .map_err(|error| libcryptsetup_error("setting the PBKDF", error))?;
    let set = device
        .settings_handle()
        .get_pbkdf_type()
        .map_err(|error| libcryptsetup_error("reading the PBKDF", error))?;
    if !set.flags.contains(CryptPbkdf::NO_BENCHMARK) || set.iterations != settings.iterations {
        return Err(Error::Luks {
            operation: "setting the PBKDF",
            message: format!(
                "libcryptsetup did not keep the fixed iterations ({}, no benchmark) it was \
                 given: it has {}",
                describe_pbkdf(&settings, None),
                describe_pbkdf(&set, None)
            ),
        });
    }
    Ok((set, benchmark))
}

/// `requested` as libcryptsetup caps it on `device` (threads at most the CPUs and 4, memory at
/// most half the RAM: set as asked, then read back), and the benchmark configuration that is.
fn capped_configuration(
    device: &mut CryptDevice,
    requested: &CryptPbkdfType,
) -> Result<(CryptPbkdfType, BenchKey)> {
    device
        .settings_handle()
        .set_pbkdf_type(requested)
        .map_err(|error| libcryptsetup_error("setting the PBKDF", error))?;
    let capped = device
        .settings_handle()
        .get_pbkdf_type()
        .map_err(|error| libcryptsetup_error("reading the PBKDF", error))?;
    let key = BenchKey {
        kind: kdf_name(&capped.type_).to_string(),
        hash: capped.hash.clone().unwrap_or_else(|| HASH.to_string()),
        time_ms: capped.time_ms,
        max_memory_kb: capped.max_memory_kb,
        parallel_threads: capped.parallel_threads,
        key_bytes: VOLUME_KEY_BYTES,
    };
    Ok((capped, key))
}

/// The benchmark configuration a header made to `spec` measures (libcryptsetup's caps
/// applied), or None when `spec` gives fixed iterations. Formats nothing: the caps are read on
/// a scratch device.
pub fn benchmark_configuration(spec: &HeaderSpec) -> Result<Option<BenchKey>> {
    spec.validate()?;
    let requested = spec.pbkdf_settings()?;
    if requested.flags.contains(CryptPbkdf::NO_BENCHMARK) {
        return Ok(None);
    }
    let (_image, mut device) = scratch_device()?;
    Ok(Some(capped_configuration(&mut device, &requested)?.1))
}

/// A libcryptsetup context on a fresh, empty scratch memfd (kept open by the returned file).
fn scratch_device() -> Result<(File, CryptDevice)> {
    route_libcryptsetup_logs();
    clear_errors();
    let image = memfd::create("imgcrypt-luks-scratch")?;
    image
        .set_len(SCRATCH_DEVICE_BYTES)
        .map_err(|error| Error::io("sizing the scratch LUKS device", error))?;
    let device = CryptInit::init(&memfd::proc_path(&image))
        .map_err(|error| libcryptsetup_error("opening the scratch LUKS device", error))?;
    Ok((image, device))
}

/// libcryptsetup's name of a KDF.
fn kdf_name(kdf: &CryptKdf) -> &'static str {
    match kdf {
        CryptKdf::Pbkdf2 => "pbkdf2",
        CryptKdf::Argon2I => "argon2i",
        CryptKdf::Argon2Id => "argon2id",
    }
}

/// What deriving the keyslot with `settings` will cost, in the terms of
/// [`super::cost::KdfCaps`]: its KDF, 4000 stripes, and the volume-key digest the keyslot-less
/// header on `image` already holds.
fn planned_cost(
    version: LuksVersion,
    settings: &CryptPbkdfType,
    image: &File,
    data_offset: u64,
) -> Result<KeyslotCost> {
    let kdf = match &settings.type_ {
        CryptKdf::Pbkdf2 => Kdf::Pbkdf2 {
            hash: settings.hash.clone().unwrap_or_else(|| HASH.to_string()),
            iterations: u64::from(settings.iterations),
        },
        other => Kdf::Argon2 {
            variant: kdf_name(other).to_string(),
            time: u64::from(settings.iterations),
            memory_kib: u64::from(settings.max_memory_kb),
            threads: u64::from(settings.parallel_threads),
        },
    };
    let digest = super::cost::read_digest(image, version, data_offset)?;
    Ok(KeyslotCost {
        keyslot: 0,
        kdf,
        key_bytes: VOLUME_KEY_BYTES as u64,
        stripes: 4000,
        digest,
    })
}

/// `crypt_format` with our volume key and no keyslot; the PBKDF is already set. Returns the
/// data offset in bytes.
fn format_without_keyslot(
    device: &mut CryptDevice,
    spec: &HeaderSpec,
    volume_key: &SecretBytes,
) -> Result<u64> {
    let volume_key_bytes = Either::Left(volume_key.as_bytes());
    let formatted = match spec.version {
        LuksVersion::Luks1 => {
            let params = CryptParamsLuks1 {
                hash: HASH.to_string(),
                data_alignment: 0,
                data_device: None,
            };
            let mut params: CryptParamsLuks1Ref<'_> = (&params)
                .try_into()
                .map_err(|error| libcryptsetup_error("format", error))?;
            device.context_handle().format(
                EncryptionFormat::Luks1,
                CIPHER,
                None,
                volume_key_bytes,
                Some(&mut params),
            )
        }
        LuksVersion::Luks2 => {
            let params = CryptParamsLuks2 {
                pbkdf: None,
                integrity: None,
                integrity_params: None,
                data_alignment: 0,
                data_device: None,
                sector_size: spec.sector_size,
                label: None,
                subsystem: None,
            };
            let mut params: CryptParamsLuks2Ref<'_> = (&params)
                .try_into()
                .map_err(|error| libcryptsetup_error("format", error))?;
            device.context_handle().format(
                EncryptionFormat::Luks2,
                CIPHER,
                None,
                volume_key_bytes,
                Some(&mut params),
            )
        }
    };
    formatted.map_err(|error| libcryptsetup_error("format", error))?;
    device
        .status_handle()
        .get_data_offset()
        .checked_mul(512)
        .ok_or_else(|| Error::Luks {
            operation: "format",
            message: "data offset overflows".to_string(),
        })
}

/// A keyslot-less LUKS2 header with a fixed-iteration digest on a throwaway memfd: the first
/// serialised libcryptsetup call that sets up its crypto backend ([`bench::ensure_crypto_backend`]).
pub(super) fn scratch_format() -> Result<()> {
    let (_image, mut device) = scratch_device()?;
    let spec = HeaderSpec {
        pbkdf: Pbkdf {
            kind: Some(PbkdfKind::Pbkdf2),
            iterations: Some(PBKDF2_MIN_ITERATIONS),
            ..Pbkdf::default()
        },
        ..HeaderSpec::default()
    };
    device
        .settings_handle()
        .set_pbkdf_type(&spec.pbkdf_settings()?)
        .map_err(|error| libcryptsetup_error("setting the PBKDF", error))?;
    let volume_key = SecretBytes::random(VOLUME_KEY_BYTES)?;
    format_without_keyslot(&mut device, &spec, &volume_key).map(|_| ())
}

/// A keyslot's key derivation as users read it: `pbkdf2-sha256 (1000 iterations)` or
/// `argon2id (4 iterations, 32 KiB, 1 thread)`, with the benchmark target when there was one.
pub(crate) fn describe_pbkdf(stored: &CryptPbkdfType, benchmarked_ms: Option<u32>) -> String {
    let mut pbkdf = match stored.type_ {
        CryptKdf::Pbkdf2 => format!(
            "pbkdf2-{} ({} iterations",
            stored.hash.as_deref().unwrap_or(HASH),
            stored.iterations
        ),
        CryptKdf::Argon2Id | CryptKdf::Argon2I => format!(
            "{} ({} iterations, {} KiB, {} thread{}",
            if stored.type_ == CryptKdf::Argon2Id {
                "argon2id"
            } else {
                "argon2i"
            },
            stored.iterations,
            stored.max_memory_kb,
            stored.parallel_threads,
            if stored.parallel_threads == 1 {
                ""
            } else {
                "s"
            }
        ),
    };
    if let Some(ms) = benchmarked_ms {
        pbkdf.push_str(&format!("; benchmarked for {ms} ms"));
    }
    pbkdf.push(')');
    pbkdf
}

/// The function's name as users write it.
fn kind_name(kind: PbkdfKind) -> &'static str {
    match kind {
        PbkdfKind::Argon2id => "argon2id",
        PbkdfKind::Pbkdf2 => "pbkdf2",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fingerprint (SHA-256 of the empty string) for headers whose key file does not matter.
    const FINGERPRINT: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    /// Copies a formatted header into a named file the cryptsetup CLI can read.
    fn header_file(header: &FormattedHeader) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        let mut source = &header.image;
        std::io::Seek::rewind(&mut source).unwrap();
        std::io::copy(&mut source, file.as_file_mut()).unwrap();
        file
    }

    fn fast_spec(version: LuksVersion) -> HeaderSpec {
        spec(
            version,
            512,
            Pbkdf {
                kind: Some(PbkdfKind::Pbkdf2),
                iterations: Some(1000),
                ..Pbkdf::default()
            },
        )
    }

    /// `cryptsetup luksDump` of a formatted header.
    fn dump(header: &FormattedHeader) -> String {
        let file = header_file(header);
        let output = std::process::Command::new("cryptsetup")
            .arg("luksDump")
            .arg(file.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).to_string()
    }

    #[test]
    fn a_cached_benchmark_gives_the_keyslot_exactly_its_iterations() {
        // A target time no other test uses, and a measurement no benchmark would make.
        let key = BenchKey {
            kind: "pbkdf2".to_string(),
            hash: "sha256".to_string(),
            time_ms: 4321,
            max_memory_kb: 0,
            parallel_threads: 0,
            key_bytes: VOLUME_KEY_BYTES,
        };
        let measured = bench::Measured {
            iterations: 12_345,
            memory_kb: 0,
            threads: 0,
            took: std::time::Duration::from_millis(3),
        };
        bench::cache().insert(
            key,
            measured,
            std::time::Instant::now(),
            bench::online_cpus(),
        );
        let volume_key = SecretBytes::random(VOLUME_KEY_BYTES).unwrap();
        let passphrase = SecretBytes::random(44).unwrap();
        let mut key_file = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        std::io::Write::write_all(key_file.as_file_mut(), passphrase.as_bytes()).unwrap();
        for version in [LuksVersion::Luks2, LuksVersion::Luks1] {
            let spec = spec(
                version,
                512,
                Pbkdf {
                    kind: Some(PbkdfKind::Pbkdf2),
                    iter_time_ms: Some(4321),
                    ..Pbkdf::default()
                },
            );
            let header = format_header(&spec, &volume_key, &passphrase, FINGERPRINT).unwrap();
            let benchmark = header.benchmark.expect("benchmarked");
            assert!(
                matches!(benchmark.origin, Origin::Cached { .. }),
                "{benchmark:?}"
            );
            assert_eq!(benchmark.took, measured.took);
            assert_eq!(
                header.cost.kdf,
                Kdf::Pbkdf2 {
                    hash: "sha256".to_string(),
                    iterations: 12_345
                }
            );
            let text = dump(&header);
            assert!(
                text.lines()
                    .any(|line| line.trim() == "Iterations:         \t12345"
                        || line.trim().replace(char::is_whitespace, "") == "Iterations:12345"),
                "{version:?}: {text}"
            );
            let file = header_file(&header);
            let opened = std::process::Command::new("cryptsetup")
                .args(["open", "--test-passphrase", "--key-file"])
                .arg(key_file.path())
                .arg(file.path())
                .status()
                .unwrap();
            assert!(opened.success(), "{version:?}: cryptsetup does not open it");
        }
    }

    #[test]
    fn luks2_headers_carry_the_key_fingerprint_token() {
        let volume_key = SecretBytes::random(VOLUME_KEY_BYTES).unwrap();
        let passphrase = SecretBytes::random(44).unwrap();
        let fingerprint = imgcrypt_proto::keyfile::fingerprint(passphrase.as_bytes());
        let header = format_header(
            &fast_spec(LuksVersion::Luks2),
            &volume_key,
            &passphrase,
            &fingerprint,
        )
        .unwrap();
        let file = header_file(&header);
        let output = std::process::Command::new("cryptsetup")
            .args(["token", "export", "--token-id", "0"])
            .arg(file.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let token: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(
            token,
            serde_json::json!({
                "type": "imgcrypt-key",
                "keyslots": ["0"],
                "key_sha256": fingerprint,
            })
        );

        // LUKS1 has nowhere to put it, and formatting still works.
        let luks1 = format_header(
            &fast_spec(LuksVersion::Luks1),
            &volume_key,
            &passphrase,
            &fingerprint,
        )
        .unwrap();
        let output = std::process::Command::new("cryptsetup")
            .args(["luksDump"])
            .arg(header_file(&luks1).path())
            .output()
            .unwrap();
        let dump = String::from_utf8_lossy(&output.stdout);
        assert!(
            dump.lines()
                .any(|line| line.starts_with("Version:") && line.trim_end().ends_with('1')),
            "{dump}"
        );
    }

    fn spec(version: LuksVersion, sector_size: u32, pbkdf: Pbkdf) -> HeaderSpec {
        HeaderSpec {
            version,
            sector_size,
            pbkdf,
        }
    }

    #[test]
    fn refuses_keyslot_costs_that_would_stall_other_jobs() {
        let too_slow = spec(
            LuksVersion::Luks2,
            512,
            Pbkdf {
                iter_time_ms: Some(MAX_ITER_TIME_MS + 1),
                ..Pbkdf::default()
            },
        );
        let (parameter, message) = parameter_of(&too_slow);
        assert_eq!(parameter, "pbkdf.iter_time_ms");
        assert!(
            message.contains("more than this daemon allows"),
            "{message}"
        );

        for (kind, limit) in [
            (PbkdfKind::Pbkdf2, PBKDF2_MAX_ITERATIONS),
            (PbkdfKind::Argon2id, ARGON2_MAX_ITERATIONS),
        ] {
            let at_limit = |iterations| {
                spec(
                    LuksVersion::Luks2,
                    512,
                    Pbkdf {
                        kind: Some(kind),
                        iterations: Some(iterations),
                        ..Pbkdf::default()
                    },
                )
            };
            assert!(at_limit(limit).validate().is_ok());
            let (parameter, message) = parameter_of(&at_limit(limit + 1));
            assert_eq!(parameter, "pbkdf.iterations");
            assert!(message.contains(kind_name(kind)), "{message}");
        }
    }

    fn parameter_of(spec: &HeaderSpec) -> (&'static str, String) {
        match spec.validate() {
            Err(Error::InvalidOption { parameter, message }) => (parameter, message),
            other => panic!("expected InvalidOption for {spec:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(HeaderSpec::default().validate().unwrap(), ());
        assert_eq!(HeaderSpec::default().pbkdf_kind(), PbkdfKind::Argon2id);
        let luks1 = spec(LuksVersion::Luks1, 512, Pbkdf::default());
        luks1.validate().unwrap();
        assert_eq!(luks1.pbkdf_kind(), PbkdfKind::Pbkdf2);
        spec(LuksVersion::Luks2, 4096, Pbkdf::default())
            .validate()
            .unwrap();
    }

    #[test]
    fn sector_size_rules() {
        let (parameter, message) = parameter_of(&spec(LuksVersion::Luks1, 4096, Pbkdf::default()));
        assert_eq!(parameter, "sector_size");
        assert!(message.contains("LUKS1 supports only 512"), "{message}");
        let (parameter, message) = parameter_of(&spec(LuksVersion::Luks2, 1000, Pbkdf::default()));
        assert_eq!(parameter, "sector_size");
        assert!(message.contains("1000"), "{message}");
    }

    #[test]
    fn pbkdf_rules() {
        let cases: [(LuksVersion, Pbkdf, &str, &str); 10] = [
            (
                LuksVersion::Luks1,
                Pbkdf {
                    kind: Some(PbkdfKind::Argon2id),
                    ..Pbkdf::default()
                },
                "pbkdf.kind",
                "only pbkdf2",
            ),
            (
                LuksVersion::Luks1,
                Pbkdf {
                    iterations: Some(999),
                    ..Pbkdf::default()
                },
                "pbkdf.iterations",
                "at least 1000",
            ),
            (
                LuksVersion::Luks2,
                Pbkdf {
                    kind: Some(PbkdfKind::Pbkdf2),
                    iterations: Some(10),
                    ..Pbkdf::default()
                },
                "pbkdf.iterations",
                "at least 1000",
            ),
            (
                LuksVersion::Luks2,
                Pbkdf {
                    iterations: Some(3),
                    ..Pbkdf::default()
                },
                "pbkdf.iterations",
                "at least 4",
            ),
            (
                LuksVersion::Luks2,
                Pbkdf {
                    memory_kib: Some(31),
                    ..Pbkdf::default()
                },
                "pbkdf.memory_kib",
                "32 to 4194304",
            ),
            (
                LuksVersion::Luks2,
                Pbkdf {
                    memory_kib: Some(4 * 1024 * 1024 + 1),
                    ..Pbkdf::default()
                },
                "pbkdf.memory_kib",
                "32 to 4194304",
            ),
            (
                LuksVersion::Luks2,
                Pbkdf {
                    parallel: Some(0),
                    ..Pbkdf::default()
                },
                "pbkdf.parallel",
                "at least 1 thread",
            ),
            (
                LuksVersion::Luks1,
                Pbkdf {
                    memory_kib: Some(1024),
                    ..Pbkdf::default()
                },
                "pbkdf.memory_kib",
                "argon2id only",
            ),
            (
                LuksVersion::Luks2,
                Pbkdf {
                    iterations: Some(4),
                    iter_time_ms: Some(100),
                    ..Pbkdf::default()
                },
                "pbkdf.iterations",
                "not both",
            ),
            (
                LuksVersion::Luks2,
                Pbkdf {
                    iter_time_ms: Some(0),
                    ..Pbkdf::default()
                },
                "pbkdf.iter_time_ms",
                "at least 1 ms",
            ),
        ];
        for (version, pbkdf, expected_parameter, words) in cases {
            let (parameter, message) = parameter_of(&spec(version, 512, pbkdf));
            assert_eq!(parameter, expected_parameter, "{message}");
            assert!(message.contains(words), "{message:?} lacks {words:?}");
        }
        // The minimums themselves are allowed.
        spec(
            LuksVersion::Luks2,
            512,
            Pbkdf {
                iterations: Some(4),
                memory_kib: Some(32),
                parallel: Some(1),
                ..Pbkdf::default()
            },
        )
        .validate()
        .unwrap();
        spec(
            LuksVersion::Luks1,
            512,
            Pbkdf {
                iterations: Some(1000),
                ..Pbkdf::default()
            },
        )
        .validate()
        .unwrap();
    }

    #[test]
    fn rejects_a_wrong_volume_key_length() {
        let short = SecretBytes::random(32).unwrap();
        let passphrase = SecretBytes::random(44).unwrap();
        let error =
            format_header(&HeaderSpec::default(), &short, &passphrase, FINGERPRINT).unwrap_err();
        assert!(matches!(error, Error::Luks { .. }), "{error:?}");
    }
}
