//! `imgctl inspect IMAGE [--key-file K] [--json]`: what an encrypted image's header says, read
//! by the daemon without unlocking anything — or, for a source image, what imgcrypt reads of it
//! (format, virtual size, allocated bytes). The candidate keys are passed only so the daemon can
//! say which keyslot (or VHD key hash) each one matches; none is tried.

use std::os::fd::AsFd;
use std::path::PathBuf;

use imgcrypt_proto::api::{self, InspectParameters, InspectReply};

use crate::call;
use crate::companions::{self, Companions};
use crate::connect;
use crate::error::Result;
use crate::keyring::RingLocation;
use crate::progress;

/// Options of `imgctl inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The image (file or block device): an encrypted image, or a source to see what imgcrypt
    /// reads of it.
    pub image: PathBuf,
    /// A key file to match against the keyslots' fingerprints (default: every key in the ring).
    #[arg(long, value_name = "KEY")]
    pub key_file: Option<PathBuf>,
    /// Print the header's facts as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(args: InspectArgs, socket: Option<PathBuf>, ring: &RingLocation) -> Result<()> {
    // Descriptor 0 is the image; the keys follow.
    let image = call::open_read_only(&args.image, "open the image")?;
    let keys = call::open_unlock_keys(args.key_file, ring, 1)?;
    let fds: Vec<_> = std::iter::once(image.as_fd()).chain(keys.fds()).collect();

    let mut client = connect::connect(socket.as_deref())?;
    let mut companions = Companions::new(&args.image);
    let reply: InspectReply = companions::with_companions(&mut companions, |companions| {
        let parameters = InspectParameters {
            image: 0,
            companions: companions.refs(fds.len() as u32),
            keys: keys.refs.clone(),
        };
        let all: Vec<_> = fds.iter().copied().chain(companions.fds()).collect();
        call::call_once(&mut client, api::INSPECT, &parameters, &all)
    })?;
    match (&reply.image, &reply.source) {
        (Some(image), _) if args.json => println!(
            "{}",
            serde_json::to_string(image).expect("image info serialises")
        ),
        (Some(image), _) => print!("{}", progress::render_inspect(&args.image, image)),
        (None, Some(source)) if args.json => println!(
            "{}",
            serde_json::to_string(source).expect("source info serialises")
        ),
        (None, Some(source)) => print!("{}", progress::render_source(&args.image, source)),
        (None, None) => {
            return Err(crate::error::CtlError::Protocol(
                "the daemon's Inspect reply carried neither an image nor a source".to_string(),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_peer::{self, Peer};
    use imgcrypt_proto::api::{ImageInfo, KeyRef, LuksVersion};
    use imgcrypt_proto::varlink::Reply;

    #[test]
    fn one_call_with_the_image_and_the_ring_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (ring, _, old_key) = test_peer::ring(dir.path());
        let image = dir.path().join("d.luks");
        std::fs::write(&image, "luks").unwrap();
        let expected = [
            test_peer::identity_of(&image),
            test_peer::identity_of(&old_key),
        ];
        let peer = Peer::serve(move |call, fds| {
            assert!(!call.more, "Inspect answers once");
            assert_eq!(fds.len(), 3);
            assert_eq!(test_peer::identity(&fds[0]), expected[0]);
            assert_eq!(test_peer::identity(&fds[2]), expected[1]);
            vec![Reply::ok(InspectReply {
                source: None,
                image: Some(ImageInfo {
                    format: imgcrypt_proto::api::OutputFormat::Luks,
                    luks_version: Some(LuksVersion::Luks1),
                    virtual_size: None,
                    allocated_bytes: None,
                    vhd_key: None,
                    uuid: "u".into(),
                    cipher: "aes-xts-plain64".into(),
                    key_size_bits: 256,
                    sector_size: 512,
                    data_offset: 4096,
                    payload_size: 1 << 20,
                    image_size: (1 << 20) + 4096,
                    keyslots: vec![],
                }),
            })]
        });
        let args = InspectArgs {
            image,
            key_file: None,
            json: true,
        };
        run(args, Some(peer.socket.clone()), &ring).unwrap();
        let parameters: InspectParameters = test_peer::parameters(&peer.call());
        assert_eq!(parameters.image, 0);
        assert_eq!(
            parameters.keys[1],
            KeyRef {
                fd: 2,
                name: "decryption_key1".into()
            }
        );
    }
}
