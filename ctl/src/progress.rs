//! What the user sees while a job runs and when it ends: a progress bar on a terminal, JSON
//! lines with `--json`, nothing but the summary otherwise (logs and pipes stay clean).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use imgcrypt_proto::api::{
    DecryptSummary, ImageInfo, OutputFormat, PbkdfBenchmark, Phase, Progress, RewriteSummary,
    SourceComparison, SourceInfo, Summary, UnlockMethod, Unlocked, VerifySummary,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// A transfer imgctl is making itself, for its JSON rate and ETA.
pub struct Transfer {
    label: String,
    started: Instant,
    /// Bytes already done when it began.
    from: u64,
}

/// How to show a job.
pub enum Display {
    /// A live bar on stderr, and the phase it shows.
    Terminal(Option<(ProgressBar, Phase)>),
    /// One JSON object per line on stdout, and the transfer whose rate is being measured.
    Json(Option<Transfer>),
    /// Only the final summary.
    Quiet,
}

impl Display {
    /// Picks the display: JSON if asked, a bar if stderr is a terminal, else quiet.
    pub fn new(json: bool) -> Self {
        if json {
            Self::Json(None)
        } else if std::io::stderr().is_terminal() {
            Self::Terminal(None)
        } else {
            Self::Quiet
        }
    }

    /// Shows a progress report.
    pub fn progress(&mut self, progress: &Progress) {
        match self {
            Self::Json(_) => json_line(json!({ "event": "progress", "progress": progress })),
            Self::Terminal(state) => {
                let (bar, phase) = state.get_or_insert_with(|| (new_bar(), progress.phase));
                if *phase != progress.phase {
                    // Rate and ETA are about this phase: the key derivation before the copy is
                    // not I/O and must not drag the copy's rate down.
                    bar.reset_elapsed();
                    bar.reset_eta();
                    *phase = progress.phase;
                }
                bar.set_message(match progress.queue_position {
                    Some(position) if progress.phase == Phase::Queued => {
                        format!("queued (position {position})")
                    }
                    _ => phase_label(progress.phase).to_string(),
                });
                if progress.bytes_total > 0 {
                    bar.set_style(bytes_style());
                    bar.set_length(progress.bytes_total);
                    bar.set_position(progress.bytes_done);
                } else {
                    // A phase without bytes (benchmark, key derivation, header): a spinner
                    // with what is happening, never `0 B/0 B`.
                    bar.set_style(spinner_style());
                }
            }
            Self::Quiet => {}
        }
    }

    /// Shows the progress of work imgctl does itself (uploading, hashing a local file):
    /// `label` on the bar with bytes, rate and ETA, or a JSON line
    /// `{"event":"progress","operation":label,"bytes_done":…,"bytes_total":…,
    /// "bytes_per_second":…,"eta_seconds":…}`: the rate of this run's bytes since `label`
    /// began (a resumed upload's stored parts do not count), no ETA before any byte moved.
    pub fn transfer(&mut self, label: &str, done: u64, total: u64) {
        match self {
            Self::Json(transfer) => {
                let transfer = match transfer {
                    Some(transfer) if transfer.label == label => transfer,
                    _ => transfer.insert(Transfer {
                        label: label.to_string(),
                        started: Instant::now(),
                        from: done,
                    }),
                };
                let elapsed = transfer.started.elapsed().as_secs_f64();
                let moved = done.saturating_sub(transfer.from) as f64;
                let rate = if elapsed > 0.0 { moved / elapsed } else { 0.0 };
                let eta = (rate > 0.0).then(|| (total.saturating_sub(done) as f64 / rate).ceil());
                json_line(json!({
                    "event": "progress",
                    "operation": label,
                    "bytes_done": done,
                    "bytes_total": total,
                    "bytes_per_second": rate.round() as u64,
                    "eta_seconds": eta.map(|seconds| seconds as u64),
                }))
            }
            Self::Terminal(state) => {
                // The bar's phase slot: Copy, the byte-moving phase an upload follows or joins.
                let (bar, _) = state.get_or_insert_with(|| (new_bar(), Phase::Copy));
                if bar.message() != label {
                    bar.reset_elapsed();
                    bar.reset_eta();
                    bar.set_message(label.to_string());
                    bar.set_style(bytes_style());
                }
                bar.set_length(total);
                bar.set_position(done);
            }
            Self::Quiet => {}
        }
    }

