//! `imgctl verify IMAGE [--source SRC] [--key-file K] [--json]`: the daemon unlocks the image,
//! decrypts and hashes its whole payload, and with `--source` compares it with a RAW, VHD, VHDX or qcow2
//! image. Exit status 0: verified (and matching); 1: the source differs, or any other failure.
//!
//! `imgctl verify IMAGE --etag ETAG [--part-size N]` and `imgctl verify IMAGE --object
//! s3://BUCKET/KEY` check a local image file against an uploaded object's multipart ETag (and,
//! with `--object`, its size) without the daemon or a key: imgctl hashes the file itself.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use imgcrypt_proto::api::{self, VerifyParameters, VerifyReply, VerifySummary};
use serde_json::json;

use std::io::{Seek, SeekFrom};

use crate::call;
use crate::commands::upload as upload_command;
use crate::companions::{self, Companions};
use crate::connect;
use crate::error::{CtlError, Result};
use crate::keyring::RingLocation;
use crate::progress::{self, Display};
use crate::upload::{self, parts, S3Url, StoreOptions};

/// Options of `imgctl verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The LUKS image (file or block device); with --etag or --object, any image file.
    pub image: PathBuf,
    /// A source image (RAW, VHD, VHDX or plain qcow2) the plaintext must equal.
    #[arg(long, value_name = "SRC")]
    pub source: Option<PathBuf>,
    /// The key file that opens the image (default: the ring's keys, matched by fingerprint).
    #[arg(long, value_name = "KEY")]
    pub key_file: Option<PathBuf>,
    /// Check the image file against an S3 ETag instead (no daemon, no key): `HEX-N` as S3
    /// reports a multipart upload, or a plain MD5.
    #[arg(long, value_name = "ETAG", conflicts_with_all = ["source", "key_file", "object"])]
    pub etag: Option<String>,
    /// Check the image file against an object's size and ETag (read with a HEAD request;
    /// --endpoint, --region, --profile as for `imgctl upload`).
    #[arg(long, value_name = "s3://BUCKET/KEY", conflicts_with_all = ["source", "key_file"])]
    pub object: Option<String>,
    /// The part size the ETag was made with, in bytes or with K, M, G (binary) (default:
    /// imgctl upload's rule for the image's size).
    #[arg(long, value_name = "SIZE")]
    pub part_size: Option<String>,
    #[command(flatten)]
    pub store: StoreOptions,
    /// Print progress and the summary as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(args: VerifyArgs, socket: Option<PathBuf>, ring: &RingLocation) -> Result<()> {
    if args.etag.is_some() || args.object.is_some() {
        let mut display = Display::new(args.json);
        let result = verify_etag(&args, &mut display);
        if let Err(error) = &result {
            display.error(None, &error.to_string());
        }
        return result;
    }
    if args.part_size.is_some() {
        return Err(CtlError::Usage(
            "--part-size goes with --etag or --object".into(),
        ));
    }
    // Descriptors: 0 the image, 1 the source if any, then the keys.
    let image = call::open_read_only(&args.image, "open the image")?;
    let source = args
        .source
        .as_deref()
        .map(|path| call::open_read_only(path, "open the source image"))
        .transpose()?;
    let first_key_fd = 1 + u32::from(source.is_some());
    let keys = call::open_unlock_keys(args.key_file, ring, first_key_fd)?;
    let fds: Vec<_> = std::iter::once(image.as_fd())
        .chain(source.as_ref().map(|file| file.as_fd()))
        .chain(keys.fds())
        .collect();

    let mut display = Display::new(args.json);
    let mut client = connect::connect(socket.as_deref())?;
    let mut companions = Companions::new(args.source.as_deref().unwrap_or(Path::new("")));
    let summary = companions::with_companions(&mut companions, |companions| {
        let parameters = VerifyParameters {
            image: 0,
            source: source.is_some().then_some(1),
            source_companions: companions.refs(fds.len() as u32),
            keys: keys.refs.clone(),
        };
        let all: Vec<_> = fds.iter().copied().chain(companions.fds()).collect();
        call::run_job::<VerifyReply>(&mut client, api::VERIFY, &parameters, &all, &mut display)
    })?;
    display.finish(
        json!({
            "event": "summary",
            "image": args.image,
            "source": args.source,
            "summary": summary,
        }),
        &progress::render_verify(&args.image, args.source.as_deref(), &summary),
    );
    verdict(&summary, args.source.as_deref())
}

