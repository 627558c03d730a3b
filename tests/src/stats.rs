//! A client for a daemon's `--stats-socket` and a strict checker of the
//! Prometheus text exposition format (0.0.4), written from the format's
//! description, independent of the daemons' renderer.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a scrape may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `stats` and parses the one JSON line answered.
pub fn stats(socket: &Path) -> io::Result<serde_json::Value> {
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    (&s).write_all(b"stats\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    serde_json::from_str(&line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {line:?}")))
}

/// Sends `request` and returns everything answered until the daemon closes.
/// A daemon that answers and closes before it read all of the request
/// (`error: busy`, an over-long line) breaks the pipe, or resets the
/// connection after its answer: the answer is read all the same.
pub fn request(socket: &Path, request: &[u8]) -> io::Result<String> {
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    match (&s).write_all(request) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e),
        _ => {}
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match (&s).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !answer.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(answer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sends `metrics` and returns the text answered.
pub fn metrics(socket: &Path) -> io::Result<String> {
    request(socket, b"metrics\n")
}

/// One sample line: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Full metric name (`bulkhead_blk_ok_total`).
    pub name: String,
    /// Label names to (unescaped) values.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Every sample of a checked exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// The samples in order.
    pub samples: Vec<Sample>,
    /// Family name to its `# TYPE`.
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// The value of `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }
}

fn metric_name_ok(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn label_name_ok(n: &str) -> bool {
    let mut c = n.chars();
    !n.starts_with("__")
        && matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Unescapes a HELP text: only `\\` and `\n` are escapes there.
fn help_ok(t: &str) -> Result<(), String> {
    let mut it = t.chars();
    while let Some(c) = it.next() {
        if c == '\\' && !matches!(it.next(), Some('\\' | 'n')) {
            return Err(format!("bad escape in HELP text {t:?}"));
        }
    }
    Ok(())
}

fn value_ok(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if v.is_empty()
            || v.contains(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            Err(format!("bad value {v:?}"))
        }
        _ => v
            .parse::<f64>()
            .map_err(|e| format!("bad value {v:?}: {e}")),
    }
}

/// Parses `{a="x",b="y"}` (the braces included) at the start of `s`;
/// returns the labels and the rest.
fn labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut out = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("no '{'")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((out, r));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = &rest[..eq];
        if !label_name_ok(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value without '\"'")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in a label value")),
                },
                Some((_, '\n')) => return Err("newline in a label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if out.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by ','".into());
        }
    }
}

