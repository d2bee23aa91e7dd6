//! Test images for the qcow2 unit tests (the reader's, the chain's, the encrypted reader's and
//! the qcow2 output's): raw sources with data at chosen places, qcow2 images made by the real
//! `qemu-img` and written by `qemu-io`, and qemu's raw view of an image to compare with. One
//! place for them, so every test makes its images the same way.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use tempfile::NamedTempFile;

use crate::formats::SourceImage;

pub(crate) const MIB: u64 = 1 << 20;

/// Runs a qemu tool that must succeed. qemu's PBKDF2 benchmark (`getrusage`) can measure no CPU
/// time on a fast or loaded machine and fail with "Unable to get accurate CPU usage" (a qemu
/// bug fixed upstream in 2025); that failure is retried. It hits about one run in four on the
/// project machine when idle, more under load, so a dozen tries make a spurious failure
/// negligible (0.25^12 ≈ 6·10⁻⁸). Any other failure fails the test at once.
pub(crate) fn run(program: &str, args: &[&str]) {
    for _ in 0..12 {
        let output = Command::new(program).args(args).output().unwrap();
        if output.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("Unable to get accurate CPU usage"),
            "{program} {args:?}: {output:?}"
        );
    }
    panic!("{program} {args:?}: qemu's PBKDF2 benchmark failed twelve times");
}

/// A path as the text a command line takes.
pub(crate) fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A temporary file holding `bytes` (a key file, a small image).
pub(crate) fn temp_with(bytes: &[u8]) -> NamedTempFile {
    let mut file = NamedTempFile::new_in("/tmp").unwrap();
    file.write_all(bytes).unwrap();
    file
}

/// `qemu-img create -q -f qcow2 ARGS IMAGE SIZE` (`ARGS` such as `-o OPTIONS`, `-b`/`-F`).
pub(crate) fn create(image: &Path, size: &str, args: &[&str]) {
    let image = text(image);
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend_from_slice(args);
    all.extend([image.as_str(), size]);
    run("qemu-img", &all);
}

/// A qcow2 `image` over `backing`, recorded as given with its format: `qemu-img create -q -f
/// qcow2 -b BACKING -F FORMAT IMAGE`, which opens the backing file for its size; or, given a
/// `size`, with `-u` and the size, so that qemu does not open it (a name that resolves nowhere,
/// or a chain being built from the top).
pub(crate) fn overlay(image: &Path, backing: &str, format: &str, size: Option<&str>) {
    let image = text(image);
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    if size.is_some() {
        all.push("-u");
    }
    all.extend(["-b", backing, "-F", format, image.as_str()]);
    all.extend(size);
    run("qemu-img", &all);
}

/// `qemu-io -f qcow2 -c COMMAND… IMAGE`.
pub(crate) fn qemu_io(image: &Path, commands: &[&str]) {
    let image = text(image);
    let mut all = vec!["-f", "qcow2"];
    for command in commands {
        all.extend(["-c", command]);
    }
    all.push(&image);
    run("qemu-io", &all);
}

/// `qemu-img convert -f raw -O qcow2 ARGS SOURCE` into a new temporary file.
pub(crate) fn convert_to_qcow2(source: &Path, args: &[&str]) -> NamedTempFile {
    let image = NamedTempFile::new_in("/tmp").unwrap();
    let (source, target) = (text(source), text(image.path()));
    let mut all = vec!["convert", "-f", "raw", "-O", "qcow2"];
    all.extend_from_slice(args);
    all.extend([source.as_str(), target.as_str()]);
    run("qemu-img", &all);
    image
}

/// What qemu-img reads from the plain qcow2 `image`: its `convert -O raw`.
pub(crate) fn qemu_raw(image: &Path) -> Vec<u8> {
    let raw = NamedTempFile::new_in("/tmp").unwrap();
    let (image, target) = (text(image), text(raw.path()));
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", &image, &target],
    );
    std::fs::read(raw.path()).unwrap()
}

/// What qemu-img reads from an encrypted image given as `--image-opts OPTS` with the secret
/// `--object OBJECT`: its `convert -O raw`, written to `out`.
pub(crate) fn qemu_raw_encrypted(object: &str, opts: &str, out: &Path) {
    let out = text(out);
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            object,
            "--image-opts",
            opts,
            "-O",
            "raw",
            &out,
        ],
    );
}

/// qemu's `--object` for the secret `s0` read from `key_file`.
pub(crate) fn secret_object(key_file: &Path) -> String {
    format!("secret,id=s0,file={}", key_file.display())
}

/// qemu's `--image-opts` for the encrypted qcow2 at `path`, its key the secret `s0`.
pub(crate) fn image_opts(path: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        path.display()
    )
}

/// Reads the whole guest disk, in pieces of `piece` bytes (odd sizes cross cluster edges).
pub(crate) fn read_all(source: &dyn SourceImage, piece: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; source.virtual_size() as usize];
    for (index, chunk) in bytes.chunks_mut(piece).enumerate() {
        source.read_at(chunk, (index * piece) as u64).unwrap();
    }
    bytes
}

/// A sparse RAW source of `size` bytes with pseudo-random data at `data` (offset, length).
pub(crate) fn sparse_source(size: u64, data: &[(u64, u64)]) -> NamedTempFile {
    source_with(size, data, 0x9e37_79b9_7f4a_7c15, false)
}

/// A raw disk of `size` bytes with, at each `(offset, length)`, data that is half random and
/// half a repeated text (so `-c` really compresses clusters, and stores some uncompressed).
pub(crate) fn mixed_source(size: u64, data: &[(u64, u64)]) -> NamedTempFile {
    source_with(size, data, 0x2545_f491_4f6c_dd1d, true)
}

/// A sparse file of `size` bytes with xorshift bytes from `seed` at each range of `data`, or a
/// repeated text at the even-numbered ranges when `text_too`.
fn source_with(size: u64, data: &[(u64, u64)], seed: u64, text_too: bool) -> NamedTempFile {
    let file = NamedTempFile::new_in("/tmp").unwrap();
    file.as_file().set_len(size).unwrap();
    let mut state = seed;
    for (index, &(offset, length)) in data.iter().enumerate() {
        let bytes: Vec<u8> = (0..length)
            .map(|i| {
                if text_too && index % 2 == 0 {
                    b"imgcrypt qcow2 source "[(i % 22) as usize]
                } else {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                }
            })
            .collect();
        file.as_file().write_all_at(&bytes, offset).unwrap();
    }
    file
}
