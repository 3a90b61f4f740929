//! Precision variants: the int8 graph computes what the ONNX spec says (on
//! ORT, against a hand-written reference), suites run variants with their
//! accuracy recorded, and bad input writes nothing.

mod common;

use std::path::Path;

use common::{handoff, run_ok};

use handoff_backend::{Backend, Device, ModelRef, PrepareOptions, Tensor, TensorData};
use handoff_convert::quantize::{DynamicOptions, quantize_dynamic};
use handoff_onnx::builder::{D, GraphBuilder, write_model};
use handoff_onnx::inspect::ElemType;
use handoff_runner::Status;

/// The options a suite uses on this machine (or for `HANDOFF_TARGET_CPU`,
/// so the 7-bit path is tested on any machine): 7-bit weights where the CPU's
/// int8 kernels sum pairs of products in saturating 16 bits (no VNNI), so
/// what ORT computes is what the ONNX spec says on every CPU class.
fn native(min_elements: usize) -> DynamicOptions {
    DynamicOptions {
        min_elements,
        ..DynamicOptions::for_cpu(handoff_convert::isa::TargetCpu::Native.class())
    }
}

/// `options` with 7-bit weights: what an AVX2 machine gets. They cannot
/// saturate, so every CPU class computes the same, and the 7-bit path is
/// tested on any machine.
fn seven_bit(options: DynamicOptions) -> DynamicOptions {
    DynamicOptions {
        weight_bits: 7,
        ..options
    }
}

/// The largest int8 weight magnitude under `options`.
fn qmax(options: &DynamicOptions) -> f32 {
    if options.weight_bits == 7 {
        63.0
    } else {
        127.0
    }
}

/// DynamicQuantizeLinear as the ONNX spec defines it (uint8, range
/// including 0, round half to even), then the integer matmul and rescale,
/// with weights symmetric to `qmax` per column.
fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, qmax: f32) -> Vec<f32> {
    let lo = x.iter().fold(0f32, |a, &v| a.min(v));
    let hi = x.iter().fold(0f32, |a, &v| a.max(v));
    let xs = (hi - lo) / 255.0;
    let zp = (-lo / xs).round_ties_even().clamp(0.0, 255.0);
    let xq: Vec<f32> = x
        .iter()
        .map(|v| ((v / xs).round_ties_even() + zp).clamp(0.0, 255.0))
        .collect();
    let ws: Vec<f32> = (0..n)
        .map(|c| (0..k).map(|r| w[r * n + c].abs()).fold(0f32, f32::max) / qmax)
        .collect();
    let wq: Vec<f32> = (0..k * n)
        .map(|i| (w[i] / ws[i % n]).round_ties_even())
        .collect();
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for c in 0..n {
            let acc: f32 = (0..k).map(|r| (xq[i * k + r] - zp) * wq[r * n + c]).sum();
            y[i * n + c] = acc * xs * ws[c];
        }
    }
    y
}

/// Every `got[i]` within `rel * (1 + |want[i]|)` of `want[i]`.
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * (1.0 + w.abs()),
            "{what} y[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn int8_dynamic_on_ort_and_tract_computes_what_the_onnx_spec_says() {
    handoff_ort::provision::fetch().expect("libonnxruntime from the project cache");
    let (m, k, n) = (3, 8, 5);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 37 % 23) as f32 - 7.0) / 5.0)
        .collect();
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 53 % 31) as f32 - 15.0) / 40.0)
        .collect();
    let exact: Vec<f32> = (0..m * n)
        .map(|i| (0..k).map(|r| x[(i / n) * k + r] * w[r * n + i % n]).sum())
        .collect();
    // 8-bit weights (these operands' pair sums stay within 16 bits, so
    // every CPU class computes the spec) and 7-bit ones (any operands).
    for bits in [8, 7] {
        let mut model = matmul_model(m, k, n, &w);
        let options = DynamicOptions {
            min_elements: 1,
            down_proj_weight_only: false,
            weight_bits: bits,
            ..Default::default()
        };
        quantize_dynamic(&mut model, &options).unwrap();
        let wq = model
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name == "w_q")
            .unwrap();
        let largest = wq.raw_data.iter().map(|b| (*b as i8).unsigned_abs()).max();
        assert_eq!(largest, Some(qmax(&options) as u8), "{bits}-bit weights");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.onnx");
        write_model(&model, &path).unwrap();
        let want = reference(&x, m, k, &w, n, qmax(&options));
        spec_and_near_fp32(&path, &x, (m, k, n), &want, &exact);
    }
}

/// `path` on ORT and tract gives `want` (the spec), and is close to but not
/// exactly the float product `exact`.
fn spec_and_near_fp32(
    path: &Path,
    x: &[f32],
    (m, k, n): (usize, usize, usize),
    want: &[f32],
    exact: &[f32],
) {
    let path = path.to_owned();
    for (name, backend) in ort_and_tract() {
        let got = run(backend.as_ref(), &path, x, m, k);
        assert_close(&format!("{name} vs spec"), &got, want, 1e-5);
        for i in 0..m * n {
            // And int8 is close to, but not exactly, the float product.
            assert!(
                (got[i] - exact[i]).abs() < 0.05,
                "{name} y[{i}]: {} vs fp32 {}",
                got[i],
                exact[i]
            );
        }
    }
}

/// SmoothQuant: the rescaled fp32 model computes the same product, its
/// int8 version is what the spec says for the rescaled operands, and on an
/// activation with an outlier channel it is much closer to fp32 than plain
/// int8.
#[test]
fn smoothing_is_exact_in_fp32_and_shrinks_int8_error_on_an_outlier_channel() {
    smoothing_is_exact_in_fp32_and_shrinks_int8_error_on_an_outlier_channel_with(native(1));
    smoothing_is_exact_in_fp32_and_shrinks_int8_error_on_an_outlier_channel_with(seven_bit(
        native(1),
    ));
}

