//! Reading encrypted qcow2 images: ours, and qemu-img's (with zero clusters).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use tempfile::NamedTempFile;

use super::test_images::{
    convert_to_qcow2, create, image_opts, overlay, qemu_raw_encrypted, read_all, run,
    secret_object, sparse_source, temp_with, text, MIB,
};
use super::*;
use crate::luks::cost::ROOT_CAPS;
use crate::luks::image::testing::candidate;
use crate::luks::unlock::Unlocking;
use crate::luks::LuksImage;
use crate::outputs::qcow2::tests::{encrypt_to_qcow2, KEY_FILE, WRONG_KEY_FILE};

/// Unlocks the image's LUKS header through the memfd copy, as the jobs do.
fn unlock(image: &Qcow2Image) -> SecretBytes {
    let copy = image.luks_header_copy().unwrap();
    let luks = LuksImage::read(&copy).unwrap();
    assert_eq!(luks.cipher(), "aes-xts-plain64");
    let (key, _) = luks
        .unlock(&[candidate("k", KEY_FILE)], &Unlocking::quiet(&ROOT_CAPS))
        .unwrap();
    key
}

fn open(path: &Path) -> Qcow2Image {
    Qcow2Image::open(std::fs::File::open(path).unwrap()).unwrap()
}

#[test]
fn our_output_reads_back_through_its_luks_header() {
    let size = 40 * MIB + 512;
    let source = sparse_source(size, &[(3 * MIB + 5, 70_000), (size - 512, 512)]);
    let (output, volume_key) = encrypt_to_qcow2(&source);
    let image = open(output.path());
    assert_eq!(image.virtual_size(), size);
    assert_eq!(image.allocated_bytes(), 3 * 65536);
    let key = unlock(&image);
    assert_eq!(key.as_bytes(), volume_key.as_bytes());
    let plain = image.into_source(Some(&key)).unwrap();
    assert_eq!(
        read_all(&plain, MIB as usize),
        std::fs::read(source.path()).unwrap()
    );
    assert_eq!(
        plain.allocated_ranges(),
        &[3 * MIB..3 * MIB + 2 * 65536, 40 * MIB..size]
    );
    // An unaligned read in the middle of a cluster.
    let mut scrap = [0u8; 77];
    plain.read_at(&mut scrap, 3 * MIB + 1001).unwrap();
    let mut expected = [0u8; 77];
    source
        .as_file()
        .read_exact_at(&mut expected, 3 * MIB + 1001)
        .unwrap();
    assert_eq!(scrap, expected);
}

#[test]
fn a_qemu_img_encrypted_qcow2_with_zero_clusters_reads_as_qemu_sees_it() {
    encrypted_with_zero_clusters("");
    // With subclusters (2 KiB of a 64 KiB cluster), zeroed ones too.
    encrypted_with_zero_clusters(",extended_l2=on");
}

fn encrypted_with_zero_clusters(extra: &str) {
    let size = 20 * MIB;
    let source = sparse_source(size, &[(0, MIB), (8 * MIB, 3 * MIB + 100)]);
    let key = temp_with(KEY_FILE);
    let object = secret_object(key.path());
    let image = NamedTempFile::new_in("/tmp").unwrap();
    create(
        image.path(),
        "20M",
        &[
            "--object",
            &object,
            "-o",
            &format!("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10{extra}"),
        ],
    );
    let opts = image_opts(image.path());
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &object,
            "--target-image-opts",
            &text(source.path()),
            &opts,
        ],
    );
    // Zero clusters over data (allocated clusters with the zero flag) and over a hole.
    run(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            "write -z 8M 128k",
            "-c",
            "write -z 16M 64k",
            // Inside a cluster: zero subclusters with extended L2, written zeros without.
            "-c",
            "write -z 9M 6k",
        ],
    );
    let mut expected = std::fs::read(source.path()).unwrap();
    expected[8 * MIB as usize..8 * MIB as usize + 128 * 1024].fill(0);
    expected[9 * MIB as usize..9 * MIB as usize + 6 * 1024].fill(0);

    let reference = NamedTempFile::new_in("/tmp").unwrap();
    qemu_raw_encrypted(&object, &opts, reference.path());
    assert_eq!(
        std::fs::read(reference.path()).unwrap(),
        expected,
        "qemu's own view"
    );

    let image = open(image.path());
    assert_eq!(image.virtual_size(), size);
    let key = unlock(&image);
    let plain = image.into_source(Some(&key)).unwrap();
    assert_eq!(read_all(&plain, MIB as usize), expected);
}

fn refusal(path: &Path) -> String {
    Qcow2Image::open(std::fs::File::open(path).unwrap())
        .unwrap_err()
        .to_string()
}

