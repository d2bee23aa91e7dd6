//! The writer, checked by the real qemu-img: plan, encrypt the extents here, write the metadata.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::{Command, Output};

use imgcrypt_proto::api::{LuksVersion, Pbkdf, PbkdfKind};
use tempfile::NamedTempFile;

use super::*;
use crate::engines::xts::{IvMode, XtsCipher};
use crate::formats::qcow2::test_images::{
    image_opts, qemu_raw_encrypted, secret_object, sparse_source, temp_with, MIB,
};
use crate::keys::SecretBytes;
use crate::luks::{format_header, HeaderSpec};

/// A key file's bytes: 44 characters of base64, as imgcrypt's key files hold.
pub(crate) const KEY_FILE: &[u8] = b"c2VjcmV0IGtleSBmb3IgcWNvdzIgdGVzdHMgb25seSE=";
pub(crate) const WRONG_KEY_FILE: &[u8] = b"d3Jvbmcga2V5IGZvciBxY293MiB0ZXN0cyBvbmx5ISE=";

fn secret(bytes: &[u8]) -> SecretBytes {
    let mut secret = SecretBytes::zeroed(bytes.len()).unwrap();
    secret.as_mut_bytes().copy_from_slice(bytes);
    secret
}

fn luks1_header(volume_key: &SecretBytes) -> crate::luks::FormattedHeader {
    let spec = HeaderSpec {
        version: LuksVersion::Luks1,
        sector_size: 512,
        pbkdf: Pbkdf {
            kind: Some(PbkdfKind::Pbkdf2),
            iterations: Some(1000),
            ..Pbkdf::default()
        },
    };
    let fingerprint = imgcrypt_proto::keyfile::fingerprint(KEY_FILE);
    format_header(&spec, volume_key, &secret(KEY_FILE), &fingerprint).unwrap()
}

/// Writes `plan`'s payload from `source` (plaintext; past its end zeros) the way the pipeline
/// does: each extent encrypted with IVs from `first_iv`.
fn write_payload(plan: &Qcow2Output, source: &File, volume_key: &SecretBytes, output: &File) {
    let cipher = XtsCipher::new(volume_key.as_bytes(), IvMode::Plain64).unwrap();
    let source_size = source.metadata().unwrap().len();
    for extent in plan.extents() {
        let mut done = 0;
        while done < extent.length {
            let n = (extent.length - done).min(MIB) as usize;
            let mut chunk = vec![0u8; n];
            let guest = extent.guest_offset + done;
            if guest < source_size {
                let have = (source_size - guest).min(n as u64) as usize;
                source.read_exact_at(&mut chunk[..have], guest).unwrap();
            }
            cipher
                .encrypt_sectors(&mut chunk, 512, extent.first_iv + done / 512)
                .unwrap();
            output
                .write_all_at(&chunk, extent.output_offset + done)
                .unwrap();
            done += n as u64;
        }
    }
}

