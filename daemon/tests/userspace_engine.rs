//! The userspace engine against real files: what it writes must decrypt, with an independent
//! AES-XTS (Python `cryptography`), to the source followed by zeros; it must leave the rest of
//! the output and the descriptor's flags as it found them; and its failures must be the right
//! ones.
//!
//! The source is an in-memory `SourceImage` (the engine's input, not the thing under test) that
//! refuses reads outside its allocated ranges, so every test also checks that holes are skipped.

mod support;

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use imgcrypt_proto::api::SourceFormat;
use imgcryptd::engines::userspace::UserspaceEngine;
use imgcryptd::engines::xts::IvMode;
use imgcryptd::engines::{Engine, PayloadJob};
use imgcryptd::error::Descriptor;
use imgcryptd::formats::SourceImage;
use imgcryptd::outputs::luks::payload_extent;
use imgcryptd::{Error, Result};
use support::{python_xts_file, Direction, Rng, ScratchMount};

const MIB: u64 = 1 << 20;
/// What the output holds before the engine runs, so untouched bytes are recognisable.
const FILLER: u8 = 0xab;

/// A source image in memory. Reads that touch an unallocated byte fail: the engine must zero-fill
/// holes, not read them.
#[derive(Debug)]
struct MemorySource {
    data: Vec<u8>,
    allocated: Vec<Range<u64>>,
    /// Reads covering this offset fail after 100 ms with a corrupt-image error.
    fail_at: Option<u64>,
    /// Reads starting at or past this offset fail after 400 ms with a different error.
    fail_later_from: Option<u64>,
}

impl MemorySource {
    /// `size` bytes, with random data in `allocated` and zeros elsewhere.
    fn fully_allocated(size: u64, rng: &mut Rng) -> Self {
        let mut source = Self::new(size, Vec::new(), rng);
        source.data = rng.bytes(size as usize);
        source.allocated.push(0..size);
        source
    }

    fn new(size: u64, allocated: Vec<Range<u64>>, rng: &mut Rng) -> Self {
        let mut data = vec![0u8; size as usize];
        for range in &allocated {
            let bytes = rng.bytes((range.end - range.start) as usize);
            data[range.start as usize..range.end as usize].copy_from_slice(&bytes);
        }
        Self {
            data,
            allocated,
            fail_at: None,
            fail_later_from: None,
        }
    }
}

impl SourceImage for MemorySource {
    fn format(&self) -> SourceFormat {
        SourceFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, buffer: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buffer.len() as u64;
        if let Some(at) = self.fail_at.filter(|at| (offset..end).contains(at)) {
            std::thread::sleep(Duration::from_millis(100));
            return Err(Error::corrupt("injected first failure", Some(at)));
        }
        if self.fail_later_from.is_some_and(|from| offset >= from) {
            std::thread::sleep(Duration::from_millis(400));
            return Err(Error::corrupt("injected later failure", Some(offset)));
        }
        let inside = self
            .allocated
            .iter()
            .any(|r| r.start <= offset && end <= r.end);
        assert!(
            inside && end <= self.virtual_size(),
            "engine read {offset}..{end}, outside the allocated ranges"
        );
        buffer.copy_from_slice(&self.data[offset as usize..end as usize]);
        Ok(())
    }

    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.allocated
    }
}

/// An output file of `len` bytes of [`FILLER`] in `dir`.
fn filled_output(dir: &Path, len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new_in(dir).unwrap();
    file.as_file()
        .write_all_at(&vec![FILLER; len as usize], 0)
        .unwrap();
    file
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// The file status flags of `file` as the kernel reports them (octal `flags:` in fdinfo).
fn fdinfo_flags(file: &File) -> u32 {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).unwrap();
    let line = info.lines().find(|l| l.starts_with("flags:")).unwrap();
    u32::from_str_radix(line["flags:".len()..].trim(), 8).unwrap()
}

const O_DIRECT: u32 = libc::O_DIRECT as u32;

