//! The `handoff` binary end to end: exit codes, process isolation (a crash
//! or hang in one case is a result, the rest intact), and the real runtimes
//! agreeing on generated models.

mod common;

use std::path::Path;
use std::process::Command;

use common::{handoff, handoff_env, run_ok, write_tokenizer};

use handoff_runner::{Status, read_results};

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).unwrap();
    name.to_owned()
}

const QUICK: &str =
    "measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 300ms, target_ci: 0.2}\n";

#[test]
fn bad_suite_exits_2_with_a_located_message() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write(
        dir.path(),
        "s.yaml",
        "name: t\nmodels:\n  - id: m\n    source: {synthetic: {kind: mlp, width: 8, depth: 1}}\nbackends: [mock]\nthread: [2]\n",
    );
    for cmd in [vec!["validate", &suite], vec!["run", &suite]] {
        let out = handoff(&cmd, dir.path());
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("s.yaml:6:1: thread: unknown field `thread`"),
            "{err}"
        );
    }
    let out = handoff(&["run", "missing.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read suite missing.yaml"));
}

/// Runs handoff with a standard output whose reader has already gone, as
/// behind `| head` once head has its lines.
fn handoff_into_closed_pipe(args: &[&str], dir: &Path) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(args)
        .current_dir(dir)
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{args:?}: {err}"
    );
    out
}