/// An encrypted qcow2 of `source` made by this module; returns it and its volume key.
pub(crate) fn encrypt_to_qcow2(source: &NamedTempFile) -> (NamedTempFile, SecretBytes) {
    let file = source.as_file();
    let size = file.metadata().unwrap().len();
    let opened = crate::formats::open(source.reopen().unwrap()).unwrap();
    let ranges = opened.allocated_ranges().to_vec();
    let volume_key = SecretBytes::random(64).unwrap();
    let header = luks1_header(&volume_key);
    let plan = Qcow2Output::plan(size, &ranges, &header.image, header.data_offset).unwrap();
    let output = NamedTempFile::new_in("/tmp").unwrap();
    output.as_file().set_len(plan.output_size()).unwrap();
    write_payload(&plan, file, &volume_key, output.as_file());
    plan.write_metadata(output.as_file()).unwrap();
    (output, volume_key)
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

#[test]
fn qemu_img_accepts_checks_and_decrypts_our_output() {
    // Data in the first cluster, a run across an L2 table boundary (512 MiB), an unaligned
    // scrap, and a last cluster that the disk's odd size cuts short.
    let size = 600 * MIB + 3 * 512;
    let source = sparse_source(
        size,
        &[
            (0, 4096),
            (512 * MIB - 100_000, 300_000),
            (100 * MIB + 7, 10),
            (size - 1000, 1000),
        ],
    );
    let (output, _) = encrypt_to_qcow2(&source);
    let key = temp_with(KEY_FILE);
    let object = secret_object(key.path());
    let opts = image_opts(output.path());

    let check = qemu_img(&["check", "--object", &object, "--image-opts", &opts]);
    assert!(check.status.success(), "qemu-img check: {check:?}");
    let check_text = String::from_utf8_lossy(&check.stdout);
    assert!(check_text.contains("No errors were found"), "{check_text}");
    assert!(!check_text.contains("leaked"), "{check_text}");

    let info = qemu_img(&["info", "--output=json", &output.path().to_string_lossy()]);
    assert!(info.status.success(), "qemu-img info: {info:?}");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], size);
    assert_eq!(info["encrypted"], true);
    assert_eq!(info["cluster-size"], 65536);
    let encrypt = &info["format-specific"]["data"]["encrypt"];
    assert_eq!(encrypt["format"], "luks", "{info}");
    assert_eq!(encrypt["cipher-alg"], "aes-256");
    assert_eq!(encrypt["cipher-mode"], "xts");
    assert_eq!(encrypt["ivgen-alg"], "plain64");

    let compare = qemu_img(&[
        "compare",
        "--object",
        &object,
        "--image-opts",
        &opts,
        &format!("driver=raw,file.filename={}", source.path().display()),
    ]);
    assert!(compare.status.success(), "qemu-img compare: {compare:?}");
    assert!(String::from_utf8_lossy(&compare.stdout).contains("Images are identical"));

    let plain = NamedTempFile::new_in("/tmp").unwrap();
    qemu_raw_encrypted(&object, &opts, plain.path());
    assert_eq!(
        std::fs::read(plain.path()).unwrap(),
        std::fs::read(source.path()).unwrap()
    );

    // Sparse: a few clusters of data and 2 MiB of LUKS header, not 600 MiB.
    let blocks = output.as_file().metadata().unwrap().blocks() * 512;
    assert!(blocks < 4 * MIB, "the output holds {blocks} bytes");
}

#[test]
fn qemu_img_refuses_a_wrong_key() {
    let source = sparse_source(8 * MIB, &[(MIB, 4096)]);
    let (output, _) = encrypt_to_qcow2(&source);
    let wrong = temp_with(WRONG_KEY_FILE);
    let compare = qemu_img(&[
        "compare",
        "--object",
        &secret_object(wrong.path()),
        "--image-opts",
        &image_opts(output.path()),
        &format!("driver=raw,file.filename={}", source.path().display()),
    ]);
    assert!(!compare.status.success(), "{compare:?}");
    let stderr = String::from_utf8_lossy(&compare.stderr);
    assert!(stderr.contains("Invalid password"), "{stderr}");
}

#[test]
fn an_empty_source_makes_a_valid_image() {
    let source = sparse_source(10 * MIB, &[]);
    let (output, _) = encrypt_to_qcow2(&source);
    let key = temp_with(KEY_FILE);
    let check = qemu_img(&[
        "check",
        "--object",
        &secret_object(key.path()),
        "--image-opts",
        &image_opts(output.path()),
    ]);
    assert!(check.status.success(), "{check:?}");
}

fn plan_for(size: u64, allocated: &[Range<u64>]) -> Qcow2Output {
    let header = crate::sys::memfd::create("test-luks").unwrap();
    header.set_len(2 * MIB).unwrap();
    Qcow2Output::plan(size, allocated, &header, 2 * MIB).unwrap()
}

