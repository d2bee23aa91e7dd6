//! Shared harness for the end-to-end tests: real binaries, real qemu-img, real cryptsetup.
//!
//! The binaries are the workspace's own builds (`cargo build --workspace` before the tests; the
//! README's test command does it). Nothing here is simulated: if a tool is missing the test
//! fails and says which.

#![allow(dead_code)]

pub mod guest;
pub mod raw_client;
pub mod s3;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Cheap keyslot settings: the tests are about data, not about PBKDF cost.
pub const CHEAP_PBKDF: &[&str] = &["--pbkdf", "pbkdf2", "--pbkdf-iterations", "1000"];

/// Directory holding imgcryptd and imgctl: `IMGCRYPT_BIN_DIR`, else the cargo profile directory
/// this test binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMGCRYPT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("profile dir")
        .to_path_buf()
}

/// Path of one of our binaries; panics with the fix if it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace` first (or set IMGCRYPT_BIN_DIR)",
        path.display()
    );
    path
}

/// Runs a command and returns its output; panics with stderr if it could not start.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn run_ok(command: &mut Command) -> Output {
    let output = run(command);
    run_ok_output(command, output)
}

/// Asserts that `command`, which gave `output`, succeeded.
fn run_ok_output(command: &Command, output: Output) -> Output {
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A scratch directory on an O_DIRECT-capable filesystem (/var/tmp, never tmpfs).
pub fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("IMGCRYPT_TEST_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::Builder::new()
        .prefix("imgcrypt-test-")
        .tempdir_in(base)
        .expect("scratch dir");
    // Unprivileged test users must be able to reach files inside.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Writes a valid key file (44 base64 characters, no newline) with mode 0600.
pub fn write_key(path: &Path) {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    fs::write(
        path,
        base64::engine::general_purpose::STANDARD.encode(bytes),
    )
    .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// qemu's LUKS code benchmarks PBKDF2 with `getrusage`, which on fast or loaded machines can
/// report no CPU time for a short run; qemu then fails with this message (a known qemu bug,
/// fixed upstream in 2025 by measuring longer). A retry measures again.
pub const QEMU_RUSAGE_FLAKE: &str = "Unable to get accurate CPU usage";

/// `qemu-img` with arguments; must succeed. Retried when qemu hits [`QEMU_RUSAGE_FLAKE`], which
/// happens to about one `create` in four on the project machine when idle (more under load): a
/// dozen tries make a spurious failure negligible.
pub fn qemu_img(args: &[&str]) -> Output {
    for _ in 0..11 {
        let output = run(Command::new("qemu-img").args(args));
        let flaked = !output.status.success()
            && String::from_utf8_lossy(&output.stderr).contains(QEMU_RUSAGE_FLAKE);
        if !flaked {
            return run_ok_output(Command::new("qemu-img").args(args), output);
        }
    }
    run_ok(Command::new("qemu-img").args(args))
}

/// `qemu-io -c CMD FILE` with the format given; must succeed.
pub fn qemu_io(format: &str, file: &Path, commands: &[&str]) {
    let mut command = Command::new("qemu-io");
    command.args(["-f", format]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.arg(file);
    run_ok(&mut command);
}

/// Source formats the tests make with qemu-img.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Raw (sparse).
    Raw,
    /// VHD fixed.
    VhdFixed,
    /// VHD dynamic.
    VhdDynamic,
}

/// Makes a source image of `size` with scattered data and holes, returns its path.
pub fn make_source(dir: &Path, kind: SourceKind, size: &str) -> PathBuf {
    let (name, format, options): (&str, &str, &[&str]) = match kind {
        SourceKind::Raw => ("src.raw", "raw", &[]),
        SourceKind::VhdFixed => ("src-fixed.vhd", "vpc", &["-o", "subformat=fixed"]),
        SourceKind::VhdDynamic => ("src-dynamic.vhd", "vpc", &["-o", "subformat=dynamic"]),
    };
    let path = dir.join(name);
    qemu_create(&path, format, options, size);
    // Data at the start, mid-block, across a 2 MiB VHD block boundary, and at the very end;
    // holes in between. Offsets scale with the size so small images get the same shape.
    let bytes = parse_size(size);
    let block_boundary = (bytes / 2) & !((2 << 20) - 1);
    let straddle = block_boundary.checked_sub(4096).unwrap_or(bytes / 2);
    let writes = [
        (0x11, 0, 64 << 10),
        (0x22, bytes / 4 + 3 * 1024, 5 << 10),
        (0x33, straddle, 8 << 10),
        (0x44, bytes - (256 << 10) - 4096, 256 << 10),
    ];
    qemu_write(format, &path, &writes);
    path
}

/// `qemu-img create -q -f FORMAT ARGS PATH SIZE` (`ARGS` such as `-o subformat=dynamic`).
pub fn qemu_create(path: &Path, format: &str, args: &[&str], size: &str) {
    let mut all = vec!["create", "-q", "-f", format];
    all.extend_from_slice(args);
    all.extend([path.to_str().unwrap(), size]);
    qemu_img(&all);
}

/// `qemu-io` writes of `(pattern, offset, length)` into `path`, read as `format`.
pub fn qemu_write(format: &str, path: &Path, writes: &[(u8, u64, u64)]) {
    let commands: Vec<String> = writes
        .iter()
        .map(|(pattern, offset, length)| format!("write -P {pattern:#x} {offset} {length}"))
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(format, path, &commands);
}

/// Bytes in a qemu-style size ("12M", "4G", "1048576").
pub fn parse_size(size: &str) -> u64 {
    let (digits, unit) = match size.strip_suffix(['K', 'M', 'G']) {
        Some(digits) => (digits, &size[digits.len()..]),
        None => (size, ""),
    };
    let shift = match unit {
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => 0,
    };
    digits.parse::<u64>().expect("numeric size") << shift
}

/// qemu's format name for a source we made. Always passed explicitly: without `-f vpc`, qemu
/// probes a fixed VHD as raw and leaks its footer (the seed recipe's bug).
pub fn qemu_format(source: &Path) -> &'static str {
    match source.extension().and_then(|e| e.to_str()) {
        Some("vhd") => "vpc",
        Some("vhdx") => "vhdx",
        Some("vmdk") => "vmdk",
        _ => "raw",
    }
}

/// The source's plaintext as qemu sees it.
pub fn qemu_plaintext(source: &Path, out: &Path) {
    qemu_plaintext_as(qemu_format(source), source, out);
}

/// The plaintext of `source` read by qemu as `format`.
pub fn qemu_plaintext_as(format: &str, source: &Path, out: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        format,
        "-O",
        "raw",
        source.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
}

/// The `--object` that hands qemu the key file's bytes as secret `s0`: the passphrase of every
/// qcow2+LUKS image imgcrypt writes.
pub fn qemu_secret(key: &Path) -> String {
    format!("secret,id=s0,file={}", key.display())
}

/// `--image-opts` of an encrypted qcow2 opened with secret `s0` ([`qemu_secret`]).
pub fn encrypted_qcow2_opts(image: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        image.display()
    )
}

/// An empty qcow2 encrypted by qemu-img (LUKS, the secret `s0` read from `key`, a 10 ms PBKDF)
/// at `image`, of `size` (qemu-img's syntax).
pub fn qemu_create_encrypted_qcow2(image: &Path, key: &Path, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        &qemu_secret(key),
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        image.to_str().unwrap(),
        size,
    ]);
}

