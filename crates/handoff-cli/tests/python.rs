//! The Python baseline: it runs, agrees with Rust ort, reports its own clock;
//! a worker that crashes or hangs becomes a cell that says so.

mod common;

use common::{handoff_env, run_ok};

use handoff_runner::{Status, read_results};

#[test]
fn python_baseline_runs_and_its_failures_are_cells() {
    // Creates .cache/venv-python-ort from PyPI on first use (pinned).
    handoff_python::setup().expect("python baseline environment");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: py\nmodels:\n  - id: mlp\n    source: {synthetic: {kind: mlp, width: 32, depth: 2}}\n\
         backends: [ort, python-onnxruntime]\nthreads: [1]\nbatch: [1, 4]\ntimeout: 5s\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 50ms, max_time: 300ms, target_ci: 0.2}\n",
    )
    .unwrap();
    let records = run_ok(dir.path(), "s.yaml", "ok");
    for r in records
        .iter()
        .filter(|r| r.case.backend == "python-onnxruntime")
    {
        assert_eq!(r.status, Status::Ok, "{:?}", r.reason);
        assert!(r.parity.as_ref().is_some_and(|p| p.ok && p.max_abs < 1e-5));
        let (inner, outer) = (
            r.inner_latency_ms.as_ref().unwrap(),
            r.latency_ms.as_ref().unwrap(),
        );
        // Python's own clock sits inside handoff's round trip.
        assert!(
            inner.p50 > 0.0 && inner.p50 < outer.p50,
            "{} vs {}",
            inner.p50,
            outer.p50
        );
        assert_eq!(r.inner_samples_ms.len(), r.samples_ms.len());
    }
    let summary = std::fs::read_to_string(dir.path().join("ok/summary.md")).unwrap();
    assert!(summary.contains("## Hand-off gain"), "{summary}");

    for (fail, status, says) in [
        ("crash", Status::Failed, "python worker exited"),
        ("hang", Status::Timeout, "killed after 5s"),
    ] {
        let out = handoff_env(
            &["run", "s.yaml", "--out", fail, "--quiet"],
            dir.path(),
            &[("HANDOFF_PY_WORKER_FAIL", fail)],
        );
        assert!(out.status.code().is_some(), "{fail}: killed by a signal");
        let records = read_results(&dir.path().join(fail).join("results.jsonl"))
            .unwrap()
            .records;
        assert_eq!(records.len(), 4, "{fail}: every case has a cell");
        for r in &records {
            if r.case.backend == "ort" {
                assert_eq!(r.status, Status::Ok, "{fail}: the other backend is intact");
            } else {
                assert_eq!(r.status, status, "{fail}: {:?}", r.reason);
                let reason = r.reason.clone().unwrap_or_default();
                assert!(reason.contains(says), "{fail}: {reason}");
            }
        }
    }
}

