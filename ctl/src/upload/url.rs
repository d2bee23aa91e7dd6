//! `s3://BUCKET/KEY`: the one way a command names an object. Parsed strictly here, so that a
//! typo is refused with a message saying what is wrong before any credential is read or any
//! request is sent.

use std::fmt;

use crate::error::{CtlError, Result};

/// A parsed `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The object key (no leading `/`).
    pub key: String,
}

/// The longest key S3 accepts, in bytes.
const MAX_KEY: usize = 1024;

impl S3Url {
    /// Parses `s3://BUCKET/KEY`. The bucket is 3 to 63 characters of letters, digits, `.`, `-`
    /// and `_` (the rules of S3's older buckets, which IBM COS and other S3 servers also accept);
    /// the key is 1 to 1024 bytes without control characters, empty path segments, `.` or `..`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: String| {
            CtlError::Usage(format!(
                "{text:?} is not an object URL: {why} (expected s3://BUCKET/KEY)"
            ))
        };
        let rest = text
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it does not start with s3://".into()))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("the bucket is empty".into()));
        }
        if !(3..=63).contains(&bucket.len()) {
            return Err(bad(format!(
                "the bucket {bucket:?} has {} characters, buckets have 3 to 63",
                bucket.len()
            )));
        }
        if let Some(c) = bucket
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(bad(format!(
                "the bucket {bucket:?} contains {c:?}; bucket names are letters, digits, '.', '-' and '_'"
            )));
        }
        if key.is_empty() {
            return Err(bad("there is no object key after the bucket".into()));
        }
        if key.len() > MAX_KEY {
            return Err(bad(format!(
                "the key is {} bytes long, S3 allows {MAX_KEY}",
                key.len()
            )));
        }
        if let Some(c) = key.chars().find(|c| c.is_control()) {
            return Err(bad(format!("the key contains the control character {c:?}")));
        }
        if key.ends_with('/') {
            return Err(bad(
                "the key ends with '/', which names a folder: name the object".into(),
            ));
        }
        if let Some(segment) = key
            .split('/')
            .find(|s| s.is_empty() || *s == "." || *s == "..")
        {
            return Err(bad(format!(
                "the key has the path segment {segment:?} (an empty segment, '.' or '..' is not allowed)"
            )));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        S3Url::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_bucket_and_key_and_prints_them_back() {
        let url = S3Url::parse("s3://images-1/vm/disk.luks").unwrap();
        assert_eq!(url.bucket, "images-1");
        assert_eq!(url.key, "vm/disk.luks");
        assert_eq!(url.to_string(), "s3://images-1/vm/disk.luks");
    }

    #[test]
    fn refuses_what_is_not_an_object_saying_why() {
        assert!(refused("https://b/k").contains("does not start with s3://"));
        assert!(refused("s3:///k").contains("the bucket is empty"));
        assert!(refused("s3://bucket").contains("no object key"));
        assert!(refused("s3://bucket/").contains("no object key"));
        assert!(refused("s3://ab/k").contains("3 to 63"));
        assert!(refused("s3://my bucket/k").contains("contains ' '"));
        assert!(refused("s3://bucket/dir/").contains("names a folder"));
        assert!(refused("s3://bucket/a//b").contains("empty segment"));
        assert!(refused("s3://bucket/a/../b").contains("\"..\""));
        assert!(refused("s3://bucket/a\nb").contains("control character"));
        assert!(refused(&format!("s3://bucket/{}", "k".repeat(1025))).contains("1024"));
    }
}
