//! Open-loop load for the `server` and `http` scenarios.
//!
//! Queries arrive on a Poisson schedule fixed before the run starts
//! ([`poisson_schedule`]), and each query's latency is measured from its
//! *scheduled* arrival, not from when it was actually sent: a server that
//! falls behind is charged for the queue it built (no coordinated omission).
//! A run that cannot keep up is reported as saturated with the rate it did
//! achieve ([`Level`]); it never runs longer than its schedule plus a grace
//! period. [`find_peak`] searches for the highest rate whose p99 stays under
//! a bound.

pub mod http;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Arrival offsets of `n` queries of a Poisson process at `qps` queries per
/// second: exponential inter-arrival times with mean `1/qps`.
pub fn poisson_schedule(qps: f64, n: usize, seed: u64) -> Vec<Duration> {
    // Seeded: the schedule is identical for every backend of a suite.
    let mut rng = handoff_onnx::rng::SplitMix64::new(seed);
    let mut t = 0.0f64;
    (0..n)
        .map(|_| {
            // 1 - U is in (0, 1], so the logarithm is finite.
            t += -(1.0 - rng.next_f64()).ln() / qps;
            Duration::from_secs_f64(t)
        })
        .collect()
}

/// How many queries a run at `qps` gets: enough to last `duration`, and at
/// least `min_queries` so the tail percentiles rest on enough samples.
pub fn query_count(qps: f64, duration: Duration, min_queries: u32) -> usize {
    ((qps * duration.as_secs_f64()).ceil() as usize).max(min_queries as usize)
}

/// How long after the last scheduled arrival a run keeps waiting for answers:
/// a tenth of the schedule, at least one second.
pub fn grace(schedule: &[Duration]) -> Duration {
    schedule.last().map_or(Duration::from_secs(1), |end| {
        end.mul_f64(0.1).max(Duration::from_secs(1))
    })
}

/// Whether latency climbed through the run, as it does when arrivals
/// outpace service: the last quarter's median more than twice the first
/// quarter's, and by more than a twentieth of the schedule and 250 ms (so
/// the ordinary ups and downs of a queue near capacity do not count).
fn queue_grew(latencies_ms: &[f64], end: Duration) -> bool {
    let quarter = latencies_ms.len() / 4;
    if quarter < 5 {
        return false;
    }
    let head = handoff_stats::median(&latencies_ms[..quarter]);
    let tail = handoff_stats::median(&latencies_ms[latencies_ms.len() - quarter..]);
    tail > 2.0 * head && tail - head > (0.05 * end.as_secs_f64() * 1e3).max(250.0)
}

/// What one run at one rate gave. It is saturated when a query went
/// unanswered (error, or still queued at the end of the grace period), the
/// queue was still draining well after the last arrival, or latency kept
/// climbing through the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Level {
    /// The rate asked for.
    pub target_qps: f64,
    /// The rate the schedule actually offered (queries / schedule length).
    pub offered_qps: f64,
    /// Completed queries / time until the last completion.
    pub achieved_qps: f64,
    pub queries: u64,
    pub completed: u64,
    /// Answered with an error (HTTP status, runtime error).
    pub errors: u64,
    /// Not answered by the end of the grace period, or never sent because
    /// too many were in flight.
    pub unserved: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub saturated: bool,
    /// Latency of each completed query (scheduled arrival to answer), ms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latencies_ms: Vec<f64>,
}

/// A run still draining its queue this long (as a fraction of the schedule)
/// after the last arrival counts as saturated.
pub const DRAIN_FRACTION: f64 = 0.1;

