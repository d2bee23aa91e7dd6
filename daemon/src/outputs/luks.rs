//! Raw LUKS: the header libcryptsetup formatted, then the whole payload as one extent, the way
//! dm-crypt maps it (plain64 IVs counted from the payload's start).
//!
//! The layout rule (header plus virtual size, rounded up to a MiB) is [`crate::luks::layout`]'s;
//! this module turns it into the shared pipeline's terms and copies the header in last.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{Container, Extent, Payload};
use crate::luks::layout;
use crate::{Error, Result};

/// Chunk used to copy the header from daemon memory into the output.
const HEADER_COPY_CHUNK: usize = 1 << 20;

/// A raw LUKS output planned around a formatted header.
#[derive(Debug)]
pub struct LuksOutput {
    /// A duplicate of the header's memfd: the header is read from it only when the metadata is
    /// written, so a keyslot derived meanwhile is in it.
    header: File,
    data_offset: u64,
    extents: [Extent; 1],
    output_size: u64,
}

impl LuksOutput {
    /// Plans the output of a `virtual_size`-byte disk behind `header` (a daemon-owned memfd
    /// whose first `data_offset` bytes are the header by the time the metadata is written, as
    /// [`crate::luks::start_format`] formats it).
    pub fn plan(header: &File, data_offset: u64, virtual_size: u64) -> Result<Self> {
        let output_size = layout::output_size(data_offset, virtual_size)?;
        let header = header
            .try_clone()
            .map_err(|error| Error::io("duplicating the LUKS header's memfd", error))?;
        Ok(Self {
            header,
            data_offset,
            extents: [payload_extent(data_offset, output_size - data_offset)],
            output_size,
        })
    }

    /// Byte offset of the payload (the header's size).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Encrypted payload bytes.
    pub fn payload_size(&self) -> u64 {
        self.extents[0].length
    }
}

impl Container for LuksOutput {
    fn payload(&self) -> Payload<'_> {
        Payload::Planned(&self.extents)
    }

    fn output_size(&self) -> u64 {
        self.output_size
    }

    fn write_metadata(&self, output: &File) -> Result<()> {
        copy_header(&self.header, output, self.data_offset)
    }
}

/// The one extent of a raw LUKS payload: `payload_size` bytes at `data_offset`, IVs from 0.
pub fn payload_extent(data_offset: u64, payload_size: u64) -> Extent {
    Extent {
        guest_offset: 0,
        length: payload_size,
        output_offset: data_offset,
        first_iv: 0,
    }
}

/// Copies `0..length` of a formatted header (a daemon memfd) into the output at offset 0.
pub fn copy_header(header: &File, output: &File, length: u64) -> Result<()> {
    copy_header_to(header, output, length, 0)
}

/// Copies `0..length` of a formatted header into the output at `output_offset` (a container
/// keeps its LUKS header inside the file).
pub fn copy_header_to(header: &File, output: &File, length: u64, output_offset: u64) -> Result<()> {
    copy_header_span(header, 0, output, output_offset, length)
}

/// Copies `length` bytes of a header from `header_offset` of `header` to `output_offset` of
/// `output` (a header saved inside a container is read back to a memfd of its own).
pub fn copy_header_span(
    header: &File,
    header_offset: u64,
    output: &File,
    output_offset: u64,
    length: u64,
) -> Result<()> {
    let mut buffer = vec![0u8; HEADER_COPY_CHUNK];
    let mut offset = 0;
    while offset < length {
        let chunk = (length - offset).min(HEADER_COPY_CHUNK as u64) as usize;
        let from = header_offset + offset;
        header
            .read_exact_at(&mut buffer[..chunk], from)
            .map_err(|e| Error::io(format!("reading the formatted header at {from}"), e))?;
        let at = output_offset + offset;
        output.write_all_at(&buffer[..chunk], at).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                Error::NoSpace {
                    required_bytes: output_offset + length,
                    message: format!(
                        "not enough space for the output: writing its {length}-byte LUKS header \
                         failed; free space or write it to another filesystem"
                    ),
                }
            } else {
                Error::io(format!("writing the header to the output at {at}"), e)
            }
        })?;
        offset += chunk as u64;
    }
    Ok(())
}