/// What qemu reads from the encrypted qcow2 `image` opened with `key`: its `convert -O raw`,
/// written to `out`.
pub fn qemu_decrypt_qcow2(image: &Path, key: &Path, out: &Path) {
    qemu_img(&[
        "convert",
        "--object",
        &qemu_secret(key),
        "--image-opts",
        &encrypted_qcow2_opts(image),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ]);
}

/// The key hash vhd-util stores and prints, computed here: SHA-256(32 zero bytes ‖ key), hex.
pub fn vhd_key_hash(raw: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::new()
        .chain_update([0u8; 32])
        .chain_update(raw)
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What qemu-img says of an encrypted qcow2 opened with `key`: `check` finds no errors and no
/// leaks, and `compare` with `source` (read as `source_format`) says identical. `compare` asks
/// the formats which ranges hold data, so a mostly empty 10 GiB image is compared in seconds.
pub fn assert_qemu_check_and_compare(image: &Path, key: &Path, source: &Path, source_format: &str) {
    let object = qemu_secret(key);
    let opts = encrypted_qcow2_opts(image);
    let check = qemu_img(&["check", "--object", &object, "--image-opts", &opts]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("No errors were found on the image"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
    let source_opts = format!("driver={source_format},file.filename={}", source.display());
    let compare = qemu_img(&[
        "compare",
        "--object",
        &object,
        "--image-opts",
        &opts,
        &source_opts,
    ]);
    assert!(
        String::from_utf8_lossy(&compare.stdout).contains("Images are identical"),
        "{}",
        describe(&compare)
    );
}

/// The source's virtual size as `qemu-img info` reports it.
pub fn qemu_virtual_size(source: &Path) -> u64 {
    let format = qemu_format(source);
    let info = qemu_img(&[
        "info",
        "-f",
        format,
        "--output=json",
        source.to_str().unwrap(),
    ]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

/// A running imgcryptd bound to a private socket, stopped on drop.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts imgcryptd on `dir/sock/io.imgcrypt` with `extra` arguments and waits for it
    /// (without its start-up PBKDF benchmark unless `extra` has `--startup-benchmark`).
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(dir, extra, &[])
    }

    /// [`Daemon::start`] with extra environment variables (e.g. the debug builds' crash hook
    /// `IMGCRYPTD_CRASH_AT`). The log is appended to, so a restarted daemon keeps the old lines.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_under(dir, &[], extra, env)
    }

    /// [`Daemon::start_with_env`] run through `wrapper` (a program and its arguments that
    /// executes the rest of its command line, such as `prlimit --nofile=1024:20000 --`); the
    /// child's pid is then still the daemon's.
    pub fn start_under(dir: &Path, wrapper: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Self {
        let socket = dir.join("sock").join("io.imgcrypt");
        let log = dir.join("imgcryptd.log");
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(binary("imgcryptd"));
                command
            }
            None => Command::new(binary("imgcryptd")),
        };
        // No start-up benchmark unless a test asks for it (`--startup-benchmark` in `extra`
        // overrides this): it would make tests that count benchmarks depend on timing, and
        // every test daemon would spend seconds of CPU on it.
        let child = command
            .arg("--socket")
            .arg(&socket)
            .arg("--no-startup-benchmark")
            // Resume checkpoints of its own, never the host's /var/lib/imgcrypt.
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .envs(env.iter().copied())
            .env("IMGCRYPTD_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start imgcryptd");
        let mut daemon = Self { child, socket, log };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("imgcryptd exited at start ({status}):\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("imgcryptd did not listen within 10 s:\n{}", self.log_text());
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An imgctl command aimed at this daemon.
    pub fn imgctl(&self) -> Command {
        let mut command = Command::new(binary("imgctl"));
        command.arg("--socket").arg(&self.socket);
        command
    }

    /// `imgctl encrypt SOURCE -o OUTPUT --key-file KEY` aimed at this daemon, with cheap keyslot
    /// settings; callers add options.
    pub fn encrypt(&self, source: &Path, output: &Path, key: &Path) -> Command {
        let mut command = self.imgctl();
        encrypt_arguments(&mut command, source, output, key);
        command
    }

    /// `imgctl encrypt SOURCE -o OUTPUT --key-file KEY` aimed at this daemon and nothing else
    /// (no key-derivation options: a VHD output has none and refuses them); callers add options.
    pub fn encrypt_keyed(
        &self,
        source: impl AsRef<OsStr>,
        output: impl AsRef<OsStr>,
        key: impl AsRef<OsStr>,
    ) -> Command {
        self.job("encrypt", source, "-o", output, key)
    }

    /// `imgctl decrypt IMAGE -o OUTPUT --key-file KEY` aimed at this daemon.
    pub fn decrypt(
        &self,
        image: impl AsRef<OsStr>,
        output: impl AsRef<OsStr>,
        key: impl AsRef<OsStr>,
    ) -> Command {
        self.job("decrypt", image, "-o", output, key)
    }

    /// `imgctl verify IMAGE --source SOURCE --key-file KEY` aimed at this daemon.
    pub fn verify(
        &self,
        image: impl AsRef<OsStr>,
        source: impl AsRef<OsStr>,
        key: impl AsRef<OsStr>,
    ) -> Command {
        self.job("verify", image, "--source", source, key)
    }

    /// `imgctl VERB FIRST FLAG SECOND --key-file KEY`.
    fn job(
        &self,
        verb: &str,
        first: impl AsRef<OsStr>,
        flag: &str,
        second: impl AsRef<OsStr>,
        key: impl AsRef<OsStr>,
    ) -> Command {
        let mut command = self.imgctl();
        command
            .args([
                verb.as_ref(),
                first.as_ref(),
                flag.as_ref(),
                second.as_ref(),
            ])
            .arg("--key-file")
            .arg(key);
        command
    }

    /// Fails the test unless the imgctl run `result` succeeded, showing what it printed and the
    /// daemon's log, prefixed with `what`.
    pub fn assert_ok(&self, result: &Output, what: impl std::fmt::Display) {
        assert!(
            result.status.success(),
            "{what}: {}\ndaemon log:\n{}",
            describe(result),
            self.log_text()
        );
    }

    /// How many descriptors the daemon has open now (`/proc/PID/fd`).
    pub fn open_descriptors(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// Waits (up to 10 s) until the daemon holds no more descriptors than `baseline`; on
    /// timeout the panic lists what it still holds.
    pub fn wait_for_descriptors(&self, baseline: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.open_descriptors() > baseline {
            if std::time::Instant::now() >= deadline {
                let held: Vec<String> = fs::read_dir(format!("/proc/{}/fd", self.child.id()))
                    .unwrap()
                    .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
                    .map(|target| target.display().to_string())
                    .collect();
                panic!(
                    "the daemon holds {} descriptors, {baseline} before: {held:?}",
                    held.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes a key file at `path` with `imgctl key generate -o`; returns the path.
pub fn generate_key(path: &Path) -> PathBuf {
    run_ok(
        Command::new(binary("imgctl"))
            .args(["key", "generate", "-o"])
            .arg(path),
    );
    path.to_path_buf()
}

/// What a key-rotation test starts from: generated key files in a directory and the ring
/// `keys.toml` beside them that rotates from `old` to `new`.
pub struct RotationKeys {
    /// `old.key`: what the image opens with before the rotation (the ring's last decryption key).
    pub old: PathBuf,
    /// `new.key`: the ring's encryption key.
    pub new: PathBuf,
    /// Further decryption keys, in the ring before `old` (decryption_key1, 2, ...).
    pub others: Vec<PathBuf>,
    /// The ring file.
    pub ring: PathBuf,
}

/// Generates `old.key`, `new.key` and `others` (file names) in `dir` and writes the ring
/// `dir/keys.toml`: `encryption_key = "new.key"`, then `others` and `old.key` as
/// decryption_key1, 2, ...
pub fn rotation_keys(dir: &Path, others: &[&str]) -> RotationKeys {
    let old = generate_key(&dir.join("old.key"));
    let new = generate_key(&dir.join("new.key"));
    let others: Vec<PathBuf> = others
        .iter()
        .map(|name| generate_key(&dir.join(name)))
        .collect();
    let mut text = "encryption_key = \"new.key\"\n".to_string();
    let decryption = others.iter().chain([&old]);
    for (number, key) in (1..).zip(decryption) {
        let name = key.file_name().unwrap().to_string_lossy();
        text.push_str(&format!("decryption_key{number} = \"{name}\"\n"));
    }
    let ring = dir.join("keys.toml");
    fs::write(&ring, text).unwrap();
    RotationKeys {
        old,
        new,
        others,
        ring,
    }
}

/// `imgctl --keyring RING rewrite -k IMAGE` with `pbkdf` (keyslot options, e.g. [`CHEAP_PBKDF`]).
pub fn rewrite_k(daemon: &Daemon, ring: &Path, image: &Path, pbkdf: &[&str]) -> Command {
    let mut command = daemon.imgctl();
    command
        .arg("--keyring")
        .arg(ring)
        .args(["rewrite", "-k"])
        .arg(image)
        .args(pbkdf);
    command
}

/// What most end-to-end tests start from: a scratch directory, a daemon serving it, and a key
/// file `k` in it ([`write_key`]). Bind all three for the test's length, the directory first,
/// so that the daemon stops before the directory is removed.
pub fn daemon_and_key() -> (tempfile::TempDir, Daemon, PathBuf) {
    let scratch_dir = scratch();
    let daemon = Daemon::start(scratch_dir.path(), &[]);
    let key = scratch_dir.path().join("k");
    write_key(&key);
    (scratch_dir, daemon, key)
}

/// Appends `encrypt SOURCE -o OUTPUT --key-file KEY` and cheap keyslot settings to an imgctl
/// command.
pub fn encrypt_arguments(command: &mut Command, source: &Path, output: &Path, key: &Path) {
    encrypt_arguments_keyed(command, source, output, key).args(CHEAP_PBKDF);
}

/// `encrypt SOURCE -o OUTPUT --key-file KEY` and nothing else (no key-derivation options: a VHD
/// output has no key derivation and refuses them).
pub fn encrypt_arguments_keyed<'c>(
    command: &'c mut Command,
    source: &Path,
    output: &Path,
    key: &Path,
) -> &'c mut Command {
    command
        .arg("encrypt")
        .arg(source)
        .arg("-o")
        .arg(output)
        .arg("--key-file")
        .arg(key)
}

/// Starts the imgctl job `command` (with `--json`) and reads its lines until `until` says one
/// is the moment to act on the running job; fails the test if the job's summary comes first.
/// Its stdout stays open in the returned child (so that imgctl's next lines do not meet a
/// closed pipe), unread from there on; its stderr is piped.
pub fn start_until(command: &mut Command, until: impl Fn(&serde_json::Value) -> bool) -> Child {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let came = loop {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break false;
        }
        let value: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        if until(&value) {
            break true;
        }
        if value["event"] == "summary" {
            break false;
        }
    };
    if !came {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the job finished (or imgctl's output ended) before the moment came: {line}");
    }
    child.stdout = Some(stdout.into_inner());
    child
}

/// Interrupts imgctl as Ctrl-C does (SIGINT) and waits for it: its exit code.
pub fn interrupt(child: &mut Child) -> Option<i32> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    child.wait().unwrap().code()
}

/// The `--json` line of `imgctl` whose `event` is `event` (e.g. `summary`), whole.
pub fn json_event(stdout: &[u8], event: &str) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == event)
        .unwrap_or_else(|| panic!("no {event} line in:\n{text}"))
}

/// The `summary` object of `imgctl encrypt --json`'s output.
pub fn last_json_summary(stdout: &[u8]) -> serde_json::Value {
    json_event(stdout, "summary")["summary"].clone()
}

/// What `cryptsetup luksDump` says about an image's data segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksFacts {
    /// 1 or 2.
    pub version: u32,
    /// Cipher spec.
    pub cipher: String,
    /// Bytes.
    pub data_offset: u64,
    /// Bytes.
    pub sector_size: u64,
}

/// Parses `cryptsetup luksDump IMAGE`.
pub fn luks_dump(image: &Path) -> LuksFacts {
    let output = run_ok(Command::new("cryptsetup").arg("luksDump").arg(image));
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let field = |name: &str| -> Option<String> {
        text.lines().find_map(|line| {
            line.trim()
                .strip_prefix(name)
                .map(|rest| rest.trim().to_string())
        })
    };
    let version: u32 = field("Version:").expect("Version").parse().unwrap();
    if version == 1 {
        let cipher = format!(
            "{}-{}",
            field("Cipher name:").unwrap(),
            field("Cipher mode:").unwrap()
        );
        let offset_sectors: u64 = field("Payload offset:").unwrap().parse().unwrap();
        LuksFacts {
            version,
            cipher,
            data_offset: offset_sectors * 512,
            sector_size: 512,
        }
    } else {
        let number =
            |value: String| -> u64 { value.split_whitespace().next().unwrap().parse().unwrap() };
        LuksFacts {
            version,
            cipher: field("cipher:").expect("cipher"),
            data_offset: number(field("offset:").expect("offset")),
            sector_size: number(field("sector:").expect("sector")),
        }
    }
}

/// Decrypts `image`'s payload with an implementation independent of ours and returns the
/// plaintext path: the volume key from `cryptsetup luksDump --dump-volume-key`, the data from
/// Python `cryptography`.
pub fn independent_decrypt(image: &Path, key_file: &Path, dir: &Path) -> PathBuf {
    let facts = luks_dump(image);
    let volume_key = dir.join(format!(
        "{}.vk",
        image.file_name().unwrap().to_str().unwrap()
    ));
    let _ = fs::remove_file(&volume_key);
    run_ok(
        Command::new("cryptsetup")
            .args(["luksDump", "--dump-volume-key", "-q", "--volume-key-file"])
            .arg(&volume_key)
            .arg("--key-file")
            .arg(key_file)
            .arg(image),
    );
    let plaintext = dir.join(format!(
        "{}.plain",
        image.file_name().unwrap().to_str().unwrap()
    ));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/luks_decrypt.py");
    run_ok(
        Command::new("python3")
            .arg(script)
            .arg(image)
            .arg(&volume_key)
            .arg(facts.data_offset.to_string())
            .arg(facts.sector_size.to_string())
            .arg(&plaintext),
    );
    plaintext
}

/// Asserts `plaintext` starts with exactly `expected`'s bytes and is zero after them.
pub fn assert_plaintext_matches(plaintext: &Path, expected: &Path) {
    let got = fs::read(plaintext).unwrap();
    let want = fs::read(expected).unwrap();
    assert!(
        got.len() >= want.len(),
        "decrypted payload ({} bytes) shorter than the source ({} bytes)",
        got.len(),
        want.len()
    );
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("decrypted payload differs from the source at byte {at}");
    }
    if let Some(at) = got[want.len()..].iter().position(|&b| b != 0) {
        panic!(
            "padding after the source is not zero at byte {}",
            want.len() + at
        );
    }
}

/// `cryptsetup open --test-passphrase --key-file KEY IMAGE`.
pub fn test_passphrase(image: &Path, key_file: &Path) -> bool {
    run(Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(key_file)
        .arg(image))
    .status
    .success()
}

/// Writes a `size`-byte source whose every 512-byte sector differs (xorshift), so a sector
/// written to the wrong place, or encrypted with the wrong IV, shows.
pub fn write_distinct_sectors(path: &Path, size: usize) {
    let mut bytes = vec![0u8; size];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    fs::write(path, bytes).unwrap();
}

/// Writes `bytes` to a new file.
pub fn write_file(path: &Path, bytes: &[u8]) {
    let mut file = fs::File::create(path).unwrap();
    file.write_all(bytes).unwrap();
}

/// A new directory `name` in `parent`, mode 0755 so that the test users can reach what the
/// test puts there (each file's owner and mode decide the rest).
pub fn shared_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A plaintext of `size` bytes that an attacker must not learn (`PASSWORD=hunter2 ` repeated
/// over 272 KiB, then zeros), or guesses at: the hostile tests look for it in what they get.
pub fn write_secret(path: &Path, size: usize) {
    let mut bytes = b"PASSWORD=hunter2 ".repeat(1 << 14);
    bytes.resize(size, 0);
    write_file(path, &bytes);
}

/// stdout and stderr of an output, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A varlink call of `method` passing `input` opened read-only as descriptor 0 and the
/// existing file `output` opened read-write as descriptor 1 (a job's source or image, and its
/// output), as `imgctl` passes them.
pub fn varlink_in_out(
    socket: &Path,
    method: &str,
    parameters: serde_json::Value,
    input: &Path,
    output: &Path,
) -> imgcrypt_proto::varlink::Reply {
    use std::os::fd::AsFd;
    let input = fs::File::open(input).unwrap();
    let output = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(output)
        .unwrap();
    varlink_call(socket, method, parameters, &[input.as_fd(), output.as_fd()])
}

/// One Varlink call over a fresh connection, with `fds` passed alongside, as imgctl would make
/// it but without imgctl's own checks. Asks for `more` and returns the final reply (partial ones
/// are skipped). Panics if the daemon hangs up first or is silent for 60 s.
pub fn varlink_call(
    socket: &Path,
    method: &str,
    parameters: serde_json::Value,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> imgcrypt_proto::varlink::Reply {
    use imgcrypt_proto::varlink::{Call, Reply};
    use imgcrypt_proto::wire::{self, FrameDecoder, MAX_FRAME_LEN};
    use std::io::Read;
    use std::os::fd::AsFd;

    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let call = Call {
        method: method.to_string(),
        parameters: Some(parameters),
        more: true,
        oneway: false,
        upgrade: false,
    };
    imgcrypt_proto::fdpass::send_with_fds(stream.as_fd(), &wire::encode(&call), fds).unwrap();
    let mut decoder = FrameDecoder::new(4 * MAX_FRAME_LEN);
    let mut buffer = [0u8; 4096];
    loop {
        while let Some(frame) = decoder.next_frame().unwrap() {
            let reply: Reply = serde_json::from_slice(&frame).unwrap();
            if !reply.continues {
                return reply;
            }
        }
        let n = stream.read(&mut buffer).unwrap();
        assert!(
            n > 0,
            "imgcryptd closed the connection before the final reply"
        );
        decoder.extend(&buffer[..n]);
    }
}

/// A key file's fingerprint (base64 of its SHA-256) computed by coreutils, not by our code.
pub fn coreutils_fingerprint(path: &Path) -> String {
    let output = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("sha256sum \"$1\" | cut -d' ' -f1 | xxd -r -p | base64 -w0")
            .arg("sh")
            .arg(path),
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The user the single-user unprivileged tests run as.
pub const TEST_USER: &str = "imgcrypt-test";
/// Two users for the hostile-user tests: the victim owns an image, the attacker tries to get at it.
pub const VICTIM_USER: &str = "imgcrypt-victim";
/// See [`VICTIM_USER`].
pub const ATTACKER_USER: &str = "imgcrypt-attacker";

/// An unprivileged system user created by the tests.
#[derive(Debug, Clone, Copy)]
pub struct TestUser {
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

impl TestUser {
    /// `program` run as this user with no supplementary groups (util-linux `setpriv` by path:
    /// busybox's applet lacks the options).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("/usr/bin/setpriv");
        command
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg(program);
        command
    }

    /// imgctl run as this user against `daemon`.
    pub fn imgctl(&self, daemon: &Daemon) -> Command {
        let mut command = self.command(binary("imgctl"));
        command.arg("--socket").arg(&daemon.socket);
        command
    }

    /// Gives `paths` to this user (owner and group).
    pub fn own(&self, paths: &[&Path]) {
        for path in paths {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).unwrap();
        }
    }

    /// Runs `body` in a thread whose real, effective and saved uid and gid are this user's, so
    /// a test can open sockets and files with the user's own rights without a helper binary.
    /// Only the thread changes (raw `setresuid`, not glibc's process-wide wrapper).
    pub fn in_thread<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> T {
        let (uid, gid) = (self.uid, self.gid);
        std::thread::spawn(move || {
            // SAFETY: raw system calls that change only the calling thread's credentials; the
            // arguments are plain integers and the results are checked.
            unsafe {
                assert_eq!(libc_setgroups_none(), 0, "setgroups");
                assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
            }
            body()
        })
        .join()
        .expect("test thread panicked")
    }
}

/// Drops the calling thread's supplementary groups (raw system call: thread-local).
///
/// # Safety
/// Plain system call with no pointers.
unsafe fn libc_setgroups_none() -> libc::c_long {
    // SAFETY: a zero-length list with a null pointer is valid for setgroups.
    unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) }
}

/// The unprivileged user `name`, created (system user, no home, no shell) if it does not exist.
pub fn test_user(name: &str) -> TestUser {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates a user and must run as root"
    );
    // Tests run in parallel: another may be creating it (useradd exits 10 while /etc/passwd is
    // locked) or have created it first (exit 9).
    let mut attempts = 0;
    while nix::unistd::User::from_name(name).unwrap().is_none() {
        let output = run(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]));
        attempts += 1;
        match output.status.code() {
            Some(0 | 9) => {}
            Some(10) if attempts < 100 => std::thread::sleep(Duration::from_millis(50)),
            _ => panic!("useradd {name}: {}", describe(&output)),
        }
    }
    let user = nix::unistd::User::from_name(name).unwrap().unwrap();
    TestUser {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }
}

