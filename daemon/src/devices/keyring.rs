//! The volume key in the kernel keyring, for the few microseconds dm-crypt needs to read it.
//!
//! A dm-crypt table can carry the key in hex, but tables travel through ioctl buffers, can be
//! read back with `dmsetup table --showkeys`, and end up in logs. So the key goes into the
//! kernel keyring as a `logon` key (whose payload user space can never read back), and the
//! table names it as `:<key bytes>:logon:<description>` ([`dm_crypt_key_reference`], the syntax
//! of dm-crypt's `<key_string>` and of cryptsetup's `get_dm_crypt_params`). dm-crypt looks the
//! key up with `request_key()` in the keyrings of the thread that loads the table and copies it;
//! from then on the key in the keyring is useless, and [`LogonKey::remove`] revokes it (the
//! kernel frees the payload with `kfree_sensitive`) and unlinks it.
//!
//! The key lives in the *thread* keyring: the table is loaded on the same thread right after, no
//! other thread or process (not even another job of ours) can find it, and it disappears with
//! the thread whatever happens.

use std::ffi::{c_long, CString};
use std::io;

use crate::{Error, Result};

/// The kernel key type: like `user`, but its payload can never be read back from user space.
const KEY_TYPE: &std::ffi::CStr = c"logon";

/// A dm-crypt `<key_string>` naming a `logon` key: `:<key_bytes>:logon:<description>`.
///
/// `key_bytes` is the key's length in bytes (64 for AES-XTS with two AES-256 keys); dm-crypt
/// refuses the table when the key in the keyring has another length.
pub fn dm_crypt_key_reference(key_bytes: usize, description: &str) -> String {
    format!(":{key_bytes}:logon:{description}")
}

/// A `logon` key in this thread's keyring; revoked and unlinked when dropped or
/// [removed](Self::remove).
#[derive(Debug)]
pub struct LogonKey {
    serial: i32,
    description: String,
    key_bytes: usize,
    removed: bool,
}

impl LogonKey {
    /// Adds `payload` to the calling thread's keyring as the `logon` key `description`, which
    /// must have a `service:` prefix and no whitespace.
    pub fn add_to_thread_keyring(description: &str, payload: &[u8]) -> Result<Self> {
        let failure = |source: io::Error| {
            Error::io(
                format!("adding the volume key to the kernel keyring as logon key {description}"),
                source,
            )
        };
        let valid = description
            .split_once(':')
            .is_some_and(|(service, _)| !service.is_empty())
            && !description.contains(char::is_whitespace);
        let c_description = CString::new(description)
            .ok()
            .filter(|_| valid)
            .ok_or_else(|| {
                failure(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a logon key description needs a `service:` prefix and no whitespace or NUL",
                ))
            })?;
        // SAFETY: add_key(2) reads the two NUL-terminated strings and `payload.len()` bytes at
        // `payload.as_ptr()`, all of which stay borrowed for the call; it writes no user memory.
        let serial = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                KEY_TYPE.as_ptr(),
                c_description.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                c_long::from(libc::KEY_SPEC_THREAD_KEYRING),
            )
        };
        if serial < 0 {
            let error = io::Error::last_os_error();
            let hint = match error.raw_os_error() {
                Some(libc::ENOSYS) => " (this kernel has no key retention service, CONFIG_KEYS)",
                Some(libc::EDQUOT) => {
                    " (the keyring quota of root is exhausted: see /proc/key-users)"
                }
                _ => "",
            };
            return Err(failure(io::Error::new(
                error.kind(),
                format!("{error}{hint}"),
            )));
        }
        let serial = i32::try_from(serial).map_err(|_| {
            failure(io::Error::other(
                "the kernel returned an invalid key serial",
            ))
        })?;
        Ok(Self {
            serial,
            description: description.to_string(),
            key_bytes: payload.len(),
            removed: false,
        })
    }

    /// The key's serial number (as `keyctl` and `/proc/keys` show it).
    pub fn serial(&self) -> i32 {
        self.serial
    }

    /// The key's description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// What a dm-crypt table writes instead of the key: `:<bytes>:logon:<description>`.
    pub fn dm_crypt_reference(&self) -> String {
        dm_crypt_key_reference(self.key_bytes, &self.description)
    }

    /// Revokes the key (its payload is freed at once) and unlinks it from the thread keyring.
    pub fn remove(mut self) -> Result<()> {
        self.revoke_and_unlink()
    }

    fn revoke_and_unlink(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let revoked = keyctl(libc::KEYCTL_REVOKE, self.serial, 0);
        // Unlink even when revoking failed: a key nobody links is garbage-collected.
        let unlinked = keyctl(
            libc::KEYCTL_UNLINK,
            self.serial,
            libc::KEY_SPEC_THREAD_KEYRING,
        );
        revoked
            .and(unlinked)
            .map_err(|e| Error::io(format!("removing logon key {}", self.description), e))
    }
}