/// Parses a size: bytes, or a number with K, M, G or T (binary; `KiB`, `M` and `MiB` alike).
fn parse_size(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let digits = trimmed.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &trimmed[digits.len()..];
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => {
            return Err(CtlError::Usage(format!(
                "--part-size {text:?}: the unit is one of K, M, G, T (binary)"
            )))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| CtlError::Usage(format!("--part-size {text:?} is not a size")))
}

/// `--etag` / `--object`: hashes the image file as S3 would have and compares.
fn verify_etag(args: &VerifyArgs, display: &mut Display) -> Result<()> {
    let (mut file, _, size) = upload_command::open_image(&args.image)?;
    let (expected, what) = match (&args.etag, &args.object) {
        (Some(etag), _) => (parts::normalize_etag(etag), "the ETag given".to_string()),
        (None, Some(object)) => {
            let url = S3Url::parse(object)?;
            let info = upload::head_object(&url, &args.store)?;
            if info.size != size {
                return Err(CtlError::ObjectDiffers(format!(
                    "{url} is {} bytes, {} is {size}: not the same image",
                    info.size,
                    args.image.display()
                )));
            }
            (info.etag, format!("{url}'s ETag"))
        }
        (None, None) => unreachable!("checked by the caller"),
    };
    let part_size = match &args.part_size {
        Some(text) => {
            let part_size = parse_size(text)?;
            parts::check_part_size(size, part_size)?;
            part_size
        }
        None => parts::part_size(size)?,
    };
    let count = parts::part_count(size, part_size);
    let multipart = parts::etag_part_count(&expected).is_some();
    if let Some(claimed) = parts::etag_part_count(&expected) {
        if claimed != count {
            let hint = if args.part_size.is_some() {
                "check --part-size"
            } else {
                "the upload used another part size: pass it with --part-size"
            };
            return Err(CtlError::ObjectDiffers(format!(
                "{what} ({expected}) is of {claimed} parts, but {} ({size} bytes) in parts of                  {part_size} bytes is {count}: {hint}",
                args.image.display()
            )));
        }
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| CtlError::file(&args.image, "read the image", e))?;
    let actual = parts::etag_of(&mut file, size, part_size, multipart, &mut |done| {
        display.transfer("hashing", done, size)
    })
    .map_err(|e| CtlError::file(&args.image, "read the image", e))?;
    if actual != expected {
        return Err(CtlError::ObjectDiffers(format!(
            "{}'s ETag is {actual}, {what} is {expected}: the image is not the uploaded object",
            args.image.display()
        )));
    }
    display.finish(
        json!({
            "event": "summary",
            "image": args.image,
            "object": args.object,
            "size": size,
            "etag": actual,
            "part_size": part_size,
            "matches": true,
        }),
        &progress::render_etag_check(&args.image, size, &actual, part_size),
    );
    Ok(())
}

