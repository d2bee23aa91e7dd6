//! Formats imgcrypt recognises but does not read: found by content, refused by name.
//!
//! Three of the formats found here are read after all: [`super::open`] hands qcow2 (versions 2
//! and 3; qcow version 1 stays refused) to [`super::qcow2`], and VMDK (every kind below) and
//! tar (an OVA appliance) to [`super::vmdk`], which refuses what it cannot read (an archive with
//! no disk or several) with the refusals written here.
//!
//! Encrypting a qcow2 file, a VMDK or a gzip archive "as a raw disk" succeeds and hands back an
//! image whose guest sees the container's metadata instead of its disk. So every signature
//! qemu-img's probes know (qemu's `block/*.c` `*_probe` functions), LUKS, and the wrappers a
//! user is likely to pass by mistake are looked for, and a match is refused with
//! [`Error::UnsupportedFormat`], whose message names the format and the command that turns the
//! file into something imgcrypt reads. RAW is what remains when nothing matches.
//!
//! | format                 | signature                                                         |
//! |------------------------|-------------------------------------------------------------------|
//! | qcow2 / qcow (v1)      | `QFI\xfb` at 0; big-endian version at 4: 1 is qcow, else qcow2    |
//! | QED                    | `QED\0` at 0                                                      |
//! | VMDK sparse            | `KDMV` at 0 (streamOptimized: compression 1 at 77 or flag bit 16) |
//! | VMDK (ESX 3 sparse)    | `COWD` at 0                                                       |
//! | VMDK descriptor        | comment and blank lines, then `version=1`..`3` (qemu's rule), or  |
//! |                        | a first line `# Disk DescriptorFile`                              |
//! | VDI                    | little-endian `0xbeda107f` at 64                                  |
//! | Parallels              | `WithoutFreeSpace` or `WithouFreSpacExt` at 0                     |
//! | Bochs                  | `Bochs Virtual HD Image` at 0                                     |
//! | cloop                  | the shell header `#!/bin/sh\n#V…Format` at 0                      |
//! | DMG (UDIF)             | the `koly` trailer (version 4, 512 bytes) at the end              |
//! | LUKS1, LUKS2           | `LUKS\xba\xbe` at 0                                               |
//! | LUKS2, primary damaged | `SKUL\xba\xbe` at 16 KiB … 4 MiB, whose own size and offset say so|
//! | gzip, bzip2, xz, zstd, lz4, lzip | their magic numbers at 0                                |
//! | zip, 7z                | `PK\3\4`, `7z\xbc\xaf\x27\x1c` at 0                               |
//! | tar (and OVA)          | `ustar` at 257                                                    |
//!
//! Only whole-file positions are looked at, never a partition's: a raw disk whose second
//! partition holds LUKS or a gzip file is still a raw disk. The LUKS2 secondary header is taken
//! only when its `hdr_size` and `hdr_offset` both equal the offset it was found at, which a
//! LUKS partition inside a raw disk (offsets relative to the partition) cannot satisfy.
//!
//! ISO 9660 images are not refused: an ISO is a raw image of a disc, qemu reads it as raw, and
//! encrypting it keeps every byte. A VMDK `monolithicFlat` extent (`NAME-flat.vmdk`) is likewise
//! raw data and is read as such; its descriptor is refused.
//!
//! VHDX (`vhdxfile` at 0) is read ([`super::vhdx`]), not refused. These checks run after the
//! VHD rule ([`super::vhd`]) found no VHD and the file is no VHDX, so a fixed VHD whose guest
//! disk happens to start with one of these signatures (a whole-disk LUKS guest, say) is still
//! read as the VHD it is. They read at most 4 KiB at the start, 512 bytes at the end and 264
//! bytes at each of nine LUKS2 offsets.

use std::fs::File;

use super::read_exact_at;
use crate::Error;
use crate::Result;

