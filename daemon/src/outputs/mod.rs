//! Output containers, one module per format: where each run of the encrypted payload goes in
//! the output file, under which IV, and the metadata written around it.
//!
//! Data flows one way. A source format ([`crate::formats`]) says where the guest's bytes are;
//! an output format plans the file as a list of [`Extent`]s (guest bytes → file offset and IV)
//! plus its metadata; the one shared pipeline ([`crate::engines`]) reads, encrypts and writes
//! every extent; the container then writes its metadata ([`Container::write_metadata`]), with
//! the bytes that make the file a valid image last, so an interrupted job never leaves a file a
//! reader accepts. A new output format is a new module here, never a new copy loop.
//!
//! - [`luks`]: raw LUKS, the whole payload as one extent after the header (dm-crypt's layout);
//! - [`qcow2`]: qcow2 v3 with qemu's LUKS encryption (IBM Cloud VPC, OpenStack);
//! - [`vhd`]: a dynamic VHD encrypted the way blktap's `vhd-util copy -k` does (IBM Cloud
//!   classic).

pub mod luks;
pub mod qcow2;
pub mod vhd;

use std::fs::File;

use crate::Result;

/// One run of the payload: guest bytes and where their ciphertext lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest (virtual-disk) byte of the run; a multiple of the encryption sector size.
    pub guest_offset: u64,
    /// Bytes in the run; a multiple of the sector size. Bytes past the source's end are
    /// encrypted zeros.
    pub length: u64,
    /// Where `guest_offset`'s ciphertext goes in the output file. When every extent's offset
    /// and length are multiples of 4096 the pipeline writes with O_DIRECT; otherwise through
    /// the page cache.
    pub output_offset: u64,
    /// IV of the run's first 512 bytes; it grows by one per 512 bytes (dm-crypt's rule).
    pub first_iv: u64,
}

impl Extent {
    /// The guest byte just past the run.
    pub fn guest_end(&self) -> u64 {
        self.guest_offset + self.length
    }
}

/// What an output format tells the shared pipeline.
pub trait Container: Send + Sync {
    /// Where the payload goes: sorted by guest offset, disjoint.
    fn extents(&self) -> &[Extent];

    /// The output file's final length. Container outputs are sparse: what no extent or
    /// metadata covers stays a hole.
    fn output_size(&self) -> u64;

    /// Writes everything that is not payload. Called after the whole payload is written and
    /// before `fdatasync`; the bytes that make the file look like a valid image go last.
    fn write_metadata(&self, output: &File) -> Result<()>;
}

/// Checks the invariants every container promises, so a planning bug surfaces as an error
/// rather than as a corrupt image: extents sorted, disjoint in the guest and in the file,
/// sector-aligned, inside `output_size`.
pub fn check_extents(extents: &[Extent], sector_size: u64, output_size: u64) -> Result<()> {
    let problem = |message: String| {
        Err(crate::Error::io(
            "planning the output",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
        ))
    };
    for extent in extents {
        if extent.guest_offset % sector_size != 0 || extent.length % sector_size != 0 {
            return problem(format!(
                "extent {extent:?} is not aligned to the {sector_size}-byte sector"
            ));
        }
        let end = extent.output_offset.checked_add(extent.length);
        if end.is_none_or(|end| end > output_size) || extent.length == 0 {
            return problem(format!(
                "extent {extent:?} is empty or ends past the {output_size}-byte output"
            ));
        }
    }
    for pair in extents.windows(2) {
        if pair[0].guest_end() > pair[1].guest_offset {
            return problem(format!(
                "extents {:?} and {:?} overlap or are out of order",
                pair[0], pair[1]
            ));
        }
    }
    let mut by_file: Vec<(u64, u64)> = extents
        .iter()
        .map(|e| (e.output_offset, e.output_offset + e.length))
        .collect();
    by_file.sort_unstable();
    if by_file.windows(2).any(|pair| pair[0].1 > pair[1].0) {
        return problem("two extents overlap in the output file".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(guest_offset: u64, length: u64, output_offset: u64) -> Extent {
        Extent {
            guest_offset,
            length,
            output_offset,
            first_iv: 0,
        }
    }

    #[test]
    fn planning_bugs_are_caught() {
        let good = [extent(0, 4096, 8192), extent(8192, 512, 4096)];
        check_extents(&good, 512, 16384).unwrap();
        // Out of guest order, overlapping in the guest, in the file, unaligned, past the end.
        assert!(check_extents(&[good[1], good[0]], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 4096, 0), extent(512, 512, 8192)], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 4096, 0), extent(4096, 512, 1024)], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 1000, 0)], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 4096, 16000)], 512, 16384).is_err());
        assert!(check_extents(&[extent(0, 0, 0)], 512, 16384).is_err());
    }
}
