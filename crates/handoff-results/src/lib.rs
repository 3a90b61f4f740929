//! What a run leaves on disk and everything that reads it: one line per
//! case in `results.jsonl` ([`ResultRecord`]), the run's `run.json`
//! ([`RunMeta`]) and `env.json` ([`Fingerprint`]), and the paired
//! comparisons computed from the records. The runner writes these; the
//! report and the regression gate read them without depending on the
//! runner.

pub mod pairs;
pub mod record;

use std::collections::BTreeMap;
use std::path::PathBuf;

use handoff_stats::rounds::ProcessVariance;
use serde::{Deserialize, Serialize};

pub use pairs::{Comparison, read_comparisons};
pub use record::{
    Accuracy, BuiltGate, CaseIdentity, LoadStats, ReadError, ResultRecord, Results, SCHEMA_VERSION,
    Status, read_results,
};

/// Why the timed loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The 95% CI of the median reached the target width.
    Converged,
    /// `max_time` was reached first: the CI may be wider than asked.
    MaxTime,
    /// `max_iterations` was reached first.
    MaxIterations,
}

/// Load on the machine while a case was timed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineLoad {
    /// 1-minute load average before and after the case.
    pub loadavg_before: f64,
    pub loadavg_after: f64,
    /// CPU used by *other* processes during the timed loop, in cores
    /// (1.0 = one core fully busy with something else).
    pub other_cpu_cores: f64,
    /// Set when `other_cpu_cores` exceeds [`BUSY_THRESHOLD_CORES`]: the
    /// numbers are suspect (a parallel build doubles latencies here).
    pub busy: bool,
}

/// An AVX-to-legacy-SSE switch costing more than this (ns) is named in
/// reports: a few cycles of noise stay below it, a state transition (about
/// 150 ns on the Intel Xeon VMs this project runs on) is far above.
pub const SSE_AFTER_AVX_NOTABLE_NS: f64 = 10.0;

/// A multiply on subnormal floats costing more than this (ns) over a normal
/// one is named in reports: a cycle or two of noise stay below it,
/// microcode assists (about 40 ns on the Intel Xeon VMs this project runs
/// on) are far above.
pub const SUBNORMAL_NOTABLE_NS: f64 = 5.0;

/// Everything needed to know whether two runs are comparable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub cpu_model: String,
    pub logical_cores: usize,
    pub cpu_flags: Vec<String>,
    /// The class that decides int8 kernels (e.g. `x86-avx2`: no VNNI, so
    /// int8 products of 8-bit weights saturate in 16 bits).
    #[serde(default)]
    pub cpu_class: String,
    /// int8 features /proc/cpuinfo lists that `cpuid` hid from the run (a
    /// cpuid mask or an emulator): its kernels were `cpu_class`'s on a CPU
    /// that has more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_hidden: Vec<String>,
    /// Extra ns each switch from 256-bit AVX to legacy-SSE code costs on
    /// this CPU (a probe; kernels that mix the encodings pay it). Measured,
    /// so left out of [`Fingerprint::hash`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sse_after_avx_ns: Option<f64>,
    /// Extra ns a multiply with a subnormal operand and result costs on
    /// this CPU (a probe; ORT's masked softmax writes subnormals). Measured,
    /// so left out of [`Fingerprint::hash`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnormal_ns: Option<f64>,
    pub os: String,
    pub kernel: String,
    pub handoff_version: String,
    pub rustc: String,
    pub build_profile: String,
    pub git_commit: Option<String>,
    /// Backend name -> runtime version (or why it is unavailable).
    pub backends: BTreeMap<String, String>,
    /// Thread-related environment variables as set for the run.
    pub env_vars: BTreeMap<String, String>,
}

impl Fingerprint {
    pub fn hash(&self) -> String {
        let facts = Self {
            sse_after_avx_ns: None,
            subnormal_ns: None,
            ..self.clone()
        };
        let json = serde_json::to_vec(&facts).unwrap_or_default();
        handoff_onnx::inspect::sha256_hex(&json)[..16].to_owned()
    }
}

/// A case's cold start, from the moment its process was started.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ColdStart {
    /// Process start to model loaded (exec, dynamic libraries, runtime
    /// initialisation, model load and compilation).
    pub to_loaded_ms: f64,
    /// ... to the first inference's outputs.
    pub to_first_ms: f64,
    /// ... to steady state (see `steady_after_runs`), if reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_steady_ms: Option<f64>,
    /// Runs after the first before latency settled within 20% of the median.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steady_after_runs: Option<usize>,
}