/// Bytes read from the start of the file: every signature at 0 fits, and qemu's VMDK
/// descriptor probe reads only 512.
const HEAD_SIZE: u64 = 4096;

/// Where cryptsetup looks for a LUKS2 secondary header: at the header size, one of these.
const LUKS2_SECONDARY_OFFSETS: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];

/// Which VMDK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmdkKind {
    /// `KDMV` hosted sparse extent (monolithicSparse, twoGbMaxExtentSparse).
    Sparse,
    /// `KDMV` with compressed grains (streamOptimized, what OVAs carry).
    StreamOptimized,
    /// `COWD`: the ESX 3 sparse extent.
    EsxSparse,
    /// The text descriptor naming the extent files.
    Descriptor,
}

/// Which compressor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `1f 8b 08`.
    Gzip,
    /// `BZh1`..`BZh9` and a block or end-of-stream magic.
    Bzip2,
    /// `fd 37 7a 58 5a 00`.
    Xz,
    /// `28 b5 2f fd`.
    Zstd,
    /// `04 22 4d 18`.
    Lz4,
    /// `LZIP`.
    Lzip,
}

/// Where a LUKS header was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuksHeader {
    /// At 0, with this version field.
    Primary {
        /// 1 or 2 (other values are reported as they are).
        version: u16,
    },
    /// Only the LUKS2 secondary header, at this offset.
    Secondary {
        /// Its offset, which is also the header's size.
        offset: u64,
    },
}

/// A format recognised and not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Foreign {
    /// qcow2 (qcow version 2 or 3): read by [`super::qcow2`], not refused by [`super::open`].
    Qcow2,
    /// qcow version 1.
    Qcow,
    /// QED.
    Qed,
    /// VMDK.
    Vmdk(VmdkKind),
    /// VirtualBox VDI.
    Vdi,
    /// Parallels.
    Parallels,
    /// Bochs.
    Bochs,
    /// cloop (compressed loopback).
    Cloop,
    /// Apple disk image (UDIF).
    Dmg,
    /// LUKS: already encrypted.
    Luks(LuksHeader),
    /// A compressed file.
    Compressed(Compression),
    /// A tar archive (OVA appliances are tar archives).
    Tar,
    /// A zip archive.
    Zip,
    /// A 7-Zip archive.
    SevenZip,
}

