//! Which MatMuls an int8 model should keep in fp32, measured: each int8
//! MatMul in turn stays fp32 while every other is int8, and the end-to-end
//! cosine to fp32 says how much accuracy that one MatMul costs. The most
//! costly ones go back to fp32, one at a time, until the model's error has
//! shrunk enough.
//!
//! Which MatMuls is measured on the calibration inputs, never the accuracy
//! check's: the gate that follows is then a check of the choice, not the
//! data it was tuned on. How many follows from the failed gate: with every
//! MatMul in int8 the check's error (1 - cosine) was `e`, the gate allows
//! `g`, so MatMuls go to fp32 until the calibration inputs' error has
//! shrunk to `g / e` of its all-int8 value, less a tenth for margin. (The
//! two sets differ in difficulty: on MiniLM the calibration sentences'
//! smallest cosine is 0.987 where the check's is 0.993, so asking them for
//! the gate's own cosine put 9 MatMuls in fp32 where 1 cleared it.) That count
//! is an estimate: where the check still misses the gate, the next
//! MatMuls of the same ranking follow, one build and check each, up to the
//! same cap (`added_for_gate` in the provenance says how many).

use std::path::Path;

use handoff_backend::{Registry, Tensor, TensorSpec};
use serde::Serialize;

use crate::variant::{
    CALIBRATION_SEED, VariantRequest, calibration_source, normalize, quantize_error,
    smooth_and_split, static_ranges,
};
use crate::{PrepareError, embedding_agreement, run_model_on};

/// At most this share of the int8 MatMuls goes to fp32: past it, the
/// speed int8 was for is mostly gone and the gate should fail visibly.
const MAX_SHARE: usize = 4;

/// The most of `candidates` MatMuls that may stay fp32.
fn cap(candidates: usize) -> usize {
    (candidates / MAX_SHARE).max(1)
}

/// What the measurement found, for the warning and the provenance.
#[derive(Debug, Clone, Serialize)]
pub struct Sensitivity {
    pub method: &'static str,
    /// The calibration inputs it ran on.
    pub inputs: String,
    /// Smallest row cosine to fp32 with every candidate in int8.
    pub all_int8: f64,
    /// The smallest row cosine the chosen set had to reach here.
    pub target: f64,
    /// Each candidate MatMul and the smallest row cosine with it alone in
    /// fp32, best first (ties in graph order).
    pub ranked: Vec<(String, f64)>,
    /// The MatMuls chosen for fp32, in the order they were added.
    pub chosen: Vec<String>,
    /// Smallest row cosine with `chosen` in fp32, before any were added
    /// for the gate.
    pub reached: f64,
    /// Of `chosen`, the last ones added because the check still missed the
    /// gate with those before them.
    pub added_for_gate: usize,
    /// The candidates there were.
    pub candidates: usize,
}

impl Sensitivity {
    /// The most MatMuls that may stay fp32.
    pub fn cap(&self) -> usize {
        cap(self.candidates)
    }

    /// Adds the next MatMul of the ranking after the check missed the gate
    /// with `chosen`; false at the cap.
    pub fn add_for_gate(&mut self) -> bool {
        if self.chosen.len() >= self.cap() || self.chosen.len() >= self.ranked.len() {
            return false;
        }
        self.chosen.push(self.ranked[self.chosen.len()].0.clone());
        self.added_for_gate += 1;
        true
    }
}

