//! One object's multipart upload from start to finish: [`Upload::begin`] creates or resumes it,
//! [`Upload::send`] uploads the parts of a stream of the image's bytes, [`Upload::complete`]
//! assembles the object and checks its size and ETag, [`Upload::abort`] removes it.
//!
//! imgctl is synchronous; the upload runs on a small tokio runtime (two workers) owned by the
//! [`Upload`]. [`Upload::send`] reads on the caller's thread, cuts parts, hashes them (MD5 for
//! the ETag, SHA-256 for the state; object_store sends its own SHA-256 as
//! `x-amz-checksum-sha256`) and hands them through a channel of one to the async side, which
//! keeps at most [`MAX_IN_FLIGHT`] part uploads running. Memory is bounded by
//! `MAX_IN_FLIGHT + 2` parts (in flight, queued, being read): 80 MiB for images up to
//! 156 GiB, 525 MiB for a 1 TiB image's 105 MiB parts.
//!
//! Error policy: a failure of the server (refused credentials, a missing bucket, a part upload
//! that still fails after object_store's retries) aborts the multipart upload and removes the
//! state, so no stray upload is left to be billed. An interruption (Ctrl-C, SIGTERM, the image
//! stream ending early or failing, imgctl killed) keeps both: the state records exactly the
//! parts the server acknowledged, and the same command resumes, uploading only what is missing.
//! The state is created right after the server created the upload; a kill between the two
//! leaves an upload imgctl does not know about (S3 lifecycle rules clean those up).

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, Checksum};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStoreExt, PutPayload, RetryConfig};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use super::credentials::{self, ProcessEnvironment, Resolved, StoreOptions};
use super::parts::{self, MultipartEtag};
use super::state::{StateDir, StoredPart, UploadState};
use super::url::S3Url;
use crate::error::{CtlError, Result, StoreFailure};

/// Part uploads running at once.
pub const MAX_IN_FLIGHT: usize = 3;

/// How [`Upload::begin`] found the object's upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// No earlier upload: a new one was created.
    New,
    /// An earlier, interrupted upload of the same image continues.
    Resumed {
        /// [`Upload::resume_offset`]: where the stream should start.
        offset: u64,
        /// Parts already stored (some may lie beyond `offset`; they are skipped, not re-sent).
        stored_parts: usize,
    },
    /// An earlier upload of something else (or with other parameters) was aborted and a new
    /// one created.
    Restarted {
        /// Why, for the user.
        why: String,
    },
}

/// The completed object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Uploaded {
    /// Its multipart ETag (`HEX-N`, no quotes), as the server reports it and as sent.
    pub etag: String,
    /// Its size in bytes.
    pub size: u64,
    /// The number of parts.
    pub parts: u64,
    /// The part size in bytes.
    pub part_size: u64,
}

/// What a HEAD of an object reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub size: u64,
    /// ETag without quotes.
    pub etag: String,
}

/// Progress of [`Upload::send`]: `(bytes stored, including parts stored before, image size)`.
pub type SendProgress<'a> = &'a mut dyn FnMut(u64, u64);

/// An S3 connection: the client, its runtime, and where it points.
struct Store {
    runtime: Runtime,
    s3: Arc<AmazonS3>,
    url: S3Url,
    path: ObjectPath,
    endpoint: String,
    credential_source: String,
}

