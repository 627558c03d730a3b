//! `bulkhead-bench`: drives vhost-user-blk backends from the host through the
//! test kit, as a VMM and its guest would, and compares `bulkhead-blk` with
//! qemu-storage-daemon (`aio=io_uring` and `aio=threads`) and with the same
//! access pattern issued directly on the host with io_uring. Then
//! `bulkhead-net` (packets per second and Gbit/s guest → tap, against DPDK's
//! vhost PMD and a raw tap writer; see `bench/net.rs`) and `bulkhead-console`
//! (MiB/s both ways; `bench/console.rs`), and `bulkhead-vmm`'s boot time to
//! the guest's init and its memory overhead (`bench/vmm.rs`).
//!
//! Every point (medium x queues x pattern x queue depth) is measured as
//! `--runs` runs of `--secs` seconds per target, the targets interleaved run
//! by run so that background noise hits them alike; the report gives medians.
//! Results go to JSON, Markdown and SVG (`scripts/bench` writes them to
//! `docs/performance.*`). `--quick` is a few-second smoke run.

#[path = "../bench/client.rs"]
mod client;
#[path = "../bench/console.rs"]
mod console;
#[path = "../bench/dirtylog.rs"]
mod dirtylog;
#[path = "../bench/dpdk.rs"]
mod dpdk;
#[path = "../bench/libblkio.rs"]
mod libblkio;
#[path = "../bench/net.rs"]
mod net;
#[path = "../bench/profile.rs"]
mod profile;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/targets.rs"]
mod targets;
#[path = "../bench/throttle.rs"]
mod throttle;
#[path = "../bench/vmm.rs"]
mod vmm;
#[path = "../bench/workload.rs"]
mod workload;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use client::Result;
use targets::{Kind, Target};
use workload::{Pattern, Spec, Stats, median_stats};

/// bulkhead-blk's default `--poll-max-us` (`bulkhead_common::cli::DEFAULT_POLL_MAX_US`).
const DEFAULT_POLL_MAX_US: u32 = 64;

