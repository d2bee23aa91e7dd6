//! Jobs: what one `io.imgcrypt` call does, independent of how the call arrived.
//!
//! A job runs on a blocking thread (libcryptsetup and the copy are synchronous) and talks to its
//! connection only through a [`Reporter`] (progress and notices out) and a cancel flag (in), so
//! the same job code serves the socket, tests, and any future front end.

pub mod encrypt;

use std::sync::atomic::{AtomicU64, Ordering};

use imgcrypt_proto::api::{Phase, Progress};
use tokio::sync::{mpsc, watch};

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