impl Store {
    fn connect(url: &S3Url, resolved: &Resolved, part_size: u64) -> Result<Self> {
        let endpoint = resolved.endpoint_display();
        let credentials = &resolved.credentials;
        // Per request: a part must get through slow links (1 MiB/s), a hung server must not
        // hold us for ever.
        let timeout = Duration::from_secs(60 + part_size / parts::MIB);
        let client = ClientOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(Duration::from_secs(10))
            .with_allow_http(endpoint.starts_with("http://"));
        // A failing server is given up on in seconds (about 8 s of backoff over 5 retries),
        // not object_store's default of up to 3 minutes.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(250),
                max_backoff: Duration::from_secs(4),
                base: 2.0,
            },
            max_retries: 5,
            retry_timeout: Duration::from_secs(60),
        };
        // object_store keeps its own copies of the keys (not zeroed) for the store's lifetime.
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_region(&resolved.region)
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(credentials.secret_access_key.expose())
            .with_checksum_algorithm(Checksum::SHA256)
            .with_client_options(client)
            .with_retry(retry);
        if let Some(token) = &credentials.session_token {
            builder = builder.with_token(token.expose());
        }
        if let Some(custom) = &resolved.endpoint {
            builder = builder.with_endpoint(custom);
        }
        let s3 = builder.build().map_err(|e| {
            CtlError::Usage(format!(
                "cannot set up the S3 client for {url} at {endpoint}: {e}"
            ))
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("imgctl-upload")
            .enable_all()
            .build()
            .map_err(|e| CtlError::Usage(format!("cannot start the upload runtime: {e}")))?;
        Ok(Self {
            runtime,
            s3: Arc::new(s3),
            path: ObjectPath::from(url.key.as_str()),
            url: url.clone(),
            endpoint,
            credential_source: credentials.source.clone(),
        })
    }

    /// Maps an object_store error to imgctl's, saying what to check.
    fn error(&self, operation: &str, part: Option<u32>, error: &object_store::Error) -> CtlError {
        store_error(
            &self.url,
            &self.endpoint,
            &self.credential_source,
            operation,
            part,
            error,
        )
    }

    fn create(&self) -> Result<String> {
        self.runtime
            .block_on(self.s3.create_multipart(&self.path))
            .map_err(|e| self.error("start the multipart upload of", None, &e))
    }

    /// Aborts an upload; one that is already gone counts as aborted.
    fn abort(&self, upload_id: &str) -> Result<()> {
        match self
            .runtime
            .block_on(self.s3.abort_multipart(&self.path, &upload_id.to_string()))
        {
            Ok(()) => Ok(()),
            Err(e) => match self.error("abort the multipart upload of", None, &e) {
                CtlError::Store {
                    kind: StoreFailure::NoUpload | StoreFailure::NoObject,
                    ..
                } => Ok(()),
                other => Err(other),
            },
        }
    }

    fn head(&self) -> Result<ObjectInfo> {
        let meta = self
            .runtime
            .block_on(self.s3.head(&self.path))
            .map_err(|e| self.error("read the size and ETag of", None, &e))?;
        Ok(ObjectInfo {
            size: meta.size,
            etag: meta
                .e_tag
                .as_deref()
                .map(parts::normalize_etag)
                .unwrap_or_default(),
        })
    }
}

/// Classifies an object_store error by the S3 error code in its text (object_store passes
/// the response body on) and its HTTP status.
fn store_error(
    url: &S3Url,
    endpoint: &str,
    credential_source: &str,
    operation: &str,
    part: Option<u32>,
    error: &object_store::Error,
) -> CtlError {
    let text = error.to_string();
    let has = |code: &str| text.contains(code);
    let refused_code = [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
    ]
    .into_iter()
    .find(|code| has(code));
    let (kind, message) = if let Some(code) = refused_code {
        (
            StoreFailure::Refused,
            format!(
                "the credentials from {credential_source} were refused by {endpoint} ({code}): \
                 check the access key id and secret (for IBM COS: the HMAC keys), the profile \
                 and the endpoint"
            ),
        )
    } else if has("NoSuchBucket") {
        (
            StoreFailure::NoBucket,
            format!(
                "bucket {} does not exist at {endpoint}: create it, or check the bucket name, \
                 the endpoint and the region",
                url.bucket
            ),
        )
    } else if has("NoSuchUpload") {
        (
            StoreFailure::NoUpload,
            format!(
                "the multipart upload no longer exists at {endpoint} (aborted elsewhere or \
                 expired): run the command again to start over"
            ),
        )
    } else if has("AccessDenied")
        || matches!(
            error,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        )
    {
        (
            StoreFailure::Refused,
            format!(
                "{endpoint} denied access with the credentials from {credential_source}: check \
                 that the key may write to bucket {} (and the endpoint and region)",
                url.bucket
            ),
        )
    } else if matches!(error, object_store::Error::NotFound { .. }) {
        (
            StoreFailure::NoObject,
            format!("there is no such object at {endpoint}"),
        )
    } else {
        (StoreFailure::Failed, format!("{endpoint}: {text}"))
    };
    CtlError::Store {
        url: url.to_string(),
        operation: operation.to_string(),
        part,
        kind,
        message,
    }
}