#[test]
fn schema_and_dry_run_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let out = handoff(&["schema"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(schema["properties"]["backends"].is_object());
    let suite = write(
        dir.path(),
        "s.yaml",
        "name: t\nmodels:\n  - id: m\n    source: {synthetic: {kind: mlp, width: 8, depth: 1}}\nbackends: [mock, mock-ref]\nthreads: [1, 2]\n",
    );
    let out = handoff(&["run", &suite, "--dry-run"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("4 cases") && text.contains("m/mock-ref/cpu/t2/b1"),
        "{text}"
    );
    assert!(
        !dir.path().join("reports").exists(),
        "a dry run writes nothing"
    );
    // It lists what --filter and --shard would run, not the whole suite.
    let out = handoff(
        &["run", &suite, "--dry-run", "-f", "/t2/", "--shard", "2/2"],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).filter(|w| w.starts_with("m/")))
        .collect();
    assert_eq!(ids, ["m/mock/cpu/t2/b1", "m/mock-ref/cpu/t2/b1"], "{text}");
    assert!(text.contains("4 cases (2 selected)"), "{text}");
    // A reader that stops early ends the output, not the command.
    for args in [
        vec!["schema"],
        vec!["list-backends"],
        vec!["run", &suite, "--dry-run"],
    ] {
        assert_eq!(
            handoff_into_closed_pipe(&args, dir.path()).status.code(),
            Some(0)
        );
    }
    // An error told into a stderr that has gone is still exit 2, not a
    // panic's 101.
    let bad = write(dir.path(), "bad.yaml", "name: t\nmodels: 3\n");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(["validate", &bad])
        .current_dir(dir.path())
        .stderr(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A cause is said once, though the library's message already holds it.
    let out = handoff(&["validate", "nope.yaml"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "error: cannot read suite nope.yaml: No such file or directory (os error 2)"
    );
}

fn crash_suite(dir: &Path, fail: &str) -> Vec<handoff_runner::ResultRecord> {
    let suite = write(
        dir,
        "s.yaml",
        &format!(
            "name: t\nmodels:\n  - id: m\n    source: {{synthetic: {{kind: mlp, width: 8, depth: 1}}}}\n\
             backends: [mock-ref, mock]\nbatch: [1, 2]\ncheck: {{reference: mock-ref}}\ntimeout: 3s\n\
             backend_options: {{mock: {{fail: {fail}}}}}\n{QUICK}"
        ),
    );
    let out = handoff(&["run", &suite, "--out", "out", "--quiet"], dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    read_results(&dir.join("out/results.jsonl"))
        .unwrap()
        .records
}

#[test]
fn an_aborting_backend_is_a_failed_cell_and_the_others_are_intact() {
    let dir = tempfile::tempdir().unwrap();
    let records = crash_suite(dir.path(), "abort");
    assert_eq!(records.len(), 4);
    for r in &records {
        if r.case.backend == "mock" {
            assert_eq!(r.status, Status::Failed);
            assert!(
                r.reason.as_deref().unwrap().contains("SIGABRT"),
                "{:?}",
                r.reason
            );
        } else {
            assert_eq!(r.status, Status::Ok, "{r:?}");
            assert!(r.latency_ms.is_some());
        }
    }
}

#[test]
fn a_hanging_backend_times_out_and_the_others_are_intact() {
    let dir = tempfile::tempdir().unwrap();
    let records = crash_suite(dir.path(), "hang");
    assert_eq!(records.len(), 4);
    for r in &records {
        if r.case.backend == "mock" {
            assert_eq!(r.status, Status::Timeout, "{r:?}");
            assert!(r.wall_s.unwrap() < 10.0);
        } else {
            assert_eq!(r.status, Status::Ok);
        }
    }
}

#[test]
fn a_panicking_backend_in_a_child_is_a_failed_cell() {
    let dir = tempfile::tempdir().unwrap();
    let records = crash_suite(dir.path(), "panic");
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r.case.backend == "mock")
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(failed.iter().all(|r| r.status == Status::Failed
        && r.reason.as_deref().unwrap().contains("panicked on purpose")));
}

/// The three real runtimes on the three generated model families, in child
/// processes at 1 and 2 threads: every output matches ORT's, and the one op
/// candle-onnx lacks is reported as such.
#[test]
fn real_backends_agree_on_generated_models() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write(
        dir.path(),
        "s.yaml",
        &format!(
            "name: real\nmodels:\n\
             \x20 - id: mlp\n    source: {{synthetic: {{kind: mlp, width: 16, depth: 2}}}}\n\
             \x20 - id: conv\n    source: {{synthetic: {{kind: conv, width: 4, depth: 2}}}}\n\
             \x20 - id: enc\n    source: {{synthetic: {{kind: encoder, width: 16, depth: 1}}}}\n\
             backends: [ort, tract, candle-onnx]\nthreads: [1, 2]\nbatch: [1, 3]\ndims: {{seq: [5]}}\n{QUICK}"
        ),
    );
    let records = run_ok(dir.path(), &suite, "out");
    assert_eq!(records.len(), 3 * 3 * 2 * 2);
    for r in &records {
        if r.case.model == "enc" && r.case.backend == "candle-onnx" {
            assert_eq!(r.status, Status::Unsupported);
            assert_eq!(r.reason.as_deref(), Some("op LayerNormalization"));
            continue;
        }
        assert_eq!(r.status, Status::Ok, "{}: {:?}", r.case.id, r.reason);
        let p = r.parity.as_ref().expect("parity checked");
        assert!(p.ok && p.max_abs < 1e-4, "{}: {p:?}", r.case.id);
        assert!(r.case.backend_version.is_some());
    }
    let summary = std::fs::read_to_string(dir.path().join("out/summary.md")).unwrap();
    assert!(summary.contains("## mlp") && summary.contains("candle-onnx (interp.)"));
}

#[test]
fn a_tiny_bert_converts_and_runs_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 32, 2, 4, 7).unwrap();
    write_tokenizer(&bert);
    // `handoff convert`: the converted graph agrees with candle's BERT.
    let out = handoff(
        &[
            "convert",
            "bert",
            "--out",
            "tiny.onnx",
            "--seq",
            "16",
            "--lower-for",
            "candle-onnx",
        ],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("conversion check (32 tokenised sentences, seq 16)")
            && text.contains("passed"),
        "{text}"
    );
    assert!(
        text.contains("lowered for candle-onnx") && text.contains("(LayerNormalization)"),
        "{text}"
    );
    let prov: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("tiny.onnx.provenance.json")).unwrap(),
    )
    .unwrap();
    let check = &prov["checks"][0];
    assert!(check["passed"].as_bool().unwrap() && check["max_abs"].as_f64().unwrap() <= 1e-4);

    // The same model as a suite source, on all four backends.
    let suite = write(
        dir.path(),
        "s.yaml",
        &format!(
            "name: bert\nmodels:\n  - id: tiny\n    source: {{hf: bert}}\n    lower_for: [candle-onnx]\n    text: {{sentences: [w4 w5 w6, w7 w8]}}\n\
             backends: [ort, tract, candle-onnx, candle-native]\nthreads: [1, 2]\nbatch: [2]\ndims: {{seq: [8]}}\n{QUICK}"
        ),
    );
    let records = run_ok(dir.path(), &suite, "out");
    assert_eq!(records.len(), 4 * 2 + 2);
    for r in &records {
        if r.case.model == "tiny" && r.case.backend == "candle-onnx" {
            assert_eq!(
                (r.status, r.reason.as_deref()),
                (Status::Unsupported, Some("op LayerNormalization"))
            );
        } else {
            assert_eq!(r.status, Status::Ok, "{}: {:?}", r.case.id, r.reason);
            assert!(r.parity.as_ref().unwrap().ok);
        }
    }
    assert!(records.iter().any(|r| {
        r.case.model == "tiny+lowered"
            && r.case
                .model_source
                .ends_with("+lowered(LayerNormalization)")
    }));
}

/// `validate` and `run --dry-run` check a suite without downloading,
/// converting, generating, quantising or running a model: they say what
/// `handoff run` would build, and `handoff prepare` builds it.
#[test]
fn validate_and_dry_run_build_nothing_and_prepare_builds_what_they_list() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bert = d.join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 16, 1, 2, 3).unwrap();
    common::write_tokenizer(&bert);
    let suite = |far: &str| {
        format!(
            "name: p
models:
  - id: mlp
    source: {{synthetic: {{kind: mlp, width: 32, depth: 1}}}}
    variants: [fp32, int8-dynamic]
    min_cosine: 0.9
  - id: tiny
    source: {{hf: bert}}
{far}backends: [ort]
dims: {{seq: [8]}}
"
        )
    };
    let far = "  - id: far
    source: {pypi: {package: handoff-no-such-package, version: 0.0.1, sha256: '0000000000000000000000000000000000000000000000000000000000000000', path: m}}
