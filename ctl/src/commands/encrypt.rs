//! `imgctl encrypt SRC -o OUT [--key-file KEY]`; without `--key-file`, the key ring's
//! `encryption_key`, and with neither an error (never an unencrypted output).
//!
//! The client does every `open` (with the user's own permissions) and hands the daemon three
//! descriptors: the source read-only, `OUT.partial` read-write, and the key file read-only. The
//! key's bytes never pass through imgctl's memory; the daemon reads and checks them.

use std::os::fd::AsFd;
use std::path::PathBuf;

use imgcrypt_proto::api::{
    self, EncryptParameters, EncryptReply, EngineChoice, LuksVersion, Pbkdf, PbkdfKind,
};

use crate::call;
use crate::connect;
use crate::error::{CtlError, Result};
use crate::keyring::{self, RingLocation};
use crate::output::Output;
use crate::progress::Display;

/// Options of `imgctl encrypt`.
#[derive(Debug, clap::Args)]
pub struct EncryptArgs {
    /// Source disk image (RAW or VHD, detected by content).
    pub source: PathBuf,
    /// Where to write the LUKS image.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
    /// Key file: its bytes are the LUKS passphrase (32–512 base64 characters, no newline).
    /// Default: the key ring's encryption_key.
    #[arg(long, value_name = "KEY")]
    pub key_file: Option<PathBuf>,
    /// Write a LUKS1 header instead of LUKS2.
    #[arg(long)]
    pub luks1: bool,
    /// Encryption sector size in bytes (4096 needs LUKS2).
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Key derivation of the keyslot.
    #[command(flatten)]
    pub pbkdf: PbkdfArgs,
    /// Engine: auto (kernel where dm-crypt is usable), userspace or kernel.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    pub engine: EngineArg,
    /// Replace OUT (or a stale OUT.partial) if it exists; required to write to a block device.
    #[arg(long)]
    pub force: bool,
    /// Print progress and the summary as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Key-derivation options of a new keyslot, shared by `encrypt` and `rewrite -k`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PbkdfArgs {
    /// Key-derivation function of the keyslot.
    #[arg(long, value_enum)]
    pub pbkdf: Option<PbkdfArg>,
    /// Target unlock time of the keyslot, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub iter_time: Option<u32>,
    /// Fixed PBKDF iteration count (skips the benchmark).
    #[arg(long, value_name = "N")]
    pub pbkdf_iterations: Option<u32>,
    /// Argon2 memory cost in KiB.
    #[arg(long, value_name = "KIB")]
    pub pbkdf_memory: Option<u32>,
    /// Argon2 threads.
    #[arg(long, value_name = "N")]
    pub pbkdf_parallel: Option<u32>,
}

impl PbkdfArgs {
    /// The protocol's settings; `None` when every option is left to the daemon's defaults.
    pub fn to_protocol(&self) -> Option<Pbkdf> {
        let pbkdf = Pbkdf {
            kind: self.pbkdf.map(|kind| match kind {
                PbkdfArg::Argon2id => PbkdfKind::Argon2id,
                PbkdfArg::Pbkdf2 => PbkdfKind::Pbkdf2,
            }),
            iter_time_ms: self.iter_time,
            iterations: self.pbkdf_iterations,
            memory_kib: self.pbkdf_memory,
            parallel: self.pbkdf_parallel,
        };
        (pbkdf != Pbkdf::default()).then_some(pbkdf)
    }
}

/// `--pbkdf` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PbkdfArg {
    /// Memory-hard (LUKS2 only).
    Argon2id,
    /// PBKDF2-SHA256.
    Pbkdf2,
}

/// `--engine` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EngineArg {
    /// Kernel where possible, else userspace.
    Auto,
    /// AES-XTS in the daemon's process.
    Userspace,
    /// Loop device + dm-crypt.
    Kernel,
}

/// Runs the command.
pub fn run(args: EncryptArgs, socket: Option<PathBuf>, ring: &RingLocation) -> Result<()> {
    let mut parameters = parameters(&args)?;
    // Without a key of our own the daemon's key ring (an operator's) may have one; if it has
    // none either, the user gets our advice, never an unencrypted output.
    let (key, no_key_advice) = match keyring::encryption_key(args.key_file.clone(), ring) {
        Ok((key_path, ring_warnings)) => {
            call::warn_all(&ring_warnings);
            (
                Some(call::open_read_only(&key_path, "open the key file")?),
                None,
            )
        }
        Err(CtlError::Usage(advice)) if args.key_file.is_none() => {
            parameters.key = None;
            (None, Some(advice))
        }
        Err(error) => return Err(error),
    };
    let source = call::open_read_only(&args.source, "open the source image")?;
    let mut display = Display::new(args.json);
    let output = Output::create(&args.output, args.force)?;

    let mut client = connect::connect(socket.as_deref())?;
    let mut fds = vec![source.as_fd(), output.file().as_fd()];
    fds.extend(key.as_ref().map(|key| key.as_fd()));
    let summary =
        call::run_job::<EncryptReply>(&mut client, api::ENCRYPT, &parameters, &fds, &mut display)
            .map_err(|error| match (error, no_key_advice) {
            (CtlError::Daemon { name, .. }, Some(advice)) if name == api::errors::NO_KEY => {
                CtlError::Usage(format!(
                    "{advice} (the daemon has no key ring of its own either)"
                ))
            }
            (error, _) => error,
        })?;
    let final_path = output.commit()?;
    display.summary(&args.source, &final_path, &summary);
    Ok(())
}

/// Protocol parameters from the options, with the checks that need no daemon.
fn parameters(args: &EncryptArgs) -> Result<EncryptParameters> {
    let luks_version = if args.luks1 {
        LuksVersion::Luks1
    } else {
        LuksVersion::Luks2
    };
    if args.luks1 && args.sector_size != 512 {
        return Err(CtlError::Usage(
            "--sector-size 4096 needs LUKS2: drop --luks1 or use --sector-size 512".to_string(),
        ));
    }
    // The descriptors' order in the call: source, output, key.
    Ok(EncryptParameters {
        source: 0,
        output: 1,
        key: Some(2),
        luks_version,
        sector_size: args.sector_size,
        pbkdf: args.pbkdf.to_protocol(),
        engine: match args.engine {
            EngineArg::Auto => EngineChoice::Auto,
            EngineArg::Userspace => EngineChoice::Userspace,
            EngineArg::Kernel => EngineChoice::Kernel,
        },
    })
}

fn parse_sector_size(text: &str) -> std::result::Result<u32, String> {
    match text {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("the encryption sector size must be 512 or 4096".to_string()),
    }
}
