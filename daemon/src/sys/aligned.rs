//! Heap buffers aligned for O_DIRECT.
//!
//! O_DIRECT transfers need the memory address, the file offset and the length aligned to the
//! device's logical block size; 4096 covers every disk and filesystem we write to. The buffers
//! carry plaintext between reading the source and encrypting it, so they are zeroised before
//! their memory goes back to the allocator.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use zeroize::Zeroize;

use crate::{Error, Result};

/// Alignment of every [`AlignedBuffer`], enough for O_DIRECT on any device we meet.
pub const DIRECT_IO_ALIGNMENT: usize = 4096;

/// A zero-initialised heap buffer whose start is aligned to [`DIRECT_IO_ALIGNMENT`], zeroised on
/// drop.
pub struct AlignedBuffer {
    start: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer owns its allocation exclusively (like a `Box<[u8]>`), and `u8` is `Send`.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared access only hands out `&[u8]`; mutation needs `&mut self`.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    /// Allocates `len` zeroed bytes aligned to [`DIRECT_IO_ALIGNMENT`]. `len` must not be zero.
    pub fn new(len: usize) -> Result<Self> {
        let failure = |why: &str| {
            Error::io(
                format!("allocating a {len}-byte I/O buffer"),
                std::io::Error::new(std::io::ErrorKind::OutOfMemory, why.to_string()),
            )
        };
        if len == 0 {
            return Err(failure("an I/O buffer cannot be empty"));
        }
        let layout = Layout::from_size_align(len, DIRECT_IO_ALIGNMENT)
            .map_err(|_| failure("size too large for the address space"))?;
        // SAFETY: `layout` has a non-zero size (checked above) and a valid power-of-two
        // alignment (`from_size_align` succeeded).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let start = NonNull::new(raw).ok_or_else(|| failure("out of memory"))?;
        Ok(Self { start, layout })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: empty buffers cannot be made.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `start` points to `len` bytes we allocated, initialised (zeroed at allocation)
        // and owned by `self` until drop; the shared borrow of `self` prevents mutation for the
        // slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len()) }
    }

    /// The whole buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the exclusive borrow of `self` makes this the only
        // reference to the bytes for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.len()) }
    }
}

impl std::ops::Deref for AlignedBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The contents may be plaintext: show the shape only.
        f.debug_struct("AlignedBuffer")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // Volatile writes the optimiser may not drop, even though the memory is freed next.
        self.as_mut_slice().zeroize();
        // SAFETY: `start` came from `alloc_zeroed` with exactly `self.layout` and is freed once,
        // here.
        unsafe { alloc::dealloc(self.start.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_writable() {
        for len in [2usize, 512, 4096, 4097, 1 << 20, 3 << 20] {
            let mut buffer = AlignedBuffer::new(len).unwrap();
            assert_eq!(buffer.as_ptr() as usize % DIRECT_IO_ALIGNMENT, 0, "{len}");
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&b| b == 0), "{len}: not zeroed");
            buffer[len - 1] = 0x5a;
            buffer.as_mut_slice()[0] ^= 0xff;
            assert_eq!((buffer[0], buffer[len - 1]), (0xff, 0x5a));
            assert!(
                buffer[1..len - 1].iter().all(|&b| b == 0),
                "{len}: stray write"
            );
        }
    }

    #[test]
    fn empty_and_impossible_sizes_are_errors_not_aborts() {
        assert!(AlignedBuffer::new(0).is_err());
        assert!(AlignedBuffer::new(usize::MAX - 100).is_err());
    }

    #[test]
    fn debug_does_not_show_contents() {
        let mut buffer = AlignedBuffer::new(16).unwrap();
        buffer.fill(0xc3);
        let shown = format!("{buffer:?}");
        assert!(!shown.contains("195") && !shown.contains("c3"), "{shown}");
    }
}
