//! `bulkhead-nested`: runs a shell command inside the nested host, a QEMU
//! TCG guest whose emulated AMD SVM gives it a `/dev/kvm` that runs Linux
//! under `bulkhead-vmm` (tests/src/nested.rs), for machines whose own KVM
//! cannot. `scripts/demo` uses it; so can anyone who wants the VMM here.
//!
//! ```text
//! bulkhead-nested [--timeout SECS] [--memory MIB] [--carry SRC:DEST]...
//!                 [--drive IMAGE] [--out DIR] -- COMMAND...
//! ```
//!
//! The Bulkhead binaries built beside this one travel along at their paths
//! here, the test kit's guest kernel and initramfs at `/nested/guest`
//! (`BULKHEAD_GUEST_IMAGE`). COMMAND runs under busybox `sh` as root with
//! `/nested/bin` (iproute2's `ip`, QEMU) first on `PATH`; its output is
//! printed as it comes. `--drive` attaches a raw image as the nested
//! host's `/dev/vda`; files COMMAND leaves in `/nested/out` are written to
//! `--out`. The exit status is COMMAND's (125: the nested host failed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bulkhead_tests::nested::{NestedHost, quote};

const USAGE: &str = "usage: bulkhead-nested [--timeout SECS] [--memory MIB] \
                     [--carry SRC:DEST]... [--drive IMAGE] [--out DIR] -- COMMAND...";

struct Args {
    timeout: Duration,
    memory_mib: Option<u32>,
    carry: Vec<(PathBuf, String)>,
    drive: Option<PathBuf>,
    out: Option<PathBuf>,
    command: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        timeout: Duration::from_secs(600),
        memory_mib: None,
        carry: Vec::new(),
        drive: None,
        out: None,
        command: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--timeout" => {
                let v = value()?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("--timeout {v}: not seconds"))?;
                args.timeout = Duration::from_secs(secs);
            }
            "--memory" => {
                let v = value()?;
                args.memory_mib = Some(v.parse().map_err(|_| format!("--memory {v}: not MiB"))?);
            }
            "--carry" => {
                let v = value()?;
                let (src, dest) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--carry {v}: want SRC:DEST"))?;
                if !dest.starts_with('/') {
                    return Err(format!("--carry {v}: DEST must be an absolute path"));
                }
                args.carry.push((PathBuf::from(src), dest.to_string()));
            }
            "--drive" => args.drive = Some(PathBuf::from(value()?)),
            "--out" => args.out = Some(PathBuf::from(value()?)),
            "--" => {
                args.command = it.by_ref().collect();
                break;
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if args.command.is_empty() {
        return Err(format!("no command\n{USAGE}"));
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    for (src, _) in &args.carry {
        if !src.is_file() {
            eprintln!("bulkhead-nested: --carry {}: not a file", src.display());
            return ExitCode::from(2);
        }
    }
    let script: Vec<String> = args.command.iter().map(|w| quote(w)).collect();
    let mut host = NestedHost::new(script.join(" "))
        .timeout(args.timeout)
        .echo(true);
    if let Some(m) = args.memory_mib {
        host = host.memory_mib(m);
    }
    for (src, dest) in args.carry {
        host = host.carry(src, dest);
    }
    if let Some(d) = args.drive {
        host = host.drive(d);
    }
    let run = host.run();
    if let Some(dir) = &args.out {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("bulkhead-nested: {}: {e}", dir.display());
            return ExitCode::from(125);
        }
        for (name, data) in &run.files {
            // Names come from the nested host's directory listing: keep
            // them to one path component.
            let name = std::path::Path::new(name)
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("unnamed"));
            if let Err(e) = std::fs::write(dir.join(&name), data) {
                eprintln!("bulkhead-nested: {}: {e}", dir.join(name).display());
                return ExitCode::from(125);
            }
        }
    }
    match run.status {
        Some(s) if (0..=200).contains(&s) => ExitCode::from(s as u8),
        _ => {
            eprintln!(
                "bulkhead-nested: the nested host failed: {}\n{}",
                run.outcome(),
                bulkhead_tests::guest::tail(&run.console, 40)
            );
            ExitCode::from(125)
        }
    }
}