#[test]
fn huge_disks_plan_small_metadata() {
    let tib = 1u64 << 40;
    let sparse = plan_for(64 * tib, &[0..MIB, 40 * tib..40 * tib + 5]);
    assert_eq!(sparse.layout.l1_entries, 131_072);
    assert_eq!(sparse.layout.l2_tables, 2);
    assert_eq!(sparse.extents().len(), 2);
    assert_eq!(sparse.allocated_bytes(), 17 * CLUSTER_BYTES);
    assert!(sparse.output_size() < 8 * MIB, "{}", sparse.output_size());

    let whole = 0..64 * tib;
    let full = plan_for(64 * tib, std::slice::from_ref(&whole));
    assert_eq!(full.extents().len(), 1);
    assert_eq!(full.layout.l2_tables, 131_072);
    assert_eq!(full.layout.data_clusters, 64 * tib / CLUSTER_BYTES);
    // Every cluster of the file has its refcount entry.
    assert!(full.layout.refblocks * REFCOUNTS_PER_BLOCK >= full.layout.total_clusters);
    assert!(full.layout.reftable_clusters * REFTABLE_ENTRIES_PER_CLUSTER >= full.layout.refblocks);
    let extent = full.extents()[0];
    assert_eq!(extent.output_offset, full.layout.data_offset);
    assert_eq!(extent.first_iv, extent.output_offset / 512);

    let error = Qcow2Output::plan(
        64 * tib + 512,
        &[],
        &crate::sys::memfd::create("x").unwrap(),
        2 * MIB,
    )
    .unwrap_err();
    assert!(error.to_string().contains("64 TiB"), "{error}");
}

#[test]
fn extents_are_cluster_runs_contiguous_in_the_file() {
    let plan = plan_for(
        10 * MIB + 512,
        &[
            100..200,
            70_000..140_000,
            5 * MIB..5 * MIB + 1,
            10 * MIB..10 * MIB + 512,
        ],
    );
    let extents = plan.extents();
    // 0..64K and 64K..192K touch after rounding: one run of three clusters.
    assert_eq!(extents[0].guest_offset, 0);
    assert_eq!(extents[0].length, 3 * CLUSTER_BYTES);
    assert_eq!(extents[1].guest_offset, 5 * MIB);
    assert_eq!(
        extents[1].output_offset,
        extents[0].output_offset + 3 * CLUSTER_BYTES
    );
    // The last cluster is cut at the virtual size rounded up to 4 KiB.
    assert_eq!(extents[2].guest_offset, 10 * MIB);
    assert_eq!(extents[2].length, 4096);
    for extent in extents {
        assert_eq!(extent.output_offset % 4096, 0);
        assert_eq!(extent.first_iv, extent.output_offset / 512);
    }
    assert_eq!(plan.output_size(), extents[2].output_offset + CLUSTER_BYTES);
}

#[test]
fn a_source_fragmented_into_millions_of_ranges_plans_a_bounded_image() {
    // 4 KiB of data every 16 MiB of a 64 TiB disk: 2^22 ranges, as a hostile sparse source
    // could report them. One extent per range would be 2^22 extents (192 MiB with the runs).
    let tib = 1u64 << 40;
    let step = 16 * MIB;
    let ranges: Vec<Range<u64>> = (0..64 * tib / step)
        .map(|index| index * step + 8192..index * step + 12288)
        .collect();
    let plan = plan_for(64 * tib, &ranges);
    assert!(
        plan.extents().len() <= 1 << 20,
        "{} extents",
        plan.extents().len()
    );
    crate::outputs::check_extents(plan.extents(), 512, plan.output_size()).unwrap();
    // Every byte of data is still in some extent, in guest order.
    let mut extents = plan.extents().iter().peekable();
    for range in &ranges {
        while extents.peek().is_some_and(|e| e.guest_end() <= range.start) {
            extents.next();
        }
        let extent = extents.peek().expect("a range past the last extent");
        assert!(
            extent.guest_offset <= range.start && range.end <= extent.guest_end(),
            "{range:?} not in {extent:?}"
        );
    }
}