const USAGE: &str = "\
usage: bulkhead-bench [--quick] [options]
  --quick               smoke run: tmpfs, 1 queue, 2 patterns, 1 x 0.3 s per point;
                        net 64B and TSO without DPDK, 1 x 0.3 s; console 1 x 4 MiB
  --suites LIST         blk,net,console,vmm,throttle,dirtylog,packed (default all seven);
                        throttle: bulkhead-blk and bulkhead-net held to limits (--throttle-*);
                        dirtylog: bulkhead-blk randread-4k QD32 with a live migration's
                        dirty logging off and on, interleaved (--dirtylog-*); packed: split
                        against packed rings, same client, interleaved (bulkhead-blk through
                        the kit at --qd, bulkhead-net through DPDK virtio-user); also rbd
                        (not by default): bulkhead-blk vs qsd's rbd driver on a throwaway
                        one-node Ceph cluster, through libblkio (--rbd-*)
  --dirtylog-runs N     runs per state of the dirtylog suite (default 6)
  --dirtylog-secs S     seconds per dirtylog run (default 2)
  --rbd-image-size MIB  size of each rbd suite image (default 256, 64 with --quick)
  --rbd-qd LIST         queue depths of the rbd suite (default 1,32)
  --throttle-iops LIST  --iops-total limits the throttle suite measures (default 200,2000)
  --throttle-bps LIST   --bps-total limits in MiB/s, seqread-128k (default 20)
  --throttle-pps LIST   bulkhead-net --tx-pps and --rx-pps limits, 64 B frames (default 1000,10000;
                        needs root for the tap, skipped otherwise)
  --throttle-secs S     seconds per throttle point (default 10)
  --runs N              runs per point (default 5)
  --secs S              seconds per run (default 0.8)
  --warmup S            discarded warm-up per point and target (default 0.2)
  --image-size MIB      image size (default 1024)
  --media LIST          tmpfs,disk (default both)
  --tmpfs-dir DIR       default /dev/shm
  --disk-dir DIR        default $TMPDIR or /tmp
  --queues LIST         default 1,2
  --qd LIST             default 1,32
  --patterns LIST       randread-4k,randwrite-4k,seqread-128k,seqwrite-128k
  --targets LIST        bulkhead-blk,qsd-io_uring,qsd-threads,host-io_uring (default), also
                        bulkhead-blk+libblkio,qsd-io_uring+libblkio: both driven by libblkio
  --bulkhead-bin PATH   default: bulkhead-blk next to this binary
  --bulkhead-args ARGS  extra bulkhead-blk arguments, split at spaces (e.g. \"--sandbox log\")
  --baseline-bin PATH   also measure this bulkhead-blk build as target bulkhead-blk-before
  --poll-max-us N       busy-poll budget of bulkhead-blk and of qsd's I/O thread (default 64, bulkhead-blk's)
  --profile S           perf-record bulkhead-blk and qsd for S seconds at randread-4k QD32 1 queue (tmpfs)
  --micro FILE          micro-benchmark JSON to fold into the report
  --net-runs N --net-secs S   net runs per point (default 3) and window (default 1.0)
  --net-sizes LIST      64B,1514B,tso-65000B (default all)
  --dpdk on|off         DPDK targets (default on, off with --quick)
  --net-args ARGS       extra bulkhead-net arguments (e.g. \"--sandbox log\")
  --net-baseline-bin PATH  also measure receive with this (earlier) bulkhead-net build,
                        one run each in turn (the order alternating), and report daemon CPU per frame before/after
  --console-args ARGS   extra bulkhead-console arguments
  --console-mib N       MiB per console run (default 64)
  --vmm-boots N         boots per vmm configuration and VMM (default 10, 2 with --quick)
  --vmm-boots-json FILE only boot bulkhead-vmm and QEMU here (KVM must run Linux) and write
                        the boots' JSON to FILE (what the vmm suite runs in the nested host)
  --json FILE --md FILE --svg FILE   outputs (default target/bench/bench.*)
  --merge-json FILE     run only --suites and merge their results into FILE's (the other
                        suites' numbers stay), e.g. --suites vmm --merge-json docs/performance.json
  --from-json FILE      only regenerate the report from an earlier JSON (with --micro:
                        fold in new micro-benchmark results, rewriting --json)";

struct Args {
    quick: bool,
    runs: usize,
    secs: f64,
    warmup: f64,
    image_mib: u64,
    media: Vec<String>,
    tmpfs_dir: PathBuf,
    disk_dir: PathBuf,
    queues: Vec<usize>,
    qds: Vec<usize>,
    patterns: Vec<Pattern>,
    kinds: Vec<Kind>,
    bulkhead_bin: PathBuf,
    bulkhead_args: Vec<String>,
    baseline_bin: Option<PathBuf>,
    poll_max_us: u32,
    profile: f64,
    suites: Vec<String>,
    net_runs: usize,
    net_secs: f64,
    net_sizes: Vec<net::Size>,
    dpdk: bool,
    net_args: Vec<String>,
    net_baseline: Option<PathBuf>,
    console_args: Vec<String>,
    console_mib: usize,
    micro: Option<PathBuf>,
    json: PathBuf,
    md: PathBuf,
    svg: PathBuf,
    from_json: Option<PathBuf>,
    vmm_boots: usize,
    vmm_boots_json: Option<PathBuf>,
    merge_json: Option<PathBuf>,
    throttle_iops: Vec<u64>,
    throttle_bps: Vec<u64>,
    throttle_secs: f64,
    throttle_pps: Vec<u64>,
    dirtylog_runs: usize,
    dirtylog_secs: f64,
    rbd_image_mib: u64,
    rbd_qds: Vec<usize>,
}

fn list<T>(s: &str, f: impl Fn(&str) -> Option<T>) -> std::result::Result<Vec<T>, String> {
    s.split(',')
        .map(|x| f(x.trim()).ok_or_else(|| format!("bad list item {x:?}")))
        .collect()
}

fn parse_args() -> std::result::Result<Args, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let quick = argv.iter().any(|a| a == "--quick");
    let mut a = Args {
        quick,
        runs: if quick { 1 } else { 5 },
        secs: if quick { 0.3 } else { 0.8 },
        warmup: if quick { 0.0 } else { 0.2 },
        image_mib: if quick { 64 } else { 1024 },
        media: if quick {
            vec!["tmpfs".into()]
        } else {
            vec!["tmpfs".into(), "disk".into()]
        },
        tmpfs_dir: PathBuf::from("/dev/shm"),
        disk_dir: std::env::temp_dir(),
        queues: if quick { vec![1] } else { vec![1, 2] },
        qds: vec![1, 32],
        patterns: if quick {
            vec![Pattern::RandRead, Pattern::SeqWrite]
        } else {
            Pattern::ALL.to_vec()
        },
        kinds: Kind::ALL.into_iter().filter(|k| k.is_default()).collect(),
        bulkhead_bin: bulkhead_tests::process::workspace_binary("bulkhead-blk"),
        bulkhead_args: Vec::new(),
        baseline_bin: None,
        poll_max_us: DEFAULT_POLL_MAX_US,
        profile: 0.0,
        suites: vec![
            "blk".into(),
            "net".into(),
            "console".into(),
            "vmm".into(),
            "throttle".into(),
            "dirtylog".into(),
            "packed".into(),
        ],
        net_runs: if quick { 1 } else { 3 },
        net_secs: if quick { 0.3 } else { 1.0 },
        net_sizes: if quick {
            vec![net::Size::Small, net::Size::Tso]
        } else {
            net::Size::ALL.to_vec()
        },
        dpdk: !quick,
        net_args: Vec::new(),
        net_baseline: None,
        console_args: Vec::new(),
        console_mib: if quick { 4 } else { 64 },
        micro: None,
        json: PathBuf::from("target/bench/bench.json"),
        md: PathBuf::from("target/bench/bench.md"),
        svg: PathBuf::from("target/bench/bench.svg"),
        from_json: None,
        vmm_boots: if quick { 2 } else { 10 },
        vmm_boots_json: None,
        merge_json: None,
        throttle_iops: if quick { vec![2000] } else { vec![200, 2000] },
        throttle_bps: vec![20],
        throttle_secs: if quick { 1.0 } else { 10.0 },
        throttle_pps: if quick { vec![1000] } else { vec![1000, 10000] },
        dirtylog_runs: if quick { 1 } else { 6 },
        dirtylog_secs: if quick { 0.3 } else { 2.0 },
        rbd_image_mib: if quick { 64 } else { 256 },
        rbd_qds: vec![1, 32],
    };
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        if flag == "--quick" {
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--runs" => a.runs = (num(&v)? as usize).max(1),
            "--secs" => a.secs = num(&v)?,
            "--warmup" => a.warmup = num(&v)?,
            "--image-size" => a.image_mib = (num(&v)? as u64).max(16),
            "--media" => a.media = list(&v, |x| ["tmpfs", "disk"].contains(&x).then(|| x.into()))?,
            "--tmpfs-dir" => a.tmpfs_dir = v.into(),
            "--disk-dir" => a.disk_dir = v.into(),
            "--queues" => a.queues = list(&v, |x| x.parse().ok().filter(|&n| n > 0))?,
            "--qd" => a.qds = list(&v, |x| x.parse().ok().filter(|&n| (1..=64).contains(&n)))?,
            "--patterns" => a.patterns = list(&v, Pattern::parse)?,
            "--targets" => a.kinds = list(&v, Kind::parse)?,
            "--bulkhead-bin" => a.bulkhead_bin = v.into(),
            "--bulkhead-args" => a.bulkhead_args = v.split_whitespace().map(String::from).collect(),
            "--baseline-bin" => a.baseline_bin = Some(v.into()),
            "--poll-max-us" => a.poll_max_us = v.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--profile" => a.profile = num(&v)?,
            "--suites" => {
                a.suites = list(&v, |x| {
                    [
                        "blk", "net", "console", "vmm", "throttle", "dirtylog", "packed", "rbd",
                    ]
                    .contains(&x)
                    .then(|| x.into())
                })?
            }
            "--net-runs" => a.net_runs = (num(&v)? as usize).max(1),
            "--net-secs" => a.net_secs = num(&v)?,
            "--net-sizes" => a.net_sizes = list(&v, net::Size::parse)?,
            "--dpdk" => a.dpdk = v == "on",
            "--net-args" => a.net_args = v.split_whitespace().map(String::from).collect(),
            "--net-baseline-bin" => a.net_baseline = Some(PathBuf::from(v)),
            "--console-args" => a.console_args = v.split_whitespace().map(String::from).collect(),
            "--console-mib" => a.console_mib = (num(&v)? as usize).max(1),
            "--micro" => a.micro = Some(v.into()),
            "--json" => a.json = v.into(),
            "--md" => a.md = v.into(),
            "--svg" => a.svg = v.into(),
            "--from-json" => a.from_json = Some(v.into()),
            "--vmm-boots" => a.vmm_boots = (num(&v)? as usize).max(1),
            "--vmm-boots-json" => a.vmm_boots_json = Some(v.into()),
            "--merge-json" => a.merge_json = Some(v.into()),
            "--throttle-iops" => a.throttle_iops = list(&v, |x| x.parse().ok().filter(|&n| n > 0))?,
            "--throttle-bps" => a.throttle_bps = list(&v, |x| x.parse().ok().filter(|&n| n > 0))?,
            "--throttle-secs" => a.throttle_secs = num(&v)?,
            "--dirtylog-runs" => a.dirtylog_runs = (num(&v)? as usize).max(1),
            "--dirtylog-secs" => a.dirtylog_secs = num(&v)?,
            "--rbd-image-size" => a.rbd_image_mib = (num(&v)? as u64).max(16),
            "--rbd-qd" => {
                a.rbd_qds = list(&v, |x| x.parse().ok().filter(|&n| (1..=64).contains(&n)))?
            }
            "--throttle-pps" => {
                a.throttle_pps = list(&v, |x| x.parse().ok().filter(|&n| n >= 1000))?
            }
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if a.baseline_bin.is_some() && !a.kinds.contains(&Kind::Baseline) {
        let at = a.kinds.len().min(1);
        a.kinds.insert(at, Kind::Baseline);
    }
    Ok(a)
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn fs_type(dir: &Path) -> String {
    sh("stat", &["-f", "-c", "%T", &dir.display().to_string()])
}

/// Writes the whole image once so that no run reads holes or allocates blocks.
fn fill_image(path: &Path, size: u64, sync: bool) -> Result<()> {
    let mut f = File::create(path)?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 1) as u8).collect();
    let mut done = 0;
    while done < size {
        let n = (size - done).min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        done += n as u64;
    }
    if sync {
        f.sync_all()?;
    }
    Ok(())
}

