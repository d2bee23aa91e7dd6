//! `imgcryptd`: the imgcrypt daemon. See the library documentation for the architecture and
//! `docs/` for operators.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};
use imgcrypt_proto::api::EngineChoice;
use imgcrypt_proto::paths;
use imgcryptd::context::{DaemonConfig, DaemonContext, Mode};
use imgcryptd::engines::kernel::KernelEngine;
use imgcryptd::engines::userspace::UserspaceEngine;
use imgcryptd::engines::{Engine, EngineSet};
use imgcryptd::keys::ring::{self, DaemonRing};
use imgcryptd::server::{self, listener, systemd, ServerConfig, ServerState};

/// Encrypts virtual-machine disk images into LUKS images for local users.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Run as a per-user daemon: socket in $XDG_RUNTIME_DIR/imgcrypt, own user only,
    /// userspace engine.
    #[arg(long)]
    user: bool,

    /// Listen on this socket path instead of the default.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Engine for jobs that ask for `auto`.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    engine: EngineArg,

    /// Exit after this many seconds without a client (0: never).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    idle_timeout: u64,

    /// Jobs that may run at once, all users together; further ones wait in the queue.
    /// Default: the number of CPUs the daemon may run on (available_parallelism).
    #[arg(long, value_name = "N")]
    max_jobs: Option<usize>,

    /// Jobs of one user that may run at once (at most --max-jobs), so one user cannot take
    /// every slot.
    #[arg(long, value_name = "N", default_value_t = 2)]
    max_jobs_per_user: usize,

    /// Jobs of one user that may wait for a slot; one more is refused at once with
    /// TooManyJobs (root is exempt).
    #[arg(long, value_name = "N", default_value_t = 8)]
    max_queued_per_user: usize,

    /// Jobs of all users together that may wait for a slot (a queued detached job holds its
    /// descriptors with no connection); one more is refused at once with TooManyJobs. Root's
    /// jobs count towards it, and root alone may go --max-queued-per-user further.
    #[arg(long, value_name = "N", default_value_t = imgcryptd::context::DEFAULT_MAX_QUEUED)]
    max_queued: usize,

    /// Connections of all users together. Default: 256, lowered to what the descriptor limit
    /// holds at 112 descriptors a connection.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// Connections of one user (root is exempt).
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_connections_per_user: usize,

    /// Close a connection with no call in progress after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    idle_connection_timeout: u64,

    /// Refuse a message whose terminating NUL has not arrived this many seconds after its
    /// first byte, and close the connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    frame_timeout: u64,

    /// Permission bits of a socket we bind ourselves (octal). Default: 0600 for --user; 0660
    /// for the system daemon when --socket-group names a group, else 0600.
    #[arg(long, value_name = "OCTAL", value_parser = parse_octal)]
    socket_mode: Option<u32>,

    /// Group that owns a socket we bind ourselves (the system daemon's users).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,

    /// Members of this group (primary or supplementary) see every user's jobs in `imgctl jobs`
    /// and may wait on and cancel them, as root may. Default: none (only root).
    #[arg(long, value_name = "GROUP")]
    operator_group: Option<String>,

    /// The daemon's key ring, used when a client passes no key. Default for the system daemon:
    /// the systemd credential keys.toml, else /etc/imgcrypt/keys.toml if it exists; the per-user
    /// daemon has none unless given.
    #[arg(long, value_name = "PATH")]
    keyring: Option<PathBuf>,

    /// Do not benchmark the default PBKDF configurations when the daemon starts (by default
    /// they are measured in the background while no job runs, so the first job with default
    /// settings finds them cached).
    #[arg(long, overrides_with = "startup_benchmark")]
    no_startup_benchmark: bool,

    /// Directory for the daemon's state: resume checkpoints of interrupted encryptions (no key
    /// material). Default: systemd's $STATE_DIRECTORY, else /var/lib/imgcrypt; with --user
    /// $XDG_STATE_HOME/imgcrypt (~/.local/state/imgcrypt).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Benchmark the default PBKDF configurations at start-up (the default; overrides an
    /// earlier --no-startup-benchmark).
    #[arg(long, overrides_with = "no_startup_benchmark")]
    startup_benchmark: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EngineArg {
    Auto,
    Userspace,
    Kernel,
}

impl From<EngineArg> for EngineChoice {
    fn from(arg: EngineArg) -> Self {
        match arg {
            EngineArg::Auto => Self::Auto,
            EngineArg::Userspace => Self::Userspace,
            EngineArg::Kernel => Self::Kernel,
        }
    }
}

