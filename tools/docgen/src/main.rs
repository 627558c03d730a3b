//! `bulkhead-docgen OUTDIR`: writes the man pages and shell completions of
//! Bulkhead's five binaries from their clap definitions (each crate's
//! `cli::command()`), so the pages and completions cannot drift from the
//! options the binaries take. `scripts/install` runs it; it is a build tool,
//! never installed, and no daemon links it.
//!
//! Under OUTDIR it writes:
//! - `man8/NAME.8`: one page per binary, and one per subcommand
//!   (`bulkhead-up.8`, `bulkhead-vmm-ctl.8`, ...), as `git` does;
//! - `bash/NAME`, `zsh/_NAME`, `fish/NAME.fish`: completions, named as
//!   bash-completion, zsh's `fpath` and fish's `vendor_completions.d` look
//!   them up.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;

/// The man section: these are daemons and administration tools.
const SECTION: &str = "8";

/// Every installed binary's command line, by the name it is installed as.
fn commands() -> Vec<clap::Command> {
    vec![
        bulkhead_blk::cli::command(),
        bulkhead_net::cli::command(),
        bulkhead_console::cli::command(),
        bulkhead_vmm::cli::command(),
        bulkhead_launcher::cli::command(),
    ]
}

/// Writes the man page of `cmd` and of each of its visible subcommands,
/// depth first, into `dir`; returns the files written.
/// `source` is the binary and its version, for every page of it.
fn man_pages(
    cmd: &clap::Command,
    source: &str,
    see_also: &[String],
    dir: &Path,
) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.extend(man_pages(sub, source, see_also, dir)?);
    }
    let man = clap_mangen::Man::new(with_aliases(cmd.clone()))
        .section(SECTION)
        .source(source)
        .manual("Bulkhead");
    let mut roff = Vec::new();
    man.render(&mut roff)?;
    let own = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    let others: Vec<String> = see_also
        .iter()
        .filter(|n| n.as_str() != own)
        .map(|n| format!("\\fB{}\\fR({SECTION})", n.replace('-', "\\-")))
        .collect();
    roff.extend_from_slice(
        format!(
            ".SH \"SEE ALSO\"\n{}\n.PP\nThe Bulkhead documentation: docs/ in its source tree.\n",
            others.join(", ")
        )
        .as_bytes(),
    );
    let path = dir.join(man.get_filename());
    fs::write(&path, roff)?;
    written.push(path);
    Ok(written)
}

/// `cmd` with each option's visible aliases (`--blk-file` for `--image`)
/// added to its help text, as `--help` shows them: clap_mangen leaves them
/// out of the page.
fn with_aliases(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|arg| {
        let aliases: Vec<String> = arg
            .get_visible_aliases()
            .unwrap_or_default()
            .iter()
            .map(|a| format!("--{a}"))
            .collect();
        if aliases.is_empty() {
            return arg;
        }
        let note = format!("[aliases: {}]", aliases.join(", "));
        match (arg.get_long_help(), arg.get_help()) {
            (Some(long), _) => {
                let text = format!("{long} {note}");
                arg.long_help(text)
            }
            (None, Some(short)) => {
                let text = format!("{short} {note}");
                arg.help(text)
            }
            (None, None) => arg.help(note),
        }
    })
}

/// Writes the bash, zsh and fish completions of `cmd` under `out`.
fn completions(cmd: &clap::Command, out: &Path) -> io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join(dir);
        fs::create_dir_all(&dir)?;
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut text);
        let path = dir.join(file);
        fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes every page and completion under `out`; returns the files written.
fn generate(out: &Path) -> io::Result<Vec<PathBuf>> {
    let man_dir = out.join(format!("man{SECTION}"));
    fs::create_dir_all(&man_dir)?;
    let mut commands = commands();
    for cmd in &mut commands {
        // What the binary shows is built (display names, `help`
        // subcommand); a page for `help` would only repeat the others.
        *cmd = std::mem::take(cmd).disable_help_subcommand(true);
        cmd.build();
    }
    let names: Vec<String> = commands.iter().map(|c| c.get_name().to_string()).collect();
    let mut written = Vec::new();
    for cmd in &commands {
        let source = format!(
            "{} {}",
            cmd.get_name(),
            cmd.get_version().unwrap_or_default()
        );
        written.extend(man_pages(cmd, &source, &names, &man_dir)?);
        written.extend(completions(cmd, out)?);
    }
    Ok(written)
}

const USAGE: &str = "usage: bulkhead-docgen OUTDIR\n\
    Writes OUTDIR/man8/*.8 and OUTDIR/{bash,zsh,fish}/ completions of the Bulkhead binaries.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = match args.as_slice() {
        [h] if h == "-h" || h == "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        [out] if !out.starts_with('-') => PathBuf::from(out),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match generate(&out) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bulkhead-docgen: {}: {e}", out.display());
            ExitCode::from(1)
        }
    }
}
