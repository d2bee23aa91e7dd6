//! The kernel engine: the payload goes through real dm-crypt.
//!
//! # Pipeline
//!
//! 1. The output descriptor is attached to a loop device (autoclear, direct I/O where the
//!    kernel takes it), covering `0..data_offset + payload_size` of the output.
//! 2. The volume key goes into this thread's kernel keyring as a `logon` key; a `crypt` table
//!    matching the header (`aes-xts-plain64`, the data offset, the encryption sector size) that
//!    names the key is loaded into a new device-mapper device `imgcrypt-<job>` (UUID
//!    `IMGCRYPT-<job>`) with `DM_SECURE_DATA`, the device is resumed, and the key is revoked:
//!    dm-crypt holds its own copy.
//! 3. The plaintext is copied onto `/dev/dm-<minor>` with O_DIRECT by the same worker pool as
//!    the userspace engine ([`Copy`]): every payload sector is written, holes of the source as
//!    zeros, so the decrypted device equals the source followed by zeros. dm-crypt encrypts in
//!    its own kernel threads, on every core.
//! 4. The device is fsynced (dm-crypt passes the flush to the loop device, which syncs the
//!    output), closed, the mapping removed, and the loop device detached.
//!
//! See the [`crate::devices`] modules for each step, and `docs/kernel-engine.md` for operators.
//!
//! # Teardown
//!
//! Each resource is a guard ([`AttachedLoop`], [`LogonKey`], [`Mapping`], the open device),
//! declared in the order they are acquired, so Rust drops them in reverse: whatever stops the
//! job — a full output (ENOSPC), an I/O error, a source read error, the cancel flag (a client
//! gone, or SIGTERM, on which the server cancels every job), even a panic — closes the device,
//! removes the mapping, and detaches the loop device. A daemon killed outright leaves the
//! mapping behind; [`crate::devices::cleanup`] removes it at the next start.

use std::sync::atomic::Ordering;

use imgcrypt_proto::api::EngineKind;

use crate::devices::availability::Probe;
use crate::devices::keyring::LogonKey;
use crate::devices::loop_device::{AttachedLoop, Detached};
use crate::devices::mapper::{CryptTarget, Mapping, Removal};
use crate::devices::names::JobDeviceNames;
use crate::engines::userspace::{check_layout, Copy, Destination, UserspaceEngine};
use crate::engines::xts::{IvMode, VOLUME_KEY_BYTES};
use crate::engines::{Engine, PayloadJob};
use crate::sys::aligned::DIRECT_IO_ALIGNMENT;
use crate::{Error, Result};

/// Loop device + dm-crypt, opened by ioctl.
#[derive(Debug, Clone)]
pub struct KernelEngine {
    workers: usize,
    chunk_size: usize,
}

impl KernelEngine {
    /// The engine if it can run here, or every reason it cannot and what to do instead.
    pub fn probe() -> std::result::Result<Self, String> {
        Probe::of_this_process().verdict()?;
        Ok(Self::unchecked())
    }

    /// The engine without checking the host; its first job fails if the host lacks what it
    /// needs. The worker pool is the userspace engine's default (one worker per core plus one,
    /// 4 MiB each): here the workers only read and write, so more would only add memory.
    pub fn unchecked() -> Self {
        let pool = UserspaceEngine::new();
        Self {
            workers: pool.workers(),
            chunk_size: pool.chunk_size(),
        }
    }
}

