//! Memory for secrets: locked (never swapped), excluded from core dumps, zeroised on drop.
//!
//! Secrets live in whole pages of their own, mapped with `mmap` rather than taken from the Rust
//! heap: `MADV_DONTDUMP` and `mlock` work on pages, and heap pages are shared with other data and
//! may be reused after a free without being cleared. Locking is best effort — a process whose
//! `RLIMIT_MEMLOCK` is exhausted still works, with a logged warning — while exclusion from core
//! dumps is required. The pages are zeroised with volatile writes before they are unmapped, so
//! the compiler cannot drop the clearing as a dead store.

use std::fmt;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{madvise, mlock, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use nix::unistd::{sysconf, SysconfVar};
use zeroize::Zeroize;

use crate::{Error, Result};

/// Bytes of secret material in locked, dump-excluded pages that are zeroised when dropped.
///
/// Deliberately not `Clone` (every copy is another place a secret lives) and its `Debug` shows
/// only the length.
pub struct SecretBytes {
    /// Start of the mapping; page-aligned.
    mapping: NonNull<u8>,
    /// Bytes mapped: `len` rounded up to whole pages, at least one page.
    mapped: usize,
    /// Bytes in use, from the start of the mapping.
    len: usize,
    /// Whether `mlock` succeeded.
    locked: bool,
}

// SAFETY: `SecretBytes` exclusively owns its mapping (nothing else holds the pointer, it is not
// `Clone`), like a `Box<[u8]>`; moving the owner to another thread moves that ownership.
unsafe impl Send for SecretBytes {}
// SAFETY: shared references only give `&[u8]` access; mutation needs `&mut self`, so the usual
// aliasing rules make concurrent readers safe, as for `Box<[u8]>`.
unsafe impl Sync for SecretBytes {}

fn page_size() -> usize {
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) if size > 0 => size as usize,
        _ => 4096,
    }
}

impl SecretBytes {
    /// `len` zero bytes in fresh pages of their own.
    pub fn zeroed(len: usize) -> Result<Self> {
        let page = page_size();
        let too_large = || {
            Error::io(
                format!("allocating {len} bytes of secret memory"),
                std::io::Error::from(std::io::ErrorKind::OutOfMemory),
            )
        };
        let mapped = len
            .max(1)
            .checked_next_multiple_of(page)
            .ok_or_else(too_large)?;
        let length = NonZeroUsize::new(mapped).ok_or_else(too_large)?;

        // SAFETY: a new private anonymous mapping at an address of the kernel's choosing cannot
        // overlap or alias any memory Rust already uses.
        let mapping = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(|errno| Error::io(format!("mapping {mapped} bytes of secret memory"), errno))?;

        let mut secret = SecretBytes {
            mapping: mapping.cast(),
            mapped,
            len,
            locked: false,
        };
        // SAFETY: the range is exactly the mapping created above, which we own.
        unsafe { madvise(mapping, mapped, MmapAdvise::MADV_DONTDUMP) }.map_err(|errno| {
            Error::io(
                "excluding secret memory from core dumps (MADV_DONTDUMP)",
                errno,
            )
        })?;
        // SAFETY: as above; locking has no effect on the memory's contents or validity.
        match unsafe { mlock(mapping, mapped) } {
            Ok(()) => secret.locked = true,
            Err(errno) => tracing::warn!(
                bytes = mapped,
                "could not lock secret memory ({errno}; RLIMIT_MEMLOCK too low?): \
                 it may be written to swap; raise LimitMEMLOCK for the daemon"
            ),
        }
        Ok(secret)
    }

