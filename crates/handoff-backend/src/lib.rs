//! The one interface every runtime implements, the tensors that cross it, and
//! a mock backend for testing the runner.
//!
//! A backend never decides what is measured: it loads a model
//! ([`Backend::prepare`]), binds inputs outside the clock
//! ([`Prepared::bind`]) and runs ([`Prepared::run`]), returning only once the
//! outputs are materialised (on a GPU: after a device synchronisation).

pub mod home;
pub mod ids;
pub mod mock;
pub mod tensor;
pub mod text;
pub mod wheel;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Written into the source label of a model with seeded random weights (a
/// stand-in at a real model's size); reports find stand-ins by it.
pub const RANDOM_WEIGHTS_NOTE: &str = "random weights: outputs meaningless, speed only";

pub use tensor::{
    DType, Fill, Parity, Tensor, TensorData, TensorSpec, compare, load_tensors, min_row_cosine,
    read_pb, save_tensors, write_pb,
};

/// Where a case runs.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// How a backend executes a model; the report labels interpreters as such so
/// nobody compares an interpreter with a compiler unknowingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutionKind {
    /// Graph optimised ahead of the run (ORT, tract).
    OptimisedGraph,
    /// Node-by-node evaluation of the ONNX graph (candle-onnx).
    Interpreter,
    /// Hand-written model code (candle-transformers).
    Native,
    /// For tests of the runner only.
    Mock,
}

/// The result of asking a backend whether it can run on a device here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Probe {
    Available {
        /// Runtime version, e.g. `1.31.1` for ONNX Runtime.
        version: String,
        /// Anything else worth recording (library path, thread model).
        detail: String,
    },
    Unavailable {
        reason: String,
    },
}

/// Why a backend could not do what was asked. The variant decides the status
/// of the result cell.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The model uses something this backend lacks (an op, a dtype).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The runtime or device is missing.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The model file is unreadable or invalid for this backend.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// Anything else the runtime reported.
    #[error("{0}")]
    Failed(String),
}

/// What `prepare` needs to know about the case.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub device: Device,
    pub threads: usize,
    /// Concrete input shapes this session will see (some runtimes specialise).
    pub inputs: Vec<TensorSpec>,
    /// Backend-specific settings from the suite, already validated.
    pub options: serde_json::Value,
}

/// A model file and what is known about it.
#[derive(Debug, Clone)]
pub struct ModelRef {
    /// The ONNX file.
    pub path: PathBuf,
    pub id: String,
    /// The HF directory (config.json + model.safetensors) the ONNX file was
    /// converted from, when the model has one; native backends load it.
    pub hf_dir: Option<PathBuf>,
}

impl ModelRef {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub trait Backend: Send + Sync {
    /// The name used in suites and results (`ort`, `tract`, `candle-onnx`).
    fn name(&self) -> &'static str;

    fn execution_kind(&self) -> ExecutionKind;

    /// Says whether this backend can run on `device` here, and if not, why.
    /// Never panics; cheap enough to call once per case.
    fn probe(&self, device: Device) -> Probe;

    /// Loads and compiles the model for the case. The time this takes is the
    /// case's load time.
    fn prepare(
        &self,
        model: &ModelRef,
        options: &PrepareOptions,
    ) -> Result<Box<dyn Prepared>, BackendError>;
}

pub trait Prepared {
    /// Converts inputs into the runtime's own tensors, outside the clock.
    fn bind(&mut self, inputs: &[Tensor]) -> Result<(), BackendError>;

    /// One inference on the bound inputs; returns once the outputs exist.
    fn run(&mut self) -> Result<(), BackendError>;

    /// The outputs of the last `run`, in the model's output order.
    fn outputs(&mut self) -> Result<Vec<Tensor>, BackendError>;

    /// The runtime's version as the loaded session reports it, where that
    /// can differ from what `probe` read (a runtime in another process).
    fn runtime_version(&self) -> Option<String> {
        None
    }

