//! `imgctl jobs`, `imgctl status ID`, `imgctl cancel ID`, `imgctl wait ID`: the daemon's jobs.
//!
//! A user sees their own jobs (root and the daemon's operator group see all); an id the caller
//! may not see is answered like an unknown one.
//!
//! A detached job (`imgctl encrypt --detach`) leaves its output as `OUT.partial`: the daemon,
//! running as root, never renames or removes anything by path for a user (it could be made to
//! rename inside a directory the user merely can read). `imgctl wait ID`, the user's own process
//! with the user's own rights, renames `OUT.partial` to `OUT` once the job succeeded, and only
//! if the job is the caller's own (the names are the submitting client's word: root's or an
//! operator's `wait` on another user's job renames nothing) and the file there is still the
//! very file the job wrote (the daemon reports the output descriptor's `(st_dev, st_ino)`),
//! never over an `OUT` that appeared meanwhile unless `--force` ([`output::finish_detached`]);
//! `imgctl cancel ID` removes it on the same conditions. Names and messages from the daemon
//! are printed with non-printable characters escaped ([`printable`]).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use imgcrypt_proto::api::{
    self, JobId, JobInfo, JobKind, JobNames, JobReply, JobState, JobsReply, Phase, WaitReply,
};

use crate::call;
use crate::client::Client;
use crate::companions::{self, Companions};
use crate::connect;
use crate::error::{CtlError, Result};
use crate::output;
use crate::progress::{self, Display};

/// The job subcommands (flattened into imgctl's own).
#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// List your jobs (root and the daemon's operator group see everyone's): id, user, kind,
    /// state, progress, rate, ETA, output. Finished jobs are kept for 24 h (the last 32).
    Jobs(ListArgs),
    /// Show one job; for a finished detached encryption, whether its rename is pending.
    Status(IdArgs),
    /// Cancel a queued or running job; for your own detached encryption, remove its
    /// OUT.partial once the job has stopped.
    Cancel(IdArgs),
    /// Follow a job (re-attach after `encrypt --detach` or after imgctl was killed) with the
    /// same progress and summary as the original command; for a detached encryption, rename
    /// OUT.partial to OUT once it succeeded. Leaving a wait (Ctrl-C) does not cancel the job.
    Wait(WaitArgs),
}

/// Options of `imgctl jobs`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print the jobs as one JSON object (`{"jobs": [...]}`, the daemon's JobInfo).
    #[arg(long)]
    pub json: bool,
}

/// Options of the commands that take a job id.
#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The job's id (`imgctl jobs` lists them; `encrypt --detach` prints it).
    pub id: u64,
    /// Print JSON (`status`, `cancel`: the job; `wait`: progress lines and the summary).
    #[arg(long)]
    pub json: bool,
}

/// Options of `imgctl wait`.
#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// The job's id (`imgctl jobs` lists them; `encrypt --detach` prints it).
    pub id: u64,
    /// Print progress lines and the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Replace a file that appeared under the output's final name after the job was
    /// submitted (without it, the rename refuses and OUT.partial stays).
    #[arg(long)]
    pub force: bool,
}

/// Runs a job subcommand.
pub fn run(command: JobCommand, socket: Option<PathBuf>) -> Result<()> {
    let mut client = connect::connect(socket.as_deref())?;
    match command {
        JobCommand::Jobs(args) => list(&mut client, &args),
        JobCommand::Status(args) => status(&mut client, &args),
        JobCommand::Cancel(args) => cancel(&mut client, &args),
        JobCommand::Wait(args) => wait(&mut client, &args),
    }
}

fn list(client: &mut Client, args: &ListArgs) -> Result<()> {
    let reply: JobsReply = call::call_once(client, api::JOBS, &serde_json::json!({}), &[])?;
    if args.json {
        println!("{}", serde_json::to_string(&reply).expect("jobs serialise"));
        return Ok(());
    }
    print!("{}", render_table(&reply.jobs));
    Ok(())
}

