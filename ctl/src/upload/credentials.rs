//! Where imgctl's S3 credentials, region and endpoint come from: the standard AWS sources in
//! the standard order, nothing on the command line but the profile's name.
//!
//! Credentials: with `--profile P`, that profile only; otherwise `AWS_ACCESS_KEY_ID` +
//! `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`) from the environment, else the profile
//! `AWS_PROFILE` (or `default`) in the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`,
//! default `~/.aws/credentials`, sections `[NAME]`) and then in the config file
//! (`AWS_CONFIG_FILE`, default `~/.aws/config`, sections `[profile NAME]` and `[default]`).
//! IBM Cloud Object Storage's HMAC keys are the same pair (`access_key_id` /
//! `secret_access_key` in the service credential's `cos_hmac_keys`): put them in a profile.
//!
//! Region: `--region`, `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`, else
//! `us-east-1`. Endpoint: `--endpoint`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the
//! profile's `endpoint_url`, else AWS's.
//!
//! The secret and the session token live in [`Secret`]s, which zero their memory on drop and
//! print as `<redacted>`; object_store keeps its own copy for signing for as long as the store
//! lives (it does not zero it), which is the upload's lifetime. No secret is ever an option:
//! argv is readable by every user of the machine.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::error::{CtlError, Result};

/// A secret string: zeroed on drop, never printed.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The secret, for handing to the S3 client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The options a command takes to reach the object store (none of them secret).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreOptions {
    /// S3 endpoint URL, e.g. <https://s3.eu-de.cloud-object-storage.appdomain.cloud> for IBM
    /// COS (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, the profile's endpoint_url, AWS).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Region (default: $AWS_REGION, $AWS_DEFAULT_REGION, the profile's region, us-east-1).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Profile in ~/.aws/credentials and ~/.aws/config (default: $AWS_PROFILE, then
    /// `default`); credentials are never taken from the command line.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
}

/// An access key pair (and session token).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The access key id (not secret: it names the key, as a user name does).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: Secret,
    /// The session token of temporary credentials.
    pub session_token: Option<Secret>,
    /// Where they came from, for messages ("the environment", "profile dev in ~/.aws/credentials").
    pub source: String,
}

/// Everything needed to talk to the store.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The credentials.
    pub credentials: Credentials,
    /// The region.
    pub region: String,
    /// A custom endpoint, or `None` for AWS.
    pub endpoint: Option<String>,
    /// Warnings for the user (e.g. a credentials file others can read).
    pub warnings: Vec<String>,
}

impl Resolved {
    /// The endpoint as shown in messages and hashed into the state file's name.
    pub fn endpoint_display(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", self.region))
    }
}

/// The process environment, as far as credentials go (a map in tests).
pub trait Environment {
    /// A variable's value, `None` when unset or empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real environment.
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Environment for HashMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name)
            .filter(|v| !v.is_empty())
            .map(|v| v.to_string())
    }
}

/// The largest credentials or config file read (they are a few lines).
const MAX_FILE: u64 = 1 << 20;

