//! Engines write the encrypted payload of an image: the one shared pipeline that reads the
//! source, encrypts and writes.
//!
//! The job formats any header and an output container ([`crate::outputs`]) says where the
//! bytes go: a list of [`Extent`]s planned before the copy (raw LUKS), or an
//! [`Allocator`] that places the granules holding data as the copy reads them (the sparse
//! qcow2 and VHD outputs, [`Engine::write_allocated`]). An engine only turns the source's
//! plaintext into ciphertext at those places. Two engines implement [`Engine`]:
//! [`userspace`] (AES-XTS in this process, runs anywhere, every output format) and [`kernel`]
//! (loop device + dm-crypt, where the kernel has them; raw LUKS only, since dm-crypt maps one
//! contiguous payload).

pub mod kernel;
pub mod userspace;
pub mod xts;

use std::fs::File;
use std::sync::atomic::AtomicBool;

use imgcrypt_proto::api::EngineKind;

use crate::formats::SourceImage;
use crate::outputs::{Allocator, Extent};
use crate::Result;
use xts::IvMode;

/// Everything an engine needs to write one payload.
pub struct PayloadJob<'a> {
    /// The job's identifier: names the kernel engine's devices and its log lines.
    pub job_id: u64,
    /// Plaintext source.
    pub source: &'a dyn SourceImage,
    /// The output, already checked to be a writable regular file or block device large enough
    /// for every extent.
    pub output: &'a File,
    /// Where the payload goes: sorted by guest offset, disjoint, sector-aligned (an output
    /// container's plan, checked by [`crate::outputs::check_extents`]). Empty for
    /// [`Engine::write_allocated`], whose allocator places the payload.
    pub extents: &'a [Extent],
    /// Encryption sector size: 512 or 4096.
    pub sector_size: u32,
    /// The AES-XTS key: a LUKS volume key (64 bytes), or a VHD's key (32 or 64 bytes).
    pub key: &'a [u8],
    /// How sector numbers become tweaks.
    pub iv: IvMode,
    /// Called with the cumulative payload bytes written (for [`Engine::write_allocated`]: guest
    /// bytes gone through, stored or dropped as zeros), from any worker thread.
    pub progress: &'a (dyn Fn(u64) + Sync),
    /// Set when the job must stop; the engine returns [`crate::Error::Cancelled`] promptly.
    pub cancel: &'a AtomicBool,
}

impl PayloadJob<'_> {
    /// Payload bytes the job writes: the sum of its extents.
    pub fn payload_bytes(&self) -> u64 {
        self.extents.iter().map(|extent| extent.length).sum()
    }

    /// The payload as dm-crypt maps it, when it is one run of a raw LUKS payload: the whole
    /// payload (from guest offset 0, IVs counted from 0), or a part of one that starts at guest
    /// offset `g` with IV `g / 512` (a resumed or checkpointed copy writes its payload range by
    /// range). Returns `(data_offset, guest_offset, length)`: the payload's start in the output,
    /// the run's first guest byte, and its length.
    pub fn single_run(&self) -> Option<(u64, u64, u64)> {
        match self.extents {
            [only]
                if only.first_iv.checked_mul(512) == Some(only.guest_offset)
                    && only.output_offset >= only.guest_offset =>
            {
                Some((
                    only.output_offset - only.guest_offset,
                    only.guest_offset,
                    only.length,
                ))
            }
            _ => None,
        }
    }
}

/// A way to write an encrypted payload.
pub trait Engine: Send + Sync {
    /// Which engine this is, for the summary.
    fn kind(&self) -> EngineKind;

