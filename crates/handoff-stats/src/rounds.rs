//! Statistics of interleaved rounds.
//!
//! A machine whose speed drifts over minutes makes the samples of one block
//! correlated: a CI computed from all samples as if they were independent is
//! far too narrow. Each round runs a block of every case of a group, so the
//! block medians are the units: a case's CI comes from the spread of its
//! block medians, and two cases are compared through their per-round ratios,
//! in which the drift common to both cancels.
//!
//! Both intervals are Hodges-Lehmann estimates with the Wilcoxon
//! signed-rank 95% interval, on logarithms (latency ratios are
//! multiplicative), then exponentiated: the median of the Walsh averages
//! `(d_i + d_j) / 2, i <= j` and the order statistics the signed-rank
//! distribution puts at 2.5% and 97.5% (normal approximation). On these VMs
//! a round's ratio is heavy-tailed (a block that meets a busy neighbour on
//! the host is 20-40% slow): the signed-rank interval is distribution-free
//! for symmetric differences and does not widen for such outliers as a t
//! interval does (measured: about half the width at one thread). A pair's
//! ratio is `b_r / a_r` per round; a case's interval is the one of its log
//! block medians, moved to centre on `p50`.

use serde::{Deserialize, Serialize};

/// Fewer rounds than this give no interval.
pub const MIN_ROUNDS: usize = 3;

/// Hodges-Lehmann centre and signed-rank 95% bounds of the logarithms of
/// positive values: `(centre, lo, hi)`. Below 6 values the bounds are the
/// extreme Walsh averages (coverage 1 - 2^(1-n): 94% at 5, 75% at 3).
fn log_hodges_lehmann(values: &[f64]) -> Option<(f64, f64, f64)> {
    if values.len() < MIN_ROUNDS
        || values
            .iter()
            .any(|v| v.is_nan() || *v <= 0.0 || v.is_infinite())
    {
        return None;
    }
    let logs: Vec<f64> = values.iter().map(|v| v.ln()).collect();
    let n = logs.len();
    let mut walsh = Vec::with_capacity(n * (n + 1) / 2);
    for i in 0..n {
        for j in i..n {
            walsh.push((logs[i] + logs[j]) / 2.0);
        }
    }
    walsh.sort_by(f64::total_cmp);
    // The q-th smallest and largest Walsh averages (1-based), q from the
    // signed-rank distribution (exact up to 200 rounds).
    let q = crate::ranks::signed_rank_q(n, 0.025);
    let last = walsh.len() - 1;
    Some((
        crate::quantile_sorted(&walsh, 0.5),
        walsh[(q - 1).min(last)],
        walsh[last.saturating_sub(q - 1)],
    ))
}

/// The 95% CI of a case's median from its block medians, centred on `p50`
/// (the median of all its samples). `None` below [`MIN_ROUNDS`].
pub fn round_ci(p50: f64, block_medians: &[f64]) -> Option<[f64; 2]> {
    let (c, lo, hi) = log_hodges_lehmann(block_medians)?;
    Some([p50 * (lo - c).exp(), p50 * (hi - c).exp()])
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
    /// Hodges-Lehmann estimate of the per-round ratios (on logs).
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
    let (c, lo, hi) = log_hodges_lehmann(&ratios)?;
    let ci95 = [lo.exp(), hi.exp()];
    Some(PairedRatio {
        ratio: c.exp(),
        ci95,
        rounds: ratios.len(),
        verdict: Verdict::of(ci95),
    })
}

/// A variance of a log latency (or of a log ratio) that comes from the
/// worker processes' own speeds, with the degrees of freedom of its
/// estimate. A variance estimated from three processes is itself very
/// uncertain (two degrees of freedom: one estimate in ten is below a tenth
/// of the true variance), so an interval that carries it uses Student's t
/// for those degrees of freedom, not the normal quantile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessVariance {
    pub var: f64,
    /// Degrees of freedom of `var`'s estimate; infinite when it is known.
    pub df: f64,
}

impl ProcessVariance {
    /// No process component.
    pub const NONE: Self = Self {
        var: 0.0,
        df: f64::INFINITY,
    };

    /// A variance taken as known exactly: normal quantiles.
    pub fn known(var: f64) -> Self {
        Self {
            var,
            df: f64::INFINITY,
        }
    }

    /// The variance of a mean over `n` processes' speeds (same degrees of
    /// freedom).
    pub fn over(self, n: u32) -> Self {
        Self {
            var: self.var / f64::from(n.max(1)),
            ..self
        }
    }

