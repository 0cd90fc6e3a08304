//! Results: one run's outcome, and the A/B comparison of several rounds.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::run::Tally;

/// What the replies said, counted.
#[derive(Clone, Default, Debug)]
pub struct Counts {
    pub ops: u64,
    pub gets: u64,
    pub get_keys: u64,
    pub hits: u64,
    pub sets: u64,
    pub errors: u64,
    /// Nanoseconds from the start to the last measured reply.
    pub last_done: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.ops += o.ops;
        self.gets += o.gets;
        self.get_keys += o.get_keys;
        self.hits += o.hits;
        self.sets += o.sets;
        self.errors += o.errors;
        self.last_done = self.last_done.max(o.last_done);
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1e3;
        Latency {
            mean: h.mean() / 1e3,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// One measured run against one server (or one set of servers).
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub server: String,
    pub seconds: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    /// Keys fetched per second (a 10-key multi-get counts 10).
    pub get_keys_per_sec: f64,
    pub gets: u64,
    pub sets: u64,
    pub get_keys: u64,
    pub hits: u64,
    /// Hits over keys asked for.
    pub hit_ratio: f64,
    pub errors: u64,
    pub latency_us: Latency,
}

impl Outcome {
    pub fn new(server: String, span: Duration, t: &Tally) -> Outcome {
        let secs = span.as_secs_f64();
        let c = &t.counts;
        Outcome {
            server,
            seconds: secs,
            ops: c.ops,
            ops_per_sec: c.ops as f64 / secs,
            get_keys_per_sec: c.get_keys as f64 / secs,
            gets: c.gets,
            sets: c.sets,
            get_keys: c.get_keys,
            hits: c.hits,
            hit_ratio: if c.get_keys == 0 {
                0.0
            } else {
                c.hits as f64 / c.get_keys as f64
            },
            errors: c.errors,
            latency_us: Latency::of(&t.latency),
        }
    }

    pub fn print(&self) {
        let l = &self.latency_us;
        println!("server        {}", self.server);
        println!("duration      {:.2} s", self.seconds);
        println!(
            "throughput    {:.0} ops/s ({} ops: {} gets, {} sets)",
            self.ops_per_sec, self.ops, self.gets, self.sets
        );
        println!("keys fetched  {:.0} keys/s", self.get_keys_per_sec);
        println!(
            "hit ratio     {:.4} ({} of {} keys)",
            self.hit_ratio, self.hits, self.get_keys
        );
        println!("errors        {}", self.errors);
        println!(
            "latency µs    mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            l.mean, l.p50, l.p90, l.p99, l.p999, l.max
        );
    }
}

/// A metric compared across rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub metric: &'static str,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub a_median: f64,
    pub b_median: f64,
    /// b_median / a_median.
    pub ratio: f64,
    /// The lowest and highest per-round B/A.
    pub ratio_min: f64,
    pub ratio_max: f64,
}

type Metric = (&'static str, fn(&Outcome) -> f64);

const METRICS: &[Metric] = &[
    ("ops/s", |o| o.ops_per_sec),
    ("keys/s", |o| o.get_keys_per_sec),
    ("hit ratio", |o| o.hit_ratio),
    ("errors", |o| o.errors as f64),
    ("p50 µs", |o| o.latency_us.p50),
    ("p90 µs", |o| o.latency_us.p90),
    ("p99 µs", |o| o.latency_us.p99),
    ("p99.9 µs", |o| o.latency_us.p999),
    ("max µs", |o| o.latency_us.max),
];

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn ratio(b: f64, a: f64) -> f64 {
    if a == 0.0 {
        if b == 0.0 { 1.0 } else { f64::INFINITY }
    } else {
        b / a
    }
}

pub fn compare(a: &[Outcome], b: &[Outcome]) -> Vec<Row> {
    METRICS
        .iter()
        .map(|&(metric, f)| {
            let av: Vec<f64> = a.iter().map(f).collect();
            let bv: Vec<f64> = b.iter().map(f).collect();
            let per: Vec<f64> = av.iter().zip(&bv).map(|(&x, &y)| ratio(y, x)).collect();
            let (am, bm) = (median(&av), median(&bv));
            Row {
                metric,
                a_median: am,
                b_median: bm,
                ratio: ratio(bm, am),
                ratio_min: per.iter().copied().fold(f64::INFINITY, f64::min),
                ratio_max: per.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                a: av,
                b: bv,
            }
        })
        .collect()
}

/// `±x%`: half the min–max range over the median.
fn spread(v: &[f64]) -> String {
    let m = median(v);
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == 0.0 {
        return "-".into();
    }
    format!("±{:.1}%", (hi - lo) / m / 2.0 * 100.0)
}

fn num(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.4}")
    }
}

pub fn print_compare(names: (&str, &str), rows: &[Row]) {
    println!(
        "{:<10} {:>14} {:>8} {:>14} {:>8} {:>7} {:>15}",
        "metric",
        format!("A {}", names.0),
        "spread",
        format!("B {}", names.1),
        "spread",
        "B/A",
        "B/A per round"
    );
    for r in rows {
        println!(
            "{:<10} {:>14} {:>8} {:>14} {:>8} {:>7.3} {:>15}",
            r.metric,
            num(r.a_median),
            spread(&r.a),
            num(r.b_median),
            spread(&r.b),
            r.ratio,
            format!("{:.3}–{:.3}", r.ratio_min, r.ratio_max)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(ratio(0.0, 0.0), 1.0);
        assert_eq!(ratio(3.0, 2.0), 1.5);
        assert_eq!(spread(&[90.0, 100.0, 110.0]), "±10.0%");
    }
}
