//! The roofline view: each case's achieved GFLOP/s (FLOPs per inference from
//! the graph, over its median latency) as a fraction of what this machine
//! attains on a plain square matrix product with the same thread count.
//! A transformer that reaches a small fraction is bound by something other
//! than arithmetic (memory, dispatch, small matrices); one near 100% has
//! little left to gain from a faster runtime.

use std::collections::BTreeMap;

use handoff_results::ResultRecord;
use serde::{Deserialize, Serialize};

use crate::Table;

/// The machine's attainable peak, measured at the start of a run
/// (`roofline.json` in the run directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachinePeak {
    /// Side of the square f32 matrices multiplied.
    pub matmul_n: usize,
    /// Best GFLOP/s over the backends tried, per thread count.
    pub gflops: BTreeMap<u32, f64>,
    /// Each backend's figure, per thread count.
    pub by_backend: BTreeMap<String, BTreeMap<u32, f64>>,
}

impl MachinePeak {
    pub const FILE: &'static str = "roofline.json";

    pub fn load(dir: &std::path::Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(dir.join(Self::FILE)).ok()?).ok()
    }
}

/// Achieved GFLOP/s of a passing case: FLOPs per inference over the median.
pub fn achieved_gflops(r: &ResultRecord) -> Option<f64> {
    let flops = r.flops?;
    let p50 = r.latency_ms.as_ref()?.p50;
    // A graph without counted operations (element-wise only) has no place
    // on a roofline.
    (r.passes() && p50 > 0.0 && flops > 0.0).then(|| flops / (p50 / 1e3) / 1e9)
}

/// One row per passing case with a FLOP count: GFLOP/s and % of the peak
/// at its thread count.
pub fn roofline_table(records: &[ResultRecord], peak: Option<&MachinePeak>) -> Option<Table> {
    let rows: Vec<Vec<String>> = records
        .iter()
        .filter_map(|r| {
            let g = achieved_gflops(r)?;
            let p = peak.and_then(|p| p.gflops.get(&r.case.threads)).copied();
            Some(vec![
                r.case.model.clone(),
                crate::backend_label(r),
                r.case.threads.to_string(),
                r.case.batch.to_string(),
                sig(r.flops.unwrap_or(0.0) / 1e9),
                format!("{g:.1}"),
                p.map_or("-".into(), |p| format!("{p:.1}")),
                p.map_or("-".into(), |p| format!("{:.0}%", 100.0 * g / p)),
            ])
        })
        .collect();
    (!rows.is_empty()).then(|| Table {
        header: vec![
            "model",
            "backend",
            "threads",
            "batch",
            "GFLOP per inference",
            "achieved GFLOP/s",
            "matmul peak GFLOP/s",
            "of peak",
        ],
        rows,
    })
}

/// Three significant digits, without exponents for the sizes seen here.
fn sig(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (2 - v.abs().log10().floor() as i32).clamp(0, 8) as usize;
    format!("{v:.digits$}")
}

pub fn note(peak: Option<&MachinePeak>) -> String {
    let base = "FLOPs per inference are counted from the graph at the case's input shapes (2 x multiply-adds of MatMul, Gemm, Conv; element-wise work is not counted; int8 graphs are left out, their operations are not floating-point). Achieved GFLOP/s = FLOPs / median latency. A kernel with better cache reuse than one square product (a convolution) can exceed the measured peak.";
    match peak {
        Some(p) => format!(
            "{base} The peak is the best of {} on one {n}x{n} f32 matrix product at the same thread count, measured at the start of the run.",
            p.by_backend
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(" and "),
            n = p.matmul_n
        ),
        None => format!("{base} No matmul peak was measured for this run."),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn significant_digits_of_zero_and_small_values() {
        assert_eq!(super::sig(0.0), "0");
        assert_eq!(super::sig(0.00123), "0.00123");
        assert_eq!(super::sig(123.4), "123");
    }
}
