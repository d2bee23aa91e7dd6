//! The read side of the copy: every source format, read with O_DIRECT (a source on ext4) and
//! through the buffered fall-back (a source on ramfs, which refuses O_DIRECT; tmpfs accepts it
//! since Linux 6.6), encrypts to a LUKS image that an independent decryptor (cryptsetup's volume
//! key + Python `cryptography`) matches to qemu-img's plaintext; the daemon's log says which
//! path it took. After a job the page cache holds none of the source's data (fincore), and a
//! pipe is still refused as a source.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::raw_client::RawClient;
use common::*;

const MIB: u64 = 1 << 20;

/// Every source format qemu-img writes that the daemon reads, made from one raw image with
/// scattered data.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let raw = make_source(dir, SourceKind::Raw, "24M");
    let mut all = vec![
        raw.clone(),
        make_source(dir, SourceKind::VhdFixed, "24M"),
        make_source(dir, SourceKind::VhdDynamic, "24M"),
    ];
    for (name, format, options) in [
        ("src.qcow2", "qcow2", ""),
        ("src.vhdx", "vhdx", ""),
        ("src.vmdk", "vmdk", "subformat=monolithicSparse"),
        ("src-compressed.qcow2", "qcow2", ""),
    ] {
        let path = dir.join(name);
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", format];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        if name.contains("compressed") {
            args.push("-c");
        }
        args.extend([raw.to_str().unwrap(), path.to_str().unwrap()]);
        qemu_img(&args);
        all.push(path);
    }
    all
}

/// qemu's name for the format of a source from [`sources`].
fn format_of(source: &Path) -> &'static str {
    match source.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        _ => qemu_format(source),
    }
}

/// Encrypts `source` with `daemon` to `out` and checks the plaintext independently.
fn encrypt_and_check(daemon: &Daemon, source: &Path, work: &Path) {
    let name = source.file_name().unwrap().to_str().unwrap();
    let output = work.join(format!("{name}.luks"));
    let key = work.join("k");
    if !key.exists() {
        write_key(&key);
    }
    let result = run(&mut daemon.encrypt(source, &output, &key));
    assert!(
        result.status.success(),
        "{name}: {}\n{}",
        describe(&result),
        daemon.log_text()
    );
    let expected = work.join(format!("{name}.expected"));
    qemu_plaintext_as(format_of(source), source, &expected);
    let plaintext = independent_decrypt(&output, &key, work);
    assert_plaintext_matches(&plaintext, &expected);
    for path in [&output, &expected, &plaintext] {
        let _ = std::fs::remove_file(path);
    }
}

/// The daemon log's lines saying how a source file's data was read, since `from` bytes.
fn read_modes(daemon: &Daemon, from: usize) -> Vec<String> {
    daemon.log_text()[from..]
        .lines()
        .filter(|line| line.contains("source data reads"))
        .map(str::to_string)
        .collect()
}

/// Every data read of `source` took the path `expected` names. A compressed qcow2 has no data
/// ranges, only compressed streams, which are always read through the page cache (and dropped
/// from it): its job opens no data reader at all.
fn assert_read_modes(modes: Vec<String>, source: &Path, expected: &str) {
    let compressed = source.to_string_lossy().contains("compressed");
    if compressed {
        assert!(modes.is_empty(), "{}: {modes:?}", source.display());
    } else {
        assert!(
            !modes.is_empty() && modes.iter().all(|line| line.contains(expected)),
            "{}: {modes:?}",
            source.display()
        );
    }
}

#[test]
fn every_format_reads_with_o_direct_and_decrypts_to_qemus_plaintext() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    for source in sources(dir) {
        let from = daemon.log_text().len();
        encrypt_and_check(&daemon, &source, dir);
        assert_read_modes(read_modes(&daemon, from), &source, "O_DIRECT");
    }
}

/// A ramfs mounted on `dir/ramfs`, unmounted when dropped.
struct Ramfs(PathBuf);

impl Ramfs {
    fn mount(dir: &Path) -> Self {
        let mount_point = dir.join("ramfs");
        std::fs::create_dir(&mount_point).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "ramfs", "ramfs"])
                .arg(&mount_point),
        );
        Self(mount_point)
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn every_format_on_a_filesystem_without_o_direct_reads_buffered_and_decrypts_the_same() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let ramfs = Ramfs::mount(dir);
    let daemon = Daemon::start(dir, &[]);
    for made in sources(dir) {
        let source = ramfs.0.join(made.file_name().unwrap());
        std::fs::copy(&made, &source).unwrap();
        let from = daemon.log_text().len();
        // The output and the check's files stay on ext4: only the source is on ramfs.
        encrypt_and_check(&daemon, &source, dir);
        assert_read_modes(read_modes(&daemon, from), &source, "page cache");
        std::fs::remove_file(&source).unwrap();
    }
}

