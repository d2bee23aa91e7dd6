//! The Varlink server: the accept loop, shutdown and idle exit.
//!
//! [`run`] takes an already-bound listener, so the system daemon (socket-activated by systemd),
//! the per-user daemon (binds its own socket) and tests all share one entry point. Each
//! connection is a task; each job runs on a blocking thread, so many long streaming calls are
//! served at once and a slow or hostile client only ever holds up its own connection.

mod connection;
pub mod listener;
pub mod systemd;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::engines::EngineSet;
use crate::keys::ring::DaemonRing;

/// Who the daemon serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The system daemon: any local user who can connect to the socket (the socket's mode and
    /// group decide who can).
    System,
    /// A per-user daemon: only its own user (and root).
    User,
}

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Who may connect.
    pub mode: Mode,
    /// Exit after this long with no connection (the auto-started per-user daemon).
    pub idle_timeout: Option<Duration>,
    /// Jobs that may run at once; more wait in a queue and say so.
    pub max_jobs: usize,
    /// How long shutdown waits for running jobs to cancel and tear down.
    pub shutdown_grace: Duration,
    /// The daemon's own key ring, used when a client passes no key; `None`: no ring.
    pub key_ring: Option<Arc<DaemonRing>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            mode: Mode::System,
            idle_timeout: None,
            max_jobs: 4,
            shutdown_grace: Duration::from_secs(30),
            key_ring: None,
        }
    }
}

/// Everything connections share.
pub struct ServerState {
    /// The engines jobs may use.
    pub engines: EngineSet,
    /// Settings.
    pub config: ServerConfig,
    /// Bounds concurrent jobs.
    job_slots: Semaphore,
}

impl ServerState {
    /// Shared state for [`run`].
    pub fn new(engines: EngineSet, config: ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            engines,
            job_slots: Semaphore::new(config.max_jobs.max(1)),
            config,
        })
    }
}

/// Serves `listener` until `shutdown` resolves or, with an idle timeout, until no client has
/// been connected for that long. On the way out, running jobs are cancelled and given
/// `shutdown_grace` to tear down.
pub async fn run(
    listener: UnixListener,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        // Re-armed on every event, so it measures time since the last connection closed.
        let idle_for = state.config.idle_timeout.filter(|_| connections.is_empty());
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
                    connections.spawn(connection::serve(stream, state.clone(), stop_rx.clone()));
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning, keep serving.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(state.config.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("jobs did not finish within the shutdown grace period");
        connections.abort_all();
    }
    Ok(())
}
