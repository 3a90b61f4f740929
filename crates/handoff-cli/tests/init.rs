//! `handoff init` on five differently shaped models: the suites it writes
//! validate unchanged and run, and no case claims a batch the model did
//! not run.

mod common;

use common::{handoff, init_models as models, relu_each};
use handoff_onnx::ElemType;
use handoff_onnx::builder::{D, GraphBuilder, write_model};
use handoff_runner::{Status, read_results};

#[test]
fn init_writes_suites_that_validate_and_run_for_five_kinds_of_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("models")).unwrap();
    std::fs::create_dir_all(d.join("suites")).unwrap();
    models(&d.join("models"));
    for name in ["cnn", "encoder", "bert", "scalar", "state"] {
        let suite = format!("suites/{name}.yaml");
        let o = handoff(
            &["init", &format!("models/{name}.onnx"), "--out", &suite],
            d,
        );
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = std::fs::read_to_string(d.join(&suite)).unwrap();
        // It names the model relative to itself, and says what it guessed.
        assert!(
            text.contains(&format!("source: {{onnx: ../models/{name}.onnx}}")),
            "{text}"
        );
        let o = handoff(&["validate", &suite], d);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{name}:\n{text}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Short measurements, two backends: the run itself is the check.
        let quick = text
            .replace("backends: [", "backends: [ort, tract] # was: [")
            .replace("min_time: 1s", "min_time: 20ms")
            .replace("max_time: 3s", "max_time: 100ms")
            .replace("warmup: 300ms", "warmup: 10ms")
            .replace("threads: [1, 2]", "threads: [1]")
            .replace("measure:\n", "measure:\n  processes: 1\n  rounds: 5\n");
        std::fs::write(d.join(&suite), &quick).unwrap();
        let out = format!("out-{name}");
        let o = handoff(&["run", &suite, "--out", &out, "--quiet"], d);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let records = read_results(&d.join(&out).join("results.jsonl"))
            .unwrap()
            .records;
        assert!(!records.is_empty(), "{name}");
        for r in &records {
            assert_eq!(r.status, Status::Ok, "{name} {}: {:?}", r.case.id, r.reason);
        }
        let batches: Vec<u32> = records.iter().map(|r| r.case.batch).collect();
        match name {
            // Fixed at 1 by the model: never a b8 case.
            "cnn" => {
                assert!(batches.iter().all(|b| *b == 1), "{batches:?}");
                assert!(text.contains("batch: [1] "), "{text}");
            }
            _ => assert!(batches.contains(&8), "{name}: {batches:?}"),
        }
        match name {
            "encoder" => {
                assert!(
                    text.contains("shape: [batch, sequence_length, 16]"),
                    "{text}"
                );
                assert!(text.contains("sequence_length: [128]"), "{text}");
            }
            "bert" => {
                assert!(
                    text.contains("fill: {random_int: {min: 0, max: 50}}"),
                    "{text}"
                );
                assert!(
                    text.contains(
                        "name: attention_mask, dtype: i64, shape: [batch, seq], fill: {constant: 1}"
                    ),
                    "{text}"
                );
                assert!(
                    text.contains(
                        "name: token_type_ids, dtype: i64, shape: [batch, seq], fill: {constant: 0}"
                    ),
                    "{text}"
                );
            }
            "scalar" => {
                assert!(text.contains("CHECK: a scalar input"), "{text}");
                assert!(text.contains("shape: [], fill: {constant: 1}"), "{text}");
            }
            "state" => {
                assert!(
                    text.contains("shape: [2, batch, 8], fill: {constant: 0}"),
                    "{text}"
                );
                assert!(text.contains("recurrent or cached state"), "{text}");
            }
            _ => {}
        }
    }
    // An existing file is kept unless --force.
    let o = handoff(&["init", "models/cnn.onnx", "--out", "suites/cnn.yaml"], d);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pass --force"));
}

#[test]
fn init_on_an_hf_directory_writes_a_text_suite_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 16, 1, 2, 3).unwrap();
    common::write_tokenizer(&bert);
    let o = handoff(&["init", "bert", "--out", "s.yaml"], dir.path());
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(dir.path().join("s.yaml")).unwrap();
    assert!(text.contains("source: {hf: bert}"), "{text}");
    // tiny BERT has 64 positions: the suite's seq fits them.
    assert!(text.contains("seq: [64]"), "{text}");
    let o = handoff(&["validate", "s.yaml"], dir.path());
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("/candle-native/"));
}

