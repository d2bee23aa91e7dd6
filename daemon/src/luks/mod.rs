//! LUKS headers through libcryptsetup, formatted on daemon-owned memory, and the layout rule.
//!
//! - [`header`]: builds a LUKS1/LUKS2 header with one keyslot in a memfd, never touching a
//!   client's descriptor; the keyslot's derivation can run on its own thread while the job
//!   copies the payload, and the job copies the header to the output last.
//! - [`layout`]: how big the output is for a given header and source.
//! - [`token`]: the `imgcrypt-key` LUKS2 token that names the key file of a keyslot.
//! - [`image`]: an existing image's header, read from a passed descriptor into a daemon-owned
//!   memfd copy; keyslot edits happen on the copy and are written back in a crash-safe order.
//! - [`unlock`]: which candidate key opens an image, by token first and by trial only where the
//!   image carries no fingerprint.
//! - [`payload`]: the decrypted payload of an image as a [`crate::formats::SourceImage`].
//! - [`bench`](mod@bench): the PBKDF benchmark, measured once per configuration and cached for an hour.
//! - [`cost`]: what deriving a keyslot costs, and the caps a keyslot must fit before it is
//!   derived.
//! - [`crash`]: kill points for the write-back's crash tests.
//!
//! libcryptsetup writes its messages through a process-wide callback; this module routes them
//! to `tracing` under the target [`LOG_TARGET`] and keeps the errors of the current thread so a
//! failure's [`Error::Luks`] says what libcryptsetup said, not only an errno.
//! libcryptsetup never puts passphrases or volume keys in its messages (its debug output carries
//! header metadata, which is public), so routing them is safe.

pub mod bench;
pub mod cost;
pub mod crash;
pub mod header;
pub mod image;
pub mod layout;
pub mod payload;
pub mod token;
pub mod unlock;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Once;

use libcryptsetup_rs::consts::vals::{CryptDebugLevel, CryptLogLevel};
use libcryptsetup_rs::LibcryptErr;

use crate::Error;
pub use header::{
    format_header, format_header_with, start_format, FormattedHeader, HeaderContext, HeaderSpec,
    PendingKeyslot, PreparedHeader, Stage, VOLUME_KEY_BYTES,
};
pub use image::{Change, Keyslot, LuksImage};
pub use layout::{output_size, payload_size};
pub use payload::LuksPayload;

/// `tracing` target of libcryptsetup's own messages (filter with
/// `RUST_LOG=imgcryptd::libcryptsetup=debug`).
pub const LOG_TARGET: &str = "imgcryptd::libcryptsetup";

/// Error lines kept per thread for the next [`libcryptsetup_error`]; libcryptsetup logs a few at
/// most per failed call.
const KEPT_ERRORS: usize = 4;

thread_local! {
    /// libcryptsetup's error messages on this thread since the last [`clear_errors`].
    static ERRORS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Sends libcryptsetup's messages to `tracing` from now on (idempotent), and turns its debug
/// output on exactly when someone listens at debug level.
///
/// The debug level is process-wide in libcryptsetup; it follows the `tracing` filter each time
/// this is called, which is at the start of each operation.
pub fn route_libcryptsetup_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| libcryptsetup_rs::set_log_callback::<()>(Some(log_to_tracing), None));
    let level = if tracing::enabled!(target: LOG_TARGET, tracing::Level::TRACE) {
        CryptDebugLevel::Json
    } else if tracing::enabled!(target: LOG_TARGET, tracing::Level::DEBUG) {
        CryptDebugLevel::All
    } else {
        CryptDebugLevel::None
    };
    libcryptsetup_rs::set_debug_level(level);
}

/// Forgets the errors libcryptsetup logged on this thread so far.
pub fn clear_errors() {
    ERRORS.with(|errors| errors.borrow_mut().clear());
}

/// An [`Error::Luks`] for a failed libcryptsetup call, with what libcryptsetup logged on this
/// thread since [`clear_errors`] (it usually explains the errno).
pub fn libcryptsetup_error(operation: &'static str, error: LibcryptErr) -> Error {
    let logged = ERRORS.with(|errors| std::mem::take(&mut *errors.borrow_mut()));
    let cause = match error {
        LibcryptErr::IOError(io) => io.to_string(),
        other => other.to_string(),
    };
    let message = if logged.is_empty() {
        cause
    } else {
        format!("{} ({cause})", logged.join(" "))
    };
    Error::Luks { operation, message }
}

/// The cipher specification of a loaded or formatted device, as cryptsetup writes it
/// (`aes-xts-plain64`).
pub(crate) fn cipher_spec(
    status: &mut libcryptsetup_rs::CryptDeviceStatusHandle<'_>,
) -> crate::Result<String> {
    Ok(format!(
        "{}-{}",
        status
            .get_cipher()
            .map_err(|error| libcryptsetup_error("reading the cipher", error))?,
        status
            .get_cipher_mode()
            .map_err(|error| libcryptsetup_error("reading the cipher mode", error))?
    ))
}

/// libcryptsetup's log callback. Runs synchronously on the thread that called into
/// libcryptsetup, which is why the thread-local error list works.
unsafe extern "C" fn log_to_tracing(level: c_int, message: *const c_char, _: *mut c_void) {
    if message.is_null() {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string that lives for the whole call.
    let message = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    let message = message.trim_end();
    match CryptLogLevel::try_from(level) {
        Ok(CryptLogLevel::Error) => {
            ERRORS.with(|errors| {
                let mut errors = errors.borrow_mut();
                if errors.len() < KEPT_ERRORS && errors.last().map(String::as_str) != Some(message)
                {
                    errors.push(message.to_string());
                }
            });
            // The caller gets the message in its error too and decides how bad it is.
            tracing::warn!(target: LOG_TARGET, "{message}");
        }
        Ok(CryptLogLevel::Normal) => tracing::info!(target: LOG_TARGET, "{message}"),
        Ok(CryptLogLevel::DebugJson) => {
            tracing::trace!(target: LOG_TARGET, "{message}")
        }
        _ => tracing::debug!(target: LOG_TARGET, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A `tracing` writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn libcryptsetup_messages_reach_tracing_and_errors() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let error = tracing::subscriber::with_default(subscriber, || {
            route_libcryptsetup_logs();
            clear_errors();
            let failure =
                libcryptsetup_rs::CryptInit::init(std::path::Path::new("/nonexistent/imgcrypt"))
                    .err()
                    .expect("a missing device cannot be opened");
            libcryptsetup_error("opening", failure)
        });
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(log.contains(LOG_TARGET), "{log}");
        assert!(log.contains("/nonexistent/imgcrypt"), "{log}");
        let Error::Luks { operation, message } = error else {
            panic!("{error:?}")
        };
        assert_eq!(operation, "opening");
        assert!(message.contains("/nonexistent/imgcrypt"), "{message}");
    }
}
