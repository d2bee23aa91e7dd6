//! A real S3 server for the upload tests: moto's server (PyPI `moto[server]`, installed by
//! scripts/install-deps) on 127.0.0.1 and a free port, with IAM authentication on (after the
//! three unauthenticated calls that create the test user, its policy and its access key), so
//! wrong credentials are refused by the server itself; and tests/support/s3_proxy.py, a reverse
//! proxy in front of it that throttles or fails UploadPart requests and counts them. Both are
//! killed on drop. boto3 (an independent client) checks what arrived.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bucket every server starts with.
pub const BUCKET: &str = "imgcrypt-test";

/// A running moto server with a user, its keys and [`BUCKET`].
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The user's access key id.
    pub access_key: String,
    /// The user's secret key.
    pub secret: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl S3Server {
    /// Starts moto and waits until it answers; creates the user, keys and bucket.
    pub fn start() -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (scripts/install-deps installs moto[server])");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key: String::new(),
            secret: String::new(),
        };
        let out = server.python_as(
            "x",
            "x",
            r#"
import json
iam = boto3.client("iam", **kw)
iam.create_user(UserName="imgcrypt")
iam.put_user_policy(UserName="imgcrypt", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="imgcrypt")["AccessKey"]
s3 = boto3.client("s3", **dict(kw, aws_access_key_id=key["AccessKeyId"],
                               aws_secret_access_key=key["SecretAccessKey"]))
s3.create_bucket(Bucket=sys.argv[1])
print(key["AccessKeyId"], key["SecretAccessKey"])
"#,
            &[BUCKET],
        );
        let text = String::from_utf8(out).unwrap();
        let (id, secret) = text.trim().split_once(' ').expect("keys");
        server.access_key = id.into();
        server.secret = secret.into();
        server
    }

    fn python_as(&self, id: &str, secret: &str, code: &str, args: &[&str]) -> Vec<u8> {
        let preamble = "import boto3, hashlib, json, sys, os\n\
             kw = dict(endpoint_url=os.environ['S3_ENDPOINT'], region_name='us-east-1',\n\
                       aws_access_key_id=os.environ['S3_ID'], aws_secret_access_key=os.environ['S3_SECRET'])\n\
             s3 = boto3.client('s3', **kw)\n";
        let output = Command::new("python3")
            .arg("-c")
            .arg(format!("{preamble}{code}"))
            .args(args)
            .env("S3_ENDPOINT", &self.endpoint)
            .env("S3_ID", id)
            .env("S3_SECRET", secret)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "boto3 failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// Runs Python with `s3` a boto3 client of the test user; `sys.argv[1:]` = `args`.
    pub fn python(&self, code: &str, args: &[&str]) -> String {
        String::from_utf8(self.python_as(&self.access_key, &self.secret, code, args)).unwrap()
    }

    /// Points an imgctl `command` at this server through `endpoint` (the server's or a proxy's)
    /// with the test user's keys in `AWS_*`, and gives it its own HOME and state directory under
    /// `dir` (no `AWS_*` of the test's environment leaks in).
    pub fn client_env(&self, command: &mut Command, endpoint: &str, dir: &Path) {
        for (name, _) in std::env::vars() {
            if name.starts_with("AWS_") {
                command.env_remove(name);
            }
        }
        std::fs::create_dir_all(dir.join("home")).unwrap();
        command
            .env("HOME", dir.join("home"))
            .env("XDG_STATE_HOME", dir.join("state"))
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_ENDPOINT_URL", endpoint);
    }

    /// Downloads an object of [`BUCKET`] to `path` with boto3.
    pub fn download(&self, key: &str, path: &Path) {
        self.python(
            "s3.download_file(sys.argv[1], sys.argv[2], sys.argv[3])",
            &[BUCKET, key, path.to_str().unwrap()],
        );
    }

    /// The multipart uploads in progress in [`BUCKET`]: (key, upload id).
    pub fn multipart_uploads(&self) -> Vec<(String, String)> {
        let text = self.python(
            "for u in s3.list_multipart_uploads(Bucket=sys.argv[1]).get('Uploads', []):\n    \
             print(u['Key'], u['UploadId'])",
            &[BUCKET],
        );
        text.lines()
            .map(|l| {
                let (k, id) = l.split_once(' ').unwrap();
                (k.to_string(), id.to_string())
            })
            .collect()
    }

    /// The part numbers the server holds for an upload.
    pub fn parts(&self, key: &str, upload_id: &str) -> Vec<u32> {
        let text = self.python(
            "r = s3.list_parts(Bucket=sys.argv[1], Key=sys.argv[2], UploadId=sys.argv[3])\n\
             print(' '.join(str(p['PartNumber']) for p in r.get('Parts', [])))",
            &[BUCKET, key, upload_id],
        );
        text.split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    }

    /// Downloads an object with boto3: (hex SHA-256, size, ETag without quotes).
    pub fn object(&self, key: &str) -> (String, u64, String) {
        let text = self.python(
            "o = s3.get_object(Bucket=sys.argv[1], Key=sys.argv[2])\n\
             data = o['Body'].read()\n\
             print(hashlib.sha256(data).hexdigest(), len(data), o['ETag'].strip('\"'))",
            &[BUCKET, key],
        );
        let fields: Vec<&str> = text.split_whitespace().collect();
        (
            fields[0].to_string(),
            fields[1].parse().unwrap(),
            fields[2].to_string(),
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The multipart ETag of a file cut into `part_size` parts, computed by Python's hashlib.
pub fn python_etag(file: &Path, part_size: u64) -> String {
    let output = Command::new("python3")
        .arg("-c")
        .arg(
            "import hashlib, sys\n\
             size = int(sys.argv[2]); digests = []; n = 0\n\
             with open(sys.argv[1], 'rb') as f:\n    \
                 while True:\n        \
                     part = f.read(size)\n        \
                     if not part and n: break\n        \
                     digests.append(hashlib.md5(part).digest()); n += 1\n        \
                     if len(part) < size: break\n\
             print(hashlib.md5(b''.join(digests)).hexdigest() + '-' + str(n))",
        )
        .arg(file)
        .arg(part_size.to_string())
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// tests/support/s3_proxy.py in front of a server, with its options (`--delay S`,
/// `--fail-after N`).
pub struct Proxy {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Proxy {
    /// Starts the proxy and reads its port.
    pub fn start(server: &S3Server, options: &[&str]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/s3_proxy.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--upstream", &server.endpoint])
            .args(options)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the proxy's port");
        Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Changes the options (`delay` seconds before each UploadPart; fail UploadParts after
    /// `fail_after`, -1 never) and resets the counts.
    pub fn configure(&self, delay: f64, fail_after: i64) {
        let output = Command::new("python3")
            .arg("-c")
            .arg("import sys, urllib.request; urllib.request.urlopen(sys.argv[1]).read()")
            .arg(format!(
                "{}/__proxy_config?delay={delay}&fail_after={fail_after}",
                self.endpoint
            ))
            .output()
            .unwrap();
        assert!(output.status.success());
    }

    /// (UploadPart numbers forwarded, UploadParts failed).
    pub fn stats(&self) -> (Vec<u32>, u64) {
        let (parts, failed, _) = self.all_stats();
        (parts, failed)
    }

    /// (UploadPart numbers forwarded, UploadParts failed, UploadParts with a correct
    /// x-amz-checksum-sha256).
    pub fn all_stats(&self) -> (Vec<u32>, u64, u64) {
        let output = Command::new("python3")
            .arg("-c")
            .arg(
                "import json, sys, urllib.request\n\
                 s = json.load(urllib.request.urlopen(sys.argv[1] + '/__proxy_stats'))\n\
                 print(' '.join(map(str, s['upload_parts'])) + '|' + str(s['failed_parts']) + '|' \
                       + str(s['checksummed']))",
            )
            .arg(&self.endpoint)
            .output()
            .unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let fields: Vec<&str> = text.trim().split('|').collect();
        (
            fields[0]
                .split_whitespace()
                .map(|n| n.parse().unwrap())
                .collect(),
            fields[1].parse().unwrap(),
            fields[2].parse().unwrap(),
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
