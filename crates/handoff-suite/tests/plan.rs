//! Plan validation and expansion: the order snapshot and every error
//! message (with file:line:column and field path).

use std::path::Path;

use handoff_suite::{Plan, PlanOptions, SuiteError};

fn options(dir: &Path) -> PlanOptions {
    PlanOptions {
        model_cache: dir.join("cache"),
        known_backends: ["ort", "tract", "candle-onnx", "mock", "mock-ref"]
            .map(String::from)
            .to_vec(),
        tools: None,
        preparation: handoff_suite::Preparation::Build,
    }
}

/// Writes the suite into a temp dir (so relative model paths resolve there)
/// and returns the errors with the temp dir replaced by `[DIR]`.
fn errors(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    errors_in(dir.path(), yaml)
}

fn errors_in(dir: &Path, yaml: &str) -> String {
    let file = dir.join("suite.yaml");
    std::fs::write(&file, yaml).unwrap();
    match Plan::from_file(&file, &options(dir)) {
        Ok(_) => panic!("suite was accepted:\n{yaml}"),
        Err(e @ SuiteError::Invalid(_)) => {
            e.to_string().replace(&dir.display().to_string(), "[DIR]")
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

const BASE: &str = "name: t
models:
  - id: mlp
    source: {synthetic: {kind: mlp, width: 8, depth: 1}}
backends: [mock]
";

#[test]
fn expansion_order_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("suite.yaml");
    std::fs::write(
        &file,
        "name: order
models:
  - id: mlp
    source: {synthetic: {kind: mlp, width: 8, depth: 1}}
  - id: enc
    source: {synthetic: {kind: encoder, width: 8, depth: 1}}
    batch: [2]
backends: [mock, mock-ref]
threads: [1, 2]
batch: [1, 4]
dims: {seq: [3, 5]}
",
    )
    .unwrap();
    let plan = Plan::from_file(&file, &options(dir.path())).unwrap();
    let lines: Vec<String> = plan
        .cases()
        .map(|c| {
            let shapes: Vec<String> = c
                .inputs
                .iter()
                .map(|t| format!("{}{:?}", t.name, t.shape))
                .collect();
            format!("{:>2} {} {}", c.index, c.id, shapes.join(" "))
        })
        .collect();
    assert_eq!(plan.case_count(), lines.len());
    insta::assert_snapshot!(lines.join("\n"));
}

#[test]
fn defaults_are_documented_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("suite.yaml");
    std::fs::write(&file, BASE).unwrap();
    let plan = Plan::from_file(&file, &options(dir.path())).unwrap();
    assert_eq!(plan.threads, vec![1]);
    assert_eq!(plan.check.reference, "ort");
    assert_eq!(plan.measure.target_ci, 0.01);
    assert_eq!(plan.case_count(), 1);
}

/// A model's own `backend_options` go over the suite's field by field and
/// reach the Python baseline where they are ORT's; the other models keep
/// the suite's.
#[test]
fn a_models_backend_options_go_over_the_suites() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("suite.yaml");
    std::fs::write(
        &file,
        "name: opts
models:
  - id: keep
    source: {synthetic: {kind: mlp, width: 8, depth: 1}}
  - id: flush
    source: {synthetic: {kind: mlp, width: 8, depth: 1}}
    backend_options: {ort: {denormals: flush}}
backends: [mock, ort]
backend_options:
  ort: {optimization: basic}
",
    )
    .unwrap();
    let plan = Plan::from_file(&file, &options(dir.path())).unwrap();
    let of = |id: &str| {
        let m = plan.models.iter().find(|m| m.id == id).unwrap();
        serde_json::to_value(&m.backend_options).unwrap()
    };
    assert_eq!(
        of("keep"),
        serde_json::json!({
            "ort": {"optimization": "basic"},
            "python-onnxruntime": {"optimization": "basic"},
        })
    );
    assert_eq!(
        of("flush"),
        serde_json::json!({
            "ort": {"optimization": "basic", "denormals": "flush"},
            "python-onnxruntime": {"optimization": "basic", "denormals": "flush"},
        })
    );
    // Both entries feed the same inputs: one group, compared in its rounds.
    let keys: std::collections::BTreeSet<String> = plan.cases().map(|c| c.group_key()).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
}

