//! The model steps of preparation that run a runtime: the conversion check
//! (ORT on the converted ONNX against candle on the source safetensors),
//! lowering an op a backend lacks (found by probing the backend, checked on
//! ORT), and precision variants with their accuracy gate and cache.
//!
//! [`Tools`] implements the suite's [`ModelTools`]: `handoff_suite` builds
//! the plan and calls these steps when it prepares (`Preparation::Build`),
//! and asks only for what is cached when it describes a plan.

mod lower;
mod sensitivity;
mod variant;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use handoff_backend::{
    Backend, BackendError, ModelRef, PrepareOptions, Registry, Tensor, TensorSpec,
};
use handoff_convert::provenance::{Check, Provenance};
use handoff_suite::{Lowered, ModelTools, ToolError, Variant};

pub use lower::{InitGap, init_gap};
pub use variant::{Gated, QUANT_ENV, VariantRequest, build_variant, variant_path};

/// Thresholds of the conversion check (ORT on the ONNX file vs candle's
/// native BERT on the safetensors).
pub const CONVERSION_MAX_ABS: f64 = 1e-4;
pub const CONVERSION_MIN_COSINE: f64 = 0.9999;
/// A lowered model must match the original on ORT this closely.
pub const LOWERING_MAX_ABS: f64 = 1e-5;

