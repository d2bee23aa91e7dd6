//! The VMDK text descriptor (VMDK spec 5.0 §"The Descriptor File"): `createType`, the extent
//! lines, and `parentFileNameHint`, parsed the way qemu parses them (`block/vmdk.c`
//! `vmdk_parse_description`, `vmdk_parse_extents`, `vmdk_parent_open`), so a descriptor reads
//! here as it reads in qemu-img:
//!
//! - `createType="…"`: the first occurrence of `createType`, then the value after `="` up to
//!   the next `"`;
//! - an extent line is `ACCESS SECTORS TYPE "NAME" [OFFSET]`; lines whose access is not `RW`,
//!   whose size is not positive or whose type qemu does not know are skipped (qemu skips them:
//!   `RDONLY`, `NOACCESS` and `ZERO` extents are not part of the disk it presents); a `FLAT`
//!   line needs its offset, other types must not have one;
//! - `parentFileNameHint="…"` names the parent of a delta link;
//! - `CID=…` and `parentCID=…` ([`cid`]), hexadecimal, read as qemu's `vmdk_read_cid` reads
//!   them: a delta link's `parentCID` must equal its parent's `CID`.
//!
//! Bounds: the text read is at most [`MAX_DESCRIPTOR_BYTES`] (qemu reads 1 MiB less one byte),
//! names at most 511 bytes, and at most [`MAX_EXTENTS`] extents.

use crate::formats::files::MAX_COMPANIONS;
use crate::{Error, Result};

/// Most descriptor bytes read: qemu's `vmdk_read_desc` bound.
pub const MAX_DESCRIPTOR_BYTES: u64 = (1 << 20) - 1;
/// Most extents: every one is a companion file the client passes.
pub const MAX_EXTENTS: usize = MAX_COMPANIONS;
/// How much of a descriptor qemu searches for a CID: `DESC_SIZE` (20 sectors) less its NUL.
pub const CID_TEXT_BYTES: usize = 20 * 512 - 1;
/// qemu's `%511[^\n\r"]`.
const MAX_NAME_BYTES: usize = 511;
/// qemu's `%10s`.
const MAX_TOKEN_BYTES: usize = 10;

/// How an extent stores its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// `FLAT` (and `VMFS`, offset 0): the guest bytes, from a sector offset of the file.
    Flat {
        /// File offset in bytes.
        offset: u64,
    },
    /// `SPARSE`: a hosted sparse extent (`KDMV`).
    Sparse,
    /// `VMFSSPARSE`: an ESX `COWD` extent (refused).
    VmfsSparse,
    /// `SESPARSE`: an ESXi seSparse extent (refused).
    SeSparse,
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Its size in sectors, as the line says.
    pub sectors: u64,
    /// Its type.
    pub kind: ExtentType,
    /// The file name, as written (relative to the descriptor's directory, or absolute).
    pub name: String,
}

/// A descriptor's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `createType`.
    pub create_type: String,
    /// The extents, in order.
    pub extents: Vec<ExtentLine>,
    /// `parentFileNameHint`, if any.
    pub parent: Option<String>,
}

/// The value of `name="…"` as qemu finds it: after the first occurrence of `name`, skip two
/// bytes (`="`), take up to the next `"`.
fn quoted_value<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(name)? + name.len() + 2;
    let rest = text.get(start..)?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

/// The parent named by `parentFileNameHint`, if any.
pub fn parent_hint(text: &str) -> Result<Option<String>> {
    if !text.contains("parentFileNameHint") {
        return Ok(None);
    }
    match quoted_value(text, "parentFileNameHint") {
        Some(name) if !name.is_empty() && name.len() < 4096 => Ok(Some(name.to_string())),
        _ => Err(Error::corrupt(
            "the VMDK descriptor's parentFileNameHint has no closing quote or is empty or \
             longer than 4095 bytes (qemu refuses it too)",
            None,
        )),
    }
}

/// Which content id [`cid`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CidField {
    /// `CID`: this descriptor's own, which VMware and qemu replace on the first write after
    /// each open, so a changed disk has a new one.
    Own,
    /// `parentCID`: the parent's `CID` when this delta link was made.
    Parent,
}

/// The content id `field` of a descriptor, or `None` if it has none qemu can read. As
/// `vmdk_read_cid`: within the first [`CID_TEXT_BYTES`], the first occurrence of the name (so
/// `CID` can match inside `parentCID` if that comes first, as in qemu), one byte skipped (the
/// `=`), then what `sscanf("%x")` reads: blanks, an optional `0x`, hexadecimal digits, kept to
/// their low 32 bits.
pub fn cid(text: &str, field: CidField) -> Option<u32> {
    let name: &[u8] = match field {
        CidField::Own => b"CID",
        CidField::Parent => b"parentCID",
    };
    let text = &text.as_bytes()[..text.len().min(CID_TEXT_BYTES)];
    let at = text.windows(name.len()).position(|w| w == name)?;
    let rest = text.get(at + name.len() + 1..)?;
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b.is_ascii_whitespace() || b == 0x0b)
        .count()..];
    let rest = match rest {
        [b'0', b'x' | b'X', tail @ ..] if tail.first().is_some_and(u8::is_ascii_hexdigit) => tail,
        _ => rest,
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return None;
    }
    // strtoul saturates at u64::MAX before scanf stores the low 32 bits.
    let value = rest[..digits].iter().try_fold(0u64, |value, &b| {
        let digit = u64::from((b as char).to_digit(16).expect("hex digit"));
        value.checked_mul(16)?.checked_add(digit)
    });
    Some(value.unwrap_or(u64::MAX) as u32)
}

