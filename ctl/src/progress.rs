//! What the user sees while a job runs and when it ends: a progress bar on a terminal, JSON
//! lines with `--json`, nothing but the summary otherwise (logs and pipes stay clean).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use imgcrypt_proto::api::{Phase, Progress, Summary};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// How to show a job.
pub enum Display {
    /// A live bar on stderr, and the phase it shows.
    Terminal(Option<(ProgressBar, Phase)>),
    /// One JSON object per line on stdout.
    Json,
    /// Only the final summary.
    Quiet,
}

impl Display {
    /// Picks the display: JSON if asked, a bar if stderr is a terminal, else quiet.
    pub fn new(json: bool) -> Self {
        if json {
            Self::Json
        } else if std::io::stderr().is_terminal() {
            Self::Terminal(None)
        } else {
            Self::Quiet
        }
    }

    /// Shows a progress report.
    pub fn progress(&mut self, progress: &Progress) {
        match self {
            Self::Json => json_line(json!({ "event": "progress", "progress": progress })),
            Self::Terminal(state) => {
                let (bar, phase) = state.get_or_insert_with(|| (new_bar(), progress.phase));
                if *phase != progress.phase {
                    // Rate and ETA are about this phase: the key derivation before the copy is
                    // not I/O and must not drag the copy's rate down.
                    bar.reset_elapsed();
                    bar.reset_eta();
                    *phase = progress.phase;
                }
                bar.set_message(phase_label(progress.phase));
                if progress.bytes_total > 0 {
                    bar.set_length(progress.bytes_total);
                    bar.set_position(progress.bytes_done);
                }
            }
            Self::Quiet => {}
        }
    }

    /// Shows a notice from the daemon.
    pub fn notice(&mut self, text: &str) {
        match self {
            Self::Json => json_line(json!({ "event": "notice", "message": text })),
            Self::Terminal(Some((bar, _))) => bar.suspend(|| eprintln!("imgctl: warning: {text}")),
            _ => eprintln!("imgctl: warning: {text}"),
        }
    }

    /// Ends the bar and prints the summary.
    pub fn summary(&mut self, source: &Path, output: &Path, summary: &Summary) {
        self.clear();
        match self {
            Self::Json => json_line(json!({
                "event": "summary",
                "source": source,
                "output": output,
                "summary": summary,
            })),
            _ => print!("{}", render_summary(source, output, summary)),
        }
    }

    /// Reports a failure (the caller also prints the message on stderr).
    pub fn error(&mut self, name: Option<&str>, message: &str) {
        self.clear();
        if let Self::Json = self {
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
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("static template is valid")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn phase_label(phase: Phase) -> &'static str {
    match phase {
        Phase::Queued => "queued",
        Phase::Format => "formatting",
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
    let seconds = s.elapsed_ms as f64 / 1000.0;
    let copy_seconds = s.copy_ms as f64 / 1000.0;
    // Over the copy alone: the key derivation's deliberate slowness is not I/O speed.
    let throughput = if s.copy_ms > 0 {
        format!("{}/s", human_bytes(s.payload_size as f64 / copy_seconds))
    } else {
        "-".to_string()
    };
    let rows = [
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
        ("LUKS version", s.luks_version.display_name().to_string()),
        (
            "cipher",
            format!("{} ({}-bit key)", s.cipher, s.key_size_bits),
        ),
        ("sector size", format!("{} bytes", s.sector_size)),
        ("data offset", sized(s.data_offset)),
        ("payload size", sized(s.payload_size)),
        ("output size", sized(s.output_size)),
        ("key fingerprint", format!("sha256:{}", s.key_fingerprint)),
        ("key derivation", s.pbkdf.clone()),
        ("engine", format!("{:?}", s.engine).to_lowercase()),
        ("time", format!("{seconds:.2} s (copy {copy_seconds:.2} s)")),
        ("throughput", throughput),
    ];
    let mut text = String::from("Encrypted image written.\n");
    for (label, value) in rows {
        text.push_str(&format!("  {label:<16} {value}\n"));
    }
    text
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
    use imgcrypt_proto::api::{EngineKind, LuksVersion, SourceFormat};

    #[test]
    fn summary_names_every_fact() {
        let summary = Summary {
            source_format: SourceFormat::VhdDynamic,
            virtual_size: 10 << 20,
            luks_version: LuksVersion::Luks2,
            cipher: "aes-xts-plain64".into(),
            key_size_bits: 512,
            sector_size: 4096,
            data_offset: 16 << 20,
            payload_size: 10 << 20,
            output_size: 26 << 20,
            key_fingerprint: "abc=".into(),
            pbkdf: "argon2id".into(),
            engine: EngineKind::Userspace,
            elapsed_ms: 2000,
            copy_ms: 1000,
            bytes_written: 26 << 20,
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
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }
}
