//! Reading a source's data without filling the page cache.
//!
//! A 40 GiB image read through the page cache evicts everything else the build host had cached,
//! and the kernel's `copy_to_iter` from the cache into our buffers was 70 % of the daemon's CPU
//! time during a copy. So the data ranges the format modules point at are read with O_DIRECT
//! where the file allows it, and otherwise through the page cache with `posix_fadvise`:
//! `SEQUENTIAL` (a larger read-ahead) on first use, and `DONTNEED` on every range once it is read,
//! so the cache never holds more than the read-ahead window of the source.
//!
//! # How O_DIRECT is obtained on a descriptor the client passed
//!
//! `fcntl(F_SETFL, O_DIRECT)` would change the *open file description*, which the client (and
//! every `dup` of it: the format modules' metadata reads) shares. Every unaligned read through
//! it would then fail with `EINVAL` — the client's own reads during the job, and our metadata
//! reads — and a daemon killed mid-job would leave the flag set on the client's file. So the
//! daemon instead opens a private, read-only description of the same file through the
//! `/proc/self/fd/N` magic link, with `O_RDONLY | O_DIRECT | O_CLOEXEC`. That is not a confused
//! deputy, and it is not an upgrade of the descriptor:
//!
//! - The magic link is not a path the user controls: the kernel follows it to the very file the
//!   descriptor refers to (its mount and dentry), not by resolving a name, so no rename or
//!   symlink race can substitute another file. The new descriptor is checked to be the same
//!   inode (`st_dev`, `st_ino`, and `st_rdev` for a block device) all the same.
//! - It is only done for a descriptor the client opened for reading (`O_RDONLY` or `O_RDWR`,
//!   never `O_WRONLY` or `O_PATH`), and the new one is read-only: it grants reading the same
//!   bytes the client already let us read, never writing, never more.
//! - It is only done for regular files and block devices, whose `open` has no side effects
//!   (FIFOs, terminals and sockets are refused before a reader exists).
//! - The open is checked against the daemon's own credentials, which hold no
//!   `CAP_DAC_OVERRIDE` ([`crate::sys::capabilities`]): a file the daemon could not open by itself
//!   (mode 0600 of another user) gets `EACCES`, and is read through the client's descriptor
//!   with the buffered fall-back. The reopen can fail where the client's descriptor works, never
//!   succeed where it would not.
//!
//! The same fall-back serves filesystems without O_DIRECT (ramfs, some FUSE and network
//! filesystems refuse it with `EINVAL`), files whose statx says O_DIRECT is unsupported, and a
//! direct read the kernel refuses after all. Both paths read the same bytes; only the page
//! cache and the CPU cost differ.
//!
//! # Alignment
//!
//! O_DIRECT needs the file offset, length and memory address aligned; `statx(STATX_DIOALIGN)`
//! says to what (512 bytes on this VM's ext4, so a dynamic VHD's blocks, which start one sector
//! after their bitmap, are read directly; 4096 is assumed where statx does not say). A request
//! that is not aligned goes through an aligned bounce buffer of at most [`BOUNCE_BYTES`]
//! covering the aligned range around it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use nix::fcntl::{fcntl, posix_fadvise, FcntlArg, OFlag, PosixFadviseAdvice};

use crate::sys::aligned::{AlignedBuffer, DIRECT_IO_ALIGNMENT};
use crate::sys::storage::{storage_kind, StorageKind};

/// Largest bounce buffer one unaligned direct read uses; longer requests go through it piece
/// by piece.
pub const BOUNCE_BYTES: usize = 1 << 20;

/// `STATX_DIOALIGN` from <linux/stat.h> (Linux 6.1), not in the libc crate yet.
const STATX_DIOALIGN: u32 = 0x2000;

/// How a [`SourceFile`] reads data ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// O_DIRECT through a private read-only description, aligned as statx said.
    Direct {
        /// Alignment of file offsets and lengths.
        offset_align: u64,
        /// Alignment of buffer addresses.
        memory_align: usize,
    },
    /// Through the client's descriptor and the page cache, with `posix_fadvise`.
    Buffered,
}

