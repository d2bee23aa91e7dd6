//! Never encrypt what was not understood, and never let an image size the daemon's memory:
//! images made by other tools, and crafted ones, through the real imgcryptd and imgctl, run as
//! the unprivileged attacker user.
//!
//! - every image of the shared qemu sample corpus is either refused naming its format (and
//!   nothing is left behind) or, for the formats imgcrypt reads, encrypted to a plaintext equal
//!   to `qemu-img convert -O raw`'s;
//! - so is an image in every format the installed qemu-img writes, empty and with data, LUKS
//!   images made by cryptsetup, and compressed or archived disks;
//! - a dynamic VHD whose table claims 2^28 entries, or 16 GiB, in a sparse file leaves the
//!   daemon's peak memory (`VmHWM`) where it was (issue 8, finding 4);
//! - `verify --source` with a source longer than the image says where the bytes differ.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

/// The shared corpus, beside the repository (`../shared/corpus/qemu-sample-images`).
fn corpus_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/qemu-sample-images");
    assert!(
        dir.is_dir(),
        "the shared image corpus is missing: expected the qemu sample images (*.bz2) in {}; \
         check out the shared corpus beside the repository",
        dir.display()
    );
    dir
}

/// What every test here starts from: a daemon the test users can reach, the attacker, a
/// directory the attacker owns and the attacker's key file in it.
struct Bench {
    attacker: TestUser,
    daemon: Daemon,
    work: PathBuf,
    key: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Bench {
    fn new() -> Self {
        let (_, attacker) = two_users();
        let scratch = scratch();
        let daemon = Daemon::start(scratch.path(), &["--socket-mode", "0666"]);
        let work = shared_dir(scratch.path(), "work");
        attacker.own(&[&work]);
        let key = work.join("user.key");
        write_key(&key);
        attacker.own(&[&key]);
        Self {
            attacker,
            daemon,
            work,
            key,
            _scratch: scratch,
        }
    }

    /// `imgctl encrypt SOURCE -o OUT` as the attacker with the attacker's key.
    fn encrypt(&self, source: &Path, out: &Path) -> Attempt {
        encrypt_as(&self.attacker, &self.daemon, source, out, &self.key, &[])
    }

    /// [`Bench::encrypt`] of a file handed to the attacker, which must succeed.
    fn encrypt_ok(&self, source: &Path, out: &Path) -> Attempt {
        hand_over(&self.attacker, source);
        let attempt = self.encrypt(source, out);
        assert!(
            attempt.output.status.success(),
            "{}: {}",
            source.display(),
            describe(&attempt.output)
        );
        attempt
    }

    fn refused(&self, source: &Path, format: &str) {
        assert_refused(&self.attacker, &self.daemon, source, &self.key, format);
    }

    /// Decrypts `out` independently, compares it with qemu's reading of `source` as
    /// `qemu_format`, and removes the files made on the way.
    fn assert_plaintext_like_qemu(&self, out: &Path, qemu_format: &str, source: &Path) {
        let name = out.file_name().unwrap().to_string_lossy();
        let expected = self.work.join(format!("{name}.qemu.raw"));
        qemu_plaintext_as(qemu_format, source, &expected);
        let plaintext = independent_decrypt(out, &self.key, &self.work);
        assert_plaintext_matches(&plaintext, &expected);
        for file in [out, &expected, &plaintext] {
            fs::remove_file(file).unwrap();
        }
    }

    /// The error message of an encrypt of `source` that must fail.
    fn error_message(&self, source: &Path) -> String {
        let attempt = self.encrypt(source, &self.work.join("x.luks"));
        let error = attempt
            .event("error")
            .unwrap_or_else(|| panic!("{}", describe(&attempt.output)));
        error["message"].as_str().unwrap().to_string()
    }
}

/// What one `imgctl encrypt --json` run by a user said.
/// What one `imgctl encrypt --json` run by a user said.
struct Attempt {
    output: Output,
    events: Vec<Value>,
}

impl Attempt {
    fn event(&self, kind: &str) -> Option<&Value> {
        self.events.iter().find(|event| event["event"] == kind)
    }
}

/// `imgctl encrypt SOURCE -o OUT --key-file KEY --json` as `user`.
fn encrypt_as(
    user: &TestUser,
    daemon: &Daemon,
    source: &Path,
    out: &Path,
    key: &Path,
    extra: &[&str],
) -> Attempt {
    let output = run(user
        .imgctl(daemon)
        .arg("encrypt")
        .arg(source)
        .arg("-o")
        .arg(out)
        .arg("--key-file")
        .arg(key)
        .args(CHEAP_PBKDF)
        .args(extra)
        .arg("--json"));
    let events = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    Attempt { output, events }
}

fn entries(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Gives `path` to `user` so the daemon accepts it as theirs, and makes it readable.
fn hand_over(user: &TestUser, path: &Path) {
    user.own(&[path]);
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
}

/// Runs an encrypt of `source` as `user` that must be refused with `UnsupportedImage` whose
/// message says what the file is and names `format` (matched case-insensitively), writing
/// nothing: no OUT, no OUT.partial, no other file.
#[track_caller]
fn assert_refused(user: &TestUser, daemon: &Daemon, source: &Path, key: &Path, format: &str) {
    let work = source.parent().unwrap();
    hand_over(user, source);
    let out = work.join("refused.luks");
    let before = entries(work);
    let attempt = encrypt_as(user, daemon, source, &out, key, &[]);
    let name = source.file_name().unwrap().to_string_lossy();
    assert!(
        !attempt.output.status.success(),
        "{name} ({format}) was encrypted instead of refused:\n{}",
        describe(&attempt.output)
    );
    assert!(
        attempt.event("summary").is_none(),
        "{name}: a summary came back: {:?}",
        attempt.events
    );
    let error = attempt
        .event("error")
        .unwrap_or_else(|| panic!("{name}: no error event:\n{}", describe(&attempt.output)));
    assert_eq!(
        error["error"], "io.imgcrypt.UnsupportedImage",
        "{name}: {error}"
    );
    let message = error["message"].as_str().unwrap().to_lowercase();
    assert!(
        message.contains(&format.to_lowercase()),
        "{name}: the refusal does not name {format}: {message}"
    );
    assert!(
        message.starts_with("this is "),
        "{name}: the refusal does not say what the file is: {message}"
    );
    assert_eq!(
        entries(work),
        before,
        "{name}: the refused encrypt left something behind"
    );
}

impl Bench {
    /// Encrypts `source` (read by qemu as `qemu_format`), which must succeed with
    /// `summary_format` and a plaintext equal to qemu's.
    #[track_caller]
    fn assert_encrypts(&self, source: &Path, qemu_format: &str, summary_format: &str) {
        let name = source.file_name().unwrap().to_string_lossy().into_owned();
        let out = self.work.join(format!("{name}.luks"));
        let attempt = self.encrypt_ok(source, &out);
        let summary = &attempt.event("summary").expect("summary")["summary"];
        assert_eq!(
            summary["source_format"], summary_format,
            "{name}: {summary}"
        );
        self.assert_plaintext_like_qemu(&out, qemu_format, source);
    }

    /// Encrypts `source` to the sparse qcow2 output (for disks whose virtual size would make a
    /// LUKS image too large to write here), which must succeed with `summary_format`, and
    /// qemu-img must find it identical to `reference` read as `reference_format`.
    #[track_caller]
    fn assert_encrypts_sparse(
        &self,
        source: &Path,
        summary_format: &str,
        reference: &Path,
        reference_format: &str,
    ) {
        hand_over(&self.attacker, source);
        let name = source.file_name().unwrap().to_string_lossy().into_owned();
        let out = self.work.join(format!("{name}.qcow2"));
        let attempt = encrypt_as(
            &self.attacker,
            &self.daemon,
            source,
            &out,
            &self.key,
            &["--format", "qcow2"],
        );
        assert!(
            attempt.output.status.success(),
            "{name}: {}",
            describe(&attempt.output)
        );
        let summary = &attempt.event("summary").expect("summary")["summary"];
        assert_eq!(
            summary["source_format"], summary_format,
            "{name}: {summary}"
        );
        assert_qemu_check_and_compare(&out, &self.key, reference, reference_format);
        fs::remove_file(&out).unwrap();
    }

    /// For a VHD too large to encrypt here: the daemon must get as far as sizing the output,
    /// which it does only after reading the source as a VHD, and size it from qemu's virtual
    /// size.
    #[track_caller]
    fn assert_read_but_too_large(&self, source: &Path) {
        hand_over(&self.attacker, source);
        let name = source.file_name().unwrap().to_string_lossy().into_owned();
        let before = entries(&self.work);
        let attempt = self.encrypt(source, &self.work.join(format!("{name}.luks")));
        let error = attempt
            .event("error")
            .unwrap_or_else(|| panic!("{name}: {}", describe(&attempt.output)));
        assert_eq!(error["error"], "io.imgcrypt.NoSpace", "{name}: {error}");
        let message = error["message"].as_str().unwrap();
        let required: u64 = message
            .split_once("needs ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .and_then(|number| number.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no size in {message}"));
        let payload = qemu_virtual_size(source).next_multiple_of(1 << 20);
        let header = required - payload;
        assert!(
            (1 << 20..=32 << 20).contains(&header),
            "{name}: output of {required} bytes for a {payload}-byte payload"
        );
        assert_eq!(entries(&self.work), before, "{name}: left something behind");
    }

    /// A raw disk with data at several places (the tests' usual pattern).
    fn data_disk(&self) -> PathBuf {
        make_source(&self.work, SourceKind::Raw, "8M")
    }
}

/// Corpus disks larger than this (the 127 GiB Hyper-V and Virtual PC samples) are not written
/// out: the daemon refuses an output the file system cannot hold.
const LARGEST_ENCRYPTED: u64 = 4 << 30;

/// The corpus file `name` (`X.bz2`) decompressed into `work` as `X`.
fn unpack(corpus: &Path, name: &str, work: &Path) -> PathBuf {
    let target = work.join(name.strip_suffix(".bz2").unwrap());
    let output = run_ok(
        Command::new("bunzip2")
            .arg("-k")
            .arg("-c")
            .arg(corpus.join(name)),
    );
    fs::write(&target, output.stdout).unwrap();
    target
}

#[test]
fn every_corpus_image_is_refused_by_name_or_encrypted_like_qemu_reads_it() {
    let corpus = corpus_dir();
    let bench = Bench::new();
    let mut names: Vec<String> = fs::read_dir(&corpus)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".bz2"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no *.bz2 in {}", corpus.display());
    for name in &names {
        let source = unpack(&corpus, name, &bench.work);
        let stem = source.file_name().unwrap().to_string_lossy().into_owned();
        // What each sample is, from the corpus' own naming; an image of a kind not listed
        // here fails the test until someone says what imgcrypt must do with it.
        let refused_as = match stem.as_str() {
            s if s.ends_with(".bochs") => Some("bochs"),
            s if s.ends_with(".cloop") => Some("cloop"),
            s if s.starts_with("parallels") => Some("parallels"),
            s if s.ends_with(".qcow") => Some("qcow"),
            s if s.ends_with(".vdi") => Some("vdi"),
            s if s.ends_with(".qed") => Some("qed"),
            s if s.ends_with(".dmg") => Some("dmg"),
            _ => None,
        };
        match refused_as {
            Some(format) => bench.refused(&source, format),
            None if stem.ends_with(".vhd") && qemu_virtual_size(&source) > LARGEST_ENCRYPTED => {
                bench.assert_read_but_too_large(&source);
                bench.assert_encrypts_sparse(&source, "vhd_dynamic", &source, "vpc");
            }
            None if stem.ends_with(".vhd") => bench.assert_encrypts(&source, "vpc", "vhd_dynamic"),
            None if stem.ends_with(".raw") => bench.assert_encrypts(&source, "raw", "raw"),
            None if stem.starts_with("iotest-dirtylog") => {
                // qemu's iotest 070: a log to replay. qemu refuses it read-only (and replays it
                // read-write); imgcrypt replays it in memory and never writes the source. What
                // it encrypts is what qemu reads of a copy qemu replayed.
                // Its 10 GiB would be 10 GiB of LUKS ciphertext: the sparse qcow2 output keeps
                // only its data, and qemu-img compares it with qemu's own replay.
                let before = fs::read(&source).unwrap();
                let replayed = bench.work.join("replayed.vhdx");
                fs::copy(&source, &replayed).unwrap();
                qemu_img(&[
                    "check",
                    "-q",
                    "-r",
                    "all",
                    "-f",
                    "vhdx",
                    replayed.to_str().unwrap(),
                ]);
                bench.assert_encrypts_sparse(&source, "vhdx", &replayed, "vhdx");
                assert!(
                    fs::read(&source).unwrap() == before,
                    "the source was written"
                );
                fs::remove_file(&replayed).unwrap();
            }
            // iotest 070's dynamic image and iotest 146's Disk2VHD image (equal header
            // sequence numbers, which qemu accepts because the headers are identical).
            None if stem.ends_with(".vhdx") => bench.assert_encrypts(&source, "vhdx", "vhdx"),
            None if stem.ends_with(".qcow2") => bench.assert_encrypts(&source, "qcow2", "qcow2"),
            None if stem == "afl9.vmdk" => {
                // A fuzzed VMDK (qemu's iotest 059): an absurd capacity that qemu refuses with
                // "L1 size too big"; refused the same way, nothing left behind.
                hand_over(&bench.attacker, &source);
                let before = entries(&bench.work);
                let message = bench.error_message(&source);
                assert!(message.contains("L1 size too big"), "{message}");
                assert_eq!(entries(&bench.work), before);
            }
            // iotest 059's VMware-made version 3 streamOptimized disk: 16 GiB, so encrypted to
            // the sparse qcow2 output rather than 16 GiB of LUKS.
            None if stem.ends_with(".vmdk") => {
                bench.assert_encrypts_sparse(&source, "vmdk", &source, "vmdk")
            }
            None if stem == "afl5.img" => {
                // A fuzzed VHD (qemu's iotest 'afl5'): refused as a damaged VHD, never read
                // as raw, and nothing left behind.
                hand_over(&bench.attacker, &source);
                let before = entries(&bench.work);
                let message = bench.error_message(&source);
                assert!(message.contains("VHD"), "{message}");
                assert_eq!(entries(&bench.work), before);
            }
            None => panic!("corpus image {stem}: no expectation written for it"),
        }
        fs::remove_file(&source).unwrap();
    }
    assert!(names.len() >= 10, "only {names:?}");
}

#[test]
fn every_format_qemu_img_writes_is_refused_by_name_or_read_like_qemu() {
    let bench = Bench::new();
    let data = bench.data_disk();
    let data = data.to_str().unwrap();
    let secret = ["--object", "secret,id=sec0,data=not-a-real-secret"];
    // Made empty (`create`) and with data (`convert`); the option list is for both.
    let make = |path: &Path, format: &str, options: &[&str], with_data: bool| {
        let path = path.to_str().unwrap();
        let mut args = if with_data {
            vec!["convert", "-q", "-f", "raw", "-O", format]
        } else {
            vec!["create", "-q", "-f", format]
        };
        if format == "luks" {
            args.extend(secret);
        }
        args.extend(options);
        args.extend(if with_data {
            [data, path]
        } else {
            [path, "8M"]
        });
        qemu_img(&args);
    };
    // (file name, qemu format, creation options, words of the refusal)
    let refused: [(&str, &str, &[&str], &str); 5] = [
        ("img.qcow", "qcow", &[], "qcow (version 1)"),
        ("img.vdi", "vdi", &[], "vdi"),
        ("img.parallels", "parallels", &[], "parallels"),
        ("img.qed", "qed", &[], "qed"),
        (
            "img.luks",
            "luks",
            &["-o", "key-secret=sec0,iter-time=10"],
            "luks",
        ),
    ];
    for (name, format, options, named) in refused {
        for with_data in [false, true] {
            let path = bench.work.join(format!("{with_data}-{name}"));
            make(&path, format, options, with_data);
            bench.refused(&path, named);
            if format == "qcow" {
                let message = bench.error_message(&path);
                assert!(
                    !message.contains("qcow2"),
                    "qcow v1 called qcow2: {message}"
                );
            }
            fs::remove_file(&path).unwrap();
        }
    }

    // Multi-file VMDKs: the descriptor reads with its extent (imgctl passes it); a sparse
    // extent alone is refused (it is not a whole disk, qemu refuses it too); a flat extent is
    // raw data and reads like the disk qemu sees through the descriptor.
    for (subformat, extent_suffix) in [
        ("monolithicFlat", "-flat.vmdk"),
        ("twoGbMaxExtentSparse", "-s001.vmdk"),
        ("twoGbMaxExtentFlat", "-f001.vmdk"),
    ] {
        let descriptor = bench.work.join(format!("{subformat}.vmdk"));
        make(
            &descriptor,
            "vmdk",
            &["-o", &format!("subformat={subformat}")],
            true,
        );
        let extent = bench.work.join(format!("{subformat}{extent_suffix}"));
        assert!(extent.is_file(), "qemu-img made no {}", extent.display());
        hand_over(&bench.attacker, &extent);
        let out = bench.work.join("descriptor.luks");
        bench.encrypt_ok(&descriptor, &out);
        bench.assert_plaintext_like_qemu(&out, "vmdk", &descriptor);
        if subformat == "twoGbMaxExtentSparse" {
            bench.refused(&extent, "vmdk");
        } else {
            let out = bench.work.join("flat.luks");
            bench.encrypt_ok(&extent, &out);
            bench.assert_plaintext_like_qemu(&out, "vmdk", &descriptor);
        }
        fs::remove_file(&descriptor).unwrap();
        fs::remove_file(&extent).unwrap();
    }

    // What imgcrypt reads keeps working: raw, fixed and dynamic VHD, VHDX, qcow2 v3 and v2,
    // empty and with data.
    for (name, format, options, summary) in [
        ("img.raw", "raw", &[][..], "raw"),
        ("img.qcow2", "qcow2", &[], "qcow2"),
        ("v2.qcow2", "qcow2", &["-o", "compat=0.10"], "qcow2"),
        ("dynamic.vhd", "vpc", &[], "vhd_dynamic"),
        ("fixed.vhd", "vpc", &["-o", "subformat=fixed"], "vhd_fixed"),
        ("dynamic.vhdx", "vhdx", &[], "vhdx"),
        ("fixed.vhdx", "vhdx", &["-o", "subformat=fixed"], "vhdx"),
        ("sparse.vmdk", "vmdk", &[], "vmdk"),
        (
            "stream.vmdk",
            "vmdk",
            &["-o", "subformat=streamOptimized"],
            "vmdk",
        ),
    ] {
        for with_data in [false, true] {
            let path = bench.work.join(format!("{with_data}-{name}"));
            make(&path, format, options, with_data);
            bench.assert_encrypts(&path, format, summary);
            fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn luks_images_are_refused_as_already_encrypted() {
    let bench = Bench::new();
    for luks_type in ["luks1", "luks2"] {
        let image = bench.work.join(format!("{luks_type}.img"));
        fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
        run_ok(
            Command::new("cryptsetup")
                .args(["luksFormat", "-q", "--type", luks_type])
                .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
                .arg("--key-file")
                .arg(&bench.key)
                .arg(&image),
        );
        bench.refused(&image, &format!("already a {luks_type} image"));
        if luks_type == "luks2" {
            // Primary header wiped: the secondary one at 16 KiB still makes it LUKS.
            fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap()
                .write_all_at(&[0u8; 4096], 0)
                .unwrap();
            bench.refused(&image, "secondary header at offset 16384");
        }
    }
    // imgcrypt's own output, fed back in.
    let encrypted = bench.work.join("once.luks");
    bench.encrypt_ok(&bench.data_disk(), &encrypted);
    bench.refused(&encrypted, "already a luks2 image");
}

#[test]
fn compressed_and_archived_disks_are_refused_with_the_unpacking_command() {
    let bench = Bench::new();
    let disk = bench.data_disk();
    for (program, suffix, command) in [
        ("gzip", "gz", "gunzip -k"),
        ("bzip2", "bz2", "bunzip2 -k"),
        ("xz", "xz", "unxz -k"),
        ("zstd", "zst", "unzstd"),
    ] {
        let packed = bench.work.join(format!("src.raw.{suffix}"));
        run_ok(Command::new(program).args(["-k", "-q", "-f"]).arg(&disk));
        assert!(packed.is_file(), "{program} made no {}", packed.display());
        bench.refused(&packed, program);
        let message = bench.error_message(&packed);
        assert!(message.contains(command), "{program}: {message}");
        fs::remove_file(&packed).unwrap();
    }
    // An OVA: a tar of the descriptor and a streamOptimized VMDK.
    let vmdk = bench.work.join("disk1.vmdk");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        disk.to_str().unwrap(),
        vmdk.to_str().unwrap(),
    ]);
    write_file(
        &bench.work.join("appliance.ovf"),
        b"<?xml version=\"1.0\"?><Envelope/>\n",
    );
    let ova = bench.work.join("appliance.ova");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&bench.work)
            .arg("-cf")
            .arg(&ova)
            .args(["appliance.ovf", "disk1.vmdk"]),
    );
    // Read in place: the disk inside, as qemu reads it.
    let out = bench.work.join("ova.luks");
    bench.encrypt_ok(&ova, &out);
    bench.assert_plaintext_like_qemu(&out, "vmdk", &vmdk);
}

