//! qcow2 backing chains read through [`crate::formats::open_files`] with the companions passed
//! as a client would, against qemu-img's raw conversion of the top image: zero clusters over a
//! backing file, the recorded backing format, the name asked for, cycles and the depth limit.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::test_images::{create, overlay, qemu_io, qemu_raw, read_all, text, MIB};
use super::*;
use crate::formats;
use crate::formats::files::{Passed, MAX_CHAIN_DEPTH};

/// `files` passed as companions: `(path, name, referenced_by)`.
fn source_files(source: &Path, companions: &[(&Path, &str, u32)]) -> SourceFiles {
    let passed = companions
        .iter()
        .map(|&(path, name, referenced_by)| Passed {
            file: File::open(path).unwrap(),
            name: name.to_string(),
            referenced_by,
        })
        .collect();
    SourceFiles::new(File::open(source).unwrap(), passed).unwrap()
}

/// A raw base of 4 MiB filled with 0x11, and a qcow2 over it naming it `base.raw` (relative).
fn raw_base_and_overlay(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x11u8; 4 * MIB as usize]).unwrap();
    let top = dir.join("top.qcow2");
    overlay(&top, "base.raw", "raw", Some("4M"));
    (base, top)
}

#[test]
fn zero_clusters_hide_the_backing_file_and_unallocated_ones_show_it() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let (base, top) = raw_base_and_overlay(dir.path());
    qemu_io(
        &top,
        &[
            "write -P 0x22 0 64k",
            "write -z 1M 64k",
            "write -P 0x33 3M 4k",
        ],
    );
    let expected = qemu_raw(&top);
    // qemu's own view: the zero cluster reads zeros, the unallocated clusters the base's 0x11.
    assert!(expected[MIB as usize..][..65536].iter().all(|&b| b == 0));
    assert!(expected[2 * MIB as usize..][..65536]
        .iter()
        .all(|&b| b == 0x11));

    let files = source_files(&top, &[(&base, "base.raw", 0)]);
    let image = formats::open_files(&files).unwrap();
    assert_eq!(image.format(), SourceFormat::Qcow2);
    assert_eq!(read_all(&*image, 100_000), expected);
    let (name, below) = image.backing().unwrap();
    assert_eq!(name, "base.raw");
    assert_eq!(below.format(), SourceFormat::Raw);
    // Everything the base holds is allocated in the chain's view.
    let whole: Range<u64> = 0..4 * MIB;
    assert_eq!(image.allocated_ranges(), std::slice::from_ref(&whole));

    // The layer's own map tells the two apart.
    let file = File::open(&top).unwrap();
    let size = file.metadata().unwrap().len();
    let header = header::parse(&file, size).unwrap();
    let own = Qcow2Image::walked(file, size, header, None).unwrap();
    let (layout, _) = own.layout(None, SourceFormat::Qcow2);
    assert_eq!(layout.map(MIB, 4096).unwrap().chunk, Chunk::Zero);
    assert_eq!(layout.map(2 * MIB, 4096).unwrap().chunk, Chunk::Backing);
    assert!(matches!(
        layout.map(0, 4096).unwrap().chunk,
        Chunk::Data { file: 0, .. }
    ));
}

#[test]
fn the_backing_file_is_asked_for_by_its_recorded_name() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let (_, top) = raw_base_and_overlay(dir.path());
    match formats::open(File::open(&top).unwrap()).unwrap_err() {
        Error::NeedFile {
            referenced_by,
            relation,
            candidates,
            ..
        } => {
            assert_eq!(referenced_by, 0);
            assert_eq!(relation, Relation::BackingFile);
            assert_eq!(candidates, vec!["base.raw".to_string()]);
        }
        other => panic!("expected NeedFile, got {other:?}"),
    }
    // A `file:` name is a local file; protocols and json: options are not.
    let local = dir.path().join("local.qcow2");
    overlay(&local, "file:base.raw", "raw", Some("4M"));
    match formats::open(File::open(&local).unwrap()).unwrap_err() {
        Error::NeedFile { candidates, .. } => assert_eq!(candidates, vec!["base.raw"]),
        other => panic!("expected NeedFile, got {other:?}"),
    }
    for (name, says) in [
        ("nbd://localhost:10809/disk", "`nbd:` protocol"),
        ("http://example.com/base.raw", "`http:` protocol"),
        (
            r#"json:{"driver":"raw","file":{"driver":"file","filename":"base.raw"}}"#,
            "`json:` option string",
        ),
    ] {
        let remote = dir.path().join("remote.qcow2");
        let _ = std::fs::remove_file(&remote);
        overlay(&remote, name, "raw", Some("4M"));
        let message = formats::open(File::open(&remote).unwrap())
            .unwrap_err()
            .to_string();
        assert!(message.contains(says), "{name}: {message}");
        assert!(message.contains("qemu-img rebase"), "{name}: {message}");
    }
}

#[test]
fn a_backing_file_whose_content_is_not_the_recorded_format_is_refused() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; 4 * MIB as usize]).unwrap();
    let top = dir.path().join("top.qcow2");
    overlay(&top, "base.raw", "qcow2", Some("4M"));
    let files = source_files(&top, &[(&base, "base.raw", 0)]);
    let message = formats::open_files(&files).unwrap_err().to_string();
    assert!(
        message.contains("as qcow2, but its content is raw"),
        "{message}"
    );
    let odd = dir.path().join("odd.qcow2");
    overlay(&odd, "base.raw", "qed", Some("4M"));
    let files = source_files(&odd, &[(&base, "base.raw", 0)]);
    let message = formats::open_files(&files).unwrap_err().to_string();
    assert!(message.contains("\"qed\""), "{message}");
    // Recorded right, it reads.
    let right = dir.path().join("right.qcow2");
    overlay(&right, "base.raw", "raw", Some("4M"));
    let files = source_files(&right, &[(&base, "base.raw", 0)]);
    assert_eq!(
        read_all(&*formats::open_files(&files).unwrap(), MIB as usize),
        qemu_raw(&right)
    );
}