impl Engine for KernelEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Kernel
    }

    fn write_payload(&self, job: &PayloadJob<'_>) -> Result<u64> {
        check_layout(job)?;
        let Some((data_offset, guest_offset, payload_size)) = job.single_run() else {
            return Err(Error::EngineUnavailable {
                engine: "kernel",
                reason: "dm-crypt maps one contiguous payload, so the kernel engine writes raw \
                         LUKS images only; qcow2 and VHD outputs use the userspace engine \
                         (--engine userspace, or auto)"
                    .to_string(),
            });
        };
        if job.key.len() != VOLUME_KEY_BYTES || job.iv != IvMode::Plain64 {
            return Err(Error::io(
                "preparing the dm-crypt key",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "the volume key has {} bytes with {:?} IVs; aes-xts-plain64 with two \
                         AES-256 keys needs {VOLUME_KEY_BYTES} bytes and plain64",
                        job.key.len(),
                        job.iv
                    ),
                ),
            ));
        }
        if data_offset % DIRECT_IO_ALIGNMENT as u64 != 0 {
            return Err(Error::io(
                "mapping the payload",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("data offset {data_offset} is not a multiple of {DIRECT_IO_ALIGNMENT}"),
                ),
            ));
        }
        if payload_size == 0 {
            return Ok(0);
        }
        if job.cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        let names = JobDeviceNames::for_job(job.job_id);

        // A run that starts past the payload's start (a resumed copy) maps just that run: the
        // device's offset 0 is guest byte `guest_offset`, its IVs start at `guest_offset / 512`.
        let run_offset = data_offset + guest_offset;
        let backing = AttachedLoop::attach(job.output, 0, run_offset + payload_size, true)?;
        let mapping = map_payload(
            job,
            run_offset,
            guest_offset,
            payload_size,
            &names,
            &backing,
        )?;
        let device = mapping.open()?;
        tracing::info!(
            job = job.job_id,
            mapper = %mapping.name(),
            device = %device.path().display(),
            loop_device = %backing.name(),
            loop_direct_io = backing.is_direct_io(),
            workers = self.workers,
            chunk_size = self.chunk_size,
            "kernel engine copy starting"
        );

        let note = format!(
            "through the dm-crypt device {}, whose offsets count from guest byte {guest_offset} \
             at byte {run_offset} of the output",
            device.path().display(),
        );
        let copied = Copy::new(
            self.workers,
            self.chunk_size,
            job,
            None,
            Destination::PlaintextDevice(device.file()),
        )
        .describing_target(note)
        .device_starting_at(guest_offset)
        .run()
        .and_then(|()| {
            device.file().sync_all().map_err(|e| {
                Error::io(
                    format!("fsync on {} (the dm-crypt device)", device.path().display()),
                    e,
                )
            })
        });

        // Tear down in order whatever happened, then report the copy's error first: it is the
        // cause, and a teardown failure after it is a consequence.
        drop(device);
        let removed = mapping.remove();
        let detached = backing.detach();
        copied?;
        if removed? == Removal::Deferred {
            tracing::warn!(
                mapper = names.mapper_name(),
                "the mapping was still busy; the kernel removes it when released"
            );
        }
        if detached? == Detached::Pending {
            tracing::warn!("the loop device was still held; autoclear detaches it when released");
        }
        Ok(payload_size)
    }
}