#[test]
fn a_plain_qcow2_reads_without_a_key_and_compressed_ones_too() {
    let source = sparse_source(4 * MIB, &[(MIB, 200_000)]);
    let plain = convert_to_qcow2(source.path(), &[]);
    let image = open(plain.path());
    assert!(image.luks_region().is_none());
    let view = image.into_source(None).unwrap();
    assert_eq!(
        read_all(&view, MIB as usize),
        std::fs::read(source.path()).unwrap()
    );

    let compressed = convert_to_qcow2(source.path(), &["-c"]);
    let view = open(compressed.path()).into_source(None).unwrap();
    assert_eq!(
        read_all(&view, MIB as usize),
        std::fs::read(source.path()).unwrap()
    );
}

#[test]
fn backing_files_and_bad_headers_are_refused_clearly() {
    let source = sparse_source(4 * MIB, &[(0, 4096)]);
    let base = convert_to_qcow2(source.path(), &[]);
    let overlay_image = NamedTempFile::new_in("/tmp").unwrap();
    overlay(overlay_image.path(), &text(base.path()), "qcow2", None);
    assert!(refusal(overlay_image.path()).contains("backing file"));

    let patched = |at: u64, bytes: &[u8]| {
        let copy = convert_to_qcow2(source.path(), &[]);
        copy.as_file().write_all_at(bytes, at).unwrap();
        refusal(copy.path())
    };
    assert!(patched(20, &22u32.to_be_bytes()).contains("cluster_bits is 22"));
    assert!(patched(72, &1u64.to_be_bytes()).contains("dirty"));
    assert!(patched(72, &(1u64 << 40).to_be_bytes()).contains("incompatible feature bits"));
    assert!(patched(32, &1u32.to_be_bytes()).contains("AES-CBC"));
    assert!(patched(32, &2u32.to_be_bytes()).contains("no crypto header extension"));
    assert!(patched(36, &0u32.to_be_bytes()).contains("L1 table has 0 entries"));
    assert!(patched(40, &12345u64.to_be_bytes()).contains("not cluster-aligned"));

    // An encrypted image whose LUKS region covers its L1 table.
    let (ours, _) = encrypt_to_qcow2(&source);
    let luks_offset = open(ours.path()).luks_region().unwrap().0;
    ours.as_file()
        .write_all_at(&luks_offset.to_be_bytes(), 40)
        .unwrap();
    assert!(refusal(ours.path()).contains("overlaps the L1 or refcount table"));
}

/// Whether qemu-img opens `image` with the key file holding `key` (and finds it consistent).
fn qemu_opens(image: &Path, key: &[u8]) -> bool {
    let file = temp_with(key);
    let output = Command::new("qemu-img")
        .args([
            "check",
            "--object",
            &secret_object(file.path()),
            "--image-opts",
            &image_opts(image),
        ])
        .output()
        .unwrap();
    output.status.success()
}

#[test]
fn keyslots_edited_on_the_copy_and_written_back_are_what_qemu_opens() {
    use crate::luks::Change;
    use imgcrypt_proto::api::{Pbkdf, PbkdfKind};

    let source = sparse_source(8 * MIB, &[(0, 4096), (5 * MIB, 100_000)]);
    let (output, volume_key) = encrypt_to_qcow2(&source);
    let before = std::fs::read(output.path()).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(output.path())
        .unwrap();
    let image = Qcow2Image::open(file.try_clone().unwrap()).unwrap();
    let (offset, length) = image.luks_region().unwrap();
    let copy = image.luks_header_copy().unwrap();
    let mut original = vec![0u8; length as usize];
    copy.read_exact_at(&mut original, 0).unwrap();

    let mut luks = LuksImage::read(&copy).unwrap();
    let pbkdf = Pbkdf {
        kind: Some(PbkdfKind::Pbkdf2),
        iterations: Some(1000),
        ..Pbkdf::default()
    };
    let added = luks
        .add_keyslot(&volume_key, &candidate("new", WRONG_KEY_FILE), &pbkdf)
        .unwrap();
    luks.commit(&copy, Change::Added).unwrap();
    write_back_luks_header(&file, offset, &original, &copy, true).unwrap();
    assert!(qemu_opens(output.path(), KEY_FILE));
    assert!(qemu_opens(output.path(), WRONG_KEY_FILE));

    copy.read_exact_at(&mut original, 0).unwrap();
    let old = luks
        .keyslots()
        .iter()
        .map(|slot| slot.keyslot)
        .find(|&slot| slot != added)
        .unwrap();
    luks.remove_keyslot(old).unwrap();
    luks.commit(&copy, Change::Removed).unwrap();
    write_back_luks_header(&file, offset, &original, &copy, false).unwrap();
    assert!(!qemu_opens(output.path(), KEY_FILE));
    assert!(qemu_opens(output.path(), WRONG_KEY_FILE));

    // Only the LUKS header's clusters changed.
    let after = std::fs::read(output.path()).unwrap();
    assert_eq!(before.len(), after.len());
    assert_eq!(before[..offset as usize], after[..offset as usize]);
    let end = (offset + length) as usize;
    assert_eq!(before[end..], after[end..]);
}

