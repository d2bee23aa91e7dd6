//! VHDs encrypted the way blktap does (`vhd-util copy -k`, IBM Cloud classic's import format,
//! and this daemon's VHD output): recognised by the key hash in their batmap header, refused as
//! plaintext sources, and read given their raw key.
//!
//! The raw key is the user's key file decoded from base64: 32 bytes select AES-128-XTS, 64
//! AES-256-XTS (blktap `drivers/crypto/xts_aes.c`). It is checked against the stored hash,
//! SHA-256(nonce ‖ key), before anything is decrypted: a wrong key is an error naming the hash
//! the image expects, never a garbage disk.
//!
//! # The guest view
//!
//! [`DecryptedVhd`] reads what tapdisk shows the guest: in an allocated block, a sector is
//! present when the block's batmap bit or the sector's bitmap bit is set (blktap
//! `block-vhd.c` `read_bitmap_cache`) and is then decrypted with AES-XTS whose tweak is the
//! guest sector number modulo 2³² (`xts_aes.h`, "plain"); everything else reads as zeros.
//!
//! One deliberate difference: a present sector stored as 512 zero bytes reads as zeros rather
//! than being decrypted. `vhd-util copy` stores the sectors its source never wrote that way —
//! unencrypted, but marked present — and tapdisk turns them into garbage; real ciphertext is all
//! zeros with probability 2⁻⁴⁰⁹⁶. So decrypting such an image gives back the disk the user
//! encrypted (zeros where the source had none), and `verify` against that source passes; the
//! number of such sectors is reported ([`DecryptedVhd::plaintext_zero_sectors`]).

use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use imgcrypt_proto::api::{
    ImageInfo, OutputFormat, SourceFormat, UnlockMethod, Unlocked, VhdKeyInfo,
};

use super::batmap::{self, KeyHash};
use super::dynamic::DynamicVhd;
use super::footer::DiskType;
use super::{detect, Detected};
use crate::engines::xts::{IvMode, XtsCipher};
use crate::error::Descriptor;
use crate::formats::layout::Layout;
use crate::formats::{check_request, read_error, read_exact_at, SourceImage};
use crate::keys::fingerprint::vhd_key_hash;
use crate::keys::{raw_vhd_key, CandidateKey, SecretBytes};
use crate::outputs::vhd::{check_raw_key, cipher_name};
use crate::sys::source_io::SourceFile;
use crate::sys::storage::{self, StorageKind};
use crate::{Error, Result};

/// The short format name programs match on when an encrypted VHD is refused as a source.
pub const FORMAT_NAME: &str = "vhd-encrypted";

const SECTOR: usize = 512;

/// The error for an encrypted VHD passed where a plaintext disk is expected.
pub(crate) fn refusal_as_plaintext(key_hash: &KeyHash) -> Error {
    Error::UnsupportedFormat {
        format: FORMAT_NAME,
        message: format!(
            "this VHD is already encrypted (by `vhd-util copy -k` or `imgctl encrypt --format \
             vhd`: its batmap holds key hash {}); read as a plain disk it would give ciphertext, \
             and encrypting it again would make an image nobody can use: upload it as it is, or \
             decrypt it first with `imgctl decrypt IMAGE -o PLAIN --key-file KEY`",
            key_hash.hash_hex()
        ),
    }
}

/// An encrypted VHD, opened but not yet unlocked.
#[derive(Debug)]
pub struct EncryptedVhd {
    image: DynamicVhd,
    file: File,
    key_hash: KeyHash,
}

