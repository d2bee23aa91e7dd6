//! The VM suite: imgcrypt against real dm-crypt, in a QEMU guest running Debian's stock kernel.
//!
//! This machine's kernel has no device-mapper, so the proofs that need one run in a guest
//! (`tests/vm/`: `fetch-kernel`, `build-initramfs`, the guest's `init` and `checks.sh`). Every
//! guest check is one test here, so `cargo test` counts and names it. Checks share a boot:
//!
//! - **userspace boot** (b): this host's imgctl/imgcryptd encrypt a dynamic VHD with data and
//!   holes into LUKS2/512, LUKS2/4096 and LUKS1 with the userspace engine; the guest opens each
//!   with real `cryptsetup open --key-file` and compares the decrypted device with the sha256 of
//!   `qemu-img convert -O raw` of the source, computed here, and zeros after it.
//! - **kernel boot** (a, c, d, teardown): imgcryptd runs as root in the guest with the kernel
//!   engine: it encrypts a dynamic VHD; is killed with `kill -9` mid-copy and restarted; serves an
//!   unprivileged user; and fails on ENOSPC, on EIO from the output device, on a source read
//!   error, when imgctl is killed mid-copy, or when SIGTERM stops it mid-copy, each time leaving
//!   no mapper and no loop device.
//!
//! The guest reports on its serial console (`IMGCRYPT-RESULT <check> PASS|FAIL <seconds>
//! <detail>`, then `IMGCRYPT-DONE <n>`). A FAIL, a missing or unexpected result, a wrong count, a
//! timeout or a guest that does not power off fails the test loudly with the whole console log,
//! which is also kept in `target/vm/<boot>-console.log`.
//!
//! Run a subset with cargo's filter: `cargo test --test vm b_` (the userspace boot only) or
//! `cargo test --test vm kernel_` (the kernel boot only). `IMGCRYPT_VM_KEEP=1` keeps the guest's
//! disk images and prints where.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::guest::{
    self, ext4_image, kernel_tree, panic_text, parse_console, repository, vm_dir, vmlinuz,
    CheckResult, Disk, GuestSpec, Timings,
};
use common::*;

/// The guest runs on one host core per vCPU; two let the kernel engine copy on both.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY_MIB: &str = "1024";
/// Whole-boot bounds: several times what a run takes on this machine's TCG (see the README in
/// tests/vm), so a slow shared host does not fail the suite, and a hang still ends it.
const USERSPACE_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const KERNEL_BOOT_TIMEOUT: Duration = Duration::from_secs(1500);
/// Read latency of the slow disk (dm-delay) that holds the source of the mid-copy checks.
const SLOW_DELAY_MS: u32 = 50;
/// The blank disk under the guest's failing devices (tests/vm/checks.sh, `scratch_device`).
const SCRATCH_DISK_BYTES: u64 = 96 << 20;

/// Which guest boot a check runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Boot {
    /// b: host-made userspace outputs opened by dm-crypt. Needs no daemon in the guest.
    Userspace,
    /// a, c, d, teardown: imgcryptd with the kernel engine in the guest.
    Kernel,
}

impl Boot {
    fn name(self) -> &'static str {
        match self {
            Self::Userspace => "userspace",
            Self::Kernel => "kernel",
        }
    }

    /// The guest checks of this boot, in the order the guest runs them.
    fn checks(self) -> &'static [&'static str] {
        match self {
            Self::Userspace => &["b-luks2-512", "b-luks2-4096", "b-luks1"],
            Self::Kernel => &[
                "a-kernel-encrypt",
                "e-kernel-ratio",
                "d-unprivileged",
                "teardown-enospc",
                "teardown-enospc-write",
                "teardown-eio",
                "teardown-source-error",
                "teardown-cancel",
                "teardown-sigterm",
                "c-kill9-restart",
            ],
        }
    }

    fn timeout(self) -> Duration {
        match self {
            Self::Userspace => USERSPACE_BOOT_TIMEOUT,
            Self::Kernel => KERNEL_BOOT_TIMEOUT,
        }
    }

    fn of_check(check: &str) -> Self {
        [Self::Userspace, Self::Kernel]
            .into_iter()
            .find(|boot| boot.checks().contains(&check))
            .unwrap_or_else(|| panic!("{check} is in no boot's list"))
    }
}