#[test]
fn damaged_metadata_is_refused_or_read_never_a_panic() {
    let source = sparse_source(9 * MIB, &[(0, 70_000), (6 * MIB, 4096)]);
    let (output, _) = encrypt_to_qcow2(&source);
    let pristine = std::fs::read(output.path()).unwrap();
    let image = open(output.path());
    let l1 = image.header().l1_table_offset;
    let l2 = {
        let mut entry = [0u8; 8];
        output.as_file().read_exact_at(&mut entry, l1).unwrap();
        u64::from_be_bytes(entry) & 0x00ff_ffff_ffff_fe00
    };
    // Every byte of the header's first 256, of the L1 entry and of the first L2 entries, set
    // to values a fuzzer would try.
    let places = (0..256u64).chain(l1..l1 + 8).chain(l2..l2 + 32);
    let mut refused = 0;
    for at in places {
        for value in [0x00u8, 0xff, 0x80, 0x01] {
            if pristine[at as usize] == value {
                continue;
            }
            output.as_file().write_all_at(&[value], at).unwrap();
            match Qcow2Image::open(std::fs::File::open(output.path()).unwrap()) {
                Ok(image) => {
                    if let Ok(view) = image.into_source(Some(&SecretBytes::random(64).unwrap())) {
                        let mut buffer = vec![0u8; 65536];
                        let _ = view.read_at(&mut buffer, 0);
                    }
                }
                Err(_) => refused += 1,
            }
            output
                .as_file()
                .write_all_at(&pristine[at as usize..at as usize + 1], at)
                .unwrap();
        }
    }
    assert!(refused > 100, "only {refused} damaged images were refused");
}

/// A hand-made unencrypted qcow2 v3 of `file_size` bytes (sparse): 2^`cluster_bits`-byte
/// clusters, the refcount table (one empty cluster) at cluster 1, and an L1 table of `l1_size`
/// entries at cluster 2 whose entry `i` is `l1_entry(i)`.
fn crafted_qcow2(
    cluster_bits: u32,
    virtual_size: u64,
    l1_size: u32,
    l1_entry: impl Fn(u64) -> u64,
    file_size: u64,
) -> NamedTempFile {
    let cluster = 1u64 << cluster_bits;
    let file = NamedTempFile::new_in("/tmp").unwrap();
    let mut header = vec![0u8; 112];
    header[..4].copy_from_slice(MAGIC);
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    header[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    header[24..32].copy_from_slice(&virtual_size.to_be_bytes());
    header[36..40].copy_from_slice(&l1_size.to_be_bytes());
    header[40..48].copy_from_slice(&(2 * cluster).to_be_bytes());
    header[48..56].copy_from_slice(&cluster.to_be_bytes());
    header[56..60].copy_from_slice(&1u32.to_be_bytes());
    header[96..100].copy_from_slice(&4u32.to_be_bytes());
    header[100..104].copy_from_slice(&104u32.to_be_bytes());
    file.as_file().set_len(file_size).unwrap();
    file.as_file().write_all_at(&header, 0).unwrap();
    let l1: Vec<u8> = (0..u64::from(l1_size))
        .flat_map(|index| (l1_entry(index) | OFLAG_COPIED).to_be_bytes())
        .collect();
    file.as_file().write_all_at(&l1, 2 * cluster).unwrap();
    file
}

/// Opens `image` in a thread and gives it `limit` to answer: the walk must not take the
/// header's word for how long it may run.
fn open_within(image: &NamedTempFile, limit: std::time::Duration) -> Result<Qcow2Image> {
    let file = image.reopen().unwrap();
    let (done, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(Qcow2Image::open(file));
    });
    answer
        .recv_timeout(limit)
        .expect("the qcow2 walk was still running: its time is the header's to choose")
}

