//! The VMDK reader alone: every source is a hosted sparse extent (its `KDMV` magic forced), so
//! the fuzzer's time goes into the header, the embedded descriptor, the grain directory and
//! tables, and streamOptimized markers.
#![no_main]

use imgcrypt_fuzz::{decode, exercise, force_magic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let files = decode(data);
    if let Some(source) = files.first() {
        force_magic(source, 0, b"KDMV");
    }
    exercise(files);
});
