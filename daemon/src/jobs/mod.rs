//! Jobs: what one `io.imgcrypt` call does, independent of how the call arrived.
//!
//! A job runs on a blocking thread (libcryptsetup and the copy are synchronous) and talks to its
//! connection only through a [`Reporter`] (progress and notices out) and a cancel flag (in), so
//! the same job code serves the socket, tests, and any future front end.

pub mod audit;
pub mod decrypt;
pub mod encrypt;
pub mod inspect;
pub mod output;
pub mod resume;
pub mod rewrite;
pub mod startup;
pub mod stream;
pub mod targets;
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
    /// Set when the client left, the job was cancelled, or the daemon stops.
    pub cancel: Arc<AtomicBool>,
    /// Set (before `cancel`) when the cancel is the daemon stopping rather than a user's:
    /// a job may then leave resumable state behind instead of giving up.
    pub stopping: Arc<AtomicBool>,
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

    /// Whether a cancel (if any) is the daemon stopping, not the user.
    pub fn daemon_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Logs and forwards something the user should know.
    pub fn notice(&self, text: String) {
        tracing::info!(job = self.id, "{text}");
        self.reporter.notice(text);
    }
}

/// The source `source` and its companions as passed (each readable, a regular file or block
/// device), ready for [`crate::formats::open_files`].
pub fn source_files(
    passed: &mut PassedDescriptors,
    source: crate::sys::descriptors::CheckedFile,
    companions: &[imgcrypt_proto::api::Companion],
) -> Result<crate::formats::files::SourceFiles> {
    use crate::formats::files::{self, SourceFiles};
    // Checked before any descriptor is examined, so a long list costs nothing.
    if companions.len() > files::MAX_COMPANIONS {
        return Err(Error::InvalidOption {
            parameter: "companions",
            message: format!(
                "{} companion files passed; at most {} are read for one source: convert the \
                 image to one file first (`qemu-img convert -O qcow2`)",
                companions.len(),
                files::MAX_COMPANIONS
            ),
        });
    }
    let mut checked = Vec::with_capacity(companions.len());
    for companion in companions {
        let file = crate::sys::descriptors::check_readable_image(
            passed.take(Descriptor::Companion, companion.fd)?,
            Descriptor::Companion,
        )?;
        checked.push(files::Passed {
            file: file.file,
            name: companion.name.clone(),
            referenced_by: companion.referenced_by,
        });
    }
    SourceFiles::new(source.file, checked)
}

/// The descriptors of one call. An image, output or source may be used once; a key descriptor
/// may be named by several roles (the new `encryption_key` of a rotation is also an unlock
/// candidate).
///
/// A descriptor the client opened read-write is one the daemon may write through, so it must
/// not be the same file as any other descriptor of the call: otherwise a key file, a source or
/// an image passed beside it would be overwritten by the job (a key passed as its own output
/// would be destroyed by the image written over it). [`PassedDescriptors::take`] refuses that
/// whatever the role, so no job can forget the check.
pub struct PassedDescriptors {
    slots: Vec<Option<OwnedFd>>,
    /// `(st_dev, st_ino)` of each descriptor as passed; `None` where `fstat` failed (the
    /// descriptor's own checks report that when it is used).
    identities: Vec<Option<(u64, u64)>>,
    /// The role each descriptor was taken for, for messages.
    roles: Vec<Option<Descriptor>>,
    /// Where the identities of the files taken go for the job's audit record.
    audit: Option<audit::AuditFacts>,
}

impl PassedDescriptors {
    /// Wraps the descriptors that came with a call, in order.
    pub fn new(descriptors: Vec<OwnedFd>) -> Self {
        let identities = descriptors.iter().map(identity).collect();
        let roles = vec![None; descriptors.len()];
        Self {
            slots: descriptors.into_iter().map(Some).collect(),
            identities,
            roles,
            audit: None,
        }
    }

    /// Records the identity of every source, image and output taken from now on in `facts`
    /// (see [`audit`]).
    pub fn audit_into(&mut self, facts: audit::AuditFacts) {
        self.audit = Some(facts);
    }