/// A multipart upload of one object, with its state file. `Send`: it can be moved to the thread
/// that reads the stream.
pub struct Upload {
    store: Store,
    states: StateDir,
    name: String,
    state: UploadState,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("url", &self.state.url)
            .field("endpoint", &self.state.endpoint)
            .field("upload_id", &self.state.upload_id)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// Creates the multipart upload of an `image_size`-byte image to `url`, or resumes the one
    /// recorded in the state directory when it is of the same `identity` (the caller's hash of
    /// source and parameters), size and part size; otherwise aborts that one and starts anew,
    /// saying why in [`Resume::Restarted`]. Resolves credentials from `options` and the
    /// environment (see [`credentials`]); returns their warnings too.
    pub fn begin(
        url: &S3Url,
        options: &StoreOptions,
        image_size: u64,
        identity: &str,
    ) -> Result<(Self, Resume, Vec<String>)> {
        let part_size = parts::part_size(image_size)?;
        let resolved = credentials::resolve(options, &ProcessEnvironment)?;
        let states = StateDir::from_environment()?;
        let (upload, resume) =
            Self::begin_with(url, &resolved, states, image_size, part_size, identity)?;
        Ok((upload, resume, resolved.warnings))
    }

    /// [`Upload::begin`] with resolved credentials, a state directory and a part size.
    pub fn begin_with(
        url: &S3Url,
        resolved: &Resolved,
        states: StateDir,
        image_size: u64,
        part_size: u64,
        identity: &str,
    ) -> Result<(Self, Resume)> {
        parts::check_part_size(image_size, part_size)?;
        let store = Store::connect(url, resolved, part_size)?;
        let name = StateDir::name(&store.endpoint, &url.bucket, &url.key);
        let previous = states.load(&name)?;
        let why = match &previous {
            None => None,
            Some(old) if old.identity != identity => Some(format!(
                "the image or the parameters changed since the interrupted upload of {url}"
            )),
            Some(old) if old.image_size != image_size => Some(format!(
                "the image is {image_size} bytes, the interrupted upload was of {} bytes",
                old.image_size
            )),
            Some(old) if old.part_size != part_size => Some(format!(
                "the part size is {part_size} bytes, the interrupted upload used {}",
                old.part_size
            )),
            Some(_) => None,
        };
        let mut upload = Self {
            store,
            states,
            name,
            state: UploadState::new(
                url.to_string(),
                String::new(),
                String::new(),
                part_size,
                image_size,
                identity.to_string(),
            ),
        };
        upload.state.endpoint = upload.store.endpoint.clone();
        let resume = match (previous, why) {
            (Some(old), None) => {
                upload.state = old;
                Resume::Resumed {
                    offset: upload.resume_offset(),
                    stored_parts: upload.state.parts.len(),
                }
            }
            (old, why) => {
                if let Some(old) = old {
                    upload.store.abort(&old.upload_id)?;
                    upload.states.remove(&upload.name)?;
                }
                upload.start_new()?;
                match why {
                    Some(why) => Resume::Restarted { why },
                    None => Resume::New,
                }
            }
        };
        // The signal thread prints this on Ctrl-C/SIGTERM/SIGHUP: the state on disk is always
        // consistent (written atomically after each stored part), so nothing needs undoing.
        crate::output::upload_interrupt_message(Some(format!(
            "interrupted; the upload of {url} is kept: run the same command again to resume, \
             or `imgctl upload --abort {url}` to discard it"
        )));
        Ok((upload, resume))
    }

    fn start_new(&mut self) -> Result<()> {
        self.state.upload_id = self.store.create()?;
        self.state.parts.clear();
        self.state.header_sha256 = None;
        self.states.save(&self.name, &self.state)
    }

    /// The endpoint, as shown in messages.
    pub fn endpoint(&self) -> &str {
        &self.store.endpoint
    }

    /// The part size in bytes.
    pub fn part_size(&self) -> u64 {
        self.state.part_size
    }

    /// The end of the contiguous prefix of stored parts: where a resumed stream starts
    /// (0 for a new upload, the image size when every part is stored).
    pub fn resume_offset(&self) -> u64 {
        self.state.contiguous_end()
    }

