//! Interleaved rounds with the mock backend, in-process: round scheduling,
//! paired ratios under injected drift, a case failing mid-group, resume.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use handoff_backend::Registry;
use handoff_backend::mock::MockBackend;
use handoff_runner::pairs::PairKind;
use handoff_runner::{
    Comparison, Observer, Quiet, ResultRecord, RunOptions, Runner, Status, read_comparisons,
    read_results,
};
use handoff_stats::rounds::Verdict;
use handoff_suite::{Plan, PlanOptions};

fn registry() -> Registry {
    Registry::new()
        .with(Box::new(MockBackend::new("mock")))
        .with(Box::new(MockBackend::new("mock-ref")))
}

/// Two copies of one generated model (`a`, `b`) and a third id (`c`), the
/// mock backend at 1 and 2 threads.
fn plan(dir: &Path, measure: &str, mock: &str) -> Plan {
    let file = dir.join("suite.yaml");
    std::fs::write(
        &file,
        format!(
            "name: rounds
models:
  - id: a
    source: {{synthetic: {{kind: mlp, width: 8, depth: 1}}}}
  - id: b
    source: {{synthetic: {{kind: mlp, width: 8, depth: 1}}}}
  - id: c
    source: {{synthetic: {{kind: mlp, width: 8, depth: 1}}}}
backends: [mock]
threads: [1, 2]
batch: [1]
isolation: none
check: {{reference: mock-ref, atol: 1e-5, rtol: 0}}
measure: {measure}
backend_options: {{mock: {mock}}}
"
        ),
    )
    .unwrap();
    load(dir)
}

/// The plan of the suite written in `dir`.
fn load(dir: &Path) -> Plan {
    Plan::from_file(
        &dir.join("suite.yaml"),
        &PlanOptions {
            model_cache: dir.join("cache"),
            known_backends: vec!["mock".into(), "mock-ref".into()],
            tools: None,
            preparation: handoff_suite::Preparation::Build,
        },
    )
    .unwrap()
}

fn run_with(plan: &Plan, options: RunOptions) -> (Vec<ResultRecord>, Vec<Comparison>) {
    let out = options.out_dir.clone();
    let reg = registry();
    Runner::new(plan, &reg, options).run(&mut Quiet).unwrap();
    (
        read_results(&out.join("results.jsonl")).unwrap().records,
        read_comparisons(&out.join("comparisons.jsonl")),
    )
}

fn find<'c>(all: &'c [Comparison], kind: PairKind, a: &str, b: &str) -> &'c Comparison {
    all.iter()
        .find(|c| c.kind == kind && c.a == a && c.b == b && c.metric == "p50")
        .unwrap_or_else(|| panic!("no {kind:?} pair {a} -> {b} in {all:#?}"))
}