fn stats_json(s: &Stats) -> Value {
    let r = |v: f64, d: i32| (v * 10f64.powi(d)).round() / 10f64.powi(d);
    json!({
        "iops": r(s.iops, 0),
        "mib_s": r(s.mib_s, 1),
        "p50_us": r(s.p50_us, 1),
        "p99_us": r(s.p99_us, 1),
        "p999_us": r(s.p999_us, 1),
    })
}

/// Where one point is measured.
struct PointCtx<'a> {
    medium: &'a str,
    queues: usize,
    image_size: u64,
}

/// Measures one point on every target; returns its JSON.
fn measure_point(
    a: &Args,
    targets: &mut [Target],
    ctx: &PointCtx<'_>,
    pattern: Pattern,
    qd: usize,
) -> Result<Value> {
    let spec = |secs: f64, seed: u64| Spec {
        pattern,
        qd,
        duration: Duration::from_secs_f64(secs),
        image_size: ctx.image_size,
        seed,
    };
    if a.warmup > 0.0 {
        for t in targets.iter_mut() {
            t.run(&spec(a.warmup, 999))?;
        }
    }
    let n = targets.len();
    let mut runs: Vec<Vec<Stats>> = vec![Vec::new(); n];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut errors = vec![0u64; n];
    for r in 0..a.runs {
        // Rotate the order so no target always runs first or last.
        for k in 0..n {
            let i = (k + r) % n;
            let t = &mut targets[i];
            let before = t.pid().map(profile::cpu_ns);
            let sample = t.run(&spec(a.secs, r as u64 + 1))?;
            if let (Some(b), Some(pid)) = (before, t.pid()) {
                let used = profile::cpu_ns(pid).saturating_sub(b);
                if sample.ops > 0 && used > 0 {
                    cpu[i].push(used as f64 / 1000.0 / sample.ops as f64);
                }
            }
            errors[i] += sample.errors;
            runs[i].push(sample.stats());
        }
    }
    let mut results = serde_json::Map::new();
    let mut line = format!(
        "{:<5} {}q {:<13} qd{qd:<2}",
        ctx.medium,
        ctx.queues,
        pattern.name()
    );
    for (i, t) in targets.iter().enumerate() {
        let m = median_stats(&runs[i]);
        let mut v = stats_json(&m);
        v["runs_iops"] = json!(runs[i].iter().map(|s| s.iops.round()).collect::<Vec<_>>());
        v["errors"] = json!(errors[i]);
        if !cpu[i].is_empty() {
            v["daemon_cpu_us_per_op"] = json!((workload::median(&cpu[i]) * 100.0).round() / 100.0);
        }
        line += &format!("  {} {:>8.0}", t.kind.name(), m.iops);
        results.insert(t.kind.name().into(), v);
    }
    eprintln!("{line}");
    if errors.iter().any(|&e| e > 0) {
        return Err(format!("{line}: requests failed: {errors:?}").into());
    }
    Ok(json!({
        "medium": ctx.medium,
        "queues": ctx.queues,
        "pattern": pattern.name(),
        "block_size": pattern.block_size(),
        "qd": qd,
        "results": results,
    }))
}

