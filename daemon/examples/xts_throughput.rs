//! Measures `XtsCipher` throughput on one core: GB/s per sector size and buffer size.
//!
//! `cargo run --release -p imgcryptd --example xts_throughput [MiB]` (default 256). The small
//! buffer stays in cache (the engine encrypts 4 MiB chunks); the large one streams from memory.

use std::time::Instant;

use imgcryptd::engines::xts::{IvMode, XtsCipher};

fn main() {
    let big_mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(97).wrapping_add(13))
        .collect();
    let cipher = XtsCipher::new(&key, IvMode::Plain64).expect("64-byte key");
    println!("aes hardware acceleration: {}", aes::hardware_accelerated());
    for sector_size in [512usize, 4096] {
        for (label, mib, rounds) in [("4 MiB x 64", 4usize, 64usize), ("large", big_mib, 1)] {
            let mut data: Vec<u8> = (0..mib << 20).map(|i| ((i * 31) >> 7) as u8).collect();
            let first_sector = (1u64 << 33) + 8;
            for (direction, encrypt) in [("encrypt", true), ("decrypt", false)] {
                let mut best = f64::MAX;
                for _ in 0..3 {
                    let started = Instant::now();
                    for _ in 0..rounds {
                        if encrypt {
                            cipher.encrypt_sectors(&mut data, sector_size, first_sector)
                        } else {
                            cipher.decrypt_sectors(&mut data, sector_size, first_sector)
                        }
                        .expect("whole sectors");
                    }
                    best = best.min(started.elapsed().as_secs_f64());
                }
                let bytes = (mib << 20) * rounds;
                println!(
                    "sector {sector_size:4}  {label:10} ({:4} MiB)  {direction}  {:5.2} GB/s",
                    mib,
                    bytes as f64 / best / 1e9
                );
            }
        }
    }
}
