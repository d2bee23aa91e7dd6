//! Jobs: what one `io.imgcrypt` call does, independent of how the call arrived.
//!
//! A job runs on a blocking thread (libcryptsetup and the copy are synchronous) and talks to its
//! connection only through a [`Reporter`] (progress and notices out) and a cancel flag (in), so
//! the same job code serves the socket, tests, and any future front end.

pub mod decrypt;
pub mod encrypt;
pub mod inspect;
pub mod rewrite;
pub mod unlock;
pub mod verify;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imgcrypt_proto::api::{Phase, Progress};
use tokio::sync::{mpsc, watch};

use crate::error::Descriptor;
use crate::{Error, Result};

/// One call's work as a job sees it: who asked, what they asked, what they passed, and the way
/// back (progress, notices) and in (cancellation).
pub struct Job<P> {
    /// Identifies the job in logs and device names.
    pub id: u64,
    /// The caller's uid (SO_PEERCRED): some keys may serve only some callers.
    pub caller_uid: u32,
    /// The call's parameters.
    pub parameters: P,
    /// Descriptors passed with the call; parameters index into them.
    pub descriptors: PassedDescriptors,
    /// Progress and notices out.
    pub reporter: Reporter,
    /// Set when the client left or the daemon stops.
    pub cancel: Arc<AtomicBool>,
}

impl<P> Job<P> {
    /// [`Error::Cancelled`] once cancellation was asked for.
    pub fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Logs and forwards something the user should know.
    pub fn notice(&self, text: String) {
        tracing::info!(job = self.id, "{text}");
        self.reporter.notice(text);
    }
}

/// The descriptors of one call. An image, output or source may be used once; a key descriptor
/// may be named by several roles (the new encryption key is also an unlock candidate).
pub struct PassedDescriptors {
    slots: Vec<Option<OwnedFd>>,
}

impl PassedDescriptors {
    /// Wraps the descriptors that came with a call, in order.
    pub fn new(descriptors: Vec<OwnedFd>) -> Self {
        Self {
            slots: descriptors.into_iter().map(Some).collect(),
        }
    }

    /// Takes descriptor `index` for the role `which`.
    pub fn take(&mut self, which: Descriptor, index: u32) -> Result<OwnedFd> {
        let count = self.slots.len();
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
            .ok_or_else(|| {
                Error::bad_descriptor(
                    which,
                    format!(
                        "index {index} does not name a passed descriptor ({count} were passed \
                         with the call)"
                    ),
                )
            })?;
        slot.take().ok_or_else(|| {
            Error::bad_descriptor(
                which,
                format!("index {index} was already used for another role"),
            )
        })
    }
}

/// Milliseconds, saturating.
pub fn millis(duration: Duration) -> u64 {
    duration.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Job identifiers, unique for the daemon's lifetime; they name devices and log lines.
static NEXT_JOB_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh job identifier.
pub fn next_job_id() -> u64 {
    NEXT_JOB_ID.fetch_add(1, Ordering::Relaxed)
}

/// How a running job reports to whoever started it.
///
/// Progress is a "latest value" channel: workers may report hundreds of times a second and the
/// connection forwards only what it has time for. Notices are few and must all arrive.
#[derive(Clone)]
pub struct Reporter {
    progress: watch::Sender<Progress>,
    notices: mpsc::UnboundedSender<String>,
}

/// The receiving side of a [`Reporter`].
pub struct ReportReceiver {
    /// Latest progress.
    pub progress: watch::Receiver<Progress>,
    /// Notices in order.
    pub notices: mpsc::UnboundedReceiver<String>,
}

impl Reporter {
    /// A reporter and its receiver.
    pub fn channel() -> (Self, ReportReceiver) {
        let (progress_tx, progress_rx) = watch::channel(Progress {
            phase: Phase::Queued,
            bytes_done: 0,
            bytes_total: 0,
        });
        let (notice_tx, notice_rx) = mpsc::unbounded_channel();
        (
            Self {
                progress: progress_tx,
                notices: notice_tx,
            },
            ReportReceiver {
                progress: progress_rx,
                notices: notice_rx,
            },
        )
    }

    /// Reports the current phase and byte counts.
    pub fn progress(&self, phase: Phase, bytes_done: u64, bytes_total: u64) {
        self.progress.send_replace(Progress {
            phase,
            bytes_done,
            bytes_total,
        });
    }

    /// Tells the user something that does not stop the job.
    pub fn notice(&self, text: impl Into<String>) {
        // The receiver is gone only when the connection is gone, and then the job is being
        // cancelled anyway.
        let _ = self.notices.send(text.into());
    }
}