    /// Shows a notice from the daemon.
    pub fn notice(&mut self, text: &str) {
        match self {
            Self::Json(_) => json_line(json!({ "event": "notice", "message": text })),
            Self::Terminal(Some((bar, _))) => bar.suspend(|| eprintln!("imgctl: warning: {text}")),
            _ => eprintln!("imgctl: warning: {text}"),
        }
    }

    /// Tells the user something that is not a warning (e.g. that a job resumes).
    pub fn info(&mut self, text: &str) {
        match self {
            Self::Json(_) => json_line(json!({ "event": "info", "message": text })),
            Self::Terminal(Some((bar, _))) => bar.suspend(|| eprintln!("imgctl: {text}")),
            _ => eprintln!("imgctl: {text}"),
        }
    }

    /// Ends the bar and prints the encryption summary.
    pub fn summary(&mut self, source: &Path, output: &Path, summary: &Summary, next: &[String]) {
        let mut text = render_summary(source, output, summary);
        if !next.is_empty() {
            text.push_str("Next steps:\n");
            for (number, step) in next.iter().enumerate() {
                text.push_str(&format!("  {}. {step}\n", number + 1));
            }
        }
        self.finish(
            json!({
                "event": "summary",
                "source": source,
                "output": output,
                "summary": summary,
                "next_steps": next,
            }),
            &text,
        );
    }

    /// Ends the bar and prints a job's result: `event` as a JSON line with `--json`, else
    /// `text` (which ends with a newline).
    pub fn finish(&mut self, event: serde_json::Value, text: &str) {
        self.clear();
        match self {
            Self::Json(_) => json_line(event),
            _ => print!("{text}"),
        }
    }

    /// Reports a failure (the caller also prints the message on stderr).
    pub fn error(&mut self, name: Option<&str>, message: &str) {
        self.clear();
        if let Self::Json(_) = self {
            json_line(json!({ "event": "error", "error": name, "message": message }));
        }
    }

    fn clear(&mut self) {
        if let Self::Terminal(Some((bar, _))) = self {
            bar.finish_and_clear();
        }
    }
}

fn new_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(spinner_style());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The copy's bar: bytes, rate, ETA.
fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .expect("static template is valid")
    .progress_chars("=> ")
}

/// A phase that moves no bytes: a spinner, what is happening, and for how long.
fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template is valid")
}

/// What a phase is called on the bar and in `imgctl jobs`.
pub fn phase_label(phase: Phase) -> &'static str {
    match phase {
        Phase::Queued => "queued",
        Phase::Format => "formatting the header",
        Phase::Benchmark => "benchmarking the key derivation",
        Phase::Derive => "deriving the keyslot key",
        Phase::Header => "writing the header",
        // A streamed qcow2's read of its source for the clusters holding data.
        Phase::Scan => "scanning for data",
        Phase::Copy => "copying",
        Phase::Sync => "syncing",
        Phase::Unlock => "unlocking",
        Phase::Keyslots => "keyslots",
        Phase::Hash => "hashing",
    }
}

fn json_line(value: serde_json::Value) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{value}");
    let _ = stdout.flush();
}

