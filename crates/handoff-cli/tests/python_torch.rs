//! The `python-torch` baseline for real: PyTorch eager through
//! transformers in its pinned environment (created from PyPI here, as
//! `handoff setup --torch` does), on a tiny BERT, checked against ort.

mod common;

use common::{handoff_env, run_ok, write_tokenizer};

use handoff_runner::{Status, read_results};

fn tiny_bert_suite(dir: &std::path::Path, backends: &str, scenarios: &str) {
    let bert = dir.join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 32, 2, 4, 7).unwrap();
    write_tokenizer(&bert);
    std::fs::write(
        dir.join("s.yaml"),
        format!(
            "name: torch\nmodels:\n  - id: tiny\n    source: {{hf: bert}}\n    text: {{sentences: [w4 w5 w6, w7 w8, w9]}}\n\
             backends: [{backends}]\nthreads: [1, 2]\nbatch: [1, 3]\ndims: {{seq: [8]}}\n\
             measure: {{warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 300ms, target_ci: 0.2, processes: 1}}\n{scenarios}"
        ),
    )
    .unwrap();
}

#[test]
fn python_torch_runs_the_safetensors_model_and_agrees_with_ort() {
    handoff_python::torch::setup().expect("pytorch environment");
    let dir = tempfile::tempdir().unwrap();
    // Per call, and served over HTTP: FastAPI + PyTorch against handoff
    // serve + ort under the same load.
    tiny_bert_suite(
        dir.path(),
        "ort, python-torch",
        "scenarios:\n  - single-stream\n  - {http: {qps: [10], duration: 1s, min_queries: 10, backends: [ort, python-torch], threads: [1], batch: [1]}}\n",
    );
    let records = run_ok(dir.path(), "s.yaml", "out");
    assert_eq!(records.len(), 8 + 2, "{records:#?}");
    for r in &records {
        assert_eq!(r.status, Status::Ok, "{}: {:?}", r.case.id, r.reason);
        if r.case.backend == "python-torch" && r.load.is_none() {
            // Checked against ort on both outputs, and timed inside Python
            // around the forward call as well as around the round trip.
            assert!(r.parity.as_ref().is_some_and(|p| p.ok), "{}", r.case.id);
            let inner = r.inner_latency_ms.as_ref().expect("inner time");
            let outer = r.latency_ms.as_ref().unwrap();
            assert!(inner.p50 <= outer.p50, "{}", r.case.id);
            assert!(
                r.case
                    .backend_version
                    .as_deref()
                    .is_some_and(|v| v.starts_with("2.15.0")),
                "{:?}",
                r.case.backend_version
            );
        }
    }
    // The report puts each Rust row beside PyTorch, from the same rounds.
    let summary = std::fs::read_to_string(dir.path().join("out/summary.md")).unwrap();
    let gain = summary
        .split("## Hand-off gain vs PyTorch")
        .nth(1)
        .unwrap_or_else(|| panic!("no PyTorch table:\n{summary}"));
    assert!(gain.contains("| tiny | 1 | 1 | seq=8 | ort |"), "{gain}");
    assert!(!gain.contains("not measured together"), "{gain}");
    let served = records
        .iter()
        .find(|r| r.case.backend == "python-torch" && r.load.is_some())
        .unwrap();
    // The served embedding matched the reference too.
    assert!(served.parity.as_ref().is_some_and(|p| p.ok), "{served:?}");
    assert_eq!(
        served.load.as_ref().unwrap().server.as_deref(),
        Some(handoff_python::torch::FASTAPI_TORCH_SERVER)
    );
    assert!(
        summary.contains("| tiny | PyTorch | 1 | 1 | 10 QPS |"),
        "{summary}"
    );
}

/// PyTorch's own fast path on CPUs with bf16 units: the `torch-bf16`
/// variant runs the same safetensors under bf16 autocast on python-torch
/// only, gated against the fp32 model on ort like any precision variant.
#[test]
fn torch_bf16_runs_on_python_torch_gated_against_fp32() {
    handoff_python::torch::setup().expect("pytorch environment");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bert = d.join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 32, 2, 4, 7).unwrap();
    write_tokenizer(&bert);
    std::fs::write(
        d.join("s.yaml"),
        "name: bf16\nmodels:\n  - id: tiny\n    source: {hf: bert}\n    text: {sentences: [w4 w5 w6, w7 w8, w9]}\n    variants: [fp32, torch-bf16]\n\
         backends: [ort, python-torch]\nthreads: [1]\nbatch: [2]\ndims: {seq: [8]}\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 300ms, target_ci: 0.2, processes: 1}\n",
    )
    .unwrap();
    let records = run_ok(d, "s.yaml", "out");
    let ids: Vec<&str> = records.iter().map(|r| r.case.id.as_str()).collect();
    let bf16: Vec<_> = records
        .iter()
        .filter(|r| r.case.model == "tiny@torch-bf16")
        .collect();
    assert_eq!(bf16.len(), 1, "python-torch only: {ids:?}");
    let r = bf16[0];
    assert_eq!(r.case.backend, "python-torch");
    assert_eq!(r.status, Status::Ok, "{:?}", r.reason);
    let a = r.accuracy.as_ref().expect("its gate");
    assert!(a.passed && a.threshold_min_cosine == 0.99, "{a:?}");
    // bf16 really ran: close to fp32, not equal to it.
    assert!(a.min_cosine < 1.0 - 1e-7 && a.max_abs > 1e-5, "{a:?}");
    // The case itself is checked against fp32 ort outputs by that gate.
    assert!(r.parity.as_ref().is_some_and(|p| p.ok), "{:?}", r.parity);
    let summary = std::fs::read_to_string(d.join("out/summary.md")).unwrap();
    assert!(summary.contains("| tiny | torch-bf16 |"), "{summary}");
    // The hand-off question on such a CPU: Rust against PyTorch in bf16,
    // from the same rounds.
    let gain = summary
        .split("## Hand-off gain vs PyTorch")
        .nth(1)
        .unwrap_or_else(|| panic!("no PyTorch table:\n{summary}"));
    let row = gain
        .lines()
        .find(|l| l.starts_with("| tiny@torch-bf16 | 1 | 2 | seq=8 | ort |"))
        .unwrap_or_else(|| panic!("no bf16 row:\n{gain}"));
    assert!(!row.contains("not measured together"), "{row}");
}

