//! An existing LUKS image's header, worked on as a daemon-owned copy.
//!
//! The image arrives as a passed descriptor; libcryptsetup wants a path, and the daemon never
//! opens a path on a client's behalf. So [`LuksImage::read`] checks the on-disk structures
//! itself, copies the header region (metadata and keyslot areas: bytes `0..header_end`, never
//! payload) with `pread` into a memfd as long as the image (sparse, so libcryptsetup sees the
//! true device size), and points libcryptsetup at `/proc/self/fd/N` of that memfd.
//!
//! Keyslot edits change only the copy. [`LuksImage::commit`] then writes the changed 4 KiB
//! blocks back to the image descriptor in an order that leaves an openable image after a crash
//! at any point, with an `fdatasync` between steps. LUKS2 regions:
//!
//! - primary header `[0, hdr_size)`, secondary header `[hdr_size, 2 hdr_size)`;
//! - keyslot areas `[2 hdr_size, header_end)`.
//!
//! Adding a key writes the keyslot areas first (new key material lands where the old header
//! records nothing), then the primary header, then the secondary. Until the primary is durable
//! the old headers rule and the old keys open the image; a torn primary fails its checksum and
//! libcryptsetup falls back to the intact secondary (the old one); once the primary is written
//! its higher sequence number wins. Removing a key writes the primary, then the secondary, and
//! only then wipes the keyslot area, so no header ever points to wiped material.
//!
//! LUKS1 has one header without checksum or copy: the phdr `[0, 4096)` and key material
//! `[4096, header_end)`. Add: material, then phdr; remove: phdr, then material. A keyslot's phdr
//! entry is 48 bytes, so a torn phdr write is not covered by a second copy as with LUKS2.
//!
//! [`super::crash`] lists the kill points the tests use to check each state.

use std::fs::File;
use std::os::unix::fs::FileExt;

use imgcrypt_proto::api::{ImageInfo, KeyslotInfo, LuksVersion, Pbkdf};
use libcryptsetup_rs::consts::flags::CryptVolumeKey;
use libcryptsetup_rs::consts::vals::{EncryptionFormat, KeyslotInfo as SlotStatus};
use libcryptsetup_rs::{CryptDevice, CryptInit, CryptKeyslotHandle, CryptParamsLuks2Ref, Either};
use serde_json::Value;

use super::cost::{self, HeaderFacts, KdfCaps};
use super::header::HeaderSpec;
use super::{clear_errors, crash, libcryptsetup_error, route_libcryptsetup_logs, token};
use crate::error::Descriptor;
use crate::keys::{strength, CandidateKey, SecretBytes};
use crate::sys::memfd;
use crate::sys::storage::{self, StorageKind};
use crate::{Error, Result};

/// Magic at byte 0 of a LUKS1 header and of a LUKS2 primary header.
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Magic of a LUKS2 secondary header.
const LUKS2_SECONDARY_MAGIC: &[u8; 6] = b"SKUL\xba\xbe";

/// LUKS2 binary header: the fixed part before the JSON area.
const LUKS2_BINARY_HEADER: u64 = 4096;
/// LUKS1 `phdr` (592 bytes) rounded up to the page we write it back in.
const LUKS1_PHDR_REGION: u64 = 4096;
/// Bytes of the LUKS1 `phdr` itself.
const LUKS1_PHDR_BYTES: usize = 592;
/// LUKS1 keyslot table: 8 entries of 48 bytes from byte 208.
const LUKS1_KEYSLOTS: usize = 8;
const LUKS1_KEYSLOT_TABLE: usize = 208;
const LUKS1_KEYSLOT_ENTRY: usize = 48;

/// The biggest header region we copy: LUKS2 allows 4 MiB per header copy and a 128 MiB keyslot
/// area; anything larger is not a header cryptsetup makes, and the copy is held in memory.
const MAX_HEADER_BYTES: u64 = 256 << 20;

/// Granularity of the write-back: changed bytes are written as whole aligned blocks of this size.
const WRITE_BLOCK: u64 = 4096;

/// The only data cipher the userspace engine decrypts.
const SUPPORTED_CIPHER: &str = "aes-xts-plain64";
const SUPPORTED_KEY_BITS: u32 = 512;

/// One active keyslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyslot {
    /// Keyslot number.
    pub keyslot: u32,
    /// Its key derivation, e.g. `argon2id (4 iterations, 32 KiB, 1 thread)`.
    pub pbkdf: String,
    /// Fingerprint from its `imgcrypt-key` token, if it has one.
    pub fingerprint: Option<String>,
}

/// Which kind of header edit [`LuksImage::commit`] writes back; it decides the write order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A keyslot was added.
    Added,
    /// A keyslot was removed.
    Removed,
}

/// An existing LUKS image's header, copied into a daemon-owned memfd.
#[derive(Debug)]
pub struct LuksImage {
    /// The copy libcryptsetup works on: `image_size` bytes, only `0..header_end` written.
    copy: File,
    /// The image's bytes `0..header_end` as they are on the image (after the last commit).
    original: Vec<u8>,
    /// End of the header region (metadata and keyslot areas); at most `data_offset`.
    header_end: u64,
    /// Size of one LUKS2 header copy (binary header and JSON area); LUKS1: the phdr page.
    hdr_size: u64,
    image_size: u64,
    data_offset: u64,
    version: LuksVersion,
    uuid: String,
    cipher: String,
    key_size_bits: u32,
    sector_size: u32,
    keyslots: Vec<Keyslot>,
    /// Keyslots bound to no data segment (`cryptsetup luksAddKey --unbound`): they hold some
    /// other key, never the volume key, so nothing unlocks or removes them.
    unbound: Vec<Keyslot>,
    /// Keyslot costs and segments of every header copy, read by us, not libcryptsetup.
    facts: HeaderFacts,
}

/// What the on-disk structures say, before libcryptsetup looks.
struct Layout {
    version: LuksVersion,
    hdr_size: u64,
    header_end: u64,
    data_offset: u64,
}

impl LuksImage {
    /// Reads the header of the LUKS image behind `image` (a regular file or block device open
    /// for reading; for [`Self::commit`] also for writing).
    pub fn read(image: &File) -> Result<Self> {
        let kind = storage::storage_kind(image)?;
        if let StorageKind::Other(what) = kind {
            return Err(Error::bad_descriptor(
                Descriptor::Image,
                format!("is {what}; pass the LUKS image as a regular file or a block device"),
            ));
        }
        let image_size = storage::size_of(image)?;
        let layout = parse_layout(image, image_size)?;

        let copy = memfd::create("imgcrypt-luks-image")?;
        copy.set_len(image_size)
            .map_err(|error| Error::io("sizing the in-memory copy of the LUKS header", error))?;
        let mut original = vec![0u8; layout.header_end as usize];
        read_image(image, &mut original, 0, "LUKS header region")?;
        copy.write_all_at(&original, 0)
            .map_err(|error| Error::io("copying the LUKS header into memory", error))?;

        let mut luks = LuksImage {
            copy,
            original,
            header_end: layout.header_end,
            hdr_size: layout.hdr_size,
            image_size,
            data_offset: layout.data_offset,
            version: layout.version,
            uuid: String::new(),
            cipher: String::new(),
            key_size_bits: 0,
            sector_size: 0,
            keyslots: Vec::new(),
            unbound: Vec::new(),
            facts: HeaderFacts::default(),
        };
        luks.refresh()?;
        Ok(luks)
    }

    /// LUKS1 or LUKS2.
    pub fn version(&self) -> LuksVersion {
        self.version
    }

    /// The header's UUID.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// Data cipher as cryptsetup names it, e.g. `aes-xts-plain64`.
    pub fn cipher(&self) -> &str {
        &self.cipher
    }

