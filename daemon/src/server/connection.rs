//! One client connection: read calls, dispatch them, stream replies.
//!
//! Reads are `recvmsg` with `MSG_CMSG_CLOEXEC` (see `imgcrypt_proto::fdpass`), and descriptors
//! are attached to the next message completed after they arrive: a client sends a call and its
//! descriptors in one `sendmsg` and waits for the reply, so this is exact for every client that
//! follows the protocol, and a client that pipelines only confuses itself.
//!
//! While a job runs the connection keeps reading: end of stream means the client is gone (it was
//! interrupted or killed), and the job is cancelled rather than left writing into a file nobody
//! will rename.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgcrypt_proto::api::{
    self, DecryptReply, EncryptReply, ErrorParameters, Phase, RewriteReply, StreamedReply,
    VerifyReply,
};
use imgcrypt_proto::fdpass::{recv_with_fds, MAX_FDS_PER_MESSAGE};
use imgcrypt_proto::varlink::{
    self, Call, InterfaceDescription, InterfaceQuery, Reply, ServiceInfo,
};
use imgcrypt_proto::wire::{self, FrameDecoder, FrameError, MAX_FRAME_LEN};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::{Mode, ServerState};
use crate::jobs::{self, inspect::InspectOnly, Job, PassedDescriptors, Reporter};

/// Least time between two progress replies: enough for a smooth bar, cheap for the socket.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// A client that does not read its replies for this long is treated as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Who is on the other end, from SO_PEERCRED (the kernel's word, not the client's).
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
}

/// Why a connection ends.
enum Closed {
    /// End of stream, a read error, or a write the client did not take.
    Gone,
    /// The daemon is shutting down.
    Stopping,
}

struct Connection {
    stream: UnixStream,
    decoder: FrameDecoder,
    /// Descriptors received but not yet attached to a message.
    pending_fds: Vec<OwnedFd>,
    peer: Peer,
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
        peer,
    };
    tracing::debug!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, "client connected");

    if let Err(message) = authorize(&state, peer) {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "{message}");
        let reply = Reply::error(
            api::errors::PERMISSION_DENIED,
            ErrorParameters::message(message),
        );
        let _ = connection.send(&reply).await;
        return;
    }

    loop {
        let next = tokio::select! {
            next = connection.next_call() => next,
            _ = stop.changed() => return,
        };
        let (frame, fds) = match next {
            Ok(Some(message)) => message,
            Ok(None) | Err(Closed::Gone) | Err(Closed::Stopping) => return,
        };
        if let Err(Closed::Gone | Closed::Stopping) =
            connection.handle(&frame, fds, &state, &mut stop).await
        {
            return;
        }
    }
}