/// What one boot produced.
struct GuestRun {
    /// The serial console, whole.
    console: String,
    /// Why the run as a whole cannot be trusted (set-up failed, timeout, no IMGCRYPT-DONE, a
    /// result count or name that does not match what was asked): every check of it fails.
    broken: Option<String>,
    results: HashMap<String, CheckResult>,
    /// Host-side measurements, printed with every check's outcome.
    timings: String,
}

/// One boot per kind per test process, shared by that boot's tests.
fn guest_run(boot: Boot) -> &'static GuestRun {
    static USERSPACE: OnceLock<GuestRun> = OnceLock::new();
    static KERNEL: OnceLock<GuestRun> = OnceLock::new();
    let cell = match boot {
        Boot::Userspace => &USERSPACE,
        Boot::Kernel => &KERNEL,
    };
    cell.get_or_init(|| run_boot(boot))
}

/// The assertion behind every test: the guest ran `check` and reported PASS.
fn assert_guest_check(check: &str) {
    let boot = Boot::of_check(check);
    let run = guest_run(boot);
    let log = || {
        format!(
            "\n{}\n===== guest console ({} boot) =====\n{}\n===== end of guest console =====",
            run.timings,
            boot.name(),
            run.console
        )
    };
    if let Some(why) = &run.broken {
        panic!(
            "VM check {check}: the {} boot failed: {why}{}",
            boot.name(),
            log()
        );
    }
    match run.results.get(check) {
        None => panic!("VM check {check}: the guest reported no result{}", log()),
        Some(result) if !result.passed => panic!(
            "VM check {check} FAILED in the guest after {} s: {}{}",
            result.seconds,
            result.detail,
            log()
        ),
        Some(result) => println!(
            "VM check {check}: PASS in {} s\n{}",
            result.seconds, run.timings
        ),
    }
}

// --- b: the userspace engine is bit-identical to dm-crypt ----------------------------------

#[test]
fn b_userspace_luks2_512_output_opens_with_dm_crypt_and_equals_source() {
    assert_guest_check("b-luks2-512");
}

#[test]
fn b_userspace_luks2_4096_output_opens_with_dm_crypt_and_equals_source() {
    assert_guest_check("b-luks2-4096");
}

#[test]
fn b_userspace_luks1_output_opens_with_dm_crypt_and_equals_source() {
    assert_guest_check("b-luks1");
}

// --- the kernel engine in the guest --------------------------------------------------------

#[test]
fn kernel_a_engine_encrypts_dynamic_vhd_that_dm_crypt_decrypts_to_source() {
    assert_guest_check("a-kernel-encrypt");
}

/// The kernel engine's copy against `dd` onto the same dm-crypt stack: a measurement printed
/// (and kept in `target/vm/kernel-ratio.txt`), not a timed assertion; the check fails only if a
/// step fails or the output does not decrypt to the source.
#[test]
fn kernel_e_copy_against_dd_on_dm_crypt_is_measured() {
    assert_guest_check("e-kernel-ratio");
    let run = guest_run(Boot::Kernel);
    let measured: Vec<&str> = run
        .console
        .lines()
        .filter_map(|line| line.split_once("IMGCRYPT-MEASURE ").map(|(_, rest)| rest))
        .collect();
    assert!(!measured.is_empty(), "the guest printed no measurement");
    let text = measured.join("\n");
    println!("VM measurement: {text}");
    let _ = fs::write(vm_dir().join("kernel-ratio.txt"), format!("{text}\n"));
}

#[test]
fn kernel_c_kill9_mid_copy_then_restart_removes_stale_mapper_and_loop() {
    assert_guest_check("c-kill9-restart");
}

#[test]
fn kernel_d_unprivileged_user_encrypts_through_root_daemon() {
    assert_guest_check("d-unprivileged");
}

#[test]
fn kernel_teardown_after_enospc_reserving_output_on_tmpfs() {
    assert_guest_check("teardown-enospc");
}

#[test]
fn kernel_teardown_after_enospc_mid_copy() {
    assert_guest_check("teardown-enospc-write");
}

#[test]
fn kernel_teardown_after_eio_from_output_device() {
    assert_guest_check("teardown-eio");
}

#[test]
fn kernel_teardown_after_source_read_error() {
    assert_guest_check("teardown-source-error");
}

#[test]
fn kernel_teardown_after_client_killed_mid_copy_and_daemon_still_serves() {
    assert_guest_check("teardown-cancel");
}

#[test]
fn kernel_teardown_after_sigterm_mid_copy() {
    assert_guest_check("teardown-sigterm");
}

// --- running a boot ------------------------------------------------------------------------