fn parse_octal(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("`{text}` is not an octal permission mode like 0660"))
}

fn main() -> ExitCode {
    // `imgcryptd --generate-docs DIR`: man pages and completions for packaging (scripts/package).
    if let Some(code) = imgcrypt_clidoc::generate_if_asked(Args::command, "8") {
        return code;
    }
    let args = Args::parse();
    // Before anything else: the environment is read and cleaned while single-threaded.
    let activated = systemd::take_activated_listener();
    init_logging();
    harden_process();
    let descriptor_limit = raise_descriptor_limit();

    match run(args, activated, descriptor_limit) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    args: Args,
    activated: Option<std::os::unix::net::UnixListener>,
    descriptor_limit: u64,
) -> Result<(), String> {
    let mode = if args.user { Mode::User } else { Mode::System };
    let engine_choice: EngineChoice = if args.user {
        EngineChoice::Userspace
    } else {
        args.engine.into()
    };
    let kernel: Result<Arc<dyn Engine>, String> = if args.user {
        Err(
            "the per-user daemon (--user) runs only the userspace engine; ask the system daemon \
             for the kernel engine"
                .to_string(),
        )
    } else {
        KernelEngine::probe().map(|engine| Arc::new(engine) as Arc<dyn Engine>)
    };
    match &kernel {
        Ok(_) => tracing::info!("kernel engine (loop device + dm-crypt) available"),
        // An explicit `--engine kernel` fails just below with the same reason.
        Err(reason) if !args.user && engine_choice != EngineChoice::Kernel => {
            tracing::info!("kernel engine unavailable: {reason}")
        }
        Err(_) => {}
    }
    let sweep_devices = kernel.is_ok();
    let key_ring = load_key_ring(args.keyring.as_deref(), mode)?;
    let engines = EngineSet::new(engine_choice, Arc::new(UserspaceEngine::new()), kernel)
        .map_err(|e| e.to_string())?;

    // Keep the bound socket (and its lock) alive for the whole run.
    let (std_listener, _bound) = match activated {
        Some(listener) => {
            tracing::info!("using the socket passed by systemd");
            (listener, None)
        }
        None => {
            let path = socket_path(&args)?;
            let access = socket_access(&args)?;
            let bound = listener::bind(&path, access).map_err(|e| e.to_string())?;
            tracing::info!(path = %path.display(), mode = format!("{:04o}", access.mode), "listening");
            let listener = bound
                .listener
                .try_clone()
                .map_err(|e| format!("duplicating the listener: {e}"))?;
            (listener, Some(bound))
        }
    };

    // Only now, holding the socket (and its lock): a second daemon that fails to bind must not
    // sweep away the devices of the one serving.
    if sweep_devices {
        sweep_stale_devices();
    }

    // After binding (which may chown the socket to its group) and before the runtime starts
    // its threads, which inherit the reduced sets.
    let retained = imgcryptd::sys::capabilities::drop_unneeded().map_err(|e| {
        format!("{e}; refusing to serve with capabilities the daemon does not need")
    })?;
    tracing::info!(kept = ?retained.effective, dropped = retained.dropped, "capabilities reduced");

    let max_jobs = args.max_jobs.unwrap_or_else(default_max_jobs);
    let operator_gid = match &args.operator_group {
        Some(name) => Some(group_id("--operator-group", name)?),
        None => None,
    };
    let context = DaemonContext::new(
        engines,
        DaemonConfig {
            mode,
            max_jobs,
            max_jobs_per_uid: args.max_jobs_per_user,
            max_queued_per_uid: args.max_queued_per_user,
            max_queued: args.max_queued,
            key_ring,
            operator_gid,
            state_dir: state_dir(&args),
        },
    );
    let limits = context.scheduler().limits();
    tracing::info!(
        max_jobs = limits.max_jobs,
        max_jobs_per_user = limits.max_running_per_uid,
        max_queued_per_user = limits.max_queued_per_uid,
        max_queued = limits.max_queued,
        "job limits"
    );
    let config = ServerConfig {
        idle_timeout: (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout)),
        connections: connection_limits(
            &args,
            max_jobs,
            context.scheduler().queued_bound(),
            descriptor_limit,
        ),
        ..ServerConfig::default()
    };
    let startup_benchmark = !args.no_startup_benchmark;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(std_listener)
            .map_err(|e| format!("registering the listener: {e}"))?;
        let state = ServerState::new(context, config);
        systemd::notify(&format!("READY=1\nSTATUS={}", systemd::jobs_status(0)));
        let status = tokio::spawn(report_status(state.clone()));
        // After READY, on a thread of its own: it never delays start-up or the first call.
        if startup_benchmark {
            imgcryptd::jobs::startup::start(state.context.clone());
        } else {
            tracing::info!(
                "--no-startup-benchmark: PBKDF configurations are measured on first use"
            );
        }
        server::run(listener, state, shutdown_signal())
            .await
            .map_err(|e| format!("server failed: {e}"))?;
        status.abort();
        systemd::notify("STOPPING=1\nSTATUS=stopping");
        Ok(())
    })
}

