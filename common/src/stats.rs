//! One stats surface for every daemon and the VMM: a [`Stats`] snapshot is
//! an ordered list of named counters and gauges, each with a one-line help
//! text and optional labels (`queue`, `port`), filled from the atomics a
//! device already keeps. Three renderings of the same snapshot:
//!
//! - [`Stats::line`]: `name=value` pairs on one line, the `stats:` log line
//!   (SIGUSR1, exit);
//! - [`Stats::json`]: one JSON object, what `--stats-socket` answers to
//!   `stats`;
//! - [`Stats::prometheus`]: the Prometheus text exposition format 0.0.4,
//!   what `--stats-socket` answers to `metrics` (and the VMM's API to
//!   `metrics`).
//!
//! Metric names and label names come from the code (checked by
//! [`valid_name`] in every renderer's tests); label values may come from a
//! command line (a console port's name) and are escaped.

use std::fmt::Write as _;

/// Whether a value only grows (a counter) or goes up and down (a gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only grows while the daemon runs; rendered with a `_total` suffix.
    Counter,
    /// A current value (a state, a count in flight).
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One value of a metric, with its labels (none for most).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// `(name, value)` pairs, in the order they were given.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: u64,
}

/// A named metric: its kind, help text and every sample of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metric {
    /// Name without the daemon prefix or `_total` (`ok`, `rx_frames`).
    pub name: &'static str,
    /// One line: what is counted.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Its values, one per label set, in the order they were added.
    pub samples: Vec<Sample>,
}

/// A snapshot of a daemon's counters, in the order they were added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    metrics: Vec<Metric>,
}

impl Stats {
    /// No metrics.
    pub fn new() -> Self {
        Stats::default()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.metrics.is_empty()
    }

    /// The metrics, in order.
    pub fn metrics(&self) -> &[Metric] {
        &self.metrics
    }

    /// Adds counter `name` without labels.
    pub fn counter(&mut self, name: &'static str, help: &'static str, value: u64) -> &mut Self {
        self.add(Kind::Counter, name, help, Vec::new(), value)
    }

    /// Adds gauge `name` without labels.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: u64) -> &mut Self {
        self.add(Kind::Gauge, name, help, Vec::new(), value)
    }

    /// Adds a sample of counter `name` with `labels`; the samples of one name
    /// stay together under one help text, whatever was added between them.
    pub fn counter_with(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        value: u64,
    ) -> &mut Self {
        let labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        self.add(Kind::Counter, name, help, labels, value)
    }

    /// Adds a sample of gauge `name` with `labels` (see [`Stats::counter_with`]).
    pub fn gauge_with(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        value: u64,
    ) -> &mut Self {
        let labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        self.add(Kind::Gauge, name, help, labels, value)
    }

    fn add(
        &mut self,
        kind: Kind,
        name: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: u64,
    ) -> &mut Self {
        let sample = Sample { labels, value };
        match self.metrics.iter_mut().find(|m| m.name == name) {
            Some(m) => m.samples.push(sample),
            None => self.metrics.push(Metric {
                name,
                help,
                kind,
                samples: vec![sample],
            }),
        }
        self
    }

    /// The value of `name` with exactly `labels` (tests, callers that
    /// compare snapshots).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let m = self.metrics.iter().find(|m| m.name == name)?;
        m.samples
            .iter()
            .find(|s| {
                s.labels.len() == labels.len()
                    && s.labels
                        .iter()
                        .zip(labels)
                        .all(|((k, v), (k2, v2))| k == k2 && v == v2)
            })
            .map(|s| s.value)
    }

    /// `name=value` pairs on one line, for the `stats:` log line; a
    /// labelled sample is `name{label="value"}=value`. Empty without
    /// metrics.
    pub fn line(&self) -> String {
        let mut out = String::new();
        for m in &self.metrics {
            for s in &m.samples {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(m.name);
                write_labels(&mut out, &s.labels);
                let _ = write!(out, "={}", s.value);
            }
        }
        out
    }

    /// One JSON object: an unlabelled metric is `"name": value`, a labelled
    /// one `"name": [{"label": "value", ..., "value": n}, ...]`.
    pub fn json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        for m in &self.metrics {
            let v = match m.samples.as_slice() {
                [s] if s.labels.is_empty() => serde_json::Value::from(s.value),
                samples => serde_json::Value::Array(
                    samples
                        .iter()
                        .map(|s| {
                            let mut o = serde_json::Map::new();
                            for (k, v) in &s.labels {
                                o.insert((*k).to_owned(), serde_json::Value::from(v.as_str()));
                            }
                            o.insert("value".into(), serde_json::Value::from(s.value));
                            serde_json::Value::Object(o)
                        })
                        .collect(),
                ),
            };
            obj.insert(m.name.to_owned(), v);
        }
        serde_json::Value::Object(obj)
    }

    /// The Prometheus text exposition format (0.0.4): for each metric
    /// `# HELP`, `# TYPE`, then one `prefix_name{labels} value` line per
    /// sample; a counter's name ends in `_total`. `prefix` is the program
    /// (`bulkhead_blk`); `-` in it becomes `_`.
    pub fn prometheus(&self, prefix: &str) -> String {
        let prefix: String = prefix
            .chars()
            .map(|c| if c == '-' { '_' } else { c })
            .collect();
        let mut out = String::new();
        for m in &self.metrics {
            let suffix = match m.kind {
                Kind::Counter => "_total",
                Kind::Gauge => "",
            };
            let name = format!("{prefix}_{}{suffix}", m.name);
            let _ = writeln!(out, "# HELP {name} {}", escape_help(m.help));
            let _ = writeln!(out, "# TYPE {name} {}", m.kind.name());
            for s in &m.samples {
                out.push_str(&name);
                write_labels(&mut out, &s.labels);
                let _ = writeln!(out, " {}", s.value);
            }
        }
        out
    }
}