    /// Volume key size in bits.
    pub fn key_size_bits(&self) -> u32 {
        self.key_size_bits
    }

    /// Encryption sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// Byte offset of the encrypted payload.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Bytes of the whole image.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Encrypted payload bytes: a LUKS2 segment's fixed `size`, else (`dynamic`, LUKS1) the
    /// image size minus the data offset. [`Self::check_payload_supported`] refuses a fixed size
    /// the image cannot hold.
    pub fn payload_size(&self) -> u64 {
        let available = self.image_size - self.data_offset;
        match self.facts.segments.first().and_then(|segment| segment.size) {
            Some(size) => size.min(available),
            None => available,
        }
    }

    /// Why keyslot `keyslot` must not be derived under `caps` (see [`super::cost`]), or None.
    pub fn keyslot_refusal(&self, keyslot: u32, caps: &KdfCaps) -> Option<String> {
        self.facts.refusal(keyslot, caps)
    }

    /// The cost of `keyslot` as the primary header states it.
    pub fn keyslot_cost(&self, keyslot: u32) -> Option<&cost::KeyslotCost> {
        self.facts
            .keyslots
            .get(&keyslot)
            .and_then(|copies| copies.first())
    }

    /// Keyslots bound to no data segment.
    pub fn unbound_keyslots(&self) -> &[Keyslot] {
        &self.unbound
    }

    /// Active keyslots, by number.
    pub fn keyslots(&self) -> &[Keyslot] {
        &self.keyslots
    }

    /// The active keyslot whose `imgcrypt-key` token carries `fingerprint`.
    pub fn keyslot_of(&self, fingerprint: &str) -> Option<u32> {
        self.keyslots
            .iter()
            .find(|slot| slot.fingerprint.as_deref() == Some(fingerprint))
            .map(|slot| slot.keyslot)
    }

    /// Refuses images whose payload the userspace engine cannot decrypt: another cipher, or a
    /// LUKS2 data segment it would read wrongly (several segments, an IV tweak, integrity, a
    /// fixed size past the image's end). Only jobs that decrypt the payload call this; header
    /// edits work on any image libcryptsetup reads.
    pub fn check_payload_supported(&self) -> Result<()> {
        if self.cipher != SUPPORTED_CIPHER || self.key_size_bits != SUPPORTED_KEY_BITS {
            return Err(self.unsupported_cipher());
        }
        let refuse = |message: String| {
            Err(Error::UnsupportedImage {
                message: format!(
                    "{message}; imgcrypt does not decrypt such a payload: open this image with                      cryptsetup instead"
                ),
            })
        };
        let mut copies = self.facts.segments.iter();
        let Some(first) = copies.next() else {
            return Ok(()); // LUKS1: one implicit segment, no tweak, no size.
        };
        if copies.any(|other| other != first) {
            return refuse(
                "the LUKS2 header copies describe the data segment differently (a damaged or \
                 edited header?)"
                    .to_string(),
            );
        }
        if first.count != 1 {
            return refuse(format!(
                "the LUKS2 header has {} data segments (a `cryptsetup reencrypt` in progress?): \
                 finish it with `cryptsetup reencrypt --resume-only`",
                first.count
            ));
        }
        if first.kind != "crypt" {
            return refuse(format!(
                "LUKS2 segment 0 is of type {:?}, not crypt",
                first.kind
            ));
        }
        if first.integrity {
            return refuse("LUKS2 segment 0 uses authenticated encryption (integrity)".to_string());
        }
        if first.iv_tweak != 0 {
            return refuse(format!(
                "LUKS2 segment 0 has iv_tweak {} (its IVs start at sector {} instead of 0)",
                first.iv_tweak, first.iv_tweak
            ));
        }
        if let Some(size) = first.size {
            let available = self.image_size - self.data_offset;
            if size > available {
                return Err(Error::corrupt(
                    format!(
                        "truncated: LUKS2 segment 0 holds {size} bytes from byte {} but the \
                         image has only {available} after it; obtain a complete copy",
                        self.data_offset
                    ),
                    Some(self.image_size),
                ));
            }
            if size == 0 || size % u64::from(self.sector_size.max(512)) != 0 {
                return refuse(format!(
                    "LUKS2 segment 0 has a size of {size} bytes, not a positive whole number of \
                     {}-byte sectors",
                    self.sector_size
                ));
            }
        }
        Ok(())
    }

    fn unsupported_cipher(&self) -> Error {
        Error::UnsupportedImage {
            message: format!(
                "the LUKS image is encrypted with {} and a {}-bit key; imgcrypt decrypts only \
                 {SUPPORTED_CIPHER} with a {SUPPORTED_KEY_BITS}-bit key (what it and cryptsetup \
                 make by default): open this image with cryptsetup instead",
                self.cipher, self.key_size_bits
            ),
        }
    }

    /// The header as the protocol reports it; `keys` are matched by fingerprint, never tried.
    pub fn info(&self, keys: &[CandidateKey]) -> ImageInfo {
        ImageInfo {
            format: imgcrypt_proto::api::OutputFormat::Luks,
            luks_version: Some(self.version),
            virtual_size: None,
            allocated_bytes: None,
            vhd_key: None,
            uuid: self.uuid.clone(),
            cipher: self.cipher.clone(),
            key_size_bits: self.key_size_bits,
            sector_size: self.sector_size,
            data_offset: self.data_offset,
            payload_size: self.payload_size(),
            image_size: self.image_size,
            keyslots: self
                .keyslots
                .iter()
                .chain(&self.unbound)
                .map(|slot| KeyslotInfo {
                    keyslot: slot.keyslot,
                    pbkdf: slot.pbkdf.clone(),
                    fingerprint: slot.fingerprint.clone(),
                    matching_key: slot.fingerprint.as_ref().and_then(|fingerprint| {
                        keys.iter()
                            .find(|key| key.key.fingerprint == *fingerprint)
                            .map(|key| key.name.clone())
                    }),
                })
                .collect(),
        }
    }

    /// Adds a keyslot for `key` holding `volume_key` to the copy (LUKS2: with its
    /// `imgcrypt-key` token if the key looks generated); returns its number. Nothing reaches the image before
    /// [`Self::commit`] with [`Change::Added`].
    ///
    /// `pbkdf` follows the rules of new images ([`HeaderSpec`]): LUKS1 takes pbkdf2 only.
    pub fn add_keyslot(
        &mut self,
        volume_key: &SecretBytes,
        key: &CandidateKey,
        pbkdf: &Pbkdf,
    ) -> Result<u32> {
        self.add_keyslot_with(volume_key, key, pbkdf, &|| false)
            .map(|(keyslot, _)| keyslot)
    }

    /// [`Self::add_keyslot`], saying how the keyslot's iterations were benchmarked (None for
    /// fixed iterations). Like a new header's ([`super::header`]), a benchmarked keyslot gets
    /// explicit iterations from [`super::bench`]'s cache (measured now if none is fresh, and
    /// cached when `idle` says no other job runs) with libcryptsetup's no-benchmark flag.
    pub fn add_keyslot_with(
        &mut self,
        volume_key: &SecretBytes,
        key: &CandidateKey,
        pbkdf: &Pbkdf,
        idle: &dyn Fn() -> bool,
    ) -> Result<(u32, Option<super::header::Benchmark>)> {
        let spec = HeaderSpec {
            version: self.version,
            // Only the PBKDF part of the spec applies to a keyslot.
            sector_size: 512,
            pbkdf: pbkdf.clone(),
        };
        spec.validate()?;
        let is_luks2 = self.version == LuksVersion::Luks2;
        let added = self.open_device().and_then(|mut device| {
            let (_, benchmark) = super::header::fixed_settings(&mut device, &spec, idle, &|| {})?;
            let keyslot = device
                .keyslot_handle()
                .add_by_key(
                    None,
                    Some(Either::Left(volume_key.as_bytes())),
                    key.key.passphrase.as_bytes(),
                    CryptVolumeKey::empty(),
                )
                .map_err(|error| libcryptsetup_error("adding a keyslot", error))?;
            // A key that does not look generated gets no fingerprint: see keys::strength.
            if is_luks2 && strength::may_store_fingerprint(key.key.passphrase.as_bytes())? {
                token::add(&mut device, keyslot, &key.key.fingerprint)?;
            }
            Ok((keyslot, benchmark))
        });
        self.settle(added)
    }