";
    std::fs::write(d.join("s.yaml"), suite(far)).unwrap();
    let listed = |args: &[&str]| common::handoff_ok(args, d);
    for args in [&["validate", "s.yaml"][..], &["run", "s.yaml", "--dry-run"]] {
        let text = listed(args);
        for want in [
            "still to prepare",
            "far: download pypi:handoff-no-such-package==0.0.1",
            "mlp: generate",
            "mlp@int8-dynamic: build it and check it against fp32",
            "tiny: convert",
            "tiny: check the converted model against its source",
        ] {
            assert!(text.contains(want), "{args:?}: {want}\n{text}");
        }
        // The models that need no download are read (the HF directory
        // converted in memory): their cases are listed.
        assert!(text.contains("tiny/ort/cpu/t1/b1/seq=8"), "{text}");
        assert!(!text.contains("mlp@int8-dynamic/ort"), "{text}");
        assert!(!d.join("cache").exists(), "{args:?} wrote into the cache");
    }
    // A model not fetched yet still has what the suite says of it checked.
    let wrong = format!("{far}    backends: [tract]\n");
    std::fs::write(d.join("s.yaml"), suite(&wrong)).unwrap();
    let o = handoff(&["validate", "s.yaml"], d);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("models[2].backends[0]: `tract` is not among the suite's backends"),
        "{err}"
    );
    std::fs::write(d.join("s.yaml"), suite("")).unwrap();
    let prepared = listed(&["prepare", "s.yaml"]);
    assert!(prepared.contains("mlp@int8-dynamic/ort"), "{prepared}");
    assert!(!prepared.contains("still to prepare"), "{prepared}");
    // Now everything is there: validate lists the same cases, builds
    // nothing and has nothing left to say.
    let files = |dir: &Path| {
        let mut v: Vec<_> = walkdir(dir);
        v.sort();
        v
    };
    let before = files(&d.join("cache"));
    assert!(
        before.iter().any(|p| p.contains(".int8-dynamic.onnx ")),
        "{before:?}"
    );
    let text = listed(&["validate", "s.yaml"]);
    assert!(!text.contains("still to prepare"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains("/ort/cpu/")).count(),
        prepared.lines().filter(|l| l.contains("/ort/cpu/")).count()
    );
    assert_eq!(files(&d.join("cache")), before);
}

/// A suite may read a model from anywhere, and `validate` says which files
/// lie outside the suite's directory tree.
#[test]
fn validate_names_files_read_from_outside_the_suites_directory() {
    use handoff_onnx::synthetic::{Kind, SyntheticSpec};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = SyntheticSpec {
        kind: Kind::Mlp,
        width: 8,
        depth: 1,
        seed: 0,
    };
    for at in ["theirs/m.onnx", "suites/own.onnx"] {
        std::fs::create_dir_all(d.join(at).parent().unwrap()).unwrap();
        handoff_onnx::builder::write_model(&spec.build(), &d.join(at)).unwrap();
    }
    std::fs::write(
        d.join("suites/s.yaml"),
        "name: o\nmodels:\n  - id: far\n    source: {onnx: ../theirs/m.onnx}\n  - id: near\n    source: {onnx: own.onnx}\nbackends: [ort]\n",
    )
    .unwrap();
    let text = common::handoff_ok(&["validate", "suites/s.yaml"], d);
    let far = d.join("theirs/m.onnx").canonicalize().unwrap();
    assert!(
        text.contains(&format!(
            "reads from outside the suite's directory: models[0].source.onnx: {}",
            far.display()
        )),
        "{text}"
    );
    assert!(!text.contains("models[1].source"), "{text}");
}

/// Files under `dir` (path, size, modified), recursively.
fn walkdir(dir: &Path) -> Vec<String> {
    common::walk(dir)
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).unwrap();
            format!("{} {} {:?}", p.display(), m.len(), m.modified().unwrap())
        })
        .collect()
}

#[test]
fn a_tokenizer_that_does_not_parse_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 8, 1, 2, 7).unwrap();
    std::fs::write(bert.join("tokenizer.json"), "{ not json").unwrap();
    let suite = write(
        dir.path(),
        "s.yaml",
        "name: t\nmodels:\n  - id: m\n    source: {hf: bert}\nbackends: [ort]\ndims: {seq: [8]}\n",
    );
    let out = handoff(&["validate", &suite], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("s.yaml:4:5: models[0].source:")
            && err.contains("tokenizer.json: not a tokenizer.json"),
        "{err}"
    );
}

