//! Interleaved rounds: every case of a comparison group is prepared in a
//! worker of its own and kept idle between blocks; each round runs one block
//! of every case in a seeded random order, balanced so that every case
//! takes every place in the round (and follows every other case) equally
//! often, so whatever the machine's speed does over the minutes of a run,
//! and whatever a place in the round does to a block, hits all cases of
//! the group alike.

// A case that ends early hands back its final cell (a WorkerReport) as the
// error: once per case, next to a process start, so its size does not matter.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub use handoff_results::{CanaryPoint, RoundsInfo};
use handoff_suite::Measure;

use crate::isolate::CaseWorker;
use crate::measure::StopReason;
use crate::worker::WorkerReport;

/// A group whose slowest case has used `max_time` stops after this many
/// rounds even when `rounds` asks for more: a case that takes a second per
/// run would otherwise hold the whole group for `rounds` seconds.
pub const ROUNDS_WITHIN_MAX_TIME: u32 = 10;

/// A case whose own measured time reaches this many times `max_time`
/// leaves the rounds once it has [`ROUNDS_ALONE`] of them: a runtime with
/// a slow kernel for this CPU (tract's int8 on AVX2 takes 25-49x its fp32
/// on a Xeon that charges for its switches to legacy SSE, 15 s a run at
/// batch 8) would otherwise hold its whole group for the rounds the others
/// need. The rest of the group goes on to its own limits.
pub const SLOW_CASE_MAX_TIMES: f64 = 10.0;

/// The fewest rounds after which a slow case may leave: with six paired
/// rounds the Wilcoxon signed-rank interval can be a true 95% one.
pub const ROUNDS_ALONE: usize = 6;

/// What the group runner hands back per case.
pub struct Outcome {
    /// Final report with all samples in round order.
    pub report: WorkerReport,
    pub rounds: RoundsInfo,
}

/// A deterministic order per round (SplitMix64 + Fisher-Yates).
pub struct RoundOrder(u64);

