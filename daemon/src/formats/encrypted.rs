//! Which container an encrypted image is, by content: what `decrypt`, `verify`, `inspect` and
//! `rewrite` dispatch on.
//!
//! Checked in order: a qcow2 magic at offset 0 (`QFI\xfb`), then a VHD footer (`conectix` in
//! the last 512 bytes, or its copy at offset 0). Everything else is treated as raw LUKS, whose
//! reader then says precisely what is wrong with a file that is not one.

use std::fs::File;

use imgcrypt_proto::api::OutputFormat;

use crate::sys::storage;
use crate::Result;

/// qcow2's magic, at offset 0.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// A VHD footer's cookie.
const VHD_COOKIE: &[u8; 8] = b"conectix";

/// The container `file` holds.
pub fn detect(file: &File) -> Result<OutputFormat> {
    let size = storage::size_of(file)?;
    let mut first = [0u8; 512];
    let head = read_up_to(file, &mut first, 0)?;
    if head >= 4 && first[..4] == QCOW2_MAGIC[..] {
        return Ok(OutputFormat::Qcow2);
    }
    if head >= 8 && first[..8] == VHD_COOKIE[..] {
        return Ok(OutputFormat::Vhd);
    }
    if size >= 512 {
        let mut last = [0u8; 512];
        let tail = read_up_to(file, &mut last, size - 512)?;
        // A VHD footer may be 511 bytes long in files made by old Virtual PC versions.
        if tail >= 8 && (last[..8] == VHD_COOKIE[..] || last[1..9] == VHD_COOKIE[..]) {
            return Ok(OutputFormat::Vhd);
        }
    }
    Ok(OutputFormat::Luks)
}

/// Reads as much of `buffer` as the file has at `offset`.
fn read_up_to(file: &File, buffer: &mut [u8], offset: u64) -> Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read_at(&mut buffer[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(crate::Error::io(
                    format!("reading the image at offset {offset} to detect its format"),
                    e,
                ))
            }
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(head: &[u8], size: u64, tail: &[u8]) -> File {
        let mut file = tempfile::tempfile_in("/tmp").unwrap();
        file.write_all(head).unwrap();
        file.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(tail, size - tail.len() as u64).unwrap();
        file
    }

    #[test]
    fn containers_are_told_apart_by_content() {
        assert_eq!(
            detect(&file_with(b"QFI\xfb\0\0\0\x03", 4096, b"")).unwrap(),
            OutputFormat::Qcow2
        );
        assert_eq!(
            detect(&file_with(b"conectix", 4096, b"conectix")).unwrap(),
            OutputFormat::Vhd
        );
        let mut footer = [0u8; 512];
        footer[..8].copy_from_slice(VHD_COOKIE);
        assert_eq!(
            detect(&file_with(b"", 1 << 20, &footer)).unwrap(),
            OutputFormat::Vhd
        );
        assert_eq!(
            detect(&file_with(b"LUKS\xba\xbe", 4096, b"")).unwrap(),
            OutputFormat::Luks
        );
        assert_eq!(
            detect(&file_with(b"", 100, b"")).unwrap(),
            OutputFormat::Luks
        );
    }
}
