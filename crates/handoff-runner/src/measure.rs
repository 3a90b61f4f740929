//! The timing loop: warm-up, then timed runs until the stopping rule says
//! the median is known well enough, or a limit is reached.

use std::time::{Duration, Instant};

use handoff_backend::{BackendError, Prepared};
pub use handoff_results::StopReason;
use handoff_suite::Measure;

#[derive(Debug, Clone)]
pub struct Timed {
    pub samples: Vec<Duration>,
    /// The backend's own per-run times (ms), when it reports them.
    pub inner_ms: Vec<f64>,
    pub warmup_runs: u64,
    /// Each warm-up run's time, ms (how fast the runtime reaches steady state).
    pub warmup_ms: Vec<f64>,
    pub stop: StopReason,
}

/// Runs the session for the policy's warm-up time (at least once) and
/// returns each run's time in ms.
pub fn warm_up(prepared: &mut dyn Prepared, policy: &Measure) -> Result<Vec<f64>, BackendError> {
    let start = Instant::now();
    let mut times = Vec::new();
    while times.is_empty() || start.elapsed() < policy.warmup {
        let t = Instant::now();
        prepared.run()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

/// Runs warm-up then the timed loop on an already bound session.
pub fn measure(
    prepared: &mut dyn Prepared,
    policy: &Measure,
    progress: &mut dyn FnMut(&[Duration]),
) -> Result<Timed, BackendError> {
    let warmup_ms = warm_up(prepared, policy)?;
    let mut inner_ms = Vec::new();
    let (samples, stop) = timed_loop_with_progress(
        || {
            prepared.run()?;
            // Inside the clock, but one predictable call and push (a few ns).
            if let Some(ms) = prepared.inner_ms() {
                inner_ms.push(ms);
            }
            Ok(())
        },
        policy,
        progress,
    )?;
    Ok(Timed {
        samples,
        inner_ms,
        warmup_runs: warmup_ms.len() as u64,
        warmup_ms,
        stop,
    })
}

/// The untimed opening of a block for a case whose runs take `typical_ms`:
/// `settle`, except for runs of at least four times it, whose own first
/// milliseconds are a small part of them (MiniLM at batch 8, 240-650 ms
/// per run, showed no first-run excess on these VMs; a 3.4 ms encoder's
/// excess added up to about 3 ms over its first 50 ms).
pub fn settle_for(typical_ms: f64, settle: Duration) -> Duration {
    if typical_ms >= 4.0 * settle.as_secs_f64() * 1e3 {
        Duration::ZERO
    } else {
        settle
    }
}

/// One block of interleaved measurement: untimed runs for at least
/// `settle` (at least one run; none when zero), then timed runs for
/// `time_ms` (at least one, at most `max_runs`).
/// `progress` gets the block's samples so far at doubling intervals from
/// 250 ms, so a block killed for hanging still leaves them behind.
pub fn block(
    prepared: &mut dyn Prepared,
    time_ms: f64,
    max_runs: u64,
    settle: Duration,
    progress: &mut dyn FnMut(&[f64]),
) -> Result<crate::worker::BlockResult, BackendError> {
    let mut settle_runs = 0;
    let settle_start = Instant::now();
    while !settle.is_zero() && (settle_runs == 0 || settle_start.elapsed() < settle) {
        prepared.run()?;
        settle_runs += 1;
    }
    let budget = Duration::from_secs_f64(time_ms.max(0.0) / 1e3);
    let max_runs = max_runs.max(1) as usize;
    let mut samples_ms = Vec::new();
    let mut inner_ms = Vec::new();
    let start = Instant::now();
    let mut next_progress = Duration::from_millis(250);
    while samples_ms.is_empty() || (start.elapsed() < budget && samples_ms.len() < max_runs) {
        let t = Instant::now();
        prepared.run()?;
        samples_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(ms) = prepared.inner_ms() {
            inner_ms.push(ms);
        }
        if start.elapsed() >= next_progress {
            progress(&samples_ms);
            next_progress *= 2;
        }
    }
    Ok(crate::worker::BlockResult {
        samples_ms,
        inner_ms,
        settle_runs,
    })
}

/// The loop itself, generic so the harness overhead can be benchmarked
/// without dynamic dispatch getting in the way of what is measured.
pub fn timed_loop<F>(run: F, policy: &Measure) -> Result<(Vec<Duration>, StopReason), BackendError>
where
    F: FnMut() -> Result<(), BackendError>,
{
    timed_loop_with_progress(run, policy, &mut |_| {})
}

/// [`timed_loop`], handing the samples so far to `progress` at doubling
/// intervals (250 ms, 500 ms, 1 s, …), so a case killed for hanging still
/// has the samples it gathered.
pub fn timed_loop_with_progress<F>(
    mut run: F,
    policy: &Measure,
    progress: &mut dyn FnMut(&[Duration]),
) -> Result<(Vec<Duration>, StopReason), BackendError>
where
    F: FnMut() -> Result<(), BackendError>,
{
    let mut next_progress = Duration::from_millis(250);
    let mut samples: Vec<Duration> = Vec::with_capacity(1024);
    let start = Instant::now();
    let min_iters = policy.min_iterations.max(1) as usize;
    let max_iters = policy.max_iterations.max(1) as usize;
    let mut next_check = min_iters;
    let mut scratch = Vec::new();
    loop {
        let t0 = Instant::now();
        run()?;
        let t1 = Instant::now();
        samples.push(t1 - t0);
        let n = samples.len();
        if n >= max_iters {
            return Ok((samples, StopReason::MaxIterations));
        }
        let elapsed = t1 - start;
        if elapsed >= next_progress {
            progress(&samples);
            next_progress *= 2;
        }
        if elapsed >= policy.max_time {
            return Ok((samples, StopReason::MaxTime));
        }
        if n >= next_check && elapsed >= policy.min_time {
            // Checking costs a sort; doing it at geometrically spaced counts
            // keeps the total cost O(n log n) over the whole loop.
            next_check = (n + n / 10).max(n + 1);
            if converged(&samples, policy.target_ci, &mut scratch) {
                return Ok((samples, StopReason::Converged));
            }
        }
    }
}

fn converged(samples: &[Duration], target: f64, scratch: &mut Vec<f64>) -> bool {
    scratch.clear();
    scratch.extend(samples.iter().map(Duration::as_secs_f64));
    scratch.sort_by(f64::total_cmp);
    let median = handoff_stats::quantile_sorted(scratch, 0.5);
    match handoff_stats::median_ci_order_stat(scratch, 1.96) {
        Some((lo, hi)) if median > 0.0 => (median - lo).max(hi - median) / median <= target,
        _ => false,
    }
}

/// When a cold process reached steady state: the number of runs (first
/// inference, warm-up, timed, in order) before the first stretch of
/// `STEADY_RUNS` runs all within 20% of the steady median, and their total
/// time in ms.
pub fn steady_after(runs_ms: &[f64], steady_median: f64) -> Option<(usize, f64)> {
    const STEADY_RUNS: usize = 5;
    let near = |v: f64| v <= 1.2 * steady_median;
    (0..runs_ms.len().saturating_sub(STEADY_RUNS - 1))
        .find(|&i| runs_ms[i..i + STEADY_RUNS].iter().all(|v| near(*v)))
        .map(|i| (i, runs_ms[..i].iter().sum()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min_time_ms: u64, max_time_ms: u64, target: f64) -> Measure {
        Measure {
            warmup: Duration::ZERO,
            min_iterations: 10,
            max_iterations: 1_000_000,
            min_time: Duration::from_millis(min_time_ms),
            max_time: Duration::from_millis(max_time_ms),
            target_ci: target,
            rounds: 10,
            processes: 1,
            settle: Duration::ZERO,
        }
    }

    #[test]
    fn steady_state_is_the_first_stretch_near_the_median() {
        // A slow first run, a fast one that is a fluke, then steady.
        let runs = [50.0, 9.0, 30.0, 11.0, 10.0, 10.5, 9.8, 10.2, 10.1];
        assert_eq!(steady_after(&runs, 10.0), Some((3, 89.0)));
        // Never steady for five runs in a row.
        assert_eq!(steady_after(&[50.0, 10.0, 40.0, 10.0], 10.0), None);
    }

    #[test]
    fn stops_on_convergence_for_a_steady_workload() {
        let (samples, stop) = timed_loop(
            || {
                std::thread::sleep(Duration::from_micros(200));
                Ok(())
            },
            &policy(20, 5_000, 0.5),
        )
        .unwrap();
        assert_eq!(stop, StopReason::Converged);
        assert!(samples.len() >= 10);
    }

    #[test]
    fn respects_max_time_when_the_target_is_unreachable() {
        let mut i = 0u64;
        let (_, stop) = timed_loop(
            || {
                // Alternating 0 / 1ms: the median never settles within 1e-9.
                i += 1;
                if i.is_multiple_of(2) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            },
            &policy(0, 50, 1e-9),
        )
        .unwrap();
        assert_eq!(stop, StopReason::MaxTime);
    }

    #[test]
    fn respects_max_iterations_and_propagates_errors() {
        // min_time far away: the convergence check never runs.
        let mut p = policy(60_000, 120_000, 0.5);
        p.max_iterations = 25;
        let (s, stop) = timed_loop(|| Ok(()), &p).unwrap();
        assert_eq!((s.len(), stop), (25, StopReason::MaxIterations));
        let err = timed_loop(|| Err(BackendError::Failed("boom".into())), &p).unwrap_err();
        assert_eq!(err, BackendError::Failed("boom".into()));
    }

    /// Counts runs, each sleeping `ms`.
    struct Sleeper {
        ms: u64,
        runs: u32,
    }

    impl Prepared for Sleeper {
        fn bind(&mut self, _: &[handoff_backend::Tensor]) -> Result<(), BackendError> {
            Ok(())
        }
        fn run(&mut self) -> Result<(), BackendError> {
            std::thread::sleep(Duration::from_millis(self.ms));
            self.runs += 1;
            Ok(())
        }
        fn outputs(&mut self) -> Result<Vec<handoff_backend::Tensor>, BackendError> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn a_block_opens_with_untimed_runs_for_the_settle_time() {
        let mut p = Sleeper { ms: 2, runs: 0 };
        let start = Instant::now();
        let b = block(&mut p, 0.0, 1, Duration::from_millis(20), &mut |_| {}).unwrap();
        // At least 20 ms of 2 ms runs before the one timed run (a sleep may
        // overshoot, so the count is not exact; the time is the rule).
        let untimed_ms = start.elapsed().as_secs_f64() * 1e3 - b.samples_ms[0];
        assert!(
            untimed_ms >= 20.0 && b.settle_runs >= 2,
            "{untimed_ms} {b:?}"
        );
        assert_eq!(b.samples_ms.len(), 1);
        assert_eq!(p.runs, b.settle_runs + 1);
        // A run longer than the settle time settles with one run; zero: none.
        let mut p = Sleeper { ms: 5, runs: 0 };
        let b = block(&mut p, 0.0, 1, Duration::from_millis(1), &mut |_| {}).unwrap();
        assert_eq!(b.settle_runs, 1);
        let b = block(&mut p, 0.0, 1, Duration::ZERO, &mut |_| {}).unwrap();
        assert_eq!(b.settle_runs, 0);
    }

    #[test]
    fn long_runs_are_not_settled() {
        let settle = Duration::from_millis(50);
        assert_eq!(settle_for(3.4, settle), settle);
        assert_eq!(settle_for(199.0, settle), settle);
        assert_eq!(settle_for(200.0, settle), Duration::ZERO);
        assert_eq!(settle_for(650.0, Duration::ZERO), Duration::ZERO);
    }
}