/// The state directory: `--state-dir`, else the mode's default (see [`Args::state_dir`]);
/// `None` when a per-user daemon has no home to put it in.
fn state_dir(args: &Args) -> Option<PathBuf> {
    if let Some(dir) = &args.state_dir {
        return Some(dir.clone());
    }
    let non_empty = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    if args.user {
        // The XDG spec: a relative $XDG_STATE_HOME is invalid and ignored.
        non_empty("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|dir| dir.is_absolute())
            .or_else(|| non_empty("HOME").map(|home| Path::new(&home).join(".local/state")))
            .map(|base| base.join("imgcrypt"))
    } else {
        // systemd's StateDirectory= (may be a list; the first is ours).
        let from_systemd = non_empty("STATE_DIRECTORY").and_then(|dirs| {
            dirs.to_str()
                .and_then(|dirs| dirs.split(':').next())
                .map(PathBuf::from)
        });
        Some(from_systemd.unwrap_or_else(|| PathBuf::from("/var/lib/imgcrypt")))
    }
}

/// Keeps systemd's STATUS= (`systemctl status imgcryptd`) at the number of running jobs: looked
/// at every second and sent when it changed.
async fn report_status(state: Arc<ServerState>) {
    let mut reported = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let running = state.context.running_jobs();
        if running != reported {
            systemd::notify(&format!("STATUS={}", systemd::jobs_status(running)));
            reported = running;
        }
    }
}

/// The connection caps and timeouts, the overall cap fitted to the descriptor limit.
fn connection_limits(
    args: &Args,
    max_jobs: usize,
    queued_bound: usize,
    descriptor_limit: u64,
) -> server::ConnectionLimits {
    let fitting = server::connections_fitting(descriptor_limit, max_jobs, queued_bound);
    let max_total = match args.max_connections {
        Some(explicit) => {
            if explicit > fitting {
                tracing::warn!(
                    "--max-connections {explicit} does not fit the descriptor limit \
                     {descriptor_limit} ({fitting} do): a descriptor flood could fill the \
                     table; raise LimitNOFILE or lower --max-connections"
                );
            }
            explicit.max(1)
        }
        None => server::DEFAULT_MAX_CONNECTIONS.min(fitting),
    };
    // One user must never be able to take every connection.
    let mut max_per_uid = args.max_connections_per_user.max(1);
    if max_per_uid >= max_total && max_total > 1 {
        max_per_uid = max_total / 2;
        tracing::warn!(
            "--max-connections-per-user {} lowered to {max_per_uid}: half of the {max_total} \
             connections in all, so other users can still connect",
            args.max_connections_per_user
        );
    }
    let limits = server::ConnectionLimits {
        max_total,
        max_per_uid,
        idle_timeout: Duration::from_secs(args.idle_connection_timeout),
        frame_timeout: Duration::from_secs(args.frame_timeout),
    };
    tracing::info!(
        max_connections = limits.max_total,
        max_connections_per_user = limits.max_per_uid,
        idle_connection_timeout_s = args.idle_connection_timeout,
        frame_timeout_s = args.frame_timeout,
        "connection limits"
    );
    limits
}

/// The default of `--max-jobs`: one job per CPU the daemon may run on, since a job keeps about
/// one core busy (AES-XTS, the PBKDF); 1 when that cannot be read.
fn default_max_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Raises the soft descriptor limit to the hard one: connections and jobs need far more than
/// the usual 1024 (the caps are sized from the result). Returns the soft limit in force.
fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "could not read RLIMIT_NOFILE; assuming 1024");
            return 1024;
        }
    };
    if soft >= hard {
        tracing::info!(
            limit = soft,
            "descriptor limit (RLIMIT_NOFILE) already at its maximum"
        );
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = hard,
                "raised the descriptor limit (RLIMIT_NOFILE)"
            );
            hard
        }
        Err(error) => {
            tracing::warn!(%error, limit = soft, "could not raise the descriptor limit (RLIMIT_NOFILE)");
            soft
        }
    }
}

