//! The dm-crypt mapping over the loop device, made and removed by ioctl (devicemapper crate).
//!
//! [`CryptTarget`] builds the one-line `crypt` table that matches the LUKS header the job
//! formatted, exactly as cryptsetup would load it for that header:
//!
//! ```text
//! 0 <payload in 512-byte sectors> crypt aes-xts-plain64 :64:logon:<key description> 0 <loop major:minor> <data offset in 512-byte sectors> [1 sector_size:4096]
//! ```
//!
//! The IV offset is 0 because plain64 counts 512-byte sectors from the start of the data
//! segment, which is what the userspace engine does too. [`Mapping::create`] runs
//! `DM_DEV_CREATE` (name `imgcrypt-<job>`, UUID `IMGCRYPT-<job>`), `DM_TABLE_LOAD` with
//! `DM_SECURE_DATA` (the kernel wipes its copy of the ioctl buffer), and `DM_DEV_SUSPEND`
//! without the suspend flag, which resumes the device and makes the table live.
//!
//! # udev
//!
//! Every ioctl that generates a uevent carries cryptsetup's flags for private devices
//! ([`DmOptions::private`]: no subsystem, disk or other rules), so blkid, systemd and desktop
//! automounters leave the device alone and never hold it open while we remove it. The
//! devicemapper crate (0.34.8, read from its source) synchronises with udev only when
//! `/run/udev/control` exists, and only for resume and remove: it then waits on a SysV semaphore
//! that udev's `95-dm-notify.rules` releases. Without udev it does not wait, and creates no
//! `/dev/mapper` link either: we open `/dev/dm-<minor>` ourselves ([`Mapping::open`]), making
//! the node when `/dev` is not devtmpfs. The kernel engine's availability check refuses the
//! set-ups where that wait could never end (udev running without the dm rules, or in another
//! IPC namespace).
//!
//! # Removal
//!
//! [`Mapping`] removes the device when dropped, so every error path tears it down. Removal
//! retries while the device is busy (the crate retries `EBUSY` 5 × 200 ms, we repeat that a few
//! times) and falls back to a deferred remove, which the kernel completes when the last holder
//! closes the device.

use std::path::PathBuf;
use std::time::Duration;

use devicemapper::{DevId, DmError, DmFlags, DmName, DmNameBuf, DmOptions, DmUuidBuf, DM};

use crate::devices::names::JobDeviceNames;
use crate::devices::node::BlockNode;
use crate::{Error, Result};

/// Bytes in the sectors dm tables count in, whatever the encryption sector size.
pub const TABLE_SECTOR_BYTES: u64 = 512;

/// The cipher specification of every LUKS header we write (dm-crypt's `<cipher>` argument).
pub const CIPHER: &str = "aes-xts-plain64";

/// Rounds of the crate's own `EBUSY` retries before a deferred remove.
const REMOVE_ROUNDS: usize = 3;

/// Pause between those rounds, on top of the crate's own.
const REMOVE_PAUSE: Duration = Duration::from_millis(500);

/// One `crypt` target covering the whole payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptTarget {
    length_sectors: u64,
    key_reference: String,
    backing: (u32, u32),
    offset_sectors: u64,
    sector_size: u32,
    /// Added to each 512-byte sector number to make its IV (dm-crypt's `iv_offset`).
    iv_offset: u64,
}

impl CryptTarget {
    /// The target for `payload_bytes` of payload at `data_offset` bytes into the backing device
    /// `backing` (major, minor), with the key named by `key_reference` (a keyring reference
    /// `:<bytes>:<type>:<description>`; hex keys are refused so that no key can reach a table)
    /// and encryption sectors of `sector_size` bytes (512 or 4096).
    pub fn new(
        payload_bytes: u64,
        key_reference: &str,
        backing: (u32, u32),
        data_offset: u64,
        sector_size: u32,
    ) -> Result<Self> {
        let problem = if sector_size != 512 && sector_size != 4096 {
            Some(format!(
                "encryption sector size {sector_size} is not 512 or 4096"
            ))
        } else if payload_bytes == 0 || payload_bytes % u64::from(sector_size) != 0 {
            Some(format!(
                "payload size {payload_bytes} is not a positive multiple of the {sector_size}-byte \
                 sector"
            ))
        } else if data_offset % u64::from(sector_size) != 0 {
            Some(format!(
                "data offset {data_offset} is not a multiple of the {sector_size}-byte sector"
            ))
        } else if !key_reference.starts_with(':')
            || key_reference.contains(char::is_whitespace)
            || key_reference.split(':').count() < 4
        {
            Some(
                "the dm-crypt key must be a keyring reference `:<bytes>:<type>:<description>`"
                    .into(),
            )
        } else {
            None
        };
        if let Some(message) = problem {
            return Err(Error::io(
                "building the dm-crypt table",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
            ));
        }
        Ok(Self {
            length_sectors: payload_bytes / TABLE_SECTOR_BYTES,
            key_reference: key_reference.to_string(),
            backing,
            offset_sectors: data_offset / TABLE_SECTOR_BYTES,
            sector_size,
            iv_offset: 0,
        })
    }