/// A model shipped with reference data in the ONNX test-data layout: the
/// first set's inputs are what runs (so its batch, not the suite's), and
/// every backend is checked against the recorded outputs of every set; a
/// backend that differs is a `mismatch` with no numbers.
#[test]
fn recorded_outputs_in_the_onnx_test_data_layout_check_every_backend() {
    use handoff_backend::{Tensor, TensorData, write_pb};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) / 4.0).collect();
    let b = [0.5f32, -1.0, 0.25];
    let mut g = GraphBuilder::new("affine");
    let x = g.input("x", ElemType::F32, &[D::Sym("N"), D::Fixed(4)]);
    let wn = g.init_f32("w", &[4, 3], w.clone());
    let bn = g.init_f32("b", &[3], b.to_vec());
    let xw = g.node("MatMul", &[&x, &wn], vec![]);
    g.node_to("Add", &[&xw, &bn], vec![], "y");
    g.output("y", ElemType::F32, &[D::Sym("N"), D::Fixed(3)]);
    write_model(&g.finish(13), &d.join("affine.onnx")).unwrap();
    let affine = |xs: &[f32]| -> Vec<f32> {
        xs.chunks(4)
            .flat_map(|row| {
                (0..3).map(|c| b[c] + (0..4).map(|k| row[k] * w[k * 3 + c]).sum::<f32>())
            })
            .collect()
    };
    let tensor = |name: &str, shape: Vec<usize>, v: Vec<f32>| Tensor {
        name: name.into(),
        shape,
        data: TensorData::F32(v),
    };
    // Set 0 unnamed (matched by position), set 1 named.
    let write_set = |k: usize, names: (&str, &str), xs: Vec<f32>, nudge: f32| {
        let set = d.join(format!("data/test_data_set_{k}"));
        std::fs::create_dir_all(&set).unwrap();
        let mut ys = affine(&xs);
        ys[4] += nudge;
        write_pb(&set.join("input_0.pb"), &tensor(names.0, vec![2, 4], xs)).unwrap();
        write_pb(&set.join("output_0.pb"), &tensor(names.1, vec![2, 3], ys)).unwrap();
    };
    let xs0: Vec<f32> = (0..8).map(|i| i as f32 / 8.0).collect();
    let xs1: Vec<f32> = (0..8).map(|i| 1.0 - i as f32 / 3.0).collect();
    write_set(0, ("", ""), xs0, 0.0);
    write_set(1, ("x", "y"), xs1.clone(), 0.0);
    std::fs::write(
        d.join("s.yaml"),
        "name: expected
models:
  - id: affine
    source: {onnx: affine.onnx}
    check: {expected: data, atol: 1.0e-5}
backends: [ort, tract]
batch: [1, 2]
measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 200ms, target_ci: 0.2, processes: 1, rounds: 3}
",
    )
    .unwrap();
    let text = common::handoff_ok(&["validate", "s.yaml"], d);
    assert!(
        text.contains(
            "affine: b1 not run: batch is fixed at 2 (the inputs are the expected data in"
        ),
        "{text}"
    );
    let records = common::run_ok(d, "s.yaml", "good");
    assert_eq!(records.len(), 2, "{records:?}");
    for r in &records {
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert_eq!(r.case.batch, 2);
        let e = r
            .expected
            .as_ref()
            .expect("checked against the recorded outputs");
        assert!(
            e.ok && e.reference == "expected outputs (2 data sets)",
            "{e:?}"
        );
        assert!(e.max_abs < 1e-5, "{e:?}");
    }
    let md = std::fs::read_to_string(d.join("good/summary.md")).unwrap();
    assert!(md.contains("expected outputs (2 data sets): ok"), "{md}");
    // The second set's recorded output is off by 0.01: every backend fails
    // the check there, and no case has numbers.
    write_set(1, ("x", "y"), xs1, 0.01);
    let o = handoff(&["run", "s.yaml", "--out", "bad", "--quiet"], d);
    assert_ne!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let bad = read_results(&d.join("bad/results.jsonl")).unwrap().records;
    assert_eq!(bad.len(), 2);
    for r in &bad {
        assert_eq!(r.status, Status::Mismatch, "{r:?}");
        let reason = r.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("test_data_set_1: max abs 1.000e-2"),
            "{reason}"
        );
        assert!(r.latency_ms.is_none() && r.samples_ms.is_empty(), "{r:?}");
    }
    // Data the model cannot take is a located error before anything runs.
    write_pb(
        &d.join("data/test_data_set_1/input_0.pb"),
        &tensor("x", vec![2, 5], vec![0.0; 10]),
    )
    .unwrap();
    let o = handoff(&["validate", "s.yaml"], d);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("s.yaml:5:13: models[0].check.expected:")
            && err.contains("has shape [2, 5]; input `x: f32[N, 4]` does not take it"),
        "{err}"
    );
}

