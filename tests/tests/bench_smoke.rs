//! `bulkhead-bench --quick` runs end to end and writes a report with numbers.
//!
//! Needs `bulkhead-blk` built (`cargo build -p bulkhead-blk`); qemu-storage-daemon
//! is compared too when it is installed. `BULKHEAD_BENCH_BLK_ARGS` adds
//! arguments to bulkhead-blk (e.g. `--sandbox log`).

use std::process::Command;

use bulkhead_tests::process::workspace_binary;

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
}

#[test]
fn quick_bench_reports_iops_and_latency_for_every_target() {
    let out = tempfile::tempdir().unwrap();
    let mut targets = vec!["bulkhead-blk", "host-io_uring"];
    if have("qemu-storage-daemon") {
        targets.push("qsd-io_uring");
    }
    let json = out.path().join("bench.json");
    let md = out.path().join("bench.md");
    let status = Command::new(env!("CARGO_BIN_EXE_bulkhead-bench"))
        .args([
            "--quick",
            "--secs",
            "0.2",
            "--image-size",
            "32",
            "--qd",
            "1,4",
        ])
        .args(["--targets", &targets.join(",")])
        .arg("--bulkhead-bin")
        .arg(workspace_binary("bulkhead-blk"))
        .arg("--bulkhead-args")
        .arg(std::env::var("BULKHEAD_BENCH_BLK_ARGS").unwrap_or_default())
        .arg("--json")
        .arg(&json)
        .arg("--md")
        .arg(&md)
        .arg("--svg")
        .arg(out.path().join("bench.svg"))
        .status()
        .expect("run bulkhead-bench");
    assert!(status.success(), "bulkhead-bench --quick failed: {status}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let points = v["points"].as_array().expect("points");
    assert_eq!(points.len(), 4, "2 patterns x 2 queue depths");
    for p in points {
        for t in &targets {
            let r = &p["results"][*t];
            assert!(r["iops"].as_f64().unwrap() > 0.0, "{t} did no I/O: {p}");
            assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap());
            assert_eq!(r["errors"], 0);
        }
        assert!(p["ratio_vs_host"].as_f64().unwrap() > 0.0);
    }
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(report.contains("## Goals") && report.contains("randread-4k"));
}
