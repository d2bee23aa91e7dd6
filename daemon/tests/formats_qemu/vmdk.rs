//! The VMDK reader against qemu: every subformat `qemu-img` writes (monolithicSparse,
//! streamOptimized, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat), with data
//! written by `qemu-io` in irregular patterns; an OVA made with `tar` (ustar, GNU and pax)
//! around a streamOptimized disk; and the two VMDKs of the qemu sample corpus (qemu's iotest
//! 059: the fuzzer-made `afl9.vmdk` is refused with "L1 size too big", the VMware-made
//! streamOptimized `iotest-version3.vmdk` is read).
//!
//! Extent files are passed the way imgctl passes them: the test answers each
//! [`Error::NeedFile`] by opening the first candidate, relative to the directory of the file
//! that names it, and retries.

use super::*;
use imgcryptd::formats::files::{Passed, SourceFiles};

/// Opens `path` as imgctl would: every companion the reader asks for is resolved relative to
/// the directory of the file naming it, opened, and passed on the next try.
fn open_with_companions(path: &Path) -> Result<Box<dyn SourceImage>, Error> {
    let mut passed: Vec<(PathBuf, String, u32)> = Vec::new();
    loop {
        let companions = passed
            .iter()
            .map(|(path, name, referenced_by)| Passed {
                file: File::open(path).unwrap(),
                name: name.clone(),
                referenced_by: *referenced_by,
            })
            .collect();
        let files = SourceFiles::new(File::open(path).unwrap(), companions)?;
        match formats::open_files(&files) {
            Err(Error::NeedFile {
                referenced_by,
                candidates,
                ..
            }) => {
                assert!(passed.len() < 100, "endless requests: {candidates:?}");
                let referencing = match referenced_by {
                    0 => path.to_path_buf(),
                    k => passed[k as usize - 1].0.clone(),
                };
                let name = candidates[0].clone();
                let resolved = referencing.parent().unwrap().join(&name);
                assert!(resolved.exists(), "{} asked for", resolved.display());
                passed.push((resolved, name, referenced_by));
            }
            other => return other,
        }
    }
}

/// Opens with companions, compares with qemu's raw conversion, and checks the format.
fn assert_vmdk_like_qemu(path: &Path, what: &str) -> Box<dyn SourceImage> {
    let image = open_with_companions(path).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_image_like_qemu(image.as_ref(), path, "vmdk", SourceFormat::Vmdk, what);
    image
}

/// Deterministic scattered writes of 512 B .. 512 KiB, unaligned to grains.
fn irregular_writes(size: u64, count: usize, seed: u64) -> Vec<(u64, u64, u8)> {
    scattered_writes(size, count, seed, |lcg| (lcg.next() % 1024 + 1) * 512)
}

/// A raw disk of `size` bytes with `writes`, then `qemu-img convert`ed to a VMDK.
fn converted(
    dir: &Path,
    name: &str,
    size: u64,
    writes: &[(u64, u64, u8)],
    options: &[&str],
) -> PathBuf {
    let raw = create(
        dir,
        &format!("{name}.src.raw"),
        "raw",
        &size.to_string(),
        &[],
    );
    write_pattern(&raw, "raw", writes);
    let path = dir.join(name);
    convert_raw(&raw, "vmdk", &options.join(","), &path);
    std::fs::remove_file(raw).unwrap();
    path
}

#[test]
fn every_vmdk_subformat_qemu_img_writes_reads_like_qemu_img_convert() {
    let dir = scratch();
    let size = 40 * MIB + 7 * 512;
    for (index, subformat) in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ]
    .into_iter()
    .enumerate()
    {
        // qemu-img refuses zeroed grains for flat extents ("Flat image can't enable zeroed
        // grain").
        let zeroed: &[&str] = if subformat.contains("Flat") {
            &["off"]
        } else {
            &["off", "on"]
        };
        for zeroed_grain in zeroed {
            let name = format!("{subformat}-{zeroed_grain}.vmdk");
            let subdir = dir.path().join(format!("{index}-{zeroed_grain}"));
            std::fs::create_dir(&subdir).unwrap();
            let path = create(
                &subdir,
                &name,
                "vmdk",
                &size.to_string(),
                &[
                    &format!("subformat={subformat}"),
                    &format!("zeroed_grain={zeroed_grain}"),
                ],
            );
            let mut writes = scatter(size);
            writes.extend(irregular_writes(size, 16, index as u64 + 1));
            write_pattern(&path, "vmdk", &writes);
            // Zeroing a written range makes zeroed grains (GT entry 1) with zeroed_grain=on.
            run(
                "qemu-io",
                &["-f", "vmdk", "-c", "write -z 7M 1M", path_str(&path)],
            );
            let image = assert_vmdk_like_qemu(&path, &name);
            if subformat.contains("Sparse") {
                assert_eq!(image.allocation_unit(), Some(64 * 1024), "{name}");
                assert!(
                    covers(image.allocated_ranges(), &qemu_data_ranges(&path, "vmdk")),
                    "{name}: {:?}",
                    image.allocated_ranges()
                );
            }
        }
    }
}

