//! `imgctl encrypt --upload` (issue 13) with the real daemon and a real S3 server (moto on
//! 127.0.0.1, tests/common/s3.rs): a raw LUKS image streamed from the daemon into a multipart
//! upload with no local copy, downloaded with boto3 (an independent client) and decrypted with
//! the independent decryptor (`cryptsetup luksDump` for the volume key, Python `cryptography`
//! for the data) back to the source. imgctl killed mid-upload resumes from the header it saved,
//! uploading only the missing parts (counted at tests/support/s3_proxy.py); a changed key
//! restarts the upload and aborts the old one; outputs that cannot be streamed, refused
//! credentials and a missing bucket get clear errors and leave no multipart upload behind.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::s3::{python_etag, Proxy, S3Server, BUCKET};
use common::*;

const MIB: u64 = 1 << 20;
/// The part size of every image here (the minimum, 16 MiB).
const PART: u64 = 16 * MIB;
/// LUKS2's header as the daemon makes it: the image is this plus the source.
const LUKS2_HEADER: u64 = 16 * MIB;

struct Setup {
    _scratch: tempfile::TempDir,
    dir: PathBuf,
    server: S3Server,
    daemon: Daemon,
    source: PathBuf,
    key: PathBuf,
}

/// A daemon, a server, a key and a `source_mib` MiB source whose every sector differs.
fn setup(source_mib: u64) -> Setup {
    let scratch = scratch();
    let dir = scratch.path().to_path_buf();
    let source = dir.join("disk.raw");
    write_distinct_sectors(&source, (source_mib * MIB) as usize);
    let key = dir.join("k");
    write_key(&key);
    Setup {
        daemon: Daemon::start(&dir, &["--engine", "userspace"]),
        server: S3Server::start(),
        _scratch: scratch,
        dir,
        source,
        key,
    }
}

impl Setup {
    /// The daemon's descriptors once a first job opened what it keeps for good (the random
    /// devices): a job that ends leaves it at this.
    fn warm_descriptors(&self) -> usize {
        let out = self.dir.join("warm.luks");
        run_ok(&mut self.daemon.encrypt(&self.source, &out, &self.key));
        fs::remove_file(out).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        self.daemon.open_descriptors()
    }

    /// `imgctl encrypt SOURCE --upload s3://BUCKET/OBJECT --key-file KEY --json` through
    /// `endpoint`, with cheap keyslot settings.
    fn encrypt(&self, endpoint: &str, object: &str, key: &Path) -> Command {
        let mut command = self.daemon.imgctl();
        self.server.client_env(&mut command, endpoint, &self.dir);
        command
            .arg("encrypt")
            .arg(&self.source)
            .arg("--upload")
            .arg(format!("s3://{BUCKET}/{object}"))
            .arg("--key-file")
            .arg(key)
            .arg("--json")
            .args(CHEAP_PBKDF);
        command
    }

