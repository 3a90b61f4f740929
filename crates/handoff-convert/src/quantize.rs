//! Precision variants written on the ONNX graph: int8 dynamic quantisation
//! and fp16 weight storage.
//!
//! int8 dynamic follows the pattern ONNX Runtime's own quantiser emits, so
//! ORT fuses it into its integer kernels (`DynamicQuantizeMatMul`):
//!
//! ```text
//! A -> DynamicQuantizeLinear -> (Aq: u8, As, Azp)
//! MatMulInteger(Aq, Wq: i8, Azp, Wzp) -> Cast(f32) -> Mul(As * Ws) -> Y
//! ```
//!
//! Weights are symmetric int8 (zero point 0), per output column by default.
//! Embedding tables (`Gather` on a constant) are stored int8 per row and
//! dequantised after the lookup: `Cast(Gather(Tq, ids)) * Gather(Ts, ids)`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use handoff_onnx::builder::{
    attr_int, attr_ints, named_node as node, tensor_f32, tensor_i8, tensor_i64, tensor_u8,
};
use handoff_onnx::inspect::ElemType;
use handoff_onnx::proto::{ModelProto, NodeProto, TensorProto};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("model has no graph")]
    NoGraph,
    #[error(
        "nothing to quantise: no MatMul or Gather has a constant float weight of at least {min_elements} elements{detail}"
    )]
    NothingToQuantize { min_elements: usize, detail: String },
    #[error("calibration: {0}")]
    Calibration(String),
    #[error(
        "the model imports ONNX opset {found}; {what} needs opset >= {needs}: export it again at a newer opset"
    )]
    Opset {
        found: i64,
        needs: i64,
        what: &'static str,
    },
    #[error("initializer `{name}`: {detail}")]
    Initializer { name: String, detail: String },
    #[error(
        "fp16 overflow: {count} weight values exceed 65504 in magnitude (largest {max:e}, in {names}); keep those initializers in fp32 with --exclude"
    )]
    Fp16Overflow {
        count: usize,
        max: f32,
        names: String,
    },
}

/// What to quantise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DynamicOptions {
    /// One scale per output column (else one per tensor).
    pub per_channel: bool,
    /// Quantise embedding tables (`Gather` on a constant).
    pub embeddings: bool,
    /// Weights smaller than this stay fp32: no gain, and their scales cost.
    pub min_elements: usize,
    /// Node names (or initializer names) kept in fp32.
    pub exclude: Vec<String>,
    /// Down-projections (MatMul weights with at least twice as many rows as
    /// columns, e.g. a transformer's FFN output after GELU): store their
    /// weights int8 but dequantise them and multiply in fp32, for when
    /// their activations' outliers cost too much accuracy in int8.
    pub down_proj_weight_only: bool,
    /// SmoothQuant strength (see [`smooth`]): move this much of each
    /// activation channel's range into the weights before quantising, with
    /// per-channel maxima calibrated on inputs other than the check's.
    /// `None`: no smoothing, no calibration run.
    #[serde(default)]
    pub smooth_alpha: Option<f64>,
    /// int8-static: how calibration values become an activation's range.
    #[serde(default)]
    pub calibration: Calibration,
    /// Bits of the weights multiplied in integer kernels: 8 (|q| <= 127),
    /// or 7 (|q| <= 63) for CPUs whose kernels sum pairs of u8 x s8
    /// products in saturating 16 bits (see [`crate::isa`]). Embedding
    /// tables and weight-only MatMuls are dequantised to fp32 and keep 8.
    #[serde(default = "eight")]
    pub weight_bits: u8,
    /// Outlier channels of down-projection inputs (see
    /// [`split_outlier_channels`]): a channel whose calibrated maximum is
    /// more than this many times that of a typical large channel is
    /// multiplied in fp32, apart from the int8 product. `None`: no split.
    #[serde(default)]
    pub split_outliers: Option<f32>,
}

fn eight() -> u8 {
    8
}

impl DynamicOptions {
    /// The defaults for a model that will run on CPUs of `class`.
    pub fn for_cpu(class: crate::isa::CpuClass) -> Self {
        Self {
            weight_bits: class.weight_bits(),
            ..Self::default()
        }
    }

    /// The largest weight magnitude of integer-kernel MatMuls.
    fn matmul_qmax(&self) -> f32 {
        if self.weight_bits == 7 { 63.0 } else { 127.0 }
    }
}

/// How static quantisation turns an activation's calibration values into
/// the range its uint8 scale covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Calibration {
    /// Smallest to largest value seen: nothing clips, and one outlier
    /// coarsens the steps for everything else.
    #[default]
    MinMax,
    /// From the `(100 - p)`-th to the `p`-th percentile: the rarest values
    /// clip, the rest get finer steps.
    Percentile(f64),
    /// The clipping threshold on |x| whose 128-level quantised histogram is
    /// closest (KL divergence) to the clipped original: TensorRT's entropy
    /// calibration (2048 bins).
    Entropy,
}

impl std::str::FromStr for Calibration {
    type Err = String;

    /// `minmax`, or `percentile:P` with 50 < P <= 100 (`percentile` alone:
    /// 99.99).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "minmax" => Ok(Self::MinMax),
            None if s == "percentile" => Ok(Self::Percentile(99.99)),
            None if s == "entropy" => Ok(Self::Entropy),
            Some(("percentile", p)) => match p.parse::<f64>() {
                Ok(p) if p > 50.0 && p <= 100.0 => Ok(Self::Percentile(p)),
                _ => Err(format!("percentile `{p}`: need a number in (50, 100]")),
            },
            _ => Err(format!(
                "calibration `{s}`: use `minmax`, `entropy` or `percentile:P` (e.g. percentile:99.99)"
            )),
        }
    }
}

/// Default SmoothQuant strength. On all-MiniLM-L6-v2 (every MatMul int8,
/// maxima from 32 calibration sentences, gate on 32 others) the smallest
/// sentence-embedding cosine vs fp32 was 0.9821 unsmoothed, 0.9918 at 0.5,
/// 0.9931 at 0.6 and 0.9939 at 0.7.
pub const SMOOTH_ALPHA: f64 = 0.7;

impl Default for DynamicOptions {
    fn default() -> Self {
        Self {
            per_channel: true,
            embeddings: true,
            min_elements: 4096,
            exclude: Vec::new(),
            down_proj_weight_only: false,
            smooth_alpha: Some(SMOOTH_ALPHA),
            calibration: Calibration::MinMax,
            weight_bits: 8,
            split_outliers: Some(SPLIT_RATIO),
        }
    }
}

/// Default outlier ratio of [`split_outlier_channels`]. On all-MiniLM-L6-v2
/// (every MatMul int8, SmoothQuant at 0.7, 32 calibration sentences, gate
/// on 32 others, AVX-512 VNNI) the smallest sentence-embedding cosine vs
/// fp32 was 0.9931 unsplit; 0.9974 at ratios 2 and 3 (five channels in
/// four layers split), 0.9963 at 4, 0.9957 at 4.5.
pub const SPLIT_RATIO: f32 = 3.0;

/// What a pass did, for the provenance sidecar and warnings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuantReport {
    /// op -> nodes rewritten.
    pub quantized: BTreeMap<String, usize>,
    /// Ops holding a large float constant that this pass does not know how to
    /// quantise; they stay fp32.
    pub left_fp32: BTreeSet<String>,
    /// Nodes skipped on purpose, with why.
    pub skipped: Vec<String>,
    /// MatMuls whose weights are int8 but which multiply in fp32.
    #[serde(default)]
    pub weight_only: Vec<String>,
}