/// What a run saw.
struct Run {
    result: Result<u64>,
    progress: Vec<u64>,
    /// Whether O_DIRECT was on the output at each progress call.
    direct_during: Vec<bool>,
}

/// The job's numbers, and when (after how many progress calls) to cancel it.
struct Spec<'k> {
    data_offset: u64,
    payload_size: u64,
    sector_size: u32,
    key: &'k [u8],
    cancel_after: Option<usize>,
}

impl<'k> Spec<'k> {
    fn new(data_offset: u64, payload_size: u64, sector_size: u32, key: &'k [u8]) -> Self {
        Self {
            data_offset,
            payload_size,
            sector_size,
            key,
            cancel_after: None,
        }
    }
}

fn run(engine: &UserspaceEngine, source: &MemorySource, output: &File, spec: &Spec<'_>) -> Run {
    let Spec {
        data_offset,
        payload_size,
        sector_size,
        key,
        cancel_after,
    } = *spec;
    let progress = Mutex::new(Vec::new());
    let direct_during = Mutex::new(Vec::new());
    let cancel = AtomicBool::new(false);
    let on_progress = |bytes: u64| {
        let mut calls = progress.lock().unwrap();
        calls.push(bytes);
        direct_during
            .lock()
            .unwrap()
            .push(fdinfo_flags(output) & O_DIRECT != 0);
        if cancel_after.is_some_and(|n| calls.len() >= n) {
            cancel.store(true, Ordering::SeqCst);
        }
    };
    let extents = [payload_extent(data_offset, payload_size)];
    let job = PayloadJob {
        job_id: 1,
        source,
        output,
        extents: &extents,
        sector_size,
        key,
        iv: IvMode::Plain64,
        progress: &on_progress,
        cancel: &cancel,
    };
    let result = engine.write_payload(&job);
    Run {
        result,
        progress: progress.into_inner().unwrap(),
        direct_during: direct_during.into_inner().unwrap(),
    }
}

/// Encrypts a source with holes at a non-zero data offset and checks everything the output
/// holds, decrypting with Python `cryptography`.
fn encrypt_and_verify(dir: &Path, sector_size: u32, expect_direct: bool) {
    let mut rng = Rng::from_env_or_clock();
    let key = rng.bytes(64);
    // Not a multiple of the chunk size, of 1 MiB or even of 4096: the tail is encrypted zeros.
    let source_size = 2 * MIB + 300 * 1024 + 512;
    let allocated = vec![
        0..3000,
        70_000..200_000,
        200_000..200_512,
        MIB - 4096..MIB + 123_456,
        2 * MIB + 100_000..source_size,
    ];
    let source = MemorySource::new(source_size, allocated, &mut rng);
    let payload_size = 3 * MIB;
    let data_offset = 5 * 4096;
    let trailer = 8192;
    let output_file = filled_output(dir, data_offset + payload_size + trailer);
    let output = open_rw(output_file.path());
    let flags_before = fdinfo_flags(&output);

    let engine = UserspaceEngine::with_config(3, 64 * 1024).unwrap();
    let seen = run(
        &engine,
        &source,
        &output,
        &Spec::new(data_offset, payload_size, sector_size, &key),
    );
    assert_eq!(seen.result.unwrap(), payload_size);
    assert_eq!(fdinfo_flags(&output), flags_before, "flags not restored");
    assert!(
        seen.direct_during.iter().all(|&d| d == expect_direct),
        "O_DIRECT during the copy: expected {expect_direct}, saw {:?}",
        seen.direct_during
    );
    assert!(
        seen.progress.windows(2).all(|w| w[0] < w[1]),
        "progress not increasing"
    );
    assert_eq!(seen.progress.last(), Some(&payload_size));
    assert_eq!(seen.progress.len(), 48, "one call per 64 KiB chunk");

    let mut whole = vec![0u8; (data_offset + payload_size + trailer) as usize];
    output.read_exact_at(&mut whole, 0).unwrap();
    assert!(
        whole[..data_offset as usize].iter().all(|&b| b == FILLER),
        "bytes before the data offset changed"
    );
    assert!(
        whole[(data_offset + payload_size) as usize..]
            .iter()
            .all(|&b| b == FILLER),
        "bytes after the payload changed"
    );

    let plaintext = python_xts_file(
        Direction::Decrypt,
        &key,
        sector_size as usize,
        0,
        output_file.path(),
        data_offset,
        payload_size as usize,
    );
    let source_len = source.data.len();
    if let Some(at) = plaintext[..source_len]
        .iter()
        .zip(&source.data)
        .position(|(a, b)| a != b)
    {
        panic!("decrypted payload differs from the source at byte {at}");
    }
    assert!(
        plaintext[source_len..].iter().all(|&b| b == 0),
        "the tail past the source does not decrypt to zeros"
    );
}