fn job_info(client: &mut Client, method: &str, id: u64) -> Result<JobInfo> {
    let reply: JobReply = call::call_once(client, method, &JobId { id }, &[])?;
    Ok(reply.job)
}

fn status(client: &mut Client, args: &IdArgs) -> Result<()> {
    let job = job_info(client, api::STATUS, args.id)?;
    if args.json {
        println!("{}", serde_json::to_string(&job).expect("job serialises"));
    } else {
        print!("{}", render_status(&job));
    }
    Ok(())
}

fn cancel(client: &mut Client, args: &IdArgs) -> Result<()> {
    let asked = job_info(client, api::CANCEL, args.id)?;
    // Wait for the job to stop (no progress asked: one final reply; at once for a job that had
    // already ended), then clean up our own detached output. The job's final reply is the
    // cancellation error, expected here.
    let ended = call::call_once::<WaitReply>(client, api::WAIT, &JobId { id: asked.id }, &[]);
    let job = job_info(client, api::STATUS, args.id)
        .ok()
        .filter(|job| job.state.is_final());
    let outcome = final_outcome(job.as_ref(), &ended);
    let job = job.unwrap_or(asked);
    let removed = match (detached_output(&job), outcome) {
        (Some((path, identity)), Some(false)) if is_own(&job) => {
            output::remove_detached_partial(&path, identity).then(|| output::partial_path(&path))
        }
        _ => None,
    };
    if args.json {
        println!("{}", serde_json::to_string(&job).expect("job serialises"));
    } else {
        match outcome {
            Some(_) => println!("job {}: {}", job.id, printable(&state_text(&job))),
            None => println!(
                "job {}: cancel asked for; whether it has ended is not known (the daemon did                  not say): `imgctl status {}` shows it",
                job.id, job.id
            ),
        }
        if let Some(path) = removed {
            println!("removed {}", printable(&path.display().to_string()));
        } else if !is_own(&job) && detached_output(&job).is_some() && outcome == Some(false) {
            println!(
                "its output's partial file is its owner's to remove (`imgctl cancel {}` as {})",
                job.id,
                user_name(job.uid)
            );
        }
    }
    match outcome {
        Some(true) => Err(CtlError::Usage(format!(
            "job {} finished before the cancel reached it: run `imgctl wait {}` to give its \
             output its final name",
            job.id, job.id
        ))),
        _ => Ok(()),
    }
}

/// How a job ended, from its final state or else from its Wait: `Some(true)` succeeded,
/// `Some(false)` failed or cancelled, `None` not known (neither said; nothing is removed then).
fn final_outcome(job: Option<&JobInfo>, ended: &Result<WaitReply>) -> Option<bool> {
    if let Some(job) = job {
        return Some(job.state == JobState::Succeeded);
    }
    match ended {
        Ok(_) => Some(true),
        Err(CtlError::Daemon { name, .. }) if name != api::errors::NO_SUCH_JOB => Some(false),
        Err(_) => None,
    }
}

/// Whether the job is the caller's own: only then does imgctl rename or remove its output
/// (the names are the client's word; another user's, followed by root or an operator, must
/// not make root's imgctl rename in that user's directory).
fn is_own(job: &JobInfo) -> bool {
    job.uid == nix::unistd::getuid().as_raw()
}

