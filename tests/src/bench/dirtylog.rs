//! The dirty-log suite: what dirty-page logging costs `bulkhead-blk` while
//! a live migration runs. One daemon on a tmpfs image and one client
//! connection; logging is switched on (a fresh log, SET_LOG_BASE,
//! `VHOST_F_LOG_ALL`, rings with their log address, as QEMU does when a
//! migration starts) and off again between runs, queues running, the two
//! states interleaved (off, on, on, off, ...) so drift on a shared machine
//! falls on both. Every completion then marks its data pages and the used
//! ring in the log; with logging off the same code path takes one atomic
//! load per completion. A benchmark, not a test: the numbers go to
//! docs/performance.md.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::client::Result;
use super::profile;
use super::targets::{Bulkhead, Kind, Target};
use super::workload::{Pattern, Spec, median};

/// What to measure.
pub struct Args<'a> {
    /// How to start bulkhead-blk.
    pub bulkhead: Bulkhead<'a>,
    /// Runs per state (off and on each).
    pub runs: usize,
    /// Seconds per run.
    pub secs: f64,
    /// Discarded warm-up per state, seconds.
    pub warmup: f64,
    /// Queue depth.
    pub qd: usize,
}

/// Runs the suite on `image` (`image_size` bytes); sockets and logs in `dir`.
pub fn run(a: &Args<'_>, image: &Path, dir: &Path, image_size: u64) -> Result<Value> {
    let pattern = Pattern::RandRead;
    let mut t = Target::start(Kind::Bulkhead, &a.bulkhead, image, dir, 1, a.qd)?;
    let pid = t.pid().ok_or("no daemon pid")?;
    let spec = |secs: f64, seed: u64| Spec {
        pattern,
        qd: a.qd,
        duration: Duration::from_secs_f64(secs),
        image_size,
        seed,
    };
    for on in [false, true] {
        t.set_dirty_log(on)?;
        t.run(&spec(a.warmup, 1))?;
    }
    // Per state: IOPS and daemon CPU µs per request of each run.
    let mut iops = [Vec::new(), Vec::new()];
    let mut cpu_us = [Vec::new(), Vec::new()];
    let mut dirty_pages = 0;
    for i in 0..a.runs {
        let order = if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for on in order {
            t.set_dirty_log(on)?;
            let cpu0 = profile::cpu_ns(pid);
            let sample = t.run(&spec(a.secs, 7 + i as u64))?;
            let cpu = profile::cpu_ns(pid).saturating_sub(cpu0) as f64;
            if sample.errors > 0 {
                return Err(format!("dirty log {on}: {} requests failed", sample.errors).into());
            }
            if on {
                let pages = t.dirty_pages();
                if pages == 0 {
                    return Err("logging on, yet the daemon marked no page".into());
                }
                dirty_pages = dirty_pages.max(pages);
            }
            let ops = sample.ops.max(1) as f64;
            let s = usize::from(on);
            cpu_us[s].push(cpu / 1e3 / ops);
            iops[s].push(sample.stats().iops);
        }
    }
    t.set_dirty_log(false)?;
    let state = |s: usize| {
        json!({
            "iops": iops[s].iter().map(|v| v.round()).collect::<Vec<_>>(),
            "median_iops": median(&iops[s]).round(),
            "cpu_us_per_req": (median(&cpu_us[s]) * 100.0).round() / 100.0,
        })
    };
    let off = median(&iops[0]);
    let on = median(&iops[1]);
    let v = json!({
        "workload": format!("{} QD{} 1 queue, tmpfs", pattern.name(), a.qd),
        "config": t.config,
        "runs": a.runs,
        "secs": a.secs,
        "load": std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        "off": state(0),
        "on": state(1),
        "ratio": if off > 0.0 { (on / off * 1000.0).round() / 1000.0 } else { 0.0 },
        "dirty_pages": dirty_pages,
    });
    eprintln!("dirtylog: {v}");
    Ok(v)
}