impl EncryptedVhd {
    /// Opens `file` (a regular file or block device open for reading), which must be a dynamic
    /// VHD with a key hash.
    pub fn open(file: File) -> Result<Self> {
        let kind = storage::storage_kind(&file)?;
        if let StorageKind::Other(what) = kind {
            return Err(Error::bad_descriptor(
                Descriptor::Image,
                format!("it is {what}; pass a regular file or a block device opened for reading"),
            ));
        }
        let file_size = storage::size_of(&file)?;
        let not_encrypted = |what: &str| Error::UnsupportedImage {
            message: format!(
                "{what}, not an encrypted image (not a LUKS image, and not a VHD encrypted by \
                 vhd-util: no key hash in a blktap batmap): there is nothing to decrypt"
            ),
        };
        let Detected::Vhd(found) = detect(&file, file_size)? else {
            return Err(not_encrypted("this is not a VHD"));
        };
        if found.footer.disk_type()? != DiskType::Dynamic {
            return Err(not_encrypted("this is a fixed or differencing VHD"));
        }
        found.footer.check_version()?;
        let image = DynamicVhd::open(&file, &found.footer, found.data_end)?;
        let Some(key_hash) = image.key_hash().copied() else {
            return Err(not_encrypted("this is a plain dynamic VHD"));
        };
        Ok(Self {
            image,
            file,
            key_hash,
        })
    }

    /// The key hash and nonce the image carries.
    pub fn key_hash(&self) -> &KeyHash {
        &self.key_hash
    }

    /// Size of the disk the guest sees.
    pub fn virtual_size(&self) -> u64 {
        self.image.virtual_size()
    }

    /// Bytes stored in allocated blocks.
    pub fn allocated_bytes(&self) -> u64 {
        self.image.allocated_bytes()
    }

    /// The key hash `raw_key` would have with this image's nonce, hex.
    pub fn hash_of(&self, raw_key: &[u8]) -> Result<String> {
        Ok(batmap::hex(&vhd_key_hash(&self.key_hash.nonce, raw_key)?))
    }

    /// Whether `raw_key` is the image's key (its hash matches).
    pub fn key_matches(&self, raw_key: &[u8]) -> Result<bool> {
        Ok(vhd_key_hash(&self.key_hash.nonce, raw_key)? == self.key_hash.hash)
    }

    /// What `inspect` shows: format, sizes, the key hash, and which of `keys` matches it
    /// (hashed only; keys that do not decode to a raw key of 32 or 64 bytes match nothing).
    pub fn info(&self, keys: &[CandidateKey]) -> Result<ImageInfo> {
        let mut matching: Option<(&CandidateKey, usize)> = None;
        for candidate in keys {
            let Ok(raw) = raw_vhd_key(&candidate.key) else {
                continue;
            };
            if self.key_matches(raw.as_bytes())? {
                matching = Some((candidate, raw.len()));
                break;
            }
        }
        let image_size = storage::size_of(&self.file)?;
        let allocated = self.allocated_bytes();
        Ok(ImageInfo {
            format: OutputFormat::Vhd,
            luks_version: None,
            virtual_size: Some(self.virtual_size()),
            allocated_bytes: Some(allocated),
            vhd_key: Some(VhdKeyInfo {
                nonce: self.key_hash.nonce_hex(),
                hash: self.key_hash.hash_hex(),
                matching_key: matching.map(|(candidate, _)| candidate.name.clone()),
            }),
            uuid: self.image.uuid(),
            // The key size, hence AES-128 or AES-256, is known only from the key itself.
            cipher: "aes-xts-plain".to_string(),
            key_size_bits: matching.map_or(0, |(_, len)| len as u32 * 8),
            sector_size: SECTOR as u32,
            data_offset: self.image.first_data_offset().unwrap_or(0),
            payload_size: allocated,
            image_size,
            keyslots: Vec::new(),
        })
    }