/// `{a="x",b="y"}` with values escaped; nothing without labels.
fn write_labels(out: &mut String, labels: &[(&'static str, String)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    out.push('}');
}

/// A label value as the text format wants it: `\` `"` and newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A help text as the text format wants it: `\` and newline escaped.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Whether `name` is a valid Prometheus metric name
/// (`[a-zA-Z_:][a-zA-Z0-9_:]*`); label names are the same without `:`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stats {
        let mut s = Stats::new();
        s.counter("ok", "Requests completed with OK.", 3)
            .gauge("inflight", "Requests in flight.", 2)
            .counter_with("delivered", "Bytes delivered.", &[("port", "0")], 5)
            .counter("late", "Added between two samples of one metric.", 1)
            .counter_with("delivered", "ignored", &[("port", "1")], 7);
        s
    }

    #[test]
    fn the_log_line_keeps_name_value_pairs_in_order() {
        assert_eq!(
            sample().line(),
            "ok=3 inflight=2 delivered{port=\"0\"}=5 delivered{port=\"1\"}=7 late=1"
        );
        assert_eq!(Stats::new().line(), "");
    }

    #[test]
    fn json_has_plain_values_and_labelled_arrays() {
        let j = sample().json();
        assert_eq!(j["ok"], 3);
        assert_eq!(j["inflight"], 2);
        assert_eq!(j["delivered"][1]["port"], "1");
        assert_eq!(j["delivered"][1]["value"], 7);
        let keys: Vec<&String> = j.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 4);
    }

    #[test]
    fn prometheus_has_help_then_type_then_samples_and_counters_end_in_total() {
        let text = sample().prometheus("bulkhead-blk");
        let want = "\
# HELP bulkhead_blk_ok_total Requests completed with OK.
# TYPE bulkhead_blk_ok_total counter
bulkhead_blk_ok_total 3
# HELP bulkhead_blk_inflight Requests in flight.
# TYPE bulkhead_blk_inflight gauge
bulkhead_blk_inflight 2
# HELP bulkhead_blk_delivered_total Bytes delivered.
# TYPE bulkhead_blk_delivered_total counter
bulkhead_blk_delivered_total{port=\"0\"} 5
bulkhead_blk_delivered_total{port=\"1\"} 7
# HELP bulkhead_blk_late_total Added between two samples of one metric.
# TYPE bulkhead_blk_late_total counter
bulkhead_blk_late_total 1
";
        assert_eq!(text, want);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut s = Stats::new();
        s.counter_with(
            "bytes",
            "A \\ help\nline.",
            &[("port", "a\"b\\c\nd"), ("queue", "1")],
            1,
        );
        let text = s.prometheus("x");
        assert!(text.contains("# HELP x_bytes_total A \\\\ help\\nline.\n"));
        assert!(text.contains("x_bytes_total{port=\"a\\\"b\\\\c\\nd\",queue=\"1\"} 1\n"));
        // One line per HELP, TYPE and sample: the newline in the value did not split it.
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn get_finds_a_sample_by_its_labels() {
        let s = sample();
        assert_eq!(s.get("delivered", &[("port", "1")]), Some(7));
        assert_eq!(s.get("delivered", &[]), None);
        assert_eq!(s.get("ok", &[]), Some(3));
        assert_eq!(s.get("nope", &[]), None);
    }

    #[test]
    fn names_are_checked_like_prometheus_does() {
        assert!(valid_name("bulkhead_blk_ok_total"));
        assert!(valid_name("_a:b1"));
        assert!(!valid_name("1a"));
        assert!(!valid_name("a-b"));
        assert!(!valid_name(""));
    }
}