/// Splits off a token of non-blank bytes (as `%s` reads).
fn token(line: &str) -> Option<(&str, &str)> {
    let line = line.trim_start();
    let end = line.find(char::is_whitespace).unwrap_or(line.len());
    (end > 0).then(|| (&line[..end], &line[end..]))
}

/// Splits off a signed decimal integer (as `%ld` reads).
fn integer(line: &str) -> Option<(i64, &str)> {
    let line = line.trim_start();
    let digits_from = usize::from(line.starts_with(['-', '+']));
    let end = line[digits_from..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(line.len(), |n| n + digits_from);
    if end == digits_from {
        return None;
    }
    Some((line[..end].parse().ok()?, &line[end..]))
}

/// The fields of one extent line and how many matched, as qemu's `sscanf` counts them.
fn scan_line(line: &str) -> (usize, [Option<&str>; 3], Option<i64>, Option<i64>) {
    let mut fields = [None; 3];
    let Some((access, rest)) = token(line).filter(|(t, _)| t.len() <= MAX_TOKEN_BYTES) else {
        return (0, fields, None, None);
    };
    fields[0] = Some(access);
    let Some((sectors, rest)) = integer(rest) else {
        return (1, fields, None, None);
    };
    let Some((kind, rest)) = token(rest).filter(|(t, _)| t.len() <= MAX_TOKEN_BYTES) else {
        return (2, fields, Some(sectors), None);
    };
    fields[1] = Some(kind);
    let rest = rest.trim_start();
    let Some(rest) = rest.strip_prefix('"') else {
        return (3, fields, Some(sectors), None);
    };
    let end = rest.find(['"', '\n', '\r']).unwrap_or(rest.len());
    if end == 0 || end > MAX_NAME_BYTES || !rest[end..].starts_with('"') {
        return (3, fields, Some(sectors), None);
    }
    fields[2] = Some(&rest[..end]);
    match integer(&rest[end + 1..]) {
        Some((offset, _)) => (5, fields, Some(sectors), Some(offset)),
        None => (4, fields, Some(sectors), None),
    }
}

/// Parses a descriptor file's text (already cut to [`MAX_DESCRIPTOR_BYTES`]).
pub fn parse(text: &str) -> Result<Descriptor> {
    let create_type = quoted_value(text, "createType")
        .filter(|value| value.len() < 128)
        .ok_or_else(|| {
            Error::corrupt(
                "the VMDK descriptor has no createType=\"…\" (qemu: \"invalid VMDK image \
                 descriptor\")",
                Some(0),
            )
        })?
        .to_string();
    let mut extents = Vec::new();
    for line in text.split('\n') {
        let (matches, [access, kind, name], sectors, offset) = scan_line(line);
        if matches < 4 || access != Some("RW") {
            continue;
        }
        let (kind, name, sectors) = (
            kind.expect("matched"),
            name.expect("matched"),
            sectors.expect("matched"),
        );
        let invalid = || {
            Error::corrupt(
                format!(
                    "invalid VMDK extent line `{}` (qemu: \"Invalid extent line\")",
                    line.trim_end_matches('\r')
                ),
                None,
            )
        };
        let kind = match kind {
            "FLAT" => match offset {
                Some(offset) if matches == 5 && offset >= 0 => ExtentType::Flat {
                    offset: (offset as u64)
                        .checked_mul(super::SECTOR)
                        .ok_or_else(invalid)?,
                },
                _ => return Err(invalid()),
            },
            "VMFS" if matches == 4 => ExtentType::Flat { offset: 0 },
            _ if matches != 4 => return Err(invalid()),
            "SPARSE" => ExtentType::Sparse,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            _ => continue,
        };
        if sectors <= 0 {
            continue;
        }
        if extents.len() == MAX_EXTENTS {
            return Err(Error::UnsupportedImage {
                message: format!(
                    "this VMDK descriptor lists more than {MAX_EXTENTS} extents, more files \
                     than one call passes: convert it to one file first (`qemu-img convert -f \
                     vmdk -O qcow2 SRC NEW.qcow2`)"
                ),
            });
        }
        extents.push(ExtentLine {
            sectors: sectors as u64,
            kind,
            name: name.to_string(),
        });
    }
    Ok(Descriptor {
        create_type,
        extents,
        parent: parent_hint(text)?,
    })
}
