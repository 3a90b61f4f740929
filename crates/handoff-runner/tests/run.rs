//! The runner with mock backends, in-process: parity failures, unavailable
//! backends, streamed results.

use std::path::Path;

use handoff_backend::Registry;
use handoff_backend::mock::MockBackend;
use handoff_runner::{Quiet, RunOptions, Runner, Status, read_results};
use handoff_suite::{Plan, PlanOptions};

fn registry() -> Registry {
    Registry::new()
        .with(Box::new(MockBackend::new("mock")))
        .with(Box::new(MockBackend::new("mock-ref")))
}

fn plan(dir: &Path, extra: &str) -> Plan {
    let file = dir.join("suite.yaml");
    std::fs::write(
        &file,
        format!(
            "name: t
models:
  - id: mlp
    source: {{synthetic: {{kind: mlp, width: 8, depth: 1}}}}
backends: [mock]
batch: [1, 2]
isolation: none
check: {{reference: mock-ref, atol: 1e-5, rtol: 0}}
measure: {{warmup: 1ms, min_iterations: 5, min_time: 1ms, max_time: 200ms, target_ci: 0.5}}
{extra}"
        ),
    )
    .unwrap();
    Plan::from_file(
        &file,
        &PlanOptions {
            model_cache: dir.join("cache"),
            known_backends: vec!["mock".into(), "mock-ref".into()],
            tools: None,
            preparation: handoff_suite::Preparation::Build,
        },
    )
    .unwrap()
}

fn run(plan: &Plan, out: &Path) -> Vec<handoff_runner::ResultRecord> {
    let reg = registry();
    let runner = Runner::new(plan, &reg, RunOptions::new(out.to_owned()));
    runner.run(&mut Quiet).unwrap();
    read_results(&out.join("results.jsonl")).unwrap().records
}

#[test]
fn matching_outputs_give_ok_cells_with_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let records = run(&plan(dir.path(), ""), &dir.path().join("out"));
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r.status, Status::Ok, "{r:?}");
        let p = r.parity.as_ref().unwrap();
        assert!(p.ok && p.max_abs == 0.0);
        let lat = r.latency_ms.as_ref().unwrap();
        assert_eq!(lat.n, r.samples_ms.len());
        assert!(lat.n >= 5);
        assert!(r.throughput_items_s.unwrap() > 0.0);
        assert_eq!(r.case.scenario, "single-stream");
    }
    // The env hash on every line is the hash of env.json.
    let env: handoff_runner::machine::Fingerprint =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/env.json")).unwrap()).unwrap();
    assert!(records.iter().all(|r| r.env == env.hash()));
}

#[test]
fn outputs_off_by_more_than_tolerance_are_a_mismatch_without_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let records = run(
        &plan(dir.path(), "backend_options: {mock: {perturb: 0.001}}\n"),
        &dir.path().join("out"),
    );
    for r in &records {
        assert_eq!(r.status, Status::Mismatch);
        assert!(
            r.latency_ms.is_none() && r.throughput_items_s.is_none() && r.samples_ms.is_empty()
        );
        let p = r.parity.as_ref().unwrap();
        assert!(!p.ok && (p.max_abs - 0.001).abs() < 1e-6, "{p:?}");
        assert!(
            r.reason
                .as_ref()
                .unwrap()
                .contains("outputs differ from mock-ref")
        );
    }
}

#[test]
fn a_device_the_backend_lacks_is_unavailable_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let records = run(
        &plan(dir.path(), "devices: [cpu, cuda]\n"),
        &dir.path().join("out"),
    );
    let cuda: Vec<_> = records
        .iter()
        .filter(|r| r.case.device == handoff_backend::Device::Cuda)
        .collect();
    assert_eq!(cuda.len(), 2);
    for r in cuda {
        assert_eq!(r.status, Status::Unavailable);
        assert_eq!(r.reason.as_deref(), Some("mock backend has no GPU"));
        assert!(r.latency_ms.is_none());
    }
}

#[test]
fn backend_errors_become_cells_and_the_suite_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let records = run(
        &plan(dir.path(), "backend_options: {mock: {fail: unsupported}}\n"),
        &dir.path().join("out"),
    );
    assert!(
        records
            .iter()
            .all(|r| r.status == Status::Unsupported && r.reason.as_deref() == Some("op MockOp"))
    );
    let records = run(
        &plan(dir.path(), "backend_options: {mock: {fail: panic}}\n"),
        &dir.path().join("out2"),
    );
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| {
        r.status == Status::Failed
            && r.reason
                .as_deref()
                .unwrap()
                .contains("panic in backend: mock backend panicked on purpose")
    }));
}

#[test]
fn a_failing_reference_leaves_cells_measured_but_marked_unchecked() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(dir.path(), "");
    let reg = Registry::new().with(Box::new(MockBackend::new("mock")));
    // mock-ref is missing from this build's registry.
    let runner = Runner::new(&p, &reg, RunOptions::new(dir.path().join("o")));
    runner.run(&mut Quiet).unwrap();
    let records = read_results(&dir.path().join("o/results.jsonl"))
        .unwrap()
        .records;
    for r in &records {
        assert_eq!(r.status, Status::Ok);
        assert!(r.parity.is_none());
        assert!(
            r.reason
                .as_deref()
                .unwrap()
                .starts_with("parity unchecked: reference backend mock-ref unavailable"),
            "{:?}",
            r.reason
        );
    }
}

#[test]
fn a_torn_last_line_is_ignored_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run(&plan(dir.path(), ""), &out);
    let path = out.join("results.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"schema\":1,\"suite\":\"t\",\"ind");
    std::fs::write(&path, text).unwrap();
    let read = read_results(&path).unwrap();
    assert_eq!(read.records.len(), 2);
    assert!(read.torn_last_line);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.jsonl");
    std::fs::write(&path, "{\"schema\": 99}\n").unwrap();
    let err = read_results(&path).unwrap_err().to_string();
    assert!(err.contains("schema version 99 is newer"), "{err}");
}

#[test]
fn filters_select_cases_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(dir.path(), "");
    let reg = registry();
    let runner = Runner::new(
        &p,
        &reg,
        RunOptions {
            filters: vec!["/b2".into()],
            ..RunOptions::new(dir.path().join("o"))
        },
    );
    let ids: Vec<String> = runner.selected().map(|c| c.id).collect();
    assert_eq!(ids, vec!["mlp/mock/cpu/t1/b2".to_owned()]);
}