#[test]
fn stream_optimized_vmdks_read_like_qemu_img_convert() {
    let dir = scratch();
    // A size that is no whole number of grains: the last grain is shorter.
    let size = 33 * MIB + 3 * 512;
    let mut writes = scatter(size);
    writes.extend(irregular_writes(size, 24, 7));
    let path = converted(
        dir.path(),
        "stream.vmdk",
        size,
        &writes,
        &["subformat=streamOptimized"],
    );
    let image = assert_vmdk_like_qemu(&path, "streamOptimized");
    assert!(covers(
        image.allocated_ranges(),
        &qemu_data_ranges(&path, "vmdk")
    ));
    // Incompressible data: streams as long as the grain, or longer.
    let random = dir.path().join("random.raw");
    let bytes: Vec<u8> = irregular_writes(1 << 40, 4 * 65536 / 4, 3)
        .iter()
        .flat_map(|(offset, _, _)| (*offset as u32).to_le_bytes())
        .collect();
    std::fs::write(&random, &bytes).unwrap();
    let noisy = dir.path().join("noisy.vmdk");
    convert_raw(&random, "vmdk", "subformat=streamOptimized", &noisy);
    assert_vmdk_like_qemu(&noisy, "incompressible streamOptimized");
}

/// A 4.5 GiB disk crosses two 2 GiB extent boundaries; the writes straddle them. Everything
/// stays sparse.
#[test]
fn two_gb_max_extent_vmdks_across_extent_boundaries_read_like_qemu() {
    let dir = scratch();
    let size = (4u64 << 30) + 512 * MIB + 512;
    let two = 2u64 << 30;
    let writes = [
        (0, 4096, 0x01u8),
        (two - 4096, 8192, 0x02),
        (two + 512 * 3, 512, 0x03),
        (2 * two - 64 * 1024 - 512, 200 * 1024, 0x04),
        (size - 4096, 4096, 0x05),
    ];
    for subformat in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let path = create(
            dir.path(),
            &format!("{subformat}.vmdk"),
            "vmdk",
            &size.to_string(),
            &[&format!("subformat={subformat}")],
        );
        write_pattern(&path, "vmdk", &writes);
        let image = open_with_companions(&path).unwrap();
        assert_eq!(image.virtual_size(), qemu_virtual_size(&path, "vmdk"));
        for &(offset, length, _) in &writes {
            let window = offset.saturating_sub(512)..(offset + length + 512).min(size);
            let mut expected = vec![0u8; (window.end - window.start) as usize];
            for &(at, len, pattern) in &writes {
                for byte in at.max(window.start)..(at + len).min(window.end) {
                    expected[(byte - window.start) as usize] = pattern;
                }
            }
            let mut got = vec![0xffu8; expected.len()];
            image.read_at(&mut got, window.start).unwrap();
            assert!(got == expected, "{subformat}: the write at {offset}");
        }
        // And the whole disk against qemu.
        assert_vmdk_like_qemu(&path, subformat);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
    }
}

