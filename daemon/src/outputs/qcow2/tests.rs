//! The writer, checked by the real qemu-img: the userspace engine's allocated copy places and
//! writes the payload, then the metadata is written; and the allocator on its own.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::{Command, Output};

use imgcrypt_proto::api::{LuksVersion, Pbkdf, PbkdfKind};
use tempfile::NamedTempFile;

use super::*;
use crate::engines::xts::IvMode;
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

pub(crate) fn luks1_header(volume_key: &SecretBytes) -> crate::luks::FormattedHeader {
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

/// Writes `output`'s payload from `source` through the shared pipeline (the userspace engine's
/// allocated copy, `workers` × `chunk` bytes), then its metadata.
pub(crate) fn write_through_engine(
    output: &Qcow2Output,
    source: &dyn crate::formats::SourceImage,
    volume_key: &SecretBytes,
    file: &File,
    workers: usize,
    chunk: usize,
) -> u64 {
    let engine = crate::engines::userspace::UserspaceEngine::with_config(workers, chunk).unwrap();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let written = crate::engines::Engine::write_allocated(
        &engine,
        &crate::engines::PayloadJob {
            job_id: 0,
            source,
            output: file,
            extents: &[],
            sector_size: 512,
            key: volume_key.as_bytes(),
            iv: IvMode::Plain64,
            progress: &|_| {},
            cancel: &cancel,
        },
        output,
    )
    .unwrap();
    output.write_metadata(file).unwrap();
    assert_eq!(file.metadata().unwrap().len(), output.output_size());
    written
}

/// An encrypted qcow2 of `source` made by this module; returns it and its volume key.
pub(crate) fn encrypt_to_qcow2(source: &NamedTempFile) -> (NamedTempFile, SecretBytes) {
    let size = source.as_file().metadata().unwrap().len();
    let opened = crate::formats::open(source.reopen().unwrap()).unwrap();
    let volume_key = SecretBytes::random(64).unwrap();
    let header = luks1_header(&volume_key);
    let plan = Qcow2Output::new(size, &header.image, header.data_offset).unwrap();
    let output = NamedTempFile::new_in("/tmp").unwrap();
    write_through_engine(
        &plan,
        opened.as_ref(),
        &volume_key,
        output.as_file(),
        3,
        1 << 20,
    );
    (output, volume_key)
}

pub(crate) fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

/// A 600 MiB + 3-sector sparse source with data in the first cluster, a run across an L2
/// table boundary (512 MiB), an unaligned scrap, and a last cluster that the disk's odd size
/// cuts short.
pub(crate) fn awkward_source() -> NamedTempFile {
    let size = 600 * MIB + 3 * 512;
    sparse_source(
        size,
        &[
            (0, 4096),
            (512 * MIB - 100_000, 300_000),
            (100 * MIB + 7, 10),
            (size - 1000, 1000),
        ],
    )
}

#[test]
fn qemu_img_accepts_checks_and_decrypts_our_output() {
    let source = awkward_source();
    let size = source.as_file().metadata().unwrap().len();
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

fn output_for(size: u64) -> Qcow2Output {
    let header = crate::sys::memfd::create("test-luks").unwrap();
    header.set_len(2 * MIB).unwrap();
    Qcow2Output::new(size, &header, 2 * MIB).unwrap()
}

/// Places `runs` in order on a scratch file; returns the extents.
fn place_all(output: &Qcow2Output, runs: &[Range<u64>], file: &File) -> Vec<Extent> {
    let mut placed = Vec::new();
    for run in runs {
        output.place(run.clone(), file, &mut placed).unwrap();
    }
    placed
}

#[test]
fn huge_disks_have_small_metadata() {
    let tib = 1u64 << 40;
    let scratch = tempfile::tempfile_in("/var/tmp").unwrap();
    let sparse = output_for(64 * tib);
    assert_eq!(sparse.l1_entries, 131_072);
    let placed = place_all(
        &sparse,
        &[0..MIB, 40 * tib..40 * tib + CLUSTER_BYTES],
        &scratch,
    );
    assert_eq!(placed.len(), 2);
    assert_eq!(sparse.allocated_bytes(), 17 * CLUSTER_BYTES);
    // The first L2 table was written when the copy moved past its 512 MiB, between the runs.
    assert_eq!(sparse.state().l2_tables, 1);
    assert_eq!(
        placed[1].output_offset,
        placed[0].output_offset + 17 * CLUSTER_BYTES
    );
    assert!(sparse.output_size() < 8 * MIB, "{}", sparse.output_size());

    // A whole 64 TiB disk: every cluster of the file has its refcount entry.
    let full = output_for(64 * tib);
    {
        let mut state = full.state();
        state.next_cluster = 1 + 32 + 64 * tib / CLUSTER_BYTES + 131_071;
        state.table = Some(131_071);
    }
    let tail = full.tail(&full.state());
    assert!(tail.refblocks * REFCOUNTS_PER_BLOCK >= tail.total_clusters);
    assert!(tail.reftable_clusters * REFTABLE_ENTRIES_PER_CLUSTER >= tail.refblocks);
    assert_eq!(
        tail.refblocks_offset,
        tail.l1_offset + tail.l1_clusters * CLUSTER_BYTES
    );
    assert_eq!(
        tail.total_clusters * CLUSTER_BYTES,
        tail.reftable_offset + tail.reftable_clusters * CLUSTER_BYTES
    );

    let error = Qcow2Output::new(
        64 * tib + 512,
        &crate::sys::memfd::create("x").unwrap(),
        2 * MIB,
    )
    .unwrap_err();
    assert!(error.to_string().contains("64 TiB"), "{error}");
}

#[test]
fn runs_are_placed_contiguously_in_guest_order_with_l2_tables_after_their_data() {
    let scratch = tempfile::tempfile_in("/var/tmp").unwrap();
    let size = 600 * MIB + 512;
    let output = output_for(size);
    let data_start = CLUSTER_BYTES + 2 * MIB;
    let placed = place_all(
        &output,
        &[
            0..3 * CLUSTER_BYTES,
            5 * MIB..5 * MIB + CLUSTER_BYTES,
            // Across the first L2 table's end: its table lands before the next cluster.
            512 * MIB - CLUSTER_BYTES..512 * MIB + CLUSTER_BYTES,
            600 * MIB..size.next_multiple_of(4096),
        ],
        &scratch,
    );
    let offsets: Vec<(u64, u64, u64)> = placed
        .iter()
        .map(|e| (e.guest_offset, e.length, e.output_offset))
        .collect();
    let c = CLUSTER_BYTES;
    assert_eq!(
        offsets,
        vec![
            // Runs that follow each other in the file join into one extent.
            (0, 3 * c, data_start),
            (5 * MIB, c, data_start + 3 * c),
            (512 * MIB - c, c, data_start + 4 * c),
            // Cluster data_start + 5c holds the first L2 table.
            (512 * MIB, c, data_start + 6 * c),
            // The last cluster is cut at the virtual size rounded up to 4 KiB.
            (600 * MIB, 4096, data_start + 7 * c),
        ]
    );
    for extent in &placed {
        assert_eq!(extent.first_iv, extent.output_offset / 512);
    }
    assert_eq!(output.state().l1[0], (data_start + 5 * c) | OFLAG_COPIED);
    // The last L2 table, the L1 table and the refcounts follow the last data cluster.
    let tail = output.tail(&output.state());
    assert_eq!(tail.last_l2_offset, Some(data_start + 8 * c));
    assert_eq!(tail.l1_offset, data_start + 9 * c);
    // Out of order or unaligned: refused.
    let mut more = Vec::new();
    assert!(output.place(0..c, &scratch, &mut more).is_err());
    assert!(output
        .place(601 * MIB + 512..602 * MIB, &scratch, &mut more)
        .is_err());
}

#[test]
fn the_copy_drops_zero_clusters_and_is_deterministic() {
    // Data, an allocated cluster of zeros (written as zeros: allocated in the source file),
    // data spread over many small ranges (a fragmented source), and an odd size.
    let size = 530 * MIB + 3 * 512;
    let mut data: Vec<(u64, u64)> = vec![(0, 4096), (512 * MIB - 100_000, 300_000)];
    data.extend((0..300).map(|index| (20 * MIB + index * 3 * CLUSTER_BYTES + 512, 1024)));
    data.push((size - 1000, 1000));
    let source = sparse_source(size, &data);
    source
        .as_file()
        .write_all_at(&vec![0u8; 2 * CLUSTER_BYTES as usize], 8 * MIB)
        .unwrap();
    let opened = crate::formats::open(source.reopen().unwrap()).unwrap();
    assert!(opened
        .allocated_ranges()
        .iter()
        .any(|range| range.contains(&(8 * MIB))));
    let volume_key = SecretBytes::random(64).unwrap();
    let header = luks1_header(&volume_key);
    let mut outputs = Vec::new();
    for (workers, chunk) in [(3, 256 << 10), (1, 4 << 20), (4, CLUSTER_BYTES as usize)] {
        let output = Qcow2Output::new(size, &header.image, header.data_offset).unwrap();
        let file = NamedTempFile::new_in("/tmp").unwrap();
        let written = write_through_engine(
            &output,
            opened.as_ref(),
            &volume_key,
            file.as_file(),
            workers,
            chunk,
        );
        // The clusters holding data: 1 + 6 (300 000 bytes across 512 MiB) + 300 + the last
        // (cut to 4 KiB); the zero clusters at 8 MiB are not stored.
        assert_eq!(output.allocated_bytes(), 308 * CLUSTER_BYTES);
        assert_eq!(written, 307 * CLUSTER_BYTES + 4096);
        outputs.push(std::fs::read(file.path()).unwrap());
        let key = temp_with(KEY_FILE);
        let object = secret_object(key.path());
        let opts = image_opts(file.path());
        let check = qemu_img(&["check", "--object", &object, "--image-opts", &opts]);
        assert!(check.status.success(), "qemu-img check: {check:?}");
        let compare = qemu_img(&[
            "compare",
            "--object",
            &object,
            "--image-opts",
            &opts,
            &format!("driver=raw,file.filename={}", source.path().display()),
        ]);
        assert!(compare.status.success(), "qemu-img compare: {compare:?}");
    }
    // Whatever the workers and chunks, the same file: placement follows guest order.
    assert!(outputs.windows(2).all(|pair| pair[0] == pair[1]));
}
