//! Companion files (backing files, parents, extents) as a hostile client sends them: too many,
//! named by a file that comes later, opened write-only, or pointing at no descriptor. Each is
//! refused with an error that names the problem, before anything is read or written. The
//! working chains are tested per format (qcow2_source.rs, vhd_differencing.rs, ...).

mod common;

use std::fs;
use std::os::fd::AsFd;

use common::raw_client::{cheap_encrypt_parameters, RawClient};
use common::*;
use serde_json::{json, Value};

/// Sends an Encrypt of a small raw source into an output with `companions` and `extra`
/// descriptors after the usual three; returns the error name and parameters.
fn encrypt_with(companions: Value, extra: &[&fs::File]) -> (String, Value, Vec<u8>) {
    let scratch_dir = scratch();
    let dir = scratch_dir.path();
    let daemon = Daemon::start(dir, &[]);
    let source = dir.join("src.raw");
    fs::write(&source, vec![0x5au8; 1 << 20]).unwrap();
    let key = dir.join("k");
    write_key(&key);
    let output_path = dir.join("out.luks");
    let output = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&output_path)
        .unwrap();
    let source = fs::File::open(&source).unwrap();
    let key = fs::File::open(&key).unwrap();
    let mut parameters = cheap_encrypt_parameters(Some(2));
    parameters["companions"] = companions;
    let mut fds = vec![source.as_fd(), output.as_fd(), key.as_fd()];
    fds.extend(extra.iter().map(|file| file.as_fd()));
    let mut client = RawClient::connect(&daemon.socket);
    client.call(imgcrypt_proto::api::ENCRYPT, parameters, &fds, true);
    let reply = client.final_reply();
    let written = fs::read(&output_path).unwrap();
    (
        reply.error.unwrap_or_default(),
        reply.parameters.unwrap_or_default(),
        written,
    )
}

#[test]
fn more_companions_than_the_limit_are_refused_before_any_is_examined() {
    // 97 entries all naming descriptor 0: the count is checked first.
    let many: Vec<Value> = (0..97)
        .map(|index| json!({"fd": 0, "name": format!("f{index}"), "referenced_by": 0}))
        .collect();
    let (error, parameters, written) = encrypt_with(Value::Array(many), &[]);
    assert_eq!(error, "io.imgcrypt.InvalidOption", "{parameters}");
    assert_eq!(parameters["parameter"], "companions");
    assert!(
        parameters["message"]
            .as_str()
            .unwrap()
            .contains("at most 96"),
        "{parameters}"
    );
    assert!(written.is_empty(), "the output was written");
}

#[test]
fn a_companion_named_by_a_later_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.raw");
    fs::write(&path, b"base").unwrap();
    let base = fs::File::open(&path).unwrap();
    let (error, parameters, written) = encrypt_with(
        json!([{"fd": 3, "name": "base.raw", "referenced_by": 1}]),
        &[&base],
    );
    assert_eq!(error, "io.imgcrypt.InvalidOption", "{parameters}");
    assert!(
        parameters["message"]
            .as_str()
            .unwrap()
            .contains("must be named by the source (0) or by an earlier companion"),
        "{parameters}"
    );
    assert!(written.is_empty());
}

#[test]
fn a_write_only_or_missing_companion_descriptor_is_a_bad_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.raw");
    fs::write(&path, b"base").unwrap();
    let write_only = fs::OpenOptions::new().write(true).open(&path).unwrap();
    let (error, parameters, written) = encrypt_with(
        json!([{"fd": 3, "name": "base.raw", "referenced_by": 0}]),
        &[&write_only],
    );
    assert_eq!(error, "io.imgcrypt.BadDescriptor", "{parameters}");
    assert_eq!(parameters["descriptor"], "companion");
    assert!(written.is_empty());
    assert_eq!(
        fs::read(&path).unwrap(),
        b"base",
        "the companion was written"
    );

    let (error, parameters, _) = encrypt_with(
        json!([{"fd": 7, "name": "base.raw", "referenced_by": 0}]),
        &[],
    );
    assert_eq!(error, "io.imgcrypt.BadDescriptor", "{parameters}");
    assert!(
        parameters["message"]
            .as_str()
            .unwrap()
            .contains("does not name a passed descriptor"),
        "{parameters}"
    );
}
