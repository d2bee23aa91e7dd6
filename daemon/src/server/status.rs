//! `io.imgcrypt.GetDaemonStatus`: what `imgctl daemon status` shows.
//!
//! Any caller sees the daemon's version, mode, uptime, engines (with why one cannot run), the
//! limits in force, the totals of jobs and connections, and its own jobs' counts. Only root
//! also gets every user's counts (`users`): which other users are busy is not another user's
//! business, and no caller gets another user's job details here.

use imgcrypt_proto::api::{
    DaemonLimits, DaemonMode, DaemonStatus, EngineKind, EngineStatus, JobCounts, UserJobs,
};

use super::ServerState;
use crate::context::Mode;

/// The status as caller `uid` may see it.
pub(super) fn daemon_status(state: &ServerState, uid: u32) -> DaemonStatus {
    let context = &state.context;
    let scheduler = context.scheduler();
    let limits = scheduler.limits();
    let by_uid = scheduler.by_uid();
    let count = |n: usize| n as u64;
    let own_jobs = by_uid.iter().find(|(owner, _, _)| *owner == uid).map_or(
        JobCounts::default(),
        |&(_, running, queued)| JobCounts {
            running: count(running),
            queued: count(queued),
        },
    );
    let auto = context.engines.auto();
    let kernel_unavailable = context.engines.kernel_unavailable();
    let connections = &state.config.connections;
    DaemonStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        mode: match context.config.mode {
            Mode::System => DaemonMode::System,
            Mode::User => DaemonMode::User,
        },
        uptime_s: state.uptime().as_secs(),
        engines: vec![
            EngineStatus {
                engine: EngineKind::Userspace,
                available: true,
                reason: None,
                auto: auto == EngineKind::Userspace,
            },
            EngineStatus {
                engine: EngineKind::Kernel,
                available: kernel_unavailable.is_none(),
                reason: kernel_unavailable.map(str::to_string),
                auto: auto == EngineKind::Kernel,
            },
        ],
        jobs: JobCounts {
            running: count(scheduler.running()),
            queued: count(scheduler.queued()),
        },
        own_jobs,
        connections: count(state.open_connections()),
        limits: DaemonLimits {
            max_jobs: count(limits.max_jobs),
            max_jobs_per_user: count(limits.max_running_per_uid),
            max_queued_per_user: count(limits.max_queued_per_uid),
            max_queued: count(limits.max_queued),
            max_connections: count(connections.max_total),
            max_connections_per_user: count(connections.max_per_uid),
            idle_connection_timeout_s: connections.idle_timeout.as_secs(),
        },
        pbkdf_benchmarks_cached: count(
            crate::luks::bench::cache()
                .fresh(std::time::Instant::now(), crate::luks::bench::online_cpus()),
        ),
        users: (uid == 0).then(|| {
            by_uid
                .iter()
                .map(|&(uid, running, queued)| UserJobs {
                    uid,
                    running: count(running),
                    queued: count(queued),
                })
                .collect()
        }),
    }
}