    /// Saves a streamed encryption's LUKS header beside the state (mode 0600), for the daemon
    /// to resume from, and records its SHA-256 in the state: only that header resumes the parts
    /// stored under it ([`recorded`]). Called before any part of the stream is sent.
    pub fn set_header(&mut self, header: &[u8]) -> Result<()> {
        self.states.save_header(&self.name, header)?;
        self.state.header_sha256 = Some(parts::hex(&Sha256::digest(header)));
        self.states.save(&self.name, &self.state)
    }

    /// Aborts the current multipart upload and starts a new one (e.g. the daemon restarted
    /// the stream because the key changed). `why` is for the caller to show; this returns the
    /// sentence to print.
    pub fn restart(&mut self, why: &str) -> Result<String> {
        let result = self.store.abort(&self.state.upload_id).and_then(|()| {
            self.states.remove(&self.name)?;
            self.start_new()
        });
        self.on_server_error(result)?;
        Ok(format!(
            "restarting the upload of {} from the beginning: {why}",
            self.store.url
        ))
    }

    /// What to tell the user when the upload stops for a reason that keeps it.
    fn resume_advice(&self, what: &str) -> String {
        format!(
            "{what}; the upload of {url} is kept ({stored} parts stored): run the same command \
             again to resume, or `imgctl upload --abort {url}` to discard it",
            url = self.store.url,
            stored = self.state.parts.len()
        )
    }

    /// Applies the error policy to a failed server operation: abort and forget the upload.
    fn on_server_error<T>(&mut self, result: Result<T>) -> Result<T> {
        result.inspect_err(|_| {
            let _ = self.store.abort(&self.state.upload_id);
            let _ = self.states.remove(&self.name);
            crate::output::upload_interrupt_message(None);
        })
    }

    /// Uploads the image from the stream `reader`, which yields bytes `start..image_size` in
    /// order; `start` is a part boundary no further than [`Upload::resume_offset`]. Parts
    /// already stored (with the same SHA-256) are read and skipped, not re-sent; each part
    /// stored is recorded in the state as it completes. `progress` is called as parts are
    /// stored.
    ///
    /// A server failure aborts the upload and removes its state ([`CtlError::Store`]); a
    /// stream that fails or ends early keeps both ([`CtlError::UploadInterrupted`], saying how
    /// to resume).
    pub fn send(
        &mut self,
        reader: &mut dyn Read,
        start: u64,
        progress: SendProgress,
    ) -> Result<()> {
        let size = self.state.image_size;
        let part_size = self.state.part_size;
        // A stream starts at a part boundary, or at the end when every part is stored (the
        // last part may be short).
        if (start % part_size != 0 && start != size) || start > self.resume_offset() {
            return Err(CtlError::Usage(format!(
                "internal: the stream for {} starts at byte {start}, not at a part boundary at \
                 or before byte {} (the end of the stored parts)",
                self.store.url,
                self.resume_offset()
            )));
        }
        let count = parts::part_count(size, part_size);
        let known: HashMap<u32, (u64, String)> = self
            .state
            .parts
            .iter()
            .map(|p| (p.number, (p.size, p.sha256.clone())))
            .collect();
        let stored_bytes = Arc::new(AtomicU64::new(
            self.state.parts.iter().map(|p| p.size).sum(),
        ));
        let mut shown = None;
        let mut report = |progress: &mut dyn FnMut(u64, u64)| {
            let now = stored_bytes.load(Ordering::Relaxed);
            if shown != Some(now) {
                shown = Some(now);
                progress(now, size);
            }
        };
        report(progress);

        let (sender, receiver) = tokio::sync::mpsc::channel::<PartData>(1);
        let consumer = self.store.runtime.spawn(consume(
            self.store.s3.clone(),
            self.store.path.clone(),
            self.state.clone(),
            self.states.clone(),
            self.name.clone(),
            receiver,
            stored_bytes.clone(),
        ));

        let mut stopped: Option<String> = None;
        let first = if start == size && size > 0 {
            count + 1
        } else {
            start / part_size + 1
        };
        for number in first..=count {
            let range = parts::part_range(number, part_size, size);
            let mut data = vec![0u8; (range.end - range.start) as usize];
            match read_full(reader, &mut data) {
                Ok(n) if n == data.len() => {}
                Ok(n) => {
                    stopped = Some(format!(
                        "the image stream ended at byte {} of {size}",
                        range.start + n as u64
                    ));
                    break;
                }
                Err(e) => {
                    stopped = Some(format!(
                        "reading the image failed near byte {}: {e}",
                        range.start
                    ));
                    break;
                }
            }
            let number = number as u32;
            let sha256 = parts::hex(&Sha256::digest(&data));
            if known.get(&number) == Some(&(data.len() as u64, sha256.clone())) {
                continue;
            }
            let part = PartData {
                number,
                md5: parts::md5_of(&data),
                sha256,
                data,
            };
            if sender.blocking_send(part).is_err() {
                // The consumer stopped on an error: it says which below.
                break;
            }
            report(progress);
        }
        drop(sender);
        let (state, result) = self.store.runtime.block_on(consumer).unwrap_or_else(|e| {
            (
                self.state.clone(),
                Err(Failure::State(CtlError::Usage(format!(
                    "internal: the upload task failed: {e}"
                )))),
            )
        });
        self.state = state;
        report(progress);
        match result {
            Err(Failure::Store(number, error)) => {
                let error = self.store.error("upload part of", Some(number), &error);
                self.on_server_error(Err(error))
            }
            Err(Failure::State(error)) => Err(error),
            Ok(()) => match stopped {
                Some(why) => Err(CtlError::UploadInterrupted(self.resume_advice(&why))),
                None => Ok(()),
            },
        }
    }

