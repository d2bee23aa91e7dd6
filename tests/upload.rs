//! `imgctl upload` and `imgctl verify --etag/--object` against a real S3 server (moto, started
//! by tests/common/s3.rs on 127.0.0.1 with IAM authentication on), checked with an independent
//! client (boto3): the object downloads to the file's bytes, its size and multipart ETag are
//! what imgctl reports; an upload killed mid-way resumes uploading only the missing parts
//! (counted at tests/support/s3_proxy.py); a changed file restarts, saying why; `--abort`,
//! refused credentials, a missing bucket and a server failing part uploads leave no multipart
//! upload behind; profiles work; no secret ever appears in imgctl's output or state.
//!
//! moto computes the multipart ETag as S3 does (hex MD5 of the parts' MD5s, `-N`) and stores
//! the SHA-256 checksums (a composite `…-N` checksum on the object), but does not check a part's
//! `x-amz-checksum-sha256` against its body; the proxy does, and counts the parts that carry a
//! correct one.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::s3::{python_etag, Proxy, S3Server, BUCKET};
use common::*;

const MIB: u64 = 1 << 20;
const PART: u64 = 16 * MIB;

/// A scratch dir, a HOME and a state dir for imgctl.
struct Setup {
    dir: tempfile::TempDir,
    server: S3Server,
}

