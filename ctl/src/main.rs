//! `imgctl`: the unprivileged client of imgcryptd. It opens files with the user's own rights,
//! passes descriptors to the daemon, shows progress, and gives the output its final name only
//! once the daemon reports it durable.

mod call;
mod client;
mod commands;
mod companions;
mod connect;
mod error;
mod keyring;
mod output;
mod progress;
mod stream;
mod targets;
#[cfg(test)]
mod test_peer;
mod upload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    /// Encrypt a RAW, VHD, VHDX or qcow2 image into an encrypted image.
    Encrypt(commands::encrypt::EncryptArgs),
    /// Generate keys and show their fingerprints.
    Key(commands::key::KeyArgs),
    /// Show a LUKS image's header: version, cipher, keyslots and which key matches each.
    Inspect(commands::inspect::InspectArgs),
    /// Write the plaintext disk of a LUKS image.
    Decrypt(commands::decrypt::DecryptArgs),
    /// Decrypt and hash a LUKS image's payload; with --source, compare it with a source image;
    /// with --etag or --object, check an image file against an uploaded object's ETag.
    Verify(commands::verify::VerifyArgs),
    /// Rotate a LUKS image to the key ring's encryption_key (-k), optionally re-encrypting it.
    Rewrite(commands::rewrite::RewriteArgs),
    /// Upload an image to S3-compatible object storage (resumable), or --abort an upload.
    Upload(commands::upload::UploadArgs),
    /// Ask the daemon about itself: `imgctl daemon status` (version, engines, jobs, limits).
    Daemon(commands::daemon::DaemonArgs),
    /// `jobs`, `status ID`, `cancel ID`, `wait ID`: the daemon's jobs.
    #[command(flatten)]
    Jobs(commands::jobs::JobCommand),
}

fn main() -> ExitCode {
    // `imgctl --generate-docs DIR`: man pages and completions for packaging (scripts/package).
    if let Some(code) = imgcrypt_clidoc::generate_if_asked(Cli::command, "1") {
        return code;
    }
    output::install_interrupt_cleanup();
    let cli = Cli::parse();
    let ring = keyring::RingLocation::from_environment(cli.keyring);
    let socket = cli.socket;
    let result = match cli.command {
        Command::Encrypt(args) => commands::encrypt::run(args, socket, &ring),
        Command::Key(args) => commands::key::run(args),
        Command::Inspect(args) => commands::inspect::run(args, socket, &ring),
        Command::Decrypt(args) => commands::decrypt::run(args, socket, &ring),
        Command::Verify(args) => commands::verify::run(args, socket, &ring),
        Command::Rewrite(args) => commands::rewrite::run(args, socket, &ring),
        Command::Upload(args) => commands::upload::run(args),
        Command::Daemon(args) => commands::daemon::run(args, socket),
        Command::Jobs(command) => commands::jobs::run(command, socket),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("imgctl: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("imgctl").chain(args.iter().copied()))
            .map(|c| c.command)
    }

    #[test]
    fn inspect_takes_an_image_key_file_and_json() {
        let Command::Inspect(args) =
            parse(&["inspect", "d.luks", "--key-file", "k", "--json"]).unwrap()
        else {
            panic!("not inspect")
        };
        assert_eq!(args.image, Path::new("d.luks"));
        assert_eq!(args.key_file.as_deref(), Some(Path::new("k")));
        assert!(args.json);
        assert!(parse(&["inspect"]).is_err());
    }

    #[test]
    fn decrypt_needs_an_output() {
        let Command::Decrypt(args) =
            parse(&["decrypt", "d.luks", "-o", "d.raw", "--force"]).unwrap()
        else {
            panic!("not decrypt")
        };
        assert_eq!(args.output, Path::new("d.raw"));
        assert!(args.force && !args.json && args.key_file.is_none());
        assert!(parse(&["decrypt", "d.luks"]).is_err());
    }

    #[test]
    fn verify_source_is_optional() {
        let Command::Verify(args) = parse(&["verify", "d.luks"]).unwrap() else {
            panic!("not verify")
        };
        assert!(args.source.is_none());
        let Command::Verify(args) = parse(&["verify", "d.luks", "--source", "s.vhd"]).unwrap()
        else {
            panic!("not verify")
        };
        assert_eq!(args.source.as_deref(), Some(Path::new("s.vhd")));
    }

    #[test]
    fn rewrite_parses_k_reencrypt_and_the_shared_pbkdf_options() {
        let Command::Rewrite(args) = parse(&[
            "rewrite",
            "-k",
            "d.luks",
            "--reencrypt",
            "--key-file",
            "old.key",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-iterations",
            "1000",
        ])
        .unwrap() else {
            panic!("not rewrite")
        };
        assert!(args.rotate && args.reencrypt);
        assert_eq!(args.key_file.as_deref(), Some(Path::new("old.key")));
        let pbkdf = args.pbkdf.to_protocol().unwrap();
        assert_eq!(pbkdf.kind, Some(imgcrypt_proto::api::PbkdfKind::Pbkdf2));
        assert_eq!(pbkdf.iterations, Some(1000));

        let Command::Rewrite(args) = parse(&["rewrite", "-k", "d.luks"]).unwrap() else {
            panic!("not rewrite")
        };
        assert!(!args.reencrypt);
        assert_eq!(args.pbkdf.to_protocol(), None);
    }

    #[test]
    fn rewrite_without_k_is_a_usage_error_saying_so() {
        let Command::Rewrite(args) = parse(&["rewrite", "d.luks"]).unwrap() else {
            panic!("not rewrite")
        };
        assert!(!args.rotate);
        // Refused before any file, ring or daemon is touched: the paths here do not exist.
        let error = commands::rewrite::run(
            args,
            Some("/nonexistent/socket".into()),
            &keyring::RingLocation::Explicit("/nonexistent/keys.toml".into()),
        )
        .unwrap_err();
        assert_eq!(error.to_string(), commands::rewrite::NEEDS_K);
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn job_commands_are_top_level() {
        use commands::jobs::JobCommand;
        assert!(matches!(
            parse(&["jobs", "--json"]).unwrap(),
            Command::Jobs(JobCommand::Jobs(args)) if args.json
        ));
        assert!(matches!(
            parse(&["wait", "12"]).unwrap(),
            Command::Jobs(JobCommand::Wait(args)) if args.id == 12
        ));
        assert!(matches!(
            parse(&["status", "3"]).unwrap(),
            Command::Jobs(JobCommand::Status(_))
        ));
        assert!(matches!(
            parse(&["cancel", "3"]).unwrap(),
            Command::Jobs(JobCommand::Cancel(_))
        ));
        assert!(parse(&["wait"]).is_err());
        let Command::Encrypt(args) = parse(&["encrypt", "s", "-o", "o", "--detach"]).unwrap()
        else {
            panic!("not encrypt")
        };
        assert!(args.detach);
    }

    #[test]
    fn keyring_is_global() {
        let cli =
            Cli::try_parse_from(["imgctl", "verify", "d.luks", "--keyring", "r.toml"]).unwrap();
        assert_eq!(cli.keyring.as_deref(), Some(Path::new("r.toml")));
    }
}