/// What `handoff init` finds by running and reading around the model: a
/// backend that lacks an op handoff lowers gets `lower_for`, and recorded
/// data beside the model (the ONNX model zoo layout) becomes the suite's
/// inputs and expected outputs.
#[test]
fn init_probes_for_lowerable_ops_and_uses_recorded_data_beside_the_model() {
    use handoff_backend::{Tensor, TensorData, write_pb};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("suites")).unwrap();
    // LayerNormalization: candle-onnx lacks it, handoff rewrites it.
    std::fs::create_dir_all(d.join("ln")).unwrap();
    let mut g = GraphBuilder::new("ln");
    let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(8)]);
    let scale = g.init_f32("scale", &[8], vec![1.0; 8]);
    let bias = g.init_f32("bias", &[8], vec![0.0; 8]);
    g.node_to("LayerNormalization", &[&x, &scale, &bias], vec![], "y");
    g.output("y", ElemType::F32, &[D::Sym("batch"), D::Fixed(8)]);
    write_model(&g.finish(17), &d.join("ln/model.onnx")).unwrap();
    // A model zoo directory: the model and one recorded data set (batch 3).
    std::fs::create_dir_all(d.join("zoo/test_data_set_0")).unwrap();
    let mut g = GraphBuilder::new("zoo");
    relu_each(&mut g, &[("x", &[D::Sym("N"), D::Fixed(4)])]);
    write_model(&g.finish(13), &d.join("zoo/model.onnx")).unwrap();
    let xs: Vec<f32> = (0..12).map(|i| i as f32 - 6.0).collect();
    let ys: Vec<f32> = xs.iter().map(|v| v.max(0.0)).collect();
    for (file, v) in [("input_0.pb", xs), ("output_0.pb", ys)] {
        let t = Tensor {
            name: String::new(),
            shape: vec![3, 4],
            data: TensorData::F32(v),
        };
        write_pb(&d.join("zoo/test_data_set_0").join(file), &t).unwrap();
    }
    let init = |name: &str| {
        let suite = format!("suites/{name}.yaml");
        common::handoff_ok(&["init", &format!("{name}/model.onnx"), "--out", &suite], d);
        let text = std::fs::read_to_string(d.join(&suite)).unwrap();
        let listed = common::handoff_ok(&["validate", &suite], d);
        (text, listed)
    };
    let (text, listed) = init("ln");
    if text.contains("candle-onnx") {
        assert!(text.contains("lower_for: [candle-onnx]"), "{text}");
        assert!(
            listed.contains("ln: run it on candle-onnx and lower the ops candle-onnx lacks"),
            "{listed}"
        );
    }
    assert!(
        !text.contains("lower_for: [ort") && !text.contains("lower_for: [tract"),
        "{text}"
    );
    let (text, listed) = init("zoo");
    assert!(text.contains("check: {expected: ../zoo}"), "{text}");
    assert!(
        text.contains("batch: [3]") && !text.contains("inputs:"),
        "{text}"
    );
    assert!(listed.contains("zoo/ort/cpu/t1/b3"), "{listed}");
}