#[test]
fn payload_decrypts_to_the_source_with_512_byte_sectors() {
    encrypt_and_verify(Path::new("/tmp"), 512, true);
}

#[test]
fn payload_decrypts_to_the_source_with_4096_byte_sectors() {
    encrypt_and_verify(Path::new("/tmp"), 4096, true);
}

#[test]
fn filesystem_without_o_direct_falls_back_to_buffered_writes() {
    // ramfs refuses O_DIRECT with EINVAL (tmpfs accepts it since Linux 6.6).
    let mount = ScratchMount::new("ramfs", "mode=0700");
    encrypt_and_verify(&mount.path(), 512, false);
}

#[test]
fn full_filesystem_is_no_space_with_the_size_needed() {
    let mount = ScratchMount::new("tmpfs", "size=1m");
    let mut rng = Rng::from_env_or_clock();
    let source = MemorySource::fully_allocated(3 * MIB, &mut rng);
    let output_file = tempfile::NamedTempFile::new_in(mount.path()).unwrap();
    let output = open_rw(output_file.path());
    let flags_before = fdinfo_flags(&output);
    let engine = UserspaceEngine::with_config(2, 256 * 1024).unwrap();
    let seen = run(
        &engine,
        &source,
        &output,
        &Spec::new(4096, 3 * MIB, 512, &rng.bytes(64)),
    );
    match seen.result {
        Err(Error::NoSpace {
            required_bytes,
            message,
        }) => {
            assert_eq!(required_bytes, 4096 + 3 * MIB);
            assert!(message.contains("offset"), "{message}");
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert_eq!(fdinfo_flags(&output), flags_before, "flags not restored");
}

#[test]
fn cancellation_stops_the_copy_and_restores_flags() {
    let mut rng = Rng::from_env_or_clock();
    let source = MemorySource::fully_allocated(8 * MIB, &mut rng);
    let output_file = filled_output(Path::new("/tmp"), 4096 + 8 * MIB);
    let output = open_rw(output_file.path());
    let flags_before = fdinfo_flags(&output);
    let engine = UserspaceEngine::with_config(3, 64 * 1024).unwrap();
    let seen = run(
        &engine,
        &source,
        &output,
        &Spec {
            cancel_after: Some(2),
            ..Spec::new(4096, 8 * MIB, 512, &rng.bytes(64))
        },
    );
    assert!(
        matches!(seen.result, Err(Error::Cancelled)),
        "{:?}",
        seen.result
    );
    // Workers stop at the next chunk boundary: at most one more chunk each.
    let written = *seen.progress.last().unwrap();
    assert!(
        written <= (2 + 3) * 64 * 1024,
        "wrote {written} bytes after cancel"
    );
    assert_eq!(fdinfo_flags(&output), flags_before, "flags not restored");
}

#[test]
fn the_first_source_error_is_returned_and_the_others_stop() {
    let mut rng = Rng::from_env_or_clock();
    let chunk = 64 * 1024;
    let mut source = MemorySource::fully_allocated(8 * MIB, &mut rng);
    // Chunk 10 fails after 100 ms; meanwhile the other workers claim chunks 11 and 12, whose
    // reads fail at 400 ms with another error that must not replace the first.
    source.fail_at = Some(10 * chunk + 100);
    source.fail_later_from = Some(11 * chunk);
    let output_file = filled_output(Path::new("/tmp"), 4096 + 8 * MIB);
    let output = open_rw(output_file.path());
    let flags_before = fdinfo_flags(&output);
    let engine = UserspaceEngine::with_config(3, chunk as usize).unwrap();
    let seen = run(
        &engine,
        &source,
        &output,
        &Spec::new(4096, 8 * MIB, 512, &rng.bytes(64)),
    );
    match seen.result {
        Err(Error::CorruptImage { message, offset }) => {
            assert_eq!(message, "injected first failure");
            assert_eq!(offset, Some(10 * chunk + 100));
        }
        other => panic!("expected the injected first failure, got {other:?}"),
    }
    assert!(
        seen.progress.last().copied().unwrap_or(0) <= 10 * chunk,
        "chunks past the failure were written"
    );
    assert_eq!(fdinfo_flags(&output), flags_before, "flags not restored");
}

#[test]
fn bad_jobs_are_refused_before_writing() {
    let mut rng = Rng::from_env_or_clock();
    let source = MemorySource::fully_allocated(MIB, &mut rng);
    let key = rng.bytes(64);
    let output_file = filled_output(Path::new("/tmp"), 8192 + 2 * MIB);
    let output = open_rw(output_file.path());
    let engine = UserspaceEngine::with_config(2, 64 * 1024).unwrap();
    let mut equal_halves = key.clone();
    equal_halves.copy_within(..32, 32);
    let cases: [(&str, u64, u64, u32, &[u8]); 5] = [
        ("sector size 1024", 4096, MIB, 1024, &key),
        (
            "payload not a whole number of sectors",
            4096,
            MIB + 100,
            512,
            &key,
        ),
        ("31-byte key", 4096, MIB, 512, &key[..31]),
        ("key with equal halves", 4096, MIB, 512, &equal_halves),
        ("offset overflows", u64::MAX - 4095, MIB, 512, &key),
    ];
    for (what, data_offset, payload_size, sector_size, key) in cases {
        let seen = run(
            &engine,
            &source,
            &output,
            &Spec::new(data_offset, payload_size, sector_size, key),
        );
        let error = seen.result.expect_err(what);
        match (what, &error) {
            ("sector size 1024", Error::InvalidOption { parameter, .. }) => {
                assert_eq!(*parameter, "sector_size")
            }
            ("31-byte key" | "key with equal halves", Error::EngineUnavailable { .. }) => {}
            (_, Error::Io { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput, "{what}")
            }
            _ => panic!("{what}: unexpected {error:?}"),
        }
        assert!(seen.progress.is_empty(), "{what}: wrote something");
    }
    let mut back = vec![0u8; 8192 + 2 * MIB as usize];
    output.read_exact_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == FILLER), "a refused job wrote");
}

#[test]
fn append_only_output_is_a_bad_descriptor() {
    let mut rng = Rng::from_env_or_clock();
    let source = MemorySource::fully_allocated(MIB, &mut rng);
    let output_file = filled_output(Path::new("/tmp"), 4096 + MIB);
    let output = OpenOptions::new()
        .append(true)
        .open(output_file.path())
        .unwrap();
    let engine = UserspaceEngine::with_config(2, 64 * 1024).unwrap();
    let seen = run(
        &engine,
        &source,
        &output,
        &Spec::new(4096, MIB, 512, &rng.bytes(64)),
    );
    assert!(
        matches!(
            seen.result,
            Err(Error::BadDescriptor {
                descriptor: Descriptor::Output,
                ..
            })
        ),
        "{:?}",
        seen.result
    );
    assert_eq!(
        std::fs::metadata(output_file.path()).unwrap().len(),
        4096 + MIB
    );
}
