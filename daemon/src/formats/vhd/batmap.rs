//! blktap's batmap: a bitmap of "fully allocated" blocks that blktap keeps after a dynamic VHD's
//! block allocation table, and whose header holds the key hash of an encrypted VHD.
//!
//! Layout (blktap `include/vhd.h` `struct dd_batmap_hdr`, `libvhd.c`; all big-endian): the
//! 512-byte header sits at `table_offset + roundup512(4 × max_table_entries)`
//! (`vhd_batmap_header_offset`) and holds the cookie `tdbatmap` at 0, the map's file offset
//! (u64) at 8, its size in sectors (u32) at 16, the batmap version (u32, 1.2 today) at 20, the
//! map's checksum (u32) at 24, a marker byte at 28, and the key hash
//! `{u8 cookie = 1; u8 nonce[32]; u8 hash[32]}` at 29. The map follows the header and has one
//! bit per block, most significant bit first (`libvhd.h` `test_bit`).
//!
//! A VHD has a batmap when blktap made it (creator `tap`) with creator version 1.2 or later, or
//! 1.1 when the header is there (`libvhd.c` `vhd_has_batmap`). The checksum is the one's
//! complement of the sum of the map's bytes, but over `roundup512(current_size >> 24)` bytes
//! only (at least 512), which for disk sizes just above a multiple of 8 GiB is one sector less
//! than the map: libvhd never reads, writes or checks that last sector (`vhd_checksum_batmap`,
//! `vhd_read_batmap_map`, `vhd_write_batmap`).

use super::footer::{be_u32, be_u64, Footer};

/// Size of the batmap header.
pub const HEADER_SIZE: usize = 512;

/// The header's cookie.
pub const COOKIE: &[u8; 8] = b"tdbatmap";

/// Batmap version blktap writes (1.2: unsigned checksum).
pub const VERSION: u32 = 0x0001_0002;

/// Batmap version 1.1 summed the map's bytes as signed chars.
const VERSION_SIGNED_CHECKSUM: u32 = 0x0001_0001;

pub(crate) const MAP_OFFSET_AT: usize = 8;
pub(crate) const MAP_SECTORS_AT: usize = 16;
pub(crate) const VERSION_AT: usize = 20;
pub(crate) const CHECKSUM_AT: usize = 24;
/// Where `struct vhd_keyhash` starts: its cookie byte, then the nonce, then the hash.
pub(crate) const KEYHASH_AT: usize = 29;
const NONCE_AT: usize = KEYHASH_AT + 1;
const HASH_AT: usize = NONCE_AT + 32;

/// The key-hash cookie blktap sets on an encrypted VHD.
pub const KEYHASH_COOKIE: u8 = 1;

/// An encrypted VHD's key hash: SHA-256(nonce ‖ key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHash {
    /// The nonce hashed before the key (`vhd-util copy` leaves it zero).
    pub nonce: [u8; 32],
    /// SHA-256(nonce ‖ key).
    pub hash: [u8; 32],
}

impl KeyHash {
    /// The hash as `vhd-util key -C` prints it: 64 lower-case hex digits.
    pub fn hash_hex(&self) -> String {
        hex(&self.hash)
    }

    /// The nonce as `vhd-util key -p` prints it.
    pub fn nonce_hex(&self) -> String {
        hex(&self.nonce)
    }
}

/// Lower-case hex, as vhd-util prints hashes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A VHD footer's unique id as vhd-util prints it: 8-4-4-4-12 lower-case hex digits, in the
/// order the bytes are stored.
pub(crate) fn uuid_text(uuid: &[u8; 16]) -> String {
    let hex = hex(uuid);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A batmap header whose cookie is right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Where the map starts in the file.
    pub map_offset: u64,
    /// The map's size in sectors.
    pub map_sectors: u32,
    /// Batmap version.
    pub version: u32,
    /// The stored checksum.
    pub checksum: u32,
    /// The key hash, when its cookie says one is set.
    pub key_hash: Option<KeyHash>,
}

/// Where the batmap header of a disk with this BAT lies (`vhd_batmap_header_offset`).
pub fn header_offset(table_offset: u64, max_table_entries: u32) -> u64 {
    table_offset + (u64::from(max_table_entries) * 4).next_multiple_of(512)
}

/// Sectors blktap gives the map of a disk of `max_table_entries` blocks (`vhd_create_batmap`).
pub fn map_sectors(max_table_entries: u32) -> u32 {
    let bytes = u64::from(max_table_entries).div_ceil(8);
    // At most 2^32 / 8 / 512 + 1 sectors: fits.
    bytes.div_ceil(512).max(1) as u32
}

/// Bytes of the map that libvhd reads, writes and checksums for a disk of `current_size` bytes
/// (`roundup512(current_size >> 24)`, at least one sector).
pub fn checksummed_bytes(current_size: u64) -> u64 {
    (current_size >> 24).div_ceil(512).max(1) * 512
}

/// The checksum of `map` (the bytes libvhd checks) for a batmap of `version`.
pub fn checksum(map: &[u8], version: u32) -> u32 {
    let sum = map.iter().fold(0u32, |sum, &byte| {
        let value = if version == VERSION_SIGNED_CHECKSUM {
            // Sign-extended, as blktap's `(uint32_t)blob[i]` of a `char` was.
            i32::from(byte as i8) as u32
        } else {
            u32::from(byte)
        };
        sum.wrapping_add(value)
    });
    !sum
}