#[test]
fn an_unsupported_architecture_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("gpt");
    handoff_convert::bert::write_tiny_bert(&bert, 8, 1, 2, 7).unwrap();
    let cfg = std::fs::read_to_string(bert.join("config.json"))
        .unwrap()
        .replace("\"bert\"", "\"gpt2\"");
    std::fs::write(bert.join("config.json"), cfg).unwrap();
    let out = handoff(&["convert", "gpt", "--out", "g.onnx"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "config.json: field `model_type`: `gpt2` is not supported (supported: bert, distilbert)"
        ),
        "{err}"
    );
    assert!(!dir.path().join("g.onnx").exists());
}

/// The mock's latency is a wall-clock wait, which the other tests running
/// beside it do not change: they must not mark its cases busy.
const QUIET: &[(&str, &str)] = &[("HANDOFF_BUSY_CORES", "100")];

fn mock_run(dir: &Path, out: &str, slowdown: f64, extra_args: &[&str]) {
    let suite = write(
        dir,
        &format!("{out}.yaml"),
        &format!(
            "name: gate\nmodels:\n  - id: a\n    source: {{synthetic: {{kind: mlp, width: 8, depth: 1, seed: 1}}}}\n\
             \x20 - id: b\n    source: {{synthetic: {{kind: mlp, width: 8, depth: 1, seed: 2}}}}\n\
             backends: [mock]\ncheck: {{reference: mock}}\nisolation: none\n\
             backend_options: {{mock: {{latency_us: 300, slowdown: {slowdown}, slowdown_model: b}}}}\n\
             measure: {{warmup: 20ms, min_iterations: 50, min_time: 150ms, max_time: 400ms, target_ci: 0.005}}\n"
        ),
    );
    let mut args = vec!["run", &suite, "--out", out, "--quiet"];
    args.extend_from_slice(extra_args);
    let o = handoff_env(&args, dir, QUIET);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn compare_exit_codes_and_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mock_run(d, "base", 1.0, &[]);
    mock_run(d, "slow", 1.3, &[]);
    mock_run(d, "again", 1.0, &[]);
    // Two runs of the same work: measured apart, so their numbers differ by
    // noise, which the gate must not call a change.
    let o = handoff(&["compare", "base", "again", "--json", "-"], d);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        c["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["verdict"] == "unchanged" || r["verdict"] == "inconclusive"),
        "{c}"
    );
    // A 30% slowdown of model b only.
    let o = handoff(&["compare", "base", "slow", "--markdown", "pr.md"], d);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let md = std::fs::read_to_string(d.join("pr.md")).unwrap();
    assert!(
        md.contains("1 regression(s)") && md.contains("| b/mock/cpu/t1/b1 | **regressed**"),
        "{md}"
    );
    assert!(md.contains("| a/mock/cpu/t1/b1 | unchanged"), "{md}");
    // The verdict's exit code survives a reader that stopped early.
    assert_eq!(
        handoff_into_closed_pipe(&["compare", "base", "slow"], d)
            .status
            .code(),
        Some(1)
    );
    // Baselines.
    let o = handoff(&["baseline", "save", "main", "base"], d);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        handoff(&["compare", "@main", "slow"], d).status.code(),
        Some(1)
    );
    // Bad input: exit 2.
    let o = handoff(&["compare", "base", "nope"], d);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read nope"));
    // A different environment is refused unless overridden.
    let env_path = d.join("slow/env.json");
    let mut env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&env_path).unwrap()).unwrap();
    env["logical_cores"] = 64.into();
    std::fs::write(&env_path, serde_json::to_vec(&env).unwrap()).unwrap();
    let o = handoff(&["compare", "base", "slow"], d);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("logical cores: base"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        handoff(&["compare", "base", "slow", "--allow-env-mismatch"], d)
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn shards_partition_the_cases_and_merge_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mock_run(d, "s1", 1.0, &["--shard", "1/2"]);
    mock_run(d, "s2", 1.0, &["--shard", "2/2"]);
    let o = handoff(&["merge", "s1", "s2", "--out", "all"], d);
    assert_eq!(o.status.code(), Some(0));
    let ids = |p: &str| -> Vec<String> {
        read_results(&d.join(p).join("results.jsonl"))
            .unwrap()
            .records
            .into_iter()
            .map(|r| r.case.id)
            .collect()
    };
    assert_eq!(ids("s1"), vec!["a/mock/cpu/t1/b1"]);
    assert_eq!(ids("s2"), vec!["b/mock/cpu/t1/b1"]);
    assert_eq!(ids("all").len(), 2);
    assert_eq!(
        handoff(&["run", "x.yaml", "--shard", "3/2"], d)
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn an_unbounded_allocation_hits_the_memory_limit_and_the_others_are_intact() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write(
        dir.path(),
        "s.yaml",
        &format!(
            "name: t\nmodels:\n  - id: m\n    source: {{synthetic: {{kind: mlp, width: 8, depth: 1}}}}\n\
             backends: [mock-ref, mock]\ncheck: {{reference: mock-ref}}\nmemory_limit_mb: 512\ntimeout: 20s\n\
             backend_options: {{mock: {{fail: alloc}}}}\n{QUICK}"
        ),
    );
    let records = run_ok(dir.path(), &suite, "out");
    assert_eq!(records.len(), 2);
    let mock = records.iter().find(|r| r.case.backend == "mock").unwrap();
    assert_eq!(mock.status, Status::Failed);
    assert!(
        mock.reason
            .as_deref()
            .unwrap()
            .contains("exceeded memory_limit (512 MiB)"),
        "{:?}",
        mock.reason
    );
    assert_eq!(
        records
            .iter()
            .find(|r| r.case.backend == "mock-ref")
            .unwrap()
            .status,
        Status::Ok
    );
}

fn ids(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = read_results(&path.join("results.jsonl"))
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.case.id)
        .collect();
    v.sort();
    v
}

