//! `io.imgcrypt.Inspect`: what an encrypted image's metadata says (a LUKS header, a qcow2's
//! embedded LUKS header, a VHD's key hash), without unlocking it — or, for an image that is not
//! encrypted, what the source readers see in it (format, sizes, allocation unit).
//!
//! Passed keys are read and hashed only, to say which keyslot's fingerprint each matches; no
//! key derivation runs, so inspecting costs milliseconds whatever the keyslots' PBKDF.

use imgcrypt_proto::api::{
    BackingLayer, ImageInfo, InspectParameters, InspectReply, OutputFormat, Progress, SourceInfo,
    StreamedReply,
};
use serde::{Deserialize, Serialize};

use crate::context::DaemonContext;
use crate::error::Descriptor;
use crate::formats::vhd::encrypted::EncryptedVhd;
use crate::formats::{self, encrypted, SourceImage};
use crate::luks::LuksImage;
use crate::sys::{descriptors, storage};
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
    type Done = InspectReply;
    fn progress(_: Progress) -> Self {
        Self::default()
    }
    fn notice(_: String) -> Self {
        Self::default()
    }
    fn done(reply: InspectReply) -> Self {
        Self { reply: Some(reply) }
    }
}

/// Runs the job: an image the source readers open is a source (not encrypted), anything else an
/// encrypted image whose header is read.
pub fn run(mut job: Job<InspectParameters>, state: &DaemonContext) -> Result<InspectReply> {
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
    let duplicate = image
        .try_clone()
        .map_err(|e| crate::Error::io("duplicating the image descriptor", e))?;
    // A file the source readers take is not encrypted; one they refuse as an encrypted
    // container (LUKS, a blktap VHD, an encrypted qcow2) or as a container they do not read is
    // looked at as an encrypted image, and if it is none either, the source readers' refusal
    // is the answer (it names the format and what to do).
    let files = super::source_files(
        &mut job.descriptors,
        descriptors::CheckedFile {
            file: duplicate,
            kind: storage::storage_kind(&image)?,
        },
        &parameters.companions,
    )?;
    let refusal = match formats::open_files(&files) {
        Ok(source) => {
            return Ok(InspectReply {
                image: None,
                source: Some(source_info(source.as_ref(), &image)?),
            })
        }
        // A source that names a file not passed yet: the client opens it and asks again.
        Err(need @ crate::Error::NeedFile { .. }) => return Err(need),
        Err(refusal) => refusal,
    };
    encrypted_info(&image, &keys)
        .map(|info| InspectReply {
            image: Some(info),
            source: None,
        })
        .map_err(|error| prefer_refusal(error, refusal))
}

/// Which error to give for a file that is neither a source we read nor an encrypted image:
/// when the encrypted-image readers only say "not one of mine" and the source readers named a
/// container format (VMDK, VHDX...), the source readers' refusal says what the file is and what
/// to do; a damaged encrypted image keeps its own error.
fn prefer_refusal(error: crate::Error, refusal: crate::Error) -> crate::Error {
    let not_encrypted = matches!(
        error,
        crate::Error::UnsupportedImage { .. } | crate::Error::Luks { .. }
    );
    match refusal {
        crate::Error::UnsupportedFormat { format: "luks", .. } => error,
        refusal @ crate::Error::UnsupportedFormat { .. } if not_encrypted => refusal,
        _ => error,
    }
}

/// What a source's reader says about it.
fn source_info(source: &dyn SourceImage, file: &std::fs::File) -> Result<SourceInfo> {
    Ok(SourceInfo {
        format: source.format(),
        virtual_size: source.virtual_size(),
        file_size: storage::size_of(file)?,
        allocated_bytes: source
            .allocated_ranges()
            .iter()
            .map(|range| {
                range
                    .end
                    .min(source.virtual_size())
                    .saturating_sub(range.start)
            })
            .sum(),
        allocation_unit: source.allocation_unit(),
        backing_chain: std::iter::successors(source.backing(), |(_, layer)| layer.backing())
            .map(|(name, layer)| BackingLayer {
                name: name.to_string(),
                format: layer.format(),
                virtual_size: layer.virtual_size(),
            })
            .collect(),
    })
}

/// The header facts of an encrypted image.
fn encrypted_info(image: &std::fs::File, keys: &[crate::keys::CandidateKey]) -> Result<ImageInfo> {
    match encrypted::detect(image)? {
        OutputFormat::Luks => Ok(LuksImage::read(image)?.info(keys)),
        OutputFormat::Qcow2 => {
            let (qcow2, header) = unlock::qcow2_luks_header(image)?;
            let mut info = LuksImage::read(&header)?.info(keys);
            info.format = OutputFormat::Qcow2;
            info.virtual_size = Some(qcow2.virtual_size());
            info.allocated_bytes = Some(qcow2.allocated_bytes());
            // The encrypted data are the qcow2's data clusters, wherever its tables put them;
            // the LUKS header's own payload offset is only a bound inside qcow2.
            info.data_offset = qcow2.first_data_offset().unwrap_or(0);
            info.payload_size = qcow2.allocated_bytes();
            info.image_size = qcow2.file_size();
            Ok(info)
        }
        OutputFormat::Vhd => {
            let file = image
                .try_clone()
                .map_err(|e| crate::Error::io("duplicating the image descriptor", e))?;
            EncryptedVhd::open(file)?.info(keys)
        }
    }
}
