//! Latency histograms and medians: plain data, no I/O, no clock.
//!
//! Workers record every call's latency into a [`Histogram`] (log-linear
//! buckets, at most 1/64 relative error, fixed memory, no allocation per
//! sample once the range is reached) and ship it to the harness, which merges
//! the histograms of concurrent clients before reading percentiles. Medians
//! over rounds are taken with [`median`].

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two; 64 keeps the error of a percentile under
/// 1/64 (1.6%) of its value.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

/// A histogram of nanosecond values with log-linear buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

/// The wire form of a [`Histogram`]: only the non-empty buckets, as
/// `(bucket index, count)` pairs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SparseHistogram(pub Vec<(u32, u64)>);

fn bucket_of(value: u64) -> usize {
    if value < 2 * SUB {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = (value >> shift) - SUB;
    ((u64::from(shift) + 1) * SUB + sub) as usize
}

/// The value a bucket stands for: the middle of the range it covers.
fn value_of(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < 2 * SUB {
        return bucket;
    }
    let shift = bucket / SUB - 1;
    let sub = bucket % SUB + SUB;
    (sub << shift) + (1u64 << shift) / 2
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one value (nanoseconds).
    pub fn record(&mut self, value: u64) {
        let bucket = bucket_of(value);
        if bucket >= self.counts.len() {
            self.counts.resize(bucket + 1, 0);
        }
        self.counts[bucket] += 1;
        self.total += 1;
    }

    /// Number of recorded values.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Adds every value of `other` to `self`.
    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    /// The value below which a fraction `q` (0..=1) of the samples lie, or
    /// `None` for an empty histogram.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(value_of(bucket));
            }
        }
        None
    }

    /// The non-empty buckets, for sending to another process.
    pub fn to_sparse(&self) -> SparseHistogram {
        SparseHistogram(
            self.counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(b, &c)| (b as u32, c))
                .collect(),
        )
    }

    /// Rebuilds a histogram sent by [`Histogram::to_sparse`].
    pub fn from_sparse(sparse: &SparseHistogram) -> Self {
        let mut h = Histogram::new();
        for &(bucket, count) in &sparse.0 {
            let bucket = bucket as usize;
            if bucket >= h.counts.len() {
                h.counts.resize(bucket + 1, 0);
            }
            h.counts[bucket] += count;
            h.total += count;
        }
        h
    }
}

/// The median of `values` (mean of the middle two for an even count), or
/// `None` when empty. NaNs are ignored.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact() {
        for v in 0..128 {
            assert_eq!(value_of(bucket_of(v)), v);
        }
    }

    #[test]
    fn buckets_are_monotonic_and_within_error() {
        let mut last = 0;
        for exp in 7..40 {
            for step in 0..97u64 {
                let v = (1u64 << exp) + step * ((1u64 << exp) / 97);
                let b = bucket_of(v);
                assert!(b >= last, "bucket order at {v}");
                last = b;
                let back = value_of(b) as f64;
                let err = (back - v as f64).abs() / v as f64;
                assert!(err <= 1.0 / 64.0, "error {err} at {v}");
            }
        }
    }

    #[test]
    fn quantiles_of_uniform_values() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        let p99 = h.quantile(0.99).unwrap() as f64;
        assert!((p50 - 5_000_000.0).abs() / 5_000_000.0 < 0.02, "{p50}");
        assert!((p99 - 9_900_000.0).abs() / 9_900_000.0 < 0.02, "{p99}");
        assert_eq!(Histogram::new().quantile(0.5), None);
    }

    #[test]
    fn merge_and_sparse_round_trip() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in [5, 500, 50_000] {
            a.record(v);
        }
        b.record(5_000_000);
        a.merge(&b);
        assert_eq!(a.len(), 4);
        let back = Histogram::from_sparse(&a.to_sparse());
        assert_eq!(back, a);
        assert_eq!(back.quantile(1.0), a.quantile(1.0));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }
}