    /// Takes descriptor `index` for the role `which`.
    pub fn take(&mut self, which: Descriptor, index: u32) -> Result<OwnedFd> {
        let count = self.slots.len();
        let position = usize::try_from(index).ok().filter(|&i| i < count);
        let Some(position) = position else {
            return Err(Error::bad_descriptor(
                which,
                format!(
                    "index {index} does not name a passed descriptor ({count} were passed \
                     with the call)"
                ),
            ));
        };
        let fd = self.slots[position].take().ok_or_else(|| {
            Error::bad_descriptor(
                which,
                format!("index {index} was already used for another role"),
            )
        })?;
        self.roles[position] = Some(which);
        let read_write = is_read_write(&fd);
        if read_write {
            self.refuse_shared_file(which, position)?;
        }
        if let Some(facts) = &self.audit {
            facts.took(which, &fd, read_write);
        }
        Ok(fd)
    }

    /// Fails when descriptor `position` (written through, as `which`) is the same file as
    /// another descriptor of the call.
    fn refuse_shared_file(&self, which: Descriptor, position: usize) -> Result<()> {
        let Some(own) = self.identities[position] else {
            return Ok(());
        };
        let Some(other) = (0..self.identities.len())
            .find(|&other| other != position && self.identities[other] == Some(own))
        else {
            return Ok(());
        };
        let named = match self.roles[other] {
            Some(role) => format!("the {role} (descriptor {other})"),
            None => format!("descriptor {other}"),
        };
        Err(Error::bad_descriptor(
            which,
            format!(
                "is the same file as {named} passed with the call: the daemon writes through \
                 the {which} and would overwrite it; give the {which} a file of its own"
            ),
        ))
    }
}

/// `(st_dev, st_ino)` of a descriptor.
fn identity(fd: &OwnedFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd)
        .ok()
        .map(|stat| (stat.st_dev, stat.st_ino))
}

/// Whether the client opened the descriptor read-write (the daemon may write through it).
fn is_read_write(fd: &OwnedFd) -> bool {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    fcntl(fd, FcntlArg::F_GETFL)
        .map(|bits| OFlag::from_bits_retain(bits) & OFlag::O_ACCMODE == OFlag::O_RDWR)
        .unwrap_or(false)
}

/// A fresh random volume key and a LUKS header for it that `key` opens, formatted on daemon
/// memory. The keyslot made is checked against the caller's `caps`: a benchmark on a loaded
/// machine could pick more than they allow, and every header a job makes must also open for
/// its caller. A benchmark it needs comes from [`crate::luks::bench`]'s cache, or is measured
/// and cached when `state` runs no other job.
pub fn new_luks_header(
    spec: &crate::luks::HeaderSpec,
    key: &crate::keys::KeyFile,
    caps: &crate::luks::cost::KdfCaps,
    state: &crate::context::DaemonContext,
) -> Result<(crate::keys::SecretBytes, crate::luks::FormattedHeader)> {
    let volume_key = crate::keys::SecretBytes::random(crate::luks::VOLUME_KEY_BYTES)?;
    let idle = || only_job(state);
    let context = crate::luks::HeaderContext {
        caps: Some(caps),
        idle: &idle,
    };
    let header = crate::luks::format_header_with(
        spec,
        &volume_key,
        &key.passphrase,
        &key.fingerprint,
        &context,
    )?;
    caps.check_created(&header.cost)?;
    Ok((volume_key, header))
}

/// Whether the calling job is the only one running: a PBKDF benchmark taken now may be cached
/// (see [`crate::luks::bench`]).
pub fn only_job(state: &crate::context::DaemonContext) -> bool {
    state.running_jobs() <= 1
}

