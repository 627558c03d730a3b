//! Every daemon exits with the same status for the same kind of failure
//! (`common::scaffold`): 2 for a command line or configuration that is wrong
//! in itself (clap's status too), 1 for something it names that cannot be
//! opened, 0 for `--print-capabilities`.
//!
//! Run `cargo build -p bulkhead-blk -p bulkhead-net -p bulkhead-console` first.

use std::process::Command;

use bulkhead_tests::process::workspace_binary;

const DAEMONS: [&str; 3] = ["bulkhead-blk", "bulkhead-net", "bulkhead-console"];

/// Runs `daemon` with `args` and returns its exit status and stderr.
fn run(daemon: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(workspace_binary(daemon))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {daemon} (build it first): {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The options each daemon needs besides the socket to get past its own checks.
fn device_args(daemon: &str) -> &'static [&'static str] {
    match daemon {
        "bulkhead-blk" => &["--image", "/dev/null"],
        "bulkhead-net" => &["--tap", "bulkhead0"],
        _ => &[],
    }
}

#[test]
fn every_daemon_exits_2_without_a_socket() {
    for d in DAEMONS {
        let (code, err) = run(d, device_args(d));
        assert_eq!(code, Some(2), "{d}: {err}");
        assert!(err.contains("--socket-path or --fd"), "{d}: {err}");
    }
}

#[test]
fn every_daemon_exits_2_for_an_option_clap_rejects() {
    for d in DAEMONS {
        let (code, err) = run(d, &["--socket-path", "/tmp/x.sock", "--no-such-option"]);
        assert_eq!(code, Some(2), "{d}: {err}");
        let (code, err) = run(d, &["--socket-path", "/tmp/x.sock", "--sandbox", "maybe"]);
        assert_eq!(code, Some(2), "{d}: {err}");
    }
}

#[test]
fn every_daemon_exits_2_for_a_configuration_wrong_in_itself() {
    let sock = "/tmp/bulkhead-exit-codes-never-created.sock";
    let cases: [(&str, &[&str]); 2] = [
        // More queue pairs than tap queues given.
        (
            "bulkhead-net",
            &["--tap-fd", "0", "--tap-fd", "1", "--queue-pairs", "3"],
        ),
        // One port name twice.
        (
            "bulkhead-console",
            &["--port", "name=a", "--port", "name=a"],
        ),
    ];
    for (d, args) in cases {
        let mut all = vec!["--socket-path", sock];
        all.extend_from_slice(args);
        let (code, err) = run(d, &all);
        assert_eq!(code, Some(2), "{d}: {err}");
        assert!(
            !std::path::Path::new(sock).exists(),
            "{d} created its socket"
        );
    }
}

#[test]
fn every_daemon_exits_1_when_what_it_serves_cannot_be_opened() {
    let sock = "/tmp/bulkhead-exit-codes-never-created.sock";
    let cases: [(&str, &[&str]); 3] = [
        ("bulkhead-blk", &["--image", "/nonexistent/bulkhead.img"]),
        // stdin is no tap.
        ("bulkhead-net", &["--tap-fd", "0"]),
        (
            "bulkhead-console",
            &["--console", "file=/nonexistent/bulkhead.log"],
        ),
    ];
    for (d, args) in cases {
        let mut all = vec!["--socket-path", sock];
        all.extend_from_slice(args);
        let (code, err) = run(d, &all);
        assert_eq!(code, Some(1), "{d}: {err}");
        assert!(
            !std::path::Path::new(sock).exists(),
            "{d} created its socket"
        );
    }
}

#[test]
fn every_daemon_prints_its_capabilities_and_exits_0() {
    for d in DAEMONS {
        let (code, err) = run(d, &["--print-capabilities"]);
        assert_eq!(code, Some(0), "{d}: {err}");
    }
}