fn smoothing_is_exact_in_fp32_and_shrinks_int8_error_on_an_outlier_channel_with(
    options: DynamicOptions,
) {
    use handoff_convert::quantize::{channel_absmax, smooth};
    handoff_ort::provision::fetch().expect("libonnxruntime from the project cache");
    let (m, k, n) = (4, 8, 6);
    // Channel 3 is 40x the others, as LayerNorm outputs of BERT-like models
    // have a few such channels.
    let x: Vec<f32> = (0..m * k)
        .map(|i| {
            let v = ((i * 37 % 23) as f32 - 11.0) / 10.0;
            if i % k == 3 { v * 40.0 + 30.0 } else { v }
        })
        .collect();
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 53 % 31) as f32 - 15.0) / 40.0)
        .collect();
    let exact: Vec<f32> = (0..m * n)
        .map(|i| (0..k).map(|r| x[(i / n) * k + r] * w[r * n + i % n]).sum())
        .collect();
    let absmax = std::collections::BTreeMap::from([("x".to_owned(), channel_absmax(&x, k))]);
    let mut smoothed = matmul_model(m, k, n, &w);
    smooth(&mut smoothed, &absmax, 0.5, &options).unwrap();
    let init = |model: &handoff_onnx::proto::ModelProto, name: &str| {
        let t = model.graph.as_ref().unwrap().initializer.iter();
        handoff_convert::quantize::f32_values(t.clone().find(|t| t.name == name).unwrap()).unwrap()
    };
    let (inv, ws) = (
        init(&smoothed, "x_smooth_inv"),
        init(&smoothed, "w_smoothed"),
    );
    let xs: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * inv[i % k]).collect();
    let want = reference(&xs, m, k, &ws, n, qmax(&options));
    let plain = matmul_model(m, k, n, &w);
    check_rewrite(
        "smoothed",
        &smoothed,
        &plain,
        &options,
        &x,
        (m, k),
        &exact,
        &want,
        2.0,
    );
}

/// `rewritten`, an fp32 rewrite of the MatMul `plain` (x[m, k] -> y) for
/// int8: on ORT and tract, it computes `exact` (the product by hand), its
/// int8 version computes `want` (the spec's), and its int8 error against
/// `exact` is under `1 / gain` of `plain`'s int8 error.
#[allow(clippy::too_many_arguments)]
fn check_rewrite(
    what: &str,
    rewritten: &handoff_onnx::proto::ModelProto,
    plain: &handoff_onnx::proto::ModelProto,
    options: &DynamicOptions,
    x: &[f32],
    (m, k): (usize, usize),
    exact: &[f32],
    want: &[f32],
    gain: f32,
) {
    let dir = tempfile::tempdir().unwrap();
    let write = |model: &handoff_onnx::proto::ModelProto, int8: bool, name: &str| {
        let mut model = model.clone();
        if int8 {
            quantize_dynamic(&mut model, options).unwrap();
        }
        let path = dir.path().join(name);
        write_model(&model, &path).unwrap();
        path
    };
    let (fp32, int8, plain_int8) = (
        write(rewritten, false, "rewritten.onnx"),
        write(rewritten, true, "rewritten-int8.onnx"),
        write(plain, true, "plain-int8.onnx"),
    );
    let err = |y: &[f32]| -> f32 {
        y.iter()
            .zip(exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    };
    for (name, backend) in ort_and_tract() {
        let got = run(backend.as_ref(), &fp32, x, m, k);
        assert_close(&format!("{name} {what} fp32"), &got, exact, 1e-4);
        let got = run(backend.as_ref(), &int8, x, m, k);
        assert_close(&format!("{name} {what} int8 vs spec"), &got, want, 1e-4);
        let plain = run(backend.as_ref(), &plain_int8, x, m, k);
        assert!(
            err(&got) * gain < err(&plain),
            "{name}: {what} int8 error {} is not under 1/{gain} of plain int8's {}",
            err(&got),
            err(&plain)
        );
    }
}

/// Outlier channels split off a down-projection's input: the fp32 model
/// computes the same product (on tract too, whose Gather reads the negative
/// axis), and its int8 version is the spec's int8 product of the other
/// channels plus the outliers' exact one: far closer to fp32 than plain int8.
#[test]
fn split_outlier_channels_are_exact_in_fp32_and_shrink_int8_error() {
    split_outlier_channels_are_exact_in_fp32_and_shrink_int8_error_with(native(1));
    split_outlier_channels_are_exact_in_fp32_and_shrink_int8_error_with(seven_bit(native(1)));
}

fn split_outlier_channels_are_exact_in_fp32_and_shrink_int8_error_with(options: DynamicOptions) {
    use handoff_convert::quantize::{channel_absmax, split_outlier_channels};
    handoff_ort::provision::fetch().expect("libonnxruntime from the project cache");
    // A down-projection (rows >= 2 x columns); channel 5 is 25x the others
    // in every row, as MiniLM's FFN activations are on one token.
    let (m, k, n) = (4, 16, 4);
    let x: Vec<f32> = (0..m * k)
        .map(|i| {
            let v = ((i * 37 % 23) as f32 - 11.0) / 10.0;
            if i % k == 5 { 25.0 + v } else { v }
        })
        .collect();
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 53 % 31) as f32 - 15.0) / 40.0)
        .collect();
    let exact: Vec<f32> = (0..m * n)
        .map(|i| (0..k).map(|r| x[(i / n) * k + r] * w[r * n + i % n]).sum())
        .collect();
    let absmax = std::collections::BTreeMap::from([("x".to_owned(), channel_absmax(&x, k))]);
    let mut split = matmul_model(m, k, n, &w);
    let done = split_outlier_channels(&mut split, &absmax, 3.0, &options).unwrap();
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].channels, [5]);
    // The int8 product reads channel 5 as zero; the outlier product adds it.
    let masked: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| if i % k == 5 { 0.0 } else { *v })
        .collect();
    let want: Vec<f32> = reference(&masked, m, k, &w, n, qmax(&options))
        .iter()
        .enumerate()
        .map(|(i, y)| y + x[(i / n) * k + 5] * w[5 * n + i % n])
        .collect();
    let plain = matmul_model(m, k, n, &w);
    check_rewrite(
        "split",
        &split,
        &plain,
        &options,
        &x,
        (m, k),
        &exact,
        &want,
        4.0,
    );
}

/// x[m, k] -> MatMul(W[k, n]) -> y.
fn matmul_model(m: usize, k: usize, n: usize, w: &[f32]) -> handoff_onnx::proto::ModelProto {
    let mut g = GraphBuilder::new("t");
    let xi = g.input(
        "x",
        ElemType::F32,
        &[D::Fixed(m as i64), D::Fixed(k as i64)],
    );
    let wi = g.init_f32("w", &[k as i64, n as i64], w.to_vec());
    g.node_to("MatMul", &[&xi, &wi], vec![], "y");
    g.output(
        "y",
        ElemType::F32,
        &[D::Fixed(m as i64), D::Fixed(n as i64)],
    );
    g.finish(17)
}

