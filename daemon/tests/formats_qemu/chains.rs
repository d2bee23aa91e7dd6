//! The memory bound of a whole chain ([`MAX_CHAIN_METADATA_BYTES`]): every layer charges the
//! parsed metadata it keeps as soon as it has it, so a chain whose layers together hold more
//! than the budget is refused part-way, naming the layer that passed it. The budget is lowered
//! here so that images qemu-img makes in a moment reach it.

use super::*;
use imgcryptd::formats::files::{Passed, SourceFiles, MAX_CHAIN_METADATA_BYTES};

/// Grain-table bytes of one 128 GiB monolithicSparse VMDK: qemu-img writes every grain table,
/// 2 Mi entries of 4 bytes for 64 KiB grains.
const GRAIN_TABLE_BYTES: u64 = (128 << 30) / (64 << 10) * 4;

/// base.vmdk ← c1.vmdk ← c2.vmdk, 128 GiB each, and the [`SourceFiles`] of c2 with its two
/// ancestors passed as imgctl would pass them.
fn vmdk_chain(dir: &Path) -> SourceFiles {
    create(dir, "base.vmdk", "vmdk", "128G", &[]);
    write_pattern(&dir.join("base.vmdk"), "vmdk", &[(0, 65536, 0x11)]);
    for (child, parent) in [("c1.vmdk", "base.vmdk"), ("c2.vmdk", "c1.vmdk")] {
        let backing = format!("backing_file={parent}");
        create(dir, child, "vmdk", "128G", &[&backing, "backing_fmt=vmdk"]);
    }
    let companions = vec![
        Passed {
            file: File::open(dir.join("c1.vmdk")).unwrap(),
            name: "c1.vmdk".into(),
            referenced_by: 0,
        },
        Passed {
            file: File::open(dir.join("base.vmdk")).unwrap(),
            name: "base.vmdk".into(),
            referenced_by: 1,
        },
    ];
    SourceFiles::new(File::open(dir.join("c2.vmdk")).unwrap(), companions).unwrap()
}

#[test]
fn every_layer_of_a_chain_charges_its_tables() {
    let dir = scratch();
    let files = vmdk_chain(dir.path());
    let image = formats::open_files(&files).unwrap();
    assert_eq!(image.virtual_size(), 128 << 30);
    let charged = files.metadata_charged();
    assert!(
        (3 * GRAIN_TABLE_BYTES..3 * GRAIN_TABLE_BYTES + 3 * MIB).contains(&charged),
        "three layers charged {charged} bytes, each holds {GRAIN_TABLE_BYTES} of grain tables"
    );
    assert!(charged < MAX_CHAIN_METADATA_BYTES);
}

#[test]
fn a_chain_over_the_budget_is_refused_at_the_layer_that_passes_it() {
    let dir = scratch();
    let mut files = vmdk_chain(dir.path());
    // Room for two layers' tables, not three.
    let budget = 2 * GRAIN_TABLE_BYTES + 4 * MIB;
    files.set_metadata_budget(budget);
    let error = formats::open_files(&files).expect_err("the third layer passes the budget");
    let message = error.to_string();
    assert!(matches!(error, Error::UnsupportedImage { .. }), "{error:?}");
    // A delta link charges before it opens its parent: the base is the third to charge.
    assert!(message.contains("3 layer(s)"), "{message}");
    assert!(message.contains("`base.vmdk`"), "{message}");
    assert!(
        message.contains(&format!("{} MiB", budget >> 20)),
        "{message}"
    );
    assert!(message.contains("qemu-img convert"), "{message}");
}

#[test]
fn every_format_charges_before_the_layer_below_is_opened() {
    // qcow2 over a dynamic VHD over a VHDX over raw: with a budget of one byte, the top layer
    // is refused whatever its format, and nothing below it was needed.
    let dir = scratch();
    let dir = dir.path();
    for (top, format, options) in [
        ("top.qcow2", "qcow2", &[][..]),
        ("top.vhd", "vpc", &["subformat=dynamic"][..]),
        ("top.vhdx", "vhdx", &[][..]),
        ("top.vmdk", "vmdk", &[][..]),
        ("top.raw", "raw", &[][..]),
    ] {
        create(dir, top, format, "64M", options);
        write_pattern(&dir.join(top), format, &[(0, 4096, 0x5a)]);
        let mut files = SourceFiles::single(File::open(dir.join(top)).unwrap()).unwrap();
        files.set_metadata_budget(1);
        match formats::open_files(&files) {
            Err(Error::UnsupportedImage { message }) => {
                assert!(message.contains("1 layer(s)"), "{top}: {message}")
            }
            other => panic!("{top}: expected the budget refusal, got {other:?}"),
        }
        assert!(files.metadata_charged() > 0, "{top}: charged nothing");
    }
}
