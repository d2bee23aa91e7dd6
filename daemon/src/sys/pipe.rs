//! Writing a streamed output into the pipe a client passed ([`imgcrypt_proto::stream`]).
//!
//! The reader is the client's process, which may stop reading at any time (killed, stuck on
//! a slow upload, or simply never reading). A blocking `write` into a full pipe would then hold
//! a worker thread, and with it the job and its descriptors, for as long as the client likes.
//! So the write end is switched to `O_NONBLOCK` and every write waits with `poll(POLLOUT)` in
//! slices of [`POLL_SLICE`], checking the job's cancel flag (set when the client's connection
//! closes, on `imgctl cancel` and on daemon stop) between slices: a stalled reader costs at
//! most one slice of delay after a cancel, never a pinned thread.
//!
//! A reader that closed its end makes `write` fail with `EPIPE`. The signal that would come
//! with it (`SIGPIPE`) is ignored: the Rust runtime sets it to `SIG_IGN` before `main`, and
//! the daemon installs handlers only for SIGTERM and SIGINT, so the error comes back as a
//! value and is reported as "the client stopped reading the stream".

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::{Error, Result};

/// How long one `poll` waits before the cancel flag is checked again.
pub const POLL_SLICE: Duration = Duration::from_millis(100);

/// Switches the pipe's write end to non-blocking writes (see the module documentation).
pub fn set_nonblocking(pipe: &File) -> Result<()> {
    let bits = fcntl(pipe.as_fd(), FcntlArg::F_GETFL)
        .map_err(|e| Error::io("fcntl(F_GETFL) on the stream's pipe", e))?;
    let flags = OFlag::from_bits_retain(bits) | OFlag::O_NONBLOCK;
    fcntl(pipe.as_fd(), FcntlArg::F_SETFL(flags))
        .map_err(|e| Error::io("fcntl(F_SETFL, O_NONBLOCK) on the stream's pipe", e))?;
    Ok(())
}

/// The error of a stream whose reader closed the pipe.
pub fn reader_gone() -> Error {
    Error::io(
        "the client stopped reading the stream (it closed the pipe's read end: the upload was \
         interrupted or imgctl exited); run the same command again to resume",
        std::io::Error::from_raw_os_error(libc::EPIPE),
    )
}

/// Writes all of `bytes` at the pipe's current position (a pipe has no other), waiting for
/// room in slices of [`POLL_SLICE`]; `Cancelled` as soon as `cancel` or `stop` is seen set.
/// The pipe must be non-blocking ([`set_nonblocking`]), or a full pipe blocks the `write`.
pub fn write_all(
    pipe: &File,
    mut bytes: &[u8],
    cancel: &AtomicBool,
    stop: &AtomicBool,
) -> Result<()> {
    let timeout = PollTimeout::try_from(POLL_SLICE).unwrap_or(PollTimeout::MAX);
    while !bytes.is_empty() {
        if cancel.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        match nix::unistd::write(pipe.as_fd(), bytes) {
            Ok(0) => return Err(reader_gone()),
            Ok(written) => {
                bytes = &bytes[written..];
                continue;
            }
            Err(Errno::EAGAIN) => {}
            Err(Errno::EINTR) => continue,
            Err(Errno::EPIPE) => return Err(reader_gone()),
            Err(errno) => return Err(Error::io("writing the stream into its pipe", errno)),
        }
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => return Err(Error::io("poll on the stream's pipe", errno)),
        }
        // POLLERR (the read end is closed) needs no case of its own: the next write says EPIPE.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Instant;

    fn pipe() -> (File, File) {
        let (read, write) = nix::unistd::pipe().unwrap();
        (File::from(read), File::from(write))
    }

    #[test]
    fn a_reader_that_never_reads_is_left_on_cancel() {
        let (_read, write) = pipe();
        set_nonblocking(&write).unwrap();
        let cancel = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                let started = Instant::now();
                let result = write_all(&write, &vec![7u8; 4 << 20], &cancel, &stop);
                (result, started.elapsed())
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !writer.is_finished(),
                "a full pipe must make the writer wait"
            );
            cancel.store(true, Ordering::SeqCst);
            let (result, _) = writer.join().unwrap();
            assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
        });
    }

    #[test]
    fn a_closed_reader_is_an_error_not_a_signal() {
        let (read, write) = pipe();
        set_nonblocking(&write).unwrap();
        drop(read);
        let flag = AtomicBool::new(false);
        let error = write_all(&write, b"bytes", &flag, &flag).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("the client stopped reading the stream"),
            "{error}"
        );
    }

    #[test]
    fn everything_written_arrives_in_order() {
        let (mut read, write) = pipe();
        set_nonblocking(&write).unwrap();
        let bytes: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let flag = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || {
                let mut got = Vec::new();
                read.read_to_end(&mut got).unwrap();
                got
            });
            write_all(&write, &bytes, &flag, &flag).unwrap();
            drop(write);
            assert!(reader.join().unwrap() == bytes);
        });
    }
}