fn ort_and_tract() -> [(&'static str, Box<dyn Backend>); 2] {
    [
        ("ort", Box::new(handoff_ort::OrtBackend)),
        ("tract", Box::new(handoff_tract::TractBackend)),
    ]
}

#[test]
fn a_suite_runs_variants_with_their_accuracy_and_size() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: v\nmodels:\n  - id: mlp\n    source: {synthetic: {kind: mlp, width: 64, depth: 2}}\n    variants: [fp32, int8-dynamic, fp16, int8-static, nnef]\n    min_cosine: 0.9\n\
         backends: [ort, tract]\nthreads: [1]\nbatch: [2]\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 300ms, target_ci: 0.2}\n",
    )
    .unwrap();
    let records = run_ok(dir.path(), "s.yaml", "out");
    let models: Vec<&str> = records.iter().map(|r| r.case.model.as_str()).collect();
    assert_eq!(
        models,
        [
            "mlp",
            "mlp",
            "mlp@int8-dynamic",
            "mlp@int8-dynamic",
            "mlp@fp16",
            "mlp@fp16",
            "mlp@int8-static",
            "mlp@int8-static",
            "mlp@nnef"
        ]
    );
    for r in &records {
        match &r.accuracy {
            None => assert_eq!(r.case.model, "mlp"),
            Some(a) => {
                assert!(
                    a.passed && a.min_cosine >= 0.9 && a.min_cosine <= 1.0,
                    "{a:?}"
                );
                // NNEF is a format change, not a precision change.
                assert!(
                    a.size_bytes > 0 && (a.size_bytes < a.fp32_size_bytes || a.variant == "nnef"),
                    "{a:?}"
                );
            }
        }
        // ort and tract agree on the same int8 graph, or tract says which op it lacks.
        match r.status {
            Status::Ok => assert!(
                r.parity.as_ref().is_some_and(|p| p.ok),
                "{}: {:?}",
                r.case.id,
                r.parity
            ),
            Status::Unsupported => assert!(
                r.reason.as_deref().is_some_and(|s| s.starts_with("op ")),
                "{:?}",
                r.reason
            ),
            other => panic!("{}: {other:?} {:?}", r.case.id, r.reason),
        }
    }
    assert!(
        records
            .iter()
            .filter(|r| r.case.backend == "ort")
            .all(|r| r.status == Status::Ok)
    );
    let summary = std::fs::read_to_string(dir.path().join("out/summary.md")).unwrap();
    assert!(
        summary.contains("## Precision variants") && summary.contains("| mlp | int8-dynamic |"),
        "{summary}"
    );
    // The sidecar records the steps and the check.
    let cache = dir.path().join("cache");
    let sidecar = common::walk(&cache)
        .into_iter()
        .find(|p| {
            p.to_string_lossy()
                .ends_with(".int8-dynamic.onnx.provenance.json")
        })
        .expect("sidecar");
    let text = std::fs::read_to_string(sidecar).unwrap();
    assert!(
        text.contains("quantize:int8-dynamic") && text.contains("\"accuracy\""),
        "{text}"
    );
    // SmoothQuant ran on its own calibration inputs, not the check's.
    let prov: serde_json::Value = serde_json::from_str(&text).unwrap();
    let step = prov["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "quantize:int8-dynamic")
        .unwrap();
    let smoothing = &step["params"]["smoothing"];
    assert_eq!(smoothing["alpha"], 0.7, "{smoothing}");
    assert!(
        smoothing["calibration"]
            .as_str()
            .is_some_and(|c| c.contains("seed 1")),
        "{smoothing}"
    );
    assert!(
        !smoothing["activations"].as_array().unwrap().is_empty(),
        "{smoothing}"
    );
}

#[test]
fn quantising_a_model_with_nothing_to_quantise_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = GraphBuilder::new("t");
    let x = g.input("x", ElemType::F32, &[D::Fixed(2)]);
    g.node_to("Relu", &[&x], vec![], "y");
    g.output("y", ElemType::F32, &[D::Fixed(2)]);
    write_model(&g.finish(17), &dir.path().join("relu.onnx")).unwrap();
    let out = handoff(
        &[
            "quantize",
            "relu.onnx",
            "--to",
            "int8-dynamic",
            "-o",
            "q.onnx",
        ],
        dir.path(),
    );
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relu.onnx: nothing to quantise"), "{err}");
    assert!(!dir.path().join("q.onnx").exists());

    std::fs::write(dir.path().join("junk.onnx"), b"\x08\x07garbage").unwrap();
    let out = handoff(&["quantize", "junk.onnx", "--to", "fp16"], dir.path());
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("junk.onnx"), "{err}");
    assert!(!dir.path().join("junk.fp16.onnx").exists());
}

fn run(backend: &dyn Backend, path: &Path, x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut p = backend
        .prepare(
            &ModelRef {
                path: path.to_owned(),
                id: "q".into(),
                hf_dir: None,
            },
            &PrepareOptions {
                device: Device::Cpu,
                threads: 1,
                inputs: Vec::new(),
                options: serde_json::Value::Null,
            },
        )
        .unwrap();
    p.bind(&[Tensor {
        name: "x".into(),
        shape: vec![m, k],
        data: TensorData::F32(x.to_vec()),
    }])
    .unwrap();
    p.run().unwrap();
    match p.outputs().unwrap().remove(0).data {
        TensorData::F32(v) => v,
        _ => panic!("f32 output expected"),
    }
}

/// Embedding rows and a weight-only down-projection: ORT and tract give the
/// same numbers as dequantising by hand. Channel 0 of the table is 300x the
/// others, so a runtime that quantised the activation to int8 (as ORT's
/// `MatMulNBits` would for a `DequantizeLinear` weight) would be far off.
#[test]
fn int8_embeddings_and_weight_only_matmul_agree_on_ort_and_tract() {
    handoff_ort::provision::fetch().expect("libonnxruntime from the project cache");
    let (vocab, width, out) = (6, 64, 3);
    let table: Vec<f32> = (0..vocab * width)
        .map(|i| {
            let v = ((i * 29 % 17) as f32 - 8.0) / 9.0;
            if i % width == 0 { v * 300.0 } else { v }
        })
        .collect();
    let w: Vec<f32> = (0..width * out)
        .map(|i| ((i * 41 % 13) as f32 - 6.0) / 7.0)
        .collect();
    let mut g = GraphBuilder::new("t");
    let ids = g.input("ids", ElemType::I64, &[D::Fixed(4)]);
    let t = g.init_f32("table", &[vocab as i64, width as i64], table.clone());
    let e = g.node("Gather", &[&t, &ids], vec![]);
    let wi = g.init_f32("w", &[width as i64, out as i64], w.clone());
    g.node_to("MatMul", &[&e, &wi], vec![], "y");
    g.output("y", ElemType::F32, &[D::Fixed(4), D::Fixed(out as i64)]);
    let mut model = g.finish(17);
    let options = DynamicOptions {
        min_elements: 1,
        down_proj_weight_only: true,
        ..Default::default()
    };
    let report = quantize_dynamic(&mut model, &options).unwrap();
    assert_eq!(report.weight_only.len(), 1, "{report:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.onnx");
    write_model(&model, &path).unwrap();
    // By hand: symmetric int8 per table row and per weight column.
    let q = |v: &[f32], scale: f32| -> Vec<f32> {
        v.iter()
            .map(|x| (x / scale).round_ties_even() * scale)
            .collect()
    };
    let rows: Vec<f32> = (0..vocab)
        .flat_map(|r| {
            let row = &table[r * width..(r + 1) * width];
            q(row, row.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0)
        })
        .collect();
    let mut wd = w.clone();
    for c in 0..out {
        let s = (0..width)
            .map(|r| w[r * out + c].abs())
            .fold(0f32, f32::max)
            / 127.0;
        for r in 0..width {
            wd[r * out + c] = (w[r * out + c] / s).round_ties_even() * s;
        }
    }
    let ids_v = [5i64, 0, 3, 3];
    let want: Vec<f32> = ids_v
        .iter()
        .flat_map(|&id| {
            let e = &rows[id as usize * width..(id as usize + 1) * width];
            (0..out)
                .map(|c| (0..width).map(|r| e[r] * wd[r * out + c]).sum::<f32>())
                .collect::<Vec<_>>()
        })
        .collect();
    for (name, backend) in ort_and_tract() {
        let mut p = backend
            .prepare(
                &ModelRef {
                    path: path.clone(),
                    id: "q".into(),
                    hf_dir: None,
                },
                &PrepareOptions {
                    device: Device::Cpu,
                    threads: 1,
                    inputs: Vec::new(),
                    options: serde_json::Value::Null,
                },
            )
            .unwrap();
        p.bind(&[Tensor {
            name: "ids".into(),
            shape: vec![4],
            data: TensorData::I64(ids_v.to_vec()),
        }])
        .unwrap();
        p.run().unwrap();
        let TensorData::F32(got) = p.outputs().unwrap().remove(0).data else {
            panic!("f32")
        };
        assert_close(name, &got, &want, 1e-5);
    }
}

