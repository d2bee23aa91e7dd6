//! The PBKDF benchmark, measured once per configuration and reused for a bounded time.
//!
//! libcryptsetup benchmarks the PBKDF every time it formats a header or adds a keyslot without
//! an explicit iteration count: about a second of CPU for pbkdf2 (it always measures for 1 s
//! and scales to the target time), the target time for argon2, and LUKS1 measures twice (the
//! volume-key digest, then the keyslot). For a job with `--iter-time 10` that is most of the
//! time outside the copy. Here the daemon measures each configuration ([`BenchKey`]: type,
//! hash, memory, threads, target time, key size) once and keeps the result ([`Measured`]) for
//! [`TTL`], or until the number of CPUs changes; jobs then format with explicit iterations and
//! libcryptsetup's `CRYPT_PBKDF_NO_BENCHMARK`, so a keyslot gets exactly what the measurement
//! for its `--iter-time` says.
//!
//! The measurement is libcryptsetup's own `crypt_benchmark_pbkdf`, called the way its internal
//! benchmark calls it (same passphrase and salt lengths; pbkdf2 measured over 1000 ms and
//! scaled). libcryptsetup-rs has no binding for it, so it goes through `libcryptsetup-rs-sys`.
//!
//! libcryptsetup measures process CPU time, so a benchmark taken while other jobs copy counts
//! their CPU too and picks fewer iterations. The cache makes that rarer rather than more
//! common: a measurement taken while any other job runs is used for its own job only (exactly
//! what libcryptsetup would have done) and never cached ([`Cache::get_or_measure`]).

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long a measurement is reused.
pub const TTL: Duration = Duration::from_secs(3600);

/// pbkdf2's benchmark always runs this long; the target time scales its result (libcryptsetup
/// does the same).
const PBKDF2_BENCHMARK_MS: u32 = 1000;

/// libcryptsetup's floor for pbkdf2 iterations.
const PBKDF2_MIN_ITERATIONS: u32 = 1000;

/// A PBKDF configuration, after libcryptsetup's own caps (threads at most the online CPUs and
/// 4, memory at most half the RAM) were applied by `crypt_set_pbkdf_type`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BenchKey {
    /// `pbkdf2`, `argon2i` or `argon2id`.
    pub kind: String,
    /// Hash of pbkdf2 (argon2 ignores it).
    pub hash: String,
    /// Target unlock time in milliseconds.
    pub time_ms: u32,
    /// Most argon2 memory in KiB (0 for pbkdf2).
    pub max_memory_kb: u32,
    /// argon2 lanes (0 for pbkdf2).
    pub parallel_threads: u32,
    /// Bytes the keyslot derives (the volume key's size).
    pub key_bytes: usize,
}

impl BenchKey {
    /// Whether this is pbkdf2 (iterations scale linearly with time).
    pub fn is_pbkdf2(&self) -> bool {
        self.kind == "pbkdf2"
    }
}

/// What a measurement chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    /// pbkdf2 iterations, or argon2 time cost (passes).
    pub iterations: u32,
    /// argon2 memory in KiB (the benchmark may pick less than the maximum); 0 for pbkdf2.
    pub memory_kb: u32,
    /// argon2 threads; 0 for pbkdf2.
    pub threads: u32,
    /// How long the measurement took.
    pub took: Duration,
}

/// Whether a job's iterations came from the cache or a measurement made for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An earlier measurement, `age` old when the job used it.
    Cached {
        /// Age of the measurement.
        age: Duration,
    },
    /// Measured for this job (and cached if the daemon was otherwise idle).
    Fresh,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    measured: Measured,
    at: Instant,
    cpus: usize,
}

/// Measurements by configuration; see the module documentation.
#[derive(Debug)]
pub struct Cache {
    ttl: Duration,
    entries: Mutex<HashMap<BenchKey, Entry>>,
    /// Held while measuring: one benchmark at a time (two at once would each count the other's
    /// CPU time), and a second job asking for the same configuration waits and reuses it.
    measuring: Mutex<()>,
}