/// Finds and validates the daemon's key ring: a broken ring stops start-up with its message.
fn load_key_ring(explicit: Option<&Path>, mode: Mode) -> Result<Option<Arc<DaemonRing>>, String> {
    let Some(location) =
        ring::locate_from_environment(explicit, mode).map_err(|e| e.to_string())?
    else {
        tracing::info!("no key ring: clients must pass a key");
        return Ok(None);
    };
    let ring = DaemonRing::load(location).map_err(|e| e.to_string())?;
    tracing::info!("key ring: {}", ring.describe());
    Ok(Some(Arc::new(ring)))
}

/// Removes the mappings and loop devices a crashed daemon left behind (each is logged by the
/// sweep). A failure is logged, not fatal: jobs whose names collide with a leftover fail with
/// their own clear error.
fn sweep_stale_devices() {
    match imgcryptd::devices::cleanup::sweep() {
        Ok(report) if !report.failures.is_empty() => tracing::error!(
            failures = ?report.failures,
            "some devices left by an earlier daemon could not be removed; see docs/kernel-engine.md"
        ),
        Ok(report) if !(report.removed.is_empty() && report.deferred.is_empty()) => {
            tracing::warn!(
                removed = ?report.removed,
                deferred = ?report.deferred,
                loops_detached = ?report.loops_detached,
                "removed devices left by an earlier daemon"
            )
        }
        Ok(_) => {}
        Err(error) => {
            tracing::error!(%error, "could not look for devices left by an earlier daemon")
        }
    }
}

fn socket_path(args: &Args) -> Result<PathBuf, String> {
    if let Some(path) = &args.socket {
        return Ok(path.clone());
    }
    if args.user {
        paths::user_socket().ok_or_else(|| {
            "--user needs XDG_RUNTIME_DIR set to an absolute path (or pass --socket PATH)"
                .to_string()
        })
    } else {
        Ok(PathBuf::from(paths::SYSTEM_SOCKET))
    }
}

/// The gid of the group `name` (`option` names the flag in the error).
fn group_id(option: &str, name: &str) -> Result<u32, String> {
    Ok(nix::unistd::Group::from_name(name)
        .map_err(|e| format!("looking up group {name}: {e}"))?
        .ok_or_else(|| format!("{option}: no group named {name}"))?
        .gid
        .as_raw())
}

fn socket_access(args: &Args) -> Result<listener::SocketAccess, String> {
    let group = match &args.socket_group {
        Some(name) => Some(group_id("--socket-group", name)?),
        None => None,
    };
    let mode = args.socket_mode.unwrap_or(match (args.user, group) {
        (false, Some(_)) => 0o660,
        _ => 0o600,
    });
    Ok(listener::SocketAccess {
        mode,
        group,
        directory_mode: if args.user { 0o700 } else { 0o755 },
    })
}

/// journald when systemd connected our stderr to the journal, plain stderr otherwise.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;

    let filter =
        EnvFilter::try_from_env("IMGCRYPTD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // No field prefix: a tracing field `job_id` is the journal's `JOB_ID` (and
        // `message_id` its `MESSAGE_ID`), so operators match the names docs/operator-guide.md
        // lists. No field of ours is named like a journal field we do not mean.
        if let Ok(journald) = tracing_journald::layer() {
            registry.with(journald.with_field_prefix(None)).init();
            return;
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}

/// Keeps key material out of core dumps.
///
/// `RLIMIT_CORE=0` always. As root we also become non-dumpable, which additionally blocks
/// ptrace by anyone but root. A per-user daemon stays dumpable: non-dumpable would make
/// `/proc/self/fd` inaccessible to ourselves, which libcryptsetup needs to open the header
/// memfd, and the only user who could ptrace it is the one whose keys it holds.
fn harden_process() {
    if let Err(error) =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
    {
        tracing::warn!(%error, "could not disable core dumps");
    }
    if nix::unistd::geteuid().is_root() {
        if let Err(error) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!(%error, "could not make the process non-dumpable");
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("could not install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
