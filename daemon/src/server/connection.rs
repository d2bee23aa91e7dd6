//! One client connection: read calls, dispatch them, stream replies.
//!
//! Reads are `recvmsg` with `MSG_CMSG_CLOEXEC` (see `imgcrypt_proto::fdpass`), and descriptors
//! are attached to the next message completed after they arrive: a client sends a call and its
//! descriptors in one `sendmsg` and waits for the reply, so this is exact for every client that
//! follows the protocol, and a client that pipelines only confuses itself.
//!
//! While a job runs the connection keeps reading: end of stream means the client is gone (it was
//! interrupted or killed), and the job is cancelled rather than left writing into a file nobody
//! will rename. Calls that arrive meanwhile (pipelined) are kept, without their descriptors, and
//! answered in order after the job's final reply, as Varlink requires: `GetInfo` and
//! `GetInterfaceDescription` normally, a second job call with an error (one job per
//! connection). At most [`MAX_PIPELINED`] may wait.
//!
//! Time limits (`ConnectionLimits`): a connection with no call in progress is closed after the
//! idle timeout; a frame whose terminating NUL has not come within the frame timeout of its
//! first byte is refused and the connection closed, so unfinished frames cannot pin
//! descriptors. `oneway` calls get no reply (the Varlink rule); a `oneway` job call is not run
//! at all, since nobody would hear how it ended.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgcrypt_proto::api::{
    self, DecryptReply, EncryptReply, ErrorParameters, FileIdentity, JobId, JobKind, JobNames,
    JobReply, JobsReply, Progress, RewriteReply, StreamedReply, VerifyReply, WaitReply,
};
use imgcrypt_proto::fdpass::{recv_with_fds, MAX_FDS_PER_MESSAGE};
use imgcrypt_proto::varlink::{
    self, Call, InterfaceDescription, InterfaceQuery, Reply, ServiceInfo,
};
use imgcrypt_proto::wire::{self, FrameDecoder, FrameError, MAX_FRAME_LEN};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::{ConnectionLimits, ConnectionRefused, ServerState};
use crate::context::registry::{self, CancelReason, JobEntry, Refused, Submission, Viewer, Work};
use crate::context::scheduler::{QueueFull, QueueLimit};
use crate::context::{DaemonContext, Mode};
use crate::jobs::{self, inspect::InspectOnly, Job, PassedDescriptors};
use crate::sys::descriptors::close_in_background;

/// Least time between two progress replies: enough for a smooth bar, cheap for the socket.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// A client that does not read its replies for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Calls that may wait behind a running job; one more breaks the protocol and closes the
/// connection. Each is at most one frame (`MAX_FRAME_LEN`), so this bounds the memory one
/// connection can pin.
pub(super) const MAX_PIPELINED: usize = 8;
/// Methods that run a job.
const JOB_METHODS: [&str; 5] = [
    api::ENCRYPT,
    api::INSPECT,
    api::DECRYPT,
    api::VERIFY,
    api::REWRITE,
];
// `Wait` follows a job like a job call but starts none: pipelined behind a job it is answered
// after it, like GetInfo.

/// Who is on the other end, from SO_PEERCRED and SO_PEERGROUPS (the kernel's word, not the
/// client's).
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
    /// Root, or in the operator group: sees and cancels every job.
    operator: bool,
}

impl Peer {
    fn viewer(self) -> Viewer {
        Viewer {
            uid: self.uid,
            sees_all: self.operator,
        }
    }
}

/// Whether the peer is root or in the operator group (its primary gid or, per SO_PEERGROUPS,
/// a supplementary one). Groups that cannot be read make the peer an ordinary user.
fn is_operator(stream: &UnixStream, uid: u32, gid: u32, operator_gid: Option<u32>) -> bool {
    if uid == 0 {
        return true;
    }
    let Some(operator_gid) = operator_gid else {
        return false;
    };
    if gid == operator_gid {
        return true;
    }
    match crate::sys::peer::peer_groups(stream.as_fd()) {
        Ok(groups) => groups.contains(&operator_gid),
        Err(error) => {
            tracing::warn!(uid, %error, "SO_PEERGROUPS failed; treating the peer as no operator");
            false
        }
    }
}

/// Why a connection ends.
enum Closed {
    /// End of stream, a read error, or a write the client did not take.
    Gone,
    /// The daemon is shutting down.
    Stopping,
    /// The client broke the protocol: this message goes to it as a `ProtocolError`, then the
    /// connection closes. (Sending is left to the top of the connection, so every read stays
    /// cancel-safe.)
    Broken(String),
}

/// A call that arrived while a job was running on its connection.
struct Pipelined {
    frame: Vec<u8>,
    /// The job that was running.
    during_job: u64,
}

