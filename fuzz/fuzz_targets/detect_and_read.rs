//! The whole source path a hostile image author controls: detection by content, every source
//! reader's metadata parsing, and reads of what it says is allocated. Any input must give an
//! image or an error — never a panic, a hang, or an allocation beyond the readers' bounds.
#![no_main]

use std::io::Write;

use imgcryptd::formats;
use libfuzzer_sys::fuzz_target;

/// Bytes read per allocated range at most, so one input cannot take long.
const READ_LIMIT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = imgcryptd::sys::memfd::create("fuzz-source") else {
        return;
    };
    if file.write_all(data).is_err() {
        return;
    }
    let Ok(image) = formats::open(file) else {
        return;
    };
    let size = image.virtual_size();
    let mut buffer = vec![0u8; READ_LIMIT as usize];
    for range in image.allocated_ranges().iter().take(16) {
        let start = range.start.min(size);
        let end = range.end.min(size).min(start + READ_LIMIT);
        // Whole sectors, as the pipeline reads them.
        let start = start / 512 * 512;
        let end = end / 512 * 512;
        if end > start {
            let _ = image.read_at(&mut buffer[..(end - start) as usize], start);
        }
    }
});
