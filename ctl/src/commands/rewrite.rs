//! `imgctl rewrite -k IMAGE [--reencrypt] [--key-file OLD]`: rotate an image to the key ring's
//! `encryption_key`, as gsutil's `rewrite -k` rotates objects to the current key.
//!
//! Header only (default): the daemon unlocks the image with a candidate key, adds a keyslot for
//! the new key and removes the others, in place, through a read-write descriptor.
//!
//! `--reencrypt`: a new volume key and every sector re-encrypted into `IMAGE.reencrypt.partial`
//! beside the image, which replaces the image by rename once the daemon reports it durable. On
//! failure or interruption that file is kept, and the next run resumes it.
//!
//! `--detach` (header-only): the job is handed to the daemon, which rotates the image in place
//! through the descriptor it was given; nothing is renamed, so `imgctl wait ID` only shows the
//! result. A re-encryption is not detached: its new image replaces the image by a rename that
//! only the user's own imgctl does, once the daemon reports it durable.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use imgcrypt_proto::api::{self, KeyRef, RewriteParameters, RewriteReply};
use serde_json::json;

use crate::call;
use crate::commands::encrypt::PbkdfArgs;
use crate::commands::jobs;
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
    /// Hand the (header-only) rotation to the daemon and return, printing its id, as
    /// `encrypt --detach` does; `imgctl wait ID` shows its result. Not with --reencrypt.
    #[arg(long)]
    pub detach: bool,
}

/// What `rewrite` without `-k` is told.
pub const NEEDS_K: &str = "rewrite needs -k (rotate to the key ring's encryption_key)";

