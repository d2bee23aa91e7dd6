//! What every command that calls the daemon shares: opening files for it with the user's own
//! rights, passing key files as descriptors, and running one call to its end.
//!
//! Key files are only opened here, never read: the daemon reads, checks and hashes them, so key
//! bytes never pass through imgctl's memory.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use imgcrypt_proto::api::{self, KeyRef, Progress, StreamedReply};
use imgcrypt_proto::varlink::{self, Call, Reply};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::Client;
use crate::companions::NeedFile;
use crate::error::{CtlError, Result};
use crate::keyring::{self, Candidate, RingLocation};
use crate::progress::Display;

/// Opens `path` read-only; `action` says what for in the error ("open the source image").
pub fn open_read_only(path: &Path, action: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| CtlError::file(path, action, e))
}

/// Opens an existing `path` read-write, never creating or truncating it.
pub fn open_read_write(path: &Path, action: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| CtlError::file(path, action, e))
}

/// Key files opened for a call, with the references the parameters carry.
pub struct OpenedKeys {
    files: Vec<File>,
    paths: Vec<PathBuf>,
    /// One per opened file; `fd` counts from the `first_fd` given to [`open_keys`].
    pub refs: Vec<KeyRef>,
}

impl OpenedKeys {
    /// The descriptors, in the order of [`Self::refs`].
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.files.iter().map(|file| file.as_fd())
    }

    /// The reference of the key file at `path`, if it was opened.
    pub fn ref_for(&self, path: &Path) -> Option<&KeyRef> {
        self.paths
            .iter()
            .position(|opened| opened == path)
            .map(|index| &self.refs[index])
    }
}

/// Opens each candidate key file read-only, to be passed after `first_fd` other descriptors.
/// A key `required` says must open (`--key-file`, a rotation's new key) stops the command if it
/// cannot; any other ring key that cannot be opened is skipped with a warning, since one lost
/// old key must not lock the user out of images the others open.
pub fn open_keys(
    candidates: &[Candidate],
    first_fd: u32,
    required: impl Fn(&str, &Path) -> bool,
) -> Result<(OpenedKeys, Vec<String>)> {
    let mut opened = OpenedKeys {
        files: Vec::new(),
        paths: Vec::new(),
        refs: Vec::new(),
    };
    let mut warnings = Vec::new();
    for (name, path) in candidates {
        match open_read_only(path, &format!("open the key file ({name})")) {
            Ok(file) => {
                let fd = first_fd + opened.files.len() as u32;
                opened.files.push(file);
                opened.paths.push(path.clone());
                opened.refs.push(KeyRef {
                    fd,
                    name: name.clone(),
                });
            }
            Err(error) if !required(name, path) => {
                warnings.push(format!("{error}; {name} is not tried"));
            }
            Err(error) => return Err(error),
        }
    }
    Ok((opened, warnings))
}

/// The candidate keys of a command that unlocks (or inspects) an image, opened to be passed
/// after `first_fd` other descriptors; the ring's and the opening's warnings are shown.
/// `--key-file` must open; a ring key that cannot is skipped.
pub fn open_unlock_keys(
    key_file: Option<PathBuf>,
    ring: &RingLocation,
    first_fd: u32,
) -> Result<OpenedKeys> {
    let (candidates, ring_warnings) = keyring::unlock_candidates(key_file, ring)?;
    warn_all(&ring_warnings);
    let (keys, open_warnings) = open_keys(&candidates, first_fd, |name, _| {
        name == keyring::KEY_FILE_NAME
    })?;
    warn_all(&open_warnings);
    Ok(keys)
}

/// Prints warnings the way every command does.
pub fn warn_all(warnings: &[String]) {
    for warning in warnings {
        eprintln!("imgctl: warning: {warning}");
    }
}