/// A summary's account of the benchmark behind a keyslot (None for fixed iterations).
pub fn benchmark_summary(
    benchmark: Option<crate::luks::header::Benchmark>,
) -> Option<imgcrypt_proto::api::PbkdfBenchmark> {
    use crate::luks::bench::Origin;
    benchmark.map(|benchmark| imgcrypt_proto::api::PbkdfBenchmark {
        cached: matches!(benchmark.origin, Origin::Cached { .. }),
        age_ms: match benchmark.origin {
            Origin::Cached { age } => millis(age),
            Origin::Fresh => 0,
        },
        measured_ms: millis(benchmark.took),
    })
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
/// connection forwards only what it has time for. Notices are few; the channel holds at most
/// [`PENDING_NOTICES`] not yet taken by the job's registry task (which takes them as they come
/// and keeps its own bounded log, `context::registry`); one more is dropped from the stream
/// (it is still in the daemon's log).
#[derive(Clone)]
pub struct Reporter {
    progress: watch::Sender<Progress>,
    notices: mpsc::Sender<String>,
    /// What the job's audit record will say (see [`audit`]).
    audit: audit::AuditFacts,
}

/// Notices a reporter holds before its receiver takes them.
pub const PENDING_NOTICES: usize = 64;

/// The receiving side of a [`Reporter`].
pub struct ReportReceiver {
    /// Latest progress.
    pub progress: watch::Receiver<Progress>,
    /// Notices in order.
    pub notices: mpsc::Receiver<String>,
}

impl Reporter {
    /// A reporter and its receiver.
    pub fn channel() -> (Self, ReportReceiver) {
        let (progress_tx, progress_rx) = watch::channel(Progress {
            phase: Phase::Queued,
            bytes_done: 0,
            bytes_total: 0,
            queue_position: None,
        });
        let (notice_tx, notice_rx) = mpsc::channel(PENDING_NOTICES);
        (
            Self {
                progress: progress_tx,
                notices: notice_tx,
                audit: audit::AuditFacts::default(),
            },
            ReportReceiver {
                progress: progress_rx,
                notices: notice_rx,
            },
        )
    }

    /// Reports the current phase and byte counts.
    pub fn progress(&self, phase: Phase, bytes_done: u64, bytes_total: u64) {
        self.audit.progressed(bytes_done);
        self.progress.send_replace(Progress {
            phase,
            bytes_done,
            bytes_total,
            queue_position: None,
        });
    }

    /// The facts of the job's audit record, for the job to fill in as it learns them.
    pub fn audit(&self) -> &audit::AuditFacts {
        &self.audit
    }

    /// Tells the user something that does not stop the job.
    pub fn notice(&self, text: impl Into<String>) {
        // Full only if the registry's task stopped taking them; gone only when the job has
        // ended. Either way the notice is in the daemon's log ([`Job::notice`]).
        let _ = self.notices.try_send(text.into());
    }
}

/// What unit tests of jobs share: a context with the userspace engine only, and Encrypt
/// parameters with a cheap keyslot.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use imgcrypt_proto::api::{EncryptParameters, EngineChoice, LuksVersion, Pbkdf, PbkdfKind};

    use crate::context::{DaemonConfig, DaemonContext};
    use crate::engines::userspace::UserspaceEngine;
    use crate::engines::EngineSet;

    /// A context with the default limits whose only engine is the userspace one.
    pub fn userspace_context() -> Arc<DaemonContext> {
        let engines = EngineSet::new(
            EngineChoice::Userspace,
            Arc::new(UserspaceEngine::new()),
            Err("not probed in a unit test".to_string()),
        )
        .unwrap();
        DaemonContext::new(engines, DaemonConfig::default())
    }

    /// Encrypt descriptor 0 into descriptor 1 with the key file at descriptor 2: raw LUKS2,
    /// the userspace engine, pbkdf2 with 1000 iterations.
    pub fn cheap_encrypt() -> EncryptParameters {
        EncryptParameters {
            source: 0,
            companions: Vec::new(),
            output: 1,
            key: Some(2),
            source_key: None,
            luks_version: LuksVersion::Luks2,
            sector_size: 512,
            pbkdf: Some(Pbkdf {
                kind: Some(PbkdfKind::Pbkdf2),
                iterations: Some(1000),
                ..Pbkdf::default()
            }),
            engine: EngineChoice::Userspace,
            format: None,
            target: None,
            detach: None,
            names: None,
            stream: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path, write: bool) -> OwnedFd {
        OwnedFd::from(
            OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .unwrap(),
        )
    }

    #[test]
    fn a_written_descriptor_may_not_be_another_of_the_calls_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        let other = dir.path().join("other");
        std::fs::write(&key, b"k").unwrap();
        std::fs::write(&other, b"o").unwrap();

        // The key, then the same file again as a read-write output.
        let mut passed = PassedDescriptors::new(vec![open(&key, false), open(&key, true)]);
        passed.take(Descriptor::Key, 0).unwrap();
        let error = passed.take(Descriptor::Output, 1).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(
                error,
                Error::BadDescriptor {
                    descriptor: Descriptor::Output,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(message.contains("the key (descriptor 0)"), "{message}");

        // Taken the other way round, before the key's role is known: named by index.
        let mut passed = PassedDescriptors::new(vec![open(&key, false), open(&key, true)]);
        let message = passed.take(Descriptor::Output, 1).unwrap_err().to_string();
        assert!(message.contains("descriptor 0 passed"), "{message}");

        // The same file twice read-only (two key roles) is fine, and so is a distinct output.
        let mut passed = PassedDescriptors::new(vec![
            open(&key, false),
            open(&key, false),
            open(&other, true),
        ]);
        passed.take(Descriptor::Key, 0).unwrap();
        passed.take(Descriptor::Key, 1).unwrap();
        passed.take(Descriptor::Output, 2).unwrap();
    }

    #[test]
    fn out_of_range_and_reused_indices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let mut passed = PassedDescriptors::new(vec![open(&path, false)]);
        let message = passed.take(Descriptor::Source, 3).unwrap_err().to_string();
        assert!(message.contains("1 were passed"), "{message}");
        passed.take(Descriptor::Source, 0).unwrap();
        let message = passed.take(Descriptor::Key, 0).unwrap_err().to_string();
        assert!(message.contains("already used"), "{message}");
    }

    /// Jobs need no server: with a context built directly, an encryption of a small RAW image
    /// by the userspace engine, then a verification of what it wrote against the source.
    #[test]
    fn jobs_run_with_a_context_and_no_server() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;

        use imgcrypt_proto::api::{KeyRef, OutputFormat, VerifyParameters};

        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let source = dir.path().join("disk.raw");
        // 4 MiB: a pattern in the first MiB, zeros after it.
        let mut bytes: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 + 1).collect();
        bytes.resize(4 << 20, 0);
        std::fs::write(&source, &bytes).unwrap();
        let key = dir.path().join("key");
        let mut file = std::fs::File::create(&key).unwrap();
        file.write_all(b"q83vEjRWeJq8zd7wESIzRFVmd4iZqrvM3e7/ABEiM0Q=")
            .unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let output = dir.path().join("disk.luks.partial");
        std::fs::File::create(&output).unwrap();

        let context = testing::userspace_context();
        let (reporter, _reports) = Reporter::channel();
        fn job<P>(parameters: P, descriptors: Vec<OwnedFd>, reporter: &Reporter) -> Job<P> {
            Job {
                id: next_job_id(),
                caller_uid: nix::unistd::geteuid().as_raw(),
                parameters,
                descriptors: PassedDescriptors::new(descriptors),
                reporter: reporter.clone(),
                cancel: Arc::default(),
                stopping: Arc::default(),
            }
        }

        let encrypt = testing::cheap_encrypt();
        let descriptors = vec![open(&source, false), open(&output, true), open(&key, false)];
        let summary = encrypt::run(job(encrypt, descriptors, &reporter), &context).unwrap();
        assert_eq!(summary.output_format, OutputFormat::Luks);
        assert_eq!(summary.virtual_size, 4 << 20);
        assert_eq!(summary.payload_size, 4 << 20);
        let written = std::fs::read(&output).unwrap();
        assert_eq!(
            &written[..6],
            b"LUKS\xba\xbe",
            "no LUKS header at the start"
        );
        assert_eq!(written.len() as u64, summary.output_size);

        let verify = VerifyParameters {
            image: 0,
            source: Some(1),
            source_companions: Vec::new(),
            keys: vec![KeyRef {
                fd: 2,
                name: "key".to_string(),
            }],
        };
        let descriptors = vec![
            open(&output, false),
            open(&source, false),
            open(&key, false),
        ];
        let verified = verify::run(job(verify, descriptors, &reporter), &context).unwrap();
        let comparison = verified.source.expect("the source was compared");
        assert!(comparison.matches, "{comparison:?}");
        assert_eq!(verified.payload_size, 4 << 20);
        assert_eq!(context.running_jobs(), 0, "jobs run here hold no slot");
    }
}