#[test]
fn every_case_runs_once_per_round_in_a_seeded_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(
        dir.path(),
        "{warmup: 1ms, min_iterations: 5, min_time: 60ms, max_time: 120ms, target_ci: 0.0001, rounds: 6, settle: 0ms}",
        "{latency_us: 500}",
    );
    let (records, comparisons) = run_with(&p, RunOptions::new(dir.path().join("o1")));
    assert_eq!(records.len(), 6);
    let info: Vec<_> = records.iter().map(|r| r.rounds.clone().unwrap()).collect();
    // One group: the same inputs, every model and thread count.
    assert!(info.iter().all(|i| i.group == info[0].group));
    let rounds = info[0].block_runs.len();
    assert!(rounds >= 6, "{rounds} rounds");
    for r in 0..rounds {
        let mut slots: Vec<usize> = info.iter().map(|i| i.slots[r]).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..6).collect::<Vec<_>>(), "round {r}");
        assert!(info.iter().all(|i| i.block_runs[r] >= 1));
    }
    // Not the same order every round, and balanced: in the first six
    // rounds (a cycle for six cases) every case took every place once.
    assert!((1..rounds).any(|r| info[0].slots[r] != info[0].slots[0]));
    for i in &info {
        let mut places = i.slots[..6].to_vec();
        places.sort_unstable();
        assert_eq!(places, (0..6).collect::<Vec<_>>(), "{:?}", i.slots);
    }
    // Two workers per case by default, used in turn; the spread between
    // them is estimated for each case and kept with it.
    for i in &info {
        assert_eq!(i.processes, 2);
        assert_eq!(i.process, (0..rounds).map(|r| r % 2).collect::<Vec<_>>());
        assert!(
            i.process_var.is_some_and(|v| v >= 0.0),
            "{:?}",
            i.process_var
        );
    }
    for r in &records {
        let i = r.rounds.as_ref().unwrap();
        assert_eq!(r.samples_ms.len(), i.block_runs.iter().sum::<usize>());
        assert!(r.stop.is_some());
    }
    // Every pair a report shows: each copy against the first model, two
    // threads against one.
    for t in [1, 2] {
        find(
            &comparisons,
            PairKind::Model,
            &format!("a/mock/cpu/t{t}/b1"),
            &format!("b/mock/cpu/t{t}/b1"),
        );
    }
    find(
        &comparisons,
        PairKind::Threads,
        "c/mock/cpu/t1/b1",
        "c/mock/cpu/t2/b1",
    );
    // One worker per case: nothing to estimate the spread from.
    let one = plan(
        dir.path(),
        "{warmup: 1ms, min_iterations: 5, min_time: 30ms, max_time: 60ms, target_ci: 0.0001, rounds: 3, processes: 1}",
        "{latency_us: 500}",
    );
    let (single, _) = run_with(&one, RunOptions::new(dir.path().join("o3")));
    for r in &single {
        let i = r.rounds.as_ref().unwrap();
        assert_eq!((i.processes, i.process_var), (1, None));
        assert!(i.process.iter().all(|k| *k == 0));
    }
    // The same seed replays the same orders.
    let (again, _) = run_with(&p, RunOptions::new(dir.path().join("o2")));
    assert_eq!(
        again[0].rounds.as_ref().unwrap().order_seed,
        info[0].order_seed
    );
    let n = rounds.min(again[0].rounds.as_ref().unwrap().slots.len());
    assert_eq!(
        again[0].rounds.as_ref().unwrap().slots[..n],
        info[0].slots[..n]
    );
    // The canary ran after every round and is kept with the run.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("o1/run.json")).unwrap()).unwrap();
    assert_eq!(meta["measurement"], "interleaved");
    let canary = meta["canary"].as_array().unwrap();
    assert_eq!(canary.len(), rounds);
    assert!(canary.iter().all(|c| c["ms"].as_f64().unwrap() > 0.0));
}

#[test]
fn paired_ratios_cancel_drift_that_widens_each_cases_own_interval() {
    // +-30% drift with a 3 s period (slow against a round, as a machine's
    // drift is); `c` is 10% slower.
    let mock =
        "{latency_us: 1000, drift: 0.3, drift_period_ms: 3000, slowdown: 1.10, slowdown_model: c}";
    let measure = "{warmup: 1ms, min_iterations: 5, min_time: 1200ms, max_time: 1200ms, target_ci: 0.0001, rounds: 16, settle: 0ms}";
    let dir = tempfile::tempdir().unwrap();
    let p = plan(dir.path(), measure, mock);
    let (records, comparisons) = run_with(
        &p,
        RunOptions {
            filters: vec!["/t1/".into()],
            ..RunOptions::new(dir.path().join("o"))
        },
    );
    assert!(records.iter().all(|r| r.status == Status::Ok));
    let aa = find(
        &comparisons,
        PairKind::Model,
        "a/mock/cpu/t1/b1",
        "b/mock/cpu/t1/b1",
    );
    assert!(aa.ci95[0] <= 1.0 && 1.0 <= aa.ci95[1], "{aa:?}");
    assert_eq!(aa.verdict, Verdict::NoMeasurableDifference);
    assert!(aa.half_width() < 0.05, "{aa:?}");
    let planted = find(
        &comparisons,
        PairKind::Model,
        "a/mock/cpu/t1/b1",
        "c/mock/cpu/t1/b1",
    );
    assert_eq!(planted.verdict, Verdict::Slower, "{planted:?}");
    assert!(
        planted.ci95[0] < 1.10 && 1.10 < planted.ci95[1],
        "{planted:?}"
    );
    // The per-case CI from block medians is wide (the drift is real); the
    // ratio's is narrow.
    let a = records.iter().find(|r| r.case.model == "a").unwrap();
    let l = a.latency_ms.as_ref().unwrap();
    let case_half = (l.p50_ci95[1] - l.p50_ci95[0]) / 2.0 / l.p50;
    assert!(
        case_half > 2.0 * aa.half_width(),
        "case ±{case_half}, pair {aa:?}"
    );
}