struct Connection {
    stream: UnixStream,
    decoder: FrameDecoder,
    /// Descriptors received but not yet attached to a message.
    pending_fds: Vec<OwnedFd>,
    /// Calls waiting to be answered after the running job, in arrival order.
    pipelined: VecDeque<Pipelined>,
    peer: Peer,
}

impl Drop for Connection {
    fn drop(&mut self) {
        close_in_background(std::mem::take(&mut self.pending_fds));
    }
}

/// Serves one connection until the client leaves or the daemon stops.
pub(super) async fn serve(
    stream: UnixStream,
    state: Arc<ServerState>,
    mut stop: watch::Receiver<bool>,
) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            operator: is_operator(
                &stream,
                cred.uid(),
                cred.gid(),
                state.context.config.operator_gid,
            ),
        },
        Err(error) => {
            tracing::warn!(%error, "SO_PEERCRED failed; dropping connection");
            return;
        }
    };
    let mut connection = Connection {
        stream,
        decoder: FrameDecoder::new(MAX_FRAME_LEN),
        pending_fds: Vec::new(),
        pipelined: VecDeque::new(),
        peer,
    };
    tracing::debug!(user_uid = peer.uid, user_gid = peer.gid, user_pid = ?peer.pid, "client connected");

    if let Err(message) = authorize(&state, peer) {
        tracing::warn!(user_uid = peer.uid, user_pid = ?peer.pid, "{message}");
        let reply = Reply::error(
            api::errors::PERMISSION_DENIED,
            ErrorParameters::message(message),
        );
        let _ = connection.send(&reply).await;
        return;
    }
    // Held until the connection ends: it is what the connection caps count.
    let _slot = match state.admit_connection(peer.uid) {
        Ok(slot) => slot,
        Err(refused) => {
            connection.refuse(refused).await;
            return;
        }
    };

    loop {
        let next = match connection.pipelined.pop_front() {
            Some(call) => Ok(Some((call.frame, Vec::new(), Some(call.during_job)))),
            None => tokio::select! {
                next = connection.next_call(&state.config.connections) => {
                    next.map(|message| message.map(|(frame, fds)| (frame, fds, None)))
                }
                _ = stop.changed() => return,
            },
        };
        let result = match next {
            Ok(Some((frame, fds, during_job))) => {
                connection
                    .handle(&frame, fds, during_job, &state, &mut stop)
                    .await
            }
            Ok(None) => return,
            Err(closed) => Err(closed),
        };
        match result {
            Ok(()) => {}
            Err(Closed::Broken(message)) => {
                connection.send_protocol_error(&message).await;
                return;
            }
            Err(Closed::Gone | Closed::Stopping) => return,
        }
    }
}

/// The per-user daemon serves only its own user; root may always connect.
fn authorize(state: &ServerState, peer: Peer) -> Result<(), String> {
    if state.context.config.mode == Mode::User {
        let own = nix::unistd::getuid().as_raw();
        if peer.uid != own && peer.uid != 0 {
            return Err(format!(
                "this is the per-user daemon of uid {own}; uid {} may not use it: start your \
                 own with `imgcryptd --user` or use the system socket",
                peer.uid
            ));
        }
    }
    Ok(())
}

impl Connection {
    /// Tells a client over a connection cap which one and what to do, then lets it go.
    async fn refuse(&mut self, refused: ConnectionRefused) {
        let peer = self.peer;
        let (limit, message) = match refused {
            ConnectionRefused::Total(limit) => (
                limit,
                format!(
                    "imgcryptd already holds {limit} connections, its limit for all users \
                     together (--max-connections); retry in a moment"
                ),
            ),
            ConnectionRefused::PerUid(limit) => (
                limit,
                format!(
                    "uid {} already holds {limit} connections to imgcryptd, the limit for one \
                     user (--max-connections-per-user); close connections you no longer use \
                     (every running imgctl holds one) or retry when one of your jobs has ended",
                    peer.uid
                ),
            ),
        };
        tracing::warn!(user_uid = peer.uid, user_pid = ?peer.pid, limit, "refusing connection: {message}");
        let mut parameters = ErrorParameters::message(message);
        parameters.limit = Some(limit as u64);
        let _ = self
            .send(&Reply::error(api::errors::TOO_MANY_CONNECTIONS, parameters))
            .await;
    }

