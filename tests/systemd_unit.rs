//! The shipped systemd units are valid and hardened, checked by systemd itself.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

/// Copies the units into a scratch dir with ExecStart pointing at our build, so
/// `systemd-analyze verify` can check the binary exists too.
fn staged_units(dir: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let service = fs::read_to_string(source.join("imgcryptd.service")).unwrap();
    // Where the Debian package (and the documented plain install) puts the daemon.
    assert!(service.contains("ExecStart=/usr/sbin/imgcryptd "));
    let service = service.replace(
        "ExecStart=/usr/sbin/imgcryptd",
        &format!("ExecStart={}", binary("imgcryptd").display()),
    );
    fs::write(dir.join("imgcryptd.service"), service).unwrap();
    fs::copy(
        source.join("imgcryptd.socket"),
        dir.join("imgcryptd.socket"),
    )
    .unwrap();
}

#[test]
fn units_pass_systemd_analyze_verify() {
    // The socket unit names the group that sysusers.d creates on a real install.
    if nix::unistd::Group::from_name("imgcrypt").unwrap().is_none() {
        run_ok(Command::new("groupadd").args(["--system", "imgcrypt"]));
    }
    let dir = scratch();
    staged_units(dir.path());
    let output = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("imgcryptd.socket"))
        .arg(dir.path().join("imgcryptd.service")));
    assert!(output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<_> = stderr
        .lines()
        .filter(|line| line.contains("imgcryptd"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze complained:\n{stderr}"
    );
}

#[test]
fn service_exposure_is_low() {
    let dir = scratch();
    staged_units(dir.path());
    // A score above 2.0 (the bound; 1.9 today) means a hardening option was lost.
    let output = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(dir.path().join("imgcryptd.service")));
    assert!(
        output.status.success(),
        "exposure above 2.0:\n{}",
        describe(&output)
    );
}
