//! handoff's own corpus of differently built models (the five shapes of
//! `handoff init`'s test, an opset-9 classifier with typed-field weights, a
//! data-dependent `If`, a LayerNorm encoder), run on the CPU backends of
//! the default build: how many each backend runs is stated in
//! docs/backends.md, and this test fails when that changes either way.

mod common;

use common::{handoff, init_models};
use handoff_onnx::ElemType;
use handoff_onnx::builder::{D, GraphBuilder, attr_int, attr_ints, write_model};
use handoff_onnx::proto::{AttributeProto, GraphProto};

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i % 7) as f32 - 3.0) * scale).collect()
}

/// An image classifier as older exporters wrote it: opset 9, weights in
/// the typed `float_data` field instead of `raw_data`.
fn old_cnn(dir: &std::path::Path) {
    let mut g = GraphBuilder::new("old_cnn");
    let x = g.input(
        "data",
        ElemType::F32,
        &[D::Sym("N"), D::Fixed(3), D::Fixed(16), D::Fixed(16)],
    );
    let w = g.init_f32("conv_w", &[8, 3, 3, 3], ramp(216, 0.05));
    let b = g.init_f32("conv_b", &[8], ramp(8, 0.1));
    let c = g.node(
        "Conv",
        &[&x, &w, &b],
        vec![attr_ints("pads", &[1, 1, 1, 1])],
    );
    let r = g.node("Relu", &[&c], vec![]);
    let p = g.node("GlobalAveragePool", &[&r], vec![]);
    let f = g.node("Flatten", &[&p], vec![attr_int("axis", 1)]);
    let fw = g.init_f32("fc_w", &[4, 8], ramp(32, 0.2));
    let fb = g.init_f32("fc_b", &[4], ramp(4, 0.1));
    g.node_to(
        "Gemm",
        &[&f, &fw, &fb],
        vec![attr_int("transB", 1)],
        "logits",
    );
    g.output("logits", ElemType::F32, &[D::Sym("N"), D::Fixed(4)]);
    let mut m = g.finish(9);
    for t in &mut m.graph.as_mut().unwrap().initializer {
        t.float_data = t
            .raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        t.raw_data.clear();
    }
    write_model(&m, &dir.join("old_cnn.onnx")).unwrap();
}

/// A data-dependent branch: `If` on whether the input's sum is positive,
/// each branch reading the outer `x`.
fn branch(dir: &std::path::Path) {
    let sub = |name: &str, op: &str| {
        let mut g = GraphBuilder::new(name);
        g.node_to(op, &["x"], vec![], &format!("{name}_out"));
        g.output(
            &format!("{name}_out"),
            ElemType::F32,
            &[D::Sym("batch"), D::Fixed(4)],
        );
        g.finish(13).graph.unwrap()
    };
    let mut g = GraphBuilder::new("branch");
    let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(4)]);
    let s = g.node("ReduceSum", &[&x], vec![attr_int("keepdims", 0)]);
    let zero = g.init_f32("zero", &[], vec![0.0]);
    let c = g.node("Greater", &[&s, &zero], vec![]);
    let graph_attr = |name: &str, g: GraphProto| AttributeProto {
        name: name.into(),
        r#type: 5,
        g: Some(Box::new(g)),
        ..Default::default()
    };
    g.node_to(
        "If",
        &[&c],
        vec![
            graph_attr("then_branch", sub("then", "Relu")),
            graph_attr("else_branch", sub("else", "Neg")),
        ],
        "y",
    );
    g.output("y", ElemType::F32, &[D::Sym("batch"), D::Fixed(4)]);
    write_model(&g.finish(13), &dir.join("branch.onnx")).unwrap();
}

