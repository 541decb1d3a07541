//! Latency summaries.

use serde::Serialize;

/// Percentiles of a latency sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    /// Summarises latencies given in microseconds (sorts them in place).
    pub fn from_micros(sample: &mut [u64]) -> Summary {
        if sample.is_empty() {
            return Summary::default();
        }
        sample.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        // Nearest-rank percentile: the smallest value with at least p% of the sample at or below it.
        let pct = |p: f64| {
            let rank = ((p / 100.0) * sample.len() as f64).ceil() as usize;
            ms(sample[rank.clamp(1, sample.len()) - 1])
        };
        let sum: u128 = sample.iter().map(|&v| v as u128).sum();
        Summary {
            count: sample.len(),
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p95_ms: pct(95.0),
            p99_ms: pct(99.0),
            max_ms: ms(*sample.last().expect("not empty")),
            mean_ms: sum as f64 / sample.len() as f64 / 1000.0,
        }
    }
}

/// Median of a few runs' values (the benchmarks repeat every measurement at least three times).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s: Vec<u64> = (1..=100).map(|v| v * 1000).collect();
        let sum = Summary::from_micros(&mut s);
        assert_eq!(sum.count, 100);
        assert_eq!(sum.p50_ms, 50.0);
        assert_eq!(sum.p90_ms, 90.0);
        assert_eq!(sum.p95_ms, 95.0);
        assert_eq!(sum.p99_ms, 99.0);
        assert_eq!(sum.max_ms, 100.0);
        assert_eq!(sum.mean_ms, 50.5);
        assert_eq!(Summary::from_micros(&mut []), Summary::default());
    }

    #[test]
    fn median_of_runs() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
