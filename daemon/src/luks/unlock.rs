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

use super::cost::KdfCaps;
use super::image::LuksImage;
use super::{clear_errors, libcryptsetup_error};
use crate::keys::{CandidateKey, SecretBytes};
use crate::{Error, Result};

/// How an unlock may run: the caller's derivation caps, where its notices go, and whether its
/// job was cancelled (checked before every derivation, so a client that hangs up mid-trial
/// stops the trials).
pub struct Unlocking<'a> {
    /// The caps every keyslot must fit before it is derived.
    pub caps: &'a KdfCaps,
    /// Text for the user when trials (slow) are about to run.
    pub notice: &'a dyn Fn(String),
    /// True once the job is cancelled.
    pub cancelled: &'a dyn Fn() -> bool,
}

fn no_notice(_: String) {}
fn never_cancelled() -> bool {
    false
}

impl Unlocking<'static> {
    /// Under `caps`, with no notices and no cancellation: for the daemon's own checks of a
    /// keyslot it has just written.
    pub fn quiet(caps: &'static KdfCaps) -> Self {
        Self {
            caps,
            notice: &no_notice,
            cancelled: &never_cancelled,
        }
    }
}

impl LuksImage {
    /// Finds the candidate that opens the image and returns the volume key with how it was
    /// found.
    ///
    /// No keyslot is derived whose cost is over `how.caps`: a token-matched one is refused, a
    /// trial skips it and names it if nothing opens. Fails with [`Error::WrongKey`] when no
    /// candidate opens it, [`Error::NoKey`] when there are no candidates,
    /// [`Error::UnsupportedImage`] when the keyslot to open (or every keyslot that could be
    /// tried) is over the caps, and [`Error::Cancelled`] when the job was cancelled between
    /// derivations. Whether imgcrypt can decrypt the payload is not checked here
    /// ([`Self::check_payload_supported`]): header-only jobs open any cipher.
    pub fn unlock(
        &self,
        candidates: &[CandidateKey],
        how: &Unlocking<'_>,
    ) -> Result<(SecretBytes, Unlocked)> {
        if candidates.is_empty() {
            return Err(Error::NoKey(
                "no key was offered to open the LUKS image: pass --key-file FILE or add the \
                 image's key to your key ring"
                    .to_string(),
            ));
        }
        let key_bytes = (self.key_size_bits() / 8) as usize;
        let mut device = self.open_device()?;
        let cancel_point = || {
            if (how.cancelled)() {
                Err(Error::Cancelled)
            } else {
                Ok(())
            }
        };

        for candidate in candidates {
            let Some(keyslot) = self.keyslot_of(&candidate.key.fingerprint) else {
                continue;
            };
            if let Some(why) = self.keyslot_refusal(keyslot, how.caps) {
                tracing::warn!(keyslot, "not deriving: {why}");
                return Err(Error::UnsupportedImage {
                    message: format!(
                        "key {} matches the imgcrypt-key token of keyslot {keyslot}, but {why}",
                        candidate.name
                    ),
                });
            }
            cancel_point()?;
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
        let mut skipped = Vec::new();
        let mut triable = Vec::new();
        for &keyslot in &untokened {
            match self.keyslot_refusal(keyslot, how.caps) {
                Some(why) => {
                    tracing::warn!(keyslot, "not deriving: {why}");
                    skipped.push(why);
                }
                None => triable.push(keyslot),
            }
        }
        if triable.is_empty() {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "no keyslot of this image can be tried (no key derivation was run): {}",
                    skipped.join("; ")
                ),
            });
        }

        (how.notice)(format!(
            "the image carries no imgcrypt-key fingerprint for keyslot(s) {}: trying {} key(s) \
             in ring order; each try costs a key derivation{}",
            list(&triable),
            candidates.len(),
            if skipped.is_empty() {
                String::new()
            } else {
                format!(" (skipping: {})", skipped.join("; "))
            }
        ));
        let mut attempts = 0u32;
        for candidate in candidates {
            for &keyslot in &triable {
                cancel_point()?;
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
        let tried = format!(
            "none of the {} key(s) offered opens keyslot(s) {} ({attempts} key derivations run)",
            candidates.len(),
            list(&triable)
        );
        if !skipped.is_empty() {
            // The right key may be in a keyslot that was not tried: not a plain wrong key.
            return Err(Error::UnsupportedImage {
                message: format!("{tried}; not tried: {}", skipped.join("; ")),
            });
        }
        Err(self.wrong_key(&all, tried))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luks::cost::{NON_ROOT_CAPS, ROOT_CAPS};
    use crate::luks::image::testing::*;
    use crate::luks::{format_header, Change, HeaderSpec, VOLUME_KEY_BYTES};
    use imgcrypt_proto::api::{LuksVersion, Pbkdf, PbkdfKind};
    use imgcrypt_proto::keyfile::fingerprint;
    use std::cell::RefCell;
    use std::os::unix::fs::FileExt;
    use std::time::Instant;

    /// Generated keys (`imgctl key generate`), so headers carry their `imgcrypt-key` tokens.
    const KEY_A: &[u8] = b"8KiOclVIE2tldMbFc5uayeoiL2V/1P0aKhiNNyZZujE=";
    const KEY_B: &[u8] = b"IvVY4Ngoxq5KPUjj/b60K8B5xohGgq6TNVN+2ISVQCk=";

    fn others() -> Vec<CandidateKey> {
        (1..=3)
            .map(|i| {
                candidate(
                    &format!("decryption_key{i}"),
                    format!("other-{i}").as_bytes(),
                )
            })
            .collect()
    }

    fn read_write(image: &tempfile::NamedTempFile) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image.path())
            .unwrap()
    }

    /// The volume key as `cryptsetup luksDump --dump-volume-key` writes it.
    fn cryptsetup_volume_key(image: &tempfile::NamedTempFile, key: &[u8]) -> Vec<u8> {
        let key = key_file(key);
        // cryptsetup creates the file itself and refuses an existing one.
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let out = dir.path().join("volume-key");
        cryptsetup(
            &[
                "luksDump",
                "--batch-mode",
                "--dump-volume-key",
                "--volume-key-file",
                out.to_str().unwrap(),
                "--key-file",
                key.path().to_str().unwrap(),
            ],
            image.path(),
        );
        std::fs::read(out).unwrap()
    }

    /// A LUKS2 image formatted by `format_header` for `key` (so keyslot 0 carries its token),
    /// with the PBKDF given.
    fn imgcrypt_image(key: &[u8], pbkdf: Pbkdf) -> tempfile::NamedTempFile {
        let volume_key = SecretBytes::random(VOLUME_KEY_BYTES).unwrap();
        let key = candidate("encryption_key", key);
        let spec = HeaderSpec {
            version: LuksVersion::Luks2,
            sector_size: 512,
            pbkdf,
        };
        let header = format_header(
            &spec,
            &volume_key,
            &key.key.passphrase,
            &key.key.fingerprint,
        )
        .unwrap();
        let image = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        let mut bytes = vec![0u8; header.data_offset as usize];
        header.image.read_exact_at(&mut bytes, 0).unwrap();
        image.as_file().write_all_at(&bytes, 0).unwrap();
        image
            .as_file()
            .set_len(header.data_offset + (1 << 20))
            .unwrap();
        image
    }

    #[test]
    fn a_matching_token_opens_its_keyslot_with_one_key_derivation() {
        // Keyslot 0: key A, no token (plain cryptsetup); keyslot 1: key B with its token.
        let image = cryptsetup_image("luks2", KEY_A, 20, &[]);
        let file = read_write(&image);
        let mut luks = LuksImage::read(&file).unwrap();
        let (volume_key, _) = luks
            .unlock(&[candidate("a", KEY_A)], &Unlocking::quiet(&ROOT_CAPS))
            .unwrap();
        let cheap = Pbkdf {
            kind: Some(PbkdfKind::Pbkdf2),
            iterations: Some(1000),
            ..Pbkdf::default()
        };
        luks.add_keyslot(&volume_key, &candidate("b", KEY_B), &cheap)
            .unwrap();
        luks.commit(&file, Change::Added).unwrap();
        let luks = LuksImage::read(&file).unwrap();

        let mut candidates = others();
        candidates.push(candidate("decryption_key4", KEY_B));
        let notices = RefCell::new(Vec::new());
        let ((volume_key, unlocked), derivations) = counting_key_derivations(|| {
            luks.unlock(
                &candidates,
                &Unlocking {
                    caps: &ROOT_CAPS,
                    notice: &|notice| notices.borrow_mut().push(notice),
                    cancelled: &|| false,
                },
            )
            .unwrap()
        });
        assert_eq!(
            unlocked,
            Unlocked {
                key_name: "decryption_key4".to_string(),
                fingerprint: fingerprint(KEY_B),
                keyslot: 1,
                method: UnlockMethod::Token,
                attempts: 1,
            }
        );
        assert_eq!(
            derivations, 1,
            "libcryptsetup ran {derivations} key derivations"
        );
        assert!(notices.borrow().is_empty(), "{:?}", notices.borrow());
        assert_eq!(volume_key.as_bytes(), cryptsetup_volume_key(&image, KEY_A));
    }

    #[test]
    fn without_a_matching_token_no_key_derivation_runs() {
        // A slow keyslot: one derivation takes a measurable time.
        let slow = Pbkdf {
            kind: Some(PbkdfKind::Pbkdf2),
            iterations: Some(500_000),
            ..Pbkdf::default()
        };
        let image = imgcrypt_image(KEY_A, slow);
        let luks = LuksImage::read(image.as_file()).unwrap();
        let started = Instant::now();
        let (_, unlocked) = luks
            .unlock(&[candidate("a", KEY_A)], &Unlocking::quiet(&ROOT_CAPS))
            .unwrap();
        let one_derivation = started.elapsed();
        assert_eq!(unlocked.method, UnlockMethod::Token);

        let candidates = others();
        let started = Instant::now();
        let (error, derivations) = counting_key_derivations(|| {
            luks.unlock(&candidates, &Unlocking::quiet(&ROOT_CAPS))
                .unwrap_err()
        });
        let refused_in = started.elapsed();
        eprintln!("one key derivation {one_derivation:?}; refusal {refused_in:?}");
        assert_eq!(derivations, 0);
        assert!(
            refused_in * 5 < one_derivation,
            "refusal took {refused_in:?}, one derivation {one_derivation:?}"
        );
        let Error::WrongKey {
            message,
            tried,
            carried,
        } = error
        else {
            panic!("{error:?}")
        };
        assert_eq!(
            tried,
            candidates
                .iter()
                .map(|key| key.key.fingerprint.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(carried, vec![fingerprint(KEY_A)]);
        for key in &candidates {
            assert!(message.contains(&key.name), "{message}");
            assert!(message.contains(&key.key.fingerprint), "{message}");
        }
        assert!(message.contains(&fingerprint(KEY_A)), "{message}");
        assert!(message.contains("decryption_keyN"), "{message}");
        assert!(message.contains("--key-file"), "{message}");
    }

    #[test]
    fn token_less_keyslots_are_tried_in_ring_order() {
        for kind in ["luks2", "luks1"] {
            let image = cryptsetup_image(kind, KEY_A, 20, &[]);
            let luks = LuksImage::read(image.as_file()).unwrap();
            let mut candidates = others();
            candidates.insert(2, candidate("decryption_key9", KEY_A));
            let notices = RefCell::new(Vec::new());
            let (volume_key, unlocked) = luks
                .unlock(
                    &candidates,
                    &Unlocking {
                        caps: &ROOT_CAPS,
                        notice: &|notice| notices.borrow_mut().push(notice),
                        cancelled: &|| false,
                    },
                )
                .unwrap();
            assert_eq!(
                unlocked,
                Unlocked {
                    key_name: "decryption_key9".to_string(),
                    fingerprint: fingerprint(KEY_A),
                    keyslot: 0,
                    method: UnlockMethod::Trial,
                    attempts: 3,
                },
                "{kind}"
            );
            assert_eq!(volume_key.as_bytes(), cryptsetup_volume_key(&image, KEY_A));
            let notices = notices.borrow();
            assert_eq!(notices.len(), 1);
            assert!(notices[0].contains("keyslot(s) 0"), "{}", notices[0]);
            assert!(notices[0].contains("trying 4 key(s)"), "{}", notices[0]);

            let wrong = others();
            let error = luks
                .unlock(&wrong, &Unlocking::quiet(&ROOT_CAPS))
                .unwrap_err();
            let Error::WrongKey {
                message,
                tried,
                carried,
            } = error
            else {
                panic!("{error:?}")
            };
            assert_eq!(tried.len(), 3);
            assert!(carried.is_empty());
            assert!(message.contains("3 key derivations"), "{message}");
            assert!(message.contains("decryption_key3"), "{message}");
        }
    }

    #[test]
    fn a_token_that_disagrees_with_its_keyslot_is_a_wrong_key() {
        // Keyslot 0 opens with A, but a token claims B's fingerprint for it.
        let image = cryptsetup_image("luks2", KEY_A, 20, &[]);
        let file = read_write(&image);
        let mut luks = LuksImage::read(&file).unwrap();
        {
            let mut device = luks.open_device().unwrap();
            crate::luks::token::add(&mut device, 0, &fingerprint(KEY_B)).unwrap();
        }
        luks.commit(&file, Change::Added).unwrap();
        let luks = LuksImage::read(&file).unwrap();
        assert_eq!(luks.keyslot_of(&fingerprint(KEY_B)), Some(0));
        let error = luks
            .unlock(
                &[candidate("b", KEY_B), candidate("a", KEY_A)],
                &Unlocking::quiet(&ROOT_CAPS),
            )
            .unwrap_err();
        match error {
            Error::WrongKey { message, .. } => {
                assert!(message.contains("disagree"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_candidates_is_no_key() {
        let image = cryptsetup_image("luks2", KEY_A, 20, &[]);
        let luks = LuksImage::read(image.as_file()).unwrap();
        assert!(matches!(
            luks.unlock(&[], &Unlocking::quiet(&ROOT_CAPS)),
            Err(Error::NoKey(_))
        ));
    }

    #[test]
    fn other_ciphers_open_for_header_work_and_are_refused_for_the_payload() {
        // Header-only rotation decrypts nothing, so unlocking does not care about the cipher;
        // the payload readers check it (check_payload_supported).
        let image = cryptsetup_image(
            "luks2",
            KEY_A,
            20,
            &["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"],
        );
        let luks = LuksImage::read(image.as_file()).unwrap();
        assert_eq!(luks.cipher(), "aes-cbc-essiv:sha256");
        assert_eq!(luks.key_size_bits(), 256);
        let (volume_key, _) = luks
            .unlock(&[candidate("a", KEY_A)], &Unlocking::quiet(&ROOT_CAPS))
            .unwrap();
        assert_eq!(volume_key.as_bytes(), cryptsetup_volume_key(&image, KEY_A));
        match luks.check_payload_supported().unwrap_err() {
            Error::UnsupportedImage { message } => {
                assert!(message.contains("aes-cbc-essiv:sha256"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_keyslot_over_the_cap_is_never_derived() {
        // Trial path (no token), LUKS2: 4294967295 pbkdf2 iterations, or argon2id 2^32-1 passes
        // over 4 GiB. Either derivation would run for hours; the refusal comes with none run.
        for edit in [
            &["keyslots.0.kdf.iterations=4294967295"][..],
            &[
                r#"keyslots.0.kdf={"type":"argon2id","time":4294967295,"memory":4194304,"cpus":4,"salt":"GUhnD2Rimni10iWp3G5bv/57RpwHUgn28oObyAXGquc="}"#,
            ][..],
            &["digests.0.iterations=4294967295"][..],
            // Only the secondary copy is hostile, and the primary's checksum is spoilt so that
            // libcryptsetup uses the secondary (and repairs the daemon's copy from it): the
            // check sees what libcryptsetup derives, not the primary the image started with.
            &[
                "--secondary-only",
                "--break-primary",
                "keyslots.0.kdf.iterations=4294967295",
            ][..],
        ] {
            let image = cryptsetup_image("luks2", KEY_A, 20, &[]);
            edit_header(image.path(), edit);
            let luks = LuksImage::read(image.as_file()).unwrap();
            let (error, derivations) = counting_key_derivations(|| {
                luks.unlock(&[candidate("a", KEY_A)], &Unlocking::quiet(&NON_ROOT_CAPS))
                    .unwrap_err()
            });
            assert_eq!(derivations, 0, "{edit:?}");
            let Error::UnsupportedImage { message } = error else {
                panic!("{error:?}")
            };
            assert!(message.contains("keyslot 0"), "{message}");
            assert!(message.contains("no key derivation was run"), "{message}");
            assert!(message.contains("luksConvertKey"), "{message}");
        }

        // Token path: the token names the keyslot, and it is still not derived.
        let cheap = Pbkdf {
            kind: Some(PbkdfKind::Pbkdf2),
            iterations: Some(1000),
            ..Pbkdf::default()
        };
        let image = imgcrypt_image(KEY_A, cheap);
        edit_header(image.path(), &["keyslots.0.kdf.iterations=100000000"]);
        let luks = LuksImage::read(image.as_file()).unwrap();
        let (error, derivations) = counting_key_derivations(|| {
            luks.unlock(&[candidate("a", KEY_A)], &Unlocking::quiet(&NON_ROOT_CAPS))
                .unwrap_err()
        });
        assert_eq!(derivations, 0);
        let Error::UnsupportedImage { message } = error else {
            panic!("{error:?}")
        };
        assert!(message.contains("token of keyslot 0"), "{message}");
        assert!(message.contains("100000000 iterations"), "{message}");
        assert!(message.contains("non-root callers"), "{message}");

        // LUKS1: the phdr's iteration field. 4294967295 iterations take about an hour here, so
        // returning at all shows it was not derived.
        let image = cryptsetup_image("luks1", KEY_A, 20, &[]);
        edit_header(image.path(), &["luks1.keyslot.0.iterations=4294967295"]);
        let luks = LuksImage::read(image.as_file()).unwrap();
        let started = Instant::now();
        let error = luks
            .unlock(&[candidate("a", KEY_A)], &Unlocking::quiet(&ROOT_CAPS))
            .unwrap_err();
        assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
        assert!(
            matches!(&error, Error::UnsupportedImage { message } if message.contains("4294967295 iterations")),
            "{error:?}"
        );
    }

    #[test]
    fn an_over_cap_keyslot_is_skipped_and_named_while_the_others_are_tried() {
        // Keyslot 0: key A, cheap. Keyslot 1: key B, then edited to 100 M iterations.
        let image = cryptsetup_image("luks2", KEY_A, 20, &[]);
        cryptsetup_add_key(image.path(), KEY_A, KEY_B);
        edit_header(image.path(), &["keyslots.1.kdf.iterations=100000000"]);
        let luks = LuksImage::read(image.as_file()).unwrap();
        let (volume_key, unlocked) = luks
            .unlock(&[candidate("a", KEY_A)], &Unlocking::quiet(&NON_ROOT_CAPS))
            .unwrap();
        assert_eq!(unlocked.keyslot, 0);
        assert_eq!(volume_key.as_bytes(), cryptsetup_volume_key(&image, KEY_A));
        let (error, derivations) = counting_key_derivations(|| {
            luks.unlock(&[candidate("b", KEY_B)], &Unlocking::quiet(&NON_ROOT_CAPS))
                .unwrap_err()
        });
        assert_eq!(derivations, 1, "only keyslot 0 is tried");
        let Error::UnsupportedImage { message } = error else {
            panic!("{error:?}")
        };
        assert!(
            message.contains("opens keyslot(s) 0 (1 key derivations"),
            "{message}"
        );
        assert!(message.contains("not tried: keyslot 1"), "{message}");
        // Root's caps are wider, but not that wide.
        assert!(luks.keyslot_refusal(1, &ROOT_CAPS).is_some());
        assert!(luks.keyslot_refusal(0, &NON_ROOT_CAPS).is_none());
    }

    #[test]
    fn a_cancelled_trial_stops_before_the_next_key_derivation() {
        let image = cryptsetup_image("luks2", KEY_A, 20, &[]);
        let luks = LuksImage::read(image.as_file()).unwrap();
        let asked = std::cell::Cell::new(0);
        // Cancelled right after the first derivation (the client hung up during it).
        let cancelled = || {
            asked.set(asked.get() + 1);
            asked.get() > 1
        };
        let how = Unlocking {
            caps: &ROOT_CAPS,
            notice: &|_| {},
            cancelled: &cancelled,
        };
        let (result, derivations) = counting_key_derivations(|| luks.unlock(&others(), &how));
        assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
        assert_eq!(derivations, 1);
    }
}
