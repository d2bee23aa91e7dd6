//! RAW images, and the flat data area of fixed VHDs: the guest's byte N is the file's byte N.
//!
//! A RAW image's virtual size is the file's (or block device's) size, whatever it is; it need
//! not be a multiple of 512. A fixed VHD is the same mapping cut short before its footer, so
//! [`super::vhd`] reuses the same layout for it. Reads go through the shared
//! [`LayeredImage`]; this module only says that everything is where it is.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use imgcrypt_proto::api::SourceFormat;

use super::data_ranges;
use super::layout::{Chunk, LayeredImage, Layout, Mapped};
use crate::formats::layout::heap_bytes;
use crate::sys::storage::StorageKind;
use crate::Result;

/// A disk whose bytes are stored in order from offset 0 of its file.
#[derive(Debug)]
pub struct Flat {
    format: SourceFormat,
    virtual_size: u64,
    allocated: Vec<Range<u64>>,
}

/// Opens `file` as a RAW disk of `file_size` bytes.
pub fn open(file: File, kind: StorageKind, file_size: u64) -> Result<LayeredImage> {
    flat(file, kind, SourceFormat::Raw, file_size)
}

/// Opens the first `virtual_size` bytes of `file` as a disk reported as `format`. The caller
/// has checked that the file holds at least `virtual_size` bytes.
pub(super) fn flat(
    file: File,
    kind: StorageKind,
    format: SourceFormat,
    virtual_size: u64,
) -> Result<LayeredImage> {
    let allocated = data_ranges(&file, kind, virtual_size)?;
    let layout = Flat {
        format,
        virtual_size,
        allocated,
    };
    Ok(LayeredImage::new(Box::new(layout), vec![Arc::new(file)]))
}

impl Layout for Flat {
    fn metadata_bytes(&self) -> u64 {
        heap_bytes(&self.allocated)
    }

    fn format(&self) -> SourceFormat {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapped> {
        Ok(Mapped {
            len,
            chunk: Chunk::Data { file: 0, offset },
        })
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.allocated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::open;
    use crate::Error;
    use std::os::unix::fs::FileExt;

    #[test]
    fn odd_sized_raw_file_reads_back_exactly() {
        let file = tempfile::tempfile_in("/tmp").unwrap();
        let content: Vec<u8> = (0..10_007u32).map(|i| (i * 7 % 251) as u8).collect();
        file.write_all_at(&content, 0).unwrap();
        let image = open(file).unwrap();
        assert_eq!(image.format(), SourceFormat::Raw);
        assert_eq!(image.virtual_size(), 10_007);
        let mut back = vec![0u8; 10_007];
        image.read_at(&mut back, 0).unwrap();
        assert_eq!(back, content);
        let mut middle = vec![0u8; 1000];
        image.read_at(&mut middle, 4321).unwrap();
        assert_eq!(middle, content[4321..5321]);
        let whole: Range<u64> = 0..10_007;
        assert_eq!(image.allocated_ranges(), [whole]);
    }

    #[test]
    fn empty_file_is_an_empty_raw_disk() {
        let file = tempfile::tempfile_in("/tmp").unwrap();
        let image = open(file).unwrap();
        assert_eq!(image.format(), SourceFormat::Raw);
        assert_eq!(image.virtual_size(), 0);
        assert!(image.allocated_ranges().is_empty());
        image.read_at(&mut [], 0).unwrap();
    }

    #[test]
    fn read_past_virtual_size_is_an_error_not_a_panic() {
        let file = tempfile::tempfile_in("/tmp").unwrap();
        file.set_len(4096).unwrap();
        let image = open(file).unwrap();
        let mut buffer = [0u8; 512];
        assert!(matches!(
            image.read_at(&mut buffer, 4000),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn shrinking_the_file_after_open_reads_as_truncated() {
        let file = tempfile::tempfile_in("/tmp").unwrap();
        file.write_all_at(&[9u8; 8192], 0).unwrap();
        let twin = file.try_clone().unwrap();
        let image = open(file).unwrap();
        twin.set_len(4096).unwrap();
        let mut buffer = [0u8; 8192];
        match image.read_at(&mut buffer, 0).unwrap_err() {
            Error::CorruptImage { message, offset } => {
                assert!(message.contains("truncated"), "{message}");
                assert_eq!(offset, Some(0));
            }
            other => panic!("expected CorruptImage, got {other:?}"),
        }
    }

    #[test]
    fn sparse_raw_reports_only_its_data() {
        let file = tempfile::tempfile_in("/tmp").unwrap();
        file.set_len(32 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 20 << 20).unwrap();
        let image = open(file).unwrap();
        let written: Range<u64> = (20 << 20)..(20 << 20) + 4096;
        assert_eq!(image.allocated_ranges(), [written]);
        let mut buffer = vec![0xffu8; 1 << 20];
        image.read_at(&mut buffer, 0).unwrap();
        assert!(buffer.iter().all(|&b| b == 0));
    }
}