/// Bytes of `path` resident in the page cache, from util-linux `fincore`.
fn resident_bytes(path: &Path) -> u64 {
    let output = run_ok(
        Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path),
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

/// Drops `path`'s pages from the page cache (`dd iflag=nocache count=0` advises DONTNEED for
/// the whole file).
fn drop_from_cache(path: &Path) {
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["iflag=nocache", "count=0", "status=none"]),
    );
}

#[test]
fn the_page_cache_holds_none_of_the_source_after_a_job() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let key = dir.join("k");
    write_key(&key);
    // 64 MiB of data in a 128 MiB raw image and a dynamic VHD of it.
    let raw = dir.join("full.raw");
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "128M"]);
    qemu_io(
        "raw",
        &raw,
        &["write -P 0x5a 0 32M", "write -P 0xa5 64M 32M"],
    );
    let vhd = dir.join("full.vhd");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic",
        raw.to_str().unwrap(),
        vhd.to_str().unwrap(),
    ]);
    for source in [&raw, &vhd] {
        std::fs::File::open(source).unwrap().sync_all().unwrap();
        drop_from_cache(source);
        assert_eq!(resident_bytes(source), 0, "{}", source.display());
        let output = dir.join("out.luks");
        run_ok(&mut daemon.encrypt(source, &output, &key));
        // What may stay is the metadata the format module read through the page cache (a
        // VHD's footer, header and BAT: a few KiB here), never the 64 MiB of data.
        let resident = resident_bytes(source);
        assert!(
            resident <= MIB,
            "{}: {resident} bytes of the source are in the page cache after the job",
            source.display()
        );
        // The control: an ordinary read does fill the cache, so fincore can see it.
        run_ok(
            Command::new("dd")
                .arg(format!("if={}", source.display()))
                .args(["of=/dev/null", "bs=4M", "status=none"]),
        );
        assert!(resident_bytes(source) >= 64 * MIB);
        std::fs::remove_file(&output).unwrap();
    }
}

#[test]
fn a_pipe_is_still_refused_as_a_source() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let (read_end, _write_end) = nix::unistd::pipe().unwrap();
    let output = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("out.partial"))
        .unwrap();
    let key_path = dir.join("k");
    write_key(&key_path);
    let key = std::fs::File::open(&key_path).unwrap();
    let mut client = RawClient::connect(&daemon.socket);
    client.encrypt(&read_end, &output, &key);
    let reply = client.final_reply();
    let error = reply.error.as_deref().unwrap_or_default();
    assert!(error.ends_with("BadDescriptor"), "{reply:?}");
    let text = serde_json::to_string(&reply.parameters).unwrap();
    assert!(text.contains("FIFO"), "{text}");
    assert_eq!(output.metadata().unwrap().size(), 0);
}

#[test]
fn another_users_private_source_is_read_through_the_clients_descriptor() {
    // The daemon (root without CAP_DAC_OVERRIDE) may not open a mode-0600 file of another user
    // by itself: its read-only O_DIRECT reopen is refused, and the data is read through the
    // descriptor the user passed, buffered. The reopen never reads what the daemon's own rights
    // would not; the client's descriptor is what grants access.
    let user = test_user(VICTIM_USER);
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let home = dir.join("home");
    std::fs::create_dir(&home).unwrap();
    let source = make_source(&home, SourceKind::VhdDynamic, "12M");
    let key = home.join("k");
    write_key(&key);
    std::fs::set_permissions(&source, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    user.own(&[&home, &source, &key]);
    let daemon = Daemon::start(dir, &["--socket-mode", "0666"]);
    let output = home.join("out.luks");
    let from = daemon.log_text().len();
    let mut command = user.imgctl(&daemon);
    encrypt_arguments(&mut command, &source, &output, &key);
    let result = run(&mut command);
    assert!(
        result.status.success(),
        "{}\n{}",
        describe(&result),
        daemon.log_text()
    );
    let modes = read_modes(&daemon, from);
    assert!(
        !modes.is_empty() && modes.iter().all(|line| line.contains("page cache")),
        "{modes:?}"
    );
    let expected = dir.join("expected.raw");
    qemu_plaintext(&source, &expected);
    let plaintext = independent_decrypt(&output, &key, dir);
    assert_plaintext_matches(&plaintext, &expected);
}
