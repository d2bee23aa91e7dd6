//! Writing a streamed output into the pipe a client passed ([`imgcrypt_proto::stream`]).
//!
//! The reader is the client's process, which may stop reading at any time (killed, stuck on
//! a slow upload, or simply never reading). A blocking `write` into a full pipe would then hold
//! a worker thread, and with it the job and its descriptors, for as long as the client likes.
//!
//! The client's descriptor is never switched to `O_NONBLOCK`: that flag lives on the open file
//! description, which the client shares, and a client that cleared it again would turn the
//! daemon's next write into one that blocks until the client pleases. Instead every write
//! goes through a relay pipe the daemon alone holds ([`StreamPipe`]), non-blocking from birth
//! (`pipe2(O_NONBLOCK)`), and is moved on into the client's pipe with
//! `splice(SPLICE_F_NONBLOCK)`, which does not block whatever the client's flags say. Waits
//! are `poll(POLLOUT)` on the client's pipe in slices of [`POLL_SLICE`], checking the job's
//! cancel flag (set when the client's connection closes, on `imgctl cancel` and on daemon
//! stop) between slices; a reader that takes nothing for [`STALL_LIMIT`] ends the job with an
//! error that says so. A stalled reader costs at most one slice of delay after a cancel, never
//! a pinned thread. The relay adds no copy: `splice` moves the relay's pages into the client's
//! pipe.
//!
//! A reader that closed its end makes the splice fail with `EPIPE`. The signal that would come
//! with it (`SIGPIPE`) is ignored: the Rust runtime sets it to `SIG_IGN` before `main`, and
//! the daemon installs handlers only for SIGTERM and SIGINT, so the error comes back as a
//! value and is reported as "the client stopped reading the stream".

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::{Error, Result};

/// How long one `poll` waits before the cancel flag is checked again.
pub const POLL_SLICE: Duration = Duration::from_millis(100);

/// How long a reader may take nothing before the stream is given up: long enough for an
/// upload that retries a part against a slow store, short enough that a client that stopped
/// reading without closing its pipe does not hold a job for hours.
pub const STALL_LIMIT: Duration = Duration::from_secs(300);

/// Overrides [`STALL_LIMIT`] in milliseconds (debug builds only), so a test can see it end a
/// job.
pub const STALL_ENV: &str = "IMGCRYPTD_TEST_STREAM_STALL_MS";

/// The relay pipe's capacity asked for (the kernel's default is 64 KiB; a larger one means
/// fewer system calls per chunk). Best effort: a smaller pipe works the same.
const RELAY_CAPACITY: i32 = 1 << 20;

/// The stall limit in force: [`STALL_LIMIT`], or [`STALL_ENV`] in debug builds.
pub fn stall_limit() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(millis) = std::env::var(STALL_ENV)
        .ok()
        .and_then(|text| text.parse().ok())
    {
        return Duration::from_millis(millis);
    }
    STALL_LIMIT
}

/// The error of a stream whose reader closed the pipe.
pub fn reader_gone() -> Error {
    Error::io(
        "the client stopped reading the stream (it closed the pipe's read end: the upload was \
         interrupted or imgctl exited); run the same command again to resume",
        std::io::Error::from_raw_os_error(libc::EPIPE),
    )
}

fn reader_stalled(limit: Duration) -> Error {
    Error::io(
        format!(
            "the client read nothing from the stream for {} s (a stuck upload, or imgctl \
             stopped reading without closing the pipe): the job is stopped; run the same \
             command again to resume",
            limit.as_secs_f64()
        ),
        std::io::Error::from(std::io::ErrorKind::TimedOut),
    )
}

/// The client's pipe, written through a relay pipe only the daemon holds (see the module
/// documentation). One writer at a time: the streamed copy passes turns in chunk order.
pub struct StreamPipe<'f> {
    client: &'f File,
    relay_read: OwnedFd,
    relay_write: OwnedFd,
    stall_limit: Duration,
}

impl<'f> StreamPipe<'f> {
    /// A relay in front of `client`, a pipe's write end, with the [`stall_limit`] in force.
    pub fn new(client: &'f File) -> Result<Self> {
        Self::with_stall_limit(client, stall_limit())
    }