/// A model with half- and double-precision outputs (an fp16 export) is
/// checked on every backend, its outputs compared as f32, not refused.
/// A bool mask input (a PyTorch Transformer's `key_padding_mask`): `handoff
/// init` writes it with a fill, and every backend and the Python baseline
/// are fed the same mask, true and false mixed; a bool output is compared
/// too.
#[test]
fn a_bool_mask_input_and_a_bool_output_on_every_backend() {
    use handoff_onnx::ElemType;
    use handoff_onnx::builder::{D, GraphBuilder, write_model};
    handoff_python::setup().expect("python baseline environment");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut g = GraphBuilder::new("masked");
    let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(8)]);
    let mask = g.input(
        "key_padding_mask",
        ElemType::Bool,
        &[D::Sym("batch"), D::Fixed(8)],
    );
    let zero = g.init_f32("zero", &[1], vec![0.0]);
    g.node_to("Where", &[&mask, &zero, &x], vec![], "y");
    g.node_to("Not", &[&mask], vec![], "kept");
    g.output("y", ElemType::F32, &[D::Sym("batch"), D::Fixed(8)]);
    g.output("kept", ElemType::Bool, &[D::Sym("batch"), D::Fixed(8)]);
    write_model(&g.finish(13), &d.join("m.onnx")).unwrap();
    let text = common::handoff_ok(&["init", "m.onnx"], d);
    let line = "{name: key_padding_mask, dtype: bool, shape: [batch, 8], fill: {constant: 0}}";
    assert!(text.contains(line), "{text}");
    let quick = text
        .replace(
            line,
            &line.replace("{constant: 0}", "{random_int: {min: 0, max: 2}}"),
        )
        .replace("min_time: 1s", "min_time: 20ms")
        .replace("max_time: 3s", "max_time: 100ms")
        .replace("warmup: 300ms", "warmup: 10ms")
        .replace("threads: [1, 2]", "threads: [1]");
    std::fs::write(d.join("s.yaml"), quick).unwrap();
    let records = run_ok(d, "s.yaml", "out");
    let backends: Vec<&str> = records.iter().map(|r| r.case.backend.as_str()).collect();
    assert_eq!(
        backends
            .iter()
            .filter(|b| **b == "python-onnxruntime")
            .count(),
        2,
        "{backends:?}"
    );
    for r in &records {
        common::assert_ok_and_agrees(r);
    }
    // The fill draws both values, so a backend that read the mask wrongly
    // would disagree with ort above.
    let spec = handoff_backend::TensorSpec {
        name: "key_padding_mask".into(),
        dtype: handoff_backend::DType::Bool,
        shape: vec![1, 8],
        fill: handoff_backend::Fill::RandomInt { min: 0, max: 2 },
    };
    let handoff_backend::TensorData::Bool(m) = spec.generate(42).data else {
        panic!("bool");
    };
    assert!(m.contains(&true) && m.contains(&false), "{m:?}");
}

#[test]
fn half_inputs_and_half_and_double_outputs_are_checked_on_every_backend() {
    use handoff_onnx::ElemType;
    use handoff_onnx::builder::{D, GraphBuilder, attr_int, write_model};
    handoff_python::setup().expect("python baseline environment");
    let dir = tempfile::tempdir().unwrap();
    let mut g = GraphBuilder::new("half-out");
    let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(8)]);
    let w = g.init_f32(
        "w",
        &[8, 4],
        (0..32).map(|i| i as f32 / 32.0 - 0.5).collect(),
    );
    let x16 = g.input("x16", ElemType::F16, &[D::Sym("batch"), D::Fixed(4)]);
    let y = g.node("MatMul", &[&x, &w], vec![]);
    let y16 = g.node("Cast", &[&y], vec![attr_int("to", 10)]);
    g.node_to("Add", &[&y16, &x16], vec![], "half");
    g.node_to("Cast", &[&y], vec![attr_int("to", 11)], "double");
    g.output("half", ElemType::F16, &[D::Sym("batch"), D::Fixed(4)]);
    g.output("double", ElemType::F64, &[D::Sym("batch"), D::Fixed(4)]);
    write_model(&g.finish(13), &dir.path().join("m.onnx")).unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: half\nmodels:\n  - id: m\n    source: {onnx: m.onnx}\n\
         backends: [ort, tract, candle-onnx, python-onnxruntime]\nthreads: [1]\nbatch: [2]\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 200ms, target_ci: 0.2}\n",
    )
    .unwrap();
    let records = run_ok(dir.path(), "s.yaml", "out");
    assert_eq!(records.len(), 4);
    for r in &records {
        common::assert_ok_and_agrees(r);
    }
}