impl Setup {
    fn new() -> Self {
        Self {
            dir: scratch(),
            server: S3Server::start(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn state_dir(&self) -> PathBuf {
        self.path("state/imgcrypt/uploads")
    }

    /// imgctl with a clean environment: the server's keys in AWS_*, its own HOME and state.
    fn imgctl(&self, endpoint: &str) -> Command {
        let mut command = Command::new(binary("imgctl"));
        self.server
            .client_env(&mut command, endpoint, self.dir.path());
        command
    }

    fn upload(&self, endpoint: &str, file: &Path, key: &str) -> Command {
        let mut command = self.imgctl(endpoint);
        command
            .arg("upload")
            .arg(file)
            .arg(format!("s3://{BUCKET}/{key}"))
            .arg("--json");
        command
    }

    /// The state files (name → JSON).
    fn states(&self) -> Vec<serde_json::Value> {
        let Ok(entries) = fs::read_dir(self.state_dir()) else {
            return Vec::new();
        };
        entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| serde_json::from_slice(&fs::read(p).unwrap()).unwrap())
            .collect()
    }

    /// Fails if the secret key appears in `output` or any state file.
    fn assert_no_secret(&self, output: &Output) {
        let secret = &self.server.secret;
        for text in [&output.stdout, &output.stderr] {
            assert!(
                !String::from_utf8_lossy(text).contains(secret.as_str()),
                "the secret is in imgctl's output"
            );
        }
        if let Ok(entries) = fs::read_dir(self.state_dir()) {
            for entry in entries {
                let bytes = fs::read(entry.unwrap().path()).unwrap();
                assert!(!String::from_utf8_lossy(&bytes).contains(secret.as_str()));
            }
        }
    }
}

fn random_file(path: &Path, size: u64) -> String {
    let mut data = vec![0u8; size as usize];
    getrandom_fill(&mut data);
    fs::write(path, &data).unwrap();
    sha256_hex(&data)
}

fn getrandom_fill(data: &mut [u8]) {
    use std::io::Read;
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(data)
        .unwrap();
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn upload_downloads_to_the_file_with_the_size_and_etag_reported_and_verify_checks_them() {
    let setup = Setup::new();
    let endpoint = setup.server.endpoint.clone();
    let file = setup.path("disk.img");
    let sha = random_file(&file, 40 * MIB);
    let output = run_ok(&mut setup.upload(&endpoint, &file, "vm/disk.img"));
    setup.assert_no_secret(&output);
    let summary = json_event(&output.stdout, "summary");
    let etag = python_etag(&file, PART);
    assert!(etag.ends_with("-3"), "{etag}");
    assert_eq!(summary["etag"], etag.as_str(), "{summary}");
    assert_eq!(summary["size"], 40 * MIB);
    assert_eq!(summary["parts"], 3);
    assert_eq!(summary["part_size"], PART);
    // boto3 downloads exactly the file; the server's ETag is the one reported.
    assert_eq!(
        setup.server.object("vm/disk.img"),
        (sha, 40 * MIB, etag.clone())
    );
    assert!(setup.server.multipart_uploads().is_empty());
    assert!(
        setup.states().is_empty(),
        "the state is removed once complete"
    );

    // verify --etag: right accepted, wrong refused saying both.
    let verify = |args: &[&str]| {
        let mut command = setup.imgctl(&endpoint);
        command.arg("verify").arg(&file).args(args);
        run(&mut command)
    };
    let ok = verify(&["--etag", &format!("\"{etag}\"")]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("matches"));
    let wrong = format!("{}-3", "0".repeat(32));
    let refused = verify(&["--etag", &wrong]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains(&wrong) && stderr(&refused).contains(&etag),
        "{}",
        stderr(&refused)
    );
    // The part count is cross-checked: -4 cannot be 40 MiB in 16 MiB parts.
    let miscounted = verify(&["--etag", &format!("{}-4", &etag[..32])]);
    assert!(
        stderr(&miscounted).contains("--part-size"),
        "{}",
        stderr(&miscounted)
    );
    // Another part size gives another ETag.
    let other = verify(&["--etag", &etag, "--part-size", "8M"]);
    assert!(!other.status.success());
    // --object HEADs it.
    let object = verify(&["--object", &format!("s3://{BUCKET}/vm/disk.img"), "--json"]);
    assert!(object.status.success(), "{}", stderr(&object));
    assert_eq!(json_event(&object.stdout, "summary")["etag"], etag.as_str());

    // A small file is one part.
    let small = setup.path("small.img");
    random_file(&small, MIB + 5);
    let output = run_ok(&mut setup.upload(&endpoint, &small, "small.img"));
    let summary = json_event(&output.stdout, "summary");
    assert_eq!(summary["etag"], python_etag(&small, PART).as_str());
    assert_eq!(setup.server.object("small.img").1, MIB + 5);
}

#[test]
fn credentials_come_from_a_profile_and_a_readable_file_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new();
    let file = setup.path("disk.img");
    let sha = random_file(&file, 2 * MIB);
    let credentials = setup.path("credentials");
    fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = AKIAWRONG\naws_secret_access_key = wrong\n\
             [cos]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            setup.server.access_key, setup.server.secret
        ),
    )
    .unwrap();
    fs::set_permissions(&credentials, fs::Permissions::from_mode(0o600)).unwrap();
    let mut command = setup.upload(&setup.server.endpoint, &file, "p.img");
    command
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
        .args(["--profile", "cos"]);
    let output = run_ok(&mut command);
    setup.assert_no_secret(&output);
    assert!(!stderr(&output).contains("chmod"), "{}", stderr(&output));
    assert_eq!(setup.server.object("p.img").0, sha);

    fs::set_permissions(&credentials, fs::Permissions::from_mode(0o644)).unwrap();
    let output = run_ok(&mut command);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("chmod 600"),
        "a world-readable credentials file is warned about: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    // Without --profile the default profile's (wrong) keys are used and refused.
    let mut command = setup.upload(&setup.server.endpoint, &file, "p.img");
    command
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials);
    let refused = run(&mut command);
    assert!(
        stderr(&refused).contains("profile default in"),
        "{}",
        stderr(&refused)
    );
}

/// Starts an upload of `file` through `proxy`, throttled, and SIGKILLs imgctl once `parts`
/// parts are stored; returns the state left behind. The proxy is left unthrottled.
fn kill_after_parts(
    setup: &Setup,
    proxy: &Proxy,
    file: &Path,
    key: &str,
    parts: u64,
) -> serde_json::Value {
    proxy.configure(0.7, -1);
    let mut child = start_until(&mut setup.upload(&proxy.endpoint, file, key), |v| {
        v["event"] == "progress" && v["bytes_done"].as_u64().unwrap_or(0) >= parts * PART
    });
    child.kill().unwrap();
    child.wait().unwrap();
    proxy.configure(0.0, -1);
    let states = setup.states();
    assert_eq!(states.len(), 1, "the state is kept when imgctl is killed");
    states[0].clone()
}