/// One of a source's files, with the daemon's way of reading its data.
///
/// The private O_DIRECT description is opened on the first data read (so `inspect` and the
/// format modules' metadata reads never open one) and closed with the reader.
#[derive(Debug)]
pub struct SourceFile {
    file: Arc<File>,
    /// Whether O_DIRECT may be tried at all (a test or benchmark may forbid it).
    allow_direct: bool,
    direct: OnceLock<Option<DirectFile>>,
    /// Set when a direct read was refused after the open succeeded: read buffered from then on.
    direct_refused: AtomicBool,
    /// Whether `POSIX_FADV_SEQUENTIAL` was given (once, on the first buffered data read).
    advised: AtomicBool,
    /// The span of buffered data reads, to drop what read-ahead left behind at the end.
    buffered_low: AtomicU64,
    buffered_high: AtomicU64,
}

#[derive(Debug)]
struct DirectFile {
    file: File,
    offset_align: u64,
    memory_align: usize,
}

impl SourceFile {
    /// A reader of `file` that uses O_DIRECT where it can.
    pub fn new(file: Arc<File>) -> Self {
        Self::with_direct(file, true)
    }

    /// A reader of `file`; `allow_direct = false` always takes the buffered path (tests and
    /// benchmarks of the fall-back on a filesystem that has O_DIRECT).
    pub fn with_direct(file: Arc<File>, allow_direct: bool) -> Self {
        Self {
            file,
            allow_direct,
            direct: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
            advised: AtomicBool::new(false),
            buffered_low: AtomicU64::new(u64::MAX),
            buffered_high: AtomicU64::new(0),
        }
    }

    /// The client's descriptor, for metadata reads (buffered, small, cached like any metadata).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// How data reads are done (opening the private description if not yet tried).
    pub fn mode(&self) -> ReadMode {
        match self.direct_file() {
            Some(direct) => ReadMode::Direct {
                offset_align: direct.offset_align,
                memory_align: direct.memory_align,
            },
            None => ReadMode::Buffered,
        }
    }

    fn direct_file(&self) -> Option<&DirectFile> {
        if self.direct_refused.load(Ordering::Relaxed) {
            return None;
        }
        self.direct
            .get_or_init(|| {
                if !self.allow_direct {
                    return None;
                }
                let direct = open_direct(&self.file).unwrap_or_else(|error| {
                    tracing::debug!(%error, "no O_DIRECT description of the source");
                    None
                });
                match &direct {
                    Some(direct) => tracing::debug!(
                        offset_align = direct.offset_align,
                        memory_align = direct.memory_align,
                        "source data reads: O_DIRECT"
                    ),
                    None => tracing::debug!(
                        "source data reads: through the page cache, dropped behind the reader"
                    ),
                }
                direct
            })
            .as_ref()
    }

