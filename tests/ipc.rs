//! The Varlink layer against a real imgcryptd, driven by a hand-rolled client so the tests can
//! send what imgctl never would: wrong descriptors, malformed and oversized messages.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use common::raw_client::{cheap_encrypt_parameters, RawClient};
use common::*;
use imgcrypt_proto::api;
use imgcrypt_proto::varlink;
use imgcrypt_proto::wire::MAX_FRAME_LEN;
use serde_json::json;

#[test]
fn get_info_and_interface_description() {
    let dir = scratch();
    let daemon = Daemon::start(dir.path(), &[]);
    let mut client = RawClient::connect(&daemon.socket);

    client.call(varlink::GET_INFO, json!({}), &[], false);
    let info = client.final_reply();
    assert_eq!(info.error, None);
    let interfaces = &info.parameters.unwrap()["interfaces"];
    assert!(interfaces
        .as_array()
        .unwrap()
        .contains(&json!("io.imgcrypt")));

    client.call(
        varlink::GET_INTERFACE_DESCRIPTION,
        json!({"interface": "io.imgcrypt"}),
        &[],
        false,
    );
    let description = client.final_reply().parameters.unwrap()["description"]
        .as_str()
        .unwrap()
        .to_string();
    let documented =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/io.imgcrypt.varlink"))
            .unwrap();
    assert_eq!(description, documented);

    client.call(
        varlink::GET_INTERFACE_DESCRIPTION,
        json!({"interface": "com.example.nope"}),
        &[],
        false,
    );
    assert_eq!(
        client.final_reply().error.as_deref(),
        Some(varlink::errors::INTERFACE_NOT_FOUND)
    );

    client.call("io.imgcrypt.Nope", json!({}), &[], false);
    assert_eq!(
        client.final_reply().error.as_deref(),
        Some(varlink::errors::METHOD_NOT_FOUND)
    );
}

#[test]
fn read_only_output_descriptor_is_refused_and_file_untouched() {
    let dir = scratch();
    let dir = dir.path();
    let daemon = Daemon::start(dir, &[]);
    let source = make_source(dir, SourceKind::Raw, "4M");
    let key = dir.join("k");
    write_key(&key);
    let output_path = dir.join("victim.img");
    let original = b"precious data that must survive".repeat(1000);
    fs::write(&output_path, &original).unwrap();

    let source = fs::File::open(&source).unwrap();
    let output = fs::File::open(&output_path).unwrap(); // read-only
    let key = fs::File::open(&key).unwrap();
    let mut client = RawClient::connect(&daemon.socket);
    client.encrypt(&source, &output, &key);
    let reply = client.final_reply();
    assert_eq!(
        reply.error.as_deref(),
        Some(api::errors::BAD_DESCRIPTOR),
        "{reply:?}"
    );
    let parameters = reply.parameters.unwrap();
    assert_eq!(parameters["descriptor"], "output");
    assert!(parameters["message"]
        .as_str()
        .unwrap()
        .contains("read-write"));
    assert_eq!(
        fs::read(&output_path).unwrap(),
        original,
        "the file must be untouched"
    );
}

#[test]
fn missing_descriptors_are_a_clear_error() {
    let dir = scratch();
    let daemon = Daemon::start(dir.path(), &[]);
    let mut client = RawClient::connect(&daemon.socket);
    client.call(api::ENCRYPT, cheap_encrypt_parameters(Some(2)), &[], false);
    let reply = client.final_reply();
    assert_eq!(reply.error.as_deref(), Some(api::errors::BAD_DESCRIPTOR));
    let message = reply.parameters.unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("0 were passed"), "{message}");
}

#[test]
fn malformed_message_gets_an_error_and_the_connection_keeps_working() {
    let dir = scratch();
    let daemon = Daemon::start(dir.path(), &[]);
    let mut client = RawClient::connect(&daemon.socket);
    client.send_raw(b"{this is not json\0");
    let reply = client.final_reply();
    assert_eq!(reply.error.as_deref(), Some(api::errors::PROTOCOL_ERROR));

    client.send_raw(br#"{"method":"io.imgcrypt.Encrypt","parameters":{"source":"zero"}}"#);
    client.send_raw(b"\0");
    let reply = client.final_reply();
    assert_eq!(
        reply.error.as_deref(),
        Some(varlink::errors::INVALID_PARAMETER)
    );

    client.call(varlink::GET_INFO, json!({}), &[], false);
    assert_eq!(client.final_reply().error, None);
}

#[test]
fn oversized_message_is_refused_while_other_clients_are_served() {
    let dir = scratch();
    let mut daemon = Daemon::start(dir.path(), &[]);
    let mut bystander = RawClient::connect(&daemon.socket);

    let mut attacker = RawClient::connect(&daemon.socket);
    let junk = vec![b'x'; MAX_FRAME_LEN + 4096];
    // The daemon may close before taking all of it; that is the point.
    let _ = attacker.stream.write_all(&junk);
    let reply = attacker.reply().expect("an error reply before the close");
    assert_eq!(reply.error.as_deref(), Some(api::errors::PROTOCOL_ERROR));
    assert!(
        reply.parameters.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "the message names the limit"
    );
    assert!(
        attacker.reply().is_none(),
        "the connection is closed afterwards"
    );

    bystander.call(varlink::GET_INFO, json!({}), &[], false);
    assert_eq!(bystander.final_reply().error, None);
    let mut newcomer = RawClient::connect(&daemon.socket);
    newcomer.call(varlink::GET_INFO, json!({}), &[], false);
    assert_eq!(newcomer.final_reply().error, None);
    assert!(daemon.is_running());
}

#[test]
fn too_many_descriptors_are_refused() {
    let dir = scratch();
    let daemon = Daemon::start(dir.path(), &[]);
    let files: Vec<_> = (0..=imgcrypt_proto::fdpass::MAX_FDS_PER_MESSAGE)
        .map(|_| tempfile::tempfile().unwrap())
        .collect();
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    let mut client = RawClient::connect(&daemon.socket);
    client.call(varlink::GET_INFO, json!({}), &fds, false);
    let reply = client.final_reply();
    assert_eq!(
        reply.error.as_deref(),
        Some(api::errors::PROTOCOL_ERROR),
        "{reply:?}"
    );
}

#[test]
fn client_disconnect_cancels_the_job_and_daemon_keeps_serving() {
    let dir = scratch();
    let dir = dir.path();
    let mut daemon = Daemon::start(dir, &[]);
    // Large enough that the copy is still running when we hang up.
    let source_path = dir.join("big.raw");
    let source = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&source_path)
        .unwrap();
    source.set_len(4 << 30).unwrap();
    let key = dir.join("k");
    write_key(&key);
    let output_path = dir.join("out.luks");
    let output = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&output_path)
        .unwrap();
    let key = fs::File::open(&key).unwrap();

    let mut client = RawClient::connect(&daemon.socket);
    client.encrypt(&source, &output, &key);
    // Wait until the copy is under way, then hang up.
    client.wait_for_copy();
    drop(client);

    // The job must end early, by cancellation (a raw LUKS job saves its checkpoint and says
    // so), not run on to completion.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let cancelled = |log: &str| {
        log.contains("job ended after its client left: cancelled")
            || log.contains("job ended after its client left: the encryption stopped")
    };
    while !cancelled(&daemon.log_text()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no cancel logged:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut client = RawClient::connect(&daemon.socket);
    client.call(varlink::GET_INFO, json!({}), &[], false);
    assert_eq!(client.final_reply().error, None);
    assert!(daemon.is_running());
}