    fn state_files(&self) -> Vec<PathBuf> {
        match fs::read_dir(self.dir.join("state/imgcrypt/uploads")) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Downloads `object` and checks it is a LUKS2 image of the source under `key`, by an
    /// implementation independent of ours; returns the downloaded file.
    fn assert_object_decrypts(&self, object: &str, key: &Path) -> PathBuf {
        let downloaded = self.dir.join(format!("{object}.downloaded"));
        self.server.download(object, &downloaded);
        let facts = luks_dump(&downloaded);
        assert_eq!((facts.version, facts.data_offset), (2, LUKS2_HEADER));
        let plaintext = independent_decrypt(&downloaded, key, &self.dir);
        assert_plaintext_matches(&plaintext, &self.source);
        downloaded
    }

    /// No multipart upload is left on the server.
    fn assert_no_stray_upload(&self) {
        assert_eq!(self.server.multipart_uploads(), Vec::new());
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_streamed_upload_decrypts_to_the_source_with_the_size_and_etag_reported() {
    let setup = setup(40);
    let idle = setup.warm_descriptors();
    let output = run_ok(&mut setup.encrypt(&setup.server.endpoint, "disk.luks", &setup.key));
    let summary = json_event(&output.stdout, "summary");
    let image_size = LUKS2_HEADER + 40 * MIB;
    assert_eq!(summary["summary"]["output_size"], image_size);
    assert_eq!(summary["upload"]["size"], image_size);
    assert_eq!(summary["upload"]["parts"], image_size.div_ceil(PART));
    // Progress was the upload's, in bytes of the image, with a rate and an ETA.
    let uploading: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("\"operation\":\"uploading\""))
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let last = uploading.last().expect("no upload progress");
    assert_eq!(last["bytes_total"], image_size);
    assert_eq!(last["bytes_done"], image_size);
    assert!(last["bytes_per_second"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(last["eta_seconds"], 0, "{last}");
    // Before the end, any line with a rate has an ETA of a second or more.
    for line in &uploading {
        if line["bytes_per_second"].as_u64() > Some(0)
            && line["bytes_done"].as_u64() < Some(image_size)
        {
            assert!(line["eta_seconds"].as_u64() >= Some(1), "{line}");
        }
    }

    let downloaded = setup.assert_object_decrypts("disk.luks", &setup.key);
    let etag = python_etag(&downloaded, PART);
    assert_eq!(summary["upload"]["etag"], etag.as_str());
    assert_eq!(setup.server.object("disk.luks").2, etag);
    // `verify --etag` agrees on the downloaded copy.
    run_ok(
        setup
            .daemon
            .imgctl()
            .arg("verify")
            .arg(&downloaded)
            .arg("--etag")
            .arg(&etag),
    );
    // Nothing was written locally but the download, and nothing is left to resume.
    let mut local: Vec<_> = fs::read_dir(&setup.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.contains("luks") && !name.starts_with("disk.luks.downloaded"))
        .collect();
    local.sort();
    assert_eq!(local, Vec::<String>::new());
    assert_eq!(setup.state_files(), Vec::<PathBuf>::new());
    setup.assert_no_stray_upload();
    // The daemon kept no descriptor of the job.
    setup.daemon.wait_for_descriptors(idle);
}

/// Starts a streamed upload of `big.luks` through a throttled `proxy`, SIGKILLs imgctl once
/// `parts` parts are stored, and unthrottles the proxy.
fn kill_after_parts(setup: &Setup, proxy: &Proxy, key: &Path, parts: u64) {
    kill_after_parts_of(
        proxy,
        &mut setup.encrypt(&proxy.endpoint, "big.luks", key),
        parts,
    );
}

/// Runs the upload `command` through a throttled `proxy`, SIGKILLs it once `parts` parts are
/// stored, and unthrottles the proxy.
fn kill_after_parts_of(proxy: &Proxy, command: &mut Command, parts: u64) {
    proxy.configure(0.7, -1);
    let mut child = start_until(command, |v| {
        v["operation"] == "uploading" && v["bytes_done"].as_u64().unwrap_or(0) >= parts * PART
    });
    child.kill().unwrap();
    child.wait().unwrap();
    proxy.configure(0.0, -1);
}

#[test]
fn a_killed_streamed_upload_resumes_from_its_saved_header_uploading_only_missing_parts() {
    let setup = setup(96);
    let proxy = Proxy::start(&setup.server, &[]);
    kill_after_parts(&setup, &proxy, &setup.key, 2);
    // The state and the header it resumes from are kept, private, and hold no key.
    let files = setup.state_files();
    let header = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "header"))
        .unwrap_or_else(|| panic!("no saved header in {files:?}"));
    assert_eq!(fs::metadata(header).unwrap().len(), LUKS2_HEADER);
    let state_file = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let state: serde_json::Value = serde_json::from_slice(&fs::read(state_file).unwrap()).unwrap();
    let stored: Vec<u64> = state["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    let key_text = fs::read(&setup.key).unwrap();
    for file in &files {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(file).unwrap().permissions().mode() & 0o077, 0);
        let bytes = fs::read(file).unwrap();
        assert!(!bytes.windows(key_text.len()).any(|w| w == key_text));
    }
    assert!(stored.len() >= 2, "{stored:?}");

    let output = run_ok(&mut setup.encrypt(&proxy.endpoint, "big.luks", &setup.key));
    assert!(
        stdout(&output).contains("resuming the upload"),
        "{}",
        stdout(&output)
    );
    let summary = json_event(&output.stdout, "summary");
    let parts = (LUKS2_HEADER + 96 * MIB).div_ceil(PART);
    let resumed_from = summary["summary"]["resumed_from"].as_u64().unwrap();
    assert!(resumed_from >= 2 * PART, "{summary}");
    let (mut sent, failed) = proxy.stats();
    sent.sort();
    let missing: Vec<u32> = (1..=parts as u32)
        .filter(|n| !stored.contains(&u64::from(*n)))
        .collect();
    assert_eq!(sent, missing, "only the missing parts are uploaded");
    assert_eq!(failed, 0);
    setup.assert_object_decrypts("big.luks", &setup.key);
    setup.assert_no_stray_upload();
    assert_eq!(setup.state_files(), Vec::<PathBuf>::new());
}

#[test]
fn a_changed_key_restarts_the_streamed_upload_and_aborts_the_old_one() {
    let setup = setup(64);
    let proxy = Proxy::start(&setup.server, &[]);
    kill_after_parts(&setup, &proxy, &setup.key, 1);
    let old = setup.server.multipart_uploads();
    assert_eq!(old.len(), 1, "{old:?}");

    let new_key = setup.dir.join("k2");
    write_key(&new_key);
    let output = run_ok(&mut setup.encrypt(&proxy.endpoint, "big.luks", &new_key));
    let text = stdout(&output);
    assert!(text.contains("no longer opens"), "{text}");
    assert!(text.contains("restarting the upload"), "{text}");
    let summary = json_event(&output.stdout, "summary");
    assert!(
        summary["summary"].get("resumed_from").is_none(),
        "{summary}"
    );
    let (sent, _) = proxy.stats();
    assert_eq!(sent.len() as u64, (LUKS2_HEADER + 64 * MIB).div_ceil(PART));
    let downloaded = setup.assert_object_decrypts("big.luks", &new_key);
    assert!(!test_passphrase(&downloaded, &setup.key));
    setup.assert_no_stray_upload();
}

#[test]
fn a_lost_saved_header_restarts_the_upload_rather_than_mixing_two_images() {
    let setup = setup(96);
    let proxy = Proxy::start(&setup.server, &[]);
    kill_after_parts(&setup, &proxy, &setup.key, 3);
    let header = setup
        .state_files()
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "header"))
        .expect("a saved header");
    // The header the stored parts were encrypted under is gone (or replaced by another image's):
    // the daemon can only make a new image, so the stored parts must not be kept.
    fs::write(&header, vec![0u8; LUKS2_HEADER as usize]).unwrap();
    kill_after_parts(&setup, &proxy, &setup.key, 1);
    fs::remove_file(&header).unwrap_or(());
    let output = run_ok(&mut setup.encrypt(&proxy.endpoint, "big.luks", &setup.key));
    assert!(
        stdout(&output).contains("restarting the upload"),
        "{}",
        stdout(&output)
    );
    setup.assert_object_decrypts("big.luks", &setup.key);
    setup.assert_no_stray_upload();
}