    /// Fills `buffer` with the file's bytes at `offset` (a data range a format module pointed
    /// at), bypassing the page cache where possible. Like [`FileExt::read_exact_at`], reaching
    /// the end of the file first is an `UnexpectedEof` error.
    pub fn read_data(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        if let Some(direct) = self.direct_file() {
            match direct.read_exact_at(buffer, offset) {
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    // The filesystem took the flag at open but refuses this read (a file it
                    // cannot read directly): fall back for good, and say so once.
                    if !self.direct_refused.swap(true, Ordering::Relaxed) {
                        tracing::info!(%error, "O_DIRECT read refused; reading the source \
                                        through the page cache");
                    }
                }
                other => return other,
            }
        }
        self.read_buffered(buffer, offset)
    }

    /// Fills `buffer` from `offset` through the page cache (compressed streams and other small
    /// unaligned reads), then drops those pages from the cache.
    pub fn read_buffered(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.advised.swap(true, Ordering::Relaxed) {
            // A read-ahead hint on the client's description: it changes no access and no
            // result, and is put back to the default when the reader is dropped.
            advise(&self.file, 0, 0, PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
        }
        self.file.read_exact_at(buffer, offset)?;
        let end = offset + buffer.len() as u64;
        self.buffered_low.fetch_min(offset, Ordering::Relaxed);
        self.buffered_high.fetch_max(end, Ordering::Relaxed);
        // Behind the reader: these pages were read once and will not be read again.
        advise(
            &self.file,
            offset,
            buffer.len() as u64,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        Ok(())
    }
}

impl Drop for SourceFile {
    fn drop(&mut self) {
        if !self.advised.load(Ordering::Relaxed) {
            return;
        }
        // What read-ahead fetched past the last data read, and the partial pages at the edges
        // of each read, are still cached: drop the whole span the copy read.
        let (low, high) = (
            self.buffered_low.load(Ordering::Relaxed),
            self.buffered_high.load(Ordering::Relaxed),
        );
        if low < high {
            let page = 4096;
            let start = low / page * page;
            // Read-ahead reaches at most a few MiB past the last read.
            let end = high.saturating_add(16 << 20);
            advise(
                &self.file,
                start,
                end - start,
                PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
        advise(&self.file, 0, 0, PosixFadviseAdvice::POSIX_FADV_NORMAL);
    }
}

/// `posix_fadvise`, whose failure (a pipe would be refused long before; a filesystem may ignore
/// advice) costs only the page cache, so it is logged, never fatal.
fn advise(file: &File, offset: u64, len: u64, advice: PosixFadviseAdvice) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    if let Err(errno) = posix_fadvise(file, offset, len, advice) {
        tracing::debug!(%errno, ?advice, "posix_fadvise on the source failed");
    }
}

/// Opens a private read-only O_DIRECT description of `file` (see the module documentation for
/// why this is safe), or `None` where O_DIRECT cannot be had; an error only for what should not
/// happen (and is then logged and treated as `None` by the caller).
fn open_direct(file: &File) -> io::Result<Option<DirectFile>> {
    let kind = storage_kind(file).map_err(io::Error::other)?;
    if !matches!(kind, StorageKind::RegularFile | StorageKind::BlockDevice) {
        return Ok(None);
    }
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL).map_err(io::Error::from)?);
    let readable = matches!(flags & OFlag::O_ACCMODE, OFlag::O_RDONLY | OFlag::O_RDWR);
    if !readable || flags.contains(OFlag::O_PATH) {
        // Never read more than the client's descriptor lets us.
        return Ok(None);
    }
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    let direct = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_NOCTTY)
        .open(&link)
    {
        Ok(direct) => direct,
        // EINVAL: the filesystem has no O_DIRECT. EACCES/EPERM: the daemon's own credentials
        // may not open the file. ENOENT: no /proc. All fall back to buffered reads.
        Err(error)
            if matches!(
                error.raw_os_error(),
                Some(libc::EINVAL | libc::EACCES | libc::EPERM | libc::ENOENT | libc::EOPNOTSUPP)
            ) =>
        {
            tracing::debug!(%error, "no O_DIRECT description of the source");
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    let (ours, theirs) = (direct.metadata()?, file.metadata()?);
    if (ours.dev(), ours.ino(), ours.rdev()) != (theirs.dev(), theirs.ino(), theirs.rdev()) {
        return Err(io::Error::other(
            "the reopened source is not the file the client passed",
        ));
    }
    let Some((offset_align, memory_align)) = dio_alignment(&direct, kind) else {
        return Ok(None);
    };
    Ok(Some(DirectFile {
        file: direct,
        offset_align,
        memory_align,
    }))
}

/// `(offset, memory)` alignment of O_DIRECT on `file` from `statx(STATX_DIOALIGN)`; 4096 for
/// both where statx does not answer; `None` where it says the file has no O_DIRECT.
fn dio_alignment(file: &File, kind: StorageKind) -> Option<(u64, usize)> {
    let fallback = Some((DIRECT_IO_ALIGNMENT as u64, DIRECT_IO_ALIGNMENT));
    // SAFETY: `libc::statx` is a plain C struct of integers, for which all-zero bytes are a
    // valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `statx` only writes into `stx`, which lives on our stack for the call; the path is
    // an empty C string with AT_EMPTY_PATH, so the descriptor (open for the whole call,
    // borrowed from `file`) is what is examined.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & STATX_DIOALIGN == 0 {
        return fallback;
    }
    if stx.stx_dio_offset_align == 0 {
        // Block devices answer STATX_DIOALIGN only since Linux 6.11, and before that say 0; a
        // regular file saying 0 has no O_DIRECT.
        return if kind == StorageKind::BlockDevice {
            fallback
        } else {
            None
        };
    }
    let offset_align = u64::from(stx.stx_dio_offset_align);
    let memory_align = (stx.stx_dio_mem_align as usize).max(1);
    // Our buffers are 4096-aligned; a stricter requirement than that gets bounce buffers only
    // if it is still within what AlignedBuffer provides.
    if offset_align > DIRECT_IO_ALIGNMENT as u64 || memory_align > DIRECT_IO_ALIGNMENT {
        return None;
    }
    Some((offset_align, memory_align))
}