/// Checks `text` line by line against the text format 0.0.4, strictly:
/// every line ends in `\n`; only `# HELP` and `# TYPE` comments, HELP
/// before TYPE, each at most once per family and before its samples; a
/// family's samples together; every sample of a TYPE'd family, with a
/// valid name, labels and value, no series twice; counters named
/// `..._total`; every name starting with `prefix`.
pub fn check_exposition(text: &str, prefix: &str) -> Result<Exposition, String> {
    if text.is_empty() {
        return Err("empty exposition".into());
    }
    if !text.ends_with('\n') {
        return Err("the last line does not end in a newline".into());
    }
    let mut exp = Exposition::default();
    let mut helped = BTreeSet::new();
    let mut done = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    for (n, line) in text.split_terminator('\n').enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            return Err(err("empty line".into()));
        }
        let start_family = |name: &str,
                            current: &mut Option<String>,
                            done: &mut BTreeSet<String>|
         -> Result<(), String> {
            if current.as_deref() != Some(name) {
                if let Some(c) = current.take() {
                    done.insert(c);
                }
                if done.contains(name) {
                    return Err(err(format!("family {name} split")));
                }
                *current = Some(name.to_owned());
            }
            Ok(())
        };
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest
                .split_once(' ')
                .ok_or_else(|| err("HELP without text".into()))?;
            if !metric_name_ok(name) || !name.starts_with(prefix) {
                return Err(err(format!("bad name {name:?}")));
            }
            help_ok(help).map_err(err)?;
            if !helped.insert(name.to_owned()) {
                return Err(err("second HELP".into()));
            }
            if exp.types.contains_key(name) {
                return Err(err("HELP after TYPE".into()));
            }
            start_family(name, &mut current, &mut done)?;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest
                .split_once(' ')
                .ok_or_else(|| err("TYPE without type".into()))?;
            if !metric_name_ok(name) || !name.starts_with(prefix) {
                return Err(err(format!("bad name {name:?}")));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                return Err(err(format!("bad type {ty:?}")));
            }
            if ty == "counter" && !name.ends_with("_total") {
                return Err(err("a counter not named _total".into()));
            }
            if exp.types.insert(name.to_owned(), ty.to_owned()).is_some() {
                return Err(err("second TYPE".into()));
            }
            start_family(name, &mut current, &mut done)?;
            if exp.samples.iter().any(|s| s.name == name) {
                return Err(err("TYPE after samples".into()));
            }
        } else if line.starts_with('#') {
            return Err(err("a comment that is neither HELP nor TYPE".into()));
        } else {
            let name_end = line
                .find(['{', ' '])
                .ok_or_else(|| err("sample without value".into()))?;
            let name = &line[..name_end];
            if !metric_name_ok(name) || !name.starts_with(prefix) {
                return Err(err(format!("bad name {name:?}")));
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                labels(&line[name_end..]).map_err(err)?
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let rest = rest
                .strip_prefix(' ')
                .ok_or_else(|| err("no space before the value".into()))?;
            let mut parts = rest.split(' ');
            let value = value_ok(parts.next().unwrap_or("")).map_err(err)?;
            if let Some(ts) = parts.next()
                && ts.parse::<i64>().is_err()
            {
                return Err(err(format!("bad timestamp {ts:?}")));
            }
            if parts.next().is_some() {
                return Err(err("trailing fields".into()));
            }
            if !exp.types.contains_key(name) {
                return Err(err("sample of a family without TYPE".into()));
            }
            if current.as_deref() != Some(name) {
                return Err(err("sample outside its family's block".into()));
            }
            if !series.insert((name.to_owned(), format!("{labels:?}"))) {
                return Err(err("series twice".into()));
            }
            exp.samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
    }
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP p_ok_total Requests \\\\ done\\n.
# TYPE p_ok_total counter
p_ok_total 3
# HELP p_bytes_total Bytes.
# TYPE p_bytes_total counter
p_bytes_total{port=\"0\",name=\"a\\\"b\\\\c\\nd\"} 5
p_bytes_total{port=\"1\",name=\"\"} 7
# TYPE p_state gauge
p_state{id=\"blk0\"} 1 1700000000000
";

    #[test]
    fn a_valid_exposition_parses_with_unescaped_labels() {
        let e = check_exposition(GOOD, "p_").unwrap();
        assert_eq!(e.samples.len(), 4);
        assert_eq!(e.value("p_ok_total", &[]), Some(3.0));
        assert_eq!(
            e.value("p_bytes_total", &[("port", "0"), ("name", "a\"b\\c\nd")]),
            Some(5.0)
        );
        assert_eq!(e.types["p_state"], "gauge");
    }

    #[test]
    fn every_kind_of_bad_line_is_refused() {
        let bad = [
            ("no final newline", "# TYPE p_a gauge\np_a 1"),
            ("empty line", "# TYPE p_a gauge\n\np_a 1\n"),
            ("free comment", "# hello\n"),
            ("bad type", "# TYPE p_a thing\n"),
            ("counter without _total", "# TYPE p_a counter\np_a 1\n"),
            ("sample without TYPE", "p_a 1\n"),
            ("HELP after TYPE", "# TYPE p_a gauge\n# HELP p_a x\np_a 1\n"),
            ("second TYPE", "# TYPE p_a gauge\n# TYPE p_a gauge\n"),
            ("bad value", "# TYPE p_a gauge\np_a one\n"),
            ("no value", "# TYPE p_a gauge\np_a\n"),
            ("two spaces", "# TYPE p_a gauge\np_a  1\n"),
            ("bad escape", "# TYPE p_a gauge\np_a{x=\"\\t\"} 1\n"),
            ("unquoted label", "# TYPE p_a gauge\np_a{x=1} 1\n"),
            ("unterminated", "# TYPE p_a gauge\np_a{x=\"1} 1\n"),
            ("label twice", "# TYPE p_a gauge\np_a{x=\"1\",x=\"2\"} 1\n"),
            ("reserved label", "# TYPE p_a gauge\np_a{__x=\"1\"} 1\n"),
            ("series twice", "# TYPE p_a gauge\np_a 1\np_a 2\n"),
            (
                "split family",
                "# TYPE p_a gauge\np_a{x=\"1\"} 1\n# TYPE p_b gauge\np_b 1\np_a{x=\"2\"} 1\n",
            ),
            ("wrong prefix", "# TYPE q_a gauge\nq_a 1\n"),
            ("bad name", "# TYPE p-a gauge\n"),
            ("bad HELP escape", "# HELP p_a a\\tb\n"),
            ("empty", ""),
        ];
        for (why, text) in bad {
            assert!(check_exposition(text, "p_").is_err(), "accepted: {why}");
        }
    }
}
