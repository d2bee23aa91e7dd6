//! The 512-byte VHD footer ("hard disk footer"): parsing, checksum, and the virtual-size rule.
//!
//! All fields are big-endian. Offsets used here (VHD specification, and qemu's `VHDFooter`):
//! cookie `conectix` at 0, file format version at 12, data offset at 16, time stamp at 24,
//! creator application at 28, current size at 48, CHS geometry at 56 (cylinders u16, heads u8, sectors per track u8),
//! disk type at 60, checksum at 64.

use crate::{Error, Result};

/// Size of a footer, and of the copy a dynamic disk keeps at offset 0.
pub const FOOTER_SIZE: usize = 512;

/// The footer's magic cookie.
pub const COOKIE: &[u8; 8] = b"conectix";

/// The only file format version defined (1.0).
const FORMAT_VERSION: u32 = 0x0001_0000;

const VERSION_AT: usize = 12;
const DATA_OFFSET_AT: usize = 16;
const TIMESTAMP_AT: usize = 24;
const CREATOR_APP_AT: usize = 28;
const CREATOR_VERSION_AT: usize = 32;
const CURRENT_SIZE_AT: usize = 48;
const GEOMETRY_AT: usize = 56;
const DISK_TYPE_AT: usize = 60;
const CHECKSUM_AT: usize = 64;

/// Largest geometry the specification allows (65535 cylinders × 16 heads × 255 sectors). Tools
/// that cannot express a size in CHS (qemu with `force_size`, Hyper-V for big disks) store
/// exactly this, and the size then comes from `current_size`.
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

/// Largest disk the VHD format describes: 2040 GiB (qemu's `VHD_MAX_SECTORS`).
pub const MAX_VIRTUAL_SIZE: u64 = 0xff00_0000 * 512;

/// Largest disk read from a VHD that blktap made (creator `tap`): blktap has no 2040 GiB limit
/// (`vhd-util create -s` takes any size; XenServer makes 2 TiB disks), so its VHDs are bounded
/// by what this reader's block table holds instead: 2²² blocks of 2 MiB.
pub const MAX_BLKTAP_VIRTUAL_SIZE: u64 = 8 << 40;

/// The disk types the footer may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// 2: the data area precedes the footer.
    Fixed,
    /// 3: header, block allocation table and blocks.
    Dynamic,
    /// 4: like dynamic, with unallocated blocks read from a parent image.
    Differencing,
}

/// The fields of a footer this reader uses, from a footer whose cookie and checksum are right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Where in the file this footer was read (EOF−512, or 0 for the copy).
    pub offset: u64,
    /// Format version; only 1.0 is read.
    pub version: u32,
    /// Absolute offset of the dynamic disk header (all ones for fixed disks).
    pub data_offset: u64,
    /// Seconds since 2000-01-01 00:00 UTC when the image was created: what a differencing
    /// child may record as its parent's time stamp.
    pub timestamp: u32,
    /// Four-character code of the program that made the image (`vpc `, `qemu`, `qem2`, `win `...).
    pub creator_app: [u8; 4],
    /// The creator's version (major << 16 | minor); blktap's tells whether a batmap exists.
    pub creator_version: u32,
    /// The disk size in bytes as the creator recorded it.
    pub current_size: u64,
    /// Cylinders, heads, sectors per track.
    pub geometry: (u16, u8, u8),
    /// Raw disk type field.
    pub disk_type: u32,
    /// The disk's unique id (bytes 68..84).
    pub uuid: [u8; 16],
}

/// What a 512-byte block at a footer position turned out to be.
#[derive(Debug)]
pub enum FooterCheck {
    /// Cookie and checksum are right.
    Valid(Footer),
    /// The cookie is there but the checksum does not match: a damaged footer.
    BadChecksum {
        /// The checksum field.
        stored: u32,
        /// What the bytes sum to.
        computed: u32,
    },
    /// No `conectix` cookie: not a footer.
    NoCookie,
}

/// The VHD checksum: the one's complement of the sum of all bytes, with the checksum field
/// (`checksum_at..checksum_at + 4`) counted as zeros. Footers and dynamic headers use it alike.
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(index, _)| !(checksum_at..checksum_at + 4).contains(index))
        .fold(0u32, |sum, (_, &byte)| sum.wrapping_add(u32::from(byte)));
    !sum
}

pub(super) fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(field)
}

pub(super) fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(field)
}

