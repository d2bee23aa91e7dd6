//! The VHDX reader alone: the file identifier forced, both headers and both region tables with
//! their CRC-32C fixed, so mutations reach the region table's entries, the metadata, the BAT,
//! the log and the parent locator.
#![no_main]

use imgcrypt_fuzz::{decode, exercise, fix_checksum, force_magic};
use imgcryptd::formats::vhdx::crc32c::checksum_with_hole;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let files = decode(data);
    for file in &files {
        force_magic(file, 0, b"vhdxfile");
        for header in [64u64 << 10, 128 << 10] {
            force_magic(file, header, b"head");
            fix_checksum(file, header, 4096, 4, true, checksum_with_hole);
        }
        for table in [192u64 << 10, 256 << 10] {
            force_magic(file, table, b"regi");
            fix_checksum(file, table, 64 << 10, 4, true, checksum_with_hole);
        }
    }
    exercise(files);
});