/// Why a model step failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A runtime failed on the model (`what` says which run).
    #[error("{what}: {source}")]
    Backend {
        what: String,
        #[source]
        source: BackendError,
    },
    /// The step needs something this build or model lacks.
    #[error("{0}")]
    Needs(String),
    #[error(transparent)]
    Onnx(#[from] handoff_onnx::inspect::OnnxError),
    #[error("{path}: {source}")]
    Quantize {
        path: PathBuf,
        #[source]
        source: handoff_convert::quantize::QuantError,
    },
    #[error(transparent)]
    Lower(#[from] handoff_convert::lower::LowerError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The outputs do not allow the check (shapes, names) or a rewrite
    /// changed them.
    #[error("{0}")]
    Check(String),
    /// A step run in Python (ONNX Runtime's quantiser) failed.
    #[error("{0}")]
    Python(String),
    #[error(transparent)]
    PythonEnv(#[from] handoff_python::PythonError),
    #[error("unknown variant `{name}` (known: {known})")]
    UnknownVariant { name: String, known: String },
}

impl PrepareError {
    fn backend(what: impl Into<String>) -> impl FnOnce(BackendError) -> PrepareError {
        let what = what.into();
        move |source| PrepareError::Backend { what, source }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PrepareError + '_ {
        move |source| PrepareError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The runtimes and places the steps use.
pub struct Tools {
    pub registry: Arc<Registry>,
    /// Where files a suite makes (variants, lowered models) go.
    pub model_cache: PathBuf,
    /// Makes ONNX Runtime loadable (fetches its library when missing);
    /// called once per process before the first step that runs it.
    pub ensure_ort: fn(),
}

impl Tools {
    fn ort_ready(&self) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(self.ensure_ort);
    }

    fn backend(&self, name: &str) -> Result<&dyn Backend, PrepareError> {
        self.registry
            .get(name)
            .ok_or_else(|| PrepareError::Needs(format!("backend {name} is not in this build")))
    }

    /// The directory for files made from `onnx`: beside it when it is in
    /// the model cache already (downloaded, converted or generated there),
    /// else a directory of the cache named after the file's location, so a
    /// suite never writes next to a file it was only pointed at.
    fn derived_dir(&self, onnx: &Path) -> Result<PathBuf, PrepareError> {
        let dir = self.derived_dir_path(onnx);
        std::fs::create_dir_all(&dir).map_err(PrepareError::io(&dir))?;
        Ok(dir)
    }

    /// [`Self::derived_dir`] without creating it.
    fn derived_dir_path(&self, onnx: &Path) -> PathBuf {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
        let (file, cache) = (abs(onnx), abs(&self.model_cache));
        match file.parent() {
            Some(parent) if file.starts_with(&cache) => parent.to_owned(),
            _ => {
                let key = handoff_onnx::inspect::sha256_hex(file.to_string_lossy().as_bytes());
                cache.join("derived").join(&key[..16])
            }
        }
    }

    /// `name` (a file made from `onnx`) in [`Self::derived_dir`].
    fn derived(&self, onnx: &Path, name: &str) -> Result<PathBuf, PrepareError> {
        Ok(self.derived_dir(onnx)?.join(name))
    }

    /// Where [`Self::derived`] puts `name`, creating nothing.
    fn derived_path(&self, onnx: &Path, name: &str) -> PathBuf {
        self.derived_dir_path(onnx).join(name)
    }

    /// ORT on the converted ONNX vs candle-native on the source
    /// safetensors, on the model's answer (`sentence_embedding`, or a
    /// classifier's `logits`).
    pub fn check_conversion(
        &self,
        onnx: &Path,
        hf_dir: &Path,
        specs: &[TensorSpec],
    ) -> Result<Check, PrepareError> {
        self.ort_ready();
        let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(0)).collect();
        let ort = run_once(self.backend("ort")?, onnx, None, &inputs, specs)
            .map_err(PrepareError::backend("ort"))?;
        let native = run_once(
            self.backend("candle-native")?,
            onnx,
            Some(hf_dir),
            &inputs,
            specs,
        )
        .map_err(PrepareError::backend("candle-native"))?;
        let second = |outputs: &[Tensor], who: &str| {
            outputs
                .get(1)
                .cloned()
                .ok_or_else(|| PrepareError::Check(format!("{who} gave no second output")))
        };
        let (a, b) = (second(&ort, "ort")?, second(&native, "candle-native")?);
        if a.name != b.name {
            return Err(PrepareError::Check(format!(
                "ort's second output is `{}`, candle-native's `{}`",
                a.name, b.name
            )));
        }
        let (max_abs, min_cosine) = embedding_agreement(&a, &b);
        let batch = specs.first().map_or(0, |s| s.shape[0]);
        let seq = specs
            .first()
            .map_or(0, |s| s.shape.get(1).copied().unwrap_or(0));
        Ok(Check {
            name: "conversion".into(),
            compared: format!(
                "{}: ort 1 thread (converted ONNX) vs candle-native (source safetensors)",
                a.name
            ),
            inputs: format!("{batch} tokenised sentences, seq {seq}"),
            max_abs,
            min_cosine,
            threshold_max_abs: CONVERSION_MAX_ABS,
            threshold_min_cosine: CONVERSION_MIN_COSINE,
            label_agreement: None,
            passed: max_abs <= CONVERSION_MAX_ABS && min_cosine >= CONVERSION_MIN_COSINE,
            cpu_class: None,
        })
    }
}

impl ModelTools for Tools {
    fn make_variant(
        &self,
        onnx: &Path,
        hf_dir: Option<&Path>,
        variant: &str,
        min_cosine: f64,
        specs: &[TensorSpec],
        calibration: &[TensorSpec],
    ) -> Result<Variant, ToolError> {
        Ok(self.variant(onnx, hf_dir, variant, min_cosine, specs, calibration)?)
    }

    fn verify_conversion(
        &self,
        onnx: &Path,
        hf_dir: &Path,
        specs: &[TensorSpec],
    ) -> Result<Check, ToolError> {
        Ok(self.check_conversion(onnx, hf_dir, specs)?)
    }

    fn cached_variant(
        &self,
        onnx: &Path,
        variant: &str,
        min_cosine: f64,
        specs: &[TensorSpec],
    ) -> Option<Variant> {
        self.cached_variant_of(onnx, variant, min_cosine, specs)
    }

    fn cached_lowering(&self, onnx: &Path, backend: &str) -> Option<Lowered> {
        self.cached_lowering_of(onnx, backend)
    }

    fn lower_for(
        &self,
        onnx: &Path,
        backend: &str,
        specs: &[TensorSpec],
    ) -> Result<Option<Lowered>, ToolError> {
        Ok(self.lower(onnx, backend, specs)?)
    }
}

/// `onnx` (with the HF directory, for candle-native) on `backend`, 1
/// thread, CPU.
fn run_once(
    backend: &dyn Backend,
    onnx: &Path,
    hf_dir: Option<&Path>,
    inputs: &[Tensor],
    specs: &[TensorSpec],
) -> Result<Vec<Tensor>, BackendError> {
    run_model(backend, &check_model(onnx, hf_dir), inputs, specs)
}

/// [`run_once`] of an ONNX file with the backend's suite options.
fn run_once_with(
    backend: &dyn Backend,
    onnx: &Path,
    inputs: &[Tensor],
    specs: &[TensorSpec],
    backend_options: serde_json::Value,
) -> Result<Vec<Tensor>, BackendError> {
    let model = check_model(onnx, None);
    run_model_with(backend, &model, inputs, specs, 1, backend_options)
}

fn check_model(onnx: &Path, hf_dir: Option<&Path>) -> ModelRef {
    ModelRef {
        path: onnx.to_owned(),
        id: "check".into(),
        hf_dir: hf_dir.map(Path::to_owned),
    }
}

fn run_model(
    backend: &dyn Backend,
    model: &ModelRef,
    inputs: &[Tensor],
    specs: &[TensorSpec],
) -> Result<Vec<Tensor>, BackendError> {
    // In this process candle's pool has whatever size rayon chose.
    let threads = if backend.name().starts_with("candle") {
        candle_threads()
    } else {
        1
    };
    run_model_on(backend, model, inputs, specs, threads)
}

/// [`run_model`] on `threads` threads.
fn run_model_on(
    backend: &dyn Backend,
    model: &ModelRef,
    inputs: &[Tensor],
    specs: &[TensorSpec],
    threads: usize,
) -> Result<Vec<Tensor>, BackendError> {
    run_model_with(
        backend,
        model,
        inputs,
        specs,
        threads,
        serde_json::Value::Null,
    )
}

/// [`run_model_on`] with the backend's suite options.
fn run_model_with(
    backend: &dyn Backend,
    model: &ModelRef,
    inputs: &[Tensor],
    specs: &[TensorSpec],
    threads: usize,
    backend_options: serde_json::Value,
) -> Result<Vec<Tensor>, BackendError> {
    let options = PrepareOptions {
        device: handoff_backend::Device::Cpu,
        threads,
        inputs: specs.to_vec(),
        options: backend_options,
    };
    // A runtime that panics on a model (candle-onnx's `todo!()` for an op
    // form it lacks) fails this step with its message; measured cases run
    // in child processes, but these steps run in handoff's own.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut p = backend.prepare(model, &options)?;
        p.bind(inputs)?;
        p.run()?;
        p.outputs()
    }))
    .unwrap_or_else(|panic| {
        Err(BackendError::Failed(format!(
            "panic in {}: {}",
            backend.name(),
            handoff_backend::panic_message(&*panic)
        )))
    })
}

