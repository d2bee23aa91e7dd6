//! The Varlink server: the accept loop, shutdown and idle exit.
//!
//! [`run`] takes an already-bound listener, so the system daemon (socket-activated by systemd),
//! the per-user daemon (binds its own socket) and tests all share one entry point. Each
//! connection is a task; each job runs on a blocking thread, so many long streaming calls are
//! served at once and a slow or hostile client only ever holds up its own connection.
//!
//! What one client can hold is bounded: connections per uid and overall ([`ConnectionLimits`],
//! counted here), descriptors per connection (`imgcrypt_proto::fdpass::MAX_FDS_PER_MESSAGE`),
//! the time an idle connection or a half-sent frame may stay open (`connection`), and job
//! slots shared fairly between uids ([`crate::context::scheduler`]).
//!
//! What jobs need (engines, key ring, job slots) is the [`DaemonContext`] below the server;
//! [`ServerState`] adds only what connections share.

mod connection;
pub mod listener;
mod status;
pub mod systemd;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::context::DaemonContext;

/// Settings of a running server (the socket's; what jobs see is in [`DaemonContext`]).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Exit after this long with no connection and no job (the auto-started per-user daemon).
    pub idle_timeout: Option<Duration>,
    /// Connection caps and timeouts.
    pub connections: ConnectionLimits,
    /// How long shutdown waits for running jobs to cancel and tear down.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            idle_timeout: None,
            connections: ConnectionLimits::default(),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// How many connections the daemon holds and how long an unused one may stay.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections of all users together.
    pub max_total: usize,
    /// Connections of one uid (root is exempt).
    pub max_per_uid: usize,
    /// A connection with no call in progress and no job running is closed after this long.
    pub idle_timeout: Duration,
    /// A frame (or descriptors) whose terminating NUL has not arrived this long after its
    /// first byte is refused and the connection closed.
    pub frame_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_total: DEFAULT_MAX_CONNECTIONS,
            max_per_uid: 16,
            idle_timeout: Duration::from_secs(120),
            frame_timeout: Duration::from_secs(10),
        }
    }
}

/// Default cap on connections of all users.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Descriptors one connection can hold: its socket and the most one message may carry while
/// the frame is unfinished, plus slack for the short moment a job holds both a message's
/// descriptors and ones it opened.
pub const DESCRIPTORS_PER_CONNECTION: u64 = imgcrypt_proto::fdpass::MAX_FDS_PER_MESSAGE as u64 + 8;

/// Descriptors kept free of connections: the daemon's own (listener, runtime, logging); each
/// running job's (devices, engine threads, temporary files, the private O_DIRECT description
/// of each source file it reads data from — up to one per descriptor its call passed, see
/// `sys::source_io` — and the passed descriptors themselves, which a detached job holds after
/// its connection, and that connection's budget, are gone); each queued job's passed
/// descriptors (a queued detached job holds them with no connection either; `queued_bound` is
/// the scheduler's [`crate::context::scheduler::queued_bound`]); and the excess over 104 of the
/// up to 253 a single `recvmsg` may install before it is refused, once per runtime thread (2).
pub fn reserved_descriptors(max_jobs: usize, queued_bound: usize) -> u64 {
    let per_message = imgcrypt_proto::fdpass::MAX_FDS_PER_MESSAGE as u64;
    let excess_per_read = 253 - per_message;
    64 + (32 + 2 * per_message) * max_jobs as u64
        + per_message * queued_bound as u64
        + 2 * excess_per_read
}

/// The largest overall connection cap whose descriptors fit `descriptor_limit` next to
/// [`reserved_descriptors`] (at least 2, so root and one user can still connect).
pub fn connections_fitting(descriptor_limit: u64, max_jobs: usize, queued_bound: usize) -> usize {
    let room = descriptor_limit.saturating_sub(reserved_descriptors(max_jobs, queued_bound));
    (room / DESCRIPTORS_PER_CONNECTION).max(2) as usize
}

/// Everything connections share.
pub struct ServerState {
    /// What jobs see: engines, key ring, job slots.
    pub context: Arc<DaemonContext>,
    /// Settings.
    pub config: ServerConfig,
    /// Open connections, counted for the caps.
    connections: Arc<Mutex<ConnectionCounts>>,
    /// When the server state was made: the daemon's uptime counts from here.
    started: Instant,
}

impl ServerState {
    /// Shared state for [`run`], serving jobs with `context`.
    pub fn new(context: Arc<DaemonContext>, config: ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            context,
            connections: Arc::default(),
            config,
            started: Instant::now(),
        })
    }

    /// Connections open now, all users together.
    pub fn open_connections(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .total
    }

    /// How long the daemon has served.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Counts a new connection of `uid`, or says which cap it would exceed.
    fn admit_connection(&self, uid: u32) -> Result<ConnectionSlot, ConnectionRefused> {
        let limits = &self.config.connections;
        let mut counts = self
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let own = counts.by_uid.get(&uid).copied().unwrap_or(0);
        if counts.total >= limits.max_total {
            return Err(ConnectionRefused::Total(limits.max_total));
        }
        if uid != 0 && own >= limits.max_per_uid {
            return Err(ConnectionRefused::PerUid(limits.max_per_uid));
        }
        counts.total += 1;
        *counts.by_uid.entry(uid).or_default() += 1;
        Ok(ConnectionSlot {
            counts: self.connections.clone(),
            uid,
        })
    }
}