/// Runs one boot: prepares its disks, boots, collects the results. Never panics: a failure in
/// the set-up becomes `broken`, so every test of the boot reports it (a panic inside the
/// OnceLock would make the next test run the boot again).
fn run_boot(boot: Boot) -> GuestRun {
    // One guest at a time: two TCG guests on a 2-core host would slow each other into timeouts.
    static ONE_GUEST: Mutex<()> = Mutex::new(());
    let _guard = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());

    let started = Instant::now();
    let mut timings = Timings::default();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let kernel = timings.measure("kernel download+unpack (cached after the first)", || {
            kernel_tree()
        });
        let initramfs = timings.measure("initramfs build (once per test process)", || {
            shared_initramfs(&kernel)
        });
        let initramfs = match initramfs {
            Ok(path) => path.clone(),
            Err(why) => return Err(why.clone()),
        };
        let scratch = scratch();
        let disks = timings.measure(
            "host images (sources, outputs, guest disks)",
            || match boot {
                Boot::Userspace => userspace_disks(scratch.path()),
                Boot::Kernel => kernel_disks(scratch.path()),
            },
        );
        let run = boot_guest(boot, &kernel, &initramfs, &disks, &mut timings);
        if std::env::var_os("IMGCRYPT_VM_KEEP").is_some() {
            eprintln!(
                "IMGCRYPT_VM_KEEP: guest disks kept in {}",
                scratch.keep().display()
            );
        }
        Ok(run)
    }));
    let mut run = match outcome {
        Ok(Ok(run)) => run,
        Ok(Err(why)) => GuestRun::broken(why),
        Err(panic) => GuestRun::broken(format!("set-up failed: {}", panic_text(&panic))),
    };
    timings.record("total (this boot)", started.elapsed());
    for check in boot.checks() {
        if let Some(result) = run.results.get(*check) {
            let _ = writeln!(timings.text, "  check {check}: {} s", result.seconds);
        }
    }
    run.timings = format!("VM {} boot timings:\n{}", boot.name(), timings.text);
    let _ = fs::write(
        vm_dir().join(format!("{}-timings.txt", boot.name())),
        &run.timings,
    );
    run
}

impl GuestRun {
    fn broken(why: String) -> Self {
        Self {
            console: String::new(),
            broken: Some(why),
            results: HashMap::new(),
            timings: String::new(),
        }
    }
}

/// The initramfs, built once per test process from the binaries under test.
fn shared_initramfs(kernel: &Path) -> &'static Result<PathBuf, String> {
    static INITRAMFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INITRAMFS.get_or_init(|| {
        let out = vm_dir().join("initramfs.cpio.gz");
        let output = run(Command::new(repository().join("tests/vm/build-initramfs"))
            .arg(kernel)
            .arg(bin_dir())
            .arg(&out));
        if output.status.success() {
            Ok(out)
        } else {
            Err(format!(
                "tests/vm/build-initramfs failed: {}",
                describe(&output)
            ))
        }
    })
}

/// The variants of check b: guest check name, disk serial, imgctl arguments, sector size.
const USERSPACE_VARIANTS: &[(&str, &str, &[&str], u64)] = &[
    ("luks2-512", "luks2-512", &[], 512),
    ("luks2-4096", "luks2-4096", &["--sector-size", "4096"], 4096),
    ("luks1", "luks1", &["--luks1"], 512),
];

/// Check b's disks: the three outputs of this host's userspace engine, and the payload disk
/// with the key and the manifest of what each must decrypt to.
fn userspace_disks(dir: &Path) -> Vec<Disk> {
    let payload = dir.join("payload");
    fs::create_dir(&payload).unwrap();
    let source = make_source(dir, SourceKind::VhdDynamic, "32M");
    let key = payload.join("secret.dek");
    write_key(&key);
    let vsize = qemu_virtual_size(&source);
    let sha256 = plaintext_sha256(&source, dir);

    let mut manifest = String::from("KEY=/mnt/payload/secret.dek\n");
    let mut disks = Vec::new();
    let daemon = Daemon::start(dir, &["--engine", "userspace"]);
    for (variant, serial, args, sector_size) in USERSPACE_VARIANTS {
        let output = dir.join(format!("{variant}.luks"));
        let result = run(daemon.encrypt(&source, &output, &key).args(*args).args([
            "--engine",
            "userspace",
            "--json",
        ]));
        assert!(
            result.status.success(),
            "imgctl ({variant}) failed: {}\ndaemon log:\n{}",
            describe(&result),
            daemon.log_text()
        );
        assert_eq!(
            summary_field(&result.stdout, "engine"),
            "userspace",
            "the host outputs must come from the userspace engine"
        );
        // The decrypted device's size from cryptsetup's view of the header and the file size,
        // not from anything our code reports.
        let payload_size = fs::metadata(&output).unwrap().len() - luks_dump(&output).data_offset;
        let var = variant.replace('-', "_");
        let _ = writeln!(
            manifest,
            "b_{var}_serial={serial}\nb_{var}_vsize={vsize}\nb_{var}_sha256={sha256}\n\
             b_{var}_payload_size={payload_size}\nb_{var}_sector_size={sector_size}"
        );
        disks.push(Disk::read_only(output, serial));
    }
    fs::write(payload.join("manifest.sh"), manifest).unwrap();
    disks.insert(
        0,
        Disk::writable(ext4_image(dir, "payload", &payload, "32M"), "payload"),
    );
    disks
}

