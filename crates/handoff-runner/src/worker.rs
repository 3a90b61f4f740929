//! What runs inside one case: load, first inference, parity check, warm-up,
//! timed loop. The same code runs in a child process (`handoff __worker`)
//! or in-process.

use std::path::PathBuf;
use std::time::Instant;

use handoff_backend::{
    BackendError, ExecutionKind, ModelRef, Parity, PrepareOptions, Probe, Registry, Tensor,
    compare, load_tensors, min_row_cosine, save_tensors,
};
use handoff_suite::{Case, Measure};
use serde::{Deserialize, Serialize};

use crate::machine::{CpuSnapshot, MachineLoad, peak_rss_mb};
use crate::measure::{StopReason, measure};
use crate::record::Status;

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
    pub backend_options: serde_json::Value,
    pub mode: JobMode,
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
    pub machine: Option<MachineLoad>,
    pub peak_rss_mb: Option<f64>,
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

/// Runs a job to completion and says what happened; never panics on a
/// backend error (a panic inside a runtime is caught by the caller).
pub fn execute_job(job: &Job, registry: &Registry) -> WorkerReport {
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
    if let Err(e) = prepared.bind(&inputs) {
        return report.fail(&e);
    }
    let t = Instant::now();
    if let Err(e) = prepared.run() {
        return report.fail(&e);
    }
    report.first_ms = Some(ms(t.elapsed()));
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
    drop(outputs);
    let before = CpuSnapshot::now();
    let mut progress = |samples: &[std::time::Duration]| {
        if let Some(path) = &job.partial_path {
            let ms: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, serde_json::to_vec(&ms).unwrap_or_default()).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    };
    let timed = match measure(prepared.as_mut(), &job.measure, &mut progress) {
        Ok(t) => t,
        Err(e) => return report.fail(&e),
    };
    report.machine = Some(before.load_until(&CpuSnapshot::now()));
    report.samples_ms = timed.samples.iter().map(|d| ms(*d)).collect();
    report.inner_samples_ms = timed.inner_ms;
    report.warmup_runs = timed.warmup_runs;
    report.stop = Some(timed.stop);
    report.status = Some(Status::Ok);
    report.peak_rss_mb = peak_rss_mb();
    report
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