/// `--suites throttle`: bulkhead-blk held to each `--throttle-iops` and
/// `--throttle-bps` limit, on a tmpfs image, then bulkhead-net to each
/// `--throttle-pps`; the report's "I/O limits" section.
fn throttle_suite(a: &Args) -> Result<Value> {
    let dir = a
        .tmpfs_dir
        .join(format!("bulkhead-bench-throttle-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("image.raw");
    let image_size = 256u64 << 20;
    fill_image(&image, image_size, false)?;
    let mut points = Vec::new();
    for &n in &a.throttle_iops {
        points.push(throttle::Point {
            flags: vec!["--iops-total".into(), n.to_string()],
            limit: n as f64,
            unit: "IOPS",
            pattern: Pattern::RandRead,
            burst: 0,
        });
    }
    for &mib in &a.throttle_bps {
        points.push(throttle::Point {
            flags: vec!["--bps-total".into(), format!("{mib}M")],
            limit: mib as f64,
            unit: "MiB/s",
            pattern: Pattern::SeqRead,
            burst: 0,
        });
    }
    // A burst: five seconds' worth of requests at once, then the rate.
    if let Some(&n) = a.throttle_iops.first() {
        let burst = n * 5;
        points.push(throttle::Point {
            flags: vec![
                "--iops-total".into(),
                n.to_string(),
                "--iops-total-max".into(),
                burst.to_string(),
            ],
            limit: n as f64,
            unit: "IOPS",
            pattern: Pattern::RandRead,
            burst,
        });
    }
    let blk = throttle::run(
        &a.bulkhead_bin,
        &image,
        &dir,
        image_size,
        &points,
        a.throttle_secs,
        32,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = blk?;
    let net_skipped = match net::throttled(&a.throttle_pps, a.throttle_secs)? {
        Ok(r) => {
            rows.extend(r);
            Value::Null
        }
        Err(why) => json!(why),
    };
    Ok(json!({
        "secs": a.throttle_secs,
        "load": loadavg(),
        "rows": rows,
        "net_skipped": net_skipped,
    }))
}

/// `--suites dirtylog`: bulkhead-blk with dirty logging off and on, on a
/// tmpfs image; the report's "Dirty logging" section.
fn dirtylog_suite(a: &Args) -> Result<Value> {
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-bench-dirtylog")
        .tempdir_in(&a.tmpfs_dir)?;
    let image = dir.path().join("image.raw");
    let image_size = 256u64 << 20;
    fill_image(&image, image_size, false)?;
    dirtylog::run(
        &dirtylog::Args {
            bulkhead: daemon(a),
            runs: a.dirtylog_runs,
            secs: a.dirtylog_secs,
            warmup: a.warmup.max(0.2),
            qd: 32,
        },
        &image,
        dir.path(),
        image_size,
    )
}

/// `--suites packed`: split rings against packed rings with the same
/// client, the two layouts' runs interleaved: two `bulkhead-blk` daemons
/// started alike on one tmpfs image, the test kit's client writing each
/// request's chain on either layout (4 KiB random reads and writes at each
/// `--qd`), then `bulkhead-net` through DPDK's virtio-user PMD
/// (`packed_vq=0/1`), both directions; the report's "Packed rings" section.
fn packed_suite(a: &Args) -> Result<Value> {
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-bench-packed")
        .tempdir_in(&a.tmpfs_dir)?;
    let image = dir.path().join("image.raw");
    let image_size = 256u64 << 20;
    fill_image(&image, image_size, false)?;
    let max_qd = a.qds.iter().copied().max().unwrap_or(1);
    let mut targets = Vec::new();
    let mut configs = Vec::new();
    for kind in [Kind::BulkheadSplit, Kind::BulkheadPacked] {
        let t = Target::start(kind, &daemon(a), &image, dir.path(), 1, max_qd)?;
        configs.push(json!({"target": kind.name(), "config": t.config}));
        targets.push(t);
    }
    let ctx = PointCtx {
        medium: "tmpfs",
        queues: 1,
        image_size,
    };
    let load = loadavg();
    let mut points = Vec::new();
    for pattern in [Pattern::RandRead, Pattern::RandWrite] {
        for &qd in &a.qds {
            points.push(measure_point(a, &mut targets, &ctx, pattern, qd)?);
        }
    }
    drop(targets);
    let net = net::packed(&net::NetArgs {
        // Receive through a flooded tap varies by 10-20% run to run here:
        // at least five windows per layout.
        runs: if a.quick {
            a.net_runs
        } else {
            a.net_runs.max(5)
        },
        secs: a.net_secs,
        warmup: if a.quick { 0.1 } else { 0.3 },
        sizes: a.net_sizes.clone(),
        dpdk: a.dpdk,
        rx: true,
        profile: 0.0,
        daemon_args: a.net_args.clone(),
        baseline: None,
    })?;
    Ok(json!({
        "client": "test-kit vhost-user frontend, one queue; each request's three-descriptor \
                   chain (header, data, status) written when it is submitted, on either \
                   layout; EVENT_IDX and INDIRECT_DESC negotiated",
        "load_before": load,
        "load_after": loadavg(),
        "configs": configs,
        "points": points,
        "net": net,
    }))
}

/// `--suites rbd`: `bulkhead-blk` against qemu-storage-daemon's rbd
/// driver, both driven by libblkio (one queue), on a throwaway one-node
/// cluster (`bulkhead_tests::ceph`: one mon, one mgr, one memstore OSD on
/// 127.0.0.1). Each target has its own image of the same size in the same
/// pool, written whole first: both keep their image's exclusive lock (qsd
/// the automatic one), so they cannot share one. 4 KiB random reads and
/// writes at each `--rbd-qd`, runs interleaved as for the blk suite.
fn rbd_suite(a: &Args) -> Result<Value> {
    use bulkhead_tests::ceph::{Cluster, needs_ceph};
    if let Some(why) = needs_ceph() {
        eprintln!("rbd suite skipped: {why:?}");
        return Ok(json!({ "skipped": format!("{why:?}") }));
    }
    let cluster = Cluster::start()?;
    let image_size = a.rbd_image_mib << 20;
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-bench-rbd")
        .tempdir()?;
    let mut targets = Vec::new();
    let mut configs = Vec::new();
    for (kind, image) in [
        (Kind::BulkheadRbd, "bench-blk"),
        (Kind::QsdRbd, "bench-qsd"),
    ] {
        cluster.create_image(image, image_size)?;
        // Every object exists: reads are served by the OSD, not skipped.
        cluster.rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4M",
            "--io-pattern",
            "seq",
            "--io-total",
            &image_size.to_string(),
            &format!("rbd/{image}"),
        ])?;
        let t = Target::start_rbd(
            kind,
            &daemon(a),
            &cluster.conf(),
            &format!("rbd/{image}"),
            dir.path(),
            1,
            a.rbd_qds.iter().copied().max().unwrap_or(1),
        )?;
        configs.push(json!({"target": kind.name(), "image": image, "config": t.config}));
        targets.push(t);
    }
    let ctx = PointCtx {
        medium: "rbd",
        queues: 1,
        image_size,
    };
    let load = loadavg();
    let mut points = Vec::new();
    for pattern in [Pattern::RandRead, Pattern::RandWrite] {
        for &qd in &a.rbd_qds {
            points.push(measure_point(a, &mut targets, &ctx, pattern, qd)?);
        }
    }
    drop(targets);
    Ok(json!({
        "image_mib": a.rbd_image_mib,
        "cluster": "one mon, one mgr, one OSD (memstore, page sets of 4 KiB) on 127.0.0.1, \
                    pool rbd of size 1, cephx; Ceph 16 (Debian bookworm)",
        "client": "libblkio's virtio-blk-vhost-user driver, one queue",
        "load_before": load,
        "load_after": loadavg(),
        "configs": configs,
        "points": points,
    }))
}

fn daemon(a: &Args) -> targets::Bulkhead<'_> {
    targets::Bulkhead {
        bin: &a.bulkhead_bin,
        args: &a.bulkhead_args,
        baseline: a.baseline_bin.as_deref(),
        poll_max_us: a.poll_max_us,
    }
}

