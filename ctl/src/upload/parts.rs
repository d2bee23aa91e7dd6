//! How an image is cut into multipart-upload parts, and the multipart ETag that follows from
//! them.
//!
//! S3 allows at most 10,000 parts of 5 MiB to 5 GiB each (the last may be smaller) and objects
//! of at most 5 TiB. The part size is at least 16 MiB (fewer requests, and the same rule on
//! every run so a resumed upload's parts line up) and grows with the image, rounded up to a
//! whole MiB, so that 10,000 parts always suffice. The multipart ETag S3 reports is the hex MD5
//! of the concatenated binary MD5s of the parts, then `-N` for N parts; [`MultipartEtag`]
//! computes it from the bytes so `imgctl verify --etag` and the upload's final check need no
//! server-side help.

use md5::{Digest, Md5};

use crate::error::{CtlError, Result};

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// The smallest part size imgctl uses.
pub const MIN_PART_SIZE: u64 = 16 * MIB;
/// S3's limit on parts per upload.
pub const MAX_PARTS: u64 = 10_000;
/// S3's smallest part (all but the last).
pub const S3_MIN_PART: u64 = 5 * MIB;
/// S3's largest part.
pub const S3_MAX_PART: u64 = 5 << 30;
/// S3's largest object: 5 TiB.
pub const MAX_OBJECT: u64 = 5 << 40;

/// The part size for an image of `image_size` bytes: max(16 MiB, ceil(size / 10000) rounded up
/// to a MiB). Refuses images over 5 TiB, which no S3 object can hold.
pub fn part_size(image_size: u64) -> Result<u64> {
    if image_size > MAX_OBJECT {
        return Err(CtlError::Usage(format!(
            "the image is {image_size} bytes, over 5 TiB ({MAX_OBJECT} bytes), the largest \
             object S3 stores: split the disk or store it elsewhere"
        )));
    }
    let per_part = image_size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    Ok(per_part.max(MIN_PART_SIZE))
}

/// How many parts an image of `image_size` bytes has with `part_size`-byte parts (at least one:
/// an empty object is one empty part).
pub fn part_count(image_size: u64, part_size: u64) -> u64 {
    image_size.div_ceil(part_size).max(1)
}

/// The byte range of part `number` (1-based).
pub fn part_range(number: u64, part_size: u64, image_size: u64) -> std::ops::Range<u64> {
    let start = (number - 1) * part_size;
    start..(start + part_size).min(image_size)
}

/// Checks a part size given on the command line against S3's limits and the part count.
pub fn check_part_size(image_size: u64, part_size: u64) -> Result<()> {
    if !(S3_MIN_PART..=S3_MAX_PART).contains(&part_size) && part_count(image_size, part_size) > 1 {
        return Err(CtlError::Usage(format!(
            "a part size of {part_size} bytes is outside S3's 5 MiB to 5 GiB"
        )));
    }
    if part_count(image_size, part_size) > MAX_PARTS {
        return Err(CtlError::Usage(format!(
            "a part size of {part_size} bytes cuts {image_size} bytes into more than {MAX_PARTS} parts"
        )));
    }
    Ok(())
}

/// Builds a multipart ETag from the parts' MD5s, in part order.
#[derive(Debug, Default, Clone)]
pub struct MultipartEtag {
    digests: Md5,
    parts: u64,
}

impl MultipartEtag {
    /// An ETag of no parts yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next part's binary MD5.
    pub fn add_part_md5(&mut self, md5: &[u8; 16]) {
        self.digests.update(md5);
        self.parts += 1;
    }

    /// `"<hex md5 of the md5s>-N"`, without quotes.
    pub fn finish(self) -> String {
        format!("{}-{}", hex(&self.digests.finalize()), self.parts)
    }
}