impl Foreign {
    /// The short name programs match on (the `format` error parameter): qemu-img's format name
    /// for disk formats, the compressor's or archiver's name for the others.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Qcow => "qcow",
            Self::Qed => "qed",
            Self::Vmdk(_) => "vmdk",
            Self::Vdi => "vdi",
            Self::Parallels => "parallels",
            Self::Bochs => "bochs",
            Self::Cloop => "cloop",
            Self::Dmg => "dmg",
            Self::Luks(_) => "luks",
            Self::Compressed(Compression::Gzip) => "gzip",
            Self::Compressed(Compression::Bzip2) => "bzip2",
            Self::Compressed(Compression::Xz) => "xz",
            Self::Compressed(Compression::Zstd) => "zstd",
            Self::Compressed(Compression::Lz4) => "lz4",
            Self::Compressed(Compression::Lzip) => "lzip",
            Self::Tar => "tar",
            Self::Zip => "zip",
            Self::SevenZip => "7z",
        }
    }

    /// The error that refuses it, saying what it is and what to do.
    pub fn refusal(self) -> Error {
        let convert = |what: &str| {
            let format = self.name();
            format!(
                "this is {what}, which imgcrypt cannot read yet: convert it to a raw disk first \
                 (`qemu-img convert -f {format} -O raw SOURCE SOURCE.raw`) and encrypt \
                 SOURCE.raw"
            )
        };
        let unpack = |what: &str, command: &str| {
            format!(
                "this is {what}, not a disk image: {command} first and encrypt the disk image \
                 that comes out"
            )
        };
        let message = match self {
            Self::Qcow2 => convert("a qcow2 image"),
            Self::Qcow => convert("a qcow (version 1) image"),
            Self::Qed => convert("a QED image"),
            Self::Vmdk(VmdkKind::Sparse) => convert("a VMDK image (sparse extent)"),
            Self::Vmdk(VmdkKind::StreamOptimized) => {
                convert("a VMDK image (streamOptimized, as OVA appliances carry)")
            }
            Self::Vmdk(VmdkKind::EsxSparse) => convert("a VMDK image (ESX 3 COWD sparse extent)"),
            Self::Vmdk(VmdkKind::Descriptor) => {
                "this is a VMDK descriptor, a text file naming the extent files that hold the \
                 disk, which imgcrypt cannot read yet: convert the disk it describes to raw \
                 first, with its extent files beside it (`qemu-img convert -f vmdk -O raw \
                 SOURCE SOURCE.raw`), and encrypt SOURCE.raw; a monolithicFlat disk's \
                 NAME-flat.vmdk extent is raw already and can be encrypted as it is"
                    .to_string()
            }
            Self::Vdi => convert("a VirtualBox VDI image"),
            Self::Parallels => convert("a Parallels image"),
            Self::Bochs => convert("a Bochs image"),
            Self::Cloop => convert("a cloop (compressed loopback) image"),
            Self::Dmg => convert("an Apple disk image (DMG)"),
            Self::Luks(LuksHeader::Primary { version }) => format!(
                "this is already a LUKS{} image, which imgcrypt does not encrypt a second time: \
                 use `imgctl rewrite -k` to change its key, or `imgctl decrypt` it first and \
                 encrypt the plaintext",
                match version {
                    1 | 2 => version.to_string(),
                    other => format!(" (version {other})"),
                }
            ),
            Self::Luks(LuksHeader::Secondary { offset }) => format!(
                "this is a LUKS2 image whose primary header at offset 0 is damaged or wiped (its \
                 secondary header at offset {offset} is intact), which imgcrypt does not encrypt \
                 a second time: restore the primary header (`cryptsetup repair SOURCE`), then use \
                 `imgctl rewrite -k` to change its key or `imgctl decrypt` it"
            ),
            Self::Compressed(Compression::Gzip) => unpack(
                "a gzip-compressed file",
                "decompress it (`gunzip -k SOURCE`)",
            ),
            Self::Compressed(Compression::Bzip2) => unpack(
                "a bzip2-compressed file",
                "decompress it (`bunzip2 -k SOURCE`)",
            ),
            Self::Compressed(Compression::Xz) => {
                unpack("an xz-compressed file", "decompress it (`unxz -k SOURCE`)")
            }
            Self::Compressed(Compression::Zstd) => {
                unpack("a zstd-compressed file", "decompress it (`unzstd SOURCE`)")
            }
            Self::Compressed(Compression::Lz4) => {
                unpack("an lz4-compressed file", "decompress it (`unlz4 SOURCE`)")
            }
            Self::Compressed(Compression::Lzip) => unpack(
                "an lzip-compressed file",
                "decompress it (`lzip -dk SOURCE`)",
            ),
            Self::Tar => unpack(
                "a tar archive (an OVA appliance is one)",
                "extract it (`tar -xf SOURCE`; a VMDK found inside then needs `qemu-img convert \
                 -f vmdk -O raw`)",
            ),
            Self::Zip => unpack("a zip archive", "extract it (`unzip SOURCE`)"),
            Self::SevenZip => unpack("a 7-Zip archive", "extract it (`7z x SOURCE`)"),
        };
        Error::UnsupportedFormat {
            format: self.name(),
            message,
        }
    }
}

