//! Key fingerprints (base64 SHA-256 of the key file's bytes) computed without leaving key bytes
//! behind in ordinary memory.
//!
//! `Sha256::digest(key)` would keep the hasher — whose block buffer holds the key's last
//! partial block, for a 44-byte key the whole key — on the worker thread's stack, where it stays
//! after the call until something happens to overwrite it, and the compression function's
//! message schedule (the key's words, then values derived from them) lies in the frames below.
//! So the hasher lives in locked, dump-excluded, zeroised [`SecretBytes`], and the stack the
//! hashing used is overwritten once it is done. (Registers are not cleared; no portable Rust
//! can, and they are overwritten within instructions.)

use base64::Engine as _;
use sha2::digest::{FixedOutputReset, Output};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use super::SecretBytes;
use crate::Result;

/// Bytes of stack overwritten after hashing: far more than SHA-256's frames use.
const STACK_SCRUB_BYTES: usize = 32 * 1024;

// The hasher is written into and wiped out of raw secret memory: that is sound only for plain
// data that owns nothing.
const _: () = assert!(!std::mem::needs_drop::<Sha256>());
// SecretBytes mappings are page-aligned; any page alignment satisfies the hasher's.
const _: () = assert!(std::mem::align_of::<Sha256>() <= 4096);

/// Base64 SHA-256 of `key`: the same value as `imgcrypt_proto::keyfile::fingerprint`, computed
/// with the hasher's state in locked memory.
pub fn fingerprint(key: &[u8]) -> Result<String> {
    let digest = hash_in_secret_memory(&[key])?;
    scrub_stack();
    Ok(base64::engine::general_purpose::STANDARD.encode(digest))
}

/// The key hash blktap stores in an encrypted VHD and `vhd-util key -C` prints:
/// SHA-256(nonce ‖ raw key) (blktap `drivers/block-crypto.c` `vhd_calculate_keyhash`), computed
/// with the same care as [`fingerprint`].
pub fn vhd_key_hash(nonce: &[u8; 32], raw_key: &[u8]) -> Result<[u8; 32]> {
    let digest = hash_in_secret_memory(&[nonce, raw_key])?;
    scrub_stack();
    Ok(digest.into())
}

/// SHA-256 of the concatenated `parts` with the hasher placed in [`SecretBytes`], which
/// zeroise it when dropped.
#[inline(never)]
fn hash_in_secret_memory(parts: &[&[u8]]) -> Result<Output<Sha256>> {
    let mut state = SecretBytes::zeroed(std::mem::size_of::<Sha256>())?;
    let place = state.as_mut_bytes().as_mut_ptr().cast::<Sha256>();
    // SAFETY: `place` is the start of a page-aligned mapping (aligned for `Sha256`, asserted
    // above) at least `size_of::<Sha256>()` bytes long, owned by `state` and not otherwise
    // referenced while `hasher` lives. `write` does not read the old (zero) bytes.
    let hasher = unsafe {
        place.write(Sha256::new());
        &mut *place
    };
    for part in parts {
        Digest::update(hasher, part);
    }
    let mut digest = Output::<Sha256>::default();
    // `_reset` leaves the state as new (no key-derived words) before `state` is wiped anyway.
    FixedOutputReset::finalize_into_reset(hasher, &mut digest);
    // `Sha256` needs no drop (asserted above): dropping `state` zeroises and unmaps the bytes.
    drop(state);
    Ok(digest)
}

/// Overwrites the stack below the caller's frame, where the hashing's frames were.
#[inline(never)]
fn scrub_stack() {
    let mut area = [0u8; STACK_SCRUB_BYTES];
    // Volatile writes: not removed as dead stores.
    area.zeroize();
    std::hint::black_box(&area);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhd_key_hash_is_sha256_of_nonce_then_key_as_openssl_computes_it() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(29) ^ 0x5c).collect();
        for nonce in [[0u8; 32], [7u8; 32]] {
            let mut child = Command::new("sh")
                .args(["-c", "openssl dgst -sha256 -r | cut -c1-64"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("openssl must be installed");
            let mut input = child.stdin.take().unwrap();
            input.write_all(&nonce).unwrap();
            input.write_all(&key).unwrap();
            drop(input);
            let output = child.wait_with_output().unwrap();
            let expected = String::from_utf8(output.stdout).unwrap();
            let ours: String = vhd_key_hash(&nonce, &key)
                .unwrap()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(ours, expected.trim());
        }
    }

    #[test]
    fn agrees_with_the_protocol_crate_and_known_vectors() {
        for key in [
            &b"abc"[..],
            b"",
            b"q83vEjRWeJq8zd7wESIzRFVmd4iZqrvM3e7/ABEiM0Q=",
            &[b'A'; 512][..],
        ] {
            assert_eq!(
                fingerprint(key).unwrap(),
                imgcrypt_proto::keyfile::fingerprint(key)
            );
        }
        // SHA-256("abc"), FIPS 180-2 appendix B.1, in base64.
        assert_eq!(
            fingerprint(b"abc").unwrap(),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
    }

    /// The point of the module: after a fingerprint, the stack the hashing used holds no copy
    /// of the key. Probed by reading the stack below the calling frame afterwards.
    #[test]
    fn leaves_no_key_bytes_on_the_stack() {
        let key = b"Zm9yIHRoZSBzdGFjayBzY3J1YiB0ZXN0IG9ubHkhISE=";
        std::thread::spawn(move || {
            let marker = 0u8;
            let top = std::hint::black_box(&marker) as *const u8 as usize;
            fingerprint(key).unwrap();
            assert!(
                !stack_below_contains(top, key),
                "key bytes were left on the stack"
            );
            // The probe sees what a plain digest leaves, so the check above can fail.
            plain_digest(key);
            assert!(
                stack_below_contains(top, key),
                "the probe should find what Sha256::digest leaves behind"
            );
        })
        .join()
        .unwrap();
    }

    #[inline(never)]
    fn plain_digest(key: &[u8]) {
        std::hint::black_box(Sha256::digest(std::hint::black_box(key)));
    }

    /// Whether the `STACK_SCRUB_BYTES` below `top` (the address of a local in the calling
    /// frame) hold the last 12 bytes of `needle`: the partial block a hasher buffers.
    #[inline(never)]
    fn stack_below_contains(top: usize, needle: &[u8]) -> bool {
        let tail = &needle[needle.len() - 12..];
        let mut address = top - STACK_SCRUB_BYTES;
        while address + tail.len() <= top {
            let mut matched = 0;
            while matched < tail.len() {
                // SAFETY: the address lies within 32 KiB below a live local of this thread's
                // stack (2 MiB, std's default), so it is mapped and readable; the byte is only
                // compared, and any bit pattern is a valid u8.
                let byte = unsafe { std::ptr::read_volatile((address + matched) as *const u8) };
                if byte != tail[matched] {
                    break;
                }
                matched += 1;
            }
            if matched == tail.len() {
                return true;
            }
            address += 1;
        }
        false
    }
}