impl DirectFile {
    fn aligned(&self, buffer: &[u8], offset: u64) -> bool {
        offset % self.offset_align == 0
            && buffer.len() as u64 % self.offset_align == 0
            && buffer.as_ptr() as usize % self.memory_align == 0
    }

    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        if self.aligned(buffer, offset) {
            let got = read_until_eof(&self.file, buffer, offset, self.offset_align)?;
            return if got == buffer.len() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "failed to fill whole buffer",
                ))
            };
        }
        // Through an aligned bounce buffer covering the aligned range around each piece.
        let align = self.offset_align;
        let mut bounce = AlignedBuffer::new(BOUNCE_BYTES).map_err(io::Error::other)?;
        let mut done = 0usize;
        while done < buffer.len() {
            let at = offset + done as u64;
            let start = at / align * align;
            let skip = (at - start) as usize;
            let want = (buffer.len() - done).min(BOUNCE_BYTES - skip);
            let span = ((skip + want) as u64).div_ceil(align) * align;
            let got = read_until_eof(&self.file, &mut bounce[..span as usize], start, align)?;
            if got < skip + want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "failed to fill whole buffer",
                ));
            }
            buffer[done..done + want].copy_from_slice(&bounce[skip..skip + want]);
            done += want;
        }
        Ok(())
    }
}

