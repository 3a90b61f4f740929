//! Statistics of interleaved rounds.
//!
//! A machine whose speed drifts over minutes makes the samples of one block
//! correlated: a CI computed from all samples as if they were independent is
//! far too narrow. Each round runs a block of every case of a group, so the
//! block medians are the units: a case's CI comes from the spread of its
//! block medians, and two cases are compared through their per-round ratios,
//! in which the drift common to both cancels.
//!
//! Both intervals are Student t intervals on logarithms (latency ratios are
//! multiplicative), then exponentiated: a case's interval is
//! `p50 x exp(+-t(R-1) s / sqrt R)`, `s` the standard deviation of the log block
//! medians; a pair's ratio is the geometric mean of the per-round ratios
//! `exp(mean d)` with `exp(mean d +- t(R-1) s_d / sqrt R)`, `d = ln(b_r / a_r)`.

use serde::{Deserialize, Serialize};

/// Fewer rounds than this give no interval (t with 1 degree of freedom is
/// 12.7: an interval that says nothing).
pub const MIN_ROUNDS: usize = 3;

/// The 97.5th percentile of Student's t with `df` degrees of freedom (the
/// two-sided 95% critical value): a table to 30, Cornish-Fisher beyond.
pub fn t_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => {
            let z: f64 = 1.959_964;
            let d = df as f64;
            z + (z.powi(3) + z) / (4.0 * d)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * d * d)
        }
    }
}

/// Mean and t half-width of the logarithms of positive values.
fn log_mean_half_width(values: &[f64]) -> Option<(f64, f64)> {
    if values.len() < MIN_ROUNDS || values.iter().any(|v| !(*v > 0.0) || !v.is_finite()) {
        return None;
    }
    let logs: Vec<f64> = values.iter().map(|v| v.ln()).collect();
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let var = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((mean, t_975(logs.len() - 1) * (var / n).sqrt()))
}

/// The 95% CI of a case's median from its block medians, centred on `p50`
/// (the median of all its samples). `None` below [`MIN_ROUNDS`].
pub fn round_ci(p50: f64, block_medians: &[f64]) -> Option<[f64; 2]> {
    let (_, h) = log_mean_half_width(block_medians)?;
    Some([p50 * (-h).exp(), p50 * h.exp()])
}

/// What a paired comparison concludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// `b` is faster than `a`: the whole CI of `b / a` is below 1.
    #[serde(rename = "faster")]
    Faster,
    /// `b` is slower than `a`: the whole CI is above 1.
    #[serde(rename = "slower")]
    Slower,
    #[serde(rename = "no measurable difference")]
    NoMeasurableDifference,
}

impl Verdict {
    pub fn of(ci: [f64; 2]) -> Self {
        if ci[1] < 1.0 {
            Verdict::Faster
        } else if ci[0] > 1.0 {
            Verdict::Slower
        } else {
            Verdict::NoMeasurableDifference
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Faster => "faster",
            Verdict::Slower => "slower",
            Verdict::NoMeasurableDifference => "no measurable difference",
        }
    }
}

/// `b / a` of two cases' latencies, from rounds where both ran.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedRatio {
    /// Geometric mean of the per-round ratios.
    pub ratio: f64,
    pub ci95: [f64; 2],
    /// Rounds that entered (both sides had samples).
    pub rounds: usize,
    pub verdict: Verdict,
}

impl PairedRatio {
    /// Half the CI's width relative to the ratio (0.03 = +-3%).
    pub fn half_width(&self) -> f64 {
        (self.ci95[1] - self.ci95[0]) / 2.0 / self.ratio
    }
}

/// The ratio `b / a` from per-round medians (`NaN` marks a round a side
/// did not run; such rounds are left out). `None` below [`MIN_ROUNDS`]
/// common rounds.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> Option<PairedRatio> {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.is_finite() && y.is_finite() && **x > 0.0 && **y > 0.0)
        .map(|(x, y)| y / x)
        .collect();
    let (mean, h) = log_mean_half_width(&ratios)?;
    let ci95 = [(mean - h).exp(), (mean + h).exp()];
    Some(PairedRatio {
        ratio: mean.exp(),
        ci95,
        rounds: ratios.len(),
        verdict: Verdict::of(ci95),
    })
}