impl Level {
    /// Summarises a run: `latencies_ms` of the completed queries, the time
    /// from the start to the last completion.
    pub fn new(
        target_qps: f64,
        schedule: &[Duration],
        latencies_ms: Vec<f64>,
        errors: u64,
        last_completion: Duration,
    ) -> Self {
        let queries = schedule.len() as u64;
        let completed = latencies_ms.len() as u64;
        let unserved = queries.saturating_sub(completed + errors);
        let end = schedule.last().copied().unwrap_or_default();
        let offered_qps = if end.is_zero() {
            target_qps
        } else {
            queries as f64 / end.as_secs_f64()
        };
        let span = last_completion.max(end).as_secs_f64();
        let achieved_qps = if span > 0.0 {
            completed as f64 / span
        } else {
            0.0
        };
        let mut sorted = latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p| (!sorted.is_empty()).then(|| handoff_stats::quantile_sorted(&sorted, p));
        Self {
            target_qps,
            offered_qps,
            achieved_qps,
            queries,
            completed,
            errors,
            unserved,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            saturated: unserved > 0
                || errors > 0
                || {
                    // A system that keeps up answers its last query about
                    // one latency after it arrived; one that does not is
                    // still draining a backlog that grew with the run.
                    let drain = last_completion.saturating_sub(end).as_secs_f64() * 1e3;
                    // The floor keeps a short run (a peak-search step) from
                    // failing on one slow answer.
                    drain > (DRAIN_FRACTION * end.as_secs_f64() * 1e3).max(500.0)
                }
                || queue_grew(&latencies_ms, end),
            latencies_ms,
        }
    }

    /// Whether the run kept up and met a p99 bound.
    pub fn meets(&self, p99_bound_ms: f64) -> bool {
        !self.saturated && self.p99_ms.is_some_and(|p| p <= p99_bound_ms)
    }

    /// Blocks of one rate run at different times, as one level: counts
    /// added, rates over the blocks' summed time, latencies pooled, and
    /// saturated if any block was.
    pub fn merge(target_qps: f64, blocks: &[Level]) -> Level {
        let sum = |f: fn(&Level) -> u64| blocks.iter().map(f).sum::<u64>();
        let (queries, completed) = (sum(|l| l.queries), sum(|l| l.completed));
        // Each block's time, from its own rate and count.
        let time = |n: fn(&Level) -> u64, r: fn(&Level) -> f64| {
            blocks
                .iter()
                .filter(|l| r(l) > 0.0)
                .map(|l| n(l) as f64 / r(l))
                .sum::<f64>()
        };
        let offered_time = time(|l| l.queries, |l| l.offered_qps);
        let achieved_time = time(|l| l.completed, |l| l.achieved_qps);
        let latencies_ms: Vec<f64> = blocks
            .iter()
            .flat_map(|l| l.latencies_ms.iter().copied())
            .collect();
        let mut sorted = latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p| (!sorted.is_empty()).then(|| handoff_stats::quantile_sorted(&sorted, p));
        Level {
            target_qps,
            offered_qps: if offered_time > 0.0 {
                queries as f64 / offered_time
            } else {
                target_qps
            },
            achieved_qps: if achieved_time > 0.0 {
                completed as f64 / achieved_time
            } else {
                0.0
            },
            queries,
            completed,
            errors: sum(|l| l.errors),
            unserved: sum(|l| l.unserved),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            saturated: blocks.iter().any(|l| l.saturated),
            latencies_ms,
        }
    }

    /// The same without the per-query latencies (for a search trace).
    pub fn without_samples(&self) -> Level {
        Level {
            latencies_ms: Vec::new(),
            ..self.clone()
        }
    }
}

/// The outcome of a peak search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    pub p99_bound_ms: f64,
    /// The best run that met the bound, with its latencies; `None` if even
    /// the lowest rate tried missed it.
    pub best: Option<Level>,
    /// Every run, in the order tried.
    pub trace: Vec<Level>,
    /// The lowest rate tried that missed the bound: with `best`, the
    /// bracket the peak lies in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed_qps: Option<f64>,
    /// The search stopped going down because a run at light load (below
    /// [`LIGHT_LOAD`] of the server's capacity) missed the bound: queueing
    /// is not what makes that tail, so no lower rate would meet it.
    #[serde(default)]
    pub light_load_miss: bool,
}

/// A peak search stops once the lowest rate that missed is within this
/// factor of the highest that met the bound.
pub const PEAK_BRACKET: f64 = 1.1;

/// Utilisation (rate x median latency) under which a missed p99 bound is
/// the requests' own spread, not queueing.
pub const LIGHT_LOAD: f64 = 0.25;

/// The rate one server holds answering queries back to back, each taking
/// `service_ms`: a peak search's first guess ([`find_peak`]'s `hint_qps`).
pub fn serial_capacity_qps(service_ms: f64) -> f64 {
    1e3 / service_ms.max(1e-3)
}