    /// The stream stopped for a reason of the caller's (the daemon stopped, a Ctrl-C seen by
    /// the caller): keeps the upload and returns the error saying how to resume.
    pub fn interrupted(self, why: &str) -> CtlError {
        CtlError::UploadInterrupted(self.resume_advice(why))
    }

    /// Completes the upload once every part is stored, then HEADs the object and checks its
    /// size and ETag against what was sent; removes the state.
    pub fn complete(mut self) -> Result<Uploaded> {
        let size = self.state.image_size;
        let part_size = self.state.part_size;
        let count = parts::part_count(size, part_size);
        if self.state.parts.len() as u64 != count || self.resume_offset() != size {
            return Err(CtlError::UploadInterrupted(self.resume_advice(&format!(
                "only {} of {count} parts are stored, the upload cannot be completed",
                self.state.parts.len()
            ))));
        }
        let mut expected = MultipartEtag::new();
        for part in &self.state.parts {
            let md5 = parts::md5_from_hex(&part.md5).ok_or_else(|| CtlError::File {
                path: self.states.path().join(&self.name),
                message: format!("part {} has no valid MD5: remove the state", part.number),
            })?;
            expected.add_part_md5(&md5);
        }
        let expected = expected.finish();
        let ids: Vec<PartId> = self
            .state
            .parts
            .iter()
            .map(|p| PartId {
                content_id: p.content_id.clone(),
            })
            .collect();
        let completed = self
            .store
            .runtime
            .block_on(self.store.s3.complete_multipart(
                &self.store.path,
                &self.state.upload_id,
                ids,
            ));
        let completed = completed.map_err(|e| {
            self.store
                .error("complete the multipart upload of", None, &e)
        });
        self.on_server_error(completed)?;
        // The object exists now: nothing to abort any more, whatever the check says.
        crate::output::upload_interrupt_message(None);
        self.states.remove(&self.name)?;
        let object = self.store.head()?;
        if object.size != size || object.etag != expected {
            return Err(CtlError::ObjectDiffers(format!(
                "{} at {} is not what was sent: the server reports {} bytes with ETag {}, imgctl \
                 sent {size} bytes with ETag {expected}; delete the object and upload again",
                self.store.url,
                self.store.endpoint,
                object.size,
                if object.etag.is_empty() {
                    "(none)"
                } else {
                    &object.etag
                },
            )));
        }
        Ok(Uploaded {
            etag: expected,
            size,
            parts: count,
            part_size,
        })
    }

    /// Aborts the multipart upload and removes its state.
    pub fn abort(self) -> Result<()> {
        crate::output::upload_interrupt_message(None);
        self.store.abort(&self.state.upload_id)?;
        self.states.remove(&self.name)
    }
}

