//! `imgctl rewrite -k IMAGE [--reencrypt] [--key-file OLD]`: rotate an image to the key ring's
//! `encryption_key`, as gsutil's `rewrite -k` rotates objects to the current key.
//!
//! Header only (default): the daemon unlocks the image with a candidate key, adds a keyslot for
//! the new key and removes the others, in place, through a read-write descriptor.
//!
//! `--reencrypt`: a new volume key and every sector re-encrypted into `IMAGE.reencrypt.partial`
//! beside the image, which replaces the image by rename once the daemon reports it durable. On
//! failure or interruption that file is kept, and the next run resumes it.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use imgcrypt_proto::api::{self, KeyRef, RewriteParameters, RewriteReply};
use serde_json::json;

use crate::call;
use crate::commands::encrypt::PbkdfArgs;
use crate::connect;
use crate::error::{CtlError, Result};
use crate::keyring::{self, RingLocation};
use crate::output::ReencryptOutput;
use crate::progress::{self, Display};

/// Options of `imgctl rewrite`.
#[derive(Debug, clap::Args)]
pub struct RewriteArgs {
    /// Rotate the image to the key ring's encryption_key (gsutil's `rewrite -k`; required).
    #[arg(short = 'k')]
    pub rotate: bool,
    /// The LUKS image.
    pub image: PathBuf,
    /// Also replace the volume key and re-encrypt every sector (resumable): protects against
    /// anyone who kept a copy of the old header and an old key.
    #[arg(long)]
    pub reencrypt: bool,
    /// The image's current key (default: the ring's keys, matched by fingerprint).
    #[arg(long, value_name = "OLD")]
    pub key_file: Option<PathBuf>,
    /// Key derivation of the new keyslot.
    #[command(flatten)]
    pub pbkdf: PbkdfArgs,
    /// Print progress and the summary as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What `rewrite` without `-k` is told.
pub const NEEDS_K: &str = "rewrite needs -k (rotate to the key ring's encryption_key)";

/// Runs the command.
pub fn run(args: RewriteArgs, socket: Option<PathBuf>, ring: &RingLocation) -> Result<()> {
    if !args.rotate {
        return Err(CtlError::Usage(NEEDS_K.to_string()));
    }
    let rotation = keyring::rotation_keys(args.key_file.clone(), ring)?;
    call::warn_all(&rotation.warnings);

    // Descriptors: 0 the image, 1 the new image when re-encrypting, then the keys, each file
    // once; the new key's reference points at its candidate's descriptor.
    let first_key_fd = if args.reencrypt { 2 } else { 1 };
    let (keys, open_warnings) =
        call::open_keys(&rotation.candidates, first_key_fd, |name, path| {
            name == keyring::KEY_FILE_NAME || rotation.new_key.as_deref() == Some(path)
        })?;
    call::warn_all(&open_warnings);
    let encryption_key = rotation.new_key.as_deref().map(|path| KeyRef {
        fd: keys
            .ref_for(path)
            .expect("the new key is a required candidate, so it was opened")
            .fd,
        name: "encryption_key".to_string(),
    });
    let parameters = RewriteParameters {
        image: 0,
        keys: keys.refs.clone(),
        encryption_key,
        reencrypt_output: args.reencrypt.then_some(1),
        pbkdf: args.pbkdf.to_protocol(),
    };

    let mut display = Display::new(args.json);
    if !args.reencrypt {
        let image = call::open_read_write(&args.image, "open the image read-write")?;
        let summary = rewrite(socket, &parameters, &image, None, &keys, &mut display)?;
        return finish(&args, &summary, &mut display);
    }

    let image = call::open_read_only(&args.image, "open the image")?;
    let output = ReencryptOutput::open(&args.image)?;
    if output.resumed() {
        display.info(&format!(
            "resuming the re-encryption in {}",
            output.path().display()
        ));
    }
    match rewrite(
        socket,
        &parameters,
        &image,
        Some(output.file()),
        &keys,
        &mut display,
    ) {
        Ok(summary) => {
            drop(image);
            output.commit()?;
            finish(&args, &summary, &mut display)
        }
        Err(error) => {
            if let Some(note) = output.abandon() {
                eprintln!("imgctl: {note}");
            }
            Err(error)
        }
    }
}

fn rewrite(
    socket: Option<PathBuf>,
    parameters: &RewriteParameters,
    image: &File,
    new_image: Option<&File>,
    keys: &call::OpenedKeys,
    display: &mut Display,
) -> Result<api::RewriteSummary> {
    let fds: Vec<_> = std::iter::once(image.as_fd())
        .chain(new_image.map(|file| file.as_fd()))
        .chain(keys.fds())
        .collect();
    let mut client = connect::connect(socket.as_deref())?;
    call::run_job::<RewriteReply>(&mut client, api::REWRITE, parameters, &fds, display)
}

fn finish(args: &RewriteArgs, summary: &api::RewriteSummary, display: &mut Display) -> Result<()> {
    display.finish(
        json!({
            "event": "summary",
            "image": args.image,
            "summary": summary,
        }),
        &progress::render_rewrite(&args.image, summary),
    );
    Ok(())
}