/// Searches for the highest rate whose p99 stays under `p99_bound_ms`:
/// grows the rate by half until a run misses the bound, then bisects until
/// the bracket is within 10%. `hint_qps` is a first guess
/// ([`serial_capacity_qps`]); at most `max_steps` runs. [`PeakSearch`] is
/// the same search one run at a time, for searches that take turns.
pub fn find_peak<E>(
    p99_bound_ms: f64,
    hint_qps: f64,
    max_steps: usize,
    mut run: impl FnMut(f64) -> Result<Level, E>,
) -> Result<Peak, E> {
    let mut search = PeakSearch::new(p99_bound_ms, hint_qps, max_steps);
    while let Some(qps) = search.next_qps() {
        search.record(run(qps)?);
    }
    Ok(search.finish())
}

/// The state of a peak search ([`find_peak`]): ask [`PeakSearch::next_qps`]
/// for the rate of the next run, hand its outcome to
/// [`PeakSearch::record`], until there is no next rate.
///
/// A run that misses the bound by one slow answer alone is run again at
/// the same rate and judged on both runs' answers pooled. A step has a few
/// dozen queries, so its p99 is about its slowest answer, and on a shared
/// machine one answer in a hundred can meet a hiccup of the host at any
/// rate: judged alone, such a run sent the search down to a fifth of the
/// rate the server held (FastAPI + onnxruntime on a 2-vCPU VM: 3.1 queries/s
/// after 7.6 missed by 1.6 ms and 3.8 by one answer, where the run before
/// had found 17.7). Two slow answers in one run are queueing, and the run
/// fails without a second.
#[derive(Debug, Clone)]
pub struct PeakSearch {
    p99_bound_ms: f64,
    max_steps: usize,
    qps: f64,
    good: Option<Level>,
    bad: Option<f64>,
    trace: Vec<Level>,
    /// A run waiting for its second at the same rate.
    first_of_two: Option<Level>,
    over: bool,
    light_load_miss: bool,
}

impl PeakSearch {
    pub fn new(p99_bound_ms: f64, hint_qps: f64, max_steps: usize) -> Self {
        Self {
            p99_bound_ms,
            max_steps: max_steps.max(1),
            qps: (hint_qps * 0.7).max(0.1),
            good: None,
            bad: None,
            trace: Vec::new(),
            first_of_two: None,
            over: false,
            light_load_miss: false,
        }
    }

    /// The rate of the next run; `None` once the search is over.
    pub fn next_qps(&self) -> Option<f64> {
        (!self.over).then_some(self.qps)
    }

    /// The outcome of a run at the last rate [`PeakSearch::next_qps`] gave.
    pub fn record(&mut self, run: Level) {
        if self.over {
            return;
        }
        self.trace.push(run.without_samples());
        let level = match self.first_of_two.take() {
            Some(first) => Level::merge(self.qps, &[first, run]),
            None if one_answer_over(&run, self.p99_bound_ms)
                && self.trace.len() < self.max_steps =>
            {
                self.first_of_two = Some(run);
                return;
            }
            None => run,
        };
        if level.meets(self.p99_bound_ms) {
            self.good = Some(level);
        } else {
            self.bad = Some(self.qps);
            // Halving the rate again would only make each step longer (a
            // step keeps its query count) without a chance of meeting it.
            let utilisation = level.achieved_qps * level.p50_ms.unwrap_or(0.0) / 1e3;
            if self.good.is_none() && !level.saturated && utilisation < LIGHT_LOAD {
                self.light_load_miss = true;
                self.over = true;
                return;
            }
        }
        let lo = self.good.as_ref().map(|l| l.target_qps);
        match (lo, self.bad) {
            (Some(lo), Some(hi)) if hi / lo <= PEAK_BRACKET => self.over = true,
            (Some(lo), Some(hi)) => self.qps = (lo + hi) / 2.0,
            (Some(lo), None) => self.qps = lo * 1.5,
            (None, Some(hi)) => self.qps = hi / 2.0,
            (None, None) => unreachable!("each run is either good or bad"),
        }
        self.over |= self.trace.len() >= self.max_steps;
    }

