//! The vhd-util-encrypted VHD that IBM Cloud classic imports: a dynamic VHD laid out the way
//! blktap's `vhd-util copy -k` makes one, with the data sectors encrypted with AES-XTS "plain".
//!
//! # What is written
//!
//! A dynamic VHD as libvhd creates it (blktap `libvhd.c` `vhd_initialize_footer`,
//! `vhd_initialize_header`, `vhd_create_batmap`): footer copy at 0; dynamic header at 512
//! (block size 2 MiB); the BAT at 1536 (one big-endian sector number per block, `0xFFFFFFFF`
//! unallocated, padded to a sector with zeros); the batmap header after the BAT, the batmap after
//! it; then the blocks; the footer at the end. Creator `tap\0` version 1.3, so blktap (and qemu)
//! know it has a batmap and size it by `current_size`. The batmap header carries the key hash
//! `{cookie 1, nonce 0³², SHA-256(nonce ‖ key)}`, what `vhd-util key -p` prints and what
//! tapdisk checks before it decrypts.
//!
//! # Which blocks, which sectors
//!
//! A block is allocated when the copy finds a non-zero byte in it: the pipeline reads the
//! blocks of the source's allocated ranges and places ([`Allocator`]) those that are not all
//! zeros, in guest order, each right after the previous one in the file (so a block the
//! source allocates but fills with zeros is not stored either). The others stay unallocated,
//! so the output is sparse and **reveals which 2 MiB blocks of the disk are in use** (also
//! readable from the plaintext BAT). Every sector of an allocated block is
//! encrypted, its bitmap is all ones and its batmap bit set: tapdisk then decrypts exactly what
//! was encrypted. (`vhd-util copy` encrypts only the sectors present in its source's bitmap but
//! marks the whole block present, so a guest reads garbage where the source had none.)
//!
//! Each block's data starts on a 4096-byte boundary of the file, the bitmap sector just before
//! it and the gap before the bitmap left as a hole, as libvhd itself allocates blocks
//! (`__vhd_io_allocate_block`: "data region of segment should begin on page boundary"); the
//! pipeline can then write the payload with `O_DIRECT`.
//!
//! The cipher is AES-128-XTS for a 32-byte key and AES-256-XTS for a 64-byte one
//! (`drivers/crypto/xts_aes.c`), one XTS data unit per 512-byte sector, the tweak the guest
//! sector number modulo 2³² little-endian (`xts_aes.h`, "plain"): [`Extent::first_iv`] is the
//! guest sector, truncated by the pipeline's `IvMode::Plain`.
//!
//! # Virtual size
//!
//! Rounded **up to whole 2 MiB blocks**, as `vhd-util copy` does (it creates its output with
//! `vhd_create(curr_size, …, mbytes = curr_size)`) and as XenServer sizes its VHDs; the guest
//! sees the source followed by zeros up to the next 2 MiB. (A GPT disk's backup header is then
//! no longer in the last sector; partitioning tools offer to move it.) qemu-img and tapdisk
//! report the rounded size. Any source size works, including odd ones whose last block holds
//! data (where `vhd-util copy` fails).
//!
//! # Limits and memory
//!
//! At most 8 TiB of virtual size (2²² blocks, what the reader holds), and all block data below
//! 2 TiB of file offset (BAT entries are 32-bit sector numbers; libvhd refuses beyond). qemu
//! opens only VHDs up to 2040 GiB; blktap has no such limit. The output keeps the BAT in
//! memory as the copy fills it (4 bytes per block of virtual size: 16 MiB at the 8 TiB limit,
//! 4 MiB for a 2 TiB disk), and [`Container::write_metadata`] writes it in 1 MiB pieces and the
//! batmap (at most 512 KiB) whole.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use imgcrypt_proto::keyfile::{KeyFileError, RAW_KEY_AES128, RAW_KEY_AES256};

use super::{Allocator, Container, Extent, Payload};
use crate::formats::vhd::batmap::{self, KeyHash};
use crate::formats::vhd::footer::{checksum, COOKIE as FOOTER_COOKIE, FOOTER_SIZE};
use crate::keys::fingerprint::vhd_key_hash;
use crate::keys::SecretBytes;
use crate::{Error, Result};