impl QuantReport {
    /// A one-line warning when ops were left in fp32.
    pub fn warning(&self) -> Option<String> {
        (!self.left_fp32.is_empty()).then(|| {
            format!(
                "left in fp32 (the quantiser does not handle these ops): {}",
                self.left_fp32
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

/// A float initializer's values, from `raw_data` or `float_data`.
pub fn f32_values(t: &TensorProto) -> Result<Vec<f32>, QuantError> {
    let count: i64 = t.dims.iter().product();
    let err = |detail: String| QuantError::Initializer {
        name: t.name.clone(),
        detail,
    };
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        if !t.raw_data.len().is_multiple_of(4) {
            return Err(err(format!(
                "raw data of {} bytes is not a whole number of f32",
                t.raw_data.len()
            )));
        }
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else if !t.external_data.is_empty() {
        return Err(err(
            "external data is not supported: save the model with weights inside".into(),
        ));
    } else {
        t.float_data.clone()
    };
    if values.len() as i64 != count {
        return Err(err(format!(
            "has {} values, its dims {:?} say {count}",
            values.len(),
            t.dims
        )));
    }
    Ok(values)
}

/// Symmetric int8: `q = round(w / s)`, `s = max|w| / qmax` per group
/// (`qmax` 127, or 63 for 7-bit weights). `groups(i)` gives the scale index
/// of element `i`.
fn quantize_sym(
    values: &[f32],
    n_groups: usize,
    qmax: f32,
    group: impl Fn(usize) -> usize,
) -> (Vec<i8>, Vec<f32>) {
    let mut amax = vec![0f32; n_groups];
    for (i, v) in values.iter().enumerate() {
        let g = group(i);
        amax[g] = amax[g].max(v.abs());
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&a| if a > 0.0 { a / qmax } else { 1.0 })
        .collect();
    let q = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[group(i)]).round_ties_even().clamp(-qmax, qmax) as i8)
        .collect();
    (q, scales)
}

/// `MatMul(a, W)` in place of node `n`, with `W` the int8 weights `Wq`
/// dequantised by their scales `Ws` (per column on axis 1, zero point 0).
///
/// `fp32_multiply` (weight-only): `W = Cast(Wq) * Ws`, which ONNX Runtime
/// folds into an fp32 constant at load, so the multiply really is fp32.
/// As `DequantizeLinear` it would not be: ONNX Runtime (1.31) rewrites
/// `DequantizeLinear` of a per-column int8 weight into a MatMul into
/// `MatMulNBits`, which quantises the activation to int8 in blocks of 32
/// channels (measured: a down-projection whose input had one channel 200x
/// the others lost the same accuracy that way as in int8).
///
/// Otherwise (int8-static, with the activation dequantised before it)
/// `DequantizeLinear`, the QDQ form runtimes fuse into integer kernels;
/// before opset 13 it has no axis, and per-column weights become
/// `Cast(Wq) * Ws` there too.
fn dequantized_matmul(
    p: &str,
    n: &NodeProto,
    a: &str,
    [wq, ws, wzp]: [&str; 3],
    per_channel: bool,
    opset: i64,
    fp32_multiply: bool,
) -> Vec<NodeProto> {
    let wf = format!("{p}_w_f32");
    let out = n.output.first().map_or("", String::as_str);
    let matmul = node("MatMul", n.name.clone(), &[a, &wf], &[out], vec![]);
    if fp32_multiply || (per_channel && opset < 13) {
        let cast = format!("{p}_w_cast");
        return vec![
            node(
                "Cast",
                format!("{p}_w_cast"),
                &[wq],
                &[&cast],
                vec![attr_int("to", ElemType::F32.onnx_code().into())],
            ),
            node("Mul", format!("{p}_w_scale"), &[&cast, ws], &[&wf], vec![]),
            matmul,
        ];
    }
    let axis = if per_channel {
        vec![attr_int("axis", 1)]
    } else {
        vec![]
    };
    vec![
        node(
            "DequantizeLinear",
            format!("{p}_dq"),
            &[wq, ws, wzp],
            &[&wf],
            axis,
        ),
        matmul,
    ]
}

/// Precision variants a suite can ask for (`fp32` is the model itself;
/// `ort-int8-dynamic` is ONNX Runtime's own Python quantiser, the reference).
pub const VARIANTS: [&str; 8] = [
    "fp32",
    "fp16",
    "int8-dynamic",
    "int8-static",
    "ort-int8-dynamic",
    "nnef",
    "candle-q8",
    "torch-bf16",
];

/// The backend that makes a variant at load from the safetensors model,
/// with no file of its own: candle's Q8_0 matmuls (`candle-q8`) and
/// PyTorch under bf16 autocast (`torch-bf16`, what a team on a CPU with
/// AVX512-BF16 or AMX tries before it hands off). Only that backend runs
/// it; its cases are checked against the fp32 model by the accuracy gate.
pub fn made_at_load_by(variant: &str) -> Option<&'static str> {
    match variant {
        "candle-q8" => Some("candle-native"),
        "torch-bf16" => Some("python-torch"),
        _ => None,
    }
}

/// Pinned packages of the Python environment that runs ORT's quantiser.
pub const ORT_QUANT_PACKAGES: [&str; 2] = ["onnxruntime==1.31.1", "onnx==1.20.1"];
/// Every package of that environment with its wheels' SHA-256
/// (scripts/lock_python.py writes it from the pins above).
pub const ORT_QUANT_LOCK: &str = include_str!("../../../scripts/locks/quant.txt");

/// The ops this module quantises; anything else holding a large float
/// constant is reported in [`QuantReport::left_fp32`].
pub const QUANTIZABLE: [&str; 2] = ["MatMul", "Gather"];

/// Rewrites `model` in place with int8 weights and dynamically quantised
/// activations. Fails (leaving the model as it was) when nothing qualifies.
pub fn quantize_dynamic(
    model: &mut ModelProto,
    options: &DynamicOptions,
) -> Result<QuantReport, QuantError> {
    quantize_graph(model, options, None)
}

/// An activation's observed range on the calibration inputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

impl Range {
    /// Min-max over the values (NaN and infinities ignored).
    pub fn of(values: &[f32]) -> Option<Range> {
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for v in finite {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        (lo <= hi).then_some(Range { min: lo, max: hi })
    }

    /// The range `method` gives for these values (NaN and infinities
    /// ignored); `None` when no value is finite.
    pub fn calibrate(values: &[f32], method: Calibration) -> Option<Range> {
        let p = match method {
            Calibration::MinMax => return Range::of(values),
            Calibration::Entropy => {
                let r = Range::of(values)?;
                let t = entropy_threshold(values);
                return Some(Range {
                    min: r.min.max(-t),
                    max: r.max.min(t),
                });
            }
            Calibration::Percentile(p) => p,
        };
        let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        let last = v.len() - 1;
        // Nearest rank: an exact product (999.0) must not round up on float
        // noise (999.0000001 -> 1000).
        let hi_at = (((p / 100.0) * last as f64).round() as usize).min(last);
        let lo_at = ((1.0 - p / 100.0) * last as f64).round() as usize;
        let hi = *v.select_nth_unstable_by(hi_at, f32::total_cmp).1;
        let lo = *v.select_nth_unstable_by(lo_at, f32::total_cmp).1;
        Some(Range { min: lo, max: hi })
    }

    /// The uint8 scale and zero point (range widened to include 0, as
    /// DynamicQuantizeLinear does).
    fn qparams(self) -> (f32, u8) {
        let (lo, hi) = (self.min.min(0.0), self.max.max(0.0));
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let zp = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
        (scale, zp)
    }
}

/// TensorRT's entropy calibration on |x|: a 2048-bin histogram; for each
/// candidate threshold (128..=2048 bins) the clipped distribution P (the
/// tail folded into its last bin) against Q, P merged into 128 levels and
/// spread back over its non-empty bins; the threshold with the smallest
/// KL(P || Q). Infinity when no value is finite and non-zero.
fn entropy_threshold(values: &[f32]) -> f32 {
    const BINS: usize = 2048;
    const LEVELS: usize = 128;
    let amax = values
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    if amax <= 0.0 {
        return f32::INFINITY;
    }
    let width = amax / BINS as f32;
    let mut hist = vec![0f64; BINS];
    for v in values.iter().filter(|v| v.is_finite()) {
        hist[((v.abs() / width) as usize).min(BINS - 1)] += 1.0;
    }
    let mut best = (f64::INFINITY, BINS);
    for i in (LEVELS..=BINS).step_by(16) {
        let mut p = hist[..i].to_vec();
        p[i - 1] += hist[i..].iter().sum::<f64>();
        let mut q = vec![0f64; i];
        for l in 0..LEVELS {
            let (a, b) = (l * i / LEVELS, (l + 1) * i / LEVELS);
            let total: f64 = hist[a..b].iter().sum();
            let nonzero = hist[a..b].iter().filter(|&&h| h > 0.0).count();
            if nonzero > 0 {
                for k in a..b {
                    if hist[k] > 0.0 {
                        q[k] = total / nonzero as f64;
                    }
                }
            }
        }
        // The folded tail lives in p's last bin; q must cover it too.
        if q[i - 1] == 0.0 && p[i - 1] > 0.0 {
            q[i - 1] = p[i - 1];
        }
        let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
        let kl: f64 = p
            .iter()
            .zip(&q)
            .filter(|(pk, _)| **pk > 0.0)
            .map(|(pk, qk)| {
                let (pk, qk) = (pk / sp, (qk / sq).max(1e-12));
                pk * (pk / qk).ln()
            })
            .sum();
        if kl < best.0 {
            best = (kl, i);
        }
    }
    (best.1 as f32 + 0.5) * width
}

/// The activations static quantisation needs ranges for: the input of each
/// MatMul it would quantise with an int8 activation, in graph order.
pub fn calibration_targets(model: &ModelProto, options: &DynamicOptions) -> Vec<String> {
    let mut probe = model.clone();
    let mut seen = Vec::new();
    if quantize_graph(&mut probe, options, None).is_ok()
        && let Some(g) = probe.graph.as_ref()
    {
        for n in g
            .node
            .iter()
            .filter(|n| n.op_type == "DynamicQuantizeLinear")
        {
            if !seen.contains(&n.input[0]) {
                seen.push(n.input[0].clone());
            }
        }
    }
    seen
}

/// A copy of `model` that also outputs `tensors`, for a calibration run.
pub fn with_extra_outputs(model: &ModelProto, tensors: &[String]) -> ModelProto {
    use handoff_onnx::proto::{TypeProto, TypeProtoTensor, ValueInfoProto};
    let mut m = model.clone();
    if let Some(g) = m.graph.as_mut() {
        for t in tensors {
            g.output.push(ValueInfoProto {
                name: t.clone(),
                r#type: Some(TypeProto {
                    tensor_type: Some(TypeProtoTensor {
                        elem_type: ElemType::F32.onnx_code(),
                        shape: None,
                    }),
                }),
                ..Default::default()
            });
        }
    }
    m
}

/// Per-channel (last axis) largest |x| of an activation with `channels`
/// channels; non-finite values are ignored.
pub fn channel_absmax(values: &[f32], channels: usize) -> Vec<f32> {
    let mut m = vec![0f32; channels];
    if channels == 0 {
        return m;
    }
    for row in values.chunks(channels) {
        for (a, v) in m.iter_mut().zip(row) {
            if v.is_finite() {
                *a = a.max(v.abs());
            }
        }
    }
    m
}

/// What [`smooth`] did to one activation, for the provenance sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Smoothed {
    pub activation: String,
    pub matmuls: Vec<String>,
    /// The fp32 weights rescaled (now `<name>_smoothed`).
    pub weights: Vec<String>,
    /// Largest channel max over the median channel max, before and after:
    /// how far one per-tensor scale has to stretch.
    pub spread_before: f32,
    pub spread_after: f32,
}

