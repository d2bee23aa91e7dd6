//! The output layout: the LUKS header (its size is the data offset read from the header actually
//! written), then the encrypted payload, the whole rounded up to a MiB.
//!
//! The rounding is the seed procedure's (header plus raw size, in MiB, rounded up), so our images
//! have the size its consumers expect; unlike the seed we never assume a "constant 4 MB" header.
//! The payload past the source's virtual size is encrypted zeros.

use crate::{Error, Result};

/// The output's size is a whole number of these.
pub const OUTPUT_ALIGNMENT: u64 = 1 << 20;

/// The largest encryption sector; the payload must be a whole number of sectors of any size.
const MAX_SECTOR_SIZE: u64 = 4096;

/// Total output size: `data_offset + virtual_size`, rounded up to a whole MiB.
///
/// Fails when the source is empty, when the data offset is not sector-aligned (libcryptsetup
/// always aligns it), or when the result would not fit a file offset (`i64::MAX`).
pub fn output_size(data_offset: u64, virtual_size: u64) -> Result<u64> {
    if data_offset % MAX_SECTOR_SIZE != 0 {
        return Err(Error::Luks {
            operation: "layout",
            message: format!(
                "data offset {data_offset} is not a multiple of {MAX_SECTOR_SIZE} bytes"
            ),
        });
    }
    if virtual_size == 0 {
        return Err(Error::UnsupportedImage {
            message: "has a virtual size of 0 bytes: there is nothing to encrypt".to_string(),
        });
    }
    let too_large = || Error::UnsupportedImage {
        message: format!(
            "virtual size of {virtual_size} bytes is too large: with a {data_offset}-byte LUKS \
             header the encrypted image would exceed the largest possible file"
        ),
    };
    let size = data_offset
        .checked_add(virtual_size)
        .and_then(|end| end.checked_next_multiple_of(OUTPUT_ALIGNMENT))
        .ok_or_else(too_large)?;
    if size > i64::MAX as u64 {
        return Err(too_large());
    }
    Ok(size)
}

/// Encrypted payload bytes: [`output_size`] minus the header.
pub fn payload_size(data_offset: u64, virtual_size: u64) -> Result<u64> {
    Ok(output_size(data_offset, virtual_size)? - data_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const LUKS1_OFFSET: u64 = 2 * MIB;
    const LUKS2_OFFSET: u64 = 16 * MIB;

    #[test]
    fn seed_example_with_real_offsets() {
        // The seed's raw size: 42949017600 bytes = 40959.375 MiB.
        let raw = 42_949_017_600;
        assert_eq!(output_size(LUKS1_OFFSET, raw).unwrap(), 40_962 * MIB);
        assert_eq!(output_size(LUKS2_OFFSET, raw).unwrap(), 40_976 * MIB);
        assert_eq!(payload_size(LUKS2_OFFSET, raw).unwrap(), 40_960 * MIB);
    }

    #[test]
    fn odd_virtual_sizes_round_up_to_a_mib() {
        for (offset, virtual_size, output) in [
            (LUKS1_OFFSET, 1, 3 * MIB),
            (LUKS1_OFFSET, MIB - 1, 3 * MIB),
            (LUKS1_OFFSET, MIB, 3 * MIB),
            (LUKS1_OFFSET, MIB + 512, 4 * MIB),
            (LUKS2_OFFSET, 3 * MIB + 7, 20 * MIB),
            (LUKS2_OFFSET, 5 * 1000 * 1000, 21 * MIB),
            (LUKS2_OFFSET, 64 * MIB, 80 * MIB),
        ] {
            assert_eq!(output_size(offset, virtual_size).unwrap(), output);
            let payload = payload_size(offset, virtual_size).unwrap();
            assert_eq!(payload, output - offset);
            assert!(payload >= virtual_size);
            assert_eq!(payload % 4096, 0, "payload must be whole 4 KiB sectors");
        }
    }

    #[test]
    fn rejects_empty_sources_and_overflow() {
        assert!(matches!(
            output_size(LUKS2_OFFSET, 0),
            Err(Error::UnsupportedImage { .. })
        ));
        assert!(matches!(
            output_size(LUKS2_OFFSET, u64::MAX - MIB),
            Err(Error::UnsupportedImage { .. })
        ));
        // Fits u64 but not a file offset.
        assert!(matches!(
            output_size(LUKS2_OFFSET, i64::MAX as u64),
            Err(Error::UnsupportedImage { .. })
        ));
        assert!(matches!(
            output_size(LUKS2_OFFSET + 512, MIB),
            Err(Error::Luks { .. })
        ));
    }
}
