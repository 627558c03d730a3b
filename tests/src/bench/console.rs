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

use bulkhead_tests::console::{
    ConsoleDaemon, ConsoleDriver, HostConn, PAGE, ascii_pattern, read_n, suite,
    vhost_device_console_binary,
};
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

/// Round trips of the echo-latency measurement.
const ECHO_ROUNDS: usize = 200;

/// One daemon of the side-by-side comparison, brought up and connected.
struct Peer {
    name: &'static str,
    daemon: ConsoleDaemon,
    drv: ConsoleDriver,
    /// The host client (taken while an output run's reader holds it).
    host: Option<Box<dyn HostConn>>,
    out: Vec<f64>,
    echo_us: Vec<f64>,
    /// The echo's first leg: host write to the driver's read.
    in_us: Vec<f64>,
}

impl Peer {
    fn start(name: &'static str, daemon: ConsoleDaemon) -> Result<Peer> {
        let drv = suite::linux_console_bring_up(&daemon);
        let host = daemon.console.connect()?;
        // Let the daemon accept the client before the first byte of output.
        std::thread::sleep(Duration::from_millis(200));
        Ok(Peer {
            name,
            daemon,
            drv,
            host: Some(host),
            out: Vec::new(),
            echo_us: Vec::new(),
            in_us: Vec::new(),
        })
    }

    /// Guest output of `data`, byte-exact at the host: MiB/s.
    fn output(&mut self, data: &[u8]) -> Result<()> {
        let host = self.host.take().ok_or("no host client")?;
        let (host, rate) = suite::output_is_byte_exact(host, &mut self.drv, data);
        self.host = Some(host);
        self.out.push(rate);
        Ok(())
    }

    /// One round trip: a byte typed at the host, read by the guest, written
    /// back and read at the host, in µs (the first leg kept in `in_us`).
    fn echo_round(&mut self, i: usize) -> Result<()> {
        let mut b = [0u8; 1];
        let host = self.host.as_mut().ok_or("no host client")?;
        let byte = b'a' + (i % 26) as u8;
        let t0 = Instant::now();
        host.write_all(&[byte])?;
        let got = self.drv.read(0, 1, RUN_TIMEOUT)?;
        self.in_us.push(t0.elapsed().as_secs_f64() * 1e6);
        self.drv.write(0, &got, 1)?;
        host.timeout(Some(RUN_TIMEOUT))?;
        std::io::Read::read_exact(host, &mut b)?;
        self.echo_us.push(t0.elapsed().as_secs_f64() * 1e6);
        if b[0] != byte {
            return Err(format!("{}: echo {:?} came back as {:?}", self.name, byte, b[0]).into());
        }
        Ok(())
    }
}

/// The echo measurement, the peers' rounds interleaved (one round of each
/// in turn, the order alternating) so that a machine's slower moments fall
/// on both alike; a 5 ms pause before every round (vhost-device-console
/// 0.1.0 needs its receive buffer back first).
fn echo_interleaved(peers: &mut [Peer]) -> Result<()> {
    for i in 0..ECHO_ROUNDS {
        for k in 0..peers.len() {
            let j = if i % 2 == 0 { k } else { peers.len() - 1 - k };
            std::thread::sleep(Duration::from_millis(5));
            peers[j].echo_round(i)?;
        }
    }
    for p in peers.iter_mut() {
        p.drv.flush(0, Duration::from_secs(10))?;
    }
    Ok(())
}

/// bulkhead-console beside rust-vmm's vhost-device-console (network
/// backend), the same driver and client for both, runs interleaved: guest
/// output MiB/s (printable ASCII: 0.1.0 panics on other bytes), echo round
/// trip, and each daemon's RSS afterwards. Host input throughput is not
/// compared: vhost-device-console 0.1.0 takes input one byte per used
/// entry. `Err` with the reason when the peer is not installed.
pub fn peers(a: &ConsoleArgs) -> Result<std::result::Result<Value, String>> {
    let Some(bin) = vhost_device_console_binary() else {
        return Ok(Err(
            "vhost-device-console not installed (.ci/install-deps)".into()
        ));
    };
    let args: Vec<&str> = a.daemon_args.iter().map(String::as_str).collect();
    let mut peers = [
        Peer::start("bulkhead-console", ConsoleDaemon::bulkhead(&args)?)?,
        Peer::start(
            "vhost-device-console",
            ConsoleDaemon::vhost_device_console(&bin)?,
        )?,
    ];
    let data = ascii_pattern(7, a.bytes);
    for _ in 0..a.runs {
        for p in &mut peers {
            p.output(&data)?;
        }
    }
    echo_interleaved(&mut peers)?;
    let mut rows = Vec::new();
    for p in &mut peers {
        let mut lat = p.echo_us.clone();
        lat.sort_by(f64::total_cmp);
        let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
        let row = json!({
            "daemon": p.name,
            "guest_to_host_mib_s": (median(&p.out) * 10.0).round() / 10.0,
            "runs_mib_s": p.out.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
            "echo_p50_us": pct(0.5).round(),
            "echo_p99_us": pct(0.99).round(),
            "echo_in_p50_us": median(&p.in_us).round(),
            "rss_kib": p.daemon.rss_kib(),
        });
        eprintln!("console peers: {row}");
        rows.push(row);
    }
    let ratio = |k: &str| {
        let b = rows[0][k].as_f64().unwrap_or(0.0);
        let v = rows[1][k].as_f64().unwrap_or(0.0);
        (b / v.max(1e-9) * 100.0).round() / 100.0
    };
    Ok(Ok(json!({
        "rows": rows,
        "throughput_ratio": ratio("guest_to_host_mib_s"),
        "echo_p50_ratio": ratio("echo_p50_us"),
        "echo_p99_ratio": ratio("echo_p99_us"),
        "mib_per_run": a.bytes as f64 / (1 << 20) as f64,
        "runs": a.runs,
        "echo_rounds": ECHO_ROUNDS,
    })))
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