/// blktap's only block size (`VHD_BLOCK_SIZE`).
pub const BLOCK_SIZE: u64 = 2 << 20;

/// Largest virtual size written: 2²² blocks.
pub const MAX_VIRTUAL_SIZE: u64 = (1 << 22) * BLOCK_SIZE;

const SECTOR: u64 = 512;
/// The sector bitmap of a 2 MiB block: 4096 bits, exactly one sector.
const BITMAP_BYTES: usize = 512;
/// File alignment of each block's data.
const DATA_ALIGNMENT: u64 = 4096;
const HEADER_AT: u64 = 512;
const HEADER_SIZE: usize = 1024;
const TABLE_AT: u64 = 1536;
/// Footer and header format versions (1.0).
const FORMAT_VERSION: u32 = 0x0001_0000;
/// `VHD_CURRENT_VERSION` of blktap: 1.3.
const CREATOR_VERSION: u32 = 0x0001_0003;
const DYNAMIC: u32 = 3;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
const VHD_EPOCH: u64 = 946_684_800;
/// BAT bytes converted per write.
const TABLE_CHUNK: usize = 1 << 20;
const UNALLOCATED: u32 = 0xFFFF_FFFF;

/// The cipher a raw key of `len` bytes selects, as blktap names it.
pub fn cipher_name(len: usize) -> &'static str {
    if len == RAW_KEY_AES128 {
        "aes-xts-plain (AES-128-XTS)"
    } else {
        "aes-xts-plain (AES-256-XTS)"
    }
}

/// Guest bytes after which blktap's 32-bit tweak ("plain": the sector number modulo 2³²)
/// repeats: 2 TiB.
pub const TWEAK_WRAP_BYTES: u64 = (1 << 32) * SECTOR;

/// What the user must know about a VHD of `virtual_size` bytes whose tweaks repeat, if any:
/// sectors 2 TiB apart share a tweak, so equal 16-byte plaintext blocks at the same place in
/// two such sectors have equal ciphertext. blktap's format, not a choice: dm-crypt's `plain`
/// has the same limit, which is why it recommends `plain64`.
pub fn tweak_reuse_notice(virtual_size: u64) -> Option<String> {
    (virtual_size > TWEAK_WRAP_BYTES).then(|| {
        format!(
            "this VHD's disk is {virtual_size} bytes, over 2 TiB: blktap's tweak is the sector \
             number modulo 2^32, so sectors 2 TiB apart are encrypted with the same tweak and \
             equal 16-byte blocks at the same place in them show as equal ciphertext; keep \
             disks for --format vhd under 2 TiB (IBM Cloud classic imports far smaller ones), \
             or use --format qcow2 or luks (64-bit IVs)"
        )
    })
}

/// Checks a raw vhd-util key: 32 or 64 bytes, halves not equal (AES-XTS refuses equal halves).
pub fn check_raw_key(raw_key: &[u8]) -> Result<()> {
    let len = raw_key.len();
    if len != RAW_KEY_AES128 && len != RAW_KEY_AES256 {
        return Err(KeyFileError::RawKeyLength { len }.into());
    }
    let (first, second) = raw_key.split_at(len / 2);
    if first == second {
        return Err(KeyFileError::RawKeyHalvesEqual.into());
    }
    Ok(())
}

/// An encrypted VHD: its blocks placed as the copy reaches them, the metadata around them.
#[derive(Debug)]
pub struct VhdOutput {
    virtual_size: u64,
    key_hash: KeyHash,
    /// End of the batmap: where blocks may start.
    metadata_end: u64,
    state: Mutex<State>,
    uuid: [u8; 16],
    timestamp: u32,
}

/// What the copy has placed so far.
#[derive(Debug)]
struct State {
    /// One entry per block: the sector of its bitmap, or [`UNALLOCATED`].
    bat: Vec<u32>,
    blocks: u64,
    /// Where the next block's bitmap may start.
    next_free: u64,
    reserved: super::ReservedSpace,
}