    /// The same target with IVs counted from `iv_offset` (512-byte units, as LUKS's plain64
    /// IVs are without `iv_large_sectors`): a mapping of part of a payload, from guest sector
    /// `iv_offset` on.
    pub fn with_iv_offset(mut self, iv_offset: u64) -> Self {
        self.iv_offset = iv_offset;
        self
    }

    /// Length of the mapping in 512-byte sectors.
    pub fn length_sectors(&self) -> u64 {
        self.length_sectors
    }

    /// The target's parameters: `<cipher> <key> <iv_offset> <device> <offset> [<#opt> <opts>]`.
    pub fn params(&self) -> String {
        let (major, minor) = self.backing;
        let mut params = format!(
            "{CIPHER} {} {} {major}:{minor} {}",
            self.key_reference, self.iv_offset, self.offset_sectors
        );
        if self.sector_size != 512 {
            params.push_str(&format!(" 1 sector_size:{}", self.sector_size));
        }
        params
    }

    /// The whole table line, as `dmsetup table` shows it.
    pub fn table_line(&self) -> String {
        format!("0 {} crypt {}", self.length_sectors, self.params())
    }

    /// The table in the devicemapper crate's form.
    fn dm_table(&self) -> Vec<(u64, u64, String, String)> {
        vec![(0, self.length_sectors, "crypt".to_string(), self.params())]
    }
}

/// How a device-mapper device went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Removed now (or it was already gone).
    Removed,
    /// Still busy after every retry: the kernel removes it when its last holder closes it.
    Deferred,
}

/// A live dm-crypt mapping of ours; removed when dropped or [removed](Self::remove).
pub struct Mapping {
    dm: DM,
    name: DmNameBuf,
    /// `name` for messages (the crate's name type has no `Display`).
    label: String,
    device: (u32, u32),
    removed: bool,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("name", &self.label)
            .field("device", &self.device)
            .field("removed", &self.removed)
            .finish()
    }
}

impl Mapping {
    /// Creates the device, loads `target` and resumes it.
    ///
    /// The key the target refers to must be in the calling thread's keyring now: dm-crypt reads
    /// it during the table load, on this thread. Once this returns the key may be removed.
    pub fn create(names: &JobDeviceNames, target: &CryptTarget) -> Result<Self> {
        let dm = open_control()?;
        let name = DmNameBuf::new(names.mapper_name().to_string())
            .map_err(|e| dm_error(format!("naming mapper {}", names.mapper_name()), e))?;
        let uuid = DmUuidBuf::new(names.dm_uuid().to_string())
            .map_err(|e| dm_error(format!("setting DM UUID {}", names.dm_uuid()), e))?;
        let info = dm
            .device_create(&name, Some(&uuid), DmOptions::private())
            .map_err(|e| {
                let busy = errno_of(&e) == Some(libc::EBUSY);
                let error = dm_error(
                    format!("creating device-mapper device {}", names.mapper_name()),
                    e,
                );
                if busy {
                    busy_name(names, error)
                } else {
                    error
                }
            })?;
        let device = info.device();
        // From here on, dropping `mapping` removes the device.
        let mapping = Self {
            dm,
            name,
            label: names.mapper_name().to_string(),
            device: (device.major, device.minor),
            removed: false,
        };
        tracing::debug!(
            mapper = %mapping.label,
            table = %target.table_line(),
            "loading the dm-crypt table"
        );
        mapping
            .dm
            .table_load(
                &mapping.id(),
                &target.dm_table(),
                DmOptions::private().set_flags(DmFlags::DM_SECURE_DATA),
            )
            .map_err(|e| table_error(&mapping.label, e))?;
        // DM_DEV_SUSPEND without DM_SUSPEND resumes: the loaded table goes live.
        mapping
            .dm
            .device_suspend(&mapping.id(), DmOptions::private())
            .map_err(|e| dm_error(format!("resuming {}", mapping.label), e))?;
        Ok(mapping)
    }