/// The kernel boot's disks: a payload ext4 (sources, key, room for the outputs), a slow disk
/// (a fully written source behind dm-delay in the guest), a small ext2 (no fallocate, so
/// ENOSPC arrives mid-copy), and a blank scratch disk the guest maps with dm `linear` and
/// `error` segments (an output and a source that fail with EIO part-way).
fn kernel_disks(dir: &Path) -> Vec<Disk> {
    let payload = dir.join("payload");
    let slow = dir.join("slow");
    fs::create_dir(&payload).unwrap();
    fs::create_dir(&slow).unwrap();
    write_key(&payload.join("secret.dek"));
    let mut manifest = format!("KEY=/mnt/payload/secret.dek\nSLOW_DELAY_MS={SLOW_DELAY_MS}\n");
    for (name, size) in [("A", "32M"), ("D", "16M")] {
        let made = dir.join(name);
        fs::create_dir(&made).unwrap();
        let source = make_source(&made, SourceKind::VhdDynamic, size);
        let lower = name.to_lowercase();
        let vsize = qemu_virtual_size(&source);
        let sha256 = plaintext_sha256(&source, &made);
        let target = payload.join(format!("{lower}.vhd"));
        fs::rename(&source, &target).unwrap();
        // Readable by the unprivileged user of check d.
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        let _ = writeln!(
            manifest,
            "SOURCE_{name}=/mnt/payload/{lower}.vhd\n{name}_VSIZE={vsize}\n{name}_SHA256={sha256}"
        );
    }
    // e: a source worth timing (48 MiB of data in a 64 MiB dynamic VHD).
    let measured = dir.join("E");
    fs::create_dir(&measured).unwrap();
    let source_e = measured.join("e.vhd");
    qemu_create(&source_e, "vpc", &["-o", "subformat=dynamic"], "64M");
    qemu_io("vpc", &source_e, &["write -P 0x3c 0 48M"]);
    let vsize = qemu_virtual_size(&source_e);
    let sha256 = plaintext_sha256(&source_e, &measured);
    fs::rename(&source_e, payload.join("e.vhd")).unwrap();
    let _ = writeln!(
        manifest,
        "SOURCE_E=/mnt/payload/e.vhd\nE_VSIZE={vsize}\nE_SHA256={sha256}"
    );
    // Every block allocated: the copy must read all of it through dm-delay.
    let slow_source = slow.join("slow.vhd");
    qemu_create(&slow_source, "vpc", &["-o", "subformat=dynamic"], "48M");
    qemu_io("vpc", &slow_source, &["write -P 0x5a 0 47M"]);
    let vsize = qemu_virtual_size(&slow_source);
    let sha256 = plaintext_sha256(&slow_source, &slow);
    let _ = writeln!(
        manifest,
        "SLOW_SOURCE=slow.vhd\nSLOW_VSIZE={vsize}\nSLOW_SHA256={sha256}"
    );
    fs::write(payload.join("manifest.sh"), manifest).unwrap();

    let small = dir.join("small-ext2.img");
    run_ok(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext2"])
            .arg(&small)
            .arg("24M"),
    );
    // Sparse: the guest uses 0..32 MiB (the failing output) and 64..88 MiB (the failing source).
    let scratch = dir.join("scratch.img");
    fs::File::create(&scratch)
        .and_then(|file| file.set_len(SCRATCH_DISK_BYTES))
        .expect("create the scratch disk");
    vec![
        Disk::writable(ext4_image(dir, "payload", &payload, "512M"), "payload"),
        Disk::read_only(ext4_image(dir, "slow", &slow, "64M"), "slow"),
        Disk::writable(small, "small-ext2"),
        Disk::writable(scratch, "scratch"),
    ]
}

