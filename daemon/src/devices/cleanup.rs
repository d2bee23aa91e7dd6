//! The start-up sweep: removes the mappings and loop devices a crashed daemon left behind.
//!
//! A daemon killed with SIGKILL (or by the OOM killer, or a power cut of the job's thread) gets
//! no chance to run its teardown. Its loop device would go by itself (autoclear) were it not
//! held by the dm-crypt mapping over it, and the mapping stays until someone removes it. So
//! before serving anyone, the daemon lists every device-mapper device, keeps those whose DM
//! UUID starts with `IMGCRYPT-` ([`select_stale`]: the UUID, not the name, because names are
//! anyone's to pick), removes each, then detaches the loop devices its table referenced (which
//! autoclear has usually done already), and logs everything it removed.
//!
//! The sweep runs after the daemon holds its socket lock, so a second daemon that fails to start
//! never sweeps away the devices of the one running.

use devicemapper::{DevId, DmNameBuf, DmOptions, DM};

use crate::devices::loop_device::{self, Detached, LOOP_MAJOR};
use crate::devices::mapper::{self, Removal};
use crate::devices::names;
use crate::Result;

/// What the sweep knows about one device-mapper device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapperDevice {
    /// Its name (`dmsetup ls`).
    pub name: String,
    /// Its DM UUID, if it has one.
    pub uuid: Option<String>,
    /// Block devices its live table maps onto, `(major, minor)`.
    pub dependencies: Vec<(u32, u32)>,
}

impl MapperDevice {
    /// The loop devices under it.
    pub fn loop_devices(&self) -> Vec<(u32, u32)> {
        self.dependencies
            .iter()
            .copied()
            .filter(|(major, _)| *major == LOOP_MAJOR)
            .collect()
    }
}

/// The devices the kernel engine made, by DM UUID prefix; everything else is left alone.
pub fn select_stale(devices: &[MapperDevice]) -> Vec<&MapperDevice> {
    devices
        .iter()
        .filter(|device| device.uuid.as_deref().is_some_and(names::is_ours))
        .collect()
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Mappings removed.
    pub removed: Vec<String>,
    /// Mappings still held open by someone, whose removal the kernel completes when released.
    pub deferred: Vec<String>,
    /// Loop devices detached (`loopN`).
    pub loops_detached: Vec<String>,
    /// What could not be removed, and why.
    pub failures: Vec<String>,
}

/// Every device-mapper device with its UUID and dependencies. Devices that vanish while being
/// listed are skipped.
pub fn list_mappers(dm: &DM) -> Result<Vec<MapperDevice>> {
    let listed = dm
        .list_devices()
        .map_err(|e| mapper::dm_error("listing device-mapper devices".into(), e))?;
    let mut devices = Vec::with_capacity(listed.len());
    for (name, _, _) in listed {
        let id = DevId::Name(&name);
        let info = match dm.device_info(&id) {
            Ok(info) => info,
            Err(error) if mapper::errno_of(&error) == Some(libc::ENXIO) => continue,
            Err(error) => {
                return Err(mapper::dm_error(
                    format!("DM_DEV_STATUS of {}", &*name),
                    error,
                ))
            }
        };
        let dependencies = match dm.table_deps(&id, DmOptions::default()) {
            Ok(deps) => deps.iter().map(|d| (d.major, d.minor)).collect(),
            Err(error) if mapper::errno_of(&error) == Some(libc::ENXIO) => continue,
            Err(error) => {
                return Err(mapper::dm_error(
                    format!("DM_TABLE_DEPS of {}", &*name),
                    error,
                ))
            }
        };
        devices.push(MapperDevice {
            name: name.to_string(),
            uuid: info.uuid().map(|uuid| uuid.to_string()),
            dependencies,
        });
    }
    Ok(devices)
}

/// Removes every stale mapping of ours and the loop devices under it, logging each.
pub fn sweep() -> Result<SweepReport> {
    let dm = mapper::open_control()?;
    let devices = list_mappers(&dm)?;
    let mut report = SweepReport::default();
    for stale in select_stale(&devices) {
        sweep_one(&dm, stale, &mut report);
    }
    if report == SweepReport::default() {
        tracing::debug!("no devices left behind by an earlier daemon");
    }
    Ok(report)
}