/// The human summary, one fact per line.
pub fn render_summary(source: &Path, output: &Path, s: &Summary) -> String {
    let total_seconds = seconds(s.elapsed_ms);
    let copy_seconds = seconds(s.copy_ms);
    // Over the copy alone: the key derivation's deliberate slowness is not I/O speed.
    let copied = if s.output_format == OutputFormat::Luks {
        // A resumed run copied the payload from where the interrupted one got to.
        s.payload_size - s.resumed_from.unwrap_or(0).min(s.payload_size)
    } else {
        s.allocated_bytes
    };
    let throughput = throughput(copied, s.copy_ms);
    let mut rows: Vec<(&str, String)> = vec![
        ("output", output.display().to_string()),
        (
            "source",
            format!(
                "{} ({}, {})",
                source.display(),
                s.source_format.display_name(),
                sized(s.virtual_size)
            ),
        ),
        ("format", s.output_format.display_name().to_string()),
    ];
    if let Some(target) = s.target {
        rows.push((
            "target",
            format!("{} (its import rules were checked)", target.display_name()),
        ));
    }
    if s.output_format != OutputFormat::Luks && s.output_virtual_size != s.virtual_size {
        rows.push((
            "virtual size",
            format!(
                "{} (the source's, rounded up to the container's unit; the rest reads as zeros)",
                sized(s.output_virtual_size)
            ),
        ));
    }
    if let Some(version) = s.luks_version {
        rows.push(("LUKS version", version.display_name().to_string()));
    }
    rows.push((
        "cipher",
        format!("{} ({}-bit key)", s.cipher, s.key_size_bits),
    ));
    rows.push(("sector size", format!("{} bytes", s.sector_size)));
    if s.output_format == OutputFormat::Luks {
        rows.push(("data offset", sized(s.data_offset)));
        rows.push(("payload size", sized(s.payload_size)));
    } else {
        rows.push((
            "data stored",
            format!(
                "{} (only what the source uses; the rest stays unallocated)",
                sized(s.allocated_bytes)
            ),
        ));
    }
    rows.push(("output size", sized(s.output_size)));
    rows.push(("key fingerprint", format!("sha256:{}", s.key_fingerprint)));
    if let Some(hash) = &s.vhd_key_hash {
        rows.push(("vhd key hash", hash.clone()));
    }
    rows.push(("key derivation", s.pbkdf.clone()));
    if let Some(benchmark) = &s.pbkdf_benchmark {
        rows.push(("benchmark", render_benchmark(benchmark)));
    }
    rows.push(("engine", format!("{:?}", s.engine).to_lowercase()));
    if let Some(offset) = s.resumed_from {
        rows.push((
            "resumed from",
            format!("payload byte {offset} (an interrupted run's checkpoint)"),
        ));
    }
    rows.push((
        "time",
        format!("{total_seconds:.2} s (copy {copy_seconds:.2} s)"),
    ));
    rows.push(("throughput", throughput));
    let mut text = String::from("Encrypted image written.\n");
    push_rows(&mut text, rows);
    text
}

/// What `inspect` shows of a source image: what an encryption would read.
pub fn render_source(image: &Path, source: &SourceInfo) -> String {
    let mut text = format!(
        "Source image {} ({}, not encrypted)\n",
        image.display(),
        source.format.display_name()
    );
    let mut rows = vec![
        ("virtual size", sized(source.virtual_size)),
        ("file size", sized(source.file_size)),
        (
            "allocated",
            format!(
                "{} (at most; the rest reads as zeros and is never read)",
                sized(source.allocated_bytes)
            ),
        ),
    ];
    if let Some(unit) = source.allocation_unit {
        rows.push(("allocation unit", sized(unit)));
    }
    for layer in &source.backing_chain {
        rows.push((
            "backed by",
            format!(
                "{} ({}, {})",
                layer.name,
                layer.format.display_name(),
                sized(layer.virtual_size)
            ),
        ));
    }
    push_rows(&mut text, rows);
    text
}

