//! A daemon killed with SIGKILL in the middle of a copy leaves no image under the final name,
//! for every output container: imgctl reports that the daemon went away and removes its
//! `OUT.partial` (raw LUKS keeps it, not recognisable as LUKS, for the re-run to resume:
//! tests/resume.rs). The guarantee comes from the client (the final name appears only by a
//! rename after the daemon's summary), so it must hold whatever the daemon was writing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Stdio;

use common::*;

#[test]
fn a_daemon_killed_mid_copy_leaves_no_output_for_any_container() {
    for format in ["luks", "qcow2", "vhd"] {
        let scratch_dir = scratch();
        let dir = scratch_dir.path();
        // 1 GiB of written data, so the copy runs long enough to be interrupted.
        let source = dir.join("full.raw");
        let mut file = std::fs::File::create(&source).unwrap();
        let chunk = vec![0x77u8; 8 << 20];
        for _ in 0..128 {
            file.write_all(&chunk).unwrap();
        }
        drop(file);
        let key = dir.join("k");
        write_key(&key);
        let output = dir.join(format!("out.{format}"));
        let partial = PathBuf::from(format!("{}.partial", output.display()));
        let mut daemon = Daemon::start(dir, &[]);
        let mut command = daemon.imgctl();
        encrypt_arguments_keyed(&mut command, &source, &output, &key)
            .args(["--format", format, "--json"]);
        if format != "vhd" {
            command.args(CHEAP_PBKDF);
        }
        let mut client = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(client.stdout.take().unwrap());
        let mut lines = stdout.lines();
        for line in lines.by_ref() {
            let value: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            assert_ne!(
                value["event"], "summary",
                "{format}: finished before the kill"
            );
            if value["progress"]["phase"] == "copy"
                && value["progress"]["bytes_done"].as_u64() > Some(0)
            {
                break;
            }
        }
        assert!(
            partial.exists(),
            "{format}: the partial file exists during the copy"
        );
        assert!(
            !output.exists(),
            "{format}: nothing under the final name during the copy"
        );
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();
        let rest: Vec<String> = lines.map(|line| line.unwrap()).collect();
        let status = client.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut client.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(
            !status.success(),
            "{format}: imgctl succeeded: {rest:?} {stderr}"
        );
        assert!(
            !rest.iter().any(|line| line.contains("\"summary\"")),
            "{format}: a summary after the kill: {rest:?}"
        );
        assert!(!output.exists(), "{format}: an output under the final name");
        if format == "luks" {
            assert!(
                partial.exists(),
                "luks: the resumable partial file was removed"
            );
            let bytes = std::fs::read(&partial).unwrap();
            assert_ne!(
                &bytes[..6],
                b"LUKS\xba\xbe",
                "luks: the partial file has the magic"
            );
        } else {
            assert!(
                !partial.exists(),
                "{format}: the partial file was left behind"
            );
        }
        assert!(
            daemon_gone_message(&rest, &stderr),
            "{format}: no clear message: {rest:?} {stderr}"
        );
    }
}

/// Whether imgctl said the daemon went away, and where to look (in a JSON error event or on
/// stderr).
fn daemon_gone_message(events: &[String], stderr: &str) -> bool {
    let text = format!("{} {stderr}", events.join(" "));
    text.contains("the daemon closed the connection") && text.contains("journalctl")
}
