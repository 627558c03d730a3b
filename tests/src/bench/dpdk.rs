//! DPDK's `dpdk-testpmd` as a benchmark peer: its virtio-user PMD as an
//! independent vhost-user net frontend, its vhost PMD as the reference
//! backend. testpmd runs interactively with its commands piped in, so one
//! process serves every run of a benchmark (`start`, `stop`, `set txpkts`,
//! `show port stats`).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_tests::guest::die_with_parent;
use bulkhead_tests::netns::NetNs;
use bulkhead_tests::process::ChildGuard;

use super::client::Result;

/// Where Debian's DPDK 22.11 keeps its PMDs.
const PMD_DIR: &str = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0";

/// Why testpmd cannot be used here, or None.
pub fn unavailable() -> Option<String> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("dpdk-testpmd").exists()));
    if !found {
        return Some("dpdk-testpmd is not installed (package dpdk)".into());
    }
    let have = |prefix: &str| {
        std::fs::read_dir(PMD_DIR).ok().is_some_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        })
    };
    for (pmd, pkg) in [
        ("librte_net_virtio", "librte-net-virtio23"),
        ("librte_net_vhost", "librte-net-vhost23"),
        ("librte_net_tap", "librte-net-tap23"),
    ] {
        if !have(pmd) {
            return Some(format!("no {pmd} in {PMD_DIR} (package {pkg})"));
        }
    }
    None
}

/// How to start one testpmd.
pub struct PmdSpec<'a> {
    /// Name for the file prefix and messages.
    pub name: &'a str,
    /// `--vdev` arguments, one port each.
    pub vdevs: Vec<String>,
    /// Forwarding mode (`txonly`, `rxonly`, `io`).
    pub mode: &'a str,
    /// CPU of the forwarding lcore (the main lcore only reads commands).
    pub fwd_cpu: usize,
    /// Run inside this namespace (for a tap PMD).
    pub netns: Option<&'a NetNs>,
}

/// A running testpmd.
pub struct TestPmd {
    guard: ChildGuard,
    out: Arc<Mutex<String>>,
    prefix: String,
    /// Its command line.
    pub config: String,
}

impl TestPmd {
    /// Its process id (`ip netns exec` and `stdbuf` exec into testpmd).
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Starts testpmd and waits for its prompt.
    pub fn start(spec: &PmdSpec<'_>) -> Result<TestPmd> {
        let prefix = format!("bhbench-{}-{}", std::process::id(), spec.name);
        let mut args: Vec<String> = [
            "--no-huge",
            "--no-pci",
            "-m",
            "512",
            "--log-level",
            "lib.eal:error",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--lcores".into());
        args.push(format!("0@0,1@{}", spec.fwd_cpu));
        args.push("--file-prefix".into());
        args.push(prefix.clone());
        for v in &spec.vdevs {
            args.push("--vdev".into());
            args.push(v.clone());
        }
        args.extend(
            [
                "--",
                "-i",
                "--nb-cores=1",
                "--total-num-mbufs=16384",
                "--txd=256",
                "--rxd=256",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.push(format!("--forward-mode={}", spec.mode));
        // stdout is a pipe: line-buffer it, or testpmd's answers arrive after its prompt.
        let mut cmd = match spec.netns {
            Some(ns) => ns.command("stdbuf"),
            None => Command::new("stdbuf"),
        };
        cmd.args(["-oL", "dpdk-testpmd"])
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let mut guard = ChildGuard::spawn("dpdk-testpmd", &mut cmd)?;
        let out = Arc::new(Mutex::new(String::new()));
        let mut stdout = guard.child_mut().stdout.take().ok_or("no testpmd stdout")?;
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let config = format!("dpdk-testpmd {}", args.join(" "));
        let mut t = TestPmd {
            guard,
            out,
            prefix,
            config,
        };
        t.wait_for(0, "testpmd> ", Duration::from_secs(60))?;
        Ok(t)
    }

    fn output(&self) -> String {
        self.out.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.out.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Waits until the output after byte `from` contains `text`; returns that part.
    fn wait_for(&mut self, from: usize, text: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            let tail = out.get(from..).unwrap_or("");
            if tail.contains(text) {
                return Ok(tail.to_string());
            }
            if let Ok(Some(st)) = self.guard.try_wait() {
                return Err(format!("testpmd exited ({st}):\n{}", last_lines(&out, 30)).into());
            }
            if Instant::now() >= deadline {
                return Err(
                    format!("testpmd never printed {text:?}:\n{}", last_lines(&out, 30)).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends one command line and waits for the next prompt.
    pub fn cmd(&mut self, line: &str) -> Result<String> {
        let from = self.len();
        let stdin = self
            .guard
            .child_mut()
            .stdin
            .as_mut()
            .ok_or("no testpmd stdin")?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()?;
        self.wait_for(from, "testpmd> ", Duration::from_secs(20))
    }

    /// Port `port`'s (RX-packets, TX-packets) and when they were read (mid-command).
    pub fn port_counts(&mut self, port: u16) -> Result<(u64, u64, Instant)> {
        let from = self.len();
        let t0 = Instant::now();
        self.cmd(&format!("show port stats {port}"))?;
        let t = t0 + (Instant::now() - t0) / 2;
        let text = self.wait_for(from, "Tx-bps", Duration::from_secs(10))?;
        let field = |name: &str| -> Result<u64> {
            text.split(name)
                .nth(1)
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                .ok_or_else(|| format!("no {name} in testpmd output:\n{text}").into())
        };
        Ok((field("RX-packets:")?, field("TX-packets:")?, t))
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for TestPmd {
    fn drop(&mut self) {
        if let Some(stdin) = self.guard.child_mut().stdin.as_mut() {
            let _ = stdin.write_all(b"stop\nquit\n");
            let _ = stdin.flush();
        }
        if !matches!(self.guard.wait_timeout(Duration::from_secs(5)), Ok(Some(_))) {
            let _ = self.guard.kill();
        }
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}