#[test]
fn sigint_mid_suite_then_resume_gives_the_same_cases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let suite = write(
        d,
        "s.yaml",
        "name: t\nmodels:\n  - id: m\n    source: {synthetic: {kind: mlp, width: 8, depth: 1}}\n\
         backends: [mock]\ncheck: {reference: mock}\nthreads: [1, 2, 3]\nbatch: [1, 2, 3]\n\
         backend_options: {mock: {latency_us: 100}}\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 600ms, max_time: 600ms, target_ci: 0.5}\n",
    );
    let full = handoff(&["run", &suite, "--out", "full", "--quiet"], d);
    assert_eq!(full.status.code(), Some(0));
    let mut child = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(["run", &suite, "--out", "part", "--quiet"])
        .current_dir(d)
        .env("HANDOFF_MODEL_CACHE", d.join("cache"))
        .spawn()
        .unwrap();
    // Interrupt once the first group (batch 1, measured in rounds) is
    // written; the other two take seconds more.
    let results = d.join("part/results.jsonl");
    let waited = std::time::Instant::now();
    while std::fs::read_to_string(&results).map_or(0, |t| t.lines().count()) == 0
        && waited.elapsed() < std::time::Duration::from_secs(30)
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let partial = ids(&d.join("part"));
    assert!(!partial.is_empty() && partial.len() < 9, "{partial:?}");
    // The group in flight is not recorded: its workers were killed by the
    // interrupt, not by a timeout, and a resume must measure it.
    let not_ok = |out: &str| -> Vec<String> {
        read_results(&d.join(out).join("results.jsonl"))
            .unwrap()
            .records
            .into_iter()
            .filter(|r| r.status != Status::Ok)
            .map(|r| format!("{}: {:?} {:?}", r.case.id, r.status, r.reason))
            .collect()
    };
    assert_eq!(not_ok("part"), Vec::<String>::new());
    // Starting over in the same directory is refused; resuming completes it.
    assert_eq!(
        handoff(&["run", &suite, "--out", "part", "--quiet"], d)
            .status
            .code(),
        Some(2)
    );
    let resumed = handoff(&["run", &suite, "--resume", "part", "--quiet"], d);
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(ids(&d.join("part")), ids(&d.join("full")));
    assert_eq!(not_ok("part"), Vec::<String>::new());
    // A changed suite is not resumed into the old results.
    std::fs::write(
        d.join(&suite),
        std::fs::read_to_string(d.join(&suite))
            .unwrap()
            .replace("[1, 2, 3]", "[1, 2]"),
    )
    .unwrap();
    let o = handoff(&["run", &suite, "--resume", "part"], d);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the suite changed since that run"));
}

#[test]
fn a_case_killed_for_hanging_keeps_the_samples_it_gathered() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write(
        dir.path(),
        "s.yaml",
        "name: t\nmodels:\n  - id: m\n    source: {synthetic: {kind: mlp, width: 8, depth: 1}}\n\
         backends: [mock]\ncheck: {reference: mock-ref}\ntimeout: 3s\n\
         backend_options: {mock: {latency_us: 200, fail: hang-later}}\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 10s, max_time: 10s, target_ci: 0.01}\n",
    );
    let out = handoff(&["run", &suite, "--out", "out", "--quiet"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = &read_results(&dir.path().join("out/results.jsonl"))
        .unwrap()
        .records[0];
    assert_eq!(r.status, Status::Timeout);
    assert!(r.samples_ms.len() > 100, "{} samples", r.samples_ms.len());
    assert!(
        r.latency_ms.is_none(),
        "a timed-out case has no headline number"
    );
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("timed samples gathered before the kill are kept")
    );
}

