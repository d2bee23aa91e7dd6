//! Man pages and shell completions for imgcrypt's binaries, generated from their clap parsers so
//! they never drift from `--help`.
//!
//! The parsers live in the binaries (`imgctl`'s subcommands in `ctl/src/commands/`, `imgcryptd`'s
//! flags in `daemon/src/main.rs`), so each binary's `main` first calls [`generate_if_asked`]:
//! `imgctl --generate-docs DIR` and `imgcryptd --generate-docs DIR` write the files and exit.
//! That option is read before clap parses, on purpose: clap_complete puts even hidden options
//! and subcommands into the bash completions, and users must not be offered it.
//! `scripts/package` runs both and puts the files into the Debian package; they are build
//! products, not kept in git.
//!
//! Layout under `DIR` (the package installs each subdirectory where Debian looks for it):
//!
//! | path | installed as |
//! |---|---|
//! | `man/NAME.S`, `man/NAME-SUB.S` | `/usr/share/man/manS/` (one page per visible subcommand) |
//! | `bash/NAME` | `/usr/share/bash-completion/completions/NAME` |
//! | `zsh/_NAME` | `/usr/share/zsh/vendor-completions/_NAME` |
//! | `fish/NAME.fish` | `/usr/share/fish/vendor_completions.d/NAME.fish` |

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;

/// The shells we ship completions for, with the subdirectory of each.
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash"),
    (Shell::Zsh, "zsh"),
    (Shell::Fish, "fish"),
];

/// The option that asks a binary for its documentation instead of running.
pub const OPTION: &str = "--generate-docs";

/// If the process was started as `PROGRAM --generate-docs DIR` (exactly), writes the man pages
/// and completions of `command()` into `DIR` (see [`generate`]) and returns the exit code; else
/// `None` and the program goes on. Call it first thing in `main`.
pub fn generate_if_asked(
    command: impl FnOnce() -> clap::Command,
    section: &str,
) -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let (Some(option), Some(dir), None) = (args.next(), args.next(), args.next()) else {
        return None;
    };
    if option != OPTION {
        return None;
    }
    let dir = PathBuf::from(dir);
    Some(match generate(command(), section, &dir) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{OPTION}: {error}");
            ExitCode::FAILURE
        }
    })
}

/// Writes the man pages (in manual `section`: "1" for user commands, "8" for daemons) and the
/// bash, zsh and fish completions of `command` under `dir`. Returns the files written.
///
/// Each file is written under a temporary name and renamed, so a failed run never leaves a
/// half-written page under its final name.
pub fn generate(command: clap::Command, section: &str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut command = command.disable_help_subcommand(true);
    // Fills in what derive leaves implicit (display names "imgctl-encrypt", help flags).
    command.build();
    let name = command.get_name().to_string();
    let mut written = Vec::new();

    let man_dir = dir.join("man");
    create_dir(&man_dir)?;
    // Subcommands carry no version of their own: every page names the program's.
    let source = format!("imgcrypt {}", command.get_version().unwrap_or_default());
    man_pages(&command, section, &source, &man_dir, &mut written)?;

    for (shell, subdir) in SHELLS {
        let shell_dir = dir.join(subdir);
        create_dir(&shell_dir)?;
        let file_name = shell_file_name(shell, &name);
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command.clone(), &name, &mut script);
        written.push(write_atomically(&shell_dir.join(file_name), &script)?);
    }
    Ok(written)
}

/// One page for `command` and, recursively, one for each subcommand that is not hidden.
fn man_pages(
    command: &clap::Command,
    section: &str,
    source: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        man_pages(subcommand, section, source, dir, written)?;
    }
    let man = clap_mangen::Man::new(command.clone())
        .section(section)
        .manual("imgcrypt")
        .source(source);
    let mut page = Vec::new();
    man.render(&mut page)?;
    written.push(write_atomically(&dir.join(man.get_filename()), &page)?);
    Ok(())
}

/// The name each shell looks the completion file up by.
fn shell_file_name(shell: Shell, name: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        _ => name.to_string(),
    }
}

fn create_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let context = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = fs::File::create(&temporary).map_err(|e| context("creating", e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| context("writing", e))?;
    fs::rename(&temporary, path).map_err(|e| context("renaming into", e))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parser shaped like imgctl's: a global flag, subcommands, one hidden, one nested.
    fn sample() -> clap::Command {
        clap::Command::new("tool")
            .version("1.2.3")
            .about("Does things")
            .arg(clap::Arg::new("socket").long("socket").global(true))
            .subcommand(
                clap::Command::new("encrypt")
                    .about("Encrypts")
                    .arg(clap::Arg::new("output").long("output")),
            )
            .subcommand(
                clap::Command::new("key")
                    .about("Keys")
                    .subcommand(clap::Command::new("generate").about("Makes a key")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn writes_a_page_per_visible_subcommand_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(sample(), "1", dir.path()).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|path| path.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "bash/tool",
                "fish/tool.fish",
                "man/tool-encrypt.1",
                "man/tool-key-generate.1",
                "man/tool-key.1",
                "man/tool.1",
                "zsh/_tool",
            ]
        );
        let page = fs::read_to_string(dir.path().join("man/tool-encrypt.1")).unwrap();
        assert!(page.contains(".TH tool-encrypt 1"), "{page}");
        assert!(page.contains("imgcrypt 1.2.3"), "{page}");
        assert!(page.contains(r"\-\-output"), "{page}");
        let bash = fs::read_to_string(dir.path().join("bash/tool")).unwrap();
        assert!(
            bash.contains("--socket") && bash.contains("encrypt") && bash.contains("--output"),
            "{bash}"
        );
        // Nothing is left under a temporary name.
        let leftovers: Vec<_> = walk(dir.path())
            .into_iter()
            .filter(|path| path.extension().is_some_and(|ext| ext == "tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn section_8_pages_are_named_for_it() {
        let dir = tempfile::tempdir().unwrap();
        generate(clap::Command::new("daemond"), "8", dir.path()).unwrap();
        let page = fs::read_to_string(dir.path().join("man/daemond.8")).unwrap();
        assert!(page.contains(".TH daemond 8"), "{page}");
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"").unwrap();
        let error = generate(sample(), "1", &blocker).unwrap_err();
        assert!(
            error.to_string().contains(&blocker.display().to_string()),
            "{error}"
        );
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
        found
    }
}