fn wait(client: &mut Client, args: &WaitArgs) -> Result<()> {
    let mut display = Display::new(args.json);
    let done = call::wait_job(client, args.id, &mut display)?;
    // After the job's end: its state is final, and the names are what it was submitted with.
    let job = job_info(client, api::STATUS, args.id)?;
    if !is_own(&job) {
        // The daemon sends another user's job only its outcome (not the summary), and its
        // output is its owner's to rename.
        let mut text = format!(
            "job {} of {}: {}\n",
            job.id,
            user_name(job.uid),
            printable(&state_text(&job))
        );
        if detached_output(&job).is_some() && job.state == JobState::Succeeded {
            text.push_str(&format!(
                "its owner's `imgctl wait {}` gives its output its final name\n",
                job.id
            ));
        }
        display.finish(
            serde_json::json!({ "event": "waited", "job": job.id, "state": job.state }),
            &text,
        );
        return Ok(());
    }
    let name = |which: fn(&api::JobNames) -> &Option<String>| {
        job.names
            .as_ref()
            .and_then(|names| which(names).clone())
            .map(PathBuf::from)
    };
    let source = name(|names| &names.source).unwrap_or_else(|| format!("job {}", job.id).into());
    let source = shown(&source);
    let output_name = name(|names| &names.output);
    if let Some(summary) = &done.summary {
        let final_path = match detached_output(&job) {
            Some((path, identity)) => output::finish_detached(&path, identity, args.force)?,
            None => output_name.unwrap_or_else(|| "(output)".into()),
        };
        display.summary(&source, &shown(&final_path), summary, &[]);
        return Ok(());
    }
    let output = match (&done.decrypted, detached_output(&job)) {
        (Some(_), Some((path, identity))) => output::finish_detached(&path, identity, args.force)?,
        _ => output_name.unwrap_or_else(|| "(output)".into()),
    };
    let output = shown(&output);
    let (event, text) = if let Some(s) = &done.decrypted {
        ("decrypted", progress::render_decrypt(&source, &output, s))
    } else if let Some(s) = &done.verified {
        ("verified", progress::render_verify(&source, None, s))
    } else if let Some(s) = &done.rewritten {
        ("rewritten", progress::render_rewrite(&source, s))
    } else if let Some(info) = &done.image {
        ("inspected", progress::render_inspect(&source, info))
    } else if let Some(info) = &done.source {
        ("inspected", progress::render_source(&source, info))
    } else {
        return Err(CtlError::Protocol(format!(
            "the daemon ended Wait for job {} without a result",
            job.id
        )));
    };
    display.finish(
        serde_json::json!({ "event": event, "job": job.id, "result": done }),
        &text,
    );
    Ok(())
}

/// How a job's files are named in `imgctl jobs` and where `imgctl wait` renames: absolute,
/// so that a `wait` from another directory finds them. The output's directory is resolved
/// (links followed) now, in the user's process: `wait` opens it without following a link
/// ([`output::finish_detached`]).
pub fn names(source: &Path, output: &Path) -> JobNames {
    let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let output = absolute(output);
    let resolved = match (output.parent(), output.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|dir| dir.join(name))
            .unwrap_or(output),
        _ => output,
    };
    JobNames {
        source: Some(absolute(source).to_string_lossy().into_owned()),
        output: Some(resolved.to_string_lossy().into_owned()),
    }
}

