//! The service under real systemd: the Debian package of the binaries under test, installed
//! with dpkg into a guest that boots **systemd as PID 1** (a Debian 12 rootfs made by mmdebstrap
//! from Debian's packages, Debian's stock kernel, QEMU TCG).
//!
//! `tests/vm/build-rootfs` makes (and caches) the rootfs image and a small initramfs that mounts
//! it and hands over to systemd; `scripts/package --bin-dir` packages this build's imgcryptd and
//! imgctl with cargo-deb. The payload disk carries the package, the checks
//! (`tests/vm/systemd/checks.sh`, with the VM suite's `checks.sh` for its helpers), a source and a
//! key. The guest's `imgcrypt-guest.service` runs the checks once the system is up and powers
//! off; every guest check is one test here:
//!
//! - `package-installs`: `dpkg -i` creates the group (sysusers.d) and the state directory
//!   (tmpfiles.d), enables and starts the socket only (root:imgcrypt 0660), ExecStart is the
//!   packaged `/usr/sbin/imgcryptd`, man pages and completions are installed;
//! - `socket-activation`: the service is inactive until the first `imgctl`, active after it;
//! - `member-encrypts`: that output (a member of `imgcrypt`, the default socket) is LUKS2 that
//!   `cryptsetup luksDump` reads, `open --test-passphrase` accepts and dm-crypt decrypts to the
//!   source;
//! - `non-member-refused`: a user outside `imgcrypt` gets "Permission denied" from the socket;
//! - `status-text`: `systemctl status` shows the daemon's STATUS= text;
//! - `kernel-engine`: `--engine kernel` works inside the sandbox (loop + dm-crypt), leaves no
//!   device, and decrypts to the source;
//! - `journal-fields`: `journalctl -o json` has the job's structured fields under their own
//!   names (`JOB_ID`, `USER_UID`, `ENGINE`, ...; no `F_` prefix), and
//!   `journalctl MESSAGE_ID=<the audit id>` one audit record per job with `BYTES`, `RESULT`,
//!   the files' identity and the key's fingerprint;
//! - `stop-mid-job`: while the job reads its source (behind dm-delay), `systemctl status` shows
//!   "1 job running"; past a resume checkpoint (in the StateDirectory) and mid-copy,
//!   `systemctl stop` checkpoints the job and tears down its mapper and loop device, imgctl
//!   fails saying how to resume and keeps `OUT.partial`; after `systemctl start` the same
//!   command resumes past 0 and completes;
//! - `idle-exit`: socket-activated, the service exits when idle and the next call starts it.
//!
//! A FAIL, a missing or unexpected result, a timeout or a guest that does not power off fails
//! the test with the whole console log (kept in `target/vm/systemd-console.log`).

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::guest::{
    self, ext4_image, kernel_tree, panic_text, parse_console, repository, vmlinuz, CheckResult,
    Disk, GuestSpec, Timings,
};
use common::*;

/// The checks, in the order the guest runs them (later ones build on earlier ones).
const CHECKS: &[&str] = &[
    "package-installs",
    "socket-activation",
    "member-encrypts",
    "non-member-refused",
    "status-text",
    "kernel-engine",
    "journal-fields",
    "stop-mid-job",
    "idle-exit",
];
/// Read latency of the slow disk (dm-delay) under the source of the mid-job check: the job's
/// first read of the source must outlast waiting for the status text (a few `systemctl status`
/// under TCG).
const SLOW_DELAY_MS: u32 = 200;
/// Several times a run on this machine (boot ~40 s under load, checks ~1 min), so a slow shared
/// host does not fail the suite and a hang still ends it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// The one boot of this test process.
struct GuestRun {
    console: String,
    broken: Option<String>,
    results: HashMap<String, CheckResult>,
    timings: String,
}

fn guest_run() -> &'static GuestRun {
    static RUN: OnceLock<GuestRun> = OnceLock::new();
    RUN.get_or_init(run_boot)
}

fn assert_guest_check(check: &str) {
    let run = guest_run();
    let log = || {
        format!(
            "\n{}\n===== guest console (systemd boot) =====\n{}\n===== end of guest console =====",
            run.timings, run.console
        )
    };
    if let Some(why) = &run.broken {
        panic!(
            "systemd guest check {check}: the boot failed: {why}{}",
            log()
        );
    }
    match run.results.get(check) {
        None => panic!(
            "systemd guest check {check}: the guest reported no result{}",
            log()
        ),
        Some(result) if !result.passed => panic!(
            "systemd guest check {check} FAILED after {} s: {}{}",
            result.seconds,
            result.detail,
            log()
        ),
        Some(result) => println!(
            "systemd guest check {check}: PASS in {} s\n{}",
            result.seconds, run.timings
        ),
    }
}

#[test]
fn systemd_package_installs_with_dpkg_creating_group_and_starting_only_the_socket() {
    assert_guest_check("package-installs");
}

#[test]
fn systemd_first_imgctl_call_activates_the_service() {
    assert_guest_check("socket-activation");
}

#[test]
fn systemd_member_of_imgcrypt_encrypts_an_image_cryptsetup_accepts() {
    assert_guest_check("member-encrypts");
}