/// Whether blktap keeps a batmap in this VHD (`vhd_has_batmap`); `None` when only the header's
/// presence can tell (creator version 1.1).
pub fn expected(footer: &Footer) -> Option<bool> {
    let dynamic = matches!(footer.disk_type, 3 | 4);
    if !dynamic || !footer.made_by_blktap() || footer.creator_version <= 0x0000_0001 {
        Some(false)
    } else if footer.creator_version >= 0x0001_0002 {
        Some(true)
    } else {
        None
    }
}

/// Parses the 512 bytes at the batmap header's place; `None` without the cookie.
pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Option<Header> {
    if &bytes[..8] != COOKIE {
        return None;
    }
    let key_hash = (bytes[KEYHASH_AT] == KEYHASH_COOKIE).then(|| {
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&bytes[NONCE_AT..NONCE_AT + 32]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[HASH_AT..HASH_AT + 32]);
        KeyHash { nonce, hash }
    });
    Some(Header {
        map_offset: be_u64(bytes, MAP_OFFSET_AT),
        map_sectors: be_u32(bytes, MAP_SECTORS_AT),
        version: be_u32(bytes, VERSION_AT),
        checksum: be_u32(bytes, CHECKSUM_AT),
        key_hash,
    })
}

/// A batmap header as blktap writes it.
pub fn build(header: &Header) -> [u8; HEADER_SIZE] {
    let mut bytes = [0u8; HEADER_SIZE];
    bytes[..8].copy_from_slice(COOKIE);
    bytes[MAP_OFFSET_AT..MAP_OFFSET_AT + 8].copy_from_slice(&header.map_offset.to_be_bytes());
    bytes[MAP_SECTORS_AT..MAP_SECTORS_AT + 4].copy_from_slice(&header.map_sectors.to_be_bytes());
    bytes[VERSION_AT..VERSION_AT + 4].copy_from_slice(&header.version.to_be_bytes());
    bytes[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&header.checksum.to_be_bytes());
    if let Some(key_hash) = &header.key_hash {
        bytes[KEYHASH_AT] = KEYHASH_COOKIE;
        bytes[NONCE_AT..NONCE_AT + 32].copy_from_slice(&key_hash.nonce);
        bytes[HASH_AT..HASH_AT + 32].copy_from_slice(&key_hash.hash);
    }
    bytes
}

/// Sets the bit of `block` in `map` (most significant bit first).
pub fn set_bit(map: &mut [u8], block: u64) {
    map[(block / 8) as usize] |= 0x80 >> (block % 8);
}

/// Whether the bit of `index` is set in `map` (most significant bit first); bits past the map
/// read as clear.
pub fn test_bit(map: &[u8], index: u64) -> bool {
    map.get((index / 8) as usize)
        .is_some_and(|byte| byte & (0x80 >> (index % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_sizes_follow_libvhd() {
        // Small disks: BAT at 1536, header at 2048 (corpus encA/encB/encD).
        assert_eq!(header_offset(1536, 2), 2048);
        assert_eq!(header_offset(1536, 128), 2048);
        assert_eq!(header_offset(1536, 129), 2560);
        // 2 TiB + 32 MiB (corpus encC): 1048592 entries.
        assert_eq!(header_offset(1536, 1_048_592), 4_196_352);
        assert_eq!(map_sectors(1_048_592), 257);
        assert_eq!(map_sectors(1), 1);
        assert_eq!(map_sectors(4096), 1);
        assert_eq!(map_sectors(4097), 2);
        // libvhd's checksummed part: one sector less than the map just above 2 TiB (encE).
        assert_eq!(checksummed_bytes((2 << 40) + (4 << 20)), 256 * 512);
        assert_eq!(map_sectors(1_048_578), 257);
        assert_eq!(checksummed_bytes((2 << 40) + (32 << 20)), 257 * 512);
        assert_eq!(checksummed_bytes(4 << 20), 512);
    }

    #[test]
    fn bits_are_most_significant_first_and_checksums_are_ones_complement() {
        let mut map = [0u8; 512];
        set_bit(&mut map, 0);
        set_bit(&mut map, 2);
        // Corpus encB: blocks 0 and 2 allocated → 0xa0, checksum 0xffffff5f.
        assert_eq!(map[0], 0xa0);
        assert_eq!(checksum(&map, VERSION), 0xffff_ff5f);
        assert!(test_bit(&map, 2) && !test_bit(&map, 1) && !test_bit(&map, 1 << 20));
        // Version 1.1 summed signed chars.
        assert_eq!(
            checksum(&[0x80], VERSION_SIGNED_CHECKSUM),
            !(-128i32 as u32)
        );
    }

    #[test]
    fn headers_round_trip() {
        let header = Header {
            map_offset: 2560,
            map_sectors: 1,
            version: VERSION,
            checksum: 0xffff_ffbf,
            key_hash: Some(KeyHash {
                nonce: [0; 32],
                hash: [0x15; 32],
            }),
        };
        let bytes = build(&header);
        assert_eq!(bytes[KEYHASH_AT], 1);
        assert_eq!(parse(&bytes), Some(header));
        assert_eq!(parse(&[0u8; HEADER_SIZE]), None);
    }
}