#[test]
fn what_cannot_be_streamed_is_refused_before_anything_is_sent() {
    let setup = setup(1);
    let mut vhd = setup.daemon.imgctl();
    setup
        .server
        .client_env(&mut vhd, &setup.server.endpoint, &setup.dir);
    let vhd = run(vhd
        .arg("encrypt")
        .arg(&setup.source)
        .args(["--format", "vhd", "--key-file"])
        .arg(&setup.key)
        .args(["--upload", &format!("s3://{BUCKET}/disk.vhd")]));
    assert_eq!(vhd.status.code(), Some(2), "{}", describe(&vhd));
    assert!(
        stderr(&vhd).contains("a VHD image cannot be streamed")
            && stderr(&vhd).contains("add -o OUT"),
        "{}",
        stderr(&vhd)
    );
    let kernel = run(setup
        .encrypt(&setup.server.endpoint, "disk.luks", &setup.key)
        .args(["--engine", "kernel"]));
    assert!(
        stderr(&kernel).contains("drop --engine"),
        "{}",
        stderr(&kernel)
    );
    let detached = run(setup
        .encrypt(&setup.server.endpoint, "disk.luks", &setup.key)
        .arg("--detach"));
    assert!(
        stderr(&detached).contains("cannot be detached"),
        "{}",
        stderr(&detached)
    );
    let nowhere = run(setup.daemon.imgctl().arg("encrypt").arg(&setup.source));
    assert!(
        stderr(&nowhere).contains("--upload s3://"),
        "{}",
        stderr(&nowhere)
    );
    setup.assert_no_stray_upload();
}

