//! Statistics for latency samples: summaries with percentiles, a bootstrap
//! confidence interval of the median, a distribution-free CI used by the
//! stopping rule, and outlier counting with modified z-scores.
//!
//! References: hyperfine (modified z-score outliers, threshold 3.5,
//! Iglewicz & Hoaglin), criterion (bootstrap), and the order-statistic CI of
//! a quantile (e.g. Conover, Practical Nonparametric Statistics, 3.2).

use serde::{Deserialize, Serialize};

pub mod compare;
pub mod ranks;
pub mod rounds;

/// Summary of a sample of latencies. Units are whatever the samples were in
/// (handoff records milliseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub stddev: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// 95% bootstrap percentile interval of the median.
    pub p50_ci95: [f64; 2],
    /// Coefficient of variation, stddev / mean.
    pub cov: f64,
    /// Samples with |modified z-score| > 3.5.
    pub outliers: usize,
}

/// Summarises samples; `None` for an empty sample.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let mean = sorted.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    let stddev = var.sqrt();
    let ci = bootstrap_median_ci(samples, 1000, 0.95, 0x5eed);
    Some(Summary {
        n,
        mean,
        stddev,
        min: sorted[0],
        p50: quantile_sorted(&sorted, 0.5),
        p90: quantile_sorted(&sorted, 0.90),
        p95: quantile_sorted(&sorted, 0.95),
        p99: quantile_sorted(&sorted, 0.99),
        p999: quantile_sorted(&sorted, 0.999),
        max: sorted[n - 1],
        p50_ci95: [ci.0, ci.1],
        cov: if mean > 0.0 { stddev / mean } else { 0.0 },
        outliers: count_outliers_sorted(&sorted),
    })
}

/// Quantile with linear interpolation between order statistics (R type 7,
/// numpy's default). `sorted` must be sorted ascending and non-empty.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    if n == 1 {
        return sorted[0];
    }
    let h = (n - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    quantile_sorted(&s, 0.5)
}

/// Distribution-free confidence interval of the median from order
/// statistics: the ranks come from the normal approximation to
/// Binomial(n, 1/2). Cheap (one sort), so the stopping rule can ask often.
/// Returns `None` below 6 samples, where no such interval reaches 95%.
pub fn median_ci_order_stat(sorted: &[f64], z: f64) -> Option<(f64, f64)> {
    let n = sorted.len();
    if n < 6 {
        return None;
    }
    let half = z * (n as f64).sqrt() / 2.0;
    let mid = n as f64 / 2.0;
    let lo = ((mid - half).floor() as isize - 1).max(0) as usize;
    let hi = ((mid + half).ceil() as usize).min(n - 1);
    Some((sorted[lo], sorted[hi]))
}

/// Bootstrap percentile interval of the median (deterministic for a seed).
pub fn bootstrap_median_ci(samples: &[f64], resamples: usize, level: f64, seed: u64) -> (f64, f64) {
    let n = samples.len();
    if n < 2 {
        let m = samples.first().copied().unwrap_or(f64::NAN);
        return (m, m);
    }
    let mut rng = SplitMix64(seed);
    let mut buf = vec![0.0; n];
    let mut medians: Vec<f64> = (0..resamples)
        .map(|_| {
            for slot in buf.iter_mut() {
                *slot = samples[(rng.next() % n as u64) as usize];
            }
            median_in_place(&mut buf)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    (
        quantile_sorted(&medians, alpha),
        quantile_sorted(&medians, 1.0 - alpha),
    )
}

fn median_in_place(v: &mut [f64]) -> f64 {
    let n = v.len();
    let mid = n / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    let upper = *m;
    if n % 2 == 1 {
        upper
    } else {
        let lower = v[..mid].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lower + upper) / 2.0
    }
}

/// Number of samples whose modified z-score exceeds 3.5.
pub fn count_outliers_sorted(sorted: &[f64]) -> usize {
    if sorted.len() < 3 {
        return 0;
    }
    let med = quantile_sorted(sorted, 0.5);
    let mut dev: Vec<f64> = sorted.iter().map(|x| (x - med).abs()).collect();
    dev.sort_by(f64::total_cmp);
    let mad = quantile_sorted(&dev, 0.5);
    if mad == 0.0 {
        return 0;
    }
    sorted
        .iter()
        .filter(|&&x| (0.6745 * (x - med) / mad).abs() > 3.5)
        .count()
}

pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller), for tests and simulations.
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Deterministic samples from known distributions, for tests and benches.
pub mod synth {
    use super::SplitMix64;