/// The ETag of `size` bytes from `reader` uploaded in `part_size` parts: multipart (`HEX-N`), or
/// with `multipart` false the plain MD5 of a single PUT. `progress` gets the bytes hashed.
pub fn etag_of(
    reader: &mut dyn std::io::Read,
    size: u64,
    part_size: u64,
    multipart: bool,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<String> {
    let mut buffer = vec![0u8; MIB as usize];
    let mut whole = Md5::new();
    let mut etag = MultipartEtag::new();
    let mut done = 0u64;
    for number in 1..=part_count(size, part_size) {
        let range = part_range(number, part_size, size);
        let mut part = Md5::new();
        let mut left = range.end - range.start;
        while left > 0 {
            let want = left.min(buffer.len() as u64) as usize;
            reader.read_exact(&mut buffer[..want])?;
            part.update(&buffer[..want]);
            if !multipart {
                whole.update(&buffer[..want]);
            }
            left -= want as u64;
            done += want as u64;
            progress(done);
        }
        etag.add_part_md5(&part.finalize().into());
    }
    Ok(if multipart {
        etag.finish()
    } else {
        hex(&whole.finalize())
    })
}

/// A part's binary MD5.
pub fn md5_of(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 32 hex digits into an MD5.
pub fn md5_from_hex(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 {
        return None;
    }
    let mut out = [0; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// An ETag as a server sends it (`"…"`, maybe `W/"…"`), as imgctl prints and compares it.
pub fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase()
}

/// Splits `HEX-N` into the hex digest and N; `None` for a single-part (plain MD5) ETag.
pub fn etag_part_count(etag: &str) -> Option<u64> {
    let (_, count) = etag.rsplit_once('-')?;
    count.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_images_use_16_mib_parts() {
        assert_eq!(part_size(0).unwrap(), 16 * MIB);
        assert_eq!(part_size(40 * MIB).unwrap(), 16 * MIB);
        assert_eq!(part_count(40 * MIB, 16 * MIB), 3);
        assert_eq!(part_count(0, 16 * MIB), 1);
        // 16 MiB parts reach 156.25 GiB in 10,000 parts; beyond, the parts grow.
        assert_eq!(part_size(160_000 * MIB).unwrap(), 16 * MIB);
        assert_eq!(part_size(160_000 * MIB + 1).unwrap(), 17 * MIB);
    }

    #[test]
    fn a_1_tib_image_fits_in_10000_parts() {
        let size = 1u64 << 40;
        let part = part_size(size).unwrap();
        // ceil(2^40 / 10000) = 109,951,163 bytes, rounded up to 105 MiB.
        assert_eq!(part, 105 * MIB);
        assert_eq!(part % MIB, 0);
        assert!((S3_MIN_PART..=S3_MAX_PART).contains(&part));
        let count = part_count(size, part);
        assert_eq!(count, 9987);
        assert!(count <= MAX_PARTS);
        let last = part_range(count, part, size);
        assert_eq!(last.end, size);
        assert!(last.start < size);
        check_part_size(size, part).unwrap();
    }

    #[test]
    fn the_5_tib_limit_is_exact_and_explained() {
        let part = part_size(MAX_OBJECT).unwrap();
        assert_eq!(part, 525 * MIB);
        assert!(part_count(MAX_OBJECT, part) <= MAX_PARTS);
        let error = part_size(MAX_OBJECT + 1).unwrap_err().to_string();
        assert!(error.contains("over 5 TiB"), "{error}");
    }

    #[test]
    fn multipart_etag_matches_an_independent_computation() {
        // Computed with Python's hashlib:
        //   a, b = b"a" * (5 << 20), b"b" * 1000
        //   hashlib.md5(hashlib.md5(a).digest() + hashlib.md5(b).digest()).hexdigest() + "-2"
        let mut etag = MultipartEtag::new();
        etag.add_part_md5(&md5_of(&vec![b'a'; 5 << 20]));
        etag.add_part_md5(&md5_of(&[b'b'; 1000]));
        assert_eq!(etag.finish(), "8c6f96fe400c627d9394af6161f5921d-2");
        // One empty part: the ETag of an empty multipart object.
        let mut empty = MultipartEtag::new();
        empty.add_part_md5(&md5_of(b""));
        assert_eq!(empty.finish(), "59adb24ef3cdbe0297f05b395827453f-1");
    }

    #[test]
    fn etag_of_a_stream_equals_the_parts_etag() {
        let data: Vec<u8> = (0..(5 * MIB + 1000)).map(|i| (i % 251) as u8).collect();
        let mut expected = MultipartEtag::new();
        expected.add_part_md5(&md5_of(&data[..(5 * MIB) as usize]));
        expected.add_part_md5(&md5_of(&data[(5 * MIB) as usize..]));
        let mut last = 0;
        let got = etag_of(&mut &data[..], data.len() as u64, 5 * MIB, true, &mut |d| {
            last = d
        })
        .unwrap();
        assert_eq!(got, expected.finish());
        assert_eq!(last, data.len() as u64);
        let single = etag_of(
            &mut &data[..],
            data.len() as u64,
            5 * MIB,
            false,
            &mut |_| {},
        );
        assert_eq!(single.unwrap(), hex(&md5_of(&data)));
        // A stream shorter than its size is an error, not a wrong ETag.
        assert!(etag_of(&mut &data[..10], 20, 5 * MIB, true, &mut |_| {}).is_err());
    }

    #[test]
    fn etags_are_normalized_and_counted() {
        assert_eq!(normalize_etag("\"ABC-3\""), "abc-3");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(etag_part_count("abc-3"), Some(3));
        assert_eq!(etag_part_count("abc"), None);
        let md5 = md5_of(b"x");
        assert_eq!(md5_from_hex(&hex(&md5)), Some(md5));
        assert_eq!(md5_from_hex("zz"), None);
    }

    #[test]
    fn part_sizes_outside_s3_limits_are_refused() {
        assert!(check_part_size(100 * MIB, MIB).is_err());
        assert!(check_part_size(MIB, MIB).is_ok(), "one part may be small");
        assert!(
            check_part_size(1 << 40, 16 * MIB).is_err(),
            "over 10,000 parts"
        );
    }
}
