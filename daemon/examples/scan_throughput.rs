//! Measures the zero scan ([`imgcryptd::formats::scan`]) on real files with a cold page cache,
//! against `dd bs=4M of=/dev/null` of the same file, and what the scan adds to a container job
//! on a fully allocated source (the copy then reads the source a second time).
//!
//! `cargo run --release -p imgcryptd --example scan_throughput -- [DIR] [GiB] [ROUNDS]`
//! (defaults: /var/tmp 2 3). Must run as root: every timed run starts with
//! `sync; echo 3 > /proc/sys/vm/drop_caches`. It writes two fully allocated files in DIR (one
//! of non-zero data, one of written zeros), runs per round and per file: dd, the scan, the
//! userspace engine alone (the copy step of a job, to a file in DIR), and the scan followed by
//! the engine, then prints medians. The files are removed at the end.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use imgcryptd::engines::userspace::UserspaceEngine;
use imgcryptd::engines::xts::IvMode;
use imgcryptd::engines::{Engine, PayloadJob};
use imgcryptd::formats::{self, scan};
use imgcryptd::outputs::luks::payload_extent;

const MIB: u64 = 1 << 20;

fn drop_caches() {
    let status = Command::new("sync").status().expect("running sync");
    assert!(status.success());
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .expect("dropping the page cache (run as root)");
}

/// Writes `bytes` of data (a non-zero pattern, or zeros) to a new file: fully allocated.
fn make_file(path: &Path, bytes: u64, zeros: bool) {
    let file = File::create(path).expect("creating the source");
    let mut block = vec![0u8; (4 * MIB) as usize];
    for offset in (0..bytes).step_by(block.len()) {
        if !zeros {
            for (index, word) in block.chunks_exact_mut(8).enumerate() {
                let position = offset / 8 + index as u64;
                word.copy_from_slice(
                    &(position | 1)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .to_le_bytes(),
                );
            }
        }
        file.write_all_at(&block, offset)
            .expect("writing the source");
    }
    file.sync_all().expect("fsync of the source");
}

fn time_dd(path: &Path) -> f64 {
    drop_caches();
    let started = Instant::now();
    let status = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["of=/dev/null", "bs=4M", "status=none"])
        .status()
        .expect("running dd");
    assert!(status.success(), "dd failed");
    started.elapsed().as_secs_f64()
}

/// Seconds the scan takes; also returns the data bytes it kept.
fn time_scan(path: &Path, cold: bool) -> (f64, u64) {
    if cold {
        drop_caches();
    }
    let image = formats::open(File::open(path).expect("opening the source")).expect("format");
    let cancel = AtomicBool::new(false);
    let started = Instant::now();
    let found = scan::nonzero_ranges(image.as_ref(), 64 << 10, &|_, _| {}, &cancel).expect("scan");
    (started.elapsed().as_secs_f64(), found.data_bytes())
}

/// Seconds the engine takes to encrypt the whole source into a new file in `dir`.
fn time_engine(path: &Path, dir: &Path, cold: bool) -> f64 {
    if cold {
        drop_caches();
    }
    let image = formats::open(File::open(path).expect("opening the source")).expect("format");
    let size = image.virtual_size();
    let out_path = dir.join("imgcrypt-scan-bench.out");
    let output = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&out_path)
        .expect("creating the output");
    output.set_len(size + 2 * MIB).expect("sizing the output");
    let cancel = AtomicBool::new(false);
    let key: Vec<u8> = (0..64).collect();
    let extents = [payload_extent(2 * MIB, size)];
    let started = Instant::now();
    UserspaceEngine::new()
        .write_payload(&PayloadJob {
            job_id: 1,
            source: image.as_ref(),
            output: &output,
            extents: &extents,
            sector_size: 512,
            key: &key,
            iv: IvMode::Plain64,
            progress: &|_| {},
            cancel: &cancel,
        })
        .expect("engine copy");
    output.sync_data().expect("fdatasync");
    let seconds = started.elapsed().as_secs_f64();
    drop(output);
    let _ = std::fs::remove_file(&out_path);
    seconds
}

fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(args.first().map_or("/var/tmp", String::as_str));
    let gib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let size = gib << 30;
    for (name, zeros) in [("non-zero data", false), ("written zeros", true)] {
        let path = dir.join("imgcrypt-scan-bench.src");
        make_file(&path, size, zeros);
        let (mut dd, mut scanned, mut engine, mut both) = (vec![], vec![], vec![], vec![]);
        let mut kept = 0;
        for round in 0..rounds {
            // Alternate which goes first, so a drift of the disk's speed within a round (or a
            // host-side cache) favours neither.
            if round % 2 == 0 {
                dd.push(time_dd(&path));
            }
            let (seconds, data) = time_scan(&path, true);
            scanned.push(seconds);
            kept = data;
            if round % 2 == 1 {
                dd.push(time_dd(&path));
            }
            if !zeros {
                // A job: cold scan, then the copy finds what the scan left in the page cache.
                let job = || time_scan(&path, true).0 + time_engine(&path, &dir, false);
                if round % 2 == 0 {
                    engine.push(time_engine(&path, &dir, true));
                    both.push(job());
                } else {
                    both.push(job());
                    engine.push(time_engine(&path, &dir, true));
                }
            }
        }
        // From the page cache: the scan's own cost (copying out of the cache and the check).
        let mut warm: Vec<f64> = (0..rounds).map(|_| time_scan(&path, false).0).collect();
        let rate = |seconds: f64| size as f64 / seconds / 1e6;
        let (dd, scanned, warm) = (median(&mut dd), median(&mut scanned), median(&mut warm));
        println!(
            "{gib} GiB of {name}, medians of {rounds}: dd {dd:.2} s ({:.0} MB/s), scan \
             {scanned:.2} s ({:.0} MB/s), scan/dd {:.2}, kept {kept} bytes; scan from the page \
             cache {warm:.2} s ({:.0} MB/s)",
            rate(dd),
            rate(scanned),
            scanned / dd,
            rate(warm)
        );
        if !zeros {
            let (engine, both) = (median(&mut engine), median(&mut both));
            println!(
                "  copy alone {engine:.2} s, scan + copy {both:.2} s: the scan adds {:.0}%",
                (both / engine - 1.0) * 100.0
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
