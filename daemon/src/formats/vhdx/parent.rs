//! The parent locator of a differencing VHDX (MS-VHDX 2.6.2.6): which disk is the parent, and
//! the names it was known by.
//!
//! The item is a 20-byte header (the locator type GUID, which must be the VHDX one, and a
//! key/value count), then that many 12-byte entries (key offset, value offset, key length,
//! value length; offsets from the start of the item), then the UTF-16LE strings. The keys read:
//! `parent_linkage` (required: the parent's DataWriteGuid when the child was made, as
//! `{xxxxxxxx-…}`), `parent_linkage2` (a second accepted one), and the names, tried in the
//! order Hyper-V tries them: `relative_path` (to the child's directory), `volume_path`
//! (`\\?\Volume{…}\…`) and `absolute_win32_path` (`C:\…`).
//!
//! Candidates ([`ParentLocator::candidates`]) are POSIX-form names for the client to try: the
//! relative path with its separators turned to `/`; a path already in POSIX form as it is; and,
//! as a last resort, the base name of each Windows path, in the child's directory (a volume
//! or drive means nothing here; a parent copied next to its child is the common case).

use super::{le_u16, le_u32, Guid};
use crate::{Error, Result};

/// The largest parent locator read (Hyper-V writes well under 2 KiB; the item may not exceed
/// the metadata region in any case).
pub const MAX_LOCATOR_BYTES: u32 = 64 * 1024;
/// The longest value kept, in bytes of UTF-16 (a Windows long path is at most 32767 units).
const MAX_VALUE_BYTES: usize = 2 * 32768;
const HEADER_BYTES: usize = 20;
const ENTRY_BYTES: usize = 12;

/// The VHDX parent locator type, {B04AEFB7-D19E-4A81-B789-25B8E9445913}.
const VHDX_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

/// What the locator says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentLocator {
    pub parent_linkage: String,
    pub parent_linkage2: Option<String>,
    pub relative_path: Option<String>,
    pub volume_path: Option<String>,
    pub absolute_win32_path: Option<String>,
}

/// Parses the locator item `bytes`, read at file offset `at`.
pub fn parse(bytes: &[u8], at: u64) -> Result<ParentLocator> {
    let corrupt = |what: String| {
        Error::corrupt(
            format!("VHDX parent locator at offset {at}: {what}; the differencing disk is damaged"),
            Some(at),
        )
    };
    if bytes.len() < HEADER_BYTES {
        return Err(corrupt(format!("only {} bytes", bytes.len())));
    }
    let kind = Guid(bytes[..16].try_into().expect("16 bytes"));
    if kind != VHDX_LOCATOR_TYPE {
        return Err(Error::UnsupportedImage {
            message: format!(
                "the VHDX parent locator has type {kind}, not the VHDX one: a parent of \
                 another kind, which imgcrypt does not read; merge the disk into its parent \
                 first (Hyper-V `Merge-VHD`)"
            ),
        });
    }
    let count = usize::from(le_u16(bytes, 18));
    if HEADER_BYTES + count * ENTRY_BYTES > bytes.len() {
        return Err(corrupt(format!(
            "{count} key/value entries do not fit in its {} bytes",
            bytes.len()
        )));
    }
    let string = |offset: u32, length: u16, what: &str| -> Result<String> {
        let start = offset as usize;
        let end = start + usize::from(length);
        if length == 0 || length % 2 != 0 || end > bytes.len() || start < HEADER_BYTES {
            return Err(corrupt(format!(
                "a {what} of {length} bytes at offset {offset} is empty, odd-sized or outside \
                 the {}-byte item",
                bytes.len()
            )));
        }
        let units: Vec<u16> = bytes[start..end]
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
            .collect();
        String::from_utf16(&units).map_err(|_| corrupt(format!("a {what} is not valid UTF-16")))
    };
    let mut locator = ParentLocator::default();
    let mut linkage = None;
    for index in 0..count {
        let entry = &bytes[HEADER_BYTES + index * ENTRY_BYTES..][..ENTRY_BYTES];
        let key = string(le_u32(entry, 0), le_u16(entry, 8), "key")?;
        let value_length = le_u16(entry, 10);
        if usize::from(value_length) > MAX_VALUE_BYTES {
            return Err(corrupt(format!("a value of {value_length} bytes")));
        }
        let value = string(le_u32(entry, 4), value_length, "value")?;
        if value.contains('\0') {
            return Err(corrupt(format!("the value of {key} holds a NUL")));
        }
        let slot = match key.as_str() {
            "parent_linkage" => &mut linkage,
            "parent_linkage2" => &mut locator.parent_linkage2,
            "relative_path" => &mut locator.relative_path,
            "volume_path" => &mut locator.volume_path,
            "absolute_win32_path" => &mut locator.absolute_win32_path,
            // Keys a newer writer may add, which say nothing this reader needs.
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(corrupt(format!("the key {key} appears twice")));
        }
    }
    locator.parent_linkage =
        linkage.ok_or_else(|| corrupt("no parent_linkage, which is required".into()))?;
    Ok(locator)
}

