//! `handoff quantize`: a precision variant, checked against fp32.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use handoff_backend::Registry;

use crate::out::{errln, outln};
use handoff_prepare as tools;

/// Build a precision variant of an ONNX model, check it against the
/// original on ONNX Runtime and write `<out>.provenance.json`.
///
/// `int8-dynamic`: MatMul weights int8 (symmetric, per output column),
/// activations quantised per call (DynamicQuantizeLinear + MatMulInteger,
/// the pattern ORT fuses), embedding tables int8 per row, after
/// SmoothQuant (activation outlier channels moved into the weights,
/// maxima from one calibration run). `int8-static`: the same weights and
/// smoothing, activations in QDQ form with min-max (or percentile)
/// ranges. Calibration uses handoff's calibration sentences (or random
/// inputs of another seed), never the check's inputs. `fp16`: weights
/// stored fp16 and cast back, so compute and I/O stay fp32. Nothing is
/// written when the check fails or the model has nothing to quantise.
///
/// Example: handoff quantize model.onnx --to int8-dynamic --tokenizer tokenizer.json
#[derive(clap::Args)]
pub struct QuantizeCmd {
    /// The fp32 ONNX model.
    pub model: PathBuf,
    /// The variant.
    #[arg(long, value_parser = ["int8-dynamic", "int8-static", "fp16", "ort-int8-dynamic", "nnef"])]
    pub to: String,
    /// Output file (default: `<model stem>.<variant>.onnx` beside it).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// One scale per weight tensor instead of per output column.
    #[arg(long)]
    pub per_tensor: bool,
    /// Keep embedding tables (Gather on a constant) in fp32.
    #[arg(long)]
    pub no_embeddings: bool,
    /// Down-projections (weights with rows >= 2 x columns) get int8
    /// weights but multiply in fp32 (slower, for models whose FFN
    /// activations lose too much in int8).
    #[arg(long)]
    pub weight_only_down_proj: bool,
    /// int8-dynamic/int8-static: SmoothQuant strength in [0, 1] (0.7 by
    /// default): how much of each activation channel's range moves into
    /// the weights, from maxima calibrated on sentences the check does
    /// not use.
    #[arg(long, value_name = "ALPHA", conflicts_with = "no_smooth")]
    pub smooth: Option<f64>,
    /// int8-dynamic/int8-static: no SmoothQuant (and, for
    /// int8-dynamic, no calibration run).
    #[arg(long)]
    pub no_smooth: bool,
    /// int8-dynamic/int8-static: no split of outlier channels (a
    /// down-projection input's few channels that dwarf the rest, found on
    /// the calibration inputs and multiplied in fp32 beside the int8
    /// product).
    #[arg(long)]
    pub no_split: bool,
    /// int8-static: activation ranges from `minmax` (nothing clips),
    /// `percentile:P` (the values beyond the P-th percentile clip) or
    /// `entropy` (the clip with the least KL divergence, as TensorRT).
    #[arg(long, default_value = "minmax")]
    pub calibration: handoff_convert::quantize::Calibration,
    /// Node or initializer names to keep in fp32 (repeatable). A model
    /// that misses the gate anyway keeps the fewest further MatMuls in
    /// fp32 that clear it, chosen by measuring each one's cost on the
    /// calibration inputs.
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Weights with fewer elements stay fp32.
    #[arg(long, default_value_t = 4096)]
    pub min_elements: usize,
    /// The CPU class the int8 model will run on: `native` (this
    /// machine), `avx2` (no VNNI: 7-bit weights, as ONNX Runtime's
    /// reduce_range, since its kernels' 16-bit pair sums saturate),
    /// `avx512-vnni`, `avx-vnni`, `amx` or `arm64-dotprod` (8-bit).
    #[arg(long, default_value = "native")]
    pub target_cpu: handoff_convert::isa::TargetCpu,
    /// Fail (write nothing) below this cosine similarity to fp32.
    #[arg(long, default_value_t = 0.99)]
    pub min_cosine: f64,
    /// Tokenizer for the check inputs of a text model (else random token ids).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Batch of the check inputs.
    #[arg(long, default_value_t = 32)]
    pub batch: u32,
    /// Size of every other symbolic dim of the check inputs (e.g. seq).
    #[arg(long, default_value_t = 128)]
    pub seq: u32,
}

