//! The audit record: one log record per job that ran, saying who asked for what, on which
//! files, with which key (by fingerprint, never the key), and how it ended.
//!
//! Jobs fill in [`AuditFacts`] as they learn them (the descriptors' identities when
//! [`super::PassedDescriptors::take`] hands them out, the key fingerprint once the key is read
//! or an image unlocked, the engine once chosen, the bytes from the progress reports), through
//! the job's [`super::Reporter`]. [`audited`] runs a job's work inside a `job` span (so every
//! record the job thread logs carries `JOB_ID` and `USER_UID`, and `ENGINE` once known) and
//! then emits the record under the target [`TARGET`] with the fixed journald
//! [`MESSAGE_ID`], whatever the outcome: succeeded, failed (with the error's kind), cancelled,
//! or a panic (logged, then the panic goes on).
//!
//! Tracing field names are the journald names in lower case (the journald layer upper-cases
//! them and adds no prefix): `job_id` → `JOB_ID`, `user_uid` → `USER_UID`, `message_id` →
//! `MESSAGE_ID`. `journalctl MESSAGE_ID=35db536a90ca4c43b8300e87186d9a9a` lists the records.
//!
//! A job that never started (refused with `TooManyJobs`, or whose client left while it was
//! queued) has no audit record: it touched no file. The connection logs those.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use imgcrypt_proto::api::EngineKind;

use super::Job;
use crate::context::DaemonContext;
use crate::error::Descriptor;
use crate::{Error, Result};

/// The journald `MESSAGE_ID` of every audit record (an sd-id128, generated once for this
/// purpose).
pub const MESSAGE_ID: &str = "35db536a90ca4c43b8300e87186d9a9a";

/// The tracing target of audit records (`IMGCRYPTD_LOG=imgcryptd::audit=info` keeps them alone).
pub const TARGET: &str = "imgcryptd::audit";

/// Who called, from SO_PEERCRED, beyond the uid the [`Job`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The caller's gid.
    pub gid: u32,
    /// The caller's pid, when the kernel gave one.
    pub pid: Option<i32>,
}

/// A passed file as the audit record names it: `fstat` of the descriptor when the job took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_size` (0 for a block device).
    pub size: u64,
    /// `st_mtime`, seconds since the epoch.
    pub mtime: i64,
    /// `st_mtime`'s nanoseconds.
    pub mtime_nsec: i64,
}

impl FileIdentity {
    /// The identity of `fd`, or `None` when `fstat` fails (the job reports that itself).
    pub fn of(fd: &impl AsFd) -> Option<Self> {
        let stat = nix::sys::stat::fstat(fd.as_fd()).ok()?;
        Some(Self {
            dev: stat.st_dev,
            ino: stat.st_ino,
            size: u64::try_from(stat.st_size).unwrap_or(0),
            mtime: stat.st_mtime,
            mtime_nsec: stat.st_mtime_nsec,
        })
    }
}

/// What a job has learnt that the audit record reports. Shared by the job's reporter clones.
#[derive(Debug, Clone, Default)]
pub struct AuditFacts(Arc<Mutex<Facts>>);

/// The facts themselves; each `None` until the job learns it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The file read: the source (Encrypt), else the image (Inspect, Decrypt, Verify, Rewrite).
    pub source: Option<FileIdentity>,
    /// The file written: the output (Encrypt, Decrypt, a re-encrypting Rewrite), else a
    /// read-write image (a header-only Rewrite).
    pub output: Option<FileIdentity>,
    /// Fingerprint of the key the job encrypted with (Encrypt, Rewrite's new key).
    pub key_fingerprint: Option<String>,
    /// Fingerprint of the key that opened the image (Decrypt, Verify, Rewrite, an encrypted
    /// qcow2 source).
    pub unlock_key_fingerprint: Option<String>,
    /// The engine that wrote the payload.
    pub engine: Option<EngineKind>,
    /// The most bytes the job reported done (payload copied, hashed or compared).
    pub bytes: u64,
    /// The payload byte a resumed encryption started from (Encrypt into a checkpointed
    /// `OUT.partial`).
    pub resumed_from: Option<u64>,
}

impl AuditFacts {
    fn lock(&self) -> MutexGuard<'_, Facts> {
        // Plain assignments under the lock: a poisoned lock still holds sound facts.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the facts so far.
    pub fn snapshot(&self) -> Facts {
        self.lock().clone()
    }