/// A backend that panics on the lowered model (candle-onnx's `todo!()` for
/// a Gather with indices of rank 3 or more, as in torch.onnx's BERT
/// exports) fails its cells; the run goes on and its other cells are intact.
#[test]
fn a_backend_that_panics_after_lowering_is_a_failed_cell_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut g = GraphBuilder::new("ln-gather");
    let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(8)]);
    let scale = g.init_f32("scale", &[8], vec![1.0; 8]);
    let bias = g.init_f32("bias", &[8], vec![0.0; 8]);
    g.node_to("LayerNormalization", &[&x, &scale, &bias], vec![], "y");
    let table = g.init_f32("table", &[4, 8], (0..32).map(|i| i as f32).collect());
    let idx = g.init_i64("idx", &[1, 1, 1], vec![2]);
    g.node_to("Gather", &[&table, &idx], vec![], "z");
    g.output("y", ElemType::F32, &[D::Sym("batch"), D::Fixed(8)]);
    g.output(
        "z",
        ElemType::F32,
        &[D::Fixed(1), D::Fixed(1), D::Fixed(1), D::Fixed(8)],
    );
    write_model(&g.finish(17), &d.join("m.onnx")).unwrap();
    std::fs::write(
        d.join("s.yaml"),
        "name: t\nmodels:\n  - id: m\n    source: {onnx: m.onnx}\n    lower_for: [candle-onnx]\n\
         backends: [ort, candle-onnx]\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 300ms, target_ci: 0.2}\n",
    )
    .unwrap();
    let records = common::run_ok(d, "s.yaml", "out");
    let cell = |id: &str| {
        records
            .iter()
            .find(|r| r.case.id.starts_with(id))
            .unwrap_or_else(|| panic!("no {id}: {records:#?}"))
    };
    assert_eq!(cell("m/ort/").status, Status::Ok);
    let lowered = cell("m+lowered/candle-onnx/");
    assert_eq!(lowered.status, Status::Failed, "{lowered:#?}");
    let reason = lowered.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("panic") && reason.contains("gather"),
        "{reason}"
    );
}

/// A model whose symbolic shapes tract cannot analyse (a dim times itself;
/// torch.onnx's BERT exports stop it the same way): its tract cells say how
/// to run it, `shapes: concrete` runs it, also where the exporter declared
/// symbolic shapes of intermediate values, and `handoff init` finds that.
#[test]
fn tract_runs_what_it_cannot_analyse_symbolically_with_concrete_shapes() {
    use handoff_onnx::builder::attr_int;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut g = GraphBuilder::new("square");
    let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Sym("seq")]);
    let (a2, a1) = (
        g.init_i64("a2", &[1], vec![2]),
        g.init_i64("a1", &[1], vec![1]),
    );
    let col = g.node("Unsqueeze", &[&x, &a2], vec![]);
    let row = g.node("Unsqueeze", &[&x, &a1], vec![]);
    let outer = g.node("Mul", &[&col, &row], vec![]);
    let symbolic = [D::Sym("batch"), D::Sym("seq"), D::Sym("seq")];
    g.value_info(&outer, ElemType::F32, &symbolic);
    g.node_to("Flatten", &[&outer], vec![attr_int("axis", 1)], "y");
    g.output("y", ElemType::F32, &[D::Sym("batch"), D::Sym("flat")]);
    write_model(&g.finish(17), &d.join("m.onnx")).unwrap();
    let suite = |extra: &str| {
        format!(
            "name: t\nmodels:\n  - id: m\n    source: {{onnx: m.onnx}}\n\
             \x20   inputs: [{{name: x, dtype: f32, shape: [batch, seq], fill: {{constant: 0.5}}}}]\n\
             backends: [ort, tract]\ndims: {{seq: [3, 5]}}\n\
             measure: {{warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 300ms, target_ci: 0.2}}\n{extra}"
        )
    };
    std::fs::write(d.join("a.yaml"), suite("")).unwrap();
    let tract = |records: &[handoff_runner::ResultRecord]| {
        records
            .iter()
            .filter(|r| r.case.backend == "tract")
            .map(|r| (r.status, r.reason.clone().unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    for (status, reason) in tract(&common::run_ok(d, "a.yaml", "a")) {
        assert_eq!(status, Status::Failed);
        assert!(
            reason.contains("backend_options: {tract: {shapes: concrete}}"),
            "{reason}"
        );
    }
    std::fs::write(
        d.join("b.yaml"),
        suite("backend_options: {tract: {shapes: concrete}}\n"),
    )
    .unwrap();
    let runs = tract(&common::run_ok(d, "b.yaml", "b"));
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|(s, _)| *s == Status::Ok), "{runs:?}");
    let text = common::handoff_ok(&["init", "m.onnx"], d);
    assert!(
        text.contains("\nbackend_options: {tract: {shapes: concrete}}\n"),
        "{text}"
    );
}

