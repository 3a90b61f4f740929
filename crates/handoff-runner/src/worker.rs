//! What runs inside one case: load, first inference, parity check, warm-up,
//! timed loop. The same code runs in a child process (`handoff __worker`)
//! or in-process.

use std::path::PathBuf;
use std::time::Instant;

use handoff_backend::{
    BackendError, ExecutionKind, ModelRef, Parity, PrepareOptions, Prepared, Probe, Registry,
    Tensor, compare, load_tensors, min_row_cosine, save_tensors,
};
use handoff_suite::expected::Expected;
use handoff_suite::{Case, Measure, Scenario};
use serde::{Deserialize, Serialize};

use crate::http_case::Alternation;
use crate::machine::{CpuSnapshot, MachineLoad, peak_rss_mb};
use crate::measure::{StopReason, measure};
use crate::record::{LoadStats, Status};
pub use handoff_results::ColdStart;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub case: Case,
    pub model_path: PathBuf,
    /// The HF directory the model was converted from (native backends).
    pub model_hf_dir: Option<PathBuf>,
    pub seed: u64,
    pub measure: Measure,
    /// Where the timed loop leaves the samples gathered so far, for a
    /// parent that has to kill a hanging case.
    #[serde(default)]
    pub partial_path: Option<PathBuf>,
    /// Cap on the worker's heap (RLIMIT_DATA), in MiB.
    #[serde(default)]
    pub memory_limit_mb: Option<u64>,
    /// When the parent started the worker process (seconds since the Unix
    /// epoch): cold start is timed from there.
    #[serde(default)]
    pub spawned_unix_s: Option<f64>,
    pub backend_options: serde_json::Value,
    pub mode: JobMode,
    /// Measure in blocks the parent asks for (interleaved rounds) instead of
    /// one timed loop: after warm-up the worker says it is ready and then
    /// runs a block per [`BlockCommand`].
    #[serde(default)]
    pub rounds: bool,
    /// Environment of the worker process beyond the parent's (a model's
    /// `ort_library` as `ORT_DYLIB_PATH`); only a worker process can have
    /// it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Recorded outputs to check the backend against before measuring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<Expected>,
}

/// What the parent asks a worker measuring in rounds to do next.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockCommand {
    /// Timed runs for `time_ms` (at least one run, at most `max_runs`).
    Block { time_ms: f64, max_runs: u64 },
    /// Stop measuring and send the final report.
    Finish,
}

/// One block's timed runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockResult {
    pub samples_ms: Vec<f64>,
    #[serde(default)]
    pub inner_ms: Vec<f64>,
    /// Untimed runs that started the block (`measure.settle`: a worker
    /// resumed after other cases' blocks is slower for a while).
    #[serde(default)]
    pub settle_runs: u32,
}