#[derive(Debug, Default)]
struct ConnectionCounts {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

/// Which connection cap a new connection hit, with its value.
#[derive(Debug, Clone, Copy)]
enum ConnectionRefused {
    Total(usize),
    PerUid(usize),
}

/// One counted connection; uncounted on drop.
struct ConnectionSlot {
    counts: Arc<Mutex<ConnectionCounts>>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.total -= 1;
        if let Some(own) = counts.by_uid.get_mut(&self.uid) {
            *own -= 1;
            if *own == 0 {
                counts.by_uid.remove(&self.uid);
            }
        }
    }
}

/// Pause after a failed `accept`: the failure (a full descriptor table, most likely) persists
/// until a connection closes, and retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Logs failed accepts at most once every few seconds, with how many there were, so a full
/// descriptor table does not also flood the journal.
#[derive(Default)]
struct AcceptFailures {
    since_last_log: u64,
    last_log: Option<Instant>,
}

impl AcceptFailures {
    const LOG_EVERY: Duration = Duration::from_secs(5);

    fn failed(&mut self, error: &std::io::Error) {
        self.since_last_log += 1;
        if self
            .last_log
            .is_none_or(|at| at.elapsed() >= Self::LOG_EVERY)
        {
            tracing::warn!(
                %error,
                failures = self.since_last_log,
                "accept failed; still serving open connections and retrying every {} ms",
                ACCEPT_BACKOFF.as_millis()
            );
            self.since_last_log = 0;
            self.last_log = Some(Instant::now());
        }
    }

    fn recovered(&mut self) {
        if self.last_log.is_some() {
            tracing::info!(
                failures_since_last_report = self.since_last_log,
                "accepting connections again"
            );
            self.since_last_log = 0;
            self.last_log = None;
        }
    }
}

/// Serves `listener` until `shutdown` resolves or, with an idle timeout, until for that long no
/// client has been connected and no job (detached ones included) has been queued or running.
/// On the way out, every job is cancelled (as a daemon stop: `Job::stopping` is set) and the
/// jobs and connections are given `shutdown_grace` to tear down.
pub async fn run(
    listener: UnixListener,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut accept_failures = AcceptFailures::default();
    let mut active_jobs = state.context.registry().active();
    tokio::pin!(shutdown);

    loop {
        // Re-armed on every event (a connection closing, a job ending), so it measures time
        // since the last connection closed and the last job ended, whichever came later.
        let no_jobs = *active_jobs.borrow_and_update() == 0;
        let idle_for = state
            .config
            .idle_timeout
            .filter(|_| connections.is_empty() && no_jobs);
        let idle = async move {
            match idle_for {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            _ = idle => {
                tracing::info!("no client for {:?}; exiting", state.config.idle_timeout.unwrap_or_default());
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accept_failures.recovered();
                    connections.spawn(connection::serve(stream, state.clone(), stop_rx.clone()));
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning and keep serving; the
                    // connections already open are tasks of their own and go on meanwhile.
                    // The pending connection stays in the backlog and is retried.
                    accept_failures.failed(&error);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            Ok(()) = active_jobs.changed() => {}
        }
    }

    let _ = stop_tx.send(true);
    state.context.registry().cancel_all();
    let drained = tokio::time::timeout(state.config.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
        let _ = active_jobs.wait_for(|active| *active == 0).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("jobs did not finish within the shutdown grace period");
        connections.abort_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reservation_covers_running_and_queued_jobs_descriptors() {
        let per_message = imgcrypt_proto::fdpass::MAX_FDS_PER_MESSAGE as u64;
        let idle = reserved_descriptors(0, 0);
        // A running job: its own, one O_DIRECT description and one passed descriptor per
        // passed descriptor at most.
        assert_eq!(reserved_descriptors(1, 0) - idle, 32 + 2 * per_message);
        // A queued job: the descriptors its call passed.
        assert_eq!(reserved_descriptors(0, 1) - idle, per_message);
        // The defaults (2 jobs, 64 queued and root's reserve of 8).
        assert_eq!(
            reserved_descriptors(2, 72),
            idle + 2 * (32 + 2 * per_message) + 72 * per_message
        );
        // Whatever fits next to that is for connections, each with a message's worth.
        let limit = reserved_descriptors(2, 72) + 10 * DESCRIPTORS_PER_CONNECTION + 5;
        assert_eq!(connections_fitting(limit, 2, 72), 10);
        // Queued jobs' descriptors come out of the connections' room...
        assert_eq!(connections_fitting(limit, 2, 73), 9);
        // ...and never below the two connections root and one user need.
        assert_eq!(connections_fitting(1024, 2, 72), 2);
    }
}