impl RoundOrder {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A permutation of `0..n`.
    pub fn shuffle(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// The orders of a group's rounds: cycles of a Williams design, so that
/// within each cycle every case takes every place in the round equally
/// often and follows every other case equally often (a cycle is `n` rounds
/// for an even number of cases, `2n` for an odd one), with the cases'
/// labels and the order of each cycle's rounds drawn from the seed.
///
/// Independent random orders balance places only on average over seeds,
/// and one seed replays the same orders in every run: the first block of a
/// round follows the drift canary, which leaves the caches cold (0.8-0.9%
/// slower at the median and about 30% more runs beyond 1.1x the median,
/// one-thread encoders on ort and tract here), and a case that led more
/// rounds than its pair by the seed's chance (658 against 516 rounds in 20
/// runs of one A/A pair) read slower in the tail in every run alike.
pub struct BalancedOrder {
    draw: RoundOrder,
    labels: Vec<usize>,
    pending: Vec<Vec<usize>>,
}

impl BalancedOrder {
    pub fn new(seed: u64, cases: usize) -> Self {
        let mut draw = RoundOrder::new(seed);
        let labels = draw.shuffle(cases);
        Self {
            draw,
            labels,
            pending: Vec::new(),
        }
    }

    /// The next round's order: a permutation of `0..cases`.
    pub fn next_round(&mut self) -> Vec<usize> {
        if self.pending.is_empty() {
            let rows = williams(self.labels.len());
            let pick = self.draw.shuffle(rows.len());
            self.pending = pick
                .into_iter()
                .map(|r| rows[r].iter().map(|&c| self.labels[c]).collect())
                .collect();
        }
        self.pending.pop().unwrap_or_default()
    }
}

/// A Williams design for `n` treatments: rows `r = 0..n` are `first + r
/// (mod n)` with `first = 0, 1, n-1, 2, n-2, ...`, a Latin square in which
/// every ordered pair of treatments stands side by side exactly once. For
/// odd `n` the square alone does not balance neighbours, so its mirrored
/// rows are added: `2n` rows, every ordered pair side by side twice.
fn williams(n: usize) -> Vec<Vec<usize>> {
    let first: Vec<usize> = (0..n)
        .map(|j| match j {
            0 => 0,
            j if j % 2 == 1 => j.div_ceil(2),
            j => n - j / 2,
        })
        .collect();
    let mut rows: Vec<Vec<usize>> = (0..n.max(1))
        .map(|r| first.iter().map(|&c| (c + r) % n).collect())
        .collect();
    if n % 2 == 1 {
        let mirrored: Vec<Vec<usize>> = rows
            .iter()
            .map(|row| row.iter().rev().copied().collect())
            .collect();
        rows.extend(mirrored);
    }
    rows
}

/// The start order of each stratum of workers (stratum `k`: every case's
/// `k`-th worker), as case indices, balanced so that every case's workers
/// start at the same average place: a worker started earlier in its
/// group ran slower for its whole life here (of twelve, the first about
/// 1.2% slower than its case's other workers and the last 0.8% faster,
/// medians over 60 runs of one-thread encoders on ort and tract), and the
/// paired ratios compare the cases' `k`-th workers round by round. That
/// removes a trend over the starts; what a whole stratum shares cancels
/// in the ratios anyway (round `r` runs every case's worker `r %
/// per_case`), and the extra slowness of a group's very first starts
/// (+1.3% for the first, seen with a seed per run) stays, as a spread
/// between a case's workers that its intervals carry.
///
/// Strata come in pairs, an order and its reverse (every case's places sum
/// to `cases - 1`); an odd number of strata opens with three whose places
/// sum to the same value for every case (odd `cases`) or within one (even):
/// identity, the rotation by half, and the order that starts first the
/// cases whose places so far sum highest. Independent shuffles balance
/// places only on average over seeds, and one seed replays the same orders
/// in every run. The seed draws the labels and each pair's order.
fn start_strata(cases: usize, per_case: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut draw = RoundOrder::new(seed ^ 0x5747_4152_5400_0000);
    let labels = draw.shuffle(cases);
    let n = cases;
    // Each row gives the place of every case (by design index).
    let mut rows: Vec<Vec<usize>> = Vec::new();
    if per_case % 2 == 1 {
        rows.push((0..n).collect());
        if per_case >= 3 {
            let half: Vec<usize> = (0..n).map(|c| (c + n / 2) % n).collect();
            let mut by_sum: Vec<usize> = (0..n).collect();
            by_sum.sort_by_key(|&c| std::cmp::Reverse(c + half[c]));
            let mut last = vec![0; n];
            for (place, &c) in by_sum.iter().enumerate() {
                last[c] = place;
            }
            rows.push(half);
            rows.push(last);
        }
    }
    while rows.len() < per_case {
        let places = draw.shuffle(n);
        let reversed = places.iter().map(|&p| n - 1 - p).collect();
        rows.push(places);
        rows.push(reversed);
    }
    rows.truncate(per_case);
    rows.into_iter()
        .map(|places| {
            let mut order = vec![0; n];
            for (c, &place) in places.iter().enumerate() {
                order[place] = labels[c];
            }
            order
        })
        .collect()
}

/// Starts the `per_case` workers of each of `cases` cases in strata: every
/// case's first worker, then every case's second, and so on, in the
/// orders of [`start_strata`]; returns each case's workers in order, or the
/// report of the first that could not start. Whatever comes with being
/// started early or late (memory the kernel hands out, a cache still warm
/// from the reference run) then favours no case.
///
/// `spawn(i)` begins the start of worker `i = case * per_case + k` and
/// `ready` waits for it to end. The first stratum starts one worker at a
/// time: its load and first-inference times are the case's cold-start
/// figures and must not share the machine. Later strata start `width`
/// workers side by side (a second process only has to be warm, and loading
/// a model is mostly one core's work), which shortens a group's set-up
/// where loading dominates it. A case whose worker could not start gets no
/// more (an unsupported operator fails every process alike, and each
/// failed start is a model load spent for nothing).
pub fn in_stratified_order<P, W, E>(
    cases: usize,
    per_case: usize,
    seed: u64,
    width: usize,
    mut spawn: impl FnMut(usize) -> P,
    mut ready: impl FnMut(P) -> Result<W, E>,
) -> Vec<Result<Vec<W>, E>> {
    let mut out: Vec<Result<Vec<W>, E>> = (0..cases).map(|_| Ok(Vec::new())).collect();
    for (k, order) in start_strata(cases, per_case, seed).into_iter().enumerate() {
        let stratum: Vec<usize> = order.into_iter().filter(|&c| out[c].is_ok()).collect();
        let width = if k == 0 { 1 } else { width.max(1) };
        for chunk in stratum.chunks(width) {
            let pending: Vec<(usize, P)> = chunk
                .iter()
                .map(|&c| (c, spawn(c * per_case + k)))
                .collect();
            for (c, p) in pending {
                match (ready(p), &mut out[c]) {
                    (Ok(w), Ok(workers)) => workers.push(w),
                    (Err(e), slot) => *slot = Err(e),
                    // A case whose start failed in this same chunk keeps
                    // that first report; the one worker more is dropped.
                    (Ok(_), Err(_)) => {}
                }
            }
        }
    }
    out
}

struct CaseState<'w> {
    /// The case's worker processes, used in turn; empty once it is over.
    workers: Vec<Box<dyn CaseWorker + 'w>>,
    /// Set once the case is over (failed, or finished).
    done: Option<WorkerReport>,
    samples: Vec<f64>,
    inner: Vec<f64>,
    info: RoundsInfo,
    measured_ms: f64,
    stop: Option<StopReason>,
}

impl CaseState<'_> {
    fn skip_round(&mut self) {
        self.info.block_runs.push(0);
        self.info.block_medians_ms.push(None);
        if !self.info.inner_block_medians_ms.is_empty() {
            self.info.inner_block_medians_ms.push(None);
        }
        self.info.others_cpu_ms.push(0.0);
        self.info.process.push(0);
    }

