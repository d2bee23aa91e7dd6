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
//! scaled).
//!
//! libcryptsetup measures pbkdf2 in process CPU time (`getrusage(RUSAGE_SELF)`) and argon2 in
//! wall-clock time (`CLOCK_MONOTONIC_RAW`), so a benchmark taken while other jobs copy counts
//! their CPU too (or competes with them for the cores) and picks fewer iterations. The cache
//! makes that rarer rather than more common: a measurement taken while any other job runs is
//! used for its own job only (exactly what libcryptsetup would have done) and never cached
//! ([`Cache::get_or_measure`]).
//!
//! # At start-up
//!
//! The daemon measures the configurations a job with default parameters uses once it is ready
//! ([`Cache::measure_while_idle`], started by `crate::jobs::startup` unless
//! `--no-startup-benchmark`), on a thread of its own, so READY and the first call never wait
//! for it. It yields to jobs: it starts a configuration only while no job runs, stops at
//! libcryptsetup's next progress callback once one does (between the benchmark's rounds;
//! the `-EINTR` that follows is not an error), and then leaves every configuration it did not
//! finish to first use. A job needing a benchmark meanwhile waits for that callback (one round:
//! a pbkdf2 round is under a second, an argon2 round at most about the target time), then
//! measures on its own; nothing from the interrupted measurement is kept. It does not lower
//! its scheduling priority: argon2 is timed by the wall clock, so a benchmark that other
//! processes can starve measures the machine as slower than it is and would cache weak
//! keyslots for an hour (libcryptsetup itself raises the calling thread's priority to nice
//! -18 as root for the duration of `crypt_benchmark_pbkdf`, and restores it after).
//!
//! # Outside libcryptsetup-rs's mutex
//!
//! libcryptsetup-rs 0.16 (with its `mutex` feature, which the workspace enables) serialises
//! every call it wraps with a private process-wide mutex, but it has no binding for
//! `crypt_benchmark_pbkdf`, and the mutex is not exported; so [`measure`] calls
//! `libcryptsetup_rs_sys` directly, unserialised. That is safe beside other threads'
//! libcryptsetup calls, by what libcryptsetup 2.6's `crypt_benchmark_pbkdf` (lib/utils_benchmark.c,
//! lib/crypto_backend/pbkdf_check.c) does with a NULL device:
//! - `init_crypto(NULL)` initialises the crypto backend and RNG once, guarded by a plain
//!   static flag that is not thread-safe on the first call: [`ensure_crypto_backend`] makes
//!   the first libcryptsetup call of the process a serialised one (under the mutex) before any
//!   benchmark, so every later `init_crypto` only reads the flag;
//! - `log_dbg(NULL, ...)` goes to the process-wide log callback and reads the global debug
//!   level: both are set under the mutex by `super::route_libcryptsetup_logs` (the callback
//!   once, the level to the same value each time); the callback itself is ours and
//!   re-entrant (a thread-local error list, `tracing`);
//! - `crypt_process_priority` uses `getpriority`/`setpriority(PRIO_PROCESS, 0)`, which on Linux
//!   act on the calling thread only;
//! - the PBKDF itself (the crypto backend's pbkdf2, argon2 with its own worker threads) works
//!   on buffers of the call; the backend libraries are thread-safe once initialised;
//! - no `crypt_device` is involved, so no per-device state is shared.
//!
//! Benchmarks are serialised among themselves by [`Cache`]'s `measuring` lock, for accuracy,
//! not safety.

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

    /// Configurations with a measurement still fresh at `now` on `cpus` CPUs.
    pub fn fresh(&self, now: Instant, cpus: usize) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .values()
            .filter(|entry| {
                now.saturating_duration_since(entry.at) < self.ttl && entry.cpus == cpus
            })
            .count()
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

/// What [`Cache::measure_while_idle`] did with one configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// Measured with no job running, and cached.
    Cached(Measured),
    /// A fresh measurement was cached already.
    AlreadyCached,
    /// A job ran (or was measuring) before or during the measurement: nothing cached.
    Interrupted,
}

