//! `imgctl encrypt SRC -o OUT [--key-file KEY]`; without `--key-file`, the key ring's
//! `encryption_key`, and with neither an error (never an unencrypted output).
//!
//! The client does every `open` (with the user's own permissions) and hands the daemon three
//! descriptors: the source read-only, `OUT.partial` read-write, and the key file read-only (a
//! fourth, `--source-key-file`, read-only, for an encrypted qcow2 source), plus the files the
//! source references when the daemon asks for them. No key's bytes pass through imgctl's
//! memory; the daemon reads and checks them.
//!
//! A raw LUKS output is resumable: an interrupted run (Ctrl-C, the daemon killed or stopped)
//! keeps `OUT.partial`, and the same command run again passes it back untruncated; the daemon
//! resumes from its checkpoint when the source, the key and the options are unchanged, and
//! otherwise starts over and says why ([`crate::output::Output::create_resumable`]). `--force`
//! discards it and starts over.

use std::os::fd::AsFd;
use std::path::PathBuf;

use imgcrypt_proto::api::{
    self, EncryptParameters, EncryptReply, EngineChoice, LuksVersion, OutputFormat, Pbkdf,
    PbkdfKind, Target,
};

use crate::call;
use crate::commands::jobs;
use crate::companions::{self, Companions};
use crate::connect;
use crate::error::{CtlError, Result};
use crate::keyring::{self, RingLocation};
use crate::output::Output;
use crate::progress::Display;
use crate::targets;

/// Options of `imgctl encrypt`.
#[derive(Debug, clap::Args)]
pub struct EncryptArgs {
    /// Source disk image (RAW, VHD, VHDX or qcow2 with its backing chain, detected by content).
    pub source: PathBuf,
    /// Where to write the LUKS image.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
    /// Key file: its bytes are the LUKS passphrase (32–512 base64 characters, no newline).
    /// Default: the key ring's encryption_key.
    #[arg(long, value_name = "KEY")]
    pub key_file: Option<PathBuf>,
    /// Key file that unlocks an encrypted qcow2 source (qemu's LUKS): its bytes are the
    /// passphrase of one of the source's keyslots. Passed to the daemon as a descriptor.
    #[arg(long, value_name = "FILE")]
    pub source_key_file: Option<PathBuf>,
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
    /// Container of the output: luks (raw LUKS, the default), qcow2 (qemu's LUKS encryption:
    /// IBM Cloud VPC, OpenStack) or vhd (blktap's vhd-util encryption: IBM Cloud classic).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Check a cloud's import rules before anything is written, and say what to do next;
    /// implies the target's --format.
    #[arg(long, value_enum)]
    pub target: Option<TargetArg>,
    /// Replace OUT if it exists, and discard an interrupted run's OUT.partial instead of
    /// resuming it; required to write to a block device.
    #[arg(long)]
    pub force: bool,
    /// Print progress and the summary as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    /// Hand the job to the daemon and return: prints the job's id. The job runs on after
    /// imgctl exits, writing OUT.partial; `imgctl wait ID` follows it and, once it succeeded,
    /// renames OUT.partial to OUT (the daemon never renames). `imgctl status ID` and
    /// `imgctl cancel ID` see or stop it. The files the source references (backing
    /// files, parent disks, extents) are found and passed before the job is handed over.
    #[arg(long)]
    pub detach: bool,
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

/// `--format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// Raw LUKS (cryptsetup, dm-crypt).
    Luks,
    /// qcow2 v3 with qemu's LUKS encryption.
    Qcow2,
    /// Dynamic VHD encrypted as blktap's vhd-util does.
    Vhd,
}

impl FormatArg {
    fn to_protocol(self) -> OutputFormat {
        match self {
            Self::Luks => OutputFormat::Luks,
            Self::Qcow2 => OutputFormat::Qcow2,
            Self::Vhd => OutputFormat::Vhd,
        }
    }
}

/// `--target` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetArg {
    /// Plain LUKS (raw LUKS output).
    Luks,
    /// IBM Cloud VPC custom image (qcow2 with LUKS).
    IbmVpc,
    /// IBM Cloud classic image template (vhd-util-encrypted VHD).
    IbmClassic,
    /// OpenStack encrypted image (qcow2 with LUKS).
    Openstack,
}

impl TargetArg {
    /// The protocol's name for it.
    pub fn to_protocol(self) -> Target {
        match self {
            Self::Luks => Target::Luks,
            Self::IbmVpc => Target::IbmVpc,
            Self::IbmClassic => Target::IbmClassic,
            Self::Openstack => Target::Openstack,
        }
    }
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
    // Raw LUKS resumes an interrupted run's OUT.partial; the sparse containers start over.
    let resumable = parameters.format.unwrap_or(OutputFormat::Luks) == OutputFormat::Luks;
    let output = if resumable {
        Output::create_resumable(&args.output, args.force)?
    } else {
        Output::create(&args.output, args.force)?
    };

