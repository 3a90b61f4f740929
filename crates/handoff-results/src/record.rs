//! One line of `results.jsonl`. The format is versioned ([`SCHEMA_VERSION`]);
//! readers refuse newer versions rather than misread them.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use handoff_backend::{Device, ExecutionKind, Parity};
use handoff_stats::Summary;
use serde::{Deserialize, Serialize};

use crate::{MachineLoad, StopReason};

pub const SCHEMA_VERSION: u32 = 1;

/// The outcome of a case. Only `ok` carries headline numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Ok,
    /// Outputs differ from the reference beyond tolerance.
    Mismatch,
    /// The model uses something the backend lacks (op, dtype).
    Unsupported,
    /// The backend's library or device is missing.
    Unavailable,
    /// An error or a crash.
    Failed,
    /// Killed after the case's time limit.
    Timeout,
}

impl CaseIdentity {
    /// A seeded random-weights stand-in: its outputs mean nothing, only its
    /// speed does.
    pub fn random_weights(&self) -> bool {
        self.model_source
            .contains(handoff_backend::RANDOM_WEIGHTS_NOTE)
    }
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Mismatch => "mismatch",
            Status::Unsupported => "unsupported",
            Status::Unavailable => "unavailable",
            Status::Failed => "failed",
            Status::Timeout => "timeout",
        }
    }
}

/// What identifies a case across runs (used by `compare`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseIdentity {
    pub id: String,
    pub model: String,
    pub model_sha256: String,
    pub model_source: String,
    pub backend: String,
    pub backend_version: Option<String>,
    pub execution: Option<ExecutionKind>,
    pub device: Device,
    pub threads: u32,
    pub batch: u32,
    pub dims: BTreeMap<String, u32>,
    pub scenario: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub schema: u32,
    pub suite: String,
    pub index: usize,
    pub case: CaseIdentity,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub load_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub first_ms: Option<f64>,
    /// Summary of the timed runs, in milliseconds. Present only for `ok`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub latency_ms: Option<Summary>,
    /// Items (batch elements) per second at the median latency.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub throughput_items_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stop: Option<StopReason>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parity: Option<Parity>,
    /// The check against the outputs the model's author recorded
    /// (`check.expected`): worst over every data set.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expected: Option<Parity>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub machine: Option<MachineLoad>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peak_rss_mb: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub wall_s: Option<f64>,
    /// Raw timed samples in milliseconds, in run order; summaries are
    /// derived from these and never the only copy.
    #[serde(default)]
    pub samples_ms: Vec<f64>,
    /// sha256 of the environment fingerprint in `env.json`.
    pub env: String,
    /// Which repetition of the suite (`handoff run --repeat N`), from 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeat: u32,
    /// The backend's own clock around each timed run, for backends behind a
    /// process boundary (python-onnxruntime: `session.run` timed in Python).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub inner_latency_ms: Option<Summary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inner_samples_ms: Vec<f64>,
    /// For a precision variant (`fp16`, `int8-dynamic`): its accuracy
    /// against the fp32 model and its size.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub accuracy: Option<Accuracy>,
    /// For the load scenarios (server, http, multi-stream): rates, whether
    /// the system kept up, the peak search. `samples_ms` then hold each
    /// query's latency from its scheduled arrival, queueing included.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub load: Option<LoadStats>,
    /// Process start to loaded, first inference and steady state (cases
    /// run in a child process).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cold: Option<crate::ColdStart>,
    /// FLOPs of one inference at this case's input shapes (2 x the
    /// multiply-adds of the graph), for the roofline.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub flops: Option<f64>,
    /// Interleaved measurement: the group, the round order's seed and the
    /// per-round block medians the CI and the paired ratios come from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rounds: Option<crate::RoundsInfo>,
}

/// What a load scenario measured beyond the latency samples.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LoadStats {
    /// The scenario (`server 20 QPS`, `http peak (p99 <= 100 ms)`, ...).
    pub scenario: String,
    /// What served the queries over HTTP (`handoff serve (axum) + ort`,
    /// `FastAPI + uvicorn + onnxruntime`); `None` in-process.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server: Option<String>,
    /// The rate offered by the run whose samples the record holds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offered_qps: Option<f64>,
    pub achieved_qps: f64,
    pub queries: u64,
    pub completed: u64,
    pub errors: u64,
    pub unserved: u64,
    /// The system could not keep up with the offered rate.
    pub saturated: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub p99_bound_ms: Option<f64>,
    /// Highest rate tried whose p99 met the bound (peak search).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peak_qps: Option<f64>,
    /// The lowest rate the peak search tried that missed the bound: the
    /// peak lies between `peak_qps` and this.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub missed_qps: Option<f64>,
    /// The peak search took turns, step by step, with the other servers
    /// of its comparison (instead of running before or after them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub alternated: bool,
    /// Every rate the peak search tried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<handoff_load::Level>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub streams: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_stream_p99_ms: Vec<f64>,
    /// Peak RSS of the server process, MiB.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub server_rss_mb: Option<f64>,
}

