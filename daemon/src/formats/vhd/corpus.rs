//! The VHDs blktap's real `vhd-util` wrote (`../shared/corpus/vhd-util/samples.tar.xz`, beside
//! the repository), unpacked for a test.

use std::path::PathBuf;

/// Unpacks `members` of the corpus tarball into a new temporary directory.
pub(crate) fn unpack(members: &[&str]) -> tempfile::TempDir {
    let tarball = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus/vhd-util/samples.tar.xz");
    assert!(
        tarball.exists(),
        "the vhd-util corpus is missing at {}",
        tarball.display()
    );
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let status = std::process::Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(dir.path())
        .args(members.iter().map(|name| format!("./{name}")))
        .status()
        .expect("tar must be installed");
    assert!(status.success(), "unpacking {members:?} failed");
    dir
}