/// The worker's side of the rounds conversation.
pub trait BlockLink {
    /// Warm-up is done; blocks may be asked for.
    fn ready(&mut self);
    /// The next command; `None` when the parent has gone (finish).
    fn next(&mut self) -> Option<BlockCommand>;
    fn send(&mut self, block: &BlockResult);
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobMode {
    /// Measure the case; compare outputs with the reference file if given.
    Measure { reference: Option<ReferenceFile> },
    /// Run once and save the outputs as the reference for this input key.
    Reference { save_to: PathBuf },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceFile {
    pub path: PathBuf,
    pub backend: String,
    pub atol: f64,
    pub rtol: f64,
    /// Check by per-row cosine similarity instead of allclose (variants).
    #[serde(default)]
    pub min_cosine: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub status: Option<Status>,
    pub reason: Option<String>,
    pub backend_version: Option<String>,
    pub execution: Option<ExecutionKind>,
    pub load_ms: Option<f64>,
    pub first_ms: Option<f64>,
    pub samples_ms: Vec<f64>,
    /// The backend's own clock per timed run (Python baseline), ms.
    #[serde(default)]
    pub inner_samples_ms: Vec<f64>,
    pub warmup_runs: u64,
    pub stop: Option<StopReason>,
    pub parity: Option<Parity>,
    /// The check against recorded outputs (`Job::expected`).
    #[serde(default)]
    pub expected: Option<Parity>,
    pub machine: Option<MachineLoad>,
    pub peak_rss_mb: Option<f64>,
    /// Load scenarios: rates, saturation, peak search.
    #[serde(default)]
    pub load: Option<LoadStats>,
    #[serde(default)]
    pub cold: Option<ColdStart>,
}

pub(crate) fn unix_now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl WorkerReport {
    pub fn status(&self) -> Status {
        self.status.unwrap_or(Status::Failed)
    }

    fn fail(mut self, err: &BackendError) -> Self {
        let (status, reason) = match err {
            BackendError::Unsupported(r) => (Status::Unsupported, r.clone()),
            BackendError::Unavailable(r) => (Status::Unavailable, r.clone()),
            BackendError::InvalidModel(r) => (Status::Failed, format!("invalid model: {r}")),
            BackendError::Failed(r) => (Status::Failed, r.clone()),
        };
        self.status = Some(status);
        self.reason = Some(reason);
        self.peak_rss_mb = peak_rss_mb();
        self
    }
}

/// Runs every recorded data set and compares the outputs with the
/// recorded ones (`first`: the outputs on `inputs`, which are the first
/// set's); leaves `inputs` bound for the timed runs. The result is the
/// worst set: largest differences, and the first set that failed.
fn check_expected(
    prepared: &mut dyn Prepared,
    first: &[Tensor],
    inputs: &[Tensor],
    expected: &Expected,
) -> Result<Parity, BackendError> {
    let n = expected.sets.len();
    let mut worst = Parity {
        reference: format!(
            "expected outputs ({n} data set{})",
            if n == 1 { "" } else { "s" }
        ),
        max_abs: 0.0,
        max_rel: 0.0,
        atol: expected.atol,
        rtol: expected.rtol,
        ok: true,
        detail: None,
        min_cosine: None,
    };
    let mut rebind = false;
    for (k, set) in expected.sets.iter().enumerate() {
        let set_inputs: Vec<Tensor> = set.inputs.iter().map(|s| s.generate(0)).collect();
        let got = if k == 0 && set_inputs == inputs {
            first.to_vec()
        } else {
            rebind = true;
            prepared.bind(&set_inputs)?;
            prepared.run()?;
            prepared.outputs()?
        };
        let mut want = Vec::new();
        let mut picked = Vec::new();
        for o in &set.outputs {
            want.push(
                handoff_backend::read_pb(&o.path).map_err(|e| {
                    BackendError::Failed(format!("expected output `{}`: {e}", o.name))
                })?,
            );
            picked.push(got.get(o.index).cloned().ok_or_else(|| {
                BackendError::Failed(format!(
                    "the backend gave {} outputs; the expected data has output `{}` at {}",
                    got.len(),
                    o.name,
                    o.index
                ))
            })?);
        }
        let p = compare(
            &picked,
            &want,
            &worst.reference,
            expected.atol,
            expected.rtol,
        );
        worst.max_abs = worst.max_abs.max(p.max_abs);
        worst.max_rel = worst.max_rel.max(p.max_rel);
        if !p.ok && worst.ok {
            worst.ok = false;
            worst.detail = Some(format!(
                "{}: {}",
                set.name,
                p.detail.unwrap_or_else(|| format!(
                    "max abs {:.3e} > atol {:.0e} + rtol {:.0e} x |expected|",
                    p.max_abs, expected.atol, expected.rtol
                ))
            ));
        }
    }
    if rebind {
        prepared.bind(inputs)?;
    }
    Ok(worst)
}

/// Runs a job to completion and says what happened; never panics on a
/// backend error (a panic inside a runtime is caught by the caller).
pub fn execute_job(job: &Job, registry: &Registry) -> WorkerReport {
    execute_job_linked(job, registry, None)
}

/// [`execute_job`]; a job with `rounds` set measures in the blocks `link`
/// asks for.
pub fn execute_job_linked(
    job: &Job,
    registry: &Registry,
    link: Option<&mut dyn BlockLink>,
) -> WorkerReport {
    let mut report = WorkerReport::default();
    let case = &job.case;
    let Some(backend) = registry.get(&case.backend) else {
        report.status = Some(Status::Unavailable);
        report.reason = Some(format!(
            "backend `{}` is not compiled into this build",
            case.backend
        ));
        return report;
    };
    report.execution = Some(backend.execution_kind());
    match backend.probe(case.device) {
        Probe::Available { version, .. } => report.backend_version = Some(version),
        Probe::Unavailable { reason } => {
            report.status = Some(Status::Unavailable);
            report.reason = Some(reason);
            return report;
        }
    }
    let inputs: Vec<Tensor> = case.inputs.iter().map(|s| s.generate(job.seed)).collect();
    let options = PrepareOptions {
        device: case.device,
        threads: case.threads as usize,
        inputs: case.inputs.clone(),
        options: job.backend_options.clone(),
    };
    let model = ModelRef {
        path: job.model_path.clone(),
        id: case.model.clone(),
        hf_dir: job.model_hf_dir.clone(),
    };
    let t = Instant::now();
    let mut prepared = match backend.prepare(&model, &options) {
        Ok(p) => p,
        Err(e) => return report.fail(&e),
    };
    report.load_ms = Some(ms(t.elapsed()));
    if let Some(v) = prepared.runtime_version() {
        report.backend_version = Some(v);
    }
    let since_spawn = |s: f64| (unix_now_s() - s) * 1e3;
    let to_loaded = job.spawned_unix_s.map(since_spawn);
    if let Err(e) = prepared.bind(&inputs) {
        return report.fail(&e);
    }
    let t = Instant::now();
    if let Err(e) = prepared.run() {
        return report.fail(&e);
    }
    report.first_ms = Some(ms(t.elapsed()));
    let to_first = job.spawned_unix_s.map(since_spawn);
    let outputs = match prepared.outputs() {
        Ok(o) => o,
        Err(e) => return report.fail(&e),
    };
    match &job.mode {
        JobMode::Reference { save_to } => {
            if let Err(e) = save_tensors(save_to, &outputs) {
                return report.fail(&BackendError::Failed(e.to_string()));
            }
            report.status = Some(Status::Ok);
            return report;
        }
        JobMode::Measure { reference: Some(r) } => {
            let reference = match load_tensors(&r.path) {
                Ok(t) => t,
                Err(e) => {
                    return report.fail(&BackendError::Failed(format!("reference outputs: {e}")));
                }
            };
            let mut parity = compare(&outputs, &reference, &r.backend, r.atol, r.rtol);
            if let Some(min) = r.min_cosine
                && parity.detail.is_none()
            {
                // The output the accuracy gate uses (the embedding or
                // logits): per-token states of padded positions carry no
                // meaning and would dominate a cosine over every output.
                let (o, r) = (
                    outputs.len().saturating_sub(1),
                    reference.len().saturating_sub(1),
                );
                let cos = min_row_cosine(&outputs[o..], &reference[r..]);
                parity.min_cosine = Some(cos);
                parity.ok = cos >= min;
                if !parity.ok {
                    parity.detail = Some(format!("min cosine {cos:.6} < {min}"));
                }
            }
            let ok = parity.ok;
            report.parity = Some(parity.clone());
            if !ok {
                report.status = Some(Status::Mismatch);
                report.reason = Some(match &parity.detail {
                    Some(d) => format!("outputs differ from {}: {d}", r.backend),
                    None => format!(
                        "outputs differ from {}: max abs {:.3e} > atol {:.0e} + rtol {:.0e} x |ref|",
                        r.backend, parity.max_abs, r.atol, r.rtol
                    ),
                });
                report.peak_rss_mb = peak_rss_mb();
                return report;
            }
        }
        JobMode::Measure { reference: None } => {}
    }
    if let Some(expected) = &job.expected {
        let check = match check_expected(prepared.as_mut(), &outputs, &inputs, expected) {
            Ok(c) => c,
            Err(e) => return report.fail(&e),
        };
        let ok = check.ok;
        let detail = check.detail.clone();
        report.expected = Some(check);
        if !ok {
            report.status = Some(Status::Mismatch);
            report.reason = Some(format!(
                "outputs differ from the expected outputs in {}: {}",
                expected.dir.display(),
                detail.unwrap_or_default()
            ));
            report.peak_rss_mb = peak_rss_mb();
            return report;
        }
    }
    drop(outputs);
    match &case.scenario {
        Scenario::SingleStream | Scenario::Offline => {}
        Scenario::Server { load } => {
            return server_scenario(report, prepared.as_mut(), job, load);
        }
        Scenario::MultiStream { streams, duration } => {
            drop(prepared);
            return multi_stream(
                report, backend, &options, &model, &inputs, job, *streams, *duration,
            );
        }
        Scenario::Http { .. } => {
            return report.fail(&BackendError::Failed(
                "http cases are run by the runner, not a worker".into(),
            ));
        }
    }
    if let (true, Some(link)) = (job.rounds, link) {
        return in_blocks(report, prepared.as_mut(), job, link, (to_loaded, to_first));
    }
    let before = CpuSnapshot::now();
    let mut progress = |samples: &[std::time::Duration]| {
        let ms: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
        write_partial(job, &ms);
    };
    let timed = match measure(prepared.as_mut(), &job.measure, &mut progress) {
        Ok(t) => t,
        Err(e) => return report.fail(&e),
    };
    report.machine = Some(before.load_until(&CpuSnapshot::now()));
    report.samples_ms = timed.samples.iter().map(|d| ms(*d)).collect();
    if let (Some(to_loaded_ms), Some(to_first_ms)) = (to_loaded, to_first) {
        let runs: Vec<f64> = timed
            .warmup_ms
            .iter()
            .chain(&report.samples_ms)
            .copied()
            .collect();
        let steady = crate::measure::steady_after(&runs, handoff_stats::median(&report.samples_ms));
        report.cold = Some(ColdStart {
            to_loaded_ms,
            to_first_ms,
            to_steady_ms: steady.map(|(_, t)| to_first_ms + t),
            steady_after_runs: steady.map(|(n, _)| n),
        });
    }
    report.inner_samples_ms = timed.inner_ms;
    report.warmup_runs = timed.warmup_runs;
    report.stop = Some(timed.stop);
    report.status = Some(Status::Ok);
    report.peak_rss_mb = peak_rss_mb();
    report
}

/// Leaves the samples so far where a parent that has to kill this worker
/// finds them (atomically replaced).
fn write_partial(job: &Job, samples_ms: &[f64]) {
    if let Some(path) = &job.partial_path {
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec(samples_ms).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// The samples a killed worker left behind (and the file removed).
pub(crate) fn take_partial(path: Option<&std::path::Path>) -> Vec<f64> {
    let Some(p) = path else {
        return Vec::new();
    };
    let samples = std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<f64>>(&b).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_file(p);
    samples
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Warm-up, then the blocks the parent asks for. The samples travel with
/// each block (the parent keeps them, so a case killed later loses none);
/// the final report carries the rest.
fn in_blocks(
    mut report: WorkerReport,
    prepared: &mut dyn Prepared,
    job: &Job,
    link: &mut dyn BlockLink,
    (to_loaded, to_first): (Option<f64>, Option<f64>),
) -> WorkerReport {
    let warmup = match crate::measure::warm_up(prepared, &job.measure) {
        Ok(w) => w,
        Err(e) => return report.fail(&e),
    };
    report.warmup_runs = warmup.len() as u64;
    link.ready();
    let mut first_block = true;
    let mut typical_ms = handoff_stats::median(&warmup);
    while let Some(BlockCommand::Block { time_ms, max_runs }) = link.next() {
        let mut progress = |samples: &[f64]| write_partial(job, samples);
        let settle = crate::measure::settle_for(typical_ms, job.measure.settle);
        let block = match crate::measure::block(prepared, time_ms, max_runs, settle, &mut progress)
        {
            Ok(b) => b,
            Err(e) => return report.fail(&e),
        };
        typical_ms = handoff_stats::median(&block.samples_ms);
        if first_block && let (Some(to_loaded_ms), Some(to_first_ms)) = (to_loaded, to_first) {
            let runs: Vec<f64> = warmup.iter().chain(&block.samples_ms).copied().collect();
            let steady = crate::measure::steady_after(&runs, typical_ms);
            report.cold = Some(ColdStart {
                to_loaded_ms,
                to_first_ms,
                to_steady_ms: steady.map(|(_, t)| to_first_ms + t),
                steady_after_runs: steady.map(|(n, _)| n),
            });
        }
        first_block = false;
        link.send(&block);
    }
    // The machine's load is judged by the parent over the whole group: from
    // in here the other cases' blocks would look like someone else's work.
    report.status = Some(Status::Ok);
    report.peak_rss_mb = peak_rss_mb();
    report
}

/// Poisson arrivals served one at a time by this session: a fixed rate, or
/// the peak search.
fn server_scenario(
    mut report: WorkerReport,
    prepared: &mut dyn Prepared,
    job: &Job,
    load: &handoff_suite::Load,
) -> WorkerReport {
    let (warmup_runs, service_ms) = match crate::measure::warm_up(prepared, &job.measure) {
        Ok(w) => (w.len() as u64, handoff_stats::median(&w)),
        Err(e) => return report.fail(&e),
    };
    report.warmup_runs = warmup_runs;
    let before = CpuSnapshot::now();
    let label = job.case.scenario.label();
    let level_at = |qps: f64, queries: usize| {
        let schedule = handoff_load::poisson_schedule(qps, queries, job.seed);
        handoff_load::run_in_process(qps, &schedule, || prepared.run())
    };
    let (level, stats) =
        match Alternation::of(load).serve(service_ms, label, &mut report.reason, level_at) {
            Ok(x) => x,
            Err(e) => return report.fail(&e),
        };
    report.machine = Some(before.load_until(&CpuSnapshot::now()));
    report.samples_ms = level.latencies_ms;
    report.load = Some(stats);
    report.status = Some(Status::Ok);
    report.peak_rss_mb = peak_rss_mb();
    report
}

/// The record of a peak search: the best level's samples, or the lowest
/// rate's, with `reason` written, when none met the bound.
pub(crate) fn peak_outcome(
    reason: &mut Option<String>,
    label: String,
    peak: handoff_load::Peak,
) -> (handoff_load::Level, LoadStats) {
    let chosen = match peak.best {
        Some(l) => l,
        None => {
            let lowest = peak
                .trace
                .iter()
                .min_by(|a, b| a.target_qps.total_cmp(&b.target_qps))
                .cloned()
                .unwrap_or_else(|| {
                    handoff_load::Level::new(0.0, &[], Vec::new(), 0, Default::default())
                });
            *reason = Some(format!(
                "no rate tried kept p99 under {} ms (lowest: {:.1} QPS, p99 {}){}",
                peak.p99_bound_ms,
                lowest.target_qps,
                lowest.p99_ms.map_or("-".into(), |p| format!("{p:.1} ms")),
                if peak.light_load_miss {
                    "; that rate is light load, so the tail is the requests' own spread and no lower rate would meet the bound"
                } else {
                    ""
                }
            ));
            lowest
        }
    };
    let mut stats = LoadStats::from_level(label, &chosen);
    stats.p99_bound_ms = Some(peak.p99_bound_ms);
    stats.peak_qps = chosen.meets(peak.p99_bound_ms).then_some(chosen.target_qps);
    stats.missed_qps = peak.missed_qps;
    stats.levels = peak.trace;
    (chosen, stats)
}

/// `streams` closed-loop streams in threads, each with its own session
/// (runtimes' sessions are not shared across threads), started together
/// after each has warmed up, for `duration`.
#[allow(clippy::too_many_arguments)]
fn multi_stream(
    mut report: WorkerReport,
    backend: &dyn handoff_backend::Backend,
    options: &PrepareOptions,
    model: &ModelRef,
    inputs: &[Tensor],
    job: &Job,
    streams: u32,
    duration: std::time::Duration,
) -> WorkerReport {
    let barrier = std::sync::Barrier::new(streams as usize);
    let before = std::sync::Mutex::new(None);
    let results: Vec<Result<Vec<f64>, BackendError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams)
            .map(|_| {
                let (barrier, before) = (&barrier, &before);
                s.spawn(move || -> Result<Vec<f64>, BackendError> {
                    let prepared = backend.prepare(model, options);
                    // Every stream reaches the barrier, even a failed one,
                    // so the others are not left waiting.
                    let mut prepared = match prepared.and_then(|mut p| {
                        p.bind(inputs)?;
                        crate::measure::warm_up(p.as_mut(), &job.measure)?;
                        Ok(p)
                    }) {
                        Ok(p) => {
                            barrier.wait();
                            p
                        }
                        Err(e) => {
                            barrier.wait();
                            return Err(e);
                        }
                    };
                    before
                        .lock()
                        .expect("snapshot lock")
                        .get_or_insert_with(CpuSnapshot::now);
                    let start = Instant::now();
                    let mut lat = Vec::new();
                    while start.elapsed() < duration {
                        let t = Instant::now();
                        prepared.run()?;
                        lat.push(ms(t.elapsed()));
                    }
                    Ok(lat)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BackendError::Failed("a stream panicked".into())))
            })
            .collect()
    });
    let mut per_stream = Vec::new();
    for r in results {
        match r {
            Ok(l) => per_stream.push(l),
            Err(e) => return report.fail(&e),
        }
    }
    if let Some(b) = before.into_inner().ok().flatten() {
        report.machine = Some(b.load_until(&CpuSnapshot::now()));
    }
    let completed: usize = per_stream.iter().map(Vec::len).sum();
    let p99 = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        handoff_stats::quantile_sorted(&v, 0.99)
    };
    report.load = Some(LoadStats {
        scenario: job.case.scenario.label(),
        achieved_qps: completed as f64 / duration.as_secs_f64(),
        queries: completed as u64,
        completed: completed as u64,
        streams: Some(streams),
        per_stream_p99_ms: per_stream.iter().map(|l| p99(l)).collect(),
        ..Default::default()
    });
    report.samples_ms = per_stream.into_iter().flatten().collect();
    report.status = Some(Status::Ok);
    report.peak_rss_mb = peak_rss_mb();
    report
}
