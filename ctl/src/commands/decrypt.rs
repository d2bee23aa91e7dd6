//! `imgctl decrypt IMAGE -o RAW [--key-file K] [--force] [--json]`: the plaintext disk of a LUKS
//! image, written by the daemon through a passed descriptor to `RAW.partial` and renamed to `RAW`
//! only once the daemon reports it durable (the same output handling as `encrypt`).

use std::os::fd::AsFd;
use std::path::PathBuf;

use imgcrypt_proto::api::{self, DecryptParameters, DecryptReply};
use serde_json::json;

use crate::call;
use crate::commands::jobs;
use crate::connect;
use crate::error::Result;
use crate::keyring::RingLocation;
use crate::output::Output;
use crate::progress::{self, Display};

/// Options of `imgctl decrypt`.
#[derive(Debug, clap::Args)]
pub struct DecryptArgs {
    /// The LUKS image (file or block device).
    pub image: PathBuf,
    /// Where to write the plaintext disk (RAW).
    #[arg(short = 'o', long = "output", value_name = "RAW")]
    pub output: PathBuf,
    /// The key file that opens the image (default: the ring's keys, matched by fingerprint).
    #[arg(long, value_name = "KEY")]
    pub key_file: Option<PathBuf>,
    /// Replace RAW (or a stale RAW.partial) if it exists; required to write to a block device.
    #[arg(long)]
    pub force: bool,
    /// Print progress and the summary as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    /// Hand the job to the daemon and return, printing its id, as `encrypt --detach` does:
    /// `imgctl wait ID` renames RAW.partial to RAW once it succeeded.
    #[arg(long)]
    pub detach: bool,
}

/// Runs the command.
pub fn run(args: DecryptArgs, socket: Option<PathBuf>, ring: &RingLocation) -> Result<()> {
    // Descriptors: 0 the image, 1 the output, then the keys. Everything that can fail is
    // opened before the output is created, so a typo leaves no partial file behind.
    let image = call::open_read_only(&args.image, "open the image")?;
    let keys = call::open_unlock_keys(args.key_file, ring, 2)?;
    let mut display = Display::new(args.json);
    let output = Output::create(&args.output, args.force)?;
    let fds: Vec<_> = [image.as_fd(), output.file().as_fd()]
        .into_iter()
        .chain(keys.fds())
        .collect();

    let mut client = connect::connect(socket.as_deref())?;
    let parameters = DecryptParameters {
        image: 0,
        output: 1,
        keys: keys.refs.clone(),
        detach: args.detach.then_some(true),
        names: Some(jobs::names(&args.image, &args.output)),
    };
    if args.detach {
        let id = jobs::submit_detached(client, api::DECRYPT, &parameters, &fds)?;
        drop(fds);
        output.leave_to_detached_job();
        jobs::report_detached(id, &args.output, args.json, &mut display);
        return Ok(());
    }
    let summary =
        call::run_job::<DecryptReply>(&mut client, api::DECRYPT, &parameters, &fds, &mut display)?;
    drop(fds);
    let final_path = output.commit()?;
    display.finish(
        json!({
            "event": "summary",
            "image": args.image,
            "output": final_path,
            "summary": summary,
        }),
        &progress::render_decrypt(&args.image, &final_path, &summary),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CtlError;
    use crate::test_peer::{self, Peer};
    use imgcrypt_proto::api::{errors, DecryptSummary, KeyRef, Phase, Progress, StreamedReply};
    use imgcrypt_proto::varlink::Reply;
    use std::io::Write;

    fn args(dir: &std::path::Path) -> DecryptArgs {
        DecryptArgs {
            image: dir.join("d.luks"),
            output: dir.join("d.raw"),
            key_file: None,
            force: false,
            json: false,
            detach: false,
        }
    }

    #[test]
    fn passes_image_output_and_ring_keys_and_renames_when_done() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, new_key, old_key) = test_peer::ring(dir.path());
        std::fs::write(dir.path().join("d.luks"), "luks").unwrap();
        let expected = [
            test_peer::identity_of(&dir.path().join("d.luks")),
            test_peer::identity_of(&new_key),
            test_peer::identity_of(&old_key),
        ];
        let peer = Peer::serve(move |_, fds| {
            assert_eq!(fds.len(), 4);
            assert_eq!(test_peer::identity(&fds[0]), expected[0]);
            assert_eq!(test_peer::identity(&fds[2]), expected[1]);
            assert_eq!(test_peer::identity(&fds[3]), expected[2]);
            std::fs::File::from(fds.into_iter().nth(1).unwrap())
                .write_all(b"plaintext")
                .unwrap();
            vec![
                Reply::partial(DecryptReply::progress(Progress {
                    phase: Phase::Copy,
                    bytes_done: 1,
                    bytes_total: 9,
                    queue_position: None,
                })),
                Reply::partial(DecryptReply::notice("a notice".into())),
                Reply::ok(DecryptReply::done(DecryptSummary {
                    unlocked: test_peer::unlocked(),
                    payload_size: 9,
                    elapsed_ms: 1,
                    copy_ms: 1,
                })),
            ]
        });
        run(args(dir.path()), Some(peer.socket.clone()), &ring).unwrap();
        let parameters: DecryptParameters = test_peer::parameters(&peer.call());
        assert_eq!((parameters.image, parameters.output), (0, 1));
        assert_eq!(
            parameters.keys,
            vec![
                KeyRef {
                    fd: 2,
                    name: "encryption_key".into()
                },
                KeyRef {
                    fd: 3,
                    name: "decryption_key1".into()
                }
            ]
        );
        assert_eq!(
            std::fs::read(dir.path().join("d.raw")).unwrap(),
            b"plaintext"
        );
        assert!(!dir.path().join("d.raw.partial").exists());
    }

    #[test]
    fn wrong_key_leaves_no_output_and_keeps_the_daemons_message() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, _, _) = test_peer::ring(dir.path());
        std::fs::write(dir.path().join("d.luks"), "luks").unwrap();
        let peer = Peer::serve(|_, _| {
            vec![test_peer::error_reply(
                errors::WRONG_KEY,
                "no key opens d.luks: tried sha256:a=, the image carries sha256:b=",
            )]
        });
        let error = run(args(dir.path()), Some(peer.socket.clone()), &ring).unwrap_err();
        peer.call();
        match &error {
            CtlError::Daemon { name, .. } => assert_eq!(name, errors::WRONG_KEY),
            other => panic!("{other:?}"),
        }
        assert!(error.to_string().contains("tried sha256:a="), "{error}");
        assert!(!dir.path().join("d.raw").exists());
        assert!(!dir.path().join("d.raw.partial").exists());
    }
}