/// The 2-D constant float weight of a MatMul that [`quantize_dynamic`]
/// gives int8 activations (not excluded, not weight-only), if it is one.
fn int8_matmul_weight<'a>(
    n: &NodeProto,
    inits: &HashMap<&str, &'a TensorProto>,
    options: &DynamicOptions,
) -> Option<&'a TensorProto> {
    let standard = n.domain.is_empty() || n.domain == "ai.onnx";
    if n.op_type != "MatMul" || !standard || is_excluded(n, options) || is_outlier_product(n) {
        return None;
    }
    let w = *inits.get(n.input.get(1)?.as_str())?;
    let count: i64 = w.dims.iter().product();
    let ok = w.data_type == ElemType::F32.onnx_code()
        && count as usize >= options.min_elements
        && w.dims.len() == 2
        && !(options.down_proj_weight_only && is_down_projection(w));
    ok.then_some(w)
}

/// The MatMul nodes [`quantize_dynamic`] gives int8 activations, in graph
/// order: the candidates of a per-MatMul sensitivity measurement.
pub fn int8_matmuls(model: &ModelProto, options: &DynamicOptions) -> Vec<String> {
    let Some(g) = model.graph.as_ref() else {
        return Vec::new();
    };
    let inits: HashMap<&str, &TensorProto> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    g.node
        .iter()
        .filter(|n| int8_matmul_weight(n, &inits, options).is_some())
        .map(|n| n.name.clone())
        .collect()
}

fn is_excluded(n: &NodeProto, options: &DynamicOptions) -> bool {
    options
        .exclude
        .iter()
        .any(|e| *e == n.name || n.input.contains(e))
}

/// Suffix of the weight rows [`split_outlier_channels`] keeps in fp32.
const OUTLIER_ROWS: &str = "_outlier_rows";

/// The fp32 product of split-off outlier channels: never quantised.
fn is_outlier_product(n: &NodeProto) -> bool {
    n.op_type == "MatMul" && n.input.get(1).is_some_and(|w| w.ends_with(OUTLIER_ROWS))
}

/// A weight with at least twice as many rows as columns: a transformer
/// FFN's output projection, reading the wide activation after GELU.
fn is_down_projection(w: &TensorProto) -> bool {
    w.dims.len() == 2 && w.dims[0] >= 2 * w.dims[1]
}

/// The activations [`smooth`] rescales, in graph order: inputs of MatMuls
/// that get int8 activations, except down-projections. Their input, the
/// FFN's inner activation, has outlier channels that move with the input,
/// so maxima calibrated on other sentences do not carry over (on MiniLM,
/// smoothing them too lowered the cosine from 0.9939 to 0.9902).
pub fn smoothing_targets(model: &ModelProto, options: &DynamicOptions) -> Vec<String> {
    int8_activations(model, options, |w| !is_down_projection(w))
}

/// The activations of int8 MatMuls whose weight `keep` accepts, in graph
/// order, each once.
fn int8_activations(
    model: &ModelProto,
    options: &DynamicOptions,
    keep: impl Fn(&TensorProto) -> bool,
) -> Vec<String> {
    let Some(g) = model.graph.as_ref() else {
        return Vec::new();
    };
    let inits: HashMap<&str, &TensorProto> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut seen: Vec<String> = Vec::new();
    for n in &g.node {
        if let Some(w) = int8_matmul_weight(n, &inits, options)
            && keep(w)
            && !seen.contains(&n.input[0])
        {
            seen.push(n.input[0].clone());
        }
    }
    seen
}

/// The int8 MatMuls reading activation `a` (index, weight), checked to
/// have one weight row per channel of `channels`.
fn int8_readers<'a>(
    nodes: &[NodeProto],
    inits: &HashMap<&str, &'a TensorProto>,
    a: &str,
    channels: usize,
    options: &DynamicOptions,
) -> Result<Vec<(usize, &'a TensorProto)>, QuantError> {
    let readers: Vec<(usize, &TensorProto)> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.input.first().is_some_and(|x| x == a))
        .filter_map(|(i, n)| Some((i, int8_matmul_weight(n, inits, options)?)))
        .collect();
    for (_, w) in &readers {
        if w.dims[0] as usize != channels {
            return Err(QuantError::Calibration(format!(
                "activation `{a}` has {channels} channels but weight `{}` has {} rows",
                w.name, w.dims[0]
            )));
        }
    }
    Ok(readers)
}

/// Channel maxima of activation `a` from `absmax`.
fn maxima_of<'m>(absmax: &'m BTreeMap<String, Vec<f32>>, a: &str) -> Result<&'m [f32], QuantError> {
    absmax.get(a).map(Vec::as_slice).ok_or_else(|| {
        QuantError::Calibration(format!("no calibrated channel maxima for activation `{a}`"))
    })
}

/// SmoothQuant (Xiao et al., 2023): `X W = (X diag(1/s)) (diag(s) W)` with
/// `s_k = max|X_k|^alpha / max|W_k|^(1-alpha)` per input channel `k`, so an
/// activation's outlier channels shrink before its one per-tensor scale is
/// chosen, and the weights (quantised per output column) absorb them.
/// Exact in fp32; costs one Mul per activation. MatMuls sharing an
/// activation (Q, K, V) share `s`. `absmax` holds each target's channel
/// maxima over calibration inputs ([`smoothing_targets`] lists them).
pub fn smooth(
    model: &mut ModelProto,
    absmax: &BTreeMap<String, Vec<f32>>,
    alpha: f64,
    options: &DynamicOptions,
) -> Result<Vec<Smoothed>, QuantError> {
    let alpha32 = alpha as f32;
    if !(0.0..=1.0).contains(&alpha) {
        return Err(QuantError::Calibration(format!(
            "smoothing strength {alpha} is not in [0, 1]"
        )));
    }
    let targets = smoothing_targets(model, options);
    let graph = model.graph.as_mut().ok_or(QuantError::NoGraph)?;
    let inits: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    // Everything is computed before the graph changes: an error leaves it as
    // it was.
    let mut done = Vec::new();
    let mut muls: HashMap<usize, NodeProto> = HashMap::new();
    let mut rewired: HashMap<usize, (String, String)> = HashMap::new();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    for a in &targets {
        let m = maxima_of(absmax, a)?;
        let readers = int8_readers(&graph.node, &inits, a, m.len(), options)?;
        let mut wmax = vec![0f32; m.len()];
        let mut weights = Vec::with_capacity(readers.len());
        for (_, w) in &readers {
            let cols = w.dims[1] as usize;
            let values = f32_values(w)?;
            for (k, row) in values.chunks(cols).enumerate() {
                wmax[k] = row.iter().fold(wmax[k], |x, v| x.max(v.abs()));
            }
            weights.push(values);
        }
        let s: Vec<f32> = m
            .iter()
            .zip(&wmax)
            .map(|(&x, &w)| {
                // A channel never seen (or a zero weight row) keeps its scale:
                // dividing by a tiny s would blow up inputs calibration missed.
                if x > 0.0 && w > 0.0 {
                    (x.powf(alpha32) / w.powf(1.0 - alpha32)).clamp(1e-5, 1e5)
                } else {
                    1.0
                }
            })
            .collect();
        let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
        let (inv_name, smoothed) = (format!("{a}_smooth_inv"), format!("{a}_smoothed"));
        new_inits.push(tensor_f32(&inv_name, &[m.len() as i64], &inv));
        let first = readers.first().map_or(0, |r| r.0);
        muls.insert(
            first,
            node(
                "Mul",
                format!("{a}_smooth"),
                &[a, &inv_name],
                &[&smoothed],
                vec![],
            ),
        );
        let (mut names, mut weights_read) = (Vec::new(), Vec::new());
        for ((i, w), values) in readers.iter().zip(weights) {
            let cols = w.dims[1] as usize;
            let scaled: Vec<f32> = values
                .iter()
                .enumerate()
                .map(|(j, v)| v * s[j / cols])
                .collect();
            let w_name = format!("{}_smoothed", w.name);
            if !new_inits.iter().any(|t| t.name == w_name) {
                new_inits.push(tensor_f32(&w_name, &w.dims, &scaled));
            }
            rewired.insert(*i, (smoothed.clone(), w_name));
            names.push(graph.node[*i].name.clone());
            weights_read.push(w.name.clone());
        }
        let after: Vec<f32> = m.iter().zip(&s).map(|(x, s)| x / s).collect();
        done.push(Smoothed {
            activation: a.clone(),
            matmuls: names,
            weights: weights_read,
            spread_before: spread(m),
            spread_after: spread(&after),
        });
    }
    let old = std::mem::take(&mut graph.node);
    for (i, mut n) in old.into_iter().enumerate() {
        if let Some(mul) = muls.remove(&i) {
            graph.node.push(mul);
        }
        if let Some((x, w)) = rewired.remove(&i) {
            n.input[0] = x;
            n.input[1] = w;
        }
        graph.node.push(n);
    }
    graph.initializer.extend(new_inits);
    let replaced: BTreeSet<String> = done
        .iter()
        .flat_map(|d| d.weights.iter().cloned())
        .collect();
    crate::normalize::drop_replaced(graph, &replaced);
    Ok(done)
}