impl Drop for LogonKey {
    fn drop(&mut self) {
        if let Err(error) = self.revoke_and_unlink() {
            tracing::warn!(
                %error,
                serial = self.serial,
                "could not remove the volume key from the thread keyring; it goes when the \
                 thread ends"
            );
        }
    }
}

/// `keyctl(operation, key, argument)` for the operations that take two integer arguments.
fn keyctl(operation: libc::c_uint, key: i32, argument: i32) -> io::Result<()> {
    // SAFETY: KEYCTL_REVOKE and KEYCTL_UNLINK take only integer arguments and touch no user
    // memory; extra arguments are ignored by the kernel.
    let result = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            c_long::from(operation),
            c_long::from(key),
            c_long::from(argument),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `keyctl(KEYCTL_DESCRIBE)`: "type;uid;gid;perm;description".
    fn describe(serial: i32) -> io::Result<String> {
        let mut buffer = vec![0u8; 512];
        // SAFETY: KEYCTL_DESCRIBE writes at most `buffer.len()` bytes to the buffer, which is
        // live and writable for the call.
        let len = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                c_long::from(libc::KEYCTL_DESCRIBE),
                c_long::from(serial),
                buffer.as_mut_ptr(),
                buffer.len(),
            )
        };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        let text = &buffer[..(len as usize).min(buffer.len())];
        Ok(String::from_utf8_lossy(text)
            .trim_end_matches('\0')
            .to_string())
    }

    /// `keyctl(KEYCTL_READ)` into a buffer; logon keys must refuse.
    fn read_payload(serial: i32) -> io::Result<Vec<u8>> {
        let mut buffer = vec![0u8; 128];
        // SAFETY: KEYCTL_READ writes at most `buffer.len()` bytes into the live buffer.
        let len = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                c_long::from(libc::KEYCTL_READ),
                c_long::from(serial),
                buffer.as_mut_ptr(),
                buffer.len(),
            )
        };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        buffer.truncate(len as usize);
        Ok(buffer)
    }

    /// Searches the thread keyring for a logon key (what dm-crypt's request_key finds).
    fn search_thread_keyring(description: &str) -> io::Result<i32> {
        let description = CString::new(description).unwrap();
        // SAFETY: KEYCTL_SEARCH reads two NUL-terminated strings that outlive the call and
        // writes no user memory (destination keyring 0 = do not link).
        let serial = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                c_long::from(libc::KEYCTL_SEARCH),
                c_long::from(libc::KEY_SPEC_THREAD_KEYRING),
                KEY_TYPE.as_ptr(),
                description.as_ptr(),
                0 as c_long,
            )
        };
        if serial < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(serial as i32)
        }
    }

    #[test]
    fn reference_syntax_is_dm_crypts() {
        assert_eq!(
            dm_crypt_key_reference(64, "imgcrypt:job-9"),
            ":64:logon:imgcrypt:job-9"
        );
        assert_eq!(dm_crypt_key_reference(32, "a:b"), ":32:logon:a:b");
    }

    #[test]
    fn key_is_findable_unreadable_and_gone_after_removal() {
        let payload: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5c).collect();
        let description = "imgcrypt:test-key-lifecycle";
        let key = LogonKey::add_to_thread_keyring(description, &payload).unwrap();
        assert_eq!(key.dm_crypt_reference(), format!(":64:logon:{description}"));

        let described = describe(key.serial()).unwrap();
        assert!(described.starts_with("logon;0;"), "{described}");
        assert!(
            described.ends_with(&format!(";{description}")),
            "{described}"
        );
        // What dm-crypt's request_key() does from this thread finds exactly this key.
        assert_eq!(search_thread_keyring(description).unwrap(), key.serial());
        // A logon key's payload never comes back to user space.
        assert!(read_payload(key.serial()).is_err());

        // Another thread has its own thread keyring and does not see the key.
        let other = std::thread::spawn(move || search_thread_keyring(description).is_err());
        assert!(other.join().unwrap());

        let serial = key.serial();
        key.remove().unwrap();
        assert!(search_thread_keyring(description).is_err());
        assert!(
            describe(serial).is_err(),
            "the key still exists after removal"
        );
    }

    #[test]
    fn dropping_removes_too() {
        let description = "imgcrypt:test-key-drop";
        let serial = {
            let key = LogonKey::add_to_thread_keyring(description, &[7u8; 64]).unwrap();
            assert!(search_thread_keyring(description).is_ok());
            key.serial()
        };
        assert!(search_thread_keyring(description).is_err());
        assert!(describe(serial).is_err());
    }

    #[test]
    fn descriptions_logon_keys_refuse_are_refused_before_the_kernel() {
        for bad in [
            "no-service-prefix",
            ":empty-service",
            "imgcrypt:with space",
            "a:b\0c",
        ] {
            let error = LogonKey::add_to_thread_keyring(bad, &[1u8; 64]).unwrap_err();
            assert!(error.to_string().contains("service:"), "{bad}: {error}");
        }
    }
}
