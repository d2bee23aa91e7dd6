//! The job registry: every job the daemon runs, owned here and not by the connection that
//! submitted it.
//!
//! [`Registry::submit`] admits a job through the [`Scheduler`](super::scheduler) and starts it
//! as a task of its own: the task waits for a slot (keeping the job's queue position current),
//! runs the work on a blocking thread, and records its progress, notices and final reply in the
//! job's [`JobEntry`]. A connection that wants to follow a job (the call that submitted it, or a
//! later `Wait`) subscribes to the entry's change counter and reads the entry; it never owns the
//! job. Who cancels:
//! - the submitting connection, when its client leaves and the job was not detached (Ctrl-C
//!   cancels, as before jobs had a registry);
//! - `Cancel` from the owner, root or the operator group ([`Viewer`]);
//! - the daemon stopping ([`Registry::cancel_all`]), which also sets the job's `stopping` flag
//!   first, so a job can tell a stop (checkpoint and go) from a user's cancel; from then on
//!   `submit` refuses new jobs ([`Refused::Stopping`]), under the same lock, so none escapes.
//!
//! A job's task ends its entry however it ends: a panic outside the work (in building the final
//! reply, say) finishes it as failed and counts it out of `active` (a drop guard), so shutdown
//! and the idle exit never wait for it. The client's descriptors a job holds are closed on a
//! blocking thread when the job never runs (refused, or cancelled while queued).
//!
//! A job's engine is read from its audit facts ([`AuditFacts`]), which the job fills in when
//! it chooses one, so `Status` and `Jobs` show it while the job runs, not only once its summary
//! says so.
//!
//! Visibility: a [`Viewer`] sees its own jobs only, unless it is root or in the operator group;
//! an id it may not see is answered exactly like an unknown id ([`Registry::get`] returns
//! `None` for both).
//!
//! Memory is bounded: live jobs by the scheduler's limits (running and queued per uid); each
//! entry keeps at most [`MAX_NOTICES`] notices of at most [`MAX_NOTICE_LEN`] bytes (older ones
//! are dropped, and a re-attaching client is told how many); progress is one latest value; and
//! finished jobs are kept for [`RETENTION`]: 24 h, at most the 32 newest per uid and 1024 in
//! all, then forgotten (a `Wait` or `Status` after that gets `NoSuchJob`); names are cut to
//! `MAX_JOB_NAME_LEN` and one `Jobs` reply lists at most `MAX_LISTED_JOBS`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use imgcrypt_proto::api::{
    EngineKind, ErrorParameters, FileIdentity, JobInfo, JobKind, JobNames, JobState, Phase,
    Progress, StreamedReply, MAX_JOB_NAME_LEN, MAX_LISTED_JOBS,
};
use imgcrypt_proto::varlink::Reply;
use tokio::sync::{watch, Notify};

use super::scheduler::{Admission, QueueFull};
use super::DaemonContext;
use crate::jobs::audit::AuditFacts;
use crate::jobs::Reporter;
use crate::sys::descriptors::close_in_background;

/// How long and how many finished jobs are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// A finished job is forgotten this long after it ended.
    pub max_age: Duration,
    /// Finished jobs kept per uid (the newest).
    pub per_uid: usize,
    /// Finished jobs kept in all (the newest).
    pub total: usize,
}

/// The daemon's retention: 24 h, 32 per uid, 1024 in all.
pub const RETENTION: Retention = Retention {
    max_age: Duration::from_secs(24 * 3600),
    per_uid: 32,
    total: 1024,
};

/// Notices one job keeps for clients that attach later.
pub const MAX_NOTICES: usize = 32;
/// Longest notice kept (longer ones are cut).
pub const MAX_NOTICE_LEN: usize = 1024;
/// How often a queued job's position is recomputed.
const POSITION_INTERVAL: Duration = Duration::from_millis(250);

/// Who asks about jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewer {
    /// SO_PEERCRED uid.
    pub uid: u32,
    /// Root or a member of the operator group: sees and cancels every job.
    pub sees_all: bool,
}