#[test]
fn refused_credentials_and_a_missing_bucket_are_clear_and_leave_nothing_behind() {
    let setup = setup(8);
    let idle = setup.warm_descriptors();
    let mut wrong = setup.encrypt(&setup.server.endpoint, "disk.luks", &setup.key);
    wrong.env(
        "AWS_SECRET_ACCESS_KEY",
        "not-the-secret-key-0123456789abcdef",
    );
    let refused = run(&mut wrong);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("refused"), "{}", stderr(&refused));
    assert!(!stderr(&refused).contains(&setup.server.secret));

    let mut missing = setup.daemon.imgctl();
    setup
        .server
        .client_env(&mut missing, &setup.server.endpoint, &setup.dir);
    missing
        .arg("encrypt")
        .arg(&setup.source)
        .arg("--upload")
        .arg("s3://no-such-bucket/disk.luks")
        .arg("--key-file")
        .arg(&setup.key)
        .args(CHEAP_PBKDF);
    let missing = run(&mut missing);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no-such-bucket does not exist"),
        "{}",
        stderr(&missing)
    );
    setup.assert_no_stray_upload();
    assert_eq!(setup.state_files(), Vec::<PathBuf>::new());
    // The daemon's jobs ended (the stream's reader went away) and freed their descriptors.
    setup.daemon.wait_for_descriptors(idle);
}

#[test]
fn a_server_that_fails_part_uploads_is_given_up_in_seconds_leaving_nothing_behind() {
    let setup = setup(40);
    let idle = setup.warm_descriptors();
    // Every part after the first fails with a 500.
    let proxy = Proxy::start(&setup.server, &["--fail-after", "1"]);
    let started = std::time::Instant::now();
    let output = run(&mut setup.encrypt(&proxy.endpoint, "disk.luks", &setup.key));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("cannot upload part of s3://imgcrypt-test/disk.luks (part ")
            && message.contains("500"),
        "{message}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
    assert!(proxy.stats().1 > 1, "the part upload was retried");
    setup.assert_no_stray_upload();
    assert_eq!(setup.state_files(), Vec::<PathBuf>::new());
    // The daemon's job ended when its reader went away, and freed its descriptors.
    setup.daemon.wait_for_descriptors(idle);
}

#[test]
fn with_an_output_file_the_image_is_written_then_uploaded() {
    let setup = setup(8);
    let out = setup.dir.join("disk.luks");
    let output = run_ok(
        setup
            .encrypt(&setup.server.endpoint, "written.luks", &setup.key)
            .arg("-o")
            .arg(&out),
    );
    assert!(out.exists(), "{}", describe(&output));
    let downloaded = setup.assert_object_decrypts("written.luks", &setup.key);
    assert_eq!(fs::read(&downloaded).unwrap(), fs::read(&out).unwrap());
    setup.assert_no_stray_upload();
}

#[test]
fn a_qcow2_output_is_written_then_uploaded_and_checks_with_qemu_img() {
    let setup = setup(8);
    let out = setup.dir.join("disk.qcow2");
    let mut command = setup.daemon.imgctl();
    setup
        .server
        .client_env(&mut command, &setup.server.endpoint, &setup.dir);
    run_ok(
        command
            .arg("encrypt")
            .arg(&setup.source)
            .arg("-o")
            .arg(&out)
            .args(["--target", "ibm-vpc", "--key-file"])
            .arg(&setup.key)
            .args(["--upload", &format!("s3://{BUCKET}/disk.qcow2")])
            .args(CHEAP_PBKDF),
    );
    let downloaded = setup.dir.join("downloaded.qcow2");
    setup.server.download("disk.qcow2", &downloaded);
    assert_eq!(fs::read(&downloaded).unwrap(), fs::read(&out).unwrap());
    assert_qemu_check_and_compare(&downloaded, &setup.key, &setup.source, "raw");
    setup.assert_no_stray_upload();
}