fn candle_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// Largest absolute difference and smallest row-wise cosine similarity
/// (NaN counts as the worst, not as agreement).
pub fn embedding_agreement(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let (x, y) = (a.data.to_f64(), b.data.to_f64());
    // A NaN difference is the worst difference, not one `max` skips.
    let max_abs = x
        .iter()
        .zip(&y)
        .map(|(p, q)| {
            let d = (p - q).abs();
            if d.is_nan() { f64::INFINITY } else { d }
        })
        .fold(0.0, f64::max);
    let min_cos = handoff_backend::min_row_cosine(std::slice::from_ref(a), std::slice::from_ref(b));
    (max_abs, min_cos)
}

/// A rewritten model's provenance: the source's, with this tool's version.
fn derived_provenance(onnx: &Path) -> Provenance {
    let mut prov = Provenance::load(onnx).unwrap_or_default();
    prov.tool = handoff_convert::CONVERTER_VERSION.into();
    prov
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_backend::TensorData;

    fn t(v: Vec<f32>) -> Tensor {
        Tensor {
            name: "e".into(),
            shape: vec![2, 2],
            data: TensorData::F32(v),
        }
    }

    #[test]
    fn nan_outputs_fail_the_agreement_check() {
        let (abs, cos) =
            embedding_agreement(&t(vec![1.0, 0.0, 0.0, 1.0]), &t(vec![1.0, 0.0, 0.0, 1.0]));
        assert_eq!((abs, cos), (0.0, 1.0));
        let (abs, cos) = embedding_agreement(
            &t(vec![1.0, 0.0, 0.0, 1.0]),
            &t(vec![1.0, 0.0, f32::NAN, 1.0]),
        );
        assert!(abs.is_infinite() && cos <= 0.0, "{abs} {cos}");
    }
}