/// `tar` of a streamOptimized disk and a dummy OVF, in each archive format.
#[test]
fn an_ova_with_one_disk_is_read_in_place_like_qemu_reads_the_disk() {
    let dir = scratch();
    let size = 20 * MIB;
    let mut writes = scatter(size);
    writes.extend(irregular_writes(size, 10, 11));
    let disk = converted(
        dir.path(),
        "appliance-disk1.vmdk",
        size,
        &writes,
        &["subformat=streamOptimized"],
    );
    std::fs::write(
        dir.path().join("appliance.ovf"),
        "<?xml version=\"1.0\"?><Envelope><References><File ovf:href=\"appliance-disk1.vmdk\"/>\
         </References></Envelope>\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("appliance.mf"),
        "SHA256(appliance.ovf)= 00\n",
    )
    .unwrap();
    let raw = qemu_to_raw(&disk, "vmdk");
    for format in ["ustar", "gnu", "pax"] {
        let ova = dir.path().join(format!("appliance-{format}.ova"));
        let status = Command::new("tar")
            .current_dir(dir.path())
            .args(["--format", format, "-cf"])
            .arg(&ova)
            .args(["appliance.ovf", "appliance-disk1.vmdk", "appliance.mf"])
            .status()
            .unwrap();
        assert!(status.success());
        let image = open_source(&ova);
        assert_eq!(image.format(), SourceFormat::Vmdk, "{format}");
        assert_reads_like(image.as_ref(), &raw);
    }

    // Two disks: refused, naming both and how to extract one.
    std::fs::copy(&disk, dir.path().join("appliance-disk2.vmdk")).unwrap();
    let two = dir.path().join("two.ova");
    let status = Command::new("tar")
        .current_dir(dir.path())
        .arg("-cf")
        .arg(&two)
        .args([
            "appliance.ovf",
            "appliance-disk1.vmdk",
            "appliance-disk2.vmdk",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    match formats::open(File::open(&two).unwrap()).unwrap_err() {
        Error::UnsupportedImage { message } => {
            for word in ["appliance-disk1.vmdk", "appliance-disk2.vmdk", "tar -xf"] {
                assert!(message.contains(word), "{word} missing: {message}");
            }
        }
        other => panic!("expected UnsupportedImage, got {other:?}"),
    }

    // No disk at all: still refused as a tar archive.
    let none = dir.path().join("none.tar");
    let status = Command::new("tar")
        .current_dir(dir.path())
        .arg("-cf")
        .arg(&none)
        .arg("appliance.ovf")
        .status()
        .unwrap();
    assert!(status.success());
    match formats::open(File::open(&none).unwrap()).unwrap_err() {
        Error::UnsupportedFormat { format, .. } => assert_eq!(format, "tar"),
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
}

/// qemu's iotest 059: `afl9.vmdk` fails with "L1 size too big"; `iotest-version3.vmdk` (a
/// VMware-made version 3 streamOptimized disk, its GD in the footer) reads.
#[test]
fn the_corpus_vmdks_are_read_or_refused_as_qemu_does() {
    let dir = scratch();
    let afl9 = corpus("afl9.vmdk", dir.path());
    let qemu = run_status("qemu-img", &["info", "-f", "vmdk", path_str(&afl9)]).unwrap_err();
    assert!(qemu.contains("L1 size too big"), "{qemu}");
    match formats::open(File::open(&afl9).unwrap()).unwrap_err() {
        Error::CorruptImage { message, .. } => {
            assert!(message.contains("L1 size too big"), "{message}")
        }
        other => panic!("expected CorruptImage, got {other:?}"),
    }
    let version3 = corpus("iotest-version3.vmdk", dir.path());
    assert_vmdk_like_qemu(&version3, "iotest-version3.vmdk");
}

#[test]
fn a_descriptor_whose_extent_is_missing_asks_for_it_by_name() {
    let dir = scratch();
    let path = create(
        dir.path(),
        "flat.vmdk",
        "vmdk",
        "4M",
        &["subformat=monolithicFlat"],
    );
    match formats::open(File::open(&path).unwrap()).unwrap_err() {
        Error::NeedFile { candidates, .. } => assert_eq!(candidates, ["flat-flat.vmdk"]),
        other => panic!("expected NeedFile, got {other:?}"),
    }
}

/// `DIR/child.vmdk`, a delta link qemu-img makes over `DIR/base.vmdk` (`-b base.vmdk -F vmdk`,
/// and `args`), recording the base in `parentFileNameHint` and its CID in `parentCID`.
fn delta_link(dir: &Path, args: &[&str]) -> PathBuf {
    let child = dir.join("child.vmdk");
    let mut all = vec![
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
    ];
    all.extend_from_slice(args);
    all.push(path_str(&child));
    run("qemu-img", &all);
    child
}

/// A delta link: qemu-img makes a child VMDK over a VMDK base (`-b`), which records the base in
/// `parentFileNameHint`.
#[test]
fn a_vmdk_delta_link_reads_over_its_parent_like_qemu() {
    let dir = scratch();
    let size = 24 * MIB;
    let base = create(dir.path(), "base.vmdk", "vmdk", &size.to_string(), &[]);
    write_pattern(&base, "vmdk", &scatter(size));
    let child = delta_link(dir.path(), &["-o", "zeroed_grain=on"]);
    write_pattern(&child, "vmdk", &irregular_writes(size, 12, 5));
    run(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -z 1M 64k", path_str(&child)],
    );
    let image = assert_vmdk_like_qemu(&child, "delta link");
    assert_eq!(image.backing().map(|(name, _)| name), Some("base.vmdk"));
}

/// The first `field=` value of a VMDK's descriptor (embedded at 512 in a sparse file, or the
/// descriptor file), as qemu-img wrote it (hexadecimal: `%08x` when made, `%x` when rewritten).
fn descriptor_id(path: &Path, field: &str) -> String {
    let bytes = std::fs::read(path).unwrap();
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(64 * 1024)]).into_owned();
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}=")))
        .unwrap_or_else(|| panic!("no {field}= in {}", path.display()));
    value.trim().to_string()
}