/// Parses the 512 bytes read at `offset`.
pub fn parse(bytes: &[u8; FOOTER_SIZE], offset: u64) -> FooterCheck {
    if &bytes[..8] != COOKIE {
        return FooterCheck::NoCookie;
    }
    let stored = be_u32(bytes, CHECKSUM_AT);
    let computed = checksum(bytes, CHECKSUM_AT);
    if stored != computed {
        return FooterCheck::BadChecksum { stored, computed };
    }
    let mut creator_app = [0u8; 4];
    creator_app.copy_from_slice(&bytes[CREATOR_APP_AT..CREATOR_APP_AT + 4]);
    FooterCheck::Valid(Footer {
        offset,
        version: be_u32(bytes, VERSION_AT),
        data_offset: be_u64(bytes, DATA_OFFSET_AT),
        timestamp: be_u32(bytes, TIMESTAMP_AT),
        creator_app,
        creator_version: be_u32(bytes, CREATOR_VERSION_AT),
        current_size: be_u64(bytes, CURRENT_SIZE_AT),
        geometry: (
            u16::from_be_bytes([bytes[GEOMETRY_AT], bytes[GEOMETRY_AT + 1]]),
            bytes[GEOMETRY_AT + 2],
            bytes[GEOMETRY_AT + 3],
        ),
        disk_type: be_u32(bytes, DISK_TYPE_AT),
        uuid: bytes[68..84].try_into().unwrap_or([0; 16]),
    })
}

impl Footer {
    /// The disk type, or an error for the values the specification reserves and unknown ones.
    pub fn disk_type(&self) -> Result<DiskType> {
        match self.disk_type {
            2 => Ok(DiskType::Fixed),
            3 => Ok(DiskType::Dynamic),
            4 => Ok(DiskType::Differencing),
            other => Err(Error::corrupt(
                format!(
                    "VHD footer at offset {}: unknown disk type {other} (2 is fixed, 3 dynamic, \
                     4 differencing)",
                    self.offset
                ),
                Some(self.offset),
            )),
        }
    }

    /// Refuses format versions other than 1.0.
    pub fn check_version(&self) -> Result<()> {
        if self.version == FORMAT_VERSION {
            Ok(())
        } else {
            Err(Error::UnsupportedImage {
                message: format!(
                    "VHD footer at offset {}: file format version {}.{} (only 1.0 is defined); \
                     convert the image with the tool that made it",
                    self.offset,
                    self.version >> 16,
                    self.version & 0xffff
                ),
            })
        }
    }

    /// Sectors described by the CHS geometry.
    fn geometry_sectors(&self) -> u64 {
        let (cylinders, heads, sectors) = self.geometry;
        u64::from(cylinders) * u64::from(heads) * u64::from(sectors)
    }

    /// The size of the disk the guest sees, by the rule qemu (10.0, `block/vpc.c`) applies, so
    /// the encrypted image holds exactly what `qemu-img convert` would have produced:
    ///
    /// - images whose creator application is `vpc ` (Virtual PC) or `qemu` (qemu without
    ///   `force_size`) are sized by their CHS geometry, cylinders × heads × sectors × 512,
    ///   because Virtual PC sizes disks that way and its `current_size` is often larger;
    /// - all other creators (`qem2` = qemu with `force_size`, `win ` = Hyper-V, `d2v `,
    ///   `tap\0`, `CTXS`, `wa\0\0` = Azure, and unknown ones) use `current_size`;
    /// - a geometry of exactly 65535 × 16 × 255 means "does not fit in CHS": `current_size`.
    ///
    /// Older qemu (7.2, Debian 12's) sizes *unknown* creators by geometry instead. We follow the
    /// newer rule on purpose: for a disk from a tool qemu does not know, geometry can only
    /// truncate it, while `current_size` is what the creator says the disk holds.
    ///
    /// Where qemu silently rounds a `current_size` that is not a multiple of 512 down, this
    /// reader refuses it (the specification requires whole sectors, and dropping the tail would
    /// lose data), and sizes above the format's 2040 GiB limit are refused as qemu does.
    pub fn virtual_size(&self) -> Result<u64> {
        let sized_by_geometry = matches!(&self.creator_app, b"vpc " | b"qemu")
            && self.geometry_sectors() != MAX_GEOMETRY_SECTORS;
        let size = if sized_by_geometry {
            self.geometry_sectors() * 512
        } else {
            if self.current_size % 512 != 0 {
                return Err(Error::corrupt(
                    format!(
                        "VHD footer at offset {}: current size {} is not a multiple of 512 bytes",
                        self.offset, self.current_size
                    ),
                    Some(self.offset),
                ));
            }
            self.current_size
        };
        if self.made_by_blktap() {
            if size > MAX_BLKTAP_VIRTUAL_SIZE {
                return Err(Error::corrupt(
                    format!(
                        "VHD footer at offset {}: disk size {size} bytes is beyond the 8 TiB \
                         this reader holds for blktap VHDs",
                        self.offset
                    ),
                    Some(self.offset),
                ));
            }
        } else if size > MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(
                format!(
                    "VHD footer at offset {}: disk size {size} bytes is beyond the VHD format's \
                     limit of 2040 GiB",
                    self.offset
                ),
                Some(self.offset),
            ));
        }
        Ok(size)
    }

    /// Whether blktap (`vhd-util`, tapdisk, XenServer) made the image: its creator application
    /// starts with `tap`, the test libvhd itself applies (blktap `include/libvhd.h`
    /// `vhd_creator_tapdisk`).
    pub fn made_by_blktap(&self) -> bool {
        self.creator_app.starts_with(b"tap")
    }

    /// Whether two valid footers describe the same disk (the copy at offset 0 of a dynamic disk
    /// must equal the footer at the end).
    pub fn same_disk(&self, other: &Footer) -> bool {
        self.data_offset == other.data_offset
            && self.creator_app == other.creator_app
            && self.current_size == other.current_size
            && self.geometry == other.geometry
            && self.disk_type == other.disk_type
    }
}

