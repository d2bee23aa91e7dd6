//! `imgctl decrypt IMAGE -o RAW [--key-file K] [--force] [--json]`: the plaintext disk of a LUKS
//! image, written by the daemon through a passed descriptor to `RAW.partial` and renamed to `RAW`
//! only once the daemon reports it durable (the same output handling as `encrypt`).

use std::os::fd::AsFd;
use std::path::PathBuf;

use imgcrypt_proto::api::{self, DecryptParameters, DecryptReply};
use serde_json::json;

use crate::call;
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
    };
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
