//! What every job shares, below the server: the daemon's [`Mode`], the engines, the key ring,
//! the job slots ([`scheduler`]), the jobs themselves ([`registry`]) and the resume checkpoints
//! in the state directory ([`checkpoints`]), held by one [`DaemonContext`].
//!
//! The server builds a context at start-up and hands it to each job it runs; the jobs use only
//! this, never the server, so a job can be constructed and run without a socket
//! (`jobs::tests::jobs_run_with_a_context_and_no_server` does). Socket business (connection
//! caps, idle and frame timeouts, shutdown) stays in `server`.

pub mod checkpoints;
pub mod registry;
pub mod scheduler;

use std::path::PathBuf;
use std::sync::Arc;

use checkpoints::CheckpointStore;
use registry::Registry;
use scheduler::{Scheduler, SchedulerLimits};

use crate::engines::EngineSet;
use crate::keys::ring::DaemonRing;
pub use crate::mode::Mode;

/// The default of `imgcryptd --max-queued`: waiting jobs of all users together.
pub const DEFAULT_MAX_QUEUED: usize = 64;

/// Settings jobs see.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Who the daemon serves.
    pub mode: Mode,
    /// Jobs that may run at once; more wait in a queue and say so.
    pub max_jobs: usize,
    /// Jobs of one uid that may run at once.
    pub max_jobs_per_uid: usize,
    /// Jobs of one uid that may wait for a slot; one more is refused (root is exempt).
    pub max_queued_per_uid: usize,
    /// Jobs of all uids together that may wait for a slot (root has a reserve of
    /// `max_queued_per_uid` above it; see [`scheduler`]).
    pub max_queued: usize,
    /// The daemon's own key ring, used when a client passes no key; `None`: no ring.
    pub key_ring: Option<Arc<DaemonRing>>,
    /// Members of this group (primary or supplementary, as the kernel reports the peer's)
    /// see and may cancel every user's jobs, like root; `None`: only root.
    pub operator_gid: Option<u32>,
    /// The daemon's state directory (resume checkpoints, [`checkpoints`]); `None`: encryptions
    /// are not checkpointed and an interrupted one restarts from scratch.
    pub state_dir: Option<PathBuf>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            mode: Mode::System,
            max_jobs: 4,
            max_jobs_per_uid: 2,
            max_queued_per_uid: 8,
            max_queued: DEFAULT_MAX_QUEUED,
            key_ring: None,
            operator_gid: None,
            state_dir: None,
        }
    }
}

/// Everything jobs share: engines, settings (with the key ring) and job slots.
pub struct DaemonContext {
    /// The engines jobs may use.
    pub engines: EngineSet,
    /// Settings.
    pub config: DaemonConfig,
    /// Job slots, shared fairly between uids.
    scheduler: Arc<Scheduler>,
    /// Every job, live or recently ended.
    registry: Registry,
    /// Resume checkpoints, when the daemon has a usable state directory.
    checkpoints: Option<CheckpointStore>,
}

impl DaemonContext {
    /// A context whose job slots follow `config`'s limits.
    pub fn new(engines: EngineSet, config: DaemonConfig) -> Arc<Self> {
        let scheduler = Scheduler::new(SchedulerLimits {
            max_jobs: config.max_jobs,
            max_running_per_uid: config.max_jobs_per_uid,
            max_queued_per_uid: config.max_queued_per_uid,
            max_queued: config.max_queued,
        });
        let checkpoints = config.state_dir.as_deref().and_then(|dir| {
            CheckpointStore::open(dir)
                .inspect(
                    |store| tracing::info!(path = %store.root().display(), "resume checkpoints"),
                )
                .inspect_err(|error| {
                    tracing::warn!("{error}; encryptions are not resumable until it is fixed")
                })
                .ok()
        });
        Arc::new(Self {
            engines,
            config,
            scheduler,
            registry: Registry::new(registry::RETENTION),
            checkpoints,
        })
    }

    /// Job slots: a job runs only while it holds one of its [`scheduler::Permit`]s.
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// The jobs: submitted, followed, listed, cancelled here.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Resume checkpoints, if the daemon has a state directory.
    pub fn checkpoints(&self) -> Option<&CheckpointStore> {
        self.checkpoints.as_ref()
    }

    /// Jobs running now (holding a slot), the caller's included.
    pub fn running_jobs(&self) -> usize {
        self.scheduler.running()
    }
}
