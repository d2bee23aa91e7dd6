//! `imgctl upload FILE s3://BUCKET/KEY [--endpoint URL] [--region R] [--profile P] [--json]`:
//! uploads an existing local image (any format) as a resumable multipart upload; and
//! `imgctl upload --abort s3://BUCKET/KEY`: aborts the upload recorded for that object.
//!
//! The daemon is not involved: the file is read by imgctl and sent with the user's
//! credentials (see [`crate::upload`]). The upload's identity is the file's device, inode,
//! size, mtime and ctime, so running the same command after an interruption resumes it, and a
//! changed file restarts it, saying why.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::call;
use crate::error::{CtlError, Result};
use crate::progress::{self, Display};
use crate::upload::{self, Resume, S3Url, StoreOptions, Upload};

/// Options of `imgctl upload`.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// FILE s3://BUCKET/KEY: the image and the object; with --abort only s3://BUCKET/KEY.
    #[arg(value_name = "FILE URL", num_args = 1..=2, required = true)]
    pub targets: Vec<PathBuf>,
    /// Abort the interrupted upload recorded for s3://BUCKET/KEY (and forget its state).
    #[arg(long)]
    pub abort: bool,
    #[command(flatten)]
    pub store: StoreOptions,
    /// Print progress and the summary as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(args: UploadArgs) -> Result<()> {
    let mut display = Display::new(args.json);
    let result = if args.abort {
        abort(&args, &mut display)
    } else {
        upload(&args, &mut display)
    };
    if let Err(error) = &result {
        display.error(None, &error.to_string());
    }
    result
}

fn url_argument(path: &Path) -> Result<S3Url> {
    let text = path
        .to_str()
        .ok_or_else(|| CtlError::Usage(format!("{} is not an s3:// URL", path.display())))?;
    S3Url::parse(text)
}

fn abort(args: &UploadArgs, display: &mut Display) -> Result<()> {
    let [target] = args.targets.as_slice() else {
        return Err(CtlError::Usage(
            "`imgctl upload --abort` takes only the object: imgctl upload --abort s3://BUCKET/KEY"
                .into(),
        ));
    };
    let url = url_argument(target)?;
    let text = match upload::abort_recorded(&url, &args.store)? {
        Some(id) => format!("aborted the multipart upload of {url} (upload id {id})\n"),
        None => format!(
            "no interrupted upload of {url} is recorded here: nothing to abort (an upload \
             started elsewhere is listed by `aws s3api list-multipart-uploads`)\n"
        ),
    };
    display.finish(
        json!({
            "event": "summary",
            "url": url.to_string(),
            "aborted": !text.starts_with("no "),
            "message": text.trim_end(),
        }),
        &text,
    );
    Ok(())
}

/// The identity of a local file for resuming: the same file, unchanged since.
pub fn file_identity(metadata: &std::fs::Metadata, size: u64) -> String {
    let text = format!(
        "imgctl upload FILE v1\\0dev={} ino={} size={size} mtime={}.{} ctime={}.{}",
        metadata.dev(),
        metadata.ino(),
        metadata.mtime(),
        metadata.mtime_nsec(),
        metadata.ctime(),
        metadata.ctime_nsec()
    );
    upload::parts::hex(&Sha256::digest(text.as_bytes()))
}

/// Opens an image file and measures it (block devices too, whose metadata says 0 bytes).
pub fn open_image(path: &Path) -> Result<(File, std::fs::Metadata, u64)> {
    let mut file = call::open_read_only(path, "open the image")?;
    let metadata = file
        .metadata()
        .map_err(|e| CtlError::file(path, "read the image's metadata", e))?;
    if metadata.is_dir() {
        return Err(CtlError::File {
            path: path.into(),
            message: "is a directory, not an image".into(),
        });
    }
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| CtlError::file(path, "measure the image", e))?;
    Ok((file, metadata, size))
}

fn upload(args: &UploadArgs, display: &mut Display) -> Result<()> {
    let [file_path, target] = args.targets.as_slice() else {
        return Err(CtlError::Usage(
            "imgctl upload needs the image and the object: imgctl upload FILE s3://BUCKET/KEY \
             (or --abort s3://BUCKET/KEY)"
                .into(),
        ));
    };
    let url = url_argument(target)?;
    let started = Instant::now();
    let (mut file, metadata, size) = open_image(file_path)?;
    let identity = file_identity(&metadata, size);
    let (mut upload, resume, warnings) = Upload::begin(&url, &args.store, size, &identity)?;
    for warning in &warnings {
        display.notice(warning);
    }
    match &resume {
        Resume::New => {}
        Resume::Resumed {
            offset,
            stored_parts,
        } => display.info(&format!(
            "resuming the upload of {url}: {stored_parts} parts already stored, continuing \
             from byte {offset}"
        )),
        Resume::Restarted { why } => display.info(&format!(
            "aborted the interrupted upload of {url} and starting over: {why}"
        )),
    }
    let start = upload.resume_offset();
    file.seek(SeekFrom::Start(start))
        .map_err(|e| CtlError::file(file_path, "read the image", e))?;
    upload.send(&mut file, start, &mut |done, total| {
        display.transfer("uploading", done, total)
    })?;
    let endpoint = upload.endpoint().to_string();
    let uploaded = upload.complete()?;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    display.finish(
        json!({
            "event": "summary",
            "file": file_path,
            "url": url.to_string(),
            "endpoint": endpoint,
            "size": uploaded.size,
            "etag": uploaded.etag,
            "parts": uploaded.parts,
            "part_size": uploaded.part_size,
            "resumed": matches!(resume, Resume::Resumed { .. }),
            "elapsed_ms": elapsed_ms,
        }),
        &progress::render_upload(
            file_path,
            &url.to_string(),
            &endpoint,
            &uploaded,
            elapsed_ms,
        ),
    );
    Ok(())
}
