//! Helpers shared by the engine tests: an independent AES-XTS (Python `cryptography`), a
//! deterministic pseudo-random generator, and scratch mounts.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Which way [`python_xts`] runs.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    /// Plaintext to ciphertext.
    Encrypt,
    /// Ciphertext to plaintext.
    Decrypt,
}

/// Runs `tests/support/xts.py` over `length` bytes of `input` at `offset`: dm-crypt's
/// aes-xts-plain64 as Python `cryptography` (OpenSSL) computes it.
///
/// Panics, failing the test, when python3 or `cryptography` are missing: the cross-check is the
/// point of the test and must not be skipped.
pub fn python_xts_file(
    direction: Direction,
    key: &[u8],
    sector_size: usize,
    first_sector: u64,
    input: &Path,
    offset: u64,
    length: usize,
) -> Vec<u8> {
    python_xts_file_with_iv(
        direction,
        key,
        sector_size,
        first_sector,
        input,
        offset,
        length,
        "plain64",
    )
}

/// [`python_xts_file`] with dm-crypt's IV mode named: `plain64` or `plain` (32-bit).
#[allow(clippy::too_many_arguments)]
pub fn python_xts_file_with_iv(
    direction: Direction,
    key: &[u8],
    sector_size: usize,
    first_sector: u64,
    input: &Path,
    offset: u64,
    length: usize,
    iv_mode: &str,
) -> Vec<u8> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/xts.py");
    let output = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    let mode = match direction {
        Direction::Encrypt => "encrypt",
        Direction::Decrypt => "decrypt",
    };
    let mut child = Command::new("python3")
        .arg(&script)
        .args([mode, &sector_size.to_string(), &first_sector.to_string()])
        .arg(input)
        .args([offset.to_string(), length.to_string()])
        .arg(output.path())
        .arg(iv_mode)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("python3 is required for the AES-XTS cross-check (apt-get install python3 python3-cryptography): {e}")
        });
    let key_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key_hex.as_bytes())
        .unwrap();
    let result = child.wait_with_output().unwrap();
    assert!(
        result.status.success(),
        "{} failed (is the Python `cryptography` package installed?): {}",
        script.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    let bytes = std::fs::read(output.path()).unwrap();
    assert_eq!(bytes.len(), length, "xts.py wrote a short result");
    bytes
}

/// [`python_xts_file`] over bytes in memory.
pub fn python_xts(
    direction: Direction,
    key: &[u8],
    sector_size: usize,
    first_sector: u64,
    data: &[u8],
) -> Vec<u8> {
    let mut input = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    input.write_all(data).unwrap();
    input.flush().unwrap();
    python_xts_file(
        direction,
        key,
        sector_size,
        first_sector,
        input.path(),
        0,
        data.len(),
    )
}

/// SplitMix64: reproducible "random" bytes from a seed the test prints.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from the clock; the seed is printed so a failure can be replayed
    /// with `IMGCRYPT_TEST_SEED`.
    pub fn from_env_or_clock() -> Self {
        let seed = std::env::var("IMGCRYPT_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("IMGCRYPT_TEST_SEED={seed}");
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// A filesystem mounted on a fresh temporary directory, unmounted on drop (needs root).
pub struct ScratchMount {
    dir: tempfile::TempDir,
}

impl ScratchMount {
    /// `mount -t FSTYPE -o OPTIONS none DIR`.
    pub fn new(fstype: &str, options: &str) -> Self {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let status = Command::new("mount")
            .args(["-t", fstype, "-o", options, fstype])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mount -t {fstype} failed (the tests run as root)"
        );
        Self { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for ScratchMount {
    fn drop(&mut self) {
        // Lazy, so a descriptor a failing test still holds cannot leave the mount behind.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