    /// The last `run`'s time as the runtime itself measured it, in ms, for
    /// backends behind a process boundary (the Python baseline): the row
    /// keeps handoff's clock, this is reported beside it.
    fn inner_ms(&self) -> Option<f64> {
        None
    }
}

/// The probe answer of a backend built without GPU support: available on
/// the CPU, and on CUDA unavailable naming the cargo feature that adds it.
pub fn cpu_only_probe(device: Device, version: &str, detail: &str, cuda_feature: &str) -> Probe {
    match device {
        Device::Cpu => Probe::Available {
            version: version.to_owned(),
            detail: detail.to_owned(),
        },
        Device::Cuda => Probe::Unavailable {
            reason: format!("no CUDA device: this build has no {cuda_feature}"),
        },
    }
}

/// For `prepare` of a CPU-only backend: a GPU case is refused, never run on
/// the CPU instead.
pub fn require_cpu(device: Device) -> Result<(), BackendError> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda => Err(BackendError::Unavailable(
            "no CUDA device: this backend was built for the CPU only".into(),
        )),
    }
}

/// The NVIDIA kernel driver's version line, when one is loaded; `None` on a
/// machine without an NVIDIA GPU. Reads /proc, so it needs no CUDA library.
pub fn nvidia_driver() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    let line = text.lines().next()?.trim();
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar ..."
    let version = line
        .split_whitespace()
        .find(|w| {
            w.chars().filter(|c| *c == '.').count() >= 1
                && w.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
        .unwrap_or(line);
    Some(version.to_owned())
}

/// A check every backend's tests run on a machine without a GPU: a `cuda`
/// probe and a `cuda` prepare both refuse with `no CUDA device …` (never a
/// CPU session). `Err` says what happened instead.
pub fn check_cuda_refused(backend: &dyn Backend, model: &ModelRef) -> Result<(), String> {
    match backend.probe(Device::Cuda) {
        Probe::Unavailable { reason } if reason.starts_with("no CUDA device") => {}
        other => return Err(format!("cuda probe: {other:?}")),
    }
    let options = PrepareOptions {
        device: Device::Cuda,
        threads: 1,
        inputs: Vec::new(),
        options: serde_json::Value::Null,
    };
    match backend.prepare(model, &options) {
        Err(BackendError::Unavailable(reason)) if reason.starts_with("no CUDA device") => Ok(()),
        Err(other) => Err(format!("cuda prepare: {other}")),
        Ok(_) => Err("a cuda case was prepared without a GPU".into()),
    }
}

/// A backend this build of handoff was compiled without (its cargo feature
/// was off): it keeps the name in the registry, so a suite naming it
/// validates, and every case on it is an `unavailable` cell naming the
/// feature instead of an unknown-backend error.
pub struct NotBuilt {
    pub name: &'static str,
    pub kind: ExecutionKind,
    /// The cargo feature of `handoff-cli` that adds it.
    pub feature: &'static str,
}

impl NotBuilt {
    pub fn reason(&self) -> String {
        format!(
            "this handoff was built without the `{}` feature (cargo install --locked handoff-cli --features {})",
            self.feature, self.feature
        )
    }
}

impl Backend for NotBuilt {
    fn name(&self) -> &'static str {
        self.name
    }

    fn execution_kind(&self) -> ExecutionKind {
        self.kind
    }

    fn probe(&self, _device: Device) -> Probe {
        Probe::Unavailable {
            reason: self.reason(),
        }
    }

    fn prepare(
        &self,
        _model: &ModelRef,
        _options: &PrepareOptions,
    ) -> Result<Box<dyn Prepared>, BackendError> {
        Err(BackendError::Unavailable(self.reason()))
    }
}