/// The command's outcome: success unless a source was given and the plaintext is not it.
pub fn verdict(summary: &VerifySummary, source: Option<&Path>) -> Result<()> {
    let Some(source) = source else {
        return Ok(());
    };
    let Some(comparison) = &summary.source else {
        return Err(CtlError::Protocol(format!(
            "the daemon did not compare the image with {}",
            source.display()
        )));
    };
    if comparison.matches {
        return Ok(());
    }
    let place = progress::Difference::of(summary.payload_size, comparison)
        .map(progress::Difference::tail)
        .unwrap_or_default();
    Err(CtlError::SourceDiffers(format!(
        "the image's plaintext differs from {}{place}: it is not that disk (or not all of it)",
        source.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcrypt_proto::api::{SourceComparison, SourceFormat, UnlockMethod, Unlocked};

    fn summary(source: Option<SourceComparison>) -> VerifySummary {
        VerifySummary {
            unlocked: Unlocked {
                key_name: "encryption_key".into(),
                fingerprint: "fp=".into(),
                keyslot: 0,
                method: UnlockMethod::Token,
                attempts: 1,
            },
            payload_size: 2 << 20,
            plaintext_sha256: "ab".repeat(32),
            source,
            elapsed_ms: 10,
        }
    }

    fn compared(matches: bool, first_difference: Option<u64>) -> Option<SourceComparison> {
        Some(SourceComparison {
            source_format: SourceFormat::Raw,
            virtual_size: 1 << 20,
            matches,
            first_difference,
        })
    }

    #[test]
    fn part_sizes_parse_in_bytes_and_binary_units() {
        assert_eq!(parse_size("16777216").unwrap(), 16 << 20);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("105MiB").unwrap(), 105 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("16X").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn verified_without_source_and_matching_source_exit_zero() {
        assert!(verdict(&summary(None), None).is_ok());
        assert!(verdict(&summary(compared(true, None)), Some(Path::new("src.raw"))).is_ok());
    }

    #[test]
    fn differing_source_exits_one_saying_where() {
        let error = verdict(
            &summary(compared(false, Some(4096))),
            Some(Path::new("src.raw")),
        )
        .unwrap_err();
        assert!(matches!(error, CtlError::SourceDiffers(_)));
        assert_eq!(error.exit_code(), 1);
        let message = error.to_string();
        assert!(
            message.contains("src.raw") && message.contains("byte 4096 (0x1000)"),
            "{message}"
        );
    }

    #[test]
    fn a_missing_comparison_is_not_taken_for_a_match() {
        let error = verdict(&summary(None), Some(Path::new("src.raw"))).unwrap_err();
        assert!(matches!(error, CtlError::Protocol(_)), "{error}");
        assert_eq!(error.exit_code(), 1);
    }

    #[test]
    fn passes_the_source_second_and_a_difference_exits_one() {
        use crate::test_peer::{self, Peer};
        use imgcrypt_proto::api::{KeyRef, StreamedReply};
        use imgcrypt_proto::varlink::Reply;

        let dir = tempfile::tempdir().unwrap();
        let (ring, new_key, _) = test_peer::ring(dir.path());
        let image = dir.path().join("d.luks");
        let source = dir.path().join("s.raw");
        std::fs::write(&image, "luks").unwrap();
        std::fs::write(&source, "raw").unwrap();
        let expected = [
            test_peer::identity_of(&image),
            test_peer::identity_of(&source),
            test_peer::identity_of(&new_key),
        ];
        let peer = Peer::serve(move |_, fds| {
            assert_eq!(fds.len(), 3);
            for (fd, identity) in fds.iter().zip(expected) {
                assert_eq!(test_peer::identity(fd), identity);
            }
            vec![Reply::ok(VerifyReply::done(VerifySummary {
                unlocked: test_peer::unlocked(),
                ..summary(compared(false, Some(7)))
            }))]
        });
        let error = run(
            VerifyArgs {
                image,
                source: Some(source),
                key_file: Some(new_key),
                etag: None,
                object: None,
                part_size: None,
                store: StoreOptions::default(),
                json: false,
            },
            Some(peer.socket.clone()),
            &ring,
        )
        .unwrap_err();
        assert!(matches!(error, CtlError::SourceDiffers(_)), "{error}");
        assert!(error.to_string().contains("byte 7"), "{error}");
        let parameters: VerifyParameters = test_peer::parameters(&peer.call());
        assert_eq!(parameters.source, Some(1));
        assert_eq!(
            parameters.keys,
            vec![KeyRef {
                fd: 2,
                name: "--key-file".into()
            }]
        );
    }
}