impl VhdOutput {
    /// A VHD for a source of `source_size` bytes, encrypted with `raw_key` (32 or 64 bytes), its
    /// blocks to be placed by the copy.
    pub fn new(source_size: u64, raw_key: &[u8]) -> Result<Self> {
        check_raw_key(raw_key)?;
        let virtual_size = source_size.next_multiple_of(BLOCK_SIZE);
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "a {source_size}-byte source does not fit a vhd-util VHD: the VHD output \
                     holds 2 MiB to 8 TiB (and IBM Cloud classic less; see the target's limits)"
                ),
            });
        }
        let entries = virtual_size / BLOCK_SIZE;
        // Below 2^22: fits.
        let entries_u32 = entries as u32;
        let map_at = batmap::header_offset(TABLE_AT, entries_u32) + batmap::HEADER_SIZE as u64;
        let metadata_end = map_at + u64::from(batmap::map_sectors(entries_u32)) * SECTOR;

        let nonce = [0u8; 32];
        let key_hash = KeyHash {
            nonce,
            hash: vhd_key_hash(&nonce, raw_key)?,
        };
        let random = SecretBytes::random(16)?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(random.as_bytes());
        // RFC 4122 version 4 (random), as libuuid's `uuid_generate` makes.
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let timestamp = now.saturating_sub(VHD_EPOCH) as u32;
        Ok(Self {
            virtual_size,
            key_hash,
            metadata_end,
            state: Mutex::new(State {
                bat: vec![UNALLOCATED; entries as usize],
                blocks: 0,
                next_free: metadata_end,
                reserved: super::ReservedSpace::default(),
            }),
            uuid,
            timestamp,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the first block's data starts (or would): the summary's data offset.
    pub fn data_offset(&self) -> u64 {
        (self.metadata_end + SECTOR).next_multiple_of(DATA_ALIGNMENT)
    }

    /// The disk size the VHD declares (the source's, rounded up to 2 MiB).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Payload bytes stored: whole allocated blocks.
    pub fn allocated_bytes(&self) -> u64 {
        self.state().blocks * BLOCK_SIZE
    }

    /// Bytes [`Container::write_metadata`] writes: footers, header, BAT, batmap, bitmaps.
    pub fn metadata_bytes(&self) -> u64 {
        let table = (self.entries() * 4).next_multiple_of(SECTOR);
        let map = u64::from(batmap::map_sectors(self.entries() as u32)) * SECTOR;
        2 * FOOTER_SIZE as u64
            + HEADER_SIZE as u64
            + table
            + batmap::HEADER_SIZE as u64
            + map
            + self.state().blocks * BITMAP_BYTES as u64
    }

    /// The key hash stored in the batmap header.
    pub fn key_hash(&self) -> &KeyHash {
        &self.key_hash
    }

    fn entries(&self) -> u64 {
        self.virtual_size / BLOCK_SIZE
    }

    fn footer(&self) -> [u8; FOOTER_SIZE] {
        let mut bytes = [0u8; FOOTER_SIZE];
        bytes[..8].copy_from_slice(FOOTER_COOKIE);
        // Features: "reserved", which the specification says must always be set.
        put_u32(&mut bytes, 8, 2);
        put_u32(&mut bytes, 12, FORMAT_VERSION);
        put_u64(&mut bytes, 16, HEADER_AT);
        put_u32(&mut bytes, 24, self.timestamp);
        bytes[28..32].copy_from_slice(b"tap\0");
        put_u32(&mut bytes, 32, CREATOR_VERSION);
        // Creator host OS: libvhd writes 0.
        put_u64(&mut bytes, 40, self.virtual_size);
        put_u64(&mut bytes, 48, self.virtual_size);
        put_u32(&mut bytes, 56, geometry(self.virtual_size));
        put_u32(&mut bytes, 60, DYNAMIC);
        bytes[68..84].copy_from_slice(&self.uuid);
        let sum = checksum(&bytes, 64);
        put_u32(&mut bytes, 64, sum);
        bytes
    }

    fn header(&self) -> [u8; HEADER_SIZE] {
        let mut bytes = [0u8; HEADER_SIZE];
        bytes[..8].copy_from_slice(b"cxsparse");
        put_u64(&mut bytes, 8, u64::MAX);
        put_u64(&mut bytes, 16, TABLE_AT);
        put_u32(&mut bytes, 24, FORMAT_VERSION);
        put_u32(&mut bytes, 28, self.entries() as u32);
        put_u32(&mut bytes, 32, BLOCK_SIZE as u32);
        let sum = checksum(&bytes, 36);
        put_u32(&mut bytes, 36, sum);
        bytes
    }

    fn write_table(&self, bat: &[u32], output: &File) -> Result<()> {
        let entries = self.entries();
        let table_bytes = (entries * 4).next_multiple_of(SECTOR);
        let mut chunk = vec![0u8; TABLE_CHUNK.min(table_bytes as usize)];
        let mut written = 0u64;
        while written < table_bytes {
            let length = (table_bytes - written).min(chunk.len() as u64) as usize;
            let piece = &mut chunk[..length];
            for (slot, raw) in piece.chunks_exact_mut(4).enumerate() {
                let index = written / 4 + slot as u64;
                // Past the entries, the sector's padding: zeros, as libvhd leaves it.
                let entry = bat.get(index as usize).copied().unwrap_or(0);
                raw.copy_from_slice(&entry.to_be_bytes());
            }
            write_at(output, piece, TABLE_AT + written, "block allocation table")?;
            written += length as u64;
        }
        Ok(())
    }

    fn write_batmap(&self, bat: &[u32], output: &File) -> Result<()> {
        let entries = self.entries() as u32;
        let header_at = batmap::header_offset(TABLE_AT, entries);
        let map_at = header_at + batmap::HEADER_SIZE as u64;
        let map_sectors = batmap::map_sectors(entries);
        let mut map = vec![0u8; map_sectors as usize * SECTOR as usize];
        for (block, _) in bat
            .iter()
            .enumerate()
            .filter(|(_, &entry)| entry != UNALLOCATED)
        {
            batmap::set_bit(&mut map, block as u64);
        }
        // The whole map is written (libvhd would leave its last sector unwritten for sizes
        // just above a multiple of 8 GiB), but the checksum covers what libvhd checks.
        let checked = (batmap::checksummed_bytes(self.virtual_size) as usize).min(map.len());
        let header = batmap::Header {
            map_offset: map_at,
            map_sectors,
            version: batmap::VERSION,
            checksum: batmap::checksum(&map[..checked], batmap::VERSION),
            key_hash: Some(self.key_hash),
        };
        write_at(output, &map, map_at, "batmap")?;
        write_at(output, &batmap::build(&header), header_at, "batmap header")
    }
}

impl Allocator for VhdOutput {
    fn granule(&self) -> u64 {
        BLOCK_SIZE
    }

    /// The virtual size: whole blocks, so every block is encrypted whole.
    fn payload_end(&self) -> u64 {
        self.virtual_size
    }

    /// Each block of `run` after the previous one: its bitmap sector, then its data on the
    /// next 4096-byte boundary.
    fn place(&self, run: Range<u64>, output: &File, placed: &mut Vec<Extent>) -> Result<()> {
        let mut state = self.state();
        let end = run.end.min(self.virtual_size);
        if run.start % BLOCK_SIZE != 0 || run.start >= end {
            return Err(Error::io(
                "placing the VHD output's blocks",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("run {run:?} is empty or not aligned to the 2 MiB block"),
                ),
            ));
        }
        for block in run.start / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE) {
            if state.bat[block as usize] != UNALLOCATED {
                return Err(Error::io(
                    "placing the VHD output's blocks",
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("block {block} was placed twice"),
                    ),
                ));
            }
            // The bitmap sector sits just before the aligned data.
            let data_at = (state.next_free + SECTOR).next_multiple_of(DATA_ALIGNMENT);
            let bitmap_sector = data_at / SECTOR - 1;
            let Ok(entry) = u32::try_from(bitmap_sector) else {
                return Err(Error::UnsupportedImage {
                    message: format!(
                        "the source holds data in more 2 MiB blocks than a VHD can place: \
                         block {block} would start past 2 TiB of the file, beyond the reach \
                         of its 32-bit block allocation table; write a smaller disk or \
                         trim its free space first"
                    ),
                });
            };
            state.bat[block as usize] = entry;
            state.blocks += 1;
            placed.push(Extent {
                guest_offset: block * BLOCK_SIZE,
                length: BLOCK_SIZE,
                output_offset: data_at,
                first_iv: block * BLOCK_SIZE / SECTOR,
            });
            state.next_free = data_at + BLOCK_SIZE;
        }
        let required = state.next_free + FOOTER_SIZE as u64;
        let end = state.next_free;
        state.reserved.cover(output, end, required)
    }
}