    fn id(&self) -> DevId<'_> {
        DevId::Name(&self.name)
    }

    /// The device-mapper name.
    pub fn name(&self) -> &str {
        &self.label
    }

    /// `(major, minor)` of the mapped device.
    pub fn device_number(&self) -> (u32, u32) {
        self.device
    }

    /// `/dev/dm-<minor>`, the kernel's node name for it.
    pub fn node_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/dm-{}", self.device.1))
    }

    /// Opens the mapped device for O_DIRECT writes (making its node if `/dev` has none).
    pub fn open(&self) -> Result<BlockNode> {
        BlockNode::open(&self.node_path(), self.device, libc::O_DIRECT)
    }

    /// Removes the device; close every descriptor of it first.
    pub fn remove(mut self) -> Result<Removal> {
        self.removed = true;
        remove_device(&self.dm, &self.name)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        match remove_device(&self.dm, &self.name) {
            Ok(Removal::Removed) => {}
            Ok(Removal::Deferred) => tracing::warn!(
                mapper = %self.label,
                "the mapping is still open; the kernel removes it when its holder closes it"
            ),
            Err(error) => tracing::error!(
                mapper = %self.label,
                %error,
                "could not remove the mapping; remove it with `dmsetup remove {}` (the daemon also \
                 removes it at its next start)",
                self.label
            ),
        }
    }
}

/// Opens `/dev/mapper/control`.
pub fn open_control() -> Result<DM> {
    DM::new().map_err(|e| {
        Error::io(
            "opening /dev/mapper/control",
            std::io::Error::other(format!(
                "{e} (is device-mapper in the kernel, `modprobe dm_mod`?)"
            )),
        )
    })
}

/// Removes device `name`, retrying while it is busy and deferring the removal as a last resort.
pub fn remove_device(dm: &DM, name: &DmName) -> Result<Removal> {
    let id = DevId::Name(name);
    for round in 0..REMOVE_ROUNDS {
        // The crate itself retries EBUSY for about a second.
        match dm.device_remove(&id, DmOptions::private()) {
            Ok(_) => return Ok(Removal::Removed),
            Err(error) => match errno_of(&error) {
                Some(libc::ENXIO) => return Ok(Removal::Removed),
                Some(libc::EBUSY) => {
                    tracing::debug!(mapper = %name, round, "device busy; retrying removal");
                    std::thread::sleep(REMOVE_PAUSE);
                }
                _ => return Err(dm_error(format!("removing {name}"), error)),
            },
        }
    }
    match dm.device_remove(
        &id,
        DmOptions::private().set_flags(DmFlags::DM_DEFERRED_REMOVE),
    ) {
        Ok(_) => Ok(Removal::Deferred),
        Err(error) if errno_of(&error) == Some(libc::ENXIO) => Ok(Removal::Removed),
        Err(error) => Err(dm_error(format!("deferred removal of {name}"), error)),
    }
}

/// The errno of a failed device-mapper ioctl.
pub fn errno_of(error: &DmError) -> Option<i32> {
    match error {
        DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => Some(**errno as i32),
        _ => None,
    }
}

/// An [`Error::Io`] for a failed devicemapper call: the errno when there is one (the crate's
/// full message, with both ioctl headers, goes to the debug log).
pub fn dm_error(operation: String, error: DmError) -> Error {
    tracing::debug!(%error, "{operation}");
    let source = match errno_of(&error) {
        Some(errno) => std::io::Error::from_raw_os_error(errno),
        None => std::io::Error::other(error.to_string()),
    };
    Error::io(operation, source)
}

fn busy_name(names: &JobDeviceNames, error: Error) -> Error {
    let Error::Io { operation, source } = error else {
        return error;
    };
    Error::io(
        format!(
            "{operation}: a device-mapper device named {} or with UUID {} already exists, left by \
             a daemon that stopped abnormally and still in use; check `dmsetup info {}` and \
             remove it with `dmsetup remove {}`",
            names.mapper_name(),
            names.dm_uuid(),
            names.mapper_name(),
            names.mapper_name()
        ),
        source,
    )
}

