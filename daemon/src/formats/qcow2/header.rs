//! The qcow2 header and its extensions: parsed, and checked against the file before anything
//! they point to is read.
//!
//! Field layout (big-endian) from qemu's `docs/interop/qcow2.txt` and `block/qcow2.h`
//! (`QCowHeader`): v2 has the first 72 bytes; v3 adds feature bits, the refcount order and the
//! header length (104, or 112 with the compression type byte and padding). Extensions follow
//! the header (from `header_length` in v3, from byte 72 in v2) up to the end of the first
//! cluster: `u32 type, u32 length`, data padded to 8 bytes, ended by type 0.

use std::fs::File;

use super::{
    CRYPT_AES, CRYPT_LUKS, CRYPT_NONE, EXT_BACKING_FORMAT, EXT_CRYPTO_HEADER, EXT_DATA_FILE,
    EXT_END, MAGIC,
};
use crate::formats::read_exact_at;
use crate::{Error, Result};

/// Smallest and largest cluster size qemu accepts (`MIN_CLUSTER_BITS`, `MAX_CLUSTER_BITS`).
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;

/// Bytes of a v2 header.
const V2_HEADER_LENGTH: u32 = 72;
/// Bytes of the fixed v3 header.
const V3_MIN_HEADER_LENGTH: u32 = 104;

/// Incompatible feature bits (`QCOW2_INCOMPAT_*`).
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Longest backing file name qemu accepts (`block/qcow2.c`: "Backing file name too long").
const MAX_BACKING_NAME: u32 = 1023;

/// Size of qemu's buffer for the backing format name (`bs->backing_format`), NUL included.
const MAX_BACKING_FORMAT: u64 = 16;

/// `compression_type` values (the byte at 104 of a v3 header of 105 bytes or more).
pub const COMPRESSION_ZLIB: u8 = 0;
/// zstd, qemu 5.1+ (`-o compression_type=zstd`).
pub const COMPRESSION_ZSTD: u8 = 1;

/// Largest LUKS header region we copy into memory (LUKS1 headers are about 2 MiB).
const MAX_CRYPTO_HEADER_BYTES: u64 = 16 << 20;

/// Largest refcount table qemu opens (`QCOW_MAX_REFTABLE_SIZE`, `block/qcow2.h`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// How the image's clusters are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// Not encrypted.
    None,
    /// qemu's LUKS: a LUKS1 header at `offset..offset + length` of the file.
    Luks {
        /// Byte offset of the LUKS header (cluster-aligned).
        offset: u64,
        /// Bytes of the LUKS header region.
        length: u64,
    },
}

/// What the header says, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest disk size in bytes.
    pub virtual_size: u64,
    /// L1 entries the header declares.
    pub l1_size: u32,
    /// Byte offset of the L1 table.
    pub l1_table_offset: u64,
    /// Internal snapshots (their tables are not read: only the active L1 is).
    pub snapshots: u32,
    /// Byte offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Bytes of the refcount table (at most [`MAX_REFTABLE_BYTES`]).
    pub refcount_table_bytes: u64,
    /// Encryption.
    pub encryption: Encryption,
    /// v3 incompatible feature bits.
    pub incompatible_features: u64,
    /// Extended L2 entries (`extended_l2=on`): 128-bit entries with a bitmap of 32 subclusters.
    pub extended_l2: bool,
    /// How compressed clusters are compressed ([`COMPRESSION_ZLIB`] unless the v3 header says
    /// otherwise).
    pub compression_type: u8,
    /// The backing file's name as the image records it (not resolved), if it has one.
    pub backing_file: Option<String>,
    /// The backing file's format as qemu names it (`qcow2`, `raw`, `vpc`...), if recorded.
    pub backing_format: Option<String>,
    /// The external data file's name as the image records it, when its guest data clusters are
    /// there (incompatible bit 2) rather than in the image's own file.
    pub data_file: Option<String>,
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn unsupported(message: String) -> Error {
    Error::UnsupportedImage { message }
}

