//! Runs a plan: references, cases, results streamed to disk.

// A case that ends early hands back its final cell (a WorkerReport) as the
// error: once per case, next to a process start, so its size does not matter.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use handoff_backend::{Probe, Registry};
pub use handoff_results::RunMeta;
use handoff_suite::{Case, Isolation, Plan};
use serde::Serialize;

use crate::isolate::{WorkerCommand, run_in_child, run_in_process};
use crate::machine::Fingerprint;
use crate::record::{Accuracy, CaseIdentity, ResultRecord, SCHEMA_VERSION, Status};
use crate::worker::{Job, JobMode, ReferenceFile, WorkerReport};

/// Cases of a precision variant are checked against the reference backend
/// running the same variant by per-row cosine, not allclose: two runtimes'
/// int8 kernels may round a quantisation boundary differently, and one
/// flip moves everything after it. How far that goes was measured on
/// MiniLM int8 (ORT, 8 sentences): scaling one activation by 1 + 1e-6
/// moved the sentence embeddings to cosine 0.99923 of the unscaled ones,
/// by 1 + 1e-5 to 0.9988-0.9990, so fp32 rounding alone puts two correct
/// runtimes near 0.999. 0.998 stays clear of that and still catches what
/// differs for real, e.g. kernels that saturate (0.993-0.995 on AVX2).
pub const VARIANT_PARITY_MIN_COSINE: f64 = 0.998;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    /// How to start a worker process; required for `isolation: process`.
    pub worker: Option<WorkerCommand>,
    /// Run only cases whose id contains one of these.
    pub filters: Vec<String>,
    /// Run the selected cases this many times (>= 1), for run-to-run noise.
    pub repeat: u32,
    /// `(i, n)`: run only cases with `index % n == i - 1` (1-based shard).
    pub shard: Option<(u32, u32)>,
    /// Continue a run in `out_dir`: skip cases it already holds (same suite
    /// and environment, or refuse).
    pub resume: bool,
    /// Set (by a signal handler) to stop after killing the case in flight;
    /// that case is not recorded, so a resume runs it again.
    pub stop: Option<Arc<AtomicBool>>,
    /// Starts the server of an `http` case (the CLI: `handoff serve`, or
    /// FastAPI for `python-onnxruntime`).
    pub servers: Option<crate::http_case::ServerLauncher>,
    /// Counts a model's FLOPs at given input shapes (the CLI: tract's cost
    /// model), for the roofline.
    pub flops: Option<FlopCounter>,
    /// Measure each case to completion, one after another, instead of in
    /// interleaved rounds per comparison group.
    pub sequential: bool,
}

/// FLOPs per inference of a model file at concrete input shapes.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct FlopCounter(
    pub Arc<dyn Fn(&Path, &[handoff_backend::TensorSpec]) -> Option<f64> + Send + Sync>,
);

impl std::fmt::Debug for FlopCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlopCounter")
    }
}

impl RunOptions {
    /// Every case once, in this process's choice of isolation, nothing
    /// filtered or resumed.
    pub fn new(out_dir: PathBuf) -> Self {
        Self {
            out_dir,
            worker: None,
            filters: Vec::new(),
            repeat: 1,
            shard: None,
            resume: false,
            stop: None,
            servers: None,
            flops: None,
            sequential: false,
        }
    }
}

/// Progress callbacks (the CLI draws a progress bar with them).
pub trait Observer {
    fn started(&mut self, _total: usize) {}
    fn case_started(&mut self, _case: &Case) {}
    fn case_finished(&mut self, _record: &ResultRecord) {}
    /// Something the user should know that is not a case's result (a
    /// comparison group split to fit in memory); it is also in run.json.
    fn warning(&mut self, _note: &str) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

#[derive(Debug, Default)]
pub struct RunSummary {
    pub results: PathBuf,
    /// Cases skipped because a resumed run already had them.
    pub resumed: usize,
    /// The run stopped early (a signal, or `suite_timeout`).
    pub interrupted: bool,
    /// `suite_timeout` was reached.
    pub suite_timeout: bool,
    pub counts: BTreeMap<&'static str, usize>,
    pub busy_cases: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot write results to {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("isolation: process needs a worker command")]
    NoWorker,
    #[error(
        "{0} already holds results: pass --resume to continue that run, or choose another --out"
    )]
    Exists(PathBuf),
    #[error("cannot resume {dir}: {detail}")]
    Resume { dir: PathBuf, detail: String },
}

pub struct Runner<'a> {
    plan: &'a Plan,
    registry: &'a Registry,
    options: RunOptions,
}

impl<'a> Runner<'a> {
    pub fn new(plan: &'a Plan, registry: &'a Registry, options: RunOptions) -> Self {
        Self {
            plan,
            registry,
            options,
        }
    }

