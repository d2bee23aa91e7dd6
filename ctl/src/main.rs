//! `imgctl`: the unprivileged client of imgcryptd. It opens files with the user's own rights,
//! passes descriptors to the daemon, shows progress, and gives the output its final name only
//! once the daemon reports it durable.

mod client;
mod commands;
mod connect;
mod error;
mod keyring;
mod output;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Turn virtual-machine disk images into LUKS-encrypted images, without root.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Daemon socket (default: $IMGCRYPT_SOCKET, the system socket, then the per-user socket;
    /// a per-user daemon is started if none answers).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Key ring naming key files (default: $XDG_CONFIG_HOME/imgcrypt/keys.toml, i.e.
    /// ~/.config/imgcrypt/keys.toml); must exist when given.
    #[arg(long, global = true, value_name = "FILE")]
    keyring: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Encrypt a RAW or VHD image into a LUKS image.
    Encrypt(commands::encrypt::EncryptArgs),
    /// Generate keys and show their fingerprints.
    Key(commands::key::KeyArgs),
}

fn main() -> ExitCode {
    output::install_interrupt_cleanup();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Encrypt(args) => commands::encrypt::run(
            args,
            cli.socket,
            &keyring::RingLocation::from_environment(cli.keyring),
        ),
        Command::Key(args) => commands::key::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("imgctl: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