#[test]
fn a_streamed_qcow2_upload_resumes_after_a_kill_and_checks_with_qemu_img() {
    let setup = setup(96);
    // 16 MiB of written zeros in the middle: allocated in the source, not stored in the qcow2.
    fs::File::options()
        .write(true)
        .open(&setup.source)
        .unwrap()
        .write_all_at(&vec![0u8; (16 * MIB) as usize], 32 * MIB)
        .unwrap();
    let proxy = Proxy::start(&setup.server, &[]);
    let encrypt = || {
        let mut command = setup.encrypt(&proxy.endpoint, "disk.qcow2", &setup.key);
        command.args(["--format", "qcow2"]);
        command
    };
    kill_after_parts_of(&proxy, &mut encrypt(), 2);
    let header = setup
        .state_files()
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "header"))
        .expect("a saved header");
    // The header cluster and the LUKS header: what the daemon needs to go on.
    assert_eq!(fs::metadata(&header).unwrap().len(), (64 << 10) + (2 << 20));
    assert_eq!(setup.server.multipart_uploads().len(), 1);
    // The parts the state recorded (a part the server stored as imgctl was killed, before it
    // was recorded, is sent again).
    let state_file = setup
        .state_files()
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a saved state");
    let state: serde_json::Value = serde_json::from_slice(&fs::read(state_file).unwrap()).unwrap();
    let stored: Vec<u32> = state["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap() as u32)
        .collect();
    assert!(stored.len() >= 2, "{stored:?}");

    let output = run_ok(&mut encrypt());
    let text = stdout(&output);
    assert!(text.contains("resuming the upload"), "{text}");
    let summary = json_event(&output.stdout, "summary");
    assert_eq!(summary["summary"]["output_format"], "qcow2");
    assert_eq!(summary["summary"]["allocated_bytes"], 80 * MIB);
    let image_size = summary["summary"]["output_size"].as_u64().unwrap();
    assert!(image_size < 80 * MIB + 3 * MIB, "{summary}");
    assert!(summary["summary"]["resumed_from"].as_u64().unwrap() >= 2 * PART);
    let (mut sent, failed) = proxy.stats();
    assert_eq!(failed, 0);
    sent.sort();
    let missing: Vec<u32> = (1..=image_size.div_ceil(PART) as u32)
        .filter(|n| !stored.contains(n))
        .collect();
    assert_eq!(sent, missing, "only the missing parts are uploaded");

    let downloaded = setup.dir.join("downloaded.qcow2");
    setup.server.download("disk.qcow2", &downloaded);
    assert_eq!(fs::metadata(&downloaded).unwrap().len(), image_size);
    assert_qemu_check_and_compare(&downloaded, &setup.key, &setup.source, "raw");
    let etag = python_etag(&downloaded, PART);
    assert_eq!(summary["upload"]["etag"], etag.as_str());
    assert_eq!(setup.state_files(), Vec::<PathBuf>::new());
    setup.assert_no_stray_upload();
}

/// Runs `command` to its end and returns its exit status and the highest `VmHWM` (peak
/// resident memory, KiB) read from /proc while it ran: sampled, because `wait4`'s `ru_maxrss`
/// also counts the forking test process's memory from before the exec.
fn peak_rss_kib(command: &mut Command) -> (std::process::ExitStatus, u64) {
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    loop {
        if let Ok(status) = fs::read_to_string(format!("/proc/{}/status", child.id())) {
            let hwm = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.split_whitespace().next()?.parse().ok());
            peak = peak.max(hwm.unwrap_or(0));
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status, peak);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_streamed_upload_holds_a_few_parts_in_memory_whatever_the_image_size() {
    // 272 MiB of image in 16 MiB parts: all of it in memory would be 272 MiB; the bound is the
    // parts in flight, queued and being read (5 × 16 MiB).
    let setup = setup(256);
    let (status, peak_kib) =
        peak_rss_kib(&mut setup.encrypt(&setup.server.endpoint, "big.luks", &setup.key));
    assert!(status.success(), "imgctl failed");
    assert!(peak_kib > 0, "no memory reading");
    eprintln!("imgctl peak RSS: {} MiB", peak_kib / 1024);
    assert!(peak_kib < 150 * 1024, "imgctl peaked at {peak_kib} KiB");
    assert_eq!(setup.server.object("big.luks").1, LUKS2_HEADER + 256 * MIB);
    setup.assert_no_stray_upload();
}