/// Resolves credentials, region and endpoint from `options` and the environment.
pub fn resolve(options: &StoreOptions, env: &dyn Environment) -> Result<Resolved> {
    let home = env.var("HOME").map(PathBuf::from);
    let in_home = |rest: &str| home.as_ref().map(|h| h.join(rest));
    let credentials_file = env
        .var("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| in_home(".aws/credentials"));
    let config_file = env
        .var("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| in_home(".aws/config"));
    let profile = options
        .profile
        .clone()
        .or_else(|| env.var("AWS_PROFILE"))
        .unwrap_or_else(|| "default".into());

    let mut warnings = Vec::new();
    let credentials_ini = read_ini(credentials_file.as_deref(), &mut warnings)?;
    let config_ini = read_ini(config_file.as_deref(), &mut warnings)?;
    let from_credentials = credentials_ini.as_ref().and_then(|ini| ini.get(&profile));
    let config_section = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    let from_config = config_ini.as_ref().and_then(|ini| ini.get(&config_section));
    let lookup = |key: &str| {
        from_credentials
            .and_then(|s| s.get(key))
            .or_else(|| from_config.and_then(|s| s.get(key)))
            .map(|value| value.as_str().to_owned())
    };

    // An explicit --profile wins over the environment's keys, as with the AWS CLI.
    let from_env =
        if options.profile.is_none() {
            match (
                env.var("AWS_ACCESS_KEY_ID"),
                env.var("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Some(id), Some(secret)) => Some(Credentials {
                    access_key_id: id,
                    secret_access_key: Secret::new(secret),
                    session_token: env.var("AWS_SESSION_TOKEN").map(Secret::new),
                    source: "the environment (AWS_ACCESS_KEY_ID)".into(),
                }),
                (Some(_), None) | (None, Some(_)) => return Err(CtlError::Credentials(
                    "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set: set both, \
                     or neither to use a profile"
                        .into(),
                )),
                (None, None) => None,
            }
        } else {
            None
        };
    let from_profile = || -> Option<Credentials> {
        let id = lookup("aws_access_key_id")?;
        let secret = lookup("aws_secret_access_key")?;
        let file = if from_credentials.is_some_and(|s| s.contains_key("aws_access_key_id")) {
            credentials_file.as_deref()
        } else {
            config_file.as_deref()
        };
        Some(Credentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: lookup("aws_session_token").map(Secret::new),
            source: format!("profile {profile} in {}", shown(file)),
        })
    };
    let Some(credentials) = from_env.or_else(from_profile) else {
        let mut looked = Vec::new();
        if options.profile.is_none() {
            looked.push("the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)".to_string());
        }
        looked.push(format!(
            "profile [{profile}] in {} ({})",
            shown(credentials_file.as_deref()),
            presence(&credentials_ini, from_credentials.is_some())
        ));
        looked.push(format!(
            "[{config_section}] in {} ({})",
            shown(config_file.as_deref()),
            presence(&config_ini, from_config.is_some())
        ));
        return Err(CtlError::Credentials(format!(
            "no S3 credentials found; looked in {}. Put aws_access_key_id and \
             aws_secret_access_key (for IBM COS: the HMAC keys) under [{profile}] in \
             ~/.aws/credentials (mode 0600), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            looked.join(", ")
        )));
    };

    let region = options
        .region
        .clone()
        .or_else(|| env.var("AWS_REGION"))
        .or_else(|| env.var("AWS_DEFAULT_REGION"))
        .or_else(|| lookup("region"))
        .unwrap_or_else(|| "us-east-1".into());
    let endpoint = options
        .endpoint
        .clone()
        .or_else(|| env.var("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env.var("AWS_ENDPOINT_URL"))
        .or_else(|| lookup("endpoint_url"));
    if let Some(endpoint) = &endpoint {
        let Some(rest) = endpoint
            .strip_prefix("https://")
            .or_else(|| endpoint.strip_prefix("http://"))
        else {
            return Err(CtlError::Usage(format!(
                "the endpoint {endpoint:?} is not an http:// or https:// URL"
            )));
        };
        // user:password@host would put a secret into the state, the summary and every message.
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(CtlError::Usage(
                "the endpoint carries a user name or password (USER:SECRET@HOST): give only the \
                 scheme and host; the keys go in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a \
                 profile"
                    .into(),
            ));
        }
    }
    // From here the process holds a secret key: no core dump may write it out (object_store
    // keeps its own copy, which nothing zeroes).
    forbid_core_dumps();
    Ok(Resolved {
        credentials,
        region,
        endpoint: endpoint.map(|e| e.trim_end_matches('/').to_string()),
        warnings,
    })
}

/// No core file, and no core handed to systemd-coredump (`PR_SET_DUMPABLE` 0), for the rest
/// of the process. Best effort: a failure leaves the default, which the warning in the security
/// model describes.
fn forbid_core_dumps() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; no memory is shared.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &none);
    }
    // SAFETY: PR_SET_DUMPABLE takes a plain integer argument.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

fn shown(path: Option<&Path>) -> String {
    path.map_or_else(
        || "(no file: HOME is not set)".into(),
        |p| p.display().to_string(),
    )
}