#[test]
fn compare_rerun_confirms_a_real_regression_and_drops_a_fluke() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mock_run(d, "base", 1.0, &[]);
    mock_run(d, "slow", 1.3, &[]);
    let bin = env!("CARGO_BIN_EXE_handoff");
    // Same build on both sides: the "regression" was a fluke of the runs.
    let o = handoff_env(
        &[
            "compare",
            "base",
            "slow",
            "--rerun",
            "base.yaml",
            "--base-bin",
            bin,
            "--head-bin",
            bin,
        ],
        d,
        QUIET,
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("not confirmed by ABBA rerun"), "{text}");
    // A head build that really is slower (a wrapper standing in for it).
    let slow_bin = d.join("slow-build.sh");
    std::fs::write(
        &slow_bin,
        format!("#!/bin/sh\nHANDOFF_MOCK_BUILD_SLOWDOWN=1.3 exec {bin} \"$@\"\n"),
    )
    .unwrap();
    Command::new("chmod")
        .args(["+x", slow_bin.to_str().unwrap()])
        .status()
        .unwrap();
    let o = handoff_env(
        &[
            "compare",
            "base",
            "slow",
            "--rerun",
            "base.yaml",
            "--base-bin",
            bin,
            "--head-bin",
            slow_bin.to_str().unwrap(),
        ],
        d,
        QUIET,
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("confirmed by ABBA rerun"), "{text}");
}

