//! `recv_with_fds` when the kernel truncates the control message because our descriptor table
//! is full (MSG_CTRUNC). A test binary of its own with a single test: it lowers the process's
//! RLIMIT_NOFILE, which would break any test running beside it in the same process.

use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use imgcrypt_proto::fdpass::{recv_with_fds, send_with_fds};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn truncated_descriptors_are_all_closed_and_reported() {
    let (sender, receiver) = UnixStream::pair().unwrap();
    let files: Vec<_> = (0..40).map(|_| tempfile::tempfile().unwrap()).collect();
    let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    send_with_fds(sender.as_fd(), b"{}\0", &borrowed).unwrap();

    let before = open_descriptors();
    let highest = files.iter().map(|f| f.as_raw_fd()).max().unwrap();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Room for a few of the 40 above our highest descriptor (plus any holes below it): the
    // kernel installs those, then hits the limit and sets MSG_CTRUNC.
    setrlimit(Resource::RLIMIT_NOFILE, highest as u64 + 1 + 4, hard).unwrap();
    let mut buffer = [0u8; 64];
    let mut fds = Vec::new();
    let result = recv_with_fds(receiver.as_fd(), &mut buffer, &mut fds);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();

    let error = result.expect_err("a truncated control message must be an error");
    assert_eq!(error.kind(), ErrorKind::InvalidData, "{error}");
    assert!(error.to_string().contains("MSG_CTRUNC"), "{error}");
    assert!(fds.is_empty(), "no descriptor handed out");
    assert_eq!(
        open_descriptors(),
        before,
        "every descriptor that arrived with the truncated message must be closed"
    );
}