/// How a case was measured in rounds, kept in its result line.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RoundsInfo {
    /// The comparison group (cases measured together and compared).
    pub group: String,
    /// Seed of the per-round order (recorded so a run can be replayed).
    pub order_seed: u64,
    /// Timed runs per round (0: the case did not run in that round).
    pub block_runs: Vec<usize>,
    /// The case's place in each round's order (0: first).
    #[serde(default)]
    pub slots: Vec<usize>,
    /// Whether the worker was pinned to each round's CPUs (fewer threads
    /// than CPUs) or left to the scheduler.
    #[serde(default)]
    pub pinned: bool,
    /// Median of each round's block, ms (`null`: not run).
    pub block_medians_ms: Vec<Option<f64>>,
    /// The same from the backend's own clock (Python baseline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inner_block_medians_ms: Vec<Option<f64>>,
    /// CPU time the other workers of the group used while this case's
    /// block ran, ms per round. Idle workers are paused (SIGSTOP) between
    /// their blocks, so this stays near 0; anything else would compete with
    /// the block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others_cpu_ms: Vec<f64>,
    /// Worker processes the case ran on, in turn (round `r` on process
    /// `r % processes`).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub processes: u32,
    /// The process that ran each round.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub process: Vec<usize>,
    /// This case's between-process variance of the log latency, estimated
    /// in its group ([`handoff_stats::rounds::process_variances`]), which
    /// widens its CI and its ratios; `None` with one process per case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_var: Option<f64>,
    /// Degrees of freedom of `process_var`'s estimate (records without it
    /// are read as one less than their processes, the fewest it can have).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_df: Option<f64>,
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

impl RoundsInfo {
    /// `(process, block median)` per round, `None` where it did not run.
    pub fn by_process(&self) -> Vec<Option<(usize, f64)>> {
        self.block_medians_ms
            .iter()
            .enumerate()
            .map(|(r, m)| m.map(|m| (self.process.get(r).copied().unwrap_or(0), m)))
            .collect()
    }

    /// The variance this case's median carries from its processes' own
    /// speeds: its between-process variance over the number of
    /// processes it was averaged over (none when not estimated).
    pub fn process_term(&self) -> ProcessVariance {
        let Some(var) = self.process_var else {
            return ProcessVariance::NONE;
        };
        let df = self
            .process_df
            .unwrap_or_else(|| f64::from(self.processes.max(2) - 1));
        ProcessVariance { var, df }.over(self.processes)
    }
}

/// One canary reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryPoint {
    /// Seconds since the run started.
    pub t_s: f64,
    pub group: String,
    pub round: u32,
    /// `None`: the canary could not run (recorded as missing, never 0).
    pub ms: Option<f64>,
}

/// What a run directory was made from, checked by `--resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub suite: String,
    pub suite_sha256: String,
    pub env: String,
    /// How cases were measured: `interleaved` (rounds per comparison
    /// group) or `sequential`.
    #[serde(default)]
    pub measurement: String,
    /// The drift canary between rounds, over the whole run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canary: Vec<CanaryPoint>,
    /// Groups measured apart from each other although they share inputs,
    /// because all their sessions would not fit in memory at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split_groups: Vec<String>,
    /// The seed of inputs and measurement orders (the suite's, or
    /// `handoff run --seed`).
    #[serde(default)]
    pub seed: u64,
    /// Batch sizes and dim values the suite asked for that a model's
    /// declared shapes do not accept, with why (see `Plan::not_run`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_run: Vec<String>,
}

/// Results from several runs in one list. Runs made on different machines
/// (environment fingerprints) keep their numbers apart: the model id gets
/// the machine's name (CPU model from env.json, else the fingerprint).
pub fn merge_machines(paths: &[PathBuf]) -> Result<Results, ReadError> {
    let mut all = Vec::new();
    let mut torn = false;
    let mut machines: Vec<(String, String)> = Vec::new();
    for path in paths {
        let read = read_results(path)?;
        torn |= read.torn_last_line;
        let env: Option<serde_json::Value> = path
            .parent()
            .and_then(|d| std::fs::read(d.join("env.json")).ok())
            .and_then(|b| serde_json::from_slice(&b).ok());
        for r in read.records {
            if !machines.iter().any(|(h, _)| *h == r.env) {
                let cpu = env
                    .as_ref()
                    .and_then(|e| e.get("cpu_model"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
                machines.push((
                    r.env.clone(),
                    cpu.unwrap_or_else(|| format!("env {}", r.env)),
                ));
            }
            all.push(r);
        }
    }
    if machines.len() > 1 {
        // Two machines with the same CPU name still differ: add the hash.
        let names: Vec<String> = machines
            .iter()
            .map(|(h, n)| {
                if machines.iter().filter(|(_, m)| m == n).count() > 1 {
                    format!("{n} {h}")
                } else {
                    n.clone()
                }
            })
            .collect();
        for r in &mut all {
            if let Some(i) = machines.iter().position(|(h, _)| *h == r.env) {
                r.case.model = format!("{} [{}]", r.case.model, names[i]);
            }
        }
    }
    Ok(Results {
        records: all,
        torn_last_line: torn,
    })
}
