//! Reading the VHDs blktap's real `vhd-util copy -k` wrote (the corpus): refused as plaintext,
//! recognised with the key hash `vhd-util key -p` printed, unlocked only by the right key, and
//! decrypted to the plaintext the corpus was made from.

use std::fs::File;
use std::path::Path;

use super::*;
use crate::formats::{self, vhd::corpus};

const ENCRYPTED: [&str; 8] = [
    "encA_aes128.vhd",
    "encA_aes256.vhd",
    "encB_aes128.vhd",
    "encB_aes256.vhd",
    "encC_aes128.vhd",
    "encC_aes256.vhd",
    "encD_aes128.vhd",
    "encE_aes256.vhd",
];

/// `vhd-util key -p -n FILE`'s "NONCE HASH" for `name`, from the corpus's record of it.
fn printed_key_hash(dir: &Path, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(dir.join("keyhash-p.txt")).unwrap();
    let line = text
        .lines()
        .find(|line| line.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in keyhash-p.txt"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[1].to_string(), fields[2].to_string())
}

fn secret(bytes: &[u8]) -> SecretBytes {
    let mut key = SecretBytes::zeroed(bytes.len()).unwrap();
    key.as_mut_bytes().copy_from_slice(bytes);
    key
}

fn all_members() -> tempfile::TempDir {
    let mut members: Vec<&str> = ENCRYPTED.to_vec();
    members.extend([
        "keyhash-p.txt",
        "key32.bin",
        "key64.bin",
        "wrongkey32.bin",
        "srcB.vhd",
        "srcC.vhd",
        "srcE.vhd",
    ]);
    corpus::unpack(&members)
}

#[test]
fn vhd_util_outputs_are_refused_as_plaintext_sources() {
    let dir = all_members();
    for name in ENCRYPTED {
        let (_, hash) = printed_key_hash(dir.path(), name);
        let file = File::open(dir.path().join(name)).unwrap();
        match formats::open(file).unwrap_err() {
            Error::UnsupportedFormat { format, message } => {
                assert_eq!(format, "vhd-encrypted", "{name}");
                assert!(message.contains(&hash), "{name}: {message}");
                assert!(message.contains("already encrypted"), "{message}");
                assert!(message.contains("imgctl decrypt"), "{message}");
            }
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn plain_blktap_vhds_still_open_even_over_2040_gib() {
    let dir = all_members();
    for (name, size) in [
        ("srcB.vhd", 6u64 << 20),
        ("srcC.vhd", (2 << 40) + (32 << 20)),
        ("srcE.vhd", (2 << 40) + (4 << 20)),
    ] {
        let image = formats::open(File::open(dir.path().join(name)).unwrap()).unwrap();
        assert_eq!(image.virtual_size(), size, "{name}");
    }
}

#[test]
fn encrypted_vhds_show_the_key_hash_vhd_util_printed_and_their_size() {
    let dir = all_members();
    let key32 = std::fs::read(dir.path().join("key32.bin")).unwrap();
    let key64 = std::fs::read(dir.path().join("key64.bin")).unwrap();
    let wrong = std::fs::read(dir.path().join("wrongkey32.bin")).unwrap();
    for name in ENCRYPTED {
        let (nonce, hash) = printed_key_hash(dir.path(), name);
        let image = EncryptedVhd::open(File::open(dir.path().join(name)).unwrap()).unwrap();
        assert_eq!(image.key_hash().nonce_hex(), nonce, "{name}");
        assert_eq!(image.key_hash().hash_hex(), hash, "{name}");
        let right = if name.contains("aes128") {
            &key32
        } else {
            &key64
        };
        let other = if name.contains("aes128") {
            &key64
        } else {
            &key32
        };
        assert!(image.key_matches(right).unwrap(), "{name}");
        assert!(!image.key_matches(other).unwrap(), "{name}");
        assert!(!image.key_matches(&wrong).unwrap(), "{name}");
    }
    let image =
        EncryptedVhd::open(File::open(dir.path().join("encC_aes128.vhd")).unwrap()).unwrap();
    assert_eq!(image.virtual_size(), (2 << 40) + (32 << 20));
    assert_eq!(image.allocated_bytes(), 4 << 20);
    let image =
        EncryptedVhd::open(File::open(dir.path().join("encD_aes128.vhd")).unwrap()).unwrap();
    assert_eq!(image.virtual_size(), 6 << 20, "vhd-util rounded 5257216 up");
}

#[test]
fn a_wrong_key_is_refused_naming_the_expected_hash() {
    let dir = all_members();
    let (_, expected) = printed_key_hash(dir.path(), "encB_aes128.vhd");
    let wrong = std::fs::read(dir.path().join("wrongkey32.bin")).unwrap();
    let image =
        EncryptedVhd::open(File::open(dir.path().join("encB_aes128.vhd")).unwrap()).unwrap();
    match image.unlock(&secret(&wrong), "--key-file").unwrap_err() {
        Error::WrongKey {
            message,
            tried,
            carried,
        } => {
            assert!(message.contains(&expected), "{message}");
            assert!(message.contains("--key-file"), "{message}");
            assert_eq!(carried, [expected]);
            assert_eq!(tried.len(), 1);
            assert_ne!(tried[0], carried[0]);
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
    // A 48-byte key is refused for its size before any hash is compared.
    let image =
        EncryptedVhd::open(File::open(dir.path().join("encB_aes128.vhd")).unwrap()).unwrap();
    let error = image.unlock(&secret(&[3u8; 48]), "--key-file").unwrap_err();
    assert!(error.to_string().contains("decodes to 48 bytes"), "{error}");
}

#[test]
fn plain_vhds_and_raw_files_are_not_encrypted_vhds() {
    let dir = all_members();
    let error = EncryptedVhd::open(File::open(dir.path().join("srcB.vhd")).unwrap()).unwrap_err();
    assert!(error.to_string().contains("plain dynamic VHD"), "{error}");
    let error = EncryptedVhd::open(File::open(dir.path().join("key64.bin")).unwrap()).unwrap_err();
    assert!(error.to_string().contains("not a VHD"), "{error}");
}

/// The guest view of `name` decrypted with `key_file`.
fn decrypted(dir: &Path, name: &str, key_file: &str) -> DecryptedVhd {
    let raw = std::fs::read(dir.join(key_file)).unwrap();
    let image = EncryptedVhd::open(File::open(dir.join(name)).unwrap()).unwrap();
    image.unlock(&secret(&raw), "--key-file").unwrap()
}

fn read(image: &dyn SourceImage, offset: u64, length: usize) -> Vec<u8> {
    let mut buffer = vec![0xeeu8; length];
    image.read_at(&mut buffer, offset).unwrap();
    buffer
}

/// The corpus reference placed on a zero disk of `size` bytes: `(offset, file)` pieces.
fn reference(dir: &Path, size: u64, pieces: &[(u64, &str)]) -> impl Fn(u64, usize) -> Vec<u8> {
    let pieces: Vec<(u64, Vec<u8>)> = pieces
        .iter()
        .map(|(at, name)| (*at, std::fs::read(dir.join(name)).unwrap()))
        .collect();
    move |offset: u64, length: usize| {
        assert!(offset + length as u64 <= size);
        let mut out = vec![0u8; length];
        for (at, bytes) in &pieces {
            let start = offset.max(*at);
            let end = (offset + length as u64).min(at + bytes.len() as u64);
            if start < end {
                out[(start - offset) as usize..(end - offset) as usize]
                    .copy_from_slice(&bytes[(start - at) as usize..(end - at) as usize]);
            }
        }
        out
    }
}

/// Image, key file, virtual size, and the reference pieces `(offset, file)` on a zero disk.
type Case<'a> = (&'a str, &'a str, u64, Vec<(u64, &'a str)>);

#[test]
fn vhd_util_images_decrypt_to_the_plaintext_they_were_made_from() {
    let mut members = vec![
        "key32.bin",
        "key64.bin",
        "refA.raw",
        "refB.raw",
        "refC_lo.raw",
        "refC_hi.raw",
        "refD.raw",
    ];
    members.extend(ENCRYPTED);
    let dir = corpus::unpack(&members);
    let dir = dir.path();
    let tib2 = 2u64 << 40;
    let cases: [Case; 8] = [
        (
            "encA_aes128.vhd",
            "key32.bin",
            4 << 20,
            vec![(0, "refA.raw")],
        ),
        (
            "encA_aes256.vhd",
            "key64.bin",
            4 << 20,
            vec![(0, "refA.raw")],
        ),
        (
            "encB_aes128.vhd",
            "key32.bin",
            6 << 20,
            vec![(0, "refB.raw")],
        ),
        (
            "encB_aes256.vhd",
            "key64.bin",
            6 << 20,
            vec![(0, "refB.raw")],
        ),
        (
            "encC_aes128.vhd",
            "key32.bin",
            tib2 + (32 << 20),
            vec![(0, "refC_lo.raw"), (tib2, "refC_hi.raw")],
        ),
        (
            "encC_aes256.vhd",
            "key64.bin",
            tib2 + (32 << 20),
            vec![(0, "refC_lo.raw"), (tib2, "refC_hi.raw")],
        ),
        (
            "encD_aes128.vhd",
            "key32.bin",
            6 << 20,
            vec![(0, "refD.raw")],
        ),
        (
            "encE_aes256.vhd",
            "key64.bin",
            tib2 + (4 << 20),
            vec![(0, "refC_lo.raw"), (tib2, "refC_hi.raw")],
        ),
    ];
    for (name, key_file, size, pieces) in cases {
        let image = decrypted(dir, name, key_file);
        assert_eq!(image.virtual_size(), size, "{name}");
        let expected = reference(dir, size, &pieces);
        // Only what is allocated is read (2 TiB disks hold two blocks); the rest is zeros by
        // the reader's contract and checked at a few places.
        for range in image.allocated_ranges().to_vec() {
            let length = (range.end - range.start) as usize;
            assert!(
                read(&image, range.start, length) == expected(range.start, length),
                "{name}: allocated range {range:?} differs from the reference"
            );
        }
        for offset in [(size / 3) & !511, size - 4096] {
            assert_eq!(read(&image, offset, 4096), expected(offset, 4096), "{name}");
        }
        // Unaligned reads inside a block agree with the aligned ones.
        let first = image.allocated_ranges()[0].start;
        assert_eq!(
            read(&image, first + 1000, 3333),
            expected(first + 1000, 3333),
            "{name}: unaligned read"
        );
        // vhd-util left the sectors its source never wrote as plaintext zeros in B and C (the
        // sources made by libvhd with partial bitmaps), never in A and D (qemu's, full).
        let left_plain = image.plaintext_zero_sectors();
        if name.starts_with("encA") || name.starts_with("encD") {
            assert_eq!(left_plain, 0, "{name}");
        } else {
            assert!(left_plain > 0, "{name}: {left_plain}");
        }
    }
}

#[test]
fn sectors_2_pow_32_apart_share_their_ciphertext() {
    // The 32-bit tweak: vhd-util's encC has the same plaintext at sectors 5 and 2^32 + 5, and
    // so the same ciphertext; the reader must give back that plaintext at both.
    let dir = corpus::unpack(&["encC_aes128.vhd", "key32.bin", "refC_lo.raw"]);
    let image = decrypted(dir.path(), "encC_aes128.vhd", "key32.bin");
    let reference = std::fs::read(dir.path().join("refC_lo.raw")).unwrap();
    let low = read(&image, 5 * 512, 512);
    let high = read(&image, (1u64 << 41) + 5 * 512, 512);
    assert_eq!(low, reference[5 * 512..6 * 512]);
    assert_eq!(high, low);
}

/// A copy of corpus encA_aes128 (block 1 at sector 7: bitmap at 3584, data at 4096; batmap
/// header at 2048, map at 2560) with `edit` applied, decrypted with key32.
fn edited_enc_a(edit: impl FnOnce(&mut Vec<u8>)) -> (DecryptedVhd, Vec<u8>) {
    let dir = corpus::unpack(&["encA_aes128.vhd", "key32.bin", "refA.raw"]);
    let mut bytes = std::fs::read(dir.path().join("encA_aes128.vhd")).unwrap();
    edit(&mut bytes);
    let path = dir.path().join("edited.vhd");
    std::fs::write(&path, &bytes).unwrap();
    let raw = std::fs::read(dir.path().join("key32.bin")).unwrap();
    let image = EncryptedVhd::open(File::open(&path).unwrap()).unwrap();
    let reference = std::fs::read(dir.path().join("refA.raw")).unwrap();
    (
        image.unlock(&secret(&raw), "--key-file").unwrap(),
        reference,
    )
}

const BITMAP_AT: usize = 3584;
const MAP_AT: usize = 2560;
const MAP_CHECKSUM_AT: usize = 2048 + 24;

#[test]
fn a_sector_is_present_when_its_bitmap_bit_or_its_block_s_batmap_bit_is_set() {
    let block_1 = 2u64 << 20;
    // Batmap bit set ("block full"): the bitmap is not consulted, everything is decrypted.
    let (image, reference) = edited_enc_a(|bytes| bytes[BITMAP_AT] = 0);
    assert_eq!(
        read(&image, block_1, 8 * 512),
        reference[block_1 as usize..block_1 as usize + 8 * 512]
    );
    // Batmap bit clear (checksum fixed): the bitmap decides; its first 8 sectors read as zeros.
    let (image, reference) = edited_enc_a(|bytes| {
        bytes[BITMAP_AT] = 0;
        bytes[MAP_AT] = 0;
        bytes[MAP_CHECKSUM_AT..MAP_CHECKSUM_AT + 4].copy_from_slice(&[0xff; 4]);
    });
    assert_eq!(read(&image, block_1, 8 * 512), vec![0u8; 8 * 512]);
    let rest = block_1 as usize + 8 * 512;
    assert_eq!(
        read(&image, rest as u64, (4 << 20) - rest),
        reference[rest..]
    );
}

#[test]
fn a_batmap_with_a_bad_checksum_is_ignored_as_tapdisk_ignores_it() {
    // The map still says "block 1 full", but its checksum is wrong: the bitmap decides.
    let block_1 = 2u64 << 20;
    let (image, _) = edited_enc_a(|bytes| {
        bytes[BITMAP_AT] = 0;
        bytes[MAP_CHECKSUM_AT] ^= 0x10;
    });
    assert_eq!(read(&image, block_1, 8 * 512), vec![0u8; 8 * 512]);
}