    /// The next complete frame and the descriptors that came with it; `None` at end of stream.
    /// Closes an idle connection and refuses a frame not finished in time (see the module
    /// documentation).
    async fn next_call(
        &mut self,
        limits: &ConnectionLimits,
    ) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>, Closed> {
        let peer = self.peer;
        let idle_deadline = tokio::time::Instant::now() + limits.idle_timeout;
        let mut frame_deadline = None;
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(Some((frame, std::mem::take(&mut self.pending_fds)))),
                Ok(None) => {}
                Err(error) => return Err(self.protocol_error(&error)),
            }
            if self.decoder.has_partial_frame() || !self.pending_fds.is_empty() {
                frame_deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + limits.frame_timeout);
            }
            match tokio::time::timeout_at(frame_deadline.unwrap_or(idle_deadline), self.fill())
                .await
            {
                Ok(read) => {
                    if read? == 0 {
                        return Ok(None);
                    }
                }
                Err(_) if frame_deadline.is_some() => {
                    let seconds = limits.frame_timeout.as_secs();
                    tracing::warn!(
                        user_uid = peer.uid,
                        user_pid = ?peer.pid,
                        descriptors = self.pending_fds.len(),
                        "closing connection: a message without its terminating NUL for {seconds} s"
                    );
                    return Err(Closed::Broken(format!(
                        "the message's terminating NUL did not arrive within {seconds} s of its \
                         first byte (imgcryptd --frame-timeout); send each call whole"
                    )));
                }
                Err(_) => {
                    tracing::info!(
                        user_uid = peer.uid,
                        user_pid = ?peer.pid,
                        "closing connection idle for {} s (--idle-connection-timeout)",
                        limits.idle_timeout.as_secs()
                    );
                    return Err(Closed::Gone);
                }
            }
        }
    }

    /// Reads once from the socket into the decoder. Cancel-safe: the only await is the
    /// readiness wait; once the socket is readable, the read and its bookkeeping finish in
    /// the same poll. Descriptors over the limit or cut off by the kernel are already closed
    /// when this returns [`Closed::Broken`].
    async fn fill(&mut self) -> Result<usize, Closed> {
        let mut buffer = [0u8; 16 * 1024];
        let peer = self.peer;
        loop {
            self.stream.readable().await.map_err(|_| Closed::Gone)?;
            let stream = &self.stream;
            let pending = &mut self.pending_fds;
            match stream.try_io(Interest::READABLE, || {
                recv_with_fds(stream.as_fd(), &mut buffer, pending)
            }) {
                Ok(n) => {
                    if self.pending_fds.len() > MAX_FDS_PER_MESSAGE {
                        close_in_background(std::mem::take(&mut self.pending_fds));
                        let error = format!(
                            "more than {MAX_FDS_PER_MESSAGE} descriptors without a message to \
                             carry them"
                        );
                        tracing::warn!(user_uid = peer.uid, user_pid = ?peer.pid, "closing connection: {error}");
                        return Err(Closed::Broken(error));
                    }
                    self.decoder.extend(&buffer[..n]);
                    return Ok(n);
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!(user_uid = peer.uid, user_pid = ?peer.pid, %error, "closing connection");
                    return Err(Closed::Broken(error.to_string()));
                }
                Err(error) => {
                    tracing::debug!(%error, user_uid = peer.uid, "read failed");
                    return Err(Closed::Gone);
                }
            }
        }
    }

    /// Logs a framing error and turns it into the [`Closed::Broken`] that reports it.
    fn protocol_error(&self, error: &FrameError) -> Closed {
        tracing::warn!(user_uid = self.peer.uid, user_pid = ?self.peer.pid, %error, "closing connection");
        Closed::Broken(error.to_string())
    }

    async fn send_protocol_error(&mut self, message: &str) {
        let reply = Reply::error(
            api::errors::PROTOCOL_ERROR,
            ErrorParameters::message(message.to_string()),
        );
        let _ = self.send(&reply).await;
    }

    async fn send(&mut self, reply: &Reply) -> Result<(), Closed> {
        let bytes = wire::encode(reply);
        match tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&bytes)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Closed::Gone),
        }
    }

    /// Dispatches one call; `during_job` is set for a call that was pipelined behind that job.
    async fn handle(
        &mut self,
        frame: &[u8],
        fds: Vec<OwnedFd>,
        during_job: Option<u64>,
        state: &Arc<ServerState>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Closed> {
        let call: Call = match serde_json::from_slice(frame) {
            Ok(call) => call,
            Err(error) => {
                close_in_background(fds);
                tracing::warn!(user_uid = self.peer.uid, %error, "malformed message");
                let message = format!("malformed message: {error}");
                let reply = Reply::error(
                    api::errors::PROTOCOL_ERROR,
                    ErrorParameters::message(message),
                );
                return self.send(&reply).await;
            }
        };
        tracing::debug!(method = %call.method, user_uid = self.peer.uid, user_pid = ?self.peer.pid, "call");
        let peer = self.peer;
        if JOB_METHODS.contains(&call.method.as_str()) {
            if call.oneway {
                close_in_background(fds);
                tracing::warn!(
                    user_uid = peer.uid,
                    user_pid = ?peer.pid,
                    method = %call.method,
                    "oneway job call not run: nobody would hear its outcome (no reply sent)"
                );
                return Ok(());
            }
            if let Some(job) = during_job {
                tracing::warn!(user_uid = peer.uid, user_pid = ?peer.pid, method = %call.method, job_id = job,
                    "refused a job call pipelined behind a running job");
                let message = format!(
                    "this {} call arrived while job {job} was running on the same connection; a \
                     connection runs one job at a time: wait for the final reply before the \
                     next job call, or open another connection",
                    call.method
                );
                let reply = Reply::error(
                    api::errors::PROTOCOL_ERROR,
                    ErrorParameters::message(message),
                );
                return self.send(&reply).await;
            }
        }
        let fds = if JOB_METHODS.contains(&call.method.as_str()) {
            fds
        } else {
            // No other call takes descriptors.
            close_in_background(fds);
            Vec::new()
        };
        let reply = match call.method.as_str() {
            varlink::GET_INFO => Reply::ok(service_info()),
            varlink::GET_INTERFACE_DESCRIPTION => match parameters::<InterfaceQuery>(&call) {
                Ok(query) => interface_description(&query.interface),
                Err(reply) => reply,
            },
            api::ENCRYPT => {
                return self
                    .job::<_, EncryptReply>(call, fds, state, stop, jobs::encrypt::run)
                    .await
            }
            api::INSPECT => {
                return self
                    .job::<_, InspectOnly>(call, fds, state, stop, jobs::inspect::run)
                    .await
            }
            api::DECRYPT => {
                return self
                    .job::<_, DecryptReply>(call, fds, state, stop, jobs::decrypt::run)
                    .await
            }
            api::VERIFY => {
                return self
                    .job::<_, VerifyReply>(call, fds, state, stop, jobs::verify::run)
                    .await
            }
            api::REWRITE => {
                return self
                    .job::<_, RewriteReply>(call, fds, state, stop, jobs::rewrite::run)
                    .await
            }
            api::GET_DAEMON_STATUS => Reply::ok(super::status::daemon_status(state, peer.uid)),
            api::JOBS | api::STATUS | api::CANCEL => self.job_query(&call, state),
            api::WAIT if !call.oneway => return self.wait(&call, state, stop).await,
            other => unknown_method(other),
        };
        if call.oneway {
            return Ok(());
        }
        self.send(&reply).await
    }

    /// Parses a job call's parameters and submits it to the registry; then either replies at
    /// once with its id (`detach`) or follows it to its end with [`Self::follow`].
    async fn job<P, R>(
        &mut self,
        call: Call,
        fds: Vec<OwnedFd>,
        state: &Arc<ServerState>,
        stop: &mut watch::Receiver<bool>,
        work: fn(Job<P>, &DaemonContext) -> crate::Result<R::Done>,
    ) -> Result<(), Closed>
    where
        P: DeserializeOwned + JobParameters + Send + 'static,
        R: StreamedReply,
        R::Done: Send + 'static,
    {
        let parameters: P = match parameters(&call) {
            Ok(parameters) => parameters,
            Err(reply) => {
                close_in_background(fds);
                return self.send(&reply).await;
            }
        };
        let job_id = jobs::next_job_id();
        let peer = self.peer;
        let detached = parameters.detach();
        tracing::info!(job_id, user_uid = peer.uid, user_gid = peer.gid, user_pid = ?peer.pid, detached,
            "{} requested", P::KIND.name());
        // The daemon's own fstat of the output it was given: what the client's rename checks.
        // On a blocking thread: fstat of a user's FUSE file waits for its GETATTR, which may
        // never come. Taken before the job is queued, so that a job cancelled while queued
        // still tells its owner's `imgctl cancel` which partial file to remove.
        let output = parameters.output();
        let (fds, output_identity) = match tokio::task::spawn_blocking(move || {
            let identity = output
                .and_then(|index| fds.get(index as usize))
                .and_then(|fd| nix::sys::stat::fstat(fd).ok())
                // A streamed output's pipe has no file to rename or remove: no identity.
                .filter(|stat| stat.st_mode & libc::S_IFMT != libc::S_IFIFO)
                .map(|stat| FileIdentity {
                    device: stat.st_dev,
                    inode: stat.st_ino,
                });
            (fds, identity)
        })
        .await
        {
            Ok(identified) => identified,
            Err(error) => {
                tracing::error!(job_id, %error, "identifying the output failed");
                return self
                    .send(&Reply::error(
                        api::errors::IO_ERROR,
                        ErrorParameters::message(
                            "internal error examining the output descriptor; retry".to_string(),
                        ),
                    ))
                    .await;
            }
        };
        let submission = Submission {
            kind: P::KIND,
            uid: peer.uid,
            detached,
            names: parameters.names(),
            output_identity,
        };
        let caller_uid = peer.uid;
        let caller = jobs::audit::Caller {
            gid: peer.gid,
            pid: peer.pid,
        };
        let work: Work<R::Done> = Box::new(move |context, reporter, cancel, stopping| {
            let job = Job {
                id: job_id,
                caller_uid,
                parameters,
                descriptors: PassedDescriptors::new(fds),
                reporter: reporter.clone(),
                cancel: cancel.clone(),
                stopping: stopping.clone(),
            };
            jobs::audit::audited(P::KIND.name(), caller, job, context, work)
        });
        let context = &state.context;
        let entry = match context
            .registry()
            .submit::<R>(context, job_id, submission, work)
        {
            Ok(entry) => entry,
            Err(Refused::Stopping) => {
                tracing::warn!(
                    job_id,
                    user_uid = peer.uid,
                    "job refused: the daemon is stopping"
                );
                return self
                    .send(&Reply::error(
                        api::errors::IO_ERROR,
                        ErrorParameters::message(
                            "imgcryptd is stopping and starts no more jobs; retry after it \
                             restarts"
                                .to_string(),
                        ),
                    ))
                    .await;
            }
            Err(Refused::Queue(QueueFull { which, limit })) => {
                let text = match which {
                    QueueLimit::PerUid => {
                        tracing::warn!(
                            job_id,
                            user_uid = peer.uid,
                            limit,
                            "job refused: the uid already has {limit} jobs queued"
                        );
                        format!(
                            "you already have {limit} jobs waiting for a slot, the most one user \
                             may queue (imgcryptd --max-queued-per-user); wait for one of them to \
                             finish, then call again"
                        )
                    }
                    QueueLimit::Total => {
                        tracing::warn!(
                            job_id,
                            user_uid = peer.uid,
                            limit,
                            "job refused: {limit} jobs of all users are queued"
                        );
                        format!(
                            "the daemon's queue is full: {limit} jobs of all users are waiting \
                             for a slot, the most it holds (imgcryptd --max-queued); call again \
                             when some have started (`imgctl daemon status` shows the queue), \
                             or ask the operator to raise --max-queued"
                        )
                    }
                };
                let mut parameters = ErrorParameters::message(text);
                parameters.limit = Some(limit as u64);
                return self
                    .send(&Reply::error(api::errors::TOO_MANY_JOBS, parameters))
                    .await;
            }
        };
        if detached {
            // `{"job_id": N}`: the same shape in every method's reply that has the field.
            let reply = EncryptReply {
                job_id: Some(job_id),
                ..EncryptReply::default()
            };
            return self.send(&Reply::ok(reply)).await;
        }
        self.follow::<R>(&entry, call.more, true, true, stop).await
    }

    /// Streams a job's progress and notices (when the caller asked for `more`) until its final
    /// reply, which it sends. With `cancel_on_leave` (the call that submitted a job that is not
    /// detached), a client that leaves cancels the job; a `Wait` that leaves does not. Without
    /// `with_result` the final reply is only the job's outcome ([`outcome_only`]).
    async fn follow<R: StreamedReply>(
        &mut self,
        entry: &Arc<JobEntry>,
        streaming: bool,
        cancel_on_leave: bool,
        with_result: bool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Closed> {
        let peer = self.peer;
        let job_id = entry.id;
        // Inspect's replies have no progress or notice field: its partials would be empty.
        let carries = |reply: R| {
            serde_json::to_value(reply)
                .is_ok_and(|value| value.as_object().is_some_and(|o| !o.is_empty()))
        };
        let streaming_progress = streaming && carries(R::progress(entry.info().progress));
        let streaming_notices = streaming && carries(R::notice(String::new()));
        let mut changes = entry.subscribe();
        let mut cursor = 0;
        let mut last_sent: Option<(Instant, Progress)> = None;
        let mut pending: Option<Progress> = None;
        let mut stopping = false;
        loop {
            let update = entry.follow(&mut cursor);
            if streaming_notices {
                for notice in update.notices {
                    self.send_or_leave(&Reply::partial(R::notice(notice)), entry, cancel_on_leave)
                        .await?;
                }
            }
            if let Some(reply) = update.final_reply {
                let reply = if with_result {
                    reply
                } else {
                    outcome_only(entry)
                };
                self.send(&reply).await?;
                return if stopping {
                    Err(Closed::Stopping)
                } else {
                    Ok(())
                };
            }
            if streaming_progress {
                if let Some(progress) = update.progress {
                    let changed = last_sent.is_none_or(|(_, sent)| sent != progress);
                    if changed {
                        pending = Some(progress);
                    }
                }
                if let Some(progress) = pending {
                    let due = match last_sent {
                        Some((at, sent)) => {
                            sent.phase != progress.phase
                                || sent.queue_position != progress.queue_position
                                || at.elapsed() >= PROGRESS_INTERVAL
                        }
                        None => true,
                    };
                    if due {
                        self.send_or_leave(
                            &Reply::partial(R::progress(progress)),
                            entry,
                            cancel_on_leave,
                        )
                        .await?;
                        last_sent = Some((Instant::now(), progress));
                        pending = None;
                    }
                }
            }
            let next_due = last_sent
                .filter(|_| pending.is_some())
                .map(|(at, _)| tokio::time::Instant::from_std(at + PROGRESS_INTERVAL));
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The entry is gone with its sender: cannot happen while we hold it.
                        return Err(Closed::Gone);
                    }
                }
                _ = async { tokio::time::sleep_until(next_due.expect("guarded")).await }, if next_due.is_some() => {}
                result = self.watch_client(job_id) => {
                    if cancel_on_leave {
                        tracing::info!(job_id, user_uid = peer.uid, user_pid = ?peer.pid,
                            "client went away; cancelling");
                        entry.cancel(CancelReason::ClientLeft);
                    } else {
                        tracing::info!(job_id, user_uid = peer.uid, user_pid = ?peer.pid,
                            "client stopped following the job; it runs on");
                    }
                    return Err(match result {
                        Err(Closed::Broken(message)) => Closed::Broken(message),
                        _ => Closed::Gone,
                    });
                }
                _ = stop.changed(), if !stopping => {
                    // The server cancels every job; its final reply still goes to the client.
                    stopping = true;
                }
            }
        }
    }

    /// Sends a partial reply; a client that does not take it is gone (and the job cancelled
    /// when it was the submitting call's).
    async fn send_or_leave(
        &mut self,
        reply: &Reply,
        entry: &JobEntry,
        cancel_on_leave: bool,
    ) -> Result<(), Closed> {
        let sent = self.send(reply).await;
        if sent.is_err() {
            tracing::info!(
                job_id = entry.id,
                user_uid = self.peer.uid,
                "client went away (a reply could not be sent)"
            );
            if cancel_on_leave {
                entry.cancel(CancelReason::ClientLeft);
            }
        }
        sent
    }

    /// `Jobs`, `Status`, `Cancel`: answered at once.
    fn job_query(&self, call: &Call, state: &ServerState) -> Reply {
        let registry = state.context.registry();
        let viewer = self.peer.viewer();
        if call.method == api::JOBS {
            return Reply::ok(JobsReply {
                jobs: registry.list(viewer),
            });
        }
        let id = match parameters::<JobId>(call) {
            Ok(query) => query.id,
            Err(reply) => return reply,
        };
        let Some(entry) = registry.get(viewer, id) else {
            return no_such_job_reply(self.peer, &call.method, id);
        };
        if call.method == api::CANCEL {
            tracing::info!(
                job_id = id,
                user_uid = self.peer.uid,
                owner = entry.uid,
                "cancel requested"
            );
            entry.cancel(CancelReason::Requested);
        }
        Reply::ok(JobReply { job: entry.info() })
    }

    /// `Wait`: follows a job the caller may see, without cancelling it on leaving.
    async fn wait(
        &mut self,
        call: &Call,
        state: &ServerState,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Closed> {
        let id = match parameters::<JobId>(call) {
            Ok(query) => query.id,
            Err(reply) => return self.send(&reply).await,
        };
        let Some(entry) = state.context.registry().get(self.peer.viewer(), id) else {
            let reply = no_such_job_reply(self.peer, &call.method, id);
            return self.send(&reply).await;
        };
        // Only the owner gets the job's result: an operator's (or root's) Wait on another
        // user's job is sent the outcome alone, never a summary (key fingerprints, header
        // hashes, a verify's digest and first difference).
        let owner = entry.uid == self.peer.uid;
        self.follow::<WaitReply>(&entry, call.more, false, owner, stop)
            .await
    }

    /// Resolves when the client closes its end (or breaks the protocol) while its job is
    /// queued or runs. Calls completed meanwhile are kept for after the job (see the module
    /// documentation); their descriptors are closed at once, as no call answered then can use
    /// them. Cancel-safe: nothing is awaited between a read and its bookkeeping.
    async fn watch_client(&mut self, job_id: u64) -> Result<(), Closed> {
        loop {
            // Frames may already be buffered: read in the same chunk as the job's own call.
            loop {
                match self.decoder.next_frame() {
                    Ok(Some(frame)) => {
                        close_in_background(std::mem::take(&mut self.pending_fds));
                        if self.pipelined.len() >= MAX_PIPELINED {
                            let message = format!(
                                "more than {MAX_PIPELINED} calls sent while job {job_id} runs on \
                                 this connection; wait for replies before sending more"
                            );
                            tracing::warn!(user_uid = self.peer.uid, user_pid = ?self.peer.pid, "closing connection: {message}");
                            return Err(Closed::Broken(message));
                        }
                        self.pipelined.push_back(Pipelined {
                            frame,
                            during_job: job_id,
                        });
                    }
                    Ok(None) => break,
                    Err(error) => return Err(self.protocol_error(&error)),
                }
            }
            if self.fill().await? == 0 {
                return Err(Closed::Gone);
            }
        }
    }
}

