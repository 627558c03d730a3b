//! `bulkhead check` on bad configs: every bad field is named, at once, and
//! the exit status says so; a good config passes. Build first:
//! `cargo build -p bulkhead-launcher -p bulkhead-blk -p bulkhead-net -p bulkhead-console`.

// Test code: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use bulkhead_tests::process::workspace_binary;

/// `bulkhead check` on `body` (in a fresh directory with `disk.img`,
/// `vmlinux` and `initrd`): exit code and stderr.
fn check(body: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    for f in ["disk.img", "vmlinux", "initrd"] {
        std::fs::File::create(dir.path().join(f))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let cfg = dir.path().join("vm.toml");
    std::fs::write(&cfg, body).unwrap();
    let out = Command::new(workspace_binary("bulkhead"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run bulkhead (cargo build -p bulkhead-launcher)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_config_with_every_mistake_is_refused_naming_each() {
    let (code, err) = check(
        r#"
frontend = "qemu"
[vm]
kernel = "missing-vmlinux"
initrd = "missing-initrd"
memory = "lots"
[[blk]]
image = "missing.img"
args = ["--bogus"]
[[net]]
tap = "tap0"
mac = "52:54:zz:00:00:01"
[[console]]
args = ["--scrollback", "many"]
"#,
    );
    assert_eq!(code, 1, "{err}");
    for want in [
        "vm.kernel = ",
        "missing-vmlinux",
        "vm.initrd = ",
        "vm.memory = \"lots\"",
        "blk0: image = ",
        "missing.img",
        "net0: mac = \"52:54:zz:00:00:01\"",
        "blk0: bulkhead-blk refuses its options",
        "--bogus",
        "console0: bulkhead-console refuses its options",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
}

#[test]
fn a_good_config_passes_and_lists_its_backends() {
    let (code, err) = check(
        r#"
[vm]
kernel = "vmlinux"
initrd = "initrd"
memory = "1G"
[[blk]]
image = "disk.img"
num_queues = 2
args = ["--serial", "disk0", "--format", "raw"]
[[net]]
tap = "tap0"
mac = "52:54:00:12:34:56"
args = ["--mtu", "1400"]
[[console]]
args = ["--console", "pty"]
"#,
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_daemon_check_flag_refuses_a_bad_value_with_status_2() {
    let out = Command::new(workspace_binary("bulkhead-net"))
        .args(["--check", "--tap", "t", "--mac", "ff:ff:ff:ff:ff:ff"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unicast"));
    let out = Command::new(workspace_binary("bulkhead-blk"))
        .args(["--check", "--image", "/nonexistent", "--num-queues", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "--check opens nothing");
}