/// The activations [`split_outlier_channels`] looks at, in graph order:
/// inputs of int8 down-projections, which smoothing leaves alone.
pub fn outlier_targets(model: &ModelProto, options: &DynamicOptions) -> Vec<String> {
    int8_activations(model, options, is_down_projection)
}

/// At most this many channels of one activation are split off: a few
/// channels that dwarf the rest are an outlier pattern, many are a range.
pub const MAX_OUTLIER_CHANNELS: usize = 8;

/// The channels whose calibrated maximum is more than `ratio` times that of
/// the largest channel left once [`MAX_OUTLIER_CHANNELS`] are set aside
/// (ascending).
pub fn outlier_channels(absmax: &[f32], ratio: f32) -> Vec<usize> {
    if absmax.len() <= MAX_OUTLIER_CHANNELS {
        return Vec::new();
    }
    let mut sorted = absmax.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let typical = sorted[MAX_OUTLIER_CHANNELS];
    if typical <= 0.0 {
        return Vec::new();
    }
    (0..absmax.len())
        .filter(|&k| absmax[k] > ratio * typical)
        .collect()
}

/// What [`split_outlier_channels`] did to one activation, for the
/// provenance sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitChannels {
    pub activation: String,
    pub channels: Vec<usize>,
    pub matmuls: Vec<String>,
    /// The activation's calibrated maximum with and without those channels:
    /// the per-tensor range the int8 product no longer has to cover.
    pub max_before: f32,
    pub max_after: f32,
}

/// Mixed-precision decomposition (as in LLM.int8(), Dettmers et al., 2022):
/// `X W = (X m) W + X[:, o] W[o, :]`, where `o` are the few channels of `X`
/// whose calibrated maxima dwarf the rest ([`outlier_channels`]) and `m`
/// zeroes them. The int8 product then gets a per-tensor scale fit for the
/// other channels, and the outliers are multiplied in fp32 (a Gather of
/// `o.len()` columns and a MatMul of `o.len()` rows). Exact in fp32. In
/// MiniLM the down-projection inputs of the first four layers carry one or
/// two channels 3.6-5x the ninth-largest, on the first token of every
/// sentence, the same channels on calibration and check sentences; only
/// which channels, not how large, is taken from calibration. `absmax`
/// holds each target's channel maxima ([`outlier_targets`] lists them).
pub fn split_outlier_channels(
    model: &mut ModelProto,
    absmax: &BTreeMap<String, Vec<f32>>,
    ratio: f32,
    options: &DynamicOptions,
) -> Result<Vec<SplitChannels>, QuantError> {
    let targets = outlier_targets(model, options);
    let graph = model.graph.as_mut().ok_or(QuantError::NoGraph)?;
    let inits: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    // Everything is computed before the graph changes: an error leaves it as
    // it was.
    let mut done = Vec::new();
    let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut after: HashMap<usize, (String, Vec<NodeProto>)> = HashMap::new();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    for a in &targets {
        let m = maxima_of(absmax, a)?;
        let channels = outlier_channels(m, ratio);
        if channels.is_empty() {
            continue;
        }
        let readers = int8_readers(&graph.node, &inits, a, m.len(), options)?;
        let (inliers, outliers) = (format!("{a}_inliers"), format!("{a}_outliers"));
        let (mask, index) = (format!("{a}_inlier_mask"), format!("{a}_outlier_index"));
        let mut keep = vec![1f32; m.len()];
        for &k in &channels {
            keep[k] = 0.0;
        }
        new_inits.push(tensor_f32(&mask, &[m.len() as i64], &keep));
        let idx: Vec<i64> = channels.iter().map(|&k| k as i64).collect();
        new_inits.push(tensor_i64(&index, &[idx.len() as i64], &idx));
        let mut names = Vec::new();
        for (i, w) in &readers {
            let cols = w.dims[1] as usize;
            let values = f32_values(w)?;
            let picked: Vec<f32> = channels
                .iter()
                .flat_map(|&k| values[k * cols..(k + 1) * cols].iter().copied())
                .collect();
            let w_rows = format!("{}{OUTLIER_ROWS}", w.name);
            if !new_inits.iter().any(|t| t.name == w_rows) {
                new_inits.push(tensor_f32(
                    &w_rows,
                    &[channels.len() as i64, cols as i64],
                    &picked,
                ));
            }
            let n = &graph.node[*i];
            let y = n.output.first().cloned().unwrap_or_default();
            let (y_in, y_out) = (format!("{y}_inliers"), format!("{y}_outliers"));
            after.insert(
                *i,
                (
                    y_in.clone(),
                    vec![
                        node(
                            "MatMul",
                            format!("{}_outliers", n.name),
                            &[&outliers, &w_rows],
                            &[&y_out],
                            vec![],
                        ),
                        node(
                            "Add",
                            format!("{}_split", n.name),
                            &[&y_in, &y_out],
                            &[&y],
                            vec![],
                        ),
                    ],
                ),
            );
            names.push(n.name.clone());
        }
        let first = readers.first().map_or(0, |r| r.0);
        before.insert(
            first,
            vec![
                node("Mul", inliers.clone(), &[a, &mask], &[&inliers], vec![]),
                node(
                    "Gather",
                    outliers.clone(),
                    &[a, &index],
                    &[&outliers],
                    vec![attr_int("axis", -1)],
                ),
            ],
        );
        let max_after = m.iter().zip(&keep).map(|(x, k)| x * k).fold(0f32, f32::max);
        done.push(SplitChannels {
            activation: a.clone(),
            channels,
            matmuls: names,
            max_before: m.iter().copied().fold(0f32, f32::max),
            max_after,
        });
    }
    let old = std::mem::take(&mut graph.node);
    for (i, mut n) in old.into_iter().enumerate() {
        if let Some(nodes) = before.remove(&i) {
            graph.node.extend(nodes);
        }
        let tail = after.remove(&i);
        if let Some((y_in, _)) = &tail {
            n.input[0] = format!("{}_inliers", n.input[0]);
            n.output[0] = y_in.clone();
        }
        graph.node.push(n);
        if let Some((_, nodes)) = tail {
            graph.node.extend(nodes);
        }
    }
    graph.initializer.extend(new_inits);
    Ok(done)
}

/// Largest over median (of the non-zero values).
fn spread(v: &[f32]) -> f32 {
    let mut nz: Vec<f32> = v.iter().copied().filter(|x| *x > 0.0).collect();
    if nz.is_empty() {
        return 1.0;
    }
    nz.sort_by(f32::total_cmp);
    nz[nz.len() - 1] / nz[nz.len() / 2]
}

/// Rewrites `model` in place with int8 weights and statically quantised
/// activations in QDQ form (QuantizeLinear/DequantizeLinear pairs with the
/// calibrated scales, which ORT fuses into integer kernels). `ranges` must
/// cover every name [`calibration_targets`] returns.
pub fn quantize_static(
    model: &mut ModelProto,
    ranges: &BTreeMap<String, Range>,
    options: &DynamicOptions,
) -> Result<QuantReport, QuantError> {
    for t in calibration_targets(model, options) {
        if !ranges.contains_key(&t) {
            return Err(QuantError::Calibration(format!(
                "no calibrated range for activation `{t}`"
            )));
        }
    }
    quantize_graph(model, options, Some(ranges))
}