#[cfg(test)]
pub(super) mod build {
    //! Footers for crafted test images.

    use super::*;

    /// Writes a checksummed footer. Fields match what qemu writes for a new image.
    pub fn footer(
        disk_type: u32,
        creator_app: &[u8; 4],
        current_size: u64,
        geometry: (u16, u8, u8),
        data_offset: u64,
    ) -> [u8; FOOTER_SIZE] {
        let mut bytes = [0u8; FOOTER_SIZE];
        bytes[..8].copy_from_slice(COOKIE);
        bytes[8..12].copy_from_slice(&2u32.to_be_bytes());
        bytes[VERSION_AT..VERSION_AT + 4].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        bytes[DATA_OFFSET_AT..DATA_OFFSET_AT + 8].copy_from_slice(&data_offset.to_be_bytes());
        bytes[CREATOR_APP_AT..CREATOR_APP_AT + 4].copy_from_slice(creator_app);
        bytes[40..48].copy_from_slice(&current_size.to_be_bytes());
        bytes[CURRENT_SIZE_AT..CURRENT_SIZE_AT + 8].copy_from_slice(&current_size.to_be_bytes());
        bytes[GEOMETRY_AT..GEOMETRY_AT + 2].copy_from_slice(&geometry.0.to_be_bytes());
        bytes[GEOMETRY_AT + 2] = geometry.1;
        bytes[GEOMETRY_AT + 3] = geometry.2;
        bytes[DISK_TYPE_AT..DISK_TYPE_AT + 4].copy_from_slice(&disk_type.to_be_bytes());
        reseal(&mut bytes);
        bytes
    }

    /// Recomputes the checksum after a test changed a field.
    pub fn reseal(bytes: &mut [u8; FOOTER_SIZE]) {
        let sum = checksum(bytes, CHECKSUM_AT);
        bytes[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&sum.to_be_bytes());
    }

    pub const AT_VERSION: usize = VERSION_AT;
    pub const AT_DATA_OFFSET: usize = DATA_OFFSET_AT;
    pub const AT_TIMESTAMP: usize = TIMESTAMP_AT;
    pub const AT_CURRENT_SIZE: usize = CURRENT_SIZE_AT;
    pub const AT_DISK_TYPE: usize = DISK_TYPE_AT;
    pub const AT_CHECKSUM: usize = CHECKSUM_AT;
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    fn valid(bytes: &[u8; FOOTER_SIZE]) -> Footer {
        match parse(bytes, 0) {
            FooterCheck::Valid(footer) => footer,
            other => panic!("expected a valid footer, got {other:?}"),
        }
    }

    #[test]
    fn checksum_is_ones_complement_of_byte_sum_without_the_field() {
        // Sum of bytes 1, 2 and 3 outside the field is 6; the field's own bytes do not count.
        let mut bytes = [0u8; 80];
        bytes[0] = 1;
        bytes[10] = 2;
        bytes[79] = 3;
        bytes[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&[0xff; 4]);
        assert_eq!(checksum(&bytes, CHECKSUM_AT), !6u32);
        assert_eq!(checksum(&bytes, CHECKSUM_AT), 0xffff_fff9);
    }

    #[test]
    fn parses_the_fields() {
        let bytes = footer(3, b"win ", 10 << 20, (300, 4, 17), 512);
        let parsed = valid(&bytes);
        assert_eq!(parsed.disk_type().unwrap(), DiskType::Dynamic);
        assert_eq!(parsed.data_offset, 512);
        assert_eq!(parsed.current_size, 10 << 20);
        assert_eq!(parsed.geometry, (300, 4, 17));
        assert_eq!(&parsed.creator_app, b"win ");
        parsed.check_version().unwrap();
    }