    /// Ends the case: every worker finishes; the first report that is not
    /// ok is the case's, else the first.
    fn finish(&mut self, reason: StopReason) {
        let reports: Vec<WorkerReport> = self.workers.drain(..).map(|w| w.finish()).collect();
        if reports.is_empty() {
            return;
        }
        self.stop = Some(reason);
        let bad = reports
            .iter()
            .position(|r| r.status() != crate::record::Status::Ok)
            .unwrap_or(0);
        self.done = reports.into_iter().nth(bad);
    }

    fn ci_met(&self, target: f64) -> bool {
        let medians: Vec<f64> = self
            .info
            .block_medians_ms
            .iter()
            .flatten()
            .copied()
            .collect();
        let p50 = handoff_stats::median(&self.samples);
        handoff_stats::rounds::round_ci(p50, &medians)
            .is_some_and(|[lo, hi]| p50 > 0.0 && (p50 - lo).max(hi - p50) / p50 <= target)
    }
}

/// Runs the rounds of one group. `started[i]` is case `i`'s workers (one
/// or more processes, used in turn from round to round), or its final cell
/// when one of them could not be prepared. `between_rounds` runs after each
/// round (the drift canary). Returns `None` when `stop` was set: the group is
/// not recorded (a resume measures it again).
///
/// `threads[i]` is case `i`'s thread count. A case using fewer threads than
/// the machine has CPUs has its worker pinned, every round, to that round's
/// CPUs (the same for every case, rotating from round to round): the CPUs of
/// a VM need not be equally fast (two vCPUs 7% apart were seen here), and a
/// process the scheduler happened to keep on the slower one would otherwise
/// look slower for as long as it lives.
#[allow(clippy::too_many_arguments)]
pub fn run_group<'w>(
    started: Vec<Result<Vec<Box<dyn CaseWorker + 'w>>, WorkerReport>>,
    threads: &[u32],
    group: &str,
    policy: &Measure,
    seed: u64,
    stop: Option<&AtomicBool>,
    between_rounds: &mut dyn FnMut(u32),
) -> Option<Vec<Outcome>> {
    let mut cases: Vec<CaseState<'w>> = started
        .into_iter()
        .map(|s| {
            let (workers, done) = match s {
                Ok(w) => (w, None),
                Err(r) => (Vec::new(), Some(r)),
            };
            let processes = workers.len().max(1) as u32;
            CaseState {
                workers,
                done,
                samples: Vec::new(),
                inner: Vec::new(),
                info: RoundsInfo {
                    group: group.to_owned(),
                    order_seed: seed,
                    processes,
                    ..Default::default()
                },
                measured_ms: 0.0,
                stop: None,
            }
        })
        .collect();
    let block_ms = policy.block_time().as_secs_f64() * 1e3;
    let min_ms = policy.min_time.as_secs_f64() * 1e3;
    let max_ms = policy.max_time.as_secs_f64() * 1e3;
    let mut order = BalancedOrder::new(seed, cases.len());
    let mut round = 0u32;
    let ncpu = crate::machine::cpu_count();
    let load_before = crate::machine::CpuSnapshot::now();
    for w in cases.iter_mut().flat_map(|c| c.workers.iter_mut()) {
        w.pause();
    }
    loop {
        if cases.iter().all(|c| c.workers.is_empty()) {
            break;
        }
        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return None;
        }
        for (slot, i) in order.next_round().into_iter().enumerate() {
            cases[i].info.slots.push(slot);
            if cases[i].workers.is_empty() {
                cases[i].skip_round();
                continue;
            }
            let k = round as usize % cases[i].workers.len();
            let others: Vec<u32> = cases
                .iter()
                .enumerate()
                .flat_map(|(j, c)| {
                    c.workers
                        .iter()
                        .enumerate()
                        .filter(move |(kk, _)| (j, *kk) != (i, k))
                        .filter_map(|(_, w)| w.pid())
                })
                .collect();
            let remaining =
                u64::from(policy.max_iterations).saturating_sub(cases[i].samples.len() as u64);
            let worker = &mut cases[i].workers[k];
            let t = threads.get(i).copied().unwrap_or(1) as usize;
            if let (Some(pid), true) = (worker.pid(), t < ncpu) {
                // The same CPUs for every case of the round; each process
                // moves on by one at each of its own turns, so no process
                // stays on one CPU (with `round % ncpu`, two processes on
                // two CPUs would each keep one).
                let n = cases[i].workers.len();
                let first = round as usize / n + k;
                let cpus: Vec<usize> = (0..t).map(|c| (first + c) % ncpu).collect();
                cases[i].info.pinned |= crate::machine::pin(pid, &cpus);
            }
            let worker = &mut cases[i].workers[k];
            let cpu_before = others_cpu_ns(&others);
            worker.resume();
            let result = worker.block(block_ms, remaining.max(1));
            worker.pause();
            let others_ms = others_cpu_ns(&others).saturating_sub(cpu_before) as f64 / 1e6;
            let c = &mut cases[i];
            c.info.process.push(k);
            match result {
                Ok(b) => {
                    c.info.block_runs.push(b.samples_ms.len());
                    c.info
                        .block_medians_ms
                        .push(Some(handoff_stats::median(&b.samples_ms)));
                    if !b.inner_ms.is_empty() {
                        // Rounds before the first inner sample had none.
                        c.info
                            .inner_block_medians_ms
                            .resize(c.info.block_runs.len() - 1, None);
                        c.info
                            .inner_block_medians_ms
                            .push(Some(handoff_stats::median(&b.inner_ms)));
                    }
                    c.info
                        .others_cpu_ms
                        .push((others_ms * 1000.0).round() / 1000.0);
                    c.measured_ms += b.samples_ms.iter().sum::<f64>();
                    c.samples.extend(b.samples_ms);
                    c.inner.extend(b.inner_ms);
                    if c.samples.len() >= policy.max_iterations as usize {
                        c.finish(StopReason::MaxIterations);
                    }
                }
                Err(mut report) => {
                    let partial = std::mem::take(&mut report.samples_ms);
                    c.info.block_runs.push(partial.len());
                    c.info.block_medians_ms.push(None);
                    c.info
                        .others_cpu_ms
                        .push((others_ms * 1000.0).round() / 1000.0);
                    c.samples.extend(partial);
                    // The case's other processes are stopped with it.
                    c.workers.clear();
                    c.done = Some(report);
                }
            }
        }
        round += 1;
        between_rounds(round);
        let live: Vec<&CaseState> = cases.iter().filter(|c| !c.workers.is_empty()).collect();
        if live.is_empty() {
            break;
        }
        let enough = round >= policy.rounds
            && live.iter().all(|c| {
                c.measured_ms >= min_ms && c.samples.len() >= policy.min_iterations as usize
            });
        let stop_reason = if enough && live.iter().all(|c| c.ci_met(policy.target_ci)) {
            Some(StopReason::Converged)
        } else if round >= policy.rounds.min(ROUNDS_WITHIN_MAX_TIME)
            && live.iter().any(|c| c.measured_ms >= max_ms)
        {
            Some(StopReason::MaxTime)
        } else {
            None
        };
        if let Some(reason) = stop_reason {
            for c in &mut cases {
                c.finish(reason);
            }
            break;
        }
        for c in cases.iter_mut().filter(|c| !c.workers.is_empty()) {
            if c.measured_ms >= SLOW_CASE_MAX_TIMES * max_ms
                && c.info.block_medians_ms.iter().flatten().count() >= ROUNDS_ALONE
            {
                c.finish(StopReason::MaxTime);
            }
        }
    }
    // A stop that came during a block killed workers: their cells would
    // read as timeouts they were not, and a resume would skip them.
    if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
        return None;
    }
    // Everything the group's workers (and their children) did is the
    // group's own work; anything else is someone else's.
    let load = load_before.load_until(&crate::machine::CpuSnapshot::now());
    let measured: Vec<Vec<Option<(usize, f64)>>> = cases
        .iter()
        .filter(|c| c.info.processes > 1)
        .map(|c| c.info.by_process())
        .collect();
    let process_var = handoff_stats::rounds::process_variances(&measured);
    for (c, v) in cases
        .iter_mut()
        .filter(|c| c.info.processes > 1)
        .zip(process_var)
    {
        c.info.process_var = v.map(|v| v.var);
        c.info.process_df = v.map(|v| v.df).filter(|d| d.is_finite());
    }
    Some(
        cases
            .into_iter()
            .map(|c| {
                let mut report = c.done.unwrap_or_default();
                if report.status() == crate::record::Status::Ok {
                    report.machine = Some(load.clone());
                }
                // A case that failed or hung part-way keeps what it measured.
                if !c.samples.is_empty() {
                    let status = report.status();
                    if status != crate::record::Status::Ok {
                        let why = report.reason.unwrap_or_default();
                        let n = c.samples.len();
                        report.reason = Some(if status == crate::record::Status::Timeout {
                            format!("{why}; {n} timed samples gathered before the kill are kept")
                        } else {
                            format!(
                                "{why}; {n} timed samples from {} rounds before that are kept",
                                c.info.block_medians_ms.iter().flatten().count()
                            )
                        });
                    }
                    report.samples_ms = c.samples;
                    report.inner_samples_ms = c.inner;
                }
                if report.status() == crate::record::Status::Ok {
                    report.stop = c.stop.or(report.stop);
                }
                Outcome {
                    report,
                    rounds: c.info,
                }
            })
            .collect(),
    )
}

