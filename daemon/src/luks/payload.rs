//! The decrypted payload of a LUKS image, read like any source image.
//!
//! Reads ciphertext from the image descriptor at `data_offset + offset` with `pread` and
//! decrypts it in place with [`XtsCipher`], the IV sector being `offset / 512` as dm-crypt
//! counts it from the data segment's start. Positioned reads only, so copy workers may share it.

use std::fs::File;
use std::ops::Range;

use imgcrypt_proto::api::SourceFormat;

use super::image::read_image;
use crate::engines::xts::{XtsCipher, IV_SECTOR_BYTES};
use crate::formats::SourceImage;
use crate::keys::SecretBytes;
use crate::{Error, Result};

/// A LUKS image's payload, decrypted on the fly.
#[derive(Debug)]
pub struct LuksPayload {
    file: File,
    data_offset: u64,
    payload_size: u64,
    sector_size: u32,
    cipher: XtsCipher,
    /// The whole payload: ciphertext has no holes to skip.
    ranges: Vec<Range<u64>>,
}

impl LuksPayload {
    /// A reader of `payload_size` bytes at `data_offset` of `file`, encrypted in `sector_size`
    /// sectors with `volume_key` (aes-xts-plain64, 512-bit).
    pub fn new(
        file: File,
        data_offset: u64,
        payload_size: u64,
        sector_size: u32,
        volume_key: &SecretBytes,
    ) -> Result<Self> {
        if !(IV_SECTOR_BYTES as u32..=4096).contains(&sector_size) || !sector_size.is_power_of_two()
        {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "encryption sector size {sector_size} is not one dm-crypt uses (512 to 4096, \
                     a power of two)"
                ),
            });
        }
        if payload_size % u64::from(sector_size) != 0 {
            return Err(Error::corrupt(
                format!(
                    "the encrypted payload is {payload_size} bytes, not a whole number of \
                     {sector_size}-byte sectors: the image was truncated or extended"
                ),
                Some(data_offset + payload_size),
            ));
        }
        data_offset.checked_add(payload_size).ok_or_else(|| {
            Error::corrupt(
                "the payload extends past the largest file offset",
                Some(data_offset),
            )
        })?;
        Ok(Self {
            file,
            data_offset,
            payload_size,
            sector_size,
            cipher: XtsCipher::new(volume_key.as_bytes())?,
            ranges: if payload_size == 0 {
                Vec::new()
            } else {
                vec![0..payload_size]
            },
        })
    }
}

impl SourceImage for LuksPayload {
    fn format(&self) -> SourceFormat {
        SourceFormat::Luks
    }

    fn virtual_size(&self) -> u64 {
        self.payload_size
    }

    fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
        let sector = u64::from(self.sector_size);
        let fits = (buffer.len() as u64)
            .checked_add(offset)
            .is_some_and(|end| end <= self.payload_size);
        if !fits || offset % sector != 0 || buffer.len() as u64 % sector != 0 {
            return Err(Error::io(
                format!("read {} bytes at payload offset {offset}", buffer.len()),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "reads of an encrypted payload must be whole {sector}-byte sectors \
                         within its {} bytes",
                        self.payload_size
                    ),
                ),
            ));
        }
        read_image(
            &self.file,
            buffer,
            self.data_offset + offset,
            "encrypted payload",
        )?;
        self.cipher.decrypt_sectors(
            buffer,
            self.sector_size as usize,
            offset / IV_SECTOR_BYTES as u64,
        )
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }
}