/// Runs the command.
pub fn run(args: RewriteArgs, socket: Option<PathBuf>, ring: &RingLocation) -> Result<()> {
    if !args.rotate {
        return Err(CtlError::Usage(NEEDS_K.to_string()));
    }
    if args.detach && args.reencrypt {
        return Err(CtlError::Usage(
            "--detach is for the header-only rotation: a re-encryption's new image replaces the \
             image by a rename imgctl does when the daemon reports it durable; run it without \
             --detach (an interrupted re-encryption resumes where it stopped)"
                .to_string(),
        ));
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
        detach: args.detach.then_some(true),
        // In place: the image is the job's source, and it has no output to rename.
        names: args.detach.then(|| api::JobNames {
            output: None,
            ..jobs::names(&args.image, &args.image)
        }),
    };

    let mut display = Display::new(args.json);
    if !args.reencrypt {
        let image = call::open_read_write(&args.image, "open the image read-write")?;
        if args.detach {
            let fds: Vec<_> = std::iter::once(image.as_fd()).chain(keys.fds()).collect();
            let client = connect::connect(socket.as_deref())?;
            let id = jobs::submit_detached(client, api::REWRITE, &parameters, &fds)?;
            jobs::report_detached_in_place(id, &args.image, args.json, &mut display);
            return Ok(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::reencrypt_partial_path;
    use crate::test_peer::{self, Peer};
    use imgcrypt_proto::api::{errors, RewriteSummary, StreamedReply};
    use imgcrypt_proto::varlink::Reply;
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::path::Path;

    fn args(image: &Path, reencrypt: bool, key_file: Option<PathBuf>) -> RewriteArgs {
        RewriteArgs {
            rotate: true,
            image: image.to_path_buf(),
            reencrypt,
            key_file,
            pbkdf: PbkdfArgs::default(),
            json: false,
            detach: false,
        }
    }

    fn done(reencrypted: bool) -> Reply {
        Reply::ok(RewriteReply::done(RewriteSummary {
            unlocked: test_peer::unlocked(),
            fingerprint: "new=".into(),
            keyslot: 2,
            keyslot_added: true,
            removed: vec![],
            reencrypted,
            resumed_from: None,
            pbkdf_benchmark: None,
            elapsed_ms: 1,
        }))
    }

    fn access_mode(fd: &OwnedFd) -> OFlag {
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
        flags & OFlag::O_ACCMODE
    }

    #[test]
    fn header_only_passes_the_image_read_write_and_the_new_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, new_key, old_key) = test_peer::ring(dir.path());
        let image = dir.path().join("d.luks");
        std::fs::write(&image, "luks").unwrap();
        let expected = [
            test_peer::identity_of(&old_key),
            test_peer::identity_of(&new_key),
        ];
        let peer = Peer::serve(move |_, fds| {
            // Image, then --key-file OLD, then the new key.
            assert_eq!(fds.len(), 3);
            assert_eq!(access_mode(&fds[0]), OFlag::O_RDWR);
            assert_eq!(test_peer::identity(&fds[1]), expected[0]);
            assert_eq!(test_peer::identity(&fds[2]), expected[1]);
            vec![done(false)]
        });
        run(
            args(&image, false, Some(old_key)),
            Some(peer.socket.clone()),
            &ring,
        )
        .unwrap();
        let parameters: RewriteParameters = test_peer::parameters(&peer.call());
        assert_eq!(parameters.reencrypt_output, None);
        assert_eq!(
            parameters.encryption_key,
            Some(KeyRef {
                fd: 2,
                name: "encryption_key".into()
            })
        );
        assert_eq!(parameters.keys.len(), 2);
        assert_eq!(parameters.keys[1].fd, 2);
        assert!(!reencrypt_partial_path(&image).exists());
    }

    #[test]
    fn reencryption_replaces_the_image_only_when_done() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, _, _) = test_peer::ring(dir.path());
        let image = dir.path().join("d.luks");
        std::fs::write(&image, "old image").unwrap();
        let peer = Peer::serve(|_, fds| {
            assert_eq!(access_mode(&fds[0]), OFlag::O_RDONLY);
            assert_eq!(access_mode(&fds[1]), OFlag::O_RDWR);
            let mut new_image = std::fs::File::from(fds.into_iter().nth(1).unwrap());
            new_image.write_all(b"new image").unwrap();
            vec![done(true)]
        });
        run(args(&image, true, None), Some(peer.socket.clone()), &ring).unwrap();
        let parameters: RewriteParameters = test_peer::parameters(&peer.call());
        assert_eq!(parameters.reencrypt_output, Some(1));
        // Ring order: encryption_key (also the new key) then decryption_key1, after fds 0 and 1.
        assert_eq!(parameters.keys[0].fd, 2);
        assert_eq!(parameters.encryption_key.map(|k| k.fd), Some(2));
        assert_eq!(std::fs::read(&image).unwrap(), b"new image");
        assert!(!reencrypt_partial_path(&image).exists());
    }

    #[test]
    fn failed_reencryption_keeps_the_partial_and_the_next_run_resumes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, _, _) = test_peer::ring(dir.path());
        let image = dir.path().join("d.luks");
        std::fs::write(&image, "old image").unwrap();
        let peer = Peer::serve(|_, fds| {
            let mut new_image = std::fs::File::from(fds.into_iter().nth(1).unwrap());
            new_image.write_all(b"half").unwrap();
            vec![test_peer::error_reply(errors::IO_ERROR, "disk full")]
        });
        let error = run(args(&image, true, None), Some(peer.socket.clone()), &ring).unwrap_err();
        peer.call();
        assert!(error.to_string().contains("disk full"), "{error}");
        let partial = reencrypt_partial_path(&image);
        assert_eq!(std::fs::read(&partial).unwrap(), b"half");
        assert_eq!(std::fs::read(&image).unwrap(), b"old image");

        // The rerun hands the daemon the same file, untruncated.
        let peer = Peer::serve(|_, fds| {
            let mut new_image = std::fs::File::from(fds.into_iter().nth(1).unwrap());
            let mut seen = Vec::new();
            new_image.read_to_end(&mut seen).unwrap();
            assert_eq!(seen, b"half");
            new_image.write_all(b" and the rest").unwrap();
            vec![done(true)]
        });
        run(args(&image, true, None), Some(peer.socket.clone()), &ring).unwrap();
        peer.call();
        assert_eq!(std::fs::read(&image).unwrap(), b"half and the rest");
        assert!(!partial.exists());
    }

    #[test]
    fn a_ring_without_encryption_key_is_refused_before_anything_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let ring_path = dir.path().join("keys.toml");
        std::fs::write(&ring_path, "decryption_key1 = \"old.key\"\n").unwrap();
        let image = dir.path().join("d.luks");
        std::fs::write(&image, "old image").unwrap();
        let error = run(
            args(&image, true, None),
            Some(dir.path().join("no-daemon")),
            &RingLocation::Explicit(ring_path),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("has no encryption_key"),
            "{error}"
        );
        assert!(!reencrypt_partial_path(&image).exists());
    }
}
