//! Reading costs what the source holds, not what it could hold: encrypting a sparse 1 GiB
//! dynamic VHD with 8 MiB of data makes the daemon read about those 8 MiB (twice for container
//! outputs, whose zero scan reads the data once more), never the 1 GiB of holes.
//!
//! The count is the daemon's `rchar` in `/proc/PID/io`: every byte its `read`/`pread` calls
//! returned, page cache or not, so it is exact whatever the cache holds. It also counts the
//! LUKS header the daemon formats on a memfd and copies out (16 MiB for LUKS2, 2 MiB for LUKS1
//! in qcow2), which the bounds allow for.

mod common;

use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

/// Bytes the process has read so far.
fn bytes_read(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|line| line.strip_prefix("rchar: "))
        .and_then(|value| value.trim().parse().ok())
        .expect("rchar in /proc/PID/io")
}

#[test]
fn a_sparse_source_costs_its_data_not_its_virtual_size() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let key = dir.join("k");
    write_key(&key);
    let source = dir.join("sparse.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        source.to_str().unwrap(),
        "1G",
    ]);
    qemu_io(
        "vpc",
        &source,
        &["write -P 0x5a 0 4M", "write -P 0xa5 512M 4M"],
    );
    let data = 8 * MIB;
    let pid = daemon.child.id();

    for (format, extra, bound) in [
        // The data once, plus the 16 MiB LUKS2 header formatted on a memfd and copied out.
        ("luks", CHEAP_PBKDF, data + 3 * 16 * MIB + 2 * MIB),
        // Scan and copy read the data twice; the LUKS1 header is 2 MiB.
        ("qcow2", CHEAP_PBKDF, 2 * data + 3 * 2 * MIB + 2 * MIB),
        ("vhd", &[][..], 2 * data + 2 * MIB),
    ] {
        let output = dir.join(format!("out.{format}"));
        let before = bytes_read(pid);
        run_ok(
            encrypt_arguments_keyed(&mut daemon.imgctl(), &source, &output, &key)
                .args(["--format", format])
                .args(extra),
        );
        let read = bytes_read(pid) - before;
        assert!(
            (data..=bound).contains(&read),
            "--format {format}: the daemon read {read} bytes for {data} bytes of data in a \
             1 GiB disk (expected between {data} and {bound})"
        );
        assert_ne!(Path::new(&output).metadata().unwrap().len(), 0);
    }
}