/// What `inspect` shows: the header's facts, then one line per keyslot.
pub fn render_inspect(image: &Path, info: &ImageInfo) -> String {
    let mut text = match info.format {
        OutputFormat::Luks => format!("LUKS image {}\n", image.display()),
        format => format!("Image {} ({})\n", image.display(), format.display_name()),
    };
    let mut facts: Vec<(&str, String)> = Vec::new();
    if let Some(version) = info.luks_version {
        facts.push(("LUKS version", version.display_name().to_string()));
    }
    if let Some(size) = info.virtual_size {
        facts.push(("virtual size", sized(size)));
    }
    if let Some(bytes) = info.allocated_bytes {
        facts.push(("data stored", sized(bytes)));
    }
    if let Some(key) = &info.vhd_key {
        facts.push(("key hash", key.hash.clone()));
        facts.push(("key nonce", key.nonce.clone()));
        facts.push((
            "matching key",
            key.matching_key
                .clone()
                .unwrap_or_else(|| "none of the keys given".to_string()),
        ));
    }
    push_rows(&mut text, facts);
    let rows = [
        ("UUID", info.uuid.clone()),
        (
            "cipher",
            if info.key_size_bits == 0 {
                // A VHD records no key size: the key's length (32 or 64 bytes) decides.
                format!(
                    "{} (AES-128 or AES-256: the key's size decides)",
                    info.cipher
                )
            } else {
                format!("{} ({}-bit key)", info.cipher, info.key_size_bits)
            },
        ),
        ("sector size", format!("{} bytes", info.sector_size)),
        ("data offset", sized(info.data_offset)),
        ("payload size", sized(info.payload_size)),
        ("image size", sized(info.image_size)),
    ];
    push_rows(&mut text, rows);
    // A vhd-util VHD has no keyslots: its key hash (above) is what a key is matched against.
    if info.keyslots.is_empty() && info.vhd_key.is_none() {
        push_rows(
            &mut text,
            [(
                "keyslots",
                "none active: no key opens this image".to_string(),
            )],
        );
    }
    for slot in &info.keyslots {
        let fingerprint = match &slot.fingerprint {
            Some(fingerprint) => format!("sha256:{fingerprint}"),
            None => "no fingerprint (LUKS1 or made without imgcrypt: keys are tried in ring \
                     order)"
                .to_string(),
        };
        let matching = match (&slot.matching_key, &slot.fingerprint) {
            (Some(name), _) => format!(", matches {name}"),
            (None, Some(_)) => ", matches none of the keys given".to_string(),
            (None, None) => String::new(),
        };
        push_rows(
            &mut text,
            [(
                format!("keyslot {}", slot.keyslot).as_str(),
                format!("{}, {fingerprint}{matching}", slot.pbkdf),
            )],
        );
    }
    text
}

/// What `decrypt` shows when the plaintext is in place.
pub fn render_decrypt(image: &Path, output: &Path, s: &DecryptSummary) -> String {
    let mut text = String::from("Decrypted image written.\n");
    push_rows(
        &mut text,
        [
            ("output", output.display().to_string()),
            ("image", image.display().to_string()),
            ("unlocked with", render_unlocked(&s.unlocked)),
            ("payload size", sized(s.payload_size)),
            (
                "time",
                format!(
                    "{:.2} s (copy {:.2} s)",
                    seconds(s.elapsed_ms),
                    seconds(s.copy_ms)
                ),
            ),
            ("throughput", throughput(s.payload_size, s.copy_ms)),
        ],
    );
    text
}

/// What `verify` shows: the plaintext's hash first (the line scripts look for), then the
/// comparison with the source when there is one.
pub fn render_verify(image: &Path, source: Option<&Path>, s: &VerifySummary) -> String {
    let mut text = format!("plaintext sha256: {}\n", s.plaintext_sha256);
    let mut rows = vec![
        ("image", image.display().to_string()),
        ("unlocked with", render_unlocked(&s.unlocked)),
        ("payload size", sized(s.payload_size)),
    ];
    if let Some(comparison) = &s.source {
        let name = source.map_or_else(|| "source".to_string(), |p| p.display().to_string());
        rows.push((
            "source",
            format!(
                "{name} ({}, {})",
                comparison.source_format.display_name(),
                sized(comparison.virtual_size)
            ),
        ));
        rows.push((
            "comparison",
            if comparison.matches {
                "matches: the plaintext is the source's disk (then zeros to the payload's end)"
                    .to_string()
            } else {
                let place = Difference::of(s.payload_size, comparison).map(Difference::tail);
                format!("DIFFERS{}", place.unwrap_or_default())
            },
        ));
    }
    rows.push(("time", format!("{:.2} s", seconds(s.elapsed_ms))));
    push_rows(&mut text, rows);
    text
}

/// `imgctl upload`'s summary: the object, its size and multipart ETag.
pub fn render_upload(
    file: &Path,
    url: &str,
    endpoint: &str,
    uploaded: &crate::upload::Uploaded,
    elapsed_ms: u64,
) -> String {
    let mut text = String::new();
    push_rows(
        &mut text,
        vec![
            ("uploaded", format!("{} to {url}", file.display())),
            ("endpoint", endpoint.to_string()),
            ("size", sized(uploaded.size)),
            ("etag", uploaded.etag.clone()),
            (
                "parts",
                format!(
                    "{} of {}",
                    uploaded.parts,
                    human_bytes(uploaded.part_size as f64)
                ),
            ),
            ("time", format!("{:.2} s", seconds(elapsed_ms))),
        ],
    );
    text
}

