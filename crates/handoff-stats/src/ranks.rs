//! Which order statistics bound the distribution-free intervals: the
//! Wilcoxon signed-rank interval (of Walsh averages) and the Mann-Whitney
//! interval (of pairwise differences). Both take the `q`-th smallest and
//! `q`-th largest value (1-based), `q` the lower `alpha/2` quantile of the
//! statistic under no difference (R's `qsignrank` / `qwilcox`, with `q = 0`
//! raised to 1: the extremes). Exact distributions for small samples, the
//! normal approximation beyond.

/// Signed-rank samples up to this size use the exact distribution.
const EXACT_SIGNED_RANK: usize = 200;
/// Mann-Whitney sample pairs up to this `n * m` use the exact distribution.
const EXACT_RANK_SUM: usize = 2500;

/// Standard normal CDF (Abramowitz-Stegun 7.1.26 erf, |error| < 1.5e-7).
pub fn normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// The smallest `x` with `cdf[x] >= p`, at least 1.
fn quantile(cdf: impl Iterator<Item = f64>, p: f64) -> usize {
    let mut acc = 0.0;
    for (x, prob) in cdf.enumerate() {
        acc += prob;
        // A hair of slack for the sums' rounding.
        if acc >= p * (1.0 - 1e-12) {
            return x.max(1);
        }
    }
    1
}

/// `q` for the signed-rank interval of `n` values at two-sided level
/// `1 - 2 * alpha2` (e.g. `alpha2 = 0.025` for 95%).
pub fn signed_rank_q(n: usize, alpha2: f64) -> usize {
    if n == 0 {
        return 1;
    }
    if n <= EXACT_SIGNED_RANK {
        // P(W = w) for W the sum of the ranks of the positive values.
        let total = n * (n + 1) / 2;
        let mut p = vec![0.0f64; total + 1];
        p[0] = 1.0;
        for k in 1..=n {
            for w in (0..=k * (k + 1) / 2).rev() {
                let with = if w >= k { p[w - k] } else { 0.0 };
                p[w] = 0.5 * (p[w] + with);
            }
        }
        return quantile(p.into_iter(), alpha2);
    }
    let nf = n as f64;
    let mean = nf * (nf + 1.0) / 4.0;
    let sd = (nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0).sqrt();
    (mean + z_of(alpha2) * sd).round().max(1.0) as usize
}

/// `q` for the Mann-Whitney interval of samples of `n` and `m` values.
pub fn rank_sum_q(n: usize, m: usize, alpha2: f64) -> usize {
    if n == 0 || m == 0 {
        return 1;
    }
    if n * m <= EXACT_RANK_SUM {
        // P(U = u) for sizes (i, j), row by row: a value of the first sample
        // is the largest with probability i / (i + j) and then exceeds all j
        // of the second.
        let nm = n * m;
        let mut prev: Vec<Vec<f64>> = (0..=m)
            .map(|_| {
                let mut v = vec![0.0; nm + 1];
                v[0] = 1.0;
                v
            })
            .collect();
        for i in 1..=n {
            let mut row: Vec<Vec<f64>> = Vec::with_capacity(m + 1);
            let mut first = vec![0.0; nm + 1];
            first[0] = 1.0;
            row.push(first);
            for j in 1..=m {
                let (a, b) = (i as f64 / (i + j) as f64, j as f64 / (i + j) as f64);
                let mut v = vec![0.0; nm + 1];
                for (u, slot) in v.iter_mut().enumerate().take(i * j + 1) {
                    let largest_first = if u >= j { prev[j][u - j] } else { 0.0 };
                    *slot = a * largest_first + b * row[j - 1][u];
                }
                row.push(v);
            }
            prev = row;
        }
        return quantile(prev[m].iter().copied(), alpha2);
    }
    let (nf, mf) = (n as f64, m as f64);
    let sd = (nf * mf * (nf + mf + 1.0) / 12.0).sqrt();
    (nf * mf / 2.0 + z_of(alpha2) * sd).round().max(1.0) as usize
}

/// The normal quantile at `p` (bisection on [`normal_cdf`]).
fn z_of(p: f64) -> f64 {
    let (mut lo, mut hi) = (-10.0, 10.0);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if normal_cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_rank_matches_published_critical_values() {
        // Two-sided 5% critical values T of the signed-rank test (reject
        // when W <= T), e.g. Hollander & Wolfe; the interval's q is T + 1.
        for (n, t) in [
            (6, 0),
            (7, 2),
            (8, 3),
            (10, 8),
            (15, 25),
            (20, 52),
            (30, 137),
        ] {
            assert_eq!(signed_rank_q(n, 0.025), t + 1, "n = {n}");
        }
        // Below 6 no value is rare enough: the extremes.
        assert_eq!(signed_rank_q(5, 0.025), 1);
    }

    #[test]
    fn rank_sum_matches_published_critical_values() {
        // Two-sided 5% critical values of the Mann-Whitney U (reject when
        // U <= T); q is T + 1.
        for (n, m, t) in [
            (5, 5, 2),
            (8, 8, 13),
            (10, 10, 23),
            (20, 20, 127),
            (10, 20, 55),
        ] {
            assert_eq!(rank_sum_q(n, m, 0.025), t + 1, "n = {n}, m = {m}");
        }
    }

    #[test]
    fn exact_and_normal_agree_where_they_meet() {
        // Just past the exact range, the approximation is within a rank or
        // two of the exact value computed on the boundary.
        let exact = rank_sum_q(50, 50, 0.025);
        let approx = rank_sum_q(51, 50, 0.025);
        assert!(approx.abs_diff(exact) < 60, "{exact} {approx}");
        assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
        assert!((z_of(0.025) + 1.959_964).abs() < 1e-4);
        let e = signed_rank_q(200, 0.025);
        let a = signed_rank_q(201, 0.025);
        assert!(a > e && a - e < 120, "{e} {a}");
    }
}