fn presence(ini: &Option<Ini>, has_section: bool) -> &'static str {
    match (ini, has_section) {
        (None, _) => "no such file",
        (Some(_), false) => "no such section",
        (Some(_), true) => "no keys there",
    }
}

/// Sections of key = value lines.
type Ini = HashMap<String, HashMap<String, Secretish>>;
/// Values are kept in zeroizing strings: the credentials file's secrets pass through here.
type Secretish = ZString;

/// A zeroizing string that compares and clones as a string (for the INI map).
#[derive(Clone, PartialEq, Eq)]
struct ZString(Zeroizing<String>);

impl std::ops::Deref for ZString {
    type Target = String;
    fn deref(&self) -> &String {
        &self.0
    }
}

/// Reads an INI file; `None` if it does not exist. Warns when group or others can read it.
fn read_ini(path: Option<&Path>, warnings: &mut Vec<String>) -> Result<Option<Ini>> {
    let Some(path) = path else { return Ok(None) };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CtlError::file(path, "read the AWS credentials", e)),
    };
    let metadata = file
        .metadata()
        .map_err(|e| CtlError::file(path, "read the AWS credentials", e))?;
    if metadata.len() > MAX_FILE {
        return Err(CtlError::File {
            path: path.into(),
            message: format!("is over {MAX_FILE} bytes: not an AWS credentials or config file"),
        });
    }
    if metadata.mode() & 0o077 != 0 {
        warnings.push(format!(
            "{} can be read by other users (mode {:o}): chmod 600 it",
            path.display(),
            metadata.mode() & 0o777
        ));
    }
    let mut text = Zeroizing::new(String::new());
    use std::io::Read;
    file.take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(|e| CtlError::file(path, "read the AWS credentials", e))?;
    Ok(Some(parse_ini(&text)))
}

