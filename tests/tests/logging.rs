//! Every daemon logs in one format (`common::logging`): `PROGRAM[PID]: LEVEL
//! message` on a plain stderr, `<N>LEVEL message` with the sd-daemon(3)
//! priority when stderr is the journal's stream, which a daemon knows by
//! `JOURNAL_STREAM` naming its fd 2's device and inode (systemd.exec(5)).
//! Each daemon here fails its start for want of a socket, which it logs as
//! an error. Run `cargo build --workspace --bins` first.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use bulkhead_tests::process::workspace_binary;

const DAEMONS: [&str; 3] = ["bulkhead-blk", "bulkhead-net", "bulkhead-console"];

/// The options each daemon needs besides the socket to get past its own checks.
fn device_args(daemon: &str) -> &'static [&'static str] {
    match daemon {
        "bulkhead-blk" => &["--image", "/dev/null"],
        "bulkhead-net" => &["--tap", "bulkhead0"],
        _ => &[],
    }
}

/// `journal_stream` names which file: the child's stderr, another file, or
/// none (the variable unset).
#[derive(Clone, Copy)]
enum Stream {
    Stderr,
    Other,
    Unset,
}

/// Runs `daemon` without a socket, its stderr a file, and returns what it
/// wrote there and its pid.
fn run(daemon: &str, stream: Stream) -> (String, u32) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&path).unwrap();
    let other = std::fs::File::create(dir.path().join("other")).unwrap();
    let named = |f: &std::fs::File| {
        let m = f.metadata().unwrap();
        format!("{}:{}", m.dev(), m.ino())
    };
    let mut cmd = Command::new(workspace_binary(daemon));
    cmd.args(device_args(daemon))
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.try_clone().unwrap());
    match stream {
        Stream::Stderr => cmd.env("JOURNAL_STREAM", named(&stderr)),
        Stream::Other => cmd.env("JOURNAL_STREAM", named(&other)),
        Stream::Unset => cmd.env_remove("JOURNAL_STREAM"),
    };
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{daemon} without a socket");
    (std::fs::read_to_string(&path).unwrap(), pid)
}

#[test]
fn a_daemon_whose_stderr_is_the_journal_writes_priority_prefixes() {
    for d in DAEMONS {
        let (text, pid) = run(d, Stream::Stderr);
        let error = text
            .lines()
            .find(|l| l.contains("--socket-path or --fd"))
            .unwrap_or_else(|| panic!("{d} logged no error: {text}"));
        assert!(error.starts_with("<3>ERROR "), "{d}: {error}");
        for line in text.lines() {
            assert!(
                ["<3>", "<4>", "<6>", "<7>"]
                    .iter()
                    .any(|p| line.starts_with(p)),
                "{d}: a journal line without a priority: {line}"
            );
            assert!(
                !line.contains(d) && !line.contains(&format!("[{pid}]")),
                "{d}: journald records program and pid itself: {line}"
            );
        }
    }
}

#[test]
fn a_daemon_whose_stderr_is_not_the_journal_writes_plain_lines() {
    // Unset, or inherited from a journal-connected parent by a process
    // whose stderr is something else (the launcher's pipe, a file).
    for stream in [Stream::Unset, Stream::Other] {
        for d in DAEMONS {
            let (text, pid) = run(d, stream);
            let want = format!("{d}[{pid}]: ERROR one of --socket-path or --fd");
            assert!(
                text.lines().any(|l| l.starts_with(&want)),
                "{d}: no `{want}` in: {text}"
            );
            assert!(!text.contains("<3>"), "{d}: {text}");
        }
    }
}
