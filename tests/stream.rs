//! Streaming an Encrypt output into a pipe (issue 13, the daemon's side), with the real daemon:
//! Encrypt is called directly (tests/common/raw_client.rs) with a pipe's write end as the
//! output and `stream` set, as `imgctl encrypt --upload` will. The stream (preamble, then the
//! image bytes in order) is assembled into a file and checked with `cryptsetup luksDump` and
//! the independent decryptor (`tests/support/luks_decrypt.py`). An interrupted stream resumes
//! from the header the client saved; a changed key restarts it; what cannot be streamed gets
//! a clear error; a client that stops reading and leaves frees every descriptor of the job.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::raw_client::{cheap_encrypt_parameters, RawClient};
use common::*;
use imgcrypt_proto::stream::{Preamble, PREAMBLE_LEN};
use imgcrypt_proto::varlink::Reply;

/// LUKS2's header (the data offset) as the daemon makes it.
const LUKS2_HEADER: u64 = 16 << 20;

fn pipe() -> (File, OwnedFd) {
    let (read, write) = nix::unistd::pipe().unwrap();
    (File::from(read), write)
}

/// What a streamed call returned.
struct Streamed {
    preamble: Preamble,
    /// The image bytes after the preamble.
    bytes: Vec<u8>,
    /// Every reply, the final one last.
    replies: Vec<Reply>,
}

impl Streamed {
    fn final_reply(&self) -> &Reply {
        self.replies.last().unwrap()
    }

    fn summary(&self) -> &serde_json::Value {
        let reply = self.final_reply();
        assert_eq!(reply.error, None, "{reply:?}");
        &reply.parameters.as_ref().unwrap()["summary"]
    }