impl Cache {
    /// An empty cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            measuring: Mutex::new(()),
        }
    }

    /// The measurement of `key` if one is fresh at `now` on a machine with `cpus` CPUs, with
    /// its age. Expired or stale entries are dropped.
    pub fn get(&self, key: &BenchKey, now: Instant, cpus: usize) -> Option<(Measured, Duration)> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = *entries.get(key)?;
        let age = now.saturating_duration_since(entry.at);
        if age >= self.ttl || entry.cpus != cpus {
            entries.remove(key);
            return None;
        }
        Some((entry.measured, age))
    }

    /// Remembers `measured` for `key`, taken at `at` with `cpus` CPUs.
    pub fn insert(&self, key: BenchKey, measured: Measured, at: Instant, cpus: usize) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(key, Entry { measured, at, cpus });
    }

    /// The cached measurement of `key`, or a new one by `measure`. The new one is cached only
    /// when `idle` says no other job ran while it was taken (asked after measuring).
    pub fn get_or_measure(
        &self,
        key: &BenchKey,
        idle: &dyn Fn() -> bool,
        measure: impl FnOnce(&BenchKey) -> Result<Measured>,
    ) -> Result<(Measured, Origin)> {
        let cpus = online_cpus();
        if let Some((measured, age)) = self.get(key, Instant::now(), cpus) {
            return Ok((measured, Origin::Cached { age }));
        }
        let _one_at_a_time = self.measuring.lock().unwrap_or_else(|e| e.into_inner());
        // Another job may have measured it while this one waited.
        if let Some((measured, age)) = self.get(key, Instant::now(), cpus) {
            return Ok((measured, Origin::Cached { age }));
        }
        let idle_before = idle();
        let at = Instant::now();
        let measured = measure(key)?;
        if idle_before && idle() {
            self.insert(key.clone(), measured, at, cpus);
        } else {
            tracing::info!(
                ?key,
                "PBKDF benchmark taken while other jobs ran: used for this job only, not cached"
            );
        }
        Ok((measured, Origin::Fresh))
    }
}

/// The daemon's cache.
pub fn cache() -> &'static Cache {
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| Cache::new(TTL))
}

/// CPUs this process may run on; a change invalidates every measurement.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Measures `key` with libcryptsetup's `crypt_benchmark_pbkdf`.
///
/// Runs only after [`ensure_crypto_backend`] (the caller formats with libcryptsetup first, or
/// calls it), so libcryptsetup's one-time crypto backend set-up never races with this call.
pub fn measure(key: &BenchKey) -> Result<Measured> {
    ensure_crypto_backend()?;
    let fail = |message: String| Error::Luks {
        operation: "benchmarking the PBKDF",
        message,
    };
    let kind = CString::new(key.kind.as_str()).map_err(|e| fail(e.to_string()))?;
    let hash = CString::new(key.hash.as_str()).map_err(|e| fail(e.to_string()))?;
    let pbkdf2 = key.is_pbkdf2();
    let mut pbkdf = libcryptsetup_rs_sys::crypt_pbkdf_type {
        type_: kind.as_ptr(),
        hash: hash.as_ptr(),
        time_ms: if pbkdf2 {
            PBKDF2_BENCHMARK_MS
        } else {
            key.time_ms
        },
        iterations: 0,
        max_memory_kb: if pbkdf2 { 0 } else { key.max_memory_kb },
        parallel_threads: if pbkdf2 { 0 } else { key.parallel_threads },
        flags: 0,
    };
    // The passphrase and salt libcryptsetup's own benchmark uses (their content does not
    // matter, their lengths barely do).
    let password = b"foobarfo";
    let salt: &[u8] = if pbkdf2 {
        b"01234567890abcdef0123456789abcdef"
    } else {
        b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    };
    let started = Instant::now();
    super::clear_errors();
    // SAFETY: `pbkdf` is a valid, initialised struct whose `type_` and `hash` point into
    // `kind` and `hash`, NUL-terminated CStrings that outlive the call; `password` and `salt`
    // are valid for the lengths passed; no progress callback or user pointer is given. A NULL
    // device is documented as allowed (the benchmark needs no context) and the call keeps no
    // pointer past its return. It runs outside libcryptsetup-rs's mutex (which is private to
    // that crate): with no device it touches no per-device state, only the crypto backend,
    // which `ensure_crypto_backend` set up earlier under the mutex, and the process-wide log
    // callback, which is ours and re-entrant (thread-local error list, `tracing`).
    let rc = unsafe {
        libcryptsetup_rs_sys::crypt_benchmark_pbkdf(
            std::ptr::null_mut(),
            &mut pbkdf,
            password.as_ptr().cast(),
            password.len(),
            salt.as_ptr().cast(),
            salt.len(),
            key.key_bytes,
            None,
            std::ptr::null_mut(),
        )
    };
    let took = started.elapsed();
    if rc < 0 {
        let error = super::libcryptsetup_error(
            "benchmarking the PBKDF",
            libcryptsetup_rs::LibcryptErr::IOError(std::io::Error::from_raw_os_error(-rc)),
        );
        return Err(error);
    }
    let measured = if pbkdf2 {
        let scaled =
            f64::from(pbkdf.iterations) * f64::from(key.time_ms) / f64::from(PBKDF2_BENCHMARK_MS);
        if scaled > f64::from(u32::MAX) {
            return Err(fail(format!(
                "{} iterations in {PBKDF2_BENCHMARK_MS} ms scale past 2^32 for {} ms",
                pbkdf.iterations, key.time_ms
            )));
        }
        Measured {
            iterations: (scaled as u32).max(PBKDF2_MIN_ITERATIONS),
            memory_kb: 0,
            threads: 0,
            took,
        }
    } else {
        Measured {
            iterations: pbkdf.iterations,
            memory_kb: pbkdf.max_memory_kb,
            threads: pbkdf.parallel_threads,
            took,
        }
    };
    tracing::info!(
        kind = %key.kind,
        hash = %key.hash,
        time_ms = key.time_ms,
        max_memory_kb = key.max_memory_kb,
        threads = key.parallel_threads,
        iterations = measured.iterations,
        memory_kb = measured.memory_kb,
        took_ms = took.as_millis() as u64,
        "PBKDF benchmark"
    );
    Ok(measured)
}