/// The per-user daemon serves only its own user; root may always connect.
fn authorize(state: &ServerState, peer: Peer) -> Result<(), String> {
    if state.config.mode == Mode::User {
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
    /// The next complete frame and the descriptors that came with it; `None` at end of stream.
    async fn next_call(&mut self) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>, Closed> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(Some((frame, std::mem::take(&mut self.pending_fds)))),
                Ok(None) => {}
                Err(error) => {
                    self.protocol_error(&error).await;
                    return Err(Closed::Gone);
                }
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads once from the socket into the decoder. Cancel-safe: the only await is the
    /// readiness wait; once the socket is readable, the read and its bookkeeping finish in
    /// the same poll.
    async fn fill(&mut self) -> Result<usize, Closed> {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            self.stream.readable().await.map_err(|_| Closed::Gone)?;
            let stream = &self.stream;
            let pending = &mut self.pending_fds;
            match stream.try_io(Interest::READABLE, || {
                recv_with_fds(stream.as_fd(), &mut buffer, pending)
            }) {
                Ok(n) => {
                    if self.pending_fds.len() > MAX_FDS_PER_MESSAGE {
                        self.pending_fds.clear();
                        let error = "too many descriptors without a message to carry them";
                        self.send_protocol_error(error).await;
                        return Err(Closed::Gone);
                    }
                    self.decoder.extend(&buffer[..n]);
                    return Ok(n);
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => {
                    tracing::debug!(%error, uid = self.peer.uid, "read failed");
                    if error.kind() == std::io::ErrorKind::InvalidData {
                        self.send_protocol_error(&error.to_string()).await;
                    }
                    return Err(Closed::Gone);
                }
            }
        }
    }

    async fn protocol_error(&mut self, error: &FrameError) {
        tracing::warn!(uid = self.peer.uid, pid = ?self.peer.pid, %error, "closing connection");
        self.send_protocol_error(&error.to_string()).await;
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

    /// Dispatches one call.
    async fn handle(
        &mut self,
        frame: &[u8],
        fds: Vec<OwnedFd>,
        state: &Arc<ServerState>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Closed> {
        let call: Call = match serde_json::from_slice(frame) {
            Ok(call) => call,
            Err(error) => {
                tracing::warn!(uid = self.peer.uid, %error, "malformed message");
                let message = format!("malformed message: {error}");
                let reply = Reply::error(
                    api::errors::PROTOCOL_ERROR,
                    ErrorParameters::message(message),
                );
                return self.send(&reply).await;
            }
        };
        tracing::debug!(method = %call.method, uid = self.peer.uid, pid = ?self.peer.pid, "call");
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
            other => unknown_method(other),
        };
        if call.oneway {
            return Ok(());
        }
        self.send(&reply).await
    }

    /// Parses a job call's parameters and runs it with [`Self::run_job`].
    async fn job<P, R>(
        &mut self,
        call: Call,
        fds: Vec<OwnedFd>,
        state: &Arc<ServerState>,
        stop: &mut watch::Receiver<bool>,
        work: fn(Job<P>, &ServerState) -> crate::Result<R::Done>,
    ) -> Result<(), Closed>
    where
        P: DeserializeOwned + Send + 'static,
        R: StreamedReply,
        R::Done: Send + 'static,
    {
        let parameters: P = match parameters(&call) {
            Ok(parameters) => parameters,
            Err(reply) => return self.send(&reply).await,
        };
        let job_id = jobs::next_job_id();
        let peer = self.peer;
        // "encrypt requested", "rewrite requested", ...: operators grep for these.
        let what = call
            .method
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_lowercase();
        tracing::info!(job = job_id, uid = peer.uid, gid = peer.gid, pid = ?peer.pid, "{what} requested");
        self.run_job::<R>(
            call.more,
            job_id,
            state,
            stop,
            move |state, reporter, cancel| {
                let job = Job {
                    id: job_id,
                    caller_uid: peer.uid,
                    parameters,
                    descriptors: PassedDescriptors::new(fds),
                    reporter: reporter.clone(),
                    cancel: cancel.clone(),
                };
                work(job, state)
            },
        )
        .await
    }

    /// Runs a job on a blocking thread once a job slot is free, streaming its progress and
    /// notices when the caller asked for `more`, and cancelling it when the client leaves or the
    /// daemon stops.
    async fn run_job<R>(
        &mut self,
        streaming: bool,
        job_id: u64,
        state: &Arc<ServerState>,
        stop: &mut watch::Receiver<bool>,
        work: impl FnOnce(&ServerState, &Reporter, &Arc<AtomicBool>) -> crate::Result<R::Done>
            + Send
            + 'static,
    ) -> Result<(), Closed>
    where
        R: StreamedReply,
        R::Done: Send + 'static,
    {
        let peer = self.peer;
        let cancel = Arc::new(AtomicBool::new(false));
        let (reporter, mut reports) = Reporter::channel();

        // Wait for a job slot, telling the client it is queued, and noticing if it leaves.
        let permit = match state.job_slots.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                if streaming {
                    self.send(&Reply::partial(R::progress(queued()))).await?;
                }
                tokio::select! {
                    permit = state.job_slots.acquire() => permit.expect("semaphore never closed"),
                    result = self.wait_for_hangup() => return result,
                    _ = stop.changed() => return Err(Closed::Stopping),
                }
            }
        };

        let job = {
            let state = state.clone();
            let cancel = cancel.clone();
            tokio::task::spawn_blocking(move || work(&state, &reporter, &cancel))
        };
        tokio::pin!(job);

        let mut client_gone = false;
        let mut stopping = false;
        let mut last_progress: Option<(Instant, Phase)> = None;
        let outcome = loop {
            tokio::select! {
                result = &mut job => break result,
                Some(notice) = reports.notices.recv(), if streaming && !client_gone => {
                    if self.send(&Reply::partial(R::notice(notice))).await.is_err() {
                        client_gone = client_left(job_id, peer, &cancel, "a reply could not be sent");
                    }
                }
                Ok(()) = reports.progress.changed(), if streaming && !client_gone => {
                    let progress = *reports.progress.borrow_and_update();
                    let due = match last_progress {
                        Some((at, phase)) => phase != progress.phase || at.elapsed() >= PROGRESS_INTERVAL,
                        None => true,
                    };
                    if due {
                        last_progress = Some((Instant::now(), progress.phase));
                        if self.send(&Reply::partial(R::progress(progress))).await.is_err() {
                            client_gone = client_left(job_id, peer, &cancel, "a reply could not be sent");
                        }
                    }
                }
                _ = self.wait_for_hangup(), if !client_gone => {
                    client_gone = client_left(job_id, peer, &cancel, "its connection closed");
                }
                _ = stop.changed(), if !stopping => {
                    tracing::info!(job = job_id, "daemon stopping; cancelling");
                    stopping = true;
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        };
        drop(permit);

        let result = outcome.unwrap_or_else(|panic| {
            tracing::error!(job = job_id, %panic, "job panicked");
            Err(crate::Error::io(
                "job",
                std::io::Error::other("internal error: the job panicked"),
            ))
        });
        if client_gone {
            match &result {
                Ok(_) => tracing::info!(job = job_id, "job ended after its client left: finished"),
                Err(error) => {
                    tracing::info!(job = job_id, "job ended after its client left: {error}")
                }
            }
            return Err(Closed::Gone);
        }
        if streaming {
            while let Ok(notice) = reports.notices.try_recv() {
                self.send(&Reply::partial(R::notice(notice))).await?;
            }
        }
        let reply = match result {
            Ok(done) => Reply::ok(R::done(done)),
            Err(error) => {
                tracing::warn!(
                    job = job_id,
                    uid = peer.uid,
                    kind = error.varlink_name(),
                    "{error}"
                );
                Reply::error(error.varlink_name(), error.varlink_parameters())
            }
        };
        self.send(&reply).await?;
        if stopping {
            Err(Closed::Stopping)
        } else {
            Ok(())
        }
    }

    /// Resolves when the client closes its end (or breaks the protocol) while a job runs.
    /// Bytes a client sends meanwhile are buffered for after the job.
    async fn wait_for_hangup(&mut self) -> Result<(), Closed> {
        loop {
            if self.fill().await? == 0 {
                return Err(Closed::Gone);
            }
            if self.decoder.next_frame().is_err() {
                return Err(Closed::Gone);
            }
        }
    }
}

/// Cancels a job whose client is gone, however that was noticed, and says so in the log.
/// Returns `true`, the new value of the connection's `client_gone`.
fn client_left(job_id: u64, peer: Peer, cancel: &AtomicBool, how: &str) -> bool {
    tracing::info!(job = job_id, uid = peer.uid, pid = ?peer.pid, "client went away ({how}); cancelling");
    cancel.store(true, Ordering::Relaxed);
    true
}

/// Parses a call's parameters, or builds the `InvalidParameter` reply.
fn parameters<T: DeserializeOwned>(call: &Call) -> Result<T, Reply> {
    let value = call.parameters.clone().unwrap_or_else(|| json!({}));
    serde_json::from_value(value).map_err(|error| {
        let text = error.to_string();
        let parameter = text
            .split('`')
            .nth(1)
            .unwrap_or("parameters")
            .to_string();
        Reply::error(
            varlink::errors::INVALID_PARAMETER,
            json!({ "parameter": parameter, "message": format!("invalid parameters for {}: {text}", call.method) }),
        )
    })
}

fn queued() -> api::Progress {
    api::Progress {
        phase: Phase::Queued,
        bytes_done: 0,
        bytes_total: 0,
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