#[test]
fn a_report_over_two_machines_keeps_their_numbers_apart() {
    let dir = tempfile::tempdir().unwrap();
    mock_run(dir.path(), "one", 1.0, &[]);
    mock_run(dir.path(), "two", 1.0, &[]);
    // Make run two come from another machine: another fingerprint and CPU.
    let two = dir.path().join("two");
    let text = std::fs::read_to_string(two.join("results.jsonl")).unwrap();
    let env = read_results(&two.join("results.jsonl")).unwrap().records[0]
        .env
        .clone();
    std::fs::write(
        two.join("results.jsonl"),
        text.replace(&env, "0000other0000000"),
    )
    .unwrap();
    std::fs::write(two.join("env.json"), r#"{"cpu_model": "Other CPU"}"#).unwrap();
    let o = handoff(&["report", "one", "two", "--out", "both"], dir.path());
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let md = std::fs::read_to_string(dir.path().join("both/summary.md")).unwrap();
    assert!(md.contains("## a [Other CPU]"), "{md}");
    assert_eq!(
        md.matches("## a [").count(),
        2,
        "one section per machine: {md}"
    );
    // The same machine twice is one dimension, not two.
    let o = handoff(&["report", "one", "one", "--out", "same"], dir.path());
    assert_eq!(o.status.code(), Some(0));
    let md = std::fs::read_to_string(dir.path().join("same/summary.md")).unwrap();
    assert!(md.contains("## a\n") && !md.contains("## a ["), "{md}");
}

/// `handoff ab`: two files of one model measured in one interleaved run on
/// real ONNX Runtime. A 4x bigger head (the PR that grew the model) is a
/// regression (exit 1), the same change the other way an improvement
/// (exit 0); the gate reads the paired ratios.
#[test]
fn ab_gates_a_grown_model_on_real_ort_from_paired_rounds() {
    use handoff_onnx::synthetic::{Kind, SyntheticSpec};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = |name: &str, width: i64, depth: i64| {
        let spec = SyntheticSpec {
            kind: Kind::Mlp,
            width,
            depth,
            seed: 0,
        };
        handoff_onnx::builder::write_model(&spec.build(), &d.join(name)).unwrap();
    };
    model("small.onnx", 256, 2);
    model("big.onnx", 512, 4);
    std::fs::write(
        d.join("suite.yaml"),
        "name: ab
models:
  - id: mlp
    source: {onnx: small.onnx}
  - id: unrelated
    source: {synthetic: {kind: mlp, width: 8, depth: 1}}
backends: [ort]
threads: [1]
batch: [8]
dims: {seq: [8]}
measure: {warmup: 50ms, min_iterations: 5, min_time: 300ms, max_time: 600ms, target_ci: 0.01, rounds: 10}
",
    )
    .unwrap();
    let ab = |base: &str, head: &str, out: &str| {
        handoff(
            &[
                "ab",
                "suite.yaml",
                "--model",
                "mlp",
                "--base",
                base,
                "--head",
                head,
                "--out",
                out,
                "--quiet",
                "--json",
                "c.json",
            ],
            d,
        )
    };
    let o = ab("small.onnx", "big.onnx", "grown");
    let md = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{md}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        md.contains("handoff ab") && md.contains("**regressed**"),
        "{md}"
    );
    assert!(md.contains("interleaved rounds"), "{md}");
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("c.json")).unwrap()).unwrap();
    let rows = c["rows"].as_array().unwrap();
    // One case: the other model of the suite is left out.
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], "mlp/ort/cpu/t1/b8");
    assert!(rows[0]["ratio"].as_f64().unwrap() > 2.0, "{rows:?}");
    assert!(
        rows[0]["note"]
            .as_str()
            .unwrap()
            .contains("model file changed"),
        "{rows:?}"
    );
    // The head's input is twice as wide, yet both were measured in the
    // same rounds: the change comes from paired rounds.
    let groups: std::collections::BTreeSet<String> =
        std::fs::read_to_string(d.join("grown/results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let r: serde_json::Value = serde_json::from_str(l).unwrap();
                r["rounds"]["group"].as_str().unwrap().to_owned()
            })
            .collect();
    assert_eq!(groups.len(), 1, "{groups:?}");
    // The same run gated again without measuring: p90, and a threshold the
    // change does not reach.
    let regate = |model: &str, extra: &[&str]| {
        let mut args = vec![
            "ab",
            "suite.yaml",
            "--model",
            model,
            "--base",
            "small.onnx",
            "--head",
            "big.onnx",
            "--out",
            "grown",
            "--gate-only",
        ];
        args.extend_from_slice(extra);
        handoff(&args, d)
    };
    let measured = std::fs::read(d.join("grown/results.jsonl")).unwrap();
    let o = regate("mlp", &["--metric", "p90", "--threshold", "1000"]);
    let md = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{md}");
    assert!(
        md.contains("(P90)") && !md.contains("**regressed**"),
        "{md}"
    );
    assert_eq!(
        std::fs::read(d.join("grown/results.jsonl")).unwrap(),
        measured
    );
    // p99 gates the same run, leaving out rounds with a host stall unless
    // `--keep-stalls`; on p50 that flag would do nothing and is refused.
    // Ten short rounds measured while the other tests load the machine
    // leave p99's CI wide enough to be inconclusive at times, so this
    // checks the wiring, not the verdict (the gate's tests check the
    // verdict on fixed samples).
    let o = regate("mlp", &["--metric", "p99", "--json", "p99.json"]);
    let md = String::from_utf8_lossy(&o.stdout);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{md}");
    assert!(md.contains("Rounds with a host stall are left out"), "{md}");
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("p99.json")).unwrap()).unwrap();
    let row = &c["rows"][0];
    assert_eq!(row["id"], "mlp/ort/cpu/t1/b8", "{row}");
    assert!(row["stalls"].is_array(), "{row}");
    let regressed = row["verdict"] == "regressed";
    assert_eq!(o.status.code() == Some(1), regressed, "{md}");
    assert!(regressed || row["verdict"] == "inconclusive", "{md}");
    let o = regate(
        "mlp",
        &["--metric", "p99", "--keep-stalls", "--json", "kept.json"],
    );
    let md = String::from_utf8_lossy(&o.stdout);
    assert!(!md.contains("host stall"), "{md}");
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("kept.json")).unwrap()).unwrap();
    assert!(c["rows"][0].get("stalls").is_none(), "{c}");
    let o = regate("mlp", &["--keep-stalls"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--keep-stalls applies to a tail metric"),
        "{err}"
    );
    // A model the run did not measure is an error, not an empty pass.
    let o = regate("mlpp", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no `handoff ab` cases of model mlpp"), "{err}");
    let o = ab("big.onnx", "small.onnx", "shrunk");
    let md = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{md}");
    assert!(md.contains("| improved |"), "{md}");
    // A head file that does not exist is a clear error naming it.
    let o = ab("small.onnx", "missing.onnx", "bad");
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.onnx"));
    // A head that is a Git LFS pointer (`git show` of a model in LFS) is
    // named as one, at the model's entry in the user's suite and with its
    // flag.
    std::fs::write(
        d.join("pointer.onnx"),
        "version https://git-lfs.github.com/spec/v1\n\
         oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n\
         size 90312345\n",
    )
    .unwrap();
    // A head whose inputs have other dims has no case to pair with the
    // base's: an error that shows both interfaces, not 'missing' rows.
    handoff_onnx::builder::write_model(
        &SyntheticSpec {
            kind: Kind::Encoder,
            width: 32,
            depth: 1,
            seed: 0,
        }
        .build(),
        &d.join("encoder.onnx"),
    )
    .unwrap();
    let o = ab("small.onnx", "encoder.onnx", "reshaped");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("take inputs with other dims")
            && err.contains("head hidden: f32[batch, seq, 32]"),
        "{err}"
    );
    let o = ab("small.onnx", "pointer.onnx", "pointer");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("suite.yaml:4:5: models[0].source: --head: ")
            && err.contains("pointer.onnx is a Git LFS pointer (object sha256:4d7a2146…, 90.3 MB)"),
        "{err}"
    );
}