/// A finished job's final reply as someone other than its owner gets it: success with no
/// result, or the error and the message its `JobInfo` shows anyway.
fn outcome_only(entry: &JobEntry) -> Reply {
    let info = entry.info();
    match info.error {
        Some(error) => Reply::error(
            &error,
            ErrorParameters::message(
                info.message
                    .unwrap_or_else(|| format!("job {} failed", info.id)),
            ),
        ),
        None => Reply::ok(WaitReply::default()),
    }
}

/// The same answer for an unknown id and another user's job (no information leak).
fn no_such_job_reply(peer: Peer, method: &str, id: u64) -> Reply {
    tracing::info!(user_uid = peer.uid, job_id = id, %method, "no such job for this caller");
    Reply::error(api::errors::NO_SUCH_JOB, registry::no_such_job(id))
}

/// What the connection needs to know of a job call's parameters.
trait JobParameters {
    /// The job's kind.
    const KIND: JobKind;
    /// Whether the caller asked to detach.
    fn detach(&self) -> bool {
        false
    }
    /// The names the client gave.
    fn names(&self) -> Option<JobNames> {
        None
    }
    /// Index of the descriptor the job writes its output to.
    fn output(&self) -> Option<u32> {
        None
    }
}

impl JobParameters for api::EncryptParameters {
    const KIND: JobKind = JobKind::Encrypt;
    /// A streamed call is never detached: its pipe is read by the client on this connection.
    /// It runs attached so that the job's refusal of `detach` with `stream` reaches the
    /// caller as the call's error, rather than a job id for a job that can only fail.
    fn detach(&self) -> bool {
        self.detach == Some(true) && self.stream.is_none()
    }
    fn names(&self) -> Option<JobNames> {
        self.names.clone()
    }
    fn output(&self) -> Option<u32> {
        Some(self.output)
    }
}

