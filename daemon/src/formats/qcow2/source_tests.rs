//! Plain qcow2 images as `encrypt` sources, read through [`crate::formats::open`] and compared
//! with qemu-img's own raw conversion of the same image.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tempfile::NamedTempFile;

use super::test_images::{
    convert_to_qcow2, create, mixed_source, overlay, qemu_io, qemu_raw, read_all, run, text, MIB,
};
use super::*;
use crate::formats;
use crate::outputs::qcow2::tests::encrypt_to_qcow2;

fn open_source(image: &Path) -> Box<dyn SourceImage> {
    formats::open(File::open(image).unwrap()).unwrap()
}

/// `image` read by us equals qemu's raw conversion, and everything outside the allocated ranges
/// is zero in qemu's view too.
fn assert_reads_as_qemu(image: &Path, what: &str) {
    let expected = qemu_raw(image);
    let source = open_source(image);
    assert_eq!(source.format(), SourceFormat::Qcow2, "{what}");
    assert_eq!(source.virtual_size(), expected.len() as u64, "{what}");
    for piece in [4 * MIB as usize, 100_000] {
        assert!(
            read_all(&*source, piece) == expected,
            "{what}: piece {piece}"
        );
    }
    let mut position = 0u64;
    for range in source.allocated_ranges() {
        assert!(range.start >= position, "{what}: ranges unsorted");
        let hole = &expected[position as usize..range.start as usize];
        assert!(
            hole.iter().all(|&b| b == 0),
            "{what}: data outside the ranges"
        );
        position = range.end;
    }
    assert!(
        expected[position as usize..].iter().all(|&b| b == 0),
        "{what}"
    );
}

#[test]
fn compat_cluster_sizes_and_compression_read_as_qemu_reads_them() {
    let size = 9 * MIB + 512;
    let raw = mixed_source(
        size,
        &[
            (0, 3000),
            (MIB - 700, 300_000),
            (4 * MIB + 123, 2 * MIB),
            (size - 512, 512),
        ],
    );
    for compat in ["0.10", "1.1"] {
        for cluster in ["512", "4096", "65536", "2M"] {
            for compress in [false, true] {
                let options = format!("compat={compat},cluster_size={cluster}");
                let mut args = vec!["-o", &options];
                if compress {
                    args.push("-c");
                }
                let image = convert_to_qcow2(raw.path(), &args);
                assert_reads_as_qemu(image.path(), &format!("{options} -c={compress}"));
            }
        }
    }
    // Extended L2 entries (subclusters), compressed or not.
    for args in [
        &["-o", "extended_l2=on"][..],
        &["-o", "extended_l2=on,cluster_size=2M"],
        &["-c", "-o", "extended_l2=on"],
    ] {
        let image = convert_to_qcow2(raw.path(), args);
        assert_reads_as_qemu(image.path(), &format!("{args:?}"));
    }
    // zstd (qemu 5.1+), in every cluster size.
    for cluster in ["512", "4096", "65536", "2M"] {
        let options = format!("compression_type=zstd,cluster_size={cluster}");
        let image = convert_to_qcow2(raw.path(), &["-c", "-o", &options]);
        let opened = Qcow2Image::open(File::open(image.path()).unwrap()).unwrap();
        assert!(
            opened
                .runs
                .iter()
                .any(|run| matches!(run.stored, Stored::Zstd { .. })),
            "{options}: no zstd cluster"
        );
        assert_reads_as_qemu(image.path(), &options);
    }
    // And qemu's view is the raw disk we started from.
    let image = convert_to_qcow2(raw.path(), &["-c"]);
    assert!(qemu_raw(image.path()) == std::fs::read(raw.path()).unwrap());
}