/// Looks backends up by name; the CLI fills it with the runtimes compiled in.
#[derive(Default)]
pub struct Registry {
    backends: Vec<Box<dyn Backend>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, backend: Box<dyn Backend>) -> Self {
        self.backends.push(backend);
        self
    }

    pub fn get(&self, name: &str) -> Option<&dyn Backend> {
        self.backends
            .iter()
            .find(|b| b.name() == name)
            .map(|b| b.as_ref())
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.backends.iter().map(|b| b.name()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn Backend> {
        self.backends.iter().map(|b| b.as_ref())
    }
}

/// The message a panic carried (`panic!`, `todo!`, `unwrap` on an error),
/// for a cell or an error that says what the runtime did.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// `msg` with what to do about a CUDA error whose text alone does not say
/// it: a stub `libcuda` (the link-time stand-in a CUDA toolkit ships in
/// `lib64/stubs`) found before the driver's, which tract-cuda reports as
/// "Could not find system default CUDA device".
pub fn with_cuda_hint(msg: String) -> String {
    if msg.contains("CUDA_ERROR_STUB_LIBRARY") {
        format!(
            "{msg} (a stub libcuda was loaded instead of the NVIDIA driver's: take the CUDA toolkit's `stubs` folder off LD_LIBRARY_PATH)"
        )
    } else {
        msg
    }
}

/// Pulls the op name out of a runtime's error text when it says an op is
/// missing, so the cell reads `unsupported: op LayerNormalization`.
pub fn unsupported_op_from_message(msg: &str) -> Option<String> {
    const MARKERS: [&str; 5] = [
        "Unimplemented(",
        "unsupported op_type ",
        "Unsupported op_type ",
        "unsupported op ",
        "Could not find an implementation for ",
    ];
    for marker in MARKERS {
        if let Some(pos) = msg.find(marker) {
            let rest = &msg[pos + marker.len()..];
            let op: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':' || *c == '.')
                .collect();
            if !op.is_empty() {
                return Some(op);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stub_libcuda_is_named_and_other_errors_are_left_alone() {
        // As tract-cuda panicked on an H200 with a toolkit's lib64/stubs on
        // LD_LIBRARY_PATH.
        let seen = "Could not create CUDA context: Could not find system default CUDA device\n\nCaused by:\n    DriverError(CUDA_ERROR_STUB_LIBRARY, \"<Failure when calling cuGetErrorString()>\")";
        let hinted = with_cuda_hint(seen.to_owned());
        assert!(hinted.starts_with(seen), "{hinted}");
        assert!(
            hinted.ends_with("take the CUDA toolkit's `stubs` folder off LD_LIBRARY_PATH)"),
            "{hinted}"
        );
        assert_eq!(with_cuda_hint("out of memory".into()), "out of memory");
    }

    #[test]
    fn finds_op_names_in_runtime_messages() {
        assert_eq!(
            unsupported_op_from_message(
                "unsupported op_type LayerNormalization for op NodeProto {..}"
            ),
            Some("LayerNormalization".into())
        );
        assert_eq!(unsupported_op_from_message("shape mismatch"), None);
    }

    #[test]
    fn a_backend_left_out_of_the_build_is_unavailable_naming_its_feature() {
        let b = NotBuilt {
            name: "tract",
            kind: ExecutionKind::OptimisedGraph,
            feature: "tract",
        };
        for device in [Device::Cpu, Device::Cuda] {
            match b.probe(device) {
                Probe::Unavailable { reason } => {
                    assert!(reason.contains("without the `tract` feature"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        let model = ModelRef {
            id: "m".into(),
            path: "m.onnx".into(),
            hf_dir: None,
        };
        let options = PrepareOptions {
            device: Device::Cpu,
            threads: 1,
            inputs: Vec::new(),
            options: serde_json::Value::Null,
        };
        match b.prepare(&model, &options) {
            Err(BackendError::Unavailable(reason)) => assert!(reason.contains("--features tract")),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a backend that is not built prepared a model"),
        }
    }
}