impl JobParameters for api::DecryptParameters {
    const KIND: JobKind = JobKind::Decrypt;
    fn detach(&self) -> bool {
        self.detach == Some(true)
    }
    fn names(&self) -> Option<JobNames> {
        self.names.clone()
    }
    fn output(&self) -> Option<u32> {
        Some(self.output)
    }
}

impl JobParameters for api::VerifyParameters {
    const KIND: JobKind = JobKind::Verify;
}

impl JobParameters for api::RewriteParameters {
    const KIND: JobKind = JobKind::Rewrite;
    fn detach(&self) -> bool {
        self.detach == Some(true)
    }
    fn names(&self) -> Option<JobNames> {
        self.names.clone()
    }
    fn output(&self) -> Option<u32> {
        self.reencrypt_output
    }
}

impl JobParameters for api::InspectParameters {
    const KIND: JobKind = JobKind::Inspect;
}

/// Parses a call's parameters, or builds the `InvalidParameter` reply. The reply names the
/// field at fault (`pbkdf.kind`) and what was expected, and never repeats the value sent: it
/// could be large, or a secret pasted into the wrong field.
fn parameters<T: DeserializeOwned>(call: &Call) -> Result<T, Reply> {
    let value = call.parameters.clone().unwrap_or_else(|| json!({}));
    let error = match serde_json::from_value::<T>(value.clone()) {
        Ok(parameters) => return Ok(parameters),
        Err(error) => error.to_string(),
    };
    let (parameter, problem) = describe_parameter_error::<T>(&value, &error);
    Err(Reply::error(
        varlink::errors::INVALID_PARAMETER,
        json!({
            "parameter": parameter,
            "message": format!("invalid parameters for {}: `{parameter}`: {problem}", call.method),
        }),
    ))
}

