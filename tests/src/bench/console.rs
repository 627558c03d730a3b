//! The console benchmark: MiB/s through `bulkhead-console` port 0, guest →
//! host and host → guest, with the test kit's driver (which replays Linux's
//! virtio_console) as frontend and a unix-socket client on the host side.
//!
//! Guest → host: the driver writes `bytes` in 32 KiB buffers (Linux's port
//! write size) while a host thread reads the socket until all arrived.
//! Host → guest: a host thread writes `bytes` into the socket while the
//! driver takes page-sized receive buffers (as Linux posts them) until all
//! arrived. Each run is timed from the first byte sent to the last received.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bulkhead_tests::console::{ConsoleDaemon, ConsoleDriver, HostConn, PAGE, read_n};
use serde_json::{Value, json};

use super::client::Result;
use super::profile;
use super::workload::median;

/// Guest write size (Linux's `port_fops_write` takes at most 32 KiB at a time).
const WRITE_CHUNK: usize = 32 * 1024;
/// A run fails after this long.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Settings of the console benchmark.
pub struct ConsoleArgs {
    /// Runs per direction.
    pub runs: usize,
    /// Bytes per run.
    pub bytes: usize,
    /// Extra `bulkhead-console` arguments.
    pub daemon_args: Vec<String>,
}

fn mib_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64().max(1e-9)
}

/// Guest → host: returns MiB/s.
fn output(drv: &mut ConsoleDriver, host: &mut UnixStream, data: &[u8]) -> Result<f64> {
    let n = data.len();
    let mut conn = host.try_clone()?;
    let reader = std::thread::spawn(move || read_n(&mut conn, n, RUN_TIMEOUT));
    let t0 = Instant::now();
    drv.write(0, data, WRITE_CHUNK)?;
    let got = reader.join().map_err(|_| "reader panicked")??;
    let t = t0.elapsed();
    drv.flush(0, Duration::from_secs(10))?;
    if got.len() != n {
        return Err(format!("guest output: {} of {n} bytes arrived", got.len()).into());
    }
    Ok(mib_s(n, t))
}

/// Host → guest: returns MiB/s.
fn input(drv: &mut ConsoleDriver, host: &mut UnixStream, data: &[u8]) -> Result<f64> {
    let n = data.len();
    let mut conn = host.try_clone()?;
    let chunk = data.to_vec();
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || conn.write_all(&chunk));
    let got = drv.read(0, n, RUN_TIMEOUT)?;
    let t = t0.elapsed();
    writer.join().map_err(|_| "writer panicked")??;
    drv.repost_consumed()?;
    if got.len() != n {
        return Err(format!("guest input: {} of {n} bytes arrived", got.len()).into());
    }
    Ok(mib_s(n, t))
}

/// Runs the console benchmark; returns its JSON.
pub fn run(a: &ConsoleArgs) -> Result<Value> {
    let args: Vec<&str> = a.daemon_args.iter().map(String::as_str).collect();
    let daemon = ConsoleDaemon::bulkhead(&args)?;
    let mut drv = ConsoleDriver::connect(daemon.socket(), &ConsoleDriver::options())?;
    drv.linux_bring_up(&[None])?;
    let path = daemon.dir().join("vhost.sock.console");
    let mut host = UnixStream::connect(&path)?;
    HostConn::timeout(&host, Some(RUN_TIMEOUT))?;
    let data: Vec<u8> = (0..a.bytes).map(|i| (i % 251) as u8).collect();
    let mut out = Vec::new();
    let mut inp = Vec::new();
    let mut cpu_out = Vec::new();
    let mut cpu_in = Vec::new();
    for _ in 0..a.runs {
        let c0 = profile::cpu_ns(daemon.pid());
        out.push(output(&mut drv, &mut host, &data)?);
        let c1 = profile::cpu_ns(daemon.pid());
        inp.push(input(&mut drv, &mut host, &data)?);
        let c2 = profile::cpu_ns(daemon.pid());
        let per_mib = |ns: u64| ns as f64 / 1e6 / (a.bytes as f64 / (1 << 20) as f64);
        cpu_out.push(per_mib(c1.saturating_sub(c0)));
        cpu_in.push(per_mib(c2.saturating_sub(c1)));
    }
    let (o, i) = (median(&out), median(&inp));
    eprintln!("console guest->host {o:>7.1} MiB/s  host->guest {i:>7.1} MiB/s");
    let round = |v: &[f64]| {
        v.iter()
            .map(|x| (x * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    };
    Ok(json!({
        "method": {
            "runs": a.runs,
            "mib_per_run": a.bytes as f64 / (1 << 20) as f64,
            "guest_write_bytes": WRITE_CHUNK,
            "guest_rx_buffer_bytes": PAGE,
        },
        "config": format!("bulkhead-console --socket-path SOCK {}", args.join(" ")),
        "guest_to_host": {
            "mib_s": (o * 10.0).round() / 10.0,
            "runs_mib_s": round(&out),
            "daemon_cpu_ms_per_mib": (median(&cpu_out) * 100.0).round() / 100.0,
        },
        "host_to_guest": {
            "mib_s": (i * 10.0).round() / 10.0,
            "runs_mib_s": round(&inp),
            "daemon_cpu_ms_per_mib": (median(&cpu_in) * 100.0).round() / 100.0,
        },
    }))
}