#[test]
fn systemd_non_member_is_refused_by_the_socket_permissions() {
    assert_guest_check("non-member-refused");
}

#[test]
fn systemd_status_shows_the_daemon_status_text() {
    assert_guest_check("status-text");
}

#[test]
fn systemd_kernel_engine_works_inside_the_sandbox() {
    assert_guest_check("kernel-engine");
}

#[test]
fn systemd_journal_has_the_structured_job_fields() {
    assert_guest_check("journal-fields");
}

#[test]
fn systemd_stop_mid_job_tears_down_devices_and_a_rerun_after_start_resumes() {
    assert_guest_check("stop-mid-job");
}

#[test]
fn systemd_socket_activated_service_exits_when_idle_and_restarts_on_demand() {
    assert_guest_check("idle-exit");
}

// --- the package, on the host ------------------------------------------------------------------

/// The package of the binaries under test, built once per test process.
fn package() -> &'static Result<PathBuf, String> {
    static PACKAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        let out = guest::vm_dir().join("package");
        let _ = fs::remove_dir_all(&out);
        let output = run(Command::new(repository().join("scripts/package"))
            .arg("--bin-dir")
            .arg(bin_dir())
            .arg("--out")
            .arg(&out));
        if !output.status.success() {
            return Err(format!("scripts/package failed: {}", describe(&output)));
        }
        Ok(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ))
    })
}

fn package_path() -> &'static Path {
    package().as_ref().unwrap_or_else(|why| panic!("{why}"))
}

#[test]
fn package_holds_binaries_units_sysusers_tmpfiles_man_pages_and_completions() {
    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(package_path()));
    let listing = String::from_utf8_lossy(&listing.stdout);
    for path in [
        "./usr/sbin/imgcryptd",
        "./usr/bin/imgctl",
        "./usr/lib/systemd/system/imgcryptd.service",
        "./usr/lib/systemd/system/imgcryptd.socket",
        "./usr/lib/sysusers.d/imgcrypt.conf",
        "./usr/lib/tmpfiles.d/imgcryptd.conf",
        "./usr/share/man/man1/imgctl.1.gz",
        "./usr/share/man/man1/imgctl-encrypt.1.gz",
        "./usr/share/man/man8/imgcryptd.8.gz",
        "./usr/share/bash-completion/completions/imgctl",
        "./usr/share/zsh/vendor-completions/_imgctl",
        "./usr/share/fish/vendor_completions.d/imgctl.fish",
        "./usr/share/doc/imgcrypt/operator-guide.md",
    ] {
        assert!(
            listing
                .lines()
                .any(|line| line.ends_with(&format!(" {path}"))),
            "the package lacks {path}:\n{listing}"
        );
    }
    // The unit starts the daemon where the package puts it.
    let dir = scratch();
    run_ok(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(package_path())
            .arg(dir.path()),
    );
    let service =
        fs::read_to_string(dir.path().join("usr/lib/systemd/system/imgcryptd.service")).unwrap();
    let exec_start = service
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("the packaged service has ExecStart=");
    let program = exec_start.split_whitespace().next().unwrap();
    assert!(
        dir.path().join(program.trim_start_matches('/')).is_file(),
        "ExecStart={exec_start} names no file of the package"
    );
    // The man page is the parser's: it documents the daemon's flags.
    let page =
        run_ok(Command::new("zcat").arg(dir.path().join("usr/share/man/man8/imgcryptd.8.gz")));
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains(r"\-\-idle\-timeout"), "{page}");
}