/// sha256 of the source's plaintext as qemu-img converts it: what the guest must decrypt.
fn plaintext_sha256(source: &Path, dir: &Path) -> String {
    let plain = dir.join("expected.raw");
    qemu_plaintext(source, &plain);
    let output = run_ok(Command::new("sha256sum").arg(&plain));
    fs::remove_file(&plain).unwrap();
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// A field of the summary in imgctl's `--json` output.
fn summary_field(stdout: &[u8], field: &str) -> String {
    let text = String::from_utf8_lossy(stdout);
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["event"] == "summary")
        .and_then(|event| event["summary"][field].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no summary with {field} in:\n{text}"))
}

/// Boots the guest with `disks`, waits (bounded) for it to power off, and parses its console.
fn boot_guest(
    boot: Boot,
    kernel: &Path,
    initramfs: &Path,
    disks: &[Disk],
    timings: &mut Timings,
) -> GuestRun {
    let checks = boot.checks();
    let append = format!(
        "console=ttyS0 panic=-1 quiet imgcrypt_checks={}",
        checks.join(",")
    );
    let console = guest::boot(&GuestSpec {
        name: boot.name(),
        kernel: &vmlinuz(kernel),
        initramfs,
        append: &append,
        disks,
        cpus: GUEST_CPUS,
        memory_mib: GUEST_MEMORY_MIB,
        timeout: boot.timeout(),
    });
    timings.record("guest run (boot to power-off)", console.elapsed);
    if let Some(booted) = console.booted_after {
        timings.record("boot (qemu start to IMGCRYPT-BOOTED)", booted);
    }
    let (results, mut broken) = parse_console(&console.text, checks);
    if let Some(why) = console.failure {
        broken = Some(why);
    }
    GuestRun {
        console: console.text,
        broken,
        results,
        timings: String::new(),
    }
}

// --- the harness's own reading of the console (no guest needed) ---------------------------

#[test]
fn harness_reads_results_behind_escape_codes_and_carriage_returns() {
    let console = "c\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\nBooting from ROM..\x1b[2JIMGCRYPT-BOOTED 6.5\r\n\
                   [x] some output\r\n\
                   IMGCRYPT-RESULT x PASS 1.25 ok\r\n\
                   IMGCRYPT-RESULT y FAIL 0.50 /dev/vdb: the 4096 bytes after the source are not all zero\r\n\
                   IMGCRYPT-DONE 2\r\n";
    let (results, broken) = parse_console(console, &["x", "y"]);
    assert_eq!(broken, None);
    assert!(results["x"].passed);
    assert_eq!(results["x"].seconds, "1.25");
    assert!(!results["y"].passed);
    assert_eq!(
        results["y"].detail,
        "/dev/vdb: the 4096 bytes after the source are not all zero"
    );
}

#[test]
fn harness_distrusts_a_run_without_done_or_with_wrong_or_extra_results() {
    let cases = [
        (
            "IMGCRYPT-RESULT x PASS 1 ok\n",
            "never printed IMGCRYPT-DONE",
        ),
        (
            "IMGCRYPT-RESULT x PASS 1 ok\nIMGCRYPT-DONE 1\n",
            "ran 1 checks, 2",
        ),
        (
            "IMGCRYPT-RESULT x PASS 1 ok\nIMGCRYPT-RESULT x PASS 1 ok\nIMGCRYPT-DONE 2\n",
            "two results for x",
        ),
        (
            "IMGCRYPT-RESULT x PASS 1 ok\nIMGCRYPT-RESULT z PASS 1 ok\nIMGCRYPT-DONE 2\n",
            "not asked for",
        ),
        (
            "IMGCRYPT-RESULT x MAYBE 1 ok\nIMGCRYPT-DONE 2\n",
            "malformed verdict",
        ),
        ("IMGCRYPT-FATAL insmod failed\n", "guest set-up failed"),
    ];
    for (console, needle) in cases {
        let (_, broken) = parse_console(console, &["x", "y"]);
        let broken = broken.unwrap_or_else(|| panic!("trusted a bad run:\n{console}"));
        assert!(broken.contains(needle), "{broken:?} lacks {needle:?}");
    }
}
