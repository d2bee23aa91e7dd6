//! `io.imgcrypt.Inspect`: what a LUKS image's header says, without unlocking it.
//!
//! Passed keys are read and hashed only, to say which keyslot's fingerprint each matches; no
//! key derivation runs, so inspecting costs milliseconds whatever the keyslots' PBKDF.

use imgcrypt_proto::api::{ImageInfo, InspectParameters, InspectReply, Progress, StreamedReply};
use serde::{Deserialize, Serialize};

use crate::error::Descriptor;
use crate::luks::LuksImage;
use crate::server::ServerState;
use crate::sys::descriptors;
use crate::Result;

use super::unlock::{self, Purpose};
use super::Job;

/// Inspect's one reply, shaped for the job runner: it streams nothing (partial replies are
/// empty and never sent, since Inspect is called without `more`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct InspectOnly {
    #[serde(flatten)]
    reply: Option<InspectReply>,
}

impl StreamedReply for InspectOnly {
    type Done = ImageInfo;
    fn progress(_: Progress) -> Self {
        Self::default()
    }
    fn notice(_: String) -> Self {
        Self::default()
    }
    fn done(image: ImageInfo) -> Self {
        Self {
            reply: Some(InspectReply { image }),
        }
    }
}

/// Runs the job.
pub fn run(mut job: Job<InspectParameters>, state: &ServerState) -> Result<ImageInfo> {
    let parameters = job.parameters.clone();
    let image = descriptors::check_readable_image(
        job.descriptors.take(Descriptor::Image, parameters.image)?,
        Descriptor::Image,
    )?;
    // Matching against the daemon's ring needs no key material to leave the daemon, so an
    // inspect without keys still says which of the daemon's keys fits.
    let keys = match unlock::collect(&mut job, state, &parameters.keys, None, Purpose::Other) {
        Ok(keys) => keys.candidates,
        Err(crate::Error::NoKey(_)) => Vec::new(),
        Err(error) => return Err(error),
    };
    let image = unlock::lock_image(image.file, false)?;
    let luks = LuksImage::read(&image)?;
    Ok(luks.info(&keys))
}
