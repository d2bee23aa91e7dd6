//! The protocol is valid Varlink for any client: the reference implementation (Python
//! `varlink`, installed by scripts/install-deps) parses the served interface description, builds
//! its proxy from it, and calls the daemon through that proxy (tests/support/varlink_client.py):
//! GetInfo, GetInterfaceDescription of both interfaces, Inspect of a source and of an encrypted
//! image with descriptors passed, an error reply, and the job registry (`Jobs`, `Status`).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

/// Whether Python's `varlink` module can be imported; says how to get it when not.
fn python_varlink_available() -> bool {
    let found = Command::new("python3")
        .args(["-c", "import varlink"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        eprintln!(
            "SKIPPED: the Python varlink module is missing (`python3 -m pip install varlink`, \
             as scripts/install-deps does)"
        );
    }
    found
}

#[test]
fn the_reference_python_client_parses_the_interface_and_calls_through_its_proxy() {
    if !python_varlink_available() {
        return;
    }
    let (scratch_dir, daemon, key) = daemon_and_key();
    let dir = scratch_dir.path();
    let source = make_source(dir, SourceKind::VhdDynamic, "7M");
    let image = dir.join("img.luks");
    let encrypted = run(&mut daemon.encrypt(&source, &image, &key));
    daemon.assert_ok(&encrypted, "encrypt");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/varlink_client.py");
    let output = run(Command::new("python3")
        .arg(script)
        .arg(&daemon.socket)
        .arg(&source)
        .arg(&image)
        .arg(&key));
    daemon.assert_ok(&output, "tests/support/varlink_client.py");
    let got: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", describe(&output)));

    let interfaces = &got["info"]["interfaces"];
    assert_eq!(
        interfaces,
        &serde_json::json!(["org.varlink.service", "io.imgcrypt"]),
        "{got}"
    );
    let members: Vec<&str> = got["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for member in [
        "Encrypt",
        "Inspect",
        "Decrypt",
        "Verify",
        "Rewrite",
        "Summary",
        "SourceInfo",
        "NeedFile",
    ] {
        assert!(
            members.contains(&member),
            "{member} not parsed: {members:?}"
        );
    }
    assert!(
        got["service_members"]
            .as_array()
            .unwrap()
            .contains(&"GetInterfaceDescription".into()),
        "{got}"
    );

    // A source: the enum value that used to break the parser, through the proxy.
    let source_info = &got["inspect_source"]["source"];
    assert_eq!(source_info["format"], "vhd_dynamic", "{got}");
    assert_eq!(
        source_info["virtual_size"].as_u64(),
        Some(qemu_virtual_size(&source)),
        "{got}"
    );
    // The proxy keeps only what the interface declares: the whole reply is declared.
    assert_eq!(
        got["inspect_source_raw"],
        serde_json::json!([{"parameters": got["inspect_source"]}]),
        "fields the interface does not declare"
    );

    // An encrypted image with a key passed beside it: the keyslot's fingerprint matches it.
    let image_info = &got["inspect_image"]["image"];
    assert_eq!(image_info["format"], "luks", "{got}");
    assert_eq!(image_info["luks_version"], "luks2", "{got}");
    assert_eq!(
        image_info["keyslots"][0]["matching_key"], "test_key",
        "{got}"
    );
    assert_eq!(
        got["inspect_image_raw"],
        serde_json::json!([{"parameters": got["inspect_image"]}]),
        "fields the interface does not declare"
    );

    // No descriptor: the daemon's error, as the library reports errors.
    assert_eq!(got["error"]["name"], "io.imgcrypt.BadDescriptor", "{got}");
    assert_eq!(got["error"]["parameters"]["descriptor"], "image", "{got}");
    assert_eq!(got["inspect_again"], got["inspect_source"], "{got}");

    // Jobs through the proxy: imgctl's encryption and the proxy's own inspections, all ended.
    let jobs = got["jobs"]["jobs"].as_array().unwrap();
    let kinds: Vec<&str> = jobs.iter().map(|j| j["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["encrypt", "inspect", "inspect", "inspect", "inspect"],
        "{got}"
    );
    assert_eq!(jobs[0]["state"], "succeeded", "{got}");
    assert_eq!(jobs[0]["engine"], "userspace", "{got}");
    assert_eq!(
        jobs[0]["names"]["output"].as_str(),
        Some(image.to_str().unwrap()),
        "{got}"
    );
    assert_eq!(jobs[3]["state"], "failed", "{got}");
    assert_eq!(jobs[3]["error"], "io.imgcrypt.BadDescriptor", "{got}");
    assert_eq!(
        got["jobs_raw"],
        serde_json::json!([{"parameters": got["jobs"]}]),
        "fields the interface does not declare"
    );
    assert_eq!(got["no_such_job"]["name"], "io.imgcrypt.NoSuchJob", "{got}");
    assert_eq!(got["no_such_job"]["parameters"]["id"], 999999, "{got}");
}