#[test]
fn without_its_environment_python_torch_is_unavailable_and_says_how_to_set_it_up() {
    let dir = tempfile::tempdir().unwrap();
    tiny_bert_suite(dir.path(), "tract, python-torch", "");
    // An empty project cache, but the ONNX Runtime library the conversion
    // check needs, named directly.
    let ort = handoff_ort::provision::fetch().expect("onnxruntime library");
    let empty = dir.path().join("empty-cache");
    let o = handoff_env(
        &["run", "s.yaml", "--out", "out", "--quiet"],
        dir.path(),
        &[
            ("HANDOFF_CACHE", empty.to_str().unwrap()),
            ("ORT_DYLIB_PATH", ort.to_str().unwrap()),
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let records = read_results(&dir.path().join("out/results.jsonl"))
        .unwrap()
        .records;
    let torch: Vec<_> = records
        .iter()
        .filter(|r| r.case.backend == "python-torch")
        .collect();
    assert_eq!(torch.len(), 4);
    for r in torch {
        assert_eq!(r.status, Status::Unavailable, "{}", r.case.id);
        let why = r.reason.as_deref().unwrap_or("");
        assert!(why.contains("run `handoff setup --torch`"), "{why}");
        assert!(r.latency_ms.is_none());
    }
}

#[test]
fn tiny_bert_and_distilbert_classifiers_agree_on_every_backend() {
    use handoff_convert::bert::{Arch, RandomModel};
    handoff_python::torch::setup().expect("pytorch environment");
    let dir = tempfile::tempdir().unwrap();
    for (name, arch) in [("bert", Arch::Bert), ("distil", Arch::DistilBert)] {
        let d = dir.path().join(name);
        RandomModel {
            arch,
            labels: Some(3),
            hidden: 32,
            layers: 2,
            heads: 4,
            vocab: 100,
            max_positions: 64,
            scale: 0.1,
            seed: 11,
        }
        .write(&d)
        .unwrap();
        write_tokenizer(&d);
    }
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: cls\nmodels:\n  - id: bert-cls\n    source: {hf: bert}\n    text: {sentences: [w4 w5 w6, w7 w8, w9]}\n\
         \x20 - id: distil-cls\n    source: {hf: distil}\n    text: {sentences: [w4 w5 w6, w7 w8, w9]}\n\
         backends: [ort, tract, candle-native, python-torch]\nthreads: [1]\nbatch: [1, 2]\ndims: {seq: [8]}\n\
         scenarios:\n  - single-stream\n\
         \x20 - {http: {qps: [10], duration: 2s, min_queries: 20, endpoint: predict, backends: [ort, python-torch]}}\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 200ms, target_ci: 0.2, processes: 1}\n",
    )
    .unwrap();
    let records = run_ok(dir.path(), "s.yaml", "out");
    // Per call on four backends at two batches, and served: handoff serve's
    // /predict against the transformers pipeline behind FastAPI (batch 1).
    assert_eq!(records.len(), 2 * 4 * 2 + 2 * 2, "{records:#?}");
    for r in records.iter().filter(|r| r.load.is_some()) {
        assert!(r.case.id.ends_with("/http-predict@10qps"), "{}", r.case.id);
        assert_eq!(r.case.batch, 1);
        assert!(
            r.rounds.is_some(),
            "the two servers alternate: {}",
            r.case.id
        );
        let server = r.load.as_ref().unwrap().server.clone().unwrap();
        if r.case.backend == "python-torch" {
            assert_eq!(server, handoff_python::torch::FASTAPI_PIPELINE_SERVER);
        } else {
            assert!(server.starts_with("handoff serve"), "{server}");
        }
    }
    for r in &records {
        // Each backend's logits (and last hidden state) match ort's: the
        // converter's heads, candle's and PyTorch's are the same function.
        assert_eq!(r.status, Status::Ok, "{}: {:?}", r.case.id, r.reason);
        assert!(r.parity.as_ref().is_some_and(|p| p.ok), "{}", r.case.id);
    }
    // DistilBERT has no token types: its cases bind two inputs.
    let onnx = std::fs::read_dir(dir.path().join("cache/converted"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
        .map(|p| handoff_onnx::ModelInfo::load(&p).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(onnx.len(), 2);
    for info in onnx {
        let outs: Vec<String> = info.outputs.iter().map(ToString::to_string).collect();
        assert_eq!(outs[1], "logits: f32[batch, 3]");
        let inputs = info.inputs.len();
        assert!(inputs == 2 || inputs == 3, "{:?}", info.inputs);
    }
}

#[test]
fn predict_needs_a_classifier_and_says_so_at_validation() {
    let dir = tempfile::tempdir().unwrap();
    tiny_bert_suite(
        dir.path(),
        "ort",
        "scenarios:\n  - {http: {qps: [10], endpoint: predict}}\n",
    );
    let o = common::handoff(&["validate", "s.yaml"], dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("scenarios[0].http.endpoint")
            && err.contains("`tiny` is not one (its last output is `sentence_embedding`"),
        "{err}"
    );
}
