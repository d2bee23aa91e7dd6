//! The start-up PBKDF benchmark: what a job with default parameters would measure, taken
//! once the daemon is ready and while it is idle, so that job finds it cached.
//!
//! The configurations are what [`super::encrypt`] formats for default parameters
//! ([`super::encrypt::default_header_specs`]: LUKS2's argon2id and the qcow2 outputs' LUKS1
//! pbkdf2, each with libcryptsetup's default target time and caps). They are measured one after
//! the other on a thread of their own; the first call to the daemon, or any job, stops the
//! whole run (see [`crate::luks::bench`], "At start-up"). Operators turn it off with
//! `imgcryptd --no-startup-benchmark`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::context::DaemonContext;
use crate::luks::bench::{self, Background};

/// Starts the start-up benchmark on a thread of its own and returns at once.
pub fn start(state: Arc<DaemonContext>) {
    let spawned = std::thread::Builder::new()
        .name("imgcrypt-startup-bench".to_string())
        .spawn(move || run(&state));
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not start the start-up PBKDF benchmark; jobs measure on first use");
    }
}

/// The benchmark itself, on the calling thread.
fn run(state: &DaemonContext) {
    let started = Instant::now();
    // Any job created from now on (even one still queued) ends the run: its measurement must
    // not count another job's CPU, and a job must not wait behind it.
    let jobs_before = super::NEXT_JOB_ID.load(Ordering::Relaxed);
    let idle =
        || state.running_jobs() == 0 && super::NEXT_JOB_ID.load(Ordering::Relaxed) == jobs_before;
    let mut cached = 0;
    for spec in super::encrypt::default_header_specs() {
        let key = match crate::luks::header::benchmark_configuration(&spec) {
            Ok(Some(key)) => key,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, "start-up PBKDF benchmark: reading the default configuration failed; jobs measure on first use");
                return;
            }
        };
        match bench::cache().measure_while_idle(&key, &idle, bench::measure_unless) {
            Ok(Background::Cached(measured)) => {
                cached += 1;
                tracing::info!(
                    kind = %key.kind,
                    time_ms = key.time_ms,
                    iterations = measured.iterations,
                    memory_kb = measured.memory_kb,
                    threads = measured.threads,
                    took_ms = super::millis(measured.took),
                    "start-up PBKDF benchmark cached"
                );
            }
            Ok(Background::AlreadyCached) => {}
            Ok(Background::Interrupted) => {
                tracing::info!(
                    kind = %key.kind,
                    time_ms = key.time_ms,
                    elapsed_ms = super::millis(started.elapsed()),
                    "start-up PBKDF benchmark interrupted by a job: nothing cached for this \
                     configuration, jobs measure it on first use"
                );
                return;
            }
            Err(error) => {
                tracing::warn!(kind = %key.kind, %error, "start-up PBKDF benchmark failed; jobs measure on first use");
                return;
            }
        }
    }
    tracing::info!(
        configurations = cached,
        elapsed_ms = super::millis(started.elapsed()),
        "start-up PBKDF benchmark finished"
    );
}
