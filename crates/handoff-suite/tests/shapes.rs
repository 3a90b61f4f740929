//! Honest shapes: a case never claims a batch size or dim value the model
//! did not run, and what the suite asked for but the model cannot run is
//! listed with why.

use std::path::Path;

use handoff_onnx::ElemType;
use handoff_onnx::builder::{D, GraphBuilder, write_model};
use handoff_suite::{Plan, PlanOptions, SuiteError};

fn options(dir: &Path) -> PlanOptions {
    PlanOptions {
        model_cache: dir.join("cache"),
        known_backends: ["ort", "mock"].map(String::from).to_vec(),
        tools: None,
        preparation: handoff_suite::Preparation::Build,
    }
}

/// One Relu per input, so every input shape is declared as given.
fn model(dir: &Path, file: &str, inputs: &[(&str, &[D])]) {
    let mut g = GraphBuilder::new("m");
    for (i, (name, dims)) in inputs.iter().enumerate() {
        let x = g.input(name, ElemType::F32, dims);
        let out = format!("y{i}");
        g.node_to("Relu", &[&x], vec![], &out);
        g.output(&out, ElemType::F32, dims);
    }
    write_model(&g.finish(13), &dir.join(file)).unwrap();
}

fn plan(dir: &Path, yaml: &str) -> Result<Plan, SuiteError> {
    let file = dir.join("suite.yaml");
    std::fs::write(&file, yaml).unwrap();
    Plan::from_file(&file, &options(dir))
}

fn errors(dir: &Path, yaml: &str) -> String {
    match plan(dir, yaml) {
        Ok(_) => panic!("suite was accepted:\n{yaml}"),
        Err(e) => e.to_string().replace(&dir.display().to_string(), "[DIR]"),
    }
}

/// Case ids with the shapes each case really runs.
fn cases(plan: &Plan) -> Vec<String> {
    plan.cases()
        .map(|c| {
            let shapes: Vec<String> = c
                .inputs
                .iter()
                .map(|t| format!("{}{:?}", t.name, t.shape))
                .collect();
            format!("{} {}", c.id, shapes.join(" "))
        })
        .collect()
}

#[test]
fn a_fixed_batch_model_runs_only_its_batch_and_says_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    model(
        d,
        "cnn.onnx",
        &[("x", &[D::Fixed(1), D::Fixed(3), D::Fixed(8), D::Fixed(8)])],
    );
    // Inputs read off the model, and inputs the suite writes with `batch`
    // where the model has 1: both run batch 1 only.
    let p = plan(
        d,
        "name: t
models:
  - id: derived
    source: {onnx: cnn.onnx}
  - id: spelled
    source: {onnx: cnn.onnx}
    inputs:
      - {name: x, dtype: f32, shape: [batch, 3, 8, 8]}
backends: [mock]
batch: [1, 8]
",
    )
    .unwrap();
    assert_eq!(
        cases(&p),
        [
            "derived/mock/cpu/t1/b1 x[1, 3, 8, 8]",
            "spelled/mock/cpu/t1/b1 x[1, 3, 8, 8]"
        ]
    );
    insta::assert_snapshot!(p.not_run().join("\n"), @r"
    derived: b8 not run: batch is fixed at 1 (no input has a `batch` dim; every input's first dim is 1)
    spelled: b8 not run: batch is fixed at 1 (input `x` is [1, 3, 8, 8])
    ");
}

#[test]
fn exporters_batch_names_are_the_batch_and_every_case_runs_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    model(
        d,
        "enc.onnx",
        &[
            ("a", &[D::Sym("batch_size"), D::Sym("sequence_length")]),
            ("b", &[D::Sym("batch_size"), D::Fixed(4)]),
        ],
    );
    let p = plan(
        d,
        "name: t
models:
  - id: enc
    source: {onnx: enc.onnx}
backends: [mock]
batch: [1, 8]
dims: {sequence_length: [5]}
",
    )
    .unwrap();
    assert!(p.not_run().is_empty());
    for c in p.cases() {
        for t in &c.inputs {
            assert_eq!(t.shape[0], c.batch as usize, "{}: {}", c.id, t.name);
        }
    }
    assert_eq!(
        cases(&p),
        [
            "enc/mock/cpu/t1/b1/sequence_length=5 a[1, 5] b[1, 4]",
            "enc/mock/cpu/t1/b8/sequence_length=5 a[8, 5] b[8, 4]"
        ]
    );
}

#[test]
fn a_dim_the_model_fixes_runs_only_at_that_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    model(d, "m.onnx", &[("x", &[D::Sym("n"), D::Fixed(16)])]);
    let p = plan(
        d,
        "name: t
models:
  - id: m
    source: {onnx: m.onnx}
    inputs:
      - {name: x, dtype: f32, shape: [batch, seq]}
backends: [mock]
dims: {seq: [8, 16]}
",
    )
    .unwrap();
    assert_eq!(cases(&p), ["m/mock/cpu/t1/b1/seq=16 x[1, 16]"]);
    insta::assert_snapshot!(p.not_run().join("\n"), @"m: seq=8 not run: `seq` is fixed at 16 (input `x` is [n, 16])");
}

#[test]
fn a_model_that_runs_none_of_the_suites_values_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    model(d, "b8.onnx", &[("x", &[D::Fixed(8), D::Fixed(4)])]);
    model(
        d,
        "two.onnx",
        &[
            ("x", &[D::Sym("n"), D::Fixed(16)]),
            ("y", &[D::Sym("n"), D::Fixed(8)]),
        ],
    );
    insta::assert_snapshot!(errors(
        d,
        "name: t
models:
  - id: b8
    source: {onnx: b8.onnx}
    batch: [1, 2]
  - id: two
    source: {onnx: two.onnx}
    inputs:
      - {name: x, dtype: f32, shape: [batch, seq]}
      - {name: y, dtype: f32, shape: [batch, seq]}
backends: [mock]
dims: {seq: [8, 16]}
"
    ));
}
