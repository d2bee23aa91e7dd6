//! Detection plus every reader, over several files: whatever the source names (a backing file,
//! a parent, an extent) is answered with the input's next file, so chains, cycles, mismatched
//! parents and mixed formats are fuzzed as the daemon meets them.
#![no_main]

use imgcrypt_fuzz::{decode, exercise};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| exercise(decode(data)));