/// Most field paths tried when looking for the one at fault: each try re-parses the call, and
/// a call can be 64 KiB.
const MAX_FIELDS_TRIED: usize = 64;

/// The field at fault and what is wrong with it, from serde's `error` text for `value`.
fn describe_parameter_error<T: DeserializeOwned>(value: &Value, error: &str) -> (String, String) {
    // serde names a missing field by our own field name, never by anything the client sent.
    if let Some(field) = error
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        return (field.to_string(), "missing".to_string());
    }
    let problem = match error.split_once(", expected ") {
        // What follows "expected" is ours: a type, or the list of accepted spellings.
        Some((what, expected)) if what.starts_with("unknown field") => {
            format!("unknown field, expected {expected}")
        }
        Some((_, expected)) => format!("expected {expected}"),
        None => "invalid value".to_string(),
    };
    let parameter = field_at_fault::<T>(value, error).unwrap_or_else(|| "parameters".to_string());
    (parameter, problem)
}

/// The deepest field whose removal changes the parse error: that field's value (or the field
/// itself, if unknown) is what the parser choked on. Fields with names that are not plain
/// identifiers are never reported.
fn field_at_fault<T: DeserializeOwned>(value: &Value, error: &str) -> Option<String> {
    let mut paths = Vec::new();
    collect_field_paths(value, &mut Vec::new(), &mut paths);
    let mut found: Option<Vec<String>> = None;
    for path in paths.into_iter().take(MAX_FIELDS_TRIED) {
        let mut without = value.clone();
        remove_path(&mut without, &path);
        let changed = match serde_json::from_value::<T>(without) {
            Ok(_) => true,
            Err(other) => other.to_string() != error,
        };
        if changed && found.as_ref().is_none_or(|best| path.len() > best.len()) {
            found = Some(path);
        }
    }
    found.map(|path| path.join("."))
}