#[test]
fn package_maintainer_scripts_create_the_group_and_start_only_the_socket() {
    let dir = scratch();
    run_ok(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(package_path())
            .arg(dir.path()),
    );
    let postinst = fs::read_to_string(dir.path().join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers"), "{postinst}");
    assert!(
        postinst.contains("deb-systemd-helper enable imgcryptd.socket"),
        "{postinst}"
    );
    assert!(
        postinst.contains("deb-systemd-invoke start imgcryptd.socket"),
        "{postinst}"
    );
    // On upgrade `try-restart` restarts a running service; nothing starts a stopped one.
    let starts: Vec<&str> = postinst
        .lines()
        .filter(|line| {
            line.contains("deb-systemd-invoke start") || line.contains("systemctl start")
        })
        .collect();
    assert!(
        starts
            .iter()
            .all(|line| !line.contains("imgcryptd.service")),
        "postinst starts the service itself; socket activation should: {starts:?}"
    );
    let control = fs::read_to_string(dir.path().join("control")).unwrap();
    assert!(control.contains("Package: imgcrypt\n"), "{control}");
    assert!(control.contains("libcryptsetup12"), "{control}");
}

// --- the boot ----------------------------------------------------------------------------------

fn run_boot() -> GuestRun {
    let started = Instant::now();
    let mut timings = Timings::default();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let kernel = timings.measure("kernel download+unpack (cached after the first)", || {
            kernel_tree()
        });
        let rootfs = timings.measure("rootfs (mmdebstrap; cached after the first)", || {
            rootfs_dir(&kernel)
        })?;
        let deb = timings
            .measure("package (scripts/package --bin-dir)", package)
            .clone()?;
        let scratch = scratch();
        let payload = timings.measure("payload disk", || payload_disk(scratch.path(), &deb));
        let slow = timings.measure("slow disk", || slow_disk(scratch.path()));
        let append = format!(
            "console=ttyS0 panic=-1 quiet systemd.show_status=error imgcrypt_checks={}",
            CHECKS.join(",")
        );
        let disks = [
            Disk {
                snapshot: true,
                ..Disk::writable(rootfs.join("rootfs.ext4"), "rootfs")
            },
            Disk::writable(payload, "payload"),
            Disk::read_only(slow, "slow"),
        ];
        let console = guest::boot(&GuestSpec {
            name: "systemd",
            kernel: &vmlinuz(&kernel),
            initramfs: &rootfs.join("initramfs.cpio.gz"),
            append: &append,
            disks: &disks,
            cpus: "2",
            memory_mib: "1024",
            timeout: BOOT_TIMEOUT,
        });
        timings.record("guest run (boot to power-off)", console.elapsed);
        if let Some(booted) = console.booted_after {
            timings.record("boot (qemu start to IMGCRYPT-BOOTED)", booted);
        }
        let (results, mut broken) = parse_console(&console.text, CHECKS);
        if let Some(why) = console.failure {
            broken = Some(why);
        }
        Ok::<_, String>(GuestRun {
            console: console.text,
            broken,
            results,
            timings: String::new(),
        })
    }));
    let mut run = match outcome {
        Ok(Ok(run)) => run,
        Ok(Err(why)) => broken(why),
        Err(panic) => broken(format!("set-up failed: {}", panic_text(&panic))),
    };
    timings.record("total", started.elapsed());
    for check in CHECKS {
        if let Some(result) = run.results.get(*check) {
            let _ = writeln!(timings.text, "  check {check}: {} s", result.seconds);
        }
    }
    run.timings = format!("systemd guest timings:\n{}", timings.text);
    let _ = fs::write(guest::vm_dir().join("systemd-timings.txt"), &run.timings);
    run
}

fn broken(why: String) -> GuestRun {
    GuestRun {
        console: String::new(),
        broken: Some(why),
        results: HashMap::new(),
        timings: String::new(),
    }
}

/// tests/vm/build-rootfs's cached rootfs image and initramfs (built the first time: ~25 s of
/// mmdebstrap, needs the Debian mirror).
fn rootfs_dir(kernel: &Path) -> Result<PathBuf, String> {
    let output = run(Command::new(repository().join("tests/vm/build-rootfs")).arg(kernel));
    if !output.status.success() {
        return Err(format!(
            "tests/vm/build-rootfs failed: {}",
            describe(&output)
        ));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// The payload disk: the package, the checks, a 16 MiB dynamic VHD with data and holes, the key,
/// and the manifest with what the source must decrypt to.
fn payload_disk(dir: &Path, deb: &Path) -> PathBuf {
    let payload = dir.join("payload");
    fs::create_dir(&payload).unwrap();
    fs::copy(deb, payload.join("imgcrypt.deb")).unwrap();
    let vm = repository().join("tests/vm");
    fs::copy(vm.join("systemd/checks.sh"), payload.join("checks.sh")).unwrap();
    fs::copy(vm.join("checks.sh"), payload.join("vm-checks.sh")).unwrap();
    write_key(&payload.join("secret.dek"));
    let made = dir.join("source");
    fs::create_dir(&made).unwrap();
    let source = make_source(&made, SourceKind::VhdDynamic, "16M");
    let vsize = qemu_virtual_size(&source);
    let plain = made.join("expected.raw");
    qemu_plaintext(&source, &plain);
    let sha256 = run_ok(Command::new("sha256sum").arg(&plain));
    let sha256 = String::from_utf8_lossy(&sha256.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let target = payload.join("a.vhd");
    fs::rename(&source, &target).unwrap();
    // The check users read it with their own rights.
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(
        payload.join("manifest.sh"),
        format!(
            "KEY=/mnt/payload/secret.dek\nSOURCE_A=/mnt/payload/a.vhd\nA_VSIZE={vsize}\n\
             A_SHA256={sha256}\nSLOW_SOURCE=slow.vhd\nSLOW_DELAY_MS={SLOW_DELAY_MS}\n"
        ),
    )
    .unwrap();
    ext4_image(dir, "payload", &payload, "256M")
}

/// The slow disk: an ext4 holding a 48 MiB dynamic VHD with every block written, which the guest
/// reads through dm-delay so a copy lasts seconds.
fn slow_disk(dir: &Path) -> PathBuf {
    let slow = dir.join("slow");
    fs::create_dir(&slow).unwrap();
    let source = slow.join("slow.vhd");
    qemu_create(&source, "vpc", &["-o", "subformat=dynamic"], "48M");
    qemu_io("vpc", &source, &["write -P 0x5a 0 47M"]);
    fs::set_permissions(&source, fs::Permissions::from_mode(0o644)).unwrap();
    ext4_image(dir, "slow", &slow, "64M")
}