    let mut client = connect::connect(socket.as_deref())?;
    let source_key = match &args.source_key_file {
        Some(path) => Some(call::open_read_only(path, "open the source key file")?),
        None => None,
    };
    let mut fds = vec![source.as_fd(), output.file().as_fd()];
    fds.extend(key.as_ref().map(|key| key.as_fd()));
    // The source key, if any, follows the key (or the output, without one).
    parameters.source_key = source_key.as_ref().map(|_| fds.len() as u32);
    fds.extend(source_key.as_ref().map(|key| key.as_fd()));
    parameters.names = Some(jobs::names(&args.source, &args.output));
    if args.detach {
        parameters.detach = Some(true);
        let companions = jobs::companions_for_detach(&mut client, &args.source, &source)?;
        parameters.companions = companions.refs(fds.len() as u32);
        fds.extend(companions.fds());
        let id = jobs::submit_detached(client, api::ENCRYPT, &parameters, &fds)?;
        drop(fds);
        output.leave_to_detached_job();
        jobs::report_detached(id, &args.output, args.json, &mut display);
        return Ok(());
    }
    let mut companions = Companions::new(&args.source);
    let summary = companions::with_companions(&mut companions, |companions| {
        parameters.companions = companions.refs(fds.len() as u32);
        let all: Vec<_> = fds.iter().copied().chain(companions.fds()).collect();
        call::run_job::<EncryptReply>(&mut client, api::ENCRYPT, &parameters, &all, &mut display)
    })
    .map_err(|error| match (error, no_key_advice) {
        (CtlError::Daemon { name, .. }, Some(advice)) if name == api::errors::NO_KEY => {
            CtlError::Usage(format!(
                "{advice} (the daemon has no key ring of its own either)"
            ))
        }
        (error, _) => error,
    });
    let summary = match summary {
        Ok(summary) => summary,
        Err(error) => {
            // The daemon went away, or stopped the job with its progress checkpointed: the
            // partial file is what the next run resumes.
            let interrupted = match &error {
                CtlError::Protocol(_) => true,
                CtlError::Daemon { name, .. } => name == api::errors::INTERRUPTED,
                _ => false,
            };
            if let Some(advice) = output.abandon(interrupted) {
                eprintln!("imgctl: {advice}");
            }
            return Err(error);
        }
    };
    let final_path = output.commit()?;
    let next = match summary.target {
        Some(target) => targets::next_steps(
            target,
            &args.source,
            &final_path,
            args.key_file.as_deref(),
            &summary,
        ),
        None => Vec::new(),
    };
    display.summary(&args.source, &final_path, &summary, &next);
    Ok(())
}

/// Protocol parameters from the options, with the checks that need no daemon.
fn parameters(args: &EncryptArgs) -> Result<EncryptParameters> {
    let luks_version = if args.luks1 {
        LuksVersion::Luks1
    } else {
        LuksVersion::Luks2
    };
    let target = args.target.map(TargetArg::to_protocol);
    let format = match (args.format.map(FormatArg::to_protocol), target) {
        (Some(format), Some(target)) if format != target.format() => {
            return Err(CtlError::Usage(format!(
                "--target {} imports {} images, not {}: drop --format or use --format {}",
                target.cli_name(),
                target.format().cli_name(),
                format.cli_name(),
                target.format().cli_name()
            )))
        }
        (Some(format), _) => format,
        (None, Some(target)) => target.format(),
        (None, None) => OutputFormat::Luks,
    };
    check_format_options(args, format)?;
    if let Some(target) = target {
        targets::check_output_name(target, &args.output)?;
    }
    if args.luks1 && args.sector_size != 512 {
        return Err(CtlError::Usage(
            "--sector-size 4096 needs LUKS2: drop --luks1 or use --sector-size 512".to_string(),
        ));
    }
    // The descriptors' order in the call: source, output, key.
    Ok(EncryptParameters {
        source: 0,
        companions: Vec::new(),
        output: 1,
        key: Some(2),
        source_key: None,
        luks_version,
        sector_size: args.sector_size,
        pbkdf: args.pbkdf.to_protocol(),
        engine: match args.engine {
            EngineArg::Auto => EngineChoice::Auto,
            EngineArg::Userspace => EngineChoice::Userspace,
            EngineArg::Kernel => EngineChoice::Kernel,
        },
        format: (format != OutputFormat::Luks || args.format.is_some()).then_some(format),
        target,
        detach: None,
        names: None,
        stream: None,
    })
}

/// Refuses options the chosen container cannot honour, before anything is opened.
fn check_format_options(args: &EncryptArgs, format: OutputFormat) -> Result<()> {
    let refuse = |text: String| Err(CtlError::Usage(text));
    if format != OutputFormat::Luks && matches!(args.engine, EngineArg::Kernel) {
        return refuse(format!(
            "--engine kernel writes raw LUKS only (dm-crypt maps one contiguous payload); a {} \
             output is written by the userspace engine: drop --engine",
            format.cli_name()
        ));
    }
    if format != OutputFormat::Luks && args.sector_size != 512 {
        return refuse(format!(
            "--sector-size {} is not possible with --format {}: {} uses 512-byte encryption \
             sectors; drop --sector-size",
            args.sector_size,
            format.cli_name(),
            format.display_name()
        ));
    }
    match format {
        OutputFormat::Qcow2 if matches!(args.pbkdf.pbkdf, Some(PbkdfArg::Argon2id)) => refuse(
            "--pbkdf argon2id is not possible with --format qcow2: qemu's LUKS inside qcow2 is \
             LUKS1, whose only key derivation is pbkdf2; drop --pbkdf"
                .to_string(),
        ),
        OutputFormat::Vhd if args.luks1 || args.pbkdf.to_protocol().is_some() => refuse(
            "--luks1 and the --pbkdf options do not apply to --format vhd: a blktap-encrypted VHD \
             has no LUKS header and no key derivation (the key file's decoded bytes are the \
             AES-XTS key itself); drop them"
                .to_string(),
        ),
        _ => Ok(()),
    }
}

fn parse_sector_size(text: &str) -> std::result::Result<u32, String> {
    match text {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("the encryption sector size must be 512 or 4096".to_string()),
    }
}