/// The victim and the attacker of the hostile-user tests.
pub fn two_users() -> (TestUser, TestUser) {
    (test_user(VICTIM_USER), test_user(ATTACKER_USER))
}

/// A root daemon anyone may connect to, with a key ring whose encryption key is `dir/ring.key`.
pub fn daemon_with_ring(dir: &Path) -> Daemon {
    let keys = dir.join("ring");
    fs::create_dir(&keys).unwrap();
    write_key(&keys.join("ring.key"));
    let ring = dir.join("keys.toml");
    fs::write(&ring, "encryption_key = \"ring/ring.key\"\n").unwrap();
    fs::set_permissions(&ring, fs::Permissions::from_mode(0o600)).unwrap();
    Daemon::start(
        dir,
        &["--socket-mode", "0666", "--keyring", ring.to_str().unwrap()],
    )
}

/// The journald `MESSAGE_ID` of the daemon's audit records (daemon/src/jobs/audit.rs).
pub const AUDIT_MESSAGE_ID: &str = "35db536a90ca4c43b8300e87186d9a9a";

/// The audit records in a daemon's stderr log (target `imgcryptd::audit`), each as its fields
/// (`job_id`, `result`, ...) plus `message`, the text before the fields.
pub fn audit_records(log: &str) -> Vec<std::collections::HashMap<String, String>> {
    log.lines()
        .filter_map(|line| line.split_once(" imgcryptd::audit: "))
        .map(|(_, rest)| {
            let mut fields = std::collections::HashMap::new();
            let mut message = Vec::new();
            for word in rest.split_whitespace() {
                match word.split_once('=') {
                    Some((name, value))
                        if !name.is_empty()
                            && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') =>
                    {
                        fields.insert(name.to_string(), value.trim_matches('"').to_string());
                    }
                    _ => message.push(word),
                }
            }
            fields.insert("message".to_string(), message.join(" "));
            fields
        })
        .collect()
}

/// `imgctl daemon status --json` by `command` (an imgctl aimed at the daemon), parsed.
pub fn daemon_status(mut command: Command) -> serde_json::Value {
    let output = run_ok(command.args(["daemon", "status", "--json"]));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "daemon status --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A root daemon every test user may connect to (socket mode 0666), with `extra` flags.
pub fn shared_daemon(dir: &Path, extra: &[&str]) -> Daemon {
    let mut arguments = vec!["--socket-mode", "0666"];
    arguments.extend_from_slice(extra);
    Daemon::start(dir, &arguments)
}

/// A directory `dir/name` owned by `user` holding a raw source of `size` (see
/// [`make_source`]), a key and room for outputs: `(home, source, key)`.
pub fn user_files(
    dir: &Path,
    user: TestUser,
    name: &str,
    size: &str,
) -> (PathBuf, PathBuf, PathBuf) {
    let home = shared_dir(dir, name);
    let source = make_source(&home, SourceKind::Raw, size);
    let key = home.join("key");
    write_key(&key);
    user.own(&[&home, &source, &key]);
    (home, source, key)
}