    /// Removes `keyslot` and its `imgcrypt-key` tokens from the copy; returns the fingerprint
    /// its token carried. Nothing reaches the image before [`Self::commit`] with
    /// [`Change::Removed`]. The last active keyslot is never removed: the image would be lost.
    pub fn remove_keyslot(&mut self, keyslot: u32) -> Result<Option<String>> {
        let Some(slot) = self.keyslots.iter().find(|slot| slot.keyslot == keyslot) else {
            return Err(Error::InvalidOption {
                parameter: "keyslot",
                message: format!("keyslot {keyslot} is not an active keyslot of this image"),
            });
        };
        if self.keyslots.len() == 1 {
            return Err(Error::InvalidOption {
                parameter: "keyslot",
                message: format!(
                    "keyslot {keyslot} is the image's only active keyslot: removing it would \
                     make the image unopenable; add the new key first"
                ),
            });
        }
        let fingerprint = slot.fingerprint.clone();
        let is_luks2 = self.version == LuksVersion::Luks2;
        let removed = self.open_device().and_then(|mut device| {
            // Tokens first: destroying the keyslot would leave them bound to nothing.
            if is_luks2 {
                token::remove_for_keyslot(&mut device, keyslot)?;
            }
            device
                .keyslot_handle()
                .destroy(keyslot)
                .map_err(|error| libcryptsetup_error("removing a keyslot", error))
        });
        self.settle(removed)?;
        Ok(fingerprint)
    }

    /// Writes the copy's changes back to `image` in the crash-safe order for `change` (see the
    /// module documentation), syncing between steps. Writes only changed 4 KiB blocks, never
    /// past the header region.
    pub fn commit(&mut self, image: &File, change: Change) -> Result<()> {
        self.write_back(image, change, None)
    }

    /// [`Self::commit`], stopping right after crash point `stop_after` as a crash there would;
    /// the copy's changes are then not recorded as written.
    #[cfg(test)]
    pub(crate) fn commit_until(
        &mut self,
        image: &File,
        change: Change,
        stop_after: &str,
    ) -> Result<()> {
        self.write_back(image, change, Some(stop_after))
    }

    fn write_back(&mut self, image: &File, change: Change, stop_after: Option<&str>) -> Result<()> {
        // The diff is against what we read: if something else changed the header since, our
        // blocks could mix two edits into a header neither intended.
        let mut on_disk = vec![0u8; self.original.len()];
        read_image(image, &mut on_disk, 0, "LUKS header region")?;
        if on_disk != self.original {
            return Err(Error::Luks {
                operation: "writing the header back",
                message: "the image's header changed since it was read (another program edited                           it?): nothing was written; run the command again"
                    .to_string(),
            });
        }
        let mut current = vec![0u8; self.original.len()];
        self.copy
            .read_exact_at(&mut current, 0)
            .map_err(|error| Error::io("reading the in-memory LUKS header copy", error))?;
        let is_luks2 = self.version == LuksVersion::Luks2;
        let primary_end = self.hdr_size.min(self.header_end);
        let secondary_end = if is_luks2 {
            (2 * self.hdr_size).min(self.header_end)
        } else {
            primary_end
        };
        let changed = |start: u64, end: u64| changed_blocks(&self.original, &current, start, end);
        let primary = changed(0, primary_end);
        let secondary = changed(primary_end, secondary_end);
        let keyslots = changed(secondary_end, self.header_end);

        let writer = Writer {
            image,
            bytes: &current,
            stop_after,
        };
        let prefix = match change {
            Change::Added => "added",
            Change::Removed => "removed",
        };
        let steps_done = (|| -> Result<bool> {
            if change == Change::Added
                && writer.step(&keyslots, "keyslot areas", "added:keyslots")?
            {
                return Ok(false);
            }
            if is_luks2 {
                let (first, rest) = split_in_half(&primary);
                if writer.step(&first, "primary header", &format!("{prefix}:primary-torn"))? {
                    return Ok(false);
                }
                if writer.step(&rest, "primary header", &format!("{prefix}:primary"))? {
                    return Ok(false);
                }
                if writer.step(
                    &secondary,
                    "secondary header",
                    &format!("{prefix}:secondary"),
                )? {
                    return Ok(false);
                }
            } else if writer.step(&primary, "header", &format!("{prefix}:primary"))? {
                return Ok(false);
            }
            if change == Change::Removed
                && writer.step(&keyslots, "keyslot areas", "removed:keyslots")?
            {
                return Ok(false);
            }
            Ok(true)
        })()?;
        if steps_done {
            self.original = current;
        }
        Ok(())
    }

    /// Keeps the copy's edit if `result` is Ok and re-reads the header; otherwise puts the
    /// copy back as it was, so a failed edit never reaches a later commit.
    fn settle<T>(&mut self, result: Result<T>) -> Result<T> {
        match result {
            Ok(value) => {
                self.refresh()?;
                Ok(value)
            }
            Err(error) => {
                if let Err(restore) = self.copy.write_all_at(&self.original, 0) {
                    tracing::warn!("restoring the in-memory LUKS header copy failed: {restore}");
                }
                Err(error)
            }
        }
    }

    /// A libcryptsetup context on the copy, header loaded.
    pub(crate) fn open_device(&self) -> Result<CryptDevice> {
        route_libcryptsetup_logs();
        clear_errors();
        let mut device = CryptInit::init(&memfd::proc_path(&self.copy))
            .map_err(|error| libcryptsetup_error("opening the in-memory header copy", error))?;
        // Metadata locking stays on: for a regular file such as this memfd libcryptsetup takes
        // an flock on the file itself, not a lock file under the root-only /run/cryptsetup, so
        // it works unprivileged (tested with setpriv as nobody). Turning it off would be
        // process-wide and irreversible (crypt_metadata_locking ignores its device argument).
        let format = match self.version {
            LuksVersion::Luks1 => EncryptionFormat::Luks1,
            LuksVersion::Luks2 => EncryptionFormat::Luks2,
        };
        device
            .context_handle()
            .load::<CryptParamsLuks2Ref<'_>>(Some(format), None)
            .map_err(|error| libcryptsetup_error("loading the header", error))?;
        Ok(device)
    }

