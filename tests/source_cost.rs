//! Reading costs what the source holds, not what it could hold: encrypting a sparse 1 GiB
//! dynamic VHD with 8 MiB of data makes the daemon read those 8 MiB once, for every output
//! format (the sparse containers find their all-zero granules on the buffers the copy already
//! holds, so nothing is read twice), never the 1 GiB of holes; and a 40 GiB qcow2, VHDX or
//! VMDK with 8 MiB of data costs the same 8 MiB plus its metadata. A second read of the data
//! (as a separate zero scan did) would exceed every bound here.
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
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = dir.join("sparse.vhd");
    qemu_create(&source, "vpc", &["-o", "subformat=dynamic"], "1G");
    qemu_io(
        "vpc",
        &source,
        &["write -P 0x5a 0 4M", "write -P 0xa5 512M 4M"],
    );
    let data = 8 * MIB;
    let pid = daemon.child.id();

    for (format, extra, bound) in [
        // The data once, plus the 16 MiB LUKS2 header formatted on a memfd and copied out, and
        // once more hashed for the resume checkpoint (the staged masked header it resumes);
        // the resume's sample of the source is 192 KiB.
        ("luks", CHEAP_PBKDF, data + 4 * 16 * MIB + 2 * MIB),
        // The data once too; the LUKS1 header is 2 MiB.
        ("qcow2", CHEAP_PBKDF, data + 3 * 2 * MIB + 2 * MIB),
        ("vhd", &[][..], data + 2 * MIB),
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

/// A 40 GiB disk in each sparse source format qemu-img writes, with 4 MiB of data at its start
/// and 4 MiB in its middle, encrypted to the sparse qcow2 output (a LUKS image would be 40 GiB
/// of ciphertext): the daemon reads the data once, the 2 MiB LUKS1 header three times, and the
/// format's tables, never the holes.
#[test]
fn a_sparse_40_gib_disk_in_every_format_costs_its_data() {
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let data = 8 * MIB;
    // Tables: a qcow2 L1 of 640 entries and two 64 KiB L2 tables; a VHDX BAT of 41,000 entries;
    // a VMDK's grain directory and the two grain tables in use (qemu-img writes all 1280).
    let metadata = 4 * MIB;
    let pid = daemon.child.id();
    // Allocation units small enough that what is allocated is what was written (a VHDX
    // allocates a whole block, zero-filled, and allocated bytes are read by the copy).
    for (format, options) in [
        ("qcow2", "cluster_size=65536"),
        ("vhdx", "block_size=1M"),
        ("vmdk", "subformat=monolithicSparse"),
    ] {
        let source = dir.join(format!("sparse.{format}"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            format,
            "-o",
            options,
            source.to_str().unwrap(),
            "40G",
        ]);
        qemu_io(
            format,
            &source,
            &["write -P 0x5a 0 4M", "write -P 0xa5 20G 4M"],
        );
        let output = dir.join(format!("{format}.qcow2"));
        let before = bytes_read(pid);
        run_ok(
            encrypt_arguments_keyed(&mut daemon.imgctl(), &source, &output, &key)
                .args(["--format", "qcow2"])
                .args(CHEAP_PBKDF),
        );
        let read = bytes_read(pid) - before;
        let bound = data + 3 * 2 * MIB + metadata;
        assert!(
            (data..=bound).contains(&read),
            "{format}: the daemon read {read} bytes for {data} bytes of data in a 40 GiB disk \
             (expected between {data} and {bound})"
        );
        assert_qemu_check_and_compare(&output, &key, &source, format);
        std::fs::remove_file(&output).unwrap();
    }
}