    pub fn finish(self) -> Peak {
        Peak {
            p99_bound_ms: self.p99_bound_ms,
            best: self.good,
            trace: self.trace,
            missed_qps: self.bad,
            light_load_miss: self.light_load_miss,
        }
    }
}

/// A run that kept up and missed the bound by exactly one answer.
fn one_answer_over(level: &Level, p99_bound_ms: f64) -> bool {
    !level.saturated
        && !level.meets(p99_bound_ms)
        && level
            .latencies_ms
            .iter()
            .filter(|&&ms| ms > p99_bound_ms)
            .count()
            == 1
}

/// Serves a schedule in this thread, one query at a time in arrival order
/// (a single FIFO server): `serve` handles one query. Stops at the end of
/// the grace period, leaving the rest unserved.
pub fn run_in_process<E>(
    target_qps: f64,
    schedule: &[Duration],
    mut serve: impl FnMut() -> Result<(), E>,
) -> Result<Level, E> {
    let deadline = schedule.last().copied().unwrap_or_default() + grace(schedule);
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(schedule.len());
    let mut last = Duration::ZERO;
    for &at in schedule {
        wait_until(start + at);
        if start.elapsed() > deadline {
            break;
        }
        serve()?;
        last = start.elapsed();
        latencies.push((last - at).as_secs_f64() * 1e3);
    }
    Ok(Level::new(target_qps, schedule, latencies, 0, last))
}