    /// Writes the whole payload of `job`, durable or not (the job syncs), and returns the bytes
    /// written.
    fn write_payload(&self, job: &PayloadJob<'_>) -> Result<u64>;

    /// Writes a sparse container's payload: goes through the source's allocated ranges in
    /// `allocator`'s granules, drops the all-zero ones, and writes the others where `allocator`
    /// places them (see [`crate::outputs`]). Returns the payload bytes written. Only the
    /// userspace engine can: dm-crypt maps one contiguous payload.
    fn write_allocated(&self, job: &PayloadJob<'_>, allocator: &dyn Allocator) -> Result<u64> {
        let _ = (job, allocator);
        Err(crate::Error::InvalidOption {
            parameter: "engine",
            message: format!(
                "the {:?} engine writes raw LUKS only (one contiguous payload); a sparse qcow2 \
                 or VHD output is written by the userspace engine: use --engine userspace",
                self.kind()
            ),
        })
    }

    /// Streams the guest bytes `range` of `job`'s extents, encrypted, into `job.output`, a
    /// pipe, strictly in order ([`imgcrypt_proto::stream`]); returns the bytes written. Only
    /// the userspace engine can: dm-crypt writes through a device at offsets.
    fn write_stream(&self, job: &PayloadJob<'_>, range: std::ops::Range<u64>) -> Result<u64> {
        let _ = (job, range);
        Err(crate::Error::InvalidOption {
            parameter: "engine",
            message: format!(
                "the {:?} engine cannot stream an output (dm-crypt writes at offsets); a \
                 streamed output is written by the userspace engine: use --engine userspace",
                self.kind()
            ),
        })
    }
}

/// The engines this daemon can run, and what `auto` means here.
pub struct EngineSet {
    userspace: std::sync::Arc<dyn Engine>,
    /// The kernel engine, or why it cannot run on this host.
    kernel: std::result::Result<std::sync::Arc<dyn Engine>, String>,
    /// What a job asking for `auto` gets.
    auto: imgcrypt_proto::api::EngineChoice,
}

impl EngineSet {
    /// Builds the set. `daemon_choice` is the daemon's `--engine`: `auto` prefers the kernel
    /// engine where it can run; an explicit `kernel` that cannot run is an error now, at start-up,
    /// rather than on every job.
    pub fn new(
        daemon_choice: imgcrypt_proto::api::EngineChoice,
        userspace: std::sync::Arc<dyn Engine>,
        kernel: std::result::Result<std::sync::Arc<dyn Engine>, String>,
    ) -> Result<Self> {
        use imgcrypt_proto::api::EngineChoice;
        if let (EngineChoice::Kernel, Err(reason)) = (daemon_choice, &kernel) {
            return Err(crate::Error::EngineUnavailable {
                engine: "kernel",
                reason: reason.clone(),
            });
        }
        let auto = match daemon_choice {
            EngineChoice::Auto if kernel.is_ok() => EngineChoice::Kernel,
            EngineChoice::Auto => EngineChoice::Userspace,
            explicit => explicit,
        };
        Ok(Self {
            userspace,
            kernel,
            auto,
        })
    }

    /// Why the kernel engine cannot run here, or `None` when it can.
    pub fn kernel_unavailable(&self) -> Option<&str> {
        self.kernel.as_ref().err().map(String::as_str)
    }

    /// The engine a job asking for `auto` gets.
    pub fn auto(&self) -> EngineKind {
        match self.auto {
            imgcrypt_proto::api::EngineChoice::Kernel => EngineKind::Kernel,
            _ => EngineKind::Userspace,
        }
    }

    /// The engine for a job that asked for `choice`.
    pub fn resolve(
        &self,
        choice: imgcrypt_proto::api::EngineChoice,
    ) -> Result<std::sync::Arc<dyn Engine>> {
        use imgcrypt_proto::api::EngineChoice;
        let choice = match choice {
            EngineChoice::Auto => self.auto,
            explicit => explicit,
        };
        match choice {
            EngineChoice::Kernel => match &self.kernel {
                Ok(engine) => Ok(engine.clone()),
                Err(reason) => Err(crate::Error::EngineUnavailable {
                    engine: "kernel",
                    reason: reason.clone(),
                }),
            },
            _ => Ok(self.userspace.clone()),
        }
    }
}