    /// As [`Self::new`] with a given stall limit.
    pub fn with_stall_limit(client: &'f File, stall_limit: Duration) -> Result<Self> {
        let (relay_read, relay_write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
            .map_err(|e| Error::io("pipe2 for the stream's relay", e))?;
        // Best effort (see RELAY_CAPACITY).
        let _ = fcntl(relay_write.as_fd(), FcntlArg::F_SETPIPE_SZ(RELAY_CAPACITY));
        Ok(Self {
            client,
            relay_read,
            relay_write,
            stall_limit,
        })
    }

    /// Writes all of `bytes` into the client's pipe (a pipe has no position but its end) and
    /// returns once the last of them is there; `Cancelled` as soon as `cancel` or `stop` is
    /// seen set, and an error if the reader closed its end or took nothing for the stall
    /// limit.
    pub fn write_all(
        &self,
        mut bytes: &[u8],
        cancel: &AtomicBool,
        stop: &AtomicBool,
    ) -> Result<()> {
        let timeout = PollTimeout::try_from(POLL_SLICE).unwrap_or(PollTimeout::MAX);
        // Bytes in the relay, not yet in the client's pipe.
        let mut relayed = 0usize;
        let mut last_progress = Instant::now();
        while !bytes.is_empty() || relayed > 0 {
            if cancel.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            if !bytes.is_empty() {
                match nix::unistd::write(&self.relay_write, bytes) {
                    Ok(written) => {
                        bytes = &bytes[written..];
                        relayed += written;
                    }
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                    Err(errno) => {
                        return Err(Error::io("writing the stream into its relay pipe", errno))
                    }
                }
            }
            if relayed == 0 {
                continue;
            }
            match splice(
                &self.relay_read,
                None,
                self.client,
                None,
                relayed,
                SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Ok(0) => {
                    return Err(Error::io(
                        "splicing the stream into the client's pipe",
                        std::io::Error::other("the relay pipe returned end of file"),
                    ))
                }
                Ok(moved) => {
                    relayed -= moved;
                    last_progress = Instant::now();
                    continue;
                }
                Err(Errno::EAGAIN) => {}
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE) => return Err(reader_gone()),
                Err(errno) => {
                    return Err(Error::io(
                        "splicing the stream into the client's pipe",
                        errno,
                    ))
                }
            }
            // The client's pipe is full.
            if last_progress.elapsed() >= self.stall_limit {
                return Err(reader_stalled(self.stall_limit));
            }
            let mut fds = [PollFd::new(self.client.as_fd(), PollFlags::POLLOUT)];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => return Err(Error::io("poll on the stream's pipe", errno)),
            }
            // POLLERR (the read end is closed) needs no case of its own: the next splice says
            // EPIPE.
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pipe() -> (File, File) {
        let (read, write) = nix::unistd::pipe().unwrap();
        (File::from(read), File::from(write))
    }

    fn flags(file: &File) -> OFlag {
        OFlag::from_bits_retain(fcntl(file.as_fd(), FcntlArg::F_GETFL).unwrap())
    }

    #[test]
    fn a_reader_that_never_reads_is_left_on_cancel_even_if_it_clears_o_nonblock() {
        let (_read, write) = pipe();
        let pipe = StreamPipe::new(&write).unwrap();
        let cancel = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                let result = pipe.write_all(&vec![7u8; 4 << 20], &cancel, &stop);
                done.store(true, Ordering::SeqCst);
                result
            });
            // A hostile client keeps its (shared) description blocking, as it may.
            let client = scope.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    let blocking = flags(&write) - OFlag::O_NONBLOCK;
                    fcntl(write.as_fd(), FcntlArg::F_SETFL(blocking)).unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !writer.is_finished(),
                "a full pipe must make the writer wait"
            );
            let cancelled = Instant::now();
            cancel.store(true, Ordering::SeqCst);
            let result = writer.join().unwrap();
            assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
            assert!(cancelled.elapsed() < Duration::from_secs(2));
            client.join().unwrap();
        });
        assert!(
            !flags(&write).contains(OFlag::O_NONBLOCK),
            "the client's description is left as the client set it"
        );
    }

    #[test]
    fn a_reader_that_takes_nothing_for_the_stall_limit_ends_the_stream() {
        let (mut read, write) = pipe();
        let pipe = StreamPipe::with_stall_limit(&write, Duration::from_millis(400)).unwrap();
        let flag = AtomicBool::new(false);
        let started = Instant::now();
        std::thread::scope(|scope| {
            // A reader that takes a little, then stops without closing.
            let reader = scope.spawn(move || {
                let mut some = vec![0u8; 64 << 10];
                read.read_exact(&mut some).unwrap();
                read
            });
            let error = pipe
                .write_all(&vec![1u8; 8 << 20], &flag, &flag)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("the client read nothing from the stream for 0.4 s"),
                "{error}"
            );
            drop(reader.join().unwrap());
        });
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[test]
    fn a_slow_reader_is_not_a_stalled_one() {
        let (mut read, write) = pipe();
        let bytes: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        let flag = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || {
                let mut got = Vec::new();
                let mut buffer = vec![0u8; 1 << 20];
                loop {
                    // Slower than the limit in total, never idle for as long as it.
                    std::thread::sleep(Duration::from_millis(50));
                    match read.read(&mut buffer).unwrap() {
                        0 => return got,
                        n => got.extend_from_slice(&buffer[..n]),
                    }
                }
            });
            let pipe = StreamPipe::with_stall_limit(&write, Duration::from_millis(300)).unwrap();
            pipe.write_all(&bytes, &flag, &flag).unwrap();
            drop(pipe);
            drop(write);
            assert!(reader.join().unwrap() == bytes);
        });
    }

    #[test]
    fn a_closed_reader_is_an_error_not_a_signal() {
        let (read, write) = pipe();
        drop(read);
        let pipe = StreamPipe::new(&write).unwrap();
        let flag = AtomicBool::new(false);
        let error = pipe.write_all(b"bytes", &flag, &flag).unwrap_err();
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
        let bytes: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
        let flag = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || {
                let mut got = Vec::new();
                read.read_to_end(&mut got).unwrap();
                got
            });
            let pipe = StreamPipe::new(&write).unwrap();
            // Pieces of odd sizes: each call returns only once its bytes are all out.
            for piece in bytes.chunks(777_777) {
                pipe.write_all(piece, &flag, &flag).unwrap();
            }
            drop(pipe);
            drop(write);
            assert!(reader.join().unwrap() == bytes);
        });
    }
}
