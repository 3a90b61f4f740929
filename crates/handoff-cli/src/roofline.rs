//! The machine's attainable matmul peak for the roofline: one square f32
//! matrix product on each optimised-graph backend (ort, tract), at each
//! thread count of the suite, best single run over a short window.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use handoff_backend::{DType, Device, Fill, ModelRef, PrepareOptions, Probe, Registry, TensorSpec};
use handoff_report::roofline::MachinePeak;

const N: usize = 1024;

pub fn measure_peak(
    registry: &Registry,
    threads: &[u32],
    cache: &Path,
) -> Result<MachinePeak, String> {
    let path = cache.join("synthetic").join(format!("matmul-{N}.onnx"));
    if !path.is_file() {
        std::fs::create_dir_all(path.parent().expect("has a parent"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        handoff_onnx::builder::write_model(&handoff_onnx::synthetic::matmul(N as i64, 1), &path)
            .map_err(|e| e.to_string())?;
    }
    let spec = TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![N, N],
        fill: Fill::Random {
            min: -1.0,
            max: 1.0,
        },
    };
    let input = spec.generate(1);
    let model = ModelRef {
        path: path.clone(),
        id: "matmul".into(),
        hf_dir: None,
    };
    let flops = 2.0 * (N as f64).powi(3);
    let mut peak = MachinePeak {
        matmul_n: N,
        gflops: BTreeMap::new(),
        by_backend: BTreeMap::new(),
    };
    for name in ["ort", "tract"] {
        let Some(backend) = registry.get(name) else {
            continue;
        };
        if !matches!(backend.probe(Device::Cpu), Probe::Available { .. }) {
            continue;
        }
        for &t in threads {
            let options = PrepareOptions {
                device: Device::Cpu,
                threads: t as usize,
                inputs: vec![spec.clone()],
                options: serde_json::Value::Null,
            };
            let Ok(mut prepared) = backend.prepare(&model, &options) else {
                continue;
            };
            if prepared.bind(std::slice::from_ref(&input)).is_err() {
                continue;
            }
            let start = Instant::now();
            let mut best = f64::INFINITY;
            let mut runs = 0;
            while runs < 3 || start.elapsed() < Duration::from_millis(400) {
                let t0 = Instant::now();
                if prepared.run().is_err() {
                    break;
                }
                best = best.min(t0.elapsed().as_secs_f64());
                runs += 1;
            }
            if best.is_finite() {
                let g = flops / best / 1e9;
                peak.by_backend.entry(name.into()).or_default().insert(t, g);
                let e = peak.gflops.entry(t).or_insert(0.0);
                *e = e.max(g);
            }
        }
    }
    if peak.gflops.is_empty() {
        return Err("no backend could run the matmul".into());
    }
    Ok(peak)
}