/// Spread of a series of canary times: each value relative to their
/// median, as the smallest and largest fraction (e.g. -0.04, +0.09).
pub fn relative_range(values: &[f64]) -> Option<(f64, f64)> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let m = crate::median(&v);
    if m <= 0.0 {
        return None;
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((lo / m - 1.0, hi / m - 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix64;

    #[test]
    fn t_quantiles_match_the_table_and_approach_the_normal() {
        assert_eq!(t_975(1), 12.706);
        assert_eq!(t_975(9), 2.262);
        assert!((t_975(40) - 2.021).abs() < 2e-3);
        assert!((t_975(120) - 1.980).abs() < 1e-3);
        assert!((t_975(100_000) - 1.96).abs() < 1e-3);
    }

    /// Per-round medians of two cases on a machine whose speed drifts by
    /// +-20% (shared by both), each with 2% independent noise.
    fn drifting_pair(rounds: usize, true_ratio: f64, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut rng = SplitMix64(seed);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for r in 0..rounds {
            let drift = 1.0 + 0.2 * (r as f64 / 3.0).sin();
            a.push(10.0 * drift * (1.0 + 0.02 * rng.normal()));
            b.push(10.0 * true_ratio * drift * (1.0 + 0.02 * rng.normal()));
        }
        (a, b)
    }

    #[test]
    fn paired_ratio_cancels_drift_and_covers_the_true_ratio() {
        let mut covered = 0;
        let mut found = 0;
        for seed in 0..400 {
            let (a, b) = drifting_pair(12, 1.0, seed);
            let r = paired_ratio(&a, &b).unwrap();
            covered += usize::from(r.ci95[0] <= 1.0 && 1.0 <= r.ci95[1]);
            // Despite +-20% drift the interval is a few percent wide.
            assert!(r.half_width() < 0.05, "{r:?}");
            let (a, b) = drifting_pair(12, 1.05, seed + 10_000);
            found += usize::from(paired_ratio(&a, &b).unwrap().verdict == Verdict::Slower);
        }
        // Nominal 95%: 380 of 400 expected; allow binomial slack.
        assert!((366..=396).contains(&covered), "coverage {covered}/400");
        assert!(found >= 390, "5% found in {found}/400");
    }

    #[test]
    fn per_case_interval_widens_with_drift() {
        let (a, _) = drifting_pair(12, 1.0, 7);
        let quiet: Vec<f64> = (0..12).map(|i| 10.0 + 0.01 * f64::from(i % 3)).collect();
        let wide = round_ci(10.0, &a).unwrap();
        let narrow = round_ci(10.0, &quiet).unwrap();
        assert!(wide[1] - wide[0] > 20.0 * (narrow[1] - narrow[0]));
        assert!(wide[0] < 10.0 && wide[1] > 10.0);
    }

    #[test]
    fn rounds_one_side_missed_are_left_out_and_few_rounds_give_none() {
        let a = [10.0, f64::NAN, 10.0, 10.2, 9.9];
        let b = [20.0, 5.0, 20.0, 20.4, 19.8];
        let r = paired_ratio(&a, &b).unwrap();
        assert_eq!(r.rounds, 4);
        assert!((r.ratio - 2.0).abs() < 1e-9);
        assert_eq!(r.verdict, Verdict::Slower);
        assert!(paired_ratio(&a[..2], &b[..2]).is_none());
        assert!(round_ci(1.0, &[1.0, 1.0]).is_none());
    }

    #[test]
    fn verdicts_need_the_whole_interval_on_one_side() {
        assert_eq!(Verdict::of([0.9, 0.99]), Verdict::Faster);
        assert_eq!(Verdict::of([1.01, 1.2]), Verdict::Slower);
        assert_eq!(Verdict::of([0.99, 1.01]), Verdict::NoMeasurableDifference);
        assert_eq!(
            serde_json::to_string(&Verdict::NoMeasurableDifference).unwrap(),
            "\"no measurable difference\""
        );
    }

    #[test]
    fn relative_range_is_against_the_median() {
        let (lo, hi) = relative_range(&[9.0, 10.0, 10.0, 12.0]).unwrap();
        assert!((lo + 0.1).abs() < 1e-12 && (hi - 0.2).abs() < 1e-12);
        assert!(relative_range(&[]).is_none());
    }
}