    pub fn selected(&self) -> impl Iterator<Item = Case> + '_ {
        let o = &self.options;
        self.plan
            .cases()
            .filter(move |c| is_selected(c, &o.filters, o.shard))
    }

    /// The environment fingerprint for this run, probing each backend.
    pub fn fingerprint(&self) -> Fingerprint {
        let backends = self
            .registry
            .iter()
            .map(|b| {
                let v = match b.probe(handoff_backend::Device::Cpu) {
                    Probe::Available { version, .. } => version,
                    Probe::Unavailable { reason } => format!("unavailable: {reason}"),
                };
                (b.name().to_owned(), v)
            })
            .collect();
        crate::machine::collect_fingerprint(backends)
    }

    pub fn run(&self, observer: &mut dyn Observer) -> Result<RunSummary, RunError> {
        if self.plan.isolation == Isolation::Process && self.options.worker.is_none() {
            return Err(RunError::NoWorker);
        }
        let dir = &self.options.out_dir;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| RunError::Io { path, source }
        };
        std::fs::create_dir_all(dir.join("refs")).map_err(io(dir))?;
        let fingerprint = self.fingerprint();
        let env_hash = fingerprint.hash();
        let env_path = dir.join("env.json");
        std::fs::write(
            &env_path,
            serde_json::to_vec_pretty(&fingerprint).unwrap_or_default(),
        )
        .map_err(io(&env_path))?;
        let suite_copy = dir.join("suite.yaml");
        if let Ok(text) = std::fs::read(&self.plan.suite_path) {
            std::fs::write(&suite_copy, text).map_err(io(&suite_copy))?;
        }
        let results_path = dir.join("results.jsonl");
        let mut meta = RunMeta {
            suite: self.plan.name.clone(),
            suite_sha256: self.plan.suite_sha256.clone(),
            env: env_hash.clone(),
            measurement: if self.options.sequential {
                "sequential".into()
            } else {
                "interleaved".into()
            },
            canary: Vec::new(),
            split_groups: Vec::new(),
            seed: self.plan.seed,
            not_run: self.plan.not_run(),
        };
        let done = self.prepare_dir(dir, &results_path, &mut meta)?;
        let mut results = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results_path)
            .map_err(io(&results_path))?;

        let repeat = self.options.repeat.max(1);
        let total = self.selected().count() * repeat as usize - done.len();
        observer.started(total);
        let mut summary = RunSummary {
            results: results_path.clone(),
            resumed: done.len(),
            ..Default::default()
        };
        let run_start = Instant::now();
        let stopped = || {
            self.options
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::SeqCst))
        };
        let mut references: HashMap<String, Result<PathBuf, String>> = HashMap::new();
        let mut flops: HashMap<(PathBuf, String), Option<f64>> = HashMap::new();
        let comparisons_path = dir.join("comparisons.jsonl");
        let mut comparisons = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&comparisons_path)
            .map_err(io(&comparisons_path))?;
        let mut ctx = Ctx {
            references: &mut references,
            flops: &mut flops,
            env: &env_hash,
        };
        if let Some(note) = self.oversubscription() {
            observer.warning(&note);
        }
        'units: for rep in 0..repeat {
            let pending: Vec<Case> = self
                .selected()
                .filter(|c| !done.contains(&(c.id.clone(), rep)))
                .collect();
            let known = meta.split_groups.len();
            let units = self.units(pending, &mut meta.split_groups);
            for note in &meta.split_groups[known..] {
                observer.warning(note);
            }
            for unit in units {
                if stopped() {
                    summary.interrupted = true;
                    break 'units;
                }
                if self
                    .plan
                    .suite_timeout
                    .is_some_and(|limit| run_start.elapsed() >= limit)
                {
                    summary.interrupted = true;
                    summary.suite_timeout = true;
                    break 'units;
                }
                let records = match unit {
                    Unit::Single(case) => {
                        observer.case_started(&case);
                        let record = self.measure_single(&case, rep, &mut ctx);
                        if stopped() {
                            // The case in flight was killed: not a result;
                            // a resume runs it again.
                            summary.interrupted = true;
                            break 'units;
                        }
                        vec![record]
                    }
                    Unit::Group(key, cases) => {
                        for c in &cases {
                            observer.case_started(c);
                        }
                        let seed = group_seed(self.plan.seed, &key, rep);
                        let mut canary = |round: u32| {
                            meta.canary.push(crate::rounds::CanaryPoint {
                                t_s: (run_start.elapsed().as_secs_f64() * 1e3).round() / 1e3,
                                group: key.clone(),
                                round,
                                ms: crate::rounds::canary_on_cpu0(),
                            });
                        };
                        let Some(records) =
                            self.measure_group(&key, &cases, rep, seed, &mut ctx, &mut canary)
                        else {
                            summary.interrupted = true;
                            break 'units;
                        };
                        write_comparisons(
                            &mut comparisons,
                            &comparisons_path,
                            &records,
                            &self.plan.check.reference,
                        )?;
                        let meta_path = dir.join("run.json");
                        std::fs::write(
                            &meta_path,
                            serde_json::to_vec_pretty(&meta).unwrap_or_default(),
                        )
                        .map_err(io(&meta_path))?;
                        records
                    }
                    Unit::Http(key, cases) => {
                        for c in &cases {
                            observer.case_started(c);
                        }
                        let seed = group_seed(self.plan.seed, &key, rep);
                        let Some(records) =
                            self.measure_http_group(&key, &cases, rep, seed, &mut ctx)
                        else {
                            summary.interrupted = true;
                            break 'units;
                        };
                        write_comparisons(
                            &mut comparisons,
                            &comparisons_path,
                            &records,
                            &self.plan.check.reference,
                        )?;
                        records
                    }
                };
                for record in records {
                    write_line(&mut results, &record).map_err(io(&results_path))?;
                    *summary.counts.entry(record.status.as_str()).or_default() += 1;
                    if record.machine.as_ref().is_some_and(|m| m.busy) {
                        summary.busy_cases += 1;
                    }
                    observer.case_finished(&record);
                }
            }
        }
        Ok(summary)
    }

    /// The order of work for one repeat: cases that are compared with each
    /// other (same inputs, device, batch, dims, one-query-at-a-time
    /// scenario) as one group measured in rounds, in order of their first
    /// case; load scenarios, and everything under `--sequential`, alone.
    fn units(&self, cases: Vec<Case>, split_notes: &mut Vec<String>) -> Vec<Unit> {
        let mut units: Vec<Unit> = Vec::new();
        for case in cases {
            if !self.options.sequential
                && let handoff_suite::Scenario::Http { .. } = &case.scenario
            {
                let key = format!("http-{}", case.group_key());
                match units
                    .iter_mut()
                    .find(|u| matches!(u, Unit::Http(k, _) if *k == key))
                {
                    Some(Unit::Http(_, members)) => members.push(case),
                    _ => units.push(Unit::Http(key, vec![case])),
                }
                continue;
            }
            let interleave = !self.options.sequential
                && matches!(
                    case.scenario,
                    handoff_suite::Scenario::SingleStream | handoff_suite::Scenario::Offline
                );
            if !interleave {
                units.push(Unit::Single(case));
                continue;
            }
            let key = case.group_key();
            match units
                .iter_mut()
                .find(|u| matches!(u, Unit::Group(k, _) if *k == key))
            {
                Some(Unit::Group(_, members)) => members.push(case),
                _ => units.push(Unit::Group(key, vec![case])),
            }
        }
        let budget = crate::machine::available_memory_mb().map(|m| m * 0.6);
        let mut out = Vec::new();
        for unit in units {
            match unit {
                Unit::Group(key, cases) => {
                    let parts = split_for_memory(&cases, budget, |c| self.estimate_mb(c));
                    if parts.len() > 1 {
                        let note = format!(
                            "group {key}: {} cases need ~{:.0} MB with every session alive, more than 60% of available memory ({:.0} MB): measured as {} smaller groups, which are not compared with each other",
                            cases.len(),
                            cases.iter().map(|c| self.estimate_mb(c)).sum::<f64>(),
                            budget.unwrap_or(0.0),
                            parts.len()
                        );
                        if !split_notes.contains(&note) {
                            split_notes.push(note);
                        }
                    }
                    for (i, part) in parts.into_iter().enumerate() {
                        let k = if i == 0 {
                            key.clone()
                        } else {
                            format!("{key}/{i}")
                        };
                        out.push(Unit::Group(k, part));
                    }
                }
                // A server with nothing to alternate with runs alone.
                Unit::Http(_, mut cases) if cases.len() == 1 => {
                    out.push(Unit::Single(cases.remove(0)));
                }
                other => out.push(other),
            }
        }
        out
    }

    /// How the selected cases will be measured, for `--dry-run`: each group
    /// measured in rounds (its key, case ids, estimated memory with every
    /// session alive) and the notes of groups split to fit in memory.
    pub fn group_preview(&self) -> (Vec<GroupPreview>, Vec<String>) {
        let mut notes: Vec<String> = self.oversubscription().into_iter().collect();
        let groups = self
            .units(self.selected().collect(), &mut notes)
            .into_iter()
            .filter_map(|u| match u {
                Unit::Group(key, cases) => Some((
                    key,
                    cases.iter().map(|c| c.id.clone()).collect(),
                    cases.iter().map(|c| self.estimate_mb(c)).sum(),
                )),
                Unit::Single(_) | Unit::Http(..) => None,
            })
            .collect();
        (groups, notes)
    }

    /// What the selected CPU cases that ask for more threads than this
    /// process may run at once (its affinity and cgroup quota) will show:
    /// their threads take turns on the CPUs, so their latency includes
    /// waiting for one.
    pub fn oversubscription(&self) -> Option<String> {
        let cpus = available_cpus();
        let most = self
            .selected()
            .filter(|c| c.device == handoff_backend::Device::Cpu && c.threads > cpus)
            .map(|c| c.threads)
            .max()?;
        Some(format!(
            "threads up to {most} on the {cpus} logical CPU(s) this run may use: those cases' threads take turns on the CPUs, so their latency includes waiting for one; their cells say `oversubscribed`"
        ))
    }

    /// A rough upper bound of a case's memory in interleaved rounds, per
    /// worker process with its session loaded (the process, three copies of
    /// the weights: file, runtime, optimised; an interpreter for Python
    /// backends) times `measure.processes`.
    pub fn estimate_mb(&self, case: &Case) -> f64 {
        let file = self
            .plan
            .model(&case.model)
            .and_then(|m| std::fs::metadata(&m.path).ok())
            .map_or(0.0, |m| m.len() as f64 / 1e6);
        let python = if case.backend.starts_with("python") {
            150.0
        } else {
            0.0
        };
        (60.0 + 3.0 * file + python) * f64::from(self.plan.measure.processes.max(1))
    }

    fn reference_file(
        &self,
        case: &Case,
        model: &handoff_suite::PlanModel,
        ctx: &mut Ctx<'_>,
    ) -> (Result<PathBuf, String>, JobMode) {
        let reference = self.reference_for(case, model, ctx.references, &self.options.out_dir);
        let mode = JobMode::Measure {
            reference: reference.as_ref().ok().map(|path| ReferenceFile {
                path: path.clone(),
                backend: self.plan.check.reference.clone(),
                atol: self.plan.check.atol,
                rtol: self.plan.check.rtol,
                min_cosine: model.variant.as_ref().map(|v| {
                    if v.reference_is_fp32 {
                        v.accuracy.threshold_min_cosine
                    } else {
                        VARIANT_PARITY_MIN_COSINE
                    }
                }),
            }),
        };
        (reference, mode)
    }

    /// One case measured to completion on its own.
    fn measure_single(&self, case: &Case, rep: u32, ctx: &mut Ctx<'_>) -> ResultRecord {
        let start = Instant::now();
        let model = self
            .plan
            .model(&case.model)
            .expect("plan cases name plan models");
        let (reference, mode) = self.reference_file(case, model, ctx);
        let mut report = self.execute(case, model, mode);
        if let (Err(why), Status::Ok) = (&reference, report.status()) {
            report.reason = Some(format!("parity unchecked: {why}"));
        }
        self.finish_record(case, model, report, None, rep, start, ctx)
    }

    /// A group measured in interleaved rounds; `None` when interrupted.
    fn measure_group(
        &self,
        key: &str,
        cases: &[Case],
        rep: u32,
        seed: u64,
        ctx: &mut Ctx<'_>,
        between_rounds: &mut dyn FnMut(u32),
    ) -> Option<Vec<ResultRecord>> {
        let start = Instant::now();
        let mut jobs = Vec::new();
        let mut unchecked = Vec::new();
        for case in cases {
            let model = self
                .plan
                .model(&case.model)
                .expect("plan cases name plan models");
            let (reference, mode) = self.reference_file(case, model, ctx);
            let mut job = self.job(case, model, mode);
            job.rounds = true;
            if let Some(p) = job.partial_path.as_ref().and_then(|p| p.parent()) {
                let _ = std::fs::create_dir_all(p);
            }
            jobs.push(job);
            unchecked.push(reference.err());
        }
        let stop = self.options.stop.as_deref();
        let threads: Vec<u32> = cases.iter().map(|c| c.threads).collect();
        let n = self.plan.measure.processes.max(1) as usize;
        let outcomes = match (&self.plan.isolation, &self.options.worker) {
            (Isolation::Process, Some(cmd)) => {
                let started = crate::rounds::in_stratified_order(
                    jobs.len(),
                    n,
                    seed,
                    crate::machine::cpu_count(),
                    |i| {
                        crate::isolate::LiveChild::spawn(
                            cmd,
                            &process_job(&jobs[i / n], i % n, n),
                            self.plan.timeout,
                            self.options.stop.clone(),
                        )
                    },
                    |starting| {
                        starting?
                            .ready()
                            .map(|w| Box::new(w) as Box<dyn crate::isolate::CaseWorker>)
                    },
                );
                crate::rounds::run_group(
                    started,
                    &threads,
                    key,
                    &self.plan.measure,
                    seed,
                    stop,
                    between_rounds,
                )
            }
            _ => std::thread::scope(|scope| {
                // Workers in threads of this process start one at a time.
                let started = crate::rounds::in_stratified_order(
                    jobs.len(),
                    n,
                    seed,
                    1,
                    |i| {
                        crate::isolate::ThreadWorker::start(
                            scope,
                            process_job(&jobs[i / n], i % n, n),
                            self.registry,
                        )
                        .map(|w| Box::new(w) as Box<dyn crate::isolate::CaseWorker>)
                    },
                    |started| started,
                );
                crate::rounds::run_group(
                    started,
                    &threads,
                    key,
                    &self.plan.measure,
                    seed,
                    stop,
                    between_rounds,
                )
            }),
        }?;
        let elapsed = start.elapsed().as_secs_f64() / cases.len().max(1) as f64;
        Some(
            cases
                .iter()
                .zip(outcomes)
                .zip(unchecked)
                .map(|((case, outcome), why)| {
                    let model = self
                        .plan
                        .model(&case.model)
                        .expect("plan cases name plan models");
                    let mut report = outcome.report;
                    if let (Some(why), Status::Ok) = (why, report.status()) {
                        report.reason = Some(format!("parity unchecked: {why}"));
                    }
                    let mut record = self.finish_record(
                        case,
                        model,
                        report,
                        Some(outcome.rounds),
                        rep,
                        Instant::now(),
                        ctx,
                    );
                    // Wall time shared out: the cases ran side by side.
                    record.wall_s = Some((elapsed * 1000.0).round() / 1000.0);
                    record
                })
                .collect(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_record(
        &self,
        case: &Case,
        model: &handoff_suite::PlanModel,
        report: WorkerReport,
        rounds: Option<crate::rounds::RoundsInfo>,
        rep: u32,
        start: Instant,
        ctx: &mut Ctx<'_>,
    ) -> ResultRecord {
        let mut record = self.record(case, model, report, ctx.env, start.elapsed().as_secs_f64());
        record.repeat = rep;
        if let (Some(info), Some(lat)) = (&rounds, record.latency_ms.as_mut()) {
            let medians: Vec<f64> = info.block_medians_ms.iter().flatten().copied().collect();
            // The CI from the spread of block medians: it widens when the
            // machine drifts, unlike one from samples taken as independent.
            // The group's between-process variance enters too: the median
            // is an average over only `processes` process speeds.
            if let Some(ci) = handoff_stats::rounds::round_ci_with_processes(
                lat.p50,
                &medians,
                info.process_term(),
            ) {
                lat.p50_ci95 = ci;
            }
        }
        record.rounds = rounds;
        if let Some(counter) = &self.options.flops {
            record.flops = *ctx
                .flops
                .entry((model.path.clone(), case.input_key()))
                .or_insert_with(|| (counter.0)(&model.path, &case.inputs));
        }
        record
    }

    /// Creates the run directory, or checks it for `--resume`; returns the
    /// cases (id, repeat) already done.
    fn prepare_dir(
        &self,
        dir: &Path,
        results: &Path,
        meta: &mut RunMeta,
    ) -> Result<HashSet<(String, u32)>, RunError> {
        let meta_path = dir.join("run.json");
        let resume_err = |detail: String| RunError::Resume {
            dir: dir.to_owned(),
            detail,
        };
        let has_results = std::fs::metadata(results).is_ok_and(|m| m.len() > 0);
        if !self.options.resume {
            if has_results {
                return Err(RunError::Exists(dir.to_owned()));
            }
            std::fs::write(
                &meta_path,
                serde_json::to_vec_pretty(meta).unwrap_or_default(),
            )
            .map_err(|source| RunError::Io {
                path: meta_path.clone(),
                source,
            })?;
            return Ok(HashSet::new());
        }
        let old: RunMeta = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                resume_err(format!("{} is missing or unreadable", meta_path.display()))
            })?;
        if old.suite_sha256 != meta.suite_sha256 {
            return Err(resume_err(format!(
                "the suite changed since that run (sha256 {} then, {} now)",
                &old.suite_sha256[..12],
                &meta.suite_sha256[..12]
            )));
        }
        if old.seed != meta.seed {
            return Err(resume_err(format!(
                "that run used seed {}, this one {} (pass --seed {} to continue it)",
                old.seed, meta.seed, old.seed
            )));
        }
        if old.env != meta.env {
            return Err(resume_err(format!(
                "the environment changed since that run (fingerprint {} then, {} now; see env.json)",
                old.env, meta.env
            )));
        }
        // The canary so far carries on into the resumed run.
        meta.canary = old.canary;
        meta.split_groups = old.split_groups;
        if !has_results {
            return Ok(HashSet::new());
        }
        // A torn last line (killed mid-write) is cut off before appending.
        let text = std::fs::read(results).map_err(|source| RunError::Io {
            path: results.to_owned(),
            source,
        })?;
        let keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if keep < text.len() {
            std::fs::write(results, &text[..keep]).map_err(|source| RunError::Io {
                path: results.to_owned(),
                source,
            })?;
        }
        let read = crate::record::read_results(results).map_err(|e| resume_err(e.to_string()))?;
        Ok(read
            .records
            .into_iter()
            .map(|r| (r.case.id, r.repeat))
            .collect())
    }

    fn job(&self, case: &Case, model: &handoff_suite::PlanModel, mode: JobMode) -> Job {
        Job {
            case: case.clone(),
            model_path: model.path.clone(),
            model_hf_dir: model.hf_dir.clone(),
            seed: self.plan.seed,
            measure: self.plan.measure.clone(),
            memory_limit_mb: self.plan.memory_limit_mb,
            spawned_unix_s: None,
            partial_path: Some(
                self.options
                    .out_dir
                    .join("partial")
                    .join(format!("{}.json", sanitize(&case.id))),
            ),
            backend_options: model.options_for(&case.backend),
            env: match (&model.ort_library, &mode) {
                (Some(lib), JobMode::Measure { .. }) if case.backend == "ort" => {
                    [("ORT_DYLIB_PATH".to_owned(), lib.display().to_string())].into()
                }
                _ => Default::default(),
            },
            expected: match &mode {
                JobMode::Measure { .. } => model.expected.as_deref().cloned(),
                JobMode::Reference { .. } => None,
            },
            mode,
            rounds: false,
        }
    }

    fn execute(
        &self,
        case: &Case,
        model: &handoff_suite::PlanModel,
        mode: JobMode,
    ) -> WorkerReport {
        let job = self.job(case, model, mode);
        if let (handoff_suite::Scenario::Http { load }, JobMode::Measure { reference }) =
            (&case.scenario, &job.mode)
        {
            return self.http_case(&job, model, load, reference.as_ref());
        }
        match (&self.plan.isolation, &self.options.worker) {
            (Isolation::Process, Some(cmd)) => {
                let partial = job.partial_path.clone();
                if let Some(p) = partial.as_ref().and_then(|p| p.parent()) {
                    let _ = std::fs::create_dir_all(p);
                }
                let mut report =
                    run_in_child(cmd, &job, self.plan.timeout, self.options.stop.as_deref());
                let samples = crate::worker::take_partial(partial.as_deref());
                if report.status() == Status::Timeout && !samples.is_empty() {
                    report.reason = Some(format!(
                        "{}; {} timed samples gathered before the kill are kept",
                        report.reason.unwrap_or_default(),
                        samples.len()
                    ));
                    report.samples_ms = samples;
                }
                report
            }
            _ => run_in_process(&job, self.registry),
        }
    }

    /// What the server of an `http` case serves, or the case's cell when
    /// it cannot be served.
    fn http_spec<'m>(
        &self,
        case: &Case,
        model: &'m handoff_suite::PlanModel,
    ) -> Result<(crate::http_case::ServerSpec, &'m [String]), Box<WorkerReport>> {
        // A precision variant or lowered copy is an ONNX file of its own;
        // its tokenizer is its suite entry's.
        let tokenizer_dir = model.hf_dir.as_ref().or_else(|| {
            let (entry, _) = handoff_backend::ids::split(&model.id);
            self.plan.model(entry)?.hf_dir.as_ref()
        });
        let (Some(tokenizer_dir), Some(sentences)) = (tokenizer_dir, &model.sentences) else {
            return Err(Box::new(WorkerReport {
                status: Some(Status::Unsupported),
                reason: Some("the http scenario needs a text model with a tokenizer".into()),
                ..Default::default()
            }));
        };
        let spec = crate::http_case::ServerSpec {
            backend: case.backend.clone(),
            model: model.path.clone(),
            // Only where the backend may load the safetensors: not for a
            // variant's ONNX file.
            hf_dir: model.hf_dir.clone(),
            tokenizer: tokenizer_dir.join("tokenizer.json"),
            device: case.device,
            threads: case.threads,
            seq: case.dims.get("seq").copied().unwrap_or(128),
            // Its client sends `batch` texts a request; a batching server
            // gathers requests up to 64 texts.
            max_batch: if case.scenario.load().and_then(|l| l.batch_wait).is_some() {
                case.batch.max(64)
            } else {
                case.batch
            },
            endpoint: case
                .scenario
                .load()
                .map_or(handoff_suite::Endpoint::Embed, |l| l.endpoint),
            batch_wait: case.scenario.load().and_then(|l| l.batch_wait),
            backend_options: model.options_for(&case.backend),
        };
        Ok((spec, sentences))
    }

    fn http_case(
        &self,
        job: &Job,
        model: &handoff_suite::PlanModel,
        load: &handoff_suite::Load,
        reference: Option<&ReferenceFile>,
    ) -> WorkerReport {
        let (spec, sentences) = match self.http_spec(&job.case, model) {
            Ok(s) => s,
            Err(report) => return *report,
        };
        crate::http_case::run(
            job,
            &spec,
            sentences,
            load,
            reference,
            self.options.servers.as_ref(),
            self.plan.timeout,
        )
    }

    /// `http` cases of one load (a rate, or a peak search) whose servers
    /// take turns (see [`crate::http_case::alternate`]); `None` when
    /// interrupted.
    fn measure_http_group(
        &self,
        key: &str,
        cases: &[Case],
        rep: u32,
        seed: u64,
        ctx: &mut Ctx<'_>,
    ) -> Option<Vec<ResultRecord>> {
        let start = Instant::now();
        let mut what = None;
        let mut served = Vec::new();
        let mut unchecked = Vec::new();
        let mut labels = Vec::new();
        for case in cases {
            let model = self
                .plan
                .model(&case.model)
                .expect("plan cases name plan models");
            if let handoff_suite::Scenario::Http { load } = &case.scenario {
                what = Some(crate::http_case::Alternation::of(load));
            }
            let (reference, mode) = self.reference_file(case, model, ctx);
            let job = self.job(case, model, mode);
            let check = match &job.mode {
                JobMode::Measure { reference } => reference.clone(),
                _ => None,
            };
            served.push(self.http_spec(case, model).and_then(|(spec, sentences)| {
                crate::http_case::start(
                    &job,
                    &spec,
                    sentences,
                    check.as_ref(),
                    self.options.servers.as_ref(),
                    self.plan.timeout,
                )
            }));
            unchecked.push(reference.err());
            labels.push(case.scenario.label());
        }
        let outcomes = crate::http_case::alternate(
            served,
            what.expect("an http group holds http cases"),
            &labels,
            key,
            seed,
            self.options.stop.as_deref(),
        )?;
        let elapsed = start.elapsed().as_secs_f64() / cases.len().max(1) as f64;
        Some(
            cases
                .iter()
                .zip(outcomes)
                .zip(unchecked)
                .map(|((case, (mut report, rounds)), why)| {
                    let model = self
                        .plan
                        .model(&case.model)
                        .expect("plan cases name plan models");
                    if let (Some(why), Status::Ok) = (why, report.status()) {
                        report.reason = Some(format!("parity unchecked: {why}"));
                    }
                    let mut record =
                        self.finish_record(case, model, report, rounds, rep, Instant::now(), ctx);
                    record.wall_s = Some((elapsed * 1000.0).round() / 1000.0);
                    record
                })
                .collect(),
        )
    }

    /// Computes (once per input key) the reference backend's outputs.
    fn reference_for(
        &self,
        case: &Case,
        model: &handoff_suite::PlanModel,
        cache: &mut HashMap<String, Result<PathBuf, String>>,
        dir: &Path,
    ) -> Result<PathBuf, String> {
        let key = case.input_key();
        if let Some(r) = cache.get(&key) {
            return r.clone();
        }
        let reference = &self.plan.check.reference;
        let save_to = dir
            .join("refs")
            .join(format!("{}.safetensors", sanitize(&key)));
        let swapped;
        let model = match model
            .variant
            .as_ref()
            .and_then(|v| v.reference_model.clone())
        {
            Some(path) => {
                swapped = handoff_suite::PlanModel {
                    path,
                    ..model.clone()
                };
                &swapped
            }
            None => model,
        };
        let mut ref_case = case.clone();
        ref_case.backend = reference.clone();
        ref_case.device = handoff_backend::Device::Cpu;
        ref_case.threads = 1;
        let report = self.execute(
            &ref_case,
            model,
            JobMode::Reference {
                save_to: save_to.clone(),
            },
        );
        let result = match report.status() {
            Status::Ok => Ok(save_to),
            s => Err(format!(
                "reference backend {reference} {}: {}",
                s.as_str(),
                report.reason.unwrap_or_default()
            )),
        };
        cache.insert(key, result.clone());
        result
    }

    fn record(
        &self,
        case: &Case,
        model: &handoff_suite::PlanModel,
        report: WorkerReport,
        env: &str,
        wall_s: f64,
    ) -> ResultRecord {
        let status = report.status();
        let (latency, throughput) = if status == Status::Ok {
            let s = handoff_stats::summarize(&report.samples_ms);
            // Under load, throughput is what was achieved, not what the
            // median latency would allow one query at a time.
            let t = match &report.load {
                Some(l) => Some(l.achieved_qps * f64::from(case.batch)),
                None => s.as_ref().map(|s| f64::from(case.batch) / (s.p50 / 1e3)),
            };
            (s, t)
        } else {
            (None, None)
        };
        ResultRecord {
            schema: SCHEMA_VERSION,
            suite: self.plan.name.clone(),
            index: case.index,
            case: CaseIdentity {
                id: case.id.clone(),
                model: case.model.clone(),
                model_sha256: model.info.sha256.clone(),
                model_source: model.source.clone(),
                backend: case.backend.clone(),
                backend_version: report.backend_version,
                execution: report.execution,
                device: case.device,
                threads: case.threads,
                batch: case.batch,
                dims: case.dims.clone(),
                scenario: case.scenario.label(),
            },
            status,
            reason: with_oversubscription(report.reason, case, status),
            load_ms: report.load_ms,
            first_ms: report.first_ms,
            latency_ms: latency,
            throughput_items_s: throughput,
            stop: report.stop,
            parity: report.parity,
            expected: report.expected,
            machine: report.machine,
            peak_rss_mb: report.peak_rss_mb,
            wall_s: Some((wall_s * 1000.0).round() / 1000.0),
            samples_ms: if matches!(status, Status::Ok | Status::Timeout) {
                report.samples_ms
            } else {
                Vec::new()
            },
            repeat: 0,
            inner_latency_ms: if status == Status::Ok {
                handoff_stats::summarize(&report.inner_samples_ms)
            } else {
                None
            },
            inner_samples_ms: if status == Status::Ok {
                report.inner_samples_ms
            } else {
                Vec::new()
            },
            accuracy: model.variant.as_ref().map(|v| Accuracy {
                variant: v.name.clone(),
                compared: v.accuracy.compared.clone(),
                min_cosine: v.accuracy.min_cosine,
                max_abs: v.accuracy.max_abs,
                threshold_min_cosine: v.accuracy.threshold_min_cosine,
                label_agreement: v.accuracy.label_agreement,
                passed: v.accuracy.passed,
                // 0: no file of its own (candle-q8 quantises at load).
                size_bytes: if v.reference_is_fp32 && v.reference_model.is_none() {
                    0
                } else {
                    std::fs::metadata(&model.path).map_or(0, |m| m.len())
                },
                fp32_size_bytes: v.fp32_bytes,
                cpu_class: v.accuracy.cpu_class.clone(),
                built: v.built.as_ref().map(|b| handoff_results::BuiltGate {
                    cpu_class: b.cpu_class.clone(),
                    min_cosine: b.min_cosine,
                    passed: b.passed,
                }),
                kept_fp32: v.kept_fp32.clone(),
            }),
            env: env.to_owned(),
            load: report.load,
            cold: report.cold,
            flops: None,
            rounds: None,
        }
    }
}