/// Reads into `buffer` at `offset` (both `align`ed) until it is full or the file ends; the
/// bytes read. A direct read that stops off the alignment has met the end of the file: asking
/// again there would be refused (`EINVAL`), so it stops.
fn read_until_eof(file: &File, buffer: &mut [u8], offset: u64, align: u64) -> io::Result<usize> {
    let mut got = 0usize;
    while got < buffer.len() {
        match file.read_at(&mut buffer[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(count) => {
                got += count;
                if (offset + got as u64) % align != 0 {
                    break;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Pages of `file` in the page cache, by mmap + mincore.
    fn resident_pages(file: &File) -> usize {
        let len = file.metadata().unwrap().len() as usize;
        if len == 0 {
            return 0;
        }
        let page = 4096usize;
        // SAFETY: a fresh shared read-only mapping of the whole file; nothing else aliases it,
        // and it is unmapped below before returning.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_fd().as_raw_fd(),
                0,
            )
        };
        assert_ne!(address, libc::MAP_FAILED);
        let mut vector = vec![0u8; len.div_ceil(page)];
        // SAFETY: `address..address + len` is the mapping made above, and `vector` has one
        // byte per page of it, as mincore writes.
        let rc = unsafe { libc::mincore(address, len, vector.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: unmaps exactly the mapping made above, which nothing references any more.
        unsafe { libc::munmap(address, len) };
        vector.iter().filter(|&&byte| byte & 1 == 1).count()
    }

    /// A file of `len` pattern bytes on ext4 (/tmp) whose pages are not in the page cache.
    fn uncached_file(len: usize) -> (tempfile::NamedTempFile, Arc<File>) {
        let named = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        named.as_file().write_all_at(&pattern(len), 0).unwrap();
        named.as_file().sync_all().unwrap();
        advise(
            named.as_file(),
            0,
            0,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        let file = Arc::new(File::open(named.path()).unwrap());
        assert_eq!(resident_pages(&file), 0, "the test file is still cached");
        (named, file)
    }

    /// Reads `file` through `reader` in pieces of every kind of alignment and checks the bytes.
    fn read_all_checked(reader: &SourceFile, len: usize) {
        let expected = pattern(len);
        let mut buffer = AlignedBuffer::new(4 << 20).unwrap();
        let mut offset = 0usize;
        // Aligned 4 MiB pieces, then an odd one, one at a sector, and the unaligned tail.
        for piece in [4 << 20, 4 << 20, 1000, 3 << 9, 4096 + 17] {
            let piece = piece.min(len - offset);
            reader
                .read_data(&mut buffer[..piece], offset as u64)
                .unwrap();
            assert!(
                buffer[..piece] == expected[offset..offset + piece],
                "at {offset}"
            );
            offset += piece;
        }
        let rest = len - offset;
        // An unaligned memory address too.
        reader
            .read_data(&mut buffer[1..1 + rest], offset as u64)
            .unwrap();
        assert!(buffer[1..1 + rest] == expected[offset..]);
    }

    const LEN: usize = (8 << 20) + 8192 + 333;

    #[test]
    fn direct_reads_leave_the_page_cache_empty_and_the_client_flags_alone() {
        let (_named, file) = uncached_file(LEN);
        let flags_before = fcntl(&*file, FcntlArg::F_GETFL).unwrap();
        let reader = SourceFile::new(Arc::clone(&file));
        assert!(
            matches!(reader.mode(), ReadMode::Direct { .. }),
            "{:?}",
            reader.mode()
        );
        read_all_checked(&reader, LEN);
        // The client's description never had O_DIRECT.
        assert_eq!(fcntl(&*file, FcntlArg::F_GETFL).unwrap(), flags_before);
        drop(reader);
        assert_eq!(resident_pages(&file), 0);
        // Past the end: an EOF error, as read_exact_at gives.
        let reader = SourceFile::new(Arc::clone(&file));
        let mut buffer = AlignedBuffer::new(8192).unwrap();
        let error = reader
            .read_data(&mut buffer, LEN as u64 - 4096)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn buffered_fallback_drops_what_it_read() {
        let (_named, file) = uncached_file(LEN);
        let reader = SourceFile::with_direct(Arc::clone(&file), false);
        assert_eq!(reader.mode(), ReadMode::Buffered);
        read_all_checked(&reader, LEN);
        drop(reader);
        assert_eq!(resident_pages(&file), 0);
    }

    #[test]
    fn plain_buffered_reads_do_fill_the_cache() {
        // The control for the two tests above: mincore sees pages a normal read caches.
        let (_named, file) = uncached_file(LEN);
        let mut buffer = vec![0u8; LEN];
        file.read_exact_at(&mut buffer, 0).unwrap();
        assert!(resident_pages(&file) >= LEN / 4096);
    }

    #[test]
    fn write_only_and_path_descriptors_are_never_reopened() {
        let named = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        named.as_file().write_all_at(&pattern(8192), 0).unwrap();
        let write_only = std::fs::OpenOptions::new()
            .write(true)
            .open(named.path())
            .unwrap();
        assert!(open_direct(&write_only).unwrap().is_none());
        let path_only = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(named.path())
            .unwrap();
        assert!(open_direct(&path_only).unwrap().is_none());
        let readable = File::open(named.path()).unwrap();
        let direct = open_direct(&readable).unwrap().expect("ext4 has O_DIRECT");
        // The private description is read-only and direct.
        let flags = OFlag::from_bits_retain(fcntl(&direct.file, FcntlArg::F_GETFL).unwrap());
        assert_eq!(flags & OFlag::O_ACCMODE, OFlag::O_RDONLY);
        assert!(flags.contains(OFlag::O_DIRECT));
    }

    #[test]
    fn a_filesystem_without_o_direct_reads_buffered() {
        // ramfs refuses O_DIRECT (tmpfs accepts it since Linux 6.6). Mounting needs root.
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting ramfs (the tests run as root)");
        let path = dir.path().join("image");
        std::fs::write(&path, pattern(LEN)).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let reader = SourceFile::new(Arc::clone(&file));
        let mode = reader.mode();
        read_all_checked(&reader, LEN);
        drop((reader, file));
        let unmounted = std::process::Command::new("umount")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(unmounted.success());
        assert_eq!(mode, ReadMode::Buffered);
    }
}
