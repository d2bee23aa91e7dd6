//! OVA appliances: a tar archive (POSIX ustar, GNU or pax) holding an OVF descriptor, a
//! manifest and the disks. A disk is a streamOptimized (or monolithicSparse) VMDK, a member
//! stored whole and uncompressed, so it is read in place: its [`super::sparse::SparseMap`] is
//! built with the member's data offset as base, and every offset the layout gives points into
//! the tar file. Nothing is extracted.
//!
//! The headers are walked from the start: 512-byte blocks whose checksum must hold, sizes in
//! octal or GNU base-256, names from the ustar prefix, a GNU `L` long name or a pax `path`
//! record (and pax `size`). The walk stops at the end-of-archive block or the end of the file,
//! after at most [`MAX_MEMBERS`] members; long names and pax headers are read up to
//! [`MAX_EXTENDED_BYTES`].
//!
//! Exactly one member named `*.vmdk` is read. An OVA with several disks is refused naming them
//! and the command that extracts one; an archive with none is refused as a tar archive.

use std::fs::File;

use crate::formats::read_exact_at;
use crate::{Error, Result};

/// Most members walked: an OVA holds a handful.
pub const MAX_MEMBERS: usize = 4096;
/// Most bytes of a GNU long name or a pax extended header.
pub const MAX_EXTENDED_BYTES: u64 = 64 << 10;
const BLOCK: u64 = 512;

/// One regular file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its path in the archive.
    pub name: String,
    /// File offset of its first byte.
    pub offset: u64,
    /// Its size.
    pub size: u64,
}

/// The disk of an OVA: the one `.vmdk` member.
pub fn the_disk(file: &File, file_size: u64) -> Result<Option<Member>> {
    let disks: Vec<Member> = members(file, file_size)?
        .into_iter()
        .filter(|member| member.name.to_ascii_lowercase().ends_with(".vmdk"))
        .collect();
    match disks.len() {
        0 => Ok(None),
        1 => Ok(disks.into_iter().next()),
        _ => {
            let names: Vec<&str> = disks.iter().map(|disk| disk.name.as_str()).collect();
            Err(Error::UnsupportedImage {
                message: format!(
                    "this OVA (tar) archive holds {} disks ({}); imgcrypt reads an OVA with one \
                     disk only: extract the one to encrypt (`tar -xf SOURCE {}`) and encrypt \
                     that VMDK",
                    disks.len(),
                    names.join(", "),
                    names[0]
                ),
            })
        }
    }
}

fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        // GNU base-256: big-endian, the first byte's top bit is the marker.
        let mut value = u64::from(field[0] & 0x7f);
        for &byte in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(byte))?;
        }
        return Some(value);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn checksum_holds(header: &[u8; 512]) -> bool {
    let Some(recorded) = octal(&header[148..156]) else {
        return false;
    };
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    sum == recorded
}

/// pax records `LEN key=value\n`: the `path` and `size` ones.
fn pax(records: &[u8]) -> (Option<String>, Option<u64>) {
    let (mut path, mut size) = (None, None);
    let mut rest = records;
    while let Some(space) = rest.iter().position(|&b| b == b' ') {
        let Some(len) = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&len| len > space && len <= rest.len())
        else {
            break;
        };
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(b"path=") {
            path = Some(String::from_utf8_lossy(value).into_owned());
        } else if let Some(value) = record.strip_prefix(b"size=") {
            size = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        }
        rest = &rest[len..];
    }
    (path, size)
}

/// The regular files of the archive, in order.
pub fn members(file: &File, file_size: u64) -> Result<Vec<Member>> {
    let mut found = Vec::new();
    let mut at = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut walked = 0usize;
    while at + BLOCK <= file_size {
        let mut header = [0u8; 512];
        read_exact_at(file, &mut header, at, "a tar header")?;
        if header.iter().all(|&b| b == 0) {
            break;
        }
        walked += 1;
        if walked > MAX_MEMBERS {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "this tar archive has more than {MAX_MEMBERS} members, more than an OVA \
                     holds: extract the disk (`tar -xf SOURCE NAME.vmdk`) and encrypt it"
                ),
            });
        }
        let damaged = |what: &str| {
            Error::corrupt(
                format!(
                    "the tar header at file offset {at} {what}: the archive is damaged or \
                     truncated; check it with `tar -tvf SOURCE`"
                ),
                Some(at),
            )
        };
        if !checksum_holds(&header) {
            return Err(damaged("fails its checksum"));
        }
        let size = match pax_size.take() {
            Some(size) => size,
            None => octal(&header[124..136]).ok_or_else(|| damaged("has no valid size"))?,
        };
        let data = at + BLOCK;
        let padded = size
            .checked_add(BLOCK - 1)
            .map(|n| n / BLOCK * BLOCK)
            .filter(|&n| data.checked_add(n).is_some())
            .ok_or_else(|| damaged("has an impossible size"))?;
        if data + size > file_size {
            return Err(damaged(&format!(
                "says a member of {size} bytes, past the end of the {file_size}-byte file"
            )));
        }
        let read_extended = |what: &str| -> Result<Vec<u8>> {
            if size > MAX_EXTENDED_BYTES {
                return Err(damaged(&format!("has a {what} of {size} bytes")));
            }
            let mut bytes = vec![0u8; size as usize];
            read_exact_at(file, &mut bytes, data, "a tar extended header")?;
            Ok(bytes)
        };
        match header[156] {
            b'L' => long_name = Some(text(&read_extended("GNU long name")?)),
            b'x' => {
                let (path, size) = pax(&read_extended("pax header")?);
                if path.is_some() {
                    long_name = path;
                }
                pax_size = size;
            }
            b'0' | 0 | b'7' => {
                let name = long_name.take().unwrap_or_else(|| {
                    let name = text(&header[..100]);
                    let prefix = text(&header[345..500]);
                    if &header[257..262] == b"ustar" && header[262] == 0 && !prefix.is_empty() {
                        format!("{prefix}/{name}")
                    } else {
                        name
                    }
                });
                found.push(Member {
                    name,
                    offset: data,
                    size,
                });
            }
            _ => long_name = None,
        }
        at = data + padded;
    }
    Ok(found)
}