/// int8-static (QDQ with a calibrated range) on ORT and tract against the
/// same arithmetic by hand.
#[test]
fn int8_static_qdq_matches_a_hand_computation_on_ort_and_tract() {
    int8_static_qdq_matches_a_hand_computation_on_ort_and_tract_with(native(1));
    int8_static_qdq_matches_a_hand_computation_on_ort_and_tract_with(seven_bit(native(1)));
}

fn int8_static_qdq_matches_a_hand_computation_on_ort_and_tract_with(options: DynamicOptions) {
    use handoff_convert::quantize::{Range, quantize_static};
    use std::collections::BTreeMap;
    handoff_ort::provision::fetch().expect("libonnxruntime from the project cache");
    let (m, k, n) = (2, 6, 4);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7 % 11) as f32 - 4.0) / 3.0)
        .collect();
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 5 % 9) as f32 - 4.0) / 8.0)
        .collect();
    let mut model = matmul_model(m, k, n, &w);
    // A calibrated range narrower than the data: the top values saturate.
    let range = Range {
        min: -1.0,
        max: 1.5,
    };
    quantize_static(
        &mut model,
        &BTreeMap::from([("x".to_owned(), range)]),
        &options,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.onnx");
    write_model(&model, &path).unwrap();
    let s = 2.5f32 / 255.0;
    let zp = (1.0f32 / s).round_ties_even();
    let xd: Vec<f32> = x
        .iter()
        .map(|v| (((v / s).round_ties_even() + zp).clamp(0.0, 255.0) - zp) * s)
        .collect();
    let ws: Vec<f32> = (0..n)
        .map(|c| (0..k).map(|r| w[r * n + c].abs()).fold(0f32, f32::max) / qmax(&options))
        .collect();
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            let (row, c) = (i / n, i % n);
            (0..k)
                .map(|r| xd[row * k + r] * (w[r * n + c] / ws[c]).round_ties_even() * ws[c])
                .sum()
        })
        .collect();
    for (name, backend) in ort_and_tract() {
        let got = run(backend.as_ref(), &path, &x, m, k);
        assert_close(name, &got, &want, 1e-5);
    }
}

/// A variant is built for a CPU class: the cache does not hand a variant
/// built for one class to a run for another, and a build for AVX2 (no
/// VNNI) has 7-bit weights, recorded with why in its provenance.
#[test]
fn the_variant_cache_refuses_a_variant_built_for_another_cpu_class() {
    use handoff_convert::isa::{CpuClass, Isa};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("s.yaml"),
        "name: v\nmodels:\n  - id: mlp\n    source: {synthetic: {kind: mlp, width: 64, depth: 2}}\n    variants: [fp32, int8-dynamic]\n    min_cosine: 0.9\nbackends: [ort]\n",
    )
    .unwrap();
    let prepare = |target: &str| {
        let o = common::handoff_env(&["prepare", "s.yaml"], d, &[("HANDOFF_TARGET_CPU", target)]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Variants for other classes stay beside it, each in its own file.
        let class = match target {
            "" => Isa::detect().class.as_str().to_owned(),
            t => format!("x86-{t}"),
        };
        let (file, prov) = std::fs::read_dir(d.join("cache/synthetic"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".int8-dynamic.onnx"))
            .map(|file| {
                let sidecar = handoff_convert::provenance::Provenance::sidecar_path(&file);
                let prov: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(sidecar).unwrap()).unwrap();
                (file, prov)
            })
            .find(|(_, prov)| {
                prov["steps"].as_array().unwrap().iter().any(|s| {
                    s["name"] == "quantize:int8-dynamic"
                        && s["params"]["target_cpu"]["cpu_class"] == class.as_str()
                })
            })
            .unwrap_or_else(|| panic!("an int8 variant for {class}"));
        let model = handoff_onnx::inspect::read_model(&file).unwrap();
        let largest = model
            .graph
            .unwrap()
            .initializer
            .iter()
            .filter(|t| t.name.ends_with("_q") && t.data_type == 3)
            .flat_map(|t| t.raw_data.iter().map(|b| (*b as i8).unsigned_abs()))
            .max()
            .unwrap();
        (prov, largest)
    };
    let (avx2, q) = prepare("avx2");
    let step = |p: &serde_json::Value| {
        p["steps"]
            .as_array()
            .unwrap()
            .iter()
            .rfind(|s| s["name"] == "quantize:int8-dynamic")
            .unwrap()
            .clone()
    };
    assert_eq!(step(&avx2)["params"]["target_cpu"]["cpu_class"], "x86-avx2");
    assert!(
        step(&avx2)["params"]["target_cpu"]["int8_weights"]
            .as_str()
            .unwrap()
            .starts_with("7-bit")
    );
    assert_eq!(q, 63, "7-bit weights for AVX2");
    // The same suite for a VNNI machine: rebuilt, 8-bit.
    let (vnni, q) = prepare("avx512-vnni");
    assert_eq!(
        step(&vnni)["params"]["target_cpu"]["cpu_class"],
        "x86-avx512-vnni"
    );
    assert_eq!(q, 127, "8-bit weights with VNNI");
    // And this machine's class is what an unset variable means.
    let (native, _) = prepare("");
    assert_eq!(
        step(&native)["params"]["target_cpu"]["cpu_class"],
        Isa::detect().class.as_str()
    );
    assert!(CpuClass::X86Avx2.saturates_int8());
    // `validate` reuses the variant built for this class and would build
    // the one for another class, building nothing itself.
    let pending = |target: &str| {
        let o = common::handoff_env(
            &["validate", "s.yaml"],
            d,
            &[("HANDOFF_TARGET_CPU", target)],
        );
        assert_eq!(o.status.code(), Some(0));
        String::from_utf8_lossy(&o.stdout).contains("mlp@int8-dynamic: build it")
    };
    assert!(!pending(""));
    assert!(pending("avx-vnni"), "never built for that class");
    assert_eq!(prepare("").0, native);
    // A misspelt class is an error, not a silent native build.
    let o = common::handoff_env(
        &["validate", "s.yaml"],
        d,
        &[("HANDOFF_TARGET_CPU", "avx3")],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("HANDOFF_TARGET_CPU"));
}

