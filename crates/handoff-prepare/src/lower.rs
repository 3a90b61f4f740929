//! Lowering by probing: run the model on a backend; while the backend
//! stops at an op handoff can rewrite into simpler ones, rewrite it, and
//! keep the copy only if ORT gives the original's outputs on it.

use std::path::Path;

use handoff_backend::{BackendError, Registry, Tensor, TensorSpec};
use handoff_convert::lower::{LOWERABLE, lower_op};
use handoff_convert::provenance::{Check, Provenance, Step};
use handoff_suite::Lowered;

use crate::{
    LOWERING_MAX_ABS, PrepareError, Tools, derived_provenance, embedding_agreement, run_once,
    run_once_with,
};

/// What one run of a backend on a model shows `handoff init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitGap {
    /// It ran, or failed for a reason its cells will say.
    None,
    /// It stops at this op, which handoff can lower (`lower_for`).
    Lowerable(String),
    /// tract fails to plan the model with its symbolic dims and runs it
    /// with each input pinned to the case's shape (`backend_options:
    /// {tract: {shapes: concrete}}`), as on torch.onnx's BERT exports.
    TractConcreteShapes,
}

/// Runs `backend` once on `onnx` (and tract, where that fails, once more
/// with concrete shapes) to find what `handoff init` should add.
pub fn init_gap(registry: &Registry, backend: &str, onnx: &Path, specs: &[TensorSpec]) -> InitGap {
    let Some(b) = registry.get(backend) else {
        return InitGap::None;
    };
    let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(0)).collect();
    match run_once(b, onnx, None, &inputs, specs) {
        Err(BackendError::Unsupported(reason)) => {
            lowerable(&reason).map_or(InitGap::None, |op| InitGap::Lowerable(op.to_owned()))
        }
        Err(BackendError::InvalidModel(_) | BackendError::Failed(_))
            if backend == "tract"
                && run_once_with(
                    b,
                    onnx,
                    &inputs,
                    specs,
                    serde_json::json!({"shapes": "concrete"}),
                )
                .is_ok() =>
        {
            InitGap::TractConcreteShapes
        }
        _ => InitGap::None,
    }
}

/// The op named by an `unsupported` reason, when handoff can lower it.
fn lowerable(reason: &str) -> Option<&str> {
    reason
        .strip_prefix("op ")
        .filter(|op| LOWERABLE.contains(op))
}

/// The file name of `onnx` lowered for `backend`.
fn lowered_file_name(onnx: &Path, backend: &str) -> String {
    let stem = onnx.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    format!("{stem}.lowered-{backend}.onnx")
}

impl Tools {
    /// The lowered copy [`Self::lower`] would reuse: one lowered from the
    /// model as it is now (its sha256, external data included), so a new
    /// export at the same path is lowered again.
    pub(crate) fn cached_lowering_of(&self, onnx: &Path, backend: &str) -> Option<Lowered> {
        let source = handoff_onnx::external::file_sha256(onnx).ok()?;
        self.cached_lowering_from(onnx, backend, &source)
    }

    /// [`Self::cached_lowering_of`] for a source whose sha256 is `source`.
    fn cached_lowering_from(&self, onnx: &Path, backend: &str, source: &str) -> Option<Lowered> {
        let out = self.derived_path(onnx, &lowered_file_name(onnx, backend));
        let prov = Provenance::load(&out).filter(|_| out.is_file())?;
        let steps: Vec<_> = prov
            .steps
            .iter()
            .filter(|s| s.name.starts_with("lower:"))
            .collect();
        if steps.is_empty() || steps.iter().any(|s| s.params["source_sha256"] != source) {
            return None;
        }
        let ops = steps
            .iter()
            .filter_map(|s| s.name.strip_prefix("lower:").map(str::to_owned))
            .collect();
        Some(Lowered { path: out, ops })
    }