fn collect_field_paths(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Value::Object(map) = value {
        for (key, inner) in map {
            let plain = !key.is_empty()
                && key.len() <= 64
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !plain {
                continue;
            }
            prefix.push(key.clone());
            out.push(prefix.clone());
            collect_field_paths(inner, prefix, out);
            prefix.pop();
        }
    }
}

fn remove_path(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = value;
    for key in parents {
        match current.get_mut(key) {
            Some(inner) => current = inner,
            None => return,
        }
    }
    if let Value::Object(map) = current {
        map.remove(last);
    }
}

fn service_info() -> ServiceInfo {
    ServiceInfo {
        vendor: "imgcrypt".to_string(),
        product: "imgcryptd".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        url: "https://github.com/imgcrypt/imgcrypt".to_string(),
        interfaces: vec![
            varlink::SERVICE_INTERFACE.to_string(),
            api::INTERFACE.to_string(),
        ],
    }
}

fn interface_description(interface: &str) -> Reply {
    let description = match interface {
        api::INTERFACE => api::INTERFACE_DESCRIPTION,
        varlink::SERVICE_INTERFACE => varlink::SERVICE_DESCRIPTION,
        _ => {
            return Reply::error(
                varlink::errors::INTERFACE_NOT_FOUND,
                json!({ "interface": interface }),
            )
        }
    };
    Reply::ok(InterfaceDescription {
        description: description.to_string(),
    })
}