/// Reads and checks the header and extensions of the qcow2 image `file` of `file_size` bytes.
pub fn parse(file: &File, file_size: u64) -> Result<Header> {
    if file_size < u64::from(V2_HEADER_LENGTH) {
        return Err(Error::corrupt(
            format!("truncated: a qcow2 header needs 72 bytes, the file has {file_size}"),
            Some(0),
        ));
    }
    let mut fixed = [0u8; V3_MIN_HEADER_LENGTH as usize];
    let fixed_len = (V3_MIN_HEADER_LENGTH as u64).min(file_size) as usize;
    read_exact_at(file, &mut fixed[..fixed_len], 0, "qcow2 header")?;
    if &fixed[..4] != MAGIC {
        return Err(Error::corrupt("no qcow2 magic at byte 0", Some(0)));
    }
    let version = be32(&fixed, 4);
    if version != 2 && version != 3 {
        return Err(unsupported(format!(
            "qcow2 version {version} is not supported (only 2 and 3 exist)"
        )));
    }
    let backing_file_offset = be64(&fixed, 8);
    let cluster_bits = be32(&fixed, 20);
    let virtual_size = be64(&fixed, 24);
    let crypt_method = be32(&fixed, 32);
    let l1_size = be32(&fixed, 36);
    let l1_table_offset = be64(&fixed, 40);
    let snapshots = be32(&fixed, 60);
    let refcount_table_offset = be64(&fixed, 48);
    let refcount_table_clusters = u64::from(be32(&fixed, 56));

    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Error::corrupt(
            format!(
                "cluster_bits is {cluster_bits}; qcow2 allows {MIN_CLUSTER_BITS} to \
                 {MAX_CLUSTER_BITS} (512 bytes to 2 MiB)"
            ),
            Some(20),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;

    let (header_length, incompatible, refcount_order) = if version == 3 {
        if fixed_len < V3_MIN_HEADER_LENGTH as usize {
            return Err(Error::corrupt(
                format!("truncated: a qcow2 v3 header needs 104 bytes, the file has {file_size}"),
                Some(0),
            ));
        }
        (be32(&fixed, 100), be64(&fixed, 72), be32(&fixed, 96))
    } else {
        (V2_HEADER_LENGTH, 0, 4)
    };
    if header_length
        < if version == 3 {
            V3_MIN_HEADER_LENGTH
        } else {
            V2_HEADER_LENGTH
        }
        || u64::from(header_length) > cluster_size
        || header_length % 8 != 0
    {
        return Err(Error::corrupt(
            format!(
                "header_length {header_length} is not a multiple of 8 between the fixed header \
                 and the {cluster_size}-byte cluster"
            ),
            Some(100),
        ));
    }
    // qemu refuses larger tables ("Reference count table too large"); the check also bounds
    // what `map::walk` reads of it for an encrypted image.
    if refcount_table_clusters * cluster_size > MAX_REFTABLE_BYTES {
        return Err(Error::corrupt(
            format!(
                "the refcount table is {refcount_table_clusters} clusters of {cluster_size} \
                 bytes, more than qemu's limit of {MAX_REFTABLE_BYTES} bytes"
            ),
            Some(56),
        ));
    }
    if refcount_order > 6 {
        return Err(Error::corrupt(
            format!("refcount_order {refcount_order} is above qcow2's maximum of 6"),
            Some(96),
        ));
    }

    let backing_file = if backing_file_offset != 0 {
        backing_name(file, file_size, cluster_size, backing_file_offset)?
    } else {
        None
    };
    let refuse = [
        (
            INCOMPAT_DIRTY,
            "is marked dirty: it was not closed cleanly (lazy refcounts), and its refcounts \
             may be stale, which qemu would repair on opening it; run `qemu-img check -r all \
             IMAGE` first, which repairs it and clears the bit",
        ),
        (
            INCOMPAT_CORRUPT,
            "is marked corrupt by qemu: repair it with `qemu-img check -r all` or restore a \
             good copy",
        ),
    ];
    for (bit, why) in refuse {
        if incompatible & bit != 0 {
            return Err(unsupported(format!("the qcow2 image {why}")));
        }
    }
    let known = INCOMPAT_DIRTY
        | INCOMPAT_CORRUPT
        | INCOMPAT_DATA_FILE
        | INCOMPAT_COMPRESSION
        | INCOMPAT_EXTL2;
    if incompatible & !known != 0 {
        return Err(unsupported(format!(
            "the qcow2 image has incompatible feature bits {:#x} this version does not know: \
             it needs a newer reader",
            incompatible & !known
        )));
    }

    // Extensions: between the header and the end of the first cluster (or of the file).
    let area_end = cluster_size.min(file_size);
    let mut area = vec![0u8; area_end as usize];
    read_exact_at(file, &mut area, 0, "qcow2 header cluster")?;
    let mut crypto: Option<(u64, u64)> = None;
    let mut data_file: Option<String> = None;
    let mut backing_format: Option<String> = None;
    let mut at = u64::from(header_length);
    loop {
        if at + 8 > area_end {
            return Err(Error::corrupt(
                "the header extensions run past the first cluster without an end marker",
                Some(at),
            ));
        }
        let kind = be32(&area, at as usize);
        let length = u64::from(be32(&area, at as usize + 4));
        let data = at + 8;
        if length > area_end - data {
            return Err(Error::corrupt(
                format!(
                    "header extension {kind:#010x} of {length} bytes runs past the first cluster"
                ),
                Some(at),
            ));
        }
        match kind {
            EXT_END => break,
            EXT_CRYPTO_HEADER => {
                if length != 16 {
                    return Err(Error::corrupt(
                        format!("the crypto header extension is {length} bytes, not 16"),
                        Some(at),
                    ));
                }
                crypto = Some((be64(&area, data as usize), be64(&area, data as usize + 8)));
            }
            EXT_DATA_FILE => {
                let name = &area[data as usize..(data + length) as usize];
                data_file = Some(String::from_utf8(name.to_vec()).map_err(|_| {
                    unsupported(format!(
                        "the external data file name {} is not UTF-8: rename the file and \
                         record the new name with `qemu-img amend -o data_file=NAME IMAGE`",
                        printable(name)
                    ))
                })?);
            }
            EXT_BACKING_FORMAT => {
                // qemu keeps it in a 16-byte buffer ("ext_backing_format: len=%u too large").
                if length >= MAX_BACKING_FORMAT {
                    return Err(Error::corrupt(
                        format!(
                            "the backing format extension is {length} bytes; qemu reads at                              most {} (a format name such as `qcow2`)",
                            MAX_BACKING_FORMAT - 1
                        ),
                        Some(at),
                    ));
                }
                let name = &area[data as usize..(data + length) as usize];
                backing_format = Some(String::from_utf8_lossy(name).into_owned());
            }
            // Feature names, bitmaps: nothing a reader of the active disk needs.
            _ => {}
        }
        at = data + length.div_ceil(8) * 8;
    }

    // qemu opens a data file only with the feature bit set, and then needs its name; a name
    // without the bit is ignored (`qcow2_do_open`).
    let data_file = if incompatible & INCOMPAT_DATA_FILE != 0 {
        let Some(name) = data_file else {
            return Err(unsupported(
                "the qcow2 image keeps its guest data in an external data file but does not \
                 record its name (qemu needs `-o data-file=...` to open it): make a standalone \
                 image with `qemu-img convert --image-opts \
                 driver=qcow2,file.filename=SRC,data-file.filename=DATA -O qcow2 STANDALONE.qcow2`"
                    .to_string(),
            ));
        };
        Some(name)
    } else {
        None
    };
    // qemu: "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes".
    if incompatible & INCOMPAT_EXTL2 != 0 && cluster_bits < 14 {
        return Err(Error::corrupt(
            format!("extended L2 entries with {cluster_size}-byte clusters (qemu needs 16 KiB)"),
            Some(20),
        ));
    }
    // qemu: with the compression bit the type byte must exist; without it the type is zlib.
    let compression_type = if incompatible & INCOMPAT_COMPRESSION != 0 {
        if header_length <= V3_MIN_HEADER_LENGTH {
            return Err(Error::corrupt(
                "the compression-type feature bit is set but the header has no \
                 compression_type byte",
                Some(72),
            ));
        }
        // The extension walk above already read past `header_length` (> 104).
        area.get(V3_MIN_HEADER_LENGTH as usize)
            .copied()
            .unwrap_or(COMPRESSION_ZLIB)
    } else {
        COMPRESSION_ZLIB
    };
    if compression_type > COMPRESSION_ZSTD {
        return Err(unsupported(format!(
            "qcow2 compression type {compression_type} is not one qemu defines (0 zlib, 1 zstd)"
        )));
    }

    let encryption = match (crypt_method, crypto) {
        (CRYPT_NONE, None) => Encryption::None,
        (CRYPT_NONE, Some(_)) => {
            return Err(Error::corrupt(
                "a crypto header extension in a qcow2 image that says it is not encrypted",
                Some(32),
            ))
        }
        (CRYPT_AES, _) => {
            return Err(unsupported(
                "the qcow2 image uses qemu's legacy AES-CBC encryption (encrypt.format=aes), \
                 which qemu itself no longer runs: convert it with qemu-img to a LUKS-encrypted \
                 qcow2 (encrypt.format=luks)"
                    .to_string(),
            ))
        }
        (CRYPT_LUKS, None) => {
            return Err(Error::corrupt(
                "the qcow2 image says it is LUKS-encrypted but has no crypto header extension",
                Some(32),
            ))
        }
        (CRYPT_LUKS, Some((offset, length))) => {
            if offset % cluster_size != 0 || offset == 0 {
                return Err(Error::corrupt(
                    format!(
                        "the LUKS header offset {offset} is not a multiple of the \
                         {cluster_size}-byte cluster (or is the header cluster)"
                    ),
                    Some(header_length.into()),
                ));
            }
            if length == 0 || length > MAX_CRYPTO_HEADER_BYTES {
                return Err(Error::corrupt(
                    format!(
                        "the LUKS header region is {length} bytes; LUKS1 headers are about 2 MiB \
                         (at most {MAX_CRYPTO_HEADER_BYTES} read)"
                    ),
                    Some(header_length.into()),
                ));
            }
            if offset.checked_add(length).is_none_or(|end| end > file_size) {
                return Err(Error::corrupt(
                    format!(
                        "truncated: the LUKS header at {offset} ({length} bytes) ends past the \
                         {file_size}-byte file; obtain a complete copy"
                    ),
                    Some(offset),
                ));
            }
            // `rewrite` writes keyslot changes into this region: it must hold nothing else
            // qemu reads as metadata.
            let overlaps = |start: u64, bytes: u64| {
                start < offset + length && offset < start.saturating_add(bytes)
            };
            if overlaps(l1_table_offset, u64::from(l1_size) * 8)
                || overlaps(
                    refcount_table_offset,
                    refcount_table_clusters * cluster_size,
                )
            {
                return Err(Error::corrupt(
                    format!(
                        "the LUKS header region at {offset} ({length} bytes) overlaps the L1 or \
                         refcount table"
                    ),
                    Some(offset),
                ));
            }
            Encryption::Luks { offset, length }
        }
        (other, _) => {
            return Err(unsupported(format!(
                "qcow2 encryption method {other} is not one qemu defines (0 none, 1 AES, 2 LUKS)"
            )))
        }
    };

    Ok(Header {
        version,
        cluster_bits,
        virtual_size,
        l1_size,
        l1_table_offset,
        snapshots,
        refcount_table_offset,
        refcount_table_bytes: refcount_table_clusters * cluster_size,
        encryption,
        incompatible_features: incompatible,
        extended_l2: incompatible & INCOMPAT_EXTL2 != 0,
        compression_type,
        backing_file,
        backing_format: backing_format.filter(|_| backing_file_offset != 0),
        data_file,
    })
}

/// The backing file name at `offset` (its length is the u32 at 16): bounded by qemu's limit,
/// inside the first cluster as qemu requires. An empty name is no backing file (qemu's
/// `bdrv_open_backing_file`); one that is not UTF-8 or holds a NUL is refused, since no name a
/// client could look up means the same bytes.
fn backing_name(
    file: &File,
    file_size: u64,
    cluster_size: u64,
    offset: u64,
) -> Result<Option<String>> {
    let mut length_bytes = [0u8; 4];
    read_exact_at(file, &mut length_bytes, 16, "qcow2 header")?;
    let length = u32::from_be_bytes(length_bytes);
    if length > MAX_BACKING_NAME
        || offset
            .checked_add(length.into())
            .is_none_or(|end| end > cluster_size.min(file_size))
    {
        return Err(Error::corrupt(
            format!(
                "the backing file name ({length} bytes at {offset}) is longer than qemu's \
                 {MAX_BACKING_NAME} or lies outside the first cluster"
            ),
            Some(8),
        ));
    }
    let mut name = vec![0u8; length as usize];
    read_exact_at(file, &mut name, offset, "qcow2 backing file name")?;
    if name.is_empty() {
        return Ok(None);
    }
    match String::from_utf8(name) {
        Ok(name) if !name.contains('\0') => Ok(Some(name)),
        Ok(name) => Err(unsupported(format!(
            "the backing file name {} holds a NUL byte: fix it with `qemu-img rebase -u -b \
             NAME IMAGE`",
            printable(name.as_bytes())
        ))),
        Err(error) => Err(unsupported(format!(
            "the backing file name {} is not UTF-8: rename the backing file and record the \
             new name with `qemu-img rebase -u -b NAME IMAGE`",
            printable(error.as_bytes())
        ))),
    }
}

/// `bytes` as a quoted string safe to show: invalid UTF-8 replaced, control characters escaped.
fn printable(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}
