//! `--print-capabilities` of each daemon, as the vhost-user backend program
//! conventions ask: it works whatever the other options are (missing,
//! unknown or bad), and lists only features QEMU's schema
//! (docs/interop/vhost-user.json) defines for its type: block has
//! `read-only` and `blk-file`; net and console have none.
//!
//! Run `cargo build --workspace --bins` first.

use std::process::Command;

use bulkhead_tests::process::workspace_binary;

fn caps(bin: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(workspace_binary(bin))
        .args(args)
        .output()
        .expect("run the daemon");
    assert!(out.status.success(), "{bin} {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{bin}: {e}: {out:?}"))
}

#[test]
fn capabilities_list_only_schema_features_whatever_the_other_options() {
    let want = [
        (
            "bulkhead-blk",
            serde_json::json!({ "type": "block", "features": ["read-only", "blk-file"] }),
        ),
        ("bulkhead-net", serde_json::json!({ "type": "net" })),
        ("bulkhead-console", serde_json::json!({ "type": "console" })),
    ];
    for (bin, want) in want {
        for args in [
            &["--print-capabilities"][..],
            &["--bogus", "--print-capabilities"],
            &["--print-capabilities", "--num-queues", "0", "--mac", "zz"],
            &[
                "--socket-path",
                "/nonexistent/dir/s",
                "--print-capabilities",
            ],
        ] {
            assert_eq!(caps(bin, args), want, "{bin} {args:?}");
        }
    }
}
