//! Whether the kernel engine can run here, and if not, which check failed and what to do.
//!
//! The engine needs, all at once:
//! - device-mapper: `/dev/mapper/control` opens and answers `DM_VERSION` (a kernel without
//!   `dm_mod`, like the build machines' Firecracker kernel, fails with `ENODEV`);
//! - loop devices: `/dev/loop-control` opens;
//! - `CAP_SYS_ADMIN` in the effective set (device-mapper and loop ioctls check it);
//! - when udev runs (`/run/udev/control` exists), a way for udev to confirm our device changes:
//!   the devicemapper crate then waits on a SysV semaphore that only udev's
//!   `95-dm-notify.rules` (package dmsetup) releases, and udev can reach it only from the same
//!   IPC namespace. Without the rules, or from a private IPC namespace (systemd's
//!   `PrivateIPC=yes`), that wait never ends, so the engine is refused instead of hanging.
//!
//! [`Probe::of_this_process`] gathers the facts; [`Probe::verdict`] turns them into the answer,
//! so the decision is tested with any combination of facts.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `CAP_SYS_ADMIN` in <linux/capability.h>.
const CAP_SYS_ADMIN: u32 = 21;

/// Where udev's rules live, in its search order.
const UDEV_RULE_DIRECTORIES: [&str; 4] = [
    "/etc/udev/rules.d",
    "/run/udev/rules.d",
    "/usr/lib/udev/rules.d",
    "/lib/udev/rules.d",
];

/// The rule file that releases device-mapper's udev cookies.
const DM_NOTIFY_RULES: &str = "95-dm-notify.rules";

/// The facts the kernel engine's availability depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `/dev/mapper/control` opened and answered; else why not.
    pub mapper_control: Result<(), String>,
    /// `/dev/loop-control` opened; else why not.
    pub loop_control: Result<(), String>,
    /// Whether `CAP_SYS_ADMIN` is effective; `None` when it could not be read.
    pub cap_sys_admin: Option<bool>,
    /// What udev would make of our device changes.
    pub udev: UdevProbe,
}

/// udev's side of the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdevProbe {
    /// `/run/udev/control` exists: the devicemapper crate will wait for udev.
    pub running: bool,
    /// `95-dm-notify.rules` is installed.
    pub notify_rules: bool,
    /// Whether we share pid 1's IPC namespace; `None` when that cannot be seen.
    pub same_ipc_namespace_as_init: Option<bool>,
}

impl Probe {
    /// Looks at this process and this host.
    pub fn of_this_process() -> Self {
        Self {
            mapper_control: probe_mapper_control(),
            loop_control: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/loop-control")
                .map(drop)
                .map_err(|e| describe_open_error("/dev/loop-control", &e, "loop")),
            cap_sys_admin: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|status| effective_capability(&status, CAP_SYS_ADMIN)),
            udev: UdevProbe {
                running: Path::new("/run/udev/control").exists(),
                notify_rules: UDEV_RULE_DIRECTORIES
                    .iter()
                    .any(|dir| Path::new(dir).join(DM_NOTIFY_RULES).exists()),
                same_ipc_namespace_as_init: same_namespace("/proc/self/ns/ipc", "/proc/1/ns/ipc"),
            },
        }
    }

    /// `Ok` when the kernel engine can run; else every failed check and what to do.
    pub fn verdict(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        match self.cap_sys_admin {
            Some(true) => {}
            Some(false) => problems.push(
                "the daemon lacks CAP_SYS_ADMIN, which device-mapper and loop devices require: \
                 run the system daemon as root (keep CAP_SYS_ADMIN in its unit's \
                 CapabilityBoundingSet)"
                    .to_string(),
            ),
            None => problems.push(
                "the daemon's capabilities could not be read from /proc/self/status".to_string(),
            ),
        }
        if let Err(why) = &self.mapper_control {
            problems.push(why.clone());
        }
        if let Err(why) = &self.loop_control {
            problems.push(why.clone());
        }
        if self.udev.running && !self.udev.notify_rules {
            problems.push(format!(
                "udev is running but its device-mapper rules ({DM_NOTIFY_RULES}, package dmsetup) \
                 are not installed, so udev would never confirm our device changes and the \
                 daemon would wait for ever: install dmsetup"
            ));
        }
        if self.udev.running && self.udev.same_ipc_namespace_as_init == Some(false) {
            problems.push(
                "the daemon runs in an IPC namespace of its own (PrivateIPC=yes?) while udev runs \
                 in the host's, so udev cannot confirm our device changes: run the daemon in the \
                 host's IPC namespace"
                    .to_string(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{}; use the userspace engine instead (--engine userspace, or auto, which picks it \
                 by itself)",
                problems.join("; ")
            ))
        }
    }
}

fn probe_mapper_control() -> Result<(), String> {
    const PATH: &str = "/dev/mapper/control";
    // Open it ourselves first: the devicemapper crate's error loses the errno.
    if let Err(error) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(PATH)
    {
        return Err(describe_open_error(PATH, &error, "device-mapper"));
    }
    let dm = devicemapper::DM::new().map_err(|e| format!("{PATH}: {e}"))?;
    dm.version().map(drop).map_err(|e| {
        format!(
            "{PATH} opened but DM_VERSION failed ({}): the daemon needs root with CAP_SYS_ADMIN",
            crate::devices::mapper::errno_of(&e)
                .map(|errno| std::io::Error::from_raw_os_error(errno).to_string())
                .unwrap_or_else(|| e.to_string())
        )
    })
}