/// Looks for the signatures above in `file` of `file_size` bytes.
pub fn detect(file: &File, file_size: u64) -> Result<Option<Foreign>> {
    let mut head = vec![0u8; HEAD_SIZE.min(file_size) as usize];
    read_exact_at(file, &mut head, 0, "the start of the source")?;
    if let Some(found) = at_start(&head) {
        return Ok(Some(found));
    }
    if let Some(offset) = luks2_secondary(file, file_size)? {
        return Ok(Some(Foreign::Luks(LuksHeader::Secondary { offset })));
    }
    if file_size >= 512 {
        let mut tail = [0u8; 512];
        read_exact_at(file, &mut tail, file_size - 512, "the end of the source")?;
        if is_dmg_trailer(&tail) {
            return Ok(Some(Foreign::Dmg));
        }
    }
    Ok(None)
}

fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The signatures found in the first bytes of the file.
fn at_start(head: &[u8]) -> Option<Foreign> {
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(b"LUKS\xba\xbe") {
        return Some(Foreign::Luks(LuksHeader::Primary {
            version: be_u16(head, 6).unwrap_or(0),
        }));
    }
    if starts(b"QFI\xfb") {
        return Some(match be_u32(head, 4) {
            Some(1) => Foreign::Qcow,
            _ => Foreign::Qcow2,
        });
    }
    if starts(b"QED\0") {
        return Some(Foreign::Qed);
    }
    if starts(b"KDMV") {
        // VMDK4 header: flags (le32) at 8, compressAlgorithm (le16) at 77; deflate is 1.
        let compressed = le_u32(head, 8).is_some_and(|flags| flags & (1 << 16) != 0)
            || le_u16(head, 77) == Some(1);
        return Some(Foreign::Vmdk(if compressed {
            VmdkKind::StreamOptimized
        } else {
            VmdkKind::Sparse
        }));
    }
    if starts(b"COWD") {
        return Some(Foreign::Vmdk(VmdkKind::EsxSparse));
    }
    if le_u32(head, 64) == Some(0xbeda_107f) {
        return Some(Foreign::Vdi);
    }
    if starts(b"WithoutFreeSpace") || starts(b"WithouFreSpacExt") {
        return Some(Foreign::Parallels);
    }
    if starts(b"Bochs Virtual HD Image\0") {
        return Some(Foreign::Bochs);
    }
    if is_cloop(head) {
        return Some(Foreign::Cloop);
    }
    if is_vmdk_descriptor(head) {
        return Some(Foreign::Vmdk(VmdkKind::Descriptor));
    }
    if let Some(compression) = compression(head) {
        return Some(Foreign::Compressed(compression));
    }
    if starts(b"PK\x03\x04") {
        return Some(Foreign::Zip);
    }
    if starts(b"7z\xbc\xaf\x27\x1c") {
        return Some(Foreign::SevenZip);
    }
    // POSIX `ustar\0` + "00", or GNU `ustar  \0`.
    if head.get(257..262) == Some(b"ustar") {
        return Some(Foreign::Tar);
    }
    None
}

/// cloop's header is a shell script that loads the module and mounts the image; qemu matches
/// its version 2.0 text, later versions change only the number.
fn is_cloop(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"#!/bin/sh\n#V") else {
        return false;
    };
    let first_line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
    first_line.ends_with(b" Format") && first_line.len() <= 16
}