#[test]
fn zero_clusters_preallocation_and_random_writes_read_as_qemu_reads_them() {
    let cases: &[(&str, &str)] = &[
        ("compat=1.1", "1.1 unallocated"),
        ("compat=1.1,preallocation=metadata", "1.1 metadata"),
        ("compat=1.1,preallocation=falloc", "1.1 falloc"),
        ("compat=1.1,preallocation=full", "1.1 full"),
        ("compat=0.10,preallocation=metadata", "0.10 metadata"),
        ("compat=1.1,cluster_size=4096", "1.1 4 KiB"),
        ("extended_l2=on", "extended L2, 64 KiB"),
        ("extended_l2=on,cluster_size=16384", "extended L2, 16 KiB"),
        ("extended_l2=on,cluster_size=2M", "extended L2, 2 MiB"),
        (
            "extended_l2=on,preallocation=metadata",
            "extended L2, metadata",
        ),
    ];
    for &(options, what) in cases {
        let image = NamedTempFile::new_in("/tmp").unwrap();
        create(image.path(), "16M", &["-o", options]);
        // Irregular allocation: writes of odd lengths at odd places, then zeroes over some of
        // them (v3 zero clusters; on v2 qemu writes zeros or deallocates).
        let mut commands = Vec::new();
        let mut state = 0x9e37_79b9u64;
        for _ in 0..40 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let offset = (state >> 20) % (15 * MIB) / 512 * 512;
            let length = ((state >> 8) % 300 + 1) * 512;
            commands.push(format!(
                "write -P {} {offset} {length}",
                (state >> 3) as u8 | 1
            ));
        }
        commands.push("write -z 0 2M".into());
        commands.push("write -z 5M 64k".into());
        commands.push(format!("write -z {} 3M", 9 * MIB + 65536));
        commands.push("write -P 7 5M 512".into());
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io(image.path(), &commands);
        assert_reads_as_qemu(image.path(), what);
    }
}

#[test]
fn snapshots_are_ignored_and_the_active_layer_is_read() {
    let raw = mixed_source(4 * MIB, &[(0, 200_000)]);
    let image = convert_to_qcow2(raw.path(), &[]);
    run(
        "qemu-img",
        &["snapshot", "-c", "before", &text(image.path())],
    );
    qemu_io(image.path(), &["write -P 9 0 1M"]);
    assert_reads_as_qemu(image.path(), "after a snapshot");
    let source = open_source(image.path());
    let mut first = vec![0u8; 4096];
    source.read_at(&mut first, 0).unwrap();
    assert!(first.iter().all(|&b| b == 9));
}

#[test]
fn a_sparse_image_maps_only_its_data() {
    // 4 GiB virtual, 3 MiB of data: the ranges the pipeline reads are about the data.
    let image = NamedTempFile::new_in("/tmp").unwrap();
    create(image.path(), "4G", &[]);
    qemu_io(image.path(), &["write -P 1 100M 1M", "write -P 2 3G 2M"]);
    let source = open_source(image.path());
    assert_eq!(source.virtual_size(), 4 << 30);
    let mapped: u64 = source
        .allocated_ranges()
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    assert!((3 * MIB..=4 * MIB).contains(&mapped), "{mapped}");
    let mut piece = vec![0u8; MIB as usize];
    source.read_at(&mut piece, 3 << 30).unwrap();
    assert!(piece.iter().all(|&b| b == 2));
    source.read_at(&mut piece, 2 << 30).unwrap();
    assert!(piece.iter().all(|&b| b == 0));
}

fn refusal(image: &Path) -> Error {
    formats::open(File::open(image).unwrap()).unwrap_err()
}