    /// The sum of two independent components, its degrees of freedom by
    /// Welch-Satterthwaite.
    pub fn plus(self, other: Self) -> Self {
        let var = self.var + other.var;
        let part = |v: Self| {
            if v.var > 0.0 {
                v.var * v.var / v.df
            } else {
                0.0
            }
        };
        let d = part(self) + part(other);
        Self {
            var,
            df: if d > 0.0 {
                var * var / d
            } else {
                f64::INFINITY
            },
        }
    }
}

/// Student's t 97.5% quantile for `df` degrees of freedom, any real
/// `df >= 1` (less is taken as 1, infinite gives the normal quantile):
/// exact at 1 and 2, the Cornish-Fisher expansion from 3 on (within 0.1%
/// there), interpolated in `1 / df` between.
pub fn t975(df: f64) -> f64 {
    if df.is_nan() || df > 1e9 {
        return Z95;
    }
    let cornish_fisher = |v: f64| {
        let z = Z95;
        let (z3, z5, z7, z9) = (z.powi(3), z.powi(5), z.powi(7), z.powi(9));
        z + (z3 + z) / (4.0 * v)
            + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * v * v)
            + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * v.powi(3))
            + (79.0 * z9 + 776.0 * z7 + 1482.0 * z5 - 1920.0 * z3 - 945.0 * z)
                / (92160.0 * v.powi(4))
    };
    const T1: f64 = 12.706_205;
    const T2: f64 = 4.302_653;
    let lerp =
        |(x0, y0): (f64, f64), (x1, y1): (f64, f64), x: f64| y0 + (y1 - y0) * (x - x0) / (x1 - x0);
    let df = df.max(1.0);
    if df >= 3.0 {
        cornish_fisher(df)
    } else if df >= 2.0 {
        lerp((0.5, T2), (1.0 / 3.0, cornish_fisher(3.0)), 1.0 / df)
    } else {
        lerp((1.0, T1), (0.5, T2), 1.0 / df)
    }
}

/// Widens a log-scale interval `(centre, lo, hi)` by an independent
/// variance component `extra` (of the log): each side's distance from the
/// centre is scaled by `t sqrt(se^2 + extra) / (z se)`, where `se` is the
/// interval's own standard error (half its width / 1.96), so its asymmetry
/// is kept, and `t` is Student's quantile for the sum's degrees of freedom
/// (Welch-Satterthwaite; the interval's own, from dozens of rounds, count
/// as exact).
pub(crate) fn widen_log(c: f64, lo: f64, hi: f64, extra: ProcessVariance) -> (f64, f64) {
    let v = extra.var;
    if v.is_nan() || v <= 0.0 {
        return (lo, hi);
    }
    let se = (hi - lo) / (2.0 * Z95);
    if se <= 0.0 {
        let h = t975(extra.df) * v.sqrt();
        return (c - h, c + h);
    }
    let df = extra.df * (1.0 + se * se / v).powi(2);
    let f = t975(df) * (se * se + v).sqrt() / (Z95 * se);
    (c - (c - lo) * f, c + (hi - c) * f)
}

const Z95: f64 = 1.959_964;

/// [`round_ci`] with the variance the case's median carries from its
/// worker processes' own speeds (see [`process_variances`]; already over
/// the number of processes): its median is an average over that many
/// process speeds, which the block medians of so few processes cannot show.
pub fn round_ci_with_processes(
    p50: f64,
    block_medians: &[f64],
    process: ProcessVariance,
) -> Option<[f64; 2]> {
    let (c, lo, hi) = log_hodges_lehmann(block_medians)?;
    let (lo, hi) = widen_log(c, lo, hi, process);
    Some([p50 * (lo - c).exp(), p50 * (hi - c).exp()])
}

impl PairedRatio {
    /// The interval widened by an independent variance component of the log
    /// ratio (e.g. the between-process variance of both sides); the verdict
    /// follows the wider interval.
    pub fn widened(self, extra: ProcessVariance) -> Self {
        let c = self.ratio.ln();
        let (lo, hi) = widen_log(c, self.ci95[0].ln(), self.ci95[1].ln(), extra);
        let ci95 = [lo.exp(), hi.exp()];
        Self {
            ci95,
            verdict: Verdict::of(ci95),
            ..self
        }
    }
}