    /// Unlocks with the first of `candidates` whose decoded key matches the stored hash (no key
    /// derivation: the hash is compared). None matching is [`Error::WrongKey`] naming the
    /// expected hash and each key's; a lone key that is not a raw key of 32 or 64 bytes gets
    /// that key-file error instead.
    pub fn unlock_with(self, candidates: &[CandidateKey]) -> Result<(DecryptedVhd, Unlocked)> {
        let mut tried = Vec::new();
        let mut reasons = Vec::new();
        for candidate in candidates {
            let raw = match raw_vhd_key(&candidate.key) {
                Ok(raw) => raw,
                Err(error) if candidates.len() == 1 => return Err(error),
                Err(error) => {
                    reasons.push(format!("{}: {error}", candidate.name));
                    continue;
                }
            };
            if self.key_matches(raw.as_bytes())? {
                let unlocked = Unlocked {
                    key_name: candidate.name.clone(),
                    fingerprint: candidate.key.fingerprint.clone(),
                    keyslot: 0,
                    method: UnlockMethod::Token,
                    attempts: 0,
                };
                let image = self.unlock(&raw, &candidate.name)?;
                return Ok((image, unlocked));
            }
            let hash = self.hash_of(raw.as_bytes())?;
            reasons.push(format!("{} hashes to {hash}", candidate.name));
            tried.push(hash);
        }
        let expected = self.key_hash.hash_hex();
        Err(Error::WrongKey {
            message: format!(
                "no key given is this VHD's: its batmap holds key hash {expected} (SHA-256 of \
                 nonce {} and the raw key) but {}; pass the key file whose `imgctl key \
                 fingerprint --vhd` (or `vhd-util key -C -k RAWKEY`) prints {expected}",
                self.key_hash.nonce_hex(),
                if reasons.is_empty() {
                    "no key was given".to_string()
                } else {
                    reasons.join("; ")
                }
            ),
            tried,
            carried: vec![expected],
        })
    }

    /// Checks `raw_key` against the stored hash and returns the decrypted guest view. The
    /// key must be 32 or 64 bytes ([`check_raw_key`]); `key_name` is how the user knows it.
    pub fn unlock(self, raw_key: &SecretBytes, key_name: &str) -> Result<DecryptedVhd> {
        check_raw_key(raw_key.as_bytes())?;
        if !self.key_matches(raw_key.as_bytes())? {
            let got = self.hash_of(raw_key.as_bytes())?;
            let expected = self.key_hash.hash_hex();
            return Err(Error::WrongKey {
                message: format!(
                    "{key_name} is not this VHD's key: the image's batmap holds key hash \
                     {expected} (SHA-256 of nonce {} and the key), but the key decodes to one \
                     hashing to {got}; pass the key file whose `imgctl key fingerprint --vhd` \
                     (or `vhd-util key -C -k RAWKEY`) prints {expected}",
                    self.key_hash.nonce_hex()
                ),
                tried: vec![got],
                carried: vec![expected],
            });
        }
        let cipher = XtsCipher::new(raw_key.as_bytes(), IvMode::Plain)?;
        Ok(DecryptedVhd {
            cipher_name: cipher_name(raw_key.len()),
            image: self.image,
            file: SourceFile::new(std::sync::Arc::new(self.file)),
            cipher,
            plaintext_zero_sectors: AtomicU64::new(0),
        })
    }
}

/// The guest's view of an encrypted VHD (module documentation).
#[derive(Debug)]
pub struct DecryptedVhd {
    image: DynamicVhd,
    /// Data blocks are read through the uncached read path; bitmaps buffered.
    file: SourceFile,
    cipher: XtsCipher,
    cipher_name: &'static str,
    plaintext_zero_sectors: AtomicU64,
}

