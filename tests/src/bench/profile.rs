//! Where a daemon spends its time: CPU time per request from
//! `/proc/PID/task/*/schedstat`, and the top symbols of a `perf record` of it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bulkhead_tests::process::ChildGuard;
use serde_json::{Value, json};

use super::client::Result;

/// Nanoseconds of CPU all threads of `pid` have run so far (0 when unreadable).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A process's memory from `/proc/PID/status`, in KiB: resident in all,
/// anonymous (its own heap and stacks: what guest memory mapped from the
/// frontend does not inflate), and the peak resident size.
pub fn mem_kib(pid: u32) -> Option<Value> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(serde_json::json!({
        "rss_kib": field("VmRSS")?,
        "anon_kib": field("RssAnon")?,
        "shmem_kib": field("RssShmem")?,
        "peak_kib": field("VmHWM")?,
    }))
}

/// Whether `perf record` can sample a process of ours here.
pub fn perf_available() -> bool {
    Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-o",
            "/dev/null",
            "--",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A `perf record` attached to a process until [`Recording::finish`].
pub struct Recording {
    guard: ChildGuard,
    data: std::path::PathBuf,
}

impl Recording {
    /// Starts sampling `pid` (all its threads, user and kernel) into `data`.
    pub fn start(pid: u32, data: &Path) -> Result<Recording> {
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-q", "-e", "cpu-clock", "-F", "4999", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let guard = ChildGuard::spawn("perf", &mut cmd)?;
        // perf needs a moment to attach to every thread.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Recording {
            guard,
            data: data.to_path_buf(),
        })
    }

    /// Stops recording and returns the top symbols and threads as JSON.
    pub fn finish(mut self, limit: usize) -> Result<Value> {
        self.guard.signal(libc::SIGINT)?;
        self.guard.wait_timeout(Duration::from_secs(30))?;
        let symbols = report(&self.data, "dso,symbol", limit)?;
        let threads = report(&self.data, "comm", limit)?;
        Ok(json!({"symbols": symbols, "threads": threads}))
    }
}

/// `perf report` rows for `sort` keys: percentage and the key columns.
fn report(data: &Path, sort: &str, limit: usize) -> Result<Vec<Value>> {
    let out = Command::new("perf")
        .arg("report")
        .arg("-i")
        .arg(data)
        .args(["--stdio", "--no-children", "-g", "none", "--sort", sort])
        .stderr(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rows = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.trim_start().contains('%'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let pct: f64 = it.next()?.trim_end_matches('%').parse().ok()?;
            let rest: Vec<&str> = it.collect();
            let what = rest.join(" ");
            // perf pads unused sort columns with "-".
            Some(json!({"pct": pct, "what": what.trim_end_matches(" - -")}))
        })
        .take(limit)
        .collect();
    Ok(rows)
}