#[test]
fn a_chain_that_names_itself_is_a_cycle() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    overlay(&a, "b.qcow2", "qcow2", Some("4M"));
    overlay(&b, "a.qcow2", "qcow2", Some("4M"));
    let files = source_files(&a, &[(&b, "b.qcow2", 0), (&a, "a.qcow2", 1)]);
    match formats::open_files(&files).unwrap_err() {
        Error::CorruptImage { message, .. } => {
            assert!(message.contains("cycle"), "{message}")
        }
        other => panic!("expected a cycle, got {other:?}"),
    }
}

#[test]
fn a_chain_deeper_than_the_limit_is_refused() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let layers = MAX_CHAIN_DEPTH + 1;
    let names: Vec<String> = (0..layers).map(|i| format!("l{i}.qcow2")).collect();
    let paths: Vec<PathBuf> = names.iter().map(|name| dir.path().join(name)).collect();
    create(&paths[layers - 1], "1M", &[]);
    for i in (0..layers - 1).rev() {
        overlay(&paths[i], &names[i + 1], "qcow2", Some("1M"));
    }
    qemu_io(&paths[layers - 1], &["write -P 5 0 4k"]);
    // Opened from layer `from`: companion k is layer from + k, named by the one before.
    let chain = |from: usize| {
        let companions: Vec<(&Path, &str, u32)> = (from + 1..layers)
            .map(|i| (paths[i].as_path(), names[i].as_str(), (i - from - 1) as u32))
            .collect();
        formats::open_files(&source_files(&paths[from], &companions))
    };
    let deepest = chain(1).unwrap();
    let mut first = vec![0u8; 4096];
    deepest.read_at(&mut first, 0).unwrap();
    assert!(first.iter().all(|&b| b == 5));
    match chain(0).unwrap_err() {
        Error::UnsupportedImage { message } => {
            assert!(message.contains("deeper than 16"), "{message}")
        }
        other => panic!("expected the depth limit, got {other:?}"),
    }
}

#[test]
fn an_external_data_file_is_asked_for_and_read_at_the_recorded_offsets() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    for (options, what) in [("", "data file"), (",data_file_raw=on", "raw data file")] {
        let meta = dir.path().join("meta.qcow2");
        let data = dir.path().join("data.raw");
        let _ = std::fs::remove_file(&meta);
        let _ = std::fs::remove_file(&data);
        // Made from the directory, so qemu-img creates the data file there and records the
        // relative name.
        let made = std::process::Command::new("qemu-img")
            .current_dir(dir.path())
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file=data.raw{options}"))
            .args(["meta.qcow2", "4M"])
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        // qemu 10 opens a relative data file name from its working directory (not the
        // image's, as for backing files): run it from there so both name the same file.
        let in_dir = |args: &[&str]| {
            let output = std::process::Command::new(args[0])
                .current_dir(dir.path())
                .args(&args[1..])
                .output()
                .unwrap();
            assert!(output.status.success(), "{args:?}: {output:?}");
        };
        in_dir(&[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 64k 300k",
            "-c",
            "write -P 0x43 3M 4k",
            "-c",
            "write -z 96k 64k",
            "meta.qcow2",
        ]);
        in_dir(&[
            "qemu-img",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "meta.qcow2",
            "expected.raw",
        ]);
        let expected = std::fs::read(dir.path().join("expected.raw")).unwrap();
        assert!(
            expected[65536..][..4096].iter().all(|&b| b == 0x42),
            "{what}"
        );
        match formats::open(File::open(&meta).unwrap()).unwrap_err() {
            Error::NeedFile {
                relation,
                candidates,
                ..
            } => {
                assert_eq!(relation, Relation::DataFile, "{what}");
                assert_eq!(candidates, vec!["data.raw".to_string()], "{what}");
            }
            other => panic!("{what}: expected NeedFile, got {other:?}"),
        }
        let files = source_files(&meta, &[(&data, "data.raw", 0)]);
        let image = formats::open_files(&files).unwrap();
        assert_eq!(read_all(&*image, 100_000), expected, "{what}");
    }
}

/// qemu allocates an external data file's clusters from offset 0: an L2 entry of offset 0 with
/// the "copied" bit is the first cluster of the data file, not an unallocated one.
#[test]
fn a_data_cluster_at_offset_zero_of_the_data_file_is_read() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let data = dir.path().join("data/guest.raw");
    let meta = dir.path().join("meta.qcow2");
    let option = format!("data_file={}", data.display());
    create(&meta, "8M", &["-o", &option]);
    qemu_io(&meta, &["write -P 0x21 0 1M", "write -z 512k 64k"]);
    let expected = qemu_raw(&meta);
    assert!(expected[..65536].iter().all(|&b| b == 0x21));
    let name = text(&data);
    let files = source_files(&meta, &[(&data, &name, 0)]);
    let image = formats::open_files(&files).unwrap();
    assert_eq!(read_all(&*image, 100_000), expected);
    assert_eq!(image.allocated_ranges()[0].start, 0);
}