fn table_error(name: &str, error: DmError) -> Error {
    let hint = match errno_of(&error) {
        Some(libc::ENOKEY) => {
            " (dm-crypt did not find the volume key in the kernel keyring of the loading thread)"
        }
        Some(libc::EINVAL) | Some(libc::ENOENT) => {
            " (dm-crypt refused the table: is the dm_crypt module available, and the kernel's \
             aes and xts ciphers? `dmesg` says why)"
        }
        _ => "",
    };
    dm_error(format!("loading the dm-crypt table of {name}{hint}"), error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::keyring::dm_crypt_key_reference;

    #[test]
    fn table_for_512_byte_sectors() {
        // LUKS2 default header (16 MiB), 64 MiB payload, loop7:3.
        let target = CryptTarget::new(
            64 << 20,
            &dm_crypt_key_reference(64, "imgcrypt:job-5"),
            (7, 3),
            16 << 20,
            512,
        )
        .unwrap();
        assert_eq!(target.length_sectors(), 131_072);
        assert_eq!(
            target.table_line(),
            "0 131072 crypt aes-xts-plain64 :64:logon:imgcrypt:job-5 0 7:3 32768"
        );
        assert_eq!(
            target.dm_table(),
            vec![(
                0,
                131_072,
                "crypt".to_string(),
                "aes-xts-plain64 :64:logon:imgcrypt:job-5 0 7:3 32768".to_string()
            )]
        );
    }

    #[test]
    fn a_range_of_a_payload_counts_its_ivs_from_its_first_sector() {
        // 16 MiB of a payload from guest byte 32 MiB (sector 65536), at 48 MiB of the output.
        let target = CryptTarget::new(16 << 20, ":64:logon:imgcrypt:job-7", (7, 1), 48 << 20, 4096)
            .unwrap()
            .with_iv_offset(65_536);
        assert_eq!(
            target.table_line(),
            "0 32768 crypt aes-xts-plain64 :64:logon:imgcrypt:job-7 65536 7:1 98304 1 \
             sector_size:4096"
        );
    }

    #[test]
    fn table_for_4096_byte_sectors_and_luks1() {
        // LUKS1 header (2 MiB = 4096 sectors), 4096-byte encryption sectors, loop 7:12.
        let target =
            CryptTarget::new(1 << 30, ":64:logon:imgcrypt:job-12", (7, 12), 2 << 20, 4096).unwrap();
        assert_eq!(
            target.table_line(),
            "0 2097152 crypt aes-xts-plain64 :64:logon:imgcrypt:job-12 0 7:12 4096 1 \
             sector_size:4096"
        );
    }

    #[test]
    fn impossible_geometry_and_hex_keys_are_refused() {
        let key = ":64:logon:imgcrypt:job-1";
        let cases: [(u64, &str, u64, u32, &str); 7] = [
            (1 << 20, key, 0, 1024, "not 512 or 4096"),
            (0, key, 0, 512, "payload size 0"),
            ((1 << 20) + 512, key, 0, 4096, "payload size"),
            (1 << 20, key, 512, 4096, "data offset 512"),
            (1 << 20, &"ab".repeat(64), 0, 512, "keyring reference"),
            (1 << 20, ":64:logon:a b", 0, 512, "keyring reference"),
            (1 << 20, ":64:logon", 0, 512, "keyring reference"),
        ];
        for (payload, key, offset, sector, expected) in cases {
            let error = CryptTarget::new(payload, key, (7, 0), offset, sector).unwrap_err();
            assert!(error.to_string().contains(expected), "{expected}: {error}");
        }
    }

    /// This host's kernel has no device-mapper: creating a mapping must fail cleanly, saying
    /// what is missing. (On a kernel with device-mapper the VM suite exercises the real path.)
    #[test]
    fn without_device_mapper_creation_fails_with_the_reason() {
        if std::path::Path::new("/sys/module/dm_mod").exists() {
            return;
        }
        let names = JobDeviceNames::for_job(1);
        let target = CryptTarget::new(1 << 20, ":64:logon:imgcrypt:job-1", (7, 0), 0, 512).unwrap();
        let error = Mapping::create(&names, &target).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("/dev/mapper/control"), "{message}");
        assert!(message.contains("modprobe dm_mod"), "{message}");
    }
}
