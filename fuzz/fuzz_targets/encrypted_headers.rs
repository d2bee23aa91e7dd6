//! The encrypted-image readers `inspect`, `verify`, `decrypt` and `rewrite` run on a file any
//! socket user passes: container detection, a qcow2's tables and its LUKS region, a VHD's
//! batmap and key hash. Any input must give a reader or an error, never a panic or a hang.
#![no_main]

use std::io::Write;

use imgcrypt_proto::api::OutputFormat;
use imgcryptd::formats::encrypted;
use imgcryptd::formats::vhd::encrypted::EncryptedVhd;
use imgcryptd::jobs::unlock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = imgcryptd::sys::memfd::create("fuzz-image") else {
        return;
    };
    if file.write_all(data).is_err() {
        return;
    }
    match encrypted::detect(&file) {
        Ok(OutputFormat::Qcow2) => {
            let _ = unlock::qcow2_luks_header(&file);
        }
        Ok(OutputFormat::Vhd) => {
            let _ = EncryptedVhd::open(file);
        }
        _ => {}
    }
});