/// Sleeps most of the way, then spins: `sleep` alone overshoots by the
/// scheduler's tick, which would show up as queueing delay.
fn wait_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > Duration::from_micros(1500) {
            std::thread::sleep(left - Duration::from_micros(1000));
        } else {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_merge_into_one_level_of_their_summed_time() {
        let ms = Duration::from_millis;
        // Two 1-second blocks of 10 arrivals each; the second lost one query
        // and drained late.
        let s1: Vec<Duration> = (0..10).map(|i| ms(100 * i + 100)).collect();
        let a = Level::new(10.0, &s1, vec![5.0; 10], 0, ms(1005));
        let b = Level::new(10.0, &s1, vec![50.0; 9], 0, ms(2000));
        assert!(!a.saturated && b.saturated);
        let m = Level::merge(10.0, &[a.clone(), b.clone()]);
        assert_eq!((m.queries, m.completed, m.unserved), (20, 19, 1));
        assert!(m.saturated);
        assert!((m.offered_qps - 10.0).abs() < 1e-9, "{}", m.offered_qps);
        // 19 answers over 1.005 s + 2 s.
        assert!(
            (m.achieved_qps - 19.0 / 3.005).abs() < 1e-9,
            "{}",
            m.achieved_qps
        );
        assert_eq!(m.latencies_ms.len(), 19);
        assert_eq!((m.p50_ms, m.p99_ms), (Some(5.0), Some(50.0)));
        // One block is itself.
        let one = Level::merge(10.0, std::slice::from_ref(&a));
        assert!((one.achieved_qps - a.achieved_qps).abs() < 1e-9);
        assert_eq!(
            Level {
                achieved_qps: a.achieved_qps,
                ..one
            },
            a
        );
    }

    #[test]
    fn poisson_inter_arrivals_have_the_exponential_mean_and_variance() {
        let qps = 50.0;
        let n = 20_000;
        let s = poisson_schedule(qps, n, 7);
        let gaps: Vec<f64> = std::iter::once(s[0].as_secs_f64())
            .chain(s.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()))
            .collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        // Exponential(λ): mean 1/λ, variance 1/λ². Standard error of the
        // mean is (1/λ)/√n ≈ 0.7% here; 3% is > 4 standard errors.
        assert!((mean * qps - 1.0).abs() < 0.03, "mean {mean}");
        assert!((var * qps * qps - 1.0).abs() < 0.08, "variance {var}");
        // Coefficient of variation 1 distinguishes Poisson from a fixed rate.
        assert!(gaps.iter().all(|g| *g > 0.0));
        // Same seed, same schedule; another seed, another.
        assert_eq!(s, poisson_schedule(qps, n, 7));
        assert_ne!(s[..10], poisson_schedule(qps, 10, 8)[..]);
    }

    #[test]
    fn arrivals_in_disjoint_windows_are_poisson_counts() {
        // Counts per 1-second window of a 100/s process: mean and variance
        // both 100 (index of dispersion 1).
        let s = poisson_schedule(100.0, 100_000, 3);
        let mut counts = vec![0f64; s.last().unwrap().as_secs() as usize];
        for t in &s {
            if let Some(c) = counts.get_mut(t.as_secs() as usize) {
                *c += 1.0;
            }
        }
        let n = counts.len() as f64;
        let mean = counts.iter().sum::<f64>() / n;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!((mean - 100.0).abs() < 2.0, "mean {mean}");
        assert!((var / mean - 1.0).abs() < 0.2, "dispersion {}", var / mean);
    }

    #[test]
    fn a_server_that_keeps_up_is_not_saturated_and_one_that_cannot_is() {
        // Service takes 2 ms: capacity 500 queries/s.
        let service = || -> Result<(), ()> {
            std::thread::sleep(Duration::from_millis(2));
            Ok(())
        };
        let s = poisson_schedule(100.0, 150, 1);
        let ok = run_in_process(100.0, &s, service).unwrap();
        assert!(!ok.saturated, "{ok:?}");
        assert_eq!(ok.completed, 150);
        assert!(ok.achieved_qps > 0.9 * ok.offered_qps);

        let s = poisson_schedule(1500.0, 1500, 1);
        let over = run_in_process(1500.0, &s, service).unwrap();
        assert!(over.saturated, "{:?}", over.without_samples());
        // It reports what it achieved: at most the capacity.
        assert!(over.achieved_qps < 520.0, "{}", over.achieved_qps);
        assert!(over.achieved_qps > 100.0, "{}", over.achieved_qps);
        // Queueing shows in the latency: far above the 2 ms service time.
        assert!(over.p99_ms.unwrap() > 50.0);
        // Bounded: schedule (1 s) plus at most its grace (1 s), not the
        // 3 s the backlog would take to drain.
        assert!(over.unserved > 0);
    }

    #[test]
    fn saturation_rule_uses_the_offered_rate() {
        let s: Vec<Duration> = (1..=100).map(|i| Duration::from_millis(10 * i)).collect();
        // All answered, the last one just after the schedule: fine.
        let l = Level::new(100.0, &s, vec![1.0; 100], 0, Duration::from_millis(1010));
        assert!(!l.saturated);
        assert!(l.meets(1.0));
        assert!(!l.meets(0.5));
        // All answered but still draining long after the last arrival (more
        // than a tenth of the run and half a second): saturated.
        let l = Level::new(100.0, &s, vec![1.0; 100], 0, Duration::from_millis(1600));
        assert!(l.saturated);
        // A short drain, comparable to the latency, is not.
        let l = Level::new(100.0, &s, vec![60.0; 100], 0, Duration::from_millis(1090));
        assert!(!l.saturated);
        // Everything answered in time, but latency climbing from 10 ms to
        // 500 ms: a queue that grew all run long.
        let growing: Vec<f64> = (0..100).map(|i| 10.0 + 5.0 * f64::from(i)).collect();
        let l = Level::new(100.0, &s, growing, 0, Duration::from_millis(1050));
        assert!(l.saturated);
        // Latency that wanders without a trend is not saturation.
        let wander: Vec<f64> = (0..100).map(|i| 20.0 + f64::from(i % 7) * 3.0).collect();
        let l = Level::new(100.0, &s, wander, 0, Duration::from_millis(1030));
        assert!(!l.saturated);
        // One error is enough.
        let l = Level::new(100.0, &s, vec![1.0; 99], 1, Duration::from_millis(1000));
        assert!(l.saturated);
        assert_eq!(l.unserved, 0);
    }

    #[test]
    fn peak_search_brackets_the_capacity() {
        // A fake system whose p99 exceeds 10 ms above 200 queries/s.
        let fake = |qps: f64| -> Result<Level, ()> {
            let s: Vec<Duration> = (1..=100)
                .map(|i| Duration::from_secs_f64(i as f64 / qps))
                .collect();
            let lat = if qps <= 200.0 { 5.0 } else { 50.0 };
            Ok(Level::new(qps, &s, vec![lat; 100], 0, *s.last().unwrap()))
        };
        let peak = find_peak(10.0, 50.0, 20, fake).unwrap();
        let best = peak.best.as_ref().unwrap().target_qps;
        assert!(best <= 200.0 && best > 180.0, "{best}");
        // The bracket: the lowest rate that missed, within 10% above.
        let missed = peak.missed_qps.unwrap();
        assert!(missed > 200.0 && missed <= best * PEAK_BRACKET, "{missed}");
        assert!(peak.trace.len() < 20);
        assert!(!peak.light_load_miss);
        // Nothing meets an impossible bound: no peak, but a trace, and the
        // search stops at the first miss at light load (35 queries/s x 5 ms
        // is 18% of capacity) instead of halving the rate on and on.
        let none = find_peak(1.0, 50.0, 4, fake).unwrap();
        assert!(none.best.is_none() && none.light_load_miss);
        assert_eq!(none.trace.len(), 1);
        // A bound missed under heavy load goes on down.
        let slow = |qps: f64| -> Result<Level, ()> {
            let s: Vec<Duration> = (1..=100)
                .map(|i| Duration::from_secs_f64(i as f64 / qps))
                .collect();
            let lat = if qps <= 20.0 { 5.0 } else { 50.0 };
            Ok(Level::new(qps, &s, vec![lat; 100], 0, *s.last().unwrap()))
        };
        let found = find_peak(10.0, 50.0, 20, slow).unwrap();
        assert!(
            found.best.as_ref().is_some_and(|b| b.target_qps <= 20.0),
            "{found:?}"
        );
    }

    /// 50 answers at `qps`: 5 ms each, `over` of them 50 ms.
    fn run_with(qps: f64, over: usize) -> Level {
        let s: Vec<Duration> = (1..=50)
            .map(|i| Duration::from_secs_f64(i as f64 / qps))
            .collect();
        let mut lat = vec![5.0; 50];
        for l in lat.iter_mut().take(over) {
            *l = 50.0;
        }
        Level::new(qps, &s, lat, 0, *s.last().unwrap())
    }

    #[test]
    fn one_slow_answer_is_run_again_and_two_are_a_miss() {
        // Capacity 200 queries/s; below it, the first run at each rate
        // meets a hiccup (one answer over the bound), the second does not.
        let mut tried = Vec::new();
        let hiccup = |qps: f64| -> Result<Level, ()> {
            let first = !tried.contains(&qps.to_bits());
            tried.push(qps.to_bits());
            Ok(run_with(
                qps,
                if qps > 200.0 { 5 } else { usize::from(first) },
            ))
        };
        let peak = find_peak(10.0, 50.0, 30, hiccup).unwrap();
        let best = peak.best.as_ref().unwrap();
        assert!(
            best.target_qps > 180.0 && best.target_qps <= 200.0,
            "{peak:?}"
        );
        // The level that met the bound is the two runs pooled.
        assert_eq!(best.queries, 100);
        assert_eq!(best.latencies_ms.iter().filter(|&&l| l > 10.0).count(), 1);
        // A rate over capacity fails on its first run: five slow answers.
        let over: Vec<&Level> = peak.trace.iter().filter(|l| l.target_qps > 200.0).collect();
        assert!(!over.is_empty());
        for l in &over {
            assert_eq!(
                peak.trace
                    .iter()
                    .filter(|t| t.target_qps == l.target_qps)
                    .count(),
                1
            );
        }
        // Two slow answers in one run: a miss, not run again.
        let mut runs = 0;
        let two = find_peak(10.0, 50.0, 30, |q| {
            runs += 1;
            Ok::<_, ()>(run_with(q, 2))
        })
        .unwrap();
        assert_eq!(runs, two.trace.len());
        assert!(
            two.trace
                .windows(2)
                .all(|w| w[0].target_qps != w[1].target_qps)
        );
        // One slow answer in every run: pooled, two in a hundred still miss.
        let always = find_peak(10.0, 50.0, 30, |q| Ok::<_, ()>(run_with(q, 1))).unwrap();
        assert!(always.best.is_none(), "{always:?}");
        assert_eq!(always.trace[0].target_qps, always.trace[1].target_qps);
    }
}