    /// Reads what the header says through libcryptsetup, and checks it against our parse.
    fn refresh(&mut self) -> Result<()> {
        let mut device = self.open_device()?;
        let mut status = device.status_handle();
        let data_offset = status.get_data_offset().saturating_mul(512);
        if data_offset != self.data_offset {
            return Err(Error::corrupt(
                format!(
                    "the LUKS header's data offset reads as {} bytes but libcryptsetup, which \
                     also checks the secondary header, says {data_offset}: the header is \
                     damaged; check it with `cryptsetup luksDump` and `cryptsetup repair`",
                    self.data_offset
                ),
                Some(0),
            ));
        }
        let uuid = status
            .get_uuid()
            .map_err(|error| libcryptsetup_error("reading the UUID", error))?
            .to_string();
        let cipher = super::cipher_spec(&mut status)?;
        let key_size_bits = u32::try_from(status.get_volume_key_size())
            .unwrap_or(0)
            .saturating_mul(8);
        let sector_size =
            u32::try_from(libcryptsetup_rs::get_sector_size(Some(&mut device))).unwrap_or(0);

        let format = match self.version {
            LuksVersion::Luks1 => EncryptionFormat::Luks1,
            LuksVersion::Luks2 => EncryptionFormat::Luks2,
        };
        let max_keyslots = CryptKeyslotHandle::max_keyslots(format)
            .map_err(|error| libcryptsetup_error("reading the keyslot count", error))?;
        let facts = cost::read_facts(&self.copy, self.version, self.image_size)?;
        let tokens = token::list(&mut device, self.version == LuksVersion::Luks2);
        let mut keyslots = Vec::new();
        let mut unbound = Vec::new();
        for keyslot in 0..max_keyslots {
            // The KDF text comes from our own parse: libcryptsetup-rs cannot convert every
            // keyslot's PBKDF (argon2i failed with "Failed to perform the specified
            // conversion"), and the cost checks use the same parse.
            let pbkdf = || {
                facts
                    .describe(keyslot)
                    .unwrap_or_else(|| "unknown key derivation".to_string())
            };
            match device.keyslot_handle().status(keyslot) {
                Ok(SlotStatus::Active | SlotStatus::ActiveLast) => keyslots.push(Keyslot {
                    keyslot,
                    pbkdf: pbkdf(),
                    fingerprint: tokens.get(&keyslot).cloned(),
                }),
                Ok(SlotStatus::Unbound) => unbound.push(Keyslot {
                    keyslot,
                    pbkdf: format!(
                        "{}; unbound: bound to no data segment, it holds no key to this image",
                        pbkdf()
                    ),
                    fingerprint: tokens.get(&keyslot).cloned(),
                }),
                _ => {}
            }
        }
        self.facts = facts;
        self.unbound = unbound;
        self.uuid = uuid;
        self.cipher = cipher;
        self.key_size_bits = key_size_bits;
        self.sector_size = sector_size;
        self.keyslots = keyslots;
        Ok(())
    }
}

/// Writes steps of the write-back and fires their crash points.
struct Writer<'a> {
    image: &'a File,
    bytes: &'a [u8],
    stop_after: Option<&'a str>,
}

impl Writer<'_> {
    /// Writes `ranges`, syncs, fires crash point `point`; true when the caller must stop there.
    fn step(&self, ranges: &[(u64, u64)], what: &str, point: &str) -> Result<bool> {
        for &(start, end) in ranges {
            self.image
                .write_all_at(&self.bytes[start as usize..end as usize], start)
                .map_err(|error| {
                    if error.raw_os_error() == Some(libc::EBADF) {
                        Error::bad_descriptor(
                            Descriptor::Image,
                            "is not open for writing: open the image read-write to change its keys",
                        )
                    } else {
                        Error::io(
                            format!(
                                "writing the LUKS {what} back to the image (bytes {start}..{end})"
                            ),
                            error,
                        )
                    }
                })?;
        }
        if !ranges.is_empty() {
            self.image.sync_data().map_err(|error| {
                Error::io(
                    format!("syncing the LUKS {what} to the image (fdatasync)"),
                    error,
                )
            })?;
        }
        crash::point(point);
        Ok(self.stop_after == Some(point))
    }
}

/// `(start, end)` byte ranges of the header region.
type ByteRanges = Vec<(u64, u64)>;

/// Aligned [`WRITE_BLOCK`]s of `start..end` where `old` and `new` differ, joined into ranges.
fn changed_blocks(old: &[u8], new: &[u8], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut block = start;
    while block < end {
        let block_end = (block - block % WRITE_BLOCK + WRITE_BLOCK).min(end);
        let (from, to) = (block as usize, block_end as usize);
        if old[from..to] != new[from..to] {
            match ranges.last_mut() {
                Some(last) if last.1 == block => last.1 = block_end,
                _ => ranges.push((block, block_end)),
            }
        }
        block = block_end;
    }
    ranges
}

/// `ranges` cut where half of their bytes lie before (the torn-write crash point's half).
fn split_in_half(ranges: &[(u64, u64)]) -> (ByteRanges, ByteRanges) {
    let total: u64 = ranges.iter().map(|(start, end)| end - start).sum();
    let mut left = total / 2;
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    for &(start, end) in ranges {
        let take = left.min(end - start);
        if take > 0 {
            first.push((start, start + take));
        }
        if start + take < end {
            rest.push((start + take, end));
        }
        left -= take;
    }
    (first, rest)
}

/// `pread`s `buffer.len()` bytes at `offset`; the image ending early is a truncated image.
pub(crate) fn read_image(file: &File, buffer: &mut [u8], offset: u64, what: &str) -> Result<()> {
    file.read_exact_at(buffer, offset)
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::corrupt(
                format!(
                    "truncated: the LUKS image ends inside the {} bytes of its {what} at offset \
                 {offset}; the image was cut short (an interrupted copy?): obtain a complete copy",
                    buffer.len()
                ),
                Some(offset),
            ),
            _ if error.raw_os_error() == Some(libc::EBADF) => Error::bad_descriptor(
                Descriptor::Image,
                "is not open for reading: open the LUKS image for reading",
            ),
            _ => Error::io(
                format!(
                    "reading {} bytes of the LUKS {what} at offset {offset}",
                    buffer.len()
                ),
                error,
            ),
        })
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn not_luks(what: impl std::fmt::Display) -> Error {
    Error::UnsupportedImage {
        message: format!(
            "not a LUKS image (no LUKS magic at offset 0): {what}; pass an image made by \
             `imgctl encrypt` or `cryptsetup luksFormat`"
        ),
    }
}

/// Reads the magic and the header's own sizes, and decides how much is header.
fn parse_layout(image: &File, image_size: u64) -> Result<Layout> {
    let mut start = [0u8; 8];
    if image_size < start.len() as u64 {
        return Err(not_luks(format_args!(
            "the image is only {image_size} bytes"
        )));
    }
    read_image(image, &mut start, 0, "header magic")?;
    if &start[..6] == LUKS2_SECONDARY_MAGIC {
        return Err(Error::UnsupportedImage {
            message: "starts with a LUKS2 secondary header, not a primary one: this is not the \
                      start of a LUKS image (a partition or image cut at the wrong offset?)"
                .to_string(),
        });
    }
    if &start[..6] != LUKS_MAGIC {
        return Err(not_luks(format_args!(
            "it starts with bytes {:02x?}",
            &start[..6]
        )));
    }
    let (version, hdr_size, metadata_end, data_offset) = match be_u16(&start, 6) {
        1 => luks1_layout(image)?,
        2 => luks2_layout(image, image_size)?,
        other => {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "LUKS version {other} is not supported: only LUKS1 and LUKS2 exist"
                ),
            })
        }
    };
    if data_offset == 0 {
        return Err(Error::UnsupportedImage {
            message: "the LUKS header's data offset is 0: it is a detached header (cryptsetup \
                      --header), whose data lives elsewhere; pass a LUKS image with the data \
                      after its header"
                .to_string(),
        });
    }
    if data_offset > image_size {
        return Err(Error::corrupt(
            format!(
                "truncated: the LUKS header puts the data at byte {data_offset} but the image \
                 is only {image_size} bytes; obtain a complete copy"
            ),
            Some(image_size),
        ));
    }
    if metadata_end > data_offset {
        return Err(Error::corrupt(
            format!(
                "the LUKS metadata and keyslots end at byte {metadata_end}, past the data \
                 offset {data_offset}"
            ),
            Some(0),
        ));
    }
    Ok(Layout {
        version,
        hdr_size,
        header_end: metadata_end,
        data_offset,
    })
}

