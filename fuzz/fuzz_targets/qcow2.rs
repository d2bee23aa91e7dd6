//! The qcow2 reader alone: every input is a qcow2 (its magic forced), so the fuzzer's time goes
//! into the header, its extensions, the L1/L2 walk, compressed clusters and backing files.
#![no_main]

use imgcrypt_fuzz::{decode, exercise, force_magic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let files = decode(data);
    if let Some(source) = files.first() {
        force_magic(source, 0, b"QFI\xfb");
    }
    exercise(files);
});