impl Cache {
    /// Measures `key` for the cache only while `idle` (no job runs): skipped when a job runs
    /// or is measuring now, stopped at libcryptsetup's next progress callback once one starts
    /// (`measure` gets the stop condition), and cached only if no job ran from start to end.
    /// See the module documentation (at start-up).
    pub fn measure_while_idle(
        &self,
        key: &BenchKey,
        idle: &dyn Fn() -> bool,
        measure: impl FnOnce(&BenchKey, &dyn Fn() -> bool) -> Result<Option<Measured>>,
    ) -> Result<Background> {
        let cpus = online_cpus();
        if self.get(key, Instant::now(), cpus).is_some() {
            return Ok(Background::AlreadyCached);
        }
        // A job measuring now holds the lock: never wait behind it, never make it wait.
        let _one_at_a_time = match self.measuring.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(Background::Interrupted),
        };
        if self.get(key, Instant::now(), cpus).is_some() {
            return Ok(Background::AlreadyCached);
        }
        if !idle() {
            return Ok(Background::Interrupted);
        }
        let at = Instant::now();
        let Some(measured) = measure(key, &|| !idle())? else {
            return Ok(Background::Interrupted);
        };
        if !idle() {
            return Ok(Background::Interrupted);
        }
        self.insert(key.clone(), measured, at, cpus);
        Ok(Background::Cached(measured))
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
/// Runs only after [`ensure_crypto_backend`] (it calls it), so libcryptsetup's one-time crypto
/// backend set-up never races with this call (see the module documentation).
pub fn measure(key: &BenchKey) -> Result<Measured> {
    measure_unless(key, &|| false)?.ok_or(Error::Cancelled)
}

/// The progress callback of [`measure_unless`]: non-zero stops the benchmark.
///
/// # Safety
///
/// `usrptr` is the `&&dyn Fn() -> bool` [`measure_unless`] passes, alive for the call.
unsafe extern "C" fn stop_requested(_time_ms: u32, usrptr: *mut std::ffi::c_void) -> i32 {
    // SAFETY: per this function's contract, `usrptr` points to a live `&dyn Fn() -> bool`.
    let stop = unsafe { &*usrptr.cast::<&dyn Fn() -> bool>() };
    // A panic must not unwind into C.
    i32::from(std::panic::catch_unwind(std::panic::AssertUnwindSafe(stop)).unwrap_or(true))
}

/// [`measure`], stopped early (`None`) once `stop` says so: libcryptsetup asks between the
/// benchmark's rounds.
pub fn measure_unless(key: &BenchKey, stop: &dyn Fn() -> bool) -> Result<Option<Measured>> {
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
    let stop_pointer: *const &dyn Fn() -> bool = &stop;
    let started = Instant::now();
    super::clear_errors();
    // SAFETY: `pbkdf` is a valid, initialised struct whose `type_` and `hash` point into
    // `kind` and `hash`, NUL-terminated CStrings that outlive the call; `password` and `salt`
    // are valid for the lengths passed; the progress callback gets `&stop`, a pointer to a
    // `&dyn Fn` on this stack frame that outlives the call, as its contract requires. A NULL
    // device is documented as allowed (the benchmark needs no context) and the call keeps no
    // pointer past its return. Calling it outside libcryptsetup-rs's mutex is safe for the
    // reasons in the module documentation (`ensure_crypto_backend` ran above).
    let rc = unsafe {
        libcryptsetup_rs_sys::crypt_benchmark_pbkdf(
            std::ptr::null_mut(),
            &mut pbkdf,
            password.as_ptr().cast(),
            password.len(),
            salt.as_ptr().cast(),
            salt.len(),
            key.key_bytes,
            Some(stop_requested),
            stop_pointer.cast_mut().cast(),
        )
    };
    let took = started.elapsed();
    if rc == -libc::EINTR && stop() {
        tracing::info!(
            kind = %key.kind,
            time_ms = key.time_ms,
            after_ms = took.as_millis() as u64,
            "PBKDF benchmark stopped early"
        );
        return Ok(None);
    }
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
    Ok(Some(measured))
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
    fn a_background_measurement_is_cached_only_when_no_job_ran_throughout() {
        let cache = Cache::new(TTL);
        // Idle throughout: measured once, cached, then found.
        let stop_seen = std::cell::Cell::new(None);
        let outcome = cache
            .measure_while_idle(&key(10), &|| true, |_, stop| {
                stop_seen.set(Some(stop()));
                Ok(Some(measured(4000)))
            })
            .unwrap();
        assert_eq!(outcome, Background::Cached(measured(4000)));
        assert_eq!(stop_seen.get(), Some(false), "told to stop while idle");
        let outcome = cache
            .measure_while_idle(&key(10), &|| true, |_, _| panic!("measured again"))
            .unwrap();
        assert_eq!(outcome, Background::AlreadyCached);
        assert_eq!(
            cache
                .get(&key(10), Instant::now(), online_cpus())
                .unwrap()
                .0
                .iterations,
            4000
        );

        // A job running already: not even started.
        let outcome = cache
            .measure_while_idle(&key(20), &|| false, |_, _| panic!("measured while busy"))
            .unwrap();
        assert_eq!(outcome, Background::Interrupted);

        // A job starting during the measurement: the stop condition says so, and a result
        // that comes back anyway is not kept.
        let busy = std::cell::Cell::new(false);
        let outcome = cache
            .measure_while_idle(&key(20), &|| !busy.get(), |_, stop| {
                busy.set(true);
                assert!(stop(), "not told to stop once a job runs");
                Ok(Some(measured(5000)))
            })
            .unwrap();
        assert_eq!(outcome, Background::Interrupted);
        // Stopped by libcryptsetup's callback.
        let outcome = cache
            .measure_while_idle(&key(21), &|| true, |_, _| Ok(None))
            .unwrap();
        assert_eq!(outcome, Background::Interrupted);
        assert!(cache.get(&key(20), Instant::now(), online_cpus()).is_none());
        assert!(cache.get(&key(21), Instant::now(), online_cpus()).is_none());

        // A job measuring now: the background one neither waits nor measures.
        let held = cache.measuring.lock().unwrap();
        let outcome = cache
            .measure_while_idle(&key(30), &|| true, |_, _| panic!("measured beside a job"))
            .unwrap();
        assert_eq!(outcome, Background::Interrupted);
        drop(held);
    }

    #[test]
    fn libcryptsetup_stops_a_measurement_at_its_progress_callback() {
        let calls = std::cell::Cell::new(0);
        let stopped = measure_unless(&key(1000), &|| {
            calls.set(calls.get() + 1);
            true
        })
        .unwrap();
        assert_eq!(stopped, None);
        // Asked once, after the first round (pbkdf2's first round is 2^15 iterations).
        assert_eq!(
            calls.get(),
            2,
            "once by libcryptsetup, once to tell -EINTR from a failure"
        );
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