fn profile_run(a: &Args, image: &Path, dir: &Path, image_size: u64) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for kind in [Kind::Bulkhead, Kind::QsdIoUring] {
        let mut t = Target::start(kind, &daemon(a), image, dir, 1, 32)?;
        let spec = Spec {
            pattern: Pattern::RandRead,
            qd: 32,
            duration: Duration::from_secs_f64(a.profile),
            image_size,
            seed: 42,
        };
        t.run(&Spec {
            duration: Duration::from_millis(200),
            ..spec
        })?;
        let pid = t.pid().ok_or("no daemon pid")?;
        let data = dir.join(format!("perf-{}.data", kind.name()));
        let rec = profile::Recording::start(pid, &data)?;
        let sample = t.run(&spec)?;
        let mut v = rec.finish(15)?;
        v["iops"] = json!(sample.stats().iops.round());
        eprintln!("profiled {}", kind.name());
        out.insert(kind.name().into(), v);
    }
    Ok(Value::Object(out))
}

fn run(a: &Args) -> Result<Value> {
    let started = Instant::now();
    let load_before = loadavg();
    let image_size = a.image_mib << 20;
    let max_qd = a.qds.iter().copied().max().unwrap_or(1);
    let mut points = Vec::new();
    let mut configs = Vec::new();
    let mut memory = Vec::new();
    let mut media = Vec::new();
    let mut profile_json = Value::Null;
    let blk = a.suites.iter().any(|s| s == "blk");
    for medium in a.media.iter().filter(|_| blk) {
        let base = if medium == "tmpfs" {
            &a.tmpfs_dir
        } else {
            &a.disk_dir
        };
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-bench")
            .tempdir_in(base)?;
        let image = dir.path().join("disk.img");
        fill_image(&image, image_size, medium == "disk")?;
        media.push(json!({"name": medium, "dir": base, "fs": fs_type(base)}));
        for &queues in &a.queues {
            let mut targets = Vec::new();
            for &kind in &a.kinds {
                let t = Target::start(kind, &daemon(a), &image, dir.path(), queues, max_qd)?;
                configs.push(json!({
                    "medium": medium, "queues": queues, "target": kind.name(), "config": t.config,
                }));
                targets.push(t);
            }
            let ctx = PointCtx {
                medium,
                queues,
                image_size,
            };
            let idle: Vec<Option<Value>> = targets
                .iter()
                .map(|t| t.pid().and_then(profile::mem_kib))
                .collect();
            for &pattern in &a.patterns {
                for &qd in &a.qds {
                    points.push(measure_point(a, &mut targets, &ctx, pattern, qd)?);
                }
            }
            // Right after the last point: memory under load, and the peak.
            for (t, idle) in targets.iter().zip(idle) {
                if let (Some(idle), Some(loaded)) = (idle, t.pid().and_then(profile::mem_kib)) {
                    memory.push(json!({
                        "medium": medium, "queues": queues, "target": t.kind.name(),
                        "idle": idle, "loaded": loaded,
                    }));
                }
            }
        }
        if medium == "tmpfs" && a.profile > 0.0 && profile::perf_available() {
            profile_json = profile_run(a, &image, dir.path(), image_size)?;
        }
    }
    let net_json = if a.suites.iter().any(|s| s == "net") {
        net::run(&net::NetArgs {
            runs: a.net_runs,
            secs: a.net_secs,
            warmup: if a.quick { 0.1 } else { 0.3 },
            sizes: a.net_sizes.clone(),
            dpdk: a.dpdk,
            rx: true,
            profile: if a.quick { 0.0 } else { a.profile },
            daemon_args: a.net_args.clone(),
            baseline: a.net_baseline.clone(),
        })?
    } else {
        Value::Null
    };
    let console_json = if a.suites.iter().any(|s| s == "console") {
        let args = console::ConsoleArgs {
            runs: if a.quick { 1 } else { 3 },
            bytes: a.console_mib << 20,
            daemon_args: a.console_args.clone(),
        };
        let mut v = console::run(&args)?;
        match console::peers(&args)? {
            Ok(p) => v["peers"] = p,
            Err(why) => v["peers_skipped"] = json!(why),
        }
        v
    } else {
        Value::Null
    };
    let vmm_json = if a.suites.iter().any(|s| s == "vmm") {
        vmm::run(&vmm::VmmArgs {
            boots: a.vmm_boots,
            dry_runs: if a.quick { 1 } else { 3 },
        })?
    } else {
        Value::Null
    };
    let throttle_json = if a.suites.iter().any(|s| s == "throttle") {
        throttle_suite(a)?
    } else {
        Value::Null
    };
    let dirtylog_json = if a.suites.iter().any(|s| s == "dirtylog") {
        dirtylog_suite(a)?
    } else {
        Value::Null
    };
    let packed_json = if a.suites.iter().any(|s| s == "packed") {
        packed_suite(a)?
    } else {
        Value::Null
    };
    let rbd_json = if a.suites.iter().any(|s| s == "rbd") {
        rbd_suite(a)?
    } else {
        Value::Null
    };
    let micro = match &a.micro {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
        None => Value::Null,
    };
    let command = std::env::var("BULKHEAD_BENCH_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let qsd_version = sh("qemu-storage-daemon", &["--version"])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let mut v = json!({
        "generated": sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "command": command,
        "quick": a.quick,
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "cpu_model": cpu_model,
            "kernel": sh("uname", &["-r"]),
            "qsd": qsd_version,
            "load_before": load_before,
            "load_after": loadavg(),
            "wall_s": started.elapsed().as_secs(),
        },
        "method": {
            "runs": a.runs,
            "secs": a.secs,
            "warmup_secs": a.warmup,
            "image_mib": a.image_mib,
            "client": "test-kit vhost-user frontend; per queue one thread with fixed \
                       3-descriptor chains (header, data, status), EVENT_IDX and \
                       INDIRECT_DESC negotiated, one kick check per batch, waits on the \
                       call eventfd",
        },
        "media": media,
        "configs": configs,
        "memory": memory,
        "points": points,
        "micro": micro,
        "profile": profile_json,
        "net": net_json,
        "console": console_json,
        "vmm": vmm_json,
        "throttle": throttle_json,
        "dirtylog": dirtylog_json,
        "packed": packed_json,
        "rbd": rbd_json,
    });
    report::analyse(&mut v);
    Ok(v)
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, text)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The top-level keys each suite writes. The report's header (when, what
/// command, the machine and its load) describes the blk suite's run, so
/// it goes with it.
fn suite_keys(suite: &str) -> &'static [&'static str] {
    match suite {
        "blk" => &[
            "points",
            "configs",
            "media",
            "profile",
            "method",
            "generated",
            "command",
            "quick",
            "machine",
        ],
        "net" => &["net"],
        "console" => &["console"],
        "vmm" => &["vmm"],
        "throttle" => &["throttle"],
        "dirtylog" => &["dirtylog"],
        "packed" => &["packed"],
        "rbd" => &["rbd"],
        _ => &[],
    }
}

