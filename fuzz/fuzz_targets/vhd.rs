//! The VHD readers alone: every file gets a footer cookie at its end and, when the footer points
//! at one, a dynamic-header cookie, both with their checksums fixed, so mutations get past the
//! checksums into the geometry, the BAT, the bitmaps, the batmap and the parent locators.
#![no_main]

use std::os::unix::fs::FileExt;

use imgcrypt_fuzz::{decode, exercise, fix_checksum, force_magic, size_of};
use imgcryptd::formats::vhd::footer::checksum;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let files = decode(data);
    for file in &files {
        let size = size_of(file);
        if size < 512 {
            continue;
        }
        let footer = size - 512;
        force_magic(file, footer, b"conectix");
        let mut offset = [0u8; 8];
        if file.read_exact_at(&mut offset, footer + 16).is_ok() {
            let header = u64::from_be_bytes(offset);
            if header.checked_add(1024).is_some_and(|end| end <= footer) {
                force_magic(file, header, b"cxsparse");
                fix_checksum(file, header, 1024, 36, false, checksum);
            }
        }
        fix_checksum(file, footer, 512, 64, false, checksum);
    }
    exercise(files);
});