fn quantize_graph(
    model: &mut ModelProto,
    options: &DynamicOptions,
    ranges: Option<&BTreeMap<String, Range>>,
) -> Result<QuantReport, QuantError> {
    let opset = crate::normalize::opset(model);
    let (needs, what) = match (ranges, options.per_channel) {
        (Some(_), true) => (
            13,
            "int8-static with per-channel weights (DequantizeLinear on an axis)",
        ),
        (Some(_), false) => (
            11,
            "int8-static (QuantizeLinear, Unsqueeze with negative axes)",
        ),
        (None, _) => (11, "int8-dynamic (DynamicQuantizeLinear)"),
    };
    if opset < needs {
        return Err(QuantError::Opset {
            found: opset,
            needs,
            what,
        });
    }
    let graph = model.graph.as_mut().ok_or(QuantError::NoGraph)?;
    let inits = crate::normalize::initializer_index(graph);
    let big_float = |name: &str| -> Option<&TensorProto> {
        let t = &graph.initializer[*inits.get(name)?];
        let count: i64 = t.dims.iter().product();
        (t.data_type == ElemType::F32.onnx_code() && count as usize >= options.min_elements)
            .then_some(t)
    };
    let mut report = QuantReport::default();
    let mut new_nodes = Vec::with_capacity(graph.node.len() * 2);
    let mut new_inits: Vec<TensorProto> = Vec::new();
    // Activations quantised once, shared by every MatMul reading them
    // (Q, K and V read the same hidden state).
    let mut quantized_acts: HashMap<String, [String; 3]> = HashMap::new();
    let mut replaced: BTreeSet<String> = BTreeSet::new();
    // A weight read by several nodes (a shared projection, tied embeddings)
    // is stored once per scheme; another scheme gets names of its own.
    let mut stored: HashMap<(String, &'static str), String> = HashMap::new();
    let mut names_for = |w: &str, scheme: &'static str, p: &str| -> (String, bool) {
        if let Some(prefix) = stored.get(&(w.to_owned(), scheme)) {
            return (prefix.clone(), false);
        }
        let prefix = if stored.keys().any(|(name, _)| name == w) {
            format!("{w}_{p}")
        } else {
            w.to_owned()
        };
        stored.insert((w.to_owned(), scheme), prefix.clone());
        (prefix, true)
    };
    for (i, n) in graph.node.iter().enumerate() {
        let standard = n.domain.is_empty() || n.domain == "ai.onnx";
        let weight_at = match n.op_type.as_str() {
            "MatMul" if standard && is_outlier_product(n) => {
                new_nodes.push(n.clone());
                continue;
            }
            "MatMul" if standard => 1,
            "Gather" if standard && options.embeddings => 0,
            _ => {
                if n.input.iter().any(|x| big_float(x).is_some()) {
                    report.left_fp32.insert(n.op_type.clone());
                }
                new_nodes.push(n.clone());
                continue;
            }
        };
        let Some(w) = n.input.get(weight_at).and_then(|x| big_float(x)) else {
            if weight_at == 1 && n.input.first().is_some_and(|x| big_float(x).is_some()) {
                report.skipped.push(format!(
                    "{} (MatMul): the constant is the left operand",
                    n.name
                ));
            }
            new_nodes.push(n.clone());
            continue;
        };
        if is_excluded(n, options) {
            report
                .skipped
                .push(format!("{} ({}): excluded", n.name, n.op_type));
            new_nodes.push(n.clone());
            continue;
        }
        if w.dims.len() != 2 {
            report.skipped.push(format!(
                "{} ({}): weight `{}` has rank {}, not 2",
                n.name,
                n.op_type,
                w.name,
                w.dims.len()
            ));
            new_nodes.push(n.clone());
            continue;
        }
        let values = f32_values(w)?;
        let (rows, cols) = (w.dims[0] as usize, w.dims[1] as usize);
        let p = format!("q{i}");
        let out = n.output.first().cloned().unwrap_or_default();
        match n.op_type.as_str() {
            "MatMul" => {
                let groups = if options.per_channel { cols } else { 1 };
                let per = options.per_channel;
                let weight_only = options.down_proj_weight_only && is_down_projection(w);
                let qmax = if weight_only {
                    127.0
                } else {
                    options.matmul_qmax()
                };
                let scheme = if weight_only { "weight-only" } else { "int8" };
                let (prefix, new) = names_for(&w.name, scheme, &p);
                let (wq, ws, wzp) = (
                    format!("{prefix}_q"),
                    format!("{prefix}_scale"),
                    format!("{prefix}_zp"),
                );
                if new {
                    let (q, scales) =
                        quantize_sym(&values, groups, qmax, |k| if per { k % cols } else { 0 });
                    let scale_dims: Vec<i64> = if per { vec![cols as i64] } else { vec![] };
                    new_inits.push(tensor_i8(&wq, &w.dims, &q));
                    new_inits.push(tensor_f32(&ws, &scale_dims, &scales));
                    if !weight_only {
                        new_inits.push(tensor_i8(&wzp, &scale_dims, &vec![0i8; groups]));
                    }
                }
                if weight_only {
                    new_nodes.extend(dequantized_matmul(
                        &p,
                        n,
                        &n.input[0],
                        [&wq, &ws, &wzp],
                        per,
                        opset,
                        true,
                    ));
                    report.weight_only.push(n.name.clone());
                    replaced.insert(w.name.clone());
                    *report
                        .quantized
                        .entry("MatMul (weight-only)".into())
                        .or_default() += 1;
                    continue;
                }
                let a = &n.input[0];
                if let Some(ranges) = ranges {
                    let Some(range) = ranges.get(a) else {
                        return Err(QuantError::Calibration(format!(
                            "no calibrated range for activation `{a}`"
                        )));
                    };
                    let a_dq = quantized_acts.entry(a.clone()).or_insert_with(|| {
                        let (scale, zp) = range.qparams();
                        let names = [
                            format!("{p}_a_scale"),
                            format!("{p}_a_zp"),
                            format!("{p}_a_q"),
                            format!("{p}_a_dq"),
                        ];
                        new_inits.push(tensor_f32(&names[0], &[], &[scale]));
                        new_inits.push(tensor_u8(&names[1], &[], &[zp]));
                        new_nodes.push(node(
                            "QuantizeLinear",
                            format!("{p}_ql"),
                            &[a, &names[0], &names[1]],
                            &[&names[2]],
                            vec![],
                        ));
                        new_nodes.push(node(
                            "DequantizeLinear",
                            format!("{p}_a_dql"),
                            &[&names[2], &names[0], &names[1]],
                            &[&names[3]],
                            vec![],
                        ));
                        [names[3].clone(), String::new(), String::new()]
                    })[0]
                        .clone();
                    new_nodes.extend(dequantized_matmul(
                        &p,
                        n,
                        &a_dq,
                        [&wq, &ws, &wzp],
                        per,
                        opset,
                        false,
                    ));
                    replaced.insert(w.name.clone());
                    *report.quantized.entry("MatMul".into()).or_default() += 1;
                    continue;
                }
                let [aq, as_, azp] = quantized_acts
                    .entry(a.clone())
                    .or_insert_with(|| {
                        let names = [
                            format!("{p}_a_q"),
                            format!("{p}_a_scale"),
                            format!("{p}_a_zp"),
                        ];
                        new_nodes.push(node(
                            "DynamicQuantizeLinear",
                            format!("{p}_dql"),
                            &[a],
                            &[&names[0], &names[1], &names[2]],
                            vec![],
                        ));
                        names
                    })
                    .clone();
                let (yi, yf, s) = (
                    format!("{p}_int32"),
                    format!("{p}_f32"),
                    format!("{p}_scale"),
                );
                new_nodes.push(node(
                    "MatMulInteger",
                    format!("{p}_mmi"),
                    &[&aq, &wq, &azp, &wzp],
                    &[&yi],
                    vec![],
                ));
                new_nodes.push(node(
                    "Cast",
                    format!("{p}_cast"),
                    &[&yi],
                    &[&yf],
                    vec![attr_int("to", ElemType::F32.onnx_code().into())],
                ));
                new_nodes.push(node(
                    "Mul",
                    format!("{p}_scales"),
                    &[&as_, &ws],
                    &[&s],
                    vec![],
                ));
                new_nodes.push(node(
                    "Mul",
                    format!("{p}_dequant"),
                    &[&yf, &s],
                    &[&out],
                    vec![],
                ));
            }
            _ => {
                let axis = n
                    .attribute
                    .iter()
                    .find(|a| a.name == "axis")
                    .map_or(0, |a| a.i);
                if axis != 0 {
                    report
                        .skipped
                        .push(format!("{} (Gather): axis {axis}, not 0", n.name));
                    new_nodes.push(n.clone());
                    continue;
                }
                let (prefix, new) = names_for(&w.name, "rows", &p);
                let (tq, ts) = (format!("{prefix}_q"), format!("{prefix}_row_scale"));
                if new {
                    let (q, scales) = quantize_sym(&values, rows, 127.0, |k| k / cols);
                    new_inits.push(tensor_i8(&tq, &w.dims, &q));
                    new_inits.push(tensor_f32(&ts, &[rows as i64], &scales));
                }
                // Unsqueeze takes its axes as an input from opset 13.
                let axes = format!("{p}_axes");
                let (unsqueeze_in, unsqueeze_attr) = if opset >= 13 {
                    new_inits.push(tensor_i64(&axes, &[1], &[-1]));
                    (vec![axes.as_str()], vec![])
                } else {
                    (vec![], vec![attr_ints("axes", &[-1])])
                };
                let ids = &n.input[1];
                let (gq, gf, gs, gs1) = (
                    format!("{p}_rows_q"),
                    format!("{p}_rows_f32"),
                    format!("{p}_row_scales"),
                    format!("{p}_row_scales_1"),
                );
                new_nodes.push(node(
                    "Gather",
                    format!("{p}_gather_q"),
                    &[&tq, ids],
                    &[&gq],
                    vec![],
                ));
                new_nodes.push(node(
                    "Cast",
                    format!("{p}_cast"),
                    &[&gq],
                    &[&gf],
                    vec![attr_int("to", ElemType::F32.onnx_code().into())],
                ));
                new_nodes.push(node(
                    "Gather",
                    format!("{p}_gather_scale"),
                    &[&ts, ids],
                    &[&gs],
                    vec![],
                ));
                new_nodes.push(node(
                    "Unsqueeze",
                    format!("{p}_unsqueeze"),
                    &[&[gs.as_str()], unsqueeze_in.as_slice()].concat(),
                    &[&gs1],
                    unsqueeze_attr,
                ));
                new_nodes.push(node(
                    "Mul",
                    format!("{p}_dequant"),
                    &[&gf, &gs1],
                    &[&out],
                    vec![],
                ));
            }
        }
        replaced.insert(w.name.clone());
        *report.quantized.entry(n.op_type.clone()).or_default() += 1;
    }
    if report.quantized.is_empty() {
        // An fp16 export has its big weights in half precision.
        let half = graph.initializer.iter().any(|t| {
            matches!(
                ElemType::from_onnx(t.data_type),
                ElemType::F16 | ElemType::Other(16)
            ) && t.dims.iter().product::<i64>() >= options.min_elements as i64
        });
        let detail = if half {
            " (its weights are half precision: build int8 from the fp32 model)".to_owned()
        } else if report.skipped.is_empty() {
            String::new()
        } else {
            format!(" (skipped: {})", report.skipped.join("; "))
        };
        return Err(QuantError::NothingToQuantize {
            min_elements: options.min_elements,
            detail,
        });
    }
    graph.initializer.extend(new_inits);
    graph.node = new_nodes;
    // Float weights nothing reads any more.
    crate::normalize::drop_replaced(graph, &replaced);
    Ok(report)
}

