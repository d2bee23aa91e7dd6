//! Measures the userspace engine writing a payload against `dd oflag=direct` of the same size,
//! and the process's peak RSS.
//!
//! `cargo run --release -p imgcryptd --example engine_throughput -- [DIR] [GiB] [WORKERS]
//! [CHUNK_MiB] [SECTOR] [ROUNDS]` (defaults: /tmp 2 auto 4 512 3). Each round runs dd then the
//! engine, each on a fresh file removed afterwards; the medians are compared, because a shared
//! VM's disk speed drifts by 2× within a minute. The source is synthetic (fully allocated,
//! generated on read), so the figures are the pipeline's and the output's, not a format
//! reader's.
//!
//! With `IMGCRYPT_BENCH_SOURCE=IMAGE` the source is that image instead, opened by the daemon's
//! own format readers (any format it reads), so the figures include reading it; the payload is
//! its virtual size (GiB is ignored), the page cache is dropped before every run (root only:
//! `/proc/sys/vm/drop_caches`), and the image's pages left in the page cache after the last
//! engine run are printed (`fincore`).

use std::fs::OpenOptions;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use imgcrypt_proto::api::SourceFormat;
use imgcryptd::engines::userspace::UserspaceEngine;
use imgcryptd::engines::xts::IvMode;
use imgcryptd::engines::{Engine, PayloadJob};
use imgcryptd::formats::SourceImage;
use imgcryptd::outputs::luks::payload_extent;
use imgcryptd::sys::aligned::AlignedBuffer;
use imgcryptd::sys::direct_io::{enable_direct_io, write_all_at};

/// A fully allocated source whose bytes are a function of their offset.
#[derive(Debug)]
struct SyntheticSource {
    size: u64,
    allocated: [Range<u64>; 1],
}

impl SyntheticSource {
    fn new(size: u64) -> Self {
        Self {
            size,
            allocated: [Range {
                start: 0,
                end: size,
            }],
        }
    }
}

impl SourceImage for SyntheticSource {
    fn format(&self) -> SourceFormat {
        SourceFormat::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> imgcryptd::Result<()> {
        for (index, word) in buffer.chunks_exact_mut(8).enumerate() {
            let position = offset / 8 + index as u64;
            word.copy_from_slice(&position.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        }
        Ok(())
    }
    fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.allocated
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Drops the page cache (every clean page), so each run reads its source from the disk.
fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// `fincore`'s resident bytes of `path`, as it prints them.
fn resident(path: &Path) -> String {
    Command::new("fincore")
        .args(["--noheadings", "--output", "RES,SIZE"])
        .arg(path)
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_else(|error| format!("fincore failed: {error}"))
}

/// Seconds `dd if=/dev/zero bs=4M oflag=direct` takes to write `bytes` to a new file in `dir`.
fn time_dd(dir: &Path, bytes: u64) -> f64 {
    let path = dir.join("imgcrypt-bench-dd.img");
    let started = Instant::now();
    let status = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .args(["bs=4M", "oflag=direct", "status=none"])
        .arg(format!("count={}", bytes >> 22))
        .status()
        .expect("running dd");
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.success(), "dd failed");
    let _ = std::fs::remove_file(&path);
    seconds
}

/// Seconds one thread takes to write `bytes` of a fixed non-zero 4 MiB buffer with O_DIRECT to a
/// new file: dd's floor without the zeros, which some virtual disks store faster than data.
fn time_plain_writer(dir: &Path, bytes: u64) -> f64 {
    let path = dir.join("imgcrypt-bench-plain.img");
    let output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("creating the output");
    let mut buffer = AlignedBuffer::new(4 << 20).expect("buffer");
    SyntheticSource::new(4 << 20)
        .read_at(&mut buffer, 0)
        .expect("pattern");
    let started = Instant::now();
    let direct = enable_direct_io(&output).expect("O_DIRECT");
    for offset in (0..bytes).step_by(4 << 20) {
        write_all_at(&output, &buffer, offset).expect("writing");
    }
    drop(direct);
    let seconds = started.elapsed().as_secs_f64();
    drop(output);
    let _ = std::fs::remove_file(&path);
    seconds
}

/// Seconds the engine takes to write a `payload_size` payload to a new sparse file in `dir`,
/// after a 16 MiB header area as a LUKS2 image has.
fn time_engine(
    engine: &UserspaceEngine,
    dir: &Path,
    payload_size: u64,
    sector_size: u32,
    image: Option<&Path>,
) -> f64 {
    let data_offset = 16u64 << 20;
    let path = dir.join("imgcrypt-bench-engine.img");
    let output = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("creating the output");
    output
        .set_len(data_offset + payload_size)
        .expect("sizing the output");
    let source: Box<dyn SourceImage> = match image {
        Some(image) => imgcryptd::formats::open(std::fs::File::open(image).expect("source"))
            .expect("opening the source"),
        None => Box::new(SyntheticSource::new(payload_size)),
    };
    let cancel = AtomicBool::new(false);
    let progress = |_: u64| {};
    let key: Vec<u8> = (0..64).collect();
    let extents = [payload_extent(data_offset, payload_size)];
    let job = PayloadJob {
        job_id: 1,
        source: source.as_ref(),
        output: &output,
        extents: &extents,
        sector_size,
        key: &key,
        iv: IvMode::Plain64,
        progress: &progress,
        cancel: &cancel,
    };
    let started = Instant::now();
    engine.write_payload(&job).expect("engine copy");
    let seconds = started.elapsed().as_secs_f64();
    drop(output);
    let _ = std::fs::remove_file(&path);
    seconds
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(args.first().map_or("/tmp", String::as_str));
    let gib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let default_engine = UserspaceEngine::new();
    let workers: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_engine.workers());
    let chunk_mib: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4);
    let sector_size: u32 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(512);
    let engine = UserspaceEngine::with_config(workers, chunk_mib << 20).expect("engine config");