/// Aborts the upload of `url` recorded in the state directory (`imgctl upload --abort`);
/// returns its upload id, `None` if no upload is recorded.
pub fn abort_recorded(url: &S3Url, options: &StoreOptions) -> Result<Option<String>> {
    let resolved = credentials::resolve(options, &ProcessEnvironment)?;
    let states = StateDir::from_environment()?;
    let store = Store::connect(url, &resolved, parts::MIN_PART_SIZE)?;
    let name = StateDir::name(&store.endpoint, &url.bucket, &url.key);
    let Some(state) = states.load(&name)? else {
        return Ok(None);
    };
    store.abort(&state.upload_id)?;
    states.remove(&name)?;
    Ok(Some(state.upload_id))
}

/// What the state directory records about an object's interrupted upload.
#[derive(Debug)]
pub struct Recorded {
    /// The identity the upload was begun with.
    pub identity: String,
    /// The image size it was begun with.
    pub image_size: u64,
    /// Its part size.
    pub part_size: u64,
    /// The end of the contiguous prefix of stored parts ([`Upload::resume_offset`]).
    pub resume_offset: u64,
    /// The saved LUKS header of a streamed encryption, open for reading, if there is one and it
    /// is the header the state records (its SHA-256).
    pub header: Option<std::fs::File>,
}

/// Reads what is recorded about `url`'s interrupted upload without sending any request: a
/// streamed encryption uses it to decide, before it calls the daemon, whether to pass the saved
/// header and from which byte (then [`Upload::begin`] with the same identity resumes it).
pub fn recorded(url: &S3Url, options: &StoreOptions) -> Result<Option<Recorded>> {
    let resolved = credentials::resolve(options, &ProcessEnvironment)?;
    let states = StateDir::from_environment()?;
    let name = StateDir::name(&resolved.endpoint_display(), &url.bucket, &url.key);
    let Some(state) = states.load(&name)? else {
        return Ok(None);
    };
    Ok(Some(Recorded {
        resume_offset: state.contiguous_end(),
        header: match (states.open_header(&name)?, &state.header_sha256) {
            (Some(mut file), Some(expected)) => {
                let mut hasher = Sha256::new();
                std::io::copy(&mut file, &mut hasher).map_err(|e| {
                    CtlError::file(states.path().join(&name), "read the saved LUKS header", e)
                })?;
                std::io::Seek::rewind(&mut file).map_err(|e| {
                    CtlError::file(states.path().join(&name), "read the saved LUKS header", e)
                })?;
                (parts::hex(&hasher.finalize()) == *expected).then_some(file)
            }
            _ => None,
        },
        identity: state.identity,
        image_size: state.image_size,
        part_size: state.part_size,
    }))
}

/// HEADs an object: its size and ETag (`imgctl verify --object`).
pub fn head_object(url: &S3Url, options: &StoreOptions) -> Result<ObjectInfo> {
    let resolved = credentials::resolve(options, &ProcessEnvironment)?;
    Store::connect(url, &resolved, parts::MIN_PART_SIZE)?.head()
}

/// One part on its way to the server.
struct PartData {
    number: u32,
    data: Vec<u8>,
    md5: [u8; 16],
    sha256: String,
}

/// What is recorded of a part once its bytes are sent.
struct PartMeta {
    number: u32,
    size: u64,
    md5: [u8; 16],
    sha256: String,
}

/// The part's ETag inside object_store's opaque part id (an XML record of ETag and checksum
/// when checksums are on, the bare ETag otherwise).
fn etag_in(content_id: &str) -> String {
    let inner = content_id
        .split_once("<e_tag>")
        .and_then(|(_, rest)| rest.split_once("</e_tag>"))
        .map_or(content_id, |(etag, _)| etag);
    parts::normalize_etag(&inner.replace("&quot;", "\""))
}