impl Viewer {
    /// Whether this viewer may see (wait on, cancel) a job of `owner`.
    pub fn may_see(&self, owner: u32) -> bool {
        self.sees_all || self.uid == owner
    }
}

/// Why a job was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// Its client left (a job that was not detached).
    ClientLeft,
    /// `Cancel` by its owner or an operator.
    Requested,
    /// The daemon is stopping.
    DaemonStopping,
}

/// What a submitted job is, for the registry.
#[derive(Debug, Clone)]
pub struct Submission {
    /// What it does.
    pub kind: JobKind,
    /// The submitter's uid.
    pub uid: u32,
    /// Runs on without its connection.
    pub detached: bool,
    /// Names the client gave (cut to [`MAX_JOB_NAME_LEN`]).
    pub names: Option<JobNames>,
    /// The output descriptor's identity, from the daemon's fstat.
    pub output_identity: Option<FileIdentity>,
}

/// The work of a job: runs on a blocking thread with the context, the reporter, the cancel
/// flag and the stopping flag.
pub type Work<D> = Box<
    dyn FnOnce(&DaemonContext, &Reporter, &Arc<AtomicBool>, &Arc<AtomicBool>) -> crate::Result<D>
        + Send,
>;

/// Why [`Registry::submit`] refused a job.
#[derive(Debug)]
pub enum Refused {
    /// The scheduler's queue for the uid is full.
    Queue(QueueFull),
    /// The daemon is stopping ([`Registry::cancel_all`] ran): a job admitted now would never
    /// be cancelled.
    Stopping,
}

/// All jobs; see the module documentation.
pub struct Registry {
    inner: Mutex<Jobs>,
    retention: Retention,
    /// Jobs queued or running: the server's idle exit and shutdown wait on it.
    active: watch::Sender<usize>,
}