/// `imgctl verify --etag`'s summary.
pub fn render_etag_check(image: &Path, size: u64, etag: &str, part_size: u64) -> String {
    let mut text = String::new();
    push_rows(
        &mut text,
        vec![
            ("image", image.display().to_string()),
            ("size", sized(size)),
            ("etag", format!("{etag}: matches")),
            ("part size", human_bytes(part_size as f64)),
        ],
    );
    text
}

/// Where a verified image's plaintext and its source part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// At this byte.
    At(u64),
    /// The whole payload matched, but the source has `extra` more bytes than the image holds.
    SourceLonger {
        /// Bytes of the source past the payload.
        extra: u64,
        /// The payload size: bytes that matched.
        matching: u64,
    },
}

impl Difference {
    /// Reads the daemon's answer: a first difference at the payload's end of a source larger
    /// than the payload is the source being longer.
    pub fn of(payload_size: u64, comparison: &SourceComparison) -> Option<Self> {
        let offset = comparison.first_difference?;
        Some(
            if offset == payload_size && comparison.virtual_size > payload_size {
                Self::SourceLonger {
                    extra: comparison.virtual_size - payload_size,
                    matching: payload_size,
                }
            } else {
                Self::At(offset)
            },
        )
    }

    /// The words after "DIFFERS" or "differs from SOURCE", with their leading separator.
    pub fn tail(self) -> String {
        match self {
            Self::At(offset) => format!(" from byte {offset} ({offset:#x}) on"),
            Self::SourceLonger { extra, matching } => format!(
                ": the source is {extra} bytes longer than the image holds; the first \
                 {matching} bytes match"
            ),
        }
    }
}

/// Where a keyslot's benchmarked iterations came from (`pbkdf_benchmark`).
fn render_benchmark(benchmark: &PbkdfBenchmark) -> String {
    if benchmark.cached {
        format!(
            "cached, measured {} ago (the daemon re-measures after an hour)",
            age(benchmark.age_ms)
        )
    } else {
        format!(
            "measured for this job ({:.2} s)",
            seconds(benchmark.measured_ms)
        )
    }
}