    /// Runs `onnx` on `backend_name`, lowering each op it stops at that
    /// handoff can lower; `Ok(None)`: nothing needed lowering (or what it
    /// stops at cannot be lowered: its cells will say which op).
    pub fn lower(
        &self,
        onnx: &Path,
        backend_name: &str,
        specs: &[TensorSpec],
    ) -> Result<Option<Lowered>, PrepareError> {
        self.ort_ready();
        let source = handoff_onnx::external::file_sha256(onnx)?;
        if let Some(cached) = self.cached_lowering_from(onnx, backend_name, &source) {
            return Ok(Some(cached));
        }
        let out = self.derived(onnx, &lowered_file_name(onnx, backend_name))?;
        let backend = self.backend(backend_name)?;
        let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(0)).collect();
        let mut model = handoff_onnx::external::read_model_inline(onnx)?;
        let mut lowered_ops: Vec<String> = Vec::new();
        let tmp = out.with_extension(format!("probe{}.onnx", std::process::id()));
        let mut current = onnx.to_owned();
        let result = loop {
            let op = match run_once(backend, &current, None, &inputs, specs) {
                Err(BackendError::Unsupported(reason)) => lowerable(&reason)
                    .filter(|op| !lowered_ops.iter().any(|o| o == op))
                    .map(str::to_owned),
                _ => None,
            };
            // It ran, or stops at what handoff cannot lower (another op, an
            // error, a panic): keep what was lowered, and its cells say the
            // rest, as they would without lowering.
            let Some(op) = op else { break Ok(()) };
            if let Err(e) = lower_op(&mut model, &op) {
                break Err(e.into());
            }
            lowered_ops.push(op);
            if let Err(e) = handoff_onnx::builder::write_model(&model, &tmp) {
                break Err(e.into());
            }
            current = tmp.clone();
        };
        let checked = result.and_then(|()| {
            if lowered_ops.is_empty() {
                return Ok(None);
            }
            self.check_lowering(onnx, &tmp, &inputs, specs, &lowered_ops)
                .map(Some)
        });
        let max_abs = match checked {
            Ok(Some(max_abs)) => max_abs,
            other => {
                let _ = std::fs::remove_file(&tmp);
                return other.map(|_| None);
            }
        };
        std::fs::rename(&tmp, &out).map_err(PrepareError::io(&out))?;
        let bytes = std::fs::read(&out).map_err(PrepareError::io(&out))?;
        let mut prov = derived_provenance(onnx);
        for op in &lowered_ops {
            prov.steps.push(Step {
                name: format!("lower:{op}"),
                params: serde_json::json!({"for": backend_name, "found_by": "probing the backend", "source_sha256": source}),
            });
        }
        prov.output_sha256 = handoff_onnx::inspect::sha256_hex(&bytes);
        prov.size_bytes = bytes.len() as u64;
        prov.checks.push(Check {
            name: "lowering".into(),
            compared: "all outputs: ort on the lowered vs the original model".into(),
            inputs: "the suite's inputs at batch 1".into(),
            max_abs,
            min_cosine: f64::NAN,
            threshold_max_abs: LOWERING_MAX_ABS,
            threshold_min_cosine: f64::NAN,
            label_agreement: None,
            passed: true,
            cpu_class: None,
        });
        prov.save(&out).map_err(PrepareError::io(&out))?;
        Ok(Some(Lowered {
            path: out,
            ops: lowered_ops,
        }))
    }

    /// The rewrite must not change the numbers: every output on ORT, the
    /// lowered copy against the original. Returns the largest difference.
    fn check_lowering(
        &self,
        onnx: &Path,
        lowered: &Path,
        inputs: &[Tensor],
        specs: &[TensorSpec],
        ops: &[String],
    ) -> Result<f64, PrepareError> {
        let ort = self
            .registry
            .get("ort")
            .ok_or_else(|| PrepareError::Needs("ort is needed to check a lowering".into()))?;
        let a = run_once(ort, onnx, None, inputs, specs)
            .map_err(PrepareError::backend("ort (original)"))?;
        let b = run_once(ort, lowered, None, inputs, specs)
            .map_err(PrepareError::backend("ort (lowered)"))?;
        let max_abs = a
            .iter()
            .zip(&b)
            .map(|(x, y)| embedding_agreement(x, y).0)
            .fold(0.0, f64::max);
        if max_abs > LOWERING_MAX_ABS {
            return Err(PrepareError::Check(format!(
                "lowering {} changed the outputs on ort by {max_abs:.2e} (> {LOWERING_MAX_ABS:e})",
                ops.join(", ")
            )));
        }
        Ok(max_abs)
    }
}