/// `denormals: flush` zeroes subnormal results in Rust ort and in the
/// Python baseline alike, at one thread too, where ORT's own setting
/// reaches the caller only for a process's first session; `keep` leaves
/// them, as ORT does.
#[test]
fn flushed_denormals_are_zero_on_the_calling_thread_in_rust_and_python() {
    use handoff_backend::{
        Backend, DType, Device, Fill, ModelRef, PrepareOptions, Tensor, TensorData, TensorSpec,
    };
    use handoff_onnx::ElemType;
    use handoff_onnx::builder::{D, GraphBuilder, write_model};
    handoff_python::setup().expect("python baseline environment");
    let dir = tempfile::tempdir().unwrap();
    let mut g = GraphBuilder::new("tiny");
    let x = g.input("x", ElemType::F32, &[D::Fixed(16)]);
    let s = g.init_f32("s", &[1], vec![1e-10]);
    g.node_to("Mul", &[&x, &s], vec![], "y");
    g.output("y", ElemType::F32, &[D::Fixed(16)]);
    let path = dir.path().join("m.onnx");
    write_model(&g.finish(13), &path).unwrap();
    let model = ModelRef {
        path,
        id: "tiny".into(),
        hf_dir: None,
    };
    let x = Tensor {
        name: "x".into(),
        shape: vec![16],
        data: TensorData::F32(vec![1e-30; 16]),
    };
    let spec = TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![16],
        fill: Fill::Constant(1e-30),
    };
    let backends: [Box<dyn Backend>; 2] = [
        Box::new(handoff_ort::OrtBackend),
        Box::new(handoff_python::PythonOrtBackend),
    ];
    for backend in &backends {
        // Flush first: ORT then sets the flags of the thread that creates
        // the process's first session, which must not leak into `keep`.
        for (denormals, subnormal) in [("flush", false), ("keep", true), ("flush", false)] {
            let options = PrepareOptions {
                device: Device::Cpu,
                threads: 1,
                inputs: vec![spec.clone()],
                options: serde_json::json!({"denormals": denormals}),
            };
            let mut p = backend.prepare(&model, &options).unwrap();
            p.bind(std::slice::from_ref(&x)).unwrap();
            p.run().unwrap();
            let TensorData::F32(y) = &p.outputs().unwrap()[0].data else {
                panic!("f32 output");
            };
            let what = format!("{} with denormals: {denormals}: {y:?}", backend.name());
            if subnormal {
                assert!(y.iter().all(|v| *v > 0.0 && !v.is_normal()), "{what}");
            } else {
                assert!(y.iter().all(|v| *v == 0.0), "{what}");
            }
        }
    }
    // Flushing is scoped to each session and run: this thread still keeps
    // subnormals.
    let tiny = std::hint::black_box(1e-30_f32);
    assert!(tiny * std::hint::black_box(1e-10_f32) > 0.0);
}

/// A suite that lists python-onnxruntime on a machine without the
/// environment gets it created by `handoff run` (pinned, from PyPI), as
/// libonnxruntime is, rather than `unavailable: run handoff setup` cells.
#[test]
fn run_creates_a_missing_python_environment() {
    let lib = handoff_ort::provision::fetch().expect("libonnxruntime from the project cache");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: py\nmodels:\n  - id: mlp\n    source: {synthetic: {kind: mlp, width: 16, depth: 1}}\n\
         backends: [ort, python-onnxruntime]\nthreads: [1]\nbatch: [1]\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 50ms, max_time: 200ms, target_ci: 0.2}\n",
    )
    .unwrap();
    let cache = dir.path().join("empty-cache");
    let out = handoff_env(
        &["run", "s.yaml", "--out", "r"],
        dir.path(),
        &[
            ("HANDOFF_CACHE", cache.to_str().unwrap()),
            ("ORT_DYLIB_PATH", lib.to_str().unwrap()),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("creating it from PyPI"), "{err}");
    assert!(cache.join("venv-python-ort/bin/python").is_file());
    let records = read_results(&dir.path().join("r/results.jsonl"))
        .unwrap()
        .records;
    let py = records
        .iter()
        .find(|r| r.case.backend == "python-onnxruntime")
        .unwrap();
    assert_eq!(py.status, Status::Ok, "{:?}", py.reason);
}