#[test]
fn l1_entries_sharing_one_l2_table_cannot_stall_the_walk() {
    // 2 MiB clusters, the largest disk 2^22 L1 entries map (2^61 bytes), every L1 entry naming
    // the same L2 table, whose 2^18 entries all have the zero flag (each must be looked at):
    // 2^40 entries to examine from a 42 MiB file.
    let cluster = 2 * MIB;
    let l2_at = 20 * cluster;
    let image = crafted_qcow2(21, 1 << 61, 1 << 22, |_| l2_at, l2_at + cluster);
    let zero_flags: Vec<u8> = (0..cluster / 8)
        .flat_map(|_| OFLAG_ZERO.to_be_bytes())
        .collect();
    image.as_file().write_all_at(&zero_flags, l2_at).unwrap();
    let message = open_within(&image, std::time::Duration::from_secs(30))
        .unwrap_err()
        .to_string();
    assert!(message.contains("same L2 table"), "{message}");
}

#[test]
fn l2_tables_in_the_holes_of_a_huge_sparse_file_cannot_stall_the_walk() {
    // As above, but each L1 entry has its own L2 table, all in the holes of an 8 TiB sparse
    // file: they read as zeros and cost nothing on disk. The walk stops at 2^30 entries.
    let cluster = 2 * MIB;
    let first_l2 = 20 * cluster;
    let image = crafted_qcow2(
        21,
        1 << 61,
        1 << 22,
        |index| first_l2 + index * cluster,
        first_l2 + (1 << 22) * cluster,
    );
    let message = open_within(&image, std::time::Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(message.contains("L2 tables map more than"), "{message}");
}

#[test]
fn tables_data_and_refcount_blocks_in_the_luks_region_are_refused() {
    let source = sparse_source(9 * MIB, &[(0, 70_000), (6 * MIB, 4096)]);
    let (pristine, _) = encrypt_to_qcow2(&source);
    let image = open(pristine.path());
    let (luks_at, _) = image.luks_region().unwrap();
    let l1 = image.header().l1_table_offset;
    let reftable = image.header().refcount_table_offset;
    let entry_at = |file: &NamedTempFile, at: u64| {
        let mut entry = [0u8; 8];
        file.as_file().read_exact_at(&mut entry, at).unwrap();
        u64::from_be_bytes(entry)
    };
    let l2 = entry_at(&pristine, l1) & 0x00ff_ffff_ffff_fe00;
    let bytes = std::fs::read(pristine.path()).unwrap();
    let patched = |at: u64, value: u64| {
        let copy = NamedTempFile::new_in("/tmp").unwrap();
        copy.as_file().write_all_at(&bytes, 0).unwrap();
        let flags = entry_at(&copy, at) & OFLAG_COPIED;
        copy.as_file()
            .write_all_at(&(value | flags).to_be_bytes(), at)
            .unwrap();
        refusal(copy.path())
    };
    let message = patched(l1, luks_at);
    assert!(
        message.contains("the L2 table of L1 entry 0 at"),
        "{message}"
    );
    assert!(message.contains("LUKS header region"), "{message}");
    let message = patched(l2, luks_at + 65536);
    assert!(
        message.contains("data cluster of guest offset 0"),
        "{message}"
    );
    assert!(message.contains("LUKS header region"), "{message}");
    let message = patched(reftable, luks_at);
    assert!(message.contains("refcount block 0"), "{message}");
    assert!(message.contains("LUKS header region"), "{message}");

    // A refcount table beyond qemu's 8 MiB is refused before anything is read of it.
    let copy = NamedTempFile::new_in("/tmp").unwrap();
    copy.as_file().write_all_at(&bytes, 0).unwrap();
    copy.as_file()
        .write_all_at(&200u32.to_be_bytes(), 56)
        .unwrap();
    let message = refusal(copy.path());
    assert!(message.contains("more than qemu's limit"), "{message}");
}

#[test]
fn a_keyslot_written_past_the_luks_region_is_not_written_back() {
    let source = sparse_source(4 * MIB, &[(0, 4096)]);
    let (image, _) = encrypt_to_qcow2(&source);
    let before = std::fs::read(image.path()).unwrap();
    let (offset, length) = open(image.path()).luks_region().unwrap();
    let original = &before[offset as usize..(offset + length) as usize];
    // The copy as libcryptsetup would leave it after writing a keyslot where a crafted header
    // put one: changed inside the region and grown past it.
    let copy = crate::sys::memfd::create("test-edited").unwrap();
    let mut edited = original.to_vec();
    edited[4096] ^= 0xff;
    edited.extend_from_slice(&[0x5a; 4096]);
    copy.write_all_at(&edited, 0).unwrap();
    let error = write_back_luks_header(image.as_file(), offset, original, &copy, true)
        .unwrap_err()
        .to_string();
    assert!(error.contains("outside the region"), "{error}");
    assert!(
        std::fs::read(image.path()).unwrap() == before,
        "the image changed"
    );
}
