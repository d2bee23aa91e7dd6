//! Unit tests of the VMDK reader: small images written byte by byte after the spec (a sparse
//! extent, a streamOptimized one with its GD in the footer, descriptors, tar archives), and
//! hostile variants of each, which must be refused with the message qemu gives, never read.

use std::io::Write;
use std::os::unix::fs::FileExt;

use super::*;
use crate::formats::{self, files::Passed};

const GRAIN_SECTORS: u64 = 8;
const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
const GTES: u32 = 4;

/// A sparse extent header sector.
#[derive(Clone)]
struct Spec {
    version: u32,
    flags: u32,
    capacity: u64,
    grain_sectors: u64,
    gtes: u32,
    gd_offset: u64,
    overhead: u64,
    compression: u16,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            version: 1,
            flags: 1 | (1 << 2),
            capacity: 4 * GRAIN_SECTORS,
            grain_sectors: GRAIN_SECTORS,
            gtes: GTES,
            gd_offset: 3,
            overhead: 4,
            compression: 0,
        }
    }
}

impl Spec {
    fn sector(&self) -> [u8; 512] {
        let mut s = [0u8; 512];
        s[..4].copy_from_slice(b"KDMV");
        s[4..8].copy_from_slice(&self.version.to_le_bytes());
        s[8..12].copy_from_slice(&self.flags.to_le_bytes());
        s[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        s[20..28].copy_from_slice(&self.grain_sectors.to_le_bytes());
        s[44..48].copy_from_slice(&self.gtes.to_le_bytes());
        s[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        s[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        s[73..77].copy_from_slice(b"\n \r\n");
        s[77..79].copy_from_slice(&self.compression.to_le_bytes());
        s
    }
}

fn file_of(bytes: &[u8]) -> File {
    let mut file = tempfile::tempfile_in("/tmp").unwrap();
    file.write_all(bytes).unwrap();
    file
}

fn put(image: &mut Vec<u8>, at: u64, bytes: &[u8]) {
    let end = at as usize + bytes.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[at as usize..end].copy_from_slice(bytes);
}

fn put_u32s(image: &mut Vec<u8>, at: u64, values: &[u32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    put(image, at, &bytes);
}

/// What a sparse VMDK that is a whole disk embeds at sector 1 (qemu requires a `CID`).
const EMBEDDED: &[u8] = b"# Disk DescriptorFile\nCID=fffffffe\nparentCID=ffffffff\n";

/// A monolithicSparse-like extent: descriptor at sector 1, GT at sector 2, GD at sector 3,
/// grains from sector 4:
/// grain 0 data (0x11), grain 1 unallocated, grain 2 zeroed (GT entry 1), grain 3 data (0x33).
fn sparse_image(spec: &Spec) -> Vec<u8> {
    let mut image = spec.sector().to_vec();
    put(&mut image, SECTOR, EMBEDDED);
    put_u32s(&mut image, 3 * SECTOR, &[2]);
    put_u32s(&mut image, 2 * SECTOR, &[4, 0, 1, 12]);
    put(&mut image, 4 * SECTOR, &[0x11; GRAIN as usize]);
    put(&mut image, 12 * SECTOR, &[0x33; GRAIN as usize]);
    image
}

fn read_all(image: &dyn SourceImage) -> Vec<u8> {
    let mut bytes = vec![0xa5u8; image.virtual_size() as usize];
    image.read_at(&mut bytes, 0).unwrap();
    bytes
}

fn expected_sparse() -> Vec<u8> {
    let mut bytes = vec![0x11u8; GRAIN as usize];
    bytes.extend(vec![0u8; 2 * GRAIN as usize]);
    bytes.extend(vec![0x33u8; GRAIN as usize]);
    bytes
}

#[test]
fn a_sparse_extent_reads_data_unallocated_and_zeroed_grains() {
    let image = formats::open(file_of(&sparse_image(&Spec::default()))).unwrap();
    assert_eq!(image.format(), SourceFormat::Vmdk);
    assert_eq!(image.virtual_size(), 4 * GRAIN);
    assert_eq!(read_all(image.as_ref()), expected_sparse());
    assert_eq!(image.allocation_unit(), Some(GRAIN));
    // Grains 0 and 3 are stored; the gap between is under the merge gap.
    let whole: Range<u64> = 0..4 * GRAIN;
    assert_eq!(image.allocated_ranges(), std::slice::from_ref(&whole));
}

#[test]
fn without_the_zeroed_grain_flag_entry_1_is_a_grain_at_sector_1() {
    let spec = Spec {
        flags: 1,
        ..Spec::default()
    };
    let bytes = sparse_image(&spec);
    let image = formats::open(file_of(&bytes)).unwrap();
    let got = read_all(image.as_ref());
    // As qemu reads it: grain 2 is the 4 KiB from sector 1 (the GD, the GT, ...).
    assert_eq!(
        &got[2 * GRAIN as usize..3 * GRAIN as usize],
        &bytes[SECTOR as usize..(SECTOR + GRAIN) as usize]
    );
}

/// A streamOptimized extent: header with GD_AT_END, compressed grains with markers, GT and GD
/// with their markers, the footer and the end-of-stream marker.
fn stream_image(footer_marker_type: u32) -> (Vec<u8>, Vec<u8>) {
    let spec = Spec {
        version: 3,
        flags: 1 | (1 << 16) | (1 << 17),
        compression: 1,
        gd_offset: sparse::GD_AT_END,
        overhead: 2,
        ..Spec::default()
    };
    let mut image = spec.sector().to_vec();
    put(&mut image, SECTOR, EMBEDDED);
    let grain0: Vec<u8> = (0..GRAIN).map(|i| (i % 7) as u8 + 1).collect();
    let grain3 = vec![0x44u8; GRAIN as usize];
    let mut at = 2 * SECTOR;
    let mut sectors = Vec::new();
    for (lba, grain) in [(0u64, &grain0), (3 * GRAIN_SECTORS, &grain3)] {
        let stream = miniz_oxide::deflate::compress_to_vec_zlib(grain, 6);
        let mut marker = lba.to_le_bytes().to_vec();
        marker.extend((stream.len() as u32).to_le_bytes());
        marker.extend(&stream);
        sectors.push((at / SECTOR) as u32);
        put(&mut image, at, &marker);
        at = (at + marker.len() as u64).div_ceil(SECTOR) * SECTOR;
    }
    // GT marker, GT; GD marker, GD.
    let mut gt_marker = [0u8; 512];
    gt_marker[..8].copy_from_slice(&1u64.to_le_bytes());
    gt_marker[12..16].copy_from_slice(&1u32.to_le_bytes());
    put(&mut image, at, &gt_marker);
    let gt_at = at + SECTOR;
    put_u32s(&mut image, gt_at, &[sectors[0], 0, 0, sectors[1]]);
    let mut gd_marker = gt_marker;
    gd_marker[12..16].copy_from_slice(&2u32.to_le_bytes());
    put(&mut image, gt_at + SECTOR, &gd_marker);
    let gd_at = gt_at + 2 * SECTOR;
    put_u32s(&mut image, gd_at, &[(gt_at / SECTOR) as u32]);
    let mut footer_marker = [0u8; 512];
    footer_marker[..8].copy_from_slice(&1u64.to_le_bytes());
    footer_marker[12..16].copy_from_slice(&footer_marker_type.to_le_bytes());
    let footer_at = gd_at + SECTOR;
    put(&mut image, footer_at, &footer_marker);
    let footer = Spec {
        gd_offset: gd_at / SECTOR,
        ..spec
    };
    put(&mut image, footer_at + SECTOR, &footer.sector());
    put(&mut image, footer_at + 2 * SECTOR, &[0u8; 512]);
    let mut expected = grain0;
    expected.extend(vec![0u8; 2 * GRAIN as usize]);
    expected.extend(grain3);
    (image, expected)
}

#[test]
fn a_stream_optimized_extent_is_read_through_its_footer() {
    let (bytes, expected) = stream_image(3);
    let image = formats::open(file_of(&bytes)).unwrap();
    assert_eq!(image.virtual_size(), 4 * GRAIN);
    assert_eq!(read_all(image.as_ref()), expected);
    // Reads that split grains decompress the right unit.
    let mut piece = vec![0u8; 1000];
    image.read_at(&mut piece, 3 * GRAIN - 300).unwrap();
    assert_eq!(piece, expected[(3 * GRAIN - 300) as usize..][..1000]);
}

#[test]
fn a_stream_optimized_extent_without_a_valid_footer_is_refused_like_qemu() {
    let (bytes, _) = stream_image(2);
    let error = formats::open(file_of(&bytes)).unwrap_err();
    assert!(error.to_string().contains("Invalid footer"), "{error}");
}

#[test]
fn a_grain_marker_claiming_too_much_is_refused() {
    let (mut bytes, _) = stream_image(3);
    put(&mut bytes, 2 * SECTOR + 8, &u32::MAX.to_le_bytes());
    let error = formats::open(file_of(&bytes)).unwrap_err();
    match error {
        Error::CorruptImage { message, offset } => {
            assert_eq!(offset, Some(2 * SECTOR));
            assert!(message.contains("grain marker"), "{message}");
        }
        other => panic!("expected CorruptImage, got {other:?}"),
    }
}

#[test]
fn a_corrupted_compressed_grain_is_an_error_when_read() {
    let (mut bytes, _) = stream_image(3);
    put(&mut bytes, 2 * SECTOR + 12 + 4, &[0xff; 16]);
    let image = formats::open(file_of(&bytes)).unwrap();
    let mut buffer = vec![0u8; 512];
    assert!(matches!(
        image.read_at(&mut buffer, 0),
        Err(Error::CorruptImage { .. })
    ));
}

#[track_caller]
fn refused(spec: &Spec, words: &str) {
    let error = formats::open(file_of(&sparse_image(spec))).unwrap_err();
    assert!(
        matches!(
            error,
            Error::CorruptImage { .. } | Error::UnsupportedImage { .. }
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(words),
        "{words:?} missing: {error}"
    );
}

#[test]
fn hostile_headers_are_refused_as_qemu_refuses_them() {
    let base = Spec::default();
    refused(
        &Spec {
            version: 4,
            ..base.clone()
        },
        "version 4",
    );
    refused(
        &Spec {
            gtes: 513,
            ..base.clone()
        },
        "L2 table size too big",
    );
    refused(
        &Spec {
            grain_sectors: 0,
            ..base.clone()
        },
        "L1 entry size is invalid",
    );
    refused(
        &Spec {
            grain_sectors: 0x20_0001,
            ..base.clone()
        },
        "Invalid granularity",
    );
    refused(
        &Spec {
            capacity: u64::MAX,
            ..base.clone()
        },
        "L1 size too big",
    );
    refused(
        &Spec {
            gtes: 1,
            grain_sectors: 1,
            capacity: (32 << 20) + 1,
            ..base.clone()
        },
        "L1 size too big",
    );
    refused(
        &Spec {
            overhead: 1 << 30,
            ..base.clone()
        },
        "File truncated",
    );
    refused(
        &Spec {
            gd_offset: 1 << 40,
            ..base.clone()
        },
        "grain directory",
    );
    // Compressed grains bigger than the shared reader decompresses.
    refused(
        &Spec {
            grain_sectors: 8192,
            compression: 1,
            ..base
        },
        "compressed grains of 4194304 bytes",
    );
}

#[test]
fn tables_and_grains_outside_the_file_are_refused_with_their_offset() {
    let mut bytes = sparse_image(&Spec::default());
    put_u32s(&mut bytes, 3 * SECTOR, &[1 << 20]);
    match formats::open(file_of(&bytes)).unwrap_err() {
        Error::CorruptImage { offset, message } => {
            assert_eq!(offset, Some(3 * SECTOR), "{message}");
            assert!(message.contains("grain table"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let mut bytes = sparse_image(&Spec::default());
    put_u32s(&mut bytes, 2 * SECTOR + 12, &[1 << 20]);
    match formats::open(file_of(&bytes)).unwrap_err() {
        Error::CorruptImage { offset, message } => {
            assert_eq!(offset, Some(2 * SECTOR + 12), "{message}");
            assert!(message.contains("grain 3"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_grain_budget_is_checked_before_a_table_is_kept() {
    let bytes = sparse_image(&Spec::default());
    let file = file_of(&bytes);
    let spec = Spec::default();
    let header = Header::parse(&spec.sector(), 0).unwrap();
    let mut budget = u64::from(GTES) - 1;
    let error = SparseMap::read(
        &file,
        0,
        bytes.len() as u64,
        &header,
        1,
        SECTOR,
        &mut budget,
    )
    .unwrap_err();
    assert!(matches!(error, Error::UnsupportedImage { .. }), "{error:?}");
}

#[test]
fn a_lone_extent_without_an_embedded_descriptor_points_to_the_descriptor() {
    let mut bytes = sparse_image(&Spec::default());
    put(&mut bytes, SECTOR, &[0u8; 64]);
    let error = formats::open(file_of(&bytes)).unwrap_err();
    assert!(matches!(error, Error::UnsupportedImage { .. }), "{error:?}");
    assert!(error.to_string().contains("descriptor"), "{error}");
}

#[test]
fn truncated_and_tiny_sparse_files_are_corrupt_not_raw() {
    let bytes = sparse_image(&Spec::default());
    for len in [4usize, 100, 600, 3000] {
        let error = formats::open(file_of(&bytes[..len])).unwrap_err();
        assert!(
            matches!(error, Error::CorruptImage { .. }),
            "{len}: {error:?}"
        );
    }
}

#[test]
fn descriptors_are_parsed_as_qemu_parses_them() {
    let text = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\n\
                RW 4096 FLAT \"disk-f001.vmdk\" 0\r\n\
                RDONLY 100 FLAT \"ro.vmdk\" 0\n\
                RW 0 FLAT \"empty.vmdk\" 0\n\
                RW 10 ZERO\n\
                RW 2048 VMFS \"disk-vmfs.vmdk\"\n\
                RW 8 SPARSE \"a b.vmdk\"\n";
    let parsed = descriptor::parse(text).unwrap();
    assert_eq!(parsed.create_type, "twoGbMaxExtentFlat");
    assert_eq!(parsed.parent, None);
    assert_eq!(
        parsed.extents,
        vec![
            descriptor::ExtentLine {
                sectors: 4096,
                kind: ExtentType::Flat { offset: 0 },
                name: "disk-f001.vmdk".into()
            },
            descriptor::ExtentLine {
                sectors: 2048,
                kind: ExtentType::Flat { offset: 0 },
                name: "disk-vmfs.vmdk".into()
            },
            descriptor::ExtentLine {
                sectors: 8,
                kind: ExtentType::Sparse,
                name: "a b.vmdk".into()
            },
        ]
    );
    for bad in [
        "createType=\"monolithicFlat\"\nRW 10 FLAT \"x.vmdk\"\n",
        "createType=\"monolithicFlat\"\nRW 10 FLAT \"x.vmdk\" -1\n",
        "createType=\"monolithicFlat\"\nRW 10 SPARSE \"x.vmdk\" 5\n",
        "no create type here\n",
    ] {
        assert!(
            matches!(descriptor::parse(bad), Err(Error::CorruptImage { .. })),
            "{bad}"
        );
    }
    let child =
        descriptor::parse("createType=\"monolithicSparse\"\nparentFileNameHint=\"../base.vmdk\"\n")
            .unwrap();
    assert_eq!(child.parent.as_deref(), Some("../base.vmdk"));
    assert!(descriptor::parse("createType=\"x\"\nparentFileNameHint=\"open\n").is_err());
}

#[test]
fn content_ids_are_read_as_qemus_vmdk_read_cid_reads_them() {
    use descriptor::{cid, CidField::*};
    let text = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n";
    assert_eq!(cid(text, Own), Some(0x1234_5678));
    assert_eq!(cid(text, Parent), Some(0xffff_ffff));
    // The first `CID` is taken, even inside `parentCID`, as qemu's strstr takes it.
    assert_eq!(cid("parentCID=0000abcd\nCID=1\n", Own), Some(0xabcd));
    // sscanf("%x"): blanks, an optional 0x, digits up to the first other byte; strtoul's
    // saturation, then the low 32 bits.
    assert_eq!(cid("CID= 0x1F;", Own), Some(0x1f));
    assert_eq!(cid("CID=1ffffffff\n", Own), Some(0xffff_ffff));
    assert_eq!(cid("CID=123456789abcdef0123\n", Own), Some(0xffff_ffff));
    assert_eq!(cid("CID=zz\n", Own), None);
    assert_eq!(cid("CID=", Own), None);
    assert_eq!(cid("version=1\n", Own), None);
    assert_eq!(cid("CID=1\n", Parent), None);
    // Only the first 10 KiB less one byte are searched, as qemu's DESC_SIZE buffer.
    let far = format!("{}CID=1\n", "#".repeat(descriptor::CID_TEXT_BYTES - 4));
    assert_eq!(cid(&far, Own), None);
    let near = format!("{}CID=1\n", "#".repeat(descriptor::CID_TEXT_BYTES - 5));
    assert_eq!(cid(&near, Own), Some(1));
}

/// A delta link over [`sparse_image`] (whose CID is `fffffffe`): the same extent, embedding
/// `descriptor` at sector 1 in place of [`EMBEDDED`].
fn delta_link(descriptor: &str) -> Vec<u8> {
    let mut image = sparse_image(&Spec::default());
    put(&mut image, SECTOR, &[0; SECTOR as usize]);
    put(&mut image, SECTOR, descriptor.as_bytes());
    image
}

fn open_delta_link(descriptor: &str) -> Result<Box<dyn SourceImage>> {
    let files = SourceFiles::new(
        file_of(&delta_link(descriptor)),
        vec![Passed {
            file: file_of(&sparse_image(&Spec::default())),
            name: "base.vmdk".into(),
            referenced_by: 0,
        }],
    )?;
    formats::open_files(&files)
}

#[test]
fn a_delta_link_reads_only_over_the_parent_whose_cid_it_records() {
    let hint = "parentFileNameHint=\"base.vmdk\"\n";
    let image = open_delta_link(&format!("CID=1\nparentCID=fffffffe\n{hint}")).unwrap();
    assert_eq!(image.backing().map(|(name, _)| name), Some("base.vmdk"));
    assert_eq!(read_all(image.as_ref()), expected_sparse());

    match open_delta_link(&format!("CID=1\nparentCID=12345678\n{hint}")) {
        Err(Error::UnsupportedImage { message }) => {
            for words in [
                "CID was 12345678",
                "`base.vmdk` now has CID fffffffe",
                "changed after the child was made",
                "set the child's parentCID to fffffffe",
            ] {
                assert!(message.contains(words), "{words:?} in {message}");
            }
        }
        other => panic!("expected UnsupportedImage, got {other:?}"),
    }
    match open_delta_link(&format!("CID=1\n{hint}")) {
        Err(Error::CorruptImage { message, .. }) => {
            assert!(message.contains("no readable parentCID"), "{message}")
        }
        other => panic!("expected CorruptImage, got {other:?}"),
    }
}

fn descriptor_file(create_type: &str, extents: &str) -> File {
    file_of(
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
             createType=\"{create_type}\"\n{extents}"
        )
        .as_bytes(),
    )
}

#[test]
fn a_descriptor_reads_its_flat_and_sparse_extents_from_the_companions_passed() {
    let flat: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let extents =
        "RW 8 FLAT \"flat.bin\" 4\nRW 32 SPARSE \"sparse.vmdk\"\nRW 16 FLAT \"short.bin\" 0\n";
    let source = descriptor_file("twoGbMaxExtentSparse", extents);
    let files = SourceFiles::new(source, Vec::new()).unwrap();
    match formats::open_files(&files).unwrap_err() {
        Error::NeedFile {
            relation,
            candidates,
            referenced_by,
            ..
        } => {
            assert_eq!(relation, Relation::Extent);
            assert_eq!(candidates, ["flat.bin"]);
            assert_eq!(referenced_by, 0);
        }
        other => panic!("{other:?}"),
    }
    let passed = |bytes: &[u8], name: &str| Passed {
        file: file_of(bytes),
        name: name.into(),
        referenced_by: 0,
    };
    let files = SourceFiles::new(
        descriptor_file("twoGbMaxExtentSparse", extents),
        vec![
            passed(&flat, "flat.bin"),
            passed(&sparse_image(&Spec::default()), "sparse.vmdk"),
            passed(&[0x77; 1000], "short.bin"),
        ],
    )
    .unwrap();
    let image = formats::open_files(&files).unwrap();
    assert_eq!(image.virtual_size(), 4096 + 4 * GRAIN + 8192);
    let mut expected = flat[2048..2048 + 4096].to_vec();
    expected.extend(expected_sparse());
    // The short flat file: its 1000 bytes, then zeros as qemu reads past its end.
    expected.extend([0x77; 1000]);
    expected.extend(vec![0u8; 8192 - 1000]);
    assert_eq!(read_all(image.as_ref()), expected);
}

#[test]
fn esx_extents_and_unknown_create_types_are_refused_clearly() {
    for (create_type, extents, words) in [
        ("vmfsSparse", "RW 8 VMFSSPARSE \"x.vmdk\"\n", "ESX"),
        ("monolithicFlat", "RW 8 SESPARSE \"x.vmdk\"\n", "ESX"),
        ("streamOptimized", "RW 8 FLAT \"x\" 0\n", "createType"),
        ("monolithicFlat", "RW 8 ZERO\n", "no extent"),
    ] {
        let error = formats::open(descriptor_file(create_type, extents)).unwrap_err();
        assert!(error.to_string().contains(words), "{create_type}: {error}");
    }
    let mut cowd = vec![0u8; 2048];
    cowd[..4].copy_from_slice(b"COWD");
    let error = formats::open(file_of(&cowd)).unwrap_err();
    assert!(error.to_string().contains("COWD"), "{error}");
}

/// A ustar header for `name` of `size` bytes, checksum set.
fn tar_header(name: &str, size: u64, kind: u8) -> [u8; 512] {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..108].copy_from_slice(b"0000644\0");
    header[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    header[156] = kind;
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    header
}

fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = Vec::new();
    for (name, data) in members {
        tar.extend(tar_header(name, data.len() as u64, b'0'));
        tar.extend(*data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }
    tar.extend([0u8; 1024]);
    tar
}

#[test]
fn an_ova_disk_is_read_at_its_offset_in_the_tar() {
    let (disk, expected) = stream_image(3);
    let tar = tar_of(&[("a.ovf", b"<Envelope/>"), ("a-disk1.vmdk", &disk)]);
    let image = formats::open(file_of(&tar)).unwrap();
    assert_eq!(image.format(), SourceFormat::Vmdk);
    assert_eq!(read_all(image.as_ref()), expected);
    let sparse = sparse_image(&Spec::default());
    let tar = tar_of(&[("a.ovf", b"<Envelope/>"), ("DISK.VMDK", &sparse)]);
    let image = formats::open(file_of(&tar)).unwrap();
    assert_eq!(read_all(image.as_ref()), expected_sparse());
}

#[test]
fn hostile_tars_are_refused() {
    let sparse = sparse_image(&Spec::default());
    // A bad checksum.
    let mut tar = tar_of(&[("a.vmdk", &sparse)]);
    tar[10] ^= 1;
    let error = formats::open(file_of(&tar)).unwrap_err();
    assert!(error.to_string().contains("checksum"), "{error}");
    // A member longer than the file.
    let mut tar = tar_of(&[("a.vmdk", &sparse)]);
    tar.truncate(1024);
    let error = formats::open(file_of(&tar)).unwrap_err();
    assert!(error.to_string().contains("past the end"), "{error}");
    // A member that is not a sparse VMDK.
    let tar = tar_of(&[("a.vmdk", b"createType=\"monolithicFlat\"\n")]);
    let error = formats::open(file_of(&tar)).unwrap_err();
    assert!(error.to_string().contains("not a sparse"), "{error}");
    // Too many members.
    let names: Vec<String> = (0..=ova::MAX_MEMBERS).map(|i| format!("m{i}")).collect();
    let members: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
    let error = formats::open(file_of(&tar_of(&members))).unwrap_err();
    assert!(error.to_string().contains("more than 4096"), "{error}");
}

#[test]
fn gnu_long_names_and_pax_paths_name_the_members() {
    let long = format!("{}.vmdk", "d".repeat(150));
    let mut tar = Vec::new();
    tar.extend(tar_header("././@LongLink", long.len() as u64 + 1, b'L'));
    tar.extend(long.as_bytes());
    tar.push(0);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.extend(tar_header("short", 3, b'0'));
    tar.extend(b"abc");
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    let record = "path=pax/disk.vmdk\n";
    let record = format!("{} {record}", record.len() + 3);
    tar.extend(tar_header("PaxHeader", record.len() as u64, b'x'));
    tar.extend(record.as_bytes());
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.extend(tar_header("ignored", 2, b'0'));
    tar.extend(b"xy");
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.extend([0u8; 1024]);
    let file = file_of(&tar);
    let members = ova::members(&file, tar.len() as u64).unwrap();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, [long.as_str(), "pax/disk.vmdk"]);
    assert_eq!(members[0].size, 3);
    let mut got = [0u8; 3];
    file.read_exact_at(&mut got, members[0].offset).unwrap();
    assert_eq!(&got, b"abc");
}