const SUITE: &str = r#"name: corpus
models:
  - id: cnn
    source: {onnx: models/cnn.onnx}
    inputs: [{name: image, dtype: f32, shape: [1, 3, 8, 8], fill: {random: {min: -1, max: 1}}}]
  - id: encoder
    source: {onnx: models/encoder.onnx}
    inputs: [{name: features, dtype: f32, shape: [batch, seq, 16], fill: {random: {min: -1, max: 1}}}]
  - id: bert
    source: {onnx: models/bert.onnx}
    inputs:
      - {name: input_ids, dtype: i64, shape: [batch, seq], fill: {random_int: {min: 0, max: 50}}}
      - {name: attention_mask, dtype: i64, shape: [batch, seq], fill: {constant: 1}}
      - {name: token_type_ids, dtype: i64, shape: [batch, seq], fill: {constant: 0}}
  - id: scalar
    source: {onnx: models/scalar.onnx}
    inputs:
      - {name: x, dtype: f32, shape: [batch, 4], fill: {random: {min: -1, max: 1}}}
      - {name: gain, dtype: f32, shape: [], fill: {constant: 1}}
  - id: state
    source: {onnx: models/state.onnx}
    inputs:
      - {name: x, dtype: f32, shape: [batch, 8], fill: {random: {min: -1, max: 1}}}
      - {name: state, dtype: f32, shape: [2, batch, 8], fill: {constant: 0}}
  - id: old-cnn
    source: {onnx: models/old_cnn.onnx}
    lower_for: [candle-onnx]
    inputs: [{name: data, dtype: f32, shape: [batch, 3, 16, 16], fill: {random: {min: -1, max: 1}}}]
  - id: branch
    source: {onnx: models/branch.onnx}
    inputs: [{name: x, dtype: f32, shape: [batch, 4], fill: {random: {min: -1, max: 1}}}]
  # Not lowered here, so that one gap stays in the table.
  - id: layernorm-encoder
    source: {synthetic: {kind: encoder, width: 32, depth: 2}}
backends: [ort, tract, candle-onnx]
threads: [1]
batch: [1]
dims: {seq: [8]}
measure: {warmup: 10ms, min_time: 20ms, max_time: 100ms, processes: 1, rounds: 3}
"#;

/// The rows of summary.md's "Models per backend" table: backend, "k of n",
/// why not.
fn coverage(summary: &str) -> Vec<(String, String, String)> {
    summary
        .split("## Models per backend")
        .nth(1)
        .expect("a run of several models has the table")
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| backend"))
        .take_while(|l| l.contains(" of "))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            (cells[0].into(), cells[1].into(), cells[2].into())
        })
        .collect()
}

#[test]
fn the_corpus_runs_where_docs_say_and_every_gap_names_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("models")).unwrap();
    init_models(&d.join("models"));
    old_cnn(&d.join("models"));
    branch(&d.join("models"));
    std::fs::write(d.join("corpus.yaml"), SUITE).unwrap();
    let o = handoff(&["run", "corpus.yaml", "--out", "out", "--quiet"], d);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let summary = std::fs::read_to_string(d.join("out/summary.md")).unwrap();
    let rows = coverage(&summary);
    let table: Vec<String> = rows
        .iter()
        .map(|(b, k, why)| format!("{b}: {k}; {why}"))
        .collect();
    // What docs/backends.md states for this corpus.
    let expected = [
        ("ort", "8 of 8"),
        ("tract", "8 of 8"),
        ("candle-onnx", "7 of 8"),
    ];
    for (backend, count) in expected {
        let row = rows
            .iter()
            .find(|r| r.0 == backend)
            .unwrap_or_else(|| panic!("{backend} missing:\n{}", table.join("\n")));
        assert_eq!(row.1, count, "{}", table.join("\n"));
        // Every model a backend does not run says why, never a bare status.
        for gap in row.2.split("; ").filter(|g| !g.is_empty()) {
            assert!(gap.contains(": "), "{backend}: {gap}");
        }
    }
    // The old classifier's own cell still says what candle-onnx lacks; its
    // lowered copy (GlobalAveragePool as ReduceMean) runs and matches ort.
    let records = handoff_runner::read_results(&d.join("out/results.jsonl"))
        .unwrap()
        .records;
    let cell = |model: &str| {
        records
            .iter()
            .find(|r| r.case.model == model && r.case.backend == "candle-onnx")
            .unwrap_or_else(|| panic!("no candle-onnx cell for {model}"))
    };
    let original = cell("old-cnn");
    assert!(
        original
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("GlobalAveragePool")),
        "{:?}",
        original.reason
    );
    let lowered = cell("old-cnn+lowered");
    assert_eq!(
        lowered.status,
        handoff_runner::Status::Ok,
        "{:?}",
        lowered.reason
    );
}