/// A suite pointed at a model file outside the model cache makes its
/// variants in the cache, never beside that file (which may be someone
/// else's directory, or read-only).
#[test]
fn variants_of_a_file_outside_the_cache_are_written_into_the_cache() {
    use handoff_onnx::synthetic::{Kind, SyntheticSpec};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("theirs")).unwrap();
    let spec = SyntheticSpec {
        kind: Kind::Mlp,
        width: 64,
        depth: 2,
        seed: 0,
    };
    write_model(&spec.build(), &d.join("theirs/m.onnx")).unwrap();
    std::fs::write(
        d.join("s.yaml"),
        "name: v\nmodels:\n  - id: m\n    source: {onnx: theirs/m.onnx}\n    variants: [fp32, int8-dynamic]\n    min_cosine: 0.9\nbackends: [ort]\n",
    )
    .unwrap();
    let o = handoff(&["prepare", "s.yaml"], d);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let beside: Vec<_> = common::walk(&d.join("theirs"));
    assert_eq!(beside, vec![d.join("theirs/m.onnx")], "{beside:?}");
    let made = common::walk(&d.join("cache/derived"));
    assert!(
        made.iter().any(
            |p| p.file_name().unwrap().to_string_lossy().starts_with("m.")
                && p.to_string_lossy().ends_with(".int8-dynamic.onnx")
        ),
        "{made:?}"
    );
}

/// The gate that counts is the one on the machine that measures: every run
/// checks a reused variant file again, and a failure here is in its cells
/// even though the file passed where it was built. Another CPU computing
/// the same int8 file differently is stood in for by another file under the
/// variant's name, its sidecar (which says it passed) kept.
#[test]
fn a_reused_variant_is_gated_again_on_the_machine_that_measures_it() {
    use handoff_convert::isa::Isa;
    use handoff_onnx::synthetic::{Kind, SyntheticSpec};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("s.yaml"),
        "name: v\nmodels:\n  - id: mlp\n    source: {synthetic: {kind: mlp, width: 64, depth: 2}}\n    variants: [fp32, int8-dynamic]\n    min_cosine: 0.9\n\
         backends: [ort]\nthreads: [1]\nbatch: [2]\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 200ms, target_ci: 0.2}\n",
    )
    .unwrap();
    let here = Isa::detect().class.as_str().to_owned();
    let accuracy = |records: &[handoff_runner::ResultRecord]| {
        records
            .iter()
            .find(|r| r.case.model == "mlp@int8-dynamic")
            .and_then(|r| r.accuracy.clone())
            .expect("the int8 case has its gate")
    };
    // First run: built and gated here; reused and gated again here.
    let first = accuracy(&run_ok(d, "s.yaml", "r1"));
    assert!(first.passed && first.built.is_none(), "{first:?}");
    assert_eq!(first.cpu_class.as_deref(), Some(here.as_str()));
    let again = accuracy(&run_ok(d, "s.yaml", "r2"));
    let built = again
        .built
        .clone()
        .expect("a reused file keeps its build gate");
    assert!(again.passed && built.passed, "{again:?}");
    assert_eq!(built.cpu_class.as_deref(), Some(here.as_str()));
    assert_eq!(
        again.min_cosine, first.min_cosine,
        "same file, same machine"
    );
    assert!(again.regate_note().is_none());

    let file = common::walk(&d.join("cache"))
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(".int8-dynamic.onnx"))
        .expect("the int8 file");
    let other = SyntheticSpec {
        kind: Kind::Mlp,
        width: 64,
        depth: 2,
        seed: 7,
    };
    write_model(&other.build(), &file).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let records = run_ok(d, "s.yaml", "r3");
    let here_now = accuracy(&records);
    assert!(!here_now.passed, "{here_now:?}");
    assert!(here_now.built.as_ref().is_some_and(|b| b.passed));
    let note = here_now.regate_note().expect("the two gates disagree");
    assert!(
        note.contains("passed where it was built") && note.contains("fails on this CPU"),
        "{note}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        bytes,
        "reported, not rebuilt"
    );
    let summary = std::fs::read_to_string(d.join("r3/summary.md")).unwrap();
    assert!(
        summary.contains("ACCURACY-FAIL int8-dynamic") && summary.contains(&note),
        "{summary}"
    );
    // A case that failed its gate on this machine is never recommended.
    assert!(
        records
            .iter()
            .filter(|r| r.case.model == "mlp@int8-dynamic")
            .all(|r| !r.passes())
    );
}