/// Parses `[section]` headers and `key = value` lines; `#`/`;` comments; indented lines (the
/// config file's nested `s3 =` blocks) are skipped.
fn parse_ini(text: &str) -> Ini {
    let mut ini = Ini::new();
    let mut section: Option<String> = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            ini.entry(name.clone()).or_default();
            section = Some(name);
        } else if let (Some(section), Some((key, value))) = (&section, line.split_once('=')) {
            if let Some(entries) = ini.get_mut(section) {
                entries.insert(
                    key.trim().to_ascii_lowercase(),
                    ZString(Zeroizing::new(value.trim().to_string())),
                );
            }
        }
    }
    ini
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn options(profile: Option<&str>) -> StoreOptions {
        StoreOptions {
            profile: profile.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn environment_keys_come_first_and_debug_redacts_them() {
        let env = HashMap::from([
            ("AWS_ACCESS_KEY_ID", "AKIDENV"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-env"),
            ("AWS_SESSION_TOKEN", "tok3n"),
            ("AWS_REGION", "eu-de"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9/"),
            ("HOME", "/nonexistent"),
        ]);
        let resolved = resolve(&options(None), &env).unwrap();
        assert_eq!(resolved.credentials.access_key_id, "AKIDENV");
        assert_eq!(
            resolved.credentials.secret_access_key.expose(),
            "s3cr3t-env"
        );
        assert_eq!(resolved.region, "eu-de");
        assert_eq!(resolved.endpoint.as_deref(), Some("http://127.0.0.1:9"));
        let debug = format!("{resolved:?}");
        assert!(
            !debug.contains("s3cr3t") && !debug.contains("tok3n"),
            "{debug}"
        );
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn an_endpoint_with_a_password_in_it_is_refused_and_cores_are_off() {
        let env = HashMap::from([
            ("AWS_ACCESS_KEY_ID", "AKIDENV"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-env"),
            ("AWS_ENDPOINT_URL", "https://id:s3cr3t-url@s3.example/path"),
            ("HOME", "/nonexistent"),
        ]);
        let error = resolve(&options(None), &env).unwrap_err().to_string();
        assert!(error.contains("user name or password"), "{error}");
        assert!(!error.contains("s3cr3t"), "{error}");
        let env = HashMap::from([
            ("AWS_ACCESS_KEY_ID", "AKIDENV"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-env"),
            ("AWS_ENDPOINT_URL", "https://s3.example/a@b"),
            ("HOME", "/nonexistent"),
        ]);
        resolve(&options(None), &env).unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: getrlimit fills in the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) }, 0);
        assert_eq!(
            limit.rlim_cur, 0,
            "a process holding a secret key dumps no core"
        );
    }

    #[test]
    fn profiles_come_from_the_credentials_and_config_files() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &credentials,
            "[default]\naws_access_key_id = AKIDDEF\naws_secret_access_key = def\n\n\
             [cos]\naws_access_key_id=AKIDCOS\n# comment\naws_secret_access_key = cos-secret\n",
        )
        .unwrap();
        std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(
            &config,
            "[profile cos]\nregion = eu-de\nendpoint_url = https://s3.eu-de.example\n\
             s3 =\n  addressing_style = path\n[profile other]\naws_access_key_id = AKIDOTHER\n\
             aws_secret_access_key = other\n",
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let credentials_path = credentials.to_str().unwrap();
        let config_path = config.to_str().unwrap();
        let env = HashMap::from([
            ("AWS_SHARED_CREDENTIALS_FILE", credentials_path),
            ("AWS_CONFIG_FILE", config_path),
            ("AWS_ACCESS_KEY_ID", "AKIDENV"),
            ("AWS_SECRET_ACCESS_KEY", "env"),
        ]);
        // --profile wins over the environment's keys.
        let cos = resolve(&options(Some("cos")), &env).unwrap();
        assert_eq!(cos.credentials.access_key_id, "AKIDCOS");
        assert_eq!(cos.credentials.secret_access_key.expose(), "cos-secret");
        assert_eq!(cos.region, "eu-de");
        assert_eq!(cos.endpoint.as_deref(), Some("https://s3.eu-de.example"));
        assert!(cos.credentials.source.contains("profile cos"));
        // A config file others can read is worth a warning (it may hold keys).
        assert!(
            cos.warnings.iter().any(|w| w.contains("chmod 600")),
            "{:?}",
            cos.warnings
        );
        // Keys in the config file's [profile NAME] work too.
        let other = resolve(&options(Some("other")), &env).unwrap();
        assert_eq!(other.credentials.access_key_id, "AKIDOTHER");
        // Without --profile the environment's keys come first.
        let from_env = resolve(&options(None), &env).unwrap();
        assert_eq!(from_env.credentials.access_key_id, "AKIDENV");
        assert_eq!(from_env.region, "us-east-1");
        assert!(from_env.endpoint.is_none());
        assert_eq!(
            from_env.endpoint_display(),
            "https://s3.us-east-1.amazonaws.com"
        );
        let mut env = env;
        env.remove("AWS_ACCESS_KEY_ID");
        env.remove("AWS_SECRET_ACCESS_KEY");
        assert_eq!(
            resolve(&options(None), &env)
                .unwrap()
                .credentials
                .access_key_id,
            "AKIDDEF"
        );
        env.insert("AWS_PROFILE", "cos");
        assert_eq!(
            resolve(&options(None), &env)
                .unwrap()
                .credentials
                .access_key_id,
            "AKIDCOS"
        );
    }

    #[test]
    fn no_credentials_lists_the_places_looked_at() {
        let env = HashMap::from([("HOME", "/nonexistent-home")]);
        let error = resolve(&options(Some("prod")), &env)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no S3 credentials found"), "{error}");
        assert!(
            error.contains("/nonexistent-home/.aws/credentials"),
            "{error}"
        );
        assert!(
            error.contains("[profile prod] in /nonexistent-home/.aws/config"),
            "{error}"
        );
        assert!(error.contains("AWS_ACCESS_KEY_ID"), "{error}");
        let half = HashMap::from([("AWS_ACCESS_KEY_ID", "x")]);
        assert!(resolve(&options(None), &half)
            .unwrap_err()
            .to_string()
            .contains("set both"));
    }
}