fn stored_numbers(state: &serde_json::Value) -> Vec<u32> {
    state["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn a_killed_upload_resumes_uploading_only_the_missing_parts() {
    let setup = Setup::new();
    let file = setup.path("disk.img");
    let sha = random_file(&file, 6 * PART);
    let proxy = Proxy::start(&setup.server, &[]);
    let state = kill_after_parts(&setup, &proxy, &file, "big.img", 2);
    let stored = stored_numbers(&state);
    assert!(stored.len() >= 2 && stored.len() < 6, "{stored:?}");
    let upload_id = state["upload_id"].as_str().unwrap();
    // What the state records, the server holds (it may hold more: parts in flight).
    let on_server = setup.server.parts("big.img", upload_id);
    assert!(
        stored.iter().all(|n| on_server.contains(n)),
        "{stored:?} {on_server:?}"
    );
    let state_text = serde_json::to_string(&state).unwrap();
    assert!(!state_text.contains(&setup.server.secret));

    let output = run_ok(&mut setup.upload(&proxy.endpoint, &file, "big.img"));
    setup.assert_no_secret(&output);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("resuming the upload"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let (mut sent, failed, checksummed) = proxy.all_stats();
    assert_eq!(
        checksummed,
        sent.len() as u64,
        "every part carries its SHA-256"
    );
    sent.sort();
    let missing: Vec<u32> = (1..=6).filter(|n| !stored.contains(n)).collect();
    assert_eq!(sent, missing, "only the missing parts are uploaded");
    assert_eq!(failed, 0);
    let summary = json_event(&output.stdout, "summary");
    assert_eq!(summary["resumed"], true);
    let etag = python_etag(&file, PART);
    assert_eq!(setup.server.object("big.img"), (sha, 6 * PART, etag));
    assert!(setup.server.multipart_uploads().is_empty());
    assert!(setup.states().is_empty());
}

#[test]
fn ctrl_c_keeps_the_upload_and_says_how_to_resume() {
    let setup = Setup::new();
    let file = setup.path("disk.img");
    let sha = random_file(&file, 4 * PART);
    let proxy = Proxy::start(&setup.server, &["--delay", "0.7"]);
    let mut child = start_until(&mut setup.upload(&proxy.endpoint, &file, "i.img"), |v| {
        v["event"] == "progress" && v["bytes_done"].as_u64().unwrap_or(0) >= PART
    });
    assert_eq!(interrupt(&mut child), Some(130));
    let mut message = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut message).unwrap();
    assert!(
        message.contains(&format!(
            "run the same command again to resume, or `imgctl upload --abort s3://{BUCKET}/i.img`"
        )),
        "{message}"
    );
    assert_eq!(setup.states().len(), 1);
    assert_eq!(setup.server.multipart_uploads().len(), 1);
    proxy.configure(0.0, -1);
    let output = run_ok(&mut setup.upload(&proxy.endpoint, &file, "i.img"));
    assert_eq!(json_event(&output.stdout, "summary")["resumed"], true);
    assert_eq!(setup.server.object("i.img").0, sha);
    assert!(setup.server.multipart_uploads().is_empty());
}

#[test]
fn killed_with_every_part_stored_the_rerun_only_completes() {
    let setup = Setup::new();
    let file = setup.path("disk.img");
    // Two and a half parts: the stored prefix ends at the image's end, not a part boundary.
    let sha = random_file(&file, 2 * PART + PART / 2);
    let proxy = Proxy::start(&setup.server, &["--complete-delay", "30"]);
    let mut child = start_until(&mut setup.upload(&proxy.endpoint, &file, "k.img"), |v| {
        v["event"] == "progress" && v["bytes_done"] == v["bytes_total"]
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(stored_numbers(&setup.states()[0]), [1, 2, 3]);
    proxy.configure(0.0, -1);
    let output = run_ok(&mut setup.upload(&proxy.endpoint, &file, "k.img"));
    assert_eq!(proxy.stats().0, Vec::<u32>::new(), "no part is sent again");
    assert_eq!(json_event(&output.stdout, "summary")["resumed"], true);
    assert_eq!(setup.server.object("k.img").0, sha);
}

#[test]
fn a_changed_file_restarts_saying_why_and_abort_leaves_no_upload() {
    let setup = Setup::new();
    let file = setup.path("disk.img");
    random_file(&file, 4 * PART);
    let proxy = Proxy::start(&setup.server, &[]);
    let state = kill_after_parts(&setup, &proxy, &file, "c.img", 1);
    let old_id = state["upload_id"].as_str().unwrap().to_string();
    assert_eq!(setup.server.multipart_uploads().len(), 1);

    // Same size, other bytes (and mtime): the old upload is aborted, a new one made.
    std::thread::sleep(Duration::from_millis(20));
    let sha = random_file(&file, 4 * PART);
    let output = run_ok(&mut setup.upload(&proxy.endpoint, &file, "c.img"));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("starting over: the image or the parameters changed"),
        "{text}"
    );
    assert_eq!(setup.server.object("c.img").0, sha);
    let uploads = setup.server.multipart_uploads();
    assert!(
        uploads.is_empty(),
        "the old upload {old_id} is aborted: {uploads:?}"
    );

    // --abort removes an interrupted upload and its state.
    kill_after_parts(&setup, &proxy, &file, "d.img", 1);
    assert_eq!(setup.server.multipart_uploads().len(), 1);
    let abort = |setup: &Setup| {
        let mut command = setup.imgctl(&proxy.endpoint);
        command.args(["upload", "--abort", &format!("s3://{BUCKET}/d.img")]);
        run_ok(&mut command)
    };
    let output = abort(&setup);
    assert!(String::from_utf8_lossy(&output.stdout).contains("aborted the multipart upload"));
    assert!(setup.server.multipart_uploads().is_empty());
    assert!(setup.states().is_empty());
    let output = abort(&setup);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("nothing to abort"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn server_errors_are_clear_and_leave_no_multipart_upload() {
    let setup = Setup::new();
    let file = setup.path("disk.img");
    random_file(&file, 40 * MIB);
    let endpoint = setup.server.endpoint.clone();

    let mut wrong_secret = setup.upload(&endpoint, &file, "e.img");
    wrong_secret.env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let output = run(&mut wrong_secret);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("were refused by")
            && stderr(&output).contains("SignatureDoesNotMatch"),
        "{}",
        stderr(&output)
    );
    let mut wrong_key = setup.upload(&endpoint, &file, "e.img");
    wrong_key.env("AWS_ACCESS_KEY_ID", "AKIAIMGCRYPTNOSUCHKEY");
    let output = run(&mut wrong_key);
    assert!(
        stderr(&output).contains("InvalidAccessKeyId"),
        "{}",
        stderr(&output)
    );
    setup.assert_no_secret(&output);

    let mut command = setup.imgctl(&endpoint);
    command
        .arg("upload")
        .arg(&file)
        .arg("s3://no-such-bucket/e.img");
    let output = run(&mut command);
    assert!(
        stderr(&output).contains("bucket no-such-bucket does not exist at"),
        "{}",
        stderr(&output)
    );

    // A server that fails every part after the first: given up in seconds, upload aborted.
    let proxy = Proxy::start(&setup.server, &["--fail-after", "1"]);
    let started = Instant::now();
    let output = run(&mut setup.upload(&proxy.endpoint, &file, "e.img"));
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("cannot upload part of s3://imgcrypt-test/e.img (part ")
            && message.contains("500"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(proxy.stats().1 > 1, "the part upload was retried");
    assert!(
        setup.server.multipart_uploads().is_empty(),
        "no stray upload"
    );
    assert!(setup.states().is_empty(), "no state left");
}