// --- issue 8, finding 4: attacker-sized tables ---------------------------------------------

/// The VHD checksum: one's complement of the byte sum, the checksum field counted as zeros.
fn vhd_checksum(bytes: &[u8], field: usize) -> [u8; 4] {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(at, _)| !(field..field + 4).contains(at))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    (!sum).to_be_bytes()
}

/// A sparse dynamic VHD written from the specification: footer copy at 0, header at 512, a
/// table of `entries` at 1536 whose first `unallocated` entries are 0xFFFFFFFF and the rest a
/// hole of zeros, and the footer. A few KiB on disk whatever the table's size.
fn crafted_vhd(
    path: &Path,
    creator: &[u8; 4],
    current_size: u64,
    geometry: (u16, u8, u8),
    block_size: u32,
    entries: u32,
    unallocated: usize,
) {
    let mut footer = [0u8; 512];
    footer[..8].copy_from_slice(b"conectix");
    footer[8..12].copy_from_slice(&2u32.to_be_bytes());
    footer[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    footer[16..24].copy_from_slice(&512u64.to_be_bytes());
    footer[28..32].copy_from_slice(creator);
    footer[40..48].copy_from_slice(&current_size.to_be_bytes());
    footer[48..56].copy_from_slice(&current_size.to_be_bytes());
    footer[56..58].copy_from_slice(&geometry.0.to_be_bytes());
    footer[58] = geometry.1;
    footer[59] = geometry.2;
    footer[60..64].copy_from_slice(&3u32.to_be_bytes());
    let sum = vhd_checksum(&footer, 64);
    footer[64..68].copy_from_slice(&sum);
    let mut header = [0u8; 1024];
    header[..8].copy_from_slice(b"cxsparse");
    header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    header[16..24].copy_from_slice(&1536u64.to_be_bytes());
    header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    header[28..32].copy_from_slice(&entries.to_be_bytes());
    header[32..36].copy_from_slice(&block_size.to_be_bytes());
    let sum = vhd_checksum(&header, 36);
    header[36..40].copy_from_slice(&sum);
    let end = 1536 + u64::from(entries) * 4;
    let file = fs::File::create(path).unwrap();
    file.set_len(end + 512).unwrap();
    file.write_all_at(&footer, 0).unwrap();
    file.write_all_at(&header, 512).unwrap();
    file.write_all_at(&vec![0xff; unallocated * 4], 1536)
        .unwrap();
    file.write_all_at(&footer, end).unwrap();
}

/// The daemon's peak resident memory so far, in KiB.
fn peak_rss_kib(daemon: &Daemon) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// How much the daemon's peak memory may grow over one of these jobs: the reader's own bound
/// (under 41 MiB for any table) plus slack; the review measured 9.4 GB.
const PEAK_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

#[test]
fn sparse_vhd_claiming_a_huge_table_leaves_the_daemons_memory_bounded() {
    let bench = Bench::new();
    // A first ordinary job, so the copy buffers are in the baseline.
    bench.encrypt_ok(&bench.data_disk(), &bench.work.join("warm.luks"));
    let baseline = peak_rss_kib(&bench.daemon);

    // The review's image: 2^28 entries (a 1 GiB table of zeros) for 128 GiB in 512-byte
    // blocks, 8 KiB on disk. It took the daemon to 9.4 GB before "footer copy overlaps block 0".
    let huge = bench.work.join("bat-2-28.vhd");
    crafted_vhd(
        &huge,
        b"qem2",
        (1 << 28) * 512,
        (65535, 16, 255),
        512,
        1 << 28,
        0,
    );
    assert!(fs::metadata(&huge).unwrap().len() > 1 << 30);
    hand_over(&bench.attacker, &huge);
    let before = entries(&bench.work);
    let message = bench.error_message(&huge);
    assert!(
        message.contains("268435456 block allocation table entries"),
        "{message}"
    );
    assert_eq!(entries(&bench.work), before);
    let after_huge = peak_rss_kib(&bench.daemon);
    assert!(
        after_huge < baseline + PEAK_GROWTH_LIMIT_KIB,
        "peak memory grew from {baseline} KiB to {after_huge} KiB"
    );

    // A 1 MiB disk (by geometry) whose header claims 2040 GiB of 512-byte blocks: a 16 GiB
    // table in a sparse file. Only the 2048 entries the disk needs are read; it encrypts.
    let claiming = bench.work.join("claims-16g.vhd");
    let entries = 0xff00_0000u32;
    crafted_vhd(
        &claiming,
        b"qemu",
        u64::from(entries) * 512,
        (32, 4, 16),
        512,
        entries,
        2048,
    );
    let out = bench.work.join("claiming.luks");
    let attempt = bench.encrypt_ok(&claiming, &out);
    let summary = &attempt.event("summary").unwrap()["summary"];
    assert_eq!(summary["virtual_size"], 1 << 20, "{summary}");
    let plaintext = independent_decrypt(&out, &bench.key, &bench.work);
    assert!(fs::read(&plaintext).unwrap().iter().all(|&b| b == 0));
    let after_claiming = peak_rss_kib(&bench.daemon);
    assert!(
        after_claiming < baseline + PEAK_GROWTH_LIMIT_KIB,
        "peak memory grew from {baseline} KiB to {after_claiming} KiB"
    );
    println!(
        "daemon VmHWM: {baseline} KiB after a normal job, {after_huge} KiB after the 2^28 \
         table, {after_claiming} KiB after the 16 GiB claim"
    );
}

// --- verify --source with a longer source ---------------------------------------------------

#[test]
fn verify_with_a_longer_source_reports_where_the_bytes_differ() {
    let bench = Bench::new();
    let disk = bench.data_disk();
    let image = bench.work.join("disk.luks");
    bench.encrypt_ok(&disk, &image);
    let payload = 8u64 << 20;
    let verify = |source: &Path| {
        hand_over(&bench.attacker, source);
        run(bench
            .attacker
            .imgctl(&bench.daemon)
            .arg("verify")
            .arg(&image)
            .arg("--source")
            .arg(source)
            .arg("--key-file")
            .arg(&bench.key))
    };
    // Longer by 1 MiB and different at byte 1000 (inside the data written at 0): the old code
    // answered "differs from byte 8388608 on" without comparing a byte.
    let mut content = fs::read(&disk).unwrap();
    content.extend(std::iter::repeat_n(0u8, 1 << 20));
    content[1000] ^= 0xff;
    let longer_different = bench.work.join("longer-different.raw");
    fs::write(&longer_different, &content).unwrap();
    let output = verify(&longer_different);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("from byte 1000 (0x3e8) on"), "{text}");
    assert!(!text.contains(&payload.to_string()), "{text}");

    // Longer, and equal over the whole payload: said as such.
    content[1000] ^= 0xff;
    let longer_same = bench.work.join("longer-same.raw");
    fs::write(&longer_same, &content[..payload as usize + 4096]).unwrap();
    let output = verify(&longer_same);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains(&format!(
            "the source is 4096 bytes longer than the image holds; the first {payload} bytes match"
        )),
        "{text}"
    );

    // The source itself still matches.
    let output = verify(&disk);
    assert!(output.status.success(), "{}", describe(&output));
}