/// fp16 weight storage: float initializers of at least `min_elements` are
/// stored as fp16 and cast back to fp32 where the graph reads them, so
/// inputs, outputs and arithmetic stay fp32 (the file halves; the compute
/// does not change precision). Values beyond fp16's range are an error.
pub fn fp16_weights(
    model: &mut ModelProto,
    min_elements: usize,
    exclude: &[String],
) -> Result<QuantReport, QuantError> {
    let graph = model.graph.as_mut().ok_or(QuantError::NoGraph)?;
    let eligible = |t: &TensorProto| {
        let count: i64 = t.dims.iter().product();
        t.data_type == ElemType::F32.onnx_code()
            && count as usize >= min_elements
            && !exclude.contains(&t.name)
    };
    // Check everything before changing anything: an error leaves the model
    // as it was.
    let mut halves: Vec<(usize, Vec<u8>)> = Vec::new();
    let (mut overflow, mut max, mut names) = (0usize, 0f32, BTreeSet::new());
    for (i, t) in graph.initializer.iter().enumerate() {
        if !eligible(t) {
            continue;
        }
        let values = f32_values(t)?;
        let over = values.iter().filter(|v| v.abs() > 65504.0).count();
        if over > 0 {
            overflow += over;
            max = values.iter().fold(max, |m, v| m.max(v.abs()));
            names.insert(t.name.clone());
            continue;
        }
        let raw = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        halves.push((i, raw));
    }
    if overflow > 0 {
        return Err(QuantError::Fp16Overflow {
            count: overflow,
            max,
            names: names.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    if halves.is_empty() {
        return Err(QuantError::NothingToQuantize {
            min_elements,
            detail: " (fp16: no float initializer is that large)".into(),
        });
    }
    let mut report = QuantReport::default();
    let mut casts = Vec::with_capacity(halves.len());
    for (i, raw) in halves {
        let t = &mut graph.initializer[i];
        let half_name = format!("{}_fp16", t.name);
        let original = std::mem::replace(&mut t.name, half_name);
        t.data_type = ElemType::F16.onnx_code();
        t.raw_data = raw;
        t.float_data.clear();
        casts.push(node(
            "Cast",
            format!("{original}_to_f32"),
            &[&t.name],
            &[&original],
            vec![attr_int("to", ElemType::F32.onnx_code().into())],
        ));
        *report.quantized.entry("initializer".into()).or_default() += 1;
    }
    casts.append(&mut graph.node);
    graph.node = casts;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_onnx::builder::{D, GraphBuilder};

    /// x[2,4] -> MatMul(W[4,3]) -> y, W chosen so the int8 values are known
    /// by hand.
    fn tiny_matmul(w: Vec<f32>) -> ModelProto {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", ElemType::F32, &[D::Fixed(2), D::Fixed(4)]);
        let w = g.init_f32("w", &[4, 3], w);
        g.node_to("MatMul", &[&x, &w], vec![], "y");
        g.output("y", ElemType::F32, &[D::Fixed(2), D::Fixed(3)]);
        g.finish(17)
    }

    fn init<'a>(m: &'a ModelProto, name: &str) -> &'a TensorProto {
        m.graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no initializer {name}"))
    }

    fn opts() -> DynamicOptions {
        DynamicOptions {
            min_elements: 1,
            ..Default::default()
        }
    }

    #[test]
    fn outlier_channels_dwarf_the_largest_of_the_rest_by_hand() {
        // Twelve channels: after setting aside 8, the largest left is 2.0.
        let mut m = [2.0; 12];
        (m[1], m[4], m[7]) = (7.0, 6.1, 0.5);
        assert_eq!(outlier_channels(&m, 3.0), [1, 4]);
        assert_eq!(outlier_channels(&m, 3.1), [1]);
        assert!(outlier_channels(&m, 4.0).is_empty());
        // Too few channels to tell an outlier from the range.
        assert!(outlier_channels(&m[..8], 1.0).is_empty());
    }

    #[test]
    fn the_outlier_product_stays_fp32_and_only_down_projections_are_split() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", ElemType::F32, &[D::Fixed(1), D::Fixed(16)]);
        // A square weight (not a down-projection) and a 16 x 4 one.
        let sq = g.init_f32("sq", &[16, 16], vec![0.5; 256]);
        let h = g.node("MatMul", &[&x, &sq], vec![]);
        let w = g.init_f32("w", &[16, 4], (0..64).map(|i| i as f32).collect());
        g.node_to("MatMul", &[&h, &w], vec![], "y");
        g.output("y", ElemType::F32, &[D::Fixed(1), D::Fixed(4)]);
        let mut m = g.finish(17);
        let targets = outlier_targets(&m, &opts());
        assert_eq!(targets, std::slice::from_ref(&h));
        let mut absmax = vec![1.0f32; 16];
        absmax[9] = 10.0;
        let absmax = BTreeMap::from([(h.clone(), absmax)]);
        let done = split_outlier_channels(&mut m, &absmax, 3.0, &opts()).unwrap();
        assert_eq!(done[0].channels, [9]);
        assert_eq!((done[0].max_before, done[0].max_after), (10.0, 1.0));
        assert_eq!(
            m.op_types(),
            ["MatMul", "Mul", "Gather", "MatMul", "MatMul", "Add"]
        );
        assert_eq!(f32_init(&m, "w_outlier_rows"), [36.0, 37.0, 38.0, 39.0]);
        let report = quantize_dynamic(&mut m, &opts()).unwrap();
        assert!(report.skipped.is_empty(), "{report:?}");
        // Both big MatMuls int8; the 1 x 4 outlier product still a MatMul
        // on its fp32 rows.
        let g = m.graph.as_ref().unwrap();
        assert_eq!(
            g.node
                .iter()
                .filter(|n| n.op_type == "MatMulInteger")
                .count(),
            2
        );
        let outlier = g.node.iter().find(|n| n.op_type == "MatMul").unwrap();
        assert_eq!(outlier.input[1], "w_outlier_rows");
    }

    #[test]
    fn matmul_weights_are_symmetric_int8_per_column_by_hand() {
        // Column maxima |w|: 1.27, 2.54, 0.5 -> scales 0.01, 0.02, 0.5/127.
        #[rustfmt::skip]
        let w = vec![
            1.27, -2.54, 0.5,
            -0.635, 1.0, 0.3,
            0.0, 0.012, -0.5,
            0.004, -0.03, 0.0,
        ];
        let mut m = tiny_matmul(w);
        let report = quantize_dynamic(&mut m, &opts()).unwrap();
        assert_eq!(report.quantized.get("MatMul"), Some(&1));
        let q: Vec<i8> = init(&m, "w_q").raw_data.iter().map(|&b| b as i8).collect();
        // 0.004/0.01 = 0.4 -> 0; 1.0/0.02 = 50; 0.3/(0.5/127) = 76.2 -> 76; 0.012/0.02 = 0.6 -> 1.
        #[rustfmt::skip]
        assert_eq!(q, vec![
            127, -127, 127,
            -64, 50, 76,
            0, 1, -127,
            0, -2, 0,
        ]);
        let s = f32_values(init(&m, "w_scale")).unwrap();
        assert!((s[0] - 0.01).abs() < 1e-7 && (s[1] - 0.02).abs() < 1e-7);
        assert!((s[2] - 0.5 / 127.0).abs() < 1e-7);
        let ops = m.op_types();
        assert_eq!(
            ops,
            [
                "DynamicQuantizeLinear",
                "MatMulInteger",
                "Cast",
                "Mul",
                "Mul"
            ]
        );
        // The float weight is gone; the graph output keeps its name.
        assert!(
            m.graph
                .as_ref()
                .unwrap()
                .initializer
                .iter()
                .all(|t| t.name != "w")
        );
        assert_eq!(m.graph.as_ref().unwrap().node.last().unwrap().output, ["y"]);
    }

    #[test]
    fn down_projections_keep_an_fp32_multiply() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", ElemType::F32, &[D::Fixed(1), D::Fixed(8)]);
        let w = g.init_f32("w", &[8, 2], (0..16).map(|i| i as f32 / 16.0).collect());
        g.node_to("MatMul", &[&x, &w], vec![], "y");
        g.output("y", ElemType::F32, &[D::Fixed(1), D::Fixed(2)]);
        let mut m = g.finish(17);
        let options = DynamicOptions {
            down_proj_weight_only: true,
            ..opts()
        };
        assert!(smoothing_targets(&m, &options).is_empty());
        let report = quantize_dynamic(&mut m, &options).unwrap();
        assert_eq!(report.weight_only.len(), 1);
        // Not DequantizeLinear, which ORT would turn into an int8 multiply.
        let ops = m.op_types();
        assert_eq!(ops, ["Cast", "Mul", "MatMul"]);
    }

    fn f32_init(m: &ModelProto, name: &str) -> Vec<f32> {
        f32_values(init(m, name)).unwrap()
    }

    #[test]
    fn smoothing_moves_activation_range_into_weight_rows_by_hand() {
        #[rustfmt::skip]
        let w = vec![
            0.5, -1.0, 0.25,   // row max 1.0
            2.0, 0.5, -0.5,    // row max 2.0
            0.1, 0.2, 0.3,     // row max 0.3, channel never active
            -0.04, 0.01, 0.0,  // row max 0.04
        ];
        let mut m = tiny_matmul(w.clone());
        let absmax = BTreeMap::from([("x".to_owned(), vec![16.0, 1.0, 0.0, 0.25])]);
        let done = smooth(&mut m, &absmax, 0.5, &opts()).unwrap();
        // s = sqrt(max|x|) / sqrt(max|w|) per channel; an unseen channel keeps 1.
        let s = [4.0 / 1.0, 1.0 / 2f32.sqrt(), 1.0, 0.5 / 0.2];
        assert_eq!(m.op_types(), ["Mul", "MatMul"]);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.node[0].input, ["x", "x_smooth_inv"]);
        assert_eq!(g.node[1].input, ["x_smoothed", "w_smoothed"]);
        for (got, want) in f32_init(&m, "x_smooth_inv").iter().zip(s) {
            assert!((got - 1.0 / want).abs() < 1e-6, "{got} vs 1/{want}");
        }
        for (i, (got, w)) in f32_init(&m, "w_smoothed").iter().zip(&w).enumerate() {
            assert!(
                (got - w * s[i / 3]).abs() < 1e-6,
                "w[{i}]: {got} vs {}",
                w * s[i / 3]
            );
        }
        // The fp32 weight it replaced is gone.
        assert!(g.initializer.iter().all(|t| t.name != "w"));
        assert_eq!(done[0].matmuls, ["y_node"]);
        assert_eq!(done[0].weights, ["w"]);
        // Before: 16 over the median channel max 1 (zeros left out).
        assert_eq!(done[0].spread_before, 16.0);
    }

    #[test]
    fn smoothing_shares_one_scale_between_matmuls_reading_one_activation() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", ElemType::F32, &[D::Fixed(1), D::Fixed(2)]);
        let a = g.init_f32("a", &[2, 2], vec![1.0, 0.0, 0.0, 1.0]);
        let b = g.init_f32("b", &[2, 2], vec![4.0, 0.0, 0.0, 0.25]);
        g.node_to("MatMul", &[&x, &a], vec![], "ya");
        g.node_to("MatMul", &[&x, &b], vec![], "yb");
        g.output("ya", ElemType::F32, &[D::Fixed(1), D::Fixed(2)]);
        g.output("yb", ElemType::F32, &[D::Fixed(1), D::Fixed(2)]);
        let mut m = g.finish(17);
        let absmax = BTreeMap::from([("x".to_owned(), vec![4.0, 4.0])]);
        // alpha 1: s = max|x| whatever the weights.
        smooth(&mut m, &absmax, 1.0, &opts()).unwrap();
        assert_eq!(m.op_types(), ["Mul", "MatMul", "MatMul"]);
        assert_eq!(f32_init(&m, "x_smooth_inv"), [0.25, 0.25]);
        assert_eq!(f32_init(&m, "b_smoothed"), [16.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn smoothing_without_maxima_for_a_target_is_an_error_and_changes_nothing() {
        let mut m = tiny_matmul(vec![1.0; 12]);
        let before = m.clone();
        let err = smooth(&mut m, &BTreeMap::new(), 0.7, &opts()).unwrap_err();
        assert!(err.to_string().contains("`x`"), "{err}");
        let wrong = BTreeMap::from([("x".to_owned(), vec![1.0; 3])]);
        let err = smooth(&mut m, &wrong, 0.7, &opts()).unwrap_err();
        assert!(err.to_string().contains("3 channels"), "{err}");
        let err = smooth(&mut m, &BTreeMap::new(), 1.5, &opts()).unwrap_err();
        assert!(err.to_string().contains("[0, 1]"), "{err}");
        assert_eq!(m, before);
    }

    #[test]
    fn channel_maxima_are_over_rows_and_skip_non_finite_values() {
        let v = [1.0, -3.0, f32::NAN, 2.0, -0.5, f32::INFINITY];
        assert_eq!(channel_absmax(&v, 3), [2.0, 3.0, 0.0]);
    }

    #[test]
    fn a_model_with_nothing_to_quantise_is_an_error_and_unchanged() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", ElemType::F32, &[D::Fixed(2)]);
        g.node_to("Relu", &[&x], vec![], "y");
        g.output("y", ElemType::F32, &[D::Fixed(2)]);
        let mut m = g.finish(17);
        let before = m.clone();
        let err = quantize_dynamic(&mut m, &opts()).unwrap_err();
        assert!(err.to_string().starts_with("nothing to quantise"), "{err}");
        assert_eq!(m, before);
        assert!(matches!(
            fp16_weights(&mut m, 1, &[]),
            Err(QuantError::NothingToQuantize { .. })
        ));
        assert_eq!(m, before);
    }

    /// An fp16 export has nothing int8 can be built from, and says why.
    #[test]
    fn half_precision_weights_are_named_as_the_reason() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", ElemType::F16, &[D::Fixed(1), D::Fixed(64)]);
        g.node_to("MatMul", &[&x, "w"], vec![], "y");
        g.output("y", ElemType::F16, &[D::Fixed(1), D::Fixed(64)]);
        let mut m = g.finish(17);
        m.graph
            .as_mut()
            .unwrap()
            .initializer
            .push(handoff_onnx::builder::tensor(
                "w",
                ElemType::F16,
                &[64, 64],
                vec![0; 64 * 64 * 2],
            ));
        let err = quantize_dynamic(&mut m, &opts()).unwrap_err();
        assert!(
            err.to_string().contains("weights are half precision"),
            "{err}"
        );
    }

    #[test]
    fn ops_the_quantiser_does_not_know_are_left_fp32_and_listed() {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", ElemType::F32, &[D::Fixed(2), D::Fixed(4)]);
        let w = g.init_f32("w", &[4, 3], vec![0.5; 12]);
        let h = g.node("MatMul", &[&x, &w], vec![]);
        let b = g.init_f32("gemm_w", &[3, 3], vec![0.1; 9]);
        g.node_to("Gemm", &[&h, &b], vec![], "y");
        g.output("y", ElemType::F32, &[D::Fixed(2), D::Fixed(3)]);
        let mut m = g.finish(17);
        let report = quantize_dynamic(&mut m, &opts()).unwrap();
        assert_eq!(report.left_fp32.iter().collect::<Vec<_>>(), ["Gemm"]);
        assert!(report.warning().unwrap().contains("Gemm"));
    }

    #[test]
    fn fp16_overflow_is_reported_and_nothing_changes() {
        let mut m = tiny_matmul(vec![
            1.0, 70000.0, -1e6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ]);
        let before = m.clone();
        let err = fp16_weights(&mut m, 1, &[]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("2 weight values exceed 65504") && msg.contains("(largest 1e6, in w)"),
            "{msg}"
        );
        assert_eq!(m, before);
        // Excluding the tensor is the way out the message names.
        assert!(matches!(
            fp16_weights(&mut m, 1, &["w".to_owned()]),
            Err(QuantError::NothingToQuantize { .. })
        ));
    }

    #[test]
    fn fp16_weights_halve_and_cast_back() {
        let mut m = tiny_matmul(vec![0.1; 12]);
        fp16_weights(&mut m, 1, &[]).unwrap();
        let t = init(&m, "w_fp16");
        assert_eq!(t.data_type, ElemType::F16.onnx_code());
        assert_eq!(t.raw_data.len(), 24);
        let first = &m.graph.as_ref().unwrap().node[0];
        assert_eq!(
            (first.op_type.as_str(), first.output[0].as_str()),
            ("Cast", "w")
        );
    }

    #[test]
    fn embedding_rows_are_int8_with_a_scale_per_row() {
        let mut g = GraphBuilder::new("t");
        let ids = g.input("ids", ElemType::I64, &[D::Fixed(3)]);
        let table = g.init_f32("table", &[2, 2], vec![1.0, -0.3, 0.02, 0.005]);
        g.node_to("Gather", &[&table, &ids], vec![], "y");
        g.output("y", ElemType::F32, &[D::Fixed(3), D::Fixed(2)]);
        let mut m = g.finish(17);
        quantize_dynamic(&mut m, &opts()).unwrap();
        let q: Vec<i8> = init(&m, "table_q")
            .raw_data
            .iter()
            .map(|&b| b as i8)
            .collect();
        assert_eq!(q, vec![127, -38, 127, 32]);
        let s = f32_values(init(&m, "table_row_scale")).unwrap();
        assert!((s[0] - 1.0 / 127.0).abs() < 1e-7 && (s[1] - 0.02 / 127.0).abs() < 1e-9);
    }

    #[test]
    fn a_weight_shared_by_a_lookup_and_two_matmuls_is_stored_once_per_scheme() {
        // Tied embeddings: the table is looked up and multiplied by twice.
        let mut g = GraphBuilder::new("t");
        let ids = g.input("ids", ElemType::I64, &[D::Fixed(3)]);
        let x = g.input("x", ElemType::F32, &[D::Fixed(1), D::Fixed(2)]);
        let table = g.init_f32("table", &[2, 2], vec![1.0, -0.3, 0.02, 0.005]);
        g.node_to("Gather", &[&table, &ids], vec![], "e");
        g.node_to("MatMul", &[&x, &table], vec![], "y1");
        g.node_to("MatMul", &[&x, &table], vec![], "y2");
        for o in ["e", "y1", "y2"] {
            g.output(o, ElemType::F32, &[D::Fixed(1), D::Fixed(2)]);
        }
        let mut m = g.finish(17);
        quantize_dynamic(&mut m, &opts()).unwrap();
        let names: Vec<&str> = m
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(names.len(), unique.len(), "no name twice: {names:?}");
        // The lookup's per-row int8 table and the MatMuls' per-column one
        // differ, so each has its own name; the two MatMuls share theirs.
        let mmi: Vec<&String> = m
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .filter(|n| n.op_type == "MatMulInteger")
            .map(|n| &n.input[1])
            .collect();
        assert_eq!(mmi.len(), 2);
        assert_eq!(mmi[0], mmi[1]);
        assert_ne!(mmi[0], "table_q", "{names:?}");
        assert!(names.contains(&"table_q") && names.contains(&"table_row_scale"));
    }

    #[test]
    fn opsets_without_the_ops_int8_needs_are_refused_and_older_forms_used_where_they_exist() {
        let mut m = tiny_matmul(vec![0.5; 12]);
        m.opset_import[0].version = 10;
        let before = m.clone();
        let err = quantize_dynamic(&mut m, &opts()).unwrap_err();
        assert!(
            err.to_string()
                .contains("opset 10; int8-dynamic (DynamicQuantizeLinear) needs opset >= 11"),
            "{err}"
        );
        assert_eq!(m, before);
        let ranges = BTreeMap::from([(
            "x".to_owned(),
            Range {
                min: -1.0,
                max: 3.0,
            },
        )]);
        m.opset_import[0].version = 12;
        let err = quantize_static(&mut m, &ranges, &opts()).unwrap_err();
        assert!(err.to_string().contains("needs opset >= 13"), "{err}");
        // Opset 12: Unsqueeze takes axes as an attribute; per-column
        // weight-only weights are dequantised as Cast * scale.
        let mut g = GraphBuilder::new("t");
        let ids = g.input("ids", ElemType::I64, &[D::Fixed(3)]);
        let x = g.input("x", ElemType::F32, &[D::Fixed(1), D::Fixed(4)]);
        let table = g.init_f32("table", &[2, 2], vec![1.0, -0.3, 0.02, 0.005]);
        g.node_to("Gather", &[&table, &ids], vec![], "e");
        let down = g.init_f32("down", &[4, 2], vec![0.5; 8]);
        g.node_to("MatMul", &[&x, &down], vec![], "y");
        g.output("e", ElemType::F32, &[D::Fixed(3), D::Fixed(2)]);
        g.output("y", ElemType::F32, &[D::Fixed(1), D::Fixed(2)]);
        let mut m = g.finish(12);
        let options = DynamicOptions {
            down_proj_weight_only: true,
            ..opts()
        };
        quantize_dynamic(&mut m, &options).unwrap();
        let graph = m.graph.as_ref().unwrap();
        let unsqueeze = graph
            .node
            .iter()
            .find(|n| n.op_type == "Unsqueeze")
            .unwrap();
        assert_eq!(unsqueeze.input.len(), 1);
        assert_eq!(unsqueeze.attribute[0].ints, [-1]);
        assert!(
            graph.node.iter().all(|n| n.op_type != "DequantizeLinear"),
            "{:?}",
            m.op_types()
        );
        assert_eq!(
            m.op_types(),
            [
                "Gather",
                "Cast",
                "Gather",
                "Unsqueeze",
                "Mul",
                "Cast",
                "Mul",
                "MatMul"
            ]
        );
    }

    #[test]
    fn a_quantised_weight_listed_as_a_graph_input_leaves_the_inputs_too() {
        // Older exporters list every initializer as a graph input as well.
        let mut m = tiny_matmul(vec![0.5; 12]);
        let graph = m.graph.as_mut().unwrap();
        let mut w = graph.input[0].clone();
        w.name = "w".into();
        graph.input.push(w);
        quantize_dynamic(&mut m, &opts()).unwrap();
        let graph = m.graph.as_ref().unwrap();
        assert!(graph.initializer.iter().all(|t| t.name != "w"));
        assert_eq!(
            graph
                .input
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            ["x"]
        );
    }

    #[test]
    fn static_quantisation_needs_a_range_for_every_activation() {
        let mut m = tiny_matmul(vec![0.5; 12]);
        let targets = calibration_targets(&m, &opts());
        assert_eq!(targets, ["x"]);
        let before = m.clone();
        let err = quantize_static(&mut m, &BTreeMap::new(), &opts()).unwrap_err();
        assert!(
            err.to_string()
                .contains("no calibrated range for activation `x`"),
            "{err}"
        );
        assert_eq!(m, before);
        let ranges = BTreeMap::from([(
            "x".to_owned(),
            Range {
                min: -1.0,
                max: 3.0,
            },
        )]);
        quantize_static(&mut m, &ranges, &opts()).unwrap();
        let ops = m.op_types();
        assert_eq!(
            ops,
            [
                "QuantizeLinear",
                "DequantizeLinear",
                "DequantizeLinear",
                "MatMul"
            ]
        );
        // Range [-1, 3]: scale 4/255, zero point round(1 / (4/255)) = round(63.75) = 64.
        let zp = init(&m, "q0_a_zp");
        assert_eq!(zp.raw_data, vec![64]);
        let scale = f32_values(init(&m, "q0_a_scale")).unwrap()[0];
        assert!((scale - 4.0 / 255.0).abs() < 1e-7);
    }

    #[test]
    fn calibration_ranges_ignore_non_finite_values() {
        assert_eq!(
            Range::of(&[f32::NAN, 2.0, -1.0, f32::INFINITY]),
            Some(Range {
                min: -1.0,
                max: 2.0
            })
        );
        assert_eq!(Range::of(&[f32::NAN]), None);
    }

    #[test]
    fn entropy_calibration_clips_a_far_outlier_and_keeps_a_plain_range() {
        // 10000 values spread over [-1, 1) and one at 10: the threshold
        // lands near 1, far below the outlier (the method never clips
        // below 128 of its 2048 bins, a 16th of the largest |x|).
        let mut v: Vec<f32> = (0..10_000).map(|i| i as f32 / 5000.0 - 1.0).collect();
        v.push(10.0);
        let r = Range::calibrate(&v, Calibration::Entropy).unwrap();
        assert!(r.min == -1.0 && r.max > 0.9 && r.max < 2.0, "{r:?}");
        // Nothing beyond the bulk: the threshold is the whole range.
        let plain: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        let r = Range::calibrate(&plain, Calibration::Entropy).unwrap();
        assert!(r.max > 0.99, "{r:?}");
        assert_eq!("entropy".parse(), Ok(Calibration::Entropy));
        assert_eq!(
            Range::calibrate(&[0.0, 0.0], Calibration::Entropy),
            Some(Range { min: 0.0, max: 0.0 })
        );
    }

    #[test]
    fn percentile_calibration_clips_the_rarest_values() {
        // 0..=999 and one outlier: min-max stretches to it; the 99.9th
        // percentile (nearest rank 999 of 0..=1000) stops at 999, the 0.1th
        // at 1.
        let mut v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        v.push(1e6);
        v.push(f32::NAN);
        assert_eq!(
            Range::calibrate(&v, Calibration::MinMax),
            Some(Range { min: 0.0, max: 1e6 })
        );
        assert_eq!(
            Range::calibrate(&v, Calibration::Percentile(99.9)),
            Some(Range {
                min: 1.0,
                max: 999.0
            })
        );
        assert_eq!(
            Range::calibrate(&v, Calibration::Percentile(100.0)),
            Range::calibrate(&v, Calibration::MinMax)
        );
        assert_eq!("percentile:99.9".parse(), Ok(Calibration::Percentile(99.9)));
        assert_eq!("minmax".parse(), Ok(Calibration::MinMax));
        for bad in ["percentile:40", "percentile:x", "kl"] {
            assert!(bad.parse::<Calibration>().is_err(), "{bad}");
        }
    }
}