fn others_cpu_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| crate::machine::process_cpu_ns(*p))
        .sum()
}

/// The drift canary: a fixed single-threaded f32 matmul (128 x 128 x 128,
/// 4.2 MFLOP), timed five times; the median in ms. The same work on the
/// same machine, so its changes over a run are the machine's.
pub fn canary_ms() -> f64 {
    const N: usize = 128;
    let a: Vec<f32> = (0..N * N).map(|i| (i % 7) as f32 * 0.25).collect();
    let b: Vec<f32> = (0..N * N).map(|i| (i % 5) as f32 * 0.5).collect();
    let mut c = vec![0f32; N * N];
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            c.iter_mut().for_each(|x| *x = 0.0);
            for i in 0..N {
                for k in 0..N {
                    let aik = std::hint::black_box(a[i * N + k]);
                    let row = &b[k * N..(k + 1) * N];
                    let out = &mut c[i * N..(i + 1) * N];
                    for (o, bv) in out.iter_mut().zip(row) {
                        *o += aik * bv;
                    }
                }
            }
            std::hint::black_box(&c);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[2]
}

/// The canary on CPU 0 (the same CPU every time, since CPUs differ), this
/// thread's affinity restored afterwards; `None` if it cannot be pinned.
pub fn canary_on_cpu0() -> Option<f64> {
    let all: Vec<usize> = (0..crate::machine::cpu_count()).collect();
    if !crate::machine::pin(0, &[0]) {
        return None;
    }
    let ms = canary_ms();
    crate::machine::pin(0, &all);
    Some(ms).filter(|m| m.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::BlockResult;
    use std::time::Duration;

    #[test]
    fn each_round_is_a_permutation_and_the_order_follows_the_seed() {
        let mut a = RoundOrder::new(42);
        let mut b = RoundOrder::new(42);
        let mut c = RoundOrder::new(43);
        let mut differs = false;
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..50 {
            let x = a.shuffle(6);
            let mut sorted = x.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..6).collect::<Vec<_>>());
            assert_eq!(x, b.shuffle(6));
            differs |= x != c.shuffle(6);
            firsts.insert(x[0]);
        }
        assert!(differs);
        // Every case leads some round.
        assert_eq!(firsts.len(), 6);
    }

    /// Over each cycle every case takes every place equally often and
    /// every ordered pair of cases stands side by side equally often; the
    /// orders follow the seed.
    #[test]
    fn balanced_rounds_give_every_case_every_place_and_neighbour() {
        for n in 1..=7 {
            let cycle = if n % 2 == 0 { n } else { 2 * n };
            let mut order = BalancedOrder::new(7, n);
            let mut again = BalancedOrder::new(7, n);
            let mut other = BalancedOrder::new(8, n);
            let mut differs = n < 3;
            for _ in 0..3 {
                let mut places = vec![vec![0usize; n]; n];
                let mut pairs = vec![vec![0usize; n]; n];
                for _ in 0..cycle {
                    let round = order.next_round();
                    let mut sorted = round.clone();
                    sorted.sort_unstable();
                    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
                    assert_eq!(round, again.next_round());
                    differs |= round != other.next_round();
                    for (place, &c) in round.iter().enumerate() {
                        places[c][place] += 1;
                    }
                    for w in round.windows(2) {
                        pairs[w[0]][w[1]] += 1;
                    }
                }
                let each = cycle / n;
                assert!(
                    places.iter().flatten().all(|&k| k == each),
                    "n {n}: {places:?}"
                );
                for (a, row) in pairs.iter().enumerate() {
                    for (b, &k) in row.iter().enumerate() {
                        let want = if a == b { 0 } else { cycle / n };
                        assert_eq!(k, want, "n {n}: {a} before {b}: {pairs:?}");
                    }
                }
            }
            assert!(differs, "n {n}");
        }
    }

    #[test]
    fn every_case_starts_its_workers_at_the_same_average_place() {
        for n in 1..9 {
            for per_case in 1..8 {
                let strata = start_strata(n, per_case, 11);
                assert_eq!(strata.len(), per_case);
                let mut sums = vec![0; n];
                for order in &strata {
                    let mut sorted = order.clone();
                    sorted.sort_unstable();
                    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n {n}: {strata:?}");
                    for (place, &c) in order.iter().enumerate() {
                        sums[c] += place;
                    }
                }
                let spread = sums.iter().max().unwrap() - sums.iter().min().unwrap();
                // One stratum cannot be balanced; two or more are, exactly
                // or (odd strata, even cases) within one place.
                let allowed = match per_case {
                    1 => n.saturating_sub(1),
                    k if k % 2 == 1 => usize::from(n % 2 == 0),
                    _ => 0,
                };
                assert!(spread <= allowed, "n {n} k {per_case}: {strata:?}");
                assert_eq!(strata, start_strata(n, per_case, 11));
            }
        }
        assert_ne!(start_strata(6, 3, 1), start_strata(6, 3, 2));
    }

    #[test]
    fn workers_start_in_strata_of_one_per_case() {
        // Events: (true, i) when worker i is spawned, (false, i) when it is
        // waited for.
        let events = std::cell::RefCell::new(Vec::new());
        let out = in_stratified_order(
            5,
            3,
            9,
            2,
            |i| {
                events.borrow_mut().push((true, i));
                i
            },
            |i| {
                events.borrow_mut().push((false, i));
                Ok::<_, ()>(i * 10)
            },
        );
        let expected: Vec<Result<Vec<usize>, ()>> = (0..5)
            .map(|c| Ok((0..3).map(|k| (c * 3 + k) * 10).collect()))
            .collect();
        assert_eq!(out, expected);
        let events = events.into_inner();
        let started: Vec<usize> = events.iter().filter(|e| e.0).map(|e| e.1).collect();
        for (k, stratum) in started.chunks(5).enumerate() {
            let mut cases: Vec<usize> = stratum.iter().map(|i| i / 3).collect();
            assert!(stratum.iter().all(|i| i % 3 == k), "{started:?}");
            cases.sort_unstable();
            assert_eq!(cases, [0, 1, 2, 3, 4]);
        }
        // How many workers were starting at once, at each spawn.
        let mut starting = 0usize;
        let mut at_spawn = Vec::new();
        for &(spawned, _) in &events {
            if spawned {
                starting += 1;
                at_spawn.push(starting);
            } else {
                starting -= 1;
            }
        }
        // The first stratum alone; later ones two at a time (five cases:
        // two pairs and one alone).
        assert_eq!(at_spawn[..5], [1, 1, 1, 1, 1], "{events:?}");
        for stratum in at_spawn[5..].chunks(5) {
            assert_eq!(stratum, [1, 2, 1, 2, 1], "{events:?}");
        }
    }

    #[test]
    fn a_case_whose_worker_fails_to_start_gets_no_more() {
        // Case 1's first worker fails; case 3's second one does.
        let spawned = std::cell::RefCell::new(Vec::new());
        let out = in_stratified_order(
            4,
            3,
            5,
            2,
            |i| {
                spawned.borrow_mut().push(i);
                i
            },
            |i| if i == 3 || i == 10 { Err(i) } else { Ok(i) },
        );
        assert_eq!(out[0], Ok(vec![0, 1, 2]));
        assert_eq!(out[1], Err(3));
        assert_eq!(out[2], Ok(vec![6, 7, 8]));
        assert_eq!(out[3], Err(10));
        let mut spawned = spawned.into_inner();
        spawned.sort_unstable();
        assert_eq!(spawned, [0, 1, 2, 3, 6, 7, 8, 9, 10]);
    }

    /// A policy that stops only on time (no CI target).
    fn policy(min_time: Duration, max_time: Duration, rounds: u32) -> Measure {
        Measure {
            warmup: Duration::ZERO,
            min_iterations: 1,
            max_iterations: 1_000_000,
            min_time,
            max_time,
            target_ci: 0.0,
            rounds,
            processes: 1,
            settle: Duration::from_millis(50),
        }
    }

    /// One run of `ms` per block, by the clock of the test.
    struct Fixed {
        ms: f64,
    }

    impl CaseWorker for Fixed {
        fn block(&mut self, time_ms: f64, max_runs: u64) -> Result<BlockResult, WorkerReport> {
            let runs = ((time_ms / self.ms) as u64).clamp(1, max_runs);
            Ok(BlockResult {
                samples_ms: vec![self.ms; runs as usize],
                ..Default::default()
            })
        }
        fn finish(self: Box<Self>) -> WorkerReport {
            WorkerReport {
                status: Some(crate::record::Status::Ok),
                ..Default::default()
            }
        }
        fn pid(&self) -> Option<u32> {
            None
        }
    }

    #[test]
    fn a_case_far_slower_than_its_group_leaves_after_six_rounds() {
        let policy = policy(Duration::from_secs(1), Duration::from_secs(2), 30);
        // 100 ms blocks: the fast case measures 100 ms a round; the slow
        // one 5 s, ten times max_time after four rounds.
        let started: Vec<Result<Vec<Box<dyn CaseWorker>>, WorkerReport>> = vec![
            Ok(vec![Box::new(Fixed { ms: 1.0 })]),
            Ok(vec![Box::new(Fixed { ms: 5000.0 })]),
        ];
        let out = run_group(started, &[1, 1], "g", &policy, 7, None, &mut |_| {}).unwrap();
        let measured = |o: &Outcome| o.rounds.block_medians_ms.iter().flatten().count();
        assert_eq!(measured(&out[1]), ROUNDS_ALONE);
        assert_eq!(out[1].report.stop, Some(StopReason::MaxTime));
        // The fast case goes on to its own max_time (2 s at 100 ms a
        // round), past the ten rounds the slow one would have held it to.
        assert_eq!(measured(&out[0]), 20);
        assert_eq!(out[0].rounds.block_medians_ms.len(), 20);
        assert_eq!(out[1].rounds.block_medians_ms.len(), 20);
    }

    /// A worker killed by the stop flag in its first block, as a worker
    /// process is when the run is interrupted.
    struct Interrupted<'a>(&'a AtomicBool);

    impl CaseWorker for Interrupted<'_> {
        fn block(&mut self, _: f64, _: u64) -> Result<BlockResult, WorkerReport> {
            self.0.store(true, Ordering::SeqCst);
            Err(WorkerReport {
                status: Some(crate::record::Status::Timeout),
                reason: Some("killed".into()),
                samples_ms: vec![1.0; 3],
                ..Default::default()
            })
        }
        fn finish(self: Box<Self>) -> WorkerReport {
            WorkerReport::default()
        }
        fn pid(&self) -> Option<u32> {
            None
        }
    }

    #[test]
    fn a_group_interrupted_inside_a_block_is_not_recorded() {
        let policy = policy(Duration::from_millis(100), Duration::from_secs(1), 3);
        let stop = AtomicBool::new(false);
        // Whichever case runs first, the interrupt ends every live worker.
        let started: Vec<Result<Vec<Box<dyn CaseWorker>>, WorkerReport>> = vec![
            Ok(vec![Box::new(Interrupted(&stop))]),
            Ok(vec![Box::new(Interrupted(&stop))]),
        ];
        let out = run_group(started, &[1, 1], "g", &policy, 7, Some(&stop), &mut |_| {});
        assert!(out.is_none());
    }

    #[test]
    fn canary_takes_milliseconds() {
        let ms = canary_ms();
        assert!(ms > 0.0 && ms < 1000.0, "{ms}");
    }
}