impl ParentLocator {
    /// The names to try for the parent, in order (see the module documentation); never empty
    /// for a locator that names the parent at all.
    pub fn candidates(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let mut add = |name: String| {
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        };
        if let Some(relative) = &self.relative_path {
            add(relative.replace('\\', "/"));
        }
        let windows = [&self.volume_path, &self.absolute_win32_path];
        for path in windows.iter().copied().flatten() {
            // A writer on a POSIX system may have recorded a POSIX path.
            if path.starts_with('/') {
                add(path.clone());
            }
        }
        for path in windows.iter().copied().flatten() {
            let base = path.rsplit(['\\', '/']).next().unwrap_or("");
            if base != "." && base != ".." && !base.contains(':') {
                add(base.to_string());
            }
        }
        names
    }

    /// Whether `guid` (a parent's DataWriteGuid) is one this child was made against.
    pub fn links_to(&self, guid: &Guid) -> bool {
        let wanted = guid.to_string();
        let matches = |linkage: &str| {
            let inner = linkage.trim().trim_start_matches('{').trim_end_matches('}');
            inner.eq_ignore_ascii_case(&wanted)
        };
        matches(&self.parent_linkage) || self.parent_linkage2.as_deref().is_some_and(matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A locator item with `pairs`.
    pub(crate) fn locator(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut bytes = VHDX_LOCATOR_TYPE.0.to_vec();
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
        let mut strings: Vec<u8> = Vec::new();
        let base = HEADER_BYTES + pairs.len() * ENTRY_BYTES;
        for (key, value) in pairs {
            let key: Vec<u8> = key.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let value: Vec<u8> = value.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let key_at = base + strings.len();
            strings.extend_from_slice(&key);
            let value_at = base + strings.len();
            strings.extend_from_slice(&value);
            bytes.extend_from_slice(&(key_at as u32).to_le_bytes());
            bytes.extend_from_slice(&(value_at as u32).to_le_bytes());
            bytes.extend_from_slice(&(key.len() as u16).to_le_bytes());
            bytes.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        bytes.extend_from_slice(&strings);
        bytes
    }

    #[test]
    fn candidates_are_in_hyper_v_order_in_posix_form() {
        let bytes = locator(&[
            ("parent_linkage", "{01234567-89ab-cdef-0123-456789abcdef}"),
            ("absolute_win32_path", "C:\\VMs\\base\\parent.vhdx"),
            ("relative_path", ".\\base\\parent.vhdx"),
            ("volume_path", "\\\\?\\Volume{1234}\\VMs\\base\\parent.vhdx"),
            ("future_key", "ignored"),
        ]);
        let parsed = parse(&bytes, 0).unwrap();
        assert_eq!(
            parsed.candidates(),
            vec!["./base/parent.vhdx".to_string(), "parent.vhdx".to_string()]
        );
        let guid = Guid::from_fields(
            0x0123_4567,
            0x89ab,
            0xcdef,
            [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef],
        );
        assert!(parsed.links_to(&guid));
        assert!(!parsed.links_to(&Guid([0; 16])));
    }

    #[test]
    fn hostile_locators_are_refused_without_panicking() {
        let good = locator(&[("parent_linkage", "{x}"), ("relative_path", "a.vhdx")]);
        assert!(parse(&good, 0).is_ok());
        // Every truncation, and a count, offset or length saturated.
        for cut in 0..good.len() {
            let _ = parse(&good[..cut], 0);
        }
        for at in 16..good.len() {
            for value in [0u8, 0x7f, 0xff] {
                let mut bytes = good.clone();
                bytes[at] = value;
                let _ = parse(&bytes, 0);
            }
        }
        let mut many = good.clone();
        many[18..20].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(parse(&many, 0), Err(Error::CorruptImage { .. })));
        let twice = locator(&[("parent_linkage", "{x}"), ("parent_linkage", "{y}")]);
        assert!(matches!(parse(&twice, 0), Err(Error::CorruptImage { .. })));
        let missing = locator(&[("relative_path", "a.vhdx")]);
        assert!(matches!(
            parse(&missing, 0),
            Err(Error::CorruptImage { .. })
        ));
        let mut other_type = good.clone();
        other_type[0] ^= 1;
        assert!(matches!(
            parse(&other_type, 0),
            Err(Error::UnsupportedImage { .. })
        ));
    }
}
