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

impl RatioEstimate {
    /// The 95% interval widened by an independent variance component of
    /// the log ratio (e.g. the between-process variance of both sides, which
    /// a bootstrap over rounds of a few processes cannot see), keeping its
    /// asymmetry about `ratio` (clamped into the interval: a percentile
    /// bootstrap's interval need not contain its estimate, and widening
    /// must never move a bound inwards).
    pub fn widened(self, extra: crate::rounds::ProcessVariance) -> Self {
        let (lo, hi) = (self.lo.ln(), self.hi.ln());
        let (lo, hi) = crate::rounds::widen_log(self.ratio.ln().clamp(lo, hi), lo, hi, extra);
        Self {
            lo: lo.exp(),
            hi: hi.exp(),
            ..self
        }
    }
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

/// Percentile CI of `stat(head) / stat(base)` from a paired bootstrap over
/// rounds (for metrics such as p99 that have no rank-based interval). Each
/// replicate draws round indices with replacement and pools the samples of
/// those rounds on both sides, so the interval carries what a sample-level
/// bootstrap cannot see: samples of one block share the machine's state of
/// that moment, and a slow stretch hits whole blocks. Rounds where either
/// side has no samples are left out; `None` below 6 paired rounds.
pub fn paired_round_bootstrap<F: Fn(&[f64]) -> f64>(
    base: &[&[f64]],
    head: &[&[f64]],
    stat: F,
    seed: u64,
) -> Option<RatioEstimate> {
    let rounds: Vec<(&[f64], &[f64])> = base
        .iter()
        .zip(head)
        .filter(|(b, h)| !b.is_empty() && !h.is_empty())
        .map(|(b, h)| (*b, *h))
        .collect();
    if rounds.len() < 6 {
        return None;
    }
    let pool = |pick: &mut dyn Iterator<Item = usize>| -> (Vec<f64>, Vec<f64>) {
        let (mut b, mut h) = (Vec::new(), Vec::new());
        for i in pick {
            b.extend_from_slice(rounds[i].0);
            h.extend_from_slice(rounds[i].1);
        }
        (b, h)
    };
    let (all_b, all_h) = pool(&mut (0..rounds.len()));
    let mut rng = crate::SplitMix64(seed);
    let n = rounds.len() as u64;
    let mut ratios: Vec<f64> = (0..1000)
        .map(|_| {
            let mut draw = (0..n).map(|_| (rng.next() % n) as usize);
            let (b, h) = pool(&mut draw);
            stat(&h) / stat(&b)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    Some(RatioEstimate {
        ratio: stat(&all_h) / stat(&all_b),
        lo: crate::quantile_sorted(&ratios, 0.025),
        hi: crate::quantile_sorted(&ratios, 0.975),
    })
}

/// What one side of a paired comparison met of host stalls, and what
/// [`without_stalled_rounds`] left out for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stalls {
    /// Runs in the stretches.
    pub runs: usize,
    /// Stretches they came in.
    pub stretches: usize,
    /// Rounds in which this side met a stretch: left out on both sides.
    #[serde(default)]
    pub rounds: usize,
}

/// Per block: the runs in stretches of at least `min_runs` consecutive runs
/// slower than `cut`, and how many stretches (a stretch does not continue
/// into the next block).
fn stretches(block: &[f64], cut: f64, min_runs: usize) -> (usize, usize) {
    let (mut runs, mut count, mut len) = (0, 0, 0);
    for x in block.iter().chain([&f64::NEG_INFINITY]) {
        if *x > cut {
            len += 1;
            continue;
        }
        if len >= min_runs.max(1) {
            runs += len;
            count += 1;
        }
        len = 0;
    }
    (runs, count)
}

/// The rounds of a paired comparison (`base[r]` and `head[r]`: each side's
/// block of round `r`, in run order) with every round in which either side
/// met a **host stall** left out on both sides: a stretch of at least
/// `min_runs` consecutive runs slower than `factor` x that side's median.
/// A left-out round's blocks come back empty (the pairing by index holds).
///
/// A shared host that stops or slows the VM for tens of milliseconds slows
/// every run in that window, and the runs around it less visibly; on the
/// 2-vCPU VMs measured such windows set a one-thread encoder's p99 on
/// whichever side met them. A model's own slow runs come one at a time and
/// stay. The round goes, not only the stretch: the runs the host slowed
/// around it, below the cut, would otherwise still set that side's tail,
/// and leaving it out on both sides keeps the pairs.
pub fn without_stalled_rounds<'a>(
    base: &[&'a [f64]],
    head: &[&'a [f64]],
    factor: f64,
    min_runs: usize,
) -> (Vec<&'a [f64]>, Vec<&'a [f64]>, [Stalls; 2]) {
    let per_block = |side: &[&[f64]]| -> Vec<(usize, usize)> {
        let all: Vec<f64> = side.iter().flat_map(|b| b.iter().copied()).collect();
        if all.is_empty() {
            return vec![(0, 0); side.len()];
        }
        let cut = factor * crate::median(&all);
        side.iter().map(|b| stretches(b, cut, min_runs)).collect()
    };
    let (sb, sh) = (per_block(base), per_block(head));
    let mut met = [Stalls::default(); 2];
    let (mut kb, mut kh) = (
        Vec::with_capacity(base.len()),
        Vec::with_capacity(head.len()),
    );
    for (r, (b, h)) in base.iter().zip(head).enumerate() {
        let (xb, xh) = (sb[r], sh[r]);
        for (m, (runs, count)) in met.iter_mut().zip([xb, xh]) {
            m.runs += runs;
            m.stretches += count;
            m.rounds += usize::from(count > 0);
        }
        let stalled = xb.1 > 0 || xh.1 > 0;
        kb.push(if stalled { &b[..0] } else { *b });
        kh.push(if stalled { &h[..0] } else { *h });
    }
    (kb, kh, met)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rounds::ProcessVariance;
    use crate::synth;

    /// Widening adds the variance in quadrature on the log scale and never
    /// moves a bound inwards, even for an estimate outside its interval.
    #[test]
    fn a_widened_interval_adds_variance_and_contains_the_old_one() {
        let e = RatioEstimate {
            ratio: 1.1,
            lo: 1.1 * (-0.0196f64).exp(),
            hi: 1.1 * 0.0196f64.exp(),
        };
        // se 0.01 on the log scale, plus 0.01^2: se 0.01 * sqrt(2).
        let w = e.widened(ProcessVariance::known(1e-4));
        assert!(
            ((w.hi / 1.1).ln() - 0.0196 * 2f64.sqrt()).abs() < 1e-4,
            "{w:?}"
        );
        assert!(
            ((1.1 / w.lo).ln() - 0.0196 * 2f64.sqrt()).abs() < 1e-4,
            "{w:?}"
        );
        assert_eq!(e.widened(ProcessVariance::NONE), e);
        let off = RatioEstimate { ratio: 0.9, ..e };
        let w = off.widened(ProcessVariance::known(1e-4));
        assert!(w.lo <= e.lo && w.hi >= e.hi, "{w:?}");
    }

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

    /// Rounds of `per` samples each: a factor per round and side (the
    /// machine's state during that block: sd 5% in log terms, and with
    /// probability `burst` a host hiccup that makes the whole block 1.8x
    /// slower), a drift shared by both sides of a round, and an
    /// exponential tail on a floor of 3.
    fn blocky(rounds: usize, per: usize, scale: f64, burst: f64, seed: u64) -> Vec<Vec<f64>> {
        let noise = synth::normal(rounds, 0.0, 0.05, seed);
        let hiccup = synth::uniform(rounds, 0.0, 1.0, seed + 500);
        let drift = synth::normal(rounds, 0.0, 0.1, 7);
        (0..rounds)
            .map(|r| {
                let slow = if hiccup[r] < burst { 1.8f64.ln() } else { 0.0 };
                let f = scale * (noise[r] + slow + drift[r]).exp();
                synth::exponential(per, 1.0, seed * 1000 + r as u64)
                    .into_iter()
                    .map(|x| f * (3.0 + x))
                    .collect()
            })
            .collect()
    }

    fn p99(s: &[f64]) -> f64 {
        let mut v = s.to_vec();
        v.sort_by(f64::total_cmp);
        crate::quantile_sorted(&v, 0.99)
    }

    fn slices(v: &[Vec<f64>]) -> Vec<&[f64]> {
        v.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn the_paired_round_bootstrap_covers_one_where_a_sample_bootstrap_does_not() {
        let (mut by_round, mut by_sample) = (0, 0);
        let trials = 60;
        for t in 0..trials {
            let a = blocky(40, 10, 1.0, 0.1, 2 * t + 1);
            let b = blocky(40, 10, 1.0, 0.1, 2 * t + 2);
            let r = paired_round_bootstrap(&slices(&a), &slices(&b), p99, t).unwrap();
            by_round += usize::from(r.lo <= 1.0 && 1.0 <= r.hi);
            let s = bootstrap_ratio(&a.concat(), &b.concat(), p99, t).unwrap();
            by_sample += usize::from(s.lo <= 1.0 && 1.0 <= s.hi);
        }
        assert!(
            by_round >= 54,
            "paired rounds covered 1.0 in {by_round}/{trials}"
        );
        assert!(
            by_sample < by_round,
            "samples {by_sample}/{trials}, rounds {by_round}/{trials}"
        );
    }

    #[test]
    fn the_paired_round_bootstrap_finds_a_ten_percent_p99_change() {
        let a = blocky(120, 20, 1.0, 0.0, 11);
        let b = blocky(120, 20, 1.1, 0.0, 12);
        let r = paired_round_bootstrap(&slices(&a), &slices(&b), p99, 3).unwrap();
        assert!(r.lo > 1.0 && (r.ratio - 1.1).abs() < 0.06, "{r:?}");
    }

    #[test]
    fn rounds_one_side_missed_are_left_out_and_few_rounds_give_nothing() {
        let a = blocky(8, 5, 1.0, 0.0, 1);
        let mut b = blocky(8, 5, 1.0, 0.0, 2);
        b[2].clear();
        b[5].clear();
        b[6].clear();
        assert!(paired_round_bootstrap(&slices(&a), &slices(&b), p99, 1).is_none());
        b[6] = a[6].clone();
        assert!(paired_round_bootstrap(&slices(&a), &slices(&b), p99, 1).is_some());
    }

    #[test]
    fn a_stretch_of_slow_runs_leaves_its_round_out_on_both_sides_and_single_slow_runs_stay() {
        // Every side's median is 1.0, so the cut is at 1.3.
        let calm = [1.0; 20];
        let a: &[f64] = &[1.0, 1.0, 1.5, 1.6, 1.4, 1.0, 2.0, 1.0];
        let b: &[f64] = &[1.4, 1.4, 1.0, 1.0, 1.9, 1.0, 1.5, 1.5];
        let at_end: &[f64] = &[1.0, 1.0, 1.0, 1.0, 1.0, 1.4, 1.4, 1.4];
        let base = [a, b, &calm[..], &calm[..]];
        let head = [&calm[..], &calm[..], &calm[..], at_end];
        let (kb, kh, s) = without_stalled_rounds(&base, &head, 1.3, 3);
        // Two slow runs in a row are not a stretch of three, nor is a
        // single one; a stretch that ends its block counts.
        assert_eq!(kb, vec![&[][..], b, &calm[..], &[][..]]);
        assert_eq!(kh, vec![&[][..], &calm[..], &calm[..], &[][..]]);
        let one = Stalls {
            runs: 3,
            stretches: 1,
            rounds: 1,
        };
        assert_eq!(s, [one, one]);
        let (kb, _, s) = without_stalled_rounds(&base, &head, 1.3, 2);
        assert!(kb[0].is_empty() && kb[1].is_empty() && !kb[2].is_empty());
        assert_eq!(
            s[0],
            Stalls {
                runs: 7,
                stretches: 3,
                rounds: 2
            }
        );
    }

    /// `rounds` blocks of `per` runs around `scale`: 5% run-to-run and 2%
    /// round-to-round spread, nothing near 1.3x.
    fn calm(rounds: usize, per: usize, scale: f64, seed: u64) -> Vec<Vec<f64>> {
        let drift = synth::normal(rounds, 0.0, 0.02, seed + 900);
        (0..rounds)
            .map(|r| {
                synth::normal(per, 0.0, 0.05, seed * 1000 + r as u64)
                    .into_iter()
                    .map(|x| scale * (x + drift[r]).exp())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn leaving_stalled_rounds_out_recovers_a_p99_change_they_hid() {
        let (base, head) = (calm(120, 20, 1.0, 11), calm(120, 20, 1.1, 12));
        let (sb, sh) = (slices(&base), slices(&head));
        assert_eq!(
            without_stalled_rounds(&sb, &sh, 1.3, 3).2,
            [Stalls::default(); 2]
        );
        let clean = paired_round_bootstrap(&sb, &sh, p99, 3).unwrap();
        assert!(clean.lo > 1.0, "{clean:?}");
        // Stretches at 1.6x on base only hide the change in the pooled p99.
        let mut stalled = base.clone();
        for r in [5, 40, 77] {
            for x in &mut stalled[r][4..12] {
                *x *= 1.6;
            }
        }
        let hidden = paired_round_bootstrap(&slices(&stalled), &sh, p99, 3).unwrap();
        assert!(hidden.lo <= 1.0, "{hidden:?}");
        let (kb, kh, s) = without_stalled_rounds(&slices(&stalled), &sh, 1.3, 3);
        assert_eq!(
            s,
            [
                Stalls {
                    runs: 24,
                    stretches: 3,
                    rounds: 3
                },
                Stalls::default()
            ]
        );
        let found = paired_round_bootstrap(&kb, &kh, p99, 3).unwrap();
        assert!(
            found.lo > 1.0 && (found.ratio - 1.1).abs() < 0.03,
            "{found:?}"
        );
    }

    /// A host that slows the VM slows the runs around a stretch too, below
    /// the cut: left in, they set one side's p99; the round goes with them.
    #[test]
    fn the_runs_slowed_around_a_stall_leave_with_its_round() {
        let (base, head) = (calm(120, 20, 1.0, 21), calm(120, 20, 1.0, 22));
        let mut stalled = base.clone();
        for r in [3, 17, 30, 52, 71, 90, 104] {
            for (i, x) in stalled[r].iter_mut().enumerate() {
                *x *= if (8..11).contains(&i) { 1.6 } else { 1.25 };
            }
        }
        let sh = slices(&head);
        // The stretches' own runs alone out: the slowed runs (6% of base's)
        // still make base's p99 about 1.25/1.12 slower than head's.
        let runs_only: Vec<Vec<f64>> = stalled
            .iter()
            .map(|b| b.iter().copied().filter(|&x| x <= 1.3 * 1.0).collect())
            .collect();
        let left = paired_round_bootstrap(&slices(&runs_only), &sh, p99, 5).unwrap();
        assert!(left.hi < 0.95, "{left:?}");
        let (kb, kh, s) = without_stalled_rounds(&slices(&stalled), &sh, 1.3, 3);
        assert_eq!(s[0].rounds, 7);
        let out = paired_round_bootstrap(&kb, &kh, p99, 5).unwrap();
        assert!(out.lo <= 1.0 && 1.0 <= out.hi, "{out:?}");
    }
}