/// LUKS1: (version, phdr region, end of key material, data offset).
fn luks1_layout(image: &File) -> Result<(LuksVersion, u64, u64, u64)> {
    let mut phdr = [0u8; LUKS1_PHDR_BYTES];
    read_image(image, &mut phdr, 0, "LUKS1 header")?;
    let data_offset = u64::from(be_u32(&phdr, 104)) * 512;
    let key_bytes = u64::from(be_u32(&phdr, 108));
    let mut material_end = LUKS1_PHDR_REGION;
    for slot in 0..LUKS1_KEYSLOTS {
        let entry = LUKS1_KEYSLOT_TABLE + slot * LUKS1_KEYSLOT_ENTRY;
        let offset = u64::from(be_u32(&phdr, entry + 40)) * 512;
        let stripes = u64::from(be_u32(&phdr, entry + 44));
        let end = key_bytes
            .checked_mul(stripes)
            .and_then(|bytes| bytes.checked_next_multiple_of(512))
            .and_then(|bytes| bytes.checked_add(offset))
            .filter(|&end| end <= MAX_HEADER_BYTES)
            .ok_or_else(|| {
                Error::corrupt(
                    format!(
                        "LUKS1 keyslot {slot} claims key material at sector {} with {stripes} \
                         stripes of {key_bytes} bytes, beyond any real header",
                        offset / 512
                    ),
                    Some(entry as u64),
                )
            })?;
        material_end = material_end.max(end);
    }
    let material_end = material_end
        .next_multiple_of(WRITE_BLOCK)
        .min(data_offset.max(LUKS1_PHDR_BYTES as u64));
    Ok((
        LuksVersion::Luks1,
        LUKS1_PHDR_REGION,
        material_end,
        data_offset,
    ))
}

/// LUKS2: (version, header copy size, end of keyslot areas, data offset), from the primary
/// binary header and its JSON.
fn luks2_layout(image: &File, image_size: u64) -> Result<(LuksVersion, u64, u64, u64)> {
    let mut binary = [0u8; 16];
    read_image(image, &mut binary, 0, "LUKS2 binary header")?;
    let hdr_size = be_u64(&binary, 8);
    // The sizes LUKS2 defines: 16 KiB to 4 MiB, powers of two.
    if !(16 << 10..=4 << 20).contains(&hdr_size) || !hdr_size.is_power_of_two() {
        return Err(Error::corrupt(
            format!(
                "the LUKS2 primary header claims a size of {hdr_size} bytes; LUKS2 headers are \
                 16 KiB to 4 MiB: the primary header is damaged (`cryptsetup repair` may restore \
                 it from the secondary)"
            ),
            Some(8),
        ));
    }
    if 2 * hdr_size > image_size {
        return Err(Error::corrupt(
            format!(
                "truncated: the image ({image_size} bytes) cannot hold the two {hdr_size}-byte \
                 LUKS2 header copies"
            ),
            Some(image_size),
        ));
    }
    let mut json_area = vec![0u8; (hdr_size - LUKS2_BINARY_HEADER) as usize];
    read_image(
        image,
        &mut json_area,
        LUKS2_BINARY_HEADER,
        "LUKS2 JSON area",
    )?;
    let json_end = json_area
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(json_area.len());
    let bad_json = |problem: String| {
        Error::corrupt(
            format!(
                "the LUKS2 primary header's JSON metadata {problem}: the header is damaged; \
                 check it with `cryptsetup luksDump`"
            ),
            Some(LUKS2_BINARY_HEADER),
        )
    };
    let metadata: Value = serde_json::from_slice(&json_area[..json_end])
        .map_err(|error| bad_json(format!("is not valid JSON ({error})")))?;
    let number = |value: Option<&Value>, name: &str| -> Result<u64> {
        value
            .and_then(Value::as_str)
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| bad_json(format!("has no valid {name}")))
    };
    let segment = metadata
        .get("segments")
        .and_then(|segments| segments.get("0"))
        .ok_or_else(|| bad_json("has no data segment 0".to_string()))?;
    let data_offset = number(segment.get("offset"), "segments.0.offset")?;
    let keyslots_size = number(
        metadata
            .get("config")
            .and_then(|config| config.get("keyslots_size")),
        "config.keyslots_size",
    )?;
    let metadata_end = keyslots_size
        .checked_add(2 * hdr_size)
        .filter(|&end| end <= MAX_HEADER_BYTES)
        .ok_or_else(|| {
            bad_json(format!(
                "claims {keyslots_size} bytes of keyslot area, more than LUKS2 allows"
            ))
        })?;
    Ok((LuksVersion::Luks2, hdr_size, metadata_end, data_offset))
}