/// tract fails on an fp16 `Gemm` (it scales by `alpha` in f32) whatever
/// the shapes: its cell names the failure and does not send the user to
/// concrete shapes, which were tried and do not help.
#[test]
fn a_tract_failure_that_concrete_shapes_do_not_mend_gets_no_such_hint() {
    use handoff_onnx::builder::{attr_float, attr_int};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut g = GraphBuilder::new("half-gemm");
    let x = g.input("x", ElemType::F16, &[D::Sym("batch"), D::Fixed(4)]);
    let w = g.input("w", ElemType::F16, &[D::Fixed(4), D::Fixed(4)]);
    let c = g.input("c", ElemType::F16, &[D::Fixed(4)]);
    // As PyTorch's exporter writes an `nn.Linear`.
    let attrs = vec![
        attr_float("alpha", 1.0),
        attr_float("beta", 1.0),
        attr_int("transB", 1),
    ];
    g.node_to("Gemm", &[&x, &w, &c], attrs, "y");
    g.output("y", ElemType::F16, &[D::Sym("batch"), D::Fixed(4)]);
    write_model(&g.finish(13), &d.join("m.onnx")).unwrap();
    std::fs::write(
        d.join("s.yaml"),
        "name: t\nmodels:\n  - id: m\n    source: {onnx: m.onnx}\n\
         backends: [ort, tract]\nthreads: [1]\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 100ms, target_ci: 0.2}\n",
    )
    .unwrap();
    let records = common::run_ok(d, "s.yaml", "out");
    let tract: Vec<_> = records
        .iter()
        .filter(|r| r.case.backend == "tract")
        .collect();
    assert_eq!(tract.len(), 1);
    let reason = tract[0].reason.clone().unwrap_or_default();
    assert_eq!(tract[0].status, Status::Failed, "{reason}");
    assert!(
        reason.contains("Gemm") && !reason.contains("concrete"),
        "{reason}"
    );
    common::assert_ok_and_agrees(records.iter().find(|r| r.case.backend == "ort").unwrap());
}

/// A model computing in half precision (an fp16 export, with an input in
/// half precision too) gets a check that allows what fp16 keeps (about 3
/// significant digits), says why, and its suite runs on every backend.
#[test]
fn a_half_precision_model_gets_a_check_that_fits_half_precision() {
    use handoff_onnx::builder::attr_int;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut g = GraphBuilder::new("half");
    let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(64)]);
    let w = g.init_f32(
        "w",
        &[64, 64],
        // Sums of order 1, as after a normalisation: elementwise checks
        // of fp16 results that cancel from much larger terms need more.
        (0..64 * 64)
            .map(|i| (((i * 37) % 101) as f32 / 50.0 - 1.0) / 8.0)
            .collect(),
    );
    let (x16, w16) = (
        g.node("Cast", &[&x], vec![attr_int("to", 10)]),
        g.node("Cast", &[&w], vec![attr_int("to", 10)]),
    );
    let bias = g.input("bias", ElemType::F16, &[D::Sym("batch"), D::Fixed(64)]);
    let xw = g.node("MatMul", &[&x16, &w16], vec![]);
    g.node_to("Add", &[&xw, &bias], vec![], "y");
    g.output("y", ElemType::F16, &[D::Sym("batch"), D::Fixed(64)]);
    write_model(&g.finish(13), &d.join("m.onnx")).unwrap();
    let text = common::handoff_ok(&["init", "m.onnx"], d);
    assert!(
        text.contains(
            "{name: bias, dtype: f16, shape: [batch, 64], fill: {random: {min: -1, max: 1}}}"
        ) && text.contains("# y in half precision")
            && text.contains("\ncheck: {reference: ort, atol: 1e-2, rtol: 1e-2}\n"),
        "{text}"
    );
    let quick = text
        .replace(
            "backends: [",
            "backends: [ort, tract, candle-onnx] # was: [",
        )
        .replace("min_time: 1s", "min_time: 20ms")
        .replace("max_time: 3s", "max_time: 100ms")
        .replace("warmup: 300ms", "warmup: 10ms")
        .replace("threads: [1, 2]", "threads: [1]");
    std::fs::write(d.join("s.yaml"), quick).unwrap();
    for r in common::run_ok(d, "s.yaml", "out") {
        common::assert_ok_and_agrees(&r);
    }
}
