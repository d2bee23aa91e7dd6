//! Crash points for testing that header write-back survives a kill at every step.
//!
//! With `debug_assertions` (test and debug builds), [`point`] kills the whole process with
//! `SIGKILL` — no unwinding, no destructors, exactly what `kill -9` or a power cut leaves —
//! when the environment variable [`ENV`] names the point reached. Release builds compile it to
//! nothing. The variable is read once per process.
//!
//! Points fired by [`super::LuksImage::commit`], each after its step's writes are synced:
//!
//! | point                 | what is on the image when it fires                                |
//! |-----------------------|-------------------------------------------------------------------|
//! | `added:keyslots`      | new key material in the keyslot area; headers still the old ones  |
//! | `added:primary-torn`  | first half of the primary header's changes (LUKS2 only)           |
//! | `added:primary`       | the new primary header (LUKS1: the new phdr; the add is durable)  |
//! | `added:secondary`     | the new secondary header too (LUKS2 only; the add is complete)    |
//! | `removed:primary-torn`| first half of the primary header's changes (LUKS2 only)           |
//! | `removed:primary`     | the new primary header (LUKS1: the phdr; the removal is durable)  |
//! | `removed:secondary`   | the new secondary header too (LUKS2 only)                         |
//! | `removed:keyslots`    | the removed keyslot's key material wiped (the removal is complete)|
//!
//! A qcow2's LUKS1 header is edited on a memfd copy, so the points above fire before anything
//! reaches the qcow2 file; [`crate::formats::qcow2::write_back_luks_header`] then fires:
//!
//! | point                  | what is in the qcow2 file when it fires                          |
//! |------------------------|------------------------------------------------------------------|
//! | `qcow2:added:keyslots` | new key material in the keyslot area; the phdr still the old one |
//! | `qcow2:removed:primary`| the new phdr (the removal is durable); old material not yet wiped|

//!
//! An encryption with a LUKS header ([`crate::jobs::output::write_container`] and
//! [`super::header::start_format`]) fires:
//!
//! | point                     | what is in the output when it fires                           |
//! |---------------------------|---------------------------------------------------------------|
//! | `encrypt:deriving`        | nothing or a partial payload: the keyslot's derivation starts |
//! | `encrypt:copying`         | the first payload bytes; no header                            |
//! | `encrypt:payload-durable` | the whole payload, synced; no header (it is written next)     |

//!
//! A resumable raw LUKS encryption ([`crate::jobs::resume`]) also fires `encrypt:checkpoint`
//! after each checkpoint is saved, `encrypt:header-written` once the finished header is synced
//! (before its checkpoint is removed), and [`delay`] there slows the copy down by
//! [`DELAY_ENV`] milliseconds per checkpoint, so a test can interrupt a small job at random
//! points (debug builds only, like the crash points).

/// Milliseconds [`delay`] sleeps (debug builds only): `IMGCRYPTD_TEST_CHECKPOINT_DELAY_MS`.
pub const DELAY_ENV: &str = "IMGCRYPTD_TEST_CHECKPOINT_DELAY_MS";

/// Sleeps [`DELAY_ENV`] milliseconds if it is set (debug builds only).
#[cfg(debug_assertions)]
pub fn delay() {
    static MILLIS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let millis = *MILLIS.get_or_init(|| {
        std::env::var(DELAY_ENV)
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0)
    });
    if millis > 0 {
        std::thread::sleep(std::time::Duration::from_millis(millis));
    }
}

/// Does nothing: the test delay exists in debug builds only.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn delay() {}

/// The environment variable naming the crash point.
pub const ENV: &str = "IMGCRYPTD_CRASH_AT";

/// Kills the process with `SIGKILL` if [`ENV`] equals `name` (debug builds only).
#[cfg(debug_assertions)]
pub fn point(name: &str) {
    static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let target = TARGET.get_or_init(|| std::env::var(ENV).ok());
    if target.as_deref() == Some(name) {
        tracing::warn!("{ENV}={name}: killing the daemon with SIGKILL");
        // SIGKILL cannot be caught or ignored, so raise does not return.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Does nothing: crash points exist in debug builds only.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_name: &str) {}