    #[test]
    fn flipped_byte_breaks_the_checksum() {
        let mut bytes = footer(2, b"qem2", 1 << 20, (65535, 16, 255), u64::MAX);
        bytes[100] ^= 1;
        assert!(matches!(parse(&bytes, 0), FooterCheck::BadChecksum { .. }));
        bytes[0] = b'C';
        assert!(matches!(parse(&bytes, 0), FooterCheck::NoCookie));
    }

    #[test]
    fn virtual_pc_and_old_qemu_are_sized_by_geometry() {
        // 20 × 16 × 63 sectors = 10 321 920 bytes, less than the 10 MiB current size.
        for app in [b"vpc ", b"qemu"] {
            let parsed = valid(&footer(2, app, 10 << 20, (20, 16, 63), u64::MAX));
            assert_eq!(parsed.virtual_size().unwrap(), 20 * 16 * 63 * 512);
        }
    }

    #[test]
    fn other_creators_are_sized_by_current_size() {
        for app in [b"qem2", b"win ", b"d2v ", b"wa\0\0", b"xyz "] {
            let parsed = valid(&footer(2, app, 10 << 20, (20, 16, 63), u64::MAX));
            assert_eq!(parsed.virtual_size().unwrap(), 10 << 20, "{app:?}");
        }
    }

    #[test]
    fn maximum_geometry_means_current_size_even_for_qemu() {
        let parsed = valid(&footer(2, b"qemu", 3 << 40, (65535, 16, 255), u64::MAX));
        assert!(parsed.virtual_size().is_err(), "3 TiB is over the limit");
        let parsed = valid(&footer(2, b"qemu", 200 << 30, (65535, 16, 255), u64::MAX));
        assert_eq!(parsed.virtual_size().unwrap(), 200 << 30);
    }

    #[test]
    fn size_over_2040_gib_is_refused() {
        let parsed = valid(&footer(2, b"win ", MAX_VIRTUAL_SIZE + 512, (1, 1, 1), 0));
        match parsed.virtual_size().unwrap_err() {
            Error::CorruptImage { message, offset } => {
                assert!(message.contains("2040 GiB"), "{message}");
                assert_eq!(offset, Some(0));
            }
            other => panic!("{other:?}"),
        }
        let parsed = valid(&footer(2, b"win ", MAX_VIRTUAL_SIZE, (1, 1, 1), 0));
        assert_eq!(parsed.virtual_size().unwrap(), MAX_VIRTUAL_SIZE);
    }

    #[test]
    fn blktap_sizes_over_8_tib_are_refused_whatever_the_footer_says() {
        // blktap's VHDs may pass 2040 GiB; the reader's block table bounds them instead.
        for size in [MAX_BLKTAP_VIRTUAL_SIZE + 512, u64::MAX / 512 * 512] {
            let parsed = valid(&footer(3, b"tap\0", size, (65535, 16, 255), 512));
            let message = parsed.virtual_size().unwrap_err().to_string();
            assert!(message.contains("beyond the 8 TiB"), "{message}");
        }
        let parsed = valid(&footer(
            3,
            b"tap\0",
            MAX_BLKTAP_VIRTUAL_SIZE,
            (65535, 16, 255),
            512,
        ));
        assert_eq!(parsed.virtual_size().unwrap(), MAX_BLKTAP_VIRTUAL_SIZE);
    }

    #[test]
    fn current_size_not_whole_sectors_is_refused() {
        let parsed = valid(&footer(2, b"win ", (1 << 20) + 100, (1, 1, 1), 0));
        let message = parsed.virtual_size().unwrap_err().to_string();
        assert!(message.contains("multiple of 512"), "{message}");
    }

    #[test]
    fn unknown_disk_type_and_version_are_refused() {
        let mut bytes = footer(5, b"win ", 1 << 20, (1, 1, 1), 0);
        let message = valid(&bytes).disk_type().unwrap_err().to_string();
        assert!(message.contains("unknown disk type 5"), "{message}");
        bytes = footer(2, b"win ", 1 << 20, (1, 1, 1), 0);
        bytes[AT_VERSION..AT_VERSION + 4].copy_from_slice(&0x0002_0000u32.to_be_bytes());
        reseal(&mut bytes);
        match valid(&bytes).check_version().unwrap_err() {
            Error::UnsupportedImage { message } => assert!(message.contains("2.0"), "{message}"),
            other => panic!("{other:?}"),
        }
    }
}