/// What the cases of a run share while it goes: reference outputs per input
/// key, FLOP counts, the environment hash.
struct Ctx<'a> {
    references: &'a mut HashMap<String, Result<PathBuf, String>>,
    flops: &'a mut HashMap<(PathBuf, String), Option<f64>>,
    env: &'a str,
}

/// A group as `--dry-run` shows it: key, case ids, estimated memory (MB).
pub type GroupPreview = (String, Vec<String>, f64);

/// A case measured alone, or a group measured in rounds.
enum Unit {
    Single(Case),
    Group(String, Vec<Case>),
    /// `http` cases at one fixed rate on the same inputs: their servers
    /// alternate in blocks.
    Http(String, Vec<Case>),
}

/// The job of a case's `k`-th of `n` worker processes: its own file for
/// the samples of a block in flight.
fn process_job(job: &Job, k: usize, n: usize) -> Job {
    let mut job = job.clone();
    if n > 1
        && let Some(p) = job.partial_path.as_mut()
    {
        let mut name = p.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".p{k}"));
        p.set_file_name(name);
    }
    job
}

/// Splits a group into consecutive parts whose estimated memory fits
/// `budget_mb` (one part when it fits, or when nothing is known).
fn split_for_memory(
    cases: &[Case],
    budget_mb: Option<f64>,
    estimate: impl Fn(&Case) -> f64,
) -> Vec<Vec<Case>> {
    let Some(budget) = budget_mb else {
        return vec![cases.to_vec()];
    };
    // Cases with the same thread count stay together where they fit: the
    // report's backend-against-backend (and Python) comparisons are at
    // equal threads; thread scaling is what a split gives up first.
    let mut by_threads: std::collections::BTreeMap<u32, Vec<&Case>> = Default::default();
    for c in cases {
        by_threads.entry(c.threads).or_default().push(c);
    }
    let mut parts: Vec<Vec<Case>> = Vec::new();
    let mut current: Vec<Case> = Vec::new();
    let mut used = 0.0;
    for subset in by_threads.into_values() {
        let need: f64 = subset.iter().map(|c| estimate(c)).sum();
        if need > budget {
            // Too big even alone: packed case by case.
            if !current.is_empty() {
                parts.push(std::mem::take(&mut current));
            }
            used = 0.0;
            for c in subset {
                let n = estimate(c);
                if !current.is_empty() && used + n > budget {
                    parts.push(std::mem::take(&mut current));
                    used = 0.0;
                }
                current.push(c.clone());
                used += n;
            }
        } else {
            if !current.is_empty() && used + need > budget {
                parts.push(std::mem::take(&mut current));
                used = 0.0;
            }
            current.extend(subset.into_iter().cloned());
            used += need;
        }
    }
    if !current.is_empty() || parts.is_empty() {
        parts.push(current);
    }
    parts
}

