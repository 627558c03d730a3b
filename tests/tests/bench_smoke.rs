//! `bulkhead-bench --quick` runs end to end and writes a report with numbers.
//!
//! Needs `bulkhead-blk`, `bulkhead-net` and `bulkhead-console` built (`cargo
//! build -p bulkhead-blk -p bulkhead-net -p bulkhead-console`);
//! qemu-storage-daemon is compared too (a skip when it is missing). The net part
//! needs root (a network namespace and taps) and skips otherwise; it never
//! needs DPDK. `BULKHEAD_BENCH_BLK_ARGS` adds arguments to bulkhead-blk (e.g.
//! `--sandbox log`).

use std::process::Command;

use bulkhead_tests::netns;
use bulkhead_tests::process::workspace_binary;
use bulkhead_tests::skip::{self, skip_if};

#[test]
fn quick_bench_reports_iops_and_latency_for_every_target() {
    let out = tempfile::tempdir().unwrap();
    // libblkio drives bulkhead-blk (and qsd) too, beside the kit's driver.
    let mut targets = vec!["bulkhead-blk", "host-io_uring", "bulkhead-blk+libblkio"];
    let qsd = !skip_if(
        "quick_bench_reports_iops_and_latency_for_every_target (qsd targets)",
        skip::needs_program("qemu-storage-daemon"),
    );
    if qsd {
        targets.extend(["qsd-io_uring", "qsd-io_uring+libblkio"]);
    }
    let json = out.path().join("bench.json");
    let md = out.path().join("bench.md");
    let status = Command::new(env!("CARGO_BIN_EXE_bulkhead-bench"))
        // Only the suites checked below: the others have tests of their own
        // here, and the vmm suite's boots inside the nested host took
        // minutes of every CI run without any check on them (the nested
        // lane's own tests boot the same way).
        .args([
            "--quick",
            "--suites",
            "blk,dirtylog",
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
    // The dirtylog suite: logging on marked pages, and
    // both states did I/O.
    let d = &v["dirtylog"];
    assert!(d["dirty_pages"].as_u64().unwrap_or(0) > 0, "{d}");
    for state in ["off", "on"] {
        assert!(d[state]["median_iops"].as_f64().unwrap_or(0.0) > 0.0, "{d}");
    }
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(report.contains("## Goals") && report.contains("randread-4k"));
    assert!(report.contains("## Dirty logging"));
    if qsd {
        assert!(report.contains("## bulkhead-blk and qemu-storage-daemon through libblkio"));
    }
}

#[test]
fn quick_bench_reports_net_packet_rates_and_console_throughput() {
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("bench.json");
    let md = out.path().join("bench.md");
    let status = Command::new(env!("CARGO_BIN_EXE_bulkhead-bench"))
        .args(["--quick", "--suites", "net,console", "--net-secs", "0.2"])
        .args(["--console-mib", "2", "--dpdk", "off"])
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
    let report = std::fs::read_to_string(&md).unwrap();
    for dir in ["guest_to_host", "host_to_guest"] {
        let x = v["console"][dir]["mib_s"].as_f64().unwrap_or(0.0);
        assert!(x > 0.0, "console {dir}: {}", v["console"]);
    }
    assert!(report.contains("## bulkhead-console"));
    if let Some(why) = netns::unavailable() {
        // The bench skipped its net part for the same reason.
        assert!(v["net"]["skipped"].is_string(), "{}", v["net"]);
        skip::skip(
            "quick_bench_reports_net_packet_rates_and_console_throughput (net part)",
            why,
        );
        return;
    }
    let points = v["net"]["points"].as_array().expect("net points");
    assert_eq!(points.len(), 2, "64B and TSO");
    for p in points {
        for t in ["bulkhead-net/kit", "raw-tap-writer"] {
            let pps = p["results"][t]["pps"].as_f64().unwrap_or(0.0);
            assert!(pps > 0.0, "{t} moved nothing: {p}");
        }
    }
    assert!(v["net"]["rx"]["pps"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(report.contains("## bulkhead-net") && report.contains("kit x raw"));
    let stats = &v["net"]["daemon_stats"];
    assert_eq!(stats["tx_errors"], 0, "{stats}");
}

/// Runs `bulkhead-bench --quick ARGS` on the workspace's bulkhead-blk,
/// its outputs in a temporary directory; returns its JSON and Markdown.
fn quick_bench(args: &[&str]) -> (serde_json::Value, String) {
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("bench.json");
    let md = out.path().join("bench.md");
    let status = Command::new(env!("CARGO_BIN_EXE_bulkhead-bench"))
        .arg("--quick")
        .args(args)
        .arg("--bulkhead-bin")
        .arg(workspace_binary("bulkhead-blk"))
        .arg("--json")
        .arg(&json)
        .arg("--md")
        .arg(&md)
        .arg("--svg")
        .arg(out.path().join("bench.svg"))
        .status()
        .expect("run bulkhead-bench");
    assert!(
        status.success(),
        "bulkhead-bench --quick {args:?} failed: {status}"
    );
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (v, std::fs::read_to_string(&md).unwrap())
}

#[test]
fn quick_throttle_suite_reports_each_limit_against_the_rate_it_got() {
    let (v, report) = quick_bench(&["--suites", "throttle", "--throttle-secs", "0.5"]);
    let rows = v["throttle"]["rows"].as_array().unwrap();
    let want = if netns::unavailable().is_some() { 3 } else { 5 };
    assert_eq!(
        rows.len(),
        want,
        "blk iops, blk bps, blk burst (and net tx pps, net rx pps): {rows:?}"
    );
    assert!(
        rows.iter().any(|r| r["unit"] == "requests"),
        "a burst row: {rows:?}"
    );
    for r in rows {
        // An upper bound only: a loaded machine can make a rate lower, not
        // higher (the burst is a tenth of a second's rate; 0.5 s windows;
        // the burst row counts against the burst plus the rate).
        let ratio = r["ratio"].as_f64().unwrap();
        assert!(ratio > 0.0 && ratio <= 1.5, "{r}");
    }
    assert!(report.contains("## I/O limits") && report.contains("--iops-total 2000"));
}

#[test]
fn quick_packed_suite_compares_split_and_packed_rings_with_one_client() {
    // The net half needs DPDK's virtio-user PMD and a network namespace;
    // the bench finds out itself and says why it skipped them.
    let (v, report) = quick_bench(&[
        "--suites",
        "packed",
        "--qd",
        "1,4",
        "--secs",
        "0.2",
        "--net-secs",
        "0.2",
        "--net-sizes",
        "64B",
        "--dpdk",
        "on",
    ]);
    let p = &v["packed"];
    let points = p["points"].as_array().expect("packed points");
    assert_eq!(points.len(), 4, "randread and randwrite at QD 1 and 4: {p}");
    for pt in points {
        for t in ["bulkhead-blk-split", "bulkhead-blk-packed"] {
            let r = &pt["results"][t];
            assert!(
                r["iops"].as_f64().unwrap_or(0.0) > 0.0,
                "{t} did no I/O: {pt}"
            );
            assert_eq!(r["errors"], 0, "{pt}");
        }
    }
    assert!(report.contains("## Packed rings") && report.contains("packed / split"));
    let net = &p["net"];
    if let Some(why) = net["skipped"].as_str() {
        // The bench's own check; under CI (DPDK and root there) it must not happen.
        assert!(!skip::under_ci(), "packed net rows skipped under CI: {why}");
        eprintln!(
            "SKIPPED quick_packed_suite_compares_split_and_packed_rings_with_one_client (net rows): {why}"
        );
        return;
    }
    let net_points = net["points"].as_array().expect("packed net points");
    assert_eq!(net_points.len(), 2, "tx and rx at 64 B: {net}");
    for pt in net_points {
        for layout in ["split", "packed"] {
            assert!(
                pt[layout]["pps"].as_f64().unwrap_or(0.0) > 0.0,
                "{layout} moved nothing: {pt}"
            );
        }
    }
}