/// Helpers for tests that work on real LUKS images made by the cryptsetup CLI.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::Write;
    use std::path::Path;
    use std::process::Command;
    use std::sync::{Arc, Mutex};

    use tempfile::NamedTempFile;

    use crate::keys::{CandidateKey, KeyFile, SecretBytes};

    /// A candidate key named `name` whose key file holds `bytes`.
    pub fn candidate(name: &str, bytes: &[u8]) -> CandidateKey {
        let mut passphrase = SecretBytes::zeroed(bytes.len()).unwrap();
        passphrase.as_mut_bytes().copy_from_slice(bytes);
        CandidateKey {
            name: name.to_string(),
            key: KeyFile {
                fingerprint: imgcrypt_proto::keyfile::fingerprint(bytes),
                passphrase,
                warnings: Vec::new(),
            },
        }
    }

    /// A key file holding `bytes`, for the cryptsetup CLI.
    pub fn key_file(bytes: &[u8]) -> NamedTempFile {
        let mut file = NamedTempFile::new_in("/tmp").unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    /// Runs cryptsetup; panics with its output when it fails.
    pub fn cryptsetup(args: &[&str], path: &Path) -> String {
        let output = Command::new("cryptsetup")
            .args(args)
            .arg(path)
            .output()
            .unwrap();
        assert!(output.status.success(), "cryptsetup {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    /// A `size_mib` MiB image formatted by `cryptsetup luksFormat` with the key `key`, cheap
    /// pbkdf2, `--type luks1|luks2` and `extra` arguments; the payload holds a pattern.
    pub fn cryptsetup_image(
        kind: &str,
        key: &[u8],
        size_mib: u64,
        extra: &[&str],
    ) -> NamedTempFile {
        let image = NamedTempFile::new_in("/tmp").unwrap();
        image.as_file().set_len(size_mib << 20).unwrap();
        let key = key_file(key);
        let mut args = vec![
            "luksFormat",
            "--batch-mode",
            "--type",
            kind,
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            key.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cryptsetup(&args, image.path());
        image
    }

    /// `cryptsetup luksAddKey` with cheap pbkdf2: a keyslot for `new` on the image at `path`,
    /// opened with `old`.
    pub fn cryptsetup_add_key(path: &Path, old: &[u8], new: &[u8]) {
        let (old, new) = (key_file(old), key_file(new));
        cryptsetup(
            &[
                "luksAddKey",
                "--batch-mode",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
                old.path().to_str().unwrap(),
                path.to_str().unwrap(),
            ],
            new.path(),
        );
    }

    /// Whether `cryptsetup open --test-passphrase` accepts `key` for the image at `path`.
    pub fn opens(path: &Path, key: &[u8]) -> bool {
        let key = key_file(key);
        Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(key.path())
            .arg(path)
            .output()
            .unwrap()
            .status
            .success()
    }

    /// What the image's `cryptsetup luksDump --dump-json-metadata` says (LUKS2).
    pub fn json_metadata(path: &Path) -> serde_json::Value {
        serde_json::from_str(&cryptsetup(&["luksDump", "--dump-json-metadata"], path)).unwrap()
    }

    /// A byte copy of `image` in a new temporary file.
    pub fn duplicate(image: &NamedTempFile) -> NamedTempFile {
        let copy = NamedTempFile::new_in("/tmp").unwrap();
        std::fs::copy(image.path(), copy.path()).unwrap();
        copy
    }

    /// Edits the LUKS header of `path` with `tests/support/luks_edit.py` (fields of the LUKS2
    /// JSON in both copies, checksums fixed; or LUKS1 phdr fields), as a hostile user would.
    pub fn edit_header(path: &Path, assignments: &[&str]) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/support/luks_edit.py");
        let output = Command::new("python3")
            .arg(script)
            .arg(path)
            .args(assignments)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "luks_edit {assignments:?}: {output:?}"
        );
    }

    /// Runs `body` with libcryptsetup's debug log captured (this thread only); returns the
    /// result and how many key derivations libcryptsetup ran for LUKS2 keyslots.
    pub fn counting_key_derivations<T>(body: impl FnOnce() -> T) -> (T, usize) {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let result = tracing::subscriber::with_default(subscriber, body);
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let runs = log.matches("Running keyslot key derivation").count();
        (result, runs)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::luks::cost::ROOT_CAPS;
    use crate::luks::unlock::Unlocking;
    use imgcrypt_proto::api::PbkdfKind;
    use std::io::Write;
    use std::process::Command;

    /// Generated keys (`imgctl key generate`), so headers carry their `imgcrypt-key` tokens.
    const KEY_A: &[u8] = b"8KiOclVIE2tldMbFc5uayeoiL2V/1P0aKhiNNyZZujE=";
    const KEY_B: &[u8] = b"IvVY4Ngoxq5KPUjj/b60K8B5xohGgq6TNVN+2ISVQCk=";

    fn cheap_pbkdf() -> Pbkdf {
        Pbkdf {
            kind: Some(PbkdfKind::Pbkdf2),
            iterations: Some(1000),
            ..Pbkdf::default()
        }
    }

    fn error_of(bytes: &[u8]) -> Error {
        let mut file = tempfile::tempfile_in("/tmp").unwrap();
        file.write_all(bytes).unwrap();
        LuksImage::read(&file).unwrap_err()
    }

    /// Writes a pattern into the payload and returns the payload's bytes.
    fn fill_payload(image: &File, data_offset: u64) -> Vec<u8> {
        let size = image.metadata().unwrap().len();
        let payload: Vec<u8> = (0..size - data_offset)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        image.write_all_at(&payload, data_offset).unwrap();
        payload
    }

    fn payload_of(image: &File, data_offset: u64) -> Vec<u8> {
        let size = image.metadata().unwrap().len();
        let mut payload = vec![0; (size - data_offset) as usize];
        image.read_exact_at(&mut payload, data_offset).unwrap();
        payload
    }

    #[test]
    fn reads_what_luksdump_shows() {
        for (kind, extra) in [
            ("luks1", &[][..]),
            ("luks2", &[][..]),
            ("luks2", &["--sector-size", "4096"][..]),
        ] {
            let image = cryptsetup_image(kind, KEY_A, 20, extra);
            let luks = LuksImage::read(image.as_file()).unwrap();
            let uuid = cryptsetup(&["luksUUID"], image.path());
            assert_eq!(luks.uuid(), uuid.trim(), "{kind} {extra:?}");
            assert_eq!(luks.cipher(), "aes-xts-plain64");
            assert_eq!(luks.key_size_bits(), 512);
            assert_eq!(luks.image_size(), 20 << 20);
            luks.check_payload_supported().unwrap();
            assert_eq!(luks.keyslots().len(), 1);
            assert_eq!(luks.keyslots()[0].keyslot, 0);
            assert_eq!(luks.keyslots()[0].fingerprint, None);
            assert!(luks.keyslots()[0]
                .pbkdf
                .starts_with("pbkdf2-sha256 (1000 iterations"));
            if kind == "luks1" {
                assert_eq!(luks.version(), LuksVersion::Luks1);
                let dump = cryptsetup(&["luksDump"], image.path());
                let sectors: u64 = dump
                    .lines()
                    .find_map(|line| line.strip_prefix("Payload offset:"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                assert_eq!(luks.data_offset(), sectors * 512);
                assert_eq!(luks.sector_size(), 512);
            } else {
                assert_eq!(luks.version(), LuksVersion::Luks2);
                let json = json_metadata(image.path());
                let segment = &json["segments"]["0"];
                let offset: u64 = segment["offset"].as_str().unwrap().parse().unwrap();
                assert_eq!(luks.data_offset(), offset);
                assert_eq!(
                    u64::from(luks.sector_size()),
                    segment["sector_size"].as_u64().unwrap()
                );
            }
            assert_eq!(luks.payload_size(), (20 << 20) - luks.data_offset());
            let info = luks.info(&[]);
            assert_eq!(info.data_offset, luks.data_offset());
            assert_eq!(info.keyslots.len(), 1);
        }
    }

    #[test]
    fn refuses_what_is_not_a_luks_image() {
        for bytes in [
            &[][..],
            b"LUK",
            &[0u8; 8192],
            b"QFI\xfb\0\0\0\x03 a qcow2 image",
        ] {
            match error_of(bytes) {
                Error::UnsupportedImage { message } => assert!(
                    message.starts_with("not a LUKS image (no LUKS magic at offset 0): "),
                    "{message}"
                ),
                other => panic!("{other:?}"),
            }
        }
        match error_of(b"SKUL\xba\xbe\0\x02rest") {
            Error::UnsupportedImage { message } => {
                assert!(message.contains("secondary header"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        match error_of(b"LUKS\xba\xbe\0\x03") {
            Error::UnsupportedImage { message } => {
                assert!(message.contains("version 3"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_and_garbage_headers_are_errors_not_panics() {
        let image = cryptsetup_image("luks2", KEY_A, 20, &[]);
        let bytes = std::fs::read(image.path()).unwrap();
        let data_offset = LuksImage::read(image.as_file()).unwrap().data_offset();
        for (cut, offset) in [(8, None), (4096 + 100, None), (1 << 20, Some(1 << 20))] {
            match error_of(&bytes[..cut]) {
                Error::CorruptImage {
                    message,
                    offset: at,
                } => {
                    assert!(message.contains("truncated"), "{cut}: {message}");
                    if offset.is_some() {
                        assert_eq!(at, offset);
                    }
                }
                other => panic!("{cut}: {other:?}"),
            }
        }
        // Exactly the header, no payload: valid, with an empty payload.
        let mut header_only = tempfile::tempfile_in("/tmp").unwrap();
        header_only
            .write_all(&bytes[..data_offset as usize])
            .unwrap();
        assert_eq!(LuksImage::read(&header_only).unwrap().payload_size(), 0);

        let mut damaged = bytes[..64 << 10].to_vec();
        damaged[4096..4100].copy_from_slice(b"{{{{");
        assert!(matches!(
            error_of(&damaged),
            Error::CorruptImage {
                offset: Some(4096),
                ..
            }
        ));
        damaged[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            error_of(&damaged),
            Error::CorruptImage {
                offset: Some(8),
                ..
            }
        ));

        // Random bytes behind both magics: any error, never a panic or a huge allocation.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for round in 0..200 {
            let mut garbage = vec![0u8; 8192];
            for byte in garbage.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            garbage[..6].copy_from_slice(LUKS_MAGIC);
            garbage[6..8].copy_from_slice(&[0, 1 + (round % 2) as u8]);
            if round % 4 == 1 {
                garbage[8..16].copy_from_slice(&(16u64 << 10).to_be_bytes());
            }
            let error = error_of(&garbage);
            assert!(
                matches!(
                    error,
                    Error::CorruptImage { .. }
                        | Error::UnsupportedImage { .. }
                        | Error::Luks { .. }
                ),
                "{error:?}"
            );
        }
    }

    #[test]
    fn a_detached_header_is_refused() {
        let data = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        data.as_file().set_len(8 << 20).unwrap();
        let header = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        header.as_file().set_len(16 << 20).unwrap();
        let key = key_file(KEY_A);
        cryptsetup(
            &[
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
                key.path().to_str().unwrap(),
                "--header",
                header.path().to_str().unwrap(),
            ],
            data.path(),
        );
        match LuksImage::read(header.as_file()).unwrap_err() {
            Error::UnsupportedImage { message } => {
                assert!(message.contains("detached"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// An image with key A in keyslot 0 (plain cryptsetup) and a payload pattern; its volume
    /// key through a trial unlock.
    fn image_with_key_a(kind: &str) -> (tempfile::NamedTempFile, Vec<u8>) {
        let image = cryptsetup_image(kind, KEY_A, 8, &[]);
        let data_offset = LuksImage::read(image.as_file()).unwrap().data_offset();
        let payload = fill_payload(image.as_file(), data_offset);
        (image, payload)
    }

    fn add_key_b(luks: &mut LuksImage) -> u32 {
        let (volume_key, _) = luks
            .unlock(
                &[candidate("encryption_key", KEY_A)],
                &Unlocking::quiet(&ROOT_CAPS),
            )
            .unwrap();
        luks.add_keyslot(&volume_key, &candidate("new", KEY_B), &cheap_pbkdf())
            .unwrap()
    }

    #[test]
    fn added_and_removed_keyslots_reach_the_image() {
        for kind in ["luks2", "luks1"] {
            let (image, payload) = image_with_key_a(kind);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(image.path())
                .unwrap();
            let mut luks = LuksImage::read(&file).unwrap();
            let data_offset = luks.data_offset();
            let keyslot = add_key_b(&mut luks);
            assert_eq!(keyslot, 1);
            // Nothing reaches the image before the commit.
            assert!(!opens(image.path(), KEY_B), "{kind}");
            luks.commit(&file, Change::Added).unwrap();
            assert!(opens(image.path(), KEY_A), "{kind}");
            assert!(opens(image.path(), KEY_B), "{kind}");
            assert_eq!(payload_of(&file, data_offset), payload, "{kind}");

            let reread = LuksImage::read(&file).unwrap();
            let fingerprint_b = imgcrypt_proto::keyfile::fingerprint(KEY_B);
            if kind == "luks2" {
                assert_eq!(reread.keyslot_of(&fingerprint_b), Some(1));
                let json = json_metadata(image.path());
                let tokens: Vec<&serde_json::Value> =
                    json["tokens"].as_object().unwrap().values().collect();
                assert_eq!(tokens.len(), 1, "{json}");
                assert_eq!(tokens[0]["type"], "imgcrypt-key");
                assert_eq!(tokens[0]["keyslots"], serde_json::json!(["1"]));
                assert_eq!(tokens[0]["key_sha256"], fingerprint_b.as_str());
                let info = reread.info(&[candidate("decryption_key1", KEY_B)]);
                assert_eq!(
                    info.keyslots[1].matching_key.as_deref(),
                    Some("decryption_key1")
                );
                assert_eq!(info.keyslots[0].matching_key, None);
            } else {
                assert_eq!(
                    reread.keyslot_of(&fingerprint_b),
                    None,
                    "LUKS1 has no tokens"
                );
            }
            assert_eq!(reread.keyslots().len(), 2);

            assert_eq!(luks.remove_keyslot(0).unwrap(), None);
            luks.commit(&file, Change::Removed).unwrap();
            assert!(!opens(image.path(), KEY_A), "{kind}");
            assert!(opens(image.path(), KEY_B), "{kind}");
            assert_eq!(payload_of(&file, data_offset), payload, "{kind}");

            // Removing B's keyslot returns its fingerprint, but never the last keyslot.
            let error = luks.remove_keyslot(1).unwrap_err();
            assert!(matches!(error, Error::InvalidOption { .. }), "{error:?}");
            assert!(luks.remove_keyslot(5).is_err());
        }
    }

    #[test]
    fn removing_a_keyslot_drops_its_token() {
        let (image, _) = image_with_key_a("luks2");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image.path())
            .unwrap();
        let mut luks = LuksImage::read(&file).unwrap();
        add_key_b(&mut luks);
        luks.commit(&file, Change::Added).unwrap();
        assert_eq!(
            luks.remove_keyslot(1).unwrap(),
            Some(imgcrypt_proto::keyfile::fingerprint(KEY_B))
        );
        luks.commit(&file, Change::Removed).unwrap();
        let json = json_metadata(image.path());
        assert!(json["tokens"].as_object().unwrap().is_empty(), "{json}");
        assert!(opens(image.path(), KEY_A));
        assert!(!opens(image.path(), KEY_B));
    }

    #[test]
    fn a_header_changed_behind_our_back_is_not_overwritten() {
        let (image, _) = image_with_key_a("luks2");
        let file = read_write(&image);
        let mut luks = LuksImage::read(&file).unwrap();
        add_key_b(&mut luks);
        // Someone else adds a keyslot meanwhile.
        cryptsetup_add_key(image.path(), KEY_A, b"third-key");
        let error = luks.commit(&file, Change::Added).unwrap_err();
        assert!(matches!(error, Error::Luks { .. }), "{error:?}");
        assert!(opens(image.path(), b"third-key"));
        assert!(!opens(image.path(), KEY_B));
    }

    #[test]
    fn an_image_opened_read_only_cannot_be_committed() {
        let (image, _) = image_with_key_a("luks2");
        let read_only = File::open(image.path()).unwrap();
        let mut luks = LuksImage::read(&read_only).unwrap();
        add_key_b(&mut luks);
        let error = luks.commit(&read_only, Change::Added).unwrap_err();
        assert!(
            matches!(
                error,
                Error::BadDescriptor {
                    descriptor: Descriptor::Image,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(!opens(image.path(), KEY_B));
    }

    /// Expected (A opens, B opens) after a crash at each point.
    const ADDED_LUKS2: [(&str, bool, bool); 4] = [
        ("added:keyslots", true, false),
        ("added:primary-torn", true, false),
        ("added:primary", true, true),
        ("added:secondary", true, true),
    ];
    const REMOVED_LUKS2: [(&str, bool, bool); 4] = [
        ("removed:primary-torn", true, true),
        ("removed:primary", false, true),
        ("removed:secondary", false, true),
        ("removed:keyslots", false, true),
    ];
    const ADDED_LUKS1: [(&str, bool, bool); 2] = [
        ("added:keyslots", true, false),
        ("added:primary", true, true),
    ];
    const REMOVED_LUKS1: [(&str, bool, bool); 2] = [
        ("removed:primary", false, true),
        ("removed:keyslots", false, true),
    ];

    fn read_write(image: &tempfile::NamedTempFile) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image.path())
            .unwrap()
    }

    #[test]
    fn every_crash_point_leaves_an_image_that_opens() {
        for (kind, added, removed) in [
            ("luks2", &ADDED_LUKS2[..], &REMOVED_LUKS2[..]),
            ("luks1", &ADDED_LUKS1[..], &REMOVED_LUKS1[..]),
        ] {
            let (pristine, payload) = image_with_key_a(kind);
            for &(point, a_opens, b_opens) in added {
                let image = duplicate(&pristine);
                let file = read_write(&image);
                let mut luks = LuksImage::read(&file).unwrap();
                add_key_b(&mut luks);
                luks.commit_until(&file, Change::Added, point).unwrap();
                assert_eq!(opens(image.path(), KEY_A), a_opens, "{kind} {point}: A");
                assert_eq!(opens(image.path(), KEY_B), b_opens, "{kind} {point}: B");
                assert_eq!(payload_of(&file, luks.data_offset()), payload);
            }

            let both = duplicate(&pristine);
            let file = read_write(&both);
            let mut luks = LuksImage::read(&file).unwrap();
            add_key_b(&mut luks);
            luks.commit(&file, Change::Added).unwrap();
            for &(point, a_opens, b_opens) in removed {
                let image = duplicate(&both);
                let file = read_write(&image);
                let mut luks = LuksImage::read(&file).unwrap();
                luks.remove_keyslot(0).unwrap();
                luks.commit_until(&file, Change::Removed, point).unwrap();
                assert_eq!(opens(image.path(), KEY_A), a_opens, "{kind} {point}: A");
                assert_eq!(opens(image.path(), KEY_B), b_opens, "{kind} {point}: B");
                assert_eq!(payload_of(&file, luks.data_offset()), payload);
            }
        }
    }

    /// Set for the child process of `the_crash_hook_kills_the_process`: the image path.
    const CHILD_IMAGE: &str = "IMGCRYPT_TEST_CRASH_IMAGE";

    #[test]
    #[ignore = "runs only inside the_crash_hook_kills_the_process's child process"]
    fn crash_hook_child() {
        let path = std::env::var(CHILD_IMAGE).expect("run the_crash_hook_kills_the_process");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut luks = LuksImage::read(&file).unwrap();
        add_key_b(&mut luks);
        luks.commit(&file, Change::Added).unwrap();
        // Reaching this line means the hook did not fire.
        println!("commit finished");
    }

    /// `IMGCRYPTD_CRASH_AT` kills the process at the named point for real (SIGKILL, nothing
    /// after it runs), and what it leaves opens as the step table says.
    #[test]
    fn the_crash_hook_kills_the_process() {
        use std::os::unix::process::ExitStatusExt;
        let (pristine, _) = image_with_key_a("luks2");
        for (point, a_opens, b_opens) in [
            ("added:primary-torn", true, false),
            ("added:primary", true, true),
        ] {
            let image = duplicate(&pristine);
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "luks::image::tests::crash_hook_child",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_IMAGE, image.path())
                .env(crash::ENV, point)
                .output()
                .unwrap();
            assert_eq!(output.status.signal(), Some(libc::SIGKILL), "{output:?}");
            assert!(!String::from_utf8_lossy(&output.stdout).contains("commit finished"));
            assert_eq!(opens(image.path(), KEY_A), a_opens, "{point}");
            assert_eq!(opens(image.path(), KEY_B), b_opens, "{point}");
        }
    }

    /// libcryptsetup's metadata locking on the memfd copy needs no privilege (no lock file
    /// under the root-only /run/cryptsetup): reading, editing and committing work as `nobody`.
    #[test]
    fn works_without_privileges() {
        let output = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "luks::image::tests::added_and_removed_keyslots_reach_the_image",
                "--test-threads=1",
            ])
            .current_dir("/tmp")
            .output()
            .expect("setpriv (util-linux) must be installed");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{output:?}"
        );
    }

    #[test]
    fn changed_blocks_are_aligned_and_joined() {
        let old = vec![0u8; 5 * 4096 + 100];
        let mut new = old.clone();
        new[10] = 1;
        new[4096 + 5] = 1;
        new[3 * 4096] = 1;
        new[5 * 4096 + 50] = 1;
        assert_eq!(
            changed_blocks(&old, &new, 0, old.len() as u64),
            vec![(0, 8192), (3 * 4096, 4 * 4096), (5 * 4096, 5 * 4096 + 100)]
        );
        assert_eq!(changed_blocks(&old, &new, 8192, 3 * 4096), vec![]);
        assert_eq!(
            split_in_half(&[(0, 4096), (8192, 12288)]),
            (vec![(0, 4096)], vec![(8192, 12288)])
        );
        assert_eq!(split_in_half(&[(0, 100)]), (vec![(0, 50)], vec![(50, 100)]));
    }

    #[test]
    fn inspect_shows_argon2i_and_unbound_keyslots() {
        // Keyslot 0 argon2i (libcryptsetup-rs cannot convert its PBKDF); keyslot 1 unbound.
        let image = cryptsetup_image(
            "luks2",
            KEY_A,
            20,
            &[
                "--pbkdf",
                "argon2i",
                "--pbkdf-force-iterations",
                "4",
                "--pbkdf-memory",
                "32",
            ],
        );
        let key_b = key_file(KEY_B);
        let output = Command::new("cryptsetup")
            .args([
                "luksAddKey",
                "--batch-mode",
                "--unbound",
                "--key-size",
                "512",
            ])
            .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
            .arg(image.path())
            .arg(key_b.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let luks = LuksImage::read(image.as_file()).unwrap();
        let info = luks.info(&[]);
        assert_eq!(info.keyslots.len(), 2, "{info:?}");
        assert_eq!(info.keyslots[0].keyslot, 0);
        assert!(
            info.keyslots[0]
                .pbkdf
                .starts_with("argon2i (4 iterations, 32 KiB, "),
            "{:?}",
            info.keyslots[0]
        );
        assert_eq!(info.keyslots[1].keyslot, 1);
        assert!(
            info.keyslots[1]
                .pbkdf
                .starts_with("pbkdf2-sha256 (1000 iterations)")
                && info.keyslots[1].pbkdf.contains("unbound"),
            "{:?}",
            info.keyslots[1]
        );
        // The unbound keyslot holds no volume key: it is never a candidate for unlocking.
        assert_eq!(luks.keyslots().len(), 1);
        assert_eq!(luks.unbound_keyslots()[0].keyslot, 1);
        let error = luks
            .unlock(&[candidate("b", KEY_B)], &Unlocking::quiet(&ROOT_CAPS))
            .unwrap_err();
        assert!(matches!(error, Error::WrongKey { .. }), "{error:?}");
        luks.unlock(&[candidate("a", KEY_A)], &Unlocking::quiet(&ROOT_CAPS))
            .unwrap();
    }

    #[test]
    fn segment_size_is_honoured_and_iv_tweak_refused() {
        let image = cryptsetup_image("luks2", KEY_A, 20, &[]);
        let luks = LuksImage::read(image.as_file()).unwrap();
        let whole = luks.payload_size();
        assert_eq!(whole, (20 << 20) - luks.data_offset());

        edit_header(image.path(), &[r#"segments.0.size="4194304""#]);
        let luks = LuksImage::read(image.as_file()).unwrap();
        assert_eq!(luks.payload_size(), 4 << 20);
        luks.check_payload_supported().unwrap();

        // Past the image's end: libcryptsetup itself refuses to load it (and our payload check
        // would call it truncated).
        edit_header(image.path(), &[r#"segments.0.size="1000000000""#]);
        assert!(LuksImage::read(image.as_file()).is_err());

        edit_header(
            image.path(),
            &[r#"segments.0.size="dynamic""#, r#"segments.0.iv_tweak="8""#],
        );
        let luks = LuksImage::read(image.as_file()).unwrap();
        assert_eq!(luks.payload_size(), whole);
        let error = luks.check_payload_supported().unwrap_err();
        assert!(
            matches!(&error, Error::UnsupportedImage { message } if message.contains("iv_tweak 8") && message.contains("cryptsetup")),
            "{error:?}"
        );
        // Header work does not read the payload: the keys still open it.
        luks.unlock(&[candidate("a", KEY_A)], &Unlocking::quiet(&ROOT_CAPS))
            .unwrap();
    }
}
