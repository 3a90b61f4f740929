//! Runs a plan: references, cases, results streamed to disk.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use handoff_backend::{Probe, Registry};
use handoff_suite::{Case, Isolation, Plan};
use serde::{Deserialize, Serialize};

use crate::isolate::{WorkerCommand, run_in_child, run_in_process};
use crate::machine::Fingerprint;
use crate::record::{Accuracy, CaseIdentity, ResultRecord, SCHEMA_VERSION, Status};
use crate::worker::{Job, JobMode, ReferenceFile, WorkerReport};

/// Cases of a precision variant are checked against the reference backend
/// running the same variant by per-row cosine, not allclose: two runtimes'
/// int8 kernels may round a quantisation boundary differently.
pub const VARIANT_PARITY_MIN_COSINE: f64 = 0.999;

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
        }
    }
}

/// What a run directory was made from, checked by `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub suite: String,
    pub suite_sha256: String,
    pub env: String,
}

/// Progress callbacks (the CLI draws a progress bar with them).
pub trait Observer {
    fn started(&mut self, _total: usize) {}
    fn case_started(&mut self, _case: &Case) {}
    fn case_finished(&mut self, _record: &ResultRecord) {}
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
        Fingerprint::collect(backends)
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
        let meta = RunMeta {
            suite: self.plan.name.clone(),
            suite_sha256: self.plan.suite_sha256.clone(),
            env: env_hash.clone(),
        };
        let done = self.prepare_dir(dir, &results_path, &meta)?;
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
        for (rep, case) in (0..repeat).flat_map(|r| self.selected().map(move |c| (r, c))) {
            if done.contains(&(case.id.clone(), rep)) {
                continue;
            }
            if stopped() {
                summary.interrupted = true;
                break;
            }
            if self
                .plan
                .suite_timeout
                .is_some_and(|limit| run_start.elapsed() >= limit)
            {
                summary.interrupted = true;
                summary.suite_timeout = true;
                break;
            }
            observer.case_started(&case);
            let start = Instant::now();
            let model = self
                .plan
                .model(&case.model)
                .expect("plan cases name plan models");
            let reference = self.reference_for(&case, model, &mut references, dir);
            let mut report = self.execute(
                &case,
                model,
                JobMode::Measure {
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
                },
            );
            if let (Err(why), Status::Ok) = (&reference, report.status()) {
                report.reason = Some(format!("parity unchecked: {why}"));
            }
            if stopped() {
                // The case in flight was killed: not a result; a resume reruns it.
                summary.interrupted = true;
                break;
            }
            let mut record = self.record(
                &case,
                model,
                report,
                &env_hash,
                start.elapsed().as_secs_f64(),
            );
            record.repeat = rep;
            if let Some(counter) = &self.options.flops {
                record.flops = *flops
                    .entry((model.path.clone(), case.input_key()))
                    .or_insert_with(|| (counter.0)(&model.path, &case.inputs));
            }
            write_line(&mut results, &record).map_err(io(&results_path))?;
            *summary.counts.entry(record.status.as_str()).or_default() += 1;
            if record.machine.as_ref().is_some_and(|m| m.busy) {
                summary.busy_cases += 1;
            }
            observer.case_finished(&record);
        }
        Ok(summary)
    }

    /// Creates the run directory, or checks it for `--resume`; returns the
    /// cases (id, repeat) already done.
    fn prepare_dir(
        &self,
        dir: &Path,
        results: &Path,
        meta: &RunMeta,
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
        if old.env != meta.env {
            return Err(resume_err(format!(
                "the environment changed since that run (fingerprint {} then, {} now; see env.json)",
                old.env, meta.env
            )));
        }
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

    fn execute(
        &self,
        case: &Case,
        model: &handoff_suite::PlanModel,
        mode: JobMode,
    ) -> WorkerReport {
        let job = Job {
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
            backend_options: self
                .plan
                .backend_options
                .get(&case.backend)
                .cloned()
                .unwrap_or(serde_json::Value::Null),
            mode,
        };
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
                if let Some(p) = &partial {
                    if report.status() == Status::Timeout
                        && let Some(samples) = std::fs::read(p)
                            .ok()
                            .and_then(|b| serde_json::from_slice::<Vec<f64>>(&b).ok())
                    {
                        report.reason = Some(format!(
                            "{}; {} timed samples gathered before the kill are kept",
                            report.reason.unwrap_or_default(),
                            samples.len()
                        ));
                        report.samples_ms = samples;
                    }
                    let _ = std::fs::remove_file(p);
                }
                report
            }
            _ => run_in_process(&job, self.registry),
        }
    }

    fn http_case(
        &self,
        job: &Job,
        model: &handoff_suite::PlanModel,
        load: &handoff_suite::Load,
        reference: Option<&ReferenceFile>,
    ) -> WorkerReport {
        let case = &job.case;
        let (Some(hf_dir), Some(sentences)) = (&model.hf_dir, &model.sentences) else {
            return WorkerReport {
                status: Some(Status::Unsupported),
                reason: Some("the http scenario needs a text model with a tokenizer".into()),
                ..Default::default()
            };
        };
        let spec = crate::http_case::ServerSpec {
            backend: case.backend.clone(),
            model: model.path.clone(),
            hf_dir: Some(hf_dir.clone()),
            tokenizer: hf_dir.join("tokenizer.json"),
            device: case.device,
            threads: case.threads,
            seq: case.dims.get("seq").copied().unwrap_or(128),
            max_batch: case.batch.max(64),
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
            reason: report.reason,
            load_ms: report.load_ms,
            first_ms: report.first_ms,
            latency_ms: latency,
            throughput_items_s: throughput,
            stop: report.stop,
            parity: report.parity,
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
                passed: v.accuracy.passed,
                // 0: no file of its own (candle-q8 quantises at load).
                size_bytes: if v.reference_is_fp32 && v.reference_model.is_none() {
                    0
                } else {
                    std::fs::metadata(&model.path).map_or(0, |m| m.len())
                },
                fp32_size_bytes: v.fp32_bytes,
            }),
            env: env.to_owned(),
            load: report.load,
            cold: report.cold,
            flops: None,
        }
    }
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