#[test]
fn unpassed_chains_data_files_flags_and_encryption_are_refused_with_the_way_forward() {
    let raw = mixed_source(4 * MIB, &[(0, 200_000), (MIB, 65536)]);
    let base = convert_to_qcow2(raw.path(), &[]);
    let overlay_image = NamedTempFile::new_in("/tmp").unwrap();
    overlay(overlay_image.path(), &text(base.path()), "qcow2", None);
    // A chain is read once the client passes the backing file (chain_tests); without it the
    // daemon asks for it by the name the overlay records.
    match refusal(overlay_image.path()) {
        Error::NeedFile {
            relation,
            candidates,
            ..
        } => {
            assert_eq!(relation, crate::formats::files::Relation::BackingFile);
            assert_eq!(candidates, vec![text(base.path())]);
        }
        other => panic!("expected NeedFile, got {other:?}"),
    }

    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let with_data_file = dir.path().join("meta.qcow2");
    let data_file = dir.path().join("data.raw");
    create(
        &with_data_file,
        "4M",
        &["-o", &format!("data_file={}", data_file.display())],
    );
    let message = refusal(&with_data_file).to_string();
    assert!(message.contains("external data file"), "{message}");
    assert!(
        message.contains(&data_file.to_string_lossy().into_owned()),
        "{message}"
    );

    let patched = |bit: u64| {
        let copy = convert_to_qcow2(raw.path(), &[]);
        copy.as_file().write_all_at(&bit.to_be_bytes(), 72).unwrap();
        refusal(copy.path()).to_string()
    };
    let dirty = patched(1);
    assert!(
        dirty.contains("dirty") && dirty.contains("qemu-img check -r all"),
        "{dirty}"
    );
    let corrupt = patched(2);
    assert!(corrupt.contains("marked corrupt"), "{corrupt}");
    let unknown = patched(1 << 20);
    assert!(
        unknown.contains("incompatible feature bits 0x100000"),
        "{unknown}"
    );

    let (encrypted, _) = encrypt_to_qcow2(&raw);
    match refusal(encrypted.path()) {
        Error::UnsupportedFormat { format, message } => {
            assert_eq!(format, ENCRYPTED_FORMAT_NAME);
            assert!(message.contains("imgctl decrypt"), "{message}");
            assert!(message.contains("imgctl rewrite"), "{message}");
            assert!(message.contains("--source-key-file"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_damaged_compressed_cluster_is_corrupt_at_its_guest_offset() {
    for compression in ["zlib", "zstd"] {
        damage_a_compressed_cluster(compression);
    }
}

fn damage_a_compressed_cluster(compression: &str) {
    let raw = mixed_source(MIB, &[(0, MIB)]);
    let options = format!("cluster_size=65536,compression_type={compression}");
    let image = convert_to_qcow2(raw.path(), &["-c", "-o", &options]);
    let source = formats::open(File::open(image.path()).unwrap()).unwrap();
    drop(source);
    // The first compressed cluster follows the metadata; find it through the map.
    let opened = Qcow2Image::open(File::open(image.path()).unwrap()).unwrap();
    let run = opened.runs[2];
    assert!(
        matches!(run.stored, Stored::Deflate { .. } | Stored::Zstd { .. }),
        "{run:?}"
    );
    image.as_file().write_all_at(&[0xff; 64], run.host).unwrap();
    let source = formats::open(File::open(image.path()).unwrap()).unwrap();
    let mut cluster = vec![0u8; 65536];
    match source.read_at(&mut cluster, run.guest).unwrap_err() {
        Error::CorruptImage { message, offset } => {
            assert_eq!(offset, Some(run.host));
            assert!(
                message.contains(&format!("guest offset {}", run.guest)),
                "{message}"
            );
        }
        other => panic!("expected CorruptImage, got {other:?}"),
    }
}

/// Flips bytes of the header, L1 and L2 tables and compressed data of small images, and cuts
/// them short: every outcome is an image read or an error, never a panic, and reads stay
/// bounded (the virtual sizes are small unless damaged, and then capped here).
#[test]
fn damaged_images_never_panic() {
    let raw = mixed_source(2 * MIB, &[(0, 100_000), (MIB, 300_000)]);
    let images = [
        convert_to_qcow2(raw.path(), &["-o", "cluster_size=4096"]),
        convert_to_qcow2(raw.path(), &["-c", "-o", "compat=0.10,cluster_size=4096"]),
        convert_to_qcow2(
            raw.path(),
            &["-c", "-o", "compression_type=zstd,cluster_size=4096"],
        ),
        convert_to_qcow2(raw.path(), &["-o", "extended_l2=on,cluster_size=16384"]),
    ];
    for image in &images {
        let pristine = std::fs::read(image.path()).unwrap();
        let header = Qcow2Image::open(File::open(image.path()).unwrap()).unwrap();
        let l1 = header.header.l1_table_offset as usize;
        let mut targets: Vec<usize> = (0..112).collect();
        targets.extend(l1..l1 + 16);
        // The first L2 table and the first data bytes follow the L1 table.
        let cluster = header.header.cluster_size() as usize;
        targets.extend((l1 + cluster..l1 + 3 * cluster).step_by(cluster / 100 + 1));
        let mut outcomes = (0usize, 0usize);
        for &at in targets.iter().filter(|&&at| at < pristine.len()) {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut damaged = pristine.clone();
                damaged[at] ^= flip;
                std::fs::write(image.path(), &damaged).unwrap();
                tally(image.path(), &mut outcomes);
            }
        }
        for cut in [
            0,
            50,
            100,
            4096,
            8192,
            pristine.len() / 2,
            pristine.len() - 1,
        ] {
            std::fs::write(image.path(), &pristine[..cut]).unwrap();
            tally(image.path(), &mut outcomes);
        }
        assert!(outcomes.0 > 0 && outcomes.1 > 0, "{outcomes:?}");
    }
}

/// Opens and reads (the first 8 MiB of) `image`, counting reads and errors.
fn tally(image: &Path, outcomes: &mut (usize, usize)) {
    let Ok(source) = formats::open(File::open(image).unwrap()) else {
        outcomes.1 += 1;
        return;
    };
    let size = source.virtual_size().min(8 * MIB) as usize;
    let mut bytes = vec![0u8; size];
    match bytes
        .chunks_mut(MIB as usize)
        .enumerate()
        .try_for_each(|(index, chunk)| source.read_at(chunk, index as u64 * MIB))
    {
        Ok(()) => outcomes.0 += 1,
        Err(_) => outcomes.1 += 1,
    }
}
