//! Measures the sparse outputs' copy (the userspace engine's allocated copy into a qcow2, with
//! the zero check on the buffers it reads, [`imgcryptd::formats::scan`]) on real files with a
//! cold page cache, against `dd bs=4M of=/dev/null` of the same file and against the planned
//! copy that writes every sector (raw LUKS's), so what the zero check and the placement cost
//! shows.
//!
//! `cargo run --release -p imgcryptd --example sparse_copy_throughput -- [DIR] [GiB] [ROUNDS]`
//! (defaults: /var/tmp 2 3). Must run as root: every timed run starts with
//! `sync; echo 3 > /proc/sys/vm/drop_caches`. It writes two fully allocated files in DIR (one
//! of non-zero data, one of written zeros), runs per round and per file: dd, the planned copy
//! and the sparse copy (each to a file in DIR, alternating which goes first), then prints
//! medians. The files are removed at the end.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use imgcryptd::engines::userspace::UserspaceEngine;
use imgcryptd::engines::xts::IvMode;
use imgcryptd::engines::{Engine, PayloadJob};
use imgcryptd::formats;
use imgcryptd::outputs::luks::payload_extent;
use imgcryptd::outputs::qcow2::Qcow2Output;

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

/// Seconds the sparse copy into a qcow2 takes (payload only, synced); also returns the bytes
/// it stored.
fn time_sparse(path: &Path, dir: &Path) -> (f64, u64) {
    drop_caches();
    let image = formats::open(File::open(path).expect("opening the source")).expect("format");
    let out_path = dir.join("imgcrypt-sparse-bench.out");
    let output = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&out_path)
        .expect("creating the output");
    // The LUKS header's bytes play no part in the copy.
    let header = imgcryptd::sys::memfd::create("bench-luks").expect("memfd");
    header.set_len(2 * MIB).expect("sizing the memfd");
    let qcow2 = Qcow2Output::new(image.virtual_size(), &header, 2 * MIB).expect("qcow2");
    let cancel = AtomicBool::new(false);
    let key: Vec<u8> = (0..64).collect();
    let started = Instant::now();
    let stored = UserspaceEngine::new()
        .write_allocated(
            &PayloadJob {
                job_id: 1,
                source: image.as_ref(),
                output: &output,
                extents: &[],
                sector_size: 512,
                key: &key,
                iv: IvMode::Plain64,
                progress: &|_| {},
                cancel: &cancel,
            },
            &qcow2,
        )
        .expect("sparse copy");
    output.sync_data().expect("fdatasync");
    let seconds = started.elapsed().as_secs_f64();
    drop(output);
    let _ = std::fs::remove_file(&out_path);
    (seconds, stored)
}

/// Seconds the planned copy (every sector, raw LUKS's) takes into a new file in `dir`.
fn time_engine(path: &Path, dir: &Path) -> f64 {
    drop_caches();
    let image = formats::open(File::open(path).expect("opening the source")).expect("format");
    let size = image.virtual_size();
    let out_path = dir.join("imgcrypt-sparse-bench.out");
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
        let path = dir.join("imgcrypt-sparse-bench.src");
        make_file(&path, size, zeros);
        let (mut dd, mut planned, mut sparse) = (vec![], vec![], vec![]);
        let mut stored = 0;
        for round in 0..rounds {
            // Alternate the order, so a drift of the disk's speed within a round (or a
            // host-side cache) favours neither.
            let mut run_sparse = || {
                let (seconds, bytes) = time_sparse(&path, &dir);
                sparse.push(seconds);
                stored = bytes;
            };
            if round % 2 == 0 {
                dd.push(time_dd(&path));
                planned.push(time_engine(&path, &dir));
                run_sparse();
            } else {
                run_sparse();
                planned.push(time_engine(&path, &dir));
                dd.push(time_dd(&path));
            }
        }
        let rate = |seconds: f64| size as f64 / seconds / 1e6;
        let (dd, planned, sparse) = (median(&mut dd), median(&mut planned), median(&mut sparse));
        println!(
            "{gib} GiB of {name}, medians of {rounds}: dd read {dd:.2} s ({:.0} MB/s), planned \
             copy {planned:.2} s ({:.0} MB/s), sparse copy {sparse:.2} s ({:.0} MB/s, stored \
             {stored} bytes), sparse/planned {:.2}",
            rate(dd),
            rate(planned),
            rate(sparse),
            sparse / planned
        );
        let _ = std::fs::remove_file(&path);
    }
}