/// What `rewrite -k` shows: which key opened the image and what changed in it.
pub fn render_rewrite(image: &Path, s: &RewriteSummary) -> String {
    let mut text = String::from(if s.reencrypted {
        "Image re-encrypted and rotated to the new key.\n"
    } else {
        "Image rotated to the new key (header only).\n"
    });
    let new_key = format!(
        "sha256:{} in keyslot {}{}",
        s.fingerprint,
        s.keyslot,
        if s.keyslot_added {
            " (added)"
        } else {
            " (it was already there: an earlier run added it)"
        }
    );
    let removed = if s.removed.is_empty() {
        "none".to_string()
    } else {
        s.removed
            .iter()
            .map(|slot| match &slot.fingerprint {
                Some(fingerprint) => format!("keyslot {} (sha256:{fingerprint})", slot.keyslot),
                None => format!("keyslot {} (no fingerprint)", slot.keyslot),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rows = vec![
        ("image", image.display().to_string()),
        ("unlocked with", render_unlocked(&s.unlocked)),
        ("new key", new_key),
        ("removed", removed),
        (
            "payload",
            if s.reencrypted {
                "re-encrypted (new volume key)".to_string()
            } else {
                "unchanged (same volume key: rewrite -k --reencrypt also replaces it)".to_string()
            },
        ),
    ];
    if let Some(offset) = s.resumed_from.filter(|&offset| offset > 0) {
        rows.push(("resumed from", format!("payload byte {offset}")));
    }
    if let Some(benchmark) = &s.pbkdf_benchmark {
        rows.push(("benchmark", render_benchmark(benchmark)));
    }
    rows.push(("time", format!("{:.2} s", seconds(s.elapsed_ms))));
    push_rows(&mut text, rows);
    text
}

/// Which key opened an image and what it cost.
pub fn render_unlocked(u: &Unlocked) -> String {
    // A vhd-util VHD has no keyslots and no key derivation: the daemon compared key hashes.
    if u.method == UnlockMethod::Token && u.attempts == 0 {
        return format!(
            "{} (sha256:{}), its decoded key matching the VHD's key hash",
            u.key_name, u.fingerprint
        );
    }
    let derivations = if u.attempts == 1 {
        "1 key derivation".to_string()
    } else {
        format!("{} key derivations", u.attempts)
    };
    let method = match u.method {
        UnlockMethod::Token => format!("matched by fingerprint, {derivations}"),
        UnlockMethod::Trial => {
            format!("found by trial in ring order, {derivations}: the image carries no fingerprint")
        }
    };
    format!(
        "{} (sha256:{}), keyslot {} ({method})",
        u.key_name, u.fingerprint, u.keyslot
    )
}

fn push_rows<L: AsRef<str>>(text: &mut String, rows: impl IntoIterator<Item = (L, String)>) {
    for (label, value) in rows {
        text.push_str(&format!("  {:<16} {value}\n", label.as_ref()));
    }
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// `42 s`, `3 min 5 s`: how old a cached measurement is.
fn age(ms: u64) -> String {
    let total = ms / 1000;
    if total < 60 {
        format!("{total} s")
    } else {
        format!("{} min {} s", total / 60, total % 60)
    }
}

/// Bytes per second over `ms`, or `-` when too quick to measure.
fn throughput(bytes: u64, ms: u64) -> String {
    if ms > 0 {
        format!("{}/s", human_bytes(bytes as f64 / seconds(ms)))
    } else {
        "-".to_string()
    }
}

fn sized(bytes: u64) -> String {
    format!("{bytes} bytes ({})", human_bytes(bytes as f64))
}

fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcrypt_proto::api::{
        EngineKind, KeyslotInfo, LuksVersion, PbkdfBenchmark, RemovedKeyslot, SourceComparison,
        SourceFormat,
    };

    #[test]
    fn a_source_shows_its_format_sizes_and_allocation_unit() {
        let source = SourceInfo {
            format: SourceFormat::VhdDynamic,
            virtual_size: 4 << 30,
            file_size: 9 << 20,
            allocated_bytes: 8 << 20,
            allocation_unit: Some(2 << 20),
            backing_chain: vec![imgcrypt_proto::api::BackingLayer {
                name: "../base.raw".into(),
                format: SourceFormat::Raw,
                virtual_size: 4 << 30,
            }],
        };
        let text = render_source(Path::new("disk.vhd"), &source);
        for expected in [
            "disk.vhd (VHD (dynamic), not encrypted)",
            "4294967296 bytes (4.0 GiB)",
            "9437184 bytes (9.0 MiB)",
            "8388608 bytes (8.0 MiB) (at most",
            "allocation unit  2097152 bytes (2.0 MiB)",
            "backed by        ../base.raw (raw, 4294967296 bytes (4.0 GiB))",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn summary_names_every_fact() {
        let summary = Summary {
            source_format: SourceFormat::VhdDynamic,
            virtual_size: 10 << 20,
            output_format: OutputFormat::Luks,
            output_virtual_size: 10 << 20,
            luks_version: Some(LuksVersion::Luks2),
            cipher: "aes-xts-plain64".into(),
            key_size_bits: 512,
            sector_size: 4096,
            data_offset: 16 << 20,
            payload_size: 10 << 20,
            output_size: 26 << 20,
            key_fingerprint: "abc=".into(),
            pbkdf: "argon2id".into(),
            pbkdf_benchmark: Some(PbkdfBenchmark {
                cached: true,
                age_ms: 125_000,
                measured_ms: 1000,
            }),
            engine: EngineKind::Userspace,
            elapsed_ms: 2000,
            copy_ms: 1000,
            bytes_written: 26 << 20,
            allocated_bytes: 10 << 20,
            vhd_key_hash: None,
            target: None,
            resumed_from: None,
        };
        let text = render_summary(Path::new("in.vhd"), Path::new("out.luks"), &summary);
        for expected in [
            "out.luks",
            "VHD (dynamic), 10485760 bytes (10.0 MiB)",
            "LUKS2",
            "aes-xts-plain64 (512-bit key)",
            "4096 bytes",
            "16777216 bytes (16.0 MiB)",
            "27262976 bytes (26.0 MiB)",
            "sha256:abc=",
            "userspace",
            "2.00 s (copy 1.00 s)",
            "10.0 MiB/s",
            "cached, measured 2 min 5 s ago",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("resumed"), "{text}");
        // A resumed run: where it resumed, and the throughput of what it copied.
        let resumed = Summary {
            resumed_from: Some(5 << 20),
            ..summary
        };
        let text = render_summary(Path::new("in.vhd"), Path::new("out.luks"), &resumed);
        for expected in ["resumed from", "payload byte 5242880", "5.0 MiB/s"] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    fn unlocked(method: UnlockMethod, attempts: u32) -> Unlocked {
        Unlocked {
            key_name: "decryption_key2".into(),
            fingerprint: "old+fp=".into(),
            keyslot: 3,
            method,
            attempts,
        }
    }

    #[test]
    fn inspect_shows_header_facts_and_each_keyslot() {
        let info = ImageInfo {
            format: OutputFormat::Luks,
            luks_version: Some(LuksVersion::Luks2),
            virtual_size: None,
            allocated_bytes: None,
            vhd_key: None,
            uuid: "0b6f7c38-1c2d-4c43-9b5e-4f1f3a0e9d11".into(),
            cipher: "aes-xts-plain64".into(),
            key_size_bits: 512,
            sector_size: 4096,
            data_offset: 16 << 20,
            payload_size: 3 << 20,
            image_size: 19 << 20,
            keyslots: vec![
                KeyslotInfo {
                    keyslot: 0,
                    pbkdf: "argon2id".into(),
                    fingerprint: Some("AAA=".into()),
                    matching_key: Some("decryption_key2".into()),
                },
                KeyslotInfo {
                    keyslot: 1,
                    pbkdf: "pbkdf2-sha256".into(),
                    fingerprint: None,
                    matching_key: None,
                },
                KeyslotInfo {
                    keyslot: 2,
                    pbkdf: "argon2id".into(),
                    fingerprint: Some("BBB=".into()),
                    matching_key: None,
                },
            ],
        };
        let text = render_inspect(Path::new("d.luks"), &info);
        for expected in [
            "d.luks",
            "LUKS2",
            "0b6f7c38-1c2d-4c43-9b5e-4f1f3a0e9d11",
            "aes-xts-plain64 (512-bit key)",
            "4096 bytes",
            "16777216 bytes (16.0 MiB)",
            "3145728 bytes (3.0 MiB)",
            "19922944 bytes (19.0 MiB)",
            "keyslot 0        argon2id, sha256:AAA=, matches decryption_key2",
            "keyslot 1        pbkdf2-sha256, no fingerprint (LUKS1 or made without imgcrypt: \
             keys are tried in ring order)",
            "keyslot 2        argon2id, sha256:BBB=, matches none of the keys given",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let empty = render_inspect(
            Path::new("d.luks"),
            &ImageInfo {
                keyslots: vec![],
                ..info
            },
        );
        assert!(empty.contains("none active"), "{empty}");
    }

    #[test]
    fn a_vhd_unlock_names_the_key_hash_not_a_keyslot() {
        let text = render_unlocked(&unlocked(UnlockMethod::Token, 0));
        assert!(text.contains("key hash"), "{text}");
        assert!(!text.contains("keyslot"), "{text}");
    }

    #[test]
    fn unlocked_says_which_key_and_how() {
        let token = render_unlocked(&unlocked(UnlockMethod::Token, 1));
        assert_eq!(
            token,
            "decryption_key2 (sha256:old+fp=), keyslot 3 (matched by fingerprint, 1 key \
             derivation)"
        );
        let trial = render_unlocked(&unlocked(UnlockMethod::Trial, 3));
        assert!(
            trial.contains("found by trial in ring order, 3 key derivations"),
            "{trial}"
        );
    }

    #[test]
    fn decrypt_summary_names_every_fact() {
        let summary = DecryptSummary {
            unlocked: unlocked(UnlockMethod::Token, 1),
            payload_size: 8 << 20,
            elapsed_ms: 3000,
            copy_ms: 2000,
        };
        let text = render_decrypt(Path::new("d.luks"), Path::new("d.raw"), &summary);
        for expected in [
            "d.raw",
            "d.luks",
            "decryption_key2 (sha256:old+fp=), keyslot 3",
            "8388608 bytes (8.0 MiB)",
            "3.00 s (copy 2.00 s)",
            "4.0 MiB/s",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn verify_prints_the_hash_first_and_the_comparison() {
        let hash = "0123456789abcdef".repeat(4);
        let mut summary = VerifySummary {
            unlocked: unlocked(UnlockMethod::Trial, 2),
            payload_size: 1 << 20,
            plaintext_sha256: hash.clone(),
            source: None,
            elapsed_ms: 1500,
        };
        let text = render_verify(Path::new("d.luks"), None, &summary);
        assert!(
            text.starts_with(&format!("plaintext sha256: {hash}\n")),
            "{text}"
        );
        assert!(!text.contains("comparison"), "{text}");

        summary.source = Some(SourceComparison {
            source_format: SourceFormat::VhdFixed,
            virtual_size: 1000,
            matches: false,
            first_difference: Some(513),
        });
        let text = render_verify(Path::new("d.luks"), Some(Path::new("s.vhd")), &summary);
        for expected in [
            "s.vhd (VHD (fixed), 1000 bytes",
            "DIFFERS from byte 513 (0x201) on",
            "1.50 s",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        summary.source.as_mut().unwrap().matches = true;
        summary.source.as_mut().unwrap().first_difference = None;
        let text = render_verify(Path::new("d.luks"), Some(Path::new("s.vhd")), &summary);
        assert!(
            text.contains("matches: the plaintext is the source's disk"),
            "{text}"
        );

        // A source longer than the payload whose first payload-size bytes match.
        let comparison = summary.source.as_mut().unwrap();
        comparison.matches = false;
        comparison.virtual_size = summary.payload_size + 4096;
        comparison.first_difference = Some(summary.payload_size);
        let text = render_verify(Path::new("d.luks"), Some(Path::new("s.vhd")), &summary);
        let expected = format!(
            "DIFFERS: the source is 4096 bytes longer than the image holds; the first {} bytes \
             match",
            summary.payload_size
        );
        assert!(text.contains(&expected), "missing {expected:?} in\n{text}");
    }

    #[test]
    fn rewrite_summary_says_what_changed() {
        let mut summary = RewriteSummary {
            unlocked: unlocked(UnlockMethod::Token, 1),
            fingerprint: "new+fp=".into(),
            keyslot: 4,
            keyslot_added: true,
            removed: vec![
                RemovedKeyslot {
                    keyslot: 3,
                    fingerprint: Some("old+fp=".into()),
                },
                RemovedKeyslot {
                    keyslot: 0,
                    fingerprint: None,
                },
            ],
            reencrypted: false,
            resumed_from: None,
            pbkdf_benchmark: None,
            elapsed_ms: 700,
        };
        let text = render_rewrite(Path::new("d.luks"), &summary);
        for expected in [
            "header only",
            "d.luks",
            "decryption_key2 (sha256:old+fp=), keyslot 3",
            "sha256:new+fp= in keyslot 4 (added)",
            "keyslot 3 (sha256:old+fp=), keyslot 0 (no fingerprint)",
            "unchanged (same volume key",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("resumed"), "{text}");
        assert!(!text.contains("benchmark"), "{text}");

        summary.reencrypted = true;
        summary.pbkdf_benchmark = Some(PbkdfBenchmark {
            cached: true,
            age_ms: 90_000,
            measured_ms: 1000,
        });
        summary.keyslot_added = false;
        summary.removed.clear();
        summary.resumed_from = Some(1 << 20);
        let text = render_rewrite(Path::new("d.luks"), &summary);
        for expected in [
            "re-encrypted (new volume key)",
            "already there",
            "removed          none",
            "resumed from     payload byte 1048576",
            "benchmark        cached, measured",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }
}