/// Measures `request`'s int8 model of `onnx` on `calibration` and picks the
/// fewest MatMuls (at most a quarter) whose staying fp32 shrinks its error
/// as much as the gate needs, given that the check's smallest cosine with
/// every MatMul in int8 was `failed_at`. `scratch` names the temporary
/// files.
pub fn measure(
    registry: &Registry,
    onnx: &Path,
    request: &VariantRequest,
    calibration: &[TensorSpec],
    failed_at: f64,
    scratch: &Path,
) -> Result<Sensitivity, PrepareError> {
    use handoff_convert::quantize;
    let ort = registry
        .get("ort")
        .ok_or_else(|| PrepareError::Needs("ort is needed to measure sensitivity".into()))?;
    // Smoothing and static ranges once, from the request's options. The
    // final build smooths again with the chosen MatMuls excluded: the same
    // scales for every activation an int8 MatMul still reads, unless it
    // shares it with an excluded one (Q of Q, K, V), where the scale no
    // longer counts the excluded weight; the gate then checks that build.
    let mut model = handoff_onnx::external::read_model_inline(onnx)?;
    normalize(&mut model, onnx, &request.dynamic)?;
    smooth_and_split(registry, &mut model, &request.dynamic, scratch, calibration)?;
    let ranges = match request.variant.as_str() {
        "int8-static" => Some(static_ranges(
            registry,
            &model,
            onnx,
            &request.dynamic,
            scratch,
            calibration,
        )?),
        _ => None,
    };
    let inputs: Vec<Tensor> = calibration
        .iter()
        .map(|s| s.generate(CALIBRATION_SEED))
        .collect();
    let no_outputs = || PrepareError::Check("the model has no outputs".into());
    // A ranking, not a gate: every core, for speed.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let run = |path: &Path| {
        let model = handoff_backend::ModelRef {
            path: path.to_owned(),
            id: "sensitivity".into(),
            hf_dir: None,
        };
        run_model_on(ort, &model, &inputs, calibration, threads)
    };
    let reference = run(onnx)
        .map_err(PrepareError::backend("ort (fp32)"))?
        .pop()
        .ok_or_else(no_outputs)?;
    let path = scratch.with_extension("sensitivity.onnx");
    let cosine = |fp32: &[String]| -> Result<f64, PrepareError> {
        let mut m = model.clone();
        let mut options = request.dynamic.clone();
        options.exclude.extend(fp32.iter().cloned());
        match &ranges {
            Some(r) => quantize::quantize_static(&mut m, r, &options),
            None => quantize::quantize_dynamic(&mut m, &options),
        }
        .map_err(quantize_error(onnx))?;
        handoff_onnx::builder::write_model(&m, &path)?;
        let y = run(&path)
            .map_err(PrepareError::backend("ort (int8)"))?
            .pop()
            .ok_or_else(no_outputs)?;
        Ok(embedding_agreement(&reference, &y).1)
    };
    let found = (|| {
        let candidates = quantize::int8_matmuls(&model, &request.dynamic);
        let all_int8 = cosine(&[])?;
        let keep = (1.0 - request.min_cosine) / (1.0 - failed_at).max(f64::EPSILON);
        let target = 1.0 - (1.0 - all_int8) * keep.min(1.0) * 0.9;
        let mut ranked = candidates
            .iter()
            .map(|c| Ok((c.clone(), cosine(std::slice::from_ref(c))?)))
            .collect::<Result<Vec<_>, PrepareError>>()?;
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (mut chosen, mut reached) = (Vec::new(), all_int8);
        for (name, alone) in ranked.iter().take(cap(candidates.len())) {
            chosen.push(name.clone());
            reached = if chosen.len() == 1 {
                *alone
            } else {
                cosine(&chosen)?
            };
            if reached >= target {
                break;
            }
        }
        Ok(Sensitivity {
            method: "each int8 MatMul alone left in fp32, end-to-end smallest row cosine to fp32; the best added one at a time until the error has shrunk as much as the failed gate needs, less a tenth; then the next ones, one build and check each, while the check still misses the gate",
            inputs: calibration_source(calibration),
            all_int8,
            target,
            ranked,
            chosen,
            reached,
            added_for_gate: 0,
            candidates: candidates.len(),
        })
    })();
    let _ = std::fs::remove_file(&path);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmuls_added_for_the_gate_follow_the_ranking_up_to_a_quarter() {
        let mut s = Sensitivity {
            method: "",
            inputs: String::new(),
            all_int8: 0.99,
            target: 0.995,
            ranked: (0..9)
                .map(|i| (format!("m{i}"), 0.999 - f64::from(i) * 1e-3))
                .collect(),
            chosen: vec!["m0".into()],
            reached: 0.995,
            added_for_gate: 0,
            candidates: 9,
        };
        assert_eq!(s.cap(), 2);
        assert!(s.add_for_gate());
        assert_eq!(s.chosen, ["m0", "m1"]);
        assert_eq!(s.added_for_gate, 1);
        // A quarter of 9 is 2: no third.
        assert!(!s.add_for_gate());
        assert_eq!(s.chosen.len(), 2);
    }
}