/// Reads until `buffer` is full or the stream ends; the bytes read.
fn read_full(reader: &mut dyn Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Why the consumer stopped.
enum Failure {
    /// A part upload failed (after retries).
    Store(u32, object_store::Error),
    /// The state could not be saved.
    State(CtlError),
}

/// The async side of [`Upload::send`]: uploads parts from `receiver`, at most
/// [`MAX_IN_FLIGHT`] at once, and records each in the state as it is stored. Stops at the
/// first failure (the tasks still running are dropped with the set).
async fn consume(
    s3: Arc<AmazonS3>,
    path: ObjectPath,
    mut state: UploadState,
    states: StateDir,
    name: String,
    mut receiver: tokio::sync::mpsc::Receiver<PartData>,
    stored_bytes: Arc<AtomicU64>,
) -> (UploadState, Result<(), Failure>) {
    type Done = (PartMeta, object_store::Result<PartId>);
    let mut in_flight: JoinSet<Done> = JoinSet::new();
    let mut open = true;
    let upload_id = state.upload_id.clone();
    loop {
        let done = if open && in_flight.len() < MAX_IN_FLIGHT {
            tokio::select! {
                next = receiver.recv() => {
                    match next {
                        Some(part) => {
                            let (s3, path, id) = (s3.clone(), path.clone(), upload_id.clone());
                            in_flight.spawn(async move {
                                let PartData { number, data, md5, sha256 } = part;
                                let size = data.len() as u64;
                                let payload = PutPayload::from(data);
                                let result =
                                    s3.put_part(&path, &id, number as usize - 1, payload).await;
                                (PartMeta { number, size, md5, sha256 }, result)
                            });
                        }
                        None => open = false,
                    }
                    continue;
                }
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => done,
            }
        } else {
            match in_flight.join_next().await {
                Some(done) => done,
                None => break,
            }
        };
        let (part, result) = match done {
            Ok(done) => done,
            Err(e) => {
                return (
                    state,
                    Err(Failure::State(CtlError::Usage(format!(
                        "internal: a part upload task failed: {e}"
                    )))),
                )
            }
        };
        let id = match result {
            Ok(id) => id,
            Err(error) => return (state, Err(Failure::Store(part.number, error))),
        };
        state.record(StoredPart {
            number: part.number,
            size: part.size,
            etag: etag_in(&id.content_id),
            md5: parts::hex(&part.md5),
            sha256: part.sha256,
            content_id: id.content_id,
        });
        if let Err(error) = states.save(&name, &state) {
            return (state, Err(Failure::State(error)));
        }
        stored_bytes.fetch_add(part.size, Ordering::Relaxed);
    }
    (state, Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(body: &str) -> (StoreFailure, String) {
        let url = S3Url::parse("s3://bucket/disk.luks").unwrap();
        let error = object_store::Error::Generic {
            store: "S3",
            source: format!("Server returned non-2xx status code: 403 Forbidden: {body}").into(),
        };
        match store_error(
            &url,
            "https://s3.example",
            "profile cos in ~/.aws/credentials",
            "upload part of",
            Some(7),
            &error,
        ) {
            error @ CtlError::Store { kind, .. } => (kind, error.to_string()),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn an_upload_can_move_to_the_thread_that_reads_the_stream() {
        // `imgctl encrypt --upload` reads the daemon's pipe on one thread and its replies on
        // another.
        fn is_send<T: Send>() {}
        is_send::<Upload>();
    }

    #[test]
    fn server_errors_say_what_to_check() {
        let (kind, message) = classify("<Error><Code>SignatureDoesNotMatch</Code></Error>");
        assert_eq!(kind, StoreFailure::Refused);
        assert!(
            message.starts_with("cannot upload part of s3://bucket/disk.luks (part 7): ")
                && message.contains(
                    "the credentials from profile cos in ~/.aws/credentials were refused by \
                     https://s3.example (SignatureDoesNotMatch): check"
                ),
            "{message}"
        );
        assert_eq!(
            classify("<Code>InvalidAccessKeyId</Code>").0,
            StoreFailure::Refused
        );
        assert_eq!(
            classify("<Code>AccessDenied</Code>").0,
            StoreFailure::Refused
        );
        let (kind, message) = classify("<Code>NoSuchBucket</Code>");
        assert_eq!(kind, StoreFailure::NoBucket);
        assert!(message.contains("bucket bucket does not exist at https://s3.example"));
        assert_eq!(
            classify("<Code>NoSuchUpload</Code>").0,
            StoreFailure::NoUpload
        );
        let (kind, message) = classify("<Code>InternalError</Code>");
        assert_eq!(kind, StoreFailure::Failed);
        assert!(message.contains("InternalError"), "{message}");
    }
}