impl Container for VhdOutput {
    fn payload(&self) -> Payload<'_> {
        Payload::Allocated(self)
    }

    fn output_size(&self) -> u64 {
        self.state().next_free + FOOTER_SIZE as u64
    }

    /// Bitmaps, BAT, batmap, then the dynamic header and the two footers: until the footers
    /// are written the file is not a VHD, so an interrupted job leaves nothing a reader takes
    /// for one.
    fn write_metadata(&self, output: &File) -> Result<()> {
        let state = self.state();
        super::ReservedSpace::cut(output, state.next_free + FOOTER_SIZE as u64)?;
        let bitmap = [0xffu8; BITMAP_BYTES];
        for &entry in state.bat.iter().filter(|&&entry| entry != UNALLOCATED) {
            write_at(
                output,
                &bitmap,
                u64::from(entry) * SECTOR,
                "a block's sector bitmap",
            )?;
        }
        self.write_table(&state.bat, output)?;
        self.write_batmap(&state.bat, output)?;
        write_at(output, &self.header(), HEADER_AT, "dynamic disk header")?;
        let footer = self.footer();
        write_at(output, &footer, 0, "footer copy")?;
        write_at(output, &footer, state.next_free, "footer")
    }
}

/// CHS geometry as libvhd's `vhd_chs` (the VHD specification's algorithm) computes it, encoded
/// as cylinders << 16 | heads << 8 | sectors per track.
///
/// Including its quirk: libvhd counts the sectors in a `uint32_t` (`secs_round_up_no_zero`), so
/// above 2 TiB the count wraps (2 TiB + 32 MiB gets the geometry of 32 MiB, as the corpus shows).
/// Nothing reads a `tap` VHD's geometry for its size (qemu and tapdisk use `current_size`), and
/// matching vhd-util keeps the footer what IBM's tooling has always seen.
fn geometry(size: u64) -> u32 {
    let sectors = u64::from((size.div_ceil(SECTOR) as u32).max(1)).min(65535 * 16 * 255);
    let (spt, heads, cylinder_times_heads) = if sectors >= 65535 * 16 * 63 {
        (255, 16, sectors / 255)
    } else {
        let mut spt = 17;
        let mut cth = sectors / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            cth = sectors / spt;
            heads = 16;
        }
        if cth >= heads * 1024 {
            spt = 63;
            cth = sectors / spt;
            heads = 16;
        }
        (spt, heads, cth)
    };
    let cylinders = cylinder_times_heads / heads;
    ((cylinders as u32) << 16) | ((heads as u32) << 8) | spt as u32
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

fn write_at(output: &File, bytes: &[u8], offset: u64, what: &str) -> Result<()> {
    output.write_all_at(bytes, offset).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            Error::NoSpace {
                required_bytes: offset + bytes.len() as u64,
                message: format!(
                    "not enough space for the output while writing the VHD's {what} at offset \
                     {offset}; free space or write it to another filesystem"
                ),
            }
        } else {
            Error::io(
                format!(
                    "writing the VHD's {what} ({} bytes) at offset {offset} of the output",
                    bytes.len()
                ),
                e,
            )
        }
    })
}

#[cfg(test)]
mod tests;