/// A BERT encoder written the way torch.onnx and optimum write one, not by
/// handoff's converter: Gather embeddings with positions from
/// Shape/Gather/Range, the first layer's LayerNorm decomposed
/// (ReduceMean/Sub/Pow/Sqrt/Div) and the second's a `LayerNormalization`
/// (opset >= 17), Erf GELU then Tanh GELU, attention as MatMul + Softmax
/// over Reshape/Transpose with an additive mask, `Linear` as MatMul + Add
/// on transposed weights, one weight as a `Constant` node and one behind a
/// `Transpose`, and a pooler `Gemm` (transB = 1) + Tanh on the first token.
/// Random weights (fixed seed), scaled to keep activations near unit size.
fn exporter_bert(opset: i64) -> handoff_onnx::proto::ModelProto {
    use handoff_onnx::builder::{attr_float, attr_int, attr_ints, tensor_f32};
    use handoff_onnx::proto::{AttributeProto, attribute_type};
    const VOCAB: usize = 256;
    const H: usize = 64;
    const HEADS: i64 = 4;
    const FF: usize = 256;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = move |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    };
    let lin = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let mut g = GraphBuilder::new("torch_jit");
    let bs = [D::Sym("batch_size"), D::Sym("sequence_length")];
    let ids = g.input("input_ids", ElemType::I64, &bs);
    let mask = g.input("attention_mask", ElemType::I64, &bs);
    let types = g.input("token_type_ids", ElemType::I64, &bs);
    // Unsqueeze's axes are an input from opset 13, an attribute before.
    let unsqueeze = |g: &mut GraphBuilder, x: &str, axes: &[i64]| {
        if opset >= 13 {
            let a = g.init_i64(
                &format!("axes_{}", axes.len()),
                &[axes.len() as i64],
                axes.to_vec(),
            );
            g.node("Unsqueeze", &[x, &a], vec![])
        } else {
            g.node("Unsqueeze", &[x], vec![attr_ints("axes", axes)])
        }
    };
    let scalar = |g: &mut GraphBuilder, name: &str, v: f32| g.init_f32(name, &[], vec![v]);
    // Embeddings.
    let word = g.init_f32(
        "embeddings.word_embeddings.weight",
        &[VOCAB as i64, H as i64],
        uniform(VOCAB * H, 1.0),
    );
    let pos = g.init_f32(
        "embeddings.position_embeddings.weight",
        &[64, H as i64],
        uniform(64 * H, 0.5),
    );
    let typ = g.init_f32(
        "embeddings.token_type_embeddings.weight",
        &[2, H as i64],
        uniform(2 * H, 0.5),
    );
    let shape = g.node("Shape", &[&ids], vec![]);
    let one_i = g.init_i64("one_i64", &[], vec![1]);
    let zero_i = g.init_i64("zero_i64", &[], vec![0]);
    let seq = g.node("Gather", &[&shape, &one_i], vec![attr_int("axis", 0)]);
    let range = g.node("Range", &[&zero_i, &seq, &one_i], vec![]);
    let positions = unsqueeze(&mut g, &range, &[0]);
    let e_word = g.node("Gather", &[&word, &ids], vec![]);
    let e_pos = g.node("Gather", &[&pos, &positions], vec![]);
    let e_typ = g.node("Gather", &[&typ, &types], vec![]);
    let e = g.node("Add", &[&e_word, &e_pos], vec![]);
    let e = g.node("Add", &[&e, &e_typ], vec![]);
    let layer_norm = |g: &mut GraphBuilder, x: &str, name: &str, fused: bool| {
        let gamma = g.init_f32(&format!("{name}.weight"), &[H as i64], vec![1.0; H]);
        let beta = g.init_f32(&format!("{name}.bias"), &[H as i64], vec![0.0; H]);
        if fused {
            return g.node(
                "LayerNormalization",
                &[x, &gamma, &beta],
                vec![attr_int("axis", -1), attr_float("epsilon", 1e-12)],
            );
        }
        let axes = vec![attr_ints("axes", &[-1])];
        let mean = g.node("ReduceMean", &[x], axes.clone());
        let d = g.node("Sub", &[x, &mean], vec![]);
        let two = g.init_f32("two", &[], vec![2.0]);
        let sq = g.node("Pow", &[&d, &two], vec![]);
        let var = g.node("ReduceMean", &[&sq], axes);
        let eps = g.init_f32("eps", &[], vec![1e-12]);
        let var = g.node("Add", &[&var, &eps], vec![]);
        let sd = g.node("Sqrt", &[&var], vec![]);
        let n = g.node("Div", &[&d, &sd], vec![]);
        let n = g.node("Mul", &[&n, &gamma], vec![]);
        g.node("Add", &[&n, &beta], vec![])
    };
    let mut h = layer_norm(&mut g, &e, "embeddings.LayerNorm", false);
    // Additive mask [batch, 1, 1, seq]: 0 where attended, -10000 elsewhere.
    let m = unsqueeze(&mut g, &mask, &[1, 2]);
    let m = g.node("Cast", &[&m], vec![attr_int("to", 1)]);
    let one = scalar(&mut g, "one", 1.0);
    let m = g.node("Sub", &[&one, &m], vec![]);
    let big = scalar(&mut g, "minus_big", -10000.0);
    let ext_mask = g.node("Mul", &[&m, &big], vec![]);
    let heads_shape = g.init_i64("heads_shape", &[4], vec![0, 0, HEADS, H as i64 / HEADS]);
    let merged_shape = g.init_i64("merged_shape", &[3], vec![0, 0, H as i64]);
    let sqrt_d = scalar(&mut g, "sqrt_head_dim", ((H as i64 / HEADS) as f32).sqrt());
    for layer in 0..2 {
        let pre = format!("encoder.layer.{layer}");
        let mut linear =
            |g: &mut GraphBuilder, x: &str, name: &str, fan_in: usize, fan_out: usize| {
                let w = uniform(fan_in * fan_out, lin(fan_in));
                let b = g.init_f32(
                    &format!("{pre}.{name}.bias"),
                    &[fan_out as i64],
                    uniform(fan_out, 0.1),
                );
                let w_name = format!("onnx::MatMul_{pre}.{name}");
                let w = if layer == 0 && name == "attention.output.dense" {
                    // A weight as a Constant node.
                    g.node(
                        "Constant",
                        &[],
                        vec![AttributeProto {
                            name: "value".into(),
                            r#type: attribute_type::TENSOR,
                            t: Some(tensor_f32("", &[fan_in as i64, fan_out as i64], &w)),
                            ..Default::default()
                        }],
                    )
                } else if layer == 1 && name == "attention.self.query" {
                    // A weight stored [out, in] behind a Transpose.
                    let t: Vec<f32> = (0..fan_in * fan_out)
                        .map(|k| w[(k % fan_out) * fan_out + k / fan_out])
                        .collect();
                    let raw = g.init_f32(&w_name, &[fan_out as i64, fan_in as i64], t);
                    g.node("Transpose", &[&raw], vec![attr_ints("perm", &[1, 0])])
                } else {
                    g.init_f32(&w_name, &[fan_in as i64, fan_out as i64], w)
                };
                let y = g.node("MatMul", &[x, &w], vec![]);
                g.node("Add", &[&b, &y], vec![])
            };
        let split = |g: &mut GraphBuilder, x: &str, perm: &[i64]| {
            let r = g.node("Reshape", &[x, &heads_shape], vec![]);
            g.node("Transpose", &[&r], vec![attr_ints("perm", perm)])
        };
        let q = linear(&mut g, &h, "attention.self.query", H, H);
        let k = linear(&mut g, &h, "attention.self.key", H, H);
        let v = linear(&mut g, &h, "attention.self.value", H, H);
        let q = split(&mut g, &q, &[0, 2, 1, 3]);
        let k = split(&mut g, &k, &[0, 2, 3, 1]);
        let v = split(&mut g, &v, &[0, 2, 1, 3]);
        let scores = g.node("MatMul", &[&q, &k], vec![]);
        let scores = g.node("Div", &[&scores, &sqrt_d], vec![]);
        let scores = g.node("Add", &[&scores, &ext_mask], vec![]);
        let probs = g.node("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let ctx = g.node("MatMul", &[&probs, &v], vec![]);
        let ctx = g.node("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let ctx = g.node("Reshape", &[&ctx, &merged_shape], vec![]);
        let a = linear(&mut g, &ctx, "attention.output.dense", H, H);
        let a = g.node("Add", &[&a, &h], vec![]);
        let fused = layer == 1 && opset >= 17;
        let h1 = layer_norm(
            &mut g,
            &a,
            &format!("{pre}.attention.output.LayerNorm"),
            fused,
        );
        let f = linear(&mut g, &h1, "intermediate.dense", H, FF);
        let half = scalar(&mut g, "half", 0.5);
        let f = if layer == 0 {
            // Erf GELU: x * 0.5 * (1 + erf(x / sqrt 2)).
            let s2 = scalar(&mut g, "sqrt2", std::f32::consts::SQRT_2);
            let t = g.node("Div", &[&f, &s2], vec![]);
            let t = g.node("Erf", &[&t], vec![]);
            let t = g.node("Add", &[&t, &one], vec![]);
            let t = g.node("Mul", &[&f, &t], vec![]);
            g.node("Mul", &[&t, &half], vec![])
        } else {
            // Tanh GELU.
            let three = scalar(&mut g, "three", 3.0);
            let c = scalar(&mut g, "gelu_c", 0.044715);
            let k = scalar(
                &mut g,
                "sqrt_2_over_pi",
                (2.0 / std::f32::consts::PI).sqrt(),
            );
            let cube = g.node("Pow", &[&f, &three], vec![]);
            let t = g.node("Mul", &[&cube, &c], vec![]);
            let t = g.node("Add", &[&f, &t], vec![]);
            let t = g.node("Mul", &[&t, &k], vec![]);
            let t = g.node("Tanh", &[&t], vec![]);
            let t = g.node("Add", &[&t, &one], vec![]);
            let t = g.node("Mul", &[&f, &t], vec![]);
            g.node("Mul", &[&t, &half], vec![])
        };
        let o = linear(&mut g, &f, "output.dense", FF, H);
        let o = g.node("Add", &[&o, &h1], vec![]);
        h = layer_norm(&mut g, &o, &format!("{pre}.output.LayerNorm"), fused);
    }
    g.node_to("Identity", &[&h], vec![], "last_hidden_state");
    g.output(
        "last_hidden_state",
        ElemType::F32,
        &[bs[0].clone(), bs[1].clone(), D::Fixed(H as i64)],
    );
    let first = g.node("Gather", &[&h, &zero_i], vec![attr_int("axis", 1)]);
    let wp = g.init_f32(
        "pooler.dense.weight",
        &[H as i64, H as i64],
        uniform(H * H, lin(H)),
    );
    let bp = g.init_f32("pooler.dense.bias", &[H as i64], uniform(H, 0.1));
    let p = g.node(
        "Gemm",
        &[&first, &wp, &bp],
        vec![
            attr_float("alpha", 1.0),
            attr_float("beta", 1.0),
            attr_int("transB", 1),
        ],
    );
    g.node_to("Tanh", &[&p], vec![], "pooler_output");
    g.output(
        "pooler_output",
        ElemType::F32,
        &[bs[0].clone(), D::Fixed(H as i64)],
    );
    g.finish(opset)
}

/// Any export, not only handoff's converter: an exporter-style BERT at
/// opset 17 and at opset 12 (no axes inputs, decomposed LayerNorm) gets
/// int8-dynamic and int8-static variants that pass the accuracy gate, run
/// on ORT and tract with parity, and record how their weights were found.
#[test]
fn an_exporter_style_bert_quantises_and_passes_its_gate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for opset in [17, 12] {
        write_model(&exporter_bert(opset), &d.join(format!("bert{opset}.onnx"))).unwrap();
    }
    let inputs = "    inputs:\n      - {name: input_ids, dtype: i64, shape: [batch, seq], fill: {random_int: {min: 0, max: 255}}}\n      - {name: attention_mask, dtype: i64, shape: [batch, seq], fill: {constant: 1}}\n      - {name: token_type_ids, dtype: i64, shape: [batch, seq], fill: {random_int: {min: 0, max: 1}}}\n";
    let suite = |variants: [&str; 2]| {
        let mut suite = String::from("name: exporter\nmodels:\n");
        for (opset, variants) in [17, 12].iter().zip(variants) {
            suite.push_str(&format!(
                "  - id: bert{opset}\n    source: {{onnx: bert{opset}.onnx}}\n    variants: [{variants}]\n{inputs}"
            ));
        }
        suite.push_str("backends: [ort, tract]\nthreads: [1]\nbatch: [2]\ndims: {seq: [16]}\nmeasure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 200ms, target_ci: 0.2}\n");
        suite
    };
    // Per-channel static int8 needs DequantizeLinear on an axis (opset 13):
    // refused at the field that asks for it, nothing half-built.
    let all = "fp32, int8-dynamic, int8-static";
    std::fs::write(d.join("old.yaml"), suite([all, all])).unwrap();
    let o = handoff(&["prepare", "old.yaml"], d);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("models[1].variants[2]: ")
            && err.contains("opset 12; int8-static with per-channel weights (DequantizeLinear on an axis) needs opset >= 13"),
        "{err}"
    );
    std::fs::write(d.join("s.yaml"), suite([all, "fp32, int8-dynamic"])).unwrap();
    let records = run_ok(d, "s.yaml", "out");
    for (opset, kinds) in [
        (17, &["int8-dynamic", "int8-static"][..]),
        (12, &["int8-dynamic"][..]),
    ] {
        let id = format!("bert{opset}");
        let variants: Vec<&handoff_runner::ResultRecord> = records
            .iter()
            .filter(|r| r.case.model.starts_with(&format!("{id}@")))
            .collect();
        let names: Vec<&str> = variants.iter().map(|r| r.case.model.as_str()).collect();
        let want: Vec<String> = kinds
            .iter()
            .flat_map(|k| [format!("{id}@{k}"), format!("{id}@{k}")])
            .collect();
        assert_eq!(names, want, "{names:?}");
        for r in &variants {
            let a = r.accuracy.as_ref().unwrap();
            // int8-dynamic passes the default gate (0.99 on the pooler
            // output). int8-static, with per-tensor activation ranges from
            // other inputs, lands near it, as on MiniLM (0.98 here); a
            // misread weight or range would be far below.
            if a.variant == "int8-dynamic" {
                assert!(
                    a.passed && a.threshold_min_cosine == 0.99,
                    "{}: {a:?}",
                    r.case.id
                );
            } else {
                assert!(a.min_cosine > 0.95, "{}: {a:?}", r.case.id);
            }
            assert_eq!(r.status, Status::Ok, "{}: {:?}", r.case.id, r.reason);
            assert!(
                r.parity.as_ref().is_some_and(|p| p.ok),
                "{}: {:?}",
                r.case.id,
                r.parity
            );
        }
    }
    // How the weights were found, and that every MatMul weight went int8.
    for sidecar in common::walk(&d.join("cache")).into_iter().filter(|p| {
        p.to_string_lossy()
            .ends_with(".int8-dynamic.onnx.provenance.json")
    }) {
        let prov: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
        let params = &prov["steps"]
            .as_array()
            .unwrap()
            .iter()
            .rfind(|s| s["name"] == "quantize:int8-dynamic")
            .unwrap()["params"];
        let normalized: Vec<&str> = params["normalized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(normalized.len(), 3, "{normalized:?}");
        assert!(normalized[0].starts_with("Constant `"), "{normalized:?}");
        assert!(
            normalized[1]
                .starts_with("Transpose of `onnx::MatMul_encoder.layer.1.attention.self.query`"),
            "{normalized:?}"
        );
        assert!(normalized[2].starts_with("Gemm `"), "{normalized:?}");
        let report = &params["report"];
        // 6 Linear per layer, 2 layers, the pooler; word and position tables.
        assert_eq!(report["quantized"]["MatMul"], 13, "{report}");
        assert!(
            report["quantized"]["Gather"].as_u64().unwrap() >= 1,
            "{report}"
        );
        assert!(
            report["left_fp32"].as_array().unwrap().is_empty(),
            "{report}"
        );
    }
}

