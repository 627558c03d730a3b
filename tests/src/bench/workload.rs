//! What one benchmark point does (access pattern, queue depth, duration) and
//! the statistics of its runs.

use std::time::Duration;

/// Access pattern of a benchmark point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// 4 KiB reads at uniformly random aligned offsets.
    RandRead,
    /// 4 KiB writes at uniformly random aligned offsets.
    RandWrite,
    /// 128 KiB sequential reads (each queue walks its own slice of the image).
    SeqRead,
    /// 128 KiB sequential writes (each queue walks its own slice of the image).
    SeqWrite,
}

impl Pattern {
    /// Every pattern, in report order.
    pub const ALL: [Pattern; 4] = [
        Pattern::RandRead,
        Pattern::RandWrite,
        Pattern::SeqRead,
        Pattern::SeqWrite,
    ];

    /// Short name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread-4k",
            Pattern::RandWrite => "randwrite-4k",
            Pattern::SeqRead => "seqread-128k",
            Pattern::SeqWrite => "seqwrite-128k",
        }
    }

    /// Parses a name given by [`Pattern::name`].
    pub fn parse(s: &str) -> Option<Pattern> {
        Pattern::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Bytes per request.
    pub fn block_size(self) -> u32 {
        match self {
            Pattern::RandRead | Pattern::RandWrite => 4096,
            Pattern::SeqRead | Pattern::SeqWrite => 128 * 1024,
        }
    }

    /// True for writes.
    pub fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }

    fn is_random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

/// One timed run: what every client does on each of its queues.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Access pattern.
    pub pattern: Pattern,
    /// Requests kept in flight per queue.
    pub qd: usize,
    /// How long requests are issued.
    pub duration: Duration,
    /// Image size in bytes.
    pub image_size: u64,
    /// Seed of the offset generator (varied per run, identical across targets).
    pub seed: u64,
}

/// Offsets of one queue's requests.
pub struct Offsets {
    state: u64,
    cursor: u64,
    start: u64,
    span: u64,
    bs: u64,
    random: bool,
}

impl Offsets {
    /// Offsets for queue `queue` of `queues` under `spec`.
    pub fn new(spec: &Spec, queue: usize, queues: usize) -> Self {
        let bs = u64::from(spec.pattern.block_size());
        let (start, span) = if spec.pattern.is_random() {
            (0, spec.image_size / bs * bs)
        } else {
            let per = spec.image_size / queues.max(1) as u64 / bs * bs;
            (per * queue as u64, per)
        };
        Offsets {
            // xorshift must not start at 0.
            state: (spec.seed ^ (queue as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
            cursor: 0,
            start,
            span: span.max(bs),
            bs,
            random: spec.pattern.is_random(),
        }
    }

    /// Byte offset of the next request.
    pub fn next_offset(&mut self) -> u64 {
        if self.random {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let r = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
            self.start + (r % (self.span / self.bs)) * self.bs
        } else {
            let off = self.start + self.cursor;
            self.cursor = (self.cursor + self.bs) % self.span;
            off
        }
    }
}

/// Raw outcome of one run (one queue, or merged over queues).
#[derive(Debug, Default)]
pub struct Sample {
    /// Requests completed before the deadline.
    pub ops: u64,
    /// Bytes those requests moved.
    pub bytes: u64,
    /// Length of the measured window.
    pub secs: f64,
    /// Latency of each counted request, submit to completion seen, in ns.
    pub lat_ns: Vec<u32>,
    /// Requests that completed with a bad status or short transfer.
    pub errors: u64,
}

impl Sample {
    /// Adds the queues of one run together.
    pub fn merge(parts: Vec<Sample>) -> Sample {
        let mut out = Sample::default();
        for p in parts {
            out.ops += p.ops;
            out.bytes += p.bytes;
            out.secs = out.secs.max(p.secs);
            out.errors += p.errors;
            out.lat_ns.extend_from_slice(&p.lat_ns);
        }
        out
    }

    /// IOPS, throughput and latency percentiles of this run.
    pub fn stats(mut self) -> Stats {
        self.lat_ns.sort_unstable();
        let pct = |q: f64| -> f64 {
            let n = self.lat_ns.len();
            if n == 0 {
                return 0.0;
            }
            let i = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
            f64::from(self.lat_ns[i]) / 1000.0
        };
        let secs = self.secs.max(1e-9);
        Stats {
            iops: self.ops as f64 / secs,
            mib_s: self.bytes as f64 / secs / (1024.0 * 1024.0),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
        }
    }
}

/// Summary numbers of a run, or medians over runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
}

/// Median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Per-metric medians of several runs.
pub fn median_stats(runs: &[Stats]) -> Stats {
    let m = |f: fn(&Stats) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Stats {
        iops: m(|s| s.iops),
        mib_s: m(|s| s.mib_s),
        p50_us: m(|s| s.p50_us),
        p99_us: m(|s| s.p99_us),
        p999_us: m(|s| s.p999_us),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_stay_aligned_and_inside_the_image() {
        for pattern in Pattern::ALL {
            let spec = Spec {
                pattern,
                qd: 1,
                duration: Duration::ZERO,
                image_size: 1 << 24,
                seed: 7,
            };
            let mut o = Offsets::new(&spec, 1, 2);
            for _ in 0..1000 {
                let off = o.next_offset();
                assert_eq!(off % u64::from(pattern.block_size()), 0);
                assert!(off + u64::from(pattern.block_size()) <= 1 << 24);
            }
        }
    }

    #[test]
    fn percentiles_pick_the_right_rank() {
        let s = Sample {
            ops: 1000,
            bytes: 0,
            secs: 1.0,
            lat_ns: (1..=1000).map(|i| i * 1000).collect(),
            errors: 0,
        };
        let st = s.stats();
        assert_eq!((st.p50_us, st.p99_us, st.p999_us), (500.0, 990.0, 999.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