fn unknown_method(method: &str) -> Reply {
    let interface = method
        .rsplit_once('.')
        .map_or("", |(interface, _)| interface);
    if interface == api::INTERFACE || interface == varlink::SERVICE_INTERFACE {
        Reply::error(
            varlink::errors::METHOD_NOT_FOUND,
            json!({ "method": method }),
        )
    } else {
        Reply::error(
            varlink::errors::INTERFACE_NOT_FOUND,
            json!({ "interface": interface }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcrypt_proto::api::EncryptParameters;

    fn fault(parameters: Value) -> (String, String) {
        let error = serde_json::from_value::<EncryptParameters>(parameters.clone())
            .unwrap_err()
            .to_string();
        describe_parameter_error::<EncryptParameters>(&parameters, &error)
    }

    fn valid() -> Value {
        json!({"source": 0, "output": 1, "key": 2, "luks_version": "luks2", "sector_size": 512,
               "pbkdf": {"kind": "pbkdf2", "iterations": 1000}})
    }

    #[test]
    fn names_the_nested_field_and_never_the_value() {
        let mut parameters = valid();
        parameters["pbkdf"]["kind"] = json!("s3cret");
        let (parameter, problem) = fault(parameters);
        assert_eq!(parameter, "pbkdf.kind");
        assert!(problem.starts_with("expected"), "{problem}");
        assert!(!problem.contains("s3cret"), "{problem}");
    }

    #[test]
    fn wrong_type_and_missing_and_unknown_fields() {
        let mut parameters = valid();
        parameters["sector_size"] = json!("s3cret");
        let (parameter, problem) = fault(parameters);
        assert_eq!(parameter, "sector_size");
        assert!(!problem.contains("s3cret"), "{problem}");

        let mut parameters = valid();
        parameters.as_object_mut().unwrap().remove("output");
        assert_eq!(fault(parameters), ("output".into(), "missing".into()));

        let mut parameters = valid();
        parameters["bogus"] = json!(1);
        assert_eq!(fault(parameters).0, "bogus");

        // A field name that is not a plain identifier is never echoed either.
        let mut parameters = valid();
        parameters["s3cret value"] = json!(1);
        assert_eq!(fault(parameters).0, "parameters");

        assert_eq!(fault(json!("s3cret")).0, "parameters");
    }
}