/// "PATH: <error> (<what it means here>)".
fn describe_open_error(path: &str, error: &std::io::Error, subsystem: &str) -> String {
    let meaning = match error.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::ENXIO) => format!(
            "this kernel has no {subsystem} support loaded: load its module (`modprobe {}`) or \
             use a kernel that has it",
            module_of(subsystem)
        ),
        Some(libc::ENOENT) => format!(
            "no such node: this kernel has no {subsystem} support loaded (`modprobe {}`), or /dev \
             lacks the node",
            module_of(subsystem)
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "permission denied: the daemon must run as root; \
             under systemd, allow the device with DeviceAllow="
                .to_string()
        }
        _ => "unexpected error".to_string(),
    };
    format!("cannot open {path}: {error} ({meaning})")
}

fn module_of(subsystem: &str) -> &'static str {
    if subsystem == "loop" {
        "loop"
    } else {
        "dm_crypt"
    }
}

/// Whether bit `capability` is set in the `CapEff:` line of a `/proc/<pid>/status` text.
pub fn effective_capability(status: &str, capability: u32) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    let mask = u64::from_str_radix(hex, 16).ok()?;
    Some(capability < 64 && mask & (1u64 << capability) != 0)
}

/// Whether two `/proc/*/ns/*` links name the same namespace (same device and inode).
fn same_namespace(ours: &str, theirs: &str) -> Option<bool> {
    let ours = std::fs::metadata(ours).ok()?;
    let theirs = std::fs::metadata(theirs).ok()?;
    Some(ours.dev() == theirs.dev() && ours.ino() == theirs.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capable_host() -> Probe {
        Probe {
            mapper_control: Ok(()),
            loop_control: Ok(()),
            cap_sys_admin: Some(true),
            udev: UdevProbe {
                running: false,
                notify_rules: false,
                same_ipc_namespace_as_init: None,
            },
        }
    }

    #[test]
    fn capabilities_are_read_from_cap_eff() {
        let status = "Name:\timgcryptd\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(effective_capability(status, CAP_SYS_ADMIN), Some(true));
        // Bit 24 (CAP_SYS_RESOURCE) is clear in that mask.
        assert_eq!(effective_capability(status, 24), Some(false));
        assert_eq!(
            effective_capability("CapEff:\t0000000000000000\n", CAP_SYS_ADMIN),
            Some(false)
        );
        assert_eq!(
            effective_capability("CapEff:\t0000000000200000\n", CAP_SYS_ADMIN),
            Some(true)
        );
        assert_eq!(effective_capability("Name: x\n", CAP_SYS_ADMIN), None);
        assert_eq!(effective_capability("CapEff:\tzz\n", CAP_SYS_ADMIN), None);
    }

    #[test]
    fn a_capable_host_runs_the_kernel_engine() {
        assert_eq!(capable_host().verdict(), Ok(()));
        // udev with its rules, in our namespace: fine.
        let mut probe = capable_host();
        probe.udev = UdevProbe {
            running: true,
            notify_rules: true,
            same_ipc_namespace_as_init: Some(true),
        };
        assert_eq!(probe.verdict(), Ok(()));
    }

    #[test]
    fn each_failed_check_is_named_with_what_to_do() {
        let mut probe = capable_host();
        probe.cap_sys_admin = Some(false);
        let why = probe.verdict().unwrap_err();
        assert!(
            why.contains("CAP_SYS_ADMIN") && why.contains("userspace"),
            "{why}"
        );

        let mut probe = capable_host();
        probe.loop_control = Err("cannot open /dev/loop-control: gone".into());
        assert!(probe.verdict().unwrap_err().contains("/dev/loop-control"));

        let mut probe = capable_host();
        probe.udev = UdevProbe {
            running: true,
            notify_rules: false,
            same_ipc_namespace_as_init: Some(true),
        };
        let why = probe.verdict().unwrap_err();
        assert!(
            why.contains("95-dm-notify.rules") && why.contains("dmsetup"),
            "{why}"
        );

        let mut probe = capable_host();
        probe.udev = UdevProbe {
            running: true,
            notify_rules: true,
            same_ipc_namespace_as_init: Some(false),
        };
        assert!(probe.verdict().unwrap_err().contains("IPC namespace"));

        // Without udev, neither the rules nor the namespace matter.
        let mut probe = capable_host();
        probe.udev.same_ipc_namespace_as_init = Some(false);
        assert_eq!(probe.verdict(), Ok(()));

        // Several failures: all are reported.
        let mut probe = capable_host();
        probe.cap_sys_admin = None;
        probe.mapper_control = Err("cannot open /dev/mapper/control: x".into());
        let why = probe.verdict().unwrap_err();
        assert!(
            why.contains("capabilities") && why.contains("/dev/mapper/control"),
            "{why}"
        );
    }

    /// The real probe on this host, whose kernel has no device-mapper: the reason names the
    /// failed check.
    #[test]
    fn this_host_without_device_mapper_gets_the_reason() {
        let probe = Probe::of_this_process();
        // The tests run as root with loop devices (see docs/environment.md).
        assert_eq!(probe.cap_sys_admin, Some(true));
        assert_eq!(probe.loop_control, Ok(()));
        if Path::new("/sys/module/dm_mod").exists() {
            assert_eq!(probe.mapper_control, Ok(()));
            return;
        }
        let why = probe.verdict().unwrap_err();
        assert!(why.contains("cannot open /dev/mapper/control"), "{why}");
        assert!(why.contains("no device-mapper support"), "{why}");
        assert!(why.contains("--engine userspace"), "{why}");
    }

    #[test]
    fn namespaces_compare_by_inode() {
        assert_eq!(
            same_namespace("/proc/self/ns/ipc", "/proc/self/ns/ipc"),
            Some(true)
        );
        assert_eq!(
            same_namespace("/proc/self/ns/ipc", "/proc/self/ns/mnt"),
            Some(false)
        );
        assert_eq!(same_namespace("/proc/self/ns/ipc", "/nonexistent"), None);
    }
}