impl QuantizeCmd {
    pub fn run(self, registry: &Arc<Registry>) -> Result<ExitCode> {
        let Self {
            model,
            to,
            out,
            per_tensor,
            no_embeddings,
            weight_only_down_proj,
            smooth,
            no_smooth,
            no_split,
            calibration: calibration_method,
            exclude,
            min_elements,
            target_cpu,
            min_cosine,
            tokenizer,
            batch,
            seq,
        } = self;
        let out = out.unwrap_or_else(|| tools::variant_path(&model, &to));
        let cpu = target_cpu.class();
        let request = tools::VariantRequest {
            variant: to.clone(),
            dynamic: handoff_convert::quantize::DynamicOptions {
                per_channel: !per_tensor,
                embeddings: !no_embeddings,
                down_proj_weight_only: weight_only_down_proj,
                smooth_alpha: if no_smooth {
                    None
                } else {
                    Some(smooth.unwrap_or(handoff_convert::quantize::SMOOTH_ALPHA))
                },
                calibration: calibration_method,
                min_elements,
                exclude,
                weight_bits: cpu.weight_bits(),
                split_outliers: (!no_split).then_some(handoff_convert::quantize::SPLIT_RATIO),
            },
            min_cosine,
            cpu,
        };
        let sentences = handoff_suite::text::DEFAULT_SENTENCES;
        let specs = check_inputs(&model, tokenizer.as_deref(), &sentences, batch, seq)?;
        let calibration = handoff_suite::text::CALIBRATION_SENTENCES;
        let calibration = check_inputs(&model, tokenizer.as_deref(), &calibration, batch, seq)?;
        // Always rebuild on request: the cache is for suites.
        let _ = std::fs::remove_file(&out);
        let tools::Gated { check, warning, .. } =
            tools::build_variant(registry, &model, &out, &request, &specs, &calibration)?;
        if let Some(w) = warning {
            errln!("warning: {w}");
        }
        let (a, b) = (
            std::fs::metadata(&model)?.len(),
            std::fs::metadata(&out)?.len(),
        );
        outln!(
            "{}: {:.1} MB -> {:.1} MB ({:.0}% of fp32); {}: min cosine {:.6}, max abs {:.2e} vs fp32",
            out.display(),
            a as f64 / 1e6,
            b as f64 / 1e6,
            100.0 * b as f64 / a as f64,
            check.inputs,
            check.min_cosine,
            check.max_abs
        )?;
        if !check.passed {
            let _ = std::fs::remove_file(&out);
            let _ =
                std::fs::remove_file(handoff_convert::provenance::Provenance::sidecar_path(&out));
            anyhow::bail!(
                "accuracy gate failed: min cosine {:.6} < {min_cosine}; nothing written",
                check.min_cosine
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Check inputs for `handoff quantize`: tokenised sentences for a text
/// model when a tokenizer is given, else seeded random values (token-like
/// ids for integer inputs).
fn check_inputs(
    model: &Path,
    tokenizer: Option<&Path>,
    sentences: &[&str],
    batch: u32,
    seq: u32,
) -> Result<Vec<handoff_backend::TensorSpec>> {
    use handoff_backend::{DType, Fill, TensorSpec};
    use handoff_onnx::inspect::{Dim, ElemType, ModelInfo};
    let info = ModelInfo::load(model)?;
    let enc = match tokenizer {
        Some(t) => {
            let sentences: Vec<String> = sentences.iter().map(|s| (*s).to_owned()).collect();
            Some(
                handoff_suite::text::encode(t, &sentences, &[seq])
                    .map_err(anyhow::Error::msg)?
                    .remove(&seq)
                    .ok_or_else(|| anyhow::anyhow!("tokenizer gave no encoding"))?,
            )
        }
        None => None,
    };
    info.inputs
        .iter()
        .map(|io| {
            let dims = io.dims.clone().unwrap_or_default();
            let shape: Vec<usize> = dims
                .iter()
                .enumerate()
                .map(|(k, d)| match d {
                    Dim::Fixed(v) => *v as usize,
                    _ if k == 0 => batch as usize,
                    _ => seq as usize,
                })
                .collect();
            let (dtype, fill) = match io.elem {
                ElemType::F32 => (
                    DType::F32,
                    Fill::Random {
                        min: -1.0,
                        max: 1.0,
                    },
                ),
                ElemType::I64 | ElemType::I32 => {
                    let dtype = if io.elem == ElemType::I64 {
                        DType::I64
                    } else {
                        DType::I32
                    };
                    let rows = |e: &handoff_suite::text::Encoded| match io.name.as_str() {
                        "input_ids" => Some(e.batch(&e.ids, batch as usize)),
                        "attention_mask" => Some(e.batch(&e.mask, batch as usize)),
                        "token_type_ids" => Some(e.batch(&e.types, batch as usize)),
                        _ => None,
                    };
                    let fill = match enc.as_ref().and_then(rows) {
                        Some(v) => Fill::Values(v),
                        None if io.name.contains("mask") => Fill::Constant(1.0),
                        None if io.name.contains("type") => Fill::Constant(0.0),
                        None => Fill::RandomInt {
                            min: 1000,
                            max: 2000,
                        },
                    };
                    (dtype, fill)
                }
                other => {
                    anyhow::bail!("{}: input `{}` has dtype {other}", model.display(), io.name)
                }
            };
            Ok(TensorSpec {
                name: io.name.clone(),
                dtype,
                shape,
                fill,
            })
        })
        .collect()
}
