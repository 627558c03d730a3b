//! The throttle suite: `bulkhead-blk` with an I/O limit, driven by the test
//! kit's client well above the limit for a while, reports the rate it got
//! against the limit and the daemon's CPU while it held the client back (a
//! throttled queue must sleep, not spin). A benchmark, not a test: the
//! numbers go to docs/performance.md.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::client::Result;
use super::profile;
use super::targets::{Bulkhead, Kind, Target};
use super::workload::{Pattern, Spec};

/// One throttled point.
pub struct Point {
    /// The daemon's limit flags (`--iops-total 1000`).
    pub flags: Vec<String>,
    /// The limit in the measured unit (IOPS or MiB/s).
    pub limit: f64,
    /// What the limit counts: "IOPS" or "MiB/s".
    pub unit: &'static str,
    /// Access pattern.
    pub pattern: Pattern,
    /// The bucket set with `-max` (0: the default): the point then counts
    /// every request from the daemon's start, when its bucket is full, and
    /// sets them against what the limit allows in that time, the burst
    /// plus the rate for the whole run.
    pub burst: u64,
}

/// Runs each point for `secs` at queue depth `qd`; one JSON row per point
/// (`limit`, `workload`, `measured`, `unit`, `ratio`, `daemon_cpu_pct`).
pub fn run(
    bin: &Path,
    image: &Path,
    dir: &Path,
    image_size: u64,
    points: &[Point],
    secs: f64,
    qd: usize,
) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for p in points {
        let bulkhead = Bulkhead {
            bin,
            args: &p.flags,
            baseline: None,
            poll_max_us: 64,
        };
        let mut t = Target::start(Kind::Bulkhead, &bulkhead, image, dir, 1, qd)?;
        let spec = Spec {
            pattern: p.pattern,
            qd,
            duration: Duration::from_secs_f64(secs),
            image_size,
            seed: 7,
        };
        let pid = t.pid().ok_or("no daemon pid")?;
        let cpu0 = profile::cpu_ns(pid);
        let sample = t.run(&spec)?;
        let cpu = profile::cpu_ns(pid).saturating_sub(cpu0) as f64 / 1e9;
        if sample.errors > 0 {
            return Err(format!("{}: {} requests failed", p.flags.join(" "), sample.errors).into());
        }
        let wall = sample.secs.max(1e-9);
        let ops = sample.ops;
        let stats = sample.stats();
        let (measured, allowed, unit, workload) = if p.burst > 0 {
            (
                ops as f64,
                p.burst as f64 + p.limit * wall,
                "requests",
                format!(
                    "{} QD{qd}, from a full bucket; allowed: {} + {} x {wall:.1} s",
                    p.pattern.name(),
                    p.burst,
                    p.limit
                ),
            )
        } else if p.unit == "IOPS" {
            (
                stats.iops,
                p.limit,
                p.unit,
                format!("{} QD{qd}", p.pattern.name()),
            )
        } else {
            (
                stats.mib_s,
                p.limit,
                p.unit,
                format!("{} QD{qd}", p.pattern.name()),
            )
        };
        let row = json!({
            "limit": format!("bulkhead-blk {}", p.flags.join(" ")),
            "workload": workload,
            "measured": (measured * 10.0).round() / 10.0,
            "unit": unit,
            "ratio": (measured / allowed * 1000.0).round() / 1000.0,
            "daemon_cpu_pct": (10000.0 * cpu / wall).round() / 100.0,
        });
        eprintln!("throttle: {row}");
        rows.push(row);
    }
    Ok(rows)
}
