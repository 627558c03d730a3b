//! Ratios, goal verdicts, and the Markdown and SVG renderings of a benchmark's JSON.

use std::fmt::Write;

use serde_json::{Value, json};

const BULKHEAD: &str = "bulkhead-blk";
const QSD: [&str; 2] = ["qsd-io_uring", "qsd-threads"];
const HOST: &str = "host-io_uring";

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (a > 0.0 && b > 0.0).then(|| (a / b * 1000.0).round() / 1000.0)
}

/// Adds per-point ratios (against the faster qsd variant and the host) and the goal verdicts.
pub fn analyse(v: &mut Value) {
    if let Some(points) = v.get_mut("points").and_then(Value::as_array_mut) {
        for p in points.iter_mut() {
            let r = p["results"].clone();
            let b = &r[BULKHEAD];
            let best = QSD
                .iter()
                .filter(|k| r.get(**k).is_some())
                .max_by(|x, y| f(&r[**x], "iops").total_cmp(&f(&r[**y], "iops")));
            if let Some(best) = best {
                let q = &r[*best];
                p["qsd_best"] = json!(best);
                p["ratio_vs_qsd"] = json!(ratio(f(b, "iops"), f(q, "iops")));
                p["p99_vs_qsd"] = json!(ratio(f(b, "p99_us"), f(q, "p99_us")));
            }
            if r.get(HOST).is_some() {
                p["ratio_vs_host"] = json!(ratio(f(b, "iops"), f(&r[HOST], "iops")));
            }
        }
    }
    let find = |v: &Value, medium: &str, pattern: &str, qd: u64| -> Option<Value> {
        v["points"].as_array()?.iter().find_map(|p| {
            (p["medium"] == medium && p["pattern"] == pattern && p["qd"] == qd && p["queues"] == 1)
                .then(|| p.clone())
        })
    };
    let mut goals = Vec::new();
    if let Some(p) = find(v, "tmpfs", "randread-4k", 32) {
        let x = p["ratio_vs_qsd"].as_f64();
        goals.push(json!({
            "goal": "IOPS vs qemu-storage-daemon, 4 KiB random read, QD 32, 1 queue (tmpfs)",
            "target": ">= 1.30x", "measured": x, "met": x.map(|x| x >= 1.3),
            "gap": x.map(|x| x / 1.3 - 1.0),
        }));
        let x = p["ratio_vs_host"].as_f64();
        goals.push(json!({
            "goal": "IOPS vs direct host io_uring, same pattern and file",
            "target": ">= 0.70x", "measured": x, "met": x.map(|x| x >= 0.7),
            "gap": x.map(|x| x / 0.7 - 1.0),
        }));
    }
    if let Some(p) = find(v, "tmpfs", "randread-4k", 1) {
        let x = p["p99_vs_qsd"].as_f64();
        goals.push(json!({
            "goal": "p99 latency vs qemu-storage-daemon at QD 1 (4 KiB random read, 1 queue, tmpfs)",
            "target": "<= 1.00x", "measured": x, "met": x.map(|x| x <= 1.0),
            "gap": x.map(|x| 1.0 - x),
        }));
    }
    let qd1: Vec<f64> = v["points"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["qd"] == 1)
                .filter_map(|p| p["p99_vs_qsd"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    if !qd1.is_empty() {
        let ok = qd1.iter().filter(|&&x| x <= 1.0).count();
        goals.push(json!({
            "goal": "p99 at QD 1 no worse than qsd, all QD 1 points",
            "target": "all", "measured": format!("{ok} of {}", qd1.len()),
            "met": ok == qd1.len(), "gap": Value::Null,
        }));
    }
    let cbu = &v["micro"]["copy_before_use"];
    if cbu.is_object() {
        let over = f(cbu, "overhead_ns").max(0.0);
        let per_req_us = find(v, "tmpfs", "randread-4k", 32).and_then(|p| {
            let b = &p["results"][BULKHEAD];
            b["daemon_cpu_us_per_op"]
                .as_f64()
                .or_else(|| (f(b, "iops") > 0.0).then(|| 1e6 / f(b, "iops")))
        });
        let share = per_req_us.map(|us| over / (us * 1000.0));
        goals.push(json!({
            "goal": "copy-before-use overhead (snapshot - plain virtio-queue walk) as a share \
                     of bulkhead-blk's CPU time per request (4 KiB random read, QD 32)",
            "target": "<= 10%", "measured": share, "met": share.map(|s| s <= 0.10),
            "gap": share.map(|s| 0.10 - s),
            "detail": format!(
                "snapshot {:.1} ns, walk {:.1} ns, +{:.1} ns per 3-descriptor chain; per request {} µs",
                f(cbu, "snapshot_ns"), f(cbu, "walk_ns"), over,
                per_req_us.map(|x| format!("{x:.2}")).unwrap_or("?".into())
            ),
        }));
    }
    net_goals(v, &mut goals);
    vmm_goals(v, &mut goals);
    v["goals"] = Value::Array(goals);
}

/// Target names of the net benchmark (see `net.rs`).
const NET_KIT: &str = "bulkhead-net/kit";
const NET_PMD: &str = "bulkhead-net/testpmd";
const NET_RAW: &str = "raw-tap-writer";
const NET_DPDK_TAP: &str = "dpdk-vhost/tap";
const BASELINE: &str = "bulkhead-blk-before";

/// bulkhead-net against the raw tap writer at 64 B, from either frontend.
fn net_goals(v: &Value, goals: &mut Vec<Value>) {
    let Some(p) = v["net"]["points"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["size"] == "64B"))
    else {
        return;
    };
    let r = &p["results"];
    for (who, name) in [
        (NET_KIT, "test-kit frontend"),
        (NET_PMD, "DPDK virtio-user frontend"),
    ] {
        if r.get(who).is_none() {
            continue;
        }
        let x = ratio(f(&r[who], "pps"), f(&r[NET_RAW], "pps"));
        goals.push(json!({
            "goal": format!("bulkhead-net packets/s vs a raw write(2) tap writer, 64 B frames \
                             guest -> tap ({name})"),
            "target": ">= 0.70x", "measured": x, "met": x.map(|x| x >= 0.7),
            "gap": x.map(|x| x / 0.7 - 1.0),
        }));
    }
}

/// Boot time to init and VMM memory overhead, or why they were not measured.
/// In the nested host absolute times mean nothing for bare metal: there the
/// boot goal is the ratio against QEMU booting the same guest beside it.
fn vmm_goals(v: &Value, goals: &mut Vec<Value>) {
    let vmm = &v["vmm"];
    if vmm.is_null() {
        return;
    }
    let boot_t = f(&vmm["targets"], "boot_to_init_ms");
    let mem_t = f(&vmm["targets"], "overhead_mib");
    let b = &vmm["boots"]["blk"];
    let q = &vmm["qemu_boots"]["blk"];
    let measured = vmm["measured"] == true;
    let nested = vmm["lane"] == "nested";
    let why = if vmm["probe"]["ok"] == true || nested {
        "not measured: a boot failed; see the bulkhead-vmm section"
    } else {
        "not measured here: `bulkhead-vmm probe` says KVM cannot run a Linux guest and the \
         nested host was not available; see the bulkhead-vmm section"
    };
    let boot = measured.then(|| f(b, "boot_to_init_ms"));
    let mem = measured.then(|| f(b, "overhead_rss_mib"));
    let x = vmm["ratios"]["blk"]["boot_to_init"].as_f64();
    goals.push(json!({
        "goal": "bulkhead-vmm start to the guest's init, with bulkhead-blk attached, against \
                 QEMU (KVM) booting the same guest (median ratio)",
        "target": "<= 1.00x",
        "measured": x.map_or(json!("-"), |x| json!(format!("{x:.2}x"))),
        "met": x.map(|x| x <= 1.0),
        "gap": Value::Null,
        "detail": if x.is_some() {
            json!(format!(
                "{:.0} ms against {:.0} ms{}",
                f(b, "boot_to_init_ms"),
                f(q, "boot_to_init_ms"),
                if nested { ", both in the nested host" } else { "" }
            ))
        } else if measured {
            json!("QEMU was not measured; see the bulkhead-vmm section")
        } else {
            json!(why)
        },
    }));
    goals.push(json!({
        "goal": "bulkhead-vmm start to the guest's init, with bulkhead-blk attached (median)",
        "target": format!("<= {boot_t:.0} ms"),
        "measured": boot.map_or(json!("-"), |x| json!(format!("{x:.1} ms"))),
        "met": if nested { Value::Null } else { json!(boot.map(|x| x <= boot_t)) },
        "gap": Value::Null,
        "detail": if nested && measured {
            json!("measured in the nested host (KVM inside QEMU TCG): two layers of emulation, \
                   not a bare-metal figure; open until a machine whose KVM runs Linux measures it")
        } else if measured {
            Value::Null
        } else {
            json!(why)
        },
    }));
    goals.push(json!({
        "goal": "bulkhead-vmm memory overhead after boot: RSS beyond guest RAM",
        "target": format!("<= {mem_t:.0} MiB"),
        "measured": mem.map_or(json!("-"), |x| json!(format!("{x:.2} MiB"))),
        "met": mem.map(|x| x <= mem_t),
        "gap": Value::Null,
        "detail": if !measured {
            json!(why)
        } else if q.get("overhead_rss_mib").is_some() {
            json!(format!("QEMU booting the same guest: {:.1} MiB", f(q, "overhead_rss_mib")))
        } else {
            Value::Null
        },
    }));
}

fn fmt_ratio(v: &Value) -> String {
    v.as_f64().map(|x| format!("{x:.2}x")).unwrap_or("-".into())
}

fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn lat(r: &Value) -> String {
    format!(
        "{} / {} / {}",
        fmt_num(f(r, "p50_us")),
        fmt_num(f(r, "p99_us")),
        fmt_num(f(r, "p999_us"))
    )
}

fn cpu(r: &Value) -> String {
    r["daemon_cpu_us_per_op"]
        .as_f64()
        .map(|x| format!("{x:.2}"))
        .unwrap_or("-".into())
}

/// The Markdown report; `svg_name` is the chart's file name beside it.
pub fn markdown(v: &Value, svg_name: &str) -> String {
    let mut m = String::new();
    let mach = &v["machine"];
    let _ = writeln!(m, "# Performance\n");
    let _ = writeln!(
        m,
        "Generated by `scripts/bench` ({}) on {}; do not edit by hand.\n",
        v["command"].as_str().unwrap_or(""),
        v["generated"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        m,
        "Machine: {} CPU(s), {}, Linux {}, {}. Load average {} before and {} after \
         the {} s run: **numbers taken on a shared, loaded machine are provisional**; \
         ratios are more trustworthy than absolute numbers because the targets are \
         interleaved run by run.{}\n",
        mach["cpus"],
        mach["cpu_model"].as_str().unwrap_or("?"),
        mach["kernel"].as_str().unwrap_or("?"),
        mach["qsd"].as_str().unwrap_or("qemu-storage-daemon ?"),
        mach["load_before"].as_str().unwrap_or("?"),
        mach["load_after"].as_str().unwrap_or("?"),
        mach["wall_s"],
        if v["quick"] == true {
            " This is a `--quick` smoke run: one short run per point."
        } else {
            ""
        }
    );

    let _ = writeln!(m, "## Goals\n");
    let _ = writeln!(
        m,
        "| goal | target | measured | verdict |\n|---|---|---|---|"
    );
    for g in v["goals"].as_array().into_iter().flatten() {
        let measured = match &g["measured"] {
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(0.0);
                if g["target"].as_str().unwrap_or("").contains('%') {
                    format!("{:.1}%", x * 100.0)
                } else {
                    format!("{x:.2}x")
                }
            }
            Value::String(s) => s.clone(),
            _ => "-".into(),
        };
        let verdict = match g["met"].as_bool() {
            Some(true) => "met".to_string(),
            Some(false) => match g["gap"].as_f64() {
                Some(gap) if g["target"].as_str().unwrap_or("").contains('%') => {
                    format!("**missed** by {:.1} points", -gap * 100.0)
                }
                Some(gap) if gap.abs() < 0.01 => {
                    format!("**missed** by {:.1}%", gap.abs() * 100.0)
                }
                Some(gap) => format!("**missed** by {:.0}%", gap.abs() * 100.0),
                None => "**missed**".into(),
            },
            None => "-".into(),
        };
        let detail = g["detail"]
            .as_str()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        let _ = writeln!(
            m,
            "| {}{detail} | {} | {measured} | {verdict} |",
            g["goal"].as_str().unwrap_or(""),
            g["target"].as_str().unwrap_or("")
        );
    }

    let _ = writeln!(m);
    if !svg_name.is_empty() {
        let _ = writeln!(m, "![Ratios against the references]({svg_name})\n");
    }
    let have_blk = v["points"].as_array().is_some_and(|p| !p.is_empty());
    if have_blk {
        blk_sections(&mut m, v);
    }
    memory_section(&mut m, v);
    engine_section(&mut m, v);
    libblkio_section(&mut m, v);
    net_section(&mut m, &v["net"]);
    console_section(&mut m, &v["console"]);
    vmm_section(&mut m, &v["vmm"]);
    throttle_section(&mut m, &v["throttle"]);
    dirtylog_section(&mut m, &v["dirtylog"]);
    packed_section(&mut m, &v["packed"]);
    rbd_section(&mut m, &v["rbd"]);

    let _ = writeln!(m, "## Reproduce\n");
    let _ = writeln!(
        m,
        "`scripts/bench` builds release binaries, runs the micro-benchmarks and \
         `target/release/bulkhead-bench` (blk, net, console, vmm, throttle, dirtylog, packed; about 18 \
         minutes), and \
         rewrites `docs/performance.{{md,json,svg}}`. One suite can be rerun into the \
         existing report: `target/release/bulkhead-bench --suites vmm --merge-json \
         docs/performance.json --json docs/performance.json --md docs/performance.md \
         --svg docs/performance.svg`. Extra arguments go to `bulkhead-bench` \
         (for example `--runs 5 --secs 3` for longer block runs, `--media tmpfs`, \
         `--suites net`, `--baseline-bin OLD-bulkhead-blk` to measure an earlier build \
         beside the current one); `scripts/bench --quick` is a smoke run of every suite \
         (net without DPDK).\n\n\
         This file is written whole by each run: measurements made by hand beside it (A/B \
         runs against earlier builds, profiles of one question) are in \
         [performance-notes.md](performance-notes.md)."
    );
    m
}

/// The block tables, the configurations, micro-benchmarks and profile.
fn blk_sections(m: &mut String, v: &Value) {
    let meth = &v["method"];
    let _ = writeln!(
        m,
        "\n## bulkhead-blk against qemu-storage-daemon and the host\n"
    );
    let _ = writeln!(
        m,
        "Medians of {} runs of {} s per point (after a {} s warm-up), {} MiB raw image. \
         QD is per queue; with 2 queues two client threads each keep QD requests in flight. \
         \"qsd\" is the faster of the two qemu-storage-daemon configurations at that point. \
         Latency is p50 / p99 / p99.9 in µs, from publishing the request to seeing it in \
         the used ring. CPU is the daemon's CPU time per request (all its threads, from \
         `/proc/PID/task/*/schedstat`).\n",
        meth["runs"], meth["secs"], meth["warmup_secs"], meth["image_mib"]
    );
    let _ = writeln!(
        m,
        "| medium | queues | workload | QD | bulkhead-blk IOPS | MiB/s | latency µs | qsd | qsd IOPS | x qsd | qsd latency µs | host IOPS | x host | CPU µs/req (ours / qsd) |"
    );
    let _ = writeln!(
        m,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in v["points"].as_array().into_iter().flatten() {
        let r = &p["results"];
        let b = &r[BULKHEAD];
        let qn = p["qsd_best"].as_str().unwrap_or("");
        let q = &r[qn];
        let h = &r[HOST];
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {} | {} | {:.0} | {} | {} | {:.0} | {} | {} / {} |",
            p["medium"].as_str().unwrap_or(""),
            p["queues"],
            p["pattern"].as_str().unwrap_or(""),
            p["qd"],
            f(b, "iops"),
            f(b, "mib_s"),
            lat(b),
            qn.trim_start_matches("qsd-"),
            f(q, "iops"),
            fmt_ratio(&p["ratio_vs_qsd"]),
            lat(q),
            f(h, "iops"),
            fmt_ratio(&p["ratio_vs_host"]),
            cpu(b),
            cpu(q),
        );
    }

    let _ = writeln!(m, "## Every target\n");
    let _ = writeln!(
        m,
        "| medium | queues | workload | QD | target | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | CPU µs/req | IOPS of each run |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in v["points"].as_array().into_iter().flatten() {
        if let Some(r) = p["results"].as_object() {
            for (name, t) in r {
                let runs: Vec<String> = t["runs_iops"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| format!("{:.0}", x.as_f64().unwrap_or(0.0)))
                    .collect();
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {name} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
                    p["medium"].as_str().unwrap_or(""),
                    p["queues"],
                    p["pattern"].as_str().unwrap_or(""),
                    p["qd"],
                    f(t, "iops"),
                    f(t, "mib_s"),
                    fmt_num(f(t, "p50_us")),
                    fmt_num(f(t, "p99_us")),
                    fmt_num(f(t, "p999_us")),
                    cpu(t),
                    runs.join(" "),
                );
            }
        }
    }

    let _ = writeln!(m, "\n## Configurations\n");
    for media in v["media"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "- medium `{}`: image in `{}` ({}), filled with data before the runs",
            media["name"].as_str().unwrap_or(""),
            media["dir"].as_str().unwrap_or(""),
            media["fs"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(m, "- client: {}\n", meth["client"].as_str().unwrap_or(""));
    let _ = writeln!(m, "```text");
    for c in v["configs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "[{} {}q {}] {}",
            c["medium"].as_str().unwrap_or(""),
            c["queues"],
            c["target"].as_str().unwrap_or(""),
            c["config"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(m, "```\n");
    let _ = writeln!(
        m,
        "Both daemons use the host page cache (bulkhead-blk without `--direct`, qsd \
         `cache.direct=off`) and serve writes as write-back. qemu-storage-daemon 10.0's \
         vhost-user-blk export takes one `iothread=` (a per-queue iothread list is not \
         accepted), so every qsd queue runs in that one iothread; bulkhead-blk runs one \
         thread per queue. Both busy-poll alike before they sleep: bulkhead-blk with \
         `--poll-max-us N`, qsd's iothread with `poll-max-ns` of the same N µs (`--poll-max-us` \
         of bulkhead-bench, default 64; QEMU's own default is 32 µs). qsd exports the file node \
         directly (no raw format layer); `locking=off` and bulkhead-blk's `--no-lock` let all \
         targets open the same image.\n"
    );

    let micro = &v["micro"];
    if let Some(bs) = micro["benchmarks"].as_array() {
        let _ = writeln!(m, "## Micro-benchmarks\n");
        let _ = writeln!(
            m,
            "`cargo bench -p bulkhead-tests --bench micro` (`tests/benches/micro.rs`): \
             ns per operation, median and fastest of the timed batches; the ratios use \
             the fastest, the better estimate on a loaded machine.\n"
        );
        let _ = writeln!(
            m,
            "| benchmark | what | ns/op (median) | ns/op (fastest) |\n|---|---|---|---|"
        );
        for b in bs {
            let _ = writeln!(
                m,
                "| {} | {} | {:.1} | {:.1} |",
                b["name"].as_str().unwrap_or(""),
                b["what"].as_str().unwrap_or(""),
                f(b, "ns_per_op"),
                f(b, "min_ns")
            );
        }
        let c = &micro["copy_before_use"];
        let _ = writeln!(
            m,
            "\nCopy-before-use: the validated snapshot of a 3-descriptor chain costs {:.1} ns \
             against {:.1} ns for a plain virtio-queue walk ({:+.1} ns, {:.2}x); for 18 \
             descriptors {:.1} ns against {:.1} ns ({:.2}x).\n",
            f(c, "snapshot_ns"),
            f(c, "walk_ns"),
            f(c, "overhead_ns"),
            f(c, "snapshot_ns") / f(c, "walk_ns").max(1e-9),
            f(c, "snapshot_18_ns"),
            f(c, "walk_18_ns"),
            f(c, "snapshot_18_ns") / f(c, "walk_18_ns").max(1e-9),
        );
    }

    if let Some(prof) = v["profile"].as_object() {
        let _ = writeln!(m, "## Profile\n");
        let _ = writeln!(
            m,
            "`perf record -e cpu-clock -F 4999 -p PID` of each daemon (all threads, user and \
             kernel) under 4 KiB random read, QD 32, 1 queue, tmpfs; top symbols and threads \
             by share of the daemon's samples.\n"
        );
        for (name, p) in prof {
            let _ = writeln!(m, "### {name} ({:.0} IOPS while profiled)\n", f(p, "iops"));
            let _ = writeln!(m, "| share | object and symbol |\n|---|---|");
            for s in p["symbols"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    m,
                    "| {:.1}% | `{}` |",
                    f(s, "pct"),
                    s["what"].as_str().unwrap_or("").trim_end_matches(" - -")
                );
            }
            let threads: Vec<String> = p["threads"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| format!("{} {:.0}%", t["what"].as_str().unwrap_or(""), f(t, "pct")))
                .collect();
            let _ = writeln!(m, "\nThreads: {}.\n", threads.join(", "));
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One bar series of a chart panel.
struct Series {
    name: &'static str,
    color: &'static str,
    /// The goal for this ratio, drawn as a dashed line.
    target: Option<f64>,
}

/// One panel of the chart: a title, its series and one row of bars per point.
struct Panel {
    title: &'static str,
    series: Vec<Series>,
    rows: Vec<(String, Vec<Option<f64>>)>,
}

/// bulkhead-blk's IOPS ratios against qsd and the host, per point.
fn blk_panel(v: &Value) -> Panel {
    let rows = v["points"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let label = format!(
                "{} {}q {} QD{}",
                p["medium"].as_str().unwrap_or(""),
                p["queues"],
                p["pattern"].as_str().unwrap_or(""),
                p["qd"]
            );
            let bars = ["ratio_vs_qsd", "ratio_vs_host"]
                .iter()
                .map(|k| p[*k].as_f64())
                .collect();
            (label, bars)
        })
        .collect();
    Panel {
        title: "bulkhead-blk IOPS as a multiple of qemu-storage-daemon (best aio) and of direct host io_uring",
        series: vec![
            Series {
                name: "x qsd",
                color: "#2b6cb0",
                target: Some(1.3),
            },
            Series {
                name: "x host io_uring",
                color: "#dd8b2f",
                target: Some(0.7),
            },
        ],
        rows,
    }
}

/// bulkhead-net's packet rate against the raw tap writer, per frame size and frontend.
fn net_panel(v: &Value) -> Panel {
    let rows = v["net"]["points"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let r = &p["results"];
            let raw = f(&r[NET_RAW], "pps");
            let bars = [NET_KIT, NET_PMD, NET_DPDK_TAP]
                .iter()
                .map(|who| ratio(f(&r[*who], "pps"), raw))
                .collect();
            (
                format!("guest -> tap {}", p["size"].as_str().unwrap_or("")),
                bars,
            )
        })
        .collect();
    Panel {
        title: "Packets per second guest -> tap as a multiple of a raw write(2) tap writer",
        series: vec![
            Series {
                name: "bulkhead-net, kit",
                color: "#2f855a",
                target: Some(0.7),
            },
            Series {
                name: "bulkhead-net, testpmd",
                color: "#805ad5",
                target: None,
            },
            Series {
                name: "DPDK vhost+tap",
                color: "#a0aec0",
                target: None,
            },
        ],
        rows,
    }
}

/// Horizontal bar charts of the ratios: bulkhead-blk against qsd and the
/// host, bulkhead-net against the raw tap writer (and DPDK as a backend).
pub fn svg(v: &Value) -> String {
    let panels: Vec<Panel> = [blk_panel(v), net_panel(v)]
        .into_iter()
        .filter(|p| !p.rows.is_empty())
        .collect();
    let left = 250.0;
    let width = 820.0;
    let plot = width - left - 30.0;
    let bar = 11.0;
    let panel_height =
        |p: &Panel| 50.0 + (bar * p.series.len() as f64 + 8.0) * p.rows.len() as f64 + 40.0;
    let height: f64 = panels.iter().map(panel_height).sum::<f64>().max(60.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let mut y0 = 0.0;
    for p in &panels {
        let max = p
            .rows
            .iter()
            .flat_map(|(_, bars)| bars.iter().flatten().copied())
            .fold(1.5f64, f64::max)
            .ceil();
        let x = |r: f64| left + plot * (r / max);
        let top = y0 + 50.0;
        let bottom = y0 + panel_height(p) - 40.0;
        let _ = writeln!(
            s,
            r#"<text x="10" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
            y0 + 20.0,
            esc(p.title)
        );
        let mut lx = left;
        for series in &p.series {
            let _ = writeln!(
                s,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="10" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                y0 + 28.0,
                series.color,
                lx + 16.0,
                y0 + 37.0,
                esc(series.name)
            );
            lx += 30.0 + 7.0 * series.name.len() as f64;
        }
        let mut tick = 0.0;
        while tick <= max + 1e-9 {
            let _ = writeln!(
                s,
                r##"<line x1="{0:.1}" y1="{top:.1}" x2="{0:.1}" y2="{bottom:.1}" stroke="#ddd"/><text x="{0:.1}" y="{1:.1}" text-anchor="middle">{tick:.1}x</text>"##,
                x(tick),
                bottom + 15.0
            );
            tick += 0.5;
        }
        for series in &p.series {
            if let Some(t) = series.target {
                let _ = writeln!(
                    s,
                    r#"<line x1="{0:.1}" y1="{top:.1}" x2="{0:.1}" y2="{bottom:.1}" stroke="{1}" stroke-dasharray="4 3"/>"#,
                    x(t),
                    series.color
                );
            }
        }
        let row = bar * p.series.len() as f64 + 8.0;
        for (i, (label, bars)) in p.rows.iter().enumerate() {
            let y = top + row * i as f64;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + row / 2.0 + 4.0,
                esc(label)
            );
            for (j, (r, series)) in bars.iter().zip(&p.series).enumerate() {
                let Some(r) = *r else { continue };
                let by = y + 4.0 + bar * j as f64;
                let _ = writeln!(
                    s,
                    r#"<rect x="{left}" y="{by:.1}" width="{:.1}" height="10" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="10">{r:.2}</text>"#,
                    x(r) - left,
                    series.color,
                    x(r) + 3.0,
                    by + 9.0
                );
            }
        }
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{top:.1}" x2="{0:.1}" y2="{bottom:.1}" stroke="#000"/>"##,
            x(1.0)
        );
        y0 += panel_height(p);
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// bulkhead-blk against an earlier build of itself, where `--baseline-bin` was given.
fn engine_section(m: &mut String, v: &Value) {
    let rows: Vec<&Value> = v["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["results"].get(BASELINE).is_some())
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(m, "## bulkhead-blk against its previous build\n");
    let _ = writeln!(
        m,
        "`bulkhead-blk-before` is the binary given with `--baseline-bin` (the io_uring engine \
         before reads on tmpfs/ramfs images were served in the queue thread), measured in the \
         same runs, interleaved. Ratios are new / before; latency p50 / p99 in µs.\n"
    );
    let _ = writeln!(
        m,
        "| medium | queues | workload | QD | IOPS new | IOPS before | x | latency new | latency before | p99 x | CPU µs/req new / before |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in rows {
        let r = &p["results"];
        let (n, b) = (&r[BULKHEAD], &r[BASELINE]);
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {} / {} | {} / {} | {} | {} / {} |",
            p["medium"].as_str().unwrap_or(""),
            p["queues"],
            p["pattern"].as_str().unwrap_or(""),
            p["qd"],
            f(n, "iops"),
            f(b, "iops"),
            fmt_ratio(&json!(ratio(f(n, "iops"), f(b, "iops")))),
            fmt_num(f(n, "p50_us")),
            fmt_num(f(n, "p99_us")),
            fmt_num(f(b, "p50_us")),
            fmt_num(f(b, "p99_us")),
            fmt_ratio(&json!(ratio(f(n, "p99_us"), f(b, "p99_us")))),
            cpu(n),
            cpu(b),
        );
    }
    let _ = writeln!(m);
}

/// bulkhead-blk beside qemu-storage-daemon with libblkio as the client of
/// both (targets `bulkhead-blk+libblkio` and `qsd-io_uring+libblkio`).
fn libblkio_section(m: &mut String, v: &Value) {
    const OURS: &str = "bulkhead-blk+libblkio";
    const QSD: &str = "qsd-io_uring+libblkio";
    let rows: Vec<&Value> = v["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["results"].get(OURS).is_some() && p["results"].get(QSD).is_some())
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        m,
        "## bulkhead-blk and qemu-storage-daemon through libblkio\n"
    );
    let _ = writeln!(
        m,
        "Both backends driven by the same independent client: libblkio's \
         `virtio-blk-vhost-user` driver (the `blkio` crate) at its defaults (256-entry rings, \
         no indirect descriptors), one thread per queue keeping QD requests in flight and \
         resubmitting each completion at once. bulkhead-blk runs at its default ring size; \
         qemu-storage-daemon with `aio=io_uring`, polling as bulkhead-blk does. Latency p50 / \
         p99 in µs, from submission to the completion libblkio returned.\n"
    );
    let _ = writeln!(
        m,
        "| medium | queues | workload | QD | bulkhead-blk IOPS | qsd IOPS | x qsd | latency ours | latency qsd | CPU µs/req ours / qsd |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in rows {
        let r = &p["results"];
        let (o, q) = (&r[OURS], &r[QSD]);
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {} / {} | {} / {} | {} / {} |",
            p["medium"].as_str().unwrap_or(""),
            p["queues"],
            p["pattern"].as_str().unwrap_or(""),
            p["qd"],
            f(o, "iops"),
            f(q, "iops"),
            fmt_ratio(&json!(ratio(f(o, "iops"), f(q, "iops")))),
            fmt_num(f(o, "p50_us")),
            fmt_num(f(o, "p99_us")),
            fmt_num(f(q, "p50_us")),
            fmt_num(f(q, "p99_us")),
            cpu(o),
            cpu(q),
        );
    }
    let _ = writeln!(m);
}

/// The net benchmark's tables.
fn net_section(m: &mut String, net: &Value) {
    if net.is_null() {
        return;
    }
    let _ = writeln!(m, "## bulkhead-net\n");
    if let Some(why) = net["skipped"].as_str() {
        let _ = writeln!(m, "Skipped: {why}.\n");
        return;
    }
    let meth = &net["method"];
    let _ = writeln!(
        m,
        "Frames guest → tap through `bulkhead-net` into a network namespace, {}. Medians of \
         {} runs of {} s (after {} s of traffic), the targets interleaved run by run. \
         Every frontend keeps a {}-entry ring full. The tap has no address and the frames go \
         to a foreign MAC, so the namespace's stack drops them on arrival: this measures the \
         path into the kernel, not a socket behind it. Targets: `bulkhead-net/kit` (test-kit \
         frontend, one descriptor per frame), `bulkhead-net/testpmd` (DPDK virtio-user PMD, \
         `txonly`, into a second `bulkhead-net` on the same tap), `dpdk-vhost/tap` (the same \
         client into testpmd's vhost PMD forwarding to its tap PMD: DPDK as a tap backend), \
         `dpdk-vhost/mem` (into testpmd's vhost PMD in `rxonly`: memory to memory, no tap), \
         `raw-tap-writer` (the machine's limit: `write(2)` of the same frames with a vnet \
         header into another queue of the same tap, from one thread), `raw-tap-writev` \
         (the same as a two-segment `writev(2)`, header then frame: the kernel's cost of a \
         frame handed over in place behind a copied header; `bulkhead-net` copies frames up \
         to 2 KiB behind the header and sends one segment, larger ones in place). The DPDK \
         processes busy-poll one CPU each while their runs last. TSO frames carry a GSO \
         header (TCPv4, gso_size 1448); testpmd's `txonly` sends none, so only the kit and \
         the raw writers send them.\n",
        meth["count"].as_str().unwrap_or(""),
        meth["runs"],
        meth["secs"],
        meth["warmup_secs"],
        meth["queue_size"],
    );
    let points: Vec<&Value> = net["points"].as_array().into_iter().flatten().collect();
    let mut names: Vec<String> = Vec::new();
    for p in &points {
        for k in p["results"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let order = [
        NET_KIT,
        NET_PMD,
        NET_DPDK_TAP,
        "dpdk-vhost/mem",
        NET_RAW,
        "raw-tap-writev",
    ];
    names.sort_by_key(|n| order.iter().position(|o| o == n).unwrap_or(order.len()));
    let _ = write!(m, "| frames |");
    for n in &names {
        let _ = write!(m, " {n} |");
    }
    let _ = writeln!(m, " kit x raw | testpmd x raw | testpmd x dpdk-tap |");
    let _ = writeln!(m, "|---|{}---|---|---|", "---|".repeat(names.len()));
    for p in &points {
        let r = &p["results"];
        let _ = write!(m, "| {} |", p["size"].as_str().unwrap_or(""));
        for n in &names {
            match r.get(n.as_str()) {
                Some(t) => {
                    let _ = write!(m, " {:.0} pps, {:.2} Gbit/s |", f(t, "pps"), f(t, "gbps"));
                }
                None => {
                    let _ = write!(m, " - |");
                }
            }
        }
        let x = |a: &str, b: &str| fmt_ratio(&json!(ratio(f(&r[a], "pps"), f(&r[b], "pps"))));
        let _ = writeln!(
            m,
            " {} | {} | {} |",
            x(NET_KIT, NET_RAW),
            x(NET_PMD, NET_RAW),
            x(NET_PMD, NET_DPDK_TAP)
        );
    }
    // Issue 19's transmit targets, per size: >= 0.9x the raw writer (the
    // kit), >= 1.0x DPDK's vhost -> tap forwarding on the same frontend.
    let mut verdicts = Vec::new();
    for p in &points {
        let r = &p["results"];
        let size = p["size"].as_str().unwrap_or("");
        let mut one = |what: &str, a: &str, b: &str, goal: f64| {
            let (x, y) = (f(&r[a], "pps"), f(&r[b], "pps"));
            if x > 0.0 && y > 0.0 {
                let q = x / y;
                let v = if q >= goal { "met" } else { "**missed**" };
                verdicts.push(format!(
                    "- transmit {size}: {what}: {q:.2}x (target >= {goal:.1}x: {v})"
                ));
            }
        };
        if size != "tso-65000B" {
            one(
                "bulkhead-net/kit against the raw writer",
                NET_KIT,
                NET_RAW,
                0.9,
            );
            one(
                "bulkhead-net against DPDK's vhost PMD forwarding to its tap PMD, both driven by testpmd's virtio-user",
                NET_PMD,
                NET_DPDK_TAP,
                1.0,
            );
        }
    }
    if !verdicts.is_empty() {
        let _ = writeln!(m, "\n{}", verdicts.join("\n"));
    }
    let _ = writeln!(m, "\nPackets per second of each run:\n");
    for p in &points {
        for (k, t) in p["results"].as_object().into_iter().flatten() {
            let runs: Vec<String> = t["runs_pps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{:.0}", x.as_f64().unwrap_or(0.0)))
                .collect();
            let cpu = t["daemon_cpu_ns_per_frame"]
                .as_f64()
                .map(|c| format!(" (daemon CPU ≈ {c:.0} ns per frame)"))
                .unwrap_or_default();
            let _ = writeln!(
                m,
                "- {} {k}: {}{cpu}",
                p["size"].as_str().unwrap_or(""),
                runs.join(" ")
            );
        }
    }
    let rx = &net["rx"];
    if rx.is_object() {
        let _ = writeln!(
            m,
            "\nReceive (tap → guest), 64 B: **{:.0} pps** to the kit's rx ring (runs {}); {}. \
             The injector sent {} frames in all.\n",
            f(rx, "pps"),
            rx["runs_pps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{:.0}", x.as_f64().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(" "),
            rx["how"].as_str().unwrap_or(""),
            rx["injected"],
        );
        for r in net["rx_sizes"].as_array().into_iter().flatten() {
            let raw = if r["raw_reader_pps"].is_number() {
                let runs = |k: &str| {
                    r[k].as_array()
                        .into_iter()
                        .flatten()
                        .map(|x| format!("{:.0}", x.as_f64().unwrap_or(0.0)))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                let how = if r["interleaved"].as_bool() == Some(true) {
                    format!(
                        " (medians of runs taken in turn, the order alternating: ours {}, \
                         the reader's {})",
                        runs("runs_pps"),
                        runs("runs_raw_reader_pps")
                    )
                } else {
                    String::new()
                };
                format!(
                    "; a raw `read(2)` tap reader got {:.0} pps from the same injector{how}: \
                     {:.2}x (target >= 0.9x: {})",
                    f(r, "raw_reader_pps"),
                    f(r, "raw_ratio"),
                    if f(r, "raw_ratio") >= 0.9 {
                        "met"
                    } else {
                        "**missed**"
                    }
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                m,
                "- receive {}: {:.0} pps, daemon CPU ≈ {:.0} ns per frame{raw}",
                r["size"].as_str().unwrap_or(""),
                f(r, "pps"),
                f(r, "daemon_cpu_ns_per_frame"),
            );
        }
    }
    let dpdk_rx: Vec<&Value> = net["rx_dpdk"].as_array().into_iter().flatten().collect();
    if !dpdk_rx.is_empty() {
        let _ = writeln!(
            m,
            "\nReceive through DPDK's virtio-user (`rxonly`) from a flooded tap: \
             `bulkhead-net` on the tap against testpmd's tap PMD forwarding (`io`) to its vhost \
             PMD, the same client and injector, one setup after the other:\n"
        );
        for r in dpdk_rx {
            let _ = writeln!(
                m,
                "- receive {}: bulkhead-net {:.0} pps, dpdk-vhost/tap {:.0} pps: {:.2}x \
                 (target >= 1.0x: {})",
                r["size"].as_str().unwrap_or(""),
                f(r, "bulkhead_pps"),
                f(r, "dpdk_pps"),
                f(r, "ratio"),
                if f(r, "ratio") >= 1.0 {
                    "met"
                } else {
                    "**missed**"
                }
            );
        }
    }
    let before = net["rx_before"].as_array().cloned().unwrap_or_default();
    if !before.is_empty() {
        let _ = writeln!(
            m,
            "\nReceive against an earlier build (`--net-baseline-bin`, one run each in turn, the order alternating):\n"
        );
        for (now, old) in net["rx_sizes"]
            .as_array()
            .into_iter()
            .flatten()
            .zip(&before)
        {
            let (c_now, c_old) = (
                f(now, "daemon_cpu_ns_per_frame"),
                f(old, "daemon_cpu_ns_per_frame"),
            );
            let _ = writeln!(
                m,
                "- receive {}: daemon CPU per frame {:.0} ns now, {:.0} ns before ({:.2}x); {:.0} pps now, {:.0} pps before",
                now["size"].as_str().unwrap_or(""),
                c_now,
                c_old,
                if c_old > 0.0 { c_now / c_old } else { 0.0 },
                f(now, "pps"),
                f(old, "pps"),
            );
        }
    }
    if let Some(mem) = net["memory"].as_object().filter(|o| !o.is_empty()) {
        let _ = writeln!(
            m,
            "\nMemory right after the transmit points (`/proc/PID/status`; DPDK's figure \
             includes its 512 MiB of `--no-huge` mbuf memory it touched):\n"
        );
        for (name, v) in mem {
            let _ = writeln!(
                m,
                "- {name}: RSS {:.1} MiB, own (anonymous) {:.1} MiB, peak {:.1} MiB",
                f(v, "rss_kib") / 1024.0,
                f(v, "anon_kib") / 1024.0,
                f(v, "peak_kib") / 1024.0
            );
        }
    }
    for s in net["skipped"].as_array().into_iter().flatten() {
        let _ = writeln!(m, "- skipped: {}", s.as_str().unwrap_or(""));
    }
    let _ = writeln!(m, "\n```text");
    for c in net["configs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "[{}] {}",
            c["target"].as_str().unwrap_or(""),
            c["config"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(m, "```\n");
    let prof = &net["profile"];
    if prof.is_object() {
        let _ = writeln!(
            m,
            "Profile of `bulkhead-net` (`perf record -e cpu-clock`, all threads) while the kit \
             sends 64 B frames ({:.0} pps while profiled):\n",
            f(prof, "pps")
        );
        let _ = writeln!(m, "| share | object and symbol |\n|---|---|");
        for s in prof["symbols"].as_array().into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {:.1}% | `{}` |",
                f(s, "pct"),
                s["what"].as_str().unwrap_or("")
            );
        }
        let threads: Vec<String> = prof["threads"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| format!("{} {:.0}%", t["what"].as_str().unwrap_or(""), f(t, "pct")))
            .collect();
        let _ = writeln!(m, "\nThreads: {}.\n", threads.join(", "));
    }
}

/// Each blk target's memory: idle after its start, and right after its
/// last point (the load), with the peak; blk's target against qsd's.
fn memory_section(m: &mut String, v: &Value) {
    let Some(rows) = v["memory"].as_array().filter(|r| !r.is_empty()) else {
        return;
    };
    let _ = writeln!(
        m,
        "## Memory
"
    );
    let _ = writeln!(
        m,
        "Each daemon's `/proc/PID/status`: idle once it serves, and right after its last \
         point of the blk suite above; *own* is `RssAnon` (heap, stacks, rings of its own), \
         *shared* is `RssShmem` (the test kit's guest memory the daemon touched, mapped from \
         the frontend's memfd: the same pages for every daemon), *peak* is `VmHWM`.\n"
    );
    let _ = writeln!(
        m,
        "| medium | queues | daemon | idle RSS MiB | loaded RSS MiB | own MiB | shared MiB | peak MiB |\n|---|---|---|---|---|---|---|---|"
    );
    let mib = |x: &Value, k: &str| x[k].as_f64().unwrap_or(0.0) / 1024.0;
    for r in rows {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r["medium"].as_str().unwrap_or(""),
            r["queues"],
            r["target"].as_str().unwrap_or(""),
            mib(&r["idle"], "rss_kib"),
            mib(&r["loaded"], "rss_kib"),
            mib(&r["loaded"], "anon_kib"),
            mib(&r["loaded"], "shmem_kib"),
            mib(&r["loaded"], "peak_kib"),
        );
    }
    let _ = writeln!(m);
}

/// The console benchmark's table.
/// The throttle suite: each limit against the rate measured and the
/// daemon's CPU while it held the client back.
fn throttle_section(m: &mut String, t: &Value) {
    if t.is_null() {
        return;
    }
    let _ = writeln!(m, "## I/O limits\n");
    let _ = writeln!(
        m,
        "The daemons held to a limit ([blk.md](blk.md#io-limits), [net.md](net.md#limits)) \
         while the test kit's client asks for far more: bulkhead-blk on a tmpfs image at \
         QD32, bulkhead-net with its 256-entry transmit ring kept full, or its tap flooded by \
         a packet socket for `--rx-pps`. {} s per point (the default burst, a tenth of a \
         second's rate, adds 1% over 10 s); load {}. The burst row (`-max`) counts every \
         request from the daemon's start, its bucket full, against the burst plus the rate \
         for the run. *measured / limit* should be 1.00-1.01, and the daemon's CPU small: a throttled \
         queue sleeps until its bucket has room, it does not poll. Rerun: \
         `target/release/bulkhead-bench --suites throttle --merge-json docs/performance.json \
         --json docs/performance.json --md docs/performance.md --svg docs/performance.svg` \
         (root for the net rows; `--throttle-iops`, `--throttle-bps`, `--throttle-pps`, \
         `--throttle-secs` choose the points).\n",
        t["secs"],
        t["load"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        m,
        "| limit | workload | measured | measured / limit | daemon CPU |\n|---|---|---|---|---|"
    );
    for r in t["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "| `{}` | {} | {} {} | {:.3} | {:.2}% of a CPU |",
            r["limit"].as_str().unwrap_or("?"),
            r["workload"].as_str().unwrap_or("?"),
            r["measured"],
            r["unit"].as_str().unwrap_or(""),
            r["ratio"].as_f64().unwrap_or(0.0),
            r["daemon_cpu_pct"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(why) = t["net_skipped"].as_str() {
        let _ = writeln!(m, "\nbulkhead-net rows skipped: {why}.");
    }
    let _ = writeln!(m);
}

/// The dirtylog suite: bulkhead-blk with a live migration's dirty logging
/// off and on.
fn dirtylog_section(m: &mut String, d: &Value) {
    if d.is_null() {
        return;
    }
    let _ = writeln!(
        m,
        "## Dirty logging
"
    );
    let _ = writeln!(
        m,
        "What a live migration's dirty-page logging costs `bulkhead-blk` \
         ([operations.md](operations.md#live-migration)): the test kit's client switches \
         logging on (a fresh log, SET_LOG_BASE, `VHOST_F_LOG_ALL`, rings with their log \
         address, as QEMU does when a migration starts) and off between runs, queues \
         running, the two states interleaved; {} runs of {} s each per state; load {}. \
         With logging on, every completion marks its data pages and the used ring in the \
         log ({} pages marked in a run); off, it costs one atomic load per completion. \
         Rerun: `target/release/bulkhead-bench --suites dirtylog --merge-json \
         docs/performance.json --json docs/performance.json --md docs/performance.md \
         --svg docs/performance.svg` (`--dirtylog-runs`, `--dirtylog-secs`).\n",
        d["runs"],
        d["secs"],
        d["load"].as_str().unwrap_or("?"),
        d["dirty_pages"],
    );
    let _ = writeln!(
        m,
        "| workload | logging | IOPS (median) | IOPS per run | daemon CPU per request |\n|---|---|---|---|---|"
    );
    for (name, s) in [("off", &d["off"]), ("on", &d["on"])] {
        let runs = s["iops"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| format!("{:.0}", v.as_f64().unwrap_or(0.0)))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            m,
            "| {} | {name} | {:.0} | {runs} | {:.2} µs |",
            d["workload"].as_str().unwrap_or("?"),
            s["median_iops"].as_f64().unwrap_or(0.0),
            s["cpu_us_per_req"].as_f64().unwrap_or(0.0),
        );
    }
    let _ = writeln!(
        m,
        "\n*on / off* (median IOPS): **{:.3}**.\n",
        d["ratio"].as_f64().unwrap_or(0.0)
    );
}

/// The packed suite: split rings against packed rings, same client.
fn packed_section(m: &mut String, p: &Value) {
    if p.is_null() {
        return;
    }
    let _ = writeln!(m, "## Packed rings\n");
    let _ = writeln!(
        m,
        "Split rings against packed rings (`VIRTIO_F_RING_PACKED`), the same client on \
         both, the two layouts' runs interleaved (order rotated). Block: two `bulkhead-blk` \
         daemons started alike on one tmpfs image; client: {}. Load before {}, after {}. \
         *packed / split*: IOPS higher is better, CPU lower is better. Rerun: \
         `target/release/bulkhead-bench --suites packed --merge-json docs/performance.json \
         --json docs/performance.json --md docs/performance.md --svg docs/performance.svg` \
         (root and DPDK for the net rows).\n",
        p["client"].as_str().unwrap_or(""),
        p["load_before"].as_str().unwrap_or("?"),
        p["load_after"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        m,
        "| pattern | QD | split IOPS | packed IOPS | packed / split | split p50 / p99 / p99.9 µs | packed p50 / p99 / p99.9 µs | split CPU µs/op | packed CPU µs/op | CPU packed / split |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for pt in p["points"].as_array().into_iter().flatten() {
        let a = &pt["results"]["bulkhead-blk-split"];
        let b = &pt["results"]["bulkhead-blk-packed"];
        let r2 = |x: f64, y: f64| ratio(x, y).map_or("-".to_string(), |v| format!("{v:.2}"));
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            pt["pattern"].as_str().unwrap_or(""),
            pt["qd"],
            fmt_num(f(a, "iops")),
            fmt_num(f(b, "iops")),
            r2(f(b, "iops"), f(a, "iops")),
            lat(a),
            lat(b),
            cpu(a),
            cpu(b),
            r2(f(b, "daemon_cpu_us_per_op"), f(a, "daemon_cpu_us_per_op")),
        );
    }
    let _ = writeln!(m);
    for c in p["configs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "- `{}`: `{}`",
            c["target"].as_str().unwrap_or(""),
            c["config"].as_str().unwrap_or("")
        );
    }
    let net = &p["net"];
    if let Some(why) = net["skipped"].as_str() {
        let _ = writeln!(m, "\nNet rows skipped: {why}.\n");
        return;
    }
    let _ = writeln!(
        m,
        "\nNet: two `bulkhead-net` daemons started alike (`{}`), each on a single-queue tap \
         of its own in a network namespace, each with DPDK's virtio-user PMD as its frontend \
         (`packed_vq=0` and `packed_vq=1`, 256-entry rings). Transmit: testpmd `txonly`, \
         frames counted at the tap; receive: an AF_PACKET socket floods the tap, testpmd \
         `rxonly` counts what it takes. Medians of {} windows of {} s (after {} s of \
         traffic); daemon CPU divided by the frames moved.\n",
        net["daemon"].as_str().unwrap_or(""),
        net["runs"],
        net["secs"],
        net["warmup_secs"],
    );
    let _ = writeln!(
        m,
        "| direction | frame | split pps | packed pps | packed / split | split CPU ns/frame | packed CPU ns/frame |\n\
         |---|---|---:|---:|---:|---:|---:|"
    );
    for pt in net["points"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {:.2} | {} | {} |",
            pt["direction"].as_str().unwrap_or(""),
            pt["size"].as_str().unwrap_or(""),
            fmt_num(f(&pt["split"], "pps")),
            fmt_num(f(&pt["packed"], "pps")),
            pt["ratio"].as_f64().unwrap_or(0.0),
            fmt_num(f(&pt["split"], "daemon_cpu_ns_per_frame")),
            fmt_num(f(&pt["packed"], "daemon_cpu_ns_per_frame")),
        );
    }
    let _ = writeln!(m);
    for c in net["configs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "- `{}` client: `{}`",
            c["target"].as_str().unwrap_or(""),
            c["client"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(m);
}

fn console_section(m: &mut String, c: &Value) {
    if c.is_null() {
        return;
    }
    let meth = &c["method"];
    let _ = writeln!(m, "## bulkhead-console\n");
    let _ = writeln!(
        m,
        "Port 0 of `bulkhead-console`, test-kit driver (Linux's virtio_console sequence) as \
         frontend, a unix-socket client on the host side. Guest → host: {} MiB written in \
         {}-byte buffers while the client reads; host → guest: the client writes {} MiB while \
         the driver takes {}-byte receive buffers. Medians of {} runs; CPU is the daemon's.\n",
        meth["mib_per_run"],
        meth["guest_write_bytes"],
        meth["mib_per_run"],
        meth["guest_rx_buffer_bytes"],
        meth["runs"],
    );
    let _ = writeln!(
        m,
        "| direction | MiB/s | runs | daemon CPU ms per MiB |\n|---|---|---|---|"
    );
    for (key, name) in [
        ("guest_to_host", "guest → host"),
        ("host_to_guest", "host → guest"),
    ] {
        let d = &c[key];
        let runs: Vec<String> = d["runs_mib_s"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{:.1}", x.as_f64().unwrap_or(0.0)))
            .collect();
        let _ = writeln!(
            m,
            "| {name} | {:.1} | {} | {:.2} |",
            f(d, "mib_s"),
            runs.join(" "),
            f(d, "daemon_cpu_ms_per_mib")
        );
    }
    let _ = writeln!(
        m,
        "\n```text\n{}\n```\n",
        c["config"].as_str().unwrap_or("")
    );
    console_peers(m, c);
}

/// A JSON array of per-run numbers as one space-separated cell.
fn runs_list(v: &Value, decimals: usize) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| format!("{:.*}", decimals, x.as_f64().unwrap_or(0.0)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// bulkhead-console beside vhost-device-console, with the issue's targets.
fn console_peers(m: &mut String, c: &Value) {
    if let Some(why) = c["peers_skipped"].as_str() {
        let _ = writeln!(m, "Against vhost-device-console: skipped ({why}).\n");
        return;
    }
    let p = &c["peers"];
    if p.is_null() {
        return;
    }
    let _ = writeln!(
        m,
        "### Against rust-vmm's vhost-device-console\n\n\
         Both daemons in one run with the same test-kit driver: guest → host {} MiB of printable \
         ASCII per run (vhost-device-console 0.1.0 panics on other bytes; its host side is a TCP \
         socket, ours a unix socket), medians of {} runs interleaved; echo: a byte typed at the \
         host, read by the driver, written back and read at the host, {} round trips 5 ms \
         apart, one daemon's then the other's, the order alternating each round; RSS after \
         the runs. Host → guest throughput is not compared: 0.1.0 takes input one byte per \
         used entry. Each port's two queues share one thread, so the echo is served \
         by the thread that just delivered the byte (why: docs/performance-notes.md, \
         console echo).\n",
        p["mib_per_run"], p["runs"], p["echo_rounds"]
    );
    let _ = writeln!(
        m,
        "| daemon | guest → host MiB/s | runs | echo p50 µs | echo p99 µs | RSS MiB |\n|---|---|---|---|---|---|"
    );
    for r in p["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "| {} | {:.1} | {} | {} | {} | {:.1} |",
            r["daemon"].as_str().unwrap_or("?"),
            f(r, "guest_to_host_mib_s"),
            runs_list(&r["runs_mib_s"], 1),
            r["echo_p50_us"],
            r["echo_p99_us"],
            f(r, "rss_kib") / 1024.0,
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let t = f(p, "throughput_ratio");
    let (l50, l99) = (f(p, "echo_p50_ratio"), f(p, "echo_p99_ratio"));
    let _ = writeln!(
        m,
        "\nThroughput {t:.2}x vhost-device-console's (target >= 5x: {}); echo latency p50 \
         {l50:.2}x, p99 {l99:.2}x (target <= 1.0x: {}).\n",
        verdict(t >= 5.0),
        verdict(l50 <= 1.0 && l99 <= 1.0),
    );
}

/// One row of the VMM tables: a configuration's medians, or its error.
fn vmm_row(m: &mut String, name: &str, r: &Value, first: &str) {
    if let Some(e) = r["error"].as_str() {
        let _ = writeln!(m, "| {name} | failed: {} |||||", e.replace('|', "/"));
        return;
    }
    let _ = writeln!(
        m,
        "| {name} | {first} | {:.2} | {:.2} | {:.2} | {:.1} |",
        f(r, "overhead_rss_mib"),
        f(r, "overhead_private_dirty_mib"),
        f(r, "overhead_anonymous_mib"),
        f(r, "guest_ram_rss_mib"),
    );
}

/// `bulkhead-vmm`: boot time to init and its own memory, or why not measured.
fn vmm_section(m: &mut String, vmm: &Value) {
    if vmm.is_null() {
        return;
    }
    let meth = &vmm["method"];
    let t = &vmm["targets"];
    let _ = writeln!(
        m,
        "## bulkhead-vmm: boot time and memory overhead
"
    );
    let _ = writeln!(
        m,
        "Suite run {} (`{}`). Guest: Debian {} with the test kit's initramfs, {} RAM, {} \
         vCPU, `{}`, devices over virtio-{}. Targets (Firecracker's published ones): \
         **<= {} ms** from starting the VMM to the guest's init, **<= {} MiB** VMM \
         memory beyond guest RAM.\n",
        vmm["generated"].as_str().unwrap_or("?"),
        vmm["command"].as_str().unwrap_or(""),
        meth["kernel"].as_str().unwrap_or("?"),
        meth["memory"].as_str().unwrap_or("?"),
        meth["cpus"],
        meth["cmdline"].as_str().unwrap_or(""),
        meth["transport"].as_str().unwrap_or("?"),
        f(t, "boot_to_init_ms"),
        f(t, "overhead_mib"),
    );
    let _ = writeln!(
        m,
        "Method. *Boot to init*: from spawning `bulkhead-vmm` (or QEMU; the backend already \
         listening) until the serial log holds the init's first line `@@BULKHEAD BOOTED` \
         (polled every millisecond); median of {} boots per configuration. *Memory*: once \
         the guest's `/test.sh` runs, `/proc/PID/smaps` of the VMM summed over every \
         mapping except guest RAM (`memfd:bulkhead-guest-ram`): **RSS beyond guest RAM** \
         (the target's measure; includes the VMM's shared text and libraries), \
         Private_Dirty and Anonymous (heap and stacks: memory only the VMM holds). KVM's \
         in-kernel state (vCPU, page tables) is not in RSS.\n",
        meth["boots"],
    );
    if vmm["measured"] != true {
        let _ = writeln!(
            m,
            "**Not measured on this machine.** Boot time to init and memory overhead after \
             boot need a KVM that runs a 64-bit Linux guest; {}: {}. The targets above stay \
             open until the suite runs on a machine whose `bulkhead-vmm probe` passes \
             (`bulkhead-bench --suites vmm`).\n",
            if vmm["probe"]["ok"] == true {
                "the probe passed but a boot failed"
            } else {
                "`bulkhead-vmm probe` failed here"
            },
            vmm["reason"].as_str().unwrap_or("?")
        );
    }
    if vmm["lane"] == "nested" {
        let h = &vmm["nested_host"];
        let _ = writeln!(
            m,
            "**Where.** `bulkhead-vmm probe` fails on this machine (its KVM cannot run a \
             64-bit Linux guest), so the boots ran inside the nested host \
             (docs/testing.md): a QEMU TCG guest ({}, {} vCPUs, {} MiB) whose `kvm-amd` \
             runs both VMMs, one boot of each in turn; the nested host ran {:.0} s. \
             **Absolute times there are two layers of emulation slow and are not \
             bare-metal figures; the ratio against QEMU in the same nested host is the \
             figure.** Memory is the VMM processes' own and is not inflated by the \
             nesting.\n",
            h["accel"].as_str().unwrap_or("?"),
            h["cpus"],
            h["memory_mib"],
            f(h, "elapsed_s"),
        );
    }
    if let Some(boots) = vmm["boots"].as_object() {
        let _ = writeln!(
            m,
            "QEMU: `{}`, the same kernel, initramfs, command line and RAM, `bulkhead-blk` \
             as `vhost-user-blk-pci`. QEMU's RSS beyond guest RAM includes its own copy of \
             the kernel and initramfs it hands the guest through fw_cfg (the size of \
             the two files); bulkhead-vmm writes them straight into guest RAM.\n",
            meth["qemu"].as_str().unwrap_or("?")
        );
        let _ = writeln!(
            m,
            "| devices | VMM | boot to init ms (runs) | RSS beyond guest RAM MiB | \
             Private_Dirty MiB | Anonymous MiB | guest RAM resident MiB |\n\
             |---|---|---|---|---|---|---|"
        );
        for (name, r) in boots {
            for (vmm_name, r) in [("bulkhead-vmm", r), ("QEMU", &vmm["qemu_boots"][name])] {
                if r.is_null() {
                    continue;
                }
                let runs: Vec<String> = r["runs_boot_to_init_ms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| format!("{:.0}", x.as_f64().unwrap_or(0.0)))
                    .collect();
                let first = format!(
                    "{vmm_name} | **{:.1}** ({}; guest uptime at init {:.0} ms)",
                    f(r, "boot_to_init_ms"),
                    runs.join(" "),
                    f(r, "guest_uptime_at_init_ms")
                );
                vmm_row(m, name, r, &first);
            }
            let x = &vmm["ratios"][name];
            let _ = writeln!(
                m,
                "| {name} | **bulkhead-vmm / QEMU** | **{}** | {} | {} | | |",
                fmt_ratio(&x["boot_to_init"]),
                fmt_ratio(&x["overhead_rss"]),
                fmt_ratio(&x["overhead_private_dirty"]),
            );
        }
        let _ = writeln!(m);
    }
    if let Some(dry) = vmm["dry_run"].as_object() {
        let _ = writeln!(
            m,
            "### VMM process before guest boot (dry run, not the target number)\n\n\
             The same command line, stopped through the API socket (`shutdown`) once \
             `list` shows every backend connected; medians of {} runs. Guest RAM already \
             holds the kernel and initrd and the vCPU may already run, but the guest \
             has not booted, so this is the VMM's set-up footprint, a lower bound for the \
             overhead after boot. Times are from spawning the VMM.\n",
            meth["dry_runs"]
        );
        let _ = writeln!(
            m,
            "| devices | API up / all connected ms | RSS beyond guest RAM MiB | \
             Private_Dirty MiB | Anonymous MiB | guest RAM resident MiB |\n\
             |---|---|---|---|---|---|"
        );
        for (name, r) in dry {
            let first = format!(
                "{:.1} / {:.1} (stopped cleanly {} of {}; {:.0} threads)",
                f(r, "api_ready_ms"),
                f(r, "attached_ms"),
                r["stopped_cleanly"],
                r["runs"],
                f(r, "threads")
            );
            vmm_row(m, name, r, &first);
        }
        let _ = writeln!(m);
    }
}

/// The rbd suite: bulkhead-blk and qemu-storage-daemon's rbd driver on the
/// same cluster, side by side, with the ratio of their medians.
fn rbd_section(m: &mut String, r: &Value) {
    if r.is_null() {
        return;
    }
    let _ = writeln!(m, "## Ceph RBD\n");
    if let Some(why) = r["skipped"].as_str() {
        let _ = writeln!(m, "Skipped: {why}.\n");
        return;
    }
    let _ = writeln!(
        m,
        "`bulkhead-blk --image rbd:rbd/bench-blk` against qemu-storage-daemon's rbd driver \
         (`--blockdev driver=rbd,...,cache.direct=on`) on an image of the same size \
         ({} MiB, written whole first) in the same pool of one throwaway cluster ({}); \
         each keeps its image's exclusive lock, so each has its own. Client: {}. Both \
         without librbd's write cache. Runs interleaved as above; medians; *ratio* is \
         bulkhead-blk / qsd (IOPS: higher is better; CPU: lower is better). Load before \
         {}, after {}. Rerun: `target/release/bulkhead-bench --suites rbd --merge-json \
         docs/performance.json --json docs/performance.json --md docs/performance.md \
         --svg docs/performance.svg` (root, Ceph installed).\n",
        r["image_mib"],
        r["cluster"].as_str().unwrap_or(""),
        r["client"].as_str().unwrap_or(""),
        r["load_before"].as_str().unwrap_or(""),
        r["load_after"].as_str().unwrap_or(""),
    );
    let _ = writeln!(
        m,
        "| pattern | QD | bulkhead-blk IOPS | qsd IOPS | ratio | bulkhead-blk p50 / p99 / p99.9 µs | qsd p50 / p99 / p99.9 µs | bulkhead-blk CPU µs/op | qsd CPU µs/op | CPU ratio |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for p in r["points"].as_array().into_iter().flatten() {
        let b = &p["results"]["bulkhead-blk-rbd"];
        let q = &p["results"]["qsd-rbd"];
        let r2 = |x: f64, y: f64| ratio(x, y).map_or("-".to_string(), |v| format!("{v:.2}"));
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p["pattern"].as_str().unwrap_or(""),
            p["qd"],
            fmt_num(f(b, "iops")),
            fmt_num(f(q, "iops")),
            r2(f(b, "iops"), f(q, "iops")),
            lat(b),
            lat(q),
            cpu(b),
            cpu(q),
            r2(f(b, "daemon_cpu_us_per_op"), f(q, "daemon_cpu_us_per_op")),
        );
    }
    let _ = writeln!(m);
    for c in r["configs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "- `{}`: `{}`",
            c["target"].as_str().unwrap_or(""),
            c["config"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(m);
}