/// Two models with different inputs share rounds only when given one
/// `group`; an id or group with a character the case grammar uses is an
/// error at its position.
#[test]
fn a_group_puts_models_with_other_inputs_in_one_rounds_group() {
    let dir = tempfile::tempdir().unwrap();
    let suite = |group: &str| {
        format!(
            "name: g
models:
  - id: narrow
    source: {{synthetic: {{kind: mlp, width: 8, depth: 1}}}}{group}
  - id: wide
    source: {{synthetic: {{kind: mlp, width: 16, depth: 1}}}}{group}
backends: [ort]
"
        )
    };
    let keys = |yaml: String| {
        let file = dir.path().join("suite.yaml");
        std::fs::write(&file, yaml).unwrap();
        let plan = Plan::from_file(&file, &options(dir.path())).unwrap();
        plan.cases()
            .map(|c| c.group_key())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    assert_eq!(keys(suite("")), 2);
    assert_eq!(keys(suite("\n    group: mlps")), 1);
    let err = errors(&suite("\n    group: my/mlps"));
    assert!(
        err.contains("suite.yaml:5:5: models[0].group: `my/mlps`: use only letters"),
        "{err}"
    );
    let err = errors(&suite("").replace("id: wide", "id: wide@2"));
    assert!(
        err.contains("suite.yaml:5:5: models[1].id: `wide@2`: use only letters"),
        "{err}"
    );
}

#[test]
fn typo_in_a_key_names_line_and_column() {
    insta::assert_snapshot!(errors(&format!("{BASE}thread: [2]\n")));
}

#[test]
fn wrong_type_names_the_field() {
    insta::assert_snapshot!(errors(&format!("{BASE}threads: [1, two]\n")));
}

#[test]
fn bad_duration_names_the_field() {
    insta::assert_snapshot!(errors(&format!("{BASE}measure:\n  max_time: 5 parsecs\n")));
}

#[test]
fn measure_limits_are_reported_together() {
    insta::assert_snapshot!(errors(&format!(
        "{BASE}measure:\n  rounds: 2\n  processes: 33\n"
    )));
}

#[test]
fn unknown_backend_and_reference_are_reported_together() {
    insta::assert_snapshot!(errors(
        "name: t\nmodels:\n  - id: m\n    source: {synthetic: {kind: mlp, width: 8, depth: 1}}\nbackends: [mock, onnxruntime]\ncheck:\n  reference: torch\n"
    ));
}

#[test]
fn missing_model_file_names_the_path() {
    insta::assert_snapshot!(errors(
        "name: t\nmodels:\n  - id: m\n    source:\n      onnx: models/nope.onnx\nbackends: [mock]\n"
    ));
}

#[test]
fn corrupt_model_file_names_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.onnx"),
        b"\x08\x07this is not a protobuf \xff\xff\xff",
    )
    .unwrap();
    insta::assert_snapshot!(errors_in(
        dir.path(),
        "name: t\nmodels:\n  - id: m\n    source: {onnx: bad.onnx}\nbackends: [mock]\n"
    ));
}

#[test]
fn input_spec_that_does_not_match_the_model() {
    insta::assert_snapshot!(errors(
        "name: t
models:
  - id: m
    source: {synthetic: {kind: mlp, width: 8, depth: 1}}
    inputs:
      - name: input_ids
        dtype: i64
        shape: [batch, 8]
      - name: x
        dtype: f32
        shape: [batch, 9, seq]
backends: [mock]
"
    ));
}

#[test]
fn symbolic_dim_without_values() {
    insta::assert_snapshot!(errors(
        "name: t\nmodels:\n  - id: e\n    source: {synthetic: {kind: encoder, width: 8, depth: 1}}\nbackends: [mock]\n"
    ));
}

#[test]
fn yaml_syntax_error_has_a_location() {
    insta::assert_snapshot!(errors("name: t\nmodels: [\n  - id: m\n"));
}

#[test]
fn source_needs_exactly_one_kind() {
    insta::assert_snapshot!(errors(
        "name: t\nmodels:\n  - id: m\n    source: {}\nbackends: [mock]\nthreads: [0]\n"
    ));
}

#[test]
fn batch_wait_is_for_http_servers_and_at_most_a_second() {
    let e = errors(&format!(
        "{BASE}scenarios:\n  - {{server: {{qps: [5], batch_wait: 5ms}}}}\n  - {{http: {{qps: [5], batch_wait: 2s}}}}\n"
    ));
    assert!(
        e.contains(
            "scenarios[0].server.batch_wait: only `http` scenarios have a server to batch in"
        ),
        "{e}"
    );
    assert!(
        e.contains("scenarios[1].http.batch_wait: must be at most 1s"),
        "{e}"
    );
}