/// One job.
pub struct JobEntry {
    /// Its id.
    pub id: u64,
    /// Its owner.
    pub uid: u32,
    /// What it does.
    pub kind: JobKind,
    /// Runs without a client.
    pub detached: bool,
    names: Option<JobNames>,
    output_identity: Option<FileIdentity>,
    created: SystemTime,
    cancel: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    cancelled: Notify,
    state: Mutex<EntryState>,
    /// Bumped on every change; followers wait on it.
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct EntryState {
    state: JobState,
    queue_position: Option<u32>,
    progress: Progress,
    /// The current phase, when it began and the bytes done then: what rate and ETA are over.
    phase_start: Option<(Phase, Instant, u64)>,
    rate: Option<u64>,
    eta_ms: Option<u64>,
    /// The engine of a finished job, from its summary.
    engine: Option<EngineKind>,
    /// The running job's audit facts: the engine it chose, before its summary says so.
    audit: Option<AuditFacts>,
    started: Option<SystemTime>,
    ended: Option<SystemTime>,
    ended_at: Option<Instant>,
    /// The last [`MAX_NOTICES`] notices; `notices_dropped` older ones were let go.
    notices: VecDeque<String>,
    notices_dropped: u64,
    cancel_reason: Option<CancelReason>,
    final_reply: Option<Reply>,
    error: Option<String>,
    message: Option<String>,
}

/// What a follower has not yet seen of a job ([`JobEntry::follow`]).
#[derive(Debug, Default)]
pub struct Update {
    /// Notices since the follower's cursor (with a line saying so first if some were dropped).
    pub notices: Vec<String>,
    /// The latest progress; `None` for a job that has started but not reported yet (its
    /// progress would still say `queued`).
    pub progress: Option<Progress>,
    /// The job's final reply, once it has ended.
    pub final_reply: Option<Reply>,
}

impl Registry {
    /// An empty registry with `retention`.
    pub fn new(retention: Retention) -> Self {
        Self {
            inner: Mutex::new(Jobs::default()),
            retention,
            active: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Jobs queued or running now, as a watch (the server's idle exit and shutdown use it).
    pub fn active(&self) -> watch::Receiver<usize> {
        self.active.subscribe()
    }

    /// Admits a job (or refuses it: [`Refused`]) and starts it as a task owned by the
    /// registry. `R` is the reply type of the job's call: its final reply is built from it.
    /// A refused job's work (it holds the client's descriptors) is dropped off the runtime.
    pub fn submit<R>(
        &self,
        context: &Arc<DaemonContext>,
        id: u64,
        submission: Submission,
        work: Work<R::Done>,
    ) -> Result<Arc<JobEntry>, Refused>
    where
        R: StreamedReply,
        R::Done: Send + 'static,
    {
        let admission = match context.scheduler().admit(submission.uid) {
            Ok(admission) => admission,
            Err(full) => {
                close_in_background(work);
                return Err(Refused::Queue(full));
            }
        };
        let queued = matches!(admission, Admission::Queued(_));
        let entry = Arc::new(JobEntry::new(id, submission, queued));
        if let Admission::Queued(waiting) = &admission {
            entry.update(|state| state.set_position(waiting.position()));
        }
        {
            // Under the same lock as `cancel_all`'s `closed`: either this job is in the map
            // that `cancel_all` cancels, or it is refused here.
            let mut jobs = self.lock();
            if jobs.closed {
                drop(jobs);
                drop(admission);
                close_in_background(work);
                return Err(Refused::Stopping);
            }
            jobs.insert(entry.id, entry.clone());
        }
        self.prune();
        self.active.send_modify(|active| *active += 1);
        let task_entry = entry.clone();
        let context = context.clone();
        tokio::spawn(async move {
            // Ends the entry and counts it out even if the task panics outside the work.
            let guard = TaskGuard {
                context: context.clone(),
                entry: task_entry.clone(),
            };
            run::<R>(&context, &task_entry, admission, work).await;
            drop(guard);
        });
        Ok(entry)
    }

    #[cfg(test)]
    fn insert(&self, entry: Arc<JobEntry>) {
        self.lock().insert(entry.id, entry);
        self.prune();
    }

    /// The job `id` if `viewer` may see it; `None` alike for unknown ids and other users' jobs.
    pub fn get(&self, viewer: Viewer, id: u64) -> Option<Arc<JobEntry>> {
        self.prune();
        self.lock()
            .get(&id)
            .filter(|entry| viewer.may_see(entry.uid))
            .cloned()
    }

    /// The jobs `viewer` may see, oldest first: the newest [`MAX_LISTED_JOBS`] of them, so
    /// that one reply stays small (an operator could otherwise be sent every uid's kept jobs).
    pub fn list(&self, viewer: Viewer) -> Vec<JobInfo> {
        self.prune();
        let mut jobs: Vec<JobInfo> = self
            .lock()
            .values()
            .rev()
            .filter(|entry| viewer.may_see(entry.uid))
            .take(MAX_LISTED_JOBS)
            .map(|entry| entry.info())
            .collect();
        jobs.reverse();
        jobs
    }

    /// Cancels every queued or running job and refuses new ones: the daemon is stopping.
    pub fn cancel_all(&self) {
        let entries: Vec<_> = {
            let mut jobs = self.lock();
            jobs.closed = true;
            jobs.values().cloned().collect()
        };
        for entry in entries {
            entry.cancel(CancelReason::DaemonStopping);
        }
    }

    /// Forgets finished jobs beyond the retention (age, per uid, in all). Live jobs are never
    /// forgotten.
    pub fn prune(&self) {
        let mut jobs = self.lock();
        let now = Instant::now();
        let mut kept_by_uid: HashMap<u32, usize> = HashMap::new();
        let mut kept = 0;
        let mut forget = Vec::new();
        // Newest first, so the counts keep the newest.
        for (id, entry) in jobs.iter().rev() {
            let Some(ended_at) = entry.lock_state().ended_at else {
                continue;
            };
            let own = kept_by_uid.entry(entry.uid).or_default();
            if now.duration_since(ended_at) > self.retention.max_age
                || *own >= self.retention.per_uid
                || kept >= self.retention.total
            {
                forget.push(*id);
            } else {
                *own += 1;
                kept += 1;
            }
        }
        for id in forget {
            jobs.remove(&id);
        }
    }
}

/// The jobs, and whether the registry still takes new ones (derefs to the map).
#[derive(Default)]
struct Jobs {
    map: BTreeMap<u64, Arc<JobEntry>>,
    /// Set by [`Registry::cancel_all`]: no job is admitted after it.
    closed: bool,
}

impl std::ops::Deref for Jobs {
    type Target = BTreeMap<u64, Arc<JobEntry>>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Jobs {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

/// Held by a job's task: when the task ends, however it ends (a panic outside the work, in
/// `R::done` say, included), the entry is finished (as failed, if nothing finished it) and
/// the job no longer counts as active, so shutdown and the idle exit do not wait for it
/// forever.
struct TaskGuard {
    context: Arc<DaemonContext>,
    entry: Arc<JobEntry>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if !self.entry.lock_state().state.is_final() {
            tracing::error!(job_id = self.entry.id, "job task ended without an outcome");
            self.entry.finish(
                JobState::Failed,
                Reply::error(
                    imgcrypt_proto::api::errors::IO_ERROR,
                    ErrorParameters::message(
                        "internal error: the job's task ended without an outcome; see the \
                         daemon's log"
                            .to_string(),
                    ),
                ),
            );
        }
        let registry = self.context.registry();
        registry
            .active
            .send_modify(|active| *active = active.saturating_sub(1));
        registry.prune();
    }
}

/// The job's task: wait for a slot, run, record the end.
async fn run<R>(
    context: &Arc<DaemonContext>,
    entry: &Arc<JobEntry>,
    admission: Admission,
    work: Work<R::Done>,
) where
    R: StreamedReply,
    R::Done: Send + 'static,
{
    let permit = match admission {
        Admission::Running(permit) => permit,
        Admission::Queued(mut waiting) => {
            tracing::info!(job_id = entry.id, user_uid = entry.uid, "job queued");
            let mut tick = tokio::time::interval(POSITION_INTERVAL);
            loop {
                if entry.cancel.load(Ordering::Relaxed) {
                    drop(waiting);
                    close_in_background(work);
                    entry.finish_cancelled_while_queued();
                    return;
                }
                tokio::select! {
                    permit = waiting.started() => break permit,
                    _ = tick.tick() => {
                        let position = waiting.position();
                        entry.update(|state| state.set_position(position));
                    }
                    _ = entry.cancelled.notified() => {}
                }
            }
        }
    };
    tracing::info!(job_id = entry.id, user_uid = entry.uid, "job started");
    entry.update(|state| {
        state.state = JobState::Running;
        state.queue_position = None;
        state.started = Some(SystemTime::now());
        state.progress.queue_position = None;
    });

    let (reporter, mut reports) = Reporter::channel();
    // The job records its engine in its audit facts when it chooses it: `Status` and `Jobs`
    // read it from there while the job runs.
    let facts = reporter.audit().clone();
    entry.update(|state| state.audit = Some(facts));
    let job = {
        let context = context.clone();
        let cancel = entry.cancel.clone();
        let stopping = entry.stopping.clone();
        tokio::task::spawn_blocking(move || work(&context, &reporter, &cancel, &stopping))
    };
    tokio::pin!(job);
    let outcome = loop {
        tokio::select! {
            result = &mut job => break result,
            Some(notice) = reports.notices.recv() => entry.update(|state| state.notice(notice)),
            Ok(()) = reports.progress.changed() => {
                let progress = *reports.progress.borrow_and_update();
                entry.update(|state| state.set_progress(progress));
            }
        }
    };
    drop(permit);
    while let Ok(notice) = reports.notices.try_recv() {
        entry.update(|state| state.notice(notice));
    }
    let result = outcome.unwrap_or_else(|panic| {
        tracing::error!(job_id = entry.id, %panic, "job panicked");
        Err(crate::Error::io(
            "job",
            std::io::Error::other("internal error: the job panicked"),
        ))
    });
    if entry.lock_state().cancel_reason == Some(CancelReason::ClientLeft) {
        match &result {
            Ok(_) => tracing::info!(
                job_id = entry.id,
                "job ended after its client left: finished"
            ),
            Err(error) => {
                tracing::info!(
                    job_id = entry.id,
                    "job ended after its client left: {error}"
                )
            }
        }
    }
    let (state, reply) = match result {
        Ok(done) => {
            tracing::info!(job_id = entry.id, user_uid = entry.uid, "job succeeded");
            (JobState::Succeeded, Reply::ok(R::done(done)))
        }
        Err(error) => {
            tracing::warn!(
                job_id = entry.id,
                user_uid = entry.uid,
                kind = error.varlink_name(),
                "{error}"
            );
            let state = if error.is_cancellation() {
                JobState::Cancelled
            } else {
                JobState::Failed
            };
            (
                state,
                Reply::error(error.varlink_name(), error.varlink_parameters()),
            )
        }
    };
    entry.finish(state, reply);
}

impl JobEntry {
    fn new(id: u64, submission: Submission, queued: bool) -> Self {
        let names = submission.names.map(|names| JobNames {
            source: names.source.map(cut_name),
            output: names.output.map(cut_name),
        });
        Self {
            id,
            uid: submission.uid,
            kind: submission.kind,
            detached: submission.detached,
            names,
            output_identity: submission.output_identity,
            created: SystemTime::now(),
            cancel: Arc::default(),
            stopping: Arc::default(),
            cancelled: Notify::new(),
            state: Mutex::new(EntryState {
                state: if queued {
                    JobState::Queued
                } else {
                    JobState::Running
                },
                queue_position: None,
                progress: Progress {
                    phase: Phase::Queued,
                    bytes_done: 0,
                    bytes_total: 0,
                    queue_position: None,
                },
                phase_start: None,
                rate: None,
                eta_ms: None,
                engine: None,
                audit: None,
                started: (!queued).then(SystemTime::now),
                ended: None,
                ended_at: None,
                notices: VecDeque::new(),
                notices_dropped: 0,
                cancel_reason: None,
                final_reply: None,
                error: None,
                message: None,
            }),
            changed: watch::channel(0).0,
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, EntryState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut EntryState)) {
        change(&mut self.lock_state());
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Asks the job to stop (a no-op once it has ended). A daemon stop sets the job's
    /// `stopping` flag before its cancel flag.
    pub fn cancel(&self, reason: CancelReason) {
        {
            let mut state = self.lock_state();
            if state.state.is_final() {
                return;
            }
            state.cancel_reason.get_or_insert(reason);
        }
        if reason == CancelReason::DaemonStopping {
            self.stopping.store(true, Ordering::SeqCst);
        }
        self.cancel.store(true, Ordering::SeqCst);
        self.cancelled.notify_one();
        tracing::info!(
            job_id = self.id,
            user_uid = self.uid,
            ?reason,
            "job cancel asked for"
        );
    }

    /// Waits for changes: each call's receiver starts out having seen nothing.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        let mut receiver = self.changed.subscribe();
        receiver.mark_changed();
        receiver
    }

    /// What a follower at notice `cursor` (a count of notices ever sent) has not seen; moves
    /// the cursor.
    pub fn follow(&self, cursor: &mut u64) -> Update {
        let state = self.lock_state();
        let first_kept = state.notices_dropped;
        let mut notices = Vec::new();
        if *cursor < first_kept {
            notices.push(format!(
                "{} earlier notices of job {} were not kept (a job keeps its last {MAX_NOTICES})",
                first_kept - *cursor,
                self.id
            ));
            *cursor = first_kept;
        }
        let skip = (*cursor - first_kept) as usize;
        notices.extend(state.notices.iter().skip(skip).cloned());
        *cursor = first_kept + state.notices.len() as u64;
        let unreported = state.progress.phase == Phase::Queued && state.state != JobState::Queued;
        Update {
            notices,
            progress: (!unreported).then_some(state.progress),
            final_reply: state.final_reply.clone(),
        }
    }

    /// The job as the protocol reports it.
    pub fn info(&self) -> JobInfo {
        let state = self.lock_state();
        JobInfo {
            id: self.id,
            uid: self.uid,
            kind: self.kind,
            state: state.state,
            queue_position: state.queue_position,
            progress: state.progress,
            rate: state.rate,
            eta_ms: state.eta_ms,
            engine: state.engine.or_else(|| state.chosen_engine()),
            created_ms: epoch_ms(self.created),
            started_ms: state.started.map(epoch_ms),
            ended_ms: state.ended.map(epoch_ms),
            detached: self.detached,
            names: self.names.clone(),
            output_identity: self.output_identity,
            error: state.error.clone(),
            message: state.message.clone(),
        }
    }

    fn finish_cancelled_while_queued(&self) {
        tracing::info!(
            job_id = self.id,
            user_uid = self.uid,
            "job left the queue: cancelled"
        );
        let error = crate::Error::Cancelled;
        self.finish(
            JobState::Cancelled,
            Reply::error(error.varlink_name(), error.varlink_parameters()),
        );
    }

    fn finish(&self, outcome: JobState, reply: Reply) {
        self.update(|state| {
            state.state = outcome;
            state.queue_position = None;
            state.progress.queue_position = None;
            state.rate = None;
            state.eta_ms = None;
            state.ended = Some(SystemTime::now());
            state.ended_at = Some(Instant::now());
            let parameters = reply.parameters.as_ref();
            // The summary's engine, else (a job that failed or was cancelled after choosing
            // one) the engine it ran with.
            state.engine = parameters
                .and_then(|p| p.pointer("/summary/engine"))
                .and_then(|engine| serde_json::from_value(engine.clone()).ok())
                .or_else(|| state.chosen_engine());
            if reply.error.is_some() {
                state.error = reply.error.clone();
                let message = parameters
                    .and_then(|p| p.get("message"))
                    .and_then(|m| m.as_str())
                    .map(str::to_string);
                state.message = match (outcome, state.cancel_reason) {
                    (JobState::Cancelled, Some(reason)) => Some(match reason {
                        CancelReason::ClientLeft => "cancelled: its client left".to_string(),
                        CancelReason::Requested => "cancelled on request".to_string(),
                        CancelReason::DaemonStopping => "cancelled: the daemon stopped".to_string(),
                    }),
                    _ => message,
                };
            }
            state.final_reply = Some(reply);
        });
    }
}

impl EntryState {
    /// The engine the job chose, from its audit facts (none before it chose one).
    fn chosen_engine(&self) -> Option<EngineKind> {
        self.audit.as_ref().and_then(AuditFacts::engine_chosen)
    }

    fn set_position(&mut self, position: Option<u32>) {
        if self.state == JobState::Queued {
            self.queue_position = position;
            self.progress.queue_position = position;
        }
    }

    fn set_progress(&mut self, mut progress: Progress) {
        progress.queue_position = None;
        let now = Instant::now();
        match self.phase_start {
            Some((phase, since, from)) if phase == progress.phase => {
                let seconds = now.duration_since(since).as_secs_f64();
                let moved = progress.bytes_done.saturating_sub(from);
                if seconds >= 0.5 && moved > 0 {
                    let rate = moved as f64 / seconds;
                    self.rate = Some(rate as u64);
                    let left = progress.bytes_total.saturating_sub(progress.bytes_done);
                    self.eta_ms = Some((left as f64 / rate * 1000.0) as u64);
                }
            }
            _ => {
                self.phase_start = Some((progress.phase, now, progress.bytes_done));
                self.rate = None;
                self.eta_ms = None;
            }
        }
        self.progress = progress;
    }

    fn notice(&mut self, mut text: String) {
        if text.len() > MAX_NOTICE_LEN {
            let mut end = MAX_NOTICE_LEN;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        if self.notices.len() >= MAX_NOTICES {
            self.notices.pop_front();
            self.notices_dropped += 1;
        }
        self.notices.push_back(text);
    }
}

/// The error a caller gets for an id it may not see, whether unknown or another user's.
pub fn no_such_job(id: u64) -> ErrorParameters {
    let mut parameters = ErrorParameters::message(format!(
        "no job {id} of yours: `imgctl jobs` lists your jobs (a finished job is kept for 24 h, \
         the last {} per user; jobs are forgotten when imgcryptd restarts: run an interrupted \
         `imgctl encrypt` again and it resumes from its checkpoint)",
        RETENTION.per_uid
    ));
    parameters.id = Some(id);
    parameters
}

/// A client-given name as it is kept: control characters (and the bidirectional-text controls
/// that reorder what a terminal shows) replaced by U+FFFD, so that `imgctl jobs` of root or an
/// operator cannot be sent escape sequences or forged lines; then cut to [`MAX_JOB_NAME_LEN`].
fn cut_name(name: String) -> String {
    use imgcrypt_proto::api::is_unsafe_in_names;
    let mut name = if name.chars().any(is_unsafe_in_names) {
        name.chars()
            .map(|c| if is_unsafe_in_names(c) { '\u{fffd}' } else { c })
            .collect()
    } else {
        name
    };
    if name.len() > MAX_JOB_NAME_LEN {
        let mut end = MAX_JOB_NAME_LEN;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(crate::jobs::millis)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submission(uid: u32) -> Submission {
        Submission {
            kind: JobKind::Encrypt,
            uid,
            detached: true,
            names: None,
            output_identity: None,
        }
    }

    /// A finished entry of `uid`, as the job task leaves one.
    fn finished(registry: &Registry, id: u64, uid: u32) {
        let entry = Arc::new(JobEntry::new(id, submission(uid), false));
        entry.finish(JobState::Succeeded, Reply::ok(serde_json::json!({})));
        registry.insert(entry);
    }

    const ALICE: Viewer = Viewer {
        uid: 1000,
        sees_all: false,
    };
    const BOB: Viewer = Viewer {
        uid: 2000,
        sees_all: false,
    };
    const OPERATOR: Viewer = Viewer {
        uid: 3000,
        sees_all: true,
    };

    #[test]
    fn users_see_only_their_own_jobs_and_operators_see_all() {
        let registry = Registry::new(RETENTION);
        finished(&registry, 1, ALICE.uid);
        finished(&registry, 2, BOB.uid);
        let ids = |viewer| -> Vec<u64> { registry.list(viewer).iter().map(|j| j.id).collect() };
        assert_eq!(ids(ALICE), vec![1]);
        assert_eq!(ids(BOB), vec![2]);
        assert_eq!(ids(OPERATOR), vec![1, 2]);
        assert!(registry.get(ALICE, 1).is_some());
        // Another user's id and an unknown one look the same.
        assert!(registry.get(BOB, 1).is_none());
        assert!(registry.get(BOB, 99).is_none());
        assert!(registry.get(OPERATOR, 1).is_some());
    }

    #[test]
    fn finished_jobs_are_kept_per_uid_and_in_all_up_to_the_bound() {
        let registry = Registry::new(Retention {
            max_age: Duration::from_secs(3600),
            per_uid: 3,
            total: 5,
        });
        for id in 1..=6 {
            finished(&registry, id, ALICE.uid);
        }
        let ids = |viewer| -> Vec<u64> { registry.list(viewer).iter().map(|j| j.id).collect() };
        assert_eq!(ids(ALICE), vec![4, 5, 6], "the newest 3 of the uid");
        for id in 7..=9 {
            finished(&registry, id, BOB.uid);
        }
        // 6 would be kept per uid, but only 5 in all: the oldest goes.
        assert_eq!(ids(OPERATOR), vec![5, 6, 7, 8, 9]);
        // A live job is never forgotten, whatever the counts.
        let live = Arc::new(JobEntry::new(10, submission(ALICE.uid), true));
        registry.insert(live);
        assert!(registry.get(ALICE, 10).is_some());
    }

    #[test]
    fn finished_jobs_expire() {
        let registry = Registry::new(Retention {
            max_age: Duration::from_millis(10),
            per_uid: 32,
            total: 32,
        });
        finished(&registry, 1, ALICE.uid);
        assert!(registry.get(ALICE, 1).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(registry.get(ALICE, 1).is_none());
    }

    #[test]
    fn notices_are_bounded_and_a_late_follower_is_told() {
        let entry = JobEntry::new(1, submission(ALICE.uid), false);
        for n in 0..(MAX_NOTICES + 5) {
            entry.update(|state| state.notice(format!("notice {n}")));
        }
        entry.update(|state| state.notice("x".repeat(10 * MAX_NOTICE_LEN)));
        let mut cursor = 0;
        let update = entry.follow(&mut cursor);
        assert!(
            update.notices[0].contains("6 earlier notices"),
            "{:?}",
            update.notices[0]
        );
        assert_eq!(update.notices.len(), MAX_NOTICES + 1);
        assert!(update.notices.last().unwrap().len() <= MAX_NOTICE_LEN + 3);
        assert!(entry.follow(&mut cursor).notices.is_empty());
    }

    #[test]
    fn names_are_kept_without_control_characters() {
        let entry = JobEntry::new(
            1,
            Submission {
                names: Some(JobNames {
                    source: Some("/a\u{1b}]0;x\u{7}\n\u{202e}b".into()),
                    output: Some("/plain/päth.luks".into()),
                }),
                ..submission(ALICE.uid)
            },
            false,
        );
        let names = entry.info().names.unwrap();
        assert_eq!(
            names.source.unwrap(),
            "/a\u{fffd}]0;x\u{fffd}\u{fffd}\u{fffd}b"
        );
        assert_eq!(names.output.unwrap(), "/plain/päth.luks");
    }

    /// A reply type whose final reply panics: a panic in the job's task outside its work.
    #[derive(serde::Serialize, Default)]
    struct PanicsWhenDone {}

    impl StreamedReply for PanicsWhenDone {
        type Done = ();
        fn progress(_: Progress) -> Self {
            Self {}
        }
        fn notice(_: String) -> Self {
            Self {}
        }
        fn done((): ()) -> Self {
            panic!("R::done panicked (the test's)")
        }
    }

    fn no_work() -> Work<()> {
        Box::new(|_, _, _, _| Ok(()))
    }

    #[tokio::test]
    async fn a_panic_in_the_task_still_ends_the_job_and_counts_it_out() {
        let context = crate::jobs::testing::userspace_context();
        let registry = context.registry();
        let mut active = registry.active();
        let entry = registry
            .submit::<PanicsWhenDone>(&context, 1, submission(ALICE.uid), no_work())
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), active.wait_for(|n| *n == 0))
            .await
            .expect("the job was never counted out")
            .unwrap();
        let info = entry.info();
        assert_eq!(info.state, JobState::Failed);
        assert!(info.message.unwrap().contains("internal error"));
    }

    #[tokio::test]
    async fn no_job_is_admitted_once_the_daemon_stops() {
        let context = crate::jobs::testing::userspace_context();
        let registry = context.registry();
        registry.cancel_all();
        let refused = registry.submit::<imgcrypt_proto::api::EncryptReply>(
            &context,
            1,
            submission(ALICE.uid),
            Box::new(|_, _, _, _| unreachable!("a job ran after cancel_all")),
        );
        assert!(matches!(refused, Err(Refused::Stopping)));
        assert!(registry.get(ALICE, 1).is_none());
        assert_eq!(*registry.active().borrow(), 0);
    }

    #[test]
    fn a_cancel_by_stop_sets_stopping_first_and_a_finished_job_ignores_cancels() {
        let entry = JobEntry::new(1, submission(ALICE.uid), false);
        entry.cancel(CancelReason::Requested);
        assert!(entry.cancel.load(Ordering::SeqCst));
        assert!(!entry.stopping.load(Ordering::SeqCst));
        let entry = JobEntry::new(2, submission(ALICE.uid), false);
        entry.cancel(CancelReason::DaemonStopping);
        assert!(entry.stopping.load(Ordering::SeqCst));
        let done = JobEntry::new(3, submission(ALICE.uid), false);
        done.finish(JobState::Succeeded, Reply::ok(serde_json::json!({})));
        done.cancel(CancelReason::Requested);
        assert!(!done.cancel.load(Ordering::SeqCst));
        assert_eq!(done.info().state, JobState::Succeeded);
    }
}