fn hex(text: &str) -> u32 {
    u32::from_str_radix(text, 16).unwrap()
}

/// Rewrites the child's `parentCID=OLD` in place with `new`, as a user who knows the parent is
/// right would. The embedded descriptor is followed by NUL padding inside its sectors, so a
/// value one digit longer (qemu writes CIDs without leading zeros) takes a byte of the padding
/// and a shorter one gives bytes back: nothing after the descriptor moves.
fn set_parent_cid(child: &Path, old: &str, new: u32) {
    let mut bytes = std::fs::read(child).unwrap();
    let needle = format!("parentCID={old}");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("parentCID in the child");
    let value_at = at + "parentCID=".len();
    let text_end = value_at
        + bytes[value_at..]
            .iter()
            .position(|&b| b == 0)
            .expect("NUL padding after the embedded descriptor");
    let mut rewritten = format!("{new:x}").into_bytes();
    rewritten.extend_from_slice(&bytes[value_at + old.len()..text_end]);
    let region = value_at..text_end.max(value_at + rewritten.len());
    assert!(
        bytes[text_end..region.end].iter().all(|&b| b == 0),
        "no padding left for a longer parentCID"
    );
    rewritten.resize(region.len(), 0);
    bytes[region].copy_from_slice(&rewritten);
    std::fs::write(child, bytes).unwrap();
}

/// qemu refuses a delta link whose `parentCID` is not its parent's `CID` (the parent was
/// written after the child was made: qemu gives a VMDK a new CID on its first write), and so
/// does the reader, saying both ids; the matching chain reads, before the change and after the
/// child's parentCID is set to the parent's new CID. Over a sparse parent (CID embedded at 512)
/// and over a monolithicFlat one (CID in the descriptor file).
#[test]
fn a_vmdk_delta_link_whose_parent_changed_is_refused_like_qemu() {
    let size = 8 * MIB;
    for subformat in ["monolithicSparse", "monolithicFlat"] {
        let dir = scratch();
        let base = create(
            dir.path(),
            "base.vmdk",
            "vmdk",
            &size.to_string(),
            &[&format!("subformat={subformat}")],
        );
        write_pattern(&base, "vmdk", &[(0, 3 * MIB, 0x11), (6 * MIB, MIB, 0x66)]);
        let child = delta_link(dir.path(), &[]);
        write_pattern(&child, "vmdk", &[(MIB, 64 * 1024, 0x22)]);
        let recorded = descriptor_id(&child, "parentCID");
        let made_over = hex(&recorded);
        assert_eq!(made_over, hex(&descriptor_id(&base, "CID")), "{subformat}");
        assert_vmdk_like_qemu(&child, &format!("{subformat}: matching parentCID"));

        write_pattern(&base, "vmdk", &[(2 * MIB, 64 * 1024, 0x33)]);
        let now = hex(&descriptor_id(&base, "CID"));
        assert_ne!(
            now, made_over,
            "{subformat}: qemu-io gave the base a new CID"
        );
        let raw = dir.path().join("child.raw");
        let qemu = run_status(
            "qemu-img",
            &[
                "convert",
                "-f",
                "vmdk",
                "-O",
                "raw",
                path_str(&child),
                path_str(&raw),
            ],
        )
        .expect_err("qemu-img reads a child whose parent changed");
        assert!(qemu.contains("Invalid argument"), "{subformat}: {qemu}");
        let message = match open_with_companions(&child) {
            Err(Error::UnsupportedImage { message }) => message,
            Err(other) => panic!("{subformat}: expected UnsupportedImage, got {other:?}"),
            Ok(_) => panic!("{subformat}: a child whose parent changed was read"),
        };
        for words in [
            format!("CID was {made_over:08x}"),
            format!("now has CID {now:08x}"),
            "`base.vmdk`".into(),
            "changed after the child was made".into(),
            format!("set the child's parentCID to {now:08x}"),
        ] {
            assert!(
                message.contains(&words),
                "{subformat}: {words:?} in {message}"
            );
        }

        set_parent_cid(&child, &recorded, now);
        let image = assert_vmdk_like_qemu(&child, &format!("{subformat}: parentCID set"));
        assert_eq!(image.backing().map(|(name, _)| name), Some("base.vmdk"));
    }
}