/// qemu's `vmdk_probe` text rule: lines starting with `#` are comments, lines of spaces are
/// blank, and the first other line must be `version=1`, `2` or `3` (LF or CRLF). A first line
/// `# Disk DescriptorFile` is taken on its own, however the rest looks.
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    if head.starts_with(b"# Disk DescriptorFile") {
        return true;
    }
    // qemu probes 512 bytes.
    let text = &head[..head.len().min(512)];
    let mut at = 0;
    while at < text.len() {
        let line_end = text[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(text.len(), |n| at + n);
        let line = &text[at..line_end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first() == Some(&b'#') {
            at = line_end + 1;
            continue;
        }
        if !line.is_empty() && line.iter().all(|&b| b == b' ') {
            if line_end == text.len() {
                return false;
            }
            at = line_end + 1;
            continue;
        }
        // The version line must be complete (end in a newline) to count.
        return line_end < text.len() && matches!(line, b"version=1" | b"version=2" | b"version=3");
    }
    false
}

fn compression(head: &[u8]) -> Option<Compression> {
    // gzip: deflate (8) is the only method, and the top three flag bits are reserved as zero.
    if head.starts_with(b"\x1f\x8b\x08") && head.get(3).is_some_and(|flags| flags & 0xe0 == 0) {
        return Some(Compression::Gzip);
    }
    // bzip2: `BZh` and a block size digit, then a block (pi) or end-of-stream (sqrt pi) magic.
    if head.starts_with(b"BZh")
        && head
            .get(3)
            .is_some_and(|level| (b'1'..=b'9').contains(level))
        && matches!(
            head.get(4..10),
            Some(b"\x31\x41\x59\x26\x53\x59") | Some(b"\x17\x72\x45\x38\x50\x90")
        )
    {
        return Some(Compression::Bzip2);
    }
    if head.starts_with(b"\xfd7zXZ\0") {
        return Some(Compression::Xz);
    }
    if head.starts_with(b"\x28\xb5\x2f\xfd") {
        return Some(Compression::Zstd);
    }
    if head.starts_with(b"\x04\x22\x4d\x18") {
        return Some(Compression::Lz4);
    }
    if head.starts_with(b"LZIP") {
        return Some(Compression::Lzip);
    }
    None
}

/// The offset of a LUKS2 secondary header that describes this file as a whole.
fn luks2_secondary(file: &File, file_size: u64) -> Result<Option<u64>> {
    // magic (6), version (2), hdr_size at 8, ..., hdr_offset at 256.
    let mut header = [0u8; 264];
    for offset in LUKS2_SECONDARY_OFFSETS {
        if offset + header.len() as u64 > file_size {
            break;
        }
        read_exact_at(
            file,
            &mut header,
            offset,
            "a LUKS2 secondary header position",
        )?;
        let found = header.starts_with(b"SKUL\xba\xbe")
            && be_u16(&header, 6) == Some(2)
            && be_u64(&header, 8) == Some(offset)
            && be_u64(&header, 256) == Some(offset);
        if found {
            return Ok(Some(offset));
        }
    }
    Ok(None)
}

/// The UDIF trailer: `koly`, version 4, header size 512 (all big-endian).
fn is_dmg_trailer(tail: &[u8; 512]) -> bool {
    tail.starts_with(b"koly") && be_u32(tail, 4) == Some(4) && be_u32(tail, 8) == Some(512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file_with(parts: &[(u64, &[u8])], size: u64) -> File {
        let file = tempfile::tempfile_in("/tmp").unwrap();
        file.set_len(size).unwrap();
        for (offset, bytes) in parts {
            file.write_all_at(bytes, *offset).unwrap();
        }
        file
    }

    fn detected(parts: &[(u64, &[u8])], size: u64) -> Option<Foreign> {
        detect(&file_with(parts, size), size).unwrap()
    }

    #[test]
    fn each_signature_at_the_start_is_recognised() {
        let mut vdi = vec![0u8; 68];
        vdi[..4].copy_from_slice(b"<<< ");
        vdi[64..68].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        let mut stream = b"KDMV\x03\0\0\0\x03\0\x03\0".to_vec();
        stream.resize(80, 0);
        stream[77] = 1;
        let mut hosted = b"KDMV\x01\0\0\0\x03\0\0\0".to_vec();
        hosted.resize(80, 0);
        let cases: [(&[u8], Foreign); 21] = [
            (
                b"LUKS\xba\xbe\0\x01",
                Foreign::Luks(LuksHeader::Primary { version: 1 }),
            ),
            (
                b"LUKS\xba\xbe\0\x02",
                Foreign::Luks(LuksHeader::Primary { version: 2 }),
            ),
            (b"QFI\xfb\0\0\0\x03", Foreign::Qcow2),
            (b"QFI\xfb\0\0\0\x02", Foreign::Qcow2),
            (b"QFI\xfb\0\0\0\x01", Foreign::Qcow),
            (b"QED\0", Foreign::Qed),
            (&hosted, Foreign::Vmdk(VmdkKind::Sparse)),
            (&stream, Foreign::Vmdk(VmdkKind::StreamOptimized)),
            (b"COWD\x01\0\0\0", Foreign::Vmdk(VmdkKind::EsxSparse)),
            (&vdi, Foreign::Vdi),
            (b"WithoutFreeSpace\x02\0\0\0", Foreign::Parallels),
            (b"WithouFreSpacExt\x02\0\0\0", Foreign::Parallels),
            (b"Bochs Virtual HD Image\0\0Redolog", Foreign::Bochs),
            (
                b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0",
                Foreign::Cloop,
            ),
            (
                b"\x1f\x8b\x08\x00\0\0\0\0",
                Foreign::Compressed(Compression::Gzip),
            ),
            (b"BZh91AY&SY", Foreign::Compressed(Compression::Bzip2)),
            (b"\xfd7zXZ\0\0\x04", Foreign::Compressed(Compression::Xz)),
            (
                b"\x28\xb5\x2f\xfd\x24",
                Foreign::Compressed(Compression::Zstd),
            ),
            (b"\x04\x22\x4d\x18", Foreign::Compressed(Compression::Lz4)),
            (b"PK\x03\x04\x14\0", Foreign::Zip),
            (b"7z\xbc\xaf\x27\x1c\0\x04", Foreign::SevenZip),
        ];
        for (bytes, want) in cases {
            assert_eq!(detected(&[(0, bytes)], 1 << 20), Some(want), "{bytes:?}");
        }
        assert_eq!(
            detected(&[(257, b"ustar\x0000")], 10240),
            Some(Foreign::Tar)
        );
    }

    #[test]
    fn vmdk_descriptors_follow_qemus_rule() {
        let yes: [&[u8]; 4] = [
            b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n",
            b"# Disk DescriptorFile\r\nversion=1\r\n",
            b"# comment\n   \nversion=3\n",
            b"version=2\n",
        ];
        for text in yes {
            assert_eq!(
                detected(&[(0, text)], text.len() as u64),
                Some(Foreign::Vmdk(VmdkKind::Descriptor)),
                "{text:?}"
            );
        }
        let no: [&[u8]; 3] = [b"version=4\n", b"hello\nversion=1\n", b"# x\nversion=1"];
        for text in no {
            assert_eq!(detected(&[(0, text)], text.len() as u64), None, "{text:?}");
        }
    }

    #[test]
    fn raw_disks_are_not_taken_for_containers() {
        // An MBR boot sector, a zero disk, a disk whose second partition holds LUKS and gzip
        // data, and near misses of the magic numbers.
        let mbr: &[u8] = b"\xeb\x63\x90\x10\x8e\xd0\xbc\x00";
        assert_eq!(detected(&[(0, mbr), (510, b"\x55\xaa")], 1 << 20), None);
        assert_eq!(detected(&[], 8 << 20), None);
        assert_eq!(
            detected(
                &[
                    (1 << 20, b"LUKS\xba\xbe\0\x02"),
                    (2 << 20, b"\x1f\x8b\x08\0")
                ],
                8 << 20
            ),
            None
        );
        for near in [
            &b"\x1f\x8b\x07\0"[..],
            b"\x1f\x8b\x08\xe0",
            b"BZh0",
            b"BZh9garbage",
            b"QFI\xfa",
            b"#!/bin/sh\necho hi\n",
        ] {
            assert_eq!(detected(&[(0, near)], 4096), None, "{near:?}");
        }
        assert_eq!(detected(&[], 0), None);
        assert_eq!(detected(&[(0, b"QF")], 2), None);
    }

    fn luks2_secondary_header(offset: u64) -> Vec<u8> {
        let mut header = vec![0u8; 4096];
        header[..6].copy_from_slice(b"SKUL\xba\xbe");
        header[6..8].copy_from_slice(&2u16.to_be_bytes());
        header[8..16].copy_from_slice(&offset.to_be_bytes());
        header[256..264].copy_from_slice(&offset.to_be_bytes());
        header
    }

    #[test]
    fn a_luks2_image_with_a_wiped_primary_header_is_found_by_its_secondary() {
        for offset in [16 << 10, 4 << 20] {
            let header = luks2_secondary_header(offset);
            assert_eq!(
                detected(&[(offset, &header)], 16 << 20),
                Some(Foreign::Luks(LuksHeader::Secondary { offset }))
            );
        }
        // A LUKS2 partition at 1 MiB inside a raw disk: its secondary header sits at
        // 1 MiB + 1 MiB = 2 MiB but says offset 1 MiB (relative to the partition).
        let partition = luks2_secondary_header(1 << 20);
        assert_eq!(detected(&[(2 << 20, &partition)], 16 << 20), None);
    }

    #[test]
    fn a_dmg_trailer_is_recognised_at_the_end() {
        let mut trailer = [0u8; 512];
        trailer[..4].copy_from_slice(b"koly");
        trailer[4..8].copy_from_slice(&4u32.to_be_bytes());
        trailer[8..12].copy_from_slice(&512u32.to_be_bytes());
        let size = 3 << 20;
        assert_eq!(
            detected(&[(size - 512, &trailer)], size),
            Some(Foreign::Dmg)
        );
        // Elsewhere it is only data.
        assert_eq!(detected(&[(size - 1024, &trailer)], size), None);
    }

    #[test]
    fn every_refusal_names_the_format_and_a_way_forward() {
        let all = [
            Foreign::Qcow2,
            Foreign::Qcow,
            Foreign::Qed,
            Foreign::Vmdk(VmdkKind::Sparse),
            Foreign::Vmdk(VmdkKind::StreamOptimized),
            Foreign::Vmdk(VmdkKind::EsxSparse),
            Foreign::Vmdk(VmdkKind::Descriptor),
            Foreign::Vdi,
            Foreign::Parallels,
            Foreign::Bochs,
            Foreign::Cloop,
            Foreign::Dmg,
            Foreign::Luks(LuksHeader::Primary { version: 2 }),
            Foreign::Luks(LuksHeader::Secondary { offset: 16384 }),
            Foreign::Compressed(Compression::Gzip),
            Foreign::Compressed(Compression::Bzip2),
            Foreign::Compressed(Compression::Xz),
            Foreign::Compressed(Compression::Zstd),
            Foreign::Compressed(Compression::Lz4),
            Foreign::Compressed(Compression::Lzip),
            Foreign::Tar,
            Foreign::Zip,
            Foreign::SevenZip,
        ];
        for foreign in all {
            match foreign.refusal() {
                Error::UnsupportedFormat { format, message } => {
                    assert_eq!(format, foreign.name());
                    assert!(message.starts_with("this is "), "{message}");
                    assert!(!message.contains("raw disk image"), "{message}");
                    assert!(message.contains('`'), "no command in: {message}");
                }
                other => panic!("{other:?}"),
            }
        }
        let qcow2 = Foreign::Qcow2.refusal().to_string();
        assert!(
            qcow2.contains("qcow2") && qcow2.contains("qemu-img convert -f qcow2 -O raw"),
            "{qcow2}"
        );
        let luks = Foreign::Luks(LuksHeader::Primary { version: 1 })
            .refusal()
            .to_string();
        assert!(
            luks.contains("already a LUKS1 image") && luks.contains("imgctl rewrite -k"),
            "{luks}"
        );
        let bzip2 = Foreign::Compressed(Compression::Bzip2)
            .refusal()
            .to_string();
        assert!(bzip2.contains("bunzip2 -k"), "{bzip2}");
    }
}
