//! CRC-32C (Castagnoli), the checksum of every VHDX header, region table and log entry.
//!
//! The VHDX specification computes it over the structure with its own checksum field read as
//! zero; [`checksum_with_hole`] does that without copying the structure.

/// The reflected Castagnoli polynomial.
const POLYNOMIAL: u32 = 0x82f6_3b78;

/// One table entry per byte value, built at compile time.
const TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLYNOMIAL
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// A running CRC-32C, for structures read in pieces (log entries).
#[derive(Debug, Clone, Copy)]
pub(super) struct Crc32c(u32);

impl Crc32c {
    pub(super) fn new() -> Self {
        Self(!0)
    }

    pub(super) fn update(&mut self, bytes: &[u8]) {
        let mut crc = self.0;
        for &byte in bytes {
            crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
        }
        self.0 = crc;
    }

    pub(super) fn finish(self) -> u32 {
        !self.0
    }
}

/// CRC-32C of `bytes` with the four bytes at `hole` read as zeros (where the stored checksum is).
pub fn checksum_with_hole(bytes: &[u8], hole: usize) -> u32 {
    let mut crc = Crc32c::new();
    let hole_end = (hole + 4).min(bytes.len());
    let hole = hole.min(bytes.len());
    crc.update(&bytes[..hole]);
    crc.update(&[0u8; 4][..hole_end - hole]);
    crc.update(&bytes[hole_end..]);
    crc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_check_value() {
        // The standard check value of CRC-32C over "123456789" (RFC 3720, appendix B.4).
        let mut crc = Crc32c::new();
        crc.update(b"123456789");
        assert_eq!(crc.finish(), 0xe306_9283);
    }

    #[test]
    fn the_hole_reads_as_zeros() {
        let mut bytes = *b"ab\x01\x02\x03\x04cd";
        let with_hole = checksum_with_hole(&bytes, 2);
        bytes[2..6].fill(0);
        let mut crc = Crc32c::new();
        crc.update(&bytes);
        assert_eq!(with_hole, crc.finish());
    }
}
