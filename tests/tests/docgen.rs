//! `bulkhead-docgen` (tools/docgen) writes the man pages and completions
//! from the binaries' clap definitions: every option each binary's `--help`
//! names (aliases too), and each of its subcommands', is on its page; the
//! pages render; the completions load in bash and name the options. Run
//! `cargo build --workspace --bins` first.

use std::path::Path;
use std::process::Command;

use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::skip::{SkipReason, skip};

const BINARIES: [&str; 5] = [
    "bulkhead-blk",
    "bulkhead-net",
    "bulkhead-console",
    "bulkhead-vmm",
    "bulkhead",
];

/// Runs bulkhead-docgen into a fresh directory.
fn generate() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(workspace_binary("bulkhead-docgen"))
        .arg(out.path())
        .output()
        .expect("run bulkhead-docgen (cargo build --workspace --bins)");
    assert!(
        run.status.success(),
        "bulkhead-docgen: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    out
}

/// `bin words... --help`, as the binary prints it.
fn help(bin: &str, words: &[String]) -> String {
    let out = Command::new(workspace_binary(bin))
        .args(words)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{bin} {words:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands a `--help` lists under `Commands:`, but `help`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| *w != "help")
        .map(String::from)
        .collect()
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Every option token in `text`: `-x` or `--long-name`, not part of a
/// longer word (`read-only`, `Ctrl-C`).
fn options(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i] == '-' && (i == 0 || !is_word(chars[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && chars[j] == '-' {
            j += 1;
        }
        let dashes = j - i;
        let name_start = j;
        while j < chars.len() && is_word(chars[j]) {
            j += 1;
        }
        let name: String = chars[name_start..j].iter().collect();
        if (dashes == 2 && name.len() > 1 || dashes == 1 && name.len() == 1)
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
        {
            found.push(format!("{}{name}", "-".repeat(dashes)));
        }
        i = j.max(i + 1);
    }
    found.sort();
    found.dedup();
    found
}

/// The long options a `--help` defines: each option line's signature
/// (`-h, --help`, `--image <FILE>`), not the prose.
fn defined_options(help: &str) -> Vec<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| options(l.split("  ").next().unwrap_or_default()))
        .filter(|o| o.starts_with("--"))
        .collect()
}

/// A roff page as text: `\-` is a plain hyphen, fonts are dropped.
fn unroff(page: &str) -> String {
    page.replace("\\-", "-")
        .replace("\\fB", " ")
        .replace("\\fI", " ")
        .replace("\\fR", " ")
}

/// Checks that the page of `bin words...` names every option of its
/// `--help`, then the pages of its subcommands.
fn check_page(man_dir: &Path, bin: &str, words: &mut Vec<String>, checked: &mut usize) {
    let text = help(bin, words);
    let name = std::iter::once(bin.to_string())
        .chain(words.iter().cloned())
        .collect::<Vec<_>>()
        .join("-");
    let path = man_dir.join(format!("{name}.8"));
    let page = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the page of `{bin} {words:?}`)", path.display()));
    assert!(page.contains("\n.TH "), "{name}.8 has no .TH header");
    let on_page = options(&unroff(&page));
    // The usage line of a subcommand repeats its parents' options, which
    // their own pages carry.
    let own: Vec<&str> = text.lines().filter(|l| !l.starts_with("Usage:")).collect();
    let wanted = options(&own.join("\n"));
    assert!(
        wanted.iter().any(|o| o == "--help"),
        "{name}: no options found in --help"
    );
    let missing: Vec<&String> = wanted.iter().filter(|o| !on_page.contains(o)).collect();
    assert!(
        missing.is_empty(),
        "{name}.8 lacks {missing:?}, which `{bin} {} --help` shows",
        words.join(" ")
    );
    *checked += 1;
    for sub in subcommands(&text) {
        words.push(sub);
        check_page(man_dir, bin, words, checked);
        words.pop();
    }
}

#[test]
fn options_are_found_in_help_text_but_not_inside_words() {
    assert_eq!(
        options("  -h, --help   Print help [aliases: --blk-file]\nread-only Ctrl-C -,raw"),
        vec!["--blk-file", "--help", "-h"]
    );
}

#[test]
fn every_option_in_each_binarys_help_is_on_its_man_page() {
    let out = generate();
    let mut checked = 0;
    for bin in BINARIES {
        check_page(&out.path().join("man8"), bin, &mut Vec::new(), &mut checked);
    }
    // The binaries, `bulkhead up|check`, `bulkhead-vmm ctl|probe` and
    // ctl's requests.
    assert!(checked >= 14, "only {checked} pages checked");
}

#[test]
fn the_man_pages_render() {
    let out = generate();
    for bin in BINARIES {
        let page = out.path().join(format!("man8/{bin}.8"));
        let run = match Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
        {
            Ok(run) => run,
            Err(_) => {
                // Without man, the roff is at least a page (.TH); CI
                // installs man-db (.ci/install-deps), so it renders there.
                for b in BINARIES {
                    let roff = std::fs::read_to_string(out.path().join(format!("man8/{b}.8")));
                    assert!(roff.unwrap().contains("\n.TH "), "{b}.8");
                }
                skip(
                    "the_man_pages_render (man -l)",
                    SkipReason::NotInstalled("man (man-db)".into()),
                );
                return;
            }
        };
        let text = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success() && text.contains("NAME") && text.contains("OPTIONS"),
            "man -l {bin}.8: {text}{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            text.contains(&format!("{bin}(8)")) && text.contains("--help"),
            "{bin}.8 renders as: {text}"
        );
    }
}

#[test]
fn the_bash_completions_load_and_complete_each_option() {
    let out = generate();
    for bin in BINARIES {
        let file = out.path().join("bash").join(bin);
        let script = format!("source {}; complete -p {bin}", file.display());
        let run = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "bash cannot load {bin}'s completion: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let text = std::fs::read_to_string(&file).unwrap();
        for opt in defined_options(&help(bin, &[])) {
            assert!(text.contains(&opt), "{bin}'s bash completion lacks {opt}");
        }
        let zsh = std::fs::read_to_string(out.path().join(format!("zsh/_{bin}"))).unwrap();
        assert!(zsh.starts_with(&format!("#compdef {bin}")), "_{bin}");
        let fish = std::fs::read_to_string(out.path().join(format!("fish/{bin}.fish"))).unwrap();
        assert!(fish.contains(&format!("complete -c {bin} ")), "{bin}.fish");
    }
}