/// Loads the key, maps dm-crypt over the loop device (`payload_size` bytes at `data_offset`,
/// IVs from `guest_offset / 512`), and drops the key from the keyring.
fn map_payload(
    job: &PayloadJob<'_>,
    data_offset: u64,
    guest_offset: u64,
    payload_size: u64,
    names: &JobDeviceNames,
    backing: &AttachedLoop<'_>,
) -> Result<Mapping> {
    let key = LogonKey::add_to_thread_keyring(names.key_description(), job.key)?;
    let target = CryptTarget::new(
        payload_size,
        &key.dm_crypt_reference(),
        backing.device_number(),
        data_offset,
        job.sector_size,
    )?
    .with_iv_offset(guest_offset / 512);
    // Same thread as the key: dm-crypt looks it up in this thread's keyring.
    let mapping = Mapping::create(names, &target)?;
    key.remove()?;
    Ok(mapping)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::SourceImage;
    use crate::outputs::Extent;
    use imgcrypt_proto::api::SourceFormat;
    use std::ops::Range;
    use std::sync::atomic::AtomicBool;

    #[derive(Debug)]
    struct ZeroSource(u64);

    impl SourceImage for ZeroSource {
        fn format(&self) -> SourceFormat {
            SourceFormat::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, buffer: &mut [u8], _offset: u64) -> Result<()> {
            buffer.fill(0);
            Ok(())
        }
        fn allocated_ranges(&self) -> &[Range<u64>] {
            &[]
        }
    }

    fn loop_devices_backed_by(path: &std::path::Path) -> Vec<String> {
        let path = path.canonicalize().unwrap();
        std::fs::read_dir("/sys/block")
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with("loop"))
            .filter(|name| {
                crate::devices::loop_device::read_sysfs(name, "backing_file")
                    .is_some_and(|backing| std::path::Path::new(&backing) == path)
            })
            .collect()
    }

    /// On this host (no device-mapper) the engine gets as far as the loop device and the key,
    /// then fails at the mapping: the failure path must leave no loop device, no key and the
    /// output's flags as they were. The VM suite proves the successful path and the other
    /// failures on a kernel with dm-crypt.
    #[test]
    fn a_failed_mapping_leaves_no_loop_device_and_no_key() {
        if std::path::Path::new("/sys/module/dm_mod").exists() {
            return;
        }
        let output = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        output.as_file().set_len((16 << 20) + (4 << 20)).unwrap();
        let flags_before = crate::sys::direct_io::status_flags(output.as_file()).unwrap();
        let source = ZeroSource(4 << 20);
        let cancel = AtomicBool::new(false);
        let progress = |_: u64| {};
        let key = [0x5au8; VOLUME_KEY_BYTES];
        let extents = [Extent {
            guest_offset: 0,
            length: 4 << 20,
            output_offset: 16 << 20,
            first_iv: 0,
        }];
        let job = PayloadJob {
            job_id: 987_654,
            source: &source,
            output: output.as_file(),
            extents: &extents,
            sector_size: 4096,
            key: &key,
            iv: IvMode::Plain64,
            progress: &progress,
            cancel: &cancel,
        };
        let error = KernelEngine::unchecked().write_payload(&job).unwrap_err();
        assert!(error.to_string().contains("/dev/mapper/control"), "{error}");

        assert!(
            loop_devices_backed_by(output.path()).is_empty(),
            "a loop device still backs the output"
        );
        // An unlinked key is garbage-collected by a kernel work item: give it a moment.
        let started = std::time::Instant::now();
        loop {
            let proc_keys = std::fs::read_to_string("/proc/keys").unwrap();
            if !proc_keys.contains("imgcrypt:job-987654") {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "the key is still in a keyring: {proc_keys}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            crate::sys::direct_io::status_flags(output.as_file()).unwrap(),
            flags_before
        );
    }

    #[test]
    fn wrong_key_size_and_cancel_stop_before_any_device() {
        let output = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        output.as_file().set_len(2 << 20).unwrap();
        let source = ZeroSource(1 << 20);
        let cancel = AtomicBool::new(false);
        let progress = |_: u64| {};
        let short_key = [1u8; 32];
        let extents = [Extent {
            guest_offset: 0,
            length: 1 << 20,
            output_offset: 1 << 20,
            first_iv: 0,
        }];
        let mut job = PayloadJob {
            job_id: 1,
            source: &source,
            output: output.as_file(),
            extents: &extents,
            sector_size: 512,
            key: &short_key,
            iv: IvMode::Plain64,
            progress: &progress,
            cancel: &cancel,
        };
        let engine = KernelEngine::unchecked();
        let error = engine.write_payload(&job).unwrap_err();
        assert!(error.to_string().contains("32 bytes"), "{error}");

        // A container's layout (more than one run, or IVs not from 0) is not dm-crypt's.
        let key = [1u8; VOLUME_KEY_BYTES];
        job.key = &key;
        let scattered = [
            Extent {
                guest_offset: 0,
                length: 4096,
                output_offset: 1 << 20,
                first_iv: 2048,
            },
            Extent {
                guest_offset: 8192,
                length: 4096,
                output_offset: (1 << 20) + 4096,
                first_iv: 2056,
            },
        ];
        job.extents = &scattered;
        let error = engine.write_payload(&job).unwrap_err();
        assert!(
            matches!(error, Error::EngineUnavailable { .. })
                && error.to_string().contains("raw LUKS"),
            "{error}"
        );
        job.extents = &extents;
        cancel.store(true, Ordering::SeqCst);
        assert!(matches!(engine.write_payload(&job), Err(Error::Cancelled)));
        assert!(loop_devices_backed_by(output.path()).is_empty());
        assert_eq!(engine.kind(), EngineKind::Kernel);
    }
}