    /// `len` bytes from the kernel's random number generator (`getrandom`, blocking until it is
    /// seeded, which on a running system it always is).
    pub fn random(len: usize) -> Result<Self> {
        let mut secret = Self::zeroed(len)?;
        let mut filled = 0;
        while filled < len {
            let rest = &mut secret.as_mut_bytes()[filled..];
            // SAFETY: `rest` is valid for writes of `rest.len()` bytes for the whole call.
            let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if got < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("reading random bytes (getrandom)", error));
            }
            filled += got as usize;
        }
        Ok(secret)
    }

    /// The secret.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the mapping is readable, initialised (anonymous pages start zeroed) and at
        // least `len` bytes long for as long as `self` lives; `&self` prevents writes meanwhile.
        unsafe { std::slice::from_raw_parts(self.mapping.as_ptr(), self.len) }
    }

    /// The secret, for writing into.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.mapping.as_ptr(), self.len) }
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the pages are locked in RAM (false when `RLIMIT_MEMLOCK` refused).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Shortens to `len` bytes, zeroising the bytes dropped; does nothing if `len` is not
    /// shorter.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.as_mut_bytes()[len..].zeroize();
            self.len = len;
        }
    }

    /// The whole mapping, including bytes past `len`, for wiping.
    fn whole_mapping(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `mapped` bytes of readable, writable memory we own, and
        // `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.mapping.as_ptr(), self.mapped) }
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // Volatile writes with a compiler fence: not optimised away although the memory is about
        // to be unmapped.
        self.whole_mapping().zeroize();
        // SAFETY: the range is exactly our mapping, and no reference into it outlives `self`.
        // Unmapping also unlocks it.
        if let Err(errno) = unsafe { munmap(self.mapping.cast(), self.mapped) } {
            tracing::warn!("unmapping secret memory failed: {errno}");
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field of `/proc/self/status` in KiB.
    fn status_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find(|line| line.starts_with(field))
            .unwrap_or_else(|| panic!("{field} missing from /proc/self/status"));
        line[field.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap()
    }

    /// The `VmFlags` of the mapping that starts at `address`, from `/proc/self/smaps`.
    fn vm_flags(address: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{address:x}-");
        let mut in_mapping = false;
        for line in smaps.lines() {
            if line.starts_with(&header) {
                in_mapping = true;
            } else if in_mapping && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping at {address:x} in /proc/self/smaps")
    }

    #[test]
    fn content_round_trips() {
        let mut secret = SecretBytes::zeroed(100).unwrap();
        assert_eq!(secret.len(), 100);
        assert!(secret.as_bytes().iter().all(|&b| b == 0));
        for (i, byte) in secret.as_mut_bytes().iter_mut().enumerate() {
            *byte = i as u8;
        }
        let expected: Vec<u8> = (0..100).map(|i| i as u8).collect();
        assert_eq!(secret.as_bytes(), &expected[..]);

        let empty = SecretBytes::zeroed(0).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.as_bytes(), b"");
    }

    #[test]
    fn truncate_zeroises_what_it_drops() {
        let mut secret = SecretBytes::zeroed(64).unwrap();
        secret.as_mut_bytes().fill(0xAA);
        secret.truncate(10);
        assert_eq!(secret.len(), 10);
        assert_eq!(secret.as_bytes(), &[0xAA; 10]);
        secret.truncate(20);
        assert_eq!(secret.len(), 10, "truncate never grows");
        assert_eq!(
            &secret.whole_mapping()[..64],
            &[[0xAA; 10].as_slice(), &[0; 54]].concat()[..]
        );
    }

    #[test]
    fn random_is_random() {
        let a = SecretBytes::random(64).unwrap();
        let b = SecretBytes::random(64).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_ne!(a.as_bytes(), &[0u8; 64]);
    }

    #[test]
    fn pages_are_locked_and_excluded_from_dumps() {
        // Large enough that other tests' small secrets, created or dropped meanwhile, cannot
        // hide the difference.
        const LEN: usize = 8 << 20;
        let before = status_kib("VmLck:");
        let secret = SecretBytes::zeroed(LEN).unwrap();
        assert!(secret.is_locked(), "root may always lock memory");
        let during = status_kib("VmLck:");
        assert!(
            during >= before + (LEN as u64 / 1024) - 512,
            "VmLck {before} kB -> {during} kB"
        );
        let flags = vm_flags(secret.mapping.as_ptr() as usize);
        assert!(flags.split_whitespace().any(|flag| flag == "dd"), "{flags}");
        assert!(flags.split_whitespace().any(|flag| flag == "lo"), "{flags}");
        drop(secret);
        let after = status_kib("VmLck:");
        assert!(
            after + (LEN as u64 / 1024) - 512 <= during,
            "VmLck {during} kB -> {after} kB after drop"
        );
    }

    /// Set for the child process of `refused_lock_still_works`.
    const CHILD_ENV: &str = "IMGCRYPT_TEST_MEMLOCK_REFUSED";

    /// The half of `refused_lock_still_works` that runs in the restricted child.
    #[test]
    #[ignore = "runs only inside refused_lock_still_works's child process"]
    fn refused_lock_child() {
        assert!(
            std::env::var_os(CHILD_ENV).is_some(),
            "run refused_lock_still_works instead"
        );
        let mut secret = SecretBytes::zeroed(4096).unwrap();
        assert!(!secret.is_locked(), "RLIMIT_MEMLOCK 0 must refuse mlock");
        secret.as_mut_bytes().fill(7);
        assert!(secret.as_bytes().iter().all(|&b| b == 7));
        let flags = vm_flags(secret.mapping.as_ptr() as usize);
        assert!(flags.split_whitespace().any(|flag| flag == "dd"), "{flags}");
    }

    /// Without CAP_IPC_LOCK and with RLIMIT_MEMLOCK at 0, secrets still work (unlocked, still
    /// excluded from dumps). Root ignores the limit, so the check runs in a child process that
    /// drops the capability.
    #[test]
    fn refused_lock_still_works() {
        let output = std::process::Command::new("setpriv")
            .args(["--bounding-set", "-ipc_lock", "prlimit", "--memlock=0:0"])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "keys::secret::tests::refused_lock_child",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .expect("setpriv and prlimit (util-linux) must be installed");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{output:?}"
        );
    }

    #[test]
    fn debug_redacts() {
        let mut secret = SecretBytes::zeroed(4).unwrap();
        secret.as_mut_bytes().copy_from_slice(b"\x53\x45\x43\x52");
        let shown = format!("{secret:?}");
        assert_eq!(shown, "SecretBytes(<4 bytes redacted>)");
        assert!(!shown.contains("83") && !shown.contains("SECR"));
    }
}