/// The int8 numerics tests of this file again, with this test binary under
/// QEMU presenting an AMD EPYC Zen 3 (AVX2 without VNNI: u8 x s8 pairs
/// summed in saturating 16 bits, the class of most cloud VMs and CI
/// runners), so they are known to hold on that class from any x86 machine.
/// The runtimes pick their kernels from `cpuid`, which the emulator
/// answers. As a control that the emulator is in effect, one of them with
/// 8-bit weights forced must fail there, as it does on a real Zen 3.
#[cfg(target_arch = "x86_64")]
#[test]
fn int8_numerics_hold_on_an_emulated_avx2_cpu() {
    use handoff_runner::isolate::WorkerCommand;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ensure-qemu.sh");
    let o = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let launcher = String::from_utf8(o.stdout).unwrap();
    let exe = std::env::current_exe().unwrap();
    let run = |tests: &[&str], target_cpu: Option<&str>| {
        let mut args = vec!["--exact", "--test-threads", "2"];
        args.extend_from_slice(tests);
        let w = WorkerCommand::launched(&launcher, exe.clone(), &args);
        let mut c = std::process::Command::new(&w.program);
        // The emulator presents its own CPU; a cpuid mask preloaded from
        // scripts/as-cpu.sh would load into the emulated process, where
        // CPUID faulting does not exist.
        c.args(&w.args)
            .env_remove(handoff_convert::isa::TARGET_CPU_VAR)
            .env_remove(handoff_runner::isolate::LAUNCHER_VAR)
            .env_remove("LD_PRELOAD");
        if let Some(t) = target_cpu {
            c.env(handoff_convert::isa::TARGET_CPU_VAR, t);
        }
        let o = c.output().unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let tests = [
        "int8_dynamic_on_ort_and_tract_computes_what_the_onnx_spec_says",
        "int8_static_qdq_matches_a_hand_computation_on_ort_and_tract",
        "smoothing_is_exact_in_fp32_and_shrinks_int8_error_on_an_outlier_channel",
        "split_outlier_channels_are_exact_in_fp32_and_shrink_int8_error",
        "int8_embeddings_and_weight_only_matmul_agree_on_ort_and_tract",
    ];
    let (ok, out) = run(&tests, None);
    assert!(ok && out.contains("5 passed; 0 failed"), "{out}");
    let (ok, out) = run(&[tests[1]], Some("avx512-vnni"));
    assert!(
        !ok && out.contains("1 failed") && out.contains("ort y["),
        "8-bit weights should saturate on the emulated AVX2 CPU:\n{out}"
    );
}

/// A model saved with its weights in a data file beside it (what
/// `onnx.save(..., save_as_external_data=True)` and exporters of large
/// models write) runs, lowers and quantises like any other; new weights
/// under the same `.onnx` bytes are a new model, and what was made from
/// the old weights (the int8 build, candle-onnx's lowered copy) is made
/// again, not reused.
#[test]
fn a_model_with_external_data_runs_everywhere_and_new_weights_rebuild_what_was_made_from_it() {
    use handoff_onnx::synthetic::{Kind, SyntheticSpec};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enc.onnx");
    let save = |seed| {
        let spec = SyntheticSpec {
            kind: Kind::Encoder,
            width: 32,
            depth: 2,
            seed,
        };
        handoff_onnx::external::write_with_external_data(&spec.build(), &path).unwrap();
    };
    save(1);
    assert!(dir.path().join("enc.onnx.data").is_file());
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: x\nmodels:\n  - id: enc\n    source: {onnx: enc.onnx}\n    variants: [fp32, int8-dynamic]\n    lower_for: [candle-onnx]\n    min_cosine: 0.9\n\
         \x20   inputs: [{name: hidden, dtype: f32, shape: [batch, seq, 32], fill: {random: {min: -1, max: 1}}}]\n\
         backends: [ort, tract, candle-onnx]\nthreads: [1]\nbatch: [1]\ndims: {seq: [8]}\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 200ms, target_ci: 0.2}\n",
    )
    .unwrap();
    let check = |records: &[handoff_runner::ResultRecord]| {
        let ids: Vec<&str> = records.iter().map(|r| r.case.id.as_str()).collect();
        assert_eq!(records.len(), 7, "{ids:?}");
        for r in records {
            // candle-onnx runs the lowered copy (`enc+lowered`); it lacks
            // LayerNormalization and int8 tensors.
            if r.case.backend == "candle-onnx" && r.case.model != "enc+lowered" {
                assert_eq!(r.status, Status::Unsupported, "{:?}", r.reason);
                continue;
            }
            common::assert_ok_and_agrees(r);
            assert!(
                r.accuracy.as_ref().is_none_or(|a| a.passed),
                "{:?}",
                r.accuracy
            );
        }
    };
    let first = run_ok(dir.path(), "s.yaml", "a");
    check(&first);
    // New weights in the data file, the `.onnx` bytes as they were (the
    // small biases inside it stay those of the first model).
    let onnx = std::fs::read(&path).unwrap();
    save(2);
    std::fs::write(&path, &onnx).unwrap();
    let second = run_ok(dir.path(), "s.yaml", "b");
    // A stale int8 build would fail its gate against the new fp32, a stale
    // lowered copy its parity against ort on the new weights.
    check(&second);
    // Every model of the second run is another file than the first's: the
    // source, its int8 build and the lowered copy (which ort checks
    // candle-onnx against, so a stale one would agree with itself).
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.case.id, b.case.id);
        assert_ne!(a.case.model_sha256, b.case.model_sha256, "{}", a.case.id);
    }
}