/// Runs a call that answers once (Inspect).
pub fn call_once<T: DeserializeOwned>(
    client: &mut Client,
    method: &str,
    parameters: &impl Serialize,
    fds: &[BorrowedFd<'_>],
) -> Result<T> {
    client.send(&new_call(method, parameters, false), fds)?;
    let reply = client.receive()?;
    if let Some(error) = daemon_error(&reply) {
        return Err(error);
    }
    serde_json::from_value(reply.parameters.unwrap_or_default())
        .map_err(|e| CtlError::Protocol(format!("malformed {method} reply: {e}")))
}

/// Runs a job: sends `method` with `fds`, shows its progress and notices on `display`, and
/// returns its result. A daemon error is shown and returned as [`CtlError::Daemon`] with the
/// daemon's own message (for `WrongKey` it names the fingerprints tried and carried).
pub fn run_job<R>(
    client: &mut Client,
    method: &str,
    parameters: &impl Serialize,
    fds: &[BorrowedFd<'_>],
    display: &mut Display,
) -> Result<R::Done>
where
    R: StreamedReply + DeserializeOwned,
    R::Done: DeserializeOwned + Clone,
{
    start_job(client, method, parameters, fds)?;
    follow_job::<R>(client, method, display)
}

/// Sends the call of a job (with "more": its progress follows); [`follow_job`] reads the rest.
/// Split from [`run_job`] for a caller that must close its copies of descriptors once they are
/// passed (a pipe's write end, whose reader waits for every copy to close).
pub fn start_job(
    client: &mut Client,
    method: &str,
    parameters: &impl Serialize,
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    client.send(&new_call(method, parameters, true), fds)
}

/// What shows a job's progress while it runs: a [`Display`], or a caller's view of one.
pub trait JobView {
    /// A progress report.
    fn progress(&mut self, progress: &Progress);
    /// A notice from the daemon.
    fn notice(&mut self, text: &str);
    /// The job failed: `name` is the daemon's error name.
    fn error(&mut self, name: Option<&str>, message: &str);
}

impl JobView for Display {
    fn progress(&mut self, progress: &Progress) {
        Display::progress(self, progress)
    }
    fn notice(&mut self, text: &str) {
        Display::notice(self, text)
    }
    fn error(&mut self, name: Option<&str>, message: &str) {
        Display::error(self, name, message)
    }
}

/// Reads a started job's replies to its end (see [`run_job`]).
pub fn follow_job<R>(
    client: &mut Client,
    method: &str,
    display: &mut dyn JobView,
) -> Result<R::Done>
where
    R: StreamedReply + DeserializeOwned,
    R::Done: DeserializeOwned + Clone,
{
    loop {
        let reply = receive_shown(client, display)?;
        match event::<R>(method, reply.parameters.unwrap_or_default())? {
            Event::Progress(progress) => display.progress(&progress),
            Event::Notice(text) => display.notice(&text),
            Event::Done(done) => return Ok(done),
        }
        if !reply.continues {
            return Err(CtlError::Protocol(format!(
                "the daemon ended {method} without a result"
            )));
        }
    }
}

/// Re-attaches to job `id` (`Wait`): shows its progress and notices on `display` like
/// [`run_job`] and returns the job's own final reply, whichever call it was.
pub fn wait_job(client: &mut Client, id: u64, display: &mut Display) -> Result<api::WaitReply> {
    let method = api::WAIT;
    client.send(&new_call(method, &api::JobId { id }, true), &[])?;
    loop {
        let reply = receive_shown(client, display)?;
        let parameters = reply.parameters.unwrap_or_default();
        if !reply.continues {
            return serde_json::from_value(parameters)
                .map_err(|e| CtlError::Protocol(format!("malformed {method} reply: {e}")));
        }
        match event::<api::EncryptReply>(method, parameters)? {
            Event::Progress(progress) => display.progress(&progress),
            Event::Notice(text) => display.notice(&text),
            Event::Done(_) => {
                return Err(CtlError::Protocol(format!(
                    "the daemon sent {method}'s result in a partial reply"
                )))
            }
        }
    }
}

/// The next reply of a job's stream; a daemon error is shown on `display` and returned.
fn receive_shown(client: &mut Client, display: &mut dyn JobView) -> Result<Reply> {
    let reply = client.receive()?;
    match daemon_error(&reply) {
        Some(error) => {
            if let CtlError::Daemon { name, message } = &error {
                display.error(Some(name), message);
            }
            Err(error)
        }
        None => Ok(reply),
    }
}

fn new_call(method: &str, parameters: &impl Serialize, more: bool) -> Call {
    Call {
        method: method.to_string(),
        parameters: Some(serde_json::to_value(parameters).expect("parameters serialise")),
        more,
        oneway: false,
        upgrade: false,
    }
}

/// The daemon's error, if the reply is one. io.imgcrypt errors carry a message for people;
/// Varlink's own (org.varlink.service.*) carry only data, so those are described here.
fn daemon_error(reply: &Reply) -> Option<CtlError> {
    let name = reply.error.clone()?;
    let parameters = reply.parameters.as_ref();
    let message = match parameters
        .and_then(|p| p.get("message"))
        .and_then(|m| m.as_str())
    {
        Some(message) => message.to_string(),
        None if name == varlink::errors::METHOD_NOT_FOUND => format!(
            "imgcryptd does not know {}: it is older than imgctl; update or restart it",
            parameters
                .and_then(|p| p.get("method"))
                .and_then(|m| m.as_str())
                .unwrap_or("this method")
        ),
        None => format!(
            "imgcryptd answered {name} {}",
            parameters.map_or_else(|| "{}".to_string(), |p| p.to_string())
        ),
    };
    if name == api::errors::NEED_FILE {
        let field = |key: &str| parameters.and_then(|p| p.get(key));
        let candidates =
            field("candidates").and_then(|c| serde_json::from_value::<Vec<String>>(c.clone()).ok());
        let referenced_by = field("referenced_by")
            .and_then(|r| r.as_u64())
            .and_then(|r| u32::try_from(r).ok());
        if let (Some(candidates), Some(referenced_by)) = (candidates, referenced_by) {
            return Some(CtlError::NeedFile(NeedFile {
                message,
                referenced_by,
                relation: field("relation")
                    .and_then(|r| r.as_str())
                    .unwrap_or("file")
                    .to_string(),
                candidates,
            }));
        }
    }
    Some(CtlError::Daemon { name, message })
}

/// One reply of a job, by the one field it sets.
#[derive(Debug, PartialEq)]
enum Event<D> {
    Progress(Progress),
    Notice(String),
    Done(D),
}

/// Splits a reply of type `R`. Every streamed reply sets exactly one field: `progress`, `notice`,
/// or the result, whose name differs per method (`summary`, `decrypted`, …) and is checked by
/// building `R`'s own final reply from the result.
fn event<R>(method: &str, parameters: serde_json::Value) -> Result<Event<R::Done>>
where
    R: StreamedReply + DeserializeOwned,
    R::Done: DeserializeOwned + Clone,
{
    let malformed = |what: String| CtlError::Protocol(format!("malformed {method} reply: {what}"));
    serde_json::from_value::<R>(parameters.clone()).map_err(|e| malformed(e.to_string()))?;
    let serde_json::Value::Object(fields) = parameters else {
        return Err(malformed("not an object".to_string()));
    };
    if fields.len() != 1 {
        let names: Vec<&String> = fields.keys().collect();
        return Err(malformed(format!(
            "it must set exactly one field, not {names:?}"
        )));
    }
    let (name, value) = fields.into_iter().next().expect("one field");
    let parse_error = |e: serde_json::Error| malformed(format!("{name}: {e}"));
    match name.as_str() {
        "progress" => Ok(Event::Progress(
            serde_json::from_value(value).map_err(parse_error)?,
        )),
        "notice" => Ok(Event::Notice(
            serde_json::from_value(value).map_err(parse_error)?,
        )),
        _ => {
            let done: R::Done = serde_json::from_value(value).map_err(parse_error)?;
            let own_field = serde_json::to_value(R::done(done.clone()))
                .ok()
                .is_some_and(|own| own.get(&name).is_some());
            if !own_field {
                return Err(malformed(format!("unexpected field {name}")));
            }
            Ok(Event::Done(done))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcrypt_proto::api::{
        DecryptReply, DecryptSummary, EncryptReply, Phase, UnlockMethod, Unlocked,
    };

    fn decrypted() -> DecryptSummary {
        DecryptSummary {
            unlocked: Unlocked {
                key_name: "decryption_key2".into(),
                fingerprint: "fp=".into(),
                keyslot: 1,
                method: UnlockMethod::Token,
                attempts: 1,
            },
            payload_size: 1 << 20,
            elapsed_ms: 5,
            copy_ms: 3,
        }
    }

    fn wire<R: Serialize>(reply: R) -> serde_json::Value {
        serde_json::to_value(reply).unwrap()
    }

    #[test]
    fn replies_split_into_their_one_field() {
        let progress = Progress {
            phase: Phase::Unlock,
            bytes_done: 1,
            bytes_total: 2,
            queue_position: None,
        };
        assert_eq!(
            event::<DecryptReply>("D", wire(DecryptReply::progress(progress))).unwrap(),
            Event::Progress(progress)
        );
        assert_eq!(
            event::<DecryptReply>("D", wire(DecryptReply::notice("trial".into()))).unwrap(),
            Event::Notice("trial".into())
        );
        assert_eq!(
            event::<DecryptReply>("D", wire(DecryptReply::done(decrypted()))).unwrap(),
            Event::Done(decrypted())
        );
    }

    #[test]
    fn another_methods_result_is_not_taken_for_ours() {
        // A Decrypt result sent where an Encrypt reply is expected.
        let error = event::<EncryptReply>("E", wire(DecryptReply::done(decrypted())))
            .unwrap_err()
            .to_string();
        assert!(error.contains("malformed E reply"), "{error}");
    }

    #[test]
    fn empty_and_double_replies_are_protocol_errors() {
        let error = event::<DecryptReply>("D", serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("exactly one field"), "{error}");
        let mut both = wire(DecryptReply::done(decrypted()));
        both["notice"] = "x".into();
        assert!(event::<DecryptReply>("D", both).is_err());
    }

    #[test]
    fn daemon_errors_keep_name_and_message() {
        let reply: Reply = serde_json::from_value(serde_json::json!({
            "error": "io.imgcrypt.WrongKey",
            "parameters": {"message": "tried sha256:a=, image carries sha256:b=",
                           "tried": ["a="], "carried": ["b="]}
        }))
        .unwrap();
        match daemon_error(&reply) {
            Some(CtlError::Daemon { name, message }) => {
                assert_eq!(name, "io.imgcrypt.WrongKey");
                assert_eq!(message, "tried sha256:a=, image carries sha256:b=");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn varlink_errors_without_a_message_are_described() {
        let reply: Reply = serde_json::from_value(serde_json::json!({
            "error": "org.varlink.service.MethodNotFound",
            "parameters": {"method": "io.imgcrypt.Inspect"}
        }))
        .unwrap();
        let message = daemon_error(&reply).unwrap().to_string();
        assert!(
            message.contains("does not know io.imgcrypt.Inspect") && message.contains("older"),
            "{message}"
        );
        let reply: Reply = serde_json::from_value(serde_json::json!({
            "error": "org.varlink.service.InvalidParameter",
            "parameters": {"parameter": "keys"}
        }))
        .unwrap();
        let message = daemon_error(&reply).unwrap().to_string();
        assert!(
            message.contains("InvalidParameter") && message.contains("\"keys\""),
            "{message}"
        );
    }

    #[test]
    fn unopenable_ring_keys_are_skipped_but_required_ones_stop() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("present.key");
        std::fs::write(&present, "x").unwrap();
        let missing = dir.path().join("missing.key");
        let candidates = vec![
            ("decryption_key1".to_string(), missing.clone()),
            ("decryption_key2".to_string(), present.clone()),
        ];
        let (opened, warnings) = open_keys(&candidates, 2, |_, _| false).unwrap();
        assert_eq!(
            opened.refs,
            vec![KeyRef {
                fd: 2,
                name: "decryption_key2".into()
            }]
        );
        assert_eq!(opened.fds().count(), 1);
        assert_eq!(opened.ref_for(&present).map(|r| r.fd), Some(2));
        assert!(opened.ref_for(&missing).is_none());
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("decryption_key1 is not tried"),
            "{warnings:?}"
        );

        let error = open_keys(&candidates, 0, |name, _| name == "decryption_key1")
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("missing.key"), "{error}");
    }

    #[test]
    fn read_write_open_never_creates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent");
        assert!(open_read_write(&path, "open the image").is_err());
        assert!(!path.exists());
        std::fs::write(&path, b"keep").unwrap();
        drop(open_read_write(&path, "open the image").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }
}