/// `handoff ab --base-ort/--head-ort`: the same model on two ONNX Runtime
/// libraries in one interleaved run, each worker process loading its own.
/// The same library under two paths passes; a head library that is not one
/// fails the gate (so the head workers really load the head library).
#[test]
fn ab_of_two_onnx_runtime_libraries_loads_each_in_its_own_workers() {
    use handoff_onnx::synthetic::{Kind, SyntheticSpec};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lib = handoff_ort::provision::fetch().expect("libonnxruntime from the project cache");
    std::fs::copy(&lib, d.join("libonnxruntime-copy.so")).unwrap();
    std::fs::write(d.join("broken.so"), "not a shared library").unwrap();
    let spec = SyntheticSpec {
        kind: Kind::Mlp,
        width: 64,
        depth: 1,
        seed: 0,
    };
    handoff_onnx::builder::write_model(&spec.build(), &d.join("mlp.onnx")).unwrap();
    std::fs::write(
        d.join("suite.yaml"),
        "name: ab-ort
models:
  - id: mlp
    source: {onnx: mlp.onnx}
backends: [ort]
threads: [1]
batch: [1]
measure: {warmup: 20ms, min_iterations: 5, min_time: 200ms, max_time: 400ms, rounds: 6, processes: 1}
",
    )
    .unwrap();
    let lib = lib.display().to_string();
    let ab = |head: &str, out: &str| {
        handoff(
            &[
                "ab",
                "suite.yaml",
                "--model",
                "mlp",
                "--base-ort",
                &lib,
                "--head-ort",
                head,
                // The same library twice: only a failure may fail the gate.
                "--threshold",
                "0.5",
                "--out",
                out,
                "--quiet",
            ],
            d,
        )
    };
    let o = ab("libonnxruntime-copy.so", "same");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let records = read_results(&d.join("same/results.jsonl")).unwrap().records;
    assert_eq!(records.len(), 2, "{records:#?}");
    let name = |p: &str| {
        Path::new(p)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    for (r, library) in records
        .iter()
        .zip([name(&lib), "libonnxruntime-copy.so".into()])
    {
        assert_eq!(r.status, Status::Ok, "{}: {:?}", r.case.id, r.reason);
        assert!(
            r.case.model_source.contains("(ort library ")
                && r.case.model_source.contains(&format!("{library})")),
            "{}",
            r.case.model_source
        );
        assert_eq!(
            r.case.backend_version.as_deref(),
            Some(handoff_ort::provision::PINNED_VERSION)
        );
    }
    let o = ab("broken.so", "broken");
    let md = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{md}");
    assert!(md.contains("**regressed**"), "{md}");
    let records = read_results(&d.join("broken/results.jsonl"))
        .unwrap()
        .records;
    let head = records.iter().find(|r| r.case.model == "mlp.head").unwrap();
    assert_ne!(head.status, Status::Ok, "{head:#?}");
    let base = records.iter().find(|r| r.case.model == "mlp.base").unwrap();
    assert_eq!(base.status, Status::Ok, "{:?}", base.reason);
}

#[test]
fn a_random_classifier_stand_in_runs_says_what_it_is_and_gates_int8_on_labels() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "s.yaml",
        "name: cls\nmodels:\n  - id: cls\n    source: {random: {arch: distilbert, labels: 3, hidden: 32, layers: 1, heads: 4, seed: 5}}\n\
         \x20   variants: [fp32, int8-dynamic]\n    min_cosine: 0.5\n\
         backends: [ort]\nthreads: [1]\nbatch: [1]\ndims: {seq: [16]}\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 200ms, processes: 1}\n",
    );
    let o = handoff(&["run", "s.yaml", "--out", "out", "--quiet"], dir.path());
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let records = read_results(&dir.path().join("out/results.jsonl"))
        .unwrap()
        .records;
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert!(
            r.case
                .model_source
                .contains("random weights: outputs meaningless"),
            "{}",
            r.case.model_source
        );
    }
    let int8 = records
        .iter()
        .find(|r| r.case.model == "cls@int8-dynamic")
        .expect("the int8 variant ran");
    let acc = int8.accuracy.as_ref().unwrap();
    // The gate compared top labels of the logits, not only their cosine.
    let share = acc.label_agreement.expect("a classifier's label agreement");
    assert!((0.0..=1.0).contains(&share));
    assert_eq!(acc.passed, acc.min_cosine >= 0.5 && share >= 1.0);
    let summary = std::fs::read_to_string(dir.path().join("out/summary.md")).unwrap();
    assert!(summary.contains("only its speed does"), "{summary}");
    assert!(summary.contains("top label as fp32 on"), "{summary}");
}

/// More threads than the machine's CPUs is measured as asked, but said
/// before anything runs: by `validate` (on stderr, so `--json` stays
/// clean) and by `run --dry-run`.
#[test]
fn validate_warns_of_more_threads_than_cpus() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: t\nmodels:\n  - id: mlp\n    source: {synthetic: {kind: mlp, width: 8, depth: 1}}\n\
         backends: [ort]\nthreads: [1, 1024]\n",
    )
    .unwrap();
    for args in [
        &["validate", "s.yaml", "--json"][..],
        &["run", "s.yaml", "--dry-run"],
    ] {
        let o = handoff(args, dir.path());
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        let said = format!("{out}{err}");
        assert!(
            said.contains("warning: threads up to 1024 on the ")
                && said.contains("their cells say `oversubscribed`"),
            "{args:?}: {said}"
        );
    }
    // `--json` is a JSON line per case, and nothing else.
    let o = handoff(&["validate", "s.yaml", "--json"], dir.path());
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("stdout stays JSON lines");
    }
}