/// Each case's variance of the log latency between its worker processes,
/// estimated within a group: `series[c][r]` is case `c`'s round `r` as
/// `(process, block median)`, `None` when it did not run.
///
/// Each process of a VM keeps a speed of its own for its whole life (where
/// its memory landed: 1-3% here; now and then one process of a
/// two-threaded case runs 15-55% slower than its siblings for its whole
/// life), a component that per-round medians from one process cannot show.
/// Per case, a method of moments: each round's block median less the case's
/// own median and the round's drift (the median of the other cases'
/// deviations in that round, so a case never explains its own process away)
/// is split by the process that ran it; the variance of the processes'
/// median residuals, less what their own sampling noise explains
/// ((pi/2) (1.4826 MAD)^2 / n per median), is the case's estimate.
///
/// Estimated per case, not pooled over the group: one case with a slow
/// process must widen its own intervals, not every interval of the group
/// (pooled, such a case made the one-thread pairs' intervals 3x too wide).
/// From two or three processes one case's estimate is noisy and often 0,
/// so each is at least the group's typical value: the mean of the lower
/// three quarters of the cases' estimates (the quarter left out is where
/// such a slow process shows). `None` for a case without two processes of
/// three rounds each (every case, with one process); never below 0.
///
/// Degrees of freedom: a case's own estimate from `k` processes has
/// `k - 1`; the group's typical value, a mean of several cases' estimates,
/// has theirs combined (Welch-Satterthwaite), which is what makes two or
/// three processes per case usable at all.
pub fn process_variances(series: &[Vec<Option<(usize, f64)>>]) -> Vec<Option<ProcessVariance>> {
    let logs: Vec<Vec<Option<(usize, f64)>>> = series
        .iter()
        .map(|s| {
            s.iter()
                .map(|v| {
                    v.filter(|(_, m)| m.is_finite() && *m > 0.0)
                        .map(|(k, m)| (k, m.ln()))
                })
                .collect()
        })
        .collect();
    // Each block's deviation from its case's median, computed once; a
    // round's drift for case `c` is the median of the others' deviations.
    let deviations: Vec<Vec<Option<(usize, f64)>>> = logs
        .iter()
        .map(|s| {
            let v: Vec<f64> = s.iter().flatten().map(|(_, l)| *l).collect();
            let centre = if v.is_empty() { 0.0 } else { crate::median(&v) };
            s.iter().map(|x| x.map(|(k, l)| (k, l - centre))).collect()
        })
        .collect();
    let own: Vec<Option<ProcessVariance>> = deviations
        .iter()
        .enumerate()
        .map(|(c, s)| {
            let mut parts: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
            for (r, v) in s.iter().enumerate() {
                let Some((k, dev)) = v else { continue };
                let others: Vec<f64> = deviations
                    .iter()
                    .enumerate()
                    .filter(|(d, _)| *d != c)
                    .filter_map(|(_, o)| o.get(r).copied().flatten().map(|(_, x)| x))
                    .collect();
                let drift = if others.is_empty() {
                    0.0
                } else {
                    crate::median(&others)
                };
                parts.entry(*k).or_default().push(dev - drift);
            }
            let located: Vec<(f64, f64)> = parts
                .values()
                .filter(|d| d.len() >= MIN_ROUNDS)
                .map(|d| {
                    let m = crate::median(d);
                    let dev: Vec<f64> = d.iter().map(|x| (x - m).abs()).collect();
                    let sd = 1.4826 * crate::median(&dev);
                    (m, std::f64::consts::FRAC_PI_2 * sd * sd / d.len() as f64)
                })
                .collect();
            if located.len() < 2 {
                return None;
            }
            let n = located.len() as f64;
            let mean = located.iter().map(|(m, _)| m).sum::<f64>() / n;
            let between = located.iter().map(|(m, _)| (m - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let noise = located.iter().map(|(_, v)| v).sum::<f64>() / n;
            Some(ProcessVariance {
                var: (between - noise).max(0.0),
                df: n - 1.0,
            })
        })
        .collect();
    let mut known: Vec<ProcessVariance> = own.iter().flatten().copied().collect();
    if known.is_empty() {
        return own;
    }
    known.sort_by(|a, b| a.var.total_cmp(&b.var));
    let lower = &known[..(known.len() * 3).div_ceil(4)];
    let typical = lower
        .iter()
        .fold(ProcessVariance::NONE, |sum, v| sum.plus(*v))
        .over(lower.len() as u32);
    own.into_iter()
        .map(|v| v.map(|v| if v.var >= typical.var { v } else { typical }))
        .collect()
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

    /// A group of `cases` cases, each on `procs` processes used in turn,
    /// every process with a speed of its own (sd `process_sd` of the log),
    /// the machine drifting +-20% and 2% noise per block; case 1 is
    /// `ratio` x case 0.
    fn group_with_processes(
        cases: usize,
        procs: usize,
        rounds: usize,
        process_sd: f64,
        ratio: f64,
        seed: u64,
    ) -> Vec<Vec<Option<(usize, f64)>>> {
        let mut rng = SplitMix64(seed);
        let speed: Vec<Vec<f64>> = (0..cases)
            .map(|_| {
                (0..procs)
                    .map(|_| (process_sd * rng.normal()).exp())
                    .collect()
            })
            .collect();
        let mut out = vec![Vec::new(); cases];
        for r in 0..rounds {
            let drift = 1.0 + 0.2 * (r as f64 / 3.0).sin();
            for (c, series) in out.iter_mut().enumerate() {
                let k = r % procs;
                let base = if c == 1 { 10.0 * ratio } else { 10.0 };
                let m = base * drift * speed[c][k] * (1.0 + 0.02 * rng.normal());
                series.push(Some((k, m)));
            }
        }
        out
    }

    fn medians_of(s: &[Option<(usize, f64)>]) -> Vec<f64> {
        s.iter().map(|v| v.map_or(f64::NAN, |(_, m)| m)).collect()
    }

    /// The variances of cases 0 and 1, which every test pair compares.
    fn pair_var(g: &[Vec<Option<(usize, f64)>>]) -> (ProcessVariance, ProcessVariance) {
        let v = process_variances(g);
        (v[0].unwrap(), v[1].unwrap())
    }

    #[test]
    fn process_variance_is_found_and_restores_coverage() {
        let (mut plain, mut widened, mut found) = (0, 0, 0);
        let mut estimates = Vec::new();
        for seed in 0..300 {
            let g = group_with_processes(8, 3, 30, 0.02, 1.0, seed);
            let (va, vb) = pair_var(&g);
            estimates.push(va.var.sqrt());
            let r = paired_ratio(&medians_of(&g[0]), &medians_of(&g[1])).unwrap();
            plain += usize::from(r.verdict == Verdict::NoMeasurableDifference);
            let w = r.widened(va.plus(vb).over(3));
            assert!(w.ci95[0] <= r.ci95[0] && w.ci95[1] >= r.ci95[1]);
            widened += usize::from(w.verdict == Verdict::NoMeasurableDifference);
            let g = group_with_processes(8, 3, 30, 0.02, 1.10, seed + 50_000);
            let (va, vb) = pair_var(&g);
            let r = paired_ratio(&medians_of(&g[0]), &medians_of(&g[1])).unwrap();
            found += usize::from(r.widened(va.plus(vb).over(3)).verdict == Verdict::Slower);
        }
        let sd = crate::median(&estimates);
        assert!(
            (0.014..0.030).contains(&sd),
            "median estimate of a 2% sd: {sd}"
        );
        // Without the process component the interval misses a 2% process
        // spread often; with it, about the nominal 95%.
        assert!(plain < 240, "plain coverage {plain}/300");
        assert!(
            (276..=299).contains(&widened),
            "widened coverage {widened}/300"
        );
        assert!(found >= 285, "10% found in {found}/300");
    }

    #[test]
    fn t_quantiles_match_the_tables_and_widening_follows_the_degrees_of_freedom() {
        for (df, t) in [
            (1.0, 12.706),
            (2.0, 4.303),
            (3.0, 3.182),
            (4.0, 2.776),
            (6.0, 2.447),
            (10.0, 2.228),
            (30.0, 2.042),
            (f64::INFINITY, 1.960),
        ] {
            assert!((t975(df) / t - 1.0).abs() < 2e-3, "df {df}: {}", t975(df));
        }
        // Between table points it moves monotonically.
        let ts: Vec<f64> = (10..60).map(|i| t975(f64::from(i) / 10.0)).collect();
        assert!(ts.windows(2).all(|w| w[1] < w[0]), "{ts:?}");
        // Two components: the variances add, the degrees of freedom by
        // Welch-Satterthwaite (equal variances, 2 each: 4).
        let v = ProcessVariance { var: 1e-4, df: 2.0 };
        let sum = v.plus(v);
        assert!((sum.var - 2e-4).abs() < 1e-12 && (sum.df - 4.0).abs() < 1e-9);
        assert_eq!(v.plus(ProcessVariance::NONE), v);
        // A process term of few degrees of freedom widens more than a
        // known one of the same size, and the rounds' own width dilutes it.
        let (c, lo, hi) = (0.0, -0.0196, 0.0196);
        let known = widen_log(c, lo, hi, ProcessVariance::known(1e-4)).1;
        let few = widen_log(c, lo, hi, ProcessVariance { var: 1e-4, df: 2.0 }).1;
        assert!((known - 0.0196 * 2f64.sqrt()).abs() < 1e-4, "{known}");
        // Sum's df: 2 (1 + 1)^2 = 8.
        assert!((few / known - t975(8.0) / 1.959_964).abs() < 1e-4, "{few}");
    }

    /// A group like a gate's (four cases, three processes each): the
    /// process variances come from few processes, and normal quantiles
    /// for them give intervals that miss more often than they say.
    #[test]
    fn few_processes_need_t_quantiles_to_cover() {
        let (mut normal, mut t) = (0, 0);
        for seed in 0..1000 {
            let g = group_with_processes(4, 3, 60, 0.02, 1.0, seed);
            let (va, vb) = pair_var(&g);
            let r = paired_ratio(&medians_of(&g[0]), &medians_of(&g[1])).unwrap();
            let known = ProcessVariance::known(va.var + vb.var).over(3);
            normal += usize::from(r.widened(known).verdict == Verdict::NoMeasurableDifference);
            t += usize::from(
                r.widened(va.plus(vb).over(3)).verdict == Verdict::NoMeasurableDifference,
            );
        }
        // Nominal 950 of 1000 (binomial sd 7).
        assert!(normal <= 940, "normal quantiles covered {normal}/1000");
        assert!((940..=965).contains(&t), "t quantiles covered {t}/1000");
    }

    #[test]
    fn a_slow_process_widens_its_own_case_and_no_other() {
        let (mut own, mut others) = (Vec::new(), Vec::new());
        for seed in 0..100 {
            let mut g = group_with_processes(8, 3, 30, 0.0, 1.0, seed);
            // Case 5's process 0 runs 50% slower for its whole life.
            for v in g[5].iter_mut().flatten() {
                if v.0 == 0 {
                    v.1 *= 1.5;
                }
            }
            let v = process_variances(&g);
            own.push(v[5].unwrap().var.sqrt());
            others.extend(
                v.iter()
                    .enumerate()
                    .filter(|(c, _)| *c != 5)
                    .map(|(_, v)| v.unwrap().var.sqrt()),
            );
        }
        // Three processes at 1.5, 1, 1: sd of the logs 0.23.
        assert!(crate::median(&own) > 0.15, "{own:?}");
        // The others have no process effect (noise 2% per block, 10 blocks
        // per process); an estimate pooled over the group's pairs gave each
        // of them about 8%.
        let q90 = crate::quantile_sorted(
            &{
                let mut o = others.clone();
                o.sort_by(f64::total_cmp);
                o
            },
            0.9,
        );
        assert!(q90 < 0.015, "90th percentile of the other cases' sd {q90}");
    }

    #[test]
    fn process_variance_is_near_zero_without_process_effects_and_needs_two_processes() {
        let estimates: Vec<f64> = (0..100)
            .map(|seed| {
                pair_var(&group_with_processes(8, 2, 30, 0.0, 1.0, seed))
                    .0
                    .var
            })
            .collect();
        // Noise alone: the moment estimate is centred near 0 (clamped).
        assert!(crate::median(&estimates).sqrt() < 0.006, "{estimates:?}");
        assert!(
            process_variances(&group_with_processes(4, 1, 30, 0.02, 1.0, 1))
                .iter()
                .all(Option::is_none)
        );
        let term = ProcessVariance::known(0.0004).over(2);
        let ci = round_ci_with_processes(10.0, &[10.0; 12], term).unwrap();
        // A constant series has no width of its own: the process term alone.
        assert!((ci[1] / 10.0 - (1.959_964 * 0.0002f64.sqrt()).exp()).abs() < 1e-9);
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
    fn the_interval_is_the_ninth_smallest_and_largest_walsh_average_at_ten() {
        // Ten rounds with distinct Walsh averages: the exact 95% signed-rank
        // interval is the 9th smallest to the 9th largest (T = 8 at n = 10).
        let logs: Vec<f64> = (0..10).map(|i| 0.01 * f64::from(i * i) - 0.2).collect();
        let mut walsh = Vec::new();
        for i in 0..10 {
            for j in i..10 {
                walsh.push((logs[i] + logs[j]) / 2.0);
            }
        }
        walsh.sort_by(f64::total_cmp);
        let ratios: Vec<f64> = logs.iter().map(|l| l.exp()).collect();
        let r = paired_ratio(&[1.0; 10], &ratios).unwrap();
        assert!((r.ci95[0].ln() - walsh[8]).abs() < 1e-12);
        assert!((r.ci95[1].ln() - walsh[walsh.len() - 9]).abs() < 1e-12);
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