fn sweep_one(dm: &DM, stale: &MapperDevice, report: &mut SweepReport) {
    let uuid = stale.uuid.as_deref().unwrap_or_default();
    let removal = DmNameBuf::new(stale.name.clone())
        .map_err(|e| mapper::dm_error(format!("naming {}", stale.name), e))
        .and_then(|name| mapper::remove_device(dm, &name));
    match removal {
        Ok(Removal::Removed) => {
            tracing::warn!(mapper = %stale.name, %uuid, "removed a mapping left by an earlier daemon");
            report.removed.push(stale.name.clone());
        }
        Ok(Removal::Deferred) => {
            tracing::warn!(
                mapper = %stale.name,
                %uuid,
                "a mapping left by an earlier daemon is still open; the kernel removes it when \
                 its holder closes it"
            );
            report.deferred.push(stale.name.clone());
        }
        Err(error) => {
            tracing::error!(mapper = %stale.name, %uuid, %error, "could not remove a mapping left by an earlier daemon");
            report.failures.push(format!("{}: {error}", stale.name));
            return;
        }
    }
    for number in stale.loop_devices() {
        match loop_device::detach_by_number(number) {
            Ok(Some((name, outcome))) => {
                tracing::warn!(
                    device = %name,
                    pending = outcome == Detached::Pending,
                    "detached a loop device left by an earlier daemon"
                );
                report.loops_detached.push(name);
            }
            // Autoclear detached it when the mapping let go: the usual case.
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%error, "could not detach a loop device left by an earlier daemon");
                report
                    .failures
                    .push(format!("loop {}:{}: {error}", number.0, number.1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, uuid: Option<&str>, dependencies: &[(u32, u32)]) -> MapperDevice {
        MapperDevice {
            name: name.to_string(),
            uuid: uuid.map(str::to_string),
            dependencies: dependencies.to_vec(),
        }
    }

    #[test]
    fn only_our_uuids_are_selected() {
        let devices = vec![
            device("imgcrypt-3", Some("IMGCRYPT-3"), &[(7, 2)]),
            // Someone else's device that borrowed our name pattern: not ours.
            device("imgcrypt-4", Some("CRYPT-LUKS2-aaaa-imgcrypt-4"), &[(7, 5)]),
            device("root", Some("CRYPT-LUKS2-0123-root"), &[(8, 2)]),
            device("vg-home", Some("LVM-xyz"), &[(8, 3), (8, 4)]),
            device("bare", None, &[]),
            // Ours even under another name (a rename keeps the UUID).
            device("renamed", Some("IMGCRYPT-17"), &[(7, 0), (8, 1)]),
            device("lower-case", Some("imgcrypt-9"), &[(7, 9)]),
        ];
        let selected: Vec<&str> = select_stale(&devices)
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(selected, ["imgcrypt-3", "renamed"]);
        assert_eq!(devices[5].loop_devices(), [(7, 0)]);
        assert_eq!(devices[0].loop_devices(), [(7, 2)]);
        assert!(devices[3].loop_devices().is_empty());
    }

    #[test]
    fn nothing_selected_from_foreign_devices() {
        let devices = vec![
            device("root", Some("CRYPT-LUKS2-0123-root"), &[(8, 2)]),
            device("x", Some(""), &[]),
        ];
        assert!(select_stale(&devices).is_empty());
        assert!(select_stale(&[]).is_empty());
    }

    /// Here there is no device-mapper: the sweep reports why it cannot look rather than
    /// pretending it found nothing.
    #[test]
    fn sweep_without_device_mapper_is_an_error() {
        if std::path::Path::new("/sys/module/dm_mod").exists() {
            return;
        }
        let error = sweep().unwrap_err();
        assert!(error.to_string().contains("/dev/mapper/control"), "{error}");
    }
}