    let rounds: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(3);
    let image = std::env::var_os("IMGCRYPT_BENCH_SOURCE").map(PathBuf::from);
    let payload_size = match &image {
        Some(image) => {
            let source = imgcryptd::formats::open(std::fs::File::open(image).expect("source"))
                .expect("opening the source");
            // Whole 4 MiB blocks, so dd writes the same amount.
            source.virtual_size().div_ceil(4 << 20) * (4 << 20)
        }
        None => gib << 30,
    };
    let mut dd_times = Vec::new();
    let mut plain_times = Vec::new();
    let mut engine_times = Vec::new();
    for _ in 0..rounds {
        drop_caches();
        dd_times.push(time_dd(&dir, payload_size));
        plain_times.push(time_plain_writer(&dir, payload_size));
        drop_caches();
        engine_times.push(time_engine(
            &engine,
            &dir,
            payload_size,
            sector_size,
            image.as_deref(),
        ));
    }
    if let Some(image) = &image {
        println!(
            "source {}: resident in the page cache after the engine (RES SIZE): {}",
            image.display(),
            resident(image)
        );
    }
    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let show = |times: &[f64]| {
        times
            .iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (dd_all, plain_all, engine_all) =
        (show(&dd_times), show(&plain_times), show(&engine_times));
    let dd_seconds = median(&mut dd_times);
    let plain_seconds = median(&mut plain_times);
    let engine_seconds = median(&mut engine_times);
    let rate = |seconds: f64| payload_size as f64 / seconds / 1e6;
    let gib = payload_size as f64 / f64::from(1u32 << 30);
    println!(
        "{gib:.2} GiB, {workers} workers x {chunk_mib} MiB, {sector_size}-byte sectors, median of \
         {rounds}: dd {dd_seconds:.2} s ({:.0} MB/s), plain writer {plain_seconds:.2} s ({:.0} MB/s), \
         engine {engine_seconds:.2} s ({:.0} MB/s), engine/dd {:.3}, engine/plain {:.3}, \
         peak RSS {} KiB\n  [dd: {dd_all}; plain: {plain_all}; engine: {engine_all}]",
        rate(dd_seconds),
        rate(plain_seconds),
        rate(engine_seconds),
        engine_seconds / dd_seconds,
        engine_seconds / plain_seconds,
        peak_rss_kib()
    );
}