impl LoadStats {
    /// From one open-loop run (or the best run of a peak search).
    pub fn from_level(scenario: String, level: &handoff_load::Level) -> Self {
        Self {
            scenario,
            offered_qps: Some(level.offered_qps),
            achieved_qps: level.achieved_qps,
            queries: level.queries,
            completed: level.completed,
            errors: level.errors,
            unserved: level.unserved,
            saturated: level.saturated,
            ..Default::default()
        }
    }
}

/// A precision variant's accuracy gate, computed on the machine of the run
/// (a file built earlier is checked again: an int8 file can compute
/// differently on another CPU class).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub variant: String,
    /// What was compared (output, runtime).
    pub compared: String,
    pub min_cosine: f64,
    pub max_abs: f64,
    pub threshold_min_cosine: f64,
    /// A classifier's share of inputs with the fp32 model's top label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_agreement: Option<f64>,
    pub passed: bool,
    pub size_bytes: u64,
    /// Size of the fp32 model it was made from.
    #[serde(default)]
    pub fp32_size_bytes: u64,
    /// The int8 class of the CPU the gate ran on (this run's machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_class: Option<String>,
    /// For a file built before this run: the gate recorded when it was
    /// built, maybe on another CPU class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built: Option<BuiltGate>,
    /// What of the model stays fp32 and why, e.g. "1 of 36 MatMuls kept
    /// fp32 for accuracy (measured)"; the names are in the provenance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_fp32: Option<String>,
}

/// The accuracy gate a variant file passed or failed where it was built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuiltGate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_class: Option<String>,
    pub min_cosine: f64,
    pub passed: bool,
}

impl Accuracy {
    /// Said when the gate where the file was built and the gate on this
    /// run's machine disagree.
    pub fn regate_note(&self) -> Option<String> {
        let built = self.built.as_ref().filter(|b| b.passed != self.passed)?;
        let class = |c: &Option<String>| c.clone().unwrap_or_else(|| "CPU not recorded".into());
        Some(format!(
            "{} where it was built ({}, cos {:.4}), {} on this CPU ({})",
            if built.passed { "passed" } else { "failed" },
            class(&built.cpu_class),
            built.min_cosine,
            if self.passed { "passes" } else { "fails" },
            class(&self.cpu_class)
        ))
    }
}

impl ResultRecord {
    /// Passed every gate: ran, matched the reference backend, and (for a
    /// precision variant) kept its accuracy. Only these are recommended.
    pub fn passes(&self) -> bool {
        self.status == Status::Ok && self.accuracy.as_ref().is_none_or(|a| a.passed)
    }

    /// Whether a recommendation may rest on this case: it passes, its
    /// outputs were checked against the reference, and nothing else was
    /// using the CPU while it ran.
    pub fn recommendable(&self) -> bool {
        self.passes() && self.parity.is_some() && !self.machine.as_ref().is_some_and(|m| m.busy)
    }

    /// The variance this case's median carries from its worker processes'
    /// own speeds ([`crate::RoundsInfo::process_term`]); none without rounds.
    pub fn process_term(&self) -> handoff_stats::rounds::ProcessVariance {
        self.rounds.as_ref().map_or(
            handoff_stats::rounds::ProcessVariance::NONE,
            crate::RoundsInfo::process_term,
        )
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}:{line}: results schema version {found} is newer than this handoff understands ({SCHEMA_VERSION}); upgrade handoff"
    )]
    NewerSchema {
        path: String,
        line: usize,
        found: u32,
    },
    #[error("{path}:{line}: not a results line: {detail}")]
    Malformed {
        path: String,
        line: usize,
        detail: String,
    },
}

/// What reading a results file found.
#[derive(Debug, Default)]
pub struct Results {
    pub records: Vec<ResultRecord>,
    /// A last line cut off mid-write (power loss, kill -9): ignored.
    pub torn_last_line: bool,
}

/// Reads a results file. A torn last line is skipped and reported; a
/// malformed line elsewhere is an error.
pub fn read_results(path: &Path) -> Result<Results, ReadError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ReadError::Io {
        path: p.clone(),
        source,
    })?;
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| ReadError::Io {
            path: p.clone(),
            source,
        })?;
    let mut out = Results::default();
    let last = lines.len();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == last => {
                out.torn_last_line = true;
                continue;
            }
            Err(e) => {
                return Err(ReadError::Malformed {
                    path: p,
                    line: i + 1,
                    detail: e.to_string(),
                });
            }
        };
        let schema = value
            .get("schema")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32;
        if schema > SCHEMA_VERSION {
            return Err(ReadError::NewerSchema {
                path: p,
                line: i + 1,
                found: schema,
            });
        }
        let record: ResultRecord =
            serde_json::from_value(value).map_err(|e| ReadError::Malformed {
                path: p.clone(),
                line: i + 1,
                detail: e.to_string(),
            })?;
        out.records.push(record);
    }
    Ok(out)
}
