//! QEMU guests for the tests that need a kernel this host does not have (tests/vm.rs: dm-crypt
//! under Debian's stock kernel; tests/systemd_guest.rs: systemd as PID 1): the cached kernel,
//! booting a guest with virtio disks under TCG, and reading its report from the serial console.
//!
//! A guest reports `IMGCRYPT-RESULT <check> PASS|FAIL <seconds> <detail>` per check and then
//! `IMGCRYPT-DONE <n>`; [`parse_console`] reads that and says what makes a run untrustworthy.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::run_ok;

/// After IMGCRYPT-DONE the guest powers off at once; this only bounds a stuck poweroff.
pub const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository (the e2e package's manifest directory).
pub fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/vm`: initramfs, console logs and timings (kept for CI artifacts).
pub fn vm_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repository().join("target"), PathBuf::from);
    let dir = target.join("vm");
    fs::create_dir_all(&dir).expect("create target/vm");
    dir
}

/// Debian's kernel, from tests/vm/fetch-kernel's cache (it downloads only the first time).
pub fn kernel_tree() -> PathBuf {
    let output = run_ok(&mut Command::new(
        repository().join("tests/vm/fetch-kernel"),
    ));
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// The kernel image in a tree from [`kernel_tree`].
pub fn vmlinuz(tree: &Path) -> PathBuf {
    fs::read_dir(tree.join("boot"))
        .expect("kernel tree has boot/")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or_else(|| panic!("no boot/vmlinuz-* in {}", tree.display()))
}

/// A virtio disk for the guest, found there by its serial number.
pub struct Disk {
    pub path: PathBuf,
    pub serial: &'static str,
    pub read_only: bool,
    /// Writes go to a temporary overlay and are dropped at exit (a cached image stays as it
    /// was).
    pub snapshot: bool,
}

impl Disk {
    /// A disk the guest may write to.
    pub fn writable(path: PathBuf, serial: &'static str) -> Self {
        Self {
            path,
            serial,
            read_only: false,
            snapshot: false,
        }
    }

    /// A disk the guest sees read-only.
    pub fn read_only(path: PathBuf, serial: &'static str) -> Self {
        Self {
            read_only: true,
            ..Self::writable(path, serial)
        }
    }
}

/// How to boot a guest.
pub struct GuestSpec<'a> {
    /// Names the console log (`target/vm/<name>-console.log`).
    pub name: &'a str,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    /// The kernel command line.
    pub append: &'a str,
    pub disks: &'a [Disk],
    pub cpus: &'a str,
    pub memory_mib: &'a str,
    /// The whole run, boot to power-off.
    pub timeout: Duration,
}

/// What a boot printed, and why it cannot be trusted as a whole, if it cannot.
pub struct Console {
    pub text: String,
    /// Timeout, a poweroff that never came, qemu not waitable.
    pub failure: Option<String>,
    /// qemu start to power-off.
    pub elapsed: Duration,
    /// qemu start to the guest's `IMGCRYPT-BOOTED` line, if it came.
    pub booted_after: Option<Duration>,
}

/// Boots `spec` under TCG (`-cpu max`; KVM hangs on these hosts), waits (bounded) for the guest
/// to power off, and returns its console with qemu's stderr appended.
pub fn boot(spec: &GuestSpec) -> Console {
    let console_path = vm_dir().join(format!("{}-console.log", spec.name));
    let stderr_path = vm_dir().join(format!("{}-qemu-stderr.log", spec.name));
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-accel", "tcg", "-cpu", "max"])
        .args(["-m", spec.memory_mib, "-smp", spec.cpus])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(spec.kernel)
        .arg("-initrd")
        .arg(spec.initramfs)
        .args(["-append", spec.append]);
    for (index, disk) in spec.disks.iter().enumerate() {
        let read_only = if disk.read_only { ",readonly=on" } else { "" };
        let snapshot = if disk.snapshot { ",snapshot=on" } else { "" };
        command.arg("-drive").arg(format!(
            "file={},format=raw,if=none,id=disk{index}{read_only}{snapshot}",
            disk.path.display()
        ));
        command.arg("-device").arg(format!(
            "virtio-blk-pci,drive=disk{index},serial={}",
            disk.serial
        ));
    }
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(fs::File::create(&console_path).unwrap())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64 (scripts/install-deps): {e}"));

    // Poll the console file until the guest powers off or the deadline passes.
    let deadline = started + spec.timeout;
    let mut booted_after = None;
    let mut done_at: Option<Instant> = None;
    let mut failure = None;
    loop {
        let console = fs::read_to_string(&console_path).unwrap_or_default();
        if booted_after.is_none() && console.contains("IMGCRYPT-BOOTED") {
            booted_after = Some(started.elapsed());
        }
        if done_at.is_none() && console.contains("IMGCRYPT-DONE") {
            done_at = Some(Instant::now());
        }
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(e) => {
                failure = Some(format!("waiting for qemu: {e}"));
                break;
            }
        }
        if done_at.is_some_and(|at| at.elapsed() > POWEROFF_TIMEOUT) {
            failure = Some(format!(
                "the guest reported IMGCRYPT-DONE but did not power off within {} s",
                POWEROFF_TIMEOUT.as_secs()
            ));
            break;
        }
        if Instant::now() > deadline {
            failure = Some(format!(
                "timeout: the guest did not finish within {} s",
                spec.timeout.as_secs()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if failure.is_some() {
        let _ = child.kill();
    }
    let status = child.wait().ok();
    let elapsed = started.elapsed();

    let mut text = fs::read_to_string(&console_path).unwrap_or_default();
    let qemu_stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    if !qemu_stderr.trim().is_empty() {
        let _ = write!(text, "\n----- qemu stderr -----\n{qemu_stderr}");
    }
    let _ = writeln!(
        text,
        "\n----- console saved in {}; qemu exit: {status:?} -----",
        console_path.display()
    );
    Console {
        text,
        failure,
        elapsed,
        booted_after,
    }
}

/// One `IMGCRYPT-RESULT` line.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub passed: bool,
    pub seconds: String,
    pub detail: String,
}

/// Reads the guest's report. The result map holds every well-formed result; the second value
/// says what makes the run as a whole untrustworthy.
pub fn parse_console(
    console: &str,
    expected: &[&str],
) -> (HashMap<String, CheckResult>, Option<String>) {
    let mut results = HashMap::new();
    let mut problems = Vec::new();
    let mut done = None;
    for line in console.lines() {
        // Markers may follow firmware escape codes on the same line.
        let Some(at) = line.find("IMGCRYPT-") else {
            continue;
        };
        let line = line[at..].trim_end_matches('\r');
        let mut words = line.splitn(5, ' ');
        match words.next() {
            Some("IMGCRYPT-RESULT") => {
                let (Some(name), Some(verdict), Some(seconds)) =
                    (words.next(), words.next(), words.next())
                else {
                    problems.push(format!("malformed line: {line}"));
                    continue;
                };
                let passed = match verdict {
                    "PASS" => true,
                    "FAIL" => false,
                    _ => {
                        problems.push(format!("malformed verdict: {line}"));
                        continue;
                    }
                };
                if !expected.contains(&name) {
                    problems.push(format!("result for a check not asked for: {line}"));
                }
                let result = CheckResult {
                    passed,
                    seconds: seconds.to_string(),
                    detail: words.next().unwrap_or("").to_string(),
                };
                if results.insert(name.to_string(), result).is_some() {
                    problems.push(format!("two results for {name}"));
                }
            }
            Some("IMGCRYPT-DONE") => done = words.next().map(str::to_string),
            Some("IMGCRYPT-FATAL") => problems.push(format!("guest set-up failed: {line}")),
            _ => {}
        }
    }
    match done {
        None => problems.push("the guest never printed IMGCRYPT-DONE".to_string()),
        Some(count) if count != expected.len().to_string() => problems.push(format!(
            "the guest ran {count} checks, {} were asked for",
            expected.len()
        )),
        Some(_) => {}
    }
    let broken = (!problems.is_empty()).then(|| problems.join("; "));
    (results, broken)
}

/// Host-side measurements of a boot, printed with every check's outcome.
#[derive(Default)]
pub struct Timings {
    pub text: String,
}

impl Timings {
    pub fn measure<T>(&mut self, what: &str, work: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let value = work();
        self.record(what, start.elapsed());
        value
    }

    pub fn record(&mut self, what: &str, elapsed: Duration) {
        let _ = writeln!(self.text, "  {what}: {:.1} s", elapsed.as_secs_f64());
    }
}

/// The message of a caught panic.
pub fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// A sparse ext4 image holding `contents`, owned by root inside (mke2fs -d: no mount, no loop
/// device, no root needed).
pub fn ext4_image(dir: &Path, name: &str, contents: &Path, size: &str) -> PathBuf {
    let image = dir.join(format!("{name}.ext4"));
    run_ok(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
            .arg(contents)
            .arg(&image)
            .arg(size),
    );
    image
}