    /// Records the descriptor taken for `role` (only the roles the record names).
    pub fn took(&self, role: Descriptor, fd: &impl AsFd, read_write: bool) {
        let mut facts = self.lock();
        match role {
            Descriptor::Source => facts.source = FileIdentity::of(fd),
            Descriptor::Output => facts.output = FileIdentity::of(fd),
            Descriptor::Image => {
                if facts.source.is_none() {
                    facts.source = FileIdentity::of(fd);
                }
                if read_write && facts.output.is_none() {
                    facts.output = FileIdentity::of(fd);
                }
            }
            Descriptor::Key | Descriptor::Companion | Descriptor::ResumeHeader => {}
        }
    }

    /// Records the fingerprint of the key the job encrypts with.
    pub fn encryption_key(&self, fingerprint: &str) {
        self.lock().key_fingerprint = Some(fingerprint.to_string());
    }

    /// Records that the job resumed an interrupted encryption at payload byte `from`.
    pub fn resumed_from(&self, from: u64) {
        self.lock().resumed_from = Some(from);
    }

    /// Records the fingerprint of the key that opened the image.
    pub fn unlock_key(&self, fingerprint: &str) {
        self.lock().unlock_key_fingerprint = Some(fingerprint.to_string());
    }

    /// Records the engine, and puts it on the job's span so the job's later records carry
    /// `ENGINE` (recorded once: the journald layer would repeat a field recorded twice).
    pub fn engine(&self, kind: EngineKind) {
        let mut facts = self.lock();
        if facts.engine.is_none() {
            facts.engine = Some(kind);
            tracing::Span::current().record("engine", engine_name(kind));
        }
    }

    /// The engine recorded by [`Self::engine`], if any yet (the registry shows it while the job
    /// runs).
    pub fn engine_chosen(&self) -> Option<EngineKind> {
        self.lock().engine
    }

    /// Notes `bytes_done` of a progress report.
    pub fn progressed(&self, bytes_done: u64) {
        let mut facts = self.lock();
        facts.bytes = facts.bytes.max(bytes_done);
    }
}

/// The engine's wire name.
fn engine_name(kind: EngineKind) -> &'static str {
    match kind {
        EngineKind::Userspace => "userspace",
        EngineKind::Kernel => "kernel",
    }
}

/// How a job ended, as the record's `result` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job finished.
    Succeeded,
    /// The job failed; `error_kind` names the Varlink error.
    Failed,
    /// The job stopped because its client left or the daemon stopped.
    Cancelled,
}

impl Outcome {
    /// The record's `result` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Runs `work` for `job` (method `method`, e.g. "encrypt") in the job's span and emits its audit
/// record with the outcome. See the module documentation.
pub fn audited<P, D>(
    method: &str,
    caller: Caller,
    mut job: Job<P>,
    context: &DaemonContext,
    work: impl FnOnce(Job<P>, &DaemonContext) -> Result<D>,
) -> Result<D> {
    let started = Instant::now();
    let facts = job.reporter.audit().clone();
    job.descriptors.audit_into(facts.clone());
    let (id, uid) = (job.id, job.caller_uid);
    let span = tracing::info_span!(
        "job",
        job_id = id,
        user_uid = uid,
        engine = tracing::field::Empty
    );
    let result = span
        .in_scope(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(job, context))));
    let record = Record {
        method,
        job_id: id,
        uid,
        caller,
        facts: facts.snapshot(),
        duration_ms: super::millis(started.elapsed()),
    };
    match result {
        Ok(Ok(done)) => {
            record.emit(Outcome::Succeeded, None);
            Ok(done)
        }
        Ok(Err(error)) if error.is_cancellation() => {
            record.emit(Outcome::Cancelled, None);
            Err(error)
        }
        Ok(Err(error)) => {
            record.emit(Outcome::Failed, Some(short_error_name(&error)));
            Err(error)
        }
        Err(panic) => {
            record.emit(Outcome::Failed, Some("panic"));
            std::panic::resume_unwind(panic)
        }
    }
}

/// The error's Varlink name without the interface (`WrongKey`).
fn short_error_name(error: &Error) -> &'static str {
    let name = error.varlink_name();
    name.rsplit_once('.').map_or(name, |(_, short)| short)
}

/// One audit record, ready to emit.
struct Record<'a> {
    method: &'a str,
    job_id: u64,
    uid: u32,
    caller: Caller,
    facts: Facts,
    duration_ms: u64,
}

