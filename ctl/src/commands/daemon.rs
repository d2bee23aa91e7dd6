//! `imgctl daemon status [--json]`: the daemon's version, mode, uptime, engines (and why one
//! cannot run here), jobs running and queued (all users' totals, your own), connections,
//! limits and cached PBKDF benchmarks, from `io.imgcrypt.GetDaemonStatus`. Root also sees each
//! user's counts.

use std::fmt::Write as _;
use std::path::PathBuf;

use imgcrypt_proto::api::{self, DaemonMode, DaemonStatus, EngineKind};

use crate::call;
use crate::connect;
use crate::error::Result;

/// Options of `imgctl daemon`.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    #[command(subcommand)]
    pub command: DaemonCommand,
}

/// What to ask the daemon.
#[derive(Debug, clap::Subcommand)]
pub enum DaemonCommand {
    /// Show the daemon's version, engines, jobs, limits and uptime.
    Status {
        /// Print the status as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command.
pub fn run(args: DaemonArgs, socket: Option<PathBuf>) -> Result<()> {
    let DaemonCommand::Status { json } = args.command;
    let mut client = connect::connect(socket.as_deref())?;
    let status: DaemonStatus = call::call_once(
        &mut client,
        api::GET_DAEMON_STATUS,
        &serde_json::json!({}),
        &[],
    )?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&status).expect("the status serialises")
        );
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// The status as text, one fact per line.
pub fn render(status: &DaemonStatus) -> String {
    let mut out = String::new();
    let mode = match status.mode {
        DaemonMode::System => "system daemon",
        DaemonMode::User => "per-user daemon",
    };
    let _ = writeln!(
        out,
        "imgcryptd {} ({mode}), up {}",
        status.version,
        duration(status.uptime_s)
    );
    let _ = writeln!(out, "engines:");
    for engine in &status.engines {
        let name = match engine.engine {
            EngineKind::Userspace => "userspace",
            EngineKind::Kernel => "kernel",
        };
        let auto = if engine.auto { " (used for auto)" } else { "" };
        match (&engine.reason, engine.available) {
            (_, true) => {
                let _ = writeln!(out, "  {name:<10} available{auto}");
            }
            (Some(reason), false) => {
                let _ = writeln!(out, "  {name:<10} unavailable: {reason}");
            }
            (None, false) => {
                let _ = writeln!(out, "  {name:<10} unavailable");
            }
        }
    }
    let _ = writeln!(
        out,
        "jobs: {} running, {} queued (yours: {} running, {} queued)",
        status.jobs.running, status.jobs.queued, status.own_jobs.running, status.own_jobs.queued
    );
    if let Some(users) = &status.users {
        for user in users {
            let _ = writeln!(
                out,
                "  uid {}: {} running, {} queued",
                user.uid, user.running, user.queued
            );
        }
    }
    let limits = &status.limits;
    let _ = writeln!(out, "connections: {} open", status.connections);
    let _ = writeln!(
        out,
        "limits: {} jobs at once, {} per user, {} queued per user (root exempt), {} queued in \
         all; {} connections, {} per user; idle connections closed after {} s",
        limits.max_jobs,
        limits.max_jobs_per_user,
        limits.max_queued_per_user,
        limits.max_queued,
        limits.max_connections,
        limits.max_connections_per_user,
        limits.idle_connection_timeout_s
    );
    let _ = writeln!(
        out,
        "PBKDF benchmarks cached: {}",
        status.pbkdf_benchmarks_cached
    );
    out
}

/// `3 d 4 h`, `2 h 5 min`, `4 min 7 s`, `9 s`.
fn duration(seconds: u64) -> String {
    let (days, hours, minutes, seconds) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds} s"),
        (0, 0, _) => format!("{minutes} min {seconds} s"),
        (0, _, _) => format!("{hours} h {minutes} min"),
        _ => format!("{days} d {hours} h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_peer::Peer;
    use imgcrypt_proto::api::{DaemonLimits, EngineStatus, JobCounts, UserJobs};
    use imgcrypt_proto::varlink::Reply;

    fn status(users: Option<Vec<UserJobs>>) -> DaemonStatus {
        DaemonStatus {
            version: "1.2.3".into(),
            mode: DaemonMode::System,
            uptime_s: 3725,
            engines: vec![
                EngineStatus {
                    engine: EngineKind::Userspace,
                    available: true,
                    reason: None,
                    auto: true,
                },
                EngineStatus {
                    engine: EngineKind::Kernel,
                    available: false,
                    reason: Some("/dev/mapper/control: no device-mapper".into()),
                    auto: false,
                },
            ],
            jobs: JobCounts {
                running: 2,
                queued: 5,
            },
            own_jobs: JobCounts {
                running: 1,
                queued: 0,
            },
            connections: 8,
            limits: DaemonLimits {
                max_jobs: 2,
                max_jobs_per_user: 1,
                max_queued_per_user: 20,
                max_queued: 64,
                max_connections: 256,
                max_connections_per_user: 16,
                idle_connection_timeout_s: 120,
            },
            pbkdf_benchmarks_cached: 2,
            users,
        }
    }

    #[test]
    fn text_names_every_fact() {
        let text = render(&status(None));
        for expected in [
            "imgcryptd 1.2.3 (system daemon), up 1 h 2 min",
            "userspace  available (used for auto)",
            "kernel     unavailable: /dev/mapper/control: no device-mapper",
            "jobs: 2 running, 5 queued (yours: 1 running, 0 queued)",
            "connections: 8 open",
            "2 jobs at once, 1 per user, 20 queued per user",
            "256 connections, 16 per user",
            "PBKDF benchmarks cached: 2",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} missing from:\n{text}"
            );
        }
        assert!(!text.contains("uid "), "{text}");
        let text = render(&status(Some(vec![UserJobs {
            uid: 1000,
            running: 1,
            queued: 3,
        }])));
        assert!(text.contains("  uid 1000: 1 running, 3 queued"), "{text}");
        assert_eq!(duration(59), "59 s");
        assert_eq!(duration(61), "1 min 1 s");
        assert_eq!(duration(90_000), "1 d 1 h");
    }

    #[test]
    fn asks_get_daemon_status_with_no_descriptors() {
        let reply = status(None);
        let peer = Peer::serve(move |call, fds| {
            assert_eq!(call.method, api::GET_DAEMON_STATUS);
            assert!(fds.is_empty());
            vec![Reply::ok(reply)]
        });
        let args = DaemonArgs {
            command: DaemonCommand::Status { json: true },
        };
        run(args, Some(peer.socket.clone())).unwrap();
        peer.call();
    }
}