#[test]
fn a_case_failing_mid_group_keeps_its_cell_and_the_rest_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(
        dir.path(),
        "{warmup: 1ms, min_iterations: 5, min_time: 600ms, max_time: 600ms, target_ci: 0.0001, rounds: 10, settle: 0ms}",
        "{latency_us: 500, fail: run-later, fail_model: b}",
    );
    let (records, comparisons) = run_with(
        &p,
        RunOptions {
            filters: vec!["/t1/".into()],
            ..RunOptions::new(dir.path().join("o"))
        },
    );
    let b = records.iter().find(|r| r.case.model == "b").unwrap();
    assert_eq!(b.status, Status::Failed);
    let why = b.reason.as_deref().unwrap();
    assert!(
        why.contains("mock run failure after 0.3 s") && why.contains("timed samples from"),
        "{why}"
    );
    let info = b.rounds.as_ref().unwrap();
    let ran = info.block_runs.iter().filter(|n| **n > 0).count();
    assert!(ran > 0 && ran < info.block_runs.len(), "{info:?}");
    for m in ["a", "c"] {
        let r = records.iter().find(|r| r.case.model == m).unwrap();
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert!(r.rounds.as_ref().unwrap().block_runs.iter().all(|n| *n > 0));
    }
    // No ratio for the failed case; the others are still compared.
    assert!(comparisons.iter().all(|c| !c.b.starts_with("b/")));
    find(
        &comparisons,
        PairKind::Model,
        "a/mock/cpu/t1/b1",
        "c/mock/cpu/t1/b1",
    );
}

/// Sets the stop flag once the first group has been written.
struct StopAfterFirst(Arc<AtomicBool>);

impl Observer for StopAfterFirst {
    fn case_finished(&mut self, _: &ResultRecord) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn an_interrupted_interleaved_run_resumes_the_groups_it_had_not_finished() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("suite.yaml");
    plan(
        dir.path(),
        "{warmup: 1ms, min_iterations: 3, min_time: 30ms, max_time: 30ms, target_ci: 0.0001, rounds: 3, settle: 0ms}",
        "{latency_us: 200}",
    );
    // Batch 1 and 2: two groups.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("batch: [1]", "batch: [1, 2]");
    std::fs::write(&file, text).unwrap();
    let p = load(dir.path());
    let out = dir.path().join("o");
    let stop = Arc::new(AtomicBool::new(false));
    let reg = registry();
    let summary = Runner::new(
        &p,
        &reg,
        RunOptions {
            stop: Some(Arc::clone(&stop)),
            ..RunOptions::new(out.clone())
        },
    )
    .run(&mut StopAfterFirst(Arc::clone(&stop)))
    .unwrap();
    assert!(summary.interrupted);
    let first = read_results(&out.join("results.jsonl")).unwrap().records;
    // The whole first group, nothing of the second.
    assert_eq!(first.len(), 6, "{first:#?}");
    let group = first[0].rounds.as_ref().unwrap().group.clone();
    assert!(
        first
            .iter()
            .all(|r| r.rounds.as_ref().unwrap().group == group)
    );
    let summary = Runner::new(
        &p,
        &reg,
        RunOptions {
            resume: true,
            ..RunOptions::new(out.clone())
        },
    )
    .run(&mut Quiet)
    .unwrap();
    assert_eq!(summary.resumed, 6);
    let all = read_results(&out.join("results.jsonl")).unwrap().records;
    assert_eq!(all.len(), 12);
    let mut ids: Vec<&str> = all.iter().map(|r| r.case.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 12);
    let groups: std::collections::BTreeSet<String> =
        read_comparisons(&out.join("comparisons.jsonl"))
            .into_iter()
            .map(|c| c.group)
            .collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
}