impl Record<'_> {
    /// Emits the record: one event with every fact as a field (absent facts are left out).
    fn emit(&self, outcome: Outcome, error_kind: Option<&str>) {
        let facts = &self.facts;
        let source = facts.source;
        let output = facts.output;
        tracing::info!(
            target: TARGET,
            message_id = MESSAGE_ID,
            job_id = self.job_id,
            user_uid = self.uid,
            user_gid = self.caller.gid,
            user_pid = self.caller.pid,
            method = self.method,
            source_dev = source.map(|s| s.dev),
            source_ino = source.map(|s| s.ino),
            source_size = source.map(|s| s.size),
            source_mtime = source.map(|s| s.mtime),
            source_mtime_nsec = source.map(|s| s.mtime_nsec),
            output_dev = output.map(|o| o.dev),
            output_ino = output.map(|o| o.ino),
            key_fingerprint = facts.key_fingerprint.as_deref(),
            unlock_key_fingerprint = facts.unlock_key_fingerprint.as_deref(),
            engine = facts.engine.map(engine_name),
            bytes = facts.bytes,
            resumed_from = facts.resumed_from,
            result = outcome.name(),
            error_kind,
            duration_ms = self.duration_ms,
            "audit: {} by uid {} {}",
            self.method,
            self.uid,
            outcome.name()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::AtomicBool;

    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;

    use super::*;
    use crate::jobs::{testing, PassedDescriptors, Reporter};

    /// One event seen: its target and its fields (its spans' fields as `span.NAME`).
    type Event = (String, BTreeMap<String, String>);

    /// Every event seen.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<Event>>>);

    struct Fields<'a>(&'a mut BTreeMap<String, String>, &'a str);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            let mut text = String::new();
            write!(text, "{value:?}").unwrap();
            self.0.insert(format!("{}{}", self.1, field.name()), text);
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0
                .insert(format!("{}{}", self.1, field.name()), value.to_string());
        }
    }

    /// Span fields as recorded so far.
    struct SpanFields(BTreeMap<String, String>);

    impl<S: tracing::Subscriber + for<'l> LookupSpan<'l>> tracing_subscriber::Layer<S> for Captured {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            id: &tracing::span::Id,
            ctx: Context<'_, S>,
        ) {
            let mut fields = BTreeMap::new();
            attrs.record(&mut Fields(&mut fields, "span."));
            ctx.span(id)
                .unwrap()
                .extensions_mut()
                .insert(SpanFields(fields));
        }
        fn on_record(
            &self,
            id: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            ctx: Context<'_, S>,
        ) {
            let span = ctx.span(id).unwrap();
            let mut extensions = span.extensions_mut();
            let fields = extensions.get_mut::<SpanFields>().unwrap();
            values.record(&mut Fields(&mut fields.0, "span."));
        }
        fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
            let mut fields = BTreeMap::new();
            for span in ctx.event_scope(event).into_iter().flatten() {
                if let Some(own) = span.extensions().get::<SpanFields>() {
                    fields.extend(own.0.clone());
                }
            }
            event.record(&mut Fields(&mut fields, ""));
            self.0
                .lock()
                .unwrap()
                .push((event.metadata().target().to_string(), fields));
        }
    }

    fn open(path: &std::path::Path, write: bool) -> OwnedFd {
        OwnedFd::from(
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .unwrap(),
        )
    }

    const KEY: &str = "q83vEjRWeJq8zd7wESIzRFVmd4iZqrvM3e7/ABEiM0Q=";

    /// A real encryption (userspace engine) run through [`audited`]: one record with every
    /// field, the job's own records carry the span's fields, and no record holds the key.
    #[test]
    fn one_record_per_job_with_every_field_and_never_the_key() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let source = dir.path().join("disk.raw");
        let bytes: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&source, &bytes).unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, KEY).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let output = dir.path().join("disk.luks.partial");
        std::fs::File::create(&output).unwrap();

        let context = testing::userspace_context();
        let (reporter, _reports) = Reporter::channel();
        let job = Job {
            id: 4242,
            caller_uid: 1234,
            parameters: testing::cheap_encrypt(),
            descriptors: PassedDescriptors::new(vec![
                open(&source, false),
                open(&output, true),
                open(&key, false),
            ]),
            reporter,
            cancel: Arc::new(AtomicBool::new(false)),
            stopping: Arc::default(),
        };
        let caller = Caller {
            gid: 5678,
            pid: Some(91011),
        };

        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(captured.clone());
        let summary = tracing::subscriber::with_default(subscriber, || {
            audited("encrypt", caller, job, &context, super::super::encrypt::run)
        })
        .unwrap();

        let events = captured.0.lock().unwrap().clone();
        let audits: Vec<_> = events.iter().filter(|(t, _)| t == TARGET).collect();
        assert_eq!(audits.len(), 1, "one audit record: {events:#?}");
        let record = &audits[0].1;
        let source_stat = nix::sys::stat::stat(&source).unwrap();
        let output_stat = nix::sys::stat::stat(&output).unwrap();
        let expected = [
            ("message_id", MESSAGE_ID.to_string()),
            ("job_id", "4242".into()),
            ("user_uid", "1234".into()),
            ("user_gid", "5678".into()),
            ("user_pid", "91011".into()),
            ("method", "encrypt".into()),
            ("source_dev", source_stat.st_dev.to_string()),
            ("source_ino", source_stat.st_ino.to_string()),
            ("source_size", (2u64 << 20).to_string()),
            ("source_mtime", source_stat.st_mtime.to_string()),
            ("source_mtime_nsec", source_stat.st_mtime_nsec.to_string()),
            ("output_dev", output_stat.st_dev.to_string()),
            ("output_ino", output_stat.st_ino.to_string()),
            ("key_fingerprint", summary.key_fingerprint.clone()),
            ("engine", "userspace".into()),
            ("bytes", (2u64 << 20).to_string()),
            ("result", "succeeded".into()),
        ];
        for (field, value) in expected {
            assert_eq!(
                record.get(field).map(String::as_str),
                Some(value.as_str()),
                "field {field} of {record:#?}"
            );
        }
        assert!(record.contains_key("duration_ms"), "{record:#?}");
        assert!(!record.contains_key("error_kind"), "{record:#?}");
        assert!(record["message"].contains("encrypt"), "{record:#?}");

        // The job's own records carry the span's job id and uid, and the engine once chosen.
        let encrypted = events
            .iter()
            .find(|(_, fields)| fields.get("message").is_some_and(|m| m == "encrypted"))
            .expect("the job logged `encrypted`");
        assert_eq!(encrypted.1["span.job_id"], "4242");
        assert_eq!(encrypted.1["span.user_uid"], "1234");
        assert_eq!(encrypted.1["span.engine"], "userspace");

        // Never the key, in any field of any record.
        for (_, fields) in &events {
            for value in fields.values() {
                assert!(!value.contains(KEY), "the key in a log record: {fields:#?}");
                assert!(
                    !value.contains(&KEY[..16]),
                    "key bytes in a log record: {fields:#?}"
                );
            }
        }
    }

    /// A failing and a cancelled job each get their record, with the error kind.
    #[test]
    fn failures_and_cancellations_are_recorded() {
        let context = testing::userspace_context();
        let job = || {
            let (reporter, _) = Reporter::channel();
            Job {
                id: 7,
                caller_uid: 1000,
                parameters: (),
                descriptors: PassedDescriptors::new(Vec::new()),
                reporter,
                cancel: Arc::default(),
                stopping: Arc::default(),
            }
        };
        let caller = Caller {
            gid: 1000,
            pid: None,
        };
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(captured.clone());
        tracing::subscriber::with_default(subscriber, || {
            let failed: Result<()> = audited("verify", caller, job(), &context, |_, _| {
                Err(Error::NoKey("no key".into()))
            });
            assert!(failed.is_err());
            let cancelled: Result<()> = audited("decrypt", caller, job(), &context, |_, _| {
                Err(Error::Cancelled)
            });
            assert!(matches!(cancelled, Err(Error::Cancelled)));
        });
        let events = captured.0.lock().unwrap().clone();
        let audits: Vec<_> = events
            .iter()
            .filter(|(t, _)| t == TARGET)
            .map(|(_, f)| f)
            .collect();
        assert_eq!(audits.len(), 2, "{events:#?}");
        assert_eq!(audits[0]["result"], "failed");
        assert_eq!(audits[0]["error_kind"], "NoKey");
        assert_eq!(audits[0]["method"], "verify");
        assert!(!audits[0].contains_key("user_pid"));
        assert!(!audits[0].contains_key("source_ino"));
        assert_eq!(audits[1]["result"], "cancelled");
        assert!(!audits[1].contains_key("error_kind"));
    }
}
