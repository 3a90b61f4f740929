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
    let nm = (n * m) as f64;
    let shift = crate::quantile_sorted(&diffs, 0.5);
    // Normal approximation to the Mann-Whitney U distribution.
    let sd = (nm * (n + m + 1) as f64 / 12.0).sqrt();
    let k = ((nm / 2.0) - z * sd).floor().max(0.0) as usize;
    let lo = diffs[k.min(diffs.len() - 1)];
    let hi = diffs[(diffs.len() - 1).saturating_sub(k)];
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
    fn too_few_samples_give_no_estimate() {
        assert!(hodges_lehmann_ratio(&[1.0], &[1.0, 2.0], 1.96).is_none());
    }
}