/// The round order's seed of a group: from the suite's seed, the group and
/// the repeat, so a rerun replays the same orders.
fn group_seed(seed: u64, key: &str, rep: u32) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{seed}/{key}/{rep}").as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The paired comparisons of one group's records, appended.
fn write_comparisons(
    file: &mut File,
    path: &Path,
    records: &[ResultRecord],
    reference: &str,
) -> Result<(), RunError> {
    for c in crate::pairs::group_comparisons(records, reference) {
        write_json_line(file, &c).map_err(|source| RunError::Io {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(())
}

fn write_json_line<T: Serialize>(file: &mut File, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    file.write_all(&line)?;
    file.flush()
}

/// Appends one whole line and flushes it to disk, so a crash of this process
/// loses at most the case in flight.
fn write_line(file: &mut File, record: &ResultRecord) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    file.write_all(&line)?;
    file.flush()?;
    file.sync_data()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether `--filter` (any of the texts in the id; none: all) and
/// `--shard I/N` (index % N == I-1) keep a case.
pub fn is_selected(case: &Case, filters: &[String], shard: Option<(u32, u32)>) -> bool {
    (filters.is_empty() || filters.iter().any(|f| case.id.contains(f.as_str())))
        && shard.is_none_or(|(i, n)| case.index as u32 % n == i - 1)
}

/// Logical CPUs this process may run on at once (its affinity and cgroup
/// quota), as a thread count.
fn available_cpus() -> u32 {
    u32::try_from(crate::machine::cpu_count()).unwrap_or(u32::MAX)
}

/// A measured CPU case's note, with `oversubscribed: ...` added where it
/// asked for more threads than the process may run at once.
fn with_oversubscription(reason: Option<String>, case: &Case, status: Status) -> Option<String> {
    let cpus = available_cpus();
    if status != Status::Ok || case.device != handoff_backend::Device::Cpu || case.threads <= cpus {
        return reason;
    }
    let note = format!(
        "oversubscribed: {} threads on {cpus} logical CPU(s)",
        case.threads
    );
    Some(match reason {
        Some(r) => format!("{r}; {note}"),
        None => note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(id: &str, threads: u32) -> Case {
        Case {
            index: 0,
            id: id.into(),
            model: "m".into(),
            backend: id.into(),
            device: handoff_backend::Device::Cpu,
            threads,
            batch: 1,
            dims: Default::default(),
            inputs: Vec::new(),
            scenario: Default::default(),
            group: None,
        }
    }

    #[test]
    fn a_case_with_more_threads_than_cpus_says_it_is_oversubscribed() {
        let cpus = available_cpus();
        let over = case("a", cpus + 1);
        assert_eq!(
            with_oversubscription(Some("parity unchecked: x".into()), &over, Status::Ok),
            Some(format!(
                "parity unchecked: x; oversubscribed: {} threads on {cpus} logical CPU(s)",
                cpus + 1
            ))
        );
        // Only measured CPU cases; a failure keeps its reason alone.
        assert_eq!(
            with_oversubscription(None, &case("b", cpus), Status::Ok),
            None
        );
        assert_eq!(
            with_oversubscription(Some("boom".into()), &over, Status::Failed),
            Some("boom".into())
        );
        let mut gpu = over.clone();
        gpu.device = handoff_backend::Device::Cuda;
        assert_eq!(with_oversubscription(None, &gpu, Status::Ok), None);
    }

    #[test]
    fn a_group_too_big_for_memory_splits_by_thread_count_first() {
        let cases = [case("a", 1), case("a", 2), case("b", 1), case("b", 2)];
        let parts = split_for_memory(&cases, Some(2.5), |_| 1.0);
        let shape: Vec<Vec<(String, u32)>> = parts
            .iter()
            .map(|p| p.iter().map(|c| (c.id.clone(), c.threads)).collect())
            .collect();
        assert_eq!(
            shape,
            [
                [("a".to_owned(), 1), ("b".to_owned(), 1)],
                [("a".to_owned(), 2), ("b".to_owned(), 2)]
            ]
        );
        assert_eq!(split_for_memory(&cases, None, |_| 1.0).len(), 1);
        // Threads of one count that do not fit together are packed case by
        // case; the next count starts a part of its own.
        let cases = [case("a", 1), case("b", 1), case("c", 1), case("a", 2)];
        let ids: Vec<Vec<String>> = split_for_memory(&cases, Some(2.5), |_| 1.0)
            .iter()
            .map(|p| p.iter().map(|c| format!("{}{}", c.id, c.threads)).collect())
            .collect();
        assert_eq!(ids, [vec!["a1", "b1"], vec!["c1", "a2"]]);
    }
}
