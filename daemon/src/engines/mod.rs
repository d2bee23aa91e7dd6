//! Engines write the encrypted payload of a LUKS image.
//!
//! The job formats the header and decides the layout; an engine only turns the source's
//! plaintext into dm-crypt-compatible ciphertext at `data_offset..data_offset + payload_size` of
//! the output. Two engines implement [`Engine`]: [`userspace`] (AES-XTS in this process, runs
//! anywhere) and [`kernel`] (loop device + dm-crypt, where the kernel has them).

pub mod kernel;
pub mod userspace;
pub mod xts;

use std::fs::File;
use std::sync::atomic::AtomicBool;

use imgcrypt_proto::api::EngineKind;

use crate::formats::SourceImage;
use crate::Result;

/// Everything an engine needs to write one payload.
pub struct PayloadJob<'a> {
    /// The job's identifier: names the kernel engine's devices and its log lines.
    pub job_id: u64,
    /// Plaintext source.
    pub source: &'a dyn SourceImage,
    /// The output, already checked to be a writable regular file or block device of at least
    /// `data_offset + payload_size` bytes.
    pub output: &'a File,
    /// Byte offset of the payload in the output (the LUKS header's size).
    pub data_offset: u64,
    /// Payload bytes to write: the source's virtual size rounded up; the tail past the source is
    /// encrypted zeros, so the decrypted device equals the source followed by zeros.
    pub payload_size: u64,
    /// Encryption sector size: 512 or 4096.
    pub sector_size: u32,
    /// The 512-bit AES-XTS volume key (two AES-256 keys).
    pub volume_key: &'a [u8],
    /// Called with the cumulative payload bytes written, from any worker thread.
    pub progress: &'a (dyn Fn(u64) + Sync),
    /// Set when the job must stop; the engine returns [`crate::Error::Cancelled`] promptly.
    pub cancel: &'a AtomicBool,
}

/// A way to write an encrypted payload.
pub trait Engine: Send + Sync {
    /// Which engine this is, for the summary.
    fn kind(&self) -> EngineKind;

    /// Writes the whole payload of `job`, durable or not (the job syncs), and returns the bytes
    /// written.
    fn write_payload(&self, job: &PayloadJob<'_>) -> Result<u64>;
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