/// `--merge-json`: the earlier report with the keys of the suites just run
/// (and the micro-benchmarks, when given) replaced by the new results.
fn merge(a: &Args, new: Value) -> Result<Value> {
    let path = a.merge_json.as_ref().ok_or("no --merge-json")?;
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut keys: Vec<&str> = a
        .suites
        .iter()
        .flat_map(|s| suite_keys(s))
        .copied()
        .collect();
    if a.micro.is_some() {
        keys.push("micro");
    }
    for k in keys {
        v[k] = new[k].clone();
    }
    report::analyse(&mut v);
    Ok(v)
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let result = (|| -> Result<()> {
        if let Some(out) = &a.vmm_boots_json {
            let v = vmm::boots_here(a.vmm_boots)?;
            return write(out, &(serde_json::to_string_pretty(&v)? + "\n"));
        }
        let v = match &a.from_json {
            Some(p) => {
                let mut v: Value = serde_json::from_str(&std::fs::read_to_string(p)?)?;
                if let Some(m) = &a.micro {
                    v["micro"] = serde_json::from_str(&std::fs::read_to_string(m)?)?;
                    write(&a.json, &(serde_json::to_string_pretty(&v)? + "\n"))?;
                }
                report::analyse(&mut v);
                v
            }
            None if a.merge_json.is_some() => {
                let v = merge(&a, run(&a)?)?;
                write(&a.json, &(serde_json::to_string_pretty(&v)? + "\n"))?;
                v
            }
            None => {
                let v = run(&a)?;
                write(&a.json, &(serde_json::to_string_pretty(&v)? + "\n"))?;
                v
            }
        };
        let svg_name = a
            .svg
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        write(&a.md, &report::markdown(&v, &svg_name))?;
        write(&a.svg, &report::svg(&v))?;
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-bench: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