/// `text` with control characters (and the bidirectional-text controls that reorder what a
/// terminal shows) escaped: names and messages come from the daemon, which has them from
/// whoever submitted the job, and must not drive the terminal of root or an operator.
pub fn printable(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if api::is_unsafe_in_names(c) {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// A path from the daemon as it may be printed.
fn shown(path: &Path) -> PathBuf {
    PathBuf::from(printable(&path.to_string_lossy()))
}

/// `--detach`: sends the job call (with `detach: true` in `parameters`); the daemon answers
/// with the job's id at once.
pub fn submit_detached(
    mut client: Client,
    method: &str,
    parameters: &impl serde::Serialize,
    fds: &[BorrowedFd<'_>],
) -> Result<u64> {
    #[derive(serde::Deserialize)]
    struct Detached {
        job_id: Option<u64>,
    }
    let reply: Detached = call::call_once(&mut client, method, parameters, fds)?;
    reply.job_id.ok_or_else(|| {
        CtlError::Protocol(format!(
            "the daemon did not answer a detached {method} with a job id: it is older than \
             imgctl; run without --detach"
        ))
    })
}

/// The files a detached job's source references (backing files, parents, extents), found
/// before it is submitted: a detached job cannot ask for them (no client is there to open
/// them), so a cheap `Inspect` of the source (metadata only, no key) goes through the same
/// `NeedFile` loop as an attached call, and the job is then submitted with all of them. A
/// source without any format's signature (a RAW disk) skips the `Inspect`, which would wait for
/// a job slot like any job ([`companions::may_reference_files`]).
pub fn companions_for_detach(
    client: &mut Client,
    source_path: &Path,
    source: &std::fs::File,
) -> Result<Companions> {
    let mut found = Companions::new(source_path);
    if !companions::may_reference_files(source) {
        return Ok(found);
    }
    let source = source.as_fd();
    let _: api::InspectReply = companions::with_companions(&mut found, |companions| {
        let parameters = api::InspectParameters {
            image: 0,
            companions: companions.refs(1),
            keys: Vec::new(),
        };
        let all: Vec<_> = std::iter::once(source).chain(companions.fds()).collect();
        call::call_once(client, api::INSPECT, &parameters, &all)
    })?;
    Ok(found)
}

/// Prints a detached job's id (stdout) and what to do next (stderr). `OUT.partial` is left to
/// the job (kept when imgctl exits) and to `imgctl wait`, which renames it.
pub fn report_detached(id: u64, output: &Path, json: bool, display: &mut Display) {
    announce(
        id,
        json,
        display,
        serde_json::json!({ "event": "detached", "job_id": id, "output": output }),
        &format!(
            "writing {}.partial; `imgctl wait {id}` finishes it (follows it and renames the \
             output to {})",
            output.display(),
            output.display()
        ),
    );
}

/// Prints the id of a detached job that works in place (`rewrite -k --detach`: nothing to
/// rename), and how to follow it.
pub fn report_detached_in_place(id: u64, image: &Path, json: bool, display: &mut Display) {
    announce(
        id,
        json,
        display,
        serde_json::json!({ "event": "detached", "job_id": id, "image": image }),
        &format!(
            "rewriting {} in place; `imgctl wait {id}` shows its result",
            image.display()
        ),
    );
}

/// The id on stdout (or `event` with `--json`), and on stderr what the job does and how to
/// see it.
fn announce(id: u64, json: bool, display: &mut Display, event: serde_json::Value, doing: &str) {
    display.finish(event, &format!("{id}\n"));
    if !json {
        eprintln!("imgctl: job {id} runs on in imgcryptd, {doing}, `imgctl status {id}` shows it");
    }
}

/// A detached encryption's or decryption's final output path and the identity of the file its
/// job writes.
fn detached_output(job: &JobInfo) -> Option<(PathBuf, (u64, u64))> {
    if !job.detached || !matches!(job.kind, JobKind::Encrypt | JobKind::Decrypt) {
        return None;
    }
    let path = job.names.as_ref()?.output.as_ref()?;
    let identity = job.output_identity?;
    Some((PathBuf::from(path), (identity.device, identity.inode)))
}

/// `queued (position 2)`, `running: copying 45%`, `failed: <message>` ...
fn state_text(job: &JobInfo) -> String {
    match job.state {
        JobState::Queued => match job.queue_position {
            Some(position) => format!("queued (position {position})"),
            None => "queued".to_string(),
        },
        JobState::Running => match percent(job) {
            Some(percent) => format!(
                "running: {} {percent}%",
                progress::phase_label(job.progress.phase)
            ),
            None => format!("running: {}", progress::phase_label(job.progress.phase)),
        },
        JobState::Succeeded => "succeeded".to_string(),
        JobState::Failed | JobState::Cancelled => {
            let what = if job.state == JobState::Failed {
                "failed"
            } else {
                "cancelled"
            };
            match &job.message {
                Some(message) if job.state == JobState::Failed => format!("{what}: {message}"),
                Some(message) => message.clone(),
                None => what.to_string(),
            }
        }
    }
}

fn percent(job: &JobInfo) -> Option<u64> {
    let progress = &job.progress;
    (progress.bytes_total > 0 && progress.phase != Phase::Queued)
        .then(|| progress.bytes_done.min(progress.bytes_total) * 100 / progress.bytes_total)
}

/// The `imgctl status` text, one fact per line.
fn render_status(job: &JobInfo) -> String {
    let mut text = format!(
        "job {}: {} by {}\nstate: {}\n",
        job.id,
        job.kind.name(),
        user_name(job.uid),
        printable(&state_text(job))
    );
    if job.state == JobState::Running && job.progress.bytes_total > 0 {
        text.push_str(&format!(
            "progress: {} of {} ({}), {} left\n",
            bytes(job.progress.bytes_done),
            bytes(job.progress.bytes_total),
            job.rate
                .map_or("rate not yet known".to_string(), |r| format!(
                    "{}/s",
                    bytes(r)
                )),
            job.eta_ms.map_or("time".to_string(), duration)
        ));
    }
    if let Some(engine) = job.engine {
        text.push_str(&format!("engine: {engine:?}\n").to_lowercase());
    }
    if let Some(names) = &job.names {
        if let Some(source) = &names.source {
            text.push_str(&format!("source: {}\n", printable(source)));
        }
        if let Some(output) = &names.output {
            text.push_str(&format!("output: {}\n", printable(output)));
        }
    }
    if job.detached {
        text.push_str("detached: yes\n");
    }
    if let Some((path, identity)) = detached_output(job) {
        let partial = output::partial_path(&path);
        let (shown_partial, shown_path) = (shown(&partial), shown(&path));
        let line = match job.state {
            _ if output::is_block_device(&path) => {
                format!("written in place to the device {}", shown_path.display())
            }
            JobState::Succeeded if output::is_file_with_identity(&partial, identity) => format!(
                "rename pending: its owner's `imgctl wait {}` renames {} to {}",
                job.id,
                shown_partial.display(),
                shown_path.display()
            ),
            JobState::Succeeded if output::is_file_with_identity(&path, identity) => {
                "renamed: the output is under its final name".to_string()
            }
            JobState::Succeeded => format!(
                "rename pending, but {} is not the file the job wrote any more",
                shown_partial.display()
            ),
            state if state.is_final() => format!(
                "no output: its owner's `imgctl cancel {}` or removing {} cleans up",
                job.id,
                shown_partial.display()
            ),
            _ => format!("writing {}", shown_partial.display()),
        };
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// The `imgctl jobs` table.
fn render_table(jobs: &[JobInfo]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_string();
    }
    let mut rows = vec![[
        "ID".to_string(),
        "USER".to_string(),
        "KIND".to_string(),
        "STATE".to_string(),
        "PROGRESS".to_string(),
        "RATE".to_string(),
        "ETA".to_string(),
        "OUTPUT".to_string(),
    ]];
    for job in jobs {
        let state = match job.state {
            JobState::Queued => match job.queue_position {
                Some(position) => format!("queued (position {position})"),
                None => "queued".to_string(),
            },
            other => format!("{other:?}").to_lowercase(),
        };
        rows.push([
            job.id.to_string(),
            user_name(job.uid),
            job.kind.name().to_string(),
            state,
            percent(job).map_or("-".to_string(), |p| format!("{p}%")),
            job.rate
                .map_or("-".to_string(), |r| format!("{}/s", bytes(r))),
            job.eta_ms.map_or("-".to_string(), duration),
            job.names
                .as_ref()
                .and_then(|names| names.output.as_deref())
                .map_or_else(|| "-".to_string(), printable),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(column, cell)| format!("{cell:<width$}", width = widths[column]))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |user| user.name)
}

fn bytes(count: u64) -> String {
    indicatif::BinaryBytes(count).to_string()
}

fn duration(ms: u64) -> String {
    let seconds = ms / 1000;
    if seconds >= 3600 {
        format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60)
    } else {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcrypt_proto::api::Progress;

    fn job(state: JobState) -> JobInfo {
        JobInfo {
            id: 7,
            uid: 0,
            kind: JobKind::Encrypt,
            state,
            queue_position: (state == JobState::Queued).then_some(2),
            progress: Progress {
                phase: if state == JobState::Queued {
                    Phase::Queued
                } else {
                    Phase::Copy
                },
                bytes_done: 1 << 20,
                bytes_total: 4 << 20,
                queue_position: None,
            },
            rate: Some(1 << 20),
            eta_ms: Some(3000),
            engine: None,
            created_ms: 0,
            started_ms: None,
            ended_ms: None,
            detached: true,
            names: Some(JobNames {
                source: Some("/s.vhd".into()),
                output: Some("/o.luks".into()),
            }),
            output_identity: None,
            error: None,
            message: None,
        }
    }

    #[test]
    fn the_table_shows_position_percent_rate_eta_and_output() {
        let table = render_table(&[job(JobState::Queued), job(JobState::Running)]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("ID") && lines[0].contains("OUTPUT"),
            "{table}"
        );
        assert!(lines[1].contains("queued (position 2)"), "{table}");
        assert!(
            lines[2].contains("running") && lines[2].contains("25%"),
            "{table}"
        );
        assert!(
            lines[2].contains("1.00 MiB/s") && lines[2].contains("0m03s"),
            "{table}"
        );
        assert!(
            lines[2].contains("/o.luks") && lines[2].contains("root"),
            "{table}"
        );
        assert_eq!(render_table(&[]), "no jobs\n");
    }

    #[test]
    fn names_from_the_daemon_cannot_drive_the_terminal() {
        let mut hostile = job(JobState::Running);
        hostile.names = Some(JobNames {
            source: Some("/s\u{1b}]0;owned\u{7}.vhd".into()),
            output: Some("/o\u{1b}[2J\n\r\u{202e}kcah.luks".into()),
        });
        hostile.message = Some("bad\u{1b}[31m".into());
        for text in [render_table(&[hostile.clone()]), render_status(&hostile)] {
            assert!(
                !text
                    .chars()
                    .any(|c| c == '\u{1b}' || c == '\r' || c == '\u{202e}'),
                "{text:?}"
            );
            assert!(text.contains("\\u{1b}"), "{text:?}");
        }
        // One line per job: an embedded newline does not forge a row.
        assert_eq!(render_table(&[hostile]).lines().count(), 2);
        assert_eq!(printable("plain/päth.luks"), "plain/päth.luks");
    }

    #[test]
    fn cancel_decides_from_the_final_state_or_the_wait() {
        let failed = Err(CtlError::Daemon {
            name: api::errors::IO_ERROR.into(),
            message: "cancelled".into(),
        });
        let gone = Err(CtlError::Daemon {
            name: api::errors::NO_SUCH_JOB.into(),
            message: "no job".into(),
        });
        let lost = Err(CtlError::Protocol("connection closed".into()));
        let ended = job(JobState::Cancelled);
        assert_eq!(
            final_outcome(Some(&ended), &Ok(WaitReply::default())),
            Some(false)
        );
        assert_eq!(
            final_outcome(Some(&job(JobState::Succeeded)), &failed),
            Some(true)
        );
        // No Status after the Wait: the Wait's own outcome decides, never a stale state.
        assert_eq!(final_outcome(None, &Ok(WaitReply::default())), Some(true));
        assert_eq!(final_outcome(None, &failed), Some(false));
        assert_eq!(final_outcome(None, &gone), None);
        assert_eq!(final_outcome(None, &lost), None);
    }

    #[test]
    fn status_says_queued_with_position() {
        assert_eq!(state_text(&job(JobState::Queued)), "queued (position 2)");
        assert!(render_status(&job(JobState::Running)).contains("running: copying 25%"));
    }
}
