//! Two-sample comparison of latencies: the Hodges-Lehmann estimate of the
//! shift of log latencies (a ratio, robust to outliers) with its
//! distribution-free confidence interval from the Mann-Whitney statistic.

/// Ratio head/base of typical latencies with a confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatioEstimate {
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
}

/// At most this many samples per side enter the pairwise differences
/// (evenly spaced in run order), keeping the cost at ~1M pairs.
pub const MAX_SAMPLES: usize = 1000;

fn thin(samples: &[f64]) -> Vec<f64> {
    if samples.len() <= MAX_SAMPLES {
        return samples
            .iter()
            .filter(|x| **x > 0.0)
            .map(|x| x.ln())
            .collect();
    }
    let step = samples.len() as f64 / MAX_SAMPLES as f64;
    (0..MAX_SAMPLES)
        .map(|i| samples[(i as f64 * step) as usize])
        .filter(|x| *x > 0.0)
        .map(f64::ln)
        .collect()
}

/// Hodges-Lehmann ratio of `head` to `base` with a `z`-level CI
/// (z = 1.96 for 95%). `None` when a side has fewer than 2 samples.
pub fn hodges_lehmann_ratio(base: &[f64], head: &[f64], z: f64) -> Option<RatioEstimate> {
    let (b, h) = (thin(base), thin(head));
    let (n, m) = (b.len(), h.len());
    if n < 2 || m < 2 {
        return None;
    }
    let mut diffs: Vec<f64> = Vec::with_capacity(n * m);
    for y in &h {
        for x in &b {
            diffs.push(y - x);
        }
    }
    diffs.sort_by(f64::total_cmp);
    let shift = crate::quantile_sorted(&diffs, 0.5);
    // The q-th smallest and largest differences (1-based), q from the
    // Mann-Whitney U distribution (exact for small samples).
    let q = crate::ranks::rank_sum_q(n, m, crate::ranks::normal_cdf(-z));
    let last = diffs.len() - 1;
    let lo = diffs[(q - 1).min(last)];
    let hi = diffs[last.saturating_sub(q - 1)];
    Some(RatioEstimate {
        ratio: shift.exp(),
        lo: lo.exp(),
        hi: hi.exp(),
    })
}

/// Bootstrap percentile CI of `stat(head) / stat(base)` (for metrics such as
/// p99 that have no rank-based interval).
pub fn bootstrap_ratio<F: Fn(&[f64]) -> f64>(
    base: &[f64],
    head: &[f64],
    stat: F,
    seed: u64,
) -> Option<RatioEstimate> {
    if base.len() < 2 || head.len() < 2 {
        return None;
    }
    let mut rng = crate::SplitMix64(seed);
    let mut draw = |s: &[f64]| -> Vec<f64> {
        (0..s.len())
            .map(|_| s[(rng.next() % s.len() as u64) as usize])
            .collect()
    };
    let mut ratios: Vec<f64> = (0..500)
        .map(|_| stat(&draw(head)) / stat(&draw(base)))
        .collect();
    ratios.sort_by(f64::total_cmp);
    Some(RatioEstimate {
        ratio: stat(head) / stat(base),
        lo: crate::quantile_sorted(&ratios, 0.025),
        hi: crate::quantile_sorted(&ratios, 0.975),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;

    #[test]
    fn a_ten_percent_shift_with_cov_3_percent_is_detected() {
        let base = synth::normal(100, 10.0, 0.3, 1);
        let head = synth::normal(100, 11.0, 0.33, 2);
        let r = hodges_lehmann_ratio(&base, &head, 1.96).unwrap();
        assert!((r.ratio - 1.1).abs() < 0.02, "{r:?}");
        assert!(
            r.lo > 1.05,
            "CI must exclude no-change and small changes: {r:?}"
        );
    }

    #[test]
    fn identical_samples_are_never_a_change() {
        let s = synth::normal(100, 10.0, 0.3, 3);
        let r = hodges_lehmann_ratio(&s, &s, 1.96).unwrap();
        assert!((r.ratio - 1.0).abs() < 1e-12);
        assert!(r.lo <= 1.0 && r.hi >= 1.0);
    }

    #[test]
    fn same_distribution_ci_covers_one_about_95_percent_of_the_time() {
        let mut covered = 0;
        for seed in 0..200 {
            let a = synth::exponential(60, 1.0, seed * 2);
            let b = synth::exponential(60, 1.0, seed * 2 + 1);
            let r = hodges_lehmann_ratio(&a, &b, 1.96).unwrap();
            covered += usize::from(r.lo <= 1.0 && 1.0 <= r.hi);
        }
        assert!(covered >= 180, "{covered}/200");
    }

    #[test]
    fn the_interval_is_the_24th_smallest_and_largest_difference_at_ten_and_ten() {
        // Two samples of 10 with distinct pairwise log differences: the
        // exact 95% Mann-Whitney interval is the 24th smallest to the 24th
        // largest difference (U critical value 23 at n = m = 10).
        let base: Vec<f64> = (0..10).map(|i| f64::from(i).exp()).collect();
        let head: Vec<f64> = (0..10).map(|j| (0.1 * f64::from(j) + 0.05).exp()).collect();
        let mut diffs: Vec<f64> = head
            .iter()
            .flat_map(|h| base.iter().map(move |b| h.ln() - b.ln()))
            .collect();
        diffs.sort_by(f64::total_cmp);
        let r = hodges_lehmann_ratio(&base, &head, 1.96).unwrap();
        assert!(
            (r.lo.ln() - diffs[23]).abs() < 1e-12,
            "{} vs {}",
            r.lo.ln(),
            diffs[23]
        );
        assert!((r.hi.ln() - diffs[100 - 24]).abs() < 1e-12);
    }

    #[test]
    fn too_few_samples_give_no_estimate() {
        assert!(hodges_lehmann_ratio(&[1.0], &[1.0, 2.0], 1.96).is_none());
    }
}