    fn notices(&self) -> Vec<String> {
        self.replies
            .iter()
            .filter_map(|reply| {
                reply.parameters.as_ref()?["notice"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    }
}

/// Sends a streamed Encrypt: source 0, the pipe's write end 1, key 2, the saved header 3;
/// `edit` adjusts the parameters.
fn send(
    daemon: &Daemon,
    source: &Path,
    key: &Path,
    resume: Option<(&Path, u64)>,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (RawClient, File) {
    let source = File::open(source).unwrap();
    let key = File::open(key).unwrap();
    let (read, write) = pipe();
    let mut parameters = cheap_encrypt_parameters(Some(2));
    let header = resume.map(|(header, _)| File::open(header).unwrap());
    parameters["stream"] = match resume {
        Some((_, from)) => serde_json::json!({"resume_header": 3, "resume_from": from}),
        None => serde_json::json!({}),
    };
    edit(&mut parameters);
    let mut fds = vec![source.as_fd(), write.as_fd(), key.as_fd()];
    if let Some(header) = &header {
        fds.push(header.as_fd());
    }
    let mut client = RawClient::connect(&daemon.socket);
    client.call(imgcrypt_proto::api::ENCRYPT, parameters, &fds, true);
    // Our copy of the write end goes: the daemon's is then the only one, and its close is the
    // stream's end of file.
    drop(write);
    (client, read)
}

/// Reads the stream to its end while following the call's replies.
fn collect(mut client: RawClient, mut read: File) -> Streamed {
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut all = Vec::new();
            read.read_to_end(&mut all).unwrap();
            all
        });
        let mut replies = Vec::new();
        loop {
            let reply = client
                .reply()
                .expect("connection closed before the final reply");
            let last = !reply.continues;
            replies.push(reply);
            if last {
                break;
            }
        }
        let all = reader.join().unwrap();
        assert!(
            all.len() >= PREAMBLE_LEN,
            "{} bytes, {replies:?}",
            all.len()
        );
        let preamble = Preamble::decode(all[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
        Streamed {
            preamble,
            bytes: all[PREAMBLE_LEN..].to_vec(),
            replies,
        }
    })
}

fn stream(
    daemon: &Daemon,
    source: &Path,
    key: &Path,
    resume: Option<(&Path, u64)>,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Streamed {
    let (client, read) = send(daemon, source, key, resume, edit);
    collect(client, read)
}

/// Writes a whole-image stream to `path`, checks it against the source with the independent
/// decryptor, and returns the path.
fn check_image(dir: &Path, name: &str, bytes: &[u8], key: &Path, source: &Path) -> PathBuf {
    let image = dir.join(name);
    fs::write(&image, bytes).unwrap();
    let plaintext = independent_decrypt(&image, key, dir);
    assert_plaintext_matches(&plaintext, source);
    image
}

fn source_of(dir: &Path, size: &str) -> PathBuf {
    make_source(dir, SourceKind::Raw, size)
}

#[test]
fn a_streamed_image_is_the_whole_luks_image_in_order_luks2_and_luks1() {
    let (dir, daemon, key) = daemon_and_key();
    let dir = dir.path();
    let source = source_of(dir, "24M");
    let streamed = stream(&daemon, &source, &key, None, |_| {});
    let preamble = streamed.preamble;
    assert_eq!(preamble.start, 0);
    assert_eq!(preamble.header_len, LUKS2_HEADER);
    assert!(!preamble.restarted);
    assert_eq!(preamble.image_size, LUKS2_HEADER + (24 << 20));
    assert_eq!(streamed.bytes.len() as u64, preamble.image_size);
    let summary = streamed.summary();
    assert_eq!(summary["output_size"], preamble.image_size);
    assert_eq!(summary["bytes_written"], preamble.image_size);
    assert!(summary.get("resumed_from").is_none(), "{summary}");
    let image = check_image(dir, "luks2.img", &streamed.bytes, &key, &source);
    let facts = luks_dump(&image);
    assert_eq!((facts.version, facts.data_offset), (2, LUKS2_HEADER));
    assert_eq!(facts.cipher, "aes-xts-plain64");

    let luks1 = stream(&daemon, &source, &key, None, |parameters| {
        parameters["luks_version"] = "luks1".into();
    });
    assert_eq!(luks1.preamble.header_len, 2 << 20);
    assert_eq!(luks1.bytes.len() as u64, luks1.preamble.image_size);
    let image = check_image(dir, "luks1.img", &luks1.bytes, &key, &source);
    assert_eq!(luks_dump(&image).version, 1);
}

/// Streams until `keep` image bytes were read, then closes the pipe: the job fails saying the
/// client stopped reading. Returns the bytes read.
fn interrupted(
    daemon: &Daemon,
    source: &Path,
    key: &Path,
    keep: usize,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Vec<u8> {
    let (mut client, mut read) = send(daemon, source, key, None, edit);
    let mut bytes = vec![0u8; PREAMBLE_LEN + keep];
    read.read_exact(&mut bytes).unwrap();
    drop(read);
    let reply = client.final_reply();
    let text = format!("{reply:?}");
    assert!(reply.error.is_some(), "{text}");
    assert!(
        text.contains("the client stopped reading the stream"),
        "{text}"
    );
    bytes.split_off(PREAMBLE_LEN)
}

#[test]
fn an_interrupted_stream_resumes_from_the_saved_header_and_a_new_key_restarts_it() {
    let (dir, daemon, key) = daemon_and_key();
    let dir = dir.path();
    let source = source_of(dir, "40M");
    let from: u64 = 20 << 20;
    let first = interrupted(&daemon, &source, &key, from as usize, |_| {});
    let header = dir.join("saved-header");
    fs::write(&header, &first[..LUKS2_HEADER as usize]).unwrap();

    let rest = stream(&daemon, &source, &key, Some((&header, from)), |_| {});
    assert_eq!(rest.preamble.start, from);
    assert!(!rest.preamble.restarted);
    assert_eq!(rest.preamble.header_len, LUKS2_HEADER);
    assert_eq!(rest.summary()["resumed_from"], from);
    assert_eq!(
        rest.bytes.len() as u64,
        rest.preamble.image_size - from,
        "the resumed stream carries the rest of the image"
    );
    let mut spliced = first.clone();
    spliced.extend_from_slice(&rest.bytes);
    check_image(dir, "spliced.img", &spliced, &key, &source);
    // The same image as a stream that ran through with that header (resume_from 0 streams
    // the saved header and the whole payload).
    let through = stream(&daemon, &source, &key, Some((&header, 0)), |_| {});
    assert!(!through.preamble.restarted);
    assert!(
        through.bytes == spliced,
        "the spliced image differs from one that ran through"
    );

    // Another key does not open the saved header: a new image from byte 0, and a notice.
    let other_key = dir.join("other-key");
    write_key(&other_key);
    let restarted = stream(&daemon, &source, &other_key, Some((&header, from)), |_| {});
    assert!(restarted.preamble.restarted);
    assert_eq!(restarted.preamble.start, 0);
    let notices = restarted.notices();
    assert!(
        notices.iter().any(|notice| notice
            == "the key no longer opens the header of the interrupted upload: the upload \
                starts over"),
        "{notices:?}"
    );
    assert!(restarted.summary().get("resumed_from").is_none());
    let image = check_image(dir, "restarted.img", &restarted.bytes, &other_key, &source);
    assert!(test_passphrase(&image, &other_key));
    assert!(
        !test_passphrase(&image, &key),
        "the old key must not open the new image"
    );

    // A saved header that is not this image's (a LUKS1 header for a LUKS2 job) restarts too.
    let luks1 = stream(&daemon, &source, &key, None, |parameters| {
        parameters["luks_version"] = "luks1".into();
    });
    let luks1_header = dir.join("luks1-header");
    fs::write(&luks1_header, &luks1.bytes[..2 << 20]).unwrap();
    let mismatched = stream(&daemon, &source, &key, Some((&luks1_header, from)), |_| {});
    assert!(mismatched.preamble.restarted);
    let notices = mismatched.notices();
    assert!(
        notices.iter().any(|notice| notice.starts_with(
            "the saved header of the interrupted upload is not a LUKS2 header of this image's size"
        ) && notice.ends_with("the upload starts over")),
        "{notices:?}"
    );
}

/// The qcow2 header cluster and LUKS header a streamed qcow2 begins with.
const QCOW2_HEADER: u64 = (64 << 10) + (2 << 20);

fn as_qcow2(parameters: &mut serde_json::Value) {
    parameters["format"] = "qcow2".into();
}

/// A 40 MiB raw source with data at its start, 8 MiB of written zeros (allocated, no data) in
/// the middle, and data after them; a hole at the end.
fn qcow2_source(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = vec![0u8; 32 << 20];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = (index as u32).wrapping_mul(2_654_435_761).to_le_bytes()[index % 4] ^ seed;
    }
    bytes[12 << 20..20 << 20].fill(0);
    fs::write(&path, &bytes).unwrap();
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    path
}

/// Writes a whole qcow2 stream to `path` and checks it with qemu-img against the source.
fn check_qcow2(dir: &Path, name: &str, bytes: &[u8], key: &Path, source: &Path) -> PathBuf {
    let image = dir.join(name);
    fs::write(&image, bytes).unwrap();
    assert_qemu_check_and_compare(&image, key, source, "raw");
    image
}

#[test]
fn a_streamed_qcow2_is_metadata_first_checks_with_qemu_img_and_resumes_or_restarts() {
    let (dir, daemon, key) = daemon_and_key();
    let dir = dir.path();
    let source = qcow2_source(dir, "disk.raw", 0);
    let whole = stream(&daemon, &source, &key, None, as_qcow2);
    let preamble = whole.preamble;
    assert_eq!((preamble.start, preamble.header_len), (0, QCOW2_HEADER));
    assert_eq!(whole.bytes.len() as u64, preamble.image_size);
    let summary = whole.summary();
    assert_eq!(summary["output_format"], "qcow2");
    assert_eq!(summary["output_size"], preamble.image_size);
    assert_eq!(summary["bytes_written"], preamble.image_size);
    // Only the data is stored: 24 MiB of the 40 (the written zeros and the hole are not).
    assert_eq!(summary["allocated_bytes"], 24u64 << 20);
    assert!(preamble.image_size < (24 << 20) + (3 << 20), "{preamble:?}");
    let phases: Vec<String> = whole
        .replies
        .iter()
        .filter_map(|reply| {
            Some(
                reply.parameters.as_ref()?["progress"]["phase"]
                    .as_str()?
                    .to_string(),
            )
        })
        .collect();
    assert!(phases.iter().any(|phase| phase == "scan"), "{phases:?}");
    check_qcow2(dir, "whole.qcow2", &whole.bytes, &key, &source);

    // Interrupted in the data, resumed from the saved header: the spliced image is whole and
    // the same as one that ran through with that header.
    let from: u64 = 10 << 20;
    let first = interrupted(&daemon, &source, &key, from as usize, as_qcow2);
    let header = dir.join("saved-header");
    fs::write(&header, &first[..QCOW2_HEADER as usize]).unwrap();
    let rest = stream(&daemon, &source, &key, Some((&header, from)), as_qcow2);
    assert!(!rest.preamble.restarted, "{:?}", rest.notices());
    assert_eq!(rest.preamble.start, from);
    assert_eq!(rest.summary()["resumed_from"], from);
    assert_eq!(rest.bytes.len() as u64, rest.preamble.image_size - from);
    let mut spliced = first.clone();
    spliced.extend_from_slice(&rest.bytes);
    check_qcow2(dir, "spliced.qcow2", &spliced, &key, &source);
    // From inside the metadata (after the saved header) too.
    let early = stream(
        &daemon,
        &source,
        &key,
        Some((&header, QCOW2_HEADER)),
        as_qcow2,
    );
    assert!(!early.preamble.restarted);
    let mut from_metadata = first[..QCOW2_HEADER as usize].to_vec();
    from_metadata.extend_from_slice(&early.bytes);
    assert!(
        from_metadata == spliced,
        "resumed in the metadata, the image differs"
    );

    // Another key: a new image from byte 0, saying why.
    let other_key = dir.join("other-key");
    write_key(&other_key);
    let restarted = stream(
        &daemon,
        &source,
        &other_key,
        Some((&header, from)),
        as_qcow2,
    );
    assert!(restarted.preamble.restarted);
    assert!(
        restarted.notices().iter().any(|notice| notice
            == "the key no longer opens the header of the interrupted upload: the upload \
                starts over"),
        "{:?}",
        restarted.notices()
    );
    check_qcow2(
        dir,
        "restarted.qcow2",
        &restarted.bytes,
        &other_key,
        &source,
    );

    // A source whose data moved (more of it): the saved layout is not this image's.
    let moved = qcow2_source(dir, "moved.raw", 0);
    File::options()
        .write(true)
        .open(&moved)
        .unwrap()
        .write_all_at(&[1u8; 4096], 36 << 20)
        .unwrap();
    let relaid = stream(&daemon, &moved, &key, Some((&header, from)), as_qcow2);
    assert!(relaid.preamble.restarted);
    assert!(
        relaid
            .notices()
            .iter()
            .any(|notice| notice.contains("its header cluster differs from this image's")),
        "{:?}",
        relaid.notices()
    );
    check_qcow2(dir, "relaid.qcow2", &relaid.bytes, &key, &moved);

    // A raw LUKS header saved for a qcow2 job is not this image's either.
    let luks1 = stream(&daemon, &source, &key, None, |parameters| {
        parameters["luks_version"] = "luks1".into();
    });
    fs::write(&header, &luks1.bytes[..QCOW2_HEADER as usize]).unwrap();
    let mismatched = stream(&daemon, &source, &key, Some((&header, from)), as_qcow2);
    assert!(mismatched.preamble.restarted);
    assert!(
        mismatched.notices().iter().any(|notice| notice
            .starts_with("the saved header of the interrupted upload is not the qcow2 header")),
        "{:?}",
        mismatched.notices()
    );
}

/// The final reply of a call that must fail before streaming anything.
fn refused(
    daemon: &Daemon,
    source: &Path,
    key: &Path,
    output: &impl AsFd,
    edit: impl FnOnce(&mut serde_json::Value),
) -> String {
    let source = File::open(source).unwrap();
    let key = File::open(key).unwrap();
    let mut parameters = cheap_encrypt_parameters(Some(2));
    parameters["stream"] = serde_json::json!({});
    edit(&mut parameters);
    let mut client = RawClient::connect(&daemon.socket);
    client.call(
        imgcrypt_proto::api::ENCRYPT,
        parameters,
        &[source.as_fd(), output.as_fd(), key.as_fd()],
        true,
    );
    let reply = client.final_reply();
    assert!(reply.error.is_some(), "{reply:?}");
    serde_json::to_string(&reply).unwrap()
}

#[test]
fn what_cannot_be_streamed_is_refused_with_what_to_do() {
    let (dir, daemon, key) = daemon_and_key();
    let dir = dir.path();
    let source = source_of(dir, "4M");
    let (_read, write) = pipe();
    let vhd = refused(&daemon, &source, &key, &write, |parameters| {
        parameters["format"] = "vhd".into();
        parameters["pbkdf"] = serde_json::Value::Null;
    });
    assert!(
        vhd.contains("a vhd output cannot be streamed") && vhd.contains("write it with -o"),
        "{vhd}"
    );
    let kernel = refused(&daemon, &source, &key, &write, |parameters| {
        parameters["engine"] = "kernel".into();
    });
    assert!(
        kernel.contains("--engine kernel cannot stream the output"),
        "{kernel}"
    );
    assert!(kernel.contains("InvalidOption"), "{kernel}");

    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("out.img"))
        .unwrap();
    let regular = refused(&daemon, &source, &key, &file, |_| {});
    assert!(regular.contains("BadDescriptor"), "{regular}");
    assert!(regular.contains("must be a pipe's write end"), "{regular}");
    assert_eq!(
        file.metadata().unwrap().len(),
        0,
        "nothing is written into the file"
    );

    // Without `stream`, a pipe output is refused as before.
    let unstreamed = refused(&daemon, &source, &key, &write, |parameters| {
        parameters.as_object_mut().unwrap().remove("stream");
    });
    assert!(
        unstreamed.contains(r#""error":"io.imgcrypt.BadDescriptor""#)
            && unstreamed.contains(r#""descriptor":"output""#),
        "{unstreamed}"
    );

    // A resume_from that is not a 4096-multiple is refused before anything is streamed.
    let header = dir.join("header");
    fs::write(&header, vec![0u8; 4096]).unwrap();
    let header_file = File::open(&header).unwrap();
    let source_file = File::open(&source).unwrap();
    let key_file = File::open(&key).unwrap();
    let mut parameters = cheap_encrypt_parameters(Some(2));
    parameters["stream"] = serde_json::json!({"resume_header": 3, "resume_from": 4097});
    let mut client = RawClient::connect(&daemon.socket);
    client.call(
        imgcrypt_proto::api::ENCRYPT,
        parameters,
        &[
            source_file.as_fd(),
            write.as_fd(),
            key_file.as_fd(),
            header_file.as_fd(),
        ],
        true,
    );
    let reply = serde_json::to_string(&client.final_reply()).unwrap();
    assert!(
        reply.contains("resume_from 4097 is not a multiple of 4096"),
        "{reply}"
    );
}

#[test]
fn a_client_that_never_reads_and_leaves_frees_the_job_promptly() {
    let (dir, daemon, key) = daemon_and_key();
    let dir = dir.path();
    let source = source_of(dir, "64M");
    let (client, read) = send(&daemon, &source, &key, None, |_| {});
    let pipe_link = format!("pipe:[{}]", read.metadata().unwrap().ino());
    let open = || -> Vec<PathBuf> {
        fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
            .unwrap()
            .filter_map(|entry| fs::read_link(entry.unwrap().path()).ok())
            .collect()
    };
    let holds_job_files = || {
        open()
            .iter()
            .any(|path| path == Path::new(&pipe_link) || path.starts_with(dir.join("src.raw")))
    };
    // The job runs (the keyslot is derived, the preamble and header fill the pipe) and then
    // waits for a reader that never comes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon
        .log_text()
        .contains("the header is complete: streaming it first")
    {
        assert!(Instant::now() < deadline, "{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        holds_job_files(),
        "the job holds the pipe while it waits: {:?}",
        open()
    );
    // The client leaves without reading: the job is cancelled and lets go of everything.
    drop(client);
    let left = Instant::now();
    while holds_job_files() {
        assert!(
            left.elapsed() < Duration::from_secs(5),
            "the job's descriptors are still open: {:?}\n{}",
            open(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(read);
}

/// A streamed Encrypt over a fresh connection as the calling thread's user: `files` are
/// descriptors 0 and 2.., a new pipe's write end is descriptor 1; the pipe is read to its end
/// while the call runs. Returns the final reply and the bytes streamed.
fn call_streamed(socket: &Path, parameters: serde_json::Value, files: &[File]) -> (Reply, Vec<u8>) {
    let (mut read, write) = pipe();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        read.read_to_end(&mut all).unwrap();
        all
    });
    let mut fds = vec![files[0].as_fd(), write.as_fd()];
    fds.extend(files[1..].iter().map(|file| file.as_fd()));
    let reply = varlink_call(socket, imgcrypt_proto::api::ENCRYPT, parameters, &fds);
    // The daemon's copy of the write end is closed by now: ours goes, and the reader sees the
    // end of the stream.
    drop(fds);
    drop(write);
    (reply, reader.join().unwrap())
}

#[test]
fn only_those_the_ring_may_decrypt_for_resume_a_stream_with_the_ring_key() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = daemon_with_ring(dir);
    fs::set_permissions(
        daemon.socket.parent().unwrap(),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let source = source_of(dir, "8M");
    let ring_keyed = |resume_from: Option<u64>| {
        let mut parameters = cheap_encrypt_parameters(None);
        parameters["stream"] = match resume_from {
            Some(from) => serde_json::json!({"resume_header": 2, "resume_from": from}),
            None => serde_json::json!({}),
        };
        parameters
    };
    // Root's ring-keyed upload, interrupted once its header was out: the saved header is in
    // a file anyone may read (as a header copied from someone's uploaded object would be).
    let (reply, bytes) = call_streamed(
        &daemon.socket,
        ring_keyed(None),
        &[File::open(&source).unwrap()],
    );
    assert_eq!(reply.error, None, "{reply:?}");
    let header = dir.join("victim-header");
    fs::write(
        &header,
        &bytes[PREAMBLE_LEN..PREAMBLE_LEN + LUKS2_HEADER as usize],
    )
    .unwrap();
    fs::set_permissions(&header, fs::Permissions::from_mode(0o644)).unwrap();
    let files = {
        let (source, header) = (source.clone(), header.clone());
        move || [File::open(&source).unwrap(), File::open(&header).unwrap()]
    };

    // Another user may not have data of its choice encrypted under that image's volume key.
    let attacker = test_user(ATTACKER_USER);
    let socket = daemon.socket.clone();
    let parameters = ring_keyed(Some(0));
    let attacker_files = files.clone();
    let (reply, streamed) =
        attacker.in_thread(move || call_streamed(&socket, parameters, &attacker_files()));
    let text = serde_json::to_string(&reply).unwrap();
    assert!(text.contains("PermissionDenied"), "{text}");
    assert!(
        text.contains(&format!(
            "the daemon's key ring does not resume a streamed upload for uid {}",
            attacker.uid
        )),
        "{text}"
    );
    assert!(
        streamed.is_empty(),
        "nothing is streamed: {} bytes",
        streamed.len()
    );
    // Starting over with the ring's key is open to anyone.
    let socket = daemon.socket.clone();
    let parameters = ring_keyed(None);
    let attacker_source = source.clone();
    let (reply, _) = attacker.in_thread(move || {
        call_streamed(
            &socket,
            parameters,
            &[File::open(&attacker_source).unwrap()],
        )
    });
    assert_eq!(reply.error, None, "{reply:?}");

    // Root, whom the ring decrypts for anyway, resumes with it: the same image again.
    let (reply, again) = call_streamed(&daemon.socket, ring_keyed(Some(0)), &files());
    assert_eq!(reply.error, None, "{reply:?}");
    let preamble = Preamble::decode(again[..PREAMBLE_LEN].try_into().unwrap()).unwrap();
    assert!(!preamble.restarted);
    assert!(
        again == bytes,
        "the resumed stream is the saved header's image"
    );
}

#[test]
fn a_streamed_job_cannot_be_detached() {
    let (dir, daemon, key) = daemon_and_key();
    let source = source_of(dir.path(), "4M");
    let (_read, write) = pipe();
    let text = refused(&daemon, &source, &key, &write, |parameters| {
        parameters["detach"] = true.into();
    });
    assert!(text.contains("InvalidOption"), "{text}");
    assert!(
        text.contains("a streamed output cannot be detached"),
        "{text}"
    );
    assert!(!text.contains("job_id"), "no job was left running: {text}");
}

#[test]
fn a_reader_that_stops_without_closing_ends_the_job_after_the_stall_limit() {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start_with_env(dir, &[], &[("IMGCRYPTD_TEST_STREAM_STALL_MS", "1000")]);
    let key = dir.join("k");
    write_key(&key);
    let source = source_of(dir, "32M");
    // A first stream read to its end (the daemon opens its random sources once, on first use).
    let whole = stream(&daemon, &source, &key, None, |_| {});
    assert_eq!(whole.bytes.len() as u64, whole.preamble.image_size);
    let baseline = daemon.open_descriptors();
    let (mut client, mut read) = send(&daemon, &source, &key, None, |_| {});
    // Reads the preamble and a little of the header, then takes nothing more but stays
    // connected with the pipe open.
    let mut some = vec![0u8; PREAMBLE_LEN + 4096];
    read.read_exact(&mut some).unwrap();
    let started = Instant::now();
    let reply = client.final_reply();
    let text = format!("{reply:?}");
    assert!(reply.error.is_some(), "{text}");
    assert!(
        text.contains("the client read nothing from the stream for 1 s"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    drop(client);
    drop(read);
    daemon.wait_for_descriptors(baseline);
}