/// Has libcryptsetup set up its crypto backend once, under libcryptsetup-rs's mutex: a
/// keyslot-less LUKS2 header on a small memfd with a fixed 1000-iteration digest (milliseconds).
pub fn ensure_crypto_backend() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut outcome = Ok(());
    ONCE.call_once(|| outcome = super::header::scratch_format());
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(time_ms: u32) -> BenchKey {
        BenchKey {
            kind: "pbkdf2".to_string(),
            hash: "sha256".to_string(),
            time_ms,
            max_memory_kb: 0,
            parallel_threads: 0,
            key_bytes: 64,
        }
    }

    fn measured(iterations: u32) -> Measured {
        Measured {
            iterations,
            memory_kb: 0,
            threads: 0,
            took: Duration::from_millis(1),
        }
    }

    #[test]
    fn entries_expire_after_the_ttl_and_when_the_cpu_count_changes() {
        let cache = Cache::new(Duration::from_secs(60));
        let start = Instant::now();
        cache.insert(key(10), measured(5000), start, 2);
        let (found, age) = cache
            .get(&key(10), start + Duration::from_secs(59), 2)
            .unwrap();
        assert_eq!(found.iterations, 5000);
        assert_eq!(age, Duration::from_secs(59));
        // Another configuration is not this one.
        assert!(cache.get(&key(11), start, 2).is_none());
        // A different CPU count drops it.
        assert!(cache.get(&key(10), start, 4).is_none());
        assert!(cache.get(&key(10), start, 2).is_none());
        // Expiry.
        cache.insert(key(10), measured(5000), start, 2);
        assert!(cache
            .get(&key(10), start + Duration::from_secs(60), 2)
            .is_none());
        assert!(
            cache.get(&key(10), start, 2).is_none(),
            "an expired entry is dropped"
        );
    }

    #[test]
    fn measures_once_when_idle_and_not_at_all_from_a_busy_daemon() {
        let cache = Cache::new(TTL);
        let runs = std::cell::Cell::new(0);
        let measure = |_: &BenchKey| {
            runs.set(runs.get() + 1);
            Ok(measured(7000))
        };
        let (first, origin) = cache.get_or_measure(&key(10), &|| true, measure).unwrap();
        assert_eq!((first.iterations, origin), (7000, Origin::Fresh));
        let (again, origin) = cache.get_or_measure(&key(10), &|| true, measure).unwrap();
        assert_eq!(again.iterations, 7000);
        assert!(matches!(origin, Origin::Cached { .. }), "{origin:?}");
        assert_eq!(runs.get(), 1);
        // A busy daemon's measurement serves its job and is not kept.
        cache.get_or_measure(&key(20), &|| false, measure).unwrap();
        cache.get_or_measure(&key(20), &|| false, measure).unwrap();
        assert_eq!(runs.get(), 3);
    }

    #[test]
    fn pbkdf2_measurement_scales_with_the_target_time() {
        let short = measure(&key(100)).unwrap();
        let long = measure(&key(1000)).unwrap();
        assert!(short.iterations >= PBKDF2_MIN_ITERATIONS, "{short:?}");
        // Two measurements of the same rate, one scaled 10x: within a factor of 3 of 10x
        // whatever the machine's load.
        let ratio = f64::from(long.iterations) / f64::from(short.iterations);
        assert!((3.0..30.0).contains(&ratio), "{short:?} {long:?}");
    }
}