    pub fn normal(n: usize, mean: f64, sd: f64, seed: u64) -> Vec<f64> {
        let mut r = SplitMix64(seed);
        (0..n).map(|_| mean + sd * r.normal()).collect()
    }

    pub fn exponential(n: usize, mean: f64, seed: u64) -> Vec<f64> {
        let mut r = SplitMix64(seed);
        (0..n).map(|_| -mean * r.unit().ln()).collect()
    }

    pub fn uniform(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<f64> {
        let mut r = SplitMix64(seed);
        (0..n).map(|_| lo + (hi - lo) * r.unit()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_numpy_linear_rule() {
        let s: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile_sorted(&s, 0.5), 5.5);
        assert!((quantile_sorted(&s, 0.9) - 9.1).abs() < 1e-12);
        assert_eq!(quantile_sorted(&s, 0.0), 1.0);
        assert_eq!(quantile_sorted(&s, 1.0), 10.0);
    }

    #[test]
    fn summary_of_uniform_matches_theory() {
        let s = synth::uniform(20_000, 0.0, 1.0, 1);
        let sum = summarize(&s).unwrap();
        assert!((sum.mean - 0.5).abs() < 0.01, "{sum:?}");
        assert!((sum.stddev - (1.0f64 / 12.0).sqrt()).abs() < 0.01);
        assert!((sum.p90 - 0.9).abs() < 0.01);
        assert!((sum.p99 - 0.99).abs() < 0.005);
        assert_eq!(sum.outliers, 0);
    }

    #[test]
    fn exponential_median_is_ln2_times_mean() {
        let s = synth::exponential(20_000, 2.0, 3);
        let sum = summarize(&s).unwrap();
        let expected = 2.0 * std::f64::consts::LN_2;
        assert!((sum.p50 - expected).abs() < 0.05, "{sum:?}");
        assert!(sum.p50_ci95[0] <= sum.p50 && sum.p50 <= sum.p50_ci95[1]);
        // p99 of Exp(mean) is mean * ln(100).
        assert!((sum.p99 - 2.0 * 100f64.ln()).abs() < 0.4);
    }

    #[test]
    fn median_ci_covers_the_true_median_about_95_percent_of_the_time() {
        let mut covered_boot = 0;
        let mut covered_os = 0;
        let trials = 200;
        for seed in 0..trials {
            let s = synth::normal(101, 10.0, 1.0, seed);
            let (lo, hi) = bootstrap_median_ci(&s, 400, 0.95, seed);
            covered_boot += usize::from(lo <= 10.0 && 10.0 <= hi);
            let mut sorted = s.clone();
            sorted.sort_by(f64::total_cmp);
            let (lo, hi) = median_ci_order_stat(&sorted, 1.96).unwrap();
            covered_os += usize::from(lo <= 10.0 && 10.0 <= hi);
        }
        // Binomial(200, 0.95) lies in [180, 200] with overwhelming probability.
        assert!(
            covered_boot >= 176,
            "bootstrap coverage {covered_boot}/{trials}"
        );
        assert!(
            covered_os >= 180,
            "order-statistic coverage {covered_os}/{trials}"
        );
    }

    #[test]
    fn outliers_are_counted_with_modified_z() {
        let mut s = synth::normal(1000, 10.0, 0.1, 9);
        let clean = count_outliers_sorted(&{
            let mut c = s.clone();
            c.sort_by(f64::total_cmp);
            c
        });
        assert!(clean <= 3, "{clean}");
        s.extend([20.0, 25.0, 30.0]);
        s.sort_by(f64::total_cmp);
        assert_eq!(count_outliers_sorted(&s), clean + 3);
    }

    #[test]
    fn constant_samples_have_zero_spread() {
        let sum = summarize(&[5.0; 50]).unwrap();
        assert_eq!(sum.stddev, 0.0);
        assert_eq!(sum.p50_ci95, [5.0, 5.0]);
        assert_eq!(sum.outliers, 0);
        assert!(summarize(&[]).is_none());
    }
}
