//! Which candidate key opens an image, with as few key derivations as possible.
//!
//! Each attempt to open a keyslot runs its PBKDF: seconds and up to a GiB of memory by
//! cryptsetup's defaults. So:
//!
//! 1. A candidate whose fingerprint equals the `imgcrypt-key` token of an active keyslot opens
//!    that keyslot only: one derivation ([`UnlockMethod::Token`]). If it fails, the token and the
//!    keyslot disagree, which is reported as a wrong key, not papered over with trials.
//! 2. No candidate matches a token and every active keyslot has one: none of the candidates can
//!    be the right key, so this fails at once, without any derivation.
//! 3. Otherwise the keyslots without a token (LUKS1, images from plain `cryptsetup luksFormat`)
//!    are tried with each candidate in the order given ([`UnlockMethod::Trial`]); keyslots whose
//!    token names another key are never tried.

use imgcrypt_proto::api::{UnlockMethod, Unlocked};
use libcryptsetup_rs::{CryptDevice, LibcryptErr};

use super::image::LuksImage;
use super::{clear_errors, libcryptsetup_error};
use crate::keys::{CandidateKey, SecretBytes};
use crate::{Error, Result};

impl LuksImage {
    /// Finds the candidate that opens the image and returns the volume key with how it was
    /// found. `notice` receives text for the user when trials (slow) are about to run.
    ///
    /// Fails with [`Error::WrongKey`] when no candidate opens it, [`Error::NoKey`] when there
    /// are no candidates, and [`Error::UnsupportedImage`] when the cipher is not one imgcrypt
    /// decrypts.
    pub fn unlock(
        &self,
        candidates: &[CandidateKey],
        notice: &dyn Fn(String),
    ) -> Result<(SecretBytes, Unlocked)> {
        self.check_cipher_supported()?;
        if candidates.is_empty() {
            return Err(Error::NoKey(
                "no key was offered to open the LUKS image: pass --key-file FILE or add the \
                 image's key to your key ring"
                    .to_string(),
            ));
        }
        let key_bytes = (self.key_size_bits() / 8) as usize;
        let mut device = self.open_device()?;

        for candidate in candidates {
            let Some(keyslot) = self.keyslot_of(&candidate.key.fingerprint) else {
                continue;
            };
            return match open_keyslot(&mut device, keyslot, candidate, key_bytes)? {
                Some(volume_key) => Ok((
                    volume_key,
                    unlocked(candidate, keyslot, UnlockMethod::Token, 1),
                )),
                None => Err(self.wrong_key(
                    &[candidate],
                    format!(
                        "key {} ({}) matches the imgcrypt-key token of keyslot {keyslot} but \
                         does not open that keyslot: the token and the keyslot disagree (the \
                         header was edited by hand?)",
                        candidate.name, candidate.key.fingerprint
                    ),
                )),
            };
        }

        let untokened: Vec<u32> = self
            .keyslots()
            .iter()
            .filter(|slot| slot.fingerprint.is_none())
            .map(|slot| slot.keyslot)
            .collect();
        let all: Vec<&CandidateKey> = candidates.iter().collect();
        if untokened.is_empty() {
            return Err(self.wrong_key(
                &all,
                format!(
                    "none of the {} key(s) offered matches a fingerprint this image carries \
                     (no key derivation was run)",
                    candidates.len()
                ),
            ));
        }

        notice(format!(
            "the image carries no imgcrypt-key fingerprint for keyslot(s) {}: trying {} key(s) \
             in ring order; each try costs a key derivation",
            list(&untokened),
            candidates.len()
        ));
        let mut attempts = 0u32;
        for candidate in candidates {
            for &keyslot in &untokened {
                attempts += 1;
                if let Some(volume_key) = open_keyslot(&mut device, keyslot, candidate, key_bytes)?
                {
                    return Ok((
                        volume_key,
                        unlocked(candidate, keyslot, UnlockMethod::Trial, attempts),
                    ));
                }
            }
        }
        Err(self.wrong_key(
            &all,
            format!(
                "none of the {} key(s) offered opens keyslot(s) {} ({attempts} key derivations \
                 run)",
                candidates.len(),
                list(&untokened)
            ),
        ))
    }

    /// A [`Error::WrongKey`] naming what was tried and what the image carries.
    fn wrong_key(&self, tried: &[&CandidateKey], what: String) -> Error {
        let carried: Vec<String> = self
            .keyslots()
            .iter()
            .filter_map(|slot| slot.fingerprint.clone())
            .collect();
        let tried_text = tried
            .iter()
            .map(|key| format!("{} ({})", key.name, key.key.fingerprint))
            .collect::<Vec<_>>()
            .join(", ");
        let carried_text = if carried.is_empty() {
            "the image carries no key fingerprints".to_string()
        } else {
            let slots = self
                .keyslots()
                .iter()
                .filter_map(|slot| {
                    slot.fingerprint
                        .as_ref()
                        .map(|fingerprint| format!("keyslot {}: {fingerprint}", slot.keyslot))
                })
                .collect::<Vec<_>>()
                .join(", ");
            format!("the image carries the fingerprints {slots}")
        };
        Error::WrongKey {
            message: format!(
                "wrong key: {what}. Tried {tried_text}; {carried_text}. Add the key the image \
                 was made with to your key ring as decryption_keyN, or pass it with --key-file"
            ),
            tried: tried
                .iter()
                .map(|key| key.key.fingerprint.clone())
                .collect(),
            carried,
        }
    }
}

fn unlocked(
    candidate: &CandidateKey,
    keyslot: u32,
    method: UnlockMethod,
    attempts: u32,
) -> Unlocked {
    Unlocked {
        key_name: candidate.name.clone(),
        fingerprint: candidate.key.fingerprint.clone(),
        keyslot,
        method,
        attempts,
    }
}

/// "0, 2, 5"
fn list(keyslots: &[u32]) -> String {
    keyslots
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The volume key from `keyslot` opened with `candidate` (one key derivation), or None when the
/// key does not open it.
fn open_keyslot(
    device: &mut CryptDevice,
    keyslot: u32,
    candidate: &CandidateKey,
    key_bytes: usize,
) -> Result<Option<SecretBytes>> {
    clear_errors();
    let mut volume_key = SecretBytes::zeroed(key_bytes)?;
    let opened = device.volume_key_handle().get(
        Some(keyslot),
        volume_key.as_mut_bytes(),
        Some(candidate.key.passphrase.as_bytes()),
    );
    match opened {
        Ok((_, length)) if length == key_bytes => Ok(Some(volume_key)),
        Ok((_, length)) => Err(Error::Luks {
            operation: "reading the volume key",
            message: format!("libcryptsetup returned {length} bytes, not {key_bytes}"),
        }),
        // libcryptsetup's answer for "this passphrase does not open this keyslot".
        Err(LibcryptErr::IOError(error)) if error.raw_os_error() == Some(libc::EPERM) => {
            clear_errors();
            Ok(None)
        }
        Err(error) => Err(libcryptsetup_error("opening a keyslot", error)),
    }
}
