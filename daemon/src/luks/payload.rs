//! The decrypted payload of a LUKS image, read like any source image.
//!
//! Reads ciphertext from the image descriptor at `data_offset + offset` with `pread` and
//! decrypts it in place with [`XtsCipher`], the IV sector being `offset / 512` as dm-crypt
//! counts it from the data segment's start. Positioned reads only, so copy workers may share it.

use std::fs::File;
use std::ops::Range;

use imgcrypt_proto::api::SourceFormat;

use super::image::read_image;
use crate::engines::xts::{IvMode, XtsCipher, IV_SECTOR_BYTES};
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
            cipher: XtsCipher::new(volume_key.as_bytes(), IvMode::Plain64)?,
            ranges: if payload_size == 0 {
                Vec::new()
            } else {
                std::iter::once(0..payload_size).collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luks::cost::ROOT_CAPS;
    use crate::luks::image::testing::*;
    use crate::luks::unlock::Unlocking;
    use crate::luks::LuksImage;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::process::{Command, Stdio};

    const KEY: &[u8] = b"payload-key-ppppppppppppppppppppppppppppppp";

    /// Encrypts `plaintext` as dm-crypt would (aes-xts-plain64, IV = 512-byte sector number
    /// from the payload start, one XTS data unit per encryption sector) with Python's
    /// `cryptography` (OpenSSL): an implementation independent of ours.
    fn encrypt_independently(volume_key: &[u8], plaintext: &[u8], sector_size: usize) -> Vec<u8> {
        let script = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = bytes.fromhex(sys.argv[1]); sector = int(sys.argv[2])
data = sys.stdin.buffer.read(); out = bytearray()
for start in range(0, len(data), sector):
    tweak = (start // 512).to_bytes(16, "little")
    enc = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
    out += enc.update(data[start:start + sector]) + enc.finalize()
sys.stdout.buffer.write(bytes(out))
"#;
        let hex: String = volume_key.iter().map(|b| format!("{b:02x}")).collect();
        let mut child = Command::new("python3")
            .args(["-c", script, &hex, &sector_size.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(plaintext).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{output:?}");
        output.stdout
    }

    #[test]
    fn decrypts_a_cryptsetup_image_to_its_plaintext() {
        for extra in [&[][..], &["--sector-size", "4096"][..]] {
            let image = cryptsetup_image("luks2", KEY, 20, extra);
            let luks = LuksImage::read(image.as_file()).unwrap();
            let (volume_key, _) = luks
                .unlock(&[candidate("k", KEY)], &Unlocking::quiet(&ROOT_CAPS))
                .unwrap();
            let plaintext: Vec<u8> = (0..luks.payload_size())
                .map(|i| (i % 253) as u8 ^ (i >> 12) as u8)
                .collect();
            let ciphertext = encrypt_independently(
                volume_key.as_bytes(),
                &plaintext,
                luks.sector_size() as usize,
            );
            image
                .as_file()
                .write_all_at(&ciphertext, luks.data_offset())
                .unwrap();

            let payload = LuksPayload::new(
                image.reopen().unwrap(),
                luks.data_offset(),
                luks.payload_size(),
                luks.sector_size(),
                &volume_key,
            )
            .unwrap();
            assert_eq!(payload.format(), SourceFormat::Luks);
            assert_eq!(payload.virtual_size(), luks.payload_size());
            assert_eq!(payload.allocated_ranges().len(), 1);
            assert_eq!(payload.allocated_ranges()[0], 0..luks.payload_size());
            let mut whole = vec![0u8; luks.payload_size() as usize];
            payload.read_at(&mut whole, 0).unwrap();
            assert!(whole == plaintext, "{extra:?}: payload differs");
            // A piece from the middle decrypts on its own (the IV follows the offset).
            let mut piece = vec![0u8; 8192];
            payload.read_at(&mut piece, 1 << 20).unwrap();
            assert_eq!(piece, plaintext[1 << 20..(1 << 20) + 8192]);

            // Not whole sectors, or past the end: errors.
            let sector = luks.sector_size() as usize;
            assert!(payload
                .read_at(&mut vec![0; sector], sector as u64 / 2)
                .is_err());
            assert!(payload.read_at(&mut vec![0; sector + 1], 0).is_err());
            assert!(payload
                .read_at(&mut vec![0; sector], luks.payload_size())
                .is_err());
        }
    }

    #[test]
    fn a_truncated_payload_is_a_corrupt_image() {
        let image = cryptsetup_image("luks2", KEY, 20, &[]);
        let luks = LuksImage::read(image.as_file()).unwrap();
        let (volume_key, _) = luks
            .unlock(&[candidate("k", KEY)], &Unlocking::quiet(&ROOT_CAPS))
            .unwrap();
        let payload = LuksPayload::new(
            image.reopen().unwrap(),
            luks.data_offset(),
            luks.payload_size(),
            luks.sector_size(),
            &volume_key,
        )
        .unwrap();
        image.as_file().set_len(luks.data_offset() + 4096).unwrap();
        let mut buffer = vec![0u8; 8192];
        match payload.read_at(&mut buffer, 0).unwrap_err() {
            Error::CorruptImage { message, offset } => {
                assert!(message.contains("truncated"), "{message}");
                assert_eq!(offset, Some(luks.data_offset()));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            LuksPayload::new(image.reopen().unwrap(), 4096, 1000, 512, &volume_key),
            Err(Error::CorruptImage { .. })
        ));
        assert!(LuksPayload::new(image.reopen().unwrap(), 4096, 4096, 1000, &volume_key).is_err());
    }
}