impl DecryptedVhd {
    /// The cipher, as blktap names it.
    pub fn cipher_name(&self) -> &'static str {
        self.cipher_name
    }

    /// Present sectors read so far that were stored as zeros (left unencrypted by
    /// `vhd-util copy`) and were read as zeros rather than decrypted.
    pub fn plaintext_zero_sectors(&self) -> u64 {
        self.plaintext_zero_sectors.load(Ordering::Relaxed)
    }

    /// Whether the batmap marks block `block` full (every sector present), so its bitmap need
    /// not be read.
    fn block_is_full(&self, block: u64) -> bool {
        self.image
            .batmap()
            .is_some_and(|map| batmap::test_bit(&map.full_blocks, block))
    }

    /// Fills `target` with the guest's sectors `first..` of block `block`, whole sectors.
    fn read_sectors(
        &self,
        block: u64,
        first: u64,
        target: &mut [u8],
        bitmap: &mut [u8],
    ) -> Result<()> {
        let Some((bitmap_at, data_at)) = self.image.block_at(block) else {
            target.fill(0);
            return Ok(());
        };
        let at = data_at + first * SECTOR as u64;
        self.file
            .read_data(target, at)
            .map_err(|e| read_error(e, target.len(), at, "an encrypted VHD block"))?;
        let map = if self.block_is_full(block) {
            None
        } else {
            read_exact_at(
                self.file.file(),
                bitmap,
                bitmap_at,
                "a block's sector bitmap",
            )?;
            Some(&bitmap[..])
        };
        let sectors_per_block = self.image.block_size() / SECTOR as u64;
        self.decrypt_block_piece(target, block * sectors_per_block + first, first, map)
    }

    /// Decrypts, in place, `data` = the stored sectors `first_sector..` of one allocated block,
    /// with `bitmap` its sector bitmap (`None`: all present).
    fn decrypt_block_piece(
        &self,
        data: &mut [u8],
        first_sector: u64,
        sector_in_block: u64,
        bitmap: Option<&[u8]>,
    ) -> Result<()> {
        let sectors = data.len() / SECTOR;
        let mut run_start: Option<usize> = None;
        let mut zero_sectors = 0u64;
        for index in 0..=sectors {
            let decrypt_this = index < sectors && {
                let present =
                    bitmap.is_none_or(|map| batmap::test_bit(map, sector_in_block + index as u64));
                let sector = &mut data[index * SECTOR..(index + 1) * SECTOR];
                if !present {
                    sector.fill(0);
                    false
                } else if sector.iter().all(|&b| b == 0) {
                    zero_sectors += 1;
                    false
                } else {
                    true
                }
            };
            match (decrypt_this, run_start) {
                (true, None) => run_start = Some(index),
                (false, Some(start)) => {
                    self.cipher.decrypt_sectors(
                        &mut data[start * SECTOR..index * SECTOR],
                        SECTOR,
                        first_sector + start as u64,
                    )?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if zero_sectors > 0 {
            self.plaintext_zero_sectors
                .fetch_add(zero_sectors, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl SourceImage for DecryptedVhd {
    fn format(&self) -> SourceFormat {
        SourceFormat::VhdDynamic
    }

    fn virtual_size(&self) -> u64 {
        self.image.virtual_size()
    }

    /// Reads whole sectors of each block touched (one `pread`, plus one for its bitmap unless
    /// the batmap marks the block full), decrypts them, and copies out the bytes asked for.
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
        check_request(self.virtual_size(), offset, buffer.len())?;
        let block_size = self.image.block_size();
        let mut scratch = Vec::new();
        let mut bitmap = vec![0u8; self.image.bitmap_size() as usize];
        let mut done = 0usize;
        while done < buffer.len() {
            let position = offset + done as u64;
            let block = position / block_size;
            let within = position % block_size;
            let length = (buffer.len() - done).min((block_size - within) as usize);
            let piece = &mut buffer[done..done + length];
            let first = within / SECTOR as u64;
            let skip = (within % SECTOR as u64) as usize;
            if skip == 0 && length % SECTOR == 0 {
                self.read_sectors(block, first, piece, &mut bitmap)?;
            } else {
                let sectors = (skip + length).div_ceil(SECTOR);
                scratch.resize(sectors * SECTOR, 0);
                self.read_sectors(block, first, &mut scratch, &mut bitmap)?;
                piece.copy_from_slice(&scratch[skip..skip + length]);
            }
            done += length;
        }
        Ok(())
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        self.image.allocated_ranges()
    }

    fn read_notes(&self) -> Vec<String> {
        match self.plaintext_zero_sectors() {
            0 => Vec::new(),
            sectors => vec![format!(
                "{sectors} sectors of this VHD are stored unencrypted as zeros though marked in \
                 use (vhd-util copy leaves the sectors its source never wrote that way; tapdisk \
                 shows the guest garbage there): they were read as the zeros the source had"
            )],
        }
    }
}

#[cfg(test)]
mod tests;
